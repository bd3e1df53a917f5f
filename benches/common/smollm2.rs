//! Shared by the CPU benches: the SmolLM2-135M configuration (with a layer count to vary),
//! seeded random weights for it, and a small seeded RNG. Included with `#[path]` by
//! benches/forward_backward.rs and benches/train.rs.
#![allow(dead_code)]

use ipo::model::config::{Family, ModelConfig};
use ipo::model::transformer::expected_shapes;
use ipo::model::weights::{HostTensor, LayerWeights, ModelWeights};

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn f(&mut self) -> f32 {
        (self.next() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
    pub fn ids(&mut self, n: usize, v: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next() % v as u64) as u32).collect()
    }
}

pub fn smol_config(layers: usize) -> ModelConfig {
    ModelConfig {
        family: Family::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: layers,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rope_theta: 100000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        qkv_bias: false,
        qk_norm: false,
        bos_token_id: None,
        eos_token_ids: vec![2],
    }
}

pub fn random_weights(cfg: &ModelConfig, rng: &mut Rng) -> ModelWeights<HostTensor> {
    let mut ts = Vec::new();
    expected_shapes(cfg, !cfg.tie_word_embeddings, |name, shape| {
        let n: usize = shape.iter().product();
        let s = if name.contains("norm") { 0.0 } else { 0.05 };
        let data = (0..n).map(|_| if s == 0.0 { 1.0 } else { rng.f() * s }).collect();
        ts.push(HostTensor::new(shape, data));
    });
    let mut it = ts.into_iter();
    let mut next = || it.next().unwrap();
    let embed = next();
    let layers = (0..cfg.num_layers)
        .map(|_| {
            let attn_norm = next();
            let (wq, wk, wv, wo) = (next(), next(), next(), next());
            let mlp_norm = next();
            let (w_gate, w_up, w_down) = (next(), next(), next());
            LayerWeights { attn_norm, wq, wk, wv, wo, bq: None, bk: None, bv: None, q_norm: None, k_norm: None, mlp_norm, w_gate, w_up, w_down }
        })
        .collect();
    let final_norm = next();
    ModelWeights { embed, layers, final_norm, lm_head: None }
}

