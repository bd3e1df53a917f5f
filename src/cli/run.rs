//! `ipo run`: parse, load and check the whole config (every stage table typed), run the loop.

use std::path::PathBuf;

use anyhow::Result;

use crate::pipeline::run::{run as run_pipeline, RunConfig, RunFlags};
use crate::workflow::device::Device;
use crate::workflow::progress::Reporter;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run configuration (TOML); see configs/demo.toml for every key.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override the config's `run_dir` (where every stage's outputs go).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Re-run every stage from scratch, ignoring the `.done-*` markers and the outputs of an
    /// earlier run.
    #[arg(long)]
    pub force: bool,
    /// The device of every stage (overrides the config's top-level `device`; a stage table's
    /// own `device` key still wins). cpu, cuda, cuda:N or sim, as in each subcommand.
    #[arg(long, value_name = "DEVICE", value_parser = Device::parse)]
    pub device: Option<Device>,
    /// The precision of every stage (overrides the config's top-level `precision`; a stage
    /// table's own key still wins): f32, bf16, q8 or q4, as in each subcommand.
    #[arg(long, value_name = "PRECISION", value_parser = crate::workflow::device::parse_precision)]
    pub precision: Option<crate::backend::Precision>,

}

pub fn run(args: Args) -> Result<()> {
    let cfg = RunConfig::load(&args.config, args.device, args.precision)?;
    let flags = RunFlags { run_dir: args.run_dir, force: args.force };
    run_pipeline(&args.config, &cfg, &flags, &Reporter::new())?;
    Ok(())
}
