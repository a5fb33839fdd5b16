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
//! new stream. So every residual add is one pass over the data, not two. Every
//! LayerNorm feeds one linear (QKV, FFN up, the cross-attention queries, the
//! stacked cross-attention keys and values, the output), and they go to the
//! backend as one op ([`Backend::layer_norm_linear`]), which it may run as one
//! kernel.
//!
//! Three rewrites cut a forward's launches and weight traffic without changing
//! what it computes:
//! - The decoder starts from the learned queries, which do not depend on the
//!   input: its first layer's self-attention block, the norm after it and the
//!   cross-attention's query projection are the same for every input. They
//!   are computed once per batch size ([`DecoderPrefix`]) and reused.
//! - Every decoder layer's cross-attention projects the same memory to keys and
//!   values: the K/V rows of the layers' `in_proj` are stacked into one
//!   `[layers * 2d, d]` weight, so one GEMM serves all of them.
//! - Where the memory is a few signal tokens and the backend says it pays
//!   ([`Backend::attention_absorbed_pays`]), the cross-attention's query and
//!   output projections are absorbed into its keys and values. Head `e`'s
//!   score of key `k_j` is `(W_qᵉ h + b_qᵉ) · k_jᵉ = h · (W_qᵉᵀ k_jᵉ) + b_qᵉ ·
//!   k_jᵉ`, and its share of the output `W_oᵉ Σ_j p_j v_jᵉ = Σ_j p_j (W_oᵉ
//!   v_jᵉ)`. With `k_j = W_k m_j + b_k` (and `v_j` alike) those three are
//!   linear in the memory row `m_j` (`b_k`'s share of a score is the same
//!   for every key, and the softmax cancels it): their weights (`W_qᵉᵀ
//!   W_kᵉ`, `W_oᵉ W_vᵉ`, `b_qᵉᵀ W_kᵉ`, made once, in f64) are stacked in
//!   place of the K/V rows, so the one GEMM over the memory gives them, and each layer's
//!   cross-attention becomes per query row `heads x keys` dot products and
//!   as many scaled row sums, with the LayerNorms before and after it, in
//!   one op ([`Backend::attention_absorbed`]): no GEMM over the 77 query
//!   rows at all.
//!
//! A [`Plan`] holds every buffer of a forward at one shape: with
//! [`Projector::forward_with`] a forward allocates nothing and copies nothing,
//! which is what graph capture needs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::config::ProjectorConfig;
use crate::error::{Error, Result};
use crate::ops::{
    AbsorbedAttentionInput, Activation, AttentionInput, AttentionSpec, Backend, Cols, NormAfter,
    NormInput, Shaped,
};
use crate::profile;
use crate::signal::SignalPositions;
use crate::tensor::{checked_numel, overflows, try_filled, try_zeroed, DType, Element, HostTensor};
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
    /// Cross-attention's query projection (rows `[0, d)` of the packed
    /// `in_proj`); its key/value rows live in [`Projector::cross_kv`].
    cross_q: Linear<T>,
    cross_out: Linear<T>,
    linear1: Linear<T>,
    linear2: Linear<T>,
    norm1: Norm<T>,
    norm2: Norm<T>,
    norm3: Norm<T>,
}

/// What the decoder's first layer computes before it reads the memory, for
/// the learned queries repeated `batch` times: the same for every input.
pub struct DecoderPrefix<T> {
    batch: usize,
    /// The stream after the first self-attention block: `q + SA(norm1(q))`.
    stream: T,
    /// The first cross-attention's queries: `cross_q(norm2(stream))`.
    cross_q: T,
}

/// Every buffer of one forward at one `(batch, n_in)`, made by
/// [`Projector::plan`] for one projector. [`Projector::forward_with`] and
/// [`Projector::forward_with_at`] write into it and allocate nothing.
pub struct Plan<T> {
    projector: u64,
    batch: usize,
    n_in: usize,
    /// The signal tokens gathered (and `hidden + embeds`), made by the first
    /// forward that gathers: one given embeds, or whole sequences.
    gathered: Option<T>,
    encoder: Work<T>,
    /// Keys and values of every decoder layer, from the encoder's output:
    /// `[B, n_in, layers * 2d]`.
    cross_kv: T,
    decoder: Work<T>,
    /// Cross-attention queries.
    q: T,
    out: T,
    prefix: Arc<DecoderPrefix<T>>,
    /// The absorbed cross-attention's stacked weight, where this plan's
    /// decoder runs it; `cross_kv` then holds its output.
    absorbed: Option<Arc<Linear<T>>>,
}

impl<T> Plan<T> {
    /// Sequences per forward, `B`: the batch the plan was made for.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Signal tokens per sequence the plan was made for (the input is
    /// `[B, n_in, in_dim]`).
    pub fn n_in(&self) -> usize {
        self.n_in
    }

    /// The last forward's conditioning, `[B, n_out, out_dim]`.
    pub fn output(&self) -> &T {
        &self.out
    }

    /// The output, taking the plan apart.
    pub fn into_output(self) -> T {
        self.out
    }
}

/// A projector whose weights live on backend `B`.
pub struct Projector<B: Backend> {
    backend: B,
    config: ProjectorConfig,
    /// Tells this projector's plans from other projectors'.
    id: u64,
    input: Linear<B::Tensor>,
    query_embs: HostTensor,
    encoder: Vec<EncoderLayer<B::Tensor>>,
    encoder_norm: Norm<B::Tensor>,
    decoder: Vec<DecoderLayer<B::Tensor>>,
    /// The K/V projections of every decoder layer's cross-attention, stacked.
    cross_kv: Linear<B::Tensor>,
    decoder_norm: Norm<B::Tensor>,
    output: Linear<B::Tensor>,
    /// Decoder prefixes by batch size.
    prefixes: Mutex<HashMap<usize, Arc<DecoderPrefix<B::Tensor>>>>,
    /// The absorbed cross-attention's stacked weight ([`AbsorbedCross`]),
    /// made by the first plan that runs it.
    absorbed: Mutex<Option<Arc<Linear<B::Tensor>>>>,
}

/// Batch sizes whose decoder prefix is kept on the device.
const PREFIX_CACHE_SIZES: usize = 8;

static NEXT_PROJECTOR_ID: AtomicU64 = AtomicU64::new(1);

impl<B: Backend> Projector<B> {
    /// Upload `weights` to `backend`.
    pub fn new(backend: B, weights: &ProjectorWeights) -> Result<Self> {
        let config = weights.config().clone();
        config.validate()?;
        let d = config.d_model;
        let up = |name: &str| backend.upload(weights.get(name)?);
        let up_weight = |name: &str| backend.upload_weight(weights.get(name)?);
        let linear = |p: &str| -> Result<Linear<B::Tensor>> {
            Ok(Linear {
                weight: up_weight(&format!("{p}.weight"))?,
                bias: up(&format!("{p}.bias"))?,
            })
        };
        let norm = |p: &str| -> Result<Norm<B::Tensor>> {
            Ok(Norm {
                weight: up(&format!("{p}.weight"))?,
                bias: up(&format!("{p}.bias"))?,
            })
        };
        // Rows `rows` of a packed `in_proj` (weight and bias), on the host.
        let packed = |p: &str, rows: std::ops::Range<usize>| -> Result<[HostTensor; 2]> {
            Ok([
                weights
                    .get(&format!("{p}.in_proj_weight"))?
                    .rows(rows.clone())?,
                weights.get(&format!("{p}.in_proj_bias"))?.rows(rows)?,
            ])
        };
        // (packed q/k/v projection, output projection) of one attention block
        type AttnPair<T> = (Linear<T>, Linear<T>);
        let attn = |p: &str| -> Result<AttnPair<B::Tensor>> {
            Ok((
                Linear {
                    weight: up_weight(&format!("{p}.in_proj_weight"))?,
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
        let (mut kv_weights, mut kv_biases) = (Vec::new(), Vec::new());
        for l in 0..config.decoder_layers {
            let p = format!("tfm.decoder.layers.{l}");
            let (self_qkv, self_out) = attn(&format!("{p}.self_attn"))?;
            let ca = format!("{p}.multihead_attn");
            let [qw, qb] = packed(&ca, 0..d)?;
            let [kvw, kvb] = packed(&ca, d..3 * d)?;
            kv_weights.push(kvw);
            kv_biases.push(kvb);
            decoder.push(DecoderLayer {
                self_qkv,
                self_out,
                cross_q: Linear {
                    weight: backend.upload_weight_owned(qw)?,
                    bias: backend.upload(&qb)?,
                },
                cross_out: linear(&format!("{ca}.out_proj"))?,
                linear1: linear(&format!("{p}.linear1"))?,
                linear2: linear(&format!("{p}.linear2"))?,
                norm1: norm(&format!("{p}.norm1"))?,
                norm2: norm(&format!("{p}.norm2"))?,
                norm3: norm(&format!("{p}.norm3"))?,
            });
        }
        let cross_kv = Linear {
            weight: backend.upload_weight_owned(HostTensor::concat_rows(&kv_weights)?)?,
            bias: backend.upload(&HostTensor::concat_rows(&kv_biases)?)?,
        };
        Ok(Projector {
            id: NEXT_PROJECTOR_ID.fetch_add(1, Ordering::Relaxed),
            input: linear(config.variant.input_linear())?,
            query_embs: weights.get("query_embs")?.clone(),
            encoder,
            encoder_norm: norm("tfm.encoder.norm")?,
            decoder,
            cross_kv,
            decoder_norm: norm("tfm.decoder.norm")?,
            output: linear(config.variant.output_linear())?,
            prefixes: Mutex::new(HashMap::new()),
            absorbed: Mutex::new(None),
            config,
            backend,
        })
    }

    /// The config of the weights the projector was built from.
    pub fn config(&self) -> &ProjectorConfig {
        &self.config
    }

    /// The backend the weights live on; inputs must be its tensors.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The buffers of a forward of `batch` rows of `n_in` signal tokens, with
    /// the decoder prefix for `batch` computed (on first use of that batch
    /// size) and kept. Reuse a plan for every forward of its shape.
    ///
    /// ```
    /// use output_projector::config::{Modality, ProjectorConfig, Variant};
    /// use output_projector::cpu::Cpu;
    /// use output_projector::ops::Backend;
    /// use output_projector::projector::Projector;
    /// use output_projector::tensor::HostTensor;
    /// use output_projector::weights::ProjectorWeights;
    ///
    /// # fn main() -> output_projector::Result<()> {
    /// let mut config = ProjectorConfig::preset(Modality::Audio, Variant::Legacy);
    /// config.in_dim = 16; // small for the example
    /// let weights = ProjectorWeights::random(config, None, 1)?;
    /// let projector = Projector::new(Cpu::open()?, &weights)?;
    /// let be = projector.backend();
    ///
    /// // Batch 2 of the 8 [AUD] tokens: one plan, its buffers made once.
    /// let mut plan = projector.plan(2, 8)?;
    /// for step in 0..3 {
    ///     let states = vec![0.25 * step as f32; 2 * 8 * 16];
    ///     let hidden = be.upload(&HostTensor::from_f32(vec![2, 8, 16], states)?)?;
    ///     let out = be.download(projector.forward_with(&mut plan, &hidden, None)?)?;
    ///     // What a forward with buffers of its own gives, to the bit.
    ///     let fresh = be.download(&projector.forward(&hidden, None)?)?;
    ///     assert_eq!(out.to_f64_vec(), fresh.to_f64_vec());
    /// }
    /// // Another shape is an error that says which, not a wrong answer.
    /// let three = be.upload(&HostTensor::from_f32(vec![3, 8, 16], vec![0.0; 3 * 8 * 16])?)?;
    /// assert!(projector.forward_with(&mut plan, &three, None).is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn plan(&self, batch: usize, n_in: usize) -> Result<Plan<B::Tensor>> {
        self.check_input_shape(&[batch, n_in, self.config.in_dim])?;
        let c = &self.config;
        let be = &self.backend;
        let (d, n) = (c.d_model, c.n_out);
        let absorbed = if be.attention_absorbed_pays(n_in, c.heads, d) {
            Some(self.absorbed_cross()?)
        } else {
            None
        };
        let kv_cols = match &absorbed {
            Some(a) => a.weight.shape()[0],
            None => c
                .decoder_layers
                .checked_mul(2 * d)
                .ok_or_else(|| Error::Overflow("decoder keys and values".into()))?,
        };
        // Every buffer below, counted before any is taken.
        let buffers = Work::<B::Tensor>::shapes([batch, n], d, c.ffn_dim)
            .into_iter()
            .chain(Work::<B::Tensor>::shapes([batch, n_in], d, c.ffn_dim))
            .chain([[batch, n_in, kv_cols], [batch, n, d], [batch, n, c.out_dim]]);
        let elements = buffers.into_iter().try_fold(0usize, |sum, shape| {
            sum.checked_add(checked_numel(&shape, "the plan's buffers")?)
                .ok_or_else(|| Error::Overflow("the plan's buffers".into()))
        })?;
        be.check_room(
            elements,
            &format!("the buffers of a forward at batch {batch}"),
        )?;
        let mut decoder = Work::new(be, [batch, n], d, c.ffn_dim)?;
        let prefix = self.prefix(batch, &mut decoder)?;
        Ok(Plan {
            projector: self.id,
            batch,
            n_in,
            gathered: None,
            encoder: Work::new(be, [batch, n_in], d, c.ffn_dim)?,
            cross_kv: be.alloc(&[batch, n_in, kv_cols])?,
            decoder,
            q: be.alloc(&[batch, n, d])?,
            out: be.alloc(&[batch, n, c.out_dim])?,
            prefix,
            absorbed,
        })
    }

    /// The absorbed cross-attention's stacked weight, made from the
    /// projections on the device on first use and kept.
    fn absorbed_cross(&self) -> Result<Arc<Linear<B::Tensor>>> {
        let mut kept = self.absorbed.lock().map_err(|_| {
            Error::invalid("projector absorbed weights poisoned by an earlier panic")
        })?;
        if let Some(a) = kept.as_ref() {
            return Ok(Arc::clone(a));
        }
        let _range = profile::range("decoder.absorb");
        let be = &self.backend;
        let c = &self.config;
        let d = c.d_model;
        let host = |t: &B::Tensor| be.download(t).map(|h| h.to_f64_vec());
        let (kv_w, kv_b) = (host(&self.cross_kv.weight)?, host(&self.cross_kv.bias)?);
        let mut own = Vec::with_capacity(self.decoder.len());
        for layer in &self.decoder {
            own.push((
                host(&layer.cross_q.weight)?,
                host(&layer.cross_q.bias)?,
                host(&layer.cross_out.weight)?,
            ));
        }
        let layers: Vec<AttentionWeights<'_>> = own
            .iter()
            .zip(kv_w.chunks_exact(2 * d * d).zip(kv_b.chunks_exact(2 * d)))
            .map(|((wq, bq, wo), (kv_w, kv_b))| {
                let ((wk, wv), (bk, bv)) = (kv_w.split_at(d * d), kv_b.split_at(d));
                AttentionWeights {
                    q: (wq, bq),
                    k: (wk, bk),
                    v: (wv, bv),
                    out: wo,
                }
            })
            .collect();
        let shape = AbsorbedCross::new(c.decoder_layers, c.heads, d)?;
        let (w, b) = shape.weights(&layers, be.weight_dtype(), be.host_pool())?;
        let a = Arc::new(Linear {
            weight: be.upload_weight_owned(w)?,
            bias: be.upload(&b)?,
        });
        *kept = Some(Arc::clone(&a));
        Ok(a)
    }

    /// The decoder prefix for `batch`, from the cache or computed with `t`'s
    /// buffers as scratch.
    fn prefix(
        &self,
        batch: usize,
        t: &mut Work<B::Tensor>,
    ) -> Result<Arc<DecoderPrefix<B::Tensor>>> {
        let mut cache = self
            .prefixes
            .lock()
            .map_err(|_| Error::invalid("projector prefix cache poisoned by an earlier panic"))?;
        if let Some(p) = cache.get(&batch) {
            return Ok(Arc::clone(p));
        }
        let _range = profile::range("decoder.prefix");
        let c = &self.config;
        let be = &self.backend;
        let (d, n) = (c.d_model, c.n_out);
        let spec = AttentionSpec::new(c.heads, c.head_dim());
        let first = self
            .decoder
            .first()
            .ok_or_else(|| Error::invalid("config: decoder_layers must be at least 1"))?;
        let queries = self.repeated_queries(batch)?;
        let mut stream = be.alloc(&[batch, n, d])?;
        let mut cross_q = be.alloc(&[batch, n, d])?;
        let none = Activation::None;
        let norm1 = first.norm1.of(&queries, None, c.eps);
        first
            .self_qkv
            .apply_normed(be, norm1, None, &mut t.h, none, &mut t.qkv)?;
        t.attend(be, &first.self_out, &spec, None)?;
        let norm2 = first.norm2.of(&t.f, Some(&queries), c.eps);
        let sum = Some(&mut stream);
        first
            .cross_q
            .apply_normed(be, norm2, sum, &mut t.h, none, &mut cross_q)?;
        let prefix = Arc::new(DecoderPrefix {
            batch,
            stream,
            cross_q,
        });
        if cache.len() >= PREFIX_CACHE_SIZES {
            cache.clear();
        }
        cache.insert(batch, Arc::clone(&prefix));
        Ok(prefix)
    }

    /// `query_embs` repeated `batch` times, on the device.
    fn repeated_queries(&self, batch: usize) -> Result<B::Tensor> {
        self.backend
            .upload(&self.query_embs.repeat(batch, "queries")?)
    }

    /// An error unless `shape` is a valid `[batch, n_in, in_dim]` input.
    fn check_input_shape(&self, shape: &[usize]) -> Result<()> {
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
        Ok(())
    }

    /// The conditioning `[B, n_out, out_dim]` for signal-token states
    /// `hidden` (`[B, n_in, in_dim]`) plus, when given, their input embeddings
    /// `embeds` (same shape), as NExT-GPT adds them. Values are not inspected
    /// on the device: a NaN or infinity in the input comes out as NaN, as in
    /// PyTorch (`outproj run` refuses such inputs on the host).
    pub fn forward(&self, hidden: &B::Tensor, embeds: Option<&B::Tensor>) -> Result<B::Tensor> {
        self.check_input_shape(hidden.shape())?;
        let shape = hidden.shape();
        let mut plan = self.plan(shape[0], shape[1])?;
        self.forward_with(&mut plan, hidden, embeds)?;
        Ok(plan.into_output())
    }

    /// [`forward`](Self::forward) into the buffers of `plan` (made by this
    /// projector's [`plan`](Self::plan) for `hidden`'s shape); returns the
    /// output, which stays in the plan. Without `embeds`, or once the plan has
    /// seen them, it allocates nothing and copies nothing: a sequence of
    /// kernel launches only.
    pub fn forward_with<'p>(
        &self,
        plan: &'p mut Plan<B::Tensor>,
        hidden: &B::Tensor,
        embeds: Option<&B::Tensor>,
    ) -> Result<&'p B::Tensor> {
        self.forward_planned(plan, hidden, embeds, None)
    }

    /// [`forward_at`](Self::forward_at) into the buffers of `plan` (made for
    /// `positions`' batch and signal-token count); after the first call it
    /// allocates nothing.
    pub fn forward_with_at<'p>(
        &self,
        plan: &'p mut Plan<B::Tensor>,
        hidden: &B::Tensor,
        embeds: Option<&B::Tensor>,
        positions: &SignalPositions,
    ) -> Result<&'p B::Tensor> {
        self.forward_planned(plan, hidden, embeds, Some(positions))
    }

    /// The forward of `plan` from `hidden`: the signal tokens themselves
    /// (`positions` None; summed with `embeds` when given), or whole sequences
    /// with the signal tokens at `positions`, gathered first.
    fn forward_planned<'p>(
        &self,
        plan: &'p mut Plan<B::Tensor>,
        hidden: &B::Tensor,
        embeds: Option<&B::Tensor>,
        positions: Option<&SignalPositions>,
    ) -> Result<&'p B::Tensor> {
        let _range = profile::range("projector.forward");
        if plan.projector != self.id {
            return Err(Error::invalid(
                "forward_with: the plan was made by another projector",
            ));
        }
        let shape = hidden.shape();
        let planned = [plan.batch, plan.n_in, self.config.in_dim];
        let all;
        let gather = match positions {
            None => {
                self.check_input_shape(shape)?;
                if shape != planned {
                    return Err(Error::Shape {
                        key: "hidden".into(),
                        expected: planned.to_vec(),
                        found: shape.to_vec(),
                    });
                }
                match embeds {
                    Some(e) if e.shape() != shape => {
                        return Err(Error::Shape {
                            key: "embeds".into(),
                            expected: shape.to_vec(),
                            found: e.shape().to_vec(),
                        })
                    }
                    Some(_) => {
                        all = SignalPositions::all(plan.batch, plan.n_in)?;
                        Some(&all)
                    }
                    None => None,
                }
            }
            // The gather checks hidden and embeds against the positions.
            Some(p) => {
                if [p.batch(), p.count()] != planned[..2] {
                    return Err(Error::Shape {
                        key: "signal token positions".into(),
                        expected: planned[..2].to_vec(),
                        found: vec![p.batch(), p.count()],
                    });
                }
                Some(p)
            }
        };
        if let Some(positions) = gather {
            let x = match &mut plan.gathered {
                Some(x) => x,
                none => none.insert(self.backend.alloc(&planned)?),
            };
            self.backend
                .gather_signal_tokens(hidden, embeds, positions, x)?;
        }
        let Plan {
            gathered,
            encoder,
            cross_kv,
            decoder,
            q,
            out,
            prefix,
            absorbed,
            ..
        } = plan;
        let x = match (gather, gathered.as_ref()) {
            (Some(_), Some(x)) => x,
            _ => hidden,
        };
        encoder.start();
        decoder.start();
        let absorbed = absorbed.as_deref();
        self.encode(x, encoder, absorbed.unwrap_or(&self.cross_kv), cross_kv)?;
        self.decode(cross_kv, decoder, q, prefix, absorbed.is_some(), out)?;
        Ok(out)
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
        self.forward_at(hidden, embeds, &positions)
    }

    /// [`Projector::forward_from_llm`] with the signal tokens' positions already
    /// found (e.g. once on the host, reused for several forwards).
    ///
    /// ```
    /// use output_projector::config::{Modality, ProjectorConfig, Variant};
    /// use output_projector::cpu::Cpu;
    /// use output_projector::ops::Backend;
    /// use output_projector::projector::Projector;
    /// use output_projector::signal::SignalPositions;
    /// use output_projector::tensor::HostTensor;
    /// use output_projector::weights::ProjectorWeights;
    ///
    /// # fn main() -> output_projector::Result<()> {
    /// let mut config = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    /// config.in_dim = 16;
    /// let projector = Projector::new(Cpu::open()?, &ProjectorWeights::random(config, None, 2)?)?;
    /// let be = projector.backend();
    ///
    /// // Two answers of 7 tokens; [IMG0]..[IMG3] are ids 900..=903 here, at
    /// // other places in each.
    /// let img = [900, 901, 902, 903];
    /// let tokens: Vec<i64> = [vec![5, 900, 901, 902, 903, 6, 2], vec![7, 8, 9, 900, 901, 902, 903]]
    ///     .concat();
    /// let positions = SignalPositions::find(&tokens, 2, 7, &img)?;
    ///
    /// // The LLM's last hidden states at every token, [2, 7, in_dim].
    /// let states: Vec<f32> = (0..2 * 7 * 16).map(|i| (i % 13) as f32 / 13.0).collect();
    /// let hidden = be.upload(&HostTensor::from_f32(vec![2, 7, 16], states)?)?;
    /// let conditioning = be.download(&projector.forward_at(&hidden, None, &positions)?)?;
    /// assert_eq!(conditioning.shape(), &[2, 77, 768]); // Stable Diffusion's
    ///
    /// // The same positions in a plan's buffers: nothing allocated per forward.
    /// let mut plan = projector.plan(positions.batch(), positions.count())?;
    /// let again = projector.forward_with_at(&mut plan, &hidden, None, &positions)?;
    /// assert_eq!(be.download(again)?.to_f64_vec(), conditioning.to_f64_vec());
    /// # Ok(())
    /// # }
    /// ```
    pub fn forward_at(
        &self,
        hidden: &B::Tensor,
        embeds: Option<&B::Tensor>,
        positions: &SignalPositions,
    ) -> Result<B::Tensor> {
        // Said in terms of the ids: plan's own check would speak of a
        // `hidden` of n_in tokens, which whole sequences are not.
        if let Some(want) = self.config.n_in.filter(|&n| n != positions.count()) {
            return Err(Error::invalid(format!(
                "this projector takes {want} signal tokens per sequence; {} signal ids given",
                positions.count()
            )));
        }
        let mut plan = self.plan(positions.batch(), positions.count())?;
        self.forward_with_at(&mut plan, hidden, embeds, positions)?;
        Ok(plan.into_output())
    }

    /// `memory = Encoder(fc(x))`, projected at once to every decoder layer's
    /// keys and values: `kv = cross(memory)` (the stacked K/V projections,
    /// or the absorbed ones). The stream starts as fc(x); every sub-block
    /// leaves its output in `f`, which the next norm adds to the stream.
    fn encode(
        &self,
        x: &B::Tensor,
        e: &mut Work<B::Tensor>,
        cross: &Linear<B::Tensor>,
        kv: &mut B::Tensor,
    ) -> Result<()> {
        let c = &self.config;
        let be = &self.backend;
        let spec = AttentionSpec::new(c.heads, c.head_dim());
        let input = profile::range("input");
        self.input.apply(be, x, Activation::None, &mut e.s[0])?;
        drop(input);
        for (l, layer) in self.encoder.iter().enumerate() {
            let _layer = profile::range_with(|| format!("encoder.layer{l}"));
            let of = if l > 0 {
                NormOf::Pending
            } else {
                NormOf::Stream
            };
            let norm1 = NextNorm::new(of, &layer.norm1, c.eps);
            e.norm_linear(be, &norm1, &layer.qkv, Activation::None, Dest::Qkv)?;
            let norm2 = NextNorm::new(NormOf::Pending, &layer.norm2, c.eps);
            e.attend(be, &layer.attn_out, &spec, Some(&norm2))?;
            e.norm_linear(be, &norm2, &layer.linear1, Activation::Relu, Dest::Ffn)?;
            let next = self
                .encoder
                .get(l + 1)
                .map_or(&self.encoder_norm, |n| &n.norm1);
            let next = NextNorm::new(NormOf::Pending, next, c.eps);
            e.ffn_out(be, &layer.linear2, Some(&next))?;
        }
        let _kv = profile::range("decoder.cross_kv");
        let norm = NextNorm::new(NormOf::Pending, &self.encoder_norm, c.eps);
        e.norm_linear(be, &norm, cross, Activation::None, Dest::Other(kv))
    }

    /// `out = output(Decoder(queries, memory))` from the memory's keys and
    /// values `kv` (absorbed ones where `absorbed`), the first layer resumed
    /// from `prefix`.
    fn decode(
        &self,
        kv: &B::Tensor,
        t: &mut Work<B::Tensor>,
        q: &mut B::Tensor,
        prefix: &DecoderPrefix<B::Tensor>,
        absorbed: bool,
        out: &mut B::Tensor,
    ) -> Result<()> {
        let c = &self.config;
        let be = &self.backend;
        let d = c.d_model;
        let spec = AttentionSpec::new(c.heads, c.head_dim());
        let none = Activation::None;
        if prefix.batch != kv.shape()[0] {
            return Err(Error::invalid("decoder prefix of another batch size"));
        }
        // Where `kv` holds the absorbed keys and values, their layout.
        let absorbed = absorbed
            .then(|| AbsorbedCross::new(c.decoder_layers, c.heads, d))
            .transpose()?;
        for (l, layer) in self.decoder.iter().enumerate() {
            let _layer = profile::range_with(|| format!("decoder.layer{l}"));
            let (k, v) = (Cols::new(kv, 2 * d * l), Cols::new(kv, 2 * d * l + d));
            let cross = |q| AttentionInput {
                q: Cols::new(q, 0),
                k,
                v,
                spec: &spec,
                mask: None,
            };
            // The first layer's stream is the prefix's.
            let of = if l == 0 {
                NormOf::PendingOn(&prefix.stream)
            } else {
                NormOf::Pending
            };
            let norm3 = NextNorm::new(of, &layer.norm3, c.eps);
            if let Some(shape) = &absorbed {
                let attn = shape.input(kv, l, &layer.cross_out.bias, spec.scale());
                let on = if l == 0 {
                    Some(&prefix.stream)
                } else {
                    let norm1 = NextNorm::new(NormOf::Pending, &layer.norm1, c.eps);
                    t.norm_linear(be, &norm1, &layer.self_qkv, none, Dest::Qkv)?;
                    t.attend(be, &layer.self_out, &spec, None)?;
                    None
                };
                t.attend_absorbed(be, on, &layer.norm2, attn, &layer.norm3, c.eps)?;
            } else if l == 0 {
                t.attend_to(be, cross(&prefix.cross_q), &layer.cross_out, Some(&norm3))?;
            } else {
                let norm1 = NextNorm::new(NormOf::Pending, &layer.norm1, c.eps);
                t.norm_linear(be, &norm1, &layer.self_qkv, none, Dest::Qkv)?;
                let norm2 = NextNorm::new(NormOf::Pending, &layer.norm2, c.eps);
                t.attend(be, &layer.self_out, &spec, Some(&norm2))?;
                t.norm_linear(be, &norm2, &layer.cross_q, none, Dest::Other(q))?;
                t.attend_to(be, cross(q), &layer.cross_out, Some(&norm3))?;
            }
            t.norm_linear(be, &norm3, &layer.linear1, Activation::Relu, Dest::Ffn)?;
            let next = self
                .decoder
                .get(l + 1)
                .map_or(&self.decoder_norm, |n| &n.norm1);
            let next = NextNorm::new(NormOf::Pending, next, c.eps);
            t.ffn_out(be, &layer.linear2, Some(&next))?;
        }
        let _output = profile::range("output");
        let norm = NextNorm::new(NormOf::Pending, &self.decoder_norm, c.eps);
        t.norm_linear(be, &norm, &self.output, none, Dest::Other(out))
    }
}

impl<T> Linear<T> {
    /// `out = attention(..) · wᵀ + b`, `a` the attention's scratch.
    fn apply_attended<B: Backend<Tensor = T>>(
        &self,
        be: &B,
        attn: AttentionInput<'_, T, B::Mask>,
        a: &mut T,
        out: &mut T,
    ) -> Result<()> {
        let (w, b) = (&self.weight, Some(&self.bias));
        be.attention_linear(attn, a, w, b, Activation::None, out)
    }

    /// [`Linear::apply_attended`]; or, where `attention_only`, the
    /// attention into `a` alone, for the caller to apply this linear to.
    fn apply_attended_or<B: Backend<Tensor = T>>(
        &self,
        be: &B,
        attn: AttentionInput<'_, T, B::Mask>,
        attention_only: bool,
        a: &mut T,
        out: &mut T,
    ) -> Result<()> {
        if !attention_only {
            return self.apply_attended(be, attn, a, out);
        }
        let AttentionInput {
            q,
            k,
            v,
            spec,
            mask,
        } = attn;
        be.attention(q, k, v, spec, mask, a)
    }

    fn apply<B: Backend<Tensor = T>>(
        &self,
        be: &B,
        x: &T,
        act: Activation,
        out: &mut T,
    ) -> Result<()> {
        be.linear(x, &self.weight, Some(&self.bias), act, None, out)
    }

    /// `out = act(self(norm))`, `sum_out` receiving the norm's `x +
    /// residual`; `h` is the norm's scratch ([`Backend::layer_norm_linear`]).
    fn apply_normed<B: Backend<Tensor = T>>(
        &self,
        be: &B,
        norm: NormInput<'_, T>,
        sum_out: Option<&mut T>,
        h: &mut T,
        act: Activation,
        out: &mut T,
    ) -> Result<()> {
        let (w, b) = (&self.weight, Some(&self.bias));
        be.layer_norm_linear(norm, sum_out, h, w, b, act, out)
    }
}

impl<T> Norm<T> {
    /// This norm of `x + residual` (or `x`).
    fn of<'a>(&'a self, x: &'a T, residual: Option<&'a T>, eps: f64) -> NormInput<'a, T> {
        NormInput {
            x,
            residual,
            weight: &self.weight,
            bias: &self.bias,
            eps,
        }
    }
}

/// What a stack's norm reads besides its weights ([`NextNorm`]).
enum NormOf<'a, T> {
    /// The stream alone: no sub-block output is pending.
    Stream,
    /// The last sub-block's output added to the stream, which the sum
    /// replaces.
    Pending,
    /// The last sub-block's output added to another stream (the decoder
    /// prefix's); the sum becomes this stack's stream.
    PendingOn(&'a T),
}

/// The LayerNorm between a sub-block and the linear after it. It runs in
/// whichever of the two the backend folds it into: the sub-block's last
/// linear ([`Backend::linear_layer_norm`], where the backend says it folds
/// there) or the linear after it ([`Work::norm_linear`]).
struct NextNorm<'a, T> {
    of: NormOf<'a, T>,
    norm: &'a Norm<T>,
    eps: f64,
}

impl<'a, T> NextNorm<'a, T> {
    fn new(of: NormOf<'a, T>, norm: &'a Norm<T>, eps: f64) -> Self {
        NextNorm { of, norm, eps }
    }
}

/// Where [`Work::norm_linear`] writes: one of the stack's buffers, or another.
enum Dest<'a, T> {
    Qkv,
    Ffn,
    Other(&'a mut T),
}

/// Which of a stack's buffers a sub-block's last linear reads.
#[derive(Clone, Copy)]
enum SubBlockIn {
    Attention,
    Ffn,
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
    /// The last sub-block's output is already added to the stream and
    /// normalised into `h` (its norm folded into its last linear).
    normed: bool,
    /// `s` is swapped from its order at allocation.
    flipped: bool,
}

impl<T: Shaped> Work<T> {
    /// The shapes of `s[0]`, `s[1]`, `f`, `h`, `qkv`, `a` and `ffn`.
    fn shapes([batch, tokens]: [usize; 2], d: usize, ffn: usize) -> [[usize; 3]; 7] {
        let rows = |cols| [batch, tokens, cols];
        let wide = d.saturating_mul(3);
        [
            rows(d),
            rows(d),
            rows(d),
            rows(d),
            rows(wide),
            rows(d),
            rows(ffn),
        ]
    }

    fn new<B: Backend<Tensor = T>>(be: &B, rows: [usize; 2], d: usize, ffn: usize) -> Result<Self> {
        let [s0, s1, f, h, qkv, a, ffn] = Self::shapes(rows, d, ffn);
        Ok(Work {
            s: [be.alloc(&s0)?, be.alloc(&s1)?],
            f: be.alloc(&f)?,
            h: be.alloc(&h)?,
            qkv: be.alloc(&qkv)?,
            a: be.alloc(&a)?,
            ffn: be.alloc(&ffn)?,
            normed: false,
            flipped: false,
        })
    }

    /// Ready for a forward: no norm pending (one that failed part way may
    /// have left one) and the stream in `s`'s first buffer, so that every
    /// forward on a plan uses each buffer alike (a backend may cache what it
    /// binds per buffer).
    fn start(&mut self) {
        self.normed = false;
        if std::mem::take(&mut self.flipped) {
            self.s.swap(0, 1);
        }
    }

    /// The pending sum becomes the stream: `s[1]` is current now.
    fn flip(&mut self) {
        self.s.swap(0, 1);
        self.flipped = !self.flipped;
    }

    /// `dest = act(lin(next's norm))`, the norm's input sum becoming the
    /// stream where `f` was pending; `h` is the norm's scratch. Where the
    /// sub-block before ran the norm, only the linear is left.
    fn norm_linear<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        next: &NextNorm<'_, T>,
        lin: &Linear<T>,
        act: Activation,
        dest: Dest<'_, T>,
    ) -> Result<()> {
        let Work {
            s, f, h, qkv, ffn, ..
        } = self;
        let out = match dest {
            Dest::Qkv => qkv,
            Dest::Ffn => ffn,
            Dest::Other(t) => t,
        };
        if std::mem::take(&mut self.normed) {
            return lin.apply(be, h, act, out);
        }
        let (norm, eps) = (next.norm, next.eps);
        let [cur, sum] = s;
        let (input, sum_out) = match next.of {
            NormOf::Stream => (norm.of(cur, None, eps), None),
            NormOf::Pending => (norm.of(f, Some(cur), eps), Some(sum)),
            NormOf::PendingOn(stream) => (norm.of(f, Some(stream), eps), Some(sum)),
        };
        let pending = sum_out.is_some();
        lin.apply_normed(be, input, sum_out, h, act, out)?;
        if pending {
            self.flip();
        }
        Ok(())
    }

    /// Whether the backend folds `next`'s norm into `lin` reading `x`.
    fn folds<B: Backend<Tensor = T>>(
        be: &B,
        x: &T,
        lin: &Linear<T>,
        next: &NextNorm<'_, T>,
    ) -> bool {
        let (shape, w) = (x.shape(), lin.weight.shape());
        let pending = !matches!(next.of, NormOf::Stream);
        match (shape.split_last(), w) {
            (Some((&k, rows)), &[n, _]) if pending => {
                be.linear_layer_norm_folds(rows.iter().product(), n, k)
            }
            _ => false,
        }
    }

    /// A sub-block's last linear `lin` of `input` with `next`'s norm folded
    /// into it ([`Backend::linear_layer_norm`]): the new stream and `h`
    /// written, no output left pending. Only where [`Work::folds`] says so,
    /// which also rules out a norm of the stream alone.
    fn fold_norm<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        input: SubBlockIn,
        lin: &Linear<T>,
        next: &NextNorm<'_, T>,
    ) -> Result<()> {
        let Work {
            s, f, h, a, ffn, ..
        } = self;
        let x = match input {
            SubBlockIn::Attention => &*a,
            SubBlockIn::Ffn => &*ffn,
        };
        let [cur, sum] = s;
        let residual = match next.of {
            NormOf::Stream => None,
            NormOf::Pending => Some(&*cur),
            NormOf::PendingOn(stream) => Some(stream),
        };
        let norm = NormAfter {
            residual,
            weight: &next.norm.weight,
            bias: &next.norm.bias,
            eps: next.eps,
        };
        let (w, b) = (&lin.weight, Some(&lin.bias));
        be.linear_layer_norm(x, w, b, Activation::None, f, norm, Some(sum), h)?;
        self.flip();
        self.normed = true;
        Ok(())
    }

    /// `f = out(attention(attn))`, or with `next`'s norm folded into `out`
    /// ([`Work::fold_norm`]).
    fn attend_to<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        attn: AttentionInput<'_, T, B::Mask>,
        out: &Linear<T>,
        next: Option<&NextNorm<'_, T>>,
    ) -> Result<()> {
        let fold = next.filter(|n| Self::folds(be, &self.a, out, n));
        out.apply_attended_or(be, attn, fold.is_some(), &mut self.a, &mut self.f)?;
        match fold {
            Some(n) => self.fold_norm(be, SubBlockIn::Attention, out, n),
            None => Ok(()),
        }
    }

    /// `f = out_proj(attention(qkv))`, Q, K and V read in place; `next` as
    /// in [`Work::attend_to`].
    fn attend<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        out: &Linear<T>,
        spec: &AttentionSpec,
        next: Option<&NextNorm<'_, T>>,
    ) -> Result<()> {
        let d = spec.heads * spec.head_dim;
        let qkv = &self.qkv;
        let attn = AttentionInput {
            q: Cols::new(qkv, 0),
            k: Cols::new(qkv, d),
            v: Cols::new(qkv, 2 * d),
            spec,
            mask: None,
        };
        let fold = next.filter(|n| Self::folds(be, &self.a, out, n));
        out.apply_attended_or(be, attn, fold.is_some(), &mut self.a, &mut self.f)?;
        match fold {
            Some(n) => self.fold_norm(be, SubBlockIn::Attention, out, n),
            None => Ok(()),
        }
    }

    /// The cross-attention absorbed ([`Backend::attention_absorbed`]): of
    /// `f` pending on the stream, or of stream `on` alone, normalised by
    /// `norm`; the sum plus the attention becomes the stream, normalised by
    /// `after` into `h`. Nothing is left pending.
    #[allow(clippy::too_many_arguments)]
    fn attend_absorbed<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        on: Option<&T>,
        norm: &Norm<T>,
        attn: AbsorbedAttentionInput<'_, T>,
        after: &Norm<T>,
        eps: f64,
    ) -> Result<()> {
        let Work { s, f, h, .. } = self;
        let [cur, sum] = s;
        let input = match on {
            Some(stream) => norm.of(stream, None, eps),
            None => norm.of(f, Some(cur), eps),
        };
        let after = NormAfter {
            residual: None,
            weight: &after.weight,
            bias: &after.bias,
            eps,
        };
        be.attention_absorbed(input, attn, after, sum, h)?;
        self.flip();
        self.normed = true;
        Ok(())
    }

    /// `f = linear2(ffn)`, the feed-forward's second half; `next` as in
    /// [`Work::attend_to`].
    fn ffn_out<B: Backend<Tensor = T>>(
        &mut self,
        be: &B,
        l2: &Linear<T>,
        next: Option<&NextNorm<'_, T>>,
    ) -> Result<()> {
        match next.filter(|n| Self::folds(be, &self.ffn, l2, n)) {
            Some(n) => self.fold_norm(be, SubBlockIn::Ffn, l2, n),
            None => l2.apply(be, &self.ffn, Activation::None, &mut self.f),
        }
    }
}

/// One attention block's projections on the host, in f64: weight and bias of
/// its query, key and value projections (`[d, d]` and `[d]`), and its output
/// projection's weight.
struct AttentionWeights<'a> {
    q: (&'a [f64], &'a [f64]),
    k: (&'a [f64], &'a [f64]),
    v: (&'a [f64], &'a [f64]),
    out: &'a [f64],
}

/// The layout of the absorbed cross-attention's stacked weight (see the
/// module's notes): per decoder layer a block of rows, `heads` blocks of `d`
/// key rows (`W_qᵉᵀ W_kᵉ`), `heads` blocks of `d` value rows (`W_oᵉ W_vᵉ`)
/// and `heads` key-bias rows (`b_qᵉᵀ W_kᵉ`), padded to a multiple of 8 rows
/// so that every block of the GEMM's output starts 16-byte aligned.
#[derive(Clone, Copy, Debug)]
struct AbsorbedCross {
    layers: usize,
    heads: usize,
    d: usize,
    /// Rows per layer.
    width: usize,
}

/// Columns of the memory's projection where the decoder's cross-attention is
/// absorbed: every layer's keys, values and key bias (see [`AbsorbedCross`]).
pub(crate) fn absorbed_cross_width(c: &ProjectorConfig) -> Result<usize> {
    let a = AbsorbedCross::new(c.decoder_layers, c.heads, c.d_model)?;
    Ok(a.layers * a.width)
}

impl AbsorbedCross {
    fn new(layers: usize, heads: usize, d: usize) -> Result<Self> {
        let overflow = || Error::Overflow("absorbed cross-attention weights".into());
        let width = heads
            .checked_mul(2 * d)
            .and_then(|w| w.checked_add(heads.next_multiple_of(8)))
            .ok_or_else(overflow)?;
        layers
            .checked_mul(width)
            .and_then(|r| r.checked_mul(d))
            .ok_or_else(overflow)?;
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(Error::invalid(format!(
                "absorbed cross-attention: width {d} is not a multiple of {heads} heads"
            )));
        }
        Ok(AbsorbedCross {
            layers,
            heads,
            d,
            width,
        })
    }

    /// What layer `l`'s attention reads of the GEMM's output `kv`.
    fn input<'a, T>(
        &self,
        kv: &'a T,
        l: usize,
        out_bias: &'a T,
        scale: f64,
    ) -> AbsorbedAttentionInput<'a, T> {
        let (base, hd) = (l * self.width, self.heads * self.d);
        AbsorbedAttentionInput {
            keys: Cols::new(kv, base),
            values: Cols::new(kv, base + hd),
            key_bias: Cols::new(kv, base + 2 * hd),
            out_bias,
            heads: self.heads,
            scale,
        }
    }

    /// The stacked weight `[layers x width, d]`, in `dtype`, and bias (f64)
    /// of `layers`' projections, each head of each layer a job for `pool`
    /// (rayon's global pool where `None`). Each job sums its rows in f64 and
    /// rounds them to `dtype` once, into pages it touches first.
    fn weights(
        &self,
        layers: &[AttentionWeights<'_>],
        dtype: DType,
        pool: Option<&rayon::ThreadPool>,
    ) -> Result<(HostTensor, HostTensor)> {
        match dtype {
            DType::F64 => self.weights_in::<f64>(layers, pool),
            DType::F32 => self.weights_in::<f32>(layers, pool),
            DType::F16 => self.weights_in::<half::f16>(layers, pool),
            DType::BF16 => self.weights_in::<half::bf16>(layers, pool),
        }
    }

    fn weights_in<T: Element>(
        &self,
        layers: &[AttentionWeights<'_>],
        pool: Option<&rayon::ThreadPool>,
    ) -> Result<(HostTensor, HostTensor)> {
        if layers.len() != self.layers {
            return Err(Error::invalid(format!(
                "absorbed cross-attention: {} layers given, {} expected",
                layers.len(),
                self.layers
            )));
        }
        let (d, heads, width) = (self.d, self.heads, self.width);
        let rows = self.layers * width;
        // Zeroed pages from the allocator, not a serial fill: the padding
        // rows stay zero, and each job faults in its own rows.
        let mut w = try_zeroed::<T>(rows * d, "absorbed cross-attention weight")?;
        let mut b = try_filled(rows, 0.0f64, "absorbed cross-attention bias")?;
        let mut jobs = Vec::with_capacity(self.layers * heads);
        let blocks = w.chunks_mut(width * d).zip(b.chunks_mut(width));
        for (layer_index, (layer, (w, b))) in layers.iter().zip(blocks).enumerate() {
            let (keys, rest) = w.split_at_mut(heads * d * d);
            let (values, key_bias) = rest.split_at_mut(heads * d * d);
            let value_bias = &mut b[heads * d..2 * heads * d];
            let rows = keys
                .chunks_mut(d * d)
                .zip(values.chunks_mut(d * d))
                .zip(value_bias.chunks_mut(d).zip(key_bias.chunks_mut(d)));
            for (head, ((keys, values), (value_bias, key_bias))) in rows.enumerate() {
                jobs.push(HeadRows {
                    layer,
                    layer_index,
                    head,
                    keys,
                    values,
                    value_bias,
                    key_bias,
                });
            }
        }
        let run = || {
            jobs.into_par_iter()
                .try_for_each_init(Vec::new, |sums, rows| self.absorb(rows, sums))
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match pool {
            Some(pool) => pool.install(run),
            None => run(),
        }))
        .map_err(|_| Error::invalid("absorbing the cross-attention: a thread panicked"))??;
        Ok((
            HostTensor::new(vec![rows, d], T::into_data(w))?,
            HostTensor::from_f64(vec![rows], b)?,
        ))
    }

    /// One head's rows from its layer's projections, summed in `sums` and
    /// rounded into `rows`. The key projection's bias gives every key of a
    /// head the same share of its score, `(W_qᵉ h + b_qᵉ) · b_kᵉ`, which the
    /// softmax cancels: the key and key-bias rows have no bias. The value
    /// projection's bias comes out of the softmax whole (the probabilities
    /// sum to 1), through the value rows' bias.
    fn absorb<T: Element>(&self, rows: HeadRows<'_, T>, sums: &mut Vec<f64>) -> Result<()> {
        let (d, hd, e) = (self.d, self.d / self.heads, rows.head);
        let a = rows.layer;
        let ((wq, bq), (wk, _), (wv, bv), wo) = (a.q, a.k, a.v, a.out);
        let head = e * hd * d..(e + 1) * hd * d;
        let (k, v) = (&wk[head.clone()], &wv[head.clone()]);
        let layer_index = rows.layer_index;
        if sums.len() != d * d {
            *sums = try_filled(d * d, 0.0f64, "absorbed cross-attention")?;
        }
        // `out` summed from `coef` and `src` (see `combine`), then rounded.
        let mut sum_into = |coef: &[f64], src: &[f64], out: &mut [T], part: &str| {
            let sums = &mut sums[..out.len()];
            sums.fill(0.0);
            combine(hd, coef, src, sums);
            round_into(sums, out).map_err(|(i, x)| {
                let what = format!(
                    "absorbed cross-attention weight, layer {layer_index} head {e}'s {part}"
                );
                overflows(&what, x, i, T::DTYPE)
            })
        };
        let mut coef = try_filled(d * hd, 0.0f64, "absorbed cross-attention")?;
        // Key row i: Σ_t W_q[e·hd + t, i] · W_k[e·hd + t, :].
        for (t, q) in wq[head].chunks_exact(d).enumerate() {
            for (c, &q) in coef.chunks_exact_mut(hd).zip(q) {
                c[t] = q;
            }
        }
        sum_into(&coef, k, rows.keys, "key rows")?;
        // Value row i: Σ_t W_o[i, e·hd + t] · W_v[e·hd + t, :].
        for (i, c) in coef.chunks_exact_mut(hd).enumerate() {
            c.copy_from_slice(&wo[i * d + e * hd..i * d + (e + 1) * hd]);
        }
        sum_into(&coef, v, rows.values, "value rows")?;
        for (b, c) in rows.value_bias.iter_mut().zip(coef.chunks_exact(hd)) {
            for (c, bv) in c.iter().zip(&bv[e * hd..(e + 1) * hd]) {
                *b += c * bv;
            }
        }
        // Key-bias row: Σ_t b_q[e·hd + t] · W_k[e·hd + t, :].
        sum_into(&bq[e * hd..(e + 1) * hd], k, rows.key_bias, "key-bias row")
    }
}

/// `out = src` rounded to `T`, or the flat index and value of the first
/// finite element that overflows it.
fn round_into<T: Element>(src: &[f64], out: &mut [T]) -> std::result::Result<(), (usize, f64)> {
    for (i, (o, &x)) in out.iter_mut().zip(src).enumerate() {
        *o = T::from_f64(x);
        if x.is_finite() && !o.to_f64().is_finite() {
            return Err((i, x));
        }
    }
    Ok(())
}

/// What one head of one layer writes of [`AbsorbedCross`]'s weight and bias.
struct HeadRows<'a, T> {
    layer: &'a AttentionWeights<'a>,
    layer_index: usize,
    head: usize,
    /// Its `d` key rows, `d` value rows (each `d` long) and their share of
    /// the bias (the key rows have none), and its key-bias row.
    keys: &'a mut [T],
    values: &'a mut [T],
    value_bias: &'a mut [f64],
    key_bias: &'a mut [T],
}

/// `out[i] += Σ_t coef[i][t] · src[t]` for `terms` rows `src[t]` and the
/// rows `out[i]` of the same length, `coef` holding `terms` coefficients per
/// row of `out`. Each element's products are added in order of `t`, so the
/// result is the plain loop's to the bit; the columns go in blocks whose
/// slice of `src` stays in L1 while every row of `out` takes it (a loop over
/// `t` outside would sweep all of `out` once per term).
fn combine(terms: usize, coef: &[f64], src: &[f64], out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is there.
        return unsafe { combine_avx2(terms, coef, src, out) };
    }
    combine_rows(terms, coef, src, out)
}

/// [`combine`] 4 f64 wide (SSE2's 2), unfused: the same bits. A named
/// function, not `simd_run!`: its closure stayed out of line, compiled for
/// SSE2 (objdump: no ymm register in it), where `combine_rows`, marked
/// `#[inline(always)]`, is inlined here.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn combine_avx2(terms: usize, coef: &[f64], src: &[f64], out: &mut [f64]) {
    combine_rows(terms, coef, src, out)
}

/// [`combine`], for the instruction set of its caller.
#[inline(always)]
fn combine_rows(terms: usize, coef: &[f64], src: &[f64], out: &mut [f64]) {
    const BLOCK: usize = 16;
    let len = src.len() / terms.max(1);
    if len == 0 {
        return;
    }
    // The block's columns of `src`, packed: rows a page apart would all fall
    // in the same few sets of the L1.
    let mut panel = vec![[0.0f64; BLOCK]; terms];
    let body = len - len % BLOCK;
    for j in (0..body).step_by(BLOCK) {
        for (p, s) in panel.iter_mut().zip(src.chunks_exact(len)) {
            p.copy_from_slice(&s[j..j + BLOCK]);
        }
        // Rows two at a time: each load of the panel feeds both, and their
        // eight chains of additions keep the adders busy.
        let (pairs, rest) = coef.split_at(coef.len() / (2 * terms) * 2 * terms);
        let (out_pairs, out_rest) = out.split_at_mut(pairs.len() / terms * len);
        block_sums::<2, BLOCK>(pairs, &panel, len, j, out_pairs);
        block_sums::<1, BLOCK>(rest, &panel, len, j, out_rest);
    }
    for (c, row) in coef.chunks_exact(terms).zip(out.chunks_exact_mut(len)) {
        for (j, o) in row.iter_mut().enumerate().skip(body) {
            *o += c
                .iter()
                .zip(src.chunks_exact(len))
                .fold(0.0, |acc, (&c, s)| acc + c * s[j]);
        }
    }
}

/// [`combine_rows`]'s sums of the columns `j..j + BLOCK` for `R` rows of
/// `out` at a time (`out` a whole number of groups of `R` rows), each a
/// dependent chain over the terms held in registers.
#[inline(always)]
fn block_sums<const R: usize, const BLOCK: usize>(
    coef: &[f64],
    panel: &[[f64; BLOCK]],
    len: usize,
    j: usize,
    out: &mut [f64],
) {
    let terms = panel.len();
    for (c, rows) in coef
        .chunks_exact(R * terms)
        .zip(out.chunks_exact_mut(R * len))
    {
        let mut acc = [[0.0f64; BLOCK]; R];
        for (t, p) in panel.iter().enumerate() {
            for (r, acc) in acc.iter_mut().enumerate() {
                let c = c[r * terms + t];
                for (a, s) in acc.iter_mut().zip(p) {
                    *a += c * s;
                }
            }
        }
        for (row, acc) in rows.chunks_exact_mut(len).zip(acc) {
            for (o, a) in row[j..j + BLOCK].iter_mut().zip(acc) {
                *o += a;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{RefTensor, Reference};
    use crate::rng::Rng;

    /// The blocked sum of rows against the plain loop it replaces (one
    /// scaled row added at a time), to the bit: lengths below, at and past
    /// a block, one term and many.
    #[test]
    fn combine_is_the_plain_loop() {
        let mut rng = Rng::new(5);
        for (rows, terms, len) in [(3, 1, 5), (4, 7, 16), (5, 12, 37), (2, 3, 64)] {
            let coef = rng.normal_vec(rows * terms);
            let src = rng.normal_vec(terms * len);
            let mut want = vec![0.0f64; rows * len];
            for (c, row) in coef.chunks_exact(terms).zip(want.chunks_exact_mut(len)) {
                for (&c, s) in c.iter().zip(src.chunks_exact(len)) {
                    for (o, s) in row.iter_mut().zip(s) {
                        *o += c * s;
                    }
                }
            }
            let mut got = vec![0.0f64; rows * len];
            combine(terms, &coef, &src, &mut got);
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{rows} x {terms} x {len}");
        }
    }

    /// A layer's projections (weights and biases of q, k, v, out) in f64.
    fn on_host(w: &[HostTensor], b: &[HostTensor]) -> [Vec<f64>; 7] {
        [&w[0], &b[0], &w[1], &b[1], &w[2], &b[2], &w[3]].map(|t| t.to_f64_vec())
    }

    fn borrowed(p: &[Vec<f64>; 7]) -> AttentionWeights<'_> {
        AttentionWeights {
            q: (&p[0], &p[1]),
            k: (&p[2], &p[3]),
            v: (&p[4], &p[5]),
            out: &p[6],
        }
    }

    /// The stacked weight made in f32, f16 or bf16 is the f64 one rounded
    /// by `to_storage`, to the bit; its bias is the f64 one. A product past
    /// f16's range is an error naming where, not an infinite weight.
    #[test]
    fn absorbed_weights_round_once_to_the_backends_type() -> Result<()> {
        let (heads, d, layers) = (3, 12, 2);
        let mut rng = Rng::new(8);
        let mut own = Vec::new();
        for _ in 0..layers {
            let mut t = |shape: &[usize]| -> Result<HostTensor> {
                let n = checked_numel(shape, "test")?;
                HostTensor::from_f64(shape.to_vec(), rng.normal_vec(n))
            };
            let w = [t(&[d, d])?, t(&[d, d])?, t(&[d, d])?, t(&[d, d])?];
            let b = [t(&[d])?, t(&[d])?, t(&[d])?, t(&[d])?];
            own.push(on_host(&w, &b));
        }
        let host: Vec<_> = own.iter().map(borrowed).collect();
        let shape = AbsorbedCross::new(layers, heads, d)?;
        let (w64, b64) = shape.weights(&host, DType::F64, None)?;
        assert!(w64.to_f64_vec().iter().any(|&x| x != 0.0));
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (w, b) = shape.weights(&host, dtype, None)?;
            assert_eq!(w, w64.to_storage(dtype, "test")?, "{dtype}");
            assert_eq!(b, b64, "{dtype}");
        }
        // The second layer's third head's query weights made huge: its key
        // rows overflow f16 (and only f16).
        let mut big = own.clone();
        for q in &mut big[1][0][2 * d * d / heads..] {
            *q *= 1e4;
        }
        let host: Vec<_> = big.iter().map(borrowed).collect();
        assert!(shape.weights(&host, DType::F32, None).is_ok());
        let e = shape
            .weights(&host, DType::F16, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("absorbed cross-attention weight, layer 1 head 2's key rows: ")
                && e.ends_with("overflows f16 storage"),
            "{e}"
        );
        Ok(())
    }

    /// The absorbed cross-attention (its weights, their layout in the GEMM's
    /// output, and the op) against the literal one, both on the f64
    /// reference: two layers, so the second layer's blocks are found at
    /// their offsets, and 3 heads, so the key bias rows are padded.
    #[test]
    fn absorbed_cross_attention_is_the_literal_one() -> Result<()> {
        let (batch, lq, lk, heads, d, layers) = (2, 5, 3, 3, 36, 2);
        let mut rng = Rng::new(3);
        let mut t = |shape: &[usize]| -> Result<HostTensor> {
            let n = checked_numel(shape, "test")?;
            HostTensor::from_f64(shape.to_vec(), rng.normal_vec(n))
        };
        let be = Reference;
        let up = |h: &HostTensor| be.upload(h);
        let (x, r, m) = (
            t(&[batch, lq, d])?,
            t(&[batch, lq, d])?,
            t(&[batch, lk, d])?,
        );
        let mut literal = Vec::new();
        for _ in 0..layers {
            let w: Vec<HostTensor> = (0..4).map(|_| t(&[d, d])).collect::<Result<_>>()?;
            let b: Vec<HostTensor> = (0..4).map(|_| t(&[d])).collect::<Result<_>>()?;
            let norms: Vec<HostTensor> = (0..4).map(|_| t(&[d])).collect::<Result<_>>()?;
            literal.push((w, b, norms));
        }
        let own: Vec<_> = literal.iter().map(|(w, b, _)| on_host(w, b)).collect();
        let host: Vec<_> = own.iter().map(borrowed).collect();
        let shape = AbsorbedCross::new(layers, heads, d)?;
        let (aw, ab) = shape.weights(&host, DType::F64, None)?;
        let spec = AttentionSpec::new(heads, d / heads);
        let (xt, rt, mt) = (up(&x)?, up(&r)?, up(&m)?);
        let mut kv = be.alloc(&[batch, lk, aw.shape()[0]])?;
        be.linear(
            &mt,
            &up(&aw)?,
            Some(&up(&ab)?),
            Activation::None,
            None,
            &mut kv,
        )?;
        for (l, (w, b, norms)) in literal.iter().enumerate() {
            let [w, b, n] = [w, b, norms].map(|v| v.iter().map(up).collect::<Result<Vec<_>>>());
            let (w, b, n) = (w?, b?, n?);
            let norm = NormInput {
                x: &xt,
                residual: Some(&rt),
                weight: &n[0],
                bias: &n[1],
                eps: 1e-5,
            };
            let after = NormAfter {
                residual: None,
                weight: &n[2],
                bias: &n[3],
                eps: 1e-5,
            };
            // Literal: the norm, the query projection, the keys and values,
            // the attention, the output projection, the residual and norm.
            let alloc = |cols: usize| be.alloc(&[batch, lq, cols]);
            let (mut h, mut s, mut q, mut a, mut o) =
                (alloc(d)?, alloc(d)?, alloc(d)?, alloc(d)?, alloc(d)?);
            be.layer_norm(&xt, Some(&rt), &n[0], &n[1], 1e-5, &mut h, Some(&mut s))?;
            be.linear(&h, &w[0], Some(&b[0]), Activation::None, None, &mut q)?;
            let mut lit_kv = be.alloc(&[batch, lk, 2 * d])?;
            let stack = |a: &RefTensor, b: &RefTensor| -> Result<RefTensor> {
                up(&HostTensor::concat_rows(&[
                    be.download(a)?,
                    be.download(b)?,
                ])?)
            };
            let (k_and_v, kv_bias) = (stack(&w[1], &w[2])?, stack(&b[1], &b[2])?);
            be.linear(
                &mt,
                &k_and_v,
                Some(&kv_bias),
                Activation::None,
                None,
                &mut lit_kv,
            )?;
            let (k, v) = (Cols::new(&lit_kv, 0), Cols::new(&lit_kv, d));
            be.attention(Cols::new(&q, 0), k, v, &spec, None, &mut a)?;
            be.linear(&a, &w[3], Some(&b[3]), Activation::None, None, &mut o)?;
            let (mut want_stream, mut want) = (alloc(d)?, alloc(d)?);
            be.layer_norm(
                &o,
                Some(&s),
                &n[2],
                &n[3],
                1e-5,
                &mut want,
                Some(&mut want_stream),
            )?;
            // Absorbed.
            let attn = shape.input(&kv, l, &b[3], spec.scale());
            let (mut stream, mut out) = (alloc(d)?, alloc(d)?);
            be.attention_absorbed(norm, attn, after, &mut stream, &mut out)?;
            for (got, want) in [(&out, &want), (&stream, &want_stream)] {
                let (rel, _) = crate::tensor::compare(got.data(), want.data());
                assert!(rel < 1e-12, "layer {l}: rel {rel:.3e}");
            }
        }
        Ok(())
    }
}
