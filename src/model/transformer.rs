//! The transformer, written once against `Backend`: packed variable-length forward,
//! hand-written backward, fused lm-head log-probs.
//! (Interface placeholder: the implementation lands next.)

use super::config::ModelConfig;
use super::weights::{HostTensor, ModelWeights};

/// One scoring request: the log-prob of each `target` token given `context` + the targets
/// before it. `context` must be non-empty (the first target token needs a predecessor).
pub struct ScoreItem<'a> {
    pub context: &'a [u32],
    pub target: &'a [u32],
}

pub struct Transformer {
    pub cfg: ModelConfig,
    pub weights: ModelWeights<HostTensor>,
}

impl Transformer {
    pub fn new(cfg: ModelConfig, weights: ModelWeights<HostTensor>) -> anyhow::Result<Self> {
        Ok(Self { cfg, weights })
    }

    /// Per-target-token log-probs (natural log) for each item, packed into as few forwards as
    /// `batch_tokens` allows.
    pub fn score(&self, _items: &[ScoreItem], _batch_tokens: usize) -> anyhow::Result<Vec<Vec<f32>>> {
        anyhow::bail!("transformer forward not built yet")
    }
}
