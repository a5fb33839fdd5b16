//! The CUDA backend's foundations: finding the driver and its devices, and
//! compiling CUDA C to a CUBIN with NVRTC at run time.
//!
//! Both libraries are loaded at run time (`libcuda.so.1`, `libnvrtc.so.13`), so a
//! binary built here runs, and reports what is missing, on a machine without
//! either. The dynamic loader finds them through the usual search path
//! (`LD_LIBRARY_PATH`, read once at process start, then the system cache):
//! with NVRTC from PyPI (`pip install nvidia-cuda-nvrtc==13.0.88
//! nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88`; the last gives `crt/mma.h`
//! for the f16/bf16 tensor-core kernels), put `site-packages/nvidia/cu13/lib` on
//! `LD_LIBRARY_PATH`, which also lets NVRTC open its `libnvrtc-builtins.so.13.0`.
//! `scripts/env.sh` does this.
//!
//! The loader panics on the first call into a library it cannot find, so every
//! entry point here checks that the library is present first and answers
//! [`Error::Unavailable`] instead.
//!
//! On top of that: [`Cuda`], the [`Backend`](crate::ops::Backend) that runs the
//! kernels of `kernels/*.cu` (embedded in the crate, compiled at run time for the
//! device's architecture), and [`kernel_report`], which compiles them for any
//! architecture without a GPU and reports registers, shared memory and spills.
//! Building the crate needs no CUDA toolkit.

mod alignment_loss;
mod attention;
mod backend;
mod gather_signal_tokens;
mod graph;
mod layer_norm;
mod linear;
mod program;

pub use backend::{Cuda, CudaMask, CudaOptions, CudaTensor, KernelVersion};
/// The cudarc this crate is built with, for [`Cuda::on_stream`] and
/// [`Cuda::tensor_from_slice`] (streams and slices must come from the same version).
pub use cudarc;
pub use graph::ProjectorGraph;
pub use program::{
    kernel_files, kernel_report, program_reports, KernelCache, ProgramReport, KERNEL_CACHE_ENV,
};

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::driver::result as drv;
use cudarc::driver::sys as drv_sys;
use cudarc::nvrtc::sys as nvrtc_sys;

use crate::error::{Error, Result};

/// Name of the CUDA driver backend in errors.
const CUDA: &str = "cuda";
/// Name of the run-time compiler in errors.
const NVRTC: &str = "nvrtc";

/// Environment variable naming the folder that holds `cuda_fp16.h` and `cuda_bf16.h`.
pub const INCLUDE_ENV: &str = "OUTPROJ_CUDA_INCLUDE";

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    /// Driver ordinal (what `CUDA_VISIBLE_DEVICES` leaves visible, in order).
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (i32, i32),
    /// Total device memory in bytes.
    pub memory_bytes: usize,
}

impl CudaDeviceInfo {
    /// The NVRTC architecture the backend compiles for on this device, e.g.
    /// `sm_80`, or `sm_90a` on sm_90 ([`device_arch`]).
    pub fn arch(&self) -> String {
        device_arch(self.compute_capability.0, self.compute_capability.1)
    }
}

/// The architecture kernels are compiled for on a device of compute
/// capability `major.minor`: `sm_XY`, and on 9.0 (H100, H200) `sm_90a`, whose
/// own instructions (warpgroup MMA) its kernels use; an sm_90a CUBIN runs on
/// 9.0 devices only, which is all it is loaded on.
pub fn device_arch(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// The NVRTC library found, and where the CUDA headers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvrtcInfo {
    /// NVRTC's (major, minor) version, e.g. (13, 0).
    pub version: (i32, i32),
    /// Folder holding `cuda_fp16.h` / `cuda_bf16.h`, if one was found
    /// (see [`cuda_include_dir`]).
    pub include_dir: Option<PathBuf>,
}

/// What ptxas reported about one kernel (entry function) of a CUBIN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelReport {
    /// The kernel's symbol: the plain name for `extern "C"` kernels, the
    /// mangled C++ name otherwise.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, in bytes.
    pub shared_bytes: u32,
    /// Bytes of registers spilled to local memory (stores).
    pub spill_stores: u32,
    /// Bytes of registers reloaded from local memory.
    pub spill_loads: u32,
    /// Per-thread stack frame, in bytes.
    pub stack_bytes: u32,
}

/// A compiled program: the CUBIN, ptxas's per-kernel report and NVRTC's full log.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The device code, ready for `cuModuleLoadData`.
    pub cubin: Vec<u8>,
    /// One entry per kernel, in the order ptxas compiled them.
    pub kernels: Vec<KernelReport>,
    /// The compiler's log (warnings and the ptxas report).
    pub log: String,
}

impl Compiled {
    /// The report for the kernel called `name`, if the program has one.
    pub fn kernel(&self, name: &str) -> Option<&KernelReport> {
        self.kernels.iter().find(|k| k.name == name)
    }
}

fn unavailable(backend: &str, reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: backend.to_string(),
        reason: reason.into(),
    }
}

fn backend_error(backend: &str, message: impl Into<String>) -> Error {
    Error::Backend {
        backend: backend.to_string(),
        message: message.into(),
    }
}

/// Runs `f`, turning a panic inside the loaded library's bindings (a missing
/// symbol in an old library, say) into an error instead of unwinding into the
/// caller.
fn no_panic<T>(backend: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let what = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(backend_error(
                backend,
                format!("the {backend} library binding failed: {what}"),
            ))
        }
    }
}

/// True when the CUDA driver library (`libcuda.so`) can be loaded.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries to dlopen a list of library names and
    // drops each handle; loading libcuda runs no code that depends on our state.
    *PRESENT.get_or_init(|| unsafe { drv_sys::is_culib_present() })
}

/// True when NVRTC (`libnvrtc.so.13`) can be loaded.
pub fn nvrtc_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: as in `driver_present`: a dlopen attempt per candidate name.
    *PRESENT.get_or_init(|| unsafe { nvrtc_sys::is_culib_present() })
}

fn require_driver() -> Result<()> {
    if driver_present() {
        Ok(())
    } else {
        Err(unavailable(
            CUDA,
            "the CUDA driver library (libcuda.so.1) was not found: this machine has no \
             NVIDIA driver, or its folder is not on LD_LIBRARY_PATH",
        ))
    }
}

fn require_nvrtc() -> Result<()> {
    if nvrtc_present() {
        Ok(())
    } else {
        Err(unavailable(
            NVRTC,
            "libnvrtc.so.13 was not found: install it with `pip install \
             nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88` and put \
             site-packages/nvidia/cu13/lib on LD_LIBRARY_PATH (scripts/env.sh does both), \
             or install the CUDA 13.0 toolkit",
        ))
    }
}

fn driver_error_text(err: drv::DriverError) -> String {
    let name = err
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", err.0));
    match err.error_string() {
        Ok(text) => format!("{name} ({})", text.to_string_lossy()),
        Err(_) => name,
    }
}

/// Lists the CUDA devices the driver sees.
///
/// No driver library, a driver that fails to initialise, or zero devices are all
/// [`Error::Unavailable`] with the reason; a later failure is [`Error::Backend`].
pub fn probe_devices() -> Result<Vec<CudaDeviceInfo>> {
    require_driver()?;
    no_panic(CUDA, || {
        drv::init()
            .map_err(|e| unavailable(CUDA, format!("cuInit failed: {}", driver_error_text(e))))?;
        let count = drv::device::get_count().map_err(|e| {
            unavailable(
                CUDA,
                format!("cuDeviceGetCount failed: {}", driver_error_text(e)),
            )
        })?;
        if count <= 0 {
            return Err(unavailable(CUDA, "the CUDA driver found no device"));
        }
        let mut devices = Vec::with_capacity(count as usize);
        for ordinal in 0..count {
            devices.push(device_info(ordinal)?);
        }
        Ok(devices)
    })
}

fn device_info(ordinal: c_int) -> Result<CudaDeviceInfo> {
    let fail = |what: &str, e: drv::DriverError| {
        backend_error(
            CUDA,
            format!(
                "{what} for device {ordinal} failed: {}",
                driver_error_text(e)
            ),
        )
    };
    let dev = drv::device::get(ordinal).map_err(|e| fail("cuDeviceGet", e))?;

    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for `buf.len()` bytes, the length passed is
    // that size, and `dev` came from cuDeviceGet.
    unsafe { drv_sys::cuDeviceGetName(buf.as_mut_ptr().cast::<c_char>(), buf.len() as c_int, dev) }
        .result()
        .map_err(|e| fail("cuDeviceGetName", e))?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();

    use drv_sys::CUdevice_attribute::{
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR,
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
    };
    // SAFETY: `dev` is a device handle returned by cuDeviceGet above.
    let major = unsafe { drv::device::get_attribute(dev, MAJOR) }
        .map_err(|e| fail("cuDeviceGetAttribute(major)", e))?;
    // SAFETY: as above.
    let minor = unsafe { drv::device::get_attribute(dev, MINOR) }
        .map_err(|e| fail("cuDeviceGetAttribute(minor)", e))?;
    // SAFETY: as above.
    let memory_bytes =
        unsafe { drv::device::total_mem(dev) }.map_err(|e| fail("cuDeviceTotalMem", e))?;

    Ok(CudaDeviceInfo {
        ordinal: ordinal as usize,
        name,
        compute_capability: (major, minor),
        memory_bytes,
    })
}

/// The folder holding the CUDA headers (`cuda_fp16.h`, `cuda_bf16.h`), looked
/// for in this order:
/// 1. `$OUTPROJ_CUDA_INCLUDE` when it names a folder (taken as given),
/// 2. `$CUDA_HOME/include`, then `$CUDA_PATH/include`,
/// 3. `/usr/local/cuda/include`,
///
/// where 2 and 3 count only when they hold `cuda_fp16.h`.
pub fn cuda_include_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(INCLUDE_ENV).filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let has_headers = |dir: &Path| dir.join("cuda_fp16.h").is_file();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let dir = PathBuf::from(home).join("include");
            if has_headers(&dir) {
                return Some(dir);
            }
        }
    }
    let dir = PathBuf::from("/usr/local/cuda/include");
    has_headers(&dir).then_some(dir)
}

/// Reports NVRTC's version and where the CUDA headers are.
pub fn probe_nvrtc() -> Result<NvrtcInfo> {
    require_nvrtc()?;
    no_panic(NVRTC, || {
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: both pointers point to live, writable c_ints.
        unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| {
                unavailable(
                    NVRTC,
                    format!("nvrtcVersion failed: {}", nvrtc_error_text(e)),
                )
            })?;
        Ok(NvrtcInfo {
            version: (major, minor),
            include_dir: cuda_include_dir(),
        })
    })
}

fn nvrtc_error_text(err: cudarc::nvrtc::result::NvrtcError) -> String {
    // SAFETY: nvrtcGetErrorString returns a pointer to a static NUL-terminated
    // string (or null, checked) for any result code.
    let text = unsafe {
        let ptr = nvrtc_sys::nvrtcGetErrorString(err.0);
        if ptr.is_null() {
            None
        } else {
            Some(CStr::from_ptr(ptr).to_string_lossy().into_owned())
        }
    };
    text.unwrap_or_else(|| format!("{:?}", err.0))
}

/// Owns an `nvrtcProgram` and destroys it on every exit path.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `self.0` was created by nvrtcCreateProgram and is destroyed only
        // here, once. A failure to free is ignored: nothing can be done about it.
        let _ = unsafe { nvrtc_sys::nvrtcDestroyProgram(&mut self.0) };
    }
}

impl Program {
    fn log(&self) -> Result<String> {
        let mut size: usize = 0;
        // SAFETY: `self.0` is a live program; `size` is a writable usize.
        unsafe { nvrtc_sys::nvrtcGetProgramLogSize(self.0, &mut size) }
            .result()
            .map_err(|e| {
                backend_error(
                    NVRTC,
                    format!("nvrtcGetProgramLogSize: {}", nvrtc_error_text(e)),
                )
            })?;
        if size == 0 {
            return Ok(String::new());
        }
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` holds `size` bytes, the size NVRTC just reported, NUL included.
        unsafe { nvrtc_sys::nvrtcGetProgramLog(self.0, buf.as_mut_ptr().cast::<c_char>()) }
            .result()
            .map_err(|e| {
                backend_error(
                    NVRTC,
                    format!("nvrtcGetProgramLog: {}", nvrtc_error_text(e)),
                )
            })?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    fn cubin(&self) -> Result<Vec<u8>> {
        let mut size: usize = 0;
        // SAFETY: `self.0` is a live, compiled program; `size` is a writable usize.
        unsafe { nvrtc_sys::nvrtcGetCUBINSize(self.0, &mut size) }
            .result()
            .map_err(|e| {
                backend_error(NVRTC, format!("nvrtcGetCUBINSize: {}", nvrtc_error_text(e)))
            })?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` holds exactly the `size` bytes NVRTC reported for the CUBIN.
        unsafe { nvrtc_sys::nvrtcGetCUBIN(self.0, buf.as_mut_ptr().cast::<c_char>()) }
            .result()
            .map_err(|e| backend_error(NVRTC, format!("nvrtcGetCUBIN: {}", nvrtc_error_text(e))))?;
        Ok(buf)
    }
}

/// Checks an architecture name of the form `sm_<digits>[a|f]`, e.g. `sm_90`, `sm_90a`.
fn check_arch(arch: &str) -> Result<()> {
    let ok = arch
        .strip_prefix("sm_")
        .map(|rest| {
            let rest = rest
                .strip_suffix('a')
                .or_else(|| rest.strip_suffix('f'))
                .unwrap_or(rest);
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
        })
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "CUDA architecture `{arch}`: expected a real architecture such as sm_80 or sm_90 \
             (a CUBIN cannot be made for a virtual compute_XX one)"
        )))
    }
}

/// Compiles CUDA C++ `source` for `arch` (e.g. `sm_90`) into a CUBIN.
///
/// Options: `--gpu-architecture=<arch> -std=c++17 --ptxas-options=-v
/// --generate-line-info`, plus `--include-path=<dir>` when [`cuda_include_dir`]
/// finds the CUDA headers. Fast math is not enabled. `program_name` names the
/// source in diagnostics.
///
/// A compile error is [`Error::Backend`] whose message holds NVRTC's log.
pub fn compile(source: &str, program_name: &str, arch: &str) -> Result<Compiled> {
    compile_with_headers(source, program_name, arch, &[])
}

/// The options [`compile`] passes to NVRTC for `arch`, without the include path.
pub fn compile_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
        "--generate-line-info".to_string(),
    ]
}

/// [`compile`] with in-memory headers: each `(name, text)` pair can be included
/// by the source as `#include "name"`.
pub fn compile_with_headers(
    source: &str,
    program_name: &str,
    arch: &str,
    headers: &[(&str, &str)],
) -> Result<Compiled> {
    check_arch(arch)?;
    let src = CString::new(source)
        .map_err(|_| Error::invalid(format!("CUDA source `{program_name}` contains a NUL byte")))?;
    let name = CString::new(program_name).map_err(|_| {
        Error::invalid(format!("program name {program_name:?} contains a NUL byte"))
    })?;
    let mut options = compile_options(arch);
    if let Some(dir) = cuda_include_dir() {
        options.push(format!("--include-path={}", dir.display()));
    }
    let options = options
        .into_iter()
        .map(|o| {
            CString::new(o).map_err(|_| Error::invalid("CUDA include path contains a NUL byte"))
        })
        .collect::<Result<Vec<CString>>>()?;
    let header_texts = headers
        .iter()
        .map(|(name, text)| {
            CString::new(*text)
                .map_err(|_| Error::invalid(format!("CUDA header `{name}` contains a NUL byte")))
        })
        .collect::<Result<Vec<CString>>>()?;
    let header_names = headers
        .iter()
        .map(|(name, _)| {
            CString::new(*name).map_err(|_| {
                Error::invalid(format!("CUDA header name {name:?} contains a NUL byte"))
            })
        })
        .collect::<Result<Vec<CString>>>()?;
    let header_text_ptrs: Vec<*const c_char> = header_texts.iter().map(|h| h.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|h| h.as_ptr()).collect();
    let header_count =
        c_int::try_from(headers.len()).map_err(|_| Error::invalid("too many CUDA headers"))?;

    require_nvrtc()?;
    no_panic(NVRTC, || {
        let mut raw: nvrtc_sys::nvrtcProgram = std::ptr::null_mut();
        // SAFETY: `src`, `name` and every header text and name are NUL-terminated
        // and outlive the program (it is destroyed at the end of this closure,
        // before they drop); the two header arrays hold `header_count` pointers
        // each (null arrays when there are none).
        unsafe {
            nvrtc_sys::nvrtcCreateProgram(
                &mut raw,
                src.as_ptr(),
                name.as_ptr(),
                header_count,
                if headers.is_empty() {
                    std::ptr::null()
                } else {
                    header_text_ptrs.as_ptr()
                },
                if headers.is_empty() {
                    std::ptr::null()
                } else {
                    header_name_ptrs.as_ptr()
                },
            )
        }
        .result()
        .map_err(|e| {
            backend_error(
                NVRTC,
                format!("nvrtcCreateProgram: {}", nvrtc_error_text(e)),
            )
        })?;
        let program = Program(raw);

        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: `program.0` is live; `option_ptrs` holds `options.len()` pointers
        // to NUL-terminated strings that live until after this call.
        let status = unsafe {
            nvrtc_sys::nvrtcCompileProgram(
                program.0,
                option_ptrs.len() as c_int,
                option_ptrs.as_ptr(),
            )
        }
        .result();
        let log = program.log()?;
        if let Err(e) = status {
            let hint = if log.contains("libnvrtc-builtins") {
                "\n(put the folder holding libnvrtc-builtins.so.13.0, next to libnvrtc.so.13, \
                 on LD_LIBRARY_PATH before the program starts; scripts/env.sh does this)"
            } else {
                ""
            };
            return Err(backend_error(
                NVRTC,
                format!(
                    "compiling `{program_name}` for {arch} failed ({}):\n{}{hint}",
                    nvrtc_error_text(e),
                    log.trim_end()
                ),
            ));
        }
        let cubin = program.cubin()?;
        if cubin.is_empty() {
            return Err(backend_error(
                NVRTC,
                format!(
                    "compiling `{program_name}` for {arch} produced no CUBIN:\n{}",
                    log.trim_end()
                ),
            ));
        }
        let kernels = parse_ptxas_report(&log);
        Ok(Compiled {
            cubin,
            kernels,
            log,
        })
    })
}

/// Parses the `ptxas info` lines of an NVRTC/nvcc log (`--ptxas-options=-v`)
/// into one [`KernelReport`] per entry function.
///
/// The lines it reads look like:
/// ```text
/// ptxas info    : Compiling entry function 'axpy' for 'sm_90'
/// ptxas info    : Function properties for axpy
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 12 registers, used 1 barriers, 4096 bytes smem, 368 bytes cmem[0]
/// ```
/// Non-entry (device) functions get "Function properties" lines too; they are
/// not reported.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelReport> {
    let mut kernels: Vec<KernelReport> = Vec::new();
    // Index in `kernels` of the entry function being compiled ("Used N registers").
    let mut current: Option<usize> = None;
    // Name from the last "Function properties for" line (for the next stack line).
    let mut properties_of: Option<String> = None;

    let index_of = |kernels: &mut Vec<KernelReport>, name: &str| -> usize {
        match kernels.iter().position(|k| k.name == name) {
            Some(i) => i,
            None => {
                kernels.push(KernelReport {
                    name: name.to_string(),
                    ..KernelReport::default()
                });
                kernels.len() - 1
            }
        }
    };

    for line in log.lines() {
        let line = line.trim();
        let info = line
            .strip_prefix("ptxas info")
            .map(|rest| rest.trim_start().trim_start_matches(':').trim());
        if let Some(info) = info {
            if let Some(rest) = info.strip_prefix("Compiling entry function") {
                if let Some(name) = quoted(rest) {
                    current = Some(index_of(&mut kernels, name));
                }
                properties_of = None;
            } else if let Some(rest) = info.strip_prefix("Function properties for") {
                properties_of = Some(rest.trim().to_string());
            } else if info.starts_with("Used ") {
                if let Some(i) = current {
                    let k = &mut kernels[i];
                    for part in info.split(',') {
                        let part = part.trim();
                        if let Some(n) = number_before(part, " registers") {
                            k.registers = n;
                        } else if let Some(n) = number_before(part, " bytes smem") {
                            k.shared_bytes = n;
                        }
                    }
                }
                properties_of = None;
            }
        } else if line.contains("bytes stack frame") {
            if let Some(name) = properties_of.take() {
                // Only entry functions are reported; the properties line may come
                // before or after "Compiling entry function", so look it up lazily.
                let is_entry = kernels.iter().any(|k| k.name == name)
                    || log.contains(&format!("Compiling entry function '{name}'"));
                if is_entry {
                    let i = index_of(&mut kernels, &name);
                    let k = &mut kernels[i];
                    for part in line.split(',') {
                        let part = part.trim();
                        if let Some(n) = number_before(part, " bytes stack frame") {
                            k.stack_bytes = n;
                        } else if let Some(n) = number_before(part, " bytes spill stores") {
                            k.spill_stores = n;
                        } else if let Some(n) = number_before(part, " bytes spill loads") {
                            k.spill_loads = n;
                        }
                    }
                }
            }
        }
    }
    kernels
}

/// The text between the first pair of single quotes in `s`.
fn quoted(s: &str) -> Option<&str> {
    let start = s.find('\'')? + 1;
    let len = s[start..].find('\'')?;
    Some(&s[start..start + len])
}

/// Parses `"<n><suffix>"` (e.g. "12 registers" with suffix " registers") into n.
fn number_before(part: &str, suffix: &str) -> Option<u32> {
    let number = part.strip_suffix(suffix)?;
    let number = number.rsplit(' ').next().unwrap_or(number);
    number.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for helper
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'axpy' for 'sm_90'
ptxas info    : Function properties for axpy
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'reduce' for 'sm_90'
ptxas info    : Function properties for reduce
    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 372 bytes cmem[0]
";

    #[test]
    fn parses_ptxas_report() {
        let k = parse_ptxas_report(LOG);
        assert_eq!(
            k,
            vec![
                KernelReport {
                    name: "axpy".into(),
                    registers: 10,
                    ..KernelReport::default()
                },
                KernelReport {
                    name: "reduce".into(),
                    registers: 255,
                    shared_bytes: 4096,
                    spill_stores: 16,
                    spill_loads: 12,
                    stack_bytes: 24,
                },
            ]
        );
    }

    /// NVRTC 13.0's own layout: stack lines prefixed with `ptxas .`, compile
    /// times, a non-inlined device function, a mangled template kernel.
    const NVRTC_LOG: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1tILi3EEvPf' for 'sm_90'
ptxas info    : Function properties for _Z1tILi3EEvPf
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
ptxas info    : Compile time = 1.541 ms
ptxas info    : Function properties for _Z1hf
ptxas         .     16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Function properties for k
ptxas         .     0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem
ptxas info    : Compile time = 0.732 ms
";

    #[test]
    fn parses_nvrtc_layout() {
        let k = parse_ptxas_report(NVRTC_LOG);
        assert_eq!(
            k,
            vec![
                KernelReport {
                    name: "_Z1tILi3EEvPf".into(),
                    registers: 8,
                    ..KernelReport::default()
                },
                KernelReport {
                    name: "k".into(),
                    registers: 40,
                    shared_bytes: 2048,
                    spill_stores: 8,
                    spill_loads: 8,
                    stack_bytes: 0,
                },
            ]
        );
    }

    #[test]
    fn empty_log_gives_no_kernels() {
        assert!(parse_ptxas_report("").is_empty());
        assert!(parse_ptxas_report("garbage\nptxas info : Used x registers").is_empty());
    }

    #[test]
    fn rejects_virtual_or_malformed_arch() {
        for bad in ["compute_90", "sm_", "sm_9x", "90", ""] {
            assert!(matches!(check_arch(bad), Err(Error::Invalid(_))), "{bad}");
        }
        for good in ["sm_80", "sm_90", "sm_90a", "sm_100f"] {
            assert!(check_arch(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn nul_in_source_is_an_error() {
        assert!(matches!(
            compile("a\0b", "x", "sm_90"),
            Err(Error::Invalid(_))
        ));
    }
}
