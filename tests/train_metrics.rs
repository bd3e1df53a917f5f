//! metrics.jsonl of `ipo train` carries TRL DPOTrainer's metric names beside ours, with the
//! values TRL would log: checked for consistency with each other, with our own names, and
//! against policy log-probs scored independently (`ipo score`) from the base model and from
//! the step-1 checkpoint. The run also writes the metrics.png chart.

mod common;

use std::path::Path;

use clap::Parser;
use common::{tiny_fixture, write_random_pairs};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ipo::cli::train::Args,
}

fn train(flags: &[&str]) -> anyhow::Result<()> {
    let mut argv = vec!["ipo-train"];
    argv.extend_from_slice(flags);
    ipo::cli::train::run(Cli::try_parse_from(argv)?.args)
}

fn read_jsonl(path: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Mean of `key` (a summed segment log-prob) over the pairs of a scored pairs file.
fn mean_of(lines: &[serde_json::Map<String, Value>], key: &str) -> f64 {
    lines.iter().map(|l| l[key].as_f64().unwrap()).sum::<f64>() / lines.len() as f64
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1.0), "{what}: {a} vs {b}");
}

#[test]
fn metrics_carry_trl_names_with_consistent_values() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 6, 9);
    let out = tmp.path().join("out");
    let model = tiny_fixture("llama");
    let beta = 0.3;
    // One batch of all 6 pairs per step, so every step's batch means are over the same pairs.
    let flags = [
        "--model", model.to_str().unwrap(), "--pairs", pairs.to_str().unwrap(), "--output", out.to_str().unwrap(),
        "--beta", "0.3", "--lr", "1e-2", "--warmup-ratio", "0", "--batch-size", "6", "--micro-batch-size", "4", "--epochs", "3", "--seed", "2",
        "--save-every", "1",
    ];
    train(&flags).unwrap();

    let lines = read_jsonl(&out.join("metrics.jsonl"));
    assert_eq!(lines.len(), 3);
    let f = |l: &serde_json::Map<String, Value>, k: &str| l.get(k).and_then(Value::as_f64).unwrap_or_else(|| panic!("{k} missing in {l:?}"));
    let refs = read_jsonl(&out.join("ref_pairs.jsonl"));
    let (ref_chosen, ref_rejected) = (mean_of(&refs, "ref_chosen_logp"), mean_of(&refs, "ref_rejected_logp"));
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(f(l, "step"), (i + 1) as f64);
        close(f(l, "epoch"), (i + 1) as f64, "epoch");
        // TRL's names hold the same values as ours.
        for (trl, ours) in [
            ("rewards/chosen", "reward_chosen"),
            ("rewards/rejected", "reward_rejected"),
            ("rewards/margins", "reward_margin"),
            ("rewards/accuracies", "reward_accuracy"),
            ("logps/chosen", "logp_chosen"),
            ("logps/rejected", "logp_rejected"),
            ("learning_rate", "lr"),
        ] {
            assert_eq!(f(l, trl), f(l, ours), "step {}: {trl} vs {ours}", i + 1);
        }
        assert!(f(l, "loss").is_finite() && f(l, "grad_norm") > 0.0);
        // TRL's definitions, checked against each other and the reference log-probs.
        close(f(l, "rewards/margins"), f(l, "rewards/chosen") - f(l, "rewards/rejected"), "margins = chosen - rejected");
        close(f(l, "rewards/chosen"), beta * (f(l, "logps/chosen") - ref_chosen), "rewards/chosen = beta (logp - ref)");
        close(f(l, "rewards/rejected"), beta * (f(l, "logps/rejected") - ref_rejected), "rewards/rejected = beta (logp - ref)");
        let acc = f(l, "rewards/accuracies");
        assert!((0.0..=1.0).contains(&acc) && (acc * 6.0 - (acc * 6.0).round()).abs() < 1e-9, "accuracy {acc} is a fraction of 6 pairs");
    }
    // Step 1 runs the base model: its log-probs are the reference ones and its rewards 0.
    close(f(&lines[0], "logps/chosen"), ref_chosen, "step 1 logps/chosen vs reference");
    close(f(&lines[0], "logps/rejected"), ref_rejected, "step 1 logps/rejected vs reference");
    // Step 2 runs the model after one update: score the step-1 checkpoint independently.
    let scored = tmp.path().join("scored.jsonl");
    let files = ipo::ScoreFiles { model: out.join("step-1"), input: None, pairs: Some(pairs.clone()), output: scored.clone() };
    ipo::score(&files, &ipo::ScoreOptions::default(), &ipo::Silent).unwrap();
    let s = read_jsonl(&scored);
    let (c1, r1) = (mean_of(&s, "ref_chosen_logp"), mean_of(&s, "ref_rejected_logp"));
    assert!((c1 - ref_chosen).abs() > 1e-3, "the first step moved the chosen log-probs ({c1} vs {ref_chosen})");
    close(f(&lines[1], "logps/chosen"), c1, "step 2 logps/chosen vs scored step-1 model");
    close(f(&lines[1], "logps/rejected"), r1, "step 2 logps/rejected vs scored step-1 model");

    // The chart: a PNG with more than a few colours (text, five plots' lines).
    let mut png = png::Decoder::new(std::fs::File::open(out.join("metrics.png")).unwrap()).read_info().unwrap();
    let mut px = vec![0; png.output_buffer_size()];
    let info = png.next_frame(&mut px).unwrap();
    assert!(info.width >= 1000 && info.height >= 800, "{}x{}", info.width, info.height);
    let colours: std::collections::HashSet<&[u8]> = px[..info.buffer_size()].chunks(3).collect();
    assert!(colours.len() > 50, "{} colours", colours.len());
}
