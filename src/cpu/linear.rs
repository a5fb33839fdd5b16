//! `linear` on the CPU, and the dot-product engine it shares with attention
//! (with [`weighted_sums`], the other form attention's P·V takes).
//!
//! Both operands of `x · wᵀ` are K-contiguous rows, so each output is a dot
//! product of two contiguous rows. A register tile of `MR` rows of `x` by `NR`
//! rows of `w` keeps `MR·NR` accumulators of 8 lanes: each step loads `MR + NR`
//! vectors for `MR·NR` multiply-adds. A thread's block of `x` rows stays in its
//! L2 while it walks its block of `w` rows, `NR` at a time (in L1).

use rayon::prelude::*;

use super::{lanes, tiles, Tile};
use crate::ops::{Activation, LinearDims};

/// Lanes per accumulator: one AVX register of f32, two NEON ones.
pub(super) const LANES: usize = 8;
/// f32 per 64-byte cache line.
pub(super) const LINE: usize = 16;
/// Rows of `x` per register tile.
pub(super) const MR: usize = 3;
/// Rows of `w` per register tile: 3 x 4 accumulators and 3 + 1 operands,
/// AVX2's 16 registers (4 x 3 needs 17: one spills, and the GEMMs ran at
/// less than half the speed); NEON's 32, with `w`'s 8 lanes loaded 4 at a time.
pub(super) const NR: usize = 4;
/// Bytes of `x` rows a thread keeps in its L2 while it walks `w`.
const X_BLOCK_BYTES: usize = 256 << 10;

/// The instruction set the dot products are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    /// What the build targets (SSE2 on x86-64, NEON with FMA on aarch64).
    Baseline,
    /// AVX2 with fused multiply-add, found at run time.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// NEON's fused multiply-add in register tiles (every aarch64 CPU).
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    Neon,
}

impl Simd {
    pub(crate) fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Simd::Avx2Fma;
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        {
            Simd::Neon
        }
        #[cfg(not(all(target_arch = "aarch64", target_feature = "neon")))]
        {
            Simd::Baseline
        }
    }

    /// `f()` compiled for this instruction set: with AVX2, `f` and what it
    /// inlines (the row loops of the norms and the softmax, marked
    /// `#[inline(always)]`) are vectorised 8 f32 or 4 f64 lanes wide instead
    /// of the baseline's 4 or 2.
    #[inline(always)]
    pub(crate) fn run<R>(self, f: impl FnOnce() -> R) -> R {
        match self {
            Simd::Baseline => f(),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd::Avx2Fma` exists only where `detect` found both features.
            Simd::Avx2Fma => unsafe { run_avx2(f) },
            // NEON is the build's baseline: nothing to switch on.
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Simd::Neon => f(),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Simd::Baseline if BASELINE_FMA => "baseline+fma",
            Simd::Baseline => "baseline",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma => "avx2+fma",
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Simd::Neon => "neon",
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Whether the build's baseline has a fused multiply-add instruction.
const BASELINE_FMA: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

/// Where the `ws` rows of [`dots`] are read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rows {
    /// Just written, or small: in cache.
    Cached,
    /// From memory, read once (a linear's weights): each register tile of
    /// `ws` rows asks for the next one's into L2 while it runs. A weight row of
    /// K = 512 is 2 KB, too short a stream for the hardware prefetcher to
    /// follow; the 4-row GEMM of 16416 x 512 weights went from 12 to 35-50 GB/s.
    Streamed,
}

/// `out[r][c] = xs[r] · ws[c]` for rows of one length.
pub(crate) fn dots(simd: Simd, xs: &[&[f32]], ws: &[&[f32]], rows: Rows, out: &mut [&mut [f32]]) {
    match simd {
        Simd::Baseline => {
            for (x, o) in xs.iter().zip(out.iter_mut()) {
                for (w, o) in ws.iter().zip(o.iter_mut()) {
                    *o = dot(x, w);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Simd::Avx2Fma` exists only where `detect` found both features.
        Simd::Avx2Fma => unsafe { avx2::dots(xs, ws, rows, out) },
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        // SAFETY: the build targets NEON.
        Simd::Neon => unsafe { lanes::dots::<lanes::Neon>(xs, ws, rows, out) },
    }
}

/// `out[r] = Σ_j ps[r][j] · vs[j]`: rows of weights times a matrix given by
/// its rows, each output summed over `j` in order (attention's P·V: no
/// transposed copy of V, no sum across lanes).
pub(crate) fn weighted_sums(simd: Simd, ps: &[&[f32]], vs: &[&[f32]], out: &mut [&mut [f32]]) {
    match simd {
        Simd::Baseline => {
            for (p, o) in ps.iter().zip(out.iter_mut()) {
                o.fill(0.0);
                for (&p, v) in p.iter().zip(vs) {
                    o.iter_mut()
                        .zip(v.iter())
                        .for_each(|(o, &v)| *o = madd(p, v, *o));
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Simd::Avx2Fma` exists only where `detect` found both features.
        Simd::Avx2Fma => unsafe { avx2::weighted_sums(ps, vs, out) },
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        // SAFETY: the build targets NEON.
        Simd::Neon => unsafe { lanes::weighted_sums::<lanes::Neon>(ps, vs, out) },
    }
}

/// One dot product in `LANES` partial sums (the compiler vectorises them),
/// reduced by [`reduce`].
fn dot(x: &[f32], w: &[f32]) -> f32 {
    let w = &w[..x.len()];
    let mut acc = [0.0f32; LANES];
    let body = x.len() - x.len() % LANES;
    for (xv, wv) in x[..body]
        .chunks_exact(LANES)
        .zip(w[..body].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] = madd(xv[l], wv[l], acc[l]);
        }
    }
    reduce(acc, &x[body..], &w[body..])
}

/// A fused multiply-add where the baseline has one; else a multiply and an add
/// (`f32::mul_add` would be a library call).
#[inline(always)]
fn madd(a: f32, b: f32, c: f32) -> f32 {
    if BASELINE_FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The lanes of one accumulator summed in a fixed tree (so that results do
/// not depend on the tiling, hence on the thread count), then the tail.
#[inline(always)]
pub(super) fn reduce(a: [f32; LANES], x: &[f32], w: &[f32]) -> f32 {
    let mut s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    for (&x, &w) in x.iter().zip(w) {
        s = madd(x, w, s);
    }
    s
}

/// The entry points compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{lanes, Rows};
    use lanes::Avx2;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(xs: &[&[f32]], ws: &[&[f32]], rows: Rows, out: &mut [&mut [f32]]) {
        lanes::dots::<Avx2>(xs, ws, rows, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sums(ps: &[&[f32]], vs: &[&[f32]], out: &mut [&mut [f32]]) {
        lanes::weighted_sums::<Avx2>(ps, vs, out)
    }
}

/// The inputs of one `linear` call.
pub(super) struct Linear<'a> {
    pub x: &'a [f32],
    pub w: &'a [f32],
    pub b: Option<&'a [f32]>,
    pub act: Activation,
    pub residual: Option<&'a [f32]>,
}

/// `out = act(x · wᵀ + b) + residual`, tiles of the output spread over the pool.
pub(super) fn linear(simd: Simd, d: LinearDims, a: Linear<'_>, out: &mut [f32]) {
    let (row_block, col_block) = blocks(d, rayon::current_num_threads());
    tiles(out, d.n, row_block, col_block)
        .into_par_iter()
        .for_each(|mut t| linear_tile(simd, d, &a, &mut t));
}

/// Rows and columns per task: as many `x` rows as fit the L2 budget, and
/// columns cut so that every thread has about four tiles to take.
fn blocks(d: LinearDims, threads: usize) -> (usize, usize) {
    let rows = (X_BLOCK_BYTES / (4 * d.k)).clamp(MR, 256) / MR * MR;
    let row_blocks = d.m.div_ceil(rows);
    let want = 4 * threads.max(1);
    let col_blocks = want.div_ceil(row_blocks).max(1);
    let cols =
        d.n.div_ceil(col_blocks)
            .next_multiple_of(NR)
            .clamp(NR, 8 * 16 * NR);
    (rows, cols)
}

fn linear_tile(simd: Simd, d: LinearDims, a: &Linear<'_>, t: &mut Tile<'_>) {
    let k = d.k;
    let cols = t.rows[0].len();
    let xs: Vec<&[f32]> = (t.row..t.row + t.rows.len())
        .map(|r| &a.x[r * k..(r + 1) * k])
        .collect();
    let ws: Vec<&[f32]> = (t.col..t.col + cols)
        .map(|c| &a.w[c * k..(c + 1) * k])
        .collect();
    dots(simd, &xs, &ws, Rows::Streamed, &mut t.rows);
    for (i, row) in t.rows.iter_mut().enumerate() {
        let r = t.row + i;
        for (j, y) in row.iter_mut().enumerate() {
            let n = t.col + j;
            let mut v = *y + a.b.map_or(0.0, |b| b[n]);
            v = activate(a.act, v);
            if let Some(res) = a.residual {
                v += res[r * d.n + n];
            }
            *y = v;
        }
    }
}

/// The activation in f32 (PyTorch's formulas).
pub(super) fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::None => x,
        Activation::Relu => x.max(0.0),
        Activation::GeluErf => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            let c = (2.0 / std::f32::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`dots`] or [`weighted_sums`].
    type Product = fn(Simd, &[&[f32]], &[&[f32]], &mut [&mut [f32]]);

    /// `run(simd, a, b, out)` on every instruction set found against a plain
    /// f64 loop, for each `(rows, inner, cols)`: `a` is `rows x inner`, `b`
    /// the other operand given as its `cols` rows of `inner` (`dots`) or
    /// its `inner` rows of `cols` (`weighted_sums`). Outputs poisoned first.
    fn check_products(run: Product, b_by_cols: bool, shapes: &[(usize, usize, usize)]) {
        let mut sets = vec![Simd::Baseline];
        if Simd::detect() != Simd::Baseline {
            sets.push(Simd::detect());
        }
        let value = |i: usize| ((i * 7919 % 113) as f32 - 56.0) / 17.0;
        for &(rows, inner, cols) in shapes {
            let a: Vec<f32> = (0..rows * inner).map(value).collect();
            let b: Vec<f32> = (0..inner * cols).map(|i| value(i + 5)).collect();
            let b_at = |t: usize, c: usize| {
                b[if b_by_cols {
                    c * inner + t
                } else {
                    t * cols + c
                }]
            };
            let a_rows: Vec<&[f32]> = a.chunks(inner).collect();
            let b_rows: Vec<&[f32]> = b.chunks(if b_by_cols { inner } else { cols }).collect();
            let mut baseline = Vec::new();
            for &simd in &sets {
                let mut out = vec![f32::NAN; rows * cols];
                let mut rows_out: Vec<&mut [f32]> = out.chunks_mut(cols).collect();
                run(simd, &a_rows, &b_rows, &mut rows_out);
                for r in 0..rows {
                    for c in 0..cols {
                        let want: f64 = (0..inner)
                            .map(|t| a[r * inner + t] as f64 * b_at(t, c) as f64)
                            .sum();
                        let got = out[r * cols + c] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{simd:?} {rows}x{inner}x{cols} at ({r}, {c}): {got} vs {want}"
                        );
                    }
                }
                // The tiles sum in the baseline's order: with a fused
                // multiply-add in the baseline too, they agree bit for bit.
                if simd == Simd::Baseline {
                    baseline = out;
                } else if BASELINE_FMA {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&out),
                        bits(&baseline),
                        "{simd:?} {rows}x{inner}x{cols}"
                    );
                }
            }
        }
    }

    /// Every tile shape, on lengths around the lane count, with rows cached
    /// and streamed (prefetched a tile ahead, past the last tile too).
    #[test]
    fn dots_match_a_plain_loop() {
        let shapes = [
            (1, 1, 1),
            (5, 7, 7),
            (4, 8, 3),
            (9, 17, 10),
            (3, 64, 2),
            (4, 40, 9),
        ];
        check_products(|s, x, w, o| dots(s, x, w, Rows::Cached, o), true, &shapes);
        check_products(|s, x, w, o| dots(s, x, w, Rows::Streamed, o), true, &shapes);
    }

    /// Every tile shape, and columns past the last whole vector.
    #[test]
    fn weighted_sums_match_a_plain_loop() {
        let shapes = [(1, 1, 1), (5, 7, 7), (4, 3, 8), (7, 10, 47), (3, 2, 64)];
        check_products(weighted_sums, false, &shapes);
    }

    #[test]
    fn blocks_give_every_thread_work() {
        let d = LinearDims {
            m: 4,
            n: 512,
            k: 4096,
        };
        // The x block fills the L2 budget in whole register tiles.
        let fits = |rows: usize, k: usize| {
            rows.is_multiple_of(MR)
                && rows * k * 4 <= X_BLOCK_BYTES
                && (rows + MR) * k * 4 > X_BLOCK_BYTES
        };
        let (rows, cols) = blocks(d, 8);
        assert!(fits(rows, d.k), "{rows} rows");
        assert!(d.n.div_ceil(cols) >= 24, "{cols} columns a tile");
        let big = LinearDims {
            m: 4928,
            n: 2048,
            k: 512,
        };
        let (rows, cols) = blocks(big, 2);
        assert!(fits(rows, big.k), "{rows} rows");
        assert_eq!(cols % NR, 0);
    }
}
