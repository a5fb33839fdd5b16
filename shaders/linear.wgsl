// linear: out[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n]) + residual[m, n]
// x [M, K] row-major, w [N, K] (PyTorch layout), bias [N], residual/out [M, N].
// Storage is `elem` (f32 or f16, defined by the backend before this source),
// w's too or its own (read through `w_at` / `w4_at`, below); every product and
// sum is f32.
//
// Entry points:
//   linear_v1            naive: one invocation per output, a loop over K. The
//                        baseline in benchmarks and a second oracle in tests.
//   linear / linear_s    tiled GEMM: a 32x128 output block per workgroup of 64,
//                        K in steps of 16 staged in workgroup memory, 8x8
//                        outputs per invocation. `linear` fills the tiles with
//                        vec4 loads (needs K % 4 == 0 and vec4-aligned
//                        tensors), `linear_s` with scalar loads (any shape).
//   linear_split /       the same blocks over one slice of K each (split-K,
//   linear_split_s       for a GPU when the blocks are too few to fill it: the
//                        decoder at batch 1 is 77 x 512, 12 blocks), their
//                        f32 sums written to `partials`;
//   linear_split_sum     then one invocation per output adds its slices in
//                        order and finishes it.
//   linear_rows /        few rows (the projector at batch 1: M = 4): a 4x32
//   linear_rows_s        output block per workgroup of 64, K split over 16
//                        invocations that each stream their own slice of x and
//                        w, then a reduction in workgroup memory. A 32-row tile
//                        would mostly multiply padding. Tuned for CPU adapters.
//   linear_rows_narrow / the same for a GPU: a 4x8 block per workgroup of 128,
//   linear_rows_narrow_s K split over 64 invocations. M = 4, N = 512 is 64
//                        workgroups (8192 invocations), where the 4x32 blocks
//                        give 16: too few for a GPU's compute units.
//
// Both operands are K-contiguous and read along K: x[m, k..k+4] and
// w[n, k..k+4] are vec4s, so neither needs a transpose and a vec4 path moves
// each tile row with whole-vec4 loads and stores.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    act: u32,          // 0 none, 1 relu, 2 gelu (erf), 3 gelu (tanh)
    has_bias: u32,
    has_residual: u32,
    groups_x: u32,     // workgroups per row of the dispatch grid
    blocks_n: u32,     // output blocks along N (tiled and rows kernels)
    blocks: u32,       // output blocks in all
    splits: u32,       // slices of K (split-K kernels)
    k_split: u32,      // K per slice, a multiple of BK
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<elem>;
// w (binding 2) is declared by the backend before this source, with
// `w_at(i)` and `w4_at(i)` that read element i and vec4 i as f32: in `elem`,
// or packed two 16-bit weights to a word (`WgpuOptions::weights`).
@group(0) @binding(3) var<storage, read> bias: array<elem>;
@group(0) @binding(4) var<storage, read> residual: array<elem>;
@group(0) @binding(5) var<storage, read_write> out: array<elem>;
// The same x seen as vec4s, used only by the vec4 entry points (an entry
// point binds only the variables it uses).
@group(0) @binding(1) var<storage, read> x4: array<elem4>;
// Split-K's f32 partial sums [splits, M, N]: written at binding 5 by
// linear_split(_s), read at binding 1 by linear_split_sum.
@group(0) @binding(5) var<storage, read_write> partials: array<f32>;
@group(0) @binding(1) var<storage, read> partials_in: array<f32>;

// ---------------------------------------------------------------------------
// Epilogue: bias, activation, residual.

// 1 + erf(a), accurate to ~1e-7 absolute, and relative where it is tiny (a << 0),
// so that gelu(x) = 0.5 x (1 + erf(x / sqrt 2)) stays accurate for negative x.
// |a| < 0.875: erf(a) = a P(a^2), P of degree 5 (relative error 8.5e-9).
// |a| >= 0.875: erfc(|a|) = exp(Q(|a| - 2.9375) - a^2), Q of degree 9 fitted on
// [0.875, 5] (relative error 2.8e-8); past 5, erfc < 2e-12 is dropped.
// Both fits are weighted least squares iterated to near-minimax against mpmath.
fn one_plus_erf(a: f32) -> f32 {
    let t = abs(a);
    if (t < 0.875) {
        let s = a * a;
        var r = -6.203351077e-04;
        r = fma(r, s, 5.032201763e-03);
        r = fma(r, s, -2.679147944e-02);
        r = fma(r, s, 1.128245592e-01);
        r = fma(r, s, -3.761255145e-01);
        r = fma(r, s, 1.128379107e+00);
        return 1.0 + a * r;
    }
    if (t > 5.0) {
        return select(2.0, 0.0, a < 0.0);
    }
    let u = t - 2.9375;
    var q = -9.795987665e-08;
    q = fma(q, u, 1.181040261e-06);
    q = fma(q, u, -7.931641449e-06);
    q = fma(q, u, 4.630303374e-05);
    q = fma(q, u, -2.618529834e-04);
    q = fma(q, u, 1.432613470e-03);
    q = fma(q, u, -7.760563400e-03);
    q = fma(q, u, 4.402789101e-02);
    q = fma(q, u, -3.091674745e-01);
    q = fma(q, u, -1.701210141e+00);
    let erfc = exp(q - t * t);
    return select(2.0 - erfc, erfc, a < 0.0);
}

fn activate(v: f32) -> f32 {
    switch p.act {
        case 1u: {
            return max(v, 0.0);
        }
        case 2u: {
            return 0.5 * v * one_plus_erf(v * 0.70710678118654752);
        }
        case 3u: {
            // 0.5 v (1 + tanh(y)) = v / (1 + exp(-2y)): no cancellation for
            // negative v, and exp overflowing to inf gives the right limit 0.
            let y = 0.7978845608028654 * (v + 0.044715 * v * v * v);
            return v / (1.0 + exp(-2.0 * y));
        }
        default: {
            return v;
        }
    }
}

fn finish(m: u32, n: u32, acc: f32) {
    var v = acc;
    if (p.has_bias != 0u) {
        v += f32(bias[n]);
    }
    v = activate(v);
    let o = m * p.n + n;
    if (p.has_residual != 0u) {
        v += f32(residual[o]);
    }
    out[o] = elem(v);
}

// ---------------------------------------------------------------------------
// v1: naive.

// The output of an invocation of the one-per-output grids (v1, split-K's sum):
// 64 per workgroup, `groups_x` workgroups per grid row.
fn output_of(gid: vec3<u32>) -> u32 {
    return gid.x + gid.y * p.groups_x * 64u;
}

@compute @workgroup_size(64)
fn linear_v1(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = output_of(gid);
    if (i >= p.m * p.n) {
        return;
    }
    let m = i / p.n;
    let n = i % p.n;
    var acc = 0.0;
    for (var k = 0u; k < p.k; k++) {
        acc = fma(f32(x[m * p.k + k]), w_at(n * p.k + k), acc);
    }
    finish(m, n, acc);
}

// ---------------------------------------------------------------------------
// Tiled GEMM. Invocation (tm, tn) of the 4x16 grid owns rows tm + 4i and
// columns tn + 16j (i, j < 8) of the block: interleaved, so consecutive
// invocations read the same A row (a broadcast) and consecutive padded B rows,
// and store consecutive outputs.
//
// Each vec4 read from a tile feeds eight 4-term dot products: half the reads
// per multiply-add of a 4x4 micro-tile. Reads are what costs, on a GPU and far
// more on lavapipe, where every load is a loop over the SIMD lanes.
// Workgroup memory: (32 + 128) rows x 5 vec4s = 12800 bytes.

const BM: u32 = 32u;
const BN: u32 = 128u;
const BK: u32 = 16u;
const RS: u32 = BM / 8u; // invocations along M: row stride of a micro-tile
const CS: u32 = BN / 8u; // invocations along N: column stride
const THREADS: u32 = RS * CS;
// Tile rows are K-contiguous: BK / 4 vec4s plus one of padding, which keeps
// the vec4 reads of consecutive rows on distinct banks.
const ROW4: u32 = BK / 4u + 1u;

var<workgroup> ta: array<vec4<f32>, BM * ROW4>;
var<workgroup> tb: array<vec4<f32>, BN * ROW4>;

struct Block {
    live: bool,
    m0: u32,
    n0: u32,
}

fn flat_of(wg: vec3<u32>) -> u32 {
    return wg.x + wg.y * p.groups_x;
}

// Block `i` of the output. Consecutive blocks share a row block: its x rows
// stay in cache.
fn block_at(i: u32, bm: u32, bn: u32) -> Block {
    return Block(i < p.blocks, (i / p.blocks_n) * bm, (i % p.blocks_n) * bn);
}

fn block_of(wg: vec3<u32>, bm: u32, bn: u32) -> Block {
    return block_at(flat_of(wg), bm, bn);
}

// x[m0.., k0..] and w[n0.., k0..] into the tiles, zero outside the matrices.
// vec4 version: K % 4 == 0, so a vec4 is wholly inside or outside.
fn stage_vec4(m0: u32, n0: u32, k0: u32, lid: u32) {
    let k4 = p.k / 4u;
    for (var r = 0u; r < BM * BK / 4u / THREADS; r++) {
        let idx = lid + THREADS * r;
        let row = idx / (BK / 4u);
        let kq = idx % (BK / 4u);
        let kv = k0 / 4u + kq;
        var v = vec4<f32>(0.0);
        if (m0 + row < p.m && kv < k4) {
            v = vec4<f32>(x4[(m0 + row) * k4 + kv]);
        }
        ta[row * ROW4 + kq] = v;
    }
    for (var r = 0u; r < BN * BK / 4u / THREADS; r++) {
        let idx = lid + THREADS * r;
        let row = idx / (BK / 4u);
        let kq = idx % (BK / 4u);
        let kv = k0 / 4u + kq;
        var v = vec4<f32>(0.0);
        if (n0 + row < p.n && kv < k4) {
            v = w4_at((n0 + row) * k4 + kv);
        }
        tb[row * ROW4 + kq] = v;
    }
}

// Scalar version, any K: consecutive invocations take consecutive k.
fn stage_scalar(m0: u32, n0: u32, k0: u32, lid: u32) {
    for (var r = 0u; r < BM * BK / THREADS; r++) {
        let idx = lid + THREADS * r;
        let row = idx / BK;
        let kk = idx % BK;
        var v = 0.0;
        if (m0 + row < p.m && k0 + kk < p.k) {
            v = f32(x[(m0 + row) * p.k + k0 + kk]);
        }
        ta[row * ROW4 + kk / 4u][kk % 4u] = v;
    }
    for (var r = 0u; r < BN * BK / THREADS; r++) {
        let idx = lid + THREADS * r;
        let row = idx / BK;
        let kk = idx % BK;
        var v = 0.0;
        if (n0 + row < p.n && k0 + kk < p.k) {
            v = w_at((n0 + row) * p.k + k0 + kk);
        }
        tb[row * ROW4 + kk / 4u][kk % 4u] = v;
    }
}

// (a . b0, a . b1, a . b2, a . b3) over four consecutive k.
fn dots(a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
}

// One BK step of the 8x8 micro-tile. acc[2i] holds columns tn + 8j for
// j < 4 of row tm + 4i, acc[2i + 1] those for j >= 4. Unrolled by hand: a
// loop over i would index `acc` dynamically, which some compilers keep in
// memory instead of registers.
fn multiply(tm: u32, tn: u32, acc: ptr<function, array<vec4<f32>, 16>>) {
    for (var kq = 0u; kq < BK / 4u; kq++) {
        let b0 = tb[(tn) * ROW4 + kq];
        let b1 = tb[(tn + 1u * CS) * ROW4 + kq];
        let b2 = tb[(tn + 2u * CS) * ROW4 + kq];
        let b3 = tb[(tn + 3u * CS) * ROW4 + kq];
        let b4 = tb[(tn + 4u * CS) * ROW4 + kq];
        let b5 = tb[(tn + 5u * CS) * ROW4 + kq];
        let b6 = tb[(tn + 6u * CS) * ROW4 + kq];
        let b7 = tb[(tn + 7u * CS) * ROW4 + kq];
        let a0 = ta[(tm) * ROW4 + kq];
        (*acc)[0] += dots(a0, b0, b1, b2, b3);
        (*acc)[1] += dots(a0, b4, b5, b6, b7);
        let a1 = ta[(tm + 1u * RS) * ROW4 + kq];
        (*acc)[2] += dots(a1, b0, b1, b2, b3);
        (*acc)[3] += dots(a1, b4, b5, b6, b7);
        let a2 = ta[(tm + 2u * RS) * ROW4 + kq];
        (*acc)[4] += dots(a2, b0, b1, b2, b3);
        (*acc)[5] += dots(a2, b4, b5, b6, b7);
        let a3 = ta[(tm + 3u * RS) * ROW4 + kq];
        (*acc)[6] += dots(a3, b0, b1, b2, b3);
        (*acc)[7] += dots(a3, b4, b5, b6, b7);
        let a4 = ta[(tm + 4u * RS) * ROW4 + kq];
        (*acc)[8] += dots(a4, b0, b1, b2, b3);
        (*acc)[9] += dots(a4, b4, b5, b6, b7);
        let a5 = ta[(tm + 5u * RS) * ROW4 + kq];
        (*acc)[10] += dots(a5, b0, b1, b2, b3);
        (*acc)[11] += dots(a5, b4, b5, b6, b7);
        let a6 = ta[(tm + 6u * RS) * ROW4 + kq];
        (*acc)[12] += dots(a6, b0, b1, b2, b3);
        (*acc)[13] += dots(a6, b4, b5, b6, b7);
        let a7 = ta[(tm + 7u * RS) * ROW4 + kq];
        (*acc)[14] += dots(a7, b0, b1, b2, b3);
        (*acc)[15] += dots(a7, b4, b5, b6, b7);
    }
}

fn store_block(b: Block, tm: u32, tn: u32, acc: array<vec4<f32>, 16>) {
    for (var i = 0u; i < 8u; i++) {
        let m = b.m0 + tm + RS * i;
        for (var j = 0u; j < 8u; j++) {
            let n = b.n0 + tn + CS * j;
            if (m < p.m && n < p.n) {
                finish(m, n, acc[2u * i + j / 4u][j % 4u]);
            }
        }
    }
}

// The block's sums over K in [k0, k1), k0 a multiple of BK: vec4 staging.
fn sums_vec4(b: Block, k0: u32, k1: u32, lid: u32) -> array<vec4<f32>, 16> {
    var acc: array<vec4<f32>, 16>;
    for (var k = k0; k < k1; k += BK) {
        stage_vec4(b.m0, b.n0, k, lid);
        workgroupBarrier();
        multiply(lid / CS, lid % CS, &acc);
        workgroupBarrier();
    }
    return acc;
}

// The same with scalar staging.
fn sums_scalar(b: Block, k0: u32, k1: u32, lid: u32) -> array<vec4<f32>, 16> {
    var acc: array<vec4<f32>, 16>;
    for (var k = k0; k < k1; k += BK) {
        stage_scalar(b.m0, b.n0, k, lid);
        workgroupBarrier();
        multiply(lid / CS, lid % CS, &acc);
        workgroupBarrier();
    }
    return acc;
}

@compute @workgroup_size(THREADS)
fn linear(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = block_of(wg, BM, BN);
    if (!b.live) {
        return;
    }
    store_block(b, lid / CS, lid % CS, sums_vec4(b, 0u, p.k, lid));
}

@compute @workgroup_size(THREADS)
fn linear_s(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = block_of(wg, BM, BN);
    if (!b.live) {
        return;
    }
    store_block(b, lid / CS, lid % CS, sums_scalar(b, 0u, p.k, lid));
}

// Split-K: workgroup s * blocks + i sums block i over slice s of K.
struct Slice {
    live: bool,
    b: Block,
    s: u32,
    k0: u32,
    k1: u32,
}

fn slice_of(wg: vec3<u32>) -> Slice {
    let flat = flat_of(wg);
    let s = flat / p.blocks;
    let k0 = s * p.k_split;
    return Slice(s < p.splits, block_at(flat % p.blocks, BM, BN), s, k0, min(p.k, k0 + p.k_split));
}

fn store_partials(sl: Slice, tm: u32, tn: u32, acc: array<vec4<f32>, 16>) {
    let base = sl.s * p.m * p.n;
    for (var i = 0u; i < 8u; i++) {
        let m = sl.b.m0 + tm + RS * i;
        for (var j = 0u; j < 8u; j++) {
            let n = sl.b.n0 + tn + CS * j;
            if (m < p.m && n < p.n) {
                partials[base + m * p.n + n] = acc[2u * i + j / 4u][j % 4u];
            }
        }
    }
}

@compute @workgroup_size(THREADS)
fn linear_split(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let sl = slice_of(wg);
    if (!sl.live) {
        return;
    }
    store_partials(sl, lid / CS, lid % CS, sums_vec4(sl.b, sl.k0, sl.k1, lid));
}

@compute @workgroup_size(THREADS)
fn linear_split_s(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let sl = slice_of(wg);
    if (!sl.live) {
        return;
    }
    store_partials(sl, lid / CS, lid % CS, sums_scalar(sl.b, sl.k0, sl.k1, lid));
}

@compute @workgroup_size(64)
fn linear_split_sum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let o = output_of(gid);
    let mn = p.m * p.n;
    if (o >= mn) {
        return;
    }
    var sum = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        sum += partials_in[s * mn + o];
    }
    finish(o / p.n, o % p.n, sum);
}

// ---------------------------------------------------------------------------
// Few rows: a 4-row x 32-column block per workgroup of 64. Invocation (ks, c)
// takes columns c + 4j (j < 8) and every 16th vec4 of K starting at ks, so
// 16 consecutive invocations read consecutive vec4s of each row; x and w are
// read straight from memory (each x vec4 feeds 8 columns, each w vec4 the 4
// rows). Rows past M repeat row M - 1 (valid memory, results dropped).

const RM: u32 = 4u;
const RN: u32 = 32u;
const KS: u32 = 16u;

// 32 sums x 64 invocations, or 16 x 128 for the narrow blocks (8192 bytes).
var<workgroup> partial: array<f32, 2048>;

// Sum the 16 K-slices of every output and write the block: invocation o
// finishes outputs o and o + 64 (row o / 32, column o % 32 = c + 4j).
fn reduce_rows(b: Block, lid: u32, acc: array<vec4<f32>, 8>) {
    for (var s = 0u; s < 32u; s++) {
        partial[s * 64u + lid] = acc[s / 4u][s % 4u];
    }
    workgroupBarrier();
    for (var h = 0u; h < 2u; h++) {
        let o = lid + 64u * h;
        let i = o / 32u;
        let col = o % 32u;
        let c = col % 4u;
        let j = col / 4u;
        // acc[2i + j / 4][j % 4] of invocation ks + 16c.
        let base = (8u * i + j) * 64u + c * KS;
        var sum = 0.0;
        for (var ks = 0u; ks < KS; ks++) {
            sum += partial[base + ks];
        }
        let m = b.m0 + i;
        let n = b.n0 + col;
        if (m < p.m && n < p.n) {
            finish(m, n, sum);
        }
    }
}

// Offsets (in units of `stride`) of the block's 4 x rows, then of w rows
// c + step * j (j < 8), both clamped to the matrices.
fn rows_index(b: Block, c: u32, step: u32, stride: u32) -> array<u32, 12> {
    var r: array<u32, 12>;
    for (var i = 0u; i < 4u; i++) {
        r[i] = min(b.m0 + i, p.m - 1u) * stride;
    }
    for (var j = 0u; j < 8u; j++) {
        r[4u + j] = min(b.n0 + c + step * j, p.n - 1u) * stride;
    }
    return r;
}

@compute @workgroup_size(64)
fn linear_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = block_of(wg, RM, RN);
    if (!b.live) {
        return;
    }
    let ks = lid % KS;
    let k4 = p.k / 4u;
    let r = rows_index(b, lid / KS, 4u, k4);
    var acc: array<vec4<f32>, 8>;
    for (var kv = ks; kv < k4; kv += KS) {
        let b0 = w4_at(r[4] + kv);
        let b1 = w4_at(r[5] + kv);
        let b2 = w4_at(r[6] + kv);
        let b3 = w4_at(r[7] + kv);
        let b4 = w4_at(r[8] + kv);
        let b5 = w4_at(r[9] + kv);
        let b6 = w4_at(r[10] + kv);
        let b7 = w4_at(r[11] + kv);
        let a0 = vec4<f32>(x4[r[0] + kv]);
        acc[0] += dots(a0, b0, b1, b2, b3);
        acc[1] += dots(a0, b4, b5, b6, b7);
        let a1 = vec4<f32>(x4[r[1] + kv]);
        acc[2] += dots(a1, b0, b1, b2, b3);
        acc[3] += dots(a1, b4, b5, b6, b7);
        let a2 = vec4<f32>(x4[r[2] + kv]);
        acc[4] += dots(a2, b0, b1, b2, b3);
        acc[5] += dots(a2, b4, b5, b6, b7);
        let a3 = vec4<f32>(x4[r[3] + kv]);
        acc[6] += dots(a3, b0, b1, b2, b3);
        acc[7] += dots(a3, b4, b5, b6, b7);
    }
    reduce_rows(b, lid, acc);
}

@compute @workgroup_size(64)
fn linear_rows_s(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = block_of(wg, RM, RN);
    if (!b.live) {
        return;
    }
    let ks = lid % KS;
    let r = rows_index(b, lid / KS, 4u, p.k);
    var acc: array<vec4<f32>, 8>;
    for (var k = ks; k < p.k; k += KS) {
        let b03 = vec4<f32>(w_at(r[4] + k), w_at(r[5] + k), w_at(r[6] + k), w_at(r[7] + k));
        let b47 = vec4<f32>(w_at(r[8] + k), w_at(r[9] + k), w_at(r[10] + k), w_at(r[11] + k));
        let a0 = f32(x[r[0] + k]);
        acc[0] = fma(vec4<f32>(a0), b03, acc[0]);
        acc[1] = fma(vec4<f32>(a0), b47, acc[1]);
        let a1 = f32(x[r[1] + k]);
        acc[2] = fma(vec4<f32>(a1), b03, acc[2]);
        acc[3] = fma(vec4<f32>(a1), b47, acc[3]);
        let a2 = f32(x[r[2] + k]);
        acc[4] = fma(vec4<f32>(a2), b03, acc[4]);
        acc[5] = fma(vec4<f32>(a2), b47, acc[5]);
        let a3 = f32(x[r[3] + k]);
        acc[6] = fma(vec4<f32>(a3), b03, acc[6]);
        acc[7] = fma(vec4<f32>(a3), b47, acc[7]);
    }
    reduce_rows(b, lid, acc);
}

// ---------------------------------------------------------------------------
// Few rows on a GPU: a 4-row x 8-column block per workgroup of 128.
// Invocation (ks, c) = (lid % 64, lid / 64) takes columns c + 2j (j < 4) and
// every 64th vec4 of K starting at ks: 64 consecutive invocations read 1 KiB
// of a weight row in one sweep. Each x vec4 feeds 4 columns, half the reuse of
// the 4x32 blocks: x is small and stays in cache, and a GPU wants the
// workgroups more. (lavapipe runs the 4x512x4096 GEMM 2x slower this way.)

const NN: u32 = 8u;
const NKS: u32 = 64u;
const NTHREADS: u32 = 128u;

var<workgroup> quarter: array<f32, 128>; // 32 outputs x 4 quarter sums

// Sum the 64 K-slices of every output and write the block. Invocation
// 4o + q sums a quarter of output o's slices (row o / 8, column o % 8 =
// c + 2j); then the first 32 invocations add the quarters and finish.
fn reduce_rows_narrow(b: Block, lid: u32, acc: array<vec4<f32>, 4>) {
    for (var s = 0u; s < 16u; s++) {
        partial[s * NTHREADS + lid] = acc[s / 4u][s % 4u];
    }
    workgroupBarrier();
    let o = lid / 4u;
    let col = o % NN;
    // acc[o / 8][col / 2] of invocations ks + 64 (col % 2), ks in quarter lid % 4.
    let base = (4u * (o / NN) + col / 2u) * NTHREADS + (col % 2u) * NKS + (lid % 4u) * (NKS / 4u);
    var sum = 0.0;
    for (var t = 0u; t < NKS / 4u; t++) {
        sum += partial[base + t];
    }
    quarter[lid] = sum;
    workgroupBarrier();
    if (lid < RM * NN) {
        let q = 4u * lid;
        let m = b.m0 + lid / NN;
        let n = b.n0 + lid % NN;
        if (m < p.m && n < p.n) {
            finish(m, n, (quarter[q] + quarter[q + 1u]) + (quarter[q + 2u] + quarter[q + 3u]));
        }
    }
}

@compute @workgroup_size(NTHREADS)
fn linear_rows_narrow(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = block_of(wg, RM, NN);
    if (!b.live) {
        return;
    }
    let ks = lid % NKS;
    let k4 = p.k / 4u;
    let r = rows_index(b, lid / NKS, 2u, k4);
    var acc: array<vec4<f32>, 4>;
    for (var kv = ks; kv < k4; kv += NKS) {
        let b0 = w4_at(r[4] + kv);
        let b1 = w4_at(r[5] + kv);
        let b2 = w4_at(r[6] + kv);
        let b3 = w4_at(r[7] + kv);
        acc[0] += dots(vec4<f32>(x4[r[0] + kv]), b0, b1, b2, b3);
        acc[1] += dots(vec4<f32>(x4[r[1] + kv]), b0, b1, b2, b3);
        acc[2] += dots(vec4<f32>(x4[r[2] + kv]), b0, b1, b2, b3);
        acc[3] += dots(vec4<f32>(x4[r[3] + kv]), b0, b1, b2, b3);
    }
    reduce_rows_narrow(b, lid, acc);
}

@compute @workgroup_size(NTHREADS)
fn linear_rows_narrow_s(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = block_of(wg, RM, NN);
    if (!b.live) {
        return;
    }
    let ks = lid % NKS;
    let r = rows_index(b, lid / NKS, 2u, p.k);
    var acc: array<vec4<f32>, 4>;
    for (var k = ks; k < p.k; k += NKS) {
        let bk = vec4<f32>(w_at(r[4] + k), w_at(r[5] + k), w_at(r[6] + k), w_at(r[7] + k));
        acc[0] = fma(vec4<f32>(f32(x[r[0] + k])), bk, acc[0]);
        acc[1] = fma(vec4<f32>(f32(x[r[1] + k])), bk, acc[1]);
        acc[2] = fma(vec4<f32>(f32(x[r[2] + k])), bk, acc[2]);
        acc[3] = fma(vec4<f32>(f32(x[r[3] + k])), bk, acc[3]);
    }
    reduce_rows_narrow(b, lid, acc);
}
