//! The CPU backend gives the same bits whatever its threads do: a whole-model forward and
//! backward (every parameter gradient) run in rayon pools of 1, 2, 3 and 5 threads must agree
//! exactly. Reductions over parallel partials (rmsnorm's dw, the lm-head's dh over vocab
//! tiles) are summed in a fixed order; a work-stealing reduce made training differ in the
//! last bits from run to run. The shape is chosen so those reductions have many partials:
//! 180 tokens (12 rmsnorm row chunks) and a 30000-token vocabulary (8 lm-head tiles).

mod common;

use common::{random_weights, tiny_config, Rng};
use ipo::backend::cpu::CpuBackend;
use ipo::model::config::Family;
use ipo::model::transformer::{Batch, Transformer};

fn grads_in_pool(threads: usize) -> (Vec<f32>, Vec<(String, Vec<u32>)>) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let mut rng = Rng(17);
        let mut cfg = tiny_config(Family::Llama, false);
        cfg.vocab_size = 30000;
        cfg.max_position_embeddings = 256;
        let host = random_weights(&cfg, &mut rng);
        let model = Transformer::with_backend(CpuBackend::<f32>::new(), cfg.clone(), host).unwrap();
        let mut batch = Batch::default();
        for _ in 0..3 {
            let (ctx, ch, rj) = (rng.ids(30, cfg.vocab_size), rng.ids(15, cfg.vocab_size), rng.ids(15, cfg.vocab_size));
            batch.push_pair(&ctx, &ch, &rj);
        }
        let dl: Vec<f32> = (0..batch.rows.len()).map(|_| rng.normal() as f32).collect();
        let (logp, tape) = model.forward(&batch).unwrap();
        let mut grads = model.zero_grads();
        model.backward(&batch, tape, &dl, &mut grads);
        let mut flat = Vec::new();
        grads.for_each(|n, g| flat.push((n.to_string(), g.iter().map(|x| x.to_bits()).collect())));
        (logp.into_vec(), flat)
    })
}

#[test]
fn forward_and_backward_bits_do_not_depend_on_threads() {
    let (logp1, g1) = grads_in_pool(1);
    assert!(g1.iter().all(|(_, g)| g.iter().any(|&b| f32::from_bits(b) != 0.0)), "every gradient is nonzero");
    for threads in [2, 3, 5] {
        let (logp, g) = grads_in_pool(threads);
        assert_eq!(logp.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), logp1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "log-probs, {threads} threads");
        for ((name, a), (_, b)) in g1.iter().zip(&g) {
            let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
            assert_eq!(diff, 0, "{name}: {diff} of {} gradient values differ between 1 and {threads} threads", a.len());
        }
    }
}
