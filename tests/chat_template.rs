//! Chat templates rendered by `ipo::model::chat` against transformers' own renderings
//! (tests/fixtures/chat/*.json, written by tests/reference with `apply_chat_template`):
//! every case must match byte for byte. Also the HF-specific environment pieces
//! (raise_exception, tojson, loop controls, dict order, trailing newline) and the reasoning split.

use std::path::Path;

use ipo::model::chat::{split_reasoning, ChatTemplate};
use serde_json::{json, Map, Value};

fn check_fixture(name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fx: Value = serde_json::from_str(&text).unwrap();
    let tmpl = ChatTemplate::new(
        fx["template"].as_str().unwrap(),
        fx["bos_token"].as_str(),
        fx["eos_token"].as_str(),
    )
    .unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 5, "{name}: expected a real set of cases, found {}", cases.len());
    for (i, case) in cases.iter().enumerate() {
        let messages = case["messages"].as_array().unwrap();
        let extra = case.get("extra").and_then(Value::as_object).cloned().unwrap_or_default();
        let got = tmpl
            .render(messages, case["add_generation_prompt"].as_bool().unwrap(), &extra)
            .unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
        let want = case["expected"].as_str().unwrap();
        assert_eq!(got, want, "{name} case {i} differs from transformers");
    }
}

#[test]
fn smollm2_matches_transformers() {
    check_fixture("smollm2");
}

#[test]
fn qwen3_matches_transformers() {
    check_fixture("qwen3");
}

fn render(src: &str, messages: Value, extra: Value) -> Result<String, String> {
    let t = ChatTemplate::new(src, Some("<s>"), Some("</s>")).map_err(|e| e.to_string())?;
    let extra: Map<String, Value> = extra.as_object().cloned().unwrap_or_default();
    t.render(messages.as_array().unwrap(), true, &extra).map_err(|e| e.to_string())
}

#[test]
fn raise_exception_surfaces_the_message() {
    let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
    let err = render(src, json!([{"role": "system", "content": "x"}]), json!({})).unwrap_err();
    assert!(err.contains("Conversation must start with user"), "{err}");
    assert_eq!(render(src, json!([{"role": "user", "content": "x"}]), json!({})).unwrap(), "ok");
}

#[test]
fn tojson_is_python_json_dumps_with_insertion_order() {
    // transformers: json.dumps(x, ensure_ascii=False): ", " / ": " separators, no HTML
    // escaping, keys in insertion order (not sorted).
    let src = "{{ messages[0].args | tojson }}|{{ messages[0].args | tojson(indent=2) }}";
    let msgs = json!([{"role": "user", "args": {"zeta": "<a&b>", "alpha": [1, 2.5, null, true], "é": "\"q\"\n"}}]);
    let out = render(src, msgs, json!({})).unwrap();
    let want = "{\"zeta\": \"<a&b>\", \"alpha\": [1, 2.5, null, true], \"é\": \"\\\"q\\\"\\n\"}|{\n  \"zeta\": \"<a&b>\",\n  \"alpha\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"é\": \"\\\"q\\\"\\n\"\n}";
    assert_eq!(out, want);
}

#[test]
fn dict_items_keep_insertion_order_and_pycompat_methods_work() {
    let src = "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}|{{ messages[0].content.strip().upper().split(',')[1] }}|{{ messages[0].get('missing', 'dflt') }}";
    let out = render(src, json!([{"role": "user", "content": "  a,b,c  ", "b": 1}]), json!({})).unwrap();
    assert_eq!(out, "role=user;content=  a,b,c  ;b=1;|B|dflt");
}

#[test]
fn whitespace_control_matches_jinja2_hf_settings() {
    // trim_blocks removes the newline after a block tag, lstrip_blocks the indentation before
    // it, and the single trailing newline of the template is dropped (keep_trailing_newline=False).
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
    let out = render(src, json!([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}, {"role": "user", "content": "z"}]), json!({})).unwrap();
    assert_eq!(out, "[x]\n[z]\n");
    let src2 = "a\n";
    assert_eq!(render(src2, json!([]), json!({})).unwrap(), "a");
}

#[test]
fn loop_controls_and_special_tokens_and_extra_kwargs() {
    let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}{{ m.content }}{% if loop.index == 3 %}{% break %}{% endif %}{% endfor %}{{ eos_token }}{% if enable_thinking is defined and enable_thinking is false %}!{% endif %}";
    let msgs = json!([{"role": "u", "content": "1"}, {"role": "skip", "content": "2"}, {"role": "u", "content": "3"}, {"role": "u", "content": "4"}]);
    assert_eq!(render(src, msgs.clone(), json!({})).unwrap(), "<s>13</s>");
    assert_eq!(render(src, msgs.clone(), json!({"enable_thinking": false})).unwrap(), "<s>13</s>!");
    // Extra kwargs override the special tokens, as in HF.
    assert_eq!(render(src, msgs, json!({"eos_token": "<E>"})).unwrap(), "<s>13<E>");
}

#[test]
fn reasoning_fields_are_aliased_like_transformers() {
    let src = "{% for m in messages %}{{ m.reasoning_content }}/{{ m.thinking }};{% endfor %}";
    let msgs = json!([{"role": "assistant", "content": "c", "reasoning": "r1"}, {"role": "assistant", "content": "c", "thinking": "r2"}]);
    assert_eq!(render(src, msgs, json!({})).unwrap(), "r1/r1;r2/r2;");
}

#[test]
fn strftime_now_gives_a_plausible_date() {
    let out = render("{{ strftime_now('%Y-%m-%d') }}", json!([]), json!({})).unwrap();
    let year: i32 = out[..4].parse().unwrap();
    assert!((2024..2200).contains(&year), "{out}");
    assert_eq!(out.len(), 10, "{out}");
}

#[test]
fn syntax_errors_are_reported() {
    let err = ChatTemplate::new("{% for m in messages %}", None, None).err().expect("unclosed for must fail");
    assert!(err.to_string().contains("syntax"), "{err}");
}

#[test]
fn from_dir_reads_tokenizer_config_and_named_templates() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = json!({
        "bos_token": {"content": "<B>", "lstrip": false},
        "eos_token": "<E>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}
        ]
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap();
    let out = t.render(&[json!({"role": "user", "content": "hi"})], false, &Map::new()).unwrap();
    assert_eq!(out, "<B>hi<E>");
    // chat_template.jinja beside it wins, as in transformers >= 4.50.
    std::fs::write(dir.path().join("chat_template.jinja"), "J{{ messages[0].content }}").unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap();
    assert_eq!(t.render(&[json!({"role": "user", "content": "hi"})], false, &Map::new()).unwrap(), "Jhi");
    // No template at all: the error names the file.
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("tokenizer_config.json"), "{}").unwrap();
    let err = ChatTemplate::from_dir(empty.path()).err().unwrap().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("no chat_template"), "{err}");
}

#[test]
fn reasoning_split_at_think_close() {
    let (r, a) = split_reasoning("<think>\nStep 1. Step 2.\n</think>\n\nThe answer.");
    assert_eq!((r, a), ("\nStep 1. Step 2.\n", "\n\nThe answer."));
    // R1-distill style: the prompt opened <think>, the completion only closes it.
    let (r, a) = split_reasoning("Hmm, let me see.</think>Sure.");
    assert_eq!((r, a), ("Hmm, let me see.", "Sure."));
    // Only the first </think> splits.
    let (r, a) = split_reasoning("a</think>b</think>c");
    assert_eq!((r, a), ("a", "b</think>c"));
    // No tag: all reasoning, no response (DESIGN.md section 3).
    let (r, a) = split_reasoning("I'll explain how to do it: first...");
    assert_eq!((r, a), ("I'll explain how to do it: first...", ""));
    assert_eq!(split_reasoning(""), ("", ""));
}

// ---------------------------------------------------------------- bounded rendering

mod common;

/// Renders `src` (as a model folder's chat_template.jinja) on a thread: the error, or a
/// failure if it succeeds or takes longer than `limit` (then the thread is left behind).
fn render_must_fail(src: &str, limit: std::time::Duration) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), src).unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = std::time::Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(t.render(&[json!({"role": "user", "content": "hi"})], true, &Map::new()).map_err(|e| e.to_string()));
    });
    let r = rx.recv_timeout(limit).unwrap_or_else(|_| panic!("no answer after {limit:?}: the render hangs"));
    let e = match r {
        Ok(out) => panic!("rendered {} bytes instead of refusing the template", out.len()),
        Err(e) => e,
    };
    assert!(t0.elapsed() < limit, "{:?}", t0.elapsed());
    assert!(e.contains("chat_template.jinja"), "the error names the template file: {e}");
    e
}

#[test]
fn nested_loops_run_out_of_fuel_within_a_second() {
    let src = "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}";
    let e = render_must_fail(src, std::time::Duration::from_secs(1));
    assert!(e.contains("fuel") && e.contains(&ipo::model::chat::FUEL.to_string()), "{e}");
}

#[test]
fn output_beyond_the_cap_is_an_error() {
    // 3 MB in 100-byte pieces (rendered in full before), and 10^10 bytes in 10^8-byte pieces
    // (aborted the process).
    for src in ["{% for i in range(30000) %}{{ 'y' * 100 }}{% endfor %}", "{% for i in range(100) %}{{ 'x' * 100000000 }}{% endfor %}"] {
        let e = render_must_fail(src, std::time::Duration::from_secs(10));
        assert!(e.contains("output exceeds") && e.contains(&ipo::model::chat::MAX_OUTPUT_BYTES.to_string()), "{e}");
    }
}

/// A conversation of `n` user/assistant turns after a system message.
fn long_chat(n: usize) -> Vec<Value> {
    let mut m = vec![json!({"role": "system", "content": "You are helpful."})];
    for i in 0..n {
        m.push(json!({"role": "user", "content": format!("Question {i}: what is {i} + {i}?")}));
        m.push(json!({"role": "assistant", "content": format!("<think>\nAdd them.\n</think>\n\n{}", 2 * i)}));
    }
    m
}

#[test]
fn real_templates_render_a_long_chat_well_within_the_fuel_budget() {
    use ipo::model::chat::FUEL;
    let mut templates = Vec::new();
    for name in ["smollm2", "qwen3"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat").join(format!("{name}.json"));
        let fx: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        templates.push((name.to_string(), ChatTemplate::new(fx["template"].as_str().unwrap(), fx["bos_token"].as_str(), fx["eos_token"].as_str()).unwrap()));
    }
    if let Some(dir) = common::default_model() {
        templates.push(("default model".to_string(), ChatTemplate::from_dir(&dir).unwrap()));
    }
    for (name, t) in &templates {
        // 500 turns (1001 messages, ~30 KB of prompt): at most a tenth of the budget.
        let (text, fuel) = t.render_counted(&long_chat(500), true, &Map::new()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains("Question 499") && text.len() > 20_000, "{name}");
        eprintln!("{name}: {fuel} fuel for 1001 messages ({} per message)", fuel / 1001);
        assert!(fuel > 0 && fuel * 10 < FUEL, "{name}: {fuel} of {FUEL}");
    }
}
