//! A fixed workload of every parity op at one shape, on any `Backend`: the inputs a
//! transformer layer, the lm head, the paged KV cache, the sampler and the optimizer see,
//! seeded and uploaded once (`prepare`), and one call of an op on them (`run_op`). Used by
//! `ipo selftest --time` (device timings of each op), tests/kernel_counters.rs (simulator
//! instruction budgets) and benches/kernels.rs.

use crate::backend::{AdamwStep, AttnDims, AttnLayout, Backend, KvGeom, PagedSeq, SampleRow, SegmentDpo, SegmentPair, Span};

/// Ops with a workload (the parity table's f32 ops).
pub const OPS: &[&str] = &[
    "matmul", "add_assign", "embedding", "embedding_bwd", "rmsnorm", "rmsnorm_bwd", "bias_add", "bias_bwd", "rope", "swiglu",
    "swiglu_bwd", "attention", "attention_bwd", "lm_head_logprobs", "lm_head_bwd", "kv_write", "kv_copy_blocks", "paged_attention",
    "sample", "sum_squares", "adamw", "sgd", "segment_dpo",
];

/// A transformer-layer-like shape: a packed batch of `tokens` rows laid out as one prompt
/// with two responses (prefix sharing, as in preference pairs), hidden `dim`, GQA heads,
/// MLP width `ffn`, `vocab` for the lm head; a paged KV cache of `kv_blocks` x
/// `block_size` decoding `decode_seqs` sequences of `ctx` tokens (one query each).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub prompt: usize,
    pub response: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub decode_seqs: usize,
    pub ctx: usize,
}

/// A shape the simulator runs in well under a second per op: head_dim 64 and odd sizes, so
/// kernel tails run too (tests/kernel_counters.rs budgets it; `ipo selftest --time` on Sim).
pub const SMALL: Shape = Shape {
    prompt: 19,
    response: 7,
    dim: 96,
    n_heads: 4,
    n_kv_heads: 2,
    head_dim: 64,
    ffn: 200,
    vocab: 300,
    kv_blocks: 16,
    block_size: 8,
    decode_seqs: 3,
    ctx: 45,
};

impl Shape {
    pub fn tokens(&self) -> usize {
        self.prompt + 2 * self.response
    }
    pub fn describe(&self) -> String {
        format!(
            "tokens {} (prompt {} + 2 x {}), dim {}, heads {}/{} x {}, ffn {}, vocab {}, kv cache {} x {} blocks, decode {} seqs x ctx {}",
            self.tokens(), self.prompt, self.response, self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.ffn, self.vocab,
            self.kv_blocks, self.block_size, self.decode_seqs, self.ctx
        )
    }
}

/// SplitMix64 normals (Box-Muller): seeded, never all zeros.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * scale) as f32
            })
            .collect()
    }
    pub fn ids(&mut self, n: usize, below: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next_u64() % below as u64) as u32).collect()
    }
    pub(crate) fn perm(&mut self, n: usize) -> Vec<u32> {
        let mut v: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            v.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
        }
        v
    }
}

/// Device inputs and outputs of every op, uploaded once.
pub struct Inputs<B: Backend> {
    pub s: Shape,
    layout: AttnLayout,
    dims: AttnDims,
    geom: KvGeom,
    x: B::Buf,
    y: B::Buf,
    w_dim: B::Buf,
    out_dim: B::Buf,
    rstd: B::Buf,
    dw_dim: B::Buf,
    w_sq: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    out_ffn: B::Buf,
    dgate: B::Buf,
    dup: B::Buf,
    table: B::Buf,
    dtable: B::Buf,
    ids: Vec<u32>,
    positions: Vec<u32>,
    inv_freq: Vec<f64>,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    o: B::Buf,
    lse: B::Buf,
    dout: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    lm_rows: Vec<u32>,
    lm_targets: Vec<u32>,
    lm_lse: B::Buf,
    dlogp: Vec<f32>,
    lm_h: B::Buf,
    lm_w: B::Buf,
    lm_dh: B::Buf,
    lm_dw: B::Buf,
    cache: B::Buf,
    kv_k: B::Buf,
    kv_v: B::Buf,
    slots: Vec<u32>,
    copy_pairs: Vec<(u32, u32)>,
    seqs: Vec<PagedSeq>,
    block_table: Vec<u32>,
    dec_q: B::Buf,
    dec_out: B::Buf,
    /// `[decode_seqs, vocab]` logits and one sampling row per sequence.
    logits: B::Buf,
    sample_rows: Vec<SampleRow>,
    /// An optimizer tensor `[dim, dim]`: weights, gradient, AdamW moments.
    opt_p: B::Buf,
    opt_g: B::Buf,
    opt_m: B::Buf,
    opt_v: B::Buf,
    /// `[tokens]` log-probs of the two responses' rows and the pair over them.
    seg_logp: B::Buf,
    seg_pairs: Vec<SegmentPair>,
}

pub fn prepare<B: Backend>(be: &B, s: Shape, seed: u64) -> Inputs<B> {
    let mut r = Rng(seed);
    let t = s.tokens();
    let layout = AttnLayout {
        spans: vec![
            Span { start: 0, len: s.prompt, prefix_start: 0, prefix_len: 0 },
            Span { start: s.prompt, len: s.response, prefix_start: 0, prefix_len: s.prompt },
            Span { start: s.prompt + s.response, len: s.response, prefix_start: 0, prefix_len: s.prompt },
        ],
    };
    let dims = AttnDims { n_heads: s.n_heads, n_kv_heads: s.n_kv_heads, head_dim: s.head_dim };
    let geom = KvGeom { num_blocks: s.kv_blocks, block_size: s.block_size, n_kv_heads: s.n_kv_heads, head_dim: s.head_dim };
    let (nq, nk) = (t * s.n_heads * s.head_dim, t * s.n_kv_heads * s.head_dim);
    let up = |v: Vec<f32>| be.upload(&v);
    let q_host = r.vec(nq, 1.0);
    let k_host = r.vec(nk, 1.0);
    let v_host = r.vec(nk, 1.0);
    let (q, k, v) = (be.upload(&q_host), be.upload(&k_host), be.upload(&v_host));
    // forward outputs (and lse) for the backward, from the backend itself
    let (mut o, mut lse) = (be.zeros(nq), be.zeros(t * s.n_heads));
    be.attention(&q, &k, &v, &layout, dims, &mut o, &mut lse);
    let lm_rows: Vec<u32> = (0..t as u32).collect();
    let lm_targets = r.ids(t, s.vocab);
    let h = r.vec(t * s.dim, 1.0);
    let w_lm = r.vec(s.vocab * s.dim, 0.05);
    let lm_lse = {
        let (_, l) = be.lm_head_logprobs(&be.upload(&h), &be.upload(&w_lm), s.dim, &lm_rows, &lm_targets);
        l
    };
    let row = s.n_kv_heads * s.head_dim;
    let n_slots = s.kv_blocks * s.block_size;
    let mut slots = r.perm(n_slots);
    slots.truncate(t.min(n_slots));
    let blocks_per_seq = s.ctx.div_ceil(s.block_size);
    let mut seqs = Vec::new();
    let mut block_table = Vec::new();
    for i in 0..s.decode_seqs {
        let perm = r.perm(s.kv_blocks);
        seqs.push(PagedSeq { q_start: i, q_len: 1, ctx_len: s.ctx, table_start: block_table.len() });
        block_table.extend_from_slice(&perm[..blocks_per_seq]);
    }
    let perm = r.perm(s.kv_blocks);
    let copy_pairs: Vec<(u32, u32)> = (0..4).map(|i| (perm[2 * i], perm[2 * i + 1])).collect();
    Inputs {
        s,
        layout,
        dims,
        geom,
        x: up(r.vec(t * s.dim, 1.0)),
        y: up(r.vec(t * s.dim, 1.0)),
        w_dim: up(r.vec(s.dim, 1.0)),
        out_dim: be.zeros(t * s.dim),
        rstd: up(r.vec(t, 0.1).iter().map(|x| 1.0 + x.abs()).collect()),
        dw_dim: up(r.vec(s.dim, 1.0)),
        w_sq: up(r.vec(s.dim * s.dim, 0.05)),
        gate: up(r.vec(t * s.ffn, 2.0)),
        up: up(r.vec(t * s.ffn, 1.0)),
        out_ffn: be.zeros(t * s.ffn),
        dgate: be.zeros(t * s.ffn),
        dup: be.zeros(t * s.ffn),
        table: up(r.vec(s.vocab * s.dim, 1.0)),
        dtable: up(r.vec(s.vocab * s.dim, 1.0)),
        ids: r.ids(t, s.vocab),
        positions: (0..t as u32).collect(),
        inv_freq: (0..s.head_dim / 2).map(|i| 10000f64.powf(-2.0 * i as f64 / s.head_dim as f64)).collect(),
        q,
        k,
        v,
        o,
        lse,
        dout: up(r.vec(nq, 1.0)),
        dq: be.zeros(nq),
        dk: be.zeros(nk),
        dv: be.zeros(nk),
        lm_rows,
        lm_targets,
        lm_lse,
        dlogp: r.vec(t, 1.0),
        lm_dh: be.zeros(h.len()),
        lm_dw: be.zeros(w_lm.len()),
        lm_h: be.upload(&h),
        lm_w: be.upload(&w_lm),
        cache: up(r.vec(geom.layer_len(), 1.0)),
        kv_k: up(r.vec(slots.len() * row, 1.0)),
        kv_v: up(r.vec(slots.len() * row, 1.0)),
        slots,
        copy_pairs,
        seqs,
        block_table,
        dec_q: up(r.vec(s.decode_seqs * s.n_heads * s.head_dim, 1.0)),
        dec_out: be.zeros(s.decode_seqs * s.n_heads * s.head_dim),
        logits: up(r.vec(s.decode_seqs * s.vocab, 2.5)),
        // temperature + top-k + top-p (the kernel's longest path), distinct draws
        sample_rows: (0..s.decode_seqs as u32)
            .map(|i| SampleRow { temperature: 0.8, top_k: 40, top_p: 0.9, seed: 0x5eed, key: 17 + i as u64, sample: i, position: 100 + i })
            .collect(),
        opt_p: up(r.vec(s.dim * s.dim, 0.05)),
        opt_g: up(r.vec(s.dim * s.dim, 0.01)),
        opt_m: up(r.vec(s.dim * s.dim, 0.001)),
        opt_v: up(r.vec(s.dim * s.dim, 0.001).iter().map(|x| x * x + 1e-12).collect()),
        seg_logp: up(r.vec(2 * s.response, 1.0).iter().map(|x| -x.abs() - 0.01).collect()),
        seg_pairs: vec![SegmentPair {
            chosen_start: 0,
            chosen_len: s.response as u32,
            rejected_start: s.response as u32,
            rejected_len: s.response as u32,
            ref_chosen: -1.5 * s.response as f64,
            ref_rejected: -1.2 * s.response as f64,
        }],
    }
}

/// Hands the inputs that a training step under bf16 storage keeps as their bf16 rounding to
/// `Backend::store_bf16`: x (the residual stream as RMSNorm's backward reads it), gate and up
/// (SwiGLU's backward) and the attention output o (the attention backward's D). After this,
/// only `rmsnorm_bwd`, `swiglu_bwd` and `attention_bwd` are meant to run on these inputs (on
/// CUDA under `Precision::Bf16` they launch the kernels that read bf16 storage); a no-op on
/// backends that keep everything.
pub fn store_bf16_inputs<B: Backend>(be: &B, i: &mut Inputs<B>) {
    for b in [&mut i.x, &mut i.gate, &mut i.up, &mut i.o] {
        be.store_bf16(b);
    }
}

/// Runs `op` once on the prepared inputs (outputs overwritten or accumulated as the op
/// does; accumulation only grows values, never to inf/NaN within a benchmark's runs).
pub fn run_op<B: Backend>(be: &B, i: &mut Inputs<B>, op: &str) {
    let s = i.s;
    let t = s.tokens();
    match op {
        "matmul" => be.matmul(&i.x, false, &i.w_sq, true, &mut i.out_dim, t, s.dim, s.dim, false),
        "add_assign" => be.add_assign(&mut i.y, &i.x),
        "embedding" => be.embedding(&i.table, &i.ids, s.dim, &mut i.out_dim),
        "embedding_bwd" => be.embedding_bwd(&i.x, &i.ids, s.dim, &mut i.dtable),
        "rmsnorm" => be.rmsnorm(&i.x, &i.w_dim, s.dim, 1e-5, &mut i.out_dim, &mut i.rstd),
        "rmsnorm_bwd" => be.rmsnorm_bwd(&i.y, &i.x, &i.w_dim, &i.rstd, s.dim, &mut i.out_dim, &mut i.dw_dim),
        "bias_add" => be.bias_add(&mut i.y, &i.w_dim, s.dim),
        "bias_bwd" => be.bias_bwd(&i.x, s.dim, &mut i.dw_dim),
        "rope" => be.rope(&mut i.q, &i.positions, s.n_heads, s.head_dim, &i.inv_freq, false),
        "swiglu" => be.swiglu(&i.gate, &i.up, &mut i.out_ffn),
        "swiglu_bwd" => be.swiglu_bwd(&i.out_ffn, &i.gate, &i.up, &mut i.dgate, &mut i.dup),
        "attention" => be.attention(&i.q, &i.k, &i.v, &i.layout, i.dims, &mut i.o, &mut i.lse),
        "attention_bwd" => be.attention_bwd(&i.dout, &i.q, &i.k, &i.v, &i.o, &i.lse, &i.layout, i.dims, &mut i.dq, &mut i.dk, &mut i.dv),
        "lm_head_logprobs" => {
            let _ = be.lm_head_logprobs(&i.lm_h, &i.lm_w, s.dim, &i.lm_rows, &i.lm_targets);
        }
        "lm_head_bwd" => be.lm_head_bwd(&i.lm_h, &i.lm_w, s.dim, &i.lm_rows, &i.lm_targets, &i.lm_lse, &i.dlogp, &mut i.lm_dh, Some(&mut i.lm_dw)),
        "kv_write" => be.kv_write(&mut i.cache, &i.kv_k, &i.kv_v, &i.slots, i.geom),
        "kv_copy_blocks" => be.kv_copy_blocks(&mut i.cache, &i.copy_pairs, i.geom),
        "paged_attention" => be.paged_attention(&i.dec_q, &i.cache, &i.seqs, &i.block_table, i.geom, i.dims, &mut i.dec_out),
        "sample" => {
            let ids = be.sample(&i.logits, s.vocab, &i.sample_rows);
            assert!(ids.len() == s.decode_seqs && ids.iter().all(|&t| (t as usize) < s.vocab), "{ids:?}");
        }
        "sum_squares" => {
            let ss = be.sum_squares(&i.opt_g);
            assert!(ss.is_finite() && ss > 0.0);
        }
        "adamw" => {
            let h = AdamwStep { lr: 3e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_scale: 0.5, bc1: 1.0 - 0.9f64.powi(3), bc2: 1.0 - 0.999f64.powi(3) };
            be.adamw(&mut i.opt_p, &i.opt_g, &mut i.opt_m, &mut i.opt_v, &h);
        }
        "sgd" => be.sgd(&mut i.opt_p, &i.opt_g, 1e-3, 0.01, 0.5),
        "segment_dpo" => {
            let h = SegmentDpo { beta: 0.1, sft_coef: 0.2, batch_pairs: 1, batch_chosen_tokens: s.response };
            let (sums, _) = be.segment_dpo(&i.seg_logp, &i.seg_pairs, &h);
            assert!(sums.len() == 1 && sums[0].0.is_finite() && sums[0].1.is_finite(), "{sums:?}");
        }
        _ => panic!("no workload for op {op}"),
    }
}
