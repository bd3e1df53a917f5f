//! Intervention, the data-construction half of IPO (IPO_METHOD.md, Algorithm 1): split a
//! rollout's reasoning into sentences with the token where each starts (`segment`), find the
//! first compliance cue with a detector (`detect`: rules; `judge`: an LLM over an
//! OpenAI-compatible endpoint), splice a safety trigger from the pool (`triggers`) in at that
//! token and let the model continue from the cached prefix, and keep the pair when the new
//! trace is cue-free (`pipeline`, driven by `ipo intervene`).

pub mod detect;
pub mod judge;
pub mod pipeline;
pub mod segment;
pub mod triggers;

pub use detect::{DetectError, Detector, Item, RuleDetector};
pub use judge::{Judge, JudgeConfig};
pub use segment::{segment_completion, split_sentences, Sentence};
pub use triggers::load_triggers;
