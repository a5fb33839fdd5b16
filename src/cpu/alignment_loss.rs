//! `alignment_loss` on the CPU: per token (l2) or per element (MSE) in
//! parallel, the total summed in a fixed order, in f64.

use rayon::prelude::*;

use crate::ops::{LossDims, LossKind};

/// Elements an MSE task takes.
const MSE_CHUNK: usize = 1 << 14;

/// Returns the loss and writes d loss / d pred into `grad`.
pub(super) fn alignment_loss(
    d: LossDims,
    kind: LossKind,
    pred: &[f32],
    target: &[f32],
    grad: &mut [f32],
) -> f32 {
    match kind {
        LossKind::TokenL2 => {
            let tokens = (d.batch * d.tokens) as f64;
            let dists: Vec<f64> = grad
                .par_chunks_mut(d.dim)
                .zip(pred.par_chunks(d.dim).zip(target.par_chunks(d.dim)))
                .map(|(g, (p, t))| {
                    let dist = p
                        .iter()
                        .zip(t)
                        .map(|(&u, &v)| (u as f64 - v as f64).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    // The gradient of a zero distance is undefined; define it as 0.
                    let inv = if dist > 0.0 {
                        1.0 / (dist * tokens)
                    } else {
                        0.0
                    };
                    for ((g, &u), &v) in g.iter_mut().zip(p).zip(t) {
                        *g = ((u as f64 - v as f64) * inv) as f32;
                    }
                    dist
                })
                .collect();
            (dists.iter().sum::<f64>() / tokens) as f32
        }
        LossKind::Mse => {
            let n = pred.len() as f64;
            let partial: Vec<f64> = grad
                .par_chunks_mut(MSE_CHUNK)
                .zip(pred.par_chunks(MSE_CHUNK).zip(target.par_chunks(MSE_CHUNK)))
                .map(|(g, (p, t))| {
                    let mut total = 0.0f64;
                    for ((g, &u), &v) in g.iter_mut().zip(p).zip(t) {
                        let diff = u as f64 - v as f64;
                        total += diff * diff;
                        *g = (2.0 * diff / n) as f32;
                    }
                    total
                })
                .collect();
            (partial.iter().sum::<f64>() / n) as f32
        }
    }
}
