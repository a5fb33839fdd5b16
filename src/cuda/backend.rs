//! The CUDA implementation of [`Backend`]: f32, f16 or bf16 tensors in device
//! memory ([`CudaOptions::storage`]; every sum is f32 whatever the storage), kernels
//! compiled by NVRTC for the device's own architecture on first use (once per
//! process, optionally cached on disk), and every op launched on ONE stream
//! without a host synchronisation, so a projector forward is a sequence of
//! launches the host does not wait for. Only [`Backend::download`] and
//! [`Backend::synchronize`] wait.
//!
//! Memory comes from a small caching allocator: freed blocks are kept by size
//! and reused by later allocations of the same size, which, being on the same
//! stream, are ordered after every kernel that used the block before. After the
//! first forward of a shape, a forward allocates nothing from the driver.
//!
//! Interop: [`Cuda::on_stream`] runs on a stream you own (wrap one from another
//! library with cudarc's `CudaContext::wrap_borrowed_stream`);
//! [`Cuda::tensor_from_slice`] and [`Cuda::tensor_from_raw`] make tensors over
//! device memory you own, for inputs and outputs alike.

use std::collections::HashMap;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::thread::ThreadId;

use cudarc::driver::result as drv;
use cudarc::driver::sys as drv_sys;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::program::{self, KernelCache, Program};
use super::{
    backend_error, driver_error_text, no_panic, probe_devices, require_driver, require_nvrtc, CUDA,
};
use crate::error::{Error, Result};
pub use crate::ops::KernelVersion;
use crate::ops::{
    attention_then_linear, layer_norm_then_linear, linear_then_layer_norm, AbsorbedAttentionDims,
    AbsorbedAttentionInput, Activation, AttentionDims, AttentionInput, AttentionSpec, Backend,
    Cols, GatherDims, KeyPaddingMask, LayerNormDims, LinearDims, LossDims, LossKind, NormAfter,
    NormInput, Shaped,
};
use crate::signal::SignalPositions;
use crate::tensor::{checked_numel, try_filled, DType, HostData, HostTensor};
use half::{bf16, f16};

/// Options of [`Cuda::new`] and [`Cuda::on_stream`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CudaOptions {
    /// Which kernels the ops launch: the tuned ones ([`KernelVersion::Fast`], default)
    /// or the naive v1 kernels ([`KernelVersion::Naive`]), the benchmarks' baseline.
    pub version: KernelVersion,
    /// Where compiled kernels are kept between runs (default: as
    /// `$OUTPROJ_KERNEL_CACHE` says, off when unset).
    pub kernel_cache: KernelCache,
    /// What the backend's tensors hold: `F32` (default), `F16` (`__half`) or
    /// `BF16` (`__nv_bfloat16`). Uploads convert to it, downloads return it;
    /// every kernel accumulates in f32, and `linear` runs on tensor cores
    /// (WMMA) for F16 and BF16 with the fast kernels. F16 and BF16 need sm_80
    /// or newer.
    pub storage: DType,
    /// Run f32 `linear` on TF32 tensor cores (default off): with `F32`
    /// storage and the fast kernels, the GEMM rounds x and w to TF32 (10-bit
    /// mantissa, as `cvt.rna.tf32.f32`) and sums the products in f32, like
    /// PyTorch's `allow_tf32`; bias, activation, residual and every other op
    /// stay f32. Relative error of a GEMM 1.6e-4 .. 2.9e-4 instead of
    /// ~2e-7, of the projector ~6e-4 (against the f64 reference), for several
    /// times the f32 rate on sm_80+ GPUs. Needs sm_80 or newer and f32 storage (either is
    /// [`Error::Invalid`] otherwise), and the CUDA headers' `mma.h` for NVRTC
    /// ([`Error::Unavailable`] without it). The naive kernels ignore it.
    pub tf32: bool,
    /// Start every kernel only once the one before it has finished (default
    /// off). Off, on sm_90 and newer, kernels are queued with programmatic
    /// dependent launch: a kernel's blocks become resident while its
    /// predecessor drains and wait for it on the GPU (`griddepcontrol.wait`,
    /// the first thing every kernel of this crate does), which hides the
    /// launch gap between dependent kernels, in graphs too (with a CUDA 12.3
    /// or newer driver). Results are bitwise the same either way; see
    /// [`Cuda::dependent_launch`].
    pub serial_launches: bool,
    /// Add split-K slices through a workspace in device memory everywhere
    /// (default off). Off, on GPUs with thread-block clusters (sm_90 and
    /// newer), a split GEMM's blocks of one output tile run as one cluster
    /// and add their slices through each other's shared memory: no
    /// workspace, and no round trips through L2 to finish a tile. A tile's
    /// slices are added in the same order either way, so where the split is
    /// the same (f32 on CUDA cores) results are bitwise the same; the
    /// tensor-core kernels split up to 8 ways in a cluster and 4 through
    /// memory, which changes the order of their sums. Through memory the
    /// decoder's LayerNorms no longer fold into their GEMMs
    /// ([`separate_layer_norms`](Self::separate_layer_norms)). See
    /// [`Cuda::cluster_split_k`].
    pub split_k_through_memory: bool,
    /// Run the f16 / bf16 GEMMs whose 128x128 output tiles alone fill the
    /// device (batch 64's decoder) on the WMMA kernel with those tiles
    /// (`linear_tc_large_vec8`) instead of the mma.sync one
    /// (`linear_mma_vec8`; default off): the baseline that kernel is measured
    /// against. Both add each 16 K columns' products in K order into f32;
    /// [`Cuda::linear_kernel`] says which kernel a GEMM takes.
    pub wmma_large_tiles: bool,
    /// Give those GEMMs the mma.sync kernel's 128x128 tiles always (default
    /// off). Off, a GEMM whose 128x128 tiles would fall unevenly on the SMs
    /// (batch 64's 4928x512 outputs: 156 tiles on 132 SMs) takes its 128x64
    /// tiles (`linear_mma_narrow_vec8`) instead; this is the baseline those
    /// are measured against. The same sums in the same order either way:
    /// bitwise the same output.
    pub square_mma_tiles: bool,
    /// Keep those GEMMs (and the LayerNorms folded into them) on the
    /// mma.sync kernels where the device has warpgroup MMA (default off).
    /// Off, on sm_90 (compiled as sm_90a) they run on `linear_wgmma_vec8` /
    /// `linear_wgmma_narrow_vec8`: the same tiles and stages, multiplied by
    /// `wgmma.mma_async` straight from shared memory instead of `ldmatrix`
    /// and `mma.sync`. This is the baseline those are measured against. The
    /// hardware's tensor cores may add a 16-column step's products in another
    /// order: results agree to rounding.
    pub mma_sync_tiles: bool,
    /// Run the GEMMs that take warpgroup MMA on `linear_wgmma_serial_vec8` /
    /// `linear_wgmma_serial_narrow_vec8` (default off): the same kernels
    /// with v6's first K loop, which waits for a step's MMAs before the next
    /// step's issue, so the tensor cores drain between steps. Off, one
    /// step's MMAs stay in flight while the next step's are issued. The
    /// baseline that loop is measured against; the LayerNorms folded into v6
    /// do not fold under it, and [`square_mma_tiles`](Self::square_mma_tiles)
    /// takes precedence. The same sums in the same order: bitwise the same
    /// output.
    pub wgmma_serial_steps: bool,
    /// Run every LayerNorm as a kernel of its own, before the linear that
    /// reads it (default off). Off, a LayerNorm folds into that linear where
    /// one kernel can do both: GEMMs of up to 16 rows, and, where split
    /// GEMMs run as thread-block clusters ([`Cuda::cluster_split_k`]), split
    /// GEMMs whose K fits one cluster's K steps (batch 1's decoder); or into
    /// the linear before it, whose output it reads
    /// ([`Backend::linear_layer_norm`]): 16-bit GEMMs on v5 of at most 512
    /// columns, on devices with clusters (batch 64's decoder). Folded, the
    /// norm's statistics are summed in another order: results agree to
    /// rounding, not bitwise.
    pub separate_layer_norms: bool,
    /// Run every attention as a kernel of its own, before the out-projection
    /// that reads it (default off). Off, an attention over few keys (up to
    /// 16) folds into that linear where it has up to 16 rows (batch 1's
    /// encoder): every block of the GEMM computes its rows' attention output
    /// itself, with the code and lanes of the attention kernel it replaces
    /// (`attention_few_keys`): results are bitwise the same either way.
    pub separate_attention: bool,
    /// Run every attention over more than 16 keys on the kernels that give
    /// a block a run of queries and walk all keys in it (v2, and v3 on
    /// tensor cores; default off). Off, where those would leave most SMs
    /// idle (the projector's decoder self-attention at batch 1 to 3: 40 and
    /// 8 blocks at batch 1), `attention_split_keys` splits each query's keys
    /// among 4 warps and combines their softmax states: a shorter chain per
    /// block, the same result to rounding. The baseline it is measured
    /// against.
    pub query_block_attention: bool,
    /// Run the projector's decoder cross-attention as its query projection,
    /// attention and output projection (default off). Off, where its keys
    /// are few ([`Backend::attention_absorbed_pays`]: heads x keys at most
    /// a quarter of the width, as the presets' 4 to 24 signal tokens give),
    /// both projections are absorbed into the memory's keys and values
    /// ([`Backend::attention_absorbed`], `attention_absorbed_rows`): one
    /// kernel per layer with both LayerNorms around it, instead of two GEMMs,
    /// an attention and a LayerNorm. The same function in another order of
    /// sums: results agree to rounding. The baseline it is measured against.
    pub literal_cross_attention: bool,
}

/// Most blocks of one thread-block cluster: the portable limit (sm_90), and
/// `LINEAR_MAX_CLUSTER` in kernels/linear.cu.
pub(crate) const MAX_CLUSTER: usize = 8;

/// Allocation granule: every block is a multiple of 256 bytes (and the driver
/// aligns blocks to at least 256 bytes, so 16-byte vector loads always qualify).
const GRANULE: usize = 256;

/// Freed device blocks by size, and the stream they are used on.
pub(crate) struct Pool {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Stream-ordered allocation (`cuMemAllocAsync`) is available.
    stream_ordered: bool,
    state: Mutex<PoolState>,
    /// Keeps other threads off the stream while one captures a CUDA graph on
    /// it (their work would be recorded into the graph): every stream
    /// operation holds a read guard, except on the capturing thread; a capture
    /// holds the write guard. It guards no data, so poisoning is ignored.
    stream_use: RwLock<()>,
}

#[derive(Default)]
struct PoolState {
    /// Freed blocks by size.
    free: HashMap<usize, Vec<drv_sys::CUdeviceptr>>,
    /// While a CUDA graph is being captured on the stream: the capturing
    /// thread and the blocks taken so far, with their sizes.
    capture: Option<(ThreadId, Vec<(drv_sys::CUdeviceptr, usize)>)>,
    /// Blocks taken during the capture of a live graph: its kernels use them
    /// on every replay, so nothing else may, until the graph is dropped.
    graph_owned: HashSet<drv_sys::CUdeviceptr>,
    /// The graph-owned blocks no tensor holds (by size); back to `free` when
    /// their graph is dropped.
    parked: HashMap<drv_sys::CUdeviceptr, usize>,
}

impl PoolState {
    fn capturing_here(&self) -> bool {
        self.capture
            .as_ref()
            .is_some_and(|(thread, _)| *thread == std::thread::current().id())
    }
}

impl Pool {
    fn raw_alloc(
        &self,
        bytes: usize,
    ) -> std::result::Result<drv_sys::CUdeviceptr, drv::DriverError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: the context is current; the memory is only ever used as raw
        // bytes by kernels and copies on `self.stream`, and freed once (by
        // `raw_free`, from `release_cached` or a failed return to the pool).
        unsafe {
            if self.stream_ordered {
                drv::malloc_async(self.stream.cu_stream(), bytes)
            } else {
                drv::malloc_sync(bytes)
            }
        }
    }

    fn raw_free(&self, ptr: drv_sys::CUdeviceptr) -> std::result::Result<(), drv::DriverError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: `ptr` came from `raw_alloc` and is freed exactly once. Work
        // queued on `self.stream` that still uses it is ordered before the
        // stream-ordered free; the synchronous free waits for the device.
        unsafe {
            if self.stream_ordered {
                drv::free_async(ptr, self.stream.cu_stream())
            } else {
                drv::free_sync(ptr)
            }
        }
    }

    /// Held around a stream operation: waits while another thread captures a
    /// graph; `None` on the capturing thread itself, whose launches are the
    /// capture. `inside_capture` names an operation the capturing thread may
    /// not do (a copy, a wait): an error there.
    fn use_stream(&self, inside_capture: Option<&str>) -> Result<Option<RwLockReadGuard<'_, ()>>> {
        if lock(&self.state)?.capturing_here() {
            return match inside_capture {
                Some(what) => Err(Error::invalid(format!(
                    "{what} inside a CUDA graph capture (only kernel launches can be captured)"
                ))),
                None => Ok(None),
            };
        }
        Ok(Some(
            self.stream_use
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        ))
    }

    fn take(self: &Arc<Self>, bytes: usize) -> Result<Block> {
        let size = bytes
            .max(1)
            .checked_next_multiple_of(GRANULE)
            .ok_or_else(|| Error::Overflow(format!("a device allocation of {bytes} bytes")))?;
        let _stream = self.use_stream(None)?;
        {
            let mut state = lock(&self.state)?;
            if let Some(ptr) = state.free.get_mut(&size).and_then(Vec::pop) {
                if let Some((_, taken)) = &mut state.capture {
                    taken.push((ptr, size));
                }
                return Ok(Block {
                    ptr,
                    size,
                    pool: Arc::clone(self),
                });
            }
            if state.capture.is_some() {
                // A driver allocation would become part of the graph.
                return Err(Error::invalid(format!(
                    "a CUDA graph capture needed {size} bytes the memory pool did not hold \
                     (the forward before the capture should have left them there)"
                )));
            }
        }
        let ptr = match self.raw_alloc(size) {
            Ok(ptr) => ptr,
            Err(e) if e.0 == drv_sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => {
                // Give the cached blocks back to the driver and try once more.
                self.release_cached_locked();
                self.raw_alloc(size).map_err(|e| {
                    Error::OutOfMemory(format!(
                        "CUDA allocation of {size} bytes: {}",
                        driver_error_text(e)
                    ))
                })?
            }
            Err(e) => {
                return Err(backend_error(
                    CUDA,
                    format!("allocating {size} bytes: {}", driver_error_text(e)),
                ))
            }
        };
        Ok(Block {
            ptr,
            size,
            pool: Arc::clone(self),
        })
    }

    /// From now until [`Pool::end_capture`], blocks come only from the cache
    /// and are recorded, and only this thread uses the stream (the caller
    /// holds `stream_use` for writing).
    fn begin_capture(&self) -> Result<()> {
        let mut state = lock(&self.state)?;
        if state.capture.is_some() {
            return Err(Error::invalid(
                "a CUDA graph is already being captured on this stream",
            ));
        }
        state.capture = Some((std::thread::current().id(), Vec::new()));
        Ok(())
    }

    /// Ends the recording: the blocks taken during it become the graph's
    /// (parked if no tensor holds them any more); returns them.
    fn end_capture(&self) -> Vec<(drv_sys::CUdeviceptr, usize)> {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some((_, mut taken)) = state.capture.take() else {
            return Vec::new();
        };
        taken.sort_unstable();
        taken.dedup();
        for &(ptr, size) in &taken {
            state.graph_owned.insert(ptr);
            if let Some(list) = state.free.get_mut(&size) {
                if let Some(i) = list.iter().position(|&p| p == ptr) {
                    list.swap_remove(i);
                    state.parked.insert(ptr, size);
                }
            }
        }
        taken
    }

    /// A graph's blocks, free for anyone again.
    fn release_graph(&self, blocks: &[(drv_sys::CUdeviceptr, usize)]) {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        for &(ptr, size) in blocks {
            state.graph_owned.remove(&ptr);
            // A block still held by a tensor comes back when that is dropped.
            if state.parked.remove(&ptr).is_some() {
                state.free.entry(size).or_default().push(ptr);
            }
        }
    }

    /// Returns every cached block to the driver (graphs' blocks excepted: they
    /// are never in the cache).
    fn release_cached(&self) {
        if let Ok(_stream) = self.use_stream(Some("releasing cached memory")) {
            self.release_cached_locked();
        }
    }

    /// [`release_cached`](Self::release_cached) for a caller holding the stream.
    fn release_cached_locked(&self) {
        let blocks: Vec<drv_sys::CUdeviceptr> = match self.state.lock() {
            Ok(mut state) => state.free.drain().flat_map(|(_, v)| v).collect(),
            Err(_) => return,
        };
        for ptr in blocks {
            let result = self.raw_free(ptr);
            self.ctx.record_err(result);
        }
    }

    fn cached_bytes(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.free.iter().map(|(size, v)| size * v.len()).sum())
            .unwrap_or(0)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // No graph outlives the backends that hold the pool: its parked blocks
        // are the last of its memory.
        if let Ok(state) = self.state.get_mut() {
            for (ptr, size) in std::mem::take(&mut state.parked) {
                state.free.entry(size).or_default().push(ptr);
            }
        }
        self.release_cached_locked();
    }
}

/// A device block from the pool; dropping it returns it to the pool.
pub(crate) struct Block {
    ptr: drv_sys::CUdeviceptr,
    size: usize,
    pool: Arc<Pool>,
}

impl Block {
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        match self.pool.state.lock() {
            Ok(mut state) => {
                if state.graph_owned.contains(&self.ptr) {
                    state.parked.insert(self.ptr, self.size);
                } else {
                    state.free.entry(self.size).or_default().push(self.ptr);
                }
            }
            Err(_) => {
                let result = self.pool.raw_free(self.ptr);
                self.pool.ctx.record_err(result);
            }
        }
    }
}

/// A captured CUDA graph (see [`Cuda::capture`]) and the pool blocks its
/// kernels use, which nothing else gets until it is dropped.
pub(crate) struct Graph {
    exec: CudaGraph,
    /// Kernels in the graph.
    kernels: u64,
    _blocks: GraphBlocks,
}

impl Graph {
    pub(crate) fn kernels(&self) -> u64 {
        self.kernels
    }
}

// SAFETY: the driver's graph handles may be used from any thread with their
// context current, which cudarc makes so before each launch, and `Drop`
// below before the destroy. They are not internally synchronised, so
// `Graph` is not `Sync`: whoever owns it launches it from one thread at a
// time.
unsafe impl Send for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        // cudarc destroys the graph on the dropping thread, which need not
        // be the capturing one; an error is recorded on the context, as a
        // failed destroy would be.
        let bound = self._blocks.pool.ctx.bind_to_thread();
        self._blocks.pool.ctx.record_err(bound);
    }
}

struct GraphBlocks {
    pool: Arc<Pool>,
    blocks: Vec<(drv_sys::CUdeviceptr, usize)>,
}

impl Drop for GraphBlocks {
    fn drop(&mut self) {
        self.pool.release_graph(&self.blocks);
    }
}

/// Where a tensor's memory comes from.
enum Memory {
    /// The backend's pool (held for its Drop, which returns the block).
    Pooled(#[allow(dead_code)] Block),
    /// A caller's cudarc slice, kept alive by the tensor.
    Slice(CudaSlice<f32>),
    /// A caller's raw device pointer (see [`Cuda::tensor_from_raw`]).
    Raw,
}

/// A tensor in device memory, of its backend's storage type: the backend's own,
/// or memory you own (see [`Cuda::tensor_from_slice`] and [`Cuda::tensor_from_raw`]).
pub struct CudaTensor {
    memory: Memory,
    ptr: u64,
    shape: Vec<usize>,
    numel: usize,
    /// Element type (the storage of the backend that made it).
    dtype: DType,
    /// The CUDA context the memory belongs to (as an address, for checks).
    ctx: usize,
}

impl Shaped for CudaTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaTensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .finish()
    }
}

impl CudaTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Element type in device memory.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device address of element 0, e.g. to hand the tensor to another
    /// library. Valid while the tensor lives; work on it is ordered by the
    /// backend's stream.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// The cudarc slice this tensor was made from with
    /// [`Cuda::tensor_from_slice`], back to its owner; `None` for other tensors.
    /// Work already queued on the backend's stream may still use it: order your
    /// next use after it (same stream, or `synchronize`).
    pub fn into_slice(self) -> Option<CudaSlice<f32>> {
        match self.memory {
            Memory::Slice(s) => Some(s),
            _ => None,
        }
    }

    fn bytes(&self) -> u64 {
        self.numel as u64 * self.dtype.size() as u64
    }
}

/// A key padding mask on the device: one byte per key, 1 = ignored.
pub struct CudaMask {
    block: Block,
    batch: usize,
    keys: usize,
}

impl CudaMask {
    /// Rows of the mask: the batch size `B` of the mask `[B, Lk]`.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Entries per row: the key count `Lk` of the mask `[B, Lk]`.
    pub fn keys(&self) -> usize {
        self.keys
    }
}

/// A module loaded into the context, and its kernels.
struct Loaded {
    _module: Arc<CudaModule>,
    functions: HashMap<&'static str, CudaFunction>,
}

/// What every backend on one stream shares: the device, loaded kernels, pool.
struct Shared {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    /// Compute capability major version.
    cc_major: i32,
    /// The driver's CUDA version, e.g. 12030 for 12.3.
    driver_version: i32,
    /// The device launches thread-block clusters.
    clusters: bool,
    device_name: String,
    sm_count: u32,
    /// Bytes of L2 cache (0 where the driver does not say).
    l2_bytes: usize,
    /// Loaded modules by (file, storage type).
    modules: Mutex<HashMap<(&'static str, DType), Arc<Loaded>>>,
    pool: Arc<Pool>,
    /// Kernels launched on the stream so far (captured ones included).
    launches: AtomicU64,
    /// Split-K tile counters (u32, one per SM: a split GEMM has fewer tiles
    /// than SMs), zero between launches; see kernels/linear.cu.
    tile_counters: Block,
}

struct Inner {
    shared: Arc<Shared>,
    options: CudaOptions,
    cache_dir: Option<PathBuf>,
}

/// The CUDA backend: a cheap handle (clone it freely) to one stream of one
/// device, with its compiled kernels and memory pool.
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("device", &self.inner.shared.device_name)
            .field("arch", &self.inner.shared.arch)
            .field("version", &self.inner.options.version)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| backend_error(CUDA, "internal state poisoned by an earlier failure"))
}

fn driver(what: &str) -> impl Fn(drv::DriverError) -> Error + '_ {
    move |e| backend_error(CUDA, format!("{what}: {}", driver_error_text(e)))
}

/// [`driver`] with the message written only on failure: for calls made per
/// launch, where formatting it every time costs more than the call's own
/// bookkeeping.
fn driver_lazy(what: impl Fn() -> String) -> impl Fn(drv::DriverError) -> Error {
    move |e| backend_error(CUDA, format!("{}: {}", what(), driver_error_text(e)))
}

/// `n` as a kernel's 32-bit int, or an error naming `what`.
pub(crate) fn i32_of(what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| {
        Error::Overflow(format!(
            "{what}: {n} does not fit the 32-bit indices of the CUDA kernels"
        ))
    })
}

/// Checks that tensors of `shapes` could be given to the kernels (element
/// counts within their 32-bit indices): for the queries that take sizes, not
/// tensors, such as [`Cuda::linear_kernel`].
pub(crate) fn launchable(what: &str, shapes: &[&[usize]]) -> Result<()> {
    for shape in shapes {
        i32_of(what, checked_numel(shape, what)?)?;
    }
    Ok(())
}

/// The dims of an `m x k` by `n` linear asked about by size, checked as a
/// call's would be.
fn linear_query(m: usize, n: usize, k: usize) -> Result<LinearDims> {
    let (x, w, out) = ([m, k], [n, k], [m, n]);
    launchable("linear", &[&x, &w, &out])?;
    LinearDims::check(&x, &w, None, None, &out)
}

/// Blocks of `threads` covering `n` items, as a grid size.
pub(crate) fn blocks_for(what: &str, n: usize, threads: usize) -> Result<u32> {
    let blocks = n.div_ceil(threads).max(1);
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::Overflow(format!("{what}: {blocks} blocks exceed CUDA's grid")))
}

impl Cuda {
    /// The first device with default options.
    pub fn open() -> Result<Self> {
        Self::new(0, CudaOptions::default())
    }

    /// A backend on device `ordinal` (its primary context) with a new stream of
    /// its own. No driver, no device or no NVRTC is [`Error::Unavailable`].
    pub fn new(ordinal: usize, options: CudaOptions) -> Result<Self> {
        let devices = probe_devices()?;
        if ordinal >= devices.len() {
            return Err(Error::invalid(format!(
                "CUDA device {ordinal} requested, but only {} found",
                devices.len()
            )));
        }
        require_nvrtc()?;
        no_panic(CUDA, || {
            let ctx = CudaContext::new(ordinal)
                .map_err(driver(&format!("creating a context on device {ordinal}")))?;
            let stream = ctx.new_stream().map_err(driver("creating a stream"))?;
            Self::build(stream, options)
        })
    }

    /// A backend that launches everything on `stream`, a stream you own (its
    /// context is the backend's). The stream must outlive the backend and every
    /// tensor it made; ordering this work with work you submit elsewhere is up
    /// to you (submit on the same stream, or use events).
    ///
    /// ```no_run
    /// use output_projector::cuda::cudarc::driver::CudaContext;
    /// use output_projector::cuda::{Cuda, CudaOptions};
    /// use output_projector::projector::Projector;
    /// use output_projector::weights::{ProjectorWeights, Selection, TensorFile};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // The engine's context (device 0's primary one, which PyTorch uses too)
    /// // and its stream.
    /// let ctx = CudaContext::new(0)?;
    /// let stream = ctx.new_stream()?;
    /// let cuda = Cuda::on_stream(stream.clone(), CudaOptions::default())?;
    /// let file = TensorFile::open("nextgpt.safetensors")?;
    /// let projector = Projector::new(cuda.clone(), &ProjectorWeights::load(&file, &Selection::default())?)?;
    ///
    /// // The LLM's states at the 4 [IMG] tokens, already in the engine's device
    /// // memory: wrapped, not copied (`tensor_from_raw` for a raw pointer).
    /// let states = stream.alloc_zeros::<f32>(4 * 4096)?;
    /// let hidden = cuda.tensor_from_slice(states, &[1, 4, 4096])?;
    /// let mut plan = projector.plan(1, 4)?;
    /// // Queued on `stream`: the engine's later work there is ordered after it.
    /// let conditioning = projector.forward_with(&mut plan, &hidden, None)?;
    /// let at = conditioning.device_ptr(); // [1, 77, 768] f32, read in place
    /// # let _ = at;
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_stream(stream: Arc<CudaStream>, options: CudaOptions) -> Result<Self> {
        require_driver()?;
        require_nvrtc()?;
        no_panic(CUDA, || Self::build(stream, options))
    }

    fn build(stream: Arc<CudaStream>, options: CudaOptions) -> Result<Self> {
        super::program::elem_code(options.storage)?;
        let ctx = Arc::clone(stream.context());
        ctx.bind_to_thread()
            .map_err(driver("binding the context"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        let sm_count = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("reading the multiprocessor count"))?;
        let l2_bytes = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(driver("reading the L2 cache size"))?;
        let l2_bytes = usize::try_from(l2_bytes).unwrap_or(0);
        let clusters = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH)
            .map_err(driver("asking whether the device launches clusters"))?
            != 0;
        let device_name = ctx.name().map_err(driver("reading the device name"))?;
        let mut driver_version = 0;
        // SAFETY: writes one int.
        unsafe { drv_sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(driver("reading the driver version"))?;
        let pool = Arc::new(Pool {
            ctx: Arc::clone(&ctx),
            stream: Arc::clone(&stream),
            stream_ordered: ctx.has_async_alloc(),
            state: Mutex::new(PoolState::default()),
            stream_use: RwLock::new(()),
        });
        let sm_count = u32::try_from(sm_count.max(1)).unwrap_or(1);
        let counter_bytes = sm_count as usize * 4;
        let tile_counters = pool.take(counter_bytes)?;
        // SAFETY: the block holds `counter_bytes` bytes; the memset is queued on
        // the stream every kernel that uses the counters is ordered after.
        unsafe { drv::memset_d8_async(tile_counters.ptr, 0, counter_bytes, stream.cu_stream()) }
            .map_err(driver("clearing the split-K counters"))?;
        let shared = Arc::new(Shared {
            arch: super::device_arch(major, minor),
            cc_major: major,
            driver_version,
            clusters,
            device_name,
            sm_count,
            l2_bytes,
            modules: Mutex::new(HashMap::new()),
            tile_counters,
            pool,
            launches: AtomicU64::new(0),
            stream,
            ctx,
        });
        Self::check_storage(&shared.arch, major, &options)?;
        Ok(Self::with_shared(shared, options))
    }

    /// F16 and BF16 storage need sm_80 (bf16 WMMA, and one rule for both);
    /// so does TF32, which applies to f32 storage only (said first: it is
    /// wrong on any device) and needs `mma.h`.
    fn check_storage(arch: &str, major: i32, options: &CudaOptions) -> Result<()> {
        super::program::elem_code(options.storage)?;
        if options.tf32 && options.storage != DType::F32 {
            return Err(Error::invalid(format!(
                "tf32 applies to f32 storage only; with {} storage linear already runs on \
                 {} tensor cores",
                options.storage.name(),
                options.storage.name()
            )));
        }
        if options.storage != DType::F32 && major < 8 {
            return Err(Error::invalid(format!(
                "{} storage needs sm_80 or newer; this device is {arch}",
                options.storage.name()
            )));
        }
        if options.tf32 {
            if major < 8 {
                return Err(Error::invalid(format!(
                    "tf32 needs sm_80 or newer (TF32 tensor cores); this device is {arch}"
                )));
            }
            if !program::mma_header_found() {
                return Err(super::unavailable(
                    CUDA,
                    "tf32 needs mma.h from the CUDA headers for NVRTC; set \
                     OUTPROJ_CUDA_INCLUDE to the folder holding it",
                ));
            }
        }
        Ok(())
    }

    fn with_shared(shared: Arc<Shared>, options: CudaOptions) -> Self {
        Cuda {
            inner: Arc::new(Inner {
                shared,
                cache_dir: options.kernel_cache.folder(),
                options,
            }),
        }
    }

    /// This backend with other options (e.g. the naive kernels) on the same
    /// stream, sharing its memory pool and loaded kernels.
    pub fn with_options(&self, options: CudaOptions) -> Result<Self> {
        let shared = &self.inner.shared;
        Self::check_storage(&shared.arch, shared.cc_major, &options)?;
        Ok(Self::with_shared(Arc::clone(&self.inner.shared), options))
    }

    /// The options this backend was made with.
    pub fn options(&self) -> &CudaOptions {
        &self.inner.options
    }

    /// Which kernels the ops launch ([`CudaOptions::version`]).
    pub fn version(&self) -> KernelVersion {
        self.inner.options.version
    }

    /// The storage type of this backend's tensors.
    pub fn storage(&self) -> DType {
        self.inner.options.storage
    }

    /// The stream every op is launched on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.shared.stream
    }

    /// The CUDA context of the stream (for [`Cuda::new`], the device's primary context).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.shared.ctx
    }

    /// The architecture kernels are compiled for, e.g. `sm_89`; `sm_90a` on sm_90
    /// devices (for warpgroup MMA).
    pub fn arch(&self) -> &str {
        &self.inner.shared.arch
    }

    /// The device's name as the driver reports it, e.g. `NVIDIA H200`.
    pub fn device_name(&self) -> &str {
        &self.inner.shared.device_name
    }

    /// Streaming multiprocessors of the device.
    pub fn sm_count(&self) -> u32 {
        self.inner.shared.sm_count
    }

    /// Bytes of the device's L2 cache (0 where the driver does not say).
    pub fn l2_bytes(&self) -> usize {
        self.inner.shared.l2_bytes
    }

    /// Whether kernels are queued with programmatic dependent launch: sm_90
    /// or newer with a CUDA 12.3 or newer driver (which captures such
    /// launches into graphs), unless [`CudaOptions::serial_launches`] is set.
    pub fn dependent_launch(&self) -> bool {
        let shared = &self.inner.shared;
        shared.cc_major >= 9
            && shared.driver_version >= 12030
            && !self.inner.options.serial_launches
    }

    /// Whether a split GEMM's blocks of one tile run as a thread-block
    /// cluster and add their K slices through distributed shared memory:
    /// devices that launch clusters (sm_90 and newer), unless
    /// [`CudaOptions::split_k_through_memory`] is set.
    pub fn cluster_split_k(&self) -> bool {
        self.inner.shared.clusters && !self.inner.options.split_k_through_memory
    }

    /// Whether the device launches thread-block clusters (sm_90 and newer).
    pub(crate) fn launches_clusters(&self) -> bool {
        self.inner.shared.clusters
    }

    /// The kernel `linear` launches for an `m x k` input and `n` outputs
    /// (16-byte aligned operands, as this backend allocates them), without
    /// its storage suffix: e.g. `linear_rows_vec4` for few rows,
    /// `linear_tc_vec8` for a split 16-bit GEMM, `linear_mma_vec8` for a
    /// 16-bit GEMM of many tiles. What nsys and ncu show it as, with
    /// `_f16` / `_bf16` appended for 16-bit storage.
    pub fn linear_kernel(&self, m: usize, n: usize, k: usize) -> Result<&'static str> {
        super::linear::kernel_for(self, linear_query(m, n, k)?)
    }

    /// The kernel that runs an `m x k` by `n` linear and the LayerNorm of its
    /// output as one ([`Backend::linear_layer_norm`]), without its storage
    /// suffix: `linear_layer_norm_wgmma_vec8` or `linear_layer_norm_mma_vec8`;
    /// `None` where they run as two ops.
    pub fn linear_layer_norm_kernel(&self, m: usize, n: usize, k: usize) -> Option<&'static str> {
        super::linear::linear_layer_norm_kernel(self, linear_query(m, n, k).ok()?)
    }

    /// What this backend does on its device, in one line (`outproj info`):
    /// its SMs and L2, the precisions the device takes, and, with default
    /// options, how kernels are queued, how split GEMMs add their slices and
    /// what the 16-bit GEMMs of many tiles run on.
    pub fn summary(&self) -> String {
        let shared = &self.inner.shared;
        let precisions = match (shared.cc_major >= 8, program::mma_header_found()) {
            (true, true) => "f32, tf32, f16, bf16",
            (true, false) => "f32, f16, bf16 (tf32 needs mma.h)",
            (false, _) => "f32 (f16, bf16 and tf32 need sm_80)",
        };
        let dependent = if shared.cc_major < 9 {
            "one by one (dependent launch needs sm_90)"
        } else if shared.driver_version < 12030 {
            "one by one (dependent launch needs a CUDA 12.3 driver)"
        } else {
            "with programmatic dependent launch"
        };
        let split = if shared.clusters {
            "in thread-block clusters"
        } else {
            "through memory (no clusters)"
        };
        let gemm16 = if shared.cc_major < 8 {
            ""
        } else if super::linear::Gemm::for_storage(
            DType::BF16,
            &CudaOptions::default(),
            &shared.arch,
        ) == super::linear::Gemm::Warpgroup
        {
            "; 16-bit GEMMs of many tiles on warpgroup MMA (wgmma)"
        } else {
            "; 16-bit GEMMs of many tiles on mma.sync"
        };
        format!(
            "{} SMs, {} MiB L2; precisions {precisions}; kernels queued {dependent}; \
             split-K {split}{gemm16}",
            shared.sm_count,
            shared.l2_bytes >> 20
        )
    }

    /// Whether the 16-bit GEMMs of many tiles run on warpgroup MMA (v6,
    /// `linear_wgmma_vec8`): 16-bit storage on sm_90 (compiled as sm_90a),
    /// unless [`CudaOptions::mma_sync_tiles`] or
    /// [`CudaOptions::wmma_large_tiles`] is set.
    pub fn warpgroup_mma(&self) -> bool {
        matches!(
            super::linear::gemm_of(self),
            super::linear::Gemm::Warpgroup
                | super::linear::Gemm::WarpgroupSquare
                | super::linear::Gemm::WarpgroupSerial
        )
    }

    /// The kernel `attention` launches for `batch` sequences of `lq` queries
    /// and `lk` keys in `heads` heads of `head_dim` columns, without its
    /// storage suffix: e.g. `attention_split_keys` for batch 1's decoder
    /// self-attention, `attention_tc_d128` (16-bit) or
    /// `attention_flash_d128_q16` (f32) for batch 64's.
    pub fn attention_kernel(
        &self,
        batch: usize,
        lq: usize,
        lk: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<&'static str> {
        super::attention::kernel_for(self, batch, lq, lk, heads, head_dim)
    }

    /// Bytes held by the pool for reuse.
    pub fn cached_bytes(&self) -> usize {
        self.inner.shared.pool.cached_bytes()
    }

    /// Returns the pool's cached blocks to the driver.
    pub fn release_cached(&self) {
        self.inner.shared.pool.release_cached();
    }

    /// Compiles (or finds in the caches) and loads every kernel now rather than
    /// on first use, e.g. before timing.
    pub fn warm_up(&self) -> Result<()> {
        for p in program::PROGRAMS {
            for k in p.kernels_for(self.storage(), self.arch()) {
                self.function(p, k)?;
            }
        }
        Ok(())
    }

    fn ctx_id(&self) -> usize {
        self.inner.shared.ctx.cu_ctx() as usize
    }

    /// A tensor of `shape` over a cudarc slice you allocated on this backend's
    /// stream ([`Cuda::stream`]); the tensor owns the slice until
    /// [`CudaTensor::into_slice`] gives it back. F32 storage only (use
    /// [`Cuda::tensor_from_raw`] for f16/bf16 memory).
    pub fn tensor_from_slice(&self, slice: CudaSlice<f32>, shape: &[usize]) -> Result<CudaTensor> {
        if self.storage() != DType::F32 {
            return Err(Error::invalid(format!(
                "an f32 CUDA slice cannot be a tensor of a backend with {} storage",
                self.storage().name()
            )));
        }
        if **slice.stream() != *self.inner.shared.stream {
            return Err(Error::invalid(
                "a CUDA slice must be allocated on the backend's stream (Cuda::stream) to be \
                 used as a tensor; copy it or create the backend with Cuda::on_stream",
            ));
        }
        let numel = checked_numel(shape, "cuda tensor")?;
        if numel > slice.len() {
            return Err(Error::invalid(format!(
                "a CUDA slice of {} elements is too small for shape {shape:?}",
                slice.len()
            )));
        }
        let ptr = {
            let (ptr, _record) = slice.device_ptr(&self.inner.shared.stream);
            ptr
        };
        Ok(CudaTensor {
            memory: Memory::Slice(slice),
            ptr,
            shape: shape.to_vec(),
            numel,
            dtype: DType::F32,
            ctx: self.ctx_id(),
        })
    }

    /// A tensor of `shape` over device memory you own, starting at `ptr`
    /// (`len` elements of the backend's storage type available from there).
    ///
    /// # Safety
    /// - `ptr` must point to at least `len` elements of the storage type of
    ///   device memory of this backend's context, aligned to the element size
    ///   (16-byte alignment enables the vector paths);
    /// - the memory must stay allocated, and must not be written by anything
    ///   else, while the tensor lives and while work queued with it on the
    ///   backend's stream has not finished;
    /// - memory given as an op's output must not overlap memory the op reads
    ///   (the backend checks this only between tensors it is given).
    pub unsafe fn tensor_from_raw(
        &self,
        ptr: u64,
        len: usize,
        shape: &[usize],
    ) -> Result<CudaTensor> {
        let size = self.storage().size() as u64;
        if ptr == 0 || !ptr.is_multiple_of(size) {
            return Err(Error::invalid(format!(
                "device pointer {ptr:#x} is null or not {size}-byte aligned"
            )));
        }
        let numel = checked_numel(shape, "cuda tensor")?;
        if numel > len {
            return Err(Error::invalid(format!(
                "device memory of {len} elements is too small for shape {shape:?}"
            )));
        }
        let end = (numel as u64)
            .checked_mul(size)
            .and_then(|b| b.checked_add(ptr));
        if end.is_none() {
            return Err(Error::Overflow(format!("device range at {ptr:#x}")));
        }
        Ok(CudaTensor {
            memory: Memory::Raw,
            ptr,
            shape: shape.to_vec(),
            numel,
            dtype: self.storage(),
            ctx: self.ctx_id(),
        })
    }

    /// The split-K tile counters, for a grid of `tiles` output tiles.
    pub(crate) fn tile_counters(&self, tiles: usize) -> Result<u64> {
        if tiles > self.inner.shared.sm_count as usize {
            return Err(backend_error(
                CUDA,
                format!("a split GEMM of {tiles} tiles exceeds the split-K counters"),
            ));
        }
        Ok(self.inner.shared.tile_counters.ptr)
    }

    /// A block of scratch memory from the pool (returned to it on drop).
    pub(crate) fn scratch(&self, bytes: usize) -> Result<Block> {
        self.inner.shared.pool.take(bytes)
    }

    /// Copies `data` into a fresh pool block. The host buffer may be dropped
    /// on return (pageable memory is staged by the driver before it returns).
    pub(crate) fn upload_bytes<T: Copy>(&self, data: &[T]) -> Result<Block> {
        let bytes = std::mem::size_of_val(data);
        let block = self.scratch(bytes)?;
        let _stream = self.use_stream(Some("a copy to the device"))?;
        if bytes > 0 {
            self.inner
                .shared
                .ctx
                .bind_to_thread()
                .map_err(driver("binding the context"))?;
            // SAFETY: the block holds at least `bytes` bytes; the copy is queued
            // on the stream every use of the block is ordered on, and pageable
            // `data` is staged before the call returns.
            unsafe {
                drv::memcpy_htod_async(block.ptr, data, self.inner.shared.stream.cu_stream())
            }
            .map_err(driver("copying to the device"))?;
        }
        Ok(block)
    }

    fn alloc_tensor(&self, shape: &[usize]) -> Result<CudaTensor> {
        let numel = checked_numel(shape, "cuda tensor")?;
        let bytes = numel
            .checked_mul(self.storage().size())
            .ok_or_else(|| Error::Overflow(format!("cuda tensor of shape {shape:?}")))?;
        let block = self.scratch(bytes)?;
        Ok(CudaTensor {
            ptr: block.ptr,
            memory: Memory::Pooled(block),
            shape: shape.to_vec(),
            numel,
            dtype: self.storage(),
            ctx: self.ctx_id(),
        })
    }

    /// Uploads `t` in the backend's storage type: as it is when the types
    /// match, else converted on the host (f32/f64 to f16 or bf16 rounds to
    /// nearest even; a finite value past the storage's range is an error).
    fn upload_tensor(&self, t: &HostTensor) -> Result<CudaTensor> {
        let storage = self.storage();
        let converted;
        let host = if t.dtype() == storage {
            t
        } else {
            converted = t.to_storage(storage, "cuda upload")?;
            &converted
        };
        let block = match host.data() {
            HostData::F32(v) => self.upload_bytes(v)?,
            HostData::F16(v) => self.upload_bytes(v)?,
            HostData::BF16(v) => self.upload_bytes(v)?,
            HostData::F64(_) => {
                return Err(Error::invalid(
                    "the CUDA backend stores f32, f16 or bf16, not f64",
                ))
            }
        };
        Ok(CudaTensor {
            ptr: block.ptr,
            memory: Memory::Pooled(block),
            shape: t.shape().to_vec(),
            numel: host.numel(),
            dtype: storage,
            ctx: self.ctx_id(),
        })
    }

    /// Copies the tensor's elements into `host` (exactly `numel` of them).
    fn copy_to_host<T: DeviceRepr>(&self, t: &CudaTensor, host: &mut [T]) -> Result<()> {
        if !host.is_empty() {
            let _stream = self.use_stream(Some("a copy to the host"))?;
            self.inner
                .shared
                .ctx
                .bind_to_thread()
                .map_err(driver("binding the context"))?;
            // SAFETY: `host` holds exactly the tensor's `numel` elements of its
            // type (the caller picks T from `t.dtype`) and the device range was
            // checked when the tensor was made; the copy is ordered after every
            // op queued on the stream, and the stream is synchronised before
            // `host` is read.
            unsafe { drv::memcpy_dtoh_async(host, t.ptr, self.inner.shared.stream.cu_stream()) }
                .map_err(driver("copying to the host"))?;
        }
        self.sync()
    }

    /// Downloads `t` as a host tensor of its storage type.
    fn download_tensor(&self, t: &CudaTensor) -> Result<HostTensor> {
        self.check_tensor("download", t)?;
        let data = match t.dtype {
            DType::F16 => {
                let mut host = try_filled(t.numel, 0u16, "cuda download")?;
                self.copy_to_host(t, &mut host)?;
                HostData::F16(host.into_iter().map(f16::from_bits).collect())
            }
            DType::BF16 => {
                let mut host = try_filled(t.numel, 0u16, "cuda download")?;
                self.copy_to_host(t, &mut host)?;
                HostData::BF16(host.into_iter().map(bf16::from_bits).collect())
            }
            _ => {
                let mut host = try_filled(t.numel, 0.0f32, "cuda download")?;
                self.copy_to_host(t, &mut host)?;
                HostData::F32(host)
            }
        };
        HostTensor::new(t.shape.clone(), data)
    }

    fn upload_mask_bytes(&self, m: &KeyPaddingMask) -> Result<CudaMask> {
        let bytes: Vec<u8> = m.ignore().iter().map(|&b| u8::from(b)).collect();
        Ok(CudaMask {
            block: self.upload_bytes(&bytes)?,
            batch: m.batch(),
            keys: m.keys(),
        })
    }

    fn sync(&self) -> Result<()> {
        let _stream = self.use_stream(Some("waiting for the stream"))?;
        self.inner.shared.stream.synchronize().map_err(driver(
            "waiting for the stream (an earlier kernel may have failed)",
        ))?;
        self.inner
            .shared
            .ctx
            .check_err()
            .map_err(driver("a deferred CUDA error"))
    }

    /// Checks that `t` lives in this backend's context and that its element
    /// count fits the kernels' 32-bit indices; returns its address.
    pub(crate) fn check_tensor(&self, what: impl std::fmt::Display, t: &CudaTensor) -> Result<u64> {
        if t.ctx != self.ctx_id() {
            return Err(Error::invalid(format!(
                "{what}: the tensor belongs to another CUDA context"
            )));
        }
        if t.dtype != self.storage() {
            return Err(Error::invalid(format!(
                "{what}: a {} tensor given to a backend with {} storage",
                t.dtype.name(),
                self.storage().name()
            )));
        }
        if i32::try_from(t.numel).is_err() {
            i32_of(&what.to_string(), t.numel)?;
        }
        Ok(t.ptr)
    }

    /// Checks that `m` lives in this backend's context; returns its address.
    pub(crate) fn check_mask(&self, m: &CudaMask) -> Result<u64> {
        if m.block.pool.ctx.cu_ctx() != self.inner.shared.ctx.cu_ctx() {
            return Err(Error::invalid(
                "attention: the key padding mask belongs to another CUDA context",
            ));
        }
        Ok(m.block.ptr)
    }

    /// An error unless every output's memory is disjoint from every input's and
    /// from the other outputs'.
    pub(crate) fn check_disjoint(
        &self,
        op: &str,
        outputs: &[&CudaTensor],
        inputs: &[&CudaTensor],
    ) -> Result<()> {
        let range = |t: &CudaTensor| (t.ptr, t.ptr + t.bytes());
        let overlap = |a: (u64, u64), b: (u64, u64)| a.0 < b.1 && b.0 < a.1;
        for (i, out) in outputs.iter().enumerate() {
            let o = range(out);
            let clash = inputs.iter().any(|t| overlap(o, range(t)))
                || outputs[i + 1..].iter().any(|t| overlap(o, range(t)));
            if clash {
                return Err(Error::invalid(format!(
                    "{op}: an output's device memory overlaps an input or another output"
                )));
            }
        }
        Ok(())
    }

    /// The kernel `name` of `program`, compiled and loaded on first use.
    fn function(&self, program: &'static Program, name: &'static str) -> Result<CudaFunction> {
        let storage = self.storage();
        let mut modules = lock(&self.inner.shared.modules)?;
        let loaded = match modules.get(&(program.file, storage)) {
            Some(l) => Arc::clone(l),
            None => {
                let cubin = program::cubin(
                    program,
                    storage,
                    &self.inner.shared.arch,
                    self.inner.cache_dir.as_deref(),
                )?;
                let module = self
                    .inner
                    .shared
                    .ctx
                    .load_module(Ptx::from_binary(cubin.as_ref().clone()))
                    .map_err(driver(&format!("loading kernels/{}", program.file)))?;
                let mut functions = HashMap::new();
                for k in program.kernels_for(storage, &self.inner.shared.arch) {
                    let full = format!("{k}{}", program::kernel_suffix(storage));
                    let f = module.load_function(&full).map_err(driver(&format!(
                        "finding kernel `{full}` in kernels/{}",
                        program.file
                    )))?;
                    functions.insert(k, f);
                }
                let loaded = Arc::new(Loaded {
                    _module: module,
                    functions,
                });
                modules.insert((program.file, storage), Arc::clone(&loaded));
                loaded
            }
        };
        loaded.functions.get(name).cloned().ok_or_else(|| {
            backend_error(
                CUDA,
                format!(
                    "kernel `{name}` is not listed for kernels/{} with {} storage",
                    program.file,
                    storage.name()
                ),
            )
        })
    }

    /// Records every kernel `record` launches into a CUDA graph instead of
    /// running them. While it records, other threads' work on this stream
    /// waits; the pool hands out only blocks it already holds (a driver
    /// allocation inside the capture is an error), and no copy or
    /// synchronisation may happen inside it (errors too). Blocks taken during
    /// the capture belong to the graph until it is dropped. The memory of
    /// every other tensor `record` used must outlive the graph: the caller
    /// keeps it.
    pub(crate) fn capture<T>(&self, record: impl FnOnce() -> Result<T>) -> Result<(T, Graph)> {
        let shared = &self.inner.shared;
        let pool = &shared.pool;
        if shared.stream.cu_stream().is_null() {
            return Err(Error::invalid(
                "CUDA graphs cannot be captured on the default stream: give the backend a \
                 stream of its own (Cuda::new does)",
            ));
        }
        let _exclusive = pool
            .stream_use
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        pool.begin_capture()?;
        let first_launch = shared.launches.load(Ordering::Relaxed);
        let mode = drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        let begun = shared.stream.begin_capture(mode);
        // The capture ends whatever happens inside it, a panic included.
        let recorded = match begun {
            Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(record))
                .unwrap_or_else(|_| Err(backend_error(CUDA, "a panic inside a graph capture"))),
            Err(e) => Err(driver("beginning a CUDA graph capture")(e)),
        };
        let ended = begun.and_then(|()| {
            shared
                .stream
                .end_capture(drv_sys::CUgraphInstantiate_flags(0))
        });
        let blocks = GraphBlocks {
            pool: Arc::clone(pool),
            blocks: pool.end_capture(),
        };
        let value = recorded?;
        let exec = ended
            .map_err(driver("ending the CUDA graph capture"))?
            .ok_or_else(|| backend_error(CUDA, "the CUDA graph capture produced no graph"))?;
        let kernels = shared.launches.load(Ordering::Relaxed) - first_launch;
        Ok((
            value,
            Graph {
                exec,
                kernels,
                _blocks: blocks,
            },
        ))
    }

    /// Queues a replay of `graph` (captured on this backend's stream).
    pub(crate) fn replay(&self, graph: &Graph) -> Result<()> {
        if !Arc::ptr_eq(&graph._blocks.pool, &self.inner.shared.pool) {
            return Err(Error::invalid(
                "a CUDA graph replayed on a backend other than the one it was captured on",
            ));
        }
        let _stream = self.use_stream(Some("replaying a CUDA graph"))?;
        graph
            .exec
            .launch()
            .map_err(driver("launching a CUDA graph"))
    }

    /// Held around each stream operation; see [`Pool::use_stream`].
    fn use_stream(&self, inside_capture: Option<&str>) -> Result<Option<RwLockReadGuard<'_, ()>>> {
        self.inner.shared.pool.use_stream(inside_capture)
    }

    /// Queues `dst = src` (same shape and storage, this backend's memory).
    pub(crate) fn copy_device(&self, src: &CudaTensor, dst: &mut CudaTensor) -> Result<()> {
        self.check_tensor("copy", src)?;
        self.check_tensor("copy", dst)?;
        if src.shape != dst.shape {
            return Err(Error::Shape {
                key: "copy".into(),
                expected: dst.shape.clone(),
                found: src.shape.clone(),
            });
        }
        self.check_disjoint("copy", &[dst], &[src])?;
        let _stream = self.use_stream(Some("a device copy"))?;
        let bytes = src.numel * src.dtype.size();
        if bytes > 0 {
            // SAFETY: both ranges were checked to hold `numel` elements of this
            // storage in this context and not to overlap; the copy is queued on
            // the stream every use of either is ordered on.
            unsafe {
                drv::memcpy_dtod_async(
                    dst.ptr,
                    src.ptr,
                    bytes,
                    self.inner.shared.stream.cu_stream(),
                )
            }
            .map_err(driver("copying on the device"))?;
        }
        Ok(())
    }

    /// Queues zero bytes over `t`.
    pub(crate) fn zero(&self, t: &mut CudaTensor) -> Result<()> {
        self.check_tensor("zero", t)?;
        let _stream = self.use_stream(Some("a memset"))?;
        let bytes = t.numel * t.dtype.size();
        if bytes > 0 {
            // SAFETY: the range holds the tensor's elements (checked above) and
            // the memset is ordered on the stream like every other use.
            unsafe { drv::memset_d8_async(t.ptr, 0, bytes, self.inner.shared.stream.cu_stream()) }
                .map_err(driver("clearing device memory"))?;
        }
        Ok(())
    }

    /// Queues kernel `name` of `program` on the stream with one by-value
    /// parameter struct.
    pub(crate) fn launch<P: DeviceRepr>(
        &self,
        program: &'static Program,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        params: &P,
    ) -> Result<()> {
        self.launch_in_clusters(program, name, grid, block, None, params)
    }

    /// [`Cuda::launch`], with the grid in thread-block clusters of
    /// `cluster` blocks (each dimension dividing the grid's, at most
    /// [`MAX_CLUSTER`] blocks) where it is given; only where
    /// [`Cuda::cluster_split_k`] says the device launches them.
    pub(crate) fn launch_in_clusters<P: DeviceRepr>(
        &self,
        program: &'static Program,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        cluster: Option<(u32, u32, u32)>,
        params: &P,
    ) -> Result<()> {
        let (gx, gy, gz) = grid;
        if gx == 0 || gy == 0 || gz == 0 || gx > i32::MAX as u32 || gy > 65_535 || gz > 65_535 {
            return Err(Error::invalid(format!(
                "{name}: grid {grid:?} is outside CUDA's limits"
            )));
        }
        if let Some((cx, cy, cz)) = cluster {
            let size = u64::from(cx) * u64::from(cy) * u64::from(cz);
            if !self.inner.shared.clusters
                || size == 0
                || size > MAX_CLUSTER as u64
                || gx % cx.max(1) != 0
                || gy % cy.max(1) != 0
                || gz % cz.max(1) != 0
            {
                return Err(backend_error(
                    CUDA,
                    format!("{name}: clusters of {cluster:?} blocks over grid {grid:?}"),
                ));
            }
        }
        let f = self.function(program, name)?;
        let _stream = self.use_stream(None)?;
        let what = || format!("launching {name} with grid {grid:?}, block {block:?}");
        // SAFETY (both launches): `params` is the `#[repr(C)]` mirror of the
        // kernel's only parameter (its layout is checked by static_asserts
        // compiled into the kernel). Every address in it was checked by the
        // calling op: it belongs to this context, covers the elements the
        // kernel indexes for the sizes in `params` (validated by the shared
        // `*Dims::check`), and outputs do not overlap inputs. The memory
        // outlives the queued work: pool blocks are only reused by later work
        // on this same stream, and caller memory is under the contract of
        // `tensor_from_raw`/`tensor_from_slice`. A dependent launch keeps
        // that order: every kernel waits for its predecessor before it
        // touches memory (`dependent_launch_prologue`, asserted for every
        // entry point by the program tests).
        if self.dependent_launch() || cluster.is_some() {
            let stream = &self.inner.shared.stream;
            stream
                .context()
                .bind_to_thread()
                .map_err(driver_lazy(what))?;
            let blank = drv_sys::CUlaunchAttribute {
                id: drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_IGNORE,
                pad: [0; 4],
                value: drv_sys::CUlaunchAttributeValue { pad: [0; 64] },
            };
            let mut attrs = [blank; 2];
            let mut count = 0;
            if self.dependent_launch() {
                attrs[count].id =
                    drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
                attrs[count].value.programmaticStreamSerializationAllowed = 1;
                count += 1;
            }
            if let Some((x, y, z)) = cluster {
                attrs[count].id =
                    drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
                attrs[count].value.clusterDim =
                    drv_sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x, y, z };
                count += 1;
            }
            let config = drv_sys::CUlaunchConfig {
                gridDimX: gx,
                gridDimY: gy,
                gridDimZ: gz,
                blockDimX: block.0,
                blockDimY: block.1,
                blockDimZ: block.2,
                sharedMemBytes: 0,
                hStream: stream.cu_stream(),
                attrs: attrs.as_mut_ptr(),
                numAttrs: count as u32,
            };
            let mut args = [params as *const P as *mut std::ffi::c_void];
            // SAFETY: see above; `config`, `attrs` and `args` outlive the call,
            // which copies the parameter struct before it returns.
            unsafe {
                drv_sys::cuLaunchKernelEx(
                    &config,
                    f.cu_function(),
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
            .result()
            .map_err(driver_lazy(what))?;
        } else {
            let mut args = self.inner.shared.stream.launch_builder(&f);
            args.arg(params);
            let cfg = LaunchConfig {
                grid_dim: grid,
                block_dim: block,
                shared_mem_bytes: 0,
            };
            // SAFETY: see above.
            unsafe { args.launch(cfg) }.map_err(driver_lazy(what))?;
        }
        self.inner.shared.launches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Backend for Cuda {
    type Tensor = CudaTensor;
    type Mask = CudaMask;

    fn name(&self) -> &str {
        CUDA
    }

    fn upload(&self, t: &HostTensor) -> Result<CudaTensor> {
        self.upload_tensor(t)
    }

    fn download(&self, t: &CudaTensor) -> Result<HostTensor> {
        self.download_tensor(t)
    }

    fn weight_dtype(&self) -> DType {
        self.storage()
    }

    fn alloc(&self, shape: &[usize]) -> Result<CudaTensor> {
        self.alloc_tensor(shape)
    }

    fn upload_mask(&self, mask: &KeyPaddingMask) -> Result<CudaMask> {
        self.upload_mask_bytes(mask)
    }

    fn synchronize(&self) -> Result<()> {
        self.sync()
    }

    fn kernel_launches(&self) -> Option<u64> {
        Some(self.inner.shared.launches.load(Ordering::Relaxed))
    }

    /// Timed with CUDA events recorded around the work `f` queues.
    fn device_time(
        &self,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<std::time::Duration>> {
        let shared = &self.inner.shared;
        let timing = Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT);
        let event = || {
            shared
                .ctx
                .new_event(timing)
                .map_err(driver("creating an event"))
        };
        let (start, end) = (event()?, event()?);
        let record = |e: &cudarc::driver::CudaEvent| {
            let _stream = self.use_stream(Some("recording an event"))?;
            e.record(&shared.stream)
                .map_err(driver("recording an event"))
        };
        record(&start)?;
        f()?;
        record(&end)?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(driver("reading the events' elapsed time"))?;
        Ok(Some(std::time::Duration::from_secs_f64(
            f64::from(ms.max(0.0)) / 1e3,
        )))
    }

    fn naive(&self) -> Result<Option<Self>> {
        let options = CudaOptions {
            version: KernelVersion::Naive,
            ..self.options().clone()
        };
        self.with_options(options).map(Some)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        act: Activation,
        residual: Option<&CudaTensor>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("linear");
        let d = LinearDims::check(
            x.shape(),
            w.shape(),
            b.map(|t| t.shape()),
            residual.map(|t| t.shape()),
            out.shape(),
        )?;
        super::linear::linear(self, d, x, w, b, act, residual, out)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        residual: Option<&CudaTensor>,
        weight: &CudaTensor,
        bias: &CudaTensor,
        eps: f64,
        out: &mut CudaTensor,
        sum_out: Option<&mut CudaTensor>,
    ) -> Result<()> {
        let _range = crate::profile::range("layer_norm");
        let d = LayerNormDims::check(
            x.shape(),
            residual.map(|t| t.shape()),
            weight.shape(),
            bias.shape(),
            eps,
            out.shape(),
            sum_out.as_ref().map(|t| t.shape()),
        )?;
        super::layer_norm::layer_norm(self, d, x, residual, weight, bias, eps, out, sum_out)
    }

    fn layer_norm_linear(
        &self,
        norm: NormInput<'_, CudaTensor>,
        mut sum_out: Option<&mut CudaTensor>,
        h: &mut CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        act: Activation,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("layer_norm_linear");
        LayerNormDims::check(
            norm.x.shape(),
            norm.residual.map(|t| t.shape()),
            norm.weight.shape(),
            norm.bias.shape(),
            norm.eps,
            h.shape(),
            sum_out.as_ref().map(|t| t.shape()),
        )?;
        let d = LinearDims::check(
            h.shape(),
            w.shape(),
            b.map(|t| t.shape()),
            None,
            out.shape(),
        )?;
        let fused = super::linear::layer_norm_linear(
            self,
            d,
            norm,
            sum_out.as_deref_mut(),
            w,
            b,
            act,
            out,
        )?;
        if fused {
            return Ok(());
        }
        layer_norm_then_linear(self, norm, sum_out, h, w, b, act, out)
    }

    fn attention(
        &self,
        q: Cols<'_, CudaTensor>,
        k: Cols<'_, CudaTensor>,
        v: Cols<'_, CudaTensor>,
        spec: &AttentionSpec,
        mask: Option<&CudaMask>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("attention");
        let d = AttentionDims::check(
            (q.tensor.shape(), q.start),
            (k.tensor.shape(), k.start),
            (v.tensor.shape(), v.start),
            spec,
            mask.map(|m| (m.batch(), m.keys())),
            out.shape(),
        )?;
        let attn = AttentionInput {
            q,
            k,
            v,
            spec,
            mask,
        };
        super::attention::attention(self, d, attn, out)
    }

    fn attention_linear(
        &self,
        attn: AttentionInput<'_, CudaTensor, CudaMask>,
        a: &mut CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        act: Activation,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("attention_linear");
        let d = AttentionDims::check(
            (attn.q.tensor.shape(), attn.q.start),
            (attn.k.tensor.shape(), attn.k.start),
            (attn.v.tensor.shape(), attn.v.start),
            attn.spec,
            attn.mask.map(|m| (m.batch(), m.keys())),
            a.shape(),
        )?;
        let l = LinearDims::check(
            a.shape(),
            w.shape(),
            b.map(|t| t.shape()),
            None,
            out.shape(),
        )?;
        if super::linear::attention_linear(self, d, l, attn, w, b, act, out)? {
            return Ok(());
        }
        attention_then_linear(self, attn, a, w, b, act, out)
    }

    fn linear_layer_norm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        act: Activation,
        y: &mut CudaTensor,
        norm: NormAfter<'_, CudaTensor>,
        mut sum_out: Option<&mut CudaTensor>,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("linear_layer_norm");
        let d = LinearDims::check(x.shape(), w.shape(), b.map(|t| t.shape()), None, y.shape())?;
        LayerNormDims::check(
            y.shape(),
            norm.residual.map(|t| t.shape()),
            norm.weight.shape(),
            norm.bias.shape(),
            norm.eps,
            out.shape(),
            sum_out.as_ref().map(|t| t.shape()),
        )?;
        let sums = sum_out.as_deref_mut();
        if super::linear::linear_layer_norm(self, d, x, w, b, act, norm, sums, out)? {
            return Ok(());
        }
        linear_then_layer_norm(self, x, w, b, act, y, norm, sum_out, out)
    }

    fn linear_layer_norm_folds(&self, m: usize, n: usize, k: usize) -> bool {
        self.linear_layer_norm_kernel(m, n, k).is_some()
    }

    fn attention_absorbed(
        &self,
        norm: NormInput<'_, CudaTensor>,
        attn: AbsorbedAttentionInput<'_, CudaTensor>,
        after: NormAfter<'_, CudaTensor>,
        stream_out: &mut CudaTensor,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("attention_absorbed");
        let d =
            AbsorbedAttentionDims::check(&norm, &attn, &after, stream_out.shape(), out.shape())?;
        super::attention::attention_absorbed(self, d, norm, attn, after, stream_out, out)
    }

    fn attention_absorbed_pays(&self, keys: usize, heads: usize, cols: usize) -> bool {
        !self.inner.options.literal_cross_attention
            && super::attention::absorbed_pays(keys, heads, cols)
    }

    fn alignment_loss(
        &self,
        kind: LossKind,
        pred: &CudaTensor,
        target: &CudaTensor,
        loss: &mut CudaTensor,
        grad: &mut CudaTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("alignment_loss");
        let d = LossDims::check(pred.shape(), target.shape(), loss.shape(), grad.shape())?;
        super::alignment_loss::alignment_loss(self, d, kind, pred, target, loss, grad)
    }

    fn gather_signal_tokens(
        &self,
        hidden: &CudaTensor,
        embeds: Option<&CudaTensor>,
        positions: &SignalPositions,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let _range = crate::profile::range("gather_signal_tokens");
        let d = GatherDims::check(
            hidden.shape(),
            embeds.map(|t| t.shape()),
            positions,
            out.shape(),
        )?;
        super::gather_signal_tokens::gather_signal_tokens(self, d, hidden, embeds, positions, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_limits() {
        assert_eq!(i32_of("x", 5).ok(), Some(5));
        assert!(matches!(i32_of("x", 1 << 31), Err(Error::Overflow(_))));
        assert_eq!(blocks_for("x", 0, 128).ok(), Some(1));
        assert_eq!(blocks_for("x", 257, 128).ok(), Some(3));
        assert!(blocks_for("x", usize::MAX, 1).is_err());
    }

    #[test]
    fn tf32_needs_f32_storage_and_sm_80() {
        let tf32 = |storage| CudaOptions {
            tf32: true,
            storage,
            ..CudaOptions::default()
        };
        let invalid = |r: Result<()>| matches!(r, Err(Error::Invalid(_)));
        assert!(invalid(Cuda::check_storage("sm_75", 7, &tf32(DType::F32))));
        assert!(invalid(Cuda::check_storage("sm_90", 9, &tf32(DType::F16))));
        assert!(invalid(Cuda::check_storage("sm_90", 9, &tf32(DType::BF16))));
        // On a device below sm_80 too, the option's own conflict is what is said.
        match Cuda::check_storage("sm_75", 7, &tf32(DType::F16)) {
            Err(Error::Invalid(e)) => assert!(e.contains("f32 storage only"), "{e}"),
            other => panic!("{other:?}"),
        }
        let off = CudaOptions::default();
        assert!(!off.tf32);
        assert!(Cuda::check_storage("sm_75", 7, &off).is_ok());
        // sm_80 f32 is accepted where NVRTC's headers have mma.h.
        match Cuda::check_storage("sm_80", 8, &tf32(DType::F32)) {
            Ok(()) => assert!(program::mma_header_found()),
            Err(Error::Unavailable { reason, .. }) => assert!(reason.contains("mma.h")),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn no_device_is_unavailable_not_a_panic() {
        if super::super::driver_present() {
            println!("skipped: a CUDA driver is here (tests/cuda_ops.rs covers the device)");
            return;
        }
        match Cuda::open() {
            Err(Error::Unavailable { backend, .. }) => assert_eq!(backend, "cuda"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}
