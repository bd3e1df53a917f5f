//! Tests of `ipo generate` through its clap arguments: input errors named clearly (unknown
//! CSV column, duplicate ids, CSV without --prompt-column, existing output without
//! --resume, a KV budget too small), and on the default model: records per DESIGN.md section
//! 4 with per-prompt failures recorded, stop strings, CSV input, and --resume after an
//! interrupted run reproducing the lost lines exactly. On the tiny model: --resume redoes
//! failed samples and a line torn by a kill, and refuses a file of another seed, sampler or
//! model (a fine-tune of the same model included).

mod common;

use std::path::Path;

use clap::Parser;
use common::{byte_tokenizer_json, default_model, tiny_llama_with_tokenizer};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ipo::cli::generate::Args,
}

fn args(v: &[&str]) -> ipo::cli::generate::Args {
    let mut all = vec!["ipo-generate"];
    all.extend_from_slice(v);
    Cli::try_parse_from(all).unwrap().args
}

fn run(v: &[&str]) -> anyhow::Result<()> {
    ipo::cli::generate::run(args(v))
}

fn lines(p: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str(l).unwrap() {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        })
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn input_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("no-model");
    let out = dir.path().join("out.jsonl");
    let csv = dir.path().join("p.csv");
    std::fs::write(&csv, "id,goal,category\n1,\"Say hi, politely\",x\n2,Bye,y\n").unwrap();
    let e = run(&["--model", s(&model), "--prompts", s(&csv), "--output", s(&out), "--prompt-column", "prompt"]).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("no column \"prompt\"") && msg.contains("goal"), "{msg}");
    let e = run(&["--model", s(&model), "--prompts", s(&csv), "--output", s(&out)]).unwrap_err();
    assert!(format!("{e:#}").contains("--prompt-column"), "{e:#}");
    let dup = dir.path().join("dup.jsonl");
    std::fs::write(&dup, "{\"id\": \"a\", \"prompt\": \"x\"}\n{\"id\": \"b\", \"prompt\": \"y\"}\n{\"id\": \"a\", \"prompt\": \"z\"}\n").unwrap();
    let e = run(&["--model", s(&model), "--prompts", s(&dup), "--output", s(&out)]).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("dup.jsonl:3") && msg.contains("duplicate id") && msg.contains("line 1"), "{msg}");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"a\", \"text\": \"x\"}\n").unwrap();
    let e = run(&["--model", s(&model), "--prompts", s(&bad), "--output", s(&out)]).unwrap_err();
    assert!(format!("{e:#}").contains("bad.jsonl:1") && format!("{e:#}").contains("\"prompt\""), "{e:#}");
    std::fs::write(&out, "").unwrap();
    let ok = dir.path().join("ok.jsonl");
    std::fs::write(&ok, "{\"id\": \"a\", \"prompt\": \"x\"}\n").unwrap();
    let e = run(&["--model", s(&model), "--prompts", s(&ok), "--output", s(&out)]).unwrap_err();
    assert!(format!("{e:#}").contains("--resume"), "{e:#}");
    let e = run(&["--model", s(&model), "--prompts", s(&ok), "--output", s(&dir.path().join("o2.jsonl")), "--top-p", "0"]).unwrap_err();
    assert!(format!("{e:#}").contains("top_p"), "{e:#}");
}

#[test]
fn generate_on_default_model_records_failures_stops_and_resumes() {
    let Some(model) = default_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    let long = "word ".repeat(9000);
    std::fs::write(
        &prompts,
        format!(
            "{}\n{}\n{}\n{}\n",
            r#"{"id": "paris", "prompt": "What is the capital of France?", "kind": "benign"}"#,
            r#"{"id": "empty", "prompt": "  "}"#,
            serde_json::json!({"id": "long", "prompt": long}),
            r#"{"id": 7, "prompt": "List three prime numbers.", "system": "Be brief."}"#,
        ),
    )
    .unwrap();
    let out = dir.path().join("r.jsonl");
    let base = ["--model", s(&model), "--prompts", s(&prompts), "--output", s(&out), "--max-new-tokens", "6", "--n", "2"];

    // Too small a budget for even one sequence: a clear error, nothing sampled.
    let mut small = base.to_vec();
    small.extend(["--kv-cache-mb", "0.05"]);
    let e = run(&small).unwrap_err();
    assert!(format!("{e:#}").contains("--kv-cache-mb"), "{e:#}");

    let mut a = base.to_vec();
    a.extend(["--temperature", "0.8", "--seed", "5", "--kv-cache-mb", "64"]);
    run(&a).unwrap();
    let recs = lines(&out);
    assert_eq!(recs.len(), 8, "4 prompts x 2 samples, failures included");
    let by = |id: &str, smp: u64| recs.iter().find(|r| r["id"] == id && r["sample"] == smp).unwrap_or_else(|| panic!("{id}/{smp}"));
    for smp in 0..2 {
        assert_eq!(by("empty", smp)["finish"], "error");
        assert!(by("empty", smp)["error"].as_str().unwrap().contains("empty"));
        assert_eq!(by("long", smp)["finish"], "error");
        assert!(by("long", smp)["error"].as_str().unwrap().contains("context"), "{:?}", by("long", smp)["error"]);
        for id in ["paris", "7"] {
            let r = by(id, smp);
            let f = r["finish"].as_str().unwrap();
            assert!(f == "eos" || f == "length", "{f}");
            let c = r["completion_ids"].as_array().unwrap();
            assert!(!c.is_empty() && c.len() <= 6);
            assert_eq!(r["seed"], 5);
            assert_eq!(r["model"].as_str().unwrap().len(), 16);
            assert!(r["prompt_ids"].as_array().unwrap().len() > 10, "chat template applied");
            assert_eq!(r["reasoning"], r["completion"], "no </think>: all reasoning");
        }
    }
    assert_eq!(by("paris", 0)["kind"], "benign", "extra fields preserved");
    assert_ne!(by("paris", 0)["prompt_ids"], by("7", 0)["prompt_ids"]);

    // Interrupt: keep the first 3 lines; --resume writes exactly the missing ones, identical.
    let text = std::fs::read_to_string(&out).unwrap();
    let kept: Vec<&str> = text.lines().take(3).collect();
    std::fs::write(&out, kept.join("\n") + "\n").unwrap();
    let mut r = a.clone();
    r.push("--resume");
    run(&r).unwrap();
    let again = lines(&out);
    assert_eq!(again.len(), 8);
    for rec in &recs {
        let twin = again.iter().filter(|x| x["id"] == rec["id"] && x["sample"] == rec["sample"]).collect::<Vec<_>>();
        assert_eq!(twin.len(), 1);
        assert_eq!(twin[0], rec, "resumed sample differs");
    }

    // Greedy + stop string, from CSV.
    let csv = dir.path().join("p.csv");
    std::fs::write(&csv, "goal,id\nWhat is the capital of France?,q1\n").unwrap();
    let out2 = dir.path().join("r2.jsonl");
    run(&[
        "--model", s(&model), "--prompts", s(&csv), "--prompt-column", "goal", "--output", s(&out2),
        "--temperature", "0", "--max-new-tokens", "12", "--stop", "France",
    ])
    .unwrap();
    let r2 = lines(&out2);
    assert_eq!(r2.len(), 1);
    assert_eq!(r2[0]["id"], "q1");
    assert_eq!(r2[0]["finish"], "stop");
    assert!(r2[0]["completion"].as_str().unwrap().contains("France"));
    // The HF greedy reference starts "The capital of France": stop right after "France".
    assert_eq!(r2[0]["completion_ids"], serde_json::json!([504, 3575, 282, 4649]));
}

/// The tiny Llama with a byte tokenizer, three prompts, and `generate` args for them (no chat
/// template, 6 new tokens, T 0.8, seed 5), run once into `out`.
fn tiny_run(dir: &Path) -> (std::path::PathBuf, Vec<String>) {
    let model = tiny_llama_with_tokenizer(dir, &byte_tokenizer_json());
    let prompts = dir.join("p.jsonl");
    std::fs::write(&prompts, "{\"id\": \"a\", \"prompt\": \"Hello there\"}\n{\"id\": \"b\", \"prompt\": \"Pick a lock\"}\n{\"id\": \"c\", \"prompt\": \"Say hi\"}\n").unwrap();
    let out = dir.join("r.jsonl");
    let args: Vec<String> = ["--model", s(&model), "--prompts", s(&prompts), "--output", s(&out), "--no-chat-template", "--max-new-tokens", "6",
        "--temperature", "0.8", "--seed", "5", "--kv-cache-mb", "8"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    run(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    (out, args)
}

fn with(args: &[String], extra: &[&str]) -> anyhow::Result<()> {
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    for kv in extra.chunks(2) {
        match a.iter().position(|x| *x == kv[0]) {
            Some(i) if kv.len() == 2 => a[i + 1] = kv[1],
            _ => a.extend_from_slice(kv),
        }
    }
    run(&a)
}

/// Lines of `p` by id, each parsed.
fn by_id(p: &Path) -> std::collections::BTreeMap<String, serde_json::Map<String, Value>> {
    lines(p).into_iter().map(|l| (l["id"].as_str().unwrap().to_string(), l)).collect()
}

/// A failed sample ("finish": "error", e.g. the KV cache was full) used to count as done, so
/// a transient failure became permanent; --resume now drops the line and samples it again.
#[test]
fn resume_redoes_failed_samples() {
    let dir = tempfile::tempdir().unwrap();
    let (out, args) = tiny_run(dir.path());
    let first = by_id(&out);
    assert_eq!(first.len(), 3);
    let mut failed = first["b"].clone();
    for k in ["completion_ids", "completion", "reasoning", "response"] {
        failed.remove(k);
    }
    failed.insert("finish".into(), "error".into());
    failed.insert("error".into(), "the KV cache is full".into());
    std::fs::write(&out, format!("{}\n{}\n{}\n", Value::Object(first["a"].clone()), Value::Object(failed), Value::Object(first["c"].clone()))).unwrap();
    with(&args, &["--resume"]).unwrap();
    assert_eq!(by_id(&out), first, "the failed sample is redone, and only once");
    assert_eq!(lines(&out).len(), 3);
}

/// A line torn by kill -9 (no newline, half a JSON object) used to stop --resume with
/// "invalid JSON"; it is dropped with a warning and redone.
#[test]
fn resume_drops_a_torn_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let (out, args) = tiny_run(dir.path());
    let first = by_id(&out);
    let text = std::fs::read_to_string(&out).unwrap();
    let last_start = text[..text.len() - 1].rfind('\n').unwrap() + 1;
    let torn = &text[..last_start + (text.len() - last_start) / 2];
    std::fs::write(&out, torn).unwrap();
    with(&args, &["--resume"]).unwrap();
    assert_eq!(by_id(&out), first);
    assert!(std::fs::read_to_string(&out).unwrap().ends_with('\n'));
    assert_eq!(lines(&out).len(), 3);
}

/// --resume used to append whatever this run's settings were: another seed, temperature or
/// model silently mixed two configurations in one file. Each is refused, naming the field and
/// both values; the file is left as it was. A fine-tune of the same model (config and
/// tokenizer equal, one weight matrix changed) has another fingerprint and is refused too.
#[test]
fn resume_refuses_another_seed_sampler_or_model() {
    let dir = tempfile::tempdir().unwrap();
    let (out, args) = tiny_run(dir.path());
    let before = std::fs::read_to_string(&out).unwrap();
    for (flag, value, field, old) in [
        ("--seed", "6", "seed", "5"),
        ("--temperature", "0.7", "sampling.temperature", "0.8"),
        ("--max-new-tokens", "7", "sampling.max_new_tokens", "6"),
    ] {
        let e = format!("{:#}", with(&args, &[flag, value, "--resume"]).unwrap_err());
        assert!(e.contains(&format!("{field} = {old}")) && e.contains(&format!("{field} = {value}")), "{flag}: {e}");
        assert!(e.contains("r.jsonl:1") && e.contains("--output"), "{e}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), before);
    }
    // The "fine-tune": every f32 of the middle tensor (by file offset) nudged in its last bit.
    let model = dir.path().join("llama-tok");
    let tuned = dir.path().join("tuned");
    std::fs::create_dir(&tuned).unwrap();
    for f in ["config.json", "generation_config.json", "tokenizer.json"] {
        std::fs::copy(model.join(f), tuned.join(f)).unwrap();
    }
    let mut st = std::fs::read(model.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&st[8..8 + n]).unwrap();
    let mut ranges: Vec<(usize, usize)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, t)| (t["data_offsets"][0].as_u64().unwrap() as usize, t["data_offsets"][1].as_u64().unwrap() as usize))
        .collect();
    ranges.sort();
    let (a, b) = ranges[ranges.len() / 2];
    for i in (8 + n + a..8 + n + b).step_by(4) {
        st[i] ^= 1;
    }
    std::fs::write(tuned.join("model.safetensors"), st).unwrap();
    let (fp, fp_tuned) = (ipo::rollout::fingerprint::model_fingerprint(&model).unwrap(), ipo::rollout::fingerprint::model_fingerprint(&tuned).unwrap());
    assert_ne!(fp, fp_tuned, "a fine-tune passes for its base");
    let e = format!("{:#}", with(&args, &["--model", s(&tuned), "--resume"]).unwrap_err());
    assert!(e.contains(&format!("model = \"{fp}\"")) && e.contains(&fp_tuned), "{e}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), before);
}

/// A run in which every sample failed used to exit 0; it is an error that says so (with the
/// first reason), and the failed lines stay in the output for a --resume to redo.
#[test]
fn every_sample_failing_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama_with_tokenizer(dir.path(), &byte_tokenizer_json());
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"id\": \"a\", \"prompt\": \"  \"}\n{\"id\": \"b\", \"prompt\": \"\"}\n").unwrap();
    let out = dir.path().join("r.jsonl");
    let e = run(&["--model", s(&model), "--prompts", s(&prompts), "--output", s(&out), "--no-chat-template", "--max-new-tokens", "4"]).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("every one of the 2 samples failed") && e.contains("empty prompt") && e.contains("r.jsonl"), "{e}");
    assert_eq!(lines(&out).iter().filter(|l| l["finish"] == "error").count(), 2);
}
