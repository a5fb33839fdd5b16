//! The wgpu backend against the CPU reference (on lavapipe in CI). With
//! `REQUIRE_WGPU=1` a missing adapter fails; otherwise these tests skip in one line.
#![cfg(feature = "wgpu")]

use output_projector::tensor::DType;
use output_projector::verify;
use output_projector::wgpu::{KernelVersion, Precision, Tuning, WeightType, Wgpu, WgpuOptions};

fn backend(options: WgpuOptions) -> Option<Wgpu> {
    match output_projector::wgpu::open() {
        Ok(gpu)
            if options.precision == Precision::F16
                && !gpu.features.contains(wgpu::Features::SHADER_F16) =>
        {
            println!(
                "skipped: f16 storage: `{}` lacks SHADER_F16",
                gpu.info.adapter
            );
            None
        }
        Ok(gpu) => Some(Wgpu::new(std::sync::Arc::new(gpu), options).expect("wgpu backend")),
        Err(e) if std::env::var("REQUIRE_WGPU").as_deref() == Ok("1") => {
            panic!("REQUIRE_WGPU=1 but no wgpu adapter: {e}")
        }
        Err(e) => {
            println!("skipped: wgpu unavailable: {e}");
            None
        }
    }
}

/// The fast kernels with f16 storage (None, said in one line, without an adapter).
fn f16_backend() -> Option<Wgpu> {
    backend(WgpuOptions {
        precision: Precision::F16,
        ..WgpuOptions::default()
    })
}

/// Every standard case of `op` within `tol` on each kernel set.
fn check_op(op: &str, tol: f64) {
    check_kernel_sets(&verify::standard_cases(), op, tol);
}

/// Every case of `cases` for `op` (at least one) within `tol` on each kernel
/// set, in f32.
fn check_kernel_sets(cases: &[verify::Case], op: &str, tol: f64) {
    on_each_kernel_set(WgpuOptions::default(), |set, be| {
        let n = verify::check_cases(be, cases, op, DType::F32, 100, tol)
            .unwrap_or_else(|e| panic!("{set} {e}"));
        assert!(n > 0, "no case for {op}");
    });
}

/// The kernel sets every op is checked on: the naive v1, and the fast
/// kernels as tuned for a CPU adapter and for a GPU (any adapter runs both).
const KERNEL_SETS: [(KernelVersion, Tuning); 3] = [
    (KernelVersion::Naive, Tuning::Auto),
    (KernelVersion::Fast, Tuning::Cpu),
    (KernelVersion::Fast, Tuning::Gpu),
];

/// `f` on a backend of each kernel set, otherwise set as `options` (none
/// without an adapter), with the set's name for messages.
fn on_each_kernel_set(options: WgpuOptions, mut f: impl FnMut(&str, &Wgpu)) {
    for (version, tuning) in KERNEL_SETS {
        let Some(be) = backend(WgpuOptions {
            version,
            tuning,
            ..options
        }) else {
            return;
        };
        f(&format!("{version:?}/{tuning:?}"), &be);
    }
}

// Tolerances: f32 kernels accumulate in f32 against a float64 reference; over
// K <= 4096 terms the measured error stays near 1e-6, so 1e-5 has margin.

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
    on_each_kernel_set(WgpuOptions::default(), |set, be| {
        for case in verify::long_attention_cases() {
            let r = verify::compare_case(be, &case, DType::F32, 3).unwrap();
            assert!(r.rel <= 1e-5, "{set} {}: rel {:.3e}", r.case, r.rel);
        }
    });
}

#[test]
fn alignment_loss_matches_reference() {
    check_op("alignment_loss", 1e-5);
}

#[test]
fn attention_absorbed_matches_reference() {
    // Two LayerNorms around dot products of up to 516 terms and sums of up
    // to 128: f32 rounding, as the other ops.
    check_op("attention_absorbed", 1e-5);
}

#[test]
fn gather_signal_tokens_matches_reference() {
    // One f32 rounding of a sum of two f32 values.
    check_op("gather_signal_tokens", 1e-7);
}

/// f16 storage, f32 arithmetic: every op within 1e-2 of the reference run on the
/// same f16-rounded inputs, on each kernel set (split-K's f32 partial sums
/// included).
#[test]
fn every_op_with_f16_storage() {
    let f16 = WgpuOptions {
        precision: Precision::F16,
        ..WgpuOptions::default()
    };
    on_each_kernel_set(f16, |set, be| {
        for (i, case) in verify::standard_cases().iter().enumerate() {
            let r = verify::compare_case(be, case, DType::F16, 500 + i as u64)
                .unwrap_or_else(|e| panic!("{set} {}: {e}", case.describe()));
            assert!(
                r.rel <= 1e-2,
                "{set} f16 {} {}: rel {:.3e}",
                r.op,
                r.case,
                r.rel
            );
        }
    });
}

/// Every op at 200 sizes drawn at random (`verify::random_cases`), on each
/// kernel version in f32, within the standard cases' tolerances.
#[test]
fn random_sizes_match_reference() {
    let cases = verify::random_cases(43, 200);
    for op in verify::OPS {
        check_kernel_sets(&cases, op, verify::f32_tolerance(op));
    }
}

/// The same sizes with f16 storage on each kernel set: within 1e-2, or
/// where one rounding can move a tiny output by more (a LayerNorm over 2
/// nearly equal columns: 1.2e-2), within `verify::SPREAD_FACTOR` times what
/// rounding the inputs alone does to the reference, and that wider bound
/// rare (`RoundedBounds::tight`).
#[test]
fn random_sizes_in_f16_match_reference() {
    let cases = verify::random_cases(43, 200);
    let mut held = verify::RoundedBounds::default();
    let f16 = WgpuOptions {
        precision: Precision::F16,
        ..WgpuOptions::default()
    };
    on_each_kernel_set(f16, |set, be| {
        let eps = DType::F16.epsilon();
        held += verify::check_ops_rounded(be, &cases, DType::F16, 430, 1e-2, eps)
            .unwrap_or_else(|e| panic!("{set} {e}"));
    });
    assert_tight("f16", &held);
}

/// What `held` says, and that its wide bounds were rare (nothing without an
/// adapter, which the backend said).
fn assert_tight(what: &str, held: &verify::RoundedBounds) {
    if held.cases > 0 {
        println!("{what}: {held}");
        assert!(held.tight(), "{what}: {held}");
    }
}

/// The loss reduction has a fixed order: the same inputs give the same bits.
#[test]
fn alignment_loss_is_deterministic() {
    use output_projector::ops::{Backend, LossKind};
    use output_projector::tensor::HostTensor;
    let Some(be) = backend(WgpuOptions::default()) else {
        return;
    };
    let pred = be
        .upload(&HostTensor::randn(vec![8, 77, 1024], 1, "pred").unwrap())
        .unwrap();
    let target = be
        .upload(&HostTensor::randn(vec![8, 77, 1024], 2, "target").unwrap())
        .unwrap();
    for kind in [LossKind::TokenL2, LossKind::Mse] {
        let mut runs = Vec::new();
        for _ in 0..3 {
            let mut loss = be.alloc(&[1]).unwrap();
            let mut grad = be.alloc(&[8, 77, 1024]).unwrap();
            be.alignment_loss(kind, &pred, &target, &mut loss, &mut grad)
                .unwrap();
            let l = be.download(&loss).unwrap().to_f32_vec()[0].to_bits();
            let g = be.download(&grad).unwrap().to_f32_vec();
            runs.push((l, g.iter().map(|x| x.to_bits()).collect::<Vec<_>>()));
        }
        assert!(
            runs.windows(2).all(|w| w[0] == w[1]),
            "{kind:?} differs between runs"
        );
    }
}

/// The whole projector: image preset at batch 1 and 3, audio preset (n_out = 1).
#[test]
fn projector_matches_reference() {
    use output_projector::config::{Modality, ProjectorConfig, Variant};
    let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let audio = ProjectorConfig::preset(Modality::Audio, Variant::Legacy);
    // Both tunings: the GPU's splits K in every decoder GEMM at these batches.
    for tuning in [Tuning::Cpu, Tuning::Gpu] {
        let Some(be) = backend(WgpuOptions {
            tuning,
            ..WgpuOptions::default()
        }) else {
            return;
        };
        for (config, batch) in [(&image, 1), (&image, 3), (&audio, 2)] {
            let r = verify::compare_projector(&be, config, batch, DType::F32, 11).unwrap();
            println!("{tuning:?} {}: rel {:.2e}", r.case, r.rel);
            assert!(r.rel <= 1e-4, "{tuning:?} {}: rel {:.3e}", r.case, r.rel);
        }
    }
    // f16 storage through all eight layers.
    let Some(half) = f16_backend() else {
        return;
    };
    let r = verify::compare_projector(&half, &image, 1, DType::F16, 12).unwrap();
    assert!(r.rel <= 1e-2, "f16 {}: rel {:.3e}", r.case, r.rel);
    println!("f16 projector: rel {:.2e}", r.rel);
}

/// Projectors of shapes drawn at random (`verify::random_projectors`: heads,
/// widths, tokens, layers and batch, every norm and attention bias drawn) on
/// every kernel set: 40 in f32 within the projector's 1e-4 of the reference;
/// the first 20 in f16 storage, and with f16 and bf16 GEMM weights (drawn in
/// that type), within 2e-2, or for a shape past that within
/// `verify::SPREAD_FACTOR` times what rounding its weights and inputs alone
/// does to the reference.
#[test]
fn random_projectors_match_reference() {
    let shapes = verify::random_projectors(44, 40);
    let half = WgpuOptions {
        precision: Precision::F16,
        ..WgpuOptions::default()
    };
    let (all, first) = (&shapes[..], &shapes[..20]);
    let (f16_weights, bf16_weights) = (weights_in(WeightType::F16), weights_in(WeightType::Bf16));
    let runs = [
        ("f32", WgpuOptions::default(), all, DType::F32, 1e-4),
        ("f16", half, first, DType::F16, 2e-2),
        ("f16 weights", f16_weights, first, DType::F16, 2e-2),
        ("bf16 weights", bf16_weights, first, DType::BF16, 2e-2),
    ];
    for (what, options, shapes, dtype, tol) in runs {
        let eps = dtype.epsilon();
        on_each_kernel_set(options, |set, be| {
            let (worst, bound) = verify::check_projectors(be, shapes, dtype, 440, tol, eps)
                .unwrap_or_else(|e| panic!("{what} {set} {e}"));
            println!(
                "{what} {set}: worst {} rel {:.2e} (bound {bound:.1e})",
                worst.case, worst.rel
            );
        });
    }
}

/// One projector forwarding from three threads at once, its first forwards
/// among them, each thread's plan reused for three inputs: the same bits as
/// plain forwards on one thread (`verify::check_threads`).
#[test]
fn one_projector_serves_many_threads() {
    let Some(be) = backend(WgpuOptions::default()) else {
        return;
    };
    // A race shows in some runs, not all: three projectors, each raced anew.
    for seed in 9..12 {
        verify::check_threads(&be, &[1, 2, 3], seed).unwrap();
    }
}

/// `Tuning::Auto` follows the adapter's kind; an explicit tuning is kept.
#[test]
fn tuning_follows_the_adapter() {
    for (tuning, want) in [(Tuning::Cpu, Tuning::Cpu), (Tuning::Gpu, Tuning::Gpu)] {
        let Some(be) = backend(WgpuOptions {
            tuning,
            ..WgpuOptions::default()
        }) else {
            return;
        };
        assert_eq!(be.tuning(), want);
    }
    let Some(be) = backend(WgpuOptions::default()) else {
        return;
    };
    let cpu = be.gpu().info.device_type == "Cpu";
    assert_eq!(be.tuning(), if cpu { Tuning::Cpu } else { Tuning::Gpu });
}

/// More workgroups than one grid dimension holds (65535 on lavapipe and most
/// adapters) spill into the second: a 4 x 2,200,000 output is 137,500
/// workgroups for v1, 68,750 and 275,000 for the two few-rows blocks, each
/// output checked exactly (small integers).
#[test]
fn linear_past_one_grid_dimension() {
    use output_projector::ops::{Activation, Backend};
    use output_projector::tensor::HostTensor;
    let (m, n, k) = (4, 2_200_000, 4);
    let xs: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 - 2.0).collect();
    let ws: Vec<f32> = (0..n * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    on_each_kernel_set(WgpuOptions::default(), |set, be| {
        let x = be
            .upload(&HostTensor::from_f32(vec![m, k], xs.clone()).unwrap())
            .unwrap();
        let w = be
            .upload_weight(&HostTensor::from_f32(vec![n, k], ws.clone()).unwrap())
            .unwrap();
        let mut out = verify::poisoned(be, &[m, n]).unwrap();
        be.linear(&x, &w, None, Activation::None, None, &mut out)
            .unwrap();
        let got = be.download(&out).unwrap().to_f32_vec();
        for (i, &v) in got.iter().enumerate() {
            let (r, c) = (i / n, i % n);
            let want: f32 = (0..k).map(|j| xs[r * k + j] * ws[c * k + j]).sum();
            assert!(v == want, "{set}: out[{r}, {c}] = {v}, not {want}");
        }
    });
}

/// Parameters the kernels take as f32 must survive the conversion: an eps
/// that rounds to 0 (a constant row would give NaN, the reference its bias)
/// or a scale past f32's range is an error, where the f64 reference runs.
#[test]
fn parameters_f32_cannot_hold_are_errors() {
    use output_projector::ops::{AttentionSpec, Backend, Cols};
    use output_projector::reference::Reference;
    use output_projector::tensor::HostTensor;
    let Some(be) = backend(WgpuOptions::default()) else {
        return;
    };
    fn layer_norm<B: Backend>(be: &B, eps: f64) -> output_projector::Result<()> {
        let up = |shape: Vec<usize>, seed| be.upload(&HostTensor::randn(shape, seed, "x")?);
        let (x, w, b) = (up(vec![2, 8], 1)?, up(vec![8], 2)?, up(vec![8], 3)?);
        be.layer_norm(&x, None, &w, &b, eps, &mut be.alloc(&[2, 8])?, None)
    }
    fn attention<B: Backend>(be: &B, scale: f64) -> output_projector::Result<()> {
        let qkv = be.upload(&HostTensor::randn(vec![1, 3, 24], 4, "qkv")?)?;
        let spec = AttentionSpec {
            scale: Some(scale),
            ..AttentionSpec::new(2, 4)
        };
        let (q, k, v) = (Cols::new(&qkv, 0), Cols::new(&qkv, 8), Cols::new(&qkv, 16));
        be.attention(q, k, v, &spec, None, &mut be.alloc(&[1, 3, 8])?)
    }
    for (what, result) in [
        ("eps 1e-50", layer_norm(&be, 1e-50)),
        ("scale 1e39", attention(&be, 1e39)),
    ] {
        let e = result.expect_err(what).to_string();
        assert!(e.contains("does not fit f32"), "{what}: {e}");
    }
    layer_norm(&Reference, 1e-50).unwrap();
    attention(&Reference, 1e39).unwrap();
    layer_norm(&be, 1e-5).unwrap();
    attention(&be, 0.5).unwrap();
}

/// An f32 value past f16's range is an error on upload to f16 storage, not
/// an infinity the forward would turn into NaN.
#[test]
fn f16_upload_refuses_values_past_its_range() {
    use output_projector::ops::Backend;
    use output_projector::tensor::HostTensor;
    let Some(half) = f16_backend() else {
        return;
    };
    let t = HostTensor::from_f32(vec![2, 2], vec![1.0, -2.0, 3.0, -1e5]).unwrap();
    let e = half.upload(&t).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("-100000 at flat index 3 overflows f16"), "{e}");
    let fits = HostTensor::from_f32(vec![2], vec![65504.0, -65504.0]).unwrap();
    let back = half.download(&half.upload(&fits).unwrap()).unwrap();
    assert_eq!(back.to_f64_vec(), vec![65504.0, -65504.0]);
}

/// The GEMM ops and their kernels that take a weight ([`verify::OPS`]' first
/// four but the lone LayerNorm).
const GEMM_OPS: [&str; 3] = ["linear", "layer_norm_linear", "linear_layer_norm"];

/// The 16-bit weight types, with their element type.
const WEIGHT_TYPES: [(WeightType, DType); 2] = [
    (WeightType::F16, DType::F16),
    (WeightType::Bf16, DType::BF16),
];

/// The default options but for the GEMMs' weights.
fn weights_in(weights: WeightType) -> WgpuOptions {
    WgpuOptions {
        weights,
        ..WgpuOptions::default()
    }
}

/// f16 and bf16 GEMM weights, packed two to a word, with f32 tensors. Inputs
/// drawn in the weight's type: the packing loses nothing and the products
/// and sums are f32, so every GEMM op meets f32's 1e-5, at the standard and
/// at random sizes (odd K included, where a row's weights straddle words).
/// Inputs drawn in f32: the weights are rounded once, to 2^-9 (bf16) or
/// 2^-12 (f16) relative, within the precision's 1e-2 or `SPREAD_FACTOR`
/// times what that rounding does to the reference, rarely the latter.
#[test]
fn gemms_with_16_bit_weights_match_reference() {
    let random = verify::random_cases(47, 400);
    for (weights, dtype) in WEIGHT_TYPES {
        let mut held = verify::RoundedBounds::default();
        on_each_kernel_set(weights_in(weights), |set, be| {
            for op in GEMM_OPS {
                for cases in [&verify::standard_cases(), &random] {
                    let n = verify::check_cases(be, cases, op, dtype, 470, 1e-5)
                        .unwrap_or_else(|e| panic!("{weights:?} {set} exact: {e}"));
                    assert!(n > 0, "no case for {op}");
                }
                held += verify::check_cases_rounded(
                    be,
                    &random,
                    op,
                    DType::F32,
                    471,
                    1e-2,
                    dtype.epsilon(),
                )
                .unwrap_or_else(|e| panic!("{weights:?} {set} rounded: {e}"));
            }
        });
        assert_tight(&format!("{weights:?} weights"), &held);
    }
}

/// Widening a packed weight is exact and the kernels' arithmetic does not
/// change with the weight's type: with weights that 16 bits hold, packed
/// weights give the f32 weights' results bit for bit, on every kernel (v1,
/// the few-rows ones of both tunings and the tiled ones, vec4 and scalar).
#[test]
fn packed_weights_give_the_f32_weights_bits() {
    let cases: Vec<_> = verify::standard_cases()
        .into_iter()
        .chain(verify::random_cases(48, 120))
        .filter(|c| GEMM_OPS.contains(&c.op()))
        .collect();
    for (weights, dtype) in WEIGHT_TYPES {
        for (version, tuning) in KERNEL_SETS {
            let options = WgpuOptions {
                version,
                tuning,
                ..WgpuOptions::default()
            };
            let Some(plain) = backend(options) else {
                return;
            };
            let packed = plain
                .with_options(WgpuOptions { weights, ..options })
                .unwrap();
            for (i, case) in cases.iter().enumerate() {
                let seed = 480 + i as u64;
                let want = verify::case_outputs(&plain, case, dtype, seed).unwrap();
                let got = verify::case_outputs(&packed, case, dtype, seed).unwrap();
                assert!(
                    got == want,
                    "{weights:?} {version:?}/{tuning:?} {}: not the f32 weights' bits",
                    case.describe()
                );
            }
        }
    }
}

/// bf16 GEMM weights with f16 tensors: the weight widened from its own
/// packing, the activations from `elem`, within the precision's 1e-2.
#[test]
fn bf16_weights_with_f16_tensors_match_reference() {
    let Some(be) = backend(WgpuOptions {
        precision: Precision::F16,
        weights: WeightType::Bf16,
        ..WgpuOptions::default()
    }) else {
        return;
    };
    for op in GEMM_OPS {
        let n = verify::check_cases(&be, &verify::standard_cases(), op, DType::BF16, 472, 1e-2)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(n > 0, "no case for {op}");
    }
}

/// The whole projector with 16-bit GEMM weights (the image preset, batch 2):
/// the weights drawn in that type, so only the absorbed cross-attention's
/// weights, made in float64, are rounded to it; within 2e-2 of the reference.
#[test]
fn projector_with_16_bit_weights_matches_reference() {
    use output_projector::config::{Modality, ProjectorConfig, Variant};
    let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    for (weights, dtype) in WEIGHT_TYPES {
        let Some(be) = backend(weights_in(weights)) else {
            return;
        };
        let r = verify::compare_projector(&be, &image, 2, dtype, 13).unwrap();
        println!("{weights:?} weights: projector rel {:.2e}", r.rel);
        assert!(r.rel <= 2e-2, "{weights:?} {}: rel {:.3e}", r.case, r.rel);
    }
}

/// A packed weight takes half an f32 weight's memory, comes back as its host
/// type, and is refused, with an error that says why, by every op but as
/// linear's weight.
#[test]
fn packed_weights_are_only_linear_weights() {
    use output_projector::ops::{Activation, Backend};
    use output_projector::tensor::HostTensor;
    for (weights, dtype) in WEIGHT_TYPES {
        let Some(be) = backend(weights_in(weights)) else {
            return;
        };
        assert_eq!(be.weight_dtype(), dtype);
        let host = HostTensor::randn(vec![5, 7], 9, "w").unwrap();
        let w = be.upload_weight(&host).unwrap();
        assert_eq!(w.dtype(), dtype);
        assert_eq!(be.upload(&host).unwrap().dtype(), DType::F32);
        // 35 elements in 18 words, rounded up to the 16-byte granule.
        assert_eq!(w.buffer().size(), 80);
        let back = be.download(&w).unwrap();
        assert_eq!(back.dtype(), dtype);
        assert_eq!(back, host.to_storage(dtype, "w").unwrap());

        let x = be
            .upload(&HostTensor::randn(vec![3, 7], 10, "x").unwrap())
            .unwrap();
        let mut out = be.alloc(&[3, 5]).unwrap();
        be.linear(&x, &w, None, Activation::None, None, &mut out)
            .unwrap();
        let want = format!("is a GEMM weight in {dtype}");
        let (g, b) = (
            be.upload(&HostTensor::randn(vec![7], 11, "g").unwrap())
                .unwrap(),
            be.alloc(&[7]).unwrap(),
        );
        let e = be.layer_norm(
            &w,
            None,
            &g,
            &b,
            1e-5,
            &mut be.alloc(&[5, 7]).unwrap(),
            None,
        );
        assert!(
            e.unwrap_err().to_string().contains(&want),
            "layer_norm input"
        );
        // As linear's input, or its output, a weight is refused too.
        let mut w_out = be
            .upload_weight(&HostTensor::randn(vec![3, 5], 12, "o").unwrap())
            .unwrap();
        let e = be.linear(&x, &w, None, Activation::None, None, &mut w_out);
        assert!(e.unwrap_err().to_string().contains(&want), "linear output");
        let w7 = be
            .upload_weight(&HostTensor::randn(vec![3, 7], 13, "x").unwrap())
            .unwrap();
        let e = be.linear(&w7, &w, None, Activation::None, None, &mut out);
        assert!(e.unwrap_err().to_string().contains(&want), "linear input");
    }
}

/// Every finite f16 and bf16 value (subnormals, both zeros, the largest)
/// comes out of a packed weight exactly: `linear` of x = e0 rows reads each
/// weight row's first element back, through each kernel (v1, the few-rows
/// ones of both tunings and the tiled ones, scalar (K = 1) and vec4 (K = 4)).
#[test]
fn packed_weights_widen_every_finite_value_exactly() {
    use half::{bf16, f16};
    use output_projector::ops::{Activation, Backend};
    use output_projector::tensor::{HostData, HostTensor};
    let finite = |bits: u16, to: fn(u16) -> f32| Some(to(bits)).filter(|v| v.is_finite());
    let f16s: Vec<u16> = (0..=u16::MAX)
        .filter(|&b| finite(b, |b| f16::from_bits(b).to_f32()).is_some())
        .collect();
    let bf16s: Vec<u16> = (0..=u16::MAX)
        .filter(|&b| finite(b, |b| bf16::from_bits(b).to_f32()).is_some())
        .collect();
    assert_eq!((f16s.len(), bf16s.len()), (63488, 65280));
    for (weights, bits) in [(WeightType::F16, &f16s), (WeightType::Bf16, &bf16s)] {
        let values: Vec<f32> = match weights {
            WeightType::F16 => bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect(),
            _ => bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect(),
        };
        let n = bits.len();
        for (version, tuning) in KERNEL_SETS {
            let Some(be) = backend(WgpuOptions {
                version,
                tuning,
                ..weights_in(weights)
            }) else {
                return;
            };
            for (m, k) in [(1, 1), (1, 4), (17, 1), (17, 4)] {
                // Row i of w: the value, then zeros.
                let mut w = vec![0u16; n * k];
                for (row, &b) in w.chunks_exact_mut(k).zip(bits.iter()) {
                    row[0] = b;
                }
                let data = match weights {
                    WeightType::F16 => HostData::F16(w.into_iter().map(f16::from_bits).collect()),
                    _ => HostData::BF16(w.into_iter().map(bf16::from_bits).collect()),
                };
                let w = be
                    .upload_weight(&HostTensor::new(vec![n, k], data).unwrap())
                    .unwrap();
                let mut e0 = vec![0.0f32; m * k];
                e0.iter_mut().step_by(k).for_each(|v| *v = 1.0);
                let x = be
                    .upload(&HostTensor::from_f32(vec![m, k], e0).unwrap())
                    .unwrap();
                let mut out = verify::poisoned(&be, &[m, n]).unwrap();
                be.linear(&x, &w, None, Activation::None, None, &mut out)
                    .unwrap();
                let got = be.download(&out).unwrap().to_f32_vec();
                for (r, row) in got.chunks_exact(n).enumerate() {
                    // == holds +0 and -0 equal: 1 x -0 + 0 is +0.
                    if let Some(i) = (0..n).find(|&i| row[i] != values[i]) {
                        panic!(
                            "{weights:?} {version:?}/{tuning:?} {m}x{k}: row {r} weight {:#06x} read as {:e}, not {:e}",
                            bits[i], row[i], values[i]
                        );
                    }
                }
            }
        }
    }
}

/// PyTorch's float64 golden cases with 16-bit GEMM weights. The projectors
/// read packed weights (the op cases upload theirs as tensors): an f16
/// checkpoint, as NExT-GPT's (`legacy_heads8_f16`), with f16 weights runs
/// with its weights exact, so only the absorbed cross-attention's weights,
/// rounded to f16, keep it from f32's accuracy (measured 1.6e-4); the others
/// have every weight rounded once (measured 5-6e-4 in f16, 3-5e-3 in bf16).
#[test]
fn golden_cases_with_16_bit_weights() {
    use output_projector::golden;
    for (weights, _) in WEIGHT_TYPES {
        let Some(be) = backend(weights_in(weights)) else {
            return;
        };
        let results = golden::run_all(&be).expect("golden cases run");
        for r in &results {
            let bound = match (weights, r.op, r.case.as_str()) {
                (WeightType::F16, "projector", "legacy_heads8_f16") => 1e-3,
                (_, "projector", _) => 2e-2,
                _ => 1e-2,
            };
            println!("{weights:?} {} {}: rel {:.2e}", r.op, r.case, r.rel);
            assert!(
                r.rel <= bound,
                "{weights:?} {} {}: rel {:.3e}",
                r.op,
                r.case,
                r.rel
            );
        }
    }
}

/// This test binary again in a child process with `env` set, on two threads,
/// running the tests that `args` name (and libtest's options there): its
/// output, once it is seen to have succeeded (`what` names the run).
fn child_tests(what: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args(args)
        .arg("--test-threads=2")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The adapter, where a test that reruns tests in child processes (which set
/// `child_env`) is not itself in one and the adapter is Mesa's llvmpipe;
/// otherwise None, said in one line where it is not llvmpipe.
fn lavapipe_parent(child_env: &str) -> Option<output_projector::wgpu::WgpuInfo> {
    if std::env::var_os(child_env).is_some() {
        return None;
    }
    backend(WgpuOptions::default())?;
    let info = output_projector::wgpu::probe().expect("the adapter backend() opened");
    if !info.adapter.starts_with("llvmpipe") {
        println!(
            "skipped: the adapter ({}) is not Mesa's llvmpipe",
            info.adapter
        );
        return None;
    }
    Some(info)
}

/// Set in the child processes of `attention_on_gpu_subgroup_sizes`: the
/// subgroup size lavapipe was asked for.
const SUBGROUP_CHILD_ENV: &str = "OUTPROJ_TEST_SUBGROUP_SIZE";

/// Attention is the one op with subgroup kernels, written for any subgroup of
/// at least 8 lanes; lavapipe's own are 8 wide, a GPU's 32 (NVIDIA, Apple) or
/// 64 (AMD). Lavapipe's subgroups are as wide as the vectors it compiles to
/// (`LP_NATIVE_VECTOR_WIDTH`), so where the adapter is lavapipe the attention
/// tests and every op in f16 run again in a child process at 32 and at 64
/// lanes (and `attention_subgroup_size_is_as_asked` checks each child got
/// them).
#[test]
fn attention_on_gpu_subgroup_sizes() {
    let Some(info) = lavapipe_parent(SUBGROUP_CHILD_ENV) else {
        return;
    };
    if !info.subgroup {
        println!("skipped: the adapter ({}) has no subgroups", info.adapter);
        return;
    }
    for (bits, lanes) in [("1024", "32"), ("2048", "64")] {
        let what = format!("{lanes}-lane subgroups");
        let env = [
            ("LP_NATIVE_VECTOR_WIDTH", bits),
            (SUBGROUP_CHILD_ENV, lanes),
        ];
        let stdout = child_tests(&what, &["attention", "every_op_with_f16_storage"], &env);
        let passed = stdout.lines().filter(|l| l.ends_with("... ok")).count();
        // The attention tests, the f16 one, the size check and this one.
        assert!(passed >= 6, "{lanes}-lane subgroups:\n{stdout}");
        assert!(!stdout.contains("FAILED"), "{stdout}");
    }
}

/// In a child of `attention_on_gpu_subgroup_sizes`, the adapter's subgroups
/// are as wide as asked (attention takes its subgroup kernels wherever they
/// have 8 lanes or more).
#[test]
fn attention_subgroup_size_is_as_asked() {
    let Some(lanes) = std::env::var(SUBGROUP_CHILD_ENV).ok() else {
        return;
    };
    let lanes: u32 = lanes.parse().expect("a subgroup size");
    let info = output_projector::wgpu::probe().expect("lavapipe");
    assert!(info.subgroup, "{info}");
    assert_eq!(
        (info.subgroup_min_size, info.subgroup_max_size),
        (lanes, lanes),
        "{info}"
    );
}

/// Set in the child process of `ops_through_opengl`.
const GL_CHILD_ENV: &str = "OUTPROJ_TEST_GL";

/// The ops again through wgpu's OpenGL backend (naga writes GLSL; Mesa's
/// llvmpipe runs it where the adapter is lavapipe): no subgroups there, so
/// attention takes its workgroup-memory kernel at every shape, and no
/// SHADER_F16, so the f16 tests skip, saying so. In a child process, as the
/// backend is chosen when the first adapter is opened.
#[test]
fn ops_through_opengl() {
    if lavapipe_parent(GL_CHILD_ENV).is_none() {
        return;
    }
    let env = [("WGPU_BACKEND", "gl"), (GL_CHILD_ENV, "1")];
    let probe = ["the_child_runs_on_opengl", "--exact", "--nocapture"];
    if child_tests("OpenGL", &probe, &env).contains("no OpenGL adapter") {
        println!("skipped: no OpenGL adapter (Mesa's libegl-mesa0 and libgl1-mesa-dri)");
        return;
    }
    let filters = [
        "linear_matches_reference",
        "layer_norm_matches_reference",
        "attention_matches_reference",
        "long_attention_matches_reference",
        "alignment_loss_matches_reference",
        "gather_signal_tokens_matches_reference",
        "every_op_with_f16_storage",
        "the_child_runs_on_opengl",
    ];
    let stdout = child_tests("OpenGL", &[&filters[..], &["--exact"]].concat(), &env);
    // Every one ran (the f16 one skips its f16 backends, without SHADER_F16).
    let passed = stdout.lines().filter(|l| l.ends_with("... ok")).count();
    assert_eq!(passed, filters.len(), "through OpenGL:\n{stdout}");
}

/// In a child of `ops_through_opengl`, the adapter is OpenGL's, or there
/// is none (said, for the parent to skip).
#[test]
fn the_child_runs_on_opengl() {
    if std::env::var_os(GL_CHILD_ENV).is_none() {
        return;
    }
    match output_projector::wgpu::probe() {
        Ok(info) => assert_eq!(info.backend, "Gl", "{info}"),
        Err(e) => println!("no OpenGL adapter: {e}"),
    }
}
