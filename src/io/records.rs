//! Typed records of the JSONL contracts (DESIGN.md section 4) that the workflows read and write.
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

/// `record`'s fields written over `line` (the JSON object it was read from): keys already in
/// the line keep their position, new ones are appended in the record's order, keys the record
/// omits stay as they were. Writers use it so a file passes through a stage with its field
/// order intact.
pub(crate) fn write_over<T: Serialize>(mut line: Map<String, Value>, record: &T) -> Result<Map<String, Value>, serde_json::Error> {
    match serde_json::to_value(record)? {
        Value::Object(fields) => {
            for (k, v) in fields {
                line.insert(k, v);
            }
            Ok(line)
        }
        other => Err(serde::ser::Error::custom(format!("a record must serialize to an object, not {other}"))),
    }
}

/// One `ipo score` output line: the input record, then the sum and the per-token log-probs
/// of its target (natural log; each token's value is the f32 result printed shortest).
#[derive(Clone, Debug, Serialize)]
pub struct Scored {
    #[serde(flatten)]
    pub input: ScoreInput,
    pub logp: f64,
    pub token_logps: Vec<f64>,
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

/// One line of `generate`'s output: a finished sample (`finish` = "eos" | "length" | "stop")
/// or one that could not run (`finish` = "error", with `error` and no completion).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub prompt: String,
    pub sample: u32,
    pub seed: u64,
    pub prompt_ids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    pub finish: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Fingerprint of the model folder (`rollout::fingerprint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The sampler settings it was drawn with (`generate --resume` refuses to mix two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingRecord>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The sampler settings of a rollout (the seed is the rollout's own field).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingRecord {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub max_new_tokens: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

impl Rollout {
    /// The keys the struct itself holds; an input record's own copies of them are dropped from
    /// `extra` so the output never holds a key twice.
    const KEYS: [&'static str; 13] = [
        "id", "prompt", "sample", "seed", "prompt_ids", "completion_ids", "reasoning", "response", "completion", "finish", "error",
        "model", "sampling",
    ];

    /// A rollout with no completion yet (`finish` empty); `extra` holds the prompt record's
    /// other fields, copied through.
    pub fn new(id: String, prompt: String, sample: u32, seed: u64, prompt_ids: Vec<u32>, model: String, mut extra: Map<String, Value>) -> Self {
        extra.retain(|k, _| !Self::KEYS.contains(&k.as_str()));
        Self {
            id,
            prompt,
            sample,
            seed,
            prompt_ids,
            completion_ids: None,
            reasoning: None,
            response: None,
            completion: None,
            finish: String::new(),
            error: None,
            model: Some(model),
            sampling: None,
            extra,
        }
    }
}
