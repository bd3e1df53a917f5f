//! The README's shell examples, run as written (as tinygrad runs its README): every ```sh block
//! but the few this test cannot run (listed in `NOT_RUN`, each with the reason), concatenated in
//! order into one bash script (`set -euo pipefail`), in a fresh folder holding links to the
//! repository's `data/`, `configs/` and `scripts/`, with the built `ipo` first on PATH. Then the
//! files the examples promise are checked.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// First lines of blocks not run here, and why.
const NOT_RUN: [(&str, &str); 3] = [
    ("bash scripts/demo.sh", "the 8-minute main command; its stages are tested one by one"),
    ("bash scripts/test.sh", "this test suite itself"),
    ("cargo run --release --example", "scripts/test.sh runs the three examples after the tests"),
];

fn sh_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur: Option<Vec<&str>> = None;
    for line in readme.lines() {
        match (&mut cur, line.trim_end()) {
            (None, "```sh") => cur = Some(Vec::new()),
            (Some(b), "```") => {
                blocks.push(b.join("\n"));
                cur = None;
            }
            (Some(b), l) => b.push(l),
            (None, _) => {}
        }
    }
    assert!(cur.is_none(), "README.md: a ```sh block is not closed");
    blocks
}

#[test]
fn readme_shell_examples_run() {
    let Some(model) = common::default_model() else { return };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = sh_blocks(&readme);
    let run: Vec<&String> = blocks.iter().filter(|b| !NOT_RUN.iter().any(|(first, _)| b.trim_start().starts_with(first))).collect();
    for (first, _) in NOT_RUN {
        assert!(blocks.iter().any(|b| b.trim_start().starts_with(first)), "NOT_RUN lists {first:?}, which the README no longer has");
    }
    assert!(run.len() >= 2, "expected the stage-by-stage and the scoring examples, found {} runnable blocks", run.len());

    let dir = tempfile::tempdir().unwrap();
    for d in ["data", "configs", "scripts"] {
        std::os::unix::fs::symlink(root.join(d), dir.path().join(d)).unwrap();
    }
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_ipo")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let script = format!("set -euo pipefail\n{}\n", run.iter().map(|b| b.as_str()).collect::<Vec<_>>().join("\n"));
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path)
        .env("IPO_DEFAULT_MODEL", &model)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the README's examples failed:\n{script}\n--- stderr:\n{stderr}");

    // What the examples say they write.
    let lines = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}")).lines().count();
    assert_eq!(lines("rollouts.jsonl"), 16, "8 prompts x 2 samples");
    let pairs = lines("pairs.jsonl");
    assert!(pairs > 0 && lines("pairs.ref.jsonl") == pairs, "{pairs} pairs, all scored");
    assert!(dir.path().join("out/final/model.safetensors").is_file() && lines("out/metrics.jsonl") > 0);
    // ipo launch --nproc 2: the same training as the one-process `ipo train` of the same flags,
    // within fp32 rounding (tests/dist_train.rs), and only rank 0 wrote metrics.
    assert_eq!(lines("out-2proc/metrics.jsonl"), lines("out/metrics.jsonl"));
    let weights = |d: &str| {
        let bytes = std::fs::read(dir.path().join(d).join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut t: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect();
        t.sort();
        t
    };
    let (one, two) = (weights("out/final"), weights("out-2proc/final"));
    let f32s = |b: &[u8]| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
    let diff = one.iter().zip(&two).flat_map(|(a, b)| f32s(&a.1).into_iter().zip(f32s(&b.1)).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    assert!(diff <= 1e-5, "ipo launch --nproc 2 vs ipo train: final weights differ by {diff}");
    let scored: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("scored.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // ipo eval: the counts of eval.json are those of answers.jsonl (the 8 harmful prompts of
    // prompts.jsonl + 4 benign ones, greedy, for the model and the base).
    let eval: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("eval/eval.json")).unwrap()).unwrap();
    assert_eq!(lines("eval/answers.jsonl"), 24, "2 models x (8 + 4) prompts");
    for m in ["model", "base"] {
        assert_eq!(eval[m]["greedy"]["harmful"]["refusal_rate"]["total"], 8, "{eval}");
        assert_eq!(eval[m]["greedy"]["benign"]["refusal_rate"]["total"], 4, "{eval}");
    }
    let ratio = eval["helpful_answer_nll_ratio"]["value"].as_f64().unwrap();
    assert!(ratio.is_finite() && ratio > 0.0, "{ratio}");
    assert!(dir.path().join("eval/eval.png").is_file() && dir.path().join("eval/eval.md").is_file());
    // ipo run on configs/smoke.toml: every stage finished and the report holds the eval table.
    for stage in ["generate", "intervene", "score", "train1", "benign", "train2", "eval"] {
        assert!(dir.path().join(format!("runs/smoke/.done-{stage}")).is_file(), "stage {stage} did not finish");
    }
    let report = std::fs::read_to_string(dir.path().join("runs/smoke/report.md")).unwrap();
    assert!(report.contains("benign: refusal rate") && report.contains("helpful-answer NLL ratio"), "{report}");
    assert_eq!(lines("runs/smoke/rollouts.jsonl"), 12, "limit 6 prompts x n 2");
    // Stage 2's reference is the stage-1 model: its pairs were scored anew (stage2/ref_pairs.jsonl),
    // and a harmful pair's reference log-probs there differ from the base model's in pairs.ref.jsonl.
    let read = |name: &str| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (stage2_refs, base_refs) = (read("runs/smoke/stage2/ref_pairs.jsonl"), read("runs/smoke/pairs.ref.jsonl"));
    assert_eq!(stage2_refs.len(), lines("runs/smoke/stage2_pairs.jsonl"));
    let harmful: Vec<&serde_json::Value> = stage2_refs.iter().filter(|p| p["kind"] == "harmful").collect();
    assert!(!harmful.is_empty(), "no harmful pair in stage 2");
    for p in harmful {
        let b = base_refs.iter().find(|b| b["id"] == p["id"] && b["trigger"] == p["trigger"] && b["sample"] == p["sample"]).expect("a stage-1 pair");
        let (s1, base) = (p["ref_chosen_logp"].as_f64().unwrap(), b["ref_chosen_logp"].as_f64().unwrap());
        assert!((s1 - base).abs() > 1e-3, "{}: stage-2 reference log-prob {s1} equals the base model's {base}", p["id"]);
    }
    // The smoke run on two processes (ipo launch -- run): every stage finished, the sharded
    // rollouts are the one-process run's lines, and intervention (on rank 0) made the same pairs.
    for stage in ["generate", "intervene", "score", "train1", "benign", "train2", "eval"] {
        assert!(dir.path().join(format!("runs/smoke-2proc/.done-{stage}")).is_file(), "2 processes: stage {stage} did not finish");
    }
    let sorted = |name: &str| {
        let mut v: Vec<String> = std::fs::read_to_string(dir.path().join(name)).unwrap().lines().map(String::from).collect();
        v.sort();
        v
    };
    assert_eq!(sorted("runs/smoke-2proc/rollouts.jsonl"), sorted("runs/smoke/rollouts.jsonl"));
    assert_eq!(sorted("runs/smoke-2proc/benign_base.jsonl"), sorted("runs/smoke/benign_base.jsonl"));
    assert_eq!(sorted("runs/smoke-2proc/pairs.jsonl"), sorted("runs/smoke/pairs.jsonl"));
    assert!(std::fs::read_to_string(dir.path().join("runs/smoke-2proc/report.md")).unwrap().contains("helpful-answer NLL ratio"));
    assert_eq!(scored.len(), 2);
    let logp = |i: usize| scored[i]["logp"].as_f64().unwrap();
    assert!(logp(0) > logp(1), "\" Paris.\" is the likelier continuation: {} vs {}", logp(0), logp(1));
}
