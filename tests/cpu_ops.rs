//! The CPU backend against the float64 reference and PyTorch's golden outputs.

use std::sync::Arc;

use output_projector::config::{Modality, ProjectorConfig, Variant};
use output_projector::cpu::rayon::ThreadPoolBuilder;
use output_projector::cpu::{Cpu, CpuOptions};
use output_projector::golden;
use output_projector::ops::{Backend, KernelVersion};
use output_projector::tensor::{DType, HostTensor};
use output_projector::verify;

fn cpu(threads: usize) -> Cpu {
    Cpu::new(CpuOptions {
        threads,
        ..CpuOptions::default()
    })
    .expect("cpu backend")
}

/// Every standard case of `op` within `tol` on each kernel version, with f32
/// inputs and with inputs rounded to f16 (the reference sees the same
/// rounded values).
fn check_op(op: &str, tol: f64) {
    let fast = cpu(0);
    assert_eq!(fast.options().version, KernelVersion::Fast);
    let naive = fast.naive().unwrap().expect("a v1");
    let cases = verify::standard_cases();
    for be in [fast, naive] {
        for dtype in [DType::F32, DType::F16] {
            let n = verify::check_cases(&be, &cases, op, dtype, 300, tol)
                .unwrap_or_else(|e| panic!("{:?} {e}", be.options().version));
            assert!(n > 0, "no standard case for {op}");
        }
    }
}

// Tolerances: f32 sums against a float64 reference. A dot product of K terms
// summed in 8 lanes then a tree errs by about sqrt(K/8) f32 roundings
// relative to the terms' magnitudes (~1e-6 at K = 4096); 1e-5 has margin.

#[test]
fn linear_matches_reference() {
    check_op("linear", 1e-5);
}

#[test]
fn layer_norm_matches_reference() {
    check_op("layer_norm", 1e-5);
}

/// The trait's default: the two ops.
#[test]
fn layer_norm_linear_matches_reference() {
    check_op("layer_norm_linear", 1e-5);
}

/// The trait's default: the two ops.
#[test]
fn linear_layer_norm_matches_reference() {
    check_op("linear_layer_norm", 1e-5);
}

#[test]
fn attention_matches_reference() {
    check_op("attention", 1e-5);
}

#[test]
fn long_attention_matches_reference() {
    let be = cpu(0);
    for case in verify::long_attention_cases() {
        let r = verify::compare_case(&be, &case, DType::F32, 3).unwrap();
        assert!(r.rel <= 1e-5, "{}: rel {:.3e}", r.case, r.rel);
    }
}

#[test]
fn alignment_loss_matches_reference() {
    check_op("alignment_loss", 1e-5);
}

#[test]
fn gather_signal_tokens_matches_reference() {
    // One f32 rounding of a sum of two f32 values.
    check_op("gather_signal_tokens", 1e-7);
}

#[test]
fn attention_absorbed_matches_reference() {
    // Two LayerNorms around dot products of up to 516 terms and sums of up
    // to 128: f32 rounding, as the other ops.
    check_op("attention_absorbed", 1e-5);
}

/// The whole projector: image preset at batch 1 and 3, audio preset (n_out = 1), v1.5.
#[test]
fn projector_matches_reference() {
    let be = cpu(0);
    let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let audio = ProjectorConfig::preset(Modality::Audio, Variant::Legacy);
    let v15 = ProjectorConfig::preset(Modality::Video, Variant::V15);
    for (config, batch) in [(&image, 1), (&image, 3), (&audio, 2), (&v15, 1)] {
        let r = verify::compare_projector(&be, config, batch, DType::F32, 11).unwrap();
        assert!(r.rel <= 1e-4, "{}: rel {:.3e}", r.case, r.rel);
        println!("{}: rel {:.2e}", r.case, r.rel);
    }
}

/// Every golden case PyTorch computed in float64, at f32's accuracy.
#[test]
fn cpu_matches_pytorch() {
    let results = golden::run_all(&cpu(0)).expect("golden cases run");
    assert!(results.iter().any(|r| r.op == "projector"));
    for r in &results {
        assert!(r.rel <= 1e-4, "{} {}: rel {:.3e}", r.op, r.case, r.rel);
    }
}

/// Tiles depend on the thread count, sums do not: 1, 2 and 3 threads give the
/// same bits, and so do repeated runs, and a pool of the caller's, called
/// from outside it and from one of its own threads.
#[test]
fn results_do_not_depend_on_threads() {
    let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let case = verify::ProjectorCase::new(&image, 2, DType::F32, 5).unwrap();
    let on = |be: &Cpu| {
        case.run(be, |p, h, e| be.download(&p.forward(h, Some(e))?))
            .unwrap()
            .to_f32_vec()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    let run = |threads| on(&cpu(threads));
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
    assert_eq!(one, run(3));

    let pool = Arc::new(ThreadPoolBuilder::new().num_threads(3).build().unwrap());
    let theirs = Cpu::on_pool(Arc::clone(&pool), KernelVersion::Fast);
    assert!(Arc::ptr_eq(theirs.pool(), &pool));
    assert_eq!(theirs.options().threads, 3);
    assert_eq!(one, on(&theirs));
    assert_eq!(one, pool.install(|| on(&theirs)));
}

/// Values f32 cannot hold are errors on upload, and an attention scale past
/// f32's range is an error, where the f64 reference runs.
#[test]
fn what_f32_cannot_hold_is_an_error() {
    use output_projector::ops::{AttentionSpec, Cols};
    let be = cpu(1);
    let t = HostTensor::from_f64(vec![2], vec![1.0, 1e39]).unwrap();
    let e = be.upload(&t).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("at flat index 1 overflows f32"), "{e}");
    let qkv = be
        .upload(&HostTensor::randn(vec![1, 3, 24], 4, "qkv").unwrap())
        .unwrap();
    let spec = AttentionSpec {
        scale: Some(1e39),
        ..AttentionSpec::new(2, 4)
    };
    let (q, k, v) = (Cols::new(&qkv, 0), Cols::new(&qkv, 8), Cols::new(&qkv, 16));
    let e = be
        .attention(q, k, v, &spec, None, &mut be.alloc(&[1, 3, 8]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit f32"), "{e}");
}

/// A plan whose buffers would not fit in the memory left is refused before
/// it takes any (the kernel's out-of-memory killer would otherwise end the
/// process while the buffers are written).
#[cfg(target_os = "linux")]
#[test]
fn a_batch_too_large_for_the_memory_is_refused_up_front() {
    use output_projector::error::Error;
    use output_projector::projector::Projector;
    use output_projector::tensor::memory_available;
    use output_projector::weights::ProjectorWeights;
    let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let weights = ProjectorWeights::random(image.clone(), Some(Modality::Image), 3).unwrap();
    let projector = Projector::new(cpu(2), &weights).unwrap();
    let free = memory_available().expect("/proc/meminfo is readable on Linux");
    // The output buffer alone is past what is left.
    let batch = (free / (image.n_out * image.out_dim * 4) as u64 + 1) as usize;
    let e = projector.plan(batch, 4).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory(_)), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains(&format!("the buffers of a forward at batch {batch}")),
        "{e}"
    );
    assert!(e.ends_with("MiB available)"), "{e}");
    // A batch that fits still plans.
    assert!(projector.plan(2, 4).is_ok());
}
