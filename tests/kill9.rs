//! `kill -9` in the middle of the long-running commands loses nothing: the real binary is
//! started, killed with SIGKILL once it has written part of its output, and resumed; the result
//! equals an uninterrupted run. (The other resume tests stop runs politely, with --stop-after
//! or by editing files; this one kills the process wherever it happens to be.)

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{byte_tokenizer_json, tiny_fixture, tiny_llama_with_tokenizer, write_random_pairs};

fn ipo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ipo")).args(args).output().unwrap()
}

/// Starts `ipo args`, waits until `ready()` holds (polling), then SIGKILLs it. Returns false
/// when the process finished before `ready()` held (the kill came too late to mean anything).
fn kill_when(args: &[&str], ready: impl Fn() -> bool) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ipo")).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    loop {
        if ready() {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            return true;
        }
        if child.try_wait().unwrap().is_some() || t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// (id, sample) -> completion ids of the complete lines of a rollouts file.
fn rollouts(p: &Path) -> BTreeMap<(String, u64), serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| ((v["id"].as_str().unwrap().to_string(), v["sample"].as_u64().unwrap()), v["completion_ids"].clone()))
        .collect()
}

fn complete_lines(p: &Path) -> usize {
    std::fs::read_to_string(p).map(|t| t.matches('\n').count()).unwrap_or(0)
}

#[test]
fn generate_killed_mid_run_resumes_to_the_same_rollouts() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama_with_tokenizer(dir.path(), &byte_tokenizer_json());
    let prompts = dir.path().join("p.jsonl");
    let text: String = (0..48).map(|i| format!("{{\"id\": \"q{i}\", \"prompt\": \"prompt number {i}: tell me\"}}\n")).collect();
    std::fs::write(&prompts, text).unwrap();
    let (killed, straight) = (dir.path().join("killed.jsonl"), dir.path().join("straight.jsonl"));
    let args = |out: &Path| {
        vec![
            "generate".to_string(), "--model".into(), model.to_str().unwrap().into(), "--prompts".into(), prompts.to_str().unwrap().into(),
            "--output".into(), out.to_str().unwrap().into(), "--n".into(), "2".into(), "--max-new-tokens".into(), "48".into(),
            "--max-batch".into(), "2".into(), "--seed".into(), "9".into(), "--no-chat-template".into(),
        ]
    };
    let a: Vec<String> = args(&killed);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    assert!(kill_when(&a, || complete_lines(&killed) >= 3), "the run finished before it could be killed");
    let at_kill = complete_lines(&killed);
    assert!((3..96).contains(&at_kill), "{at_kill} lines at the kill");
    let mut resume = a.clone();
    resume.push("--resume");
    let o = ipo(&resume);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b: Vec<String> = args(&straight);
    let o = ipo(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (k, s) = (rollouts(&killed), rollouts(&straight));
    assert_eq!(s.len(), 96);
    assert_eq!(k, s, "killed + resumed differs from the uninterrupted run");
    assert_eq!(complete_lines(&killed), 96, "every sample exactly once");
}

#[test]
fn train_killed_mid_run_resumes_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 24, 11);
    let model = tiny_fixture("llama");
    let (killed, straight) = (dir.path().join("killed"), dir.path().join("straight"));
    let args = |out: &Path| {
        vec![
            "train".to_string(), "--model".into(), model.to_str().unwrap().into(), "--pairs".into(), pairs.to_str().unwrap().into(),
            "--output".into(), out.to_str().unwrap().into(), "--batch-size".into(), "2".into(), "--micro-batch-size".into(), "1".into(),
            "--epochs".into(), "2".into(), "--save-every".into(), "1".into(), "--lr".into(), "1e-3".into(), "--seed".into(), "4".into(),
        ]
    };
    let a: Vec<String> = args(&killed);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    assert!(kill_when(&a, || killed.join("step-3").join("trainer_state.json").is_file()), "the run finished before it could be killed");
    assert!(!killed.join("final").exists(), "killed before the end");
    let mut resume = a.clone();
    resume.extend_from_slice(&["--resume", killed.to_str().unwrap()]);
    let o = ipo(&resume);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b: Vec<String> = args(&straight);
    let o = ipo(&b.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = |d: &Path| std::fs::read(d.join("final/model.safetensors")).unwrap();
    assert!(w(&killed) == w(&straight), "final weights differ between the killed + resumed run and the straight one");
    // No temp of the killed process survives the resumed run's checkpoints.
    let temps: Vec<_> = std::fs::read_dir(&killed).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".tmp-")).collect();
    assert!(temps.is_empty(), "{temps:?}");
}
