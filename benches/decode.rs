//! Decode and prefill throughput of the rollout engine on the default model
//! (SmolLM2-135M-Instruct, CPU f32): tokens/s of batched decode at batch 1, 8 and 32 (after a
//! 64-token prompt per sequence), and prefill tokens/s of 8 x 128-token prompts. Results go to
//! docs/PERF.md beside Hugging Face `generate` (tests/reference/generate_bench.py).
//! A plain timing harness (harness = false): each point is one engine run, timed end to end
//! and split into prefill and decode by the engine's own counters.
//!
//! Run: `IPO_DEFAULT_MODEL=DIR cargo bench --bench decode` (env DECODE_BENCH_NEW=N changes the
//! decode length, default 32 tokens per sequence).

use std::time::Instant;

use ipo::model::load::{load_config, load_weights};
use ipo::model::transformer::Transformer;
use ipo::rollout::{Engine, EngineConfig, Event, Request, SamplingParams};

/// Deterministic pseudo-random prompt ids (avoiding the first 20 special-ish ids).
fn prompt(len: usize, salt: u64, vocab: usize) -> Vec<u32> {
    (0..len as u64).map(|i| (20 + ipo::rollout::sampler::mix64(salt * 1000 + i) % (vocab as u64 - 20)) as u32).collect()
}

/// Runs `batch` requests of `prompt_len` tokens generating `new` tokens each; returns
/// (prefill seconds, decode seconds, prefill tokens, decode tokens).
fn run(m: &Transformer, batch: usize, prompt_len: usize, new: usize) -> (f64, f64, u64, u64) {
    let cfg = EngineConfig { num_blocks: 4096, block_size: 16, prefill_chunk: batch * prompt_len, max_batch: batch };
    let mut e = Engine::new(m, cfg).unwrap();
    let reqs: Vec<Request> = (0..batch).map(|i| Request::new(i as u64, 0, prompt(prompt_len, i as u64, m.cfg.vocab_size))).collect();
    // No EOS: every sequence decodes exactly `new` tokens.
    let p = SamplingParams { max_new_tokens: new, temperature: 0.0, ..Default::default() };
    let (mut t_prefill, mut t_decode) = (0.0, 0.0);
    let mut last = Instant::now();
    e.generate(reqs, &p, None, |ev| {
        if let Event::Step { prefill, .. } = ev {
            let dt = last.elapsed().as_secs_f64();
            if prefill > 0 {
                t_prefill += dt;
            } else {
                t_decode += dt;
            }
            last = Instant::now();
        }
    })
    .unwrap();
    let st = e.stats();
    (t_prefill, t_decode, st.prefill_tokens, st.decode_tokens)
}

fn main() {
    let Some(dir) = std::env::var_os("IPO_DEFAULT_MODEL") else {
        eprintln!("decode bench: set IPO_DEFAULT_MODEL to the default model folder (scripts/fetch-default-model.sh)");
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let cfg = load_config(&dir).unwrap();
    let m = Transformer::new(cfg.clone(), load_weights(&dir, &cfg).unwrap()).unwrap();
    let new: usize = std::env::var("DECODE_BENCH_NEW").ok().and_then(|s| s.parse().ok()).unwrap_or(32);
    println!("threads: {}", rayon::current_num_threads());
    println!("| phase | batch | tokens | seconds | tokens/s |");
    println!("|---|---|---|---|---|");
    let _ = run(&m, 1, 16, 2); // warm-up (page in the weights)
    for batch in [1usize, 8, 32] {
        let (_, td, _, nd) = run(&m, batch, 64, new);
        println!("| decode (64-token prompt, {new} new) | {batch} | {nd} | {td:.2} | {:.1} |", nd as f64 / td);
    }
    let (tp, _, np, _) = run(&m, 8, 128, 1);
    println!("| prefill (8 x 128) | 8 | {np} | {tp:.2} | {:.1} |", np as f64 / tp);
}
