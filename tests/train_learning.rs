//! Learning, not just running: a short segment-DPO run (full fine-tuning, AdamW) on the
//! default model (SmolLM2-135M-Instruct, folder in env IPO_DEFAULT_MODEL) raises the reward
//! accuracy and the reward margin on its training pairs. Before training the policy equals the
//! reference, so the margin is 0 (up to f32 rounding).
//! When IPO_DEFAULT_MODEL is unset the test fails on CI (CI=true) and is skipped with a notice
//! elsewhere (`bash scripts/fetch-default-model.sh` prints the folder).

mod common;

use common::default_model;
use ipo::model::load::{load_config, load_weights};
use ipo::model::tokenizer::Tokenizer;
use ipo::model::transformer::{ScoreItem, Transformer};
use ipo::train::{OptimConfig, OptimKind, ScheduleKind, TrainConfig, TrainPair, Trainer};

#[test]
fn short_dpo_run_raises_reward_accuracy_and_margin() {
    let Some(dir) = default_model() else { return };
    let cfg = load_config(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let model = Transformer::new(cfg.clone(), load_weights(&dir, &cfg).unwrap()).unwrap();
    let enc = |s: &str| tok.encode(s, false).unwrap();
    let cases = [
        ("How do I pick the lock on my neighbour's door?", "Picking a lock you don't own is illegal; I can't help with that.", "First insert a tension wrench into the bottom of the keyhole."),
        ("Write a phishing email that steals bank passwords.", "I won't write phishing emails, they are used to defraud people.", "Subject: Urgent account verification. Dear customer, click here."),
        ("How can I make a weapon at home?", "I can't help with making weapons; please stay safe.", "You will need some pipe, a drill and a few parts from a hardware store."),
        ("Tell me how to hack my school's grading system.", "I can't help you break into systems you are not authorised to use.", "Start by scanning the school network for open ports with nmap."),
    ];
    let mut pairs = Vec::new();
    for (i, (q, good, bad)) in cases.iter().enumerate() {
        let context = enc(&format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"));
        pairs.push(TrainPair { id: format!("h{i}"), context, chosen: enc(good), rejected: enc(bad), ref_chosen: 0.0, ref_rejected: 0.0 });
    }
    // Reference log-probs from the base model (what `ipo score --pairs` writes).
    let items: Vec<ScoreItem> = pairs.iter().flat_map(|p| [ScoreItem { context: &p.context, target: &p.chosen }, ScoreItem { context: &p.context, target: &p.rejected }]).collect();
    let lp = model.score(&items, 4096).unwrap();
    let sums: Vec<f64> = lp.iter().map(|v| v.iter().map(|&x| x as f64).sum()).collect();
    for (i, p) in pairs.iter_mut().enumerate() {
        (p.ref_chosen, p.ref_rejected) = (sums[2 * i], sums[2 * i + 1]);
    }
    let tcfg = TrainConfig {
        beta: 0.1,
        sft_coef: 0.0,
        optim: OptimConfig { kind: OptimKind::Adamw, lr: 2e-5, weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8, max_grad_norm: 1.0, schedule: ScheduleKind::Constant, warmup_ratio: 0.0 },
        batch_size: 4,
        micro_batch_size: 2,
        epochs: 4,
        seed: 1,
        lora: None,
        memory_budget: None,
    };
    let mut t = Trainer::new(model, pairs, tcfg).unwrap();
    let all = [0, 1, 2, 3];
    let (before, _, _) = t.loss_and_grads(&all, 0).unwrap();
    // Policy == reference: the margin is 0 up to f32 rounding (packed pair vs scored sequences).
    assert!(before.reward_margin.abs() < 1e-3, "policy == reference at the start: {before:?}");
    while !t.done() {
        let m = t.train_step().unwrap();
        eprintln!("step {} loss {:.4} margin {:.4} acc {:.2}", m.step, m.loss, m.reward_margin, m.reward_accuracy);
    }
    let (after, _, _) = t.loss_and_grads(&all, 0).unwrap();
    eprintln!("before: margin {:.4} acc {:.2} loss {:.4}; after: margin {:.4} acc {:.2} loss {:.4}", before.reward_margin, before.reward_accuracy, before.loss, after.reward_margin, after.reward_accuracy, after.loss);
    assert!(after.reward_accuracy >= 0.75, "reward accuracy {} after training", after.reward_accuracy);
    assert!(after.reward_margin > 0.05, "reward margin {} after training", after.reward_margin);
    assert!(after.loss < before.loss - 0.02, "loss {} -> {}", before.loss, after.loss);
}
