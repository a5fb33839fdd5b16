//! Any backend against the CPU reference, on fresh random inputs and awkward
//! sizes, with outputs poisoned (NaN) first so that an element a kernel forgets
//! to write always fails. Used by `outproj check` and by the tests.

use crate::config::{Modality, ProjectorConfig, Variant};
use crate::error::Result;
use crate::ops::{
    AbsorbedAttentionInput, Activation, AttentionSpec, Backend, Cols, KeyPaddingMask, LossKind,
    NormAfter, NormInput, Shaped,
};
use crate::projector::Projector;
use crate::reference::{RefTensor, Reference};
use crate::rng::Rng;
use crate::signal::SignalPositions;
use crate::tensor::{checked_numel, compare, try_filled, DType, HostTensor};
use crate::weights::ProjectorWeights;

/// One op call to compare.
#[derive(Clone, Debug, PartialEq)]
pub enum Case {
    /// `linear`: `act(x · wᵀ + b) + residual`, `x: [m, k]`, `w: [n, k]`.
    Linear {
        /// Rows of `x` and of the output.
        m: usize,
        /// Output columns (rows of `w`).
        n: usize,
        /// Input columns, the length of each dot product.
        k: usize,
        /// The activation fused into the linear.
        act: Activation,
        /// Whether a bias `[n]` is added.
        bias: bool,
        /// Whether a residual `[m, n]` is added after the activation.
        residual: bool,
    },
    /// `layer_norm` of `[rows, cols]`: the normalised rows compared, and the sum
    /// `x + residual` where there is a residual.
    LayerNorm {
        /// Rows normalised.
        rows: usize,
        /// Columns per row, the width normalised over.
        cols: usize,
        /// Whether a residual `[rows, cols]` is added before the statistics.
        residual: bool,
        /// Added to every element of `x` (not the residual): a large mean tests
        /// the variance computation.
        offset: f64,
    },
    /// A LayerNorm of `[m, k]` (plus a residual) feeding a linear to `n`
    /// columns; the sum `x + residual` compared too.
    LayerNormLinear {
        /// Rows.
        m: usize,
        /// The linear's output columns.
        n: usize,
        /// Columns normalised, and the linear's input columns.
        k: usize,
        /// The activation fused into the linear.
        act: Activation,
        /// Whether a residual `[m, k]` is added to `x` before the norm.
        residual: bool,
        /// Added to every element of `x`, as in `LayerNorm`.
        offset: f64,
    },
    /// A linear of `[m, k]` to `n` columns whose output (plus a residual)
    /// a LayerNorm reads; the sum compared too.
    LinearLayerNorm {
        /// Rows.
        m: usize,
        /// The linear's output columns, the width the LayerNorm normalises.
        n: usize,
        /// The linear's input columns.
        k: usize,
        /// The activation fused into the linear, before the residual is added.
        act: Activation,
        /// Whether a residual `[m, n]` is added to the linear's output before the
        /// norm; without one, `offset` has no effect.
        residual: bool,
        /// Added to the residual: a large mean of the norm's input (the
        /// stream's, not the linear's output, whose rounding would set the
        /// error).
        offset: f64,
    },
    /// `attention` of `lq` queries over `lk` keys per sequence, scale
    /// `1 / sqrt(head_dim)`.
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
        /// Query `i` sees keys `j <= i` only.
        causal: bool,
        /// A key padding mask ignoring every key but key 0 with probability 0.4;
        /// with `causal`, key 0 of sequence 0 is ignored too, leaving its query 0
        /// no visible key (output: zeros).
        mask: bool,
        /// Q, K and V as the three column blocks of one packed `[B, L, 3C]` tensor
        /// (self-attention, needs `lq == lk`); else Q alone and K, V packed.
        packed: bool,
    },
    /// `attention_absorbed` of `[batch, lq, cols]` rows over `lk` keys in
    /// `heads` heads, both outputs compared.
    AttentionAbsorbed {
        /// Sequences.
        batch: usize,
        /// Rows attending per sequence.
        lq: usize,
        /// Keys per sequence.
        lk: usize,
        /// Heads absorbed, each a block of `cols` columns in the keys and in the values.
        heads: usize,
        /// The rows' width `C`.
        cols: usize,
        /// Whether a residual `[batch, lq, cols]` is added before the first norm.
        residual: bool,
        /// Keys, values and key bias as column blocks of one tensor, from
        /// an odd column (no 16-byte loads); else three tensors of their own.
        packed: bool,
        /// Added to every input row, as in `LayerNorm`.
        offset: f64,
    },
    /// `alignment_loss` of `[batch, tokens, dim]` predictions against targets:
    /// the loss and its gradient compared.
    AlignmentLoss {
        /// Sequences.
        batch: usize,
        /// Tokens per sequence.
        tokens: usize,
        /// Each token's width.
        dim: usize,
        /// Which loss.
        kind: LossKind,
    },
    /// `gather_signal_tokens` of `n` consecutive signal tokens, from position
    /// `3b mod (seq - n + 1)` in sequence `b`, out of `[batch, seq, channels]`
    /// hidden states into `[batch, n, channels]`.
    Gather {
        /// Sequences.
        batch: usize,
        /// Tokens per sequence `T`.
        seq: usize,
        /// Signal tokens per sequence.
        n: usize,
        /// Each token's width `C`.
        channels: usize,
        /// Whether input embeddings `[batch, seq, channels]` are added to the
        /// hidden states gathered.
        embeds: bool,
    },
}

/// The outcome of one comparison.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// The op compared, as [`Case::op`] names it; for a whole forward,
    /// `projector` or the name given to [`compare_projector_by`].
    pub op: &'static str,
    /// The case in words: [`Case::describe`], or [`ProjectorCase::name`] for a
    /// whole forward.
    pub case: String,
    /// `||out - ref|| / ||ref||` (the worst over the op's outputs), as
    /// [`crate::tensor::compare`] computes it: `||out||` where the reference is all
    /// zeros, infinite where an output is non-finite or has the wrong shape.
    pub rel: f64,
    /// The largest `|out - ref|` (the worst over the op's outputs); infinite
    /// where an output holds a non-finite value (a poisoned element left
    /// unwritten) or has the wrong shape.
    pub max_abs: f64,
}

impl Case {
    /// An attention case, its flags in field order (`causal`, `mask`, `packed`).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        batch: usize,
        lq: usize,
        lk: usize,
        heads: usize,
        head_dim: usize,
        causal: bool,
        mask: bool,
        packed: bool,
    ) -> Self {
        Case::Attention {
            batch,
            lq,
            lk,
            heads,
            head_dim,
            causal,
            mask,
            packed,
        }
    }

    /// The [`Backend`] method the case calls, e.g. `layer_norm_linear`.
    pub fn op(&self) -> &'static str {
        match self {
            Case::Linear { .. } => "linear",
            Case::LayerNorm { .. } => "layer_norm",
            Case::LayerNormLinear { .. } => "layer_norm_linear",
            Case::LinearLayerNorm { .. } => "linear_layer_norm",
            Case::Attention { .. } => "attention",
            Case::AttentionAbsorbed { .. } => "attention_absorbed",
            Case::AlignmentLoss { .. } => "alignment_loss",
            Case::Gather { .. } => "gather_signal_tokens",
        }
    }

    /// The mean its normalised input is drawn around (a residual's, for
    /// `linear_layer_norm`): 0, or large to test the norm's cancellation;
    /// 0 for an op without a norm.
    pub fn offset(&self) -> f64 {
        match *self {
            Case::LayerNorm { offset, .. }
            | Case::LayerNormLinear { offset, .. }
            | Case::LinearLayerNorm { offset, .. }
            | Case::AttentionAbsorbed { offset, .. } => offset,
            _ => 0.0,
        }
    }

    /// The case's shape and options in words, e.g. `77x129x513 relu +b +res` or
    /// `B2 Lq77 Lk4 H4 C512 +res packed`.
    pub fn describe(&self) -> String {
        match *self {
            Case::Linear {
                m,
                n,
                k,
                act,
                bias,
                residual,
            } => format!(
                "{m}x{n}x{k} {}{}{}",
                act.name(),
                if bias { " +b" } else { "" },
                if residual { " +res" } else { "" }
            ),
            Case::LayerNorm {
                rows,
                cols,
                residual,
                offset,
            } => format!("{rows}x{cols}{}", norm_suffix(residual, offset)),
            Case::LayerNormLinear {
                m,
                n,
                k,
                act,
                residual,
                offset,
            }
            | Case::LinearLayerNorm {
                m,
                n,
                k,
                act,
                residual,
                offset,
            } => format!(
                "{m}x{n}x{k} {}{}",
                act.name(),
                norm_suffix(residual, offset)
            ),
            Case::Attention {
                batch,
                lq,
                lk,
                heads,
                head_dim,
                causal,
                mask,
                packed,
            } => format!(
                "B{batch} Lq{lq} Lk{lk} H{heads} d{head_dim}{}{}{}",
                if causal { " causal" } else { "" },
                if mask { " mask" } else { "" },
                if packed { " packed" } else { "" }
            ),
            Case::AttentionAbsorbed {
                batch,
                lq,
                lk,
                heads,
                cols,
                residual,
                packed,
                offset,
            } => format!(
                "B{batch} Lq{lq} Lk{lk} H{heads} C{cols}{}{}",
                norm_suffix(residual, offset),
                if packed { " packed" } else { "" }
            ),
            Case::AlignmentLoss {
                batch,
                tokens,
                dim,
                kind,
            } => {
                format!("{batch}x{tokens}x{dim} {kind:?}")
            }
            Case::Gather {
                batch,
                seq,
                n,
                channels,
                embeds,
            } => format!(
                "B{batch} T{seq} n{n} C{channels}{}",
                if embeds { " +embeds" } else { "" }
            ),
        }
    }
}

/// Awkward sizes for every op: 1, 3, 77, 129, 513, masks, causal, n_out = 1, the
/// projector's own shapes, and head dims 64 and 128.
pub fn standard_cases() -> Vec<Case> {
    use Activation::*;
    let mut cases = Vec::new();
    for &(m, n, k) in &[
        (1, 1, 1),
        (3, 5, 7),
        (77, 129, 513),
        (129, 77, 3),
        (4, 512, 4096),
        (77, 1536, 512),
        (154, 512, 2048),
        (513, 33, 64),
        (13, 70, 258),
    ] {
        for (act, bias, residual) in [
            (None, true, false),
            (Relu, true, true),
            (GeluErf, false, true),
            (GeluTanh, true, false),
        ] {
            cases.push(Case::Linear {
                m,
                n,
                k,
                act,
                bias,
                residual,
            });
        }
    }
    // Rows past 8192 or 2048 elements take the kernels' re-read paths.
    for &(rows, cols) in &[
        (1, 1),
        (3, 3),
        (77, 512),
        (129, 513),
        (5, 4096),
        (2, 77),
        (3, 9000),
        (2, 2049),
    ] {
        cases.push(Case::LayerNorm {
            rows,
            cols,
            residual: false,
            offset: 0.0,
        });
        cases.push(Case::LayerNorm {
            rows,
            cols,
            residual: true,
            offset: 0.0,
        });
    }
    cases.push(Case::LayerNorm {
        rows: 7,
        cols: 512,
        residual: true,
        offset: 1000.0,
    });
    // One kernel on CUDA up to 16 rows of up to 1024 columns (a multiple of
    // 4): batch 1's encoder QKV, FFN up and cross-attention K/V; two ops past
    // either limit.
    for (m, n, k, act, residual, offset) in [
        (4, 1536, 512, None, true, 0.0),
        (4, 2048, 512, Relu, true, 0.0),
        (4, 4096, 512, None, true, 0.0),
        (13, 70, 36, Relu, false, 1000.0),
        (16, 36, 1024, GeluErf, true, 3.0),
        (77, 512, 512, None, true, 0.0),
        (3, 5, 6, None, true, 0.0),
    ] {
        cases.push(Case::LayerNormLinear {
            m,
            n,
            k,
            act,
            residual,
            offset,
        });
    }
    // One kernel on CUDA where the linear takes v5 (16-bit, a large tile
    // for every SM: batch 64's decoder, `outproj check`'s large-tile rows);
    // two ops at these sizes.
    for (m, n, k, act, residual, offset) in [
        (3, 5, 7, Relu, true, 0.0),
        (77, 512, 512, None, true, 0.0),
        (13, 70, 36, None, false, 0.0),
        (13, 70, 36, None, true, 1000.0),
        (129, 136, 72, GeluTanh, true, 3.0),
    ] {
        cases.push(Case::LinearLayerNorm {
            m,
            n,
            k,
            act,
            residual,
            offset,
        });
    }
    let attn = Case::attention;
    cases.extend([
        attn(1, 77, 77, 4, 128, false, false, true),
        attn(2, 77, 4, 4, 128, false, false, false),
        attn(3, 1, 1, 4, 128, false, false, true),
        attn(1, 3, 129, 2, 64, false, true, false),
        attn(2, 129, 129, 2, 64, true, false, true),
        attn(2, 77, 513, 1, 128, false, true, false),
        attn(1, 513, 77, 4, 64, true, true, false),
        attn(1, 5, 3, 3, 8, false, false, false),
        attn(2, 64, 64, 8, 64, false, true, true),
        // Few keys (CUDA's warp per query) with every option, at its bound.
        attn(2, 16, 16, 2, 32, true, true, true),
        // Head dim and strides not multiples of 4: the kernels' scalar paths.
        attn(1, 19, 23, 2, 6, true, true, false),
        attn(2, 9, 9, 3, 5, false, false, true),
    ]);
    // The projector's decoder cross-attention at batch 2 (image and video
    // presets' signal tokens), tiny rows (CUDA: a warp mostly idle), rows
    // of a width not a multiple of 4 or past 512 (CUDA: v1), heads x keys at
    // the bound, unaligned blocks, a large mean, more rows than a GPU holds
    // blocks (CUDA: blocks of several rows).
    for (batch, lq, lk, heads, cols, residual, packed, offset) in [
        (2, 77, 4, 4, 512, true, false, 0.0),
        (9, 77, 4, 2, 16, true, true, 0.0),
        (1, 77, 24, 4, 512, false, false, 0.0),
        (2, 77, 4, 4, 512, true, true, 0.0),
        (3, 5, 1, 1, 12, true, false, 0.0),
        (2, 3, 3, 2, 10, true, true, 0.0),
        (1, 9, 8, 16, 516, false, false, 0.0),
        (2, 7, 5, 3, 100, true, true, 1000.0),
    ] {
        cases.push(Case::AttentionAbsorbed {
            batch,
            lq,
            lk,
            heads,
            cols,
            residual,
            packed,
            offset,
        });
    }
    for &(batch, tokens, dim) in &[
        (1, 1, 1),
        (1, 77, 768),
        (3, 77, 1024),
        (2, 1, 512),
        (4, 3, 129),
    ] {
        for kind in [LossKind::TokenL2, LossKind::Mse] {
            cases.push(Case::AlignmentLoss {
                batch,
                tokens,
                dim,
                kind,
            });
        }
    }
    cases.push(Case::Gather {
        batch: 2,
        seq: 30,
        n: 4,
        channels: 4096,
        embeds: true,
    });
    cases.push(Case::Gather {
        batch: 3,
        seq: 7,
        n: 1,
        channels: 3,
        embeds: false,
    });
    cases.push(Case::Gather {
        batch: 1,
        seq: 77,
        n: 24,
        channels: 129,
        embeds: true,
    });
    cases
}

/// `count` cases of every op at sizes drawn from `seed`: mostly 1 to 9 (edges of
/// every register tile and vector width), some to 40, a few past 100 (several
/// tiles, blocks and split-K slices), with every flag drawn too. Each case is
/// small enough for the float64 reference (at most ~2 M multiply-adds).
pub fn random_cases(seed: u64, count: usize) -> Vec<Case> {
    use Activation::*;
    let mut rng = Rng::new(seed);
    let below = |rng: &mut Rng, n: u64| rng.next_u64() % n;
    // 1..=9 mostly, 1..=40 sometimes, 1..=130 (not for `small`) rarely.
    let size = |rng: &mut Rng, small: bool| -> usize {
        let top = match below(rng, 10) {
            0 if !small => 130,
            0..=2 => 40,
            _ => 9,
        };
        1 + below(rng, top) as usize
    };
    let mut cases = Vec::with_capacity(count);
    for _ in 0..count {
        let r = &mut rng;
        let (m, n, k) = (size(r, false), size(r, false), size(r, false));
        let (f1, f2, f3) = (below(r, 2) == 1, below(r, 2) == 1, below(r, 2) == 1);
        let act = [None, Relu, GeluErf, GeluTanh][below(r, 4) as usize];
        let offset = [0.0, 0.0, 100.0][below(r, 3) as usize];
        let (batch, heads, few) = (size(r, true).min(3), size(r, true).min(4), size(r, true));
        let op = below(r, 8);
        cases.push(match op {
            0 => Case::Linear {
                m,
                n,
                k,
                act,
                bias: f1,
                residual: f2,
            },
            1 => Case::LayerNorm {
                rows: m,
                cols: k,
                residual: f1,
                offset,
            },
            2 => Case::LayerNormLinear {
                m,
                n,
                k,
                act,
                residual: f1,
                offset,
            },
            3 => Case::LinearLayerNorm {
                m,
                n,
                k,
                act,
                residual: f1,
                offset,
            },
            4 => Case::Attention {
                batch,
                lq: m.min(40),
                // Packed: keys and values beside the queries, as many.
                lk: if f3 { m.min(40) } else { n.min(40) },
                heads,
                head_dim: k.min(64),
                causal: f1,
                mask: f2,
                packed: f3,
            },
            5 => Case::AttentionAbsorbed {
                batch,
                lq: m.min(40),
                // The op takes at most 128 scores a row.
                lk: few.min(128 / heads),
                heads,
                cols: k,
                residual: f1,
                packed: f2,
                offset,
            },
            6 => Case::AlignmentLoss {
                batch,
                tokens: m,
                dim: k,
                kind: if f1 { LossKind::TokenL2 } else { LossKind::Mse },
            },
            _ => Case::Gather {
                batch,
                seq: few + m.min(40) - 1,
                n: few,
                channels: k,
                embeds: f1,
            },
        });
    }
    cases
}

/// Most multiply-adds a [`random_projectors`] forward may take: about 30 ms
/// of the float64 reference.
pub const RANDOM_PROJECTOR_MACS: usize = 30_000_000;

/// `count` projectors of shapes drawn from `seed`, each with a batch: both
/// variants; 1 to 8 heads of 1 to 40 columns, now and then one or two of 129
/// to 140 (past the flash kernels' 128); widths, signal tokens and queries mostly 1
/// to 9, some to 40, now and then a preset's 77 queries or an input width past
/// 1024; 1 to 3 layers a stack; batch mostly 1 to 3, some to 9. So the few-row
/// and tiled GEMMs, the absorbed and literal cross-attention (heads x tokens
/// past 128), the folds and the decoder prefix all meet awkward sizes. Each
/// forward takes at most [`RANDOM_PROJECTOR_MACS`] multiply-adds; the
/// weights are [`ProjectorWeights::random_trained`]'s.
pub fn random_projectors(seed: u64, count: usize) -> Vec<(ProjectorConfig, usize)> {
    let mut rng = Rng::new(seed);
    let below = |rng: &mut Rng, n: u64| rng.next_u64() % n;
    // 1..=9 mostly, 1..=40 sometimes.
    let size = |rng: &mut Rng| {
        let top = if below(rng, 4) == 0 { 40 } else { 9 };
        1 + below(rng, top) as usize
    };
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let r = &mut rng;
        // Heads past 128 wide one or two at a time, or few would fit the bound.
        let (heads, head_dim) = if below(r, 8) == 0 {
            (1 + below(r, 2) as usize, 129 + below(r, 12) as usize)
        } else {
            ([1, 1, 2, 3, 4, 4, 5, 8][below(r, 8) as usize], size(r))
        };
        let in_dim = if below(r, 12) == 0 {
            1025 + below(r, 40) as usize
        } else {
            size(r) + below(r, 100) as usize
        };
        let n_out = if below(r, 8) == 0 { 77 } else { size(r) };
        let config = ProjectorConfig {
            variant: [Variant::Legacy, Variant::V15][below(r, 2) as usize],
            in_dim,
            d_model: heads * head_dim,
            heads,
            ffn_dim: size(r) + below(r, 100) as usize,
            encoder_layers: 1 + below(r, 3) as usize,
            decoder_layers: 1 + below(r, 3) as usize,
            n_out,
            out_dim: size(r) + below(r, 100) as usize,
            n_in: Some(size(r)),
            eps: [1e-5, 1e-6][below(r, 2) as usize],
        };
        let batch = size(r).min(if below(r, 3) == 0 { 9 } else { 3 });
        if projector_macs(&config, batch) <= RANDOM_PROJECTOR_MACS {
            out.push((config, batch));
        }
    }
    out
}

/// Multiply-adds of a forward of `c` at `batch` (the GEMMs' and attention's).
fn projector_macs(c: &ProjectorConfig, batch: usize) -> usize {
    let (d, ffn, n_in) = (c.d_model, c.ffn_dim, c.n_in.unwrap_or(4));
    let (enc, dec) = (batch * n_in, batch * c.n_out);
    let attention = |q, k| batch * q * k * d * 2;
    let encoder = enc * (4 * d * d + 2 * d * ffn) + attention(n_in, n_in);
    let decoder = dec * (6 * d * d + 2 * d * ffn)
        + enc * 2 * d * d
        + attention(c.n_out, c.n_out)
        + attention(c.n_out, n_in);
    enc * c.in_dim * d
        + c.encoder_layers * encoder
        + c.decoder_layers * decoder
        + dec * d * c.out_dim
}

/// Every op [`Case`] names, as [`Case::op`] gives it.
pub const OPS: [&str; 8] = [
    "linear",
    "layer_norm",
    "layer_norm_linear",
    "linear_layer_norm",
    "attention",
    "attention_absorbed",
    "alignment_loss",
    "gather_signal_tokens",
];

/// The tolerance of [`check_cases`] for `op` in f32: 1e-5 (f32 sums of up to a
/// few thousand terms against float64), 1e-7 for the gather (one rounding of a
/// sum of two f32).
pub fn f32_tolerance(op: &str) -> f64 {
    if op == "gather_signal_tokens" {
        1e-7
    } else {
        1e-5
    }
}

/// Cases long enough to exercise tiling over many key blocks (Lk up to 4096).
pub fn long_attention_cases() -> Vec<Case> {
    vec![
        Case::Attention {
            batch: 1,
            lq: 33,
            lk: 4096,
            heads: 2,
            head_dim: 64,
            causal: false,
            mask: true,
            packed: false,
        },
        Case::Attention {
            batch: 1,
            lq: 4096,
            lk: 17,
            heads: 1,
            head_dim: 128,
            causal: false,
            mask: false,
            packed: false,
        },
    ]
}

/// Random host tensors rounded to `dtype`, so the reference and the backend see
/// exactly the same numbers.
struct Inputs {
    rng: Rng,
    dtype: DType,
}

impl Inputs {
    fn tensor(&mut self, shape: &[usize], scale: f64, offset: f64) -> Result<HostTensor> {
        let n = checked_numel(shape, "verify input")?;
        let v: Vec<f64> = (0..n).map(|_| offset + scale * self.rng.normal()).collect();
        Ok(HostTensor::from_f64(shape.to_vec(), v)?.to_dtype(self.dtype))
    }
}

/// A tensor full of NaN on `be`: what a kernel does not write stays NaN.
pub fn poisoned<B: Backend>(be: &B, shape: &[usize]) -> Result<B::Tensor> {
    let n = checked_numel(shape, "poisoned output")?;
    be.upload(&HostTensor::from_f32(
        shape.to_vec(),
        try_filled(n, f32::NAN, "poisoned output")?,
    )?)
}

/// A case's inputs on the host, shared by the backend under test and the reference.
enum CaseInputs {
    Linear {
        x: HostTensor,
        w: HostTensor,
        b: Option<HostTensor>,
        residual: Option<HostTensor>,
        act: Activation,
    },
    LayerNorm(NormInputs),
    LayerNormLinear {
        norm: NormInputs,
        w: HostTensor,
        b: HostTensor,
        act: Activation,
    },
    LinearLayerNorm {
        x: HostTensor,
        w: HostTensor,
        b: HostTensor,
        act: Activation,
        residual: Option<HostTensor>,
        gamma: HostTensor,
        beta: HostTensor,
    },
    Attention {
        q: HostTensor,
        /// K and V packed side by side; `None`: Q, K, V all in `q`.
        kv: Option<HostTensor>,
        spec: AttentionSpec,
        mask: Option<KeyPaddingMask>,
    },
    AttentionAbsorbed {
        norm: NormInputs,
        /// Keys, values and key bias: one tensor holding all three (from
        /// `starts`), or three.
        kv: Vec<HostTensor>,
        starts: [usize; 3],
        out_bias: HostTensor,
        heads: usize,
        scale: f64,
        after: [HostTensor; 2],
    },
    Loss {
        pred: HostTensor,
        target: HostTensor,
        kind: LossKind,
    },
    Gather {
        hidden: HostTensor,
        embeds: Option<HostTensor>,
        positions: SignalPositions,
    },
}

/// A LayerNorm's inputs: `x + residual` normalised with `w` and `b`.
struct NormInputs {
    x: HostTensor,
    residual: Option<HostTensor>,
    w: HostTensor,
    b: HostTensor,
}

impl NormInputs {
    /// `rows x cols` of `x` around `offset`, a residual if asked, a weight
    /// near 1 and a small bias.
    fn new(
        inp: &mut Inputs,
        rows: usize,
        cols: usize,
        residual: bool,
        offset: f64,
    ) -> Result<Self> {
        Ok(NormInputs {
            x: inp.tensor(&[rows, cols], 1.0, offset)?,
            residual: residual
                .then(|| inp.tensor(&[rows, cols], 1.0, 0.0))
                .transpose()?,
            w: inp.tensor(&[cols], 0.2, 1.0)?,
            b: inp.tensor(&[cols], 0.1, 0.0)?,
        })
    }

    fn tensors_mut(&mut self) -> impl Iterator<Item = &mut HostTensor> {
        let NormInputs { x, residual, w, b } = self;
        [x, w, b].into_iter().chain(residual)
    }
}

impl CaseInputs {
    /// Every input tensor (not the masks and positions).
    fn tensors_mut(&mut self) -> Vec<&mut HostTensor> {
        match self {
            CaseInputs::Linear {
                x, w, b, residual, ..
            } => [x, w].into_iter().chain(b).chain(residual).collect(),
            CaseInputs::LayerNorm(norm) => norm.tensors_mut().collect(),
            CaseInputs::LayerNormLinear { norm, w, b, .. } => {
                norm.tensors_mut().chain([w, b]).collect()
            }
            CaseInputs::LinearLayerNorm {
                x,
                w,
                b,
                residual,
                gamma,
                beta,
                ..
            } => [x, w, b, gamma, beta].into_iter().chain(residual).collect(),
            CaseInputs::Attention { q, kv, .. } => std::iter::once(q).chain(kv).collect(),
            CaseInputs::AttentionAbsorbed {
                norm,
                kv,
                out_bias,
                after,
                ..
            } => norm
                .tensors_mut()
                .chain(kv)
                .chain(std::iter::once(out_bias))
                .chain(after)
                .collect(),
            CaseInputs::Loss { pred, target, .. } => vec![pred, target],
            CaseInputs::Gather { hidden, embeds, .. } => {
                std::iter::once(hidden).chain(embeds).collect()
            }
        }
    }
}

/// `case`'s inputs drawn from `seed`, rounded to `dtype`.
fn draw_inputs(case: &Case, dtype: DType, seed: u64) -> Result<CaseInputs> {
    let mut inp = Inputs {
        rng: Rng::new(seed),
        dtype,
    };
    case_inputs(case, &mut inp)
}

fn case_inputs(case: &Case, inp: &mut Inputs) -> Result<CaseInputs> {
    Ok(match *case {
        Case::Linear {
            m,
            n,
            k,
            act,
            bias,
            residual,
        } => CaseInputs::Linear {
            x: inp.tensor(&[m, k], 1.0, 0.0)?,
            w: inp.tensor(&[n, k], 1.0 / (k as f64).sqrt(), 0.0)?,
            b: bias.then(|| inp.tensor(&[n], 0.5, 0.0)).transpose()?,
            residual: residual
                .then(|| inp.tensor(&[m, n], 1.0, 0.0))
                .transpose()?,
            act,
        },
        Case::LayerNorm {
            rows,
            cols,
            residual,
            offset,
        } => CaseInputs::LayerNorm(NormInputs::new(inp, rows, cols, residual, offset)?),
        Case::LayerNormLinear {
            m,
            n,
            k,
            act,
            residual,
            offset,
        } => CaseInputs::LayerNormLinear {
            norm: NormInputs::new(inp, m, k, residual, offset)?,
            w: inp.tensor(&[n, k], 1.0 / (k as f64).sqrt(), 0.0)?,
            b: inp.tensor(&[n], 0.5, 0.0)?,
            act,
        },
        Case::LinearLayerNorm {
            m,
            n,
            k,
            act,
            residual,
            offset,
        } => CaseInputs::LinearLayerNorm {
            x: inp.tensor(&[m, k], 1.0, 0.0)?,
            w: inp.tensor(&[n, k], 1.0 / (k as f64).sqrt(), 0.0)?,
            b: inp.tensor(&[n], 0.5, 0.0)?,
            act,
            residual: residual
                .then(|| inp.tensor(&[m, n], 1.0, offset))
                .transpose()?,
            gamma: inp.tensor(&[n], 0.2, 1.0)?,
            beta: inp.tensor(&[n], 0.1, 0.0)?,
        },
        Case::Attention {
            batch,
            lq,
            lk,
            heads,
            head_dim,
            causal,
            mask,
            packed,
        } => {
            let c = heads * head_dim;
            let (q, kv) = if packed {
                (inp.tensor(&[batch, lq, 3 * c], 1.0, 0.0)?, None)
            } else {
                let q = inp.tensor(&[batch, lq, c], 1.0, 0.0)?;
                (q, Some(inp.tensor(&[batch, lk, 2 * c], 1.0, 0.0)?))
            };
            let mask = if mask {
                // Random keys ignored, key 0 kept, so no row is fully masked; but
                // with `causal`, key 0 of sequence 0 is ignored too, which leaves
                // its query 0 with no visible key at all (output: zeros).
                let ignore = (0..batch * lk)
                    .map(|i| (causal && i == 0) || (i % lk != 0 && inp.rng.uniform() < 0.4))
                    .collect();
                Some(KeyPaddingMask::new(batch, lk, ignore)?)
            } else {
                None
            };
            let mut spec = AttentionSpec::new(heads, head_dim);
            spec.causal = causal;
            CaseInputs::Attention { q, kv, spec, mask }
        }
        Case::AttentionAbsorbed {
            batch,
            lq,
            lk,
            heads,
            cols,
            residual,
            packed,
            offset,
        } => {
            let norm = NormInputs::new(inp, batch * lq, cols, residual, offset)?;
            let shape = [batch, lq, cols];
            let norm = NormInputs {
                x: norm.x.reshape(shape.to_vec())?,
                residual: norm
                    .residual
                    .map(|r| r.reshape(shape.to_vec()))
                    .transpose()?,
                ..norm
            };
            // Keys scaled so that the scores are O(1), values O(1).
            let (wide, ks) = (heads * cols, 1.0 / (cols as f64).sqrt());
            let (kv, starts) = if packed {
                let width = 3 + 2 * wide + heads + 1;
                let t = inp.tensor(&[batch, lk, width], ks, 0.0)?;
                (vec![t], [3, 3 + wide, 3 + 2 * wide])
            } else {
                let keys = inp.tensor(&[batch, lk, wide], ks, 0.0)?;
                let values = inp.tensor(&[batch, lk, wide], 1.0, 0.0)?;
                let bias = inp.tensor(&[batch, lk, heads], 0.5, 0.0)?;
                (vec![keys, values, bias], [0, 0, 0])
            };
            CaseInputs::AttentionAbsorbed {
                norm,
                kv,
                starts,
                out_bias: inp.tensor(&[cols], 0.5, 0.0)?,
                heads,
                scale: 0.8,
                after: [
                    inp.tensor(&[cols], 0.2, 1.0)?,
                    inp.tensor(&[cols], 0.1, 0.0)?,
                ],
            }
        }
        Case::AlignmentLoss {
            batch,
            tokens,
            dim,
            kind,
        } => CaseInputs::Loss {
            pred: inp.tensor(&[batch, tokens, dim], 1.0, 0.0)?,
            target: inp.tensor(&[batch, tokens, dim], 1.0, 0.0)?,
            kind,
        },
        Case::Gather {
            batch,
            seq,
            n,
            channels,
            embeds,
        } => {
            let hidden = inp.tensor(&[batch, seq, channels], 1.0, 0.0)?;
            let embeds = embeds
                .then(|| inp.tensor(&[batch, seq, channels], 1.0, 0.0))
                .transpose()?;
            // Signal ids 1000.., starting 3 tokens later in each sequence than in
            // the one before, modulo the room there is.
            let signal: Vec<i64> = (0..n as i64).map(|i| 1000 + i).collect();
            let mut ids = vec![7i64; batch * seq];
            for b in 0..batch {
                let start = (b * 3) % (seq - n + 1);
                for (i, &id) in signal.iter().enumerate() {
                    ids[b * seq + start + i] = id;
                }
            }
            let positions = SignalPositions::find(&ids, batch, seq, &signal)?;
            CaseInputs::Gather {
                hidden,
                embeds,
                positions,
            }
        }
    })
}

/// Run a case on `be`, every output poisoned first; the outputs on the host.
fn run_case<B: Backend>(be: &B, inputs: &CaseInputs) -> Result<Vec<HostTensor>> {
    let up = |t: &HostTensor| be.upload(t);
    let opt = |t: &Option<HostTensor>| t.as_ref().map(|t| be.upload(t)).transpose();
    match inputs {
        CaseInputs::Linear {
            x,
            w,
            b,
            residual,
            act,
        } => {
            let mut out = poisoned(be, &[x.shape()[0], w.shape()[0]])?;
            let (b, r) = (opt(b)?, opt(residual)?);
            be.linear(
                &up(x)?,
                &be.upload_weight(w)?,
                b.as_ref(),
                *act,
                r.as_ref(),
                &mut out,
            )?;
            Ok(vec![be.download(&out)?])
        }
        CaseInputs::LayerNorm(NormInputs { x, residual, w, b }) => {
            let mut y = poisoned(be, x.shape())?;
            let mut sum = poisoned(be, x.shape())?;
            let r = opt(residual)?;
            let sum_out = if residual.is_some() {
                Some(&mut sum)
            } else {
                None
            };
            be.layer_norm(&up(x)?, r.as_ref(), &up(w)?, &up(b)?, 1e-5, &mut y, sum_out)?;
            // Compared: the normalised output, and the sum where a residual is added.
            let mut outs = vec![be.download(&y)?];
            if residual.is_some() {
                outs.push(be.download(&sum)?);
            }
            Ok(outs)
        }
        CaseInputs::LayerNormLinear { norm, w, b, act } => {
            let NormInputs {
                x,
                residual,
                w: gamma,
                b: beta,
            } = norm;
            let (m, n) = (x.shape()[0], w.shape()[0]);
            let mut out = poisoned(be, &[m, n])?;
            let mut sum = poisoned(be, x.shape())?;
            let mut h = poisoned(be, x.shape())?;
            let (xt, r, gt, bt) = (up(x)?, opt(residual)?, up(gamma)?, up(beta)?);
            let input = NormInput {
                x: &xt,
                residual: r.as_ref(),
                weight: &gt,
                bias: &bt,
                eps: 1e-5,
            };
            let (wt, lb) = (be.upload_weight(w)?, up(b)?);
            be.layer_norm_linear(
                input,
                Some(&mut sum),
                &mut h,
                &wt,
                Some(&lb),
                *act,
                &mut out,
            )?;
            // Compared: the output and the sum (`h` is scratch).
            Ok(vec![be.download(&out)?, be.download(&sum)?])
        }
        CaseInputs::LinearLayerNorm {
            x,
            w,
            b,
            act,
            residual,
            gamma,
            beta,
        } => {
            let shape = [x.shape()[0], w.shape()[0]];
            let mut out = poisoned(be, &shape)?;
            let mut sum = poisoned(be, &shape)?;
            let mut y = poisoned(be, &shape)?;
            let (r, gt, bt) = (opt(residual)?, up(gamma)?, up(beta)?);
            let norm = NormAfter {
                residual: r.as_ref(),
                weight: &gt,
                bias: &bt,
                eps: 1e-5,
            };
            let (xt, wt, lb) = (up(x)?, be.upload_weight(w)?, up(b)?);
            let sum_out = Some(&mut sum);
            be.linear_layer_norm(&xt, &wt, Some(&lb), *act, &mut y, norm, sum_out, &mut out)?;
            // Compared: the norm and the sum (`y` is scratch).
            Ok(vec![be.download(&out)?, be.download(&sum)?])
        }
        CaseInputs::Attention { q, kv, spec, mask } => {
            let c = spec.heads * spec.head_dim;
            let qt = up(q)?;
            let kvt = opt(kv)?;
            let mask = mask.as_ref().map(|m| be.upload_mask(m)).transpose()?;
            let (k, v) = match &kvt {
                Some(kv) => (Cols::new(kv, 0), Cols::new(kv, c)),
                None => (Cols::new(&qt, c), Cols::new(&qt, 2 * c)),
            };
            let mut out = poisoned(be, &[q.shape()[0], q.shape()[1], c])?;
            be.attention(Cols::new(&qt, 0), k, v, spec, mask.as_ref(), &mut out)?;
            Ok(vec![be.download(&out)?])
        }
        CaseInputs::AttentionAbsorbed {
            norm,
            kv,
            starts,
            out_bias,
            heads,
            scale,
            after,
        } => {
            let NormInputs { x, residual, w, b } = norm;
            let (xt, r, wt, bt) = (up(x)?, opt(residual)?, up(w)?, up(b)?);
            let kv = kv.iter().map(up).collect::<Result<Vec<_>>>()?;
            // One tensor serves all three blocks, or each has its own.
            let block = |i: usize| -> Result<Cols<'_, B::Tensor>> {
                let t = kv.get(i).or(kv.first()).ok_or_else(|| {
                    crate::error::Error::invalid("attention_absorbed case without keys")
                })?;
                Ok(Cols::new(t, starts[i]))
            };
            let (ob, aw, ab) = (up(out_bias)?, up(&after[0])?, up(&after[1])?);
            let input = NormInput {
                x: &xt,
                residual: r.as_ref(),
                weight: &wt,
                bias: &bt,
                eps: 1e-5,
            };
            let attn = AbsorbedAttentionInput {
                keys: block(0)?,
                values: block(1)?,
                key_bias: block(2)?,
                out_bias: &ob,
                heads: *heads,
                scale: *scale,
            };
            let after = NormAfter {
                residual: None,
                weight: &aw,
                bias: &ab,
                eps: 1e-5,
            };
            let mut stream = poisoned(be, x.shape())?;
            let mut out = poisoned(be, x.shape())?;
            be.attention_absorbed(input, attn, after, &mut stream, &mut out)?;
            Ok(vec![be.download(&out)?, be.download(&stream)?])
        }
        CaseInputs::Loss { pred, target, kind } => {
            let mut loss = poisoned(be, &[1])?;
            let mut grad = poisoned(be, pred.shape())?;
            be.alignment_loss(*kind, &up(pred)?, &up(target)?, &mut loss, &mut grad)?;
            Ok(vec![be.download(&loss)?, be.download(&grad)?])
        }
        CaseInputs::Gather {
            hidden,
            embeds,
            positions,
        } => {
            let (batch, channels) = (hidden.shape()[0], hidden.shape()[2]);
            let mut out = poisoned(be, &[batch, positions.count(), channels])?;
            let e = opt(embeds)?;
            be.gather_signal_tokens(&up(hidden)?, e.as_ref(), positions, &mut out)?;
            Ok(vec![be.download(&out)?])
        }
    }
}

/// Run `case` on `be` and on the reference with the same random inputs (rounded to
/// `dtype`, the backend's storage type) and compare every output.
pub fn compare_case<B: Backend>(
    be: &B,
    case: &Case,
    dtype: DType,
    seed: u64,
) -> Result<Comparison> {
    let inputs = draw_inputs(case, dtype, seed)?;
    let got = run_case(be, &inputs)?;
    let want = run_case(&Reference, &inputs)?;
    let mut worst = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(&want) {
        let (rel, max_abs) = if g.shape() == w.shape() {
            compare(&g.to_f64_vec(), &w.to_f64_vec())
        } else {
            (f64::INFINITY, f64::INFINITY)
        };
        worst = (worst.0.max(rel), worst.1.max(max_abs));
    }
    Ok(Comparison {
        op: case.op(),
        case: case.describe(),
        rel: worst.0,
        max_abs: worst.1,
    })
}

/// `case`'s outputs on `be` (every one poisoned first) for the inputs
/// [`compare_case`] draws from `seed` in `dtype`: for comparing two backends,
/// or two settings of one, bit for bit.
pub fn case_outputs<B: Backend>(
    be: &B,
    case: &Case,
    dtype: DType,
    seed: u64,
) -> Result<Vec<HostTensor>> {
    run_case(be, &draw_inputs(case, dtype, seed)?)
}

/// Every case of `cases` for `op` on `be` against the reference ([`compare_case`],
/// inputs rounded to `dtype`, case `i` drawn from `seed + i`), each within `tol`:
/// how many there were, or a line naming the first that failed to run or to
/// agree.
pub fn check_cases<B: Backend>(
    be: &B,
    cases: &[Case],
    op: &str,
    dtype: DType,
    seed: u64,
    tol: f64,
) -> std::result::Result<usize, String> {
    check_cases_by(be, cases, op, dtype, seed, tol, |_, _| Ok(tol))
}

/// [`check_cases`] where a case past `tol` may be held to a wider bound,
/// `wider(case, its seed)`, asked only then (it may cost more than the case).
fn check_cases_by<B: Backend>(
    be: &B,
    cases: &[Case],
    op: &str,
    dtype: DType,
    seed: u64,
    tol: f64,
    mut wider: impl FnMut(&Case, u64) -> Result<f64>,
) -> std::result::Result<usize, String> {
    let mine: Vec<&Case> = cases.iter().filter(|c| c.op() == op).collect();
    for (i, case) in mine.iter().enumerate() {
        let seed = seed + i as u64;
        let failed = |e| format!("{dtype} {}: {e}", case.describe());
        let r = compare_case(be, case, dtype, seed).map_err(failed)?;
        let tol = if r.rel <= tol {
            tol
        } else {
            wider(case, seed).map_err(failed)?
        };
        if r.rel.is_nan() || r.rel > tol {
            return Err(format!(
                "{dtype} {} {}: rel {:.3e} max_abs {:.3e} (tolerance {tol:.1e})",
                r.op, r.case, r.rel, r.max_abs
            ));
        }
    }
    Ok(mine.len())
}

/// How far the reference's outputs move, `||ref' - ref|| / ||ref||` (the
/// worst over its outputs and over [`SPREAD_DRAWS`] draws), when every input
/// of `case` (as [`compare_case`] draws it from `seed`) is moved by half of
/// `eps` of itself, up or down at random: about what rounding each input to a
/// type of machine epsilon `eps` alone can do (a rounding moves a value by at
/// most that much). A well-conditioned case spreads by about `eps / 2`; a
/// LayerNorm over two nearly equal columns, or a sum of a few terms that
/// cancel, by far more.
pub fn rounding_spread(case: &Case, dtype: DType, seed: u64, eps: f64) -> Result<f64> {
    let draw = || draw_inputs(case, dtype, seed);
    let want = run_case(&Reference, &draw()?)?;
    let mut signs = spread_signs(seed);
    let mut spread = 0.0f64;
    for _ in 0..SPREAD_DRAWS {
        let mut inputs = draw()?;
        for t in inputs.tensors_mut() {
            *t = moved_by(t, eps, &mut signs)?;
        }
        for (g, w) in run_case(&Reference, &inputs)?.iter().zip(&want) {
            spread = spread.max(compare(&g.to_f64_vec(), &w.to_f64_vec()).0);
        }
    }
    Ok(spread)
}

/// The random signs of a spread's moves: a stream apart from the inputs'
/// (the golden ratio's bits).
fn spread_signs(seed: u64) -> Rng {
    Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15)
}

/// `t` with every element moved by half of `eps` of itself, up or down as
/// `signs` says, in float64.
fn moved_by(t: &HostTensor, eps: f64, signs: &mut Rng) -> Result<HostTensor> {
    let moved = t
        .to_f64_vec()
        .into_iter()
        .map(|v| {
            let up = signs.next_u64() & 1 == 1;
            v * (1.0 + if up { eps / 2.0 } else { -eps / 2.0 })
        })
        .collect();
    HostTensor::from_f64(t.shape().to_vec(), moved)
}

/// Draws of [`rounding_spread`]: its worst of a few, so that one lucky draw
/// whose moves cancel does not understate the spread.
pub const SPREAD_DRAWS: usize = 3;

/// How many times its [`rounding_spread`] [`check_cases_rounded`] lets a
/// case's error be. A kernel with 16-bit storage rounds at more points than
/// its inputs (a residual sum before its norm, a GEMM's output before the
/// norm after it, attention's probabilities before the values on tensor
/// cores), each a move of up to half an epsilon like the inputs', and its
/// roundings can line up where random moves partly cancel. Measured over
/// the cases past the precision's tolerance: at most 2.6x on the CPU (bf16
/// and f16 weights, 200 draws of 400 cases), 1.3x in CUDA's bf16, f16 and
/// TF32 on the emulated driver and 0.1x in wgpu's f16 on lavapipe (25 draws
/// each). (The rounding of the outputs themselves, which the spread leaves
/// out, is what the tolerance beside it covers.)
pub const SPREAD_FACTOR: f64 = 4.0;

/// [`check_cases`] for a backend that rounds to a type of machine epsilon
/// `eps` (f16 or bf16 storage, TF32 products), at sizes where one rounding
/// can move a tiny output by more than `tol` of itself (a GELU near zero
/// after a few products that cancel): each case within `tol`, or within
/// [`SPREAD_FACTOR`] times its [`rounding_spread`] where that is more (the
/// spread, four runs of the reference, computed only for a case past `tol`).
/// What the cases were held to; or a line naming the first that failed.
pub fn check_cases_rounded<B: Backend>(
    be: &B,
    cases: &[Case],
    op: &str,
    dtype: DType,
    seed: u64,
    tol: f64,
    eps: f64,
) -> std::result::Result<RoundedBounds, String> {
    let mut loose = 0;
    let n = check_cases_by(be, cases, op, dtype, seed, tol, |case, seed| {
        let bound = rounded_bound(case, dtype, seed, tol, eps)?;
        loose += usize::from(case.offset() == 0.0 && bound > LOOSE_BOUND);
        Ok(bound)
    })?;
    let centred = cases
        .iter()
        .filter(|c| c.op() == op && c.offset() == 0.0)
        .count();
    Ok(RoundedBounds {
        cases: n,
        centred,
        loose,
    })
}

/// [`check_cases_rounded`] for every op of [`OPS`], each of which must have
/// a case among `cases`: what the cases were held to, all ops together.
pub fn check_ops_rounded<B: Backend>(
    be: &B,
    cases: &[Case],
    dtype: DType,
    seed: u64,
    tol: f64,
    eps: f64,
) -> std::result::Result<RoundedBounds, String> {
    let mut held = RoundedBounds::default();
    for op in OPS {
        let h = check_cases_rounded(be, cases, op, dtype, seed, tol, eps)?;
        if h.cases == 0 {
            return Err(format!("no case for {op}"));
        }
        held += h;
    }
    Ok(held)
}

/// The bound [`check_cases_rounded`] holds `case` to (inputs drawn as
/// [`compare_case`] draws them from `seed`): `tol`, or [`SPREAD_FACTOR`]
/// times its [`rounding_spread`] where that is more.
pub fn rounded_bound(case: &Case, dtype: DType, seed: u64, tol: f64, eps: f64) -> Result<f64> {
    Ok(tol.max(SPREAD_FACTOR * rounding_spread(case, dtype, seed, eps)?))
}

/// A bound of [`check_cases_rounded`] over which a case says little: it
/// would pass an output a tenth off.
pub const LOOSE_BOUND: f64 = 0.1;

/// What [`check_cases_rounded`] held its cases to: how many there were, how
/// many had no offset ([`Case::offset`] 0), and how many of those passed
/// only by a bound of more than [`LOOSE_BOUND`] (a case within `tol` was held
/// to `tol`).
///
/// Cases with an offset are left out of the count: at a mean of 100, one
/// 16-bit rounding moves an input by 0.03-0.4 on a spread of 1, so the
/// reference's spread, and the bound, are that large. Their accuracy is
/// checked in f32 (within 1e-5 of the reference) and in 16 bits by the
/// standard cases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundedBounds {
    /// Cases checked.
    pub cases: usize,
    /// Cases without an offset.
    pub centred: usize,
    /// Cases without an offset past `tol`, held to more than [`LOOSE_BOUND`].
    pub loose: usize,
}

impl RoundedBounds {
    /// Whether the check had teeth: at most 1 in 50 cases without an offset
    /// held to more than [`LOOSE_BOUND`].
    pub fn tight(&self) -> bool {
        self.loose * 50 <= self.centred
    }
}

impl std::ops::AddAssign for RoundedBounds {
    fn add_assign(&mut self, other: Self) {
        self.cases += other.cases;
        self.centred += other.centred;
        self.loose += other.loose;
    }
}

impl std::fmt::Display for RoundedBounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cases, {} without an offset, {} of those held to more than {LOOSE_BOUND}",
            self.cases, self.centred, self.loose
        )
    }
}

/// The whole projector on `be` against the reference, with the same random
/// weights and inputs (rounded to `dtype`).
pub fn compare_projector<B: Backend>(
    be: &B,
    config: &ProjectorConfig,
    batch: usize,
    dtype: DType,
    seed: u64,
) -> Result<Comparison> {
    compare_projector_by(be, config, batch, dtype, seed, "projector", |p, h, e| {
        be.download(&p.forward(h, Some(e))?)
    })
}

/// The random weights and inputs of a projector comparison, rounded to a
/// storage type, and the case's name.
pub struct ProjectorCase {
    /// The projector's weights: [`ProjectorWeights::random_trained`] of the seed, every
    /// tensor rounded to the storage type.
    pub weights: ProjectorWeights,
    /// Signal-token hidden states `[batch, n_in, in_dim]`, standard normal,
    /// rounded to the storage type (`n_in` is the config's, or 4 where it has
    /// none).
    pub hidden: HostTensor,
    /// Their input embeddings, the same shape and drawn the same way; the
    /// forward adds them to `hidden`.
    pub embeds: HostTensor,
    /// The case in words: variant, input tokens x width, output tokens x width
    /// and batch, e.g. `legacy 4x4096->77x768 batch 2`, with heads x head
    /// width, FFN width and layers where they are not the presets'.
    pub name: String,
}

impl ProjectorCase {
    /// `batch` sequences of `config`'s input tokens, weights and inputs drawn
    /// from `seed` and rounded to `dtype`.
    pub fn new(config: &ProjectorConfig, batch: usize, dtype: DType, seed: u64) -> Result<Self> {
        let w = ProjectorWeights::random_trained(config.clone(), None, seed)?;
        let rounded = w
            .tensors()
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(dtype)))
            .collect();
        let weights = ProjectorWeights::from_tensors(config.clone(), None, rounded)?;
        let n_in = config.n_in.unwrap_or(4);
        let mut inp = Inputs {
            rng: Rng::new(seed ^ 0x5eed),
            dtype,
        };
        let hidden = inp.tensor(&[batch, n_in, config.in_dim], 1.0, 0.0)?;
        let embeds = inp.tensor(&[batch, n_in, config.in_dim], 1.0, 0.0)?;
        // The Transformer's own shape where it is not the presets'.
        let c = config;
        let body = (
            c.d_model,
            c.heads,
            c.ffn_dim,
            c.encoder_layers,
            c.decoder_layers,
        );
        let body = if body == (512, 4, 2048, 4, 4) {
            String::new()
        } else {
            format!(
                " ({}x{} heads, ffn {}, {}+{} layers)",
                c.heads,
                c.head_dim(),
                c.ffn_dim,
                c.encoder_layers,
                c.decoder_layers
            )
        };
        let name = format!(
            "{} {}x{}->{}x{}{body} batch {batch}",
            c.variant.name(),
            n_in,
            c.in_dim,
            c.n_out,
            c.out_dim
        );
        Ok(ProjectorCase {
            weights,
            hidden,
            embeds,
            name,
        })
    }

    /// The case on `be`: `forward` gets the projector and the uploaded
    /// hidden states and embeddings, and returns its output.
    pub fn run<B: Backend, T>(
        &self,
        be: &B,
        forward: impl FnOnce(&Projector<B>, &B::Tensor, &B::Tensor) -> Result<T>,
    ) -> Result<T> {
        let p = Projector::new(be.clone(), &self.weights)?;
        forward(&p, &be.upload(&self.hidden)?, &be.upload(&self.embeds)?)
    }
}

/// [`compare_projector`] with `be`'s forward done by `forward` (projector,
/// hidden, embeds; returns the downloaded output), e.g. through a captured
/// graph; reported as `op`.
pub fn compare_projector_by<B: Backend>(
    be: &B,
    config: &ProjectorConfig,
    batch: usize,
    dtype: DType,
    seed: u64,
    op: &'static str,
    forward: impl FnOnce(&Projector<B>, &B::Tensor, &B::Tensor) -> Result<HostTensor>,
) -> Result<Comparison> {
    let case = ProjectorCase::new(config, batch, dtype, seed)?;
    let got = case.run(be, forward)?;
    let want = case.run(&Reference, |p, h, e| p.forward(h, Some(e)))?;
    let (rel, max_abs) = if got.shape() == want.shape() {
        compare(&got.to_f64_vec(), want.data())
    } else {
        (f64::INFINITY, f64::INFINITY)
    };
    Ok(Comparison {
        op,
        case: case.name,
        rel,
        max_abs,
    })
}

/// Every projector of `shapes` (config and batch, e.g. [`random_projectors`])
/// on `be` against the reference ([`compare_projector`], inputs and weights
/// rounded to `dtype`, shape `i` drawn from `seed + i`), each held to `tol`
/// or, where a shape is past `tol`, to [`SPREAD_FACTOR`] times its
/// [`projector_spread`] for the precision's epsilon `eps` where that is more: a
/// Transformer a few columns wide normalises rows of nearly equal values,
/// where one rounding moves the output by far more than in the presets. The
/// shape furthest past its bound (a NaN furthest of all) and that bound, or a
/// line naming the shape that failed to run.
pub fn worst_projector<B: Backend>(
    be: &B,
    shapes: &[(ProjectorConfig, usize)],
    dtype: DType,
    seed: u64,
    tol: f64,
    eps: f64,
) -> std::result::Result<(Comparison, f64), String> {
    let mut worst: Option<(Comparison, f64)> = None;
    for (i, (config, batch)) in shapes.iter().enumerate() {
        let seed = seed + i as u64;
        let failed = |e| format!("{dtype} projector {config:?} batch {batch}: {e}");
        let r = compare_projector(be, config, *batch, dtype, seed).map_err(failed)?;
        // The spread costs four runs of the reference: only past `tol`.
        let bound = if r.rel > tol {
            let spread = projector_spread(config, *batch, dtype, seed, eps).map_err(failed)?;
            tol.max(SPREAD_FACTOR * spread)
        } else {
            tol
        };
        let worse = |(w, b): &(Comparison, f64)| r.rel.is_nan() || r.rel / bound > w.rel / b;
        if worst.as_ref().is_none_or(worse) {
            worst = Some((r, bound));
        }
    }
    worst.ok_or_else(|| "no projector shapes".to_string())
}

/// [`worst_projector`], each shape within its bound: the worst comparison and
/// its bound, or a line naming the shape that failed to run or to agree.
pub fn check_projectors<B: Backend>(
    be: &B,
    shapes: &[(ProjectorConfig, usize)],
    dtype: DType,
    seed: u64,
    tol: f64,
    eps: f64,
) -> std::result::Result<(Comparison, f64), String> {
    let (w, bound) = worst_projector(be, shapes, dtype, seed, tol, eps)?;
    if w.rel.is_nan() || w.rel > bound {
        return Err(format!(
            "{dtype} projector {}: rel {:.3e} max_abs {:.3e} (bound {bound:.1e})",
            w.case, w.rel, w.max_abs
        ));
    }
    Ok((w, bound))
}

/// [`rounding_spread`] of a whole projector: how far the reference's output
/// moves when every weight and input of the [`compare_projector`] case
/// (`config` at `batch`, drawn from `seed` in `dtype`) is moved by half of
/// `eps` of itself (the worst of [`SPREAD_DRAWS`] draws).
pub fn projector_spread(
    config: &ProjectorConfig,
    batch: usize,
    dtype: DType,
    seed: u64,
    eps: f64,
) -> Result<f64> {
    let case = ProjectorCase::new(config, batch, dtype, seed)?;
    let forward = |p: &Projector<Reference>, h: &RefTensor, e: &RefTensor| p.forward(h, Some(e));
    let want = case.run(&Reference, forward)?;
    let mut signs = spread_signs(seed);
    let mut spread = 0.0f64;
    for _ in 0..SPREAD_DRAWS {
        let weights = case
            .weights
            .tensors()
            .iter()
            .map(|(k, t)| Ok((k.clone(), moved_by(t, eps, &mut signs)?)))
            .collect::<Result<_>>()?;
        let moved = ProjectorCase {
            weights: ProjectorWeights::from_tensors(config.clone(), None, weights)?,
            hidden: moved_by(&case.hidden, eps, &mut signs)?,
            embeds: moved_by(&case.embeds, eps, &mut signs)?,
            name: String::new(),
        };
        let got = moved.run(&Reference, forward)?;
        spread = spread.max(compare(got.data(), want.data()).0);
    }
    Ok(spread)
}

/// One projector forwarding from a thread per batch of `batches` at once,
/// its first forwards among them (they absorb the cross-attention and build
/// each batch's decoder prefix), each thread through a plan of its own
/// reused for three inputs in turn (`hidden` with its embeddings, `hidden`
/// alone, with them again): the same bits as plain forwards, one at a time,
/// on a projector of its own. The projector is the image preset's but 64
/// wide (64 inputs, 4 heads, FFN 96, 2 + 2 layers), with
/// [`ProjectorWeights::random_trained`] weights. `Err` names the batch and
/// input that differed or failed.
pub fn check_threads<B>(be: &B, batches: &[usize], seed: u64) -> std::result::Result<(), String>
where
    B: Backend + Send + Sync,
    B::Tensor: Send + Sync,
    B::Mask: Send + Sync,
{
    let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let config = &ProjectorConfig {
        in_dim: 64,
        d_model: 64,
        ffn_dim: 96,
        encoder_layers: 2,
        decoder_layers: 2,
        ..image
    };
    let failed = |batch: usize| move |e: crate::Error| format!("batch {batch}: {e}");
    let cases = batches
        .iter()
        .map(|&b| ProjectorCase::new(config, b, DType::F32, seed).map_err(failed(b)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let bits = |y: &B::Tensor| -> Result<Vec<u32>> {
        let y = be.download(y)?;
        Ok(y.to_f32_vec().iter().map(|x| x.to_bits()).collect())
    };
    let with_embeds = [true, false, true];
    let weights = &cases.first().ok_or("no batches")?.weights;
    let alone = Projector::new(be.clone(), weights).map_err(|e| e.to_string())?;
    let mut want = Vec::new();
    for (case, &b) in cases.iter().zip(batches) {
        let (h, e) = (be.upload(&case.hidden), be.upload(&case.embeds));
        let (h, e) = (h.map_err(failed(b))?, e.map_err(failed(b))?);
        let plain = |embeds| bits(&alone.forward(&h, embeds)?);
        let with = plain(Some(&e)).map_err(failed(b))?;
        let without = plain(None).map_err(failed(b))?;
        want.push(with_embeds.map(|w| if w { with.clone() } else { without.clone() }));
    }
    let shared = Projector::new(be.clone(), weights).map_err(|e| e.to_string())?;
    let planned = |case: &ProjectorCase, b: usize, want: &[Vec<u32>; 3]| -> Result<Option<usize>> {
        let (h, e) = (be.upload(&case.hidden)?, be.upload(&case.embeds)?);
        let mut plan = shared.plan(b, case.hidden.shape()[1])?;
        for (i, (&embeds, want)) in with_embeds.iter().zip(want).enumerate() {
            let y = shared.forward_with(&mut plan, &h, embeds.then_some(&e))?;
            if bits(y)? != *want {
                return Ok(Some(i));
            }
        }
        Ok(None)
    };
    std::thread::scope(|s| {
        let threads: Vec<_> = cases
            .iter()
            .zip(batches)
            .zip(&want)
            .map(|((case, &b), want)| {
                s.spawn(move || match planned(case, b, want).map_err(failed(b))? {
                    Some(i) => Err(format!("batch {b}: input {i} of the plan differs")),
                    None => Ok(()),
                })
            })
            .collect();
        threads.into_iter().try_for_each(|t| {
            t.join()
                .unwrap_or_else(|_| Err("a forwarding thread panicked".into()))
        })
    })
}

/// A norm case's name suffix: the residual, and the rows' mean where it is offset.
fn norm_suffix(residual: bool, offset: f64) -> String {
    let res = if residual { " +res" } else { "" };
    if offset != 0.0 {
        format!("{res} mean {offset}")
    } else {
        res.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 40 shapes each seed in use draws (the CPU's, wgpu's and CUDA's
    /// tests, `outproj check`) reach each of the projector's paths: heads
    /// past the flash kernels' width, the cross-attention's scores past the
    /// absorbed op's 128 a row, inputs past K = 1024, the presets' 77
    /// queries, stacks of more than 16 rows, both variants; every one valid
    /// and within the cost bound.
    #[test]
    fn random_projectors_reach_every_path() {
        for seed in [43, 44, 45, 57] {
            reached_by(&random_projectors(seed, 40));
        }
    }

    fn reached_by(shapes: &[(ProjectorConfig, usize)]) {
        let count = |f: &dyn Fn(&ProjectorConfig, usize) -> bool| {
            shapes.iter().filter(|(c, b)| f(c, *b)).count()
        };
        for (c, b) in shapes {
            // A unit test of the generator (in `mod tests`, never built for a
            // caller): an invalid shape is its failure.
            c.validate().unwrap();
            assert!(projector_macs(c, *b) <= RANDOM_PROJECTOR_MACS);
        }
        let reached = [
            ("head width past 128", count(&|c, _| c.head_dim() > 128)),
            (
                "scores past 128",
                count(&|c, _| c.heads * c.n_in.unwrap_or(4) > 128),
            ),
            ("input width past 1024", count(&|c, _| c.in_dim > 1024)),
            ("77 queries", count(&|c, _| c.n_out == 77)),
            ("decoder past 16 rows", count(&|c, b| c.n_out * b > 16)),
            (
                "encoder past 16 rows",
                count(&|c, b| c.n_in.unwrap_or(4) * b > 16),
            ),
            ("v1.5", count(&|c, _| c.variant == Variant::V15)),
            ("legacy", count(&|c, _| c.variant == Variant::Legacy)),
            ("batch past 3", count(&|_, b| b > 3)),
        ];
        println!("{reached:?}");
        for (what, n) in reached {
            assert!(n > 0, "no shape with {what}: {shapes:?}");
        }
    }
}
