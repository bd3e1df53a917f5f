//! Shared-prefix training is exact: a pair packed as `[context | chosen | rejected]`
//! (`Batch::push_pair`, the context computed once, both branches attending to it) gives the
//! same segment log-probs and the same gradient of every parameter as the two separate
//! sequences `context + chosen` and `context + rejected`, on the f64 backend, for all three
//! families (tied and untied), with random upstream gradients on every target row.

mod common;

use common::{random_weights, tiny_config, Rng};
use ipo::backend::cpu::CpuBackend;
use ipo::backend::Backend;
use ipo::model::config::Family;
use ipo::model::transformer::{Batch, Transformer};

fn check(family: Family, tied: bool, seed: u64) {
    let cfg = tiny_config(family, tied);
    let mut rng = Rng(seed);
    let w = random_weights(&cfg, &mut rng);
    let model = Transformer::with_backend(CpuBackend::<f64>::new(), cfg.clone(), w).unwrap();
    let v = cfg.vocab_size;
    // Three pairs: long and short contexts, segments of different lengths (incl. length 1).
    let pairs: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> = [(17, 5, 8), (3, 1, 6), (11, 7, 2)]
        .iter()
        .map(|&(c, a, b)| (rng.ids(c, v), rng.ids(a, v), rng.ids(b, v)))
        .collect();
    let mut packed = Batch::default();
    let mut separate = Batch::default();
    let mut map = Vec::new(); // (packed range, separate range) per segment
    for (c, ch, rj) in &pairs {
        let (pc, pr) = packed.push_pair(c, ch, rj);
        let sc = separate.push_scored(c, ch);
        let sr = separate.push_scored(c, rj);
        map.push((pc, sc));
        map.push((pr, sr));
    }
    assert!(packed.num_tokens() < separate.num_tokens(), "contexts are computed once");
    let (lp_p, tape_p) = model.forward(&packed).unwrap();
    let (lp_s, tape_s) = model.forward(&separate).unwrap();
    let (lp_p, lp_s) = (model.backend.download_f64(&lp_p), model.backend.download_f64(&lp_s));
    let mut dl_p = vec![0f32; lp_p.len()];
    let mut dl_s = vec![0f32; lp_s.len()];
    for (rp, rs) in &map {
        assert_eq!(rp.len(), rs.len());
        for (i, j) in rp.clone().zip(rs.clone()) {
            assert!((lp_p[i] - lp_s[j]).abs() <= 1e-12, "{family:?}: logp {} vs {}", lp_p[i], lp_s[j]);
            let g = rng.normal() as f32;
            dl_p[i] = g;
            dl_s[j] = g;
        }
    }
    let mut g_p = model.zero_grads();
    let mut g_s = model.zero_grads();
    model.backward(&packed, tape_p, &dl_p, &mut g_p);
    model.backward(&separate, tape_s, &dl_s, &mut g_s);
    let mut flat_s = Vec::new();
    g_s.for_each(|_, b| flat_s.push(model.backend.download_f64(b)));
    let mut k = 0;
    g_p.for_each(|name, b| {
        let a = model.backend.download_f64(b);
        let s = &flat_s[k];
        k += 1;
        let scale = s.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{family:?}: {name} has a zero gradient");
        let err = a.iter().zip(s).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-10 * scale, "{family:?} tied={tied}: {name}: max err {err:e} vs scale {scale:e}");
    });
}

#[test]
fn llama_shared_prefix_equals_separate_sequences() {
    check(Family::Llama, false, 11);
}
#[test]
fn qwen2_tied_shared_prefix_equals_separate_sequences() {
    check(Family::Qwen2, true, 12);
}
#[test]
fn qwen3_shared_prefix_equals_separate_sequences() {
    check(Family::Qwen3, false, 13);
}
