//! The op set every backend implements, and the shape rules every backend shares.
//!
//! Tensors are row-major; a "row" is the last dimension. Weights use PyTorch's
//! layout (`[out, in]` for linear layers). Outputs are written into tensors the
//! caller allocated, so a GPU backend can reuse buffers across calls.

use crate::error::{Error, Result};
use crate::signal::SignalPositions;
use crate::tensor::{DType, HostTensor};

/// What every backend's tensor can say about itself.
pub trait Shaped {
    /// The dimensions, outermost first.
    fn shape(&self) -> &[usize];
}

/// The activation fused into [`Backend::linear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// The identity: no activation.
    None,
    /// `max(x, 0)`.
    Relu,
    /// `0.5 x (1 + erf(x / sqrt 2))`, PyTorch's default GELU.
    GeluErf,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, `approximate="tanh"`.
    GeluTanh,
}

impl Activation {
    /// The name [`Activation::parse`] takes back, as benchmarks and the command line print it.
    pub fn name(self) -> &'static str {
        match self {
            Activation::None => "none",
            Activation::Relu => "relu",
            Activation::GeluErf => "gelu_erf",
            Activation::GeluTanh => "gelu_tanh",
        }
    }

    /// The activation named `s` (`none`, `relu`, `gelu` or `gelu_erf`, `gelu_tanh`);
    /// another name is an [`Error::Invalid`].
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Activation::None),
            "relu" => Ok(Activation::Relu),
            "gelu" | "gelu_erf" => Ok(Activation::GeluErf),
            "gelu_tanh" => Ok(Activation::GeluTanh),
            _ => Err(Error::invalid(format!("unknown activation `{s}`"))),
        }
    }
}

/// Which set of kernels a GPU backend runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KernelVersion {
    /// The naive v1 kernels: the baseline in benchmarks, a second oracle in tests.
    Naive,
    /// The tuned kernels (the default).
    #[default]
    Fast,
}

/// The two alignment losses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LossKind {
    /// NExT-GPT's "l2 loss": the mean over batch and tokens of the per-token
    /// Euclidean distance `sqrt(sum_d (u - v)^2)`. Its gradient is
    /// `(u - v) / (dist * B * N)`, defined as 0 for a token with `dist = 0`
    /// (PyTorch's autograd gives NaN there).
    TokenL2,
    /// Element-wise mean squared error `mean((u - v)^2)`, gradient `2 (u - v) / numel`.
    Mse,
}

/// A block of columns of a `[B, L, W]` tensor: columns `start..start + width` of
/// every row, read with the tensor's row stride `W`. This is how Q, K and V are read
/// in place from a packed `in_proj` output.
pub struct Cols<'a, T> {
    /// The `[B, L, W]` tensor the block is read from.
    pub tensor: &'a T,
    /// The block's first column, in `0..W`.
    pub start: usize,
}

impl<'a, T> Cols<'a, T> {
    /// The columns of `tensor` from `start` on; the op says how many it reads.
    pub fn new(tensor: &'a T, start: usize) -> Self {
        Cols { tensor, start }
    }
}

// Copy without `T: Copy` (it holds a reference only).
impl<T> Clone for Cols<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Cols<'_, T> {}

/// What an attention reads, for [`Backend::attention_linear`]: Q, K and V
/// (column blocks, as [`Backend::attention`] takes them), the heads, and the
/// key padding mask.
pub struct AttentionInput<'a, T, M> {
    /// The queries, `[B, Lq, *]`: `heads * head_dim` columns from `start`.
    pub q: Cols<'a, T>,
    /// The keys, `[B, Lk, *]`: `heads * head_dim` columns from `start`.
    pub k: Cols<'a, T>,
    /// The values, `[B, Lk, *]`: `heads * head_dim` columns from `start`.
    pub v: Cols<'a, T>,
    /// Heads, head width, causality and score scale.
    pub spec: &'a AttentionSpec,
    /// The key padding mask `[B, Lk]`, if any keys are to be ignored.
    pub mask: Option<&'a M>,
}

// Copy without `T: Copy` or `M: Copy` (it holds references only).
impl<T, M> Clone for AttentionInput<'_, T, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T, M> Copy for AttentionInput<'_, T, M> {}

/// What a LayerNorm normalises, for [`Backend::layer_norm_linear`]: `x +
/// residual` (or `x`) over the last dimension, scaled by `weight` and
/// shifted by `bias`, with `eps` added to the variance.
pub struct NormInput<'a, T> {
    /// The rows to normalise, `[.., C]`.
    pub x: &'a T,
    /// Added to `x` before the statistics, same shape as `x`.
    pub residual: Option<&'a T>,
    /// The scale `[C]` (PyTorch's `LayerNorm.weight`).
    pub weight: &'a T,
    /// The shift `[C]` (PyTorch's `LayerNorm.bias`).
    pub bias: &'a T,
    /// Added to the variance (PyTorch's `LayerNorm.eps`, 1e-5 by default).
    pub eps: f64,
}

// Copy without `T: Copy` (it holds references only).
impl<T> Clone for NormInput<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for NormInput<'_, T> {}

/// The LayerNorm after a linear, for [`Backend::linear_layer_norm`]: of the
/// linear's output plus `residual` (or alone), scaled by `weight` and shifted
/// by `bias`, with `eps` added to the variance.
pub struct NormAfter<'a, T> {
    /// Added to the linear's output before the statistics, `[M, N]`.
    pub residual: Option<&'a T>,
    /// The scale `[N]` (PyTorch's `LayerNorm.weight`).
    pub weight: &'a T,
    /// The shift `[N]` (PyTorch's `LayerNorm.bias`).
    pub bias: &'a T,
    /// Added to the variance (PyTorch's `LayerNorm.eps`, 1e-5 by default).
    pub eps: f64,
}

// Copy without `T: Copy` (it holds references only).
impl<T> Clone for NormAfter<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for NormAfter<'_, T> {}

/// What [`Backend::attention_absorbed`] attends to: an attention over few keys
/// whose query and output projections are absorbed into its keys and values.
/// Per key `j` of sequence `b` and head `e`, the `C`-column block `e` of
/// `keys` holds `W_qᵉᵀ k_j` (the head's query projection applied to its key
/// from the other side), that of `values` holds `W_oᵉ v_j` (the head's value
/// through its share of the output projection), and column `e` of
/// `key_bias` holds `b_qᵉ · k_j`. `C` is the width of the rows attending.
pub struct AbsorbedAttentionInput<'a, T> {
    /// `[B, Lk, *]`: `heads` blocks of `C` columns from `start`.
    pub keys: Cols<'a, T>,
    /// `[B, Lk, *]`: `heads` blocks of `C` columns from `start`.
    pub values: Cols<'a, T>,
    /// `[B, Lk, *]`: `heads` columns from `start`.
    pub key_bias: Cols<'a, T>,
    /// `[C]`: the output projection's bias.
    pub out_bias: &'a T,
    /// The number of heads absorbed; each has a block of `C` columns in `keys` and `values`.
    pub heads: usize,
    /// The score scale (`1 / sqrt(head_dim)` of the attention absorbed).
    pub scale: f64,
}

// Copy without `T: Copy` (it holds references only).
impl<T> Clone for AbsorbedAttentionInput<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for AbsorbedAttentionInput<'_, T> {}

/// Multi-head attention settings. Heads are consecutive column blocks of width
/// `head_dim` inside each of Q, K, V and the output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    /// The number of heads.
    pub heads: usize,
    /// Each head's width: Q, K, V and the output have `heads * head_dim` columns.
    pub head_dim: usize,
    /// Query `i` sees keys `j <= i` (top-left aligned, as PyTorch's `is_causal`).
    pub causal: bool,
    /// Score scale; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f64>,
}

impl AttentionSpec {
    /// `heads` heads of width `head_dim`, not causal, scale `1 / sqrt(head_dim)`.
    pub fn new(heads: usize, head_dim: usize) -> Self {
        AttentionSpec {
            heads,
            head_dim,
            causal: false,
            scale: None,
        }
    }

    /// The score scale in use: the `scale` field if set, else `1 / sqrt(head_dim)`.
    pub fn scale(&self) -> f64 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f64).sqrt())
    }
}

/// A key padding mask `[B, Lk]`: `true` means the key is ignored (PyTorch's
/// `key_padding_mask` convention). A query row whose keys are all ignored gets an
/// output of zeros (PyTorch gives NaN there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPaddingMask {
    batch: usize,
    keys: usize,
    ignore: Vec<bool>,
}

impl KeyPaddingMask {
    /// A mask of `batch` rows of `keys` entries, row-major; `true` ignores the key.
    /// `ignore` must hold `batch * keys` entries.
    pub fn new(batch: usize, keys: usize, ignore: Vec<bool>) -> Result<Self> {
        let n = batch
            .checked_mul(keys)
            .ok_or_else(|| Error::Overflow(format!("mask [{batch}, {keys}]")))?;
        if ignore.len() != n {
            return Err(Error::invalid(format!(
                "key padding mask [{batch}, {keys}] needs {n} entries, {} given",
                ignore.len()
            )));
        }
        Ok(KeyPaddingMask {
            batch,
            keys,
            ignore,
        })
    }

    /// The number of sequences `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The number of keys `Lk` per sequence.
    pub fn keys(&self) -> usize {
        self.keys
    }

    /// `true` where key `j` of sequence `b` is ignored.
    pub fn ignore(&self) -> &[bool] {
        &self.ignore
    }
}

/// The op set. A backend is a cheap handle (clone it freely). Every method validates shapes first (with the shared `*Dims::check`
/// functions below) and returns an error, never panics, on a mismatch.
pub trait Backend: Clone {
    /// A tensor living on this backend.
    type Tensor: Shaped;
    /// A key padding mask living on this backend.
    type Mask;

    /// A short name (`cpu`, `wgpu`, `cuda`) for messages and tables.
    fn name(&self) -> &str;

    /// Copy a host tensor to the backend, converting to its storage type.
    fn upload(&self, t: &HostTensor) -> Result<Self::Tensor>;
    /// Copy a GEMM's weight (`w` of [`linear`](Backend::linear), `[n, k]`)
    /// to the backend, in the form its `linear` reads fastest; only `linear`
    /// takes it as `w`, and [`download`](Backend::download) gives it back.
    /// By default, [`upload`](Backend::upload); the CPU set to bf16 or f16
    /// keeps it in that type.
    fn upload_weight(&self, t: &HostTensor) -> Result<Self::Tensor> {
        self.upload(t)
    }
    /// [`upload_weight`](Backend::upload_weight) of a tensor the caller
    /// gives up: where the backend would keep a copy of the host elements as
    /// they are (the CPU: f32, or f16 when set to f16), it keeps the
    /// tensor's own buffer instead. By default `upload_weight`.
    fn upload_weight_owned(&self, t: HostTensor) -> Result<Self::Tensor> {
        self.upload_weight(&t)
    }
    /// The host type [`upload_weight`](Backend::upload_weight) keeps as it
    /// is. Weights made on the host in f64 (the absorbed cross-attention's)
    /// are rounded to it where they are made, in parallel, rather than
    /// converted whole at the upload; the bits are the same. By default
    /// [`DType::F64`]: the upload converts.
    fn weight_dtype(&self) -> DType {
        DType::F64
    }
    /// The rayon pool that host work done for this backend runs on (the
    /// once-per-projector absorption of the cross-attention weights): the CPU
    /// backend's, so that it shares the cores the ops run on; by default
    /// `None`, rayon's global pool.
    fn host_pool(&self) -> Option<&rayon::ThreadPool> {
        None
    }
    /// Copy a tensor back to the host.
    fn download(&self, t: &Self::Tensor) -> Result<HostTensor>;
    /// Allocate a tensor. Its contents are unspecified until an op writes it.
    fn alloc(&self, shape: &[usize]) -> Result<Self::Tensor>;
    /// An error unless `elements` more elements fit in the backend's memory.
    /// A projector's plan asks before it allocates its buffers, so that a
    /// batch too large fails before it has taken the memory. By default
    /// nothing is checked: a device's allocator refuses on its own.
    fn check_room(&self, elements: usize, what: &str) -> Result<()> {
        let _ = (elements, what);
        Ok(())
    }
    /// Copy a mask to the backend.
    fn upload_mask(&self, mask: &KeyPaddingMask) -> Result<Self::Mask>;
    /// Wait until every op issued so far has finished (a no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Run `f` and return the device's own time for the work it issued, where the
    /// backend can measure it (timestamp queries); `None` otherwise.
    fn device_time(
        &self,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<std::time::Duration>> {
        f()?;
        Ok(None)
    }

    /// Kernels launched (dispatched) by this backend so far, where it counts
    /// them, from every thread using it: the difference across a forward on
    /// one thread is that forward's launch count.
    fn kernel_launches(&self) -> Option<u64> {
        None
    }

    /// The same device running the naive v1 kernels, for benchmarks and as a
    /// second oracle; `None` where there is no such variant (the reference).
    fn naive(&self) -> Result<Option<Self>> {
        Ok(None)
    }

    /// `out = act(x · wᵀ + b) + residual` over the last dimension of `x`.
    /// `x: [.., K]`, `w: [N, K]`, `b: [N]`, `residual` and `out: [.., N]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        act: Activation,
        residual: Option<&Self::Tensor>,
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// `s = x + residual` (or `x`), `out = (s - mean) / sqrt(var + eps) * weight + bias`
    /// over the last dimension, with the biased variance; `sum_out` receives `s`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        residual: Option<&Self::Tensor>,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f64,
        out: &mut Self::Tensor,
        sum_out: Option<&mut Self::Tensor>,
    ) -> Result<()>;

    /// `out = act(layer_norm(x + residual) · wᵀ + b)` and `sum_out = x +
    /// residual`: a LayerNorm and the linear that reads its output, as
    /// [`layer_norm`](Self::layer_norm) into `h` then [`linear`](Self::linear)
    /// (the default, [`layer_norm_then_linear`]). A backend may run the two as
    /// one kernel and leave `h` unwritten: `h` is scratch of the norm's shape
    /// here, not an output.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_linear(
        &self,
        norm: NormInput<'_, Self::Tensor>,
        sum_out: Option<&mut Self::Tensor>,
        h: &mut Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        act: Activation,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        layer_norm_then_linear(self, norm, sum_out, h, w, b, act, out)
    }

    /// `sum_out = act(x · wᵀ + b) + residual` and `out = layer_norm(sum_out)`
    /// (`norm`'s weight, bias and eps; the sum is not rounded before it is
    /// centred, as in [`layer_norm`](Self::layer_norm)): a linear and the
    /// LayerNorm that reads its output, as [`linear`](Self::linear) into `y`
    /// then [`layer_norm`](Self::layer_norm) (the default,
    /// [`linear_then_layer_norm`]). A backend may run the two as one kernel
    /// and leave `y` unwritten: `y` is scratch of the linear's output shape
    /// here, not an output.
    #[allow(clippy::too_many_arguments)]
    fn linear_layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        act: Activation,
        y: &mut Self::Tensor,
        norm: NormAfter<'_, Self::Tensor>,
        sum_out: Option<&mut Self::Tensor>,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        linear_then_layer_norm(self, x, w, b, act, y, norm, sum_out, out)
    }

    /// Whether [`linear_layer_norm`](Self::linear_layer_norm) runs as one
    /// kernel for a linear of `m` rows, `n` outputs and `k` inputs (on
    /// tensors this backend allocated): where it does, a caller with the
    /// choice folds a LayerNorm into the linear before it rather than into
    /// the one after it ([`layer_norm_linear`](Self::layer_norm_linear)).
    /// `false` by default.
    fn linear_layer_norm_folds(&self, m: usize, n: usize, k: usize) -> bool {
        let _ = (m, n, k);
        false
    }

    /// Scaled-dot-product attention per head: `out = softmax(Q Kᵀ · scale) V`.
    /// Q: `[B, Lq, *]`, K, V: `[B, Lk, *]` column blocks; `out: [B, Lq, heads·head_dim]`.
    fn attention(
        &self,
        q: Cols<'_, Self::Tensor>,
        k: Cols<'_, Self::Tensor>,
        v: Cols<'_, Self::Tensor>,
        spec: &AttentionSpec,
        mask: Option<&Self::Mask>,
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// `out = act(attention(..) · wᵀ + b)`: an attention and the linear that
    /// reads its output (an out-projection), as
    /// [`attention`](Self::attention) into `a` then [`linear`](Self::linear)
    /// (the default, [`attention_then_linear`]). A backend may run the two as
    /// one kernel and leave `a` unwritten: `a` is scratch of the attention's
    /// output shape here, not an output.
    fn attention_linear(
        &self,
        attn: AttentionInput<'_, Self::Tensor, Self::Mask>,
        a: &mut Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        act: Activation,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        attention_then_linear(self, attn, a, w, b, act, out)
    }

    /// An attention over few keys with its projections absorbed
    /// ([`AbsorbedAttentionInput`]), between the LayerNorms around it. Per
    /// row of sequence `b`: `s = x + residual` (`norm`'s), `h =
    /// layer_norm(s)` with `norm`'s weight, bias and eps; per head `e`,
    /// `p_e = softmax_j((h · keys[b, j, e] + key_bias[b, j, e]) · scale)`;
    /// `stream_out = s + Σ_e Σ_j p_e[j] values[b, j, e] + out_bias`; and `out
    /// = layer_norm(stream_out)` with `after`'s weight, bias and eps
    /// (`after.residual` must be `None`). x, residual, `stream_out` and `out`
    /// are `[B, L, C]`.
    ///
    /// A backend without the kernel says so here and in
    /// [`attention_absorbed_pays`](Self::attention_absorbed_pays).
    fn attention_absorbed(
        &self,
        norm: NormInput<'_, Self::Tensor>,
        attn: AbsorbedAttentionInput<'_, Self::Tensor>,
        after: NormAfter<'_, Self::Tensor>,
        stream_out: &mut Self::Tensor,
        out: &mut Self::Tensor,
    ) -> Result<()> {
        let _ = (norm, attn, after, stream_out, out);
        Err(Error::Backend {
            backend: self.name().to_string(),
            message: "attention_absorbed is not implemented on this backend".into(),
        })
    }

    /// Whether a caller with the choice runs an attention of `keys` keys
    /// and `heads` heads for rows of `cols` columns absorbed
    /// ([`attention_absorbed`](Self::attention_absorbed)) rather than as its
    /// query projection, attention and output projection. `false` by
    /// default.
    fn attention_absorbed_pays(&self, keys: usize, heads: usize, cols: usize) -> bool {
        let _ = (keys, heads, cols);
        false
    }

    /// The loss of `pred` against `target` (`[B, N, D]` each) into `loss` (`[1]`),
    /// and its gradient w.r.t. `pred` into `grad` (`[B, N, D]`).
    ///
    /// ```
    /// use output_projector::cpu::Cpu;
    /// use output_projector::ops::{Backend, LossKind};
    /// use output_projector::tensor::HostTensor;
    ///
    /// # fn main() -> output_projector::Result<()> {
    /// let be = Cpu::open()?;
    /// // Two tokens of two dimensions, at distances 5 and 0 from their targets.
    /// let pred = be.upload(&HostTensor::from_f32(vec![1, 2, 2], vec![3.0, 4.0, 1.0, 1.0])?)?;
    /// let target = be.upload(&HostTensor::from_f32(vec![1, 2, 2], vec![0.0, 0.0, 1.0, 1.0])?)?;
    /// let (mut loss, mut grad) = (be.alloc(&[1])?, be.alloc(&[1, 2, 2])?);
    /// be.alignment_loss(LossKind::TokenL2, &pred, &target, &mut loss, &mut grad)?;
    /// assert_eq!(be.download(&loss)?.to_f32_vec(), vec![2.5]); // (5 + 0) / 2 tokens
    /// // (u - v) / (distance x B x N); 0 for the token at distance 0.
    /// let grad = be.download(&grad)?.to_f32_vec();
    /// for (g, want) in grad.iter().zip([0.3, 0.4, 0.0, 0.0]) {
    ///     assert!((g - want).abs() < 1e-7, "{grad:?}");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    fn alignment_loss(
        &self,
        kind: LossKind,
        pred: &Self::Tensor,
        target: &Self::Tensor,
        loss: &mut Self::Tensor,
        grad: &mut Self::Tensor,
    ) -> Result<()>;

    /// `out[b, i] = hidden[b, p_i] + embeds[b, p_i]` for the signal positions `p`.
    /// `hidden`, `embeds: [B, T, C]`, `out: [B, n, C]`.
    fn gather_signal_tokens(
        &self,
        hidden: &Self::Tensor,
        embeds: Option<&Self::Tensor>,
        positions: &SignalPositions,
        out: &mut Self::Tensor,
    ) -> Result<()>;
}

/// [`Backend::layer_norm_linear`] as two ops: the norm into `h`, then the
/// linear reading it.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_then_linear<B: Backend>(
    be: &B,
    norm: NormInput<'_, B::Tensor>,
    sum_out: Option<&mut B::Tensor>,
    h: &mut B::Tensor,
    w: &B::Tensor,
    b: Option<&B::Tensor>,
    act: Activation,
    out: &mut B::Tensor,
) -> Result<()> {
    let NormInput {
        x,
        residual,
        weight,
        bias,
        eps,
    } = norm;
    be.layer_norm(x, residual, weight, bias, eps, h, sum_out)?;
    be.linear(h, w, b, act, None, out)
}

/// [`Backend::linear_layer_norm`] as two ops: the linear into `y`, then the
/// norm reading it.
#[allow(clippy::too_many_arguments)]
pub fn linear_then_layer_norm<B: Backend>(
    be: &B,
    x: &B::Tensor,
    w: &B::Tensor,
    b: Option<&B::Tensor>,
    act: Activation,
    y: &mut B::Tensor,
    norm: NormAfter<'_, B::Tensor>,
    sum_out: Option<&mut B::Tensor>,
    out: &mut B::Tensor,
) -> Result<()> {
    be.linear(x, w, b, act, None, y)?;
    let NormAfter {
        residual,
        weight,
        bias,
        eps,
    } = norm;
    be.layer_norm(y, residual, weight, bias, eps, out, sum_out)
}

/// [`Backend::attention_linear`] as two ops: the attention into `a`, then
/// the linear reading it.
pub fn attention_then_linear<B: Backend>(
    be: &B,
    attn: AttentionInput<'_, B::Tensor, B::Mask>,
    a: &mut B::Tensor,
    w: &B::Tensor,
    b: Option<&B::Tensor>,
    act: Activation,
    out: &mut B::Tensor,
) -> Result<()> {
    let AttentionInput {
        q,
        k,
        v,
        spec,
        mask,
    } = attn;
    be.attention(q, k, v, spec, mask, a)?;
    be.linear(a, w, b, act, None, out)
}

/// `v` as the f32 a GPU kernel takes, or an error naming `what` where f32
/// cannot hold it: out of its range, or a non-zero value that rounds to 0
/// (an eps lost so would make a constant row's output NaN, not its bias).
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) fn f32_param(what: &str, v: f64) -> Result<f32> {
    let f = v as f32;
    if !f.is_finite() || (f == 0.0 && v != 0.0) {
        return Err(Error::invalid(format!("{what} {v:e} does not fit f32")));
    }
    Ok(f)
}

fn shape_err(key: &str, expected: Vec<usize>, found: &[usize]) -> Error {
    Error::Shape {
        key: key.to_string(),
        expected,
        found: found.to_vec(),
    }
}

fn check(key: &str, found: &[usize], expected: &[usize]) -> Result<()> {
    if found != expected {
        return Err(shape_err(key, expected.to_vec(), found));
    }
    Ok(())
}

fn nonempty(op: &str, dims: &[(&str, usize)]) -> Result<()> {
    for (name, d) in dims {
        if *d == 0 {
            return Err(Error::invalid(format!("{op}: {name} must be at least 1")));
        }
    }
    Ok(())
}

/// The rows/columns of one `linear` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearDims {
    /// Rows of `x` (product of all but the last dimension).
    pub m: usize,
    /// Output features: rows of `w`, columns of `out`.
    pub n: usize,
    /// Input features: columns of `x` and of `w`.
    pub k: usize,
}

impl LinearDims {
    /// Checks the shapes of a `linear` call: `x [.., k]`, `w [n, k]`, `b [n]`,
    /// `residual` and `out [.., n]`, no dimension 0; an [`Error::Shape`] names the
    /// first tensor that disagrees.
    pub fn check(
        x: &[usize],
        w: &[usize],
        b: Option<&[usize]>,
        residual: Option<&[usize]>,
        out: &[usize],
    ) -> Result<Self> {
        let (&k, lead) = x
            .split_last()
            .ok_or_else(|| Error::invalid("linear: x must have at least one dimension"))?;
        if w.len() != 2 || w[1] != k {
            return Err(shape_err(
                "linear weight",
                vec![w.first().copied().unwrap_or(0), k],
                w,
            ));
        }
        let n = w[0];
        let m = crate::tensor::checked_numel(lead, "linear x")?;
        nonempty(
            "linear",
            &[("rows of x", m), ("in_features", k), ("out_features", n)],
        )?;
        if let Some(b) = b {
            check("linear bias", b, &[n])?;
        }
        let mut out_shape = lead.to_vec();
        out_shape.push(n);
        if let Some(r) = residual {
            check("linear residual", r, &out_shape)?;
        }
        check("linear out", out, &out_shape)?;
        Ok(LinearDims { m, n, k })
    }
}

/// The rows of one `layer_norm` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerNormDims {
    /// Rows normalised (product of all but the last dimension).
    pub rows: usize,
    /// The normalised size: the last dimension.
    pub cols: usize,
}

impl LayerNormDims {
    /// Checks the shapes of a `layer_norm` call (`residual`, `out` and `sum_out`
    /// as `x`, `weight` and `bias` `[cols]`, no dimension 0) and that `eps` is
    /// finite and not negative.
    pub fn check(
        x: &[usize],
        residual: Option<&[usize]>,
        weight: &[usize],
        bias: &[usize],
        eps: f64,
        out: &[usize],
        sum_out: Option<&[usize]>,
    ) -> Result<Self> {
        let (&cols, lead) = x
            .split_last()
            .ok_or_else(|| Error::invalid("layer_norm: x must have at least one dimension"))?;
        let rows = crate::tensor::checked_numel(lead, "layer_norm x")?;
        nonempty("layer_norm", &[("rows", rows), ("normalized size", cols)])?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::invalid(format!(
                "layer_norm: eps must be finite and >= 0, got {eps}"
            )));
        }
        if let Some(r) = residual {
            check("layer_norm residual", r, x)?;
        }
        check("layer_norm weight", weight, &[cols])?;
        check("layer_norm bias", bias, &[cols])?;
        check("layer_norm out", out, x)?;
        if let Some(s) = sum_out {
            check("layer_norm sum_out", s, x)?;
        }
        Ok(LayerNormDims { rows, cols })
    }
}

/// The geometry of one `attention` call, with every row stride resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    /// Sequences `B`.
    pub batch: usize,
    /// Queries per sequence.
    pub lq: usize,
    /// Keys (and values) per sequence.
    pub lk: usize,
    /// Heads.
    pub heads: usize,
    /// Each head's width.
    pub head_dim: usize,
    /// Row stride (width) of the tensor Q is read from.
    pub q_stride: usize,
    /// Row stride (width) of the tensor K is read from.
    pub k_stride: usize,
    /// Row stride (width) of the tensor V is read from.
    pub v_stride: usize,
    /// First column of the Q block.
    pub q_start: usize,
    /// First column of the K block.
    pub k_start: usize,
    /// First column of the V block.
    pub v_start: usize,
}

impl AttentionDims {
    /// Checks an `attention` call: Q, K and V are `[B, L, width]` tensors whose
    /// `heads * head_dim` columns from their start fit, K and V agree with Q on `B`
    /// and with each other on `Lk`, the mask is `[B, Lk]`, `out` is
    /// `[B, Lq, heads * head_dim]`, the scale is finite and no size is 0.
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        q: (&[usize], usize),
        k: (&[usize], usize),
        v: (&[usize], usize),
        spec: &AttentionSpec,
        mask: Option<(usize, usize)>,
        out: &[usize],
    ) -> Result<Self> {
        let inner = spec
            .heads
            .checked_mul(spec.head_dim)
            .ok_or_else(|| Error::Overflow("attention heads * head_dim".into()))?;
        nonempty(
            "attention",
            &[("heads", spec.heads), ("head_dim", spec.head_dim)],
        )?;
        if let Some(s) = spec.scale {
            if !s.is_finite() {
                return Err(Error::invalid(format!(
                    "attention: scale {s} is not finite"
                )));
            }
        }
        let block = |name: &str,
                     (shape, start): (&[usize], usize)|
         -> Result<(usize, usize, usize)> {
            if shape.len() != 3 {
                return Err(Error::invalid(format!(
                    "attention {name}: expected a [batch, tokens, width] tensor, found shape {shape:?}"
                )));
            }
            let end = start
                .checked_add(inner)
                .ok_or_else(|| Error::Overflow(format!("attention {name} columns")))?;
            if end > shape[2] {
                return Err(Error::invalid(format!(
                    "attention {name}: columns {start}..{end} do not fit in width {}",
                    shape[2]
                )));
            }
            Ok((shape[0], shape[1], shape[2]))
        };
        let (bq, lq, q_stride) = block("q", q)?;
        let (bk, lk, k_stride) = block("k", k)?;
        let (bv, lv, v_stride) = block("v", v)?;
        if bk != bq || bv != bq || lv != lk {
            return Err(Error::invalid(format!(
                "attention: q [{bq}, {lq}, _], k [{bk}, {lk}, _] and v [{bv}, {lv}, _] disagree on batch or key count"
            )));
        }
        nonempty(
            "attention",
            &[("batch", bq), ("query length", lq), ("key length", lk)],
        )?;
        if let Some((mb, mk)) = mask {
            check("attention key padding mask", &[mb, mk], &[bq, lk])?;
        }
        check("attention out", out, &[bq, lq, inner])?;
        Ok(AttentionDims {
            batch: bq,
            lq,
            lk,
            heads: spec.heads,
            head_dim: spec.head_dim,
            q_stride,
            k_stride,
            v_stride,
            q_start: q.1,
            k_start: k.1,
            v_start: v.1,
        })
    }
}

/// Most `heads x keys` scores of one row of [`Backend::attention_absorbed`]:
/// what its kernels hold per row.
pub const ABSORBED_MAX_SCORES: usize = 128;
/// Most heads of one [`Backend::attention_absorbed`] call.
pub const ABSORBED_MAX_HEADS: usize = 32;

/// Whether absorbing an attention of `keys` keys in `heads` heads over rows
/// of `cols` columns pays ([`Backend::attention_absorbed_pays`], for a backend
/// that runs it at all): per row it does `heads x keys` dot products of
/// `cols` and as many scaled row sums, against the `2 x cols` dot products
/// of the query and output projections it replaces (and their launches). So
/// heads x keys up to a quarter of the width: the presets' 4 heads of 4, 8
/// and 24 signal tokens at width 512.
pub fn absorbing_pays(keys: usize, heads: usize, cols: usize) -> bool {
    let scores = heads.saturating_mul(keys);
    keys > 0
        && heads > 0
        && heads <= ABSORBED_MAX_HEADS
        && scores <= ABSORBED_MAX_SCORES
        && scores.saturating_mul(4) <= cols
}

/// The geometry of one `attention_absorbed` call, with every row stride
/// resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbsorbedAttentionDims {
    /// Sequences `B`.
    pub batch: usize,
    /// Rows attending per sequence.
    pub lq: usize,
    /// Columns of a row (`C`).
    pub cols: usize,
    /// Keys per sequence.
    pub lk: usize,
    /// Heads absorbed.
    pub heads: usize,
    /// Row stride (width) of the keys tensor.
    pub k_stride: usize,
    /// Row stride (width) of the values tensor.
    pub v_stride: usize,
    /// Row stride (width) of the key bias tensor.
    pub b_stride: usize,
    /// First column of the keys' block.
    pub k_start: usize,
    /// First column of the values' block.
    pub v_start: usize,
    /// First column of the key bias's block.
    pub b_start: usize,
}

impl AbsorbedAttentionDims {
    /// Checks an `attention_absorbed` call: both LayerNorms as
    /// [`LayerNormDims::check`] does (the one after without a residual), `x`
    /// `[B, Lq, C]`, keys and values with `heads * C` columns and the key bias
    /// with `heads` from their starts, all of `B` sequences of the same `Lk`,
    /// at most [`ABSORBED_MAX_HEADS`] heads and [`ABSORBED_MAX_SCORES`] scores a
    /// row, a finite scale.
    pub fn check<T: Shaped>(
        norm: &NormInput<'_, T>,
        attn: &AbsorbedAttentionInput<'_, T>,
        after: &NormAfter<'_, T>,
        stream_out: &[usize],
        out: &[usize],
    ) -> Result<Self> {
        let op = "attention_absorbed";
        let x = norm.x.shape();
        LayerNormDims::check(
            x,
            norm.residual.map(|t| t.shape()),
            norm.weight.shape(),
            norm.bias.shape(),
            norm.eps,
            stream_out,
            None,
        )?;
        LayerNormDims::check(
            x,
            None,
            after.weight.shape(),
            after.bias.shape(),
            after.eps,
            out,
            None,
        )?;
        if after.residual.is_some() {
            return Err(Error::invalid(format!(
                "{op}: the norm after it takes no residual (the stream is its input)"
            )));
        }
        let &[batch, lq, cols] = x else {
            return Err(Error::invalid(format!(
                "{op}: x must be [batch, tokens, width], found shape {x:?}"
            )));
        };
        check(
            "attention_absorbed out_bias",
            attn.out_bias.shape(),
            &[cols],
        )?;
        let heads = attn.heads;
        nonempty(op, &[("heads", heads)])?;
        if heads > ABSORBED_MAX_HEADS {
            return Err(Error::invalid(format!(
                "{op}: {heads} heads, at most {ABSORBED_MAX_HEADS} are supported"
            )));
        }
        if !attn.scale.is_finite() {
            return Err(Error::invalid(format!(
                "{op}: scale {} is not finite",
                attn.scale
            )));
        }
        let wide = heads
            .checked_mul(cols)
            .ok_or_else(|| Error::Overflow(format!("{op}: heads x width")))?;
        let block = |name: &str, c: &Cols<'_, T>, width: usize| -> Result<(usize, usize)> {
            let shape = c.tensor.shape();
            let &[b, lk, w] = shape else {
                return Err(Error::invalid(format!(
                    "{op} {name}: expected a [batch, keys, width] tensor, found shape {shape:?}"
                )));
            };
            let end = c
                .start
                .checked_add(width)
                .ok_or_else(|| Error::Overflow(format!("{op} {name} columns")))?;
            if end > w {
                return Err(Error::invalid(format!(
                    "{op} {name}: columns {}..{end} do not fit in width {w}",
                    c.start
                )));
            }
            if b != batch {
                return Err(Error::invalid(format!(
                    "{op} {name}: batch {b}, the rows attending have {batch}"
                )));
            }
            Ok((lk, w))
        };
        let (lk, k_stride) = block("keys", &attn.keys, wide)?;
        let (lv, v_stride) = block("values", &attn.values, wide)?;
        let (lb, b_stride) = block("key_bias", &attn.key_bias, heads)?;
        if lv != lk || lb != lk {
            return Err(Error::invalid(format!(
                "{op}: keys ({lk}), values ({lv}) and key_bias ({lb}) disagree on the key count"
            )));
        }
        nonempty(op, &[("key count", lk)])?;
        if heads.saturating_mul(lk) > ABSORBED_MAX_SCORES {
            return Err(Error::invalid(format!(
                "{op}: {heads} heads x {lk} keys, at most {ABSORBED_MAX_SCORES} scores a row are supported"
            )));
        }
        Ok(AbsorbedAttentionDims {
            batch,
            lq,
            cols,
            lk,
            heads,
            k_stride,
            v_stride,
            b_stride,
            k_start: attn.keys.start,
            v_start: attn.values.start,
            b_start: attn.key_bias.start,
        })
    }
}

/// The geometry of one `alignment_loss` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LossDims {
    /// Sequences `B`.
    pub batch: usize,
    /// Tokens per sequence `N`.
    pub tokens: usize,
    /// Channels per token `D`.
    pub dim: usize,
}

impl LossDims {
    /// Checks an `alignment_loss` call: `pred` and `target` and `grad`
    /// `[B, N, D]`, no dimension 0, `loss` `[1]`.
    pub fn check(pred: &[usize], target: &[usize], loss: &[usize], grad: &[usize]) -> Result<Self> {
        if pred.len() != 3 {
            return Err(Error::invalid(format!(
                "alignment_loss: pred must be [batch, tokens, dim], found {pred:?}"
            )));
        }
        nonempty(
            "alignment_loss",
            &[("batch", pred[0]), ("tokens", pred[1]), ("dim", pred[2])],
        )?;
        crate::tensor::checked_numel(pred, "alignment_loss pred")?;
        check("alignment_loss target", target, pred)?;
        check("alignment_loss loss", loss, &[1])?;
        check("alignment_loss grad", grad, pred)?;
        Ok(LossDims {
            batch: pred[0],
            tokens: pred[1],
            dim: pred[2],
        })
    }
}

/// The geometry of one `gather_signal_tokens` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatherDims {
    /// Sequences `B`.
    pub batch: usize,
    /// Tokens per sequence `T` of the LLM's output.
    pub seq_len: usize,
    /// Signal tokens gathered per sequence.
    pub n: usize,
    /// Channels per token (the LLM's hidden size).
    pub channels: usize,
}

impl GatherDims {
    /// Checks a `gather_signal_tokens` call: `hidden` (and `embeds`) `[B, T, C]`
    /// with `positions` found in `[B, T]` token ids, `out` `[B, n, C]`, `B` and
    /// `C` not 0.
    pub fn check(
        hidden: &[usize],
        embeds: Option<&[usize]>,
        positions: &SignalPositions,
        out: &[usize],
    ) -> Result<Self> {
        if hidden.len() != 3 {
            return Err(Error::invalid(format!(
                "gather_signal_tokens: hidden must be [batch, seq, channels], found {hidden:?}"
            )));
        }
        if let Some(e) = embeds {
            check("gather_signal_tokens embeds", e, hidden)?;
        }
        let (batch, seq_len, channels) = (hidden[0], hidden[1], hidden[2]);
        nonempty(
            "gather_signal_tokens",
            &[("batch", batch), ("channels", channels)],
        )?;
        if positions.batch() != batch || positions.seq_len() != seq_len {
            return Err(Error::invalid(format!(
                "gather_signal_tokens: positions were found for [{}, {}] token ids but hidden is [{batch}, {seq_len}, _]",
                positions.batch(),
                positions.seq_len()
            )));
        }
        let n = positions.count();
        check("gather_signal_tokens out", out, &[batch, n, channels])?;
        Ok(GatherDims {
            batch,
            seq_len,
            n,
            channels,
        })
    }
}
