//! The CPU backend: f32 tensors in host memory, every op spread over a thread
//! pool, the GEMMs and attention's dot products on register tiles of fused
//! multiply-adds (AVX2 and FMA, chosen at run time on x86-64; NEON on aarch64).
//! Set to [`Precision::Bf16`] ([`CpuOptions::precision`]), it keeps the GEMMs'
//! weights in bf16 and multiplies them by inputs rounded to bf16, summing in
//! f32: on AVX512-BF16's `vdpbf16ps` where the CPU has it, else on the same
//! tiles with the values widened, in the same order, to the same bits. Set to
//! [`Precision::F16`], it does the same in f16, the weights widened to f32 a
//! few rows at a time (F16C on x86-64) into the f32 tiles.
//! It is the device for an engine without a GPU; the float64
//! [`Reference`](crate::reference::Reference) stays the oracle it is checked
//! against, and the naive baseline it is measured against.
//!
//! ```
//! use output_projector::config::{Modality, ProjectorConfig, Variant};
//! use output_projector::cpu::Cpu;
//! use output_projector::ops::Backend;
//! use output_projector::projector::Projector;
//! use output_projector::tensor::HostTensor;
//! use output_projector::weights::ProjectorWeights;
//!
//! # fn main() -> output_projector::Result<()> {
//! let mut config = ProjectorConfig::preset(Modality::Audio, Variant::Legacy);
//! config.in_dim = 64;
//! let weights = ProjectorWeights::random(config, None, 0)?;
//! let cpu = Cpu::open()?; // every core; Cpu::new(CpuOptions { threads: 2, .. }) for two
//! let projector = Projector::new(cpu.clone(), &weights)?;
//! let hidden = cpu.upload(&HostTensor::from_f32(vec![1, 8, 64], vec![0.1; 8 * 64])?)?;
//! let conditioning = cpu.download(&projector.forward(&hidden, None)?)?;
//! assert_eq!(conditioning.shape(), &[1, 1, 512]);
//! # Ok(())
//! # }
//! ```

mod alignment_loss;
mod attention;
mod gather_signal_tokens;
mod lanes;
mod layer_norm;
mod linear;
mod softmax;

use std::sync::Arc;

/// The rayon whose pools [`Cpu::on_pool`] takes.
pub use rayon;

use crate::device::{DeviceKind, Precision};
use crate::error::{Error, Result};
use crate::ops::{
    f32_param, AbsorbedAttentionDims, AbsorbedAttentionInput, Activation, AttentionDims,
    AttentionSpec, Backend, Cols, GatherDims, KernelVersion, KeyPaddingMask, LayerNormDims,
    LinearDims, LossDims, LossKind, NormAfter, NormInput, Shaped,
};
use crate::signal::SignalPositions;
use crate::tensor::{
    try_copied, try_filled, try_with_capacity, DType, Dense, HostData, HostTensor,
};

/// A row-major tensor in host memory: f32, or bf16 or f16 for the weight of a
/// GEMM uploaded by [`Backend::upload_weight`] to a backend set to
/// [`Precision::Bf16`] or [`Precision::F16`] ([`CpuTensor::dtype`] tells
/// which).
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    shape: Vec<usize>,
    data: Stored,
}

#[derive(Clone, Debug, PartialEq)]
enum Stored {
    F32(Vec<f32>),
    /// Each row (the last dimension) in bf16 pairs, as `linear` reads them
    /// (`linear::pack_pairs`).
    Bf16(Vec<u32>),
    /// The bits of each f16, row-major, as `linear` reads them.
    F16(Vec<u16>),
}

impl CpuTensor {
    /// An f32 tensor from its elements, without a copy; the count must match
    /// the shape.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let Dense { shape, data } = Dense::new(shape, data)?;
        Ok(CpuTensor {
            shape,
            data: Stored::F32(data),
        })
    }

    /// An f32 tensor of `shape` holding `value` everywhere; an error, not an
    /// abort, where it cannot be allocated.
    pub fn filled(shape: &[usize], value: f32) -> Result<Self> {
        let Dense { shape, data } = Dense::filled(shape, value)?;
        Ok(CpuTensor {
            shape,
            data: Stored::F32(data),
        })
    }

    /// [`DType::F32`], or [`DType::BF16`] or [`DType::F16`] for a GEMM weight
    /// of a bf16 or f16 backend.
    pub fn dtype(&self) -> DType {
        match self.data {
            Stored::F32(_) => DType::F32,
            Stored::Bf16(_) => DType::BF16,
            Stored::F16(_) => DType::F16,
        }
    }

    /// The f32 elements, row-major; an error for a bf16 or f16 tensor (which
    /// [`Backend::download`] gives back).
    pub fn data(&self) -> Result<&[f32]> {
        match &self.data {
            Stored::F32(v) => Ok(v),
            _ => Err(Self::not_f32(&self.shape, self.dtype())),
        }
    }

    /// The f32 elements, row-major, to write in place (the shape stays); an
    /// error for a bf16 or f16 tensor.
    pub fn data_mut(&mut self) -> Result<&mut [f32]> {
        let dtype = self.dtype();
        match &mut self.data {
            Stored::F32(v) => Ok(v),
            _ => Err(Self::not_f32(&self.shape, dtype)),
        }
    }

    fn not_f32(shape: &[usize], dtype: DType) -> Error {
        Error::invalid(format!(
            "cpu: a tensor of shape {shape:?} is stored in {dtype}, as a GEMM weight \
             (Backend::upload_weight); only linear's weight may be {dtype}"
        ))
    }
}

impl Shaped for CpuTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// Options of [`Cpu::new`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuOptions {
    /// Worker threads; 0 (the default) for `$RAYON_NUM_THREADS` where it is
    /// set, else one per core the machine offers. More than 16 per core is an
    /// [`Error::Invalid`] (a count that large is a mistake, not a setting).
    pub threads: usize,
    /// [`KernelVersion::Fast`] (the default): dot products (and attention's
    /// sums of value rows) in register tiles of AVX2 accumulators where the
    /// CPU has AVX2 and FMA, of NEON accumulators on aarch64.
    /// [`KernelVersion::Naive`], the v1 baseline and second oracle: one dot
    /// product at a time, in 8 partial sums the compiler vectorises for the
    /// build's baseline (SSE2 on x86-64), and attention's P·V one value row at
    /// a time.
    pub version: KernelVersion,
    /// [`Precision::F32`] (the default), [`Precision::Bf16`] or
    /// [`Precision::F16`]: the GEMMs' weights stored in that type
    /// ([`Backend::upload_weight`]), and each GEMM's input rounded to it, its
    /// products summed in f32 (bf16 on AVX512-BF16's `vdpbf16ps` where the CPU
    /// has it); everything else in f32. Half the weights' memory; the same
    /// bits on every CPU. In f16, a GEMM input past f16's range (65504) is an
    /// error, as it would be infinite. TF32 is an [`Error::Invalid`].
    pub precision: Precision,
}

/// Threads per core [`Cpu::new`] accepts at most.
const MAX_THREADS_PER_CORE: usize = 16;

/// The CPU backend: a cheap handle to its thread pool (clone it freely).
#[derive(Clone)]
pub struct Cpu {
    pool: Arc<rayon::ThreadPool>,
    simd: linear::Simd,
    version: KernelVersion,
    precision: Precision,
}

impl std::fmt::Debug for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cpu")
            .field("threads", &self.threads())
            .field("simd", &self.simd)
            .field("version", &self.version)
            .field("precision", &self.precision)
            .finish()
    }
}

impl Cpu {
    /// The backend on every core.
    pub fn open() -> Result<Cpu> {
        Cpu::new(CpuOptions::default())
    }

    /// The backend on its own pool of `options.threads` threads.
    pub fn new(options: CpuOptions) -> Result<Cpu> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if options.threads > MAX_THREADS_PER_CORE * cores {
            return Err(Error::invalid(format!(
                "cpu backend: {} threads asked for, more than {MAX_THREADS_PER_CORE} for each of \
                 this machine's {cores} cores",
                options.threads
            )));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|i| format!("outproj-cpu-{i}"))
            .build()
            .map_err(|e| Error::Unavailable {
                backend: "cpu".into(),
                reason: format!("cannot start {} worker threads: {e}", options.threads),
            })?;
        Cpu::on_pool(Arc::new(pool), options.version).with_precision(options.precision)
    }

    /// The backend on the caller's own rayon pool, shared with the rest of
    /// an engine, so that the projector's ops and the engine's work do not
    /// oversubscribe the cores. Results do not depend on the pool's size.
    /// Calling an op from one of the pool's own threads is fine: it runs
    /// there, its parts spread over the pool. So does the host work of a
    /// [`Projector`](crate::projector::Projector) on this backend (the
    /// absorption of the cross-attention weights at its first forward):
    /// nothing starts threads of its own.
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// use output_projector::cpu::rayon::ThreadPoolBuilder;
    /// use output_projector::cpu::Cpu;
    /// use output_projector::ops::KernelVersion;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = Arc::new(ThreadPoolBuilder::new().num_threads(2).build()?);
    /// let cpu = Cpu::on_pool(Arc::clone(&pool), KernelVersion::Fast);
    /// assert_eq!(cpu.threads(), 2);
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_pool(pool: Arc<rayon::ThreadPool>, version: KernelVersion) -> Cpu {
        Cpu {
            pool,
            simd: match version {
                KernelVersion::Fast => linear::Simd::detect(),
                KernelVersion::Naive => linear::Simd::Baseline,
            },
            version,
            precision: Precision::F32,
        }
    }

    /// The same backend set to `precision` (see [`CpuOptions::precision`]):
    /// [`Precision::F32`], [`Precision::Bf16`] or [`Precision::F16`], else an
    /// [`Error::Invalid`].
    /// ```
    /// use output_projector::cpu::Cpu;
    /// use output_projector::device::Precision;
    ///
    /// # fn main() -> output_projector::Result<()> {
    /// let cpu = Cpu::open()?.with_precision(Precision::Bf16)?;
    /// assert_eq!(cpu.options().precision, Precision::Bf16);
    /// assert!(Cpu::open()?.with_precision(Precision::Tf32).is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_precision(self, precision: Precision) -> Result<Cpu> {
        if !precision.runs_on(DeviceKind::Cpu) {
            return Err(Error::invalid(format!(
                "cpu backend: precision {} (it computes in f32, or bf16 or f16 GEMMs)",
                precision.name()
            )));
        }
        Ok(Cpu { precision, ..self })
    }

    /// The pool the ops run on.
    pub fn pool(&self) -> &Arc<rayon::ThreadPool> {
        &self.pool
    }

    /// The options it runs with (`threads` as started).
    pub fn options(&self) -> CpuOptions {
        CpuOptions {
            threads: self.threads(),
            version: self.version,
            precision: self.precision,
        }
    }

    /// Worker threads the ops are spread over.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The instruction set the dot products compile for on this machine
    /// (`avx2+fma` on most x86-64 machines, `neon` on aarch64, else the
    /// target's baseline).
    pub fn simd(&self) -> &'static str {
        self.simd.name()
    }
}

impl Backend for Cpu {
    type Tensor = CpuTensor;
    type Mask = KeyPaddingMask;

    fn name(&self) -> &str {
        "cpu"
    }

    /// f32 goes up as it is; another type is converted first, a finite value
    /// past f32's range an error.
    fn upload(&self, t: &HostTensor) -> Result<CpuTensor> {
        let data = match t.data() {
            HostData::F32(v) => try_copied(v, "upload to cpu")?,
            _ => t.to_storage(DType::F32, "upload to cpu")?.into_f32_vec(),
        };
        CpuTensor::new(t.shape().to_vec(), data)
    }

    /// In bf16 or f16 where the backend is set to [`Precision::Bf16`] or
    /// [`Precision::F16`] (rounded to nearest even, straight from any stored
    /// type, a finite value past the type's range an error; bf16 values below
    /// its normal range flushed to zero), else as [`upload`](Backend::upload).
    fn upload_weight(&self, t: &HostTensor) -> Result<CpuTensor> {
        const WHAT: &str = "weight upload to cpu";
        let data = match (self.precision, t.data()) {
            (Precision::Bf16, HostData::BF16(v)) => {
                let k = t.shape().last().copied().unwrap_or(1);
                let rows = t.numel().checked_div(k).unwrap_or(0);
                let pairs = rows
                    .checked_mul(k.div_ceil(2))
                    .ok_or_else(|| Error::Overflow(format!("weight of shape {:?}", t.shape())))?;
                let mut data = try_filled(pairs, 0u32, WHAT)?;
                linear::pack_pairs(v, k, |v| linear::flush(v.to_bits()), &mut data);
                Stored::Bf16(data)
            }
            (Precision::F16, HostData::F16(v)) => {
                Stored::F16(try_copied(bytemuck::cast_slice(v), WHAT)?)
            }
            (Precision::Bf16 | Precision::F16, _) => {
                return self.upload_weight(&t.to_storage(self.precision.storage(), WHAT)?)
            }
            _ => return self.upload(t),
        };
        Ok(CpuTensor {
            shape: t.shape().to_vec(),
            data,
        })
    }

    /// The buffer kept where `upload_weight` would copy it as it is: f32
    /// at [`Precision::F32`], f16 at [`Precision::F16`].
    fn upload_weight_owned(&self, t: HostTensor) -> Result<CpuTensor> {
        let (shape, data) = t.into_parts();
        let data = match data {
            HostData::F32(v) if self.precision == Precision::F32 => Stored::F32(v),
            HostData::F16(v) if self.precision == Precision::F16 => {
                Stored::F16(bytemuck::allocation::cast_vec(v))
            }
            data => return self.upload_weight(&HostTensor::new(shape, data)?),
        };
        Ok(CpuTensor { shape, data })
    }

    fn download(&self, t: &CpuTensor) -> Result<HostTensor> {
        match &t.data {
            Stored::F32(v) => {
                HostTensor::from_f32(t.shape.clone(), try_copied(v, "download from cpu")?)
            }
            Stored::Bf16(pairs) => {
                let k = t.shape.last().copied().unwrap_or(1);
                let mut v = try_with_capacity(t.shape.iter().product(), "download from cpu")?;
                // Rows of no elements hold no pairs (and `chunks` takes no zero).
                for row in pairs.chunks(k.div_ceil(2).max(1)) {
                    let halves = row.iter().flat_map(|&p| [p as u16, (p >> 16) as u16]);
                    v.extend(halves.take(k).map(half::bf16::from_bits));
                }
                HostTensor::new(t.shape.clone(), HostData::BF16(v))
            }
            Stored::F16(bits) => {
                let v = try_copied(bytemuck::cast_slice(bits), "download from cpu")?;
                HostTensor::new(t.shape.clone(), HostData::F16(v))
            }
        }
    }

    fn weight_dtype(&self) -> DType {
        self.precision.storage()
    }

    fn host_pool(&self) -> Option<&rayon::ThreadPool> {
        Some(&self.pool)
    }

    fn check_room(&self, elements: usize, what: &str) -> Result<()> {
        crate::tensor::check_room(elements, std::mem::size_of::<f32>(), what)
    }

    fn alloc(&self, shape: &[usize]) -> Result<CpuTensor> {
        // NaN, so that an element no op writes can never pass as a result.
        CpuTensor::filled(shape, f32::NAN)
    }

    fn upload_mask(&self, mask: &KeyPaddingMask) -> Result<KeyPaddingMask> {
        Ok(mask.clone())
    }

    /// The v1 kernels on the same threads.
    fn naive(&self) -> Result<Option<Self>> {
        Ok(Some(Cpu {
            precision: self.precision,
            ..Cpu::on_pool(Arc::clone(&self.pool), KernelVersion::Naive)
        }))
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        b: Option<&CpuTensor>,
        act: Activation,
        residual: Option<&CpuTensor>,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let d = LinearDims::check(
            &x.shape,
            &w.shape,
            b.map(|t| t.shape()),
            residual.map(|t| t.shape()),
            &out.shape,
        )?;
        let args = linear::Linear {
            x: x.data()?,
            w: match &w.data {
                Stored::F32(v) => linear::Weight::F32(v),
                Stored::Bf16(pairs) => linear::Weight::Bf16(pairs),
                Stored::F16(bits) => linear::Weight::F16(bits),
            },
            b: b.map(|t| t.data()).transpose()?,
            act,
            residual: residual.map(|t| t.data()).transpose()?,
        };
        let out = out.data_mut()?;
        self.pool
            .install(|| linear::linear(self.simd, d, args, out))
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        residual: Option<&CpuTensor>,
        weight: &CpuTensor,
        bias: &CpuTensor,
        eps: f64,
        out: &mut CpuTensor,
        sum_out: Option<&mut CpuTensor>,
    ) -> Result<()> {
        let d = LayerNormDims::check(
            &x.shape,
            residual.map(|t| t.shape()),
            &weight.shape,
            &bias.shape,
            eps,
            &out.shape,
            sum_out.as_ref().map(|t| t.shape()),
        )?;
        let args = layer_norm::LayerNorm {
            x: x.data()?,
            residual: residual.map(|t| t.data()).transpose()?,
            weight: weight.data()?,
            bias: bias.data()?,
            eps,
        };
        let (out, sum_out) = (out.data_mut()?, sum_out.map(|t| t.data_mut()).transpose()?);
        self.pool
            .install(|| layer_norm::layer_norm(self.simd, d, args, out, sum_out));
        Ok(())
    }

    fn attention(
        &self,
        q: Cols<'_, CpuTensor>,
        k: Cols<'_, CpuTensor>,
        v: Cols<'_, CpuTensor>,
        spec: &AttentionSpec,
        mask: Option<&KeyPaddingMask>,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let d = AttentionDims::check(
            (&q.tensor.shape, q.start),
            (&k.tensor.shape, k.start),
            (&v.tensor.shape, v.start),
            spec,
            mask.map(|m| (m.batch(), m.keys())),
            &out.shape,
        )?;
        let args = attention::Attention {
            q: q.tensor.data()?,
            k: k.tensor.data()?,
            v: v.tensor.data()?,
            scale: f32_param("attention scale", spec.scale())?,
            causal: spec.causal,
            ignore: mask.map(|m| m.ignore()),
        };
        let out = out.data_mut()?;
        self.pool
            .install(|| attention::attention(self.simd, d, args, out));
        Ok(())
    }

    fn attention_absorbed(
        &self,
        norm: NormInput<'_, CpuTensor>,
        attn: AbsorbedAttentionInput<'_, CpuTensor>,
        after: NormAfter<'_, CpuTensor>,
        stream_out: &mut CpuTensor,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let d = AbsorbedAttentionDims::check(&norm, &attn, &after, &stream_out.shape, &out.shape)?;
        let args = attention::Absorbed {
            x: norm.x.data()?,
            residual: norm.residual.map(|r| r.data()).transpose()?,
            norm: [norm.weight.data()?, norm.bias.data()?],
            eps: norm.eps,
            keys: attn.keys.tensor.data()?,
            values: attn.values.tensor.data()?,
            key_bias: attn.key_bias.tensor.data()?,
            out_bias: attn.out_bias.data()?,
            scale: f32_param("attention scale", attn.scale)?,
            after: [after.weight.data()?, after.bias.data()?],
            after_eps: after.eps,
        };
        let (stream_out, out) = (stream_out.data_mut()?, out.data_mut()?);
        self.pool
            .install(|| attention::attention_absorbed(self.simd, d, args, stream_out, out));
        Ok(())
    }

    fn attention_absorbed_pays(&self, keys: usize, heads: usize, cols: usize) -> bool {
        crate::ops::absorbing_pays(keys, heads, cols)
    }

    fn alignment_loss(
        &self,
        kind: LossKind,
        pred: &CpuTensor,
        target: &CpuTensor,
        loss: &mut CpuTensor,
        grad: &mut CpuTensor,
    ) -> Result<()> {
        let d = LossDims::check(&pred.shape, &target.shape, &loss.shape, &grad.shape)?;
        let (pred, target, grad) = (pred.data()?, target.data()?, grad.data_mut()?);
        loss.data_mut()?[0] = self
            .pool
            .install(|| alignment_loss::alignment_loss(d, kind, pred, target, grad));
        Ok(())
    }

    fn gather_signal_tokens(
        &self,
        hidden: &CpuTensor,
        embeds: Option<&CpuTensor>,
        positions: &SignalPositions,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let d = GatherDims::check(
            &hidden.shape,
            embeds.map(|t| t.shape()),
            positions,
            &out.shape,
        )?;
        gather_signal_tokens::gather_signal_tokens(
            d,
            hidden.data()?,
            embeds.map(|t| t.data()).transpose()?,
            positions.positions(),
            out.data_mut()?,
        );
        Ok(())
    }
}

/// A fold of `s` in 8 lanes: element `i` goes into lane `i % 8` by `step`,
/// the lanes are combined by `merge` in a fixed tree, then the tail follows
/// in order. The lanes make the loop vectorise (one chain of dependent adds
/// takes 4 cycles an element); the fixed order gives the same result wherever
/// it runs.
#[inline(always)]
pub(crate) fn fold8<T: Copy, A: Copy>(
    s: &[T],
    init: A,
    step: impl Fn(A, T) -> A,
    merge: impl Fn(A, A) -> A,
) -> A {
    let mut lanes = [init; 8];
    let chunks = s.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = step(*l, v);
        }
    }
    let tree = merge(
        merge(merge(lanes[0], lanes[4]), merge(lanes[1], lanes[5])),
        merge(merge(lanes[2], lanes[6]), merge(lanes[3], lanes[7])),
    );
    tail.iter().fold(tree, |acc, &v| step(acc, v))
}

/// The tiles of a row-major `[rows, cols]` output, `row_block` rows by
/// `col_block` columns each (smaller at the edges), as disjoint mutable row
/// pieces: what lets threads write one output without sharing it.
pub(crate) struct Tile<'a> {
    /// The tile's first row and column.
    pub row: usize,
    pub col: usize,
    /// One piece per row, each `col_block` long (or less at the right edge).
    pub rows: Vec<&'a mut [f32]>,
}

impl Tile<'_> {
    /// Columns in the tile.
    pub fn width(&self) -> usize {
        self.rows.first().map_or(0, |r| r.len())
    }
}

/// `out` (`rows * cols` elements) cut into tiles, in row-block-major order.
pub(crate) fn tiles(
    out: &mut [f32],
    cols: usize,
    row_block: usize,
    col_block: usize,
) -> Vec<Tile<'_>> {
    let col_blocks = cols.div_ceil(col_block);
    let mut tiles: Vec<Tile<'_>> = Vec::new();
    for (r, row) in out.chunks_mut(cols).enumerate() {
        if r % row_block == 0 {
            tiles.extend((0..col_blocks).map(|c| Tile {
                row: r,
                col: c * col_block,
                rows: Vec::with_capacity(row_block),
            }));
        }
        let first = tiles.len() - col_blocks;
        for (tile, piece) in tiles[first..].iter_mut().zip(row.chunks_mut(col_block)) {
            tile.rows.push(piece);
        }
    }
    tiles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_output_once() {
        for (rows, cols, rb, cb) in [(7, 10, 3, 4), (1, 1, 4, 4), (8, 8, 4, 4), (5, 3, 8, 1)] {
            let mut out = vec![0.0f32; rows * cols];
            for t in tiles(&mut out, cols, rb, cb) {
                assert!(t.rows.len() <= rb);
                for (i, piece) in t.rows.into_iter().enumerate() {
                    assert!(piece.len() <= cb);
                    for (j, x) in piece.iter_mut().enumerate() {
                        *x += ((t.row + i) * cols + t.col + j) as f32 + 1.0;
                    }
                }
            }
            let want: Vec<f32> = (0..rows * cols).map(|i| i as f32 + 1.0).collect();
            assert_eq!(out, want, "{rows}x{cols} in {rb}x{cb}");
        }
    }

    /// An owned weight upload gives the same tensor as a copying one in
    /// every precision and host type, keeping the host buffer where it is
    /// stored as it is, and refusing what overflows the same way.
    #[test]
    fn owned_weight_uploads_keep_the_buffer() -> Result<()> {
        let t = HostTensor::randn(vec![3, 5], 7, "w")?;
        for precision in [Precision::F32, Precision::Bf16, Precision::F16] {
            let cpu = Cpu::new(CpuOptions {
                precision,
                ..CpuOptions::default()
            })?;
            for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
                let host = t.to_dtype(dtype);
                let copied = cpu.download(&cpu.upload_weight(&host)?)?;
                let address = match host.data() {
                    HostData::F32(v) => v.as_ptr() as usize,
                    HostData::F16(v) => v.as_ptr() as usize,
                    _ => 0,
                };
                let owned = cpu.upload_weight_owned(host)?;
                let kept = match &owned.data {
                    Stored::F32(v) => v.as_ptr() as usize,
                    Stored::F16(v) => v.as_ptr() as usize,
                    Stored::Bf16(v) => v.as_ptr() as usize,
                };
                // bf16 weights are packed in pairs: always a copy.
                let stored = matches!(
                    (precision, dtype),
                    (Precision::F32, DType::F32) | (Precision::F16, DType::F16)
                );
                assert_eq!(kept == address, stored, "{precision:?} from {dtype}");
                let got = cpu.download(&owned)?;
                assert_eq!(got.dtype(), copied.dtype());
                assert_eq!(
                    got.to_f64_vec(),
                    copied.to_f64_vec(),
                    "{precision:?} {dtype}"
                );
            }
            let big = HostTensor::from_f64(vec![1, 2], vec![1.0, 1e300])?;
            let e = cpu.upload_weight_owned(big).unwrap_err().to_string();
            assert!(e.contains("overflows"), "{precision:?}: {e}");
        }
        Ok(())
    }

    #[test]
    fn a_pool_of_zero_threads_means_every_core() {
        let cpu = Cpu::open().unwrap();
        assert!(cpu.threads() >= 1);
        let one = Cpu::new(CpuOptions {
            threads: 1,
            ..CpuOptions::default()
        })
        .unwrap();
        assert_eq!(one.threads(), 1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let e = Cpu::new(CpuOptions {
            threads: 17 * cores,
            ..CpuOptions::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("threads asked for"), "{e}");
    }
}
