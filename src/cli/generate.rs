//! `ipo generate`: parse, call `workflow::generate`, print its summary.

use anyhow::Result;

use crate::workflow::generate::{generate, GenerateFiles, GenerateOptions};
use crate::workflow::progress::Reporter;

#[derive(clap::Args, Debug, Clone)]
#[command(about = "Sample rollouts for a prompt set (KV-cached, continuously batched)")]
pub struct Args {
    #[command(flatten)]
    pub files: GenerateFiles,
    #[command(flatten)]
    pub opts: GenerateOptions,
}

pub fn run(args: Args) -> Result<()> {
    let s = generate(&args.files, &args.opts, &Reporter::new())?;
    let out = args.files.output.display();
    if s.written == 0 && s.prefill_tokens == 0 {
        eprintln!("generate: nothing to do ({} already in {out}, {} failed)", s.skipped, s.failed);
    } else {
        eprintln!(
            "generate: wrote {} rollouts ({} failed) to {out}; {} prefill + {} decode tokens in {:.1} s ({:.0} tokens/s), {} preemptions",
            s.written,
            s.failed,
            s.prefill_tokens,
            s.decode_tokens,
            s.seconds,
            s.tokens_per_s(),
            s.preemptions
        );
    }
    Ok(())
}
