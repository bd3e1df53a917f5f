//! `generate`: sample rollouts for a prompt set with the KV-cached batched engine
//! (`crate::rollout`). Prompts come from JSONL (`{"id", "prompt", "system"?, ...}`) or CSV
//! (`prompt_column`); each is chat-templated (or taken raw), tokenized and sampled `n` times.
//! Every finished sample is appended to the output as one flushed JSONL line (a `Rollout`
//! record, DESIGN.md section 4, with the model fingerprint), so an interrupted run keeps what
//! it finished and `resume` skips (id, sample) pairs already written (failed ones and a line torn
//! by a kill are redone; a file of another seed, sampler or model is refused). A prompt that cannot run
//! (empty, too long for the context or the cache) is written as a line with
//! `"finish": "error"` and the reason; the run goes on.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::io::jsonl::{self, Appender, JsonlError};
use crate::io::records::{Rollout, SamplingRecord};
use crate::model::chat::{split_reasoning, ChatTemplate};
use crate::model::tokenizer::Tokenizer;
use crate::backend::Backend;
use crate::model::transformer::Transformer;
use crate::rollout::{key_of, Engine, EngineConfig, Event, Output, Request, SamplingParams, StopCheck};
use crate::workflow::device::{with_backend, DeviceOptions};
use crate::workflow::model::ModelDir;
use crate::workflow::options::{default_from_clap, EngineOptions, SamplingOptions};
use crate::workflow::progress::{Progress, Silent};
use crate::workflow::shard::{self, Shards};

/// The files of one `generate` call.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateFiles {
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json with the chat template).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Prompts: JSONL with {"id": str|int, "prompt": str, "system"?: str, ...} per line (other
    /// fields are copied to the output), or CSV with a header row (needs --prompt-column).
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,
    /// Rollouts JSONL, appended one flushed line per finished sample: {"id", "prompt",
    /// "sample", "seed", "prompt_ids", "completion_ids", "completion", "reasoning", "response",
    /// "finish": "eos"|"length"|"stop"|"error", "model": fingerprint, "sampling":
    /// {"temperature", "top_p", "top_k", "max_new_tokens", "stop"?}, ...}. Lines come in
    /// completion order, not input order.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Append to an existing --output, skipping (id, sample) pairs it already holds. Its
    /// "finish": "error" lines and a torn last line are dropped and redone; its seed, sampler
    /// settings and model fingerprint must be this run's.
    #[arg(long)]
    pub resume: bool,
}

/// How `generate` samples (flags of `ipo generate`, keys of a generating stage of `ipo run`).
#[derive(clap::Args, serde::Deserialize, Debug, Clone)]
#[serde(default)]
pub struct GenerateOptions {
    /// Read --prompts as CSV and take the prompt text from this column (StrongREJECT,
    /// AdvBench, HarmBench CSVs).
    #[arg(long, value_name = "NAME")]
    pub prompt_column: Option<String>,
    /// CSV column holding the prompt id (default: "id" if the header has it, else the data
    /// row number starting at 1).
    #[arg(long, value_name = "NAME")]
    pub id_column: Option<String>,
    /// System message for every prompt (a prompt's own "system" field wins).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Tokenize the prompt text as is instead of applying the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Samples per prompt (numbered 0..n in the "sample" field).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub n: u32,
    /// Use only the first N prompts of --prompts (files of this project are in a fixed random
    /// order, so the first N are a random subset).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Stop when the completion contains this text (finish = "stop"); repeatable. Generation
    /// always stops at the model's EOS tokens (finish = "eos").
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
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

default_from_clap!(GenerateOptions);

/// What a `generate` call did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GenerateSummary {
    /// Rollouts written by this call.
    pub written: usize,
    /// Samples written as `"finish": "error"` lines.
    pub failed: usize,
    /// (id, sample) pairs already in the output (resume).
    pub skipped: usize,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub preemptions: u64,
    pub seconds: f64,
}

impl GenerateSummary {
    /// Prefill + decode tokens per second of wall time.
    pub fn tokens_per_s(&self) -> f64 {
        (self.prefill_tokens + self.decode_tokens) as f64 / self.seconds.max(1e-9)
    }
}

/// One prompt of the input.
pub(crate) struct Prompt {
    pub(crate) id: String,
    pub(crate) text: String,
    pub(crate) system: Option<String>,
    pub(crate) fields: Map<String, Value>, // the input record, copied to the output
}

fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The prompts of `path`: JSONL, or CSV with the prompt text in `column` (and the id in
/// `id_column`, else "id", else the row number). Errors name the file and line.
pub(crate) fn read_prompts(path: &Path, column: Option<&str>, id_column: Option<&str>) -> Result<Vec<Prompt>> {
    if column.is_none() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
        bail!("{}: a CSV file needs --prompt-column NAME", path.display());
    }
    match column {
        Some(c) => read_csv(path, c, id_column),
        None => read_jsonl(path),
    }
}

fn read_jsonl(path: &Path) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for l in jsonl::read_objects(path)? {
        let at = |r: String| JsonlError::line(path, l.line, r);
        let id = l.obj.get("id").and_then(id_string).ok_or_else(|| at("needs \"id\" (a string or an integer)".into()))?;
        let text = match l.obj.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(at("needs \"prompt\" (a string)".into()).into()),
        };
        let system = match l.obj.get("system") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(at("\"system\" must be a string".into()).into()),
        };
        if let Some(first) = seen.insert(id.clone(), l.line) {
            return Err(at(format!("duplicate id {id:?} (first at line {first})")).into());
        }
        out.push(Prompt { id, text, system, fields: l.obj });
    }
    Ok(out)
}

fn read_csv(path: &Path, column: &str, id_column: Option<&str>) -> Result<Vec<Prompt>> {
    let mut r = csv::ReaderBuilder::new().flexible(false).from_path(path).with_context(|| format!("{}", path.display()))?;
    let headers: Vec<String> = r.headers().with_context(|| format!("{}: header row", path.display()))?.iter().map(str::to_string).collect();
    let col = headers.iter().position(|h| h == column).with_context(|| {
        format!("{}: no column {column:?} (--prompt-column); the header has {:?}", path.display(), headers)
    })?;
    let id_col = match id_column {
        Some(c) => Some(headers.iter().position(|h| h == c).with_context(|| {
            format!("{}: no column {c:?} (--id-column); the header has {:?}", path.display(), headers)
        })?),
        None => headers.iter().position(|h| h == "id"),
    };
    let mut out = Vec::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: data row {}", path.display(), i + 1))?;
        let line = rec.position().map_or(i as u64 + 2, |p| p.line());
        let id = match id_col {
            Some(c) => rec.get(c).unwrap_or("").to_string(),
            None => (i + 1).to_string(),
        };
        if let Some(first) = seen.insert(id.clone(), line) {
            bail!("{}:{line}: duplicate id {id:?} (first at line {first})", path.display());
        }
        let fields: Map<String, Value> =
            headers.iter().zip(rec.iter()).map(|(h, v)| (h.clone(), Value::String(v.to_string()))).collect();
        out.push(Prompt { id, text: rec.get(col).unwrap_or("").to_string(), system: None, fields });
    }
    Ok(out)
}

/// What `--resume` keeps of an existing output: the (id, sample) pairs finished there. Error
/// lines (failures that may be transient: a full cache, a prompt too long for this budget) are
/// redone, and so is a last line torn by a kill; the file is rewritten without them
/// (atomically) before anything is appended. Every line must come from this run's
/// configuration (seed, sampler settings, model fingerprint), else nothing is written.
fn resume(path: &Path, seed: u64, sampling: &SamplingRecord, fingerprint: &str) -> Result<HashSet<(String, u64)>> {
    let jsonl::Appended { lines, torn, unterminated } = jsonl::read_appended(path)?;
    if let Some(n) = torn {
        eprintln!("warning: {}:{n}: dropping a torn last line (no newline, invalid JSON: a run killed mid-write); it is redone", path.display());
    }
    // The settings as a line holds them: through text, so an f32 reads 0.8, not 0.800000011920929.
    let sampling: Value = serde_json::from_str(&serde_json::to_string(sampling)?)?;
    let want = [("seed", json!(seed)), ("model", json!(fingerprint)), ("sampling", sampling)];
    let mut done = HashSet::new();
    let mut kept = Vec::new();
    for l in &lines {
        let at = format!("{}:{}", path.display(), l.line);
        for (field, want) in &want {
            if let Some((name, got, want)) = first_difference(field, l.obj.get(*field), want) {
                bail!(
                    "{at}: --resume: the existing file has {name} = {got}, this run has {name} = {want}; resuming would mix two configurations in one file: rerun with the settings and model of that file, or choose a new --output"
                );
            }
        }
        let id = l.obj.get("id").and_then(id_string);
        let sample = l.obj.get("sample").and_then(Value::as_u64);
        let (Some(id), Some(sample)) = (id, sample) else {
            bail!("{at}: --resume: a line without \"id\" and \"sample\"");
        };
        if l.obj.get("finish").and_then(Value::as_str) != Some("error") {
            done.insert((id, sample));
            kept.push(&l.obj);
        }
    }
    if kept.len() < lines.len() || unterminated {
        let redo = lines.len() - kept.len();
        if redo > 0 {
            eprintln!("{}: {redo} failed sample(s) (\"finish\": \"error\") are redone", path.display());
        }
        jsonl::write_atomic(path, kept)?;
    }
    Ok(done)
}

/// The first place where `got` (a field of an existing line) differs from `want`, as
/// (field name, got, want) for a message; nested objects are compared key by key, so a
/// message names "sampling.temperature" rather than the whole object.
fn first_difference(name: &str, got: Option<&Value>, want: &Value) -> Option<(String, String, String)> {
    let show = |v: Option<&Value>| v.map_or("none (not recorded)".to_string(), Value::to_string);
    match (got, want) {
        (Some(Value::Object(g)), Value::Object(w)) => {
            let keys = w.keys().chain(g.keys().filter(|k| !w.contains_key(*k)));
            keys.into_iter().find_map(|k| {
                let (gv, wv) = (g.get(k), w.get(k));
                (gv != wv).then(|| (format!("{name}.{k}"), show(gv), show(wv)))
            })
        }
        (g, w) if g != Some(w) => Some((name.to_string(), show(g), w.to_string())),
        _ => None,
    }
}

/// Stop strings checked on the decoded tail of the completion.
struct StopStrings<'a> {
    tok: &'a Tokenizer,
    stops: &'a [String],
    tail: usize, // tokens decoded: enough to cover the longest stop string
}

impl StopCheck for StopStrings<'_> {
    fn hit(&self, generated: &[u32]) -> bool {
        let from = generated.len().saturating_sub(self.tail);
        match self.tok.decode(&generated[from..], false) {
            Ok(text) => self.stops.iter().any(|s| text.contains(s.as_str())),
            Err(_) => false,
        }
    }
}

fn check(files: &GenerateFiles, o: &GenerateOptions) -> Result<()> {
    if o.n == 0 || o.sampling.max_new_tokens == 0 {
        bail!("--n and --max-new-tokens must be > 0");
    }
    o.engine.check()?;
    if o.stop.iter().any(String::is_empty) {
        bail!("--stop: an empty stop string would stop at once");
    }
    if files.prompts.exists() && files.output.exists() && files.prompts.canonicalize()? == files.output.canonicalize()? {
        bail!("--output {} is the prompts file", files.output.display());
    }
    Ok(())
}

/// Samples `opts.n` rollouts per prompt of `files.prompts` and appends them to `files.output`.
/// A run after which the output holds no rollout, only failures, is an error (the failed
/// lines are kept, and a --resume redoes them). Under a launcher (RANK, WORLD_SIZE, ...) each
/// rank samples every world-th prompt and rank 0 gathers the lines (`shard`); the summary is
/// the whole job's.
pub fn generate(files: &GenerateFiles, opts: &GenerateOptions, progress: &dyn Progress) -> Result<GenerateSummary> {
    let mut opts = opts.clone();
    let shards = Shards::from_env(&mut opts.device)?;
    generate_in(files, &opts, progress, &shards)
}

/// `generate` as one rank of `shards` (every rank calls it with the same files and options;
/// `opts.device` already placed on this rank).
pub(crate) fn generate_in(files: &GenerateFiles, opts: &GenerateOptions, progress: &dyn Progress, shards: &Shards) -> Result<GenerateSummary> {
    let progress: &dyn Progress = if shards.root() { progress } else { &Silent };
    let t0 = Instant::now();
    let mine = sample_all(files, opts, progress, shards)?;
    let mut s = GenerateSummary::default();
    for b in shards.finish(&files.output, serde_json::to_vec(&mine)?)? {
        let r: GenerateSummary = serde_json::from_slice(&b)?;
        s.written += r.written;
        s.failed += r.failed;
        s.prefill_tokens += r.prefill_tokens;
        s.decode_tokens += r.decode_tokens;
        s.preemptions += r.preemptions;
    }
    s.skipped = mine.skipped;
    s.seconds = t0.elapsed().as_secs_f64();
    if s.written == 0 && s.skipped == 0 && s.failed > 0 {
        let first = jsonl::read_objects(&files.output)?
            .into_iter()
            .find_map(|l| Some(format!("{}: {}", l.obj.get("id")?, l.obj.get("error")?.as_str()?)))
            .unwrap_or_default();
        bail!(
            "every one of the {} samples failed (first: {first}); each reason is in the \"error\" field of its line in {}",
            s.failed,
            files.output.display()
        );
    }
    Ok(s)
}

/// This rank's share of `generate`: written to `shards.target(output)`.
fn sample_all(files: &GenerateFiles, opts: &GenerateOptions, progress: &dyn Progress, shards: &Shards) -> Result<GenerateSummary> {
    let t0 = Instant::now();
    check(files, opts)?;
    opts.sampling.params(&[])?;
    let mut prompts = read_prompts(&files.prompts, opts.prompt_column.as_deref(), opts.id_column.as_deref())?;
    prompts.truncate(opts.limit.unwrap_or(usize::MAX));
    if files.output.exists() && !files.resume {
        bail!("{} exists: pass --resume to continue it, or choose a new --output", files.output.display());
    }
    let parts = shard::leftover_parts(&files.output)?;
    if !parts.is_empty() && !files.resume {
        bail!("{} holds the lines of an interrupted multi-process run: pass --resume to continue it, or choose a new --output", parts[0].display());
    }

    let dir = ModelDir::open(&files.model)?;
    let tok = dir.tokenizer()?;
    let template = if opts.no_chat_template { None } else { Some(dir.chat_template()?) };
    let fingerprint = dir.fingerprint()?;
    let params = opts.sampling.params(tok.eos_ids())?;
    let seed = opts.sampling.seed;
    let o = &opts.sampling;
    let sampling =
        SamplingRecord { temperature: o.temperature, top_p: o.top_p, top_k: o.top_k, max_new_tokens: o.max_new_tokens, stop: opts.stop.clone() };
    // Rank 0 first folds an interrupted run's parts into the output and cleans it; then every
    // rank reads the samples done.
    let done = shards.root_first(|| {
        if shards.root() {
            shard::fold(&files.output, &parts)?;
        }
        if files.output.exists() {
            resume(&files.output, seed, &sampling, &fingerprint)
        } else {
            Ok(HashSet::new())
        }
    })?;
    let id = RunIdentity { seed, sampling: &sampling, fingerprint: &fingerprint };

    // Tokenize; per-prompt failures are recorded (written once the run is known to start).
    let mut failures: Vec<Rollout> = Vec::new();
    let mut reqs: Vec<Request> = Vec::new();
    let mut meta: Vec<(usize, u32, Vec<u32>)> = Vec::new(); // per request: (prompt, sample, prompt_ids)
    let mut summary = GenerateSummary { skipped: done.len(), ..Default::default() };
    for (pi, p) in prompts.iter().enumerate() {
        let todo: Vec<u32> = (0..opts.n).filter(|s| !done.contains(&(p.id.clone(), *s as u64))).collect();
        if todo.is_empty() || !shards.owns(pi) {
            continue;
        }
        let ids = if p.text.trim().is_empty() {
            Err("empty prompt".to_string())
        } else {
            encode_prompt(p, opts.system.as_deref(), template.as_ref(), &tok)
        };
        match ids {
            Ok(ids) => {
                for s in todo {
                    reqs.push(Request::new(key_of(&p.id), s, ids.clone()));
                    meta.push((pi, s, ids.clone()));
                }
            }
            Err(why) => {
                for s in todo {
                    failures.push(error_record(p, s, &id, &[], &why));
                }
            }
        }
    }
    summary.failed = failures.len();
    let target = shards.target(&files.output);
    if reqs.is_empty() {
        let mut out = Appender::open(&target)?;
        for f in &failures {
            out.append(f)?;
        }
        summary.seconds = t0.elapsed().as_secs_f64();
        return Ok(summary);
    }

    let weights = dir.weights()?;
    with_backend!(opts.device, be => {
    let model = dir.upload_frozen(be, weights)?;
    let mut engine = new_engine(&model, &opts.engine, &reqs, opts.sampling.max_new_tokens)?;
    let mut out = Appender::open(&target)?;
    for f in &failures {
        out.append(f)?;
    }
    let longest_stop = opts.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let stops = StopStrings { tok: &tok, stops: &opts.stop, tail: longest_stop + 4 };
    let stop: Option<&dyn StopCheck> = if opts.stop.is_empty() { None } else { Some(&stops) };

    let mut write_err: Option<anyhow::Error> = None;
    run_engine(&mut engine, reqs, &params, stop, progress, "generate", |o| {
        let (pi, s, prompt_ids) = &meta[o.index];
        let p = &prompts[*pi];
        let rec = match &o.result {
            Ok(finish) => rollout_record(p, *s, &id, prompt_ids, o.generated(), finish.as_str(), &tok),
            Err(why) => Ok(error_record(p, *s, &id, prompt_ids, why)),
        };
        let res = rec.and_then(|r| out.append(&r).map_err(anyhow::Error::from));
        match res {
            Ok(()) if o.result.is_ok() => summary.written += 1,
            Ok(()) => summary.failed += 1,
            Err(e) => {
                write_err.get_or_insert(e);
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.context(format!("writing {}", target.display())));
    }
    let st = engine.stats();
    (summary.prefill_tokens, summary.decode_tokens, summary.preemptions) = (st.prefill_tokens, st.decode_tokens, st.preemptions);
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
    })
}

/// A fresh engine for `model` with the KV budget of `engine`, checked first against `reqs`: a
/// budget that cannot hold even the shortest request plus `max_new` tokens is a usage error
/// naming the flags, not one failure per request.
pub(crate) fn new_engine<'m, B: Backend>(model: &'m Transformer<B>, engine: &EngineOptions, reqs: &[Request], max_new: usize) -> Result<Engine<'m, B>> {
    let ecfg = engine.config(model);
    let block_size = engine.block_size;
    let shortest = reqs.iter().map(|r| r.ids.len()).min().unwrap_or(0);
    let need = (shortest + max_new).min(model.cfg.max_position_embeddings).div_ceil(block_size);
    if need > ecfg.num_blocks {
        let mb_per_block = EngineConfig::block_bytes(model, block_size, 4) as f64 / (1024.0 * 1024.0);
        bail!(
            "--kv-cache-mb {} holds {} blocks of {block_size} tokens, but the shortest prompt ({shortest} tokens) + --max-new-tokens {max_new} needs {need} blocks (about {:.1} MiB)",
            engine.kv_cache_mb,
            ecfg.num_blocks,
            need as f64 * mb_per_block
        );
    }
    Ok(Engine::new(model, ecfg)?)
}

/// Runs every request to completion on `engine`, as progress phase `phase` (one unit per
/// request, tokens for tokens/s), handing each finished output (in completion order; a
/// request that could not run has `result: Err(why)`) to `on_done`.
pub(crate) fn run_engine<B: Backend>(
    engine: &mut Engine<'_, B>,
    reqs: Vec<Request>,
    params: &SamplingParams,
    stop: Option<&dyn StopCheck>,
    progress: &dyn Progress,
    phase: &str,
    mut on_done: impl FnMut(Output),
) -> Result<()> {
    progress.start(phase, reqs.len() as u64, "samples");
    let result = engine.generate(reqs, params, stop, |ev| match ev {
        Event::Step { prefill, decode } => progress.advance(0, (prefill + decode) as u64),
        Event::Done(o) => {
            on_done(o);
            progress.advance(1, 0);
        }
    });
    progress.finish();
    Ok(result?)
}

pub(crate) fn encode_prompt(p: &Prompt, system: Option<&str>, template: Option<&ChatTemplate>, tok: &Tokenizer) -> Result<Vec<u32>, String> {
    let text = match template {
        None => p.text.clone(),
        Some(t) => {
            let mut messages = Vec::new();
            if let Some(sys) = p.system.as_deref().or(system) {
                messages.push(serde_json::json!({"role": "system", "content": sys}));
            }
            messages.push(serde_json::json!({"role": "user", "content": p.text}));
            t.render(&messages, true, &Map::new()).map_err(|e| e.to_string())?
        }
    };
    // Raw text gets whatever special tokens the tokenizer's post-processor adds (HF's
    // `tokenizer(text)`); a rendered template already holds its own.
    let ids = tok.encode(&text, template.is_none()).map_err(|e| e.to_string())?;
    if ids.is_empty() {
        return Err("the prompt tokenizes to no tokens".into());
    }
    Ok(ids)
}

/// What every record of a run carries to say which configuration drew it.
struct RunIdentity<'a> {
    seed: u64,
    sampling: &'a SamplingRecord,
    fingerprint: &'a str,
}

fn base_record(p: &Prompt, sample: u32, id: &RunIdentity, prompt_ids: &[u32]) -> Rollout {
    let mut r = Rollout::new(p.id.clone(), p.text.clone(), sample, id.seed, prompt_ids.to_vec(), id.fingerprint.into(), p.fields.clone());
    r.sampling = Some(id.sampling.clone());
    r
}

fn rollout_record(
    p: &Prompt,
    sample: u32,
    id: &RunIdentity,
    prompt_ids: &[u32],
    completion_ids: &[u32],
    finish: &str,
    tok: &Tokenizer,
) -> Result<Rollout> {
    let completion = tok.decode(completion_ids, true)?;
    let (reasoning, response) = split_reasoning(&completion);
    let mut r = base_record(p, sample, id, prompt_ids);
    r.completion_ids = Some(completion_ids.to_vec());
    r.reasoning = Some(reasoning.to_string());
    r.response = Some(response.to_string());
    r.completion = Some(completion.clone());
    r.finish = finish.into();
    Ok(r)
}

fn error_record(p: &Prompt, sample: u32, id: &RunIdentity, prompt_ids: &[u32], why: &str) -> Rollout {
    let mut r = base_record(p, sample, id, prompt_ids);
    r.finish = "error".into();
    r.error = Some(why.into());
    r
}
