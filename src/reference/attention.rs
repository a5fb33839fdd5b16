use super::layer_norm::layer_norm;
use crate::ops::{AbsorbedAttentionDims, AttentionDims, LayerNormDims};

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

/// The tensors of one `attention_absorbed` call, as f64 slices.
pub(super) struct Absorbed<'a> {
    pub x: &'a [f64],
    pub residual: Option<&'a [f64]>,
    pub norm: [&'a [f64]; 2],
    pub eps: f64,
    pub keys: &'a [f64],
    pub values: &'a [f64],
    pub key_bias: &'a [f64],
    pub out_bias: &'a [f64],
    pub scale: f64,
    pub after: [&'a [f64]; 2],
    pub after_eps: f64,
}

/// Per row: `s = x + residual`, `h = layer_norm(s)`, per head a softmax over
/// the keys of `h · keys + key_bias` (scaled), `y = s + Σ p · values +
/// out_bias` into `stream_out`, and `layer_norm(y)` into `out`.
pub(super) fn attention_absorbed(
    d: AbsorbedAttentionDims,
    t: Absorbed<'_>,
    stream_out: &mut [f64],
    out: &mut [f64],
) {
    let c = d.cols;
    let norm = LayerNormDims {
        rows: d.batch * d.lq,
        cols: c,
    };
    let mut s = vec![0.0f64; t.x.len()];
    let mut h = vec![0.0f64; t.x.len()];
    layer_norm(
        norm,
        t.x,
        t.residual,
        t.norm[0],
        t.norm[1],
        t.eps,
        &mut h,
        Some(&mut s),
    );
    let mut p = vec![0.0f64; d.lk];
    for b in 0..d.batch {
        for i in 0..d.lq {
            let row = (b * d.lq + i) * c;
            let y = &mut stream_out[row..row + c];
            for (n, y) in y.iter_mut().enumerate() {
                *y = s[row + n] + t.out_bias[n];
            }
            for e in 0..d.heads {
                let key = |j: usize| (b * d.lk + j) * d.k_stride + d.k_start + e * c;
                for (j, pj) in p.iter_mut().enumerate() {
                    let dot: f64 = (0..c).map(|n| h[row + n] * t.keys[key(j) + n]).sum();
                    let bias = t.key_bias[(b * d.lk + j) * d.b_stride + d.b_start + e];
                    *pj = (dot + bias) * t.scale;
                }
                let max = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                p.iter_mut().for_each(|pj| *pj = (*pj - max).exp());
                let sum: f64 = p.iter().sum();
                for (j, pj) in p.iter().enumerate() {
                    let value = (b * d.lk + j) * d.v_stride + d.v_start + e * c;
                    for (n, y) in y.iter_mut().enumerate() {
                        *y += pj / sum * t.values[value + n];
                    }
                }
            }
        }
    }
    let [w, bias] = t.after;
    layer_norm(norm, stream_out, None, w, bias, t.after_eps, out, None);
}
