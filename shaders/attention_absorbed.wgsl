// attention_absorbed: an attention over few keys whose query and output
// projections are absorbed into its keys and values, between the LayerNorms
// around it (kernels/attention.cu has the same op; why, in src/projector.rs).
// Per row (b, i) of `cols`:
//   s   = x + residual (or x);   h = layer_norm(s; norm_weight, norm_bias, eps)
//   p_e = softmax_j((h . keys[b, j, e] + key_bias[b, j, e]) * scale)  per head e
//   a   = out_bias + sum_e sum_j p_e[j] values[b, j, e];  stream_out = s + a
//   out = layer_norm(s + a; after_weight, after_bias, after_eps)
// keys[b, j, e] is the `cols`-wide block at (b * lk + j) * k_stride + k_start +
// e * cols (values alike), key_bias[b, j, e] the element at (b * lk + j) *
// b_stride + b_start + e. `elem` (f32 or f16) is defined by the backend before
// this source; all arithmetic is f32. The host checks heads * lk <= MAX_SCORES.
//
// Numerics (as kernels/attention.cu): the first norm's deviations are
// (x - mx) + (r - mr), the second's those plus (a - ma), so neither s nor s + a
// is rounded before it is centred. `out` holds a between the passes (rounded
// to elem: exact in f32, within f16's own rounding otherwise).
//
// Versions:
//   attention_absorbed_v1: a workgroup per row, each sum over the row added
//     in invocation order by the first invocation, one score at a time. The
//     baseline and a second oracle. (Not an invocation per row, as the other
//     v1 kernels: lavapipe stops an invocation's loops after some 65536
//     iterations in all, and a row of 512 over 96 scores takes more.)
//   attention_absorbed: a workgroup per row. Each invocation takes columns
//     lid, lid + WG, ..; every row statistic and score goes through a tree
//     sum in workgroup memory (fixed order: deterministic), the scores CHUNK
//     at a time; invocation e turns head e's scores into probabilities.

struct AbsorbedParams {
    rows: u32,
    lq: u32,
    cols: u32,
    lk: u32,
    heads: u32,
    k_stride: u32,
    k_start: u32,
    v_stride: u32,
    v_start: u32,
    b_stride: u32,
    b_start: u32,
    has_residual: u32,
    scale: f32,
    eps: f32,
    after_eps: f32,
    row_stride: u32, // workgroups (rows) per row of the dispatch grid
}

@group(0) @binding(0) var<uniform> p: AbsorbedParams;
@group(0) @binding(1) var<storage, read> x: array<elem>;
@group(0) @binding(2) var<storage, read> residual: array<elem>;
@group(0) @binding(3) var<storage, read> norm_weight: array<elem>;
@group(0) @binding(4) var<storage, read> norm_bias: array<elem>;
@group(0) @binding(5) var<storage, read> keys: array<elem>;
@group(0) @binding(6) var<storage, read> values: array<elem>;
@group(0) @binding(7) var<storage, read> key_bias: array<elem>;
@group(0) @binding(8) var<storage, read> out_bias: array<elem>;
@group(0) @binding(9) var<storage, read> after_weight: array<elem>;
@group(0) @binding(10) var<storage, read> after_bias: array<elem>;
@group(0) @binding(11) var<storage, read_write> stream_out: array<elem>;
@group(0) @binding(12) var<storage, read_write> out: array<elem>;

const WG: u32 = 64u;
const MAX_SCORES: u32 = 128u;
const CHUNK: u32 = 8u;

var<workgroup> partial: array<array<f32, WG>, CHUNK>;
var<workgroup> scores: array<f32, MAX_SCORES>;

// Score q = e * lk + j: where its key's block and its value's block start.
fn key_at(b: u32, q: u32) -> u32 {
    return (b * p.lk + q % p.lk) * p.k_stride + p.k_start + (q / p.lk) * p.cols;
}

fn value_at(b: u32, q: u32) -> u32 {
    return (b * p.lk + q % p.lk) * p.v_stride + p.v_start + (q / p.lk) * p.cols;
}

fn res(i: u32) -> f32 {
    if (p.has_residual != 0u) {
        return f32(residual[i]);
    }
    return 0.0;
}

// Head e's raw dot products in scores[e * lk + j] turned into probabilities.
fn softmax_head(b: u32, e: u32) {
    var m = -3.0e38;
    for (var j = 0u; j < p.lk; j++) {
        let kb = f32(key_bias[(b * p.lk + j) * p.b_stride + p.b_start + e]);
        let v = (scores[e * p.lk + j] + kb) * p.scale;
        scores[e * p.lk + j] = v;
        m = max(m, v);
    }
    var l = 0.0;
    for (var j = 0u; j < p.lk; j++) {
        let w = exp(scores[e * p.lk + j] - m);
        scores[e * p.lk + j] = w;
        l += w;
    }
    for (var j = 0u; j < p.lk; j++) {
        scores[e * p.lk + j] /= l;
    }
}

// The mean and 1 / std of deviations whose sum and sum of squares over
// `cols` are `m` (the corrected two-pass variance).
fn moments(m: vec2<f32>, eps: f32) -> vec2<f32> {
    let c = m.x / f32(p.cols);
    return vec2<f32>(c, inverseSqrt(max(m.y / f32(p.cols) - c * c, 0.0) + eps));
}

// What both kernels do over an invocation's columns c = lid, lid + WG, ..
// of the row at `base`; they differ in how they add the invocations' parts.
// `means` are those of x and of the residual.

// The parts of the sums of x and of the residual.
fn sums_part(base: u32, lid: u32) -> vec2<f32> {
    var sums = vec2<f32>(0.0);
    for (var c = lid; c < p.cols; c += WG) {
        sums += vec2<f32>(f32(x[base + c]), res(base + c));
    }
    return sums;
}

// The first norm's deviation of column c.
fn dev1(base: u32, c: u32, means: vec2<f32>) -> f32 {
    return (f32(x[base + c]) - means.x) + (res(base + c) - means.y);
}

// The parts of the sum and sum of squares of the first norm's deviations.
fn moments1_part(base: u32, lid: u32, means: vec2<f32>) -> vec2<f32> {
    var m = vec2<f32>(0.0);
    for (var c = lid; c < p.cols; c += WG) {
        let d = dev1(base, c, means);
        m += vec2<f32>(d, d * d);
    }
    return m;
}

// Column c of h, the first norm's output (`st1`: its moments()).
fn h_at(base: u32, c: u32, means: vec2<f32>, st1: vec2<f32>) -> f32 {
    return (dev1(base, c, means) - st1.x) * st1.y * f32(norm_weight[c]) + f32(norm_bias[c]);
}

// a = out_bias + the probabilities' sum of value rows: into `out` (held
// there until the second norm), s + a into `stream_out`; the part of a's sum.
fn add_part(base: u32, b: u32, lid: u32) -> f32 {
    var sa = 0.0;
    for (var c = lid; c < p.cols; c += WG) {
        var a = f32(out_bias[c]);
        for (var q = 0u; q < p.heads * p.lk; q++) {
            a += scores[q] * f32(values[value_at(b, q) + c]);
        }
        stream_out[base + c] = elem(f32(x[base + c]) + res(base + c) + a);
        out[base + c] = elem(a);
        sa += a;
    }
    return sa;
}

// The second norm's deviation of column c: the first's plus a's.
fn dev2(base: u32, c: u32, means: vec2<f32>, ma: f32) -> f32 {
    return dev1(base, c, means) + (f32(out[base + c]) - ma);
}

fn moments2_part(base: u32, lid: u32, means: vec2<f32>, ma: f32) -> vec2<f32> {
    var m = vec2<f32>(0.0);
    for (var c = lid; c < p.cols; c += WG) {
        let d = dev2(base, c, means, ma);
        m += vec2<f32>(d, d * d);
    }
    return m;
}

// The second norm's output (`st2`: its moments()) over a in `out`.
fn store_out(base: u32, lid: u32, means: vec2<f32>, ma: f32, st2: vec2<f32>) {
    for (var c = lid; c < p.cols; c += WG) {
        let d = dev2(base, c, means, ma);
        out[base + c] = elem((d - st2.x) * st2.y * f32(after_weight[c]) + f32(after_bias[c]));
    }
}

// ---------------------------------------------------------------- v1 (naive)

// The sum of every invocation's `v`, added in invocation order by the first
// (every invocation gets it). Called in uniform control flow.
fn v1_sum(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    partial[0][lid] = v;
    workgroupBarrier();
    if (lid == 0u) {
        var total = 0.0;
        for (var i = 0u; i < WG; i++) {
            total += partial[0][i];
        }
        partial[1][0] = total;
    }
    workgroupBarrier();
    return partial[1][0];
}

fn v1_sum2(v: vec2<f32>, lid: u32) -> vec2<f32> {
    return vec2<f32>(v1_sum(v.x, lid), v1_sum(v.y, lid));
}

@compute @workgroup_size(WG)
fn attention_absorbed_v1(@builtin(local_invocation_id) lid3: vec3<u32>,
                         @builtin(workgroup_id) wid: vec3<u32>) {
    // Uniform over the workgroup, so its barriers are too.
    let row = wid.x + wid.y * p.row_stride;
    if (row >= p.rows) {
        return;
    }
    let lid = lid3.x;
    let b = row / p.lq;
    let base = row * p.cols;
    let means = v1_sum2(sums_part(base, lid), lid) / f32(p.cols);
    let st1 = moments(v1_sum2(moments1_part(base, lid, means), lid), p.eps);
    for (var q = 0u; q < p.heads * p.lk; q++) {
        var dot = 0.0;
        for (var c = lid; c < p.cols; c += WG) {
            dot += h_at(base, c, means, st1) * f32(keys[key_at(b, q) + c]);
        }
        let total = v1_sum(dot, lid);
        if (lid == 0u) {
            scores[q] = total;
        }
    }
    workgroupBarrier();
    if (lid == 0u) {
        for (var e = 0u; e < p.heads; e++) {
            softmax_head(b, e);
        }
    }
    workgroupBarrier();
    let ma = v1_sum(add_part(base, b, lid), lid) / f32(p.cols);
    let st2 = moments(v1_sum2(moments2_part(base, lid, means, ma), lid), p.after_eps);
    store_out(base, lid, means, ma, st2);
}

// ---------------------------------------------------------------- fast

// The workgroup's sums of `v` (every invocation gets them), through row 0 and
// 1 of `partial`. Called in uniform control flow.
fn workgroup_sum2(v: vec2<f32>, lid: u32) -> vec2<f32> {
    workgroupBarrier();
    partial[0][lid] = v.x;
    partial[1][lid] = v.y;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half >>= 1u) {
        if (lid < half) {
            partial[0][lid] += partial[0][lid + half];
            partial[1][lid] += partial[1][lid + half];
        }
        workgroupBarrier();
    }
    return vec2<f32>(partial[0][0], partial[1][0]);
}

@compute @workgroup_size(WG)
fn attention_absorbed(@builtin(local_invocation_id) lid3: vec3<u32>,
                      @builtin(workgroup_id) wid: vec3<u32>) {
    // Uniform over the workgroup, so its barriers are too.
    let row = wid.x + wid.y * p.row_stride;
    if (row >= p.rows) {
        return;
    }
    let lid = lid3.x;
    let b = row / p.lq;
    let base = row * p.cols;
    let means = workgroup_sum2(sums_part(base, lid), lid) / f32(p.cols);
    let st1 = moments(workgroup_sum2(moments1_part(base, lid, means), lid), p.eps);

    // Scores, CHUNK at a time.
    let n = p.heads * p.lk;
    for (var q0 = 0u; q0 < n; q0 += CHUNK) {
        var acc: array<f32, CHUNK>;
        for (var c = lid; c < p.cols; c += WG) {
            let h = h_at(base, c, means, st1);
            for (var u = 0u; u < CHUNK; u++) {
                if (q0 + u < n) {
                    acc[u] += h * f32(keys[key_at(b, q0 + u) + c]);
                }
            }
        }
        workgroupBarrier();
        for (var u = 0u; u < CHUNK; u++) {
            partial[u][lid] = acc[u];
        }
        workgroupBarrier();
        for (var half = WG / 2u; half > 0u; half >>= 1u) {
            if (lid < half) {
                for (var u = 0u; u < CHUNK; u++) {
                    partial[u][lid] += partial[u][lid + half];
                }
            }
            workgroupBarrier();
        }
        if (lid < CHUNK && q0 + lid < n) {
            scores[q0 + lid] = partial[lid][0];
        }
    }
    workgroupBarrier();
    if (lid < p.heads) {
        softmax_head(b, lid);
    }
    workgroupBarrier();
    let ma = workgroup_sum2(vec2<f32>(add_part(base, b, lid), 0.0), lid).x / f32(p.cols);
    let st2 = moments(workgroup_sum2(moments2_part(base, lid, means, ma), lid), p.after_eps);
    store_out(base, lid, means, ma, st2);
}
