//! `--device sim` through the subcommands, against `--device cpu` on the same inputs: the
//! whole CLI path (loading, batching, KV cache, sampling, optimizer, outputs) runs on
//! `CudaBackend<Sim>`, i.e. the PTX a GPU would run, and must give the CPU's results.
//! - `ipo score --pairs` on the tiny HF fixtures of all 3 families: per-token log-probs within
//!   2e-5 (two f32 implementations through 2 layers, as tests/cuda_sim_model.rs).
//! - `ipo generate`, greedy and sampled: identical token ids (the sampler's draws are
//!   counter-based; a flip would need logits within ~1e-6 of a tie).
//! - `ipo train` (AdamW, clipping, 2 steps): every metric within 1e-4 relative and the saved
//!   weights within 1e-4 of each tensor's scale.
//! - `--precision bf16` on sim (bf16 products, fp32 sums; the layer matrices frozen in bf16 by
//!   `score` and by LoRA's `train`) against cpu in fp32: `ipo score` per-token log-probs and
//!   `ipo train --lora-rank 4` (SGD) losses and adapters within the bf16 bounds stated there,
//!   and different from sim in fp32 (the bf16 path ran).
//! - bad `--device` values are refused naming the flag.
//!
//! Without NVRTC the sim cases print a skip notice, or fail under CI=true.

mod common;

use std::path::Path;

use clap::Parser;
use common::{byte_tokenizer_json, tiny_fixture, tiny_llama_with_tokenizer, write_random_pairs};
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

macro_rules! cli {
    ($name:ident, $module:path) => {
        fn $name(flags: &[&str]) -> anyhow::Result<()> {
            use $module as m;
            #[derive(Parser)]
            struct Cli {
                #[command(flatten)]
                args: m::Args,
            }
            let mut argv = vec!["ipo"];
            argv.extend_from_slice(flags);
            m::run(Cli::try_parse_from(argv)?.args)
        }
    };
}
cli!(score, ipo::cli::score);
cli!(generate, ipo::cli::generate);
cli!(train, ipo::cli::train);

fn read_lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn bad_device_values_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("p.jsonl");
    write_random_pairs(&pairs, 2, 1);
    let out = dir.path().join("o.jsonl");
    for bad in ["gpu", "cuda:x"] {
        let e = score(&["--model", s(&tiny_fixture("llama")), "--pairs", s(&pairs), "--output", s(&out), "--device", bad]).unwrap_err();
        assert!(format!("{e:#}").contains(&format!("--device {bad}")), "{e:#}");
        let e = train(&["--model", s(&tiny_fixture("llama")), "--pairs", s(&pairs), "--output", s(&dir.path().join("t")), "--device", bad]).unwrap_err();
        assert!(format!("{e:#}").contains(&format!("--device {bad}")), "{e:#}");
    }
    assert!(!out.exists(), "nothing is written on a bad flag");
}

#[test]
fn score_pairs_on_sim_matches_cpu_for_every_family() {
    if common::sim().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 4, 11);
    for fam in ["llama", "qwen2", "qwen3"] {
        let (oc, og) = (dir.path().join(format!("{fam}-cpu.jsonl")), dir.path().join(format!("{fam}-sim.jsonl")));
        score(&["--model", s(&tiny_fixture(fam)), "--pairs", s(&pairs), "--output", s(&oc), "--device", "cpu"]).unwrap();
        score(&["--model", s(&tiny_fixture(fam)), "--pairs", s(&pairs), "--output", s(&og), "--device", "sim", "--batch-tokens", "24"]).unwrap();
        let (lc, lg) = (read_lines(&oc), read_lines(&og));
        assert_eq!(lc.len(), 4);
        let mut worst = 0f32;
        for (a, b) in lc.iter().zip(&lg) {
            for key in ["ref_chosen_logp", "ref_rejected_logp"] {
                let (x, y) = (a[key].as_f64().unwrap() as f32, b[key].as_f64().unwrap() as f32);
                assert!(x.is_finite() && x < 0.0, "{fam} {key}: {x}");
                worst = worst.max((x - y).abs());
            }
        }
        eprintln!("{fam}: max |ref logp (sim) - ref logp (cpu)| = {worst:.2e}");
        // Summed over up to 6 tokens: 6 x the per-token bound.
        assert!(worst <= 6.0 * 2e-5, "{fam}: {worst}");
    }
}

#[test]
fn generate_on_sim_gives_the_cpu_tokens() {
    if common::sim().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A byte-level tokenizer, no chat template.
    let model = tiny_llama_with_tokenizer(dir.path(), &byte_tokenizer_json());
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"id\": \"a\", \"prompt\": \"How do I\"}\n{\"id\": \"b\", \"prompt\": \"Tell me a story about x\"}\n{\"id\": \"c\", \"prompt\": \"Q\"}\n").unwrap();
    for (tag, extra) in [("greedy", vec!["--temperature", "0"]), ("sampled", vec!["--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--n", "2"])] {
        let mut outs = Vec::new();
        for dev in ["cpu", "sim"] {
            let out = dir.path().join(format!("{tag}-{dev}.jsonl"));
            let mut flags = vec![
                "--model", s(&model), "--prompts", s(&prompts), "--output", s(&out), "--no-chat-template", "--max-new-tokens", "12",
                "--block-size", "4", "--seed", "3", "--device", dev,
            ];
            flags.extend_from_slice(&extra);
            generate(&flags).unwrap();
            let mut lines = read_lines(&out);
            lines.sort_by_key(|l| (l["id"].as_str().unwrap().to_string(), l["sample"].as_u64().unwrap()));
            outs.push(lines);
        }
        assert_eq!(outs[0].len(), outs[1].len());
        assert!(!outs[0].is_empty());
        for (c, g) in outs[0].iter().zip(&outs[1]) {
            assert_eq!(c["id"], g["id"]);
            assert!(!c["completion_ids"].as_array().unwrap().is_empty(), "{c}");
            assert_eq!(c["completion_ids"], g["completion_ids"], "{tag}: id {} sample {}", c["id"], c["sample"]);
        }
    }
}

fn read_safetensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n}");
            (n, t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn train_on_sim_matches_cpu() {
    if common::sim().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 4, 5);
    let mut metrics = Vec::new();
    let mut weights = Vec::new();
    for dev in ["cpu", "sim"] {
        let out = dir.path().join(dev);
        train(&[
            "--model", s(&tiny_fixture("qwen3")), "--pairs", s(&pairs), "--output", s(&out), "--beta", "0.2", "--sft-coef", "0.1", "--lr", "3e-3",
            "--weight-decay", "0.01", "--max-grad-norm", "0.5", "--batch-size", "2", "--micro-batch-size", "2", "--epochs", "1",
            "--seed", "5", "--device", dev,
        ])
        .unwrap();
        metrics.push(read_lines(&out.join("metrics.jsonl")));
        weights.push(read_safetensors(&out.join("final/model.safetensors")));
    }
    assert_eq!(metrics[0].len(), 2);
    for (c, g) in metrics[0].iter().zip(&metrics[1]) {
        for key in ["loss", "dpo_loss", "sft_nll", "reward_margin", "grad_norm", "lr"] {
            let (x, y) = (c[key].as_f64().unwrap(), g[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "step {} {key}: cpu {x} sim {y}", c["step"]);
        }
        // Clipping engaged (max norm 0.5), so the update path with a clip factor was compared.
        assert!(c["grad_norm"].as_f64().unwrap() > 0.5, "{c}");
    }
    let base = read_safetensors(&tiny_fixture("qwen3").join("model.safetensors"));
    assert_eq!(weights[0].len(), weights[1].len());
    let mut moved = 0;
    for ((n, c), (n2, g)) in weights[0].iter().zip(&weights[1]) {
        assert_eq!(n, n2);
        let scale = c.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
        let err = c.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * scale, "{n}: max |sim - cpu| = {err} (scale {scale})");
        if let Some((_, b)) = base.iter().find(|(bn, _)| bn == n) {
            moved += (b != c) as usize;
        }
    }
    assert!(moved > 0, "training changed no weight");
}

#[test]
fn selftest_times_the_workload_on_sim() {
    if common::sim().is_none() {
        return;
    }
    cli!(selftest, ipo::cli::selftest);
    selftest(&["--device", "sim", "--ops", "add_assign,segment_dpo", "--time", "--reps", "2"]).unwrap();
    let e = selftest(&["--device", "sim", "--ops", "nope"]).unwrap_err();
    assert!(format!("{e:#}").contains("--ops: unknown op nope"), "{e:#}");
}

/// bf16 on sim against fp32 on cpu, `ipo score` and LoRA `ipo train`. The bounds: every matmul
/// operand is rounded to bf16 (relative error <= 2^-9 each), so a product moves by up to about
/// 2^-8 of the magnitudes it sums; through the tiny fixtures' 2 layers and the lm-head that
/// is about 1e-2 of a log-prob's size per token. We allow 2e-2 per token (sums of up to 6
/// tokens: 6 x that), losses within 2e-2 relative, and the trained adapters' change within 5e-2
/// of its largest value (SGD: the change is lr x the bf16 gradient).
#[test]
fn score_and_lora_train_in_bf16_on_sim_match_cpu_fp32() {
    if common::sim().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 4, 17);
    for fam in ["llama", "qwen2", "qwen3"] {
        let mut outs = Vec::new();
        for (dev, prec) in [("cpu", "f32"), ("sim", "bf16"), ("sim", "f32")] {
            let o = dir.path().join(format!("{fam}-{dev}-{prec}.jsonl"));
            score(&["--model", s(&tiny_fixture(fam)), "--pairs", s(&pairs), "--output", s(&o), "--device", dev, "--precision", prec]).unwrap();
            outs.push(read_lines(&o));
        }
        let (mut worst, mut bf16_moved) = (0f64, 0f64);
        for ((c, b), f) in outs[0].iter().zip(&outs[1]).zip(&outs[2]) {
            for key in ["ref_chosen_logp", "ref_rejected_logp"] {
                let (x, y, z) = (c[key].as_f64().unwrap(), b[key].as_f64().unwrap(), f[key].as_f64().unwrap());
                worst = worst.max((x - y).abs());
                bf16_moved = bf16_moved.max((y - z).abs());
            }
        }
        eprintln!("{fam}: score, max |sim bf16 - cpu f32| = {worst:.2e}, max |sim bf16 - sim f32| = {bf16_moved:.2e}");
        assert!(worst <= 6.0 * 2e-2, "{fam}: {worst}");
        assert!(bf16_moved > 1e-5, "{fam}: bf16 and fp32 gave the same log-probs: the bf16 path did not run");
    }
    let mut runs = Vec::new();
    for (dev, prec) in [("cpu", "f32"), ("sim", "bf16")] {
        let out = dir.path().join(format!("lora-{dev}-{prec}"));
        train(&[
            "--model", s(&tiny_fixture("qwen3")), "--pairs", s(&pairs), "--output", s(&out), "--beta", "0.2", "--sft-coef", "0.1", "--lr", "0.5",
            "--optimizer", "sgd", "--schedule", "constant", "--warmup-ratio", "0", "--max-grad-norm", "0", "--batch-size", "2", "--micro-batch-size", "1", "--epochs", "1",
            "--lora-rank", "4", "--seed", "5", "--device", dev, "--precision", prec,
        ])
        .unwrap();
        runs.push((read_lines(&out.join("metrics.jsonl")), read_safetensors(&out.join("final/adapter_model.safetensors"))));
    }
    let ((mc, ac), (mb, ab)) = (&runs[0], &runs[1]);
    assert_eq!(mc.len(), 2);
    for (c, b) in mc.iter().zip(mb) {
        for key in ["loss", "dpo_loss", "sft_nll"] {
            let (x, y) = (c[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            eprintln!("lora step {}: {key} cpu {x} sim bf16 {y}", c["step"]);
            assert!((x - y).abs() <= 2e-2 * x.abs().max(1.0), "step {} {key}: cpu {x} sim bf16 {y}", c["step"]);
        }
    }
    for ((n, c), (n2, b)) in ac.iter().zip(ab) {
        assert_eq!(n, n2);
        if !n.contains("lora_B") {
            continue; // A moves by lr x dA from its seeded init, B from zero: B's values are the change
        }
        let scale = c.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = c.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        eprintln!("{n}: max |sim bf16 - cpu| / scale = {:.2e}", err / scale.max(f32::MIN_POSITIVE));
        assert!(scale > 0.0, "{n}: LoRA B did not move");
        assert!(err <= 5e-2 * scale, "{n}: max |sim bf16 - cpu| = {err} (scale {scale})");
    }
}
