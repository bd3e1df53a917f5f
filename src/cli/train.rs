//! `ipo train`: DPO on the divergent segment of IPO pairs (IPO_METHOD.md "Loss"), full
//! fine-tuning or LoRA, on the CPU backend. Reads and checks the pairs first (file:line
//! errors), fills missing reference log-probs with the base model (`ipo score --pairs`, cached
//! in OUT/ref_pairs.jsonl), then trains with a progress bar, appending one line per step to
//! OUT/metrics.jsonl, writing checkpoints OUT/step-N/ atomically every --save-every steps, and
//! at the end the model (OUT/final/) and the chart OUT/metrics.png.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::io::jsonl::{self, Appender};
use crate::model::load::{load_config, load_weights};
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::Transformer;
use crate::model::weights::{HostTensor, ModelWeights};
use crate::train::checkpoint;
use crate::train::data::{read_pairs, to_train_pairs};
use crate::train::{chart, LoraConfig, LoraTarget, OptimConfig, OptimKind, ScheduleKind, StepMetrics, TrainConfig, TrainError, Trainer};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
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
    #[arg(long, value_name = "OUT")]
    pub output: PathBuf,
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
    /// Continue from a checkpoint: a step-N/ folder, or an output folder (its newest step-N/).
    /// Needs the same pairs, seed, batch sizes, epochs, loss, optimizer and LoRA settings.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Stop after this optimizer step (the schedule still spans all epochs); 0 = run to the end.
    /// With --save-every, use it to split a run; the checkpoint is written at the stop.
    #[arg(long, default_value_t = 0)]
    pub stop_after: usize,
    /// Refuse to start when the estimated peak memory (weights, gradients, optimizer state and
    /// activations of the largest micro-batch) exceeds this many GiB. Default: the memory
    /// available now (MemAvailable; on a GPU, the device memory free before loading).
    #[arg(long, value_name = "GIB")]
    pub memory_budget_gb: Option<f64>,
    /// Most tokens per forward when computing missing reference log-probs.
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    #[arg(long, value_name = "DEVICE", default_value = "cpu", help = crate::workflow::device::HELP)]
    pub device: String,
}

fn train_config(a: &Args) -> Result<TrainConfig> {
    let lora = if a.lora_rank > 0 {
        let mut targets = Vec::new();
        for s in a.lora_targets.split(',').filter(|s| !s.trim().is_empty()) {
            let t = LoraTarget::parse(s).with_context(|| format!("--lora-targets: unknown projection `{s}` (expected q,k,v,o,gate,up,down)"))?;
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        if targets.is_empty() {
            bail!("--lora-targets: no projections given");
        }
        Some(LoraConfig { rank: a.lora_rank, alpha: a.lora_alpha, targets })
    } else {
        if a.merge {
            bail!("--merge needs LoRA (--lora-rank > 0); full fine-tuning already writes a full model");
        }
        None
    };
    let memory_budget = match a.memory_budget_gb {
        Some(g) if !(g > 0.0) => bail!("--memory-budget-gb must be > 0"),
        Some(g) => Some((g * (1u64 << 30) as f64) as u64),
        None => mem_available(),
    };
    Ok(TrainConfig {
        beta: a.beta,
        sft_coef: a.sft_coef,
        optim: OptimConfig {
            kind: a.optimizer,
            lr: a.lr,
            weight_decay: a.weight_decay,
            beta1: a.adam_beta1,
            beta2: a.adam_beta2,
            eps: a.adam_eps,
            max_grad_norm: a.max_grad_norm,
            schedule: a.schedule,
            warmup_ratio: a.warmup_ratio,
        },
        batch_size: a.batch_size,
        micro_batch_size: a.micro_batch_size,
        epochs: a.epochs,
        seed: a.seed,
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
fn check_tokenizer(model: &Path, pairs_path: &Path, recs: &[(usize, crate::io::records::Pair)]) -> Result<()> {
    if !model.join("tokenizer.json").is_file() {
        return Ok(());
    }
    let tok = Tokenizer::from_dir(model).with_context(|| format!("{}: cannot load the tokenizer", model.display()))?;
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
            pairs_path.display(), bad[0], bad.len(), checked, model.join("tokenizer.json").display()
        );
    }
    Ok(())
}

/// Writes a Hugging Face model folder: model.safetensors (f32, HF names) plus the base
/// folder's config and tokenizer files.
pub fn write_hf_folder(dir: &Path, base: &Path, w: &ModelWeights<HostTensor>) -> Result<(), TrainError> {
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

pub fn run(args: Args) -> Result<()> {
    let device = crate::workflow::device::Device::parse(&args.device)?;
    let tcfg = train_config(&args)?;
    let mcfg = load_config(&args.model)?;
    let recs = read_pairs(&args.pairs, &mcfg)?;
    check_tokenizer(&args.model, &args.pairs, &recs)?;
    std::fs::create_dir_all(&args.output).with_context(|| format!("--output {}", args.output.display()))?;
    let weights = load_weights(&args.model, &mcfg)?;
    crate::workflow::device::with_backend!(device, be => {
    // On a GPU the default budget is the device memory free before the weights go up.
    let mut tcfg = tcfg;
    if args.memory_budget_gb.is_none() {
        if let Some(free) = crate::backend::Backend::memory_free(&be) {
            tcfg.memory_budget = Some(free);
        }
    }
    let model = Transformer::with_backend(be, mcfg.clone(), weights)?;

    // Reference log-probs: from the file, or computed once with the base model and cached.
    let has_refs = recs.iter().all(|(_, p)| p.ref_chosen_logp.is_some() && p.ref_rejected_logp.is_some());
    let pairs = if has_refs {
        to_train_pairs(&args.pairs, recs)?
    } else {
        let cache = args.output.join("ref_pairs.jsonl");
        let cached = cache.is_file().then(|| read_pairs(&cache, &mcfg).ok()).flatten().filter(|c| {
            c.len() == recs.len()
                && c.iter().zip(&recs).all(|((_, a), (_, b))| {
                    a.id == b.id && a.context_ids == b.context_ids && a.chosen_ids == b.chosen_ids && a.rejected_ids == b.rejected_ids
                })
        });
        match cached {
            Some(c) => {
                eprintln!("train: reference log-probs from {}", cache.display());
                to_train_pairs(&cache, c)?
            }
            None => {
                eprintln!("train: computing reference log-probs with the base model -> {}", cache.display());
                let files = crate::workflow::score::ScoreFiles {
                    model: args.model.clone(),
                    input: None,
                    pairs: Some(args.pairs.clone()),
                    output: cache.clone(),
                };
                let opts = crate::workflow::score::ScoreOptions { batch_tokens: args.batch_tokens, ..Default::default() };
                crate::workflow::score::score_with(&files, &opts, &mcfg, &model, &crate::workflow::progress::Reporter::new())?;
                to_train_pairs(&cache, read_pairs(&cache, &mcfg)?)?
            }
        }
    };

    let mut trainer = Trainer::new(model, pairs, tcfg)?;
    let metrics_path = args.output.join("metrics.jsonl");
    if let Some(r) = &args.resume {
        let dir = if r.join("trainer_state.json").is_file() {
            r.clone()
        } else {
            checkpoint::latest(r).with_context(|| format!("--resume {}: no step-N/ checkpoint in it", r.display()))?
        };
        checkpoint::load(&mut trainer, &dir).with_context(|| format!("--resume {}", dir.display()))?;
        eprintln!("train: resumed from {} at step {}", dir.display(), trainer.step);
        // Drop metrics of steps after the checkpoint (a crashed run may have logged them).
        if metrics_path.is_file() {
            let keep: Vec<_> = jsonl::read_objects(&metrics_path)?
                .into_iter()
                .filter(|l| l.obj.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s as usize <= trainer.step))
                .map(|l| l.obj)
                .collect();
            jsonl::write_atomic(&metrics_path, keep)?;
        }
    } else if metrics_path.is_file() {
        std::fs::remove_file(&metrics_path).with_context(|| metrics_path.display().to_string())?;
    }
    let mut log = Appender::open(&metrics_path)?;
    let base_name = args.model.display().to_string();
    let save = |t: &Trainer<_>| -> Result<PathBuf> {
        let dir = args.output.join(format!("step-{}", t.step));
        checkpoint::save(t, &dir, &base_name, |tmp| copy_side_files(tmp, &args.model))?;
        Ok(dir)
    };

    let total = trainer.total_steps();
    let stop = if args.stop_after > 0 { args.stop_after.min(total) } else { total };
    let mut bar = Bar::new(total as u64, trainer.step as u64);
    let start = Instant::now();
    let mut tokens_done = 0usize;
    while trainer.step < stop {
        let t0 = Instant::now();
        let m = match trainer.train_step() {
            Ok(m) => m,
            Err(e @ TrainError::NonFinite { .. }) => {
                bar.finish();
                let dir = save(&trainer)?;
                bail!("{e}; stopped, state before this step saved in {}", dir.display());
            }
            Err(e) => return Err(e.into()),
        };
        let dt = t0.elapsed().as_secs_f64();
        tokens_done += m.tokens;
        let mut line = serde_json::to_value(&m)?;
        line["tokens_per_s"] = serde_json::json!(m.tokens as f64 / dt.max(1e-9));
        line["elapsed_s"] = serde_json::json!(start.elapsed().as_secs_f64());
        log.append(&line)?;
        bar.step(&m, tokens_done as f64 / start.elapsed().as_secs_f64().max(1e-9));
        if args.save_every > 0 && trainer.step % args.save_every == 0 && trainer.step < total {
            save(&trainer)?;
        }
    }
    bar.finish();
    if trainer.step < total {
        let dir = save(&trainer)?;
        eprintln!("train: stopped after step {} of {total} (--stop-after); checkpoint {}", trainer.step, dir.display());
    } else {
        if args.save_every > 0 {
            save(&trainer)?;
        }
        let final_dir = args.output.join("final");
        match &trainer.trainable {
            crate::train::trainer::Trainable::Full { .. } => {
                let w = trainer.export_weights();
                checkpoint::write_dir_atomic(&final_dir, |d| write_hf_folder(d, &args.model, &w))?;
            }
            crate::train::trainer::Trainable::Lora(l) => {
                checkpoint::write_dir_atomic(&final_dir, |d| l.save_peft(d, &base_name))?;
                if args.merge {
                    let w = trainer.export_weights();
                    checkpoint::write_dir_atomic(&args.output.join("merged"), |d| write_hf_folder(d, &args.model, &w))?;
                }
            }
        }
        eprintln!("train: done, {total} steps; model in {}", final_dir.display());
    }
    write_metrics_chart(&metrics_path, &args.output.join("metrics.png"))?;
    Ok(())
    })
}

/// The chart of metrics.jsonl (loss, reward margin, reward accuracy over steps).
pub fn write_metrics_chart(metrics: &Path, png: &Path) -> Result<()> {
    let rows: Vec<StepMetrics> = jsonl::read(metrics)?;
    let s = |f: fn(&StepMetrics) -> f64| rows.iter().map(|m| (m.step as f64, f(m))).collect::<Vec<_>>();
    chart::write_chart(png, &[("loss", s(|m| m.loss)), ("reward margin", s(|m| m.reward_margin)), ("reward accuracy", s(|m| m.reward_accuracy))])?;
    Ok(())
}

/// Progress: an indicatif bar on a terminal, one log line per step otherwise.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
}

impl Bar {
    fn new(total: u64, pos: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template("train {bar:30} {pos}/{len} steps {msg} ETA {eta}").expect("static template"),
            );
            b.set_position(pos);
            b
        });
        Self { bar, total }
    }
    fn step(&mut self, m: &StepMetrics, tok_s: f64) {
        let msg = format!(
            "loss {:.4} margin {:.4} acc {:.2} lr {:.2e} {:.0} tok/s",
            m.loss, m.reward_margin, m.reward_accuracy, m.lr, tok_s
        );
        match &self.bar {
            Some(b) => {
                b.set_message(msg);
                b.set_position(m.step as u64);
            }
            None => eprintln!("train: step {}/{} {msg}", m.step, self.total),
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
