//! Rebuild a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`,
//! `special_tokens_map.json`) from GGUF tokenizer metadata, for byte-level BPE vocabularies
//! (`tokenizer.ggml.model = gpt2`). The pre-tokenizer comes from `tokenizer.ggml.pre`,
//! the same table llama.cpp's converter used to name it.

use serde_json::{json, Map, Value as Json};

use super::reader::{GgufFile, Value};
use super::GgufError;

/// The tokenizer files of an HF folder, as JSON values.
pub(crate) struct TokenizerFiles {
    pub tokenizer: Json,
    pub tokenizer_config: Json,
    pub special_tokens_map: Json,
}

// Split regexes of llama.cpp's `llm_tokenizer_bpe` / HF's tokenizer.json for the
// pre-tokenizer families we support beyond plain GPT-2.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex })
}

fn split(pattern: &str) -> Json {
    json!({ "type": "Split", "pattern": { "Regex": pattern }, "behavior": "Isolated", "invert": false })
}

/// Build the tokenizer files from `g`'s metadata.
pub(crate) fn hf_tokenizer_files(g: &GgufFile) -> Result<TokenizerFiles, GgufError> {
    let err = |reason: String| GgufError::Tokenizer { path: g.path.clone(), reason };
    let model = g.require_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(err(format!("tokenizer.ggml.model = '{model}' is not supported (expected 'gpt2', byte-level BPE)")));
    }
    let strings = |key: &str| -> Result<Vec<&str>, GgufError> {
        let v = g.require(key)?;
        let arr = v.as_array().ok_or_else(|| g.wrong_type(key, "an array of strings", v))?;
        arr.iter().map(|x| x.as_str().ok_or_else(|| g.wrong_type(key, "an array of strings", x))).collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|x| x.as_i64().unwrap_or(1)).collect(),
        Some(v) => return Err(g.wrong_type("tokenizer.ggml.token_type", "an array of integers", v)),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(err(format!("{} token types for {} tokens", types.len(), tokens.len())));
    }
    let pre = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
    let pre_tokenizer = match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        "smollm" | "starcoder" | "refact" => json!({ "type": "Sequence", "pretokenizers": [
            { "type": "Digits", "individual_digits": true }, byte_level(true) ] }),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({ "type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)] }),
        "qwen2" | "deepseek-r1-qwen" => json!({ "type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)] }),
        other => return Err(err(format!("tokenizer.ggml.pre = '{other}' is not supported (expected default, gpt2, smollm, llama-bpe or qwen2)"))),
    };

    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    let merges: Vec<Json> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(err(format!("merge {i} '{m}' is not two tokens separated by a space"))),
        })
        .collect::<Result<_, _>>()?;

    // Control (3) and unknown (2) tokens are special; user-defined (4) are added, not special.
    let mut added = Vec::new();
    let mut added_decoder = Map::new();
    for (i, (&t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == 2 || ty == 3 || ty == 4 {
            let special = ty != 4;
            added.push(json!({ "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": special }));
            added_decoder.insert(i.to_string(), json!({ "content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": special }));
        }
    }

    let tok_of = |key: &str| -> Result<Option<String>, GgufError> {
        match g.get(key) {
            None => Ok(None),
            Some(v) => {
                let id = v.as_u64().ok_or_else(|| g.wrong_type(key, "a token id", v))? as usize;
                let t = tokens.get(id).ok_or_else(|| err(format!("{key} = {id} is outside the vocabulary of {}", tokens.len())))?;
                Ok(Some(t.to_string()))
            }
        }
    };
    let bos = tok_of("tokenizer.ggml.bos_token_id")?;
    let eos = tok_of("tokenizer.ggml.eos_token_id")?;
    let unk = tok_of("tokenizer.ggml.unknown_token_id")?;
    let pad = tok_of("tokenizer.ggml.padding_token_id")?;
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);

    let post_processor = match (&bos, add_bos) {
        (Some(b), true) => {
            let bos_id = g.require_u64("tokenizer.ggml.bos_token_id")?;
            json!({ "type": "TemplateProcessing",
                "single": [ { "SpecialToken": { "id": b, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } } ],
                "pair": [ { "SpecialToken": { "id": b, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } },
                          { "SpecialToken": { "id": b, "type_id": 1 } }, { "Sequence": { "id": "B", "type_id": 1 } } ],
                "special_tokens": { b.as_str(): { "id": b, "ids": [bos_id], "tokens": [b] } } })
        }
        _ => json!({ "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true }),
    };

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });

    let arch = g.get("general.architecture").and_then(|v| v.as_str()).unwrap_or("llama");
    let max_len = g.get(&format!("{arch}.context_length")).and_then(|v| v.as_u64()).unwrap_or(4096);
    let mut special_map = Map::new();
    for (name, t) in [("bos_token", &bos), ("eos_token", &eos), ("pad_token", &pad), ("unk_token", &unk)] {
        if let Some(t) = t {
            special_map.insert(name.into(), json!(t));
        }
    }
    let mut cfg = json!({
        "add_bos_token": add_bos,
        "add_prefix_space": false,
        "added_tokens_decoder": added_decoder,
        "clean_up_tokenization_spaces": false,
        "model_max_length": max_len,
        "tokenizer_class": "GPT2Tokenizer",
    });
    for (k, v) in &special_map {
        cfg[k] = v.clone();
    }
    if let Some(t) = g.get("tokenizer.chat_template") {
        cfg["chat_template"] = json!(t.as_str().ok_or_else(|| g.wrong_type("tokenizer.chat_template", "a string", t))?);
    }
    Ok(TokenizerFiles { tokenizer, tokenizer_config: cfg, special_tokens_map: Json::Object(special_map) })
}
