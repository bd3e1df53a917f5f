//! The one progress reporter of every long workflow. Workflows call a `Progress` sink; the
//! CLI passes `Reporter` (an indicatif bar on a terminal, a plain log line every few seconds
//! otherwise), library users may pass `Silent` or their own.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where a workflow reports how far it is. Calls come from the workflow's thread, in order:
/// `start`, then any number of `advance` / `status`, then `finish`; a workflow may run
/// several phases one after another.
pub trait Progress: Send + Sync {
    /// A phase of `total` units (`unit`: "samples", "tokens", "steps", ...) begins.
    fn start(&self, phase: &str, total: u64, unit: &str);
    /// `done` more units finished and `tokens` more tokens processed (for tokens/s).
    fn advance(&self, done: u64, tokens: u64);
    /// A short status shown beside the count (a loss, a margin); replaces the previous one.
    fn status(&self, _text: &str) {}
    /// The phase ended (every unit done, or the workflow stopped early).
    fn finish(&self);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64, _: &str) {}
    fn advance(&self, _: u64, _: u64) {}
    fn finish(&self) {}
}

/// A bar on a terminal (stderr), plain lines every 5 s and at the end of a phase otherwise.
pub struct Reporter {
    state: Mutex<Phase>,
    terminal: bool,
}

struct Phase {
    name: String,
    unit: String,
    total: u64,
    done: u64,
    tokens: u64,
    status: String,
    start: Instant,
    last_log: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Default for Reporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter {
    pub fn new() -> Self {
        let now = Instant::now();
        let phase = Phase {
            name: String::new(),
            unit: String::new(),
            total: 0,
            done: 0,
            tokens: 0,
            status: String::new(),
            start: now,
            last_log: now,
            bar: None,
        };
        Self { state: Mutex::new(phase), terminal: std::io::stderr().is_terminal() }
    }
}

impl Phase {
    fn message(&self) -> String {
        let rate = self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let mut m = if self.tokens > 0 { format!("{rate:.0} tokens/s") } else { String::new() };
        if !self.status.is_empty() {
            if !m.is_empty() {
                m.push_str(", ");
            }
            m.push_str(&self.status);
        }
        m
    }

    fn log_line(&self) {
        let m = self.message();
        let sep = if m.is_empty() { "" } else { ", " };
        eprintln!("{}: {}/{} {}{sep}{m}", self.name, self.done, self.total, self.unit);
    }
}

impl Progress for Reporter {
    fn start(&self, phase: &str, total: u64, unit: &str) {
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        p.name = phase.to_string();
        p.unit = unit.to_string();
        (p.total, p.done, p.tokens, p.start, p.last_log) = (total, 0, 0, now, now);
        p.status.clear();
        p.bar = self.terminal.then(|| {
            let b = indicatif::ProgressBar::new(total);
            let template = format!("{phase} {{bar:40}} {{pos}}/{{len}} {unit}, {{msg}}, ETA {{eta}}");
            b.set_style(indicatif::ProgressStyle::with_template(&template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
            b
        });
    }

    fn advance(&self, done: u64, tokens: u64) {
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        p.done += done;
        p.tokens += tokens;
        match &p.bar {
            Some(b) => {
                b.inc(done);
                b.set_message(p.message());
            }
            None if done > 0 && (p.last_log.elapsed() >= Duration::from_secs(5) || p.done == p.total) => {
                p.last_log = Instant::now();
                p.log_line();
            }
            None => {}
        }
    }

    fn status(&self, text: &str) {
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        p.status = text.to_string();
        if let Some(b) = &p.bar {
            b.set_message(p.message());
        }
    }

    fn finish(&self) {
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = p.bar.take() {
            b.finish();
        }
    }
}
