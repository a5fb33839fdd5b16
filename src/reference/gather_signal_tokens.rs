use crate::ops::GatherDims;

/// `out[b, i, :] = hidden[b, p, :] + embeds[b, p, :]` with `p = positions[b * n + i]`.
pub(super) fn gather_signal_tokens(
    d: GatherDims,
    hidden: &[f64],
    embeds: Option<&[f64]>,
    positions: &[usize],
    out: &mut [f64],
) {
    let c = d.channels;
    for b in 0..d.batch {
        for i in 0..d.n {
            let src = (b * d.seq_len + positions[b * d.n + i]) * c;
            let dst = (b * d.n + i) * c;
            for j in 0..c {
                out[dst + j] = hidden[src + j] + embeds.map_or(0.0, |e| e[src + j]);
            }
        }
    }
}
