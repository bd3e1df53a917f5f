//! Subcommands of the `ipo` binary; each file holds its clap `Args` and a `run` function.

pub mod bench;
pub mod csr;
pub mod eval;
pub mod generate;
pub mod import_gguf;
pub mod intervene;
pub mod launch;
pub mod plan;
pub mod run;
pub mod score;
pub mod selftest;
pub mod train;
