//! The paged KV cache ops on the CPU: writing new K/V rows into their slots, copying blocks
//! (copy-on-write of a shared tail), and attention of new queries against the blocks of each
//! sequence. The reference for the CUDA paged decode-attention kernel. Attention gathers a
//! sequence's keys of one KV head from its blocks into a contiguous `[ctx_len, head_dim]`
//! block and then computes exactly as `attention::forward` does (GEMM scores, masked row
//! softmax, GEMM with V), so cached and uncached logits agree to rounding.

use super::{cast, gemm_strided, Elem, SendPtr};
use crate::backend::{AttnDims, KvGeom, PagedSeq};
use rayon::prelude::*;

/// Offset of `cache[block, kv, head, 0, 0]` in one layer's buffer (kv: 0 = keys, 1 = values).
#[inline]
fn base(g: KvGeom, block: usize, kv: usize, head: usize) -> usize {
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

/// Keys (kv = 0) or values (kv = 1) of one KV head of a sequence, `[ctx_len, head_dim]`.
fn gather<F: Elem>(cache: &[F], table: &[u32], ctx_len: usize, kv: usize, head: usize, g: KvGeom) -> Vec<F> {
    let hd = g.head_dim;
    let mut out = Vec::with_capacity(ctx_len * hd);
    let mut left = ctx_len;
    for &b in table {
        if left == 0 {
            break;
        }
        let n = left.min(g.block_size);
        let o = base(g, b as usize, kv, head);
        out.extend_from_slice(&cache[o..o + n * hd]);
        left -= n;
    }
    assert_eq!(left, 0, "paged_attention: block table shorter than ctx_len");
    out
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
    let (hd, nh) = (dims.head_dim, dims.n_heads);
    let group = nh / dims.n_kv_heads;
    let qrow = nh * hd;
    let scale: F = cast(1.0 / (hd as f64).sqrt());
    for s in seqs {
        assert!(s.q_len <= s.ctx_len, "paged_attention: more queries than keys");
        assert!((s.q_start + s.q_len) * qrow <= q.len() && out.len() >= q.len(), "paged_attention: q/out too short");
    }
    let outp = SendPtr(out.as_mut_ptr());
    let tasks: Vec<(PagedSeq, usize)> = seqs
        .iter()
        .filter(|s| s.q_len > 0)
        .flat_map(|s| (0..dims.n_kv_heads).map(move |h| (*s, h)))
        .collect();
    tasks.into_par_iter().for_each(|(s, kvh)| {
        let nblocks = s.ctx_len.div_ceil(g.block_size);
        let table = &block_table[s.table_start..s.table_start + nblocks];
        let kg = gather(cache, table, s.ctx_len, 0, kvh, g); // [ctx_len, hd]
        let vg = gather(cache, table, s.ctx_len, 1, kvh, g); // [ctx_len, hd]
        let nk = s.ctx_len;
        let past = s.ctx_len - s.q_len;
        for h in kvh * group..(kvh + 1) * group {
            let mut p = vec![F::zero(); s.q_len * nk]; // [q_len, ctx_len] scores, then probs
            unsafe {
                gemm_strided(
                    s.q_len, nk, hd,
                    p.as_mut_ptr(), nk as isize, 1, false,
                    q.as_ptr().add(s.q_start * qrow + h * hd), qrow as isize, 1,
                    kg.as_ptr(), 1, hd as isize,
                    scale, false,
                );
            }
            for j in 0..s.q_len {
                let row = &mut p[j * nk..(j + 1) * nk];
                for x in &mut row[past + j + 1..] {
                    *x = F::neg_infinity();
                }
                let m = row.iter().fold(F::neg_infinity(), |a, &b| a.max(b));
                let mut sum = F::zero();
                for x in row.iter_mut() {
                    *x = (*x - m).exp();
                    sum += *x;
                }
                for x in row.iter_mut() {
                    *x = *x / sum;
                }
            }
            // Disjoint: each (query token, head) row of out is written by one task.
            unsafe {
                gemm_strided(
                    s.q_len, hd, nk,
                    outp.get().add(s.q_start * qrow + h * hd), qrow as isize, 1, false,
                    p.as_ptr(), nk as isize, 1,
                    vg.as_ptr(), hd as isize, 1,
                    F::one(), false,
                );
            }
        }
    });
}
