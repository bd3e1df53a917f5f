//! Attention on the CPU over packed spans (see `Span`): one task per (span, KV head), the
//! span's visible keys gathered into a contiguous `[keys, head_dim]` block, scores by GEMM,
//! a masked row softmax that saves log-sum-exp, and the backward through
//! `D = rowsum(dO * O)`, `dS = P * (dP - D)`. The reference for the flash-attention kernels.

use super::{cast, gemm_strided, Elem, SendPtr};
use crate::backend::{AttnDims, AttnLayout, Span};
use rayon::prelude::*;

/// Rows of the packed key buffer a span sees, in order: its prefix, then its own tokens.
fn key_rows(s: &Span) -> impl Iterator<Item = usize> {
    (s.prefix_start..s.prefix_start + s.prefix_len).chain(s.start..s.start + s.len)
}

/// Gathers the visible keys (or values) of one KV head: `[prefix_len + len, head_dim]`.
fn gather<F: Elem>(src: &[F], s: &Span, kvh: usize, dims: AttnDims) -> Vec<F> {
    let (hd, row) = (dims.head_dim, dims.n_kv_heads * dims.head_dim);
    let mut g = Vec::with_capacity((s.prefix_len + s.len) * hd);
    for r in key_rows(s) {
        g.extend_from_slice(&src[r * row + kvh * hd..r * row + (kvh + 1) * hd]);
    }
    g
}

/// Scaled scores `[len, keys]` of one query head against gathered keys, with invisible
/// entries (causal mask of the span's own part) set to -inf.
fn scores<F: Elem>(q: &[F], s: &Span, h: usize, kg: &[F], dims: AttnDims) -> Vec<F> {
    let (hd, qrow) = (dims.head_dim, dims.n_heads * dims.head_dim);
    let nk = s.prefix_len + s.len;
    let scale: F = cast(1.0 / (hd as f64).sqrt());
    let mut sc = vec![F::zero(); s.len * nk];
    unsafe {
        gemm_strided(
            s.len, nk, hd,
            sc.as_mut_ptr(), nk as isize, 1, false,
            q.as_ptr().add(s.start * qrow + h * hd), qrow as isize, 1,
            kg.as_ptr(), 1, hd as isize,
            scale, false,
        );
    }
    for j in 0..s.len {
        for v in &mut sc[j * nk + s.prefix_len + j + 1..(j + 1) * nk] {
            *v = F::neg_infinity();
        }
    }
    sc
}

fn tasks(layout: &AttnLayout, dims: AttnDims) -> Vec<(Span, usize)> {
    layout.spans.iter().flat_map(|s| (0..dims.n_kv_heads).map(move |kvh| (*s, kvh))).filter(|(s, _)| s.len > 0).collect()
}

pub(super) fn forward<F: Elem>(q: &[F], k: &[F], v: &[F], layout: &AttnLayout, dims: AttnDims, out: &mut [F], lse: &mut [F]) {
    let (hd, nh) = (dims.head_dim, dims.n_heads);
    let group = nh / dims.n_kv_heads;
    let qrow = nh * hd;
    let (outp, lsep) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    tasks(layout, dims).into_par_iter().for_each(|(s, kvh)| {
        let (kg, vg) = (gather(k, &s, kvh, dims), gather(v, &s, kvh, dims));
        let nk = s.prefix_len + s.len;
        for h in kvh * group..(kvh + 1) * group {
            let mut p = scores(q, &s, h, &kg, dims);
            for j in 0..s.len {
                let row = &mut p[j * nk..(j + 1) * nk];
                let m = row.iter().fold(F::neg_infinity(), |a, &b| a.max(b));
                let mut sum = F::zero();
                for x in row.iter_mut() {
                    *x = (*x - m).exp();
                    sum += *x;
                }
                for x in row.iter_mut() {
                    *x = *x / sum;
                }
                // Disjoint: each (span token, head) is written by exactly one task.
                unsafe { *lsep.get().add((s.start + j) * nh + h) = m + sum.ln() };
            }
            unsafe {
                gemm_strided(
                    s.len, hd, nk,
                    outp.get().add(s.start * qrow + h * hd), qrow as isize, 1, false,
                    p.as_ptr(), nk as isize, 1,
                    vg.as_ptr(), hd as isize, 1,
                    F::one(), false,
                );
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward<F: Elem>(
    dout: &[F], q: &[F], k: &[F], v: &[F], out: &[F], lse: &[F], layout: &AttnLayout, dims: AttnDims,
    dq: &mut [F], dk: &mut [F], dv: &mut [F],
) {
    let (hd, nh) = (dims.head_dim, dims.n_heads);
    let group = nh / dims.n_kv_heads;
    let qrow = nh * hd;
    let kvrow = dims.n_kv_heads * hd;
    let scale: F = cast(1.0 / (hd as f64).sqrt());
    let dqp = SendPtr(dq.as_mut_ptr());
    // Per task: gradients of the gathered keys/values, scattered afterwards because spans
    // that share a prefix write the same key rows.
    let parts: Vec<(Span, usize, Vec<F>, Vec<F>)> = tasks(layout, dims)
        .into_par_iter()
        .map(|(s, kvh)| {
            let (kg, vg) = (gather(k, &s, kvh, dims), gather(v, &s, kvh, dims));
            let nk = s.prefix_len + s.len;
            let (mut dkg, mut dvg) = (vec![F::zero(); nk * hd], vec![F::zero(); nk * hd]);
            for h in kvh * group..(kvh + 1) * group {
                let mut p = scores(q, &s, h, &kg, dims);
                for j in 0..s.len {
                    let l = lse[(s.start + j) * nh + h];
                    for x in &mut p[j * nk..(j + 1) * nk] {
                        *x = (*x - l).exp();
                    }
                }
                // dP = dO @ Vg^T   [len, nk]
                let mut ds = vec![F::zero(); s.len * nk];
                unsafe {
                    gemm_strided(
                        s.len, nk, hd, ds.as_mut_ptr(), nk as isize, 1, false,
                        dout.as_ptr().add(s.start * qrow + h * hd), qrow as isize, 1,
                        vg.as_ptr(), 1, hd as isize, F::one(), false,
                    );
                }
                for j in 0..s.len {
                    let o = (s.start + j) * qrow + h * hd;
                    let d: F = (0..hd).map(|i| dout[o + i] * out[o + i]).sum();
                    for (x, &pp) in ds[j * nk..(j + 1) * nk].iter_mut().zip(&p[j * nk..(j + 1) * nk]) {
                        *x = pp * (*x - d);
                    }
                }
                unsafe {
                    // dQ = scale * dS @ Kg   (disjoint rows per head)
                    gemm_strided(
                        s.len, hd, nk, dqp.get().add(s.start * qrow + h * hd), qrow as isize, 1, false,
                        ds.as_ptr(), nk as isize, 1, kg.as_ptr(), hd as isize, 1, scale, false,
                    );
                    // dKg += scale * dS^T @ Q ; dVg += P^T @ dO
                    gemm_strided(
                        nk, hd, s.len, dkg.as_mut_ptr(), hd as isize, 1, true,
                        ds.as_ptr(), 1, nk as isize, q.as_ptr().add(s.start * qrow + h * hd), qrow as isize, 1,
                        scale, false,
                    );
                    gemm_strided(
                        nk, hd, s.len, dvg.as_mut_ptr(), hd as isize, 1, true,
                        p.as_ptr(), 1, nk as isize, dout.as_ptr().add(s.start * qrow + h * hd), qrow as isize, 1,
                        F::one(), false,
                    );
                }
            }
            (s, kvh, dkg, dvg)
        })
        .collect();
    dk.iter_mut().for_each(|x| *x = F::zero());
    dv.iter_mut().for_each(|x| *x = F::zero());
    for (s, kvh, dkg, dvg) in parts {
        for (i, r) in key_rows(&s).enumerate() {
            let o = r * kvrow + kvh * hd;
            for d in 0..hd {
                dk[o + d] += dkg[i * hd + d];
                dv[o + d] += dvg[i * hd + d];
            }
        }
    }
}
