//! Memory and FLOPs of a training step and of rollouts, before anything is allocated: what
//! `ipo plan` prints and what `ipo train` checks against the device's memory before it starts.
//!
//! Two storage layouts are modelled, because the CUDA backend does not yet store what the
//! design (DESIGN.md section 1) says it will:
//! - `Layout::ThisBuild`: what `CudaBackend` allocates today, buffer by buffer (checked against
//!   the backend's allocation high-water mark on `Sim` within 5% by tests/plan.rs). Every buffer
//!   is fp32; `Precision::Bf16` is autocast-style and adds a bf16 copy of each layer matrix
//!   (made on first use) plus bf16 scratch of the matmul operands; frozen layer matrices (the
//!   base under LoRA, every one in the rollout stages) keep the bf16 copy only, and so do the
//!   saved activations but Qwen3's q, k before their norm (xn1, xn2, act, q, k, v, read only by
//!   bf16 matmuls and the tensor-core attention; gate, up, attn, and without recompute the
//!   residual stream's x and x_mid, whose fp32 readers then see their bf16 rounding:
//!   `Backend::store_bf16`). LoRA trains the adapters
//!   only (`crate::model::adapter`: no gradient of a frozen weight). `--recompute` is implemented
//!   (`Transformer::set_recompute`), and so is ZeRO-1 (`ipo train --zero 1`, `zero1` over
//!   `gpus` ranks here; `train_input` callers pass 1 rank without --zero 1). Under ZeRO-1 full
//!   fine-tuning with AdamW keeps on each rank the fp32 master values of its slice of the
//!   flattened trained tensors (the largest rank's: `ceil(trained / gpus)` elements, a buffer
//!   of its own, fp32 backends too) and their AdamW moments; the weights stay whole on every
//!   rank in the storage the products read: under bf16 the layer matrices in bf16 only (as if
//!   frozen), the embeddings, norms, biases and lm-head in fp32 (plus the lm-head's bf16
//!   copy); under fp32 all in fp32. Gradients stay whole fp32. LoRA under ZeRO-1 shards the
//!   adapters' moments only; the adapters stay whole on every rank.
//! - `Layout::Target`: the design. Weights, saved activations, gradients and KV cache in the
//!   compute precision (bf16: 2 bytes); the trained parameters' fp32 master copy and the AdamW
//!   moments (fp32) sharded over the GPUs under ZeRO-1 (`zero1`: master + m + v / gpus; weights
//!   and gradients replicated; without it all replicated); LoRA trains only the adapters (no gradient of a frozen weight); with
//!   `recompute`, each decoder layer keeps only its input and is run again in the backward, so
//!   one layer's activations exist at a time.
//!
//! Both layouts count the same tensors: what `Transformer::forward` saves per layer
//! (`LayerActs`: x, xn1, q, k, v, attn, x_mid, xn2 `[T, *]`, gate, up, act `[T, ffn]`, the
//! rstd and lse statistics, and q/k before their norm on Qwen3), the backward's live set at its
//! largest (the last layer's backward, or the chunked lm-head backward: `[chunk, vocab]` fp32
//! logits, never `[T, vocab]`), and the paged KV cache `[layers][blocks, 2, kv_heads,
//! block_size, head_dim]`. Statistics (rstd, lse, log-probs) and lm-head logits are fp32 in
//! both layouts. Small index arrays (token ids, positions, spans) are left out.

use serde::Serialize;

use super::lora::LoraTarget;
use super::OptimKind;
use crate::backend::Precision;
use crate::model::config::ModelConfig;

/// Which storage the estimate describes (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    ThisBuild,
    Target,
}

/// Rows of lm-head logits one chunk may hold: the CUDA backend's largest chunk, 2^28 fp32
/// elements (1 GiB; `LM_CHUNK_ELEMS_MAX` of src/backend/cuda/mod.rs, used whenever a sixteenth
/// of the free memory exceeds it).
pub(crate) const LM_CHUNK_ELEMS: usize = 1 << 28;
/// Positions per KV-cache block (`--block-size` default of `ipo generate`).
pub(crate) const KV_BLOCK: usize = 16;
/// Prompt tokens prefilled per rollout step (`--prefill-chunk` default).
pub(crate) const PREFILL_CHUNK: usize = 512;

/// What is trained and how; shapes of the largest micro-batch; rollouts; GPUs.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInput {
    pub precision: Precision,
    /// LoRA rank and adapted projections; None = full fine-tuning.
    pub lora: Option<(usize, Vec<LoraTarget>)>,
    pub optimizer: OptimKind,
    /// Pairs per optimizer step (FLOPs only) and per forward/backward.
    pub batch_pairs: usize,
    pub micro_pairs: usize,
    /// Tokens of the largest micro-batch (each context once, both segments) and its lm-head
    /// rows (chosen + rejected tokens).
    pub micro_tokens: usize,
    pub micro_rows: usize,
    /// Attended (query, key) pairs of the largest micro-batch, causal, summed over its pairs.
    pub micro_attn_pairs: f64,
    /// Sequences decoded together and positions each holds (prompt + completion).
    pub rollout_batch: usize,
    pub rollout_len: usize,
    pub recompute: bool,
    /// GPUs training data parallel, and whether ZeRO-1 shards the optimizer side (fp32 master
    /// and AdamW moments of the trained parameters) over them; without it (or on one GPU)
    /// every GPU holds all of it.
    pub gpus: usize,
    pub zero1: bool,
    pub layout: Layout,
}

impl PlanInput {
    /// A training shape of `micro_pairs` pairs of one `context` and two `segment`s each.
    #[allow(clippy::too_many_arguments)]
    pub fn pairs(
        precision: Precision,
        lora: Option<(usize, Vec<LoraTarget>)>,
        batch: usize,
        micro: usize,
        context: usize,
        segment: usize,
        layout: Layout,
    ) -> Self {
        let (c, s) = (context as f64, segment as f64);
        PlanInput {
            precision,
            lora,
            optimizer: OptimKind::Adamw,
            batch_pairs: batch,
            micro_pairs: micro,
            micro_tokens: micro * (context + 2 * segment),
            micro_rows: micro * 2 * segment,
            micro_attn_pairs: micro as f64 * (c * (c + 1.0) / 2.0 + 2.0 * (s * c + s * (s + 1.0) / 2.0)),
            rollout_batch: 0,
            rollout_len: 0,
            recompute: false,
            gpus: 1,
            zero1: false,
            layout,
        }
    }
}

/// Bytes per GPU of each component.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Memory {
    /// Weights the forward reads: frozen base (LoRA) or all weights, in their storage dtype
    /// (this build with bf16: plus the bf16 copies of the layer matrices, or, full fine-tuning
    /// under ZeRO-1, the layer matrices in bf16 only).
    pub weights: u64,
    /// fp32 master copy of the trained parameters, where it is not the weights themselves
    /// (this build: LoRA's adapters, or the rank's slice under ZeRO-1).
    pub master: u64,
    pub gradients: u64,
    /// AdamW m and v (fp32).
    pub optimizer: u64,
    /// Activations saved for the backward of the largest micro-batch.
    pub activations: u64,
    /// Transients of the training step at its peak (backward live set, lm-head chunk).
    pub workspace: u64,
    /// Weights of the rollout stages (`ipo generate` / `intervene`: frozen, so this build
    /// keeps its layer matrices in bf16 only under bf16).
    pub rollout_weights: u64,
    /// Paged KV cache of `rollout_batch` sequences of `rollout_len` positions.
    pub kv_cache: u64,
    /// Transients of a rollout step (prefill chunk, logits).
    pub rollout_workspace: u64,
}

impl Memory {
    pub fn training(&self) -> u64 {
        self.weights + self.master + self.gradients + self.optimizer + self.activations + self.workspace
    }
    /// Rollouts run as their own stage (`ipo generate` / `intervene`), with the weights only.
    pub fn rollout(&self) -> u64 {
        if self.kv_cache == 0 {
            return 0;
        }
        self.rollout_weights + self.kv_cache + self.rollout_workspace
    }
    /// The larger of the two stages: what the GPU must hold.
    pub fn total(&self) -> u64 {
        self.training().max(self.rollout())
    }
}

/// FLOPs of one optimizer step and of one decoded token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Flops {
    pub train_step: f64,
    pub rollout_token: f64,
}

/// Element counts the estimate is made of.
struct Counts {
    params: u64,
    /// Layer matrices (q, k, v, o, gate, up, down of every layer).
    layer_mats: u64,
    /// Adapter parameters (A and B) under LoRA.
    adapters: u64,
}

fn counts(c: &ModelConfig, lora: &Option<(usize, Vec<LoraTarget>)>) -> Counts {
    let u = |x: usize| x as u64;
    let (h, q, kv, f) = (u(c.hidden_size), u(c.q_dim()), u(c.kv_dim()), u(c.intermediate_size));
    let layer_mats = u(c.num_layers) * (2 * q * h + 2 * kv * h + 3 * f * h);
    let mut adapters = 0;
    if let Some((r, targets)) = lora {
        for t in targets {
            let (o, i) = t.dims(c);
            adapters += u(c.num_layers) * u(*r) * u(o + i);
        }
    }
    Counts {
        params: c.param_count().unwrap_or(u64::MAX),
        layer_mats,
        adapters,
    }
}

/// Memory per GPU of `p` for model `c`.
pub fn memory(c: &ModelConfig, p: &PlanInput) -> Memory {
    let n = counts(c, &p.lora);
    let u = |x: usize| x as u64;
    let (h, q, kv, f, hd) = (u(c.hidden_size), u(c.q_dim()), u(c.kv_dim()), u(c.intermediate_size), u(c.head_dim));
    let (nh, nkv, layers, vocab) = (u(c.num_heads), u(c.num_kv_heads), u(c.num_layers), u(c.vocab_size));
    let (t, r) = (u(p.micro_tokens), u(p.micro_rows));
    let this = p.layout == Layout::ThisBuild;
    let bf16 = p.precision == Precision::Bf16;
    // Bytes of a weight, an activation and a KV value; the fp32 statistics are 4.
    let e: u64 = if this || !bf16 { 4 } else { 2 };
    // Ranks the optimizer side is split over.
    let shards = if p.zero1 { u(p.gpus.max(1)) } else { 1 };
    let adamw = p.optimizer == OptimKind::Adamw;
    let moments = if adamw { 8 } else { 0 };
    let lora = p.lora.is_some();
    let trained = if lora { n.adapters } else { n.params };

    let mut m = Memory::default();
    if this {
        // Every weight fp32 and its bf16 copy where a matmul reads it whole; with bf16 and
        // LoRA the frozen layer matrices keep the bf16 copy only (`Transformer::freeze`).
        // LoRA's A and B (fp32) are the trained parameters themselves. The rollout stages
        // freeze the layer matrices.
        // Under bf16 the lm-head's GEMMs read a bf16 copy of its weight too.
        let head16 = if bf16 { 2 * vocab * h } else { 0 };
        let frozen = if bf16 { 4 * (n.params - n.layer_mats) + 2 * n.layer_mats + head16 } else { 4 * n.params };
        // ZeRO-1 of full fine-tuning (AdamW, more than one rank): the fp32 master values of
        // the rank's slice in a buffer of their own; the whole weights stored as the products
        // read them, the layer matrices as if frozen.
        let master_slice = !lora && adamw && shards > 1;
        m.weights = match (bf16, lora) {
            (true, false) if !master_slice => 4 * n.params + 2 * n.layer_mats + head16,
            _ => frozen,
        };
        m.rollout_weights = frozen;
        m.master = if lora {
            4 * n.adapters
        } else if master_slice {
            4 * trained.div_ceil(shards)
        } else {
            0
        };
        // dW of every weight, or LoRA's dA and dB.
        m.gradients = 4 * trained;
        m.optimizer = moments * trained.div_ceil(shards);
    } else {
        m.weights = e * n.params;
        m.rollout_weights = m.weights;
        m.master = if lora || bf16 { 4 * trained / shards } else { 0 };
        m.gradients = if lora { 4 * n.adapters } else { e * n.params };
        m.optimizer = moments * trained / shards;
    }

    // Saved per layer and token: x, xn1, x_mid, xn2 [hidden]; q, attn [q_dim]; k, v [kv_dim];
    // gate, up, act [ffn]; Qwen3 also q, k before their norm. fp32: rstd1, rstd2, lse [heads]
    // (+ the q/k norm rstd per head on Qwen3). Under bf16 this build too stores xn1, xn2, q,
    // k, v and act (read only by bf16 matmuls and the tensor-core attention) and gate, up and
    // attn (read also by SwiGLU's backward and the attention backward's D, in fp32 math on
    // the rounded values) in bf16 (`Backend::store_bf16`), and without recompute x and x_mid
    // too (read by RMSNorm's backward; under recompute x is what the layer runs from again, and
    // the rebuilt layer keeps them fp32); Qwen3's q, k before their norm stay fp32.
    let qk = c.qk_norm as u64;
    let e16: u64 = if bf16 { 2 } else { e };
    let residual16 = if p.recompute { 0 } else { 2 * h };
    let layer_bf16 = 2 * h + 2 * q + 2 * kv + 3 * f + residual16;
    let layer_big = 4 * h + 2 * q + 2 * kv + 3 * f + qk * (q + kv);
    let layer_stats = 2 + nh + qk * (nh + nkv);
    let layer = t * (e16 * layer_bf16 + e * (layer_big - layer_bf16) + 4 * layer_stats);
    // After the layers: x and h around the final norm [T, hidden], its rstd [T]; per lm-head
    // row the log-prob, lse and dL/dlogp.
    let tail = t * (2 * e * h + 4) + 12 * r;
    m.activations = if p.recompute {
        // Layer inputs only; in the backward of the last layer its activations are rebuilt
        // (holding its input) beside the inputs of the layers below.
        layers.saturating_sub(1) * t * e * h + layer + tail
    } else {
        layers * layer + tail
    };

    // The backward's live set at its peak, besides the saved activations: either inside the
    // chunked lm-head backward (dh [T, hidden], gathered rows and their gradient [chunk,
    // hidden] x 2, logits [chunk, vocab] fp32), or in a layer's backward, the largest of:
    // the SwiGLU backward (dout [T, hidden], dact, dgate, dup [T, ffn]); the end of the layer
    // (dout, dxn2, dx_mid, dxn1, dx [T, hidden]; dattn, dq [T, q_dim]; dk, dv [T, kv_dim]);
    // on Qwen3 the q/k norm backward (dout, dxn2, dx_mid; dattn, dq and dq before the norm;
    // dk, dv and dk before the norm). This build adds the RoPE cos/sin table [T, head_dim]
    // and, with bf16, the matmul operands' bf16 scratch (largest: dgate for dW_gate, while
    // dout, dxn2, dgate and dup exist; xn2 is stored in bf16 already).
    let chunk = (LM_CHUNK_ELEMS as u64 / vocab.max(1)).clamp(1, r.max(1));
    // This build under bf16 rounds the chunk's logit gradients and rows into bf16 scratch for
    // the tensor-core GEMMs.
    let lm16 = if this && bf16 { chunk * (2 * vocab + 2 * h) } else { 0 };
    let lm_head = t * e * h + chunk * (4 * vocab + 8 * h) + lm16;
    let swiglu = t * e * (h + 3 * f);
    let end = t * e * (5 * h + 2 * q + 2 * kv);
    let qk_moment = t * e * (3 * h + 3 * q + 3 * kv);
    let bf16_moment = if this && bf16 { t * (e * (2 * h + 2 * f) + 2 * f) } else { 0 };
    let layer_bwd = end.max(swiglu).max(bf16_moment).max(qk * qk_moment);
    let rope = if this { 4 * t * hd } else { 0 };
    m.workspace = lm_head.max(layer_bwd) + rope;

    // Rollouts: ceil(len / block) blocks per sequence, 2 (k, v) x kv_dim values per position
    // and layer; a step holds one prefill chunk's layer activations and the logits of the batch.
    if p.rollout_batch > 0 && p.rollout_len > 0 {
        let blocks = u(p.rollout_batch) * u(p.rollout_len.div_ceil(KV_BLOCK));
        // This build's CUDA cache is bf16 under bf16 too (`Backend::kv_alloc`).
        let kv_e = if bf16 { 2 } else { 4 };
        m.kv_cache = blocks * u(KV_BLOCK) * layers * 2 * kv * kv_e;
        let prefill = u(PREFILL_CHUNK.min(p.rollout_batch * p.rollout_len));
        m.rollout_workspace = prefill * e * (3 * h + q + 2 * kv + 3 * f) + 4 * vocab * u(p.rollout_batch);
    }
    m
}

/// FLOPs of one optimizer step (`batch_pairs` pairs, each `micro_tokens / micro_pairs` tokens)
/// and of one rollout token at an average context of half `rollout_len`. Matmuls: 2 FLOPs per
/// weight and token forward, 4 backward (dX and dW): 6 N T for full fine-tuning; with LoRA the
/// frozen weights need no dW: 4 N T. The lm-head runs on the scored rows only. Attention:
/// 4 * heads * head_dim FLOPs per attended (query, key) pair forward, twice that backward.
/// With recompute the forward of every layer runs twice.
pub fn flops(c: &ModelConfig, p: &PlanInput) -> Flops {
    let n = counts(c, &p.lora);
    let (h, vocab) = (c.hidden_size as f64, c.vocab_size as f64);
    let per = |x: usize| x as f64 / p.micro_pairs.max(1) as f64; // per pair
    let (t, r, a) = (per(p.micro_tokens), per(p.micro_rows), p.micro_attn_pairs / p.micro_pairs.max(1) as f64);
    let layers = c.num_layers as f64;
    let attn_fwd = 4.0 * (c.num_heads * c.head_dim) as f64 * a * layers;
    let mats_fwd = 2.0 * n.layer_mats as f64 * t + 2.0 * vocab * h * r;
    let bwd_factor = if p.lora.is_some() { 1.0 } else { 2.0 };
    let adapters = 6.0 * n.adapters as f64 * t;
    let fwd = mats_fwd + attn_fwd;
    let recompute = if p.recompute { fwd } else { 0.0 };
    let pair = fwd + bwd_factor * mats_fwd + 2.0 * attn_fwd + adapters + recompute;
    let ctx = p.rollout_len as f64 / 2.0;
    let rollout_token = 2.0 * (n.layer_mats as f64 + vocab * h) + 4.0 * (c.num_heads * c.head_dim) as f64 * ctx * layers;
    Flops {
        train_step: pair * p.batch_pairs as f64,
        rollout_token,
    }
}

/// A change of the input that makes it fit, in words, with its estimate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Suggestion {
    pub change: String,
    pub bytes: u64,
}

/// The single changes (LoRA, bf16, recompute, ZeRO-1 over the GPUs given, more GPUs, a
/// smaller micro-batch) that bring the total under `budget` bytes, each computed by re-running
/// `memory`; when none does alone, all of them together (if that fits). `change` names the
/// flags of `ipo plan`, which `ipo train` shares but --gpus (its ranks are the launcher's):
/// more GPUs are offered for `Layout::Target` only.
pub fn suggestions(c: &ModelConfig, p: &PlanInput, budget: u64) -> Vec<Suggestion> {
    let fits = |q: &PlanInput| memory(c, q).total() <= budget;
    let mut all = p.clone();
    let mut out = Vec::new();
    let try_change = |q: PlanInput, what: String, out: &mut Vec<Suggestion>| {
        if fits(&q) {
            out.push(Suggestion {
                change: what,
                bytes: memory(c, &q).total(),
            });
        }
    };
    if p.lora.is_none() {
        let mut q = p.clone();
        q.lora = Some((
            16,
            LoraTarget::ALL.to_vec(),
        ));
        all.lora = q.lora.clone();
        try_change(q, "--lora-rank 16".into(), &mut out);
    }
    // The other precision where it needs less: bf16 in the design; in this build it halves
    // some saved activations but adds bf16 copies of the trained weights, so either way.
    let other = if p.precision == Precision::F32 { Precision::Bf16 } else { Precision::F32 };
    let mut q = p.clone();
    q.precision = other;
    if memory(c, &q).total() < memory(c, p).total() {
        all.precision = other;
        try_change(q, format!("--precision {}", if other == Precision::Bf16 { "bf16" } else { "fp32" }), &mut out);
    }
    if !p.recompute {
        let mut q = p.clone();
        q.recompute = true;
        all.recompute = true;
        try_change(q, "--recompute".into(), &mut out);
    }
    if !p.zero1 && p.gpus > 1 {
        try_change(PlanInput { zero1: true, ..p.clone() }, "--zero 1".into(), &mut out);
    }
    // More GPUs under ZeRO-1 (`ipo plan`'s default there), unless --zero 0 was asked on many.
    if p.layout == Layout::Target && (p.zero1 || p.gpus == 1) {
        let more = |g: usize| PlanInput { gpus: g, zero1: true, ..p.clone() };
        if let Some(g) = [2, 4, 8, 16, 32, 64].into_iter().filter(|&g| g > p.gpus).find(|&g| fits(&more(g))) {
            try_change(more(g), format!("--gpus {g}"), &mut out);
        }
    }
    if p.micro_pairs > 1 {
        let one = |q: &PlanInput, m: usize| PlanInput {
            micro_pairs: m,
            micro_tokens: q.micro_tokens / q.micro_pairs * m,
            micro_rows: q.micro_rows / q.micro_pairs * m,
            micro_attn_pairs: q.micro_attn_pairs / q.micro_pairs as f64 * m as f64,
            ..q.clone()
        };
        if let Some(m) = (1..p.micro_pairs).rev().find(|&m| fits(&one(p, m))) {
            try_change(one(p, m), format!("--micro-batch-size {m}"), &mut out);
        }
        all = one(&all, 1);
    }
    if out.is_empty() && all != *p && fits(&all) {
        let mut words = Vec::new();
        if all.lora != p.lora {
            words.push("--lora-rank 16".to_string());
        }
        if all.precision != p.precision {
            words.push(format!("--precision {}", if all.precision == Precision::Bf16 { "bf16" } else { "fp32" }));
        }
        if all.recompute != p.recompute {
            words.push("--recompute".into());
        }
        if all.micro_pairs != p.micro_pairs {
            words.push("--micro-batch-size 1".into());
        }
        let bytes = memory(c, &all).total();
        out.push(Suggestion {
            change: words.join(" "),
            bytes,
        });
    }
    out
}

/// One pair's lengths: context, chosen and rejected tokens.
pub type PairLens = (usize, usize, usize);

/// The estimate of this build for a trainer of `tc` on `pairs` (the largest micro-batch any
/// step can see: the `micro_batch_size` longest pairs), at `precision`.
pub fn train_input(tc: &super::TrainConfig, precision: Precision, recompute: bool, pairs: &[PairLens]) -> PlanInput {
    let mut by_len: Vec<&PairLens> = pairs.iter().collect();
    by_len.sort_by_key(|p| std::cmp::Reverse(p.0 + p.1 + p.2));
    let worst = &by_len[..tc.micro_batch_size.clamp(1, by_len.len().max(1)).min(by_len.len())];
    let attn = |&&(c, a, b): &&PairLens| {
        let (c, a, b) = (c as f64, a as f64, b as f64);
        c * (c + 1.0) / 2.0 + a * c + a * (a + 1.0) / 2.0 + b * c + b * (b + 1.0) / 2.0
    };
    PlanInput {
        precision,
        lora: tc.lora.as_ref().map(|l| (l.rank, l.targets.clone())),
        optimizer: tc.optim.kind,
        batch_pairs: tc.batch_size,
        micro_pairs: worst.len(),
        micro_tokens: worst.iter().map(|p| p.0 + p.1 + p.2).sum(),
        micro_rows: worst.iter().map(|p| p.1 + p.2).sum(),
        micro_attn_pairs: worst.iter().map(attn).sum(),
        rollout_batch: 0,
        rollout_len: 0,
        recompute,
        gpus: 1,
        zero1: false,
        layout: Layout::ThisBuild,
    }
}

/// Refuses a training run whose estimated peak (`train_input`, this build, under ZeRO-1 over
/// `shards` ranks: the world size under --zero 1, else 1) exceeds `budget`
/// bytes, saying which change of the flags would fit (each computed by the estimator).
/// `longest` is the id of the longest pair (named in the message).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_train_memory(
    c: &ModelConfig,
    tc: &super::TrainConfig,
    precision: Precision,
    recompute: bool,
    shards: usize,
    pairs: &[PairLens],
    longest: &str,
    budget: u64,
) -> Result<(), super::TrainError> {
    let p = PlanInput { gpus: shards, zero1: shards > 1, ..train_input(tc, precision, recompute, pairs) };
    let m = memory(c, &p);
    if m.total() <= budget {
        return Ok(());
    }
    let tries = suggestions(c, &p, budget);
    let fix = if tries.is_empty() {
        "no single change of --micro-batch-size, --lora-rank or --precision fits: shorten the pairs, or use a device with more memory".to_string()
    } else {
        let each: Vec<String> = tries.iter().map(|s| format!("{} ({:.2} GiB)", s.change, gib(s.bytes))).collect();
        format!("try {}", each.join(", or "))
    };
    Err(super::TrainError::Memory(format!(
        "a micro-batch of the {} longest pairs ({} tokens; longest: id {longest}) needs about {:.2} GiB (weights {:.2}, gradients {:.2}, optimizer {:.2}, activations {:.2}, workspace {:.2}; `ipo plan` explains), above the budget of {:.2} GiB (--memory-budget-gb; default: the device's free memory): {fix}",
        p.micro_pairs, p.micro_tokens, gib(m.total()), gib(m.weights + m.master), gib(m.gradients), gib(m.optimizer), gib(m.activations), gib(m.workspace), gib(budget)
    )))
}

/// GiB of `bytes`.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Family;

    fn llama8b() -> ModelConfig {
        ModelConfig {
            family: Family::Llama,
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rope_theta: 5e5,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 131072,
            tie_word_embeddings: false,
            qkv_bias: false,
            qk_norm: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    #[test]
    fn zero1_shards_the_master_and_moments_and_this_build_stores_bf16_matrices() {
        let c = llama8b();
        let one = PlanInput { zero1: true, ..PlanInput::pairs(Precision::Bf16, None, 8, 1, 1024, 1024, Layout::Target) };
        let eight = PlanInput { gpus: 8, ..one.clone() };
        let (a, b) = (memory(&c, &one), memory(&c, &eight));
        assert_eq!((a.weights, a.gradients, a.activations), (b.weights, b.gradients, b.activations));
        assert_eq!(a.optimizer, 8 * b.optimizer);
        assert_eq!(a.master, 8 * b.master);
        // Without ZeRO-1 the 8 GPUs hold what one does.
        assert_eq!(memory(&c, &PlanInput { zero1: false, ..eight.clone() }), a);

        // This build (--zero 1), by whole elements of the largest slice: an fp32 master value
        // (4 bytes) and AdamW m, v (8) per element; the weights whole, the layer matrices
        // (6,979,321,856 values) in bf16 only, the rest fp32, plus the lm-head's bf16 copy
        // (2 x 128256 x 4096 bytes). One GPU keeps today's storage: every weight fp32 (its own
        // master) and a bf16 copy of each layer matrix.
        let (n, mats, head16) = (8_030_261_248u64, 6_979_321_856u64, 2 * 128256 * 4096u64);
        let t1 = PlanInput { layout: Layout::ThisBuild, ..one };
        let at = |p: &PlanInput, g: usize| memory(&c, &PlanInput { gpus: g, ..p.clone() });
        let x = at(&t1, 1);
        assert_eq!((x.weights, x.master, x.optimizer), (4 * n + 2 * mats + head16, 0, 8 * n));
        assert_eq!(x.weights, 47_130_361_856);
        for g in [3, 8] {
            let y = at(&t1, g);
            let slice = n.div_ceil(g as u64);
            assert_eq!((y.weights, y.master, y.optimizer), (4 * (n - mats) + 2 * mats + head16, 4 * slice, 8 * slice), "{g} GPUs");
            assert_eq!(y.weights, 19_213_074_432);
            assert_eq!(y.weights, y.rollout_weights, "{g} GPUs: the rollout stages' storage");
            assert_eq!(Memory { weights: 0, master: 0, optimizer: 0, ..x }, Memory { weights: 0, master: 0, optimizer: 0, ..y });
        }
        assert_eq!((at(&t1, 3).master, at(&t1, 8).master), (4 * 2_676_753_750, 4 * 1_003_782_656));
        // fp32: every weight stays fp32 beside the master slice.
        let f = at(&PlanInput { precision: Precision::F32, ..t1.clone() }, 8);
        assert_eq!((f.weights, f.master, f.optimizer), (4 * n, 4 * 1_003_782_656, 8 * 1_003_782_656));
        // Without ZeRO-1, with SGD (nothing to shard) or under LoRA (the adapters' moments
        // only) the weights are those of one GPU.
        for p in [
            PlanInput { zero1: false, ..t1.clone() },
            PlanInput { optimizer: OptimKind::Sgd, ..t1.clone() },
            PlanInput { lora: Some((16, LoraTarget::ALL.to_vec())), ..t1.clone() },
        ] {
            let (one, eight) = (at(&p, 1), at(&p, 8));
            assert_eq!(Memory { optimizer: 0, ..one }, Memory { optimizer: 0, ..eight }, "{p:?}");
            assert_eq!(eight.optimizer, if p.zero1 { one.optimizer.div_ceil(8) } else { one.optimizer }, "{p:?}");
        }
    }

    #[test]
    fn recompute_keeps_layer_inputs_only() {
        let c = llama8b();
        let p = PlanInput::pairs(Precision::Bf16, Some((16, vec![LoraTarget::Q])), 8, 1, 4096, 4096, Layout::Target);
        let (full, rc) = (memory(&c, &p), memory(&c, &PlanInput { recompute: true, ..p.clone() }));
        // 12288 tokens x 32 layers x 4096 x 2 bytes of layer inputs, about 3 GiB.
        assert!(
            rc.activations < full.activations / 10 && rc.activations > 12288 * 32 * 4096 * 2,
            "{rc:?} vs {full:?}"
        );
        let f = flops(&c, &p).train_step;
        assert!(flops(&c, &PlanInput { recompute: true, ..p }).train_step > f);
    }

    #[test]
    fn lora_trains_at_two_thirds_of_full_flops() {
        let c = llama8b();
        let full = PlanInput::pairs(Precision::Bf16, None, 1, 1, 512, 0, Layout::Target);
        let lora = PlanInput {
            lora: Some((16, vec![LoraTarget::Q])),
            ..full.clone()
        };
        let (a, b) = (flops(&c, &full).train_step, flops(&c, &lora).train_step);
        // 6 N T vs 4 N T (plus the small adapter and attention terms).
        assert!((b / a - 4.0 / 6.0).abs() < 0.02, "{b} / {a}");
        // 2 N per rollout token (N = matrices + lm-head), plus attention.
        let n = (c.param_count().unwrap() - 128256 * 4096) as f64; // the embedding is a lookup
        let rt = flops(&c, &full).rollout_token;
        assert!(rt >= 2.0 * n * 0.99 && rt <= 2.0 * n * 1.01, "{rt} vs {}", 2.0 * n);
    }
}
