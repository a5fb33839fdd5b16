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
//   warp-uniform, and the probabilities are broadcast with shuffles while each
//   lane accumulates head_dim / 32 output columns in registers. Scores never
//   touch memory. The tile width (32, 64, 128) is the head dim rounded up; the
//   padding columns are zero in shared memory, so any head_dim <= 128 works.
//   `vec4` = 16-byte loads (pointers, strides, column offsets and head_dim
//   multiples of 4 floats, checked by the host).
#include "common.cuh"

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

__device__ __forceinline__ bool attention_visible(const AttentionParams& p, int b, int i, int j) {
    if (p.causal && j > i) {
        return false;
    }
    return p.mask == nullptr || p.mask[b * p.lk + j] == 0;
}

// v1: block 128 threads; grid ceil(B Lq heads head_dim / 128).
extern "C" __global__ void OP_KERNEL_NAME(attention_naive)(const AttentionParams p) {
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
#define ATT_QW 2                     // queries per warp
#define ATT_BQ (ATT_WARPS * ATT_QW)  // queries per block
#define ATT_BK 32                    // keys per tile: one per lane

// Rows [row0, row0 + rows) of one head's column block into a shared tile of
// `width` columns (leading dimension ld): columns past head_dim and rows past
// `limit` are zero.
template <int WIDTH, int LD>
__device__ __forceinline__ void attention_stage(float (*tile)[LD], int rows, const elem* src,
                                                int seq_base, int row0, int limit, int stride,
                                                int col, int hd, bool vec4) {
    constexpr int CHUNKS = WIDTH / 4;
    for (int idx = threadIdx.x; idx < rows * CHUNKS; idx += blockDim.x) {
        const int r = idx / CHUNKS;
        const int c = (idx - r * CHUNKS) * 4;
        float4 val = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const int row = row0 + r;
        if (row < limit && c < hd) {
            const elem* s = src + (seq_base + row) * stride + col + c;
            if (vec4) {
                val = load4(s);  // hd % 4 == 0: all 4 columns are in range
            } else {
                val.x = to_f32(s[0]);
                if (c + 1 < hd) val.y = to_f32(s[1]);
                if (c + 2 < hd) val.z = to_f32(s[2]);
                if (c + 3 < hd) val.w = to_f32(s[3]);
            }
        }
        store_float4(&tile[r][c], val);
    }
}

// v2: block 128 threads; grid (ceil(Lq / 8), heads, batch).
template <int WIDTH>
__device__ __forceinline__ void attention_flash(const AttentionParams& p) {
    constexpr int LD = WIDTH + 4;    // rows stay 16-byte aligned; lane-strided
                                     // float4 reads of K rows avoid bank conflicts
    constexpr int DPL = WIDTH / 32;  // output columns per lane: lane + 32 c
    __shared__ __align__(16) float qs[ATT_BQ][LD];
    __shared__ __align__(16) float ks[ATT_BK][LD];
    __shared__ __align__(16) float vs[ATT_BK][LD];

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int b = blockIdx.z;
    const int h = blockIdx.y;
    const int q0 = blockIdx.x * ATT_BQ;
    const int hd = p.head_dim;
    const bool vec4 = p.vec4 != 0;
    const int qa = q0 + warp * ATT_QW;  // this warp's first query

    attention_stage<WIDTH, LD>(qs, ATT_BQ, p.q, b * p.lq, q0, p.lq, p.q_stride,
                               p.q_col + h * hd, hd, vec4);

    float o[ATT_QW][DPL];
    float m_run[ATT_QW];
    float l_run[ATT_QW];
#pragma unroll
    for (int qi = 0; qi < ATT_QW; ++qi) {
        m_run[qi] = OP_NEG_INF;
        l_run[qi] = 0.0f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            o[qi][c] = 0.0f;
        }
    }

    // With causal masking no query of this block sees a key past its last query.
    const int k_stop = p.causal ? min(p.lk, q0 + ATT_BQ) : p.lk;
    for (int k0 = 0; k0 < k_stop; k0 += ATT_BK) {
        __syncthreads();  // the previous K/V tile is consumed (and Q is staged)
        attention_stage<WIDTH, LD>(ks, ATT_BK, p.k, b * p.lk, k0, p.lk, p.k_stride,
                                   p.k_col + h * hd, hd, vec4);
        attention_stage<WIDTH, LD>(vs, ATT_BK, p.v, b * p.lk, k0, p.lk, p.v_stride,
                                   p.v_col + h * hd, hd, vec4);
        __syncthreads();

        // Lane `lane` scores key j against each of the warp's queries.
        const int j = k0 + lane;
        const bool key_ok = j < p.lk && (p.mask == nullptr || p.mask[b * p.lk + j] == 0);
        float s[ATT_QW];
#pragma unroll
        for (int qi = 0; qi < ATT_QW; ++qi) {
            s[qi] = 0.0f;
        }
#pragma unroll 8
        for (int d = 0; d < WIDTH; d += 4) {
            const float4 kv = *reinterpret_cast<const float4*>(&ks[lane][d]);
#pragma unroll
            for (int qi = 0; qi < ATT_QW; ++qi) {
                const float4 qv = *reinterpret_cast<const float4*>(&qs[warp * ATT_QW + qi][d]);
                s[qi] = fmaf(qv.x, kv.x, s[qi]);
                s[qi] = fmaf(qv.y, kv.y, s[qi]);
                s[qi] = fmaf(qv.z, kv.z, s[qi]);
                s[qi] = fmaf(qv.w, kv.w, s[qi]);
            }
        }

        // Online softmax; every value below except `pj` is warp-uniform.
        float pj[ATT_QW];
#pragma unroll
        for (int qi = 0; qi < ATT_QW; ++qi) {
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
        // o += P V: key jj's probability comes from lane jj.
#pragma unroll 4
        for (int jj = 0; jj < ATT_BK; ++jj) {
            float vv[DPL];
#pragma unroll
            for (int c = 0; c < DPL; ++c) {
                vv[c] = vs[jj][lane + 32 * c];
            }
#pragma unroll
            for (int qi = 0; qi < ATT_QW; ++qi) {
                const float pb = __shfl_sync(OP_FULL_MASK, pj[qi], jj);
#pragma unroll
                for (int c = 0; c < DPL; ++c) {
                    o[qi][c] = fmaf(pb, vv[c], o[qi][c]);
                }
            }
        }
    }

    const int out_stride = p.heads * hd;
#pragma unroll
    for (int qi = 0; qi < ATT_QW; ++qi) {
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

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
OP_KERNEL_NAME(attention_flash_d32)(const AttentionParams p) {
    attention_flash<32>(p);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
OP_KERNEL_NAME(attention_flash_d64)(const AttentionParams p) {
    attention_flash<64>(p);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
OP_KERNEL_NAME(attention_flash_d128)(const AttentionParams p) {
    attention_flash<128>(p);
}
