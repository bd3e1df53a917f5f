//! `ipo eval`'s measurements, as pure functions over text and numbers (no model, no files):
//! the reasoning/response split of a completion (`metrics::split_segments`), the degenerate
//! check, Wilson intervals and the bootstrap (`metrics`); the two harmfulness judges, rules and
//! an LLM over any OpenAI-compatible endpoint (`judge`); and the typed report written as
//! `eval.json` / `eval.md` (`report`). The workflow that generates, scores and writes is
//! `crate::workflow::eval`.

pub mod judge;
pub mod metrics;
pub mod report;
