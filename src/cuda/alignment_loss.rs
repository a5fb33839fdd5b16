//! `kernels/alignment_loss.cu`: loss and gradient in one pass over the data,
//! then a fixed-order (deterministic) sum of per-token partials.

use cudarc::driver::DeviceRepr;

use super::backend::{blocks_for, i32_of, Cuda, CudaTensor, KernelVersion};
use super::program::{param_layout, Program};
use crate::error::Result;
use crate::ops::{LossDims, LossKind};

/// Mirror of `LossParams` in kernels/alignment_loss.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct LossParams {
    pred: u64,
    target: u64,
    grad: u64,
    partial: u64,
    loss: u64,
    tokens: i32,
    dim: i32,
    kind: i32,
    grad_scale: f32,
}

// SAFETY: plain data (u64, i32 and f32 fields, no padding), laid out exactly as
// the kernels' LossParams: the static_asserts compiled into alignment_loss.cu
// check it.
unsafe impl DeviceRepr for LossParams {}

fn layouts() -> String {
    param_layout!(LossParams {
        pred,
        target,
        grad,
        partial,
        loss,
        tokens,
        dim,
        kind,
        grad_scale
    })
}

pub(crate) static PROGRAM: Program = Program {
    file: "alignment_loss.cu",
    source: include_str!("../../kernels/alignment_loss.cu"),
    kernels: &[
        "alignment_loss_naive_rows",
        "alignment_loss_naive_finish",
        "alignment_loss_rows",
        "alignment_loss_finish",
    ],
    f32_kernels: &[],
    half_kernels: &[],
    tf32_kernels: &[],
    wgmma_kernels: &[],
    layouts,
};

pub(crate) fn kind_code(kind: LossKind) -> i32 {
    match kind {
        LossKind::TokenL2 => 0,
        LossKind::Mse => 1,
    }
}

/// The two launches `((kernel, grid, block), (kernel, grid, block))` over
/// `tokens` rows.
#[allow(clippy::type_complexity)]
pub(crate) fn plan(
    tokens: usize,
    version: KernelVersion,
) -> Result<((&'static str, u32, u32), (&'static str, u32, u32))> {
    Ok(match version {
        KernelVersion::Naive => (
            (
                "alignment_loss_naive_rows",
                blocks_for("alignment_loss", tokens, 128)?,
                128,
            ),
            ("alignment_loss_naive_finish", 1, 1),
        ),
        KernelVersion::Fast => (
            (
                "alignment_loss_rows",
                blocks_for("alignment_loss", tokens, 1)?,
                256,
            ),
            ("alignment_loss_finish", 1, 256),
        ),
    })
}

pub(super) fn alignment_loss(
    be: &Cuda,
    d: LossDims,
    kind: LossKind,
    pred: &CudaTensor,
    target: &CudaTensor,
    loss: &mut CudaTensor,
    grad: &mut CudaTensor,
) -> Result<()> {
    let pp = be.check_tensor("alignment_loss pred", pred)?;
    let tp = be.check_tensor("alignment_loss target", target)?;
    let lp = be.check_tensor("alignment_loss loss", loss)?;
    let gp = be.check_tensor("alignment_loss grad", grad)?;
    be.check_disjoint("alignment_loss", &[&*loss, &*grad], &[pred, target])?;

    let tokens = d.batch * d.tokens; // <= numel, which fits in i32 (checked above)
    let numel = tokens * d.dim;
    let partials = be.scratch(tokens * 4)?;
    let params = LossParams {
        pred: pp,
        target: tp,
        grad: gp,
        partial: partials.ptr(),
        loss: lp,
        tokens: i32_of("alignment_loss tokens", tokens)?,
        dim: i32_of("alignment_loss dim", d.dim)?,
        kind: kind_code(kind),
        grad_scale: (2.0 / numel as f64) as f32,
    };
    let ((rows, rows_grid, rows_block), (finish, finish_grid, finish_block)) =
        plan(tokens, be.version())?;
    be.launch(
        &PROGRAM,
        rows,
        (rows_grid, 1, 1),
        (rows_block, 1, 1),
        &params,
    )?;
    be.launch(
        &PROGRAM,
        finish,
        (finish_grid, 1, 1),
        (finish_block, 1, 1),
        &params,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_codes_match_the_kernels() {
        assert!(PROGRAM.source.contains("#define LOSS_TOKEN_L2 0"));
        assert!(PROGRAM.source.contains("#define LOSS_MSE 1"));
        assert_eq!(kind_code(LossKind::TokenL2), 0);
        assert_eq!(kind_code(LossKind::Mse), 1);
    }

    #[test]
    fn plans() {
        let ((_, g, b), (_, fg, fb)) = plan(231, KernelVersion::Naive).unwrap();
        assert!((g * b) as usize >= 231);
        assert_eq!((fg, fb), (1, 1));
        let ((_, g, b), (_, fg, fb)) = plan(231, KernelVersion::Fast).unwrap();
        assert_eq!((g, b), (231, 256));
        assert_eq!((fg, fb), (1, 256));
    }
}
