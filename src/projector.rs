//! The NExT-GPT output projector, written once over the [`Backend`] op set.
//!
//! ```text
//! x   = hidden + embeds                      [B, n_in, in_dim]
//! src = fc(x)                                [B, n_in, d]
//! mem = Encoder(src)                         pre-LN layers, then a final LayerNorm
//! y   = Decoder(query_embs repeated B times, mem)
//! out = model(y)                             [B, n_out, out_dim]
//! ```
//! Residual adds are fused into the LayerNorm that follows them: a sub-block
//! writes its output `f`, and the next `layer_norm(f + stream)` also writes the
//! new stream. So every residual add is one pass over the data, not two.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::ProjectorConfig;
use crate::error::{Error, Result};
use crate::ops::{Activation, AttentionSpec, Backend, Cols, Shaped};
use crate::signal::SignalPositions;
use crate::tensor::{checked_numel, try_filled, HostTensor};
use crate::weights::ProjectorWeights;

struct Linear<T> {
    weight: T,
    bias: T,
}

struct Norm<T> {
    weight: T,
    bias: T,
}

struct EncoderLayer<T> {
    qkv: Linear<T>,
    attn_out: Linear<T>,
    linear1: Linear<T>,
    linear2: Linear<T>,
    norm1: Norm<T>,
    norm2: Norm<T>,
}

struct DecoderLayer<T> {
    self_qkv: Linear<T>,
    self_out: Linear<T>,
    /// Cross-attention: q from the decoder stream, k and v from the memory
    /// (the packed `in_proj` split by rows: `[0, d)` and `[d, 3d)`).
    cross_q: Linear<T>,
    cross_kv: Linear<T>,
    cross_out: Linear<T>,
    linear1: Linear<T>,
    linear2: Linear<T>,
    norm1: Norm<T>,
    norm2: Norm<T>,
    norm3: Norm<T>,
}

/// A projector whose weights live on backend `B`.
pub struct Projector<B: Backend> {
    backend: B,
    config: ProjectorConfig,
    input: Linear<B::Tensor>,
    query_embs: HostTensor,
    encoder: Vec<EncoderLayer<B::Tensor>>,
    encoder_norm: Norm<B::Tensor>,
    decoder: Vec<DecoderLayer<B::Tensor>>,
    decoder_norm: Norm<B::Tensor>,
    output: Linear<B::Tensor>,
    /// The learned queries repeated per batch row, uploaded once per batch size.
    queries: Mutex<HashMap<usize, B::Tensor>>,
}

/// Batch sizes whose repeated queries are kept on the device.
const QUERY_CACHE_SIZES: usize = 8;

impl<B: Backend> Projector<B> {
    /// Upload `weights` to `backend`.
    pub fn new(backend: B, weights: &ProjectorWeights) -> Result<Self> {
        let config = weights.config().clone();
        config.validate()?;
        let d = config.d_model;
        let up = |name: &str| backend.upload(weights.get(name)?);
        let linear = |p: &str| -> Result<Linear<B::Tensor>> {
            Ok(Linear {
                weight: up(&format!("{p}.weight"))?,
                bias: up(&format!("{p}.bias"))?,
            })
        };
        let norm = |p: &str| -> Result<Norm<B::Tensor>> {
            Ok(Norm {
                weight: up(&format!("{p}.weight"))?,
                bias: up(&format!("{p}.bias"))?,
            })
        };
        let packed = |p: &str, rows: std::ops::Range<usize>| -> Result<Linear<B::Tensor>> {
            Ok(Linear {
                weight: backend.upload(
                    &weights
                        .get(&format!("{p}.in_proj_weight"))?
                        .rows(rows.clone())?,
                )?,
                bias: backend.upload(&weights.get(&format!("{p}.in_proj_bias"))?.rows(rows)?)?,
            })
        };
        // (packed q/k/v projection, output projection) of one attention block
        type AttnPair<T> = (Linear<T>, Linear<T>);
        let attn = |p: &str| -> Result<AttnPair<B::Tensor>> {
            Ok((
                Linear {
                    weight: up(&format!("{p}.in_proj_weight"))?,
                    bias: up(&format!("{p}.in_proj_bias"))?,
                },
                linear(&format!("{p}.out_proj"))?,
            ))
        };
        let mut encoder = Vec::with_capacity(config.encoder_layers);
        for l in 0..config.encoder_layers {
            let p = format!("tfm.encoder.layers.{l}");
            let (qkv, attn_out) = attn(&format!("{p}.self_attn"))?;
            encoder.push(EncoderLayer {
                qkv,
                attn_out,
                linear1: linear(&format!("{p}.linear1"))?,
                linear2: linear(&format!("{p}.linear2"))?,
                norm1: norm(&format!("{p}.norm1"))?,
                norm2: norm(&format!("{p}.norm2"))?,
            });
        }
        let mut decoder = Vec::with_capacity(config.decoder_layers);
        for l in 0..config.decoder_layers {
            let p = format!("tfm.decoder.layers.{l}");
            let (self_qkv, self_out) = attn(&format!("{p}.self_attn"))?;
            let ca = format!("{p}.multihead_attn");
            decoder.push(DecoderLayer {
                self_qkv,
                self_out,
                cross_q: packed(&ca, 0..d)?,
                cross_kv: packed(&ca, d..3 * d)?,
                cross_out: linear(&format!("{ca}.out_proj"))?,
                linear1: linear(&format!("{p}.linear1"))?,
                linear2: linear(&format!("{p}.linear2"))?,
                norm1: norm(&format!("{p}.norm1"))?,
                norm2: norm(&format!("{p}.norm2"))?,
                norm3: norm(&format!("{p}.norm3"))?,
            });
        }
        Ok(Projector {
            input: linear(config.variant.input_linear())?,
            query_embs: weights.get("query_embs")?.clone(),
            encoder,
            encoder_norm: norm("tfm.encoder.norm")?,
            decoder,
            decoder_norm: norm("tfm.decoder.norm")?,
            output: linear(config.variant.output_linear())?,
            queries: Mutex::new(HashMap::new()),
            config,
            backend,
        })
    }

    /// `query_embs` repeated `batch` times, on the device.
    fn repeated_queries(&self, batch: usize) -> Result<B::Tensor> {
        let (n, d) = (self.config.n_out, self.config.d_model);
        let one = self.query_embs.to_f64_vec();
        let mut all = try_filled(checked_numel(&[batch, n, d], "queries")?, 0.0, "queries")?;
        for row in all.chunks_exact_mut(one.len().max(1)) {
            row.copy_from_slice(&one);
        }
        let all = HostTensor::from_f64(vec![batch, n, d], all)?;
        self.backend.upload(&all.to_dtype(self.query_embs.dtype()))
    }

    pub fn config(&self) -> &ProjectorConfig {
        &self.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The conditioning `[B, n_out, out_dim]` for signal-token states
    /// `hidden` (`[B, n_in, in_dim]`) plus, when given, their input embeddings
    /// `embeds` (same shape), as NExT-GPT adds them.
    pub fn forward(&self, hidden: &B::Tensor, embeds: Option<&B::Tensor>) -> Result<B::Tensor> {
        let shape = hidden.shape();
        let c = &self.config;
        if shape.len() != 3 {
            return Err(Error::invalid(format!(
                "hidden must be [batch, n_in, in_dim], found shape {shape:?}"
            )));
        }
        let (batch, n_in) = (shape[0], shape[1]);
        if batch == 0 {
            return Err(Error::invalid("hidden: batch is 0"));
        }
        if n_in == 0 {
            return Err(Error::invalid("hidden: no signal tokens (n_in is 0)"));
        }
        if let Some(want) = c.n_in {
            if n_in != want {
                return Err(Error::Shape {
                    key: "hidden".into(),
                    expected: vec![batch, want, c.in_dim],
                    found: shape.to_vec(),
                });
            }
        }
        if shape[2] != c.in_dim {
            return Err(Error::Shape {
                key: "hidden".into(),
                expected: vec![batch, n_in, c.in_dim],
                found: shape.to_vec(),
            });
        }
        if let Some(e) = embeds {
            if e.shape() != shape {
                return Err(Error::Shape {
                    key: "embeds".into(),
                    expected: shape.to_vec(),
                    found: e.shape().to_vec(),
                });
            }
        }
        let x = match embeds {
            Some(e) => {
                let mut x = self.backend.alloc(shape)?;
                let all = SignalPositions::all(batch, n_in)?;
                self.backend
                    .gather_signal_tokens(hidden, Some(e), &all, &mut x)?;
                Some(x)
            }
            None => None,
        };
        self.forward_summed(x.as_ref().unwrap_or(hidden), batch, n_in)
    }

    /// From full LLM outputs: gather the signal tokens `signal_ids` from `hidden`
    /// and `embeds` (`[B, T, in_dim]`) at the positions found in `token_ids`
    /// (`[B, T]`), then project.
    pub fn forward_from_llm(
        &self,
        hidden: &B::Tensor,
        embeds: Option<&B::Tensor>,
        token_ids: &[i64],
        signal_ids: &[i64],
    ) -> Result<B::Tensor> {
        let shape = hidden.shape();
        if shape.len() != 3 {
            return Err(Error::invalid(format!(
                "hidden must be [batch, seq, in_dim], found shape {shape:?}"
            )));
        }
        let positions = SignalPositions::find(token_ids, shape[0], shape[1], signal_ids)?;
        let mut x = self
            .backend
            .alloc(&[shape[0], positions.count(), shape[2]])?;
        self.backend
            .gather_signal_tokens(hidden, embeds, &positions, &mut x)?;
        self.forward(&x, None)
    }

    fn forward_summed(&self, x: &B::Tensor, batch: usize, n_in: usize) -> Result<B::Tensor> {
        let c = &self.config;
        let be = &self.backend;
        let (d, n) = (c.d_model, c.n_out);
        let spec = AttentionSpec::new(c.heads, c.head_dim());

        // Encoder. The stream starts as fc(x); every sub-block leaves its output
        // in `f`, which the next norm adds to the stream.
        let mut e = Work::new(be, [batch, n_in], d, c.ffn_dim)?;
        self.input.apply(be, x, Activation::None, &mut e.s[0])?;
        for (l, layer) in self.encoder.iter().enumerate() {
            e.add_norm(be, l > 0, &layer.norm1, c.eps)?;
            e.self_attention(be, &layer.qkv, &layer.attn_out, &spec)?;
            e.add_norm(be, true, &layer.norm2, c.eps)?;
            e.feed_forward(be, &layer.linear1, &layer.linear2)?;
        }
        let mut memory = be.alloc(&[batch, n_in, d])?;
        e.norm_into(be, &self.encoder_norm, c.eps, &mut memory)?;
        drop(e);

        // Decoder over the learned queries, repeated per batch row.
        let mut cache = self
            .queries
            .lock()
            .map_err(|_| Error::invalid("projector query cache poisoned by an earlier panic"))?;
        if !cache.contains_key(&batch) {
            if cache.len() >= QUERY_CACHE_SIZES {
                cache.clear();
            }
            cache.insert(batch, self.repeated_queries(batch)?);
        }
        let queries = cache
            .get(&batch)
            .ok_or_else(|| Error::invalid("projector query cache lost an entry"))?;
        let mut t = Work::new(be, [batch, n], d, c.ffn_dim)?;
        let mut q = be.alloc(&[batch, n, d])?;
        let mut kv = be.alloc(&[batch, n_in, 2 * d])?;
        for (l, layer) in self.decoder.iter().enumerate() {
            if l == 0 {
                // The stream starts as the queries: the first norm copies them in.
                let (w, b) = (&layer.norm1.weight, &layer.norm1.bias);
                be.layer_norm(queries, None, w, b, c.eps, &mut t.h, Some(&mut t.s[0]))?;
            } else {
                t.add_norm(be, true, &layer.norm1, c.eps)?;
            }
            t.self_attention(be, &layer.self_qkv, &layer.self_out, &spec)?;
            t.add_norm(be, true, &layer.norm2, c.eps)?;
            // Cross-attention: queries from the stream, keys and values from memory.
            layer.cross_q.apply(be, &t.h, Activation::None, &mut q)?;
            layer
                .cross_kv
                .apply(be, &memory, Activation::None, &mut kv)?;
            let (k, v) = (Cols::new(&kv, 0), Cols::new(&kv, d));
            be.attention(Cols::new(&q, 0), k, v, &spec, None, &mut t.a)?;
            layer
                .cross_out
                .apply(be, &t.a, Activation::None, &mut t.f)?;
            t.add_norm(be, true, &layer.norm3, c.eps)?;
            t.feed_forward(be, &layer.linear1, &layer.linear2)?;
        }
        let mut y = be.alloc(&[batch, n, d])?;
        t.norm_into(be, &self.decoder_norm, c.eps, &mut y)?;
        let mut out = be.alloc(&[batch, n, c.out_dim])?;
        self.output.apply(be, &y, Activation::None, &mut out)?;
        Ok(out)
    }
}

impl<T> Linear<T> {
    fn apply<B: Backend<Tensor = T>>(
        &self,
        be: &B,
        x: &T,
        act: Activation,
        out: &mut T,
    ) -> Result<()> {
        be.linear(x, &self.weight, Some(&self.bias), act, None, out)
    }
}

/// The buffers of one pre-LN stack (encoder or decoder) at one batch size.
struct Work<T> {
    /// The residual stream, ping-ponged: `s[0]` is current.
    s: [T; 2],
    /// The output of the last sub-block, not yet added to the stream.
    f: T,
    /// The normalised stream, input of the next sub-block.
    h: T,
    qkv: T,
    a: T,
    ffn: T,
}

impl<T> Work<T> {
    fn new<B: Backend<Tensor = T>>(
        be: &B,
        [batch, tokens]: [usize; 2],
        d: usize,
        ffn: usize,
    ) -> Result<Self> {
        Ok(Work {
            s: [
                be.alloc(&[batch, tokens, d])?,
                be.alloc(&[batch, tokens, d])?,
            ],
            f: be.alloc(&[batch, tokens, d])?,
            h: be.alloc(&[batch, tokens, d])?,
            qkv: be.alloc(&[batch, tokens, 3 * d])?,
            a: be.alloc(&[batch, tokens, d])?,
            ffn: be.alloc(&[batch, tokens, ffn])?,
        })
    }

    /// `h = norm(f + s)` and `s = f + s` when `f` is pending; `h = norm(s)` otherwise.
    fn add_norm<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        pending: bool,
        norm: &Norm<T>,
        eps: f64,
    ) -> Result<()> {
        self.add_norm_to(be, pending, norm, eps, None)
    }

    /// `out = norm(f + s)`: the stack's final norm (at least one layer ran).
    fn norm_into<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        norm: &Norm<T>,
        eps: f64,
        out: &mut T,
    ) -> Result<()> {
        self.add_norm_to(be, true, norm, eps, Some(out))
    }

    fn add_norm_to<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        pending: bool,
        norm: &Norm<T>,
        eps: f64,
        out: Option<&mut T>,
    ) -> Result<()> {
        let out = match out {
            Some(o) => o,
            None => &mut self.h,
        };
        if !pending {
            return be.layer_norm(&self.s[0], None, &norm.weight, &norm.bias, eps, out, None);
        }
        let [cur, next] = &mut self.s;
        be.layer_norm(
            &self.f,
            Some(cur),
            &norm.weight,
            &norm.bias,
            eps,
            out,
            Some(next),
        )?;
        self.s.swap(0, 1);
        Ok(())
    }

    /// `f = out_proj(attention(qkv_proj(h)))`, Q, K and V read in place.
    fn self_attention<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        qkv: &Linear<T>,
        out: &Linear<T>,
        spec: &AttentionSpec,
    ) -> Result<()> {
        let d = spec.heads * spec.head_dim;
        qkv.apply(be, &self.h, Activation::None, &mut self.qkv)?;
        let (q, k, v) = (
            Cols::new(&self.qkv, 0),
            Cols::new(&self.qkv, d),
            Cols::new(&self.qkv, 2 * d),
        );
        be.attention(q, k, v, spec, None, &mut self.a)?;
        out.apply(be, &self.a, Activation::None, &mut self.f)
    }

    /// `f = linear2(relu(linear1(h)))`.
    fn feed_forward<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        l1: &Linear<T>,
        l2: &Linear<T>,
    ) -> Result<()> {
        l1.apply(be, &self.h, Activation::Relu, &mut self.ffn)?;
        l2.apply(be, &self.ffn, Activation::None, &mut self.f)
    }
}
