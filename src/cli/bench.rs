//! `ipo bench ceiling|ops|train|decode|init-model`: throughput measurements built into the
//! binary (src/workflow/bench.rs), so a GPU machine without Rust can run them
//! (scripts/gpu-check.sh). Each prints a table and, with `--json FILE`, writes its report.

use crate::workflow::bench::{self, Ceiling, ModelShape};
use crate::workflow::device::{with_backend, Device, DeviceOptions};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// The device's roofline: a bf16 and an fp32 cuBLAS GEMM (TFLOP/s) and a streaming
    /// kernel (GB/s), measured on seeded random data. CUDA (or sim) only.
    Ceiling {
        #[command(flatten)]
        common: Common,
        /// Size n of the n x n x n GEMMs.
        #[arg(long, default_value_t = 8192)]
        gemm: usize,
        /// MiB per operand of the streaming kernel.
        #[arg(long, default_value_t = 2048)]
        copy_mib: usize,
        /// Timed calls (the best counts), after one warm-up.
        #[arg(long, default_value_t = 10)]
        reps: usize,
    },
    /// Every kernel op at one layer of a model shape: ms per call, TFLOP/s or GB/s, and the
    /// share of the ceiling (with --ceiling). CUDA (or sim) only.
    Ops {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "smollm2")]
        shape: ModelShape,
        /// Timed calls per op (the mean counts), after one warm-up.
        #[arg(long, default_value_t = 20)]
        reps: usize,
    },
    /// Full fine-tuning steps (segment DPO, forward + backward + AdamW) of a random-weight
    /// model: tokens/s and model FLOPs utilisation (with --ceiling).
    Train {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "llama1b")]
        shape: ModelShape,
        /// Override the shape's layer count (fewer layers: a quicker, smaller check).
        #[arg(long)]
        layers: Option<usize>,
        /// Preference pairs per optimizer step.
        #[arg(long, default_value_t = 4)]
        pairs: usize,
        /// Context (prompt + shared prefix) tokens per pair.
        #[arg(long, default_value_t = 1024)]
        context: usize,
        /// Tokens of each of the two divergent segments.
        #[arg(long, default_value_t = 512)]
        segment: usize,
        /// Pairs per forward/backward (gradient accumulation over the rest).
        #[arg(long, default_value_t = 2)]
        micro_batch: usize,
        /// Timed optimizer steps after one warm-up step.
        #[arg(long, default_value_t = 2)]
        steps: usize,
    },
    /// Greedy batched decode of a random-weight model at each batch size: tokens/s and the
    /// share of memory bandwidth (with --ceiling). On cuda (and sim) each batch size runs
    /// twice: decode steps replayed as CUDA graphs, then issued launch by launch (the graphs
    /// column; `IPO_CUDA_GRAPHS=0` turns graphs off everywhere else, e.g. `ipo generate`).
    Decode {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "llama1b")]
        shape: ModelShape,
        #[arg(long)]
        layers: Option<usize>,
        /// Batch sizes (comma separated).
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 32, 256])]
        batch: Vec<usize>,
        /// Random prompt tokens per sequence.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// Tokens decoded per sequence.
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
    },
    /// Write a random-weight model folder with FROM's config (optionally fewer layers) and
    /// tokenizer: the default model's shape and vocabulary without its weights.
    InitModel {
        /// A model folder whose config.json and tokenizer files are copied.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// The folder to write.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Layers of the new model (default: FROM's).
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(clap::Args, Debug)]
struct Common {
    #[command(flatten)]
    device: DeviceOptions,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// A `ipo bench ceiling --json` report: adds each result's share of the ceiling.
    #[arg(long, value_name = "FILE")]
    ceiling: Option<PathBuf>,
    /// Seed of the random weights and data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl Common {
    fn ceiling(&self) -> Result<Option<Ceiling>> {
        let Some(p) = &self.ceiling else { return Ok(None) };
        let text = std::fs::read_to_string(p).with_context(|| format!("--ceiling {}", p.display()))?;
        let c = serde_json::from_str(&text).with_context(|| format!("--ceiling {}: not a `ipo bench ceiling --json` report", p.display()))?;
        Ok(Some(c))
    }

    fn write(&self, report: &impl serde::Serialize) -> Result<()> {
        if let Some(p) = &self.json {
            write_json(p, report)?;
        }
        Ok(())
    }
}

fn write_json(p: &Path, report: &impl serde::Serialize) -> Result<()> {
    std::fs::write(p, serde_json::to_string_pretty(report)? + "\n").with_context(|| format!("--json {}", p.display()))
}

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |f| format!("{:.1}%", 100.0 * f))
}

pub fn run(a: Args) -> Result<()> {
    match a.what {
        What::Ceiling { common, gemm, copy_mib, reps } => {
            let c = match common.device.device {
                Device::Cuda(n) => bench::ceiling(&crate::workflow::device::cuda(n, common.device.precision)?, gemm, copy_mib, reps)?,
                Device::Sim => bench::ceiling(&crate::workflow::device::sim(common.device.precision)?, gemm, copy_mib, reps)?,
                Device::Cpu => bail!("--device cpu: the ceiling is measured with cuBLAS and a CUDA kernel; use cuda or sim"),
            };
            println!("{}", c.device);
            println!("| bf16 GEMM {n}^3 | fp32 GEMM {n}^3 | streaming ({copy_mib} MiB x 3) |", n = c.gemm_n);
            println!("|---|---|---|");
            println!("| {:.1} TFLOP/s | {:.1} TFLOP/s | {:.0} GB/s |", c.gemm_bf16_tflops, c.gemm_f32_tflops, c.stream_gbs);
            common.write(&c)
        }
        What::Ops { common, shape, reps } => {
            let ceil = common.ceiling()?;
            let r = match common.device.device {
                Device::Cuda(n) => bench::ops(&crate::workflow::device::cuda(n, common.device.precision)?, shape, reps, ceil.as_ref(), common.seed)?,
                Device::Sim => bench::ops(&crate::workflow::device::sim(common.device.precision)?, shape, reps, ceil.as_ref(), common.seed)?,
                Device::Cpu => bail!("--device cpu: per-op timing uses CUDA events; use cuda or sim"),
            };
            println!("{} ({}), {}", r.device, r.precision, r.workload);
            println!("| op | ms | GFLOP | MB | TFLOP/s | GB/s | bound | of peak |");
            println!("|---|---|---|---|---|---|---|---|");
            for o in &r.rows {
                println!(
                    "| {} | {:.4} | {:.3} | {:.2} | {:.2} | {:.0} | {:?} | {} |",
                    o.op, o.ms, o.gflop, o.mbytes, o.tflops, o.gbs, o.bound, pct(o.of_peak)
                );
            }
            common.write(&r)
        }
        What::Train { common, shape, layers, pairs, context, segment, micro_batch, steps } => {
            if pairs == 0 || steps == 0 || context == 0 || segment == 0 {
                bail!("--pairs, --steps, --context and --segment must be at least 1");
            }
            let ceil = common.ceiling()?;
            let r = with_backend!(common.device, be => {
                bench::train(be, shape, layers, pairs, context, segment, micro_batch, steps, ceil.as_ref(), common.seed)?
            });
            println!("{} | {:?} x {} layers, {:.2} B params", r.device, r.shape, r.layers, r.params as f64 / 1e9);
            println!("| pairs x (context + 2 x segment) | tokens/step | s/step | tokens/s | TFLOP/s | MFU (bf16 ceiling) | losses |");
            println!("|---|---|---|---|---|---|---|");
            let secs = r.step_seconds.iter().sum::<f64>() / r.step_seconds.len() as f64;
            let losses: Vec<String> = r.losses.iter().map(|l| format!("{l:.4}")).collect();
            println!(
                "| {} x ({} + 2 x {}) | {} | {:.3} | {:.0} | {:.1} | {} | {} |",
                r.pairs, r.context, r.segment, r.tokens, secs, r.tokens_per_s, r.tflops, pct(r.mfu), losses.join(", ")
            );
            common.write(&r)
        }
        What::Decode { common, shape, layers, batch, prompt, new_tokens } => {
            if batch.contains(&0) || new_tokens < 2 || prompt == 0 {
                bail!("--batch sizes must be at least 1, --new-tokens at least 2, --prompt at least 1");
            }
            let ceil = common.ceiling()?;
            let r = with_backend!(common.device, be => {
                bench::decode(be, shape, layers, &batch, prompt, new_tokens, ceil.as_ref(), common.seed)?
            });
            println!("{} | {:?} x {} layers", r.device, r.shape, r.layers);
            println!("| batch | graphs | prompt | new | decode tokens/s | prefill tokens/s | GB/step | GB/s | of bandwidth |");
            println!("|---|---|---|---|---|---|---|---|---|");
            for d in &r.rows {
                // on: (steps replayed + captured) of all steps; the rest ran launch by launch
                let graphs = match d.graphs {
                    Some(true) => format!("on ({}/{} steps)", d.steps.replayed + d.steps.captured, d.steps.steps),
                    Some(false) => "off".into(),
                    None => "-".into(),
                };
                println!(
                    "| {} | {graphs} | {} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {} |",
                    d.batch, d.prompt, d.new_tokens, d.tokens_per_s, d.prefill_tokens_per_s, d.gbytes_per_step, d.gbs, pct(d.of_bandwidth)
                );
            }
            common.write(&r)
        }
        What::InitModel { from, out, layers, seed } => {
            let cfg = bench::init_model(&from, &out, layers, seed)?;
            println!(
                "wrote {}: {} layers, hidden {}, vocab {}, {:.1} M random parameters",
                out.display(),
                cfg.num_layers,
                cfg.hidden_size,
                cfg.vocab_size,
                cfg.param_count().unwrap_or(0) as f64 / 1e6
            );
            Ok(())
        }
    }
}
