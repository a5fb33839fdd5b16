//! The ops at the projector's own shapes, for `outproj bench` and the criterion
//! benches: inputs, the work each op must do, and a timer.

use std::time::{Duration, Instant};

use crate::config::ProjectorConfig;
use crate::error::{Error, Result};
use crate::ops::{
    AbsorbedAttentionInput, Activation, AttentionSpec, Backend, Cols, LossKind, NormAfter,
    NormInput, Shaped,
};
use crate::rng::Rng;
use crate::signal::SignalPositions;
use crate::tensor::{checked_numel, try_filled, HostTensor};

/// One op call at a projector shape.
#[derive(Clone, Debug, PartialEq)]
pub enum OpCase {
    /// `linear` of `[m, k]` to `n` columns, with a bias and `act` fused (no residual).
    Linear {
        /// Rows of the input and output (`batch * tokens`).
        m: usize,
        /// Output columns (rows of the weight `[n, k]`).
        n: usize,
        /// Input columns, the length of each dot product.
        k: usize,
        /// The activation fused into the linear.
        act: Activation,
    },
    /// `layer_norm` of `x + residual`, `[rows, cols]`, writing the sum too.
    LayerNorm {
        /// Rows normalised (`batch * tokens`).
        rows: usize,
        /// Columns per row, the width normalised over.
        cols: usize,
    },
    /// A LayerNorm (with a residual) of `[m, k]` and the linear to `n`
    /// columns that reads it.
    LayerNormLinear {
        /// Rows (`batch * tokens`).
        m: usize,
        /// The linear's output columns.
        n: usize,
        /// Columns normalised, and the linear's input columns.
        k: usize,
    },
    /// A linear of `[m, k]` to `n` columns and the LayerNorm (with a
    /// residual) that reads its output.
    LinearLayerNorm {
        /// Rows (`batch * tokens`).
        m: usize,
        /// The linear's output columns, the width the LayerNorm normalises.
        n: usize,
        /// The linear's input columns.
        k: usize,
    },
    /// `attention` of `lq` queries over `lk` keys per sequence, K and V packed
    /// in one `[batch, lk, 2 * heads * head_dim]` tensor; not causal, no mask,
    /// scale `1 / sqrt(head_dim)`.
    Attention {
        /// Sequences.
        batch: usize,
        /// Queries per sequence.
        lq: usize,
        /// Keys (and values) per sequence.
        lk: usize,
        /// Attention heads.
        heads: usize,
        /// Each head's width: Q, K, V and the output have `heads * head_dim` columns.
        head_dim: usize,
    },
    /// The absorbed cross-attention of `[batch, lq, cols]` rows over `lk`
    /// keys in `heads` heads, with the LayerNorms around it.
    AttentionAbsorbed {
        /// Sequences.
        batch: usize,
        /// Rows attending per sequence.
        lq: usize,
        /// Keys per sequence.
        lk: usize,
        /// Heads absorbed, each a block of `cols` columns in the keys and in the values.
        heads: usize,
        /// The rows' width `C` (`d_model` at the projector's shapes).
        cols: usize,
    },
    /// `alignment_loss` ([`LossKind::TokenL2`]) of `[batch, tokens, dim]`
    /// predictions against targets, with its gradient.
    AlignmentLoss {
        /// Sequences.
        batch: usize,
        /// Tokens per sequence (`n_out` at the projector's shapes).
        tokens: usize,
        /// Each token's width (`out_dim` at the projector's shapes).
        dim: usize,
    },
    /// `gather_signal_tokens`: the last `n` of `seq` positions of `[batch, seq,
    /// channels]` hidden states plus embeddings, into `[batch, n, channels]`.
    Gather {
        /// Sequences.
        batch: usize,
        /// Tokens per sequence `T` (`4 * n` at the projector's shapes).
        seq: usize,
        /// Signal tokens gathered per sequence.
        n: usize,
        /// Each token's width `C` (`in_dim` at the projector's shapes).
        channels: usize,
    },
}

impl OpCase {
    /// The distinct op calls of one projector forward at `batch`, largest first
    /// within each op.
    pub fn projector_ops(c: &ProjectorConfig, batch: usize, n_in: usize) -> Result<Vec<OpCase>> {
        let (d, n) = (c.d_model, c.n_out);
        let rows = |tokens: usize| {
            batch.checked_mul(tokens).ok_or_else(|| {
                crate::error::Error::Overflow(format!("batch {batch} x {tokens} tokens"))
            })
        };
        let (m_in, m) = (rows(n_in)?, rows(n)?);
        Ok(vec![
            OpCase::Linear {
                m: m_in,
                n: d,
                k: c.in_dim,
                act: Activation::None,
            },
            // Every decoder layer's cross-attention keys and values at once,
            // and their absorbed form (where the backend absorbs them).
            OpCase::Linear {
                m: m_in,
                n: 2 * d * c.decoder_layers,
                k: d,
                act: Activation::None,
            },
            OpCase::Linear {
                m: m_in,
                n: crate::projector::absorbed_cross_width(c)?,
                k: d,
                act: Activation::None,
            },
            OpCase::Linear {
                m,
                n: 3 * d,
                k: d,
                act: Activation::None,
            },
            OpCase::Linear {
                m,
                n: c.ffn_dim,
                k: d,
                act: Activation::Relu,
            },
            OpCase::Linear {
                m,
                n: d,
                k: c.ffn_dim,
                act: Activation::None,
            },
            OpCase::Linear {
                m,
                n: c.out_dim,
                k: d,
                act: Activation::None,
            },
            OpCase::LayerNorm {
                rows: batch * n,
                cols: d,
            },
            // An encoder layer's norm1 and QKV (one kernel on CUDA for up to
            // 16 rows), against the LayerNorm and linear rows above.
            OpCase::LayerNormLinear {
                m: m_in,
                n: 3 * d,
                k: d,
            },
            // The decoder's FFN down and the norm after it (one kernel on
            // CUDA where the GEMM takes v5: batch 64, 16-bit), against the
            // linear and LayerNorm rows above.
            OpCase::LinearLayerNorm {
                m,
                n: d,
                k: c.ffn_dim,
            },
            OpCase::Attention {
                batch,
                lq: n,
                lk: n,
                heads: c.heads,
                head_dim: c.head_dim(),
            },
            OpCase::Attention {
                batch,
                lq: n,
                lk: n_in,
                heads: c.heads,
                head_dim: c.head_dim(),
            },
            // A decoder layer's cross-attention absorbed, against its
            // attention row above (and the LayerNorm and linears around it).
            OpCase::AttentionAbsorbed {
                batch,
                lq: n,
                lk: n_in,
                heads: c.heads,
                cols: d,
            },
            OpCase::AlignmentLoss {
                batch,
                tokens: n,
                dim: c.out_dim,
            },
            OpCase::Gather {
                batch,
                seq: 4 * n_in,
                n: n_in,
                channels: c.in_dim,
            },
        ])
    }

    /// Floating-point operations of one whole forward (every GEMM and
    /// attention of the model; the decoder's first self-attention block is
    /// precomputed, see [`crate::projector`]). The model's count: a forward
    /// with its cross-attention absorbed does fewer.
    pub fn forward_flops(c: &ProjectorConfig, batch: usize, n_in: usize) -> f64 {
        let (d, n, heads, hd) = (c.d_model, c.n_out, c.heads, c.head_dim());
        let (m_in, m) = (batch * n_in, batch * n);
        let gemm = |m: usize, n: usize, k: usize| {
            OpCase::Linear {
                m,
                n,
                k,
                act: Activation::None,
            }
            .flops()
        };
        let attention = |lq: usize, lk: usize| {
            OpCase::Attention {
                batch,
                lq,
                lk,
                heads,
                head_dim: hd,
            }
            .flops()
        };
        let ffn = |m: usize| gemm(m, c.ffn_dim, d) + gemm(m, d, c.ffn_dim);
        let self_block = |m: usize, l: usize| gemm(m, 3 * d, d) + attention(l, l) + gemm(m, d, d);
        let encoder = c.encoder_layers as f64 * (self_block(m_in, n_in) + ffn(m_in));
        let cross = attention(n, n_in) + gemm(m, d, d) + ffn(m);
        let later =
            c.decoder_layers.saturating_sub(1) as f64 * (self_block(m, n) + gemm(m, d, d) + cross);
        gemm(m_in, d, c.in_dim)
            + encoder
            + gemm(m_in, 2 * d * c.decoder_layers, d)
            + cross
            + later
            + gemm(m, c.out_dim, d)
    }

    /// The [`Backend`] method the case calls (e.g. `layer_norm_linear`), as the
    /// bench table prints it.
    pub fn op(&self) -> &'static str {
        match self {
            OpCase::Linear { .. } => "linear",
            OpCase::LayerNorm { .. } => "layer_norm",
            OpCase::LayerNormLinear { .. } => "layer_norm_linear",
            OpCase::LinearLayerNorm { .. } => "linear_layer_norm",
            OpCase::Attention { .. } => "attention",
            OpCase::AttentionAbsorbed { .. } => "attention_absorbed",
            OpCase::AlignmentLoss { .. } => "alignment_loss",
            OpCase::Gather { .. } => "gather_signal_tokens",
        }
    }

    /// The shape in words, e.g. `154x2048x512 relu`.
    pub fn shape(&self) -> String {
        match *self {
            OpCase::Linear { m, n, k, act } => format!("{m}x{n}x{k} {}", act.name()),
            OpCase::LayerNorm { rows, cols } => format!("{rows}x{cols}"),
            OpCase::LayerNormLinear { m, n, k } | OpCase::LinearLayerNorm { m, n, k } => {
                format!("{m}x{n}x{k}")
            }
            OpCase::Attention {
                batch,
                lq,
                lk,
                heads,
                head_dim,
            } => {
                format!("B{batch} Lq{lq} Lk{lk} H{heads} d{head_dim}")
            }
            OpCase::AttentionAbsorbed {
                batch,
                lq,
                lk,
                heads,
                cols,
            } => format!("B{batch} Lq{lq} Lk{lk} H{heads} C{cols}"),
            OpCase::AlignmentLoss { batch, tokens, dim } => format!("{batch}x{tokens}x{dim}"),
            OpCase::Gather {
                batch,
                seq,
                n,
                channels,
            } => format!("B{batch} T{seq} n{n} C{channels}"),
        }
    }

    /// Floating-point operations (a multiply-add counts 2).
    pub fn flops(&self) -> f64 {
        match *self {
            OpCase::Linear { m, n, k, .. } => 2.0 * product(&[m, n, k]),
            OpCase::LayerNorm { rows, cols } => 8.0 * product(&[rows, cols]),
            OpCase::LayerNormLinear { m, n, k } => {
                OpCase::LayerNorm { rows: m, cols: k }.flops() + 2.0 * product(&[m, n, k])
            }
            OpCase::LinearLayerNorm { m, n, k } => {
                OpCase::LayerNorm { rows: m, cols: n }.flops() + 2.0 * product(&[m, n, k])
            }
            OpCase::Attention {
                batch,
                lq,
                lk,
                heads,
                head_dim,
            } => 4.0 * product(&[batch, heads, lq, lk, head_dim]),
            // Scores and row sums over heads x keys, and the two norms.
            OpCase::AttentionAbsorbed {
                batch,
                lq,
                lk,
                heads,
                cols,
            } => {
                4.0 * product(&[batch, lq, heads, lk, cols])
                    + 2.0
                        * OpCase::LayerNorm {
                            rows: batch * lq,
                            cols,
                        }
                        .flops()
            }
            OpCase::AlignmentLoss { batch, tokens, dim } => 4.0 * product(&[batch, tokens, dim]),
            OpCase::Gather {
                batch, n, channels, ..
            } => product(&[batch, n, channels]),
        }
    }

    /// Bytes an ideal kernel reads and writes once, at `elem` bytes per element.
    pub fn bytes(&self, elem: usize) -> f64 {
        let e = elem as f64;
        e * match *self {
            OpCase::Linear { m, n, k, .. } => {
                product(&[m, k]) + product(&[n, k]) + product(&[n]) + product(&[m, n])
            }
            OpCase::LayerNorm { rows, cols } => {
                2.0 * product(&[rows, cols]) + 2.0 * product(&[cols])
            }
            // The norm's inputs, the stream it writes, the linear's weights
            // and output; its normalised rows need not touch memory.
            OpCase::LayerNormLinear { m, n, k } => {
                3.0 * product(&[m, k])
                    + 2.0 * product(&[k])
                    + product(&[n, k])
                    + product(&[n])
                    + product(&[m, n])
            }
            // The linear's inputs, the residual, the stream and the norm it
            // writes; the linear's output need not touch memory.
            OpCase::LinearLayerNorm { m, n, k } => {
                product(&[m, k]) + product(&[n, k]) + 3.0 * product(&[n]) + 3.0 * product(&[m, n])
            }
            OpCase::Attention {
                batch,
                lq,
                lk,
                heads,
                head_dim,
            } => 2.0 * product(&[batch, heads, head_dim]) * (product(&[lq]) + product(&[lk])),
            // The rows and their residual in, the stream and the norm out;
            // keys, values and key bias; the norms' and output's vectors.
            OpCase::AttentionAbsorbed {
                batch,
                lq,
                lk,
                heads,
                cols,
            } => {
                4.0 * product(&[batch, lq, cols])
                    + product(&[batch, lk, heads]) * (2.0 * product(&[cols]) + 1.0)
                    + 5.0 * product(&[cols])
            }
            OpCase::AlignmentLoss { batch, tokens, dim } => {
                3.0 * product(&[batch, tokens, dim]) + 1.0
            }
            OpCase::Gather {
                batch, n, channels, ..
            } => 3.0 * product(&[batch, n, channels]),
        }
    }

    /// Inputs and outputs on `be`, filled with seeded random values.
    pub fn prepare<B: Backend>(&self, be: &B, seed: u64) -> Result<Prepared<B>> {
        let mut rng = Rng::new(seed);
        self.prepare_with(be, &mut |shape, role| {
            role.upload(be, &random_input(&mut rng, shape)?)
        })
    }

    /// Inputs (each from `up`, asked in a fixed order) and outputs on `be`.
    fn prepare_with<B: Backend>(
        &self,
        be: &B,
        up: &mut dyn FnMut(Vec<usize>, Role) -> Result<B::Tensor>,
    ) -> Result<Prepared<B>> {
        let p = match *self {
            OpCase::Linear { m, n, k, act } => Prepared::Linear {
                x: up(vec![m, k], Role::Input)?,
                w: up(vec![n, k], Role::Weight)?,
                b: up(vec![n], Role::Input)?,
                act,
                out: be.alloc(&[m, n])?,
            },
            OpCase::LayerNorm { rows, cols } => Prepared::LayerNorm {
                x: up(vec![rows, cols], Role::Input)?,
                residual: up(vec![rows, cols], Role::Input)?,
                w: up(vec![cols], Role::Input)?,
                b: up(vec![cols], Role::Input)?,
                out: be.alloc(&[rows, cols])?,
                sum: be.alloc(&[rows, cols])?,
            },
            OpCase::LayerNormLinear { m, n, k } => Prepared::LayerNormLinear {
                x: up(vec![m, k], Role::Input)?,
                residual: up(vec![m, k], Role::Input)?,
                gamma: up(vec![k], Role::Input)?,
                beta: up(vec![k], Role::Input)?,
                w: up(vec![n, k], Role::Weight)?,
                b: up(vec![n], Role::Input)?,
                sum: be.alloc(&[m, k])?,
                h: be.alloc(&[m, k])?,
                out: be.alloc(&[m, n])?,
            },
            OpCase::LinearLayerNorm { m, n, k } => Prepared::LinearLayerNorm {
                x: up(vec![m, k], Role::Input)?,
                w: up(vec![n, k], Role::Weight)?,
                b: up(vec![n], Role::Input)?,
                residual: up(vec![m, n], Role::Input)?,
                gamma: up(vec![n], Role::Input)?,
                beta: up(vec![n], Role::Input)?,
                y: be.alloc(&[m, n])?,
                sum: be.alloc(&[m, n])?,
                out: be.alloc(&[m, n])?,
            },
            OpCase::Attention {
                batch,
                lq,
                lk,
                heads,
                head_dim,
            } => {
                let w = heads
                    .checked_mul(head_dim)
                    .ok_or_else(|| Error::Overflow(format!("{heads} heads x {head_dim}")))?;
                Prepared::Attention {
                    q: up(vec![batch, lq, w], Role::Input)?,
                    kv: up(vec![batch, lk, w.saturating_mul(2)], Role::Input)?,
                    spec: AttentionSpec::new(heads, head_dim),
                    out: be.alloc(&[batch, lq, w])?,
                }
            }
            OpCase::AttentionAbsorbed {
                batch,
                lq,
                lk,
                heads,
                cols,
            } => {
                let kv_cols = cols
                    .checked_mul(2)
                    .and_then(|c| c.checked_add(1))
                    .and_then(|c| c.checked_mul(heads))
                    .ok_or_else(|| Error::Overflow(format!("{heads} heads x {cols} columns")))?;
                let kv = up(vec![batch, lk, kv_cols], Role::Input)?;
                Prepared::AttentionAbsorbed {
                    x: up(vec![batch, lq, cols], Role::Input)?,
                    residual: up(vec![batch, lq, cols], Role::Input)?,
                    vectors: [
                        up(vec![cols], Role::Input)?,
                        up(vec![cols], Role::Input)?,
                        up(vec![cols], Role::Input)?,
                        up(vec![cols], Role::Input)?,
                        up(vec![cols], Role::Input)?,
                    ],
                    kv,
                    heads,
                    stream: be.alloc(&[batch, lq, cols])?,
                    out: be.alloc(&[batch, lq, cols])?,
                }
            }
            OpCase::AlignmentLoss { batch, tokens, dim } => Prepared::Loss {
                pred: up(vec![batch, tokens, dim], Role::Input)?,
                target: up(vec![batch, tokens, dim], Role::Input)?,
                loss: be.alloc(&[1])?,
                grad: be.alloc(&[batch, tokens, dim])?,
            },
            OpCase::Gather {
                batch,
                seq,
                n,
                channels,
            } => {
                // The signal tokens end each sequence.
                let start = seq.checked_sub(n).ok_or_else(|| {
                    Error::invalid(format!("gather: {n} signal tokens in sequences of {seq}"))
                })?;
                let mut ids =
                    try_filled(checked_numel(&[batch, seq], "token ids")?, 0, "token ids")?;
                for (i, id) in ids.iter_mut().enumerate() {
                    *id = (i % seq) as i64;
                }
                let signal: Vec<i64> = (start..seq).map(|i| i as i64).collect();
                Prepared::Gather {
                    hidden: up(vec![batch, seq, channels], Role::Input)?,
                    embeds: up(vec![batch, seq, channels], Role::Input)?,
                    positions: SignalPositions::find(&ids, batch, seq, &signal)?,
                    out: be.alloc(&[batch, n, channels])?,
                }
            }
        };
        Ok(p)
    }
}

/// The product of sizes in f64: counts for rates, never an overflow.
fn product(dims: &[usize]) -> f64 {
    dims.iter().map(|&d| d as f64).product()
}

/// An op's inputs and outputs, ready to run again and again.
pub enum Prepared<B: Backend> {
    /// [`OpCase::Linear`]'s operands.
    Linear {
        /// The input `[m, k]`.
        x: B::Tensor,
        /// The weight `[n, k]`.
        w: B::Tensor,
        /// The bias `[n]`.
        b: B::Tensor,
        /// The activation fused into the linear.
        act: Activation,
        /// The output `[m, n]`.
        out: B::Tensor,
    },
    /// [`OpCase::LayerNorm`]'s operands (eps 1e-5).
    LayerNorm {
        /// The input `[rows, cols]`.
        x: B::Tensor,
        /// Added to `x` before the statistics, `[rows, cols]`.
        residual: B::Tensor,
        /// The scale `[cols]`.
        w: B::Tensor,
        /// The shift `[cols]`.
        b: B::Tensor,
        /// The normalised output `[rows, cols]`.
        out: B::Tensor,
        /// Receives `x + residual`, `[rows, cols]`.
        sum: B::Tensor,
    },
    /// [`OpCase::LayerNormLinear`]'s operands (eps 1e-5, no activation).
    LayerNormLinear {
        /// The norm's input `[m, k]`.
        x: B::Tensor,
        /// Added to `x` before the norm, `[m, k]`.
        residual: B::Tensor,
        /// The norm's scale `[k]`.
        gamma: B::Tensor,
        /// The norm's shift `[k]`.
        beta: B::Tensor,
        /// The linear's weight `[n, k]`.
        w: B::Tensor,
        /// The linear's bias `[n]`.
        b: B::Tensor,
        /// Receives `x + residual`, `[m, k]`.
        sum: B::Tensor,
        /// Scratch for the normalised rows, `[m, k]`; a fused kernel leaves it unwritten.
        h: B::Tensor,
        /// The linear's output `[m, n]`.
        out: B::Tensor,
    },
    /// [`OpCase::LinearLayerNorm`]'s operands (eps 1e-5, no activation).
    LinearLayerNorm {
        /// The linear's input `[m, k]`.
        x: B::Tensor,
        /// The linear's weight `[n, k]`.
        w: B::Tensor,
        /// The linear's bias `[n]`.
        b: B::Tensor,
        /// Added to the linear's output before the norm, `[m, n]`.
        residual: B::Tensor,
        /// The norm's scale `[n]`.
        gamma: B::Tensor,
        /// The norm's shift `[n]`.
        beta: B::Tensor,
        /// Scratch for the linear's output, `[m, n]`; a fused kernel leaves it unwritten.
        y: B::Tensor,
        /// Receives the linear's output plus `residual`, `[m, n]`.
        sum: B::Tensor,
        /// The normalised sum `[m, n]`.
        out: B::Tensor,
    },
    /// [`OpCase::Attention`]'s operands.
    Attention {
        /// The queries `[batch, lq, heads * head_dim]`.
        q: B::Tensor,
        /// Keys then values, side by side: `[batch, lk, 2 * heads * head_dim]`.
        kv: B::Tensor,
        /// Heads and head width; not causal, scale `1 / sqrt(head_dim)`.
        spec: AttentionSpec,
        /// The output `[batch, lq, heads * head_dim]`.
        out: B::Tensor,
    },
    /// [`OpCase::AttentionAbsorbed`]'s operands (eps 1e-5, score scale
    /// `1 / sqrt(cols)`).
    AttentionAbsorbed {
        /// The rows attending, `[batch, lq, cols]`.
        x: B::Tensor,
        /// Added to `x` before the first norm, `[batch, lq, cols]`.
        residual: B::Tensor,
        /// The first norm's weight and bias, the output bias, the second
        /// norm's weight and bias.
        vectors: [B::Tensor; 5],
        /// Keys, values and key bias side by side.
        kv: B::Tensor,
        /// Heads absorbed: `kv` is `[batch, lk, heads * (2 * cols + 1)]`, `heads`
        /// blocks of `cols` columns for the keys, as many for the values, then
        /// `heads` key-bias columns.
        heads: usize,
        /// Receives the residual stream `x + residual + attention + output bias`,
        /// `[batch, lq, cols]`.
        stream: B::Tensor,
        /// The second norm of `stream`, `[batch, lq, cols]`.
        out: B::Tensor,
    },
    /// [`OpCase::AlignmentLoss`]'s operands ([`LossKind::TokenL2`]).
    Loss {
        /// The predictions `[batch, tokens, dim]`.
        pred: B::Tensor,
        /// The targets `[batch, tokens, dim]`.
        target: B::Tensor,
        /// Receives the loss, `[1]`.
        loss: B::Tensor,
        /// Receives the gradient with respect to `pred`, `[batch, tokens, dim]`.
        grad: B::Tensor,
    },
    /// [`OpCase::Gather`]'s operands.
    Gather {
        /// The hidden states `[batch, seq, channels]`.
        hidden: B::Tensor,
        /// The input embeddings added to them, `[batch, seq, channels]`.
        embeds: B::Tensor,
        /// The last `n` positions of every sequence.
        positions: SignalPositions,
        /// The gathered tokens `[batch, n, channels]`.
        out: B::Tensor,
    },
}

impl<B: Backend> Prepared<B> {
    /// Issue the op once (does not wait for it).
    pub fn run(&mut self, be: &B) -> Result<()> {
        match self {
            Prepared::Linear { x, w, b, act, out } => be.linear(x, w, Some(b), *act, None, out),
            Prepared::LayerNorm {
                x,
                residual,
                w,
                b,
                out,
                sum,
            } => be.layer_norm(x, Some(residual), w, b, 1e-5, out, Some(sum)),
            Prepared::LayerNormLinear {
                x,
                residual,
                gamma,
                beta,
                w,
                b,
                sum,
                h,
                out,
            } => {
                let norm = NormInput {
                    x,
                    residual: Some(residual),
                    weight: gamma,
                    bias: beta,
                    eps: 1e-5,
                };
                be.layer_norm_linear(norm, Some(sum), h, w, Some(b), Activation::None, out)
            }
            Prepared::LinearLayerNorm {
                x,
                w,
                b,
                residual,
                gamma,
                beta,
                y,
                sum,
                out,
            } => {
                let norm = NormAfter {
                    residual: Some(residual),
                    weight: gamma,
                    bias: beta,
                    eps: 1e-5,
                };
                let none = Activation::None;
                be.linear_layer_norm(x, w, Some(b), none, y, norm, Some(sum), out)
            }
            Prepared::Attention { q, kv, spec, out } => {
                let d = spec.heads * spec.head_dim;
                be.attention(
                    Cols::new(q, 0),
                    Cols::new(kv, 0),
                    Cols::new(kv, d),
                    spec,
                    None,
                    out,
                )
            }
            Prepared::AttentionAbsorbed {
                x,
                residual,
                vectors: [w, b, ob, aw, ab],
                kv,
                heads,
                stream,
                out,
            } => {
                let cols = x.shape().last().copied().unwrap_or(1);
                let wide = *heads * cols;
                let norm = NormInput {
                    x,
                    residual: Some(residual),
                    weight: w,
                    bias: b,
                    eps: 1e-5,
                };
                let attn = AbsorbedAttentionInput {
                    keys: Cols::new(kv, 0),
                    values: Cols::new(kv, wide),
                    key_bias: Cols::new(kv, 2 * wide),
                    out_bias: ob,
                    heads: *heads,
                    // Scores O(1) on the unit normal keys, as the weights make them.
                    scale: 1.0 / (cols as f64).sqrt(),
                };
                let after = NormAfter {
                    residual: None,
                    weight: aw,
                    bias: ab,
                    eps: 1e-5,
                };
                be.attention_absorbed(norm, attn, after, stream, out)
            }
            Prepared::Loss {
                pred,
                target,
                loss,
                grad,
            } => be.alignment_loss(LossKind::TokenL2, pred, target, loss, grad),
            Prepared::Gather {
                hidden,
                embeds,
                positions,
                out,
            } => be.gather_signal_tokens(hidden, Some(embeds), positions, out),
        }
    }
}

/// A bench input of `shape`: standard normal values.
fn random_input(rng: &mut Rng, shape: Vec<usize>) -> Result<HostTensor> {
    let n = crate::tensor::checked_numel(&shape, "bench input")?;
    HostTensor::from_f64(shape, rng.normal_vec(n))
}

/// Inputs a forward row rotates over, run by run: as many as
/// scripts/torch_baseline.py's `forward_inputs`. The weights, one model, stay.
pub const FORWARD_INPUTS: usize = 8;

/// Most argument sets a [`Rotation`] takes (PyTorch's side takes as many).
pub const MAX_ROTATED_SETS: usize = 256;

/// How many argument sets of `set_bytes` bytes to rotate over so that together
/// they exceed twice a cache of `cache_bytes`: 2 to [`MAX_ROTATED_SETS`], and 1
/// where there is no cache to beat (`cache_bytes` 0). The rule
/// scripts/torch_baseline.py's `sets_for` times PyTorch's ops by.
pub fn rotated_sets(set_bytes: f64, cache_bytes: usize) -> usize {
    if cache_bytes == 0 {
        return 1;
    }
    let sets = (2.0 * cache_bytes as f64 / set_bytes.max(1.0)).ceil();
    sets.clamp(2.0, MAX_ROTATED_SETS as f64) as usize
}

/// An op case's argument sets (weights included), one per run in turn, so
/// that run after run the op reads its operands from memory rather than from
/// the cache the run before it warmed. The sets hold the same values in
/// buffers of their own (a cache holds addresses, not values; generating 256
/// sets' values would take a second a row).
pub struct Rotation<B: Backend> {
    sets: Cycle<Prepared<B>>,
}

/// What an op's argument is: a GEMM's weight goes up by
/// [`Backend::upload_weight`], the rest by [`Backend::upload`].
#[derive(Clone, Copy)]
enum Role {
    Input,
    Weight,
}

impl Role {
    fn upload<B: Backend>(self, be: &B, t: &HostTensor) -> Result<B::Tensor> {
        match self {
            Role::Input => be.upload(t),
            Role::Weight => be.upload_weight(t),
        }
    }
}

impl<B: Backend> Rotation<B> {
    /// [`rotated_sets`] sets of `case` on `be` for a cache of `cache_bytes`,
    /// `elem` bytes per element, holding [`OpCase::prepare`]'s values for `seed`.
    pub fn new(case: &OpCase, be: &B, seed: u64, cache_bytes: usize, elem: usize) -> Result<Self> {
        let count = rotated_sets(case.bytes(elem), cache_bytes);
        let mut rng = Rng::new(seed);
        let mut inputs: Vec<HostTensor> = Vec::new();
        let mut sets = Vec::with_capacity(count);
        for _ in 0..count {
            // The first set draws the inputs; the others upload them again.
            let mut i = 0;
            sets.push(case.prepare_with(be, &mut |shape, role| {
                if i == inputs.len() {
                    inputs.push(random_input(&mut rng, shape)?);
                }
                i += 1;
                match inputs.get(i - 1) {
                    Some(input) => role.upload(be, input),
                    None => Err(crate::error::Error::invalid("bench inputs out of order")),
                }
            })?);
        }
        Ok(Rotation {
            sets: Cycle::new(sets, "argument sets")?,
        })
    }

    /// How many sets it rotates over.
    pub fn count(&self) -> usize {
        self.sets.count()
    }

    /// Issue the op once on the next set (does not wait for it).
    pub fn run(&mut self, be: &B) -> Result<()> {
        self.sets.next_mut().run(be)
    }
}

/// Items handed out one at a time, in turn, round and round: a bench's
/// rotating inputs.
pub struct Cycle<T> {
    items: Vec<T>,
    next: usize,
}

impl<T> Cycle<T> {
    /// A cycle over `items`; an error naming `what` if there are none.
    pub fn new(items: Vec<T>, what: &str) -> Result<Self> {
        if items.is_empty() {
            return Err(crate::error::Error::invalid(format!(
                "a bench rotation needs at least one of its {what}"
            )));
        }
        Ok(Cycle { items, next: 0 })
    }

    /// How many items it cycles over (at least one).
    pub fn count(&self) -> usize {
        self.items.len()
    }

    /// The next item in turn.
    pub fn next_mut(&mut self) -> &mut T {
        let i = self.next;
        self.next = (i + 1) % self.items.len(); // len >= 1, i < len: in bounds
        &mut self.items[i]
    }
}

/// Timings of repeated runs.
#[derive(Clone, Debug)]
pub struct Timing {
    /// The median run's wall-clock time, from issuing the work to its completion.
    pub median: Duration,
    /// The fastest run's wall-clock time, from issuing the work to its completion.
    pub min: Duration,
    /// The median run's host time: from issuing the work until the call that
    /// issues it returns (recording or launching it; on a synchronous backend,
    /// all of it). The device can finish no earlier.
    pub host_median: Duration,
    /// The median run's device time (timestamp queries), where the backend
    /// measures it.
    pub device_median: Option<Duration>,
    /// Runs timed, the warm-up run not counted.
    pub runs: usize,
}

/// Device time per run when up to `max_runs` runs are queued back to back
/// with no host wait between them (launch gaps, but no round trip to the
/// host): the median over `bursts` bursts, each sized from `single` (a
/// [`time`] of the same work) to take about `budget / bursts`. `None` where
/// the backend has no device timer, or a burst would be under two runs.
pub fn time_burst<B: Backend>(
    be: &B,
    single: &Timing,
    budget: Duration,
    max_runs: usize,
    bursts: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Option<Duration>> {
    let bursts = bursts.max(1);
    let per_burst = budget.as_secs_f64() / bursts as f64;
    let fit = per_burst / single.median.as_secs_f64().max(1e-9);
    let runs = (fit.floor() as usize).min(max_runs);
    if runs < 2 {
        return Ok(None);
    }
    let mut per_run = Vec::new();
    for _ in 0..bursts {
        let on_device = be.device_time(&mut || (0..runs).try_for_each(|_| f()))?;
        be.synchronize()?;
        match on_device {
            Some(d) => per_run.push(d.div_f64(runs as f64)),
            None => return Ok(None),
        }
    }
    per_run.sort();
    Ok(per_run.get(per_run.len() / 2).copied())
}

/// Run `f` once to warm up, then until `budget` is spent (at least `min_runs`
/// times), synchronising after each run; the median and the minimum.
pub fn time<B: Backend>(
    be: &B,
    min_runs: usize,
    budget: Duration,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    f()?;
    be.synchronize()?;
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut device = Vec::new();
    let mut host = Vec::new();
    while samples.len() < min_runs.max(1) || start.elapsed() < budget {
        let t = Instant::now();
        let on_device = be.device_time(&mut || {
            let issued = Instant::now();
            let done = f();
            host.push(issued.elapsed());
            done
        })?;
        be.synchronize()?;
        samples.push(t.elapsed());
        device.extend(on_device);
    }
    samples.sort();
    device.sort();
    host.sort();
    Ok(Timing {
        median: samples[samples.len() / 2],
        min: samples[0],
        host_median: host[host.len() / 2],
        device_median: device.get(device.len() / 2).copied(),
        runs: samples.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Reference;

    #[test]
    fn cases_that_cannot_be_built_are_errors() {
        let gather = |seq, n| OpCase::Gather {
            batch: 2,
            seq,
            n,
            channels: 8,
        };
        let e = gather(3, 4)
            .prepare(&Reference, 1)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("gather: 4 signal tokens in sequences of 3")
        );
        assert!(gather(4, 4).prepare(&Reference, 1).is_ok());
        let wide = OpCase::Attention {
            batch: 1,
            lq: 1,
            lk: 1,
            heads: usize::MAX,
            head_dim: 2,
        };
        assert!(matches!(
            wide.prepare(&Reference, 1),
            Err(Error::Overflow(_))
        ));
    }

    fn single(median_us: u64) -> Timing {
        let d = Duration::from_micros(median_us);
        Timing {
            median: d,
            min: d,
            host_median: d,
            device_median: None,
            runs: 3,
        }
    }

    #[test]
    fn host_time_is_the_issuing_calls_own() -> Result<()> {
        // On the reference the call is the whole run: host time within it.
        let t = time(&Reference, 3, Duration::ZERO, || {
            std::thread::sleep(Duration::from_millis(2));
            Ok(())
        })?;
        assert!(t.host_median >= Duration::from_millis(2), "{t:?}");
        assert!(t.host_median <= t.median, "{t:?}");
        Ok(())
    }

    #[test]
    fn rotated_sets_exceed_twice_the_cache() {
        assert_eq!(rotated_sets(1e6, 0), 1, "no cache: one set");
        assert_eq!(rotated_sets(1e6, 50_000_000), 100);
        assert_eq!(rotated_sets(1e6 + 1.0, 50_000_000), 100, "rounded up");
        assert_eq!(rotated_sets(1.0, 50_000_000), MAX_ROTATED_SETS);
        assert_eq!(rotated_sets(1e9, 50_000_000), 2, "never one on a cache");
        assert_eq!(rotated_sets(0.0, 1), 2);
    }

    #[test]
    fn a_rotation_runs_its_sets_in_turn() -> Result<()> {
        let be = Reference;
        let case = OpCase::LayerNorm { rows: 4, cols: 8 };
        // 640 bytes a set at 8 bytes an element: 4 sets exceed twice 1280.
        let mut r = Rotation::new(&case, &be, 1, 1280, 8)?;
        assert_eq!(r.count(), 4);
        let written = |r: &Rotation<Reference>| -> Result<Vec<bool>> {
            r.sets
                .items
                .iter()
                .map(|set| match set {
                    Prepared::LayerNorm { out, .. } => {
                        // The reference allocates NaN.
                        Ok(be.download(out)?.to_f64_vec().iter().all(|v| v.is_finite()))
                    }
                    _ => Err(crate::error::Error::invalid("not a layer_norm set")),
                })
                .collect()
        };
        assert_eq!(written(&r)?, [false; 4]);
        for _ in 0..3 {
            r.run(&be)?;
        }
        assert_eq!(written(&r)?, [true, true, true, false]);
        r.run(&be)?;
        r.run(&be)?;
        assert_eq!(r.sets.next, 1, "back to the first set after the last");
        // The same values in every set, those `prepare` gives.
        let inputs: Vec<Vec<f64>> = r
            .sets
            .items
            .iter()
            .filter_map(|set| match set {
                Prepared::LayerNorm { x, .. } => be.download(x).ok().map(|t| t.to_f64_vec()),
                _ => None,
            })
            .collect();
        assert_eq!(inputs.len(), 4);
        let Prepared::LayerNorm { x, .. } = case.prepare(&be, 1)? else {
            return Err(crate::error::Error::invalid("not a layer_norm set"));
        };
        let once = be.download(&x)?.to_f64_vec();
        assert!(inputs.iter().all(|x| *x == once));
        Ok(())
    }

    #[test]
    fn a_cycle_hands_out_its_items_in_turn_and_is_never_empty() -> Result<()> {
        let Err(e) = Cycle::<u8>::new(Vec::new(), "forward inputs") else {
            panic!("an empty cycle was made");
        };
        assert!(e.to_string().contains("forward inputs"), "{e}");
        let mut c = Cycle::new(vec![1, 2, 3], "inputs")?;
        let seen: Vec<i32> = (0..7).map(|_| *c.next_mut()).collect();
        assert_eq!(seen, [1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(c.count(), 3);
        Ok(())
    }

    #[test]
    fn bursts_need_a_device_timer_and_room_for_two_runs() {
        let budget = Duration::from_millis(100);
        let mut calls = 0;
        // The reference has no device timer: one burst tried, then none.
        let t = time_burst(&Reference, &single(10), budget, 20, 5, || {
            calls += 1;
            Ok(())
        });
        assert_eq!(t.ok(), Some(None));
        assert_eq!(calls, 20);
        // A run longer than half a burst's share of the budget: no burst at all.
        calls = 0;
        let t = time_burst(&Reference, &single(15_000), budget, 20, 5, || {
            calls += 1;
            Ok(())
        });
        assert_eq!(t.ok(), Some(None));
        assert_eq!(calls, 0);
        // Errors of the work come back as they were, and end the burst.
        calls = 0;
        let t = time_burst(&Reference, &single(10), budget, 20, 5, || {
            calls += 1;
            Err(crate::error::Error::invalid("boom"))
        });
        match t {
            Err(crate::error::Error::Invalid(msg)) => assert_eq!(msg, "boom"),
            other => panic!("expected the work's own error, got {other:?}"),
        }
        assert_eq!(calls, 1, "the burst went on after an error");
    }
}
