//! `train`: DPO on the divergent segment of IPO pairs (IPO_METHOD.md "Loss"), full
//! fine-tuning or LoRA, with the trainer of `crate::train`. Checks the options and reads and
//! checks the pairs first (file:line errors, before the weights are loaded), fills missing
//! reference log-probs with the base model (`score_with`, cached in OUT/ref_pairs.jsonl), then
//! runs optimizer steps, appending one line per step to OUT/metrics.jsonl and writing
//! checkpoints OUT/step-N/ atomically every `save_every` steps; at the end the model
//! (OUT/final/, and OUT/merged/ for LoRA with `merge`) and the chart OUT/metrics.png.
//!
//! Data parallel under `ipo launch`, torchrun or srun (`crate::dist`): every rank loads the
//! model and the pairs, runs its share of each step's micro-batches, and the gradients are
//! summed over the ranks before the update (`Trainer::train_step`). `--batch-size` is the
//! global batch, so the same flags give the same training at any world size. Rank 0 alone
//! writes OUT/ (metrics of the whole batch, checkpoints, final model, chart); every rank reads
//! a checkpoint to resume, at any world size. Missing reference log-probs are computed by
//! every rank (the same values; only rank 0's go to OUT/ref_pairs.jsonl), so no rank idles
//! past the collective timeout while rank 0 scores. With `--zero 1` (ZeRO-1, `train::zero`)
//! each rank keeps the AdamW moments of its 1/world slice of the trained parameters only, and
//! in full fine-tuning that slice's fp32 master values too; checkpoints and the final weights
//! gather them to rank 0 into the same files as without it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::backend::Backend;
use crate::dist::{Comm, DistEnv};
use crate::io::jsonl::{self, Appender};
use crate::io::records::Pair;
use crate::model::weights::{HostTensor, ModelWeights};
use crate::train::chart::write_metrics_chart;
use crate::train::checkpoint;
use crate::train::plan::check_train_memory;
use crate::train::data::{read_pairs, to_train_pairs};
use crate::train::trainer::Trainable;
use crate::train::{LoraConfig, LoraTarget, OptimConfig, OptimKind, ScheduleKind, StepMetrics, TrainConfig, TrainError, TrainPair, Trainer};
use crate::workflow::device::{with_backend, Device, DeviceOptions};
use crate::workflow::model::ModelDir;
use crate::workflow::options::default_from_clap;
use crate::workflow::progress::{Progress, Silent};
use crate::workflow::score::{score_with, ScoreFiles, ScoreOptions, Scorer};

/// The files of one `train` call.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainFiles {
    /// Hugging Face model folder of the base model (config.json, safetensors; tokenizer.json
    /// when present is used to check that the pairs were tokenized with it). It is also the
    /// frozen reference model.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Pairs JSONL from `ipo intervene` ({"id", "context_ids", "chosen_ids", "rejected_ids",
    /// "prompt"?, "ref_chosen_logp"?, "ref_rejected_logp"?, ...}). Missing reference log-probs
    /// are computed with the base model and cached in OUT/ref_pairs.jsonl.
    #[arg(long, value_name = "FILE")]
    pub pairs: PathBuf,
    /// Output folder: metrics.jsonl, metrics.png, checkpoints step-N/, final/ (and merged/).
    /// Without --resume it must not hold an earlier run (metrics.jsonl, step-N/, final/).
    #[arg(long, value_name = "OUT")]
    pub output: PathBuf,
    /// Continue from a checkpoint: a step-N/ folder, or an output folder (its newest step-N/).
    /// Needs the same pairs, seed, batch sizes, epochs, loss, optimizer and LoRA settings.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

/// How `train` runs (flags of `ipo train`, keys of a training stage of `ipo run`).
#[derive(clap::Args, serde::Deserialize, Debug, Clone)]
#[serde(default)]
pub struct TrainOptions {
    /// DPO temperature beta: implicit reward = beta * (log pi - log pi_ref) of a segment.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Weight of the SFT term: mean per-token NLL of the chosen segments (paper stage 2: 0.2).
    #[arg(long, default_value_t = 0.0)]
    pub sft_coef: f64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-6)]
    pub lr: f64,
    /// adamw (f32 moments, decoupled weight decay) or sgd (for debugging and gradient tests).
    #[arg(long, value_enum, default_value_t = OptimKind::Adamw)]
    #[serde(deserialize_with = "crate::workflow::options::value_enum")]
    pub optimizer: OptimKind,
    /// Weight decay on matrices (not on norms and biases).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// AdamW epsilon.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Clip the global L2 norm of the gradients to this value; 0 = no clipping.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Learning-rate schedule after warm-up: cosine decay to 0, or constant.
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    #[serde(deserialize_with = "crate::workflow::options::value_enum")]
    pub schedule: ScheduleKind,
    /// Fraction of all optimizer steps spent in linear warm-up from 0.
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Pairs per forward/backward pass; gradients accumulate over batch-size / this.
    #[arg(long, default_value_t = 4)]
    pub micro_batch_size: usize,
    /// Passes over the pairs (each epoch in a new seeded order).
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Seed of every random choice (data order, LoRA init).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// LoRA rank; 0 = full fine-tuning.
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// LoRA alpha (adapter scale = alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Comma-separated projections LoRA adapts: any of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    pub lora_targets: String,
    /// With LoRA: also write OUT/merged/, a full HF model folder with the adapters merged in.
    #[arg(long)]
    pub merge: bool,
    /// Write a checkpoint OUT/step-N/ every N optimizer steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Stop after this optimizer step (the schedule still spans all epochs); 0 = run to the end.
    /// With --save-every, use it to split a run; the checkpoint is written at the stop.
    #[arg(long, default_value_t = 0)]
    pub stop_after: usize,
    /// Activation recomputation: keep only each decoder layer's input from the forward and
    /// recompute the layer's activations in the backward (about a third more compute, saved
    /// activations about (num_layers - 1) layers' worth smaller; same gradients).
    #[arg(long)]
    pub recompute: bool,
    /// Refuse to start when the estimated peak memory (weights, gradients, optimizer state and
    /// activations of the largest micro-batch) exceeds this many GiB. Default: the memory
    /// available now (MemAvailable; on a GPU, the device memory free before loading).
    #[arg(long, value_name = "GIB")]
    pub memory_budget_gb: Option<f64>,
    /// ZeRO stage under data parallel: 0 = every rank keeps the whole optimizer state; 1 =
    /// each rank keeps the AdamW moments of its 1/world slice of the trained parameters only
    /// (full fine-tuning: that slice's fp32 master weights too, the weights themselves in the
    /// compute precision, bf16 on CUDA), gets the gradient sums of that slice
    /// (reduce-scatter), updates it and all-gathers the updated weights (the same weights as
    /// stage 0; checkpoints hold the whole fp32 state and resume either way).
    #[arg(long, value_name = "STAGE", default_value_t = 0)]
    pub zero: u8,
    /// Most tokens per forward when computing missing reference log-probs.
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceOptions,
}

default_from_clap!(TrainOptions);

/// Where the reference log-probs of the pairs came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefLogps {
    /// Every pair of the pairs file carried them.
    Pairs,
    /// OUT/ref_pairs.jsonl, written by an earlier call on the same pairs.
    Cached,
    /// Computed with the base model by this call and written to OUT/ref_pairs.jsonl.
    Computed,
}

/// What a `train` call did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    /// Optimizer steps run by this call.
    pub steps: usize,
    /// Optimizer steps done after this call (a resumed run counts the earlier ones).
    pub step: usize,
    /// Optimizer steps of the whole run (epochs * steps per epoch).
    pub total_steps: usize,
    /// Metrics of the last step this call ran (None when it ran none).
    pub last: Option<StepMetrics>,
    /// Tokens run through the model by this call's steps.
    pub tokens: u64,
    /// Training throughput of this call's steps, tokens/s.
    pub tokens_per_s: f64,
    /// Wall time of the whole call (loading and reference scoring included), seconds.
    pub seconds: f64,
    pub ref_logps: RefLogps,
    /// The checkpoint this call resumed from.
    pub resumed_from: Option<PathBuf>,
    /// The last checkpoint OUT/step-N/ this call wrote.
    pub checkpoint: Option<PathBuf>,
    /// OUT/final/ (the model, or the PEFT adapter with LoRA) when the run reached its last step.
    pub final_dir: Option<PathBuf>,
    /// OUT/merged/ (LoRA with `merge`): a full HF model folder with the adapters merged in.
    pub merged_dir: Option<PathBuf>,
    /// Ranks that trained together (1 without a launcher) and this process's rank.
    pub world: usize,
    pub rank: usize,
    /// AdamW state elements (m and v) this rank held: twice the trained parameters, about
    /// 1/world of that with --zero 1; 0 for SGD.
    pub optimizer_state_elems: usize,
}

/// Trains on `files.pairs` from the model of `files.model` (or the checkpoint
/// `files.resume`) on `opts.device`, writing into `files.output`; data parallel when the
/// environment names a group (RANK, WORLD_SIZE, ...: `DistEnv`), where `--device cuda:N` means
/// GPU N + LOCAL_RANK.
pub fn train(files: &TrainFiles, opts: &TrainOptions, progress: &dyn Progress) -> Result<TrainSummary> {
    let env = DistEnv::from_env()?;
    let mut opts = opts.clone();
    if let Device::Cuda(n) = opts.device.device {
        if env.world > 1 {
            opts.device.device = Device::Cuda(n + env.local_rank);
        }
    }
    train_in(files, &opts, progress, crate::dist::connect(&env)?)
}

/// `train` as one rank of `comm`'s group (every rank calls it with the same files and
/// options). Only rank 0 writes OUT/ and reports progress.
pub fn train_in(files: &TrainFiles, opts: &TrainOptions, progress: &dyn Progress, comm: Arc<dyn Comm>) -> Result<TrainSummary> {
    let t0 = Instant::now();
    let root = comm.rank() == 0;
    let progress: &dyn Progress = if root { progress } else { &Silent };
    let tcfg = train_config(opts)?;
    let dir = ModelDir::open(&files.model)?;
    let recs = read_pairs(&files.pairs, &dir.config)?;
    check_tokenizer(&dir, &files.pairs, &recs)?;
    if files.resume.is_none() && root {
        refuse_earlier_run(&files.output)?;
    }
    std::fs::create_dir_all(&files.output).with_context(|| format!("--output {}", files.output.display()))?;
    let weights = dir.weights()?;
    with_backend!(opts.device, be => {
        let mut tcfg = tcfg;
        // On a GPU the default budget is the device memory free before the weights go up.
        if opts.memory_budget_gb.is_none() {
            if let Some(free) = be.memory_free() {
                tcfg.memory_budget = Some(free);
            }
        }
        // Checked before the weights go up and before any reference scoring; the trainer
        // checks again with the same estimate (`train::plan`).
        if let Some(budget) = tcfg.memory_budget {
            let lens: Vec<_> = recs.iter().map(|(_, p)| (p.context_ids.len(), p.chosen_ids.len(), p.rejected_ids.len())).collect();
            let longest = recs.iter().max_by_key(|(_, p)| p.context_ids.len() + p.chosen_ids.len() + p.rejected_ids.len()).map_or("", |(_, p)| p.id.as_str());
            let shards = if opts.zero == 1 && tcfg.optim.kind == OptimKind::Adamw { comm.world() } else { 1 };
            check_train_memory(&dir.config, &tcfg, be.precision(), opts.recompute, shards, &lens, longest, budget)?;
        }
        let mut model = dir.upload(be, weights)?;
        model.set_recompute(opts.recompute);
        let (pairs, ref_logps) = reference_pairs(files, opts, &dir, recs, &model, progress, comm.rank())?;
        let trainer = Trainer::data_parallel(model, pairs, tcfg, comm, opts.zero == 1)?;
        run_steps(files, opts, trainer, progress, t0, ref_logps)
    })
}

/// The trainer's settings; errors name the flag (and so the config key).
fn train_config(o: &TrainOptions) -> Result<TrainConfig> {
    let lora = if o.lora_rank > 0 {
        let mut targets = Vec::new();
        for s in o.lora_targets.split(',').filter(|s| !s.trim().is_empty()) {
            let t = LoraTarget::parse(s).with_context(|| format!("--lora-targets: unknown projection `{s}` (expected q,k,v,o,gate,up,down)"))?;
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        if targets.is_empty() {
            bail!("--lora-targets: no projections given");
        }
        Some(LoraConfig { rank: o.lora_rank, alpha: o.lora_alpha, targets })
    } else {
        if o.merge {
            bail!("--merge needs LoRA (--lora-rank > 0); full fine-tuning already writes a full model");
        }
        None
    };
    if o.zero > 1 {
        bail!("--zero {}: stages 0 (replicated optimizer state) and 1 (sharded over the ranks) exist", o.zero);
    }
    let memory_budget = match o.memory_budget_gb {
        Some(g) if g.is_nan() || g <= 0.0 => bail!("--memory-budget-gb must be > 0"),
        Some(g) => Some((g * (1u64 << 30) as f64) as u64),
        None => mem_available(),
    };
    Ok(TrainConfig {
        beta: o.beta,
        sft_coef: o.sft_coef,
        optim: OptimConfig {
            kind: o.optimizer,
            lr: o.lr,
            weight_decay: o.weight_decay,
            beta1: o.adam_beta1,
            beta2: o.adam_beta2,
            eps: o.adam_eps,
            max_grad_norm: o.max_grad_norm,
            schedule: o.schedule,
            warmup_ratio: o.warmup_ratio,
        },
        batch_size: o.batch_size,
        micro_batch_size: o.micro_batch_size,
        epochs: o.epochs,
        seed: o.seed,
        lora,
        memory_budget,
    })
}

/// MemAvailable from /proc/meminfo, in bytes (None where there is no such file).
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses pairs tokenized with another tokenizer: where a pair has a "prompt", the decoded
/// context must contain it. Fails when most checked pairs disagree (naming the first line).
fn check_tokenizer(dir: &ModelDir, pairs_path: &Path, recs: &[(usize, Pair)]) -> Result<()> {
    if !dir.path.join("tokenizer.json").is_file() {
        return Ok(());
    }
    let tok = dir.tokenizer().with_context(|| format!("{}: cannot load the tokenizer", dir.path.display()))?;
    let (mut checked, mut bad) = (0usize, Vec::new());
    for (line, p) in recs.iter().take(64) {
        let Some(prompt) = p.prompt.as_deref().map(str::trim).filter(|s| s.len() >= 8) else { continue };
        checked += 1;
        let text = tok.decode(&p.context_ids, false).unwrap_or_default();
        if !text.contains(prompt) {
            bad.push(*line);
        }
    }
    if checked > 0 && 2 * bad.len() > checked {
        bail!(
            "{}:{}: the decoded context_ids do not contain the pair's prompt ({} of {} checked pairs): this pairs file was made with another tokenizer than {}",
            pairs_path.display(), bad[0], bad.len(), checked, dir.path.join("tokenizer.json").display()
        );
    }
    Ok(())
}

/// The pairs with reference log-probs: from the pairs file, or computed once with the base
/// model (`scorer`) and cached in OUT/ref_pairs.jsonl (reused while it holds the same pairs).
/// A rank other than 0 computes them into a private temp file instead, removed after reading.
fn reference_pairs(
    files: &TrainFiles,
    opts: &TrainOptions,
    dir: &ModelDir,
    recs: Vec<(usize, Pair)>,
    scorer: &dyn Scorer,
    progress: &dyn Progress,
    rank: usize,
) -> Result<(Vec<TrainPair>, RefLogps)> {
    if recs.iter().all(|(_, p)| p.ref_chosen_logp.is_some() && p.ref_rejected_logp.is_some()) {
        return Ok((to_train_pairs(&files.pairs, recs)?, RefLogps::Pairs));
    }
    let cache = files.output.join("ref_pairs.jsonl");
    let cached = cache.is_file().then(|| read_pairs(&cache, &dir.config).ok()).flatten().filter(|c| {
        c.len() == recs.len()
            && c.iter().zip(&recs).all(|((_, a), (_, b))| {
                a.id == b.id && a.context_ids == b.context_ids && a.chosen_ids == b.chosen_ids && a.rejected_ids == b.rejected_ids
            })
    });
    if let Some(c) = cached {
        return Ok((to_train_pairs(&cache, c)?, RefLogps::Cached));
    }
    let cache = if rank == 0 { cache } else { files.output.join(format!(".ref_pairs.rank-{rank}.jsonl")) };
    let score_files = ScoreFiles { model: files.model.clone(), input: None, pairs: Some(files.pairs.clone()), output: cache.clone() };
    let score_opts = ScoreOptions { batch_tokens: opts.batch_tokens, device: opts.device.clone() };
    score_with(&score_files, &score_opts, &dir.config, scorer, progress)?;
    let pairs = to_train_pairs(&cache, read_pairs(&cache, &dir.config)?)?;
    if rank != 0 {
        std::fs::remove_file(&cache).with_context(|| cache.display().to_string())?;
    }
    Ok((pairs, RefLogps::Computed))
}

/// A fresh run (no --resume) into a folder that holds an earlier run's results (its metrics
/// log, a checkpoint or the final model) would replace its metrics.jsonl and mix their
/// files: refused. A missing or empty folder is fine, and so is one with only the reference
/// log-prob cache.
fn refuse_earlier_run(out: &Path) -> Result<()> {
    let metrics = out.join("metrics.jsonl");
    let found = if std::fs::metadata(&metrics).is_ok_and(|m| m.len() > 0) {
        Some("metrics.jsonl".to_string())
    } else if let Some(step) = checkpoint::latest(out) {
        Some(format!("the checkpoint {}", step.file_name().unwrap_or_default().to_string_lossy()))
    } else {
        out.join("final").exists().then(|| "final/".to_string())
    };
    match found {
        Some(what) => bail!(
            "--output {} holds an earlier run ({what}): pass --resume {} to continue it, or choose an empty --output folder",
            out.display(),
            out.display()
        ),
        None => Ok(()),
    }
}

/// Resume (when asked), the optimizer steps with their metrics lines and checkpoints, the
/// final model and the chart.
fn run_steps<B: Backend>(
    files: &TrainFiles,
    opts: &TrainOptions,
    mut trainer: Trainer<B>,
    progress: &dyn Progress,
    t0: Instant,
    ref_logps: RefLogps,
) -> Result<TrainSummary> {
    let out = &files.output;
    let metrics_path = out.join("metrics.jsonl");
    let (rank, world) = (trainer.comm.rank(), trainer.comm.world());
    let root = rank == 0;
    let mut resumed_from = None;
    if let Some(r) = &files.resume {
        let dir = if r.join("trainer_state.json").is_file() {
            r.clone()
        } else {
            checkpoint::latest(r).with_context(|| format!("--resume {}: no step-N/ checkpoint in it", r.display()))?
        };
        checkpoint::load(&mut trainer, &dir).with_context(|| format!("--resume {}", dir.display()))?;
        // Drop metrics of steps after the checkpoint (a crashed run may have logged them).
        if root && metrics_path.is_file() {
            let keep: Vec<_> = jsonl::read_objects(&metrics_path)?
                .into_iter()
                .filter(|l| l.obj.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s as usize <= trainer.step))
                .map(|l| l.obj)
                .collect();
            jsonl::write_atomic(&metrics_path, keep)?;
        }
        resumed_from = Some(dir);
    } else if root && metrics_path.is_file() {
        std::fs::remove_file(&metrics_path).with_context(|| metrics_path.display().to_string())?;
    }
    let mut log = if root { Some(Appender::open(&metrics_path)?) } else { None };
    let base_name = files.model.display().to_string();
    // Every rank calls it (ZeRO-1 gathers the moments); rank 0 writes, the others name the
    // folder it writes.
    let save = |t: &Trainer<B>| -> Result<PathBuf> {
        let dir = out.join(format!("step-{}", t.step));
        checkpoint::save(t, &dir, &base_name, |tmp| copy_side_files(tmp, &files.model))?;
        Ok(dir)
    };

    let total = trainer.total_steps();
    let stop = if opts.stop_after > 0 { opts.stop_after.min(total) } else { total };
    let first = trainer.step;
    progress.start("train", total as u64, "steps");
    if first > 0 {
        progress.advance(first as u64, 0);
    }
    let start = Instant::now();
    let (mut tokens, mut last, mut checkpoint) = (0u64, None, None);
    while trainer.step < stop {
        let t_step = Instant::now();
        let m = match trainer.train_step() {
            Ok(m) => m,
            Err(e @ TrainError::NonFinite { .. }) => {
                progress.finish();
                let dir = save(&trainer)?;
                bail!("{e}; stopped, state before this step saved in {}", dir.display());
            }
            Err(e) => {
                progress.finish();
                return Err(e.into());
            }
        };
        tokens += m.tokens as u64;
        if let Some(log) = &mut log {
            log.append(&MetricsLine::new(&m, t_step.elapsed().as_secs_f64(), start.elapsed().as_secs_f64()))?;
        }
        progress.status(&format!("loss {:.4}, margin {:.4}, acc {:.2}, lr {:.2e}", m.loss, m.reward_margin, m.reward_accuracy, m.lr));
        progress.advance(1, m.tokens as u64);
        if opts.save_every > 0 && trainer.step.is_multiple_of(opts.save_every) && trainer.step < total {
            checkpoint = Some(save(&trainer)?);
        }
        last = Some(m);
    }
    progress.finish();
    let train_seconds = start.elapsed().as_secs_f64();

    let (mut final_dir, mut merged_dir) = (None, None);
    if trainer.step < total || opts.save_every > 0 {
        checkpoint = Some(save(&trainer)?);
    }
    if trainer.step >= total {
        let dir = out.join("final");
        match &trainer.trainable {
            Trainable::Full { .. } => {
                // Every rank: ZeRO-1 gathers the fp32 master slices.
                let w = trainer.export_full_weights()?;
                if root {
                    checkpoint::write_dir_atomic(&dir, |d| write_hf_folder(d, &files.model, &w))?;
                }
            }
            _ if !root => {}
            Trainable::Lora(l) => {
                checkpoint::write_dir_atomic(&dir, |d| l.save_peft(d, &base_name))?;
                if opts.merge {
                    let w = trainer.export_weights();
                    let merged = out.join("merged");
                    checkpoint::write_dir_atomic(&merged, |d| write_hf_folder(d, &files.model, &w))?;
                    merged_dir = Some(merged);
                }
            }
        }
        final_dir = Some(dir);
    }
    if root {
        write_metrics_chart(&metrics_path, &out.join("metrics.png"))?;
    }
    // Every rank returns once rank 0 has written everything (or fails naming it).
    trainer.comm.barrier()?;
    Ok(TrainSummary {
        steps: trainer.step - first,
        step: trainer.step,
        total_steps: total,
        last,
        tokens,
        tokens_per_s: tokens as f64 / train_seconds.max(1e-9),
        seconds: t0.elapsed().as_secs_f64(),
        ref_logps,
        resumed_from,
        checkpoint,
        final_dir,
        merged_dir,
        world,
        rank,
        optimizer_state_elems: trainer.optimizer_state_len(),
    })
}

/// One line of metrics.jsonl: the step's `StepMetrics`, the same values again under the
/// names TRL's DPOTrainer logs (so TRL dashboards and scripts read the file unchanged), and
/// timing. TRL's definitions: `rewards/*` are batch means of `beta * (policy logp - reference
/// logp)` of each segment, `rewards/margins` the mean of chosen - rejected, `rewards/accuracies`
/// the fraction of pairs with chosen > rejected, `logps/*` the batch means of the policy's
/// summed segment log-probs; `loss` (with the SFT term, as TRL's with `rpo_alpha`), `grad_norm`,
/// `epoch` and `step` already have TRL's names.
#[derive(serde::Serialize)]
struct MetricsLine<'a> {
    #[serde(flatten)]
    metrics: &'a StepMetrics,
    #[serde(rename = "rewards/chosen")]
    rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    rewards_rejected: f64,
    #[serde(rename = "rewards/margins")]
    rewards_margins: f64,
    #[serde(rename = "rewards/accuracies")]
    rewards_accuracies: f64,
    #[serde(rename = "logps/chosen")]
    logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    logps_rejected: f64,
    learning_rate: f64,
    /// Tokens of this step per second of its wall time.
    tokens_per_s: f64,
    /// Seconds since this call's first step began.
    elapsed_s: f64,
}

impl<'a> MetricsLine<'a> {
    fn new(m: &'a StepMetrics, step_seconds: f64, elapsed_s: f64) -> Self {
        Self {
            metrics: m,
            rewards_chosen: m.reward_chosen,
            rewards_rejected: m.reward_rejected,
            rewards_margins: m.reward_margin,
            rewards_accuracies: m.reward_accuracy,
            logps_chosen: m.logp_chosen,
            logps_rejected: m.logp_rejected,
            learning_rate: m.lr,
            tokens_per_s: m.tokens as f64 / step_seconds.max(1e-9),
            elapsed_s,
        }
    }
}

/// Writes a Hugging Face model folder: model.safetensors (f32, HF names) plus the base
/// folder's config and tokenizer files.
fn write_hf_folder(dir: &Path, base: &Path, w: &ModelWeights<HostTensor>) -> Result<(), TrainError> {
    let mut tensors = Vec::new();
    w.for_each(|n, t| tensors.push((n.to_string(), t.shape.clone(), t.data.clone())));
    crate::train::st::write_f32_safetensors(&dir.join("model.safetensors"), &tensors)?;
    copy_side_files(dir, base)
}

fn copy_side_files(dir: &Path, base: &Path) -> Result<(), TrainError> {
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        let src = base.join(f);
        if src.is_file() {
            std::fs::copy(&src, dir.join(f)).map_err(|e| TrainError::Io(format!("{}: {e}", src.display())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::config::{from_table, keys_of};

    #[test]
    fn config_table_overrides_only_its_keys() {
        let t: TrainOptions = toml::from_str("lr = 2e-5\noptimizer = \"sgd\"\nschedule = \"constant\"\nlora_rank = 4").unwrap();
        let want = TrainOptions { lr: 2e-5, optimizer: OptimKind::Sgd, schedule: ScheduleKind::Constant, lora_rank: 4, ..TrainOptions::default() };
        assert_eq!(format!("{t:?}"), format!("{want:?}"));
        // The defaults are the flags' defaults.
        let d = TrainOptions::default();
        assert_eq!((d.beta, d.lr, d.optimizer, d.schedule, d.batch_size, d.micro_batch_size), (0.1, 5e-6, OptimKind::Adamw, ScheduleKind::Cosine, 64, 4));
        assert_eq!((d.lora_targets.as_str(), d.memory_budget_gb, d.batch_tokens, d.device.device), ("q,k,v,o,gate,up,down", None, 4096, Default::default()));
        let t: TrainOptions = toml::from_str("device = \"cuda:1\"\nseed = 7\nmerge = true\nmemory_budget_gb = 8").unwrap();
        assert_eq!((t.device.device, t.seed, t.merge, t.memory_budget_gb), (crate::workflow::device::Device::Cuda(1), 7, true, Some(8.0)));
        // `ipo run` reads its stage tables with these names.
        let keys = keys_of::<TrainOptions>();
        for k in ["seed", "device", "lr", "optimizer", "schedule", "lora_targets", "memory_budget_gb", "zero"] {
            assert!(keys.iter().any(|x| x == k), "{k} in {keys:?}");
        }
        let table: toml::Table = toml::from_str("optimizer = \"sgd\"\nepochs = 2\nzero = 1").unwrap();
        let t: TrainOptions = from_table(Path::new("c.toml"), "train1", &table).unwrap();
        assert_eq!((t.optimizer, t.epochs, t.lr, t.zero), (OptimKind::Sgd, 2, 5e-6, 1));
        let e = train_config(&TrainOptions { zero: 2, ..TrainOptions::default() }).unwrap_err().to_string();
        assert!(e.contains("--zero 2"), "{e}");
    }

    #[test]
    fn bad_enum_values_name_the_allowed_ones() {
        let e = toml::from_str::<TrainOptions>("optimizer = \"adam\"").unwrap_err().to_string();
        assert!(e.contains("\"adam\" is not one of adamw, sgd"), "{e}");
        let e = toml::from_str::<TrainOptions>("schedule = \"linear\"").unwrap_err().to_string();
        assert!(e.contains("\"linear\" is not one of cosine, constant"), "{e}");
    }
}
