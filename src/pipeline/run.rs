//! `ipo run`: the whole IPO loop from one TOML config, in one resumable run directory.
//!
//! Stages (each writes its outputs atomically, then a `.done-<stage>` marker holding its key,
//! wall time and summary). A stage's key hashes its settings (its table, as typed options), the
//! files it reads from outside the run (model folder listing and config, prompt sets, trigger and
//! cue files) and the key of the stage before it. A re-run skips a stage whose marker has the
//! same key, so an interrupted run continues where it stopped (generating stages keep the
//! samples already written, training stages resume from their newest checkpoint); a stage whose
//! key changed (a config edit, a new prompt file) starts over with its old outputs removed, and
//! so does every stage after it, since their keys chain. `--force` starts every stage over.
//!   1 generate   harmful prompts -> rollouts.jsonl                       (workflow::generate)
//!   2 intervene  rollouts -> pairs.jsonl (cue cut + trigger splice)      (workflow::intervene)
//!   3 score      reference log-probs of the base model -> pairs.ref.jsonl (workflow::score)
//!   4 train1     DPO on the divergent segment -> stage1/final (LoRA: stage1/merged/)
//!   5 benign     benign prompts answered by the base model (chosen) and the stage-1 model
//!                (rejected, kept only when it refuses or loops and the base does neither)
//!                -> benign pairs
//!   6 train2     stage-1 pairs mixed with benign pairs at `harmful_fraction`, plus the SFT
//!                term -> stage2/final                                     (workflow::train)
//!                Its reference model is the stage-1 model it starts from (reference
//!                log-probs scored by `train` into stage2/ref_pairs.jsonl), not the base: the
//!                harmful pairs then start stage 2 at margin 0 and keep pulling against the
//!                benign pairs, where with the base as reference they start at stage 1's
//!                saturated margins, give almost no gradient, and stage 2 unlearns them.
//!   7 eval       `ipo eval` of the final model beside the base on the evaluation prompt sets
//!                (`eval_harmful_prompts`, `eval_benign_prompts`: the validation splits) -> eval/
//!                (eval.json, eval.md, eval.png, answers.jsonl); then report.json, report.md
//! Each stage's options come from a table of the same name in the config (`[generate]`,
//! `[intervene]`, `[score]`, `[train1]`, `[benign]`, `[train2]`, `[eval]`), deserialized into
//! the workflow's own options struct when the config is loaded: the keys are the workflow's
//! long flags with '_' (`max_new_tokens = 128` is `--max-new-tokens 128`), documented once in
//! its `--help`; an unknown key fails the load, naming the file, the table and the nearest key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::eval::metrics::is_degenerate;
use crate::io::jsonl;
use crate::io::records::{Pair, Rollout};
use crate::pipeline::refusal::is_refusal;
use crate::rollout::sampler::mix64;
use crate::train::checkpoint;
use crate::workflow::config::from_table;
use crate::backend::Precision;
use crate::workflow::device::Device;
use crate::workflow::eval::{eval_in, EvalFiles, EvalOptions};
use crate::workflow::generate::{generate_in, GenerateFiles, GenerateOptions};
use crate::workflow::intervene::{intervene_in, InterveneFiles, InterveneOptions};
use crate::workflow::model::resolve_model;
use crate::workflow::progress::{Progress, Silent};
use crate::workflow::shard::{self, Shards};
use crate::workflow::score::{score_in, ScoreFiles, ScoreOptions};
use crate::workflow::train::{train_in, TrainFiles, TrainOptions};

/// The config file as written: top-level keys typed, stage tables still raw (they are typed by
/// `RunConfig::load`, which knows each table's options struct).
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model: String,
    run_dir: PathBuf,
    harmful_prompts: PathBuf,
    benign_prompts: PathBuf,
    #[serde(default)]
    eval_harmful_prompts: Option<PathBuf>,
    #[serde(default)]
    eval_benign_prompts: Option<PathBuf>,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_fraction")]
    harmful_fraction: f64,
    #[serde(default)]
    device: Option<Device>,
    #[serde(default)]
    precision: Option<String>,
    #[serde(default)]
    generate: toml::Table,
    #[serde(default)]
    intervene: toml::Table,
    #[serde(default)]
    score: toml::Table,
    #[serde(default)]
    train1: toml::Table,
    #[serde(default)]
    benign: toml::Table,
    #[serde(default)]
    train2: toml::Table,
    #[serde(default)]
    eval: toml::Table,
}

fn default_fraction() -> f64 {
    0.5
}

/// An `ipo run` config, every stage's options typed and checked.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The base model folder ("default" resolved).
    pub model: PathBuf,
    /// Every stage's outputs, the markers of finished stages, the report.
    pub run_dir: PathBuf,
    pub harmful_prompts: PathBuf,
    pub benign_prompts: PathBuf,
    /// The prompt sets of the eval stage (default: the training sets above, which measures
    /// fit rather than generalisation; the demo uses the validation splits).
    pub eval_harmful_prompts: PathBuf,
    pub eval_benign_prompts: PathBuf,
    /// The seed of every stage whose table does not set its own.
    pub seed: u64,
    /// Share of harmful (stage-1) pairs in the stage-2 mix (paper: 0.3 / 0.5 / 0.7).
    pub harmful_fraction: f64,
    pub generate: GenerateOptions,
    pub intervene: InterveneOptions,
    pub score: ScoreOptions,
    pub train1: TrainOptions,
    pub benign: GenerateOptions,
    pub train2: TrainOptions,
    pub eval: EvalOptions,
}

impl RunConfig {
    /// Reads and checks `path`. `device` (the `--device` flag) overrides the config's top-level
    /// `device`, and `precision` (`--precision`) its `precision`; a stage table's own key wins
    /// over both. Tables without `seed` take the
    /// top-level seed. Relative paths are taken as they are (from the working directory).
    pub fn load(path: &Path, device: Option<Device>, precision: Option<Precision>) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
        if !(0.0..=1.0).contains(&raw.harmful_fraction) {
            bail!("--config {}: harmful_fraction must be in [0, 1], found {}", path.display(), raw.harmful_fraction);
        }
        let device = device.or(raw.device);
        let precision = match (precision, &raw.precision) {
            (Some(p), _) => Some(p),
            (None, Some(s)) => Some(Precision::parse(s).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?),
            (None, None) => None,
        };
        let seed = i64::try_from(raw.seed)
            .map_err(|_| anyhow::anyhow!("--config {}: seed {} is larger than TOML integers allow", path.display(), raw.seed))?;
        // A stage table with the run's defaults for the keys it does not set itself.
        let table = |t: &toml::Table, with_seed: bool| -> toml::Table {
            let mut t = t.clone();
            if with_seed {
                t.entry("seed").or_insert(toml::Value::Integer(seed));
            }
            if let Some(d) = device {
                t.entry("device").or_insert_with(|| toml::Value::String(d.to_string()));
            }
            if let Some(p) = precision {
                t.entry("precision").or_insert_with(|| toml::Value::String(p.name().into()));
            }
            t
        };
        Ok(Self {
            model: resolve_model(&raw.model)?,
            run_dir: raw.run_dir,
            eval_harmful_prompts: raw.eval_harmful_prompts.unwrap_or_else(|| raw.harmful_prompts.clone()),
            eval_benign_prompts: raw.eval_benign_prompts.unwrap_or_else(|| raw.benign_prompts.clone()),
            harmful_prompts: raw.harmful_prompts,
            benign_prompts: raw.benign_prompts,
            seed: raw.seed,
            harmful_fraction: raw.harmful_fraction,
            generate: from_table(path, "generate", &table(&raw.generate, true))?,
            intervene: from_table(path, "intervene", &table(&raw.intervene, true))?,
            score: from_table(path, "score", &table(&raw.score, false))?,
            train1: from_table(path, "train1", &table(&raw.train1, true))?,
            benign: from_table(path, "benign", &table(&raw.benign, true))?,
            train2: from_table(path, "train2", &table(&raw.train2, true))?,
            eval: from_table(path, "eval", &table(&raw.eval, true))?,
        })
    }
}

/// The stages of a run directory: `.started-<stage>` (its key, written when it starts) and
/// `.done-<stage>` (key, seconds, summary) markers.
struct Stages<'a> {
    dir: PathBuf,
    force: bool,
    count: usize,
    progress: &'a dyn Progress,
    /// The ranks of a multi-process run (world 1 without a launcher): rank 0 reads and writes
    /// the markers and decides; the others follow its decision.
    shards: &'a Shards,
    /// The key of the stage that ran (or was skipped) last: the next stage's key includes it.
    prev: String,
}

/// The `"key"` field of a marker file, if it has one.
fn marker_key(path: &Path) -> Option<String> {
    let obj = jsonl::read_objects(path).ok()?.into_iter().next()?.obj;
    obj.get("key")?.as_str().map(str::to_string)
}

impl Stages<'_> {
    const NAMES: [&'static str; 7] = ["generate", "intervene", "score", "train1", "benign", "train2", "eval"];

    /// Runs stage `name` unless its marker says an earlier run finished it with the same key
    /// (`settings`: what the stage depends on besides the stages before it). `f` gets whether
    /// to start over (old outputs removed: `--force`, or the key changed since the outputs on
    /// disk were made) and returns the stage's summary, kept in the marker for the report.
    fn run(&mut self, name: &str, settings: &[&str], f: impl FnOnce(&dyn Progress, bool) -> Result<Value>) -> Result<()> {
        self.count += 1;
        let total = Self::NAMES.len();
        let mut h = Sha256::new();
        for part in [name, self.prev.as_str()].iter().chain(settings) {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let key: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
        self.prev = key.clone();
        let (done, started) = (self.dir.join(format!(".done-{name}")), self.dir.join(format!(".started-{name}")));
        const SKIP: u8 = 0;
        const RUN: u8 = 1;
        const FRESH: u8 = 2;
        // Rank 0 reads the markers and decides; every rank follows that decision.
        let decided = if self.shards.root() {
            let done_key = done.is_file().then(|| marker_key(&done));
            if !self.force && done_key.as_ref().is_some_and(|k| k.as_deref() == Some(key.as_str())) {
                eprintln!("== [{}/{total}] {name}: finished in an earlier run, skipped", self.count);
                SKIP
            } else {
                // Outputs on disk were made with other settings: start over rather than mix them.
                let started_key = started.is_file().then(|| marker_key(&started)).flatten();
                let changed = done_key.is_some() || started_key.as_ref().is_some_and(|k| *k != key);
                if changed && !self.force {
                    eprintln!("== [{}/{total}] {name}: settings or inputs changed since the earlier run; starting this stage over", self.count);
                } else {
                    eprintln!("== [{}/{total}] {name}", self.count);
                }
                let _ = std::fs::remove_file(&done);
                jsonl::write_atomic(&started, [json!({"stage": name, "key": key})])?;
                if self.force || changed {
                    FRESH
                } else {
                    RUN
                }
            }
        } else {
            RUN
        };
        let decided = self.shards.broadcast_u8(decided)?;
        if decided == SKIP {
            return Ok(());
        }
        let t0 = Instant::now();
        let summary = f(self.progress, decided == FRESH).with_context(|| format!("stage {name}"))?;
        let secs = t0.elapsed().as_secs_f64();
        if self.shards.root() {
            jsonl::write_atomic(&done, [json!({"stage": name, "key": key, "seconds": secs, "summary": summary})])?;
            eprintln!("== [{}/{total}] {name}: done in {secs:.1} s", self.count);
        }
        Ok(())
    }
}

/// What a stage reads from outside the run directory, for its key: a file's bytes (prompt
/// sets, trigger and cue files; empty when missing, so creating it changes the key), and a
/// model folder's listing (names, sizes, modification times) plus its config.json.
fn file_identity(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let digest: String = Sha256::digest(&bytes).iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{}={digest}", path.display())
}

fn model_identity(dir: &Path) -> String {
    let mut entries: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    let mtime = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
                    Some(format!("{}:{}:{mtime}", e.file_name().to_string_lossy(), m.len()))
                })
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    format!("{} [{}] {}", dir.display(), entries.join(","), file_identity(&dir.join("config.json")))
}

/// A generating stage: continues a partial output of an interrupted run (`resume`), or
/// starts over when the stage is forced.
fn gen(opts: &GenerateOptions, model: &Path, prompts: &Path, output: &Path, force: bool, p: &dyn Progress, shards: &Shards) -> Result<Value> {
    shards.root_first(|| {
        if shards.root() && force {
            for f in [output.to_path_buf()].into_iter().chain(shard::leftover_parts(output)?) {
                if f.is_file() {
                    std::fs::remove_file(&f).with_context(|| format!("removing {} to start over", f.display()))?;
                }
            }
        }
        Ok(())
    })?;
    let resume = output.is_file() || !shard::leftover_parts(output)?.is_empty();
    let files = GenerateFiles { model: model.into(), prompts: prompts.into(), output: output.into(), resume };
    let mut opts = opts.clone();
    shards.place(&mut opts.device);
    let s = generate_in(&files, &opts, p, shards)?;
    if !shards.root() {
        return Ok(Value::Null);
    }
    eprintln!(
        "generate: {} rollouts ({} failed, {} from an earlier run) -> {}; {:.0} tokens/s",
        s.written,
        s.failed,
        s.skipped,
        output.display(),
        s.tokens_per_s()
    );
    Ok(serde_json::to_value(s)?)
}

fn score_pairs(opts: &ScoreOptions, model: &Path, pairs: &Path, output: &Path, p: &dyn Progress, shards: &Shards) -> Result<Value> {
    let files = ScoreFiles { model: model.into(), input: None, pairs: Some(pairs.into()), output: output.into() };
    let mut opts = opts.clone();
    shards.place(&mut opts.device);
    let s = score_in(&files, &opts, p, shards)?;
    if !shards.root() {
        return Ok(Value::Null);
    }
    eprintln!("score: {} pairs -> {}; {:.0} tokens/s", s.lines, output.display(), s.tokens_per_s());
    Ok(serde_json::to_value(s)?)
}

/// A training stage: continues from the newest checkpoint of an interrupted run, or starts
/// over (its folder removed) when the stage is forced.
fn train_stage(opts: &TrainOptions, model: &Path, pairs: &Path, output: &Path, force: bool, p: &dyn Progress, shards: &Shards) -> Result<Value> {
    let resume = (!force).then(|| checkpoint::latest(output)).flatten().map(|_| output.to_path_buf());
    // Starting over (forced, or killed before its first checkpoint): an empty folder, since
    // `train` refuses to write over an earlier run's metrics.
    shards.root_first(|| {
        if shards.root() && resume.is_none() && output.exists() {
            std::fs::remove_dir_all(output).with_context(|| format!("removing {} to start over", output.display()))?;
        }
        Ok(())
    })?;
    if resume.is_some() && shards.root() {
        eprintln!("train: continuing from the newest checkpoint in {} (an earlier run was interrupted)", output.display());
    }
    let files = TrainFiles { model: model.into(), pairs: pairs.into(), output: output.into(), resume };
    // The next stage loads a full model folder, so a LoRA stage also writes its merged model.
    let mut opts = TrainOptions { merge: opts.merge || opts.lora_rank > 0, ..opts.clone() };
    shards.place(&mut opts.device);
    let s = train_in(&files, &opts, p, shards.comm())?;
    Ok(if shards.root() { serde_json::to_value(s)? } else { Value::Null })
}

/// The model folder a training stage leaves for the stages after it: OUT/final/, or with LoRA
/// (whose final/ holds only the adapter) OUT/merged/.
fn trained_model(opts: &TrainOptions, output: &Path) -> PathBuf {
    output.join(if opts.lora_rank > 0 { "merged" } else { "final" })
}

/// Benign pairs: chosen = base answer, rejected = stage-1 answer, kept only where the
/// stage-1 model refuses or loops and the base model does neither (over-refusal to undo).
fn benign_pairs(base: &Path, stage1: &Path, out: &Path) -> Result<usize> {
    let s1: HashMap<(String, u32), Rollout> = jsonl::read::<Rollout>(stage1)?.into_iter().map(|r| ((r.id.clone(), r.sample), r)).collect();
    let mut pairs = Vec::new();
    for b in jsonl::read::<Rollout>(base)? {
        let Some(r) = s1.get(&(b.id.clone(), b.sample)) else { continue };
        let (chosen, rejected) = (b.completion_ids.clone().unwrap_or_default(), r.completion_ids.clone().unwrap_or_default());
        let ctx = &b.prompt_ids;
        if ctx.is_empty() || chosen.is_empty() || rejected.is_empty() || chosen == rejected || *ctx != r.prompt_ids {
            continue;
        }
        // Over-refusal to undo: the stage-1 answer declines (or has collapsed into a loop, the
        // other way a small model stops helping) where the base model gave a proper answer.
        let (s1_text, base_text) = (completion_text(r), completion_text(&b));
        if (is_refusal(s1_text) || is_degenerate(s1_text)) && !is_refusal(base_text) && !is_degenerate(base_text) {
            let mut extra = serde_json::Map::new();
            extra.insert("model".into(), b.model.clone().map_or(Value::Null, Value::String));
            pairs.push(Pair {
                id: format!("{}#{}", b.id, b.sample),
                prompt: Some(b.prompt.clone()),
                kind: Some("benign".into()),
                context_ids: ctx.clone(),
                chosen_ids: chosen,
                rejected_ids: rejected,
                cue: None,
                trigger: Some(String::new()),
                round: Some(0),
                ref_chosen_logp: None,
                ref_rejected_logp: None,
                extra,
            });
        }
    }
    let n = pairs.len();
    jsonl::write_atomic(out, pairs)?;
    Ok(n)
}

/// Stage-2 mix: every benign pair plus enough stage-1 pairs (seeded choice) that harmful
/// pairs make up `fraction` of the mix; with no benign pairs, the stage-1 pairs alone.
fn mix(harmful: &Path, benign: &Path, fraction: f64, seed: u64, out: &Path) -> Result<(usize, usize)> {
    let mut h: Vec<Pair> = jsonl::read(harmful)?;
    let b: Vec<Pair> = jsonl::read(benign)?;
    let want = if b.is_empty() || fraction >= 1.0 {
        h.len()
    } else {
        ((fraction / (1.0 - fraction)) * b.len() as f64).round() as usize
    };
    // Seeded Fisher-Yates.
    let mut state = seed ^ 0x5851F42D4C957F2D;
    for i in (1..h.len()).rev() {
        state = mix64(state.wrapping_add(i as u64));
        h.swap(i, (state % (i as u64 + 1)) as usize);
    }
    h.truncate(want.min(h.len()));
    let (nh, nb) = (h.len(), b.len());
    jsonl::write_atomic(out, h.into_iter().chain(b))?;
    Ok((nh, nb))
}

/// The text the refusal check reads: the whole completion (reasoning and response; a model
/// without think tags has an empty "response", and IPO's corrections happen in the reasoning).
fn completion_text(r: &Rollout) -> &str {
    r.completion.as_deref().unwrap_or("")
}

fn count_lines(path: &Path) -> usize {
    jsonl::read_objects(path).map(|v| v.len()).unwrap_or(0)
}

/// How to run a config: where, and whether finished stages run again.
#[derive(Clone, Debug, Default)]
pub struct RunFlags {
    /// Overrides the config's `run_dir`.
    pub run_dir: Option<PathBuf>,
    /// Re-run every stage from scratch, ignoring the markers and outputs of an earlier run.
    pub force: bool,
}

/// Runs every stage of `cfg` not finished in its run directory, then writes the report;
/// returns the report (also in `report.json`).
pub fn run(config_path: &Path, cfg: &RunConfig, flags: &RunFlags, progress: &dyn Progress) -> Result<Value> {
    let dir = flags.run_dir.clone().unwrap_or(cfg.run_dir.clone());
    for p in [&cfg.harmful_prompts, &cfg.benign_prompts, &cfg.eval_harmful_prompts, &cfg.eval_benign_prompts] {
        if !p.is_file() {
            bail!("--config {}: prompt file {} does not exist", config_path.display(), p.display());
        }
    }
    // Under a launcher (RANK, WORLD_SIZE, ...) every rank runs this: the generate, intervene,
    // score, benign and eval stages shard their inputs (`shard`), the training stages run data
    // parallel, and the rest (benign pairs, the stage-2 mix) runs on rank 0 while the others
    // wait; rank 0 alone writes markers, the config copy and the report.
    let shards = Shards::connect()?;
    let progress: &dyn Progress = if shards.root() { progress } else { &Silent };
    shards.root_first(|| {
        if shards.root() {
            std::fs::create_dir_all(&dir).with_context(|| format!("run_dir {}", dir.display()))?;
            std::fs::copy(config_path, dir.join("config.toml")).context("copying the config into the run dir")?;
        }
        Ok(())
    })?;
    let shards = &shards;
    let f = |name: &str| dir.join(name);
    let (model, seed) = (&cfg.model, cfg.seed);
    let t0 = Instant::now();
    let mut st = Stages { dir: dir.clone(), force: flags.force, count: 0, progress, shards, prev: String::new() };
    let base = model_identity(model);
    let (harmful, benign) = (file_identity(&cfg.harmful_prompts), file_identity(&cfg.benign_prompts));
    let opt = |o: &dyn std::fmt::Debug| format!("{o:?}");
    let iv = &cfg.intervene;
    let iv_files: Vec<String> = [&iv.triggers, &iv.cue_patterns].into_iter().flatten().map(|p| file_identity(p)).collect();

    st.run("generate", &[&base, &harmful, &opt(&cfg.generate)], |p, fresh| {
        gen(&cfg.generate, model, &cfg.harmful_prompts, &f("rollouts.jsonl"), fresh, p, shards)
    })?;
    st.run("intervene", &[&base, &opt(iv), &iv_files.join(" ")], |p, _| {
        let files = InterveneFiles { model: model.clone(), rollouts: Some(f("rollouts.jsonl")), prompts: None, output: f("pairs.jsonl") };
        let mut opts = cfg.intervene.clone();
        shards.place(&mut opts.device);
        let s = intervene_in(&files, &opts, p, shards)?;
        Ok(if shards.root() { serde_json::to_value(s)? } else { Value::Null })
    })?;
    let n_pairs = count_lines(&f("pairs.jsonl"));
    if n_pairs == 0 {
        bail!(
            "intervention produced no pairs (see {}): no rollout had a compliance cue that the trigger splice fixed; \
             try more samples ([generate] n), more new tokens, or another detector",
            f("pairs.stats.json").display()
        );
    }
    st.run("score", &[&base, &opt(&cfg.score)], |p, _| {
        score_pairs(&cfg.score, model, &f("pairs.jsonl"), &f("pairs.ref.jsonl"), p, shards)
    })?;
    st.run("train1", &[&base, &opt(&cfg.train1)], |p, fresh| {
        train_stage(&cfg.train1, model, &f("pairs.ref.jsonl"), &f("stage1"), fresh, p, shards)
    })?;
    let stage1 = trained_model(&cfg.train1, &f("stage1"));
    st.run("benign", &[&base, &benign, &opt(&cfg.benign), &opt(&cfg.score)], |p, fresh| {
        gen(&cfg.benign, model, &cfg.benign_prompts, &f("benign_base.jsonl"), fresh, p, shards)?;
        gen(&cfg.benign, &stage1, &cfg.benign_prompts, &f("benign_stage1.jsonl"), fresh, p, shards)?;
        let n = shards.root_only(|| benign_pairs(&f("benign_base.jsonl"), &f("benign_stage1.jsonl"), &f("benign_pairs.jsonl")))?;
        let Some(n) = n else { return Ok(Value::Null) };
        eprintln!("benign: {n} prompts answered by the base model but refused by the stage-1 model");
        Ok(json!({"benign_pairs": n}))
    })?;
    let fraction = format!("harmful_fraction={} seed={seed}", cfg.harmful_fraction);
    st.run("train2", &[&fraction, &opt(&cfg.train2)], |p, fresh| {
        // Without reference log-probs: `train` scores them with its --model, the stage-1 model
        // (see the module comment).
        if let Some((nh, nb)) = shards.root_only(|| mix(&f("pairs.jsonl"), &f("benign_pairs.jsonl"), cfg.harmful_fraction, seed, &f("stage2_pairs.jsonl")))? {
            eprintln!("train2: {nh} harmful + {nb} benign pairs");
        }
        train_stage(&cfg.train2, &stage1, &f("stage2_pairs.jsonl"), &f("stage2"), fresh, p, shards)
    })?;
    let final_model = trained_model(&cfg.train2, &f("stage2"));
    let (eval_harmful, eval_benign) = (file_identity(&cfg.eval_harmful_prompts), file_identity(&cfg.eval_benign_prompts));
    let eval_stage = |p: &dyn Progress| -> Result<Value> {
        let out = f("eval");
        shards.root_first(|| {
            if shards.root() && out.exists() {
                std::fs::remove_dir_all(&out).with_context(|| format!("removing {} to start over", out.display()))?;
            }
            Ok(())
        })?;
        let files = EvalFiles {
            model: final_model.clone(),
            base: Some(model.clone()),
            harmful: cfg.eval_harmful_prompts.clone(),
            benign: cfg.eval_benign_prompts.clone(),
            prose: None,
            output: out,
        };
        let mut opts = cfg.eval.clone();
        shards.place(&mut opts.device);
        let Some(s) = eval_in(&files, &opts, p, shards)? else { return Ok(Value::Null) };
        if let Some(e) = &s.chart_error {
            eprintln!("eval: warning: eval.png not drawn: {e}");
        }
        Ok(json!({"answers": s.answers, "errors": s.errors, "tokens_generated": s.tokens_generated, "seconds": s.seconds}))
    };
    st.run("eval", &[&base, &eval_harmful, &eval_benign, &opt(&cfg.eval)], |p, _| eval_stage(p))?;
    if !shards.root() {
        return Ok(Value::Null);
    }
    report(&dir, t0.elapsed().as_secs_f64())
}

/// A training step's headline numbers, under TRL's names.
fn brief(step: &Value) -> String {
    let keys = ["step", "epoch", "loss", "rewards/margins", "rewards/accuracies", "sft_nll", "grad_norm"];
    let parts: Vec<String> = keys
        .iter()
        .filter_map(|k| {
            let v = step.get(*k)?;
            Some(match v.as_f64() {
                Some(x) if v.is_f64() => format!("{k} {x:.4}"),
                _ => format!("{k} {v}"),
            })
        })
        .collect();
    if parts.is_empty() {
        "n/a".into()
    } else {
        parts.join(", ")
    }
}

/// report.json + report.md: pair counts, final training metrics, the eval stage's table (final
/// model beside the base, from eval/eval.json and eval/eval.md), and every stage's wall time and
/// summary (from the stage markers).
fn report(dir: &Path, secs: f64) -> Result<Value> {
    let f = |name: &str| dir.join(name);
    let last_metrics = |stage: &str| -> Value {
        jsonl::read_objects(&f(stage).join("metrics.jsonl")).ok().and_then(|v| v.last().cloned()).map(|l| Value::Object(l.obj)).unwrap_or(Value::Null)
    };
    let markers: Vec<(String, serde_json::Map<String, Value>)> = Stages::NAMES
        .iter()
        .filter_map(|s| Some((s.to_string(), jsonl::read_objects(&f(&format!(".done-{s}"))).ok()?.into_iter().next()?.obj)))
        .collect();
    let stage_secs: serde_json::Map<String, Value> =
        markers.iter().filter_map(|(s, m)| Some((s.clone(), m.get("seconds")?.clone()))).collect();
    let stage_summaries: serde_json::Map<String, Value> =
        markers.iter().filter_map(|(s, m)| Some((s.clone(), m.get("summary")?.clone()))).collect();
    let eval_json = f("eval").join("eval.json");
    let eval: Value = serde_json::from_str(&std::fs::read_to_string(&eval_json).with_context(|| eval_json.display().to_string())?)
        .with_context(|| eval_json.display().to_string())?;
    let eval_md_path = f("eval").join("eval.md");
    let eval_md = std::fs::read_to_string(&eval_md_path).with_context(|| eval_md_path.display().to_string())?;
    // eval.md's headings one level down, under the report's own.
    let eval_md: String = eval_md.lines().map(|l| if l.starts_with('#') { format!("#{l}\n") } else { format!("{l}\n") }).collect();
    let rep = json!({
        "rollouts": count_lines(&f("rollouts.jsonl")),
        "pairs_stage1": count_lines(&f("pairs.jsonl")),
        "pairs_benign": count_lines(&f("benign_pairs.jsonl")),
        "pairs_stage2": count_lines(&f("stage2_pairs.jsonl")),
        "train1_last": last_metrics("stage1"),
        "train2_last": last_metrics("stage2"),
        "eval": eval,
        "stage_seconds": stage_secs,
        "stage_summaries": stage_summaries,
        "this_invocation_seconds": secs,
    });
    jsonl::write_atomic(&f("report.json"), [rep.clone()])?;
    let total: f64 = rep["stage_seconds"].as_object().map(|m| m.values().filter_map(Value::as_f64).sum()).unwrap_or(0.0);
    let md = format!(
        "# IPO run report\n\n\
         {eval_md}\n\
         Rollouts: {}; stage-1 pairs: {}; benign pairs: {}; stage-2 mix: {} pairs.\n\n\
         Last stage-1 step: {}\n\nLast stage-2 step: {}\n\n(all metrics per step: stage1/metrics.jsonl, stage2/metrics.jsonl)\n\nStage wall times (s, {total:.0} in all): {}\n\n\
         Every completion and its labels: eval/answers.jsonl; the chart: eval/eval.png.\n",
        rep["rollouts"], rep["pairs_stage1"], rep["pairs_benign"], rep["pairs_stage2"],
        brief(&rep["train1_last"]), brief(&rep["train2_last"]), rep["stage_seconds"],
    );
    std::fs::write(f("report.md"), &md).with_context(|| f("report.md").display().to_string())?;
    println!("{md}");
    eprintln!("run: report in {}", f("report.md").display());
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("run.toml");
        let head = "model = \"m\"\nrun_dir = \"r\"\nharmful_prompts = \"h.jsonl\"\nbenign_prompts = \"b.jsonl\"\nseed = 7\n";
        std::fs::write(&p, format!("{head}{body}")).unwrap();
        p
    }

    /// Runs stages "a" then "b" with the given settings; returns, per stage, None when it was
    /// skipped, else Some(fresh).
    fn two_stages(dir: &Path, force: bool, a: &str, b: &str, fail_b: bool) -> (Option<bool>, Option<bool>) {
        let silent = crate::workflow::progress::Silent;
        let shards = Shards::of(crate::dist::single());
        let mut st = Stages { dir: dir.to_path_buf(), force, count: 0, progress: &silent, shards: &shards, prev: String::new() };
        let (mut ra, mut rb) = (None, None);
        st.run("a", &[a], |_, fresh| {
            ra = Some(fresh);
            Ok(json!({}))
        })
        .unwrap();
        let r = st.run("b", &[b], |_, fresh| {
            rb = Some(fresh);
            if fail_b {
                bail!("interrupted")
            }
            Ok(json!({}))
        });
        assert_eq!(r.is_err(), fail_b);
        (ra, rb)
    }

    #[test]
    fn stages_rerun_exactly_when_their_settings_or_an_earlier_stage_change() {
        let d = tempfile::tempdir().unwrap();
        let d = d.path();
        assert_eq!(two_stages(d, false, "a1", "b1", false), (Some(false), Some(false)), "first run");
        assert_eq!(two_stages(d, false, "a1", "b1", false), (None, None), "same settings: both skipped");
        assert_eq!(two_stages(d, false, "a1", "b2", false), (None, Some(true)), "b's table changed: b starts over");
        assert_eq!(two_stages(d, false, "a2", "b2", false), (Some(true), Some(true)), "a changed: a and every later stage");
        assert_eq!(two_stages(d, false, "a2", "b2", false), (None, None));
        assert_eq!(two_stages(d, true, "a2", "b2", false), (Some(true), Some(true)), "--force starts every stage over");
        // An interrupted stage resumes with the same settings and starts over with others.
        let d2 = tempfile::tempdir().unwrap();
        let d2 = d2.path();
        assert_eq!(two_stages(d2, false, "a", "b", true), (Some(false), Some(false)));
        assert!(d2.join(".started-b").is_file() && !d2.join(".done-b").exists());
        assert_eq!(two_stages(d2, false, "a", "b", true), (None, Some(false)), "same settings: b continues its outputs");
        assert_eq!(two_stages(d2, false, "a", "b*", false), (None, Some(true)), "other settings: b's partial outputs are dropped");
        assert_eq!(two_stages(d2, false, "a", "b*", false), (None, None));
    }

    #[test]
    fn stage_inputs_are_identified_by_content_and_listing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("prompts.jsonl");
        std::fs::write(&p, "{\"id\": 1, \"prompt\": \"a\"}\n").unwrap();
        let a = file_identity(&p);
        std::fs::write(&p, "{\"id\": 1, \"prompt\": \"b\"}\n").unwrap();
        assert_ne!(a, file_identity(&p), "an edited prompt file changes the key");
        let m = d.path().join("model");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(m.join("config.json"), "{}").unwrap();
        let a = model_identity(&m);
        assert_eq!(a, model_identity(&m));
        std::fs::write(m.join("model.safetensors"), "12345678").unwrap();
        assert_ne!(a, model_identity(&m), "new or changed weights change the key");
    }

    #[test]
    fn config_tables_become_typed_stage_options() {
        let dir = tempfile::tempdir().unwrap();
        let body = "device = \"sim\"\n[generate]\nn = 3\ntemperature = 0.5\nno_chat_template = true\nstop = [\"A\", \"B\"]\n\
                    [train1]\nlr = 2e-5\noptimizer = \"sgd\"\nseed = 3\ndevice = \"cpu\"\n[eval]\ntemperature = 0\n";
        let c = RunConfig::load(&write_config(dir.path(), body), None, None).unwrap();
        assert_eq!((c.generate.n, c.generate.sampling.temperature, c.generate.no_chat_template), (3, 0.5, true));
        assert_eq!(c.generate.stop, vec!["A".to_string(), "B".to_string()]);
        assert_eq!(c.generate.sampling.seed, 7, "a table without seed takes the top-level seed");
        assert_eq!(c.train1.seed, 3, "a table's own seed wins");
        assert_eq!(c.train1.lr, 2e-5);
        assert_eq!(c.generate.device.device, Device::Sim, "the top-level device reaches every stage");
        assert_eq!(c.train1.device.device, Device::Cpu, "a table's own device wins");
        assert_eq!(c.generate.device.precision, None);
        assert_eq!(c.score.device.device, Device::Sim);
        assert_eq!(c.eval.temperature, 0.0);
        assert_eq!(c.eval.max_new_tokens, 256, "unset keys keep the flag defaults");
        assert_eq!(c.generate.sampling.max_new_tokens, 1024, "unset keys keep the flag defaults");
        assert_eq!((c.eval_harmful_prompts.as_path(), c.eval_benign_prompts.as_path()), (Path::new("h.jsonl"), Path::new("b.jsonl")), "eval sets default to the training sets");
        let c = RunConfig::load(&write_config(dir.path(), body), Some(Device::Cuda(1)), Some(Precision::Bf16)).unwrap();
        assert_eq!((c.generate.device.precision, c.train1.device.precision), (Some(Precision::Bf16), Some(Precision::Bf16)), "--precision reaches every stage");
        assert_eq!(c.generate.device.device, Device::Cuda(1), "--device overrides the top-level device");
        assert_eq!(c.train1.device.device, Device::Cpu);
    }

    #[test]
    fn a_misspelt_key_fails_the_load_naming_file_table_and_nearest_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_config(dir.path(), "[generate]\nmax_new_token = 5\n");
        let e = RunConfig::load(&p, None, None).unwrap_err().to_string();
        assert!(e.contains("run.toml") && e.contains("[generate] max_new_token") && e.contains("did you mean `max_new_tokens`"), "{e}");
        let p = write_config(dir.path(), "[train2]\nlearning_rate = 1e-5\n");
        let e = RunConfig::load(&p, None, None).unwrap_err().to_string();
        assert!(e.contains("[train2] learning_rate: unknown key"), "{e}");
        let p = write_config(dir.path(), "[train1]\noptimizer = \"adam\"\n");
        let e = RunConfig::load(&p, None, None).unwrap_err().to_string();
        assert!(e.contains("[train1]") && e.contains("adamw"), "{e}");
        let p = write_config(dir.path(), "sede = 3\n");
        let e = RunConfig::load(&p, None, None).unwrap_err().to_string();
        assert!(e.contains("run.toml") && e.contains("sede"), "{e}");
    }

    #[test]
    fn stage_two_mix_has_the_harmful_fraction() {
        let dir = tempfile::tempdir().unwrap();
        let (h, b, out) = (dir.path().join("h.jsonl"), dir.path().join("b.jsonl"), dir.path().join("m.jsonl"));
        let pair = |id: String| json!({"id": id, "context_ids": [1], "chosen_ids": [2], "rejected_ids": [3]});
        jsonl::write_atomic(&h, (0..40).map(|i| pair(format!("h{i}")))).unwrap();
        jsonl::write_atomic(&b, (0..10).map(|i| pair(format!("b{i}")))).unwrap();
        assert_eq!(mix(&h, &b, 0.3, 7, &out).unwrap(), (4, 10));
        assert_eq!(mix(&h, &b, 0.5, 7, &out).unwrap(), (10, 10));
        assert_eq!(mix(&h, &b, 0.9, 7, &out).unwrap(), (40, 10));
        let first = std::fs::read_to_string(&out).unwrap();
        mix(&h, &b, 0.9, 7, &out).unwrap();
        assert_eq!(first, std::fs::read_to_string(&out).unwrap(), "same seed, same mix");
        jsonl::write_atomic(&b, Vec::<Value>::new()).unwrap();
        assert_eq!(mix(&h, &b, 0.5, 7, &out).unwrap(), (40, 0));
    }

    #[test]
    fn benign_pairs_undo_refusals_and_loops_of_stage_one() {
        let dir = tempfile::tempdir().unwrap();
        let (base, s1, out) = (dir.path().join("b.jsonl"), dir.path().join("s.jsonl"), dir.path().join("p.jsonl"));
        let row = |id: &str, text: &str, ids: Vec<u32>| {
            json!({"id": id, "prompt": "q", "sample": 0, "seed": 1, "prompt_ids": [5, 6], "completion_ids": ids,
                   "completion": text, "finish": "eos"})
        };
        let answer = "To kill a stuck Python process, find its id with ps and stop it with kill.";
        let looped = "I'm here to help. ".repeat(12);
        jsonl::write_atomic(&base, [
            row("refused", answer, vec![1, 2]),
            row("looped", answer, vec![1, 3]),
            row("both_fine", answer, vec![1, 4]),
            row("base_looped", &looped, vec![1, 5]),
        ]).unwrap();
        jsonl::write_atomic(&s1, [
            row("refused", "I'm not here to help with that.", vec![9]),
            row("looped", &looped, vec![8]),
            row("both_fine", "Find the id with ps, then kill it.", vec![7]),
            row("base_looped", "I'm not sure I can help with that.", vec![6]),
        ]).unwrap();
        assert_eq!(benign_pairs(&base, &s1, &out).unwrap(), 2);
        let pairs: Vec<Pair> = jsonl::read(&out).unwrap();
        let got: Vec<(&str, &[u32], &[u32])> = pairs.iter().map(|p| (p.id.as_str(), &p.chosen_ids[..], &p.rejected_ids[..])).collect();
        assert_eq!(got, vec![("refused#0", &[1u32, 2][..], &[9u32][..]), ("looped#0", &[1, 3][..], &[8][..])]);
    }
}
