//! The model fingerprint written into every rollout record: SHA-256 over `config.json` and
//! `tokenizer.json` of the model folder (first 16 hex digits), so later stages can tell
//! rollouts of another model (or another tokenizer) apart.

use std::path::Path;

use sha2::{Digest, Sha256};

/// `sha256(len(config) || config || len(tokenizer) || tokenizer)`, 16 hex digits.
pub fn model_fingerprint(dir: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    for name in ["config.json", "tokenizer.json"] {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    let d = h.finalize();
    Ok(d.iter().take(8).map(|b| format!("{b:02x}")).collect())
}
