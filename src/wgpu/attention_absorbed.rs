//! The absorbed attention on wgpu (`shaders/attention_absorbed.wgsl`): the
//! naive v1 kernel and a workgroup per row.

use super::attention::mul;
use super::backend::{Kernel, KernelVersion, Wgpu, WgpuTensor};
use crate::error::{Error, Result};
use crate::ops::{f32_param, AbsorbedAttentionDims, AbsorbedAttentionInput, NormAfter, NormInput};

fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "attention_absorbed.wgsl",
        source: include_str!("../../shaders/attention_absorbed.wgsl"),
        entry,
        // x, residual, norm weight and bias, keys, values, key bias, out
        // bias, after weight and bias
        reads: 10,
        writes: 2,
        weight: None,
    }
}

/// Every kernel of this op (for the translation tests).
#[cfg(test)]
pub(super) fn kernels() -> Vec<Kernel> {
    vec![
        kernel("attention_absorbed_v1"),
        kernel("attention_absorbed"),
    ]
}

/// Storage bindings the kernels take: more than the 8 of WebGPU's defaults,
/// fewer than every native driver offers (the backend asks for the
/// adapter's own limits).
pub(super) const BINDINGS: u32 = 12;

wgsl_params! {
    shader: "attention_absorbed.wgsl",
    /// Must match `AbsorbedParams` in the shader.
    struct AbsorbedParams {
        rows: u32,
        lq: u32,
        cols: u32,
        lk: u32,
        heads: u32,
        k_stride: u32,
        k_start: u32,
        v_stride: u32,
        v_start: u32,
        b_stride: u32,
        b_start: u32,
        has_residual: u32,
        scale: f32,
        eps: f32,
        after_eps: f32,
        row_stride: u32,
    }
}

pub(super) fn attention_absorbed(
    be: &Wgpu,
    d: AbsorbedAttentionDims,
    norm: NormInput<'_, WgpuTensor>,
    attn: AbsorbedAttentionInput<'_, WgpuTensor>,
    after: NormAfter<'_, WgpuTensor>,
    stream_out: &mut WgpuTensor,
    out: &mut WgpuTensor,
) -> Result<()> {
    let limit = be.gpu().limits.max_storage_buffers_per_shader_stage;
    if limit < BINDINGS {
        return Err(Error::Backend {
            backend: "wgpu".into(),
            message: format!(
                "attention_absorbed needs {BINDINGS} storage buffers per shader stage, the device offers {limit}"
            ),
        });
    }
    // Every element index the shader forms must fit in 32 bits.
    let rows = mul(d.batch, d.lq, "rows")?;
    super::u32_of(mul(rows, d.cols, "rows")?)?;
    let keys = mul(d.batch, d.lk, "keys")?;
    for stride in [d.k_stride, d.v_stride, d.b_stride] {
        super::u32_of(mul(keys, stride, "keys")?)?;
    }
    // Both versions take a workgroup per row.
    let groups = be.grid(rows)?;
    let kernel = match be.version() {
        KernelVersion::Naive => kernel("attention_absorbed_v1"),
        KernelVersion::Fast => kernel("attention_absorbed"),
    };
    let params = AbsorbedParams {
        rows: super::u32_of(rows)?,
        lq: super::u32_of(d.lq)?,
        cols: super::u32_of(d.cols)?,
        lk: super::u32_of(d.lk)?,
        heads: super::u32_of(d.heads)?,
        k_stride: super::u32_of(d.k_stride)?,
        k_start: super::u32_of(d.k_start)?,
        v_stride: super::u32_of(d.v_stride)?,
        v_start: super::u32_of(d.v_start)?,
        b_stride: super::u32_of(d.b_stride)?,
        b_start: super::u32_of(d.b_start)?,
        has_residual: u32::from(norm.residual.is_some()),
        scale: f32_param("wgpu attention_absorbed: scale", attn.scale)?,
        eps: f32_param("attention_absorbed: eps", norm.eps)?,
        after_eps: f32_param("attention_absorbed: eps", after.eps)?,
        row_stride: groups[0],
    };
    let reads = [
        norm.x.into(),
        norm.residual.into(),
        norm.weight.into(),
        norm.bias.into(),
        attn.keys.tensor.into(),
        attn.values.tensor.into(),
        attn.key_bias.tensor.into(),
        attn.out_bias.into(),
        after.weight.into(),
        after.bias.into(),
    ];
    be.dispatch(&kernel, &params, &reads, &[stream_out, out], groups)
}
