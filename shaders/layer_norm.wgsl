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
// Accuracy: every value is first shifted by the row's first elements x0, r0:
// d = (x - x0) + (r - r0). x - x0 is exact when the row sits far from zero
// (Sterbenz), so a row with a mean of 1000 and a spread of 1 loses nothing to
// the rounding of x + r in f32 (unshifted, that rounding alone is a 1.3e-5
// relative error in `out`). The mean and variance are those of d, each by two
// passes (the variance of the deviations, never E[d^2] - E[d]^2), and
// s - mean = d - mean(d).
//
// Entry points (the `_sum` ones also write `sum_out`):
// - layer_norm_v1[_sum]: naive, one invocation per row, three passes over the row.
// - layer_norm[_sum]: a team of `p.team` invocations per row (a power of two that
//   divides the workgroup: 256 / team rows per workgroup, so narrow rows share
//   one). Each invocation reads its units once, keeps up to CACHE of them in
//   registers, and computes their count, mean and squared deviations; the team
//   merges those (Chan et al.) in a fixed order through workgroup memory, so
//   the result is deterministic. Units beyond CACHE per invocation
//   (cols > CACHE * LANES * team, i.e. cols > 8192 with vec4) are re-read.

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

// Per-invocation moments for the team merges (3 x 1 KiB).
var<workgroup> part_n: array<u32, WG>;
var<workgroup> part_mean: array<f32, WG>;
var<workgroup> part_m2: array<f32, WG>;
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

// Unit i of x and of the residual (zero without one).
struct Pair {
    x: vec4<f32>,
    r: vec4<f32>,
}

fn load(i: u32) -> Pair {
    var v = Pair(widen(x[i]), vec4<f32>(0.0));
    if (p.has_residual != 0u) {
        v.r = widen(residual[i]);
    }
    return v;
}

// d = s - x0 - r0 (the padding lanes of a scalar unit hold -x0 - r0: callers
// MASK them).
fn shift_pair(v: Pair, sh: Shift) -> vec4<f32> {
    return (v.x - sh.x0) + (v.r - sh.r0);
}

fn shifted(i: u32, sh: Shift) -> vec4<f32> {
    return shift_pair(load(i), sh);
}

// The output of unit j (column unit j) from its deviation d = s - mean.
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
        let v = load(base + j);
        out[base + j] = narrow(normalized(shift_pair(v, sh) - st.x, j, st.y));
        sum_out[base + j] = narrow(v.x + v.r);
    }
}

// ---------------------------------------------------------------- fast

// Count, mean and sum of squared deviations of a set of values.
struct Moments {
    n: u32,
    mean: f32,
    m2: f32,
}

// Chan et al.'s merge of two sets' moments (exact in real arithmetic, and stable:
// only differences of means are squared).
fn merge(a: Moments, b: Moments) -> Moments {
    if (b.n == 0u) {
        return a;
    }
    let n = a.n + b.n;
    let delta = b.mean - a.mean;
    let f = f32(b.n) / f32(n);
    return Moments(n, a.mean + delta * f, a.m2 + b.m2 + delta * delta * f32(a.n) * f);
}

fn part(i: u32) -> Moments {
    return Moments(part_n[i], part_mean[i], part_m2[i]);
}

fn set_part(i: u32, m: Moments) {
    part_n[i] = m.n;
    part_mean[i] = m.mean;
    part_m2[i] = m.m2;
}

// The moments of the invocation's team (`p.team` invocations from `li - lane`),
// merged in a fixed order (deterministic) in two levels: groups of `span`
// partials by one invocation each, then the groups by the team's first
// invocation. Three barriers whatever the team size, and few workgroup-memory
// reads per invocation. Every invocation of the workgroup must call it.
// Returns (mean, rstd).
fn team_moments(li: u32, lane: u32, m: Moments) -> vec2<f32> {
    set_part(li, m);
    workgroupBarrier();
    // span * groups == p.team, both powers of two, span >= groups.
    let span = 1u << ((countTrailingZeros(p.team) + 1u) / 2u);
    let first = li - lane;
    if (lane * span < p.team) {
        let i = first + lane * span;
        var acc = part(i);
        for (var k = 1u; k < span; k++) {
            acc = merge(acc, part(i + k));
        }
        set_part(i, acc);
    }
    workgroupBarrier();
    if (lane == 0u) {
        var acc = part(first);
        for (var g = span; g < p.team; g += span) {
            acc = merge(acc, part(first + g));
        }
        part_mean[first] = acc.mean;
        part_m2[first] = inverseSqrt(acc.m2 / f32(acc.n) + p.eps);
    }
    workgroupBarrier();
    return vec2<f32>(part_mean[first], part_m2[first]);
}

struct Row {
    base: u32, // unit offset of the row
    lane: u32, // this invocation's index in its team
    n: u32,    // units to handle: p.units, or 0 past the last row
    sh: Shift,
}

fn row_of(wid: vec3<u32>, nwg: vec3<u32>, li: u32) -> Row {
    // p.team is a power of two: shifts and masks, no integer division.
    let lg = countTrailingZeros(p.team);
    let lane = li & (p.team - 1u);
    let row = ((wid.x + wid.y * nwg.x) << (countTrailingZeros(WG) - lg)) + (li >> lg);
    // Invocations past the last row get n = 0 but still take part in the barriers.
    var r = Row(row * p.units, lane, select(0u, p.units, row < p.rows), Shift(0.0, 0.0));
    if (r.n != 0u) {
        r.sh = shift_of(r.base);
    }
    return r;
}

// The row's shifted mean and rstd. `acc` is this invocation's sum of its
// shifted units (MASKed; the first CACHE of them already in `cache`) and `cnt`
// how many elements that is. Its own moments come from a second pass over its
// units (two-pass, in registers), then the team merges them.
fn row_moments(r: Row, li: u32, acc: vec4<f32>, cnt: u32) -> vec2<f32> {
    let mean = (acc.x + acc.y + acc.z + acc.w) / f32(max(cnt, 1u));
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
    return team_moments(li, r.lane, Moments(cnt, mean, sq.x + sq.y + sq.z + sq.w));
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
    var cnt = 0u;
    for (var k = 0u; k < CACHE; k++) {
        let j = r.lane + k * p.team;
        var v = vec4<f32>(0.0);
        if (j < r.n) {
            v = shifted(r.base + j, r.sh) * MASK;
            cnt += LANES;
        }
        cache[k] = v;
        acc += v;
    }
    for (var j = r.lane + CACHE * p.team; j < r.n; j += p.team) {
        acc += shifted(r.base + j, r.sh) * MASK;
        cnt += LANES;
    }
    write_out(r, row_moments(r, li, acc, cnt));
}

// As layer_norm, and s = x + residual goes to sum_out while it is loaded.
@compute @workgroup_size(WG)
fn layer_norm_sum(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    let r = row_of(wid, nwg, li);
    var acc = vec4<f32>(0.0);
    var cnt = 0u;
    for (var k = 0u; k < CACHE; k++) {
        let j = r.lane + k * p.team;
        var v = vec4<f32>(0.0);
        if (j < r.n) {
            let u = load(r.base + j);
            sum_out[r.base + j] = narrow(u.x + u.r);
            v = shift_pair(u, r.sh) * MASK;
            cnt += LANES;
        }
        cache[k] = v;
        acc += v;
    }
    for (var j = r.lane + CACHE * p.team; j < r.n; j += p.team) {
        let u = load(r.base + j);
        sum_out[r.base + j] = narrow(u.x + u.r);
        acc += shift_pair(u, r.sh) * MASK;
        cnt += LANES;
    }
    write_out(r, row_moments(r, li, acc, cnt));
}
