//! Activation recomputation (`Transformer::set_recompute`, `ipo train --recompute`): the
//! forward keeps only each layer's input and the backward recomputes the layer, running the
//! same operations on the same inputs, so log-probs and every parameter gradient are bit for
//! bit those of the plain backward. Checked for the three families (tied and untied heads) on
//! the CPU backend (f32) and on `CudaBackend<Sim>` (fails under CI=true without NVRTC), on a
//! packed batch of sequences and preference pairs with a shared context.

mod common;

use common::{random_weights, tiny_config, Rng};
use ipo::backend::cpu::CpuBackend;
use ipo::backend::Backend;
use ipo::model::config::Family;
use ipo::model::transformer::{Batch, Transformer};

/// (log-probs, named gradients) of one forward + backward with `recompute`.
fn run<B: Backend>(model: &mut Transformer<B>, batch: &Batch, dlogp: &[f32], recompute: bool) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    model.set_recompute(recompute);
    let (lp, tape) = model.forward(batch).unwrap();
    let mut g = model.zero_grads();
    model.backward(batch, tape, dlogp, &mut g);
    let mut out = Vec::new();
    g.for_each(|name, b| out.push((name.to_string(), model.backend.download(b))));
    (model.backend.download(&lp), out)
}

fn check<B: Backend>(backend: B, family: Family, tied: bool, seed: u64) {
    let cfg = tiny_config(family, tied);
    let mut rng = Rng(seed);
    let host = random_weights(&cfg, &mut rng);
    let vocab = cfg.vocab_size;
    let mut batch = Batch::from_sequences(&[&rng.ids(7, vocab), &rng.ids(3, vocab)]);
    batch.push_pair(&rng.ids(9, vocab), &rng.ids(4, vocab), &rng.ids(6, vocab));
    batch.push_pair(&rng.ids(5, vocab), &rng.ids(2, vocab), &rng.ids(3, vocab));
    let mut model = Transformer::with_backend(backend, cfg, host).unwrap();
    let dlogp = rng.vec(batch.rows.len(), 1.0);
    let (lp0, g0) = run(&mut model, &batch, &dlogp, false);
    let (lp1, g1) = run(&mut model, &batch, &dlogp, true);
    assert!(common::same_bits(&lp0, &lp1), "{family:?}: log-probs differ with recompute");
    assert_eq!(g0.len(), g1.len());
    for ((n0, a), (n1, b)) in g0.iter().zip(&g1) {
        assert_eq!(n0, n1);
        assert!(a.iter().any(|x| *x != 0.0), "{n0}: zero gradient");
        assert!(common::same_bits(a, b), "{family:?} tied={tied}: gradient {n0} differs with recompute");
    }
}

#[test]
fn recompute_gives_the_same_bits_on_the_cpu() {
    for (i, (family, tied)) in [(Family::Llama, false), (Family::Qwen2, true), (Family::Qwen3, false)].into_iter().enumerate() {
        check(CpuBackend::<f32>::new(), family, tied, 40 + i as u64);
    }
}

#[test]
fn recompute_gives_the_same_bits_on_the_simulated_gpu() {
    for (i, (family, tied)) in [(Family::Llama, true), (Family::Qwen2, false), (Family::Qwen3, false)].into_iter().enumerate() {
        let Some(gpu) = common::sim() else { return };
        check(gpu, family, tied, 50 + i as u64);
    }
}
