//! `kernels/gather_signal_tokens.cu`: `out[b, i] = hidden[b, p_i] + embeds[b, p_i]`.
//! The identity gather (the projector's own `hidden + embeds`) runs without
//! copying positions to the device.

use cudarc::driver::DeviceRepr;

use super::backend::{blocks_for, i32_of, Cuda, CudaTensor, KernelVersion};
use super::program::{param_layout, Program};
use crate::error::Result;
use crate::ops::GatherDims;
use crate::signal::SignalPositions;

/// Mirror of `GatherParams` in kernels/gather_signal_tokens.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct GatherParams {
    hidden: u64,
    embeds: u64,
    positions: u64,
    out: u64,
    batch: i32,
    seq_len: i32,
    n: i32,
    channels: i32,
}

// SAFETY: plain data (u64 and i32 fields, no padding), laid out exactly as the
// kernels' GatherParams: the static_asserts compiled into
// gather_signal_tokens.cu check it.
unsafe impl DeviceRepr for GatherParams {}

fn layouts() -> String {
    param_layout!(GatherParams {
        hidden,
        embeds,
        positions,
        out,
        batch,
        seq_len,
        n,
        channels
    })
}

pub(crate) static PROGRAM: Program = Program {
    file: "gather_signal_tokens.cu",
    source: include_str!("../../kernels/gather_signal_tokens.cu"),
    kernels: &["gather_signal_tokens_naive", "gather_signal_tokens_vec4"],
    f32_kernels: &[],
    half_kernels: &[],
    tf32_kernels: &[],
    wgmma_kernels: &[],
    layouts,
};

/// True when `positions` is `0..n` in every sequence of length `n`.
pub(crate) fn is_identity(positions: &SignalPositions) -> bool {
    let n = positions.count();
    positions.seq_len() == n
        && positions
            .positions()
            .iter()
            .enumerate()
            .all(|(i, &p)| p == i % n)
}

/// `(kernel, grid, block)` for `total` output elements.
pub(crate) fn plan(
    total: usize,
    version: KernelVersion,
    vec4: bool,
) -> Result<(&'static str, u32, u32)> {
    Ok(if version == KernelVersion::Fast && vec4 {
        (
            "gather_signal_tokens_vec4",
            blocks_for("gather_signal_tokens", total / 4, 256)?,
            256,
        )
    } else {
        (
            "gather_signal_tokens_naive",
            blocks_for("gather_signal_tokens", total, 256)?,
            256,
        )
    })
}

pub(super) fn gather_signal_tokens(
    be: &Cuda,
    d: GatherDims,
    hidden: &CudaTensor,
    embeds: Option<&CudaTensor>,
    positions: &SignalPositions,
    out: &mut CudaTensor,
) -> Result<()> {
    let hp = be.check_tensor("gather_signal_tokens hidden", hidden)?;
    let ep = embeds
        .map(|t| be.check_tensor("gather_signal_tokens embeds", t))
        .transpose()?;
    let op = be.check_tensor("gather_signal_tokens out", out)?;
    let mut inputs = vec![hidden];
    inputs.extend(embeds);
    be.check_disjoint("gather_signal_tokens", &[out], &inputs)?;

    // Positions are < seq_len, and seq_len fits in i32 (hidden's numel does).
    let uploaded = if is_identity(positions) {
        None
    } else {
        let pos = positions
            .positions()
            .iter()
            .map(|&p| i32_of("gather_signal_tokens position", p))
            .collect::<Result<Vec<i32>>>()?;
        Some(be.upload_bytes(&pos)?)
    };
    let vec4 = d.channels.is_multiple_of(4)
        && [Some(hp), ep, Some(op)]
            .into_iter()
            .flatten()
            .all(|p| p % 16 == 0);
    let params = GatherParams {
        hidden: hp,
        embeds: ep.unwrap_or(0),
        positions: uploaded.as_ref().map_or(0, |b| b.ptr()),
        out: op,
        batch: i32_of("gather_signal_tokens batch", d.batch)?,
        seq_len: i32_of("gather_signal_tokens seq_len", d.seq_len)?,
        n: i32_of("gather_signal_tokens count", d.n)?,
        channels: i32_of("gather_signal_tokens channels", d.channels)?,
    };
    let total = d.batch * d.n * d.channels; // out's numel, checked above
    let (kernel, grid, block) = plan(total, be.version(), vec4)?;
    be.launch(&PROGRAM, kernel, (grid, 1, 1), (block, 1, 1), &params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_recognised() {
        assert!(is_identity(&SignalPositions::all(3, 4).unwrap()));
        let ids = [0i64, 9, 10, 0, 9, 10];
        let p = SignalPositions::find(&ids, 2, 3, &[9, 10]).unwrap();
        assert!(!is_identity(&p));
        let p = SignalPositions::find(&[9, 10, 9, 10], 2, 2, &[9, 10]).unwrap();
        assert!(is_identity(&p));
    }

    #[test]
    fn plans_cover_every_element() {
        for total in [1, 3, 12, 4096 * 8, 129 * 24] {
            let (k, g, b) = plan(total, KernelVersion::Naive, true).unwrap();
            assert_eq!(k, "gather_signal_tokens_naive");
            assert!((g * b) as usize >= total);
            if total % 4 == 0 {
                let (k, g, b) = plan(total, KernelVersion::Fast, true).unwrap();
                assert_eq!(k, "gather_signal_tokens_vec4");
                assert!((g * b) as usize * 4 >= total);
            }
        }
    }
}
