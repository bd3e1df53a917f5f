//! The trainer (DESIGN.md section 2, `src/train/`): DPO on the divergent segment of IPO pairs
//! (plus an optional SFT term), full fine-tuning or LoRA, AdamW/SGD with clipping and a
//! cosine schedule, gradient accumulation over micro-batches, atomic checkpoints with exact
//! resume, metrics.jsonl and a PNG chart. Pairs are packed as `[context | chosen | rejected]`
//! (`Batch::push_pair`) so the shared context is computed once per pair.
//!
//! - `loss`: the segment DPO loss and its metrics (host f64).
//! - `optim`: AdamW / SGD settings and state, clipping, lr schedule; the update itself is a
//!   `Backend` op (master weights and moments on the backend, for full fine-tuning and LoRA).
//! - `lora`: adapters through merged weights + projected gradients; PEFT files.
//! - `data`: pairs JSONL -> `TrainPair`, validation, seeded epoch order.
//! - `trainer`: `Trainer<B>`, one optimizer step at a time.
//! - `zero`: ZeRO-1, which elements of the trainable tensors a rank keeps optimizer state for
//!   (`ipo train --zero 1`), and the all-gather of the updated slices.
//! - `checkpoint`: `step-N/` directories written atomically, and resume.
//! - `plan`: memory and FLOPs of a step before it runs (`ipo plan`, and the check `ipo train`
//!   makes before it starts).
//! - `chart`: metrics.png, the training curves (drawn by `crate::chart`).

pub mod chart;
pub mod checkpoint;
pub mod data;
pub mod lora;
pub mod loss;
pub mod optim;
pub mod plan;
pub(crate) mod st;
pub mod trainer;
pub(crate) mod zero;

pub use data::TrainPair;
pub use lora::{LoraConfig, LoraTarget};
pub use optim::{OptimConfig, OptimKind, ScheduleKind};
pub use trainer::{StepMetrics, TrainConfig, Trainer};

/// Why training could not start or stopped. Messages name the file, line, flag or step.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Jsonl(#[from] crate::io::jsonl::JsonlError),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error(transparent)]
    Forward(#[from] crate::model::transformer::ForwardError),
    /// NaN or inf in the loss or the gradients: training stops, never continues silently.
    #[error("step {step}: non-finite {what} ({value}) on the batch of pairs [{ids}]")]
    NonFinite { step: usize, what: String, value: f64, ids: String },
    #[error("out of memory budget: {0}")]
    Memory(String),
    /// A collective of data-parallel training failed (it names the rank).
    #[error(transparent)]
    Dist(#[from] crate::dist::CommError),
}
