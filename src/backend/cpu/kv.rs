//! The paged KV cache ops on the CPU: writing new K/V rows into their slots, copying blocks
//! (copy-on-write of a shared tail), and attention of new queries against the blocks of each
//! sequence. The reference for the CUDA paged decode-attention kernel.
//!
//! Attention runs the tiled online-softmax forward of `attention` with the keys read in place
//! from the blocks of the block table (no gather of the context, no `[q_len, ctx_len]`
//! scores). Work is one task per (sequence, KV head, block of queries); when that is too few
//! tasks to occupy the threads (a decode step of a few sequences), each task is split further
//! by key chunks whose softmax partials are then combined in key order, which gives the bits
//! of the unsplit computation. A query's output depends only on its own keys: not on the
//! block size, the prefill chunking, the batch or the threads; it is computed exactly as
//! `attention::forward` computes the same query over the same keys.

use super::attention::{fwd_block, q_block, Fwd, Keys, Partial, QBlock};
use super::{Elem, SendPtr};
use crate::backend::{AttnDims, KvGeom, PagedSeq};
use rayon::prelude::*;

/// Offset of `cache[block, kv, head, 0, 0]` in one layer's buffer (kv: 0 = keys, 1 = values).
#[inline]
pub(super) fn base(g: KvGeom, block: usize, kv: usize, head: usize) -> usize {
    ((block * 2 + kv) * g.n_kv_heads + head) * g.block_size * g.head_dim
}

pub(crate) fn write<F: Elem>(cache: &mut [F], k: &[F], v: &[F], slots: &[u32], g: KvGeom) {
    let (hd, row) = (g.head_dim, g.n_kv_heads * g.head_dim);
    assert!(k.len() >= slots.len() * row && v.len() >= slots.len() * row, "kv_write: k/v shorter than slots");
    assert_eq!(cache.len(), g.layer_len(), "kv_write: cache length vs geometry");
    for (t, &slot) in slots.iter().enumerate() {
        let (block, off) = (slot as usize / g.block_size, slot as usize % g.block_size);
        assert!(block < g.num_blocks, "kv_write: slot {slot} outside the pool");
        for h in 0..g.n_kv_heads {
            let src = t * row + h * hd;
            let kd = base(g, block, 0, h) + off * hd;
            let vd = base(g, block, 1, h) + off * hd;
            cache[kd..kd + hd].copy_from_slice(&k[src..src + hd]);
            cache[vd..vd + hd].copy_from_slice(&v[src..src + hd]);
        }
    }
}

pub(crate) fn copy_blocks<F: Elem>(cache: &mut [F], pairs: &[(u32, u32)], g: KvGeom) {
    let n = g.block_len();
    for &(src, dst) in pairs {
        let (s, d) = (src as usize * n, dst as usize * n);
        assert!(s + n <= cache.len() && d + n <= cache.len(), "kv_copy_blocks: block outside the pool");
        cache.copy_within(s..s + n, d);
    }
}

/// Splits tasks by key chunks when there are fewer than this many tasks per thread.
const MIN_TASKS_PER_THREAD: usize = 4;
/// Query-key products (times head_dim) below which attention runs on the calling thread: a
/// batch-1 decode step's attention takes microseconds, less than a rayon region from outside
/// the pool.
const SERIAL_WORK: usize = 1 << 17;

/// How `attention_with` runs its tasks (the bits are the same every way).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Run {
    /// One task per (sequence, KV head, block of queries), in turn on the calling thread.
    Serial,
    /// The same tasks on rayon.
    Whole,
    /// Each task split further by key chunks, on rayon.
    Split,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention<F: Elem>(
    q: &[F],
    cache: &[F],
    seqs: &[PagedSeq],
    block_table: &[u32],
    g: KvGeom,
    dims: AttnDims,
    out: &mut [F],
) {
    let work: usize = seqs.iter().map(|s| s.q_len * s.ctx_len).sum::<usize>() * dims.n_heads * dims.head_dim;
    if work < SERIAL_WORK {
        return attention_with(q, cache, seqs, block_table, g, dims, out, Run::Serial);
    }
    let split = seqs.iter().filter(|s| s.q_len > 0).count() * dims.n_kv_heads < MIN_TASKS_PER_THREAD * rayon::current_num_threads();
    attention_with(q, cache, seqs, block_table, g, dims, out, if split { Run::Split } else { Run::Whole })
}

/// `attention`, run as `run` says.
#[allow(clippy::too_many_arguments)]
fn attention_with<F: Elem>(
    q: &[F],
    cache: &[F],
    seqs: &[PagedSeq],
    block_table: &[u32],
    g: KvGeom,
    dims: AttnDims,
    out: &mut [F],
    run: Run,
) {
    let (hd, nh) = (dims.head_dim, dims.n_heads);
    assert!(dims.n_kv_heads > 0 && nh.is_multiple_of(dims.n_kv_heads) && dims.n_kv_heads == g.n_kv_heads && hd == g.head_dim, "paged_attention: head geometry");
    assert_eq!(cache.len(), g.layer_len(), "paged_attention: cache length vs geometry");
    let group = nh / dims.n_kv_heads;
    let qrow = nh * hd;
    for s in seqs {
        assert!(s.q_len <= s.ctx_len, "paged_attention: more queries than keys");
        assert!((s.q_start + s.q_len) * qrow <= q.len() && out.len() >= q.len(), "paged_attention: q/out too short");
        assert!(s.table_start + s.ctx_len.div_ceil(g.block_size) <= block_table.len(), "paged_attention: block table shorter than ctx_len");
    }
    let bq = q_block(group);
    let mut blocks: Vec<(PagedSeq, usize, QBlock)> = Vec::new();
    for s in seqs.iter().filter(|s| s.q_len > 0) {
        for kvh in 0..dims.n_kv_heads {
            for i0 in (0..s.q_len).step_by(bq) {
                blocks.push((*s, kvh, QBlock { tok0: s.q_start + i0, nq: bq.min(s.q_len - i0), past: s.ctx_len - s.q_len + i0 }));
            }
        }
    }
    // Scratch for the largest block of this call: a decode step's blocks hold one query each,
    // and a scratch sized for `bq` queries (zeroed by every rayon task's init) cost more than
    // the attention of a short context.
    let bq = blocks.iter().map(|b| b.2.nq).max().unwrap_or(1);
    let keys = |s: &PagedSeq, kvh: usize| Keys::Paged { cache, table: &block_table[s.table_start..s.table_start + s.ctx_len.div_ceil(g.block_size)], g, kvh };
    let outp = SendPtr(out.as_mut_ptr());
    let task = |ws: &mut Fwd<F>, (s, kvh, qb): (PagedSeq, usize, QBlock)| {
        fwd_block(ws, q, qrow, kvh, qb, &keys(&s, kvh), 0..usize::MAX);
        // SAFETY: out holds every query row (checked above); each (query row, head group)
        // belongs to one task.
        unsafe { ws.write(qb, kvh, nh, outp, None) };
    };
    match run {
        Run::Serial => {
            let mut ws = Fwd::new(group, hd, bq);
            return blocks.into_iter().for_each(|b| task(&mut ws, b));
        }
        Run::Whole => return blocks.into_par_iter().for_each_init(|| Fwd::new(group, hd, bq), task),
        Run::Split => {}
    }
    // One task per (block, key chunk); the partials of a block are folded in chunk order,
    // as `fwd_block` folds them when it runs all chunks itself.
    let tasks: Vec<(usize, usize)> = blocks.iter().enumerate().flat_map(|(b, (_, _, qb))| (0..qb.chunks()).map(move |c| (b, c))).collect();
    let parts: Vec<Partial<F>> = tasks
        .into_par_iter()
        .map_init(
            || Fwd::new(group, hd, bq),
            |ws, (b, c)| {
                let (s, kvh, qb) = blocks[b];
                fwd_block(ws, q, qrow, kvh, qb, &keys(&s, kvh), c..c + 1);
                ws.partial()
            },
        )
        .collect();
    let mut first = Vec::with_capacity(blocks.len());
    let mut n = 0;
    for (_, _, qb) in &blocks {
        first.push(n);
        n += qb.chunks();
    }
    blocks.par_iter().zip(first).for_each_init(
        || Fwd::new(group, hd, bq),
        |ws, (&(_, kvh, qb), first)| {
            ws.start_merge(qb.nq);
            for p in &parts[first..first + qb.chunks()] {
                ws.fold(p);
            }
            // SAFETY: as above.
            unsafe { ws.write(qb, kvh, nh, outp, None) };
        },
    );
}

#[cfg(test)]
mod tests {
    use super::super::attention::tests::{naive_row, rel, rvec, to};
    use super::*;

    /// Sequences `(ctx_len, q_len)` with random K/V written into shuffled blocks of a pool.
    struct Case {
        g: KvGeom,
        dims: AttnDims,
        seqs: Vec<PagedSeq>,
        table: Vec<u32>,
        /// Per sequence, K and V `[ctx_len, n_kv_heads, hd]`.
        kv: Vec<(Vec<f64>, Vec<f64>)>,
        q: Vec<f64>,
        cache: Vec<f64>,
    }

    fn case(dims: AttnDims, block_size: usize, lens: &[(usize, usize)], seed: u64) -> Case {
        let kvrow = dims.n_kv_heads * dims.head_dim;
        let need: usize = lens.iter().map(|&(c, _)| c.div_ceil(block_size)).sum();
        let num_blocks = if (need + 3).is_multiple_of(7) { need + 4 } else { need + 3 };
        let g = KvGeom { num_blocks, block_size, n_kv_heads: dims.n_kv_heads, head_dim: dims.head_dim };
        // Blocks handed out in a scrambled order (7 is coprime with the pool sizes used).
        let order: Vec<u32> = (0..g.num_blocks).map(|i| ((i * 7 + 2) % g.num_blocks) as u32).collect();
        let mut cache = vec![0.0; g.layer_len()];
        let (mut seqs, mut table, mut kv) = (Vec::new(), Vec::new(), Vec::new());
        let (mut q_start, mut next) = (0, 0);
        for (n, &(ctx, q_len)) in lens.iter().enumerate() {
            let table_start = table.len();
            table.extend_from_slice(&order[next..next + ctx.div_ceil(block_size)]);
            next += ctx.div_ceil(block_size);
            let (k, v) = (rvec(seed + 10 * n as u64, ctx * kvrow, 2.0), rvec(seed + 10 * n as u64 + 1, ctx * kvrow, 1.0));
            let slots: Vec<u32> = (0..ctx).map(|t| table[table_start + t / block_size] * block_size as u32 + (t % block_size) as u32).collect();
            write(&mut cache, &k, &v, &slots, g);
            kv.push((k, v));
            seqs.push(PagedSeq { q_start, q_len, ctx_len: ctx, table_start });
            q_start += q_len;
        }
        let q = rvec(seed + 999, q_start * dims.n_heads * dims.head_dim, 2.0);
        Case { g, dims, seqs, table, kv, q, cache }
    }

    fn naive(c: &Case) -> Vec<f64> {
        let (hd, nh, nkv) = (c.dims.head_dim, c.dims.n_heads, c.dims.n_kv_heads);
        let mut out = vec![0.0; c.q.len()];
        for (s, (k, v)) in c.seqs.iter().zip(&c.kv) {
            for j in 0..s.q_len {
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let seen = s.ctx_len - s.q_len + j + 1;
                    let ks: Vec<&[f64]> = (0..seen).map(|t| &k[(t * nkv + kvh) * hd..][..hd]).collect();
                    let vs: Vec<&[f64]> = (0..seen).map(|t| &v[(t * nkv + kvh) * hd..][..hd]).collect();
                    let o = ((s.q_start + j) * nh + h) * hd;
                    out[o..o + hd].copy_from_slice(&naive_row(&c.q[o..o + hd], &ks, &vs).0);
                }
            }
        }
        out
    }

    fn run<F: Elem>(c: &Case, run: Run) -> Vec<F> {
        let mut out = vec![F::nan(); c.q.len()];
        attention_with(&to::<F>(&c.q), &to::<F>(&c.cache), &c.seqs, &c.table, c.g, c.dims, &mut out, run);
        out
    }

    const DIMS: [AttnDims; 2] = [AttnDims { n_heads: 6, n_kv_heads: 2, head_dim: 64 }, AttnDims { n_heads: 2, n_kv_heads: 2, head_dim: 24 }];

    /// Contexts crossing block and chunk boundaries, decode (q_len 1) and prefill chunks
    /// (q_len > 1, also a whole prompt), block sizes 16 and 3; serial, or on rayon split by
    /// key chunks or not: f64 within 1e-12 of the naive softmax, f32 within 1e-5 (relative to
    /// the largest output; seen: 5e-7), and the bits equal every way.
    #[test]
    fn paged_attention_matches_naive() {
        let lens = [(1, 1), (17, 1), (300, 1), (600, 1), (45, 45), (70, 13), (531, 40)];
        for dims in DIMS {
            for bs in [16, 3] {
                let c = case(dims, bs, &lens, bs as u64);
                let want = naive(&c);
                for how in [Run::Serial, Run::Whole, Run::Split] {
                    let e = rel(&run::<f64>(&c, how), &want);
                    assert!(e < 1e-12, "f64 {dims:?} block {bs} {how:?}: {e:e}");
                    let e = rel(&run::<f32>(&c, how), &want);
                    assert!(e < 1e-5, "f32 {dims:?} block {bs} {how:?}: {e:e}");
                }
                let bits = |x: Vec<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let whole = bits(run::<f32>(&c, Run::Whole));
                assert!(whole == bits(run::<f32>(&c, Run::Split)), "split vs unsplit bits, block {bs}");
                assert!(whole == bits(run::<f32>(&c, Run::Serial)), "serial vs rayon bits, block {bs}");
            }
        }
    }

    /// One sequence of 400 tokens three ways: a whole-prompt prefill, one-token decode steps
    /// (block size 16), prefill chunks of 37 (block size 3), and through `attention::forward`
    /// as a packed sequence: the same bits for every query.
    #[test]
    fn a_query_gets_the_same_bits_however_it_is_batched() {
        let dims = DIMS[0];
        let (n, nh, hd) = (400, dims.n_heads, dims.head_dim);
        let qrow = nh * hd;
        let whole = case(dims, 16, &[(n, n)], 5);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let prefill = bits(&run::<f32>(&whole, Run::Whole));
        let mut steps: Vec<f32> = Vec::new();
        for ctx in 1..=n {
            let mut c = case(dims, 16, &[(ctx, 1)], 5);
            c.q = whole.q[(ctx - 1) * qrow..ctx * qrow].to_vec();
            steps.extend(run::<f32>(&c, [Run::Serial, Run::Whole, Run::Split][ctx % 3]));
        }
        assert!(bits(&steps) == prefill, "decode steps vs prefill");
        let mut chunks: Vec<f32> = Vec::new();
        for c0 in (0..n).step_by(37) {
            let c1 = (c0 + 37).min(n);
            let mut c = case(dims, 3, &[(c1, c1 - c0)], 5);
            c.q = whole.q[c0 * qrow..c1 * qrow].to_vec();
            chunks.extend(run::<f32>(&c, Run::Whole));
        }
        assert!(bits(&chunks) == prefill, "prefill chunks vs whole prefill");
        let (k, v) = (to::<f32>(&whole.kv[0].0), to::<f32>(&whole.kv[0].1));
        let (mut out, mut lse) = (vec![0.0f32; n * qrow], vec![0.0f32; n * nh]);
        super::super::attention::forward(&to::<f32>(&whole.q), &k, &v, &crate::backend::AttnLayout::sequences(&[n]), dims, &mut out, &mut lse);
        assert!(bits(&out) == prefill, "packed forward vs paged");
    }
}
