//! `ipo csr`: parse, call `workflow::csr`, print its summary.

use anyhow::Result;

use crate::workflow::csr::{csr, CsrFiles, CsrOptions};
use crate::workflow::progress::Reporter;

/// The flags of `ipo csr`; its help text (what CSR is) is the doc comment of the subcommand in
/// src/main.rs.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub files: CsrFiles,
    #[command(flatten)]
    pub opts: CsrOptions,
}

pub fn run(args: Args) -> Result<()> {
    // Under a launcher, rank 0 alone has the job's summary (and wrote the files).
    let Some(s) = csr(&args.files, &args.opts, &Reporter::new())? else { return Ok(()) };
    let out = args.files.output.display();
    eprintln!(
        "csr: {} rollouts ({} skipped), {} points ({} failed), {} continuations; {} safety triggers, {} unsafe turning points; {} tokens in {:.1} s; wrote {out}/csr.json, csr.png, csr_aligned.png",
        s.traces, s.skipped, s.points, s.failed_points, s.continuations, s.safety_triggers, s.unsafe_turning_points, s.tokens, s.seconds
    );
    Ok(())
}
