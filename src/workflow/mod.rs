//! The workflows: each stage of the IPO loop as a library function with a typed options
//! struct in and a typed summary out (DESIGN.md section 2). The CLI (`src/cli/`) parses flags
//! into these structs and prints the summaries; `ipo run` (`src/pipeline/`) fills the same
//! structs from its TOML stage tables. Options are defined once, as clap argument groups that
//! are also serde structs (`options`), so a flag and its config key cannot drift apart.

pub mod config;
pub mod csr;
pub mod device;
pub mod eval;
pub mod generate;
pub mod intervene;
pub mod launch;
pub mod model;
pub mod options;
pub mod plan;
pub mod progress;
pub mod score;
pub(crate) mod shard;
pub mod train;
pub mod bench;
