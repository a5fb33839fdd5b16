//! `gather_signal_tokens` on the CPU: row copies, summed with the embeddings.

use crate::ops::GatherDims;

/// `out[b, i, :] = hidden[b, p, :] + embeds[b, p, :]` with `p = positions[b * n + i]`.
pub(super) fn gather_signal_tokens(
    d: GatherDims,
    hidden: &[f32],
    embeds: Option<&[f32]>,
    positions: &[usize],
    out: &mut [f32],
) {
    let c = d.channels;
    for (row, (o, &p)) in out.chunks_mut(c).zip(positions).enumerate() {
        let src = (row / d.n * d.seq_len + p) * c;
        let h = &hidden[src..src + c];
        match embeds {
            Some(e) => {
                for ((o, h), e) in o.iter_mut().zip(h).zip(&e[src..src + c]) {
                    *o = h + e;
                }
            }
            None => o.copy_from_slice(h),
        }
    }
}
