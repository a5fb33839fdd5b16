//! The wgpu implementation of [`Backend`]: tensors in storage buffers, pipelines
//! compiled once per device, and every op recorded into one pending command
//! encoder that is submitted only when the host needs a result (a download or
//! [`Backend::synchronize`]), so a projector forward is one submit.
//!
//! Each dispatch's parameters go into a uniform arena (one 256-byte slot per
//! dispatch) written just before the submit, bound at a dynamic offset, so a
//! bind group depends only on the buffers it binds and is made once per set
//! of them (cached; a plan's forwards bind the same ones every time).
//! Buffers are pooled by size; a dropped tensor's buffer becomes reusable
//! only after the next submit, so no write can overtake recorded work that
//! still reads it. The arena's write, the submit and that reuse happen under
//! one lock with the recording, so threads that share a backend keep to each
//! other's order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use super::Gpu;
use crate::error::{Error, Result};
pub use crate::ops::KernelVersion;
use crate::ops::{KeyPaddingMask, Shaped};
use crate::tensor::{checked_numel, DType, HostData, HostTensor};

/// The storage type of a backend's tensors, GEMM weights aside where
/// [`WgpuOptions::weights`] gives them their own (arithmetic is f32 either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 tensors (the [`WgpuOptions`] default).
    F32,
    /// f16 tensors (uploads convert to it, downloads return it). Needs the
    /// adapter's SHADER_F16 feature; [`Wgpu::new`] is [`Error::Unavailable`] without it.
    F16,
}

impl Precision {
    pub(crate) fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }
}

/// How [`Backend::upload_weight`](crate::ops::Backend::upload_weight) stores a
/// GEMM's weight (`w` of `linear`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WeightType {
    /// In the tensors' own type, [`WgpuOptions::precision`] (the default).
    #[default]
    Storage,
    /// f16 (NExT-GPT's released weights, exactly), two to a 32-bit word that
    /// `linear` widens with integer ops: any adapter, SHADER_F16 or not.
    F16,
    /// bf16, two to a 32-bit word that `linear` widens with shifts: any adapter.
    Bf16,
}

impl WeightType {
    /// The element type of a weight on a backend whose tensors hold `storage`.
    pub(crate) fn dtype(self, storage: DType) -> DType {
        match self {
            WeightType::Storage => storage,
            WeightType::F16 => DType::F16,
            WeightType::Bf16 => DType::BF16,
        }
    }
}

/// What the fast kernels' shapes suit (see [`WgpuOptions::tuning`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Tuning {
    /// From the adapter: [`Tuning::Cpu`] on a CPU adapter (lavapipe,
    /// SwiftShader: [`WgpuInfo::device_type`](super::WgpuInfo::device_type)
    /// "Cpu"), [`Tuning::Gpu`] on any other.
    #[default]
    Auto,
    /// Few, large workgroups: a CPU runs a workgroup per thread and gains from
    /// reuse within it. The GEMMs of few rows take 4x32 output blocks.
    Cpu,
    /// Workgroups enough to fill a GPU's compute units: the GEMMs of few rows
    /// take 4x8 output blocks (64 workgroups at the projector's batch-1 512
    /// columns, against 16), and tiled GEMMs of few blocks split K over
    /// workgroups (the decoder's at batch 1: 48-192 workgroups, against
    /// 12-48).
    Gpu,
}

impl Tuning {
    /// This tuning on the adapter `info` describes: `Auto` becomes `Cpu` or
    /// `Gpu`, the others stay.
    pub fn on(self, info: &super::WgpuInfo) -> Tuning {
        match self {
            Tuning::Auto if info.device_type == "Cpu" => Tuning::Cpu,
            Tuning::Auto => Tuning::Gpu,
            t => t,
        }
    }
}

/// Options of [`Wgpu::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgpuOptions {
    /// What the backend's tensors hold (default [`Precision::F32`]).
    pub precision: Precision,
    /// Which shaders the ops dispatch: the tuned ones ([`KernelVersion::Fast`], default)
    /// or the naive v1 ones ([`KernelVersion::Naive`]), the benchmarks' baseline.
    pub version: KernelVersion,
    /// The type of the GEMMs' weights ([`WeightType::Storage`] by default). In
    /// f16 or bf16 they take half the memory of f32 ones and `linear` reads half
    /// the bytes; its products and sums stay f32, and every other op takes only
    /// tensors of [`precision`](Self::precision) (a weight elsewhere is an
    /// [`Error::Invalid`]).
    pub weights: WeightType,
    /// What the fast kernels' shapes suit ([`Tuning::Auto`] by default: the
    /// adapter's kind). Results are the same up to the order of f32 sums.
    pub tuning: Tuning,
}

impl Default for WgpuOptions {
    fn default() -> Self {
        WgpuOptions {
            precision: Precision::F32,
            version: KernelVersion::Fast,
            weights: WeightType::Storage,
            tuning: Tuning::Auto,
        }
    }
}

/// One uniform slot per dispatch: the largest parameter block and the
/// alignment every adapter accepts for uniform offsets.
const PARAM_SLOT: u64 = 256;
/// Dispatches recorded before the encoder is submitted on its own.
const ARENA_SLOTS: u64 = 512;

/// A compute kernel: an entry point of a shader file and how many storage
/// buffers it reads and writes (bindings 1.. in that order; binding 0 is the
/// parameter block).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernel {
    /// File name under `shaders/`, for messages.
    pub shader: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub reads: u32,
    pub writes: u32,
    /// The read (0-based) that may be a GEMM weight in its own type: the
    /// source then reads it through `w_at` and `w4_at` ([`weight_access`]),
    /// compiled for that type.
    pub weight: Option<u32>,
}

/// The WGSL module of kernel `k` for tensors of `precision` and, where it
/// reads a weight, a weight of `weight`: its source after the element types
/// and the weight's access functions.
pub(crate) fn module_source(k: &Kernel, precision: Precision, weight: DType) -> String {
    let mut source = match precision {
        Precision::F32 => "alias elem = f32;\nalias elem4 = vec4<f32>;\n",
        Precision::F16 => "enable f16;\nalias elem = f16;\nalias elem4 = vec4<f16>;\n",
    }
    .to_string();
    if let Some(read) = k.weight {
        source += &weight_access(read, weight, precision.dtype());
    }
    source + k.source
}

/// WGSL that declares read `read` as `w` (scalars) and `w4` (vec4s) and reads
/// them as f32 through `w_at(i)` and `w4_at(i)`, for elements of `dtype` on a
/// backend whose tensors hold `storage`. A 16-bit weight on an f32 backend is
/// packed two to a word, element 2i in the low half (the host's little-endian
/// bytes as they are).
fn weight_access(read: u32, dtype: DType, storage: DType) -> String {
    let binding = 1 + read;
    let (scalar, vec4, body) = match dtype {
        _ if dtype == storage => (
            "elem",
            "elem4",
            r"
fn w_at(i: u32) -> f32 { return f32(w[i]); }
fn w4_at(i: u32) -> vec4<f32> { return vec4<f32>(w4[i]); }
",
        ),
        // Widened with integer ops: `unpack2x16float` needs a downlevel
        // capability (SHADER_F16_IN_F32) that not every adapter offers.
        DType::F16 => (
            "u32",
            "vec2<u32>",
            r"
fn f16_pair(v: u32) -> vec2<f32> {
    let h = vec2<u32>(v & 0xffffu, v >> 16u);
    let mag = h & vec2<u32>(0x7fffu);
    // The exponent rebased from 15 to 127; f16's infinities and NaNs (exponent
    // 31) to f32's (exponent 255).
    let shifted = mag << vec2<u32>(13u);
    let special = mag >= vec2<u32>(0x7c00u);
    let bits = select(shifted + vec2<u32>(112u << 23u), shifted | vec2<u32>(0x7f800000u), special);
    // Subnormals (and zero): the mantissa times 2^-24, exact in f32.
    let subnormal = vec2<f32>(mag) * 5.9604644775390625e-8;
    let f = select(bitcast<vec2<f32>>(bits), subnormal, mag < vec2<u32>(0x400u));
    return bitcast<vec2<f32>>(bitcast<vec2<u32>>(f) | ((h & vec2<u32>(0x8000u)) << vec2<u32>(16u)));
}
fn w_at(i: u32) -> f32 { return f16_pair(w[i >> 1u])[i & 1u]; }
fn w4_at(i: u32) -> vec4<f32> {
    let v = w4[i];
    return vec4<f32>(f16_pair(v.x), f16_pair(v.y));
}
",
        ),
        // bf16 is the upper half of an f32: a shift or a mask widens it.
        _ => (
            "u32",
            "vec2<u32>",
            r"
fn bf16_pair(v: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xffff0000u));
}
fn w_at(i: u32) -> f32 { return bf16_pair(w[i >> 1u])[i & 1u]; }
fn w4_at(i: u32) -> vec4<f32> {
    let v = w4[i];
    return vec4<f32>(bf16_pair(v.x), bf16_pair(v.y));
}
",
        ),
    };
    format!(
        "@group(0) @binding({binding}) var<storage, read> w: array<{scalar}>;\n\
         @group(0) @binding({binding}) var<storage, read> w4: array<{vec4}>;{body}"
    )
}

/// A storage binding of a dispatch: a tensor, or an unused placeholder for an
/// optional input the kernel is told (by its parameters) not to read.
#[derive(Clone, Copy)]
pub(crate) enum Bind<'a> {
    Tensor(&'a WgpuTensor),
    Words(&'a Words),
    Unused,
}

impl<'a> From<&'a WgpuTensor> for Bind<'a> {
    fn from(t: &'a WgpuTensor) -> Self {
        Bind::Tensor(t)
    }
}

impl<'a> From<Option<&'a WgpuTensor>> for Bind<'a> {
    fn from(t: Option<&'a WgpuTensor>) -> Self {
        t.map_or(Bind::Unused, Bind::Tensor)
    }
}

struct Pending {
    encoder: Option<::wgpu::CommandEncoder>,
    params: Vec<u8>,
}

/// A pipeline's shader, entry point and the type of its weight read.
type PipelineKey = (&'static str, &'static str, DType);

struct Inner {
    gpu: Arc<Gpu>,
    options: WgpuOptions,
    arena: ::wgpu::Buffer,
    /// Bound where a kernel's optional input is absent.
    placeholder: ::wgpu::Buffer,
    pending: Mutex<Pending>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<::wgpu::ComputePipeline>>>,
    layouts: Mutex<HashMap<(u32, u32), Arc<::wgpu::BindGroupLayout>>>,
    /// Reusable buffers by size, a stack per size. Buffers retired together
    /// go back with the first retired on top, so work that takes and drops
    /// its scratch in the same order each time (a plan's forward) gets the
    /// same buffers each time, and so the same bind groups.
    free: Mutex<HashMap<u64, Vec<::wgpu::Buffer>>>,
    /// Buffers dropped since the last submit: reusable after the next one.
    retired: Mutex<Vec<::wgpu::Buffer>>,
    /// Bind groups by what they bind, reused by every dispatch that binds the
    /// same buffer ranges (a plan's forwards bind the same ones each time).
    bind_groups: Mutex<HashMap<BindGroupKey, ::wgpu::BindGroup>>,
    /// Command buffers submitted so far.
    submits: AtomicU64,
    /// Compute dispatches recorded so far.
    dispatches: AtomicU64,
    /// Bind groups made so far (the others came from `bind_groups`).
    bind_groups_made: AtomicU64,
    /// Timestamps of the dispatches recorded inside [`Wgpu::time_on_device`].
    timing: Mutex<Option<Timing>>,
}

/// The first dispatch of a timed region writes timestamp 0 at its start; every
/// dispatch writes timestamp 1 at its end, so the last one leaves the region's end.
struct Timing {
    queries: ::wgpu::QuerySet,
    recorded: bool,
}

/// The wgpu backend: a cheap handle (clone it freely) to one device.
#[derive(Clone)]
pub struct Wgpu {
    inner: Arc<Inner>,
}

/// The tensors a dispatch binds: each read's index with it, then the writes
/// (index None).
fn tensors_bound<'a>(
    reads: &'a [Bind<'a>],
    writes: &'a [&'a WgpuTensor],
) -> impl Iterator<Item = (Option<u32>, &'a WgpuTensor)> {
    let reads_at = reads.iter().enumerate().filter_map(|(i, b)| match b {
        Bind::Tensor(t) => Some((Some(i as u32), *t)),
        _ => None,
    });
    reads_at.chain(writes.iter().map(|t| (None, *t)))
}

/// A buffer range a bind group binds.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Binding {
    buffer: ::wgpu::Buffer,
    offset: u64,
    size: u64,
}

/// A bind group's layout (reads, writes) and its storage bindings in order
/// (the parameters' uniform binding is the arena at a dynamic offset in all).
type BindGroupKey = (u32, u32, Vec<Binding>);

/// At most this many bind groups are kept; past it the cache starts again.
const BIND_GROUPS_KEPT: usize = 4096;

/// A buffer and its backend; `pooled`: the buffer returns to the backend's
/// pool when the last tensor using it is dropped (else it is the caller's, and
/// only the bind groups that hold it on are let go).
struct Storage {
    buffer: ::wgpu::Buffer,
    owner: Weak<Inner>,
    pooled: bool,
}

impl Storage {
    fn new(buffer: ::wgpu::Buffer, owner: &Arc<Inner>, pooled: bool) -> Arc<Self> {
        Arc::new(Storage {
            buffer,
            owner: Arc::downgrade(owner),
            pooled,
        })
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        let Some(inner) = self.owner.upgrade() else {
            return;
        };
        if self.pooled {
            if let Ok(mut retired) = inner.retired.lock() {
                retired.push(self.buffer.clone());
            }
        } else if let Ok(mut groups) = inner.bind_groups.lock() {
            // A caller's buffer is freed when they let it go: no cached bind
            // group may keep it alive.
            groups.retain(|(_, _, bound), _| bound.iter().all(|b| b.buffer != self.buffer));
        }
    }
}

/// A tensor in a wgpu storage buffer, at a byte offset, in the backend's
/// precision (or, for a GEMM weight, in [`WgpuOptions::weights`]).
#[derive(Clone)]
pub struct WgpuTensor {
    storage: Arc<Storage>,
    offset: u64,
    shape: Vec<usize>,
    numel: usize,
    dtype: DType,
}

impl Shaped for WgpuTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl WgpuTensor {
    /// The buffer holding the tensor.
    pub fn buffer(&self) -> &::wgpu::Buffer {
        &self.storage.buffer
    }

    /// Where the tensor starts in [`WgpuTensor::buffer`], in bytes.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The element type: the backend's precision, or for a GEMM weight
    /// [`WgpuOptions::weights`]' (16-bit weights are packed two to a word).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes a binding of the tensor spans: whole 4-byte words, at least one.
    fn binding_bytes(&self) -> u64 {
        ((self.numel as u64) * self.dtype.size() as u64)
            .div_ceil(4)
            .max(1)
            * 4
    }
}

/// u32 words on the device (positions, masks), in a pooled buffer.
pub(crate) struct Words {
    storage: Arc<Storage>,
    len: usize,
}

/// A key padding mask on the device: one u32 per key, 1 = ignored.
pub struct WgpuMask {
    words: Words,
    batch: usize,
    keys: usize,
}

impl WgpuMask {
    pub(crate) fn words(&self) -> &Words {
        &self.words
    }

    /// Rows of the mask: the batch size `B` of the mask `[B, Lk]`.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Entries per row: the key count `Lk` of the mask `[B, Lk]`.
    pub fn keys(&self) -> usize {
        self.keys
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| Error::Backend {
        backend: "wgpu".into(),
        message: "internal state poisoned by an earlier failure".into(),
    })
}

/// Round `bytes` up to a multiple of 16 (the vec4 granule), at least 16.
fn padded(bytes: u64) -> Result<u64> {
    bytes
        .max(1)
        .div_ceil(16)
        .checked_mul(16)
        .ok_or_else(|| Error::Overflow(format!("a wgpu buffer of {bytes} bytes")))
}

impl Wgpu {
    /// Open the best adapter with default options.
    pub fn open() -> Result<Self> {
        Self::new(Arc::new(super::open()?), WgpuOptions::default())
    }

    /// A backend on an open device (yours or [`super::open`]'s).
    pub fn new(gpu: Arc<Gpu>, options: WgpuOptions) -> Result<Self> {
        if options.precision == Precision::F16
            && !gpu.features.contains(::wgpu::Features::SHADER_F16)
        {
            return Err(Error::Unavailable {
                backend: "wgpu".into(),
                reason: format!(
                    "f16 storage needs SHADER_F16, which `{}` lacks",
                    gpu.info.adapter
                ),
            });
        }
        if gpu.limits.min_uniform_buffer_offset_alignment as u64 > PARAM_SLOT {
            return Err(Error::Unavailable {
                backend: "wgpu".into(),
                reason: format!(
                    "uniform offsets must be aligned to {} bytes; this backend needs at most {PARAM_SLOT}",
                    gpu.limits.min_uniform_buffer_offset_alignment
                ),
            });
        }
        let (arena, placeholder) = gpu.scoped("creating the parameter arena", |device, _| {
            let arena = device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("params"),
                size: PARAM_SLOT * ARENA_SLOTS,
                usage: ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let placeholder = device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("unused input"),
                size: 16,
                usage: ::wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            });
            (arena, placeholder)
        })?;
        Ok(Wgpu {
            inner: Arc::new(Inner {
                gpu,
                options,
                arena,
                placeholder,
                pending: Mutex::new(Pending {
                    encoder: None,
                    params: Vec::new(),
                }),
                pipelines: Mutex::new(HashMap::new()),
                layouts: Mutex::new(HashMap::new()),
                free: Mutex::new(HashMap::new()),
                retired: Mutex::new(Vec::new()),
                bind_groups: Mutex::new(HashMap::new()),
                submits: AtomicU64::new(0),
                dispatches: AtomicU64::new(0),
                bind_groups_made: AtomicU64::new(0),
                timing: Mutex::new(None),
            }),
        })
    }

    /// This backend with other options on the same device. Pipelines and pooled
    /// buffers are not shared with the original.
    pub fn with_options(&self, options: WgpuOptions) -> Result<Self> {
        Self::new(Arc::clone(&self.inner.gpu), options)
    }

    /// Command buffers this backend has submitted so far (a projector forward
    /// and the download of its result take one).
    pub fn submits(&self) -> u64 {
        self.inner.submits.load(Ordering::Relaxed)
    }

    /// Bind groups this backend has made so far. A dispatch that binds the
    /// buffer ranges of an earlier one reuses its bind group, so a
    /// [`Projector::forward_with`](crate::projector::Projector::forward_with)
    /// on a plan makes none after the plan's first forward on that input.
    pub fn bind_groups_made(&self) -> u64 {
        self.inner.bind_groups_made.load(Ordering::Relaxed)
    }

    /// Bind groups held for reuse now. Those that bind a caller's buffer
    /// ([`Wgpu::tensor_from_buffer`], [`Wgpu::weight_from_buffer`]) are let go
    /// when a tensor made over it is dropped (all its clones), so that the
    /// cache never keeps a caller's buffer alive; at most 4096 are held.
    pub fn bind_groups_held(&self) -> Result<usize> {
        Ok(lock(&self.inner.bind_groups)?.len())
    }

    /// Compute dispatches this backend has recorded so far.
    pub fn dispatches(&self) -> u64 {
        self.inner.dispatches.load(Ordering::Relaxed)
    }

    /// The open device (queue, limits, features), shared with backends made by
    /// [`with_options`](Self::with_options).
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.inner.gpu
    }

    /// The options this backend was made with.
    pub fn options(&self) -> WgpuOptions {
        self.inner.options
    }

    pub(crate) fn version(&self) -> KernelVersion {
        self.inner.options.version
    }

    /// What the fast kernels are tuned for: [`WgpuOptions::tuning`], with
    /// [`Tuning::Auto`] resolved from the adapter (never `Auto`).
    pub fn tuning(&self) -> Tuning {
        self.inner.options.tuning.on(&self.inner.gpu.info)
    }

    /// The element type of every tensor of this backend.
    pub(crate) fn storage(&self) -> DType {
        self.inner.options.precision.dtype()
    }

    /// The element type of a GEMM weight: [`WgpuOptions::weights`]' on
    /// this backend's precision.
    pub(crate) fn weight_storage(&self) -> DType {
        self.inner.options.weights.dtype(self.storage())
    }

    /// A tensor over a buffer you own: `shape` elements of this backend's
    /// precision starting at byte `offset`. The buffer needs STORAGE, COPY_SRC
    /// and COPY_DST usage; the offset must meet the device's storage alignment.
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use output_projector::wgpu::wgpu::{BufferDescriptor, BufferUsages};
    /// use output_projector::wgpu::{Gpu, Wgpu, WgpuOptions};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let (adapter, device, queue): (
    /// #     output_projector::wgpu::wgpu::Adapter,
    /// #     output_projector::wgpu::wgpu::Device,
    /// #     output_projector::wgpu::wgpu::Queue,
    /// # ) = todo!();
    /// // The engine's device and queue: the backend records on them.
    /// let gpu = Arc::new(Gpu::from_device(&adapter.get_info(), device.clone(), queue));
    /// let be = Wgpu::new(gpu, WgpuOptions::default())?;
    ///
    /// // The LLM's states at the 4 [IMG] tokens, in the engine's buffer at byte 256.
    /// let states = device.create_buffer(&BufferDescriptor {
    ///     label: Some("engine's states"),
    ///     size: 256 + 4 * 4096 * 4,
    ///     usage: BufferUsages::STORAGE | BufferUsages::COPY_SRC | BufferUsages::COPY_DST,
    ///     mapped_at_creation: false,
    /// });
    /// let hidden = be.tensor_from_buffer(states, 256, &[1, 4, 4096])?; // no copy
    /// # let _ = hidden;
    /// # Ok(())
    /// # }
    /// ```
    pub fn tensor_from_buffer(
        &self,
        buffer: ::wgpu::Buffer,
        offset: u64,
        shape: &[usize],
    ) -> Result<WgpuTensor> {
        self.over_buffer(buffer, offset, shape, self.storage())
    }

    /// A GEMM weight over a buffer you own (`w` of `linear`, `[n, k]`
    /// row-major), in [`WgpuOptions::weights`]' type: f16 or bf16 weights
    /// already on the device (an engine's own) used as they are, two to a
    /// 32-bit word, element 0 in the low half. The same checks as
    /// [`tensor_from_buffer`](Self::tensor_from_buffer).
    pub fn weight_from_buffer(
        &self,
        buffer: ::wgpu::Buffer,
        offset: u64,
        shape: &[usize],
    ) -> Result<WgpuTensor> {
        self.over_buffer(buffer, offset, shape, self.weight_storage())
    }

    fn over_buffer(
        &self,
        buffer: ::wgpu::Buffer,
        offset: u64,
        shape: &[usize],
        dtype: DType,
    ) -> Result<WgpuTensor> {
        let need = ::wgpu::BufferUsages::STORAGE
            | ::wgpu::BufferUsages::COPY_SRC
            | ::wgpu::BufferUsages::COPY_DST;
        if !buffer.usage().contains(need) {
            return Err(Error::invalid(format!(
                "wgpu buffer usage {:?} lacks {:?}",
                buffer.usage(),
                need - buffer.usage()
            )));
        }
        let align = u64::from(self.inner.gpu.limits.min_storage_buffer_offset_alignment);
        if !offset.is_multiple_of(align) {
            return Err(Error::invalid(format!(
                "wgpu buffer offset {offset} is not a multiple of the device's storage alignment {align}"
            )));
        }
        let numel = checked_numel(shape, "wgpu tensor")?;
        let bytes = (numel as u64)
            .checked_mul(dtype.size() as u64)
            .and_then(|b| b.checked_add(offset))
            .ok_or_else(|| Error::Overflow(format!("wgpu tensor of shape {shape:?}")))?;
        // Kernels read whole 4-byte words: the binding is rounded up to 4 bytes.
        if bytes.div_ceil(4).saturating_mul(4) > buffer.size() {
            return Err(Error::invalid(format!(
                "wgpu buffer of {} bytes is too small for shape {shape:?} at offset {offset} ({bytes} bytes)",
                buffer.size()
            )));
        }
        Ok(WgpuTensor {
            storage: Storage::new(buffer, &self.inner, false),
            offset,
            shape: shape.to_vec(),
            numel,
            dtype,
        })
    }

    fn buffer(&self, bytes: u64) -> Result<::wgpu::Buffer> {
        let size = padded(bytes)?;
        if size > self.inner.gpu.limits.max_buffer_size {
            return Err(Error::OutOfMemory(format!(
                "a wgpu buffer of {size} bytes exceeds the device's limit of {}",
                self.inner.gpu.limits.max_buffer_size
            )));
        }
        if let Some(b) = lock(&self.inner.free)?.get_mut(&size).and_then(Vec::pop) {
            return Ok(b);
        }
        self.inner.gpu.scoped("allocating a buffer", |device, _| {
            device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("tensor"),
                size,
                usage: ::wgpu::BufferUsages::STORAGE
                    | ::wgpu::BufferUsages::COPY_SRC
                    | ::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
    }

    pub(crate) fn alloc_tensor(&self, shape: &[usize]) -> Result<WgpuTensor> {
        self.alloc_in(shape, self.storage())
    }

    /// A pooled scratch tensor of at least `n` 4-byte words whatever the
    /// storage type (two f16 elements make one word), for kernels that keep
    /// f32 sums there (`array<f32>` in the shader).
    pub(crate) fn alloc_f32_scratch(&self, n: usize) -> Result<WgpuTensor> {
        let per_word = 4 / self.storage().size();
        let numel = n
            .checked_mul(per_word)
            .ok_or_else(|| Error::Overflow(format!("wgpu scratch of {n} words")))?;
        self.alloc_tensor(&[numel])
    }

    fn alloc_in(&self, shape: &[usize], dtype: DType) -> Result<WgpuTensor> {
        let numel = checked_numel(shape, "wgpu tensor")?;
        let bytes = (numel as u64)
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| Error::Overflow(format!("wgpu tensor of shape {shape:?}")))?;
        let buffer = self.buffer(bytes)?;
        Ok(WgpuTensor {
            storage: Storage::new(buffer, &self.inner, true),
            offset: 0,
            shape: shape.to_vec(),
            numel,
            dtype,
        })
    }

    pub(crate) fn upload_tensor(&self, t: &HostTensor) -> Result<WgpuTensor> {
        self.upload_in(t, self.storage())
    }

    /// A GEMM weight in [`WgpuOptions::weights`].
    pub(crate) fn upload_weight_tensor(&self, t: &HostTensor) -> Result<WgpuTensor> {
        self.upload_in(t, self.weight_storage())
    }

    fn upload_in(&self, t: &HostTensor, dtype: DType) -> Result<WgpuTensor> {
        let out = self.alloc_in(t.shape(), dtype)?;
        let converted = t.to_storage(dtype, "wgpu upload")?;
        let mut bytes = converted.as_bytes().to_vec();
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        if !bytes.is_empty() {
            // Lands before the next submit's commands; the buffer is fresh or
            // was last used by work already submitted.
            self.inner.gpu.scoped("uploading a tensor", |_, queue| {
                queue.write_buffer(out.buffer(), out.offset, &bytes);
            })?;
        }
        Ok(out)
    }

    pub(crate) fn download_tensor(&self, t: &WgpuTensor) -> Result<HostTensor> {
        let bytes = (t.numel as u64) * t.dtype.size() as u64;
        let gpu = &self.inner.gpu;
        let raw = if bytes == 0 {
            self.flush()?;
            Vec::new()
        } else {
            let read = self.submit_pending(|encoder| {
                gpu.submit_read(encoder, t.buffer(), t.offset, bytes)
                    .map(Some)
            })?;
            // Waited for outside the lock: other threads record meanwhile.
            read.map_or(Ok(Vec::new()), |r| r.wait(gpu))?
        };
        let data = match t.dtype {
            DType::F16 => HostData::F16(bytemuck::pod_collect_to_vec(&raw)),
            DType::BF16 => HostData::BF16(bytemuck::pod_collect_to_vec(&raw)),
            _ => HostData::F32(bytemuck::pod_collect_to_vec(&raw)),
        };
        HostTensor::new(t.shape.clone(), data)
    }

    /// Copy u32 words to a pooled device buffer.
    pub(crate) fn upload_words(&self, words: &[u32]) -> Result<Words> {
        let bytes = (words.len() as u64)
            .checked_mul(4)
            .ok_or_else(|| Error::Overflow(format!("{} words", words.len())))?;
        let buffer = self.buffer(bytes)?;
        if !words.is_empty() {
            self.inner.gpu.scoped("uploading words", |_, queue| {
                queue.write_buffer(&buffer, 0, bytemuck::cast_slice(words));
            })?;
        }
        Ok(Words {
            storage: Storage::new(buffer, &self.inner, true),
            len: words.len(),
        })
    }

    pub(crate) fn upload_mask_words(&self, m: &KeyPaddingMask) -> Result<WgpuMask> {
        let words: Vec<u32> = m.ignore().iter().map(|&b| u32::from(b)).collect();
        Ok(WgpuMask {
            words: self.upload_words(&words)?,
            batch: m.batch(),
            keys: m.keys(),
        })
    }

    /// Submit the pending work and wait for it.
    pub(crate) fn sync(&self) -> Result<()> {
        let submission = self.flush()?;
        self.inner.gpu.wait(submission)
    }

    /// Submit the pending work ([`Wgpu::submit_pending`]), if there is any.
    fn flush(&self) -> Result<Option<::wgpu::SubmissionIndex>> {
        let gpu = &self.inner.gpu;
        self.submit_pending(|encoder| encoder.map(|e| gpu.submit(e)).transpose())
    }

    /// Hands the pending encoder (None where nothing is recorded), its
    /// parameters written into the arena, to `submit`, which submits it, and
    /// then lets the buffers retired so far be reused. All under the pending
    /// lock, so that another thread can neither write the one arena between
    /// these parameters and their submit, nor reuse a buffer whose last use
    /// is recorded but not yet submitted. `submit` returns None where it
    /// submitted nothing.
    fn submit_pending<T>(
        &self,
        submit: impl FnOnce(Option<::wgpu::CommandEncoder>) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let mut p = lock(&self.inner.pending)?;
        let encoder = p.encoder.take();
        let params = std::mem::take(&mut p.params);
        if !params.is_empty() {
            self.inner.gpu.scoped("writing parameters", |_, queue| {
                queue.write_buffer(&self.inner.arena, 0, &params);
            })?;
        }
        let submitted = submit(encoder)?;
        if submitted.is_some() {
            self.inner.submits.fetch_add(1, Ordering::Relaxed);
            // Every use of a buffer retired by now was recorded under this
            // lock, so into what was just submitted or earlier.
            let retired = std::mem::take(&mut *lock(&self.inner.retired)?);
            let mut free = lock(&self.inner.free)?;
            for b in retired.into_iter().rev() {
                free.entry(b.size()).or_default().push(b);
            }
        }
        drop(p);
        Ok(submitted)
    }

    fn layout(&self, reads: u32, writes: u32) -> Result<Arc<::wgpu::BindGroupLayout>> {
        let mut layouts = lock(&self.inner.layouts)?;
        if let Some(l) = layouts.get(&(reads, writes)) {
            return Ok(Arc::clone(l));
        }
        let storage = |binding: u32, read_only: bool| ::wgpu::BindGroupLayoutEntry {
            binding,
            visibility: ::wgpu::ShaderStages::COMPUTE,
            ty: ::wgpu::BindingType::Buffer {
                ty: ::wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let mut entries = vec![::wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: ::wgpu::ShaderStages::COMPUTE,
            ty: ::wgpu::BindingType::Buffer {
                ty: ::wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                min_binding_size: None,
            },
            count: None,
        }];
        entries.extend((0..reads).map(|i| storage(1 + i, true)));
        entries.extend((0..writes).map(|i| storage(1 + reads + i, false)));
        let layout = self
            .inner
            .gpu
            .scoped("creating a bind group layout", |device, _| {
                device.create_bind_group_layout(&::wgpu::BindGroupLayoutDescriptor {
                    label: None,
                    entries: &entries,
                })
            })?;
        let layout = Arc::new(layout);
        layouts.insert((reads, writes), Arc::clone(&layout));
        Ok(layout)
    }

    /// The pipeline of `k` reading its weight (if it has one) in `weight`.
    fn pipeline(&self, k: &Kernel, weight: DType) -> Result<Arc<::wgpu::ComputePipeline>> {
        let key = (k.shader, k.entry, weight);
        if let Some(p) = lock(&self.inner.pipelines)?.get(&key) {
            return Ok(Arc::clone(p));
        }
        let layout = self.layout(k.reads, k.writes)?;
        let source = module_source(k, self.inner.options.precision, weight);
        let what = format!("compiling shaders/{} ({})", k.shader, k.entry);
        let pipeline = self.inner.gpu.scoped(&what, |device, _| {
            let module = device.create_shader_module(::wgpu::ShaderModuleDescriptor {
                label: Some(k.shader),
                source: ::wgpu::ShaderSource::Wgsl(source.into()),
            });
            let pl = device.create_pipeline_layout(&::wgpu::PipelineLayoutDescriptor {
                label: Some(k.shader),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            device.create_compute_pipeline(&::wgpu::ComputePipelineDescriptor {
                label: Some(k.entry),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(k.entry),
                compilation_options: Default::default(),
                cache: None,
            })
        })?;
        let pipeline = Arc::new(pipeline);
        lock(&self.inner.pipelines)?.insert(key, Arc::clone(&pipeline));
        Ok(pipeline)
    }

    /// The bind group of a dispatch of `k` reading `reads` and writing
    /// `writes`, its parameters bound at a dynamic offset into the arena: made
    /// once per set of buffer ranges, then taken from the cache (a bind group
    /// costs microseconds to make, a forward makes dozens).
    fn bind_group(
        &self,
        k: &Kernel,
        reads: &[Bind<'_>],
        writes: &[&WgpuTensor],
    ) -> Result<::wgpu::BindGroup> {
        let binding = |buffer: &::wgpu::Buffer, offset: u64, size: u64| Binding {
            buffer: buffer.clone(),
            offset,
            size,
        };
        let tensor = |t: &WgpuTensor| binding(t.buffer(), t.offset, t.binding_bytes());
        let bound: Vec<Binding> = reads
            .iter()
            .map(|b| match b {
                Bind::Tensor(t) => tensor(t),
                Bind::Words(w) => binding(&w.storage.buffer, 0, (w.len as u64).max(1) * 4),
                Bind::Unused => binding(&self.inner.placeholder, 0, self.inner.placeholder.size()),
            })
            .chain(writes.iter().map(|t| tensor(t)))
            .collect();
        let key = (k.reads, k.writes, bound);
        if let Some(group) = lock(&self.inner.bind_groups)?.get(&key) {
            return Ok(group.clone());
        }
        // Checked where a group is made (a cached one passed): a range past
        // the device's limit would be a validation error in wgpu's words.
        let limit = self.inner.gpu.limits.max_storage_buffer_binding_size;
        if let Some((_, t)) = tensors_bound(reads, writes).find(|(_, t)| t.binding_bytes() > limit)
        {
            return Err(Error::OutOfMemory(format!(
                "wgpu {}: a tensor of shape {:?} spans {} bytes, past the {limit} bytes \
                 one binding may span on this device (max_storage_buffer_binding_size); \
                 a smaller batch fits",
                k.entry,
                t.shape,
                t.binding_bytes()
            )));
        }
        let layout = self.layout(k.reads, k.writes)?;
        let params = ::wgpu::BindGroupEntry {
            binding: 0,
            resource: ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
                buffer: &self.inner.arena,
                offset: 0,
                size: ::wgpu::BufferSize::new(PARAM_SLOT),
            }),
        };
        let entries: Vec<_> = std::iter::once(params)
            .chain(key.2.iter().zip(1..).map(|(b, i)| ::wgpu::BindGroupEntry {
                binding: i,
                resource: ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
                    buffer: &b.buffer,
                    offset: b.offset,
                    size: ::wgpu::BufferSize::new(b.size),
                }),
            }))
            .collect();
        let group = self.inner.gpu.scoped(k.entry, |device, _| {
            device.create_bind_group(&::wgpu::BindGroupDescriptor {
                label: None,
                layout: &layout,
                entries: &entries,
            })
        })?;
        self.inner.bind_groups_made.fetch_add(1, Ordering::Relaxed);
        let mut groups = lock(&self.inner.bind_groups)?;
        if groups.len() >= BIND_GROUPS_KEPT {
            groups.clear();
        }
        groups.insert(key, group.clone());
        Ok(group)
    }

    /// Record one dispatch of `k` over `groups` workgroups with parameter block
    /// `params` (at most 256 bytes), reading `reads` and writing `writes`.
    pub(crate) fn dispatch<P: bytemuck::Pod>(
        &self,
        k: &Kernel,
        params: &P,
        reads: &[Bind<'_>],
        writes: &[&WgpuTensor],
        groups: [u32; 3],
    ) -> Result<()> {
        let param_bytes = bytemuck::bytes_of(params);
        if param_bytes.len() as u64 > PARAM_SLOT
            || reads.len() != k.reads as usize
            || writes.len() != k.writes as usize
        {
            return Err(Error::Backend {
                backend: "wgpu".into(),
                message: format!("{}: dispatch does not match the kernel's bindings", k.entry),
            });
        }
        let max = self.inner.gpu.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::invalid(format!(
                "{}: {groups:?} workgroups exceed the device's {max} per dimension",
                k.entry
            )));
        }
        // A GEMM weight in its own type is read only where the kernel expects one.
        let storage = self.storage();
        let mut weight = storage;
        for (read, t) in tensors_bound(reads, writes) {
            if t.dtype == storage {
                continue;
            }
            if read.is_none() || read != k.weight {
                return Err(Error::invalid(format!(
                    "wgpu {}: a tensor of shape {:?} is a GEMM weight in {} \
                     (Backend::upload_weight); only linear's weight may be {}",
                    k.entry, t.shape, t.dtype, t.dtype
                )));
            }
            weight = t.dtype;
        }
        let pipeline = self.pipeline(k, weight)?;
        let bind_group = self.bind_group(k, reads, writes)?;
        let mut pending = lock(&self.inner.pending)?;
        while pending.params.len() as u64 >= PARAM_SLOT * ARENA_SLOTS {
            // The arena is full: submit what is recorded and start again
            // (again where another thread filled it in between).
            drop(pending);
            self.flush()?;
            pending = lock(&self.inner.pending)?;
        }
        let slot = pending.params.len() as u64;
        pending.params.extend_from_slice(param_bytes);
        pending.params.resize((slot + PARAM_SLOT) as usize, 0);

        let gpu = &self.inner.gpu;
        let pending = &mut *pending;
        let mut timing = lock(&self.inner.timing)?;
        let timestamps = timing.as_mut().map(|t| {
            let first = !t.recorded;
            t.recorded = true;
            ::wgpu::ComputePassTimestampWrites {
                query_set: &t.queries,
                beginning_of_pass_write_index: first.then_some(0),
                end_of_pass_write_index: Some(1),
            }
        });
        let recorded = gpu.scoped(k.entry, |device, _| {
            let encoder = pending.encoder.get_or_insert_with(|| {
                device.create_command_encoder(&::wgpu::CommandEncoderDescriptor {
                    label: Some("output-projector"),
                })
            });
            let mut pass = encoder.begin_compute_pass(&::wgpu::ComputePassDescriptor {
                label: Some(k.entry),
                timestamp_writes: timestamps,
            });
            pass.set_pipeline(&pipeline);
            // Slots are multiples of PARAM_SLOT, within the arena: a u32.
            pass.set_bind_group(0, &bind_group, &[slot as u32]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        });
        if recorded.is_ok() {
            self.inner.dispatches.fetch_add(1, Ordering::Relaxed);
        } else {
            // An encoder that saw an error is invalid: drop the work recorded in
            // it, so the next op starts clean.
            pending.encoder = None;
            pending.params.clear();
        }
        recorded
    }

    /// Run `f` and measure the device time of the work it records, from the start
    /// of its first dispatch to the end of its last, with timestamp queries.
    /// `None` where the adapter offers no timestamps or `f` dispatched nothing.
    /// Work pending before the call is submitted first.
    pub fn time_on_device<T>(
        &self,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Option<Duration>)> {
        let gpu = &self.inner.gpu;
        if !gpu.features.contains(::wgpu::Features::TIMESTAMP_QUERY) {
            return Ok((f()?, None));
        }
        self.sync()?;
        let queries = gpu.scoped("creating timestamp queries", |device, _| {
            device.create_query_set(&::wgpu::QuerySetDescriptor {
                label: Some("device time"),
                ty: ::wgpu::QueryType::Timestamp,
                count: 2,
            })
        })?;
        *lock(&self.inner.timing)? = Some(Timing {
            queries,
            recorded: false,
        });
        let value = f();
        let timing = lock(&self.inner.timing)?.take();
        let value = value?;
        let Some(Timing {
            queries,
            recorded: true,
        }) = timing
        else {
            return Ok((value, None));
        };
        let resolved = gpu.scoped("resolving timestamps", |device, _| {
            device.create_buffer(&::wgpu::BufferDescriptor {
                label: Some("timestamps"),
                size: 16,
                usage: ::wgpu::BufferUsages::QUERY_RESOLVE | ::wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        })?;
        let read = self.submit_pending(|mut encoder| {
            let enc = encoder.get_or_insert_with(|| {
                gpu.device
                    .create_command_encoder(&::wgpu::CommandEncoderDescriptor {
                        label: Some("timestamps"),
                    })
            });
            enc.resolve_query_set(&queries, 0..2, &resolved, 0);
            gpu.submit_read(encoder, &resolved, 0, 16).map(Some)
        })?;
        let raw = read.map_or(Ok(Vec::new()), |r| r.wait(gpu))?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&raw);
        let (start, end) = match ticks.as_slice() {
            [s, e] if e >= s => (*s, *e),
            _ => return Ok((value, None)),
        };
        let ns = (end - start) as f64 * f64::from(gpu.queue.get_timestamp_period());
        Ok((value, Some(Duration::from_nanos(ns as u64))))
    }

    /// Workgroups for `n` groups of work: as many as fit in x, the rest in y.
    /// Shaders recover the index as `wg.x + wg.y * num_workgroups.x` and must
    /// bounds-check it.
    pub(crate) fn grid(&self, n: usize) -> Result<[u32; 3]> {
        let max = self.inner.gpu.limits.max_compute_workgroups_per_dimension as usize;
        let n = n.max(1);
        let x = n.min(max);
        let y = n.div_ceil(x);
        if y > max {
            return Err(Error::invalid(format!(
                "{n} workgroups exceed what the device can dispatch"
            )));
        }
        Ok([x as u32, y as u32, 1])
    }
}
