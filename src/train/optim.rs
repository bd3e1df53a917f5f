//! Optimizer settings and state: AdamW (f32 moments, PyTorch's formula with decoupled weight
//! decay) and plain SGD (for debugging and gradient tests), global-norm gradient clipping, and
//! the learning-rate schedule (cosine with linear warm-up, as transformers'
//! `get_cosine_schedule_with_warmup`, or constant).
//!
//! The update itself is a `Backend` op (`adamw`, `sgd`, with `sum_squares_many` for the norm;
//! the formula is documented on `backend::AdamwStep`), applied by `apply` to the trainer's
//! backend buffers: the model's own weights for full fine-tuning, the LoRA adapters otherwise
//! (src/train/trainer.rs, lora.rs). `Optimizer` holds the step count; `Optimizer::step` is the
//! same update of host tensors on the reference backend (what tests compare the trainer with).

use serde::{Deserialize, Serialize};

use crate::backend::{AdamwStep, Backend, Reference};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    Adamw,
    Sgd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Cosine,
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub kind: OptimKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global L2-norm clipping threshold; 0 = off.
    pub max_grad_norm: f64,
    pub schedule: ScheduleKind,
    /// Fraction of the total steps spent in linear warm-up (rounded up to whole steps).
    pub warmup_ratio: f64,
}

impl OptimConfig {
    /// AdamW at learning rate `lr` with PyTorch's defaults (betas 0.9 and 0.999, eps 1e-8), no
    /// weight decay, clipping at a global norm of 1, and a constant schedule without warm-up.
    pub fn adamw(lr: f64) -> Self {
        OptimConfig {
            kind: OptimKind::Adamw,
            lr,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            schedule: ScheduleKind::Constant,
            warmup_ratio: 0.0,
        }
    }

    /// Learning rate of optimizer step `step` (0-based) out of `total`. As transformers: the
    /// warm-up ramps `lr * step / warmup` (so step 0 has lr 0 when warm-up is on), then
    /// `lr * 0.5 * (1 + cos(pi * progress))`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = (self.warmup_ratio * total as f64).ceil() as usize;
        if step < warmup {
            return self.lr * step as f64 / warmup.max(1) as f64;
        }
        match self.schedule {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => {
                let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0)
            }
        }
    }
}

/// One trainable tensor as the optimizer sees it.
pub struct Param<'a> {
    pub data: &'a mut [f32], // master weights, any shape, flattened
    pub grad: &'a [f32],     // same length
    /// Weight decay applies (matrices); not to norms and biases (transformers' convention).
    pub decay: bool,
}

/// Optimizer state: the update count, and for `step` on host tensors one (m, v) pair of f32
/// moments per tensor, in a fixed order. The trainer keeps its moments as backend buffers
/// (`trainer::Trainable`) and leaves `m`, `v` empty.
#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub cfg: OptimConfig,
    /// Number of updates applied so far (AdamW bias correction uses t = steps + 1).
    pub steps: u64,
    pub m: Vec<Vec<f32>>, // [tensor][numel]; empty for SGD and for backend-held moments
    pub v: Vec<Vec<f32>>, // [tensor][numel]; empty for SGD and for backend-held moments
}

/// One update of one tensor in place on the backend: AdamW with `p`'s moments (`moments`; None
/// for SGD) or SGD, with the coefficients of `h` (`Optimizer::hparams` of this step) and its
/// weight decay where `decay` (matrices; not norms and biases, transformers' convention).
/// AdamW updates the elements `at..at + len(m)` of `p` only (ZeRO-1: this rank's slice,
/// `train::zero`; the whole tensor otherwise); SGD keeps no state and updates all of `p`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply<B: Backend>(
    be: &B,
    kind: OptimKind,
    h: &AdamwStep,
    decay: bool,
    p: &mut B::Buf,
    g: &B::Buf,
    at: usize,
    moments: Option<(&mut B::Buf, &mut B::Buf)>,
) {
    let wd = if decay { h.weight_decay } else { 0.0 };
    match (kind, moments) {
        (OptimKind::Adamw, Some((m, v))) => be.adamw_at(p, g, at, m, v, &AdamwStep { weight_decay: wd, ..*h }),
        (OptimKind::Adamw, None) => panic!("AdamW needs the moments of every tensor"),
        (OptimKind::Sgd, _) => {
            assert_eq!(at, 0, "SGD has no state to shard");
            be.sgd(p, g, h.lr, wd, h.grad_scale)
        }
    }
}

/// The global L2 norm of all gradients (f64 accumulation).
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f64 {
    grads.into_iter().flat_map(|g| g.iter()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
}

/// The factor gradients are multiplied by: `max_norm / (norm + 1e-6)` when the norm exceeds
/// `max_norm` (PyTorch's `clip_grad_norm_`), else 1; `max_norm = 0` turns clipping off.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

impl Optimizer {
    /// Fresh state for tensors of the given sizes.
    pub fn new(cfg: OptimConfig, sizes: &[usize]) -> Self {
        let moments = || match cfg.kind {
            OptimKind::Adamw => sizes.iter().map(|&n| vec![0f32; n]).collect(),
            OptimKind::Sgd => Vec::new(),
        };
        Self { cfg, steps: 0, m: moments(), v: moments() }
    }

    /// The AdamW hyper-parameters of the next update (t = steps + 1) with learning rate `lr`,
    /// gradients multiplied by `grad_scale`, and the configured weight decay (callers set it
    /// to 0 for tensors that do not decay).
    pub(crate) fn hparams(&self, lr: f64, grad_scale: f64) -> AdamwStep {
        let c = self.cfg;
        let t = self.steps as i32 + 1;
        AdamwStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            grad_scale,
            bc1: 1.0 - c.beta1.powi(t),
            bc2: 1.0 - c.beta2.powi(t),
        }
    }

    /// Applies one update to host tensors with learning rate `lr`, gradients pre-multiplied by
    /// `grad_scale` (the clipping factor), through the reference backend's `apply`: the host
    /// reference of the trainer's update. `params` must come in the same order every step.
    pub fn step(&mut self, params: Vec<Param>, lr: f64, grad_scale: f64) {
        let (be, kind) = (Reference::new(), self.cfg.kind);
        let h = self.hparams(lr, grad_scale);
        let mut moments = self.m.iter_mut().zip(self.v.iter_mut());
        for p in params {
            let (mut w, g) = (be.upload(&*p.data), be.upload(p.grad));
            match moments.next() {
                Some((m, v)) => {
                    let (mut mb, mut vb) = (be.upload(m), be.upload(v));
                    apply(&be, kind, &h, p.decay, &mut w, &g, 0, Some((&mut mb, &mut vb)));
                    (*m, *v) = (be.download(&mb), be.download(&vb));
                }
                None => apply(&be, kind, &h, p.decay, &mut w, &g, 0, None),
            }
            p.data.copy_from_slice(&w);
        }
        self.steps += 1;
    }
}
