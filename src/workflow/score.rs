//! `score`: per-token log-probs of target segments given a context (DESIGN.md section 4),
//! or, for a pairs file, the reference log-probs of each pair (`ref_chosen_logp` /
//! `ref_rejected_logp`) written into a new file. Reads and validates every line first
//! (file:line errors, before the weights are loaded), then scores in forwards of at most
//! `batch_tokens` tokens, then writes the output atomically. Under a launcher (`ipo launch`,
//! torchrun, srun) rank r runs the forwards r, r + world, ... of the single process's packing
//! (`score_batches`), so every log-prob is the bits one process computes, and rank 0 writes
//! every line in input order (`workflow::shard`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ArgGroup;
use serde_json::{Map, Value};

use crate::backend::Backend;
use crate::io::jsonl::{self, AtomicWriter, JsonlError};
use crate::io::records::{write_over, Pair, ScoreInput, Scored};
use crate::model::config::ModelConfig;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::{packed_score_tokens, score_batches, ScoreItem, Transformer};
use crate::workflow::device::{with_backend, DeviceOptions};
use crate::workflow::model::ModelDir;
use crate::workflow::options::default_from_clap;
use crate::workflow::progress::{Progress, Silent};
use crate::workflow::shard::Shards;

/// The files of one `score` call: `input` (segments to score) or `pairs` (fill reference
/// log-probs), and where the result goes.
#[derive(clap::Args, Debug, Clone)]
#[command(group(ArgGroup::new("source").required(true).args(["input", "pairs"])))]
pub struct ScoreFiles {
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
}

/// How `score` runs (flags of `ipo score`).
#[derive(clap::Args, serde::Deserialize, Debug, Clone)]
#[serde(default)]
pub struct ScoreOptions {
    /// Most tokens (context + target, summed over sequences) in one forward pass.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub batch_tokens: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceOptions,
}

default_from_clap!(ScoreOptions);

/// What a `score` call did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ScoreSummary {
    /// Lines written (one per input line or pair).
    pub lines: usize,
    /// Sequences scored (two per pair).
    pub sequences: usize,
    /// Tokens run through the model (a pair's context counted once).
    pub tokens: u64,
    pub seconds: f64,
}

impl ScoreSummary {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Something that gives per-target-token log-probs: the `Transformer`, or a stand-in in tests.
/// `progress` is called with the number of tokens (context + target) of each finished forward.
pub(crate) trait Scorer {
    fn score(&self, items: &[ScoreItem], batch_tokens: usize, progress: &mut dyn FnMut(usize)) -> Result<Vec<Vec<f32>>>;
}

impl<B: Backend> Scorer for Transformer<B> {
    fn score(&self, items: &[ScoreItem], batch_tokens: usize, progress: &mut dyn FnMut(usize)) -> Result<Vec<Vec<f32>>> {
        Ok(self.score_with_progress(items, batch_tokens, progress)?)
    }
}

/// Scores `files.input` (or fills the reference log-probs of `files.pairs`) with the model of
/// `files.model` on `opts.device`, writing `files.output`.
pub fn score(files: &ScoreFiles, opts: &ScoreOptions, progress: &dyn Progress) -> Result<ScoreSummary> {
    let mut opts = opts.clone();
    let shards = Shards::from_env(&mut opts.device)?;
    score_in(files, &opts, progress, &shards)
}

/// `score` as one rank of `shards` (every rank calls it with the same files and options;
/// `opts.device` already placed on this rank): this rank scores its lines, rank 0 writes the
/// output, and every rank returns once it is written, with the whole job's summary.
pub(crate) fn score_in(files: &ScoreFiles, opts: &ScoreOptions, progress: &dyn Progress, shards: &Shards) -> Result<ScoreSummary> {
    let t0 = Instant::now();
    let dir = ModelDir::open(&files.model)?;
    // Validate the input before spending time on the weights.
    let job = prepare(files, opts, &dir.config)?;
    let weights = dir.weights()?;
    with_backend!(opts.device, be => {
        let model = dir.upload_frozen(be, weights)?;
        execute(files, opts, job, &model, progress, t0, shards)
    })
}

/// `score` with the model supplied (a trainer's base model, or a stand-in): reads and checks
/// the input against `cfg`, scores with `scorer`, writes `files.output`.
pub(crate) fn score_with(files: &ScoreFiles, opts: &ScoreOptions, cfg: &ModelConfig, scorer: &dyn Scorer, progress: &dyn Progress) -> Result<ScoreSummary> {
    let t0 = Instant::now();
    let job = prepare(files, opts, cfg)?;
    execute(files, opts, job, scorer, progress, t0, &Shards::single())
}

/// One sequence to score.
struct Seq {
    context: Vec<u32>, // [n_context] token ids
    target: Vec<u32>,  // [n_target] token ids
}

/// The records read, by kind of input (each written back with its log-probs).
enum Records {
    /// One sequence per line.
    Score(Vec<ScoreInput>),
    /// Two sequences per line: chosen then rejected.
    Pairs(Vec<Pair>),
}

struct Job {
    path: PathBuf,
    /// The input lines as read: the output keeps their field order.
    lines: Vec<Map<String, Value>>,
    records: Records,
    seqs: Vec<Seq>,
}

fn prepare(files: &ScoreFiles, opts: &ScoreOptions, cfg: &ModelConfig) -> Result<Job> {
    if opts.batch_tokens == 0 {
        bail!("--batch-tokens must be > 0");
    }
    let (path, pairs_mode) = match (&files.input, &files.pairs) {
        (Some(p), None) => (p.clone(), false),
        (None, Some(p)) => (p.clone(), true),
        _ => bail!("give exactly one of --input or --pairs"),
    };
    if same_file(&path, &files.output) {
        bail!("--output {} is the input file: write to a new file", files.output.display());
    }
    let model = &files.model;
    let lines = jsonl::read_objects(&path)?;
    let mut tokenizer: Option<Tokenizer> = None;
    let mut seqs = Vec::with_capacity(lines.len());
    let mut records = if pairs_mode { Records::Pairs(Vec::new()) } else { Records::Score(Vec::new()) };
    for l in &lines {
        let at = |reason: String| anyhow::Error::from(JsonlError::line(&path, l.line, reason));
        match &mut records {
            Records::Score(recs) => {
                let rec: ScoreInput = l.parse(&path)?;
                let (seq, names) = match (&rec.context_ids, &rec.target_ids, &rec.context, &rec.target) {
                    (Some(c), Some(t), _, _) => (Seq { context: c.clone(), target: t.clone() }, ("context_ids", "target_ids")),
                    (None, None, Some(c), Some(t)) => {
                        if tokenizer.is_none() {
                            tokenizer = Some(Tokenizer::from_dir(model).with_context(|| {
                                format!("{}:{}: text input needs the model's tokenizer", path.display(), l.line)
                            })?);
                        }
                        let tok = tokenizer.as_ref().expect("loaded above");
                        let enc = |s: &str, what: &str| {
                            tok.encode(s, false).map_err(|e| at(format!("cannot tokenize {what}: {e}")))
                        };
                        let seq = Seq { context: enc(c, "context")?, target: enc(t, "target")? };
                        (seq, ("tokenized context", "tokenized target"))
                    }
                    _ => {
                        return Err(at(
                            "needs \"context_ids\" and \"target_ids\" (token ids) or \"context\" and \"target\" (text)"
                                .into(),
                        ))
                    }
                };
                check_seq(&seq, names.0, names.1, cfg, model).map_err(at)?;
                seqs.push(seq);
                recs.push(rec);
            }
            Records::Pairs(recs) => {
                let p: Pair = l.parse(&path)?;
                let chosen = Seq { context: p.context_ids.clone(), target: p.chosen_ids.clone() };
                let rejected = Seq { context: p.context_ids.clone(), target: p.rejected_ids.clone() };
                check_seq(&chosen, "context_ids", "chosen_ids", cfg, model).map_err(at)?;
                check_seq(&rejected, "context_ids", "rejected_ids", cfg, model).map_err(at)?;
                seqs.push(chosen);
                seqs.push(rejected);
                recs.push(p);
            }
        }
    }
    Ok(Job { path, lines: lines.into_iter().map(|l| l.obj).collect(), records, seqs })
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

/// A log-prob as the f64 that prints as the shortest f32 representation
/// (f32 -> f64 directly would print e.g. -0.1 as -0.10000000149011612).
fn f32_json(x: f32) -> f64 {
    x.to_string().parse().expect("f32 Display parses as f64")
}

/// The forwards (ranges of sequences) that rank `rank` of `world` runs: forwards rank,
/// rank + world, ... of the single process's packing.
fn shard_forwards(forwards: &[std::ops::Range<usize>], rank: usize, world: usize) -> Vec<std::ops::Range<usize>> {
    forwards.iter().skip(rank).step_by(world).cloned().collect()
}

/// Per-sequence log-probs as bytes: per sequence its length (u32 LE), then the f32s (LE).
fn encode_logps(v: &[Vec<f32>]) -> Vec<u8> {
    let mut b = Vec::new();
    for x in v {
        b.extend_from_slice(&(x.len() as u32).to_le_bytes());
        for f in x {
            b.extend_from_slice(&f.to_le_bytes());
        }
    }
    b
}

fn decode_logps(b: &[u8], n: usize) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    let mut take = |k: usize| -> Result<&[u8]> {
        let s = b.get(at..at + k).context("a rank's log-probs end early")?;
        at += k;
        Ok(s)
    };
    for _ in 0..n {
        let len = u32::from_le_bytes(take(4)?.try_into().unwrap()) as usize;
        out.push(take(4 * len)?.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect());
    }
    Ok(out)
}

fn execute(files: &ScoreFiles, opts: &ScoreOptions, job: Job, scorer: &dyn Scorer, progress: &dyn Progress, t0: Instant, shards: &Shards) -> Result<ScoreSummary> {
    let Job { path, lines, records, seqs } = job;
    let progress: &dyn Progress = if shards.root() { progress } else { &Silent };
    let items: Vec<ScoreItem> = seqs.iter().map(|s| ScoreItem { context: &s.context, target: &s.target }).collect();
    let total = packed_score_tokens(&items) as u64;
    let (rank, world) = (shards.rank(), shards.world());
    let forwards = score_batches(&items, opts.batch_tokens);
    let owned = shard_forwards(&forwards, rank, world);
    progress.start("score", owned.iter().map(|r| packed_score_tokens(&items[r.clone()]) as u64).sum(), "tokens");
    // [n_seqs][n_target] natural-log probabilities of this rank's sequences, forward by forward
    let mut scored = Vec::new();
    for r in &owned {
        let got = scorer.score(&items[r.clone()], opts.batch_tokens, &mut |n| progress.advance(n as u64, n as u64));
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        };
        if got.len() != r.len() {
            bail!("scorer returned {} results for {} sequences", got.len(), r.len());
        }
        scored.extend(got);
    }
    progress.finish();
    let logps = if world == 1 {
        scored
    } else {
        // Every rank's results, placed at their sequences' indices.
        let all = shards.comm().all_gather_after_work(encode_logps(&scored))?;
        let mut logps = vec![Vec::new(); items.len()];
        for (r, b) in all.iter().enumerate() {
            let idx: Vec<usize> = shard_forwards(&forwards, r, world).into_iter().flatten().collect();
            for (k, lp) in idx.iter().zip(decode_logps(b, idx.len()).with_context(|| format!("the log-probs of rank {r}"))?) {
                logps[*k] = lp;
            }
        }
        logps
    };
    if !shards.root() {
        // Rank 0 writes the output; return once it has.
        shards.comm().barrier()?;
        return Ok(ScoreSummary { lines: lines.len(), sequences: logps.len(), tokens: total, seconds: t0.elapsed().as_secs_f64() });
    }
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

    let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
    let mut w = AtomicWriter::create(&files.output)?;
    let n_lines = lines.len();
    match records {
        Records::Score(recs) => {
            for ((line, mut input), lp) in lines.into_iter().zip(recs).zip(&logps) {
                // A re-scored file: the new values replace the old.
                input.extra.retain(|k, _| k != "logp" && k != "token_logps");
                let scored = Scored { input, logp: sum(lp), token_logps: lp.iter().map(|&x| f32_json(x)).collect() };
                w.write(&write_over(line, &scored)?)?;
            }
        }
        Records::Pairs(recs) => {
            for (i, (line, mut p)) in lines.into_iter().zip(recs).enumerate() {
                p.ref_chosen_logp = Some(sum(&logps[2 * i]));
                p.ref_rejected_logp = Some(sum(&logps[2 * i + 1]));
                w.write(&write_over(line, &p)?)?;
            }
        }
    }
    let lines = n_lines;
    w.commit().with_context(|| format!("writing scores of {}", path.display()))?;
    if world > 1 {
        shards.comm().barrier()?;
    }
    Ok(ScoreSummary { lines, sequences: logps.len(), tokens: total, seconds: t0.elapsed().as_secs_f64() })
}
