// The alignment losses of pred u against target v (both [T = B N tokens, D]) and
// their gradient w.r.t. u, in one pass over the data plus a small finishing pass.
//
// kind 0, token L2 (NExT-GPT's "l2 loss"):
//   dist_t = sqrt(sum_d (u - v)^2), loss = mean_t dist_t,
//   grad   = (u - v) / (dist_t T), and 0 for a token with dist_t = 0.
// kind 1, MSE: loss = mean (u - v)^2, grad = 2 (u - v) / (T D).
//
// Pass 1 (one block or thread per token) writes the gradient and one partial per
// token (dist_t, or the token's sum of squares); pass 2, a single block, adds the
// partials in a fixed order in double precision. No atomics: the loss is the same
// bits on every run.
//
// Versions: v1 alignment_loss_naive_rows (one thread per token) +
// alignment_loss_naive_finish (one thread, a sequential sum); v2
// alignment_loss_rows (one block of 256 per token) + alignment_loss_finish (one
// block of 256, strided partial sums, then a fixed tree).
#include "common.cuh"

#define LOSS_TOKEN_L2 0
#define LOSS_MSE 1

struct LossParams {
    const elem* pred;    // [T, D]
    const elem* target;  // [T, D]
    elem* grad;          // [T, D]
    float* partial;      // [T], f32 scratch whatever the storage
    elem* loss;          // [1]
    int tokens;           // T = B N
    int dim;              // D
    int kind;             // LOSS_*
    float grad_scale;     // MSE: 2 / (T D)
};

__device__ __forceinline__ float loss_grad(const LossParams& p, float diff, float dist) {
    if (p.kind == LOSS_MSE) {
        return diff * p.grad_scale;
    }
    return dist > 0.0f ? diff / (dist * (float)p.tokens) : 0.0f;
}

// v1 pass 1: block 128 threads, one thread per token; grid ceil(T / 128).
extern "C" __global__ void OP_KERNEL_NAME(alignment_loss_naive_rows)(const LossParams p) {
    dependent_launch_prologue();
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= p.tokens) {
        return;
    }
    const elem* u = p.pred + t * p.dim;
    const elem* v = p.target + t * p.dim;
    float ss = 0.0f;
    for (int d = 0; d < p.dim; ++d) {
        const float diff = to_f32(u[d]) - to_f32(v[d]);
        ss = fmaf(diff, diff, ss);
    }
    const float dist = sqrtf(ss);
    for (int d = 0; d < p.dim; ++d) {
        p.grad[t * p.dim + d] = from_f32(loss_grad(p, to_f32(u[d]) - to_f32(v[d]), dist));
    }
    p.partial[t] = p.kind == LOSS_MSE ? ss : dist;
}

// v1 pass 2: one block of 1 thread.
extern "C" __global__ void OP_KERNEL_NAME(alignment_loss_naive_finish)(const LossParams p) {
    dependent_launch_prologue();
    if (blockIdx.x != 0 || threadIdx.x != 0) {
        return;
    }
    double total = 0.0;
    for (int t = 0; t < p.tokens; ++t) {
        total += (double)p.partial[t];
    }
    const double count = p.kind == LOSS_MSE ? (double)p.tokens * (double)p.dim : (double)p.tokens;
    p.loss[0] = from_f32((float)(total / count));
}

#define LOSS_THREADS 256

// v2 pass 1: block 256 threads, one block per token; grid T.
extern "C" __global__ void __launch_bounds__(LOSS_THREADS) OP_KERNEL_NAME(alignment_loss_rows)(const LossParams p) {
    dependent_launch_prologue();
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    const elem* u = p.pred + t * p.dim;
    const elem* v = p.target + t * p.dim;
    float ss = 0.0f;
    for (int d = threadIdx.x; d < p.dim; d += blockDim.x) {
        const float diff = to_f32(u[d]) - to_f32(v[d]);
        ss = fmaf(diff, diff, ss);
    }
    ss = block_sum(ss, scratch);
    const float dist = sqrtf(ss);
    for (int d = threadIdx.x; d < p.dim; d += blockDim.x) {
        p.grad[t * p.dim + d] = from_f32(loss_grad(p, to_f32(u[d]) - to_f32(v[d]), dist));
    }
    if (threadIdx.x == 0) {
        p.partial[t] = p.kind == LOSS_MSE ? ss : dist;
    }
}

// v2 pass 2: one block of 256 threads.
extern "C" __global__ void __launch_bounds__(LOSS_THREADS) OP_KERNEL_NAME(alignment_loss_finish)(const LossParams p) {
    dependent_launch_prologue();
    __shared__ double sums[LOSS_THREADS];
    double acc = 0.0;
    for (int t = threadIdx.x; t < p.tokens; t += LOSS_THREADS) {
        acc += (double)p.partial[t];
    }
    sums[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned s = LOSS_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            sums[threadIdx.x] += sums[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const double count =
            p.kind == LOSS_MSE ? (double)p.tokens * (double)p.dim : (double)p.tokens;
        p.loss[0] = from_f32((float)(sums[0] / count));
    }
}
