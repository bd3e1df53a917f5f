//! `ipo bench`: throughput measurements that run wherever the `ipo` binary runs (no Rust or
//! Python needed), so a GPU machine lent for minutes can be measured with one prepared
//! command (scripts/gpu-check.sh). Everything runs on seeded random data:
//! - `ceiling`: the device's own roofline: a bf16 cuBLAS GEMM's TFLOP/s and a streaming
//!   kernel's GB/s (CUDA only);
//! - `ops`: every workload op (src/backend/workload.rs) at a model's layer shape, with the
//!   FLOPs and bytes it must do, so each time becomes TFLOP/s or GB/s and a share of the ceiling;
//! - `train`: full optimizer steps (segment DPO, forward + backward + AdamW) on a random-weight
//!   model: tokens/s and model FLOPs utilisation;
//! - `decode`: the rollout engine's batched greedy decode: tokens/s and the share of the memory
//!   bandwidth that reading the weights and the KV cache once per step implies;
//! - `init_model`: a random-weight model folder with another folder's config and tokenizer
//!   (a model shaped like the default one, without shipping its weights).

use crate::backend::cuda::{time_ms, CudaBackend, Gemm, GemmInput, Gpu};
use crate::backend::workload::{self, Shape};
use crate::backend::Backend;
use crate::model::config::{Family, ModelConfig};
use crate::model::load::expected_shapes;
use crate::model::transformer::Transformer;
use crate::model::weights::{HostTensor, ModelWeights};
use crate::rollout::{Engine, EngineConfig, Event, Request, SamplingParams};
use crate::train::{OptimConfig, OptimKind, ScheduleKind, TrainConfig, TrainPair, Trainer};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// A model shape the benchmarks know: its config and its layer workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelShape {
    /// SmolLM2-135M (the default model): 30 layers, hidden 576, 9/3 heads x 64, FFN 1536,
    /// vocab 49152.
    Smollm2,
    /// Llama-3.2-1B: 16 layers, hidden 2048, 32/8 heads x 64, FFN 8192, vocab 128256.
    Llama1b,
    /// A tiny shape for checking the benchmarks themselves on a CPU or the simulator.
    Tiny,
}

impl ModelShape {
    pub fn config(self) -> ModelConfig {
        let (vocab, hidden, ffn, layers, heads, kv, theta) = match self {
            ModelShape::Smollm2 => (49152, 576, 1536, 30, 9, 3, 100000.0),
            ModelShape::Llama1b => (128256, 2048, 8192, 16, 32, 8, 500000.0),
            ModelShape::Tiny => (300, 96, 200, 2, 4, 2, 10000.0),
        };
        ModelConfig {
            family: Family::Llama,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: 64,
            rope_theta: theta,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 16384,
            tie_word_embeddings: true,
            qkv_bias: false,
            qk_norm: false,
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    /// The layer workload of `ops`: SmolLM2 at 1024 packed tokens, the 1B Llama at 4096
    /// (a 2048-token prompt with two 1024-token responses), 32 sequences decoding.
    pub fn workload(self) -> Shape {
        let c = self.config();
        let (prompt, response, ctx, kv_blocks) = match self {
            ModelShape::Smollm2 => (512, 256, 1024, 2048),
            ModelShape::Llama1b => (2048, 1024, 4096, 2048),
            ModelShape::Tiny => return workload::SMALL,
        };
        Shape {
            prompt,
            response,
            dim: c.hidden_size,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            ffn: c.intermediate_size,
            vocab: c.vocab_size,
            kv_blocks,
            block_size: 16,
            decode_seqs: 32,
            ctx,
        }
    }
}

/// Matmul parameters of `c` (every projection and the lm head; not the embedding lookup).
pub fn matmul_params(c: &ModelConfig) -> u64 {
    let (h, q, kv, f) = (c.hidden_size as u64, c.q_dim() as u64, c.kv_dim() as u64, c.intermediate_size as u64);
    c.num_layers as u64 * (h * (q + 2 * kv) + q * h + 3 * h * f) + c.vocab_size as u64 * h
}

/// Seeded normal(0, std) values, filled in parallel (64 Ki-element chunks, each its own
/// SplitMix stream), so a billion parameters take seconds, not minutes.
pub fn random_normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, chunk)| {
        let mut r = workload::Rng(seed ^ (i as u64).wrapping_mul(0x9E3779B97F4A7C15));
        let x = r.vec(chunk.len(), std as f64);
        chunk.copy_from_slice(&x);
    });
    v
}

/// A random-weight `shape` model (with `layers` layers, when given) on `backend`.
fn random_model<B: Backend>(backend: B, shape: ModelShape, layers: Option<usize>, seed: u64) -> Result<Transformer<B>> {
    let mut cfg = shape.config();
    if let Some(l) = layers {
        cfg.num_layers = l;
    }
    let w = random_weights(&cfg, seed);
    Ok(Transformer::with_backend(backend, cfg, w)?)
}

/// Random weights for `c`: matrices normal(0, 0.02), norm weights 1.
pub fn random_weights(c: &ModelConfig, seed: u64) -> ModelWeights<HostTensor> {
    let shapes = expected_shapes(c);
    let mut k = 0u64;
    shapes.map(|s| {
        k += 1;
        let n: usize = s.iter().product();
        if s.len() == 1 {
            HostTensor::new(s.clone(), vec![1.0; n])
        } else {
            HostTensor::new(s.clone(), random_normal(n, 0.02, seed.wrapping_add(k.wrapping_mul(0x51ED))))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// ceiling

#[derive(Serialize, serde::Deserialize, Debug, Clone)]
pub struct Ceiling {
    pub device: String,
    /// `n x n x n` bf16 GEMM (fp32 accumulate and output) through cuBLAS.
    pub gemm_n: usize,
    pub gemm_bf16_tflops: f64,
    /// The same GEMM in fp32 (cublasSgemm): the ceiling of today's f32 training path.
    pub gemm_f32_tflops: f64,
    /// `add_assign` over `copy_mib` MiB per operand: two reads and one write per element.
    pub copy_mib: usize,
    pub stream_gbs: f64,
}

fn upload_random_bf16<G: Gpu>(gpu: &G, n: usize, seed: u64) -> Result<u64> {
    let x = random_normal(n, 1.0, seed);
    let bytes: Vec<u8> = x.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
    let p = gpu.alloc(bytes.len())?;
    gpu.htod(p, &bytes)?;
    Ok(p)
}

/// The device's measured roofline: the best of `reps` timed calls after a warm-up.
pub fn ceiling<G: Gpu>(be: &CudaBackend<G>, gemm_n: usize, copy_mib: usize, reps: usize) -> Result<Ceiling> {
    let gpu = be.gpu();
    let n = gemm_n;
    let flops = 2.0 * (n as f64).powi(3);
    let best = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let mut ms = f64::MAX;
        for _ in 0..reps.max(1) {
            let mut r = Ok(());
            let t = time_ms(gpu, 0, || r = f())?;
            r?;
            ms = ms.min(t as f64);
        }
        Ok(ms)
    };
    let (a, b) = (upload_random_bf16(gpu, n * n, 1)?, upload_random_bf16(gpu, n * n, 2)?);
    let c = gpu.alloc(4 * n * n)?;
    let g = Gemm::row_major(a, false, b, true, c, n, n, n, false);
    let ms_bf16 = best(&mut || Ok(gpu.gemm_ex(&g, GemmInput::Bf16)?));
    gpu.free(a);
    gpu.free(b);
    gpu.free(c);
    let ms_bf16 = ms_bf16?;
    let (a, b) = (be.upload(&random_normal(n * n, 1.0, 3)), be.upload(&random_normal(n * n, 1.0, 4)));
    let mut out = be.zeros(n * n);
    let ms_f32 = best(&mut || {
        be.matmul(&a, false, &b, true, &mut out, n, n, n, false);
        Ok(())
    })?;
    drop((a, b, out));
    let elems = copy_mib * 1024 * 1024 / 4;
    let (mut x, y) = (be.upload(&random_normal(elems, 1e-3, 5)), be.upload(&random_normal(elems, 1e-3, 6)));
    let ms_copy = best(&mut || {
        be.add_assign(&mut x, &y);
        Ok(())
    })?;
    Ok(Ceiling {
        device: gpu.name(),
        gemm_n: n,
        gemm_bf16_tflops: flops / ms_bf16 / 1e9,
        gemm_f32_tflops: flops / ms_f32 / 1e9,
        copy_mib,
        stream_gbs: 3.0 * 4.0 * elems as f64 / ms_copy / 1e6,
    })
}

// ---------------------------------------------------------------------------------------------
// ops

/// What bounds an op: its arithmetic or its memory traffic.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    Compute,
    Memory,
}

/// The FLOPs and bytes `op` must do on `s` (model arithmetic, not what a kernel recomputes;
/// bytes: each input read once and each output written once, 4-byte elements).
pub fn op_cost(op: &str, s: &Shape) -> (f64, f64, Bound) {
    let f = |x: usize| x as f64;
    let (t, d, ff, v) = (f(s.tokens()), f(s.dim), f(s.ffn), f(s.vocab));
    let (q, kv) = (f(s.n_heads * s.head_dim), f(s.n_kv_heads * s.head_dim));
    let (p, r) = (f(s.prompt), f(s.response));
    // Causal (query, key) pairs: the prompt, then each response over the prompt and itself.
    let pairs = p * (p + 1.0) / 2.0 + 2.0 * (r * p + r * (r + 1.0) / 2.0);
    let attn_fwd = 4.0 * f(s.head_dim) * pairs * f(s.n_heads);
    let dec_kv = f(s.decode_seqs * s.ctx) * 2.0 * kv;
    let block = f(s.block_size) * 2.0 * kv;
    let opt = f(s.dim * s.dim);
    use Bound::*;
    match op {
        "matmul" => (2.0 * t * d * d, 4.0 * (2.0 * t * d + d * d), Compute),
        "add_assign" => (t * d, 12.0 * t * d, Memory),
        "embedding" => (0.0, 8.0 * t * d, Memory),
        "embedding_bwd" => (t * d, 12.0 * t * d, Memory),
        "rmsnorm" => (4.0 * t * d, 4.0 * (2.0 * t * d + d + t), Memory),
        "rmsnorm_bwd" => (8.0 * t * d, 4.0 * (3.0 * t * d + 2.0 * d + t), Memory),
        "bias_add" => (t * d, 4.0 * (2.0 * t * d + d), Memory),
        "bias_bwd" => (t * d, 4.0 * (t * d + d), Memory),
        "rope" => (6.0 * t * q, 8.0 * t * q, Memory),
        "swiglu" => (6.0 * t * ff, 12.0 * t * ff, Memory),
        "swiglu_bwd" => (12.0 * t * ff, 20.0 * t * ff, Memory),
        "attention" => (attn_fwd, 4.0 * (2.0 * t * q + 2.0 * t * kv), Compute),
        // FlashAttention's convention: the backward is 2.5 forwards (5 matmuls against 2).
        "attention_bwd" => (2.5 * attn_fwd, 4.0 * (4.0 * t * q + 4.0 * t * kv), Compute),
        "lm_head_logprobs" => (2.0 * t * v * d, 4.0 * (v * d + t * d), Compute),
        // dh and dW: two products of the forward's size.
        "lm_head_bwd" => (4.0 * t * v * d, 4.0 * (2.0 * v * d + 2.0 * t * d), Compute),
        "kv_write" => (0.0, 4.0 * 4.0 * t * kv, Memory),
        "kv_copy_blocks" => (0.0, 4.0 * 2.0 * 4.0 * block, Memory),
        "paged_attention" => (4.0 * f(s.decode_seqs * s.ctx) * q, 4.0 * dec_kv, Memory),
        "sample" => (4.0 * f(s.decode_seqs) * v, 4.0 * f(s.decode_seqs) * v, Memory),
        "sum_squares" => (2.0 * opt, 4.0 * opt, Memory),
        "adamw" => (12.0 * opt, 4.0 * 7.0 * opt, Memory),
        "sgd" => (3.0 * opt, 4.0 * 3.0 * opt, Memory),
        "segment_dpo" => (4.0 * r, 4.0 * 2.0 * r, Memory),
        _ => (0.0, 0.0, Memory),
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct OpRow {
    pub op: String,
    pub ms: f64,
    pub gflop: f64,
    pub mbytes: f64,
    pub tflops: f64,
    pub gbs: f64,
    pub bound: Bound,
    /// Share of the ceiling that bounds it (bf16 GEMM peak or streaming bandwidth), when known.
    pub of_peak: Option<f64>,
}

#[derive(Serialize, Debug, Clone)]
pub struct OpsReport {
    pub device: String,
    pub shape: ModelShape,
    pub workload: String,
    pub precision: String,
    pub reps: usize,
    pub rows: Vec<OpRow>,
}

/// Times every workload op at `shape` (mean of `reps` calls after a warm-up, CUDA events).
pub fn ops<G: Gpu>(be: &CudaBackend<G>, shape: ModelShape, reps: usize, ceiling: Option<&Ceiling>, seed: u64) -> Result<OpsReport> {
    let s = shape.workload();
    be.prepare(&[s.head_dim]).context("kernel build")?;
    let mut inputs = workload::prepare(be, s, seed);
    let mut rows = Vec::new();
    for &op in workload::OPS {
        workload::run_op(be, &mut inputs, op);
        let ms = time_ms(be.gpu(), 0, || {
            for _ in 0..reps {
                workload::run_op(be, &mut inputs, op);
            }
        })? as f64
            / reps.max(1) as f64;
        let (flops, bytes, bound) = op_cost(op, &s);
        let (tflops, gbs) = (flops / ms / 1e9, bytes / ms / 1e6);
        let of_peak = ceiling.map(|c| match bound {
            Bound::Compute => tflops / c.gemm_bf16_tflops,
            Bound::Memory => gbs / c.stream_gbs,
        });
        rows.push(OpRow { op: op.to_string(), ms, gflop: flops / 1e9, mbytes: bytes / 1e6, tflops, gbs, bound, of_peak });
    }
    Ok(OpsReport {
        device: be.gpu().name(),
        shape,
        workload: s.describe(),
        precision: format!("{:?}", be.precision()),
        reps,
        rows,
    })
}

// ---------------------------------------------------------------------------------------------
// train

#[derive(Serialize, Debug, Clone)]
pub struct TrainReport {
    pub device: String,
    pub shape: ModelShape,
    pub layers: usize,
    pub params: u64,
    pub pairs: usize,
    pub context: usize,
    pub segment: usize,
    pub micro_batch: usize,
    /// Packed tokens per optimizer step (`[context | chosen | rejected]` per pair).
    pub tokens: usize,
    pub step_seconds: Vec<f64>,
    pub tokens_per_s: f64,
    /// Model FLOPs per step: 6 x matmul params x tokens + attention (forward x 3.5).
    pub tflop_per_step: f64,
    pub tflops: f64,
    /// `tflops` over the measured bf16 GEMM ceiling, when known.
    pub mfu: Option<f64>,
    pub losses: Vec<f64>,
}

/// Full fine-tuning steps (segment DPO, AdamW) of a random-weight `shape` model on `backend`:
/// one warm-up step, then `steps` timed ones.
#[allow(clippy::too_many_arguments)]
pub fn train<B: Backend>(
    backend: B,
    shape: ModelShape,
    layers: Option<usize>,
    pairs: usize,
    context: usize,
    segment: usize,
    micro_batch: usize,
    steps: usize,
    ceiling: Option<&Ceiling>,
    seed: u64,
) -> Result<TrainReport> {
    let device = backend.name();
    let model = random_model(backend, shape, layers, seed)?;
    let cfg = model.cfg.clone();
    let mut r = workload::Rng(seed ^ 0xDA7A);
    let v = cfg.vocab_size;
    let data: Vec<TrainPair> = (0..pairs)
        .map(|i| TrainPair {
            id: format!("bench{i}"),
            context: r.ids(context, v),
            chosen: r.ids(segment, v),
            rejected: r.ids(segment, v),
            // log(1/vocab) per token: what a random model assigns, so the DPO margin starts near 0.
            ref_chosen: -(v as f64).ln() * segment as f64,
            ref_rejected: -(v as f64).ln() * segment as f64,
        })
        .collect();
    let tcfg = TrainConfig {
        beta: 0.1,
        sft_coef: 0.0,
        optim: OptimConfig { kind: OptimKind::Adamw, lr: 1e-6, weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8, max_grad_norm: 1.0, schedule: ScheduleKind::Constant, warmup_ratio: 0.0 },
        batch_size: pairs,
        micro_batch_size: micro_batch.clamp(1, pairs),
        epochs: steps + 1,
        seed,
        lora: None,
        memory_budget: None,
    };
    let mut t = Trainer::new(model, data, tcfg)?;
    let mut losses = vec![t.train_step()?.loss];
    let (mut secs, mut tokens) = (Vec::new(), 0);
    for _ in 0..steps {
        let s = Instant::now();
        let m = t.train_step()?;
        secs.push(s.elapsed().as_secs_f64());
        tokens = m.tokens;
        losses.push(m.loss);
    }
    let mean = secs.iter().sum::<f64>() / secs.len().max(1) as f64;
    let s = Shape { prompt: context, response: segment, ..shape.workload() };
    let attn = op_cost("attention", &s).0 * cfg.num_layers as f64 * pairs as f64;
    let flop = 6.0 * matmul_params(&cfg) as f64 * tokens as f64 + 3.5 * attn;
    let tflops = flop / mean / 1e12;
    Ok(TrainReport {
        device,
        shape,
        layers: cfg.num_layers,
        params: cfg.param_count().unwrap_or(0),
        pairs,
        context,
        segment,
        micro_batch: micro_batch.clamp(1, pairs),
        tokens,
        step_seconds: secs,
        tokens_per_s: tokens as f64 / mean,
        tflop_per_step: flop / 1e12,
        tflops,
        mfu: ceiling.map(|c| tflops / c.gemm_bf16_tflops),
        losses,
    })
}

// ---------------------------------------------------------------------------------------------
// decode

#[derive(Serialize, Debug, Clone)]
pub struct DecodeRow {
    pub batch: usize,
    /// Decode steps replayed as graphs (`Backend::step_begin`): on or off for this row, or
    /// None where the backend has no graphs (the CPU).
    pub graphs: Option<bool>,
    /// The step counters of this row's generation (all zero without graphs).
    pub steps: crate::backend::StepStats,
    pub prompt: usize,
    pub new_tokens: usize,
    pub decode_tokens: u64,
    pub decode_seconds: f64,
    pub tokens_per_s: f64,
    pub prefill_tokens_per_s: f64,
    /// Bytes one decode step must read: every weight once (4, 2, 36/32 or 20/32 bytes per
    /// matmul weight at f32, bf16, q8 or q4, whose lm head is read at q8; norms in f32) plus
    /// the batch's KV cache at the mean context.
    pub gbytes_per_step: f64,
    pub gbs: f64,
    pub of_bandwidth: Option<f64>,
}

#[derive(Serialize, Debug, Clone)]
pub struct DecodeReport {
    pub device: String,
    pub shape: ModelShape,
    pub layers: usize,
    pub rows: Vec<DecodeRow>,
}

/// Greedy batched decode of a random-weight `shape` model at each batch size: `prompt`
/// random tokens per sequence, then exactly `new_tokens` decoded (no EOS). On a backend with
/// step graphs (CUDA) each batch size runs twice, graphs on then off (the same prompts), and
/// the backend's setting is restored at the end.
#[allow(clippy::too_many_arguments)]
pub fn decode<B: Backend>(
    backend: B,
    shape: ModelShape,
    layers: Option<usize>,
    batches: &[usize],
    prompt: usize,
    new_tokens: usize,
    ceiling: Option<&Ceiling>,
    seed: u64,
) -> Result<DecodeReport> {
    let device = backend.name();
    // Bytes per matmul weight: (the layers', the lm head's).
    let per_weight = match backend.precision() {
        crate::backend::Precision::F32 => (4.0, 4.0),
        crate::backend::Precision::Bf16 => (2.0, 2.0),
        crate::backend::Precision::Q8 => (36.0 / 32.0, 36.0 / 32.0),
        crate::backend::Precision::Q4 => (20.0 / 32.0, 36.0 / 32.0),
    };
    let model = random_model(backend, shape, layers, seed)?;
    let cfg = model.cfg.clone();
    let head = (cfg.vocab_size * cfg.hidden_size) as f64;
    let weight_bytes = per_weight.0 * (matmul_params(&cfg) as f64 - head) + per_weight.1 * head + 4.0 * (cfg.num_layers * 2 + 1) as f64 * cfg.hidden_size as f64;
    let mut rows = Vec::new();
    let setting = model.backend.step_graphs();
    let modes: Vec<Option<bool>> = if setting.is_some() { vec![Some(true), Some(false)] } else { vec![None] };
    let runs = std::iter::once((1usize, setting)).chain(batches.iter().flat_map(|&b| modes.iter().map(move |&g| (b, g))));
    for (i, (batch, graphs)) in runs.enumerate() {
        let (p, new) = if i == 0 { (8, 2) } else { (prompt, new_tokens) }; // first: warm-up
        if let Some(on) = graphs {
            model.backend.set_step_graphs(on);
        }
        let before = model.backend.step_stats();
        // The same prompts for both modes of a batch size.
        let mut r = workload::Rng(seed ^ 0xDEC0 ^ batch as u64);
        let block_size = 16;
        let blocks = batch * (p + new).div_ceil(block_size) + 1;
        let ecfg = EngineConfig { num_blocks: blocks, block_size, prefill_chunk: (batch * p).clamp(1, 16384), max_batch: batch };
        let mut e = Engine::new(&model, ecfg)?;
        let reqs: Vec<Request> = (0..batch).map(|k| Request::new(k as u64, 0, r.ids(p, cfg.vocab_size))).collect();
        let params = SamplingParams { max_new_tokens: new, temperature: 0.0, eos_ids: vec![], seed, ..Default::default() };
        let (mut t_prefill, mut t_decode) = (0.0, 0.0);
        let mut last = Instant::now();
        e.generate(reqs, &params, None, |ev| {
            if let Event::Step { prefill, .. } = ev {
                let dt = last.elapsed().as_secs_f64();
                if prefill > 0 {
                    t_prefill += dt;
                } else {
                    t_decode += dt;
                }
                last = Instant::now();
            }
        })?;
        if i == 0 {
            continue;
        }
        let (now, st) = (model.backend.step_stats(), e.stats());
        let step_stats = now.since(&before);
        let steps = (new.saturating_sub(1)).max(1) as f64;
        let kv_bytes = batch as f64 * (p as f64 + new as f64 / 2.0) * (cfg.num_layers * 2 * cfg.kv_dim()) as f64 * 4.0;
        let per_step = weight_bytes + kv_bytes;
        let gbs = per_step * steps / t_decode / 1e9;
        rows.push(DecodeRow {
            batch,
            graphs,
            steps: step_stats,
            prompt: p,
            new_tokens: new,
            decode_tokens: st.decode_tokens,
            decode_seconds: t_decode,
            tokens_per_s: st.decode_tokens as f64 / t_decode,
            prefill_tokens_per_s: st.prefill_tokens as f64 / t_prefill.max(1e-9),
            gbytes_per_step: per_step / 1e9,
            gbs,
            of_bandwidth: ceiling.map(|c| gbs / c.stream_gbs),
        });
    }
    if let Some(on) = setting {
        model.backend.set_step_graphs(on);
    }
    Ok(DecodeReport { device, shape, layers: cfg.num_layers, rows })
}

// ---------------------------------------------------------------------------------------------
// init-model

/// Writes a model folder `out`: `from`'s config.json (with `num_hidden_layers` = `layers` when
/// given), its tokenizer and template files, and seeded random weights of that shape
/// (model.safetensors, f32).
pub fn init_model(from: &Path, out: &Path, layers: Option<usize>, seed: u64) -> Result<ModelConfig> {
    let cfg_path = from.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("{}", cfg_path.display()))?;
    let mut json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", cfg_path.display()))?;
    if let Some(l) = layers {
        if l == 0 {
            bail!("--layers 0: a model needs at least one layer");
        }
        json["num_hidden_layers"] = l.into();
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&json)?)?;
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"] {
        if from.join(f).exists() {
            std::fs::copy(from.join(f), out.join(f)).with_context(|| format!("copy {f} from {}", from.display()))?;
        }
    }
    let cfg = crate::model::load::load_config(out)?;
    let w = random_weights(&cfg, seed);
    let mut tensors = Vec::new();
    w.for_each(|name, t| tensors.push((name.to_string(), t.shape.clone(), t.data.clone())));
    crate::train::st::write_f32_safetensors(&out.join("model.safetensors"), &tensors)?;
    Ok(cfg)
}
