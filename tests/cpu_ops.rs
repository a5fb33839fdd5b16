//! The CPU backend against the float64 reference and PyTorch's golden outputs.

use std::sync::Arc;

use output_projector::config::{Modality, ProjectorConfig, Variant};
use output_projector::cpu::rayon::ThreadPoolBuilder;
use output_projector::cpu::{Cpu, CpuOptions};
use output_projector::device::Precision;
use output_projector::golden;
use output_projector::ops::{Activation, Backend, KernelVersion};
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
    check_versions(
        &verify::standard_cases(),
        op,
        &[DType::F32, DType::F16],
        tol,
    );
}

/// Every case of `cases` for `op` (at least one) within `tol` on each kernel
/// version, with inputs drawn in each of `dtypes`.
fn check_versions(cases: &[verify::Case], op: &str, dtypes: &[DType], tol: f64) {
    let fast = cpu(0);
    assert_eq!(fast.options().version, KernelVersion::Fast);
    let naive = fast.naive().unwrap().expect("a v1");
    for be in [fast, naive] {
        for &dtype in dtypes {
            let n = verify::check_cases(&be, cases, op, dtype, 300, tol)
                .unwrap_or_else(|e| panic!("{:?} {e}", be.options().version));
            assert!(n > 0, "no case for {op}");
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

/// Projectors of shapes drawn at random (`verify::random_projectors`: heads,
/// widths, tokens, layers and batch, every norm and attention bias drawn)
/// on each kernel version, within the projector's 1e-4 of the reference;
/// with bf16 and f16 GEMMs (weights and inputs drawn in that type) within
/// 2e-2, or for a shape past that (a Transformer 3 columns wide came out at
/// 1.7e-2 in bf16) within `verify::SPREAD_FACTOR` times what rounding its
/// weights and inputs alone does to the reference.
#[test]
fn random_projectors_match_reference() {
    let shapes = verify::random_projectors(43, 40);
    let fast = cpu(0);
    let naive = fast.naive().unwrap().expect("a v1");
    for be in [fast, naive] {
        let (worst, bound) =
            verify::check_projectors(&be, &shapes, DType::F32, 430, 1e-4, DType::F32.epsilon())
                .unwrap_or_else(|e| panic!("{:?}: {e}", be.options().version));
        println!(
            "{:?}: worst {} rel {:.2e} (bound {bound:.1e})",
            be.options().version,
            worst.case,
            worst.rel
        );
    }
    for (precision, dtype) in SIXTEEN {
        let (tol, eps) = (precision.tolerances().1, precision.epsilon());
        let be = cpu_in(precision, 0);
        let (worst, bound) = verify::check_projectors(&be, &shapes, dtype, 430, tol, eps)
            .unwrap_or_else(|e| panic!("{precision:?}: {e}"));
        println!(
            "{precision:?}: worst {} rel {:.2e} (bound {bound:.1e})",
            worst.case, worst.rel
        );
    }
}

/// One projector forwarding from three threads at once, its first forwards
/// among them, each thread's plan reused for three inputs: the same bits as
/// plain forwards on one thread (`verify::check_threads`).
#[test]
fn one_projector_serves_many_threads() {
    // A race shows in some runs, not all: three projectors, each raced anew.
    for seed in 9..12 {
        verify::check_threads(&cpu(0), &[1, 2, 3], seed).unwrap();
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

/// Every op at 400 sizes drawn at random (`verify::random_cases`: mostly 1-9,
/// some to 40, a few past 100, every flag drawn) against the reference on each
/// kernel version, within the standard cases' tolerances; and the GEMMs with
/// bf16 and f16 weights on inputs drawn in that type, where every product is
/// exact and only the f32 sums err.
#[test]
fn random_sizes_match_reference() {
    let cases = verify::random_cases(41, 400);
    for op in verify::OPS {
        check_versions(&cases, op, &[DType::F32], verify::f32_tolerance(op));
    }
    for (precision, dtype) in SIXTEEN {
        let be = cpu_in(precision, 0);
        for op in ["linear", "linear_layer_norm"] {
            verify::check_cases(&be, &cases, op, dtype, 410, 1e-5)
                .unwrap_or_else(|e| panic!("{precision:?} {op}: {e}"));
        }
    }
}

/// Every op at 400 sizes drawn at random with bf16 and f16 weights, inputs
/// drawn in that type and in f32, on each kernel version: within the
/// precision's 1e-2, or where one rounding can move a tiny output by more
/// (2x1x9 GELU came out at 0.97 of itself), within `verify::SPREAD_FACTOR`
/// times what rounding the inputs alone does to the reference, and that
/// wider bound rare (`RoundedBounds::tight`).
#[test]
fn random_sizes_in_16_bits_match_reference() {
    let cases = verify::random_cases(42, 400);
    for (precision, dtype) in SIXTEEN {
        let fast = cpu_in(precision, 0);
        let naive = fast.naive().unwrap().expect("a v1");
        let (tol, eps) = (precision.tolerances().0, precision.epsilon());
        let mut held = verify::RoundedBounds::default();
        for be in [fast, naive] {
            for dtype in [dtype, DType::F32] {
                held += verify::check_ops_rounded(&be, &cases, dtype, 420, tol, eps)
                    .unwrap_or_else(|e| panic!("{precision:?} {:?} {e}", be.options().version));
            }
        }
        println!("{precision:?}: {held}");
        assert!(held.tight(), "{precision:?}: {held}");
    }
}

/// The 16-bit precisions the CPU computes its GEMMs in, and their storage.
const SIXTEEN: [(Precision, DType); 2] =
    [(Precision::Bf16, DType::BF16), (Precision::F16, DType::F16)];

fn cpu_in(precision: Precision, threads: usize) -> Cpu {
    Cpu::new(CpuOptions {
        threads,
        precision,
        ..CpuOptions::default()
    })
    .expect("cpu backend")
}

/// The GEMM ops with bf16 and f16 weights, on each kernel version. Inputs
/// drawn in the same type: rounding `x` to it is exact, so only f32 sums err
/// (1e-5, as in f32), except after a LayerNorm. Inputs drawn in f32: `x` and
/// `w` each rounded once, to bf16's 8 bits (2^-9 relative at most) or f16's
/// 11, about a third of that on a sum of many products: the precision's 1e-2
/// for one op.
#[test]
fn gemms_in_16_bits_match_reference() {
    for (precision, dtype) in SIXTEEN {
        let fast = cpu_in(precision, 0);
        let naive = fast.naive().unwrap().expect("a v1");
        assert_eq!(naive.options().precision, precision);
        let cases = verify::standard_cases();
        let one_op = precision.tolerances().0;
        // With a LayerNorm before the GEMM, its output is rounded too.
        let ops = [
            ("linear", 1e-5),
            ("layer_norm_linear", one_op),
            ("linear_layer_norm", 1e-5),
        ];
        for be in [fast, naive] {
            for (op, exact_inputs) in ops {
                for (dtype, tol) in [(dtype, exact_inputs), (DType::F32, one_op)] {
                    let n =
                        verify::check_cases(&be, &cases, op, dtype, 310, tol).unwrap_or_else(|e| {
                            panic!("{precision:?} {:?} {op}: {e}", be.options().version)
                        });
                    assert!(n > 0, "no standard case for {op}");
                }
            }
        }
    }
}

/// The whole projector with bf16 and f16 GEMMs within the precision's 2e-2
/// of the float64 reference, weights and inputs drawn in that type and in
/// f32; and the same bits on 1 and 3 threads.
#[test]
fn projector_in_16_bits_matches_reference() {
    let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let v15 = ProjectorConfig::preset(Modality::Video, Variant::V15);
    for (precision, dtype) in SIXTEEN {
        let be = cpu_in(precision, 0);
        let tol = precision.tolerances().1;
        for (config, batch, dtype) in [
            (&image, 1, dtype),
            (&image, 3, DType::F32),
            (&v15, 2, dtype),
        ] {
            let r = verify::compare_projector(&be, config, batch, dtype, 12).unwrap();
            assert!(
                r.rel <= tol,
                "{precision:?} {} {dtype}: rel {:.3e}",
                r.case,
                r.rel
            );
            println!("{precision:?} {} {dtype}: rel {:.2e}", r.case, r.rel);
        }
        let case = verify::ProjectorCase::new(&image, 2, dtype, 5).unwrap();
        let bits = |be: &Cpu| {
            let y = case.run(be, |p, h, e| be.download(&p.forward(h, Some(e))?));
            y.unwrap()
                .to_f32_vec()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&cpu_in(precision, 1)), bits(&cpu_in(precision, 3)));
    }
}

/// A bf16 or f16 weight comes back as it went up (bf16's odd rows padded
/// inside, not outside); any other op than `linear`'s weight refuses it, and
/// so does `data()`; values the type cannot hold, and TF32, are errors. In
/// f16, so is a GEMM input past f16's range.
#[test]
fn weights_in_16_bits_are_linear_weights_only() {
    use output_projector::ops::Shaped;
    for (precision, dtype) in SIXTEEN {
        let be = cpu_in(precision, 1);
        let w = HostTensor::randn(vec![3, 5], 6, "w")
            .unwrap()
            .to_storage(dtype, "w")
            .unwrap();
        let up = be.upload_weight(&w).unwrap();
        assert_eq!((up.dtype(), up.shape()), (dtype, &[3, 5][..]));
        let back = be.download(&up).unwrap();
        assert_eq!(back.dtype(), dtype);
        assert_eq!(back.to_f32_vec(), w.to_f32_vec());
        // From f32: rounded once, to the same values.
        let from_f32 = be.upload_weight(&w.to_dtype(DType::F32)).unwrap();
        assert_eq!(be.download(&from_f32).unwrap().to_f32_vec(), w.to_f32_vec());
        // Rows of no elements, and no rows, go up and come back too.
        for shape in [vec![3, 0], vec![0, 5]] {
            let empty = HostTensor::from_f32(shape.clone(), vec![]).unwrap();
            let back = be.download(&be.upload_weight(&empty).unwrap()).unwrap();
            assert_eq!((back.shape(), back.numel()), (&shape[..], 0));
            // As a GEMM's weight: an error (a dimension of 0), not a panic.
            let x = vec![1.0; 2 * shape[1]];
            let x = be.upload(&HostTensor::from_f32(vec![2, shape[1]], x).unwrap());
            let up = be.upload_weight(&empty).unwrap();
            let mut out = be.alloc(&[2, shape[0]]).unwrap();
            let got = be.linear(&x.unwrap(), &up, None, Activation::None, None, &mut out);
            assert!(
                got.unwrap_err().to_string().contains("at least 1"),
                "{shape:?}"
            );
        }
        // An f32 backend keeps weights in f32.
        assert_eq!(cpu(1).upload_weight(&w).unwrap().dtype(), DType::F32);

        let x = be
            .upload(&HostTensor::randn(vec![2, 5], 7, "x").unwrap())
            .unwrap();
        let mut out = be.alloc(&[2, 3]).unwrap();
        be.linear(&x, &up, None, Activation::None, None, &mut out)
            .unwrap();
        let mut square = be.alloc(&[3, 3]).unwrap();
        let e = be.linear(&up, &up, None, Activation::None, None, &mut square);
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains(&format!("shape [3, 5] is stored in {dtype}")),
            "{e}"
        );
        let gamma = be.upload_weight(&w.rows(0..1).unwrap().reshape(vec![5]).unwrap());
        let beta = be.upload(&HostTensor::from_f32(vec![5], vec![0.0; 5]).unwrap());
        let mut y = be.alloc(&[2, 5]).unwrap();
        let e = be.layer_norm(
            &x,
            None,
            &gamma.unwrap(),
            &beta.unwrap(),
            1e-5,
            &mut y,
            None,
        );
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains(&format!("only linear's weight may be {dtype}")),
            "{e}"
        );
        assert!(up.data().is_err());

        let big = if precision == Precision::F16 {
            7e4
        } else {
            1e39
        };
        let big = HostTensor::from_f64(vec![2], vec![1.0, big]).unwrap();
        let e = be.upload_weight(&big).map(|_| ()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("at flat index 1 overflows {dtype}")),
            "{e}"
        );
    }
    // f16's range bounds a GEMM's input too: 65519 rounds to 65504, 65520
    // to infinity (an error); an infinity passes, as it does in f32.
    let be = cpu_in(Precision::F16, 1);
    let w = be.upload_weight(&HostTensor::from_f32(vec![1, 3], vec![1.0; 3]).unwrap());
    let w = w.unwrap();
    let mut out = be.alloc(&[1, 1]).unwrap();
    for (x, want) in [
        ([65519.0, 0.0, -1.0], Ok(65503.0)),
        (
            [1.0, -65520.0, 0.0],
            Err("-65520 at flat index 1 overflows f16"),
        ),
        ([f32::INFINITY, 1.0, 0.0], Ok(f32::INFINITY)),
    ] {
        let x = be.upload(&HostTensor::from_f32(vec![1, 3], x.to_vec()).unwrap());
        let got = be.linear(&x.unwrap(), &w, None, Activation::None, None, &mut out);
        match want {
            Ok(v) => {
                got.unwrap();
                assert_eq!(out.data().unwrap()[0], v);
            }
            Err(msg) => {
                let e = got.unwrap_err().to_string();
                assert!(e.contains(msg), "{e}");
            }
        }
    }
    let e = cpu(1)
        .with_precision(Precision::Tf32)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("precision tf32"), "{e}");
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
