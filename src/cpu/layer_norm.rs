//! `layer_norm` on the CPU: rows spread over the pool, statistics in f64.

use rayon::prelude::*;

use super::fold8;
use super::linear::{simd_run, Simd};
use crate::ops::LayerNormDims;

/// The inputs of one `layer_norm` call.
pub(super) struct LayerNorm<'a> {
    pub x: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub eps: f64,
}

/// Rows a task takes at least: below this a row is cheaper than handing it over.
const MIN_ROWS: usize = 8;

/// `s = x + residual` (rounded to f32 into `sum_out` where given), and `out =
/// (s - mean) / sqrt(var + eps) * weight + bias`.
pub(super) fn layer_norm(
    simd: Simd,
    d: LayerNormDims,
    a: LayerNorm<'_>,
    out: &mut [f32],
    sum_out: Option<&mut [f32]>,
) {
    let c = d.cols;
    match sum_out {
        Some(sums) => out
            .par_chunks_mut(c)
            .zip(sums.par_chunks_mut(c))
            .with_min_len(MIN_ROWS)
            .enumerate()
            .for_each_init(
                || vec![0.0f64; c],
                |wide, (r, (o, s))| simd_run!(simd, a.row(r, o, Some(s), wide)),
            ),
        None => out
            .par_chunks_mut(c)
            .with_min_len(MIN_ROWS)
            .enumerate()
            .for_each_init(
                || vec![0.0f64; c],
                |wide, (r, o)| simd_run!(simd, a.row(r, o, None, wide)),
            ),
    }
}

impl LayerNorm<'_> {
    /// Row `r`: [`norm_row`] of its `x` and residual.
    #[inline(always)]
    fn row(&self, r: usize, out: &mut [f32], sum: Option<&mut [f32]>, s: &mut [f64]) {
        let c = out.len();
        let x = &self.x[r * c..(r + 1) * c];
        let res = self.residual.map(|res| &res[r * c..(r + 1) * c]);
        norm_row(x, res, [self.weight, self.bias], self.eps, out, sum, s);
    }
}

/// One row. The sum of two f32 values is exact in f64, so `s = x + res` is
/// centred before any rounding (a row of mean 1000 keeps its deviations'
/// digits); then two passes (the mean, then the variance of the deviations,
/// never `E[s²] - E[s]²`, which cancels). `s` keeps the sum; `sum`, where
/// given, receives it rounded to f32.
#[inline(always)]
pub(super) fn norm_row(
    x: &[f32],
    res: Option<&[f32]>,
    [weight, bias]: [&[f32]; 2],
    eps: f64,
    out: &mut [f32],
    sum: Option<&mut [f32]>,
    s: &mut [f64],
) {
    match res {
        Some(res) => {
            for ((s, &x), &y) in s.iter_mut().zip(x).zip(res) {
                *s = x as f64 + y as f64;
            }
        }
        None => s.iter_mut().zip(x).for_each(|(s, &x)| *s = x as f64),
    }
    if let Some(sum) = sum {
        sum.iter_mut()
            .zip(s.iter())
            .for_each(|(o, &s)| *o = s as f32);
    }
    normalize(s, [weight, bias], eps, out);
}

/// `out = (s - mean) / sqrt(var + eps) * weight + bias` of a row held in f64.
#[inline(always)]
pub(super) fn normalize(s: &[f64], [weight, bias]: [&[f32]; 2], eps: f64, out: &mut [f32]) {
    let c = s.len() as f64;
    let add = |a: f64, b: f64| a + b;
    let mean = fold8(s, 0.0, add, add) / c;
    let var = fold8(s, 0.0, |a, v| a + (v - mean) * (v - mean), add) / c;
    let rstd = 1.0 / (var + eps).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(s.iter()).zip(weight).zip(bias) {
        *o = ((v - mean) * rstd) as f32 * w + b;
    }
}
