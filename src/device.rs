//! Which backends exist on this machine, and why a missing one is missing.

use crate::error::{Error, Result};

/// A backend the caller can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// The best available: CUDA, then wgpu on a GPU, then the CPU backend.
    Auto,
    /// The f32 CPU backend ([`crate::cpu::Cpu`]) on every core; always available.
    Cpu,
    /// The naive float64 CPU reference ([`crate::reference::Reference`]), the
    /// oracle the other backends are checked against; always available.
    Reference,
    /// WGSL compute shaders through wgpu (Vulkan, Metal or DX12), on the best adapter
    /// or the one named by `$WGPU_ADAPTER_NAME`; needs the `wgpu` feature.
    Wgpu,
    /// CUDA device 0, kernels compiled at run time by NVRTC; needs the `cuda` feature.
    Cuda,
}

impl DeviceKind {
    /// Parses `"auto"`, `"cpu"`, `"reference"`, `"wgpu"` or `"cuda"`; anything
    /// else is [`Error::Invalid`].
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceKind::Auto),
            "cpu" => Ok(DeviceKind::Cpu),
            "reference" => Ok(DeviceKind::Reference),
            "wgpu" => Ok(DeviceKind::Wgpu),
            "cuda" => Ok(DeviceKind::Cuda),
            _ => Err(Error::invalid(format!(
                "unknown device `{s}` (expected auto, cpu, reference, wgpu or cuda)"
            ))),
        }
    }

    /// The name `parse` accepts.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Auto => "auto",
            DeviceKind::Cpu => "cpu",
            DeviceKind::Reference => "reference",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// What `outproj info` reports for one backend.
#[derive(Clone, Debug)]
pub struct BackendStatus {
    /// The backend probed (never `Auto`).
    pub kind: DeviceKind,
    /// `Ok(description)` when the backend can run the projector here,
    /// `Err(reason)` when it cannot.
    pub usable: std::result::Result<String, String>,
    /// What was found on the way (adapters, devices, compilers), usable or not.
    pub details: Vec<String>,
}

/// Probe every backend. Never panics: a missing driver or library is a reason.
pub fn survey() -> Vec<BackendStatus> {
    [
        DeviceKind::Reference,
        DeviceKind::Cpu,
        DeviceKind::Wgpu,
        DeviceKind::Cuda,
    ]
    .into_iter()
    .map(status)
    .collect()
}

/// Probe one backend.
pub fn status(kind: DeviceKind) -> BackendStatus {
    match kind {
        DeviceKind::Wgpu => wgpu_status(),
        DeviceKind::Cuda => cuda_status(),
        DeviceKind::Reference => BackendStatus {
            kind: DeviceKind::Reference,
            usable: Ok("naive float64 reference (the oracle)".into()),
            details: vec![],
        },
        DeviceKind::Cpu | DeviceKind::Auto => BackendStatus {
            kind: DeviceKind::Cpu,
            usable: crate::cpu::Cpu::open()
                .map(|c| {
                    format!(
                        "f32, or bf16 or f16 GEMMs, on {} threads ({})",
                        c.threads(),
                        c.simd()
                    )
                })
                .map_err(reason),
            details: vec![],
        },
    }
}

/// The backend `kind` resolves to here, or why it cannot be used. Only the
/// backends that `kind` can mean are probed. `Auto` passes over a wgpu
/// adapter that is itself a CPU (Mesa's lavapipe): the CPU backend is faster.
pub fn resolve(kind: DeviceKind) -> Result<DeviceKind> {
    match kind {
        DeviceKind::Auto => Ok(if status(DeviceKind::Cuda).usable.is_ok() {
            DeviceKind::Cuda
        } else if wgpu_on_a_gpu() {
            DeviceKind::Wgpu
        } else {
            DeviceKind::Cpu
        }),
        k => match status(k).usable {
            Ok(_) => Ok(k),
            Err(reason) => Err(Error::Unavailable {
                backend: k.name().into(),
                reason,
            }),
        },
    }
}

/// Whether wgpu's adapter works here and is not a CPU.
fn wgpu_on_a_gpu() -> bool {
    #[cfg(feature = "wgpu")]
    {
        crate::wgpu::probe().is_ok_and(|i| i.device_type != "Cpu")
    }
    #[cfg(not(feature = "wgpu"))]
    {
        false
    }
}

/// The reason inside an `Unavailable` error, or the whole message.
fn reason(e: Error) -> String {
    match e {
        Error::Unavailable { reason, .. } => reason,
        other => other.to_string(),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_status() -> BackendStatus {
    let (usable, details) = match crate::wgpu::probe() {
        Ok(i) => (
            Ok(format!(
                "adapter `{}` ({}, {}): f32{}, or f32 with f16 or bf16 GEMM weights",
                i.adapter,
                i.backend,
                i.device_type,
                if i.shader_f16 { ", f16" } else { "" }
            )),
            vec![format!(
                "driver {}, shader-f16 {}, subgroups {} (size {}..={}), {} B workgroup memory, kernels tuned for a {}",
                i.driver,
                i.shader_f16,
                i.subgroup,
                i.subgroup_min_size,
                i.subgroup_max_size,
                i.max_workgroup_storage,
                match crate::wgpu::Tuning::Auto.on(&i) {
                    crate::wgpu::Tuning::Cpu => "CPU",
                    _ => "GPU",
                }
            )],
        ),
        Err(e) => (Err(reason(e)), vec![]),
    };
    BackendStatus {
        kind: DeviceKind::Wgpu,
        usable,
        details,
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_status() -> BackendStatus {
    BackendStatus {
        kind: DeviceKind::Wgpu,
        usable: Err("built without the `wgpu` cargo feature".into()),
        details: vec![],
    }
}

#[cfg(feature = "cuda")]
fn cuda_status() -> BackendStatus {
    let mut details = Vec::new();
    let devices = crate::cuda::probe_devices();
    // When there is no device, the reason is the status line itself.
    if let Ok(ds) = &devices {
        for d in ds {
            details.push(format!(
                "device {}: {} (sm_{}{}, {:.1} GiB)",
                d.ordinal,
                d.name,
                d.compute_capability.0,
                d.compute_capability.1,
                d.memory_bytes as f64 / (1u64 << 30) as f64
            ));
        }
    }
    let nvrtc = crate::cuda::probe_nvrtc();
    if let Ok(n) = &nvrtc {
        details.push(format!(
            "NVRTC {}.{}, CUDA headers {}",
            n.version.0,
            n.version.1,
            n.include_dir
                .as_ref()
                .map_or("not found".to_string(), |p| p.display().to_string())
        ));
    }
    let usable = match (devices, nvrtc) {
        (Ok(ds), Ok(n)) => Ok(match ds.first() {
            Some(d) => format!(
                "{} (sm_{}{}), kernels compiled for {} at run time by NVRTC {}.{}",
                d.name,
                d.compute_capability.0,
                d.compute_capability.1,
                d.arch(),
                n.version.0,
                n.version.1
            ),
            None => "a CUDA device".to_string(),
        }),
        (Ok(_), Err(e)) => Err(format!("a CUDA device was found, but {}", reason(e))),
        (Err(e), _) => Err(reason(e)),
    };
    BackendStatus {
        kind: DeviceKind::Cuda,
        usable,
        details,
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_status() -> BackendStatus {
    BackendStatus {
        kind: DeviceKind::Cuda,
        usable: Err("built without the `cuda` cargo feature".into()),
        details: vec![],
    }
}

/// The number format a backend computes in. Sums are f32 in every case; the
/// CPU backend keeps f32 but for its GEMMs in bf16 or f16; the reference
/// computes in f64 and takes only `F32` (the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 storage and f32 arithmetic throughout; the default.
    #[default]
    F32,
    /// f32 storage, GEMMs on tensor cores with TF32 inputs (CUDA, sm_80+).
    Tf32,
    /// f16 storage (CUDA sm_80+, or wgpu with shader-f16); on the CPU, the
    /// GEMMs' weights and inputs in f16
    /// ([`CpuOptions::precision`](crate::cpu::CpuOptions::precision)).
    F16,
    /// bf16 storage (CUDA sm_80+); on the CPU, the GEMMs' weights and
    /// inputs in bf16 ([`CpuOptions::precision`](crate::cpu::CpuOptions::precision));
    /// on wgpu, f32 tensors and the GEMMs' weights in bf16
    /// ([`WgpuOptions::weights`](crate::wgpu::WgpuOptions::weights), any adapter).
    Bf16,
}

impl Precision {
    /// Parses `"f32"`, `"tf32"`, `"f16"` or `"bf16"`; anything else is [`Error::Invalid`].
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "f16" => Ok(Precision::F16),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::invalid(format!(
                "unknown precision `{s}` (expected f32, tf32, f16 or bf16)"
            ))),
        }
    }

    /// The name `parse` accepts: `"f32"`, `"tf32"`, `"f16"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }

    /// The element type tensors are stored in.
    pub fn storage(self) -> crate::tensor::DType {
        use crate::tensor::DType;
        match self {
            Precision::F32 | Precision::Tf32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// Machine epsilon of the coarsest type a value passes through: the
    /// storage type's, or for TF32 its products' 10-bit mantissa (2^-10).
    pub fn epsilon(self) -> f64 {
        match self {
            Precision::Tf32 => crate::tensor::DType::F16.epsilon(),
            _ => self.storage().epsilon(),
        }
    }

    /// Whether backend `kind` computes in this precision (CUDA: all of them;
    /// wgpu: f32, f16 and bf16 (its GEMMs' weights); the CPU: f32, bf16 and f16
    /// (its GEMMs); the reference: f32, in float64).
    pub fn runs_on(self, kind: DeviceKind) -> bool {
        match kind {
            DeviceKind::Cuda => true,
            DeviceKind::Wgpu => self != Precision::Tf32,
            DeviceKind::Cpu | DeviceKind::Auto => self != Precision::Tf32,
            DeviceKind::Reference => self == Precision::F32,
        }
    }

    /// Relative-error limits against the float64 reference: (single op,
    /// whole projector). f32: rounding of f32 sums; TF32, f16 and bf16: the
    /// 10- or 7-bit mantissa of the stored or multiplied values, measured in
    /// the tests at a third or less of these.
    pub fn tolerances(self) -> (f64, f64) {
        match self {
            Precision::F32 => (1e-5, 1e-4),
            Precision::Tf32 | Precision::F16 | Precision::Bf16 => (1e-2, 2e-2),
        }
    }
}

/// Work to run on whichever backend a [`DeviceKind`] resolves to: the generic
/// method is instantiated once per backend compiled in.
pub trait BackendTask: Sized {
    /// What the task returns.
    type Output;
    /// Run the task on `backend`; `kind` names it (`Cpu`, `Wgpu` or `Cuda`, never `Auto`).
    /// Every backend, its tensors and masks may be shared between threads.
    fn run<B>(self, backend: B, kind: DeviceKind) -> Result<Self::Output>
    where
        B: crate::ops::Backend + Send + Sync,
        B::Tensor: Send + Sync,
        B::Mask: Send + Sync;

    /// On CUDA: what only CUDA can do besides (graph replay), or [`run`](Self::run).
    #[cfg(feature = "cuda")]
    fn run_cuda(self, backend: crate::cuda::Cuda) -> Result<Self::Output> {
        self.run(backend, DeviceKind::Cuda)
    }
}

/// Open the backend `kind` resolves to and run `task` on it, in f32.
pub fn run_on<T: BackendTask>(kind: DeviceKind, task: T) -> Result<T::Output> {
    run_on_with(kind, Precision::F32, task)
}

/// Open the backend `kind` resolves to, set to `precision`, and run `task` on it.
pub fn run_on_with<T: BackendTask>(
    kind: DeviceKind,
    precision: Precision,
    task: T,
) -> Result<T::Output> {
    // Only `Auto` needs a survey; a named backend's own `open` reports why it
    // cannot start, so it is not probed a second time here.
    let kind = match kind {
        DeviceKind::Auto => resolve(kind)?,
        named => named,
    };
    let unsupported = |what: &str| {
        Err(Error::invalid(format!(
            "--precision {}: {what}",
            precision.name()
        )))
    };
    match kind {
        DeviceKind::Reference => {
            if precision != Precision::F32 {
                return unsupported(
                    "the reference computes in float64; use --device cpu (bf16, f16) or a GPU device",
                );
            }
            task.run(crate::reference::Reference, DeviceKind::Reference)
        }
        DeviceKind::Cpu | DeviceKind::Auto => {
            if !precision.runs_on(DeviceKind::Cpu) {
                return unsupported("the CPU backend computes in f32, or its GEMMs in bf16 or f16");
            }
            let cpu = crate::cpu::Cpu::open()?.with_precision(precision)?;
            task.run(cpu, DeviceKind::Cpu)
        }
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => {
            use crate::wgpu::{Precision as WgpuPrecision, WeightType, Wgpu, WgpuOptions};
            let (precision, weights) = match precision {
                Precision::F32 => (WgpuPrecision::F32, WeightType::Storage),
                Precision::F16 => (WgpuPrecision::F16, WeightType::Storage),
                Precision::Bf16 => (WgpuPrecision::F32, WeightType::Bf16),
                Precision::Tf32 => {
                    return unsupported("wgpu computes in f32, f16, or f32 with bf16 GEMM weights")
                }
            };
            let be = Wgpu::open()?;
            let options = WgpuOptions {
                precision,
                weights,
                ..be.options()
            };
            task.run(be.with_options(options)?, DeviceKind::Wgpu)
        }
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            use crate::cuda::{Cuda, CudaOptions};
            let options = CudaOptions {
                storage: precision.storage(),
                tf32: precision == Precision::Tf32,
                ..CudaOptions::default()
            };
            task.run_cuda(Cuda::new(0, options)?)
        }
        #[allow(unreachable_patterns)] // with every backend compiled in
        other => Err(Error::Unavailable {
            backend: other.name().into(),
            reason: "not compiled into this build".into(),
        }),
    }
}
