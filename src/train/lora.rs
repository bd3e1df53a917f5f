//! LoRA without touching the transformer. The forward is linear in each weight matrix, so the
//! model runs with merged weights `W = W0 + s * B @ A` (`s = alpha / r`), `backward` gives the
//! full `dW`, and the chain rule projects it onto the adapters:
//!     dB = s * dW @ A^T        dA = s * B^T @ dW
//! Init as PEFT: A ~ kaiming-uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the
//! adapted model starts equal to the base. Saved as a PEFT-compatible
//! `adapter_model.safetensors` + `adapter_config.json`.
//!
//! The adapters train on the model's own backend (`Lora::attach`): A, B, their AdamW moments
//! and a copy of each frozen base matrix W0 are backend buffers; the merge and the projection
//! are `Backend::matmul_scaled`, the update `Backend::adamw` / `sgd`. `Lora::adapters` keeps
//! the host copy of A and B that the PEFT files are written from, downloaded after every
//! update. Under ZeRO-1 (`train::zero`) the moments cover this rank's slice of the adapters
//! only; `update` moves that slice and all-gathers the others' before the merge.

use std::path::Path;

use serde_json::json;

use super::data::SplitMix64;
use super::optim::{apply, OptimKind};
use super::st::write_f32_safetensors;
use super::zero::Shard;
use super::TrainError;
use crate::backend::{AdamwStep, Backend};
use crate::dist::{Comm, CommError};
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
    /// Every projection, in layer order (the default of `--lora-targets`).
    pub const ALL: [LoraTarget; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

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

/// All adapters of a model: their values on the host and, once attached to a model, on its
/// backend (with the frozen base matrices they add to).
pub struct Lora<B: Backend> {
    pub cfg: LoraConfig,
    /// A and B of every adapter on the host (what `save_peft` writes); equal to the backend's
    /// copies after every change.
    pub adapters: Vec<Adapter>,
    dev: Option<Attached<B>>,
}

/// The backend buffers of an attached `Lora`.
struct Attached<B: Backend> {
    /// A `[r, in]` and B `[out, r]` of every adapter, in optimizer order (A0, B0, A1, B1, ...).
    params: Vec<B::Buf>,
    /// The frozen base matrix W0 `[out, in]` of every adapter.
    base: Vec<B::Buf>,
    /// AdamW moments of `params`, same order, each `[len of the shard's range]` (empty for SGD).
    m: Vec<B::Buf>,
    v: Vec<B::Buf>,
}

impl<B: Backend> Lora<B> {
    /// PEFT's default init (A kaiming-uniform, B = 0), seeded.
    pub fn init(cfg: LoraConfig, mc: &ModelConfig, seed: u64) -> Result<Self, TrainError> {
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
        Ok(Self { cfg, adapters, dev: None })
    }

    /// Adapters given explicitly (loaded from a checkpoint, or fixed in a test), checked
    /// against the base weights they adapt.
    pub fn with_adapters(cfg: LoraConfig, adapters: Vec<Adapter>, base: &ModelWeights<HostTensor>) -> Result<Self, TrainError> {
        let r = cfg.rank;
        for ad in &adapters {
            let w = ad.target.get(&base.layers[ad.layer]);
            if w.shape != [ad.out, ad.inp] || ad.a.len() != r * ad.inp || ad.b.len() != ad.out * r {
                return Err(TrainError::Config(format!(
                    "LoRA adapter {}: base {:?}, A {} values, B {} values do not fit rank {r}",
                    ad.peft_prefix(), w.shape, ad.a.len(), ad.b.len()
                )));
            }
        }
        Ok(Self { cfg, adapters, dev: None })
    }

    /// Moves the adapters onto the backend of the model whose base weights are `weights`
    /// (unmerged): uploads A and B, copies each adapted W0, makes zero AdamW moments of the
    /// elements `shard` owns (for `OptimKind::Adamw`) and merges `W0 + s B A` into `weights`.
    pub(crate) fn attach(&mut self, be: &B, weights: &mut ModelWeights<B::Buf>, kind: OptimKind, shard: &Shard) -> Result<(), TrainError> {
        assert!(self.dev.is_none(), "LoRA adapters attached twice");
        let mut base = Vec::new();
        for ad in &self.adapters {
            let w = ad.target.get(&weights.layers[ad.layer]);
            if be.len(w) != ad.out * ad.inp {
                return Err(TrainError::Config(format!("LoRA adapter {}: the model's matrix has {} values, expected {} x {}", ad.peft_prefix(), be.len(w), ad.out, ad.inp)));
            }
            let mut w0 = be.zeros(ad.out * ad.inp); // [out, in] = 0 + W0
            be.add_assign(&mut w0, w);
            base.push(w0);
        }
        let params: Vec<B::Buf> = self.adapters.iter().flat_map(|ad| [be.upload(&ad.a), be.upload(&ad.b)]).collect();
        let moments = || match kind {
            OptimKind::Adamw => shard.ranges.iter().map(|r| be.zeros(r.len())).collect(),
            OptimKind::Sgd => Vec::new(),
        };
        let (m, v) = (moments(), moments());
        self.dev = Some(Attached { params, base, m, v });
        self.merge(be, weights);
        Ok(())
    }

    fn attached(&self) -> &Attached<B> {
        self.dev.as_ref().expect("LoRA adapters used before Lora::attach")
    }

    /// Writes `W0 + s * B @ A` of every adapter into its matrix of `weights`, in place: the
    /// scaled product (rounded, then scaled), then W0 added.
    fn merge(&self, be: &B, weights: &mut ModelWeights<B::Buf>) {
        let (dev, r, s) = (self.attached(), self.cfg.rank, self.cfg.scale());
        for (i, ad) in self.adapters.iter().enumerate() {
            let w = ad.target.get_mut(&mut weights.layers[ad.layer]); // [out, in]
            be.matmul_scaled(&dev.params[2 * i + 1], false, &dev.params[2 * i], false, w, ad.out, ad.inp, r, s, false);
            be.add_assign(w, &dev.base[i]);
        }
    }

    /// The gradients of A and B of every adapter (optimizer order) from the full weight
    /// gradients: dA `[r, in]` = s B^T @ dW, dB `[out, r]` = s dW @ A^T.
    pub(crate) fn project(&self, be: &B, grads: &ModelWeights<B::Buf>) -> Vec<B::Buf> {
        let (dev, r, s) = (self.attached(), self.cfg.rank, self.cfg.scale());
        let mut out = Vec::new();
        for (i, ad) in self.adapters.iter().enumerate() {
            let dw = ad.target.get(&grads.layers[ad.layer]); // [out, in]
            let (mut da, mut db) = (be.zeros(r * ad.inp), be.zeros(ad.out * r));
            be.matmul_scaled(&dev.params[2 * i + 1], true, dw, false, &mut da, r, ad.inp, ad.out, s, false);
            be.matmul_scaled(dw, false, &dev.params[2 * i], true, &mut db, ad.out, r, ad.inp, s, false);
            out.extend([da, db]);
        }
        out
    }

    /// One optimizer update of every A and B (`h` of this step, gradients from `project`,
    /// weight decay on every tensor), then the merged matrices of `weights` and the host
    /// copies refreshed. Under ZeRO-1 this rank updates the elements `shard` owns, and the
    /// other ranks' updated elements are all-gathered over `comm` first.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn update(
        &mut self,
        be: &B,
        weights: &mut ModelWeights<B::Buf>,
        grads: &[B::Buf],
        kind: OptimKind,
        h: &AdamwStep,
        shard: &Shard,
        comm: &dyn Comm,
    ) -> Result<(), CommError> {
        let dev = self.dev.as_mut().expect("LoRA adapters used before Lora::attach");
        assert_eq!(grads.len(), dev.params.len(), "one gradient per adapter tensor");
        let mut moments = dev.m.iter_mut().zip(dev.v.iter_mut());
        for ((p, g), r) in dev.params.iter_mut().zip(grads).zip(&shard.ranges) {
            let m = moments.next();
            if !r.is_empty() {
                apply(be, kind, h, true, p, g, r.start, m);
            }
        }
        if shard.is_split() {
            let mut mine = Vec::with_capacity(shard.len()); // this rank's updated elements
            for (p, r) in dev.params.iter().zip(&shard.ranges).filter(|(_, r)| !r.is_empty()) {
                mine.extend_from_slice(&be.download(p)[r.clone()]);
            }
            let whole = shard.all_gather(comm, &mine)?;
            for (i, (p, x)) in dev.params.iter_mut().zip(whole).enumerate() {
                if !shard.owns_whole(i) {
                    *p = be.upload(&x);
                }
            }
        }
        self.merge(be, weights);
        self.download(be);
        Ok(())
    }

    /// Refreshes the host copies of A and B from the backend.
    fn download(&mut self, be: &B) {
        let dev = self.dev.as_ref().expect("LoRA adapters used before Lora::attach");
        for (ad, p) in self.adapters.iter_mut().zip(dev.params.chunks(2)) {
            (ad.a, ad.b) = (be.download(&p[0]), be.download(&p[1]));
        }
    }

    /// Replaces A and B (optimizer order, on the host) and re-merges `weights`.
    pub(crate) fn set_params(&mut self, be: &B, weights: &mut ModelWeights<B::Buf>, values: Vec<Vec<f32>>) {
        assert_eq!(values.len(), 2 * self.adapters.len(), "set_params: {} tensors for {} adapters", values.len(), self.adapters.len());
        let mut it = values.into_iter();
        for ad in self.adapters.iter_mut() {
            (ad.a, ad.b) = (it.next().unwrap(), it.next().unwrap());
        }
        let dev = self.dev.as_mut().expect("LoRA adapters used before Lora::attach");
        dev.params = self.adapters.iter().flat_map(|ad| [be.upload(&ad.a), be.upload(&ad.b)]).collect();
        self.merge(be, weights);
    }

    /// The AdamW moments `(m, v)` of A and B, optimizer order, downloaded (empty for SGD;
    /// under ZeRO-1 this rank's pieces only).
    pub fn moments(&self, be: &B) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let dev = self.attached();
        (dev.m.iter().map(|x| be.download(x)).collect(), dev.v.iter().map(|x| be.download(x)).collect())
    }

    /// AdamW state elements this rank holds (m and v, on the backend).
    pub(crate) fn moments_len(&self, be: &B) -> usize {
        let dev = self.attached();
        dev.m.iter().chain(&dev.v).map(|x| be.len(x)).sum()
    }

    /// Replaces the AdamW moments (as returned by `moments`: this rank's pieces).
    pub(crate) fn set_moments(&mut self, be: &B, m: &[Vec<f32>], v: &[Vec<f32>]) {
        let dev = self.dev.as_mut().expect("LoRA adapters used before Lora::attach");
        dev.m = m.iter().map(|x| be.upload(x)).collect();
        dev.v = v.iter().map(|x| be.upload(x)).collect();
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` (PEFT layout) into `dir`.
    pub(crate) fn save_peft(&self, dir: &Path, base_model: &str) -> Result<(), TrainError> {
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

}
