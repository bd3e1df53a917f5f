//! `ipo launch`: parse, call `workflow::launch`, report.

use anyhow::Result;

use crate::workflow::launch::{launch, LaunchOptions};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub opts: LaunchOptions,
}

pub fn run(args: Args) -> Result<()> {
    let s = launch(&args.opts)?;
    eprintln!("launch: ranks {:?} of {} finished", s.ranks, s.world);
    Ok(())
}

/// Refuses to run subcommand `name` as one rank of a larger job (WORLD_SIZE, or srun's
/// SLURM_NTASKS, above 1): every rank would write the same outputs. `train` runs data
/// parallel; `generate`, `intervene`, `score`, `eval` and `csr` shard their inputs
/// (`workflow::shard`); `run` does both, stage by stage. What is left (`import-gguf`, `plan`,
/// `bench`, `selftest`) works on one machine's files or devices and has nothing to shard.
pub fn refuse_world_above_1(name: &str) -> Result<()> {
    let get = |k: &str| std::env::var(k).ok();
    let (var, world) = match get("WORLD_SIZE") {
        Some(w) => ("WORLD_SIZE", w),
        None if get("SLURM_PROCID").is_some() => ("SLURM_NTASKS", get("SLURM_NTASKS").unwrap_or_default()),
        None => return Ok(()),
    };
    if world.trim().parse::<usize>().is_ok_and(|w| w > 1) {
        anyhow::bail!(
            "ipo {name} does not run data parallel ({var}={world} from the environment): run it in one process, without ipo launch / torchrun / srun; `ipo train` (data parallel), `ipo generate` (sharded prompts), `ipo intervene` (sharded rollouts), `ipo score` (sharded lines), `ipo eval` (sharded prompts and forwards), `ipo csr` (sharded rollouts) and `ipo run` are the multi-process commands"
        );
    }
    Ok(())
}
