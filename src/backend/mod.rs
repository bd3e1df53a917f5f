//! The `Backend` trait: the small set of fused ops a transformer needs, forward and backward.
//! `CpuBackend<f32>` is the reference (and `CpuBackend<f64>` the exact one for gradient
//! checks); `CudaBackend<G: Gpu>` implements the same trait with kernels.
//!
//! Conventions: buffers are flat and row-major; activations are `[tokens, features]`;
//! matrices are stored as in Hugging Face, `[out_features, in_features]`. Ops that produce
//! activations overwrite their output; ops that produce parameter gradients *accumulate*
//! into it (so gradient accumulation over micro-batches and tied weights need no extra op).

pub mod cpu;
pub mod cuda;
pub mod workload;

/// The reference backend, `CpuBackend<f32>`: the default backend of `Transformer`, and the host
/// arithmetic of reference computations above this layer (`train::optim::Optimizer::step`),
/// which reach it through the `Backend` trait.
pub type Reference = cpu::CpuBackend<f32>;

/// Arithmetic precision of a backend's products (`--precision`, config key `precision`).
/// Buffers, master weights and optimizer state stay f32 in every precision.
/// - `F32`: everything f32 (the reference, and the default).
/// - `Bf16`: matmul operands rounded to bf16 (round to nearest even), products accumulated in
///   f32 (PyTorch autocast's arithmetic). CUDA: cuBLAS bf16 GEMMs and the tensor-core attention
///   forward. CPU: `vdpbf16ps` GEMMs on weights packed once per weight version, and decode
///   products reading bf16 weight rows.
/// - `Q8`: CPU only, for rollouts: weights in blocks of 32 signed bytes with an f32 scale (like
///   llama.cpp's Q8_0), read by the decode products; larger products run as `Bf16` on the
///   same 8-bit weights.
/// - `Q4`: CPU only, for rollouts, as `Q8` with 4-bit weights: blocks of 32 with an f16 scale
///   and an f16 minimum (llama.cpp's Q4_1 blocks, 0.625 bytes per weight); the decode lm head
///   stays 8-bit (`Backend::lm_head_logits`), as llama.cpp's Q4_1 files keep it in Q8_0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    Q8,
    Q4,
}

impl Precision {
    /// `f32` / `fp32` / `float32`, `bf16` / `bfloat16`, `q8` / `q8_0` / `int8`, or `q4` /
    /// `q4_1` / `int4` (case-insensitive).
    pub fn parse(s: &str) -> Result<Precision, PrecisionError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "q8" | "q8_0" | "int8" => Ok(Precision::Q8),
            "q4" | "q4_1" | "int4" => Ok(Precision::Q4),
            other => Err(PrecisionError(format!("precision {other:?}: expected f32, bf16, q8 or q4"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Q8 => "q8",
            Precision::Q4 => "q4",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown precision name.
#[derive(Debug, Clone)]
pub struct PrecisionError(pub String);

impl std::fmt::Display for PrecisionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for PrecisionError {}

/// One run of query tokens in a packed batch and the keys it may see.
/// Query `start + j` attends to keys `[prefix_start, prefix_start + prefix_len)` and
/// `[start, start + j]` (causal within its own run). A plain sequence is one span with no
/// prefix; a preference pair packed as `[context | chosen | rejected]` is three spans whose
/// two branches both name the context as their prefix, so the context is computed once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
    pub prefix_start: usize,
    pub prefix_len: usize,
}

/// The attention structure of a packed batch: spans cover the tokens, in order, without gaps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttnLayout {
    pub spans: Vec<Span>,
}

impl AttnLayout {
    /// Independent causal sequences of the given lengths, packed back to back.
    pub fn sequences(lens: &[usize]) -> Self {
        let mut start = 0;
        let spans = lens
            .iter()
            .map(|&len| {
                let s = Span { start, len, prefix_start: start, prefix_len: 0 };
                start += len;
                s
            })
            .collect();
        Self { spans }
    }
    pub fn num_tokens(&self) -> usize {
        self.spans.last().map_or(0, |s| s.start + s.len)
    }
}

/// Head geometry for the attention ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Geometry of one layer's paged KV cache buffer:
/// `[num_blocks, 2 (k, v), n_kv_heads, block_size, head_dim]`, so the keys of one KV head in
/// one block are `block_size` contiguous rows. A token's *slot* is
/// `block * block_size + offset_in_block`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeom {
    pub num_blocks: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvGeom {
    /// Scalars in one layer's cache buffer.
    pub(crate) fn layer_len(&self) -> usize {
        self.num_blocks * 2 * self.n_kv_heads * self.block_size * self.head_dim
    }
    /// Scalars of one block (k and v, all KV heads) in one layer.
    pub(crate) fn block_len(&self) -> usize {
        2 * self.n_kv_heads * self.block_size * self.head_dim
    }
}

/// One sequence of a paged-attention call: its `q_len` new query tokens are rows
/// `[q_start, q_start + q_len)` of q and sit at the end of its `ctx_len` cached keys (their
/// K/V already written), so query `j` sees keys `[0, ctx_len - q_len + j]`. The keys live in
/// the blocks `block_table[table_start .. table_start + ceil(ctx_len / block_size)]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedSeq {
    pub q_start: usize,
    pub q_len: usize,
    pub ctx_len: usize,
    pub table_start: usize,
}

/// One AdamW update of one tensor: PyTorch's `AdamW` with decoupled weight decay, as
/// `train::optim::Optimizer` applies it, with the gradient scaled first (the clipping factor):
/// `g' = g * grad_scale; m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g' g';
/// p *= 1 - lr wd; p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)`. The coefficients are
/// computed in f64 and rounded once to the buffer's scalar; every operation after that is
/// rounded to the scalar in this order (f32 buffers: no fused multiply-adds), so the CPU
/// reference and the kernels agree bit for bit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay of this tensor (0 for norms and biases).
    pub weight_decay: f64,
    /// Gradients are multiplied by this first (the global-norm clipping factor; 1 = off).
    pub grad_scale: f64,
    /// Bias corrections `1 - beta1^t` and `1 - beta2^t` of update `t` (1-based).
    pub bc1: f64,
    pub bc2: f64,
}

impl AdamwStep {
    /// `[grad_scale, beta1, beta2, 1 - lr * wd, lr / bc1, sqrt(bc2), eps]` in f64, each to be
    /// rounded once to the backend's scalar (`1 - b1` and `1 - b2` are then formed in it).
    pub(crate) fn coefficients(&self) -> [f64; 7] {
        [self.grad_scale, self.beta1, self.beta2, 1.0 - self.lr * self.weight_decay, self.lr / self.bc1, self.bc2.sqrt(), self.eps]
    }
}

/// One preference pair in the log-prob rows of a packed micro-batch (`Batch::push_pair`): the
/// chosen segment is rows `[chosen_start, chosen_start + chosen_len)`, the rejected one
/// likewise; `ref_*` are the frozen reference model's log-prob sums over the same segments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SegmentPair {
    pub chosen_start: u32,
    pub chosen_len: u32,
    pub rejected_start: u32,
    pub rejected_len: u32,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
}

/// The scalars of the masked-segment DPO loss of a micro-batch that is part of an optimizer
/// batch of `batch_pairs` pairs with `batch_chosen_tokens` chosen tokens:
/// `L = mean_i softplus(-beta z_i) + sft_coef (sum_i -chosen_i) / batch_chosen_tokens` with
/// `z_i = (chosen_i - ref_chosen_i) - (rejected_i - ref_rejected_i)` (the loss of IPO,
/// `train::loss`, whose reported values use `grads` too).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SegmentDpo {
    pub beta: f64,
    pub sft_coef: f64,
    pub batch_pairs: usize,
    pub batch_chosen_tokens: usize,
}

impl SegmentDpo {
    /// `(dL / d chosen_i, dL / d rejected_i)` of a pair with margin `z` (see the loss above),
    /// in f64 in this order, as kernels/dpo.cu computes it:
    /// `g = -beta sigmoid(-beta z) / batch_pairs`, `(g - sft_coef / batch_chosen_tokens, -g)`.
    pub fn grads(&self, z: f64) -> (f64, f64) {
        let n = self.batch_pairs.max(1) as f64;
        let tokens = self.batch_chosen_tokens.max(1) as f64;
        // 1 / (1 + exp(-x)) without overflow.
        let sigmoid = |x: f64| {
            if x >= 0.0 {
                1.0 / (1.0 + (-x).exp())
            } else {
                let e = x.exp();
                e / (1.0 + e)
            }
        };
        let g = -self.beta * sigmoid(-self.beta * z) / n;
        (g - self.sft_coef / tokens, -g)
    }
}

/// SplitMix64's finaliser of `x + golden ratio`: a bijective 64-bit mix (the counter-based
/// draws of `Backend::sample`; also a seeded hash elsewhere).
#[inline]
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform draw in [0, 1) for the token at absolute `position` of sample `sample` of the
/// prompt with key `key`: `mix64(mix64(mix64(mix64(seed) ^ key) ^ sample) ^ position)`, top 53
/// bits. A counter-based hash, not a stream, so a token's draw does not depend on batch size,
/// scheduling order, preemption or thread count, and kernels/sampling.cu repeats it exactly.
pub fn uniform(seed: u64, key: u64, sample: u32, position: u32) -> f64 {
    let z = mix64(mix64(mix64(mix64(seed) ^ key) ^ sample as u64) ^ position as u64);
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// One row of a batched sampling call (`Backend::sample`): how to pick (`temperature == 0` or
/// `top_k == 1` is greedy; `top_k` 0 and `top_p` 1 keep every token), and the counters of the
/// row's random draw (`uniform(seed, key, sample, position)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleRow {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    pub key: u64,
    pub sample: u32,
    pub position: u32,
}

impl SampleRow {
    /// The row's uniform draw in [0, 1).
    pub fn uniform(&self) -> f64 {
        uniform(self.seed, self.key, self.sample, self.position)
    }
    /// Whether the row takes the argmax (no random draw).
    pub fn greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// Counters of the steps bracketed by `Backend::step_begin` / `step_end` on a backend that
/// replays them as graphs (the CUDA backend, cuda/graphs.rs); all zero elsewhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepStats {
    /// Steps begun.
    pub steps: u64,
    /// Steps that ran as one launch of a graph captured before.
    pub replayed: u64,
    /// Steps captured into a new graph (then launched as one).
    pub captured: u64,
    /// Steps recorded and then issued op by op: the first sighting of their work.
    pub first_seen: u64,
    /// Steps that ran op by op for another reason: graphs off, too many tokens, a host sync
    /// mid-step (`synced`), a buffer of the previous step still alive (`outputs_alive`), a
    /// capture that failed (`capture_failures`).
    pub ungraphed: u64,
    pub synced: u64,
    pub outputs_alive: u64,
    pub capture_failures: u64,
    /// Graphs held now.
    pub graphs: u64,
}

impl StepStats {
    /// The counts since `before` (graphs: held now).
    pub fn since(&self, before: &StepStats) -> StepStats {
        StepStats {
            steps: self.steps - before.steps,
            replayed: self.replayed - before.replayed,
            captured: self.captured - before.captured,
            first_seen: self.first_seen - before.first_seen,
            ungraphed: self.ungraphed - before.ungraphed,
            synced: self.synced - before.synced,
            outputs_alive: self.outputs_alive - before.outputs_alive,
            capture_failures: self.capture_failures - before.capture_failures,
            graphs: self.graphs,
        }
    }
}

/// The fused ops of a decoder-only transformer. Shapes are given in the docs of each op.
pub trait Backend: Send + Sync {
    /// A device buffer of scalars (f32 on the CPU reference, bf16/f32 on CUDA).
    type Buf: Send + Sync;

    fn name(&self) -> String;
    /// Builds what the ops on models of these head dims need (the CUDA backend: compiles and
    /// loads every kernel file), so that a build failure is an error here, where a model is
    /// put on the backend, and not a panic inside an op. Nothing to do on the CPU.
    fn prepare(&self, head_dims: &[usize]) -> anyhow::Result<()> {
        let _ = head_dims;
        Ok(())
    }
    /// Bytes this backend can still allocate, where it has its own memory (a GPU); None
    /// where buffers live in host memory.
    fn memory_free(&self) -> Option<u64> {
        None
    }
    /// The precision of the products (what `train::plan` estimates memory for).
    fn precision(&self) -> Precision {
        Precision::F32
    }
    /// Brackets one step of the KV-cached forward (`Transformer::forward_cached`) of `tokens`
    /// new tokens, with `step_end`: a backend may hold back the step's device work and run it
    /// as one graph (the CUDA backend, cuda/graphs.rs). Buffers made in the step and returned
    /// out of it (the logits) are valid until the next `step_begin`; dropping them before then
    /// is what lets the next step reuse their memory. Nothing on the CPU.
    fn step_begin(&self, tokens: usize) {
        let _ = tokens;
    }
    fn step_end(&self) {}
    /// Whether steps run as graphs (None: this backend has no graphs).
    fn step_graphs(&self) -> Option<bool> {
        None
    }
    /// Turns step graphs on or off (nothing where there are none).
    fn set_step_graphs(&self, on: bool) {
        let _ = on;
    }
    fn step_stats(&self) -> StepStats {
        StepStats::default()
    }
    fn zeros(&self, n: usize) -> Self::Buf;
    fn upload(&self, host: &[f32]) -> Self::Buf;
    /// `upload` of model weights: a backend may keep derived copies (the CUDA backend's bf16
    /// copy for `Precision::Bf16` matmuls), refreshed when an optimizer op updates them.
    fn upload_weight(&self, host: &[f32]) -> Self::Buf {
        self.upload(host)
    }
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    /// Marks a weight (from `upload_weight`) that will not change again and that only
    /// `matmul`/`matmul_scaled` and `download` read from now on: a backend may then keep it in
    /// its compute precision only (the CUDA backend under `Precision::Bf16` keeps the bf16
    /// copy its matmuls read and frees the fp32 values; `download` returns the bf16 values).
    fn freeze_weight(&self, _w: &mut Self::Buf) {}
    /// Marks an activation saved for the backward that from now on is read only as a
    /// `matmul`/`matmul_scaled` operand, as q, k, v or the output of `attention_bwd`, as gate
    /// or up of `swiglu_bwd`, or by `download`: a backend may keep it in its compute precision
    /// only (the CUDA backend under `Precision::Bf16` keeps the bf16 rounding, RNE, and frees
    /// the fp32 values: half the bytes). For xn1, xn2, act, q, k and v no result changes (the
    /// bf16 matmuls and tensor-core attention round them to the same bits); gate, up and the
    /// attention output are read by fp32 math, so their rounding changes the gradients within
    /// bf16's bounds (tests/cuda_sim_bf16.rs). The transformer calls it on each of these
    /// (`StoreBf16` selects which, for tests); the CPU backend keeps everything.
    fn store_bf16(&self, _buf: &mut Self::Buf) {}
    /// A zeroed KV cache of `len` values for `kv_write` / `kv_copy_blocks` /
    /// `paged_attention` (one layer, `KvGeom::layer_len`): fp32 by default; a backend may
    /// store it narrower (the CUDA backend under `Precision::Bf16`: bf16).
    fn kv_alloc(&self, len: usize) -> Self::Buf {
        self.zeros(len)
    }
    /// Bytes per value of what `kv_alloc` makes (sizes the KV pool from `--kv-cache-mb`).
    fn kv_bytes_per_value(&self) -> usize {
        4
    }
    /// Like `download`, without rounding to f32 where the buffer holds more precision.
    fn download_f64(&self, buf: &Self::Buf) -> Vec<f64> {
        self.download(buf).into_iter().map(f64::from).collect()
    }
    fn len(&self, buf: &Self::Buf) -> usize;

    /// `c[m, n] = op(a) @ op(b) (+ c if accumulate)`, with `op(a)` `[m, k]` and `op(b)`
    /// `[k, n]`; `ta`/`tb` say that `a`/`b` are stored transposed (`[k, m]` / `[n, k]`).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        a: &Self::Buf,
        ta: bool,
        b: &Self::Buf,
        tb: bool,
        c: &mut Self::Buf,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    );

    /// `logits[r, vocab] = h[r, hidden] @ w^T` of a decode step's lm head (`w` `[vocab, hidden]`):
    /// `matmul`, except where a precision keeps the lm head apart (CPU q4 reads it in 8 bits,
    /// as llama.cpp's Q4_1 files keep their output matrix in Q8_0).
    #[allow(clippy::too_many_arguments)]
    fn lm_head_logits(&self, h: &Self::Buf, w: &Self::Buf, logits: &mut Self::Buf, r: usize, vocab: usize, hidden: usize) {
        self.matmul(h, false, w, true, logits, r, vocab, hidden, false)
    }

    /// `c[m, n] = alpha * (op(a) @ op(b)) (+ c if accumulate)`: `matmul` with the product
    /// scaled (LoRA's `s B @ A` and `s dW @ A^T`). The CPU reference rounds the product, then
    /// its scaling, then the sum (three roundings); a GEMM with `alpha` may round fewer times.
    /// The default goes through the host (correct, slow): backends override it.
    #[allow(clippy::too_many_arguments)]
    fn matmul_scaled(
        &self,
        a: &Self::Buf,
        ta: bool,
        b: &Self::Buf,
        tb: bool,
        c: &mut Self::Buf,
        m: usize,
        n: usize,
        k: usize,
        alpha: f64,
        accumulate: bool,
    ) {
        let mut p = self.zeros(m * n); // [m, n] = op(a) @ op(b)
        self.matmul(a, ta, b, tb, &mut p, m, n, k, false);
        let mut ch = self.download(c);
        let alpha = alpha as f32;
        for (o, x) in ch.iter_mut().zip(self.download(&p)) {
            *o = if accumulate { *o + x * alpha } else { x * alpha };
        }
        *c = self.upload(&ch);
    }

    /// `x += y` elementwise (residual connections, gradient sums).
    fn add_assign(&self, x: &mut Self::Buf, y: &Self::Buf);

    /// `out[t, :] = table[ids[t], :]`; table `[vocab, dim]`, out `[tokens, dim]`.
    fn embedding(&self, table: &Self::Buf, ids: &[u32], dim: usize, out: &mut Self::Buf);
    /// `dtable[ids[t], :] += dout[t, :]`.
    fn embedding_bwd(&self, dout: &Self::Buf, ids: &[u32], dim: usize, dtable: &mut Self::Buf);

    /// RMSNorm over rows of `dim`: `out = x * rstd * w`, `rstd[r] = 1/sqrt(mean(x^2) + eps)`.
    /// x, out `[rows, dim]`; w `[dim]`; rstd `[rows]` (saved for the backward).
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, dim: usize, eps: f32, out: &mut Self::Buf, rstd: &mut Self::Buf);
    /// dx (overwritten) and dw (accumulated) of `rmsnorm`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        dim: usize,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
    );

    /// `y[r, :] += b`; y `[rows, dim]`, b `[dim]`.
    fn bias_add(&self, y: &mut Self::Buf, b: &Self::Buf, dim: usize);
    /// `db += sum_r dy[r, :]`.
    fn bias_bwd(&self, dy: &Self::Buf, dim: usize, db: &mut Self::Buf);

    /// Rotate-half RoPE in place on x `[tokens, n_heads, head_dim]`, angle
    /// `positions[t] * inv_freq[i]` for pair `(i, i + head_dim/2)`. `inverse` rotates by the
    /// negative angle, which is the backward of the forward rotation.
    fn rope(&self, x: &mut Self::Buf, positions: &[u32], n_heads: usize, head_dim: usize, inv_freq: &[f64], inverse: bool);

    /// `out = silu(gate) * up`, all `[rows, dim]`.
    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf);
    /// dgate and dup (overwritten) of `swiglu`.
    fn swiglu_bwd(&self, dout: &Self::Buf, gate: &Self::Buf, up: &Self::Buf, dgate: &mut Self::Buf, dup: &mut Self::Buf);

    /// Softmax attention with scale 1/sqrt(head_dim) over the keys each query may see (see
    /// `Span`). q, out `[tokens, n_heads, head_dim]`; k, v `[tokens, n_kv_heads, head_dim]`;
    /// lse `[tokens, n_heads]` = log-sum-exp of the scaled scores (saved for the backward).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        layout: &AttnLayout,
        dims: AttnDims,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    );
    /// dq, dk, dv (overwritten) of `attention`, from dout and the saved out and lse.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        layout: &AttnLayout,
        dims: AttnDims,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    );

    /// Fused lm-head log-probs: for each i, `logp[i] = log softmax(h[rows[i]] @ w^T)[targets[i]]`
    /// without materialising the `[rows, vocab]` logits (chunked over rows, online
    /// log-sum-exp over vocabulary tiles). h `[tokens, dim]`, w `[vocab, dim]`; returns
    /// logp `[n]` and lse `[n]` (saved for the backward). Rows may repeat.
    fn lm_head_logprobs(&self, h: &Self::Buf, w: &Self::Buf, dim: usize, rows: &[u32], targets: &[u32]) -> (Self::Buf, Self::Buf);
    /// Backward of `lm_head_logprobs` given `dlogp[i]`: accumulates into dh `[tokens, dim]`
    /// and, unless the lm-head is frozen (`None`), dw `[vocab, dim]`.
    #[allow(clippy::too_many_arguments)]
    fn lm_head_bwd(
        &self,
        h: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        rows: &[u32],
        targets: &[u32],
        lse: &Self::Buf,
        dlogp: &[f32],
        dh: &mut Self::Buf,
        dw: Option<&mut Self::Buf>,
    );

    // ---- sampling (rollouts; see src/rollout/sampler.rs) ----

    /// The next token of each row of `logits` `[rows.len(), vocab]`: greedy, temperature,
    /// top-k, top-p, with each row's draw `uniform` of its counters, exactly as
    /// `cpu::sample::pick` (the reference). The default downloads the logits and runs the
    /// host sampler; the CUDA backend samples on the device and returns only the ids.
    fn sample(&self, logits: &Self::Buf, vocab: usize, rows: &[SampleRow]) -> Vec<u32> {
        cpu::sample::sample_rows(&self.download(logits), vocab, rows)
    }

    // ---- KV cache (rollouts; see src/rollout/ and src/model/decode.rs) ----

    /// Writes the K/V rows of new tokens into one layer's paged cache:
    /// `cache[slot_block, 0, h, slot_off, :] = k[t, h, :]` (and v into `[.., 1, ..]`) with
    /// `slots[t] = block * block_size + offset`. k, v `[tokens, n_kv_heads, head_dim]`;
    /// cache `[num_blocks, 2, n_kv_heads, block_size, head_dim]` (see `KvGeom`).
    /// The default goes through the host (correct, slow): backends override it.
    fn kv_write(&self, cache: &mut Self::Buf, k: &Self::Buf, v: &Self::Buf, slots: &[u32], geom: KvGeom) {
        let mut c = self.download(cache);
        cpu::kv::write(&mut c, &self.download(k), &self.download(v), slots, geom);
        *cache = self.upload(&c);
    }

    /// Copies whole blocks `src -> dst` (k and v, all heads) inside one layer's cache: the
    /// copy-on-write of a shared partial block before a sequence appends to it.
    fn kv_copy_blocks(&self, cache: &mut Self::Buf, pairs: &[(u32, u32)], geom: KvGeom) {
        let mut c = self.download(cache);
        cpu::kv::copy_blocks(&mut c, pairs, geom);
        *cache = self.upload(&c);
    }

    /// Attention of new query tokens against paged keys/values (prefill chunks and decode
    /// steps alike), scale 1/sqrt(head_dim), causal within each sequence (see `PagedSeq`).
    /// q, out `[tokens, n_heads, head_dim]`; cache as in `kv_write`; `block_table` holds the
    /// block ids of every sequence back to back.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(
        &self,
        q: &Self::Buf,
        cache: &Self::Buf,
        seqs: &[PagedSeq],
        block_table: &[u32],
        geom: KvGeom,
        dims: AttnDims,
        out: &mut Self::Buf,
    ) {
        let mut o = self.download(out);
        cpu::kv::attention(&self.download(q), &self.download(cache), seqs, block_table, geom, dims, &mut o);
        *out = self.upload(&o);
    }

    // ---- optimizer (src/train/optim.rs; fp32 master weights and moments on the backend) ----

    /// `sum_i x[i]^2` accumulated in f64 (the global gradient norm is the square root of the
    /// sum over all gradients). The default goes through the host: backends override it.
    fn sum_squares(&self, x: &Self::Buf) -> f64 {
        cpu::optim::sum_squares(&self.download_f64(x))
    }

    /// `sum_squares` of each buffer, equal to calling it per buffer; a GPU backend waits for
    /// the device once for all of them (the global norm over every gradient tensor).
    fn sum_squares_many(&self, xs: &[&Self::Buf]) -> Vec<f64> {
        xs.iter().map(|x| self.sum_squares(x)).collect()
    }

    /// One AdamW update in place (see `AdamwStep`): p (master weights), m, v (moments) and g
    /// all `[n]`.
    fn adamw(&self, p: &mut Self::Buf, g: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, h: &AdamwStep) {
        assert_eq!(self.len(p), self.len(m), "adamw: p and its moments must have one length");
        self.adamw_at(p, g, 0, m, v, h)
    }

    /// `adamw` of the elements `at..at + n` of p and g `[len]` only, with moments m, v `[n]`:
    /// a rank's slice of a tensor under ZeRO-1 (`train::zero`). The default goes through the
    /// host (correct, slow): backends override it.
    fn adamw_at(&self, p: &mut Self::Buf, g: &Self::Buf, at: usize, m: &mut Self::Buf, v: &mut Self::Buf, h: &AdamwStep) {
        let n = self.len(m);
        let (mut ph, mut mh, mut vh) = (self.download(p), self.download(m), self.download(v));
        cpu::optim::adamw(&mut ph[at..at + n], &self.download(g)[at..at + n], &mut mh, &mut vh, h);
        (*p, *m, *v) = (self.upload(&ph), self.upload(&mh), self.upload(&vh));
    }

    /// One SGD update in place: `p -= lr * (g * grad_scale + weight_decay * p)` (f32 order as
    /// in `adamw`); p, g `[n]`. The default goes through the host: backends override it.
    fn sgd(&self, p: &mut Self::Buf, g: &Self::Buf, lr: f64, weight_decay: f64, grad_scale: f64) {
        let mut ph = self.download(p);
        cpu::optim::sgd(&mut ph, &self.download(g), lr, weight_decay, grad_scale);
        *p = self.upload(&ph);
    }

    // ---- ZeRO-1 (src/train/zero.rs): under `--zero 1` each rank keeps the fp32 master values
    // ---- of its slice of the trained weights; the weights hold what the products read.

    /// A new fp32 buffer `[n]` holding elements `at..at + n` of the weight `w` (from
    /// `upload_weight`): a rank's master slice. The default goes through the host.
    fn weight_slice(&self, w: &Self::Buf, at: usize, n: usize) -> Self::Buf {
        self.upload(&self.download(w)[at..at + n])
    }

    /// Marks a layer matrix (read only by `matmul`/`matmul_scaled` and `download`) whose fp32
    /// values now live in ZeRO-1 master slices: a backend may store it in its compute precision
    /// only, as `freeze_weight` does, while `set_weight_slice` and `all_gather_slices` still
    /// write it. The CUDA backend under `Precision::Bf16` keeps the bf16 values only (half the
    /// bytes; its matmuls read that rounding anyway, so no result changes). The default keeps it.
    fn shard_weight(&self, _w: &mut Self::Buf) {}

    /// Writes the fp32 `src` `[n]` into elements `at..at + n` of the weight `w`, in w's storage
    /// (rounded to bf16, RNE, where `shard_weight` left bf16 only), and drops w's derived
    /// copies. The default goes through the host.
    fn set_weight_slice(&self, w: &mut Self::Buf, at: usize, src: &Self::Buf) {
        let (mut h, s) = (self.download(w), self.download(src));
        h[at..at + s.len()].copy_from_slice(&s);
        *w = self.upload_weight(&h);
    }

    /// `adamw` of a master slice `p` `[n]` with the gradient elements `g[at..at + n]` and the
    /// moments `m`, `v` `[n]` (ZeRO-1's update of a rank's slice). The default goes through the
    /// host: backends override it.
    fn adamw_slice(&self, p: &mut Self::Buf, g: &Self::Buf, at: usize, m: &mut Self::Buf, v: &mut Self::Buf, h: &AdamwStep) {
        let n = self.len(p);
        assert!(self.len(m) == n && self.len(v) == n && at + n <= self.len(g), "adamw_slice: p, m, v [{n}] at {at} of g [{}]", self.len(g));
        let (mut ph, mut mh, mut vh) = (self.download(p), self.download(m), self.download(v));
        cpu::optim::adamw(&mut ph, &self.download(g)[at..at + n], &mut mh, &mut vh, h);
        (*p, *m, *v) = (self.upload(&ph), self.upload(&mh), self.upload(&vh));
    }

    /// `sum_squares` of the elements `range` of each buffer (ZeRO-1: the squares of a rank's
    /// slice of every gradient; the ranks' sums add up to the global norm's square). A GPU
    /// backend waits for the device once. The default goes through the host.
    fn sum_squares_slices(&self, xs: &[(&Self::Buf, std::ops::Range<usize>)]) -> Vec<f64> {
        xs.iter().map(|(x, r)| cpu::optim::sum_squares(&self.download_f64(x)[r.clone()])).collect()
    }

    /// Starts ZeRO-1's gradient reduction: `bufs` summed over the group where each element's
    /// sum is needed by one rank only, its owner: `owners[i]` cuts `bufs[i]` into `(range,
    /// owner rank)` pieces, ascending and covering it. After `all_reduce_wait` every rank's
    /// owned elements hold the sums (the rest may hold anything). Every rank starts the same
    /// buffers with the same pieces in the same order. The default is `all_reduce_start` (every
    /// element summed on every rank: the owners get the same bits). `CudaBackend` with NCCL
    /// enqueues one ncclReduce per piece to its owner, a reduce-scatter: each rank receives
    /// its slice only, half the bytes of an all-reduce.
    fn reduce_scatter_start(
        &self,
        bufs: &mut [&mut Self::Buf],
        owners: &[Vec<(std::ops::Range<usize>, usize)>],
        host_sum: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        assert_eq!(bufs.len(), owners.len(), "reduce_scatter_start: one owner list per buffer");
        self.all_reduce_start(bufs, host_sum)
    }

    /// ZeRO-1's all-gather of the updated weights: `pieces` are `(index into bufs, range,
    /// owner rank)`; afterwards every rank's `bufs[i][range]` equal the owner's, in the
    /// weights' storage (bf16 where `shard_weight` left bf16 only: half the bytes). Every rank
    /// passes the same pieces in the same order; `rank` is this rank and `host_all_gather` the
    /// group's host all-gather (every rank's bytes, rank order). The default: this rank's pieces
    /// downloaded into one byte vector (f32, little-endian), one host all-gather, the other
    /// ranks' pieces written with `set_weight_slice`. `CudaBackend` with NCCL: one
    /// ncclBroadcast per piece from its owner, in one group, waited for before it returns.
    fn all_gather_slices(
        &self,
        rank: usize,
        bufs: &mut [&mut Self::Buf],
        pieces: &[(usize, std::ops::Range<usize>, usize)],
        host_all_gather: &mut dyn FnMut(Vec<u8>) -> anyhow::Result<Vec<Vec<u8>>>,
    ) -> anyhow::Result<()> {
        host_all_gather_slices(self, rank, bufs, pieces, host_all_gather)
    }

    // ---- the masked-segment DPO loss (src/train/loss.rs) ----

    /// Fused loss step of a micro-batch: per pair, the f64 sums of `logp` `[rows]` over its
    /// chosen and rejected segments (returned, for the reported loss values), and
    /// `dlogp` `[rows]` = dL/dlogp: each segment's gradient (`SegmentDpo::grads`, rounded to
    /// f32) on every row of the segment, 0 on rows outside all segments. The default is the
    /// host reference (`cpu::dpo::segment_dpo`); the CUDA backend runs it as one kernel and
    /// keeps `dlogp` on the device for `lm_head_bwd_buf`.
    fn segment_dpo(&self, logp: &Self::Buf, pairs: &[SegmentPair], h: &SegmentDpo) -> (Vec<(f64, f64)>, Self::Buf) {
        let (sums, dlogp) = cpu::dpo::segment_dpo(&self.download_f64(logp), pairs, h);
        (sums, self.upload(&dlogp))
    }

    /// `lm_head_bwd` with `dlogp` `[n]` in a device buffer (from `segment_dpo`). The default
    /// downloads it.
    #[allow(clippy::too_many_arguments)]
    fn lm_head_bwd_buf(
        &self,
        h: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        rows: &[u32],
        targets: &[u32],
        lse: &Self::Buf,
        dlogp: &Self::Buf,
        dh: &mut Self::Buf,
        dw: Option<&mut Self::Buf>,
    ) {
        self.lm_head_bwd(h, w, dim, rows, targets, lse, &self.download(dlogp), dh, dw)
    }

    // ---- data parallel: the group's collectives reach the backend as functions, because the
    // ---- communicator (`crate::dist::Comm`) sits in the layer above.

    /// Joins a data-parallel group of `world` ranks as rank `rank`, so that `all_reduce_sum`
    /// can sum device buffers in place, with every wait bounded by `timeout`. Every rank calls
    /// it together; `all_gather` is the group's host all-gather (every rank's bytes in rank
    /// order). The default does nothing (sums go through the host). `CudaBackend` on a GPU sets
    /// up NCCL (`cuda::nccl`): rank 0's unique id is handed out with one `all_gather`, and a
    /// missing libnccl.so.2 on any rank is an error on every rank, naming it.
    fn join_group(&self, rank: usize, world: usize, timeout: std::time::Duration, all_gather: &mut dyn FnMut(Vec<u8>) -> anyhow::Result<Vec<Vec<u8>>>) -> anyhow::Result<()> {
        let _ = (rank, world, timeout, all_gather);
        Ok(())
    }

    /// Starts summing `bufs` (f32 gradients) over the data-parallel group, in place: the
    /// trainer's gradient all-reduce, one call per decoder layer as the backward finishes it.
    /// `host_sum` is the group's all-reduce of a host vector. Until `all_reduce_wait` returns,
    /// nothing may read, write or free `bufs`; every rank starts the same buffers in the same
    /// order. The default sums at once through the host (`host_all_reduce`: the buffers of
    /// one call through one host vector), so the sum has the host group's bits (rank order,
    /// fp32), elementwise, whatever buffers a call groups. `CudaBackend` on a GPU that joined a
    /// group (`join_group`) enqueues NCCL on its own stream, after the work issued so far, and
    /// returns.
    fn all_reduce_start(&self, bufs: &mut [&mut Self::Buf], host_sum: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>) -> anyhow::Result<()> {
        host_all_reduce(self, bufs, host_sum)
    }

    /// Waits until every `all_reduce_start` since the last wait has summed its buffers (on a
    /// GPU within the group's timeout, aborting the group on a failure). The default has
    /// nothing to wait for.
    fn all_reduce_wait(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// `all_reduce_start` then `all_reduce_wait`.
    fn all_reduce_sum(&self, bufs: &mut [&mut Self::Buf], host_sum: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>) -> anyhow::Result<()> {
        self.all_reduce_start(bufs, host_sum)?;
        self.all_reduce_wait()
    }
}

/// `Backend::all_gather_slices` through the host (its default; also what `CudaBackend` does
/// where it has not joined an NCCL group).
pub fn host_all_gather_slices<B: Backend + ?Sized>(
    be: &B,
    rank: usize,
    bufs: &mut [&mut B::Buf],
    pieces: &[(usize, std::ops::Range<usize>, usize)],
    host_all_gather: &mut dyn FnMut(Vec<u8>) -> anyhow::Result<Vec<Vec<u8>>>,
) -> anyhow::Result<()> {
    let mut mine = Vec::new(); // this rank's pieces, f32 LE, in piece order
    let mut host: Vec<Option<Vec<f32>>> = vec![None; bufs.len()]; // downloads, once per buffer
    for (i, r, owner) in pieces {
        if *owner == rank && !r.is_empty() {
            let h = host[*i].get_or_insert_with(|| be.download(bufs[*i]));
            mine.extend(h[r.clone()].iter().flat_map(|x| x.to_le_bytes()));
        }
    }
    let all = host_all_gather(mine)?;
    for (owner, bytes) in all.iter().enumerate() {
        let want: usize = pieces.iter().filter(|p| p.2 == owner).map(|p| 4 * p.1.len()).sum();
        anyhow::ensure!(bytes.len() == want, "all_gather_slices: rank {owner} sent {} bytes of its weight slices, expected {want}", bytes.len());
        if owner == rank {
            continue;
        }
        let mut at = 0;
        for (i, r, _) in pieces.iter().filter(|p| p.2 == owner && !p.1.is_empty()) {
            let vals: Vec<f32> = bytes[at..at + 4 * r.len()].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            at += 4 * r.len();
            let src = be.upload(&vals);
            be.set_weight_slice(bufs[*i], r.start, &src);
        }
    }
    Ok(())
}

/// `Backend::all_reduce_start` through the host: `bufs` downloaded into one flat vector, summed
/// by `host_sum` (one collective for all of them), and uploaded again in place of the old ones.
pub fn host_all_reduce<B: Backend + ?Sized>(be: &B, bufs: &mut [&mut B::Buf], host_sum: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let lens: Vec<usize> = bufs.iter().map(|b| be.len(b)).collect();
    let mut flat: Vec<f32> = Vec::with_capacity(lens.iter().sum()); // [every element of bufs] f32
    for b in bufs.iter() {
        flat.extend_from_slice(&be.download(b));
    }
    host_sum(&mut flat)?;
    let mut at = 0;
    for (b, n) in bufs.iter_mut().zip(lens) {
        **b = be.upload(&flat[at..at + n]);
        at += n;
    }
    Ok(())
}
