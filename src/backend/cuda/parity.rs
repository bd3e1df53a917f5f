//! Per-op parity of `CudaBackend<G>` against the CPU reference `CpuBackend<f32>` on seeded
//! random inputs (never zeros) at several shapes, odd sizes included. Overwritten outputs
//! are poisoned with NaN first, so an element a kernel forgets to write fails the check.
//! Used by tests/cuda_sim_ops.rs (on `Sim`) and `ipo selftest` (on `Sim` or a real GPU).
//!
//! Error measure: `max_i |gpu_i - cpu_i| / max(1, max_i |cpu_i|)` per output tensor (NaN
//! counts as infinite error). Tolerances (`tol` of each op below): 0 where the kernel does
//! the CPU's arithmetic in the CPU's order (copies, gathers, ordered sums); otherwise a few
//! f32 roundings of the reduction length, since the kernels sum in a different order (and
//! use fused multiply-adds) than the CPU's GEMMs and rayon reductions.

use super::{CudaBackend, Gpu};
use crate::backend::cpu::CpuBackend;
use crate::backend::{AttnDims, AttnLayout, Backend, KvGeom, PagedSeq, Span};

/// One line of the parity table.
#[derive(Clone, Debug)]
pub struct Row {
    pub op: String,
    pub shape: String,
    pub max_err: f64,
    pub tol: f64,
}

impl Row {
    pub fn pass(&self) -> bool {
        self.max_err <= self.tol
    }
}

/// Every op with a parity check, in table order.
pub const OPS: &[&str] = &[
    "matmul", "add_assign", "embedding", "embedding_bwd", "rmsnorm", "rmsnorm_bwd", "bias_add", "bias_bwd", "rope", "swiglu",
    "swiglu_bwd", "attention", "attention_bwd", "lm_head_logprobs", "lm_head_bwd", "kv_write", "kv_copy_blocks", "paged_attention",
    "sample",
    "sum_squares", "adamw", "sgd", "sum_squares_many",
    "segment_dpo",
    "matmul_bf16", "attention_bf16",
];

/// SplitMix64 with normals (Box-Muller): seeded and reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * scale) as f32
            })
            .collect()
    }
    fn below(&mut self, n: usize) -> u32 {
        (self.next() % n as u64) as u32
    }
    fn ids(&mut self, n: usize, below: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(below)).collect()
    }
}

fn max_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    assert_eq!(gpu.len(), cpu.len());
    let scale = cpu.iter().fold(1f64, |m, &x| m.max((x as f64).abs()));
    gpu.iter().zip(cpu).fold(0f64, |m, (&a, &b)| if a.is_nan() || b.is_nan() { f64::INFINITY } else { m.max((a as f64 - b as f64).abs() / scale) })
}

struct Ctx<'a, G: Gpu> {
    gpu: &'a CudaBackend<G>,
    cpu: CpuBackend<f32>,
    rows: Vec<Row>,
}

impl<G: Gpu> Ctx<'_, G> {
    fn row(&mut self, op: &str, shape: String, gpu: &<CudaBackend<G> as Backend>::Buf, cpu: &[f32], tol: f64) {
        let g = self.gpu.download(gpu);
        self.rows.push(Row { op: op.to_string(), shape, max_err: max_err(&g, cpu), tol });
    }
    fn nan(&self, n: usize) -> <CudaBackend<G> as Backend>::Buf {
        self.gpu.upload(&vec![f32::NAN; n])
    }
}

fn layouts() -> Vec<(&'static str, AttnLayout)> {
    let pair = |c0: usize, n: usize, a: usize, b: usize| {
        vec![
            Span { start: c0, len: n, prefix_start: c0, prefix_len: 0 },
            Span { start: c0 + n, len: a, prefix_start: c0, prefix_len: n },
            Span { start: c0 + n + a, len: b, prefix_start: c0, prefix_len: n },
        ]
    };
    let mut pairs = pair(0, 6, 4, 3);
    pairs.extend(pair(13, 35, 5, 2));
    vec![("seqs [5, 1, 9]", AttnLayout::sequences(&[5, 1, 9])), ("seq [41]", AttnLayout::sequences(&[41])), ("pairs (6|4|3) (35|5|2)", AttnLayout { spans: pairs })]
}

/// Runs the parity check of `op` at its shapes; panics on an unknown op name.
pub fn check_op<G: Gpu>(gpu: &CudaBackend<G>, op: &str, seed: u64) -> Vec<Row> {
    let mut c = Ctx { gpu, cpu: CpuBackend::new(), rows: Vec::new() };
    let mut r = Rng(seed);
    match op {
        "matmul" => {
            for (m, n, k) in [(1, 1, 1), (7, 5, 3), (33, 17, 29)] {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    for acc in [false, true] {
                        let (a, b) = (r.vec(m * k, 1.0), r.vec(k * n, 1.0));
                        let c0 = if acc { r.vec(m * n, 1.0) } else { vec![f32::NAN; m * n] };
                        let mut cc = if acc { c0.clone() } else { vec![0.0; m * n] };
                        c.cpu.matmul(&a, ta, &b, tb, &mut cc, m, n, k, acc);
                        let mut cg = c.gpu.upload(&c0);
                        c.gpu.matmul(&c.gpu.upload(&a), ta, &c.gpu.upload(&b), tb, &mut cg, m, n, k, acc);
                        c.row(op, format!("m{m} n{n} k{k} ta{} tb{} acc{}", ta as u8, tb as u8, acc as u8), &cg, &cc, 1e-6);
                    }
                }
            }
        }
        "add_assign" => {
            for n in [1, 1000] {
                let (x, y) = (r.vec(n, 1.0), r.vec(n, 1.0));
                let mut xc = x.clone();
                c.cpu.add_assign(&mut xc, &y);
                let mut xg = c.gpu.upload(&x);
                c.gpu.add_assign(&mut xg, &c.gpu.upload(&y));
                c.row(op, format!("n{n}"), &xg, &xc, 0.0);
            }
        }
        "embedding" | "embedding_bwd" => {
            for (vocab, dim, t) in [(13, 7, 9), (50, 33, 40)] {
                let (table, ids, d) = (r.vec(vocab * dim, 1.0), r.ids(t, vocab), r.vec(t * dim, 1.0));
                if op == "embedding" {
                    let mut oc = vec![0.0; t * dim];
                    c.cpu.embedding(&table, &ids, dim, &mut oc);
                    let mut og = c.nan(t * dim);
                    c.gpu.embedding(&c.gpu.upload(&table), &ids, dim, &mut og);
                    c.row(op, format!("vocab{vocab} dim{dim} tokens{t}"), &og, &oc, 0.0);
                } else {
                    let mut tc = table.clone();
                    c.cpu.embedding_bwd(&d, &ids, dim, &mut tc);
                    let mut tg = c.gpu.upload(&table);
                    c.gpu.embedding_bwd(&c.gpu.upload(&d), &ids, dim, &mut tg);
                    c.row(op, format!("vocab{vocab} dim{dim} tokens{t}"), &tg, &tc, 0.0);
                }
            }
        }
        "rmsnorm" | "rmsnorm_bwd" => {
            for (rows, dim) in [(3, 7), (5, 64), (2, 300)] {
                let (x, w, dy) = (r.vec(rows * dim, 1.0), r.vec(dim, 1.0), r.vec(rows * dim, 1.0));
                let (mut oc, mut rc) = (vec![0.0; rows * dim], vec![0.0; rows]);
                c.cpu.rmsnorm(&x, &w, dim, 1e-5, &mut oc, &mut rc);
                let (xg, wg) = (c.gpu.upload(&x), c.gpu.upload(&w));
                let (mut og, mut rg) = (c.nan(rows * dim), c.nan(rows));
                c.gpu.rmsnorm(&xg, &wg, dim, 1e-5, &mut og, &mut rg);
                let shape = format!("rows{rows} dim{dim}");
                if op == "rmsnorm" {
                    c.row("rmsnorm.out", shape.clone(), &og, &oc, 2e-6);
                    c.row("rmsnorm.rstd", shape, &rg, &rc, 2e-6);
                } else {
                    let dw0 = r.vec(dim, 1.0);
                    let (mut dxc, mut dwc) = (vec![0.0; rows * dim], dw0.clone());
                    c.cpu.rmsnorm_bwd(&dy, &x, &w, &rc, dim, &mut dxc, &mut dwc);
                    let (mut dxg, mut dwg) = (c.nan(rows * dim), c.gpu.upload(&dw0));
                    c.gpu.rmsnorm_bwd(&c.gpu.upload(&dy), &xg, &wg, &c.gpu.upload(&rc), dim, &mut dxg, &mut dwg);
                    c.row("rmsnorm_bwd.dx", shape.clone(), &dxg, &dxc, 2e-6);
                    c.row("rmsnorm_bwd.dw", shape, &dwg, &dwc, 2e-6);
                }
            }
        }
        "bias_add" | "bias_bwd" => {
            for (rows, dim) in [(4, 5), (9, 33)] {
                let (y, b) = (r.vec(rows * dim, 1.0), r.vec(dim, 1.0));
                if op == "bias_add" {
                    let mut yc = y.clone();
                    c.cpu.bias_add(&mut yc, &b, dim);
                    let mut yg = c.gpu.upload(&y);
                    c.gpu.bias_add(&mut yg, &c.gpu.upload(&b), dim);
                    c.row(op, format!("rows{rows} dim{dim}"), &yg, &yc, 0.0);
                } else {
                    let mut bc = b.clone();
                    c.cpu.bias_bwd(&y, dim, &mut bc);
                    let mut bg = c.gpu.upload(&b);
                    c.gpu.bias_bwd(&c.gpu.upload(&y), dim, &mut bg);
                    c.row(op, format!("rows{rows} dim{dim}"), &bg, &bc, 0.0);
                }
            }
        }
        "rope" => {
            for (t, nh, hd) in [(5, 3, 8), (7, 2, 12)] {
                let inv: Vec<f64> = (0..hd / 2).map(|i| 10000f64.powf(-2.0 * i as f64 / hd as f64)).collect();
                let pos = r.ids(t, 100);
                for inverse in [false, true] {
                    let x = r.vec(t * nh * hd, 1.0);
                    let mut xc = x.clone();
                    c.cpu.rope(&mut xc, &pos, nh, hd, &inv, inverse);
                    let mut xg = c.gpu.upload(&x);
                    c.gpu.rope(&mut xg, &pos, nh, hd, &inv, inverse);
                    c.row(op, format!("tokens{t} heads{nh} hd{hd} inverse{}", inverse as u8), &xg, &xc, 1e-6);
                }
            }
        }
        "swiglu" | "swiglu_bwd" => {
            for n in [7, 257] {
                let (g, u, d) = (r.vec(n, 2.0), r.vec(n, 1.0), r.vec(n, 1.0));
                let (gg, ug) = (c.gpu.upload(&g), c.gpu.upload(&u));
                if op == "swiglu" {
                    let mut oc = vec![0.0; n];
                    c.cpu.swiglu(&g, &u, &mut oc);
                    let mut og = c.nan(n);
                    c.gpu.swiglu(&gg, &ug, &mut og);
                    c.row(op, format!("n{n}"), &og, &oc, 1e-6);
                } else {
                    let (mut dgc, mut duc) = (vec![0.0; n], vec![0.0; n]);
                    c.cpu.swiglu_bwd(&d, &g, &u, &mut dgc, &mut duc);
                    let (mut dgg, mut dug) = (c.nan(n), c.nan(n));
                    c.gpu.swiglu_bwd(&c.gpu.upload(&d), &gg, &ug, &mut dgg, &mut dug);
                    c.row("swiglu_bwd.dgate", format!("n{n}"), &dgg, &dgc, 1e-6);
                    c.row("swiglu_bwd.dup", format!("n{n}"), &dug, &duc, 1e-6);
                }
            }
        }
        "attention" | "attention_bwd" => {
            for (lname, layout) in layouts() {
                for dims in [AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 8 }, AttnDims { n_heads: 3, n_kv_heads: 1, head_dim: 5 }] {
                    let t = layout.num_tokens();
                    let (nq, nk) = (t * dims.n_heads * dims.head_dim, t * dims.n_kv_heads * dims.head_dim);
                    let (q, k, v, d) = (r.vec(nq, 1.0), r.vec(nk, 1.0), r.vec(nk, 1.0), r.vec(nq, 1.0));
                    let (mut oc, mut lc) = (vec![0.0; nq], vec![0.0; t * dims.n_heads]);
                    c.cpu.attention(&q, &k, &v, &layout, dims, &mut oc, &mut lc);
                    let (qg, kg, vg) = (c.gpu.upload(&q), c.gpu.upload(&k), c.gpu.upload(&v));
                    let shape = format!("{lname} h{}/{} hd{}", dims.n_heads, dims.n_kv_heads, dims.head_dim);
                    if op == "attention" {
                        let (mut og, mut lg) = (c.nan(nq), c.nan(t * dims.n_heads));
                        c.gpu.attention(&qg, &kg, &vg, &layout, dims, &mut og, &mut lg);
                        c.row("attention.out", shape.clone(), &og, &oc, 2e-6);
                        c.row("attention.lse", shape, &lg, &lc, 2e-6);
                    } else {
                        let (mut dqc, mut dkc, mut dvc) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
                        c.cpu.attention_bwd(&d, &q, &k, &v, &oc, &lc, &layout, dims, &mut dqc, &mut dkc, &mut dvc);
                        let (mut dqg, mut dkg, mut dvg) = (c.nan(nq), c.nan(nk), c.nan(nk));
                        let (og, lg) = (c.gpu.upload(&oc), c.gpu.upload(&lc));
                        c.gpu.attention_bwd(&c.gpu.upload(&d), &qg, &kg, &vg, &og, &lg, &layout, dims, &mut dqg, &mut dkg, &mut dvg);
                        c.row("attention_bwd.dq", shape.clone(), &dqg, &dqc, 5e-6);
                        c.row("attention_bwd.dk", shape.clone(), &dkg, &dkc, 5e-6);
                        c.row("attention_bwd.dv", shape, &dvg, &dvc, 5e-6);
                    }
                }
            }
        }
        "lm_head_logprobs" | "lm_head_bwd" => {
            for (dim, vocab, t, n) in [(7, 11, 5, 6), (16, 97, 12, 20)] {
                let (h, w) = (r.vec(t * dim, 1.0), r.vec(vocab * dim, 0.7));
                let (rows, tg, dl) = (r.ids(n, t), r.ids(n, vocab), r.vec(n, 1.0));
                let (lpc, lsc) = c.cpu.lm_head_logprobs(&h, &w, dim, &rows, &tg);
                let (hg, wg) = (c.gpu.upload(&h), c.gpu.upload(&w));
                let shape = format!("dim{dim} vocab{vocab} tokens{t} rows{n}");
                if op == "lm_head_logprobs" {
                    let (lpg, lsg) = c.gpu.lm_head_logprobs(&hg, &wg, dim, &rows, &tg);
                    c.row("lm_head.logp", shape.clone(), &lpg, &lpc, 2e-6);
                    c.row("lm_head.lse", shape, &lsg, &lsc, 2e-6);
                } else {
                    let (dh0, dw0) = (r.vec(t * dim, 1.0), r.vec(vocab * dim, 1.0));
                    let (mut dhc, mut dwc) = (dh0.clone(), dw0.clone());
                    c.cpu.lm_head_bwd(&h, &w, dim, &rows, &tg, &lsc, &dl, &mut dhc, &mut dwc);
                    let (mut dhg, mut dwg) = (c.gpu.upload(&dh0), c.gpu.upload(&dw0));
                    c.gpu.lm_head_bwd(&hg, &wg, dim, &rows, &tg, &c.gpu.upload(&lsc), &dl, &mut dhg, &mut dwg);
                    c.row("lm_head_bwd.dh", shape.clone(), &dhg, &dhc, 2e-6);
                    c.row("lm_head_bwd.dw", shape, &dwg, &dwc, 2e-6);
                }
            }
        }
        "kv_write" | "kv_copy_blocks" | "paged_attention" => {
            for (geom, dims) in [
                (KvGeom { num_blocks: 24, block_size: 4, n_kv_heads: 2, head_dim: 8 }, AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 8 }),
                (KvGeom { num_blocks: 7, block_size: 3, n_kv_heads: 1, head_dim: 12 }, AttnDims { n_heads: 3, n_kv_heads: 1, head_dim: 12 }),
            ] {
                let cache = r.vec(geom.layer_len(), 1.0);
                let shape = format!("blocks{} bs{} kv{} hd{}", geom.num_blocks, geom.block_size, geom.n_kv_heads, geom.head_dim);
                let row = geom.n_kv_heads * geom.head_dim;
                match op {
                    "kv_write" => {
                        let t = 5;
                        let mut slots: Vec<u32> = (0..(geom.num_blocks * geom.block_size) as u32).collect();
                        for i in (1..slots.len()).rev() {
                            slots.swap(i, r.below(i + 1) as usize);
                        }
                        slots.truncate(t);
                        let (k, v) = (r.vec(t * row, 1.0), r.vec(t * row, 1.0));
                        let mut cc = cache.clone();
                        c.cpu.kv_write(&mut cc, &k, &v, &slots, geom);
                        let mut cg = c.gpu.upload(&cache);
                        c.gpu.kv_write(&mut cg, &c.gpu.upload(&k), &c.gpu.upload(&v), &slots, geom);
                        c.row(op, format!("{shape} tokens{t}"), &cg, &cc, 0.0);
                    }
                    "kv_copy_blocks" => {
                        let pairs = [(1u32, 3u32), (3, 5), (0, 2)];
                        let mut cc = cache.clone();
                        c.cpu.kv_copy_blocks(&mut cc, &pairs, geom);
                        let mut cg = c.gpu.upload(&cache);
                        c.gpu.kv_copy_blocks(&mut cg, &pairs, geom);
                        c.row(op, format!("{shape} pairs{}", pairs.len()), &cg, &cc, 0.0);
                    }
                    _ => {
                        // (q_len, ctx_len) per sequence; block tables are random distinct blocks.
                        let shapes: &[(usize, usize)] = if geom.num_blocks >= 24 { &[(3, 7), (1, 1), (2, 37), (5, 5)] } else { &[(1, 10), (4, 6)] };
                        let (mut seqs, mut table, mut q0) = (Vec::new(), Vec::new(), 0);
                        for &(ql, ctx) in shapes {
                            let mut blocks: Vec<u32> = (0..geom.num_blocks as u32).collect();
                            for i in (1..blocks.len()).rev() {
                                blocks.swap(i, r.below(i + 1) as usize);
                            }
                            seqs.push(PagedSeq { q_start: q0, q_len: ql, ctx_len: ctx, table_start: table.len() });
                            table.extend_from_slice(&blocks[..ctx.div_ceil(geom.block_size)]);
                            q0 += ql;
                        }
                        let nq = q0 * dims.n_heads * dims.head_dim;
                        let q = r.vec(nq, 1.0);
                        let mut oc = vec![0.0; nq];
                        c.cpu.paged_attention(&q, &cache, &seqs, &table, geom, dims, &mut oc);
                        let mut og = c.nan(nq);
                        c.gpu.paged_attention(&c.gpu.upload(&q), &c.gpu.upload(&cache), &seqs, &table, geom, dims, &mut og);
                        c.row(op, format!("{shape} seqs{}", seqs.len()), &og, &oc, 2e-6);
                    }
                }
            }
        }
        "segment_dpo" => {
            // Segment sums: both sides add f64 conversions of f32 log-probs in f64, in different
            // orders (CPU: row order; kernel: strided per thread, then a tree): within
            // len * 2^-53 of the sum of magnitudes, relative; tolerance 1e-12 (len <= 300).
            // dlogp: the same f64 formula on sums that agree to ~1e-13, one libm vs CUDA exp
            // (both within 1 ulp), rounded once to f32: at most 1 f32 ulp apart, 2^-23 relative.
            use crate::backend::{SegmentDpo, SegmentPair};
            for (n_pairs, max_len, sft) in [(1usize, 1usize, 0.0f64), (3, 17, 0.1), (9, 300, 1.0)] {
                let mut pairs = Vec::new();
                let mut rows = 0u32;
                for _ in 0..n_pairs {
                    let (a, b) = (1 + r.below(max_len), 1 + r.below(max_len));
                    let gap = r.below(3); // rows that belong to no segment (must get dlogp 0)
                    let rc = r.vec(2, 5.0); // reference sums: near the policy's, so z is O(1)
                    pairs.push(SegmentPair {
                        chosen_start: rows + gap, chosen_len: a, rejected_start: rows + gap + a, rejected_len: b,
                        ref_chosen: -(a as f64) * 2.0 + rc[0] as f64, ref_rejected: -(b as f64) * 2.0 + rc[1] as f64,
                    });
                    rows += gap + a + b;
                }
                let logp: Vec<f32> = r.vec(rows as usize, 1.0).iter().map(|x| -x.abs() - 0.05).collect();
                let h = SegmentDpo { beta: 0.1 + r.uniform(), sft_coef: sft, batch_pairs: n_pairs + 2, batch_chosen_tokens: rows as usize + 5 };
                let (sc, dc) = c.cpu.segment_dpo(&logp, &pairs, &h);
                let (sg, dg) = c.gpu.segment_dpo(&c.gpu.upload(&logp), &pairs, &h);
                let sum_err = sc.iter().zip(&sg).fold(0f64, |m, (a, b)| {
                    let e = ((a.0 - b.0).abs() / a.0.abs().max(1.0)).max((a.1 - b.1).abs() / a.1.abs().max(1.0));
                    if e.is_nan() { f64::INFINITY } else { m.max(e) }
                });
                let shape = format!("pairs{n_pairs} rows{rows} sft{sft}");
                c.rows.push(Row { op: op.to_string(), shape: format!("{shape} sums"), max_err: sum_err, tol: 1e-12 });
                let dg = c.gpu.download(&dg);
                let d_err = dc.iter().zip(&dg).fold(0f64, |m, (&a, &b)| {
                    if a.is_nan() || b.is_nan() || (a == 0.0) != (b == 0.0) { f64::INFINITY } else { m.max((a as f64 - b as f64).abs() / (a as f64).abs().max(1e-30)) }
                });
                c.rows.push(Row { op: op.to_string(), shape: format!("{shape} dlogp"), max_err: d_err, tol: f32::EPSILON as f64 });
            }
        }
        "sum_squares_many" => {
            // Must equal per-buffer sum_squares on the same backend bit for bit (same partials,
            // same host order: error 0), and the CPU's within sum_squares' tolerance.
            let sizes = [1usize, 0, 1000, 65537, 3];
            let hs: Vec<Vec<f32>> = sizes.iter().map(|&n| r.vec(n, 1.0)).collect();
            let ds: Vec<_> = hs.iter().map(|h| c.gpu.upload(h)).collect();
            let refs: Vec<_> = ds.iter().collect();
            let many = c.gpu.sum_squares_many(&refs);
            let one: Vec<f64> = ds.iter().map(|d| c.gpu.sum_squares(d)).collect();
            let exact = if many.len() == one.len() && many.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()) { 0.0 } else { f64::INFINITY };
            c.rows.push(Row { op: op.to_string(), shape: format!("sizes {sizes:?} vs per-buffer"), max_err: exact, tol: 0.0 });
            let cpu: Vec<f64> = hs.iter().map(|h| c.cpu.sum_squares(h)).collect();
            let err = cpu.iter().zip(&many).fold(0f64, |m, (a, b)| if b.is_finite() { m.max((a - b).abs() / a.max(1.0)) } else { f64::INFINITY });
            c.rows.push(Row { op: op.to_string(), shape: format!("sizes {sizes:?} vs cpu"), max_err: err, tol: 65537.0 * f64::EPSILON / 2.0 });
        }
        "sum_squares" => {
            // Both sides add exact f64 squares of f32 values in f64, in different orders (CPU:
            // index order; kernel: grid-stride per thread, a tree per block, blocks in order on
            // the host). For nonnegative terms any order is within (n - 1) * 2^-53 of the sum,
            // relative: the tolerance is n * 2^-53 (1.2e-10 at n = 2^20 + 3, which also wraps
            // the 4096-block grid).
            for n in [1, 1000, 65537, (1 << 20) + 3] {
                let x = r.vec(n, 1.0);
                let (sc, sg) = (c.cpu.sum_squares(&x), c.gpu.sum_squares(&c.gpu.upload(&x)));
                let err = if sg.is_finite() { (sg - sc).abs() / sc } else { f64::INFINITY };
                c.rows.push(Row { op: op.to_string(), shape: format!("n{n}"), max_err: err, tol: n as f64 * f64::EPSILON / 2.0 });
            }
        }
        "adamw" | "sgd" => {
            // Bit-exact (tolerance 0): kernels/optim.cu does the CPU's f32 operations in the
            // CPU's order with __f*_rn intrinsics (no contraction into FMAs), from the same
            // f32-rounded coefficients. Two consecutive steps (t = 3, 4), weight decay and a
            // clipping factor on, so the in-place moments carry over; p, m, v all compared.
            for n in [1, 1000, 65537, (1 << 20) + 3] {
                let (p, g) = (r.vec(n, 1.0), r.vec(n, 1.0));
                let (m, v): (Vec<f32>, Vec<f32>) = (r.vec(n, 0.1), r.vec(n, 0.1).iter().map(|x| x * x + 1e-12).collect());
                let (mut pc, mut mc, mut vc) = (p.clone(), m.clone(), v.clone());
                let (mut pg, mut mg, mut vg) = (c.gpu.upload(&p), c.gpu.upload(&m), c.gpu.upload(&v));
                let gg = c.gpu.upload(&g);
                for t in [3, 4] {
                    let h = crate::backend::AdamwStep {
                        lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_scale: 0.37,
                        bc1: 1.0 - 0.9f64.powi(t), bc2: 1.0 - 0.999f64.powi(t),
                    };
                    if op == "adamw" {
                        c.cpu.adamw(&mut pc, &g, &mut mc, &mut vc, &h);
                        c.gpu.adamw(&mut pg, &gg, &mut mg, &mut vg, &h);
                    } else {
                        c.cpu.sgd(&mut pc, &g, 0.05, 0.01, 0.37);
                        c.gpu.sgd(&mut pg, &gg, 0.05, 0.01, 0.37);
                    }
                }
                assert!(pc != p, "{op}: the reference update must move the weights");
                c.row(&format!("{op}.p"), format!("n{n}"), &pg, &pc, 0.0);
                if op == "adamw" {
                    c.row("adamw.m", format!("n{n}"), &mg, &mc, 0.0);
                    c.row("adamw.v", format!("n{n}"), &vg, &vc, 0.0);
                }
            }
        }
        "sample" => {
            // Token ids of `Backend::sample` against the host sampler from the same counters.
            // Error = fraction of rows whose token differs, tolerance 0. Both sides sum f64
            // weights (in different orders), so a token may only flip when the draw lands
            // within a few f64 roundings of a cumulative boundary: never in these draws.
            use crate::backend::SampleRow;
            for (vocab, reps, variants) in [(1usize, 2usize, 6usize), (37, 30, 6), (4099, 6, 6), (49152, 1, 3)] {
                // (temperature, top_k, top_p): greedy, temperature only, top-k 1 / 5 / > vocab,
                // top-p tiny / 0.9 / 1.0, and combinations.
                let configs = [
                    (0.0f32, 0usize, 1.0f32), (0.7, 0, 1.0), (1.3, 0, 1.0), (1.0, 1, 1.0), (1.0, 5, 1.0), (0.9, vocab + 3, 1.0),
                    (1.0, 0, 1e-6), (0.8, 0, 0.9), (1.1, 0, 1.0), (0.7, 5, 0.9), (1.5, 50, 0.5),
                ];
                for variant in 0..variants {
                    let n = configs.len() * reps;
                    let mut logits = Vec::with_capacity(n * vocab);
                    let mut rows = Vec::with_capacity(n);
                    for i in 0..n {
                        let mut x = r.vec(vocab, 2.5);
                        match variant {
                            // 1: many exact ties (logits on a grid of 0.5).
                            1 => x.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0),
                            // 2: -inf and NaN entries (the first one NaN).
                            2 => {
                                for (j, v) in x.iter_mut().enumerate() {
                                    let d = r.below(20);
                                    if (j == 0 && vocab > 1) || d == 0 {
                                        *v = f32::NAN;
                                    } else if d < 3 {
                                        *v = f32::NEG_INFINITY;
                                    }
                                }
                            }
                            // 3: every logit equal (exact sums: top-p cuts land exactly on limits).
                            3 => x.iter_mut().for_each(|v| *v = 0.75),
                            // 4: two +inf logits (they share the mass) and a NaN.
                            4 => {
                                for _ in 0..2 {
                                    x[r.below(vocab) as usize] = f32::INFINITY;
                                }
                                x[r.below(vocab) as usize] = f32::NAN;
                            }
                            // 5: nothing to sample: all NaN, all -inf, or -inf with NaNs.
                            5 => {
                                let kind = i % 3;
                                for (j, v) in x.iter_mut().enumerate() {
                                    *v = if kind == 0 || (kind == 2 && j % 2 == 1) { f32::NAN } else { f32::NEG_INFINITY };
                                }
                            }
                            _ => {}
                        }
                        logits.extend_from_slice(&x);
                        let (temperature, top_k, top_p) = configs[i % configs.len()];
                        rows.push(SampleRow { temperature, top_k, top_p, seed: r.next(), key: r.next(), sample: r.below(8), position: r.below(4096) });
                    }
                    let want = c.cpu.sample(&logits, vocab, &rows);
                    let got = c.gpu.sample(&c.gpu.upload(&logits), vocab, &rows);
                    assert_eq!(got.len(), n);
                    if vocab >= 37 && variant == 0 {
                        // The draws must matter: sampled rows do not all take the argmax.
                        let sampled = (0..n).filter(|&i| !rows[i].greedy() && want[i] != crate::backend::cpu::sample::pick(&logits[i * vocab..(i + 1) * vocab], 0.0, 0, 1.0, 0.0));
                        assert!(sampled.count() > 0, "sample: every sampled row took the argmax");
                    }
                    let bad = want.iter().zip(&got).filter(|(a, b)| a != b).count();
                    let names = ["plain", "ties", "nan/-inf", "all equal", "+inf", "no finite"];
                    c.rows.push(Row { op: op.to_string(), shape: format!("vocab{vocab} {} draws{n}", names[variant]), max_err: bad as f64 / n as f64, tol: 0.0 });
                    if vocab == 37 && variant == 0 {
                        // The same rows with a weight scratch of 7 rows: 48 launches of <= 7 rows.
                        let got = c.gpu.sample_tokens_in(&c.gpu.upload(&logits), vocab, &rows, 2 * 7 * vocab);
                        let bad = want.iter().zip(&got).filter(|(a, b)| a != b).count();
                        c.rows.push(Row { op: op.to_string(), shape: format!("vocab{vocab} plain draws{n} in launches of 7"), max_err: bad as f64 / n as f64, tol: 0.0 });
                    }
                }
            }
        }
        "matmul_bf16" | "attention_bf16" => bf16_checks(&mut c, &mut r, op),
        _ => panic!("no parity check for op {op} (known: {OPS:?})"),
    }
    c.rows
}

/// The parity table of every op.
pub fn run_all<G: Gpu>(gpu: &CudaBackend<G>, seed: u64) -> Vec<Row> {
    OPS.iter().flat_map(|op| check_op(gpu, op, seed)).collect()
}

/// The table as text: op, shape, max error, tolerance, pass.
pub fn format_table(rows: &[Row]) -> String {
    let w = rows.iter().map(|r| r.shape.len()).max().unwrap_or(5).max(5);
    let mut s = format!("{:<20} {:<w$} {:>10} {:>10}  pass\n", "op", "shape", "max err", "tol");
    for r in rows {
        s += &format!("{:<20} {:<w$} {:>10.2e} {:>10.1e}  {}\n", r.op, r.shape, r.max_err, r.tol, if r.pass() { "yes" } else { "NO" });
    }
    s
}

/// bf16 mixed precision (`Precision::Bf16`, src/backend/cuda/precision.rs) against the fp32
/// CPU reference. The backend is switched to Bf16 for the check and back afterwards.
///
/// Tolerances are bounds derived from bf16's 8-bit significand (7 stored bits + the implicit
/// one: unit roundoff u = 2^-8 for round-to-nearest-even), stated per element, and the error reported is the largest
/// `|gpu - cpu|` as a fraction of that bound where the bound differs per element
/// (tolerance 1), or relative to the GEMM's absolute sum (matmul):
/// - matmul_bf16: a and b are rounded to bf16 (each factor within u relatively), so a
///   product is within 2u + u^2 of the exact one; the GPU sums in f32 or better, the CPU's
///   f32 GEMM is within k 2^-24 of its exact sum. With S_ij = sum_p |a_ip b_pj| (+ |c_ij| when
///   accumulating): |gpu - cpu| <= (2^-7 + 2^-16 + (k + 2) 2^-23) S_ij. Error = max |d| / S,
///   tolerance 2^-7 + 2^-16 + (k + 2) 2^-23 (about 7.8e-3).
/// - attention_bf16: q and k rounded to bf16 move each score s = scale q.k by at most
///   E_jk = scale (2^-7 + 2^-16 + (hd + 8) 2^-24) sum_d |q_d k_d| (f32 sums on both sides
///   included); let E_j = max over visible keys. Softmax weights then move by a factor within
///   e^{+-2 E_j}, and P and V are rounded to bf16 for the PV product (factors 1 +- u each), so
///   with B_jd = sum_k p_jk |v_kd|: |out_gpu - out_cpu| <= B_jd (e^{2 E_j} (1 + u)^2 - 1 +
///   2^-16) + 2^-20 (2^-16 B covering the f32 arithmetic of both sides). lse = log sum exp s
///   moves by at most E_j: |dlse| <= E_j + 2^-20 (1 + |lse|). Reported: max |d| / bound,
///   tolerance 1.
fn bf16_checks<G: Gpu>(c: &mut Ctx<'_, G>, r: &mut Rng, op: &str) {
    use super::Precision;
    let before = c.gpu.precision();
    c.gpu.set_precision(Precision::Bf16);
    let u = 2f64.powi(-8);
    match op {
        "matmul_bf16" => {
            for (m, n, k) in [(1, 1, 1), (7, 5, 3), (33, 17, 29), (9, 40, 131)] {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    for acc in [false, true] {
                        let (a, b) = (r.vec(m * k, 1.0), r.vec(k * n, 1.0));
                        let c0 = if acc { r.vec(m * n, 1.0) } else { vec![f32::NAN; m * n] };
                        let mut cc = if acc { c0.clone() } else { vec![0.0; m * n] };
                        c.cpu.matmul(&a, ta, &b, tb, &mut cc, m, n, k, acc);
                        let mut cg = c.gpu.upload(&c0);
                        c.gpu.matmul(&c.gpu.upload(&a), ta, &c.gpu.upload(&b), tb, &mut cg, m, n, k, acc);
                        let g = c.gpu.download(&cg);
                        let at = |i: usize, p: usize| (if ta { a[p * m + i] } else { a[i * k + p] }) as f64;
                        let bt = |p: usize, j: usize| (if tb { b[j * k + p] } else { b[p * n + j] }) as f64;
                        let mut err = 0f64;
                        for i in 0..m {
                            for j in 0..n {
                                let s = (0..k).map(|p| (at(i, p) * bt(p, j)).abs()).sum::<f64>() + if acc { (c0[i * n + j] as f64).abs() } else { 0.0 };
                                let d = (g[i * n + j] as f64 - cc[i * n + j] as f64).abs();
                                err = if d.is_nan() { f64::INFINITY } else { err.max(d / s) };
                            }
                        }
                        let tol = 2.0 * u + u * u + (k + 2) as f64 * 2f64.powi(-23);
                        c.rows.push(Row { op: op.to_string(), shape: format!("m{m} n{n} k{k} ta{} tb{} acc{}", ta as u8, tb as u8, acc as u8), max_err: err, tol });
                    }
                }
            }
        }
        "attention_bf16" => {
            let mut lays = layouts();
            lays.push(("seq [70]", AttnLayout::sequences(&[70])));
            for (lname, layout) in lays {
                for dims in [
                    AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 64 },
                    AttnDims { n_heads: 3, n_kv_heads: 1, head_dim: 128 },
                    AttnDims { n_heads: 2, n_kv_heads: 2, head_dim: 40 },
                ] {
                    let (hd, nh, nkv) = (dims.head_dim, dims.n_heads, dims.n_kv_heads);
                    let t = layout.num_tokens();
                    let (nq, nk) = (t * nh * hd, t * nkv * hd);
                    let (q, k, v) = (r.vec(nq, 1.0), r.vec(nk, 1.0), r.vec(nk, 1.0));
                    let (mut oc, mut lc) = (vec![0.0; nq], vec![0.0; t * nh]);
                    c.cpu.attention(&q, &k, &v, &layout, dims, &mut oc, &mut lc);
                    let (mut og, mut lg) = (c.nan(nq), c.nan(t * nh));
                    c.gpu.attention(&c.gpu.upload(&q), &c.gpu.upload(&k), &c.gpu.upload(&v), &layout, dims, &mut og, &mut lg);
                    let (og, lg) = (c.gpu.download(&og), c.gpu.download(&lg));
                    // Per-element bounds from f64 scores and weights on the host.
                    let scale = 1.0 / (hd as f64).sqrt();
                    let eps_s = scale * (2.0 * u + u * u + (hd + 8) as f64 * 2f64.powi(-24));
                    let (mut eo, mut el) = (0f64, 0f64);
                    for sp in &layout.spans {
                        let keys: Vec<usize> = (sp.prefix_start..sp.prefix_start + sp.prefix_len).chain(sp.start..sp.start + sp.len).collect();
                        for j in 0..sp.len {
                            let tok = sp.start + j;
                            let vis = &keys[..sp.prefix_len + j + 1];
                            for h in 0..nh {
                                let kvh = h / (nh / nkv);
                                let qv = &q[(tok * nh + h) * hd..(tok * nh + h + 1) * hd];
                                let kr = |row: usize| &k[(row * nkv + kvh) * hd..(row * nkv + kvh + 1) * hd];
                                let s: Vec<f64> = vis.iter().map(|&row| scale * qv.iter().zip(kr(row)).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()).collect();
                                let e = vis.iter().map(|&row| eps_s * qv.iter().zip(kr(row)).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum::<f64>()).fold(0f64, f64::max);
                                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                                let w: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                                let l: f64 = w.iter().sum();
                                let f = (2.0 * e).exp() * (1.0 + u) * (1.0 + u) - 1.0 + 2f64.powi(-16);
                                for d in 0..hd {
                                    let bnd = vis.iter().zip(&w).map(|(&row, &p)| p / l * (v[(row * nkv + kvh) * hd + d] as f64).abs()).sum::<f64>() * f + 2f64.powi(-20);
                                    let i = (tok * nh + h) * hd + d;
                                    let dd = (og[i] as f64 - oc[i] as f64).abs();
                                    eo = if dd.is_nan() { f64::INFINITY } else { eo.max(dd / bnd) };
                                }
                                let i = tok * nh + h;
                                let dd = (lg[i] as f64 - lc[i] as f64).abs();
                                let bnd = e + 2f64.powi(-20) * (1.0 + (lc[i] as f64).abs());
                                el = if dd.is_nan() { f64::INFINITY } else { el.max(dd / bnd) };
                            }
                        }
                    }
                    let shape = format!("{lname} h{nh}/{nkv} hd{hd}");
                    c.rows.push(Row { op: "attention_bf16.out".into(), shape: shape.clone(), max_err: eo, tol: 1.0 });
                    c.rows.push(Row { op: "attention_bf16.lse".into(), shape, max_err: el, tol: 1.0 });
                }
            }
        }
        _ => unreachable!(),
    }
    c.gpu.set_precision(before);
}
