//! Every kernel's WGSL, as the backend builds it in each precision and weight
//! type, translated by naga to the Metal Shading Language and to HLSL: what
//! wgpu does on Apple and Windows machines, which the tests cannot reach. One
//! entry point at a time, as wgpu compiles them, after the same compaction to
//! what that entry point uses. The sources bind one buffer twice (as scalars
//! and as vec4s) and rely on each entry point using only one of the two, so in
//! HLSL no two resources of an entry point may share a register.
//!
//! A test module (`#[cfg(test)] mod portability` in `wgpu/mod.rs`): its
//! panics are test failures on the crate's own sources, never reached from a
//! caller's data.

use naga::back::{hlsl, msl, pipeline_constants, PipelineConstants};
use naga::valid::{Capabilities, ModuleInfo, ShaderStages, SubgroupOperationSet, ValidationFlags};
use naga::{Module, ShaderStage};

use super::backend::{module_source, Kernel, Precision};
use crate::tensor::DType;

/// Every kernel of every op, as the ops dispatch them.
fn kernels() -> Vec<Kernel> {
    [
        super::linear::kernels(),
        super::layer_norm::kernels(),
        super::attention::kernels(),
        super::attention_absorbed::kernels(),
        super::alignment_loss::kernels(),
        super::gather_signal_tokens::kernels(),
    ]
    .concat()
}

/// `source` parsed and validated with the capabilities wgpu asks of a device
/// for it (f16 only where the source enables it, subgroups in compute).
fn validated(source: &str) -> Result<(Module, ModuleInfo), String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    let mut caps = Capabilities::SUBGROUP;
    if source.starts_with("enable f16;") {
        caps |= Capabilities::SHADER_FLOAT16;
    }
    let info = naga::valid::Validator::new(ValidationFlags::all(), caps)
        .subgroup_stages(ShaderStages::COMPUTE)
        .subgroup_operations(SubgroupOperationSet::all())
        .validate(&module)
        .map_err(|e| e.emit_to_string(source))?;
    Ok((module, info))
}

/// The HLSL of `entry` in shader model `model`, or naga's error.
fn hlsl_of(
    module: &Module,
    info: &ModuleInfo,
    entry: &str,
    model: hlsl::ShaderModel,
) -> Result<String, String> {
    let options = hlsl::Options {
        shader_model: model,
        fake_missing_bindings: true,
        ..hlsl::Options::default()
    };
    let pipeline = hlsl::PipelineOptions {
        entry_point: Some((ShaderStage::Compute, entry.to_string())),
    };
    let mut out = String::new();
    hlsl::Writer::new(&mut out, &options, &pipeline)
        .write(module, info, None)
        .map_err(|e| format!("{e}"))?;
    Ok(out)
}

/// The registers (`t1`, `u2, space0`, ...) an HLSL source declares, in order.
fn registers(hlsl: &str) -> Vec<&str> {
    hlsl.split("register(")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .collect()
}

// A test (this module is compiled for tests only): each panic below is its
// failure report, naming the kernel and what naga refused.
#[test]
fn every_kernel_translates_to_metal_and_hlsl() {
    let mut translated = 0;
    for k in kernels() {
        // The weight types a kernel is built for: the tensors' own, and where
        // it reads a weight, f16 and bf16 packed.
        let weights: &[DType] = if k.weight.is_some() {
            &[DType::F32, DType::F16, DType::BF16]
        } else {
            &[DType::F32]
        };
        for precision in [Precision::F32, Precision::F16] {
            for &weight in weights {
                let weight = if weight == DType::F32 {
                    precision.dtype()
                } else {
                    weight
                };
                let what = format!("{} {} ({precision:?}, {weight} weights)", k.shader, k.entry);
                let source = module_source(&k, precision, weight);
                let (module, info) = validated(&source).unwrap_or_else(|e| panic!("{what}: {e}"));
                let (module, info) = pipeline_constants::process_overrides(
                    &module,
                    &info,
                    Some((ShaderStage::Compute, k.entry)),
                    &PipelineConstants::default(),
                )
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));

                let options = msl::Options {
                    lang_version: (2, 4),
                    fake_missing_bindings: true,
                    ..msl::Options::default()
                };
                let pipeline = msl::PipelineOptions {
                    entry_point: Some((ShaderStage::Compute, k.entry.to_string())),
                    ..msl::PipelineOptions::default()
                };
                msl::write_string(&module, &info, &options, &pipeline)
                    .unwrap_or_else(|e| panic!("{what} to Metal: {e}"));

                // 16-bit types need shader model 6.2; subgroups (wave ops) 6.0.
                let hlsl = hlsl_of(&module, &info, k.entry, hlsl::ShaderModel::V6_2)
                    .unwrap_or_else(|e| panic!("{what} to HLSL: {e}"));
                let regs = registers(&hlsl);
                assert!(!regs.is_empty(), "{what}: no resources in\n{hlsl}");
                for (i, r) in regs.iter().enumerate() {
                    assert!(
                        !regs[..i].contains(r),
                        "{what}: two resources on register({r}) in\n{hlsl}"
                    );
                }
                translated += 1;
            }
        }
    }
    // 29 kernels in two precisions, and linear's 10 with two packed weight types.
    assert_eq!(translated, 2 * (29 + 10 * 2), "kernels translated");
}
