//! The safety-trigger pool of Algorithm 1: sentences spliced in at the first compliance cue.
//! The default pool is `data/triggers.txt` (compiled in); `--triggers FILE` replaces it.

use std::path::{Path, PathBuf};

/// The compiled-in default pool.
pub(crate) const DEFAULT_TRIGGERS: &str = include_str!("../../data/triggers.txt");

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {msg}")]
    Content { path: PathBuf, msg: String },
}

/// Parses a trigger file: one trigger per line, trimmed; blank lines and `#` comments skipped;
/// duplicates rejected (they would emit identical pairs). `origin` names the source in errors.
pub fn parse_triggers(text: &str, origin: &Path) -> Result<Vec<String>, TriggerError> {
    let mut out: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if out.iter().any(|o| o == t) {
            return Err(TriggerError::Content {
                path: origin.to_path_buf(),
                msg: format!("line {}: duplicate trigger {t:?}", i + 1),
            });
        }
        out.push(t.to_string());
    }
    if out.is_empty() {
        return Err(TriggerError::Content { path: origin.to_path_buf(), msg: "no trigger in the file".into() });
    }
    Ok(out)
}

/// Loads `--triggers FILE`, or the default pool when `path` is None.
pub fn load_triggers(path: Option<&Path>) -> Result<Vec<String>, TriggerError> {
    match path {
        None => parse_triggers(DEFAULT_TRIGGERS, Path::new("data/triggers.txt")),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| TriggerError::Io { path: p.to_path_buf(), err: e })?;
            parse_triggers(&text, p)
        }
    }
}
