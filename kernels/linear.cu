// linear: out[m, n] = act(sum_k x[m, k] w[n, k] + bias[n]) + residual[m, n]
// x [M, K] row-major, w [N, K] (PyTorch's layout: both operands K-contiguous),
// bias [N] and residual [M, N] optional, out [M, N].
//
// Versions:
// - linear_naive (v1): one thread per output, a plain dot product. The baseline
//   and a second oracle.
// - linear_tiled_vec4 / linear_tiled_scalar (v2): 64x64 output tiles per block of
//   256 threads, K in steps of 64 through shared memory, a 4x4 register tile per
//   thread, the next K step prefetched into registers while the current one is
//   multiplied. `vec4` loads 16 bytes at a time (needs K % 4 == 0 and 16-byte
//   aligned x and w); `scalar` takes any M, N, K. With `partial` set the block
//   computes only its K slice (blockIdx.z) and writes raw sums to
//   partial[z, M, N]; the last of a tile's blocks to finish (counted in
//   tile_counters) adds the slices in fixed order and applies the epilogue:
//   deterministic split-K in one launch, for grids that would leave SMs idle.
//   On sm_90 the host launches each tile's split blocks as one thread-block
//   cluster instead, with no `partial`: they add their slices through
//   distributed shared memory (linear_cluster_finish), in the same order.
//   Why K steps of 64: at the projector's batch 1 (M = 4 or 77) a GEMM is a
//   few tiles split many ways, each block one or a few K steps long; all of a
//   step's loads are issued together, so a block waits on memory about once
//   per step, not once per 16 columns.
// - linear_rows_vec4 / linear_rows_scalar (v4, few rows): 8 rows x 4 columns
//   per block over all of K, K split across the block's threads, no split-K.
//   For M up to a few row groups (batch 1's 4-row encoder GEMMs), where the
//   tiled kernels' split-K chain of memory round trips is most of the time.
//   Any storage; f32 sums on CUDA cores (such a GEMM is bound by latency and
//   bandwidth, not by multiplies).
// - layer_norm_linear_rows (v4 after a layer_norm): v4 whose blocks first
//   normalise their rows of x (x + a residual) themselves, for K up to 4 x
//   LINEAR_ROWS_MAX_THREADS with 16-byte loads: layer_norm and the linear
//   that reads its output in one kernel.
// - attention_linear_rows (v4 after a few-keys attention): v4 whose blocks
//   compute their rows of x as attention's output over a few keys: the
//   attention and the out-projection after it in one kernel.
// - linear_tc_vec8 / linear_tc_scalar (v3, 16-bit storage only): tensor cores.
//   The same 64x64 output tiles and split-K as v2, but a block of 128 threads
//   (4 warps, each a 32x32 quarter as 2x2 WMMA 16x16x16 fragments with f32
//   accumulators), K in steps of 128 bytes per row (64 elements) through two
//   shared-memory stages: cp.async copies the next step while the current one
//   is multiplied. Operand tiles are zero-padded past M, N and K, so any sizes
//   work; `vec8` copies 16 bytes at a time (needs K % 8 == 0 and 16-byte
//   aligned x, w), `scalar` copies elements synchronously. The accumulators go
//   through shared memory to the epilogue (bias, activation, residual,
//   rounding to elem), or to the split-K partial sums. Needs sm_80 (bf16 WMMA,
//   cp.async).
// - linear_tc_large_vec8 / linear_tc_tf32_large_vec4 (v3, large tiles): the
//   same kernel with 128x128 tiles (8 warps of 64x32, 64 bytes of each row per
//   K step, no split-K), for grids that fill the device without splitting.
// - linear_mma_vec8 (v5, 16-bit storage, large grids): the large tiles with
//   explicit fragments: mma.sync m16n8k16 fed by ldmatrix from swizzled,
//   unpadded stages, 4 warps of 64x64, three cp.async stages of 32 K
//   columns. Planned instead of linear_tc_large_vec8 (which stays, for
//   comparison) where the 128x128 tiles alone fill the device; its 128x64
//   twin linear_mma_narrow_vec8 where those fall more evenly on the SMs.
// - linear_layer_norm_mma_vec8 (v5 narrow before a layer_norm, sm_90): the
//   narrow tiles with the LayerNorm of their output (plus a residual) as the
//   epilogue, the blocks along N (N <= 512) one cluster holding whole rows:
//   the linear's output never reaches memory.
// - linear_tc_tf32_vec4 / linear_tc_tf32_scalar (v3 for f32 storage, opt-in):
//   the v3 structure on TF32 tensor cores (WMMA 16x16x8, f32 accumulators),
//   K steps of 32 floats (128 bytes per row). The fragments are rounded to
//   TF32 (10-bit mantissa, round to nearest, ties away: cvt.rna) once loaded
//   from shared memory, which cp.async fills with the f32 bytes as they are
//   (rounding them there instead spilled on sm_90). `vec4` copies 16 bytes at a time
//   (needs K % 4 == 0 and 16-byte aligned x, w). Compiled for sm_80 and newer
//   where the host found the CUDA headers' mma.h (it then defines OP_TF32).
//
// Storage is `elem` (common.cuh); every sum is f32.
// Bytes and flops: sizeof(elem) (MK + NK + MN (+MN residual)) bytes, 2 MNK flops.
#include "common.cuh"

struct LinearParams {
    const elem* x;          // [M, K]
    const elem* w;          // [N, K]
    const elem* bias;       // [N] or null
    const elem* residual;   // [M, N] or null
    elem* out;              // [M, N]
    float* partial;         // [splits, M, N] f32, or null (no split)
    // One per output tile (blockIdx.y * gridDim.x + blockIdx.x) with `partial`:
    // zero before the launch, left zero after it.
    unsigned int* tile_counters;
    int m;
    int n;
    int k;
    int act;          // OP_ACT_*
    int k_per_split;  // K columns per blockIdx.z, a multiple of LINEAR_BK
    int splits;       // gridDim.z of the tiled kernel
};

// The epilogue's arithmetic on one sum, its bias and residual loaded
// beforehand: each added only where the kernel has one (a missing one adds
// nothing, not +0, which would turn -0 into +0).
__device__ __forceinline__ float linear_apply(const LinearParams& p, float acc, float bias,
                                             float residual) {
    if (p.bias != nullptr) {
        acc += bias;
    }
    float y = activate(p.act, acc);
    if (p.residual != nullptr) {
        y += residual;
    }
    return y;
}

__device__ __forceinline__ float linear_epilogue(const LinearParams& p, int m, int n, float acc) {
    const float bias = p.bias != nullptr ? to_f32(p.bias[n]) : 0.0f;
    const float residual = p.residual != nullptr ? to_f32(p.residual[m * p.n + n]) : 0.0f;
    return linear_apply(p, acc, bias, residual);
}

// Whether the epilogues may take 4 columns at a time (16-byte f32 / 8-byte
// 16-bit accesses): N % 4 == 0 and out, bias and residual 16-byte aligned.
// Checked here, once per thread, as callers' memory need not be aligned.
__device__ __forceinline__ bool linear_vec_out(const LinearParams& p) {
    const auto aligned = [](const void* q) { return ((size_t)q & 15) == 0; };
    return (p.n & 3) == 0 && aligned(p.out) && (p.bias == nullptr || aligned(p.bias)) &&
           (p.residual == nullptr || aligned(p.residual));
}

// What the epilogue adds to output columns [n, n + 4) of row m: the bias and
// the residual (zero where absent or past N), four at a time where `vec`
// and all four are in range. Loaded apart from linear_out4 so that a kernel
// can have them in flight while it waits for something else.
struct LinearAddends {
    float4 bias;
    float4 residual;
};

__device__ __forceinline__ LinearAddends linear_addends(const LinearParams& p, bool vec, int m,
                                                        int n) {
    LinearAddends a = {make_float4(0.0f, 0.0f, 0.0f, 0.0f), make_float4(0.0f, 0.0f, 0.0f, 0.0f)};
    if (vec && n + 4 <= p.n) {
        if (p.bias != nullptr) a.bias = load4(p.bias + n);
        if (p.residual != nullptr) a.residual = load4(p.residual + m * p.n + n);
        return a;
    }
    float b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        if (n + e < p.n) {
            if (p.bias != nullptr) b[e] = to_f32(p.bias[n + e]);
            if (p.residual != nullptr) r[e] = to_f32(p.residual[m * p.n + n + e]);
        }
    }
    a.bias = make_float4(b[0], b[1], b[2], b[3]);
    a.residual = make_float4(r[0], r[1], r[2], r[3]);
    return a;
}

// Output columns [n, n + 4) of row m through the epilogue to `out`, given
// their sums and addends: four at a time where `vec` and all four are in
// range, else the ones in range one by one.
__device__ __forceinline__ void linear_out4(const LinearParams& p, bool vec, int m, int n,
                                            const float* sums, const LinearAddends& a) {
    const float bias[4] = {a.bias.x, a.bias.y, a.bias.z, a.bias.w};
    const float residual[4] = {a.residual.x, a.residual.y, a.residual.z, a.residual.w};
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        v[e] = linear_apply(p, sums[e], bias[e], residual[e]);
    }
    if (vec && n + 4 <= p.n) {
        store4(p.out + m * p.n + n, make_float4(v[0], v[1], v[2], v[3]));
        return;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        if (n + e < p.n) {
            p.out[m * p.n + n + e] = from_f32(v[e]);
        }
    }
}

// Output columns [n, n + 4) of row m, `sums[0..4)` their sums: with
// `partial` (p.partial, or null where a kernel never splits) raw to its
// split-K slice `split` (four at a time where N % 4 == 0; the pool aligns
// it); else through the epilogue to `out` (linear_out4).
__device__ __forceinline__ void linear_store4(const LinearParams& p, float* partial, bool vec,
                                              int split, int m, int n, const float* sums) {
    if (partial != nullptr) {
        float* dst = partial + (split * p.m + m) * p.n + n;
        if ((p.n & 3) == 0 && n + 4 <= p.n) {
            store_float4(dst, make_float4(sums[0], sums[1], sums[2], sums[3]));
            return;
        }
        for (int e = 0; e < 4 && n + e < p.n; ++e) {
            dst[e] = sums[e];
        }
        return;
    }
    // Loads interleaved with the arithmetic where not 4 at a time: their
    // addends all loaded first cost v2 a spill on sm_90.
    if (!vec || n + 4 > p.n) {
        for (int e = 0; e < 4 && n + e < p.n; ++e) {
            p.out[m * p.n + n + e] = from_f32(linear_epilogue(p, m, n + e, sums[e]));
        }
        return;
    }
    linear_out4(p, true, m, n, sums, linear_addends(p, true, m, n));
}

// This block's weights, rows [blockIdx.x * bn, + bn) over its K slice
// (blockIdx.z of k_per_split columns, or all of K where k_per_split is 0),
// asked of L2 one 128-byte line at a time, spread over the block's threads.
// Called before the wait for the previous kernel: with dependent launch the
// weights stream in from DRAM while that kernel drains.
__device__ __forceinline__ void linear_prefetch_w(const LinearParams& p, int bn) {
    const int n0 = blockIdx.x * bn;
    const int rows = min(bn, p.n - n0);
    const int k0 = p.k_per_split > 0 ? blockIdx.z * p.k_per_split : 0;
    const int k1 = p.k_per_split > 0 ? min(p.k, k0 + p.k_per_split) : p.k;
    // One address per line of a row's slice, 128 bytes apart from its first
    // element, the last clamped to its last element: every line of a row
    // that starts on a line (the projector's weights: K x elem is a multiple
    // of 128 bytes and the pool aligns blocks to 256); elsewhere a row's last
    // line may be left to the loads.
    constexpr int LINE = 128 / (int)sizeof(elem);  // elements per line
    const int lines = (k1 - 1 - k0) / LINE + 1;
    const int count = rows > 0 && k1 > k0 ? rows * lines : 0;
#pragma unroll 1
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const int r = i / lines;
        const int col = min(k1 - 1, k0 + (i - r * lines) * LINE);
        prefetch_l2(p.w + (n0 + r) * p.k + col);
    }
}

// v1: block (16, 16); grid (ceil(N / 16), ceil(M / 16)).
extern "C" __global__ void OP_KERNEL_NAME(linear_naive)(const LinearParams p) {
    dependent_launch_prologue();
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    const int m = blockIdx.y * blockDim.y + threadIdx.y;
    if (m >= p.m || n >= p.n) {
        return;
    }
    const elem* xr = p.x + m * p.k;
    const elem* wr = p.w + n * p.k;
    float acc = 0.0f;
    for (int kk = 0; kk < p.k; ++kk) {
        acc = fmaf(to_f32(xr[kk]), to_f32(wr[kk]), acc);
    }
    p.out[m * p.n + n] = from_f32(linear_epilogue(p, m, n, acc));
}

#define LINEAR_BM 64
#define LINEAR_BN 64

// Split-K, after this block wrote its slice of the tile at (m0, n0) to
// `partial`: the last of the tile's `splits` blocks to get here adds the slices
// in order 0, 1, .., splits - 1 (so the sum does not depend on which block was
// last), applies the epilogue and resets the tile's counter for the next
// launch. The barrier orders the block's stores before thread 0's count, whose
// release publishes them at GPU scope; the last block's count acquires every
// other block's slice, and its barrier passes them to its threads (whose loads
// bypass L1, which is not coherent across SMs).
// The last block reads splits x BM x BN floats alone, so it keeps many loads
// in flight: each thread owns PER groups of 4 columns (16-byte loads where N
// allows) and issues several slices' loads for all of them before adding them.
template <int BM, int BN, int THREADS>
__device__ __forceinline__ void linear_splitk_finish(const LinearParams& p, int m0, int n0) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int* counter = p.tile_counters + blockIdx.y * gridDim.x + blockIdx.x;
        last = atomic_add_acq_rel(counter, 1u) == (unsigned int)(p.splits - 1);
        if (last) {
            *counter = 0u;
        }
    }
    __syncthreads();
    if (!last) {
        return;
    }
    constexpr int GROUPS = BM * BN / 4;  // 4 consecutive columns each
    constexpr int PER = GROUPS / THREADS;
    static_assert(PER * THREADS == GROUPS, "groups split evenly");
    const int slice = p.m * p.n;
    const bool vec = (p.n & 3) == 0;  // 16-byte aligned groups (the pool aligns blocks)
    float4 acc[PER];
    int base[PER];   // offset of the group's first column in a slice
    int width[PER];  // the group's columns inside the output (0: none)
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int g = threadIdx.x + THREADS * i;
        const int m = m0 + g / (BN / 4);
        const int n = n0 + (g % (BN / 4)) * 4;
        width[i] = m < p.m ? max(0, min(4, p.n - n)) : 0;
        base[i] = width[i] > 0 ? m * p.n + n : 0;  // in range only where used
        acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    // FLIGHT slices' loads (8 float4 per thread, 32 KB per block of 256) are
    // issued before any is added: the block waits on memory once per FLIGHT
    // slices, not per slice. More would cost the kernel registers (and
    // blocks per SM) on the grids that do not split. The adds keep the order
    // 0, 1, .., splits - 1.
    constexpr int FLIGHT = PER >= 8 ? 1 : 8 / PER;
    for (int s0 = 0; s0 < p.splits; s0 += FLIGHT) {
        float4 v[FLIGHT][PER];
#pragma unroll
        for (int f = 0; f < FLIGHT; ++f) {
            const float* src = p.partial + (s0 + f) * slice;
            const bool live = s0 + f < p.splits;
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                v[f][i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (!live || width[i] == 0) {
                    continue;
                }
                if (vec) {
                    v[f][i] = __ldcg(reinterpret_cast<const float4*>(src + base[i]));
                } else {
                    v[f][i].x = __ldcg(src + base[i]);
                    if (width[i] > 1) v[f][i].y = __ldcg(src + base[i] + 1);
                    if (width[i] > 2) v[f][i].z = __ldcg(src + base[i] + 2);
                    if (width[i] > 3) v[f][i].w = __ldcg(src + base[i] + 3);
                }
            }
        }
#pragma unroll
        for (int f = 0; f < FLIGHT; ++f) {
            if (s0 + f >= p.splits) {
                break;
            }
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                acc[i].x += v[f][i].x;
                acc[i].y += v[f][i].y;
                acc[i].z += v[f][i].z;
                acc[i].w += v[f][i].w;
            }
        }
    }
    const bool vec_out = linear_vec_out(p);
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        if (width[i] > 0) {
            const int m = base[i] / p.n;
            const float sums[4] = {acc[i].x, acc[i].y, acc[i].z, acc[i].w};
            linear_store4(p, nullptr, vec_out, 0, m, base[i] - m * p.n, sums);
        }
    }
}
// Most blocks of one cluster the host launches (the portable limit on sm_90).
#define LINEAR_MAX_CLUSTER 8

// Split-K through a thread-block cluster (sm_90): the host launches the
// `splits` blocks of each tile (blockIdx.z 0 .. splits - 1) as one cluster,
// with no workspace. Each block has left its raw sums in its own shared
// memory, `tile`; after the cluster's barrier, block r takes the r-th share
// of the tile's live 4-column groups, reads every block's sums for them
// through distributed shared memory (all of a group's loads in flight at
// once), adds them in order of rank 0, 1, .., splits - 1 (the same sums in
// the same order as linear_splitk_finish: bitwise the same output) and
// applies the epilogue, whose bias and residual it loaded before the first
// barrier. A second barrier keeps each block's shared memory until the others
// have read it (relaxed: it need not wait for the stores). What it saves
// against the workspace: the partial sums' trip through L2, the count, one
// block reading every slice alone, and the epilogue's loads after them.
template <int BM, int BN, int THREADS>
__device__ __forceinline__ void linear_cluster_finish(const LinearParams& p, int m0, int n0,
                                                      const float (*tile)[BN + 4]) {
    // A thread's groups: at most PER with two or more blocks to share them.
    constexpr int PER = BM * BN / 4 / THREADS / 2;
    static_assert(PER >= 1 && PER * THREADS * 2 == BM * BN / 4, "groups split evenly");
    const int splits = (int)cluster_blocks();
    const int rank = (int)cluster_rank();
    const int per_row = (min(BN, p.n - n0) + 3) / 4;
    const int groups = min(BM, p.m - m0) * per_row;
    const int g0 = rank * groups / splits;
    const int g1 = (rank + 1) * groups / splits;
    const bool vec_out = linear_vec_out(p);
    LinearAddends addends[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int g = g0 + threadIdx.x + THREADS * i;
        if (g < g1) {
            const int r = g / per_row;
            addends[i] = linear_addends(p, vec_out, m0 + r, n0 + (g - r * per_row) * 4);
        }
    }
    cluster_sync();
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int g = g0 + threadIdx.x + THREADS * i;
        if (g >= g1) {
            break;
        }
        const int r = g / per_row;
        const int c = (g - r * per_row) * 4;
        float4 v[LINEAR_MAX_CLUSTER];
#pragma unroll
        for (int s = 0; s < LINEAR_MAX_CLUSTER; ++s) {
            if (s < splits) {
                v[s] = cluster_load_float4(&tile[r][c], (unsigned)s);
            }
        }
        float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int s = 0; s < LINEAR_MAX_CLUSTER; ++s) {
            if (s < splits) {
                sums[0] += v[s].x;
                sums[1] += v[s].y;
                sums[2] += v[s].z;
                sums[3] += v[s].w;
            }
        }
        linear_out4(p, vec_out, m0 + r, n0 + c, sums, addends[i]);
    }
    cluster_sync_relaxed();  // the sums were consumed by the stores
}

// K columns per step of the v2 kernel: 256 bytes of each f32 row, so that a
// split of 64 columns is one round trip to memory (all of a step's loads are
// in flight together) rather than a chain of dependent ones.
#define LINEAR_BK 64
#define LINEAR_THREADS 256
// Shared tiles are stored K-major with 4 floats of padding per row: a row is
// 272 bytes, so float4 reads of a row stay 16-byte aligned.
#define LINEAR_LD (LINEAR_BM + 4)
// float4s per thread per operand and K step: 64 rows x 64 columns / 4 / 256.
#define LINEAR_LOADS (LINEAR_BK / 16)

// Elements [col, col + 4) of row `row` of a [rows, K] matrix, zero where the row
// is out of range or a column is at or past `k_end`.
template <bool VEC>
__device__ __forceinline__ float4 linear_load4(const elem* a, int row, int rows, int col,
                                               int k_end, int k) {
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (row >= rows) {
        return v;
    }
    const elem* r = a + row * k;
    if (VEC) {
        // K % 4 == 0, col % 4 == 0 and k_end % 4 == 0 (k_end is K or a multiple
        // of LINEAR_BK), so the 4 columns are all in range or all out.
        if (col < k_end) {
            v = load4(r + col);
        }
    } else {
        if (col + 0 < k_end) v.x = to_f32(r[col + 0]);
        if (col + 1 < k_end) v.y = to_f32(r[col + 1]);
        if (col + 2 < k_end) v.z = to_f32(r[col + 2]);
        if (col + 3 < k_end) v.w = to_f32(r[col + 3]);
    }
    return v;
}

// A thread's share of one v2 operand tile for a K step: row `row` of a
// [rows, K] matrix, columns col + 16 j.
template <bool VEC>
__device__ __forceinline__ void linear_tiled_load(float4 (&a)[LINEAR_LOADS], const elem* m,
                                                  int row, int rows, int col, int k_end, int k) {
#pragma unroll
    for (int j = 0; j < LINEAR_LOADS; ++j) {
        a[j] = linear_load4<VEC>(m, row, rows, col + 16 * j, k_end, k);
    }
}

// v2's first K step as loaded: this thread's rows `xrow` of x and `wrow` of
// w, columns col + 16 j.
template <bool VEC>
struct LinearTiledFirst {
    const LinearParams& p;
    __device__ __forceinline__ void operator()(float4 (&xa)[LINEAR_LOADS],
                                               float4 (&wa)[LINEAR_LOADS], int xrow, int wrow,
                                               int col, int k_end) const {
        linear_tiled_load<VEC>(xa, p.x, xrow, p.m, col, k_end, p.k);
        linear_tiled_load<VEC>(wa, p.w, wrow, p.n, col, k_end, p.k);
    }
};

// v2's x for the K steps after the first, loaded from p.x.
template <bool VEC>
struct LinearTiledNextX {
    const LinearParams& p;
    __device__ __forceinline__ void operator()(float4 (&xa)[LINEAR_LOADS], int row, int col,
                                               int k_end) const {
        linear_tiled_load<VEC>(xa, p.x, row, p.m, col, k_end, p.k);
    }
};

// v2: block 256 threads; grid (ceil(N / 64), ceil(M / 64), splits).
// `first(xa, wa, xrow, wrow, col, k_end)` gives the first K step's x and w
// tiles, this thread's share (LinearTiledFirst); `next(xa, row, col,
// k_end)` each later step's x (LinearTiledNextX).
template <bool VEC, class First, class Next>
__device__ __forceinline__ void linear_tiled(const LinearParams& p, First first, Next next) {
    __shared__ __align__(16) float xs[LINEAR_BK][LINEAR_LD];
    __shared__ __align__(16) float ws[LINEAR_BK][LINEAR_LD];

    const int tid = threadIdx.x;
    const int tx = tid & 15;  // output columns tx * 4 .. + 4 of the tile
    const int ty = tid >> 4;  // output rows ty * 4 .. + 4 of the tile
    const int m0 = blockIdx.y * LINEAR_BM;
    const int n0 = blockIdx.x * LINEAR_BN;
    const int k_begin = blockIdx.z * p.k_per_split;
    const int k_end = min(p.k, k_begin + p.k_per_split);

    // Loader: each thread fetches 4 consecutive K columns of one row of each
    // tile, at columns lk + 16 j.
    const int lr = tid >> 2;        // tile row 0..63
    const int lk = (tid & 3) * 4;   // tile column 0, 4, 8, 12
    const bool rows_live = m0 + ty * 4 < p.m;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            acc[i][j] = 0.0f;
        }
    }

    float4 xa[LINEAR_LOADS];
    float4 wa[LINEAR_LOADS];
    first(xa, wa, m0 + lr, n0 + lr, k_begin + lk, k_end);
    for (int k0 = k_begin; k0 < k_end; k0 += LINEAR_BK) {
        __syncthreads();  // every thread is done reading the previous tile
#pragma unroll
        for (int j = 0; j < LINEAR_LOADS; ++j) {
            const int c = lk + 16 * j;
            xs[c + 0][lr] = xa[j].x;
            xs[c + 1][lr] = xa[j].y;
            xs[c + 2][lr] = xa[j].z;
            xs[c + 3][lr] = xa[j].w;
            ws[c + 0][lr] = wa[j].x;
            ws[c + 1][lr] = wa[j].y;
            ws[c + 2][lr] = wa[j].z;
            ws[c + 3][lr] = wa[j].w;
        }
        __syncthreads();
        if (k0 + LINEAR_BK < k_end) {
            const int c = k0 + LINEAR_BK + lk;
            linear_tiled_load<VEC>(wa, p.w, n0 + lr, p.n, c, k_end, p.k);
            next(xa, m0 + lr, c, k_end);
        }
        // Threads whose 4 rows are all past M (a 77-row GEMM's second tile,
        // batch 1's 4-row ones) only stage: the SM's FMAs go to the others.
        if (rows_live) {
#pragma unroll 16
            for (int kk = 0; kk < LINEAR_BK; ++kk) {
                const float4 a = *reinterpret_cast<const float4*>(&xs[kk][ty * 4]);
                const float4 b = *reinterpret_cast<const float4*>(&ws[kk][tx * 4]);
                const float av[4] = {a.x, a.y, a.z, a.w};
                const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
                    }
                }
            }
        }
    }

    if (cluster_blocks() > 1) {
        // The tile's sums to shared memory, over the x stage (64 x 68 floats).
        static_assert(LINEAR_BK == LINEAR_BM && LINEAR_LD == LINEAR_BN + 4, "x stage holds a tile");
        __syncthreads();  // every thread is done reading the last stage
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            store_float4(&xs[ty * 4 + i][tx * 4],
                         make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
        }
        linear_cluster_finish<LINEAR_BM, LINEAR_BN, LINEAR_THREADS>(p, m0, n0, xs);
        return;
    }
    const bool vec_out = linear_vec_out(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty * 4 + i;
        if (m < p.m && n0 + tx * 4 < p.n) {
            linear_store4(p, p.partial, vec_out, blockIdx.z, m, n0 + tx * 4, acc[i]);
        }
    }
    if (p.partial != nullptr) {
        linear_splitk_finish<LINEAR_BM, LINEAR_BN, LINEAR_THREADS>(p, m0, n0);
    }
}

template <bool VEC>
__device__ __forceinline__ void linear_tiled(const LinearParams& p) {
    linear_tiled<VEC>(p, LinearTiledFirst<VEC>{p}, LinearTiledNextX<VEC>{p});
}

// v2's entry points are f32 only: 16-bit storage runs these GEMMs on tensor
// cores (v3), so its compiles leave them out.
#if OP_ELEM == 0
extern "C" __global__ void __launch_bounds__(LINEAR_THREADS)
OP_KERNEL_NAME(linear_tiled_vec4)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LINEAR_BN); });
    linear_tiled<true>(p);
}

extern "C" __global__ void __launch_bounds__(LINEAR_THREADS)
OP_KERNEL_NAME(linear_tiled_scalar)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LINEAR_BN); });
    linear_tiled<false>(p);
}
#endif

// Few rows (M up to a few row groups of LINEAR_ROWS_M, the encoder side of a
// small batch): a block computes LINEAR_ROWS_M rows x LINEAR_ROWS_N columns
// over the whole of K, its threads splitting K in chunks of 4. No split-K and
// no workspace: the host sizes blocks for one chunk per thread up to K = 1024
// (beyond that a thread takes its chunks one after another); then the sums
// meet inside the block. The chain a split GEMM pays (partial sums
// out, fence, count, read back) is gone; what is left is one kernel's worth
// of memory latency.
#define LINEAR_ROWS_M 8
#define LINEAR_ROWS_N 4
#define LINEAR_ROWS_MAX_THREADS 256
// Each lane's LINEAR_ROWS_M x LINEAR_ROWS_N sums: one per lane after the
// warp's transposing reduction below.
static_assert(LINEAR_ROWS_M * LINEAR_ROWS_N == 32, "one sum per lane");

// v4's output: lane l of warp 0 finishes output l of the block (row
// l / LINEAR_ROWS_N, column l % LINEAR_ROWS_N); its bias and residual are
// loaded at the start, in flight during the sums.
struct LinearRowsOut {
    int m;
    int n;
    bool finishes;
    float bias;
    float residual;
};

__device__ __forceinline__ LinearRowsOut linear_rows_out(const LinearParams& p) {
    const int lane = threadIdx.x & 31;
    LinearRowsOut o;
    o.m = blockIdx.y * LINEAR_ROWS_M + lane / LINEAR_ROWS_N;
    o.n = blockIdx.x * LINEAR_ROWS_N + lane % LINEAR_ROWS_N;
    o.finishes = (threadIdx.x >> 5) == 0 && o.m < p.m && o.n < p.n;
    o.bias = o.finishes && p.bias != nullptr ? to_f32(p.bias[o.n]) : 0.0f;
    o.residual = o.finishes && p.residual != nullptr ? to_f32(p.residual[o.m * p.n + o.n]) : 0.0f;
    return o;
}

// v4's products of one chunk (4 columns of K): rows a[0 .. RM) of x by rows
// w[0 .. RN) of w into acc[i * RN + j].
__device__ __forceinline__ void linear_rows_fma(float* acc, const float4* a, const float4* w) {
#pragma unroll
    for (int i = 0; i < LINEAR_ROWS_M; ++i) {
#pragma unroll
        for (int j = 0; j < LINEAR_ROWS_N; ++j) {
            float s = acc[i * LINEAR_ROWS_N + j];
            s = fmaf(a[i].x, w[j].x, s);
            s = fmaf(a[i].y, w[j].y, s);
            s = fmaf(a[i].z, w[j].z, s);
            s = fmaf(a[i].w, w[j].w, s);
            acc[i * LINEAR_ROWS_N + j] = s;
        }
    }
}

// v4's end: each thread's 32 partial sums to the block's 32 outputs. The
// warp's transposing reduction (warp_folds, common.cuh): after 16 + 8 + 4 +
// 2 + 1 shuffles lane l holds the warp's sum l (32 sums for the 160
// shuffles of one warp_sum each), bitwise the same in both partners. Then
// warp 0 adds the warps' sums in fixed order and applies the epilogue.
__device__ __forceinline__ void linear_rows_finish(const LinearParams& p, float* acc,
                                                   const LinearRowsOut& o) {
    __shared__ float sums[LINEAR_ROWS_MAX_THREADS / 32][32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    warp_folds<16>(acc, lane);
    sums[warp][lane] = acc[0];
    __syncthreads();
    if (warp == 0) {
        float s = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
            s += sums[w][lane];
        }
        if (o.finishes) {
            p.out[o.m * p.n + o.n] = from_f32(linear_apply(p, s, o.bias, o.residual));
        }
    }
}

// v4's products and end for a block whose x rows, one chunk each, a kernel
// computed itself (layer_norm_linear_rows, attention_linear_rows): rounded to
// elem first, as the tensor they stand for would hold them.
__device__ __forceinline__ void linear_rows_of(const LinearParams& p, float4* a, const float4* w,
                                               const LinearRowsOut& o) {
    float acc[LINEAR_ROWS_M * LINEAR_ROWS_N];
#pragma unroll
    for (int i = 0; i < LINEAR_ROWS_M; ++i) {
        a[i] = make_float4(to_f32(from_f32(a[i].x)), to_f32(from_f32(a[i].y)),
                           to_f32(from_f32(a[i].z)), to_f32(from_f32(a[i].w)));
    }
#pragma unroll
    for (int i = 0; i < LINEAR_ROWS_M * LINEAR_ROWS_N; ++i) {
        acc[i] = 0.0f;
    }
    linear_rows_fma(acc, a, w);
    linear_rows_finish(p, acc, o);
}

// v4: block 32 to 256 threads (the host picks enough for K / 4 chunks); grid
// (ceil(N / LINEAR_ROWS_N), ceil(M / LINEAR_ROWS_M)). A thread's chunks go
// IN_FLIGHT at a time.
template <bool VEC, int IN_FLIGHT>
__device__ __forceinline__ void linear_rows(const LinearParams& p) {
    constexpr int RM = LINEAR_ROWS_M;
    constexpr int RN = LINEAR_ROWS_N;
    const int m0 = blockIdx.y * RM;
    const int n0 = blockIdx.x * RN;
    const LinearRowsOut o = linear_rows_out(p);

    float acc[RM * RN];
#pragma unroll
    for (int i = 0; i < RM * RN; ++i) {
        acc[i] = 0.0f;
    }
    // Rows past M load nothing (linear_load4 returns zeros) and add zeros.
    // All 12 loads of a chunk, and of the chunks in flight with it, are
    // issued before the first multiply: written as loads interleaved with
    // their multiplies, ptxas issued half of them only after the first
    // products, a round trip to memory each. The products go in chunk order
    // whatever IN_FLIGHT is.
    const int stride = blockDim.x * 4;
#pragma unroll 1
    for (int col = threadIdx.x * 4; col < p.k; col += IN_FLIGHT * stride) {
        float4 w[IN_FLIGHT][RN];
        float4 a[IN_FLIGHT][RM];
#pragma unroll
        for (int c = 0; c < IN_FLIGHT; ++c) {
            if (c == 0 || col + c * stride < p.k) {  // chunk 0: the loop's own test
#pragma unroll
                for (int j = 0; j < RN; ++j) {
                    w[c][j] = linear_load4<VEC>(p.w, n0 + j, p.n, col + c * stride, p.k, p.k);
                }
#pragma unroll
                for (int i = 0; i < RM; ++i) {
                    a[c][i] = linear_load4<VEC>(p.x, m0 + i, p.m, col + c * stride, p.k, p.k);
                }
            }
        }
#pragma unroll
        for (int c = 0; c < IN_FLIGHT; ++c) {
            if (c == 0 || col + c * stride < p.k) {
                linear_rows_fma(acc, a[c], w[c]);
            }
        }
    }
    linear_rows_finish(p, acc, o);
}

extern "C" __global__ void __launch_bounds__(LINEAR_ROWS_MAX_THREADS)
OP_KERNEL_NAME(linear_rows_vec4)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LINEAR_ROWS_N); });
    linear_rows<true, 1>(p);
}

extern "C" __global__ void __launch_bounds__(LINEAR_ROWS_MAX_THREADS)
OP_KERNEL_NAME(linear_rows_scalar)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LINEAR_ROWS_N); });
    linear_rows<false, 1>(p);
}

// v4 past one chunk per thread (K > 4 LINEAR_ROWS_MAX_THREADS: the fc's
// 4096, FFN down's 2048): two chunks' 24 loads in flight at once, half the
// round trips, the same sums. Its own kernel because holding them takes
// ~180 registers, which would halve the blocks per SM of the one-chunk case.
#define LINEAR_ROWS_DEEP_IN_FLIGHT 2
extern "C" __global__ void __launch_bounds__(LINEAR_ROWS_MAX_THREADS)
OP_KERNEL_NAME(linear_rows_deep_vec4)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LINEAR_ROWS_N); });
    linear_rows<true, LINEAR_ROWS_DEEP_IN_FLIGHT>(p);
}

// layer_norm, then linear on its output: the host's layer_norm_linear. The
// norm's input x + norm_residual, as `x`, and its weight and bias; `sum_out`
// receives x + norm_residual, as layer_norm's does. The linear takes no
// residual of its own.
struct LayerNormLinearParams {
    LinearParams linear;        // x: the norm's input [M, K]; residual: null
    const elem* norm_residual;  // [M, K] or null
    const elem* norm_weight;    // [K]
    const elem* norm_bias;      // [K]
    elem* sum_out;              // [M, K] or null
    float eps;
    int pad0;
};

// linear_layer_norm_mma_vec8 (below): layer_norm(y + residual) of the
// linear's output y, and y + residual.
struct LinearLayerNormParams {
    LinearParams linear;        // out unused: y is not stored
    const elem* norm_residual;  // [M, N] or null
    const elem* norm_weight;    // [N]
    const elem* norm_bias;      // [N]
    elem* sum_out;              // [M, N] or null: receives y + residual
    elem* norm_out;             // [M, N]
    float eps;
    int pad0;
};

// v4 with the norm before its sums (few rows, K <= 4 x blockDim: one chunk of
// 4 columns per thread; 16-byte loads). A v4 block reads its rows of x whole
// anyway, so it normalises them itself: layer_norm's three passes
// (common.cuh), their sums over the block instead of a warp, the result
// rounded to elem as layer_norm's output would be, then v4's products. The
// blocks of column block 0 write sum_out. The norm's output is never stored:
// one kernel, and one round trip to memory, instead of two. Block and grid as
// v4's.
extern "C" __global__ void __launch_bounds__(LINEAR_ROWS_MAX_THREADS)
OP_KERNEL_NAME(layer_norm_linear_rows)(const LayerNormLinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p.linear, LINEAR_ROWS_N); });
    __shared__ float scratch[32][2 * LINEAR_ROWS_M];
    constexpr int RM = LINEAR_ROWS_M;
    constexpr int RN = LINEAR_ROWS_N;
    const LinearParams& lp = p.linear;
    const int m0 = blockIdx.y * RM;
    const int n0 = blockIdx.x * RN;
    const LinearRowsOut o = linear_rows_out(lp);
    const int col = threadIdx.x * 4;
    const bool live = col < lp.k;
    const bool residual = p.norm_residual != nullptr;
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

    float4 w[RN];
    float4 x[RM];
    float4 r[RM];
#pragma unroll
    for (int j = 0; j < RN; ++j) {
        w[j] = linear_load4<true>(lp.w, n0 + j, lp.n, col, lp.k, lp.k);
    }
#pragma unroll
    for (int i = 0; i < RM; ++i) {
        x[i] = linear_load4<true>(lp.x, m0 + i, lp.m, col, lp.k, lp.k);
        r[i] = residual ? linear_load4<true>(p.norm_residual, m0 + i, lp.m, col, lp.k, lp.k) : zero;
    }
    const float4 g = live ? load4(p.norm_weight + col) : zero;
    const float4 h = live ? load4(p.norm_bias + col) : zero;
    const float inv_k = 1.0f / (float)lp.k;

    // Pass 1: each row's sums of x and of the residual (zeros past M and K);
    // x + residual to sum_out.
    float sums[2 * RM];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
        sums[i] = 0.0f;
        sums[RM + i] = 0.0f;
        const float4 s = layer_norm_sum4(x[i], r[i], residual, sums[i], sums[RM + i]);
        if (p.sum_out != nullptr && blockIdx.x == 0 && live && m0 + i < lp.m) {
            store4(p.sum_out + (m0 + i) * lp.k + col, s);
        }
    }
    block_sums<2 * RM>(sums, scratch);
    // Pass 2: the deviations from the means, their sum and sum of squares.
    float4 d[RM];
    float moments[2 * RM];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
        const float mr = residual ? sums[RM + i] * inv_k : 0.0f;
        d[i] = layer_norm_dev4(x[i], r[i], residual, sums[i] * inv_k, mr);
        moments[i] = 0.0f;
        moments[RM + i] = 0.0f;
        if (live) {
            layer_norm_moments4(d[i], moments[i], moments[RM + i]);
        }
    }
    block_sums<2 * RM>(moments, scratch);
    // Pass 3: the normalised rows, rounded to elem, are the products' x.
    float4 a[RM];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
        const float c = moments[i] * inv_k;
        const float var = fmaxf(moments[RM + i] * inv_k - c * c, 0.0f);
        const float rstd = 1.0f / sqrtf(var + p.eps);
        const float4 y = layer_norm_out4(d[i], c, rstd, g, h);
        a[i] = live && m0 + i < lp.m ? y : zero;
    }
    linear_rows_of(lp, a, w, o);
}

// attention, then linear on its output: the host's attention_linear, for
// few keys (the encoder's self-attention over the signal tokens).
struct AttentionLinearParams {
    LinearParams linear;        // x: unused (the attention's output, never stored)
    AttentionParams attention;  // out: unused
};

// v4 with a few-keys attention before its sums (few rows, K = heads x
// head_dim <= 4 x blockDim: one chunk of 4 columns per thread, 16-byte loads;
// head_dim / 4 a power of two up to 32). Thread t's chunk 4t is 4 of head
// (4t / head_dim)'s columns, so the threads of a head are head_dim / 4
// consecutive lanes of one warp: each row's attention output is computed
// where v4 would have loaded it, by attention_few_keys_row with that group,
// then v4's products (linear_rows_of). Every
// block recomputes its rows' attention (a few keys of a few rows: cheaper
// than a launch and a round trip through memory). Block and grid as v4's.
extern "C" __global__ void __launch_bounds__(LINEAR_ROWS_MAX_THREADS)
OP_KERNEL_NAME(attention_linear_rows)(const AttentionLinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p.linear, LINEAR_ROWS_N); });
    constexpr int RM = LINEAR_ROWS_M;
    constexpr int RN = LINEAR_ROWS_N;
    const LinearParams& lp = p.linear;
    const AttentionParams& ap = p.attention;
    const int m0 = blockIdx.y * RM;
    const int n0 = blockIdx.x * RN;
    const LinearRowsOut o = linear_rows_out(lp);
    const int col = threadIdx.x * 4;
    const bool live = col < lp.k;
    const int hd = ap.head_dim;
    const int group = hd / 4;
    const int h = col / hd;
    const int c0 = col - h * hd;
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

    float4 w[RN];
#pragma unroll
    for (int j = 0; j < RN; ++j) {
        w[j] = linear_load4<true>(lp.w, n0 + j, lp.n, col, lp.k, lp.k);
    }
    float4 a[RM];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
        const int m = m0 + i;
        a[i] = zero;
        if (m < lp.m) {  // block-uniform
            const int b = m / ap.lq;
            a[i] = attention_few_keys_row<true>(ap, b, m - b * ap.lq, h, c0, group, live);
        }
    }
    linear_rows_of(lp, a, w, o);
}

// layer_norm_linear on the split tiled kernels (v2, v3; sm_90 clusters): the
// norm's rows are spread over a tile's split blocks, each holding its K slice
// of them (the host plans one K step per block, the whole of K per cluster),
// so the row statistics are summed over the cluster (cluster_row_sums), in
// layer_norm's three passes. A thread holds CHUNKS groups of 4 columns of row
// `row`, starting at `col` STRIDE apart, TPR threads per row; `x` comes in as
// the norm's x and leaves as the normalised row, rounded to elem, zero past M
// and k_end, as the products' x. The blocks of column block 0 write sum_out.
// `slots` is 2 x BM __shared__ slots, `r0` this row's index among them.
// `before_out()` runs as the last pass begins (its loads beside the norm's
// weight and bias).
template <int TPR, int CHUNKS, int STRIDE, int BM, class BeforeOut>
__device__ __forceinline__ void layer_norm_slice(const LayerNormLinearParams& q, int row, int col,
                                                 int k_end, float4 (&x)[CHUNKS],
                                                 float2 (*slots)[BM], int r0,
                                                 BeforeOut before_out) {
    const LinearParams& p = q.linear;
    const bool residual = q.norm_residual != nullptr;
    const bool row_live = row < p.m;
    const float inv_k = 1.0f / (float)p.k;
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float4 r[CHUNKS];
    float sx = 0.0f;
    float sr = 0.0f;
#pragma unroll
    for (int j = 0; j < CHUNKS; ++j) {
        const int c = col + STRIDE * j;
        r[j] = residual ? linear_load4<true>(q.norm_residual, row, p.m, c, k_end, p.k) : zero;
        layer_norm_sum4(x[j], r[j], residual, sx, sr);
    }
    // x + residual is stored while the cluster gathers the sums: before the
    // barrier, its release would wait for the stores.
    const float2 sums = cluster_row_sums<TPR, LINEAR_MAX_CLUSTER>(
        make_float2(sx, sr), &slots[0][r0], [&] {
            if (q.sum_out == nullptr || blockIdx.x != 0 || !row_live) {
                return;
            }
            float unused = 0.0f;
#pragma unroll
            for (int j = 0; j < CHUNKS; ++j) {
                const int c = col + STRIDE * j;
                if (c < k_end) {
                    store4(q.sum_out + row * p.k + c,
                           layer_norm_sum4(x[j], r[j], residual, unused, unused));
                }
            }
        });
    const float mx = sums.x * inv_k;
    const float mr = residual ? sums.y * inv_k : 0.0f;
    float sd = 0.0f;
    float sdd = 0.0f;
#pragma unroll
    for (int j = 0; j < CHUNKS; ++j) {
        if (col + STRIDE * j < k_end) {
            x[j] = layer_norm_dev4(x[j], r[j], residual, mx, mr);
            layer_norm_moments4(x[j], sd, sdd);
        }
    }
    const float2 moments =
        cluster_row_sums<TPR, LINEAR_MAX_CLUSTER>(make_float2(sd, sdd), &slots[1][r0], [] {});
    const float c = moments.x * inv_k;
    const float var = fmaxf(moments.y * inv_k - c * c, 0.0f);
    const float rstd = 1.0f / sqrtf(var + q.eps);
    before_out();
#pragma unroll
    for (int j = 0; j < CHUNKS; ++j) {
        const int k = col + STRIDE * j;
        if (row_live && k < k_end) {
            const float4 y = layer_norm_out4(x[j], c, rstd, load4(q.norm_weight + k),
                                             load4(q.norm_bias + k));
            x[j] = make_float4(to_f32(from_f32(y.x)), to_f32(from_f32(y.y)),
                               to_f32(from_f32(y.z)), to_f32(from_f32(y.w)));
        } else {
            x[j] = zero;
        }
    }
}

// v2 after a layer_norm (one or two K steps per block, K % 4 == 0, 16-byte
// aligned operands); block and grid as v2's, the grid's split blocks of a
// tile one cluster. The norm's slice of a row is both steps' columns: the
// second step's x is loaded, normalised and held in registers with the
// first's, and staged from there. The first step's w is loaded beside the
// norm's weight and bias, in its last pass, where the residual no longer
// holds registers. Built for LINEAR_NORM_TILED_BLOCKS blocks per SM (3
// would cap it at 80 registers, and it spilled): the host folds a norm only
// into grids that one wave of them holds.
#define LINEAR_NORM_TILED_BLOCKS 2
#define LINEAR_NORM_TILED_STEPS 2
#if OP_ELEM == 0
extern "C" __global__ void __launch_bounds__(LINEAR_THREADS, LINEAR_NORM_TILED_BLOCKS)
OP_KERNEL_NAME(layer_norm_linear_tiled_vec4)(const LayerNormLinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p.linear, LINEAR_BN); });
    __shared__ float2 slots[2][LINEAR_BM];
    const LinearParams& lp = p.linear;
    float4 second[LINEAR_LOADS];  // the second step's normalised x
    linear_tiled<true>(
        lp,
        [&](float4 (&xa)[LINEAR_LOADS], float4 (&wa)[LINEAR_LOADS], int row, int wrow, int col,
            int k_end) {
            // Four threads per row, 4 x 8 columns each, 16 apart: the
            // second step's start 64 columns on (zeros past k_end).
            static_assert(LINEAR_BK == LINEAR_LOADS * 16, "a step is its chunks 16 apart");
            float4 x[LINEAR_NORM_TILED_STEPS * LINEAR_LOADS];
#pragma unroll
            for (int j = 0; j < LINEAR_NORM_TILED_STEPS * LINEAR_LOADS; ++j) {
                x[j] = linear_load4<true>(lp.x, row, lp.m, col + 16 * j, k_end, lp.k);
            }
            layer_norm_slice<4, LINEAR_NORM_TILED_STEPS * LINEAR_LOADS, 16>(
                p, row, col, k_end, x, slots, row - blockIdx.y * LINEAR_BM,
                [&] { linear_tiled_load<true>(wa, lp.w, wrow, lp.n, col, k_end, lp.k); });
#pragma unroll
            for (int j = 0; j < LINEAR_LOADS; ++j) {
                xa[j] = x[j];
                second[j] = x[LINEAR_LOADS + j];
            }
        },
        [&](float4 (&xa)[LINEAR_LOADS], int, int, int) {
#pragma unroll
            for (int j = 0; j < LINEAR_LOADS; ++j) {
                xa[j] = second[j];
            }
        });
}
#endif  // OP_ELEM == 0

// Tensor cores: f16/bf16 storage always; f32 storage as TF32 where the host
// found mma.h (OP_TF32) and the target has TF32 (sm_80), and in the emulator.
#if OP_ELEM != 0 || (defined(OP_TF32) && __CUDA_ARCH__ >= 800) || defined(OP_EMULATOR)
#define LINEAR_TC_ANY 1
#ifndef OP_EMULATOR
#include <mma.h>
#endif

#if OP_ELEM != 0
// 16-bit storage: elem tiles in shared memory, 16x16x16 fragments.
typedef elem linear_tc_frag;
#define LINEAR_TC_FRAG_K 16
#else
// f32 storage: f32 tiles (cp.async copies bytes: no rounding on the way),
// rounded to TF32 in the fragments, 16x16x8 fragments.
typedef nvcuda::wmma::precision::tf32 linear_tc_frag;
#define LINEAR_TC_FRAG_K 8
#endif
#define LINEAR_TC_CHUNK (16 / (int)sizeof(elem))  // elements per 16 bytes

// The two tile shapes of v3. Both pad each staged row by 16 bytes: rows of 144
// (small) or 80 (large) bytes put the 8 rows a fragment load reads at once on
// distinct banks, and keep rows 16-byte aligned with a length that is a
// multiple of 16 bytes, as WMMA wants.
// - small: 64 x 64 outputs, 2 x 2 warps of 32 x 32, 128 bytes of each row per
//   K step: the split-K grids of small M, where a block is one or a few steps.
// - large: 128 x 128 outputs, 2 x 4 warps of 64 x 32, 64 bytes of each row per
//   step: grids with a tile for every SM, where each warp's 4 + 2 fragment
//   loads per 8 MMAs (small: 2 + 2 per 4) and each block's staged bytes per
//   output (half of small's) decide the speed.
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STEP_BYTES>
struct LinearTcTile {
    static constexpr int BM = BM_;
    static constexpr int BN = BN_;
    static constexpr int WARPS_M = WARPS_M_;
    static constexpr int WARPS_N = WARPS_N_;
    static constexpr int THREADS = WARPS_M * WARPS_N * 32;
    static constexpr int FM = BM / WARPS_M / 16;  // fragments per warp along M
    static constexpr int FN = BN / WARPS_N / 16;  // and along N
    static constexpr int BK = STEP_BYTES / (int)sizeof(elem);
    static constexpr int LDK = BK + LINEAR_TC_CHUNK;
    // Large tiles are planned only where they fill the device unsplit: their
    // kernels carry no split-K code (its registers would be wasted).
    static constexpr bool SPLIT_K = BM == 64;
    static constexpr int ROW_CHUNKS = BK / LINEAR_TC_CHUNK;  // 16-byte chunks per row
    // Two stages of both operand tiles; after the last step, over them, one
    // 16 x 16 f32 scratch per warp for the epilogue.
    union Smem {
        struct {
            elem x[BM][LDK];
            elem w[BN][LDK];
        } stage[2];
        float c[WARPS_M * WARPS_N][16][20];
        // Split-K through a cluster: the tile's raw sums (small tiles only).
        float tile[SPLIT_K ? BM : 1][BN + 4];
    };
};
typedef LinearTcTile<64, 64, 2, 2, 128> LinearTcSmall;
typedef LinearTcTile<128, 128, 2, 4, 64> LinearTcLarge;
#define LINEAR_TC_SMALL_THREADS 128
// Small-tile blocks per SM the kernels are built for (shared memory allows
// 6): up to 128 registers each. Without it ptxas held them to 96 and spilled.
#define LINEAR_TC_SMALL_BLOCKS 4
#define LINEAR_TC_LARGE_THREADS 256

// Rows [row0, row0 + ROWS) x columns [k0, k0 + BK) of a [rows, K] matrix into
// `tile`, zero past `rows` and past `k_end`: thread t takes the 16-byte chunks
// t + THREADS j. `VEC` (K a multiple of CHUNK, 16-byte aligned operand):
// cp.async, in flight until the caller waits for it; else synchronous element
// copies.
template <class T, int ROWS, bool VEC>
__device__ __forceinline__ void linear_tc_stage(elem (*tile)[T::LDK], const elem* a, int row0,
                                                int rows, int k0, int k_end, int k) {
    constexpr int PER_THREAD = ROWS * T::ROW_CHUNKS / T::THREADS;
    static_assert(PER_THREAD * T::THREADS == ROWS * T::ROW_CHUNKS, "chunks split evenly");
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
        const int chunk = threadIdx.x + T::THREADS * j;
        const int r = chunk / T::ROW_CHUNKS;
        const int c = (chunk % T::ROW_CHUNKS) * LINEAR_TC_CHUNK;
        const int row = row0 + r;
        const int col = k0 + c;
        if (VEC) {
            // k_end is K or a multiple of 16 elements: the chunk is all in
            // range or all out.
            const bool valid = row < rows && col < k_end;
            cp_async16(&tile[r][c], valid ? a + row * k + col : a, valid);
        } else {
            // One element at a time, not unrolled: a chunk's loads in flight
            // at once would hold more registers than the fragments leave.
#pragma unroll 1
            for (int e = 0; e < LINEAR_TC_CHUNK; ++e) {
                tile[r][c + e] =
                    (row < rows && col + e < k_end) ? a[row * k + col + e] : from_f32(0.0f);
            }
        }
    }
}

// TF32: a fragment's elements rounded (cvt.rna) as WMMA wants them; a no-op
// for 16-bit storage.
template <class Frag>
__device__ __forceinline__ void linear_tc_round(Frag& f) {
#if OP_ELEM == 0
#pragma unroll
    for (int t = 0; t < f.num_elements; ++t) {
        f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
    }
#endif
}

// The first K step's x tile staged as every step's is (linear_tc_stage).
template <class T, bool VEC>
struct LinearTcCopyX {
    const LinearParams& p;
    __device__ __forceinline__ void operator()(elem (*tile)[T::LDK], int m0, int k_begin,
                                               int k_end) const {
        linear_tc_stage<T, T::BM, VEC>(tile, p.x, m0, p.m, k_begin, k_end, p.k);
    }
};

// v3: block T::THREADS threads; grid (ceil(N / BN), ceil(M / BM), splits). Two
// stages: the next K step's copies are in flight while the current one is
// multiplied. `first_x(tile, m0, k_begin, k_end)` stages the first step's x
// tile (after the w tile's copies are issued).
template <class T, bool VEC, class FirstX>
__device__ __forceinline__ void linear_tc(const LinearParams& p, FirstX first_x) {
    using namespace nvcuda;
    __shared__ __align__(128) typename T::Smem sm;
    constexpr int FK = LINEAR_TC_FRAG_K;
    constexpr int FM = T::FM;
    constexpr int FN = T::FN;

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int wm = (warp / T::WARPS_N) * (16 * FM);  // this warp's rows of the tile
    const int wn = (warp % T::WARPS_N) * (16 * FN);  // and columns
    const int m0 = blockIdx.y * T::BM;
    const int n0 = blockIdx.x * T::BN;
    const int k_begin = blockIdx.z * p.k_per_split;
    const int k_end = min(p.k, k_begin + p.k_per_split);
    const bool rows_live = m0 + wm < p.m;

    wmma::fragment<wmma::accumulator, 16, 16, FK, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
        for (int j = 0; j < FN; ++j) {
            wmma::fill_fragment(acc[i][j], 0.0f);
        }
    }

    if (k_begin < k_end) {
        linear_tc_stage<T, T::BN, VEC>(sm.stage[0].w, p.w, n0, p.n, k_begin, k_end, p.k);
        first_x(sm.stage[0].x, m0, k_begin, k_end);
    }
    cp_async_commit();
    int buf = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += T::BK, buf ^= 1) {
        const int next = k0 + T::BK;
        if (next < k_end) {
            linear_tc_stage<T, T::BM, VEC>(sm.stage[buf ^ 1].x, p.x, m0, p.m, next, k_end, p.k);
            linear_tc_stage<T, T::BN, VEC>(sm.stage[buf ^ 1].w, p.w, n0, p.n, next, k_end, p.k);
        }
        cp_async_commit();
        cp_async_wait<1>();  // this step's group is complete, the next may fly
        __syncthreads();
        // A warp whose rows are all past M only stages.
        if (rows_live) {
#pragma unroll
            for (int kk = 0; kk < T::BK; kk += FK) {
                // x tile rows are A's rows (row-major); w tile rows are B's
                // columns (B = W^T, col-major with the same leading dimension).
                wmma::fragment<wmma::matrix_a, 16, 16, FK, linear_tc_frag, wmma::row_major> a[FM];
                wmma::fragment<wmma::matrix_b, 16, 16, FK, linear_tc_frag, wmma::col_major> b[FN];
#pragma unroll
                for (int i = 0; i < FM; ++i) {
                    wmma::load_matrix_sync(a[i], &sm.stage[buf].x[wm + 16 * i][kk], T::LDK);
                    linear_tc_round(a[i]);
                }
#pragma unroll
                for (int j = 0; j < FN; ++j) {
                    wmma::load_matrix_sync(b[j], &sm.stage[buf].w[wn + 16 * j][kk], T::LDK);
                    linear_tc_round(b[j]);
                }
#pragma unroll
                for (int i = 0; i < FM; ++i) {
#pragma unroll
                    for (int j = 0; j < FN; ++j) {
                        wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with `buf` before it is restaged
    }
    cp_async_wait<0>();
    __syncthreads();  // the stages are free for the epilogue's scratch

    if constexpr (T::SPLIT_K) {
        if (cluster_blocks() > 1) {
#pragma unroll
            for (int i = 0; i < FM; ++i) {
#pragma unroll
                for (int j = 0; j < FN; ++j) {
                    wmma::store_matrix_sync(&sm.tile[wm + 16 * i][wn + 16 * j], acc[i][j],
                                            T::BN + 4, wmma::mem_row_major);
                }
            }
            linear_cluster_finish<T::BM, T::BN, T::THREADS>(p, m0, n0, sm.tile);
            return;
        }
    }

    // Each accumulator through the warp's scratch (the accumulators' register
    // layout is not assumed) to the epilogue (bias, activation, residual,
    // rounding to elem) or the split-K partial sums: lane l takes row l / 2,
    // columns (l % 2) * 8 .. + 8 of the fragment.
    // Large tiles never split (their plans say so): no split-K code in them.
    float* partial = T::SPLIT_K ? p.partial : nullptr;
    const bool vec_out = linear_vec_out(p);
    float (*scratch)[20] = sm.c[warp];
    const int r = lane >> 1;
    const int c0 = (lane & 1) * 8;
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
        for (int j = 0; j < FN; ++j) {
            wmma::store_matrix_sync(&scratch[0][0], acc[i][j], 20, wmma::mem_row_major);
            __syncwarp();
            const int m = m0 + wm + 16 * i + r;
            const int n = n0 + wn + 16 * j + c0;
            if (m < p.m) {
#pragma unroll
                for (int h = 0; h < 8; h += 4) {
                    if (n + h < p.n) {
                        linear_store4(p, partial, vec_out, blockIdx.z, m, n + h,
                                      &scratch[r][c0 + h]);
                    }
                }
            }
            __syncwarp();  // every lane has read the scratch before it is reused
        }
    }
    if constexpr (T::SPLIT_K) {
        if (partial != nullptr) {
            linear_splitk_finish<T::BM, T::BN, T::THREADS>(p, m0, n0);
        }
    }
}

template <class T, bool VEC>
__device__ __forceinline__ void linear_tc(const LinearParams& p) {
    linear_tc<T, VEC>(p, LinearTcCopyX<T, VEC>{p});
}

static_assert(LinearTcSmall::THREADS == LINEAR_TC_SMALL_THREADS, "small tile block size");
static_assert(LinearTcLarge::THREADS == LINEAR_TC_LARGE_THREADS, "large tile block size");

#if OP_ELEM != 0
extern "C" __global__ void __launch_bounds__(LINEAR_TC_SMALL_THREADS, LINEAR_TC_SMALL_BLOCKS)
OP_KERNEL_NAME(linear_tc_vec8)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LinearTcSmall::BN); });
    linear_tc<LinearTcSmall, true>(p);
}

extern "C" __global__ void __launch_bounds__(LINEAR_TC_SMALL_THREADS, LINEAR_TC_SMALL_BLOCKS)
OP_KERNEL_NAME(linear_tc_scalar)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LinearTcSmall::BN); });
    linear_tc<LinearTcSmall, false>(p);
}

extern "C" __global__ void __launch_bounds__(LINEAR_TC_LARGE_THREADS)
OP_KERNEL_NAME(linear_tc_large_vec8)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LinearTcLarge::BN); });
    linear_tc<LinearTcLarge, true>(p);
}

// v3 after a layer_norm (one K step per block, K % 8 == 0, 16-byte aligned
// operands): the first step's x tile is the norm's output, staged through
// registers (two threads per row, 32 columns each) instead of copied. Block
// and grid as v3's small tiles, the grid's split blocks of a tile one cluster.
extern "C" __global__ void __launch_bounds__(LINEAR_TC_SMALL_THREADS, LINEAR_TC_SMALL_BLOCKS)
OP_KERNEL_NAME(layer_norm_linear_tc_vec8)(const LayerNormLinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p.linear, LinearTcSmall::BN); });
    typedef LinearTcSmall T;
    static_assert(T::THREADS == 2 * T::BM && T::BK == 64, "two threads per row of a step");
    __shared__ float2 slots[2][T::BM];
    const LinearParams& lp = p.linear;
    linear_tc<T, true>(lp, [&](elem (*tile)[T::LDK], int m0, int k_begin, int k_end) {
        const int r = threadIdx.x >> 1;
        const int c = (threadIdx.x & 1) * 32;
        float4 x[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            x[j] = linear_load4<true>(lp.x, m0 + r, lp.m, k_begin + c + 4 * j, k_end, lp.k);
        }
        layer_norm_slice<2, 8, 4>(p, m0 + r, k_begin + c, k_end, x, slots, r, [] {});
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            store4(&tile[r][c + 4 * j], x[j]);
        }
    });
}
#else
extern "C" __global__ void __launch_bounds__(LINEAR_TC_SMALL_THREADS, LINEAR_TC_SMALL_BLOCKS)
OP_KERNEL_NAME(linear_tc_tf32_vec4)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LinearTcSmall::BN); });
    linear_tc<LinearTcSmall, true>(p);
}

extern "C" __global__ void __launch_bounds__(LINEAR_TC_SMALL_THREADS, LINEAR_TC_SMALL_BLOCKS)
OP_KERNEL_NAME(linear_tc_tf32_scalar)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LinearTcSmall::BN); });
    linear_tc<LinearTcSmall, false>(p);
}

extern "C" __global__ void __launch_bounds__(LINEAR_TC_LARGE_THREADS)
OP_KERNEL_NAME(linear_tc_tf32_large_vec4)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LinearTcLarge::BN); });
    linear_tc<LinearTcLarge, true>(p);
}
#endif
#if OP_ELEM != 0
// v5: 128x128 output tiles per block of 4 warps, each warp 64x64 as 4 x 8
// mma.sync m16n8k16 per 16 K columns, its fragments loaded with ldmatrix.x4
// (common.cuh): 8 fragment loads per 32 MMAs, against v3's large tiles' 6
// WMMA loads per 16 (the loads, not the MMAs, were what a block of v3 had
// most of). K in steps of 32 (64 bytes of each row) through three cp.async
// stages, 48 KiB in all: two steps are in flight while one is multiplied,
// and one barrier per step. No padding: chunk c (16 bytes) of a staged row r
// is stored at r * 4 + (c ^ ((r / 2) % 4)), so the 8 rows one ldmatrix phase
// reads at the same chunk fall on 8 distinct 16-byte bank groups.
// The narrow twin (BN = 64: warps of 64x32, 6 fragment loads per 16 MMAs,
// 36 KiB, 4 blocks per SM) is for grids where 128x128 tiles would leave some
// SMs two tiles and most one (N = 512 at batch 64: 156 tiles on 132 SMs).
#define LINEAR_MMA_BM 128
#define LINEAR_MMA_BN 128
#define LINEAR_MMA_NARROW_BN 64
#define LINEAR_MMA_BK 32
#define LINEAR_MMA_STAGES 3
#define LINEAR_MMA_THREADS 128
#define LINEAR_MMA_NARROW_BLOCKS 4
// Epilogue scratch: a warp's 16 x 64 sums per pass, rows of 72 floats (the
// 8-byte stores of a half warp, rows g and columns 2t, on distinct banks).
#define LINEAR_MMA_LDC 72

template <int BN>
struct LinearMmaSmem {
    union {
        struct {
            uint4 x[LINEAR_MMA_BM * 4];
            uint4 w[BN * 4];
        } stage[LINEAR_MMA_STAGES];
        float c[LINEAR_MMA_THREADS / 32][16][LINEAR_MMA_LDC];
        // linear_layer_norm: the tile's outputs, rounded to elem; rows of
        // BN + 8 (16-byte reads of 8 rows at the same column, and 2-byte
        // writes of fragment rows g and columns 2t, on distinct banks).
        elem y[LINEAR_MMA_BM][BN + 8];
    };
};
static_assert(sizeof(LinearMmaSmem<LINEAR_MMA_BN>) <= 48 * 1024, "static shared memory");

// Byte offset of chunk c of staged row r. The XOR term repeats every 8 rows,
// so rows 16 (or 32) apart differ by a fixed offset, which the loops below
// fold into their loads' immediates.
__device__ __forceinline__ int linear_mma_offset(int r, int c) {
    return (r * 4 + (c ^ ((r >> 1) & 3))) * 16;
}

// One operand's copies into the stages, set up once: a thread copies chunk
// `c` (16 bytes) of tile rows r, r + 32, .. (r = thread / 4; ROWS / 32 of
// them) at every K step, to the same offsets of each stage; a step costs its
// cp.async and the address arithmetic of one column check.
template <int ROWS>
struct LinearMmaCopy {
    static constexpr int PER = ROWS / 32;
    const elem* src;    // row r's chunk at K step 0 (a row past the operand: its last row)
    int stride;         // 32 rows, in elements
    int col;            // the chunk's first column at K step 0
    int dst;            // byte offset of row r's chunk in a tile
    unsigned rows_ok;   // bit j: row r + 32 j is in the operand

    __device__ __forceinline__ LinearMmaCopy(const elem* a, int row0, int rows, int k) {
        const int r = threadIdx.x >> 2;
        const int c = threadIdx.x & 3;
        const int row = row0 + r;
        src = a + min(row, rows - 1) * k + c * 8;
        stride = 32 * k;
        col = c * 8;
        dst = linear_mma_offset(r, c);
        rows_ok = 0;
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            rows_ok |= (row + 32 * j < rows ? 1u : 0u) << j;
        }
    }

    // K step [k0, k0 + 32) into `tile`, zero past the operand's rows and past
    // k (a multiple of 8: a chunk is all in range or all out). Rows past
    // `rows` point at its last row, whose address is valid (cp.async reads
    // nothing where `valid` is false).
    __device__ __forceinline__ void operator()(uint4* tile, int k0, int k) const {
        const bool col_ok = col + k0 < k;
        char* base = reinterpret_cast<char*>(tile) + dst;
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int jj = (rows_ok >> j) & 1 ? j : 0;  // clamped rows stay in range
            cp_async16(base + 2048 * j, src + jj * stride + k0, col_ok && ((rows_ok >> j) & 1));
        }
    }
};

// Where this thread's warp is in its block's tile, and the tile in the
// output: a warp's 64 x WN sums are J n8 fragments wide.
template <int BN>
struct LinearMmaWarp {
    static constexpr int WN = BN / 2;
    static constexpr int J = WN / 8;
    int warp = threadIdx.x >> 5;
    int lane = threadIdx.x & 31;
    int wm = (warp >> 1) * 64;
    int wn = (warp & 1) * WN;
    int m0 = blockIdx.y * LINEAR_MMA_BM;
    int n0 = blockIdx.x * BN;
};

// The K loop of the tile at (blockIdx.y * 128, blockIdx.x * BN): this
// warp's 64 x BN / 2 sums into `acc` (fragment layout: acc[i][j] is the m16n8
// fragment at rows 16 i, columns 8 j of the warp's). Block
// LINEAR_MMA_THREADS; grid (ceil(N / BN), ceil(M / 128)). Needs K % 8 == 0
// and 16-byte aligned x and w; no split-K (planned where the tiles alone
// fill the device). Every thread returns, after a barrier that frees the
// stages for the epilogue.
template <int BN>
__device__ __forceinline__ void linear_mma_products(const LinearParams& p, LinearMmaSmem<BN>& sm,
                                                    float (&acc)[4][BN / 16][4]) {
    static_assert(LINEAR_MMA_THREADS == 128 && LINEAR_MMA_BM == 128 && LINEAR_MMA_BK == 32,
                  "LinearMmaCopy: chunks 32 rows apart per thread, 4 chunks per row");
    typedef LinearMmaWarp<BN> W;
    constexpr int J = W::J;
    static_assert(J % 2 == 0, "ldmatrix.x4 loads two n8 fragments");
    const W at;
    const int lane = at.lane;
    const int wm = at.wm;
    const int wn = at.wn;
    const int m0 = at.m0;
    const int n0 = at.n0;
    const bool rows_live = m0 + wm < p.m;
    const int steps = (p.k + LINEAR_MMA_BK - 1) / LINEAR_MMA_BK;
    const LinearMmaCopy<LINEAR_MMA_BM> copy_x(p.x, m0, p.m, p.k);
    const LinearMmaCopy<BN> copy_w(p.w, n0, p.n, p.k);

#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < J; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[i][j][e] = 0.0f;
            }
        }
    }

#pragma unroll
    for (int s = 0; s < LINEAR_MMA_STAGES - 1; ++s) {
        if (s < steps) {
            copy_x(sm.stage[s].x, s * LINEAR_MMA_BK, p.k);
            copy_w(sm.stage[s].w, s * LINEAR_MMA_BK, p.k);
        }
        cp_async_commit();
    }
    // The lane's ldmatrix rows, for the two 16-column halves of a step: A's
    // rows 0-15 at chunk 0 (1), then at chunk 1 (3); W's rows 0-7 at chunks 0
    // and 1 (2 and 3), then rows 8-15 (two n8 fragments). Fragment i (j) is
    // 16 i (16 j) rows further: 1024 bytes each.
    const int a_row = wm + (lane & 15);
    const int b_row = wn + (lane & 7) + ((lane >> 4) << 3);
    const int a_off[2] = {linear_mma_offset(a_row, lane >> 4),
                          linear_mma_offset(a_row, 2 + (lane >> 4))};
    const int b_off[2] = {linear_mma_offset(b_row, (lane >> 3) & 1),
                          linear_mma_offset(b_row, 2 + ((lane >> 3) & 1))};
    int read = 0;
    int write = LINEAR_MMA_STAGES - 1;
    for (int step = 0; step < steps; ++step) {
        cp_async_wait<LINEAR_MMA_STAGES - 2>();  // this step's group is complete
        // Every thread's copies are visible, and every warp is done with the
        // stage the next copies overwrite (multiplied last step).
        __syncthreads();
        const int next = step + LINEAR_MMA_STAGES - 1;
        if (next < steps) {
            copy_x(sm.stage[write].x, next * LINEAR_MMA_BK, p.k);
            copy_w(sm.stage[write].w, next * LINEAR_MMA_BK, p.k);
        }
        cp_async_commit();
        // A warp whose rows are all past M only stages.
        if (rows_live) {
            const char* xs = reinterpret_cast<const char*>(sm.stage[read].x);
            const char* ws = reinterpret_cast<const char*>(sm.stage[read].w);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                unsigned a[4][4];
                unsigned b[J][2];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    ldmatrix_x4(a[i], xs + a_off[h] + 1024 * i);
                }
#pragma unroll
                for (int j = 0; j < J / 2; ++j) {
                    unsigned q[4];
                    ldmatrix_x4(q, ws + b_off[h] + 1024 * j);
                    b[2 * j][0] = q[0];
                    b[2 * j][1] = q[1];
                    b[2 * j + 1][0] = q[2];
                    b[2 * j + 1][1] = q[3];
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) {
#pragma unroll
                    for (int j = 0; j < J; ++j) {
                        mma_16816(acc[i][j], a[i], b[j]);
                    }
                }
            }
        }
        read = read == LINEAR_MMA_STAGES - 1 ? 0 : read + 1;
        write = write == LINEAR_MMA_STAGES - 1 ? 0 : write + 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // the stages are free for the epilogue's scratch
}

// 16 rows of a warp's sums, WN columns (WN / 8 fragments in the m16n8 C
// layout: frag[4 j + e]), through the warp's scratch to the epilogue (bias,
// activation, residual, rounding to elem), so that a lane stores 4
// consecutive columns of one row (a warp: 32 / (WN / 4) rows of WN per
// pass). `m` and `n` are the output row and column of the 16 x WN piece.
template <int WN>
__device__ __forceinline__ void linear_mma_store16(const LinearParams& p,
                                                   float (*scratch)[LINEAR_MMA_LDC],
                                                   const float* frag, int m, int n, bool vec_out) {
    static_assert(WN <= 64 && LINEAR_MMA_LDC >= WN + 8, "a piece fits the scratch's rows");
    constexpr int LANES_PER_ROW = WN / 4;
    constexpr int ROWS_PER_PASS = 32 / LANES_PER_ROW;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
#pragma unroll
    for (int j = 0; j < WN / 8; ++j) {
        *reinterpret_cast<float2*>(&scratch[g][8 * j + 2 * t]) =
            make_float2(frag[4 * j], frag[4 * j + 1]);
        *reinterpret_cast<float2*>(&scratch[g + 8][8 * j + 2 * t]) =
            make_float2(frag[4 * j + 2], frag[4 * j + 3]);
    }
    __syncwarp();
    // Not unrolled: one copy of the epilogue's code per pass is enough
    // (unrolled, v5 was 46 K instructions).
#pragma unroll 1
    for (int q = 0; q < 16 / ROWS_PER_PASS; ++q) {
        const int r = lane / LANES_PER_ROW + ROWS_PER_PASS * q;
        const int c = (lane % LANES_PER_ROW) * 4;
        if (m + r < p.m && n + c < p.n) {
            linear_store4(p, nullptr, vec_out, 0, m + r, n + c, &scratch[r][c]);
        }
    }
    __syncwarp();  // every lane has read the scratch before it is reused
}

// v5's GEMM: the products, then 16 rows at a time through the warp's
// scratch (linear_mma_store16).
template <int BN>
__device__ __forceinline__ void linear_mma(const LinearParams& p) {
    __shared__ __align__(128) LinearMmaSmem<BN> sm;
    typedef LinearMmaWarp<BN> W;
    float acc[4][W::J][4];
    linear_mma_products<BN>(p, sm, acc);
    const W at;
    if (at.m0 + at.wm >= p.m) {
        return;
    }
    const bool vec_out = linear_vec_out(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        linear_mma_store16<W::WN>(p, sm.c[at.warp], &acc[i][0][0], at.m0 + at.wm + 16 * i,
                                  at.n0 + at.wn, vec_out);
    }
}

extern "C" __global__ void __launch_bounds__(LINEAR_MMA_THREADS, 2)
OP_KERNEL_NAME(linear_mma_vec8)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LINEAR_MMA_BN); });
    linear_mma<LINEAR_MMA_BN>(p);
}

extern "C" __global__ void __launch_bounds__(LINEAR_MMA_THREADS, LINEAR_MMA_NARROW_BLOCKS)
OP_KERNEL_NAME(linear_mma_narrow_vec8)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LINEAR_MMA_NARROW_BN); });
    linear_mma<LINEAR_MMA_NARROW_BN>(p);
}

#ifdef OP_WGMMA
// v6 (sm_90a): v5's tiles, stages and copies, multiplied by warpgroup MMA.
// v5's stage layout is the one wgmma reads from shared memory (the 64-byte
// swizzle, wgmma_desc_sw64), so the block's 4 warps, one warpgroup, issue
// per 16 K columns two wgmma_m64k16<BN> (the tile's rows 0-63 and 64-127)
// on the stage in place: no fragment loads (v5: 16 ldmatrix per 64 MMAs of
// a warp), and the next step's copies are issued while the MMAs run. A
// step: its copies waited for and fenced to the MMAs' proxy, a barrier, the
// MMAs; then the step before's MMAs waited for (one group stays in flight,
// so the tensor cores go from one step's MMAs to the next's without waiting
// for the warpgroup between them), a barrier (they read the stage the
// copies overwrite), the copies two steps on.
// SERIAL: the loop v6 had first, kept as the baseline this one is measured
// against (`linear_wgmma_serial_*`): the step before's MMAs waited for
// before the barrier, none in flight, so the tensor cores drain between
// steps; the copies are issued right after the MMAs, one barrier a step.
// acc[i][4 j + e]: rows 64 i + 16 warp + g + 8 (e / 2), columns
// 8 j + 2 t + e % 2 of the tile (g = lane / 4, t = lane % 4). Every thread
// returns after a barrier that frees the stages for the epilogue's scratch.
template <int BN, bool SERIAL = false>
__device__ __forceinline__ void linear_wgmma_products(const LinearParams& p,
                                                      LinearMmaSmem<BN>& sm,
                                                      float (&acc)[2][BN / 2]) {
    static_assert(LINEAR_MMA_THREADS == 128, "one warpgroup");
    const int m0 = blockIdx.y * LINEAR_MMA_BM;
    const int n0 = blockIdx.x * BN;
    const int steps = (p.k + LINEAR_MMA_BK - 1) / LINEAR_MMA_BK;
    const LinearMmaCopy<LINEAR_MMA_BM> copy_x(p.x, m0, p.m, p.k);
    const LinearMmaCopy<BN> copy_w(p.w, n0, p.n, p.k);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int r = 0; r < BN / 2; ++r) {
            acc[i][r] = 0.0f;
        }
    }
#pragma unroll
    for (int s = 0; s < LINEAR_MMA_STAGES - 1; ++s) {
        if (s < steps) {
            copy_x(sm.stage[s].x, s * LINEAR_MMA_BK, p.k);
            copy_w(sm.stage[s].w, s * LINEAR_MMA_BK, p.k);
        }
        cp_async_commit();
    }
    int read = 0;
    int write = LINEAR_MMA_STAGES - 1;
    for (int step = 0; step < steps; ++step) {
        cp_async_wait<LINEAR_MMA_STAGES - 2>();
        fence_proxy_async_shared();
        if constexpr (SERIAL) {
            wgmma_wait<0>();  // the stage the copies below overwrite is read
        }
        __syncthreads();  // every thread's copies of this step's stage landed
        wgmma_fence();
        const char* xs = reinterpret_cast<const char*>(sm.stage[read].x);
        const char* ws = reinterpret_cast<const char*>(sm.stage[read].w);
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // K columns 16 h .. 16 h + 15 of the step: 32 bytes
            // Both halves even where rows 64-127 are all past M (zeros
            // staged): a branch between them would split the MMAs' group.
            const unsigned long long b = wgmma_desc_sw64(ws + 32 * h);
            wgmma_m64k16<BN>(acc[0], wgmma_desc_sw64(xs + 32 * h), b);
            wgmma_m64k16<BN>(acc[1], wgmma_desc_sw64(xs + 64 * 64 + 32 * h), b);
        }
        wgmma_commit();
        if constexpr (!SERIAL) {
            // The step before's MMAs done, this step's left running (MMAs on
            // the same accumulators run in order): once every warp has
            // waited, the stage they read takes the copies two steps on.
            wgmma_wait<1>();
            __syncthreads();
        }
        const int next = step + LINEAR_MMA_STAGES - 1;
        if (next < steps) {
            copy_x(sm.stage[write].x, next * LINEAR_MMA_BK, p.k);
            copy_w(sm.stage[write].w, next * LINEAR_MMA_BK, p.k);
        }
        cp_async_commit();
        read = read == LINEAR_MMA_STAGES - 1 ? 0 : read + 1;
        write = write == LINEAR_MMA_STAGES - 1 ? 0 : write + 1;
    }
    wgmma_wait<0>();
    wgmma_hold(acc[0]);
    wgmma_hold(acc[1]);
    cp_async_wait<0>();
    __syncthreads();  // the stages are free for the epilogue's scratch
}

// v6's GEMM: the products, then each warp's 16-row pieces of 64 columns
// through its scratch (linear_mma_store16), as v5 stores its own.
template <int BN, bool SERIAL = false>
__device__ __forceinline__ void linear_wgmma(const LinearParams& p) {
    __shared__ __align__(1024) LinearMmaSmem<BN> sm;
    float acc[2][BN / 2];
    linear_wgmma_products<BN, SERIAL>(p, sm, acc);
    const int warp = threadIdx.x >> 5;
    const bool vec_out = linear_vec_out(p);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int m = blockIdx.y * LINEAR_MMA_BM + 64 * i + 16 * warp;
        if (m < p.m) {
#pragma unroll
            for (int h = 0; h < BN / 64; ++h) {
                linear_mma_store16<64>(p, sm.c[warp], &acc[i][32 * h], m,
                                       blockIdx.x * BN + 64 * h, vec_out);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(LINEAR_MMA_THREADS, 2)
OP_KERNEL_NAME(linear_wgmma_vec8)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LINEAR_MMA_BN); });
    linear_wgmma<LINEAR_MMA_BN>(p);
}

extern "C" __global__ void __launch_bounds__(LINEAR_MMA_THREADS, LINEAR_MMA_NARROW_BLOCKS)
OP_KERNEL_NAME(linear_wgmma_narrow_vec8)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LINEAR_MMA_NARROW_BN); });
    linear_wgmma<LINEAR_MMA_NARROW_BN>(p);
}

extern "C" __global__ void __launch_bounds__(LINEAR_MMA_THREADS, 2)
OP_KERNEL_NAME(linear_wgmma_serial_vec8)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LINEAR_MMA_BN); });
    linear_wgmma<LINEAR_MMA_BN, true>(p);
}

extern "C" __global__ void __launch_bounds__(LINEAR_MMA_THREADS, LINEAR_MMA_NARROW_BLOCKS)
OP_KERNEL_NAME(linear_wgmma_serial_narrow_vec8)(const LinearParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p, LINEAR_MMA_NARROW_BN); });
    linear_wgmma<LINEAR_MMA_NARROW_BN, true>(p);
}
#endif  // OP_WGMMA

// linear_layer_norm: out = layer_norm(act(x wᵀ + b) + residual), with
// sum_out = act(x wᵀ + b) + residual, on v5's narrow tiles. The linear's
// output y is never stored: its tile, rounded to elem as `linear` would
// store it, stays in shared memory, and the blocks along N (ceil(N / 64) <=
// LINEAR_MAX_CLUSTER) are one cluster that holds whole rows, so the row
// statistics are summed over it, in layer_norm's three passes and formulas
// (layer_norm.cu; y is the norm's x). For the passes a row's 64 columns are
// LINEAR_LN_TPR threads' 8 each (a warp: 4 rows of 128 bytes), a thread's
// rows 16 apart; a row's block sums go through the cluster one thread per
// row (cluster_slot_sum), back to its threads through `totals`.
#define LINEAR_LN_TPR 8
#define LINEAR_LN_ROWS (LINEAR_MMA_BM * LINEAR_LN_TPR / LINEAR_MMA_THREADS)  // per thread

// Eight elements from 16 bytes (16-byte aligned) as two float4, and back.
__device__ __forceinline__ void load8(const elem* p, float4& lo, float4& hi) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    lo = unpack4(make_uint2(raw.x, raw.y));
    hi = unpack4(make_uint2(raw.z, raw.w));
}

__device__ __forceinline__ void store8(elem* p, float4 lo, float4 hi) {
    const uint2 a = pack4(lo);
    const uint2 b = pack4(hi);
    *reinterpret_cast<uint4*>(p) = make_uint4(a.x, a.y, b.x, b.y);
}

// The cluster's totals of this block's per-row sums `v` (one per row of the
// thread, LINEAR_LN_TPR threads per row): the row's threads' butterfly, one
// slot per row, and each row's slots added over the cluster in rank order by
// one thread; every thread of every block must call it. `slots` is written
// once (another sum needs other slots); `totals` is reused.
__device__ __forceinline__ void linear_ln_totals(float2 (&v)[LINEAR_LN_ROWS], float2* slots,
                                                 float2* totals, int r0) {
#pragma unroll
    for (int j = 0; j < LINEAR_LN_ROWS; ++j) {
        v[j] = lanes_sum2<LINEAR_LN_TPR>(v[j]);
        if ((threadIdx.x & (LINEAR_LN_TPR - 1)) == 0) {
            slots[r0 + 16 * j] = v[j];
        }
    }
    cluster_sync();
    totals[threadIdx.x] = cluster_slot_sum<LINEAR_MAX_CLUSTER>(&slots[threadIdx.x]);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < LINEAR_LN_ROWS; ++j) {
        v[j] = totals[r0 + 16 * j];
    }
}

// y = act(sums + bias) of one m16n8 fragment `a` (the C layout), rounded to
// elem, into the tile, two columns at a time: rows r and r + 8, columns cj
// and cj + 1 (zero bias past N: those columns are never read).
template <int BN>
__device__ __forceinline__ void linear_ln_tile2(const LinearParams& lp, LinearMmaSmem<BN>& sm,
                                                const float (&a)[4], int r, int cj, int n0) {
    const int nj = n0 + cj;
    const float b0 = lp.bias != nullptr && nj < lp.n ? to_f32(lp.bias[nj]) : 0.0f;
    const float b1 = lp.bias != nullptr && nj + 1 < lp.n ? to_f32(lp.bias[nj + 1]) : 0.0f;
    *reinterpret_cast<unsigned*>(&sm.y[r][cj]) =
        pack2(linear_apply(lp, a[0], b0, 0.0f), linear_apply(lp, a[1], b1, 0.0f));
    *reinterpret_cast<unsigned*>(&sm.y[r + 8][cj]) =
        pack2(linear_apply(lp, a[2], b0, 0.0f), linear_apply(lp, a[3], b1, 0.0f));
}

// block LINEAR_MMA_THREADS; grid (ceil(N / 64), ceil(M / 128)) in clusters
// of (gridDim.x, 1, 1). Needs K % 8 == 0, N % 8 == 0 and 16-byte aligned
// operands. WGMMA: the products on v6 (sm_90a), else on v5.
template <bool WGMMA>
__device__ __forceinline__ void linear_layer_norm_mma(const LinearLayerNormParams& p) {
    constexpr int BN = LINEAR_MMA_NARROW_BN;
    static_assert(LINEAR_MMA_THREADS == LINEAR_MMA_BM, "a thread per row for the cluster sums");
    static_assert(BN == 8 * LINEAR_LN_TPR && LINEAR_MMA_THREADS / LINEAR_LN_TPR == 16,
                  "8 columns per thread, a block's threads 16 rows at a time");
    const LinearParams& lp = p.linear;
    __shared__ __align__(1024) LinearMmaSmem<BN> sm;
    __shared__ float2 slots[2][LINEAR_MMA_BM];
    __shared__ float2 totals[LINEAR_MMA_BM];
    const int m0 = blockIdx.y * LINEAR_MMA_BM;
    const int n0 = blockIdx.x * BN;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    // y into the tile first (the products' registers are free after it).
    if constexpr (WGMMA) {
#ifdef OP_WGMMA
        float acc[2][BN / 2];
        linear_wgmma_products<BN>(lp, sm, acc);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const float(&a)[4] = *reinterpret_cast<const float(*)[4]>(&acc[i][4 * j]);
                linear_ln_tile2(lp, sm, a, 64 * i + 16 * (threadIdx.x >> 5) + g, 8 * j + 2 * t,
                                n0);
            }
        }
#endif
    } else {
        typedef LinearMmaWarp<BN> W;
        float acc[4][W::J][4];
        linear_mma_products<BN>(lp, sm, acc);
        const W at;
#pragma unroll
        for (int j = 0; j < W::J; ++j) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                linear_ln_tile2(lp, sm, acc[i][j], at.wm + 16 * i + g, at.wn + 8 * j + 2 * t, n0);
            }
        }
    }

    // This thread's 8 columns of rows r0, r0 + 16, .. in the norm's passes;
    // columns past N (a whole chunk: N % 8 == 0) and rows past M take no
    // part. Their residual is loaded first, to arrive while the barrier
    // waits for the tile.
    const int r0 = threadIdx.x / LINEAR_LN_TPR;
    const int c = (threadIdx.x % LINEAR_LN_TPR) * 8;
    const int n = n0 + c;
    const bool col_live = n < lp.n;
    const bool residual = p.norm_residual != nullptr;
    uint4 res[LINEAR_LN_ROWS];  // the residual, as stored
#pragma unroll
    for (int j = 0; j < LINEAR_LN_ROWS; ++j) {
        const int m = m0 + r0 + 16 * j;
        res[j] = residual && col_live && m < lp.m
                     ? *reinterpret_cast<const uint4*>(p.norm_residual + m * lp.n + n)
                     : make_uint4(0u, 0u, 0u, 0u);
    }
    __syncthreads();

    const float inv_n = 1.0f / (float)lp.n;
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    // The row's y and residual, as float4 pairs.
    const auto row_of = [&](int j, float4 (&y)[2], float4 (&b)[2]) {
        load8(&sm.y[r0 + 16 * j][c], y[0], y[1]);
        b[0] = unpack4(make_uint2(res[j].x, res[j].y));
        b[1] = unpack4(make_uint2(res[j].z, res[j].w));
    };

    // Pass 1: the means of y and the residual. Every global store waits for
    // the last pass: a cluster barrier's release would wait for them.
    float2 mean[LINEAR_LN_ROWS];
#pragma unroll
    for (int j = 0; j < LINEAR_LN_ROWS; ++j) {
        float4 y[2], b[2];
        row_of(j, y, b);
        float sx = 0.0f, sr = 0.0f;
        layer_norm_sum4(y[0], b[0], residual, sx, sr);
        layer_norm_sum4(y[1], b[1], residual, sx, sr);
        mean[j] = col_live ? make_float2(sx, sr) : make_float2(0.0f, 0.0f);
    }
    linear_ln_totals(mean, slots[0], totals, r0);

    // Pass 2: the deviations' sum and sum of squares.
    float2 moments[LINEAR_LN_ROWS];
#pragma unroll
    for (int j = 0; j < LINEAR_LN_ROWS; ++j) {
        float4 y[2], b[2];
        row_of(j, y, b);
        const float mx = mean[j].x * inv_n;
        const float mr = residual ? mean[j].y * inv_n : 0.0f;
        float sd = 0.0f, sdd = 0.0f;
        layer_norm_moments4(layer_norm_dev4(y[0], b[0], residual, mx, mr), sd, sdd);
        layer_norm_moments4(layer_norm_dev4(y[1], b[1], residual, mx, mr), sd, sdd);
        moments[j] = col_live ? make_float2(sd, sdd) : make_float2(0.0f, 0.0f);
    }
    linear_ln_totals(moments, slots[1], totals, r0);

    // Pass 3: normalise, scale, shift; y + residual to sum_out.
    float4 gamma[2] = {zero, zero};
    float4 beta[2] = {zero, zero};
    if (col_live) {
        load8(p.norm_weight + n, gamma[0], gamma[1]);
        load8(p.norm_bias + n, beta[0], beta[1]);
    }
#pragma unroll
    for (int j = 0; j < LINEAR_LN_ROWS; ++j) {
        const int m = m0 + r0 + 16 * j;
        if (!col_live || m >= lp.m) {
            continue;
        }
        float4 y[2], b[2];
        row_of(j, y, b);
        if (p.sum_out != nullptr) {
            float sx = 0.0f, sr = 0.0f;
            const float4 s0 = layer_norm_sum4(y[0], b[0], residual, sx, sr);
            const float4 s1 = layer_norm_sum4(y[1], b[1], residual, sx, sr);
            store8(p.sum_out + m * lp.n + n, s0, s1);
        }
        const float mx = mean[j].x * inv_n;
        const float mr = residual ? mean[j].y * inv_n : 0.0f;
        const float cc = moments[j].x * inv_n;
        const float var = fmaxf(moments[j].y * inv_n - cc * cc, 0.0f);
        const float rstd = 1.0f / sqrtf(var + p.eps);
        const float4 o0 =
            layer_norm_out4(layer_norm_dev4(y[0], b[0], residual, mx, mr), cc, rstd, gamma[0], beta[0]);
        const float4 o1 =
            layer_norm_out4(layer_norm_dev4(y[1], b[1], residual, mx, mr), cc, rstd, gamma[1], beta[1]);
        store8(p.norm_out + m * lp.n + n, o0, o1);
    }
    // The cluster may still read this block's slots.
    cluster_sync_relaxed();
}

extern "C" __global__ void __launch_bounds__(LINEAR_MMA_THREADS, LINEAR_MMA_NARROW_BLOCKS)
OP_KERNEL_NAME(linear_layer_norm_mma_vec8)(const LinearLayerNormParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p.linear, LINEAR_MMA_NARROW_BN); });
    linear_layer_norm_mma<false>(p);
}

#ifdef OP_WGMMA
extern "C" __global__ void __launch_bounds__(LINEAR_MMA_THREADS, LINEAR_MMA_NARROW_BLOCKS)
OP_KERNEL_NAME(linear_layer_norm_wgmma_vec8)(const LinearLayerNormParams p) {
    dependent_launch_prologue([&] { linear_prefetch_w(p.linear, LINEAR_MMA_NARROW_BN); });
    linear_layer_norm_mma<true>(p);
}
#endif
#endif
#endif  // LINEAR_TC_ANY
