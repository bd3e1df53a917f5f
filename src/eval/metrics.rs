//! The text and statistics primitives of `ipo eval`.
//!
//! - Split: reasoning = text before `</think>`, response = text after it. A completion with no
//!   think tags at all (a model that does not reason in tags) has reasoning = response = the
//!   whole completion, so both ratios judge the same text. A completion that opens `<think>`
//!   and never closes it (cut by the token limit) has reasoning = the text after `<think>` and
//!   an empty response: it never answered.
//! - Words: maximal runs of Unicode alphanumeric characters (plus `'` inside a word),
//!   lower-cased. A completion is degenerate when it has at least [`MIN_BIGRAMS`] word
//!   bigrams and fewer than half of them are distinct (a loop repeats the same bigrams);
//!   shorter completions are never called degenerate (too little text to tell).
//! - Proportions: 95% Wilson score interval. Ratios and means of per-prompt sums: percentile
//!   bootstrap over prompts (or prose paragraphs), seeded, so the same seed gives the same
//!   interval.

use crate::model::chat::split_reasoning;
use crate::train::data::SplitMix64;

/// Word bigrams below which a completion is not judged degenerate.
pub const MIN_BIGRAMS: usize = 16;
/// Distinct-bigram share below which a completion is degenerate.
pub const DEGENERATE_BELOW: f64 = 0.5;
/// The normal quantile of a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// (reasoning, response) of a completion (see the module comment).
pub fn split_segments(completion: &str) -> (&str, &str) {
    if completion.contains("</think>") {
        return split_reasoning(completion);
    }
    match completion.trim_start().strip_prefix("<think>") {
        Some(reasoning) => (reasoning, ""),
        None => (completion, completion),
    }
}

/// The words of `text`, lower-cased (see the module comment).
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let inner_apostrophe = (c == '\'' || c == '\u{2019}') && !cur.is_empty() && chars.peek().is_some_and(|n| n.is_alphanumeric());
        if c.is_alphanumeric() || inner_apostrophe {
            cur.extend(c.to_lowercase());
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Distinct word bigrams / word bigrams, or `None` below [`MIN_BIGRAMS`] bigrams.
pub fn distinct_bigram_share(text: &str) -> Option<f64> {
    let w = words(text);
    let n = w.len().saturating_sub(1);
    if n < MIN_BIGRAMS {
        return None;
    }
    let distinct: std::collections::HashSet<(&str, &str)> = w.windows(2).map(|p| (p[0].as_str(), p[1].as_str())).collect();
    Some(distinct.len() as f64 / n as f64)
}

/// Whether `text` is a degenerate loop (see the module comment).
pub fn is_degenerate(text: &str) -> bool {
    distinct_bigram_share(text).is_some_and(|s| s < DEGENERATE_BELOW)
}

/// The 95% Wilson score interval of `k` successes in `n` trials; `None` when `n` = 0.
pub fn wilson(k: u64, n: u64) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    // At k = 0 and k = n one bound is exactly 0 or 1; rounding must not move it inside.
    let (all, none) = (k == n, k == 0);
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    let lo = if none { 0.0 } else { (center - half).max(0.0) };
    let hi = if all { 1.0 } else { (center + half).min(1.0) };
    Some((lo, hi))
}

/// The 95% percentile-bootstrap interval of `sum(num) / sum(den)`, resampling the units (the
/// index of `num`/`den`: prompts, paragraphs) with replacement `resamples` times from `seed`.
/// `None` with no unit, or when every resample has a zero denominator.
pub fn bootstrap_ratio(num: &[f64], den: &[f64], resamples: usize, seed: u64) -> Option<(f64, f64)> {
    assert_eq!(num.len(), den.len(), "one numerator and one denominator per unit");
    let n = num.len();
    if n == 0 || resamples == 0 {
        return None;
    }
    let mut rng = SplitMix64(seed ^ 0xB007_57A9_0000_0001);
    let mut stats = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let (mut a, mut b) = (0.0, 0.0);
        for _ in 0..n {
            let i = (rng.next_u64() % n as u64) as usize;
            a += num[i];
            b += den[i];
        }
        if b != 0.0 {
            stats.push(a / b);
        }
    }
    if stats.is_empty() {
        return None;
    }
    stats.sort_by(f64::total_cmp);
    Some((quantile(&stats, 0.025), quantile(&stats, 0.975)))
}

/// The `q` quantile of sorted `xs`, linear between the two nearest ranks.
fn quantile(xs: &[f64], q: f64) -> f64 {
    let pos = q * (xs.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn think_tags_split_and_tagless_completions_count_twice() {
        assert_eq!(split_segments("<think>plan it</think>Sure, here."), ("plan it", "Sure, here."));
        assert_eq!(split_segments("  <think>\nhmm</think>\nNo."), ("\nhmm", "\nNo."));
        assert_eq!(split_segments("plan</think>answer"), ("plan", "answer"));
        assert_eq!(split_segments("Just an answer."), ("Just an answer.", "Just an answer."));
        assert_eq!(split_segments("<think>never closed"), ("never closed", ""));
        assert_eq!(split_segments(""), ("", ""));
    }

    #[test]
    fn words_are_lowercased_alphanumeric_runs() {
        assert_eq!(words("Don't STOP -- x2, née!"), ["don't", "stop", "x2", "née"]);
        assert_eq!(words("'quoted' it's"), ["quoted", "it's"]);
        assert!(words(" ,.;").is_empty());
    }

    #[test]
    fn loops_are_degenerate_and_prose_is_not() {
        let lp = "I will help you. ".repeat(10);
        assert!(is_degenerate(&lp), "{:?}", distinct_bigram_share(&lp));
        assert!(is_degenerate(&"the the the the ".repeat(6)));
        // Six distinct words, then a loop: 8 distinct bigrams of 39.
        let half = format!("{} {}", "a b c d e f", "go on ".repeat(17));
        assert!(is_degenerate(&half));
        let prose = "The river runs past the old mill, where a heron waits each morning for fish that \
                     rarely come. Children from the village throw bread to the ducks instead, and the miller's \
                     dog barks at all of them.";
        assert!(!is_degenerate(prose), "{:?}", distinct_bigram_share(prose));
        // Too short to tell, however repetitive.
        assert_eq!(distinct_bigram_share(&"no no ".repeat(8)), None);
        assert!(!is_degenerate(&"no no ".repeat(8)));
        // The boundary: exactly MIN_BIGRAMS bigrams is judged.
        let w: Vec<String> = (0..=MIN_BIGRAMS).map(|i| format!("w{}", i % 2)).collect();
        assert_eq!(distinct_bigram_share(&w.join(" ")), Some(2.0 / MIN_BIGRAMS as f64));
    }

    /// Wilson's interval as the roots of (p - phat)^2 = z^2 p (1 - p) / n, solved here with
    /// the quadratic formula (a different route from `wilson`'s center +- half-width).
    fn wilson_roots(k: f64, n: f64) -> (f64, f64) {
        let z2 = Z95 * Z95;
        let phat = k / n;
        // (1 + z2/n) p^2 - (2 phat + z2/n) p + phat^2 = 0
        let (a, b, c) = (1.0 + z2 / n, -(2.0 * phat + z2 / n), phat * phat);
        let d = (b * b - 4.0 * a * c).sqrt();
        ((-b - d) / (2.0 * a), (-b + d) / (2.0 * a))
    }

    #[test]
    fn wilson_matches_the_quadratic_roots_and_published_values() {
        for (k, n) in [(0u64, 10u64), (1, 10), (5, 10), (10, 10), (37, 120), (3, 1000)] {
            let (lo, hi) = wilson(k, n).unwrap();
            let (rl, rh) = wilson_roots(k as f64, n as f64);
            assert!((lo - rl.max(0.0)).abs() < 1e-12 && (hi - rh.min(1.0)).abs() < 1e-12, "{k}/{n}: {lo} {hi} vs {rl} {rh}");
            assert!(lo <= k as f64 / n as f64 && k as f64 / n as f64 <= hi);
        }
        // statsmodels.stats.proportion.proportion_confint(5, 10, method="wilson") =
        // (0.2365931, 0.7634069); (0, 10) = (0.0, 0.2775328); (1, 10) = (0.0178762, 0.4041500).
        let close = |(a, b): (f64, f64), (x, y): (f64, f64)| (a - x).abs() < 5e-7 && (b - y).abs() < 5e-7;
        assert!(close(wilson(5, 10).unwrap(), (0.2365931, 0.7634069)), "{:?}", wilson(5, 10));
        assert!(close(wilson(0, 10).unwrap(), (0.0, 0.2775328)), "{:?}", wilson(0, 10));
        assert!(close(wilson(1, 10).unwrap(), (0.0178762, 0.4041500)), "{:?}", wilson(1, 10));
        assert_eq!(wilson(0, 0), None);
    }

    #[test]
    fn bootstrap_is_seeded_brackets_the_ratio_and_collapses_when_units_agree() {
        let num = [1.0, 2.0, 3.0, 4.0, 10.0];
        let den = [2.0, 2.0, 2.0, 2.0, 2.0];
        let a = bootstrap_ratio(&num, &den, 1000, 7).unwrap();
        assert_eq!(a, bootstrap_ratio(&num, &den, 1000, 7).unwrap());
        assert_ne!(a, bootstrap_ratio(&num, &den, 1000, 8).unwrap());
        let r = num.iter().sum::<f64>() / den.iter().sum::<f64>();
        assert!(a.0 < r && r < a.1 && a.0 >= 0.5 && a.1 <= 5.0, "{a:?} around {r}");
        // Every unit with the same ratio: every resample gives it.
        assert_eq!(bootstrap_ratio(&[2.0, 4.0, 6.0], &[1.0, 2.0, 3.0], 200, 1), Some((2.0, 2.0)));
        assert_eq!(bootstrap_ratio(&[], &[], 100, 1), None);
    }
}
