//! `ipo run`: the whole IPO loop from one TOML config, in one resumable run directory.
//!
//! Stages (each writes its outputs atomically, then a `.done-<stage>` marker holding its wall
//! time; a re-run skips finished stages, so an interrupted run continues where it stopped):
//!   1 generate   harmful prompts -> rollouts.jsonl                       (ipo generate)
//!   2 intervene  rollouts -> pairs.jsonl (cue cut + trigger splice)      (ipo intervene)
//!   3 score      reference log-probs of the base model -> pairs.ref.jsonl (ipo score --pairs)
//!   4 train1     DPO on the divergent segment -> stage1/final            (ipo train)
//!   5 benign     benign prompts answered by the base model (chosen) and the stage-1 model
//!                (rejected, kept only when it refuses and the base does not) -> benign pairs
//!   6 train2     stage-1 pairs mixed with benign pairs at `harmful_fraction`, plus the SFT
//!                term -> stage2/final                                     (ipo train)
//!   7 eval       greedy answers of base and final model on both prompt sets; refusal rates
//!                with the rule-based check -> report.json, report.md
//! Each stage's flags come from a table of the same name in the config (`[generate]`,
//! `[intervene]`, `[train1]`, `[benign]`, `[train2]`, `[eval]`): keys are the subcommand's
//! long flags (`max_new_tokens = 128` -> `--max-new-tokens 128`), so every flag of every
//! subcommand is reachable and documented once, in its own `--help`.

use crate::io::jsonl;
use crate::pipeline::refusal::is_refusal;
use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run configuration (TOML); see configs/demo.toml for every key.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override the config's `run_dir` (where every stage's outputs go).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Re-run every stage, ignoring the `.done-*` markers of an earlier run.
    #[arg(long)]
    pub force: bool,
    /// The device of every stage (overrides the config's top-level `device`; a stage table's
    /// own `device` key still wins). cpu, cuda, cuda:N or sim, as in each subcommand.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
}

/// The top-level keys of the config; stage tables are read separately.
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RunConfig {
    /// A Hugging Face model folder, or "default" (IPO_DEFAULT_MODEL, else the folder that
    /// scripts/fetch-default-model.sh writes).
    model: String,
    run_dir: PathBuf,
    harmful_prompts: PathBuf,
    benign_prompts: PathBuf,
    #[serde(default)]
    seed: u64,
    /// Share of harmful (stage-1) pairs in the stage-2 mix (paper: 0.3 / 0.5 / 0.7).
    #[serde(default = "default_fraction")]
    harmful_fraction: f64,
    /// Default `--device` of every stage (cpu when absent).
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    generate: toml::Table,
    #[serde(default)]
    intervene: toml::Table,
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

/// Parses a subcommand's clap `Args` from fixed flags plus a config table.
#[derive(Parser)]
struct Wrap<A: clap::Args> {
    #[command(flatten)]
    inner: A,
}

fn stage_args<A: clap::Args>(section: &str, fixed: &[String], table: &toml::Table) -> Result<A> {
    let mut argv = vec![format!("ipo {section}")];
    argv.extend_from_slice(fixed);
    for (k, v) in table {
        let flag = format!("--{}", k.replace('_', "-"));
        let scalar = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => bail!("config [{section}] {k}: unsupported value {other}"),
            })
        };
        match v {
            toml::Value::Boolean(true) => argv.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for it in items {
                    argv.push(flag.clone());
                    argv.push(scalar(it)?);
                }
            }
            other => {
                argv.push(flag);
                argv.push(scalar(other)?);
            }
        }
    }
    Wrap::<A>::try_parse_from(&argv)
        .map(|w| w.inner)
        .map_err(|e| anyhow::anyhow!("config [{section}]: {}", e.render().to_string().trim()))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

pub fn resolve_model(name: &str) -> Result<PathBuf> {
    if name != "default" {
        return Ok(PathBuf::from(name));
    }
    let p = match std::env::var_os("IPO_DEFAULT_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("IPO_MODEL_CACHE")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ipo/models")))
                .context("neither IPO_DEFAULT_MODEL nor HOME is set")?;
            cache.join("smollm2-135m-instruct")
        }
    };
    if !p.join("config.json").is_file() {
        bail!("model = \"default\": {} has no config.json; run `bash scripts/fetch-default-model.sh` first", p.display());
    }
    Ok(p)
}

struct Stages {
    dir: PathBuf,
    force: bool,
    count: usize,
}

impl Stages {
    const TOTAL: usize = 7;

    fn run(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        self.count += 1;
        let marker = self.dir.join(format!(".done-{name}"));
        if marker.is_file() && !self.force {
            eprintln!("== [{}/{}] {name}: finished in an earlier run, skipped", self.count, Self::TOTAL);
            return Ok(());
        }
        eprintln!("== [{}/{}] {name}", self.count, Self::TOTAL);
        let t0 = Instant::now();
        f().with_context(|| format!("stage {name}"))?;
        let secs = t0.elapsed().as_secs_f64();
        jsonl::write_atomic(&marker, [json!({"stage": name, "seconds": secs})])?;
        eprintln!("== [{}/{}] {name}: done in {secs:.1} s", self.count, Self::TOTAL);
        Ok(())
    }
}

fn read_lines(path: &Path) -> Result<Vec<serde_json::Map<String, Value>>> {
    Ok(jsonl::read_objects(path)?.into_iter().map(|l| l.obj).collect())
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect()).unwrap_or_default()
}

/// `ipo generate` with fixed inputs and the stage table, resuming a partial output.
fn generate(section: &str, table: &toml::Table, model: &Path, prompts: &Path, out: &Path, seed: u64) -> Result<()> {
    let mut fixed = vec!["--model".into(), s(model), "--prompts".into(), s(prompts), "--output".into(), s(out)];
    if !table.contains_key("seed") {
        fixed.extend(["--seed".into(), seed.to_string()]);
    }
    if out.is_file() {
        fixed.push("--resume".into());
    }
    crate::cli::generate::run(stage_args(section, &fixed, table)?)
}

fn train(section: &str, table: &toml::Table, model: &Path, pairs: &Path, out: &Path, seed: u64) -> Result<()> {
    let mut fixed = vec!["--model".into(), s(model), "--pairs".into(), s(pairs), "--output".into(), s(out)];
    if !table.contains_key("seed") {
        fixed.extend(["--seed".into(), seed.to_string()]);
    }
    crate::cli::train::run(stage_args(section, &fixed, table)?)
}

fn score_pairs(model: &Path, pairs: &Path, out: &Path, device: Option<&str>) -> Result<()> {
    let fixed = vec!["--model".into(), s(model), "--pairs".into(), s(pairs), "--output".into(), s(out)];
    let mut table = toml::Table::new();
    if let Some(d) = device {
        table.insert("device".into(), toml::Value::String(d.into()));
    }
    crate::cli::score::run(stage_args("score", &fixed, &table)?)
}

/// Gives every stage table without its own `device` key the run's device.
fn set_device(cfg: &mut RunConfig, device: &str) {
    for t in [&mut cfg.generate, &mut cfg.intervene, &mut cfg.train1, &mut cfg.benign, &mut cfg.train2, &mut cfg.eval] {
        t.entry("device").or_insert_with(|| toml::Value::String(device.into()));
    }
}

/// Benign pairs: chosen = base answer, rejected = stage-1 answer, kept only where the
/// stage-1 model refuses and the base model does not (over-refusal to undo).
fn benign_pairs(base: &Path, stage1: &Path, out: &Path) -> Result<usize> {
    let base_rows = read_lines(base)?;
    let s1: std::collections::HashMap<(String, u64), serde_json::Map<String, Value>> = read_lines(stage1)?
        .into_iter()
        .filter_map(|r| Some(((r.get("id")?.as_str()?.to_string(), r.get("sample")?.as_u64()?), r)))
        .collect();
    let mut pairs = Vec::new();
    for b in base_rows {
        let (Some(id), Some(sample)) = (b.get("id").and_then(|v| v.as_str()), b.get("sample").and_then(|v| v.as_u64())) else { continue };
        let Some(r) = s1.get(&(id.to_string(), sample)) else { continue };
        let text = |m: &serde_json::Map<String, Value>| completion_text(m).to_string();
        let (chosen, rejected) = (ids(&b["completion_ids"]), ids(&r["completion_ids"]));
        let ctx = ids(&b["prompt_ids"]);
        if ctx.is_empty() || chosen.is_empty() || rejected.is_empty() || chosen == rejected || ctx != ids(&r["prompt_ids"]) {
            continue;
        }
        if is_refusal(&text(r)) && !is_refusal(&text(&b)) {
            pairs.push(json!({
                "id": format!("{id}#{sample}"), "prompt": b.get("prompt").cloned().unwrap_or(Value::Null),
                "kind": "benign", "context_ids": ctx, "chosen_ids": chosen, "rejected_ids": rejected,
                "cue": Value::Null, "trigger": "", "round": 0,
                "model": b.get("model").cloned().unwrap_or(Value::Null),
            }));
        }
    }
    let n = pairs.len();
    jsonl::write_atomic(out, pairs)?;
    Ok(n)
}

/// Stage-2 mix: every benign pair plus enough stage-1 pairs (seeded choice) that harmful
/// pairs make up `fraction` of the mix; with no benign pairs, the stage-1 pairs alone.
fn mix(harmful: &Path, benign: &Path, fraction: f64, seed: u64, out: &Path) -> Result<(usize, usize)> {
    let mut h = read_lines(harmful)?;
    let b = read_lines(benign)?;
    let want = if b.is_empty() || fraction >= 1.0 {
        h.len()
    } else {
        ((fraction / (1.0 - fraction)) * b.len() as f64).round() as usize
    };
    // Seeded Fisher-Yates.
    let mut state = seed ^ 0x5851F42D4C957F2D;
    for i in (1..h.len()).rev() {
        state = crate::rollout::sampler::mix64(state.wrapping_add(i as u64));
        h.swap(i, (state % (i as u64 + 1)) as usize);
    }
    h.truncate(want.min(h.len()));
    let (nh, nb) = (h.len(), b.len());
    jsonl::write_atomic(out, h.into_iter().chain(b).map(Value::Object))?;
    Ok((nh, nb))
}

/// The text the refusal check reads: the whole completion (reasoning and response; a model
/// without think tags has an empty "response", and IPO's corrections happen in the reasoning).
fn completion_text(m: &serde_json::Map<String, Value>) -> &str {
    m.get("completion").and_then(|v| v.as_str()).unwrap_or("")
}

fn refusal_rate(path: &Path) -> Result<(usize, usize)> {
    let rows = read_lines(path)?;
    let ok: Vec<_> = rows.iter().filter(|r| r.get("error").is_none()).collect();
    let refused = ok.iter().filter(|r| is_refusal(completion_text(r))).count();
    Ok((refused, ok.len()))
}

fn count_lines(path: &Path) -> usize {
    read_lines(path).map(|v| v.len()).unwrap_or(0)
}

pub fn run(args: Args) -> Result<()> {
    let text = std::fs::read_to_string(&args.config).with_context(|| format!("--config {}", args.config.display()))?;
    let mut cfg: RunConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("--config {}: {e}", args.config.display()))?;
    let device = args.device.clone().or(cfg.device.clone());
    if let Some(d) = &device {
        crate::workflow::device::Device::parse(d)?;
        set_device(&mut cfg, d);
    }
    if !(0.0..=1.0).contains(&cfg.harmful_fraction) {
        bail!("--config {}: harmful_fraction must be in [0, 1], found {}", args.config.display(), cfg.harmful_fraction);
    }
    let model = resolve_model(&cfg.model)?;
    let dir = args.run_dir.clone().unwrap_or(cfg.run_dir.clone());
    std::fs::create_dir_all(&dir).with_context(|| format!("run_dir {}", dir.display()))?;
    std::fs::copy(&args.config, dir.join("config.toml")).context("copying the config into the run dir")?;
    for p in [&cfg.harmful_prompts, &cfg.benign_prompts] {
        if !p.is_file() {
            bail!("--config {}: prompt file {} does not exist", args.config.display(), p.display());
        }
    }
    let f = |name: &str| dir.join(name);
    let seed = cfg.seed;
    let t0 = Instant::now();
    let mut st = Stages { dir: dir.clone(), force: args.force, count: 0 };

    st.run("generate", || generate("generate", &cfg.generate, &model, &cfg.harmful_prompts, &f("rollouts.jsonl"), seed))?;
    st.run("intervene", || {
        let mut fixed = vec!["--model".into(), s(&model), "--rollouts".into(), s(&f("rollouts.jsonl")), "--output".into(), s(&f("pairs.jsonl"))];
        if !cfg.intervene.contains_key("seed") {
            fixed.extend(["--seed".into(), seed.to_string()]);
        }
        crate::cli::intervene::run(stage_args("intervene", &fixed, &cfg.intervene)?)
    })?;
    let n_pairs = count_lines(&f("pairs.jsonl"));
    if n_pairs == 0 {
        bail!(
            "intervention produced no pairs (see {}): no rollout had a compliance cue that the trigger splice fixed; \
             try more samples ([generate] n), more new tokens, or another detector",
            f("pairs.stats.json").display()
        );
    }
    st.run("score", || score_pairs(&model, &f("pairs.jsonl"), &f("pairs.ref.jsonl"), device.as_deref()))?;
    st.run("train1", || train("train1", &cfg.train1, &model, &f("pairs.ref.jsonl"), &f("stage1"), seed))?;
    let stage1 = f("stage1").join("final");
    st.run("benign", || {
        generate("benign", &cfg.benign, &model, &cfg.benign_prompts, &f("benign_base.jsonl"), seed)?;
        generate("benign", &cfg.benign, &stage1, &cfg.benign_prompts, &f("benign_stage1.jsonl"), seed)?;
        let n = benign_pairs(&f("benign_base.jsonl"), &f("benign_stage1.jsonl"), &f("benign_pairs.jsonl"))?;
        eprintln!("benign: {n} prompts answered by the base model but refused by the stage-1 model");
        if n > 0 {
            score_pairs(&model, &f("benign_pairs.jsonl"), &f("benign_pairs.ref.jsonl"), device.as_deref())
        } else {
            jsonl::write_atomic(&f("benign_pairs.ref.jsonl"), Vec::<Value>::new()).map_err(Into::into)
        }
    })?;
    st.run("train2", || {
        let (nh, nb) = mix(&f("pairs.ref.jsonl"), &f("benign_pairs.ref.jsonl"), cfg.harmful_fraction, seed, &f("stage2_pairs.jsonl"))?;
        eprintln!("train2: {nh} harmful + {nb} benign pairs");
        train("train2", &cfg.train2, &stage1, &f("stage2_pairs.jsonl"), &f("stage2"), seed)
    })?;
    let final_model = f("stage2").join("final");
    st.run("eval", || {
        for (m, tag) in [(&model, "base"), (&final_model, "final")] {
            generate("eval", &cfg.eval, m, &cfg.harmful_prompts, &f(&format!("eval_{tag}_harmful.jsonl")), seed)?;
            generate("eval", &cfg.eval, m, &cfg.benign_prompts, &f(&format!("eval_{tag}_benign.jsonl")), seed)?;
        }
        Ok(())
    })?;
    report(&dir, t0.elapsed().as_secs_f64())
}

/// report.json + report.md: pair counts, final training metrics, refusal rates before/after.
fn report(dir: &Path, secs: f64) -> Result<()> {
    let f = |name: &str| dir.join(name);
    let rate = |name: &str| -> Result<Value> {
        let (r, n) = refusal_rate(&f(name))?;
        Ok(json!({"refused": r, "total": n, "rate": if n > 0 { r as f64 / n as f64 } else { f64::NAN }}))
    };
    let last_metrics = |stage: &str| -> Value {
        read_lines(&f(stage).join("metrics.jsonl")).ok().and_then(|v| v.last().cloned()).map(Value::Object).unwrap_or(Value::Null)
    };
    let stage_secs: serde_json::Map<String, Value> = ["generate", "intervene", "score", "train1", "benign", "train2", "eval"]
        .iter()
        .filter_map(|s| {
            let l = read_lines(&f(&format!(".done-{s}"))).ok()?;
            Some((s.to_string(), l.first()?.get("seconds")?.clone()))
        })
        .collect();
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_tables_become_the_subcommands_flags() {
        let table: toml::Table = toml::from_str("n = 3\ntemperature = 0.5\nno_chat_template = true\nresume = false\nstop = [\"A\", \"B\"]").unwrap();
        let fixed = vec!["--model".into(), "m".into(), "--prompts".into(), "p.jsonl".into(), "--output".into(), "o.jsonl".into()];
        let a: crate::cli::generate::Args = stage_args("generate", &fixed, &table).unwrap();
        assert_eq!(a.n, 3);
        assert_eq!(a.temperature, 0.5);
        assert!(a.no_chat_template && !a.resume);
        assert_eq!(a.stop, vec!["A".to_string(), "B".to_string()]);
        let bad: toml::Table = toml::from_str("no_such_flag = 1").unwrap();
        let e = stage_args::<crate::cli::generate::Args>("generate", &fixed, &bad).err().unwrap().to_string();
        assert!(e.contains("[generate]") && e.contains("--no-such-flag"), "{e}");
    }

    #[test]
    fn stage_two_mix_has_the_harmful_fraction() {
        let dir = tempfile::tempdir().unwrap();
        let (h, b, out) = (dir.path().join("h.jsonl"), dir.path().join("b.jsonl"), dir.path().join("m.jsonl"));
        jsonl::write_atomic(&h, (0..40).map(|i| json!({"id": format!("h{i}")}))).unwrap();
        jsonl::write_atomic(&b, (0..10).map(|i| json!({"id": format!("b{i}")}))).unwrap();
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
