// attention: multi-head scaled-dot-product attention,
//   out[b, i, h*hd + t] = sum_j p_j V[b, j, h*hd + t],
//   p = softmax_j(scale * Q[b, i, h-block] . K[b, j, h-block]) over the visible keys,
// where key j is visible to query i unless the padding mask ignores it or (causal)
// j > i. A query with no visible key writes zeros. Q, K, V are column blocks of
// row-major [B, L, W] tensors read with their own row stride and first column;
// the output is [B, Lq, heads*hd], contiguous. `elem` (f32 or f16) is defined by
// the backend before this source; all arithmetic is f32.
//
// Versions side by side, as llm.c keeps them:
//   attention_v1: one invocation per (b, h, i), two passes over the keys straight
//     from global memory (the max, then the sum and the weighted V). The
//     baseline and a second oracle. Any head dim.
//   attention / attention_d64: flash-style. A workgroup per (b, h, tile of BQ
//     queries); K/V tiles of BK keys staged in workgroup memory; online softmax
//     (running max and sum, the accumulator rescaled once per tile); scores never
//     leave the workgroup. Any device, any column alignment, head dim <= 128
//     (<= 64 for _d64, whose loops are shorter).
//   attention_sg / attention_sg_d64: the same online softmax, but the invocations
//     of a subgroup share K/V through subgroupBroadcast instead of workgroup
//     memory. Needs SUBGROUP, subgroups of >= 8 and 4-aligned columns. The
//     fastest where it runs, by far on lavapipe (see below).
// The host picks one (src/wgpu/attention.rs); head dims above 128 run v1.
//
// The file is two modules: this head plus the part after `//! plain:`, and this
// head plus the part after `//! subgroup:` (a device without SUBGROUP rejects a
// module that merely mentions a subgroup builtin).
//
// Lavapipe (llvmpipe, Mesa 22.3), what the designs answer to:
//   - an invocation runs as one lane of an 8-wide SIMD loop, and every storage or
//     workgroup-memory access becomes a loop over the 8 lanes (~25 instructions
//     per lane for a vec4), while arithmetic is one vector instruction for all 8.
//     So the cost is the number of memory instructions; a subgroupBroadcast from
//     a constant lane is a register shuffle, which is why attention_sg wins.
//   - loops up to 32 iterations are unrolled only when small or when they index
//     a function-local array; elsewhere arrays indexed by a loop counter are
//     per-lane gathers.
//   - an invocation is stopped after 65535 loop iterations in total (every loop,
//     each entry counting at least one), silently leaving wrong results. Per key
//     this allows Lk up to about 3200 (v1, hd 128), 4600 (v1, hd 64), 11000
//     (attention) and 27000 (attention_sg, hd 128) on lavapipe. Real GPUs have
//     no such limit.

struct Params {
    batch: u32,
    lq: u32,
    lk: u32,
    heads: u32,
    head_dim: u32,
    q_stride: u32,
    k_stride: u32,
    v_stride: u32,
    q_start: u32,
    k_start: u32,
    v_start: u32,
    causal: u32,
    has_mask: u32,
    // scale * log2(e): scores live in the log2 domain so softmax uses exp2.
    scale_log2: f32,
    // v1: invocations per row of the dispatch grid; fast: workgroups per row.
    row_stride: u32,
    q_tiles: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Finite stand-in for -inf: WGSL need not honour infinities, and
// exp2(NEG - x) still underflows to 0 for any real score x.
const NEG: f32 = -3.0e38;

@group(0) @binding(4) var<storage, read> mask: array<u32>;

fn key_ignored(b: u32, j: u32) -> bool {
    return p.has_mask != 0u && mask[b * p.lk + j] != 0u;
}

//! plain: v1 and the workgroup-memory flash kernel; any device, any alignment

@group(0) @binding(1) var<storage, read> q: array<elem>;
@group(0) @binding(2) var<storage, read> k: array<elem>;
@group(0) @binding(3) var<storage, read> v: array<elem>;
@group(0) @binding(5) var<storage, read_write> out: array<elem>;

// ---------------------------------------------------------------- v1 (naive)
//
// Dim loops take V1_STEP dims per iteration, written out (a loop would not be
// unrolled on lavapipe), to spend less of lavapipe's loop budget per key.

const V1_WG: u32 = 64u;
// Dims accumulated per pass over the keys; head dims above it repeat pass 2.
const V1_CHUNK: u32 = 128u;
const V1_STEP: u32 = 32u;

fn q4(i: u32) -> vec4<f32> {
    return vec4<f32>(f32(q[i]), f32(q[i + 1u]), f32(q[i + 2u]), f32(q[i + 3u]));
}

fn k4(i: u32) -> vec4<f32> {
    return vec4<f32>(f32(k[i]), f32(k[i + 1u]), f32(k[i + 2u]), f32(k[i + 3u]));
}

fn v4(i: u32) -> vec4<f32> {
    return vec4<f32>(f32(v[i]), f32(v[i + 1u]), f32(v[i + 2u]), f32(v[i + 3u]));
}

fn dot16(qi: u32, ki: u32) -> vec4<f32> {
    return q4(qi) * k4(ki) + q4(qi + 4u) * k4(ki + 4u) + q4(qi + 8u) * k4(ki + 8u)
        + q4(qi + 12u) * k4(ki + 12u);
}

// scale * log2(e) * (q . k) over hd dims from element offsets qrow, krow.
fn v1_score(qrow: u32, krow: u32, hd: u32) -> f32 {
    var d4 = vec4<f32>(0.0);
    var t = 0u;
    for (; t + V1_STEP <= hd; t += V1_STEP) {
        d4 += dot16(qrow + t, krow + t) + dot16(qrow + t + 16u, krow + t + 16u);
    }
    var dot = d4.x + d4.y + d4.z + d4.w;
    for (; t < hd; t++) {
        dot += f32(q[qrow + t]) * f32(k[krow + t]);
    }
    return dot * p.scale_log2;
}

@compute @workgroup_size(V1_WG)
fn attention_v1(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x + gid.y * p.row_stride;
    if (n >= p.batch * p.heads * p.lq) {
        return;
    }
    let i = n % p.lq;
    let bh = n / p.lq;
    let h = bh % p.heads;
    let b = bh / p.heads;
    let hd = p.head_dim;
    let qrow = (b * p.lq + i) * p.q_stride + p.q_start + h * hd;
    let orow = (b * p.lq + i) * p.heads * hd + h * hd;
    var kend = p.lk;
    if (p.causal != 0u) {
        kend = min(p.lk, i + 1u);
    }

    // Pass 1: the largest visible score.
    var m = NEG;
    var seen = false;
    for (var j = 0u; j < kend; j++) {
        if (key_ignored(b, j)) {
            continue;
        }
        let krow = (b * p.lk + j) * p.k_stride + p.k_start + h * hd;
        m = max(m, v1_score(qrow, krow, hd));
        seen = true;
    }
    if (!seen) {
        for (var t = 0u; t < hd; t++) {
            out[orow + t] = elem(0.0);
        }
        return;
    }

    // Pass 2: the denominator and the weighted sum of V, V1_CHUNK dims at a time.
    var acc: array<vec4<f32>, V1_CHUNK / 4u>;
    for (var t0 = 0u; t0 < hd; t0 += V1_CHUNK) {
        let width = min(V1_CHUNK, hd - t0);
        for (var c = 0u; c < V1_CHUNK / 4u; c++) {
            acc[c] = vec4<f32>(0.0);
        }
        var l = 0.0;
        for (var j = 0u; j < kend; j++) {
            if (key_ignored(b, j)) {
                continue;
            }
            let krow = (b * p.lk + j) * p.k_stride + p.k_start + h * hd;
            let vrow = (b * p.lk + j) * p.v_stride + p.v_start + h * hd + t0;
            let pj = exp2(v1_score(qrow, krow, hd) - m);
            l += pj;
            var t = 0u;
            for (; t + V1_STEP <= width; t += V1_STEP) {
                let c = t / 4u;
                acc[c] += pj * v4(vrow + t);
                acc[c + 1u] += pj * v4(vrow + t + 4u);
                acc[c + 2u] += pj * v4(vrow + t + 8u);
                acc[c + 3u] += pj * v4(vrow + t + 12u);
                acc[c + 4u] += pj * v4(vrow + t + 16u);
                acc[c + 5u] += pj * v4(vrow + t + 20u);
                acc[c + 6u] += pj * v4(vrow + t + 24u);
                acc[c + 7u] += pj * v4(vrow + t + 28u);
            }
            for (; t < width; t++) {
                acc[t / 4u][t % 4u] += pj * f32(v[vrow + t]);
            }
        }
        for (var t = 0u; t < width; t++) {
            out[orow + t0 + t] = elem(acc[t / 4u][t % 4u] / l);
        }
    }
}

// ---------------------------------------------------------------- fast (flash)
//
// Thread layout: TPQ threads share a query, each owning an interleaved quarter
// of its head dim (vec4 chunks c*TPQ + s); a thread serves QPT queries (g,
// g + GROUPS, ...), so every K or V value it reads from workgroup memory feeds
// QPT multiply-adds. Per-thread arrays hold MAXC vec4 per query: head dim
// 4 * MAXC * TPQ = 128 at most.
//
// Per key tile: (1) load K, V and the keys' visibility into workgroup memory;
// (2) each thread's partial dot products over its dims go to `part`, one
// component per slice; (3) each thread sums the TPQ partials of its queries,
// takes the tile max, rescales its accumulator once, and adds p * V.

const TPQ: u32 = 4u;
const QPT: u32 = 2u;
const WG: u32 = 32u;
const GROUPS: u32 = WG / TPQ;
const BQ: u32 = GROUPS * QPT;
const BK: u32 = 12u;
const MAXC: u32 = 8u;
const HD4_MAX: u32 = TPQ * MAXC;

// Rows of K and V, hd4 = ceil(hd / 4) vec4 each (zero-padded past hd).
var<workgroup> ks: array<vec4<f32>, BK * HD4_MAX>;
var<workgroup> vs: array<vec4<f32>, BK * HD4_MAX>;
// part[ql * BK + j][s]: slice s's share of query ql's score against key j.
var<workgroup> part: array<vec4<f32>, BQ * BK>;
// 1 where key k0 + j exists and the padding mask keeps it.
var<workgroup> kvis: array<u32, BK>;
var<workgroup> live: atomic<u32>;

// Four consecutive elements from `row` + 4 * d4, zero past `hd`.
fn load_q4(row: u32, d4: u32, hd: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    let t = d4 * 4u;
    for (var c = 0u; c < 4u; c++) {
        if (t + c < hd) {
            r[c] = f32(q[row + t + c]);
        }
    }
    return r;
}

fn load_k4(row: u32, d4: u32, hd: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    let t = d4 * 4u;
    for (var c = 0u; c < 4u; c++) {
        if (t + c < hd) {
            r[c] = f32(k[row + t + c]);
        }
    }
    return r;
}

fn load_v4(row: u32, d4: u32, hd: u32) -> vec4<f32> {
    var r = vec4<f32>(0.0);
    let t = d4 * 4u;
    for (var c = 0u; c < 4u; c++) {
        if (t + c < hd) {
            r[c] = f32(v[row + t + c]);
        }
    }
    return r;
}

// The whole flash kernel for head dims up to 16 * nc; the entry points pass a
// literal nc so that, once inlined, every per-thread array index is a constant.
fn flash(wid: u32, tid: u32, nc: u32) {
    if (wid >= p.batch * p.heads * p.q_tiles) {
        return; // whole workgroup: uniform
    }
    let qt = wid % p.q_tiles;
    let bh = wid / p.q_tiles;
    let h = bh % p.heads;
    let b = bh / p.heads;
    let hd = p.head_dim;
    let hd4 = (hd + 3u) / 4u;
    let s = tid % TPQ;
    let g = tid / TPQ;
    let q0 = qt * BQ;

    // This thread's queries, pre-scaled into the log2 domain.
    var qr: array<vec4<f32>, QPT * MAXC>;
    var acc: array<vec4<f32>, QPT * MAXC>;
    var m: array<f32, QPT>;
    var l: array<f32, QPT>;
    var qi: array<u32, QPT>;
    for (var r = 0u; r < QPT; r++) {
        let i = q0 + g + r * GROUPS;
        qi[r] = i;
        m[r] = NEG;
        l[r] = 0.0;
        let row = (b * p.lq + min(i, p.lq - 1u)) * p.q_stride + p.q_start + h * hd;
        for (var c = 0u; c < nc; c++) {
            let d4 = c * TPQ + s;
            var x = vec4<f32>(0.0);
            if (i < p.lq && d4 < hd4) {
                x = load_q4(row, d4, hd) * p.scale_log2;
            }
            qr[r * MAXC + c] = x;
            acc[r * MAXC + c] = vec4<f32>(0.0);
        }
    }

    // Causal: no query of this tile sees past its last query.
    var kend = p.lk;
    if (p.causal != 0u) {
        kend = min(p.lk, min(q0 + BQ, p.lq));
    }
    let ntiles = (kend + BK - 1u) / BK;
    for (var kt = 0u; kt < ntiles; kt++) {
        let k0 = kt * BK;
        let nk = min(BK, kend - k0);

        // (1) Stage the tile. The barrier keeps it from overwriting the
        // previous tile while another thread still reads it.
        workgroupBarrier();
        let n4 = nk * hd4;
        for (var e = tid; e < n4; e += WG) {
            let j = e / hd4;
            let d4 = e - j * hd4;
            let key = b * p.lk + k0 + j;
            ks[e] = load_k4(key * p.k_stride + p.k_start + h * hd, d4, hd);
            vs[e] = load_v4(key * p.v_stride + p.v_start + h * hd, d4, hd);
        }
        if (tid < BK) {
            let vis = tid < nk && !key_ignored(b, k0 + tid);
            kvis[tid] = u32(vis);
            if (vis) {
                atomicAdd(&live, 1u);
            }
        }
        workgroupBarrier();
        // A tile whose keys are all ignored does no work (the loops below run 0 times).
        var nj = nk;
        if (atomicLoad(&live) == 0u) {
            nj = 0u;
        }

        // (2) Partial scores over this thread's dims.
        for (var j = 0u; j < nj; j++) {
            var d = array<f32, QPT>();
            for (var c = 0u; c < nc; c++) {
                let kk = ks[j * hd4 + c * TPQ + s];
                for (var r = 0u; r < QPT; r++) {
                    d[r] += dot(qr[r * MAXC + c], kk);
                }
            }
            for (var r = 0u; r < QPT; r++) {
                part[(g + r * GROUPS) * BK + j][s] = d[r];
            }
        }
        workgroupBarrier();
        if (tid == 0u) {
            atomicStore(&live, 0u); // every thread has read it; the next tile recounts
        }

        // (3) Tile max, one rescale, then p * V.
        var mnew: array<f32, QPT>;
        for (var r = 0u; r < QPT; r++) {
            var mt = NEG;
            for (var j = 0u; j < nj; j++) {
                let sv = part[(g + r * GROUPS) * BK + j];
                let vis = kvis[j] != 0u && (p.causal == 0u || k0 + j <= qi[r]);
                if (vis) {
                    mt = max(mt, sv.x + sv.y + sv.z + sv.w);
                }
            }
            mnew[r] = max(m[r], mt);
            let alpha = exp2(m[r] - mnew[r]);
            m[r] = mnew[r];
            l[r] *= alpha;
            for (var c = 0u; c < nc; c++) {
                acc[r * MAXC + c] *= alpha;
            }
        }
        for (var j = 0u; j < nj; j++) {
            var pj: array<f32, QPT>;
            let kv = kvis[j] != 0u;
            for (var r = 0u; r < QPT; r++) {
                let sv = part[(g + r * GROUPS) * BK + j];
                let vis = kv && (p.causal == 0u || k0 + j <= qi[r]);
                pj[r] = select(0.0, exp2(sv.x + sv.y + sv.z + sv.w - mnew[r]), vis);
                l[r] += pj[r];
            }
            for (var c = 0u; c < nc; c++) {
                let vv = vs[j * hd4 + c * TPQ + s];
                for (var r = 0u; r < QPT; r++) {
                    acc[r * MAXC + c] += pj[r] * vv;
                }
            }
        }
    }

    // Normalise and write each query once; no visible key gives zeros.
    for (var r = 0u; r < QPT; r++) {
        let i = qi[r];
        if (i >= p.lq) {
            continue;
        }
        var inv = 0.0;
        if (l[r] > 0.0) {
            inv = 1.0 / l[r];
        }
        let orow = (b * p.lq + i) * p.heads * hd + h * hd;
        for (var c = 0u; c < nc; c++) {
            let d4 = c * TPQ + s;
            let o = acc[r * MAXC + c] * inv;
            for (var e = 0u; e < 4u; e++) {
                let t = d4 * 4u + e;
                if (d4 < hd4 && t < hd) {
                    out[orow + t] = elem(o[e]);
                }
            }
        }
    }
}

@compute @workgroup_size(WG)
fn attention(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    flash(wg.x + wg.y * p.row_stride, tid, MAXC);
}

@compute @workgroup_size(WG)
fn attention_d64(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    flash(wg.x + wg.y * p.row_stride, tid, MAXC / 2u);
}

//! subgroup: the subgroup flash kernel; SUBGROUP, subgroups >= 8, 4-aligned columns

// attention_sg / attention_sg_d64: flash-style without workgroup memory. A
// workgroup per (b, h, tile of SG_WG queries); each invocation owns one query,
// its q and accumulator in registers. Keys go in blocks of SG_KEYS: lane L of
// the subgroup loads key j0 + L, one vec4 at a time, and subgroupBroadcast from
// lanes 0..7 hands each vec4 to every lane (lanes past 8, where subgroups are
// wider, repeat lanes 0..7). On lavapipe each load instruction thus brings 8
// useful vec4 instead of 1. Online softmax once per key block.

@group(0) @binding(1) var<storage, read> q_vec: array<elem4>;
@group(0) @binding(2) var<storage, read> k_vec: array<elem4>;
@group(0) @binding(3) var<storage, read> v_vec: array<elem4>;
@group(0) @binding(5) var<storage, read_write> out_vec: array<elem4>;

const SG_WG: u32 = 16u;
const SG_KEYS: u32 = 8u;
const SG_MAXC: u32 = 32u;
// Dim loops run SG_UNROLL vec4 per outer step: the inner loop is short enough
// for a driver to unroll, so lavapipe's loop budget (see the head) goes to keys.
const SG_UNROLL: u32 = 4u;

fn sg_flash(wid: u32, tid: u32, lane: u32, nc: u32) {
    if (wid >= p.batch * p.heads * p.q_tiles) {
        return; // whole workgroup: uniform
    }
    let qt = wid % p.q_tiles;
    let bh = wid / p.q_tiles;
    let h = bh % p.heads;
    let b = bh / p.heads;
    let hd = p.head_dim;
    let hd4 = hd / 4u;
    let q0 = qt * SG_WG;
    let i = q0 + tid;

    var qr: array<vec4<f32>, SG_MAXC>;
    var acc: array<vec4<f32>, SG_MAXC>;
    let qrow = ((b * p.lq + min(i, p.lq - 1u)) * p.q_stride + p.q_start + h * hd) / 4u;
    for (var c = 0u; c < nc; c++) {
        if (c < hd4 && i < p.lq) {
            qr[c] = vec4<f32>(q_vec[qrow + c]) * p.scale_log2;
        }
    }
    var m = NEG;
    var l = 0.0;

    var kend = p.lk;
    if (p.causal != 0u) {
        kend = min(p.lk, min(q0 + SG_WG, p.lq));
    }
    // Which key of a block this lane loads (lanes past 8 repeat lanes 0..7).
    let slot = lane % SG_KEYS;
    for (var j0 = 0u; j0 < kend; j0 += SG_KEYS) {
        let jl = min(j0 + slot, kend - 1u);
        let seen = subgroupBallot(j0 + slot < kend && !key_ignored(b, jl)).x;
        let krow = ((b * p.lk + jl) * p.k_stride + p.k_start + h * hd) / 4u;
        let vrow = ((b * p.lk + jl) * p.v_stride + p.v_start + h * hd) / 4u;

        var s = array<f32, SG_KEYS>();
        for (var c0 = 0u; c0 < nc; c0 += SG_UNROLL) {
            for (var u = 0u; u < SG_UNROLL; u++) {
                let c = c0 + u;
                if (c < hd4) {
                    let kk = vec4<f32>(k_vec[krow + c]);
                    let qc = qr[c];
                    s[0] += dot(qc, subgroupBroadcast(kk, 0u));
                    s[1] += dot(qc, subgroupBroadcast(kk, 1u));
                    s[2] += dot(qc, subgroupBroadcast(kk, 2u));
                    s[3] += dot(qc, subgroupBroadcast(kk, 3u));
                    s[4] += dot(qc, subgroupBroadcast(kk, 4u));
                    s[5] += dot(qc, subgroupBroadcast(kk, 5u));
                    s[6] += dot(qc, subgroupBroadcast(kk, 6u));
                    s[7] += dot(qc, subgroupBroadcast(kk, 7u));
                }
            }
        }
        var vis = array<bool, SG_KEYS>();
        var mb = NEG;
        for (var u = 0u; u < SG_KEYS; u++) {
            vis[u] = ((seen >> u) & 1u) != 0u && (p.causal == 0u || j0 + u <= i);
            if (vis[u]) {
                mb = max(mb, s[u]);
            }
        }
        let mnew = max(m, mb);
        let alpha = exp2(m - mnew);
        m = mnew;
        var pr = array<f32, SG_KEYS>();
        var ps = 0.0;
        for (var u = 0u; u < SG_KEYS; u++) {
            pr[u] = select(0.0, exp2(s[u] - mnew), vis[u]);
            ps += pr[u];
        }
        l = l * alpha + ps;
        for (var c0 = 0u; c0 < nc; c0 += SG_UNROLL) {
            for (var u = 0u; u < SG_UNROLL; u++) {
                let c = c0 + u;
                if (c < hd4) {
                    let vv = vec4<f32>(v_vec[vrow + c]);
                    acc[c] = acc[c] * alpha
                        + pr[0] * subgroupBroadcast(vv, 0u) + pr[1] * subgroupBroadcast(vv, 1u)
                        + pr[2] * subgroupBroadcast(vv, 2u) + pr[3] * subgroupBroadcast(vv, 3u)
                        + pr[4] * subgroupBroadcast(vv, 4u) + pr[5] * subgroupBroadcast(vv, 5u)
                        + pr[6] * subgroupBroadcast(vv, 6u) + pr[7] * subgroupBroadcast(vv, 7u);
                }
            }
        }
    }

    if (i < p.lq) {
        var inv = 0.0;
        if (l > 0.0) {
            inv = 1.0 / l;
        }
        let orow = ((b * p.lq + i) * p.heads * hd + h * hd) / 4u;
        for (var c = 0u; c < nc; c++) {
            if (c < hd4) {
                out_vec[orow + c] = elem4(acc[c] * inv);
            }
        }
    }
}

@compute @workgroup_size(SG_WG)
fn attention_sg(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    sg_flash(wg.x + wg.y * p.row_stride, tid, lane, SG_MAXC);
}

@compute @workgroup_size(SG_WG)
fn attention_sg_d64(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    sg_flash(wg.x + wg.y * p.row_stride, tid, lane, SG_MAXC / 2u);
}
