//! One segment-DPO step with the library: a preference pair `[context | chosen | rejected]`,
//! its reference log-probs from the frozen model, and two AdamW steps on the tiny Llama fixture
//! (`tests/fixtures/tiny/llama`, or a model folder given as the first argument). At the first
//! step the policy equals the reference, so the loss is ln 2; after it the chosen segment has
//! gained on the rejected one.
//!
//!     cargo run --release --example dpo_step [MODEL_DIR]

use anyhow::{ensure, Result};
use ipo::{CpuBackend, ModelDir, OptimConfig, ScoreItem, TrainConfig, TrainPair, Trainer};

fn main() -> Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/llama").into());
    let model_dir = ModelDir::open(dir.as_ref())?;
    let model = model_dir.upload(CpuBackend::<f32>::new(), model_dir.weights()?)?;

    // Seeded token ids inside the vocabulary (a real pair comes from `ipo intervene`).
    let vocab = model.cfg.vocab_size as u64;
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) % vocab) as u32
            })
            .collect()
    };
    let (context, chosen, rejected) = (ids(12), ids(6), ids(5));
    // Reference log-probs: the frozen base model scores both segments after the context.
    let refs = model.score(&[ScoreItem { context: &context, target: &chosen }, ScoreItem { context: &context, target: &rejected }], 4096)?;
    let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
    let pair = TrainPair { id: "demo".into(), context, chosen, rejected, ref_chosen: sum(&refs[0]), ref_rejected: sum(&refs[1]) };

    let optim = OptimConfig::adamw(1e-3);
    let cfg = TrainConfig { beta: 0.1, sft_coef: 0.0, optim, batch_size: 1, micro_batch_size: 1, epochs: 2, seed: 0, lora: None, memory_budget: None };
    let mut trainer = Trainer::new(model, vec![pair], cfg)?;
    let first = trainer.train_step()?;
    let second = trainer.train_step()?;
    for m in [&first, &second] {
        println!("step {}: loss {:.6}, reward margin {:+.6}, grad norm {:.4}", m.step, m.loss, m.reward_margin, m.grad_norm);
    }
    ensure!((first.loss - std::f64::consts::LN_2).abs() < 1e-4, "policy = reference at step 1: loss is ln 2");
    ensure!(second.reward_margin > 0.0 && second.loss < first.loss, "the step moved the policy towards the chosen segment");
    Ok(())
}
