//! How rollouts pick tokens: `SamplingParams` (greedy, temperature, top-k, top-p, length and
//! EOS), and the counters of each token's random draw (`key_of` a prompt id, the sample index,
//! the position). The sampling itself is the backend op `Backend::sample` on `SampleRow`s,
//! whose CPU reference is `pick` (src/backend/cpu/sample.rs); the draw is `backend::uniform`
//! of the counters, so a token does not depend on batch size, scheduling order, preemption
//! or thread count.

use crate::backend::SampleRow;

// The hash behind the draws, still named here by callers outside the rollout engine.
pub use crate::backend::mix64;

/// How to pick the next token. `temperature == 0` is greedy (argmax, lowest id on ties).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Most tokens generated per request (the ids it starts from do not count).
    pub max_new_tokens: usize,
    /// Token ids that end a sequence (kept as its last token; finish = "eos").
    pub eos_ids: Vec<u32>,
    /// Every random draw derives from this.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, max_new_tokens: 256, eos_ids: vec![], seed: 0 }
    }
}

impl SamplingParams {
    /// Rejects settings that cannot sample (negative or non-finite temperature, top_p outside (0, 1]).
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }

    /// The `Backend::sample` row of the token at absolute `position` of sample `sample` of the
    /// prompt with key `key`.
    pub fn row(&self, key: u64, sample: u32, position: u32) -> SampleRow {
        SampleRow { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: self.seed, key, sample, position }
    }
}

/// FNV-1a 64 of a string: the key of a prompt id in the random draws.
pub fn key_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_and_rows_carry_the_params() {
        assert_ne!(key_of("a"), key_of("b"));
        let p = SamplingParams { temperature: 0.7, top_k: 5, top_p: 0.9, seed: 3, ..Default::default() };
        let r = p.row(key_of("a"), 2, 17);
        assert_eq!((r.temperature, r.top_k, r.top_p, r.seed, r.key, r.sample, r.position), (0.7, 5, 0.9, 3, key_of("a"), 2, 17));
    }
}
