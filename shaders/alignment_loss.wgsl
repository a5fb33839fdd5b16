// alignment_loss over `tokens` rows of `dim` elements, diff = pred - target:
// - TokenL2: dist = sqrt(sum_d diff^2) per token, loss = mean of dist over the
//   tokens, grad = diff / (dist * tokens), 0 where dist == 0;
// - Mse: loss = mean of diff^2 over every element, grad = 2 diff / numel.
//
// Two dispatches, both deterministic (fixed-order sums, no float atomics):
// 1. per token: its sum of squares, its gradient, and its term of the loss
//    (dist, or the sum of squares for Mse) into `partials` (f32);
// 2. the sum of `partials`, times `loss_scale`, into out[0].
// Bindings: dispatch 1 reads pred, target and writes partials, out = grad;
// dispatch 2 reads nothing (placeholders), writes out = the [1] loss from partials.
//
// The kernel is written over "units" of one element (`elem`) or four (`elem4`,
// when dim % 4 == 0): src/wgpu/alignment_loss.rs prepends a prelude defining
// `unit`, `MASK` (1 for the lanes that hold an element) and `widen`/`narrow`
// (unit <-> vec4<f32>). Arithmetic is f32 whatever the storage type. Dispatch 2
// always runs from the scalar build (`out` is then the [1] loss).
//
// Entry points:
// - alignment_loss_v1, alignment_total_v1: naive; one invocation per token
//   (two passes over its row), then one invocation summing the partials in order.
// - alignment_loss, alignment_total: a team of `p.team` invocations per token
//   (a power of two; 256 / team tokens per workgroup) reads the row once, keeps
//   up to CACHE units per invocation in registers for the gradient, and sums the
//   squares through workgroup memory in a fixed order (two levels, three
//   barriers); then one workgroup sums the partials: strided per invocation,
//   then the same two-level sum. Units beyond CACHE per invocation
//   (dim > CACHE * 4 * 256 = 8192 with vec4) are re-read.

struct Params {
    tokens: u32,
    dim: u32,
    units: u32, // units per token: dim, or dim / 4 with vec4 units
    team: u32,  // invocations per token in the fast kernel
    token_l2: u32,
    grad_scale: f32, // Mse: 2 / numel; TokenL2: 1 / tokens (then / dist)
    loss_scale: f32, // 1 / tokens (TokenL2) or 1 / numel (Mse)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> pred: array<unit>;
@group(0) @binding(2) var<storage, read> tgt: array<unit>; // the target (`target` is a WGSL keyword)
@group(0) @binding(3) var<storage, read_write> partials: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<unit>;

const WG: u32 = 256u;
const V1_WG: u32 = 64u;
// Units kept in registers per invocation (constant bounds keep them there).
const CACHE: u32 = 8u;

var<workgroup> red: array<f32, WG>;
var<private> cache: array<vec4<f32>, CACHE>;

fn diff(i: u32) -> vec4<f32> {
    return (widen(pred[i]) - widen(tgt[i])) * MASK;
}

// The token's term of the loss and the factor its diff is multiplied by for the
// gradient, from its sum of squares.
fn token_terms(ss: f32) -> vec2<f32> {
    if (p.token_l2 == 0u) {
        return vec2<f32>(ss, p.grad_scale);
    }
    let dist = sqrt(ss);
    // The gradient of a zero distance is undefined; it is defined as 0.
    return vec2<f32>(dist, select(0.0, p.grad_scale / dist, dist > 0.0));
}

fn write_loss(total: f32) {
    out[0] = narrow(vec4<f32>(total * p.loss_scale, 0.0, 0.0, 0.0));
}

// ---------------------------------------------------------------- v1 (naive)

@compute @workgroup_size(V1_WG)
fn alignment_loss_v1(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let token = gid.x + gid.y * nwg.x * V1_WG;
    if (token >= p.tokens) {
        return;
    }
    let base = token * p.units;
    var ss = 0.0;
    for (var j = 0u; j < p.units; j++) {
        let d = diff(base + j);
        ss += dot(d, d);
    }
    let t = token_terms(ss);
    for (var j = 0u; j < p.units; j++) {
        out[base + j] = narrow(diff(base + j) * t.y);
    }
    partials[token] = t.x;
}

@compute @workgroup_size(1)
fn alignment_total_v1() {
    var total = 0.0;
    for (var i = 0u; i < p.tokens; i++) {
        total += partials[i];
    }
    write_loss(total);
}

// ---------------------------------------------------------------- fast

// The sum of `v` over the invocation's team (`team` invocations from `li - lane`),
// returned to every member. Fixed order (deterministic), two levels: groups of
// `span` values summed by one invocation each, then the groups by the team's
// first invocation. Three barriers whatever the team size, and few
// workgroup-memory reads per invocation. Every invocation of the workgroup must
// call it.
fn team_sum(li: u32, lane: u32, team: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    // span * groups == team, both powers of two, span >= groups.
    let span = 1u << ((countTrailingZeros(team) + 1u) / 2u);
    let first = li - lane;
    if (lane * span < team) {
        let i = first + lane * span;
        var acc = red[i];
        for (var k = 1u; k < span; k++) {
            acc += red[i + k];
        }
        red[i] = acc;
    }
    workgroupBarrier();
    if (lane == 0u) {
        var acc = red[first];
        for (var g = span; g < team; g += span) {
            acc += red[first + g];
        }
        red[first] = acc;
    }
    workgroupBarrier();
    return red[first];
}

@compute @workgroup_size(WG)
fn alignment_loss(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    // p.team is a power of two: shifts and masks, no integer division.
    let lg = countTrailingZeros(p.team);
    let lane = li & (p.team - 1u);
    let token = ((wid.x + wid.y * nwg.x) << (countTrailingZeros(WG) - lg)) + (li >> lg);
    let base = token * p.units;
    // Invocations past the last token handle nothing but take part in the barriers.
    let n = select(0u, p.units, token < p.tokens);

    var sq = vec4<f32>(0.0);
    for (var k = 0u; k < CACHE; k++) {
        let j = lane + k * p.team;
        var d = vec4<f32>(0.0);
        if (j < n) {
            d = diff(base + j);
        }
        cache[k] = d;
        sq += d * d;
    }
    for (var j = lane + CACHE * p.team; j < n; j += p.team) {
        let d = diff(base + j);
        sq += d * d;
    }
    let t = token_terms(team_sum(li, lane, p.team, sq.x + sq.y + sq.z + sq.w));

    for (var k = 0u; k < CACHE; k++) {
        let j = lane + k * p.team;
        if (j < n) {
            out[base + j] = narrow(cache[k] * t.y);
        }
    }
    for (var j = lane + CACHE * p.team; j < n; j += p.team) {
        out[base + j] = narrow(diff(base + j) * t.y);
    }
    if (lane == 0u && n != 0u) {
        partials[token] = t.x;
    }
}

@compute @workgroup_size(WG)
fn alignment_total(@builtin(local_invocation_index) li: u32) {
    var acc = 0.0;
    for (var i = li; i < p.tokens; i += WG) {
        acc += partials[i];
    }
    let total = team_sum(li, li, WG, acc);
    if (li == 0u) {
        write_loss(total);
    }
}
