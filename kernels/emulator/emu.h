// A small CUDA execution emulator for checking kernels without a GPU.
//
// The kernel files are compiled as C++ with this header included first. Blocks
// run one after another; every thread of a block is a fiber with its own stack,
// run until its next __syncthreads or warp collective (shuffle, __syncwarp),
// which are scheduling points: a barrier releases when every live thread of the
// block reached it, a warp collective when all 32 lanes did (the exchange of a
// shuffle happens then). __shared__ arrays are function statics, shared by the
// fibers of a block. The emulator aborts, naming the block, on a deadlock, a
// shuffle missing lanes (exited or partial warps), a non-full shuffle mask, or a
// warp mixing a shuffle with a block barrier. All emulator state, __shared__
// arrays included, is per OS thread, so launches from several threads run
// side by side. Built with
// -fsanitize=address,undefined, out-of-bounds and misaligned (float4) accesses
// abort too. Built with -fsanitize=thread, races within a block or a cluster
// are reported whatever values they happened to give (see "ThreadSanitizer"
// below); otherwise such races show only when their values go wrong in the
// fixed interleaving (run again with the order reversed, emu::reverse_order,
// for a second one). cp.async copies land at their thread's wait, so a stage
// read before it is stale. What it cannot show: performance.
//
// 16-bit storage: __half and __nv_bfloat16 are their bits, converted with
// round-to-nearest-even like cuda_fp16.h / cuda_bf16.h. nvcuda::wmma (16x16x16
// for f16/bf16, 16x16x8 for TF32, f32 accumulators) is emulated by its
// semantics, not the hardware's register layout: lane l of a warp holds
// elements 8l .. 8l + 7 (row-major) of a fragment's 16x16 tile (4l .. 4l + 3
// of a 16x8 or 8x16 TF32 tile); load, store and mma are warp-collective (every
// lane must call them, as on the GPU), and mma_sync reads the other lanes' A
// and B elements. mma.sync and ldmatrix (common.cuh) are emulated in the
// hardware's register layout, as the PTX ISA defines it, and so is warpgroup
// MMA (wgmma, sm_90a): its operands read from shared memory as their
// descriptors and the 64-byte swizzle say, each MMA performed at its wait
// (see emu_wgmma). Misaligned WMMA pointers (not 32 bytes) or leading
// dimensions (not 16 bytes) abort, as they are undefined on the GPU, and so
// does a TF32 operand not rounded by __float_to_tf32 (cvt.rna.tf32.f32).
//
// Thread-block clusters: a launch with cluster dimensions runs each cluster's
// blocks at once, one OS thread per block (each with its own fibers and
// __shared__ arrays), joined before the next cluster. cluster_sync is a
// scheduling point that releases when every thread of every block of the
// cluster reached it (the emulator aborts if one of the cluster's blocks has
// exited, or a block mixes it with __syncthreads); distributed shared memory
// maps an address of one block's __shared__ array to the same array of
// another block's OS thread.
//
// Fiber switches are a few instructions on x86-64 (callee-saved registers and
// the stack pointer); elsewhere ucontext's swapcontext is used.
#pragma once
#define OP_EMULATOR 1
#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <functional>
#include <algorithm>
#include <random>
#include <type_traits>
#include <condition_variable>
#include <mutex>
#include <thread>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" {
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
}
#define EMU_TSAN 1
#else
#define EMU_TSAN 0
#endif
// Under TSan a fiber's last switch (from trampoline) never returns, so the
// functions on that path must not record entries in its shadow call stack:
// the fiber is used again by the next block, and the entries left by every
// block would grow it past TSan's limit (65,536) in a long run.
#if EMU_TSAN
#define EMU_NO_TSAN_FRAME __attribute__((no_sanitize_thread, always_inline))
#define EMU_NO_TSAN_ENTRY __attribute__((no_sanitize_thread))
#else
#define EMU_NO_TSAN_FRAME
#define EMU_NO_TSAN_ENTRY
#endif

// constexpr constructors: threadIdx and the others are then constant-initialised
// thread_locals, read directly rather than through an initialisation check.
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3() {}
    constexpr dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float a, float b) { return float2{a, b}; }
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint2 make_uint2(unsigned a, unsigned b) { return uint2{a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned emu_float_bits(float f) { unsigned u; memcpy(&u, &f, 4); return u; }

// ---------------------------------------------------------------- 16-bit floats
struct __half {
    unsigned short x;
};
struct __nv_bfloat16 {
    unsigned short x;
};
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

inline float __half2float(__half h) {
    const unsigned sign = (unsigned)(h.x & 0x8000u) << 16;
    const unsigned exp = (h.x >> 10) & 0x1fu;
    const unsigned mant = h.x & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in f32
        const float v = (float)mant * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) {
        return __uint_as_float(sign | 0x7f800000u | (mant << 13));
    }
    return __uint_as_float(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

inline __half __float2half_rn(float f) {
    const unsigned x = emu_float_bits(f);
    const unsigned short sign = (unsigned short)((x >> 16) & 0x8000u);
    const unsigned ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {  // inf, nan
        return __half{(unsigned short)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u))};
    }
    if (ax >= 0x477ff000u) {  // >= 65520 rounds to infinity
        return __half{(unsigned short)(sign | 0x7c00u)};
    }
    if (ax < 0x38800000u) {  // below 2^-14: subnormal, round(|f| 2^24), ties to even
        const float scaled = __uint_as_float(ax) * 16777216.0f;  // exact
        return __half{(unsigned short)(sign | (unsigned short)std::nearbyint(scaled))};
    }
    const unsigned mant = ax & 0x7fffffu;
    unsigned h = ((((ax >> 23) - 127 + 15)) << 10) | (mant >> 13);
    const unsigned rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
        ++h;  // a carry into the exponent is the right rounding too
    }
    return __half{(unsigned short)(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.x << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const unsigned x = emu_float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return __nv_bfloat16{(unsigned short)(((x >> 16) & 0x8000u) | 0x7fc0u)};
    }
    return __nv_bfloat16{(unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

inline float emu_to_float(float v) { return v; }
inline float emu_to_float(__half v) { return __half2float(v); }
inline float emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

namespace emu {
enum State { RUN, BARRIER, WARP, CLUSTER, DONE };
#if defined(__x86_64__)
// Callee-saved registers and the stack pointer: a switch is a few instructions,
// no system call (swapcontext saves the signal mask with one).
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
struct Context {
    void* sp = nullptr;
};
EMU_NO_TSAN_FRAME inline void ctx_switch(Context& from, Context& to) { emu_switch(&from.sp, to.sp); }
inline void ctx_make(Context& c, char* stack, size_t size, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;           // entry's return address slot (never returns)
    *--sp = (void*)entry;      // popped by emu_switch's ret
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
EMU_NO_TSAN_FRAME inline void ctx_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void ctx_make(Context& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

// A cp.async copy in flight: done when its thread waits for its group.
struct CpAsync {
    void* dst;
    const void* src;
    unsigned bytes;
    bool valid;     // false: zero-fill, src not read
    unsigned group;  // the commit group it belongs to
};

// A warpgroup MMA (common.cuh's wgmma_m64k16) queued until its thread waits
// for its group: d's `regs` accumulators, the operands' descriptors, and the
// conversion of the storage type's bits.
struct Wgmma {
    float* d;
    int regs;
    uint64_t a, b;
    float (*to_f32)(unsigned short);
    unsigned group;
};

struct Fiber {
    Context ctx;
    char* stack = nullptr;
    void* tsan = nullptr;  // its ThreadSanitizer fiber (-fsanitize=thread)
    State st = RUN;
    dim3 tid;  // its threadIdx
    uint64_t xval = 0, xres = 0;
    int xsrc = 0;
    int xkind = 0;  // 0 plain warp barrier, 1 exchange
    void* fake = nullptr;
    const void* published = nullptr;  // this lane's share of a warp collective (emu_warp_publish)
    std::vector<CpAsync> copies;  // this thread's cp.async copies not yet waited for
    unsigned committed = 0;       // its commit groups so far (the open one's number)
    std::vector<Wgmma> wgmmas;    // its warpgroup MMAs not yet waited for
    unsigned wgmma_committed = 0;  // their commit groups so far
    bool wgmma_fenced = false;     // a wgmma_fence since its last wgmma_wait
    bool proxy_dirty = false;      // cp.async copies landed since its last fence.proxy.async
    // Shared addresses given out for descriptors (emu_smem_address): the
    // descriptor's 14-bit field, and the memory it stands for.
    std::vector<std::pair<unsigned, const char*>> smem_addrs;
    // Happens-before bookkeeping (see "ThreadSanitizer" below): barriers of
    // each kind passed so far, the cluster barrier's sync object, and the
    // fence / atomic pairing.
    unsigned bars = 0, warp_bars = 0, cluster_bars = 0;
    const void* cluster_obj = nullptr;
    bool fenced = false;
    const void* last_atomic = nullptr;
    bool started = false;  // switched to in this block yet
};
constexpr size_t STACK = 256 * 1024;
// This OS thread's fibers, as many as its largest block so far. A pointer,
// not a vector: a thread_local with a destructor is reached through an
// initialisation check at each use, and this one is used at every scheduling
// point. Cluster threads give theirs back (give_back_stacks); a thread that
// launches kernels keeps its own until the process ends.
inline thread_local Fiber* fibers = nullptr;
inline thread_local int fiber_count = 0;
inline thread_local Context sched;
inline thread_local int cur = 0;
inline thread_local std::function<void()> body;
inline thread_local const void* main_bottom = nullptr;
inline thread_local size_t main_size = 0;
inline thread_local void* sched_fake = nullptr;
inline thread_local bool reverse_order = false;
inline thread_local long switches = 0;

// Fiber stacks of finished cluster threads, for the next cluster's: a block's
// threads are up to 1024 stacks of 256 KiB, and mapping fresh ones for every
// block of every cluster would take most of an emulated run.
inline std::mutex stack_pool_mu;
inline std::vector<char*> stack_pool;

inline char* take_stack() {
    {
        std::lock_guard<std::mutex> lock(stack_pool_mu);
        if (!stack_pool.empty()) {
            char* s = stack_pool.back();
            stack_pool.pop_back();
            return s;
        }
    }
    return (char*)malloc(STACK);
}

// This OS thread's fibers are done: their stacks go back to the pool.
inline void give_back_stacks() {
    std::lock_guard<std::mutex> lock(stack_pool_mu);
    for (int i = 0; i < fiber_count; ++i) {
        if (fibers[i].stack) stack_pool.push_back(fibers[i].stack);
#if EMU_TSAN
        __tsan_destroy_fiber(fibers[i].tsan);
#endif
    }
    delete[] fibers;
    fibers = nullptr;
    fiber_count = 0;
}

// The blocks of one cluster, each on its own OS thread.
struct Cluster {
    unsigned size = 1;
    std::mutex mu;
    std::condition_variable cv;
    unsigned started = 0;        // blocks whose shared memory is known (anchors)
    unsigned arrived = 0;        // blocks at the current barrier
    unsigned exited = 0;         // blocks that have finished
    unsigned long generation = 0;  // barriers released so far
    std::vector<char*> anchors;  // per rank: its OS thread's smem_anchor
    char sync[2];                // cluster barriers' sync objects (TSan), used alternately
};
inline thread_local Cluster* cluster = nullptr;
inline thread_local unsigned cluster_rank = 0;
// Every __shared__ array is a thread_local of the same module as this one, at
// the same offset from it in every OS thread (a module's thread-local block
// is one copy of one image): the anchors' difference maps one block's
// shared address to another's.
inline thread_local char smem_anchor = 0;

[[noreturn]] inline void fail(const char* what) {
    fprintf(stderr, "EMULATOR ERROR: %s (block %u,%u,%u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z);
    abort();
}

// ThreadSanitizer (a -fsanitize=thread build) as the GPU's race checker.
// Every thread of a block is a TSan fiber, switched to and from without
// synchronisation, so TSan sees no order between two threads of a block, or
// of a cluster (its blocks run on OS threads of their own), except the edges
// the CUDA memory model gives, added here by hand:
// - __syncthreads and cluster barriers (arrive releases, wait acquires: the
//   two halves of cluster_sync_around stay apart; the relaxed arrive releases
//   nothing), __syncwarp (and the warp collectives built on it: WMMA,
//   mma.sync, ldmatrix); shuffles give none;
// - a __threadfence before an atomic makes it a release, one after it an
//   acquire of what earlier releasing atomics at that address published;
// - cp.async writes its stage at the issuing thread's wait (emu_cp_async).
// So a missing barrier, a read of another lane's shared memory after only a
// shuffle, a DSMEM read before the cluster barrier, or a global store between
// its arrive and wait that another block of the cluster reads, are reported
// as data races, whatever the order the emulator ran them in
// (race_selftest.cpp checks each). What it cannot see: races between blocks
// outside one cluster. Blocks (clusters) run one after another, each ordered
// after the last: TSan hands a finished thread's identity, clock included, on
// to a new thread, so a barrier in a later block would order it after the
// earlier ones anyway. The emulator's own bookkeeping (fiber states, shuffle
// values, DSMEM anchors) is hidden from TSan.
inline void hb_release(const void* p) {
#if EMU_TSAN
    __tsan_release(const_cast<void*>(p));
#else
    (void)p;
#endif
}
inline void hb_acquire(const void* p) {
#if EMU_TSAN
    __tsan_acquire(const_cast<void*>(p));
#else
    (void)p;
#endif
}
// For the current TSan thread or fiber: its accesses (and with `sync` its
// mutexes) are not seen from construction to destruction.
struct Hidden {
    bool sync;
    explicit Hidden(bool sync_too = false) : sync(sync_too) {
#if EMU_TSAN
        AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
        AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
        if (sync) AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
#endif
    }
    ~Hidden() {
#if EMU_TSAN
        if (sync) AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
        AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
        AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
#endif
    }
    Hidden(const Hidden&) = delete;
};
// Sync objects of the block this OS thread runs: its barrier (two, used
// alternately: a thread past barrier k may reach k + 1 before a slower one
// has acquired k's), each warp's __syncwarp, and the block's end, which the
// scheduler acquires, and hands on to the next block's threads as their
// first switch's.
struct BlockSync {
    char barrier[2];
    char warp[32][2];
    char done;
};
inline thread_local BlockSync block_sync;
inline thread_local void* sched_tsan = nullptr;

EMU_NO_TSAN_FRAME inline void to_sched(bool finishing) {
#if EMU_TSAN
    __tsan_switch_to_fiber(sched_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if EMU_ASAN
    __sanitizer_start_switch_fiber(finishing ? nullptr : &fibers[cur].fake, main_bottom, main_size);
#endif
    ctx_switch(fibers[cur].ctx, sched);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fibers[cur].fake, nullptr, nullptr);
#endif
}

// Out of line: the trampoline's frame never returns, so it keeps no
// sanitizer-instrumented locals of its own.
[[gnu::noinline]] inline void check_thread_end() {
    if (!fibers[cur].wgmmas.empty()) fail("a thread exited with warpgroup MMAs not waited for");
}

EMU_NO_TSAN_ENTRY inline void trampoline() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &main_bottom, &main_size);
#endif
    body();
    check_thread_end();
    fibers[cur].st = DONE;
    hb_release(&block_sync.done);
    to_sched(true);
}

inline dim3 tid_of(int i) {
    return dim3(i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y));
}

// Every thread of this block is at cluster_sync: waits for the cluster's
// other blocks to get there.
inline void cluster_arrive_and_wait() {
    Cluster& c = *cluster;
    std::unique_lock<std::mutex> lock(c.mu);
    const unsigned long gen = c.generation;
    if (c.exited == 0 && ++c.arrived == c.size) {
        c.arrived = 0;
        ++c.generation;
        c.cv.notify_all();
        return;
    }
    c.cv.wait(lock, [&] { return c.generation != gen || c.exited > 0; });
    if (c.generation == gen) fail("cluster barrier not reached by a block of the cluster that exited");
}

// The scheduling loop of run_block, until every thread of the block is done.
inline void schedule_block() {
    const Hidden hidden;  // the scheduler's own accesses
    const int n = blockDim.x * blockDim.y * blockDim.z;
    if (fiber_count < n) {
        Fiber* grown = new Fiber[n];
        std::copy(fibers, fibers + fiber_count, grown);  // with their stacks
#if EMU_TSAN
        for (int i = fiber_count; i < n; ++i) grown[i].tsan = __tsan_create_fiber(0);
#endif
        delete[] fibers;
        fibers = grown;
        fiber_count = n;
    }
    // Locals, not thread_locals, in the scheduling loop below.
    Fiber* const fibers = emu::fibers;
    const bool reverse_order = emu::reverse_order;
#if EMU_TSAN
    sched_tsan = __tsan_get_current_fiber();
#endif
    for (int i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        if (!f.stack) f.stack = take_stack();
        ctx_make(f.ctx, f.stack, STACK, trampoline);
        f.tid = tid_of(i);
        f.st = RUN;
        f.copies.clear();  // a thread that exited without waiting: never completed
        f.committed = 0;
        f.wgmmas.clear();
        f.wgmma_committed = 0;
        f.wgmma_fenced = f.proxy_dirty = false;
        f.smem_addrs.clear();
        f.bars = f.warp_bars = f.cluster_bars = 0;
        f.fenced = false;
        f.last_atomic = nullptr;
        f.started = false;
    }
    for (;;) {
        for (int k = 0; k < n; ++k) {
            int i = reverse_order ? n - 1 - k : k;
            if (fibers[i].st != RUN) continue;
            cur = i;
            threadIdx = fibers[i].tid;
            ++switches;
#if EMU_TSAN
            // The first switch of a block orders the thread after everything
            // this OS thread has seen (earlier blocks, the host's writes).
            __tsan_switch_to_fiber(fibers[i].tsan,
                                   fibers[i].started ? __tsan_switch_to_fiber_no_sync : 0);
            fibers[i].started = true;
#endif
#if EMU_ASAN
            __sanitizer_start_switch_fiber(&sched_fake, fibers[i].stack, STACK);
#endif
            ctx_switch(sched, fibers[i].ctx);
#if EMU_ASAN
            __sanitizer_finish_switch_fiber(sched_fake, nullptr, nullptr);
#endif
        }
        int done = 0;
        for (int i = 0; i < n; ++i) done += fibers[i].st == DONE;
        if (done == n) return;
        bool progressed = false;
        for (int w = 0; w * 32 < n; ++w) {
            int lo = w * 32, hi = std::min(n, lo + 32);
            int nwarp = 0, ndone = 0, nbar = 0;
            for (int i = lo; i < hi; ++i) {
                nwarp += fibers[i].st == WARP;
                ndone += fibers[i].st == DONE;
                nbar += fibers[i].st == BARRIER || fibers[i].st == CLUSTER;
            }
            if (nwarp == 0) continue;
            if (nbar) fail("warp shuffle and a block or cluster barrier mixed in one warp");
            if (ndone) fail("warp shuffle with exited lanes");
            if (hi - lo != 32) fail("warp shuffle in a partial warp");
            int kind = fibers[lo].xkind;
            for (int i = lo; i < hi; ++i) {
                if (fibers[i].xkind != kind) fail("different warp collectives in one warp");
            }
            for (int i = lo; i < hi; ++i) {
                int src = fibers[i].xsrc;
                if (src < 0 || src >= 32) fail("shuffle source out of range");
                fibers[i].xres = fibers[lo + src].xval;
            }
            for (int i = lo; i < hi; ++i) fibers[i].st = RUN;
            progressed = true;
        }
        if (progressed) continue;
        int ncluster = 0;
        for (int i = 0; i < n; ++i) ncluster += fibers[i].st == CLUSTER;
        if (ncluster > 0) {
            if (ncluster != n) fail("cluster barrier not reached by every thread of the block");
            cluster_arrive_and_wait();
            for (int i = 0; i < n; ++i) fibers[i].st = RUN;
            continue;
        }
        for (int i = 0; i < n; ++i) {
            if (fibers[i].st != BARRIER && fibers[i].st != DONE) fail("deadlock");
        }
        for (int i = 0; i < n; ++i) {
            if (fibers[i].st == BARRIER) fibers[i].st = RUN;
        }
    }
}

// Runs the current block (blockIdx) to its end, every thread a fiber.
inline void run_block() {
    schedule_block();
    hb_acquire(&block_sync.done);  // the block's accesses are this OS thread's past
}

// Runs `kernel` over `grid`; with `clusters` (each dimension dividing the
// grid's) the blocks of each cluster at once, one OS thread each.
template <class F>
void launch(dim3 grid, dim3 block, F kernel, dim3 clusters = dim3(1, 1, 1)) {
    const unsigned size = clusters.x * clusters.y * clusters.z;
    if (size == 1) {
        gridDim = grid;
        blockDim = block;
        body = kernel;
        cluster = nullptr;
        for (unsigned z = 0; z < grid.z; ++z)
            for (unsigned y = 0; y < grid.y; ++y)
                for (unsigned x = 0; x < grid.x; ++x) {
                    blockIdx = dim3(x, y, z);
                    run_block();
                }
        return;
    }
    if (grid.x % clusters.x || grid.y % clusters.y || grid.z % clusters.z) {
        fail("cluster dimensions do not divide the grid");
    }
    const bool reverse = reverse_order;
    for (unsigned z0 = 0; z0 < grid.z; z0 += clusters.z)
        for (unsigned y0 = 0; y0 < grid.y; y0 += clusters.y)
            for (unsigned x0 = 0; x0 < grid.x; x0 += clusters.x) {
                Cluster c;
                c.size = size;
                c.anchors.assign(size, nullptr);
                std::vector<std::thread> blocks;
                for (unsigned rank = 0; rank < size; ++rank) {
                    blocks.emplace_back([&, rank, x0, y0, z0] {
                        gridDim = grid;
                        blockDim = block;
                        body = kernel;
                        reverse_order = reverse;
                        cluster = &c;
                        cluster_rank = rank;
                        const unsigned cx = rank % clusters.x;
                        const unsigned cy = rank / clusters.x % clusters.y;
                        const unsigned cz = rank / (clusters.x * clusters.y);
                        blockIdx = dim3(x0 + cx, y0 + cy, z0 + cz);
                        {
                            // A cluster's blocks start together, as on the GPU:
                            // none runs before every one's shared memory is known.
                            std::unique_lock<std::mutex> lock(c.mu);
                            c.anchors[rank] = &smem_anchor;
                            if (++c.started == c.size) c.cv.notify_all();
                            c.cv.wait(lock, [&] { return c.started == c.size; });
                        }
                        run_block();
                        {
                            std::lock_guard<std::mutex> lock(c.mu);
                            ++c.exited;
                        }
                        c.cv.notify_all();
                        give_back_stacks();
                    });
                }
                for (std::thread& t : blocks) t.join();
            }
}
}  // namespace emu

inline void __syncthreads() {
    emu::Fiber& f = emu::fibers[emu::cur];
    const char* const sync = &emu::block_sync.barrier[f.bars++ & 1];
    emu::hb_release(sync);
    f.st = emu::BARRIER;
    emu::to_sched(false);
    emu::hb_acquire(sync);
}

inline unsigned emu_cluster_blocks() { return emu::cluster ? emu::cluster->size : 1; }
inline unsigned emu_cluster_rank() { return emu::cluster_rank; }
// A cluster barrier; `release`: its arrive publishes this thread's writes,
// `acquire`: its wait takes the other threads' (else emu_cluster_acquire
// does, later).
inline void emu_cluster_sync(bool release = true, bool acquire = true) {
    if (!emu::cluster) {
        __syncthreads();
        return;
    }
    emu::Fiber& f = emu::fibers[emu::cur];
    f.cluster_obj = &emu::cluster->sync[f.cluster_bars++ & 1];
    if (release) emu::hb_release(f.cluster_obj);
    f.st = emu::CLUSTER;
    emu::to_sched(false);
    if (acquire) emu::hb_acquire(f.cluster_obj);
}
inline void emu_cluster_acquire() {
    if (emu::cluster) emu::hb_acquire(emu::fibers[emu::cur].cluster_obj);
}
// `p`, an address of this block's __shared__ arrays, in the cluster's block
// of rank `rank` (read after a cluster_sync, which ordered that block's
// writes).
inline const void* emu_cluster_map(const void* p, unsigned rank) {
    if (rank >= emu_cluster_blocks()) emu::fail("cluster rank out of range");
    if (!emu::cluster) return p;
    char* other;
    {
        const emu::Hidden hidden(true);  // no order from the emulator's mutex
        std::lock_guard<std::mutex> lock(emu::cluster->mu);
        other = emu::cluster->anchors[rank];
    }
    return other + ((const char*)p - &emu::smem_anchor);
}

// The fibers of a block take turns at scheduling points only, and a
// cluster's blocks meet at its barriers, so memory is coherent whenever it is
// read: fences order nothing here and L1-bypassing loads are plain loads.
// Atomics are atomic (the blocks of a cluster run on OS threads of their
// own). For TSan a fence before an atomic makes the atomic a release, and one
// after an atomic acquires what was released there.
inline void __threadfence() {
    emu::Fiber& f = emu::fibers[emu::cur];
    if (f.last_atomic) emu::hb_acquire(f.last_atomic);
    f.fenced = true;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    emu::Fiber& f = emu::fibers[emu::cur];
    if (f.fenced) emu::hb_release(p);
    f.last_atomic = p;
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float __ldcg(const float* p) { return *p; }
inline float4 __ldcg(const float4* p) { return *p; }

// cp.async (common.cuh's cp_async16 / cp_async8): the destination may change
// from the moment the copy is issued until its thread waits for its group, so
// here it is poisoned at issue (0xff bytes: NaN in every storage type; for
// TSan a write then) and gets its data at the wait, the latest the PTX
// contract allows. Reading a stage before its wait (or without a barrier after
// it, when another thread issued the copy) gives NaN here, and so does a copy
// issued into a stage some thread is still reading (an MMA not yet waited
// for, a barrier missing); TSan reports the latter as a race whatever the
// values.
inline void emu_cp_async(void* dst, const void* src, unsigned bytes, bool valid) {
    emu::Fiber& f = emu::fibers[emu::cur];
    // Through a pointer: a memset of known size is expanded into stores the
    // race checker does not see.
    static void* (*const volatile poison)(void*, int, size_t) = memset;
    poison(dst, 0xff, bytes);
    f.copies.push_back(emu::CpAsync{dst, src, bytes, valid, f.committed});
}
inline void emu_cp_async_commit() { ++emu::fibers[emu::cur].committed; }
// cp.async.wait_group: every committed group but the newest `pending` is done.
inline void emu_cp_async_wait(unsigned pending) {
    emu::Fiber& f = emu::fibers[emu::cur];
    size_t kept = 0;
    for (const emu::CpAsync& c : f.copies) {
        if (c.group + pending < f.committed) {
            f.proxy_dirty = true;
            if (c.valid) {
                memcpy(c.dst, c.src, c.bytes);
            } else {
                memset(c.dst, 0, c.bytes);
            }
        } else {
            f.copies[kept++] = c;
        }
    }
    f.copies.resize(kept);
}

// Warpgroup MMA (common.cuh's wgmma_*). A descriptor's start address is the
// low 18 bits of the host address (whose alignment is the GPU's: the
// swizzles XOR address bits), mapped back to the memory through the
// thread's table. An MMA is queued at issue and performed when its thread
// waits for its group, reading shared memory then; each thread computes its
// own accumulators (warp w of the warpgroup: rows 16 w + lane / 4 (+ 8),
// the m16n8 C layout along N), summing an output's 16 products in k order
// (as mma_16816). It aborts on an MMA issued without a wgmma_fence since the
// thread's last wait, or after cp.async copies landed without a
// fence.proxy.async, and on descriptors it does not model.
inline unsigned emu_smem_address(const void* p) {
    auto& table = emu::fibers[emu::cur].smem_addrs;
    const unsigned field = (unsigned)(((uintptr_t)p & 0x3FFFF) >> 4);
    bool found = false;
    for (auto& e : table) {
        if (e.first == field) {
            e.second = static_cast<const char*>(p);
            found = true;
        }
    }
    if (!found) table.emplace_back(field, static_cast<const char*>(p));
    return (unsigned)(uintptr_t)p;
}
inline void emu_fence_proxy_async() { emu::fibers[emu::cur].proxy_dirty = false; }
inline void emu_wgmma_fence() { emu::fibers[emu::cur].wgmma_fenced = true; }
inline void emu_wgmma_commit() { ++emu::fibers[emu::cur].wgmma_committed; }
inline void emu_wgmma(float* d, int regs, uint64_t a, uint64_t b, float (*to_f32)(unsigned short)) {
    emu::Fiber& f = emu::fibers[emu::cur];
    if (!f.wgmma_fenced) emu::fail("wgmma.mma_async without a wgmma.fence since the last wait");
    if (f.proxy_dirty) emu::fail("wgmma.mma_async after cp.async copies landed, without fence.proxy.async");
    f.wgmmas.push_back(emu::Wgmma{d, regs, a, b, to_f32, f.wgmma_committed});
}
// A K-major operand (16-bit elements) as its descriptor gives it.
struct EmuWgmmaOperand {
    const char* start;
    uintptr_t width;  // bytes per swizzled row: 128, 64 or 32
    uintptr_t sbo;    // bytes between 8-row groups
    float (*to_f32)(unsigned short);

    EmuWgmmaOperand(uint64_t desc, float (*conv)(unsigned short)) : start(nullptr), to_f32(conv) {
        const unsigned swizzle = (unsigned)(desc >> 62);
        if (swizzle == 0) emu::fail("wgmma: operands without a swizzle are not modelled");
        if ((desc >> 49) & 7) emu::fail("wgmma: a matrix base offset is not modelled");
        const unsigned field = (unsigned)(desc & 0x3FFF);
        for (const auto& e : emu::fibers[emu::cur].smem_addrs) {
            if (e.first == field) start = e.second;
        }
        if (!start) emu::fail("wgmma descriptor whose start address smem_address did not give");
        width = 256u >> swizzle;
        sbo = ((desc >> 32) & 0x3FFF) << 4;
    }
    // Element (row, k), k < 16: the row's byte, then the swizzle's XOR of
    // address bits 4.. with bits 7...
    float operator()(int row, int k) const {
        uintptr_t at = (uintptr_t)start + (row / 8) * sbo + (row % 8) * width + 2 * k;
        at ^= ((at >> 7) & (width / 16 - 1)) << 4;
        unsigned short bits;
        memcpy(&bits, reinterpret_cast<const void*>(at), 2);
        return to_f32(bits);
    }
};
inline void emu_wgmma_run(const emu::Wgmma& op) {
    const EmuWgmmaOperand a(op.a, op.to_f32), b(op.b, op.to_f32);
    const int warp = (emu::cur >> 5) & 3, g = (emu::cur & 31) / 4, t = emu::cur & 3;
    for (int r = 0; r < op.regs; ++r) {
        const int j = r / 4, e = r % 4;
        const int row = 16 * warp + g + 8 * (e / 2), col = 8 * j + 2 * t + e % 2;
        float acc = op.d[r];
        for (int k = 0; k < 16; ++k) {
            acc = fmaf(a(row, k), b(col, k), acc);
        }
        op.d[r] = acc;
    }
}
// wgmma.wait_group: every committed group but the newest `pending` is done.
inline void emu_wgmma_wait(unsigned pending) {
    emu::Fiber& f = emu::fibers[emu::cur];
    size_t kept = 0;
    for (size_t i = 0; i < f.wgmmas.size(); ++i) {
        const emu::Wgmma op = f.wgmmas[i];
        if (op.group + pending < f.wgmma_committed) {
            emu_wgmma_run(op);
        } else {
            f.wgmmas[kept++] = op;
        }
    }
    f.wgmmas.resize(kept);
    f.wgmma_fenced = false;
}

inline void __syncwarp(unsigned = 0xffffffffu) {
    auto& f = emu::fibers[emu::cur];
    const char* const sync = &emu::block_sync.warp[emu::cur >> 5][f.warp_bars++ & 1];
    emu::hb_release(sync);
    f.st = emu::WARP;
    f.xkind = 0;
    f.xsrc = 0;
    emu::to_sched(false);
    emu::hb_acquire(sync);
}

template <class T>
inline T emu_exchange(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 8, "");
    if (mask != 0xffffffffu) emu::fail("partial shuffle mask");
    auto& f = emu::fibers[emu::cur];
    f.xval = 0;
    memcpy(&f.xval, &v, sizeof(T));
    f.xsrc = src;
    f.xkind = 1;
    f.st = emu::WARP;
    emu::to_sched(false);
    T r;
    memcpy(&r, &emu::fibers[emu::cur].xres, sizeof(T));
    return r;
}

// Warp collectives that read other lanes' registers or addresses (WMMA,
// mma.sync, ldmatrix): every lane publishes a pointer to its share, reads
// the others' with emu_warp_peer once all 32 have, and calls emu_warp_done
// before its share goes out of scope or is published again.
inline int emu_lane() { return emu::cur & 31; }
inline void emu_warp_publish(const void* mine) {
    emu::fibers[emu::cur].published = mine;
    __syncwarp();
}
inline const void* emu_warp_peer(int lane) { return emu::fibers[(emu::cur & ~31) + lane].published; }
inline void emu_warp_done() { __syncwarp(); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src) {
    return emu_exchange(mask, v, src & 31);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    int lane = (threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y) & 31;
    return emu_exchange(mask, v, lane ^ lane_mask);
}

// ---------------------------------------------------------------- WMMA
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}

// f32 to TF32 as cvt.rna.tf32.f32 does it: round to nearest, ties away from
// zero, to 10 mantissa bits; the result is an f32 with the low 13 bits zero.
// Infinities stay; a NaN stays a (quiet) NaN. Rounding the magnitude's bits up
// by half a TF32 step is exactly that, subnormals included; a carry into the
// exponent, up to infinity, is the right rounding too.
inline float __float_to_tf32(float in) {
    const unsigned x = emu_float_bits(in);
    if ((x & 0x7f800000u) == 0x7f800000u) {
        return (x & 0x7fffffu) ? __uint_as_float((x | 0x400000u) & 0xffffe000u) : in;
    }
    return __uint_as_float((x + 0x1000u) & 0xffffe000u);
}

// Shapes 16x16x16 (f16/bf16 A and B) and 16x16x8 (TF32 A and B); matrix_a is
// M x K, matrix_b K x N, an accumulator M x N. Lane l holds elements
// n l .. n l + n - 1 of the row-major tile, n = tile elements / 32: 8 of an
// accumulator or a 16x16 A/B tile, 4 of a 16x8 (8x16) TF32 A (B) tile.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && (K == 16 || K == 8),
                  "the emulator has 16x16x16 and 16x16x8 WMMA only");
    static_assert(std::is_same<Use, accumulator>::value ||
                      (K == 8) == std::is_same<T, precision::tf32>::value,
                  "16x16x8 is the TF32 shape, TF32 has no other");
    static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
    static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
    static constexpr int num_elements = rows * cols / 32;
    float x[num_elements];
};

// What a fragment of element type T is loaded from: T, or float for TF32.
template <class T>
struct emu_memory {
    typedef T type;
};
template <>
struct emu_memory<precision::tf32> {
    typedef float type;
};

inline void emu_check_wmma(const void* p, unsigned ldm, size_t elem_bytes) {
    if ((uintptr_t)p % 32 != 0) emu::fail("WMMA pointer not 32-byte aligned");
    if ((ldm * elem_bytes) % 16 != 0) emu::fail("WMMA leading dimension not a multiple of 16 bytes");
}

// TF32 elements are loaded as the f32 values they are (as on the GPU): the
// kernel must round them (__float_to_tf32) before mma_sync, which checks it.
template <class Use, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, K, T, L>& f,
                             const typename emu_memory<T>::type* p, unsigned ldm) {
    static_assert(std::is_same<L, row_major>::value || std::is_same<L, col_major>::value,
                  "matrix_a / matrix_b fragments have a layout");
    typedef fragment<Use, 16, 16, K, T, L> F;
    emu_check_wmma(p, ldm, sizeof(*p));
    __syncwarp();
    const int lane = emu_lane();
    for (int i = 0; i < F::num_elements; ++i) {
        const int e = lane * F::num_elements + i, r = e / F::cols, c = e % F::cols;
        f.x[i] = emu_to_float(std::is_same<L, col_major>::value ? p[c * ldm + r] : p[r * ldm + c]);
    }
}

template <int K>
inline void fill_fragment(fragment<accumulator, 16, 16, K, float>& f, float v) {
    for (int i = 0; i < 8; ++i) f.x[i] = v;
}

template <int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f,
                              unsigned ldm, layout_t layout) {
    emu_check_wmma(p, ldm, sizeof(float));
    __syncwarp();
    const int lane = emu_lane();
    for (int i = 0; i < 8; ++i) {
        const int e = lane * 8 + i, r = e / 16, c = e % 16;
        p[layout == mem_col_major ? c * ldm + r : r * ldm + c] = f.x[i];
    }
}

// d = a b + c, f32 sums in k order. d may be c. TF32 A and B elements must be
// TF32 values (low 13 bits zero): anything else is undefined on the GPU.
template <int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, K, float>& d,
                     const fragment<matrix_a, 16, 16, K, T, LA>& a,
                     const fragment<matrix_b, 16, 16, K, T, LB>& b,
                     const fragment<accumulator, 16, 16, K, float>& c) {
    constexpr int n = K / 2;  // A and B elements per lane
    if (std::is_same<T, precision::tf32>::value) {
        for (int i = 0; i < n; ++i) {
            if ((emu_float_bits(a.x[i]) | emu_float_bits(b.x[i])) & 0x1fffu) {
                emu::fail("TF32 WMMA operand not rounded with __float_to_tf32");
            }
        }
    }
    const float* const mine[2] = {a.x, b.x};
    emu_warp_publish(mine);
    const auto peer = [](int l) { return static_cast<const float* const*>(emu_warp_peer(l)); };
    const int lane = emu_lane();
    float out[8];
    for (int i = 0; i < 8; ++i) {
        const int e = lane * 8 + i, r = e / 16, col = e % 16;
        float acc = c.x[i];
        for (int k = 0; k < K; ++k) {
            const int ea = r * K + k, eb = k * 16 + col;
            acc = std::fma(peer(ea / n)[0][ea % n], peer(eb / n)[1][eb % n], acc);
        }
        out[i] = acc;
    }
    emu_warp_done();
    for (int i = 0; i < 8; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda
