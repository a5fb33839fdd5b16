use crate::ops::{LossDims, LossKind};

/// Returns the loss and writes d loss / d pred into `grad`.
pub(super) fn alignment_loss(
    d: LossDims,
    kind: LossKind,
    pred: &[f64],
    target: &[f64],
    grad: &mut [f64],
) -> f64 {
    let n = d.batch * d.tokens * d.dim;
    match kind {
        LossKind::TokenL2 => {
            let tokens = (d.batch * d.tokens) as f64;
            let mut total = 0.0f64;
            for t in 0..d.batch * d.tokens {
                let r = t * d.dim..(t + 1) * d.dim;
                let dist = pred[r.clone()]
                    .iter()
                    .zip(&target[r.clone()])
                    .map(|(u, v)| (u - v) * (u - v))
                    .sum::<f64>()
                    .sqrt();
                total += dist;
                for j in r {
                    // The gradient of a zero distance is undefined; define it as 0.
                    grad[j] = if dist > 0.0 {
                        (pred[j] - target[j]) / (dist * tokens)
                    } else {
                        0.0
                    };
                }
            }
            total / tokens
        }
        LossKind::Mse => {
            let mut total = 0.0f64;
            for j in 0..n {
                let diff = pred[j] - target[j];
                total += diff * diff;
                grad[j] = 2.0 * diff / n as f64;
            }
            total / n as f64
        }
    }
}
