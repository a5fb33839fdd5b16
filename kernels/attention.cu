// Scaled-dot-product attention per head: out = softmax(Q K^T * scale) V.
//
// Q [B, Lq, *], K and V [B, Lk, *] are column blocks of wider tensors, read in
// place with row strides: row (b, i) of head h of Q starts at
//   q + (b * Lq + i) * q_stride + q_col + h * head_dim
// (the same for K and V), so Q, K, V may be the three blocks of one packed
// in_proj output. out is [B, Lq, heads * head_dim].
// Key j of sequence b is ignored where mask[b * Lk + j] != 0 (PyTorch's
// key_padding_mask); with `causal`, query i sees keys j <= i (top-left aligned).
// A query that sees no key gets zeros (PyTorch gives NaN).
//
// Versions:
// - attention_naive (v1): one thread per output element; pass 1 finds the
//   largest score, pass 2 sums exp(score - max) and exp(score - max) * v.
// - attention_flash_d32 / _d64 / _d128 (v2): FlashAttention-style. A block of
//   4 warps takes 8 queries of one (batch, head) (2 per warp), so batch 1 still
//   launches ceil(Lq / 8) * heads blocks. Q is staged once in shared memory; K
//   and V go through shared memory 32 keys at a time; lane j scores key j
//   against the warp's queries, the running max / sum (online softmax) are
//   warp-uniform, and the probabilities go through shared memory (four keys
//   per broadcast 16-byte load) while each lane accumulates head_dim / 32
//   output columns per query in registers. Scores never touch global memory. Warps whose queries are all past Lq, or
//   (causal) all before a tile's first key, only stage that tile; keys a
//   warp cannot see (past Lk, causal) skip P V. The tile width (32, 64, 128)
//   is the head dim rounded up; the padding columns are zero in shared
//   memory, so any head_dim <= 128 works. `vec4` = 16-byte loads (pointers,
//   strides, column offsets and head_dim multiples of 4 floats, checked by
//   the host).
// - attention_flash_d32_q16 / _d64_q16 / _d128_q16 (v2, 16 queries per block,
//   4 per warp): the same kernel for large grids. Every block stages all of
//   its head's K and V, so the L2 -> shared memory traffic is the number of
//   query blocks times K and V: at the projector's batch 64 (B64 Lq77 Lk77 H4
//   d128, 10 MB of Q, K, V and out) 8-query blocks stage 2560 x 79 KB = 202
//   MB, 16-query blocks 1280 x 79 KB = 101 MB; each K value read from shared
//   memory, each V value and each probability shuffle also feeds 4 queries
//   instead of 2. The host takes them once 8-query blocks would need more
//   than one wave; below that (batch 1) the shorter 8-query blocks finish
//   sooner. H200, d128: batch 64 81 us (8-query blocks 113), batch 16 32 us
//   (31). 32-query blocks (8 per warp) were slower than 16 at every batch
//   there (86 us at 64): 140 registers and 48 KiB hold 3 blocks (12 warps)
//   per SM, against 5 (20 warps) of 16-query blocks.
// - attention_tc_d64 / _d128 (v3, f16/bf16 storage, head_dim exactly 64 or
//   128): FlashAttention-2 on tensor cores (WMMA 16x16x16, f32 accumulators).
//   A block of 4 warps takes 64 queries of one (batch, head), 16 per warp. Q
//   is staged once in shared memory as elem; K and V go through shared memory
//   32 keys at a time (rows past Lk zero; `vec4`: 8-byte loads of 4 elements).
//   Each warp computes its 16 x 32 scores S = Q K^T into shared memory (f32);
//   lanes 2r and 2r + 1 own row r: they mask it (keys past Lk, masked or,
//   causal, after the query: -inf), update the running max and sum (online
//   softmax, f32), rescale their part of O by exp(m_old - m_new) and write P,
//   rounded to elem, to shared memory (the row sum adds the rounded values, so
//   the weights P V uses are exactly the ones it is divided by). O += P V runs
//   16 output columns at a time into a fresh accumulator that goes through the
//   warp's consumed score rows to the two lanes that keep those O values in
//   registers (the accumulator's register layout is never assumed), so each
//   lane holds 8 of every 16 output columns of its row: head_dim / 2 floats.
//   Rows that see no key give zeros. Warps whose queries are all past Lq, or
//   (causal) all before a tile's first key, only stage the tile.
//   Queries per block: batch 1 at the projector's shape (Lq 77, 4 heads) gets
//   2 x 4 = 8 blocks, a few of 132 SMs. Smaller blocks (16 or 32 queries)
//   would give 20 or 12 blocks but not a shorter critical path: a block's time
//   is its warps' walk over the same ceil(Lk / 32) tiles, and its 4 warps run
//   side by side on the SM's 4 schedulers; at batch 1 the op is a few
//   microseconds of launch latency and dependent steps either way. At batch
//   64 (512 blocks) the 64-query block shares each staged K/V tile among 4
//   warps, a quarter of the staging traffic of 16-query blocks.
// - attention_few_keys (v4, any storage, head_dim <= 128; the host takes it
//   for Lk <= 16): a warp per (query, head), below.
// - attention_split_keys (v5, any storage, head_dim <= 128; the host takes
//   it past 16 keys where v2 / v3 would leave most SMs idle: batch 1-3 of
//   the projector's decoder): v4's walk with each query's keys split among
//   4 warps, below.
// AttentionParams is in common.cuh (linear.cu's attention_linear_rows takes it too).
#include "common.cuh"

__device__ __forceinline__ bool attention_visible(const AttentionParams& p, int b, int i, int j) {
    if (p.causal && j > i) {
        return false;
    }
    return p.mask == nullptr || p.mask[b * p.lk + j] == 0;
}

// v1: block 128 threads; grid ceil(B Lq heads head_dim / 128).
extern "C" __global__ void OP_KERNEL_NAME(attention_naive)(const AttentionParams p) {
    dependent_launch_prologue();
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    const int hd = p.head_dim;
    const int total = p.batch * p.lq * p.heads * hd;
    if (idx >= total) {
        return;
    }
    const int t = idx % hd;
    int rest = idx / hd;
    const int h = rest % p.heads;
    rest /= p.heads;
    const int i = rest % p.lq;
    const int b = rest / p.lq;

    const elem* qr = p.q + (b * p.lq + i) * p.q_stride + p.q_col + h * hd;
    float mx = OP_NEG_INF;
    for (int j = 0; j < p.lk; ++j) {
        if (!attention_visible(p, b, i, j)) {
            continue;
        }
        const elem* kr = p.k + (b * p.lk + j) * p.k_stride + p.k_col + h * hd;
        float dot = 0.0f;
        for (int d = 0; d < hd; ++d) {
            dot = fmaf(to_f32(qr[d]), to_f32(kr[d]), dot);
        }
        mx = fmaxf(mx, dot * p.scale);
    }
    float result = 0.0f;
    if (mx != OP_NEG_INF) {
        float denom = 0.0f, acc = 0.0f;
        for (int j = 0; j < p.lk; ++j) {
            if (!attention_visible(p, b, i, j)) {
                continue;
            }
            const elem* kr = p.k + (b * p.lk + j) * p.k_stride + p.k_col + h * hd;
            float dot = 0.0f;
            for (int d = 0; d < hd; ++d) {
                dot = fmaf(to_f32(qr[d]), to_f32(kr[d]), dot);
            }
            const float e = expf(dot * p.scale - mx);
            denom += e;
            acc = fmaf(e, to_f32(p.v[(b * p.lk + j) * p.v_stride + p.v_col + h * hd + t]), acc);
        }
        result = acc / denom;
    }
    p.out[((b * p.lq + i) * p.heads + h) * hd + t] = from_f32(result);
}

#define ATT_WARPS 4
#define ATT_BK 32  // keys per tile: one per lane

// Where column `col` (a multiple of 4) of row `row` of a K tile is kept: the
// 16-byte chunks of a row are permuted by XOR with row % 8, so the score
// loop's float4 reads (lane l reads row l, every lane the same column) fall
// on 8 distinct chunk positions, all 32 banks, per 8 lanes, without padding
// the rows (padding of 4 floats a row would add 1.1 KiB at WIDTH 128, and an
// H100 or H200 SM would hold 5 8-query blocks instead of 6). The chunks stay
// within their 32-column group.
__device__ __forceinline__ int attention_swizzle(int row, int col) {
    return col ^ ((row & 7) << 2);
}

// Rows [row0, row0 + ROWS) of one head's column block into a shared tile of
// WIDTH columns: columns past head_dim and rows past `limit` are zero. With
// SWIZZLE, column c of row r goes to attention_swizzle(r, c). Every chunk of
// the tile is in flight at once, not one chunk per thread at a time (that
// was 16 dependent round trips to L2 per K/V tile at head dim 128, most of a
// batch-1 attention's time): f32 rows with `vec4` go by cp.async, complete
// once the caller has waited (cp_async_wait) and synchronised; the others
// through registers, all of a thread's loads before its stores.
template <int WIDTH, bool SWIZZLE, int ROWS>
__device__ __forceinline__ void attention_stage(float (*tile)[WIDTH], const elem* src,
                                                int seq_base, int row0, int limit, int stride,
                                                int col, int hd, bool vec4) {
    constexpr int CHUNKS = WIDTH / 4;
    constexpr int THREADS = ATT_WARPS * 32;
    constexpr int ITER = (ROWS * CHUNKS + THREADS - 1) / THREADS;
    constexpr bool RAGGED = ROWS * CHUNKS % THREADS != 0;
#if OP_ELEM == 0
    if (vec4) {
#pragma unroll
        for (int it = 0; it < ITER; ++it) {
            const int idx = threadIdx.x + THREADS * it;
            if (RAGGED && idx >= ROWS * CHUNKS) {
                break;
            }
            const int r = idx / CHUNKS;
            const int c = (idx - r * CHUNKS) * 4;
            const int row = row0 + r;
            const bool valid = row < limit && c < hd;  // hd % 4 == 0
            const elem* s = valid ? src + (seq_base + row) * stride + col + c : src;
            cp_async16(&tile[r][SWIZZLE ? attention_swizzle(r, c) : c], s, valid);
        }
        return;
    }
#endif
    float4 val[ITER];
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
        const int idx = threadIdx.x + THREADS * it;
        const int r = idx / CHUNKS;
        const int c = (idx - r * CHUNKS) * 4;
        const int row = row0 + r;
        val[it] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if ((!RAGGED || idx < ROWS * CHUNKS) && row < limit && c < hd) {
            const elem* s = src + (seq_base + row) * stride + col + c;
            if (vec4) {
                val[it] = load4(s);  // hd % 4 == 0: all 4 columns are in range
            } else {
                val[it].x = to_f32(s[0]);
                if (c + 1 < hd) val[it].y = to_f32(s[1]);
                if (c + 2 < hd) val[it].z = to_f32(s[2]);
                if (c + 3 < hd) val[it].w = to_f32(s[3]);
            }
        }
    }
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
        const int idx = threadIdx.x + THREADS * it;
        if (RAGGED && idx >= ROWS * CHUNKS) {
            break;
        }
        const int r = idx / CHUNKS;
        const int c = (idx - r * CHUNKS) * 4;
        store_float4(&tile[r][SWIZZLE ? attention_swizzle(r, c) : c], val[it]);
    }
}

// v2: block 128 threads, QW queries per warp; grid (ceil(Lq / (4 QW)), heads,
// batch). Shared memory (4 QW + 64) WIDTH 4 bytes plus 512 QW bytes of
// probabilities: 37 KiB at WIDTH 128 and QW 2, 42 KiB at QW 4 (over 48 KiB,
// the static limit, at QW 8).
template <int WIDTH, int QW>
__device__ __forceinline__ void attention_flash(const AttentionParams& p) {
    constexpr int BQ = ATT_WARPS * QW;  // queries per block
    constexpr int DPL = WIDTH / 32;     // output columns per lane: lane + 32 c
    // Q and V are read along rows (Q: one address for the whole warp; V: 32
    // consecutive floats), free of bank conflicts as they are; K is swizzled.
    __shared__ __align__(16) float qs[BQ][WIDTH];
    __shared__ __align__(16) float ks[ATT_BK][WIDTH];
    __shared__ __align__(16) float vs[ATT_BK][WIDTH];
    // Each warp's probabilities of the current tile, [query][key].
    __shared__ __align__(16) float ps[ATT_WARPS][QW][ATT_BK];

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int b = blockIdx.z;
    const int h = blockIdx.y;
    const int q0 = blockIdx.x * BQ;
    const int hd = p.head_dim;
    const bool vec4 = p.vec4 != 0;
    const int qa = q0 + warp * QW;  // this warp's first query
    const int qlast = qa + QW - 1;  // and its last

    attention_stage<WIDTH, false, BQ>(qs, p.q, b * p.lq, q0, p.lq, p.q_stride, p.q_col + h * hd,
                                      hd, vec4);
    cp_async_commit();  // waited for with the first K/V tile

    float o[QW][DPL];
    float m_run[QW];
    float l_run[QW];
#pragma unroll
    for (int qi = 0; qi < QW; ++qi) {
        m_run[qi] = OP_NEG_INF;
        l_run[qi] = 0.0f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            o[qi][c] = 0.0f;
        }
    }

    // With causal masking no query of this block sees a key past its last query.
    const int k_stop = p.causal ? min(p.lk, q0 + BQ) : p.lk;
    // Keys this warp's queries may see: none past Lk, nor (causal) past its
    // last query. A warp whose queries are all past Lq, or (causal) all before
    // a tile's first key, only helps to stage the tile (its state would not
    // change: every score -inf).
    const int k_warp = p.causal ? min(p.lk, qlast + 1) : p.lk;
    const bool warp_rows = qa < p.lq;
    for (int k0 = 0; k0 < k_stop; k0 += ATT_BK) {
        __syncthreads();  // the previous K/V tile is consumed (and Q is staged)
        attention_stage<WIDTH, true, ATT_BK>(ks, p.k, b * p.lk, k0, p.lk, p.k_stride,
                                             p.k_col + h * hd, hd, vec4);
        attention_stage<WIDTH, false, ATT_BK>(vs, p.v, b * p.lk, k0, p.lk, p.v_stride,
                                              p.v_col + h * hd, hd, vec4);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        if (!warp_rows || k0 >= k_warp) {
            continue;  // warp-uniform
        }

        // Lane `lane` scores key j against each of the warp's queries.
        const int j = k0 + lane;
        const bool key_ok = j < p.lk && (p.mask == nullptr || p.mask[b * p.lk + j] == 0);
        float s[QW];
#pragma unroll
        for (int qi = 0; qi < QW; ++qi) {
            s[qi] = 0.0f;
        }
#pragma unroll
        for (int d0 = 0; d0 < WIDTH; d0 += 32) {
#pragma unroll
            for (int d = d0; d < d0 + 32; d += 4) {
                const float4 kv =
                    *reinterpret_cast<const float4*>(&ks[lane][attention_swizzle(lane, d)]);
#pragma unroll
                for (int qi = 0; qi < QW; ++qi) {
                    const float4 qv = *reinterpret_cast<const float4*>(&qs[warp * QW + qi][d]);
                    s[qi] = fmaf(qv.x, kv.x, s[qi]);
                    s[qi] = fmaf(qv.y, kv.y, s[qi]);
                    s[qi] = fmaf(qv.z, kv.z, s[qi]);
                    s[qi] = fmaf(qv.w, kv.w, s[qi]);
                }
            }
        }

        // Online softmax; every value below except `pj` is warp-uniform.
        float pj[QW];
#pragma unroll
        for (int qi = 0; qi < QW; ++qi) {
            const bool ok = key_ok && !(p.causal && j > qa + qi);
            const float sc = ok ? s[qi] * p.scale : OP_NEG_INF;
            const float m_new = fmaxf(m_run[qi], warp_max(sc));
            // Nothing visible yet: keep the (zero) state as it is.
            const float corr = m_new == OP_NEG_INF ? 1.0f : expf(m_run[qi] - m_new);
            pj[qi] = ok ? expf(sc - m_new) : 0.0f;
            l_run[qi] = fmaf(l_run[qi], corr, warp_sum(pj[qi]));
            m_run[qi] = m_new;
#pragma unroll
            for (int c = 0; c < DPL; ++c) {
                o[qi][c] *= corr;
            }
        }
        // o += P V, key by key. Lane j holds key j's probabilities; they go
        // through shared memory once and come back as broadcasts, four keys
        // per 16-byte load, instead of one shuffle per key and query (at 4
        // queries per warp and head dim 128: 20 shared-memory operations per
        // 4 keys instead of 32, against 64 FMAs). Keys from k_warp on have
        // probability 0 for every query of the warp: skipped.
#pragma unroll
        for (int qi = 0; qi < QW; ++qi) {
            ps[warp][qi][lane] = pj[qi];
        }
        __syncwarp();
        const int jn = min(ATT_BK, k_warp - k0);
        int jj = 0;
#pragma unroll 1
        for (; jj + 4 <= jn; jj += 4) {
            float4 pb[QW];
#pragma unroll
            for (int qi = 0; qi < QW; ++qi) {
                pb[qi] = *reinterpret_cast<const float4*>(&ps[warp][qi][jj]);
            }
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                float vv[DPL];
#pragma unroll
                for (int c = 0; c < DPL; ++c) {
                    vv[c] = vs[jj + t][lane + 32 * c];
                }
#pragma unroll
                for (int qi = 0; qi < QW; ++qi) {
                    const float pt = t == 0 ? pb[qi].x : t == 1 ? pb[qi].y : t == 2 ? pb[qi].z : pb[qi].w;
#pragma unroll
                    for (int c = 0; c < DPL; ++c) {
                        o[qi][c] = fmaf(pt, vv[c], o[qi][c]);
                    }
                }
            }
        }
#pragma unroll 1
        for (; jj < jn; ++jj) {
            float vv[DPL];
#pragma unroll
            for (int c = 0; c < DPL; ++c) {
                vv[c] = vs[jj][lane + 32 * c];
            }
#pragma unroll
            for (int qi = 0; qi < QW; ++qi) {
                const float pt = ps[warp][qi][jj];
#pragma unroll
                for (int c = 0; c < DPL; ++c) {
                    o[qi][c] = fmaf(pt, vv[c], o[qi][c]);
                }
            }
        }
    }

    const int out_stride = p.heads * hd;
#pragma unroll
    for (int qi = 0; qi < QW; ++qi) {
        const int i = qa + qi;
        if (i >= p.lq) {
            continue;
        }
        const float inv = l_run[qi] > 0.0f ? 1.0f / l_run[qi] : 0.0f;
        elem* orow = p.out + (b * p.lq + i) * out_stride + h * hd;
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < hd) {
                orow[d] = from_f32(o[qi][c] * inv);
            }
        }
    }
}

// 8 queries per block (2 per warp): latency, few blocks.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
OP_KERNEL_NAME(attention_flash_d32)(const AttentionParams p) {
    dependent_launch_prologue();
    attention_flash<32, 2>(p);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
OP_KERNEL_NAME(attention_flash_d64)(const AttentionParams p) {
    dependent_launch_prologue();
    attention_flash<64, 2>(p);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
OP_KERNEL_NAME(attention_flash_d128)(const AttentionParams p) {
    dependent_launch_prologue();
    attention_flash<128, 2>(p);
}

// 16 queries per block (4 per warp): throughput, many blocks.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
OP_KERNEL_NAME(attention_flash_d32_q16)(const AttentionParams p) {
    dependent_launch_prologue();
    attention_flash<32, 4>(p);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
OP_KERNEL_NAME(attention_flash_d64_q16)(const AttentionParams p) {
    dependent_launch_prologue();
    attention_flash<64, 4>(p);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
OP_KERNEL_NAME(attention_flash_d128_q16)(const AttentionParams p) {
    dependent_launch_prologue();
    attention_flash<128, 4>(p);
}

// A lane's 4 columns of output row (b, i), head h, as attention_lane4 lays
// them out from c0 (group 32).
template <bool VEC>
__device__ __forceinline__ void attention_store_lane4(const AttentionParams& p, int b, int i, int h,
                                                      int c0, float4 o) {
    const int hd = p.head_dim;
    elem* orow = p.out + (b * p.lq + i) * p.heads * hd + h * hd;
    // 4-element stores need out itself aligned, which a caller's memory need
    // not be (rows and heads are then multiples of 4 elements apart).
    if (VEC && ((size_t)p.out & 15) == 0) {
        if (c0 < hd) {
            store4(orow + c0, o);
        }
    } else {
        const int step = VEC ? 1 : 32;
        const float v[4] = {o.x, o.y, o.z, o.w};
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            if (c0 + step * c < hd) {
                orow[c0 + step * c] = from_f32(v[c]);
            }
        }
    }
}

// ---------------------------------------------------------------- v4
// Few keys (the projector's cross-attention and encoder self-attention see
// its 4 to 8 signal tokens): a warp per (query, head), no shared memory and no
// barrier; attention_few_keys_row (common.cuh) with the warp as the head's
// group. Consecutive warps take consecutive queries of one (batch, head), so
// a block's 4 warps read the same K and V rows (L1). At Lk 4 v2 scores a
// 32-key tile for 4 keys and v3 a 64-query block: most of either is padding.
// Block 128 threads; grid ceil(B heads Lq / 4) (the host checks that the
// product fits an int).
template <bool VEC>
__device__ __forceinline__ void attention_few_keys_warp(const AttentionParams& p) {
    const int lane = threadIdx.x & 31;
    const int idx = blockIdx.x * ATT_WARPS + (threadIdx.x >> 5);
    if (idx >= p.batch * p.heads * p.lq) {
        return;  // warp-uniform
    }
    const int i = idx % p.lq;
    const int bh = idx / p.lq;
    const int h = bh % p.heads;
    const int b = bh / p.heads;
    const int c0 = VEC ? 4 * lane : lane;
    const float4 o = attention_few_keys_row<VEC>(p, b, i, h, c0, 32, true);
    attention_store_lane4<VEC>(p, b, i, h, c0, o);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
OP_KERNEL_NAME(attention_few_keys)(const AttentionParams p) {
    dependent_launch_prologue();
    if (p.vec4) {
        attention_few_keys_warp<true>(p);
    } else {
        attention_few_keys_warp<false>(p);
    }
}

// ---------------------------------------------------------------- v5
// Few queries, more keys (batch 1's decoder self-attention: 77 queries of 4
// heads, 77 keys): v2 and v3 give a block a run of queries and walk every
// key tile in it, on a few of the SMs (batch 1: 40 and 8 blocks), so one
// block's chain of tiles is the op's time. Here each query's keys are split
// among ATT_SPLIT_PARTS warps, v4's walk (attention_keys_run) taking every
// PARTS-th step of ATT_FEW_STEP keys; the query's part-0 warp combines the
// parts' states, passed through shared memory, in part order (so the result
// does not depend on timing). A block takes ATT_SPLIT_QUERIES consecutive
// queries of one (batch, head): the warps of one part read the same K and
// V rows (L1). Warp w: query w % QUERIES, part w / QUERIES. Block
// ATT_SPLIT_THREADS threads; grid B heads ceil(Lq / QUERIES) (the host
// checks that the product fits an int).
#define ATT_SPLIT_QUERIES 4
#define ATT_SPLIT_PARTS 4
#define ATT_SPLIT_THREADS (32 * ATT_SPLIT_QUERIES * ATT_SPLIT_PARTS)

// Parts 1.. of each query's state, for its part-0 warp: o by lane, (m, l).
struct AttentionSplitSmem {
    float4 o[ATT_SPLIT_PARTS - 1][ATT_SPLIT_QUERIES][32];
    float2 ml[ATT_SPLIT_PARTS - 1][ATT_SPLIT_QUERIES];
};

template <bool VEC>
__device__ __forceinline__ void attention_split_keys_block(const AttentionParams& p,
                                                           AttentionSplitSmem& sm) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int qw = warp % ATT_SPLIT_QUERIES;
    const int part = warp / ATT_SPLIT_QUERIES;
    const int groups = (p.lq + ATT_SPLIT_QUERIES - 1) / ATT_SPLIT_QUERIES;
    const int bh = blockIdx.x / groups;
    const int i = (blockIdx.x % groups) * ATT_SPLIT_QUERIES + qw;
    const int h = bh % p.heads;
    const int b = bh / p.heads;
    const bool live = i < p.lq;  // warp-uniform
    const int c0 = VEC ? 4 * lane : lane;
    AttentionRun r = {make_float4(0.0f, 0.0f, 0.0f, 0.0f), OP_NEG_INF, 0.0f};
    if (live) {
        r = attention_keys_run<VEC>(p, b, i, h, c0, 32, true, part, ATT_SPLIT_PARTS);
    }
    if (part > 0) {
        sm.o[part - 1][qw][lane] = r.o;
        if (lane == 0) {
            sm.ml[part - 1][qw] = make_float2(r.m, r.l);
        }
    }
    __syncthreads();
    if (part > 0 || !live) {
        return;
    }
    float m = r.m;
#pragma unroll
    for (int s = 0; s < ATT_SPLIT_PARTS - 1; ++s) {
        m = fmaxf(m, sm.ml[s][qw].x);
    }
    // A part that saw no key (m -inf) holds zeros and weighs 0; if none saw
    // one, l stays 0 and the output is zeros.
    const float w0 = r.m == OP_NEG_INF ? 0.0f : expf(r.m - m);
    float4 o = make_float4(r.o.x * w0, r.o.y * w0, r.o.z * w0, r.o.w * w0);
    float l = r.l * w0;
#pragma unroll
    for (int s = 0; s < ATT_SPLIT_PARTS - 1; ++s) {
        const float2 ml = sm.ml[s][qw];
        const float w = ml.x == OP_NEG_INF ? 0.0f : expf(ml.x - m);
        l = fmaf(ml.y, w, l);
        o = attention_fma4(w, sm.o[s][qw][lane], o);
    }
    attention_store_lane4<VEC>(p, b, i, h, c0, attention_divide(o, l));
}

extern "C" __global__ void __launch_bounds__(ATT_SPLIT_THREADS)
OP_KERNEL_NAME(attention_split_keys)(const AttentionParams p) {
    dependent_launch_prologue();
    __shared__ AttentionSplitSmem sm;
    if (p.vec4) {
        attention_split_keys_block<true>(p, sm);
    } else {
        attention_split_keys_block<false>(p, sm);
    }
}

// ---------------------------------------------------------------- v3
// Tensor cores for 16-bit storage: WMMA 16x16x16 on f16/bf16, f32 accumulators.
#if OP_ELEM != 0
#ifndef OP_EMULATOR
#include <mma.h>
#endif

#define ATT_TC_WARPS 4
#define ATT_TC_BQ (ATT_TC_WARPS * 16)  // queries per block: 16 per warp
#define ATT_TC_BK 32                   // keys per tile
// Registers: each lane keeps head_dim / 2 output floats; at d128 ptxas takes
// up to 168 a thread (3 blocks of 4 warps per SM, as 3 blocks of 48 KiB shared
// memory on sm_80). Capping it at 128 (__launch_bounds__ minimum of 4 blocks)
// spills on sm_80.
// Leading dimensions: WMMA wants multiples of 8 elements (16 bytes); 8 (4)
// elements of padding shift consecutive rows by 4 banks, so the 8 rows of 16
// bytes a fragment load reads at once fall on distinct banks.
#define ATT_TC_LDS (ATT_TC_BK + 4)  // f32 scores
#define ATT_TC_LDP (ATT_TC_BK + 8)  // elem probabilities

// Rows [row0, row0 + ROWS) of one head's column block into an elem tile of
// HD columns (leading dimension LD): rows past `limit` and columns past hd are
// zero. Chunks of 4 elements (8 bytes). `vec4`: cp.async, every chunk of the
// tile in flight at once (one round trip to memory per tile, not one per
// chunk a thread copies; complete once the caller has waited and
// synchronised). Otherwise element by element (unaligned operands only).
template <int HD, int LD, int ROWS>
__device__ __forceinline__ void attention_tc_stage(elem (*tile)[LD], const elem* src,
                                                   int seq_base, int row0, int limit, int stride,
                                                   int col, int hd, bool vec4) {
    constexpr int CHUNKS = HD / 4;
    constexpr int THREADS = ATT_TC_WARPS * 32;
    if (vec4) {
        constexpr int ITER = (ROWS * CHUNKS + THREADS - 1) / THREADS;
#pragma unroll
        for (int it = 0; it < ITER; ++it) {
            const int idx = threadIdx.x + THREADS * it;
            if (ROWS * CHUNKS % THREADS != 0 && idx >= ROWS * CHUNKS) {
                break;
            }
            const int r = idx / CHUNKS;
            const int c = (idx - r * CHUNKS) * 4;
            const int row = row0 + r;
            const bool valid = row < limit && c < hd;  // hd % 4 == 0
            const elem* s = valid ? src + (seq_base + row) * stride + col + c : src;
            cp_async8(&tile[r][c], s, valid);
        }
        return;
    }
    const elem zero = from_f32(0.0f);
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += THREADS) {
        const int r = idx / CHUNKS;
        const int c = (idx - r * CHUNKS) * 4;
        const int row = row0 + r;
        const elem* s = row < limit ? src + (seq_base + row) * stride + col + c : src;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            tile[r][c + j] = row < limit && c + j < hd ? s[j] : zero;
        }
    }
}

// Eight consecutive f32 values as elem, one 16-byte store; `p` 16-byte aligned.
__device__ __forceinline__ void attention_tc_store8(elem* p, const float* v) {
    uint4 raw;
    raw.x = (unsigned)f32_to_bits(v[0]) | ((unsigned)f32_to_bits(v[1]) << 16);
    raw.y = (unsigned)f32_to_bits(v[2]) | ((unsigned)f32_to_bits(v[3]) << 16);
    raw.z = (unsigned)f32_to_bits(v[4]) | ((unsigned)f32_to_bits(v[5]) << 16);
    raw.w = (unsigned)f32_to_bits(v[6]) | ((unsigned)f32_to_bits(v[7]) << 16);
    *reinterpret_cast<uint4*>(p) = raw;
}

// v3: block 128 threads; grid (ceil(Lq / 64), heads, batch). Shared memory:
// 2 (64 + 2 * 32) (HD + 8) + 64 * 36 * 4 + 64 * 40 * 2 bytes = 48 KiB at
// HD = 128, 32 KiB at HD = 64.
template <int HD>
__device__ __forceinline__ void attention_tc(const AttentionParams& p) {
    using namespace nvcuda;
    constexpr int LD = HD + 8;
    constexpr int KT = ATT_TC_BK / 16;  // 16-key blocks per tile
    __shared__ __align__(32) elem qs[ATT_TC_BQ][LD];
    __shared__ __align__(32) elem ks[ATT_TC_BK][LD];
    __shared__ __align__(32) elem vs[ATT_TC_BK][LD];
    __shared__ __align__(32) float ss[ATT_TC_BQ][ATT_TC_LDS];  // scores; P V scratch
    __shared__ __align__(32) elem ps[ATT_TC_BQ][ATT_TC_LDP];

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int b = blockIdx.z;
    const int h = blockIdx.y;
    const int q0 = blockIdx.x * ATT_TC_BQ;
    const int hd = p.head_dim;
    const bool vec4 = p.vec4 != 0;
    const int wr = warp * 16;    // the warp's first row of the tiles
    const int r = lane >> 1;     // the row whose softmax state and output this lane keeps
    const int half = lane & 1;   // with lane ^ 1: columns half * 16 .. of S, half * 8 .. of
                                 // every 16-column block of O
    const int i = q0 + wr + r;   // its query

    attention_tc_stage<HD, LD, ATT_TC_BQ>(qs, p.q, b * p.lq, q0, p.lq, p.q_stride,
                                          p.q_col + h * hd, hd, vec4);
    cp_async_commit();  // waited for with the first K/V tile

    float o[HD / 16][8];
#pragma unroll
    for (int n = 0; n < HD / 16; ++n) {
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            o[n][t] = 0.0f;
        }
    }
    float m_run = OP_NEG_INF;
    float l_run = 0.0f;

    // With causal masking no query of this block sees a key past its last query.
    const int k_stop = p.causal ? min(p.lk, q0 + ATT_TC_BQ) : p.lk;
    // A warp whose rows are all past Lq, or (causal) before a tile's first key,
    // only helps to stage the tile.
    const bool warp_rows = q0 + wr < p.lq;
    const int warp_last = q0 + wr + 15;
    for (int k0 = 0; k0 < k_stop; k0 += ATT_TC_BK) {
        __syncthreads();  // the previous K/V tile is consumed (and Q is staged)
        attention_tc_stage<HD, LD, ATT_TC_BK>(ks, p.k, b * p.lk, k0, p.lk, p.k_stride,
                                              p.k_col + h * hd, hd, vec4);
        attention_tc_stage<HD, LD, ATT_TC_BK>(vs, p.v, b * p.lk, k0, p.lk, p.v_stride,
                                              p.v_col + h * hd, hd, vec4);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        if (!warp_rows || (p.causal && k0 > warp_last)) {
            continue;  // warp-uniform
        }

        // S = Q K^T for the warp's 16 rows: K tile rows are B's columns
        // (col-major with the tile's leading dimension).
        {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> sacc[KT];
#pragma unroll
            for (int j = 0; j < KT; ++j) {
                wmma::fill_fragment(sacc[j], 0.0f);
            }
#pragma unroll 2
            for (int d = 0; d < HD; d += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, elem, wmma::row_major> qa;
                wmma::load_matrix_sync(qa, &qs[wr][d], LD);
#pragma unroll
                for (int j = 0; j < KT; ++j) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, elem, wmma::col_major> kb;
                    wmma::load_matrix_sync(kb, &ks[16 * j][d], LD);
                    wmma::mma_sync(sacc[j], qa, kb, sacc[j]);
                }
            }
#pragma unroll
            for (int j = 0; j < KT; ++j) {
                wmma::store_matrix_sync(&ss[wr][16 * j], sacc[j], ATT_TC_LDS,
                                        wmma::mem_row_major);
            }
        }
        __syncwarp();

        // Online softmax of row r: this lane takes 16 of its 32 scores, lane ^ 1
        // the others. Invisible keys (past Lk, masked, causal) score -inf.
        {
            float sv[16];
            const float* srow = &ss[wr + r][half * 16];
#pragma unroll
            for (int c = 0; c < 16; c += 4) {
                const float4 s4 = *reinterpret_cast<const float4*>(srow + c);
                sv[c] = s4.x;
                sv[c + 1] = s4.y;
                sv[c + 2] = s4.z;
                sv[c + 3] = s4.w;
            }
            float mt = OP_NEG_INF;
#pragma unroll
            for (int c = 0; c < 16; ++c) {
                const int j = k0 + half * 16 + c;
                const bool ok = j < p.lk && !(p.causal && j > i) &&
                                (p.mask == nullptr || p.mask[b * p.lk + j] == 0);
                sv[c] = ok ? sv[c] * p.scale : OP_NEG_INF;
                mt = fmaxf(mt, sv[c]);
            }
            mt = fmaxf(mt, __shfl_xor_sync(OP_FULL_MASK, mt, 1));
            const float m_new = fmaxf(m_run, mt);
            // Nothing visible yet: keep the (zero) state as it is.
            const float corr = m_new == OP_NEG_INF ? 1.0f : expf(m_run - m_new);
            // The probabilities rounded to elem, as P V sees them; the row sum
            // adds the same rounded values.
            float sum = 0.0f;
#pragma unroll
            for (int c = 0; c < 16; ++c) {
                const float e = sv[c] == OP_NEG_INF ? 0.0f : expf(sv[c] - m_new);
                sv[c] = to_f32(from_f32(e));
                sum += sv[c];
            }
            sum += __shfl_xor_sync(OP_FULL_MASK, sum, 1);
            l_run = fmaf(l_run, corr, sum);
            m_run = m_new;
            attention_tc_store8(&ps[wr + r][half * 16], sv);
            attention_tc_store8(&ps[wr + r][half * 16 + 8], sv + 8);
#pragma unroll
            for (int n = 0; n < HD / 16; ++n) {
#pragma unroll
                for (int t = 0; t < 8; ++t) {
                    o[n][t] *= corr;
                }
            }
        }
        __syncwarp();

        // O += P V, 16 output columns at a time: the block's product goes
        // through the warp's (consumed) score rows to the lanes that keep them.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, elem, wmma::row_major> pa[KT];
#pragma unroll
        for (int j = 0; j < KT; ++j) {
            wmma::load_matrix_sync(pa[j], &ps[wr][16 * j], ATT_TC_LDP);
        }
#pragma unroll
        for (int n = 0; n < HD / 16; ++n) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> oacc;
            wmma::fill_fragment(oacc, 0.0f);
#pragma unroll
            for (int j = 0; j < KT; ++j) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, elem, wmma::row_major> vb;
                wmma::load_matrix_sync(vb, &vs[16 * j][16 * n], LD);
                wmma::mma_sync(oacc, pa[j], vb, oacc);
            }
            wmma::store_matrix_sync(&ss[wr][0], oacc, ATT_TC_LDS, wmma::mem_row_major);
            __syncwarp();
            const float* prow = &ss[wr + r][half * 8];
#pragma unroll
            for (int t = 0; t < 8; t += 4) {
                const float4 v4 = *reinterpret_cast<const float4*>(prow + t);
                o[n][t] += v4.x;
                o[n][t + 1] += v4.y;
                o[n][t + 2] += v4.z;
                o[n][t + 3] += v4.w;
            }
            __syncwarp();  // read before the next block overwrites it
        }
    }

    if (i >= p.lq) {
        return;
    }
    const int out_stride = p.heads * hd;
    const float inv = l_run > 0.0f ? 1.0f / l_run : 0.0f;
    elem* orow = p.out + (b * p.lq + i) * out_stride + h * hd;
    // hd == HD (the host's choice), so 8-element groups of a 16-byte aligned
    // row are 16-byte aligned.
    const bool vec8 = hd == HD && (reinterpret_cast<unsigned long long>(orow) & 15) == 0;
#pragma unroll
    for (int n = 0; n < HD / 16; ++n) {
        const int d0 = 16 * n + 8 * half;
        float v[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            v[t] = o[n][t] * inv;
        }
        if (vec8) {
            attention_tc_store8(orow + d0, v);
        } else {
#pragma unroll
            for (int t = 0; t < 8; ++t) {
                if (d0 + t < hd) {
                    orow[d0 + t] = from_f32(v[t]);
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(ATT_TC_WARPS * 32)
OP_KERNEL_NAME(attention_tc_d64)(const AttentionParams p) {
    dependent_launch_prologue();
    attention_tc<64>(p);
}

extern "C" __global__ void __launch_bounds__(ATT_TC_WARPS * 32)
OP_KERNEL_NAME(attention_tc_d128)(const AttentionParams p) {
    dependent_launch_prologue();
    attention_tc<128>(p);
}
#endif  // OP_ELEM != 0

// Attention over few keys with its query and output projections absorbed
// into the keys and values, between the LayerNorms before and after it (the
// projector's decoder cross-attention; why and how in src/projector.rs). Per
// row (b, i) of C columns:
//   s   = x + residual (or x);   h = layer_norm(s; norm_weight, norm_bias, eps)
//   p_e = softmax_j((h . keys[b, j, e] + key_bias[b, j, e]) * scale)  per head e
//   y   = s + sum_e sum_j p_e[j] values[b, j, e] + out_bias        -> stream_out
//   out = layer_norm(y; after_weight, after_bias, after_eps)
// keys[b, j, e] is the C-column block starting at
//   keys + (b * Lk + j) * k_stride + k_col + e * C
// (values alike), key_bias[b, j, e] the element at
//   key_bias + (b * Lk + j) * b_stride + b_col + e.
// The host checks heads <= 32 and heads * Lk <= ABS_MAX_SCORES.
//
// Numerics: as layer_norm's, y is never rounded before it is centred. With a
// = y - s (the attention and out_bias), the second norm's deviations are
// (x - mx) + (r - mr) + (a - ma), the first norm's plus a's: y rounded to f32
// around a mean of 1000 would lose 3e-5 of every element.
//
// Versions:
// - attention_absorbed_naive (v1): one thread per row; the norms' statistics
//   as layer_norm_naive, every element of a recomputed in each pass.
// - attention_absorbed_rows (v2, C % 4 == 0 and C <= 512): a block of 4
//   warps per row, each holding the row and its residual as float4s (`vec4`:
//   16-byte loads, else four scalar ones; from L1 after the first warp) and
//   taking the first norm itself. The scores are split among the warps (q =
//   warp, warp + 4, ..), ABS_STEP at a time with their key rows' loads all in
//   flight, then summed by the warp's shuffles; thread e turns head e's scores
//   into probabilities in shared memory; each warp sums its scores' value
//   rows the same way, and warp 0 adds the four shares in warp order and
//   finishes the row (the second norm on registers). At the image preset's
//   16 scores that is one step of loads for the keys and one for the values:
//   three round trips to L2 in all, with the row's. Where the rows are many
//   (batch 64), a block takes several consecutive rows one after another, so
//   that a sequence's key and value rows are read from L2 once per block
//   rather than once per row (32 KB a row at the image preset in bf16).
// Bytes per row: x, residual, 2 x heads x Lk key and value rows (from L2 and
// L1: the rows of a sequence share them), stream_out and out.
#define ABS_WARPS 4
// float4s of a row per lane: rows of up to 512 columns.
#define ABS_HELD 4
#define ABS_MAX_SCORES 128

struct AbsorbedAttentionParams {
    const elem* x;             // [rows, C]
    const elem* residual;      // [rows, C] or null
    const elem* norm_weight;   // [C]
    const elem* norm_bias;     // [C]
    const elem* keys;          // see above
    const elem* values;
    const elem* key_bias;
    const elem* out_bias;      // [C]
    const elem* after_weight;  // [C]
    const elem* after_bias;    // [C]
    elem* stream_out;          // [rows, C]
    elem* out;                 // [rows, C]
    int rows;
    int lq;
    int cols;
    int lk;
    int heads;
    int k_stride;
    int k_col;
    int v_stride;
    int v_col;
    int b_stride;
    int b_col;
    float scale;
    float eps;
    float after_eps;
    int vec4;
    int rows_per_block;  // v2: consecutive rows a block takes, one after another
};

__device__ __forceinline__ const elem* absorbed_key(const AbsorbedAttentionParams& p, int b,
                                                    int q) {
    const int e = q / p.lk;
    const int j = q - e * p.lk;
    return p.keys + (b * p.lk + j) * p.k_stride + p.k_col + e * p.cols;
}

__device__ __forceinline__ const elem* absorbed_value(const AbsorbedAttentionParams& p, int b,
                                                      int q) {
    const int e = q / p.lk;
    const int j = q - e * p.lk;
    return p.values + (b * p.lk + j) * p.v_stride + p.v_col + e * p.cols;
}

// Head e's scores (indices e * Lk + j) turned into probabilities in place;
// key_bias[e * Lk + j] is added to score e * Lk + j first.
__device__ __forceinline__ void absorbed_softmax(const AbsorbedAttentionParams& p, int e,
                                                 float* scores, const float* key_bias) {
    float m = OP_NEG_INF;
    for (int j = 0; j < p.lk; ++j) {
        const float s = (scores[e * p.lk + j] + key_bias[e * p.lk + j]) * p.scale;
        scores[e * p.lk + j] = s;
        m = fmaxf(m, s);
    }
    float l = 0.0f;
    for (int j = 0; j < p.lk; ++j) {
        const float w = expf(scores[e * p.lk + j] - m);
        scores[e * p.lk + j] = w;
        l += w;
    }
    const float inv = 1.0f / l;
    for (int j = 0; j < p.lk; ++j) {
        scores[e * p.lk + j] *= inv;
    }
}

// v1: what the attention adds to column c of a row of sequence b (its
// output bias included), from the probabilities.
__device__ __forceinline__ float absorbed_naive_add(const AbsorbedAttentionParams& p, int b,
                                                    int c, const float* probs) {
    float a = to_f32(p.out_bias[c]);
    for (int q = 0; q < p.heads * p.lk; ++q) {
        a = fmaf(probs[q], to_f32(absorbed_value(p, b, q)[c]), a);
    }
    return a;
}

// v1: block 128 threads, one thread per row; grid ceil(rows / 128).
extern "C" __global__ void OP_KERNEL_NAME(attention_absorbed_naive)(const AbsorbedAttentionParams p) {
    dependent_launch_prologue();
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= p.rows) {
        return;
    }
    const int b = row / p.lq;
    const int base = row * p.cols;
    const elem* x = p.x + base;
    const elem* r = p.residual != nullptr ? p.residual + base : nullptr;
    const float inv_cols = 1.0f / (float)p.cols;
    const RowNorm n1 = layer_norm_row_naive(x, r, p.cols, p.eps);

    float probs[ABS_MAX_SCORES], key_bias[ABS_MAX_SCORES];
    const int n = p.heads * p.lk;
    for (int q = 0; q < n; ++q) {
        const int e = q / p.lk;
        key_bias[q] = to_f32(p.key_bias[(b * p.lk + q - e * p.lk) * p.b_stride + p.b_col + e]);
        const elem* k = absorbed_key(p, b, q);
        float dot = 0.0f;
        for (int c = 0; c < p.cols; ++c) {
            const float h = fmaf((n1.dev(x, r, c) - n1.c) * n1.rstd, to_f32(p.norm_weight[c]),
                                 to_f32(p.norm_bias[c]));
            dot = fmaf(h, to_f32(k[c]), dot);
        }
        probs[q] = dot;
    }
    for (int e = 0; e < p.heads; ++e) {
        absorbed_softmax(p, e, probs, key_bias);
    }

    // y = s + a, and the second norm of it. Its deviations are taken as
    // the first norm's plus a's, (x - mx) + (r - mr) + (a - ma): y itself,
    // rounded to f32 around a large mean, would lose what the norm keeps.
    float sa = 0.0f;
    for (int c = 0; c < p.cols; ++c) {
        const float a = absorbed_naive_add(p, b, c, probs);
        const float s_c = to_f32(x[c]) + (r != nullptr ? to_f32(r[c]) : 0.0f);
        p.stream_out[base + c] = from_f32(s_c + a);
        sa += a;
    }
    const float ma = sa * inv_cols;
    float se = 0.0f, see = 0.0f;
    for (int c = 0; c < p.cols; ++c) {
        const float d = n1.dev(x, r, c) + (absorbed_naive_add(p, b, c, probs) - ma);
        se += d;
        see = fmaf(d, d, see);
    }
    const float ce = se * inv_cols;
    const float rstd_y = 1.0f / sqrtf(fmaxf(see * inv_cols - ce * ce, 0.0f) + p.after_eps);
    for (int c = 0; c < p.cols; ++c) {
        const float d = n1.dev(x, r, c) + (absorbed_naive_add(p, b, c, probs) - ma);
        p.out[base + c] = from_f32(
            fmaf((d - ce) * rstd_y, to_f32(p.after_weight[c]), to_f32(p.after_bias[c])));
    }
}

template <bool VEC>
__device__ __forceinline__ float4 absorbed_load4(const elem* p) {
    if (VEC) {
        return load4(p);
    }
    return make_float4(to_f32(p[0]), to_f32(p[1]), to_f32(p[2]), to_f32(p[3]));
}

template <bool VEC>
__device__ __forceinline__ void absorbed_store4(elem* p, float4 v) {
    if (VEC) {
        store4(p, v);
        return;
    }
    p[0] = from_f32(v.x);
    p[1] = from_f32(v.y);
    p[2] = from_f32(v.z);
    p[3] = from_f32(v.w);
}

__device__ __forceinline__ float dot4_acc(float4 a, float4 b, float acc) {
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
    acc = fmaf(a.z, b.z, acc);
    return fmaf(a.w, b.w, acc);
}

// Key or value rows per step of v2: their loads in flight together.
#define ABS_STEP 4

// v2: the lane's float4s of a warp's step of key rows (or value rows) q0,
// q0 + 4, .., zero past the scores or the row: selects, not branches, so that
// the step's loads issue together (with branches ptxas issued them one round
// trip at a time).
template <bool VEC>
__device__ __forceinline__ void absorbed_load_step(const AbsorbedAttentionParams& p, bool values,
                                                   int b, int q0, int lane,
                                                   float4 (&out)[ABS_STEP][ABS_HELD]) {
    const int n = p.heads * p.lk;
    const int c4 = p.cols >> 2;
#pragma unroll
    for (int u = 0; u < ABS_STEP; ++u) {
        const int q = q0 + ABS_WARPS * u;
        const elem* row =
            q >= n ? nullptr : values ? absorbed_value(p, b, q) : absorbed_key(p, b, q);
#pragma unroll
        for (int k = 0; k < ABS_HELD; ++k) {
            const int i = lane + 32 * k;
            out[u][k] = row != nullptr && i < c4 ? absorbed_load4<VEC>(row + 4 * i)
                                                 : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
    }
}

// v2's shared memory: the row's scores (then probabilities) and key biases,
// and warps 1..3's shares of a.
struct AbsorbedShared {
    float scores[ABS_MAX_SCORES];
    float key_bias[ABS_MAX_SCORES];
    float4 a[ABS_WARPS - 1][32 * ABS_HELD];
};

// v2 for row `row`, a warp of the block's 4. Every warp takes the first norm
// itself (the row from L1 after the first), then the scores q = warp, warp +
// 4, .. and those rows' share of a; warp 0 adds the shares in warp order and
// finishes the row.
template <bool VEC>
__device__ __forceinline__ void attention_absorbed_row(const AbsorbedAttentionParams& p, int row,
                                                       int warp, int lane, AbsorbedShared& sh) {
    const int b = row / p.lq;
    const int base = row * p.cols;
    const elem* x = p.x + base;
    const elem* r = p.residual != nullptr ? p.residual + base : nullptr;
    const int c4 = p.cols >> 2;
    const int n = p.heads * p.lk;
    const float inv_cols = 1.0f / (float)p.cols;
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

    // Everything that needs nothing computed here, loaded at once: the row,
    // its residual and the key biases (thread t holds score t's).
    float4 xa[ABS_HELD], ra[ABS_HELD], s[ABS_HELD], dev[ABS_HELD], h[ABS_HELD];
#pragma unroll
    for (int k = 0; k < ABS_HELD; ++k) {
        const int i = lane + 32 * k;
        xa[k] = i < c4 ? absorbed_load4<VEC>(x + 4 * i) : zero;
        ra[k] = i < c4 && r != nullptr ? absorbed_load4<VEC>(r + 4 * i) : zero;
    }
    for (int t = 32 * warp + lane; t < n; t += 32 * ABS_WARPS) {
        const int e = t / p.lk;
        const int j = t - e * p.lk;
        sh.key_bias[t] = to_f32(p.key_bias[(b * p.lk + j) * p.b_stride + p.b_col + e]);
    }

    // The first norm, as layer_norm_warp_held. Columns past C stay zero in
    // h, so they add nothing to the scores.
    float sx = 0.0f, sr = 0.0f;
#pragma unroll
    for (int k = 0; k < ABS_HELD; ++k) {
        s[k] = layer_norm_sum4(xa[k], ra[k], r != nullptr, sx, sr);
    }
    const float mx = warp_sum(sx) * inv_cols;
    const float mr = r != nullptr ? warp_sum(sr) * inv_cols : 0.0f;
    float sd = 0.0f, sdd = 0.0f;
#pragma unroll
    for (int k = 0; k < ABS_HELD; ++k) {
        dev[k] = zero;
        if (lane + 32 * k < c4) {
            dev[k] = layer_norm_dev4(xa[k], ra[k], r != nullptr, mx, mr);
            layer_norm_moments4(dev[k], sd, sdd);
        }
    }
    const float cm = warp_sum(sd) * inv_cols;
    const float rstd = 1.0f / sqrtf(fmaxf(warp_sum(sdd) * inv_cols - cm * cm, 0.0f) + p.eps);
    // Selects, not branches, here and below: a step's loads issue together.
#pragma unroll
    for (int k = 0; k < ABS_HELD; ++k) {
        const int i = lane + 32 * k;
        const float4 g = i < c4 ? absorbed_load4<VEC>(p.norm_weight + 4 * i) : zero;
        const float4 beta = i < c4 ? absorbed_load4<VEC>(p.norm_bias + 4 * i) : zero;
        h[k] = layer_norm_out4(dev[k], cm, rstd, g, beta);
    }

    // This warp's scores q = warp + 4 u, ABS_STEP at a time: every load of
    // a step first, then the products.
    for (int q0 = warp; q0 < n; q0 += ABS_WARPS * ABS_STEP) {
        float4 kv[ABS_STEP][ABS_HELD];
        absorbed_load_step<VEC>(p, false, b, q0, lane, kv);
        float part[ABS_STEP];
#pragma unroll
        for (int u = 0; u < ABS_STEP; ++u) {
            part[u] = 0.0f;
#pragma unroll
            for (int t = 0; t < ABS_HELD; ++t) {
                part[u] = dot4_acc(h[t], kv[u][t], part[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < ABS_STEP; ++u) {
            part[u] = warp_sum(part[u]);
        }
        if (lane == 0) {
#pragma unroll
            for (int u = 0; u < ABS_STEP; ++u) {
                if (q0 + ABS_WARPS * u < n) {
                    sh.scores[q0 + ABS_WARPS * u] = part[u];
                }
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < p.heads) {
        absorbed_softmax(p, threadIdx.x, sh.scores, sh.key_bias);
    }
    __syncthreads();

    // This warp's share of a: the probabilities' sum of its value rows.
    float4 a[ABS_HELD];
#pragma unroll
    for (int k = 0; k < ABS_HELD; ++k) {
        a[k] = zero;
    }
    for (int q0 = warp; q0 < n; q0 += ABS_WARPS * ABS_STEP) {
        float4 v[ABS_STEP][ABS_HELD];
        absorbed_load_step<VEC>(p, true, b, q0, lane, v);
#pragma unroll
        for (int u = 0; u < ABS_STEP; ++u) {
            const int q = q0 + ABS_WARPS * u;
            const float w = q < n ? sh.scores[q] : 0.0f;
#pragma unroll
            for (int k = 0; k < ABS_HELD; ++k) {
                a[k] = make_float4(fmaf(w, v[u][k].x, a[k].x), fmaf(w, v[u][k].y, a[k].y),
                                   fmaf(w, v[u][k].z, a[k].z), fmaf(w, v[u][k].w, a[k].w));
            }
        }
    }
    if (warp > 0) {
#pragma unroll
        for (int k = 0; k < ABS_HELD; ++k) {
            sh.a[warp - 1][lane + 32 * k] = a[k];
        }
    }
    __syncthreads();
    if (warp > 0) {
        // On to the block's next row: its first writes (key biases, then
        // scores before the barrier warp 0 also waits at) touch nothing
        // warp 0 still reads.
        return;
    }

    // Warp 0: a = out_bias + the shares in warp order, y = s + a, and the
    // second norm of y by its deviations (x - mx) + (r - mr) + (a - ma), as
    // v1 takes them.
    float sa = 0.0f;
#pragma unroll
    for (int k = 0; k < ABS_HELD; ++k) {
        const int i = lane + 32 * k;
        float4 t = i < c4 ? absorbed_load4<VEC>(p.out_bias + 4 * i) : zero;
        t = make_float4(t.x + a[k].x, t.y + a[k].y, t.z + a[k].z, t.w + a[k].w);
#pragma unroll
        for (int w = 0; w < ABS_WARPS - 1; ++w) {
            const float4 o = sh.a[w][i];
            t = make_float4(t.x + o.x, t.y + o.y, t.z + o.z, t.w + o.w);
        }
        a[k] = t;
        sa += (t.x + t.y) + (t.z + t.w);
    }
#pragma unroll
    for (int k = 0; k < ABS_HELD; ++k) {
        const int i = lane + 32 * k;
        if (i < c4) {
            const float4 y =
                make_float4(s[k].x + a[k].x, s[k].y + a[k].y, s[k].z + a[k].z, s[k].w + a[k].w);
            absorbed_store4<VEC>(p.stream_out + base + 4 * i, y);
        }
    }
    const float ma = warp_sum(sa) * inv_cols;
    float se = 0.0f, see = 0.0f;
#pragma unroll
    for (int k = 0; k < ABS_HELD; ++k) {
        // Past C, a and the deviations are zero: nothing added.
        dev[k] = lane + 32 * k < c4 ? layer_norm_dev4(a[k], dev[k], true, ma, 0.0f) : zero;
        layer_norm_moments4(dev[k], se, see);
    }
    const float ce = warp_sum(se) * inv_cols;
    const float rstd_y =
        1.0f / sqrtf(fmaxf(warp_sum(see) * inv_cols - ce * ce, 0.0f) + p.after_eps);
#pragma unroll
    for (int k = 0; k < ABS_HELD; ++k) {
        const int i = lane + 32 * k;
        const float4 g = i < c4 ? absorbed_load4<VEC>(p.after_weight + 4 * i) : zero;
        const float4 beta = i < c4 ? absorbed_load4<VEC>(p.after_bias + 4 * i) : zero;
        const float4 o = layer_norm_out4(dev[k], ce, rstd_y, g, beta);
        if (i < c4) {
            absorbed_store4<VEC>(p.out + base + 4 * i, o);
        }
    }
}

// v2: block 128 threads (4 warps), rows_per_block consecutive rows per
// block, one after another (a row's key and value rows then come from L1 for
// the next); grid ceil(rows / rows_per_block).
extern "C" __global__ void __launch_bounds__(ABS_WARPS * 32)
OP_KERNEL_NAME(attention_absorbed_rows)(const AbsorbedAttentionParams p) {
    dependent_launch_prologue();
    __shared__ AbsorbedShared sh;
    const int warp = threadIdx.x >> 5;
    const int first = blockIdx.x * p.rows_per_block;
    const int last = min(first + p.rows_per_block, p.rows);
    for (int row = first; row < last; ++row) {
        if (p.vec4) {
            attention_absorbed_row<true>(p, row, warp, threadIdx.x & 31, sh);
        } else {
            attention_absorbed_row<false>(p, row, warp, threadIdx.x & 31, sh);
        }
    }
}
