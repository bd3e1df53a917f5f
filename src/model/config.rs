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
    /// Parameters the config implies (embedding, every layer, final norm, untied head), or
    /// `None` when the count overflows a u64: a config from an untrusted folder is checked
    /// with it before anything is allocated from its sizes.
    pub fn param_count(&self) -> Option<u64> {
        let u = |x: usize| x as u64;
        let (h, ff, d) = (u(self.hidden_size), u(self.intermediate_size), u(self.head_dim));
        let q = u(self.num_heads).checked_mul(d)?;
        let kv = u(self.num_kv_heads).checked_mul(d)?;
        let mats = [q.checked_mul(h)?, kv.checked_mul(h)?.checked_mul(2)?, h.checked_mul(q)?, ff.checked_mul(h)?.checked_mul(3)?];
        let bias = if self.qkv_bias { q.checked_add(kv.checked_mul(2)?)? } else { 0 };
        let qk_norm = if self.qk_norm { d.checked_mul(2)? } else { 0 };
        let layer = mats.iter().try_fold(h.checked_mul(2)?, |a, &m| a.checked_add(m))?.checked_add(bias)?.checked_add(qk_norm)?;
        let embed = u(self.vocab_size).checked_mul(h)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        layer.checked_mul(u(self.num_layers))?.checked_add(embed)?.checked_add(head)?.checked_add(h)
    }

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
