//! The tokenizer of a model folder: a thin wrapper over `tokenizers::Tokenizer` (loaded from
//! `tokenizer.json`) plus the special tokens the rest of the pipeline needs (BOS, the set of
//! EOS ids that stop generation), resolved from `tokenizer_config.json`,
//! `generation_config.json` and `config.json`. Nothing is added to an encoding unless the
//! caller asks: the chat template already writes the special tokens it wants.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Why a tokenizer could not be loaded or used; names the file when there is one.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Encode(String),
}

fn load_err(path: &Path, msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Load { path: path.to_path_buf(), msg: msg.into() }
}

/// Reads an optional JSON file: `Ok(None)` when it does not exist, an error when it is malformed.
pub(crate) fn read_optional_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s).map(Some).map_err(|e| load_err(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(load_err(path, e.to_string())),
    }
}

/// A special token in `tokenizer_config.json`: a string, or an AddedToken object
/// `{"content": "...", ...}`; `null` / absent -> None.
pub(crate) fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Token ids under `key` (an int or a list of ints, as HF allows for `eos_token_id`).
fn ids_field(v: &Value, key: &str) -> Vec<u32> {
    match v.get(key) {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
        Some(x) => x.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        None => vec![],
    }
}

/// `[n_tokens]` byte ranges `[start, end)` into the encoded text.
pub(crate) type ByteOffsets = Vec<(usize, usize)>;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and resolves the special tokens:
    /// - BOS: `tokenizer_config.json` `bos_token`, else `generation_config.json` /
    ///   `config.json` `bos_token_id`.
    /// - EOS ids (generation stops at any of them): the union, in this order, of
    ///   `generation_config.json` `eos_token_id`, `config.json` `eos_token_id` and the id of
    ///   `tokenizer_config.json` `eos_token` (chat models often end turns with a token that
    ///   only one of these files names).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let mut tok = Self::from_file(&dir.join("tokenizer.json"))?;
        let tcfg_path = dir.join("tokenizer_config.json");
        let tcfg = read_optional_json(&tcfg_path)?.unwrap_or(Value::Null);
        let gen = read_optional_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let cfg = read_optional_json(&dir.join("config.json"))?.unwrap_or(Value::Null);

        tok.bos_token = special_token(&tcfg, "bos_token");
        tok.eos_token = special_token(&tcfg, "eos_token");
        let lookup = |t: &Option<String>| -> Result<Option<u32>, TokenizerError> {
            match t {
                None => Ok(None),
                Some(s) => tok
                    .token_to_id(s)
                    .map(Some)
                    .ok_or_else(|| load_err(&tcfg_path, format!("special token \"{s}\" is not in tokenizer.json"))),
            }
        };
        let bos_from_tcfg = lookup(&tok.bos_token)?;
        let eos_from_tcfg = lookup(&tok.eos_token)?;
        tok.bos_id = bos_from_tcfg
            .or_else(|| ids_field(&gen, "bos_token_id").first().copied())
            .or_else(|| ids_field(&cfg, "bos_token_id").first().copied());
        let mut eos = ids_field(&gen, "eos_token_id");
        eos.extend(ids_field(&cfg, "eos_token_id"));
        eos.extend(eos_from_tcfg);
        let mut seen = std::collections::HashSet::new();
        eos.retain(|id| seen.insert(*id));
        tok.eos_ids = eos;
        Ok(tok)
    }

    /// Loads a bare `tokenizer.json` (no special-token resolution).
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        if !path.exists() {
            return Err(load_err(path, "file not found"));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| load_err(path, e.to_string()))?;
        Ok(Self { inner, bos_token: None, eos_token: None, bos_id: None, eos_ids: vec![] })
    }

    /// Token ids of `text`; special tokens (BOS, ...) are added only if `add_special`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, add_special).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids with the byte range `[start, end)` of `text` each token came from (tokens
    /// added by `add_special` get `(0, 0)`). Used to map sentences to token indices.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<(Vec<u32>, ByteOffsets), TokenizerError> {
        let enc = self.inner.encode(text, add_special).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// The text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids the tokenizer can produce, added tokens included (may be smaller than
    /// the model's `vocab_size`, which is often padded).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Ids that end a generation (see `from_dir` for where they come from).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The BOS / EOS strings of `tokenizer_config.json`, as the chat template sees them.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
}
