//! Data parallel through real processes on 127.0.0.1 (the TCP transport): `ipo launch --nproc 2
//! -- train ... --device cpu` equals the single-process `ipo train` with the same global batch;
//! a rank killed mid-run stops the job with an error naming it (through `launch`, and without
//! it: the surviving rank itself fails naming the dead one, within the timeout); a rank that
//! never comes is named by rank 0's rendezvous; bad torchrun variables are named; commands
//! that do not run data parallel refuse a world size above 1; `launch --help` covers every flag;
//! `generate` shards its prompts over the ranks and writes the single-process lines.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{f32_tensors as tensors, tiny_fixture, write_random_pairs};

const IPO: &str = env!("CARGO_BIN_EXE_ipo");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed when the test ends, pass or fail.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn train_flags(pairs: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let paths = [("--model", tiny_fixture("llama")), ("--pairs", pairs.to_path_buf()), ("--output", out.to_path_buf())];
    let mut f = vec!["train".to_string()];
    f.extend(paths.iter().flat_map(|(k, p)| [k.to_string(), p.to_string_lossy().into_owned()]));
    f.extend("--device cpu --lr 3e-3 --beta 0.2 --seed 3".split(' ').map(String::from));
    f.extend(extra.iter().map(|s| s.to_string()));
    f
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

/// The bound of tests/dist_train.rs for full fine-tuning (fp32 rounding of the gradient sums).
const FULL_TOL: f32 = 2e-6;

#[test]
fn launch_nproc_2_train_equals_single_process() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 10, 21);
    let extra = ["--batch-size", "4", "--micro-batch-size", "1", "--epochs", "2"];
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let o = run(Command::new(IPO).args(train_flags(&pairs, &one, &extra)));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let port = free_port().to_string();
    let t0 = Instant::now();
    let o = run(Command::new(IPO).args(["launch", "--nproc", "2", "--master-port", &port, "--"]).args(train_flags(&pairs, &two, &extra)));
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("launch --nproc 2: {:.2} s", t0.elapsed().as_secs_f64());
    assert!(o.status.success(), "{err}");
    assert!(err.contains("[rank 0] train: done") && err.contains("[rank 1] train: done"), "{err}");
    // One metrics line per step (rank 0 alone writes), the same global values.
    let lines = |d: &Path| {
        std::fs::read_to_string(d.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).collect::<Vec<_>>()
    };
    let (m1, m2) = (lines(&one), lines(&two));
    assert_eq!(m1.len(), 6);
    assert_eq!(m2.len(), 6);
    for (a, b) in m1.iter().zip(&m2) {
        assert_eq!((&a["step"], &a["pairs"], &a["tokens"]), (&b["step"], &b["pairs"], &b["tokens"]));
        let (x, y) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((x - y).abs() < 1e-5, "step {}: loss {x} vs {y}", a["step"]);
    }
    let (w1, w2) = (tensors(&one.join("final/model.safetensors")), tensors(&two.join("final/model.safetensors")));
    let base = tensors(&tiny_fixture("llama").join("model.safetensors"));
    let diff = |a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]| {
        a.iter().zip(b).flat_map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs())).fold(0f32, f32::max)
    };
    let (d, moved) = (diff(&w1, &w2), diff(&w1, &base));
    eprintln!("launch vs single: max |diff| {d:e}, weights moved {moved:e}");
    assert!(d <= FULL_TOL && moved > 1000.0 * FULL_TOL, "diff {d}, moved {moved}");
}

/// Child pids of `pid` whose environment has `RANK=rank`.
fn child_with_rank(pid: u32, rank: usize) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)).and_then(|x| x.parse::<u32>().ok());
        if ppid != Some(pid) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|kv| kv == format!("RANK={rank}").as_bytes()) {
            return Some(p);
        }
    }
    None
}

fn wait_for_metrics(out: &Path, child: &mut Child) {
    let t0 = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |s| s.lines().count()) < 2 {
        assert!(child.try_wait().unwrap().is_none(), "the job ended before it was killed");
        assert!(t0.elapsed() < Duration::from_secs(120), "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits at most `limit` for `child` to exit; returns its stderr.
fn exit_within(mut child: Child, limit: Duration) -> (std::process::ExitStatus, String, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return (s, err, t0.elapsed());
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("still running {limit:?} after a rank died");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn long_run(tmp: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let pairs = tmp.join("pairs.jsonl");
    write_random_pairs(&pairs, 30, 5);
    (pairs, tmp.join("out"))
}

#[test]
fn a_killed_rank_stops_launch_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (pairs, out) = long_run(tmp.path());
    let port = free_port().to_string();
    let mut launch = Command::new(IPO)
        .args(["launch", "--nproc", "2", "--master-port", &port, "--"])
        .args(train_flags(&pairs, &out, &["--batch-size", "2", "--micro-batch-size", "1", "--epochs", "500", "--save-every", "7"]))
        .env("IPO_DIST_TIMEOUT", "20")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_metrics(&out, &mut launch);
    let victim = child_with_rank(launch.id(), 1).expect("rank 1 is a child of launch");
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let pid = launch.id();
    let (status, err, took) = exit_within(launch, Duration::from_secs(15));
    eprintln!("launch stopped {took:?} after rank 1 was killed");
    assert!(!status.success());
    // Rank 0 either failed on its own (it saw rank 1 go) or was stopped; rank 1 is the cause.
    assert!(err.contains("error: rank 1 failed (signal: 9"), "{err}");
    assert!(err.contains("; rank 0 failed too (exit status: 1)") || err.contains("; stopped ranks 0"), "{err}");
    assert!(child_with_rank(pid, 0).is_none(), "rank 0 was stopped");
    // Nothing half-written: every step-N/ is complete, no final/.
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(!n.starts_with("step-") || e.path().join("trainer_state.json").is_file(), "{n}");
    }
    assert!(!out.join("final").exists());
}

#[test]
fn surviving_rank_fails_naming_the_dead_or_missing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (pairs, out) = long_run(tmp.path());
    let port = free_port().to_string();
    let spawn = |rank: usize| {
        Command::new(IPO)
            .args(train_flags(&pairs, &out, &["--batch-size", "2", "--micro-batch-size", "1", "--epochs", "500"]))
            .envs([("RANK", rank.to_string()), ("WORLD_SIZE", "2".into()), ("MASTER_ADDR", "127.0.0.1".into()), ("MASTER_PORT", port.clone())])
            .env("IPO_DIST_TIMEOUT", "5")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Rank 1 dies mid-run (SIGKILL): rank 0 fails at its next collective, naming rank 1.
    let mut r0 = spawn(0);
    let mut r1 = Guard(spawn(1));
    wait_for_metrics(&out, &mut r0);
    r1.0.kill().unwrap();
    let (s, err, took) = exit_within(r0, Duration::from_secs(15));
    eprintln!("rank 0 failed {took:?} after rank 1 was killed");
    assert!(!s.success());
    assert!(err.contains("rank 1 closed its connection"), "{err}");
    // Rank 1 of a fresh job never starts: rank 0 names it after IPO_DIST_TIMEOUT.
    let t0 = Instant::now();
    let o = run(Command::new(IPO)
        .args(train_flags(&pairs, &tmp.path().join("alone"), &["--batch-size", "2"]))
        .envs([("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("IPO_DIST_TIMEOUT", "1")])
        .env("MASTER_PORT", free_port().to_string()));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("ranks 1 of 2 did not join within 1.0 s"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30));
    // Rank 1 with no rank 0: it names the address it could not reach.
    let port = free_port();
    let o = run(Command::new(IPO)
        .args(train_flags(&pairs, &tmp.path().join("lost"), &["--batch-size", "2"]))
        .envs([("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("IPO_DIST_TIMEOUT", "1")])
        .env("RANK", "1")
        .env("MASTER_PORT", port.to_string()));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&format!("rendezvous at 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) failed")), "{err}");
}

#[test]
fn bad_environment_is_named_and_other_commands_refuse_world_above_1() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 2, 1);
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("WORLD_SIZE", "two"), ("RANK", "0")], "WORLD_SIZE=\"two\": expected a non-negative integer"),
        (&[("WORLD_SIZE", "2"), ("RANK", "0")], "MASTER_ADDR is not set"),
        (&[("WORLD_SIZE", "2"), ("RANK", "5"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], "RANK=5 is not below WORLD_SIZE=2"),
        (&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "http")], "MASTER_PORT=\"http\": expected a TCP port"),
        (&[("WORLD_SIZE", "1"), ("IPO_DIST_TIMEOUT", "soon")], "IPO_DIST_TIMEOUT=\"soon\""),
    ];
    for (vars, want) in cases {
        let o = run(Command::new(IPO).args(train_flags(&pairs, &tmp.path().join("o"), &["--batch-size", "2"])).envs(vars.iter().copied()));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{vars:?}: {err}");
    }
    assert!(!tmp.path().join("o").exists(), "nothing written on a bad environment");
    let o = run(Command::new(IPO).args(["eval", "--model", "m", "--harmful", "x", "--benign", "x", "--output", "y"]).envs([("WORLD_SIZE", "2"), ("RANK", "1")]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("ipo eval does not run data parallel yet (WORLD_SIZE=2 from the environment)"), "{err}");
}

#[test]
fn launch_help_explains_every_flag() {
    let o = run(Command::new(IPO).args(["launch", "--help"]));
    let help = String::from_utf8_lossy(&o.stdout);
    for f in
        ["--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "RANK", "WORLD_SIZE", "LOCAL_RANK", "IPO_DIST_TIMEOUT", "SLURM_PROCID", "NCCL"]
    {
        assert!(help.contains(f), "{f} missing from:\n{help}");
    }
    let o = run(Command::new(IPO).args(["launch", "--nproc", "2", "--node-rank", "1", "--", "train"]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--node-rank 1 must be below --nnodes 1"));
}

fn sorted_lines(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(p).unwrap().lines().map(String::from).collect();
    v.sort();
    v
}

/// `ipo launch --nproc 2 -- generate` writes the lines of the single-process run (in another
/// order) and no part files; an interrupted two-process run (parts left, one with a torn last
/// line, a duplicate of a line already folded into the output) is finished by `--resume` at
/// world 3 with every sample exactly once.
#[test]
fn launch_nproc_2_generate_writes_the_single_process_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_llama_with_tokenizer(tmp.path(), &common::byte_tokenizer_json());
    let prompts = tmp.path().join("p.jsonl");
    let text: String = (0..7).map(|i| format!("{{\"id\": \"p{i}\", \"prompt\": \"Prompt number {i} {}\"}}\n", "x".repeat(i))).collect();
    std::fs::write(&prompts, text).unwrap();
    let flags = |out: &Path| -> Vec<String> {
        let mut f: Vec<String> = vec!["generate".into(), "--model".into(), model.to_string_lossy().into(), "--prompts".into(), prompts.to_string_lossy().into()];
        f.extend(["--output".into(), out.to_string_lossy().into()]);
        f.extend("--no-chat-template --n 2 --max-new-tokens 12 --temperature 0.9 --seed 11 --kv-cache-mb 8 --device cpu".split(' ').map(String::from));
        f
    };
    let one = tmp.path().join("one.jsonl");
    let o = run(Command::new(IPO).args(flags(&one)));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = sorted_lines(&one);
    assert_eq!(want.len(), 14);

    let two = tmp.path().join("two.jsonl");
    let port = free_port().to_string();
    let o = run(Command::new(IPO).args(["launch", "--nproc", "2", "--master-port", &port, "--"]).args(flags(&two)));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("wrote 14 rollouts"), "the summary counts the whole job: {err}");
    assert_eq!(sorted_lines(&two), want);
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".part")).collect();
    assert!(left.is_empty(), "parts left: {left:?}");

    // An interrupted run: the output holds 3 lines, rank 0's part 2 more (one of them also in
    // the output: a fold killed midway), rank 1's part 2 more and a torn line.
    let raw: Vec<String> = std::fs::read_to_string(&one).unwrap().lines().map(String::from).collect();
    let three = tmp.path().join("three.jsonl");
    std::fs::write(tmp.path().join("three.jsonl.rank0.part"), format!("{}\n{}\n", raw[2], raw[3])).unwrap();
    std::fs::write(tmp.path().join("three.jsonl.rank1.part"), format!("{}\n{}\n{}", raw[4], raw[5], &raw[6][..20])).unwrap();
    let o = run(Command::new(IPO).args(flags(&three)));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("three.jsonl.rank0.part") && err.contains("--resume"), "{err}");
    std::fs::write(&three, raw[..3].join("\n") + "\n").unwrap();
    let port = free_port().to_string();
    let o = run(Command::new(IPO).args(["launch", "--nproc", "3", "--master-port", &port, "--"]).args(flags(&three)).arg("--resume"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("wrote 8 rollouts"), "6 samples were done: {err}");
    assert_eq!(sorted_lines(&three), want);
    assert!(!tmp.path().join("three.jsonl.rank1.part").exists());
}

/// `ipo score` under `ipo launch --nproc 3`: each rank scores every third line, rank 0 writes
/// them all in input order, byte for byte the file of one process (pairs and segments; forwards
/// of at most 24 tokens, so each rank runs several).
#[test]
fn launch_nproc_3_score_writes_the_single_process_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::tiny_fixture("qwen2");
    let pairs = tmp.path().join("pairs.jsonl");
    common::write_random_pairs(&pairs, 8, 31);
    let segs = tmp.path().join("segs.jsonl");
    let text: String = (0..5).map(|i| format!("{{\"id\": \"s{i}\", \"context_ids\": [{}], \"target_ids\": [{}, 7]}}\n", 3 + i, 40 + 9 * i)).collect();
    std::fs::write(&segs, text).unwrap();
    for (what, input) in [("--pairs", &pairs), ("--input", &segs)] {
        let flags = |out: &Path| -> Vec<String> {
            let mut f: Vec<String> = vec!["score".into(), "--model".into(), model.to_string_lossy().into(), what.into(), input.to_string_lossy().into()];
            f.extend(["--output".into(), out.to_string_lossy().into(), "--batch-tokens".into(), "24".into(), "--device".into(), "cpu".into()]);
            f
        };
        let one = tmp.path().join(format!("one{what}.jsonl"));
        let o = run(Command::new(IPO).args(flags(&one)));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let three = tmp.path().join(format!("three{what}.jsonl"));
        let port = free_port().to_string();
        let o = run(Command::new(IPO).args(["launch", "--nproc", "3", "--master-port", &port, "--"]).args(flags(&three)));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (a, b) = (std::fs::read_to_string(&one).unwrap(), std::fs::read_to_string(&three).unwrap());
        assert_eq!(a.lines().count(), if what == "--pairs" { 8 } else { 5 });
        assert_eq!(a, b, "{what}: the 3-process file differs from the 1-process one");
    }
}
