//! `ipo intervene`: parse, call `workflow::intervene`, print its summary.

use anyhow::Result;

use crate::workflow::intervene::{intervene, sibling, InterveneFiles, InterveneOptions, InterveneSummary};
use crate::workflow::progress::Reporter;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub files: InterveneFiles,
    #[command(flatten)]
    pub opts: InterveneOptions,
}

pub fn run(args: Args) -> Result<()> {
    let s = intervene(&args.files, &args.opts, &Reporter::new())?;
    print_summary(&s, &args.files);
    Ok(())
}

fn print_summary(summary: &InterveneSummary, files: &InterveneFiles) {
    let s = &summary.stats;
    eprintln!("intervene: {} -> {}", s.detector, files.output.display());
    eprintln!(
        "  prompts {} (benign skipped {}, input errors {}), with cue {}, no cue {}, cut at the answer's start {}",
        s.prompts, s.skipped_benign, s.input_errors, s.with_cue, s.skipped_no_cue, s.cut_at_answer_start
    );
    eprintln!(
        "  splices {}, pairs {} (per round {:?}), still unsafe {}, cue-free rate {:.3} (round 1: {:.3})",
        s.attempts, s.pairs, s.pairs_per_round, s.skipped_still_unsafe, s.cue_free_rate, s.cue_free_rate_round1
    );
    eprintln!(
        "  detector errors {}, generation errors {}, tokens generated {} in {:.1} s ({:.0} tokens/s)",
        s.detector_errors,
        s.generation_errors,
        s.tokens_generated,
        s.seconds,
        summary.tokens_per_s()
    );
    if let (Some(calls), Some(hits)) = (summary.judge_calls, summary.judge_cache_hits) {
        eprintln!("  judge requests {calls}, cache hits {hits}");
    }
    if summary.item_errors > 0 {
        eprintln!("  {} per-item errors in {}", summary.item_errors, sibling(&files.output, "errors.jsonl").display());
    }
}
