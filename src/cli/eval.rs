//! `ipo eval`: parse, call `workflow::eval`, print the table of eval.md and where the files are.

use anyhow::Result;

use crate::workflow::eval::{eval, EvalFiles, EvalOptions};
use crate::workflow::progress::Reporter;

#[derive(clap::Args, Debug, Clone)]
#[command(
    about = "Evaluate a model beside its base: harmful ratio of reasoning and response, refusal rates, NLL ratios, degenerate share",
    long_about = "Evaluate a model beside its base model. On the harmful prompts: the harmful ratio of the reasoning (text before </think>) and of the response (text after it; a completion without think tags counts as both) under the rule or LLM judge, and the refusal rate. On the benign prompts: the refusal rate (over-refusal). Utility: the helpful-answer NLL ratio (the base model's greedy answers to the benign prompts, mean per-token NLL under the model / under the base), the prose NLL ratio, and the share of degenerate completions (distinct word bigrams / bigrams < 0.5). Greedy always, and --n samples per prompt. Proportions carry 95% Wilson intervals, ratios a seeded bootstrap over prompts. Writes OUT/eval.json, eval.md, eval.png, answers.jsonl (every completion with its labels) and eval.errors.jsonl (items left out)."
)]
pub struct Args {
    #[command(flatten)]
    pub files: EvalFiles,
    #[command(flatten)]
    pub opts: EvalOptions,
}

pub fn run(args: Args) -> Result<()> {
    // Under a launcher, rank 0 alone has the report to print.
    let Some(s) = eval(&args.files, &args.opts, &Reporter::new())? else { return Ok(()) };
    println!("{}", s.markdown);
    let out = args.files.output.display();
    eprintln!(
        "eval: {} completions ({} tokens generated) in {:.1} s; {out}/eval.json, eval.md, answers.jsonl",
        s.answers, s.tokens_generated, s.seconds
    );
    match &s.chart_error {
        None => eprintln!("  chart: {out}/eval.png"),
        Some(e) => eprintln!("  warning: eval.png not drawn: {e}"),
    }
    if let (Some(calls), Some(hits)) = (s.judge_calls, s.judge_cache_hits) {
        eprintln!("  judge requests {calls}, cache hits {hits}");
    }
    if s.errors > 0 {
        eprintln!("  {} items left out, each listed in {out}/eval.errors.jsonl", s.errors);
    }
    Ok(())
}
