//! `plan`: memory per GPU and FLOPs of a training setup before it runs (`train::plan`), for a
//! model folder or a bare `config.json`; what fits on the GPUs given, and, where it does not,
//! which single change of the flags would fit (each computed by the same estimator).
//!
//! Two estimates come out (`train::plan::Layout`): the plan, for the storage of the design
//! (bf16 weights, activations and KV cache; fp32 master weights and AdamW moments sharded over
//! the GPUs under ZeRO-1; optional per-layer recomputation), which the verdict is about; and
//! this build's, what `ipo train` and the rollout stages allocate today (fp32 buffers; under
//! bf16 the matmuls' bf16 weight copies, frozen weights, the saved activations but the residual
//! stream (and Qwen3's q/k before their norm), and the KV cache in bf16 only; under ZeRO-1 the
//! fp32 master slice and moments, and the layer matrices in bf16 only; recomputation as asked)
//! and what `ipo train` checks before it starts. `--zero` (default: 1 on more than one GPU)
//! applies to both.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::backend::Precision;
use crate::model::config::ModelConfig;
use crate::model::load::{load_config, load_config_file};
use crate::train::lora::LoraTarget;
use crate::train::plan::{flops, memory, suggestions, Flops, Layout, Memory, PlanInput, Suggestion};

/// The flags of `ipo plan`.
#[derive(clap::Args, Debug, Clone)]
pub struct PlanOptions {
    /// Hugging Face model folder (its config.json is read; no weights are needed), or a
    /// config.json file itself.
    #[arg(long, value_name = "DIR|config.json")]
    pub model: PathBuf,
    /// Compute precision: bf16 (bf16 weights, activations and KV cache; fp32 master weights
    /// and optimizer state) or fp32 (everything fp32).
    #[arg(long, value_name = "bf16|fp32", default_value = "bf16", value_parser = parse_precision)]
    pub precision: Precision,
    /// LoRA rank, adapting q,k,v,o,gate,up,down of every layer (`ipo train`'s default
    /// targets); 0 = full fine-tuning.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub lora_rank: usize,
    /// Pairs per optimizer step (scales the FLOPs of a step, not the memory).
    #[arg(long, value_name = "PAIRS", default_value_t = 64)]
    pub batch_size: usize,
    /// Pairs per forward/backward pass: the saved activations grow with it.
    #[arg(long, value_name = "PAIRS", default_value_t = 1)]
    pub micro_batch_size: usize,
    /// Tokens of a pair's shared context (prompt + the reasoning before the cue), computed once
    /// per pair.
    #[arg(long, value_name = "TOKENS", default_value_t = 4096)]
    pub context: usize,
    /// Tokens of each of the chosen and rejected segments; a pair is context + 2 segments.
    #[arg(long, value_name = "TOKENS", default_value_t = 4096)]
    pub segment: usize,
    /// Sequences decoded together by `ipo generate` / `intervene` (--max-batch); 0 = leave
    /// rollouts out.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub rollout_batch: usize,
    /// Positions each rollout holds in the paged KV cache (prompt + completion), in blocks of
    /// 16.
    #[arg(long, value_name = "TOKENS", default_value_t = 8192)]
    pub rollout_len: usize,
    /// Per-decoder-layer activation recomputation: keep only each layer's input and run the
    /// layer's forward again in the backward (one more forward per step), as `ipo train
    /// --recompute` does.
    #[arg(long)]
    pub recompute: bool,
    /// Memory of each GPU, in GB (10^9 bytes, as GPUs are sold: 80 for an H100 80GB).
    #[arg(long, value_name = "GB", default_value_t = 80.0)]
    pub gpu_memory_gb: f64,
    /// GPUs training data parallel; weights, gradients and activations are replicated on each,
    /// the optimizer side as --zero says.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub gpus: usize,
    /// ZeRO stage over the --gpus, as `ipo train --zero`: 1 = the fp32 master weights and AdamW
    /// moments of the trained parameters are sharded over the GPUs (this build, full
    /// fine-tuning: each GPU keeps the fp32 master and moments of its 1/N slice, and under bf16
    /// the layer matrices in bf16 only; LoRA: the adapters' moments); 0 = every GPU holds all
    /// of it. Default: 1 with --gpus > 1, else 0 (on one GPU both are the same).
    #[arg(long, value_name = "0|1", value_parser = clap::value_parser!(u8).range(0..=1))]
    pub zero: Option<u8>,
}

impl PlanOptions {
    /// Whether ZeRO-1 is in effect: --zero, or its default (1 with more than one GPU).
    pub fn zero1(&self) -> bool {
        self.zero.map_or(self.gpus > 1, |z| z == 1)
    }
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    match Precision::parse(s) {
        Ok(p @ (Precision::F32 | Precision::Bf16)) => Ok(p),
        _ => Err(format!("`{s}`: expected bf16 or fp32")),
    }
}

/// One estimate: the memory per GPU, whether it fits, and what would.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Estimate {
    pub layout: Layout,
    pub memory: Memory,
    pub training_bytes: u64,
    pub rollout_bytes: u64,
    pub total_bytes: u64,
    pub fits: bool,
    /// Bytes left per GPU (negative: missing).
    pub spare_bytes: i64,
    pub suggestions: Vec<Suggestion>,
}

/// What `plan` found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlanSummary {
    pub config: PathBuf,
    pub params: u64,
    /// Tokens and lm-head rows of a micro-batch.
    pub micro_tokens: usize,
    pub micro_rows: usize,
    pub gpus: usize,
    /// The ZeRO stage of both estimates (--zero or its default).
    pub zero: u8,
    pub gpu_memory_bytes: u64,
    /// The design's storage: the verdict.
    pub plan: Estimate,
    /// What `ipo train` allocates today at the same --zero (it checks this before it starts).
    pub this_build: Estimate,
    pub flops: Flops,
}

/// The config.json `--model` names (a folder's, or the file itself).
fn read_config(path: &Path) -> Result<(PathBuf, ModelConfig)> {
    if path.is_dir() {
        return Ok((path.join("config.json"), load_config(path).context("--model")?));
    }
    if !path.exists() {
        bail!("--model {}: no such folder or config.json", path.display());
    }
    Ok((path.to_path_buf(), load_config_file(path).context("--model")?))
}

pub fn plan(o: &PlanOptions) -> Result<PlanSummary> {
    let (config, cfg) = read_config(&o.model)?;
    for (flag, v) in [
        ("--batch-size", o.batch_size),
        ("--micro-batch-size", o.micro_batch_size),
        ("--context", o.context),
        ("--gpus", o.gpus),
    ] {
        if v == 0 {
            bail!("{flag} must be > 0");
        }
    }
    if o.micro_batch_size > o.batch_size {
        bail!("--micro-batch-size ({}) must be <= --batch-size ({})", o.micro_batch_size, o.batch_size);
    }
    if !(o.gpu_memory_gb > 0.0 && o.gpu_memory_gb.is_finite()) {
        bail!("--gpu-memory-gb must be > 0");
    }
    let len = o.context + 2 * o.segment;
    if len > cfg.max_position_embeddings || o.rollout_len > cfg.max_position_embeddings {
        bail!(
            "--context + --segment ({len} positions) and --rollout-len ({}) must fit the model's max_position_embeddings ({}, {})",
            o.rollout_len,
            cfg.max_position_embeddings,
            config.display()
        );
    }
    let params = cfg
        .param_count()
        .with_context(|| format!("{}: the parameter count overflows", config.display()))?;
    let all = LoraTarget::ALL.to_vec();
    let lora = (o.lora_rank > 0).then_some((o.lora_rank, all));
    let mut input = PlanInput::pairs(o.precision, lora, o.batch_size, o.micro_batch_size, o.context, o.segment, Layout::Target);
    input.rollout_batch = o.rollout_batch;
    input.rollout_len = o.rollout_len;
    input.recompute = o.recompute;
    input.gpus = o.gpus;
    input.zero1 = o.zero1();
    let budget = (o.gpu_memory_gb * 1e9) as u64;
    let estimate = |layout: Layout| {
        let p = PlanInput { layout, ..input.clone() };
        let m = memory(&cfg, &p);
        let fits = m.total() <= budget;
        Estimate {
            layout,
            memory: m,
            training_bytes: m.training(),
            rollout_bytes: m.rollout(),
            total_bytes: m.total(),
            fits,
            spare_bytes: budget as i64 - m.total() as i64,
            suggestions: if fits { Vec::new() } else { suggestions(&cfg, &p, budget) },
        }
    };
    Ok(PlanSummary {
        config,
        params,
        micro_tokens: input.micro_tokens,
        micro_rows: input.micro_rows,
        gpus: o.gpus,
        zero: o.zero1() as u8,
        gpu_memory_bytes: budget,
        plan: estimate(Layout::Target),
        this_build: estimate(Layout::ThisBuild),
        flops: flops(&cfg, &input),
    })
}
