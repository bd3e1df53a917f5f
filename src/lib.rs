//! `ipo`: Intervened Preference Optimization, a trainer that aligns the reasoning of
//! reasoning models. The layers, top to bottom (see DESIGN.md section 2):
//! CLI -> pipeline (generate / intervene / score / train) -> model -> Backend (cpu | cuda).

pub mod backend;
pub mod cli;
pub mod gguf;
pub mod intervene;
pub mod io;
pub mod model;
pub mod pipeline;
pub mod rollout;
pub mod train;
pub mod workflow;
