//! Config tables into typed options. A stage table of `ipo run`'s TOML config (`[generate]`,
//! `[train1]`, ...) is deserialized straight into the workflow's options struct. serde cannot
//! deny unknown keys through `#[serde(flatten)]`, so the keys are checked first against the
//! struct's own flags (clap knows every field, flattened groups included): a misspelt key is
//! an error naming the file, the table and the nearest valid key, before any stage starts.

use std::path::Path;

use anyhow::{bail, Result};
use serde::de::DeserializeOwned;

/// The config keys of an options struct: its long flags with '_' for '-'.
pub(crate) fn keys_of<T: clap::Args>() -> Vec<String> {
    T::augment_args(clap::Command::new("keys"))
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(|l| l.replace('-', "_"))
        .collect()
}

/// The valid key closest to `key` in spelling, if any is close enough to be a likely typo.
pub(crate) fn nearest<'a>(key: &str, valid: &'a [String]) -> Option<&'a str> {
    valid
        .iter()
        .map(|v| (strsim::jaro_winkler(key, v), v))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, v)| v.as_str())
}

/// Parses the table `[name]` of the config `file` into `T`; keys `T` has no flag for are
/// rejected.
pub(crate) fn from_table<T>(file: &Path, name: &str, table: &toml::Table) -> Result<T>
where
    T: clap::Args + DeserializeOwned,
{
    let valid = keys_of::<T>();
    for key in table.keys() {
        if !valid.contains(key) {
            let hint = nearest(key, &valid).map(|n| format!("; did you mean `{n}`?")).unwrap_or_default();
            bail!("{}: [{name}] {key}: unknown key{hint} (valid keys: {})", file.display(), valid.join(", "));
        }
    }
    T::deserialize(toml::Value::Table(table.clone())).map_err(|e| anyhow::anyhow!("{}: [{name}]: {}", file.display(), e.to_string().trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::options::SamplingOptions;

    #[test]
    fn misspelt_keys_name_file_table_and_nearest_key() {
        let t: toml::Table = toml::from_str("max_new_token = 5").unwrap();
        let e = from_table::<SamplingOptions>(Path::new("c.toml"), "generate", &t).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: [generate] max_new_token: unknown key; did you mean `max_new_tokens`?"), "{e}");
        let t: toml::Table = toml::from_str("zzz = 5").unwrap();
        let e = from_table::<SamplingOptions>(Path::new("c.toml"), "generate", &t).unwrap_err().to_string();
        assert!(e.contains("zzz: unknown key (valid keys: temperature,"), "{e}");
        let t: toml::Table = toml::from_str("top_k = \"many\"").unwrap();
        let e = from_table::<SamplingOptions>(Path::new("c.toml"), "generate", &t).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: [generate]:") && e.contains("top_k"), "{e}");
        let t: toml::Table = toml::from_str("top_k = 5\nmax_new_tokens = 7").unwrap();
        let o = from_table::<SamplingOptions>(Path::new("c.toml"), "generate", &t).unwrap();
        assert_eq!((o.top_k, o.max_new_tokens, o.temperature), (5, 7, 0.6));
    }
}
