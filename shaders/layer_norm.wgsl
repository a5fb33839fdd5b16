// layer_norm: s = x + residual (or x), out = (s - mean) / sqrt(var + eps) * weight + bias
// over each row of `cols` elements, with the biased variance; `sum_out` receives s.
//
// The kernel is written over "units": one `unit` is one element (`elem`) or four
// (`elem4`, used when cols % 4 == 0 so that every row starts on a vec4). The
// backend defines `elem`/`elem4`; src/wgpu/layer_norm.rs prepends one of two
// preludes that define `unit`, `LANES` (elements per unit), `MASK` (1 for the
// lanes that hold an element) and `widen`/`narrow` (unit <-> vec4<f32>).
// Arithmetic is f32 whatever the storage type.
//
// Accuracy: the mean and the variance are two passes (the variance of the
// deviations, never E[s^2] - E[s]^2). The deviation s - mean is formed as
// (x - x0) + (r - r0) - (mean - x0 - r0), with x0, r0 the row's first elements:
// x - x0 is exact when the row sits far from zero (Sterbenz), so rows with a mean
// of 1000 and a spread of 1 lose nothing to the rounding of x + r in f32.
//
// Entry points (the `_sum` ones also write `sum_out`):
// - layer_norm_v1[_sum]: naive, one invocation per row, three passes over the row.
// - layer_norm[_sum]: a team of `p.team` invocations per row (a power of two that
//   divides the workgroup; 256 / team rows per workgroup, so narrow rows share a
//   workgroup), up to CACHE units per invocation held in registers between the
//   passes, team sums by a fixed-order tree in workgroup memory (deterministic).
//   Units beyond CACHE per invocation (cols > CACHE * LANES * team) are re-read.

struct Params {
    rows: u32,
    cols: u32,  // elements per row
    units: u32, // units per row: cols / LANES
    team: u32,  // invocations per row in the fast kernel
    has_residual: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<unit>;
@group(0) @binding(2) var<storage, read> residual: array<unit>;
@group(0) @binding(3) var<storage, read> weight: array<unit>;
@group(0) @binding(4) var<storage, read> bias: array<unit>;
@group(0) @binding(5) var<storage, read_write> out: array<unit>;
@group(0) @binding(6) var<storage, read_write> sum_out: array<unit>;

const WG: u32 = 256u;
const V1_WG: u32 = 64u;
// Units kept in registers per invocation: constant loop bounds let the compiler
// keep `cache` in registers.
const CACHE: u32 = 8u;

var<workgroup> red: array<f32, WG>;
var<private> cache: array<vec4<f32>, CACHE>;

// The per-row shift: x0 + r0 as a pair, so that (x - x0) + (r - r0) stays exact.
struct Shift {
    x0: f32,
    r0: f32,
}

fn shift_of(base: u32) -> Shift {
    var s = Shift(widen(x[base]).x, 0.0);
    if (p.has_residual != 0u) {
        s.r0 = widen(residual[base]).x;
    }
    return s;
}

// s - x0 - r0 for unit i (padding lanes of a scalar unit hold garbage; MASK them).
fn shifted(i: u32, sh: Shift) -> vec4<f32> {
    var v = widen(x[i]) - sh.x0;
    if (p.has_residual != 0u) {
        v += widen(residual[i]) - sh.r0;
    }
    return v;
}

// The sum s itself, for sum_out.
fn summed(i: u32) -> vec4<f32> {
    var v = widen(x[i]);
    if (p.has_residual != 0u) {
        v += widen(residual[i]);
    }
    return v;
}

// d = shifted value minus shifted mean; the normalised, scaled output of unit j.
fn normalized(d: vec4<f32>, j: u32, rstd: f32) -> vec4<f32> {
    return d * rstd * widen(weight[j]) + widen(bias[j]);
}

// ---------------------------------------------------------------- v1 (naive)

// Mean (shifted) and rstd of the row at unit offset `base`, by two plain loops.
fn row_stats_v1(base: u32, sh: Shift) -> vec2<f32> {
    var total = 0.0;
    for (var j = 0u; j < p.units; j++) {
        total += dot(shifted(base + j, sh) * MASK, vec4<f32>(1.0));
    }
    let mean = total / f32(p.cols);
    var sq = 0.0;
    for (var j = 0u; j < p.units; j++) {
        let d = (shifted(base + j, sh) - mean) * MASK;
        sq += dot(d, d);
    }
    return vec2<f32>(mean, inverseSqrt(sq / f32(p.cols) + p.eps));
}

@compute @workgroup_size(V1_WG)
fn layer_norm_v1(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * V1_WG;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.units;
    let sh = shift_of(base);
    let st = row_stats_v1(base, sh);
    for (var j = 0u; j < p.units; j++) {
        out[base + j] = narrow(normalized(shifted(base + j, sh) - st.x, j, st.y));
    }
}

@compute @workgroup_size(V1_WG)
fn layer_norm_v1_sum(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * nwg.x * V1_WG;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.units;
    let sh = shift_of(base);
    let st = row_stats_v1(base, sh);
    for (var j = 0u; j < p.units; j++) {
        out[base + j] = narrow(normalized(shifted(base + j, sh) - st.x, j, st.y));
        sum_out[base + j] = narrow(summed(base + j));
    }
}

// ---------------------------------------------------------------- fast

// The sum of `v` over the invocation's team, returned to every member. Every
// invocation of the workgroup must call it (it holds barriers); the tree adds in
// a fixed order, so the result is the same run to run.
fn team_sum(li: u32, lane: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = p.team / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            red[li] += red[li + s];
        }
        workgroupBarrier();
    }
    let total = red[li - lane];
    workgroupBarrier(); // everyone has read `red` before it is reused
    return total;
}

struct Row {
    base: u32, // unit offset of the row
    lane: u32, // this invocation's index in its team
    n: u32,    // units to handle: p.units, or 0 past the last row
    sh: Shift,
}

fn row_of(wid: vec3<u32>, nwg: vec3<u32>, li: u32) -> Row {
    let lane = li % p.team;
    let row = (wid.x + wid.y * nwg.x) * (WG / p.team) + li / p.team;
    // Invocations past the last row get n = 0 but still take part in the barriers.
    var r = Row(row * p.units, lane, select(0u, p.units, row < p.rows), Shift(0.0, 0.0));
    if (r.n != 0u) {
        r.sh = shift_of(r.base);
    }
    return r;
}

// The row's shifted mean and rstd, given `acc`, this invocation's sum of its
// shifted units (the first CACHE of them already in `cache`, MASKed).
fn row_moments(r: Row, li: u32, acc: vec4<f32>) -> vec2<f32> {
    let mean = team_sum(li, r.lane, acc.x + acc.y + acc.z + acc.w) / f32(p.cols);
    var sq = vec4<f32>(0.0);
    for (var k = 0u; k < CACHE; k++) {
        if (r.lane + k * p.team < r.n) {
            let d = (cache[k] - mean) * MASK;
            sq += d * d;
        }
    }
    for (var j = r.lane + CACHE * p.team; j < r.n; j += p.team) {
        let d = (shifted(r.base + j, r.sh) - mean) * MASK;
        sq += d * d;
    }
    let var_ = team_sum(li, r.lane, sq.x + sq.y + sq.z + sq.w) / f32(p.cols);
    return vec2<f32>(mean, inverseSqrt(var_ + p.eps));
}

// Writes the normalised row from `cache` and re-reads what did not fit.
fn write_out(r: Row, st: vec2<f32>) {
    for (var k = 0u; k < CACHE; k++) {
        let j = r.lane + k * p.team;
        if (j < r.n) {
            out[r.base + j] = narrow(normalized(cache[k] - st.x, j, st.y));
        }
    }
    for (var j = r.lane + CACHE * p.team; j < r.n; j += p.team) {
        out[r.base + j] = narrow(normalized(shifted(r.base + j, r.sh) - st.x, j, st.y));
    }
}

@compute @workgroup_size(WG)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let r = row_of(wid, nwg, li);
    var acc = vec4<f32>(0.0);
    for (var k = 0u; k < CACHE; k++) {
        let j = r.lane + k * p.team;
        var v = vec4<f32>(0.0);
        if (j < r.n) {
            v = shifted(r.base + j, r.sh) * MASK;
        }
        cache[k] = v;
        acc += v;
    }
    for (var j = r.lane + CACHE * p.team; j < r.n; j += p.team) {
        acc += shifted(r.base + j, r.sh) * MASK;
    }
    write_out(r, row_moments(r, li, acc));
}

// As layer_norm, and s = x + residual goes to sum_out while it is loaded.
@compute @workgroup_size(WG)
fn layer_norm_sum(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    let r = row_of(wid, nwg, li);
    var acc = vec4<f32>(0.0);
    for (var k = 0u; k < CACHE; k++) {
        let j = r.lane + k * p.team;
        var v = vec4<f32>(0.0);
        if (j < r.n) {
            sum_out[r.base + j] = narrow(summed(r.base + j));
            v = shifted(r.base + j, r.sh) * MASK;
        }
        cache[k] = v;
        acc += v;
    }
    for (var j = r.lane + CACHE * p.team; j < r.n; j += p.team) {
        sum_out[r.base + j] = narrow(summed(r.base + j));
        acc += shifted(r.base + j, r.sh) * MASK;
    }
    write_out(r, row_moments(r, li, acc));
}
