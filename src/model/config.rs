//! The model configuration, read from a Hugging Face `config.json`, for the three families the
//! IPO paper trains: Llama (incl. llama3 RoPE scaling), Qwen2 (q/k/v bias), Qwen3 (q/k norm).

use serde::{Deserialize, Serialize};

/// Which architecture variant a checkpoint is; decides the optional tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
}

/// Llama 3 "rope_scaling" (rope_type = "llama3"): frequency-dependent stretch of the RoPE
/// inverse frequencies, as used by DeepSeek-R1-Distill-Llama-8B.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2: q/k/v projections carry a bias.
    pub qkv_bias: bool,
    /// Qwen3: RMSNorm over each head of q and k (weights [head_dim]) before RoPE.
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    pub(crate) fn layer_count_mismatch(&self, layers: usize) -> bool {
        layers != self.num_layers
    }
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// RoPE inverse frequencies, [head_dim / 2], with llama3 scaling applied when configured.
    /// Computed in f64 and rounded once, matching HF (which computes them in f32 from
    /// `base ** (arange(0, d, 2) / d)`; the difference is below 1 ulp of f32 for our dims).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        if let Some(s) = self.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (s.original_max_position_embeddings as f64 / wavelen
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        inv
    }
}
