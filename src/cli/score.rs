//! `ipo score`: per-token log-probs of target segments given a context (DESIGN.md section 4),
//! or, with `--pairs`, the reference log-probs of a pairs file (`ref_chosen_logp` /
//! `ref_rejected_logp`) written into a new file. Reads and validates every line first
//! (file:line errors, before the weights are loaded), then scores in forwards of at most
//! `--batch-tokens` tokens with a progress bar, then writes the output atomically.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ArgGroup;
use serde_json::{Map, Value};

use crate::io::jsonl::{self, AtomicWriter, JsonlError, Line};
use crate::io::records::{Pair, ScoreInput};
use crate::model::config::ModelConfig;
use crate::model::load::{load_config, load_weights};
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::{ScoreItem, Transformer};

#[derive(clap::Args, Debug, Clone)]
#[command(group(ArgGroup::new("source").required(true).args(["input", "pairs"])))]
pub struct Args {
    /// Hugging Face model folder: config.json, model.safetensors (or sharded with
    /// model.safetensors.index.json), and tokenizer.json when the input holds text.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// JSONL to score, one object per line: {"id", "context_ids": [u32], "target_ids": [u32]}
    /// or {"id", "context": str, "target": str} (context and target tokenized separately,
    /// no special tokens added). Other fields are copied to the output.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Pairs JSONL from `ipo intervene` instead of --input: fills "ref_chosen_logp" and
    /// "ref_rejected_logp" (sum of log-probs of chosen_ids / rejected_ids after context_ids).
    #[arg(long, value_name = "FILE")]
    pub pairs: Option<PathBuf>,
    /// Where to write the result (JSONL, written atomically; must differ from the input).
    /// With --input each line is the input line plus "logp" (sum, f64) and
    /// "token_logps" ([f32], one per target token).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Most tokens (context + target, summed over sequences) in one forward pass.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub batch_tokens: usize,
    #[arg(long, value_name = "DEVICE", default_value = "cpu", help = crate::workflow::device::HELP)]
    pub device: String,
}

/// Something that gives per-target-token log-probs: the `Transformer`, or a stand-in in tests.
/// `progress` is called with the number of tokens (context + target) of each finished forward.
pub trait Scorer {
    fn score(
        &self,
        items: &[ScoreItem],
        batch_tokens: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>>;
}

impl<B: crate::backend::Backend> Scorer for Transformer<B> {
    fn score(
        &self,
        items: &[ScoreItem],
        batch_tokens: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        Ok(self.score_with_progress(items, batch_tokens, progress)?)
    }
}

pub fn run(args: Args) -> Result<()> {
    check_device(&args.device)?;
    let cfg = load_config(&args.model)?;
    // Validate the input before spending time on the weights.
    let job = prepare(&args, &cfg)?;
    let weights = load_weights(&args.model, &cfg)?;
    crate::workflow::device::with_backend!(crate::workflow::device::Device::parse(&args.device)?, be => {
        let model = Transformer::with_backend(be, cfg, weights)?;
        execute(&args, job, &model)
    })
}

/// `run` with the model supplied: reads and checks the input against `cfg`, scores with
/// `scorer`, writes `args.output`.
pub fn run_with(args: &Args, cfg: &ModelConfig, scorer: &dyn Scorer) -> Result<()> {
    check_device(&args.device)?;
    let job = prepare(args, cfg)?;
    execute(args, job, scorer)
}

fn check_device(device: &str) -> Result<()> {
    crate::workflow::device::Device::parse(device).map(|_| ())
}

/// One sequence to score.
struct Seq {
    context: Vec<u32>, // [n_context] token ids
    target: Vec<u32>,  // [n_target] token ids
}

enum Mode {
    /// One sequence per line.
    Score,
    /// Two sequences per line: chosen then rejected.
    Pairs,
}

struct Job {
    path: PathBuf,
    mode: Mode,
    lines: Vec<Line>,
    seqs: Vec<Seq>,
}

fn prepare(args: &Args, cfg: &ModelConfig) -> Result<Job> {
    if args.batch_tokens == 0 {
        bail!("--batch-tokens must be > 0");
    }
    let (path, mode) = match (&args.input, &args.pairs) {
        (Some(p), None) => (p.clone(), Mode::Score),
        (None, Some(p)) => (p.clone(), Mode::Pairs),
        _ => bail!("give exactly one of --input or --pairs"),
    };
    if same_file(&path, &args.output) {
        bail!("--output {} is the input file: write to a new file", args.output.display());
    }
    let lines = jsonl::read_objects(&path)?;
    let mut tokenizer: Option<Tokenizer> = None;
    let mut seqs = Vec::with_capacity(lines.len());
    for l in &lines {
        let at = |reason: String| anyhow::Error::from(JsonlError::line(&path, l.line, reason));
        match mode {
            Mode::Score => {
                let rec: ScoreInput = l.parse(&path)?;
                let (seq, names) = match (rec.context_ids, rec.target_ids, rec.context, rec.target) {
                    (Some(c), Some(t), _, _) => (Seq { context: c, target: t }, ("context_ids", "target_ids")),
                    (None, None, Some(c), Some(t)) => {
                        if tokenizer.is_none() {
                            tokenizer = Some(Tokenizer::from_dir(&args.model).with_context(|| {
                                format!("{}:{}: text input needs the model's tokenizer", path.display(), l.line)
                            })?);
                        }
                        let tok = tokenizer.as_ref().expect("loaded above");
                        let enc = |s: &str, what: &str| {
                            tok.encode(s, false).map_err(|e| at(format!("cannot tokenize {what}: {e}")))
                        };
                        let seq = Seq { context: enc(&c, "context")?, target: enc(&t, "target")? };
                        (seq, ("tokenized context", "tokenized target"))
                    }
                    _ => {
                        return Err(at(
                            "needs \"context_ids\" and \"target_ids\" (token ids) or \"context\" and \"target\" (text)"
                                .into(),
                        ))
                    }
                };
                check_seq(&seq, names.0, names.1, cfg, &args.model).map_err(at)?;
                seqs.push(seq);
            }
            Mode::Pairs => {
                let p: Pair = l.parse(&path)?;
                let chosen = Seq { context: p.context_ids.clone(), target: p.chosen_ids };
                let rejected = Seq { context: p.context_ids, target: p.rejected_ids };
                check_seq(&chosen, "context_ids", "chosen_ids", cfg, &args.model).map_err(at)?;
                check_seq(&rejected, "context_ids", "rejected_ids", cfg, &args.model).map_err(at)?;
                seqs.push(chosen);
                seqs.push(rejected);
            }
        }
    }
    Ok(Job { path, mode, lines, seqs })
}

/// Non-empty parts, ids inside the vocabulary, length within the model's positions.
fn check_seq(s: &Seq, ctx_name: &str, tgt_name: &str, cfg: &ModelConfig, model: &Path) -> Result<(), String> {
    if s.context.is_empty() {
        return Err(format!("empty {ctx_name}: the first target token needs at least one token before it"));
    }
    if s.target.is_empty() {
        return Err(format!("empty {tgt_name}: nothing to score"));
    }
    for (name, ids) in [(ctx_name, &s.context), (tgt_name, &s.target)] {
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= cfg.vocab_size) {
            return Err(format!(
                "{name}[{i}] = {id} is not a token id of the model (vocab_size {} in {})",
                cfg.vocab_size,
                model.join("config.json").display()
            ));
        }
    }
    let n = s.context.len() + s.target.len();
    if n > cfg.max_position_embeddings {
        return Err(format!(
            "sequence of {n} tokens ({} {ctx_name} + {} {tgt_name}) is longer than max_position_embeddings = {} in {}",
            s.context.len(),
            s.target.len(),
            cfg.max_position_embeddings,
            model.join("config.json").display()
        ));
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Progress in tokens: a bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    start: Instant,
    last_log: Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "score {bar:40} {pos}/{len} tokens, {per_sec}, ETA {eta}",
                )
                .expect("static template"),
            );
            b
        });
        let now = Instant::now();
        Self { bar, total, done: 0, start: now, last_log: now }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(b) => b.inc(n),
            None if self.last_log.elapsed() >= Duration::from_secs(5) || self.done == self.total => {
                self.last_log = Instant::now();
                let secs = self.start.elapsed().as_secs_f64().max(1e-9);
                eprintln!(
                    "score: {}/{} tokens ({:.0}%), {:.0} tokens/s",
                    self.done,
                    self.total,
                    100.0 * self.done as f64 / self.total.max(1) as f64,
                    self.done as f64 / secs
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// A log-prob as a JSON number that prints as the shortest f32 representation
/// (f32 -> f64 directly would print e.g. -0.1 as -0.10000000149011612).
fn f32_json(x: f32) -> Value {
    let v: f64 = x.to_string().parse().expect("f32 Display parses as f64");
    Value::from(v)
}

fn execute(args: &Args, job: Job, scorer: &dyn Scorer) -> Result<()> {
    let Job { path, mode, lines, seqs } = job;
    let items: Vec<ScoreItem> = seqs.iter().map(|s| ScoreItem { context: &s.context, target: &s.target }).collect();
    let total = crate::model::transformer::packed_score_tokens(&items) as u64;
    let mut progress = Progress::new(total);
    // [n_seqs][n_target] natural-log probabilities
    let logps = scorer.score(&items, args.batch_tokens, &mut |n| progress.add(n as u64))?;
    if logps.len() != items.len() {
        bail!("scorer returned {} results for {} sequences", logps.len(), items.len());
    }
    for (s, lp) in seqs.iter().zip(&logps) {
        if lp.len() != s.target.len() {
            bail!("scorer returned {} log-probs for a target of {} tokens", lp.len(), s.target.len());
        }
        if let Some(x) = lp.iter().find(|x| !x.is_finite()) {
            bail!("non-finite log-prob {x} from the model");
        }
    }
    progress.finish();

    let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
    let mut w = AtomicWriter::create(&args.output)?;
    for (i, l) in lines.into_iter().enumerate() {
        let mut obj: Map<String, Value> = l.obj;
        match mode {
            Mode::Score => {
                let lp = &logps[i];
                obj.insert("logp".into(), Value::from(sum(lp)));
                obj.insert("token_logps".into(), Value::Array(lp.iter().map(|&x| f32_json(x)).collect()));
            }
            Mode::Pairs => {
                obj.insert("ref_chosen_logp".into(), Value::from(sum(&logps[2 * i])));
                obj.insert("ref_rejected_logp".into(), Value::from(sum(&logps[2 * i + 1])));
            }
        }
        w.write(&obj)?;
    }
    w.commit()?;
    eprintln!(
        "score: wrote {} lines from {} to {}",
        logps.len() / if matches!(mode, Mode::Pairs) { 2 } else { 1 },
        path.display(),
        args.output.display()
    );
    Ok(())
}
