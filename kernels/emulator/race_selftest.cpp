// The emulator's own checks of memory ordering, on small kernels with a known
// answer: what it must report (a data race under -fsanitize=thread, or stale
// data from a cp.async read before its wait) and what it must accept. One
// case per run, since TSan reports a race at most once per pair of stacks:
//
//   c++ -std=c++17 -g -O1 -pthread -fsanitize=thread race_selftest.cpp -o race_selftest
//   TSAN_OPTIONS=exitcode=66 ./race_selftest <case>      # ./race_selftest --list
//
// Exit status: 0 when the kernel ran and its output was right, 1 when it was
// wrong (stale data), 66 (TSan's) when a race was reported. tests/cuda_ops.rs
// (kernels_race_free_under_thread_sanitizer) runs every case and checks the
// status its description implies: "(race)" 66, "(stale)" 1, else 0.
#include "emu.h"
#define OP_ELEM 0
#include "../common.cuh"

#include <map>
#include <string>

namespace {

alignas(16) float g_out[1024];
unsigned g_counter;

// Blocks of 64 threads; thread t writes smem[t], then reads smem[t ^ 1]
// (two warps). Every block uses the same shared array, as on a GPU.
void smem_exchange(bool barrier) {
    emu::launch(dim3(3), dim3(64), [=] {
        __shared__ float smem[64];
        const int t = threadIdx.x;
        smem[t] = (float)(blockIdx.x * 64 + t);
        if (barrier) __syncthreads();
        g_out[blockIdx.x * 64 + t] = smem[t ^ 1];
    });
}

// Lane t writes smem[t]; lane t reads smem[t ^ 1] after a __syncwarp, or
// after only a shuffle (which orders no memory).
void warp_exchange(bool syncwarp) {
    emu::launch(dim3(1), dim3(32), [=] {
        __shared__ float smem[32];
        const int t = threadIdx.x;
        smem[t] = (float)t;
        if (syncwarp) {
            __syncwarp();
        } else {
            (void)__shfl_xor_sync(OP_FULL_MASK, t, 1);
        }
        g_out[t] = smem[t ^ 1];
    });
}

// Four blocks, each writes its own element.
void block_outputs() {
    emu::launch(dim3(4), dim3(32), [] {
        if (threadIdx.x == 0) g_out[blockIdx.x] = (float)blockIdx.x;
    });
}

// Split-K's finish: each of 4 blocks writes a partial sum, counts itself in
// with linear.cu's protocol (the acquire-release atomic, then a barrier for
// the block), and the last adds the partials. (Its relaxed counterpart is not
// a case: see "What TSan cannot see" in emu.h.)
void split_finish() {
    g_counter = 0;
    emu::launch(dim3(4), dim3(32), [=] {
        __shared__ bool last;
        if (threadIdx.x == 0) {
            g_out[blockIdx.x] = (float)(blockIdx.x + 1);
            last = atomic_add_acq_rel(&g_counter, 1u) == gridDim.x - 1;
        }
        __syncthreads();
        if (last && threadIdx.x == 1) {
            float s = 0.0f;
            for (unsigned b = 0; b < gridDim.x; ++b) s += g_out[b];
            g_out[8] = s;
        }
    });
}

// Two clusters of 4: block r writes its shared slots, and reads block
// r + 1's through distributed shared memory after a cluster_sync (and a
// second one before exiting, so no block leaves while another reads it), or
// with no barrier before the read.
void cluster_exchange(bool barrier) {
    emu::launch(
        dim3(8), dim3(32),
        [=] {
            __shared__ __align__(16) float slot[4];
            const unsigned r = cluster_rank();
            if (threadIdx.x < 4) slot[threadIdx.x] = (float)(r * 4 + threadIdx.x);
            if (barrier) cluster_sync();
            if (threadIdx.x == 0) {
                const float4 v = cluster_load_float4(slot, (r + 1) % cluster_blocks());
                g_out[blockIdx.x] = v.x + v.y + v.z + v.w;
            }
            cluster_sync_relaxed();
        },
        dim3(4));
}

// Two clusters of 2: each block writes its output, and after a cluster_sync
// reads its partner's.
void cluster_outputs() {
    emu::launch(
        dim3(4), dim3(32),
        [=] {
            if (threadIdx.x == 0) g_out[blockIdx.x] = (float)blockIdx.x;
            cluster_sync();
            if (threadIdx.x == 0) g_out[8 + blockIdx.x] = g_out[blockIdx.x ^ 1];
        },
        dim3(2));
}

// cluster_sync_around: global stores in `between` are not ordered before the
// other blocks' reads after the barrier; stores before it are.
void cluster_around(bool store_between) {
    emu::launch(
        dim3(2), dim3(32),
        [=] {
            const unsigned r = cluster_rank();
            if (!store_between && threadIdx.x == 0) g_out[r] = (float)r;
            cluster_sync_around([&] {
                if (store_between && threadIdx.x == 0) g_out[r] = (float)r;
            });
            if (threadIdx.x == 0) g_out[4 + r] = g_out[r ^ 1];
        },
        dim3(2));
}

// Thread t copies g_out[t] into smem[t] with cp.async; thread t reads
// smem[t ^ 1] after its wait and a barrier, or after the barrier alone.
void cp_async_stage(bool wait) {
    for (int i = 0; i < 64; ++i) g_out[i] = (float)i;
    emu::launch(dim3(1), dim3(64), [=] {
        __shared__ __align__(16) float smem[64];
        const int t = threadIdx.x;
        smem[t] = -1.0f;
        __syncthreads();
        if ((t & 1) == 0) cp_async8(&smem[t], &g_out[t], true);  // even threads, 8 bytes
        cp_async_commit();
        if (wait) cp_async_wait<0>();
        __syncthreads();
        g_out[64 + t] = smem[t ^ 1];
    });
}

// A cp.async issued into a stage another thread may still read (no barrier
// between the read and the copy): the stage may change from the issue on.
void cp_async_overwrite() {
    for (int i = 0; i < 64; ++i) g_out[i] = 100.0f + (float)i;
    emu::launch(dim3(1), dim3(64), [] {
        __shared__ __align__(16) float smem[64];
        const int t = threadIdx.x;
        smem[t] = (float)t;
        __syncthreads();
        float seen = 0.0f;
        if (t & 1) {
            seen = smem[t ^ 1];  // its even neighbour's, which that thread overwrites
        } else {
            cp_async8(&smem[t], &g_out[t], true);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        g_out[64 + t] = seen;
    });
}

// More blocks than TSan's shadow call stack has entries (65,536): each fiber
// runs one thread of every block, so a frame left per block would overflow it.
void many_blocks() {
    emu::launch(dim3(70000), dim3(32), [] {
        if (blockIdx.x == 69999) g_out[threadIdx.x] = (float)threadIdx.x;
    });
}

// Two launches: the second reads what the first wrote.
void two_launches() {
    emu::launch(dim3(2), dim3(32), [] { g_out[blockIdx.x * 32 + threadIdx.x] = 1.0f; });
    emu::launch(dim3(2), dim3(32), [] {
        g_out[64 + blockIdx.x * 32 + threadIdx.x] = g_out[(1 - blockIdx.x) * 32 + threadIdx.x] + 1.0f;
    });
}

bool expect(bool ok, const char* what) {
    if (!ok) fprintf(stderr, "wrong result: %s\n", what);
    return ok;
}

struct Case {
    const char* about;
    bool (*run)();
};

const std::map<std::string, Case> cases = {
    {"barrier", {"shared memory across warps after __syncthreads", [] {
         smem_exchange(true);
         return expect(g_out[0] == 1.0f && g_out[191] == 190.0f, "exchange");
     }}},
    {"no-barrier", {"shared memory across warps without a barrier (race)", [] {
         smem_exchange(false);
         return true;
     }}},
    {"syncwarp", {"shared memory across lanes after __syncwarp", [] {
         warp_exchange(true);
         return expect(g_out[0] == 1.0f && g_out[31] == 30.0f, "exchange");
     }}},
    {"shuffle-only", {"shared memory across lanes after only a shuffle (race)", [] {
         warp_exchange(false);
         return true;
     }}},
    {"blocks", {"blocks writing their own outputs", [] {
         block_outputs();
         return expect(g_out[3] == 3.0f, "block 3's output");
     }}},
    {"split", {"split-K finish with the acquire-release counter", [] {
         split_finish();
         return expect(g_out[8] == 10.0f && g_counter == 4, "sum of partials");
     }}},
    {"cluster", {"distributed shared memory after cluster_sync", [] {
         cluster_exchange(true);
         return expect(g_out[7] == 0.0f + 1.0f + 2.0f + 3.0f, "rank 0's slots seen by rank 3");
     }}},
    {"cluster-no-barrier", {"distributed shared memory without cluster_sync (race)", [] {
         cluster_exchange(false);
         return true;
     }}},
    {"clusters", {"global memory of a cluster's blocks after cluster_sync", [] {
         cluster_outputs();
         return expect(g_out[8] == 1.0f && g_out[11] == 2.0f, "partner's output");
     }}},
    {"cluster-around", {"global stores before cluster_sync_around's arrive", [] {
         cluster_around(false);
         return expect(g_out[4] == 1.0f && g_out[5] == 0.0f, "the other block's store");
     }}},
    {"cluster-around-between", {"global stores between arrive and wait, read after (race)", [] {
         cluster_around(true);
         return true;
     }}},
    {"cp-async", {"cp.async stage read after its wait and a barrier", [] {
         cp_async_stage(true);
         return expect(g_out[64 + 1] == 0.0f && g_out[64 + 62] == 63.0f, "copied stage");
     }}},
    {"cp-async-no-wait", {"cp.async stage read without its wait (stale)", [] {
         cp_async_stage(false);
         return expect(g_out[64 + 1] == 0.0f && g_out[64 + 62] == 63.0f, "copied stage");
     }}},
    {"cp-async-overwrite", {"cp.async into a stage another thread still reads (race)", [] {
         cp_async_overwrite();
         return expect(g_out[64 + 1] == 0.0f && g_out[64 + 63] == 62.0f, "the stage as read");
     }}},
    {"many-blocks", {"70,000 blocks, each thread's fiber reused by every one", [] {
         many_blocks();
         return expect(g_out[31] == 31.0f, "the last block's output");
     }}},
    {"launches", {"a launch reading the previous launch's output", [] {
         two_launches();
         return expect(g_out[64] == 2.0f && g_out[127] == 2.0f, "second launch");
     }}},
};

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2 || std::string(argv[1]) == "--list") {
        for (const auto& c : cases) printf("%-24s %s\n", c.first.c_str(), c.second.about);
        return argc == 2 ? 0 : 2;
    }
    const auto it = cases.find(argv[1]);
    if (it == cases.end()) {
        fprintf(stderr, "unknown case %s (--list)\n", argv[1]);
        return 2;
    }
    return it->second.run() ? 0 : 1;
}
