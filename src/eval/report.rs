//! The typed result of `ipo eval`: written as `eval.json` (serde) and rendered as the
//! markdown table of `eval.md`. Every number is an [`Estimate`] with its 95% interval and the
//! counts it came from, per model (`model`, `base`) and per decoding (`greedy`, `sampled`).

use serde::{Deserialize, Serialize};

use super::metrics::{bootstrap_ratio, wilson};

/// One measured number: `value` with its 95% interval, from `count` out of `total` (a
/// proportion: items labelled / items judged; a mean NLL or a ratio: tokens / units, see
/// `Method`). `left_out`: items that could not be measured (failed generation, judge error)
/// and are in neither count. `value` and the interval are null when nothing was measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub count: u64,
    pub total: u64,
    pub left_out: u64,
}

impl Estimate {
    /// `k` of `n`, with the Wilson interval.
    pub fn proportion(k: u64, n: u64, left_out: u64) -> Self {
        let ci = wilson(k, n);
        let value = (n > 0).then(|| k as f64 / n as f64);
        Self { value, ci_low: ci.map(|c| c.0), ci_high: ci.map(|c| c.1), count: k, total: n, left_out }
    }

    /// `sum(num) / sum(den)` over units, with the bootstrap interval over the units; `count`
    /// is what the caller counts (tokens), `total` the number of units.
    pub fn ratio(num: &[f64], den: &[f64], count: u64, left_out: u64, resamples: usize, seed: u64) -> Self {
        let (a, b): (f64, f64) = (num.iter().sum(), den.iter().sum());
        let value = (!num.is_empty() && b != 0.0).then(|| a / b);
        let ci = if value.is_some() { bootstrap_ratio(num, den, resamples, seed) } else { None };
        Self { value, ci_low: ci.map(|c| c.0), ci_high: ci.map(|c| c.1), count, total: num.len() as u64, left_out }
    }
}

/// The harmful prompt set under one decoding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HarmfulSet {
    /// Completions whose reasoning the judge labels harmful / completions judged.
    pub reasoning_harmful_ratio: Estimate,
    /// Completions whose response the judge labels harmful / completions judged.
    pub response_harmful_ratio: Estimate,
    /// Responses that refuse (`is_refusal`) / completions (higher = safer).
    pub refusal_rate: Estimate,
}

/// The benign prompt set under one decoding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenignSet {
    /// Responses that refuse / completions (over-refusal: lower = better).
    pub refusal_rate: Estimate,
}

/// One model under one decoding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decoding {
    pub harmful: HarmfulSet,
    pub benign: BenignSet,
    /// Degenerate completions (both sets) / completions.
    pub degenerate_share: Estimate,
    /// Completions generated (both sets) and requests that failed.
    pub completions: u64,
    pub failed: u64,
}

/// One model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    pub greedy: Decoding,
    /// With `--n` > 0: `n` samples per prompt.
    pub sampled: Option<Decoding>,
    /// Mean per-token NLL (nats) of the reference answers (the base model's greedy answers to
    /// the benign prompts; the model's own without `--base`) under this model.
    pub helpful_answer_nll: Estimate,
    /// Mean per-token NLL (nats) of the prose file under this model.
    pub prose_nll: Estimate,
}

/// A prompt or text file and what was read from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileRef {
    pub path: String,
    pub sha256: String,
    /// Prompts (prompt files) or paragraphs (prose).
    pub items: u64,
}

/// A model folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub path: String,
    /// `rollout::fingerprint` (config, tokenizer, weights identity).
    pub fingerprint: String,
}

/// How the judge labelled segments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeRef {
    /// "rules" or "llm".
    pub kind: String,
    /// rules: the cue patterns; llm: the judge prompt.
    pub file: FileRef,
    /// llm: the judge model name.
    pub model: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub judge: JudgeRef,
    /// Samples per prompt at `temperature` / `top_p` (0: greedy only).
    pub n: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
    pub bootstrap_resamples: usize,
    pub chat_template: bool,
    pub system: Option<String>,
    pub device: String,
    pub harmful: FileRef,
    pub benign: FileRef,
    pub prose: FileRef,
    pub model: ModelRef,
    pub base: Option<ModelRef>,
}

/// How every number was computed (written into eval.json so a reader needs no source).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Method {
    pub proportions: String,
    pub ratios: String,
    pub nll: String,
    pub split: String,
    pub judge: String,
    pub degenerate: String,
}

/// Items left out of the measurements, by cause (each listed in eval.errors.jsonl).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorCounts {
    /// Prompts that could not be tokenized or run (per model and decoding).
    pub generation: u64,
    /// Segments the judge gave no verdict for.
    pub judge: u64,
    /// Answers or prose windows that could not be scored.
    pub scoring: u64,
}

/// `eval.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub method: Method,
    pub settings: Settings,
    pub model: ModelReport,
    pub base: Option<ModelReport>,
    /// helpful_answer_nll of the model / of the base, over the same answers (1.0 = as likely
    /// as before; above 1 = the model finds the base's helpful answers less likely). Null
    /// without `--base`.
    pub helpful_answer_nll_ratio: Option<Estimate>,
    /// prose_nll of the model / of the base. Null without `--base`.
    pub prose_nll_ratio: Option<Estimate>,
    pub errors: ErrorCounts,
}

fn cell(e: &Estimate, proportion: bool) -> String {
    match (e.value, e.ci_low, e.ci_high) {
        (Some(v), Some(lo), Some(hi)) if proportion => format!("{v:.3} [{lo:.3}, {hi:.3}] ({}/{})", e.count, e.total),
        (Some(v), Some(lo), Some(hi)) => format!("{v:.3} [{lo:.3}, {hi:.3}]"),
        (Some(v), _, _) => format!("{v:.3}"),
        (None, _, _) => "n/a".into(),
    }
}

/// The markdown of `eval.md`: one row per measurement, base and model side by side.
pub fn markdown(r: &EvalReport) -> String {
    let base = r.base.as_ref();
    let mut rows: Vec<(String, String, Option<&Estimate>, &Estimate, bool)> = Vec::new();
    let decodings = [("greedy", Some(&r.model.greedy), base.map(|b| &b.greedy)), ("sampled", r.model.sampled.as_ref(), base.and_then(|b| b.sampled.as_ref()))];
    for (name, m, b) in decodings {
        let Some(m) = m else { continue };
        let dec = if name == "sampled" { format!("sampled (n={}, T={})", r.settings.n, r.settings.temperature) } else { name.to_string() };
        let pick = |f: fn(&Decoding) -> &Estimate| (b.map(f), f(m));
        for (label, f) in [
            ("harmful: reasoning harmful ratio", (|d: &Decoding| &d.harmful.reasoning_harmful_ratio) as fn(&Decoding) -> &Estimate),
            ("harmful: response harmful ratio", |d| &d.harmful.response_harmful_ratio),
            ("harmful: refusal rate (higher = safer)", |d| &d.harmful.refusal_rate),
            ("benign: refusal rate (lower = better)", |d| &d.benign.refusal_rate),
            ("degenerate share", |d| &d.degenerate_share),
        ] {
            let (bv, mv) = pick(f);
            rows.push((label.into(), dec.clone(), bv, mv, true));
        }
    }
    rows.push(("helpful-answer NLL (nats/token)".into(), "greedy answers".into(), base.map(|b| &b.helpful_answer_nll), &r.model.helpful_answer_nll, false));
    rows.push(("prose NLL (nats/token)".into(), "-".into(), base.map(|b| &b.prose_nll), &r.model.prose_nll, false));

    let mut s = String::from("# ipo eval\n\n");
    s.push_str(&format!(
        "model `{}`{}; judge {}; {} harmful and {} benign prompts; max {} new tokens.\n\n",
        r.settings.model.path,
        r.settings.base.as_ref().map(|b| format!(" vs base `{}`", b.path)).unwrap_or_default(),
        r.settings.judge.kind,
        r.settings.harmful.items,
        r.settings.benign.items,
        r.settings.max_new_tokens
    ));
    if base.is_some() {
        s.push_str("| metric | decoding | base | model |\n|---|---|---|---|\n");
    } else {
        s.push_str("| metric | decoding | model |\n|---|---|---|\n");
    }
    for (label, dec, b, m, prop) in &rows {
        match (base, b) {
            (Some(_), Some(b)) => s.push_str(&format!("| {label} | {dec} | {} | {} |\n", cell(b, *prop), cell(m, *prop))),
            _ => s.push_str(&format!("| {label} | {dec} | {} |\n", cell(m, *prop))),
        }
    }
    s.push('\n');
    for (name, e) in [("helpful-answer NLL ratio (model/base)", &r.helpful_answer_nll_ratio), ("prose NLL ratio (model/base)", &r.prose_nll_ratio)] {
        match e {
            Some(e) => s.push_str(&format!("- {name}: {} over {} units (1.0 = unchanged)\n", cell(e, false), e.total)),
            None => s.push_str(&format!("- {name}: n/a (no --base)\n")),
        }
    }
    let e = &r.errors;
    s.push_str(&format!(
        "- left out: {} generation failures, {} judge errors, {} scoring failures (eval.errors.jsonl)\n\n",
        e.generation, e.judge, e.scoring
    ));
    s.push_str(&format!("Intervals: proportions {}; NLLs and ratios {}.\n", r.method.proportions, r.method.ratios));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_carry_value_interval_and_counts() {
        let p = Estimate::proportion(3, 12, 2);
        assert_eq!((p.value, p.count, p.total, p.left_out), (Some(0.25), 3, 12, 2));
        let (lo, hi) = (p.ci_low.unwrap(), p.ci_high.unwrap());
        assert!(lo < 0.25 && 0.25 < hi);
        let none = Estimate::proportion(0, 0, 4);
        assert_eq!((none.value, none.ci_low, none.ci_high), (None, None, None));
        let r = Estimate::ratio(&[2.0, 4.0], &[1.0, 2.0], 30, 0, 100, 3);
        assert_eq!((r.value, r.ci_low, r.ci_high, r.total, r.count), (Some(2.0), Some(2.0), Some(2.0), 2, 30));
        assert_eq!(Estimate::ratio(&[], &[], 0, 1, 100, 3).value, None);
    }
}
