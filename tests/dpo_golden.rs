//! Segment-DPO against Hugging Face + torch autograd (tests/reference/make_dpo_fixtures.py):
//! on the tiny Llama / Qwen2 / Qwen3 models and 4 random pairs, our loss and metrics equal the
//! closed-form float64 values, and one SGD step with lr = 1 (no clipping, no weight decay)
//! moves every trainable tensor by exactly minus the fixture's gradient: all weights for full
//! fine-tuning, A and B for LoRA (fixed nonzero adapters, so dA != 0).
//! The model runs on the f64 CPU backend. For full fine-tuning the master weights are the
//! backend's own (f64) buffers and the update is the backend's `sgd` op; LoRA adapters and
//! their gradients are host f32 (as in training), so LoRA updates agree to f32 rounding:
//! tolerances below say how much.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use ipo::backend::cpu::CpuBackend;
use ipo::model::load::{load_config, load_weights};
use ipo::model::transformer::Transformer;
use ipo::train::lora::{Adapter, Lora};
use ipo::train::loss::{dpo_loss, PairLogps};
use ipo::train::trainer::Trainable;
use ipo::train::{LoraConfig, LoraTarget, OptimConfig, OptimKind, ScheduleKind, TrainConfig, TrainPair, Trainer};
use safetensors::{Dtype, SafeTensors};

struct Fx {
    t: HashMap<String, Vec<f64>>,
}

impl Fx {
    fn load(name: &str) -> Self {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dpo").join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&p).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut t = HashMap::new();
        for (n, v) in st.tensors() {
            let d = v.data();
            let x: Vec<f64> = match v.dtype() {
                Dtype::F64 => d.chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
                Dtype::F32 => d.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                Dtype::I64 => d.chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                other => panic!("{n}: {other:?}"),
            };
            t.insert(n, x);
        }
        Fx { t }
    }
    fn get(&self, n: &str) -> &[f64] {
        self.t.get(n).unwrap_or_else(|| panic!("fixture has no {n}"))
    }
    fn s(&self, n: &str) -> f64 {
        self.get(n)[0]
    }
    fn pairs(&self) -> Vec<TrainPair> {
        let lens = |n: &str| self.get(n).iter().map(|&x| x as usize).collect::<Vec<_>>();
        let (cl, hl, rl) = (lens("context_lens"), lens("chosen_lens"), lens("rejected_lens"));
        let ids = |n: &str| self.get(n).iter().map(|&x| x as u32).collect::<Vec<_>>();
        let (c, h, r) = (ids("context_ids"), ids("chosen_ids"), ids("rejected_ids"));
        let (mut oc, mut oh, mut or) = (0, 0, 0);
        (0..cl.len())
            .map(|i| {
                let p = TrainPair {
                    id: format!("pair-{i}"),
                    context: c[oc..oc + cl[i]].to_vec(),
                    chosen: h[oh..oh + hl[i]].to_vec(),
                    rejected: r[or..or + rl[i]].to_vec(),
                    ref_chosen: self.get("ref_chosen")[i],
                    ref_rejected: self.get("ref_rejected")[i],
                };
                (oc, oh, or) = (oc + cl[i], oh + hl[i], or + rl[i]);
                p
            })
            .collect()
    }
}

fn model(name: &str) -> Transformer<CpuBackend<f64>> {
    let dir = common::tiny_fixture(name);
    let cfg = load_config(&dir).unwrap();
    let w = load_weights(&dir, &cfg).unwrap();
    Transformer::with_backend(CpuBackend::<f64>::new(), cfg, w).unwrap()
}

/// SGD, lr 1, no clipping, no decay, constant schedule; 4 pairs in one step as 2 micro-batches
/// of 2 (so gradient accumulation is part of what is checked).
fn sgd_config(fx: &Fx, lora: Option<LoraConfig>) -> TrainConfig {
    TrainConfig {
        beta: fx.s("beta"),
        sft_coef: fx.s("sft_coef"),
        optim: OptimConfig {
            kind: OptimKind::Sgd,
            lr: 1.0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 0.0,
            schedule: ScheduleKind::Constant,
            warmup_ratio: 0.0,
        },
        batch_size: 4,
        micro_batch_size: 2,
        epochs: 1,
        seed: 7,
        lora,
        memory_budget: None,
    }
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |a, b| a.max(b.abs()))
}

/// Checks new - old == -grad for one tensor: error within f32 rounding of the weights plus
/// 1e-6 of the gradient's scale (the fixture's full-model gradients are stored as f32).
fn check_update(what: &str, old: &[f32], new: &[f32], grad: &[f64]) {
    assert_eq!(old.len(), grad.len(), "{what}");
    let scale = max_abs(grad);
    assert!(scale > 0.0, "{what}: zero fixture gradient");
    let wmax = old.iter().fold(0f64, |a, &b| a.max(b.abs() as f64)).max(1.0);
    let tol = 1e-6 * scale + 2.0 * f32::EPSILON as f64 * wmax;
    let err = old.iter().zip(new).zip(grad).fold(0f64, |a, ((&o, &n), &g)| a.max(((n as f64 - o as f64) + g).abs()));
    assert!(err <= tol, "{what}: max |(new - old) + grad| = {err:e} > {tol:e} (grad scale {scale:e})");
}

fn full_step(name: &str) {
    let fx = Fx::load(name);
    let mut t = Trainer::new(model(name), fx.pairs(), sgd_config(&fx, None)).unwrap();
    // Loss and metrics of the packed, micro-batched forward vs HF's separate sequences.
    let (loss, _, _) = t.loss_and_grads(&[0, 1, 2, 3], 1).unwrap();
    for (ours, key) in [
        (loss.loss, "loss"),
        (loss.dpo_loss, "dpo_loss"),
        (loss.sft_nll, "sft_nll"),
        (loss.reward_chosen, "reward_chosen"),
        (loss.reward_rejected, "reward_rejected"),
        (loss.reward_margin, "reward_margin"),
        (loss.reward_accuracy, "reward_accuracy"),
    ] {
        assert!((ours - fx.s(key)).abs() <= 1e-9, "{name}: {key} = {ours} vs HF {}", fx.s(key));
    }
    let old: Vec<Vec<f32>> = t.trainable_tensors().into_iter().map(|x| x.2.to_vec()).collect();
    let names: Vec<String> = t.trainable_tensors().into_iter().map(|x| x.0).collect();
    let m = t.train_step().unwrap();
    assert!((m.loss - fx.s("loss")).abs() <= 1e-9, "{name}: step loss {}", m.loss);
    assert_eq!(m.lr, 1.0);
    let new: Vec<Vec<f32>> = t.trainable_tensors().into_iter().map(|x| x.2.to_vec()).collect();
    let grads = fx.t.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(names.len(), grads, "{name}: every parameter has a fixture gradient");
    for (i, n) in names.iter().enumerate() {
        check_update(&format!("{name} {n}"), &old[i], &new[i], fx.get(&format!("grad.{n}")));
    }
}

fn lora_step(name: &str) {
    let fx = Fx::load(name);
    let m = model(name);
    let base = m.host_weights();
    let rank = fx.s("lora.rank") as usize;
    let targets = vec![LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O, LoraTarget::Gate, LoraTarget::Up, LoraTarget::Down];
    let lc = LoraConfig { rank, alpha: fx.s("lora.alpha"), targets: targets.clone() };
    let mut adapters = Vec::new();
    for layer in 0..m.cfg.num_layers {
        for &target in &targets {
            let (out, inp) = target.dims(&m.cfg);
            let mut ad = Adapter { layer, target, out, inp, a: vec![], b: vec![] };
            let p = ad.peft_prefix();
            ad.a = fx.get(&format!("lora.{p}.lora_A.weight")).iter().map(|&x| x as f32).collect();
            ad.b = fx.get(&format!("lora.{p}.lora_B.weight")).iter().map(|&x| x as f32).collect();
            adapters.push(ad);
        }
    }
    let lora = Lora::with_adapters(lc.clone(), adapters, &base).unwrap();
    let mut t = Trainer::with_trainable(m, fx.pairs(), sgd_config(&fx, Some(lc)), Trainable::Lora(lora)).unwrap();
    let names: Vec<String> = t.trainable_tensors().into_iter().map(|x| x.0).collect();
    assert_eq!(names.len(), 2 * 7 * t.model.cfg.num_layers);
    let old: Vec<Vec<f32>> = t.trainable_tensors().into_iter().map(|x| x.2.to_vec()).collect();
    let step = t.train_step().unwrap();
    // The merged weights are rounded to f32 on the host: loss within 1e-6.
    assert!((step.loss - fx.s("lora.loss")).abs() <= 1e-6, "{name}: LoRA loss {} vs HF {}", step.loss, fx.s("lora.loss"));
    assert!((step.loss - fx.s("loss")).abs() > 1e-3, "{name}: adapters must change the loss");
    let new: Vec<Vec<f32>> = t.trainable_tensors().into_iter().map(|x| x.2.to_vec()).collect();
    for (i, n) in names.iter().enumerate() {
        check_update(&format!("{name} LoRA {n}"), &old[i], &new[i], fx.get(&format!("lora_grad.{n}")));
    }
}

/// The closed form on the fixture's own policy log-probs, independent of the model.
fn closed_form(name: &str) {
    let fx = Fx::load(name);
    let pairs: Vec<PairLogps> = (0..4)
        .map(|i| PairLogps {
            chosen: fx.get("policy_chosen")[i],
            rejected: fx.get("policy_rejected")[i],
            ref_chosen: fx.get("ref_chosen")[i],
            ref_rejected: fx.get("ref_rejected")[i],
            chosen_tokens: fx.get("chosen_lens")[i] as usize,
        })
        .collect();
    let l = dpo_loss(&pairs, fx.s("beta"), fx.s("sft_coef"));
    for (ours, key) in [(l.loss, "loss"), (l.dpo_loss, "dpo_loss"), (l.sft_nll, "sft_nll"), (l.reward_margin, "reward_margin"), (l.reward_accuracy, "reward_accuracy"), (l.reward_chosen, "reward_chosen"), (l.reward_rejected, "reward_rejected")] {
        assert!((ours - fx.s(key)).abs() <= 1e-12 * fx.s(key).abs().max(1.0), "{name}: {key} = {ours} vs {}", fx.s(key));
    }
    let acc = fx.s("reward_accuracy");
    assert!(acc > 0.0 && acc < 1.0, "fixture margins have both signs");
    // Gradients: central differences of the closed form in each pair's sums.
    for i in 0..4 {
        for side in 0..2 {
            let h = 1e-5;
            let mut p = pairs.clone();
            let f = |p: &[PairLogps]| dpo_loss(p, fx.s("beta"), fx.s("sft_coef")).loss;
            let x = if side == 0 { &mut p[i].chosen } else { &mut p[i].rejected };
            *x += h;
            let fp = f(&p);
            let x = if side == 0 { &mut p[i].chosen } else { &mut p[i].rejected };
            *x -= 2.0 * h;
            let fm = f(&p);
            let fd = (fp - fm) / (2.0 * h);
            let an = if side == 0 { l.d_chosen[i] } else { l.d_rejected[i] };
            assert!((fd - an).abs() < 1e-8, "{name}: d loss / d sum (pair {i}, side {side}): fd {fd} vs {an}");
        }
    }
}

#[test]
fn closed_form_matches_fixtures() {
    for n in ["llama", "qwen2", "qwen3"] {
        closed_form(n);
    }
}
#[test]
fn llama_full_sgd_step_is_minus_hf_gradient() {
    full_step("llama");
}
#[test]
fn qwen2_full_sgd_step_is_minus_hf_gradient() {
    full_step("qwen2");
}
#[test]
fn qwen3_full_sgd_step_is_minus_hf_gradient() {
    full_step("qwen3");
}
#[test]
fn llama_lora_sgd_step_is_minus_hf_gradient() {
    lora_step("llama");
}
#[test]
fn qwen2_lora_sgd_step_is_minus_hf_gradient() {
    lora_step("qwen2");
}
#[test]
fn qwen3_lora_sgd_step_is_minus_hf_gradient() {
    lora_step("qwen3");
}
