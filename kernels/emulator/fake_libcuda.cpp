// A stand-in libcuda.so.1 for machines without a GPU: the CUDA driver calls
// the crate makes (through cudarc), with "device" memory in host memory and
// every kernel launch run at once by the CPU emulator (emu.h), so the CUDA
// backend's own tests (tests/cuda_ops.rs) run end to end: host planning,
// parameter structs, the memory pool, copies and the kernels.
//
//   c++ -std=c++17 -g1 -O2 -pthread -shared -fPIC -fvisibility=hidden -Wl,-Bsymbolic
//       fake_libcuda.cpp -o <dir>/libcuda.so.1
//   LD_LIBRARY_PATH=<dir>:$LD_LIBRARY_PATH <test binary>
//
// It reports one device, "Emulated GPU (CPU)", compute capability 9.0 with 132
// SMs (so the crate compiles for sm_90a and takes its warpgroup-MMA kernels),
// that launches thread-block clusters (emu.h runs a cluster's blocks at
// once, one OS thread each). Fresh allocations are filled with 0xff bytes (NaN as f32), so a kernel
// that reads memory nothing wrote produces NaN. Built with -fsanitize=address
// (and libasan preloaded into the process), out-of-bounds accesses of device
// memory abort. Kernels load from CUBINs the real NVRTC compiled (checked to be
// ELF images) and are looked up by name among the kernels of every storage
// type (kernels.h; the f32 compile has the TF32 tensor-core kernels, which the
// host compiles where it finds mma.h). Only what the crate calls exists;
// NVRTC itself asks for the private cuGetExportTable, which fails here, as it
// may on a real driver.
//
// With OUTPROJ_EMULATOR_TRACE set, every kernel run is printed to stderr with
// its grid, block and cluster size and the host time it took: a forward's
// launch list, in order, and where an emulated test spends its time.
//
// Stream capture records launches (with a copy of their parameters) instead of
// running them; a graph replay runs them in order. Allocations, copies,
// memsets and synchronisation on a capturing stream fail and invalidate the
// capture, as the crate promises never to do them there (the real driver
// would turn some into graph nodes; the emulator is stricter).
#include "kernels.h"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>


typedef int CUresult;
typedef int CUdevice;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUfunction;
typedef unsigned long long CUdeviceptr;

static int g_ctx_token = 1;
static thread_local CUcontext g_current = nullptr;

struct Entry {
    const char* name;
    void (*run)(void*);
    size_t params_size;
};
#define EMU_STR2(x) #x
#define EMU_STR(x) EMU_STR2(x)
#define K(ns, fn, sfx, P) \
    {EMU_STR(fn##sfx), [](void* p) { ns::fn##sfx(*(const ns::P*)p); }, sizeof(ns::P)}
#define KERNELS(ns, sfx)                                    \
    K(ns, linear_naive, sfx, LinearParams),                 \
    K(ns, linear_rows_vec4, sfx, LinearParams),             \
    K(ns, linear_rows_deep_vec4, sfx, LinearParams),        \
    K(ns, linear_rows_scalar, sfx, LinearParams),           \
    K(ns, layer_norm_linear_rows, sfx, LayerNormLinearParams), \
    K(ns, attention_linear_rows, sfx, AttentionLinearParams), \
    K(ns, layer_norm_naive, sfx, LayerNormParams),          \
    K(ns, layer_norm_warp_vec4, sfx, LayerNormParams),      \
    K(ns, layer_norm_warp_scalar, sfx, LayerNormParams),    \
    K(ns, attention_naive, sfx, AttentionParams),           \
    K(ns, attention_flash_d32, sfx, AttentionParams),       \
    K(ns, attention_flash_d64, sfx, AttentionParams),       \
    K(ns, attention_flash_d128, sfx, AttentionParams),      \
    K(ns, attention_flash_d32_q16, sfx, AttentionParams),   \
    K(ns, attention_flash_d64_q16, sfx, AttentionParams),   \
    K(ns, attention_flash_d128_q16, sfx, AttentionParams),  \
    K(ns, attention_few_keys, sfx, AttentionParams),        \
    K(ns, attention_split_keys, sfx, AttentionParams),      \
    K(ns, attention_absorbed_naive, sfx, AbsorbedAttentionParams), \
    K(ns, attention_absorbed_rows, sfx, AbsorbedAttentionParams), \
    K(ns, alignment_loss_naive_rows, sfx, LossParams),      \
    K(ns, alignment_loss_naive_finish, sfx, LossParams),    \
    K(ns, alignment_loss_rows, sfx, LossParams),            \
    K(ns, alignment_loss_finish, sfx, LossParams),          \
    K(ns, gather_signal_tokens_naive, sfx, GatherParams),   \
    K(ns, gather_signal_tokens_vec4, sfx, GatherParams)
static Entry ENTRIES[] = {
    KERNELS(k_f32, ),
    KERNELS(k_f16, _f16),
    KERNELS(k_bf16, _bf16),
    K(k_f32, linear_tiled_vec4, , LinearParams),
    K(k_f32, linear_tiled_scalar, , LinearParams),
    K(k_f32, layer_norm_linear_tiled_vec4, , LayerNormLinearParams),
    K(k_f16, linear_tc_vec8, _f16, LinearParams),
    K(k_f16, linear_tc_scalar, _f16, LinearParams),
    K(k_bf16, linear_tc_vec8, _bf16, LinearParams),
    K(k_bf16, linear_tc_scalar, _bf16, LinearParams),
    K(k_f16, linear_tc_large_vec8, _f16, LinearParams),
    K(k_bf16, linear_tc_large_vec8, _bf16, LinearParams),
    K(k_f16, linear_mma_vec8, _f16, LinearParams),
    K(k_bf16, linear_mma_vec8, _bf16, LinearParams),
    K(k_f16, linear_mma_narrow_vec8, _f16, LinearParams),
    K(k_bf16, linear_mma_narrow_vec8, _bf16, LinearParams),
    K(k_f16, layer_norm_linear_tc_vec8, _f16, LayerNormLinearParams),
    K(k_bf16, layer_norm_linear_tc_vec8, _bf16, LayerNormLinearParams),
    K(k_f16, linear_layer_norm_mma_vec8, _f16, LinearLayerNormParams),
    K(k_bf16, linear_layer_norm_mma_vec8, _bf16, LinearLayerNormParams),
    K(k_f16, linear_wgmma_vec8, _f16, LinearParams),
    K(k_bf16, linear_wgmma_vec8, _bf16, LinearParams),
    K(k_f16, linear_wgmma_narrow_vec8, _f16, LinearParams),
    K(k_bf16, linear_wgmma_narrow_vec8, _bf16, LinearParams),
    K(k_f16, linear_wgmma_serial_vec8, _f16, LinearParams),
    K(k_bf16, linear_wgmma_serial_vec8, _bf16, LinearParams),
    K(k_f16, linear_wgmma_serial_narrow_vec8, _f16, LinearParams),
    K(k_bf16, linear_wgmma_serial_narrow_vec8, _bf16, LinearParams),
    K(k_f16, linear_layer_norm_wgmma_vec8, _f16, LinearLayerNormParams),
    K(k_bf16, linear_layer_norm_wgmma_vec8, _bf16, LinearLayerNormParams),
    K(k_f16, attention_tc_d64, _f16, AttentionParams),
    K(k_f16, attention_tc_d128, _f16, AttentionParams),
    K(k_bf16, attention_tc_d64, _bf16, AttentionParams),
    K(k_bf16, attention_tc_d128, _bf16, AttentionParams),
    K(k_f32, linear_tc_tf32_vec4, , LinearParams),
    K(k_f32, linear_tc_tf32_scalar, , LinearParams),
    K(k_f32, linear_tc_tf32_large_vec4, , LinearParams),
};

// One recorded launch.
struct Node {
    Entry* entry;
    dim3 grid, block;
    std::vector<unsigned char> params;
    dim3 cluster;  // blocks per thread-block cluster (1 x 1 x 1: none)
};
struct Capture {
    std::vector<Node> nodes;
    bool invalidated = false;
    std::thread::id owner;  // the capturing thread (thread-local capture mode)
};
static std::mutex g_capture_mu;
static std::map<CUstream, Capture> g_captures;  // streams being captured

// The capture on `s`, if any (caller holds g_capture_mu).
static Capture* capture_of(CUstream s) {
    auto it = g_captures.find(s);
    return it == g_captures.end() ? nullptr : &it->second;
}
// CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED when `s` is capturing (and the capture
// is invalidated), else 0. Synchronous calls pass nullptr: they are refused
// while this thread captures (thread-local capture mode).
static CUresult refuse_in_capture(CUstream s) {
    std::lock_guard<std::mutex> g(g_capture_mu);
    if (s) {
        if (Capture* c = capture_of(s)) { c->invalidated = true; return 900; }
        return 0;
    }
    CUresult r = 0;
    for (auto& kv : g_captures) {
        if (kv.second.owner == std::this_thread::get_id()) {
            kv.second.invalidated = true;
            r = 900;
        }
    }
    return r;
}
static bool launch_shape_ok(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz) {
    return !(gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535 || bx * by * bz > 1024);
}
static void run_node(const Node& n) {
    static const bool trace = getenv("OUTPROJ_EMULATOR_TRACE") != nullptr;
    void* p = (void*)n.params.data();
    auto start = std::chrono::steady_clock::now();
    emu::launch(n.grid, n.block, [&] { n.entry->run(p); }, n.cluster);
    if (trace) {
        // The host time of each launch: where emulated tests spend theirs.
        double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        fprintf(stderr, "launch %s grid %u,%u,%u block %u,%u,%u cluster %u: %.1f ms\n", n.entry->name,
                n.grid.x, n.grid.y, n.grid.z, n.block.x, n.block.y, n.block.z,
                n.cluster.x * n.cluster.y * n.cluster.z, ms);
    }
}

extern "C" {
#pragma GCC visibility push(default)
CUresult cuInit(unsigned) { return 0; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return 0; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) { if (ordinal != 0) return 101; *d = 0; return 0; }
CUresult cuDeviceGetName(char* name, int len, CUdevice) { snprintf(name, len, "Emulated GPU (CPU)"); return 0; }
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
    case 75: *v = 9; break;    // compute capability major
    case 76: *v = 0; break;    // minor
    case 16: *v = 132; break;  // multiprocessors
    case 38: *v = 50 << 20; break;  // L2 bytes (an H100's)
    case 115: *v = 1; break;   // memory pools supported
    case 120: *v = 1; break;   // cluster launch
    default: *v = 0; break;
    }
    return 0;
}
CUresult cuDeviceTotalMem_v2(size_t* b, CUdevice) { *b = 80ull << 30; return 0; }
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) { *c = &g_ctx_token; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return 0; }
CUresult cuCtxGetCurrent(CUcontext* c) { *c = g_current; return 0; }
CUresult cuCtxSetCurrent(CUcontext c) { g_current = c; return 0; }
CUresult cuCtxSynchronize() { return refuse_in_capture(nullptr); }
CUresult cuStreamCreate(CUstream* s, unsigned) { *s = malloc(1); return 0; }
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned, int) { *s = malloc(1); return 0; }
CUresult cuStreamDestroy_v2(CUstream s) { free(s); return 0; }
CUresult cuStreamSynchronize(CUstream s) { return refuse_in_capture(s); }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return 0; }
// An event holds the host time of its last record: launches run at once, so
// the time between two records is the work's time.
CUresult cuEventCreate(CUevent* e, unsigned) { *e = new double(0); return 0; }
CUresult cuEventRecord(CUevent e, CUstream s) {
    if (CUresult r = refuse_in_capture(s)) return r;
    *(double*)e = std::chrono::duration<double, std::milli>(
                      std::chrono::steady_clock::now().time_since_epoch()).count();
    return 0;
}
CUresult cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) {
    *ms = (float)(*(double*)end - *(double*)start);
    return 0;
}
CUresult cuEventSynchronize(CUevent) { return 0; }
CUresult cuEventQuery(CUevent) { return 0; }
CUresult cuEventDestroy_v2(CUevent e) { delete (double*)e; return 0; }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream s) {
    if (CUresult r = refuse_in_capture(s)) return r;
    void* m = malloc(n ? n : 1);
    if (!m) return 2;
    memset(m, 0xff, n);  // NaN bytes: unwritten memory reads as NaN
    *p = (CUdeviceptr)m;
    return 0;
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    if (CUresult r = refuse_in_capture(nullptr)) return r;
    return cuMemAllocAsync(p, n, nullptr);
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    if (CUresult r = refuse_in_capture(s)) return r;
    free((void*)p);
    return 0;
}
CUresult cuMemFree_v2(CUdeviceptr p) { free((void*)p); return 0; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, CUstream st) {
    if (CUresult r = refuse_in_capture(st)) return r;
    memcpy((void*)d, s, n);
    return 0;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) { memcpy((void*)d, s, n); return 0; }
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, CUstream st) {
    if (CUresult r = refuse_in_capture(st)) return r;
    memcpy(d, (void*)s, n);
    return 0;
}
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) { memcpy(d, (void*)s, n); return 0; }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream st) {
    if (CUresult r = refuse_in_capture(st)) return r;
    memmove((void*)d, (void*)s, n);
    return 0;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream st) {
    if (CUresult r = refuse_in_capture(st)) return r;
    memset((void*)d, v, n);
    return 0;
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { memset((void*)d, v, n); return 0; }
CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    if (memcmp(image, "\x7f" "ELF", 4) != 0) return 200;  // not an ELF CUBIN
    *m = malloc(1);
    return 0;
}
CUresult cuModuleUnload(CUmodule m) { free(m); return 0; }
CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    for (auto& e : ENTRIES) {
        if (strcmp(e.name, name) == 0) { *f = &e; return 0; }
    }
    return 500;  // not found
}
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, CUstream s, void** params, void** extra);
// CUlaunchConfig and CUlaunchAttribute as cuda.h lays them out. The
// attributes taken: programmatic stream serialization (id 6) set to 1 (kernels
// run one after another here, which is one of the orders it allows, and each
// kernel's griddepcontrol.wait is compiled out), and cluster dimensions (id 4)
// of at most 8 blocks that divide the grid.
struct LaunchAttr {
    int id;
    char pad[4];
    union { char bytes[64]; int value; unsigned dims[3]; } v;
};
struct LaunchConfig {
    unsigned gx, gy, gz, bx, by, bz, smem;
    CUstream stream;
    LaunchAttr* attrs;
    unsigned num_attrs;
};
static_assert(sizeof(LaunchAttr) == 72, "CUlaunchAttribute");
static_assert(offsetof(LaunchConfig, stream) == 32 && sizeof(LaunchConfig) == 56, "CUlaunchConfig");
static CUresult launch(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                       unsigned bz, unsigned smem, CUstream s, void** params, void** extra, dim3 cluster);
CUresult cuLaunchKernelEx(const LaunchConfig* c, CUfunction f, void** params, void** extra) {
    if (!c || (c->num_attrs && !c->attrs)) return 1;
    dim3 cluster(1, 1, 1);
    for (unsigned i = 0; i < c->num_attrs; ++i) {
        const LaunchAttr& a = c->attrs[i];
        if (a.id == 6 && a.v.value == 1) continue;
        if (a.id != 4) return 1;
        const unsigned* d = a.v.dims;
        if (!d[0] || !d[1] || !d[2] || d[0] * d[1] * d[2] > 8 || c->gx % d[0] || c->gy % d[1] ||
            c->gz % d[2]) {
            return 1;  // CUDA_ERROR_INVALID_VALUE
        }
        cluster = dim3(d[0], d[1], d[2]);
    }
    return launch(f, c->gx, c->gy, c->gz, c->bx, c->by, c->bz, c->smem, c->stream, params, extra,
                  cluster);
}
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, CUstream s, void** params, void** extra) {
    return launch(f, gx, gy, gz, bx, by, bz, smem, s, params, extra, dim3(1, 1, 1));
}
#pragma GCC visibility pop
}
static CUresult launch(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                       unsigned bz, unsigned smem, CUstream s, void** params, void** extra, dim3 cluster) {
    if (!f || !params || extra || smem) return 1;
    if (!launch_shape_ok(gx, gy, gz, bx, by, bz)) return 1;
    Entry* e = (Entry*)f;
    Node n{e, dim3(gx, gy, gz), dim3(bx, by, bz), {}, cluster};
    const unsigned char* p = (const unsigned char*)params[0];
    n.params.assign(p, p + e->params_size);
    {
        std::lock_guard<std::mutex> g(g_capture_mu);
        if (Capture* c = capture_of(s)) {
            c->nodes.push_back(std::move(n));
            return 0;
        }
    }
    run_node(n);
    return 0;
}
extern "C" {
#pragma GCC visibility push(default)
typedef struct Graph { std::vector<Node> nodes; } *CUgraph;
typedef struct GraphExec { std::vector<Node> nodes; } *CUgraphExec;
CUresult cuStreamBeginCapture_v2(CUstream s, int) {
    if (!s) return 1;  // the legacy default stream cannot be captured
    std::lock_guard<std::mutex> g(g_capture_mu);
    if (capture_of(s)) return 900;
    Capture c;
    c.owner = std::this_thread::get_id();
    g_captures[s] = std::move(c);
    return 0;
}
CUresult cuStreamEndCapture(CUstream s, CUgraph* graph) {
    std::lock_guard<std::mutex> g(g_capture_mu);
    Capture* c = capture_of(s);
    if (!c) return 400;  // CUDA_ERROR_ILLEGAL_STATE
    Capture done = std::move(*c);
    g_captures.erase(s);
    *graph = nullptr;
    if (done.invalidated) return 901;  // CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
    *graph = new Graph{std::move(done.nodes)};
    return 0;
}
CUresult cuStreamIsCapturing(CUstream s, int* status) {
    std::lock_guard<std::mutex> g(g_capture_mu);
    Capture* c = capture_of(s);
    *status = !c ? 0 : c->invalidated ? 2 : 1;
    return 0;
}
CUresult cuGraphInstantiateWithFlags(CUgraphExec* exec, CUgraph graph, unsigned long long) {
    if (!graph) return 1;
    *exec = new GraphExec{graph->nodes};
    return 0;
}
CUresult cuGraphLaunch(CUgraphExec exec, CUstream s) {
    if (!exec) return 1;
    if (CUresult r = refuse_in_capture(s)) return r;
    for (const Node& n : exec->nodes) run_node(n);
    return 0;
}
CUresult cuGraphUpload(CUgraphExec exec, CUstream) { return exec ? 0 : 1; }
CUresult cuGraphExecDestroy(CUgraphExec exec) { delete exec; return 0; }
CUresult cuGraphDestroy(CUgraph graph) { delete graph; return 0; }
CUresult cuGetErrorName(CUresult r, const char** s) { *s = r ? "CUDA_ERROR_FAKE" : "CUDA_SUCCESS"; return 0; }
CUresult cuGetErrorString(CUresult r, const char** s) { *s = r ? "fake driver error" : "no error"; return 0; }
CUresult cuCtxGetDevice(CUdevice* d) { *d = 0; return 0; }
CUresult cuGetExportTable(const void** t, const void*) { *t = nullptr; return 801; }
#pragma GCC visibility pop
}
