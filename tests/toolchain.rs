//! The toolchains the GPU backends stand on: a wgpu adapter that computes,
//! NVRTC that compiles CUDA C (with the fp16/bf16 headers) to a CUBIN, and a
//! CUDA driver probe that answers instead of panicking.
//!
//! Where a toolchain is missing the test says so in one line and passes, unless
//! `REQUIRE_WGPU=1` / `REQUIRE_NVRTC=1` asks for it (as CI does): then a missing
//! toolchain fails with the reason.

#[allow(dead_code)]
fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::required;
    use output_projector::wgpu::{probe, smoke_test};

    #[test]
    fn adapter_computes() {
        let info = match probe() {
            Ok(info) => info,
            Err(e) if required("REQUIRE_WGPU") => panic!("REQUIRE_WGPU=1 but {e}"),
            Err(e) => {
                println!("skipped: wgpu unavailable: {e}");
                return;
            }
        };
        println!("wgpu adapter: {info}");
        assert!(!info.adapter.is_empty());
        assert!(
            info.max_workgroup_storage >= 16 * 1024,
            "workgroup memory {} < 16 KiB",
            info.max_workgroup_storage
        );
        if let Err(e) = smoke_test() {
            panic!("smoke test on {}: {e}", info.adapter);
        }
    }
}

#[cfg(feature = "cuda")]
mod nvrtc {
    use super::required;
    use output_projector::cuda::{compile, probe_nvrtc, KernelReport, NvrtcInfo};
    use output_projector::Error;

    /// Two kernels using the fp16 and bf16 headers, one of them with shared memory.
    const KERNELS: &str = r#"
#include <cuda_fp16.h>
#include <cuda_bf16.h>

extern "C" __global__ void scale_f16(const __half* __restrict__ x, __half* __restrict__ y,
                                     float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = __float2half(a * __half2float(x[i]));
    }
}

extern "C" __global__ void sum_bf16(const __nv_bfloat16* __restrict__ x, float* __restrict__ out,
                                    int n) {
    __shared__ float partial[256];
    float acc = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        acc += __bfloat162float(x[i]);
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            partial[threadIdx.x] += partial[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        atomicAdd(out, partial[0]);
    }
}
"#;

    fn nvrtc_or_skip() -> Option<NvrtcInfo> {
        match probe_nvrtc() {
            Ok(info) => Some(info),
            Err(e) if required("REQUIRE_NVRTC") => panic!("REQUIRE_NVRTC=1 but {e}"),
            Err(e) => {
                println!("skipped: nvrtc unavailable: {e}");
                None
            }
        }
    }

    #[test]
    fn compiles_fp16_bf16_kernels_to_cubin() {
        let Some(info) = nvrtc_or_skip() else { return };
        println!(
            "nvrtc {}.{}, CUDA headers: {}",
            info.version.0,
            info.version.1,
            info.include_dir
                .as_ref()
                .map_or("none found".to_string(), |d| d.display().to_string())
        );
        if info.include_dir.is_none() {
            let msg =
                "no CUDA include folder (set OUTPROJ_CUDA_INCLUDE to the folder with cuda_fp16.h)";
            if required("REQUIRE_NVRTC") {
                panic!("REQUIRE_NVRTC=1 but {msg}");
            }
            println!("skipped: nvrtc unavailable: {msg}");
            return;
        }
        for arch in ["sm_80", "sm_90", "sm_90a"] {
            let compiled =
                compile(KERNELS, "toolchain.cu", arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
            // An ELF image.
            assert!(
                compiled.cubin.len() > 64,
                "{arch}: CUBIN of {} bytes",
                compiled.cubin.len()
            );
            assert_eq!(&compiled.cubin[..4], b"\x7fELF", "{arch}: CUBIN is not ELF");
            let mut names: Vec<&str> = compiled.kernels.iter().map(|k| k.name.as_str()).collect();
            names.sort_unstable();
            assert_eq!(
                names,
                ["scale_f16", "sum_bf16"],
                "{arch}: log:\n{}",
                compiled.log
            );
            for k in &compiled.kernels {
                println!(
                    "{arch} {}: {} registers, {} B smem, {} B stack, spill {} B stores / {} B loads",
                    k.name, k.registers, k.shared_bytes, k.stack_bytes, k.spill_stores, k.spill_loads
                );
                assert_registers_without_spills(arch, k);
            }
            let sum = compiled.kernel("sum_bf16").expect("sum_bf16 reported");
            assert_eq!(sum.shared_bytes, 256 * 4, "{arch}: sum_bf16 shared memory");
            assert_eq!(
                compiled.kernel("scale_f16").map(|k| k.shared_bytes),
                Some(0)
            );
        }
    }

    /// A plausible register count and no spills.
    fn assert_registers_without_spills(arch: &str, k: &KernelReport) {
        assert!(
            (2..=255).contains(&k.registers),
            "{arch} {}: implausible register count {}",
            k.name,
            k.registers
        );
        assert_eq!(
            (k.spill_stores, k.spill_loads),
            (0, 0),
            "{arch} {}: spills",
            k.name
        );
    }

    /// The tensor-core kernels of every architecture's compiles (TF32 in the
    /// f32 one), sorted.
    const TENSOR_CORE_KERNELS: [&str; 13] = [
        "linear_mma_narrow_vec8_bf16",
        "linear_mma_narrow_vec8_f16",
        "linear_mma_vec8_bf16",
        "linear_mma_vec8_f16",
        "linear_tc_large_vec8_bf16",
        "linear_tc_large_vec8_f16",
        "linear_tc_scalar_bf16",
        "linear_tc_scalar_f16",
        "linear_tc_tf32_large_vec4",
        "linear_tc_tf32_scalar",
        "linear_tc_tf32_vec4",
        "linear_tc_vec8_bf16",
        "linear_tc_vec8_f16",
    ];

    /// The warpgroup-MMA kernels, which sm_90a's 16-bit compiles add.
    const WGMMA_KERNELS: [&str; 10] = [
        "linear_layer_norm_wgmma_vec8_bf16",
        "linear_layer_norm_wgmma_vec8_f16",
        "linear_wgmma_narrow_vec8_bf16",
        "linear_wgmma_narrow_vec8_f16",
        "linear_wgmma_serial_narrow_vec8_bf16",
        "linear_wgmma_serial_narrow_vec8_f16",
        "linear_wgmma_serial_vec8_bf16",
        "linear_wgmma_serial_vec8_f16",
        "linear_wgmma_vec8_bf16",
        "linear_wgmma_vec8_f16",
    ];

    /// What every kernel compiled for `arch` must be, as (file, storage,
    /// ptxas's report) rows: printed, no spills, plausible registers, static
    /// shared memory within 48 KiB, and the tensor-core kernels all there.
    fn check_kernels(arch: &str, kernels: &[(String, String, KernelReport)]) {
        let mut tc: Vec<&str> = kernels
            .iter()
            .map(|(_, _, k)| k.name.as_str())
            .filter(|n| {
                n.starts_with("linear_tc_") || n.starts_with("linear_mma_") || n.contains("wgmma")
            })
            .collect();
        tc.sort();
        let mut want = TENSOR_CORE_KERNELS.to_vec();
        if arch == "sm_90a" {
            want.extend(WGMMA_KERNELS);
            want.sort();
        }
        assert_eq!(tc, want, "{arch}: the tensor-core kernels");
        for (file, storage, k) in kernels {
            println!(
                "{arch} {file:<24} {storage:<4} {:<36} {:>3} registers {:>6} B smem {:>4} B stack, spill {} B stores / {} B loads",
                k.name, k.registers, k.shared_bytes, k.stack_bytes, k.spill_stores, k.spill_loads
            );
            assert_registers_without_spills(arch, k);
            // v4's 32 sums per thread stay in registers: its transposing
            // reduction indexes them by constants only once unrolled (in the
            // kernels that compute its x too).
            if k.name.contains("linear_rows") {
                assert_eq!(k.stack_bytes, 0, "{arch} {}: local memory", k.name);
            }
            assert!(
                k.shared_bytes <= 48 * 1024,
                "{arch} {}: static smem",
                k.name
            );
        }
    }

    /// Every file of kernels/ compiles for sm_90a (what sm_90 devices take;
    /// with the host's parameter layouts asserted inside), once per storage
    /// type, without warnings (ptxas's note that wgmma instructions were
    /// serialized among them), and its kernels pass [`check_kernels`].
    /// sm_80's are checked from `outproj kernels`' table (below), so that
    /// each architecture is compiled once.
    #[test]
    fn project_kernels_compile_without_spills() {
        use output_projector::cuda::{kernel_files, program_reports};
        if nvrtc_or_skip().is_none() {
            return;
        }
        let arch = "sm_90a";
        let reports = program_reports(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        // Every file, once per storage type (f32, f16, bf16).
        let files: Vec<&str> = kernel_files().into_iter().flat_map(|f| [f, f, f]).collect();
        assert_eq!(reports.iter().map(|p| p.file).collect::<Vec<_>>(), files);
        for p in &reports {
            assert!(p.cubin_bytes > 64, "{arch} {}: empty CUBIN", p.file);
            assert!(!p.kernels.is_empty(), "{arch} {}: no kernels", p.file);
            assert!(p.warnings.is_empty(), "{arch} {}: {:?}", p.file, p.warnings);
        }
        let kernels: Vec<_> = reports
            .iter()
            .flat_map(|p| {
                p.kernels
                    .iter()
                    .map(|k| (p.file.to_string(), p.storage.name().to_string(), k.clone()))
            })
            .collect();
        check_kernels(arch, &kernels);
        // The emulated sm_90 device of tests/cuda_ops.rs
        // (`backend_runs_on_emulated_driver`) loads its kernels from here
        // rather than compile them again: scripts/test.sh runs this first.
        let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-cache");
        for p in &reports {
            p.store_in_cache(&cache)
                .unwrap_or_else(|e| panic!("{arch} {}: {e}", p.file));
        }
    }

    /// `outproj kernels`' table as (file, storage, report) rows, and its last
    /// line.
    fn parse_kernel_table(stdout: &str) -> (Vec<(String, String, KernelReport)>, String) {
        let lines: Vec<&str> = stdout.lines().collect();
        let (last, rows) = lines.split_last().expect("a table");
        let number = |s: &str| -> u32 { s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}")) };
        let rows = rows[1..]
            .iter()
            .map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                assert_eq!(f.len(), 7, "{line}");
                let (st, ld) = f[6].split_once('/').expect("spill st/ld");
                let report = KernelReport {
                    name: f[2].to_string(),
                    registers: number(f[3]),
                    shared_bytes: number(f[4]),
                    stack_bytes: number(f[5]),
                    spill_stores: number(st),
                    spill_loads: number(ld),
                };
                (f[0].to_string(), f[1].to_string(), report)
            })
            .collect();
        (rows, last.to_string())
    }

    /// `outproj kernels --cubin-dir` for sm_80 prints a table whose kernels
    /// pass [`check_kernels`] and writes one CUBIN (an ELF file) per kernel
    /// file and storage type, the same ones `--kernel-cache` stores under the
    /// cache's names (copied into the tests' shared kernel cache); a path
    /// that is a file is an error naming it.
    #[test]
    fn kernels_command_writes_cubins() {
        use std::process::Command;
        if nvrtc_or_skip().is_none() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("outproj-cubins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = dir.with_extension("cache");
        let _ = std::fs::remove_dir_all(&cache);
        let out = Command::new(env!("CARGO_BIN_EXE_outproj"))
            .args(["kernels", "--arch", "sm_80", "--cubin-dir"])
            .arg(&dir)
            .arg("--kernel-cache")
            .arg(&cache)
            .output()
            .expect("running outproj");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let files = output_projector::cuda::kernel_files();
        let (kernels, last) = parse_kernel_table(&String::from_utf8_lossy(&out.stdout));
        check_kernels("sm_80", &kernels);
        let compiles = 3 * files.len();
        assert!(
            last.starts_with(&format!("{} kernels in {compiles} compiles", kernels.len()))
                && last.ends_with("for sm_80; none spills"),
            "{last}"
        );
        for file in &files {
            for storage in ["f32", "f16", "bf16"] {
                let stem = file.trim_end_matches(".cu");
                let path = dir.join(format!("{stem}-{storage}-sm_80.cubin"));
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
                assert!(bytes.starts_with(b"\x7fELF"), "{path:?} is not an ELF file");
            }
        }
        let count = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(count, 3 * files.len());
        let contents = |dir: &std::path::Path| {
            let mut all: Vec<(Vec<u8>, bool)> = std::fs::read_dir(dir)
                .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
                .map(|e| {
                    let path = e.expect("a folder entry").path();
                    let name = path.file_name().unwrap_or_default().to_string_lossy();
                    let cache_name = name.contains("-sm_80-nvrtc") && name.ends_with(".cubin");
                    (std::fs::read(&path).expect("a CUBIN"), cache_name)
                })
                .collect();
            all.sort();
            all
        };
        let cached = contents(&cache);
        assert!(cached.iter().all(|(_, cache_name)| *cache_name));
        let written: Vec<Vec<u8>> = contents(&dir).into_iter().map(|(b, _)| b).collect();
        assert_eq!(
            cached.into_iter().map(|(b, _)| b).collect::<Vec<_>>(),
            written,
            "--kernel-cache stores what --cubin-dir writes"
        );
        let not_a_dir = dir.join("linear-f32-sm_80.cubin");
        let out = Command::new(env!("CARGO_BIN_EXE_outproj"))
            .args(["kernels", "--arch", "sm_80", "--cubin-dir"])
            .arg(&not_a_dir)
            .output()
            .expect("running outproj");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("--cubin-dir"),
            "{stderr}"
        );
        // The emulated sm_80 of tests/cuda_ops.rs loads them from the shared
        // cache, as the sm_90a device loads those compiled above.
        let shared = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-cache");
        std::fs::create_dir_all(&shared).unwrap_or_else(|e| panic!("{shared:?}: {e}"));
        for entry in std::fs::read_dir(&cache).unwrap_or_else(|e| panic!("{cache:?}: {e}")) {
            let path = entry.expect("a folder entry").path();
            let to = shared.join(path.file_name().expect("a file name"));
            std::fs::copy(&path, &to).unwrap_or_else(|e| panic!("{path:?} to {to:?}: {e}"));
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&cache);
    }

    #[test]
    fn syntax_error_is_an_error_with_the_log() {
        if nvrtc_or_skip().is_none() {
            return;
        }
        let source = "extern \"C\" __global__ void broken(float* y) { y[0] = undeclared_name + ; }";
        match compile(source, "broken.cu", "sm_90") {
            Err(Error::Backend { backend, message }) => {
                assert_eq!(backend, "nvrtc");
                assert!(
                    message.contains("broken.cu"),
                    "message lacks the program name:\n{message}"
                );
                assert!(
                    message.contains("undeclared_name"),
                    "message lacks the log:\n{message}"
                );
                assert!(
                    message.contains("error"),
                    "message lacks the error:\n{message}"
                );
            }
            Err(other) => panic!("expected a Backend error, got {other:?}"),
            Ok(c) => panic!("a syntax error compiled: log:\n{}", c.log),
        }
    }

    #[test]
    fn virtual_arch_is_rejected() {
        assert!(matches!(
            compile("extern \"C\" __global__ void k() {}", "k.cu", "compute_90"),
            Err(Error::Invalid(_))
        ));
    }
}

#[cfg(feature = "cuda")]
mod cuda_driver {
    use output_projector::cuda::probe_devices;
    use output_projector::Error;

    #[test]
    fn probe_answers_without_panicking() {
        match probe_devices() {
            Ok(devices) => {
                assert!(!devices.is_empty(), "Ok with no devices");
                for d in &devices {
                    println!(
                        "cuda device {}: {} (sm_{}{}, {:.1} GiB)",
                        d.ordinal,
                        d.name,
                        d.compute_capability.0,
                        d.compute_capability.1,
                        d.memory_bytes as f64 / (1u64 << 30) as f64
                    );
                    assert!(d.compute_capability.0 >= 3);
                    assert!(d.memory_bytes > 0);
                }
            }
            Err(Error::Unavailable { backend, reason }) => {
                assert_eq!(backend, "cuda");
                assert!(!reason.is_empty());
                println!("skipped: no CUDA device: {reason}");
            }
            Err(e) => panic!("unexpected error kind from probe_devices: {e:?}"),
        }
    }
}

#[cfg(feature = "wgpu")]
mod wgpu_errors {
    use super::required;
    use output_projector::wgpu::{open, probe};
    use output_projector::Error;

    const BAD_WGSL: &str =
        "@compute @workgroup_size(1) fn main() { let x: f32 = undefined_thing; }";

    fn source(text: &str) -> ::wgpu::ShaderModuleDescriptor<'_> {
        ::wgpu::ShaderModuleDescriptor {
            label: Some("bad"),
            source: ::wgpu::ShaderSource::Wgsl(text.into()),
        }
    }

    #[test]
    fn invalid_shader_is_an_error_not_a_panic() {
        match probe() {
            Ok(_) => {}
            Err(e) if required("REQUIRE_WGPU") => panic!("REQUIRE_WGPU=1 but {e}"),
            Err(e) => {
                println!("skipped: wgpu unavailable: {e}");
                return;
            }
        }
        let gpu = open().expect("open a device");
        match gpu.scoped("bad shader", |device, _| {
            let _ = device.create_shader_module(source(BAD_WGSL));
        }) {
            Err(Error::Backend { backend, message }) => {
                assert_eq!(backend, "wgpu");
                assert!(message.contains("bad shader"), "{message}");
                assert!(message.contains("undefined_thing"), "{message}");
            }
            other => panic!("expected a Backend error, got {other:?}"),
        }
        // An error outside any scope reaches the non-panicking handler and is
        // reported by the next scoped call.
        let _ = gpu.device.create_shader_module(source(BAD_WGSL));
        match gpu.scoped("after", |_, _| ()) {
            Err(Error::Backend { backend, message }) => {
                assert_eq!(backend, "wgpu");
                assert!(message.starts_with("after: "), "{message}");
                assert!(message.contains("undefined_thing"), "{message}");
            }
            other => panic!("expected the uncaptured error as a Backend error, got {other:?}"),
        }
        // And the device still works afterwards.
        assert!(gpu.scoped("clean", |_, _| ()).is_ok());
        output_projector::wgpu::smoke_test_on(&gpu).expect("device still computes");
    }
}
