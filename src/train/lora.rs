//! LoRA as PEFT computes it: each adapted projection adds `s * (x A^T) B^T` (`s = alpha / r`)
//! to the frozen base's `x W0^T`, inside the transformer (`crate::model::adapter`), whose
//! backward then gives `dA`, `dB` directly and no gradient of any base weight. Init as PEFT:
//! A ~ kaiming-uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the adapted model
//! starts equal to the base. Saved as a PEFT-compatible `adapter_model.safetensors` +
//! `adapter_config.json`; `Transformer::merged_host_weights` gives the merged model.
//!
//! The adapters train on the model's own backend (`Lora::attach`): A and B are the model's
//! adapter buffers, their AdamW moments live here, the update is `Backend::adamw` / `sgd`.
//! `Lora::adapters` keeps the host copy of A and B that the PEFT files are written from,
//! downloaded after every update. Under ZeRO-1 (`train::zero`) the moments cover this rank's
//! slice of the adapters only; `update` moves that slice and all-gathers the others'.

use std::path::Path;

use serde_json::json;

use super::data::SplitMix64;
use super::optim::{apply, OptimKind};
use super::st::write_f32_safetensors;
use super::zero::Shard;
use super::TrainError;
use crate::backend::{AdamwStep, Backend};
use crate::dist::{Comm, CommError};
use crate::model::adapter::{self, Adapters, Grads};
use crate::model::config::ModelConfig;
use crate::model::transformer::Transformer;
use crate::model::weights::{HostTensor, ModelWeights};

pub use crate::model::adapter::LoraTarget;

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

/// All adapters of a model: their values on the host and, once attached to a model, their
/// optimizer state on its backend (A and B themselves are the model's adapter buffers).
pub struct Lora<B: Backend> {
    pub cfg: LoraConfig,
    /// A and B of every adapter on the host (what `save_peft` writes); equal to the backend's
    /// copies after every change.
    pub adapters: Vec<Adapter>,
    dev: Option<Attached<B>>,
}

/// The backend state of an attached `Lora`.
struct Attached<B: Backend> {
    /// AdamW moments of A0, B0, A1, B1, ... (optimizer order), each `[len of the shard's
    /// range]` (empty for SGD).
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

    /// Attaches the adapters to `model`: uploads A and B into the model's adapter slots (the
    /// base weights stay as they are, frozen) and makes zero AdamW moments of the elements
    /// `shard` owns (for `OptimKind::Adamw`).
    pub(crate) fn attach(&mut self, model: &mut Transformer<B>, kind: OptimKind, shard: &Shard) -> Result<(), TrainError> {
        assert!(self.dev.is_none(), "LoRA adapters attached twice");
        let c = &model.cfg;
        for ad in &self.adapters {
            if ad.layer >= c.num_layers || ad.target.dims(c) != (ad.out, ad.inp) {
                return Err(TrainError::Config(format!("LoRA adapter {}: the model's matrix is not {} x {}", ad.peft_prefix(), ad.out, ad.inp)));
            }
        }
        model.attach_adapters(self.device_adapters(&model.backend, c.num_layers));
        let be = &model.backend;
        let moments = || match kind {
            OptimKind::Adamw => shard.ranges.iter().map(|r| be.zeros(r.len())).collect(),
            OptimKind::Sgd => Vec::new(),
        };
        let (m, v) = (moments(), moments());
        self.dev = Some(Attached { m, v });
        Ok(())
    }

    /// A and B of every adapter uploaded, laid out per layer and projection.
    fn device_adapters(&self, be: &B, layers: usize) -> Adapters<B::Buf> {
        let mut out = Adapters { rank: self.cfg.rank, scale: self.cfg.scale(), layers: (0..layers).map(|_| Default::default()).collect() };
        for ad in &self.adapters {
            out.layers[ad.layer][ad.target.index()] = Some(adapter::Adapter { a: be.upload(&ad.a), b: be.upload(&ad.b) });
        }
        out
    }

    fn attached(&self) -> &Attached<B> {
        self.dev.as_ref().expect("LoRA adapters used before Lora::attach")
    }

    /// The gradients of A and B of every adapter in optimizer order (A0, B0, A1, ...), taken
    /// out of the backward's `Grads::Adapters`.
    pub(crate) fn ordered_grads(&self, grads: Grads<B::Buf>) -> Vec<B::Buf> {
        let Grads::Adapters(mut g) = grads else { panic!("LoRA training needs the adapters' gradients (Grads::Adapters)") };
        let mut out = Vec::with_capacity(2 * self.adapters.len());
        for ad in &self.adapters {
            let d = g[ad.layer][ad.target.index()].take().expect("a gradient for every adapter");
            out.extend([d.a, d.b]);
        }
        out
    }

    /// The model's buffer of A (`which` 0) or B (1) of adapter `ad`.
    fn param_mut<'m>(ads: &'m mut Option<Adapters<B::Buf>>, ad: &Adapter, which: usize) -> &'m mut B::Buf {
        let slot = ads.as_mut().expect("LoRA adapters attached")
            .layers[ad.layer][ad.target.index()]
            .as_mut()
            .expect("an attached adapter");
        if which == 0 {
            &mut slot.a
        } else {
            &mut slot.b
        }
    }

    /// One optimizer update of every A and B (`h` of this step, gradients in optimizer
    /// order, weight decay on every tensor), then the host copies refreshed. Under ZeRO-1 this
    /// rank updates the elements `shard` owns, and the other ranks' updated elements are
    /// all-gathered over `comm` after.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn update(
        &mut self,
        model: &mut Transformer<B>,
        grads: &[B::Buf],
        kind: OptimKind,
        h: &AdamwStep,
        shard: &Shard,
        comm: &dyn Comm,
    ) -> Result<(), CommError> {
        let dev = self.dev.as_mut().expect("LoRA adapters used before Lora::attach");
        assert_eq!(grads.len(), 2 * self.adapters.len(), "one gradient per adapter tensor");
        let mut moments = dev.m.iter_mut().zip(dev.v.iter_mut());
        for (i, (g, r)) in grads.iter().zip(&shard.ranges).enumerate() {
            let m = moments.next();
            if !r.is_empty() {
                apply(&model.backend, kind, h, true, Self::param_mut(&mut model.adapters, &self.adapters[i / 2], i % 2), g, r.start, m);
            }
        }
        if shard.is_split() {
            let mut mine = Vec::with_capacity(shard.len()); // this rank's updated elements
            for (i, r) in shard.ranges.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
                let p = Self::param_mut(&mut model.adapters, &self.adapters[i / 2], i % 2);
                mine.extend_from_slice(&model.backend.download(p)[r.clone()]);
            }
            let whole = shard.all_gather(comm, &mine)?;
            for (i, x) in whole.into_iter().enumerate() {
                if !shard.owns_whole(i) {
                    *Self::param_mut(&mut model.adapters, &self.adapters[i / 2], i % 2) = model.backend.upload(&x);
                }
            }
        }
        self.download(model);
        Ok(())
    }

    /// Refreshes the host copies of A and B from the model.
    fn download(&mut self, model: &Transformer<B>) {
        let ads = model.adapters().expect("LoRA adapters used before Lora::attach");
        for ad in self.adapters.iter_mut() {
            let d = ads.get(ad.layer, ad.target).expect("an attached adapter");
            (ad.a, ad.b) = (model.backend.download(&d.a), model.backend.download(&d.b));
        }
    }

    /// Replaces A and B (optimizer order, on the host) in the host copies and the model.
    pub(crate) fn set_params(&mut self, model: &mut Transformer<B>, values: Vec<Vec<f32>>) {
        assert_eq!(values.len(), 2 * self.adapters.len(), "set_params: {} tensors for {} adapters", values.len(), self.adapters.len());
        let mut it = values.into_iter();
        for ad in self.adapters.iter_mut() {
            (ad.a, ad.b) = (it.next().unwrap(), it.next().unwrap());
        }
        model.attach_adapters(self.device_adapters(&model.backend, model.cfg.num_layers));
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
