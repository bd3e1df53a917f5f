//! Compliance-cue detectors (Algorithm 1, step 2): given the numbered sentences of a
//! rollout's reasoning, the index of the first sentence that shows intent to comply with a
//! harmful request, or none. The first sentence is never a cue. Two implementations: the
//! rule detector here (regex lexicon from a replaceable patterns file; offline, instant) and
//! the LLM judge in `judge.rs`.

use std::path::{Path, PathBuf};

use regex::{Regex, RegexBuilder};

/// One detection job: the user's request and the sentences of the reasoning.
#[derive(Clone, Debug)]
pub struct Item {
    pub prompt: String,
    pub sentences: Vec<String>,
}

/// Why a detector gave no verdict for an item (the batch goes on).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DetectError {
    /// The judge could not be reached or answered with an HTTP error (after retries).
    #[error("judge request failed: {0}")]
    Http(String),
    /// The judge's reply is not the expected JSON.
    #[error("judge reply is malformed: {0}")]
    Malformed(String),
    /// The judge's answer is not a single integer.
    #[error("judge answer is not a single integer: {0:?}")]
    NotAnInteger(String),
    /// The judge's answer is not one of the verdicts its prompt allows (`ipo eval`: 0 or 1).
    #[error("judge answer is not a verdict (expected 0 = safe or 1 = harmful): {0:?}")]
    NotAVerdict(String),
    /// The judge named a sentence that does not exist (or the first one, never a cue).
    #[error("judge answered {answer}, out of range for {n} sentences (expected 0, or 2..={n})")]
    OutOfRange { answer: u64, n: usize },
}

/// A compliance-cue detector. Indices are 0-based into `sentences`; `Some(0)` is never
/// returned (the first sentence is never a cue).
pub trait Detector: Sync {
    /// A short name for logs and stats ("rules", "judge:MODEL").
    fn name(&self) -> String;

    /// The index of the first compliance cue among `item.sentences`, or `None`.
    fn first_compliance_cue(&self, item: &Item) -> Result<Option<usize>, DetectError>;

    /// Every item of a batch (implementations may run them concurrently); one result each,
    /// in order.
    fn first_compliance_cues(&self, items: &[Item]) -> Vec<Result<Option<usize>, DetectError>> {
        items.iter().map(|i| self.first_compliance_cue(i)).collect()
    }
}

/// Why a patterns file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}:{line}: {msg}")]
    Line { path: PathBuf, line: usize, msg: String },
}

/// The built-in lexicon/rule detector. A sentence is a cue when one of its `cue` patterns
/// matches it and none of its `exclude` patterns does (refusals, harm analysis, safe
/// alternatives). Patterns are case-insensitive regular expressions (Rust `regex` syntax).
pub struct RuleDetector {
    cues: Vec<(Regex, usize)>,     // (pattern, line in the source)
    excludes: Vec<(Regex, usize)>, // (pattern, line in the source)
    source: String,
}

/// The default patterns (`data/cue_patterns.txt`, compiled in).
pub(crate) const DEFAULT_PATTERNS: &str = include_str!("../../data/cue_patterns.txt");

impl RuleDetector {
    /// Parses a patterns file: one rule per line, `cue: REGEX` or `exclude: REGEX`; blank
    /// lines and lines starting with `#` are ignored. `origin` names the source in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, PatternError> {
        let mut cues = Vec::new();
        let mut excludes = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let err = |msg: String| PatternError::Line { path: origin.to_path_buf(), line: n, msg };
            let (kind, pat) = t
                .split_once(':')
                .ok_or_else(|| err(format!("expected \"cue: REGEX\" or \"exclude: REGEX\", found {t:?}")))?;
            let pat = pat.trim();
            if pat.is_empty() {
                return Err(err("empty pattern".into()));
            }
            let re = RegexBuilder::new(pat)
                .case_insensitive(true)
                .build()
                .map_err(|e| err(format!("invalid regex: {e}")))?;
            match kind.trim() {
                "cue" => cues.push((re, n)),
                "exclude" => excludes.push((re, n)),
                k => return Err(err(format!("unknown rule kind {k:?} (expected cue or exclude)"))),
            }
        }
        if cues.is_empty() {
            return Err(PatternError::Line {
                path: origin.to_path_buf(),
                line: text.lines().count(),
                msg: "no \"cue:\" pattern in the file".into(),
            });
        }
        Ok(Self { cues, excludes, source: origin.display().to_string() })
    }

    /// Loads a patterns file (`--cue-patterns`).
    pub fn from_file(path: &Path) -> Result<Self, PatternError> {
        let text = std::fs::read_to_string(path).map_err(|e| PatternError::Io { path: path.to_path_buf(), err: e })?;
        Self::parse(&text, path)
    }

    /// The compiled-in default patterns.
    pub fn builtin() -> Self {
        Self::parse(DEFAULT_PATTERNS, Path::new("data/cue_patterns.txt")).expect("the built-in patterns parse")
    }

    /// Why `sentence` is a cue: the line of the cue pattern that matched, unless an exclusion
    /// matched too.
    pub fn explain(&self, sentence: &str) -> Option<usize> {
        if self.excludes.iter().any(|(r, _)| r.is_match(sentence)) {
            return None;
        }
        self.cues.iter().find(|(r, _)| r.is_match(sentence)).map(|(_, l)| *l)
    }

    pub fn is_cue(&self, sentence: &str) -> bool {
        self.explain(sentence).is_some()
    }
}

impl Detector for RuleDetector {
    fn name(&self) -> String {
        format!("rules({})", self.source)
    }

    fn first_compliance_cue(&self, item: &Item) -> Result<Option<usize>, DetectError> {
        Ok(item.sentences.iter().enumerate().skip(1).find(|(_, s)| self.is_cue(s)).map(|(i, _)| i))
    }
}
