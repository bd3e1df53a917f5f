//! Golden tests against Hugging Face transformers: the tiny random Llama (llama3 RoPE
//! scaling, untied), Qwen2 (q/k/v bias, tied) and Qwen3 (q/k norm, head_dim != hidden/heads)
//! fixtures written by tests/reference/make_fixtures.py hold per-token log-probs and the
//! gradient of a masked sum of log-probs w.r.t. every parameter, in float64.
//! Tolerances: the f64 backend must agree to 1e-9 (the fixtures are exact float64); the f32
//! reference to 2e-5 absolute on log-probs and 1e-4 of each tensor's largest gradient
//! (float32 rounding through 2 layers, measured ~1e-6 by the fixture script for HF itself).

mod common;

use ipo::backend::cpu::{CpuBackend, Elem};
use ipo::backend::Backend;
use ipo::model::load::{load_config, load_weights};
use ipo::model::transformer::{Batch, Transformer};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::PathBuf;

struct Golden {
    ids: Vec<u32>,
    seq_lens: Vec<usize>,
    mask: Vec<f64>,
    logprobs: Vec<f64>,
    objective: f64,
    grads: HashMap<String, Vec<f64>>,
}

fn read_golden(dir: &PathBuf) -> Golden {
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f64s = |name: &str| -> Vec<f64> {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F64, "{name}");
        t.data().chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let i64s = |name: &str| -> Vec<i64> {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        t.data().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let grads = st
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("grad.").map(|p| (p.to_string(), f64s(n))))
        .collect();
    Golden {
        ids: i64s("input_ids").into_iter().map(|x| x as u32).collect(),
        seq_lens: i64s("seq_lens").into_iter().map(|x| x as usize).collect(),
        mask: f64s("loss_mask"),
        logprobs: f64s("logprobs"),
        objective: f64s("objective")[0],
        grads,
    }
}

fn check<F: Elem>(name: &str, lp_tol: f64, grad_rel_tol: f64) {
    let dir = common::tiny_fixture(name);
    let g = read_golden(&dir);
    let cfg = load_config(&dir).unwrap();
    let host = load_weights(&dir, &cfg).unwrap();
    let model = Transformer::with_backend(CpuBackend::<F>::new(), cfg, host).unwrap();
    let mut seqs = Vec::new();
    let mut start = 0;
    for &n in &g.seq_lens {
        seqs.push(&g.ids[start..start + n]);
        start += n;
    }
    let batch = Batch::from_sequences(&seqs);
    // Target rows of from_sequences are every position but the first of each sequence.
    let mut golden_pos = Vec::new();
    let mut start = 0;
    for &n in &g.seq_lens {
        golden_pos.extend(start + 1..start + n);
        start += n;
    }
    let (logp, tape) = model.forward(&batch).unwrap();
    let logp = model.backend.download_f64(&logp);
    assert_eq!(logp.len(), golden_pos.len());
    let mut max_lp = 0f64;
    let mut objective = 0.0;
    for (i, &p) in golden_pos.iter().enumerate() {
        max_lp = max_lp.max((logp[i] - g.logprobs[p]).abs());
        objective += g.mask[p] * logp[i];
    }
    println!("{name} ({}): max |dlogp| = {max_lp:.3e}", std::any::type_name::<F>());
    assert!(max_lp <= lp_tol, "{name}: max |logp - hf| = {max_lp:e} > {lp_tol:e}");
    assert!((objective - g.objective).abs() <= lp_tol * 13.0, "{name}: objective {objective} vs {}", g.objective);

    let dlogp: Vec<f32> = golden_pos.iter().map(|&p| g.mask[p] as f32).collect();
    let mut grads = model.zero_grads();
    model.backward(&batch, tape, &dlogp, &mut grads);
    let mut seen = 0;
    grads.for_each(|pname, buf| {
        let ours = model.backend.download_f64(buf);
        let theirs = g.grads.get(pname).unwrap_or_else(|| panic!("{name}: fixture has no grad.{pname}"));
        assert_eq!(ours.len(), theirs.len(), "{name}: {pname}");
        let scale = theirs.iter().fold(0f64, |a, b| a.max(b.abs()));
        assert!(scale > 0.0, "{name}: golden grad of {pname} is zero");
        let err = ours.iter().zip(theirs).fold(0f64, |a, (x, y)| a.max((x - y).abs()));
        assert!(err <= grad_rel_tol * scale, "{name}: grad {pname}: max err {err:e} vs scale {scale:e}");
        seen += 1;
    });
    assert_eq!(seen, g.grads.len(), "{name}: every fixture gradient compared");
}

#[test]
fn llama_llama3_rope_f64_matches_hf() {
    check::<f64>("llama", 1e-9, 1e-9);
}
#[test]
fn qwen2_bias_tied_f64_matches_hf() {
    check::<f64>("qwen2", 1e-9, 1e-9);
}
#[test]
fn qwen3_qk_norm_f64_matches_hf() {
    check::<f64>("qwen3", 1e-9, 1e-9);
}
#[test]
fn llama_f32_matches_hf() {
    check::<f32>("llama", 2e-5, 1e-4);
}
#[test]
fn qwen2_f32_matches_hf() {
    check::<f32>("qwen2", 2e-5, 1e-4);
}
#[test]
fn qwen3_f32_matches_hf() {
    check::<f32>("qwen3", 2e-5, 1e-4);
}
