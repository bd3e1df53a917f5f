//! The bf16 copies of weights in `Precision::Bf16` (`Backend::upload_weight`): a weight is
//! rounded once and reused by later matmuls (fewer `f32_to_bf16` launches, bit-identical
//! products), the copy is dropped when an optimizer step or `add_assign` changes the weight in
//! place (the next product equals a fresh conversion of the new values), and a matmul of a
//! weight with itself does not deadlock. Whole tiny model: two forwards give the same
//! log-probs, equal to a backend that never caches. Without NVRTC: skip notice, or fail under
//! CI=true.

mod common;

use common::{random_weights, sim_with, tiny_config, Rng};
use ipo::backend::cuda::{CudaBackend, Precision, Sim};
use ipo::backend::{AdamwStep, Backend};
use ipo::model::config::Family;
use ipo::model::transformer::{Batch, Transformer};

fn conversions(be: &CudaBackend<Sim>) -> u64 {
    be.gpu().stats().iter().find(|s| s.0 == "f32_to_bf16").map_or(0, |s| s.1)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn weight_copies_are_reused_and_refreshed() {
    let Some(be) = sim_with(Precision::Bf16) else { return };
    let mut r = Rng(7);
    let (m, n, k) = (5, 37, 48);
    let (x, w) = (r.vec(m * k, 1.0), r.vec(n * k, 0.5));
    let (xd, mut wd) = (be.upload(&x), be.upload_weight(&w));
    let matmul = |wd: &<CudaBackend<Sim> as Backend>::Buf| {
        let mut c = be.upload(&vec![f32::NAN; m * n]);
        be.matmul(&xd, false, wd, true, &mut c, m, n, k, false);
        be.download(&c)
    };
    let c0 = conversions(&be);
    let first = matmul(&wd);
    assert_eq!(conversions(&be) - c0, 2, "first product converts x and w");
    let second = matmul(&wd);
    assert_eq!(conversions(&be) - c0, 3, "second product converts only x");
    assert_eq!(bits(&first), bits(&second));
    // Equal to a plain (never cached) upload of the same weights.
    assert_eq!(bits(&matmul(&be.upload(&w))), bits(&first));

    // An SGD step changes w in place: the next product uses the new values.
    let g = be.upload(&r.vec(n * k, 1.0));
    be.sgd(&mut wd, &g, 0.5, 0.0, 1.0);
    let after = matmul(&wd);
    let fresh = matmul(&be.upload(&be.download(&wd)));
    assert_eq!(bits(&after), bits(&fresh));
    assert_ne!(bits(&after), bits(&first), "the step changed the product");
    // Same for AdamW and add_assign.
    let (mut mo, mut vo) = (be.upload(&vec![0.0; n * k]), be.upload(&vec![0.0; n * k]));
    let h = AdamwStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, grad_scale: 1.0, bc1: 0.1, bc2: 0.001 };
    be.adamw(&mut wd, &g, &mut mo, &mut vo, &h);
    assert_eq!(bits(&matmul(&wd)), bits(&matmul(&be.upload(&be.download(&wd)))));
    be.add_assign(&mut wd, &g);
    assert_eq!(bits(&matmul(&wd)), bits(&matmul(&be.upload(&be.download(&wd)))));

    // A weight times itself (one lock): w @ w^T.
    let mut c = be.upload(&vec![f32::NAN; n * n]);
    be.matmul(&wd, false, &wd, true, &mut c, n, n, k, false);
    let mut c2 = be.upload(&vec![f32::NAN; n * n]);
    let plain = be.upload(&be.download(&wd));
    be.matmul(&plain, false, &plain, true, &mut c2, n, n, k, false);
    assert_eq!(bits(&be.download(&c)), bits(&be.download(&c2)));
}

#[test]
fn model_forwards_reuse_weight_copies() {
    let Some(be) = sim_with(Precision::Bf16) else { return };
    let Some(plain) = sim_with(Precision::Bf16) else { return };
    let cfg = tiny_config(Family::Qwen3, false);
    let host = random_weights(&cfg, &mut Rng(3));
    let mut rng = Rng(4);
    let batch = Batch::from_sequences(&[&rng.ids(9, cfg.vocab_size), &rng.ids(4, cfg.vocab_size)]);
    let model = Transformer::with_backend(be, cfg.clone(), host.clone()).unwrap();
    let c0 = conversions(&model.backend);
    let a = model.backend.download(&model.forward(&batch).unwrap().0);
    let first = conversions(&model.backend) - c0;
    let b = model.backend.download(&model.forward(&batch).unwrap().0);
    let second = conversions(&model.backend) - c0 - first;
    assert_eq!(bits(&a), bits(&b));
    assert!(second < first, "second forward converted {second} operands, first {first}");
    // A model whose weights were uploaded without the cache gives the same log-probs.
    let mut reference = Transformer::with_backend(plain, cfg, host.clone()).unwrap();
    let weights = host.map(|t| reference.backend.upload(&t.data));
    reference.weights = weights;
    let c = reference.backend.download(&reference.forward(&batch).unwrap().0);
    assert_eq!(bits(&a), bits(&c));
}
