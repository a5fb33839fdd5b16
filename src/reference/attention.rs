use crate::ops::AttentionDims;

/// Per (batch, head, query): scores against every visible key, a max-subtracted
/// softmax, and the weighted sum of values. A query with no visible key gets zeros.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention(
    d: AttentionDims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    scale: f64,
    causal: bool,
    ignore: Option<&[bool]>,
    out: &mut [f64],
) {
    let hd = d.head_dim;
    let out_stride = d.heads * hd;
    let mut scores = vec![0.0f64; d.lk];
    for b in 0..d.batch {
        for h in 0..d.heads {
            for i in 0..d.lq {
                let qrow = (b * d.lq + i) * d.q_stride + d.q_start + h * hd;
                let visible =
                    |j: usize| !(causal && j > i || ignore.is_some_and(|m| m[b * d.lk + j]));
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    if !visible(j) {
                        continue;
                    }
                    let krow = (b * d.lk + j) * d.k_stride + d.k_start + h * hd;
                    let dot: f64 = (0..hd).map(|t| q[qrow + t] * k[krow + t]).sum();
                    *s = dot * scale;
                    max = max.max(*s);
                }
                let orow = (b * d.lq + i) * out_stride + h * hd;
                let o = &mut out[orow..orow + hd];
                o.fill(0.0);
                if max == f64::NEG_INFINITY {
                    continue; // every key masked: zeros
                }
                let mut denom = 0.0f64;
                for (j, &s) in scores.iter().enumerate() {
                    if !visible(j) {
                        continue;
                    }
                    let p = (s - max).exp();
                    denom += p;
                    let vrow = (b * d.lk + j) * d.v_stride + d.v_start + h * hd;
                    for t in 0..hd {
                        o[t] += p * v[vrow + t];
                    }
                }
                for x in o.iter_mut() {
                    *x /= denom;
                }
            }
        }
    }
}
