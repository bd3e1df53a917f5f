//! `ipo train` end to end on the tiny HF fixture models: exact resume (N steps straight equal
//! N/2 + resume + N/2 bit for bit, full fine-tuning with AdamW + warm-up + cosine + clipping +
//! weight decay + micro-batches, and LoRA), atomic checkpoints (a checkpoint directory is
//! complete or absent after a failure or crash while writing), and clear errors on bad input:
//! ids outside the vocabulary or the context, empty segments, a pairs file from another
//! tokenizer, NaN loss (stops with the step, the pair ids and a saved checkpoint), and a memory
//! budget that is too small. A fresh run into a folder holding an earlier run is refused
//! (it used to delete that run's metrics.jsonl).

mod common;

use std::path::Path;

use clap::Parser;
use common::{tiny_fixture, tiny_llama_with_tokenizer, write_random_pairs};
use ipo::train::checkpoint::{latest, write_dir_atomic};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ipo::cli::train::Args,
}

/// Runs `ipo train` with the given flags (parsed like the command line).
fn train(flags: &[&str]) -> anyhow::Result<()> {
    let mut argv = vec!["ipo-train"];
    argv.extend_from_slice(flags);
    ipo::cli::train::run(Cli::try_parse_from(argv)?.args)
}

fn common_flags<'a>(model: &'a str, pairs: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "--model", model, "--pairs", pairs, "--output", out, "--beta", "0.2", "--sft-coef", "0.1", "--lr", "3e-3",
        "--weight-decay", "0.01", "--max-grad-norm", "0.5", "--warmup-ratio", "0.2", "--batch-size", "3",
        "--micro-batch-size", "2", "--epochs", "2", "--seed", "5",
    ]
}

fn metrics_without_timing(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("tokens_per_s");
            o.remove("elapsed_s");
            v
        })
        .collect()
}

fn resume_case(model: &str, extra: &[&str], weights_file: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 7, 42); // 7 pairs, batch 3 -> 3 steps per epoch, 6 steps
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let model = tiny_fixture(model);
    let (m, p) = (model.to_str().unwrap(), pairs.to_str().unwrap());
    let mut fa = common_flags(m, p, a.to_str().unwrap());
    fa.extend_from_slice(extra);
    train(&fa).unwrap();
    let mut fb = common_flags(m, p, b.to_str().unwrap());
    fb.extend_from_slice(extra);
    let mut first = fb.clone();
    first.extend_from_slice(&["--stop-after", "3"]);
    train(&first).unwrap();
    assert!(b.join("step-3/trainer_state.json").is_file());
    assert!(!b.join("final").exists(), "stopped run has no final model");
    let mut second = fb.clone();
    second.extend_from_slice(&["--resume", b.to_str().unwrap()]);
    train(&second).unwrap();
    let fa_bytes = std::fs::read(a.join("final").join(weights_file)).unwrap();
    let fb_bytes = std::fs::read(b.join("final").join(weights_file)).unwrap();
    assert!(fa_bytes == fb_bytes, "final {weights_file} differs between straight and resumed runs");
    let (ma, mb) = (metrics_without_timing(&a), metrics_without_timing(&b));
    assert_eq!(ma.len(), 6);
    assert_eq!(ma, mb, "metrics differ between straight and resumed runs");
    // Training moved the weights, and the chart and the reference cache were written.
    assert!(a.join("metrics.png").is_file() && a.join("ref_pairs.jsonl").is_file());
    let losses: Vec<f64> = ma.iter().map(|m| m["loss"].as_f64().unwrap()).collect();
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(ma[0]["lr"].as_f64().unwrap() == 0.0 && ma[2]["lr"].as_f64().unwrap() > 0.0, "warm-up from 0");
}

#[test]
fn full_finetune_resume_is_bit_exact() {
    resume_case("llama", &[], "model.safetensors");
}

#[test]
fn lora_resume_is_bit_exact_and_merge_writes_hf_folder() {
    resume_case("qwen3", &["--lora-rank", "2", "--lora-alpha", "4", "--lora-targets", "q,v,down", "--merge"], "adapter_model.safetensors");
}

#[test]
fn lora_outputs_are_peft_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 4, 3);
    let out = tmp.path().join("o");
    let model = tiny_fixture("qwen2");
    let (m, p, o) = (model.to_str().unwrap(), pairs.to_str().unwrap(), out.to_str().unwrap());
    train(&["--model", m, "--pairs", p, "--output", o, "--batch-size", "2", "--micro-batch-size", "2", "--lr", "1e-2",
        "--lora-rank", "4", "--lora-targets", "q,k,gate", "--merge", "--warmup-ratio", "0"]).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"], json!(["q_proj", "k_proj", "gate_proj"]));
    let bytes = std::fs::read(out.join("final/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a = st.tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight").unwrap();
    assert_eq!(a.shape(), &[4, 64]);
    let b = st.tensor("base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight").unwrap();
    assert_eq!(b.shape(), &[128, 4]);
    assert!(b.data().chunks(4).any(|c| f32::from_le_bytes(c.try_into().unwrap()) != 0.0), "B trained away from 0");
    // The merged folder loads as a model and differs from the base only in adapted matrices.
    let mdir = out.join("merged");
    let cfg = ipo::model::load::load_config(&mdir).unwrap();
    let merged = ipo::model::load::load_weights(&mdir, &cfg).unwrap();
    let base = ipo::model::load::load_weights(&model, &cfg).unwrap();
    assert_ne!(merged.layers[0].wq.data, base.layers[0].wq.data);
    assert_eq!(merged.layers[0].wv.data, base.layers[0].wv.data);
}

#[test]
fn checkpoint_dir_is_complete_or_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    // A complete checkpoint.
    write_dir_atomic(&out.join("step-2"), |d| {
        std::fs::write(d.join("trainer_state.json"), "{}").unwrap();
        Ok(())
    })
    .unwrap();
    // A write that fails half way: nothing named step-4 appears, the temp dir is removed.
    let err = write_dir_atomic(&out.join("step-4"), |d| {
        std::fs::write(d.join("model.safetensors"), b"partial").unwrap();
        Err(ipo::train::TrainError::Io("disk full (simulated)".into()))
    });
    assert!(err.is_err());
    assert!(!out.join("step-4").exists());
    // A crash half way (the process dies inside the write): simulated by a panic, which
    // leaves the temp dir behind, never a `step-6`; `latest` ignores the leftover.
    let r = std::panic::catch_unwind(|| {
        let _ = write_dir_atomic(&out.join("step-6"), |d| {
            std::fs::write(d.join("model.safetensors"), b"partial").unwrap();
            panic!("simulated crash");
        });
    });
    assert!(r.is_err());
    assert!(!out.join("step-6").exists());
    let leftovers: Vec<_> = std::fs::read_dir(out).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(leftovers.iter().any(|n| n.starts_with(".step-6.tmp")), "{leftovers:?}");
    assert_eq!(latest(out).unwrap(), out.join("step-2"));
    // That leftover, as a killed process leaves it (its pid no longer running), goes away
    // when the next checkpoint is written; a temp of a live process stays.
    let leftover = leftovers.iter().find(|n| n.starts_with(".step-6.tmp")).unwrap();
    // Linux pids stay below PID_MAX_LIMIT (2^22), so this one is never running (a free pid just
    // above ours could be taken by a process the other tests start before the check).
    let dead = 1u32 << 22;
    let orphan = out.join(format!(".step-6.tmp-{dead}"));
    std::fs::rename(out.join(leftover), &orphan).unwrap();
    let live = out.join(format!(".step-7.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    write_dir_atomic(&out.join("step-8"), |d| {
        std::fs::write(d.join("trainer_state.json"), "{}").unwrap();
        Ok(())
    })
    .unwrap();
    assert!(!orphan.exists(), "a dead writer's checkpoint temp is removed");
    assert!(live.exists(), "a live writer's temp is kept");
    std::fs::remove_dir_all(&live).unwrap();
    std::fs::remove_dir_all(out.join("step-8")).unwrap();
    // A real run: the checkpoint it leaves loads, and every expected file is there.
    let pairs = out.join("pairs.jsonl");
    write_random_pairs(&pairs, 4, 9);
    let o = out.join("run");
    let model = tiny_fixture("llama");
    train(&["--model", model.to_str().unwrap(), "--pairs", pairs.to_str().unwrap(), "--output", o.to_str().unwrap(),
        "--batch-size", "2", "--micro-batch-size", "1", "--save-every", "1", "--stop-after", "1"]).unwrap();
    for f in ["model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json"] {
        assert!(o.join("step-1").join(f).is_file(), "{f}");
    }
    assert!(std::fs::read_dir(&o).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().contains(".tmp")));
}

/// A temp dir with `pairs.jsonl` holding the given lines, and the error of training on it.
fn train_err(model: &Path, lines: &[serde_json::Value], extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(&pairs, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let out = tmp.path().join("out");
    let mut f = vec!["--model", model.to_str().unwrap(), "--pairs", pairs.to_str().unwrap(), "--output", out.to_str().unwrap(),
        "--batch-size", "2", "--micro-batch-size", "2"];
    f.extend_from_slice(extra);
    let e = format!("{:#}", train(&f).unwrap_err());
    println!("{e}");
    e
}

fn pair(id: &str, c: Vec<u32>, a: Vec<u32>, b: Vec<u32>) -> serde_json::Value {
    json!({"id": id, "context_ids": c, "chosen_ids": a, "rejected_ids": b, "ref_chosen_logp": -5.0, "ref_rejected_logp": -6.0})
}

#[test]
fn bad_inputs_give_clear_errors() {
    let m = tiny_fixture("llama");
    let ok = pair("ok", vec![1, 2, 3], vec![4, 5], vec![6]);
    let e = train_err(&m, &[ok.clone(), pair("big", vec![1, 2], vec![300], vec![4])], &[]);
    assert!(e.contains("pairs.jsonl:2") && e.contains("chosen_ids[0] = 300") && e.contains("vocab"), "{e}");
    let e = train_err(&m, &[pair("long", vec![7; 125], vec![1; 5], vec![2; 3]), ok.clone()], &[]);
    assert!(e.contains("pairs.jsonl:1") && e.contains("max_position_embeddings = 128"), "{e}");
    let e = train_err(&m, &[ok.clone(), pair("empty", vec![1], vec![2], vec![])], &[]);
    assert!(e.contains("pairs.jsonl:2") && e.contains("empty rejected_ids"), "{e}");
    let e = train_err(&m, &[pair("noctx", vec![], vec![2], vec![3])], &[]);
    assert!(e.contains("pairs.jsonl:1") && e.contains("empty context_ids"), "{e}");
    let mut bad_ref = ok.clone();
    bad_ref["ref_chosen_logp"] = json!(3.5);
    let e = train_err(&m, &[bad_ref], &[]);
    assert!(e.contains("pairs.jsonl:1") && e.contains("ref_chosen_logp"), "{e}");
    let e = train_err(&m, &[ok.clone(), ok.clone()], &["--memory-budget-gb", "0.0001"]);
    assert!(e.contains("--memory-budget-gb") && e.contains("GiB") && e.contains("id ok"), "{e}");
    let e = train_err(&m, &[ok.clone()], &["--micro-batch-size", "4"]);
    assert!(e.contains("--micro-batch-size"), "{e}");
    let e = train_err(&m, &[ok.clone()], &["--lora-rank", "2", "--lora-targets", "q,foo"]);
    assert!(e.contains("--lora-targets") && e.contains("foo"), "{e}");
}

#[test]
fn pairs_from_another_tokenizer_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A word-level tokenizer over 256 words w0..w255 (decode joins words with spaces).
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256).map(|i| (format!("w{i}"), json!(i))).collect();
    let tok = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
    let model = tiny_llama_with_tokenizer(tmp.path(), &tok);
    let prompt = "w10 w11 w12 w13";
    let mk = |id: &str, ctx: Vec<u32>| {
        let mut p = pair(id, ctx, vec![20, 21], vec![22]);
        p["prompt"] = json!(prompt);
        p
    };
    // Same tokenizer: the context decodes to text containing the prompt: trains.
    let good = [mk("a", vec![5, 10, 11, 12, 13, 6]), mk("b", vec![10, 11, 12, 13])];
    let tmpo = tmp.path().join("pairs_ok.jsonl");
    std::fs::write(&tmpo, good.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let out = tmp.path().join("ok");
    train(&["--model", model.to_str().unwrap(), "--pairs", tmpo.to_str().unwrap(), "--output", out.to_str().unwrap(),
        "--batch-size", "2", "--micro-batch-size", "2"]).unwrap();
    // Other tokenizer: same prompt, ids that mean something else here.
    let e = train_err(&model, &[mk("a", vec![5, 99, 31, 7, 200, 6]), mk("b", vec![3, 1, 4, 1])], &[]);
    assert!(e.contains("pairs.jsonl:1") && e.contains("another tokenizer"), "{e}");
}

#[test]
fn nan_loss_stops_with_step_ids_and_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(tiny_fixture("llama").join("config.json"), model.join("config.json")).unwrap();
    // The fixture weights with one NaN in the final norm: every log-prob becomes NaN.
    let bytes = std::fs::read(tiny_fixture("llama").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()))
        .collect();
    tensors.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap().2[3] = f32::NAN;
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            let b: &[u8] = unsafe { std::slice::from_raw_parts(d.as_ptr() as *const u8, d.len() * 4) };
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &model.join("model.safetensors")).unwrap();
    let lines = [pair("x1", vec![1, 2, 3], vec![4, 5], vec![6]), pair("x2", vec![7, 8], vec![9], vec![10, 11])];
    let pairs = tmp.path().join("pairs.jsonl");
    std::fs::write(&pairs, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let out = tmp.path().join("out");
    let e = format!("{:#}", train(&["--model", model.to_str().unwrap(), "--pairs", pairs.to_str().unwrap(), "--output",
        out.to_str().unwrap(), "--batch-size", "2", "--micro-batch-size", "1"]).unwrap_err());
    assert!(e.contains("step 1") && e.contains("non-finite loss") && e.contains("x1") && e.contains("x2"), "{e}");
    assert!(e.contains("step-0") && out.join("step-0/trainer_state.json").is_file(), "{e}");
    assert!(!out.join("final").exists());
}

/// `ipo train` without --resume into the folder of an earlier run used to delete its
/// metrics.jsonl silently and start over among its checkpoints; it is refused, the earlier
/// run's files untouched, and the message says to pass --resume or choose an empty folder. An
/// existing empty folder is fine, and --resume still continues the earlier run.
#[test]
fn fresh_run_into_an_earlier_runs_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 4, 9);
    let (o, empty) = (tmp.path().join("run"), tmp.path().join("empty"));
    std::fs::create_dir(&empty).unwrap();
    let model = tiny_fixture("llama");
    let flags = |out: &Path, extra: &[&str]| {
        let mut f: Vec<String> = ["--model", model.to_str().unwrap(), "--pairs", pairs.to_str().unwrap(), "--output", out.to_str().unwrap(),
            "--batch-size", "2", "--micro-batch-size", "1", "--save-every", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        f.extend(extra.iter().map(|s| s.to_string()));
        f
    };
    let run = |f: Vec<String>| train(&f.iter().map(String::as_str).collect::<Vec<_>>());
    run(flags(&o, &["--stop-after", "1"])).unwrap();
    run(flags(&empty, &["--stop-after", "1"])).unwrap();
    let metrics = std::fs::read_to_string(o.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1);
    let e = format!("{:#}", run(flags(&o, &[])).unwrap_err());
    assert!(e.contains("metrics.jsonl") && e.contains("--resume") && e.contains("empty --output"), "{e}");
    assert_eq!(std::fs::read_to_string(o.join("metrics.jsonl")).unwrap(), metrics, "the earlier run's metrics are kept");
    // Only a checkpoint left (metrics.jsonl lost): still an earlier run.
    std::fs::remove_file(o.join("metrics.jsonl")).unwrap();
    let e = format!("{:#}", run(flags(&o, &[])).unwrap_err());
    assert!(e.contains("step-1") && e.contains("--resume"), "{e}");
    run(flags(&o, &["--resume", o.to_str().unwrap()])).unwrap();
    assert!(o.join("final").is_dir());
}
