//! The rollout engine (DESIGN.md section 2): a paged, reference-counted KV cache
//! (`blocks`), counter-based sampling (`sampler`) and the continuous-batching engine with
//! the mid-sequence splice that `ipo intervene` builds on (`engine`). The model side of the
//! cached forward is `model::decode`; the cache ops are on the `Backend` trait.

pub mod blocks;
pub mod engine;
pub mod fingerprint;
pub mod sampler;

pub use engine::{Engine, EngineConfig, EngineStats, Event, Finish, Output, Request, SeqHandle};
pub(crate) use engine::StopCheck;
pub use sampler::{key_of, SamplingParams};
