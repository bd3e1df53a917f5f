//! The fused lm-head log-prob on the CPU: rows are processed in chunks, the vocabulary in
//! tiles (in parallel), with an online log-sum-exp, so the `[rows, vocab]` logits are never
//! materialised; peak extra memory is O(ROWS x TILE x threads). The backward recomputes each
//! logits tile from the saved log-sum-exp. Reference for the fused CUDA lm-head/DPO kernel.

use super::matmul::Kind;
use super::{gemm_strided, gemm_strided_f32, is_f32, Elem};
use rayon::prelude::*;

/// Rows per chunk and vocabulary entries per tile. A tile's weights are packed for each chunk
/// that uses them, so ROWS sets what packing costs relative to the product (1 / (2 ROWS) per
/// flop); ROWS x TILE f32 is the logits working set of each thread (1 MiB).
pub(crate) const ROWS: usize = 128;
pub(crate) const TILE: usize = 2048;

/// Gathers `rows` of h `[tokens, dim]` into a contiguous `[rows.len(), dim]` block.
fn gather_rows<F: Elem>(h: &[F], rows: &[u32], dim: usize) -> Vec<F> {
    let mut g = Vec::with_capacity(rows.len() * dim);
    for &r in rows {
        g.extend_from_slice(&h[r as usize * dim..(r as usize + 1) * dim]);
    }
    g
}

/// `gemm_strided` on this thread, in `bf16` products when asked (f32 only; see `Precision`).
///
/// # Safety
/// As `gemm_strided`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm<F: Elem>(bf16: bool, m: usize, n: usize, k: usize, dst: *mut F, dst_rs: isize, accumulate: bool, lhs: *const F, lhs_rs: isize, lhs_cs: isize, rhs: *const F, rhs_rs: isize, rhs_cs: isize) {
    if bf16 && is_f32::<F>() {
        gemm_strided_f32(Kind::Bf16, m, n, k, dst as *mut f32, dst_rs, 1, accumulate, lhs as *const f32, lhs_rs, lhs_cs, rhs as *const f32, rhs_rs, rhs_cs, 1.0, false)
    } else {
        gemm_strided(m, n, k, dst, dst_rs, 1, accumulate, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, F::one(), false)
    }
}

/// logits tile `[rc, vt]` = hc `[rc, dim]` @ w[v0..v0+vt]^T.
fn logits_tile<F: Elem>(bf16: bool, hc: &[F], w: &[F], dim: usize, rc: usize, v0: usize, vt: usize) -> Vec<F> {
    let mut t = vec![F::zero(); rc * vt];
    // SAFETY: hc is [rc, dim], w's rows v0..v0+vt exist (vocab tiles), t is [rc, vt].
    unsafe { gemm(bf16, rc, vt, dim, t.as_mut_ptr(), vt as isize, false, hc.as_ptr(), dim as isize, 1, w.as_ptr().add(v0 * dim), 1, dim as isize) };
    t
}

/// Log-probs of `targets` at `rows` of h and their log-sum-exps; `bf16`: the logits products in
/// bf16 (see `Precision`).
pub(super) fn logprobs<F: Elem>(bf16: bool, h: &[F], w: &[F], dim: usize, rows: &[u32], targets: &[u32]) -> (Vec<F>, Vec<F>) {
    let vocab = w.len() / dim;
    let n = rows.len();
    let (mut logp, mut lse) = (vec![F::zero(); n], vec![F::zero(); n]);
    for c0 in (0..n).step_by(ROWS) {
        let rc = ROWS.min(n - c0);
        let hc = gather_rows(h, &rows[c0..c0 + rc], dim);
        let tg = &targets[c0..c0 + rc];
        // Per tile and row: (max, sum of exp(x - max), target logit if in this tile).
        let tiles: Vec<Vec<(F, F, Option<F>)>> = (0..vocab)
            .step_by(TILE)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|v0| {
                let vt = TILE.min(vocab - v0);
                let t = logits_tile(bf16, &hc, w, dim, rc, v0, vt);
                (0..rc)
                    .map(|r| {
                        let row = &t[r * vt..(r + 1) * vt];
                        let m = row.iter().fold(F::neg_infinity(), |a, &b| a.max(b));
                        let s = row.iter().map(|&x| (x - m).exp()).sum();
                        let tgt = tg[r] as usize;
                        let hit = (v0..v0 + vt).contains(&tgt).then(|| row[tgt - v0]);
                        (m, s, hit)
                    })
                    .collect()
            })
            .collect();
        for r in 0..rc {
            let m = tiles.iter().fold(F::neg_infinity(), |a, t| a.max(t[r].0));
            let s: F = tiles.iter().map(|t| t[r].1 * (t[r].0 - m).exp()).sum();
            let l = m + s.ln();
            let x = tiles.iter().find_map(|t| t[r].2).expect("target id < vocab (checked by the caller)");
            lse[c0 + r] = l;
            logp[c0 + r] = x - l;
        }
    }
    (logp, lse)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward<F: Elem>(
    bf16: bool, h: &[F], w: &[F], dim: usize, rows: &[u32], targets: &[u32], lse: &[F], dlogp: &[f32], dh: &mut [F], mut dw: Option<&mut [F]>,
) {
    let vocab = w.len() / dim;
    let n = rows.len();
    for c0 in (0..n).step_by(ROWS) {
        let rc = ROWS.min(n - c0);
        let hc = gather_rows(h, &rows[c0..c0 + rc], dim);
        let (tg, l, dl) = (&targets[c0..c0 + rc], &lse[c0..c0 + rc], &dlogp[c0..c0 + rc]);
        // One vocab tile: its logits' gradient g, its rows of dw (when trained) and its part of
        // dh.
        let tile = |v0: usize, vt: usize, dwt: Option<&mut [F]>| {
            let mut g = logits_tile(bf16, &hc, w, dim, rc, v0, vt);
            for r in 0..rc {
                let d = F::from_f32(dl[r]).unwrap();
                for (j, x) in g[r * vt..(r + 1) * vt].iter_mut().enumerate() {
                    let p = (*x - l[r]).exp();
                    let onehot = if v0 + j == tg[r] as usize { F::one() } else { F::zero() };
                    *x = d * (onehot - p);
                }
            }
            let mut dhp = vec![F::zero(); rc * dim];
            // SAFETY: g is [rc, vt], hc [rc, dim], dwt and w's tile [vt, dim], dhp [rc, dim].
            unsafe {
                // dw_tile += g^T @ hc ; dh_part = g @ w_tile
                if let Some(dwt) = dwt {
                    gemm(bf16, vt, dim, rc, dwt.as_mut_ptr(), dim as isize, true, g.as_ptr(), 1, vt as isize, hc.as_ptr(), dim as isize, 1);
                }
                gemm(bf16, rc, dim, vt, dhp.as_mut_ptr(), dim as isize, false, g.as_ptr(), vt as isize, 1, w.as_ptr().add(v0 * dim), dim as isize, 1);
            }
            dhp
        };
        // Each tile owns its rows of dw; the dh contributions are summed after.
        let parts: Vec<Vec<F>> = match dw.as_deref_mut() {
            Some(dw) => dw.par_chunks_mut(TILE * dim).enumerate().map(|(ti, dwt)| tile(ti * TILE, dwt.len() / dim, Some(dwt))).collect(),
            None => (0..vocab.div_ceil(TILE)).into_par_iter().map(|ti| tile(ti * TILE, TILE.min(vocab - ti * TILE), None)).collect(),
        };
        // Tile partials summed in tile order: the same bits whatever the threads did.
        let dhc = parts
            .into_iter()
            .reduce(|mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            })
            .unwrap_or_else(|| vec![F::zero(); rc * dim]);
        for (i, &r) in rows[c0..c0 + rc].iter().enumerate() {
            let r = r as usize;
            for d in 0..dim {
                dh[r * dim + d] += dhc[i * dim + d];
            }
        }
    }
}
