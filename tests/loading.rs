//! Model loading (`ipo::model::load`): config.json parsing for Llama / Qwen2 / Qwen3 with
//! transformers' defaults and rope_scaling; safetensors loading of seeded random weights
//! written here as f32 / f16 / bf16 / f64, single-file and sharded, compared with the rounded
//! originals; tied embeddings; and every bad input giving an error that names the file/tensor.

mod common;

use common::{byte_tokenizer_json, tiny_fixture, Rng};
use std::collections::HashMap;
use std::path::Path;

use ipo::model::config::{Family, ModelConfig};
use ipo::model::load::{expected_shapes, load_config, load_weights, LoadError};
use safetensors::{tensor::TensorView, Dtype};
use serde_json::{json, Value};

fn write_config(dir: &Path, v: &Value) {
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn config_from(v: Value) -> Result<ModelConfig, LoadError> {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &v);
    load_config(dir.path())
}

fn base(model_type: &str) -> Value {
    json!({
        "model_type": model_type,
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 64,
    })
}

fn with(mut v: Value, extra: Value) -> Value {
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[test]
fn llama_config_and_transformers_defaults() {
    let mut v = base("llama");
    let o = v.as_object_mut().unwrap();
    o.remove("num_key_value_heads");
    o.remove("max_position_embeddings");
    o.remove("rms_norm_eps");
    let c = config_from(v).unwrap();
    assert_eq!(c.family, Family::Llama);
    assert_eq!(c.num_kv_heads, 4, "num_key_value_heads defaults to num_attention_heads");
    assert_eq!(c.head_dim, 8, "head_dim defaults to hidden / heads");
    assert_eq!(c.rope_theta, 10000.0);
    assert_eq!(c.rope_scaling, None);
    assert_eq!(c.max_position_embeddings, 2048);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(1), vec![2]));

    // Explicit values win; eos may be a list; head_dim may differ from hidden / heads; null
    // counts as absent.
    let c = config_from(with(
        base("llama"),
        json!({"head_dim": 16, "rope_theta": 500000.0, "eos_token_id": [128001, 128008, 128009],
               "bos_token_id": 128000, "tie_word_embeddings": true, "rope_scaling": null,
               "num_key_value_heads": null}),
    ))
    .unwrap();
    assert_eq!((c.head_dim, c.num_kv_heads, c.rope_theta), (16, 4, 500000.0));
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(c.bos_token_id, Some(128000));
    assert!(c.tie_word_embeddings);
    assert_eq!(c.q_dim(), 64);

    // Mistral-style configs are Llamas (a sliding window that never binds is accepted).
    let c = config_from(with(base("mistral"), json!({"sliding_window": null}))).unwrap();
    assert_eq!(c.family, Family::Llama);
    let e = config_from(with(base("mistral"), json!({"sliding_window": 16}))).unwrap_err().to_string();
    assert!(e.contains("sliding_window (16)"), "{e}");
}

#[test]
fn llama3_rope_scaling_in_both_spellings() {
    let scaling = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64, "rope_type": "llama3"});
    let a = config_from(with(base("llama"), json!({"rope_scaling": scaling, "rope_theta": 500000.0}))).unwrap();
    let s = a.rope_scaling.expect("llama3 scaling");
    assert_eq!((s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings), (8.0, 1.0, 4.0, 64));
    assert_eq!(a.rope_theta, 500000.0);
    // Old key `type` and transformers 5's `rope_parameters` (with rope_theta inside).
    let mut old = scaling.clone();
    old.as_object_mut().unwrap().remove("rope_type");
    old["type"] = json!("llama3");
    let b = config_from(with(base("llama"), json!({"rope_scaling": old, "rope_theta": 500000.0}))).unwrap();
    assert_eq!(b.rope_scaling, a.rope_scaling);
    let mut params = scaling.clone();
    params["rope_theta"] = json!(500000.0);
    let c = config_from(with(base("llama"), json!({"rope_parameters": params}))).unwrap();
    assert_eq!((c.rope_scaling, c.rope_theta), (a.rope_scaling, 500000.0));
    // The scaling changes the low frequencies only.
    let plain = config_from(with(base("llama"), json!({"rope_theta": 500000.0}))).unwrap();
    let (fs, fp) = (a.rope_inv_freq(), plain.rope_inv_freq());
    assert_eq!(fs[0], fp[0]);
    assert!((fs[fs.len() - 1] - fp[fp.len() - 1] / 8.0).abs() < 1e-12 * fp[0]);
    // "default" is plain RoPE.
    let d = config_from(with(base("llama"), json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}))).unwrap();
    assert_eq!((d.rope_scaling, d.rope_theta), (None, 1e6));

    // Other types are refused by name; llama3 needs all its fields.
    let e = config_from(with(base("llama"), json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("\"yarn\""), "{e}");
    let e = config_from(with(base("llama"), json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}))).unwrap_err().to_string();
    assert!(e.contains("\"dynamic\""), "{e}");
    let e = config_from(with(base("llama"), json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))).unwrap_err().to_string();
    assert!(e.contains("low_freq_factor"), "{e}");
}

#[test]
fn qwen2_and_qwen3_configs() {
    let q2 = config_from(with(base("qwen2"), json!({"eos_token_id": 151643, "bos_token_id": null, "use_sliding_window": false, "sliding_window": 32}))).unwrap();
    assert_eq!(q2.family, Family::Qwen2);
    assert!(q2.qkv_bias, "Qwen2 always has q/k/v biases");
    assert!(!q2.qk_norm && !q2.tie_word_embeddings);
    assert_eq!((q2.head_dim, q2.bos_token_id, q2.eos_token_ids.clone()), (8, None, vec![151643]));
    let mut v = base("qwen2");
    v.as_object_mut().unwrap().remove("max_position_embeddings");
    let q2 = config_from(v).unwrap();
    assert_eq!((q2.max_position_embeddings, q2.bos_token_id, q2.eos_token_ids.len()), (32768, None, 0));

    // Qwen3: q/k norm, no bias, and head_dim defaults to 128 (Qwen3Config), not hidden / heads.
    let q3 = config_from(base("qwen3")).unwrap();
    assert_eq!(q3.family, Family::Qwen3);
    assert!(q3.qk_norm && !q3.qkv_bias);
    assert_eq!(q3.head_dim, 128);
    let q3 = config_from(with(base("qwen3"), json!({"head_dim": 16, "tie_word_embeddings": true}))).unwrap();
    assert_eq!((q3.head_dim, q3.q_dim(), q3.kv_dim()), (16, 64, 32));
    assert!(q3.tie_word_embeddings);
    let e = config_from(with(base("qwen3"), json!({"attention_bias": true}))).unwrap_err().to_string();
    assert!(e.contains("attention_bias"), "{e}");
}

#[test]
fn bad_configs_name_file_and_field() {
    let e = config_from(with(base("llama"), json!({"model_type": "gpt2"}))).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("\"gpt2\""), "{e}");
    let mut v = base("llama");
    v.as_object_mut().unwrap().remove("hidden_size");
    let e = config_from(v).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");
    let e = config_from(with(base("llama"), json!({"vocab_size": "many"}))).unwrap_err().to_string();
    assert!(e.contains("vocab_size") && e.contains("\"many\""), "{e}");
    let e = config_from(with(base("llama"), json!({"num_key_value_heads": 3}))).unwrap_err().to_string();
    assert!(e.contains("num_key_value_heads (3)"), "{e}");
    let e = config_from(with(base("llama"), json!({"hidden_act": "gelu"}))).unwrap_err().to_string();
    assert!(e.contains("gelu"), "{e}");
    let e = config_from(with(base("llama"), json!({"eos_token_id": [2, "x"]}))).unwrap_err().to_string();
    assert!(e.contains("eos_token_id"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let e = load_config(dir.path()).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": ").unwrap();
    let e = load_config(dir.path()).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");
}

/// Random original weights for every tensor `cfg` expects (plus `extra` names/shapes), in
/// HF naming.
/// (HF name, shape, f32 values) of each tensor.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn random_tensors(cfg: &ModelConfig, seed: u64, extra: &[(&str, Vec<usize>)]) -> Tensors {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let mut add = |name: &str, shape: &Vec<usize>| {
        let n = shape.iter().product();
        // Uniform in [-2, 2), with enough mantissa bits that f16/bf16 rounding is visible.
        out.push((name.to_string(), shape.clone(), (0..n).map(|_| 2.0 * rng.signed()).collect()));
    };
    expected_shapes(cfg).for_each(|name, shape| add(name, shape));
    for (name, shape) in extra {
        add(name, shape);
    }
    out
}

fn encode(dtype: Dtype, data: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => data.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::BF16 => data.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::F64 => data.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect(),
        Dtype::I32 => data.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
        d => panic!("test encodes no {d:?}"),
    }
}

/// The value the loader must return for `x` stored as `dtype`.
fn rounded(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::F16 => half::f16::from_f32(x).to_f32(),
        Dtype::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: Dtype) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, d)| encode(dtype, d)).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

/// Writes `tensors` as `n_shards` files + `model.safetensors.index.json` (round-robin).
fn write_sharded(dir: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: Dtype, n_shards: usize) {
    let mut map = serde_json::Map::new();
    for s in 0..n_shards {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, n_shards);
        let part: Vec<_> = tensors.iter().skip(s).step_by(n_shards).cloned().collect();
        for (n, _, _) in &part {
            map.insert(n.clone(), json!(file));
        }
        write_safetensors(&dir.join(&file), &part, dtype);
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn small_config(family: &str, tied: bool) -> Value {
    with(base(family), json!({"tie_word_embeddings": tied, "head_dim": 8}))
}

fn assert_matches_originals(w: &ipo::model::weights::ModelWeights<ipo::model::weights::HostTensor>, originals: &[(String, Vec<usize>, Vec<f32>)], dtype: Dtype) {
    let by_name: HashMap<&str, (&Vec<usize>, &Vec<f32>)> = originals.iter().map(|(n, s, d)| (n.as_str(), (s, d))).collect();
    let mut count = 0;
    w.for_each(|name, t| {
        let (shape, data) = by_name[name];
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(t.data.len(), data.len(), "{name}");
        for (i, (&got, &orig)) in t.data.iter().zip(data.iter()).enumerate() {
            assert_eq!(got.to_bits(), rounded(dtype, orig).to_bits(), "{name}[{i}] ({dtype:?}): {got} vs {orig}");
        }
        count += 1;
    });
    assert!(count > 10, "visited only {count} tensors");
}

#[test]
fn single_and_sharded_files_load_the_same_weights_in_every_dtype() {
    for (family, tied) in [("qwen2", false), ("qwen3", true), ("llama", false)] {
        for (k, dtype) in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64].into_iter().enumerate() {
            let v = small_config(family, tied);
            let single = tempfile::tempdir().unwrap();
            let sharded = tempfile::tempdir().unwrap();
            write_config(single.path(), &v);
            write_config(sharded.path(), &v);
            let cfg = load_config(single.path()).unwrap();
            let originals = random_tensors(&cfg, 1000 + k as u64, &[]);
            write_safetensors(&single.path().join("model.safetensors"), &originals, dtype);
            write_sharded(sharded.path(), &originals, dtype, 3);

            let a = load_weights(single.path(), &cfg).unwrap();
            let b = load_weights(sharded.path(), &cfg).unwrap();
            assert_matches_originals(&a, &originals, dtype);
            assert_matches_originals(&b, &originals, dtype);
            assert_eq!(a.lm_head.is_none(), tied, "{family}");
            assert_eq!(a.layers.len(), 2);
            assert_eq!(a.layers[1].bq.is_some(), family == "qwen2");
            assert_eq!(a.layers[0].q_norm.is_some(), family == "qwen3");
            if dtype != Dtype::F32 && dtype != Dtype::F64 {
                // The rounding is real: the loaded values differ from the f32 originals.
                let diff = a.embed.data.iter().zip(&originals[0].2).filter(|(x, y)| x != y).count();
                assert!(diff > a.embed.data.len() / 2, "{dtype:?}: only {diff} values rounded");
            }
        }
    }
}

#[test]
fn tied_model_ignores_a_stray_lm_head() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &small_config("llama", true));
    let cfg = load_config(dir.path()).unwrap();
    // Present in the file, even with a nonsense shape: a tied model never reads it.
    let originals = random_tensors(&cfg, 7, &[("lm_head.weight", vec![3, 5]), ("model.rotary_emb.inv_freq", vec![4])]);
    write_safetensors(&dir.path().join("model.safetensors"), &originals, Dtype::BF16);
    let w = load_weights(dir.path(), &cfg).unwrap();
    assert!(w.lm_head.is_none());
    assert_matches_originals(&w, &originals, Dtype::BF16);
}

#[test]
fn tiny_fixture_models_load() {
    for family in ["llama", "qwen2", "qwen3"] {
        let dir = tiny_fixture(family);
        let cfg = load_config(&dir).unwrap();
        let w = load_weights(&dir, &cfg).unwrap();
        assert_eq!(w.layers.len(), cfg.num_layers);
        assert_eq!(w.embed.shape, vec![cfg.vocab_size, cfg.hidden_size]);
        // Random init: not all zeros, all finite.
        assert!(w.embed.data.iter().all(|x| x.is_finite()) && w.embed.data.iter().any(|&x| x != 0.0));
    }
    let llama = load_config(&tiny_fixture("llama")).unwrap();
    assert_eq!(llama.rope_scaling.map(|s| s.factor), Some(8.0), "rope_parameters of the fixture");
}

/// A valid f32 model folder to break in various ways; returns (dir, cfg, originals).
fn valid_model(family: &str) -> (tempfile::TempDir, ModelConfig, Tensors) {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &small_config(family, false));
    let cfg = load_config(dir.path()).unwrap();
    let originals = random_tensors(&cfg, 42, &[]);
    (dir, cfg, originals)
}

fn err_of(dir: &Path, cfg: &ModelConfig) -> String {
    match load_weights(dir, cfg) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_files_are_clear_errors() {
    let (dir, cfg, originals) = valid_model("llama");
    let e = err_of(dir.path(), &cfg);
    assert!(e.contains("no model.safetensors") && e.contains(&dir.path().display().to_string()), "{e}");
    // An index that points at a shard that is not there.
    write_sharded(dir.path(), &originals, Dtype::F32, 2);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = err_of(dir.path(), &cfg);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn truncated_safetensors_names_the_file() {
    let (dir, cfg, originals) = valid_model("qwen2");
    let path = dir.path().join("model.safetensors");
    write_safetensors(&path, &originals, Dtype::BF16);
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() - 1, bytes.len() / 2, 20, 4, 0] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let e = err_of(dir.path(), &cfg);
        assert!(e.contains("model.safetensors") && e.contains("truncated"), "keep {keep}: {e}");
    }
    // A shard truncated in a sharded model names that shard.
    std::fs::remove_file(&path).unwrap();
    write_sharded(dir.path(), &originals, Dtype::F16, 2);
    let shard = dir.path().join("model-00001-of-00002.safetensors");
    let b = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &b[..b.len() - 10]).unwrap();
    let e = err_of(dir.path(), &cfg);
    assert!(e.contains("model-00001-of-00002.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn wrong_shape_names_tensor_and_shapes() {
    let (dir, cfg, mut originals) = valid_model("qwen2");
    let t = originals.iter_mut().find(|(n, _, _)| n == "model.layers.1.self_attn.k_proj.weight").unwrap();
    let expected = t.1.clone(); // [16, 32]
    t.1 = vec![expected[1], expected[0]]; // transposed, same element count
    write_safetensors(&dir.path().join("model.safetensors"), &originals, Dtype::F32);
    let e = err_of(dir.path(), &cfg);
    assert!(e.contains("model.safetensors") && e.contains("model.layers.1.self_attn.k_proj.weight"), "{e}");
    assert!(e.contains("[32, 16]") && e.contains("[16, 32]"), "{e}");
}

#[test]
fn wrong_dtype_names_tensor_and_dtype() {
    let (dir, cfg, originals) = valid_model("llama");
    // Everything f32 except one tensor stored as I32.
    let mut bytes: Vec<Vec<u8>> = Vec::new();
    let mut dtypes = Vec::new();
    for (n, _, d) in &originals {
        let dt = if n == "model.norm.weight" { Dtype::I32 } else { Dtype::F32 };
        bytes.push(encode(dt, d));
        dtypes.push(dt);
    }
    let views: Vec<(String, TensorView)> = originals
        .iter()
        .zip(&bytes)
        .zip(&dtypes)
        .map(|(((n, s, _), b), dt)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let e = err_of(dir.path(), &cfg);
    assert!(e.contains("model.norm.weight") && e.contains("I32") && e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let (dir, cfg, mut originals) = valid_model("qwen3");
    originals.retain(|(n, _, _)| n != "model.layers.0.self_attn.q_norm.weight");
    write_safetensors(&dir.path().join("model.safetensors"), &originals, Dtype::F32);
    let e = err_of(dir.path(), &cfg);
    assert!(e.contains("model.layers.0.self_attn.q_norm.weight") && e.contains("model.safetensors"), "{e}");
    // Untied model without lm_head.
    let (dir, cfg, mut originals) = valid_model("llama");
    originals.retain(|(n, _, _)| n != "lm_head.weight");
    write_sharded(dir.path(), &originals, Dtype::BF16, 2);
    let e = err_of(dir.path(), &cfg);
    assert!(e.contains("lm_head.weight") && e.contains("model.safetensors.index.json"), "{e}");
    // Listed in the index but absent from the shard.
    let (dir, cfg, originals) = valid_model("llama");
    write_sharded(dir.path(), &originals, Dtype::BF16, 2);
    let shard1: Vec<_> = originals.iter().step_by(2).filter(|(n, _, _)| n != "model.embed_tokens.weight").cloned().collect();
    write_safetensors(&dir.path().join("model-00001-of-00002.safetensors"), &shard1, Dtype::BF16);
    let e = err_of(dir.path(), &cfg);
    assert!(e.contains("model.embed_tokens.weight") && e.contains("model-00001-of-00002.safetensors"), "{e}");
}

#[test]
fn malformed_index_is_a_clear_error() {
    let (dir, cfg, _) = valid_model("llama");
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{\"metadata\": {}}").unwrap();
    let e = err_of(dir.path(), &cfg);
    assert!(e.contains("model.safetensors.index.json") && e.contains("weight_map"), "{e}");
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{\"weight_map\": {\"a\": \"../x.safetensors\"}}").unwrap();
    let e = err_of(dir.path(), &cfg);
    assert!(e.contains("not a plain file name"), "{e}");
}


#[test]
fn tokenizer_encodes_decodes_and_resolves_special_tokens() {
    use ipo::model::tokenizer::Tokenizer;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), byte_tokenizer_json().to_string()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"bos_token": {"content": "<|im_start|>", "special": true}, "eos_token": "<|im_end|>"}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.path().join("generation_config.json"), json!({"eos_token_id": [0, 2]}).to_string()).unwrap();
    write_config(dir.path(), &with(base("llama"), json!({"eos_token_id": 2, "bos_token_id": 1})));
    let tok = Tokenizer::from_dir(dir.path()).unwrap();

    assert_eq!(tok.vocab_size(), 258);
    assert_eq!(tok.bos_id(), Some(256), "tokenizer_config's bos_token wins over config.json");
    assert_eq!(tok.eos_ids(), &[0, 2, 257], "generation_config, config.json, tokenizer_config: union in order");
    assert_eq!((tok.bos_token(), tok.eos_token()), (Some("<|im_start|>"), Some("<|im_end|>")));
    assert_eq!(tok.id_to_token(104).as_deref(), Some("h"));
    assert_eq!(tok.id_to_token(32).as_deref(), Some("Ġ"), "byte-level space");
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(257));
    assert_eq!(tok.token_to_id("not a token"), None);

    let text = "héllo wörld, 你好";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>(), "no merges: one token per byte");
    assert_eq!(tok.encode(text, true).unwrap(), ids, "no post-processor: nothing added");
    assert_eq!(tok.decode(&ids, false).unwrap(), text);

    // Special tokens in the text are matched; skip_special drops them on decode.
    let chat = "<|im_start|>hi<|im_end|>";
    let ids = tok.encode(chat, false).unwrap();
    assert_eq!(ids, vec![256, 104, 105, 257]);
    assert_eq!(tok.decode(&ids, false).unwrap(), chat);
    assert_eq!(tok.decode(&ids, true).unwrap(), "hi");

    // Offsets are byte ranges into the text: every token's range covers the bytes it came
    // from (a multi-byte character's tokens all point at that character).
    let text = "ab ñ<|im_end|>z";
    let (ids, offs) = tok.encode_with_offsets(text, false).unwrap();
    assert_eq!(ids.len(), offs.len());
    assert_eq!(ids, vec![97, 98, 32, 0xC3, 0xB1, 257, 122]);
    assert_eq!(offs, vec![(0, 1), (1, 2), (2, 3), (3, 5), (3, 5), (5, 15), (15, 16)]);
    assert_eq!(&text[offs[3].0..offs[3].1], "ñ");
}

#[test]
fn tokenizer_errors_name_the_file() {
    use ipo::model::tokenizer::Tokenizer;
    let dir = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("not found"), "{e}");
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::write(dir.path().join("tokenizer.json"), byte_tokenizer_json().to_string()).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), json!({"eos_token": "</s>"}).to_string()).unwrap();
    let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("\"</s>\""), "{e}");
    std::fs::write(dir.path().join("tokenizer_config.json"), "{").unwrap();
    let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("invalid JSON"), "{e}");
}

/// Sizes from an untrusted config.json are checked before anything is allocated from them: a
/// small folder whose config claims 5,000,000 layers is an error naming the layer count and
/// the tensors the file holds (it used to allocate ~9 GB of shapes and abort), and a head_dim near 2^62
/// is an overflow error, not a panic.
#[test]
fn absurd_config_sizes_are_errors_before_allocation() {
    let (dir, _, originals) = valid_model("llama");
    write_safetensors(&dir.path().join("model.safetensors"), &originals, Dtype::F32);
    write_config(dir.path(), &with(small_config("llama", false), json!({"num_hidden_layers": 5_000_000})));
    let cfg = load_config(dir.path()).unwrap();
    let t0 = std::time::Instant::now();
    let e = err_of(dir.path(), &cfg);
    assert!(e.contains("config.json") && e.contains("num_hidden_layers 5000000") && e.contains("tensors"), "{e}");
    assert!(t0.elapsed().as_secs_f64() < 5.0, "rejected before any allocation from the sizes");

    let e = config_from(with(base("llama"), json!({"head_dim": 1u64 << 62}))).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("overflow") && e.contains("head_dim"), "{e}");
    let e = config_from(with(base("llama"), json!({"vocab_size": u64::MAX / 2}))).unwrap_err().to_string();
    assert!(e.contains("overflow"), "{e}");
}
