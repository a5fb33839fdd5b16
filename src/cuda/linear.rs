//! `kernels/linear.cu`: naive v1, a 64x64-tiled v2 with 16-byte loads and a
//! deterministic split-K for grids too small to fill the device, and for f16 /
//! bf16 storage v3 on tensor cores (WMMA), with the same tiles and split-K; for
//! f32 storage with [`CudaOptions::tf32`](super::CudaOptions::tf32) the same v3
//! on TF32 tensor cores. GEMMs of few rows take v4 (`linear_rows_*`) in every
//! storage: 8x4 outputs per block over all of K, no split-K. 16-bit GEMMs
//! whose 128x128 tiles alone fill the device take v5 (`linear_mma_vec8`:
//! mma.sync on fragments loaded with ldmatrix, three cp.async stages; its
//! 128x64 twin `linear_mma_narrow_vec8` where that spreads the tiles more
//! evenly over the SMs), or
//! v3's WMMA with those tiles under
//! [`CudaOptions::wmma_large_tiles`](super::CudaOptions::wmma_large_tiles). Where the device
//! launches thread-block clusters, a split GEMM's blocks of one tile are one
//! cluster and add their slices through distributed shared memory instead of
//! a workspace ([`Cuda::cluster_split_k`]).

use cudarc::driver::DeviceRepr;

use super::attention::{AttentionParams, FEW_KEYS_MAX};
use super::backend::{
    blocks_for, i32_of, Cuda, CudaMask, CudaOptions, CudaTensor, KernelVersion, MAX_CLUSTER,
};
use super::program::{param_layout, wgmma_compiled, Program};
use crate::error::Result;
use crate::ops::{
    f32_param, Activation, AttentionDims, AttentionInput, LinearDims, NormAfter, NormInput,
};
use crate::tensor::DType;

/// Mirror of `LinearParams` in kernels/linear.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct LinearParams {
    x: u64,
    w: u64,
    bias: u64,
    residual: u64,
    out: u64,
    partial: u64,
    tile_counters: u64,
    m: i32,
    n: i32,
    k: i32,
    act: i32,
    k_per_split: i32,
    splits: i32,
}

// SAFETY: plain data (u64 and i32 fields, no padding), laid out exactly as the
// kernels' LinearParams: the static_asserts compiled into linear.cu check it.
unsafe impl DeviceRepr for LinearParams {}

impl LinearParams {
    /// An unsplit GEMM of `d` on checked device addresses (0: absent);
    /// `op` names it in size errors.
    #[allow(clippy::too_many_arguments)]
    fn unsplit(
        op: &str,
        d: LinearDims,
        x: u64,
        w: u64,
        bias: u64,
        residual: u64,
        out: u64,
        act: Activation,
    ) -> Result<Self> {
        // The message is formatted only for a size that does not fit.
        let dim =
            |what: &str, n: usize| i32::try_from(n).or_else(|_| i32_of(&format!("{op} {what}"), n));
        Ok(LinearParams {
            x,
            w,
            bias,
            residual,
            out,
            partial: 0,
            tile_counters: 0,
            m: dim("rows", d.m)?,
            n: dim("out_features", d.n)?,
            k: dim("in_features", d.k)?,
            act: act_code(act),
            k_per_split: 0,
            splits: 1,
        })
    }
}

/// Mirror of `LayerNormLinearParams` in kernels/linear.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct LayerNormLinearParams {
    linear: LinearParams,
    norm_residual: u64,
    norm_weight: u64,
    norm_bias: u64,
    sum_out: u64,
    eps: f32,
    pad0: i32,
}

// SAFETY: plain data (a LinearParams, u64, f32 and i32 fields, no padding),
// laid out exactly as the kernels' LayerNormLinearParams: the static_asserts
// compiled into linear.cu check it.
unsafe impl DeviceRepr for LayerNormLinearParams {}

/// Mirror of `LinearLayerNormParams` in kernels/linear.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct LinearLayerNormParams {
    linear: LinearParams,
    norm_residual: u64,
    norm_weight: u64,
    norm_bias: u64,
    sum_out: u64,
    norm_out: u64,
    eps: f32,
    pad0: i32,
}

// SAFETY: plain data (a LinearParams, u64, f32 and i32 fields, no padding),
// laid out exactly as the kernels' LinearLayerNormParams: the static_asserts
// compiled into linear.cu check it.
unsafe impl DeviceRepr for LinearLayerNormParams {}

/// Mirror of `AttentionLinearParams` in kernels/linear.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct AttentionLinearParams {
    linear: LinearParams,
    attention: AttentionParams,
}

// SAFETY: plain data (a LinearParams and an AttentionParams, no padding),
// laid out exactly as the kernels' AttentionLinearParams: the static_asserts
// compiled into linear.cu check it.
unsafe impl DeviceRepr for AttentionLinearParams {}

fn layouts() -> String {
    param_layout!(LayerNormLinearParams {
        linear,
        norm_residual,
        norm_weight,
        norm_bias,
        sum_out,
        eps,
        pad0
    }) + &param_layout!(LinearLayerNormParams {
        linear,
        norm_residual,
        norm_weight,
        norm_bias,
        sum_out,
        norm_out,
        eps,
        pad0
    }) + &param_layout!(LinearParams {
        x,
        w,
        bias,
        residual,
        out,
        partial,
        tile_counters,
        m,
        n,
        k,
        act,
        k_per_split,
        splits
    }) + &param_layout!(AttentionLinearParams { linear, attention })
        + &super::attention::layouts()
}

pub(crate) static PROGRAM: Program = Program {
    file: "linear.cu",
    source: include_str!("../../kernels/linear.cu"),
    kernels: &[
        "linear_naive",
        "linear_rows_vec4",
        "linear_rows_deep_vec4",
        "linear_rows_scalar",
        "layer_norm_linear_rows",
        "attention_linear_rows",
    ],
    f32_kernels: &[
        "linear_tiled_vec4",
        "linear_tiled_scalar",
        "layer_norm_linear_tiled_vec4",
    ],
    half_kernels: &[
        "linear_tc_vec8",
        "linear_tc_scalar",
        "linear_tc_large_vec8",
        "linear_mma_vec8",
        "linear_mma_narrow_vec8",
        "layer_norm_linear_tc_vec8",
        "linear_layer_norm_mma_vec8",
    ],
    tf32_kernels: &[
        "linear_tc_tf32_vec4",
        "linear_tc_tf32_scalar",
        "linear_tc_tf32_large_vec4",
    ],
    wgmma_kernels: &[
        "linear_wgmma_vec8",
        "linear_wgmma_narrow_vec8",
        "linear_wgmma_serial_vec8",
        "linear_wgmma_serial_narrow_vec8",
        "linear_layer_norm_wgmma_vec8",
    ],
    layouts,
};

/// Output tile of the v2 kernel and of v3's small tiles (rows and columns).
const TILE: usize = 64;
/// Rows and columns per block of v4 (`LINEAR_ROWS_M`, `LINEAR_ROWS_N`).
const ROWS_M: usize = 8;
const ROWS_N: usize = 4;
/// v4 takes GEMMs of up to this many rows: each of its blocks reads its rows
/// of x whole, so x is read `N / ROWS_N` times over (from L2); at two row
/// groups that is still no more than the weights' bytes twice over.
const ROWS_MAX_M: usize = 2 * ROWS_M;
/// Most threads of a v4 block (`LINEAR_ROWS_MAX_THREADS`).
const ROWS_MAX_THREADS: usize = 256;
/// Output tile of v3's large tiles, used where they alone give every SM one.
const LARGE_TILE: usize = 128;
/// Output columns of v5's narrow tiles (`LINEAR_MMA_NARROW_BN`; 128 rows).
const NARROW_TILE: usize = 64;
/// Blocks per SM that the tiled kernels after a norm are built for
/// (`LINEAR_NORM_TILED_BLOCKS`, v3's `LINEAR_TC_SMALL_BLOCKS`).
const NORM_TILED_BLOCKS: usize = 2;
/// Most K steps per block of v2 after a norm (`LINEAR_NORM_TILED_STEPS`).
const NORM_TILED_STEPS: usize = 2;
const TC_SMALL_BLOCKS: usize = 4;
/// Most splits of one GEMM.
const MAX_SPLITS: usize = 32;

/// A launch's grid, in blocks along x, y and z.
type Grid = (u32, u32, u32);

/// How one `linear` call is launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinearPlan {
    /// `linear_naive`, block (16, 16).
    Naive { grid: (u32, u32, u32) },
    /// `linear_rows_*` (v4), one block of `threads` per 8x4 outputs.
    Rows {
        kernel: &'static str,
        threads: u32,
        grid: (u32, u32, u32),
    },
    /// `linear_tiled_*` (or a tensor-core twin); with `splits > 1` and
    /// `cluster` each tile's split blocks are one thread-block cluster and add
    /// their slices in shared memory; with `splits > 1` and no `cluster` the
    /// partial sums go to a `[splits, M, N]` workspace and the last block of
    /// each of the `grid.0 * grid.1` tiles finishes it, counted in the
    /// backend's tile counters.
    Tiled {
        kernel: &'static str,
        threads: u32,
        grid: (u32, u32, u32),
        splits: usize,
        k_per_split: usize,
        cluster: bool,
    },
}

/// The K split for an `m x n` output over `k` on `sm_count` SMs, for a kernel
/// that walks K in steps of `k_step`, in at most `max_splits` slices (see
/// [`Gemm::max_splits`]): when the tiles alone are too few to fill the
/// device, enough splits for two blocks per SM, each at least one step deep.
/// Returns `(splits, k_per_split)` with `k_per_split` a multiple of `k_step`
/// and every split non-empty.
fn split_k(
    m: usize,
    n: usize,
    k: usize,
    sm_count: usize,
    k_step: usize,
    max_splits: usize,
) -> (usize, usize) {
    let tiles = m.div_ceil(TILE) * n.div_ceil(TILE);
    let mut splits = 1;
    if tiles < sm_count && k >= 2 * k_step {
        let want = (2 * sm_count).div_ceil(tiles);
        splits = want.min(k / k_step).min(max_splits).clamp(1, MAX_SPLITS);
        // The workspace [splits, m, n] must fit the kernels' 32-bit indices.
        while splits > 1
            && splits
                .checked_mul(m)
                .and_then(|v| v.checked_mul(n))
                .is_none_or(|v| v > i32::MAX as usize)
        {
            splits -= 1;
        }
    }
    let k_per_split = k.div_ceil(splits).div_ceil(k_step) * k_step;
    (k.div_ceil(k_per_split), k_per_split)
}

/// Which fast GEMM runs: v2 on CUDA cores (f32), v3 on tensor cores for
/// 16-bit storage (where large tiles fill the device v5, or on sm_90a v6,
/// 128x128 or 128x64 as [`narrow_tiles_spread_better`] says; `HalfSquare`
/// and `WarpgroupSquare`: 128x128 only; `WarpgroupSerial`: v6 with its MMAs
/// drained between K steps; `HalfWmma`: v3's large tiles there), or v3 on
/// TF32 tensor cores (f32 with `tf32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gemm {
    Tiled,
    Half,
    HalfSquare,
    HalfWmma,
    Warpgroup,
    WarpgroupSquare,
    WarpgroupSerial,
    Tf32,
}

impl Gemm {
    /// The GEMMs of a backend with `storage` and `options` compiling for
    /// `arch`.
    pub(crate) fn for_storage(storage: DType, options: &CudaOptions, arch: &str) -> Gemm {
        let warpgroup = wgmma_compiled(storage, arch) && !options.mma_sync_tiles;
        match (storage, options.tf32) {
            (DType::F32, false) => Gemm::Tiled,
            (DType::F32, true) => Gemm::Tf32,
            _ if options.wmma_large_tiles => Gemm::HalfWmma,
            _ if warpgroup && options.square_mma_tiles => Gemm::WarpgroupSquare,
            _ if warpgroup && options.wgmma_serial_steps => Gemm::WarpgroupSerial,
            _ if warpgroup => Gemm::Warpgroup,
            _ if options.square_mma_tiles => Gemm::HalfSquare,
            _ => Gemm::Half,
        }
    }

    /// Where the large tiles may be 128x64 ([`narrow_tiles_spread_better`]),
    /// that kernel.
    fn narrow_kernel(self) -> Option<&'static str> {
        match self {
            Gemm::Half => Some("linear_mma_narrow_vec8"),
            Gemm::Warpgroup => Some("linear_wgmma_narrow_vec8"),
            Gemm::WarpgroupSerial => Some("linear_wgmma_serial_narrow_vec8"),
            _ => None,
        }
    }

    /// K columns per step of the 64x64-tile kernel (`LINEAR_BK`, and
    /// `LinearTcSmall`'s 128 bytes per row).
    fn k_step(self) -> usize {
        match self {
            Gemm::Tf32 => 32,
            _ => 64,
        }
    }

    /// Split-K slices of a full 64x64 tile the finishing block adds up in
    /// about as many round trips to memory as a split costs: v2's block
    /// (256 threads) has two slices' loads in flight at a time, v3's (128
    /// threads, held to 128 registers) one, and its K steps are quick.
    fn finish_slices(self) -> usize {
        match self {
            Gemm::Tiled => 8,
            _ => 4,
        }
    }

    /// Most K slices of a GEMM of `m` rows: one cluster's blocks where the
    /// slices are added in a cluster (all read at once, each block a share
    /// of the tile); else what the finishing block reads quickly, more
    /// slices for tiles of fewer rows.
    fn max_splits(self, m: usize, cluster: bool) -> usize {
        if cluster {
            MAX_CLUSTER
        } else {
            self.finish_slices() * TILE / m.clamp(1, TILE)
        }
    }

    /// The 64x64-tile kernel and its block size; `wide` = 16-byte copies are
    /// possible (K a multiple of 16 bytes' worth of elements, operands 16-byte
    /// aligned).
    fn kernel(self, wide: bool) -> (&'static str, u32) {
        match (self, wide) {
            (Gemm::Tf32, true) => ("linear_tc_tf32_vec4", 128),
            (Gemm::Tf32, false) => ("linear_tc_tf32_scalar", 128),
            (Gemm::Tiled, true) => ("linear_tiled_vec4", 256),
            (Gemm::Tiled, false) => ("linear_tiled_scalar", 256),
            (_, true) => ("linear_tc_vec8", 128),
            (_, false) => ("linear_tc_scalar", 128),
        }
    }

    /// The tensor-core kernel with 128x128 tiles (64 bytes of each row per K
    /// step: v5's `LINEAR_MMA_*`, v3's `LinearTcLarge`), its block size and
    /// K step; 16-byte copies only.
    fn large_kernel(self) -> Option<(&'static str, u32, usize)> {
        match self {
            Gemm::Half | Gemm::HalfSquare => Some(("linear_mma_vec8", 128, 32)),
            Gemm::Warpgroup | Gemm::WarpgroupSquare => Some(("linear_wgmma_vec8", 128, 32)),
            Gemm::WarpgroupSerial => Some(("linear_wgmma_serial_vec8", 128, 32)),
            Gemm::HalfWmma => Some(("linear_tc_large_vec8", 256, 32)),
            Gemm::Tf32 => Some(("linear_tc_tf32_large_vec4", 256, 16)),
            Gemm::Tiled => None,
        }
    }
}

/// How `linear` runs for `d`. `wide`: K is a multiple of 16 bytes' worth of
/// elements (4 f32, 8 f16 / bf16) and x and w are 16-byte aligned, so rows
/// can be copied 16 bytes at a time (v2's float4 loads, v3's cp.async).
/// `clusters`: split GEMMs may add their slices in a thread-block cluster.
pub(crate) fn plan(
    d: LinearDims,
    version: KernelVersion,
    sm_count: u32,
    gemm: Gemm,
    wide: bool,
    clusters: bool,
) -> Result<LinearPlan> {
    match version {
        KernelVersion::Naive => Ok(LinearPlan::Naive {
            grid: (
                blocks_for("linear", d.n, 16)?,
                blocks_for("linear", d.m, 16)?,
                1,
            ),
        }),
        KernelVersion::Fast if d.m <= ROWS_MAX_M => {
            // One chunk of 4 K columns per thread up to the block's size;
            // past it, with 16-byte loads, two chunks a thread in flight.
            let threads =
                d.k.div_ceil(4)
                    .next_multiple_of(32)
                    .clamp(32, ROWS_MAX_THREADS);
            Ok(LinearPlan::Rows {
                kernel: match (wide, d.k > 4 * ROWS_MAX_THREADS) {
                    (true, false) => "linear_rows_vec4",
                    (true, true) => "linear_rows_deep_vec4",
                    (false, _) => "linear_rows_scalar",
                },
                threads: threads as u32,
                grid: (
                    blocks_for("linear", d.n, ROWS_N)?,
                    blocks_for("linear", d.m, ROWS_M)?,
                    1,
                ),
            })
        }
        KernelVersion::Fast => {
            let large_tiles = d.m.div_ceil(LARGE_TILE) * d.n.div_ceil(LARGE_TILE);
            if let Some((kernel, threads, k_step)) = gemm.large_kernel() {
                if wide && large_tiles >= sm_count as usize {
                    let narrow = gemm
                        .narrow_kernel()
                        .filter(|_| narrow_tiles_spread_better(d, sm_count));
                    let (kernel, columns) = match narrow {
                        Some(narrow) => (narrow, NARROW_TILE),
                        None => (kernel, LARGE_TILE),
                    };
                    return Ok(LinearPlan::Tiled {
                        kernel,
                        threads,
                        grid: (
                            blocks_for("linear", d.n, columns)?,
                            blocks_for("linear", d.m, LARGE_TILE)?,
                            1,
                        ),
                        splits: 1,
                        k_per_split: d.k.div_ceil(k_step).max(1) * k_step,
                        cluster: false,
                    });
                }
            }
            let (splits, k_per_split) = split_k(
                d.m,
                d.n,
                d.k,
                sm_count as usize,
                gemm.k_step(),
                gemm.max_splits(d.m, clusters),
            );
            let (kernel, threads) = gemm.kernel(wide);
            Ok(LinearPlan::Tiled {
                kernel,
                threads,
                grid: (
                    blocks_for("linear", d.n, TILE)?,
                    blocks_for("linear", d.m, TILE)?,
                    u32::try_from(splits).unwrap_or(u32::MAX),
                ),
                splits,
                k_per_split,
                cluster: clusters && splits > 1,
            })
        }
    }
}

/// Whether v5's 128x64 tiles share a GEMM of `d` among `sm_count` SMs more
/// evenly than its 128x128 ones: the busiest SM's columns of output (its
/// `ceil(tiles / SMs)` tiles, as many as one wave of blocks gives it, times
/// the tile's width) are fewer. Batch 64's 4928x512 outputs: 156 square
/// tiles leave 24 SMs two (256 columns) and the rest one; 312 narrow ones
/// leave at most three (192). Where the two come out even (N = 768, 1536,
/// 2048 at batch 64), the square tiles' fewer fragment loads per MMA win.
fn narrow_tiles_spread_better(d: LinearDims, sm_count: u32) -> bool {
    let sms = (sm_count as usize).max(1);
    let busiest =
        |columns: usize| (d.m.div_ceil(LARGE_TILE) * d.n.div_ceil(columns)).div_ceil(sms) * columns;
    busiest(NARROW_TILE) < busiest(LARGE_TILE)
}

/// The block size of v4 with its x computed in the block
/// (`layer_norm_linear_rows`, `attention_linear_rows`) for a GEMM of `d`,
/// where those kernels take it: the fast kernels, v4's rows, and K a
/// multiple of 4 with one chunk of 4 per thread of a block (16-byte loads;
/// the caller checks the alignment).
fn rows_prologue_threads(d: LinearDims, version: KernelVersion) -> Option<u32> {
    let fits = version == KernelVersion::Fast
        && d.m <= ROWS_MAX_M
        && d.k.is_multiple_of(4)
        && d.k <= 4 * ROWS_MAX_THREADS;
    fits.then(|| d.k.div_ceil(4).next_multiple_of(32).max(32) as u32)
}

/// How a LayerNorm and the linear reading it run as one kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NormLinearPlan {
    /// `layer_norm_linear_rows` (v4 after the norm), blocks of `threads`.
    Rows { threads: u32 },
    /// v2 or v3 after the norm (`layer_norm_linear_tiled_vec4`,
    /// `layer_norm_linear_tc_vec8`): `k_per_split` columns of K per block
    /// (one K step; two in v2), `splits` blocks per output tile, one
    /// thread-block cluster where more than one.
    Tiled {
        kernel: &'static str,
        threads: u32,
        splits: usize,
        k_per_split: usize,
    },
}

/// Where the norm feeding a GEMM of `d` folds into it ([`NormLinearPlan`]):
/// few rows in v4 (the fast kernels, K a multiple of 4 with one chunk of 4
/// per thread of a block); more rows where `linear` would split the GEMM
/// (grids too small for the device: the latency-bound ones) on the
/// small-tile kernel, if K is at most one K step per block of a cluster
/// (v2: two), with 16-byte copies (`wide`; the caller checks the
/// alignment), not on TF32 (its K steps are half as long), and where one
/// wave holds the grid: the fold must not add a wave to the GEMM. Blocks
/// take the fewest steps that allow it.
fn layer_norm_linear_plan(
    d: LinearDims,
    version: KernelVersion,
    sm_count: u32,
    gemm: Gemm,
    wide: bool,
    clusters: bool,
) -> Result<Option<NormLinearPlan>> {
    if version != KernelVersion::Fast {
        return Ok(None);
    }
    if let Some(threads) = rows_prologue_threads(d, version) {
        return Ok(Some(NormLinearPlan::Rows { threads }));
    }
    if gemm == Gemm::Tf32 || !wide || !clusters {
        return Ok(None);
    }
    let (small, threads) = gemm.kernel(true);
    let (kernel, per_sm, max_steps) = match plan(d, version, sm_count, gemm, wide, clusters)? {
        LinearPlan::Tiled {
            kernel, splits: s, ..
        } if kernel == small && s > 1 => match gemm {
            Gemm::Tiled => (
                "layer_norm_linear_tiled_vec4",
                NORM_TILED_BLOCKS,
                NORM_TILED_STEPS,
            ),
            _ => ("layer_norm_linear_tc_vec8", TC_SMALL_BLOCKS, 1),
        },
        _ => return Ok(None),
    };
    let tiles = d.m.div_ceil(TILE) * d.n.div_ceil(TILE);
    let wave = per_sm * sm_count as usize;
    Ok((1..=max_steps).find_map(|steps| {
        let k_per_split = steps * gemm.k_step();
        let splits = d.k.div_ceil(k_per_split);
        (splits <= MAX_CLUSTER && tiles * splits <= wave).then_some(NormLinearPlan::Tiled {
            kernel,
            threads,
            splits,
            k_per_split,
        })
    }))
}

/// The device address of `t` on `be` (0 where absent), checked; `what`
/// names it in errors.
fn address_of(be: &Cuda, what: impl std::fmt::Display, t: Option<&CudaTensor>) -> Result<u64> {
    t.map_or(Ok(0), |t| be.check_tensor(what, t))
}

/// A LayerNorm's tensors beside a GEMM's, checked: their device addresses (0:
/// absent).
struct NormAddresses {
    residual: u64,
    weight: u64,
    bias: u64,
    sum_out: u64,
}

impl NormAddresses {
    /// The norm of `op` (its name in errors).
    fn check(
        be: &Cuda,
        op: &str,
        residual: Option<&CudaTensor>,
        weight: &CudaTensor,
        bias: &CudaTensor,
        sum_out: Option<&CudaTensor>,
    ) -> Result<Self> {
        Ok(NormAddresses {
            // Names formatted only for an error: this runs at every launch.
            residual: address_of(be, format_args!("{op} residual"), residual)?,
            weight: be.check_tensor(format_args!("{op} norm weight"), weight)?,
            bias: be.check_tensor(format_args!("{op} norm bias"), bias)?,
            sum_out: address_of(be, format_args!("{op} sum_out"), sum_out)?,
        })
    }

    /// Every address a multiple of 16 bytes (the kernels' 16-byte accesses).
    fn aligned(&self) -> bool {
        [self.residual, self.weight, self.bias, self.sum_out]
            .iter()
            .all(|p| p % 16 == 0)
    }
}

/// [`Backend::layer_norm_linear`](crate::ops::Backend::layer_norm_linear)
/// as one kernel, where [`layer_norm_linear_plan`] finds one: `Ok(false)`,
/// with nothing launched, where it does not (the caller runs the two ops).
/// `d` is the linear's dims, the norm's validated to match them.
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm_linear(
    be: &Cuda,
    d: LinearDims,
    norm: NormInput<'_, CudaTensor>,
    sum_out: Option<&mut CudaTensor>,
    w: &CudaTensor,
    b: Option<&CudaTensor>,
    act: Activation,
    out: &mut CudaTensor,
) -> Result<bool> {
    if be.options().separate_layer_norms {
        return Ok(false);
    }
    let (gemm, wide, clusters) = (gemm_of(be), k_wide(be, d.k), be.cluster_split_k());
    let Some(fused) = layer_norm_linear_plan(d, be.version(), be.sm_count(), gemm, wide, clusters)?
    else {
        return Ok(false);
    };
    let op_name = "layer_norm_linear";
    let xp = be.check_tensor("layer_norm_linear x", norm.x)?;
    let (r, g, h, s) = (norm.residual, norm.weight, norm.bias, sum_out.as_deref());
    let na = NormAddresses::check(be, op_name, r, g, h, s)?;
    let wp = be.check_tensor("layer_norm_linear weight", w)?;
    let bp = address_of(be, "layer_norm_linear bias", b)?;
    let op = be.check_tensor("layer_norm_linear out", out)?;
    if !(na.aligned() && xp % 16 == 0 && wp % 16 == 0) {
        return Ok(false);
    }
    let mut inputs = vec![norm.x, norm.weight, norm.bias, w];
    inputs.extend(norm.residual);
    inputs.extend(b);
    let mut outputs: Vec<&CudaTensor> = vec![out];
    outputs.extend(sum_out.as_deref());
    be.check_disjoint("layer_norm_linear", &outputs, &inputs)?;
    let mut params = LayerNormLinearParams {
        linear: LinearParams::unsplit(op_name, d, xp, wp, bp, 0, op, act)?,
        norm_residual: na.residual,
        norm_weight: na.weight,
        norm_bias: na.bias,
        sum_out: na.sum_out,
        eps: f32_param("layer_norm: eps", norm.eps)?,
        pad0: 0,
    };
    match fused {
        NormLinearPlan::Rows { threads } => {
            let grid = (
                blocks_for("layer_norm_linear", d.n, ROWS_N)?,
                blocks_for("layer_norm_linear", d.m, ROWS_M)?,
                1,
            );
            let kernel = "layer_norm_linear_rows";
            be.launch(&PROGRAM, kernel, grid, (threads, 1, 1), &params)?;
        }
        NormLinearPlan::Tiled {
            kernel,
            threads,
            splits,
            k_per_split,
        } => {
            params.linear.k_per_split = i32_of("layer_norm_linear split", k_per_split)?;
            params.linear.splits = i32_of("layer_norm_linear splits", splits)?;
            let grid = (
                blocks_for("layer_norm_linear", d.n, TILE)?,
                blocks_for("layer_norm_linear", d.m, TILE)?,
                splits as u32,
            );
            let cluster = (splits > 1).then_some((1, 1, splits as u32));
            let block = (threads, 1, 1);
            be.launch_in_clusters(&PROGRAM, kernel, grid, block, cluster, &params)?;
        }
    }
    Ok(true)
}

/// The kernel, grid and block size where a linear of `d` and the LayerNorm
/// reading its output run as one kernel: where `linear` takes v5 or v6
/// (16-bit storage, 16-byte copies, a large tile for every SM: batch 64's
/// decoder) and N, a multiple of 8, spans one cluster of narrow tiles, which
/// then holds whole rows; `linear_layer_norm_wgmma_vec8` where `linear`
/// takes v6, else `linear_layer_norm_mma_vec8`. Not under
/// `square_mma_tiles`, `wgmma_serial_steps` or `wmma_large_tiles` (the
/// baselines keep their kernels), nor without clusters.
fn linear_layer_norm_grid(
    d: LinearDims,
    version: KernelVersion,
    sm_count: u32,
    gemm: Gemm,
    wide: bool,
    clusters: bool,
) -> Result<Option<(&'static str, Grid, u32)>> {
    let kernel = match gemm {
        Gemm::Half => "linear_layer_norm_mma_vec8",
        Gemm::Warpgroup => "linear_layer_norm_wgmma_vec8",
        _ => return Ok(None),
    };
    if !clusters || !d.n.is_multiple_of(8) || d.n.div_ceil(NARROW_TILE) > MAX_CLUSTER {
        return Ok(None);
    }
    Ok(match plan(d, version, sm_count, gemm, wide, clusters)? {
        LinearPlan::Tiled {
            kernel: large,
            threads,
            ..
        } if gemm.large_kernel().is_some_and(|(k, ..)| k == large)
            || gemm.narrow_kernel() == Some(large) =>
        {
            let grid = (
                blocks_for("linear_layer_norm", d.n, NARROW_TILE)?,
                blocks_for("linear_layer_norm", d.m, LARGE_TILE)?,
                1,
            );
            Some((kernel, grid, threads))
        }
        _ => None,
    })
}

/// [`linear_layer_norm_grid`] for `d` on `be`, `aligned` saying whether
/// every operand is 16-byte aligned.
fn linear_layer_norm_grid_on(
    be: &Cuda,
    d: LinearDims,
    aligned: bool,
) -> Result<Option<(&'static str, Grid, u32)>> {
    let (gemm, wide) = (gemm_of(be), aligned && k_wide(be, d.k));
    let clusters = be.launches_clusters();
    linear_layer_norm_grid(d, be.version(), be.sm_count(), gemm, wide, clusters)
}

/// The kernel [`linear_layer_norm`] runs a linear of `d` on `be` as, where
/// it runs one (16-byte aligned operands, as `be` allocates them).
pub(super) fn linear_layer_norm_kernel(be: &Cuda, d: LinearDims) -> Option<&'static str> {
    if be.options().separate_layer_norms {
        return None;
    }
    linear_layer_norm_grid_on(be, d, true)
        .ok()
        .flatten()
        .map(|(kernel, ..)| kernel)
}

/// [`Backend::linear_layer_norm`](crate::ops::Backend::linear_layer_norm)
/// as one kernel, where [`linear_layer_norm_grid`] finds one and every
/// operand is 16-byte aligned: `Ok(false)`, with nothing launched, where it
/// does not (the caller runs the two ops). `d` is the linear's dims, the
/// norm's validated to match them.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_layer_norm(
    be: &Cuda,
    d: LinearDims,
    x: &CudaTensor,
    w: &CudaTensor,
    b: Option<&CudaTensor>,
    act: Activation,
    norm: NormAfter<'_, CudaTensor>,
    sum_out: Option<&mut CudaTensor>,
    out: &mut CudaTensor,
) -> Result<bool> {
    if be.options().separate_layer_norms {
        return Ok(false);
    }
    let op_name = "linear_layer_norm";
    let xp = be.check_tensor("linear_layer_norm x", x)?;
    let wp = be.check_tensor("linear_layer_norm weight", w)?;
    let bp = address_of(be, "linear_layer_norm bias", b)?;
    let (r, g, h, s) = (norm.residual, norm.weight, norm.bias, sum_out.as_deref());
    let na = NormAddresses::check(be, op_name, r, g, h, s)?;
    let op = be.check_tensor("linear_layer_norm out", out)?;
    let aligned = na.aligned() && [xp, wp, bp, op].iter().all(|p| p % 16 == 0);
    // Unaligned operands take no 16-byte copies, so no v5 or v6 and no grid.
    let Some((kernel, grid, threads)) = linear_layer_norm_grid_on(be, d, aligned)? else {
        return Ok(false);
    };
    let mut inputs = vec![x, w, norm.weight, norm.bias];
    inputs.extend(b);
    inputs.extend(norm.residual);
    let mut outputs: Vec<&CudaTensor> = vec![out];
    outputs.extend(sum_out.as_deref());
    be.check_disjoint("linear_layer_norm", &outputs, &inputs)?;
    let params = LinearLayerNormParams {
        linear: LinearParams::unsplit(op_name, d, xp, wp, bp, 0, 0, act)?,
        norm_residual: na.residual,
        norm_weight: na.weight,
        norm_bias: na.bias,
        sum_out: na.sum_out,
        norm_out: op,
        eps: f32_param("layer_norm: eps", norm.eps)?,
        pad0: 0,
    };
    let cluster = Some((grid.0, 1, 1));
    be.launch_in_clusters(&PROGRAM, kernel, grid, (threads, 1, 1), cluster, &params)?;
    Ok(true)
}

/// The block size of `attention_linear_rows` for an attention of `a` feeding
/// a GEMM of `d`, where that kernel takes them: v4's rows with one chunk per
/// thread ([`rows_prologue_threads`]), keys few enough for the few-keys
/// attention ([`FEW_KEYS_MAX`]), and a head's columns (head_dim / 4 lanes,
/// 16-byte loads) a power-of-two group of lanes within one warp.
fn attention_linear_threads(
    a: &AttentionDims,
    d: LinearDims,
    version: KernelVersion,
) -> Option<u32> {
    let group = a.head_dim / 4;
    let fits = a.lk <= FEW_KEYS_MAX
        && a.head_dim.is_multiple_of(4)
        && group.is_power_of_two()
        && group <= 32;
    fits.then(|| rows_prologue_threads(d, version)).flatten()
}

/// [`Backend::attention_linear`](crate::ops::Backend::attention_linear) as
/// one kernel, where [`attention_linear_threads`] finds one and the
/// attention's loads can be 16 bytes wide: `Ok(false)`, with nothing
/// launched, elsewhere (the caller runs the two ops). `a` and `d` are the
/// attention's and the linear's dims, validated to match.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_linear(
    be: &Cuda,
    a: AttentionDims,
    d: LinearDims,
    attn: AttentionInput<'_, CudaTensor, CudaMask>,
    w: &CudaTensor,
    b: Option<&CudaTensor>,
    act: Activation,
    out: &mut CudaTensor,
) -> Result<bool> {
    if be.options().separate_attention {
        return Ok(false);
    }
    let Some(threads) = attention_linear_threads(&a, d, be.version()) else {
        return Ok(false);
    };
    let attention = super::attention::params(be, &a, attn, 0)?;
    let wp = be.check_tensor("attention_linear weight", w)?;
    let bp = b
        .map(|t| be.check_tensor("attention_linear bias", t))
        .transpose()?;
    let op = be.check_tensor("attention_linear out", out)?;
    if attention.vec4 == 0 || wp % 16 != 0 {
        return Ok(false);
    }
    let mut inputs = vec![attn.q.tensor, attn.k.tensor, attn.v.tensor, w];
    inputs.extend(b);
    be.check_disjoint("attention_linear", &[out], &inputs)?;
    let params = AttentionLinearParams {
        linear: LinearParams::unsplit("attention_linear", d, 0, wp, bp.unwrap_or(0), 0, op, act)?,
        attention,
    };
    let grid = (
        blocks_for("attention_linear", d.n, ROWS_N)?,
        blocks_for("attention_linear", d.m, ROWS_M)?,
        1,
    );
    let kernel = "attention_linear_rows";
    be.launch(&PROGRAM, kernel, grid, (threads, 1, 1), &params)?;
    Ok(true)
}

pub(crate) fn act_code(act: Activation) -> i32 {
    match act {
        Activation::None => 0,
        Activation::Relu => 1,
        Activation::GeluErf => 2,
        Activation::GeluTanh => 3,
    }
}

/// `be`'s fast GEMM family, as its storage, options and architecture choose it.
pub(super) fn gemm_of(be: &Cuda) -> Gemm {
    Gemm::for_storage(be.storage(), be.options(), be.arch())
}

/// Whether rows of K elements can be copied 16 bytes at a time on `be`
/// (the operands' alignment aside).
fn k_wide(be: &Cuda, k: usize) -> bool {
    k.is_multiple_of(16 / be.storage().size())
}

/// How `linear` runs for `d` on `be`, `aligned` saying whether x and w are
/// 16-byte aligned.
fn plan_on(be: &Cuda, d: LinearDims, aligned: bool) -> Result<LinearPlan> {
    let gemm = gemm_of(be);
    let wide = aligned && k_wide(be, d.k);
    plan(
        d,
        be.version(),
        be.sm_count(),
        gemm,
        wide,
        be.cluster_split_k(),
    )
}

/// The kernel (its name without the storage suffix) that `linear` launches
/// for `d` on `be` with 16-byte aligned operands ([`Cuda::linear_kernel`]).
pub(super) fn kernel_for(be: &Cuda, d: LinearDims) -> Result<&'static str> {
    Ok(match plan_on(be, d, true)? {
        LinearPlan::Naive { .. } => "linear_naive",
        LinearPlan::Rows { kernel, .. } | LinearPlan::Tiled { kernel, .. } => kernel,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    be: &Cuda,
    d: LinearDims,
    x: &CudaTensor,
    w: &CudaTensor,
    b: Option<&CudaTensor>,
    act: Activation,
    residual: Option<&CudaTensor>,
    out: &mut CudaTensor,
) -> Result<()> {
    let xp = be.check_tensor("linear x", x)?;
    let wp = be.check_tensor("linear weight", w)?;
    let bp = b.map(|t| be.check_tensor("linear bias", t)).transpose()?;
    let rp = residual
        .map(|t| be.check_tensor("linear residual", t))
        .transpose()?;
    let op = be.check_tensor("linear out", out)?;
    let mut inputs = vec![x, w];
    inputs.extend(b);
    inputs.extend(residual);
    be.check_disjoint("linear", &[out], &inputs)?;

    let (bias, residual) = (bp.unwrap_or(0), rp.unwrap_or(0));
    let mut params = LinearParams::unsplit("linear", d, xp, wp, bias, residual, op, act)?;
    match plan_on(be, d, xp % 16 == 0 && wp % 16 == 0)? {
        LinearPlan::Naive { grid } => {
            be.launch(&PROGRAM, "linear_naive", grid, (16, 16, 1), &params)
        }
        LinearPlan::Rows {
            kernel,
            threads,
            grid,
        } => be.launch(&PROGRAM, kernel, grid, (threads, 1, 1), &params),
        LinearPlan::Tiled {
            kernel,
            threads,
            grid,
            splits,
            k_per_split,
            cluster,
        } => {
            params.k_per_split = i32_of("linear split", k_per_split)?;
            params.splits = i32_of("linear splits", splits)?;
            if splits == 1 {
                return be.launch(&PROGRAM, kernel, grid, (threads, 1, 1), &params);
            }
            if cluster {
                // One cluster per tile: its blocks are the tile's K slices.
                let blocks = (1, 1, grid.2);
                let block = (threads, 1, 1);
                return be.launch_in_clusters(&PROGRAM, kernel, grid, block, Some(blocks), &params);
            }
            // [splits, M, N] partial sums; back to the pool when this returns,
            // reusable only by work queued after this launch.
            let workspace = be.scratch(splits * d.m * d.n * 4)?;
            params.partial = workspace.ptr();
            params.tile_counters = be.tile_counters(grid.0 as usize * grid.1 as usize)?;
            be.launch(&PROGRAM, kernel, grid, (threads, 1, 1), &params)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(m: usize, n: usize, k: usize) -> LinearDims {
        LinearDims { m, n, k }
    }

    #[test]
    fn layout_has_no_padding() {
        assert_eq!(std::mem::size_of::<LinearParams>(), 7 * 8 + 6 * 4);
        assert_eq!(
            std::mem::size_of::<LayerNormLinearParams>(),
            std::mem::size_of::<LinearParams>() + 4 * 8 + 2 * 4
        );
    }

    #[test]
    fn attention_folds_where_its_heads_are_lane_groups() {
        let fast = KernelVersion::Fast;
        let attn = super::super::attention::packed_dims;
        // Batch 1's encoder: 4 rows of 4 heads of 128, a warp per head.
        let t = |a: AttentionDims, version| {
            let d = dims(a.batch * a.lq, 512, a.heads * a.head_dim);
            attention_linear_threads(&a, d, version)
        };
        assert_eq!(t(attn(1, 4, 4, 4, 128), fast), Some(128));
        // Heads of 4 to 128 columns (groups of 1 to 32 lanes), 16 keys.
        assert_eq!(t(attn(2, 8, 16, 8, 16), fast), Some(32));
        assert_eq!(t(attn(4, 4, 4, 64, 4), fast), Some(64));
        // More keys than the few-keys attention takes, a head that is no
        // power-of-two group of lanes or more than a warp, more rows than
        // v4 takes, the naive kernels: two ops.
        for (a, version) in [
            (attn(1, 4, 17, 4, 128), fast),
            (attn(1, 4, 4, 4, 72), fast),
            (attn(1, 4, 4, 2, 256), fast),
            (attn(1, 4, 4, 4, 6), fast),
            (attn(1, 77, 4, 4, 128), fast),
            (attn(1, 4, 4, 4, 128), KernelVersion::Naive),
        ] {
            assert_eq!(t(a, version), None, "{a:?}");
        }
    }

    #[test]
    fn layer_norm_linear_takes_what_one_block_holds() {
        let fast = KernelVersion::Fast;
        // Batch 1's encoder: 4 rows of 512, one chunk for each of 128 threads.
        assert_eq!(rows_prologue_threads(dims(4, 1536, 512), fast), Some(128));
        assert_eq!(rows_prologue_threads(dims(16, 8, 1024), fast), Some(256));
        assert_eq!(rows_prologue_threads(dims(1, 5, 4), fast), Some(32));
        // More rows than v4 takes, K past one chunk per thread or not a
        // multiple of 4, and the naive kernels: two ops.
        for (d, version) in [
            (dims(77, 512, 512), fast),
            (dims(4, 512, 1028), fast),
            (dims(4, 512, 510), fast),
            (dims(4, 512, 512), KernelVersion::Naive),
        ] {
            assert_eq!(rows_prologue_threads(d, version), None, "{d:?}");
        }
    }

    #[test]
    fn splits_cover_k_exactly() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (4, 512, 4096),
            (77, 1536, 512),
            (154, 512, 2048),
            (77, 129, 513),
            (1, 1, 100_000),
            (616, 512, 2048),
        ] {
            for sms in [1, 8, 132] {
                for (gemm, cluster) in [
                    (Gemm::Tf32, false),
                    (Gemm::Half, false),
                    (Gemm::Tiled, false),
                    (Gemm::Tf32, true),
                    (Gemm::Tiled, true),
                ] {
                    let (step, most) = (gemm.k_step(), gemm.max_splits(m, cluster));
                    let (s, kps) = split_k(m, n, k, sms, step, most);
                    assert!((1..=MAX_SPLITS).contains(&s), "{m}x{n}x{k}: {s} splits");
                    assert_eq!(kps % step, 0);
                    // Every split starts inside K, the last one reaches it.
                    assert!(
                        (s - 1) * kps < k && s * kps >= k,
                        "{m}x{n}x{k}: {s} x {kps}"
                    );
                    // The finishing block's share stays bounded; a cluster
                    // has at most MAX_CLUSTER blocks.
                    assert!(s <= most, "{m}x{n}x{k}: {s} > {most}");
                    if !cluster {
                        assert!(s * m.min(TILE) <= gemm.finish_slices() * TILE);
                    }
                }
            }
        }
    }

    #[test]
    fn small_grids_are_split_large_are_not() {
        let split = |m, n, k, gemm: Gemm, cluster| {
            split_k(m, n, k, 132, gemm.k_step(), gemm.max_splits(m, cluster))
        };
        // 8 tiles of 4 rows on 132 SMs (the fc at batch 1, were it not v4's).
        assert_eq!(split(4, 512, 4096, Gemm::Tiled, false), (32, 128));
        assert_eq!(split(4, 512, 4096, Gemm::Tiled, true), (8, 512));
        // Decoder out projection at batch 1: 16 tiles, split as far as the
        // finishing block allows: 8 one-step splits on v2, 4 on v3; in a
        // cluster, 8 on both.
        assert_eq!(split(77, 512, 512, Gemm::Tiled, false), (8, 64));
        assert_eq!(split(77, 512, 512, Gemm::Half, false), (4, 128));
        assert_eq!(split(77, 512, 512, Gemm::Tf32, false), (4, 128));
        assert_eq!(split(77, 512, 512, Gemm::Half, true), (8, 64));
        assert_eq!(split(77, 512, 512, Gemm::Tf32, true), (8, 64));
        // Decoder FFN up at batch 1: 64 tiles, two blocks per SM.
        assert_eq!(split(77, 2048, 512, Gemm::Tiled, false), (4, 128));
        assert_eq!(split(77, 2048, 512, Gemm::Half, true), (4, 128));
        // Batch 64 decoder FFN: 77 x 8 tiles, enough on their own.
        assert_eq!(split(64 * 77, 512, 2048, Gemm::Tiled, false).0, 1);
        // K shorter than two steps is never split.
        assert_eq!(split(4, 512, 100, Gemm::Tiled, false).0, 1);
    }

    #[test]
    fn plans_cover_the_output() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 7),
            (77, 129, 513),
            (4, 512, 4096),
            (513, 33, 64),
        ] {
            match plan(
                dims(m, n, k),
                KernelVersion::Naive,
                132,
                Gemm::Tiled,
                true,
                true,
            )
            .unwrap()
            {
                LinearPlan::Naive { grid } => {
                    assert!(grid.0 as usize * 16 >= n && grid.1 as usize * 16 >= m);
                }
                p => panic!("{p:?}"),
            }
            for (gemm, clusters) in [
                (Gemm::Tiled, false),
                (Gemm::Half, false),
                (Gemm::Tf32, false),
                (Gemm::Tiled, true),
                (Gemm::Half, true),
            ] {
                match plan(
                    dims(m, n, k),
                    KernelVersion::Fast,
                    132,
                    gemm,
                    false,
                    clusters,
                )
                .unwrap()
                {
                    LinearPlan::Rows {
                        kernel,
                        threads,
                        grid,
                    } => {
                        assert!(m <= ROWS_MAX_M, "{m} rows");
                        assert_eq!(kernel, "linear_rows_scalar");
                        assert!(grid.0 as usize * ROWS_N >= n && grid.1 as usize * ROWS_M >= m);
                        assert_eq!(grid.2, 1);
                        assert!(threads % 32 == 0 && (32..=256).contains(&threads));
                    }
                    LinearPlan::Tiled {
                        kernel,
                        grid,
                        splits,
                        k_per_split,
                        cluster,
                        ..
                    } => {
                        assert!(kernel.ends_with("scalar"), "{kernel}");
                        assert!(grid.0 as usize * TILE >= n && grid.1 as usize * TILE >= m);
                        assert_eq!(grid.2 as usize, splits);
                        assert!(splits * k_per_split >= k);
                        assert_eq!(k_per_split % gemm.k_step(), 0);
                        // A split grid's tiles fit the backend's counters (one
                        // per SM), or its tiles are clusters of its splits.
                        assert_eq!(cluster, clusters && splits > 1);
                        if cluster {
                            assert!(splits <= MAX_CLUSTER);
                        } else if splits > 1 {
                            assert!((grid.0 * grid.1) < 132);
                        }
                    }
                    p => panic!("{p:?}"),
                }
            }
        }
    }

    #[test]
    fn kernel_steps_match_the_kernels() {
        let src = PROGRAM.source;
        assert!(src.contains(&format!("#define LINEAR_BK {}", Gemm::Tiled.k_step())));
        assert!(src.contains(&format!("#define LINEAR_BM {TILE}")));
        assert!(src.contains(&format!("#define LINEAR_BN {TILE}")));
        // v3's tiles: K steps of 128 (small) and 64 (large) bytes per row.
        assert_eq!(Gemm::Half.k_step() * 2, 128);
        assert_eq!(Gemm::Tf32.k_step() * 4, 128);
        assert!(src.contains(&format!(
            "typedef LinearTcTile<{TILE}, {TILE}, 2, 2, 128> LinearTcSmall;"
        )));
        assert!(src.contains(&format!(
            "typedef LinearTcTile<{LARGE_TILE}, {LARGE_TILE}, 2, 4, 64> LinearTcLarge;"
        )));
        for (gemm, elem) in [(Gemm::HalfWmma, 2), (Gemm::Tf32, 4)] {
            let (_, threads, step) = gemm.large_kernel().unwrap();
            assert_eq!((threads, step * elem), (256, 64));
        }
        assert!(src.contains(&format!(
            "#define LINEAR_NORM_TILED_BLOCKS {NORM_TILED_BLOCKS}"
        )));
        assert!(src.contains(&format!(
            "#define LINEAR_NORM_TILED_STEPS {NORM_TILED_STEPS}"
        )));
        assert!(src.contains(&format!("#define LINEAR_TC_SMALL_BLOCKS {TC_SMALL_BLOCKS}")));
        // v5: 128x128 tiles of 4 warps, K steps of 32.
        let (_, threads, step) = Gemm::Half.large_kernel().unwrap();
        assert!(src.contains(&format!("#define LINEAR_MMA_BM {LARGE_TILE}")));
        assert!(src.contains(&format!("#define LINEAR_MMA_BN {LARGE_TILE}")));
        assert!(src.contains(&format!("#define LINEAR_MMA_NARROW_BN {NARROW_TILE}")));
        assert!(src.contains(&format!("#define LINEAR_MMA_BK {step}")));
        assert!(src.contains(&format!("#define LINEAR_MMA_THREADS {threads}")));
        assert!(src.contains(&format!("#define LINEAR_MAX_CLUSTER {MAX_CLUSTER}")));
        assert!(src.contains("#define LINEAR_TC_SMALL_THREADS 128"));
        assert!(src.contains("#define LINEAR_TC_LARGE_THREADS 256"));
    }

    #[test]
    fn few_rows_take_v4_in_every_storage() {
        // Batch 1's encoder GEMMs (4 rows), the audio preset's (8), 16 rows;
        // 17 rows and the decoder's 77 stay tiled.
        // Past 1024 columns of K (the fc's 4096, FFN down's 2048), two
        // chunks a thread in flight.
        for (m, n, k, threads, kernel) in [
            (4, 512, 4096, 256, "linear_rows_deep_vec4"),
            (4, 1536, 512, 128, "linear_rows_vec4"),
            (8, 2048, 512, 128, "linear_rows_vec4"),
            (16, 512, 2048, 256, "linear_rows_deep_vec4"),
            (4, 512, 1024, 256, "linear_rows_vec4"),
            (4, 512, 1028, 256, "linear_rows_deep_vec4"),
            (3, 5, 7, 32, "linear_rows_vec4"),
            (1, 1, 1, 32, "linear_rows_vec4"),
        ] {
            for gemm in [Gemm::Tiled, Gemm::Half, Gemm::Tf32] {
                let p = plan(dims(m, n, k), KernelVersion::Fast, 132, gemm, true, true).unwrap();
                let want = LinearPlan::Rows {
                    kernel,
                    threads,
                    grid: (n.div_ceil(ROWS_N) as u32, m.div_ceil(ROWS_M) as u32, 1),
                };
                assert_eq!(p, want, "{m}x{n}x{k}");
            }
        }
        for m in [ROWS_MAX_M + 1, 77] {
            let p = plan(
                dims(m, 512, 512),
                KernelVersion::Fast,
                132,
                Gemm::Tiled,
                true,
                false,
            );
            assert!(matches!(p, Ok(LinearPlan::Tiled { .. })), "{m}: {p:?}");
        }
        let src = PROGRAM.source;
        assert!(src.contains(&format!("#define LINEAR_ROWS_M {ROWS_M}")));
        assert!(src.contains(&format!("#define LINEAR_ROWS_N {ROWS_N}")));
        assert!(src.contains(&format!(
            "#define LINEAR_ROWS_MAX_THREADS {ROWS_MAX_THREADS}"
        )));
    }

    #[test]
    fn narrow_tiles_where_square_ones_fall_unevenly() {
        let narrow = |m, n| narrow_tiles_spread_better(dims(m, n, 512), 132);
        // Batch 64 (4928 rows): only N = 512 (2 x 128 against 3 x 64
        // columns on the busiest SM); 768, 1536 and 2048 come out even.
        assert!(narrow(4928, 512));
        for n in [768, 1536, 2048] {
            assert!(!narrow(4928, n), "{n}");
        }
        // Exactly one square tile per SM: even already.
        assert!(!narrow(128 * 11, 128 * 12));
        // Four SMs with two square tiles (136): three narrow ones at most.
        assert!(narrow(128 * 34, 512));
        // No SMs (never reported): no division by zero.
        assert!(!narrow_tiles_spread_better(dims(4928, 512, 512), 0));
    }

    #[test]
    fn linear_layer_norm_where_a_cluster_holds_whole_rows() {
        let fast = KernelVersion::Fast;
        let grid = |d, gemm, wide, clusters| {
            linear_layer_norm_grid(d, fast, 132, gemm, wide, clusters).unwrap()
        };
        // Batch 64's decoder: the out-projections and FFN down (N = 512),
        // 8 narrow tiles along N, 39 row tiles.
        for k in [512, 2048] {
            let d = dims(4928, 512, k);
            let v5 = Some(("linear_layer_norm_mma_vec8", (8, 39, 1), 128));
            assert_eq!(grid(d, Gemm::Half, true, true), v5);
            // v6's products where `linear` takes v6.
            let v6 = Some(("linear_layer_norm_wgmma_vec8", (8, 39, 1), 128));
            assert_eq!(grid(d, Gemm::Warpgroup, true, true), v6);
            // Not on the baselines, f32 or TF32, without 16-byte copies or
            // clusters, nor with the naive kernels.
            for gemm in [
                Gemm::HalfSquare,
                Gemm::WarpgroupSquare,
                Gemm::WarpgroupSerial,
                Gemm::HalfWmma,
                Gemm::Tiled,
                Gemm::Tf32,
            ] {
                assert_eq!(grid(d, gemm, true, true), None, "{gemm:?}");
            }
            assert_eq!(grid(d, Gemm::Half, false, true), None);
            assert_eq!(grid(d, Gemm::Half, true, false), None);
            let naive =
                linear_layer_norm_grid(d, KernelVersion::Naive, 132, Gemm::Half, true, true);
            assert_eq!(naive.unwrap(), None);
        }
        // Where v5 takes the square tiles, a cluster of narrow ones still
        // holds the rows; a row of more than 8 x 64 columns, or not a
        // multiple of 8, does not fold; nor grids v5 does not take (few
        // rows: split-K).
        let square = dims(128 * 66, 512, 512);
        assert_eq!(
            plan(square, fast, 132, Gemm::Half, true, true).unwrap(),
            plan(square, fast, 132, Gemm::HalfSquare, true, true).unwrap()
        );
        assert_eq!(
            grid(square, Gemm::Half, true, true),
            Some(("linear_layer_norm_mma_vec8", (8, 66, 1), 128))
        );
        assert_eq!(
            grid(square, Gemm::Warpgroup, true, true),
            Some(("linear_layer_norm_wgmma_vec8", (8, 66, 1), 128))
        );
        for (m, n) in [(4928, 768), (4928, 520), (4928, 500), (77, 512), (256, 512)] {
            assert_eq!(
                grid(dims(m, n, 512), Gemm::Half, true, true),
                None,
                "{m}x{n}"
            );
        }
    }

    #[test]
    fn warpgroup_mma_on_sm90a_unless_kept_off() {
        let of = |storage, arch, set: fn(&mut CudaOptions)| {
            let mut o = CudaOptions::default();
            set(&mut o);
            Gemm::for_storage(storage, &o, arch)
        };
        let none: fn(&mut CudaOptions) = |_| {};
        for storage in [DType::F16, DType::BF16] {
            assert_eq!(of(storage, "sm_90a", none), Gemm::Warpgroup);
            assert_eq!(
                of(storage, "sm_90a", |o| o.square_mma_tiles = true),
                Gemm::WarpgroupSquare
            );
            assert_eq!(
                of(storage, "sm_90a", |o| o.wgmma_serial_steps = true),
                Gemm::WarpgroupSerial
            );
            assert_eq!(
                of(storage, "sm_90a", |o| o.mma_sync_tiles = true),
                Gemm::Half
            );
            assert_eq!(
                of(storage, "sm_90a", |o| o.wmma_large_tiles = true),
                Gemm::HalfWmma
            );
            // No wgmma below sm_90a, nor in a plain sm_90 compile.
            for arch in ["sm_80", "sm_89", "sm_90", "sm_100"] {
                assert_eq!(of(storage, arch, none), Gemm::Half, "{arch}");
            }
        }
        assert_eq!(of(DType::F32, "sm_90a", none), Gemm::Tiled);
        assert_eq!(of(DType::F32, "sm_90a", |o| o.tf32 = true), Gemm::Tf32);
    }

    #[test]
    fn large_tiles_where_they_fill_the_device() {
        // Batch 64's decoder GEMMs: 39 x 4 large tiles and more. v5 takes
        // 128x64 tiles for N = 512 only (156 square tiles on 132 SMs).
        for (m, n, k) in [(4928, 512, 2048), (4928, 2048, 512), (4928, 1536, 512)] {
            let (v5, v6, serial) = if n == 512 {
                (
                    ("linear_mma_narrow_vec8", NARROW_TILE),
                    ("linear_wgmma_narrow_vec8", NARROW_TILE),
                    ("linear_wgmma_serial_narrow_vec8", NARROW_TILE),
                )
            } else {
                (
                    ("linear_mma_vec8", LARGE_TILE),
                    ("linear_wgmma_vec8", LARGE_TILE),
                    ("linear_wgmma_serial_vec8", LARGE_TILE),
                )
            };
            for (gemm, want_kernel, want_threads, columns) in [
                (Gemm::Half, v5.0, 128, v5.1),
                (Gemm::HalfSquare, "linear_mma_vec8", 128, LARGE_TILE),
                (Gemm::Warpgroup, v6.0, 128, v6.1),
                (Gemm::WarpgroupSquare, "linear_wgmma_vec8", 128, LARGE_TILE),
                (Gemm::WarpgroupSerial, serial.0, 128, serial.1),
                (Gemm::HalfWmma, "linear_tc_large_vec8", 256, LARGE_TILE),
                (Gemm::Tf32, "linear_tc_tf32_large_vec4", 256, LARGE_TILE),
            ] {
                let p = plan(dims(m, n, k), KernelVersion::Fast, 132, gemm, true, true).unwrap();
                let LinearPlan::Tiled {
                    kernel,
                    threads,
                    grid,
                    splits,
                    k_per_split,
                    cluster,
                } = p
                else {
                    panic!("{p:?}")
                };
                assert_eq!((kernel, threads), (want_kernel, want_threads));
                assert_eq!((splits, grid.2, cluster), (1, 1, false));
                assert_eq!(grid.0 as usize, n.div_ceil(columns));
                assert_eq!(grid.1 as usize, m.div_ceil(LARGE_TILE));
                assert!(k_per_split >= k);
            }
            // Not on CUDA cores, and not without 16-byte copies.
            for (gemm, wide, small) in [
                (Gemm::Tiled, true, "linear_tiled_vec4"),
                (Gemm::Half, false, "linear_tc_scalar"),
            ] {
                match plan(dims(m, n, k), KernelVersion::Fast, 132, gemm, wide, false).unwrap() {
                    LinearPlan::Tiled { kernel, .. } => assert_eq!(kernel, small),
                    p => panic!("{p:?}"),
                }
            }
        }
        // Batch 8 (616 rows): 5 x 4 large tiles would leave SMs idle.
        match plan(
            dims(616, 512, 512),
            KernelVersion::Fast,
            132,
            Gemm::Half,
            true,
            false,
        )
        .unwrap()
        {
            LinearPlan::Tiled { kernel, .. } => assert_eq!(kernel, "linear_tc_vec8"),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn norms_fold_into_split_gemms_of_one_cluster() {
        let at = |m, n, k, gemm, wide, clusters| {
            layer_norm_linear_plan(
                dims(m, n, k),
                KernelVersion::Fast,
                132,
                gemm,
                wide,
                clusters,
            )
            .unwrap()
        };
        let tiled = |kernel, threads, splits, k_per_split| {
            Some(NormLinearPlan::Tiled {
                kernel,
                threads,
                splits,
                k_per_split,
            })
        };
        // Batch 1's decoder: 77 rows of 512, one K step of 64 per block,
        // where one wave holds the grid: 2 x 4 x 8 blocks (cross-attention
        // Q), 2 x 12 x 8 (output), and in 16-bit (4 blocks per SM) also
        // 2 x 24 x 8 (QKV) and 2 x 32 x 8 (FFN up). In f32 (2 blocks per
        // SM) those two take two steps per block: 2 x 24 x 4 and 2 x 32 x 4.
        let v2 = "layer_norm_linear_tiled_vec4";
        let v3 = "layer_norm_linear_tc_vec8";
        for n in [512, 768] {
            assert_eq!(
                at(77, n, 512, Gemm::Tiled, true, true),
                tiled(v2, 256, 8, 64)
            );
        }
        for n in [1536, 2048] {
            let two_steps = tiled(v2, 256, 4, 128);
            assert_eq!(at(77, n, 512, Gemm::Tiled, true, true), two_steps);
        }
        for n in [512, 768, 1536, 2048] {
            let one_step = tiled(v3, 128, 8, 64);
            assert_eq!(at(77, n, 512, Gemm::Half, true, true), one_step);
            assert_eq!(at(77, n, 512, Gemm::HalfWmma, true, true), one_step);
        }
        // Batch 8's (616 rows: 10 x 8 tiles x 8 splits, past one wave; in
        // f32 also at two steps, 10 x 8 x 4) not; a ragged K of 200 in 4
        // steps; K of 1024 in 8 blocks of two steps (v2 only).
        assert_eq!(at(616, 512, 512, Gemm::Half, true, true), None);
        assert_eq!(at(616, 512, 512, Gemm::Tiled, true, true), None);
        assert_eq!(
            at(77, 130, 200, Gemm::Tiled, true, true),
            tiled(v2, 256, 4, 64)
        );
        let deep = tiled(v2, 256, 8, 128);
        assert_eq!(at(77, 512, 1024, Gemm::Tiled, true, true), deep);
        assert_eq!(at(77, 512, 1024, Gemm::Half, true, true), None);
        // Few rows: v4.
        assert_eq!(
            at(4, 1536, 512, Gemm::Half, true, true),
            Some(NormLinearPlan::Rows { threads: 128 })
        );
        // Two ops: no clusters, TF32, K past one cluster's steps, no 16-byte
        // copies, grids that fill the device unsplit (batch 64).
        assert_eq!(at(77, 512, 512, Gemm::Tiled, true, false), None);
        assert_eq!(at(77, 512, 512, Gemm::Tf32, true, true), None);
        assert_eq!(at(77, 512, 2048, Gemm::Tiled, true, true), None);
        assert_eq!(at(77, 512, 512, Gemm::Half, false, true), None);
        assert_eq!(at(4928, 512, 512, Gemm::Tiled, true, true), None);
        assert_eq!(at(4928, 512, 512, Gemm::Half, true, true), None);
        // The naive kernels never fuse.
        let naive = layer_norm_linear_plan(
            dims(4, 512, 512),
            KernelVersion::Naive,
            132,
            Gemm::Tiled,
            true,
            true,
        );
        assert_eq!(naive.unwrap(), None);
    }

    #[test]
    fn activation_codes_match_the_kernels() {
        let src = PROGRAM.source.to_string() + super::super::program::COMMON.1;
        for (act, name) in [
            (Activation::None, "OP_ACT_NONE"),
            (Activation::Relu, "OP_ACT_RELU"),
            (Activation::GeluErf, "OP_ACT_GELU_ERF"),
            (Activation::GeluTanh, "OP_ACT_GELU_TANH"),
        ] {
            assert!(
                src.contains(&format!("#define {name} {}", act_code(act))),
                "{name}"
            );
        }
    }
}
