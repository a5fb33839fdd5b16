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
// It reports one device, "Emulated GPU (CPU)", by default compute capability
// 9.0 with 132 SMs and an H100's L2 (so the crate compiles for sm_90a and takes
// its warpgroup-MMA kernels), that launches thread-block clusters (emu.h runs a
// cluster's blocks at once, one OS thread each). OUTPROJ_EMULATED_DEVICE names
// another (`sm_80`: an A100's 108 SMs and 40 MB of L2, no clusters; see
// `device_model`), so the host's choices for that device run end to end: a
// cluster or a programmatic-dependent launch below sm_90 is refused, and so is a
// kernel its CUBIN lacks (a warpgroup-MMA kernel outside sm_90a), as the real
// driver would. Fresh allocations are filled with 0xff bytes (NaN as f32), so
// a kernel that reads memory nothing wrote produces NaN. Built with
// -fsanitize=address (and libasan preloaded into the process), out-of-bounds
// accesses of device memory abort. Kernels load from CUBINs the real NVRTC
// compiled (checked to be ELF images for the device's architecture, and to
// name the kernel asked for among their symbols) and run the emulator's build
// of that kernel (kernels.h; the f32 compile has the TF32 tensor-core kernels,
// which the host compiles where it finds mma.h). Only what the crate calls
// exists; NVRTC itself asks for the private cuGetExportTable, which fails
// here, as it may on a real driver.
//
// With OUTPROJ_EMULATOR_TRACE set, every kernel run is printed to stderr with
// its grid, block and cluster size and the host time it took: a forward's
// launch list, in order, and where an emulated test spends its time. With
// OUTPROJ_EMULATOR_SKIP_KERNELS set, launches are checked and recorded as
// ever but no kernel runs (outputs are whatever memory held): what is left of
// a forward's time is the host's own, the crate's and cudarc's share of each
// launch without the real driver's.
//
// Stream capture records launches (with a copy of their parameters) instead of
// running them; a graph replay runs them in order. Allocations, copies,
// memsets and synchronisation on a capturing stream fail and invalidate the
// capture, as the crate promises never to do them there (the real driver
// would turn some into graph nodes; the emulator is stricter).
#include "kernels.h"
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

// The device reported: OUTPROJ_EMULATED_DEVICE, else an H100.
struct DeviceModel {
    const char* arch;
    int major, minor, sms, l2_mib;
    bool clusters;
};
static const DeviceModel MODELS[] = {
    {"sm_75", 7, 5, 40, 4, false},    // T4 (f32 only)
    {"sm_80", 8, 0, 108, 40, false},  // A100
    {"sm_86", 8, 6, 84, 6, false},    // RTX 3090
    {"sm_89", 8, 9, 58, 48, false},   // L4
    {"sm_90", 9, 0, 132, 50, true},   // H100
    {"sm_100", 10, 0, 148, 126, true},  // B200
    {"sm_120", 12, 0, 170, 96, true},   // RTX 5090
};
// The model named, or nullptr for a name not in MODELS (cuInit then fails).
// `sm_90:114` is that model with 114 SMs (an H100 PCIe).
static const DeviceModel* device_model() {
    static DeviceModel chosen;
    static const DeviceModel* model = [] () -> const DeviceModel* {
        const char* env = getenv("OUTPROJ_EMULATED_DEVICE");
        std::string name = env && *env ? env : "sm_90";
        int sms = 0;
        size_t colon = name.find(':');
        if (colon != std::string::npos) {
            sms = atoi(name.c_str() + colon + 1);
            name.resize(colon);
        }
        for (const DeviceModel& m : MODELS) {
            if (name == m.arch && (colon == std::string::npos || sms > 0)) {
                chosen = m;
                if (sms > 0) chosen.sms = sms;
                return &chosen;
            }
        }
        fprintf(stderr, "OUTPROJ_EMULATED_DEVICE=%s: not an emulated device\n", env);
        return nullptr;
    }();
    return model;
}

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
    static const bool skip = getenv("OUTPROJ_EMULATOR_SKIP_KERNELS") != nullptr;
    void* p = (void*)n.params.data();
    auto start = std::chrono::steady_clock::now();
    if (!skip) emu::launch(n.grid, n.block, [&] { n.entry->run(p); }, n.cluster);
    if (trace) {
        // The host time of each launch: where emulated tests spend theirs.
        double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        fprintf(stderr, "launch %s grid %u,%u,%u block %u,%u,%u cluster %u: %.1f ms\n", n.entry->name,
                n.grid.x, n.grid.y, n.grid.z, n.block.x, n.block.y, n.block.z,
                n.cluster.x * n.cluster.y * n.cluster.z, ms);
    }
}

// The length of the little-endian ELF64 image at `p`: the furthest end of its
// header tables and of its sections' contents; 0 if it is not one.
static size_t elf_bytes(const unsigned char* p) {
    if (!p || memcmp(p, "\x7f" "ELF", 4) != 0 || p[4] != 2 || p[5] != 1) return 0;
    auto u16 = [&](size_t o) { uint16_t v; memcpy(&v, p + o, 2); return (size_t)v; };
    auto u32 = [&](size_t o) { uint32_t v; memcpy(&v, p + o, 4); return (size_t)v; };
    auto u64 = [&](size_t o) { uint64_t v; memcpy(&v, p + o, 8); return (size_t)v; };
    size_t phoff = u64(0x20), shoff = u64(0x28);
    size_t phentsize = u16(0x36), phnum = u16(0x38), shentsize = u16(0x3a), shnum = u16(0x3c);
    if (shentsize < 0x28 || (shnum && shoff < 64)) return 0;
    size_t end = std::max<size_t>(64, std::max(phoff + phnum * phentsize, shoff + shnum * shentsize));
    for (size_t i = 0; i < shnum; ++i) {
        size_t h = shoff + i * shentsize;
        const uint32_t SHT_NOBITS = 8;
        if (u32(h + 4) != SHT_NOBITS) end = std::max(end, u64(h + 0x18) + u64(h + 0x20));
    }
    return end;
}

extern "C" {
#pragma GCC visibility push(default)
CUresult cuInit(unsigned) { return device_model() ? 0 : 100; }  // CUDA_ERROR_NO_DEVICE
CUresult cuDriverGetVersion(int* v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return 0; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) { if (ordinal != 0) return 101; *d = 0; return 0; }
CUresult cuDeviceGetName(char* name, int len, CUdevice) { snprintf(name, len, "Emulated GPU (CPU)"); return 0; }
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
    case 75: *v = device_model()->major; break;  // compute capability
    case 76: *v = device_model()->minor; break;
    case 16: *v = device_model()->sms; break;  // multiprocessors
    case 38: *v = device_model()->l2_mib << 20; break;  // L2 bytes
    case 115: *v = 1; break;   // memory pools supported
    case 120: *v = device_model()->clusters; break;  // cluster launch
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
    const unsigned char* p = (const unsigned char*)image;
    size_t bytes = elf_bytes(p);
    if (!bytes) return 200;  // CUDA_ERROR_INVALID_IMAGE: not a 64-bit ELF CUBIN
    // A CUBIN runs on its own major architecture at its minor or above:
    // e_flags holds the SM number (bits 8-15 from ELF ABI version 8, as
    // CUDA 13 writes; bits 0-7 before).
    uint32_t flags;
    memcpy(&flags, p + 0x30, 4);
    int sm = p[8] >= 8 ? (flags >> 8) & 0xff : flags & 0xff;
    const DeviceModel* d = device_model();
    if (sm / 10 != d->major || sm % 10 > d->minor) return 209;  // CUDA_ERROR_NO_BINARY_FOR_GPU
    *m = new std::string((const char*)image, bytes);
    return 0;
}
CUresult cuModuleUnload(CUmodule m) { delete (std::string*)m; return 0; }
CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    // A symbol name stands whole in the CUBIN's string table, NUL on each side.
    std::string symbol = std::string(1, '\0') + name + '\0';
    if (!m || ((std::string*)m)->find(symbol) == std::string::npos) return 500;  // not found
    for (auto& e : ENTRIES) {
        if (strcmp(e.name, name) == 0) { *f = &e; return 0; }
    }
    return 500;
}
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned smem, CUstream s, void** params, void** extra);
// CUlaunchConfig and CUlaunchAttribute as cuda.h lays them out. The
// attributes taken: programmatic stream serialization (id 6) set to 1 (kernels
// run one after another here, which is one of the orders it allows, and each
// kernel's griddepcontrol.wait is compiled out), and cluster dimensions (id 4)
// of at most 8 blocks that divide the grid; both only on sm_90 and newer.
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
        // Dependent launch and clusters are sm_90's: refused on an older device.
        if (a.id == 6 && a.v.value == 1 && device_model()->major >= 9) continue;
        if (a.id != 4 || !device_model()->clusters) return 1;
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
    if (!c) return 401;  // CUDA_ERROR_ILLEGAL_STATE: s is not capturing
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
// The names of the codes returned here (cuda.h's), so that an error says which.
CUresult cuGetErrorName(CUresult r, const char** s) {
    switch (r) {
    case 0: *s = "CUDA_SUCCESS"; break;
    case 1: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case 2: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case 100: *s = "CUDA_ERROR_NO_DEVICE"; break;
    case 101: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
    case 200: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
    case 209: *s = "CUDA_ERROR_NO_BINARY_FOR_GPU"; break;
    case 401: *s = "CUDA_ERROR_ILLEGAL_STATE"; break;
    case 500: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case 801: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
    case 900: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
    case 901: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
    default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return 0;
}
CUresult cuGetErrorString(CUresult r, const char** s) { *s = r ? "emulated driver error" : "no error"; return 0; }
CUresult cuCtxGetDevice(CUdevice* d) { *d = 0; return 0; }
CUresult cuGetExportTable(const void** t, const void*) { *t = nullptr; return 801; }
#pragma GCC visibility pop
}
