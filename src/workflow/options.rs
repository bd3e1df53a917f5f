//! Options shared by several workflows, defined once: each struct is a clap argument group
//! (flattened into the subcommands with `#[command(flatten)]`) and a serde struct (flattened
//! into the stage tables of `ipo run`'s TOML config). Defaults live in the clap attributes only:
//! `Default` is derived from them by `clap_defaults`, and serde falls back to `Default`, so a
//! flag and its config key can never disagree.

use serde::Deserialize;

use crate::backend::Backend;
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
    /// The engine's geometry for `model` (fp32 KV cache: 4 bytes per value).
    pub fn config<B: Backend>(&self, model: &Transformer<B>) -> EngineConfig {
        EngineConfig::from_budget(model, self.kv_cache_mb, self.block_size, 4, self.prefill_chunk, self.max_batch)
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

default_from_clap!(SamplingOptions, EngineOptions);

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
