//! Training pairs: the pairs JSONL contract (DESIGN.md section 4) read into token ids plus
//! reference log-probs, validated against the model (ids inside the vocabulary, context +
//! segment within max_position_embeddings, non-empty segments) with file:line errors; and the
//! seeded data order (one shuffle per epoch, from `--seed` and the epoch number only, so a
//! resumed run sees exactly the same order).

use std::path::Path;

use crate::io::jsonl::{self, JsonlError};
use crate::io::records::Pair;
use crate::model::config::ModelConfig;

use super::TrainError;

/// SplitMix64: the trainer's only source of randomness (data order, LoRA init).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The order of pair indices in `epoch`: a Fisher-Yates shuffle seeded by (seed, epoch).
pub(crate) fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = SplitMix64(seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// One preference pair ready for training.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainPair {
    pub id: String,
    pub context: Vec<u32>,  // [n_context] prompt + shared prefix
    pub chosen: Vec<u32>,   // [n_chosen] divergent segment after the context
    pub rejected: Vec<u32>, // [n_rejected]
    pub ref_chosen: f64,    // sum of reference log-probs of `chosen`
    pub ref_rejected: f64,
}

impl TrainPair {
    /// Tokens of the packed `[context | chosen | rejected]` sequence.
    pub(crate) fn packed_tokens(&self) -> usize {
        self.context.len() + self.chosen.len() + self.rejected.len()
    }
}

/// Checks one pair's ids against the model; `Err` is the reason (without file:line).
pub(crate) fn check_pair(p: &Pair, cfg: &ModelConfig) -> Result<(), String> {
    if p.context_ids.is_empty() {
        return Err("empty context_ids: the first segment token needs a token before it".into());
    }
    for (name, ids) in [("chosen_ids", &p.chosen_ids), ("rejected_ids", &p.rejected_ids)] {
        if ids.is_empty() {
            return Err(format!("empty {name}: a pair needs a non-empty divergent segment on both sides"));
        }
    }
    for (name, ids) in [("context_ids", &p.context_ids), ("chosen_ids", &p.chosen_ids), ("rejected_ids", &p.rejected_ids)] {
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= cfg.vocab_size) {
            return Err(format!(
                "{name}[{i}] = {id} is outside the model's vocabulary (vocab_size {}): was this file made with another tokenizer?",
                cfg.vocab_size
            ));
        }
    }
    let longest = p.context_ids.len() + p.chosen_ids.len().max(p.rejected_ids.len());
    if longest > cfg.max_position_embeddings {
        return Err(format!(
            "context_ids ({}) + longest segment ({}) = {longest} tokens exceeds max_position_embeddings = {}",
            p.context_ids.len(),
            p.chosen_ids.len().max(p.rejected_ids.len()),
            cfg.max_position_embeddings
        ));
    }
    Ok(())
}

/// Reads a pairs file. Returns the raw records (with their line numbers) and whether every
/// record carries both reference log-probs; every record is checked with `check_pair`.
pub(crate) fn read_pairs(path: &Path, cfg: &ModelConfig) -> Result<Vec<(usize, Pair)>, TrainError> {
    let lines = jsonl::read_objects(path)?;
    if lines.is_empty() {
        return Err(TrainError::Data(format!("{}: no pairs", path.display())));
    }
    let mut out = Vec::with_capacity(lines.len());
    for l in lines {
        let p: Pair = l.parse(path)?;
        check_pair(&p, cfg).map_err(|r| JsonlError::line(path, l.line, r))?;
        for (name, v) in [("ref_chosen_logp", p.ref_chosen_logp), ("ref_rejected_logp", p.ref_rejected_logp)] {
            if let Some(x) = v {
                if !x.is_finite() || x > 0.0 {
                    return Err(JsonlError::line(path, l.line, format!("{name} = {x} is not a finite log-probability (<= 0)")).into());
                }
            }
        }
        out.push((l.line, p));
    }
    Ok(out)
}

/// Turns records that all carry reference log-probs into training pairs.
pub(crate) fn to_train_pairs(path: &Path, recs: Vec<(usize, Pair)>) -> Result<Vec<TrainPair>, TrainError> {
    recs.into_iter()
        .map(|(line, p)| match (p.ref_chosen_logp, p.ref_rejected_logp) {
            (Some(rc), Some(rr)) => Ok(TrainPair {
                id: p.id,
                context: p.context_ids,
                chosen: p.chosen_ids,
                rejected: p.rejected_ids,
                ref_chosen: rc,
                ref_rejected: rr,
            }),
            _ => Err(JsonlError::line(path, line, "missing ref_chosen_logp / ref_rejected_logp").into()),
        })
        .collect()
}
