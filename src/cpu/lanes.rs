//! The register tiles of [`dots`](super::linear::dots),
//! [`pair_dots`](super::linear::pair_dots) and
//! [`weighted_sums`](super::linear::weighted_sums), written once over
//! [`Lanes`] (eight f32 lanes in one instruction set's registers) and
//! [`Dot`] (what a step multiplies into them: f32, or pairs of bf16); and
//! [`half_dots`], f16 rows widened into the f32 tiles.
//!
//! Everything here is `#[inline(always)]`, so a tile compiles for the
//! instruction set of the function it is inlined into: a
//! `#[target_feature(enable = "avx2,fma")]` entry point on x86-64 (AVX2 is
//! found at run time), any function on aarch64 (NEON is its baseline).
//!
//! Eight lanes on every instruction set, summed by the same tree as the
//! baseline's [`tree`]: where the baseline has a fused multiply-add (aarch64),
//! the f32 tiles give its results bit for bit. The bf16 tiles do everywhere:
//! a product of two bf16 is exact in f32, so fused or not, each step rounds
//! once. So do the f16 ones, for the same reason (11 bits by 11 fit f32's 24).

use std::marker::PhantomData;

use super::linear::{f16_value, madd_pair, tree, Rows, LANES, LINE, MR, NR};

/// Eight f32 lanes: one AVX register, or two NEON ones.
///
/// # Safety
///
/// Every method needs its instruction set present; the pointer methods read
/// or write 8 values from `p`, except [`Lanes::prefetch`], which may point
/// anywhere (a prefetch never faults).
pub(super) trait Lanes: Copy {
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// Eight bf16 pairs (the even element in each `u32`'s low half) as f32:
    /// the odd elements, then the even ones.
    unsafe fn load_pairs(p: *const u32) -> (Self, Self);
    /// Eight f16 (their bits) as f32.
    unsafe fn load_halves(p: *const u16) -> Self;
    /// Each lane rounded to the nearest f16 (ties to even), as f32.
    unsafe fn round_f16(self) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a · b + c`, rounded once.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    /// Asks for the cache line of `p` into L2.
    unsafe fn prefetch(p: *const f32);
}

/// What one step of a dot-product tile multiplies: 8 elements of each row
/// into 8 lanes of [`Dot::Acc`].
///
/// # Safety
///
/// As [`Lanes`]: [`Dot::load`] and [`Dot::load_w`] read 8 elements from `p`.
pub(super) trait Dot {
    /// Rows of `x` per tile (at most `MR`).
    const ROWS: usize = MR;
    /// An `x` row's element: `f32`, or a pair of bf16 in a `u32`.
    type Elem: Copy;
    /// A `w` row's element: `Elem`, or f16 bits beside f32.
    type W: Copy;
    type Acc: Lanes;
    /// 8 elements as loaded.
    type Vector: Copy;
    unsafe fn load(p: *const Self::Elem) -> Self::Vector;
    unsafe fn load_w(p: *const Self::W) -> Self::Vector;
    /// `acc + a · b`, lane by lane.
    unsafe fn madd(a: Self::Vector, b: Self::Vector, acc: Self::Acc) -> Self::Acc;
    /// The same for one element, for the tail past the last 8.
    fn step(s: f32, x: Self::Elem, w: Self::W) -> f32;
}

/// f32 rows of `x` on `V`'s fused multiply-add, by rows of `w` of f32 or of
/// f16 (their bits, `F32s<V, u16>`): each 8 weights widened as they are
/// loaded (exact), with no widened copy of `w`, for few rows of `x`.
pub(super) struct F32s<V, W = f32>(PhantomData<(V, W)>);

/// A weight element [`F32s`] multiplies in f32: f32, or f16 bits.
pub(super) trait Wide: Copy {
    /// 8 elements from `p`, as f32.
    ///
    /// # Safety
    ///
    /// As [`Lanes::load`].
    unsafe fn load<V: Lanes>(p: *const Self) -> V;
    fn value(self) -> f32;
}

impl Wide for f32 {
    #[inline(always)]
    unsafe fn load<V: Lanes>(p: *const f32) -> V {
        V::load(p)
    }
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }
}

impl Wide for u16 {
    #[inline(always)]
    unsafe fn load<V: Lanes>(p: *const u16) -> V {
        V::load_halves(p)
    }
    #[inline(always)]
    fn value(self) -> f32 {
        f16_value(self)
    }
}

impl<V: Lanes, W: Wide> Dot for F32s<V, W> {
    type Elem = f32;
    type W = W;
    type Acc = V;
    type Vector = V;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> V {
        V::load(p)
    }
    #[inline(always)]
    unsafe fn load_w(p: *const W) -> V {
        W::load(p)
    }
    #[inline(always)]
    unsafe fn madd(a: V, b: V, acc: V) -> V {
        V::fma(a, b, acc)
    }
    #[inline(always)]
    fn step(s: f32, x: f32, w: W) -> f32 {
        super::linear::madd(x, w.value(), s)
    }
}

/// Rows of bf16 pairs widened to f32: per lane, the odd elements' product
/// added, then the even ones' (the order of `vdpbf16ps`).
pub(super) struct Pairs<V>(PhantomData<V>);

impl<V: Lanes> Dot for Pairs<V> {
    /// 2 x 4 tiles: each operand unpacked takes twice the registers, and
    /// 3 x 4 needs 20 of AVX2's 16 (36 of NEON's 32): it spilled, at half
    /// the speed of 2 x 4.
    const ROWS: usize = 2;
    type Elem = u32;
    type W = u32;
    type Acc = V;
    type Vector = (V, V);
    #[inline(always)]
    unsafe fn load(p: *const u32) -> (V, V) {
        V::load_pairs(p)
    }
    #[inline(always)]
    unsafe fn load_w(p: *const u32) -> (V, V) {
        V::load_pairs(p)
    }
    #[inline(always)]
    unsafe fn madd(a: (V, V), b: (V, V), acc: V) -> V {
        V::fma(a.1, b.1, V::fma(a.0, b.0, acc))
    }
    #[inline(always)]
    fn step(s: f32, x: u32, w: u32) -> f32 {
        madd_pair(s, x, w)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, DotBf16};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Dot, Lanes};

    #[derive(Clone, Copy)]
    pub(in crate::cpu) struct Avx2(__m256);

    impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Avx2(_mm256_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx2(_mm256_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn load_pairs(p: *const u32) -> (Self, Self) {
            let v = _mm256_loadu_si256(p.cast());
            let odd = _mm256_and_si256(v, _mm256_set1_epi32(-0x1_0000));
            let even = _mm256_slli_epi32::<16>(v);
            (
                Avx2(_mm256_castsi256_ps(odd)),
                Avx2(_mm256_castsi256_ps(even)),
            )
        }
        #[inline(always)]
        unsafe fn load_halves(p: *const u16) -> Self {
            Avx2(_mm256_cvtph_ps(_mm_loadu_si128(p.cast())))
        }
        #[inline(always)]
        unsafe fn round_f16(self) -> Self {
            Avx2(_mm256_cvtph_ps(
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(self.0),
            ))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Avx2(_mm256_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            // Into L2, not L1: L1's few line-fill buffers held the 4-row GEMM
            // to 19 GB/s.
            _mm_prefetch::<_MM_HINT_T1>(p.cast())
        }
    }

    /// Rows of bf16 pairs on `vdpbf16ps` (AVX512-BF16 and AVX512-VL), eight
    /// lanes in an AVX register: per lane the odd elements' product added,
    /// then the even ones', each rounded once, as [`Pairs`](super::Pairs).
    pub(in crate::cpu) struct DotBf16;

    impl Dot for DotBf16 {
        type Elem = u32;
        type W = u32;
        type Acc = Avx2;
        type Vector = __m256bh;
        #[inline(always)]
        unsafe fn load(p: *const u32) -> __m256bh {
            // SAFETY: both are 32 bytes of plain data.
            std::mem::transmute::<__m256i, __m256bh>(_mm256_loadu_si256(p.cast()))
        }
        #[inline(always)]
        unsafe fn load_w(p: *const u32) -> __m256bh {
            Self::load(p)
        }
        #[inline(always)]
        unsafe fn madd(a: __m256bh, b: __m256bh, acc: Avx2) -> Avx2 {
            Avx2(_mm256_dpbf16_ps(acc.0, a, b))
        }
        #[inline(always)]
        fn step(s: f32, x: u32, w: u32) -> f32 {
            super::madd_pair(s, x, w)
        }
    }
}

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
pub(super) use arm::Neon;

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod arm {
    use std::arch::aarch64::*;

    use super::Lanes;

    /// Lanes 0-3 and 4-7.
    #[derive(Clone, Copy)]
    pub(in crate::cpu) struct Neon(float32x4_t, float32x4_t);

    impl Lanes for Neon {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Neon(vdupq_n_f32(0.0), vdupq_n_f32(0.0))
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            let v = vdupq_n_f32(x);
            Neon(v, v)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Neon(vld1q_f32(p), vld1q_f32(p.add(4)))
        }
        #[inline(always)]
        unsafe fn load_pairs(p: *const u32) -> (Self, Self) {
            let (lo, hi) = (vld1q_u32(p), vld1q_u32(p.add(4)));
            let odd = |v| vreinterpretq_f32_u32(vandq_u32(v, vdupq_n_u32(0xffff_0000)));
            let even = |v| vreinterpretq_f32_u32(vshlq_n_u32::<16>(v));
            (Neon(odd(lo), odd(hi)), Neon(even(lo), even(hi)))
        }
        #[inline(always)]
        unsafe fn load_halves(p: *const u16) -> Self {
            from_halves(vld1q_u16(p))
        }
        #[inline(always)]
        unsafe fn round_f16(self) -> Self {
            // To f16 and back, rounded as FPCR says: to nearest even, as
            // Linux starts every thread.
            let h: uint16x8_t;
            std::arch::asm!(
                "fcvtn {h:v}.4h, {a:v}.4s",
                "fcvtn2 {h:v}.8h, {b:v}.4s",
                a = in(vreg) self.0,
                b = in(vreg) self.1,
                h = out(vreg) h,
                options(pure, nomem, nostack, preserves_flags)
            );
            from_halves(h)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            vst1q_f32(p, self.0);
            vst1q_f32(p.add(4), self.1);
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Neon(vfmaq_f32(c.0, a.0, b.0), vfmaq_f32(c.1, a.1, b.1))
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            // `prfm` never faults, whatever the address.
            std::arch::asm!(
                "prfm pldl2keep, [{p}]",
                p = in(reg) p,
                options(nostack, readonly, preserves_flags)
            );
        }
    }

    /// Eight f16 (their bits) as f32: `fcvtl`, base AArch64, whose intrinsic
    /// (`vcvt_f32_f16`) is not stable Rust.
    #[inline(always)]
    unsafe fn from_halves(v: uint16x8_t) -> Neon {
        let (lo, hi): (float32x4_t, float32x4_t);
        std::arch::asm!(
            "fcvtl {lo:v}.4s, {v:v}.4h",
            "fcvtl2 {hi:v}.4s, {v:v}.8h",
            v = in(vreg) v,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags)
        );
        Neon(lo, hi)
    }
}

/// `$tile::<V, R, C>(..)` for a tile of `rows` (at most `MR`) by `cols`
/// (`NR` or more taken as `NR`).
macro_rules! by_tile {
    ($V:ty, $rows:expr, $cols:expr, $tile:ident($($arg:expr),*)) => {
        match ($rows, $cols) {
            (3, 4..) => $tile::<$V, 3, 4>($($arg),*),
            (3, 3) => $tile::<$V, 3, 3>($($arg),*),
            (3, 2) => $tile::<$V, 3, 2>($($arg),*),
            (3, _) => $tile::<$V, 3, 1>($($arg),*),
            (2, 4..) => $tile::<$V, 2, 4>($($arg),*),
            (2, 3) => $tile::<$V, 2, 3>($($arg),*),
            (2, 2) => $tile::<$V, 2, 2>($($arg),*),
            (2, _) => $tile::<$V, 2, 1>($($arg),*),
            (_, 4..) => $tile::<$V, 1, 4>($($arg),*),
            (_, 3) => $tile::<$V, 1, 3>($($arg),*),
            (_, 2) => $tile::<$V, 1, 2>($($arg),*),
            _ => $tile::<$V, 1, 1>($($arg),*),
        }
    };
}

/// [`dots`](super::linear::dots) in `MR x NR` tiles. Streamed rows are
/// fetched a tile ahead by the first rows' tile; the other rows' tiles find
/// them in cache.
#[inline(always)]
pub(super) unsafe fn dots<D: Dot>(
    xs: &[&[D::Elem]],
    ws: &[&[D::W]],
    rows: Rows,
    out: &mut [&mut [f32]],
) {
    for (c0, w) in (0..ws.len()).step_by(NR).zip(ws.chunks(NR)) {
        let next = match rows {
            Rows::Streamed => ws.get(c0 + NR..).unwrap_or_default(),
            Rows::Cached => &[],
        };
        let mut ahead = &next[..next.len().min(NR)];
        for (x, o) in xs.chunks(D::ROWS).zip(out.chunks_mut(D::ROWS)) {
            by_tile!(D, x.len(), w.len(), tile(x, w, o, c0, ahead));
            ahead = &[];
        }
    }
}

/// Up to `DIRECT_ROWS` rows of `x`, with rows of `DIRECT_K` elements or more,
/// [`half_dots`] widens the weights as its tiles load them (at 4 rows, twice:
/// a tile of 3 rows and one of 1), not into a buffer: 4 widened rows of 1024
/// f32 and the rows of `x` beside them no longer fit L1. Measured at 4 x 512
/// x K (best of 300): K = 1024-4096 1.1-1.6x faster; K = 512 no faster, and
/// at 8 rows no faster either.
const DIRECT_ROWS: usize = 4;
const DIRECT_K: usize = 1024;

/// [`half_dots`](super::linear::half_dots): each `NR` rows of `ws` widened to
/// f32 once (exact), then multiplied by every row of `xs` in the f32 tiles: the
/// widening is paid once for all the rows of `xs`. Streamed rows: the next
/// `NR` rows are fetched into L2 while these are widened. For few rows of
/// long `xs`, [`F32s`] tiles on the f16 rows instead (see [`DIRECT_ROWS`]).
#[inline(always)]
pub(super) unsafe fn half_dots<V: Lanes>(
    xs: &[&[f32]],
    ws: &[&[u16]],
    rows: Rows,
    out: &mut [&mut [f32]],
) {
    let Some(k) = ws.first().map(|w| w.len()) else {
        return;
    };
    if xs.len() <= DIRECT_ROWS && k >= DIRECT_K {
        return dots::<F32s<V, u16>>(xs, ws, rows, out);
    }
    let mut wide = vec![0.0f32; NR * k];
    for (c0, w) in (0..ws.len()).step_by(NR).zip(ws.chunks(NR)) {
        let next = match rows {
            Rows::Streamed => ws.get(c0 + NR..).unwrap_or_default(),
            Rows::Cached => &[],
        };
        let mut wr = [&[][..]; NR];
        // Rows of no elements widen to none (and `chunks` takes no zero).
        for (c, wide) in wide.chunks_mut(k.max(1)).take(w.len()).enumerate() {
            widen::<V>(&w[c][..k], wide, next.get(c));
            wr[c] = wide;
        }
        let wr = &wr[..w.len()];
        for (x, o) in xs.chunks(MR).zip(out.chunks_mut(MR)) {
            by_tile!(F32s<V>, x.len(), w.len(), tile(x, wr, o, c0, &[]));
        }
    }
}

/// `dst = src` as f32, fetching `ahead` into L2 a cache line at a time.
#[inline(always)]
unsafe fn widen<V: Lanes>(src: &[u16], dst: &mut [f32], ahead: Option<&&[u16]>) {
    let body = src.len() - src.len() % LANES;
    for i in (0..body).step_by(LANES) {
        // Twice as many f16 as f32 to a line.
        if let (Some(a), 0) = (ahead, i % (2 * LINE)) {
            V::prefetch(a.as_ptr().wrapping_add(i).cast());
        }
        // SAFETY: i + LANES <= body <= both lengths.
        V::load_halves(src.as_ptr().add(i)).store(dst.as_mut_ptr().add(i));
    }
    for (d, &s) in dst[body..].iter_mut().zip(&src[body..]) {
        *d = f16_value(s);
    }
}

/// `out = x` rounded to f16 (as [`Lanes::round_f16`]).
#[inline(always)]
pub(super) unsafe fn round_f16<V: Lanes>(x: &[f32], out: &mut [f32]) {
    let out = &mut out[..x.len()];
    let body = x.len() - x.len() % LANES;
    for i in (0..body).step_by(LANES) {
        // SAFETY: i + LANES <= body <= both lengths.
        V::load(x.as_ptr().add(i))
            .round_f16()
            .store(out.as_mut_ptr().add(i));
    }
    for (o, &v) in out[body..].iter_mut().zip(&x[body..]) {
        *o = super::linear::f16_round(v);
    }
}

/// [`weighted_sums`](super::linear::weighted_sums) in tiles of `MR` rows by
/// `NR` vectors of columns; the columns past the last whole vector one at a
/// time, in the same order.
#[inline(always)]
pub(super) unsafe fn weighted_sums<V: Lanes>(ps: &[&[f32]], vs: &[&[f32]], out: &mut [&mut [f32]]) {
    let Some(n) = out.first().map(|o| o.len()) else {
        return;
    };
    let body = n - n % LANES;
    for c0 in (0..body).step_by(NR * LANES) {
        let vecs = (body - c0) / LANES;
        for (p, o) in ps.chunks(MR).zip(out.chunks_mut(MR)) {
            by_tile!(V, p.len(), vecs, sum_tile(p, vs, o, c0));
        }
    }
    for (p, o) in ps.iter().zip(out.iter_mut()) {
        for (c, o) in o.iter_mut().enumerate().skip(body) {
            *o = p.iter().zip(vs).fold(0.0, |s, (&p, v)| p.mul_add(v[c], s));
        }
    }
}

/// `o[r][c0..c0 + 8C] = Σ_j p[r][j] · v[j][c0..]`: `R x C` accumulators;
/// per `j`, `R` broadcast weights and `C` vectors of the row for `R·C`
/// fused multiply-adds (16 AVX registers at 3 x 4; 29 NEON ones).
#[inline(always)]
unsafe fn sum_tile<V: Lanes, const R: usize, const C: usize>(
    p: &[&[f32]],
    vs: &[&[f32]],
    o: &mut [&mut [f32]],
    c0: usize,
) {
    let mut pr = [&[][..]; R];
    for r in 0..R {
        pr[r] = &p[r][..vs.len()];
    }
    let mut acc = [[V::zero(); C]; R];
    for (j, v) in vs.iter().enumerate() {
        let v = &v[c0..c0 + C * LANES];
        let mut pj = [V::zero(); R];
        for r in 0..R {
            pj[r] = V::splat(pr[r][j]);
        }
        for (c, v) in v.chunks_exact(LANES).enumerate() {
            let vv = V::load(v.as_ptr());
            for r in 0..R {
                acc[r][c] = V::fma(pj[r], vv, acc[r][c]);
            }
        }
    }
    for r in 0..R {
        let out = &mut o[r][c0..c0 + C * LANES];
        for (out, &acc) in out.chunks_exact_mut(LANES).zip(&acc[r]) {
            acc.store(out.as_mut_ptr());
        }
    }
}

/// `o[r][c0 + c] = x[r] · w[c]`: `R x C` accumulators of 8 lanes, each step
/// loading `R + C` vectors for `R·C` multiply-adds (16 AVX registers at
/// 3 x 4 for f32 and for `vdpbf16ps`; 32 NEON ones, with `w`'s vectors loaded
/// a half at a time), and prefetching the rows `ahead` into L2 a cache line
/// each.
#[inline(always)]
unsafe fn tile<D: Dot, const R: usize, const C: usize>(
    x: &[&[D::Elem]],
    w: &[&[D::W]],
    o: &mut [&mut [f32]],
    c0: usize,
    ahead: &[&[D::W]],
) {
    // `w`'s elements to a cache line: 16 of 4 bytes (an f32, two bf16), 32 f16.
    let line = LINE * 4 / std::mem::size_of::<D::W>();
    let k = x[0].len();
    let mut xr = [&[][..]; R];
    let mut wr = [&[][..]; C];
    for r in 0..R {
        xr[r] = &x[r][..k];
    }
    for c in 0..C {
        wr[c] = &w[c][..k];
    }
    let mut acc = [[D::Acc::zero(); C]; R];
    let body = k - k % LANES;
    let mut i = 0;
    while i < body {
        // SAFETY: i + LANES <= body <= k, the length of every row.
        let xv: [D::Vector; R] = std::array::from_fn(|r| D::load(xr[r].as_ptr().add(i)));
        if i % line == 0 {
            for a in ahead {
                D::Acc::prefetch(a.as_ptr().wrapping_add(i).cast());
            }
        }
        for c in 0..C {
            let wv = D::load_w(wr[c].as_ptr().add(i));
            for r in 0..R {
                acc[r][c] = D::madd(xv[r], wv, acc[r][c]);
            }
        }
        i += LANES;
    }
    for r in 0..R {
        for c in 0..C {
            let mut lanes = [0.0f32; LANES];
            acc[r][c].store(lanes.as_mut_ptr());
            let tail = xr[r][body..].iter().zip(&wr[c][body..]);
            o[r][c0 + c] = tail.fold(tree(lanes), |s, (&x, &w)| D::step(s, x, w));
        }
    }
}
