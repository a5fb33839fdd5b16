use crate::ops::LayerNormDims;

/// Two-pass layer norm per row: the mean first, then the biased variance of the
/// deviations (never `E[x^2] - E[x]^2`, which cancels catastrophically).
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm(
    d: LayerNormDims,
    x: &[f64],
    residual: Option<&[f64]>,
    weight: &[f64],
    bias: &[f64],
    eps: f64,
    out: &mut [f64],
    mut sum_out: Option<&mut [f64]>,
) {
    let c = d.cols;
    let mut s = vec![0.0f64; c];
    for r in 0..d.rows {
        for j in 0..c {
            s[j] = x[r * c + j] + residual.map_or(0.0, |res| res[r * c + j]);
        }
        if let Some(so) = sum_out.as_deref_mut() {
            so[r * c..(r + 1) * c].copy_from_slice(&s);
        }
        let mean = s.iter().sum::<f64>() / c as f64;
        let var = s.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for j in 0..c {
            out[r * c + j] = (s[j] - mean) * rstd * weight[j] + bias[j];
        }
    }
}
