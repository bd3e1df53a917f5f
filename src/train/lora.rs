//! LoRA without touching the transformer. The forward is linear in each weight matrix, so the
//! model runs with merged weights `W = W0 + s * B @ A` (`s = alpha / r`), `backward` gives the
//! full `dW`, and the chain rule projects it onto the adapters:
//!     dB = s * dW @ A^T        dA = s * B^T @ dW
//! Init as PEFT: A ~ kaiming-uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the
//! adapted model starts equal to the base. Saved as a PEFT-compatible
//! `adapter_model.safetensors` + `adapter_config.json`.

use std::path::Path;

use serde_json::json;

use super::data::SplitMix64;
use super::st::{read_f32_tensors, write_f32_safetensors};
use super::TrainError;
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::model::config::ModelConfig;
use crate::model::weights::{HostTensor, LayerWeights, ModelWeights};

/// A projection LoRA can adapt (`--lora-targets q,k,v,o,gate,up,down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim() {
            "q" | "q_proj" => Self::Q,
            "k" | "k_proj" => Self::K,
            "v" | "v_proj" => Self::V,
            "o" | "o_proj" => Self::O,
            "gate" | "gate_proj" => Self::Gate,
            "up" | "up_proj" => Self::Up,
            "down" | "down_proj" => Self::Down,
            _ => return None,
        })
    }
    /// The HF module path inside a decoder layer.
    pub fn module(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }
    /// (out_features, in_features) of the adapted matrix.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        match self {
            Self::Q => (c.q_dim(), c.hidden_size),
            Self::K | Self::V => (c.kv_dim(), c.hidden_size),
            Self::O => (c.hidden_size, c.q_dim()),
            Self::Gate | Self::Up => (c.intermediate_size, c.hidden_size),
            Self::Down => (c.hidden_size, c.intermediate_size),
        }
    }
    pub fn get<T>(self, l: &LayerWeights<T>) -> &T {
        match self {
            Self::Q => &l.wq,
            Self::K => &l.wk,
            Self::V => &l.wv,
            Self::O => &l.wo,
            Self::Gate => &l.w_gate,
            Self::Up => &l.w_up,
            Self::Down => &l.w_down,
        }
    }
    pub fn get_mut<T>(self, l: &mut LayerWeights<T>) -> &mut T {
        match self {
            Self::Q => &mut l.wq,
            Self::K => &mut l.wk,
            Self::V => &mut l.wv,
            Self::O => &mut l.wo,
            Self::Gate => &mut l.w_gate,
            Self::Up => &mut l.w_up,
            Self::Down => &mut l.w_down,
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One adapted matrix: `W = W0 + s * B @ A`.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    pub layer: usize,
    pub target: LoraTarget,
    pub out: usize,
    pub inp: usize,
    pub a: Vec<f32>, // [r, in]
    pub b: Vec<f32>, // [out, r]
}

impl Adapter {
    /// PEFT tensor name prefix, e.g. `base_model.model.model.layers.0.self_attn.q_proj`.
    pub fn peft_prefix(&self) -> String {
        format!("base_model.model.model.layers.{}.{}", self.layer, self.target.module())
    }
}

/// All adapters of a model plus the frozen base matrices they add to.
pub struct Lora {
    pub cfg: LoraConfig,
    pub adapters: Vec<Adapter>,
    base: Vec<Vec<f32>>, // [adapter][out * in] frozen W0
}

fn mm(a: &[f32], ta: bool, b: &[f32], tb: bool, m: usize, n: usize, k: usize, scale: f32) -> Vec<f32> {
    let be = CpuBackend::<f32>::new();
    let mut c = vec![0f32; m * n];
    be.matmul(&a.to_vec(), ta, &b.to_vec(), tb, &mut c, m, n, k, false);
    c.iter_mut().for_each(|x| *x *= scale);
    c
}

impl Lora {
    /// PEFT's default init (A kaiming-uniform, B = 0), seeded.
    pub fn init(cfg: LoraConfig, mc: &ModelConfig, base: &ModelWeights<HostTensor>, seed: u64) -> Result<Self, TrainError> {
        if cfg.rank == 0 {
            return Err(TrainError::Config("--lora-rank must be > 0".into()));
        }
        if cfg.targets.is_empty() {
            return Err(TrainError::Config("--lora-targets is empty".into()));
        }
        let mut rng = SplitMix64(seed ^ 0x4C6F_5241);
        let mut adapters = Vec::new();
        for layer in 0..mc.num_layers {
            for &target in &cfg.targets {
                let (out, inp) = target.dims(mc);
                let bound = 1.0 / (inp as f64).sqrt();
                let a = (0..cfg.rank * inp).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect();
                adapters.push(Adapter { layer, target, out, inp, a, b: vec![0f32; out * cfg.rank] });
            }
        }
        Self::with_adapters(cfg, adapters, base)
    }

    /// Adapters given explicitly (loaded from a checkpoint, or fixed in a test).
    pub fn with_adapters(cfg: LoraConfig, adapters: Vec<Adapter>, base: &ModelWeights<HostTensor>) -> Result<Self, TrainError> {
        let r = cfg.rank;
        let mut base_m = Vec::new();
        for ad in &adapters {
            let w = ad.target.get(&base.layers[ad.layer]);
            if w.shape != [ad.out, ad.inp] || ad.a.len() != r * ad.inp || ad.b.len() != ad.out * r {
                return Err(TrainError::Config(format!(
                    "LoRA adapter {}: base {:?}, A {} values, B {} values do not fit rank {r}",
                    ad.peft_prefix(), w.shape, ad.a.len(), ad.b.len()
                )));
            }
            base_m.push(w.data.clone());
        }
        Ok(Self { cfg, adapters, base: base_m })
    }

    /// The merged matrix `W0 + s * B @ A` of adapter `i` `[out, in]`.
    pub fn merged(&self, i: usize) -> Vec<f32> {
        let ad = &self.adapters[i];
        let delta = mm(&ad.b, false, &ad.a, false, ad.out, ad.inp, self.cfg.rank, self.cfg.scale() as f32);
        self.base[i].iter().zip(&delta).map(|(w, d)| w + d).collect()
    }

    /// (dA `[r, in]`, dB `[out, r]`) of adapter `i` from the full gradient dW `[out, in]`.
    pub fn project(&self, i: usize, dw: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let ad = &self.adapters[i];
        let (r, s) = (self.cfg.rank, self.cfg.scale() as f32);
        let da = mm(&ad.b, true, dw, false, r, ad.inp, ad.out, s);
        let db = mm(dw, false, &ad.a, true, ad.out, r, ad.inp, s);
        (da, db)
    }

    /// Base weights with every adapter merged in (for `--merge`).
    pub fn merge_into(&self, base: &ModelWeights<HostTensor>) -> ModelWeights<HostTensor> {
        let mut out = base.clone();
        for (i, ad) in self.adapters.iter().enumerate() {
            ad.target.get_mut(&mut out.layers[ad.layer]).data = self.merged(i);
        }
        out
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` (PEFT layout) into `dir`.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<(), TrainError> {
        let r = self.cfg.rank;
        let mut tensors = Vec::new();
        for ad in &self.adapters {
            let p = ad.peft_prefix();
            tensors.push((format!("{p}.lora_A.weight"), vec![r, ad.inp], ad.a.clone()));
            tensors.push((format!("{p}.lora_B.weight"), vec![ad.out, r], ad.b.clone()));
        }
        write_f32_safetensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        let modules: Vec<&str> = self.cfg.targets.iter().map(|t| t.module().rsplit('.').next().unwrap()).collect();
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": r,
            "lora_alpha": self.cfg.alpha,
            "lora_dropout": 0.0,
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "revision": null
        });
        super::st::write_file_synced(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg).unwrap().as_bytes())
    }

    /// Reads the adapters of `dir` (as written by `save_peft`) for the given config.
    pub fn load_peft(dir: &Path, cfg: LoraConfig, mc: &ModelConfig, base: &ModelWeights<HostTensor>) -> Result<Self, TrainError> {
        let path = dir.join("adapter_model.safetensors");
        let mut t = read_f32_tensors(&path)?;
        let mut adapters = Vec::new();
        for layer in 0..mc.num_layers {
            for &target in &cfg.targets {
                let (out, inp) = target.dims(mc);
                let mut ad = Adapter { layer, target, out, inp, a: Vec::new(), b: Vec::new() };
                let p = ad.peft_prefix();
                let mut take = |n: String| {
                    t.remove(&n).map(|x| x.1).ok_or_else(|| TrainError::Checkpoint(format!("{}: missing tensor {n}", path.display())))
                };
                ad.a = take(format!("{p}.lora_A.weight"))?;
                ad.b = take(format!("{p}.lora_B.weight"))?;
                adapters.push(ad);
            }
        }
        Self::with_adapters(cfg, adapters, base)
    }
}
