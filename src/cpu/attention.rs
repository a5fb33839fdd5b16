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
/// Σ p · values + out_bias` (summed in f64, then rounded); `out =
/// layer_norm(stream_out)` of the rounded values, as the op after it would read them.
pub(super) fn attention_absorbed(
    simd: Simd,
    d: AbsorbedAttentionDims,
    a: Absorbed<'_>,
    stream_out: &mut [f32],
    out: &mut [f32],
) {
    let c = d.cols;
    let scratch = || (vec![0.0f64; c], vec![0.0f32; c], vec![0.0f32; d.lk]);
    // Each (sequence, head)'s key rows, listed once for all its rows.
    let keys: Vec<Vec<&[f32]>> = (0..d.batch * d.heads)
        .map(|be| {
            let (b, e) = (be / d.heads, be % d.heads);
            (0..d.lk)
                .map(|j| &a.keys[(b * d.lk + j) * d.k_stride + d.k_start + e * c..][..c])
                .collect()
        })
        .collect();
    stream_out
        .par_chunks_mut(c)
        .zip(out.par_chunks_mut(c))
        .enumerate()
        .for_each_init(scratch, |(s, h, p), (r, (y, o))| {
            simd_run!(simd, {
                let b = r / d.lq;
                let res = a.residual.map(|res| &res[r * c..(r + 1) * c]);
                norm_row(&a.x[r * c..(r + 1) * c], res, a.norm, a.eps, h, None, s);
                for (s, &ob) in s.iter_mut().zip(a.out_bias) {
                    *s += ob as f64;
                }
                for e in 0..d.heads {
                    let at =
                        |j: usize, stride: usize, start: usize| (b * d.lk + j) * stride + start;
                    dots(
                        simd,
                        &[&h[..]],
                        &keys[b * d.heads + e],
                        Rows::Cached,
                        &mut [&mut p[..]],
                    );
                    for (j, p) in p.iter_mut().enumerate() {
                        *p += a.key_bias[at(j, d.b_stride, d.b_start) + e];
                    }
                    softmax(simd, p, a.scale, None);
                    for (j, &pj) in p.iter().enumerate() {
                        let value = &a.values[at(j, d.v_stride, d.v_start) + e * c..][..c];
                        let w = pj as f64;
                        for (s, &v) in s.iter_mut().zip(value) {
                            *s += w * v as f64;
                        }
                    }
                }
                y.iter_mut().zip(s.iter()).for_each(|(y, &s)| *y = s as f32);
                normalize(s, a.after, a.after_eps, o);
            })
        });
}
