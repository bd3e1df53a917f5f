//! The prefill chunks of a paged-attention call on tensor cores (`Precision::Bf16`:
//! paged_attn_mma in kernels/kv_cache.cu, routed by `paged_attention_split` in
//! src/backend/cuda/mod.rs), on the PTX simulator:
//! - parity against an f64 host reference on the same bf16 values (queries rounded RNE as the
//!   kernel stages them, K/V as the bf16 cache holds them), several sequences in one call
//!   (prefill chunks with q_len not a multiple of 16, ctx_len not a multiple of the block size,
//!   q_len == ctx_len, beside decode rows that still go to paged_decode), GQA and MHA, head dims
//!   64 and two odd ones; and the same cache read by the fp32 path (precision switched back:
//!   paged_attn) against the reference on the unrounded queries;
//! - an fp32 cache read under bf16 (K/V rounded when staged);
//! - the tensor-core share of one prefill chunk's matmul FLOPs.
//!
//! Without NVRTC: skip notice, or fail under CI=true.

mod common;

use common::{sim_with, Rng};
use ipo::backend::cuda::{CudaBackend, Precision, Sim};
use ipo::backend::{AttnDims, Backend, KvGeom, PagedSeq};

/// Unit roundoff of bf16 (round-to-nearest-even, 8-bit significand).
const U: f64 = 1.0 / 256.0;

fn r16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Launches of kernel `name` so far.
fn launches(be: &CudaBackend<Sim>, name: &str) -> u64 {
    be.gpu().stats().iter().find(|s| s.0 == name).map_or(0, |s| s.1)
}

/// A cache of `geom` with every slot written (kv_write) from random fp32 K/V, and the host
/// copy of what it holds: `[layer_len]` in the cache layout (bf16-rounded for a bf16 cache).
fn filled_cache(be: &CudaBackend<Sim>, r: &mut Rng, geom: KvGeom) -> (<CudaBackend<Sim> as Backend>::Buf, Vec<f32>) {
    let (n_slots, row) = (geom.num_blocks * geom.block_size, geom.n_kv_heads * geom.head_dim);
    let layer_len = n_slots * 2 * row; // [num_blocks, 2, n_kv, block_size, head_dim]
    // slots in a shuffled order, so token t of k/v [n_slots, n_kv, head_dim] lands in slot slots[t]
    let mut slots: Vec<u32> = (0..n_slots as u32).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, r.below(i + 1));
    }
    let (k, v) = (r.vec(n_slots * row, 1.0), r.vec(n_slots * row, 1.0));
    let mut cache = be.kv_alloc(layer_len);
    be.kv_write(&mut cache, &be.upload(&k), &be.upload(&v), &slots, geom);
    let round = |x: f32| if be.precision() == Precision::Bf16 { r16(x) } else { x };
    let mut host = vec![f32::NAN; layer_len];
    for (t, &slot) in slots.iter().enumerate() {
        let (blk, off) = (slot as usize / geom.block_size, slot as usize % geom.block_size);
        for h in 0..geom.n_kv_heads {
            for d in 0..geom.head_dim {
                let kb = ((blk * 2 * geom.n_kv_heads + h) * geom.block_size + off) * geom.head_dim + d;
                host[kb] = round(k[(t * geom.n_kv_heads + h) * geom.head_dim + d]);
                host[kb + geom.n_kv_heads * geom.block_size * geom.head_dim] = round(v[(t * geom.n_kv_heads + h) * geom.head_dim + d]);
            }
        }
    }
    (cache, host)
}

/// Sequences of `(q_len, ctx_len)` over random distinct blocks: the sequences, their block
/// table and the number of query rows.
fn paged_seqs(r: &mut Rng, geom: KvGeom, shapes: &[(usize, usize)]) -> (Vec<PagedSeq>, Vec<u32>, usize) {
    let (mut seqs, mut table, mut q0) = (Vec::new(), Vec::new(), 0);
    for &(ql, ctx) in shapes {
        let mut blocks: Vec<u32> = (0..geom.num_blocks as u32).collect();
        for i in (1..blocks.len()).rev() {
            blocks.swap(i, r.below(i + 1));
        }
        seqs.push(PagedSeq { q_start: q0, q_len: ql, ctx_len: ctx, table_start: table.len() });
        table.extend_from_slice(&blocks[..ctx.div_ceil(geom.block_size)]);
        q0 += ql;
    }
    (seqs, table, q0)
}

/// Per output element of query row (token, head): the f64 reference on `q` (as given) and
/// the cache's values, and the bound of a tensor-core result on the same bf16 values:
/// scores as bf16 products (exact in fp32) summed in fp32 move each score by at most
/// E = scale (hd + 8) 2^-24 max_k sum_d |q_d k_d| (both orders of summation, and the scaling),
/// so softmax weights by a factor within e^{+-2E}; P rounded to bf16 for PV moves each
/// numerator weight by a factor within 1 +- u (the denominator sums the unrounded fp32 P);
/// with B_d = sum_k p_k |v_kd|: |out - ref| <= B_d (e^{2E} (1 + u) - 1 + 2^-16) + 2^-20 (the
/// last two terms cover fp32 exp, the rescaling of the running sums and the final divide), as
/// the attention_bf16 parity bound (src/backend/cuda/parity.rs) less its input roundings.
fn reference(q: &[f32], cache: &[f32], seqs: &[PagedSeq], table: &[u32], geom: KvGeom, dims: AttnDims) -> (Vec<f64>, Vec<f64>) {
    let (nh, nkv, hd, bs) = (dims.n_heads, dims.n_kv_heads, dims.head_dim, geom.block_size);
    let scale = 1.0 / (hd as f64).sqrt();
    let rows = seqs.iter().map(|s| s.q_start + s.q_len).max().unwrap_or(0);
    let (mut want, mut bound) = (vec![f64::NAN; rows * nh * hd], vec![f64::NAN; rows * nh * hd]);
    for s in seqs {
        for j in 0..s.q_len {
            let nk = s.ctx_len - s.q_len + j + 1;
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qo = ((s.q_start + j) * nh + h) * hd;
                let kv_row = |kk: usize| ((table[s.table_start + kk / bs] as usize * 2 * nkv + kvh) * bs + kk % bs) * hd;
                let vo = nkv * bs * hd;
                let mut sc = Vec::with_capacity(nk);
                let mut e = 0f64;
                for kk in 0..nk {
                    let kr = kv_row(kk);
                    let (mut dot, mut abs) = (0f64, 0f64);
                    for d in 0..hd {
                        let p = q[qo + d] as f64 * cache[kr + d] as f64;
                        dot += p;
                        abs += p.abs();
                    }
                    sc.push(scale * dot);
                    e = e.max(scale * (hd + 8) as f64 * 2f64.powi(-24) * abs);
                }
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                let l: f64 = w.iter().sum();
                let f = (2.0 * e).exp() * (1.0 + U) - 1.0 + 2f64.powi(-16);
                for d in 0..hd {
                    let (mut o, mut b) = (0f64, 0f64);
                    for (kk, &p) in w.iter().enumerate() {
                        let vx = cache[kv_row(kk) + vo + d] as f64;
                        o += p / l * vx;
                        b += p / l * vx.abs();
                    }
                    want[qo + d] = o;
                    bound[qo + d] = b * f + 2f64.powi(-20);
                }
            }
        }
    }
    (want, bound)
}

/// Largest `|got - want| / bound` over the rows of `seqs` (infinite for a NaN).
fn max_ratio(got: &[f32], want: &[f64], bound: impl Fn(usize) -> f64, seqs: &[PagedSeq], row: usize) -> f64 {
    let mut worst = 0f64;
    for s in seqs {
        for i in s.q_start * row..(s.q_start + s.q_len) * row {
            let d = (got[i] as f64 - want[i]).abs();
            worst = if d.is_nan() { f64::INFINITY } else { worst.max(d / bound(i)) };
        }
    }
    worst
}

/// fp32 arithmetic only (decode rows, and every row of the fp32 path): the parity table's
/// paged_attention tolerance, absolute (|v| <= 1).
const F32_TOL: f64 = 2e-6;

#[test]
fn prefill_chunks_on_tensor_cores_match_an_f64_reference() {
    let Some(be) = sim_with(Precision::Bf16) else { return };
    let mut r = Rng(0x9a6ed);
    // (geometry, heads, sequences (q_len, ctx_len) in one call): prefill chunks with q_len
    // not a multiple of 16 and ctx_len not a multiple of the block size, q_len == ctx_len, a
    // chunk of more than one tile, beside decode rows (q_len 1, paged_decode).
    let cases: [(KvGeom, usize, &[(usize, usize)]); 4] = [
        (KvGeom { num_blocks: 12, block_size: 16, n_kv_heads: 2, head_dim: 64 }, 8, &[(37, 50), (1, 45), (20, 20), (70, 133), (1, 3)]),
        (KvGeom { num_blocks: 12, block_size: 16, n_kv_heads: 3, head_dim: 64 }, 3, &[(1, 70), (17, 17), (66, 101)]),
        (KvGeom { num_blocks: 20, block_size: 5, n_kv_heads: 1, head_dim: 24 }, 3, &[(2, 9), (1, 33), (41, 97), (12, 12)]),
        (KvGeom { num_blocks: 10, block_size: 7, n_kv_heads: 2, head_dim: 80 }, 10, &[(33, 40), (1, 61), (5, 8)]),
    ];
    for (geom, nh, shapes) in cases {
        let dims = AttnDims { n_heads: nh, n_kv_heads: geom.n_kv_heads, head_dim: geom.head_dim };
        let name = format!("h{nh}/{} hd{} bs{} {shapes:?}", geom.n_kv_heads, geom.head_dim, geom.block_size);
        be.set_precision(Precision::Bf16);
        let (cache, host) = filled_cache(&be, &mut r, geom);
        let (seqs, table, rows) = paged_seqs(&mut r, geom, shapes);
        let row = nh * geom.head_dim;
        let q = r.vec(rows * row, 1.0);
        let q16: Vec<f32> = q.iter().map(|&x| r16(x)).collect();
        let (prefill, decode): (Vec<PagedSeq>, Vec<PagedSeq>) = seqs.iter().partition(|s| s.q_len > 1);
        let qd = be.upload(&q);
        let run = || {
            let mut out = be.upload(&vec![f32::NAN; rows * row]);
            be.paged_attention(&qd, &cache, &seqs, &table, geom, dims, &mut out);
            be.download(&out)
        };
        let (mma0, attn0) = (launches(&be, "paged_attn_mma"), launches(&be, "paged_attn"));
        let got = run();
        assert_eq!((launches(&be, "paged_attn_mma") - mma0, launches(&be, "paged_attn") - attn0), (1, 0), "{name}: bf16 prefill goes to paged_attn_mma");
        assert!(got.iter().all(|x| x.is_finite()), "{name}: a row left unwritten or non-finite");
        let (want16, bound16) = reference(&q16, &host, &seqs, &table, geom, dims);
        let (want32, _) = reference(&q, &host, &seqs, &table, geom, dims);
        let e_mma = max_ratio(&got, &want16, |i| bound16[i], &prefill, row);
        let e_dec = max_ratio(&got, &want32, |_| F32_TOL, &decode, row);
        // How far the tensor-core rows are from the fp32 math on the unrounded queries (the
        // query and P roundings): they must have moved, or the fp32 kernel ran.
        let moved = max_ratio(&got, &want32, |_| 1.0, &prefill, row);
        let abs16 = max_ratio(&got, &want16, |_| 1.0, &prefill, row);
        eprintln!("{name}: tensor-core rows max |d| {abs16:.2e} = {e_mma:.3} of the bound (vs unrounded q: {moved:.2e}); decode rows {:.2e}", e_dec * F32_TOL);
        assert!(e_mma <= 1.0, "{name}: prefill rows at {e_mma} of the bf16 bound");
        assert!(e_dec <= 1.0, "{name}: decode rows at {} (fp32 tolerance {F32_TOL})", e_dec * F32_TOL);
        assert!(moved > 1e-4, "{name}: the prefill rows equal fp32 math on unrounded queries ({moved:.2e})");

        // The same cache in fp32 precision: paged_attn (fp32 math on the bf16 K/V), every row
        // within the fp32 tolerance of the reference on the unrounded queries.
        be.set_precision(Precision::F32);
        let (mma0, attn0) = (launches(&be, "paged_attn_mma"), launches(&be, "paged_attn"));
        let plain = run();
        assert_eq!((launches(&be, "paged_attn_mma") - mma0, launches(&be, "paged_attn") - attn0), (0, 1), "{name}: fp32 prefill goes to paged_attn");
        let e32 = max_ratio(&plain, &want32, |_| F32_TOL, &seqs, row);
        assert!(e32 <= 1.0, "{name}: fp32 path at {} (tolerance {F32_TOL})", e32 * F32_TOL);
    }
}

/// An fp32 cache (made before the precision switched to bf16) read by paged_attn_mma: K/V
/// rounded RNE as they are staged, so the same bound against the reference on bf16-rounded
/// q, K and V.
#[test]
fn an_fp32_cache_is_rounded_when_staged() {
    let Some(be) = sim_with(Precision::F32) else { return };
    let mut r = Rng(0xf32c);
    let geom = KvGeom { num_blocks: 8, block_size: 8, n_kv_heads: 2, head_dim: 24 };
    let dims = AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 24 };
    let (cache, host) = filled_cache(&be, &mut r, geom);
    be.set_precision(Precision::Bf16);
    let (seqs, table, rows) = paged_seqs(&mut r, geom, &[(19, 29), (1, 12), (6, 6)]);
    let row = dims.n_heads * dims.head_dim;
    let q = r.vec(rows * row, 1.0);
    let mut out = be.upload(&vec![f32::NAN; rows * row]);
    let mma0 = launches(&be, "paged_attn_mma");
    be.paged_attention(&be.upload(&q), &cache, &seqs, &table, geom, dims, &mut out);
    assert_eq!(launches(&be, "paged_attn_mma") - mma0, 1);
    let got = be.download(&out);
    let q16: Vec<f32> = q.iter().map(|&x| r16(x)).collect();
    let host16: Vec<f32> = host.iter().map(|&x| r16(x)).collect();
    let (want16, bound16) = reference(&q16, &host16, &seqs, &table, geom, dims);
    let (prefill, decode): (Vec<PagedSeq>, Vec<PagedSeq>) = seqs.iter().partition(|s| s.q_len > 1);
    let e = max_ratio(&got, &want16, |i| bound16[i], &prefill, row);
    let (want32, _) = reference(&q, &host, &seqs, &table, geom, dims);
    let e_dec = max_ratio(&got, &want32, |_| F32_TOL, &decode, row);
    eprintln!("fp32 cache under bf16: prefill rows at {e:.3} of the bound, decode rows {:.2e}", e_dec * F32_TOL);
    assert!(e <= 1.0 && e_dec <= 1.0, "prefill {e}, decode {e_dec}");
}

/// Tensor-core share: one prefill chunk of 128 new queries on a context of 320 (4 heads, 2 KV
/// heads, head_dim 64, blocks of 16): the mma.sync m16n8k16 instructions of paged_attn_mma,
/// times 4096 FLOPs each, cover at least 95% of the analytical matmul FLOPs 2 (Q K^T and P V)
/// x 2 x head_dim x visible (query, key) pairs x heads. They exceed it by the masked parts of
/// the 32-key tiles each warp's last queries reach; pinned below 1.25, so a tile change that
/// wastes tensor-core work fails here.
#[test]
fn prefill_runs_its_matmuls_on_tensor_cores() {
    let Some(be) = sim_with(Precision::Bf16) else { return };
    let mut r = Rng(0x3a5e);
    let geom = KvGeom { num_blocks: 24, block_size: 16, n_kv_heads: 2, head_dim: 64 };
    let dims = AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 64 };
    let (ql, ctx) = (128, 320);
    let (cache, _) = filled_cache(&be, &mut r, geom);
    let (seqs, table, rows) = paged_seqs(&mut r, geom, &[(ql, ctx)]);
    let q = be.upload(&r.vec(rows * dims.n_heads * dims.head_dim, 1.0));
    let tensor = || -> u64 { be.gpu().stats().iter().filter(|(n, _, _)| n == "paged_attn_mma").map(|(_, _, s)| s.by_class[ptxsim::Class::Tensor as usize]).sum() };
    let before = tensor();
    let mut out = be.zeros(rows * dims.n_heads * dims.head_dim);
    be.paged_attention(&q, &cache, &seqs, &table, geom, dims, &mut out);
    let mma_flops = ((tensor() - before) / 32) as f64 * 4096.0;
    let pairs: usize = (0..ql).map(|j| ctx - ql + j + 1).sum();
    let analytical = 2.0 * 2.0 * dims.head_dim as f64 * pairs as f64 * dims.n_heads as f64;
    let share = mma_flops / analytical;
    eprintln!("paged_attn_mma: {mma_flops:.3e} tensor-core FLOPs / {analytical:.3e} analytical matmul FLOPs = {share:.3}");
    assert!(share >= 0.95, "tensor-core share {share:.3}");
    assert!(share <= 1.25, "tensor-core share {share:.3}: more tensor-core work than the tiles need");
}
