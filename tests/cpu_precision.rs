//! The CPU backend's bf16, 8-bit and 4-bit precisions (`--precision bf16|q8|q4`) against its f32
//! reference, and each measured on the default model:
//! - a full forward + backward of the tiny fixtures in bf16: log-probs and every gradient
//!   within stated bounds of f32 (and not equal to it: the bf16 path really ran);
//! - teacher-forced decoding of real text through the KV-cached path (one token per step, so
//!   every projection takes the decode products), f32 vs bf16 vs q8 vs q4 on the default model:
//!   the max and mean |d log-prob| per token, printed and bounded;
//! - a weight updated in place (an optimizer step) is repacked: the next product sees it.

mod common;

use common::{random_weights, tiny_config, Rng};
use ipo::backend::cpu::CpuBackend;
use ipo::backend::{Backend, PagedSeq, Precision};
use ipo::model::config::Family;
use ipo::model::decode::DecodeStep;
use ipo::model::transformer::{Batch, Transformer};

fn model(p: Precision, family: Family, seed: u64) -> Transformer<CpuBackend<f32>> {
    let cfg = tiny_config(family, false);
    let w = random_weights(&cfg, &mut Rng(seed));
    Transformer::with_backend(CpuBackend::with_precision(p), cfg, w).unwrap()
}

/// bf16 products round each operand to 8 significant bits (relative error up to 2^-9 each),
/// and the errors of successive layers add up, so a log-prob moves by a small fraction of the
/// log-prob scale: the tiny random models reach |log-prob| ~17, where f32 and bf16 differed by
/// 0.22 (1.3%) on the Llama fixture when this was written. The gradients flow back through
/// that peaked softmax and differed by 2-10% of each tensor's 2-norm (mean ~4%). Bounds: 3%
/// of the largest |log-prob|; 15% of each gradient's norm and 6% on average. The exactness of
/// the bf16 arithmetic itself is tested per GEMM (src/backend/cpu/matmul.rs, against f64 sums
/// of the rounded operands); this test shows that the whole model runs on it and stays close.
#[test]
fn bf16_forward_backward_is_close_to_f32_on_every_family() {
    for (family, seed) in [(Family::Llama, 3), (Family::Qwen2, 4), (Family::Qwen3, 5)] {
        let (r, b) = (model(Precision::F32, family, seed), model(Precision::Bf16, family, seed));
        let vocab = r.cfg.vocab_size;
        let mut rng = Rng(seed + 10);
        let mut batch = Batch::from_sequences(&[&rng.ids(37, vocab), &rng.ids(5, vocab)]);
        batch.push_pair(&rng.ids(19, vocab), &rng.ids(9, vocab), &rng.ids(13, vocab));
        let (lr, tr) = r.forward(&batch).unwrap();
        let (lb, tb) = b.forward(&batch).unwrap();
        let max_dlp = lr.iter().zip(lb.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let scale = lr.iter().fold(0f32, |m, x| m.max(x.abs()));
        println!("{family:?}: max |d log-prob| {max_dlp} (largest |log-prob| {scale})");
        assert!(max_dlp < 0.03 * scale, "{family:?}: bf16 log-probs {max_dlp} from f32 (largest |log-prob| {scale})");
        assert!(max_dlp > 0.0, "{family:?}: bf16 log-probs equal f32's bit for bit: the bf16 path did not run");
        let dlogp = rng.vec(lr.len(), 1.0);
        let (mut gr, mut gb) = (r.zero_grads(), b.zero_grads());
        r.backward(&batch, tr, &dlogp, &mut gr);
        b.backward(&batch, tb, &dlogp, &mut gb);
        let mut theirs = Vec::new();
        gb.for_each(|n, g| theirs.push((n.to_string(), g.to_vec())));
        let (mut i, mut rel) = (0, Vec::new());
        gr.for_each(|name, g| {
            let (n2, g2) = &theirs[i];
            assert_eq!(name, n2);
            // Relative error in the 2-norm (single entries behind a peaked softmax move more).
            let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let err = g.iter().zip(g2).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt();
            println!("{family:?} {name}: |g_bf16 - g_f32| / |g_f32| = {:.4}", err / norm.max(1e-30));
            assert!(err <= 0.15 * norm + 1e-6, "{family:?} {name}: bf16 gradient off by {err} in norm (|g| {norm})");
            rel.push(err / norm.max(1e-30));
            i += 1;
        });
        let mean = rel.iter().sum::<f64>() / rel.len() as f64;
        assert!(mean <= 0.06, "{family:?}: bf16 gradients off by {mean} of their norm on average");
    }
}

/// An optimizer step changes a weight in place; the bf16 product after it must use the new
/// values (the packed copy is dropped by the write), which a stale copy would not.
#[test]
fn weights_updated_in_place_are_repacked() {
    let be = CpuBackend::with_precision(Precision::Bf16);
    let mut rng = Rng(9);
    let (m, n, k) = (40, 33, 70);
    let x = be.upload(&rng.vec(m * k, 1.0));
    let mut w = be.upload_weight(&rng.vec(n * k, 1.0));
    let mut y1 = be.zeros(m * n);
    be.matmul(&x, false, &w, true, &mut y1, m, n, k, false);
    let g = be.upload(&rng.vec(n * k, 1.0));
    be.sgd(&mut w, &g, 0.5, 0.0, 1.0);
    let mut y2 = be.zeros(m * n);
    be.matmul(&x, false, &w, true, &mut y2, m, n, k, false);
    // The same product from a fresh (never packed) copy of the updated weights.
    let fresh = be.upload_weight(&be.download(&w));
    let mut y3 = be.zeros(m * n);
    be.matmul(&x, false, &fresh, true, &mut y3, m, n, k, false);
    assert_eq!(be.download(&y2), be.download(&y3), "the product after the update used a stale packed copy");
    assert_ne!(be.download(&y1), be.download(&y2));
    // Decode-sized products (the bf16 rows copy) likewise.
    let (mut d1, mut d2) = (be.zeros(2 * n), be.zeros(2 * n));
    let x2 = be.upload(&rng.vec(2 * k, 1.0));
    be.matmul(&x2, false, &w, true, &mut d1, 2, n, k, false);
    be.sgd(&mut w, &g, 0.5, 0.0, 1.0);
    be.matmul(&x2, false, &w, true, &mut d2, 2, n, k, false);
    let fresh = be.upload_weight(&be.download(&w));
    let mut d3 = be.zeros(2 * n);
    be.matmul(&x2, false, &fresh, true, &mut d3, 2, n, k, false);
    assert_eq!(be.download(&d2), be.download(&d3));
}

/// Teacher-forced per-token log-probs of `ids` through `forward_cached`, one token per step.
fn decode_logprobs(m: &Transformer<CpuBackend<f32>>, ids: &[u32]) -> Vec<f64> {
    let bs = 16;
    let blocks = ids.len().div_ceil(bs) + 1;
    let geom = m.kv_geom(blocks, bs);
    let mut kv = m.alloc_kv(geom);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let vocab = m.cfg.vocab_size;
    let mut out = Vec::new();
    for (t, &id) in ids[..ids.len() - 1].iter().enumerate() {
        let step = DecodeStep {
            ids: vec![id],
            positions: vec![t as u32],
            slots: vec![t as u32],
            seqs: vec![PagedSeq { q_start: 0, q_len: 1, ctx_len: t + 1, table_start: 0 }],
            block_table: table.clone(),
            logit_rows: vec![0],
        };
        let logits = m.backend.download(&m.forward_cached(&mut kv, geom, &step).unwrap());
        assert_eq!(logits.len(), vocab);
        let mx = logits.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
        let lse = mx + logits.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        out.push(logits[ids[t + 1] as usize] as f64 - lse);
    }
    out
}

/// The default model (SmolLM2-135M-Instruct) decoding a paragraph of English token by token:
/// bf16, q8 and q4 log-probs against f32 over 67 tokens. Measured here (printed): bf16 mean |d|
/// 0.015 nats, max 0.086; q8 mean 0.079, max 0.37 (0.052 / 0.22 before the integer Q8_0 x
/// Q8_0 dot quantized the activations too); q4 mean 0.062, max 0.31 (its 4-bit blocks are the
/// model's own Q4_1 weights, unchanged; what moves is the 8-bit activations and lm head; with
/// a 4-bit lm head it was mean 0.24, max 1.01). Bounds, set at about 3x the first measurements
/// and unchanged since: bf16 mean < 0.05, max < 0.3; q8 mean < 0.15, max < 0.7; q4 mean < 0.2,
/// max < 1.0.
#[test]
fn decode_precisions_on_the_default_model() {
    let Some(dir) = common::default_model() else { return };
    let cfg = ipo::model::load::load_config(&dir).unwrap();
    let weights = ipo::model::load::load_weights(&dir, &cfg).unwrap();
    let tok = ipo::model::tokenizer::Tokenizer::from_dir(&dir).unwrap();
    let text = "The Titanic struck an iceberg late on 14 April 1912 and sank a little under three hours later. \
                Too few lifeboats were carried for everyone on board, and many of them left half empty. \
                The inquiries that followed changed the rules of the sea: enough boats for all, and a radio watch day and night.";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() > 50, "{} tokens", ids.len());
    let run = |p: Precision| {
        let m = Transformer::with_backend(CpuBackend::with_precision(p), cfg.clone(), weights.clone()).unwrap();
        decode_logprobs(&m, &ids)
    };
    let f32_lp = run(Precision::F32);
    let mean_f32 = f32_lp.iter().sum::<f64>() / f32_lp.len() as f64;
    assert!(mean_f32 > -4.0, "f32 mean log-prob {mean_f32}: the model does not read English?");
    for (p, mean_bound, max_bound) in [(Precision::Bf16, 0.05, 0.3), (Precision::Q8, 0.15, 0.7), (Precision::Q4, 0.2, 1.0)] {
        let lp = run(p);
        let d: Vec<f64> = lp.iter().zip(&f32_lp).map(|(a, b)| (a - b).abs()).collect();
        let (max, mean) = (d.iter().cloned().fold(0.0, f64::max), d.iter().sum::<f64>() / d.len() as f64);
        println!("{p}: {} tokens, |d log-prob| vs f32: mean {mean:.4}, max {max:.4}", d.len());
        assert!(mean < mean_bound && max < max_bound, "{p}: mean {mean}, max {max}");
        assert!(max > 0.0, "{p}: identical to f32, the {p} path did not run");
    }
}
