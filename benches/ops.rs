//! Criterion benchmarks: each op at the image projector's shapes, and the whole
//! projector, on every backend compiled in and available here (the reference;
//! the CPU backend, its v1, and its bf16 and f16 GEMMs; wgpu, also with bf16
//! and f16 GEMM weights and tuned for the other kind of adapter; CUDA, also
//! replayed from a CUDA graph, f32 and bf16).
//!
//! `cargo bench --bench ops`; add `-- projector` or `-- linear` to filter.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use output_projector::bench::OpCase;
use output_projector::config::{Modality, ProjectorConfig, Variant};
use output_projector::device::Precision;
use output_projector::ops::Backend;
use output_projector::projector::Projector;
use output_projector::reference::Reference;
use output_projector::rng::Rng;
use output_projector::tensor::HostTensor;
use output_projector::weights::ProjectorWeights;

fn ops_on<B: Backend>(c: &mut Criterion, label: &str, be: &B, elem: usize) {
    let config = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let n_in = config.n_in.unwrap_or(4);
    let Ok(cases) = OpCase::projector_ops(&config, 1, n_in) else {
        return;
    };
    for case in cases {
        let mut g = c.benchmark_group(format!("{label}/{}", case.op()));
        g.sample_size(10);
        g.throughput(Throughput::Bytes(case.bytes(elem) as u64));
        let Ok(mut p) = case.prepare(be, 1) else {
            continue;
        };
        g.bench_function(BenchmarkId::from_parameter(case.shape()), |b| {
            b.iter(|| {
                p.run(be).ok();
                be.synchronize().ok();
            })
        });
        g.finish();
    }
}

fn projector_on<B: Backend>(c: &mut Criterion, label: &str, be: &B, batches: &[usize]) {
    let config = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let n_in = config.n_in.unwrap_or(4);
    let Ok(w) = ProjectorWeights::random(config.clone(), Some(Modality::Image), 0) else {
        return;
    };
    let Ok(proj) = Projector::new(be.clone(), &w) else {
        return;
    };
    let mut g = c.benchmark_group(format!("{label}/projector"));
    g.sample_size(10);
    for &batch in batches {
        let n = batch * n_in * config.in_dim;
        let Ok(host) =
            HostTensor::from_f64(vec![batch, n_in, config.in_dim], Rng::new(2).normal_vec(n))
        else {
            continue;
        };
        let Ok(h) = be.upload(&host) else { continue };
        g.bench_function(BenchmarkId::new("image", format!("batch {batch}")), |b| {
            b.iter(|| {
                proj.forward(&h, None).ok();
                be.synchronize().ok();
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    // The reference is naive by design: batch 1 only, as the baseline.
    ops_on(c, "reference", &Reference, 8);
    projector_on(c, "reference", &Reference, &[1]);
    // The CPU backend beside its v1, then the projector at batch 1 and 8.
    if let Ok(cpu) = output_projector::cpu::Cpu::open() {
        for (label, be) in [
            ("cpu", Some(cpu.clone())),
            ("cpu-v1", cpu.naive().ok().flatten()),
        ] {
            let Some(be) = be else { continue };
            ops_on(c, label, &be, 4);
        }
        projector_on(c, "cpu", &cpu, &[1, 8]);
        // GEMMs with 16-bit weights: the ops and the projector at batch 1.
        for (label, precision) in [("cpu-bf16", Precision::Bf16), ("cpu-f16", Precision::F16)] {
            let Ok(be) = cpu.clone().with_precision(precision) else {
                continue;
            };
            ops_on(c, label, &be, 2);
            projector_on(c, label, &be, &[1]);
        }
    }
    #[cfg(feature = "wgpu")]
    if let Ok(gpu) = output_projector::wgpu::Wgpu::open() {
        // Each kernel beside its naive v1, then the projector at batch 1, 8, 64.
        for (label, be) in [
            ("wgpu", Some(gpu.clone())),
            ("wgpu-v1", gpu.naive().ok().flatten()),
        ] {
            let Some(be) = be else { continue };
            ops_on(c, label, &be, 4);
            projector_on(c, label, &be, &[1, 8, 64]);
        }
        // GEMM weights packed in 16 bits: the ops and the projector at batch 1.
        use output_projector::wgpu::{WeightType, WgpuOptions};
        for (label, weights) in [
            ("wgpu-bf16w", WeightType::Bf16),
            ("wgpu-f16w", WeightType::F16),
        ] {
            let options = WgpuOptions {
                weights,
                ..gpu.options()
            };
            let Ok(be) = gpu.with_options(options) else {
                continue;
            };
            ops_on(c, label, &be, 2);
            projector_on(c, label, &be, &[1]);
        }
        // Tuned for the other kind of adapter (wgpu-gpu on lavapipe).
        use output_projector::wgpu::Tuning;
        let (label, tuning) = match gpu.tuning() {
            Tuning::Cpu => ("wgpu-gpu", Tuning::Gpu),
            _ => ("wgpu-cpu", Tuning::Cpu),
        };
        if let Ok(be) = gpu.with_options(WgpuOptions {
            tuning,
            ..gpu.options()
        }) {
            ops_on(c, label, &be, 4);
            projector_on(c, label, &be, &[1]);
        }
    }
    #[cfg(feature = "cuda")]
    cuda(c);
}

/// CUDA: each kernel beside its v1, the projector eager and replayed from a
/// CUDA graph, in f32 and bf16.
#[cfg(feature = "cuda")]
fn cuda(c: &mut Criterion) {
    use output_projector::cuda::{Cuda, CudaOptions};
    use output_projector::tensor::DType;
    let Ok(cuda) = Cuda::open() else { return };
    for (label, be) in [
        ("cuda", Some(cuda.clone())),
        ("cuda-v1", cuda.naive().ok().flatten()),
    ] {
        let Some(be) = be else { continue };
        ops_on(c, label, &be, 4);
        projector_on(c, label, &be, &[1, 8, 64]);
    }
    let bf16 = CudaOptions {
        storage: DType::BF16,
        ..CudaOptions::default()
    };
    for (label, be) in [
        ("cuda", Some(cuda.clone())),
        ("cuda-bf16", cuda.with_options(bf16).ok()),
    ] {
        let Some(be) = be else { continue };
        let config = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
        let n_in = config.n_in.unwrap_or(4);
        let Ok(w) = ProjectorWeights::random(config.clone(), Some(Modality::Image), 0) else {
            return;
        };
        let Ok(proj) = Projector::new(be.clone(), &w) else {
            continue;
        };
        let mut g = c.benchmark_group(format!("{label}/projector-graph"));
        g.sample_size(20);
        for batch in [1, 8, 64] {
            let Ok(graph) = proj.capture(batch, n_in) else {
                continue;
            };
            g.bench_function(BenchmarkId::new("image", format!("batch {batch}")), |b| {
                b.iter(|| {
                    graph.replay().ok();
                    be.synchronize().ok();
                })
            });
        }
        g.finish();
    }
}

criterion_group!(all, benches);
criterion_main!(all);
