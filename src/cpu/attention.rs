//! `attention` on the CPU: one task per (sequence, head, block of queries).
//! The block's scores against every key are one [`dots`] call (the GEMM's
//! register tiles), then a max-subtracted softmax (vectorised, [`softmax`]),
//! and the probabilities times the values row by row ([`weighted_sums`]),
//! all in f32.

use rayon::prelude::*;

use super::layer_norm::{norm_row, normalize};
use super::linear::{dots, simd_run, weighted_sums, Rows, Simd};
use super::softmax::softmax;
use super::tiles;
use crate::ops::{AbsorbedAttentionDims, AttentionDims};

/// Queries per task: their scores (`QUERIES x Lk`) and the key rows they all
/// read stay in cache.
const QUERIES: usize = 16;

/// The inputs of one `attention` call.
pub(super) struct Attention<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub scale: f32,
    pub causal: bool,
    pub ignore: Option<&'a [bool]>,
}

/// `out = softmax(Q Kᵀ · scale) V` per head; a query with no visible key gets zeros.
pub(super) fn attention<'a>(simd: Simd, d: AttentionDims, a: Attention<'a>, out: &mut [f32]) {
    let hd = d.head_dim;
    let width = d.heads * hd;
    let tasks: Vec<_> = out
        .chunks_mut(d.lq * width)
        .enumerate()
        .flat_map(|(b, seq)| {
            tiles(seq, width, QUERIES, hd)
                .into_iter()
                .map(move |t| (b, t))
        })
        .collect();
    tasks.into_par_iter().for_each(|(b, mut t)| {
        let h = t.col / hd;
        // Row `r` of a packed tensor: this head's columns of its block.
        let row = |data: &'a [f32], r: usize, stride: usize, start: usize| -> &'a [f32] {
            let at = r * stride + start + h * hd;
            &data[at..at + hd]
        };
        let qs: Vec<&[f32]> = (t.row..t.row + t.rows.len())
            .map(|i| row(a.q, b * d.lq + i, d.q_stride, d.q_start))
            .collect();
        let ks: Vec<&[f32]> = (0..d.lk)
            .map(|j| row(a.k, b * d.lk + j, d.k_stride, d.k_start))
            .collect();
        let mut scores = vec![0.0f32; qs.len() * d.lk];
        let mut score_rows: Vec<&mut [f32]> = scores.chunks_mut(d.lk).collect();
        dots(simd, &qs, &ks, Rows::Cached, &mut score_rows);
        // Each row's probabilities, 0 where a key is hidden.
        let masked = a.causal || a.ignore.is_some();
        let mut hidden = vec![false; if masked { d.lk } else { 0 }];
        for (n, s) in score_rows.iter_mut().enumerate() {
            if masked {
                let i = t.row + n;
                for (j, h) in hidden.iter_mut().enumerate() {
                    *h = a.causal && j > i || a.ignore.is_some_and(|m| m[b * d.lk + j]);
                }
            }
            softmax(simd, s, a.scale, masked.then_some(&hidden[..]));
        }
        let vs: Vec<&[f32]> = (0..d.lk)
            .map(|j| row(a.v, b * d.lk + j, d.v_stride, d.v_start))
            .collect();
        let ps: Vec<&[f32]> = score_rows.iter().map(|s| &s[..]).collect();
        weighted_sums(simd, &ps, &vs, &mut t.rows);
    });
}

/// Rows per `attention_absorbed` task, all of one sequence: the register
/// tiles take 3 at a time, so each key and value row loaded serves 3.
const ROWS: usize = 6;

/// The inputs of one `attention_absorbed` call.
pub(super) struct Absorbed<'a> {
    pub x: &'a [f32],
    pub residual: Option<&'a [f32]>,
    pub norm: [&'a [f32]; 2],
    pub eps: f64,
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub key_bias: &'a [f32],
    pub out_bias: &'a [f32],
    pub scale: f32,
    pub after: [&'a [f32]; 2],
    pub after_eps: f64,
}

/// Per row, in parallel: `s = x + residual`, `h = layer_norm(s)`; per head a
/// softmax over the keys of `(h · keys + key_bias) · scale`; `stream_out = s +
/// Σ p · values + out_bias` (each head's share summed in f32, the stream in
/// f64, then rounded); `out =
/// layer_norm(stream_out)` of the rounded values, as the op after it would read them.
pub(super) fn attention_absorbed<'a>(
    simd: Simd,
    d: AbsorbedAttentionDims,
    a: Absorbed<'a>,
    stream_out: &mut [f32],
    out: &mut [f32],
) {
    let c = d.cols;
    // Per block of rows: the stream in f64, the normalised rows, the
    // scores, one head's shares.
    let scratch = || {
        let block = |n: usize| vec![0.0f32; ROWS * n];
        (vec![0.0f64; ROWS * c], block(c), block(d.lk), block(c))
    };
    // Each (sequence, head)'s key or value rows, listed once for all its rows.
    let rows_of = |data: &'a [f32], stride: usize, start: usize| -> Vec<Vec<&'a [f32]>> {
        (0..d.batch * d.heads)
            .map(|be| {
                let (b, e) = (be / d.heads, be % d.heads);
                (0..d.lk)
                    .map(|j| &data[(b * d.lk + j) * stride + start + e * c..][..c])
                    .collect()
            })
            .collect()
    };
    let keys = rows_of(a.keys, d.k_stride, d.k_start);
    let values = rows_of(a.values, d.v_stride, d.v_start);
    let seq = d.lq * c;
    stream_out
        .par_chunks_mut(seq)
        .zip(out.par_chunks_mut(seq))
        .enumerate()
        .flat_map(|(b, (ys, os))| {
            let blocks = ys.par_chunks_mut(ROWS * c).zip(os.par_chunks_mut(ROWS * c));
            blocks
                .enumerate()
                .map(move |(k, block)| (b, k * ROWS, block))
        })
        .for_each_init(scratch, |(s, h, p, share), (b, first, (ys, os))| {
            simd_run!(simd, {
                let n = ys.len() / c;
                let (s, h) = (&mut s[..n * c], &mut h[..n * c]);
                let (p, share) = (&mut p[..n * d.lk], &mut share[..n * c]);
                for (i, (s, h)) in s.chunks_mut(c).zip(h.chunks_mut(c)).enumerate() {
                    let r = (b * d.lq + first + i) * c;
                    let res = a.residual.map(|res| &res[r..r + c]);
                    norm_row(&a.x[r..r + c], res, a.norm, a.eps, h, None, s);
                    for (s, &ob) in s.iter_mut().zip(a.out_bias) {
                        *s += ob as f64;
                    }
                }
                let hs: Vec<&[f32]> = h.chunks(c).collect();
                for e in 0..d.heads {
                    let be = b * d.heads + e;
                    let mut ps: Vec<&mut [f32]> = p.chunks_mut(d.lk).collect();
                    dots(simd, &hs, &keys[be], Rows::Cached, &mut ps);
                    for p in ps.iter_mut() {
                        for (j, p) in p.iter_mut().enumerate() {
                            *p += a.key_bias[(b * d.lk + j) * d.b_stride + d.b_start + e];
                        }
                        softmax(simd, p, a.scale, None);
                    }
                    // The head's shares in f32 (sums of Lk terms), added to
                    // the stream in f64.
                    let ps: Vec<&[f32]> = ps.into_iter().map(|p| &*p).collect();
                    let mut shares: Vec<&mut [f32]> = share.chunks_mut(c).collect();
                    weighted_sums(simd, &ps, &values[be], &mut shares);
                    for (s, &v) in s.iter_mut().zip(share.iter()) {
                        *s += v as f64;
                    }
                }
                for ((s, y), o) in s.chunks(c).zip(ys.chunks_mut(c)).zip(os.chunks_mut(c)) {
                    y.iter_mut().zip(s).for_each(|(y, &s)| *y = s as f32);
                    normalize(s, a.after, a.after_eps, o);
                }
            })
        });
}
