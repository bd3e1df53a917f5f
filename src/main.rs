//! The `ipo` command line: one subcommand per stage of the IPO loop (DESIGN.md section 1).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ipo", version, about = "Intervened Preference Optimization: align the reasoning of reasoning models")]
struct Cli {
    /// Print more about the machine: where each CUDA library was found (with --device cuda).
    #[arg(long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample rollouts for a prompt set: KV-cached, continuously batched, chat-templated;
    /// appends one JSONL line per finished sample (--resume continues an interrupted run).
    Generate(ipo::cli::generate::Args),
    /// Find the first compliance cue of each rollout, splice safety triggers in at that token,
    /// continue from the cached prefix, and write preference pairs (IPO Algorithm 1).
    Intervene(ipo::cli::intervene::Args),
    /// Continuation Safety Ratio curves of rollouts (K continuations forked at every N-th
    /// token, judged safe or unsafe); safety triggers, unsafe turning points, PNG charts.
    ///
    /// CSR(p), for a rollout and a completion position p, is the share of K continuations,
    /// sampled from the prompt plus the first p completion tokens, that the judge labels safe
    /// (IPO paper). The continuations fork the cached trace: the rollout is prefilled once and
    /// every fork reuses its K/V. The rule judge reads the completion prefix plus the
    /// continuation: unsafe when a sentence is a compliance cue and no later sentence refuses.
    ///
    /// Per rollout, OUT/csr.json holds the positions, CSR values, safe counts, the first
    /// compliance cue and the events: a safety trigger where CSR rises above 0.9 and stays
    /// above it for at least 15 tokens, an unsafe turning point where it falls below 0.1 and
    /// stays below it for at least 15 tokens. OUT/csr.png draws the curves, OUT/csr_aligned.png
    /// the mean curve aligned at the first compliance cue. With --base, every curve is
    /// computed under both models on the same rollouts, positions and random keys.
    Csr(ipo::cli::csr::Args),
    /// Per-token log-probs of target segments given a context; or fill reference log-probs
    /// into a pairs file (--pairs).
    Score(ipo::cli::score::Args),
    /// DPO on the divergent segment of preference pairs (plus optional SFT term); full
    /// fine-tuning or LoRA; checkpoints, resume, metrics.jsonl and a chart.
    Train(ipo::cli::train::Args),
    /// Memory per GPU and FLOPs of a training setup, before it runs: weights, master weights,
    /// gradients, AdamW state, saved activations, workspace and the rollouts' KV cache for a
    /// model (folder or config.json), precision, LoRA rank, pair lengths and GPUs; says whether
    /// it fits and, if not, which change of the flags would.
    ///
    /// Two columns: the plan (the design's storage: bf16 weights and activations, fp32 master
    /// weights and moments sharded over the GPUs ZeRO-1 style, optional recomputation), which
    /// the last line is about; and this build (what `ipo train` allocates today and checks
    /// against the device's memory before it starts).
    Plan(ipo::cli::plan::Args),
    /// Harmful ratio of reasoning and of response (rule or LLM judge), refusal rates, helpful-answer
    /// and prose NLL ratios and degenerate share of a model beside its base, with 95% intervals:
    /// OUT/eval.json, eval.md, eval.png, answers.jsonl.
    Eval(ipo::cli::eval::Args),
    /// Convert a GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1) into a Hugging Face model folder.
    ImportGguf(ipo::cli::import_gguf::Args),
    /// Run every CUDA kernel against the CPU reference (on a GPU, or the PTX simulator) and
    /// print a parity table.
    Selftest(ipo::cli::selftest::Args),
    /// The whole IPO loop from one TOML config (generate -> intervene -> score -> train stage 1
    /// -> benign pairs -> train stage 2 -> eval), resumable in its run directory.
    Run(ipo::cli::run::Args),
    /// Start one process per rank of a data-parallel job on this node, like torchrun:
    /// `ipo launch --nproc N [--nnodes M --node-rank R --master-addr HOST --master-port P] --
    /// train ...`.
    ///
    /// Each child runs the subcommand after `--` with RANK (node_rank * nproc + local),
    /// WORLD_SIZE (nnodes * nproc), LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    /// set; its output comes out prefixed `[rank R]`. The ranks meet at MASTER_ADDR:MASTER_PORT
    /// (rank 0 listens) within IPO_DIST_TIMEOUT seconds (default 600), which also bounds every
    /// wait of a collective. If a rank exits with a failure, the others are stopped and launch
    /// fails naming it. torchrun and srun launches work without it: `ipo train` reads the same
    /// variables (Slurm's SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID as fallbacks).
    ///
    /// `train` runs data parallel (gradients summed with NCCL on --device cuda, through the
    /// host TCP group on cpu and sim); `generate`, `score`, `intervene`, `eval` and `csr` shard
    /// their inputs, and `run` does both, stage by stage.
    Launch(ipo::cli::launch::Args),
    /// Throughput measurements on seeded random data (the device's ceiling, per-op rates,
    /// training steps, batched decode) and random-weight model folders; used by
    /// scripts/gpu-check.sh.
    Bench(ipo::cli::bench::Args),
}

fn main() {
    let cli = Cli::parse();
    ipo::workflow::device::set_verbose(cli.verbose);
    let name = match &cli.command {
        Command::Train(_)
        | Command::Generate(_)
        | Command::Intervene(_)
        | Command::Score(_)
        | Command::Eval(_)
        | Command::Csr(_)
        | Command::Run(_)
        | Command::Launch(_) => None,
        Command::ImportGguf(_) => Some("import-gguf"),
        Command::Selftest(_) => Some("selftest"),
        Command::Bench(_) => Some("bench"),
        Command::Plan(_) => Some("plan"),
    };
    if let Err(e) = name.map_or(Ok(()), ipo::cli::launch::refuse_world_above_1) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    let result = match cli.command {
        Command::Generate(a) => ipo::cli::generate::run(a),
        Command::Csr(a) => ipo::cli::csr::run(a),
        Command::Score(a) => ipo::cli::score::run(a),
        Command::Intervene(a) => ipo::cli::intervene::run(a),
        Command::Eval(a) => ipo::cli::eval::run(a),
        Command::ImportGguf(a) => ipo::cli::import_gguf::run(a),
        Command::Train(a) => ipo::cli::train::run(a),
        Command::Selftest(a) => ipo::cli::selftest::run(a),
        Command::Run(a) => ipo::cli::run::run(a),
        Command::Bench(a) => ipo::cli::bench::run(a),
        Command::Plan(a) => ipo::cli::plan::run(a),
        Command::Launch(a) => ipo::cli::launch::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
