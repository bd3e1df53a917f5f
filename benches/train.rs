//! Training benchmarks on the CPU backend (numbers go in docs/PERF.md):
//! 1. shared-prefix speed-up: forward + backward of preference pairs packed as
//!    `[context | chosen | rejected]` (context computed once) vs the same pairs as two separate
//!    sequences, for long contexts;
//! 2. training throughput: full optimizer steps (segment-DPO, AdamW) in tokens/s, on the model
//!    in env IPO_BENCH_MODEL (an HF folder, e.g. the default SmolLM2-135M) or else a random
//!    SmolLM2-shaped model, with the same pairs as scripts in docs/PERF.md give PyTorch.
//! Run: `cargo bench --bench train` (set RAYON_NUM_THREADS to pin the thread count).

use std::time::Instant;

#[path = "common/smollm2.rs"]
mod smollm2;
use smollm2::{random_weights, smol_config, Rng};

use ipo::backend::Backend;
use ipo::model::transformer::{Batch, Transformer};
use ipo::train::{OptimConfig, OptimKind, ScheduleKind, TrainConfig, TrainPair, Trainer};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn fwd_bwd(model: &Transformer, batch: &Batch) -> f64 {
    let t = Instant::now();
    let (logp, tape) = model.forward(batch).unwrap();
    let n = model.backend.download(&logp).len();
    let mut g = model.zero_grads();
    model.backward(batch, tape, &vec![0.01; n], &mut g);
    t.elapsed().as_secs_f64()
}

fn shared_prefix(model: &Transformer, ctx: usize, seg: usize, pairs: usize, rng: &mut Rng) {
    let v = model.cfg.vocab_size;
    let data: Vec<_> = (0..pairs).map(|_| (rng.ids(ctx, v), rng.ids(seg, v), rng.ids(seg, v))).collect();
    let mut packed = Batch::default();
    let mut separate = Batch::default();
    for (c, a, b) in &data {
        packed.push_pair(c, a, b);
        separate.push_scored(c, a);
        separate.push_scored(c, b);
    }
    fwd_bwd(model, &packed); // warm-up
    let tp = median((0..2).map(|_| fwd_bwd(model, &packed)).collect());
    let ts = median((0..2).map(|_| fwd_bwd(model, &separate)).collect());
    println!(
        "shared-prefix ctx={ctx} seg={seg} pairs={pairs}: packed {} tokens {:.3} s, separate {} tokens {:.3} s, speed-up {:.2}x",
        packed.num_tokens(), tp, separate.num_tokens(), ts, ts / tp
    );
}

fn main() {
    let threads = rayon::current_num_threads();
    println!("threads: {threads}");
    let mut rng = Rng(1);
    // 1. Shared prefix on a 4-layer SmolLM2-shaped model (full vocab: the lm-head is included).
    let cfg = smol_config(4);
    let model = Transformer::new(cfg.clone(), random_weights(&cfg, &mut rng)).unwrap();
    for (ctx, seg) in [(512, 64), (1024, 64), (256, 128)] {
        shared_prefix(&model, ctx, seg, 2, &mut rng);
    }
    drop(model);

    // 2. Training throughput: full fine-tuning steps with AdamW.
    let (cfg, w, what) = match std::env::var("IPO_BENCH_MODEL") {
        Ok(dir) => {
            let d = std::path::PathBuf::from(&dir);
            let cfg = ipo::model::load::load_config(&d).unwrap();
            let w = ipo::model::load::load_weights(&d, &cfg).unwrap();
            (cfg, w, dir)
        }
        Err(_) => {
            let cfg = smol_config(30);
            let w = random_weights(&cfg, &mut rng);
            (cfg, w, "random SmolLM2-135M-shaped model".to_string())
        }
    };
    let model = Transformer::new(cfg.clone(), w).unwrap();
    let (n_pairs, ctx, seg) = (8, 192, 64);
    let pairs: Vec<TrainPair> = (0..n_pairs)
        .map(|i| TrainPair {
            id: format!("b{i}"),
            context: rng.ids(ctx, cfg.vocab_size),
            chosen: rng.ids(seg, cfg.vocab_size),
            rejected: rng.ids(seg, cfg.vocab_size),
            ref_chosen: -300.0,
            ref_rejected: -300.0,
        })
        .collect();
    let tcfg = TrainConfig {
        beta: 0.1,
        sft_coef: 0.0,
        optim: OptimConfig { kind: OptimKind::Adamw, lr: 1e-6, weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8, max_grad_norm: 1.0, schedule: ScheduleKind::Constant, warmup_ratio: 0.0 },
        batch_size: 4,
        micro_batch_size: 2,
        epochs: 3,
        seed: 0,
        lora: None,
        memory_budget: None,
    };
    let mut t = Trainer::new(model, pairs, tcfg).unwrap();
    t.train_step().unwrap(); // warm-up
    let mut times = Vec::new();
    let mut tokens = 0;
    for _ in 0..2 {
        let s = Instant::now();
        let m = t.train_step().unwrap();
        times.push(s.elapsed().as_secs_f64());
        tokens = m.tokens;
    }
    let med = median(times);
    println!(
        "train step ({what}, full FT, AdamW, 4 pairs ctx={ctx} seg={seg} as 2 micro-batches): {tokens} tokens in {med:.3} s = {:.0} tokens/s",
        tokens as f64 / med
    );
}
