//! `ipo score`: parse, call `workflow::score`, print its summary.

use anyhow::Result;

use crate::workflow::progress::Reporter;
use crate::workflow::score::{score, ScoreFiles, ScoreOptions};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub files: ScoreFiles,
    #[command(flatten)]
    pub opts: ScoreOptions,
}

pub fn run(args: Args) -> Result<()> {
    let s = score(&args.files, &args.opts, &Reporter::new())?;
    let input = args.files.input.as_ref().or(args.files.pairs.as_ref()).expect("clap requires one");
    eprintln!(
        "score: wrote {} lines from {} to {} ({} tokens in {:.1} s, {:.0} tokens/s)",
        s.lines,
        input.display(),
        args.files.output.display(),
        s.tokens,
        s.seconds,
        s.tokens_per_s()
    );
    Ok(())
}
