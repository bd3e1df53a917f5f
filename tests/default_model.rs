//! `ipo score` on the default model (SmolLM2-135M-Instruct imported from the GGUF) against
//! Hugging Face transformers on the same GGUF weights (tests/fixtures/default_model/
//! logprobs.json, from tests/reference/default_model_fixtures.py): every per-token log-prob
//! within 1e-3 (the acceptance bound of the foundation issue; both sides compute in f32).
//! The model folder comes from IPO_DEFAULT_MODEL (scripts/test.sh sets it).

mod common;

use common::default_model;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

#[test]
fn score_cli_matches_hugging_face_on_default_model() {
    let Some(model) = default_model() else { return };
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/default_model/logprobs.json")).unwrap(),
    )
    .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let mut lines = String::new();
    for (i, c) in cases.iter().enumerate() {
        let ids: Vec<u64> = c["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        // Split at a case-dependent point so both context and target vary.
        let split = 1 + i % 3;
        lines += &json!({"id": format!("case{i}"), "context_ids": ids[..split], "target_ids": ids[split..]}).to_string();
        lines.push('\n');
    }
    std::fs::write(&input, lines).unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_ipo"))
        .args(["score", "--model"])
        .arg(&model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--batch-tokens", "96"])
        .status()
        .unwrap();
    assert!(st.success());
    let out = std::fs::read_to_string(&output).unwrap();
    let rows: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), cases.len());
    let mut worst = 0f64;
    let mut count = 0;
    for (i, (row, c)) in rows.iter().zip(cases).enumerate() {
        assert_eq!(row["id"], format!("case{i}"));
        let split = 1 + i % 3;
        let hf: Vec<f64> = c["token_logps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let ours: Vec<f64> = row["token_logps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(ours.len(), hf.len() - (split - 1), "case {i}");
        for (a, b) in ours.iter().zip(&hf[split - 1..]) {
            worst = worst.max((a - b).abs());
            count += 1;
        }
        let sum: f64 = hf[split - 1..].iter().sum();
        let logp = row["logp"].as_f64().unwrap();
        assert!((logp - sum).abs() < 1e-3 * hf.len() as f64, "case {i}: logp {logp} vs {sum}");
    }
    println!("default model: {count} tokens, max |logp - hf| = {worst:.3e}");
    assert!(count > 100);
    assert!(worst < 1e-3, "max |logp - hf| = {worst}");
}
