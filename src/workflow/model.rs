//! The one model-loading path of every workflow: a Hugging Face model folder (config.json,
//! tokenizer files, safetensors weights) read in the order the workflows need it (config and
//! tokenizer first, so inputs are checked before the weights are read), then uploaded to the
//! chosen backend.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::backend::Backend;
use crate::model::chat::ChatTemplate;
use crate::model::config::ModelConfig;
use crate::model::load::{load_config, load_weights};
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::Transformer;
use crate::model::weights::{HostTensor, ModelWeights};
use crate::rollout::fingerprint::model_fingerprint;

/// A model folder whose `config.json` has been read and checked.
#[derive(Clone, Debug)]
pub struct ModelDir {
    pub path: PathBuf,
    pub config: ModelConfig,
}

impl ModelDir {
    /// Reads `dir/config.json`; errors name the file and the field.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self { path: dir.to_path_buf(), config: load_config(dir)? })
    }

    /// `tokenizer.json` (+ `tokenizer_config.json` for special tokens).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Ok(Tokenizer::from_dir(&self.path)?)
    }

    /// The chat template of `tokenizer_config.json`.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        Ok(ChatTemplate::from_dir(&self.path)?)
    }

    /// SHA-256 over config.json and tokenizer.json (16 hex digits), written into rollouts.
    pub fn fingerprint(&self) -> Result<String> {
        Ok(model_fingerprint(&self.path)?)
    }

    /// The weights on the host, checked against the config (names, shapes, dtypes).
    pub fn weights(&self) -> Result<ModelWeights<HostTensor>> {
        Ok(load_weights(&self.path, &self.config)?)
    }

    /// The transformer on `backend`, with `weights` uploaded.
    pub fn upload<B: Backend>(&self, backend: B, weights: ModelWeights<HostTensor>) -> Result<Transformer<B>> {
        Ok(Transformer::with_backend(backend, self.config.clone(), weights)?)
    }

    /// `upload` for a workflow that never changes the weights (generate, intervene, score,
    /// eval, csr): the layer matrices are frozen (`Transformer::freeze`).
    pub fn upload_frozen<B: Backend>(&self, backend: B, weights: ModelWeights<HostTensor>) -> Result<Transformer<B>> {
        let mut m = self.upload(backend, weights)?;
        m.freeze();
        Ok(m)
    }
}

/// A model name of a config: a folder, or "default" (the embedded SmolLM2-135M-Instruct:
/// `IPO_DEFAULT_MODEL`, else the folder `scripts/fetch-default-model.sh` writes).
pub(crate) fn resolve_model(name: &str) -> Result<PathBuf> {
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
