//! `linear` on the CPU, and the dot-product engine it shares with attention
//! (with [`weighted_sums`], the other form attention's P·V takes).
//!
//! Both operands of `x · wᵀ` are K-contiguous rows, so each output is a dot
//! product of two contiguous rows. A register tile of `MR` rows of `x` by `NR`
//! rows of `w` keeps `MR·NR` accumulators of 8 lanes: each step loads `MR + NR`
//! vectors for `MR·NR` multiply-adds. A thread's block of `x` rows stays in its
//! L2 while it walks its block of `w` rows, `NR` at a time (in L1).

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::{fold8, lanes, tiles, Tile};
use crate::error::{Error, Result};
use crate::ops::{Activation, LinearDims};
use crate::tensor::try_filled;

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
    /// AVX2 with fused multiply-add (and F16C's conversions), found at run
    /// time.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// The same, and AVX512-BF16's `vdpbf16ps` (with AVX512-VL) for the
    /// products of bf16 pairs.
    #[cfg(target_arch = "x86_64")]
    Avx2Bf16,
    /// NEON's fused multiply-add in register tiles (every aarch64 CPU).
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    Neon,
}

impl Simd {
    pub(crate) fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512vl") {
                return Simd::Avx2Bf16;
            }
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

    pub(crate) fn name(self) -> &'static str {
        match self {
            Simd::Baseline if BASELINE_FMA => "baseline+fma",
            Simd::Baseline => "baseline",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Fma => "avx2+fma",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2Bf16 => "avx2+fma+avx512bf16",
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Simd::Neon => "neon",
        }
    }

    /// This instruction set and the lesser ones it contains, down to the
    /// baseline: what a test can run here.
    #[cfg(test)]
    pub(crate) fn here() -> Vec<Simd> {
        let mut sets = vec![Simd::Baseline];
        #[cfg(target_arch = "x86_64")]
        if Simd::detect() == Simd::Avx2Bf16 {
            sets.push(Simd::Avx2Fma);
        }
        if Simd::detect() != Simd::Baseline {
            sets.push(Simd::detect());
        }
        sets
    }
}

/// `$body` compiled for the instruction set `$simd` (a [`Simd`]): with AVX2,
/// the body and what it inlines (the row loops of the norms and the softmax,
/// marked `#[inline(always)]`) are vectorised 8 f32 or 4 f64 lanes wide
/// instead of the baseline's 4 or 2. The body is written out once per arm:
/// one closure called from both had two callers and, once large, stayed out
/// of line, compiled for the baseline (the absorbed attention's row did, AVX2
/// or not). A closure with one caller is inlined at these call sites
/// (objdump: each has its AVX2 `run_avx2`), but inlining a closure is LLVM's
/// choice; code that must be AVX2 whatever its size is a named
/// `#[target_feature]` function calling an `#[inline(always)]` one (as
/// `projector::combine`).
macro_rules! simd_run {
    ($simd:expr, $body:expr) => {
        match $simd {
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::linear::Simd::Avx2Fma | $crate::cpu::linear::Simd::Avx2Bf16 => {
                // SAFETY: `detect` gives these only where it found AVX2 and FMA.
                unsafe { $crate::cpu::linear::run_avx2(|| $body) }
            }
            // The baseline, and NEON (the build's baseline on aarch64).
            _ => $body,
        }
    };
}
pub(crate) use simd_run;

/// `f()` with AVX2 and FMA on: [`simd_run`]'s AVX2 arm.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
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
        // SAFETY: `detect` gives these only where it found AVX2 and FMA.
        Simd::Avx2Fma | Simd::Avx2Bf16 => unsafe { avx2::dots(xs, ws, rows, out) },
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        // SAFETY: the build targets NEON.
        Simd::Neon => unsafe { lanes::dots::<lanes::F32s<lanes::Neon>>(xs, ws, rows, out) },
    }
}

/// [`dots`] of rows of bf16 pairs ([`pack_pairs`]): per output, 8 lanes each
/// summing the pairs `8i + lane` in order, a pair's odd element's product
/// added before its even one's; the lanes summed by [`tree`], then the tail.
/// Every instruction set gives the same bits (a product of two bf16 is exact
/// in f32), except where a product or a partial sum falls below f32's
/// normal range, which `vdpbf16ps` flushes to zero.
pub(crate) fn pair_dots(
    simd: Simd,
    xs: &[&[u32]],
    ws: &[&[u32]],
    rows: Rows,
    out: &mut [&mut [f32]],
) {
    match simd {
        Simd::Baseline => {
            for (x, o) in xs.iter().zip(out.iter_mut()) {
                for (w, o) in ws.iter().zip(o.iter_mut()) {
                    *o = lane_dot(x, w, madd_pair);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` found AVX2 and FMA.
        Simd::Avx2Fma => unsafe { avx2::pair_dots(xs, ws, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` found AVX2, FMA, AVX512-BF16 and AVX512-VL.
        Simd::Avx2Bf16 => unsafe { avx2::pair_dots_bf16(xs, ws, rows, out) },
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        // SAFETY: the build targets NEON.
        Simd::Neon => unsafe { lanes::dots::<lanes::Pairs<lanes::Neon>>(xs, ws, rows, out) },
    }
}

/// [`dots`] of f32 rows by rows of f16 (their bits), each widened to f32:
/// exact, so with `xs` holding f16 values too ([`round_f16`]) each product is
/// exact and every instruction set gives the same bits.
pub(crate) fn half_dots(
    simd: Simd,
    xs: &[&[f32]],
    ws: &[&[u16]],
    rows: Rows,
    out: &mut [&mut [f32]],
) {
    match simd {
        Simd::Baseline => {
            let mut wide = Vec::new();
            for (c, w) in ws.iter().enumerate() {
                wide.resize(w.len(), 0.0);
                // A row at a time (`half` checks for F16C once a call).
                bytemuck::cast_slice::<u16, f16>(w).convert_to_f32_slice(&mut wide);
                for (x, o) in xs.iter().zip(out.iter_mut()) {
                    o[c] = dot(x, &wide);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` gives these only where it found AVX2, FMA and F16C.
        Simd::Avx2Fma | Simd::Avx2Bf16 => unsafe { avx2::half_dots(xs, ws, rows, out) },
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        // SAFETY: the build targets NEON.
        Simd::Neon => unsafe { lanes::half_dots::<lanes::Neon>(xs, ws, rows, out) },
    }
}

/// `out = x` rounded to the nearest f16 (ties to even), as f32.
pub(crate) fn round_f16(simd: Simd, x: &[f32], out: &mut [f32]) {
    match simd {
        Simd::Baseline => {
            // In pieces, through `half`'s slice conversions (F16C where
            // found, checked once a call).
            let mut bits = [f16::ZERO; 256];
            for (x, o) in x.chunks(bits.len()).zip(out.chunks_mut(bits.len())) {
                let bits = &mut bits[..x.len()];
                bits.convert_from_f32_slice(x);
                bits.convert_to_f32_slice(&mut o[..x.len()]);
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `detect` gives these only where it found AVX2, FMA and F16C.
        Simd::Avx2Fma | Simd::Avx2Bf16 => unsafe { avx2::round_f16(x, out) },
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        // SAFETY: the build targets NEON.
        Simd::Neon => unsafe { lanes::round_f16::<lanes::Neon>(x, out) },
    }
}

/// The f16 of bits `b` as f32 (exact).
#[inline(always)]
pub(super) fn f16_value(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

/// `v` rounded to the nearest f16 (ties to even), as f32.
#[inline(always)]
pub(super) fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
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
        // SAFETY: `detect` gives these only where it found AVX2 and FMA.
        Simd::Avx2Fma | Simd::Avx2Bf16 => unsafe { avx2::weighted_sums(ps, vs, out) },
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        // SAFETY: the build targets NEON.
        Simd::Neon => unsafe { lanes::weighted_sums::<lanes::Neon>(ps, vs, out) },
    }
}

/// One dot product in `LANES` partial sums (the compiler vectorises them),
/// summed by [`tree`], then the tail.
fn dot(x: &[f32], w: &[f32]) -> f32 {
    lane_dot(x, w, |s, x, w| madd(x, w, s))
}

/// `step` folds element `i` into lane `i % LANES`; the lanes are summed by
/// [`tree`], then the tail is folded in order.
#[inline(always)]
fn lane_dot<E: Copy>(x: &[E], w: &[E], step: impl Fn(f32, E, E) -> f32) -> f32 {
    let w = &w[..x.len()];
    let mut acc = [0.0f32; LANES];
    let body = x.len() - x.len() % LANES;
    for (xv, wv) in x[..body]
        .chunks_exact(LANES)
        .zip(w[..body].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] = step(acc[l], xv[l], wv[l]);
        }
    }
    let tail = x[body..].iter().zip(&w[body..]);
    tail.fold(tree(acc), |s, (&x, &w)| step(s, x, w))
}

/// A fused multiply-add where the baseline has one; else a multiply and an add
/// (`f32::mul_add` would be a library call).
#[inline(always)]
pub(super) fn madd(a: f32, b: f32, c: f32) -> f32 {
    if BASELINE_FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `s` plus the products of two bf16 pairs: the odd (high) elements' first,
/// then the even ones'. The products are exact in f32, so each add rounds once
/// with or without a fused multiply-add.
#[inline(always)]
pub(super) fn madd_pair(s: f32, x: u32, w: u32) -> f32 {
    let odd = |v: u32| f32::from_bits(v & 0xffff_0000);
    let even = |v: u32| f32::from_bits(v << 16);
    madd(even(x), even(w), madd(odd(x), odd(w), s))
}

/// The lanes of one accumulator summed in a fixed tree, so that results do
/// not depend on the tiling, hence on the thread count.
#[inline(always)]
pub(super) fn tree(a: [f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// `v` in bf16, rounded to nearest even, below bf16's normal range flushed
/// to zero (as `vdpbf16ps` takes it).
pub(super) fn bf16_bits(v: f32) -> u16 {
    flush(half::bf16::from_f32(v).to_bits())
}

/// A bf16 below the normal range as a zero of its sign.
pub(super) fn flush(b: u16) -> u16 {
    if b & 0x7f80 == 0 {
        b & 0x8000
    } else {
        b
    }
}

/// Rows of `k` elements as rows of `k.div_ceil(2)` bf16 pairs, `bits` giving
/// an element's bf16 (element `2i` in the low half of pair `i`; an odd row's
/// last pair padded with zero).
pub(super) fn pack_pairs<T: Copy>(rows: &[T], k: usize, bits: impl Fn(T) -> u16, out: &mut [u32]) {
    // Rows of no elements hold no pairs (and `chunks` takes no zero).
    let (k, kp) = (k.max(1), k.div_ceil(2).max(1));
    for (row, out) in rows.chunks(k).zip(out.chunks_mut(kp)) {
        for (pair, out) in row.chunks(2).zip(out.iter_mut()) {
            let hi = pair.get(1).map_or(0, |&v| bits(v));
            *out = u32::from(hi) << 16 | u32::from(bits(pair[0]));
        }
    }
}

/// The entry points compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{lanes, Rows};
    use lanes::Avx2;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(xs: &[&[f32]], ws: &[&[f32]], rows: Rows, out: &mut [&mut [f32]]) {
        lanes::dots::<lanes::F32s<Avx2>>(xs, ws, rows, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pair_dots(
        xs: &[&[u32]],
        ws: &[&[u32]],
        rows: Rows,
        out: &mut [&mut [f32]],
    ) {
        lanes::dots::<lanes::Pairs<Avx2>>(xs, ws, rows, out)
    }

    #[target_feature(enable = "avx2,fma,avx512bf16,avx512vl")]
    pub(super) unsafe fn pair_dots_bf16(
        xs: &[&[u32]],
        ws: &[&[u32]],
        rows: Rows,
        out: &mut [&mut [f32]],
    ) {
        lanes::dots::<lanes::DotBf16>(xs, ws, rows, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn half_dots(
        xs: &[&[f32]],
        ws: &[&[u16]],
        rows: Rows,
        out: &mut [&mut [f32]],
    ) {
        lanes::half_dots::<Avx2>(xs, ws, rows, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn round_f16(x: &[f32], out: &mut [f32]) {
        lanes::round_f16::<Avx2>(x, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sums(ps: &[&[f32]], vs: &[&[f32]], out: &mut [&mut [f32]]) {
        lanes::weighted_sums::<Avx2>(ps, vs, out)
    }
}

/// The weight of one `linear` call: `[n, k]` f32, `[n, k.div_ceil(2)]` bf16
/// pairs ([`pack_pairs`]), or `[n, k]` f16 bits.
#[derive(Clone, Copy)]
pub(super) enum Weight<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u32]),
    F16(&'a [u16]),
}

/// The inputs of one `linear` call.
pub(super) struct Linear<'a> {
    pub x: &'a [f32],
    pub w: Weight<'a>,
    pub b: Option<&'a [f32]>,
    pub act: Activation,
    pub residual: Option<&'a [f32]>,
}

/// `out = act(x · wᵀ + b) + residual`, tiles of the output spread over the
/// pool. With a bf16 or f16 weight, `x` is rounded to that type first (a copy
/// of `m` rows); a finite value of `x` past f16's range is an error.
pub(super) fn linear(simd: Simd, d: LinearDims, a: Linear<'_>, out: &mut [f32]) -> Result<()> {
    let (row_block, col_block) = blocks(d, rayon::current_num_threads());
    let tiles = tiles(out, d.n, row_block, col_block);
    match a.w {
        Weight::F32(w) => each_tile(simd, d, &a, tiles, (a.x, w, d.k), dots),
        Weight::Bf16(w) => {
            let kp = d.k.div_ceil(2);
            let mut x = try_filled(d.m * kp, 0u32, "linear input in bf16")?;
            x.par_chunks_mut(kp * row_block)
                .zip(a.x.par_chunks(d.k * row_block))
                .for_each(|(out, x)| pack_pairs(x, d.k, bf16_bits, out));
            each_tile(simd, d, &a, tiles, (&x, w, kp), pair_dots);
        }
        Weight::F16(w) => {
            if let Some((i, v)) = past_f16(simd, a.x) {
                return Err(Error::invalid(format!(
                    "linear input: {v} at flat index {i} overflows f16 (the backend is set \
                     to f16; f32 or bf16 hold it)"
                )));
            }
            let mut x = try_filled(a.x.len(), 0f32, "linear input in f16")?;
            x.par_chunks_mut(d.k * row_block)
                .zip(a.x.par_chunks(d.k * row_block))
                .for_each(|(out, x)| round_f16(simd, x, out));
            each_tile(simd, d, &a, tiles, (&x, w, d.k), half_dots);
        }
    }
    Ok(())
}

/// The first finite value of `x` that f16 cannot hold (infinities and NaN
/// pass through a forward as they do in f32).
fn past_f16(simd: Simd, x: &[f32]) -> Option<(usize, f32)> {
    // At 65520 and above a value rounds to infinity (f16's largest is 65504).
    let finite_abs = |v: f32| if v.is_finite() { v.abs() } else { 0.0 };
    let max = x
        .par_chunks(1 << 14)
        .map(|x| simd_run!(simd, fold8(x, 0.0, |m, v| m.max(finite_abs(v)), f32::max)))
        .reduce(|| 0.0, f32::max);
    if max < 65520.0 {
        return None;
    }
    x.iter()
        .position(|&v| finite_abs(v) >= 65520.0)
        .map(|i| (i, x[i]))
}

/// [`dots`], [`pair_dots`] or [`half_dots`].
type Dots<X, W> = fn(Simd, &[&[X]], &[&[W]], Rows, &mut [&mut [f32]]);

/// `product` of each tile's rows of `x` and `w` (rows of `len` elements),
/// then its epilogue, the tiles spread over the pool.
fn each_tile<X: Sync, W: Sync>(
    simd: Simd,
    d: LinearDims,
    a: &Linear<'_>,
    tiles: Vec<Tile<'_>>,
    (x, w, len): (&[X], &[W], usize),
    product: Dots<X, W>,
) {
    tiles.into_par_iter().for_each(|mut t| {
        let xs = rows(x, len, t.row, t.rows.len());
        let ws = rows(w, len, t.col, t.width());
        product(simd, &xs, &ws, Rows::Streamed, &mut t.rows);
        epilogue(d, a, &mut t);
    });
}

/// Rows `first..first + count` of `len` elements each.
fn rows<E>(v: &[E], len: usize, first: usize, count: usize) -> Vec<&[E]> {
    v[first * len..(first + count) * len].chunks(len).collect()
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

/// A tile's bias, activation and residual, in place.
fn epilogue(d: LinearDims, a: &Linear<'_>, t: &mut Tile<'_>) {
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
        let sets = Simd::here();
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

    /// Rows of `k` values, packed into rows of `len(k)` elements.
    type Pack<E> = fn(&[f32], usize) -> Vec<E>;
    /// How `x` and `w` are packed, and the length of a packed row.
    type Packing<X, W> = (Pack<X>, Pack<W>, fn(usize) -> usize);

    /// `product` on every instruction set here: the same bits as the
    /// baseline's plain loop, on every tile shape and odd lengths, rows
    /// cached and streamed, outputs poisoned; and within f32's rounding of
    /// the f64 sum of the values as `round` gives them. (An element only on
    /// one path, products added in another order, or fewer lanes, change
    /// bits here.)
    fn same_bits_everywhere<X: Copy, W: Copy>(
        round: fn(f32) -> f32,
        (pack_x, pack_w, len): Packing<X, W>,
        product: Dots<X, W>,
    ) {
        // The last three: rows long enough that `half_dots` widens the
        // weights as it loads them (up to 4 rows) or into a buffer (5).
        let shapes: [(usize, usize, usize); 10] = [
            (1, 1, 1),
            (5, 7, 7),
            (4, 8, 3),
            (9, 17, 10),
            (3, 64, 2),
            (4, 41, 9),
            (6, 300, 8),
            (4, 1030, 6),
            (1, 1024, 5),
            (5, 1030, 3),
        ];
        // Both signs, magnitudes from 2^-4 to 2^5 (close enough that the
        // order of the adds shows in the bits), and zeros.
        let mut rng = crate::rng::Rng::new(5);
        let mut value = || {
            let r = rng.next_u64();
            let sign = if r & 1 == 0 { 1.0 } else { -1.0 };
            let mantissa = 1.0 + (r >> 8 & 0xffff) as f32 / 65536.0;
            let scale = 2f32.powi((r >> 32 & 0x3f) as i32 % 9 - 4);
            if r >> 40 & 0xf == 0 {
                0.0
            } else {
                sign * mantissa * scale
            }
        };
        for &(rows, k, cols) in &shapes {
            let x: Vec<f32> = (0..rows * k).map(|_| value()).collect();
            let w: Vec<f32> = (0..cols * k).map(|_| value()).collect();
            let (xp, wp) = (pack_x(&x, k), pack_w(&w, k));
            let xs: Vec<&[X]> = xp.chunks(len(k)).collect();
            let ws: Vec<&[W]> = wp.chunks(len(k)).collect();
            let mut baseline: Vec<u32> = Vec::new();
            for simd in Simd::here() {
                for stream in [Rows::Cached, Rows::Streamed] {
                    let mut out = vec![f32::NAN; rows * cols];
                    let mut rows_out: Vec<&mut [f32]> = out.chunks_mut(cols).collect();
                    product(simd, &xs, &ws, stream, &mut rows_out);
                    let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    if !baseline.is_empty() {
                        assert_eq!(bits, baseline, "{simd:?} {stream:?} {rows}x{k}x{cols}");
                        continue;
                    }
                    baseline = bits;
                    let r = |v: f32| f64::from(round(v));
                    for i in 0..rows {
                        for c in 0..cols {
                            let terms = (0..k).map(|t| r(x[i * k + t]) * r(w[c * k + t]));
                            let want: f64 = terms.clone().sum();
                            let scale: f64 = terms.map(f64::abs).sum();
                            let got = f64::from(out[i * cols + c]);
                            // The bound on a sum of k + 1 f32 adds.
                            assert!(
                                (got - want).abs() <= (k + 1) as f64 * 6e-8 * scale,
                                "{rows}x{k}x{cols} at ({i}, {c}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// [`pair_dots`] (bf16 pairs, `vdpbf16ps`'s order) gives the same bits
    /// everywhere. It fails with a pair's even product added first.
    #[test]
    fn pair_dots_give_the_same_bits_everywhere() {
        fn pack(v: &[f32], k: usize) -> Vec<u32> {
            let mut out = vec![0u32; v.len() / k * k.div_ceil(2)];
            pack_pairs(v, k, bf16_bits, &mut out);
            out
        }
        let bf16 = |v: f32| half::bf16::from_f32(v).to_f32();
        same_bits_everywhere(bf16, (pack, pack, |k| k.div_ceil(2)), pair_dots);
    }

    /// [`half_dots`] (f32 rows holding f16 values by f16 rows) gives the same
    /// bits everywhere.
    #[test]
    fn half_dots_give_the_same_bits_everywhere() {
        fn pack_x(v: &[f32], _: usize) -> Vec<f32> {
            let mut out = vec![f32::NAN; v.len()];
            round_f16(Simd::Baseline, v, &mut out);
            out
        }
        fn pack_w(v: &[f32], _: usize) -> Vec<u16> {
            v.iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect()
        }
        same_bits_everywhere(f16_round, (pack_x, pack_w, |k| k), half_dots);
    }

    /// [`round_f16`] on every instruction set here gives `half`'s rounding
    /// bit for bit: ties to even, f16's subnormals, its largest value, the
    /// first to round to infinity, infinities and NaN.
    #[test]
    fn f16_rounding_is_the_same_everywhere() {
        let ulp = 2f32.powi(-10);
        let mut x = vec![
            0.0,
            -0.0,
            1.0 + ulp / 2.0,       // a tie: down to even
            1.0 + 3.0 * ulp / 2.0, // a tie: up to even
            2f32.powi(-24),        // the least subnormal
            2f32.powi(-25),        // half of it: a tie, to zero
            3.0 * 2f32.powi(-26),  // rounds up to the least subnormal
            6.1e-5,                // subnormal, near the least normal
            65504.0,
            65519.99,
            65520.0,
            -65520.0,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let mut rng = crate::rng::Rng::new(9);
        x.extend((0..1000).map(|_| f32::from_bits(rng.next_u64() as u32 & 0xc7ff_ffff)));
        for len in [x.len(), 7, 8, 9] {
            let x = &x[..len];
            let want: Vec<u32> = x.iter().map(|&v| f16_round(v).to_bits()).collect();
            for simd in Simd::here() {
                let mut out = vec![1.5f32; len];
                round_f16(simd, x, &mut out);
                for (i, (o, w)) in out.iter().zip(&want).enumerate() {
                    let nan = f32::from_bits(*w).is_nan();
                    assert!(
                        o.to_bits() == *w || (nan && o.is_nan()),
                        "{simd:?} {}: {o} vs {}",
                        x[i],
                        f32::from_bits(*w)
                    );
                }
            }
        }
    }

    /// The pairs hold bf16 rounded to nearest even, element `2i` low, an odd
    /// row padded with zero, values below the normal range flushed.
    #[test]
    fn pairs_pack_rows() {
        let x = [1.0f32, -2.0, 1.0 + 3.0 / 256.0, 1e-39, 3.0, f32::NAN];
        let mut out = [0u32; 4];
        pack_pairs(&x[..5], 5, bf16_bits, &mut out[..3]);
        assert_eq!(out[0], 0xc000_3f80);
        // 1 + 3/256 is halfway between 1 + 2/256 and 1 + 4/256: even wins.
        assert_eq!(out[1] & 0xffff, 0x3f82);
        assert_eq!(out[1] >> 16, 0, "1e-39 is below bf16's normal range");
        assert_eq!(out[2], 0x0000_4040, "3.0, then the padding");
        pack_pairs(&x[4..], 2, bf16_bits, &mut out[3..]);
        assert!(f32::from_bits(out[3] & 0xffff_0000).is_nan());
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
