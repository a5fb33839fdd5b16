//! `kernels/attention.cu`: naive v1 (a thread per output element), a
//! FlashAttention-style v2 (online softmax over shared-memory K/V tiles, 8
//! queries of one (batch, head) per block) for head dims up to 128, and for
//! f16/bf16 storage with head dim 64 or 128 a v3 on tensor cores (WMMA for
//! Q K^T and P V, 64 queries per block).

use cudarc::driver::DeviceRepr;

use super::backend::{blocks_for, i32_of, Cuda, CudaMask, CudaTensor, KernelVersion};
use super::program::{param_layout, Program};
use crate::error::Result;
use crate::ops::{AttentionDims, AttentionSpec};
use crate::tensor::DType;

/// Mirror of `AttentionParams` in kernels/attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct AttentionParams {
    q: u64,
    k: u64,
    v: u64,
    mask: u64,
    out: u64,
    batch: i32,
    lq: i32,
    lk: i32,
    heads: i32,
    head_dim: i32,
    q_stride: i32,
    k_stride: i32,
    v_stride: i32,
    q_col: i32,
    k_col: i32,
    v_col: i32,
    scale: f32,
    causal: i32,
    vec4: i32,
}

// SAFETY: plain data (u64, i32 and f32 fields, no padding), laid out exactly as
// the kernels' AttentionParams: the static_asserts compiled into attention.cu
// check it.
unsafe impl DeviceRepr for AttentionParams {}

fn layouts() -> String {
    param_layout!(AttentionParams {
        q,
        k,
        v,
        mask,
        out,
        batch,
        lq,
        lk,
        heads,
        head_dim,
        q_stride,
        k_stride,
        v_stride,
        q_col,
        k_col,
        v_col,
        scale,
        causal,
        vec4
    })
}

pub(crate) static PROGRAM: Program = Program {
    file: "attention.cu",
    source: include_str!("../../kernels/attention.cu"),
    kernels: &[
        "attention_naive",
        "attention_flash_d32",
        "attention_flash_d64",
        "attention_flash_d128",
    ],
    half_kernels: &["attention_tc_d64", "attention_tc_d128"],
    tf32_kernels: &[],
    layouts,
};

/// Queries per block of the v2 kernel.
const QUERIES_PER_BLOCK: usize = 8;
/// Queries per block of the v3 (tensor-core) kernel: 16 per warp.
const TC_QUERIES_PER_BLOCK: usize = 64;
/// Largest head dim the v2 kernel takes (its shared tiles are 128 wide).
pub(crate) const FLASH_MAX_HEAD_DIM: usize = 128;

/// `(kernel, grid, block)` of one call with `storage` in device memory. The
/// fast version runs v3 (tensor cores) for f16/bf16 with head dim 64 or 128,
/// else v2; head dims above 128, or more heads or sequences than a grid
/// dimension holds (65535), take the naive kernel.
pub(crate) fn plan(
    d: &AttentionDims,
    version: KernelVersion,
    storage: DType,
) -> Result<(&'static str, (u32, u32, u32), u32)> {
    let flash = version == KernelVersion::Fast
        && d.head_dim <= FLASH_MAX_HEAD_DIM
        && d.heads <= 65_535
        && d.batch <= 65_535;
    if !flash {
        let total = d.batch * d.lq * d.heads * d.head_dim;
        return Ok((
            "attention_naive",
            (blocks_for("attention", total, 128)?, 1, 1),
            128,
        ));
    }
    let half = matches!(storage, DType::F16 | DType::BF16);
    if half && (d.head_dim == 64 || d.head_dim == 128) {
        let kernel = if d.head_dim == 64 {
            "attention_tc_d64"
        } else {
            "attention_tc_d128"
        };
        return Ok((
            kernel,
            (
                blocks_for("attention", d.lq, TC_QUERIES_PER_BLOCK)?,
                d.heads as u32,
                d.batch as u32,
            ),
            128,
        ));
    }
    let kernel = match d.head_dim {
        0..=32 => "attention_flash_d32",
        33..=64 => "attention_flash_d64",
        _ => "attention_flash_d128",
    };
    Ok((
        kernel,
        (
            blocks_for("attention", d.lq, QUERIES_PER_BLOCK)?,
            d.heads as u32,
            d.batch as u32,
        ),
        128,
    ))
}

/// 16-byte loads of Q, K and V rows are possible: every head's block starts at
/// a multiple of 4 floats of a 16-byte aligned tensor.
pub(crate) fn vec4_ok(d: &AttentionDims, ptrs: [u64; 3]) -> bool {
    d.head_dim % 4 == 0
        && [
            d.q_stride, d.k_stride, d.v_stride, d.q_start, d.k_start, d.v_start,
        ]
        .iter()
        .all(|s| s % 4 == 0)
        && ptrs.iter().all(|p| p % 16 == 0)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    be: &Cuda,
    d: AttentionDims,
    q: &CudaTensor,
    k: &CudaTensor,
    v: &CudaTensor,
    spec: &AttentionSpec,
    mask: Option<&CudaMask>,
    out: &mut CudaTensor,
) -> Result<()> {
    let qp = be.check_tensor("attention q", q)?;
    let kp = be.check_tensor("attention k", k)?;
    let vp = be.check_tensor("attention v", v)?;
    let op = be.check_tensor("attention out", out)?;
    let mask_ptr = mask.map(|m| be.check_mask(m)).transpose()?;
    be.check_disjoint("attention", &[out], &[q, k, v])?;
    // Rows of the mask are indexed b * Lk + j; its size was checked against
    // [batch, Lk] by AttentionDims::check.
    i32_of("attention mask", d.batch * d.lk)?;

    let params = AttentionParams {
        q: qp,
        k: kp,
        v: vp,
        mask: mask_ptr.unwrap_or(0),
        out: op,
        batch: i32_of("attention batch", d.batch)?,
        lq: i32_of("attention query length", d.lq)?,
        lk: i32_of("attention key length", d.lk)?,
        heads: i32_of("attention heads", d.heads)?,
        head_dim: i32_of("attention head_dim", d.head_dim)?,
        q_stride: i32_of("attention q stride", d.q_stride)?,
        k_stride: i32_of("attention k stride", d.k_stride)?,
        v_stride: i32_of("attention v stride", d.v_stride)?,
        q_col: i32_of("attention q column", d.q_start)?,
        k_col: i32_of("attention k column", d.k_start)?,
        v_col: i32_of("attention v column", d.v_start)?,
        scale: spec.scale() as f32,
        causal: i32::from(spec.causal),
        vec4: i32::from(vec4_ok(&d, [qp, kp, vp])),
    };
    let (kernel, grid, block) = plan(&d, be.version(), be.storage())?;
    be.launch(&PROGRAM, kernel, grid, (block, 1, 1), &params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(batch: usize, lq: usize, lk: usize, heads: usize, hd: usize) -> AttentionDims {
        let c = heads * hd;
        AttentionDims {
            batch,
            lq,
            lk,
            heads,
            head_dim: hd,
            q_stride: 3 * c,
            k_stride: 3 * c,
            v_stride: 3 * c,
            q_start: 0,
            k_start: c,
            v_start: 2 * c,
        }
    }

    #[test]
    fn head_dims_pick_their_tile() {
        let f = |hd| {
            plan(&dims(1, 77, 77, 4, hd), KernelVersion::Fast, DType::F32)
                .unwrap()
                .0
        };
        assert_eq!(f(8), "attention_flash_d32");
        assert_eq!(f(32), "attention_flash_d32");
        assert_eq!(f(64), "attention_flash_d64");
        assert_eq!(f(100), "attention_flash_d128");
        assert_eq!(f(128), "attention_flash_d128");
        assert_eq!(f(256), "attention_naive");
        assert_eq!(
            plan(&dims(1, 77, 77, 4, 128), KernelVersion::Naive, DType::F32)
                .unwrap()
                .0,
            "attention_naive"
        );
    }

    #[test]
    fn half_storage_takes_tensor_cores_at_head_dims_64_and_128() {
        let f = |hd, storage, version| plan(&dims(2, 77, 77, 4, hd), version, storage).unwrap();
        for storage in [DType::F16, DType::BF16] {
            assert_eq!(f(64, storage, KernelVersion::Fast).0, "attention_tc_d64");
            let (kernel, grid, block) = f(128, storage, KernelVersion::Fast);
            assert_eq!((kernel, grid, block), ("attention_tc_d128", (2, 4, 2), 128));
            assert_eq!(f(32, storage, KernelVersion::Fast).0, "attention_flash_d32");
            assert_eq!(
                f(100, storage, KernelVersion::Fast).0,
                "attention_flash_d128"
            );
            assert_eq!(f(128, storage, KernelVersion::Naive).0, "attention_naive");
        }
        assert_eq!(
            f(128, DType::F32, KernelVersion::Fast).0,
            "attention_flash_d128"
        );
    }

    #[test]
    fn batch_one_spreads_over_query_tiles() {
        let (_, grid, _) = plan(&dims(1, 77, 77, 4, 128), KernelVersion::Fast, DType::F32).unwrap();
        assert_eq!(grid, (10, 4, 1));
        let (_, grid, block) =
            plan(&dims(2, 513, 77, 3, 64), KernelVersion::Naive, DType::F32).unwrap();
        assert!((grid.0 * block) as usize >= 2 * 513 * 3 * 64);
    }

    #[test]
    fn vec4_needs_every_offset_aligned() {
        let d = dims(1, 5, 5, 2, 64);
        assert!(vec4_ok(&d, [0, 256, 512]));
        assert!(!vec4_ok(&d, [4, 256, 512]));
        let mut odd = d;
        odd.k_start += 2;
        assert!(!vec4_ok(&odd, [0, 256, 512]));
        assert!(!vec4_ok(&dims(1, 5, 5, 3, 6), [0, 0, 0]));
    }
}
