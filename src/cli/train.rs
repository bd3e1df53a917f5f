//! `ipo train`: parse, call `workflow::train`, print its summary.

use anyhow::Result;

use crate::workflow::progress::Reporter;
use crate::workflow::train::{train, RefLogps, TrainFiles, TrainOptions};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub files: TrainFiles,
    #[command(flatten)]
    pub opts: TrainOptions,
}

pub fn run(args: Args) -> Result<()> {
    let s = train(&args.files, &args.opts, &Reporter::new())?;
    let cache = args.files.output.join("ref_pairs.jsonl");
    match s.ref_logps {
        RefLogps::Pairs => {}
        RefLogps::Cached => eprintln!("train: reference log-probs from {}", cache.display()),
        RefLogps::Computed => eprintln!("train: reference log-probs computed with the base model -> {}", cache.display()),
    }
    if let Some(r) = &s.resumed_from {
        eprintln!("train: resumed from {} at step {}", r.display(), s.step - s.steps);
    }
    if let Some(m) = &s.last {
        eprintln!(
            "train: {} steps ({} tokens, {:.0} tokens/s), last: loss {:.4} margin {:.4} acc {:.2}; {:.1} s in all",
            s.steps, s.tokens, s.tokens_per_s, m.loss, m.reward_margin, m.reward_accuracy, s.seconds
        );
    }
    if s.world > 1 {
        eprintln!("train: optimizer state of rank {} of {}: {} elements (AdamW m and v)", s.rank, s.world, s.optimizer_state_elems);
    }
    match (&s.final_dir, &s.checkpoint) {
        (Some(f), _) => {
            let merged = s.merged_dir.as_ref().map(|d| format!(", merged model in {}", d.display())).unwrap_or_default();
            eprintln!("train: done, {} steps; model in {}{merged}", s.total_steps, f.display());
        }
        (None, Some(c)) => eprintln!("train: stopped after step {} of {} (--stop-after); checkpoint {}", s.step, s.total_steps, c.display()),
        (None, None) => {}
    }
    Ok(())
}
