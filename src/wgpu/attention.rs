use super::backend::{Wgpu, WgpuMask, WgpuTensor};
use crate::error::{Error, Result};
use crate::ops::{AttentionDims, AttentionSpec};

#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    _be: &Wgpu,
    _d: AttentionDims,
    _q: &WgpuTensor,
    _k: &WgpuTensor,
    _v: &WgpuTensor,
    _spec: &AttentionSpec,
    _mask: Option<&WgpuMask>,
    _out: &mut WgpuTensor,
) -> Result<()> {
    Err(Error::invalid("wgpu attention: not yet"))
}
