use super::backend::{Bind, Kernel, KernelVersion, Wgpu, WgpuTensor};
use crate::error::{Error, Result};
use crate::ops::{LossDims, LossKind};

/// The shader works on "units" of one or four elements; one of these preludes,
/// prepended to it, says which (see the head of `shaders/alignment_loss.wgsl`).
macro_rules! source {
    (scalar) => {
        concat!(
            "alias unit = elem;\n",
            "const MASK = vec4<f32>(1.0, 0.0, 0.0, 0.0);\n",
            "fn widen(v: unit) -> vec4<f32> { return vec4<f32>(f32(v), 0.0, 0.0, 0.0); }\n",
            "fn narrow(v: vec4<f32>) -> unit { return unit(v.x); }\n",
            include_str!("../../shaders/alignment_loss.wgsl")
        )
    };
    (vec4) => {
        concat!(
            "alias unit = elem4;\n",
            "const MASK = vec4<f32>(1.0);\n",
            "fn widen(v: unit) -> vec4<f32> { return vec4<f32>(v); }\n",
            "fn narrow(v: vec4<f32>) -> unit { return unit(v); }\n",
            include_str!("../../shaders/alignment_loss.wgsl")
        )
    };
}

const SCALAR: &str = "alignment_loss.wgsl";
const VEC4: &str = "alignment_loss.wgsl (vec4)";

/// Every entry has the same bindings: reads pred, target; writes partials, out.
const fn kernel(shader: &'static str, source: &'static str, entry: &'static str) -> Kernel {
    Kernel {
        shader,
        source,
        entry,
        reads: 2,
        writes: 2,
        weight: None,
    }
}

const V1: Kernel = kernel(SCALAR, source!(scalar), "alignment_loss_v1");
const V1_TOTAL: Kernel = kernel(SCALAR, source!(scalar), "alignment_total_v1");
const FAST: Kernel = kernel(SCALAR, source!(scalar), "alignment_loss");
const FAST4: Kernel = kernel(VEC4, source!(vec4), "alignment_loss");
// The total writes one element: only the scalar build binds a [1] tensor.
const FAST_TOTAL: Kernel = kernel(SCALAR, source!(scalar), "alignment_total");

/// Every kernel of this op (for the translation tests).
#[cfg(test)]
pub(super) fn kernels() -> Vec<Kernel> {
    vec![V1, V1_TOTAL, FAST, FAST4, FAST_TOTAL]
}

/// Invocations per workgroup of the fast kernels (`WG` in the shader).
const WORKGROUP: usize = 256;
/// Invocations per workgroup of v1 (`V1_WG`).
const V1_WORKGROUP: usize = 64;
/// Units each invocation of the fast kernel handles at most while the team is
/// below a workgroup: the shader's `CACHE`, so that every unit is read once and
/// held in registers between the passes.
const UNITS_PER_INVOCATION: usize = 8;

wgsl_params! {
    shader: "alignment_loss.wgsl",
    struct Params {
        tokens: u32,
        dim: u32,
        units: u32,
        team: u32,
        token_l2: u32,
        grad_scale: f32,
        loss_scale: f32,
    }
}

/// Invocations per token: a power of two up to the workgroup, so a workgroup
/// holds whole tokens and the shader splits invocation indices with shifts and
/// masks.
fn team_size(units: usize) -> usize {
    units
        .div_ceil(UNITS_PER_INVOCATION)
        .next_power_of_two()
        .min(WORKGROUP)
}

pub(super) fn alignment_loss(
    be: &Wgpu,
    d: LossDims,
    kind: LossKind,
    pred: &WgpuTensor,
    target: &WgpuTensor,
    loss: &mut WgpuTensor,
    grad: &mut WgpuTensor,
) -> Result<()> {
    let tokens = d
        .batch
        .checked_mul(d.tokens)
        .ok_or_else(|| Error::Overflow("alignment_loss tokens".into()))?;
    // Every element index of the shader must fit in 32 bits.
    let numel = super::u32_of(tokens.saturating_mul(d.dim))?;
    let vec4 = be.version() == KernelVersion::Fast && d.dim.is_multiple_of(4);
    let units = if vec4 { d.dim / 4 } else { d.dim };
    let team = match be.version() {
        KernelVersion::Naive => 1,
        KernelVersion::Fast => team_size(units),
    };
    let (grad_scale, loss_scale) = match kind {
        LossKind::TokenL2 => (1.0 / tokens as f64, 1.0 / tokens as f64),
        LossKind::Mse => (2.0 / f64::from(numel), 1.0 / f64::from(numel)),
    };
    let params = Params {
        tokens: super::u32_of(tokens)?,
        dim: super::u32_of(d.dim)?,
        units: super::u32_of(units)?,
        team: super::u32_of(team)?,
        token_l2: u32::from(kind == LossKind::TokenL2),
        grad_scale: grad_scale as f32,
        loss_scale: loss_scale as f32,
    };
    // One f32 per token whatever the storage type, so the per-token terms keep
    // full precision until the final sum.
    let partials = be.alloc_f32_scratch(tokens)?;
    let reads = [pred.into(), target.into()];
    let none = [Bind::Unused, Bind::Unused];
    match be.version() {
        KernelVersion::Naive => {
            let groups = be.grid(tokens.div_ceil(V1_WORKGROUP))?;
            be.dispatch(&V1, &params, &reads, &[&partials, grad], groups)?;
            be.dispatch(&V1_TOTAL, &params, &none, &[&partials, loss], [1, 1, 1])
        }
        KernelVersion::Fast => {
            let groups = be.grid(tokens.div_ceil(WORKGROUP / team))?;
            let k = if vec4 { &FAST4 } else { &FAST };
            be.dispatch(k, &params, &reads, &[&partials, grad], groups)?;
            be.dispatch(&FAST_TOTAL, &params, &none, &[&partials, loss], [1, 1, 1])
        }
    }
}
