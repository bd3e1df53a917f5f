//! `ipo plan`: parse, call `workflow::plan`, print a table (or `--json`) and the verdict.

use anyhow::Result;

use crate::train::plan::{gib, Suggestion};
use crate::workflow::plan::{plan, Estimate, PlanOptions, PlanSummary};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub opts: PlanOptions,
    /// Print the estimate as one JSON object (bytes, FLOPs, verdicts) instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let s = plan(&args.opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", table(&s, &args.opts));
    }
    Ok(())
}

fn tries(t: &[Suggestion]) -> String {
    if t.is_empty() {
        return "no single change of LoRA, precision, recompute, GPUs or micro-batch fits; shorten --context/--segment or --rollout-len".into();
    }
    let each: Vec<String> = t.iter().map(|s| format!("{} ({:.1} GiB)", s.change, gib(s.bytes))).collect();
    format!("try {}", each.join(", or "))
}

fn verdict(e: &Estimate, s: &PlanSummary, gb: f64) -> String {
    if e.fits {
        format!("fits on {} x {gb} GB with {:.1} GiB to spare", s.gpus, gib(e.spare_bytes as u64))
    } else {
        format!(
            "does not fit: needs {:.1} GiB per GPU, have {:.1} GiB ({gb} GB); {}",
            gib(e.total_bytes),
            gib(s.gpu_memory_bytes),
            tries(&e.suggestions)
        )
    }
}

fn table(s: &PlanSummary, o: &PlanOptions) -> String {
    let (p, b) = (&s.plan.memory, &s.this_build.memory);
    let mode = if o.lora_rank > 0 {
        format!("LoRA r={}", o.lora_rank)
    } else {
        "full fine-tuning".into()
    };
    let mut out = format!(
        "{}: {:.2}B parameters; {mode}, {}, AdamW; micro-batch {} pair(s) = {} tokens ({} context + 2 x {} segment each), {} scored rows; {} GPU(s) of {} GB{}\n\n",
        s.config.display(), s.params as f64 / 1e9, o.precision, o.micro_batch_size, s.micro_tokens, o.context, o.segment, s.micro_rows, s.gpus, o.gpu_memory_gb,
        if o.recompute { ", recompute" } else { "" }
    );
    out += "| component | plan GiB/GPU | this build GiB/GPU |\n|---|---:|---:|\n";
    let rows: [(&str, u64, u64); 12] = [
        ("weights (frozen/base)", p.weights, b.weights),
        ("master weights (fp32, trained)", p.master, b.master),
        ("gradients", p.gradients, b.gradients),
        ("optimizer state (AdamW m, v)", p.optimizer, b.optimizer),
        ("activations (saved for backward)", p.activations, b.activations),
        ("workspace (backward, lm-head chunk)", p.workspace, b.workspace),
        ("= training step", p.training(), b.training()),
        ("weights (rollouts, frozen)", p.rollout_weights, b.rollout_weights),
        ("KV cache (rollouts)", p.kv_cache, b.kv_cache),
        ("workspace (rollout step)", p.rollout_workspace, b.rollout_workspace),
        ("= rollouts (weights + KV + workspace)", p.rollout(), b.rollout()),
        ("total (larger stage)", p.total(), b.total()),
    ];
    for (name, x, y) in rows {
        out += &format!("| {name} | {:.2} | {:.2} |\n", gib(x), gib(y));
    }
    out += &format!(
        "\nFLOPs: {:.3e} per optimizer step ({} pairs), {:.3e} per rollout token (at {} positions of context)\n",
        s.flops.train_step,
        o.batch_size,
        s.flops.rollout_token,
        o.rollout_len / 2
    );
    out += "plan: bf16/fp32 storage as designed, ZeRO-1 (master + moments / GPUs), recompute as asked; this build: fp32 buffers (bf16 adds a bf16 copy of each layer matrix, which frozen ones keep alone; under bf16 the saved activations but x, x_mid and Qwen3's q/k before their norm, and the KV cache, in bf16), LoRA trains the adapters only, recompute as asked, AdamW moments / GPUs (`ipo train --zero 1`).\n";
    out += &format!("this build: {}\n", verdict(&s.this_build, s, o.gpu_memory_gb));
    out += &format!("{}\n", verdict(&s.plan, s, o.gpu_memory_gb));
    out
}
