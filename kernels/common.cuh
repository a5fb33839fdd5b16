// Shared by every kernel file of output-projector (f32 storage and arithmetic).
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
#pragma once

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

// Sum over a block whose size is a multiple of 32 (at most 1024 threads). Every
// thread must call it and every thread gets the same result. `scratch` is a
// __shared__ float[32]; the leading barrier lets calls follow each other.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(t);
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
