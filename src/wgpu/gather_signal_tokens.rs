use super::backend::{Bind, Kernel, Wgpu, WgpuTensor};
use crate::error::Result;
use crate::ops::GatherDims;
use crate::signal::SignalPositions;

const KERNEL: Kernel = Kernel {
    shader: "gather_signal_tokens.wgsl",
    source: include_str!("../../shaders/gather_signal_tokens.wgsl"),
    entry: "gather_signal_tokens",
    reads: 3,
    writes: 1,
    weight: None,
};

/// Every kernel of this op (for the translation tests).
#[cfg(test)]
pub(super) fn kernels() -> Vec<Kernel> {
    vec![KERNEL]
}

const WORKGROUP: usize = 256;

wgsl_params! {
    shader: "gather_signal_tokens.wgsl",
    struct Params {
        batch: u32,
        seq_len: u32,
        n: u32,
        channels: u32,
        has_embeds: u32,
        row_stride: u32,
    }
}

pub(super) fn gather_signal_tokens(
    be: &Wgpu,
    d: GatherDims,
    hidden: &WgpuTensor,
    embeds: Option<&WgpuTensor>,
    positions: &SignalPositions,
    out: &mut WgpuTensor,
) -> Result<()> {
    let total = d.batch * d.n * d.channels;
    let groups = be.grid(total.div_ceil(WORKGROUP))?;
    let params = Params {
        batch: super::u32_of(d.batch)?,
        seq_len: super::u32_of(d.seq_len)?,
        n: super::u32_of(d.n)?,
        channels: super::u32_of(d.channels)?,
        has_embeds: u32::from(embeds.is_some()),
        row_stride: groups[0] * WORKGROUP as u32,
    };
    super::u32_of(d.batch * d.seq_len * d.channels)?;
    let pos: Vec<u32> = positions
        .positions()
        .iter()
        .map(|&p| super::u32_of(p))
        .collect::<Result<_>>()?;
    let pos = be.upload_words(&pos)?;
    be.dispatch(
        &KERNEL,
        &params,
        &[hidden.into(), embeds.into(), Bind::Words(&pos)],
        &[out],
        groups,
    )
}
