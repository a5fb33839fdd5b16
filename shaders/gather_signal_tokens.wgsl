// gather_signal_tokens: out[b, i, :] = hidden[b, p, :] + embeds[b, p, :] with
// p = positions[b * n + i]. One invocation per output element; consecutive
// invocations read consecutive channels, so every access is coalesced. The op
// moves 3 x B x n x C elements and does nothing else: this simple form is
// already at the bandwidth floor, so it is both v1 and the fast kernel.
// `elem` (f32 or f16) is defined by the backend before this source.

struct Params {
    batch: u32,
    seq_len: u32,
    n: u32,
    channels: u32,
    has_embeds: u32,
    row_stride: u32, // invocations per row of the dispatch grid
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> hidden: array<elem>;
@group(0) @binding(2) var<storage, read> embeds: array<elem>;
@group(0) @binding(3) var<storage, read> positions: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<elem>;

@compute @workgroup_size(256)
fn gather_signal_tokens(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.row_stride;
    if (i >= p.batch * p.n * p.channels) {
        return;
    }
    let c = i % p.channels;
    let row = i / p.channels; // b * n + token
    let b = row / p.n;
    let src = (b * p.seq_len + positions[row]) * p.channels + c;
    var v = f32(hidden[src]);
    if (p.has_embeds != 0u) {
        v += f32(embeds[src]);
    }
    out[i] = elem(v);
}
