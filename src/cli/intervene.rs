//! `ipo intervene`: Algorithm 1 of IPO_METHOD.md as a command. Reads rollouts (from
//! `ipo generate`) or prompts (then samples one rollout per prompt itself), finds the first
//! compliance cue of each (rule detector or LLM judge), splices every trigger of the pool in
//! at that token, continues from the cached prefix with the same sampler settings, and writes
//! a preference pair (DESIGN.md section 4) for every continuation without a cue. Also writes
//! `<output stem>.stats.json` (the summary) and `<output stem>.errors.jsonl` (one line per
//! item that failed: bad input, detector error, generation error), so nothing is lost silently.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ArgGroup;
use serde_json::{json, Value};

use crate::intervene::detect::{Detector, RuleDetector};
use crate::intervene::judge::{Judge, JudgeConfig};
use crate::intervene::pipeline::{run_batch, EngineSplicer, ItemError, Settings, Stats, Trace};
use crate::intervene::triggers::load_triggers;
use crate::io::jsonl::{self, AtomicWriter, Line};
use crate::model::chat::ChatTemplate;
use crate::model::load::{load_config, load_weights};
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::Transformer;
use crate::rollout::fingerprint::model_fingerprint;
use crate::rollout::{key_of, Engine, EngineConfig, Event, Request, SamplingParams};

#[derive(clap::Args, Debug, Clone)]
#[command(group(ArgGroup::new("source").required(true).args(["rollouts", "prompts"])))]
pub struct Args {
    /// Hugging Face model folder (config.json, weights, tokenizer.json, tokenizer_config.json):
    /// the model that continues after each splice; must be the model of the rollouts.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Rollouts JSONL from `ipo generate`: {"id", "prompt", "sample", "prompt_ids",
    /// "completion_ids", "kind"?, "model"?, ...}. A rollout whose "model" fingerprint
    /// (written by `ipo generate`) differs from --model's is rejected, as is a failed rollout
    /// ("finish": "error"); both are listed in the errors file and the rest goes on.
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
    /// Safety-trigger pool, one sentence per line ('#' comments); default: the built-in
    /// data/triggers.txt. Every trigger is tried on every rollout with a cue.
    #[arg(long, value_name = "FILE")]
    pub triggers: Option<PathBuf>,
    /// Most splices per (rollout, trigger): after a splice whose continuation still has a
    /// cue, cut again at the new cue (paper: 1).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub rounds: u32,
    /// Compliance-cue detector: "rules" (built-in lexicon, offline) or "judge" (an LLM over
    /// an OpenAI-compatible endpoint: needs --judge-url and --judge-model).
    #[arg(long, value_name = "KIND", default_value = "rules")]
    pub detector: String,
    /// Patterns for the rule detector ("cue: REGEX" / "exclude: REGEX" per line,
    /// case-insensitive); default: the built-in data/cue_patterns.txt.
    #[arg(long, value_name = "FILE")]
    pub cue_patterns: Option<PathBuf>,
    /// Judge endpoint: a base URL (http://host:port/v1) or the full .../chat/completions URL.
    /// The API key, if any, is read from the environment variable IPO_JUDGE_API_KEY.
    #[arg(long, value_name = "URL")]
    pub judge_url: Option<String>,
    /// Model name sent to the judge endpoint.
    #[arg(long, value_name = "NAME")]
    pub judge_model: Option<String>,
    /// Seconds before a judge request is abandoned (then retried).
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub judge_timeout: f64,
    /// Retries of a failed judge request (timeouts, HTTP 5xx/429, malformed replies), with
    /// exponential backoff starting at 1 s.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub judge_retries: u32,
    /// Most judge requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub judge_concurrency: usize,
    /// Cache of judge verdicts by content hash (JSONL; re-runs cost no calls). Default:
    /// <output stem>.judge-cache.jsonl beside --output.
    #[arg(long, value_name = "FILE")]
    pub judge_cache: Option<PathBuf>,
    /// Also intervene on rollouts whose "kind" is "benign" (skipped by default: Algorithm 1
    /// is for harmful prompts).
    #[arg(long)]
    pub all_kinds: bool,
    /// Sampling temperature of the continuations (and of the rollouts sampled from
    /// --prompts); use the settings the rollouts were generated with. 0 = greedy.
    #[arg(long, value_name = "T", default_value_t = 0.6)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 = off).
    #[arg(long, value_name = "P", default_value_t = 0.95)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_k: usize,
    /// Most tokens sampled per continuation (and per rollout from --prompts).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// Seed of every random draw (same seed and inputs: same pairs).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// KV cache size in MiB (the cut prefixes of a chunk stay cached while their triggers run).
    #[arg(long, value_name = "MIB", default_value_t = 1024.0)]
    pub kv_cache_mb: f64,
    /// Positions per KV-cache block.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub block_size: usize,
    /// Most sequences decoded at once.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub max_batch: usize,
    /// Most prompt tokens prefilled in one step.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Rollouts handled together (detection batch; their prefixes are cached at once).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub chunk: usize,
    #[arg(long, value_name = "DEVICE", default_value = "cpu", help = crate::workflow::device::HELP)]
    pub device: String,
}

/// `pairs.jsonl` -> `pairs.<suffix>` beside it.
pub fn sibling(output: &Path, suffix: &str) -> PathBuf {
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pairs".into());
    output.with_file_name(format!("{stem}.{suffix}"))
}

fn check_args(a: &Args) -> Result<()> {
    crate::workflow::device::Device::parse(&a.device)?;
    if a.rounds == 0 {
        bail!("--rounds must be >= 1");
    }
    if a.chunk == 0 {
        bail!("--chunk must be >= 1");
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be >= 1");
    }
    if !(a.judge_timeout > 0.0 && a.judge_timeout.is_finite()) {
        bail!("--judge-timeout must be a positive number of seconds");
    }
    if a.judge_concurrency == 0 {
        bail!("--judge-concurrency must be >= 1");
    }
    let input = a.rollouts.as_ref().or(a.prompts.as_ref()).expect("clap requires one");
    if let (Ok(x), Ok(y)) = (input.canonicalize(), a.output.canonicalize()) {
        if x == y {
            bail!("--output {} is the input file: write to a new file", a.output.display());
        }
    }
    Ok(())
}

/// The detector the flags ask for.
fn make_detector(a: &Args) -> Result<Box<dyn Detector>> {
    match a.detector.as_str() {
        "rules" => {
            if a.judge_url.is_some() || a.judge_model.is_some() {
                bail!("--judge-url/--judge-model need --detector judge");
            }
            Ok(Box::new(match &a.cue_patterns {
                Some(p) => RuleDetector::from_file(p).context("--cue-patterns")?,
                None => RuleDetector::builtin(),
            }))
        }
        "judge" => {
            if a.cue_patterns.is_some() {
                bail!("--cue-patterns is for --detector rules");
            }
            let url = a.judge_url.clone().context("--detector judge needs --judge-url")?;
            let model = a.judge_model.clone().context("--detector judge needs --judge-model")?;
            let cfg = JudgeConfig {
                url,
                model,
                api_key: std::env::var("IPO_JUDGE_API_KEY").ok().filter(|k| !k.is_empty()),
                timeout: Duration::from_secs_f64(a.judge_timeout),
                retries: a.judge_retries,
                backoff: Duration::from_secs(1),
                concurrency: a.judge_concurrency,
                cache: Some(a.judge_cache.clone().unwrap_or_else(|| sibling(&a.output, "judge-cache.jsonl"))),
            };
            Ok(Box::new(Judge::new(cfg)?))
        }
        d => bail!("--detector {d}: expected rules or judge"),
    }
}

/// A field of a rollout line as a list of token ids.
fn ids_field(l: &Line, name: &str) -> Result<Vec<u32>, String> {
    match l.obj.get(name) {
        None => Err(format!("missing field \"{name}\"")),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .map(|x| x as u32)
                    .ok_or_else(|| format!("\"{name}\"[{i}] is not a token id: {v}"))
            })
            .collect(),
        Some(v) => Err(format!("\"{name}\" must be a list of token ids, found {v}")),
    }
}

fn id_field(l: &Line) -> Result<String, String> {
    match l.obj.get("id") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        None => Err("missing field \"id\"".into()),
        Some(v) => Err(format!("\"id\" must be a string, found {v}")),
    }
}

/// One rollout line as a trace, checked against the model.
fn rollout_trace(l: &Line, path: &Path, tok: &Tokenizer, vocab: usize, fingerprint: &str) -> Result<Trace, String> {
    let id = id_field(l)?;
    if l.obj.get("finish").and_then(Value::as_str) == Some("error") {
        let why = l.obj.get("error").and_then(Value::as_str).unwrap_or("no reason given");
        return Err(format!("the rollout failed in generate: {why}"));
    }
    // `ipo generate` writes the fingerprint as "model"; "model_fingerprint" is accepted too.
    for key in ["model", "model_fingerprint"] {
        if let Some(fp) = l.obj.get(key) {
            let fp = fp.as_str().ok_or(format!("\"{key}\" must be the model fingerprint string"))?;
            if fp != fingerprint {
                return Err(format!(
                    "rollout of another model or tokenizer: \"{key}\" fingerprint {fp}, --model has {fingerprint}"
                ));
            }
        }
    }
    let prompt_ids = ids_field(l, "prompt_ids")?;
    let completion_ids = ids_field(l, "completion_ids")?;
    if prompt_ids.is_empty() {
        return Err("empty \"prompt_ids\"".into());
    }
    for (name, ids) in [("prompt_ids", &prompt_ids), ("completion_ids", &completion_ids)] {
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &x)| x as usize >= vocab) {
            return Err(format!("\"{name}\"[{i}] = {id} is not a token id of the model (vocab_size {vocab})"));
        }
    }
    let prompt = match l.obj.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        None => tok.decode(&prompt_ids, true).map_err(|e| e.to_string())?,
        Some(v) => return Err(format!("\"prompt\" must be a string, found {v}")),
    };
    let sample = match l.obj.get("sample") {
        None => 0,
        Some(v) => v.as_u64().filter(|&s| s <= u32::MAX as u64).ok_or(format!("\"sample\" must be an integer, found {v}"))?
            as u32,
    };
    let kind = l.obj.get("kind").and_then(Value::as_str).map(str::to_string);
    Ok(Trace { id, prompt, kind, sample, prompt_ids, completion_ids, origin: format!("{}:{}", path.display(), l.line) })
}

pub fn run(args: Args) -> Result<()> {
    check_args(&args)?;
    let start = Instant::now();
    let triggers = load_triggers(args.triggers.as_deref()).context("--triggers")?;
    let detector = make_detector(&args)?;
    let cfg = load_config(&args.model)?;
    let tok = Tokenizer::from_dir(&args.model)?;
    let fingerprint = model_fingerprint(&args.model).context("--model")?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        eos_ids: tok.eos_ids().to_vec(),
        seed: args.seed,
    };
    params.check().map_err(|e| anyhow::anyhow!("sampler flags: {e}"))?;

    // Read and check the input before loading the weights.
    let mut stats = Stats { detector: detector.name(), ..Stats::default() };
    let mut errors: Vec<ItemError> = Vec::new();
    let mut traces: Vec<Trace> = Vec::new();
    let mut prompt_lines: Vec<(String, String, Option<String>, Vec<u32>, String)> = Vec::new(); // (id, prompt, kind, ids, origin)
    let input = args.rollouts.as_ref().or(args.prompts.as_ref()).expect("clap requires one").clone();
    let lines = jsonl::read_objects(&input)?;
    let is_rollouts = args.rollouts.is_some();
    let chat = if is_rollouts { None } else { Some(ChatTemplate::from_dir(&args.model)?) };
    for l in &lines {
        stats.prompts += 1;
        let origin = format!("{}:{}", input.display(), l.line);
        let kind = l.obj.get("kind").and_then(Value::as_str).map(str::to_string);
        if !args.all_kinds && kind.as_deref() == Some("benign") {
            stats.skipped_benign += 1;
            continue;
        }
        let parsed = if is_rollouts {
            rollout_trace(l, &input, &tok, cfg.vocab_size, &fingerprint).map(|t| traces.push(t))
        } else {
            prompt_ids(l, chat.as_ref().expect("prompts mode"), &tok).map(|(id, prompt, ids)| {
                prompt_lines.push((id, prompt, kind, ids, origin.clone()));
            })
        };
        if let Err(e) = parsed {
            stats.input_errors += 1;
            let id = id_field(l).unwrap_or_default();
            eprintln!("{origin}: {e}");
            errors.push(ItemError { id, origin, stage: "input", trigger: None, round: None, error: e });
        }
    }

    let weights = load_weights(&args.model, &cfg)?;
    crate::workflow::device::with_backend!(crate::workflow::device::Device::parse(&args.device)?, be => {
    let model = Transformer::with_backend(be, cfg, weights)?;
    let ecfg = EngineConfig::from_budget(&model, args.kv_cache_mb, args.block_size, 4, args.prefill_chunk, args.max_batch);
    let mut engine = Engine::new(&model, ecfg).context("--kv-cache-mb / --block-size / --max-batch")?;

    // --prompts: sample one rollout per prompt first.
    if !prompt_lines.is_empty() {
        eprintln!("intervene: sampling {} rollouts", prompt_lines.len());
        let reqs: Vec<Request> = prompt_lines.iter().map(|p| Request::new(key_of(&p.0), 0, p.3.clone())).collect();
        let mut outs = vec![None; reqs.len()];
        engine.generate(reqs, &params, None, |e| {
            if let Event::Done(o) = e {
                let i = o.index;
                outs[i] = Some(o);
            }
        })?;
        for (p, o) in prompt_lines.into_iter().zip(outs) {
            let (id, prompt, kind, ids, origin) = p;
            match o.map(|o| (o.result.clone(), o.generated().to_vec())) {
                Some((Ok(_), gen)) => {
                    stats.tokens_generated += gen.len() as u64;
                    traces.push(Trace { id, prompt, kind, sample: 0, prompt_ids: ids, completion_ids: gen, origin });
                }
                Some((Err(why), _)) => {
                    stats.generation_errors += 1;
                    errors.push(ItemError { id, origin, stage: "generate", trigger: None, round: None, error: why });
                }
                None => bail!("internal: the engine returned no output for {origin}"),
            }
        }
    }

    let settings = Settings { triggers, rounds: args.rounds, eos_ids: tok.eos_ids().to_vec() };
    let mut out = AtomicWriter::create(&args.output)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(traces.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rollouts {msg} [{elapsed} < {eta}]")
                .expect("valid template"),
        );
        b
    });
    let mut splicer = EngineSplicer { engine: &mut engine, params: params.clone() };
    let mut done = 0usize;
    for chunk in traces.chunks(args.chunk) {
        let mut pairs = Vec::new();
        run_batch(
            chunk,
            &tok,
            detector.as_ref(),
            &mut splicer,
            &settings,
            &mut stats,
            &mut |p| {
                pairs.push(p);
                Ok(())
            },
            &mut |e| {
                errors.push(e);
                Ok(())
            },
        )?;
        for p in &pairs {
            out.write(p)?;
        }
        done += chunk.len();
        let secs = start.elapsed().as_secs_f64();
        let msg = format!(
            "{} pairs, {} with cue, {} tokens ({:.0} tok/s)",
            stats.pairs,
            stats.with_cue,
            stats.tokens_generated,
            stats.tokens_generated as f64 / secs.max(1e-9)
        );
        match &bar {
            Some(b) => {
                b.set_position(done as u64);
                b.set_message(msg);
            }
            None => eprintln!("intervene: {done}/{} rollouts, {msg}", traces.len()),
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    out.commit()?;
    stats.seconds = start.elapsed().as_secs_f64();
    stats.finalize();
    let errors_path = sibling(&args.output, "errors.jsonl");
    jsonl::write_atomic(&errors_path, &errors)?;
    let stats_path = sibling(&args.output, "stats.json");
    let mut w = AtomicWriter::create(&stats_path)?;
    w.write(&stats)?;
    w.commit()?;
    print_summary(&stats, &args.output, &errors_path, errors.len());
    Ok(())
    })
}

/// A prompt line's chat-rendered ids: {"id", "prompt", "system"?}.
fn prompt_ids(l: &Line, chat: &ChatTemplate, tok: &Tokenizer) -> Result<(String, String, Vec<u32>), String> {
    let id = id_field(l)?;
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
    let text = chat.render(&messages, true, &serde_json::Map::new()).map_err(|e| e.to_string())?;
    let ids = tok.encode(&text, false).map_err(|e| e.to_string())?;
    Ok((id, prompt, ids))
}

fn print_summary(s: &Stats, output: &Path, errors_path: &Path, n_errors: usize) {
    eprintln!("intervene: {} -> {}", s.detector, output.display());
    eprintln!(
        "  prompts {} (benign skipped {}, input errors {}), with cue {}, no cue {}",
        s.prompts, s.skipped_benign, s.input_errors, s.with_cue, s.skipped_no_cue
    );
    eprintln!(
        "  splices {}, pairs {} (per round {:?}), still unsafe {}, cue-free rate {:.3} (round 1: {:.3})",
        s.attempts, s.pairs, s.pairs_per_round, s.skipped_still_unsafe, s.cue_free_rate, s.cue_free_rate_round1
    );
    eprintln!(
        "  detector errors {}, generation errors {}, tokens generated {}, {:.1} s",
        s.detector_errors, s.generation_errors, s.tokens_generated, s.seconds
    );
    if n_errors > 0 {
        eprintln!("  {n_errors} per-item errors in {}", errors_path.display());
    }
}
