//! Loading a Hugging Face model folder: `config.json` -> `ModelConfig`, and safetensors
//! (single `model.safetensors` or sharded via `model.safetensors.index.json`) ->
//! `ModelWeights<HostTensor>` in f32. Files are mmap'd; each tensor is converted straight from
//! the mapping into its f32 buffer (one copy), tensors and chunks in parallel (rayon).
//! Every expected tensor is checked for presence, dtype and exact shape against the config,
//! and every error names the file and tensor at fault.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::config::{Family, Llama3Scaling, ModelConfig};
use super::weights::{HostTensor, LayerWeights, ModelWeights};

/// Why a model folder could not be loaded. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: invalid JSON: {err}")]
    Json { path: PathBuf, err: serde_json::Error },
    /// A field of `config.json` is missing, has the wrong type, or names something unsupported.
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// The folder has neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    /// The safetensors header is malformed or the file is shorter than its header says.
    #[error("{path}: invalid or truncated safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?} from config.json")]
    Shape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: tensor `{name}` has dtype {dtype}, expected F32, F16, BF16 or F64")]
    Dtype { path: PathBuf, name: String, dtype: String },
}

fn cfg_err(path: &Path, msg: impl Into<String>) -> LoadError {
    LoadError::Config { path: path.to_path_buf(), msg: msg.into() }
}

fn read_json(path: &Path) -> Result<Value, LoadError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| LoadError::Io { path: path.to_path_buf(), err })?;
    serde_json::from_str(&text).map_err(|err| LoadError::Json { path: path.to_path_buf(), err })
}

/// Typed access to the fields of one JSON object, with errors that name the file and field.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a serde_json::Map<String, Value>,
}

impl Fields<'_> {
    /// The field, treating JSON `null` as absent (HF writes `"head_dim": null`).
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                cfg_err(self.path, format!("field `{key}` must be a non-negative integer, found {v}"))
            }),
        }
    }
    fn usize_req(&self, key: &str) -> Result<usize, LoadError> {
        let n = self
            .usize_opt(key)?
            .ok_or_else(|| cfg_err(self.path, format!("missing field `{key}`")))?;
        if n == 0 {
            return Err(cfg_err(self.path, format!("field `{key}` must be > 0")));
        }
        Ok(n)
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                cfg_err(self.path, format!("field `{key}` must be a number, found {v}"))
            }),
        }
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                cfg_err(self.path, format!("field `{key}` must be true or false, found {v}"))
            }),
        }
    }
    fn str_opt(&self, key: &str) -> Result<Option<&str>, LoadError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                cfg_err(self.path, format!("field `{key}` must be a string, found {v}"))
            }),
        }
    }
    /// A token id field that HF allows to be an int or a list of ints (`eos_token_id`).
    fn ids(&self, key: &str) -> Result<Option<Vec<u32>>, LoadError> {
        let bad = |v: &Value| cfg_err(self.path, format!("field `{key}` must be a token id or a list of token ids, found {v}"));
        let one = |v: &Value| v.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| n as u32).ok_or_else(|| bad(v));
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a.iter().map(one).collect::<Result<Vec<_>, _>>().map(Some),
            Some(v) => one(v).map(|id| Some(vec![id])),
        }
    }
}

/// Reads `dir/config.json` into a `ModelConfig`, applying the per-family defaults of
/// transformers 5 (e.g. Qwen3's `head_dim` defaults to 128, Llama's to hidden / heads).
pub fn load_config(dir: &Path) -> Result<ModelConfig, LoadError> {
    load_config_file(&dir.join("config.json"))
}

/// `load_config` of a `config.json` given by its own path.
pub fn load_config_file(path: &Path) -> Result<ModelConfig, LoadError> {
    let path = path.to_path_buf();
    let json = read_json(&path)?;
    let obj = json
        .as_object()
        .ok_or_else(|| cfg_err(&path, "expected a JSON object at the top level"))?;
    parse_config(&path, obj)
}

/// Parses a `config.json` object; `path` is only used in error messages.
pub(crate) fn parse_config(path: &Path, obj: &serde_json::Map<String, Value>) -> Result<ModelConfig, LoadError> {
    let f = Fields { path, obj };
    let model_type = f.str_opt("model_type")?.ok_or_else(|| cfg_err(path, "missing field `model_type`"))?;
    let family = match model_type {
        // Mistral is a Llama with an optional sliding window (checked below).
        "llama" | "mistral" => Family::Llama,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        other => {
            return Err(cfg_err(
                path,
                format!("unsupported model_type \"{other}\" (supported: llama, mistral, qwen2, qwen3)"),
            ))
        }
    };

    let vocab_size = f.usize_req("vocab_size")?;
    let hidden_size = f.usize_req("hidden_size")?;
    let intermediate_size = f.usize_req("intermediate_size")?;
    let num_layers = f.usize_req("num_hidden_layers")?;
    let num_heads = f.usize_req("num_attention_heads")?;
    // HF: Llama/Qwen2/Qwen3 all fall back to num_attention_heads when null/absent.
    let num_kv_heads = f.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(cfg_err(
            path,
            format!("num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"),
        ));
    }
    let head_dim = match (f.usize_opt("head_dim")?, family) {
        (Some(d), _) => d,
        // Qwen3Config declares `head_dim: int = 128`.
        (None, Family::Qwen3) => 128,
        (None, _) => {
            if hidden_size % num_heads != 0 {
                return Err(cfg_err(
                    path,
                    format!("hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads}) and head_dim is not given"),
                ));
            }
            hidden_size / num_heads
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(cfg_err(path, format!("head_dim must be even and > 0 for RoPE, found {head_dim}")));
    }

    if let Some(act) = f.str_opt("hidden_act")? {
        if act != "silu" {
            return Err(cfg_err(path, format!("unsupported hidden_act \"{act}\" (only silu)")));
        }
    }
    if f.bool_opt("mlp_bias")?.unwrap_or(false) {
        return Err(cfg_err(path, "mlp_bias = true is not supported"));
    }
    // Qwen2 always has q/k/v biases (its config has no switch). For Llama/Qwen3
    // `attention_bias` would also add an o_proj bias, which the weight set does not hold.
    let qkv_bias = family == Family::Qwen2;
    if family != Family::Qwen2 && f.bool_opt("attention_bias")?.unwrap_or(false) {
        return Err(cfg_err(path, format!("attention_bias = true is not supported for model_type \"{model_type}\"")));
    }

    let max_position_embeddings = f
        .usize_opt("max_position_embeddings")?
        .unwrap_or(if family == Family::Llama { 2048 } else { 32768 });
    // Sliding-window attention is not implemented: accept it only where it can never bind.
    let sliding = match family {
        Family::Llama => f.usize_opt("sliding_window")?,
        _ if f.bool_opt("use_sliding_window")?.unwrap_or(false) => f.usize_opt("sliding_window")?.or(Some(4096)),
        _ => None,
    };
    if let Some(w) = sliding {
        if w < max_position_embeddings {
            return Err(cfg_err(
                path,
                format!("sliding_window ({w}) < max_position_embeddings ({max_position_embeddings}): sliding-window attention is not supported"),
            ));
        }
    }

    // RoPE: transformers gives `rope_scaling` priority over `rope_parameters` (the v5 name),
    // and a `rope_theta` inside the dict priority over the top-level one (default 10000).
    let rope = f.get("rope_scaling").or_else(|| f.get("rope_parameters"));
    let rope = match rope {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(v) => return Err(cfg_err(path, format!("field `rope_scaling` must be an object or null, found {v}"))),
    };
    let mut rope_theta = f.f64_opt("rope_theta")?.unwrap_or(10000.0);
    let mut rope_scaling = None;
    if let Some(m) = rope {
        let r = Fields { path, obj: m };
        if let Some(t) = r.f64_opt("rope_theta")? {
            rope_theta = t;
        }
        if let Some(p) = r.f64_opt("partial_rotary_factor")? {
            if p != 1.0 {
                return Err(cfg_err(path, format!("partial_rotary_factor = {p} is not supported")));
            }
        }
        let kind = r.str_opt("rope_type")?.or(r.str_opt("type")?).unwrap_or("default");
        match kind {
            "default" => {}
            "llama3" => {
                let num = |k: &str| r.f64_opt(k)?.ok_or_else(|| cfg_err(path, format!("rope_scaling (llama3): missing field `{k}`")));
                let s = Llama3Scaling {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: r.usize_opt("original_max_position_embeddings")?.ok_or_else(
                        || cfg_err(path, "rope_scaling (llama3): missing field `original_max_position_embeddings`"),
                    )?,
                };
                if s.factor.is_nan() || s.factor <= 0.0 || s.high_freq_factor.is_nan() || s.high_freq_factor <= s.low_freq_factor {
                    return Err(cfg_err(path, format!("rope_scaling (llama3): need factor > 0 and high_freq_factor > low_freq_factor, found {s:?}")));
                }
                rope_scaling = Some(s);
            }
            other => {
                return Err(cfg_err(
                    path,
                    format!("unsupported rope_scaling type \"{other}\" (supported: default, llama3)"),
                ))
            }
        }
    }
    if rope_theta.is_nan() || rope_theta <= 0.0 {
        return Err(cfg_err(path, format!("rope_theta must be > 0, found {rope_theta}")));
    }

    // transformers defaults: Llama bos 1 / eos 2; Qwen2/Qwen3 none.
    let (def_bos, def_eos) = match family {
        Family::Llama => (Some(1), vec![2]),
        _ => (None, vec![]),
    };
    let bos_token_id = match f.ids("bos_token_id")? {
        Some(v) if v.len() == 1 => Some(v[0]),
        Some(v) => return Err(cfg_err(path, format!("field `bos_token_id` must be one token id, found {v:?}"))),
        None if obj.contains_key("bos_token_id") => None, // explicit null
        None => def_bos,
    };
    let eos_token_ids = match f.ids("eos_token_id")? {
        Some(v) => v,
        None if obj.contains_key("eos_token_id") => vec![],
        None => def_eos,
    };

    let cfg = ModelConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_theta,
        rope_scaling,
        rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
        max_position_embeddings,
        // All three families default to untied in transformers (SmolLM2 etc. set it to true).
        tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias,
        qk_norm: family == Family::Qwen3,
        bos_token_id,
        eos_token_ids,
    };
    if cfg.param_count().is_none() {
        return Err(cfg_err(
            path,
            format!(
                "the sizes overflow: num_hidden_layers {}, hidden_size {}, intermediate_size {}, num_attention_heads {} x head_dim {}, vocab_size {} imply more than 2^64 parameters",
                cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim, cfg.vocab_size
            ),
        ));
    }
    Ok(cfg)
}

/// The full parameter set the config implies, each as a shape (HF `[out, in]` for matrices).
/// `lm_head` is `None` for tied models.
pub fn expected_shapes(cfg: &ModelConfig) -> ModelWeights<Vec<usize>> {
    let (h, q, kv, ff, d) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size, cfg.head_dim);
    let layer = LayerWeights {
        attn_norm: vec![h],
        wq: vec![q, h],
        wk: vec![kv, h],
        wv: vec![kv, h],
        wo: vec![h, q],
        bq: cfg.qkv_bias.then(|| vec![q]),
        bk: cfg.qkv_bias.then(|| vec![kv]),
        bv: cfg.qkv_bias.then(|| vec![kv]),
        q_norm: cfg.qk_norm.then(|| vec![d]),
        k_norm: cfg.qk_norm.then(|| vec![d]),
        mlp_norm: vec![h],
        w_gate: vec![ff, h],
        w_up: vec![ff, h],
        w_down: vec![h, ff],
    };
    ModelWeights {
        embed: vec![cfg.vocab_size, h],
        layers: vec![layer; cfg.num_layers],
        final_norm: vec![h],
        lm_head: (!cfg.tie_word_embeddings).then(|| vec![cfg.vocab_size, h]),
    }
}

/// One mmap'd safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

fn open_shard(path: PathBuf) -> Result<Shard, LoadError> {
    let file = File::open(&path).map_err(|err| LoadError::Io { path: path.clone(), err })?;
    // SAFETY: the mapping is read-only; a model file changed underneath us while loading is
    // outside what we support (the same assumption safetensors/candle make).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|err| LoadError::Io { path: path.clone(), err })?;
    Ok(Shard { path, mmap })
}

/// Tensors named in a safetensors file's JSON header, or `None` when the header cannot be read.
fn header_tensor_count(path: &Path) -> Option<usize> {
    use std::io::Read;
    let mut f = File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > f.metadata().ok()?.len().saturating_sub(8) || len > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    let v: Value = serde_json::from_slice(&header).ok()?;
    Some(v.as_object()?.keys().filter(|k| *k != "__metadata__").count())
}

/// Reads the model's safetensors into f32 host tensors, checked against `cfg`.
pub fn load_weights(dir: &Path, cfg: &ModelConfig) -> Result<ModelWeights<HostTensor>, LoadError> {
    // Which file holds each tensor: `None` = the single `model.safetensors`, which wins over an
    // index when both are present (as in transformers).
    let index_path = dir.join("model.safetensors.index.json");
    let single_path = dir.join("model.safetensors");
    let (files, weight_map): (Vec<PathBuf>, Option<HashMap<String, usize>>) = if single_path.exists() {
        (vec![single_path], None)
    } else if index_path.exists() {
        let idx = read_json(&index_path)?;
        let map = idx
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| cfg_err(&index_path, "missing object field `weight_map`"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        let mut by_name = HashMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| cfg_err(&index_path, format!("weight_map[\"{name}\"] must be a file name, found {file}")))?;
            if Path::new(file).components().count() != 1 || file == ".." {
                return Err(cfg_err(&index_path, format!("weight_map[\"{name}\"] = \"{file}\" is not a plain file name")));
            }
            let p = dir.join(file);
            let i = match files.iter().position(|f| *f == p) {
                Some(i) => i,
                None => {
                    files.push(p);
                    files.len() - 1
                }
            };
            by_name.insert(name.clone(), i);
        }
        (files, Some(by_name))
    } else {
        return Err(LoadError::NoWeights { dir: dir.to_path_buf() });
    };

    // Before anything is allocated per layer: the weights must hold the layers the config
    // claims, at least 9 tensors each (norms, q/k/v/o, gate/up/down). Counted from the index,
    // or from the single file's header when it parses (a broken file is reported below).
    let tensors = match &weight_map {
        Some(m) => Some(m.len()),
        None => header_tensor_count(&files[0]),
    };
    if let Some(n) = tensors {
        if cfg.num_layers.saturating_mul(9) > n {
            return Err(cfg_err(
                &dir.join("config.json"),
                format!("num_hidden_layers {} needs at least {} tensors, but the weights hold {n}", cfg.num_layers, cfg.num_layers.saturating_mul(9)),
            ));
        }
    }

    // Only the shards that hold an expected tensor are opened.
    let shapes = expected_shapes(cfg);
    let mut wanted: Vec<(String, Vec<usize>)> = Vec::new();
    shapes.for_each(|name, shape| wanted.push((name.to_string(), shape.clone())));
    let mut which = Vec::with_capacity(wanted.len()); // [n_tensors] shard index
    for (name, _) in &wanted {
        match &weight_map {
            None => which.push(0),
            Some(m) => match m.get(name) {
                Some(&i) => which.push(i),
                None => return Err(LoadError::MissingTensor { path: index_path.clone(), name: name.clone() }),
            },
        }
    }
    let mut needed: Vec<usize> = which.clone();
    needed.sort_unstable();
    needed.dedup();
    let shards: Vec<Option<Shard>> = {
        let mut v: Vec<Option<Shard>> = (0..files.len()).map(|_| None).collect();
        for &i in &needed {
            v[i] = Some(open_shard(files[i].clone())?);
        }
        v
    };
    let headers: Vec<Option<SafeTensors>> = shards
        .iter()
        .map(|s| {
            s.as_ref()
                .map(|s| {
                    SafeTensors::deserialize(&s.mmap)
                        .map_err(|e| LoadError::Safetensors { path: s.path.clone(), msg: e.to_string() })
                })
                .transpose()
        })
        .collect::<Result<_, _>>()?;

    // Check every tensor before converting any, so a bad file fails fast.
    let mut views = Vec::with_capacity(wanted.len());
    for ((name, shape), &i) in wanted.iter().zip(&which) {
        let (st, path) = (headers[i].as_ref().expect("opened above"), &files[i]);
        let view = st
            .tensor(name)
            .map_err(|_| LoadError::MissingTensor { path: path.clone(), name: name.clone() })?;
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
            return Err(LoadError::Dtype { path: path.clone(), name: name.clone(), dtype: format!("{:?}", view.dtype()) });
        }
        if view.shape() != shape.as_slice() {
            return Err(LoadError::Shape {
                path: path.clone(),
                name: name.clone(),
                expected: shape.clone(),
                found: view.shape().to_vec(),
            });
        }
        views.push(view);
    }

    let converted: Vec<(String, HostTensor)> = wanted
        .par_iter()
        .zip(views.par_iter())
        .map(|((name, shape), view)| {
            let data = to_f32(view.dtype(), view.data());
            (name.clone(), HostTensor { shape: shape.clone(), data })
        })
        .collect();
    let mut by_name: HashMap<String, HostTensor> = converted.into_iter().collect();

    let mut out = shapes.map(|s| HostTensor { shape: s.clone(), data: Vec::new() });
    out.for_each_mut(|name, t| {
        *t = by_name.remove(name).expect("every expected tensor was converted");
    });
    Ok(out)
}

/// Converts little-endian `bytes` of `dtype` into f32, in parallel chunks.
/// `bytes.len()` is a multiple of the element size (safetensors checked it against the shape).
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    const CHUNK: usize = 1 << 16; // elements per parallel task
    let size = dtype.bitsize() / 8;
    let n = bytes.len() / size;
    let mut out = vec![0f32; n]; // [numel] f32
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dst)| {
        let src = &bytes[c * CHUNK * size..(c * CHUNK + dst.len()) * size];
        match dtype {
            Dtype::F32 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
            Dtype::BF16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
                }
            }
            Dtype::F16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = half::f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
                }
            }
            Dtype::F64 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(8)) {
                    *d = f64::from_le_bytes(s.try_into().expect("8 bytes")) as f32;
                }
            }
            _ => unreachable!("dtype checked by load_weights"),
        }
    });
    out
}
