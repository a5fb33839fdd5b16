use super::backend::{Wgpu, WgpuTensor};
use crate::error::{Error, Result};
use crate::ops::{Activation, LinearDims};

#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    _be: &Wgpu,
    _d: LinearDims,
    _x: &WgpuTensor,
    _w: &WgpuTensor,
    _b: Option<&WgpuTensor>,
    _act: Activation,
    _residual: Option<&WgpuTensor>,
    _out: &mut WgpuTensor,
) -> Result<()> {
    Err(Error::invalid("wgpu linear: not yet"))
}
