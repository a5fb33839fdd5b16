// gather_signal_tokens: out[b, i, :] = hidden[b, p, :] + embeds[b, p, :] with
// p = positions[b * n + i]; hidden and embeds [B, T, C], out [B, n, C].
// `positions` null means the identity p = i (T == n): the projector's plain
// `hidden + embeds`, launched without copying positions to the device.
// `embeds` null means out = hidden[b, p, :].
//
// Versions: v1 gather_signal_tokens_naive (one thread per element); v2
// gather_signal_tokens_vec4 (one thread per 4 elements, 16-byte loads and stores;
// needs C % 4 == 0 and 16-byte aligned tensors, else v1 runs).
// Bytes: 4 B n C (2 reads + 1 write); flops B n C.
#include "common.cuh"

struct GatherParams {
    const elem* hidden;    // [B, T, C]
    const elem* embeds;    // [B, T, C] or null
    const int* positions;  // [B, n] or null (identity)
    elem* out;             // [B, n, C]
    int batch;
    int seq_len;
    int n;
    int channels;
};

__device__ __forceinline__ int gather_source_row(const GatherParams& p, int row) {
    // row = b * n + i of the output
    const int b = row / p.n;
    const int i = row - b * p.n;
    const int pos = p.positions != nullptr ? p.positions[row] : i;
    return b * p.seq_len + pos;
}

// v1: block 256 threads, one thread per output element; grid ceil(B n C / 256).
extern "C" __global__ void OP_KERNEL_NAME(gather_signal_tokens_naive)(const GatherParams p) {
    dependent_launch_prologue();
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    const int total = p.batch * p.n * p.channels;
    if (idx >= total) {
        return;
    }
    const int row = idx / p.channels;
    const int c = idx - row * p.channels;
    const int src = gather_source_row(p, row) * p.channels + c;
    float y = to_f32(p.hidden[src]);
    if (p.embeds != nullptr) {
        y += to_f32(p.embeds[src]);
    }
    p.out[idx] = from_f32(y);
}

// v2: block 256 threads, one thread per 4 elements; grid ceil(B n C / 4 / 256).
extern "C" __global__ void OP_KERNEL_NAME(gather_signal_tokens_vec4)(const GatherParams p) {
    dependent_launch_prologue();
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;  // float4 index
    const int c4 = p.channels >> 2;
    const int total = p.batch * p.n * c4;
    if (idx >= total) {
        return;
    }
    const int row = idx / c4;
    const int c = (idx - row * c4) * 4;
    const int src = gather_source_row(p, row) * p.channels + c;
    float4 y = load4(p.hidden + src);
    if (p.embeds != nullptr) {
        const float4 e = load4(p.embeds + src);
        y.x += e.x;
        y.y += e.y;
        y.z += e.z;
        y.w += e.w;
    }
    store4(p.out + row * p.channels + c, y);
}
