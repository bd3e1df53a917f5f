//! The transformer, written once against `Backend`: a packed variable-length forward
//! (sequences, or preference pairs sharing a context, laid out by `AttnLayout`), a
//! hand-written backward for every parameter, and the fused lm-head log-prob.
//! Llama, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) differ only in optional tensors.

use super::adapter::{Adapters, GradsMut, LoraTarget};
use super::config::ModelConfig;
use super::weights::{HostTensor, ModelWeights};
use crate::backend::{AttnDims, AttnLayout, Backend, Reference, Span};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("token id {id} at position {pos} is >= vocab_size {vocab}")]
    TokenOutOfRange { id: u32, pos: usize, vocab: usize },
    #[error("sequence of {len} tokens exceeds max_position_embeddings = {max}")]
    TooLong { len: usize, max: usize },
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    Shape { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("score item {index}: {reason}")]
    BadItem { index: usize, reason: String },
    #[error("batch: {0}")]
    BadBatch(String),
    #[error("backend {backend}: {error:#}")]
    Backend { backend: String, error: anyhow::Error },
}

/// A packed batch: token ids and positions `[tokens]`, the attention layout, and the
/// lm-head rows whose next-token log-prob is wanted (`rows[i]` predicts `targets[i]`).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub layout: AttnLayout,
    pub rows: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Batch {
    /// Independent sequences; every token after the first of its sequence is a target.
    pub fn from_sequences(seqs: &[&[u32]]) -> Self {
        let mut b = Batch::default();
        for s in seqs {
            let start = b.ids.len();
            b.ids.extend_from_slice(s);
            b.positions.extend(0..s.len() as u32);
            b.layout.spans.push(Span { start, len: s.len(), prefix_start: start, prefix_len: 0 });
            for t in 1..s.len() {
                b.rows.push((start + t - 1) as u32);
                b.targets.push(s[t]);
            }
        }
        b
    }

    /// Appends `context ++ target` as one sequence whose targets are exactly `target`.
    /// Returns the index range of its log-probs in the output.
    pub fn push_scored(&mut self, context: &[u32], target: &[u32]) -> std::ops::Range<usize> {
        let start = self.ids.len();
        self.ids.extend_from_slice(context);
        self.ids.extend_from_slice(target);
        let len = context.len() + target.len();
        self.positions.extend(0..len as u32);
        self.layout.spans.push(Span { start, len, prefix_start: start, prefix_len: 0 });
        let first = self.rows.len();
        for (i, &t) in target.iter().enumerate() {
            self.rows.push((start + context.len() + i - 1) as u32);
            self.targets.push(t);
        }
        first..self.rows.len()
    }

    /// Appends a preference pair packed as `[context | chosen | rejected]`: the context is
    /// computed once, both branches attend to it, positions of both branches continue after
    /// it. Returns the output ranges of the chosen and rejected log-probs.
    pub fn push_pair(&mut self, context: &[u32], chosen: &[u32], rejected: &[u32]) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let c0 = self.ids.len();
        let n = context.len();
        self.ids.extend_from_slice(context);
        self.positions.extend(0..n as u32);
        self.layout.spans.push(Span { start: c0, len: n, prefix_start: c0, prefix_len: 0 });
        let branch = |b: &mut Batch, seg: &[u32]| {
            let s0 = b.ids.len();
            b.ids.extend_from_slice(seg);
            b.positions.extend((n..n + seg.len()).map(|p| p as u32));
            b.layout.spans.push(Span { start: s0, len: seg.len(), prefix_start: c0, prefix_len: n });
            let first = b.rows.len();
            for (i, &t) in seg.iter().enumerate() {
                // The first token of a branch is predicted from the last context token.
                let row = if i == 0 { c0 + n - 1 } else { s0 + i - 1 };
                b.rows.push(row as u32);
                b.targets.push(t);
            }
            first..b.rows.len()
        };
        let ch = branch(self, chosen);
        let rj = branch(self, rejected);
        (ch, rj)
    }

    pub fn num_tokens(&self) -> usize {
        self.ids.len()
    }
}

/// One scoring request: the log-prob of each `target` token given `context` + the targets
/// before it. `context` must be non-empty (the first target token needs a predecessor).
pub struct ScoreItem<'a> {
    pub context: &'a [u32],
    pub target: &'a [u32],
}

/// Activations of one layer saved for the backward. `(store_bf16)`: read only by matmuls and
/// (q, k, v) the attention, so handed to `Backend::store_bf16` (bf16 on CUDA under
/// `Precision::Bf16`, the same bits those ops round to: `StoreBf16::Exact`); `(store_bf16
/// All)`: read also by fp32 math (SwiGLU's backward, the attention backward's D = rowsum(dO
/// O), RMSNorm's backward), which then reads their bf16 rounding (`StoreBf16::All`; x and
/// x_mid once the layer's output is made, and only without recomputation, where x is the
/// input the layer runs from again); the rest stays as the backend makes it.
struct LayerActs<Buf> {
    x: Buf,             // [T, hidden] layer input (store_bf16 All)
    rstd1: Buf,         // [T]
    xn1: Buf,           // [T, hidden] (store_bf16)
    q_pre: Option<Buf>, // [T, n_heads * head_dim] before q_norm (Qwen3)
    k_pre: Option<Buf>, // [T, n_kv * head_dim]
    q_rstd: Option<Buf>, // [T * n_heads]
    k_rstd: Option<Buf>, // [T * n_kv]
    q: Buf,             // [T, n_heads, head_dim] after norm + rope (store_bf16)
    k: Buf,             // [T, n_kv, head_dim] (store_bf16)
    v: Buf,             // [T, n_kv, head_dim] (store_bf16)
    attn: Buf,          // [T, n_heads, head_dim] (store_bf16 All)
    lse: Buf,           // [T, n_heads]
    x_mid: Buf,         // [T, hidden] (store_bf16 All)
    rstd2: Buf,         // [T]
    xn2: Buf,           // [T, hidden] (store_bf16)
    gate: Buf,          // [T, ffn] (store_bf16 All)
    up: Buf,            // [T, ffn] (store_bf16 All)
    act: Buf,           // [T, ffn] (store_bf16)
}

/// Which saved activations the forward hands to `Backend::store_bf16` (`Transformer::
/// set_store_bf16`; `LayerActs` marks them).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreBf16 {
    /// None: every saved activation as the backend makes it.
    Off,
    /// xn1, q, k, v, xn2, act: read only by matmuls and the attention, which under bf16 round
    /// them anyway, so no result changes.
    Exact,
    /// Those and gate, up, attn, and without recomputation the residual stream's x and
    /// x_mid: SwiGLU's backward, the attention backward's D and RMSNorm's backward read their
    /// bf16 rounding (fp32 math on rounded inputs: a small numeric change).
    All,
}

/// What a layer keeps for the backward: all its activations, or (activation recomputation,
/// `Transformer::set_recompute`) only its input, from which the backward runs the layer's
/// forward again just before its backward.
enum Saved<Buf> {
    All(LayerActs<Buf>),
    Input(Buf),
}

/// Everything the backward needs from a forward.
pub struct Tape<Buf> {
    layers: Vec<Saved<Buf>>,
    x_final: Buf,  // [T, hidden] before the final norm
    rstd_f: Buf,   // [T]
    h_final: Buf,  // [T, hidden] after the final norm
    lse: Buf,      // [rows]
}

pub struct Transformer<B: Backend = Reference> {
    pub cfg: ModelConfig,
    pub backend: B,
    pub weights: ModelWeights<B::Buf>,
    inv_freq: Vec<f64>, // [head_dim / 2]
    recompute: bool,
    /// Which saved activations go to `Backend::store_bf16` (`set_store_bf16`).
    store_bf16: StoreBf16,
    /// LoRA adapters (`super::adapter`): added by the forward; with them the backward trains
    /// only them.
    pub(crate) adapters: Option<Adapters<B::Buf>>,
}

impl Transformer<Reference> {
    /// The model on the reference backend (fp32 CPU) from host weights.
    pub fn new(cfg: ModelConfig, weights: ModelWeights<HostTensor>) -> Result<Self, ForwardError> {
        Self::with_backend(Reference::new(), cfg, weights)
    }
}

impl<B: Backend> Transformer<B> {
    pub fn with_backend(backend: B, cfg: ModelConfig, host: ModelWeights<HostTensor>) -> Result<Self, ForwardError> {
        check_shapes(&cfg, &host)?;
        backend.prepare(&[cfg.head_dim]).map_err(|error| ForwardError::Backend { backend: backend.name(), error })?;
        let weights = host.map(|t| backend.upload_weight(&t.data));
        let inv_freq = cfg.rope_inv_freq();
        Ok(Self { cfg, backend, weights, inv_freq, recompute: false, store_bf16: StoreBf16::All, adapters: None })
    }

    /// Activation recomputation: `forward` keeps only each decoder layer's input, and `backward`
    /// recomputes the layer's activations from it (one more layer forward per layer, about a
    /// third more FLOPs), so the saved activations shrink from about 4 hidden + 3 ffn + the
    /// attention's q, k, v and output values per token and layer to one hidden. The same
    /// operations run on the same inputs, so the gradients are bit for bit those without it.
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    pub fn recompute(&self) -> bool {
        self.recompute
    }

    /// `StoreBf16::All` by default: the forward hands xn1, q, k, v, xn2 and act to
    /// `Backend::store_bf16` as soon as it has made them (read only by matmuls and the
    /// attention, which under bf16 round them anyway: the CUDA backend then stores their bf16
    /// rounding, so the saved activations shrink and nothing else changes), and gate, up and
    /// attn once the forward is done with them, and without recomputation x and x_mid once the
    /// layer's output is made (their backward readers then do fp32 math on the bf16 rounding). `Exact` stores only the first six, `Off` none: for tests that prove
    /// Exact gives Off's bits and measure All against them (tests/cuda_sim_bf16.rs).
    #[doc(hidden)]
    pub fn set_store_bf16(&mut self, which: StoreBf16) {
        self.store_bf16 = which;
    }

    /// Declares the layer matrices (q, k, v, o, gate, up, down of every layer) frozen: nothing
    /// will update them (inference, or LoRA's base), so the backend may store them in its
    /// compute precision only (`Backend::freeze_weight`; halves them on CUDA under bf16, where
    /// the matmuls read the bf16 copy anyway, so no result changes). Embedding, lm-head and
    /// norms stay as they are: fp32 ops read them.
    pub fn freeze(&mut self) {
        let be = &self.backend;
        for l in &mut self.weights.layers {
            for w in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down] {
                be.freeze_weight(w);
            }
        }
    }

    /// Declares that the layer matrices' fp32 values now live in ZeRO-1 master slices
    /// (`train::zero`): the backend may store them in its compute precision only
    /// (`Backend::shard_weight`; bf16 on CUDA under bf16, where the matmuls read the bf16
    /// copy anyway), still written by the optimizer's slice updates and all-gather.
    pub fn shard_layer_matrices(&mut self) {
        let be = &self.backend;
        for l in &mut self.weights.layers {
            for w in [&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down] {
                be.shard_weight(w);
            }
        }
    }

    /// Copies the weights back to the host (for saving, or moving to another backend).
    pub fn host_weights(&self) -> ModelWeights<HostTensor> {
        let mut shapes = Vec::new();
        expected_shapes(&self.cfg, self.weights.lm_head.is_some(), |_, s| shapes.push(s));
        let mut it = shapes.into_iter();
        self.weights.map(|b| HostTensor::new(it.next().unwrap(), self.backend.download(b)))
    }

    /// Zeroed gradient buffers with the same structure as the weights.
    pub fn zero_grads(&self) -> ModelWeights<B::Buf> {
        self.weights.map(|w| self.backend.zeros(self.backend.len(w)))
    }

    /// RoPE inverse frequencies `[head_dim / 2]` (llama3 scaling applied).
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    pub fn dims(&self) -> AttnDims {
        AttnDims { n_heads: self.cfg.num_heads, n_kv_heads: self.cfg.num_kv_heads, head_dim: self.cfg.head_dim }
    }

    /// The output projection `[vocab, hidden]` (the embedding when tied).
    pub(crate) fn lm_head_w(&self) -> &B::Buf {
        self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed)
    }

    /// Checks ids, positions and targets against the config before any compute.
    pub(crate) fn validate(&self, batch: &Batch) -> Result<(), ForwardError> {
        let vocab = self.cfg.vocab_size;
        for (pos, &id) in batch.ids.iter().enumerate().chain(batch.targets.iter().enumerate()) {
            if id as usize >= vocab {
                return Err(ForwardError::TokenOutOfRange { id, pos, vocab });
            }
        }
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= self.cfg.max_position_embeddings {
                return Err(ForwardError::TooLong { len: p as usize + 1, max: self.cfg.max_position_embeddings });
            }
        }
        let t = batch.ids.len();
        if batch.positions.len() != t || batch.layout.num_tokens() != t || batch.rows.len() != batch.targets.len() {
            return Err(ForwardError::BadBatch("ids, positions, layout and targets disagree in length".into()));
        }
        if batch.rows.iter().any(|&r| r as usize >= t) {
            return Err(ForwardError::BadBatch("an lm-head row is outside the batch".into()));
        }
        Ok(())
    }

    /// Forward pass: per-target log-probs `[rows]` and the tape for `backward`.
    pub fn forward(&self, batch: &Batch) -> Result<(B::Buf, Tape<B::Buf>), ForwardError> {
        self.validate(batch)?;
        let (be, c) = (&self.backend, &self.cfg);
        let t = batch.num_tokens();
        let hidden = c.hidden_size;
        let mut x = be.zeros(t * hidden);
        be.embedding(&self.weights.embed, &batch.ids, hidden, &mut x);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let mut acts = self.layer_forward(l, x, batch);
            let mut out = be.zeros(t * hidden);
            self.project(l, LoraTarget::Down, &acts.act, &mut out, t);
            be.add_assign(&mut out, &acts.x_mid);
            x = out;
            if self.recompute {
                layers.push(Saved::Input(acts.x));
            } else {
                // The residual stream goes on in fp32 (`x`); what the backward's RMSNorms read of
                // it may be its bf16 rounding.
                if self.store_bf16 == StoreBf16::All {
                    be.store_bf16(&mut acts.x);
                    be.store_bf16(&mut acts.x_mid);
                }
                layers.push(Saved::All(acts));
            }
        }
        let (mut h, mut rstd) = (be.zeros(t * hidden), be.zeros(t));
        be.rmsnorm(&x, &self.weights.final_norm, hidden, c.rms_norm_eps as f32, &mut h, &mut rstd);
        let (logp, lse) = be.lm_head_logprobs(&h, self.lm_head_w(), hidden, &batch.rows, &batch.targets);
        Ok((logp, Tape { layers, x_final: x, rstd_f: rstd, h_final: h, lse }))
    }

    /// One decoder layer up to (not including) the MLP down projection and its residual.
    /// Also what the backward runs again under recompute, where the `store_bf16` calls do not
    /// save memory but still save work: an operand stored in bf16 is not rounded again by each
    /// of the matmuls that read it (xn1: three projections and the adapters).
    fn layer_forward(&self, l: usize, x: B::Buf, batch: &Batch) -> LayerActs<B::Buf> {
        let (be, c, w) = (&self.backend, &self.cfg, &self.weights.layers[l]);
        let t = batch.num_tokens();
        let (hidden, qd, kvd, hd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim, c.intermediate_size);
        let eps = c.rms_norm_eps as f32;
        let store_bf16 = |b: &mut B::Buf, all_only: bool| {
            if self.store_bf16 == StoreBf16::All || (self.store_bf16 == StoreBf16::Exact && !all_only) {
                be.store_bf16(b);
            }
        };
        let (mut xn1, mut rstd1) = (be.zeros(t * hidden), be.zeros(t));
        be.rmsnorm(&x, &w.attn_norm, hidden, eps, &mut xn1, &mut rstd1);
        store_bf16(&mut xn1, false);
        let proj = |p: LoraTarget, bias: &Option<B::Buf>, n: usize| {
            let mut y = be.zeros(t * n);
            self.project(l, p, &xn1, &mut y, t);
            if let Some(b) = bias {
                be.bias_add(&mut y, b, n);
            }
            y
        };
        let (mut q, mut k, mut v) = (proj(LoraTarget::Q, &w.bq, qd), proj(LoraTarget::K, &w.bk, kvd), proj(LoraTarget::V, &w.bv, kvd));
        let (mut q_pre, mut k_pre, mut q_rstd, mut k_rstd) = (None, None, None, None);
        if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
            let head_norm = |x: B::Buf, wn: &B::Buf, rows: usize| {
                let (mut y, mut r) = (be.zeros(rows * hd), be.zeros(rows));
                be.rmsnorm(&x, wn, hd, eps, &mut y, &mut r);
                (x, y, r)
            };
            let (qp, qy, qr) = head_norm(q, qn, t * c.num_heads);
            let (kp, ky, kr) = head_norm(k, kn, t * c.num_kv_heads);
            (q, k) = (qy, ky);
            (q_pre, k_pre, q_rstd, k_rstd) = (Some(qp), Some(kp), Some(qr), Some(kr));
        }
        be.rope(&mut q, &batch.positions, c.num_heads, hd, &self.inv_freq, false);
        be.rope(&mut k, &batch.positions, c.num_kv_heads, hd, &self.inv_freq, false);
        for b in [&mut q, &mut k, &mut v] {
            store_bf16(b, false);
        }
        let (mut attn, mut lse) = (be.zeros(t * qd), be.zeros(t * c.num_heads));
        be.attention(&q, &k, &v, &batch.layout, self.dims(), &mut attn, &mut lse);
        let mut x_mid = be.zeros(t * hidden);
        self.project(l, LoraTarget::O, &attn, &mut x_mid, t);
        store_bf16(&mut attn, true);
        be.add_assign(&mut x_mid, &x);
        let (mut xn2, mut rstd2) = (be.zeros(t * hidden), be.zeros(t));
        be.rmsnorm(&x_mid, &w.mlp_norm, hidden, eps, &mut xn2, &mut rstd2);
        store_bf16(&mut xn2, false);
        let (mut gate, mut up, mut act) = (be.zeros(t * ffn), be.zeros(t * ffn), be.zeros(t * ffn));
        self.project(l, LoraTarget::Gate, &xn2, &mut gate, t);
        self.project(l, LoraTarget::Up, &xn2, &mut up, t);
        be.swiglu(&gate, &up, &mut act);
        store_bf16(&mut act, false);
        store_bf16(&mut gate, true);
        store_bf16(&mut up, true);
        LayerActs { x, rstd1, xn1, q_pre, k_pre, q_rstd, k_rstd, q, k, v, attn, lse, x_mid, rstd2, xn2, gate, up, act }
    }

    /// Backward from `dlogp` (d objective / d logp per target row): accumulates every
    /// parameter's gradient into `grads` (tied embeddings receive both contributions).
    pub fn backward(&self, batch: &Batch, tape: Tape<B::Buf>, dlogp: &[f32], grads: &mut ModelWeights<B::Buf>) {
        assert_eq!(dlogp.len(), batch.rows.len(), "backward: one dlogp per scored row");
        self.backward_buf(batch, tape, &self.backend.upload(dlogp), GradsMut::Full(grads), None)
    }

    /// `backward` with `dlogp` `[rows]` already on the backend (from `Backend::segment_dpo`),
    /// into every weight's gradient or (adapters attached) the adapters' only. `layer_done(l,
    /// grads)` is called as soon as decoder layer `l`'s gradients (its weights' or its
    /// adapters') are final, layers last to first, each once; nothing touches them afterwards
    /// (the trainer starts their all-reduce there, while the earlier layers' backward runs).
    /// The embedding, final norm and lm-head gradients are final only when this returns.
    #[doc(hidden)]
    pub fn backward_buf(&self, batch: &Batch, tape: Tape<B::Buf>, dlogp: &B::Buf, mut grads: GradsMut<'_, B::Buf>, mut layer_done: Option<&mut dyn FnMut(usize, &mut GradsMut<'_, B::Buf>)>) {
        let (be, c) = (&self.backend, &self.cfg);
        let t = batch.num_tokens();
        let hidden = c.hidden_size;
        let mut dh = be.zeros(t * hidden);
        let dw_head = match &mut grads {
            GradsMut::Full(g) => Some(g.lm_head.as_mut().unwrap_or(&mut g.embed)),
            GradsMut::Adapters(_) => None,
        };
        be.lm_head_bwd_buf(&tape.h_final, self.lm_head_w(), hidden, &batch.rows, &batch.targets, &tape.lse, dlogp, &mut dh, dw_head);
        let mut dx = be.zeros(t * hidden);
        {
            let mut frozen = None;
            let dw = norm_grad(&mut grads, &mut frozen, be, hidden, |g| &mut g.final_norm);
            be.rmsnorm_bwd(&dh, &tape.x_final, &self.weights.final_norm, &tape.rstd_f, hidden, &mut dx, dw);
        }
        drop(dh);
        for (l, saved) in tape.layers.into_iter().enumerate().rev() {
            let acts = match saved {
                Saved::All(a) => a,
                Saved::Input(x) => self.layer_forward(l, x, batch),
            };
            dx = self.layer_backward(l, acts, dx, batch, &mut grads);
            if let Some(f) = layer_done.as_mut() {
                f(l, &mut grads);
            }
        }
        if let GradsMut::Full(g) = &mut grads {
            be.embedding_bwd(&dx, &batch.ids, hidden, &mut g.embed);
        }
    }

    /// Backward of one full layer (attention + MLP with residuals): d input from d output.
    fn layer_backward(&self, l: usize, a: LayerActs<B::Buf>, dout: B::Buf, batch: &Batch, grads: &mut GradsMut<'_, B::Buf>) -> B::Buf {
        let (be, c, w) = (&self.backend, &self.cfg, &self.weights.layers[l]);
        let t = batch.num_tokens();
        let (hidden, qd, kvd, hd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim, c.intermediate_size);
        // MLP: out = x_mid + down(swiglu(gate(xn2), up(xn2)))
        let mut dact = be.zeros(t * ffn);
        self.project_bwd(l, LoraTarget::Down, &dout, &a.act, &mut dact, false, t, grads);
        let (mut dgate, mut dup) = (be.zeros(t * ffn), be.zeros(t * ffn));
        be.swiglu_bwd(&dact, &a.gate, &a.up, &mut dgate, &mut dup);
        drop(dact);
        let mut dxn2 = be.zeros(t * hidden);
        self.project_bwd(l, LoraTarget::Gate, &dgate, &a.xn2, &mut dxn2, false, t, grads);
        self.project_bwd(l, LoraTarget::Up, &dup, &a.xn2, &mut dxn2, true, t, grads);
        drop((dgate, dup));
        let mut dx_mid = be.zeros(t * hidden);
        let mut frozen = None;
        be.rmsnorm_bwd(&dxn2, &a.x_mid, &w.mlp_norm, &a.rstd2, hidden, &mut dx_mid, norm_grad(grads, &mut frozen, be, hidden, |g| &mut g.layers[l].mlp_norm));
        be.add_assign(&mut dx_mid, &dout);
        // Attention: x_mid = x + o_proj(attention(rope(norm(q)), rope(norm(k)), v))
        let mut dattn = be.zeros(t * qd);
        self.project_bwd(l, LoraTarget::O, &dx_mid, &a.attn, &mut dattn, false, t, grads);
        let (mut dq, mut dk, mut dv) = (be.zeros(t * qd), be.zeros(t * kvd), be.zeros(t * kvd));
        be.attention_bwd(&dattn, &a.q, &a.k, &a.v, &a.attn, &a.lse, &batch.layout, self.dims(), &mut dq, &mut dk, &mut dv);
        be.rope(&mut dq, &batch.positions, c.num_heads, hd, &self.inv_freq, true);
        be.rope(&mut dk, &batch.positions, c.num_kv_heads, hd, &self.inv_freq, true);
        if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
            let mut dqp = be.zeros(t * qd);
            let mut frozen = None;
            be.rmsnorm_bwd(&dq, a.q_pre.as_ref().unwrap(), qn, a.q_rstd.as_ref().unwrap(), hd, &mut dqp, norm_grad(grads, &mut frozen, be, hd, |g| g.layers[l].q_norm.as_mut().unwrap()));
            let mut dkp = be.zeros(t * kvd);
            let mut frozen = None;
            be.rmsnorm_bwd(&dk, a.k_pre.as_ref().unwrap(), kn, a.k_rstd.as_ref().unwrap(), hd, &mut dkp, norm_grad(grads, &mut frozen, be, hd, |g| g.layers[l].k_norm.as_mut().unwrap()));
            (dq, dk) = (dqp, dkp);
        }
        if let GradsMut::Full(g) = grads {
            let g = &mut g.layers[l];
            for (d, gb, n) in [(&dq, g.bq.as_mut(), qd), (&dk, g.bk.as_mut(), kvd), (&dv, g.bv.as_mut(), kvd)] {
                if let Some(gb) = gb {
                    be.bias_bwd(d, n, gb);
                }
            }
        }
        let mut dxn1 = be.zeros(t * hidden);
        self.project_bwd(l, LoraTarget::Q, &dq, &a.xn1, &mut dxn1, false, t, grads);
        self.project_bwd(l, LoraTarget::K, &dk, &a.xn1, &mut dxn1, true, t, grads);
        self.project_bwd(l, LoraTarget::V, &dv, &a.xn1, &mut dxn1, true, t, grads);
        let mut dx = be.zeros(t * hidden);
        let mut frozen = None;
        be.rmsnorm_bwd(&dxn1, &a.x, &w.attn_norm, &a.rstd1, hidden, &mut dx, norm_grad(grads, &mut frozen, be, hidden, |g| &mut g.layers[l].attn_norm));
        be.add_assign(&mut dx, &dx_mid);
        dx
    }

    /// Per-target-token log-probs (natural log) for each item, packed into forwards of at
    /// most `batch_tokens` tokens (an item longer than that runs alone). Two consecutive items
    /// with the same context (the chosen and rejected sides of a pair) are packed as
    /// `[context | target | target]` (`Batch::push_pair`), so their context runs once.
    /// `progress` is called with the number of tokens of each finished forward.
    pub(crate) fn score_with_progress(&self, items: &[ScoreItem], batch_tokens: usize, mut progress: impl FnMut(usize)) -> Result<Vec<Vec<f32>>, ForwardError> {
        for (index, it) in items.iter().enumerate() {
            if it.context.is_empty() {
                return Err(ForwardError::BadItem { index, reason: "empty context (the first target token needs a predecessor)".into() });
            }
        }
        let mut out = vec![Vec::new(); items.len()];
        for forward in score_batches(items, batch_tokens) {
            let mut batch = Batch::default();
            let mut ranges = Vec::new();
            let mut i = forward.start;
            while i < forward.end {
                let it = &items[i];
                match shares_context(items, i).filter(|_| i + 1 < forward.end) {
                    Some(b) => {
                        let (rc, rr) = batch.push_pair(it.context, it.target, b.target);
                        ranges.push((i, rc));
                        ranges.push((i + 1, rr));
                        i += 2;
                    }
                    None => {
                        ranges.push((i, batch.push_scored(it.context, it.target)));
                        i += 1;
                    }
                }
            }
            let (logp, _tape) = self.forward(&batch)?;
            let logp = self.backend.download(&logp);
            for (idx, r) in ranges {
                out[idx] = logp[r].to_vec();
            }
            progress(batch.num_tokens());
        }
        Ok(out)
    }

    pub fn score(&self, items: &[ScoreItem], batch_tokens: usize) -> Result<Vec<Vec<f32>>, ForwardError> {
        self.score_with_progress(items, batch_tokens, |_| {})
    }
}

/// The gradient buffer of a norm weight: its place in `GradsMut::Full` (picked by `f`), or,
/// with the weights frozen, `frozen` filled with `n` zeros whose values are thrown away.
fn norm_grad<'a, B: Backend>(
    grads: &'a mut GradsMut<'_, B::Buf>,
    frozen: &'a mut Option<B::Buf>,
    be: &B,
    n: usize,
    f: impl FnOnce(&'a mut ModelWeights<B::Buf>) -> &'a mut B::Buf,
) -> &'a mut B::Buf {
    match grads {
        GradsMut::Full(g) => f(g),
        GradsMut::Adapters(_) => frozen.insert(be.zeros(n)),
    }
}

/// The forwards of `score_with_progress`: consecutive ranges of `items`, each packed into one
/// forward of at most `batch_tokens` tokens (an item longer than that alone; two items sharing
/// a context as one pair, never split). A range scored on its own packs the same forward, so
/// scoring is the same whichever process runs which range.
pub(crate) fn score_batches(items: &[ScoreItem], batch_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let (start, mut tokens) = (i, 0);
        while i < items.len() {
            let it = &items[i];
            let pair = shares_context(items, i);
            let n = it.context.len() + it.target.len() + pair.map_or(0, |b| b.target.len());
            if i > start && tokens + n > batch_tokens {
                break;
            }
            tokens += n;
            i += if pair.is_some() { 2 } else { 1 };
        }
        out.push(start..i);
    }
    out
}

/// Tokens the forwards of `score_with_progress` process for `items` (a shared context
/// counts once).
pub(crate) fn packed_score_tokens(items: &[ScoreItem]) -> usize {
    let (mut i, mut n) = (0, 0);
    while i < items.len() {
        let it = &items[i];
        n += it.context.len() + it.target.len();
        match shares_context(items, i) {
            Some(b) => {
                n += b.target.len();
                i += 2;
            }
            None => i += 1,
        }
    }
    n
}

/// The item after `items[i]` when the two are scored as a pair sharing one context.
fn shares_context<'a, 'b>(items: &'b [ScoreItem<'a>], i: usize) -> Option<&'b ScoreItem<'a>> {
    let it = &items[i];
    items.get(i + 1).filter(|b| b.context == it.context && !it.target.is_empty() && !b.target.is_empty())
}

/// Calls `f(name, shape)` for every tensor the config implies, in `ModelWeights::for_each`
/// order.
pub fn expected_shapes(c: &ModelConfig, untied_head: bool, mut f: impl FnMut(String, Vec<usize>)) {
    let (h, qd, kvd, ffn, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.head_dim);
    f("model.embed_tokens.weight".into(), vec![c.vocab_size, h]);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}.");
        f(p.clone() + "input_layernorm.weight", vec![h]);
        f(p.clone() + "self_attn.q_proj.weight", vec![qd, h]);
        f(p.clone() + "self_attn.k_proj.weight", vec![kvd, h]);
        f(p.clone() + "self_attn.v_proj.weight", vec![kvd, h]);
        f(p.clone() + "self_attn.o_proj.weight", vec![h, qd]);
        if c.qkv_bias {
            f(p.clone() + "self_attn.q_proj.bias", vec![qd]);
            f(p.clone() + "self_attn.k_proj.bias", vec![kvd]);
            f(p.clone() + "self_attn.v_proj.bias", vec![kvd]);
        }
        if c.qk_norm {
            f(p.clone() + "self_attn.q_norm.weight", vec![hd]);
            f(p.clone() + "self_attn.k_norm.weight", vec![hd]);
        }
        f(p.clone() + "post_attention_layernorm.weight", vec![h]);
        f(p.clone() + "mlp.gate_proj.weight", vec![ffn, h]);
        f(p.clone() + "mlp.up_proj.weight", vec![ffn, h]);
        f(p + "mlp.down_proj.weight", vec![h, ffn]);
    }
    f("model.norm.weight".into(), vec![h]);
    if untied_head {
        f("lm_head.weight".into(), vec![c.vocab_size, h]);
    }
}

fn check_shapes(cfg: &ModelConfig, w: &ModelWeights<HostTensor>) -> Result<(), ForwardError> {
    let mut expected = Vec::new();
    expected_shapes(cfg, w.lm_head.is_some(), |n, s| expected.push((n, s)));
    let mut found = Vec::new();
    w.for_each(|n, t| found.push((n.to_string(), t.shape.clone())));
    if expected.len() != found.len() || cfg.layer_count_mismatch(w.layers.len()) {
        return Err(ForwardError::BadBatch(format!(
            "weights hold {} tensors in {} layers, the config implies {} in {}",
            found.len(), w.layers.len(), expected.len(), cfg.num_layers
        )));
    }
    for ((en, es), (fnm, fs)) in expected.into_iter().zip(found) {
        if en != fnm || es != fs {
            return Err(ForwardError::Shape { name: fnm, expected: es, found: fs });
        }
    }
    Ok(())
}
