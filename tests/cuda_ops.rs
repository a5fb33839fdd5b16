//! The CUDA backend against the CPU reference: every op over the standard cases
//! for both kernel versions, and the whole projector. Needs a CUDA device; where
//! there is none these tests pass after printing one line (NVRTC alone is
//! checked by tests/toolchain.rs).
#![cfg(feature = "cuda")]

use output_projector::bench::{OpCase, Rotation, MAX_ROTATED_SETS};
use output_projector::config::{Modality, ProjectorConfig, Variant};
use output_projector::cuda::{Cuda, CudaOptions, KernelVersion};
use output_projector::device::Precision;
use output_projector::ops::{
    Activation, AttentionInput, AttentionSpec, Backend, Cols, NormAfter, NormInput, Shaped,
};
use output_projector::projector::Projector;
use output_projector::tensor::{DType, HostTensor};
use output_projector::verify::{self, Case};
use output_projector::weights::ProjectorWeights;
use output_projector::Error;

/// Set in the child process of `backend_runs_on_emulated_driver`, where a
/// missing device is a failure, not a skip.
const EMULATED_DRIVER_ENV: &str = "OUTPROJ_TEST_EMULATED_DRIVER";

/// The device the emulated driver reports (`kernels/emulator/fake_libcuda.cpp`):
/// unset, an sm_90 (H100) that launches clusters; `sm_80`, an A100; `sm_90:114`,
/// an sm_90 of 114 SMs (an H100 PCIe).
const EMULATED_DEVICE_ENV: &str = "OUTPROJ_EMULATED_DEVICE";

/// The backend with `version`, or None (after saying so once per test)
/// where no CUDA device exists.
fn backend(version: KernelVersion) -> Option<Cuda> {
    backend_storing(version, DType::F32)
}

/// [`backend`] with `storage` (f32, f16 or bf16) in device memory.
fn backend_storing(version: KernelVersion, storage: DType) -> Option<Cuda> {
    backend_with(CudaOptions {
        version,
        storage,
        ..CudaOptions::default()
    })
}

/// The backend with `options`, or None (after saying so once per test)
/// where no CUDA device exists.
fn backend_with(options: CudaOptions) -> Option<Cuda> {
    match Cuda::new(0, options) {
        Ok(be) => Some(be),
        // 16-bit storage and TF32 on a device below sm_80 (a T4): refused
        // there, as it should be (unit-tested), so these tests skip it.
        Err(Error::Invalid(e)) if below_sm80(&e) => {
            skip_note(&e);
            None
        }
        Err(e) if emulated() => {
            panic!("the emulated driver should provide a device: {e}")
        }
        Err(Error::Unavailable { backend, reason }) if backend == "cuda" => {
            skip_note(&format!("no CUDA device: {reason}"));
            None
        }
        Err(e) => panic!("CUDA backend: {e}"),
    }
}

/// Whether `message` is the backend's refusal of an option the device is too
/// old for (16-bit storage, TF32).
fn below_sm80(message: &str) -> bool {
    message.contains("needs sm_80 or newer; this device is sm_")
        || message.contains("needs sm_80 or newer (TF32 tensor cores)")
}

/// Prints `skipped: {why}`, once per test however many of its backends are
/// missing: libtest runs each test on a thread of its own (named after it),
/// so once per thread is once per test.
fn skip_note(why: &str) {
    thread_local! {
        static NOTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !NOTED.with(|noted| noted.replace(true)) {
        println!("skipped: {why}");
    }
}

/// Two backends storing `storage` on one device: default options, and those
/// with `change` applied.
fn backend_pair(storage: DType, change: fn(&mut CudaOptions)) -> Option<(Cuda, Cuda)> {
    let be = backend_with(CudaOptions {
        storage,
        ..CudaOptions::default()
    })?;
    let mut options = be.options().clone();
    change(&mut options);
    let other = be
        .with_options(options)
        .expect("a second backend on the same device");
    Some((be, other))
}

/// Every case of `cases` for `op` within `tol`, on each kernel version.
fn check_cases(cases: &[Case], op: &str, tol: f64) {
    for version in [KernelVersion::Naive, KernelVersion::Fast] {
        let Some(be) = backend(version) else { return };
        check_cases_on(&be, cases, op, tol);
    }
}

/// Every standard case of `op` within `tol` on `be`.
fn check_cases_on(be: &Cuda, cases: &[Case], op: &str, tol: f64) {
    verify::check_cases(be, cases, op, DType::F32, 100, tol)
        .unwrap_or_else(|e| panic!("{:?} {e}", be.options()));
}

// Tolerances: f32 kernels accumulate in f32 against a float64 reference; over
// K <= 4096 terms the error stays near 1e-6, so 1e-5 has margin.

#[test]
fn linear_matches_reference() {
    check_cases(&verify::standard_cases(), "linear", 1e-5);
    // Split GEMMs add their slices in a cluster where the device has them,
    // so the workspace's path is checked too.
    let Some(memory) = backend_with(CudaOptions {
        split_k_through_memory: true,
        ..CudaOptions::default()
    }) else {
        return;
    };
    check_cases_on(&memory, &verify::standard_cases(), "linear", 1e-5);
}

#[test]
fn layer_norm_matches_reference() {
    check_cases(&verify::standard_cases(), "layer_norm", 1e-5);
}

/// Every op at 300 sizes drawn at random (`verify::random_cases`: mostly 1-9,
/// some to 40, a few past 100), in f32 on each kernel version, within the
/// standard cases' tolerances: the planner's every choice by size (few-row
/// GEMMs, tiles, split-K, clusters, the attention kernels) meets odd shapes.
#[test]
fn random_sizes_match_reference() {
    let cases = verify::random_cases(47, 300);
    for op in verify::OPS {
        check_cases(&cases, op, verify::f32_tolerance(op));
    }
}

/// The same sizes in f16 and bf16 storage on each kernel version, and with
/// TF32 products: within the 16-bit standard cases' tolerance (TF32: 1e-2),
/// or where one rounding can move a tiny output by more (a LayerNorm over 2
/// nearly equal columns), within `verify::SPREAD_FACTOR` times what rounding
/// the inputs alone does to the reference, and that wider bound rare
/// (`RoundedBounds::tight`). The tensor-core kernels meet odd shapes here.
#[test]
fn random_sizes_in_16_bits_match_reference() {
    let cases = verify::random_cases(47, 300);
    let on = |version, storage| {
        backend_with(CudaOptions {
            version,
            storage,
            ..CudaOptions::default()
        })
    };
    let (naive, fast) = (KernelVersion::Naive, KernelVersion::Fast);
    let runs = [
        (
            Precision::F16,
            [on(naive, DType::F16), on(fast, DType::F16)],
        ),
        (
            Precision::Bf16,
            [on(naive, DType::BF16), on(fast, DType::BF16)],
        ),
        (Precision::Tf32, [tf32_backend(), None]),
    ];
    for (precision, backends) in runs {
        let (storage, eps) = (precision.storage(), precision.epsilon());
        let tol = match precision {
            Precision::Tf32 => precision.tolerances().0,
            _ => half_op_tol(storage),
        };
        let mut held = verify::RoundedBounds::default();
        for be in backends.iter().flatten() {
            held += verify::check_ops_rounded(be, &cases, storage, 470, tol, eps)
                .unwrap_or_else(|e| panic!("{:?} {e}", be.options()));
        }
        let what = precision.name();
        println!("{what}: {held}");
        assert!(held.tight(), "{what}: {held}");
    }
}

#[test]
fn attention_matches_reference() {
    check_cases(&verify::standard_cases(), "attention", 1e-5);
    // Most of those grids are small enough for v5 (split keys): the
    // query-block kernels (v2, v3) on them too.
    let Some(query_blocks) = backend_with(CudaOptions {
        query_block_attention: true,
        ..CudaOptions::default()
    }) else {
        return;
    };
    check_cases_on(&query_blocks, &verify::standard_cases(), "attention", 1e-5);
}

#[test]
fn long_attention_matches_reference() {
    check_cases(&verify::long_attention_cases(), "attention", 1e-5);
}

/// Attention grids large enough for the v2 kernel's 16-query blocks
/// (`attention_flash_d32_q16` / `_d64_q16` / `_d128_q16`): `plan` takes them
/// once 8-query blocks would be 6 or more per SM (its unit tests pin the
/// rule), so each case's batch grows with the device's SM count until they
/// are. Every tile width, Lq and Lk not multiples of 32, masks, causal (query
/// 0 of sequence 0 then sees no key), cross-attention and scalar loads (head
/// dims 6 and 5), in f32 and in bf16 storage (head dims v3 does not take).
#[test]
fn wide_attention_matches_reference() {
    // (lq, lk, heads, head_dim, causal, mask, packed)
    let shapes: [(usize, usize, usize, usize, bool, bool, bool); 6] = [
        (77, 77, 4, 128, false, false, true), // the projector's self-attention
        (100, 45, 6, 72, true, true, false),
        (45, 45, 8, 40, false, true, true),
        (33, 70, 6, 64, false, false, false),
        (19, 23, 10, 6, true, true, false),
        (9, 9, 12, 5, false, false, true),
    ];
    for (storage, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        let Some(be) = backend_storing(KernelVersion::Fast, storage) else {
            return;
        };
        let sms = be.sm_count() as usize;
        let mut worst = 0.0f64;
        for (i, &(lq, lk, heads, hd, causal, mask, packed)) in shapes.iter().enumerate() {
            if storage != DType::F32 && (hd == 64 || hd == 128) {
                continue; // v3 (tensor cores)
            }
            let batch = (6 * sms).div_ceil(lq.div_ceil(8) * heads);
            let case = Case::attention(batch, lq, lk, heads, hd, causal, mask, packed);
            let r = verify::compare_case(&be, &case, storage, 500 + i as u64)
                .unwrap_or_else(|e| panic!("{} {}: {e}", storage.name(), case.describe()));
            assert!(
                r.rel <= tol,
                "{} {}: rel {:.3e} max_abs {:.3e}",
                storage.name(),
                r.case,
                r.rel,
                r.max_abs
            );
            worst = worst.max(r.rel);
        }
        println!(
            "{} 16-query attention worst rel {worst:.3e}",
            storage.name()
        );
    }
}

/// v1 and v2 (a warp per row, vec4 and scalar loads) on the standard cases.
#[test]
fn attention_absorbed_matches_reference() {
    check_cases(&verify::standard_cases(), "attention_absorbed", 1e-5);
}

#[test]
fn alignment_loss_matches_reference() {
    check_cases(&verify::standard_cases(), "alignment_loss", 1e-5);
}

#[test]
fn gather_signal_tokens_matches_reference() {
    // One f32 rounding of a sum of two f32 values.
    check_cases(&verify::standard_cases(), "gather_signal_tokens", 1e-7);
}

/// The device sizes the planners and `outproj bench` work from.
#[test]
fn device_sizes_are_read() {
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    assert!(be.sm_count() > 0);
    // bench's op rows rotate argument sets over twice the L2: every GPU the
    // backend runs on has one of a few MiB at least.
    assert!(be.l2_bytes() >= 1 << 20, "{} bytes of L2", be.l2_bytes());
    if emulated() {
        // `sm_80`, or `sm_90:114`: a model and its SMs if not the model's own.
        let device = std::env::var(EMULATED_DEVICE_ENV).unwrap_or_default();
        let (model, sms) = device
            .split_once(':')
            .map_or((device.as_str(), None), |(m, n)| (m, n.parse().ok()));
        let expected = match model {
            "sm_80" => Some(("sm_80", 108, 40 << 20)), // an A100's
            "" | "sm_90" => Some(("sm_90a", 132, 50 << 20)), // an H100's
            _ => None,
        };
        if let Some((arch, model_sms, l2)) = expected {
            let sms = sms.unwrap_or(model_sms);
            assert_eq!((be.arch(), be.sm_count(), be.l2_bytes()), (arch, sms, l2));
        }
    }
    // A small GEMM's 2.1 KB sets: the most a rotation takes, each run in turn.
    let case = OpCase::Linear {
        m: 4,
        n: 8,
        k: 16,
        act: Activation::Relu,
    };
    let mut sets = Rotation::new(&case, &be, 1, be.l2_bytes(), 4).expect("argument sets");
    assert_eq!(sets.count(), MAX_ROTATED_SETS);
    for _ in 0..=sets.count() {
        sets.run(&be).expect("a run");
    }
    be.synchronize().expect("the runs");
}

/// On the emulated driver every thread of a kernel is a CPU fiber and a
/// full-size forward takes half a minute or more, so there the whole-projector
/// tests run fewer cases (each kernel's versions, and each op at the shapes
/// those cases would add, are tested on their own above).
fn emulated() -> bool {
    std::env::var_os(EMULATED_DRIVER_ENV).is_some()
}

#[test]
fn projector_matches_reference() {
    for version in [KernelVersion::Naive, KernelVersion::Fast] {
        let Some(be) = backend(version) else { return };
        let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
        let audio = ProjectorConfig::preset(Modality::Audio, Variant::Legacy);
        for (config, batch) in [(&image, 1), (&image, 3), (&audio, 2)] {
            // Emulated: v1 at audio batch 2 and the fast kernels at batch 1
            // and 2.
            if emulated() && (batch == 3 || (version == KernelVersion::Naive && batch == 1)) {
                continue;
            }
            let r = verify::compare_projector(&be, config, batch, DType::F32, 7)
                .unwrap_or_else(|e| panic!("{version:?} {}: {e}", config.variant.name()));
            println!(
                "{version:?} {}: rel {:.3e} max_abs {:.3e}",
                r.case, r.rel, r.max_abs
            );
            assert!(r.rel <= 1e-4, "{version:?} {}: rel {:.3e}", r.case, r.rel);
        }
    }
}

/// Projectors of shapes drawn at random (`verify::random_projectors`: heads,
/// widths, tokens, layers and batch, every norm and attention bias drawn):
/// in f32 on each kernel version within 1e-4, and on the fast kernels in f16
/// and bf16 storage and TF32 within the 2e-2 that such projectors are held
/// to, or for a shape past that (a tiny Transformer moves more under 16-bit
/// rounding than the presets) within `verify::SPREAD_FACTOR` times what
/// rounding its weights and inputs alone does to the reference. Emulated:
/// the fast kernels, the first ten shapes.
#[test]
fn random_projectors_match_reference() {
    let count = if emulated() { 10 } else { 40 };
    let shapes = verify::random_projectors(45, count);
    let fast = |storage| backend_storing(KernelVersion::Fast, storage);
    let mut runs = vec![("f32", fast(DType::F32), Precision::F32)];
    if !emulated() {
        let naive = backend(KernelVersion::Naive);
        runs.push(("f32 v1", naive, Precision::F32));
    }
    runs.extend([
        ("f16", fast(DType::F16), Precision::F16),
        ("bf16", fast(DType::BF16), Precision::Bf16),
        ("tf32", tf32_backend(), Precision::Tf32),
    ]);
    for (what, be, precision) in runs {
        let Some(be) = be else {
            continue;
        };
        let (storage, tol) = (precision.storage(), precision.tolerances().1);
        let eps = precision.epsilon();
        let (worst, bound) = verify::check_projectors(&be, &shapes, storage, 450, tol, eps)
            .unwrap_or_else(|e| panic!("{what} {e}"));
        println!(
            "{what}: worst {} rel {:.2e} (bound {bound:.1e})",
            worst.case, worst.rel
        );
    }
}

/// The cases the f16/bf16 tests run: one activation per linear shape (the
/// shapes cover K % 8 != 0, M, N < 16, split-K, several tiles), every layer
/// norm, loss and gather case, and the attention cases but the two largest
/// (their sizes are covered in f32), so the emulated runs stay short; plus
/// attention cases for the tensor-core kernel (head dims 64 and 128): Lq and
/// Lk of 1, 3, 77 and 129 (a last query block or key tile holding one row),
/// masks with causal (query 0 of sequence 0 sees no key), cross-attention.
fn half_cases() -> Vec<Case> {
    let mut linear_shape = 0;
    let mut cases: Vec<Case> = verify::standard_cases()
        .into_iter()
        .filter(|c| match c {
            Case::Linear { .. } => {
                linear_shape += 1;
                (linear_shape - 1) % 4 == ((linear_shape - 1) / 4) % 4
            }
            Case::Attention { lq, lk, .. } => lq * lk < 20_000,
            _ => true,
        })
        .collect();
    let attn = Case::attention;
    cases.extend([
        attn(2, 77, 77, 4, 128, true, true, true),
        attn(1, 129, 3, 2, 128, false, true, false),
        attn(2, 1, 77, 2, 64, false, true, false),
        attn(1, 3, 3, 2, 64, true, true, true),
        attn(1, 129, 129, 1, 128, true, false, true),
    ]);
    cases
}

// Tolerances for 16-bit storage: inputs and every output are rounded to
// f16/bf16 (relative steps 2^-11 and 2^-8), sums stay f32. The reference gets
// the same rounded inputs, so what remains is the rounding of the outputs
// (and of intermediate tensors in the projector), which the order of the f32
// sums (the emulator's or a GPU's) hardly moves. The limits are about 3x the
// worst measured on the emulated driver (the tests print what they measure):
// - per op, f16: 1.44e-3 (alignment_loss; every other op 3.3e-4 at most), so
//   4e-3; bf16: 3.69e-3 (alignment_loss; others 2.4e-3 at most), so 1e-2;
// - projector, f16 (audio, batch 1): 8.05e-4, so 2.5e-3; bf16 (image, batch
//   1): 6.51e-3, so 2e-2.

/// The limit of [`half_storage_ops_match_reference`] in `storage`.
fn half_op_tol(storage: DType) -> f64 {
    match storage {
        DType::F16 => 4e-3,
        DType::BF16 => 1e-2,
        other => panic!("not a 16-bit type: {}", other.name()),
    }
}

/// The limit of [`half_storage_projector_matches_reference`] in `storage`.
fn half_projector_tol(storage: DType) -> f64 {
    match storage {
        DType::F16 => 2.5e-3,
        DType::BF16 => 2e-2,
        other => panic!("not a 16-bit type: {}", other.name()),
    }
}

/// Every op with f16 and bf16 storage against the reference: the fast kernels
/// (linear on tensor cores) in both, the v1 CUDA-core kernels in f16 (their
/// bf16 build differs only in the conversions, which the fast kernels share).
#[test]
fn half_storage_ops_match_reference() {
    let cases = half_cases();
    // Last, the attention cases again on the query-block kernels (v2, v3)
    // where their grids are small enough for v5.
    for (storage, version, query_blocks) in [
        (DType::F16, KernelVersion::Naive, false),
        (DType::F16, KernelVersion::Fast, false),
        (DType::BF16, KernelVersion::Fast, false),
        (DType::BF16, KernelVersion::Fast, true),
    ] {
        {
            let Some(be) = backend_with(CudaOptions {
                version,
                storage,
                query_block_attention: query_blocks,
                ..CudaOptions::default()
            }) else {
                return;
            };
            let version = if query_blocks {
                format!("{version:?} query blocks")
            } else {
                format!("{version:?}")
            };
            let mut worst: Vec<(&str, f64, f64)> = Vec::new();
            let ops = cases
                .iter()
                .filter(|c| !query_blocks || c.op() == "attention");
            for (i, case) in ops.enumerate() {
                let r =
                    verify::compare_case(&be, case, storage, 300 + i as u64).unwrap_or_else(|e| {
                        panic!("{} {version} {}: {e}", storage.name(), case.describe())
                    });
                assert!(
                    r.rel <= half_op_tol(storage),
                    "{} {version} {} {}: rel {:.3e} max_abs {:.3e}",
                    storage.name(),
                    r.op,
                    r.case,
                    r.rel,
                    r.max_abs
                );
                match worst.iter_mut().find(|w| w.0 == case.op()) {
                    Some(w) => {
                        w.1 = w.1.max(r.rel);
                        w.2 = w.2.max(r.max_abs);
                    }
                    None => worst.push((case.op(), r.rel, r.max_abs)),
                }
            }
            for (op, rel, max_abs) in worst {
                println!(
                    "{} {version} {op:<22} worst rel {rel:.3e} max_abs {max_abs:.3e}",
                    storage.name()
                );
            }
        }
    }
}

/// The whole projector (fast kernels, linear on tensor cores) with 16-bit
/// storage: image at batch 1 in bf16 (the coarser type), audio in f16; the
/// emulated runs are what keeps it to two.
#[test]
fn half_storage_projector_matches_reference() {
    let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let audio = ProjectorConfig::preset(Modality::Audio, Variant::Legacy);
    for (storage, config, batch) in [(DType::BF16, &image, 1), (DType::F16, &audio, 1)] {
        let Some(be) = backend_storing(KernelVersion::Fast, storage) else {
            return;
        };
        {
            let r = verify::compare_projector(&be, config, batch, storage, 7)
                .unwrap_or_else(|e| panic!("{} {}: {e}", storage.name(), config.variant.name()));
            println!(
                "{} {}: rel {:.3e} max_abs {:.3e}",
                storage.name(),
                r.case,
                r.rel,
                r.max_abs
            );
            assert!(
                r.rel <= half_projector_tol(storage),
                "{} {}: rel {:.3e}",
                storage.name(),
                r.case,
                r.rel
            );
        }
    }
}

/// The fast f32 backend with `linear` on TF32 tensor cores, or None where no
/// CUDA device exists. A device below sm_80 ([`backend_with`]), or NVRTC
/// without `mma.h`, is reported as a skip too (not on the emulated driver,
/// which always has the headers).
fn tf32_backend() -> Option<Cuda> {
    let options = CudaOptions {
        tf32: true,
        ..CudaOptions::default()
    };
    match Cuda::new(0, options.clone()) {
        Err(Error::Unavailable { reason, .. }) if reason.contains("mma.h") && !emulated() => {
            skip_note(&reason);
            None
        }
        _ => backend_with(options),
    }
}

// Tolerances for TF32: x and w are rounded to 10 mantissa bits (relative step
// 2^-10, so up to 2^-11 per operand; cvt.rna, on a GPU as in the emulator)
// before the f32 products and sums. On the standard cases that leaves 1.6e-4
// .. 2.9e-4 relative (measured in the CPU emulator, which sums like f32 FMAs);
// the limit is 2.4x the worst. The projector keeps f32 tensors between ops:
// measured 4.21e-4 (image, batch 1; audio at batch 2, whose GEMMs are all of
// 16 rows or fewer and so on CUDA cores, 2.2e-7), so TF32_PROJECTOR_TOL is
// 3.1x that. A GPU's order of the f32 sums moves these by ~1e-7, far below
// the operands' rounding.
const TF32_LINEAR_TOL: f64 = 7e-4;
const TF32_PROJECTOR_TOL: f64 = 1.3e-3;

/// Every standard linear case with `tf32` on against the reference: within
/// TF32_LINEAR_TOL; and on one case per shape beside plain f32 on the same
/// inputs: clearly worse (over 10x f32's error) wherever the shape takes a
/// TF32 kernel (so the TF32 path really ran), and bitwise f32's result where
/// it takes the same CUDA-core kernel as f32 (few rows).
#[test]
fn tf32_linear_matches_reference() {
    let Some(tf32) = tf32_backend() else { return };
    let f32_be = backend(KernelVersion::Fast).expect("f32 backend beside the tf32 one");
    let mut worst = (0.0f64, 0.0f64, String::new());
    let mut tf32_shapes = 0;
    let cases: Vec<Case> = verify::standard_cases()
        .into_iter()
        .filter(|c| c.op() == "linear")
        .collect();
    for (i, case) in cases.iter().enumerate() {
        let seed = 500 + i as u64;
        let t = verify::compare_case(&tf32, case, DType::F32, seed)
            .unwrap_or_else(|e| panic!("tf32 {}: {e}", case.describe()));
        println!(
            "tf32 {:<40} rel {:.3e} max_abs {:.3e}",
            t.case, t.rel, t.max_abs
        );
        assert!(
            t.rel <= TF32_LINEAR_TOL,
            "tf32 {}: rel {:.3e} max_abs {:.3e}",
            t.case,
            t.rel,
            t.max_abs
        );
        // Plain f32 on every 4th case (one per shape): emulation time.
        if i % 4 == 0 {
            let &Case::Linear { m, n, k, .. } = case else {
                unreachable!("a linear case")
            };
            let kernel = tf32.linear_kernel(m, n, k).unwrap();
            let f = verify::compare_case(&f32_be, case, DType::F32, seed)
                .unwrap_or_else(|e| panic!("f32 {}: {e}", case.describe()));
            println!(
                "  f32 {:<40} rel {:.3e}; tf32 {:.1}x that, on {kernel}",
                f.case,
                f.rel,
                t.rel / f.rel
            );
            if kernel.contains("tf32") {
                tf32_shapes += 1;
                assert!(
                    t.rel > 10.0 * f.rel,
                    "{kernel} {}: tf32 rel {:.3e} is not clearly over f32's {:.3e}: \
                     did the TF32 kernel run?",
                    t.case,
                    t.rel,
                    f.rel
                );
            } else {
                assert_eq!(f32_be.linear_kernel(m, n, k).unwrap(), kernel, "{}", t.case);
                assert_eq!(
                    (t.rel.to_bits(), t.max_abs.to_bits()),
                    (f.rel.to_bits(), f.max_abs.to_bits()),
                    "{kernel} {}: tf32 set, not a TF32 kernel, so f32's result",
                    t.case
                );
            }
        }
        if t.rel > worst.0 {
            worst = (t.rel, t.max_abs, t.case.clone());
        }
    }
    println!(
        "tf32 linear worst rel {:.3e} max_abs {:.3e} ({}); {tf32_shapes} of {} shapes on \
         TF32 kernels",
        worst.0,
        worst.1,
        worst.2,
        cases.len().div_ceil(4)
    );
    assert!(tf32_shapes > 0, "no standard shape takes a TF32 kernel");
}

/// Linear on tensor cores with 128x128 tiles: an output with two large tiles
/// for every SM (the rule `linear` picks them by), ragged at the edges and
/// with a K tail, in bf16 (warpgroup MMA on sm_90, with its K loop serial where
/// asked for, mma.sync, and WMMA where asked for) and TF32; and 512 columns
/// whose square tiles would leave a few SMs two (128x64 tiles; on mma.sync
/// bitwise the square ones).
#[test]
fn large_tile_linear_matches_reference() {
    let bf16 = |set: fn(&mut CudaOptions)| {
        let mut o = CudaOptions {
            storage: DType::BF16,
            ..CudaOptions::default()
        };
        set(&mut o);
        backend_with(o)
    };
    let Some(default) = backend_storing(KernelVersion::Fast, DType::BF16) else {
        return;
    };
    let wgmma = default.arch() == "sm_90a";
    assert_eq!(default.warpgroup_mma(), wgmma);
    let backends = [
        (
            Some(default.clone()),
            DType::BF16,
            1e-2,
            if wgmma {
                "linear_wgmma_vec8"
            } else {
                "linear_mma_vec8"
            },
        ),
        (
            bf16(|o| o.mma_sync_tiles = true),
            DType::BF16,
            1e-2,
            "linear_mma_vec8",
        ),
        (
            bf16(|o| o.wgmma_serial_steps = true),
            DType::BF16,
            1e-2,
            if wgmma {
                "linear_wgmma_serial_vec8"
            } else {
                "linear_mma_vec8"
            },
        ),
        (
            bf16(|o| o.wmma_large_tiles = true),
            DType::BF16,
            1e-2,
            "linear_tc_large_vec8",
        ),
        (
            tf32_backend(),
            DType::F32,
            TF32_LINEAR_TOL,
            "linear_tc_tf32_large_vec4",
        ),
    ];
    for (be, storage, tol, kernel) in backends {
        // None: TF32 unavailable (tf32_backend said why); the rest still run.
        let Some(be) = be else { continue };
        // Two rows of tiles (the second 5 deep) by one column per SM (the
        // last 72 wide): the square tiles fall evenly on any SM count, so
        // the narrow ones do not spread better.
        let sms = be.sm_count() as usize;
        let (m, n): (usize, usize) = (128 + 5, 128 * (sms - 1) + 72);
        assert!(m.div_ceil(128) * n.div_ceil(128) >= sms);
        assert_eq!(be.linear_kernel(m, n, 40).unwrap(), kernel);
        let r = large_tile_case(&be, storage, m, n, kernel);
        assert!(r.rel <= tol, "{}: rel {:.3e}", r.case, r.rel);
    }
    let mma_sync = default
        .with_options(CudaOptions {
            mma_sync_tiles: true,
            ..default.options().clone()
        })
        .unwrap();
    let (m, n) = (128 * (default.sm_count() as usize).div_ceil(4) + 5, 512);
    let bits = |c: &verify::Comparison| (c.rel.to_bits(), c.max_abs.to_bits());
    let mut runs = vec![(mma_sync, "linear_mma")];
    if wgmma {
        runs.push((default.clone(), "linear_wgmma"));
    }
    let mut distances = Vec::new();
    for (be, family) in runs {
        let square = be
            .with_options(CudaOptions {
                square_mma_tiles: true,
                ..be.options().clone()
            })
            .unwrap();
        let (narrow_kernel, square_kernel) =
            (format!("{family}_narrow_vec8"), format!("{family}_vec8"));
        assert_eq!(be.linear_kernel(m, n, 40).unwrap(), narrow_kernel);
        assert_eq!(square.linear_kernel(m, n, 40).unwrap(), square_kernel);
        let narrow = large_tile_case(&be, DType::BF16, m, n, &narrow_kernel);
        let wide = large_tile_case(&square, DType::BF16, m, n, &square_kernel);
        for c in [&narrow, &wide] {
            assert!(c.rel <= 1e-2, "{}: rel {:.3e}", c.case, c.rel);
        }
        // mma.sync: the same instructions on the same fragments, so the same
        // distance from the reference, to the bit. (The tensor cores' order
        // within wgmma's N = 64 and 128 is not documented.)
        if family == "linear_mma" || emulated() {
            assert_eq!(
                bits(&narrow),
                bits(&wide),
                "{family}: narrow against square tiles"
            );
        }
        distances.push(bits(&narrow));
    }
    // v6's serial K loop on the narrow tiles (its square ones are above).
    if wgmma {
        let serial = bf16(|o| o.wgmma_serial_steps = true).unwrap();
        let kernel = "linear_wgmma_serial_narrow_vec8";
        assert_eq!(serial.linear_kernel(m, n, 40).unwrap(), kernel);
        let c = large_tile_case(&serial, DType::BF16, m, n, kernel);
        assert!(c.rel <= 1e-2, "{}: rel {:.3e}", c.case, c.rel);
        distances.push(bits(&c));
    }
    // The emulator sums wgmma's products as mma.sync's, in k order.
    if emulated() {
        assert!(distances.windows(2).all(|w| w[0] == w[1]), "v6 against v5");
    }
}

/// [`large_tile_linear_matches_reference`]'s GEMM of `m x n x 40` on `be`
/// against the reference.
fn large_tile_case(
    be: &Cuda,
    storage: DType,
    m: usize,
    n: usize,
    kernel: &str,
) -> verify::Comparison {
    let case = Case::Linear {
        m,
        n,
        k: 40,
        act: Activation::Relu,
        bias: true,
        residual: true,
    };
    let r = verify::compare_case(be, &case, storage, 77)
        .unwrap_or_else(|e| panic!("{} {}: {e}", storage.name(), case.describe()));
    println!(
        "{} {kernel} {:<30} rel {:.3e}",
        storage.name(),
        r.case,
        r.rel
    );
    r
}

/// The whole projector with linear on TF32 tensor cores.
#[test]
fn tf32_projector_matches_reference() {
    let Some(be) = tf32_backend() else { return };
    let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let audio = ProjectorConfig::preset(Modality::Audio, Variant::Legacy);
    for (config, batch) in [(&image, 1), (&audio, 2)] {
        if emulated() && batch > 1 {
            continue;
        }
        let r = verify::compare_projector(&be, config, batch, DType::F32, 7)
            .unwrap_or_else(|e| panic!("tf32 {}: {e}", config.variant.name()));
        println!(
            "tf32 {}: rel {:.3e} max_abs {:.3e}",
            r.case, r.rel, r.max_abs
        );
        assert!(
            r.rel <= TF32_PROJECTOR_TOL,
            "tf32 {}: rel {:.3e}",
            r.case,
            r.rel
        );
    }
}

/// tf32 is for f32 storage: with f16 or bf16 it is an error (not ignored, not
/// a panic), whether set at creation or through `with_options`.
#[test]
fn tf32_with_half_storage_is_an_error() {
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    for storage in [DType::F16, DType::BF16] {
        let options = CudaOptions {
            tf32: true,
            storage,
            ..CudaOptions::default()
        };
        match Cuda::new(0, options.clone()) {
            Err(Error::Invalid(e)) => assert!(e.contains("f32 storage only"), "{e}"),
            other => panic!("{}: expected Invalid, got {other:?}", storage.name()),
        }
        assert!(matches!(be.with_options(options), Err(Error::Invalid(_))));
    }
    // The naive kernels ignore it: a tf32 backend's naive twin is plain v1.
    if let Some(tf32) = tf32_backend() {
        let naive = tf32.naive().unwrap().expect("a naive twin");
        assert_eq!(naive.version(), KernelVersion::Naive);
        let case = verify::standard_cases()
            .into_iter()
            .find(|c| c.op() == "linear" && c.describe().contains("77x129x513"))
            .expect("a 77x129x513 linear case");
        let r = verify::compare_case(&naive, &case, DType::F32, 9).unwrap();
        assert!(r.rel <= 1e-5, "naive with tf32 set: rel {:.3e}", r.rel);
    }
}

/// f16/bf16 host tensors go up and come back bit for bit; f32 ones are rounded
/// to nearest even on the way up; a tensor of another storage type is refused.
#[test]
fn half_storage_upload_download() {
    for storage in [DType::F16, DType::BF16] {
        let Some(be) = backend_storing(KernelVersion::Fast, storage) else {
            return;
        };
        let host = HostTensor::randn(vec![3, 37], 11, "x").unwrap();
        let rounded = host.to_dtype(storage);
        let t = be.upload(&rounded).unwrap();
        assert_eq!(t.dtype(), storage);
        let back = be.download(&t).unwrap();
        assert_eq!(back.dtype(), storage);
        assert_eq!(back.as_bytes(), rounded.as_bytes());
        let from_f32 = be.download(&be.upload(&host).unwrap()).unwrap();
        assert_eq!(from_f32.as_bytes(), rounded.as_bytes());

        let f32_be = backend(KernelVersion::Fast).unwrap();
        let w = f32_be
            .upload(&HostTensor::randn(vec![4, 37], 12, "w").unwrap())
            .unwrap();
        let mut out = be.alloc(&[3, 4]).unwrap();
        assert!(matches!(
            be.linear(&t, &w, None, Activation::None, None, &mut out),
            Err(Error::Invalid(_))
        ));
    }
}

/// Both versions give the same loss bits run after run (no float atomics).
#[test]
fn alignment_loss_is_deterministic() {
    use output_projector::ops::LossKind;
    for version in [KernelVersion::Naive, KernelVersion::Fast] {
        let Some(be) = backend(version) else { return };
        let shape = vec![3, 77, 1024];
        let u = be
            .upload(&HostTensor::randn(shape.clone(), 1, "u").unwrap())
            .unwrap();
        let v = be
            .upload(&HostTensor::randn(shape.clone(), 2, "v").unwrap())
            .unwrap();
        let mut first = None;
        for _ in 0..5 {
            // NaN until written: the pool hands back last round's block,
            // which holds the loss already.
            let mut loss = verify::poisoned(&be, &[1]).unwrap();
            let mut grad = be.alloc(&shape).unwrap();
            be.alignment_loss(LossKind::TokenL2, &u, &v, &mut loss, &mut grad)
                .unwrap();
            let l = be.download(&loss).unwrap().to_f32_vec()[0];
            assert!(l.is_finite(), "{version:?}: loss {l}");
            assert_eq!(
                *first.get_or_insert(l.to_bits()),
                l.to_bits(),
                "{version:?}"
            );
        }
    }
}

/// A LayerNorm and the linear reading it: one kernel where few rows of at
/// most 1024 columns (a multiple of 4) allow it, two elsewhere and on the
/// naive backend; either way within 1e-5 of the reference's two ops, and
/// `x + residual` to `sum_out` as the reference has it.
#[test]
fn layer_norm_linear_matches_reference() {
    check_cases(&verify::standard_cases(), "layer_norm_linear", 1e-5);
    let reference = output_projector::reference::Reference;
    // (rows, out features, in features, with residual, one kernel on Fast:
    // always for few rows, in a cluster for a split GEMM's where the device
    // has clusters, with K up to 8 blocks of two K steps)
    let (always, cluster, never) = (Some(false), Some(true), None);
    let cases = [
        (4, 96, 512, true, always),
        (13, 70, 36, false, always),
        (16, 8, 1024, true, always),
        (77, 64, 128, true, cluster),
        (77, 130, 200, true, cluster),
        (77, 64, 1024, true, cluster),
        (77, 64, 2048, true, never),
        (4, 8, 1028, true, never),
        (3, 5, 6, true, never),
    ];
    for version in [KernelVersion::Naive, KernelVersion::Fast] {
        let Some(be) = backend(version) else {
            return;
        };
        for (i, &(m, n, k, with_residual, fused)) in cases.iter().enumerate() {
            let seed = 70 + 10 * i as u64;
            let host = [
                HostTensor::randn(vec![1, m, k], seed, "x").unwrap(),
                HostTensor::randn(vec![1, m, k], seed + 1, "residual").unwrap(),
                HostTensor::randn(vec![k], seed + 2, "norm weight").unwrap(),
                HostTensor::randn(vec![k], seed + 3, "norm bias").unwrap(),
                HostTensor::randn(vec![n, k], seed + 4, "weight").unwrap(),
                HostTensor::randn(vec![n], seed + 5, "bias").unwrap(),
            ];
            let mut results = Vec::new();
            // The reference's two ops, then the device's call.
            {
                let t: Vec<_> = host.iter().map(|h| reference.upload(h).unwrap()).collect();
                let mut h = reference.alloc(&[1, m, k]).unwrap();
                let mut sum = reference.alloc(&[1, m, k]).unwrap();
                let mut out = reference.alloc(&[1, m, n]).unwrap();
                let norm = NormInput {
                    x: &t[0],
                    residual: with_residual.then_some(&t[1]),
                    weight: &t[2],
                    bias: &t[3],
                    eps: 1e-5,
                };
                reference
                    .layer_norm_linear(
                        norm,
                        Some(&mut sum),
                        &mut h,
                        &t[4],
                        Some(&t[5]),
                        Activation::Relu,
                        &mut out,
                    )
                    .unwrap();
                results.push((
                    reference.download(&out).unwrap(),
                    reference.download(&sum).unwrap(),
                ));
            }
            let t: Vec<_> = host.iter().map(|h| be.upload(h).unwrap()).collect();
            let mut h = be.alloc(&[1, m, k]).unwrap();
            // NaN until written: the pool hands back blocks of earlier cases.
            let mut sum = verify::poisoned(&be, &[1, m, k]).unwrap();
            let mut out = verify::poisoned(&be, &[1, m, n]).unwrap();
            let norm = NormInput {
                x: &t[0],
                residual: with_residual.then_some(&t[1]),
                weight: &t[2],
                bias: &t[3],
                eps: 1e-5,
            };
            let before = be.kernel_launches().unwrap();
            be.layer_norm_linear(
                norm,
                Some(&mut sum),
                &mut h,
                &t[4],
                Some(&t[5]),
                Activation::Relu,
                &mut out,
            )
            .unwrap();
            let launches = be.kernel_launches().unwrap() - before;
            let one_kernel = version == KernelVersion::Fast
                && fused.is_some_and(|in_cluster| !in_cluster || be.cluster_split_k());
            assert_eq!(
                launches,
                if one_kernel { 1 } else { 2 },
                "{m}x{n}x{k} {version:?}"
            );
            let (want_out, want_sum) = &results[0];
            let got_out = be.download(&out).unwrap().to_f64_vec();
            let got_sum = be.download(&sum).unwrap().to_f64_vec();
            let (rel, _) = output_projector::tensor::compare(&got_out, &want_out.to_f64_vec());
            assert!(rel <= 1e-5, "{m}x{n}x{k} {version:?}: out rel {rel:.3e}");
            // The sum is one f32 add of two f32 values: within an f32
            // rounding of the reference's f64 one.
            let (rel, _) = output_projector::tensor::compare(&got_sum, &want_sum.to_f64_vec());
            assert!(rel <= 1e-7, "{m}x{n}x{k} {version:?}: sum rel {rel:.3e}");
        }
    }
}

/// A LayerNorm folded into a split GEMM whose blocks are a cluster (batch 1's
/// decoder: 77 rows of 512 into the output projection, 2 x 12 x 8 blocks, one
/// wave in either kernel; into its QKV, 2 x 24 x 8 blocks in bf16, and in
/// f32 2 x 24 x 4 blocks of two K steps) against the same two ops without
/// clusters, in f32 and bf16: one launch instead of two, the same output but
/// for the order of the norm's sums (and, in bf16, a normalised element now
/// and then rounded the other way).
#[test]
fn layer_norm_linear_in_clusters_matches_two_ops() {
    for ((storage, tol), n) in [(DType::F32, 1e-6), (DType::BF16, 1e-3)]
        .into_iter()
        .flat_map(|s| [(s, 768), (s, 1536)])
    {
        let Some((be, two_ops)) = backend_pair(storage, |o| o.split_k_through_memory = true) else {
            return;
        };
        if !be.cluster_split_k() {
            skip_note("no thread-block clusters");
            return;
        }
        let (m, k) = (77, 512);
        let host = [
            HostTensor::randn(vec![1, m, k], 5, "x").unwrap(),
            HostTensor::randn(vec![1, m, k], 6, "residual").unwrap(),
            HostTensor::randn(vec![k], 7, "norm weight").unwrap(),
            HostTensor::randn(vec![k], 8, "norm bias").unwrap(),
            HostTensor::randn(vec![n, k], 9, "weight").unwrap(),
            HostTensor::randn(vec![n], 10, "bias").unwrap(),
        ];
        let mut got = Vec::new();
        for b in [&be, &two_ops] {
            let t: Vec<_> = host.iter().map(|h| b.upload(h).unwrap()).collect();
            let mut h = b.alloc(&[1, m, k]).unwrap();
            // NaN until written: the pool hands back the other backend's
            // blocks (the two share one), which hold its results.
            let mut sum = verify::poisoned(b, &[1, m, k]).unwrap();
            let mut out = verify::poisoned(b, &[1, m, n]).unwrap();
            let norm = NormInput {
                x: &t[0],
                residual: Some(&t[1]),
                weight: &t[2],
                bias: &t[3],
                eps: 1e-5,
            };
            let before = b.kernel_launches().unwrap();
            let relu = Activation::Relu;
            b.layer_norm_linear(
                norm,
                Some(&mut sum),
                &mut h,
                &t[4],
                Some(&t[5]),
                relu,
                &mut out,
            )
            .unwrap();
            let launches = b.kernel_launches().unwrap() - before;
            got.push((
                launches,
                b.download(&out).unwrap(),
                b.download(&sum).unwrap(),
            ));
        }
        let (fused, plain) = (&got[0], &got[1]);
        assert_eq!((fused.0, plain.0), (1, 2), "{}", storage.name());
        let (rel, _) =
            output_projector::tensor::compare(&fused.1.to_f64_vec(), &plain.1.to_f64_vec());
        println!(
            "{} {m}x{n}x{k}: fused vs two ops rel {rel:.3e}",
            storage.name()
        );
        assert!(rel <= tol, "{}: out rel {rel:.3e}", storage.name());
        assert_eq!(
            fused.2.to_f64_vec(),
            plain.2.to_f64_vec(),
            "{}: sum",
            storage.name()
        );
    }
}

/// The standard cases: two ops on every kernel version at these sizes.
#[test]
fn linear_layer_norm_matches_reference() {
    check_cases(&verify::standard_cases(), "linear_layer_norm", 1e-5);
}

/// A linear and the LayerNorm after it, one kernel where `linear` takes v5
/// in 16-bit storage (a large tile for every SM, N = 512: batch 64's
/// decoder), its blocks along N one cluster, against the two ops
/// (`separate_layer_norms`): `sum_out` bitwise, the norm within its sums'
/// order. f32 runs the two ops (the standard cases check them).
#[test]
fn linear_layer_norm_in_clusters_matches_two_ops() {
    let Some(f32_be) = backend(KernelVersion::Fast) else {
        return;
    };
    let (m, n, k) = (128 * (f32_be.sm_count() as usize).div_ceil(4) + 5, 512, 40);
    assert!(!f32_be.linear_layer_norm_folds(m, n, k));
    for (storage, tol) in [(DType::BF16, 1e-3), (DType::F16, 1e-3)] {
        let Some((be, two_ops)) = backend_pair(storage, |o| o.separate_layer_norms = true) else {
            return;
        };
        let folds = be.cluster_split_k();
        assert_eq!(be.linear_layer_norm_folds(m, n, k), folds);
        assert!(!two_ops.linear_layer_norm_folds(m, n, k));
        let host = [
            HostTensor::randn(vec![1, m, k], 5, "x").unwrap(),
            HostTensor::randn(vec![n, k], 6, "weight").unwrap(),
            HostTensor::randn(vec![n], 7, "bias").unwrap(),
            HostTensor::randn(vec![1, m, n], 8, "residual").unwrap(),
            HostTensor::randn(vec![n], 9, "norm weight").unwrap(),
            HostTensor::randn(vec![n], 10, "norm bias").unwrap(),
        ];
        let mut got = Vec::new();
        for b in [&be, &two_ops] {
            let t: Vec<_> = host.iter().map(|h| b.upload(h).unwrap()).collect();
            let mut y = b.alloc(&[1, m, n]).unwrap();
            // NaN until written: the pool hands back the other backend's
            // blocks (the two share one), which hold its results.
            let mut sum = verify::poisoned(b, &[1, m, n]).unwrap();
            let mut out = verify::poisoned(b, &[1, m, n]).unwrap();
            let norm = NormAfter {
                residual: Some(&t[3]),
                weight: &t[4],
                bias: &t[5],
                eps: 1e-5,
            };
            let before = b.kernel_launches().unwrap();
            let none = Activation::None;
            b.linear_layer_norm(
                &t[0],
                &t[1],
                Some(&t[2]),
                none,
                &mut y,
                norm,
                Some(&mut sum),
                &mut out,
            )
            .unwrap();
            let launches = b.kernel_launches().unwrap() - before;
            got.push((
                launches,
                b.download(&out).unwrap().to_f64_vec(),
                b.download(&sum).unwrap().to_f64_vec(),
            ));
        }
        let (fused, plain) = (&got[0], &got[1]);
        let name = storage.name();
        assert_eq!((fused.0, plain.0), (if folds { 1 } else { 2 }, 2), "{name}");
        let (rel, _) = output_projector::tensor::compare(&fused.1, &plain.1);
        println!("{name} {m}x{n}x{k}: linear_layer_norm vs two ops rel {rel:.3e}");
        assert!(rel <= tol, "{name}: out rel {rel:.3e}");
        assert!(fused.1.iter().all(|v| v.is_finite()), "{name}");
        assert_eq!(fused.2, plain.2, "{name}: sum");
    }
}

/// LayerNorms folded into the linears after them (the small projector at
/// batch 1: the encoder's in v4, the decoder's 77-row ones through the
/// cluster where there is one) against every norm a kernel of its own: fewer
/// launches, the same forward but for the order of the norms' sums.
#[test]
fn folded_layer_norms_match_separate_ones() {
    // Measured on the emulated driver: f32 2.3e-7; bf16 0 (the folded GEMMs
    // round the normalised rows to bf16 for the tensor cores, as the separate
    // norm stores them). A GPU's f32 sums, ordered or contracted otherwise,
    // can move single elements across a bf16 rounding boundary (2^-8): 5e-3.
    for (storage, tol) in [(DType::F32, 1e-5), (DType::BF16, 5e-3)] {
        let Some((be, apart)) = backend_pair(storage, |o| o.separate_layer_norms = true) else {
            return;
        };
        let config = small_projector(256);
        let w = ProjectorWeights::random_trained(config.clone(), None, 5).unwrap();
        let h = HostTensor::randn(vec![1, 4, config.in_dim], 6, "hidden").unwrap();
        let mut got = Vec::new();
        for b in [&be, &apart] {
            let proj = Projector::new(b.clone(), &w).unwrap();
            let x = b.upload(&h).unwrap();
            let mut plan = proj.plan(1, 4).unwrap();
            let before = b.kernel_launches().unwrap();
            let out = proj.forward_with(&mut plan, &x, None).unwrap();
            let launches = b.kernel_launches().unwrap() - before;
            got.push((launches, b.download(out).unwrap().to_f64_vec()));
        }
        // The encoder's three norms fold in v4 everywhere; the decoder's two
        // outside its absorbed cross-attention (which runs both of its own
        // either way) where its split GEMMs are clusters.
        let folded = if be.cluster_split_k() { 3 + 2 } else { 3 };
        assert_eq!(got[0].0 + folded, got[1].0, "{}", storage.name());
        let (rel, _) = output_projector::tensor::compare(&got[0].1, &got[1].1);
        println!("{}: folded vs apart rel {rel:.3e}", storage.name());
        assert!(rel <= tol, "{}: rel {rel:.3e}", storage.name());
    }
}

/// The decoder's cross-attention absorbed (the default where its keys are
/// few) against the literal query projection, attention and output
/// projection (`literal_cross_attention`): the same forward to rounding,
/// in fewer launches. The small projector at batch 1 and 2, the real one at
/// batch 1.
#[test]
fn absorbed_cross_attention_matches_literal() {
    // Measured on the emulated driver: f32 2.6e-7, bf16 5.7e-3 (the absorbed
    // products are rounded at other points than the literal ones): 3.5x that.
    for (storage, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let Some((be, literal)) = backend_pair(storage, |o| o.literal_cross_attention = true)
        else {
            return;
        };
        let small = small_projector(256);
        let image = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
        let cases: &[(&ProjectorConfig, usize)] = if emulated() {
            &[(&small, 1), (&small, 2)]
        } else {
            &[(&small, 1), (&small, 2), (&image, 1)]
        };
        for &(config, batch) in cases {
            let w = ProjectorWeights::random_trained(config.clone(), None, 5).unwrap();
            let shape = vec![batch, 4, config.in_dim];
            let h = HostTensor::randn(shape, 6, "hidden").unwrap();
            let mut got = Vec::new();
            for b in [&be, &literal] {
                assert_eq!(
                    b.attention_absorbed_pays(4, config.heads, config.d_model),
                    std::ptr::eq(b, &be),
                    "{}",
                    storage.name()
                );
                let proj = Projector::new(b.clone(), &w).unwrap();
                let x = b.upload(&h).unwrap();
                let mut plan = proj.plan(batch, 4).unwrap();
                let before = b.kernel_launches().unwrap();
                let out = proj.forward_with(&mut plan, &x, None).unwrap();
                let launches = b.kernel_launches().unwrap() - before;
                got.push((launches, b.download(out).unwrap().to_f64_vec()));
            }
            let what = format!("{} d{} batch {batch}", storage.name(), config.d_model);
            // Per decoder layer but the first, the query projection, the
            // attention and the output projection become one launch; the
            // first layer's attention and output projection (its query
            // projection is in the cached prefix). Where the LayerNorms
            // before and after do not fold into GEMMs (no clusters, below
            // sm_90), the one launch takes them too: twice the saving.
            let layers = config.decoder_layers as u64;
            let norms = if be.cluster_split_k() { 1 } else { 2 };
            assert_eq!(got[0].0 + norms * (2 * layers - 1), got[1].0, "{what}");
            let (rel, _) = output_projector::tensor::compare(&got[0].1, &got[1].1);
            println!(
                "{what}: absorbed vs literal rel {rel:.3e}, {} vs {} launches",
                got[0].0, got[1].0
            );
            assert!(rel <= tol, "{what}: rel {rel:.3e}");
        }
    }
}

/// An attention over few keys and the out-projection after it, one kernel
/// where the GEMM has up to 16 rows (batch 1's encoder), against the two ops
/// (`separate_attention`): bitwise the same, as the fold runs the few-keys
/// attention's code on the same lanes and v4's products; two kernels either
/// way at 77 rows (the decoder's cross-attention). Head dim 64 (groups of 16
/// lanes) as in the device tests' small projector, and 128 (a warp) as in
/// the real one.
#[test]
fn attention_linear_matches_two_ops() {
    for storage in [DType::F32, DType::BF16] {
        let Some((be, apart)) = backend_pair(storage, |o| o.separate_attention = true) else {
            return;
        };
        // (rows, keys, heads, head dim, launches folded)
        let shapes = [
            (4, 4, 2, 64, 1),
            (4, 4, 4, 128, 1),
            (3, 13, 4, 128, 1),
            (77, 4, 2, 64, 2),
        ];
        for (lq, lk, heads, hd, fused) in shapes {
            let c = heads * hd;
            let host = [
                HostTensor::randn(vec![1, lq, c], 5, "q").unwrap(),
                HostTensor::randn(vec![1, lk, 2 * c], 6, "kv").unwrap(),
                HostTensor::randn(vec![c, c], 7, "weight").unwrap(),
                HostTensor::randn(vec![c], 8, "bias").unwrap(),
            ];
            let spec = AttentionSpec::new(heads, hd);
            let mut got = Vec::new();
            for b in [&be, &apart] {
                let t: Vec<_> = host.iter().map(|h| b.upload(h).unwrap()).collect();
                let mut a = b.alloc(&[1, lq, c]).unwrap();
                // NaN until written: the pool hands back the other backend's
                // block (the two share one), which holds its result.
                let mut out = verify::poisoned(b, &[1, lq, c]).unwrap();
                let attn = AttentionInput {
                    q: Cols::new(&t[0], 0),
                    k: Cols::new(&t[1], 0),
                    v: Cols::new(&t[1], c),
                    spec: &spec,
                    mask: None,
                };
                let before = b.kernel_launches().unwrap();
                let act = Activation::None;
                b.attention_linear(attn, &mut a, &t[2], Some(&t[3]), act, &mut out)
                    .unwrap();
                let launches = b.kernel_launches().unwrap() - before;
                got.push((launches, b.download(&out).unwrap().to_f64_vec()));
            }
            let what = format!("{} Lq{lq} Lk{lk} H{heads} d{hd}", storage.name());
            assert_eq!((got[0].0, got[1].0), (fused, 2), "{what}");
            assert_eq!(got[0].1, got[1].1, "{what}");
        }
    }
}

/// Caller-owned memory as input and output, on the backend's stream.
#[test]
fn caller_memory_in_and_out() {
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    let stream = be.stream().clone();
    let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let w: Vec<f32> = (0..6).map(|i| (i as f32) * 0.5).collect();
    let xs = stream.clone_htod(&x).unwrap();
    let ws = stream.clone_htod(&w).unwrap();
    let out = stream.alloc_zeros::<f32>(8).unwrap();
    let xt = be.tensor_from_slice(xs, &[4, 3]).unwrap();
    let wt = be.tensor_from_slice(ws, &[2, 3]).unwrap();
    let mut ot = be.tensor_from_slice(out, &[4, 2]).unwrap();
    be.linear(&xt, &wt, None, Activation::None, None, &mut ot)
        .unwrap();
    let got = be.download(&ot).unwrap().to_f32_vec();
    for m in 0..4 {
        for n in 0..2 {
            let want: f32 = (0..3).map(|k| x[m * 3 + k] * w[n * 3 + k]).sum();
            assert_eq!(got[m * 2 + n], want, "[{m}, {n}]");
        }
    }
    let back = ot.into_slice().expect("the slice comes back");
    assert_eq!(stream.clone_dtoh(&back).unwrap(), got);

    // A slice from another stream is refused.
    let other = be.context().new_stream().unwrap();
    let foreign = other.alloc_zeros::<f32>(4).unwrap();
    assert!(matches!(
        be.tensor_from_slice(foreign, &[4]),
        Err(Error::Invalid(_))
    ));
}

/// An output that overlaps an input is an error, not a race.
#[test]
fn overlapping_output_is_an_error() {
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    let x = be
        .upload(&HostTensor::randn(vec![2, 8], 3, "x").unwrap())
        .unwrap();
    let w = be
        .upload(&HostTensor::randn(vec![8, 8], 4, "w").unwrap())
        .unwrap();
    // SAFETY: `x` lives until the end of the test and holds 16 elements.
    let mut alias = unsafe { be.tensor_from_raw(x.device_ptr(), 16, &[2, 8]) }.unwrap();
    assert!(matches!(
        be.linear(&x, &w, None, Activation::None, None, &mut alias),
        Err(Error::Invalid(_))
    ));
    // Q, K and V may share one tensor; the output may not live inside it.
    let qkv = be
        .upload(&HostTensor::randn(vec![1, 4, 3 * 64], 5, "qkv").unwrap())
        .unwrap();
    // SAFETY: `qkv` holds 768 elements and outlives the tensor; the range
    // [256, 512) is inside it.
    let mut out =
        unsafe { be.tensor_from_raw(qkv.device_ptr() + 256 * 4, 256, &[1, 4, 64]) }.unwrap();
    let spec = output_projector::ops::AttentionSpec::new(1, 64);
    assert!(matches!(
        be.attention(
            Cols::new(&qkv, 0),
            Cols::new(&qkv, 64),
            Cols::new(&qkv, 128),
            &spec,
            None,
            &mut out,
        ),
        Err(Error::Invalid(_))
    ));
    assert_eq!(out.shape(), &[1, 4, 64]);
}

/// Shape errors come from the shared checks before anything is launched.
#[test]
fn bad_shapes_are_errors() {
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    let x = be.alloc(&[3, 5]).unwrap();
    let w = be.alloc(&[4, 6]).unwrap();
    let mut out = be.alloc(&[3, 4]).unwrap();
    let launches = be.kernel_launches().unwrap();
    // x's 5 columns against w's 6.
    match be.linear(&x, &w, None, Activation::None, None, &mut out) {
        Err(Error::Shape {
            key,
            expected,
            found,
        }) => assert_eq!(
            (key.as_str(), expected, found),
            ("linear weight", vec![4, 5], vec![4, 6])
        ),
        other => panic!("expected a shape error, got {other:?}"),
    }
    // linear_layer_norm: a norm of the linear's input width, a sum of
    // another shape.
    let w = be.alloc(&[4, 5]).unwrap();
    let (g5, g4) = (be.alloc(&[5]).unwrap(), be.alloc(&[4]).unwrap());
    let mut y = be.alloc(&[3, 4]).unwrap();
    let mut bad_sum = be.alloc(&[4, 3]).unwrap();
    for (weight, sum) in [(&g5, None), (&g4, Some(&mut bad_sum))] {
        let norm = NormAfter {
            residual: None,
            weight,
            bias: weight,
            eps: 1e-5,
        };
        let e = be
            .linear_layer_norm(&x, &w, None, Activation::None, &mut y, norm, sum, &mut out)
            .unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
    }
    assert_eq!(
        be.kernel_launches().unwrap(),
        launches,
        "a kernel was launched for a call with bad shapes"
    );
    be.synchronize().unwrap();
}

/// A captured forward replays exactly what the eager forward computes, for
/// each new input, without launching or allocating anything per kernel; the
/// blocks it uses stay pinned while it lives.
#[test]
fn graph_replay_matches_eager_forward() {
    for (storage, tol, split_k_through_memory) in [
        (DType::F32, 1e-4, false),
        (DType::F32, 1e-4, true),
        (DType::BF16, 2e-2, false),
    ] {
        let Some(be) = backend_with(CudaOptions {
            storage,
            split_k_through_memory,
            ..CudaOptions::default()
        }) else {
            return;
        };
        check_graph_replay(&be, storage, tol);
    }
}

/// On sm_90 and newer (with a CUDA 12.3+ driver) kernels are queued with
/// programmatic dependent launch (the emulated device is sm_90, and its driver
/// accepts only the attribute the backend sets), unless `serial_launches` is
/// set; either way a forward and its graph replay give bitwise the same output.
#[test]
fn dependent_launch_matches_serial() {
    check_sm90_feature(
        Cuda::dependent_launch,
        |_| {
            let version = driver_version();
            (version < 12030).then(|| {
                format!(
                    "the driver (CUDA {}.{}) is older than 12.3",
                    version / 1000,
                    version % 1000 / 10
                )
            })
        },
        |_| {},
        |o| o.serial_launches = true,
    );
}

/// The CUDA version of the driver, e.g. 12030 for 12.3 (as the backend reads it).
fn driver_version() -> i32 {
    use output_projector::cuda::cudarc::driver::sys;
    let mut version = 0;
    // SAFETY: writes one int; the driver is loaded (a backend was made).
    let status = unsafe { sys::cuDriverGetVersion(&mut version) };
    assert_eq!(status, sys::CUresult::CUDA_SUCCESS, "cuDriverGetVersion");
    version
}

/// On devices that launch thread-block clusters (sm_90 and newer; the
/// emulated device is one) a split GEMM's blocks of one tile add their slices
/// in a cluster, unless `split_k_through_memory` is set; either way a forward
/// and its graph replay give bitwise the same output.
#[test]
fn cluster_split_k_matches_split_k_through_memory() {
    // Through memory the decoder's norms cannot fold into their GEMMs (a
    // different order of sums): both ways with every norm apart.
    // sm_90 and newer launch clusters whatever the driver (one that runs
    // sm_90 knows them): no excuse.
    check_sm90_feature(
        Cuda::cluster_split_k,
        |_| None,
        |o| o.separate_layer_norms = true,
        |o| o.split_k_through_memory = true,
    );
}

/// A launch feature that `on` reports: never below sm_90; on sm_90 and newer
/// always, unless `excuse` gives the reason it may not be (said in one line),
/// and on the emulated sm_90 device (a CUDA 13.0 driver) always; off once
/// `turn_off` has set its option; and the forwards with and without it
/// (options otherwise default but for `base`) bitwise the same.
fn check_sm90_feature(
    on: fn(&Cuda) -> bool,
    excuse: fn(&Cuda) -> Option<String>,
    base: fn(&mut CudaOptions),
    turn_off: fn(&mut CudaOptions),
) {
    let mut options = CudaOptions::default();
    base(&mut options);
    let Some(be) = backend_with(options) else {
        return;
    };
    let mut options = be.options().clone();
    turn_off(&mut options);
    let off = be.with_options(options).unwrap();
    let sm = sm_number(be.arch());
    if sm < 90 {
        assert!(!on(&be), "{}", be.arch());
    } else if emulated() {
        assert!(on(&be), "{} (emulated)", be.arch());
    } else if let Some(why) = excuse(&be) {
        println!("{}: the feature may be off: {why}", be.arch());
    } else {
        assert!(on(&be), "{}", be.arch());
    }
    assert!(!on(&off));
    assert_forwards_bitwise_equal(&be, &off);
}

/// The number of an architecture: 90 for `sm_90a`, 100 for `sm_100`.
fn sm_number(arch: &str) -> u32 {
    arch.strip_prefix("sm_")
        .map(|s| s.trim_end_matches(|c: char| c.is_ascii_alphabetic()))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an architecture like sm_90a: {arch}"))
}

#[test]
fn sm_numbers_order_as_numbers() {
    let archs = ["sm_75", "sm_80", "sm_89", "sm_90a", "sm_100", "sm_120a"];
    let numbers: Vec<u32> = archs.iter().map(|a| sm_number(a)).collect();
    assert_eq!(numbers, [75, 80, 89, 90, 100, 120]);
}

/// The small projector's forward, eager and replayed from a graph, on `be`
/// and on `other`: all four bitwise the same. Its decoder's 77-row GEMMs
/// split K.
fn assert_forwards_bitwise_equal(be: &Cuda, other: &Cuda) {
    let config = small_projector(256);
    let w = ProjectorWeights::random_trained(config.clone(), None, 5).unwrap();
    let h = HostTensor::randn(vec![2, 4, config.in_dim], 6, "hidden").unwrap();
    let mut outs = Vec::new();
    for b in [be, other] {
        let proj = Projector::new(b.clone(), &w).unwrap();
        let x = b.upload(&h).unwrap();
        outs.push(b.download(&proj.forward(&x, None).unwrap()).unwrap());
        let mut graph = proj.capture(2, 4).unwrap();
        outs.push(b.download(graph.forward(&x).unwrap()).unwrap());
    }
    let bits =
        |t: &HostTensor| -> Vec<u64> { t.to_f64_vec().iter().map(|v| v.to_bits()).collect() };
    for (i, o) in outs.iter().enumerate().skip(1) {
        assert_eq!(
            bits(o),
            bits(&outs[0]),
            "output {i} differs from the first backend's eager one"
        );
    }
}

/// The image preset at small widths (emulation is slow), 77 queries and two
/// decoder layers: the precomputed first one and a full one.
fn small_projector(in_dim: usize) -> ProjectorConfig {
    ProjectorConfig {
        in_dim,
        d_model: 128,
        heads: 2,
        ffn_dim: 256,
        encoder_layers: 1,
        decoder_layers: 2,
        out_dim: 96,
        ..ProjectorConfig::preset(Modality::Image, Variant::Legacy)
    }
}

/// The body of [`graph_replay_matches_eager_forward`] for one storage type.
fn check_graph_replay(be: &Cuda, storage: DType, tol: f64) {
    // The decoder's 77-row GEMMs (2 x 2 tiles of 64) split K: through memory
    // their workspaces are scratch taken inside the capture, in a cluster
    // they need none. The 4-row input GEMM (K 1024) takes the whole-K kernel.
    let config = small_projector(1024);
    // Weights and inputs in the storage type, so that the reference sees
    // exactly what the device does.
    let w = ProjectorWeights::random_trained(config.clone(), None, 11).unwrap();
    let rounded = w
        .tensors()
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(storage)))
        .collect();
    let w = ProjectorWeights::from_tensors(config.clone(), None, rounded).unwrap();
    let proj = Projector::new(be.clone(), &w).unwrap();
    let (batch, n_in) = (1, 4);
    let inputs: Vec<HostTensor> = (0..2)
        .map(|i| {
            HostTensor::randn(vec![batch, n_in, config.in_dim], 40 + i, "hidden")
                .unwrap()
                .to_dtype(storage)
        })
        .collect();
    let eager: Vec<HostTensor> = inputs
        .iter()
        .map(|h| {
            be.download(&proj.forward(&be.upload(h).unwrap(), None).unwrap())
                .unwrap()
        })
        .collect();
    // The eager forward's launches, on a plan made beforehand.
    let mut plan = proj.plan(batch, n_in).unwrap();
    let h0 = be.upload(&inputs[0]).unwrap();
    let before = be.kernel_launches().unwrap();
    proj.forward_with(&mut plan, &h0, None).unwrap();
    let eager_launches = be.kernel_launches().unwrap() - before;
    drop(plan);

    // fc; the encoder layer's 4 (norm1 + QKV, the attention over its 4 keys
    // + the out-projection and norm2 + FFN up one kernel each at 4 rows, FFN
    // down); its last norm + the stacked (absorbed) K/V, one kernel; the
    // first decoder layer's 3 (the absorbed cross-attention with its norms,
    // FFN up, FFN down) and the second's 6 (norm1 + QKV, the self-attention,
    // its out-projection, then the same 3), and the decoder's last norm with
    // the output projection, 1: at 77 rows a norm folds into the split GEMM
    // after it where its blocks are a cluster, else it is a kernel of its own
    // (one more in the second layer, one at the output).
    let decoder = if be.cluster_split_k() {
        3 + 6 + 1
    } else {
        3 + 7 + 2
    };
    assert_eq!(eager_launches, 1 + 4 + 1 + decoder);
    let mut graph = proj.capture(batch, n_in).unwrap();
    assert_eq!(graph.kernels(), eager_launches);
    println!(
        "{}: {eager_launches} kernels per forward, replayed as one graph launch",
        storage.name()
    );
    // Blocks taken inside the capture are the graph's alone: a tensor made
    // now gets other memory, which replays leave alone.
    let bystander_host = HostTensor::randn(vec![8192 / storage.size()], 9, "bystander")
        .unwrap()
        .to_dtype(storage);
    let bystander = be.upload(&bystander_host).unwrap();
    let before = be.kernel_launches().unwrap();
    for round in 0..2 {
        for (h, want) in inputs.iter().zip(&eager) {
            let got = be
                .download(graph.forward(&be.upload(h).unwrap()).unwrap())
                .unwrap();
            assert_eq!(got.to_f64_vec(), want.to_f64_vec(), "round {round}");
        }
    }
    assert_eq!(
        be.kernel_launches().unwrap(),
        before,
        "a replay launches no kernel itself"
    );
    assert!(
        be.download(&bystander).unwrap().to_f64_vec() == bystander_host.to_f64_vec(),
        "a replay wrote into memory it does not own"
    );
    drop(bystander);
    let reference = output_projector::reference::Reference;
    let ref_proj = Projector::new(reference, &w).unwrap();
    let want = ref_proj
        .forward(&reference.upload(&inputs[1]).unwrap(), None)
        .unwrap();
    let got = be.download(graph.output()).unwrap();
    let (rel, _) = output_projector::tensor::compare(&got.to_f64_vec(), want.data());
    println!("{}: graph vs reference rel {rel:.3e}", storage.name());
    assert!(rel <= tol, "graph vs reference: rel {rel:.3e}");

    // A wrong input shape is an error; the graph still works afterwards.
    let wrong = be.alloc(&[batch, n_in + 1, config.in_dim]).unwrap();
    assert!(matches!(graph.forward(&wrong), Err(Error::Shape { .. })));
    graph.replay().unwrap();
    be.synchronize().unwrap();

    // The graph's blocks are not in the pool's cache (nothing else may get
    // them, nor may they go back to the driver) until the graph is dropped.
    be.release_cached();
    assert_eq!(be.cached_bytes(), 0);
    drop(graph);
    assert!(
        be.cached_bytes() > 0,
        "the graph's blocks come back to the pool"
    );
    be.release_cached();
    assert_eq!(be.cached_bytes(), 0);

    // The default stream cannot be captured: an error, not a driver failure.
    let options = be.options().clone();
    let default = Cuda::on_stream(be.context().default_stream(), options).unwrap();
    let on_default = Projector::new(default, &w).unwrap();
    assert!(matches!(
        on_default.capture(batch, n_in),
        Err(Error::Invalid(_))
    ));
}

/// Work another thread queues on the backend's stream while a graph is being
/// captured waits for the capture to end; it is neither recorded into the
/// graph nor lost.
#[test]
fn graph_capture_waits_for_other_threads() {
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    let config = ProjectorConfig {
        in_dim: 64,
        d_model: 64,
        heads: 1,
        ffn_dim: 64,
        encoder_layers: 1,
        decoder_layers: 1,
        n_out: 5,
        out_dim: 32,
        n_in: None,
        ..ProjectorConfig::preset(Modality::Image, Variant::Legacy)
    };
    let w = ProjectorWeights::random(config, None, 12).unwrap();
    let proj = Projector::new(be.clone(), &w).unwrap();
    // Small ops, many of them, so that some fall inside the captures. The
    // output is NaN until the op writes it: the pool hands back last round's
    // block, which holds the result already, so a lost op would not show.
    let x = HostTensor::randn(vec![2, 4], 13, "x").unwrap();
    let wt = HostTensor::randn(vec![3, 4], 14, "w").unwrap();
    let linear = || {
        let (xd, wd) = (be.upload(&x).unwrap(), be.upload(&wt).unwrap());
        let mut out = verify::poisoned(&be, &[2, 3]).unwrap();
        be.linear(&xd, &wd, None, Activation::None, None, &mut out)
            .unwrap();
        be.download(&out).unwrap().to_f64_vec()
    };
    let want = linear();
    assert!(want.iter().all(|v| v.is_finite()), "{want:?}");
    // A capture with no other thread about: the forward's kernels. The
    // count is of launches while the capture holds the stream, which other
    // threads' launches wait for (they hold it from launch to count), so an
    // op of theirs recorded into a graph would show here as one more.
    let alone = proj.capture(2, 3).unwrap().kernels();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| {
            let mut rounds = 0;
            while rounds == 0 || !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(linear(), want, "round {rounds}");
                rounds += 1;
            }
            rounds
        });
        // Stops the other thread however this one leaves the scope (the
        // scope waits for it, a panic here too).
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let stopping = Stop(&stop);
        for i in 0..10 {
            let graph = proj.capture(2, 3).unwrap();
            assert_eq!(graph.kernels(), alone, "capture {i}");
            graph.replay().unwrap();
        }
        drop(stopping);
        let rounds = other.join().unwrap();
        println!("{rounds} linear ops on another thread around 10 captures of {alone} kernels");
    });
    be.synchronize().unwrap();
}

/// `OUTPROJ_SKIP_EMULATION=1` skips the two CPU-emulation tests below.
fn emulation_skipped() -> bool {
    if std::env::var("OUTPROJ_SKIP_EMULATION").is_ok_and(|v| v == "1") {
        println!("skipped: OUTPROJ_SKIP_EMULATION=1");
        return true;
    }
    false
}

/// Compiles `source` with `$CXX` (else `c++`) and `flags`: `Err` when there is
/// no compiler, `Ok(false)` when the compile fails.
fn cxx_compile(
    source: &std::path::Path,
    out: &std::path::Path,
    flags: &[&str],
) -> std::io::Result<bool> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let sanitized = flags.iter().any(|f| f.starts_with("-fsanitize"));
    // -g1: line tables, all a sanitizer's report or a backtrace needs, for a
    // quarter less compile time than full debug information. On x86-64 the
    // emulator is built for the machine it runs on, so fmaf is an instruction
    // rather than a libm call; -ffp-contract=off keeps every other product and
    // sum rounded as the kernels write them.
    let output = std::process::Command::new(&cxx)
        .args(["-std=c++17", "-g1", "-w", "-pthread", "-ffp-contract=off"])
        .arg(if sanitized { "-O1" } else { "-O2" })
        .args(cfg!(target_arch = "x86_64").then_some("-march=native"))
        .args(flags)
        .arg(source)
        .arg("-o")
        .arg(out)
        .output()?;
    if !output.status.success() {
        eprintln!(
            "{cxx} {flags:?} {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.status.success())
}

const SANITIZE: &[&str] = &[
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
];

/// The kernel files executed on the CPU, where no GPU is needed:
/// kernels/emulator runs each CUDA thread of a block as a fiber (barriers and
/// warp shuffles as scheduling points) under AddressSanitizer and UBSan, and
/// compares every kernel version with float64 references over the standard
/// sizes. Needs a C++17 compiler (`$CXX`, else `c++`); without one it skips in
/// one line, and without sanitizer runtimes it runs unsanitized.
#[test]
fn kernels_pass_under_cpu_emulation() {
    use std::path::Path;
    use std::process::Command;

    if emulated() || emulation_skipped() {
        return;
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emulator/run_kernels.cpp");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("run_kernels");
    let sanitized = match cxx_compile(&source, &exe, SANITIZE) {
        Err(e) => {
            println!("skipped: no C++ compiler for the kernel emulator: {e}");
            return;
        }
        Ok(true) => true,
        Ok(false) => {
            assert!(
                cxx_compile(&source, &exe, &[]).unwrap_or(false),
                "compiling {}",
                source.display()
            );
            false
        }
    };
    let list = Command::new(&exe)
        .arg("--list")
        .output()
        .expect("listing the emulator's ops");
    let ops: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(ops.len() >= 6, "run_kernels --list: {ops:?}");
    let mut comparisons = 0;
    for (op, out) in run_each_op(&exe, &ops, ("ASAN_OPTIONS", "detect_leaks=0")) {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
        assert!(
            out.status.success(),
            "kernel emulation of {op} failed ({}):\n{}\n{}",
            out.status,
            failed.join("\n"),
            stderr.lines().rev().take(40).collect::<Vec<_>>().join("\n")
        );
        let passed = passed_comparisons(&stdout);
        assert!(
            passed > 0,
            "kernel emulation of {op} exited 0 but passed no comparison:\n{stdout}"
        );
        comparisons += passed;
    }
    println!(
        "emulated kernels {ops:?}: {comparisons} comparisons passed{}",
        if sanitized { " (sanitized)" } else { "" }
    );
}

/// The comparisons a run of `run_kernels` passed: its lines `ok   <what>
/// rel ..` and `ok   <what> bitwise <other>` (failures are `FAIL ..`).
fn passed_comparisons(stdout: &str) -> usize {
    stdout.lines().filter(|l| l.starts_with("ok ")).count()
}

#[test]
fn passed_comparisons_are_counted() {
    let out = format!(
        "ok   {:<60} rel 1.00e-07 max 2.00e-07\n\
         FAIL {:<60} rel 1.00e-01 max 2.00e-01\n\
         ok   {:<60} bitwise v1\n\
         emulated kernels: 1 comparisons failed (10 fiber switches)\n",
        "gather B2 T30 n4 C4096", "layer_norm 3x3", "linear 3x5x7 act1"
    );
    assert_eq!(passed_comparisons(&out), 2);
    assert_eq!(
        passed_comparisons("emulated kernels: 0 comparisons failed (0 fiber switches)\n"),
        0
    );
}

/// `exe op` for each of `ops` with `env` set, each in its own process, as
/// many at a time as there are cores (a process is one core's work): the
/// outputs, in the order of `ops`.
fn run_each_op(
    exe: &std::path::Path,
    ops: &[String],
    env: (&str, &str),
) -> Vec<(String, std::process::Output)> {
    let run = |op: &String| {
        std::process::Command::new(exe)
            .arg(op)
            .env(env.0, env.1)
            .output()
            .unwrap_or_else(|e| panic!("running {} {op}: {e}", exe.display()))
    };
    let outputs = output_projector::parallel::map_in_order(ops, run);
    ops.iter()
        .cloned()
        .zip(outputs.expect("an emulator runner thread"))
        .collect()
}

/// The emulator as a race checker: built with ThreadSanitizer
/// (kernels/emulator/emu.h, "ThreadSanitizer"), races between the threads of a
/// block or a cluster are reported whatever values they happened to give.
/// First `race_selftest`'s small kernels must each give their status: 0
/// (ordered), 66 (TSan's, for the race each "(race)" case holds) or 1 (a
/// cp.async stage read before its wait: stale data). Then run_kernels on the
/// ops in `OUTPROJ_RACE_CHECK_OPS` (default `gather loss ln absorbed
/// linear_large linear_layer_norm`: the small ops and the 16-bit GEMMs'
/// cp.async and wgmma pipelines, about three minutes; all of them, `gather
/// loss ln absorbed attn linear`, take about an hour on one core) must
/// pass with no race reported. Skips in one line without a C++ compiler or
/// its ThreadSanitizer runtime.
#[test]
fn kernels_race_free_under_thread_sanitizer() {
    use std::path::Path;
    use std::process::Command;

    if emulated() || emulation_skipped() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emulator");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let tsan = ["-fsanitize=thread"];
    let selftest = tmp.join("race_selftest");
    match cxx_compile(&dir.join("race_selftest.cpp"), &selftest, &tsan) {
        Err(e) => {
            println!("skipped: no C++ compiler for the kernel emulator: {e}");
            return;
        }
        Ok(false) => {
            println!("skipped: the C++ compiler has no ThreadSanitizer");
            return;
        }
        Ok(true) => {}
    }
    let run = |exe: &Path, args: &[&str]| {
        Command::new(exe)
            .args(args)
            .env("TSAN_OPTIONS", "exitcode=66")
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()))
    };
    let list = run(&selftest, &["--list"]);
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    let mut cases = 0;
    for line in list.lines() {
        let (name, about) = line.split_once(' ').expect("a case and what it holds");
        let want = if about.ends_with("(race)") {
            66
        } else if about.ends_with("(stale)") {
            1
        } else {
            0
        };
        let out = run(&selftest, &[name]);
        assert_eq!(
            out.status.code(),
            Some(want),
            "race_selftest {name} ({}): the emulator's race check is broken\n{}",
            about.trim(),
            String::from_utf8_lossy(&out.stderr)
        );
        cases += 1;
    }
    assert!(cases >= 10, "race_selftest listed {cases} cases");

    let exe = tmp.join("run_kernels_tsan");
    assert!(
        cxx_compile(&dir.join("run_kernels.cpp"), &exe, &tsan).unwrap_or(false),
        "compiling run_kernels.cpp with ThreadSanitizer"
    );
    let ops: Vec<String> = std::env::var("OUTPROJ_RACE_CHECK_OPS")
        .unwrap_or_else(|_| "gather loss ln absorbed linear_large linear_layer_norm".into())
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut comparisons = 0;
    for (op, out) in run_each_op(&exe, &ops, ("TSAN_OPTIONS", "exitcode=66")) {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
        let race: Vec<&str> = stderr
            .lines()
            .skip_while(|l| !l.contains("WARNING: ThreadSanitizer"))
            .take(40)
            .collect();
        assert!(
            out.status.success(),
            "run_kernels {op} under ThreadSanitizer failed ({}):\n{}\n{}\n{}",
            out.status,
            failed.join("\n"),
            race.join("\n"),
            if race.is_empty() { stderr.trim() } else { "" }
        );
        let passed = passed_comparisons(&stdout);
        assert!(
            passed > 0,
            "run_kernels {op} under ThreadSanitizer exited 0 but passed no comparison:\n{stdout}"
        );
        comparisons += passed;
    }
    println!(
        "race_selftest: {cases} cases as expected; run_kernels {ops:?} under ThreadSanitizer: \
         no race, {comparisons} comparisons"
    );
}

/// Where there is no GPU: this file's tests again, in a child process
/// whose libcuda.so.1 is kernels/emulator/fake_libcuda.cpp (host memory as
/// device memory, launches run by the CPU emulator), so the whole backend runs:
/// planning, parameter structs, pool, copies, kernels, the projector; then
/// again on an emulated A100 (sm_80). With
/// `OUTPROJ_EMULATION_SANITIZE=1` the driver is built with AddressSanitizer
/// (preloaded into the child; about twice as slow), so a kernel touching memory
/// outside an allocation aborts. Needs NVRTC (the real one compiles the
/// kernels) and a C++17 compiler; skipped in one line where a CUDA driver
/// exists (the tests ran on it) or either is missing.
#[test]
fn backend_runs_on_emulated_driver() {
    use output_projector::cuda::KERNEL_CACHE_ENV;
    use std::path::Path;
    use std::process::Command;

    if emulated() || emulation_skipped() {
        return;
    }
    if output_projector::cuda::driver_present() {
        println!("skipped: a CUDA driver is present, so the device tests ran on it");
        return;
    }
    if !output_projector::cuda::nvrtc_present() {
        assert!(
            std::env::var("REQUIRE_NVRTC").as_deref() != Ok("1"),
            "REQUIRE_NVRTC=1 but NVRTC is missing"
        );
        println!("skipped: nvrtc unavailable for the emulated driver");
        return;
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/emulator/fake_libcuda.cpp");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emulated-driver");
    std::fs::create_dir_all(&dir).expect("creating the emulated driver's folder");
    let lib = dir.join("libcuda.so.1");
    let shared = [
        "-shared",
        "-fPIC",
        "-fvisibility=hidden",
        "-fvisibility-inlines-hidden",
        "-Wl,-Bsymbolic",
    ];
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    // libasan to preload, when the compiler has one.
    let asan = Command::new(&cxx)
        .arg("-print-file-name=libasan.so")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|p| Path::new(p).is_absolute() && Path::new(p).exists())
        .filter(|_| std::env::var("OUTPROJ_EMULATION_SANITIZE").is_ok_and(|v| v == "1"));
    let mut sanitized = false;
    if asan.is_some() {
        let flags: Vec<&str> = shared
            .iter()
            .copied()
            .chain(["-fsanitize=address"])
            .collect();
        match cxx_compile(&source, &lib, &flags) {
            Err(e) => {
                println!("skipped: no C++ compiler for the emulated driver: {e}");
                return;
            }
            Ok(ok) => sanitized = ok,
        }
    }
    if !sanitized {
        match cxx_compile(&source, &lib, &shared) {
            Err(e) => {
                println!("skipped: no C++ compiler for the emulated driver: {e}");
                return;
            }
            Ok(ok) => assert!(ok, "compiling {}", source.display()),
        }
    }
    let library_path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    };
    let preload = asan.filter(|_| sanitized);
    let run = |device: Option<&str>| {
        let mut child = Command::new(std::env::current_exe().expect("this test binary"));
        child
            .arg("--test-threads=2")
            .env("LD_LIBRARY_PATH", &library_path)
            .env(EMULATED_DRIVER_ENV, "1");
        if let Some(device) = device {
            child.env(EMULATED_DEVICE_ENV, device);
        }
        // The CUBINs tests/toolchain.rs compiled and stored for sm_80 and
        // sm_90a, where it ran before (as in scripts/test.sh): loaded, not
        // compiled again (four minutes of NVRTC on one core). What is not
        // there is compiled.
        if std::env::var_os(KERNEL_CACHE_ENV).is_none() {
            child.env(
                KERNEL_CACHE_ENV,
                Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-cache"),
            );
        }
        if let Some(asan) = &preload {
            child
                .env("LD_PRELOAD", asan)
                .env("ASAN_OPTIONS", "detect_leaks=0");
        }
        let out = child.output().expect("running the device tests");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let device = device.unwrap_or("the default device");
        assert!(
            out.status.success(),
            "device tests on the emulated driver ({device}) failed ({}):\n{stdout}\n{}",
            out.status,
            stderr.lines().rev().take(40).collect::<Vec<_>>().join("\n")
        );
        let passed = stdout.lines().filter(|l| l.ends_with("... ok")).count();
        let ran = stdout.lines().find_map(|l| {
            l.strip_prefix("running ")?
                .strip_suffix(" tests")?
                .parse()
                .ok()
        });
        assert_eq!(Some(passed), ran, "{stdout}");
        passed
    };
    // Every test: the three of the emulator (this one among them) return at
    // once there, the others need the device.
    let passed = run(None);
    // Again on an A100: no clusters, no dependent launch, no warpgroup MMA,
    // so split-K through memory, every LayerNorm that sm_90 folds through a
    // cluster apart, `mma.sync` for warpgroup MMA, kernels queued serially.
    let sm80 = run(Some("sm_80"));
    println!(
        "{passed} tests passed on the emulated driver, {sm80} on an emulated sm_80{}",
        if sanitized { " (AddressSanitizer)" } else { "" }
    );
}

/// What the kernels cannot take is an error before anything is launched:
/// sizes asked about with a dimension of 0 or past the kernels' indices, an
/// eps f32 rounds to 0, an attention scale past f32's range, and on upload
/// to f16 storage a value past f16's.
#[test]
fn what_the_kernels_cannot_take_is_an_error() {
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    assert!(matches!(
        be.linear_kernel(77, 512, 0),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        be.linear_kernel(77, 0, 512),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        be.linear_kernel(1 << 20, 1 << 20, 8),
        Err(Error::Overflow(_))
    ));
    assert_eq!(be.linear_layer_norm_kernel(4928, 512, 0), None);
    assert!(matches!(
        be.attention_kernel(1, 77, 0, 4, 128),
        Err(Error::Invalid(_))
    ));
    assert!(be.attention_kernel(1, 77, 77, usize::MAX, 2).is_err());
    assert!(be.linear_kernel(77, 512, 512).is_ok());
    assert!(be.attention_kernel(1, 77, 77, 4, 128).is_ok());

    let up = |shape: Vec<usize>, seed| {
        be.upload(&HostTensor::randn(shape, seed, "x").unwrap())
            .unwrap()
    };
    let (x, w, b) = (up(vec![2, 8], 1), up(vec![8], 2), up(vec![8], 3));
    let mut out = be.alloc(&[2, 8]).unwrap();
    let e = be
        .layer_norm(&x, None, &w, &b, 1e-50, &mut out, None)
        .unwrap_err();
    assert!(e.to_string().contains("eps 1e-50 does not fit f32"), "{e}");
    let qkv = up(vec![1, 3, 24], 4);
    let spec = AttentionSpec {
        scale: Some(1e39),
        ..AttentionSpec::new(2, 4)
    };
    let mut a = be.alloc(&[1, 3, 8]).unwrap();
    let (q, k, v) = (Cols::new(&qkv, 0), Cols::new(&qkv, 8), Cols::new(&qkv, 16));
    let e = be.attention(q, k, v, &spec, None, &mut a).unwrap_err();
    assert!(e.to_string().contains("scale 1e39 does not fit f32"), "{e}");

    let Some(half) = backend_storing(KernelVersion::Fast, DType::F16) else {
        return;
    };
    let big = HostTensor::from_f32(vec![3], vec![1.0, 7e4, 2.0]).unwrap();
    let e = half.upload(&big).map(|_| ()).unwrap_err();
    assert!(
        e.to_string()
            .contains("70000 at flat index 1 overflows f16"),
        "{e}"
    );
}

/// `outproj info`'s line on what the backend does on the device says what
/// its methods say.
#[test]
fn the_summary_says_what_the_backend_does() {
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    let summary = be.summary();
    let says = |what: &str| summary.contains(what);
    assert!(says(&format!("{} SMs", be.sm_count())), "{summary}");
    assert_eq!(
        says("with programmatic dependent launch"),
        be.dependent_launch(),
        "{summary}"
    );
    assert_eq!(
        says("split-K in thread-block clusters"),
        be.cluster_split_k(),
        "{summary}"
    );
    let sixteen_bit = Cuda::new(
        0,
        CudaOptions {
            storage: DType::BF16,
            ..CudaOptions::default()
        },
    );
    match sixteen_bit {
        Ok(bf16) => {
            assert!(says("bf16") && says("mma"), "{summary}");
            assert_eq!(says("warpgroup MMA"), bf16.warpgroup_mma(), "{summary}");
        }
        Err(e) => assert!(
            below_sm80(&e.to_string()) && says("bf16 and tf32 need sm_80") && !says("mma"),
            "{summary}: {e}"
        ),
    }
    let info = std::process::Command::new(env!("CARGO_BIN_EXE_outproj"))
        .arg("info")
        .output()
        .expect("running outproj info");
    let stdout = String::from_utf8_lossy(&info.stdout);
    assert!(
        stdout.contains(&format!("device 0 runs: {summary}\n")),
        "{stdout}"
    );
}

/// The emulated driver loads what a real one would: a CUBIN of the device's
/// own architecture, not one of another major (as an sm_80 CUBIN on an
/// H100); and in it finds a kernel only where the CUBIN holds it: an sm_80
/// compile leaves out what is guarded for sm_90 (as the warpgroup-MMA GEMMs
/// are), so a backend that asked an A100 for one would be refused there too.
#[test]
fn the_emulated_driver_loads_only_what_a_real_one_would() {
    use output_projector::cuda::cudarc::nvrtc::Ptx;
    if !emulated() {
        return;
    }
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    // Names the emulator has kernels for; only looked up, never launched.
    let source = r#"
extern "C" __global__ void gather_signal_tokens_vec4() {}
#if __CUDA_ARCH__ >= 900
extern "C" __global__ void gather_signal_tokens_naive() {}
#endif
"#;
    let compile = |arch: &str| {
        output_projector::cuda::compile(source, "lookup.cu", arch)
            .unwrap_or_else(|e| panic!("{arch}: {e}"))
            .cubin
    };
    let arch = be.arch();
    let module = be
        .context()
        .load_module(Ptx::from_binary(compile(arch)))
        .unwrap_or_else(|e| panic!("{arch}: {e}"));
    assert!(
        module.load_function("gather_signal_tokens_vec4").is_ok(),
        "{arch}"
    );
    assert_eq!(
        module.load_function("gather_signal_tokens_naive").is_ok(),
        sm_number(arch) >= 90,
        "{arch}"
    );
    // Not a kernel of the CUBIN, though the emulator has one by that name.
    assert!(module.load_function("layer_norm_naive").is_err(), "{arch}");
    let other = if sm_number(arch) >= 90 {
        "sm_80"
    } else {
        "sm_90a"
    };
    assert!(
        be.context()
            .load_module(Ptx::from_binary(compile(other)))
            .is_err(),
        "an {other} CUBIN on an {arch} device"
    );
}

/// A graph captured on one thread replays, and is dropped, on another (as an
/// engine's worker takes it over): the same bits as a replay where it was
/// captured.
#[test]
fn a_graph_moves_to_another_thread() {
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    let w = ProjectorWeights::random_trained(small_projector(64), None, 5).unwrap();
    let proj = Projector::new(be.clone(), &w).unwrap();
    let x = be
        .upload(&HostTensor::randn(vec![1, 4, 64], 6, "x").unwrap())
        .unwrap();
    let mut here = proj.capture(1, 4).unwrap();
    let want = be.download(here.forward(&x).unwrap()).unwrap().to_f64_vec();
    drop(here);
    let graph = proj.capture(1, 4).unwrap();
    let other = be.clone();
    let got = std::thread::scope(|s| {
        s.spawn(move || {
            let be = other;
            let mut graph = graph;
            let y = be.download(graph.forward(&x).unwrap()).unwrap();
            drop(graph);
            y.to_f64_vec()
        })
        .join()
        .unwrap()
    });
    assert_eq!(got, want);
    assert!(want.iter().all(|v| v.is_finite()));
    be.synchronize().unwrap();
}

/// One projector forwarding from three threads at once, its first forwards
/// among them, each thread's plan reused for three inputs: the same bits as
/// plain forwards on one thread (`verify::check_threads`).
#[test]
fn one_projector_serves_many_threads() {
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    verify::check_threads(&be, &[1, 2, 3], 9).unwrap();
}

/// A graph reads the input buffer it was captured with: replacing the tensor
/// behind `input_mut` makes replays an error instead of reading freed memory.
#[test]
fn a_replaced_graph_input_is_an_error() {
    let Some(be) = backend(KernelVersion::Fast) else {
        return;
    };
    let w = ProjectorWeights::random(small_projector(64), None, 5).unwrap();
    let proj = Projector::new(be.clone(), &w).unwrap();
    let mut graph = proj.capture(1, 4).unwrap();
    let x = be
        .upload(&HostTensor::randn(vec![1, 4, 64], 6, "x").unwrap())
        .unwrap();
    graph.forward(&x).unwrap();
    *graph.input_mut() = be.alloc(&[1, 4, 64]).unwrap();
    let e = graph.replay().unwrap_err();
    assert!(e.to_string().contains("input tensor was replaced"), "{e}");
    assert!(graph.forward(&x).is_err());
    be.synchronize().unwrap();
}
