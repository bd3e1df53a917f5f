//! `ipo`: Intervened Preference Optimization, a trainer that aligns the reasoning of
//! reasoning models. The layers, top to bottom (DESIGN.md section 2):
//! CLI (`src/main.rs`, `cli`) -> workflows (`workflow`, `pipeline`: typed options in, typed
//! summaries out) -> rollout engine / intervention / trainer -> model -> `Backend` (cpu | cuda).
//!
//! The public API, re-exported here:
//! - workflows: [`generate()`], [`intervene()`], [`score()`], [`train()`], [`eval()`], [`csr()`], and [`run_pipeline`]
//!   (`ipo run`), each with its `*Files`, `*Options` and `*Summary` types;
//! - model loading: [`ModelDir`] (config, [`Tokenizer`], [`ChatTemplate`], weights) and
//!   [`Transformer`] (forward, backward, [`Transformer::score`]) on a [`Backend`]:
//!   [`CpuBackend`] or [`CudaBackend`] over a real GPU ([`Cudarc`]) or the PTX simulator ([`Sim`]);
//! - rollouts: [`Engine`] (batched, paged KV cache) with [`Engine::splice`];
//! - training: [`Trainer`] with [`TrainConfig`] over [`TrainPair`]s;
//! - the JSONL records: [`Rollout`], [`Pair`], [`ScoreInput`], [`Scored`].

pub mod backend;
pub(crate) mod chart;
pub mod cli;
pub mod csr;
pub mod dist;
pub mod eval;
pub mod gguf;
pub mod intervene;
pub mod io;
pub mod model;
pub mod pipeline;
pub mod rollout;
pub mod train;
pub mod workflow;

pub use backend::cpu::CpuBackend;
pub use backend::cuda::{CudaBackend, Cudarc, Sim};
pub use backend::Backend;
pub use io::records::{Cue, Pair, Rollout, ScoreInput, Scored};
pub use model::chat::ChatTemplate;
pub use model::config::{Family, ModelConfig};
pub use model::tokenizer::Tokenizer;
pub use model::transformer::{ScoreItem, Transformer};
pub use pipeline::run::{run as run_pipeline, RunConfig, RunFlags};
pub use rollout::{Engine, EngineConfig, Event, Finish, Output, Request, SamplingParams, SeqHandle};
pub use train::{OptimConfig, OptimKind, ScheduleKind, StepMetrics, TrainConfig, TrainPair, Trainer};
pub use workflow::csr::{csr, CsrFiles, CsrOptions, CsrSummary};
pub use workflow::device::Device;
pub use workflow::eval::{eval, EvalFiles, EvalOptions, EvalSummary};
pub use workflow::generate::{generate, GenerateFiles, GenerateOptions, GenerateSummary};
pub use workflow::intervene::{intervene, InterveneFiles, InterveneOptions, InterveneSummary};
pub use workflow::model::ModelDir;
pub use workflow::progress::{Progress, Reporter, Silent};
pub use workflow::score::{score, ScoreFiles, ScoreOptions, ScoreSummary};
pub use workflow::train::{train, TrainFiles, TrainOptions, TrainSummary};
