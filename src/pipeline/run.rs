//! `ipo run`: the whole IPO loop from one TOML config, in one resumable run directory.
//!
//! Stages (each writes its outputs atomically, then a `.done-<stage>` marker holding its wall
//! time and summary; a re-run skips finished stages, so an interrupted run continues where it
//! stopped: generating stages keep the samples already written, training stages resume from
//! their newest checkpoint; `--force` removes a stage's old outputs and runs it from scratch):
//!   1 generate   harmful prompts -> rollouts.jsonl                       (workflow::generate)
//!   2 intervene  rollouts -> pairs.jsonl (cue cut + trigger splice)      (workflow::intervene)
//!   3 score      reference log-probs of the base model -> pairs.ref.jsonl (workflow::score)
//!   4 train1     DPO on the divergent segment -> stage1/final            (workflow::train)
//!   5 benign     benign prompts answered by the base model (chosen) and the stage-1 model
//!                (rejected, kept only when it refuses and the base does not) -> benign pairs
//!   6 train2     stage-1 pairs mixed with benign pairs at `harmful_fraction`, plus the SFT
//!                term -> stage2/final                                     (workflow::train)
//!   7 eval       greedy answers of base and final model on both prompt sets; refusal rates
//!                with the rule-based check -> report.json, report.md
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

use crate::io::jsonl;
use crate::io::records::{Pair, Rollout};
use crate::pipeline::refusal::is_refusal;
use crate::rollout::sampler::mix64;
use crate::train::checkpoint;
use crate::workflow::config::from_table;
use crate::workflow::device::Device;
use crate::workflow::generate::{generate, GenerateFiles, GenerateOptions};
use crate::workflow::intervene::{intervene, InterveneFiles, InterveneOptions};
use crate::workflow::model::resolve_model;
use crate::workflow::progress::Progress;
use crate::workflow::score::{score, ScoreFiles, ScoreOptions};
use crate::workflow::train::{train, TrainFiles, TrainOptions};

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
    seed: u64,
    #[serde(default = "default_fraction")]
    harmful_fraction: f64,
    #[serde(default)]
    device: Option<Device>,
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
    pub eval: GenerateOptions,
}

impl RunConfig {
    /// Reads and checks `path`. `device` (the `--device` flag) overrides the config's top-level
    /// `device`; a stage table's own `device` key wins over both. Tables without `seed` take the
    /// top-level seed. Relative paths are taken as they are (from the working directory).
    pub fn load(path: &Path, device: Option<Device>) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
        if !(0.0..=1.0).contains(&raw.harmful_fraction) {
            bail!("--config {}: harmful_fraction must be in [0, 1], found {}", path.display(), raw.harmful_fraction);
        }
        let device = device.or(raw.device);
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
            t
        };
        Ok(Self {
            model: resolve_model(&raw.model)?,
            run_dir: raw.run_dir,
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

/// The finished stages of a run directory: `.done-<stage>` markers.
struct Stages<'a> {
    dir: PathBuf,
    force: bool,
    count: usize,
    progress: &'a dyn Progress,
}

impl Stages<'_> {
    const NAMES: [&'static str; 7] = ["generate", "intervene", "score", "train1", "benign", "train2", "eval"];

    /// Runs stage `name` unless its marker says an earlier run finished it; `f` returns the
    /// stage's summary, kept in the marker for the report.
    fn run(&mut self, name: &str, f: impl FnOnce(&dyn Progress) -> Result<Value>) -> Result<()> {
        self.count += 1;
        let total = Self::NAMES.len();
        let marker = self.dir.join(format!(".done-{name}"));
        if marker.is_file() && !self.force {
            eprintln!("== [{}/{total}] {name}: finished in an earlier run, skipped", self.count);
            return Ok(());
        }
        eprintln!("== [{}/{total}] {name}", self.count);
        let t0 = Instant::now();
        let summary = f(self.progress).with_context(|| format!("stage {name}"))?;
        let secs = t0.elapsed().as_secs_f64();
        jsonl::write_atomic(&marker, [json!({"stage": name, "seconds": secs, "summary": summary})])?;
        eprintln!("== [{}/{total}] {name}: done in {secs:.1} s", self.count);
        Ok(())
    }
}

/// A generating stage: continues a partial output of an interrupted run (`resume`), or
/// starts over when the stage is forced.
fn gen(opts: &GenerateOptions, model: &Path, prompts: &Path, output: &Path, force: bool, p: &dyn Progress) -> Result<Value> {
    if force && output.is_file() {
        std::fs::remove_file(output).with_context(|| format!("removing {} to start over", output.display()))?;
    }
    let files = GenerateFiles { model: model.into(), prompts: prompts.into(), output: output.into(), resume: output.is_file() };
    let s = generate(&files, opts, p)?;
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

fn score_pairs(opts: &ScoreOptions, model: &Path, pairs: &Path, output: &Path, p: &dyn Progress) -> Result<Value> {
    let files = ScoreFiles { model: model.into(), input: None, pairs: Some(pairs.into()), output: output.into() };
    let s = score(&files, opts, p)?;
    eprintln!("score: {} pairs -> {}; {:.0} tokens/s", s.lines, output.display(), s.tokens_per_s());
    Ok(serde_json::to_value(s)?)
}

/// A training stage: continues from the newest checkpoint of an interrupted run, or starts
/// over (its folder removed) when the stage is forced.
fn train_stage(opts: &TrainOptions, model: &Path, pairs: &Path, output: &Path, force: bool, p: &dyn Progress) -> Result<Value> {
    if force && output.exists() {
        std::fs::remove_dir_all(output).with_context(|| format!("removing {} to start over", output.display()))?;
    }
    let resume = checkpoint::latest(output).map(|_| output.to_path_buf());
    if resume.is_some() {
        eprintln!("train: continuing from the newest checkpoint in {} (an earlier run was interrupted)", output.display());
    }
    let files = TrainFiles { model: model.into(), pairs: pairs.into(), output: output.into(), resume };
    Ok(serde_json::to_value(train(&files, opts, p)?)?)
}

/// Benign pairs: chosen = base answer, rejected = stage-1 answer, kept only where the
/// stage-1 model refuses and the base model does not (over-refusal to undo).
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
        if is_refusal(completion_text(r)) && !is_refusal(completion_text(&b)) {
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

fn refusal_rate(path: &Path) -> Result<(usize, usize)> {
    let rows: Vec<Rollout> = jsonl::read(path)?;
    let ok: Vec<_> = rows.iter().filter(|r| r.error.is_none()).collect();
    let refused = ok.iter().filter(|r| is_refusal(completion_text(r))).count();
    Ok((refused, ok.len()))
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
    std::fs::create_dir_all(&dir).with_context(|| format!("run_dir {}", dir.display()))?;
    std::fs::copy(config_path, dir.join("config.toml")).context("copying the config into the run dir")?;
    for p in [&cfg.harmful_prompts, &cfg.benign_prompts] {
        if !p.is_file() {
            bail!("--config {}: prompt file {} does not exist", config_path.display(), p.display());
        }
    }
    let f = |name: &str| dir.join(name);
    let (model, seed, force) = (&cfg.model, cfg.seed, flags.force);
    let t0 = Instant::now();
    let mut st = Stages { dir: dir.clone(), force, count: 0, progress };

    st.run("generate", |p| gen(&cfg.generate, model, &cfg.harmful_prompts, &f("rollouts.jsonl"), force, p))?;
    st.run("intervene", |p| {
        let files = InterveneFiles { model: model.clone(), rollouts: Some(f("rollouts.jsonl")), prompts: None, output: f("pairs.jsonl") };
        Ok(serde_json::to_value(intervene(&files, &cfg.intervene, p)?)?)
    })?;
    let n_pairs = count_lines(&f("pairs.jsonl"));
    if n_pairs == 0 {
        bail!(
            "intervention produced no pairs (see {}): no rollout had a compliance cue that the trigger splice fixed; \
             try more samples ([generate] n), more new tokens, or another detector",
            f("pairs.stats.json").display()
        );
    }
    st.run("score", |p| score_pairs(&cfg.score, model, &f("pairs.jsonl"), &f("pairs.ref.jsonl"), p))?;
    st.run("train1", |p| train_stage(&cfg.train1, model, &f("pairs.ref.jsonl"), &f("stage1"), force, p))?;
    let stage1 = f("stage1").join("final");
    st.run("benign", |p| {
        gen(&cfg.benign, model, &cfg.benign_prompts, &f("benign_base.jsonl"), force, p)?;
        gen(&cfg.benign, &stage1, &cfg.benign_prompts, &f("benign_stage1.jsonl"), force, p)?;
        let n = benign_pairs(&f("benign_base.jsonl"), &f("benign_stage1.jsonl"), &f("benign_pairs.jsonl"))?;
        eprintln!("benign: {n} prompts answered by the base model but refused by the stage-1 model");
        if n > 0 {
            score_pairs(&cfg.score, model, &f("benign_pairs.jsonl"), &f("benign_pairs.ref.jsonl"), p)?;
        } else {
            jsonl::write_atomic(&f("benign_pairs.ref.jsonl"), Vec::<Value>::new())?;
        }
        Ok(json!({"benign_pairs": n}))
    })?;
    st.run("train2", |p| {
        let (nh, nb) = mix(&f("pairs.ref.jsonl"), &f("benign_pairs.ref.jsonl"), cfg.harmful_fraction, seed, &f("stage2_pairs.jsonl"))?;
        eprintln!("train2: {nh} harmful + {nb} benign pairs");
        train_stage(&cfg.train2, &stage1, &f("stage2_pairs.jsonl"), &f("stage2"), force, p)
    })?;
    let final_model = f("stage2").join("final");
    st.run("eval", |p| {
        let mut out = serde_json::Map::new();
        for (m, tag) in [(model, "base"), (&final_model, "final")] {
            for (prompts, kind) in [(&cfg.harmful_prompts, "harmful"), (&cfg.benign_prompts, "benign")] {
                let name = format!("eval_{tag}_{kind}");
                out.insert(name.clone(), gen(&cfg.eval, m, prompts, &f(&format!("{name}.jsonl")), force, p)?);
            }
        }
        Ok(Value::Object(out))
    })?;
    report(&dir, t0.elapsed().as_secs_f64())
}

/// report.json + report.md: pair counts, final training metrics, refusal rates before/after,
/// and every stage's wall time and summary (from the stage markers).
fn report(dir: &Path, secs: f64) -> Result<Value> {
    let f = |name: &str| dir.join(name);
    let rate = |name: &str| -> Result<Value> {
        let (r, n) = refusal_rate(&f(name))?;
        Ok(json!({"refused": r, "total": n, "rate": if n > 0 { r as f64 / n as f64 } else { f64::NAN }}))
    };
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
    let rep = json!({
        "rollouts": count_lines(&f("rollouts.jsonl")),
        "pairs_stage1": count_lines(&f("pairs.jsonl")),
        "pairs_benign": count_lines(&f("benign_pairs.jsonl")),
        "pairs_stage2": count_lines(&f("stage2_pairs.jsonl")),
        "train1_last": last_metrics("stage1"),
        "train2_last": last_metrics("stage2"),
        "refusal": {
            "harmful": {"base": rate("eval_base_harmful.jsonl")?, "final": rate("eval_final_harmful.jsonl")?},
            "benign": {"base": rate("eval_base_benign.jsonl")?, "final": rate("eval_final_benign.jsonl")?},
        },
        "stage_seconds": stage_secs,
        "stage_summaries": stage_summaries,
        "this_invocation_seconds": secs,
    });
    jsonl::write_atomic(&f("report.json"), [rep.clone()])?;
    let pct = |v: &Value| format!("{:.0}% ({}/{})", v["rate"].as_f64().unwrap_or(f64::NAN) * 100.0, v["refused"], v["total"]);
    let r = &rep["refusal"];
    let md = format!(
        "# IPO run report\n\n\
         | | base model | after IPO |\n|---|---|---|\n\
         | refusal rate on harmful prompts (higher is safer) | {} | {} |\n\
         | refusal rate on benign prompts (lower is better) | {} | {} |\n\n\
         Rule-based refusal check (src/pipeline/refusal.rs) on greedy answers.\n\n\
         Rollouts: {}; stage-1 pairs: {}; benign pairs: {}; stage-2 mix: {} pairs.\n\n\
         Last stage-1 step: {}\n\nLast stage-2 step: {}\n\nStage wall times (s): {}\n",
        pct(&r["harmful"]["base"]), pct(&r["harmful"]["final"]), pct(&r["benign"]["base"]), pct(&r["benign"]["final"]),
        rep["rollouts"], rep["pairs_stage1"], rep["pairs_benign"], rep["pairs_stage2"],
        rep["train1_last"], rep["train2_last"], rep["stage_seconds"],
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

    #[test]
    fn config_tables_become_typed_stage_options() {
        let dir = tempfile::tempdir().unwrap();
        let body = "device = \"sim\"\n[generate]\nn = 3\ntemperature = 0.5\nno_chat_template = true\nstop = [\"A\", \"B\"]\n\
                    [train1]\nlr = 2e-5\noptimizer = \"sgd\"\nseed = 3\ndevice = \"cpu\"\n[eval]\ntemperature = 0\n";
        let c = RunConfig::load(&write_config(dir.path(), body), None).unwrap();
        assert_eq!((c.generate.n, c.generate.sampling.temperature, c.generate.no_chat_template), (3, 0.5, true));
        assert_eq!(c.generate.stop, vec!["A".to_string(), "B".to_string()]);
        assert_eq!(c.generate.sampling.seed, 7, "a table without seed takes the top-level seed");
        assert_eq!(c.train1.seed, 3, "a table's own seed wins");
        assert_eq!(c.train1.lr, 2e-5);
        assert_eq!(c.generate.device.device, Device::Sim, "the top-level device reaches every stage");
        assert_eq!(c.train1.device.device, Device::Cpu, "a table's own device wins");
        assert_eq!(c.score.device.device, Device::Sim);
        assert_eq!(c.eval.sampling.temperature, 0.0);
        assert_eq!(c.eval.sampling.max_new_tokens, 1024, "unset keys keep the flag defaults");
        let c = RunConfig::load(&write_config(dir.path(), body), Some(Device::Cuda(1))).unwrap();
        assert_eq!(c.generate.device.device, Device::Cuda(1), "--device overrides the top-level device");
        assert_eq!(c.train1.device.device, Device::Cpu);
    }

    #[test]
    fn a_misspelt_key_fails_the_load_naming_file_table_and_nearest_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_config(dir.path(), "[generate]\nmax_new_token = 5\n");
        let e = RunConfig::load(&p, None).unwrap_err().to_string();
        assert!(e.contains("run.toml") && e.contains("[generate] max_new_token") && e.contains("did you mean `max_new_tokens`"), "{e}");
        let p = write_config(dir.path(), "[train2]\nlearning_rate = 1e-5\n");
        let e = RunConfig::load(&p, None).unwrap_err().to_string();
        assert!(e.contains("[train2] learning_rate: unknown key"), "{e}");
        let p = write_config(dir.path(), "[train1]\noptimizer = \"adam\"\n");
        let e = RunConfig::load(&p, None).unwrap_err().to_string();
        assert!(e.contains("[train1]") && e.contains("adamw"), "{e}");
        let p = write_config(dir.path(), "sede = 3\n");
        let e = RunConfig::load(&p, None).unwrap_err().to_string();
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
}
