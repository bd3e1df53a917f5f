//! Structure-aware fuzzing on stable Rust (issue 16): no libFuzzer, no nightly. Each target starts
//! from valid seed inputs built here or read from tests/fixtures, applies 1-4 byte or structure
//! mutations per execution (bit flips, truncation, span deletion/duplication, crossover between
//! seeds, unicode/NUL insertion, and numbers such as 0, -1, 2^31, 2^63 and huge lengths spliced
//! into numeric fields: JSON numbers, PTX numbers, the integer fields of GGUF and safetensors
//! headers), and feeds the result through the public entry the CLI uses.
//!
//! Every execution must not panic, must finish within `MAX_SECONDS`, and must not allocate more
//! than `MAX_BYTES` on its thread. A failing input is written to `target/fuzz-crashes/` (raw and
//! hex) and the test fails naming it. Executions per target: `IPO_FUZZ_EXECS` (default 2000,
//! a few seconds in CI); the RNG seed: SplitMix64 of the target name xor `IPO_FUZZ_SEED`.
//! `scripts/fuzz.sh` runs the long version; docs/RELIABILITY.md has the numbers and findings.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Rng;
use serde_json::{json, Map, Value};

const MAX_SECONDS: f64 = 1.0; // CPU seconds of the thread (see thread_cpu_time)
const MAX_BYTES: usize = 1 << 30;

// ---------------------------------------------------------------- counting allocator

/// The system allocator, counting the live and peak bytes of the current thread while it is
/// armed (one fuzz execution). An allocation that would take the thread past `MAX_BYTES` is
/// recorded; it is still passed to the system (as address space, which a lazily-committing
/// kernel grants without touching pages) up to `HARD_BYTES`, so the input is reported by the
/// harness instead of aborting the process. Above `HARD_BYTES` the input is saved first, then
/// the allocation fails (which aborts: a GlobalAlloc may not unwind).
struct Counting;

const HARD_BYTES: usize = 16 << 30;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static CURRENT: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    /// The largest single request that went past `MAX_BYTES`, 0 if none.
    static OVER: Cell<usize> = const { Cell::new(0) };
    /// The input being executed, for the last-chance report above `HARD_BYTES`.
    static INPUT: Cell<Option<&'static (String, Vec<u8>)>> = const { Cell::new(None) };
}

fn on_alloc(size: usize) -> bool {
    ARMED
        .try_with(|a| {
            if !a.get() {
                return true;
            }
            let cur = CURRENT.with(|c| {
                let v = c.get().saturating_add(size);
                c.set(v);
                v
            });
            PEAK.with(|p| p.set(p.get().max(cur)));
            if cur > MAX_BYTES {
                OVER.with(|o| o.set(o.get().max(size)));
            }
            if cur > HARD_BYTES {
                a.set(false);
                if let Some((target, input)) = INPUT.with(|i| i.get()) {
                    let p = save_crash(target, input, &format!("allocation of {size} bytes (thread total {cur})"));
                    eprintln!("fuzz {target}: allocation of {size} bytes would abort; input saved to {}", p.display());
                }
                return false;
            }
            true
        })
        .unwrap_or(true)
}

fn on_free(size: usize) {
    let _ = ARMED.try_with(|a| {
        if a.get() {
            CURRENT.with(|c| c.set(c.get().saturating_sub(size)));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !on_alloc(l.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if !on_alloc(l.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        on_free(l.size());
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        on_free(l.size());
        if !on_alloc(new) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

// ---------------------------------------------------------------- harness

fn crash_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("fuzz-crashes")
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `input` as `<target>-<hash>.bin` and `.hex` (with `why` on the first line).
fn save_crash(target: &str, input: &[u8], why: &str) -> PathBuf {
    let dir = crash_dir();
    let _ = std::fs::create_dir_all(&dir);
    let stem = dir.join(format!("{target}-{:016x}", fnv(input)));
    let _ = std::fs::write(stem.with_extension("bin"), input);
    let _ = std::fs::write(stem.with_extension("hex"), format!("# {why}\n{}\n", hex(input)));
    stem.with_extension("hex")
}

/// What one target's run measured.
struct Report {
    execs: usize,
    elapsed: Duration,
    slowest: (Duration, Vec<u8>),
    peak: usize,
    /// Inputs that went through the whole entry without an error (the rest stop at one).
    accepted: usize,
    findings: Vec<String>,
}

/// CPU time of the calling thread. The hang check measures this rather than wall time: the
/// parsers under test never block, so their CPU time is their cost, and a loaded machine (other
/// builds, other fuzz targets on the same cores) no longer turns a slow scheduler into a
/// "took 1.2 s" finding.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `exec` on one input under the panic, time and allocation checks; a failure is saved and
/// added to `r.findings`.
fn check(target: &'static str, input: &[u8], exec: &dyn Fn(&[u8]) -> bool, r: &mut Report) {
    let leaked: &'static (String, Vec<u8>) = Box::leak(Box::new((target.to_string(), input.to_vec())));
    INPUT.with(|i| i.set(Some(leaked)));
    CURRENT.with(|c| c.set(0));
    PEAK.with(|p| p.set(0));
    OVER.with(|o| o.set(0));
    let t0 = thread_cpu_time();
    ARMED.with(|a| a.set(true));
    let res = catch_unwind(AssertUnwindSafe(|| exec(input)));
    ARMED.with(|a| a.set(false));
    let dt = thread_cpu_time().saturating_sub(t0);
    INPUT.with(|i| i.set(None));
    // SAFETY: `leaked` came from Box::leak above and nothing else holds it now.
    drop(unsafe { Box::from_raw(leaked as *const _ as *mut (String, Vec<u8>)) });
    let peak = PEAK.with(|p| p.get());
    let over = OVER.with(|o| o.get());
    r.execs += 1;
    r.accepted += matches!(res, Ok(true)) as usize;
    r.peak = r.peak.max(peak);
    if dt > r.slowest.0 {
        r.slowest = (dt, input.to_vec());
    }
    let mut fail = |why: String| {
        let p = save_crash(target, input, &why);
        r.findings.push(format!("{why}; input {} ({} bytes)", p.display(), input.len()));
    };
    if let Err(e) = res {
        let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
        fail(format!("panic: {msg}"));
    }
    if dt.as_secs_f64() > MAX_SECONDS {
        fail(format!("took {:.2} s (limit {MAX_SECONDS} s)", dt.as_secs_f64()));
    }
    if over > 0 || peak > MAX_BYTES {
        fail(format!("allocated {peak} bytes at peak, largest request {over} (limit {MAX_BYTES})"));
    }
}

fn execs() -> usize {
    std::env::var("IPO_FUZZ_EXECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)
}

/// Runs the regression inputs, the seeds, then `execs()` mutated inputs; prints one summary
/// line and fails on any finding.
fn fuzz(target: &'static str, seeds: &[Vec<u8>], regressions: &[Vec<u8>], mutate: &dyn Fn(&mut Rng, &[Vec<u8>]) -> Vec<u8>, exec: &dyn Fn(&[u8]) -> bool) {
    let env_seed = std::env::var("IPO_FUZZ_SEED").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    let mut rng = Rng(fnv(target.as_bytes()) ^ env_seed);
    let mut r = Report { execs: 0, elapsed: Duration::ZERO, slowest: (Duration::ZERO, Vec::new()), peak: 0, accepted: 0, findings: Vec::new() };
    let t0 = Instant::now();
    for input in regressions.iter().chain(seeds) {
        check(target, input, exec, &mut r);
    }
    for _ in 0..execs() {
        let input = mutate(&mut rng, seeds);
        check(target, &input, exec, &mut r);
    }
    r.elapsed = t0.elapsed();
    let shown: String = String::from_utf8_lossy(&r.slowest.1[..r.slowest.1.len().min(80)]).escape_debug().collect();
    println!(
        "fuzz {target}: {} executions ({} accepted) in {:.1} s ({:.0}/s), slowest {:.1} ms ({} bytes: \"{shown}\"), peak {:.1} MiB, findings {}",
        r.execs,
        r.accepted,
        r.elapsed.as_secs_f64(),
        r.execs as f64 / r.elapsed.as_secs_f64(),
        r.slowest.0.as_secs_f64() * 1e3,
        r.slowest.1.len(),
        r.peak as f64 / (1 << 20) as f64,
        r.findings.len()
    );
    for f in &r.findings {
        println!("fuzz {target}: FINDING {f}");
    }
    assert!(r.findings.is_empty(), "fuzz {target}: {} findings (first: {})", r.findings.len(), r.findings[0]);
}

// ---------------------------------------------------------------- mutations

const NUMBERS: &[&str] = &[
    "0", "-1", "1", "2147483648", "-2147483649", "4294967296", "9223372036854775808", "18446744073709551615",
    "18446744073709551616", "1e308", "1e999", "-0", "0.5", "NaN", "65536", "1099511627776", "5000000",
];
const INSERTS: &[&str] = &["\0", "\u{e9}", "\u{10FFFF}", "\u{202e}", "\u{FEFF}", "\"", "\\", "{", "}", "[", "]", ",", ":", "\n", "{{", "}}", "{%", "%}", "\u{fffd}"];
const WORDS: &[u64] = &[0, 1, u32::MAX as u64, 1 << 31, 1 << 32, 1 << 40, 1 << 63, u64::MAX, (1 << 29) + 1, 0x7fff_ffff_ffff_ffff];

fn pick<'a, T>(rng: &mut Rng, v: &'a [T]) -> &'a T {
    &v[(rng.next_u64() % v.len() as u64) as usize]
}

fn below(rng: &mut Rng, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (rng.next_u64() % n as u64) as usize
    }
}

/// One byte-level mutation of `b` (`other`: another seed, for crossover).
fn mutate_bytes(rng: &mut Rng, b: &mut Vec<u8>, other: &[u8]) {
    let n = b.len();
    match rng.next_u64() % 9 {
        0 if n > 0 => {
            let i = below(rng, n);
            b[i] ^= 1 << (rng.next_u64() % 8);
        }
        1 if n > 0 => {
            let i = below(rng, n);
            b[i] = *pick(rng, &[0u8, 0xff, 0x7f, 0x80, b'"', b'9']);
        }
        2 => b.truncate(below(rng, n + 1)),
        3 if n > 0 => {
            let i = below(rng, n);
            let j = (i + 1 + below(rng, 64)).min(n);
            b.drain(i..j);
        }
        4 if n > 0 => {
            let i = below(rng, n);
            let j = (i + 1 + below(rng, 256)).min(n);
            let span = b[i..j].to_vec();
            let at = below(rng, n + 1);
            b.splice(at..at, span);
        }
        5 => {
            let s = pick(rng, INSERTS).as_bytes();
            let at = below(rng, n + 1);
            b.splice(at..at, s.iter().copied());
        }
        6 => splice_number(rng, b),
        7 if !other.is_empty() => {
            let i = below(rng, other.len());
            let j = (i + 1 + below(rng, 512)).min(other.len());
            let at = below(rng, n + 1);
            let end = (at + below(rng, 64)).min(n);
            b.splice(at..end, other[i..j].iter().copied());
        }
        _ if n >= 8 => {
            let i = below(rng, n - 7);
            let w = *pick(rng, WORDS);
            if rng.next_u64() % 2 == 0 {
                b[i..i + 8].copy_from_slice(&w.to_le_bytes());
            } else {
                b[i..i + 4].copy_from_slice(&(w as u32).to_le_bytes());
            }
        }
        _ => b.push(rng.next_u64() as u8),
    }
}

/// Replaces a random run of ASCII digits (a textual number field) with an interesting number.
fn splice_number(rng: &mut Rng, b: &mut Vec<u8>) {
    let starts: Vec<usize> = (0..b.len()).filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit())).collect();
    if starts.is_empty() {
        return;
    }
    let s = *pick(rng, &starts);
    let mut e = s;
    while e < b.len() && b[e].is_ascii_digit() {
        e += 1;
    }
    let s = if s > 0 && b[s - 1] == b'-' { s - 1 } else { s };
    b.splice(s..e, pick(rng, NUMBERS).bytes());
}

/// One structural mutation of a JSON value: a random node is replaced (by an interesting number,
/// a long or odd string, a wrong type, deep nesting), deleted, or duplicated.
fn mutate_json(rng: &mut Rng, v: &mut Value) {
    // Walk down a random path (recursively), then act on the node reached.
    if rng.next_u64() % 3 != 0 {
        match v {
            Value::Object(m) if !m.is_empty() => {
                let key = m.keys().nth(below(rng, m.len())).unwrap().clone();
                if rng.next_u64() % 8 == 0 {
                    m.shift_remove(&key);
                } else {
                    mutate_json(rng, m.get_mut(&key).unwrap());
                }
                return;
            }
            Value::Array(a) if !a.is_empty() => {
                let i = below(rng, a.len());
                if rng.next_u64() % 8 == 0 {
                    let dup = a[i].clone();
                    a.extend(std::iter::repeat_n(dup, 1 + below(rng, 64)));
                } else {
                    mutate_json(rng, &mut a[i]);
                }
                return;
            }
            _ => {}
        }
    }
    let node = v;
    *node = match rng.next_u64() % 10 {
        0 => json!(*pick(rng, &[0i64, -1, 1 << 31, i64::MAX, i64::MIN, 5_000_000])),
        1 => json!(*pick(rng, &[u64::MAX, 1 << 63, 1 << 32])),
        2 => json!(*pick(rng, &[1e308, -1e-300, 0.5, -0.0])),
        3 => json!(pick(rng, INSERTS).repeat(1 + below(rng, 3000))),
        4 => Value::Null,
        5 => json!([node.clone(), node.clone()]),
        6 => json!({"k": node.clone()}),
        7 => {
            let mut d = node.clone();
            for _ in 0..below(rng, 200) {
                d = json!([d]);
            }
            d
        }
        8 => json!(true),
        _ => json!("\u{0}\u{e9}\u{10FFFF}"),
    };
}

/// The default mutator: a random seed, then 1-4 byte mutations.
fn mutate_any(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = pick(rng, seeds).clone();
    let other = pick(rng, seeds).clone();
    for _ in 0..1 + below(rng, 4) {
        mutate_bytes(rng, &mut b, &other);
    }
    b
}

/// For JSON inputs: half the time structural mutations of the parsed value, else byte ones.
fn mutate_json_text(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let seed = pick(rng, seeds);
    if rng.next_u64() % 2 == 0 {
        if let Ok(mut v) = serde_json::from_slice::<Value>(seed) {
            for _ in 0..1 + below(rng, 3) {
                mutate_json(rng, &mut v);
            }
            return serde_json::to_vec(&v).unwrap();
        }
    }
    mutate_any(rng, seeds)
}

// ---------------------------------------------------------------- (a) JSONL records

fn jsonl_seeds() -> Vec<Vec<u8>> {
    let rollout = json!({"id": "p1", "prompt": "Hi", "sample": 0, "seed": 42, "prompt_ids": [1, 2, 3],
        "completion_ids": [4, 5], "reasoning": "think", "response": "ok", "completion": "<think>think</think>ok",
        "finish": "eos", "model": "abc", "sampling": {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_new_tokens": 64},
        "user_field": {"x": [1, 2]}});
    let pair = json!({"id": "p1-0", "prompt": "Hi", "kind": "intervene", "context_ids": [1, 2], "chosen_ids": [3],
        "rejected_ids": [4, 5], "cue": {"sentence": 1, "text": "Sure", "token": 7}, "trigger": "t", "round": 1,
        "ref_chosen_logp": -1.5, "ref_rejected_logp": -2.25});
    let score = json!({"id": 7, "context_ids": [1], "target_ids": [2, 3], "context": "a", "target": "b"});
    let error = json!({"id": "p2", "prompt": "x", "sample": 1, "seed": 0, "prompt_ids": [], "finish": "error", "error": "boom"});
    let line = |v: &Value| serde_json::to_vec(v).unwrap();
    let mut multi = line(&rollout);
    multi.push(b'\n');
    multi.extend(line(&error));
    multi.extend(b"\n\n");
    vec![line(&rollout), line(&pair), line(&score), line(&error), multi]
}

/// A mutated file of 1-3 lines, each mutated structurally or as bytes.
fn mutate_jsonl(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..1 + below(rng, 3) {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend(mutate_json_text(rng, seeds));
    }
    out
}

#[test]
fn fuzz_jsonl_records() {
    use ipo::io::{jsonl, records};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.jsonl");
    let exec = |input: &[u8]| {
        std::fs::write(&path, input).unwrap();
        let Ok(lines) = jsonl::read_objects(&path) else { return false };
        let mut typed = false;
        for l in &lines {
            typed |= l.parse::<records::Rollout>(&path).is_ok();
            typed |= l.parse::<records::Pair>(&path).is_ok();
            typed |= l.parse::<records::ScoreInput>(&path).is_ok();
            typed |= l.parse::<records::Cue>(&path).is_ok();
        }
        if let Ok(rs) = jsonl::read::<records::Rollout>(&path) {
            // Round trip through the writer's serialization.
            for r in &rs {
                let _ = serde_json::to_string(r).unwrap();
            }
        }
        typed
    };
    fuzz("jsonl", &jsonl_seeds(), &[], &mutate_jsonl, &exec);
}

// ---------------------------------------------------------------- (b) safetensors header

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// A safetensors file: the header JSON is mutated structurally (then re-prefixed with its length,
/// or not), or the first bytes of the file are mutated as bytes; the tensor data stays.
fn mutate_safetensors(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let file = pick(rng, seeds);
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let (header, data) = (&file[8..8 + n], &file[8 + n..]);
    let mut out;
    if rng.next_u64() % 3 != 0 {
        let mut v: Value = serde_json::from_slice(header).unwrap();
        for _ in 0..1 + below(rng, 3) {
            mutate_json(rng, &mut v);
        }
        let mut h = serde_json::to_vec(&v).unwrap();
        if rng.next_u64() % 4 == 0 {
            let mut hb = h.clone();
            mutate_bytes(rng, &mut hb, header);
            h = hb;
        }
        out = Vec::with_capacity(8 + h.len() + data.len());
        let len = if rng.next_u64() % 8 == 0 { *pick(rng, WORDS) } else { h.len() as u64 };
        out.extend(len.to_le_bytes());
        out.extend(&h);
        out.extend(data);
    } else {
        let cut = (8 + n + 64).min(file.len());
        let mut head = file[..cut].to_vec();
        for _ in 0..1 + below(rng, 4) {
            mutate_bytes(rng, &mut head, header);
        }
        out = head;
        out.extend(&file[cut..]);
    }
    if rng.next_u64() % 10 == 0 {
        out.truncate(below(rng, out.len() + 1));
    }
    out
}

#[test]
fn fuzz_safetensors_header() {
    use ipo::model::load;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("tiny/llama/config.json"), dir.path().join("config.json")).unwrap();
    let cfg = load::load_config(dir.path()).unwrap();
    let seeds = vec![std::fs::read(fixture("tiny/llama/model.safetensors")).unwrap()];
    let st = dir.path().join("model.safetensors");
    let exec = |input: &[u8]| {
        std::fs::write(&st, input).unwrap();
        load::load_weights(dir.path(), &cfg).is_ok()
    };
    fuzz("safetensors", &seeds, &[], &mutate_safetensors, &exec);
}

// ---------------------------------------------------------------- (c) config.json

#[test]
fn fuzz_config_json() {
    use ipo::model::load;
    let dir = tempfile::tempdir().unwrap();
    // Valid weights beside the mutated config: a config that loads is then checked against them
    // (a huge num_hidden_layers must be refused before per-layer allocation).
    std::fs::copy(fixture("tiny/llama/model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let seeds: Vec<Vec<u8>> = ["tiny/llama/config.json", "tiny/qwen2/config.json", "tiny/qwen3/config.json"]
        .iter()
        .map(|p| std::fs::read(fixture(p)).unwrap())
        .collect();
    let regressions = vec![
        // issue 16 item 2: 5,000,000 layers, and head_dim near 2^63.
        String::from_utf8(seeds[0].clone()).unwrap().replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 5000000").into_bytes(),
        String::from_utf8(seeds[0].clone()).unwrap().replace("\"head_dim\": 16", "\"head_dim\": 9223372036854775807").into_bytes(),
    ];
    let cfg_path = dir.path().join("config.json");
    let exec = |input: &[u8]| {
        std::fs::write(&cfg_path, input).unwrap();
        match load::load_config(dir.path()) {
            Ok(cfg) => load::load_weights(dir.path(), &cfg).is_ok(),
            Err(_) => false,
        }
    };
    fuzz("config", &seeds, &regressions, &mutate_json_text, &exec);
}

// ---------------------------------------------------------------- (d) GGUF

/// Bytes of a GGUF v3 file under construction, remembering where each integer field is (the
/// counts, lengths, dims, types and offsets) so mutations can aim at them.
#[derive(Default)]
struct GgufWriter {
    out: Vec<u8>,
    /// (offset, width in bytes) of every integer field.
    ints: Vec<(usize, usize)>,
}

impl GgufWriter {
    fn u32(&mut self, x: u32) {
        self.ints.push((self.out.len(), 4));
        self.out.extend(x.to_le_bytes());
    }
    fn u64(&mut self, x: u64) {
        self.ints.push((self.out.len(), 8));
        self.out.extend(x.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.out.extend(s.as_bytes());
    }
}

enum Kv {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// A tiny complete llama GGUF (1 layer, hidden 8, 2 heads / 1 KV head, FFN 16, byte-level BPE
/// vocabulary of 98 tokens, f32 tensors), and the offsets of its integer fields.
fn tiny_gguf() -> (Vec<u8>, Vec<(usize, usize)>) {
    let (hidden, ffn, n_head, n_kv, hd) = (8u64, 16u64, 2u64, 1u64, 4u64);
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    tokens.extend((b'!'..=b'~').map(|c| (c as char).to_string()));
    tokens.push("Ġ".into());
    let vocab = tokens.len() as u64;
    let mut types = vec![1i32; tokens.len()];
    types[..3].fill(3);
    let mut tensors: Vec<(String, Vec<u64>)> = vec![("token_embd.weight".into(), vec![hidden, vocab])];
    for (name, dims) in [
        ("attn_norm", vec![hidden]),
        ("attn_q", vec![hidden, n_head * hd]),
        ("attn_k", vec![hidden, n_kv * hd]),
        ("attn_v", vec![hidden, n_kv * hd]),
        ("attn_output", vec![n_head * hd, hidden]),
        ("ffn_norm", vec![hidden]),
        ("ffn_gate", vec![hidden, ffn]),
        ("ffn_up", vec![hidden, ffn]),
        ("ffn_down", vec![ffn, hidden]),
    ] {
        tensors.push((format!("blk.0.{name}.weight"), dims));
    }
    tensors.push(("output_norm.weight".into(), vec![hidden]));
    let kvs = [
        ("general.architecture", Kv::Str("llama".into())),
        ("llama.block_count", Kv::U32(1)),
        ("llama.context_length", Kv::U32(64)),
        ("llama.embedding_length", Kv::U32(hidden as u32)),
        ("llama.feed_forward_length", Kv::U32(ffn as u32)),
        ("llama.attention.head_count", Kv::U32(n_head as u32)),
        ("llama.attention.head_count_kv", Kv::U32(n_kv as u32)),
        ("llama.rope.freq_base", Kv::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Kv::F32(1e-5)),
        ("tokenizer.ggml.model", Kv::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Kv::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Kv::Strs(tokens)),
        ("tokenizer.ggml.token_type", Kv::I32s(types)),
        ("tokenizer.ggml.merges", Kv::Strs(vec!["h e".into(), "l l".into()])),
        ("tokenizer.ggml.bos_token_id", Kv::U32(1)),
        ("tokenizer.ggml.eos_token_id", Kv::U32(2)),
        ("tokenizer.chat_template", Kv::Str("{% for m in messages %}{{ m['content'] }}{% endfor %}".into())),
    ];
    let mut w = GgufWriter { out: b"GGUF".to_vec(), ints: Vec::new() };
    w.u32(3);
    w.u64(tensors.len() as u64);
    w.u64(kvs.len() as u64);
    for (k, v) in &kvs {
        w.str(k);
        match v {
            Kv::U32(x) => {
                w.u32(4);
                w.u32(*x);
            }
            Kv::F32(x) => {
                w.u32(6);
                w.out.extend(x.to_le_bytes());
            }
            Kv::Str(s) => {
                w.u32(8);
                w.str(s);
            }
            Kv::Strs(a) => {
                w.u32(9);
                w.u32(8);
                w.u64(a.len() as u64);
                for s in a {
                    w.str(s);
                }
            }
            Kv::I32s(a) => {
                w.u32(9);
                w.u32(5);
                w.u64(a.len() as u64);
                for x in a {
                    w.out.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    let sizes: Vec<u64> = tensors.iter().map(|(_, d)| d.iter().product::<u64>() * 4).collect();
    for ((name, dims), size) in tensors.iter().zip(&sizes) {
        w.str(name);
        w.u32(dims.len() as u32);
        for &d in dims {
            w.u64(d);
        }
        w.u32(0); // F32
        w.u64(offset);
        offset += size.div_ceil(32) * 32;
    }
    let mut rng = Rng(7);
    for size in &sizes {
        while !w.out.len().is_multiple_of(32) {
            w.out.push(0);
        }
        for _ in 0..size / 4 {
            w.out.extend(((rng.uniform() - 0.5) as f32).to_le_bytes());
        }
    }
    (w.out, w.ints)
}

#[test]
fn fuzz_gguf() {
    use ipo::gguf::{self, GgufFile};
    let (seed, ints) = tiny_gguf();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.gguf");
    let out = dir.path().join("out");
    // Structure-aware: most mutations overwrite one of the integer fields (counts, string
    // lengths, array lengths and types, dims, tensor types and offsets) with an extreme value.
    let mutate = |rng: &mut Rng, seeds: &[Vec<u8>]| -> Vec<u8> {
        let mut b = seeds[0].clone();
        for _ in 0..1 + below(rng, 3) {
            if rng.next_u64() % 3 != 0 {
                let &(at, width) = pick(rng, &ints);
                if at + width > b.len() {
                    continue; // truncated by an earlier mutation
                }
                let w = match rng.next_u64() % 3 {
                    0 => *pick(rng, WORDS),
                    1 => rng.next_u64() % 64,
                    _ => {
                        let old = if width == 4 { u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64 } else { u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) };
                        old.wrapping_add(*pick(rng, &[1u64, u64::MAX, 32, 1 << 20]))
                    }
                };
                b[at..at + width].copy_from_slice(&w.to_le_bytes()[..width]);
            } else {
                mutate_bytes(rng, &mut b, &seeds[0]);
            }
        }
        b
    };
    let exec = |input: &[u8]| {
        std::fs::write(&path, input).unwrap();
        let Ok(g) = GgufFile::open(&path) else { return false };
        for t in &g.tensors {
            let _ = g.tensor_f32(t);
        }
        gguf::import_gguf(&path, &out, true, |_, _, _| {}).is_ok()
    };
    // The seed must import, or the fuzzer would only test the error paths.
    gguf::import_gguf(&{
        std::fs::write(&path, &seed).unwrap();
        path.clone()
    }, &out, true, |_, _, _| {})
    .unwrap();
    fuzz("gguf", &[seed], &[], &mutate, &exec);
}

// ---------------------------------------------------------------- (e) PTX parser

const HAND_PTX: &str = r#"
.version 8.0
.target sm_80
.address_size 64
.visible .entry k(.param .u64 out, .param .u32 off)
{
    .reg .pred %p<3>;
    .reg .b32 %r<10>;
    .reg .b64 %rd<4>;
    .shared .align 4 .b8 buf[128];
    ld.param.u64 %rd1, [out];
    ld.param.u32 %r9, [off];
    mov.u32 %r1, %tid.x;
    and.b32 %r2, %r1, 3;
    setp.eq.s32 %p1, %r2, 0;
    @%p1 bra $L_a;
    activemask.b32 %r3;
    bra.uni $L_join;
$L_a:
    activemask.b32 %r3;
$L_join:
    mul.wide.u32 %rd2, %r1, 8;
    add.s64 %rd3, %rd1, %rd2;
    st.global.v2.u32 [%rd3], {%r3, %r2};
    ret;
}
"#;

/// PTX: byte mutations, plus line-level ones (a line deleted, duplicated or moved).
fn mutate_ptx(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = pick(rng, seeds).clone();
    if rng.next_u64() % 3 == 0 {
        let text = String::from_utf8_lossy(&b).into_owned();
        let mut lines: Vec<&str> = text.lines().collect();
        let i = below(rng, lines.len());
        let j = below(rng, lines.len());
        match rng.next_u64() % 3 {
            0 => {
                lines.remove(i);
            }
            1 => lines.insert(j, lines[i]),
            _ => lines.swap(i, j),
        }
        b = lines.join("\n").into_bytes();
    }
    let other = pick(rng, seeds).clone();
    for _ in 0..1 + below(rng, 3) {
        mutate_bytes(rng, &mut b, &other);
    }
    b
}

#[test]
fn fuzz_ptx_parser() {
    let mut seeds = vec![HAND_PTX.as_bytes().to_vec()];
    for k in ["softmax", "reduce"] {
        // NVRTC output of ptxsim/tests/kernels/<k>.cu (compute_80), kept as a fixture.
        seeds.push(std::fs::read(fixture(&format!("fuzz/{k}.ptx"))).unwrap());
    }
    for s in &seeds {
        ptxsim::Module::parse(std::str::from_utf8(s).unwrap()).unwrap();
    }
    let regressions = vec![
        // Found by this fuzzer: a register count of 2^32-1 filled the symbol table (11 GB).
        HAND_PTX.replace("%r<10>", "%r<4294967295>").into_bytes(),
        // Found by this fuzzer: instructions without their operands indexed an empty list.
        HAND_PTX.replace("activemask.b32 %r3;", "activemask.b32;").into_bytes(),
        HAND_PTX.replace("activemask.b32 %r3;", "atom.global.add.u32;").into_bytes(),
    ];
    let exec = |input: &[u8]| {
        ptxsim::Module::parse(&String::from_utf8_lossy(input)).is_ok()
    };
    fuzz("ptx", &seeds, &regressions, &mutate_ptx, &exec);
}

// ---------------------------------------------------------------- (f) chat templates

const SEP: &[u8] = b"\n#MESSAGES#\n";

fn chat_input(template: &str, messages: &Value) -> Vec<u8> {
    let mut b = template.as_bytes().to_vec();
    b.extend(SEP);
    b.extend(serde_json::to_vec(messages).unwrap());
    b
}

/// Template or messages, mutated: the template as bytes, the messages structurally.
fn mutate_chat(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let seed = pick(rng, seeds);
    let at = seed.windows(SEP.len()).position(|w| w == SEP).unwrap_or(seed.len());
    let (mut t, mut m) = (seed[..at].to_vec(), seed[(at + SEP.len()).min(seed.len())..].to_vec());
    if rng.next_u64() % 3 == 0 {
        m = mutate_json_text(rng, &[m]);
    } else {
        let other = pick(rng, seeds).clone();
        for _ in 0..1 + below(rng, 4) {
            mutate_bytes(rng, &mut t, &other);
        }
    }
    t.extend(SEP);
    t.extend(m);
    t
}

#[test]
fn fuzz_chat_template() {
    use ipo::model::chat::ChatTemplate;
    let mut seeds = Vec::new();
    for f in ["qwen3.json", "smollm2.json"] {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(fixture(&format!("chat/{f}"))).unwrap()).unwrap();
        let template = d["template"].as_str().unwrap();
        for case in d["cases"].as_array().unwrap().iter().take(4) {
            seeds.push(chat_input(template, &case["messages"]));
        }
    }
    let msgs = json!([{"role": "system", "content": "s"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "reasoning_content": "r"}]);
    seeds.push(chat_input("{% for m in messages %}{{ m.role }}: {{ m.content | tojson }}{% if loop.last %}!{% endif %}{% endfor %}", &msgs));
    let regressions = vec![
        // issue 16 item 4: nested loops (10^12 steps) and a 10^10-character output.
        chat_input("{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}x{% endfor %}{% endfor %}{% endfor %}", &msgs),
        chat_input("{{ 'x' * 10000000000 }}", &msgs),
        chat_input("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", &msgs),
    ];
    let exec = |input: &[u8]| {
        let at = input.windows(SEP.len()).position(|w| w == SEP).unwrap_or(input.len());
        let template = String::from_utf8_lossy(&input[..at]);
        let messages: Vec<Value> = match serde_json::from_slice::<Value>(&input[(at + SEP.len()).min(input.len())..]) {
            Ok(Value::Array(a)) => a,
            Ok(other) => vec![other],
            Err(_) => vec![json!({"role": "user", "content": "Hi"})],
        };
        let Ok(t) = ChatTemplate::new(&template, Some("<s>"), Some("</s>")) else { return false };
        let mut extra = Map::new();
        extra.insert("enable_thinking".into(), json!(false));
        let a = t.render(&messages, true, &Map::new()).is_ok();
        t.render(&messages, false, &extra).is_ok() || a
    };
    fuzz("chat", &seeds, &regressions, &mutate_chat, &exec);
}
