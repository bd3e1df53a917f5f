//! Options shared by several workflows, defined once: each struct is a clap argument group
//! (flattened into the subcommands with `#[command(flatten)]`) and a serde struct (flattened
//! into the stage tables of `ipo run`'s TOML config). Defaults live in the clap attributes only:
//! `Default` is derived from them by `clap_defaults`, and serde falls back to `Default`, so a
//! flag and its config key can never disagree.

use serde::Deserialize;

use crate::backend::Backend;
use crate::intervene::judge::JudgeConfig;
use crate::model::transformer::Transformer;
use crate::rollout::{EngineConfig, SamplingParams};

/// How tokens are drawn (the rollout engine's sampler).
#[derive(clap::Args, Deserialize, Debug, Clone)]
#[serde(default)]
pub struct SamplingOptions {
    /// Sampling temperature; 0 = greedy (argmax).
    #[arg(long, value_name = "T", default_value_t = 0.6)]
    pub temperature: f32,
    /// Sample only from the K most likely tokens (0 = no limit).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_k: usize,
    /// Sample from the smallest set of most likely tokens whose probability reaches P (1 = no limit).
    #[arg(long, value_name = "P", default_value_t = 0.95)]
    pub top_p: f32,
    /// Most tokens generated per sample (finish = "length" when reached, or at the model's
    /// context size).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// Seed of every random draw: a sample's tokens depend only on (seed, prompt id, sample
    /// index, position), not on batch size, order or threads.
    #[arg(long, value_name = "SEED", default_value_t = 0)]
    pub seed: u64,
}

/// The rollout engine's memory and batching (paged KV cache, continuous batching).
#[derive(clap::Args, Deserialize, Debug, Clone)]
#[serde(default)]
pub struct EngineOptions {
    /// Memory for the paged KV cache, in MiB; sequences wait (or are preempted and later
    /// recomputed) when it is full.
    #[arg(long, value_name = "MIB", default_value_t = 1024.0)]
    pub kv_cache_mb: f64,
    /// Token positions per KV cache block.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub block_size: usize,
    /// Most prompt tokens prefilled in one forward step (over all sequences).
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Most sequences decoded together in one forward step.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub max_batch: usize,
}

impl SamplingOptions {
    /// The sampler's parameters, ending sequences at `eos_ids`; errors name the flags.
    pub fn params(&self, eos_ids: &[u32]) -> anyhow::Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            eos_ids: eos_ids.to_vec(),
            seed: self.seed,
        };
        p.check().map_err(|e| anyhow::anyhow!("--temperature/--top-p: {e}"))?;
        Ok(p)
    }
}

impl EngineOptions {
    /// The engine's geometry for `model` (the backend's KV cache: 4 bytes per value, 2 on CUDA
    /// under bf16).
    pub fn config<B: Backend>(&self, model: &Transformer<B>) -> EngineConfig {
        EngineConfig::from_budget(model, self.kv_cache_mb, self.block_size, model.backend.kv_bytes_per_value(), self.prefill_chunk, self.max_batch)
    }

    /// Errors name the flags (and so the config keys) that are out of range.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.block_size == 0 || self.prefill_chunk == 0 || self.max_batch == 0 {
            anyhow::bail!("--block-size, --prefill-chunk and --max-batch must be > 0");
        }
        if !(self.kv_cache_mb > 0.0 && self.kv_cache_mb.is_finite()) {
            anyhow::bail!("--kv-cache-mb must be a positive number, got {}", self.kv_cache_mb);
        }
        Ok(())
    }
}

/// The value of `T` when no flag is given: clap parses an empty command line, so the defaults
/// written in the `#[arg(default_value...)]` attributes are the only ones.
pub(crate) fn clap_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let m = cmd.try_get_matches_from(std::iter::empty::<String>()).expect("every option has a default");
    T::from_arg_matches(&m).expect("the defaults parse")
}

/// `impl Default` from the clap defaults, for option structs that serde fills with `default`.
macro_rules! default_from_clap {
    ($($t:ty),* $(,)?) => {$(
        impl Default for $t {
            fn default() -> Self {
                $crate::workflow::options::clap_defaults()
            }
        }
    )*};
}
pub(crate) use default_from_clap;

/// Where and how to reach an LLM judge over an OpenAI-compatible endpoint (`ipo intervene
/// --detector judge`, `ipo eval --judge llm`). The API key is read from IPO_JUDGE_API_KEY only.
#[derive(clap::Args, Deserialize, Debug, Clone)]
#[serde(default)]
pub struct JudgeEndpointOptions {
    /// Judge endpoint: a base URL (http://host:port/v1) or the full .../chat/completions URL.
    /// The API key, if any, is read from the environment variable IPO_JUDGE_API_KEY and is
    /// never written anywhere.
    #[arg(long, value_name = "URL")]
    pub judge_url: Option<String>,
    /// Model name sent to the judge endpoint.
    #[arg(long, value_name = "NAME")]
    pub judge_model: Option<String>,
    /// Seconds before a judge request is abandoned (then retried).
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    pub judge_timeout: f64,
    /// Retries of a failed judge request (timeouts, HTTP 5xx/429, malformed replies), with
    /// exponential backoff starting at 1 s.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub judge_retries: u32,
    /// Most judge requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub judge_concurrency: usize,
}

impl JudgeEndpointOptions {
    pub(crate) fn check(&self) -> Result<(), String> {
        if !(self.judge_timeout > 0.0 && self.judge_timeout.is_finite()) {
            return Err("--judge-timeout must be a positive number of seconds".into());
        }
        if self.judge_concurrency == 0 {
            return Err("--judge-concurrency must be >= 1".into());
        }
        Ok(())
    }

    /// Whether an endpoint was named (an error where the judge is not in use).
    pub(crate) fn is_set(&self) -> bool {
        self.judge_url.is_some() || self.judge_model.is_some()
    }

    /// The client settings; `needs` names the flag that asked for the judge, for the error.
    pub(crate) fn config(&self, needs: &str, cache: std::path::PathBuf) -> Result<JudgeConfig, String> {
        Ok(JudgeConfig {
            url: self.judge_url.clone().ok_or_else(|| format!("{needs} needs --judge-url"))?,
            model: self.judge_model.clone().ok_or_else(|| format!("{needs} needs --judge-model"))?,
            api_key: std::env::var("IPO_JUDGE_API_KEY").ok().filter(|k| !k.is_empty()),
            timeout: std::time::Duration::from_secs_f64(self.judge_timeout),
            retries: self.judge_retries,
            backoff: std::time::Duration::from_secs(1),
            concurrency: self.judge_concurrency,
            cache: Some(cache),
        })
    }
}

default_from_clap!(SamplingOptions, EngineOptions, JudgeEndpointOptions);

/// Deserializes a clap `ValueEnum` from its flag spelling (`optimizer = "adamw"`), so config
/// values and flag values are the same words.
pub(crate) fn value_enum<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: clap::ValueEnum,
{
    let s = String::deserialize(d)?;
    T::from_str(&s, false).map_err(|_| {
        let names: Vec<String> =
            T::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|p| p.get_name().to_string()).collect();
        serde::de::Error::custom(format!("{s:?} is not one of {}", names.join(", ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_flag_defaults() {
        let s = SamplingOptions::default();
        assert_eq!((s.temperature, s.top_k, s.top_p, s.max_new_tokens, s.seed), (0.6, 0, 0.95, 1024, 0));
        let e = EngineOptions::default();
        assert_eq!((e.kv_cache_mb, e.block_size, e.prefill_chunk, e.max_batch), (1024.0, 16, 512, 32));
        // serde fills what a table leaves out from the same defaults.
        let t: SamplingOptions = toml::from_str("temperature = 0").unwrap();
        assert_eq!((t.temperature, t.top_p, t.max_new_tokens), (0.0, 0.95, 1024));
    }
}
