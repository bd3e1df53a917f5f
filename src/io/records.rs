//! Typed records of the JSONL contracts (DESIGN.md section 4) that `score` reads and writes.
//! Every record keeps the fields it does not know in `extra` (flattened), so a file passes
//! through a stage with its user fields intact.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One `ipo score` input line: token ids (`context_ids` + `target_ids`) or text (`context` +
/// `target`, tokenized separately without special tokens). When both are present the ids win.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScoreInput {
    pub id: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Where the compliance cue was found in the rollout (intervene).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cue {
    /// Index of the sentence in the reasoning.
    pub sentence: usize,
    pub text: String,
    /// Index of the first token of the cue in the completion.
    pub token: usize,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A preference pair from `ipo intervene`: shared `context_ids` (prompt + common prefix), then
/// the divergent `chosen_ids` / `rejected_ids` segments. `ipo score --pairs` fills the
/// reference log-probs (sum over each segment, natural log).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pair {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub context_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cue: Option<Cue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_chosen_logp: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_rejected_logp: Option<f64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}
