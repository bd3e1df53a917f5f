//! The fused lm-head log-prob on the CPU: rows are processed in chunks, the vocabulary in
//! tiles (in parallel), with an online log-sum-exp, so the `[rows, vocab]` logits are never
//! materialised; peak extra memory is O(ROWS x TILE x threads). The backward recomputes each
//! logits tile from the saved log-sum-exp. Reference for the fused CUDA lm-head/DPO kernel.
//!
//! In f32 on the packed kernels (matmul.rs), the weight's packed copies are kept beside it
//! (`WeightCache`: packed once per weight version) and each tile reads its block of them
//! (`Packed::view`), where otherwise every chunk of rows packs the whole vocabulary again for
//! each of its products; a chunk's own rows are packed once for all tiles. The packed operands
//! are the ones the per-call packing makes, so the bits are the same.
//!
//! The forward keeps the logits it computed, up to `keep_bytes()`, on the lse buffer it returns
//! (`Kept`); the backward reuses each chunk whose gathered rows of h are bit-equal to the kept
//! ones and whose weight is the same version, instead of recomputing the `rows x vocab x dim`
//! product (in a training step of the default model, 6.6% of the GEMM FLOPs). The reused
//! logits are the ones the recompute would give, bit for bit.

use super::buf::{Derived, WeightCache};
use super::matmul::{self, Kind, Packed};
use super::{gemm_strided, gemm_strided_f32, is_f32, simd, Elem};
use rayon::prelude::*;
use std::sync::Arc;

/// Rows per chunk and vocabulary entries per tile. On the generic path a tile's weights are
/// packed for each chunk that uses them, so ROWS sets what packing costs relative to the
/// product (1 / (2 ROWS) per flop); ROWS x TILE f32 is the logits working set of each thread
/// (1 MiB).
pub(crate) const ROWS: usize = 128;
pub(crate) const TILE: usize = 2048;
/// The most bytes of logits a forward keeps for its backward (chunks past it are recomputed):
/// `IPO_CPU_KEEP_LOGITS_MB` MiB, default 128 (2 x 256 rows of the default model's 49152-entry
/// vocabulary are 96 MiB in f32); 0 keeps nothing.
fn keep_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        let mb = std::env::var("IPO_CPU_KEEP_LOGITS_MB").ok().map(|v| v.trim().parse::<usize>().unwrap_or_else(|_| panic!("IPO_CPU_KEEP_LOGITS_MB={v:?}: expected a whole number of MiB")));
        mb.unwrap_or(128) << 20
    })
}

/// The logits a forward kept for its backward (see the module docs).
pub(crate) struct Kept<F> {
    /// The weight they came from: its address, length and version (`WeightCache::generation`).
    w: (usize, usize, u64),
    /// Per chunk of `ROWS` rows: the gathered rows of h `[rc, dim]` and the chunk's logits
    /// tiles `[rc, vt]` in vocabulary order.
    chunks: Vec<(Vec<F>, Vec<Vec<F>>)>,
}

impl<F> std::fmt::Debug for Kept<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kept({} chunks)", self.chunks.len())
    }
}

fn weight_key<F>(w: &[F], cache: &WeightCache) -> (usize, usize, u64) {
    (w.as_ptr() as usize, w.len(), cache.generation())
}

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

/// The packed operands of the f32 path (see the module docs).
struct Packs {
    kind: Kind,
    /// B = W^T `[dim, vocab]` (the logits) and, for the backward, B = W `[vocab, dim]` (dh).
    wt: Arc<Packed>,
    w: Option<Arc<Packed>>,
}

impl Packs {
    /// The packs of `w` `[vocab, dim]`, when the products are f32 on the packed kernels and `w`
    /// is a weight with a cache (`None`: the generic path).
    fn of<F: Elem>(bf16: bool, w: &[F], dim: usize, cache: Option<&WeightCache>, backward: bool) -> Option<Packs> {
        let kind = if bf16 { Kind::Bf16 } else { Kind::F32 };
        let cache = cache.filter(|_| is_f32::<F>() && (bf16 || matmul::has_simd(Kind::F32)))?;
        // SAFETY: F is f32 (checked above).
        let wf = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f32, w.len()) };
        let vocab = w.len() / dim;
        // The layouts `CpuBackend::product` packs for `x @ W^T` and `dy @ W` (the same copies).
        // SAFETY (both): w is [vocab, dim].
        let wt = cache.packed(Derived::PackedT(kind), || unsafe { matmul::pack_b(kind, dim, vocab, wf.as_ptr(), 1, dim as isize, true) });
        let w = backward.then(|| cache.packed(Derived::Packed(kind), || unsafe { matmul::pack_b(kind, vocab, dim, wf.as_ptr(), dim as isize, 1, true) }));
        Some(Packs { kind, wt, w })
    }

    /// hc `[rc, dim]` packed as the left operand.
    fn rows_a<F>(&self, hc: &[F], rc: usize, dim: usize) -> Packed {
        // SAFETY: hc is [rc, dim] of f32 (`of` checked F).
        unsafe { matmul::pack_a(self.kind, rc, dim, hc.as_ptr() as *const f32, dim as isize, 1, false) }
    }
}

/// logits tile `[rc, vt]` = hc `[rc, dim]` @ w[v0..v0+vt]^T; `packed`: the packs and hc packed.
#[allow(clippy::too_many_arguments)]
fn logits_tile<F: Elem>(bf16: bool, hc: &[F], w: &[F], dim: usize, rc: usize, v0: usize, vt: usize, packed: Option<(&Packs, &Packed)>) -> Vec<F> {
    let mut t = vec![F::zero(); rc * vt];
    if let Some((p, ha)) = packed {
        // SAFETY: t is [rc, vt] of f32 (`Packs::of` checked F); the view is W^T's tile.
        unsafe { matmul::multiply_views(ha.all(), p.wt.view(v0..v0 + vt, 0..dim), t.as_mut_ptr() as *mut f32, vt as isize, 1, false, 1.0, false) };
        return t;
    }
    // SAFETY: hc is [rc, dim], w's rows v0..v0+vt exist (vocab tiles), t is [rc, vt].
    unsafe { gemm(bf16, rc, vt, dim, t.as_mut_ptr(), vt as isize, false, hc.as_ptr(), dim as isize, 1, w.as_ptr().add(v0 * dim), 1, dim as isize) };
    t
}

/// Log-probs of `targets` at `rows` of h and their log-sum-exps; `bf16`: the logits products in
/// bf16 (see `Precision`).
/// `cache`: w's derived copies, when it is a weight whose packs may be shared (see
/// `Packs`).
/// Also returns the logits kept for the backward (w a weight with a cache only: its version
/// must be known).
pub(super) fn logprobs<F: Elem>(bf16: bool, h: &[F], w: &[F], dim: usize, rows: &[u32], targets: &[u32], cache: Option<&WeightCache>) -> (Vec<F>, Vec<F>, Option<Kept<F>>) {
    let vocab = w.len() / dim;
    let n = rows.len();
    let (mut logp, mut lse) = (vec![F::zero(); n], vec![F::zero(); n]);
    let packs = Packs::of(bf16, w, dim, cache, false);
    let mut kept = cache.map(|c| Kept { w: weight_key(w, c), chunks: Vec::new() });
    let mut kept_bytes = 0;
    for c0 in (0..n).step_by(ROWS) {
        let rc = ROWS.min(n - c0);
        let hc = gather_rows(h, &rows[c0..c0 + rc], dim);
        let ha = packs.as_ref().map(|p| p.rows_a(&hc, rc, dim));
        let packed = packs.as_ref().zip(ha.as_ref());
        let tg = &targets[c0..c0 + rc];
        let keep = kept.is_some() && kept_bytes + rc * vocab * std::mem::size_of::<F>() <= keep_bytes();
        // Per tile: the logits tile (if kept), and per row (max, sum of exp(x - max), target logit if in
        // this tile).
        let tiles: Vec<(Option<Vec<F>>, Vec<(F, F, Option<F>)>)> = (0..vocab)
            .step_by(TILE)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|v0| {
                let vt = TILE.min(vocab - v0);
                let t = logits_tile(bf16, &hc, w, dim, rc, v0, vt, packed);
                let tf = simd::f32s(&t);
                let stats = (0..rc)
                    .map(|r| {
                        let row = &t[r * vt..(r + 1) * vt];
                        let (m, s) = match tf {
                            Some(tf) => {
                                let (m, s) = simd::max_sumexp(&tf[r * vt..(r + 1) * vt]);
                                (F::from_f32(m).unwrap(), F::from_f32(s).unwrap())
                            }
                            None => {
                                let m = row.iter().fold(F::neg_infinity(), |a, &b| a.max(b));
                                (m, row.iter().map(|&x| (x - m).exp()).sum())
                            }
                        };
                        let tgt = tg[r] as usize;
                        let hit = (v0..v0 + vt).contains(&tgt).then(|| row[tgt - v0]);
                        (m, s, hit)
                    })
                    .collect();
                (keep.then_some(t), stats)
            })
            .collect();
        let (logits, tiles): (Vec<Option<Vec<F>>>, Vec<Vec<(F, F, Option<F>)>>) = tiles.into_iter().unzip();
        for r in 0..rc {
            let m = tiles.iter().fold(F::neg_infinity(), |a, t| a.max(t[r].0));
            let s: F = tiles.iter().map(|t| t[r].1 * (t[r].0 - m).exp()).sum();
            let l = m + s.ln();
            let x = tiles.iter().find_map(|t| t[r].2).expect("target id < vocab (checked by the caller)");
            lse[c0 + r] = l;
            logp[c0 + r] = x - l;
        }
        if let Some(k) = kept.as_mut().filter(|_| keep) {
            kept_bytes += rc * vocab * std::mem::size_of::<F>();
            k.chunks.push((hc, logits.into_iter().flatten().collect()));
        }
    }
    (logp, lse, kept.filter(|k| !k.chunks.is_empty()))
}

#[allow(clippy::too_many_arguments)]
/// `kept`: what the forward kept (see `Kept`); each chunk it holds for these rows of h and this
/// version of w is used instead of a recompute.
pub(super) fn backward<F: Elem>(
    bf16: bool, h: &[F], w: &[F], dim: usize, rows: &[u32], targets: &[u32], lse: &[F], dlogp: &[f32], dh: &mut [F], mut dw: Option<&mut [F]>, cache: Option<&WeightCache>,
    kept: Option<Box<Kept<F>>>,
) {
    let vocab = w.len() / dim;
    let n = rows.len();
    let ntiles = vocab.div_ceil(TILE);
    let packs = Packs::of(bf16, w, dim, cache, true);
    let mut kept = kept.filter(|k| cache.is_some_and(|c| k.w == weight_key(w, c))).map(|k| k.chunks.into_iter());
    for c0 in (0..n).step_by(ROWS) {
        let rc = ROWS.min(n - c0);
        let hc = gather_rows(h, &rows[c0..c0 + rc], dim);
        // The forward's logits tiles of this chunk, if it kept them for these very rows.
        let saved = kept.as_mut().and_then(|k| k.next()).filter(|(khc, t)| *khc == hc && t.len() == ntiles).map(|(_, t)| t);
        // hc packed as the left operand (logits, unless kept) and as the right one (dw = g^T hc).
        // SAFETY: hc is [rc, dim] of f32 (`Packs::of` checked F).
        let hp = packs.as_ref().map(|p| (saved.is_none().then(|| p.rows_a(&hc, rc, dim)), unsafe { matmul::pack_b(p.kind, rc, dim, hc.as_ptr() as *const f32, dim as isize, 1, false) }));
        let (tg, l, dl) = (&targets[c0..c0 + rc], &lse[c0..c0 + rc], &dlogp[c0..c0 + rc]);
        // One vocab tile: its logits' gradient g, its rows of dw (when trained) and its part of
        // dh.
        let tile = |v0: usize, vt: usize, dwt: Option<&mut [F]>, saved: Option<Vec<F>>| {
            let mut g = saved.unwrap_or_else(|| logits_tile(bf16, &hc, w, dim, rc, v0, vt, packs.as_ref().zip(hp.as_ref().and_then(|h| h.0.as_ref()))));
            for r in 0..rc {
                if let Some(gr) = simd::f32s_mut(&mut g[r * vt..(r + 1) * vt]) {
                    let hit = (v0..v0 + vt).contains(&(tg[r] as usize)).then(|| tg[r] as usize - v0);
                    simd::softmax_grad(gr, l[r].to_f32().unwrap(), dl[r], hit);
                    continue;
                }
                let d = F::from_f32(dl[r]).unwrap();
                for (j, x) in g[r * vt..(r + 1) * vt].iter_mut().enumerate() {
                    let p = (*x - l[r]).exp();
                    let onehot = if v0 + j == tg[r] as usize { F::one() } else { F::zero() };
                    *x = d * (onehot - p);
                }
            }
            let mut dhp = vec![F::zero(); rc * dim];
            if let (Some(p), Some((_, hb))) = (&packs, &hp) {
                let gp = g.as_ptr() as *const f32;
                // SAFETY: as below, all f32 (`Packs::of` checked F); the view is W's tile.
                unsafe {
                    if let Some(dwt) = dwt {
                        let gt = matmul::pack_a(p.kind, vt, rc, gp, 1, vt as isize, false);
                        matmul::multiply(&gt, hb, dwt.as_mut_ptr() as *mut f32, dim as isize, 1, true, 1.0, false);
                    }
                    let ga = matmul::pack_a(p.kind, rc, vt, gp, vt as isize, 1, false);
                    let wv = p.w.as_ref().expect("backward packs").view(0..dim, v0..v0 + vt);
                    matmul::multiply_views(ga.all(), wv, dhp.as_mut_ptr() as *mut f32, dim as isize, 1, false, 1.0, false);
                }
                return dhp;
            }
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
        let saved: Vec<Option<Vec<F>>> = match saved {
            Some(t) => t.into_iter().map(Some).collect(),
            None => (0..ntiles).map(|_| None).collect(),
        };
        let parts: Vec<Vec<F>> = match dw.as_deref_mut() {
            Some(dw) => dw.par_chunks_mut(TILE * dim).zip(saved).enumerate().map(|(ti, (dwt, s))| tile(ti * TILE, dwt.len() / dim, Some(dwt), s)).collect(),
            None => saved.into_par_iter().enumerate().map(|(ti, s)| tile(ti * TILE, TILE.min(vocab - ti * TILE), None, s)).collect(),
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
