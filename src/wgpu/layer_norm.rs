use super::backend::{Kernel, KernelVersion, Wgpu, WgpuTensor};
use crate::error::Result;
use crate::ops::{f32_param, LayerNormDims};

/// The shader works on "units" of one or four elements; one of these preludes,
/// prepended to it, says which (see the head of `shaders/layer_norm.wgsl`).
macro_rules! source {
    (scalar) => {
        concat!(
            "alias unit = elem;\n",
            "const LANES: u32 = 1u;\n",
            "const MASK = vec4<f32>(1.0, 0.0, 0.0, 0.0);\n",
            "fn widen(v: unit) -> vec4<f32> { return vec4<f32>(f32(v), 0.0, 0.0, 0.0); }\n",
            "fn narrow(v: vec4<f32>) -> unit { return unit(v.x); }\n",
            include_str!("../../shaders/layer_norm.wgsl")
        )
    };
    (vec4) => {
        concat!(
            "alias unit = elem4;\n",
            "const LANES: u32 = 4u;\n",
            "const MASK = vec4<f32>(1.0);\n",
            "fn widen(v: unit) -> vec4<f32> { return vec4<f32>(v); }\n",
            "fn narrow(v: vec4<f32>) -> unit { return unit(v); }\n",
            include_str!("../../shaders/layer_norm.wgsl")
        )
    };
}

const SCALAR: &str = "layer_norm.wgsl";
const VEC4: &str = "layer_norm.wgsl (vec4)";

/// Reads x, residual, weight, bias; writes out, and sum_out in the `_sum` entries.
const fn kernel(
    shader: &'static str,
    source: &'static str,
    entry: &'static str,
    writes: u32,
) -> Kernel {
    Kernel {
        shader,
        source,
        entry,
        reads: 4,
        writes,
        weight: None,
    }
}

const V1: Kernel = kernel(SCALAR, source!(scalar), "layer_norm_v1", 1);
const V1_SUM: Kernel = kernel(SCALAR, source!(scalar), "layer_norm_v1_sum", 2);
const FAST: Kernel = kernel(SCALAR, source!(scalar), "layer_norm", 1);
const FAST_SUM: Kernel = kernel(SCALAR, source!(scalar), "layer_norm_sum", 2);
const FAST4: Kernel = kernel(VEC4, source!(vec4), "layer_norm", 1);
const FAST4_SUM: Kernel = kernel(VEC4, source!(vec4), "layer_norm_sum", 2);

/// Every kernel of this op (for the translation tests).
#[cfg(test)]
pub(super) fn kernels() -> Vec<Kernel> {
    vec![V1, V1_SUM, FAST, FAST_SUM, FAST4, FAST4_SUM]
}

/// Invocations per workgroup of the fast kernel (`WG` in the shader).
const WORKGROUP: usize = 256;
/// Invocations per workgroup of v1 (`V1_WG`).
const V1_WORKGROUP: usize = 64;
/// Units each invocation of the fast kernel handles at most while the team is
/// below a workgroup: the shader's `CACHE`, so that every unit is read once and
/// held in registers between the passes.
const UNITS_PER_INVOCATION: usize = 8;

wgsl_params! {
    shader: "layer_norm.wgsl",
    struct Params {
        rows: u32,
        cols: u32,
        units: u32,
        team: u32,
        has_residual: u32,
        eps: f32,
    }
}

/// Invocations per row: a power of two up to the workgroup, so a workgroup holds
/// whole rows and the shader splits invocation indices with shifts and masks.
fn team_size(units: usize) -> usize {
    units
        .div_ceil(UNITS_PER_INVOCATION)
        .next_power_of_two()
        .min(WORKGROUP)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm(
    be: &Wgpu,
    d: LayerNormDims,
    x: &WgpuTensor,
    residual: Option<&WgpuTensor>,
    weight: &WgpuTensor,
    bias: &WgpuTensor,
    eps: f64,
    out: &mut WgpuTensor,
    sum_out: Option<&mut WgpuTensor>,
) -> Result<()> {
    // Every element index of the shader must fit in 32 bits.
    super::u32_of(d.rows.saturating_mul(d.cols))?;
    let vec4 = be.version() == KernelVersion::Fast && d.cols.is_multiple_of(4);
    let units = if vec4 { d.cols / 4 } else { d.cols };
    let (team, groups, kernels) = match be.version() {
        KernelVersion::Naive => (1, be.grid(d.rows.div_ceil(V1_WORKGROUP))?, (&V1, &V1_SUM)),
        KernelVersion::Fast => {
            let team = team_size(units);
            let kernels = if vec4 {
                (&FAST4, &FAST4_SUM)
            } else {
                (&FAST, &FAST_SUM)
            };
            (team, be.grid(d.rows.div_ceil(WORKGROUP / team))?, kernels)
        }
    };
    let params = Params {
        rows: super::u32_of(d.rows)?,
        cols: super::u32_of(d.cols)?,
        units: super::u32_of(units)?,
        team: super::u32_of(team)?,
        has_residual: u32::from(residual.is_some()),
        eps: f32_param("layer_norm: eps", eps)?,
    };
    let reads = [x.into(), residual.into(), weight.into(), bias.into()];
    match sum_out {
        Some(s) => be.dispatch(kernels.1, &params, &reads, &[out, s], groups),
        None => be.dispatch(kernels.0, &params, &reads, &[out], groups),
    }
}
