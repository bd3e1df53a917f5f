//! The incremental (KV-cached) forward used by the rollout engine: the new tokens of several
//! sequences (prefill chunks and single decode tokens alike) run through the layers against
//! the keys/values already in a paged cache, write their own K/V into it, and return the
//! logits of the rows the sampler needs (the last token of each sequence). Written against
//! `Backend` with the same ops as `Transformer::forward`, plus `kv_write` and
//! `paged_attention`, so every backend gets it for free.

use super::transformer::{ForwardError, Transformer};
use crate::backend::{Backend, KvGeom, PagedSeq};

/// One step of the engine: the new tokens of every scheduled sequence, packed.
#[derive(Clone, Debug, Default)]
pub struct DecodeStep {
    /// Token ids `[tokens]`.
    pub ids: Vec<u32>,
    /// Absolute position of each token in its sequence `[tokens]`.
    pub positions: Vec<u32>,
    /// Cache slot (`block * block_size + offset`) each token's K/V is written to `[tokens]`.
    pub slots: Vec<u32>,
    /// The sequences: which rows are theirs and how many cached keys they see.
    pub seqs: Vec<PagedSeq>,
    /// Block ids of every sequence back to back (`PagedSeq::table_start` indexes into it).
    pub block_table: Vec<u32>,
    /// Rows (indices into `ids`) whose next-token logits are returned, in this order.
    pub logit_rows: Vec<u32>,
}

impl<B: Backend> Transformer<B> {
    /// The cache geometry of this model for a pool of `num_blocks` blocks of `block_size`.
    pub fn kv_geom(&self, num_blocks: usize, block_size: usize) -> KvGeom {
        KvGeom { num_blocks, block_size, n_kv_heads: self.cfg.num_kv_heads, head_dim: self.cfg.head_dim }
    }

    /// Zeroed cache buffers (`Backend::kv_alloc`), one per layer, each `[num_blocks, 2,
    /// n_kv_heads, block_size, head_dim]`.
    pub fn alloc_kv(&self, geom: KvGeom) -> Vec<B::Buf> {
        (0..self.cfg.num_layers).map(|_| self.backend.kv_alloc(geom.layer_len())).collect()
    }

    /// Runs the new tokens of `step`, writing their K/V into `kv` (one buffer per layer), and
    /// returns the logits `[logit_rows, vocab]` of the requested rows.
    /// The step's device work is bracketed by `Backend::step_begin` / `step_end` (the CUDA
    /// backend may run it as one graph), so the logits are valid until the next step begins.
    pub fn forward_cached(&self, kv: &mut [B::Buf], geom: KvGeom, step: &DecodeStep) -> Result<B::Buf, ForwardError> {
        self.validate_step(kv.len(), geom, step)?;
        self.backend.step_begin(step.ids.len());
        let logits = self.forward_cached_step(kv, geom, step);
        self.backend.step_end();
        Ok(logits)
    }

    fn forward_cached_step(&self, kv: &mut [B::Buf], geom: KvGeom, step: &DecodeStep) -> B::Buf {
        let (be, c) = (&self.backend, &self.cfg);
        let t = step.ids.len();
        let (hidden, qd, kvd, hd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim, c.intermediate_size);
        let eps = c.rms_norm_eps as f32;
        let mut x = be.zeros(t * hidden); // [T, hidden] residual stream
        be.embedding(&self.weights.embed, &step.ids, hidden, &mut x);
        let (mut xn, mut rstd) = (be.zeros(t * hidden), be.zeros(t)); // [T, hidden], [T]
        for (l, cache) in kv.iter_mut().enumerate() {
            let w = &self.weights.layers[l];
            be.rmsnorm(&x, &w.attn_norm, hidden, eps, &mut xn, &mut rstd);
            let proj = |wt: &B::Buf, bias: &Option<B::Buf>, n: usize| {
                let mut y = be.zeros(t * n); // [T, n]
                be.matmul(&xn, false, wt, true, &mut y, t, n, hidden, false);
                if let Some(b) = bias {
                    be.bias_add(&mut y, b, n);
                }
                y
            };
            // q [T, n_heads, hd]; k, v [T, n_kv, hd]
            let (mut q, mut k, v) = (proj(&w.wq, &w.bq, qd), proj(&w.wk, &w.bk, kvd), proj(&w.wv, &w.bv, kvd));
            if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
                let head_norm = |x: &B::Buf, wn: &B::Buf, rows: usize| {
                    let (mut y, mut r) = (be.zeros(rows * hd), be.zeros(rows));
                    be.rmsnorm(x, wn, hd, eps, &mut y, &mut r);
                    y
                };
                q = head_norm(&q, qn, t * c.num_heads);
                k = head_norm(&k, kn, t * c.num_kv_heads);
            }
            be.rope(&mut q, &step.positions, c.num_heads, hd, self.inv_freq(), false);
            be.rope(&mut k, &step.positions, c.num_kv_heads, hd, self.inv_freq(), false);
            be.kv_write(cache, &k, &v, &step.slots, geom);
            let mut attn = be.zeros(t * qd); // [T, n_heads, hd]
            be.paged_attention(&q, cache, &step.seqs, &step.block_table, geom, self.dims(), &mut attn);
            let mut x_mid = be.zeros(t * hidden); // [T, hidden]
            be.matmul(&attn, false, &w.wo, true, &mut x_mid, t, hidden, qd, false);
            be.add_assign(&mut x_mid, &x);
            be.rmsnorm(&x_mid, &w.mlp_norm, hidden, eps, &mut xn, &mut rstd);
            let (mut gate, mut up) = (be.zeros(t * ffn), be.zeros(t * ffn)); // [T, ffn]
            be.matmul(&xn, false, &w.w_gate, true, &mut gate, t, ffn, hidden, false);
            be.matmul(&xn, false, &w.w_up, true, &mut up, t, ffn, hidden, false);
            let mut act = be.zeros(t * ffn); // [T, ffn]
            be.swiglu(&gate, &up, &mut act);
            be.matmul(&act, false, &w.w_down, true, &mut x, t, hidden, ffn, false);
            be.add_assign(&mut x, &x_mid);
        }
        // Only the rows the sampler needs go through the final norm and the lm-head.
        let r = step.logit_rows.len();
        let mut xr = be.zeros(r * hidden); // [R, hidden]
        be.embedding(&x, &step.logit_rows, hidden, &mut xr);
        let (mut h, mut rstd_r) = (be.zeros(r * hidden), be.zeros(r));
        be.rmsnorm(&xr, &self.weights.final_norm, hidden, eps, &mut h, &mut rstd_r);
        let vocab = c.vocab_size;
        let mut logits = be.zeros(r * vocab); // [R, vocab]
        be.lm_head_logits(&h, self.lm_head_w(), &mut logits, r, vocab, hidden);
        logits
    }

    fn validate_step(&self, layers: usize, geom: KvGeom, s: &DecodeStep) -> Result<(), ForwardError> {
        let bad = |m: String| Err(ForwardError::BadBatch(m));
        let vocab = self.cfg.vocab_size;
        if let Some((pos, &id)) = s.ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(ForwardError::TokenOutOfRange { id, pos, vocab });
        }
        if let Some(&p) = s.positions.iter().max() {
            if p as usize >= self.cfg.max_position_embeddings {
                return Err(ForwardError::TooLong { len: p as usize + 1, max: self.cfg.max_position_embeddings });
            }
        }
        let t = s.ids.len();
        if layers != self.cfg.num_layers || geom != self.kv_geom(geom.num_blocks, geom.block_size) {
            return bad(format!("kv cache has {layers} layers / {geom:?}, the model needs {} layers", self.cfg.num_layers));
        }
        if s.positions.len() != t || s.slots.len() != t {
            return bad("ids, positions and slots disagree in length".into());
        }
        if s.slots.iter().any(|&x| x as usize >= geom.num_blocks * geom.block_size) {
            return bad("a slot is outside the cache pool".into());
        }
        if s.logit_rows.iter().any(|&r| r as usize >= t) {
            return bad("a logit row is outside the step".into());
        }
        let mut next = 0;
        for q in &s.seqs {
            let blocks = q.ctx_len.div_ceil(geom.block_size);
            if q.q_start != next || q.q_len > q.ctx_len || q.table_start + blocks > s.block_table.len() {
                return bad(format!("inconsistent sequence {q:?}"));
            }
            next += q.q_len;
        }
        if next != t || s.block_table.iter().any(|&b| b as usize >= geom.num_blocks) {
            return bad("sequences do not cover the step, or a block id is outside the pool".into());
        }
        Ok(())
    }
}
