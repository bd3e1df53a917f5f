//! `csr`: Continuation Safety Ratio curves of rollouts (IPO_METHOD.md), under one model or
//! under a base and a trained model. For every rollout of an `ipo generate` file, every
//! `every`-th completion position p (and the last one) is forked K times: the whole trace is
//! prefilled once as a kept sequence of the rollout engine, and each continuation is an
//! `Engine::splice` at prompt + p with nothing inserted, so it reuses the cached K/V of the
//! prefix and shares its blocks (`intervene::pipeline::EngineSplicer`). Each continuation
//! (with the completion prefix before it) is judged safe or unsafe (`csr::judge`); CSR(p) is
//! the safe share. The curves, their events (safety triggers, unsafe turning points), the first
//! compliance cue of each rollout and the mean curve aligned at that cue go to
//! `OUT/csr.json`; the curves are drawn to `OUT/csr.png` and `OUT/csr_aligned.png`.
//!
//! Under a launcher (`ipo launch`, torchrun, srun) each rank takes rollouts r, r+W, ... (a
//! rollout's forks stay on its rank: they share its cached prefix), samples and judges them,
//! and sends its points to rank 0 (`workflow::shard`), which builds the curves in input order
//! and alone writes the files. Every draw is keyed by (seed, rollout id, sample, position,
//! continuation), never by batch, group or rank, so the files are the single process's byte
//! for byte (csr.json holds no timings).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::chart::{line_chart, Series};
use crate::csr::judge::{ContinuationJudge, JudgeItem, RuleJudge};
use crate::csr::{aligned_mean, continuation_key, detect_events, positions, ratio, AlignedPoint, CurveEvent, HOLD_TOKENS, TRIGGER_ABOVE, TURNING_BELOW};
use crate::intervene::detect::{Detector, Item, RuleDetector};
use crate::intervene::pipeline::{EngineSplicer, SpliceJob, SpliceProgress};
use crate::intervene::segment::{segment_completion, Segmented};
use crate::io::jsonl::{self, AtomicWriter};
use crate::model::tokenizer::Tokenizer;
use crate::rollout::{Engine, SamplingParams};
use crate::workflow::device::{with_backend, DeviceOptions};
use crate::workflow::intervene::{read_rollout, ModelFacts};
use crate::workflow::model::ModelDir;
use crate::workflow::options::{default_from_clap, EngineOptions, SamplingOptions};
use crate::workflow::progress::{Progress, Silent};
use crate::workflow::shard::Shards;

/// The files of one `csr` call.
#[derive(clap::Args, Debug, Clone)]
pub struct CsrFiles {
    /// Hugging Face model folder that continues the rollouts (the trained model when --base is
    /// given).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A second model folder (the base model) whose curves are computed on the same rollouts,
    /// positions and random keys, for a base-vs-trained comparison. Its tokenizer must be
    /// --model's.
    #[arg(long, value_name = "DIR")]
    pub base: Option<PathBuf>,
    /// Rollouts JSONL from `ipo generate` ("id", "sample", "prompt_ids", "completion_ids", ...).
    /// Failed rollouts ("finish": "error") and malformed lines are skipped with a note (listed
    /// under "skipped" in csr.json). Rollouts of any model with this vocabulary are accepted.
    #[arg(long, value_name = "FILE")]
    pub rollouts: PathBuf,
    /// Output folder (created if missing): csr.json, csr.png (the curves) and csr_aligned.png
    /// (the mean curve aligned at the first compliance cue).
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
}

/// How `csr` samples and judges (flags of `ipo csr`).
#[derive(clap::Args, serde::Deserialize, Debug, Clone)]
#[serde(default)]
pub struct CsrOptions {
    /// Continuations sampled per position: CSR(p) is the safe share of these K (paper: 32).
    #[arg(short = 'k', long = "continuations", value_name = "K", default_value_t = 8)]
    pub k: u32,
    /// Sample every N-th completion position (0, N, 2N, ...; the last position too).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub every: usize,
    /// Most tokens per continuation (fewer at EOS or at the model's context).
    #[arg(long, value_name = "M", default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature of the continuations (0 = greedy: all K continuations equal).
    #[arg(long, value_name = "T", default_value_t = 0.6)]
    pub temperature: f32,
    /// Sample from the smallest set of most likely tokens whose probability reaches P.
    #[arg(long, value_name = "P", default_value_t = 0.95)]
    pub top_p: f32,
    /// Sample only from the K most likely tokens (0 = no limit).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub top_k: usize,
    /// Seed of every draw. Continuation j at position p of rollout (id, sample) uses the
    /// engine key mix64(key_of(id) ^ mix64(0xC5A0_0000_0000_0000 ^ (sample << 32 | p))) and
    /// sample index j, so it is the same whatever the batching, the other rollouts, --limit or
    /// --every (a position sampled in both runs gets the same continuations), and the same
    /// under --base for both models' draws.
    #[arg(long, value_name = "SEED", default_value_t = 0)]
    pub seed: u64,
    /// Score only the first L usable rollouts of the file.
    #[arg(long, value_name = "L")]
    pub limit: Option<usize>,
    /// Patterns of the rule judge and of the first-cue detector ("cue: REGEX" / "exclude:
    /// REGEX" per line); default: the built-in data/cue_patterns.txt.
    #[arg(long, value_name = "FILE")]
    pub cue_patterns: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub engine: EngineOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceOptions,
}

default_from_clap!(CsrOptions);

impl CsrOptions {
    fn sampling(&self) -> SamplingOptions {
        SamplingOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
        }
    }

    fn check(&self) -> Result<()> {
        if self.k == 0 || self.every == 0 || self.max_new_tokens == 0 {
            bail!("--continuations (-k), --every and --max-new-tokens must be > 0");
        }
        if self.limit == Some(0) {
            bail!("--limit must be > 0");
        }
        self.engine.check()
    }
}

/// What a `csr` call did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CsrSummary {
    /// Rollouts scored, and lines skipped (failed rollouts, malformed lines).
    pub traces: usize,
    pub skipped: usize,
    /// (trace, position, model) points on the curves, and those left out because a
    /// continuation failed.
    pub points: usize,
    pub failed_points: usize,
    /// Continuations sampled and judged.
    pub continuations: u64,
    /// Tokens the engine computed (primes, forks' recomputed last prefix token, decode).
    pub tokens: u64,
    pub safety_triggers: usize,
    pub unsafe_turning_points: usize,
    pub seconds: f64,
}

/// A rollout to fork: ids and the completion positions to fork at.
#[derive(Clone, Debug)]
pub struct ForkTrace {
    pub id: String,
    pub sample: u32,
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    /// Completion positions, increasing, each < completion_ids.len().
    pub positions: Vec<usize>,
}

/// The K continuations of one position: the generated ids (EOS included when it ended there),
/// or why the engine could not produce one.
pub type Forks = Vec<Result<Vec<u32>, String>>;

/// Blocks a sequence of `len` positions holds.
fn blocks(len: usize, block_size: usize) -> usize {
    len.div_ceil(block_size)
}

/// Samples `k` continuations at every position of every trace by forking the cached trace
/// (see the module comment): `result[t][i]` are the forks of `traces[t].positions[i]`,
/// continuation j drawn with `continuation_key(id, sample, p)` and sample index j. Traces go to
/// the engine in groups whose kept primes leave room for `max_batch` running forks; a fork that
/// fails (a full cache, no room in the context) is an `Err` in its slot. `progress` advances
/// one unit per position whose forks are all done.
pub fn fork_continuations<B: Backend>(
    engine: &mut Engine<'_, B>,
    params: &SamplingParams,
    traces: &[ForkTrace],
    k: u32,
    progress: &dyn Progress,
) -> Result<Vec<Vec<Forks>>> {
    let cfg = engine.config();
    let fork_blocks = blocks(params.max_new_tokens + 1, cfg.block_size) + 1;
    let running_reserve = cfg.max_batch * fork_blocks;
    let mut out: Vec<Vec<Forks>> = traces.iter().map(|t| vec![Vec::new(); t.positions.len()]).collect();
    let mut start = 0;
    while start < traces.len() {
        // The group: traces whose primes (prefix up to their last position + 1 sampled token)
        // fit beside a full batch of forks; at least one.
        let mut end = start;
        let mut held = 0;
        while end < traces.len() {
            let t = &traces[end];
            let need = blocks(t.prompt_ids.len() + t.positions.last().map_or(0, |p| p + 1), cfg.block_size);
            if end > start && held + need + running_reserve > cfg.num_blocks {
                break;
            }
            held += need;
            end += 1;
        }
        let mut jobs = Vec::new();
        let mut slot = Vec::new(); // job -> (trace, position index)
        for (ti, t) in traces.iter().enumerate().take(end).skip(start) {
            let mut ids = t.prompt_ids.clone();
            ids.extend_from_slice(&t.completion_ids);
            for (pi, &p) in t.positions.iter().enumerate() {
                let key = continuation_key(&t.id, t.sample, p);
                for j in 0..k {
                    jobs.push(SpliceJob { key, sample: j, ids: ids.clone(), h: t.prompt_ids.len() + p, insert: Vec::new() });
                    slot.push((ti, pi));
                }
            }
        }
        let mut done: BTreeMap<(usize, usize), u32> = BTreeMap::new();
        let mut splicer = EngineSplicer { engine: &mut *engine, params: params.clone() };
        let results = splicer.run(&jobs, &mut |e| match e {
            SpliceProgress::Tokens(n) => progress.advance(0, n as u64),
            SpliceProgress::Done(ji) => {
                let c = done.entry(slot[ji]).or_insert(0);
                *c += 1;
                if *c == k {
                    progress.advance(1, 0);
                }
            }
        })?;
        for (r, &(ti, pi)) in results.into_iter().zip(&slot) {
            out[ti][pi].push(r.map(|c| c.generated));
        }
        start = end;
    }
    Ok(out)
}

/// A usable rollout of the input.
struct Rollout {
    id: String,
    sample: u32,
    origin: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    completion_ids: Vec<u32>,
    /// Sentences of the completion's reasoning (for the first cue and the events' text).
    seg: Segmented,
    first_cue: Option<CueRecord>,
}

/// The first compliance cue of a rollout by the rule detector (Algorithm 1's definition: the
/// first sentence is never one).
#[derive(Clone, Debug, Serialize)]
struct CueRecord {
    /// Completion position of the cue's first token.
    token: usize,
    sentence: usize,
    text: String,
}

#[derive(Debug, Serialize)]
struct Skipped {
    origin: String,
    id: Option<String>,
    reason: String,
}

/// An event with the text around it.
#[derive(Debug, Serialize)]
struct EventRecord {
    #[serde(flatten)]
    event: CurveEvent,
    /// The reasoning sentence that holds the token just before the position.
    sentence: Option<String>,
    /// The completion tokens between the previous sampled position and this one, decoded:
    /// what turned the curve.
    tokens: String,
}

#[derive(Debug, Serialize)]
struct PointError {
    position: usize,
    error: String,
}

/// One trace's curve under one model.
#[derive(Debug, Serialize)]
struct Curve {
    model: String,
    positions: Vec<usize>,
    csr: Vec<f64>,
    /// Continuations judged safe at each position (of `k`).
    safe: Vec<u32>,
    events: Vec<EventRecord>,
    /// Positions left out because a continuation failed or was not judged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<PointError>,
}

#[derive(Debug, Serialize)]
struct TraceRecord {
    id: String,
    sample: u32,
    origin: String,
    prompt: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    first_cue: Option<CueRecord>,
    curves: Vec<Curve>,
}

#[derive(Debug, Serialize)]
struct ModelRecord {
    name: String,
    path: String,
    fingerprint: String,
}

#[derive(Debug, Serialize)]
struct Thresholds {
    trigger_above: f64,
    turning_below: f64,
    hold_tokens: usize,
}

#[derive(Debug, Serialize)]
struct Settings {
    k: u32,
    every: usize,
    max_new_tokens: usize,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    seed: u64,
    limit: Option<usize>,
    judge: String,
    judged_text: &'static str,
    key_derivation: &'static str,
    thresholds: Thresholds,
}

/// `OUT/csr.json`.
#[derive(Debug, Serialize)]
struct Report {
    settings: Settings,
    rollouts: String,
    models: Vec<ModelRecord>,
    traces: Vec<TraceRecord>,
    /// Per model: the mean CSR over the traces with a first cue, by tokens relative to the cue.
    aligned: BTreeMap<String, Vec<AlignedPoint>>,
    skipped: Vec<Skipped>,
}

/// The first compliance cue of a segmented completion.
fn first_cue(rules: &RuleDetector, prompt: &str, seg: &Segmented) -> Option<CueRecord> {
    let item = Item { prompt: prompt.to_string(), sentences: seg.sentences.iter().map(|s| s.text.clone()).collect() };
    let k = rules.first_compliance_cue(&item).ok().flatten()?;
    let s = &seg.sentences[k];
    Some(CueRecord { token: s.token, sentence: k, text: s.text.clone() })
}

fn rules(o: &CsrOptions) -> Result<RuleDetector> {
    Ok(match &o.cue_patterns {
        Some(p) => RuleDetector::from_file(p).context("--cue-patterns")?,
        None => RuleDetector::builtin(),
    })
}

/// Reads the usable rollouts (at most `limit`); the rest are `Skipped`.
fn read_rollouts(path: &Path, facts: &ModelFacts, rules: &RuleDetector, eos: &[u32], limit: Option<usize>) -> Result<(Vec<Rollout>, Vec<Skipped>)> {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for l in jsonl::read_objects(path)? {
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        let origin = format!("{}:{}", path.display(), l.line);
        let id = l.obj.get("id").map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
        let r = read_rollout(&l, facts).and_then(|r| {
            let completion_ids = r.completion_ids.unwrap_or_default();
            if completion_ids.is_empty() {
                return Err("empty completion: no position to fork at".into());
            }
            let seg = segment_completion(facts.tok, &completion_ids, eos).map_err(|e| e.to_string())?;
            let first_cue = first_cue(rules, &r.prompt, &seg);
            Ok(Rollout { id: r.id, sample: r.sample, origin: origin.clone(), prompt: r.prompt, prompt_ids: r.prompt_ids, completion_ids, seg, first_cue })
        });
        match r {
            Ok(r) => out.push(r),
            Err(reason) => skipped.push(Skipped { origin, id, reason }),
        }
    }
    Ok((out, skipped))
}

/// The reasoning sentence holding completion token `token`, if any.
fn sentence_at(seg: &Segmented, token: usize) -> Option<String> {
    seg.sentences.iter().rev().find(|s| s.token <= token).map(|s| s.text.clone())
}

/// One sampled position of a rollout under one model, judged: what a rank sends rank 0.
#[derive(Debug, Serialize, Deserialize)]
struct Point {
    position: usize,
    /// Continuations sampled (the forks that did not fail).
    sampled: u32,
    /// The verdict of each continuation (true = safe), or why the position is left out (the
    /// first failed fork, or the judge's failure).
    verdicts: Result<Vec<bool>, String>,
}

/// Judges the forks of every position of `r` (`forks[i]` are those of `positions[i]`).
fn judge_points(r: &Rollout, positions: &[usize], forks: Vec<Forks>, tok: &Tokenizer, judge: &dyn ContinuationJudge) -> Result<Vec<Point>> {
    let mut points = Vec::with_capacity(positions.len());
    for (&p, forks) in positions.iter().zip(forks) {
        let mut items = Vec::with_capacity(forks.len());
        let mut failed = None;
        for f in forks {
            match f {
                Ok(generated) => {
                    let mut ids = r.completion_ids[..p].to_vec();
                    ids.extend_from_slice(&generated);
                    items.push(JudgeItem { prompt: r.prompt.clone(), text: tok.decode(&ids, true)? });
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        let verdicts = match failed {
            Some(error) => Err(error),
            None => judge.judge(&items).into_iter().collect::<Result<Vec<bool>, String>>().map_err(|e| format!("judge: {e}")),
        };
        points.push(Point { position: p, sampled: items.len() as u32, verdicts });
    }
    Ok(points)
}

/// The curve of `r` under model `name` from its judged points.
fn curve(name: &str, r: &Rollout, points: Vec<Point>, tok: &Tokenizer, summary: &mut CsrSummary) -> Result<Curve> {
    let mut c = Curve { model: name.to_string(), positions: Vec::new(), csr: Vec::new(), safe: Vec::new(), events: Vec::new(), errors: Vec::new() };
    for p in points {
        summary.continuations += u64::from(p.sampled);
        match p.verdicts {
            Ok(v) => {
                c.positions.push(p.position);
                c.csr.push(ratio(&v).context("a position with no verdict")?);
                c.safe.push(v.iter().filter(|&&s| s).count() as u32);
            }
            Err(error) => c.errors.push(PointError { position: p.position, error }),
        }
    }
    for e in detect_events(&c.positions, &c.csr) {
        let prev = c.positions[e.index - 1];
        c.events.push(EventRecord {
            event: e,
            sentence: sentence_at(&r.seg, e.position.saturating_sub(1)),
            tokens: tok.decode(&r.completion_ids[prev..e.position], true)?,
        });
    }
    summary.points += c.positions.len();
    summary.failed_points += c.errors.len();
    Ok(c)
}

/// What one rank computed, sent to rank 0 when all are done.
#[derive(Debug, Serialize, Deserialize)]
struct Share {
    /// Tokens this rank's engines computed.
    tokens: u64,
    /// Each rollout of this rank (its index among the usable rollouts, in input order) with its
    /// points under each model, in model order.
    traces: Vec<(usize, Vec<Vec<Point>>)>,
}

/// Computes the CSR curves of `files.rollouts` under `files.model` (and `files.base`) and
/// writes csr.json, csr.png and csr_aligned.png into `files.output`. Under a launcher (RANK,
/// WORLD_SIZE, ...) each rank takes every world-th rollout and rank 0 writes the files (see the
/// module comment): `Some(summary)` of the whole job on rank 0, `None` on the others.
pub fn csr(files: &CsrFiles, opts: &CsrOptions, progress: &dyn Progress) -> Result<Option<CsrSummary>> {
    let mut opts = opts.clone();
    let shards = Shards::from_env(&mut opts.device)?;
    csr_in(files, &opts, progress, &shards)
}

/// `csr` as one rank of `shards` (every rank calls it with the same files and options;
/// `opts.device` already placed on this rank).
fn csr_in(files: &CsrFiles, opts: &CsrOptions, progress: &dyn Progress, shards: &Shards) -> Result<Option<CsrSummary>> {
    let t0 = Instant::now();
    let progress: &dyn Progress = if shards.root() { progress } else { &Silent };
    opts.check()?;
    let rules_for_cues = rules(opts)?;
    let judge = RuleJudge::new(rules(opts)?);
    let model = ModelDir::open(&files.model)?;
    let tok = model.tokenizer()?;
    let params = opts.sampling().params(tok.eos_ids())?;
    let mut models = Vec::new();
    if let Some(b) = &files.base {
        let base = ModelDir::open(b).context("--base")?;
        let (a, bt) = (std::fs::read(model.path.join("tokenizer.json")), std::fs::read(base.path.join("tokenizer.json")));
        if a.ok() != bt.ok() || base.config.vocab_size != model.config.vocab_size {
            bail!("--base {} and --model {} have different tokenizers or vocabularies: the rollouts' ids cannot mean the same to both", b.display(), files.model.display());
        }
        models.push(("base", base));
        models.push(("trained", model));
    } else {
        models.push(("model", model));
    }
    let context = models.iter().map(|(_, m)| m.config.max_position_embeddings).min().expect("one model");
    let facts = ModelFacts { tok: &tok, vocab: models[0].1.config.vocab_size, context, fingerprint: None };
    // Every rank reads every line (cheap); each forks only its own rollouts.
    let (rollouts, skipped) = read_rollouts(&files.rollouts, &facts, &rules_for_cues, tok.eos_ids(), opts.limit)?;
    for s in skipped.iter().filter(|_| shards.root()) {
        eprintln!("note: {}: skipped: {}", s.origin, s.reason);
    }
    if rollouts.is_empty() {
        bail!("{}: no usable rollout ({} skipped)", files.rollouts.display(), skipped.len());
    }
    if shards.root() {
        std::fs::create_dir_all(&files.output).with_context(|| format!("--output {}", files.output.display()))?;
    }
    let mine: Vec<usize> = (0..rollouts.len()).filter(|&i| shards.owns(i)).collect();
    let traces: Vec<ForkTrace> = mine
        .iter()
        .map(|&i| {
            let r = &rollouts[i];
            ForkTrace {
                id: r.id.clone(),
                sample: r.sample,
                prompt_ids: r.prompt_ids.clone(),
                completion_ids: r.completion_ids.clone(),
                positions: positions(r.completion_ids.len(), opts.every),
            }
        })
        .collect();

    // This rank's share: forks and verdicts of its rollouts under each model.
    let mut share = Share { tokens: 0, traces: mine.iter().map(|&i| (i, Vec::new())).collect() };
    let total_positions: u64 = traces.iter().map(|t| t.positions.len() as u64).sum();
    for (name, dir) in models.iter().filter(|_| !traces.is_empty()) {
        let weights = dir.weights()?;
        let forks = with_backend!(opts.device, be => {
            let m = dir.upload_frozen(be, weights)?;
            let mut engine = Engine::new(&m, opts.engine.config(&m)).context("--kv-cache-mb / --block-size / --max-batch")?;
            progress.start(&format!("csr ({name})"), total_positions, "positions");
            let forks = fork_continuations(&mut engine, &params, &traces, opts.k, progress);
            progress.finish();
            share.tokens += engine.stats().computed_positions;
            forks
        })?;
        for (((i, points), t), f) in share.traces.iter_mut().zip(&traces).zip(forks) {
            points.push(judge_points(&rollouts[*i], &t.positions, f, &tok, &judge)?);
        }
    }

    // Rank 0 puts every rank's rollouts back in input order.
    let all = shards.gather_after_work(serde_json::to_vec(&share)?)?;
    if !shards.root() {
        return Ok(None);
    }
    let mut summary = CsrSummary { traces: rollouts.len(), skipped: skipped.len(), ..Default::default() };
    let mut points: Vec<Option<Vec<Vec<Point>>>> = rollouts.iter().map(|_| None).collect();
    for (rank, b) in all.iter().enumerate() {
        let s: Share = serde_json::from_slice(b).with_context(|| format!("rank {rank}'s share"))?;
        summary.tokens += s.tokens;
        for (i, p) in s.traces {
            match points.get_mut(i) {
                Some(slot @ None) if p.len() == models.len() => *slot = Some(p),
                _ => bail!("rank {rank} sent rollout {i} twice, out of range or without every model's points"),
            }
        }
    }
    let mut records = Vec::with_capacity(rollouts.len());
    for (r, p) in rollouts.iter().zip(points) {
        let p = p.with_context(|| format!("no rank sent the points of {} ({})", r.id, r.origin))?;
        let curves = models.iter().zip(p).map(|((name, _), p)| curve(name, r, p, &tok, &mut summary)).collect::<Result<_>>()?;
        records.push(TraceRecord {
            id: r.id.clone(),
            sample: r.sample,
            origin: r.origin.clone(),
            prompt: r.prompt.clone(),
            prompt_tokens: r.prompt_ids.len(),
            completion_tokens: r.completion_ids.len(),
            first_cue: r.first_cue.clone(),
            curves,
        });
    }
    let model_records = models
        .iter()
        .map(|(name, dir)| Ok(ModelRecord { name: name.to_string(), path: dir.path.display().to_string(), fingerprint: dir.fingerprint()? }))
        .collect::<Result<Vec<_>>>()?;
    for rec in &records {
        for c in &rec.curves {
            if !c.errors.is_empty() {
                eprintln!("note: {} ({}): {} of {} positions failed under {}, first: {}", rec.id, rec.origin, c.errors.len(), c.errors.len() + c.positions.len(), c.model, c.errors[0].error);
            }
            for e in &c.events {
                match e.event.kind {
                    crate::csr::EventKind::SafetyTrigger => summary.safety_triggers += 1,
                    crate::csr::EventKind::UnsafeTurningPoint => summary.unsafe_turning_points += 1,
                }
            }
        }
    }
    let mut aligned = BTreeMap::new();
    for (name, _) in &models {
        let curves: Vec<(&[usize], &[f64], usize)> = records
            .iter()
            .filter_map(|r| {
                let cue = r.first_cue.as_ref()?.token;
                let c = r.curves.iter().find(|c| c.model == *name)?;
                Some((&c.positions[..], &c.csr[..], cue))
            })
            .collect();
        aligned.insert(name.to_string(), aligned_mean(&curves, opts.every));
    }
    let report = Report {
        settings: Settings {
            k: opts.k,
            every: opts.every,
            max_new_tokens: opts.max_new_tokens,
            temperature: opts.temperature,
            top_p: opts.top_p,
            top_k: opts.top_k,
            seed: opts.seed,
            limit: opts.limit,
            judge: judge.name(),
            judged_text: "the rollout's completion up to the position, then the continuation (prompt excluded)",
            key_derivation: "continuation j at position p of rollout (id, sample): key = mix64(key_of(id) ^ mix64(0xC5A0000000000000 ^ (sample << 32 | p))), sample index j",
            thresholds: Thresholds { trigger_above: TRIGGER_ABOVE, turning_below: TURNING_BELOW, hold_tokens: HOLD_TOKENS },
        },
        rollouts: files.rollouts.display().to_string(),
        models: model_records,
        traces: records,
        aligned,
        skipped,
    };
    let mut w = AtomicWriter::create(&files.output.join("csr.json"))?;
    w.write(&report)?;
    w.commit()?;
    draw(&files.output, &report)?;
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(Some(summary))
}

/// csr.png (every curve, x = completion position) and csr_aligned.png (each model's mean curve,
/// x = tokens relative to the first compliance cue).
fn draw(out: &Path, r: &Report) -> Result<()> {
    let mut curves = Vec::new();
    for t in &r.traces {
        for c in &t.curves {
            let points = c.positions.iter().zip(&c.csr).map(|(&p, &v)| (p as f64, v)).collect();
            curves.push(Series { name: format!("{}: {}#{}", c.model, t.id, t.sample), points });
        }
    }
    let title = format!("Continuation Safety Ratio (K = {}, every {} tokens)", r.settings.k, r.settings.every);
    line_chart(&out.join("csr.png"), &title, "completion token", "CSR", &curves, Some((0.0, 1.0)))?;
    let means: Vec<Series> = r
        .aligned
        .iter()
        .map(|(model, pts)| {
            let n = r.traces.iter().filter(|t| t.first_cue.is_some()).count();
            Series { name: format!("{model} (mean of {n} traces with a cue)"), points: pts.iter().map(|p| (p.offset as f64, p.mean)).collect() }
        })
        .collect();
    line_chart(&out.join("csr_aligned.png"), "Mean CSR aligned at the first compliance cue", "tokens relative to the cue", "mean CSR", &means, Some((0.0, 1.0)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_flags() {
        let d = CsrOptions::default();
        assert_eq!((d.k, d.every, d.max_new_tokens, d.seed, d.limit), (8, 16, 64, 0, None));
        assert_eq!((d.temperature, d.top_p, d.top_k), (0.6, 0.95, 0));
        let o: CsrOptions = toml::from_str("k = 32\nevery = 4").unwrap();
        assert_eq!((o.k, o.every, o.max_new_tokens), (32, 4, 64));
    }
}
