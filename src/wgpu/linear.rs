//! `linear` on wgpu: `out = act(x · wᵀ + b) + residual`, kernels in `shaders/linear.wgsl`.
//!
//! The naive v1 runs one invocation per output. The fast path is a tiled GEMM
//! (32x128 blocks, 8x8 outputs per invocation) or, for a few rows, a K-split
//! kernel (4x32 blocks of 64 invocations for a CPU adapter, 4x8 blocks of 128
//! for a GPU: [`Tuning`]); each comes in a vec4 form and a scalar form for
//! shapes or offsets that vec4 loads cannot serve. On a GPU, a tiled GEMM of
//! too few blocks to fill it (the decoder at batch 1: 77 x 512 outputs are 12
//! blocks) runs split-K: each workgroup sums a block over a slice of K into
//! f32 scratch, then one invocation per output adds the slices and finishes.

use super::backend::{Bind, Kernel, KernelVersion, Tuning, Wgpu, WgpuTensor};
use crate::error::{Error, Result};
use crate::ops::{Activation, LinearDims};

const fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "linear.wgsl",
        source: include_str!("../../shaders/linear.wgsl"),
        entry,
        reads: 4,
        writes: 1,
        // x, then w: `w_at` and `w4_at` read it in the backend's weight type.
        weight: Some(1),
    }
}

const V1: Kernel = kernel("linear_v1");
const TILED: Kernel = kernel("linear");
const TILED_SCALAR: Kernel = kernel("linear_s");
const ROWS: Kernel = kernel("linear_rows");
const ROWS_SCALAR: Kernel = kernel("linear_rows_s");
const ROWS_NARROW: Kernel = kernel("linear_rows_narrow");
const ROWS_NARROW_SCALAR: Kernel = kernel("linear_rows_narrow_s");
const SPLIT: Kernel = kernel("linear_split");
const SPLIT_SCALAR: Kernel = kernel("linear_split_s");
const SPLIT_SUM: Kernel = kernel("linear_split_sum");

/// Every kernel of this op (for the translation tests).
#[cfg(test)]
pub(super) fn kernels() -> Vec<Kernel> {
    vec![
        V1,
        TILED,
        TILED_SCALAR,
        ROWS,
        ROWS_SCALAR,
        ROWS_NARROW,
        ROWS_NARROW_SCALAR,
        SPLIT,
        SPLIT_SCALAR,
        SPLIT_SUM,
    ]
}

/// Invocations per workgroup of `linear_v1`.
const V1_WORKGROUP: usize = 64;
/// Output block of the tiled kernels, and their step along K.
const TILE_M: usize = 32;
const TILE_N: usize = 128;
const TILE_K: usize = 16;
/// Workgroups that keep a large GPU busy: about two per compute unit (132
/// SMs on an H100, 96 CUs on an RX 7900 XTX). On a GPU, a tiled GEMM of fewer
/// blocks splits K into slices to come near it...
const GPU_WORKGROUPS: usize = 256;
/// ...each at least 8 tile steps long, so that a slice's sums outweigh
/// writing and re-reading them.
const MIN_K_SLICE: usize = 8 * TILE_K;
/// Output block of the few-rows kernels: 4 x 32 for a CPU adapter, 4 x 8
/// for a GPU.
const ROWS_M: usize = 4;
const ROWS_N: usize = 32;
const ROWS_NARROW_N: usize = 8;
/// Up to this many rows the K-split kernel wins: a 32-row tile would mostly
/// compute padding, and too few blocks would keep a GPU idle. On lavapipe
/// (4x32 blocks) it is 2x faster at M = 8 and still ahead at M = 16
/// (K = 512); the tile wins from M = 24. Not measured on a GPU.
const MAX_FEW_ROWS: usize = 16;

wgsl_params! {
    shader: "linear.wgsl",
    struct Params {
        m: u32,
        n: u32,
        k: u32,
        act: u32,
        has_bias: u32,
        has_residual: u32,
        groups_x: u32,
        blocks_n: u32,
        blocks: u32,
        splits: u32,
        k_split: u32,
    }
}

fn act_code(act: Activation) -> u32 {
    match act {
        Activation::None => 0,
        Activation::Relu => 1,
        Activation::GeluErf => 2,
        Activation::GeluTanh => 3,
    }
}

/// Room above the largest flat index: the v1 grid rounds the outputs up to
/// whole grid rows (at most 65535 x 64 invocations more), and block origins
/// round up to whole blocks.
const INDEX_MARGIN: usize = 1 << 23;

/// An error unless `a * b` plus [`INDEX_MARGIN`] fits the kernels' u32 indices.
fn check_extent(a: usize, b: usize) -> Result<()> {
    let p = a
        .checked_mul(b)
        .and_then(|p| p.checked_add(INDEX_MARGIN))
        .ok_or_else(|| Error::Overflow(format!("linear: {a} x {b}")))?;
    super::u32_of(p).map(drop)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    be: &Wgpu,
    d: LinearDims,
    x: &WgpuTensor,
    w: &WgpuTensor,
    b: Option<&WgpuTensor>,
    act: Activation,
    residual: Option<&WgpuTensor>,
    out: &mut WgpuTensor,
) -> Result<()> {
    // Every flat index the kernels form is within one of these extents.
    check_extent(d.m, d.k)?;
    check_extent(d.n, d.k)?;
    check_extent(d.m, d.n)?;
    let mut params = Params {
        m: super::u32_of(d.m)?,
        n: super::u32_of(d.n)?,
        k: super::u32_of(d.k)?,
        act: act_code(act),
        has_bias: u32::from(b.is_some()),
        has_residual: u32::from(residual.is_some()),
        groups_x: 0,
        blocks_n: 0,
        blocks: 0,
        splits: 1,
        k_split: 0,
    };
    if be.version() == KernelVersion::Naive {
        let groups = be.grid((d.m * d.n).div_ceil(V1_WORKGROUP))?;
        params.groups_x = groups[0];
        return be.dispatch(
            &V1,
            &params,
            &[x.into(), w.into(), b.into(), residual.into()],
            &[out],
            groups,
        );
    }
    // vec4 loads need whole vec4 rows and tensors that start on a vec4.
    let on_vec4 = |t: &WgpuTensor| t.offset().is_multiple_of(4 * t.dtype().size() as u64);
    let vec4 = d.k.is_multiple_of(4) && on_vec4(x) && on_vec4(w);
    let tiled = d.m > MAX_FEW_ROWS;
    let gpu = be.tuning() == Tuning::Gpu;
    let (bm, bn, kernels) = if tiled {
        (TILE_M, TILE_N, [&TILED, &TILED_SCALAR])
    } else if gpu {
        (ROWS_M, ROWS_NARROW_N, [&ROWS_NARROW, &ROWS_NARROW_SCALAR])
    } else {
        (ROWS_M, ROWS_N, [&ROWS, &ROWS_SCALAR])
    };
    let blocks_n = d.n.div_ceil(bn);
    let blocks = d.m.div_ceil(bm) * blocks_n;
    params.blocks_n = super::u32_of(blocks_n)?;
    params.blocks = super::u32_of(blocks)?;
    let (k_split, splits) = if tiled && gpu {
        k_slices(blocks, d.k)
    } else {
        (d.k, 1)
    };
    if splits > 1 {
        check_extent(d.m * d.n, splits)?;
        params.splits = super::u32_of(splits)?;
        params.k_split = super::u32_of(k_split)?;
        let partials = be.alloc_f32_scratch(splits * d.m * d.n)?;
        let groups = be.grid(blocks * splits)?;
        params.groups_x = groups[0];
        let kernel = [&SPLIT, &SPLIT_SCALAR][usize::from(!vec4)];
        be.dispatch(
            kernel,
            &params,
            &[x.into(), w.into(), Bind::Unused, Bind::Unused],
            &[&partials],
            groups,
        )?;
        let groups = be.grid((d.m * d.n).div_ceil(V1_WORKGROUP))?;
        params.groups_x = groups[0];
        return be.dispatch(
            &SPLIT_SUM,
            &params,
            &[(&partials).into(), Bind::Unused, b.into(), residual.into()],
            &[out],
            groups,
        );
    }
    let groups = be.grid(blocks)?;
    params.groups_x = groups[0];
    be.dispatch(
        kernels[usize::from(!vec4)],
        &params,
        &[x.into(), w.into(), b.into(), residual.into()],
        &[out],
        groups,
    )
}

/// K per slice and the number of slices for a tiled GEMM of `blocks` blocks
/// on a GPU: as many as bring its workgroups near [`GPU_WORKGROUPS`], each at
/// least [`MIN_K_SLICE`] long and a whole number of tile steps (one slice: no
/// split).
fn k_slices(blocks: usize, k: usize) -> (usize, usize) {
    let want = GPU_WORKGROUPS
        .div_ceil(blocks.max(1))
        .min(k / MIN_K_SLICE)
        .max(1);
    let k_split = k.div_ceil(want).next_multiple_of(TILE_K).max(TILE_K);
    (k_split, k.div_ceil(k_split).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoder's GEMMs at batch 1 split into slices of 128; batch 64's
    /// do not split; every slice is a whole number of tile steps and none
    /// is empty.
    #[test]
    fn k_slices_cover_k() {
        assert_eq!(k_slices(12, 2048), (128, 16));
        assert_eq!(k_slices(12, 512), (128, 4));
        assert_eq!(k_slices(48, 512), (128, 4));
        assert_eq!(k_slices(616, 2048), (2048, 1));
        assert_eq!(k_slices(12, 100), (112, 1));
        for blocks in [1, 2, 3, 12, 100, 255, 256, 1000] {
            for k in (0..3000).step_by(7) {
                let (k_split, slices) = k_slices(blocks, k);
                assert!(k_split.is_multiple_of(TILE_K) && slices >= 1);
                assert!(slices * k_split >= k && (slices - 1) * k_split < k.max(1));
                assert!(slices == 1 || blocks * slices < GPU_WORKGROUPS + blocks);
            }
        }
    }
}
