//! `ipo score` end to end through the binary on the tiny Llama fixture
//! (tests/fixtures/tiny/llama): the output contract (input fields kept in order, `logp` =
//! sum of `token_logps`, one log-prob per target token, results independent of line order
//! and packing), text input, the pairs fill into a new file, and every validation error
//! naming the file:line / flag at fault with nothing written. Numeric agreement with HF is
//! tests/golden.rs's job; here the checks are structural and self-consistent.

mod common;

use common::{byte_tokenizer_json, tiny_fixture, tiny_llama_with_tokenizer, Rng};
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

fn ipo(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ipo")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn write_lines(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Seeded token ids in [1, 256).
fn ids(seed: u64, n: usize) -> Vec<u32> {
    Rng(seed).ids(n, 255).into_iter().map(|x| x + 1).collect()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn score(model: &Path, input: &Path, output: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["score", "--model", p(model), "--input", p(input), "--output", p(output)];
    args.extend_from_slice(extra);
    ipo(&args)
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn score_output_contract_and_self_consistency() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let ctx = ids(1, 9);
    let tgt = ids(2, 5);
    let mut ctx_plus = ctx.clone();
    ctx_plus.extend_from_slice(&tgt[..2]);
    let lines = vec![
        json!({"note": "first", "id": "a", "context_ids": ctx, "target_ids": tgt, "meta": {"k": [1, 2]}}),
        json!({"id": "b", "context_ids": ids(3, 30), "target_ids": ids(4, 20)}),
        // Same context, the first two target tokens only, and then the rest given them:
        // the per-token log-probs must agree with line "a" (causal model).
        json!({"id": "c", "context_ids": ctx, "target_ids": tgt[..2]}),
        json!({"id": "d", "context_ids": ctx_plus, "target_ids": tgt[2..]}),
        json!({"id": 7, "context_ids": [5], "target_ids": [6]}),
    ];
    write_lines(&input, &lines);
    let (ok, err) = score(&tiny_fixture("llama"), &input, &output, &[]);
    assert!(ok, "{err}");
    // Not a terminal: plain progress lines with a rate.
    assert!(err.contains("tokens/s"), "{err}");

    let out = read_lines(&output);
    assert_eq!(out.len(), lines.len());
    for (o, i) in out.iter().zip(&lines) {
        // Input fields first, in their order, unchanged; then the two new ones.
        let ok: Vec<&String> = o.as_object().unwrap().keys().collect();
        let ik: Vec<&String> = i.as_object().unwrap().keys().collect();
        assert_eq!(ok[..ik.len()], ik[..]);
        assert_eq!(ok[ik.len()..], ["logp", "token_logps"]);
        for k in ik {
            assert_eq!(o[k], i[k], "field {k} changed");
        }
        let lp = f32s(&o["token_logps"]);
        assert_eq!(lp.len(), i["target_ids"].as_array().unwrap().len());
        assert!(lp.iter().all(|x| x.is_finite() && *x <= 0.0), "{lp:?}");
        assert!(lp.iter().any(|x| *x < -1e-3), "a random tiny model is not that sure: {lp:?}");
        let sum: f64 = lp.iter().map(|&x| x as f64).sum();
        let logp = o["logp"].as_f64().unwrap();
        assert!((logp - sum).abs() < 1e-9 * sum.abs().max(1.0), "logp {logp} vs sum {sum}");
    }
    let (a, c, d) = (f32s(&out[0]["token_logps"]), f32s(&out[2]["token_logps"]), f32s(&out[3]["token_logps"]));
    let joined: Vec<f32> = c.iter().chain(&d).copied().collect();
    for (x, y) in a.iter().zip(&joined) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "chain rule: {a:?} vs {joined:?}");
    }

    // Packing does not change results: one sequence per forward.
    let output2 = dir.path().join("out2.jsonl");
    let (ok, err) = score(&tiny_fixture("llama"), &input, &output2, &["--batch-tokens", "8"]);
    assert!(ok, "{err}");
    for (x, y) in out.iter().zip(read_lines(&output2)) {
        for (u, v) in f32s(&x["token_logps"]).iter().zip(f32s(&y["token_logps"])) {
            assert!((u - v).abs() <= 1e-4 * u.abs().max(1.0), "{u} vs {v}");
        }
    }
}

#[test]
fn text_input_is_tokenized_context_and_target_separately() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama_with_tokenizer(dir.path(), &byte_tokenizer_json());
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let (context, target) = ("Grüße, world", " — ok!");
    let bytes = |s: &str| s.bytes().map(u32::from).collect::<Vec<_>>();
    write_lines(&input, &[
        json!({"id": "text", "context": context, "target": target}),
        json!({"id": "ids", "context_ids": bytes(context), "target_ids": bytes(target)}),
    ]);
    let (ok, err) = score(&model, &input, &output, &[]);
    assert!(ok, "{err}");
    let out = read_lines(&output);
    assert_eq!(out[0]["context"], context);
    let (t, i) = (f32s(&out[0]["token_logps"]), f32s(&out[1]["token_logps"]));
    assert_eq!(t.len(), target.len(), "one token per byte of the target");
    for (x, y) in t.iter().zip(&i) {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{t:?} vs {i:?}");
    }

    // A special token of the tokenizer outside the model's vocabulary is caught, by line.
    write_lines(&input, &[json!({"id": "x", "context": "hi", "target": "<|im_end|>"})]);
    let (ok, err) = score(&model, &input, &dir.path().join("bad.jsonl"), &[]);
    assert!(!ok);
    assert!(err.contains("in.jsonl:1") && err.contains("257") && err.contains("vocab_size 256"), "{err}");
    // Text input without a tokenizer names the missing file.
    write_lines(&input, &[json!({"id": "x", "context": "hi", "target": "yo"})]);
    let (ok, err) = score(&tiny_fixture("llama"), &input, &dir.path().join("bad.jsonl"), &[]);
    assert!(!ok && err.contains("tokenizer.json") && err.contains("in.jsonl:1"), "{err}");
}

#[test]
fn pairs_fill_reference_logps_into_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    let ctx = ids(10, 12);
    let (chosen, rejected) = (ids(11, 6), ids(12, 4));
    let lines = vec![
        json!({"id": "p0", "prompt": "How?", "kind": "harmful", "context_ids": ctx, "chosen_ids": chosen,
               "rejected_ids": rejected, "cue": {"sentence": 2, "text": "Sure.", "token": 12},
               "trigger": "Wait, this is harmful.", "round": 1, "ref_chosen_logp": 123.0, "user_tag": [1, {"x": null}]}),
        json!({"id": "p1", "context_ids": ids(13, 3), "chosen_ids": ids(14, 2), "rejected_ids": ids(15, 7)}),
    ];
    write_lines(&pairs, &lines);
    let before = std::fs::read(&pairs).unwrap();
    let out_path = dir.path().join("pairs.ref.jsonl");
    let (ok, err) = ipo(&["score", "--model", p(&tiny_fixture("llama")), "--pairs", p(&pairs), "--output", p(&out_path)]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&pairs).unwrap(), before, "the input pairs file is untouched");
    let out = read_lines(&out_path);
    assert_eq!(out.len(), 2);

    // The same sequences through --input give the sums.
    let input = dir.path().join("in.jsonl");
    let mut seqs = Vec::new();
    for l in &lines {
        seqs.push(json!({"id": "c", "context_ids": l["context_ids"], "target_ids": l["chosen_ids"]}));
        seqs.push(json!({"id": "r", "context_ids": l["context_ids"], "target_ids": l["rejected_ids"]}));
    }
    write_lines(&input, &seqs);
    let scored = dir.path().join("scored.jsonl");
    let (ok, err) = score(&tiny_fixture("llama"), &input, &scored, &[]);
    assert!(ok, "{err}");
    let scored = read_lines(&scored);
    for (k, (o, i)) in out.iter().zip(&lines).enumerate() {
        let (c, r) = (o["ref_chosen_logp"].as_f64().unwrap(), o["ref_rejected_logp"].as_f64().unwrap());
        let (sc, sr) = (scored[2 * k]["logp"].as_f64().unwrap(), scored[2 * k + 1]["logp"].as_f64().unwrap());
        assert!(c < 0.0 && r < 0.0 && c != r, "{c} {r}");
        assert!((c - sc).abs() < 1e-4 * sc.abs() && (r - sr).abs() < 1e-4 * sr.abs(), "{c} vs {sc}, {r} vs {sr}");
        // Every input field is kept (an existing ref value is replaced in place).
        for (key, v) in i.as_object().unwrap() {
            if key != "ref_chosen_logp" {
                assert_eq!(&o[key], v, "{key}");
            }
        }
        let keys: Vec<&String> = o.as_object().unwrap().keys().collect();
        let ik: Vec<&String> = i.as_object().unwrap().keys().collect();
        assert_eq!(keys[..ik.len()], ik[..], "field order kept");
    }
    assert_ne!(out[0]["ref_chosen_logp"], json!(123.0));
}

/// Runs `score` on `lines`, expects failure, no output file and no temp file left behind.
fn expect_error(lines: &[Value], extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("data.jsonl"), dir.path().join("out.jsonl"));
    write_lines(&input, lines);
    let (ok, err) = score(&tiny_fixture("llama"), &input, &output, extra);
    assert!(!ok, "should fail: {lines:?} {extra:?}");
    assert!(!output.exists(), "nothing is written on error");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "temp files left behind: {left:?}");
    err
}

#[test]
fn validation_errors_name_file_line_and_value() {
    let good = json!({"id": "ok", "context_ids": [1, 2], "target_ids": [3]});
    let e = expect_error(&[good.clone(), json!({"id": "x", "context_ids": [1, 2], "target_ids": [3, 256]})], &[]);
    assert!(e.contains("data.jsonl:2") && e.contains("target_ids[1] = 256") && e.contains("vocab_size 256"), "{e}");
    let e = expect_error(&[json!({"id": "x", "context_ids": [], "target_ids": [3]})], &[]);
    assert!(e.contains("data.jsonl:1") && e.contains("empty context"), "{e}");
    let e = expect_error(&[good.clone(), good.clone(), json!({"id": "x", "context_ids": [4], "target_ids": []})], &[]);
    assert!(e.contains("data.jsonl:3") && e.contains("empty target"), "{e}");
    // max_position_embeddings of the tiny model is 128.
    let e = expect_error(&[json!({"id": "x", "context_ids": ids(5, 100), "target_ids": ids(6, 29)})], &[]);
    assert!(e.contains("data.jsonl:1") && e.contains("129 tokens") && e.contains("max_position_embeddings = 128"), "{e}");
    let e = expect_error(&[json!({"id": "x", "context_ids": [1, -2], "target_ids": [3]})], &[]);
    assert!(e.contains("data.jsonl:1") && e.contains("-2"), "{e}");
    let e = expect_error(&[json!({"id": "x", "context_ids": [1]})], &[]);
    assert!(e.contains("data.jsonl:1") && e.contains("target_ids"), "{e}");

    // Malformed JSON and non-objects, by line (blank lines are skipped but counted).
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("data.jsonl");
    std::fs::write(&input, format!("{good}\n\n{{\"id\": \"x\", \"context_ids\": [1,\n")).unwrap();
    let (ok, e) = score(&tiny_fixture("llama"), &input, &dir.path().join("o.jsonl"), &[]);
    assert!(!ok && e.contains("data.jsonl:3") && e.contains("invalid JSON"), "{e}");
    std::fs::write(&input, "[1, 2]\n").unwrap();
    let (ok, e) = score(&tiny_fixture("llama"), &input, &dir.path().join("o.jsonl"), &[]);
    assert!(!ok && e.contains("data.jsonl:1") && e.contains("expected a JSON object"), "{e}");
}

#[test]
fn flag_errors_are_clear() {
    let good = [json!({"id": "ok", "context_ids": [1, 2], "target_ids": [3]})];
    // Without a usable GPU (CI), cuda devices fail before anything is written, naming the
    // device; with one they run.
    for dev in ["cuda", "cuda:7"] {
        let dir = tempfile::tempdir().unwrap();
        let (input, output) = (dir.path().join("data.jsonl"), dir.path().join("out.jsonl"));
        write_lines(&input, &good);
        let (ok, e) = score(&tiny_fixture("llama"), &input, &output, &["--device", dev]);
        if !ok {
            let name = if dev == "cuda" { "cuda:0" } else { dev };
            assert!(e.contains(&format!("--device {name}")) && e.contains("no CUDA device"), "{e}");
            assert!(!output.exists(), "nothing is written on error");
        }
    }
    let e = expect_error(&good, &["--device", "tpu"]);
    assert!(e.contains("--device tpu") && e.contains("unknown device"), "{e}");
    let e = expect_error(&good, &["--device", "cuda:x"]);
    assert!(e.contains("--device cuda:x") && e.contains("cuda:N"), "{e}");
    let e = expect_error(&good, &["--batch-tokens", "0"]);
    assert!(e.contains("--batch-tokens"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    write_lines(&input, &good);
    // Output over the input is refused (the input stays intact).
    let (ok, e) = score(&tiny_fixture("llama"), &input, &input, &[]);
    assert!(!ok && e.contains("--output") && e.contains("input"), "{e}");
    assert_eq!(read_lines(&input), good.to_vec());
    // A model folder without config.json.
    let (ok, e) = score(dir.path(), &input, &dir.path().join("o.jsonl"), &[]);
    assert!(!ok && e.contains("config.json"), "{e}");
    // --input and --pairs together, or neither.
    let (ok, e) = ipo(&["score", "--model", p(&tiny_fixture("llama")), "--input", p(&input), "--pairs", p(&input), "--output", "x"]);
    assert!(!ok && e.contains("--pairs"), "{e}");
    let (ok, e) = ipo(&["score", "--model", p(&tiny_fixture("llama")), "--output", "x"]);
    assert!(!ok && (e.contains("--input") || e.contains("--pairs")), "{e}");
    // A missing input file names it.
    let (ok, e) = score(&tiny_fixture("llama"), &dir.path().join("nope.jsonl"), &dir.path().join("o.jsonl"), &[]);
    assert!(!ok && e.contains("nope.jsonl"), "{e}");
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_ipo")).args(["score", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--model", "--input", "--pairs", "--output", "--batch-tokens", "--device"] {
        let line = help.lines().find(|l| l.trim_start().starts_with(flag)).unwrap_or_else(|| panic!("{flag} missing:\n{help}"));
        // A description follows the flag, on its line or the next.
        let idx = help.find(line).unwrap();
        let after = &help[idx + line.len()..];
        let desc = line.split_once("  ").map(|x| x.1.trim()).filter(|s| !s.is_empty()).unwrap_or_else(|| after.lines().nth(1).unwrap_or("").trim());
        assert!(desc.len() > 10, "{flag} has no description:\n{help}");
    }
    assert!(help.contains("[default: 4096]") && help.contains("[default: cpu]"), "{help}");
}

/// An I/O error says its cause once: the error types that put the cause in their message no
/// longer also chain it as a source (anyhow printed "X: No such file...: No such file...").
#[test]
fn io_errors_name_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let pairs = dir.path().join("pairs.jsonl");
    let out = dir.path().join("out.jsonl");
    let (ok, err) = ipo(&["score", "--model", missing.to_str().unwrap(), "--pairs", pairs.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(!ok);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let model = tiny_fixture("llama");
    let (ok, err) = ipo(&["score", "--model", model.to_str().unwrap(), "--pairs", pairs.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(!ok);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}
