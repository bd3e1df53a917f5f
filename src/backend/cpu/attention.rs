//! Attention on the CPU over packed spans (see `Span`) and, through `kv::attention`, over the
//! paged KV cache: the CPU twin of the flash-attention kernels. Nothing of size
//! `[queries, keys]` is ever materialised; memory per task is a few tiles.
//!
//! Forward: one task per (span, KV head, block of queries). The block's queries of every
//! head of the KV head's group are the rows of one tile (`r = queries x group`), so each key
//! and value tile is loaded once for the whole group. Keys go by in tiles of `BK` (fully
//! masked tiles of the causal part are never visited); scores come transposed
//! (`S^T = K (scale Q)^T`, `[keys, rows]`) so the max, `exp` and sums of the online softmax
//! vectorise across rows; the output is `O += P^T V`. The keys are also split into chunks of
//! `KC` whose softmax partials (max, sum, unnormalised output) are combined in key order;
//! within one task that costs one pass over the accumulator per chunk, and it lets the paged
//! decode path put the chunks of one long context on different threads and still produce
//! the very bits of the serial order (see `kv::attention`).
//!
//! Backward (flash-attention 2): one task per (span, KV head, range of queries; see
//! `bwd_piece`) walks its query blocks and key tiles, recomputing `P = exp(S - lse)` from the saved log-sum-exp, with `D = rowsum(dO * O)`,
//! `dP = dO V^T`, `dS = P * (dP - D)`; `dQ` accumulates over the key tiles and is written
//! once per query block, `dK += scale dS^T Q` and `dV += P^T dO` accumulate into the task's
//! own `[visible keys, head_dim]` buffers. Spans that share a prefix (a preference pair's two
//! branches) both contribute to the prefix rows, as do the query ranges of one span to its
//! earlier rows, so those buffers are added into dk/dv afterwards in task order, in parallel
//! over row ranges.
//!
//! Bits: every product is one multiply-add chain per element in key (or head-dim) order
//! (see `kernel`), masked keys contribute exact zeros, and partials are combined in a fixed
//! order, so results are the same whatever the thread count, and a query's output does not
//! depend on how queries are blocked, on the cache's block size, or on whether its context
//! was split over threads.

mod kernel;

use self::kernel::{exp_sub, isa, Isa, Kern, Portable};
/// The softmax's `exp` (about 2 ulp), also what simd.rs vectorises.
pub(crate) use self::kernel::exp_f32;
#[cfg(target_arch = "x86_64")]
use self::kernel::{Avx2, Avx512};
use super::{cast, Elem, SendPtr};
use crate::backend::{AttnDims, AttnLayout, KvGeom, Span};
use rayon::prelude::*;
use std::ops::Range;

/// Keys per tile.
pub(super) const BK: usize = 64;
/// Keys per chunk: the unit of the softmax partials (a multiple of `BK`).
pub(super) const KC: usize = 256;
const _: () = assert!(KC.is_multiple_of(BK));
/// Rows of dk/dv per task of the final reduction.
const REDUCE_ROWS: usize = 64;

/// Queries per block: about 96 tile rows (queries x heads of a group), at least 1.
pub(super) fn q_block(group: usize) -> usize {
    (96 / group).clamp(1, 64)
}

/// Tile rows padded to a multiple of 8 (whole vectors in the row-wise loops).
#[inline(always)]
fn pad8(r: usize) -> usize {
    r.div_ceil(8) * 8
}

#[inline(always)]
fn fmax<F: Elem>(a: F, b: F) -> F {
    if b > a {
        b
    } else {
        a
    }
}

/// Where the keys and values of one KV head are: key `t` (in the order the queries see them)
/// is one `head_dim` row.
#[derive(Clone, Copy)]
pub(super) enum Keys<'a, F> {
    /// Packed rows (`[tokens, n_kv_heads, head_dim]`): keys `[0, prefix_len)` are rows
    /// `prefix_start..`, the rest rows `start..`; `col` is the head's offset in a row.
    Packed { k: &'a [F], v: &'a [F], row: usize, col: usize, prefix_start: usize, prefix_len: usize, start: usize },
    /// The paged cache: key `t` is row `t % block_size` of block `table[t / block_size]`.
    Paged { cache: &'a [F], table: &'a [u32], g: KvGeom, kvh: usize },
}

/// Consecutive keys stored at one row stride.
struct Run<F> {
    k: *const F,
    v: *const F,
    stride: usize,
    len: usize,
}

impl<F: Elem> Keys<'_, F> {
    /// The longest run of keys from key `t` (before `end`) at one row stride. The slices are
    /// bounds-checked here, so the run's `len` rows of `hd` are in bounds.
    #[inline(always)]
    fn run(&self, t: usize, end: usize, hd: usize) -> Run<F> {
        let (kb, vb, ko, vo, stride, len) = match *self {
            Keys::Packed { k, v, row, col, prefix_start, prefix_len, start } => {
                let (r, len) = if t < prefix_len { (prefix_start + t, end.min(prefix_len) - t) } else { (start + t - prefix_len, end - t) };
                (k, v, r * row + col, r * row + col, row, len)
            }
            Keys::Paged { cache, table, g, kvh } => {
                let (blk, off) = (table[t / g.block_size] as usize, t % g.block_size);
                let len = (g.block_size - off).min(end - t);
                (cache, cache, super::kv::base(g, blk, 0, kvh) + off * hd, super::kv::base(g, blk, 1, kvh) + off * hd, hd, len)
            }
        };
        let n = (len - 1) * stride + hd;
        Run { k: kb[ko..ko + n].as_ptr(), v: vb[vo..vo + n].as_ptr(), stride, len }
    }
}

/// A block of consecutive queries: query `i` is token row `tok0 + i` of q/out and sees keys
/// `[0, past + i]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct QBlock {
    pub(super) tok0: usize,
    pub(super) nq: usize,
    pub(super) past: usize,
}

impl QBlock {
    /// Keys seen by the block's last query.
    fn keys(&self) -> usize {
        self.past + self.nq
    }
    /// Chunks of keys the block sees.
    pub(super) fn chunks(&self) -> usize {
        self.keys().div_ceil(KC)
    }
}

/// Softmax state of tile rows over some keys: running max `m`, sum `l` of `exp(s - m)`
/// (`[rp]`), unnormalised output `o` (`[r, hd]`).
#[derive(Clone)]
pub(super) struct Partial<F> {
    m: Vec<F>,
    l: Vec<F>,
    o: Vec<F>,
}

impl<F: Elem> Partial<F> {
    fn new(rp: usize, r_hd: usize) -> Self {
        Self { m: vec![F::neg_infinity(); rp], l: vec![F::zero(); rp], o: vec![F::zero(); r_hd] }
    }
    fn reset(&mut self, rp: usize, r_hd: usize) {
        self.m[..rp].fill(F::neg_infinity());
        self.l[..rp].fill(F::zero());
        self.o[..r_hd].fill(F::zero());
    }
}

/// Scratch of the forward of one query block (reused across the blocks of a thread).
pub(super) struct Fwd<F> {
    hd: usize,
    group: usize,
    r: usize,
    rp: usize,
    /// `scale * Q^T`, `[hd, rp]` (padding columns zero).
    qt: Vec<F>,
    /// Scores, then probabilities, of one key tile, transposed: `[BK, rp]`.
    st: Vec<F>,
    mu: Vec<F>,
    t1: Vec<F>,
    t2: Vec<F>,
    chunk: Partial<F>,
    acc: Partial<F>,
}

impl<F: Elem> Fwd<F> {
    /// For blocks of up to `max_nq` queries of `group` heads each.
    pub(super) fn new(group: usize, hd: usize, max_nq: usize) -> Self {
        let (r, rp) = (max_nq * group, pad8(max_nq * group));
        Self {
            hd,
            group,
            r,
            rp,
            qt: vec![F::zero(); hd * rp],
            st: vec![F::zero(); BK * rp],
            mu: vec![F::zero(); rp],
            t1: vec![F::zero(); rp],
            t2: vec![F::zero(); rp],
            chunk: Partial::new(rp, r * hd),
            acc: Partial::new(rp, r * hd),
        }
    }

    /// Starts a block of `nq` queries: an empty accumulated state.
    fn start(&mut self, nq: usize) {
        self.r = nq * self.group;
        self.rp = pad8(self.r);
        assert!(self.rp <= self.mu.len(), "attention: query block larger than its scratch");
        self.acc.reset(self.rp, self.r * self.hd);
    }

    /// The accumulated state (after `fwd_block` over some chunks), for a later `fold`.
    pub(super) fn partial(&self) -> Partial<F> {
        let (rp, n) = (self.rp, self.r * self.hd);
        Partial { m: self.acc.m[..rp].to_vec(), l: self.acc.l[..rp].to_vec(), o: self.acc.o[..n].to_vec() }
    }

    /// Starts merging the partials of a block of `nq` queries.
    pub(super) fn start_merge(&mut self, nq: usize) {
        self.start(nq)
    }

    /// Folds a partial (of the keys after those already accumulated) into the state.
    pub(super) fn fold(&mut self, p: &Partial<F>) {
        fold(&mut self.acc, p, self.r, self.rp, self.hd, &mut self.mu, &mut self.t1, &mut self.t2);
    }

    /// Writes the normalised output of the accumulated state (and its log-sum-exp when `lse`
    /// is given) for the block's rows of KV head `kvh`.
    ///
    /// # Safety
    /// `out` (and `lse`) must hold `[tokens, n_heads, hd]` (`[tokens, n_heads]`) for every
    /// token of the block, and no other thread may write those rows of this head group.
    pub(super) unsafe fn write(&self, qb: QBlock, kvh: usize, n_heads: usize, out: SendPtr<F>, lse: Option<SendPtr<F>>) {
        let (hd, group) = (self.hd, self.group);
        for i in 0..qb.nq {
            let tok = qb.tok0 + i;
            let dst = std::slice::from_raw_parts_mut(out.get().add((tok * n_heads + kvh * group) * hd), group * hd);
            for (g, dst) in dst.chunks_exact_mut(hd).enumerate() {
                let r = i * group + g;
                let inv = F::one() / self.acc.l[r];
                for (o, &x) in dst.iter_mut().zip(&self.acc.o[r * hd..(r + 1) * hd]) {
                    *o = x * inv;
                }
                if let Some(lse) = lse {
                    *lse.get().add(tok * n_heads + kvh * group + g) = self.acc.m[r] + self.acc.l[r].ln();
                }
            }
        }
    }
}

/// `acc = acc (+) p`: two softmax partials over disjoint keys combined (plain multiplies and
/// adds: the same bits wherever it runs).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fold<F: Elem>(acc: &mut Partial<F>, p: &Partial<F>, r: usize, rp: usize, hd: usize, mu: &mut [F], a1: &mut [F], a2: &mut [F]) {
    for i in 0..rp {
        let mn = fmax(acc.m[i], p.m[i]);
        // All keys so far masked (-inf): exp(-inf - 0) = 0 keeps everything zero.
        mu[i] = if mn == F::neg_infinity() { F::zero() } else { mn };
        a1[i] = acc.m[i];
        a2[i] = p.m[i];
        acc.m[i] = mn;
    }
    exp_sub(&mut a1[..rp], &mu[..rp]);
    exp_sub(&mut a2[..rp], &mu[..rp]);
    for i in 0..rp {
        acc.l[i] = acc.l[i] * a1[i] + p.l[i] * a2[i];
    }
    for i in 0..r {
        let (x, y) = (a1[i], a2[i]);
        for (o, &po) in acc.o[i * hd..(i + 1) * hd].iter_mut().zip(&p.o[i * hd..(i + 1) * hd]) {
            *o = *o * x + po * y;
        }
    }
}

/// `dst[d * rp + i * group + g] = scale * src[(tok0 + i) * qrow + (kvh * group + g) * hd + d]`:
/// the block's rows (queries x group heads) transposed, padding columns zero. Eight rows at a
/// time, in 8 x 8 blocks.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn load_t<F: Elem, K: Kern>(dst: &mut [F], src: &[F], qrow: usize, kvh: usize, group: usize, hd: usize, qb: QBlock, rp: usize, scale: F) {
    let r = qb.nq * group;
    let row = |x: usize| {
        let (i, g) = (x / group, x % group);
        &src[(qb.tok0 + i) * qrow + (kvh * group + g) * hd..][..hd]
    };
    for r0 in (0..r).step_by(8) {
        let n = (r - r0).min(8);
        // Past the last row: repeat it (the padding columns are zeroed below).
        let rows: [&[F]; 8] = std::array::from_fn(|j| row(r0 + j.min(n - 1)));
        let mut d0 = 0;
        while d0 + 8 <= hd {
            K::transpose8(&rows, d0, scale, &mut dst[d0 * rp + r0..], rp);
            d0 += 8;
        }
        for d in d0..hd {
            let v: [F; 8] = std::array::from_fn(|j| rows[j][d] * scale);
            dst[d * rp + r0..][..8].copy_from_slice(&v);
        }
    }
    if r < rp {
        for d in 0..hd {
            dst[d * rp + r..(d + 1) * rp].fill(F::zero());
        }
    }
}

/// `dst[(i * group + g) * hd + d] = scale * src[(tok0 + i) * qrow + (kvh * group + g) * hd + d]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn load_rows<F: Elem>(dst: &mut [F], src: &[F], qrow: usize, kvh: usize, group: usize, hd: usize, qb: QBlock, scale: F) {
    for i in 0..qb.nq {
        let row = &src[(qb.tok0 + i) * qrow + kvh * group * hd..][..group * hd];
        for (o, &x) in dst[i * group * hd..(i + 1) * group * hd].iter_mut().zip(row) {
            *o = x * scale;
        }
    }
}

/// Scores of keys `[a, b)` against the block's rows: `st[t - a, :] = K[t] . qt` (`qt` holds
/// `scale * Q^T`), with the causally invisible entries -inf.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn scores<F: Elem, K: Kern>(st: &mut [F], keys: &Keys<F>, qt: &[F], a: usize, b: usize, hd: usize, rp: usize, group: usize, qb: QBlock) {
    let st = &mut st[..(b - a) * rp];
    st.fill(F::zero());
    let mut t = a;
    while t < b {
        let run = keys.run(t, b, hd);
        // SAFETY: the run's rows are in bounds (`Keys::run`); qt is [hd, rp]; st has
        // (b - a) rows of rp and run.len <= b - t.
        unsafe { K::mm(run.len, rp, hd, run.k, run.stride, 1, qt.as_ptr(), rp, st.as_mut_ptr().add((t - a) * rp), rp) };
        t += run.len;
    }
    // Key t is seen by queries i >= t - past, i.e. tile columns >= (t - past) * group.
    for t in a.max(qb.past + 1)..b {
        let first = ((t - qb.past) * group).min(rp);
        st[(t - a) * rp..][..first].fill(F::neg_infinity());
    }
}

/// Asks for the key and value rows `[a, b)` to be brought into cache (the next tile's, while
/// this one computes): cache blocks are scattered pages, where the hardware prefetchers stop.
#[inline(always)]
fn prefetch<F: Elem>(keys: &Keys<F>, a: usize, b: usize, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = hd * std::mem::size_of::<F>();
        let mut t = a;
        while t < b {
            let run = keys.run(t, b, hd);
            for i in 0..run.len {
                for line in (0..bytes).step_by(64) {
                    // SAFETY: prefetching has no effect on memory; the addresses are in the
                    // run's rows anyway (`Keys::run`).
                    unsafe {
                        _mm_prefetch::<_MM_HINT_T0>((run.k.add(i * run.stride) as *const i8).add(line));
                        _mm_prefetch::<_MM_HINT_T0>((run.v.add(i * run.stride) as *const i8).add(line));
                    }
                }
            }
            t += run.len;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (keys, a, b, hd);
}

/// One key tile `[a, b)` of the forward into the chunk state.
#[inline(always)]
fn fwd_tile<F: Elem, K: Kern>(ws: &mut Fwd<F>, keys: &Keys<F>, qb: QBlock, a: usize, b: usize) {
    let (hd, r, rp, nk) = (ws.hd, ws.r, ws.rp, b - a);
    scores::<F, K>(&mut ws.st, keys, &ws.qt, a, b, hd, rp, ws.group, qb);
    let st = &mut ws.st[..nk * rp];
    let c = &mut ws.chunk;
    let (mt, mu, alpha) = (&mut ws.t1[..rp], &mut ws.mu[..rp], &mut ws.t2[..rp]);
    // Column-wise over key rows, 8 columns at a time so the running values stay in registers
    // (the order of each column's sum is still the key order).
    for c0 in (0..rp).step_by(8) {
        let mut m8 = [F::neg_infinity(); 8];
        for row in st.chunks_exact(rp) {
            for (m, &s) in m8.iter_mut().zip(&row[c0..c0 + 8]) {
                *m = fmax(*m, s);
            }
        }
        mt[c0..c0 + 8].copy_from_slice(&m8);
    }
    for i in 0..rp {
        let mn = fmax(c.m[i], mt[i]);
        mu[i] = if mn == F::neg_infinity() { F::zero() } else { mn };
        alpha[i] = c.m[i];
        c.m[i] = mn;
    }
    exp_sub(alpha, mu);
    for row in st.chunks_exact_mut(rp) {
        exp_sub(row, mu);
    }
    for c0 in (0..rp).step_by(8) {
        let mut l8: [F; 8] = std::array::from_fn(|j| c.l[c0 + j] * alpha[c0 + j]);
        for row in st.chunks_exact(rp) {
            for (l, &p) in l8.iter_mut().zip(&row[c0..c0 + 8]) {
                *l += p;
            }
        }
        c.l[c0..c0 + 8].copy_from_slice(&l8);
    }
    for (o, &al) in c.o[..r * hd].chunks_exact_mut(hd).zip(alpha.iter()) {
        for x in o {
            *x = *x * al;
        }
    }
    let mut t = a;
    while t < b {
        let run = keys.run(t, b, hd);
        // SAFETY: P^T rows (t - a).. of st (a_rs 1, a_cs rp) for r rows; the run's value rows
        // are in bounds; o is [r, hd].
        unsafe { K::mm(r, hd, run.len, st.as_ptr().add((t - a) * rp), 1, rp, run.v, run.stride, c.o.as_mut_ptr(), hd) };
        t += run.len;
    }
}

#[inline(always)]
fn fwd_block_body<F: Elem, K: Kern>(ws: &mut Fwd<F>, q: &[F], qrow: usize, kvh: usize, qb: QBlock, keys: &Keys<F>, chunks: Range<usize>) {
    ws.start(qb.nq);
    let (hd, rp) = (ws.hd, ws.rp);
    let scale: F = cast(1.0 / (hd as f64).sqrt());
    load_t::<F, K>(&mut ws.qt, q, qrow, kvh, ws.group, hd, qb, rp, scale);
    let kend = qb.keys();
    for c in chunks {
        let c0 = c * KC;
        if c0 >= kend {
            break;
        }
        let c1 = (c0 + KC).min(kend);
        ws.chunk.reset(rp, ws.r * hd);
        let mut a = c0;
        while a < c1 {
            let b = (a + BK).min(c1);
            prefetch(keys, b, (b + BK).min(kend), hd);
            fwd_tile::<F, K>(ws, keys, qb, a, b);
            a = b;
        }
        fold(&mut ws.acc, &ws.chunk, ws.r, rp, hd, &mut ws.mu, &mut ws.t1, &mut ws.t2);
    }
}

/// # Safety
/// The CPU must have the enabled features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn fwd_block_avx512<F: Elem>(ws: &mut Fwd<F>, q: &[F], qrow: usize, kvh: usize, qb: QBlock, keys: &Keys<F>, chunks: Range<usize>) {
    fwd_block_body::<F, Avx512>(ws, q, qrow, kvh, qb, keys, chunks)
}

/// # Safety
/// The CPU must have the enabled features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_block_avx2<F: Elem>(ws: &mut Fwd<F>, q: &[F], qrow: usize, kvh: usize, qb: QBlock, keys: &Keys<F>, chunks: Range<usize>) {
    fwd_block_body::<F, Avx2>(ws, q, qrow, kvh, qb, keys, chunks)
}

/// The forward of one query block of KV head `kvh` over the key chunks `chunks` (those past
/// the block's last key are skipped): the result is in `ws`, for `write` or `partial`.
pub(super) fn fwd_block<F: Elem>(ws: &mut Fwd<F>, q: &[F], qrow: usize, kvh: usize, qb: QBlock, keys: &Keys<F>, chunks: Range<usize>) {
    match isa() {
        // SAFETY (both): isa() saw these features on this CPU.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { fwd_block_avx512(ws, q, qrow, kvh, qb, keys, chunks) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { fwd_block_avx2(ws, q, qrow, kvh, qb, keys, chunks) },
        _ => fwd_block_body::<F, Portable>(ws, q, qrow, kvh, qb, keys, chunks),
    }
}

fn check_dims(dims: AttnDims) -> usize {
    assert!(dims.n_kv_heads > 0 && dims.n_heads.is_multiple_of(dims.n_kv_heads) && dims.head_dim > 0, "attention: bad head geometry {dims:?}");
    dims.n_heads / dims.n_kv_heads
}

/// The query blocks of every span, per KV head, in span order.
fn fwd_tasks(layout: &AttnLayout, n_kv_heads: usize, bq: usize) -> Vec<(Span, usize, QBlock)> {
    let mut t = Vec::new();
    for s in layout.spans.iter().filter(|s| s.len > 0) {
        for kvh in 0..n_kv_heads {
            for i0 in (0..s.len).step_by(bq) {
                t.push((*s, kvh, QBlock { tok0: s.start + i0, nq: bq.min(s.len - i0), past: s.prefix_len + i0 }));
            }
        }
    }
    t
}

fn packed_keys<'a, F>(k: &'a [F], v: &'a [F], s: &Span, kvh: usize, dims: AttnDims) -> Keys<'a, F> {
    Keys::Packed {
        k,
        v,
        row: dims.n_kv_heads * dims.head_dim,
        col: kvh * dims.head_dim,
        prefix_start: s.prefix_start,
        prefix_len: s.prefix_len,
        start: s.start,
    }
}

pub(super) fn forward<F: Elem>(q: &[F], k: &[F], v: &[F], layout: &AttnLayout, dims: AttnDims, out: &mut [F], lse: &mut [F]) {
    let group = check_dims(dims);
    let (hd, nh) = (dims.head_dim, dims.n_heads);
    let t = layout.num_tokens();
    assert!(q.len() >= t * nh * hd && out.len() >= t * nh * hd && lse.len() >= t * nh, "attention: q/out/lse too short");
    let bq = q_block(group);
    let (outp, lsep) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    fwd_tasks(layout, dims.n_kv_heads, bq).into_par_iter().for_each_init(
        || Fwd::new(group, hd, bq),
        |ws, (s, kvh, qb)| {
            fwd_block(ws, q, nh * hd, kvh, qb, &packed_keys(k, v, &s, kvh, dims), 0..usize::MAX);
            // SAFETY: out/lse hold every token (checked above); each (token, head group) is
            // one task's.
            unsafe { ws.write(qb, kvh, nh, outp, Some(lsep)) };
        },
    );
}

/// Scratch of the backward of one span and KV head.
struct Bwd<F> {
    hd: usize,
    group: usize,
    /// `scale * Q^T` and `dO^T`, `[hd, rp]`.
    qt: Vec<F>,
    dot: Vec<F>,
    /// `scale * Q` and `dO`, `[r, hd]`.
    qs: Vec<F>,
    dob: Vec<F>,
    /// dQ of the block (before the scale), `[r, hd]`.
    dq: Vec<F>,
    lse: Vec<F>,
    dd: Vec<F>,
    /// `P^T` and `dP^T` then `dS^T` of one key tile, `[BK, rp]`.
    st: Vec<F>,
    dpt: Vec<F>,
}

impl<F: Elem> Bwd<F> {
    fn new(group: usize, hd: usize, max_nq: usize) -> Self {
        let (r, rp) = (max_nq * group, pad8(max_nq * group));
        let z = |n| vec![F::zero(); n];
        Self { hd, group, qt: z(hd * rp), dot: z(hd * rp), qs: z(r * hd), dob: z(r * hd), dq: z(r * hd), lse: z(rp), dd: z(rp), st: z(BK * rp), dpt: z(BK * rp) }
    }
}

/// One backward task: queries `[q0, q1)` of span `s` with the heads of KV head `kvh`.
#[derive(Clone, Copy, Debug)]
struct BwdTask {
    s: Span,
    kvh: usize,
    q0: usize,
    q1: usize,
}

impl BwdTask {
    /// Keys the task's queries see (the rows of its dk/dv partials).
    fn keys(&self) -> usize {
        self.s.prefix_len + self.q1
    }
}

/// Queries per backward task: a span is split into ranges of about an eighth of its length
/// (at least 256, whole query blocks), so one long sequence still makes work for several
/// threads; the split depends on the shape alone, which keeps the order of the dk/dv sums.
/// (Splitting costs a little: each range has its own dk/dv partial to add up; at 2 x 128
/// queries about 5% more CPU time than one task.)
fn bwd_piece(len: usize, bq: usize) -> usize {
    len.div_ceil(8).max(256).div_ceil(bq) * bq
}

/// The backward of one task: writes dq of its rows and accumulates into `dkp`/`dvp`
/// (`[t.keys(), hd]`, key order).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bwd_span_body<F: Elem, K: Kern>(
    ws: &mut Bwd<F>, dout: &[F], q: &[F], k: &[F], v: &[F], out: &[F], lse: &[F], dims: AttnDims, t: BwdTask, bq: usize,
    dkp: &mut [F], dvp: &mut [F], dqp: SendPtr<F>,
) {
    let (hd, group, nh) = (ws.hd, ws.group, dims.n_heads);
    let (s, kvh) = (t.s, t.kvh);
    let qrow = nh * hd;
    let scale: F = cast(1.0 / (hd as f64).sqrt());
    let keys = packed_keys(k, v, &s, kvh, dims);
    for i0 in (t.q0..t.q1).step_by(bq) {
        let qb = QBlock { tok0: s.start + i0, nq: bq.min(t.q1 - i0), past: s.prefix_len + i0 };
        let (r, rp) = (qb.nq * group, pad8(qb.nq * group));
        load_t::<F, K>(&mut ws.qt, q, qrow, kvh, group, hd, qb, rp, scale);
        load_t::<F, K>(&mut ws.dot, dout, qrow, kvh, group, hd, qb, rp, F::one());
        load_rows(&mut ws.qs, q, qrow, kvh, group, hd, qb, scale);
        load_rows(&mut ws.dob, dout, qrow, kvh, group, hd, qb, F::one());
        ws.lse[..rp].fill(F::zero());
        ws.dd[..rp].fill(F::zero());
        for i in 0..qb.nq {
            for g in 0..group {
                let (row, h) = (i * group + g, kvh * group + g);
                let o = ((qb.tok0 + i) * nh + h) * hd;
                ws.lse[row] = lse[(qb.tok0 + i) * nh + h];
                ws.dd[row] = F::dot(&dout[o..o + hd], &out[o..o + hd]);
            }
        }
        ws.dq[..r * hd].fill(F::zero());
        let kend = qb.keys();
        let mut a = 0;
        while a < kend {
            let b = (a + BK).min(kend);
            let nk = b - a;
            scores::<F, K>(&mut ws.st, &keys, &ws.qt, a, b, hd, rp, group, qb);
            let (st, dpt) = (&mut ws.st[..nk * rp], &mut ws.dpt[..nk * rp]);
            for row in st.chunks_exact_mut(rp) {
                exp_sub(row, &ws.lse[..rp]);
            }
            dpt.fill(F::zero());
            let mut t = a;
            while t < b {
                let run = keys.run(t, b, hd);
                // SAFETY: value rows in bounds (`Keys::run`); dot is [hd, rp]; dpt has nk rows.
                unsafe { K::mm(run.len, rp, hd, run.v, run.stride, 1, ws.dot.as_ptr(), rp, dpt.as_mut_ptr().add((t - a) * rp), rp) };
                t += run.len;
            }
            for (drow, prow) in dpt.chunks_exact_mut(rp).zip(st.chunks_exact(rp)) {
                for ((x, &p), &d) in drow.iter_mut().zip(prow).zip(&ws.dd[..rp]) {
                    *x = p * (*x - d);
                }
            }
            // SAFETY: st/dpt are [nk, rp] (k = r <= rp columns read); dob/qs are [r, hd];
            // dkp/dvp have rows a..b of hd (b <= kend <= prefix_len + len).
            unsafe {
                K::mm(nk, hd, r, st.as_ptr(), rp, 1, ws.dob.as_ptr(), hd, dvp.as_mut_ptr().add(a * hd), hd);
                K::mm(nk, hd, r, dpt.as_ptr(), rp, 1, ws.qs.as_ptr(), hd, dkp.as_mut_ptr().add(a * hd), hd);
            }
            let mut t = a;
            while t < b {
                let run = keys.run(t, b, hd);
                // SAFETY: dS rows (t - a).. read transposed (r rows); key rows in bounds; dq [r, hd].
                unsafe { K::mm(r, hd, run.len, dpt.as_ptr().add((t - a) * rp), 1, rp, run.k, run.stride, ws.dq.as_mut_ptr(), hd) };
                t += run.len;
            }
            a = b;
        }
        for i in 0..qb.nq {
            // SAFETY: dq holds every token (checked by the caller); the rows of this span and
            // head group are this task's alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(dqp.get().add((qb.tok0 + i) * qrow + kvh * group * hd), group * hd) };
            for (o, &x) in dst.iter_mut().zip(&ws.dq[i * group * hd..(i + 1) * group * hd]) {
                *o = x * scale;
            }
        }
    }
}

/// # Safety
/// The CPU must have the enabled features.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn bwd_span_avx512<F: Elem>(
    ws: &mut Bwd<F>, dout: &[F], q: &[F], k: &[F], v: &[F], out: &[F], lse: &[F], dims: AttnDims, t: BwdTask, bq: usize,
    dkp: &mut [F], dvp: &mut [F], dqp: SendPtr<F>,
) {
    bwd_span_body::<F, Avx512>(ws, dout, q, k, v, out, lse, dims, t, bq, dkp, dvp, dqp)
}

/// # Safety
/// The CPU must have the enabled features.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn bwd_span_avx2<F: Elem>(
    ws: &mut Bwd<F>, dout: &[F], q: &[F], k: &[F], v: &[F], out: &[F], lse: &[F], dims: AttnDims, t: BwdTask, bq: usize,
    dkp: &mut [F], dvp: &mut [F], dqp: SendPtr<F>,
) {
    bwd_span_body::<F, Avx2>(ws, dout, q, k, v, out, lse, dims, t, bq, dkp, dvp, dqp)
}

/// Adds the task partials (key order: prefix rows, then the span's own rows) into rows
/// `[r0, r0 + rows)` of dk/dv, in task order.
fn reduce_rows<F: Elem>(dkc: &mut [F], dvc: &mut [F], r0: usize, parts: &[(BwdTask, Vec<F>, Vec<F>)], kvrow: usize, hd: usize) {
    dkc.fill(F::zero());
    dvc.fill(F::zero());
    let r1 = r0 + dkc.len() / kvrow;
    for (t, pk, pv) in parts {
        let (s, kvh) = (&t.s, t.kvh);
        for (base, first, n) in [(s.prefix_start, 0, s.prefix_len), (s.start, s.prefix_len, t.q1)] {
            let (lo, hi) = (base.max(r0), (base + n).min(r1));
            for row in lo..hi {
                let src = (first + row - base) * hd;
                let dst = (row - r0) * kvrow + kvh * hd;
                for ((x, &y), (w, &z)) in dkc[dst..dst + hd].iter_mut().zip(&pk[src..src + hd]).zip(dvc[dst..dst + hd].iter_mut().zip(&pv[src..src + hd])) {
                    *x += y;
                    *w += z;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward<F: Elem>(
    dout: &[F], q: &[F], k: &[F], v: &[F], out: &[F], lse: &[F], layout: &AttnLayout, dims: AttnDims,
    dq: &mut [F], dk: &mut [F], dv: &mut [F],
) {
    let group = check_dims(dims);
    let (hd, nh) = (dims.head_dim, dims.n_heads);
    let kvrow = dims.n_kv_heads * hd;
    let t = layout.num_tokens();
    assert!(
        [dout.len(), q.len(), out.len(), dq.len()].iter().all(|&n| n >= t * nh * hd) && lse.len() >= t * nh && dk.len() >= t * kvrow && dv.len() >= t * kvrow,
        "attention_bwd: buffers too short"
    );
    let bq = q_block(group);
    let dqp = SendPtr(dq.as_mut_ptr());
    let mut tasks = Vec::new();
    for s in layout.spans.iter().filter(|s| s.len > 0) {
        let piece = bwd_piece(s.len, bq);
        for kvh in 0..dims.n_kv_heads {
            for q0 in (0..s.len).step_by(piece) {
                tasks.push(BwdTask { s: *s, kvh, q0, q1: (q0 + piece).min(s.len) });
            }
        }
    }
    let parts: Vec<(BwdTask, Vec<F>, Vec<F>)> = tasks
        .into_par_iter()
        .map_init(
            || Bwd::new(group, hd, bq),
            |ws, t| {
                let n = t.keys() * hd;
                let (mut dkp, mut dvp) = (vec![F::zero(); n], vec![F::zero(); n]);
                match isa() {
                    // SAFETY (both): isa() saw these features on this CPU.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => unsafe { bwd_span_avx512(ws, dout, q, k, v, out, lse, dims, t, bq, &mut dkp, &mut dvp, dqp) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { bwd_span_avx2(ws, dout, q, k, v, out, lse, dims, t, bq, &mut dkp, &mut dvp, dqp) },
                    _ => bwd_span_body::<F, Portable>(ws, dout, q, k, v, out, lse, dims, t, bq, &mut dkp, &mut dvp, dqp),
                }
                (t, dkp, dvp)
            },
        )
        .collect();
    // Prefix rows get contributions from every span that names them: summed per row in task
    // order, whatever thread adds them.
    dk[..t * kvrow]
        .par_chunks_mut(REDUCE_ROWS * kvrow)
        .zip(dv[..t * kvrow].par_chunks_mut(REDUCE_ROWS * kvrow))
        .enumerate()
        .for_each(|(c, (dkc, dvc))| reduce_rows(dkc, dvc, c * REDUCE_ROWS, &parts, kvrow, hd));
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// SplitMix64 uniforms in [-scale, scale).
    pub(crate) fn rvec(seed: u64, n: usize, scale: f64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E3779B97F4A7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                z ^= z >> 31;
                ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    pub(crate) fn to<F: Elem>(x: &[f64]) -> Vec<F> {
        x.iter().map(|&v| cast(v)).collect()
    }

    /// Naive attention of one query against explicit key rows: (out row, lse, probabilities).
    pub(crate) fn naive_row(qr: &[f64], keys: &[&[f64]], vals: &[&[f64]]) -> (Vec<f64>, f64, Vec<f64>) {
        let scale = 1.0 / (qr.len() as f64).sqrt();
        let s: Vec<f64> = keys.iter().map(|k| scale * qr.iter().zip(*k).map(|(a, b)| a * b).sum::<f64>()).collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
        let mut o = vec![0.0; qr.len()];
        for (pi, v) in p.iter().zip(vals) {
            for (o, x) in o.iter_mut().zip(*v) {
                *o += pi * x;
            }
        }
        (o, m + z.ln(), p)
    }

    /// The key rows query `j` of span `s` sees.
    fn visible(s: &Span, j: usize) -> Vec<usize> {
        (s.prefix_start..s.prefix_start + s.prefix_len).chain(s.start..=s.start + j).collect()
    }

    /// Naive forward and backward in f64: (out, lse, dq, dk, dv).
    #[allow(clippy::type_complexity)]
    fn naive(q: &[f64], k: &[f64], v: &[f64], dout: &[f64], layout: &AttnLayout, dims: AttnDims) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (hd, nh, nkv) = (dims.head_dim, dims.n_heads, dims.n_kv_heads);
        let (qrow, kvrow, t) = (nh * hd, nkv * hd, layout.num_tokens());
        let scale = 1.0 / (hd as f64).sqrt();
        let (mut out, mut lse, mut dq) = (vec![0.0; t * qrow], vec![0.0; t * nh], vec![0.0; t * qrow]);
        let (mut dk, mut dv) = (vec![0.0; t * kvrow], vec![0.0; t * kvrow]);
        for s in &layout.spans {
            for j in 0..s.len {
                let tok = s.start + j;
                let rows = visible(s, j);
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let ks: Vec<&[f64]> = rows.iter().map(|&r| &k[r * kvrow + kvh * hd..][..hd]).collect();
                    let vs: Vec<&[f64]> = rows.iter().map(|&r| &v[r * kvrow + kvh * hd..][..hd]).collect();
                    let qr = &q[tok * qrow + h * hd..][..hd];
                    let (o, l, p) = naive_row(qr, &ks, &vs);
                    out[tok * qrow + h * hd..][..hd].copy_from_slice(&o);
                    lse[tok * nh + h] = l;
                    let g = &dout[tok * qrow + h * hd..][..hd];
                    let dd: f64 = g.iter().zip(&o).map(|(a, b)| a * b).sum();
                    for (i, &r) in rows.iter().enumerate() {
                        let dp: f64 = g.iter().zip(vs[i]).map(|(a, b)| a * b).sum();
                        let ds = p[i] * (dp - dd);
                        for d in 0..hd {
                            dq[tok * qrow + h * hd + d] += scale * ds * ks[i][d];
                            dk[r * kvrow + kvh * hd + d] += scale * ds * qr[d];
                            dv[r * kvrow + kvh * hd + d] += p[i] * g[d];
                        }
                    }
                }
            }
        }
        (out, lse, dq, dk, dv)
    }

    /// Plain sequences of lengths 1, 7, 67 and 130 (not multiples of any tile), then two
    /// packed pairs `[context | chosen | rejected]` (one with a context longer than a key
    /// chunk), and a span with an empty prefix naming another span's start.
    pub(crate) fn odd_layout() -> AttnLayout {
        let mut l = AttnLayout::sequences(&[1, 7, 67, 130]);
        let mut start = l.num_tokens();
        for (ctx, ch, rj) in [(37, 70, 5), (300, 9, 66)] {
            l.spans.push(Span { start, len: ctx, prefix_start: start, prefix_len: 0 });
            l.spans.push(Span { start: start + ctx, len: ch, prefix_start: start, prefix_len: ctx });
            l.spans.push(Span { start: start + ctx + ch, len: rj, prefix_start: start, prefix_len: ctx });
            start += ctx + ch + rj;
        }
        l.spans.push(Span { start, len: 3, prefix_start: 0, prefix_len: 0 });
        l
    }

    struct Case {
        dims: AttnDims,
        q: Vec<f64>,
        k: Vec<f64>,
        v: Vec<f64>,
        dout: Vec<f64>,
    }

    fn case(dims: AttnDims, t: usize, seed: u64) -> Case {
        let (qd, kvd) = (dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim);
        // Scale 2: scores of a few units, so the softmax is far from uniform.
        Case { dims, q: rvec(seed, t * qd, 2.0), k: rvec(seed + 1, t * kvd, 2.0), v: rvec(seed + 2, t * kvd, 1.0), dout: rvec(seed + 3, t * qd, 1.0) }
    }

    #[allow(clippy::type_complexity)]
    fn run<F: Elem>(c: &Case, layout: &AttnLayout) -> (Vec<F>, Vec<F>, Vec<F>, Vec<F>, Vec<F>) {
        let t = layout.num_tokens();
        let (qd, kvd) = (c.dims.n_heads * c.dims.head_dim, c.dims.n_kv_heads * c.dims.head_dim);
        let (q, k, v, dout) = (to::<F>(&c.q), to::<F>(&c.k), to::<F>(&c.v), to::<F>(&c.dout));
        let (mut out, mut lse) = (vec![F::nan(); t * qd], vec![F::nan(); t * c.dims.n_heads]);
        forward(&q, &k, &v, layout, c.dims, &mut out, &mut lse);
        let (mut dq, mut dk, mut dv) = (vec![F::nan(); t * qd], vec![F::nan(); t * kvd], vec![F::nan(); t * kvd]);
        backward(&dout, &q, &k, &v, &out, &lse, layout, c.dims, &mut dq, &mut dk, &mut dv);
        (out, lse, dq, dk, dv)
    }

    /// max |got - want| / (max |want| + floor) per tensor.
    pub(crate) fn rel<F: Elem>(got: &[F], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0.0f64, |a, b| a.max(b.abs())) + 1e-30;
        got.iter().zip(want).map(|(g, w)| (g.to_f64().unwrap() - w).abs()).fold(0.0, f64::max) / scale
    }

    const SHAPES: [AttnDims; 4] = [
        AttnDims { n_heads: 3, n_kv_heads: 3, head_dim: 24 },
        AttnDims { n_heads: 6, n_kv_heads: 2, head_dim: 64 },
        AttnDims { n_heads: 3, n_kv_heads: 1, head_dim: 13 },
        AttnDims { n_heads: 2, n_kv_heads: 2, head_dim: 40 },
    ];

    /// f64 against the naive reference within 1e-12 of each tensor's largest value (seen:
    /// ~2e-15); f32 within 1e-5 of it, about 80 ulp (seen: up to 1.6e-6 on dk/dv, which sum
    /// a few hundred terms).
    #[test]
    fn forward_and_backward_match_naive_at_odd_shapes() {
        let layout = odd_layout();
        for (n, dims) in SHAPES.into_iter().enumerate() {
            let c = case(dims, layout.num_tokens(), 100 + n as u64);
            let want = naive(&c.q, &c.k, &c.v, &c.dout, &layout, dims);
            let want = [&want.0, &want.1, &want.2, &want.3, &want.4];
            let names = ["out", "lse", "dq", "dk", "dv"];
            let got = run::<f64>(&c, &layout);
            for ((g, w), name) in [&got.0, &got.1, &got.2, &got.3, &got.4].into_iter().zip(want).zip(names) {
                let e = rel(g, w);
                assert!(e < 1e-12, "f64 {dims:?} {name}: relative error {e:e}");
            }
            let got = run::<f32>(&c, &layout);
            for ((g, w), name) in [&got.0, &got.1, &got.2, &got.3, &got.4].into_iter().zip(want).zip(names) {
                let e = rel(g, w);
                assert!(e < 1e-5, "f32 {dims:?} {name}: relative error {e:e}");
            }
        }
    }

    /// The bits of the forward and backward do not depend on the thread count.
    #[test]
    fn bits_do_not_depend_on_threads() {
        let layout = odd_layout();
        let c = case(SHAPES[1], layout.num_tokens(), 7);
        let bits = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let r = pool.install(|| run::<f32>(&c, &layout));
            [r.0, r.1, r.2, r.3, r.4].map(|x| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        };
        let one = bits(1);
        for threads in [2, 3, 5] {
            assert!(one == bits(threads), "{threads} threads");
        }
    }

    /// A query's output and lse do not depend on how the queries are blocked: a long sequence
    /// and the same tokens as one-query spans with the earlier tokens as their prefix agree
    /// bit for bit (the prefix of query j is keys [0, j), as the causal part of the sequence).
    #[test]
    fn bits_do_not_depend_on_query_blocking() {
        let dims = SHAPES[1];
        let n = 300;
        let whole = AttnLayout::sequences(&[n]);
        let c = case(dims, n, 11);
        let (out, lse, ..) = run::<f32>(&c, &whole);
        // Token j as its own span, prefix = tokens [0, j): same keys, in the same order.
        // Each span sees its own row as its only own key, so the span's row must hold the
        // key/value of token j: the packed buffer is the same, only the spans differ.
        let single = AttnLayout { spans: (0..n).map(|j| Span { start: j, len: 1, prefix_start: 0, prefix_len: j }).collect() };
        let (q, k, v) = (to::<f32>(&c.q), to::<f32>(&c.k), to::<f32>(&c.v));
        let (mut o2, mut l2) = (vec![0.0; out.len()], vec![0.0; lse.len()]);
        forward(&q, &k, &v, &single, dims, &mut o2, &mut l2);
        assert!(out.iter().zip(&o2).all(|(a, b)| a.to_bits() == b.to_bits()), "out");
        assert!(lse.iter().zip(&l2).all(|(a, b)| a.to_bits() == b.to_bits()), "lse");
    }
}
