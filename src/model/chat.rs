//! Chat templates: the Jinja template of `tokenizer_config.json` (or `chat_template.jinja`),
//! rendered with minijinja configured the way transformers configures jinja2
//! (`_compile_jinja_template`: trim_blocks, lstrip_blocks, no trailing newline kept,
//! loop controls, `raise_exception`, `strftime_now`, a Python-`json.dumps` `tojson`), with
//! Python string/dict methods from minijinja-contrib's pycompat. Also the reasoning split
//! of a completion at `</think>` (DESIGN.md section 3).
//!
//! A template comes from a model folder, which may be hostile, so a render is bounded: at
//! most [`FUEL`] minijinja instructions (nested loops cannot run for hours) and at most
//! [`MAX_OUTPUT_BYTES`] of output (a template cannot print gigabytes); either limit is an error
//! that names the template and the limit.

use std::path::{Path, PathBuf};

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value as JValue};
use serde_json::{Map, Value};

use super::tokenizer::{read_optional_json, special_token};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: {msg}")]
    Load { path: PathBuf, msg: String },
    /// The template does not parse.
    #[error("chat template syntax error in {origin}: {msg}")]
    Syntax { origin: String, msg: String },
    /// Rendering failed (including the template's own `raise_exception` and the limits).
    #[error("chat template {origin}: {msg}")]
    Render { origin: String, msg: String },
}

/// Instructions one render may execute. Real templates need far less: SmolLM2's uses about
/// 23 per message and Qwen3's about 67 (measured by tests/chat_template.rs), so a
/// 1000-message conversation takes under 70k; three nested `range(10000)` loops (10^12
/// steps) stop after a fraction of a second.
pub const FUEL: u64 = 5_000_000;

/// Bytes one render may write (a prompt far beyond any context length).
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// The render output, refusing to grow past [`MAX_OUTPUT_BYTES`].
struct CappedOutput {
    buf: Vec<u8>,
    exceeded: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > MAX_OUTPUT_BYTES {
            self.exceeded = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn describe(e: &Error) -> String {
    // `Error`'s Display holds kind + detail + location; the source chain adds nothing useful.
    e.to_string()
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for errors: its file, or "(inline)".
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// A template from its source and the special-token strings it may reference
    /// (`None` leaves `bos_token` / `eos_token` undefined, as HF does when unset).
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self, ChatError> {
        Self::with_origin(source, bos_token, eos_token, "(inline)".to_string())
    }

    fn with_origin(source: &str, bos_token: Option<&str>, eos_token: Option<&str>, origin: String) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True),
        // jinja2's default keep_trailing_newline=False.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<JValue, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> Result<String, Error> {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            strftime_utc(&fmt, secs)
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ChatError::Syntax { origin: origin.clone(), msg: describe(&e) })?;
        Ok(Self { env, origin, bos_token: bos_token.map(str::to_string), eos_token: eos_token.map(str::to_string) })
    }

    /// The template of a model folder: `chat_template.jinja` if present (what recent
    /// transformers versions save), else `tokenizer_config.json` `chat_template` (a string, or a list of
    /// `{"name", "template"}` from which "default" is taken). Special tokens come from
    /// `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ChatError> {
        let tcfg_path = dir.join("tokenizer_config.json");
        let tcfg = read_optional_json(&tcfg_path)
            .map_err(|e| ChatError::Load { path: tcfg_path.clone(), msg: e.to_string() })?
            .unwrap_or(Value::Null);
        let jinja_path = dir.join("chat_template.jinja");
        let (source, origin) = if jinja_path.exists() {
            let s = std::fs::read_to_string(&jinja_path)
                .map_err(|e| ChatError::Load { path: jinja_path.clone(), msg: e.to_string() })?;
            (s, jinja_path.display().to_string())
        } else {
            let err = |msg: &str| ChatError::Load { path: tcfg_path.clone(), msg: msg.to_string() };
            let source = match tcfg.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| err("chat_template is a list without a \"default\" entry"))?
                    .to_string(),
                _ => return Err(err("no chat_template (and no chat_template.jinja beside it)")),
            };
            (source, format!("{} (chat_template)", tcfg_path.display()))
        };
        let (bos, eos) = (special_token(&tcfg, "bos_token"), special_token(&tcfg, "eos_token"));
        Self::with_origin(&source, bos.as_deref(), eos.as_deref(), origin)
    }

    /// Renders `messages` (`[{"role", "content", ...}]`) as transformers'
    /// `apply_chat_template(tokenize=False)` does. `extra` holds further template variables
    /// (e.g. `enable_thinking`); they override the special tokens, as in HF.
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        extra: &Map<String, Value>,
    ) -> Result<String, ChatError> {
        self.render_counted(messages, add_generation_prompt, extra).map(|(text, _)| text)
    }

    /// [`render`](Self::render), also returning the fuel (template instructions) it used: how
    /// tests measure real templates against [`FUEL`].
    pub fn render_counted(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        extra: &Map<String, Value>,
    ) -> Result<(String, u64), ChatError> {
        let mut ctx = Map::new();
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token".into(), Value::String(b.clone()));
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token".into(), Value::String(e.clone()));
        }
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Value::Array(messages.iter().map(alias_reasoning).collect()));
        ctx.insert("tools".into(), Value::Null);
        ctx.insert("documents".into(), Value::Null);
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        let err = |msg: String| ChatError::Render { origin: self.origin.clone(), msg };
        let tmpl = self.env.get_template(NAME).map_err(|e| err(describe(&e)))?;
        let mut out = CappedOutput { buf: Vec::new(), exceeded: false };
        let fuel = match tmpl.render_captured_to(JValue::from_serialize(&ctx), &mut out) {
            Ok(captured) => captured.state().fuel_levels().map_or(0, |(used, _)| used),
            Err(_) if out.exceeded => {
                return Err(err(format!("output exceeds the limit of {MAX_OUTPUT_BYTES} bytes")))
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(err(format!("rendering exceeds the limit of {FUEL} template instructions (fuel)")))
            }
            Err(e) => return Err(err(describe(&e))),
        };
        let text = String::from_utf8(out.buf).map_err(|e| err(format!("output is not UTF-8: {e}")))?;
        Ok((text, fuel))
    }
}

/// transformers' `_alias_reasoning_fields`: a message's reasoning given as `reasoning_content`,
/// `thinking` or `reasoning` is visible to the template as both `thinking` and `reasoning_content`.
fn alias_reasoning(m: &Value) -> Value {
    let Value::Object(obj) = m else { return m.clone() };
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| obj.get(*k).filter(|v| !v.is_null()))
        .cloned();
    match reasoning {
        None => m.clone(),
        Some(r) => {
            // {"thinking": r, **message, "reasoning_content": r}
            let mut out = Map::new();
            out.insert("thinking".into(), r.clone());
            for (k, v) in obj {
                out.insert(k.clone(), v.clone());
            }
            out.insert("reasoning_content".into(), r);
            Value::Object(out)
        }
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)` -- no HTML escaping, Python's `", "` / `": "` separators.
fn tojson(value: JValue, kwargs: Kwargs) -> Result<JValue, Error> {
    let indent: Option<JValue> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(usize::try_from(v).map_err(|_| {
                Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an int or a string")
            })?)),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        // Python: (', ', ': ') without indent, (',', ': ') with it.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let opts = PyJson {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    opts.write(&json, 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, v: &Value, level: usize, out: &mut String) {
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::String(s) => self.string(s, out),
            Value::Array(a) if a.is_empty() => out.push_str("[]"),
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(x, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            Value::Object(o) if o.is_empty() => out.push_str("{}"),
            Value::Object(o) => {
                let mut items: Vec<(&String, &Value)> = o.iter().collect();
                if self.sort_keys {
                    items.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in items.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key_sep);
                    self.write(x, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `datetime.now().strftime(fmt)` for the common codes, in UTC (templates use it for
/// "Today Date: 26 Jul 2024"). Unknown codes are an error rather than a silent difference.
fn strftime_utc(fmt: &str, unix_secs: i64) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
        "November", "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86400);
    let secs = unix_secs.rem_euclid(86400);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (Monday = 0)
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let code = chars.next().unwrap_or('%');
        let h12 = if hour % 12 == 0 { 12 } else { hour % 12 };
        match code {
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&format!("{:02}", year % 100)),
            'm' => out.push_str(&format!("{month:02}")),
            'd' => out.push_str(&format!("{day:02}")),
            'e' => out.push_str(&format!("{day:>2}")),
            'B' => out.push_str(MONTHS[(month - 1) as usize]),
            'b' | 'h' => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            'A' => out.push_str(DAYS[weekday]),
            'a' => out.push_str(&DAYS[weekday][..3]),
            'j' => out.push_str(&format!("{yday:03}")),
            'H' => out.push_str(&format!("{hour:02}")),
            'I' => out.push_str(&format!("{h12:02}")),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'M' => out.push_str(&format!("{minute:02}")),
            'S' => out.push_str(&format!("{second:02}")),
            '%' => out.push('%'),
            other => {
                return Err(Error::new(ErrorKind::InvalidOperation, format!("strftime_now: unsupported code %{other}")))
            }
        }
    }
    Ok(out)
}

/// Splits a completion into (reasoning, response) at the first `</think>`: the reasoning is
/// the text before it (without a leading `<think>` tag, if the model wrote one), the response
/// the text after it. Without `</think>` the whole completion is reasoning and the response is
/// empty (DESIGN.md section 3): an unfinished or tag-less completion never counts as an answer.
/// Both are sub-slices of `completion`, unmodified otherwise (whitespace kept), so their byte
/// offsets into the completion can be recovered.
pub fn split_reasoning(completion: &str) -> (&str, &str) {
    let (reasoning, response) = match completion.find("</think>") {
        Some(i) => (&completion[..i], &completion[i + "</think>".len()..]),
        None => (completion, ""),
    };
    let trimmed = reasoning.trim_start();
    let reasoning = trimmed.strip_prefix("<think>").unwrap_or(reasoning);
    (reasoning, response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        // 2024-07-26 13:05:09 UTC = 1722000309 (a Friday, day 208 of a leap year).
        let s = strftime_utc("%d %b %Y|%B %A %a|%H:%M:%S %I%p|%j|%y-%m-%e|%%", 1722000309).unwrap();
        assert_eq!(s, "26 Jul 2024|July Friday Fri|13:25:09 01PM|208|24-07-26|%");
        // 2000-02-29 00:00:00 UTC = 951782400 (Tuesday).
        assert_eq!(strftime_utc("%Y-%m-%d %A %j", 951782400).unwrap(), "2000-02-29 Tuesday 060");
        assert!(strftime_utc("%Q", 0).is_err());
    }
}
