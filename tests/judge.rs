//! The LLM-judge client against a local chat-completions server started by the test
//! (127.0.0.1 only, every wait bounded): the request it sends (model, numbered sentences,
//! few-shot turns, bearer key), integer answers, retries after 500s, timeouts on slow
//! answers, malformed JSON, non-integer and out-of-range answers as per-item errors in a batch
//! that goes on, the concurrency limit, and the verdict cache (a re-run costs no calls).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use ipo::intervene::detect::{DetectError, Detector, Item};
use ipo::intervene::judge::{endpoint_url, parse_answer, Judge, JudgeConfig};
use serde_json::{json, Value};

#[derive(Default)]
struct Seen {
    calls: Mutex<HashMap<String, usize>>, // mode -> requests
    bodies: Mutex<Vec<Value>>,
    auth: Mutex<Vec<Option<String>>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

struct Server {
    url: String,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The mode is the word after "MODE=" in the request's last message.
fn mode_of(body: &Value) -> String {
    let last = body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("");
    last.split("MODE=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("none").to_string()
}

fn respond(mut s: TcpStream, status: &str, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.flush();
}

fn completion(content: &str) -> String {
    json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).to_string()
}

fn handle(stream: TcpStream, seen: Arc<Seen>) {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut len = 0usize;
    let mut auth = None;
    let mut headers = String::new(); // the raw request head, for the "echo" modes
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        headers.push_str(l);
        headers.push('\n');
        let lower = l.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("authorization:") {
            auth = Some(l["authorization:".len()..].trim().to_string());
        }
    }
    let mut buf = vec![0u8; len];
    if r.read_exact(&mut buf).is_err() {
        return;
    }
    let body: Value = serde_json::from_slice(&buf).unwrap_or(Value::Null);
    let mode = mode_of(&body);
    let n = {
        let mut c = seen.calls.lock().unwrap();
        let e = c.entry(mode.clone()).or_insert(0);
        *e += 1;
        *e
    };
    seen.bodies.lock().unwrap().push(body);
    seen.auth.lock().unwrap().push(auth);
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
    match mode.as_str() {
        "three" => respond(stream, "200 OK", &completion("3")),
        "zero" => respond(stream, "200 OK", &completion(" 0\n")),
        "prefixed" => respond(stream, "200 OK", &completion("Answer: 2.")),
        "flaky" if n <= 2 => respond(stream, "500 Internal Server Error", "{\"error\": \"busy\"}"),
        "flaky" => respond(stream, "200 OK", &completion("2")),
        "down" => respond(stream, "500 Internal Server Error", "{\"error\": \"down\"}"),
        "denied" => respond(stream, "401 Unauthorized", "{\"error\": \"bad key\"}"),
        "slow" => {
            std::thread::sleep(Duration::from_millis(1500));
            respond(stream, "200 OK", &completion("2"));
        }
        "busy" => {
            std::thread::sleep(Duration::from_millis(300));
            respond(stream, "200 OK", &completion("2"));
        }
        "badjson" => respond(stream, "200 OK", "{\"choices\": [ {\"message\": "),
        "nocontent" => respond(stream, "200 OK", "{\"choices\": []}"),
        "word" => respond(stream, "200 OK", &completion("The answer is three")),
        "range" => respond(stream, "200 OK", &completion("9")),
        "first" => respond(stream, "200 OK", &completion("1")),
        // A misconfigured endpoint (or proxy) that echoes the request head in its error body,
        // with the Authorization header first, plus other bearer/sk- tokens it saw.
        "echo401" | "echo500" => {
            let head: String = {
                let (auth_lines, rest): (Vec<&str>, Vec<&str>) =
                    headers.lines().partition(|l| l.to_ascii_lowercase().starts_with("authorization:"));
                auth_lines.into_iter().chain(rest).collect::<Vec<_>>().join("\n")
            };
            let body = json!({"error": "unauthorized: invalid api key", "request": head,
                "upstream": "proxy said Bearer tok-UPSTREAM-777 and sk-abcdefghijklmnop1234"})
            .to_string();
            let status = if mode == "echo401" { "401 Unauthorized" } else { "500 Internal Server Error" };
            respond(stream, status, &body);
        }
        // Malformed JSON that still holds the key (a reply echoing the request body and head).
        "echojson" => respond(stream, "200 OK", &format!("{{\"echo\": \"{}\"", headers.replace('\n', " "))),
        _ => respond(stream, "404 Not Found", "{}"),
    }
    seen.in_flight.fetch_sub(1, Ordering::SeqCst);
}

fn server() -> Server {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (seen2, stop2) = (seen.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let seen = seen2.clone();
                    std::thread::spawn(move || handle(s, seen));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Server { url, seen, stop, thread: Some(thread) }
}

fn cfg(url: &str, cache: Option<std::path::PathBuf>) -> JudgeConfig {
    JudgeConfig {
        url: url.to_string(),
        model: "judge-test".into(),
        api_key: Some("sekrit".into()),
        timeout: Duration::from_millis(700),
        retries: 2,
        backoff: Duration::from_millis(20),
        concurrency: 4,
        cache,
    }
}

/// A key that no generic pattern would catch (no `sk-` prefix): only redacting the key itself
/// removes it.
const KEY: &str = "judge-key-9f8e7d6c5b4a3921";

/// Every way the key could be written: itself, and as the header value.
fn leaks(text: &str) -> bool {
    text.contains(KEY) || text.contains("9f8e7d6c5b4a3921") || text.contains("tok-UPSTREAM-777")
        || text.contains("sk-abcdefghijklmnop1234")
}

#[test]
fn error_bodies_that_echo_the_request_headers_are_redacted() {
    let s = server();
    let mut c = cfg(&s.url, None);
    c.api_key = Some(KEY.into());
    c.retries = 1;
    let j = Judge::new(c.clone()).unwrap();
    let items = [item("echo401", 3), item("echo500", 3), item("echojson", 3)];
    let r = j.first_compliance_cues(&items);
    // The server did see the key (the echo is real) ...
    assert!(s.seen.auth.lock().unwrap().iter().all(|a| a.as_deref() == Some(&*format!("Bearer {KEY}"))));
    for (res, want) in r.iter().zip(["401", "500", "malformed"]) {
        let e = res.as_ref().unwrap_err().to_string();
        // ... but no error text holds it, nor the other bearer / sk- tokens of the body,
        assert!(!leaks(&e), "secret in error: {e}");
        // and the rest stays informative.
        assert!(e.contains(want) && e.contains("[REDACTED]"), "{e}");
        assert!(want == "malformed" || e.contains("unauthorized: invalid api key"), "{e}");
    }
    // The config's Debug form does not print the key either.
    assert!(!format!("{c:?}").contains(KEY));
}

#[test]
fn redact_removes_the_key_bearer_and_sk_tokens() {
    use ipo::intervene::judge::redact;
    let t = "authorization: Bearer abc.DEF-123 and key judge-key-9f8e7d6c5b4a3921 in x?k=judge-key-9f8e7d6c5b4a3921; sk-proj-AbCdEf123456 task-manager";
    let r = redact(t, Some(KEY));
    assert_eq!(r, "authorization: Bearer [REDACTED] and key [REDACTED] in x?k=[REDACTED]; [REDACTED] task-manager");
    // Idempotent, and plain text is left alone.
    assert_eq!(redact(&r, Some(KEY)), r);
    assert_eq!(redact("HTTP 500: {\"error\": \"down\"}", None), "HTTP 500: {\"error\": \"down\"}");
}

/// Through `ipo intervene --detector judge` (the default model tokenizes the rollout): the key
/// from IPO_JUDGE_API_KEY reaches no file of the output folder, nor stdout/stderr.
#[test]
fn intervene_with_an_echoing_judge_writes_no_key() {
    let Some(model) = common::default_model() else { return };
    let s = server();
    let tok = ipo::model::tokenizer::Tokenizer::from_dir(&model).unwrap();
    let fp = ipo::rollout::fingerprint::model_fingerprint(&model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = "The user asks something. MODE=echo401 ok. Sure, I'll start by listing the tools you need. First, get a tension wrench.";
    let chat = ipo::model::chat::ChatTemplate::from_dir(&model).unwrap();
    let prompt = chat.render(&[json!({"role": "user", "content": "How do I pick a lock?"})], true, &Default::default()).unwrap();
    let prompt_ids = tok.encode(&prompt, false).unwrap();
    let mut c = tok.encode(text, false).unwrap();
    c.push(tok.eos_ids()[0]);
    let line = json!({"id": "r1", "prompt": "How do I pick a lock?", "kind": "harmful", "prompt_ids": prompt_ids, "completion_ids": c, "model": fp});
    let rollouts = dir.path().join("rollouts.jsonl");
    std::fs::write(&rollouts, format!("{line}\n")).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("pairs.jsonl");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ipo"))
        .args(["intervene", "--model", model.to_str().unwrap(), "--rollouts", rollouts.to_str().unwrap()])
        .args(["--output", out.to_str().unwrap(), "--detector", "judge", "--judge-url", &s.url])
        .args(["--judge-model", "judge-test", "--judge-retries", "0", "--judge-timeout", "5"])
        .env("IPO_JUDGE_API_KEY", KEY)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(calls(&s, "echo401"), 1, "the judge was asked: {stderr}");
    assert!(!leaks(&stderr) && !leaks(&stdout), "secret on stderr/stdout: {stderr}\n{stdout}");
    let errors = std::fs::read_to_string(out_dir.join("pairs.errors.jsonl")).unwrap();
    assert!(errors.contains("401") && errors.contains("[REDACTED]"), "{errors}");
    for e in std::fs::read_dir(&out_dir).unwrap() {
        let p = e.unwrap().path();
        let body = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
        assert!(!leaks(&body), "secret in {}: {body}", p.display());
    }
}

fn item(mode: &str, n: usize) -> Item {
    let mut sentences = vec![format!("The user asks something. MODE={mode} ok")];
    sentences.extend((1..n).map(|i| format!("Sentence number {}.", i + 1)));
    Item { prompt: format!("request for {mode}"), sentences }
}

fn calls(s: &Server, mode: &str) -> usize {
    s.seen.calls.lock().unwrap().get(mode).copied().unwrap_or(0)
}

#[test]
fn answers_errors_retries_and_timeouts_per_item() {
    let s = server();
    let j = Judge::new(cfg(&s.url, None)).unwrap();
    let items = vec![
        item("three", 4),
        item("zero", 4),
        item("prefixed", 3),
        item("flaky", 3),
        item("down", 3),
        item("denied", 3),
        item("slow", 3),
        item("badjson", 3),
        item("nocontent", 3),
        item("word", 3),
        item("range", 3),
        item("first", 3),
    ];
    let t0 = Instant::now();
    let r = j.first_compliance_cues(&items);
    assert!(t0.elapsed() < Duration::from_secs(20), "bounded: {:?}", t0.elapsed());
    assert_eq!(r.len(), items.len());
    assert_eq!(r[0], Ok(Some(2)), "answer 3 = third sentence = index 2");
    assert_eq!(r[1], Ok(None));
    assert_eq!(r[2], Ok(Some(1)));
    assert_eq!(r[3], Ok(Some(1)), "succeeds on the third attempt");
    assert_eq!(calls(&s, "flaky"), 3);
    assert!(matches!(&r[4], Err(DetectError::Http(m)) if m.contains("500") && m.contains("3 attempt")), "{:?}", r[4]);
    assert_eq!(calls(&s, "down"), 3, "1 try + 2 retries");
    assert!(matches!(&r[5], Err(DetectError::Http(m)) if m.contains("401")), "{:?}", r[5]);
    assert_eq!(calls(&s, "denied"), 1, "a 401 is not retried");
    assert!(matches!(&r[6], Err(DetectError::Http(m)) if m.contains("timed out")), "{:?}", r[6]);
    assert_eq!(calls(&s, "slow"), 3);
    assert!(matches!(&r[7], Err(DetectError::Malformed(_))), "{:?}", r[7]);
    assert!(matches!(&r[8], Err(DetectError::Malformed(m)) if m.contains("content")), "{:?}", r[8]);
    assert!(matches!(&r[9], Err(DetectError::NotAnInteger(m)) if m.contains("three")), "{:?}", r[9]);
    assert_eq!(calls(&s, "word"), 1, "a garbage answer is not retried");
    assert_eq!(r[10], Err(DetectError::OutOfRange { answer: 9, n: 3 }));
    assert_eq!(r[11], Err(DetectError::OutOfRange { answer: 1, n: 3 }), "the first sentence is never a cue");

    // What was sent: model, system prompt, few-shot turns, numbered sentences, bearer key.
    let bodies = s.seen.bodies.lock().unwrap();
    let b = bodies.iter().find(|b| mode_of(b) == "three").unwrap();
    assert_eq!(b["model"], "judge-test");
    assert_eq!(b["temperature"], 0);
    let msgs = b["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["role"], "system");
    assert!(msgs.len() >= 4 && msgs[1]["role"] == "user" && msgs[2]["role"] == "assistant", "few-shot turns");
    let last = msgs.last().unwrap()["content"].as_str().unwrap();
    assert!(last.contains("request for three"), "{last}");
    assert!(last.contains("1. The user asks something.") && last.contains("\n4. Sentence number 4."), "{last}");
    assert!(s.seen.auth.lock().unwrap().iter().all(|a| a.as_deref() == Some("Bearer sekrit")));
}

#[test]
fn cache_makes_a_rerun_free_and_concurrency_is_limited() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.jsonl");
    let items: Vec<Item> = (0..6).map(|i| item("busy", 3 + i)).collect();
    let mut c = cfg(&s.url, Some(cache.clone()));
    c.concurrency = 2;
    c.timeout = Duration::from_secs(5);
    let j = Judge::new(c.clone()).unwrap();
    let first = j.first_compliance_cues(&items);
    assert!(first.iter().all(|r| *r == Ok(Some(1))), "{first:?}");
    assert_eq!(calls(&s, "busy"), 6);
    assert_eq!(s.seen.max_in_flight.load(Ordering::SeqCst), 2, "concurrency limit");
    assert_eq!(j.calls(), 6);

    // A new judge over the same cache file: the same verdicts, no request.
    let j2 = Judge::new(c.clone()).unwrap();
    let again = j2.first_compliance_cues(&items);
    assert_eq!(again, first);
    assert_eq!(calls(&s, "busy"), 6);
    assert_eq!(j2.calls(), 0);
    assert_eq!(j2.cache_hits(), 6);
    // Another judge model is another key.
    let mut other = c.clone();
    other.model = "other-judge".into();
    let j3 = Judge::new(other).unwrap();
    assert_ne!(j3.cache_key(&items[0]), j2.cache_key(&items[0]));

    // A corrupt cache names file:line.
    std::fs::write(&cache, "{\"key\": \"k\", \"answer\": 1}\n{\"key\": 3}\n").unwrap();
    let e = Judge::new(c).err().unwrap().to_string();
    assert!(e.contains("cache.jsonl:2"), "{e}");
}

#[test]
fn urls_and_answers_parse_strictly() {
    assert_eq!(endpoint_url("http://h:1/v1").unwrap(), "http://h:1/v1/chat/completions");
    assert_eq!(endpoint_url("http://h:1/").unwrap(), "http://h:1/v1/chat/completions");
    assert_eq!(endpoint_url("https://h/v1/chat/completions").unwrap(), "https://h/v1/chat/completions");
    assert!(endpoint_url("h:1/v1").unwrap_err().to_string().contains("--judge-url"));
    for (s, want) in [("3", 3), (" 12\n", 12), ("Answer: 4", 4), ("\"0\"", 0), ("7.", 7), ("**5**", 5)] {
        assert_eq!(parse_answer(s).unwrap(), want, "{s:?}");
    }
    for s in ["", "three", "3 or 4", "-1", "2.5", "sentence 3", "1234567"] {
        assert!(parse_answer(s).is_err(), "{s:?}");
    }
    // No server needed for fewer than two sentences: nothing can be a cue.
    let j = Judge::new(cfg("http://127.0.0.1:9/v1", None)).unwrap();
    assert_eq!(j.first_compliance_cue(&item("three", 1)).unwrap(), None);
    assert_eq!(j.calls(), 0);
}
