//! `ipo generate`: sample rollouts for a prompt set with the KV-cached batched engine
//! (`crate::rollout`). Prompts come from JSONL (`{"id", "prompt", "system"?, ...}`) or CSV
//! (`--prompt-column`); each is chat-templated (or taken raw), tokenized and sampled `--n`
//! times. Every finished sample is appended to `--output` as one flushed JSONL line
//! (DESIGN.md section 4 rollout record plus the model fingerprint), so an interrupted run
//! keeps what it finished and `--resume` skips (id, sample) pairs already written. A prompt
//! that cannot run (empty, too long for the context or the cache) is written as a line with
//! `"finish": "error"` and the reason; the run goes on.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::cli::device::Device;
use crate::io::jsonl::{self, Appender, JsonlError};
use crate::model::chat::{split_reasoning, ChatTemplate};
use crate::model::load::{load_config, load_weights};
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::Transformer;
use crate::rollout::fingerprint::model_fingerprint;
use crate::rollout::{key_of, Engine, EngineConfig, Event, Request, SamplingParams, StopCheck};

#[derive(clap::Args, Debug, Clone)]
#[command(about = "Sample rollouts for a prompt set (KV-cached, continuously batched)")]
pub struct Args {
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
    /// "finish": "eos"|"length"|"stop"|"error", "model": fingerprint, ...}. Lines come in
    /// completion order, not input order.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
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
    /// Sampling temperature; 0 = greedy (argmax).
    #[arg(long, value_name = "T", default_value_t = 0.6)]
    pub temperature: f32,
    /// Sample only from the K most likely tokens (0 = no limit).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_k: usize,
    /// Sample from the smallest set of most likely tokens whose probability reaches P (1 = no limit).
    #[arg(long, value_name = "P", default_value_t = 0.95)]
    pub top_p: f32,
    /// Most tokens generated per sample (finish = "length" when reached, or at the model's
    /// context size).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// Seed of every random draw: a sample's tokens depend only on (seed, prompt id, sample
    /// index, position), not on batch size, order or threads.
    #[arg(long, value_name = "SEED", default_value_t = 0)]
    pub seed: u64,
    /// Stop when the completion contains this text (finish = "stop"); repeatable. Generation
    /// always stops at the model's EOS tokens (finish = "eos").
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Memory for the paged KV cache, in MiB; sequences wait (or are preempted and later
    /// recomputed) when it is full.
    #[arg(long, value_name = "MB", default_value_t = 1024.0)]
    pub kv_cache_mb: f64,
    /// Token positions per KV cache block.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub block_size: usize,
    /// Most prompt tokens prefilled in one forward step (over all sequences).
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Most sequences decoded together in one forward step.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub max_batch: usize,
    /// Append to an existing --output, skipping (id, sample) pairs it already holds.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, value_name = "DEVICE", default_value = "cpu", help = crate::cli::device::HELP)]
    pub device: String,
}

/// One prompt of the input.
struct Prompt {
    id: String,
    text: String,
    system: Option<String>,
    fields: Map<String, Value>, // the input record, copied to the output
}

fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
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

/// (id, sample) pairs already in the output.
fn done_pairs(path: &Path) -> Result<HashSet<(String, u64)>> {
    let mut done = HashSet::new();
    for l in jsonl::read_objects(path)? {
        let id = l.obj.get("id").and_then(id_string);
        let sample = l.obj.get("sample").and_then(Value::as_u64);
        match (id, sample) {
            (Some(id), Some(s)) => {
                done.insert((id, s));
            }
            _ => bail!("{}:{}: --resume: a line without \"id\" and \"sample\"", path.display(), l.line),
        }
    }
    Ok(done)
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

fn check_args(a: &Args) -> Result<()> {
    Device::parse(&a.device)?;
    if a.n == 0 || a.max_new_tokens == 0 || a.block_size == 0 || a.prefill_chunk == 0 || a.max_batch == 0 {
        bail!("--n, --max-new-tokens, --block-size, --prefill-chunk and --max-batch must be > 0");
    }
    if !(a.kv_cache_mb > 0.0 && a.kv_cache_mb.is_finite()) {
        bail!("--kv-cache-mb must be a positive number, got {}", a.kv_cache_mb);
    }
    if a.stop.iter().any(String::is_empty) {
        bail!("--stop: an empty stop string would stop at once");
    }
    if a.prompts.exists() && a.output.exists() && a.prompts.canonicalize()? == a.output.canonicalize()? {
        bail!("--output {} is the prompts file", a.output.display());
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    check_args(&args)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        eos_ids: vec![],
        seed: args.seed,
    };
    params.check().map_err(|e| anyhow::anyhow!("--temperature/--top-p: {e}"))?;
    let is_csv = args.prompt_column.is_some();
    if !is_csv && args.prompts.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
        bail!("{}: a CSV file needs --prompt-column NAME", args.prompts.display());
    }
    let prompts = match &args.prompt_column {
        Some(c) => read_csv(&args.prompts, c, args.id_column.as_deref())?,
        None => read_jsonl(&args.prompts)?,
    };
    let done = if args.output.exists() {
        if !args.resume {
            bail!("{} exists: pass --resume to continue it, or choose a new --output", args.output.display());
        }
        done_pairs(&args.output)?
    } else {
        HashSet::new()
    };

    let cfg = load_config(&args.model)?;
    let tok = Tokenizer::from_dir(&args.model)?;
    let template = if args.no_chat_template { None } else { Some(ChatTemplate::from_dir(&args.model)?) };
    let fingerprint = model_fingerprint(&args.model)?;
    let params = SamplingParams { eos_ids: tok.eos_ids().to_vec(), ..params };

    // Tokenize; per-prompt failures are recorded (written once the run is known to start).
    let mut failures: Vec<Map<String, Value>> = Vec::new();
    let mut reqs: Vec<Request> = Vec::new();
    let mut meta: Vec<(usize, u32, Vec<u32>)> = Vec::new(); // per request: (prompt, sample, prompt_ids)
    let mut written = 0usize;
    for (pi, p) in prompts.iter().enumerate() {
        let todo: Vec<u32> = (0..args.n).filter(|s| !done.contains(&(p.id.clone(), *s as u64))).collect();
        if todo.is_empty() {
            continue;
        }
        let ids = if p.text.trim().is_empty() {
            Err("empty prompt".to_string())
        } else {
            encode_prompt(p, &args, template.as_ref(), &tok)
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
                    failures.push(error_record(p, s, args.seed, &[], &why, &fingerprint));
                }
            }
        }
    }
    let mut failed = failures.len();
    if reqs.is_empty() {
        let mut out = Appender::open(&args.output)?;
        for f in &failures {
            out.append(f)?;
        }
        eprintln!("generate: nothing to do ({} already in {}, {failed} failed)", done.len(), args.output.display());
        return Ok(());
    }

    let weights = load_weights(&args.model, &cfg)?;
    crate::with_backend!(Device::parse(&args.device)?, be => {
    let model = Transformer::with_backend(be, cfg, weights)?;
    let ecfg = EngineConfig::from_budget(&model, args.kv_cache_mb, args.block_size, 4, args.prefill_chunk, args.max_batch);
    // A budget that cannot hold even the shortest sequence is a usage error, not 1000 failures.
    let shortest = reqs.iter().map(|r| r.ids.len()).min().unwrap_or(0);
    let need = (shortest + args.max_new_tokens).min(model.cfg.max_position_embeddings).div_ceil(args.block_size);
    if need > ecfg.num_blocks {
        let mb_per_block = EngineConfig::block_bytes(&model, args.block_size, 4) as f64 / (1024.0 * 1024.0);
        bail!(
            "--kv-cache-mb {} holds {} blocks of {} tokens, but the shortest prompt ({shortest} tokens) + --max-new-tokens {} needs {need} blocks (about {:.1} MiB)",
            args.kv_cache_mb,
            ecfg.num_blocks,
            args.block_size,
            args.max_new_tokens,
            need as f64 * mb_per_block
        );
    }
    let mut engine = Engine::new(&model, ecfg)?;
    let mut out = Appender::open(&args.output)?;
    for f in &failures {
        out.append(f)?;
    }
    let longest_stop = args.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let stops = StopStrings { tok: &tok, stops: &args.stop, tail: longest_stop + 4 };
    let stop: Option<&dyn StopCheck> = if args.stop.is_empty() { None } else { Some(&stops) };

    let total = reqs.len();
    let mut progress = Progress::new(total as u64);
    let mut write_err: Option<anyhow::Error> = None;
    engine.generate(reqs, &params, stop, |ev| match ev {
        Event::Step { prefill, decode } => progress.tokens(prefill as u64, decode as u64),
        Event::Done(o) => {
            let (pi, s, prompt_ids) = &meta[o.index];
            let p = &prompts[*pi];
            let rec = match &o.result {
                Ok(finish) => rollout_record(p, *s, args.seed, prompt_ids, o.generated(), finish.as_str(), &tok, &fingerprint),
                Err(why) => Ok(error_record(p, *s, args.seed, prompt_ids, why, &fingerprint)),
            };
            let res = rec.and_then(|r| out.append(&r).map_err(anyhow::Error::from));
            match res {
                Ok(()) if o.result.is_ok() => written += 1,
                Ok(()) => failed += 1,
                Err(e) => {
                    write_err.get_or_insert(e);
                }
            }
            progress.done();
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.context(format!("writing {}", args.output.display())));
    }
    progress.finish();
    let st = engine.stats();
    eprintln!(
        "generate: wrote {written} rollouts ({failed} failed) to {}; {} prefill + {} decode tokens in {:.1} s, {} preemptions",
        args.output.display(),
        st.prefill_tokens,
        st.decode_tokens,
        progress.start.elapsed().as_secs_f64(),
        st.preemptions
    );
    Ok(())
    })
}

fn encode_prompt(p: &Prompt, a: &Args, template: Option<&ChatTemplate>, tok: &Tokenizer) -> Result<Vec<u32>, String> {
    let text = match template {
        None => p.text.clone(),
        Some(t) => {
            let mut messages = Vec::new();
            if let Some(sys) = p.system.as_ref().or(a.system.as_ref()) {
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

fn base_record(p: &Prompt, sample: u32, seed: u64) -> Map<String, Value> {
    let mut r = p.fields.clone();
    r.insert("id".into(), Value::String(p.id.clone()));
    r.insert("prompt".into(), Value::String(p.text.clone()));
    r.insert("sample".into(), Value::from(sample));
    r.insert("seed".into(), Value::from(seed));
    r
}

#[allow(clippy::too_many_arguments)]
fn rollout_record(
    p: &Prompt,
    sample: u32,
    seed: u64,
    prompt_ids: &[u32],
    completion_ids: &[u32],
    finish: &str,
    tok: &Tokenizer,
    fingerprint: &str,
) -> Result<Map<String, Value>> {
    let completion = tok.decode(completion_ids, true)?;
    let (reasoning, response) = split_reasoning(&completion);
    let mut r = base_record(p, sample, seed);
    r.insert("prompt_ids".into(), serde_json::to_value(prompt_ids)?);
    r.insert("completion_ids".into(), serde_json::to_value(completion_ids)?);
    r.insert("reasoning".into(), Value::String(reasoning.to_string()));
    r.insert("response".into(), Value::String(response.to_string()));
    r.insert("completion".into(), Value::String(completion));
    r.insert("finish".into(), Value::String(finish.into()));
    r.insert("model".into(), Value::String(fingerprint.into()));
    Ok(r)
}

fn error_record(p: &Prompt, sample: u32, seed: u64, prompt_ids: &[u32], why: &str, fingerprint: &str) -> Map<String, Value> {
    let mut r = base_record(p, sample, seed);
    r.insert("prompt_ids".into(), serde_json::to_value(prompt_ids).unwrap_or_default());
    r.insert("finish".into(), Value::String("error".into()));
    r.insert("error".into(), Value::String(why.into()));
    r.insert("model".into(), Value::String(fingerprint.into()));
    r
}

/// Samples done and tokens/s: a bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    tokens: u64,
    start: Instant,
    last_log: Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template("generate {bar:40} {pos}/{len} samples, {msg}, ETA {eta}")
                    .expect("static template"),
            );
            b
        });
        let now = Instant::now();
        Self { bar, total, done: 0, tokens: 0, start: now, last_log: now }
    }

    fn rate(&self) -> f64 {
        self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    fn tokens(&mut self, prefill: u64, decode: u64) {
        self.tokens += prefill + decode;
        if let Some(b) = &self.bar {
            b.set_message(format!("{:.0} tokens/s", self.rate()));
        }
    }

    fn done(&mut self) {
        self.done += 1;
        match &self.bar {
            Some(b) => b.inc(1),
            None if self.last_log.elapsed() >= Duration::from_secs(5) || self.done == self.total => {
                self.last_log = Instant::now();
                eprintln!("generate: {}/{} samples, {:.0} tokens/s", self.done, self.total, self.rate());
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
