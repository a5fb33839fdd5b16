//! `kernels/layer_norm.cu`: naive v1 (a thread per row) and v2 (a warp per row,
//! 16-byte loads when aligned), both with the residual add fused.

use cudarc::driver::DeviceRepr;

use super::backend::{blocks_for, i32_of, Cuda, CudaTensor, KernelVersion};
use super::program::{param_layout, Program};
use crate::error::Result;
use crate::ops::{f32_param, LayerNormDims};

/// Mirror of `LayerNormParams` in kernels/layer_norm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct LayerNormParams {
    x: u64,
    residual: u64,
    weight: u64,
    bias: u64,
    out: u64,
    sum_out: u64,
    rows: i32,
    cols: i32,
    eps: f32,
    pad0: i32,
}

// SAFETY: plain data (u64, i32 and f32 fields, no padding), laid out exactly as
// the kernels' LayerNormParams: the static_asserts compiled into layer_norm.cu
// check it.
unsafe impl DeviceRepr for LayerNormParams {}

fn layouts() -> String {
    param_layout!(LayerNormParams {
        x,
        residual,
        weight,
        bias,
        out,
        sum_out,
        rows,
        cols,
        eps,
        pad0
    })
}

pub(crate) static PROGRAM: Program = Program {
    file: "layer_norm.cu",
    source: include_str!("../../kernels/layer_norm.cu"),
    kernels: &[
        "layer_norm_naive",
        "layer_norm_warp_vec4",
        "layer_norm_warp_scalar",
    ],
    f32_kernels: &[],
    half_kernels: &[],
    tf32_kernels: &[],
    wgmma_kernels: &[],
    layouts,
};

/// Rows per block of the v2 kernel (one warp each).
const ROWS_PER_BLOCK: usize = 4;

/// `(kernel, grid, block)` of one call.
pub(crate) fn plan(
    d: LayerNormDims,
    version: KernelVersion,
    vec4: bool,
) -> Result<(&'static str, u32, u32)> {
    Ok(match version {
        KernelVersion::Naive => (
            "layer_norm_naive",
            blocks_for("layer_norm", d.rows, 128)?,
            128,
        ),
        KernelVersion::Fast => (
            if vec4 {
                "layer_norm_warp_vec4"
            } else {
                "layer_norm_warp_scalar"
            },
            blocks_for("layer_norm", d.rows, ROWS_PER_BLOCK)?,
            (ROWS_PER_BLOCK * 32) as u32,
        ),
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm(
    be: &Cuda,
    d: LayerNormDims,
    x: &CudaTensor,
    residual: Option<&CudaTensor>,
    weight: &CudaTensor,
    bias: &CudaTensor,
    eps: f64,
    out: &mut CudaTensor,
    sum_out: Option<&mut CudaTensor>,
) -> Result<()> {
    let xp = be.check_tensor("layer_norm x", x)?;
    let rp = residual
        .map(|t| be.check_tensor("layer_norm residual", t))
        .transpose()?;
    let wp = be.check_tensor("layer_norm weight", weight)?;
    let bp = be.check_tensor("layer_norm bias", bias)?;
    let op = be.check_tensor("layer_norm out", out)?;
    let sp = sum_out
        .as_deref()
        .map(|t| be.check_tensor("layer_norm sum_out", t))
        .transpose()?;
    let mut inputs = vec![x, weight, bias];
    inputs.extend(residual);
    let mut outputs: Vec<&CudaTensor> = vec![out];
    outputs.extend(sum_out.as_deref());
    be.check_disjoint("layer_norm", &outputs, &inputs)?;

    let aligned = [Some(xp), rp, Some(wp), Some(bp), Some(op), sp]
        .into_iter()
        .flatten()
        .all(|p| p % 16 == 0);
    let vec4 = d.cols.is_multiple_of(4) && aligned;
    let params = LayerNormParams {
        x: xp,
        residual: rp.unwrap_or(0),
        weight: wp,
        bias: bp,
        out: op,
        sum_out: sp.unwrap_or(0),
        rows: i32_of("layer_norm rows", d.rows)?,
        cols: i32_of("layer_norm cols", d.cols)?,
        eps: f32_param("layer_norm: eps", eps)?,
        pad0: 0,
    };
    let (kernel, grid, block) = plan(d, be.version(), vec4)?;
    be.launch(&PROGRAM, kernel, (grid, 1, 1), (block, 1, 1), &params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_every_row() {
        for rows in [1, 3, 4, 5, 77, 129, 4928] {
            let d = LayerNormDims { rows, cols: 512 };
            let (k, grid, block) = plan(d, KernelVersion::Naive, true).unwrap();
            assert_eq!(k, "layer_norm_naive");
            assert!((grid * block) as usize >= rows);
            let (k, grid, block) = plan(d, KernelVersion::Fast, false).unwrap();
            assert_eq!(k, "layer_norm_warp_scalar");
            assert_eq!(block, 128);
            assert!(grid as usize * ROWS_PER_BLOCK >= rows);
            assert_eq!(
                plan(d, KernelVersion::Fast, true).unwrap().0,
                "layer_norm_warp_vec4"
            );
        }
    }
}
