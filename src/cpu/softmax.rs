//! Attention's softmax on the CPU: a branch-free `e^x` and 8-lane sums, so
//! that each pass over a row of scores is one vectorised loop (8 lanes with
//! AVX2, 4 with the baseline's SSE2). The library's `expf` is a call per
//! element; it was most of the time of an attention over 77 keys.
//!
//! No multiply and add is fused here, so the AVX2 and baseline builds give
//! bitwise the same probabilities.

use super::fold8;
use super::linear::{simd_run, Simd};

/// `row = softmax(row · scale)` over the keys `hidden` does not mark (all of
/// them without it); hidden keys get 0, and a row with no visible key is all
/// zeros.
pub(super) fn softmax(simd: Simd, row: &mut [f32], scale: f32, hidden: Option<&[bool]>) {
    simd_run!(simd, softmax_body(row, scale, hidden))
}

#[inline(always)]
fn softmax_body(row: &mut [f32], scale: f32, hidden: Option<&[bool]>) {
    row.iter_mut().for_each(|s| *s *= scale);
    if let Some(hidden) = hidden {
        for (s, &h) in row.iter_mut().zip(hidden) {
            if h {
                *s = f32::NEG_INFINITY;
            }
        }
    }
    let max = fold8(row, f32::NEG_INFINITY, f32::max, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0); // every key hidden
        return;
    }
    row.iter_mut().for_each(|s| *s = exp_nonpositive(*s - max));
    if let Some(hidden) = hidden {
        for (s, &h) in row.iter_mut().zip(hidden) {
            if h {
                *s = 0.0;
            }
        }
    }
    let inv = 1.0 / fold8(row, 0.0, |a, b| a + b, |a, b| a + b);
    row.iter_mut().for_each(|s| *s *= inv);
}

/// The f32 just above `ln 2^-126`: below it `e^x` would leave f32's normal range.
const EXP_MIN: f32 = -87.336_54;

/// `e^x` for `x <= 0`, as softmax takes it once the row's max is subtracted;
/// within 2 ulp of the exact value (Cephes' `expf`: `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2`, `e^r` by a polynomial, `2^n` put in the exponent bits).
/// Below [`EXP_MIN`] it gives `2^-126` (about 1e-38) rather than a subnormal
/// or 0; a NaN stays NaN. No branch, so a loop of it vectorises.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // Not `max`: it would turn a NaN into EXP_MIN.
    let x = if x < EXP_MIN { EXP_MIN } else { x };
    // n = round(x / ln 2): adding 1.5 * 2^23 leaves no bits below the units.
    const ROUND: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // r = x - n ln 2, with ln 2 in two parts so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375 = 355 / 512
    const LN2_LO: f32 = -2.121_944_4e-4;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = (p * r * r + r) + 1.0;
    // n is in [-126, 0]: 2^n is a normal f32 with biased exponent n + 127.
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64's exp over [-90, 0] in fine steps, the ends and every
    /// point where `n` changes: within 2 ulp, and the clamp below EXP_MIN.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0.0f64;
        let steps = 1_000_000;
        for i in 0..=steps {
            let x = -87.3 * i as f32 / steps as f32;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            let ulp = f32::EPSILON as f64 * want;
            worst = worst.max((got - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        for x in [-100.0, f32::NEG_INFINITY] {
            let tiny = exp_nonpositive(x) / f32::MIN_POSITIVE;
            assert!((1.0..1.0 + 1e-5).contains(&tiny), "{x}: {tiny} x 2^-126");
        }
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    /// Against an f64 softmax, with hidden keys and a row with none visible;
    /// the AVX2 build bitwise the baseline's.
    #[test]
    fn softmax_matches_f64() {
        let row: Vec<f32> = (0..77)
            .map(|i| ((i * 37) % 23) as f32 * 0.7 - 8.0)
            .collect();
        let hidden: Vec<bool> = (0..77).map(|i| i % 5 == 3).collect();
        for h in [None, Some(&hidden[..])] {
            let visible = |j: usize| h.is_none_or(|h| !h[j]);
            let scale = 0.3;
            let max = (0..77)
                .filter(|&j| visible(j))
                .map(|j| row[j] as f64 * scale)
                .fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = (0..77)
                .map(|j| {
                    if visible(j) {
                        (row[j] as f64 * scale - max).exp()
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum: f64 = e.iter().sum();
            let mut got = row.clone();
            softmax(Simd::Baseline, &mut got, scale as f32, h);
            for (j, (&g, &w)) in got.iter().zip(&e).enumerate() {
                assert!(
                    (g as f64 - w / sum).abs() <= 1e-6 * (w / sum) + 1e-12,
                    "{j}"
                );
                if !visible(j) {
                    assert_eq!(g, 0.0);
                }
            }
            let mut fast = row.clone();
            softmax(Simd::detect(), &mut fast, scale as f32, h);
            assert_eq!(fast, got);
        }
        let mut none = vec![1.0f32; 5];
        softmax(Simd::detect(), &mut none, 1.0, Some(&[true; 5]));
        assert_eq!(none, vec![0.0; 5]);
    }
}
