//! GGUF -> Hugging Face model folder: tensor names, the Q/K row un-permutation that undoes
//! llama.cpp's converter, `config.json`, `generation_config.json`, and a streaming f32
//! `model.safetensors` writer. The folder is written beside OUT_DIR and renamed into place.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};

use super::reader::{GgufFile, TensorInfo};
use super::{tokenizer, GgufError};

/// HF name of a llama.cpp tensor name, or None for tensors HF has no place for
/// (e.g. `rope_freqs.weight`).
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match base {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undo llama.cpp's `permute` of Q/K projection rows. `data` is row-major [rows, cols] with
/// rows = n_head * head_dim. llama.cpp stored, per head, row (j, i) of a [head_dim/2, 2]
/// view at the place HF has row (i, j) of a [2, head_dim/2] view; we move it back so that
/// the two rotate-half halves are contiguous again.
pub fn unpermute_rows(data: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(data.len(), rows * cols);
    assert!(n_head > 0 && rows.is_multiple_of(2 * n_head), "rows {rows} not divisible by 2*n_head {n_head}");
    let half = rows / n_head / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let dst = h * 2 * half + i * half + j; // HF   [n_head, 2, half]
                let src = h * 2 * half + j * 2 + i; //    GGUF [n_head, half, 2]
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The model architecture facts read from `{arch}.*` metadata.
#[derive(Clone, Debug)]
pub(crate) struct ArchInfo {
    pub arch: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub hidden: usize,
    pub head_dim: usize,
}

impl ArchInfo {
    pub fn read(g: &GgufFile) -> Result<ArchInfo, GgufError> {
        let arch = g.require_str("general.architecture")?.to_string();
        if !matches!(arch.as_str(), "llama" | "qwen2" | "qwen3") {
            return Err(GgufError::Format {
                path: g.path.clone(),
                reason: format!("general.architecture = '{arch}' is not supported (expected llama, qwen2 or qwen3)"),
            });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let n_head = g.require_u64(&k("attention.head_count"))? as usize;
        let n_head_kv = match g.get(&k("attention.head_count_kv")) {
            Some(v) => v.as_u64().ok_or_else(|| g.wrong_type(&k("attention.head_count_kv"), "an unsigned integer", v))? as usize,
            None => n_head,
        };
        let hidden = g.require_u64(&k("embedding_length"))? as usize;
        let head_dim = match g.get(&k("attention.key_length")).and_then(|v| v.as_u64()) {
            Some(d) => d as usize,
            None => hidden / n_head.max(1),
        };
        let n_layer = g.require_u64(&k("block_count"))? as usize;
        if n_head == 0 || n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) || !head_dim.is_multiple_of(2) {
            return Err(GgufError::Format {
                path: g.path.clone(),
                reason: format!("head counts {n_head}/{n_head_kv} with head_dim {head_dim}: expected n_head divisible by n_head_kv and an even head_dim"),
            });
        }
        Ok(ArchInfo { arch, n_layer, n_head, n_head_kv, hidden, head_dim })
    }
}

/// HF `config.json` for the GGUF's architecture and hyper-parameters.
pub(crate) fn hf_config(g: &GgufFile, a: &ArchInfo) -> Result<Json, GgufError> {
    let k = |s: &str| format!("{}.{s}", a.arch);
    let f = |key: &str, default: f64| g.get(key).and_then(|v| v.as_f64()).unwrap_or(default);
    let vocab = match g.get(&k("vocab_size")).and_then(|v| v.as_u64()) {
        Some(v) => v as usize,
        None => match g.tensor("token_embd.weight") {
            Some(t) => t.shape()[0],
            None => g.require("tokenizer.ggml.tokens")?.as_array().map(|a| a.len()).unwrap_or(0),
        },
    };
    let (arch_name, model_type) = match a.arch.as_str() {
        "llama" => ("LlamaForCausalLM", "llama"),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        _ => ("Qwen3ForCausalLM", "qwen3"),
    };
    let tied = g.tensor("output.weight").is_none();
    let id = |key: &str| g.get(key).and_then(|v| v.as_u64());
    // eps and theta are stored as f32: print the f32's shortest decimal (1e-5, not 9.99e-6).
    let f32_to_json = |x: f64| -> Json {
        json!(format!("{}", x as f32).parse::<f64>().unwrap_or(x))
    };
    let mut cfg = json!({
        "architectures": [arch_name],
        "model_type": model_type,
        "hidden_size": a.hidden,
        "intermediate_size": g.require_u64(&k("feed_forward_length"))?,
        "num_hidden_layers": a.n_layer,
        "num_attention_heads": a.n_head,
        "num_key_value_heads": a.n_head_kv,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": f32_to_json(f(&k("attention.layer_norm_rms_epsilon"), 1e-6)),
        "rope_theta": f32_to_json(f(&k("rope.freq_base"), 10000.0)),
        "max_position_embeddings": g.get(&k("context_length")).and_then(|v| v.as_u64()).unwrap_or(4096),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "attention_bias": g.tensor("blk.0.attn_q.bias").is_some(),
        "mlp_bias": false,
        "bos_token_id": id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": id("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
        "use_cache": true,
    });
    if let Some(p) = id("tokenizer.ggml.padding_token_id") {
        cfg["pad_token_id"] = json!(p);
    }
    if a.arch == "qwen2" {
        // HF's Qwen2 config has no attention_bias flag: q/k/v bias is implied.
        cfg.as_object_mut().unwrap().remove("attention_bias");
        cfg["use_sliding_window"] = json!(false);
    }
    Ok(cfg)
}

/// What one import produced.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    pub n_tensors: usize,
    pub n_params: usize,
    /// GGUF tensors with no HF counterpart that were left out.
    pub skipped: Vec<String>,
}

/// Convert `input` (GGUF) into the HF folder `out_dir`, built in a temp dir beside it and
/// renamed into place. `overwrite` replaces an existing `out_dir`. `on_tensor(i, n, name)`
/// is called before each tensor (for a progress bar).
pub fn import_gguf(
    input: &Path,
    out_dir: &Path,
    overwrite: bool,
    mut on_tensor: impl FnMut(usize, usize, &str),
) -> Result<ImportSummary, GgufError> {
    let g = GgufFile::open(input)?;
    let a = ArchInfo::read(&g)?;
    if out_dir.exists() && !overwrite {
        return Err(GgufError::Output { path: out_dir.to_path_buf(), reason: "already exists (pass --force to replace it)".into() });
    }
    let config = hf_config(&g, &a)?;
    let tok = tokenizer::hf_tokenizer_files(&g)?;

    // The tensors HF keeps, in GGUF order.
    let mut plan: Vec<(&TensorInfo, String)> = Vec::new();
    let mut skipped = Vec::new();
    let mut by_hf_name = std::collections::HashMap::new();
    for t in &g.tensors {
        match hf_tensor_name(&t.name) {
            Some(n) => {
                // "blk.1.x" and "blk.01.x" are one HF tensor: a folder with it twice cannot load.
                if let Some(first) = by_hf_name.insert(n.clone(), &t.name) {
                    return Err(GgufError::BadTensor {
                        path: g.path.clone(),
                        tensor: t.name.clone(),
                        reason: format!("maps to {n}, as tensor '{first}' does"),
                    });
                }
                plan.push((t, n))
            }
            None => skipped.push(t.name.clone()),
        }
    }
    if !plan.iter().any(|(_, n)| n == "model.embed_tokens.weight") {
        return Err(GgufError::Format { path: g.path.clone(), reason: "no tensor 'token_embd.weight'".into() });
    }

    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let out_err = |path: &Path, e: std::io::Error| GgufError::Output { path: path.to_path_buf(), reason: e.to_string() };
    std::fs::create_dir_all(&parent).map_err(|e| out_err(&parent, e))?;
    let name = out_dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    crate::io::stale::remove_stale(&parent, &|n| n == name);
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| out_err(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| out_err(&tmp, e))?;
    let guard = TempDirGuard(Some(tmp.clone()));
    let n_params = (|| {
        let write_json = |file: &str, v: &Json| -> Result<(), GgufError> {
            let p = tmp.join(file);
            let s = serde_json::to_string_pretty(v).expect("json");
            std::fs::write(&p, s + "\n").map_err(|e| out_err(&p, e))
        };
        write_json("config.json", &config)?;
        let mut gen = json!({ "do_sample": false });
        for (key, field) in [("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id"), ("tokenizer.ggml.padding_token_id", "pad_token_id")] {
            if let Some(v) = g.get(key).and_then(|v| v.as_u64()) {
                gen[field] = json!(v);
            }
        }
        write_json("generation_config.json", &gen)?;
        write_json("tokenizer.json", &tok.tokenizer)?;
        write_json("tokenizer_config.json", &tok.tokenizer_config)?;
        write_json("special_tokens_map.json", &tok.special_tokens_map)?;
        write_safetensors(&g, &a, &plan, &tmp.join("model.safetensors"), &mut on_tensor)
    })()?;
    if out_dir.exists() {
        std::fs::remove_dir_all(out_dir).map_err(|e| out_err(out_dir, e))?;
    }
    std::fs::rename(&tmp, out_dir).map_err(|e| out_err(out_dir, e))?;
    guard.commit();
    Ok(ImportSummary { out_dir: out_dir.to_path_buf(), n_tensors: plan.len(), n_params, skipped })
}

/// Removes the temp folder on drop (an error return or a panic) unless committed.
struct TempDirGuard(Option<PathBuf>);

impl TempDirGuard {
    /// The folder was renamed into place: keep it.
    fn commit(mut self) {
        self.0 = None;
    }
}

impl Drop for TempDirGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Stream every planned tensor, dequantized to f32 (Q/K un-permuted for llama), into a
/// safetensors file. The header is known up front (shapes only), so no tensor is held
/// longer than it takes to write it.
fn write_safetensors(
    g: &GgufFile,
    a: &ArchInfo,
    plan: &[(&TensorInfo, String)],
    path: &Path,
    on_tensor: &mut impl FnMut(usize, usize, &str),
) -> Result<usize, GgufError> {
    let out_err = |e: std::io::Error| GgufError::Output { path: path.to_path_buf(), reason: e.to_string() };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (t, name) in plan {
        let n = t.n_elements() * 4;
        header.insert(name.clone(), json!({ "dtype": "F32", "shape": t.shape(), "data_offsets": [offset, offset + n] }));
        offset += n;
    }
    let mut h = serde_json::to_string(&Json::Object(header)).expect("json").into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let file = std::fs::File::create(path).map_err(out_err)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(out_err)?;
    w.write_all(&h).map_err(out_err)?;
    let mut n_params = 0;
    for (i, (t, name)) in plan.iter().enumerate() {
        on_tensor(i, plan.len(), name);
        let mut data = g.tensor_f32(t)?; // [shape()] f32, row-major
        let shape = t.shape();
        // llama.cpp permutes Q/K (weights and biases) only for the llama architecture.
        let heads = if a.arch == "llama" {
            if t.name.ends_with(".attn_q.weight") || t.name.ends_with(".attn_q.bias") {
                Some(a.n_head)
            } else if t.name.ends_with(".attn_k.weight") || t.name.ends_with(".attn_k.bias") {
                Some(a.n_head_kv)
            } else {
                None
            }
        } else {
            None
        };
        if let Some(nh) = heads {
            let rows = shape[0];
            let cols = data.len() / rows.max(1);
            if rows != nh * a.head_dim {
                return Err(GgufError::BadTensor {
                    path: g.path.clone(),
                    tensor: t.name.clone(),
                    reason: format!("{rows} rows, expected {nh} heads x head_dim {} = {}", a.head_dim, nh * a.head_dim),
                });
            }
            data = unpermute_rows(&data, nh, rows, cols);
        }
        n_params += data.len();
        // f32 little-endian bytes.
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.write_all(&bytes).map_err(out_err)?;
    }
    w.flush().map_err(out_err)?;
    w.into_inner().map_err(|e| out_err(e.into_error()))?.sync_all().map_err(out_err)?;
    Ok(n_params)
}
