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
    // The optimizer side on more than one GPU: sharded (ZeRO-1) or replicated (--zero 0).
    let sharded = s.gpus > 1 && s.zero == 1;
    let (zero, side) = match (s.gpus > 1, sharded) {
        (false, _) => ("", String::new()),
        (true, true) => (", ZeRO-1", format!("; / {} GPUs", s.gpus)),
        (true, false) => (", --zero 0", "; replicated".into()),
    };
    let mut out = format!(
        "{}: {:.2}B parameters; {mode}, {}, AdamW; micro-batch {} pair(s) = {} tokens ({} context + 2 x {} segment each), {} scored rows; {} GPU(s) of {} GB{zero}{}\n\n",
        s.config.display(), s.params as f64 / 1e9, o.precision, o.micro_batch_size, s.micro_tokens, o.context, o.segment, s.micro_rows, s.gpus, o.gpu_memory_gb,
        if o.recompute { ", recompute" } else { "" }
    );
    let (master, moments) = (format!("master weights (fp32, trained{side})"), format!("optimizer state (AdamW m, v{side})"));
    out += "| component | plan GiB/GPU | this build GiB/GPU |\n|---|---:|---:|\n";
    let rows: [(&str, u64, u64); 12] = [
        ("weights (frozen/base)", p.weights, b.weights),
        (&master, p.master, b.master),
        ("gradients", p.gradients, b.gradients),
        (&moments, p.optimizer, b.optimizer),
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
    let (plan_side, this_side) = if sharded {
        (
            "ZeRO-1 (master + moments / GPUs)".to_string(),
            "ZeRO-1 as `ipo train --zero 1` (full fine-tuning: each GPU keeps the fp32 master and AdamW moments of its 1/N slice, and under bf16 the layer matrices in bf16 only; LoRA: the adapters' moments / GPUs)".to_string(),
        )
    } else {
        let whole = if s.gpus > 1 { "whole on each GPU (--zero 0)" } else { "whole (one GPU)" };
        (
            format!("master + moments {whole}"),
            format!("full fine-tuning's trained weights their own fp32 master, AdamW moments {whole}"),
        )
    };
    out += &format!("plan: bf16/fp32 storage as designed, {plan_side}, recompute as asked; this build: fp32 buffers (bf16 adds a bf16 copy of each layer matrix, which frozen ones keep alone; under bf16 the saved activations but Qwen3's q/k before their norm (and under recompute x, x_mid), and the KV cache, in bf16), LoRA trains the adapters only, recompute as asked, {this_side}.\n");
    out += &format!("this build: {}\n", verdict(&s.this_build, s, o.gpu_memory_gb));
    out += &format!("{}\n", verdict(&s.plan, s, o.gpu_memory_gb));
    out
}
