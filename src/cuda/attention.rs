//! `kernels/attention.cu`: naive v1 (a thread per output element), a
//! FlashAttention-style v2 (online softmax over shared-memory K/V tiles, 8
//! queries of one (batch, head) per block, or 16 where the grid is large) for
//! head dims up to 128, for f16/bf16 storage with head dim 64 or 128 a v3
//! on tensor cores (WMMA for Q K^T and P V, 64 queries per block), and for
//! few keys (up to [`FEW_KEYS_MAX`]) a v4 of one warp per query and head,
//! and for grids too small for the others a v5 whose warps split each
//! query's keys.

use cudarc::driver::DeviceRepr;

use super::backend::{blocks_for, i32_of, launchable, Cuda, CudaMask, CudaTensor, KernelVersion};
use super::program::{param_layout, Program};
use crate::error::{Error, Result};
use crate::ops::{
    f32_param, AbsorbedAttentionDims, AbsorbedAttentionInput, AttentionDims, AttentionInput,
    AttentionSpec, NormAfter, NormInput,
};
use crate::tensor::DType;

/// Mirror of `AttentionParams` in kernels/common.cuh.
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
    pub(super) vec4: i32,
}

// SAFETY: plain data (u64, i32 and f32 fields, no padding), laid out exactly as
// the kernels' AttentionParams: the static_asserts compiled into attention.cu
// and linear.cu check it.
unsafe impl DeviceRepr for AttentionParams {}

/// Mirror of `AbsorbedAttentionParams` in kernels/attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct AbsorbedAttentionParams {
    x: u64,
    residual: u64,
    norm_weight: u64,
    norm_bias: u64,
    keys: u64,
    values: u64,
    key_bias: u64,
    out_bias: u64,
    after_weight: u64,
    after_bias: u64,
    stream_out: u64,
    out: u64,
    rows: i32,
    lq: i32,
    cols: i32,
    lk: i32,
    heads: i32,
    k_stride: i32,
    k_col: i32,
    v_stride: i32,
    v_col: i32,
    b_stride: i32,
    b_col: i32,
    scale: f32,
    eps: f32,
    after_eps: f32,
    vec4: i32,
    rows_per_block: i32,
}

// SAFETY: plain data (u64, i32 and f32 fields, no padding), laid out exactly as
// the kernels' AbsorbedAttentionParams: the static_asserts compiled into
// attention.cu check it.
unsafe impl DeviceRepr for AbsorbedAttentionParams {}

/// The layouts attention.cu's kernels take.
fn file_layouts() -> String {
    layouts()
        + &param_layout!(AbsorbedAttentionParams {
            x,
            residual,
            norm_weight,
            norm_bias,
            keys,
            values,
            key_bias,
            out_bias,
            after_weight,
            after_bias,
            stream_out,
            out,
            rows,
            lq,
            cols,
            lk,
            heads,
            k_stride,
            k_col,
            v_stride,
            v_col,
            b_stride,
            b_col,
            scale,
            eps,
            after_eps,
            vec4,
            rows_per_block
        })
}

/// `AttentionParams`' layout, which linear.cu's folded attention takes too.
pub(super) fn layouts() -> String {
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
        "attention_flash_d32_q16",
        "attention_flash_d64_q16",
        "attention_flash_d128_q16",
        "attention_few_keys",
        "attention_split_keys",
        "attention_absorbed_naive",
        "attention_absorbed_rows",
    ],
    f32_kernels: &[],
    half_kernels: &["attention_tc_d64", "attention_tc_d128"],
    tf32_kernels: &[],
    wgmma_kernels: &[],
    layouts: file_layouts,
};

/// Queries per block of the v2 kernel: 2 per warp.
const QUERIES_PER_BLOCK: usize = 8;
/// Queries per block of the v2 kernel's `_q16` entry points: 4 per warp.
const WIDE_QUERIES_PER_BLOCK: usize = 16;
/// v2 takes 16-query blocks once 8-query blocks would be at least this many
/// per SM: as many as an H100 or H200 SM holds at head dim 128 (36 KiB of
/// shared memory, 78 registers a thread), so past one wave. Each block stages all of its
/// head's K and V, so fewer, longer blocks halve that traffic; within one
/// wave the shorter blocks finish sooner. H200, B Lq77 Lk77 H4 d128, 8- vs
/// 16-query blocks: batch 16 (4.8 per SM) 31 vs 32 us, 24 (7.3) 49 vs 36,
/// 64 113 vs 81.
const WIDE_MIN_BLOCKS_PER_SM: usize = 6;
/// Queries per block of the v3 (tensor-core) kernel: 16 per warp.
const TC_QUERIES_PER_BLOCK: usize = 64;
/// Largest head dim the v2 kernel takes (its shared tiles are 128 wide).
pub(crate) const FLASH_MAX_HEAD_DIM: usize = 128;
/// Most keys v4 takes. v2 scores a tile of 32 keys and v3 a block of 64
/// queries whatever Lk is, so at the projector's 4 to 8 signal tokens most of
/// their work is padding; v4's warp per query costs ~20 instructions per key
/// (5 of them shuffles) against v2's ~10 per key of a full tile, so from
/// about 16 keys on, and for the video preset's 24, v2 keeps them.
pub(crate) const FEW_KEYS_MAX: usize = 16;
/// Warps (one query and head each) per block of v4: `ATT_WARPS` in
/// kernels/attention.cu, which indexes its warps by it.
const FEW_KEYS_WARPS: usize = 4;
/// Queries per block of v5, and warps (parts of its keys) per query:
/// `ATT_SPLIT_QUERIES` and `ATT_SPLIT_PARTS` in kernels/attention.cu.
const SPLIT_QUERIES: usize = 4;
const SPLIT_PARTS: usize = 4;
/// v5 takes the grids of up to this many of its blocks (16 warps) per SM:
/// all resident at once (4 fit), each SM's issue shared by at most 32
/// warps. Past that the query-block kernels' fewer instructions per key
/// (v4's walk spends ~20 per key and query, 5 of them shuffles, v2 ~10)
/// count more than their longer chains: the projector's decoder at batch 1
/// (80 blocks on an H200) to 3 takes v5, batch 8 (640) v2 / v3.
const SPLIT_MAX_BLOCKS_PER_SM: usize = 2;

/// `(kernel, grid, block)` of one call with `storage` in device memory on a
/// GPU of `sm_count` SMs. The fast version runs v4 for up to
/// [`FEW_KEYS_MAX`] keys, else, unless `query_blocks`
/// ([`CudaOptions::query_block_attention`](super::CudaOptions::query_block_attention)),
/// v5 where its grid is at most [`SPLIT_MAX_BLOCKS_PER_SM`] blocks per SM,
/// else v3 (tensor cores) for f16/bf16 with head dim 64 or 128, else v2
/// (16-query blocks where 8-query blocks would be [`WIDE_MIN_BLOCKS_PER_SM`]
/// or more per SM); head dims above 128, or more heads or sequences than a
/// grid dimension holds (65535), take the naive kernel.
pub(crate) fn plan(
    d: &AttentionDims,
    version: KernelVersion,
    storage: DType,
    sm_count: u32,
    query_blocks: bool,
) -> Result<(&'static str, (u32, u32, u32), u32)> {
    // v4 indexes its warps (query, head, sequence) with an int.
    let warps = d
        .batch
        .checked_mul(d.heads)
        .and_then(|w| w.checked_mul(d.lq))
        .filter(|&w| w <= i32::MAX as usize);
    if let (KernelVersion::Fast, true, Some(warps)) = (
        version,
        d.head_dim <= FLASH_MAX_HEAD_DIM && d.lk <= FEW_KEYS_MAX,
        warps,
    ) {
        let block = 32 * FEW_KEYS_WARPS;
        return Ok((
            "attention_few_keys",
            (blocks_for("attention", warps, FEW_KEYS_WARPS)?, 1, 1),
            block as u32,
        ));
    }
    // v5 indexes its blocks (query group, head, sequence) with an int.
    let split_blocks = d
        .lq
        .div_ceil(SPLIT_QUERIES)
        .checked_mul(d.heads)
        .and_then(|b| b.checked_mul(d.batch))
        .filter(|&b| {
            b > 0
                && b <= (i32::MAX as usize).min(SPLIT_MAX_BLOCKS_PER_SM * sm_count.max(1) as usize)
        });
    if let (KernelVersion::Fast, true, false, Some(blocks)) = (
        version,
        d.head_dim <= FLASH_MAX_HEAD_DIM,
        query_blocks,
        split_blocks,
    ) {
        return Ok((
            "attention_split_keys",
            (blocks as u32, 1, 1),
            (32 * SPLIT_QUERIES * SPLIT_PARTS) as u32,
        ));
    }
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
    // Blocks of 8 queries over the whole grid (saturating: only compared).
    // Up to 8 queries a sequence, 16-query blocks would be as many, with at
    // most two busy warps each.
    let blocks =
        d.lq.div_ceil(QUERIES_PER_BLOCK)
            .saturating_mul(d.heads)
            .saturating_mul(d.batch);
    let wide = d.lq > QUERIES_PER_BLOCK
        && blocks >= WIDE_MIN_BLOCKS_PER_SM.saturating_mul(sm_count.max(1) as usize);
    let (kernel, queries) = match (d.head_dim, wide) {
        (0..=32, false) => ("attention_flash_d32", QUERIES_PER_BLOCK),
        (33..=64, false) => ("attention_flash_d64", QUERIES_PER_BLOCK),
        (_, false) => ("attention_flash_d128", QUERIES_PER_BLOCK),
        (0..=32, true) => ("attention_flash_d32_q16", WIDE_QUERIES_PER_BLOCK),
        (33..=64, true) => ("attention_flash_d64_q16", WIDE_QUERIES_PER_BLOCK),
        (_, true) => ("attention_flash_d128_q16", WIDE_QUERIES_PER_BLOCK),
    };
    Ok((
        kernel,
        (
            blocks_for("attention", d.lq, queries)?,
            d.heads as u32,
            d.batch as u32,
        ),
        128,
    ))
}

/// [`plan`] on `be`'s device, with its kernel version, storage and options.
pub(super) fn plan_on(
    be: &Cuda,
    d: &AttentionDims,
) -> Result<(&'static str, (u32, u32, u32), u32)> {
    plan(
        d,
        be.version(),
        be.storage(),
        be.sm_count(),
        be.options().query_block_attention,
    )
}

/// The kernel an attention of `batch` sequences of `lq` queries and `lk`
/// keys, `heads` heads of `head_dim` columns, takes on `be` (Q, K and V in
/// tensors of their own: the layout does not change the choice).
pub(super) fn kernel_for(
    be: &Cuda,
    batch: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    head_dim: usize,
) -> Result<&'static str> {
    let width = heads
        .checked_mul(head_dim)
        .ok_or_else(|| Error::Overflow(format!("attention heads {heads} x head_dim {head_dim}")))?;
    let (q, kv) = ([batch, lq, width], [batch, lk, width]);
    launchable("attention", &[&q, &kv])?;
    let spec = AttentionSpec::new(heads, head_dim);
    let d = AttentionDims::check((&q, 0), (&kv, 0), (&kv, 0), &spec, None, &q)?;
    Ok(plan_on(be, &d)?.0)
}

/// 16-byte loads of Q, K and V rows are possible: every head's block starts at
/// a multiple of 4 floats of a 16-byte aligned tensor.
pub(crate) fn vec4_ok(d: &AttentionDims, ptrs: [u64; 3]) -> bool {
    d.head_dim.is_multiple_of(4)
        && [
            d.q_stride, d.k_stride, d.v_stride, d.q_start, d.k_start, d.v_start,
        ]
        .iter()
        .all(|s| s % 4 == 0)
        && ptrs.iter().all(|p| p % 16 == 0)
}

/// The kernels' parameters of an attention of `d` (validated) on `attn`'s
/// tensors, writing to `out` (a device address; 0 where the kernel writes
/// none).
pub(super) fn params(
    be: &Cuda,
    d: &AttentionDims,
    attn: AttentionInput<'_, CudaTensor, CudaMask>,
    out: u64,
) -> Result<AttentionParams> {
    let qp = be.check_tensor("attention q", attn.q.tensor)?;
    let kp = be.check_tensor("attention k", attn.k.tensor)?;
    let vp = be.check_tensor("attention v", attn.v.tensor)?;
    let mask_ptr = attn.mask.map(|m| be.check_mask(m)).transpose()?;
    // Rows of the mask are indexed b * Lk + j; its size was checked against
    // [batch, Lk] by AttentionDims::check.
    i32_of("attention mask", d.batch * d.lk)?;
    let spec = attn.spec;
    Ok(AttentionParams {
        q: qp,
        k: kp,
        v: vp,
        mask: mask_ptr.unwrap_or(0),
        out,
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
        scale: f32_param("attention: scale", spec.scale())?,
        causal: i32::from(spec.causal),
        vec4: i32::from(vec4_ok(d, [qp, kp, vp])),
    })
}

pub(super) fn attention(
    be: &Cuda,
    d: AttentionDims,
    attn: AttentionInput<'_, CudaTensor, CudaMask>,
    out: &mut CudaTensor,
) -> Result<()> {
    let op = be.check_tensor("attention out", out)?;
    let params = params(be, &d, attn, op)?;
    be.check_disjoint(
        "attention",
        &[out],
        &[attn.q.tensor, attn.k.tensor, attn.v.tensor],
    )?;
    let (kernel, grid, block) = plan_on(be, &d)?;
    be.launch(&PROGRAM, kernel, grid, (block, 1, 1), &params)
}

/// Widest row `attention_absorbed_rows` holds (`ABS_HELD` float4 a lane).
const ABSORBED_MAX_COLS: usize = 512;

/// [`absorbing_pays`](crate::ops::absorbing_pays), for rows v2 holds.
pub(crate) fn absorbed_pays(keys: usize, heads: usize, cols: usize) -> bool {
    crate::ops::absorbing_pays(keys, heads, cols)
        && cols.is_multiple_of(4)
        && cols <= ABSORBED_MAX_COLS
}

/// Most rows a v2 block takes one after another.
const ABSORBED_MAX_ROWS_PER_BLOCK: usize = 16;
/// v2 blocks per SM before a block takes more than one row: as many as fit
/// (128 registers a thread).
const ABSORBED_BLOCKS_PER_SM: usize = 4;

/// `(kernel, grid, block, rows per block)` of one `attention_absorbed` of
/// `d` on a GPU of `sm_count` SMs: v2 (a block of 4 warps per row) where the
/// rows are multiples of 4 columns it holds, else v1 (a thread per row). A
/// v2 block takes one row while the grid fits the GPU at once (batch 1 to
/// 6), else enough consecutive rows that it does (batch 64: 10), up to 16:
/// a sequence's key and value rows are then read from L2 once per block.
pub(crate) fn absorbed_plan(
    d: &AbsorbedAttentionDims,
    version: KernelVersion,
    sm_count: u32,
) -> Result<(&'static str, u32, u32, usize)> {
    let rows = d.batch * d.lq;
    if version == KernelVersion::Fast && d.cols.is_multiple_of(4) && d.cols <= ABSORBED_MAX_COLS {
        let resident = ABSORBED_BLOCKS_PER_SM * sm_count.max(1) as usize;
        let per_block = rows
            .div_ceil(resident)
            .clamp(1, ABSORBED_MAX_ROWS_PER_BLOCK);
        let grid = blocks_for("attention_absorbed", rows, per_block)?;
        return Ok(("attention_absorbed_rows", grid, 128, per_block));
    }
    Ok((
        "attention_absorbed_naive",
        blocks_for("attention_absorbed", rows, 128)?,
        128,
        1,
    ))
}

pub(super) fn attention_absorbed(
    be: &Cuda,
    d: AbsorbedAttentionDims,
    norm: NormInput<'_, CudaTensor>,
    attn: AbsorbedAttentionInput<'_, CudaTensor>,
    after: NormAfter<'_, CudaTensor>,
    stream_out: &mut CudaTensor,
    out: &mut CudaTensor,
) -> Result<()> {
    let what = "attention_absorbed";
    let x = be.check_tensor("attention_absorbed x", norm.x)?;
    let residual = norm
        .residual
        .map(|r| be.check_tensor("attention_absorbed residual", r))
        .transpose()?;
    let ptrs = [
        x,
        residual.unwrap_or(0),
        be.check_tensor("attention_absorbed norm weight", norm.weight)?,
        be.check_tensor("attention_absorbed norm bias", norm.bias)?,
        be.check_tensor("attention_absorbed keys", attn.keys.tensor)?,
        be.check_tensor("attention_absorbed values", attn.values.tensor)?,
        be.check_tensor("attention_absorbed key_bias", attn.key_bias.tensor)?,
        be.check_tensor("attention_absorbed out_bias", attn.out_bias)?,
        be.check_tensor("attention_absorbed after weight", after.weight)?,
        be.check_tensor("attention_absorbed after bias", after.bias)?,
        be.check_tensor("attention_absorbed stream_out", stream_out)?,
        be.check_tensor("attention_absorbed out", out)?,
    ];
    let mut inputs = vec![
        norm.x,
        norm.weight,
        norm.bias,
        attn.keys.tensor,
        attn.values.tensor,
        attn.key_bias.tensor,
        attn.out_bias,
        after.weight,
        after.bias,
    ];
    inputs.extend(norm.residual);
    be.check_disjoint(what, &[stream_out, out], &inputs)?;
    // 16-byte loads: every row and block starts at a multiple of 4 elements
    // of a 16-byte aligned tensor.
    let vec4 = [d.cols, d.k_stride, d.k_start, d.v_stride, d.v_start]
        .iter()
        .all(|s| s % 4 == 0)
        && ptrs.iter().all(|p| p % 16 == 0);
    let (kernel, grid, block, per_block) = absorbed_plan(&d, be.version(), be.sm_count())?;
    let params = AbsorbedAttentionParams {
        x: ptrs[0],
        residual: ptrs[1],
        norm_weight: ptrs[2],
        norm_bias: ptrs[3],
        keys: ptrs[4],
        values: ptrs[5],
        key_bias: ptrs[6],
        out_bias: ptrs[7],
        after_weight: ptrs[8],
        after_bias: ptrs[9],
        stream_out: ptrs[10],
        out: ptrs[11],
        rows: i32_of("attention_absorbed rows", d.batch * d.lq)?,
        lq: i32_of("attention_absorbed query length", d.lq)?,
        cols: i32_of("attention_absorbed width", d.cols)?,
        lk: i32_of("attention_absorbed key count", d.lk)?,
        heads: i32_of("attention_absorbed heads", d.heads)?,
        k_stride: i32_of("attention_absorbed keys stride", d.k_stride)?,
        k_col: i32_of("attention_absorbed keys column", d.k_start)?,
        v_stride: i32_of("attention_absorbed values stride", d.v_stride)?,
        v_col: i32_of("attention_absorbed values column", d.v_start)?,
        b_stride: i32_of("attention_absorbed key_bias stride", d.b_stride)?,
        b_col: i32_of("attention_absorbed key_bias column", d.b_start)?,
        scale: f32_param("attention_absorbed: scale", attn.scale)?,
        eps: f32_param("attention_absorbed: eps", norm.eps)?,
        after_eps: f32_param("attention_absorbed: eps", after.eps)?,
        vec4: i32::from(vec4),
        rows_per_block: i32_of("attention_absorbed rows per block", per_block)?,
    };
    be.launch(&PROGRAM, kernel, (grid, 1, 1), (block, 1, 1), &params)
}

/// The dims of an attention reading Q, K and V from one packed `[B, L, 3C]`
/// projection (Lq and Lk may differ: only the plans look at them).
#[cfg(test)]
pub(super) fn packed_dims(
    batch: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    hd: usize,
) -> AttentionDims {
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

#[cfg(test)]
mod tests {
    use super::packed_dims as dims;
    use super::*;

    /// The H200's SM count.
    const SMS: u32 = 132;

    /// The decoder's absorbed cross-attention: 77 rows of `cols` per sequence,
    /// 4 heads over 4 keys, laid out as the projector's memory GEMM writes it.
    fn absorbed_dims(batch: usize, cols: usize) -> AbsorbedAttentionDims {
        AbsorbedAttentionDims {
            batch,
            lq: 77,
            cols,
            lk: 4,
            heads: 4,
            k_stride: 8 * cols + 8,
            v_stride: 8 * cols + 8,
            b_stride: 8 * cols + 8,
            k_start: 0,
            v_start: 4 * cols,
            b_start: 8 * cols,
        }
    }

    #[test]
    fn head_dims_pick_their_tile() {
        let f = |hd| {
            plan(
                &dims(1, 77, 77, 4, hd),
                KernelVersion::Fast,
                DType::F32,
                SMS,
                true,
            )
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
            plan(
                &dims(1, 77, 77, 4, 128),
                KernelVersion::Naive,
                DType::F32,
                SMS,
                true
            )
            .unwrap()
            .0,
            "attention_naive"
        );
    }

    #[test]
    fn half_storage_takes_tensor_cores_at_head_dims_64_and_128() {
        let f = |hd, storage, version| {
            plan(&dims(2, 77, 77, 4, hd), version, storage, SMS, true).unwrap()
        };
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
        let (_, grid, _) = plan(
            &dims(1, 77, 77, 4, 128),
            KernelVersion::Fast,
            DType::F32,
            SMS,
            true,
        )
        .unwrap();
        assert_eq!(grid, (10, 4, 1));
        let (_, grid, block) = plan(
            &dims(2, 513, 77, 3, 64),
            KernelVersion::Naive,
            DType::F32,
            SMS,
            true,
        )
        .unwrap();
        assert!((grid.0 * block) as usize >= 2 * 513 * 3 * 64);
    }

    #[test]
    fn large_grids_take_16_query_blocks() {
        let f =
            |d: AttentionDims, sms| plan(&d, KernelVersion::Fast, DType::F32, sms, true).unwrap();
        // The projector's decoder self-attention: batch 1 keeps 8-query blocks
        // (40 of them), batch 64 would launch 2560 and takes 1280 of 16 queries.
        assert_eq!(
            f(dims(1, 77, 77, 4, 128), SMS),
            ("attention_flash_d128", (10, 4, 1), 128)
        );
        assert_eq!(
            f(dims(64, 77, 77, 4, 128), SMS),
            ("attention_flash_d128_q16", (5, 4, 64), 128)
        );
        // The switch: 8-query blocks at 6 per SM (792 on 132 SMs; 19 x 10 x 4
        // = 760 stay, 20 x 10 x 4 = 800 switch), and on a smaller GPU sooner.
        assert_eq!(f(dims(19, 77, 77, 4, 128), SMS).0, "attention_flash_d128");
        assert_eq!(
            f(dims(20, 77, 77, 4, 128), SMS).0,
            "attention_flash_d128_q16"
        );
        assert_eq!(
            f(dims(19, 77, 77, 4, 128), 108).0,
            "attention_flash_d128_q16"
        );
        // Every tile width, Lq not a multiple of 16 (ceil), cross-attention.
        assert_eq!(
            f(dims(3, 33, 45, 60, 72), SMS),
            ("attention_flash_d128_q16", (3, 60, 3), 128)
        );
        assert_eq!(
            f(dims(3, 129, 17, 40, 64), SMS),
            ("attention_flash_d64_q16", (9, 40, 3), 128)
        );
        assert_eq!(
            f(dims(6, 19, 23, 50, 6), SMS),
            ("attention_flash_d32_q16", (2, 50, 6), 128)
        );
        // Up to 8 queries a sequence 16-query blocks would be as many: never.
        assert_eq!(
            f(dims(1000, 8, 77, 4, 128), SMS),
            ("attention_flash_d128", (1, 4, 1000), 128)
        );
        assert_eq!(
            f(dims(1000, 9, 77, 4, 128), SMS).0,
            "attention_flash_d128_q16"
        );
        // No SM count (0) counts as one SM.
        assert_eq!(f(dims(1, 77, 77, 4, 128), 0).0, "attention_flash_d128_q16");
        // v3 and v1 are unchanged by the grid's size.
        for storage in [DType::F16, DType::BF16] {
            let big = dims(64, 77, 77, 4, 128);
            assert_eq!(
                plan(&big, KernelVersion::Fast, storage, SMS, true).unwrap(),
                ("attention_tc_d128", (2, 4, 64), 128)
            );
            assert_eq!(
                plan(
                    &dims(64, 77, 77, 4, 100),
                    KernelVersion::Fast,
                    storage,
                    SMS,
                    true
                )
                .unwrap()
                .0,
                "attention_flash_d128_q16"
            );
        }
        assert_eq!(
            plan(
                &dims(64, 77, 77, 4, 128),
                KernelVersion::Naive,
                DType::F32,
                SMS,
                true
            )
            .unwrap()
            .0,
            "attention_naive"
        );
    }

    #[test]
    fn few_keys_take_a_warp_per_query() {
        let f =
            |d: AttentionDims, storage| plan(&d, KernelVersion::Fast, storage, SMS, true).unwrap();
        for storage in [DType::F32, DType::F16, DType::BF16] {
            // The projector's cross-attention (image: 4 signal tokens) at
            // batch 1 and 64: 77 x 4 and 77 x 4 x 64 warps, 4 a block.
            assert_eq!(
                f(dims(1, 77, 4, 4, 128), storage),
                ("attention_few_keys", (77, 1, 1), 128)
            );
            assert_eq!(
                f(dims(64, 77, 4, 4, 128), storage),
                ("attention_few_keys", (4928, 1, 1), 128)
            );
            // The encoder's self-attention, any head dim up to 128, and the
            // bound: 16 keys in, 17 out.
            assert_eq!(f(dims(1, 4, 4, 4, 128), storage).1, (4, 1, 1));
            assert_eq!(f(dims(3, 5, 16, 3, 6), storage).0, "attention_few_keys");
            assert_ne!(f(dims(1, 77, 17, 4, 128), storage).0, "attention_few_keys");
            assert_eq!(f(dims(1, 4, 4, 4, 200), storage).0, "attention_naive");
            assert_eq!(
                plan(
                    &dims(1, 77, 4, 4, 128),
                    KernelVersion::Naive,
                    storage,
                    SMS,
                    true
                )
                .unwrap()
                .0,
                "attention_naive"
            );
        }
        // Warps past an int's range leave v4 to the others.
        let huge = dims(65_535, 1024, 4, 64, 64);
        assert_eq!(f(huge, DType::F32).0, "attention_flash_d64_q16");
    }

    #[test]
    fn few_keys_blocks_are_the_kernels_warps() {
        let define = format!("#define ATT_WARPS {FEW_KEYS_WARPS}\n");
        assert!(PROGRAM.source.contains(&define));
        for define in [
            format!("#define ATT_SPLIT_QUERIES {SPLIT_QUERIES}\n"),
            format!("#define ATT_SPLIT_PARTS {SPLIT_PARTS}\n"),
        ] {
            assert!(PROGRAM.source.contains(&define), "{define}");
        }
    }

    #[test]
    fn small_grids_split_the_keys() {
        let f = |d: AttentionDims, storage, sms| {
            plan(&d, KernelVersion::Fast, storage, sms, false).unwrap()
        };
        for storage in [DType::F32, DType::F16, DType::BF16] {
            // The projector's decoder self-attention at batch 1: 20 groups of
            // 4 queries x 4 heads, 16 warps each.
            assert_eq!(
                f(dims(1, 77, 77, 4, 128), storage, SMS),
                ("attention_split_keys", (80, 1, 1), 512)
            );
            // Up to 2 blocks per SM (264): batch 3 (240) splits, 4 (320) not,
            // and on a smaller GPU sooner.
            assert_eq!(
                f(dims(3, 77, 77, 4, 128), storage, SMS).0,
                "attention_split_keys"
            );
            assert_ne!(
                f(dims(4, 77, 77, 4, 128), storage, SMS).0,
                "attention_split_keys"
            );
            assert_ne!(
                f(dims(2, 77, 77, 4, 128), storage, 78).0,
                "attention_split_keys"
            );
            // The video preset's cross-attention (24 keys), any head dim up
            // to 128, a ragged last group.
            assert_eq!(
                f(dims(1, 77, 24, 4, 128), storage, SMS).0,
                "attention_split_keys"
            );
            assert_eq!(
                f(dims(2, 5, 33, 3, 6), storage, SMS),
                ("attention_split_keys", (12, 1, 1), 512)
            );
            assert_eq!(
                f(dims(1, 77, 77, 4, 200), storage, SMS).0,
                "attention_naive"
            );
            // Few keys stay with v4; the option and v1 keep the others.
            assert_eq!(
                f(dims(1, 77, 4, 4, 128), storage, SMS).0,
                "attention_few_keys"
            );
            let d = dims(1, 77, 77, 4, 128);
            assert_ne!(
                plan(&d, KernelVersion::Fast, storage, SMS, true).unwrap().0,
                "attention_split_keys"
            );
            assert_eq!(
                plan(&d, KernelVersion::Naive, storage, SMS, false)
                    .unwrap()
                    .0,
                "attention_naive"
            );
        }
        // No SM count (0) counts as one SM: 2 blocks.
        assert_eq!(
            f(dims(1, 8, 77, 1, 64), DType::F32, 0).0,
            "attention_split_keys"
        );
        assert_ne!(
            f(dims(1, 9, 77, 1, 64), DType::F32, 0).0,
            "attention_split_keys"
        );
    }

    #[test]
    fn every_planned_kernel_is_in_the_program() {
        let mut seen = std::collections::BTreeSet::new();
        for storage in [DType::F32, DType::F16, DType::BF16] {
            for version in [KernelVersion::Naive, KernelVersion::Fast] {
                for (batch, lq, heads, query_blocks) in [
                    (1, 77, 4, false),
                    (1, 77, 4, true),
                    (64, 77, 4, false),
                    (1, 3, 2, false),
                ] {
                    for hd in [6, 32, 40, 64, 72, 128, 200] {
                        let d = dims(batch, lq, lq, heads, hd);
                        let (kernel, _, _) = plan(&d, version, storage, SMS, query_blocks).unwrap();
                        let listed = if storage == DType::F32 {
                            PROGRAM.kernels.contains(&kernel)
                        } else {
                            PROGRAM.kernels.contains(&kernel)
                                || PROGRAM.half_kernels.contains(&kernel)
                        };
                        assert!(listed, "{kernel} ({storage:?}) is not in PROGRAM");
                        seen.insert(kernel);
                    }
                }
            }
        }
        for version in [KernelVersion::Naive, KernelVersion::Fast] {
            for cols in [512, 12, 10, 516] {
                let d = absorbed_dims(2, cols);
                let (kernel, _, _, _) = absorbed_plan(&d, version, SMS).unwrap();
                let v2 = version == KernelVersion::Fast && cols % 4 == 0 && cols <= 512;
                assert_eq!(
                    kernel == "attention_absorbed_rows",
                    v2,
                    "{cols} {version:?}"
                );
                seen.insert(kernel);
            }
        }
        // Every kernel of the program is planned somewhere.
        for k in PROGRAM.kernels.iter().chain(PROGRAM.half_kernels) {
            assert!(seen.contains(k), "{k} is never planned");
        }
    }

    #[test]
    fn absorbed_blocks_take_rows_while_the_grid_fits() {
        let f =
            |batch| absorbed_plan(&absorbed_dims(batch, 512), KernelVersion::Fast, SMS).unwrap();
        // Batch 1 and 6: a row a block, within 4 blocks per SM; batch 64:
        // 4928 rows in 10s, 493 blocks; batch 1000: at most 16 rows a block.
        assert_eq!(f(1), ("attention_absorbed_rows", 77, 128, 1));
        assert_eq!(f(6), ("attention_absorbed_rows", 462, 128, 1));
        assert_eq!(f(64), ("attention_absorbed_rows", 493, 128, 10));
        assert_eq!(f(1000).3, 16);
        let naive = absorbed_plan(&absorbed_dims(64, 512), KernelVersion::Naive, SMS).unwrap();
        assert_eq!(naive, ("attention_absorbed_naive", 39, 128, 1));
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
