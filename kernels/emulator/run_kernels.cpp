// Runs every kernel of kernels/*.cu on the CPU (see emu.h) against float64
// references, over the sizes of src/verify.rs's standard cases plus a few more
// (misaligned inputs, odd head dims, forced split-K). Launch geometry mirrors
// src/cuda/<op>.rs. Exit status 1 when any comparison fails; the emulator
// aborts on a deadlock or a shuffle with missing lanes, and a sanitized build
// (-fsanitize=address,undefined) aborts on out-of-bounds or misaligned access.
//
//   c++ -std=c++17 -O1 -pthread -fsanitize=address,undefined run_kernels.cpp -o run_kernels
//   ASAN_OPTIONS=detect_leaks=0 ./run_kernels [--reverse] [--long] [op ...]
//   ./run_kernels --list
//
// ops: gather loss ln absorbed attn linear (default: all; --list prints them,
// one process's worth each, and an unknown op is an error); or, of linear, only
// linear_large (the 16-bit GEMMs' 128-row tiles: v3's large, v5, v6) or
// linear_layer_norm (the GEMMs with the LayerNorm after them). --reverse runs the threads of
// a block in the opposite order between barriers (another interleaving);
// --long adds the long attention cases (Lk = 4096, Lq = 4096).
#include "kernels.h"
using namespace k_f32;
#include <algorithm>
#include <cfloat>
#include <iterator>
#include <set>
#include <string>

static std::mt19937_64 rng(42);
static int failures = 0;

struct Buf {
    float* p = nullptr;
    size_t n = 0;
    explicit Buf(size_t n_) : n(n_) {
        p = (float*)malloc(std::max<size_t>(n, 1) * 4);
        for (size_t i = 0; i < n; ++i) p[i] = NAN;
    }
    ~Buf() { free(p); }
    Buf(const Buf&) = delete;
    void randn(double scale, double offset = 0.0) {
        std::normal_distribution<double> d(0.0, 1.0);
        for (size_t i = 0; i < n; ++i) p[i] = (float)(offset + scale * d(rng));
    }
};

static void report(const std::string& what, const float* got, const std::vector<double>& want,
                   double tol) {
    double d2 = 0, r2 = 0, mx = 0;
    bool bad = false;
    for (size_t i = 0; i < want.size(); ++i) {
        double g = got[i];
        if (!std::isfinite(g)) bad = true;
        double d = g - want[i];
        d2 += d * d;
        r2 += want[i] * want[i];
        mx = std::max(mx, std::fabs(d));
    }
    double rel = r2 > 0 ? std::sqrt(d2 / r2) : std::sqrt(d2);
    if (bad) rel = INFINITY;
    bool ok = rel <= tol;
    if (!ok) ++failures;
    printf("%-4s %-60s rel %.2e max %.2e\n", ok ? "ok" : "FAIL", what.c_str(), rel, mx);
    fflush(stdout);
}

// Split-K leaves every tile counter as it found it (zero) for the next launch.
static void check_counters_reset(const std::string& what, const std::vector<unsigned>& counters) {
    for (unsigned c : counters) {
        if (c != 0) {
            ++failures;
            printf("FAIL %-60s split-K tile counter left at %u\n", what.c_str(), c);
            return;
        }
    }
}

// Two ways of the same sums in the same order must agree bitwise: split-K
// through a thread-block cluster and through the workspace; mma.sync and
// WMMA on the same tiles.
template <class E>
static void check_same(const std::string& what, const E* got, const E* want, size_t n,
                       const char* other = "the workspace's split-K") {
    if (memcmp(got, want, n * sizeof(E)) != 0) {
        ++failures;
        printf("FAIL %-60s differs from %s\n", what.c_str(), other);
    } else {
        printf("ok   %-60s bitwise %s\n", what.c_str(), other);
    }
    fflush(stdout);
}

static bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }
static unsigned cdiv(long a, long b) { return (unsigned)((a + b - 1) / b); }

// ---------------------------------------------------------------- linear
static double act_ref(int act, double x) {
    switch (act) {
    case 1: return std::max(x, 0.0);
    case 2: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case 3: { double c = std::sqrt(2 / M_PI); return 0.5 * x * (1 + std::tanh(c * (x + 0.044715 * x * x * x))); }
    default: return x;
    }
}

// src/cuda/linear.rs split_k for K steps of 64.
static int splits_for(int m, int n, int k, int sms) {
    long tiles = (long)cdiv(n, 64) * cdiv(m, 64);
    if (tiles >= sms || k < 128) return 1;
    long want = (2L * sms + tiles - 1) / tiles;
    long finish = 8L * 64 * 64 / ((long)std::min(m, 64) * 64);
    long s = std::min<long>({want, k / 64, finish, 32});
    return (int)std::max<long>(s, 1);
}

static void test_linear(int m, int n, int k, int act, bool bias, bool res, int xoff = 0) {
    Buf xb(m * k + xoff), w(n * k), b(n), r(m * n);
    xb.randn(1.0);
    w.randn(1.0 / std::sqrt((double)k));
    b.randn(0.5);
    r.randn(1.0);
    const float* x = xb.p + xoff;
    std::vector<double> want(m * n);
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
            double acc = 0;
            for (int kk = 0; kk < k; ++kk) acc += (double)x[i * k + kk] * w.p[j * k + kk];
            if (bias) acc += b.p[j];
            double y = act_ref(act, acc);
            if (res) y += r.p[i * n + j];
            want[i * n + j] = y;
        }
    char name[128];
    snprintf(name, sizeof name, "linear %dx%dx%d act%d%s%s%s", m, n, k, act, bias ? " +b" : "",
             res ? " +res" : "", xoff ? " misaligned" : "");
    // TF32 tensor cores (variants 4, 5: no split, forced split; 6: 128x128
    // tiles, 16-byte copies only) with the ReLU/bias/residual epilogue only,
    // to keep emulation time down.
    const bool vec = k % 4 == 0 && aligned16(x) && aligned16(w.p);
    const int variants = act == 1 ? (vec ? 7 : 6) : 4;
    for (int variant = 0; variant < variants; ++variant) {
        // The unsplit tiled kernels write 4 bytes off 16-byte alignment on odd
        // M (their epilogues' scalar path), aligned otherwise (4 at a time).
        const int ooff = (variant == 1 || variant == 4) && m % 2 == 1 ? 1 : 0;
        Buf outb(m * n + ooff);
        float* const outp = outb.p + ooff;
        LinearParams p{};
        p.x = x; p.w = w.p; p.bias = bias ? b.p : nullptr; p.residual = res ? r.p : nullptr;
        p.out = outp; p.m = m; p.n = n; p.k = k; p.act = act;
        if (variant == 0) {
            emu::launch(dim3(cdiv(n, 16), cdiv(m, 16)), dim3(16, 16), [&] { linear_naive(p); });
            report(std::string(name) + " naive", outp, want, 1e-5);
            continue;
        }
        if (variant == 6) {
            p.k_per_split = cdiv(k, 16) * 16;
            p.splits = 1;
            emu::launch(dim3(cdiv(n, 128), cdiv(m, 128), 1), dim3(256),
                        [&] { linear_tc_tf32_large_vec4(p); });
            report(std::string(name) + " tc_tf32_large_vec4", outp, want, 7e-4);
            continue;
        }
        // A tiled kernel (64x64 tiles, `threads` per block) over `splits` K slices.
        const bool tf32 = variant >= 4;
        int splits = variant == 1 || variant == 4 ? 1
                     : variant == 2             ? splits_for(m, n, k, 132)
                                                : std::max(1, std::min(3, k / 16));
        // Steps of 64 as the host plans them; the forced split's slices end
        // off a step (k_end a multiple of 16 only).
        const int kps = cdiv(cdiv(k, splits), variant == 2 ? 64 : 16) * (variant == 2 ? 64 : 16);
        splits = cdiv(k, kps);
        p.k_per_split = kps;
        p.splits = splits;
        Buf part(splits > 1 ? (size_t)splits * m * n : 0);
        std::vector<unsigned> counters((size_t)cdiv(n, 64) * cdiv(m, 64), 0u);
        p.partial = splits > 1 ? part.p : nullptr;
        p.tile_counters = counters.data();
        const std::string v = std::string(tf32 ? (vec ? "tc_tf32_vec4" : "tc_tf32_scalar")
                                               : (vec ? "tiled_vec4" : "tiled_scalar")) +
                              " splits " + std::to_string(splits) + (ooff ? " out +4 bytes" : "");
        const auto run = [&](dim3 cluster) {
            emu::launch(dim3(cdiv(n, 64), cdiv(m, 64), splits), dim3(tf32 ? 128 : 256), [&] {
                if (tf32) {
                    if (vec) linear_tc_tf32_vec4(p); else linear_tc_tf32_scalar(p);
                } else {
                    if (vec) linear_tiled_vec4(p); else linear_tiled_scalar(p);
                }
            }, cluster);
        };
        run(dim3(1, 1, 1));
        check_counters_reset(std::string(name) + " " + v, counters);
        // TF32 rounds the inputs to 10 mantissa bits (2^-11 relative at most):
        // measured <= 1.8e-4 here, 2.9e-4 in tests/cuda_ops.rs.
        report(std::string(name) + " " + v, outp, want, tf32 ? 7e-4 : 1e-5);
        if (splits > 1 && splits <= 8) {
            // The same split as one cluster per tile, no workspace.
            Buf clb(m * n + ooff);
            p.out = clb.p + ooff;
            p.partial = nullptr;
            p.tile_counters = nullptr;
            run(dim3(1, 1, splits));
            check_same(std::string(name) + " " + v + " cluster", p.out, outp, (size_t)m * n);
        }
    }
    // v4 (few rows, any M here): 16-byte loads with the host's block size, and
    // scalar loads with one warp (many chunks per thread, odd counts for the
    // two-chunk unroll).
    for (int rows_vec = vec ? 1 : 0; rows_vec >= 0; --rows_vec) {
        Buf out(m * n);
        LinearParams p{};
        p.x = x; p.w = w.p; p.bias = bias ? b.p : nullptr; p.residual = res ? r.p : nullptr;
        p.out = out.p; p.m = m; p.n = n; p.k = k; p.act = act;
        const unsigned threads = rows_vec ? std::min(256u, std::max(32u, cdiv(k, 4 * 32) * 32)) : 32u;
        emu::launch(dim3(cdiv(n, 4), cdiv(m, 8)), dim3(threads), [&] {
            if (rows_vec) linear_rows_vec4(p); else linear_rows_scalar(p);
        });
        report(std::string(name) + (rows_vec ? " rows_vec4 " : " rows_scalar ") +
                   std::to_string(threads) + " threads",
               out.p, want, 1e-5);
        if (!rows_vec) continue;
        // Two chunks in flight: the same sums, at the host's block size and
        // with one warp (many chunks a thread, odd counts among them).
        const std::vector<unsigned> sizes = threads == 32 ? std::vector<unsigned>{32u}
                                                          : std::vector<unsigned>{threads, 32u};
        for (unsigned t : sizes) {
            Buf one(m * n), deep(m * n);
            p.out = one.p;
            emu::launch(dim3(cdiv(n, 4), cdiv(m, 8)), dim3(t), [&] { linear_rows_vec4(p); });
            p.out = deep.p;
            emu::launch(dim3(cdiv(n, 4), cdiv(m, 8)), dim3(t), [&] { linear_rows_deep_vec4(p); });
            const std::string v = std::string(name) + " rows_deep_vec4 " + std::to_string(t) + " threads";
            report(v, deep.p, want, 1e-5);
            check_same(v, deep.p, one.p, (size_t)m * n, "one chunk at a time");
        }
    }
}

// layer_norm then linear in one kernel (v4 with the norm first): against the
// float64 norm of x + residual (offset by `mean`, as layer_norm's tests do),
// then the float64 GEMM of it; sum_out against x + residual in f32.
static void test_layer_norm_linear(int m, int n, int k, bool res, double mean, int act) {
    Buf x(m * k), r(m * k), g(k), h(k), w(n * k), b(n), sum(m * k), out(m * n);
    x.randn(1.0, mean);
    r.randn(1.0, mean);
    g.randn(0.5, 1.0);
    h.randn(0.5);
    w.randn(1.0 / std::sqrt((double)k));
    b.randn(0.5);
    const double eps = 1e-5;
    std::vector<double> want((size_t)m * n), want_sum((size_t)m * k), hn(k);
    for (int i = 0; i < m; ++i) {
        double mu = 0, var = 0;
        for (int j = 0; j < k; ++j) {
            const double s = (double)x.p[i * k + j] + (res ? (double)r.p[i * k + j] : 0.0);
            want_sum[(size_t)i * k + j] = res ? (float)(x.p[i * k + j] + r.p[i * k + j]) : x.p[i * k + j];
            mu += s;
        }
        mu /= k;
        for (int j = 0; j < k; ++j) {
            const double s = (double)x.p[i * k + j] + (res ? (double)r.p[i * k + j] : 0.0);
            var += (s - mu) * (s - mu);
        }
        var /= k;
        for (int j = 0; j < k; ++j) {
            const double s = (double)x.p[i * k + j] + (res ? (double)r.p[i * k + j] : 0.0);
            hn[j] = (s - mu) / std::sqrt(var + eps) * g.p[j] + h.p[j];
        }
        for (int c = 0; c < n; ++c) {
            double acc = b.p[c];
            for (int j = 0; j < k; ++j) acc += hn[j] * w.p[(size_t)c * k + j];
            want[(size_t)i * n + c] = act_ref(act, acc);
        }
    }
    LayerNormLinearParams p{};
    p.linear.x = x.p; p.linear.w = w.p; p.linear.bias = b.p; p.linear.out = out.p;
    p.linear.m = m; p.linear.n = n; p.linear.k = k; p.linear.act = act;
    p.norm_residual = res ? r.p : nullptr;
    p.norm_weight = g.p; p.norm_bias = h.p; p.sum_out = sum.p; p.eps = (float)eps;
    const unsigned threads = std::min(256u, std::max(32u, cdiv(k, 4 * 32) * 32));
    emu::launch(dim3(cdiv(n, 4), cdiv(m, 8)), dim3(threads), [&] { layer_norm_linear_rows(p); });
    char name[128];
    snprintf(name, sizeof name, "layer_norm_linear %dx%dx%d%s mean %g act%d, %u threads", m, n, k,
             res ? " +res" : "", mean, act, threads);
    report(name, out.p, want, 1e-5);
    report(std::string(name) + " sum_out", sum.p, want_sum, 0.0);
    if (k % 4 != 0) return;
    // v2 after the norm: one or two K steps of 64 per block, a tile's split
    // blocks one cluster (none with a single split), at most 8 of them.
    for (int steps = 1; steps <= 2; ++steps) {
        const int k_per_split = 64 * steps;
        const unsigned splits = cdiv(k, k_per_split);
        if (splits > 8 || (steps == 2 && k <= 64)) continue;
        Buf out2(m * n), sum2(m * k);
        p.linear.out = out2.p;
        p.sum_out = sum2.p;
        p.linear.k_per_split = k_per_split;
        p.linear.splits = (int)splits;
        emu::launch(dim3(cdiv(n, 64), cdiv(m, 64), splits), dim3(256),
                    [&] { layer_norm_linear_tiled_vec4(p); }, dim3(1, 1, splits));
        snprintf(name, sizeof name,
                 "layer_norm_linear %dx%dx%d%s mean %g act%d, tiled %u splits of %d steps", m, n,
                 k, res ? " +res" : "", mean, act, splits, steps);
        report(name, out2.p, want, 1e-5);
        report(std::string(name) + " sum_out", sum2.p, want_sum, 0.0);
    }
}

// __float_to_tf32 against cvt.rna.tf32.f32: nearest, ties away from zero.
static void test_tf32_rounding() {
    using nvcuda::wmma::__float_to_tf32;
    const float step = std::ldexp(1.0f, -10);  // TF32 spacing in [1, 2)
    const float min_sub = std::ldexp(1.0f, -149);
    struct { float in, want; const char* what; } cases[] = {
        {1.0f, 1.0f, "exact"},
        {1.0f + step / 2, 1.0f + step, "tie away from zero (even would be 1)"},
        {-(1.0f + step / 2), -(1.0f + step), "negative tie"},
        {1.0f + step * 1.5f, 1.0f + 2 * step, "tie, odd below"},
        {std::nextafter(1.0f + step / 2, 0.0f), 1.0f, "just below a tie"},
        {std::nextafter(2.0f, 0.0f), 2.0f, "carry into the exponent"},
        {FLT_MAX, INFINITY, "overflow to infinity"},
        {INFINITY, INFINITY, "infinity"},
        {-INFINITY, -INFINITY, "-infinity"},
        {min_sub * 4096, min_sub * 8192, "subnormal tie"},
        {min_sub * 4095, 0.0f, "subnormal below half a step"},
        {0.0f, 0.0f, "zero"},
    };
    int bad = 0;
    for (auto& c : cases) {
        const float got = __float_to_tf32(c.in);
        if (emu_float_bits(got) != emu_float_bits(c.want)) {
            printf("FAIL tf32 %s: %a -> %a, want %a\n", c.what, c.in, got, c.want);
            ++bad;
        }
    }
    const float nan = __float_to_tf32(__uint_as_float(0x7f800001u));
    if (!std::isnan(nan) || (emu_float_bits(nan) & 0x1fffu)) {
        printf("FAIL tf32 NaN: %a\n", nan);
        ++bad;
    }
    failures += bad;
    if (!bad) printf("ok   tf32 rounding (%zu cases and NaN)\n", sizeof cases / sizeof cases[0]);
}

// ---------------------------------------------------------------- layer norm
static void test_layer_norm(int rows, int cols, bool res, double offset, bool with_sum) {
    Buf x(rows * cols), r(rows * cols), g(cols), bb(cols);
    x.randn(1.0, offset);
    r.randn(1.0);
    g.randn(0.2, 1.0);
    bb.randn(0.1);
    std::vector<double> want(rows * cols), wsum(rows * cols);
    for (int i = 0; i < rows; ++i) {
        std::vector<double> s(cols);
        for (int j = 0; j < cols; ++j) s[j] = (double)x.p[i * cols + j] + (res ? (double)r.p[i * cols + j] : 0.0);
        double mean = 0; for (double v : s) mean += v; mean /= cols;
        double var = 0; for (double v : s) var += (v - mean) * (v - mean); var /= cols;
        double rstd = 1 / std::sqrt(var + 1e-5);
        for (int j = 0; j < cols; ++j) {
            want[i * cols + j] = (s[j] - mean) * rstd * g.p[j] + bb.p[j];
            wsum[i * cols + j] = s[j];
        }
    }
    char name[128];
    snprintf(name, sizeof name, "layer_norm %dx%d%s mean %g", rows, cols, res ? " +res" : "", offset);
    for (int variant = 0; variant < 2; ++variant) {
        Buf out(rows * cols), so(rows * cols);
        LayerNormParams p{};
        p.x = x.p; p.residual = res ? r.p : nullptr; p.weight = g.p; p.bias = bb.p;
        p.out = out.p; p.sum_out = with_sum ? so.p : nullptr; p.rows = rows; p.cols = cols; p.eps = 1e-5f;
        std::string v;
        if (variant == 0) {
            v = "naive";
            emu::launch(dim3(cdiv(rows, 128)), dim3(128), [&] { layer_norm_naive(p); });
        } else {
            bool vec = cols % 4 == 0;
            v = vec ? "warp_vec4" : "warp_scalar";
            emu::launch(dim3(cdiv(rows, 4)), dim3(128), [&] {
                if (vec) layer_norm_warp_vec4(p); else layer_norm_warp_scalar(p);
            });
        }
        report(std::string(name) + " " + v, out.p, want, 1e-5);
        if (with_sum) report(std::string(name) + " " + v + " sum", so.p, wsum, 1e-7);
    }
}

// ---------------------------------------------------------------- attention_absorbed
// Rows of `cols` over `lk` keys in `heads` heads; keys, values and key bias
// side by side in one tensor from column `start` (an odd start: scalar loads).
static void test_attention_absorbed(int batch, int lq, int lk, int heads, int cols, bool res,
                                    double offset, int start, int rows_per_block = 1) {
    // A width of float4s where the start is one (16-byte loads), else odd.
    const int rows = batch * lq, wide = heads * cols,
              width = start + 2 * wide + (start % 4 == 0 ? (heads + 4) / 4 * 4 : heads + 1);
    Buf x(rows * cols), r(rows * cols), kv((size_t)batch * lk * width), g(cols), bb(cols), ob(cols),
        ag(cols), ab(cols);
    x.randn(1.0, offset);
    r.randn(1.0);
    kv.randn(1.0 / std::sqrt((double)cols));
    g.randn(0.2, 1.0);
    bb.randn(0.1);
    ob.randn(0.5);
    ag.randn(0.2, 1.0);
    ab.randn(0.1);
    const double scale = 0.8;
    auto norm = [&](const std::vector<double>& s, const float* w, const float* b) {
        double mean = 0; for (double v : s) mean += v; mean /= cols;
        double var = 0; for (double v : s) var += (v - mean) * (v - mean); var /= cols;
        std::vector<double> out(cols);
        for (int j = 0; j < cols; ++j) out[j] = (s[j] - mean) / std::sqrt(var + 1e-5) * w[j] + b[j];
        return out;
    };
    std::vector<double> want(rows * cols), wstream(rows * cols);
    for (int i = 0; i < rows; ++i) {
        const int b = i / lq;
        std::vector<double> s(cols);
        for (int j = 0; j < cols; ++j) s[j] = (double)x.p[i * cols + j] + (res ? (double)r.p[i * cols + j] : 0.0);
        std::vector<double> h = norm(s, g.p, bb.p), y = s;
        for (int j = 0; j < cols; ++j) y[j] += ob.p[j];
        for (int e = 0; e < heads; ++e) {
            std::vector<double> sc(lk);
            double mx = -INFINITY, sum = 0;
            for (int t = 0; t < lk; ++t) {
                const float* row = kv.p + (size_t)(b * lk + t) * width;
                double dot = row[start + 2 * wide + e];
                for (int j = 0; j < cols; ++j) dot += h[j] * row[start + e * cols + j];
                sc[t] = dot * scale;
                mx = std::max(mx, sc[t]);
            }
            for (double& v : sc) { v = std::exp(v - mx); sum += v; }
            for (int t = 0; t < lk; ++t) {
                const float* row = kv.p + (size_t)(b * lk + t) * width;
                for (int j = 0; j < cols; ++j) y[j] += sc[t] / sum * row[start + wide + e * cols + j];
            }
        }
        std::vector<double> o = norm(y, ag.p, ab.p);
        for (int j = 0; j < cols; ++j) { want[i * cols + j] = o[j]; wstream[i * cols + j] = y[j]; }
    }
    char name[128];
    snprintf(name, sizeof name, "attention_absorbed B%d Lq%d Lk%d H%d C%d%s mean %g start %d R%d",
             batch, lq, lk, heads, cols, res ? " +res" : "", offset, start, rows_per_block);
    for (int variant = 0; variant < 2; ++variant) {
        if (variant == 1 && (cols % 4 != 0 || cols > 512)) continue;  // v1 only (as the host)
        Buf out(rows * cols), so(rows * cols);
        AbsorbedAttentionParams p{};
        p.x = x.p; p.residual = res ? r.p : nullptr; p.norm_weight = g.p; p.norm_bias = bb.p;
        p.keys = kv.p; p.values = kv.p; p.key_bias = kv.p; p.out_bias = ob.p;
        p.after_weight = ag.p; p.after_bias = ab.p; p.stream_out = so.p; p.out = out.p;
        p.rows = rows; p.lq = lq; p.cols = cols; p.lk = lk; p.heads = heads;
        p.k_stride = p.v_stride = p.b_stride = width;
        p.k_col = start; p.v_col = start + wide; p.b_col = start + 2 * wide;
        p.scale = (float)scale; p.eps = 1e-5f; p.after_eps = 1e-5f;
        p.vec4 = start % 4 == 0 && width % 4 == 0 && cols % 4 == 0;
        std::string v;
        if (variant == 0) {
            v = "naive";
            emu::launch(dim3(cdiv(rows, 128)), dim3(128), [&] { attention_absorbed_naive(p); });
        } else {
            v = p.vec4 ? "rows vec4" : "rows scalar";
            p.rows_per_block = rows_per_block;
            emu::launch(dim3(cdiv(rows, rows_per_block)), dim3(128), [&] { attention_absorbed_rows(p); });
        }
        report(std::string(name) + " " + v, out.p, want, 1e-5);
        report(std::string(name) + " " + v + " stream", so.p, wstream, 1e-6);
    }
}

// ---------------------------------------------------------------- attention
// The float64 reference of params `p` (any storage's struct) on the inputs q,
// k, v (float or 16-bit elements) and the key mask m.
template <class P, class E>
static std::vector<double> attention_ref(const P& p, const E* q, const E* k, const E* v,
                                         const std::vector<unsigned char>& m) {
    const int batch = p.batch, lq = p.lq, lk = p.lk, heads = p.heads, hd = p.head_dim;
    const int c = heads * hd;
    std::vector<double> want((size_t)batch * lq * c);
    double scale = 1.0 / std::sqrt((double)hd);
    for (int b = 0; b < batch; ++b)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < lq; ++i) {
                std::vector<double> s(lk);
                double mx = -INFINITY;
                auto vis = [&](int j) { return !((p.causal && j > i) || (p.mask && m[b * lk + j])); };
                for (int j = 0; j < lk; ++j) {
                    if (!vis(j)) continue;
                    double dot = 0;
                    for (int t = 0; t < hd; ++t)
                        dot += (double)emu_to_float(q[(b * lq + i) * p.q_stride + p.q_col + h * hd + t]) *
                               emu_to_float(k[(b * lk + j) * p.k_stride + p.k_col + h * hd + t]);
                    s[j] = dot * scale;
                    mx = std::max(mx, s[j]);
                }
                double* o = &want[(b * lq + i) * c + h * hd];
                for (int t = 0; t < hd; ++t) o[t] = 0;
                if (mx == -INFINITY) continue;
                double den = 0;
                for (int j = 0; j < lk; ++j) {
                    if (!vis(j)) continue;
                    double e = std::exp(s[j] - mx);
                    den += e;
                    for (int t = 0; t < hd; ++t)
                        o[t] += e * emu_to_float(v[(b * lk + j) * p.v_stride + p.v_col + h * hd + t]);
                }
                for (int t = 0; t < hd; ++t) o[t] /= den;
            }
    return want;
}

// f32 attention operands: random Q, K, V (packed: one [B, L, 3C] tensor,
// self-attention; else Q [B, Lq, C] and K|V [B, Lk, 2C]) and, with `mask`, a
// random key mask, laid into `p` with the case's other fields.
struct AttentionCase {
    Buf q, kv;
    std::vector<unsigned char> m;
    AttentionCase(AttentionParams& p, int batch, int lq, int lk, int heads, int hd, bool causal,
                  bool mask, bool packed)
        : q(packed ? (size_t)batch * lq * 3 * heads * hd : (size_t)batch * lq * heads * hd),
          kv(packed ? 0 : (size_t)batch * lk * 2 * heads * hd),
          m(batch * lk, 0) {
        const int c = heads * hd;
        q.randn(1.0);
        kv.randn(1.0);
        if (mask) {
            std::uniform_real_distribution<double> u(0, 1);
            // Key 0 kept, except with causal masking in sequence 0: its query 0
            // then sees no key at all (output: zeros), as in src/verify.rs.
            for (int i = 0; i < batch * lk; ++i) m[i] = (causal && i == 0) || ((i % lk != 0) && u(rng) < 0.4);
        }
        p.batch = batch; p.lq = lq; p.lk = lk; p.heads = heads; p.head_dim = hd;
        p.scale = (float)(1.0 / std::sqrt((double)hd));
        p.causal = causal;
        p.mask = mask ? m.data() : nullptr;
        if (packed) {
            p.q = q.p; p.k = q.p; p.v = q.p;
            p.q_stride = p.k_stride = p.v_stride = 3 * c;
            p.q_col = 0; p.k_col = c; p.v_col = 2 * c;
        } else {
            p.q = q.p; p.k = kv.p; p.v = kv.p;
            p.q_stride = c; p.k_stride = p.v_stride = 2 * c;
            p.q_col = 0; p.k_col = 0; p.v_col = c;
        }
    }
};

static void test_attention(int batch, int lq, int lk, int heads, int hd, bool causal, bool mask,
                           bool packed, bool naive_too = true) {
    int c = heads * hd;
    AttentionParams p{};
    AttentionCase in(p, batch, lq, lk, heads, hd, causal, mask, packed);
    std::vector<double> want = attention_ref(p, p.q, p.k, p.v, in.m);
    char name[128];
    snprintf(name, sizeof name, "attention B%d Lq%d Lk%d H%d d%d%s%s%s", batch, lq, lk, heads, hd,
             causal ? " causal" : "", mask ? " mask" : "", packed ? " packed" : "");
    // variant 0: naive; 1, 2: v2 with 8-query blocks, 3, 4: with 16-query
    // blocks (the _q16 entry points), each with vec4 loads where allowed,
    // then with scalar loads forced; 5, 6: v4 (few keys; any Lk here, so its
    // steps of 8 keys are tested too) with vec4 loads where allowed, 6 with
    // the output 4 bytes off 16-byte alignment (scalar stores); 7, 8: v5
    // (split keys; any Lk here) the same two ways.
    const bool vec_ok = hd % 4 == 0 && p.q_stride % 4 == 0 && p.k_stride % 4 == 0 &&
                        p.v_stride % 4 == 0 && p.q_col % 4 == 0 && p.k_col % 4 == 0 &&
                        p.v_col % 4 == 0;
    for (int variant = naive_too ? 0 : 1; variant < 9; ++variant) {
        const int off = variant == 6 || variant == 8 ? 1 : 0;
        Buf out((size_t)batch * lq * c + off);
        p.out = out.p + off;
        std::string v;
        if (variant == 0) {
            v = "naive";
            long total = (long)batch * lq * c;
            emu::launch(dim3(cdiv(total, 128)), dim3(128), [&] { attention_naive(p); });
        } else if (variant >= 7) {
            if (hd > 128) continue;
            p.vec4 = vec_ok;
            v = std::string("split_keys") + (p.vec4 ? " vec4" : " scalar") + (off ? ", out +4 bytes" : "");
            emu::launch(dim3((long)batch * heads * cdiv(lq, 4)), dim3(512),
                        [&] { attention_split_keys(p); });
        } else if (variant >= 5) {
            if (hd > 128) continue;
            p.vec4 = vec_ok;
            v = std::string("few_keys") + (p.vec4 ? " vec4" : " scalar") + (off ? ", out +4 bytes" : "");
            emu::launch(dim3(cdiv((long)batch * heads * lq, 4)), dim3(128),
                        [&] { attention_few_keys(p); });
        } else {
            if (hd > 128) continue;
            const bool wide = variant >= 3;
            bool vec = variant % 2 == 1 && vec_ok;
            p.vec4 = vec;
            int width = hd <= 32 ? 32 : hd <= 64 ? 64 : 128;
            v = "flash_d" + std::to_string(width) + (wide ? "_q16" : "") + (vec ? " vec4" : " scalar");
            emu::launch(dim3(cdiv(lq, wide ? 16 : 8), heads, batch), dim3(128), [&] {
                if (wide) {
                    if (width == 32) attention_flash_d32_q16(p);
                    else if (width == 64) attention_flash_d64_q16(p);
                    else attention_flash_d128_q16(p);
                } else {
                    if (width == 32) attention_flash_d32(p);
                    else if (width == 64) attention_flash_d64(p);
                    else attention_flash_d128(p);
                }
            });
        }
        report(std::string(name) + " " + v, p.out, want, 1e-5);
    }
}

// attention_linear_rows (f32): attention over few keys, then a linear of
// its output, against the float64 attention reference then linear.
static void test_attention_linear(int batch, int lq, int lk, int heads, int hd, int n, bool causal,
                                  bool mask, bool packed, int act) {
    const int c = heads * hd, m = batch * lq;
    Buf w((size_t)n * c), b(n), out((size_t)m * n);
    w.randn(1.0 / std::sqrt((double)c));
    b.randn(0.5);
    AttentionLinearParams p{};
    AttentionParams& a = p.attention;
    AttentionCase in(a, batch, lq, lk, heads, hd, causal, mask, packed);
    a.vec4 = 1;
    const std::vector<double> att = attention_ref(a, a.q, a.k, a.v, in.m);
    std::vector<double> want((size_t)m * n);
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
            double acc = b.p[j];
            for (int t = 0; t < c; ++t) acc += att[(size_t)i * c + t] * w.p[(size_t)j * c + t];
            want[(size_t)i * n + j] = act_ref(act, acc);
        }
    p.linear.w = w.p; p.linear.bias = b.p; p.linear.out = out.p;
    p.linear.m = m; p.linear.n = n; p.linear.k = c; p.linear.act = act;
    const unsigned threads = std::min(256u, std::max(32u, cdiv(c, 4 * 32) * 32));
    emu::launch(dim3(cdiv(n, 4), cdiv(m, 8)), dim3(threads), [&] { attention_linear_rows(p); });
    char name[128];
    snprintf(name, sizeof name, "attention_linear B%d Lq%d Lk%d H%d d%d N%d%s%s%s act%d", batch, lq,
             lk, heads, hd, n, causal ? " causal" : "", mask ? " mask" : "", packed ? " packed" : "",
             act);
    report(name, out.p, want, 1e-5);
}

// 16-bit storage (f16 in K_f16, bf16 in k_bf16): the v2 kernel (8- and
// 16-query blocks) and the tensor-core v3 on the same rounded inputs, against the float64 reference of
// those inputs. v3 runs with 8-byte loads where allowed, then with scalar
// loads and an output 8 bytes off 16-byte alignment (its scalar stores).
struct HalfF16 {
    typedef __half E;
    typedef k_f16::AttentionParams P;
    static const char* name() { return "f16"; }
    static E from(float f) { return __float2half_rn(f); }
    static void flash(const P& p) {
        p.head_dim <= 32   ? k_f16::attention_flash_d32_f16(p)
        : p.head_dim <= 64 ? k_f16::attention_flash_d64_f16(p)
                           : k_f16::attention_flash_d128_f16(p);
    }
    static void flash_q16(const P& p) {
        p.head_dim <= 32   ? k_f16::attention_flash_d32_q16_f16(p)
        : p.head_dim <= 64 ? k_f16::attention_flash_d64_q16_f16(p)
                           : k_f16::attention_flash_d128_q16_f16(p);
    }
    static void tc(const P& p) { p.head_dim == 64 ? k_f16::attention_tc_d64_f16(p) : k_f16::attention_tc_d128_f16(p); }
    static void few_keys(const P& p) { k_f16::attention_few_keys_f16(p); }
    static void split_keys(const P& p) { k_f16::attention_split_keys_f16(p); }
    typedef k_f16::LinearParams LP;
    static void linear_small(const LP& p) { k_f16::linear_tc_vec8_f16(p); }
    static void linear_scalar(const LP& p) { k_f16::linear_tc_scalar_f16(p); }
    static void linear_large(const LP& p) { k_f16::linear_tc_large_vec8_f16(p); }
    static void linear_mma(const LP& p) { k_f16::linear_mma_vec8_f16(p); }
    static void linear_mma_narrow(const LP& p) { k_f16::linear_mma_narrow_vec8_f16(p); }
    static void linear_wgmma(const LP& p) { k_f16::linear_wgmma_vec8_f16(p); }
    static void linear_wgmma_narrow(const LP& p) { k_f16::linear_wgmma_narrow_vec8_f16(p); }
    static void linear_wgmma_serial(const LP& p) { k_f16::linear_wgmma_serial_vec8_f16(p); }
    static void linear_wgmma_serial_narrow(const LP& p) { k_f16::linear_wgmma_serial_narrow_vec8_f16(p); }
    typedef k_f16::LayerNormLinearParams LNP;
    static void layer_norm_linear_tc(const LNP& p) { k_f16::layer_norm_linear_tc_vec8_f16(p); }
    typedef k_f16::LinearLayerNormParams LLNP;
    static void linear_layer_norm(const LLNP& p) { k_f16::linear_layer_norm_mma_vec8_f16(p); }
    static void linear_layer_norm_wgmma(const LLNP& p) { k_f16::linear_layer_norm_wgmma_vec8_f16(p); }
    typedef k_f16::LayerNormParams NP;
    static void layer_norm(const NP& p) { k_f16::layer_norm_warp_vec4_f16(p); }
    static void linear_rows(const LP& p, bool vec) {
        if (vec) k_f16::linear_rows_vec4_f16(p); else k_f16::linear_rows_scalar_f16(p);
    }
    static void linear_rows_deep(const LP& p) { k_f16::linear_rows_deep_vec4_f16(p); }
};
struct HalfBF16 {
    typedef __nv_bfloat16 E;
    typedef k_bf16::AttentionParams P;
    static const char* name() { return "bf16"; }
    static E from(float f) { return __float2bfloat16_rn(f); }
    static void flash(const P& p) {
        p.head_dim <= 32   ? k_bf16::attention_flash_d32_bf16(p)
        : p.head_dim <= 64 ? k_bf16::attention_flash_d64_bf16(p)
                           : k_bf16::attention_flash_d128_bf16(p);
    }
    static void flash_q16(const P& p) {
        p.head_dim <= 32   ? k_bf16::attention_flash_d32_q16_bf16(p)
        : p.head_dim <= 64 ? k_bf16::attention_flash_d64_q16_bf16(p)
                           : k_bf16::attention_flash_d128_q16_bf16(p);
    }
    static void tc(const P& p) { p.head_dim == 64 ? k_bf16::attention_tc_d64_bf16(p) : k_bf16::attention_tc_d128_bf16(p); }
    static void few_keys(const P& p) { k_bf16::attention_few_keys_bf16(p); }
    static void split_keys(const P& p) { k_bf16::attention_split_keys_bf16(p); }
    typedef k_bf16::LinearParams LP;
    static void linear_small(const LP& p) { k_bf16::linear_tc_vec8_bf16(p); }
    static void linear_scalar(const LP& p) { k_bf16::linear_tc_scalar_bf16(p); }
    static void linear_large(const LP& p) { k_bf16::linear_tc_large_vec8_bf16(p); }
    static void linear_mma(const LP& p) { k_bf16::linear_mma_vec8_bf16(p); }
    static void linear_mma_narrow(const LP& p) { k_bf16::linear_mma_narrow_vec8_bf16(p); }
    static void linear_wgmma(const LP& p) { k_bf16::linear_wgmma_vec8_bf16(p); }
    static void linear_wgmma_narrow(const LP& p) { k_bf16::linear_wgmma_narrow_vec8_bf16(p); }
    static void linear_wgmma_serial(const LP& p) { k_bf16::linear_wgmma_serial_vec8_bf16(p); }
    static void linear_wgmma_serial_narrow(const LP& p) { k_bf16::linear_wgmma_serial_narrow_vec8_bf16(p); }
    typedef k_bf16::LayerNormLinearParams LNP;
    static void layer_norm_linear_tc(const LNP& p) { k_bf16::layer_norm_linear_tc_vec8_bf16(p); }
    typedef k_bf16::LinearLayerNormParams LLNP;
    static void linear_layer_norm(const LLNP& p) { k_bf16::linear_layer_norm_mma_vec8_bf16(p); }
    static void linear_layer_norm_wgmma(const LLNP& p) { k_bf16::linear_layer_norm_wgmma_vec8_bf16(p); }
    typedef k_bf16::LayerNormParams NP;
    static void layer_norm(const NP& p) { k_bf16::layer_norm_warp_vec4_bf16(p); }
    static void linear_rows(const LP& p, bool vec) {
        if (vec) k_bf16::linear_rows_vec4_bf16(p); else k_bf16::linear_rows_scalar_bf16(p);
    }
    static void linear_rows_deep(const LP& p) { k_bf16::linear_rows_deep_vec4_bf16(p); }
};

// `b` rounded to S's storage type.
template <class S>
static std::vector<typename S::E> rounded(const Buf& b) {
    std::vector<typename S::E> v(b.n);
    for (size_t i = 0; i < b.n; ++i) v[i] = S::from(b.p[i]);
    return v;
}

template <class S>
static void test_attention_half(int batch, int lq, int lk, int heads, int hd, bool causal, bool mask,
                                bool packed) {
    typedef typename S::E E;
    int c = heads * hd;
    Buf qf(packed ? (size_t)batch * lq * 3 * c : (size_t)batch * lq * c);
    Buf kvf(packed ? 0 : (size_t)batch * lk * 2 * c);
    qf.randn(1.0);
    kvf.randn(1.0);
    std::vector<E> qsrc(qf.n), kvsrc(kvf.n);
    for (size_t i = 0; i < qf.n; ++i) qsrc[i] = S::from(qf.p[i]);
    for (size_t i = 0; i < kvf.n; ++i) kvsrc[i] = S::from(kvf.p[i]);
    std::vector<unsigned char> m(batch * lk, 0);
    if (mask) {
        std::uniform_real_distribution<double> u(0, 1);
        for (int i = 0; i < batch * lk; ++i) m[i] = (causal && i == 0) || ((i % lk != 0) && u(rng) < 0.4);
    }
    typename S::P p{};
    p.batch = batch; p.lq = lq; p.lk = lk; p.heads = heads; p.head_dim = hd;
    p.scale = (float)(1.0 / std::sqrt((double)hd));
    p.causal = causal;
    p.mask = mask ? m.data() : nullptr;
    if (packed) {
        p.q = p.k = p.v = qsrc.data();
        p.q_stride = p.k_stride = p.v_stride = 3 * c;
        p.q_col = 0; p.k_col = c; p.v_col = 2 * c;
    } else {
        p.q = qsrc.data(); p.k = kvsrc.data(); p.v = kvsrc.data();
        p.q_stride = c; p.k_stride = p.v_stride = 2 * c;
        p.q_col = 0; p.k_col = 0; p.v_col = c;
    }
    std::vector<double> want = attention_ref(p, p.q, p.k, p.v, m);
    char name[128];
    snprintf(name, sizeof name, "attention %s B%d Lq%d Lk%d H%d d%d%s%s%s", S::name(), batch, lq, lk,
             heads, hd, causal ? " causal" : "", mask ? " mask" : "", packed ? " packed" : "");
    const size_t total = (size_t)batch * lq * c;
    // variant 0, 1: v2 with 8- and 16-query blocks; 2, 3: v3; 4, 5: v4
    // (few keys; any Lk here); 6, 7: v5 (split keys; any Lk here). 3, 5 and
    // 7 with scalar loads and the output 8 bytes off 16-byte alignment
    // (scalar stores).
    // v3 takes head dims 64 and 128; the host gives others to v2.
    const bool tc = hd == 64 || hd == 128;
    const std::string flash = "flash_d" + std::to_string(hd <= 32 ? 32 : hd <= 64 ? 64 : 128);
    for (int variant = 0; variant < 8; ++variant) {
        if (!tc && (variant == 2 || variant == 3)) continue;
        const bool scalar = variant % 2 == 1 && variant >= 3;
        const int off = scalar ? 4 : 0;
        std::vector<E> out(total + off, S::from(NAN));
        p.out = out.data() + off;
        p.vec4 = !scalar && aligned16(qsrc.data()) && (packed || aligned16(kvsrc.data()));
        std::string v;
        if (variant >= 6) {
            v = std::string("split_keys") + (p.vec4 ? " vec4" : " scalar, out +8 bytes");
            emu::launch(dim3((long)batch * heads * cdiv(lq, 4)), dim3(512), [&] { S::split_keys(p); });
        } else if (variant >= 4) {
            v = std::string("few_keys") + (p.vec4 ? " vec4" : " scalar, out +8 bytes");
            emu::launch(dim3(cdiv((long)batch * heads * lq, 4)), dim3(128), [&] { S::few_keys(p); });
        } else if (variant == 0) {
            v = flash;
            emu::launch(dim3(cdiv(lq, 8), heads, batch), dim3(128), [&] { S::flash(p); });
        } else if (variant == 1) {
            v = flash + "_q16";
            emu::launch(dim3(cdiv(lq, 16), heads, batch), dim3(128), [&] { S::flash_q16(p); });
        } else {
            v = std::string("tc_d") + std::to_string(hd) + (p.vec4 ? " vec4" : " scalar, out +8 bytes");
            emu::launch(dim3(cdiv(lq, 64), heads, batch), dim3(128), [&] { S::tc(p); });
        }
        std::vector<float> got(total);
        for (size_t i = 0; i < total; ++i) got[i] = emu_to_float(p.out[i]);
        // Outputs rounded to elem (2^-9 relative for bf16), P to elem in v3.
        report(std::string(name) + " " + v, got.data(), want, 1e-2);
    }
}

static void test_attention_half_cases() {
    const int cases[][8] = {
        {1, 77, 77, 4, 128, 0, 0, 1}, {2, 77, 4, 4, 128, 0, 0, 0}, {3, 1, 1, 4, 128, 0, 0, 1},
        {1, 3, 129, 2, 64, 0, 1, 0},  {2, 129, 129, 2, 64, 1, 0, 1}, {2, 64, 64, 8, 64, 0, 1, 1},
        {2, 77, 77, 4, 128, 1, 1, 1}, {1, 129, 3, 2, 128, 0, 1, 0}, {2, 1, 77, 2, 64, 0, 1, 0},
        {1, 3, 3, 2, 64, 1, 1, 1},    {1, 129, 129, 1, 128, 1, 0, 1},
        // Head dims v3 does not take (v2's d32, d64 and d128 builds, 16-bit).
        {2, 77, 77, 4, 32, 0, 1, 1},  {1, 9, 20, 3, 24, 1, 0, 0},   {1, 17, 33, 2, 96, 0, 1, 0},
        {1, 7, 7, 2, 48, 1, 0, 1},
    };
    for (auto& k : cases) {
        test_attention_half<HalfF16>(k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]);
        test_attention_half<HalfBF16>(k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]);
    }
}

// 16-bit linear on tensor cores: 64x64 tiles (16-byte copies, split in 3;
// element copies) and 128x128 tiles, on rounded inputs against the float64
// reference of those inputs, with bias, ReLU and residual. `large`: only
// the kernels of 128-row tiles (v3's large, v5, v6).
template <class S>
static void test_linear_half(int m, int n, int k, bool large = false) {
    typedef typename S::E E;
    Buf xf(m * k), wf(n * k), bf(n), rf(m * n);
    xf.randn(1.0);
    wf.randn(1.0 / std::sqrt((double)k));
    bf.randn(0.5);
    rf.randn(1.0);
    std::vector<E> x = rounded<S>(xf), w = rounded<S>(wf), b = rounded<S>(bf),
                   r = rounded<S>(rf);
    std::vector<double> want((size_t)m * n);
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
            double acc = emu_to_float(b[j]);
            for (int kk = 0; kk < k; ++kk)
                acc += (double)emu_to_float(x[i * k + kk]) * emu_to_float(w[j * k + kk]);
            want[(size_t)i * n + j] = std::max(acc, 0.0) + emu_to_float(r[(size_t)i * n + j]);
        }
    char name[96];
    snprintf(name, sizeof name, "linear %s %dx%dx%d relu +b +res", S::name(), m, n, k);
    for (int variant = 0; variant < 7; ++variant) {
        if (large && variant != 2 && variant != 5) continue;
        typename S::LP p{};
        p.x = x.data(); p.w = w.data(); p.bias = b.data(); p.residual = r.data();
        p.m = m; p.n = n; p.k = k; p.act = 1;
        // 130 rows, no split: the output 2 bytes off alignment (scalar epilogue).
        const int ooff = variant == 0 && m == 130 ? 1 : 0;
        std::vector<E> outb((size_t)m * n + ooff, S::from(NAN));
        E* const out_p = outb.data() + ooff;
        p.out = out_p;
        const int splits = variant == 1 ? std::max(1, std::min(3, k / 16)) : 1;
        p.k_per_split = cdiv(cdiv(k, splits), 16) * 16;
        p.splits = cdiv(k, p.k_per_split);
        Buf part(p.splits > 1 ? (size_t)p.splits * m * n : 0);
        std::vector<unsigned> counters((size_t)cdiv(n, 64) * cdiv(m, 64), 0u);
        p.partial = p.splits > 1 ? part.p : nullptr;
        p.tile_counters = counters.data();
        const bool vec = k % 8 == 0;
        std::string v;
        if (variant == 5) {
            // v5: against the reference, and bitwise against v3's large tiles
            // (in the emulator both sum each 16 K columns as fmas in order).
            if (!vec) continue;
            v = "mma_vec8";
            const dim3 square(cdiv(n, 128), cdiv(m, 128), 1), narrow(cdiv(n, 64), cdiv(m, 128), 1);
            emu::launch(square, dim3(128), [&] { S::linear_mma(p); });
            // Another kernel on the same operands: bitwise v5's output.
            const auto same_as_v5 = [&](dim3 grid, unsigned threads,
                                        void (*kernel)(const typename S::LP&), const char* what) {
                std::vector<E> o((size_t)m * n + ooff, S::from(NAN));
                p.out = o.data() + ooff;
                emu::launch(grid, dim3(threads), [&] { kernel(p); });
                check_same(std::string(name) + " " + v, out_p, p.out, (size_t)m * n, what);
            };
            same_as_v5(square, 256, &S::linear_large, "v3's large tiles");
            // Its 128x64 tiles: the same sums, tile by tile.
            same_as_v5(narrow, 128, &S::linear_mma_narrow, "v5's narrow tiles");
            // v6 (warpgroup MMA on the same stages), square and narrow: the
            // same sums in the same order as v5's, from the stages as the
            // hardware's descriptors read them; its serial K loop (the
            // baseline of one group in flight) too.
            same_as_v5(square, 128, &S::linear_wgmma, "v6's tiles");
            same_as_v5(narrow, 128, &S::linear_wgmma_narrow, "v6's narrow tiles");
            same_as_v5(square, 128, &S::linear_wgmma_serial, "v6's serial K loop");
            same_as_v5(narrow, 128, &S::linear_wgmma_serial_narrow,
                       "v6's serial K loop, narrow tiles");
        } else if (variant == 6) {
            // v4 with two chunks a thread in flight, with one warp (many
            // chunks a thread, odd counts among them).
            if (k % 4 != 0) continue;
            v = "rows_deep_vec4 32 threads";
            emu::launch(dim3(cdiv(n, 4), cdiv(m, 8)), dim3(32), [&] { S::linear_rows_deep(p); });
        } else if (variant >= 3) {
            // v4 (few rows): 8-byte loads, then scalar loads with one warp.
            const bool rows_vec = variant == 3;
            if (rows_vec && k % 4 != 0) continue;
            const unsigned threads = rows_vec ? std::min(256u, std::max(32u, cdiv(k, 128) * 32)) : 32u;
            v = std::string(rows_vec ? "rows_vec4 " : "rows_scalar ") + std::to_string(threads) + " threads";
            emu::launch(dim3(cdiv(n, 4), cdiv(m, 8)), dim3(threads), [&] { S::linear_rows(p, rows_vec); });
        } else if (variant == 2) {
            if (!vec) continue;
            v = "tc_large_vec8";
            emu::launch(dim3(cdiv(n, 128), cdiv(m, 128), 1), dim3(256), [&] { S::linear_large(p); });
        } else {
            v = std::string(vec ? "tc_vec8" : "tc_scalar") + " splits " + std::to_string(p.splits);
            const auto run = [&](dim3 cluster) {
                emu::launch(dim3(cdiv(n, 64), cdiv(m, 64), p.splits), dim3(128), [&] {
                    if (vec) S::linear_small(p); else S::linear_scalar(p);
                }, cluster);
            };
            run(dim3(1, 1, 1));
            check_counters_reset(std::string(name) + " " + v, counters);
            if (p.splits > 1) {
                // The same split as one cluster per tile, no workspace.
                std::vector<E> cl((size_t)m * n + ooff, S::from(NAN));
                p.out = cl.data() + ooff;
                p.partial = nullptr;
                p.tile_counters = nullptr;
                run(dim3(1, 1, p.splits));
                check_same(std::string(name) + " " + v + " cluster", p.out, out_p, (size_t)m * n);
            }
        }
        std::vector<float> got((size_t)m * n);
        for (size_t i = 0; i < got.size(); ++i) got[i] = emu_to_float(out_p[i]);
        // The output rounded to elem: 2^-9 (bf16) relative at most.
        report(std::string(name) + " " + v, got.data(), want, 1e-2);
    }
}

// v3 after a layer_norm (16-bit): the norm's output rounded to E as it is
// staged, so the reference rounds it too; one K step of 64 per block, a
// tile's split blocks one cluster.
template <class S>
static void test_layer_norm_linear_half(int m, int n, int k, bool res, double mean) {
    typedef typename S::E E;
    Buf xf(m * k), rf(m * k), gf(k), hf(k), wf(n * k), bf(n);
    xf.randn(1.0, mean);
    rf.randn(1.0, mean);
    gf.randn(0.5, 1.0);
    hf.randn(0.5);
    wf.randn(1.0 / std::sqrt((double)k));
    bf.randn(0.5);
    std::vector<E> x = rounded<S>(xf), r = rounded<S>(rf), g = rounded<S>(gf),
                   h = rounded<S>(hf), w = rounded<S>(wf), b = rounded<S>(bf);
    const double eps = 1e-5;
    std::vector<double> want((size_t)m * n), want_sum((size_t)m * k), hn(k), sv(k);
    for (int i = 0; i < m; ++i) {
        double mu = 0, var = 0;
        for (int j = 0; j < k; ++j) {
            const float s = emu_to_float(x[(size_t)i * k + j]) + (res ? emu_to_float(r[(size_t)i * k + j]) : 0.0f);
            want_sum[(size_t)i * k + j] = emu_to_float(S::from(s));
            sv[j] = (double)emu_to_float(x[(size_t)i * k + j]) + (res ? (double)emu_to_float(r[(size_t)i * k + j]) : 0.0);
            mu += sv[j];
        }
        mu /= k;
        for (int j = 0; j < k; ++j) var += (sv[j] - mu) * (sv[j] - mu);
        var /= k;
        for (int j = 0; j < k; ++j) {
            hn[j] = emu_to_float(S::from((float)((sv[j] - mu) / std::sqrt(var + eps) * emu_to_float(g[j]) + emu_to_float(h[j]))));
        }
        for (int c = 0; c < n; ++c) {
            double acc = emu_to_float(b[c]);
            for (int j = 0; j < k; ++j) acc += hn[j] * emu_to_float(w[(size_t)c * k + j]);
            want[(size_t)i * n + c] = acc;
        }
    }
    std::vector<E> out((size_t)m * n, S::from(NAN)), sum((size_t)m * k, S::from(NAN));
    typename S::LNP p{};
    p.linear.x = x.data(); p.linear.w = w.data(); p.linear.bias = b.data(); p.linear.out = out.data();
    p.linear.m = m; p.linear.n = n; p.linear.k = k;
    p.linear.k_per_split = 64;
    p.linear.splits = (int)cdiv(k, 64);
    p.norm_residual = res ? r.data() : nullptr;
    p.norm_weight = g.data(); p.norm_bias = h.data(); p.sum_out = sum.data(); p.eps = (float)eps;
    const unsigned splits = (unsigned)p.linear.splits;
    emu::launch(dim3(cdiv(n, 64), cdiv(m, 64), splits), dim3(128),
                [&] { S::layer_norm_linear_tc(p); }, dim3(1, 1, splits));
    char name[128];
    snprintf(name, sizeof name, "layer_norm_linear %s %dx%dx%d%s mean %g, tc %u splits", S::name(),
             m, n, k, res ? " +res" : "", mean, splits);
    std::vector<float> got(out.size()), got_sum(sum.size());
    for (size_t i = 0; i < got.size(); ++i) got[i] = emu_to_float(out[i]);
    for (size_t i = 0; i < got_sum.size(); ++i) got_sum[i] = emu_to_float(sum[i]);
    // The output rounded to E (2^-9 relative for bf16), and a normalised
    // element rounded on the other side of a tie now and then.
    report(name, got.data(), want, 1e-2);
    report(std::string(name) + " sum_out", got_sum.data(), want_sum, 0.0);
}


// linear_layer_norm (16-bit, v5's narrow tiles, a cluster along N): against
// the f64 reference of the linear's output rounded to E, the sum and the norm;
// on v6's products (warpgroup MMA) bitwise the same;
// and against its two ops (v5's narrow tiles, then layer_norm_warp): sum_out
// bitwise (the same products, roundings and adds), the norm within rounding
// (its sums in another order).
template <class S>
static void test_linear_layer_norm_half(int m, int n, int k, bool res, double mean, int act) {
    typedef typename S::E E;
    Buf xf(m * k), wf(n * k), bf(n), rf(m * n), gf(n), hf(n);
    xf.randn(1.0);
    wf.randn(1.0 / std::sqrt((double)k));
    bf.randn(0.5, mean);
    rf.randn(1.0, mean);
    gf.randn(0.5, 1.0);
    hf.randn(0.5);
    std::vector<E> x = rounded<S>(xf), w = rounded<S>(wf), b = rounded<S>(bf),
                   r = rounded<S>(rf), g = rounded<S>(gf), h = rounded<S>(hf);
    const double eps = 1e-5;
    std::vector<double> want((size_t)m * n), want_sum((size_t)m * n), sv(n);
    for (int i = 0; i < m; ++i) {
        double mu = 0, var = 0;
        for (int j = 0; j < n; ++j) {
            double acc = emu_to_float(b[j]);
            for (int kk = 0; kk < k; ++kk)
                acc += (double)emu_to_float(x[(size_t)i * k + kk]) * emu_to_float(w[(size_t)j * k + kk]);
            const double y = emu_to_float(S::from((float)act_ref(act, acc)));
            const double rv = res ? emu_to_float(r[(size_t)i * n + j]) : 0.0;
            sv[j] = y + rv;
            want_sum[(size_t)i * n + j] = emu_to_float(S::from((float)(y + rv)));
            mu += sv[j];
        }
        mu /= n;
        for (int j = 0; j < n; ++j) var += (sv[j] - mu) * (sv[j] - mu);
        var /= n;
        for (int j = 0; j < n; ++j)
            want[(size_t)i * n + j] = (sv[j] - mu) / std::sqrt(var + eps) * emu_to_float(g[j]) + emu_to_float(h[j]);
    }
    std::vector<E> out((size_t)m * n, S::from(NAN)), sum((size_t)m * n, S::from(NAN));
    typename S::LLNP p{};
    p.linear.x = x.data(); p.linear.w = w.data(); p.linear.bias = b.data();
    p.linear.m = m; p.linear.n = n; p.linear.k = k; p.linear.act = act; p.linear.splits = 1;
    p.norm_residual = res ? r.data() : nullptr;
    p.norm_weight = g.data(); p.norm_bias = h.data(); p.sum_out = sum.data(); p.norm_out = out.data();
    p.eps = (float)eps;
    const unsigned blocks = cdiv(n, 64);
    emu::launch(dim3(blocks, cdiv(m, 128), 1), dim3(128), [&] { S::linear_layer_norm(p); },
                dim3(blocks, 1, 1));
    char name[128];
    snprintf(name, sizeof name, "linear_layer_norm %s %dx%dx%d%s mean %g act %d, cluster %u",
             S::name(), m, n, k, res ? " +res" : "", mean, act, blocks);
    std::vector<float> got(out.size()), got_sum(sum.size());
    for (size_t i = 0; i < got.size(); ++i) got[i] = emu_to_float(out[i]);
    for (size_t i = 0; i < got_sum.size(); ++i) got_sum[i] = emu_to_float(sum[i]);
    // The output rounded to E (2^-9 relative for bf16); y one E ulp off the
    // reference's now and then (f32 sums against f64).
    report(name, got.data(), want, 1e-2);
    report(std::string(name) + " sum_out", got_sum.data(), want_sum, 1e-2);

    // Its products on v6 (warpgroup MMA): the same sums, so the same bits.
    std::vector<E> out_wg((size_t)m * n, S::from(NAN)), sum_wg((size_t)m * n, S::from(NAN));
    typename S::LLNP pw = p;
    pw.norm_out = out_wg.data();
    pw.sum_out = sum_wg.data();
    emu::launch(dim3(blocks, cdiv(m, 128), 1), dim3(128), [&] { S::linear_layer_norm_wgmma(pw); },
                dim3(blocks, 1, 1));
    check_same(std::string(name) + " wgmma", out_wg.data(), out.data(), out.size(), "v5's products");
    check_same(std::string(name) + " wgmma sum_out", sum_wg.data(), sum.data(), sum.size(),
               "v5's products");

    // The two ops.
    std::vector<E> y((size_t)m * n, S::from(NAN)), out2((size_t)m * n, S::from(NAN)),
        sum2((size_t)m * n, S::from(NAN));
    typename S::LP lp = p.linear;
    lp.out = y.data();
    emu::launch(dim3(blocks, cdiv(m, 128), 1), dim3(128), [&] { S::linear_mma_narrow(lp); });
    typename S::NP np{};
    np.x = y.data(); np.residual = res ? r.data() : nullptr; np.weight = g.data(); np.bias = h.data();
    np.out = out2.data(); np.sum_out = sum2.data(); np.rows = m; np.cols = n; np.eps = (float)eps;
    emu::launch(dim3(cdiv(m, 4)), dim3(128), [&] { S::layer_norm(np); });
    check_same(std::string(name) + " sum_out", sum.data(), sum2.data(), sum.size(), "the two ops");
    std::vector<double> two(out2.size());
    for (size_t i = 0; i < two.size(); ++i) two[i] = emu_to_float(out2[i]);
    // Statistics summed in another order: an output rounded the other way
    // now and then.
    report(std::string(name) + " vs the two ops", got.data(), two, 2e-3);
}

// ---------------------------------------------------------------- loss
static void test_loss(int batch, int tokens, int dim, int kind, bool zero_token = false) {
    int t = batch * tokens;
    Buf u(t * dim), v(t * dim);
    u.randn(1.0);
    v.randn(1.0);
    if (zero_token) for (int d = 0; d < dim; ++d) v.p[d] = u.p[d];
    std::vector<double> wg(t * dim), wl(1);
    double total = 0;
    long numel = (long)t * dim;
    for (int i = 0; i < t; ++i) {
        double ss = 0;
        for (int d = 0; d < dim; ++d) { double df = (double)u.p[i * dim + d] - v.p[i * dim + d]; ss += df * df; }
        double dist = std::sqrt(ss);
        total += kind == 1 ? ss : dist;
        for (int d = 0; d < dim; ++d) {
            double df = (double)u.p[i * dim + d] - v.p[i * dim + d];
            wg[i * dim + d] = kind == 1 ? 2 * df / numel : (dist > 0 ? df / (dist * t) : 0);
        }
    }
    wl[0] = kind == 1 ? total / numel : total / t;
    char name[128];
    snprintf(name, sizeof name, "loss %dx%dx%d kind%d%s", batch, tokens, dim, kind, zero_token ? " zero-token" : "");
    for (int variant = 0; variant < 2; ++variant) {
        Buf grad(t * dim), part(t), loss(1);
        LossParams p{};
        p.pred = u.p; p.target = v.p; p.grad = grad.p; p.partial = part.p; p.loss = loss.p;
        p.tokens = t; p.dim = dim; p.kind = kind; p.grad_scale = (float)(2.0 / (double)numel);
        if (variant == 0) {
            emu::launch(dim3(cdiv(t, 128)), dim3(128), [&] { alignment_loss_naive_rows(p); });
            emu::launch(dim3(1), dim3(1), [&] { alignment_loss_naive_finish(p); });
        } else {
            emu::launch(dim3(t), dim3(256), [&] { alignment_loss_rows(p); });
            emu::launch(dim3(1), dim3(256), [&] { alignment_loss_finish(p); });
        }
        std::string v = variant == 0 ? " naive" : " fast";
        report(std::string(name) + v + " loss", loss.p, wl, 1e-5);
        report(std::string(name) + v + " grad", grad.p, wg, 1e-5);
    }
}

// ---------------------------------------------------------------- gather
static void test_gather(int batch, int seq, int n, int ch, bool embeds, bool identity) {
    Buf h(batch * seq * ch), e(batch * seq * ch);
    h.randn(1.0);
    e.randn(1.0);
    std::vector<int> pos(batch * n);
    for (int b = 0; b < batch; ++b) {
        int start = identity ? 0 : (b * 3) % (seq - n + 1);
        for (int i = 0; i < n; ++i) pos[b * n + i] = start + i;
    }
    std::vector<double> want(batch * n * ch);
    for (int b = 0; b < batch; ++b)
        for (int i = 0; i < n; ++i)
            for (int c = 0; c < ch; ++c) {
                int src = (b * seq + pos[b * n + i]) * ch + c;
                want[(b * n + i) * ch + c] = (double)h.p[src] + (embeds ? (double)e.p[src] : 0.0);
            }
    char name[128];
    snprintf(name, sizeof name, "gather B%d T%d n%d C%d%s%s", batch, seq, n, ch, embeds ? " +embeds" : "",
             identity ? " identity" : "");
    for (int variant = 0; variant < 2; ++variant) {
        Buf out(batch * n * ch);
        GatherParams p{};
        p.hidden = h.p; p.embeds = embeds ? e.p : nullptr; p.positions = identity ? nullptr : pos.data();
        p.out = out.p; p.batch = batch; p.seq_len = seq; p.n = n; p.channels = ch;
        long total = (long)batch * n * ch;
        bool vec = variant == 1 && ch % 4 == 0;
        if (variant == 1 && !vec) continue;  // the fast version falls back to naive
        if (vec) emu::launch(dim3(cdiv(total / 4, 256)), dim3(256), [&] { gather_signal_tokens_vec4(p); });
        else emu::launch(dim3(cdiv(total, 256)), dim3(256), [&] { gather_signal_tokens_naive(p); });
        report(std::string(name) + (vec ? " vec4" : " naive"), out.p, want, 1e-7);
    }
}

// The ops a run can name. The first six partition the cases (`--list` prints
// them, so that a runner can give each its own process); `linear_large` and
// `linear_layer_norm` are parts of `linear`.
static const char* const kOps[] = {"gather", "loss", "ln", "absorbed", "attn", "linear",
                                   "linear_large", "linear_layer_norm"};
static const int kPartitionOps = 6;

int main(int argc, char** argv) {
    std::set<std::string> ops;
    bool long_cases = false;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--reverse") emu::reverse_order = true;
        else if (a == "--long") long_cases = true;
        else if (a == "--list") {
            for (int op = 0; op < kPartitionOps; ++op) printf("%s\n", kOps[op]);
            return 0;
        } else if (std::find(std::begin(kOps), std::end(kOps), a) != std::end(kOps)) {
            ops.insert(a);
        } else {
            fprintf(stderr, "run_kernels: unknown op `%s`; the ops are", a.c_str());
            for (const char* op : kOps) fprintf(stderr, " %s", op);
            fprintf(stderr, "\n");
            return 2;
        }
    }
    auto want = [&](const char* op) { return ops.empty() || ops.count(op) > 0; };
    if (want("gather")) {
        test_gather(2, 30, 4, 4096, true, false);
        test_gather(3, 7, 1, 3, false, false);
        test_gather(1, 77, 24, 129, true, false);
        test_gather(2, 5, 5, 8, true, true);
    }
    if (want("loss")) {
        int dims[][3] = {{1, 1, 1}, {1, 77, 768}, {3, 77, 1024}, {2, 1, 512}, {4, 3, 129}};
        for (auto& d : dims)
            for (int kind = 0; kind < 2; ++kind) test_loss(d[0], d[1], d[2], kind);
        test_loss(2, 3, 17, 0, true);
    }
    if (want("ln")) {
        int dims[][2] = {{1, 1}, {3, 3}, {77, 512}, {129, 513}, {5, 4096}, {2, 77}, {3, 9000}, {2, 2049}};
        for (auto& d : dims) {
            test_layer_norm(d[0], d[1], false, 0.0, false);
            test_layer_norm(d[0], d[1], true, 0.0, true);
        }
        test_layer_norm(7, 512, true, 1000.0, true);
        test_layer_norm(7, 512, false, 1000.0, true);
        // Rows held in registers with some lanes idle (36 and 260 columns), and
        // one float4 past what is held (516 columns: the re-read path).
        test_layer_norm(5, 36, true, 0.0, true);
        test_layer_norm(5, 260, false, 0.0, true);
        test_layer_norm(3, 516, true, 0.0, true);
    }
    if (want("absorbed")) {
        // The decoder's cross-attention (image, video), idle lanes (12 and
        // 100 columns), a row wider than v2 holds and one not of float4s (v1
        // alone), heads x keys at the bound, a large mean, scalar loads.
        test_attention_absorbed(2, 77, 4, 4, 512, true, 0.0, 0);
        test_attention_absorbed(1, 9, 24, 4, 512, false, 0.0, 0);
        test_attention_absorbed(3, 5, 1, 1, 12, true, 0.0, 0);
        test_attention_absorbed(2, 7, 5, 3, 100, true, 1000.0, 3);
        test_attention_absorbed(1, 9, 8, 16, 516, false, 0.0, 0);
        test_attention_absorbed(2, 3, 3, 2, 10, true, 0.0, 1);
        // Blocks of several rows, the last one short, across two sequences.
        test_attention_absorbed(2, 7, 4, 4, 64, true, 0.0, 0, 3);
        test_attention_absorbed(3, 5, 6, 2, 36, false, 0.0, 1, 4);
    }
    if (want("attn") && long_cases) {
        test_attention(1, 33, 4096, 2, 64, false, true, false);
        test_attention(1, 4096, 17, 1, 128, false, false, false);
    }
    if (want("attn")) {
        test_attention(1, 77, 77, 4, 128, false, false, true);
        test_attention(2, 77, 4, 4, 128, false, false, false);
        test_attention(3, 1, 1, 4, 128, false, false, true);
        test_attention(1, 3, 129, 2, 64, false, true, false);
        test_attention(2, 129, 129, 2, 64, true, false, true);
        test_attention(2, 77, 513, 1, 128, false, true, false);
        test_attention(1, 513, 77, 4, 64, true, true, false);
        test_attention(1, 5, 3, 3, 8, false, false, false);
        test_attention(2, 64, 64, 8, 64, false, true, true);
        test_attention(1, 19, 23, 2, 6, true, true, false);   // head dim, strides not multiples of 4
        test_attention(2, 9, 9, 3, 5, false, false, true);
        test_attention(1, 9, 40, 2, 6, true, true, false);    // odd head dim: scalar loads
        test_attention(1, 9, 40, 1, 100, false, true, false);  // head dim 100 in the 128 tile
        test_attention(2, 33, 33, 2, 100, true, false, true);
        test_attention(1, 33, 70, 2, 64, false, true, false, false);
        test_attention(2, 45, 37, 3, 40, true, true, false);   // head dim 40 in the 64 tile
        test_attention(1, 70, 70, 2, 72, true, false, true);   // head dim 72 in the 128 tile
        test_attention_half_cases();
        // (batch, lq, lk, heads, head_dim, N, causal, mask, packed, act): the
        // encoder's self-attention and out-projection at batch 1 and 2 (two
        // sequences in a block of 8 rows), 16 rows and 16 keys, heads of 16,
        // 4 and 32 columns (groups of 4, 1 and 8 lanes).
        test_attention_linear(1, 4, 4, 4, 128, 512, false, false, true, 0);
        test_attention_linear(2, 4, 4, 4, 128, 36, false, false, true, 1);
        test_attention_linear(1, 16, 16, 2, 64, 20, false, true, false, 0);
        test_attention_linear(4, 4, 3, 8, 16, 8, false, true, false, 2);
        test_attention_linear(1, 13, 13, 1, 4, 7, true, false, true, 0);
        test_attention_linear(2, 8, 8, 2, 32, 64, true, true, true, 1);
    }
    if (want("linear")) {
        test_tf32_rounding();
        int dims[][3] = {{1, 1, 1}, {3, 5, 7}, {77, 129, 513}, {129, 77, 3}, {4, 512, 4096},
                         {77, 1536, 512}, {154, 512, 2048}, {513, 33, 64}};
        int acts[][3] = {{0, 1, 0}, {1, 1, 1}, {2, 0, 1}, {3, 1, 0}};
        for (auto& d : dims)
            for (auto& a : acts) {
                if ((long)d[0] * d[1] * d[2] > 5000000 && a[0] != 1) continue;  // emulation time
                test_linear(d[0], d[1], d[2], a[0], a[1], a[2]);
            }
        test_linear(9, 70, 36, 1, true, true, 1);  // misaligned x: scalar path
        test_linear(130, 200, 72, 1, true, false);  // 128x128 tiles' edges, K tail
        test_linear(13, 70, 258, 1, true, true);    // v4: two row groups, K tail, N % 4
        test_linear(16, 36, 2048, 3, true, false);  // v4: two chunks per thread
        test_layer_norm_linear(4, 512, 512, true, 0.0, 0);    // batch 1's encoder QKV
        test_layer_norm_linear(4, 64, 512, false, 1000.0, 1); // no residual, large mean
        test_layer_norm_linear(13, 70, 36, true, 1000.0, 1);  // two row groups, N % 4, K < 32 x 4
        test_layer_norm_linear(16, 36, 1024, true, 3.0, 2);   // 256 threads
        test_layer_norm_linear(1, 5, 4, true, 0.0, 0);        // one live thread
        test_layer_norm_linear(77, 130, 200, true, 3.0, 1);   // tiled: 2 row tiles, 4 splits, K tail
        test_layer_norm_linear(70, 64, 512, true, 1000.0, 0); // tiled: 8 splits, large mean
        test_layer_norm_linear(77, 200, 1000, true, 3.0, 1);  // tiled: 8 splits of 2 steps, K tail
        test_layer_norm_linear(77, 1536, 512, true, 0.0, 0);  // batch 1's decoder QKV (f32)
        test_layer_norm_linear_half<HalfF16>(77, 130, 200, true, 3.0);
        test_layer_norm_linear_half<HalfBF16>(77, 130, 200, true, 3.0);
        test_layer_norm_linear_half<HalfBF16>(70, 64, 512, false, 100.0);
        test_layer_norm_linear_half<HalfF16>(5, 8, 40, true, 0.0);  // one step, no cluster
    }
    // 16-bit GEMMs; `linear_large`: only their 128-row tiles (v3's large, v5
    // and v6), the pipelines a race check needs most.
    const bool large_only = !want("linear") && want("linear_large");
    if (want("linear") || large_only) {
        const int half_dims[][3] = {{130, 200, 72}, {77, 129, 40}, {3, 5, 7}, {64, 128, 256},
                                    {13, 70, 1030}, {4, 64, 2048},
                                    {200, 136, 296}};
        for (auto& d : half_dims) {
            test_linear_half<HalfF16>(d[0], d[1], d[2], large_only);
            test_linear_half<HalfBF16>(d[0], d[1], d[2], large_only);
        }
    }
    if (want("linear") || want("linear_layer_norm")) {
        // (m, n, k, residual, mean, act): batch 64's N = 512 (a cluster of
        // 8), a ragged row tile; 3 blocks with 8 live columns in the last;
        // one block; no residual; a large mean.
        test_linear_layer_norm_half<HalfBF16>(133, 512, 40, true, 0.0, 0);
        test_linear_layer_norm_half<HalfF16>(133, 512, 40, true, 0.0, 1);
        test_linear_layer_norm_half<HalfBF16>(70, 136, 72, true, 3.0, 1);
        test_linear_layer_norm_half<HalfF16>(5, 64, 16, false, 0.0, 0);
        test_linear_layer_norm_half<HalfBF16>(129, 256, 32, true, 100.0, 0);
    }
    printf("emulated kernels: %d comparisons failed (%ld fiber switches)\n", failures, emu::switches);
    return failures ? 1 : 0;
}
