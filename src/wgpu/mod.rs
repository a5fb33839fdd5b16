//! The wgpu backend's foundations: choosing an adapter, opening a device with
//! the adapter's real limits, and turning every wgpu error into an [`Error`].
//!
//! wgpu reports most failures asynchronously and, by default, panics on any
//! error that no error scope catches. Here every device gets a non-panicking
//! uncaptured-error handler, and work runs inside [`Gpu::scoped`], which wraps
//! it in validation, out-of-memory and internal error scopes and returns what
//! they caught.
//!
//! Without a GPU, Mesa's lavapipe (Vulkan on the CPU, adapter "llvmpipe")
//! serves: `apt-get install mesa-vulkan-drivers libvulkan1`. It has 32 KiB of
//! workgroup memory, SHADER_F16 and SUBGROUP, and a subgroup size of 8: read
//! sizes from [`WgpuInfo`], never assume 32.
//!
//! Backends default to Vulkan, Metal and DX12; `WGPU_BACKEND` (e.g. `gl`)
//! overrides that, and `WGPU_ADAPTER_NAME` picks an adapter by a part of its name.

/// A shader's uniform `Params`: 4-byte scalars only (u32 / f32), so the WGSL
/// uniform layout is the Rust field order with no padding. Checked at compile
/// time (no padding) and by a generated test against the declaration in
/// `shaders/<shader>` (names, types, order).
macro_rules! wgsl_params {
    (
        shader: $shader:literal,
        $(#[$meta:meta])*
        struct $name:ident { $($field:ident: $ty:ident),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        struct $name {
            $($field: $ty),+
        }

        const _: () = assert!(
            std::mem::size_of::<$name>() == 4 * [$(stringify!($field)),+].len(),
            "uniform params are 4-byte scalars"
        );

        #[cfg(test)]
        #[test]
        fn params_match_the_shader() -> std::result::Result<(), String> {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $shader);
            let source = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            let want: Vec<(String, String)> = [$((stringify!($field), stringify!($ty))),+]
                .iter()
                .map(|(f, t)| (f.to_string(), t.to_string()))
                .collect();
            assert_eq!(
                $crate::wgpu::wgsl_struct_fields(&source, stringify!($name)),
                want,
                "{}: {} differs from the host's",
                $shader,
                stringify!($name)
            );
            Ok(())
        }
    };
}

/// The fields (name, type) of `struct {name}` in WGSL `source`, in order.
#[cfg(test)]
pub(crate) fn wgsl_struct_fields(source: &str, name: &str) -> Vec<(String, String)> {
    let Some(start) = source.find(&format!("struct {name} {{")) else {
        return Vec::new();
    };
    let body = &source[start..];
    let body = &body[body.find('{').map_or(0, |i| i + 1)..body.find('}').unwrap_or(body.len())];
    body.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .flat_map(|line| line.split(','))
        .filter_map(|field| {
            let (n, t) = field.split_once(':')?;
            Some((n.trim().to_string(), t.trim().to_string()))
        })
        .collect()
}

mod alignment_loss;
mod attention;
mod attention_absorbed;
mod backend;
mod gather_signal_tokens;
mod layer_norm;
mod linear;
#[cfg(test)]
mod portability;

/// The wgpu this crate is built with, for [`Gpu::from_device`] and
/// [`Wgpu::tensor_from_buffer`] (devices and buffers must come from the same
/// version).
pub use ::wgpu;
pub use backend::{
    KernelVersion, Precision, Tuning, WeightType, Wgpu, WgpuMask, WgpuOptions, WgpuTensor,
};

use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::wgpu::util::DeviceExt;

use crate::error::{Error, Result};

/// Name of this backend in errors.
const WGPU: &str = "wgpu";

/// How long a wait for submitted work may take before it is an error.
const WAIT_TIMEOUT: Duration = Duration::from_secs(120);

/// What the chosen adapter is and offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgpuInfo {
    /// Adapter name, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)" or "NVIDIA H100 80GB HBM3".
    pub adapter: String,
    /// Graphics API, e.g. "Vulkan".
    pub backend: String,
    /// "DiscreteGpu", "IntegratedGpu", "VirtualGpu", "Cpu" or "Other".
    pub device_type: String,
    /// Driver name and version, e.g. "llvmpipe Mesa 22.3.6".
    pub driver: String,
    /// The adapter offers `Features::SHADER_F16` (`enable f16;` in WGSL).
    pub shader_f16: bool,
    /// The adapter offers `Features::SUBGROUP` (subgroup builtins in WGSL).
    pub subgroup: bool,
    /// Workgroup (shared) memory per workgroup, in bytes.
    pub max_workgroup_storage: u32,
    /// Smallest subgroup size the adapter may use (meaningful when `subgroup`).
    pub subgroup_min_size: u32,
    /// Largest subgroup size the adapter may use (meaningful when `subgroup`).
    pub subgroup_max_size: u32,
}

impl std::fmt::Display for WgpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}, driver {}), shader-f16 {}, subgroup {}",
            self.adapter,
            self.backend,
            self.device_type,
            if self.driver.is_empty() {
                "?"
            } else {
                &self.driver
            },
            if self.shader_f16 { "yes" } else { "no" },
            if self.subgroup {
                format!(
                    "yes ({}..={})",
                    self.subgroup_min_size, self.subgroup_max_size
                )
            } else {
                "no".to_string()
            },
        )?;
        write!(f, ", workgroup memory {} B", self.max_workgroup_storage)
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: WGPU.to_string(),
        reason: reason.into(),
    }
}

fn backend_error(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: WGPU.to_string(),
        message: message.into(),
    }
}

/// Runs `f`, turning a panic inside wgpu (it panics on a few fatal conditions,
/// such as a lost device while polling) into an error.
fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(backend_error(format!("{what}: wgpu failed: {msg}")))
        }
    }
}

fn info_of(adapter: &::wgpu::Adapter) -> WgpuInfo {
    let info = adapter.get_info();
    let features = adapter.features();
    let limits = adapter.limits();
    let driver = match (info.driver.is_empty(), info.driver_info.is_empty()) {
        (false, false) => format!("{} {}", info.driver, info.driver_info),
        (false, true) => info.driver.clone(),
        (true, _) => info.driver_info.clone(),
    };
    WgpuInfo {
        adapter: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver,
        shader_f16: features.contains(::wgpu::Features::SHADER_F16),
        subgroup: features.contains(::wgpu::Features::SUBGROUP),
        max_workgroup_storage: limits.max_compute_workgroup_storage_size,
        subgroup_min_size: info.subgroup_min_size,
        subgroup_max_size: info.subgroup_max_size,
    }
}

/// Ranks adapters: real GPUs before software ones, native APIs before GL.
fn rank(adapter: &::wgpu::Adapter) -> (u8, u8) {
    let info = adapter.get_info();
    let device = match info.device_type {
        ::wgpu::DeviceType::DiscreteGpu => 0,
        ::wgpu::DeviceType::IntegratedGpu => 1,
        ::wgpu::DeviceType::VirtualGpu => 2,
        ::wgpu::DeviceType::Cpu => 3,
        ::wgpu::DeviceType::Other => 4,
    };
    let api = match info.backend {
        ::wgpu::Backend::Vulkan | ::wgpu::Backend::Metal | ::wgpu::Backend::Dx12 => 0,
        ::wgpu::Backend::Gl => 1,
        _ => 2,
    };
    (device, api)
}

const NO_ADAPTER_HINT: &str = "on Linux without a GPU install Mesa's lavapipe \
     (`apt-get install mesa-vulkan-drivers libvulkan1`); with an NVIDIA GPU, the driver's \
     Vulkan ICD (nvidia_icd.json) and libvulkan1 must be installed";

/// The best adapter: the highest-performance device on a native API, or the
/// first whose name contains `$WGPU_ADAPTER_NAME` (case-insensitive) when set.
fn select_adapter() -> Result<::wgpu::Adapter> {
    let mut desc = ::wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if ::wgpu::Backends::from_env().is_none() {
        desc.backends = ::wgpu::Backends::PRIMARY;
    }
    let backends = desc.backends;
    let instance = ::wgpu::Instance::new(desc);
    let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
    if adapters.is_empty() {
        let which = if ::wgpu::Backends::from_env().is_some() {
            format!("adapter for WGPU_BACKEND ({backends:?})")
        } else {
            "Vulkan/Metal/DX12 adapter".to_string()
        };
        return Err(unavailable(format!("no {which} found; {NO_ADAPTER_HINT}")));
    }
    if let Some(wanted) = std::env::var("WGPU_ADAPTER_NAME")
        .ok()
        .filter(|w| !w.is_empty())
    {
        let wanted_lc = wanted.to_lowercase();
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        adapters.retain(|a| a.get_info().name.to_lowercase().contains(&wanted_lc));
        if adapters.is_empty() {
            return Err(unavailable(format!(
                "WGPU_ADAPTER_NAME={wanted:?} matches none of the adapters found: {names:?}"
            )));
        }
    }
    adapters.sort_by_key(rank);
    // `adapters` is not empty here (checked above, and after filtering).
    adapters
        .into_iter()
        .next()
        .ok_or_else(|| unavailable(format!("no adapter found; {NO_ADAPTER_HINT}")))
}

/// Finds the best adapter and reports what it offers; opens no device.
///
/// No adapter is [`Error::Unavailable`] with what to install.
pub fn probe() -> Result<WgpuInfo> {
    no_panic("probe", || select_adapter().map(|a| info_of(&a)))
}

/// An open device: the adapter's real limits, SHADER_F16 and SUBGROUP enabled
/// whenever the adapter offers them, and errors routed to [`Gpu::scoped`].
#[derive(Debug)]
pub struct Gpu {
    /// The logical device.
    pub device: ::wgpu::Device,
    /// Its queue.
    pub queue: ::wgpu::Queue,
    /// What the adapter is and offers.
    pub info: WgpuInfo,
    /// The limits the device was opened with (the adapter's own).
    pub limits: ::wgpu::Limits,
    /// The features the device was opened with.
    pub features: ::wgpu::Features,
    /// Errors that escaped every error scope (e.g. raised on another thread),
    /// and a lost-device message; [`Gpu::scoped`] reports and clears them.
    uncaptured: Arc<Mutex<Vec<String>>>,
}

/// Opens a device on the best adapter (see [`probe`]).
pub fn open() -> Result<Gpu> {
    no_panic("open", || {
        let adapter = select_adapter()?;
        let info = info_of(&adapter);
        let offered = adapter.features();
        let features = offered
            & (::wgpu::Features::SHADER_F16
                | ::wgpu::Features::SUBGROUP
                | ::wgpu::Features::TIMESTAMP_QUERY);
        let limits = adapter.limits();
        let desc = ::wgpu::DeviceDescriptor {
            label: Some("output-projector"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc)).map_err(|e| {
            unavailable(format!("{}: requesting a device failed: {e}", info.adapter))
        })?;

        Ok(Gpu::wrap(device, queue, info, limits, features))
    })
}

impl Gpu {
    /// Use a device you opened. The device's uncaptured-error handler is replaced
    /// by one that records errors for [`Gpu::scoped`] (wgpu's default panics).
    pub fn from_device(
        adapter: &::wgpu::AdapterInfo,
        device: ::wgpu::Device,
        queue: ::wgpu::Queue,
    ) -> Self {
        let features = device.features();
        let limits = device.limits();
        let info = WgpuInfo {
            adapter: adapter.name.clone(),
            backend: format!("{:?}", adapter.backend),
            device_type: format!("{:?}", adapter.device_type),
            driver: format!("{} {}", adapter.driver, adapter.driver_info)
                .trim()
                .to_string(),
            shader_f16: features.contains(::wgpu::Features::SHADER_F16),
            subgroup: features.contains(::wgpu::Features::SUBGROUP),
            max_workgroup_storage: limits.max_compute_workgroup_storage_size,
            subgroup_min_size: adapter.subgroup_min_size,
            subgroup_max_size: adapter.subgroup_max_size,
        };
        Gpu::wrap(device, queue, info, limits, features)
    }

    fn wrap(
        device: ::wgpu::Device,
        queue: ::wgpu::Queue,
        info: WgpuInfo,
        limits: ::wgpu::Limits,
        features: ::wgpu::Features,
    ) -> Self {
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&uncaptured);
        device.on_uncaptured_error(Arc::new(move |e: ::wgpu::Error| {
            if let Ok(mut errors) = sink.lock() {
                errors.push(e.to_string());
            }
        }));
        let sink = Arc::clone(&uncaptured);
        device.set_device_lost_callback(move |reason, message| {
            // Dropping the device reports `Destroyed`: not an error.
            if reason != ::wgpu::DeviceLostReason::Destroyed {
                if let Ok(mut errors) = sink.lock() {
                    errors.push(format!("device lost ({reason:?}): {message}"));
                }
            }
        });
        Gpu {
            device,
            queue,
            info,
            limits,
            features,
            uncaptured,
        }
    }
}

impl Gpu {
    /// Runs `f` inside validation, out-of-memory and internal error scopes and
    /// returns its value, or the first error wgpu raised while it ran (plus any
    /// uncaptured error since the last call), named after `what`.
    ///
    /// Scopes are per thread: call this from the thread that does the work.
    /// Errors of work that runs on the GPU after `f` returns (rare: mostly
    /// device loss) surface in [`Gpu::wait`].
    pub fn scoped<T>(
        &self,
        what: &str,
        f: impl FnOnce(&::wgpu::Device, &::wgpu::Queue) -> T,
    ) -> Result<T> {
        no_panic(what, || {
            let validation = self
                .device
                .push_error_scope(::wgpu::ErrorFilter::Validation);
            let oom = self
                .device
                .push_error_scope(::wgpu::ErrorFilter::OutOfMemory);
            let internal = self.device.push_error_scope(::wgpu::ErrorFilter::Internal);
            let value = f(&self.device, &self.queue);
            // Pop in reverse order of pushing.
            let internal = pollster::block_on(internal.pop());
            let oom = pollster::block_on(oom.pop());
            let validation = pollster::block_on(validation.pop());
            let mut errors: Vec<String> = [validation, oom, internal]
                .into_iter()
                .flatten()
                .map(|e| e.to_string())
                .collect();
            errors.extend(self.take_uncaptured());
            if errors.is_empty() {
                Ok(value)
            } else {
                Err(backend_error(format!("{what}: {}", errors.join("\n"))))
            }
        })
    }

    fn take_uncaptured(&self) -> Vec<String> {
        match self.uncaptured.lock() {
            Ok(mut errors) => std::mem::take(&mut *errors),
            Err(_) => vec!["error sink poisoned".to_string()],
        }
    }

    /// Blocks until `submission` (or all submitted work, with `None`) has
    /// finished on the device, up to two minutes.
    pub fn wait(&self, submission: Option<::wgpu::SubmissionIndex>) -> Result<()> {
        no_panic("wait", || {
            self.device
                .poll(::wgpu::PollType::Wait {
                    submission_index: submission,
                    timeout: Some(WAIT_TIMEOUT),
                })
                .map_err(|e| backend_error(format!("waiting for the device: {e}")))?;
            let errors = self.take_uncaptured();
            if errors.is_empty() {
                Ok(())
            } else {
                Err(backend_error(errors.join("\n")))
            }
        })
    }

    /// Copies the first `bytes` bytes of `buffer` (which needs `COPY_SRC`
    /// usage) to the host. `bytes` is rounded up to a multiple of 4 for the copy.
    pub fn read_buffer(&self, buffer: &::wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        self.read_buffer_after(None, buffer, 0, bytes)
    }

    /// Like [`Gpu::read_buffer`], from byte `offset` (a multiple of 4), after the
    /// commands already recorded in `encoder`, which is submitted with the copy
    /// (and waited for, with nothing to copy, when `bytes` is 0).
    pub fn read_buffer_after(
        &self,
        encoder: Option<::wgpu::CommandEncoder>,
        buffer: &::wgpu::Buffer,
        offset: u64,
        bytes: u64,
    ) -> Result<Vec<u8>> {
        self.submit_read(encoder, buffer, offset, bytes)?.wait(self)
    }

    /// Submits `encoder`'s commands.
    pub(crate) fn submit(
        &self,
        encoder: ::wgpu::CommandEncoder,
    ) -> Result<::wgpu::SubmissionIndex> {
        self.scoped("submitting", |_, queue| queue.submit([encoder.finish()]))
    }

    /// The first half of [`Gpu::read_buffer_after`]: the copy recorded after
    /// `encoder`'s commands and submitted with them. The bytes come from
    /// [`Readback::wait`].
    pub(crate) fn submit_read(
        &self,
        encoder: Option<::wgpu::CommandEncoder>,
        buffer: &::wgpu::Buffer,
        offset: u64,
        bytes: u64,
    ) -> Result<Readback> {
        if bytes == 0 {
            // Nothing to copy, but the encoder's commands still run.
            let submission = encoder.map(|e| self.submit(e)).transpose()?;
            return Ok(Readback::Empty(submission));
        }
        let padded = bytes
            .checked_add(3)
            .map(|b| b & !3)
            .ok_or_else(|| Error::Overflow(format!("read of {bytes} bytes")))?;
        if !offset.is_multiple_of(4)
            || offset
                .checked_add(padded)
                .is_none_or(|end| end > buffer.size())
        {
            return Err(Error::invalid(format!(
                "read of {bytes} bytes at offset {offset} from a buffer of {} bytes",
                buffer.size()
            )));
        }
        let len = usize::try_from(bytes)
            .map_err(|_| Error::Overflow(format!("read of {bytes} bytes")))?;
        let (staging, submission) = self.scoped("read_buffer", |device, queue| {
            let staging = device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("readback"),
                size: padded,
                usage: ::wgpu::BufferUsages::MAP_READ | ::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut encoder = encoder.unwrap_or_else(|| {
                device.create_command_encoder(&::wgpu::CommandEncoderDescriptor {
                    label: Some("readback"),
                })
            });
            encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, padded);
            let submission = queue.submit([encoder.finish()]);
            (staging, submission)
        })?;
        Ok(Readback::Submitted {
            staging,
            submission,
            len,
        })
    }
}

/// A copy to the host submitted by [`Gpu::submit_read`], not yet waited for.
pub(crate) enum Readback {
    /// Nothing to read; the submission of the commands recorded before it, if any.
    Empty(Option<::wgpu::SubmissionIndex>),
    /// The copy's staging buffer, its submission, and the bytes wanted.
    Submitted {
        staging: ::wgpu::Buffer,
        submission: ::wgpu::SubmissionIndex,
        len: usize,
    },
}

impl Readback {
    /// Waits for the copy and returns its bytes.
    pub(crate) fn wait(self, gpu: &Gpu) -> Result<Vec<u8>> {
        let (staging, submission, len) = match self {
            Readback::Empty(None) => return Ok(Vec::new()),
            Readback::Empty(Some(submission)) => {
                gpu.wait(Some(submission))?;
                return Ok(Vec::new());
            }
            Readback::Submitted {
                staging,
                submission,
                len,
            } => (staging, submission, len),
        };
        let (mapped, status) = std::sync::mpsc::channel();
        gpu.scoped("read_buffer: map", |_, _| {
            staging
                .slice(..)
                .map_async(::wgpu::MapMode::Read, move |r| {
                    // The receiver is gone only where the wait below failed.
                    let _ = mapped.send(r);
                });
        })?;
        gpu.wait(Some(submission))?;
        // The wait can return before the map callback has run: another
        // thread's poll may have taken it from the device and not called it
        // yet. Wait for the callback itself, polling meanwhile.
        let deadline = Instant::now() + WAIT_TIMEOUT;
        let status = loop {
            match status.recv_timeout(Duration::from_millis(1)) {
                Ok(r) => break Some(r),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    no_panic("read_buffer: poll", || {
                        gpu.device
                            .poll(::wgpu::PollType::Poll)
                            .map_err(|e| backend_error(format!("waiting for the device: {e}")))
                    })?;
                }
                Err(_) => break None,
            }
        };
        match status {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(backend_error(format!("read_buffer: mapping failed: {e}"))),
            None => return Err(backend_error("read_buffer: the buffer was never mapped")),
        }
        let out = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| backend_error(format!("read_buffer: {e}")))?;
            view.get(..len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| backend_error("read_buffer: mapped range too short"))?
        };
        staging.unmap();
        Ok(out)
    }
}

/// y[i] = a * x[i] + y[i], one invocation per element, with a bounds check.
const AXPY_WGSL: &str = r#"
struct Params {
    n: u32,
    a: f32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i < params.n) {
        y[i] = params.a * x[i] + y[i];
    }
}
"#;

/// Half-precision arithmetic: out[i] = f32(f16(x[i]) * 0.5h + 1.0h).
const F16_WGSL: &str = r#"
enable f16;

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i < arrayLength(&out)) {
        let h: f16 = f16(x[i]);
        out[i] = f32(h * 0.5h + 1.0h);
    }
}
"#;

/// Subgroup builtins (naga wants no `enable subgroups;`): each invocation
/// writes the subgroup size and the subgroup sum of 1s, which must be equal.
const SUBGROUP_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>,
        @builtin(subgroup_size) sg_size: u32) {
    let i = gid.x;
    let total = subgroupAdd(1u);
    if (2u * i + 1u < arrayLength(&out)) {
        out[2u * i] = f32(sg_size);
        out[2u * i + 1u] = f32(total);
    }
}
"#;

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Runs one compute kernel `main` of `source` with a read-only input `x` at
/// binding 0, a read-write `y` at binding 1 (initialised from `y_init`) and an
/// optional uniform at binding 2, over `invocations` threads in workgroups of
/// 64, and returns `y`.
fn run_kernel(
    gpu: &Gpu,
    name: &str,
    source: &str,
    x: &[f32],
    y_init: &[f32],
    uniform: Option<&[u8]>,
    invocations: u32,
) -> Result<Vec<f32>> {
    let y_bytes = (y_init.len() * 4) as u64;
    let (y, submission) = gpu.scoped(name, |device, queue| {
        let module = device.create_shader_module(::wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: ::wgpu::ShaderSource::Wgsl(source.into()),
        });
        let storage = |binding, read_only| ::wgpu::BindGroupLayoutEntry {
            binding,
            visibility: ::wgpu::ShaderStages::COMPUTE,
            ty: ::wgpu::BindingType::Buffer {
                ty: ::wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![storage(0, true), storage(1, false)];
        if uniform.is_some() {
            entries.push(::wgpu::BindGroupLayoutEntry {
                binding: 2,
                visibility: ::wgpu::ShaderStages::COMPUTE,
                ty: ::wgpu::BindingType::Buffer {
                    ty: ::wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let bgl = device.create_bind_group_layout(&::wgpu::BindGroupLayoutDescriptor {
            label: Some(name),
            entries: &entries,
        });
        let layout = device.create_pipeline_layout(&::wgpu::PipelineLayoutDescriptor {
            label: Some(name),
            bind_group_layouts: &[Some(&bgl)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&::wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: Some(&layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let x_buf = device.create_buffer_init(&::wgpu::util::BufferInitDescriptor {
            label: Some("x"),
            contents: &f32_bytes(x),
            usage: ::wgpu::BufferUsages::STORAGE,
        });
        let y_buf = device.create_buffer_init(&::wgpu::util::BufferInitDescriptor {
            label: Some("y"),
            contents: &f32_bytes(y_init),
            usage: ::wgpu::BufferUsages::STORAGE | ::wgpu::BufferUsages::COPY_SRC,
        });
        let u_buf = uniform.map(|bytes| {
            device.create_buffer_init(&::wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytes,
                usage: ::wgpu::BufferUsages::UNIFORM,
            })
        });
        let mut bind = vec![
            ::wgpu::BindGroupEntry {
                binding: 0,
                resource: x_buf.as_entire_binding(),
            },
            ::wgpu::BindGroupEntry {
                binding: 1,
                resource: y_buf.as_entire_binding(),
            },
        ];
        if let Some(u) = &u_buf {
            bind.push(::wgpu::BindGroupEntry {
                binding: 2,
                resource: u.as_entire_binding(),
            });
        }
        let bind_group = device.create_bind_group(&::wgpu::BindGroupDescriptor {
            label: Some(name),
            layout: &bgl,
            entries: &bind,
        });
        let mut encoder =
            device.create_command_encoder(&::wgpu::CommandEncoderDescriptor { label: Some(name) });
        {
            let mut pass = encoder.begin_compute_pass(&::wgpu::ComputePassDescriptor {
                label: Some(name),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(invocations.div_ceil(64), 1, 1);
        }
        let submission = queue.submit([encoder.finish()]);
        (y_buf, submission)
    })?;
    gpu.wait(Some(submission))?;
    let bytes = gpu.read_buffer(&y, y_bytes)?;
    Ok(bytes_f32(&bytes))
}

/// Opens a device and checks that it computes: an axpy over 1000 elements
/// (not a multiple of the workgroup size) compared exactly, plus a half-precision
/// kernel when SHADER_F16 is offered and a subgroup reduction when SUBGROUP is.
pub fn smoke_test() -> Result<()> {
    smoke_test_on(&open()?)
}

/// [`smoke_test`] on an already open device.
pub fn smoke_test_on(gpu: &Gpu) -> Result<()> {
    const N: usize = 1000;
    const A: f32 = 2.5;
    // Integers and a multiple of 0.5: every product and sum is exact in f32,
    // with or without a fused multiply-add, so the check can be exact.
    let x: Vec<f32> = (0..N).map(|i| i as f32).collect();
    let y0: Vec<f32> = (0..N).map(|i| (N - i) as f32).collect();
    let mut params = Vec::with_capacity(16);
    params.extend_from_slice(&(N as u32).to_le_bytes());
    params.extend_from_slice(&A.to_le_bytes());
    params.resize(16, 0);
    // One workgroup more than needed, so the bounds check is exercised.
    let y = run_kernel(
        gpu,
        "smoke axpy",
        AXPY_WGSL,
        &x,
        &y0,
        Some(&params),
        N as u32 + 64,
    )?;
    for (i, (&got, (&xi, &yi))) in y.iter().zip(x.iter().zip(&y0)).enumerate() {
        let want = A * xi + yi;
        if got.to_bits() != want.to_bits() {
            return Err(backend_error(format!(
                "smoke axpy on {}: y[{i}] = {got}, expected {want}",
                gpu.info.adapter
            )));
        }
    }
    if y.len() != N {
        return Err(backend_error(format!(
            "smoke axpy: read {} values, expected {N}",
            y.len()
        )));
    }

    if gpu.features.contains(::wgpu::Features::SHADER_F16) {
        let x: Vec<f32> = (0..N).map(|i| (i % 64) as f32 - 32.0).collect();
        let out = run_kernel(
            gpu,
            "smoke f16",
            F16_WGSL,
            &x,
            &vec![f32::NAN; N],
            None,
            N as u32,
        )?;
        for (i, (&got, &xi)) in out.iter().zip(&x).enumerate() {
            let want = xi * 0.5 + 1.0; // exact in f16 for these inputs
            if got != want {
                return Err(backend_error(format!(
                    "smoke f16 on {}: out[{i}] = {got}, expected {want}",
                    gpu.info.adapter
                )));
            }
        }
    }

    if gpu.features.contains(::wgpu::Features::SUBGROUP) {
        let threads = 256usize;
        let out = run_kernel(
            gpu,
            "smoke subgroup",
            SUBGROUP_WGSL,
            &[0.0],
            &vec![f32::NAN; 2 * threads],
            None,
            threads as u32,
        )?;
        let (lo, hi) = (
            gpu.info.subgroup_min_size as f32,
            gpu.info.subgroup_max_size as f32,
        );
        for (i, pair) in out.chunks_exact(2).enumerate() {
            let (size, total) = (pair[0], pair[1]);
            if size != total || size < lo.max(1.0) || size > hi.max(lo) {
                return Err(backend_error(format!(
                    "smoke subgroup on {}: invocation {i} saw subgroup size {size} and \
                     subgroupAdd(1) = {total} (adapter range {lo}..={hi})",
                    gpu.info.adapter
                )));
            }
        }
    }
    Ok(())
}

/// `v` as a u32 for a shader, or an error naming the size that does not fit.
pub(crate) fn u32_of(v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::Overflow(format!(
            "{v} does not fit the 32-bit indices of the wgpu kernels"
        ))
    })
}

impl crate::ops::Backend for Wgpu {
    type Tensor = WgpuTensor;
    type Mask = WgpuMask;

    fn name(&self) -> &str {
        WGPU
    }

    fn upload(&self, t: &crate::tensor::HostTensor) -> Result<WgpuTensor> {
        self.upload_tensor(t)
    }

    fn download(&self, t: &WgpuTensor) -> Result<crate::tensor::HostTensor> {
        self.download_tensor(t)
    }

    fn upload_weight(&self, t: &crate::tensor::HostTensor) -> Result<WgpuTensor> {
        self.upload_weight_tensor(t)
    }

    fn weight_dtype(&self) -> crate::tensor::DType {
        self.weight_storage()
    }

    fn alloc(&self, shape: &[usize]) -> Result<WgpuTensor> {
        self.alloc_tensor(shape)
    }

    fn upload_mask(&self, mask: &crate::ops::KeyPaddingMask) -> Result<WgpuMask> {
        self.upload_mask_words(mask)
    }

    fn synchronize(&self) -> Result<()> {
        self.sync()
    }

    fn device_time(
        &self,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<std::time::Duration>> {
        self.time_on_device(f).map(|((), t)| t)
    }

    fn kernel_launches(&self) -> Option<u64> {
        Some(self.dispatches())
    }

    fn naive(&self) -> Result<Option<Self>> {
        let options = WgpuOptions {
            version: KernelVersion::Naive,
            ..self.options()
        };
        self.with_options(options).map(Some)
    }

    fn linear(
        &self,
        x: &WgpuTensor,
        w: &WgpuTensor,
        b: Option<&WgpuTensor>,
        act: crate::ops::Activation,
        residual: Option<&WgpuTensor>,
        out: &mut WgpuTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("linear");
        use crate::ops::Shaped;
        let d = crate::ops::LinearDims::check(
            x.shape(),
            w.shape(),
            b.map(|t| t.shape()),
            residual.map(|t| t.shape()),
            out.shape(),
        )?;
        linear::linear(self, d, x, w, b, act, residual, out)
    }

    fn layer_norm(
        &self,
        x: &WgpuTensor,
        residual: Option<&WgpuTensor>,
        weight: &WgpuTensor,
        bias: &WgpuTensor,
        eps: f64,
        out: &mut WgpuTensor,
        sum_out: Option<&mut WgpuTensor>,
    ) -> Result<()> {
        let _range = crate::profile::range("layer_norm");
        use crate::ops::Shaped;
        let d = crate::ops::LayerNormDims::check(
            x.shape(),
            residual.map(|t| t.shape()),
            weight.shape(),
            bias.shape(),
            eps,
            out.shape(),
            sum_out.as_ref().map(|t| t.shape()),
        )?;
        layer_norm::layer_norm(self, d, x, residual, weight, bias, eps, out, sum_out)
    }

    fn attention(
        &self,
        q: crate::ops::Cols<'_, WgpuTensor>,
        k: crate::ops::Cols<'_, WgpuTensor>,
        v: crate::ops::Cols<'_, WgpuTensor>,
        spec: &crate::ops::AttentionSpec,
        mask: Option<&WgpuMask>,
        out: &mut WgpuTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("attention");
        use crate::ops::Shaped;
        let d = crate::ops::AttentionDims::check(
            (q.tensor.shape(), q.start),
            (k.tensor.shape(), k.start),
            (v.tensor.shape(), v.start),
            spec,
            mask.map(|m| (m.batch(), m.keys())),
            out.shape(),
        )?;
        attention::attention(self, d, q.tensor, k.tensor, v.tensor, spec, mask, out)
    }

    fn attention_absorbed(
        &self,
        norm: crate::ops::NormInput<'_, WgpuTensor>,
        attn: crate::ops::AbsorbedAttentionInput<'_, WgpuTensor>,
        after: crate::ops::NormAfter<'_, WgpuTensor>,
        stream_out: &mut WgpuTensor,
        out: &mut WgpuTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("attention_absorbed");
        use crate::ops::Shaped;
        let d = crate::ops::AbsorbedAttentionDims::check(
            &norm,
            &attn,
            &after,
            stream_out.shape(),
            out.shape(),
        )?;
        attention_absorbed::attention_absorbed(self, d, norm, attn, after, stream_out, out)
    }

    fn attention_absorbed_pays(&self, keys: usize, heads: usize, cols: usize) -> bool {
        let bindings = self.gpu().limits.max_storage_buffers_per_shader_stage;
        bindings >= attention_absorbed::BINDINGS && crate::ops::absorbing_pays(keys, heads, cols)
    }

    fn alignment_loss(
        &self,
        kind: crate::ops::LossKind,
        pred: &WgpuTensor,
        target: &WgpuTensor,
        loss: &mut WgpuTensor,
        grad: &mut WgpuTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("alignment_loss");
        use crate::ops::Shaped;
        let d =
            crate::ops::LossDims::check(pred.shape(), target.shape(), loss.shape(), grad.shape())?;
        alignment_loss::alignment_loss(self, d, kind, pred, target, loss, grad)
    }

    fn gather_signal_tokens(
        &self,
        hidden: &WgpuTensor,
        embeds: Option<&WgpuTensor>,
        positions: &crate::signal::SignalPositions,
        out: &mut WgpuTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("gather_signal_tokens");
        use crate::ops::Shaped;
        let d = crate::ops::GatherDims::check(
            hidden.shape(),
            embeds.map(|t| t.shape()),
            positions,
            out.shape(),
        )?;
        gather_signal_tokens::gather_signal_tokens(self, d, hidden, embeds, positions, out)
    }
}
