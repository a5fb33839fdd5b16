use super::backend::{Wgpu, WgpuTensor};
use crate::error::{Error, Result};
use crate::ops::LayerNormDims;

#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm(
    _be: &Wgpu,
    _d: LayerNormDims,
    _x: &WgpuTensor,
    _residual: Option<&WgpuTensor>,
    _weight: &WgpuTensor,
    _bias: &WgpuTensor,
    _eps: f64,
    _out: &mut WgpuTensor,
    _sum_out: Option<&mut WgpuTensor>,
) -> Result<()> {
    Err(Error::invalid("wgpu layer_norm: not yet"))
}
