//! `intervene`: Algorithm 1 of IPO_METHOD.md as a workflow. Reads rollouts (typed `Rollout`
//! records from `ipo generate`) or prompts (then samples one rollout per prompt itself), finds
//! the first compliance cue of each (rule detector or LLM judge), splices every trigger of the
//! pool in at that token, continues from the cached prefix with the same sampler settings, and
//! writes a `Pair` (DESIGN.md section 4) for every continuation without a cue; the algorithm
//! itself is `crate::intervene::pipeline`. Beside the pairs (written atomically) it writes
//! `<output stem>.stats.json` (the counters) and `<output stem>.errors.jsonl` (one line per item
//! that failed: bad input, detector error, generation error), so nothing is lost silently.
//! Pairs and errors come in input order (a rollout's own pairs by round, then trigger), so
//! the files do not depend on `--chunk`, nor on the number of processes under a launcher
//! (`workflow::shard`: each rank takes every world-th rollout, rank 0 merges; the random draws
//! are keyed by seed, rollout id, sample, trigger and round, never by batch or rank).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ArgGroup;
use serde_json::{json, Map, Value};

use crate::eval::judge::RuleJudge;
use crate::intervene::detect::{Detector, RuleDetector};
use crate::intervene::judge::Judge;
use crate::intervene::pipeline::{run_batch, EngineSplicer, ItemError, Settings, Stats, Trace};
use crate::intervene::triggers::load_triggers;
use crate::io::jsonl::{self, AtomicWriter, Line};
use crate::io::records::Rollout;
use crate::model::chat::ChatTemplate;
use crate::model::tokenizer::Tokenizer;
use crate::rollout::{key_of, Engine, Event, Request};
use crate::workflow::device::{with_backend, DeviceOptions};
use crate::workflow::model::ModelDir;
use crate::workflow::options::{default_from_clap, EngineOptions, JudgeEndpointOptions, SamplingOptions};
use crate::workflow::progress::{Progress, Silent};
use crate::workflow::shard::{self, Shards};

/// The files of one `intervene` call: exactly one of `rollouts` and `prompts` is the input.
#[derive(clap::Args, Debug, Clone)]
#[command(group(ArgGroup::new("source").required(true).args(["rollouts", "prompts"])))]
pub struct InterveneFiles {
    /// Hugging Face model folder (config.json, weights, tokenizer.json, tokenizer_config.json):
    /// the model that continues after each splice; must be the model of the rollouts.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Rollouts JSONL from `ipo generate`: {"id", "prompt", "sample", "prompt_ids",
    /// "completion_ids", "kind"?, "model"?, ...}. A rollout whose "model" fingerprint
    /// (written by `ipo generate`) differs from --model's is rejected, as is a failed rollout
    /// ("finish": "error") and one longer than the model's context; all are listed in the errors file and the rest goes on. Continue
    /// with the sampler settings the rollouts were generated with.
    #[arg(long, value_name = "FILE")]
    pub rollouts: Option<PathBuf>,
    /// Prompts JSONL instead of --rollouts: {"id", "prompt", "system"?, "kind"?}; one rollout
    /// per prompt is sampled first with the sampler settings below.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Where to write the pairs (JSONL, written atomically). Beside it: <stem>.stats.json
    /// (summary) and <stem>.errors.jsonl (per-item failures).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
}

/// How `intervene` detects, splices and continues (flags of `ipo intervene`, keys of the
/// `[intervene]` table of `ipo run`).
#[derive(clap::Args, serde::Deserialize, Debug, Clone)]
#[serde(default)]
pub struct InterveneOptions {
    /// Safety-trigger pool, one sentence per line ('#' comments); default: the built-in
    /// data/triggers.txt. Every trigger is tried on every rollout with a cue, unless
    /// --triggers-per-rollout says otherwise.
    #[arg(long, value_name = "FILE")]
    pub triggers: Option<PathBuf>,
    /// Triggers tried per rollout: 0 = every trigger of the pool (the paper); K > 0 = K of
    /// them, a different K for each rollout, picked by a hash of --seed, the rollout's id and
    /// sample (the same ones on every run). A large pool then adds variety to the chosen
    /// sides without multiplying the splices.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub triggers_per_rollout: usize,
    /// Most splices per (rollout, trigger): after a splice whose continuation still has a
    /// cue, cut again at the new cue (paper: 1).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub rounds: u32,
    /// Keep a pair only when the continuation after the trigger ended by itself (EOS or a stop
    /// string), not when --max-new-tokens cut it: a cut continuation is an unfinished trace,
    /// and training on it (DPO, and the SFT term) teaches the model to ramble on after
    /// declining. Left-out continuations are counted as "skipped_unfinished" in the stats.
    #[arg(long)]
    pub complete_only: bool,
    /// For models that answer directly (no think tags): a rollout in which the detector finds
    /// no compliance cue, but whose answer the rule judge of `ipo eval` calls harmful (no
    /// refusal phrase, not a loop, a cue or at least 8 words), is cut at its first sentence and
    /// gets the triggers there. Such an answer commits in its first words, where the paper's
    /// detector never looks (the first sentence of a reasoning trace restates the request).
    /// Counted as "cut_at_answer_start" in the stats.
    #[arg(long)]
    pub answer_start: bool,
    /// Compliance-cue detector: "rules" (built-in lexicon, offline) or "judge" (an LLM over
    /// an OpenAI-compatible endpoint: needs --judge-url and --judge-model).
    #[arg(long, value_name = "KIND", default_value = "rules")]
    pub detector: String,
    /// Patterns for the rule detector ("cue: REGEX" / "exclude: REGEX" per line,
    /// case-insensitive); default: the built-in data/cue_patterns.txt.
    #[arg(long, value_name = "FILE")]
    pub cue_patterns: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub endpoint: JudgeEndpointOptions,
    /// Cache of judge verdicts by content hash (JSONL; re-runs cost no calls). Default:
    /// <output stem>.judge-cache.jsonl beside --output.
    #[arg(long, value_name = "FILE")]
    pub judge_cache: Option<PathBuf>,
    /// Also intervene on rollouts whose "kind" is "benign" (skipped by default: Algorithm 1
    /// is for harmful prompts).
    #[arg(long)]
    pub all_kinds: bool,
    /// Rollouts handled together (detection batch; their prefixes are cached at once).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub chunk: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub sampling: SamplingOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub engine: EngineOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceOptions,
}

default_from_clap!(InterveneOptions);

/// What an `intervene` call did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InterveneSummary {
    /// The counters written to `<stem>.stats.json`: rollouts read (`prompts`), skipped, with a
    /// cue, splices, pairs (per round), failures per stage, `tokens_generated`, wall `seconds`.
    #[serde(flatten)]
    pub stats: Stats,
    /// Lines written to `<stem>.errors.jsonl`.
    pub item_errors: usize,
    /// Requests sent to the judge and verdicts taken from its cache (`detector = "judge"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge_calls: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge_cache_hits: Option<u64>,
}

impl InterveneSummary {
    /// Tokens sampled (rollouts from prompts + continuations) per second of wall time.
    pub fn tokens_per_s(&self) -> f64 {
        self.stats.tokens_generated as f64 / self.stats.seconds.max(1e-9)
    }
}

/// `pairs.jsonl` -> `pairs.<suffix>` beside it.
pub(crate) fn sibling(output: &Path, suffix: &str) -> PathBuf {
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pairs".into());
    output.with_file_name(format!("{stem}.{suffix}"))
}

/// The input file and whether it holds rollouts (else prompts).
fn source(files: &InterveneFiles) -> Result<(&Path, bool)> {
    match (&files.rollouts, &files.prompts) {
        (Some(r), None) => Ok((r, true)),
        (None, Some(p)) => Ok((p, false)),
        _ => bail!("give exactly one of --rollouts and --prompts"),
    }
}

fn check(files: &InterveneFiles, o: &InterveneOptions) -> Result<()> {
    if o.rounds == 0 {
        bail!("--rounds must be >= 1");
    }
    if o.chunk == 0 {
        bail!("--chunk must be >= 1");
    }
    if o.sampling.max_new_tokens == 0 {
        bail!("--max-new-tokens must be >= 1");
    }
    o.endpoint.check().map_err(anyhow::Error::msg)?;
    let (input, _) = source(files)?;
    if let (Ok(x), Ok(y)) = (input.canonicalize(), files.output.canonicalize()) {
        if x == y {
            bail!("--output {} is the input file: write to a new file", files.output.display());
        }
    }
    o.engine.check()
}

/// The rule detector of --cue-patterns, or the built-in one.
fn rule_detector(o: &InterveneOptions) -> Result<RuleDetector> {
    Ok(match &o.cue_patterns {
        Some(p) => RuleDetector::from_file(p).context("--cue-patterns")?,
        None => RuleDetector::builtin(),
    })
}

/// The detector the options ask for; the judge is kept by name for its counters.
enum CueDetector {
    Rules(RuleDetector),
    Judge(Box<Judge>),
}

impl CueDetector {
    fn new(files: &InterveneFiles, o: &InterveneOptions) -> Result<Self> {
        match o.detector.as_str() {
            "rules" => {
                if o.endpoint.is_set() {
                    bail!("--judge-url/--judge-model need --detector judge");
                }
                Ok(CueDetector::Rules(rule_detector(o)?))
            }
            "judge" => {
                if o.cue_patterns.is_some() {
                    bail!("--cue-patterns is for --detector rules");
                }
                let cache = o.judge_cache.clone().unwrap_or_else(|| sibling(&files.output, "judge-cache.jsonl"));
                let cfg = o.endpoint.config("--detector judge", cache).map_err(anyhow::Error::msg)?;
                Ok(CueDetector::Judge(Box::new(Judge::new(cfg)?)))
            }
            d => bail!("--detector {d}: expected rules or judge"),
        }
    }

    fn get(&self) -> &dyn Detector {
        match self {
            CueDetector::Rules(r) => r,
            CueDetector::Judge(j) => j.as_ref(),
        }
    }
}

/// A line's "id": a string, or an integer in a file written by hand.
fn id_of(o: &Map<String, Value>) -> Result<String, String> {
    match o.get("id") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        None => Err("missing field \"id\"".into()),
        Some(v) => Err(format!("\"id\" must be a string, found {v}")),
    }
}

fn is_u32(v: &Value) -> bool {
    v.as_u64().is_some_and(|x| x <= u32::MAX as u64)
}

/// Checks that field `name` is a list of token ids (u32), with a reason naming the element.
fn check_token_ids(o: &Map<String, Value>, name: &str) -> Result<(), String> {
    match o.get(name) {
        None => Err(format!("missing field \"{name}\"")),
        Some(Value::Array(a)) => match a.iter().position(|v| !is_u32(v)) {
            Some(i) => Err(format!("\"{name}\"[{i}] is not a token id: {}", a[i])),
            None => Ok(()),
        },
        Some(v) => Err(format!("\"{name}\" must be a list of token ids, found {v}")),
    }
}

/// What a rollout line is checked against.
pub(crate) struct ModelFacts<'a> {
    pub tok: &'a Tokenizer,
    pub vocab: usize,
    /// max_position_embeddings of config.json.
    pub context: usize,
    /// The fingerprint the rollout's "model" must have; `None` takes rollouts of any model
    /// with this vocabulary (`ipo csr` scores one model's rollouts under another).
    pub fingerprint: Option<&'a str>,
}

/// One line of a rollouts file as a `Rollout` of the model `m`. The raw line is checked first,
/// so that every reason names the field (and element) that is wrong, which serde's errors do
/// not; then it is converted. Files written by hand are accepted as before: "id" may be an
/// integer, "sample", "seed" and "finish" may be missing, and so may "prompt" (then decoded
/// from "prompt_ids").
pub(crate) fn read_rollout(l: &Line, m: &ModelFacts) -> Result<Rollout, String> {
    let o = &l.obj;
    let id = id_of(o)?;
    if o.get("finish").and_then(Value::as_str) == Some("error") {
        let why = o.get("error").and_then(Value::as_str).unwrap_or("no reason given");
        return Err(format!("the rollout failed in generate: {why}"));
    }
    // `ipo generate` writes the fingerprint as "model"; "model_fingerprint" is accepted too.
    for key in ["model", "model_fingerprint"] {
        if let Some(fp) = o.get(key) {
            let fp = fp.as_str().ok_or(format!("\"{key}\" must be the model fingerprint string"))?;
            if let Some(want) = m.fingerprint.filter(|&w| w != fp) {
                return Err(format!("rollout of another model or tokenizer: \"{key}\" fingerprint {fp}, --model has {want}"));
            }
        }
    }
    check_token_ids(o, "prompt_ids")?;
    check_token_ids(o, "completion_ids")?;
    match o.get("prompt") {
        None | Some(Value::String(_)) => {}
        Some(v) => return Err(format!("\"prompt\" must be a string, found {v}")),
    }
    match o.get("sample") {
        Some(v) if !is_u32(v) => return Err(format!("\"sample\" must be an integer, found {v}")),
        _ => {}
    }
    let mut rec = o.clone();
    rec.insert("id".into(), Value::String(id));
    for (key, default) in [("sample", json!(0)), ("seed", json!(0)), ("finish", json!("")), ("prompt", json!(""))] {
        rec.entry(key).or_insert(default);
    }
    let mut r: Rollout = serde_json::from_value(Value::Object(rec)).map_err(|e| format!("not a rollout record: {e}"))?;
    if r.prompt_ids.is_empty() {
        return Err("empty \"prompt_ids\"".into());
    }
    let completion_ids = r.completion_ids.as_deref().unwrap_or_default();
    for (name, ids) in [("prompt_ids", &r.prompt_ids[..]), ("completion_ids", completion_ids)] {
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &x)| x as usize >= m.vocab) {
            return Err(format!("\"{name}\"[{i}] = {id} is not a token id of the model (vocab_size {})", m.vocab));
        }
    }
    // Every pair of a rollout has context + rejected = the whole rollout, so one longer than the
    // context makes pairs that score and train reject (a continuation is capped at the context by
    // the engine, and a splice with no room left fails on its own).
    let len = r.prompt_ids.len() + completion_ids.len();
    if len > m.context {
        return Err(format!(
            "prompt_ids ({}) + completion_ids ({}) = {len} tokens exceed the model's context (max_position_embeddings = {}): its pairs could not be scored or trained",
            r.prompt_ids.len(),
            completion_ids.len(),
            m.context
        ));
    }
    if !o.contains_key("prompt") {
        r.prompt = m.tok.decode(&r.prompt_ids, true).map_err(|e| e.to_string())?;
    }
    Ok(r)
}

/// The trace Algorithm 1 works on.
fn trace_of(r: Rollout, origin: String) -> Trace {
    let kind = r.extra.get("kind").and_then(Value::as_str).map(str::to_string);
    let completion_ids = r.completion_ids.unwrap_or_default();
    Trace { id: r.id, prompt: r.prompt, kind, sample: r.sample, prompt_ids: r.prompt_ids, completion_ids, origin }
}

/// A prompt line as a trace to sample (`completion_ids` empty): {"id", "prompt", "system"?}
/// chat-rendered and tokenized.
fn prompt_trace(l: &Line, chat: &ChatTemplate, tok: &Tokenizer, origin: String) -> Result<Trace, String> {
    let id = id_of(&l.obj)?;
    let prompt = match l.obj.get("prompt") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err("empty \"prompt\"".into()),
        None => return Err("missing field \"prompt\"".into()),
        Some(v) => return Err(format!("\"prompt\" must be a string, found {v}")),
    };
    let mut messages = Vec::new();
    match l.obj.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(v) => return Err(format!("\"system\" must be a string, found {v}")),
    }
    messages.push(json!({"role": "user", "content": prompt}));
    let text = chat.render(&messages, true, &Map::new()).map_err(|e| e.to_string())?;
    let prompt_ids = tok.encode(&text, false).map_err(|e| e.to_string())?;
    let kind = l.obj.get("kind").and_then(Value::as_str).map(str::to_string);
    Ok(Trace { id, prompt, kind, sample: 0, prompt_ids, completion_ids: Vec::new(), origin })
}

/// Runs Algorithm 1 on the input of `files` and writes the pairs, stats and errors files.
/// Under a launcher (RANK, WORLD_SIZE, ...) each rank takes every world-th rollout (of those not
/// skipped as benign) and rank 0 merges the pairs and errors in input order (`shard`): the files
/// are the single process's, and the summary is the whole job's.
pub fn intervene(files: &InterveneFiles, opts: &InterveneOptions, progress: &dyn Progress) -> Result<InterveneSummary> {
    let mut opts = opts.clone();
    let shards = Shards::from_env(&mut opts.device)?;
    intervene_in(files, &opts, progress, &shards)
}

/// What one rank did, sent to every rank when all are done.
#[derive(serde::Serialize, serde::Deserialize)]
struct Share {
    stats: Stats,
    /// The input line of each pair in this rank's file, in file order.
    pair_lines: Vec<u64>,
    /// (input line, error record) in the order they happened.
    errors: Vec<(u64, Value)>,
    /// Judge requests and cache hits (`detector = "judge"`).
    judge: Option<(u64, u64)>,
}

/// `intervene` as one rank of `shards` (every rank calls it with the same files and options;
/// `opts.device` already placed on this rank).
pub(crate) fn intervene_in(files: &InterveneFiles, opts: &InterveneOptions, progress: &dyn Progress, shards: &Shards) -> Result<InterveneSummary> {
    let t0 = Instant::now();
    let progress: &dyn Progress = if shards.root() { progress } else { &Silent };
    let mine = share(files, opts, progress, shards)?;
    let detector = mine.stats.detector.clone();
    let all: Vec<Share> =
        shards.gather_after_work(serde_json::to_vec(&mine)?)?.iter().map(|b| serde_json::from_slice(b)).collect::<Result<_, _>>()?;
    let mut stats = Stats { detector, ..Stats::default() };
    for s in &all {
        stats.add(&s.stats);
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    stats.finalize();
    // In input order; a rollout's own errors keep the order they happened in.
    let mut errors: Vec<&(u64, Value)> = all.iter().flat_map(|s| &s.errors).collect();
    errors.sort_by_key(|e| e.0);
    let errors_path = sibling(&files.output, "errors.jsonl");
    shards.root_only(|| {
        if shards.world() > 1 {
            let keys: Vec<Vec<u64>> = all.iter().map(|s| s.pair_lines.clone()).collect();
            shard::merge_by_key(&files.output, &shards.parts(&files.output)?, &keys)?;
        }
        jsonl::write_atomic(&errors_path, errors.iter().map(|e| &e.1))?;
        let mut w = AtomicWriter::create(&sibling(&files.output, "stats.json"))?;
        w.write(&stats)?;
        Ok(w.commit()?)
    })?;
    // Every rollout worked on failed (each has an error, none gave a pair or was left alone):
    // the run did nothing, which must not pass for success.
    let field = |e: &Value, k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let items = stats.prompts - stats.skipped_benign;
    let failed: std::collections::HashSet<String> = errors.iter().map(|e| field(&e.1, "origin")).collect();
    if items > 0 && stats.pairs == 0 && failed.len() as u64 == items {
        let e = &errors[0].1;
        bail!(
            "every one of the {items} rollouts failed (first: {}: {}); all are listed in {}",
            field(e, "origin"),
            field(e, "error"),
            errors_path.display()
        );
    }
    let judge = all.iter().filter_map(|s| s.judge).reduce(|a, b| (a.0 + b.0, a.1 + b.1));
    Ok(InterveneSummary { stats, item_errors: errors.len(), judge_calls: judge.map(|j| j.0), judge_cache_hits: judge.map(|j| j.1) })
}

/// This rank's share of `intervene`: Algorithm 1 on the rollouts it owns, their pairs written
/// to `shards.target(output)` in input order (at once: a rerun starts over).
fn share(files: &InterveneFiles, opts: &InterveneOptions, progress: &dyn Progress, shards: &Shards) -> Result<Share> {
    check(files, opts)?;
    let (input, is_rollouts) = source(files)?;
    let triggers = load_triggers(opts.triggers.as_deref()).context("--triggers")?;
    let detector = CueDetector::new(files, opts)?;
    let dir = ModelDir::open(&files.model)?;
    let tok = dir.tokenizer()?;
    let fingerprint = dir.fingerprint().context("--model")?;
    let params = opts.sampling.params(tok.eos_ids())?;
    // The parts of a multi-process run killed before rank 0 merged them: this run starts over.
    shards.root_first(|| {
        for p in shard::leftover_parts(&files.output)?.iter().filter(|_| shards.root()) {
            std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
        }
        Ok(())
    })?;

    // Read and check the input before loading the weights. Rollouts are ready to intervene on;
    // prompts become traces whose completion is sampled first. Rank 0 counts every line; each
    // rank reads every world-th line not skipped as benign.
    let mut stats = Stats { detector: detector.get().name(), ..Stats::default() };
    let mut errors: Vec<(u64, ItemError)> = Vec::new();
    let mut traces: Vec<Trace> = Vec::new();
    let mut lines: Vec<u64> = Vec::new(); // per trace: its input line
    let mut to_sample: Vec<(u64, Trace)> = Vec::new();
    let chat = if is_rollouts { None } else { Some(dir.chat_template()?) };
    let facts = ModelFacts { tok: &tok, vocab: dir.config.vocab_size, context: dir.config.max_position_embeddings, fingerprint: Some(&fingerprint) };
    let mut eligible = 0;
    for l in jsonl::read_objects(input)? {
        stats.prompts += shards.root() as u64;
        if !opts.all_kinds && l.obj.get("kind").and_then(Value::as_str) == Some("benign") {
            stats.skipped_benign += shards.root() as u64;
            continue;
        }
        eligible += 1;
        if !shards.owns(eligible - 1) {
            continue;
        }
        let (at, origin) = (l.line as u64, format!("{}:{}", input.display(), l.line));
        let parsed = match &chat {
            None => read_rollout(&l, &facts).map(|r| {
                traces.push(trace_of(r, origin.clone()));
                lines.push(at);
            }),
            Some(chat) => prompt_trace(&l, chat, &tok, origin.clone()).map(|t| to_sample.push((at, t))),
        };
        if let Err(e) = parsed {
            stats.input_errors += 1;
            eprintln!("{origin}: {e}");
            errors.push((at, ItemError { id: id_of(&l.obj).unwrap_or_default(), origin, stage: "input", trigger: None, round: None, error: e }));
        }
    }

    let weights = dir.weights()?;
    with_backend!(opts.device, be => {
    let model = dir.upload_frozen(be, weights)?;
    let mut engine = Engine::new(&model, opts.engine.config(&model)).context("--kv-cache-mb / --block-size / --max-batch")?;

    // --prompts: sample one rollout per prompt first.
    if !to_sample.is_empty() {
        let reqs: Vec<Request> = to_sample.iter().map(|(_, t)| Request::new(key_of(&t.id), 0, t.prompt_ids.clone())).collect();
        let mut outs = vec![None; reqs.len()];
        progress.start("sample", reqs.len() as u64, "rollouts");
        let sampled = engine.generate(reqs, &params, None, |e| match e {
            Event::Step { prefill, decode } => progress.advance(0, (prefill + decode) as u64),
            Event::Done(o) => {
                progress.advance(1, 0);
                let i = o.index;
                outs[i] = Some(o);
            }
        });
        progress.finish();
        sampled?;
        for ((at, mut t), o) in to_sample.into_iter().zip(outs) {
            let o = o.with_context(|| format!("internal: the engine returned no output for {}", t.origin))?;
            match o.result {
                Ok(_) => {
                    t.completion_ids = o.generated().to_vec();
                    stats.tokens_generated += t.completion_ids.len() as u64;
                    traces.push(t);
                    lines.push(at);
                }
                Err(why) => {
                    stats.generation_errors += 1;
                    errors.push((at, ItemError { id: t.id, origin: t.origin, stage: "generate", trigger: None, round: None, error: why }));
                }
            }
        }
    }

    let answer_start: Option<Box<dyn Fn(&str) -> bool + Sync>> = if opts.answer_start {
        let judge = RuleJudge::new(rule_detector(opts)?);
        Some(Box::new(move |text: &str| judge.is_harmful(text)))
    } else {
        None
    };
    let settings =
        Settings {
            triggers,
            triggers_per_rollout: opts.triggers_per_rollout,
            seed: opts.sampling.seed,
            rounds: opts.rounds,
            eos_ids: tok.eos_ids().to_vec(),
            complete_only: opts.complete_only,
            answer_start,
        };
    let target = shards.target(&files.output);
    let mut out = AtomicWriter::create(&target)?;
    let mut pair_lines = Vec::new();
    let mut splicer = EngineSplicer { engine: &mut engine, params: params.clone() };
    progress.start("intervene", traces.len() as u64, "rollouts");
    let mut chunks = || -> Result<()> {
        for (c, chunk) in traces.chunks(opts.chunk).enumerate() {
            let (first, tokens_before) = (c * opts.chunk, stats.tokens_generated);
            let mut pairs = Vec::new();
            run_batch(
                chunk,
                &tok,
                detector.get(),
                &mut splicer,
                &settings,
                &mut stats,
                &mut |i, p| {
                    pairs.push((lines[first + i], p));
                    Ok(())
                },
                &mut |i, e| {
                    errors.push((lines[first + i], e));
                    Ok(())
                },
            )?;
            // In input order (a rollout's own pairs keep theirs: round, then trigger), so the
            // file depends neither on --chunk nor on the ranks.
            pairs.sort_by_key(|p| p.0);
            for (at, p) in &pairs {
                out.write(p)?;
                pair_lines.push(*at);
            }
            progress.status(&format!("{} pairs, {} with cue", stats.pairs, stats.with_cue));
            progress.advance(chunk.len() as u64, stats.tokens_generated - tokens_before);
        }
        Ok(())
    };
    let done = chunks();
    progress.finish();
    done?;
    out.commit()?;
    let errors = errors.into_iter().map(|(at, e)| Ok((at, serde_json::to_value(e)?))).collect::<Result<_>>()?;
    let judge = match &detector {
        CueDetector::Judge(j) => Some((j.calls(), j.cache_hits())),
        CueDetector::Rules(_) => None,
    };
    Ok(Share { stats, pair_lines, errors, judge })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::device::Device;

    #[test]
    fn defaults_are_the_flags_and_a_table_sets_only_its_keys() {
        let d = InterveneOptions::default();
        assert_eq!((d.rounds, d.detector.as_str(), d.chunk, d.all_kinds), (1, "rules", 8, false));
        let j = &d.endpoint;
        assert_eq!((j.judge_timeout, j.judge_retries, j.judge_concurrency), (60.0, 3, 4));
        assert!(d.triggers.is_none() && d.cue_patterns.is_none() && j.judge_url.is_none() && d.judge_cache.is_none());
        let s = &d.sampling;
        assert_eq!((s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.seed), (0.6, 0.95, 0, 1024, 0));
        let e = &d.engine;
        assert_eq!((e.kv_cache_mb, e.block_size, e.max_batch, e.prefill_chunk), (1024.0, 16, 32, 512));
        assert_eq!(d.device.device, Device::Cpu);

        let toml = "rounds = 2\ndetector = \"judge\"\njudge_url = \"http://h:1/v1\"\ntemperature = 0\nkv_cache_mb = 64\ndevice = \"cuda:1\"";
        let o: InterveneOptions = toml::from_str(toml).unwrap();
        let want = InterveneOptions {
            rounds: 2,
            detector: "judge".into(),
            endpoint: JudgeEndpointOptions { judge_url: Some("http://h:1/v1".into()), ..Default::default() },
            sampling: SamplingOptions { temperature: 0.0, ..Default::default() },
            engine: EngineOptions { kv_cache_mb: 64.0, ..Default::default() },
            device: DeviceOptions { device: Device::Cuda(1), precision: None },
            ..Default::default()
        };
        assert_eq!(format!("{o:?}"), format!("{want:?}"));
    }

    #[test]
    fn sibling_files_share_the_output_stem() {
        assert_eq!(sibling(Path::new("/r/pairs.jsonl"), "stats.json"), Path::new("/r/pairs.stats.json"));
        assert_eq!(sibling(Path::new("out"), "errors.jsonl"), Path::new("out.errors.jsonl"));
    }
}
