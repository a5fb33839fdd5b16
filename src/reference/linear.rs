use crate::ops::{Activation, LinearDims};

/// `out[m, n] = act(sum_k x[m, k] w[n, k] + b[n]) + residual[m, n]`.
pub(super) fn linear(
    d: LinearDims,
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    act: Activation,
    residual: Option<&[f64]>,
    out: &mut [f64],
) {
    for m in 0..d.m {
        for n in 0..d.n {
            let mut acc = 0.0f64;
            for k in 0..d.k {
                acc += x[m * d.k + k] * w[n * d.k + k];
            }
            if let Some(b) = b {
                acc += b[n];
            }
            let mut y = activate(act, acc);
            if let Some(r) = residual {
                y += r[m * d.n + n];
            }
            out[m * d.n + n] = y;
        }
    }
}

pub(super) fn activate(act: Activation, x: f64) -> f64 {
    match act {
        Activation::None => x,
        Activation::Relu => x.max(0.0),
        Activation::GeluErf => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
    }
}
