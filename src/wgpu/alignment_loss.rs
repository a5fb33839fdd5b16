use super::backend::{Wgpu, WgpuTensor};
use crate::error::{Error, Result};
use crate::ops::{LossDims, LossKind};

pub(super) fn alignment_loss(
    _be: &Wgpu,
    _d: LossDims,
    _kind: LossKind,
    _pred: &WgpuTensor,
    _target: &WgpuTensor,
    _loss: &mut WgpuTensor,
    _grad: &mut WgpuTensor,
) -> Result<()> {
    Err(Error::invalid("wgpu alignment_loss: not yet"))
}
