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
