// layer_norm over the last dimension, with the residual add fused:
//   s   = x + residual (or x)                 -> sum_out (optional)
//   out = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias   (biased variance)
//
// Numerics (both versions): s is never rounded before it is centred. Pass 1 takes
// the f32 means mx, mr of x and of the residual; pass 2 forms the deviations
// d = (x - mx) + (r - mr), which keeps the bits that rounding x + r to f32 would
// lose when the mean is large (x ~ 1000: ulp 6e-5), and sums d and d^2; their
// mean c is tiny (the rounding error of mx + mr), so var = mean(d^2) - c^2 is the
// corrected two-pass formula (Chan, Golub & LeVeque), not E[s^2] - E[s]^2. Pass 3
// writes (d - c) * rstd * weight + bias.
//
// Versions:
// - layer_norm_naive (v1): one thread per row, three loops over the row.
// - layer_norm_warp_vec4 / layer_norm_warp_scalar (v2): one warp per row (4 rows
//   per block of 128 threads), lanes striding the row with 16-byte loads when
//   cols % 4 == 0 and every pointer is 16-byte aligned; rows of up to 512
//   columns (vec4) are held in registers, loaded at once; longer rows are
//   re-read by passes 2 and 3, then from L1. Warp sums are deterministic.
//
// Bytes: 4 rows cols (2 or 3 reads + 1 or 2 writes); flops ~ 10 rows cols.
#include "common.cuh"

struct LayerNormParams {
    const elem* x;         // [rows, cols]
    const elem* residual;  // [rows, cols] or null
    const elem* weight;    // [cols]
    const elem* bias;      // [cols]
    elem* out;             // [rows, cols]
    elem* sum_out;         // [rows, cols] or null: receives x + residual
    int rows;
    int cols;
    float eps;
    int pad0;
};

// v1: block 128 threads, one thread per row; grid ceil(rows / 128).
extern "C" __global__ void OP_KERNEL_NAME(layer_norm_naive)(const LayerNormParams p) {
    dependent_launch_prologue();
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= p.rows) {
        return;
    }
    const int base = row * p.cols;
    const elem* x = p.x + base;
    const elem* r = p.residual != nullptr ? p.residual + base : nullptr;
    const RowNorm n = layer_norm_row_naive(x, r, p.cols, p.eps);
    for (int j = 0; j < p.cols; ++j) {
        const float d = n.dev(x, r, j);
        p.out[base + j] = from_f32(fmaf((d - n.c) * n.rstd, to_f32(p.weight[j]), to_f32(p.bias[j])));
        if (p.sum_out != nullptr) {
            p.sum_out[base + j] =
                r != nullptr ? from_f32(to_f32(x[j]) + to_f32(r[j])) : x[j];
        }
    }
}

#define LN_WARPS 4

// Rows of up to 32 x LN_HELD float4 (512 columns) with 16-byte loads: the
// row, its residual, weight and bias are loaded into registers at once, all
// in flight together, and the three passes run on the registers. The loops
// below, bounded by the row's length, loaded one float4 at a time and waited
// for each (a chain of round trips to memory in every pass).
#define LN_HELD 4

// v2 on a row held in registers (`vec4` rows of at most 32 LN_HELD float4):
// the same sums in the same order as layer_norm_warp's loops.
__device__ __forceinline__ void layer_norm_warp_held(const LayerNormParams& p, int lane,
                                                     const elem* x, const elem* r, elem* so,
                                                     elem* out) {
    const int c4 = p.cols >> 2;
    const float inv_cols = 1.0f / (float)p.cols;
    float4 xa[LN_HELD], ra[LN_HELD], g[LN_HELD], h[LN_HELD];
#pragma unroll
    for (int k = 0; k < LN_HELD; ++k) {
        const int i = lane + 32 * k;
        const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        xa[k] = i < c4 ? load4(x + 4 * i) : zero;
        ra[k] = i < c4 && r != nullptr ? load4(r + 4 * i) : zero;
        g[k] = i < c4 ? load4(p.weight + 4 * i) : zero;
        h[k] = i < c4 ? load4(p.bias + 4 * i) : zero;
    }
    float sx = 0.0f, sr = 0.0f;
#pragma unroll
    for (int k = 0; k < LN_HELD; ++k) {
        const int i = lane + 32 * k;
        if (i >= c4) {
            break;
        }
        const float4 s = layer_norm_sum4(xa[k], ra[k], r != nullptr, sx, sr);
        if (so != nullptr) {
            store4(so + 4 * i, s);
        }
    }
    const float mx = warp_sum(sx) * inv_cols;
    const float mr = r != nullptr ? warp_sum(sr) * inv_cols : 0.0f;
    float4 d[LN_HELD];
    float sd = 0.0f, sdd = 0.0f;
#pragma unroll
    for (int k = 0; k < LN_HELD; ++k) {
        if (lane + 32 * k >= c4) {
            break;
        }
        d[k] = layer_norm_dev4(xa[k], ra[k], r != nullptr, mx, mr);
        layer_norm_moments4(d[k], sd, sdd);
    }
    const float c = warp_sum(sd) * inv_cols;
    const float var = fmaxf(warp_sum(sdd) * inv_cols - c * c, 0.0f);
    const float rstd = 1.0f / sqrtf(var + p.eps);
#pragma unroll
    for (int k = 0; k < LN_HELD; ++k) {
        const int i = lane + 32 * k;
        if (i >= c4) {
            break;
        }
        store4(out + 4 * i, layer_norm_out4(d[k], c, rstd, g[k], h[k]));
    }
}

// v2: block 128 threads (4 warps), one warp per row; grid ceil(rows / 4).
template <bool VEC>
__device__ __forceinline__ void layer_norm_warp(const LayerNormParams& p) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * LN_WARPS + (threadIdx.x >> 5);
    // The whole warp leaves together (row is warp-uniform), so the shuffles
    // below always see 32 lanes.
    if (row >= p.rows) {
        return;
    }
    const int base = row * p.cols;
    const elem* x = p.x + base;
    const elem* r = p.residual != nullptr ? p.residual + base : nullptr;
    elem* so = p.sum_out != nullptr ? p.sum_out + base : nullptr;
    elem* out = p.out + base;
    if (VEC && p.cols <= 4 * 32 * LN_HELD) {
        layer_norm_warp_held(p, lane, x, r, so, out);
        return;
    }
    const float inv_cols = 1.0f / (float)p.cols;

    // Pass 1: the means of x and r; s = x + r to sum_out.
    float sx = 0.0f, sr = 0.0f;
    if (VEC) {
        const int c4 = p.cols >> 2;
        for (int i = lane; i < c4; i += 32) {
            const float4 b = r != nullptr ? load4(r + 4 * i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            const float4 s = layer_norm_sum4(load4(x + 4 * i), b, r != nullptr, sx, sr);
            if (so != nullptr) {
                store4(so + 4 * i, s);
            }
        }
    } else {
        for (int j = lane; j < p.cols; j += 32) {
            const float a = to_f32(x[j]);
            sx += a;
            float s = a;
            if (r != nullptr) {
                const float b = to_f32(r[j]);
                sr += b;
                s = a + b;
            }
            if (so != nullptr) {
                so[j] = from_f32(s);
            }
        }
    }
    const float mx = warp_sum(sx) * inv_cols;
    const float mr = r != nullptr ? warp_sum(sr) * inv_cols : 0.0f;

    // Pass 2: deviations from (mx + mr), their sum and sum of squares.
    float sd = 0.0f, sdd = 0.0f;
    if (VEC) {
        const int c4 = p.cols >> 2;
        for (int i = lane; i < c4; i += 32) {
            const float4 b = r != nullptr ? load4(r + 4 * i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            layer_norm_moments4(layer_norm_dev4(load4(x + 4 * i), b, r != nullptr, mx, mr),
                                sd, sdd);
        }
    } else {
        for (int j = lane; j < p.cols; j += 32) {
            const float d = (to_f32(x[j]) - mx) + (r != nullptr ? to_f32(r[j]) - mr : 0.0f);
            sd += d;
            sdd = fmaf(d, d, sdd);
        }
    }
    const float c = warp_sum(sd) * inv_cols;
    const float var = fmaxf(warp_sum(sdd) * inv_cols - c * c, 0.0f);
    const float rstd = 1.0f / sqrtf(var + p.eps);

    // Pass 3: normalise, scale, shift.
    if (VEC) {
        const int c4 = p.cols >> 2;
        for (int i = lane; i < c4; i += 32) {
            const float4 b = r != nullptr ? load4(r + 4 * i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            const float4 d = layer_norm_dev4(load4(x + 4 * i), b, r != nullptr, mx, mr);
            const float4 y =
                layer_norm_out4(d, c, rstd, load4(p.weight + 4 * i), load4(p.bias + 4 * i));
            store4(out + 4 * i, y);
        }
    } else {
        for (int j = lane; j < p.cols; j += 32) {
            const float d = (to_f32(x[j]) - mx) + (r != nullptr ? to_f32(r[j]) - mr : 0.0f);
            out[j] = from_f32(fmaf((d - c) * rstd, to_f32(p.weight[j]), to_f32(p.bias[j])));
        }
    }
}

extern "C" __global__ void __launch_bounds__(LN_WARPS * 32)
OP_KERNEL_NAME(layer_norm_warp_vec4)(const LayerNormParams p) {
    dependent_launch_prologue();
    layer_norm_warp<true>(p);
}

extern "C" __global__ void __launch_bounds__(LN_WARPS * 32)
OP_KERNEL_NAME(layer_norm_warp_scalar)(const LayerNormParams p) {
    dependent_launch_prologue();
    layer_norm_warp<false>(p);
}
