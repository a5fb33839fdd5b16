// Shared by every kernel file of output-projector: f32 arithmetic everywhere,
// storage in `elem`, chosen per compile with OP_ELEM (0 float, 1 __half,
// 2 __nv_bfloat16; the host compiles every file once per storage type). Entry
// points are named OP_KERNEL_NAME(base): `base` for f32, `base_f16` and
// `base_bf16` for the others, so one CUBIN's kernels say what they store.
//
// Conventions of all kernels:
// - Every kernel takes ONE parameter: a struct of device pointers (8 bytes each,
//   first) and 32-bit ints/floats (after them). The host mirrors each struct with
//   `#[repr(C)]` and appends `static_assert`s of its size and field offsets to the
//   source before compiling, so a layout mismatch is a compile error, never
//   silently wrong arguments.
// - Index math is 32-bit: the host has checked that every tensor a kernel touches
//   holds fewer than 2^31 elements, and computes an offset only for in-range rows.
// - 16-byte (float4) loads are used only where the host has checked the alignment
//   (pointer, row stride and column offset); every kernel has a scalar path.
// - Reductions are deterministic: fixed-order loops and xor-butterfly warp sums
//   (every lane ends with bitwise the same value), never float atomics.
#ifndef OP_COMMON_CUH
#define OP_COMMON_CUH

#define OP_FULL_MASK 0xffffffffu

// -infinity (NVRTC has no <math.h> INFINITY without the toolkit headers).
#define OP_NEG_INF __int_as_float((int)0xff800000u)

// Activation codes; the host's `Activation` maps onto these.
#define OP_ACT_NONE 0
#define OP_ACT_RELU 1
#define OP_ACT_GELU_ERF 2
#define OP_ACT_GELU_TANH 3

// Sum over the 32 lanes of a warp; every lane gets the same (bitwise) result.
// All 32 lanes must call it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(OP_FULL_MASK, v, offset);
    }
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(OP_FULL_MASK, v, offset);
    }
    return v;
}

// Maximum over the 32 lanes of a warp; every lane gets the same result.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(OP_FULL_MASK, v, offset));
    }
    return v;
}

// One step of a warp's transposing reduction of 2 WIDTH sums per lane: a lane
// keeps the half of its sums its lane bit WIDTH selects and adds its
// partner's copy of that half, so sums [0, WIDTH) become the pair sums of
// that half. After the steps WIDTH = N / 2, ..., 1 lane l holds sum l % N of
// its group of N lanes: N - 1 shuffles for what N warp_sums' 5 N shuffles do
// over the same lanes. a + b == b + a exactly, so partners agree bit for bit.
// A separate template per width, so every index is a constant and the sums
// stay in registers.
template <int WIDTH>
__device__ __forceinline__ void warp_fold(float* v, int lane) {
    const bool upper = (lane & WIDTH) != 0;
#pragma unroll
    for (int i = 0; i < WIDTH; ++i) {
        const float send = upper ? v[i] : v[i + WIDTH];
        const float keep = upper ? v[i + WIDTH] : v[i];
        v[i] = keep + __shfl_xor_sync(OP_FULL_MASK, send, WIDTH);
    }
}

// warp_fold's steps WIDTH, WIDTH / 2, ..., 1.
template <int WIDTH>
__device__ __forceinline__ void warp_folds(float* v, int lane) {
    if constexpr (WIDTH >= 1) {
        warp_fold<WIDTH>(v, lane);
        warp_folds<WIDTH / 2>(v, lane);
    }
}

// block_sum of N values at once: every thread gets the N block sums. Every
// thread must call it; `scratch` is a __shared__ float[32][N]; the leading
// barrier lets calls follow each other. For N a power of two from 2 to 32,
// a warp folds its sums (warp_folds: lane l then holds sum l % N) and the
// warps' sums are added in warp order from shared memory: N - 1 + log2(32 / N)
// shuffles in all, where N warp_sums in each of two passes take 10 N.
template <int N>
__device__ __forceinline__ void block_sums(float (&v)[N], float (*scratch)[N]) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    if constexpr (N > 1 && N <= 32 && (N & (N - 1)) == 0) {
        warp_folds<N / 2>(v, lane);
#pragma unroll
        for (int offset = N; offset < 32; offset <<= 1) {
            v[0] += __shfl_xor_sync(OP_FULL_MASK, v[0], offset);
        }
        __syncthreads();
        if (lane < N) {
            scratch[warp][lane] = v[0];
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < N; ++i) {
            float s = 0.0f;
            for (int w = 0; w < warps; ++w) {
                s += scratch[w][i];
            }
            v[i] = s;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            v[i] = warp_sum(v[i]);
        }
        __syncthreads();
        if (lane == 0) {
#pragma unroll
            for (int i = 0; i < N; ++i) {
                scratch[warp][i] = v[i];
            }
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < N; ++i) {
            v[i] = warp_sum(lane < warps ? scratch[lane][i] : 0.0f);
        }
    }
}

// Sum over a block whose size is a multiple of 32 (at most 1024 threads). Every
// thread must call it and every thread gets the same result. `scratch` is a
// __shared__ float[32].
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    float one[1] = {v};
    block_sums<1>(one, reinterpret_cast<float (*)[1]>(scratch));
    return one[0];
}

// PyTorch's activations. GELU (erf) is `0.5 x (1 + erf(x / sqrt 2))`; GELU (tanh)
// is `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
__device__ __forceinline__ float activate(int act, float x) {
    switch (act) {
    case OP_ACT_RELU:
        return fmaxf(x, 0.0f);
    case OP_ACT_GELU_ERF:
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
    case OP_ACT_GELU_TANH: {
        const float c = 0.79788456080286535588f;  // sqrt(2 / pi)
        return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
    default:
        return x;
    }
}

// A 16-byte load; `p` must be 16-byte aligned (checked by the host).
__device__ __forceinline__ float4 load_float4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}

__device__ __forceinline__ void store_float4(float* p, float4 v) {
    *reinterpret_cast<float4*>(p) = v;
}

// cp.async (sm_80): 16 bytes from global to shared memory without a trip
// through registers, zero-filled where `valid` is false (`src` is then not
// read). A thread's copies are complete once it has waited for their group
// (cp_async_wait); other threads see them after a __syncthreads that follows
// that wait. Older targets copy synchronously, which satisfies the same
// contract; the emulator copies at the wait, the latest the contract allows,
// so a read of the stage before its wait sees stale data.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(OP_EMULATOR)
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
#elif defined(OP_EMULATOR)
    emu_cp_async(dst, src, 16, valid);
#else
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (valid) {
        v = *reinterpret_cast<const uint4*>(src);
    }
    *reinterpret_cast<uint4*>(dst) = v;
#endif
}

// cp_async16 for 8 bytes (both addresses 8-byte aligned), through L1
// (cp.async.cg takes 16 bytes only).
__device__ __forceinline__ void cp_async8(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(OP_EMULATOR)
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(d), "l"(src),
                 "r"(valid ? 8 : 0)
                 : "memory");
#elif defined(OP_EMULATOR)
    emu_cp_async(dst, src, 8, valid);
#else
    uint2 v = make_uint2(0u, 0u);
    if (valid) {
        v = *reinterpret_cast<const uint2*>(src);
    }
    *reinterpret_cast<uint2*>(dst) = v;
#endif
}

// Closes the group of this thread's cp_async16 / cp_async8 calls issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(OP_EMULATOR)
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(OP_EMULATOR)
    emu_cp_async_commit();
#endif
}

// Waits until at most PENDING of this thread's committed groups are in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(OP_EMULATOR)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#elif defined(OP_EMULATOR)
    emu_cp_async_wait(PENDING);
#endif
}

// Programmatic dependent launch (sm_90 and newer). The host queues kernels so
// that one may start while the kernel before it on the stream is still
// running: its blocks are resident and waiting when that one ends, instead of
// being launched after it (a gap of a microsecond or more between dependent
// kernels). So every kernel begins with this, before it touches memory:
// - launch_dependents: the next kernel may be scheduled once every block of
//   this grid has started (the last wave is running);
// - wait: returns once the grid before this one has finished and its writes
//   are visible, and that grid had waited for its own predecessor, so all
//   earlier work on the stream is done.
// Without the launch attribute (older GPUs, or the host's serial launches)
// the kernel starts after its predecessor anyway and both are no-ops.
// `before_wait` runs between the two: work that touches no memory another
// kernel writes, such as asking L2 for this block's weights (prefetch_l2).
template <class F>
__device__ __forceinline__ void dependent_launch_prologue(F before_wait) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(OP_EMULATOR)
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
    before_wait();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(OP_EMULATOR)
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void dependent_launch_prologue() {
    dependent_launch_prologue([] {});
}

// Asks L2 for the 128-byte line holding `p`; nothing is loaded into
// registers or L1. L2 is where every SM's view of device memory meets, so a
// line fetched early and written afterwards by another kernel is seen
// updated: this is safe even before dependent_launch_prologue's wait.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__) && !defined(OP_EMULATOR)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#else
    (void)p;
#endif
}

// *p += v at GPU scope, returning the old value, as one acquire-release
// atomic (sm_70+): the calling thread's earlier writes, and those of its
// block ordered before it by a __syncthreads, are visible to whoever reads
// the new value with acquire; the writes released by earlier adders are
// visible to this thread afterwards (and to its block after a __syncthreads).
// What __threadfence() (a sequentially consistent fence, MEMBAR.SC.GPU, and an
// L1 invalidation) on every thread around a plain atomicAdd gave, for less.
__device__ __forceinline__ unsigned atomic_add_acq_rel(unsigned* p, unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700 && !defined(OP_EMULATOR)
    unsigned old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;\n"
                 : "=r"(old)
                 : "l"(p), "r"(v)
                 : "memory");
    return old;
#else
    __threadfence();
    const unsigned old = atomicAdd(p, v);
    __threadfence();
    return old;
#endif
}

// layer_norm's arithmetic on one float4 of a row in each of its passes
// (layer_norm.cu's v2 on held and re-read rows, and the norm linear_rows
// applies before its sums in linear.cu): written once.
// Pass 1: adds a's (and, with a residual, b's) elements to sx (sr) and returns
// s = a + b (or a).
__device__ __forceinline__ float4 layer_norm_sum4(float4 a, float4 b, bool residual, float& sx,
                                                  float& sr) {
    sx += (a.x + a.y) + (a.z + a.w);
    if (!residual) {
        return a;
    }
    sr += (b.x + b.y) + (b.z + b.w);
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

// Passes 2 and 3: the deviations d = (a - mx) + (b - mr) (with a residual).
__device__ __forceinline__ float4 layer_norm_dev4(float4 a, float4 b, bool residual, float mx,
                                                  float mr) {
    float4 d = make_float4(a.x - mx, a.y - mx, a.z - mx, a.w - mx);
    if (residual) {
        d.x += b.x - mr;
        d.y += b.y - mr;
        d.z += b.z - mr;
        d.w += b.w - mr;
    }
    return d;
}

// Pass 2: d added to sd and, squared, to sdd.
__device__ __forceinline__ void layer_norm_moments4(float4 d, float& sd, float& sdd) {
    sd += (d.x + d.y) + (d.z + d.w);
    sdd = fmaf(d.x, d.x, sdd);
    sdd = fmaf(d.y, d.y, sdd);
    sdd = fmaf(d.z, d.z, sdd);
    sdd = fmaf(d.w, d.w, sdd);
}

// Pass 3: (d - c) * rstd * g + h.
__device__ __forceinline__ float4 layer_norm_out4(float4 d, float c, float rstd, float4 g,
                                                  float4 h) {
    return make_float4(fmaf((d.x - c) * rstd, g.x, h.x), fmaf((d.y - c) * rstd, g.y, h.y),
                       fmaf((d.z - c) * rstd, g.z, h.z), fmaf((d.w - c) * rstd, g.w, h.w));
}

// Thread-block clusters (sm_90): the host may launch a grid in clusters of
// blocks that run at the same time on one GPC and read each other's shared
// memory. Without a cluster (older GPUs, plain launches) a block is a cluster
// of one, and these are cheap stand-ins that are never given another rank.

// Blocks in this block's cluster (1 without one).
__device__ __forceinline__ unsigned cluster_blocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(OP_EMULATOR)
    unsigned n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
    return n;
#elif defined(OP_EMULATOR)
    return emu_cluster_blocks();
#else
    return 1;
#endif
}

// This block's rank in its cluster, 0 .. cluster_blocks() - 1.
__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(OP_EMULATOR)
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
#elif defined(OP_EMULATOR)
    return emu_cluster_rank();
#else
    return 0;
#endif
}

// A barrier for every thread of every block of the cluster: shared-memory
// writes before it (release) are seen by the cluster's reads after it
// (acquire). Every thread of the cluster must reach it, none may have exited.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(OP_EMULATOR)
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
#elif defined(OP_EMULATOR)
    emu_cluster_sync();
#else
    __syncthreads();
#endif
}

// cluster_sync with `between()` run after this thread's arrive and before its
// wait: work that needs nothing from the cluster, such as global stores,
// which the arrive's release would otherwise wait for (it compiles to a
// GPU-scope MEMBAR). The emulator runs it after the barrier, an order the
// hardware allows, with the wait's acquire after it (so its race check sees
// `between`'s accesses unordered with the other blocks').
template <class Between>
__device__ __forceinline__ void cluster_sync_around(Between between) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(OP_EMULATOR)
    asm volatile("barrier.cluster.arrive.release;\n" ::: "memory");
    between();
    asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory");
#elif defined(OP_EMULATOR)
    emu_cluster_sync(true, false);
    between();
    emu_cluster_acquire();
#else
    cluster_sync();
    between();
#endif
}

// cluster_sync without the memory ordering (its arrive is relaxed: no wait
// for this thread's global stores to be acknowledged, which the release
// compiles to): for a block that must not exit while others still read its
// shared memory, where every thread consumed its own reads before arriving.
__device__ __forceinline__ void cluster_sync_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(OP_EMULATOR)
    asm volatile("barrier.cluster.arrive.relaxed;\nbarrier.cluster.wait;\n" ::: "memory");
#elif defined(OP_EMULATOR)
    emu_cluster_sync(false, true);
#else
    cluster_sync();
#endif
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(OP_EMULATOR)
// The shared::cluster address of `p` (in this block's shared memory) in the
// cluster's block of rank `rank`.
__device__ __forceinline__ unsigned cluster_map(const void* p, unsigned rank) {
    const unsigned local = (unsigned)__cvta_generic_to_shared(p);
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
    return remote;
}
#endif

// The 16 bytes at `p` (16-byte aligned, in this block's shared memory) in the
// shared memory of the cluster's block of rank `rank` (distributed shared
// memory: the same variable, in that block).
__device__ __forceinline__ float4 cluster_load_float4(const float* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(OP_EMULATOR)
    const unsigned remote = cluster_map(p, rank);
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(remote)
                 : "memory");
    return v;
#elif defined(OP_EMULATOR)
    return *reinterpret_cast<const float4*>(emu_cluster_map(p, rank));
#else
    (void)rank;
    return load_float4(p);
#endif
}

// cluster_load_float4 for 8 bytes (8-byte aligned).
__device__ __forceinline__ float2 cluster_load_float2(const float* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(OP_EMULATOR)
    const unsigned remote = cluster_map(p, rank);
    float2 v;
    asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n"
                 : "=f"(v.x), "=f"(v.y)
                 : "r"(remote)
                 : "memory");
    return v;
#elif defined(OP_EMULATOR)
    return *reinterpret_cast<const float2*>(emu_cluster_map(p, rank));
#else
    (void)rank;
    return *reinterpret_cast<const float2*>(p);
#endif
}

// (v.x, v.y) summed over TPR adjacent lanes of a warp (a power of two) by a
// butterfly: every lane of the group gets bitwise the same sums.
template <int TPR>
__device__ __forceinline__ float2 lanes_sum2(float2 v) {
#pragma unroll
    for (int o = 1; o < TPR; o <<= 1) {
        v.x += __shfl_xor_sync(OP_FULL_MASK, v.x, o);
        v.y += __shfl_xor_sync(OP_FULL_MASK, v.y, o);
    }
    return v;
}

// The sum of `slot` (this block's shared memory) over the blocks of this
// block's cluster (at most MAX_BLOCKS), read through distributed shared
// memory and added in rank order, so that every block gets bitwise the same
// sum. After a cluster_sync that follows every block's write of its slot.
template <int MAX_BLOCKS>
__device__ __forceinline__ float2 cluster_slot_sum(const float2* slot) {
    const unsigned blocks = cluster_blocks();
    float2 u[MAX_BLOCKS];
#pragma unroll
    for (int r = 0; r < MAX_BLOCKS; ++r) {
        if (r < (int)blocks) {
            u[r] = cluster_load_float2(reinterpret_cast<const float*>(slot), (unsigned)r);
        }
    }
    float2 t = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int r = 0; r < MAX_BLOCKS; ++r) {
        if (r < (int)blocks) {
            t.x += u[r].x;
            t.y += u[r].y;
        }
    }
    return t;
}

// Sums of (v.x, v.y) over a row whose elements are spread over TPR adjacent
// lanes of a warp (lanes_sum2) and over the blocks of this block's cluster,
// each holding a slice of the row (cluster_slot_sum), so every thread of the
// row in every block gets bitwise the same totals. `slot` is this block's
// shared-memory slot for the row, written once here and read by the cluster
// after the cluster_sync here: another sum needs other slots, and the block
// must not exit before a later cluster_sync. Every thread of every block of
// the cluster must call it. `between()` runs while the cluster gathers
// (cluster_sync_around).
template <int TPR, int MAX_BLOCKS, class Between>
__device__ __forceinline__ float2 cluster_row_sums(float2 v, float2* slot, Between between) {
    v = lanes_sum2<TPR>(v);
    if ((threadIdx.x & (TPR - 1)) == 0) {
        *slot = v;
    }
    cluster_sync_around(between);
    return cluster_slot_sum<MAX_BLOCKS>(slot);
}

// ---------------------------------------------------------------- storage
#ifndef OP_ELEM
#define OP_ELEM 0
#endif
#undef OP_KERNEL_NAME
#if OP_ELEM == 1
#ifndef OP_EMULATOR
#include <cuda_fp16.h>
#endif
typedef __half elem;
#define OP_KERNEL_NAME(base) base##_f16
__device__ __forceinline__ float to_f32(elem v) { return __half2float(v); }
__device__ __forceinline__ elem from_f32(float v) { return __float2half_rn(v); }
__device__ __forceinline__ float bits_to_f32(unsigned short b) { return __half2float(__ushort_as_half(b)); }
__device__ __forceinline__ unsigned short f32_to_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
#elif OP_ELEM == 2
#ifndef OP_EMULATOR
#include <cuda_bf16.h>
#endif
typedef __nv_bfloat16 elem;
#define OP_KERNEL_NAME(base) base##_bf16
__device__ __forceinline__ float to_f32(elem v) { return __bfloat162float(v); }
__device__ __forceinline__ elem from_f32(float v) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ float bits_to_f32(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }
__device__ __forceinline__ unsigned short f32_to_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
#else
typedef float elem;
#define OP_KERNEL_NAME(base) base
__device__ __forceinline__ float to_f32(elem v) { return v; }
__device__ __forceinline__ elem from_f32(float v) { return v; }
#endif

// Four consecutive elements as a float4, and back. f32: one 16-byte access;
// 16-bit storage: one 8-byte access. The host checks 16-byte alignment (of the
// pointer, and 4-element multiples of strides and offsets) for both.
#if OP_ELEM != 0
// Four 16-bit elements packed in 8 bytes (lowest address in the low half),
// as a float4, and back (rounded to nearest even; two at a time in 4 bytes).
__device__ __forceinline__ float4 unpack4(uint2 raw) {
    return make_float4(bits_to_f32((unsigned short)(raw.x & 0xffffu)),
                       bits_to_f32((unsigned short)(raw.x >> 16)),
                       bits_to_f32((unsigned short)(raw.y & 0xffffu)),
                       bits_to_f32((unsigned short)(raw.y >> 16)));
}

__device__ __forceinline__ unsigned pack2(float a, float b) {
    return (unsigned)f32_to_bits(a) | ((unsigned)f32_to_bits(b) << 16);
}

__device__ __forceinline__ uint2 pack4(float4 v) {
    return make_uint2(pack2(v.x, v.y), pack2(v.z, v.w));
}
#endif

__device__ __forceinline__ float4 load4(const elem* p) {
#if OP_ELEM == 0
    return load_float4(p);
#else
    return unpack4(*reinterpret_cast<const uint2*>(p));
#endif
}

__device__ __forceinline__ void store4(elem* p, float4 v) {
#if OP_ELEM == 0
    store_float4(p, v);
#else
    *reinterpret_cast<uint2*>(p) = pack4(v);
#endif
}

// layer_norm's statistics of one row x + r (r may be null) by plain loops, as
// the v1 kernels take them (layer_norm_naive, attention_absorbed_naive): the
// means of x and r, and the mean c and 1 / std of the deviations
// (x - mx) + (r - mr).
struct RowNorm {
    float mx, mr, c, rstd;

    __device__ __forceinline__ float dev(const elem* x, const elem* r, int j) const {
        return (to_f32(x[j]) - mx) + (r != nullptr ? to_f32(r[j]) - mr : 0.0f);
    }
};

__device__ __forceinline__ RowNorm layer_norm_row_naive(const elem* x, const elem* r, int cols,
                                                        float eps) {
    const float inv_cols = 1.0f / (float)cols;
    float sx = 0.0f, sr = 0.0f;
    for (int j = 0; j < cols; ++j) {
        sx += to_f32(x[j]);
        sr += r != nullptr ? to_f32(r[j]) : 0.0f;
    }
    RowNorm n{sx * inv_cols, sr * inv_cols, 0.0f, 0.0f};
    float sd = 0.0f, sdd = 0.0f;
    for (int j = 0; j < cols; ++j) {
        const float d = n.dev(x, r, j);
        sd += d;
        sdd = fmaf(d, d, sdd);
    }
    n.c = sd * inv_cols;
    n.rstd = 1.0f / sqrtf(fmaxf(sdd * inv_cols - n.c * n.c, 0.0f) + eps);
    return n;
}

// ---------------------------------------------------------------- attention
// Scaled-dot-product attention's operands (attention.cu; linear.cu's
// attention_linear_rows). Q [B, Lq, *], K and V [B, Lk, *] are column blocks
// of wider tensors, read in place with row strides: row (b, i) of head h of Q
// starts at q + (b * Lq + i) * q_stride + q_col + h * head_dim (the same for
// K and V). Key j of sequence b is ignored where mask[b * Lk + j] != 0; with
// `causal`, query i sees keys j <= i. `vec4`: 16-byte loads (pointers,
// strides, column offsets and head_dim multiples of 4 elements, checked by
// the host).
struct AttentionParams {
    const elem* q;
    const elem* k;
    const elem* v;
    const unsigned char* mask;  // [B, Lk], 1 = ignore; or null
    elem* out;                  // [B, Lq, heads * head_dim]
    int batch;
    int lq;
    int lk;
    int heads;
    int head_dim;
    int q_stride;
    int k_stride;
    int v_stride;
    int q_col;
    int k_col;
    int v_col;
    float scale;
    int causal;
    int vec4;
};

// Keys per step of attention_few_keys_row, their K and V rows in flight at
// once: 4, the image preset's signal tokens, so that no step of the
// projector's scores padding; and at 8, beside attention_linear_rows' 8 rows
// of x and 4 of w, ptxas spilled 52-72 bytes. One step size for both
// kernels keeps the fold bitwise the two ops it replaces.
#define ATT_FEW_STEP 4

// Sum over a lane's group of `group` lanes (a power of two up to 32, groups
// aligned in the warp); every lane of a group gets the same bits, and at 32
// the same as warp_sum. All 32 lanes must call it.
__device__ __forceinline__ float group_sum(float v, int group) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        if (offset < group) {
            v += __shfl_xor_sync(OP_FULL_MASK, v, offset);
        }
    }
    return v;
}

// A lane's 4 columns c0 + s t (t < 4; s = 1 with VEC, else 32) of a head's
// row, zeros past hd.
template <bool VEC>
__device__ __forceinline__ float4 attention_lane4(const elem* row, int c0, int hd) {
    float4 r = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (VEC) {
        if (c0 < hd) {
            r = load4(row + c0);  // hd % 4 == 0: all 4 in range
        }
    } else {
        if (c0 < hd) r.x = to_f32(row[c0]);
        if (c0 + 32 < hd) r.y = to_f32(row[c0 + 32]);
        if (c0 + 64 < hd) r.z = to_f32(row[c0 + 64]);
        if (c0 + 96 < hd) r.w = to_f32(row[c0 + 96]);
    }
    return r;
}

__device__ __forceinline__ float4 attention_fma4(float a, float4 x, float4 y) {
    return make_float4(fmaf(a, x.x, y.x), fmaf(a, x.y, y.y), fmaf(a, x.z, y.z), fmaf(a, x.w, y.w));
}

// The online softmax's state over some of a query's keys: a lane's 4
// output columns before the division by the sum, the running max and sum.
struct AttentionRun {
    float4 o;
    float m;
    float l;
};

// Query i of sequence b, head h, over the key steps first, first + stride,
// .. of ATT_FEW_STEP keys: the lane's 4 columns of the output (as
// attention_lane4 lays them out from c0), which `group` lanes hold together
// (head_dim <= 4 group; VEC: c0 = 4 (lane % group), else c0 = lane and group
// 32), undivided. A step's K and V rows are all loaded before its first
// product; each score is the group's sum of its lanes' 4-column dot
// products, and the softmax runs online over the steps as in attention's v2.
// Where no key is visible the state stays zero, m -inf. Lanes not `live`
// load nothing and add zeros; every lane of the warp must call it.
template <bool VEC>
__device__ __forceinline__ AttentionRun attention_keys_run(const AttentionParams& p, int b, int i,
                                                           int h, int c0, int group, bool live,
                                                           int first, int stride) {
    const int hd = p.head_dim;
    const int c = live ? c0 : hd;  // past hd: no loads
    const float4 q = attention_lane4<VEC>(p.q + (b * p.lq + i) * p.q_stride + p.q_col + h * hd, c,
                                          hd);
    const elem* kb = p.k + b * p.lk * p.k_stride + p.k_col + h * hd;
    const elem* vb = p.v + b * p.lk * p.v_stride + p.v_col + h * hd;
    const int k_stop = p.causal ? min(p.lk, i + 1) : p.lk;

    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float m_run = OP_NEG_INF;
    float l_run = 0.0f;
#pragma unroll 1
    for (int j0 = first * ATT_FEW_STEP; j0 < k_stop; j0 += stride * ATT_FEW_STEP) {
        float4 kr[ATT_FEW_STEP];
        float4 vr[ATT_FEW_STEP];
#pragma unroll
        for (int t = 0; t < ATT_FEW_STEP; ++t) {
            const int j = min(j0 + t, k_stop - 1);  // past k_stop: a key never used
            kr[t] = attention_lane4<VEC>(kb + j * p.k_stride, c, hd);
            vr[t] = attention_lane4<VEC>(vb + j * p.v_stride, c, hd);
        }
        float s[ATT_FEW_STEP];
        float m_step = OP_NEG_INF;
#pragma unroll
        for (int t = 0; t < ATT_FEW_STEP; ++t) {
            float d = q.x * kr[t].x;
            d = fmaf(q.y, kr[t].y, d);
            d = fmaf(q.z, kr[t].z, d);
            d = fmaf(q.w, kr[t].w, d);
            d = group_sum(d, group);
            const int j = j0 + t;
            const bool ok = j < k_stop && (p.mask == nullptr || p.mask[b * p.lk + j] == 0);
            s[t] = ok ? d * p.scale : OP_NEG_INF;
            m_step = fmaxf(m_step, s[t]);
        }
        const float m_new = fmaxf(m_run, m_step);
        if (m_new == OP_NEG_INF) {
            continue;  // nothing visible yet: the (zero) state stays
        }
        const float corr = expf(m_run - m_new);  // 0 while m_run is -inf
        l_run *= corr;
        o = make_float4(o.x * corr, o.y * corr, o.z * corr, o.w * corr);
#pragma unroll
        for (int t = 0; t < ATT_FEW_STEP; ++t) {
            const float e = expf(s[t] - m_new);  // 0 for the keys not seen
            l_run += e;
            o = attention_fma4(e, vr[t], o);
        }
        m_run = m_new;
    }
    return AttentionRun{o, m_run, l_run};
}

// o / l, zeros where l is 0 (a query that sees no key).
__device__ __forceinline__ float4 attention_divide(float4 o, float l) {
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    return make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
}

// Query i of sequence b, head h, for few keys: attention_keys_run over every
// step, divided.
template <bool VEC>
__device__ __forceinline__ float4 attention_few_keys_row(const AttentionParams& p, int b, int i,
                                                         int h, int c0, int group, bool live) {
    const AttentionRun r = attention_keys_run<VEC>(p, b, i, h, c0, group, live, 0, 1);
    return attention_divide(r.o, r.l);
}

// ---------------------------------------------------------------- mma.sync
#if OP_ELEM != 0
// Tensor-core fragments in the registers' own layout (PTX ISA, "Matrix
// Fragments for mma.m16n8k16"), for kernels that load them with ldmatrix
// instead of going through WMMA. Registers hold two 16-bit elements, the
// lower column (or row, for B) in the low half. With g = lane / 4 and
// t = lane % 4:
// - A, 16 x 16 row-major (M x K): a[0] (g, 2t), a[1] (g + 8, 2t),
//   a[2] (g, 2t + 8), a[3] (g + 8, 2t + 8), each with the next column;
// - B, 16 x 8 (K x N): b[0] (2t, g), b[1] (2t + 8, g), each with the next row;
// - C and D, 16 x 8 f32: d[0], d[1] (g, 2t), (g, 2t + 1); d[2], d[3] the
//   same columns of row g + 8.
// Needs sm_80; the emulator computes each output as f32 fmas in k order.

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8 x 8 matrices of 16-bit
// elements, lane l giving the shared-memory address of row l % 8 of matrix
// l / 8 (16 bytes, 16-byte aligned); r[i] receives matrix i's row g,
// elements 2t and 2t + 1. Rows of an A tile (K contiguous) land as a[] when
// lanes 0-15 give rows 0-15 at column 0 and lanes 16-31 rows 0-15 at column
// 8; rows of W ([N, K], K contiguous) land as B fragments likewise.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
#ifndef OP_EMULATOR
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#else
    if ((uintptr_t)row % 16 != 0) emu::fail("ldmatrix row address not 16-byte aligned");
    emu_warp_publish(row);
    const int lane = emu_lane();
    for (int i = 0; i < 4; ++i) {
        memcpy(&r[i], static_cast<const char*>(emu_warp_peer(8 * i + lane / 4)) + 4 * (lane % 4), 4);
    }
    emu_warp_done();
#endif
}

// d += a b (16 x 8 x 16, f32 sums): mma.sync.aligned.m16n8k16.row.col with
// elem operands.
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4],
                                          const unsigned (&b)[2]) {
#ifndef OP_EMULATOR
#if OP_ELEM == 1
#define OP_MMA_16816 "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
#else
#define OP_MMA_16816 "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
#endif
    asm(OP_MMA_16816 " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#undef OP_MMA_16816
#else
    const unsigned mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    emu_warp_publish(mine);
    // Element (row, col) of a fragment whose lane and register are found from
    // its position as the layout above says.
    const auto at = [](int lane, int reg, int half) {
        const unsigned v = static_cast<const unsigned*>(emu_warp_peer(lane))[reg];
        return bits_to_f32((unsigned short)(v >> (16 * half)));
    };
    const int g = emu_lane() / 4, t = emu_lane() % 4;
    float out[4];
    for (int h = 0; h < 4; ++h) {
        const int row = g + 8 * (h / 2), col = 2 * t + h % 2;
        float acc = d[h];
        for (int k = 0; k < 16; ++k) {
            const int pair = (k % 8) / 2;
            const float av = at(4 * (row % 8) + pair, row / 8 + 2 * (k / 8), k % 2);
            const float bv = at(4 * col + pair, 4 + k / 8, k % 2);
            acc = fmaf(av, bv, acc);
        }
        out[h] = acc;
    }
    emu_warp_done();
    for (int h = 0; h < 4; ++h) d[h] = out[h];
#endif
}

// ---------------------------------------------------------------- wgmma
// Warpgroup MMA (sm_90a; PTX ISA, "Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate"): the 4 warps of an aligned warpgroup (128 threads)
// together multiply a 64 x 16 tile of A by a 16 x N tile of B, both read from
// shared memory through matrix descriptors, into f32 accumulators, as an
// asynchronous operation: issued (wgmma_m64k16), grouped (wgmma_commit) and
// waited for (wgmma_wait) like cp.async. The accumulators of warp w, lane l
// (g = l / 4, t = l % 4): d[4 j + e] is row 16 w + g + 8 (e / 2), column
// 8 j + 2 t + e % 2, the m16n8 C layout of mma.sync repeated along N.
// Shared memory a thread wrote (cp.async included) is seen by the MMAs only
// after that thread's fence_proxy_async_shared and a barrier; the
// accumulators only after wgmma_wait, and a wgmma_fence must come between
// the thread's own accesses to them and the next MMA. The emulator performs
// each MMA at its wait, reading shared memory then (so a stage overwritten
// before the wait gives wrong sums), sums each output's 16 products in k
// order as its mma_16816 does, and aborts on a missing fence of either kind.
#if OP_ELEM != 0 && (defined(OP_EMULATOR) || defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define OP_WGMMA 1

// The shared-memory address of `p`, as descriptors take it.
__device__ __forceinline__ unsigned smem_address(const void* p) {
#ifndef OP_EMULATOR
    return (unsigned)__cvta_generic_to_shared(p);
#else
    return emu_smem_address(p);
#endif
}

// The descriptor of a K-major operand staged as linear_mma stages its tiles:
// rows of 64 bytes (32 elements of K), chunk c (16 bytes) of row r at chunk
// c ^ ((r / 2) % 4) of it, which is the 64-byte swizzle (mode 2; the XOR
// reads address bits 7-8, so a tile starts 512-byte aligned), 8-row groups
// 512 bytes apart (the stride byte offset; the leading one is unused by
// swizzled K-major operands). `rows` is row 0 of the operand's 64 (A) or N
// (B) rows at K column 0, or 32 bytes on for columns 16-31.
__device__ __forceinline__ unsigned long long wgmma_desc_sw64(const void* rows) {
    const unsigned a = smem_address(rows);
    return (unsigned long long)((a & 0x3FFFFu) >> 4) | (1ull << 16) | ((512ull >> 4) << 32) |
           (2ull << 62);
}

// Makes this thread's shared-memory writes (generic proxy: stores, cp.async)
// visible to the MMAs' reads (async proxy) once a barrier has followed.
__device__ __forceinline__ void fence_proxy_async_shared() {
#ifndef OP_EMULATOR
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
    emu_fence_proxy_async();
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#ifndef OP_EMULATOR
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
    emu_wgmma_fence();
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#ifndef OP_EMULATOR
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
    emu_wgmma_commit();
#endif
}

// Pins accumulators after a wgmma_wait: an empty asm "writes" each one, so
// that no read of them is scheduled above the wait (the compiler sees the
// registers, not the MMAs' asynchronous writes to them).
template <int N>
__device__ __forceinline__ void wgmma_hold(float (&d)[N]) {
#ifndef OP_EMULATOR
#pragma unroll
    for (int i = 0; i < N; ++i) {
        asm volatile("" : "+f"(d[i])::"memory");
    }
#endif
}

// Every committed group of this warp's MMAs but the newest PENDING is done.
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
#ifndef OP_EMULATOR
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
#else
    emu_wgmma_wait(PENDING);
#endif
}

#if OP_ELEM == 1
#define OP_WGMMA_TYPES "f32.f16.f16"
#else
#define OP_WGMMA_TYPES "f32.bf16.bf16"
#endif
#define OP_WGMMA_D8(b)                                                                        \
    "+f"(d[b]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), "+f"(d[b + 4]), "+f"(d[b + 5]), \
        "+f"(d[b + 6]), "+f"(d[b + 7])

// d += a b for a 64 x 16 A and a 16 x N B (N = 64 or 128), both K-major
// (A's rows and B's columns have K contiguous: x and w as linear stores
// them), given by descriptors; elem operands, f32 sums.
template <int N>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], unsigned long long a,
                                             unsigned long long b) {
    static_assert(N == 64 || N == 128, "wgmma_m64k16: N = 64 or 128");
#ifndef OP_EMULATOR
    if constexpr (N == 64) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16." OP_WGMMA_TYPES " {"
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
            "%32, %33, p, 1, 1, 0, 0;\n}\n"
            : OP_WGMMA_D8(0), OP_WGMMA_D8(8), OP_WGMMA_D8(16), OP_WGMMA_D8(24)
            : "l"(a), "l"(b), "n"(1));
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16." OP_WGMMA_TYPES " {"
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
            "%64, %65, p, 1, 1, 0, 0;\n}\n"
            : OP_WGMMA_D8(0), OP_WGMMA_D8(8), OP_WGMMA_D8(16), OP_WGMMA_D8(24),
              OP_WGMMA_D8(32), OP_WGMMA_D8(40), OP_WGMMA_D8(48), OP_WGMMA_D8(56)
            : "l"(a), "l"(b), "n"(1));
    }
#else
    emu_wgmma(d, N / 2, a, b, bits_to_f32);
#endif
}
#undef OP_WGMMA_D8
#undef OP_WGMMA_TYPES
#endif  // wgmma
#endif  // OP_ELEM != 0

#endif  // OP_COMMON_CUH
