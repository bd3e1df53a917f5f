//! Finite-difference checks of every backward, in f64 (`CpuBackend<f64>`), so tolerances can
//! be tight: central differences with step 1e-5 have truncation error ~1e-10 and rounding
//! error ~1e-11 for O(1) objectives, so analytic and numeric gradients must agree to 1e-6
//! relative. Forward ops are also checked against naive loops written here.

mod common;

use common::{random_weights, tiny_config, Rng};
use ipo::backend::cpu::{CpuBackend, CpuBuf};
use ipo::backend::{AttnDims, AttnLayout, Backend, Span};
use ipo::model::config::Family;
use ipo::model::transformer::{Batch, Transformer};

type B = CpuBackend<f64>;
const EPS: f64 = 1e-5;

fn rvec(rng: &mut Rng, n: usize, scale: f64) -> CpuBuf<f64> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Checks `grad` (analytic d L / d x) against central differences of `loss` at `samples`
/// random coordinates of `x`.
fn fd_check(name: &str, x: &mut [f64], grad: &[f64], rng: &mut Rng, samples: usize, mut loss: impl FnMut(&[f64]) -> f64) {
    assert_eq!(x.len(), grad.len(), "{name}");
    for _ in 0..samples {
        let i = rng.below(x.len());
        let orig = x[i];
        x[i] = orig + EPS;
        let lp = loss(x);
        x[i] = orig - EPS;
        let lm = loss(x);
        x[i] = orig;
        let fd = (lp - lm) / (2.0 * EPS);
        let tol = 1e-6 * (1.0 + grad[i].abs().max(fd.abs()));
        assert!((fd - grad[i]).abs() <= tol, "{name}[{i}]: analytic {} vs numeric {fd}", grad[i]);
    }
}

#[test]
fn matmul_all_transposes_match_naive() {
    let be = B::new();
    let mut rng = Rng(1);
    let (m, n, k) = (37, 29, 53);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = rvec(&mut rng, m * k, 1.0);
        let b = rvec(&mut rng, k * n, 1.0);
        let c0 = rvec(&mut rng, m * n, 1.0);
        for acc in [false, true] {
            let mut c = c0.clone();
            be.matmul(&a, ta, &b, tb, &mut c, m, n, k, acc);
            for i in 0..m {
                for j in 0..n {
                    let mut s = if acc { c0[i * n + j] } else { 0.0 };
                    for p in 0..k {
                        let av = if ta { a[p * m + i] } else { a[i * k + p] };
                        let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                        s += av * bv;
                    }
                    assert!((s - c[i * n + j]).abs() < 1e-10, "ta={ta} tb={tb} acc={acc} ({i},{j})");
                }
            }
        }
    }
}

#[test]
fn rmsnorm_forward_and_backward() {
    let be = B::new();
    let mut rng = Rng(2);
    let (rows, dim) = (23, 19);
    let mut x = rvec(&mut rng, rows * dim, 1.5);
    let mut w = rvec(&mut rng, dim, 1.0);
    let r = rvec(&mut rng, rows * dim, 1.0);
    let run = |x: &[f64], w: &[f64]| {
        let (mut y, mut rs) = (CpuBuf::from(vec![0.0; rows * dim]), CpuBuf::from(vec![0.0; rows]));
        be.rmsnorm(&CpuBuf::from(x.to_vec()), &CpuBuf::from(w.to_vec()), dim, 1e-5, &mut y, &mut rs);
        (y, rs)
    };
    let (y, rs) = run(&x, &w);
    for i in 0..rows {
        let row = &x[i * dim..(i + 1) * dim];
        let inv = 1.0 / (dot(row, row) / dim as f64 + 1e-5).sqrt();
        for j in 0..dim {
            assert!((y[i * dim + j] - row[j] * inv * w[j]).abs() < 1e-12);
        }
    }
    let (mut dx, mut dw) = (CpuBuf::from(vec![f64::NAN; rows * dim]), CpuBuf::from(vec![0.25; dim]));
    be.rmsnorm_bwd(&r, &x, &w, &rs, dim, &mut dx, &mut dw);
    dw.iter_mut().for_each(|v| *v -= 0.25); // accumulates into what was there
    let wc = w.clone();
    fd_check("rmsnorm dx", &mut x, &dx, &mut rng, 40, |x| dot(&run(x, &wc).0, &r));
    let xc = x.clone();
    fd_check("rmsnorm dw", &mut w, &dw, &mut rng, 19, |w| dot(&run(&xc, w).0, &r));
}

#[test]
fn bias_embedding_swiglu_backward() {
    let be = B::new();
    let mut rng = Rng(3);
    let (rows, dim, vocab) = (11, 7, 13);
    // bias
    let y0 = rvec(&mut rng, rows * dim, 1.0);
    let mut b = rvec(&mut rng, dim, 1.0);
    let r = rvec(&mut rng, rows * dim, 1.0);
    let mut db = CpuBuf::from(vec![0.0; dim]);
    be.bias_bwd(&r, dim, &mut db);
    fd_check("bias", &mut b, &db, &mut rng, 7, |b| {
        let mut y = y0.clone();
        be.bias_add(&mut y, &CpuBuf::from(b.to_vec()), dim);
        dot(&y, &r)
    });
    // embedding (repeated ids accumulate)
    let ids: Vec<u32> = (0..rows).map(|i| (i % 5) as u32 * 2).collect();
    let mut table = rvec(&mut rng, vocab * dim, 1.0);
    let mut dt = CpuBuf::from(vec![0.0; vocab * dim]);
    be.embedding_bwd(&r, &ids, dim, &mut dt);
    fd_check("embedding", &mut table, &dt, &mut rng, 40, |t| {
        let mut out = CpuBuf::from(vec![0.0; rows * dim]);
        be.embedding(&CpuBuf::from(t.to_vec()), &ids, dim, &mut out);
        dot(&out, &r)
    });
    // swiglu
    let mut gate = rvec(&mut rng, rows * dim, 2.0);
    let mut up = rvec(&mut rng, rows * dim, 1.0);
    let (mut dg, mut du) = (CpuBuf::from(vec![0.0; rows * dim]), CpuBuf::from(vec![0.0; rows * dim]));
    be.swiglu_bwd(&r, &gate, &up, &mut dg, &mut du);
    let upc = up.clone();
    let f = |g: &[f64], u: &[f64]| {
        let mut o = CpuBuf::from(vec![0.0; rows * dim]);
        be.swiglu(&CpuBuf::from(g.to_vec()), &CpuBuf::from(u.to_vec()), &mut o);
        dot(&o, &r)
    };
    fd_check("swiglu dgate", &mut gate, &dg, &mut rng, 40, |g| f(g, &upc));
    let gc = gate.clone();
    fd_check("swiglu dup", &mut up, &du, &mut rng, 40, |u| f(&gc, u));
}

#[test]
fn rope_matches_rotate_half_and_inverse_is_backward() {
    let be = B::new();
    let mut rng = Rng(4);
    let (t, nh, hd) = (9, 3, 8);
    let cfg = tiny_config(Family::Llama, false);
    let inv: Vec<f64> = cfg.rope_inv_freq()[..hd / 2].to_vec();
    let pos: Vec<u32> = (0..t as u32).map(|p| p * 7 + 3).collect();
    let mut x = rvec(&mut rng, t * nh * hd, 1.0);
    let mut y = x.clone();
    be.rope(&mut y, &pos, nh, hd, &inv, false);
    for ti in 0..t {
        for h in 0..nh {
            for i in 0..hd {
                let a = pos[ti] as f64 * inv[i % (hd / 2)];
                let base = (ti * nh + h) * hd;
                // HF: q * cos + rotate_half(q) * sin, rotate_half = cat(-x2, x1)
                let rot = if i < hd / 2 { -x[base + i + hd / 2] } else { x[base + i - hd / 2] };
                let want = x[base + i] * a.cos() + rot * a.sin();
                assert!((y[base + i] - want).abs() < 1e-12);
            }
        }
    }
    let r = rvec(&mut rng, t * nh * hd, 1.0);
    let mut g = r.clone();
    be.rope(&mut g, &pos, nh, hd, &inv, true);
    fd_check("rope", &mut x, &g, &mut rng, 40, |x| {
        let mut y = CpuBuf::from(x.to_vec());
        be.rope(&mut y, &pos, nh, hd, &inv, false);
        dot(&y, &r)
    });
}

/// A layout with two plain sequences and a [context | chosen | rejected] pair.
fn mixed_layout() -> AttnLayout {
    let mut l = AttnLayout::sequences(&[5, 1]);
    l.spans.push(Span { start: 6, len: 4, prefix_start: 6, prefix_len: 0 });
    l.spans.push(Span { start: 10, len: 3, prefix_start: 6, prefix_len: 4 });
    l.spans.push(Span { start: 13, len: 2, prefix_start: 6, prefix_len: 4 });
    l
}

#[test]
fn attention_matches_naive_and_backward() {
    let be = B::new();
    let mut rng = Rng(5);
    let dims = AttnDims { n_heads: 4, n_kv_heads: 2, head_dim: 6 };
    let layout = mixed_layout();
    let t = layout.num_tokens();
    let (qd, kvd) = (dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim);
    let mut q = rvec(&mut rng, t * qd, 1.0);
    let mut k = rvec(&mut rng, t * kvd, 1.0);
    let mut v = rvec(&mut rng, t * kvd, 1.0);
    let run = |q: &[f64], k: &[f64], v: &[f64]| {
        let (mut o, mut lse) = (CpuBuf::from(vec![f64::NAN; t * qd]), CpuBuf::from(vec![f64::NAN; t * dims.n_heads]));
        be.attention(&CpuBuf::from(q.to_vec()), &CpuBuf::from(k.to_vec()), &CpuBuf::from(v.to_vec()), &layout, dims, &mut o, &mut lse);
        (o, lse)
    };
    let (o, lse) = run(&q, &k, &v);
    // naive: explicit visibility sets
    let hd = dims.head_dim;
    let scale = 1.0 / (hd as f64).sqrt();
    for s in &layout.spans {
        for j in 0..s.len {
            let qi = s.start + j;
            let keys: Vec<usize> = (s.prefix_start..s.prefix_start + s.prefix_len).chain(s.start..=qi).collect();
            for h in 0..dims.n_heads {
                let kvh = h / (dims.n_heads / dims.n_kv_heads);
                let sc: Vec<f64> = keys.iter().map(|&kj| scale * dot(&q[qi * qd + h * hd..][..hd], &k[kj * kvd + kvh * hd..][..hd])).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                assert!((lse[qi * dims.n_heads + h] - (m + z.ln())).abs() < 1e-12);
                for d in 0..hd {
                    let want: f64 = keys.iter().zip(&sc).map(|(&kj, &x)| (x - m).exp() / z * v[kj * kvd + kvh * hd + d]).sum();
                    assert!((o[qi * qd + h * hd + d] - want).abs() < 1e-12, "out[{qi},{h},{d}]");
                }
            }
        }
    }
    let r = rvec(&mut rng, t * qd, 1.0);
    let (mut dq, mut dk, mut dv) = (CpuBuf::from(vec![f64::NAN; t * qd]), CpuBuf::from(vec![f64::NAN; t * kvd]), CpuBuf::from(vec![f64::NAN; t * kvd]));
    be.attention_bwd(&r, &q, &k, &v, &o, &lse, &layout, dims, &mut dq, &mut dk, &mut dv);
    let (kc, vc) = (k.clone(), v.clone());
    fd_check("attention dq", &mut q, &dq, &mut rng, 60, |q| dot(&run(q, &kc, &vc).0, &r));
    let qc = q.clone();
    fd_check("attention dk", &mut k, &dk, &mut rng, 60, |k| dot(&run(&qc, k, &vc).0, &r));
    let kc = k.clone();
    fd_check("attention dv", &mut v, &dv, &mut rng, 60, |v| dot(&run(&qc, &kc, v).0, &r));
}

#[test]
fn lm_head_matches_full_softmax_and_backward() {
    let be = B::new();
    let mut rng = Rng(6);
    // vocab > one tile (4096) and rows > one chunk (64), with repeated rows.
    let (tokens, dim, vocab) = (50, 6, 4500);
    let mut h = rvec(&mut rng, tokens * dim, 1.0);
    let mut w = rvec(&mut rng, vocab * dim, 1.0);
    let rows: Vec<u32> = (0..70).map(|i| (i * 7 % tokens) as u32).collect();
    let targets: Vec<u32> = (0..70).map(|_| rng.below(vocab) as u32).collect();
    let (logp, lse) = be.lm_head_logprobs(&h, &w, dim, &rows, &targets);
    for (i, &r) in rows.iter().enumerate() {
        let hr = &h[r as usize * dim..][..dim];
        let logits: Vec<f64> = (0..vocab).map(|v| dot(hr, &w[v * dim..][..dim])).collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        assert!((lse[i] - z).abs() < 1e-10);
        assert!((logp[i] - (logits[targets[i] as usize] - z)).abs() < 1e-10);
    }
    let dl: Vec<f32> = (0..70).map(|_| rng.normal() as f32).collect();
    let (mut dh, mut dw) = (CpuBuf::from(vec![0.0; tokens * dim]), CpuBuf::from(vec![0.0; vocab * dim]));
    be.lm_head_bwd(&h, &w, dim, &rows, &targets, &lse, &dl, &mut dh, Some(&mut dw));
    let dlf: Vec<f64> = dl.iter().map(|&x| x as f64).collect();
    let wc = w.clone();
    fd_check("lm_head dh", &mut h, &dh, &mut rng, 30, |h| dot(&be.lm_head_logprobs(&CpuBuf::from(h.to_vec()), &wc, dim, &rows, &targets).0, &dlf));
    let hc = h.clone();
    // Sample w rows that are targets (large gradients) as well as random ones.
    for &t in targets.iter().take(5) {
        let i = t as usize * dim + rng.below(dim);
        let mut one = w.clone();
        let f = |ww: &[f64]| dot(&be.lm_head_logprobs(&hc, &CpuBuf::from(ww.to_vec()), dim, &rows, &targets).0, &dlf);
        one[i] += EPS;
        let lp = f(&one);
        one[i] -= 2.0 * EPS;
        let lm = f(&one);
        let fd = (lp - lm) / (2.0 * EPS);
        assert!((fd - dw[i]).abs() <= 1e-6 * (1.0 + fd.abs()), "lm_head dw[{i}]: {} vs {fd}", dw[i]);
    }
    fd_check("lm_head dw", &mut w, &dw, &mut rng, 20, |w| dot(&be.lm_head_logprobs(&hc, &CpuBuf::from(w.to_vec()), dim, &rows, &targets).0, &dlf));
}

/// Whole model: two plain sequences and one shared-context pair, objective = random-weighted
/// sum of target log-probs; every parameter tensor is probed at several entries.
fn whole_model(family: Family, tied: bool, seed: u64) {
    let mut rng = Rng(seed);
    let cfg = tiny_config(family, tied);
    let host = random_weights(&cfg, &mut rng);
    let mut model = Transformer::with_backend(B::new(), cfg.clone(), host).unwrap();
    let mut batch = Batch::default();
    let (a, b) = (rng.ids(9, cfg.vocab_size), rng.ids(6, cfg.vocab_size));
    batch.push_scored(&a[..3], &a[3..]);
    batch.push_scored(&b[..1], &b[1..]);
    let (ctx, ch, rj) = (rng.ids(5, cfg.vocab_size), rng.ids(4, cfg.vocab_size), rng.ids(3, cfg.vocab_size));
    batch.push_pair(&ctx, &ch, &rj);
    let wts: Vec<f64> = (0..batch.rows.len()).map(|_| rng.normal()).collect();
    let dl: Vec<f32> = wts.iter().map(|&x| x as f32).collect();
    let wts: Vec<f64> = dl.iter().map(|&x| x as f64).collect();
    let (logp, tape) = model.forward(&batch).unwrap();
    assert!(logp.iter().all(|x| x.is_finite() && *x < 0.0));
    let mut grads = model.zero_grads();
    model.backward(&batch, tape, &dl, &mut grads);
    let mut flat = Vec::new();
    grads.for_each(|n, g| flat.push((n.to_string(), g.clone())));
    for (ti, (name, g)) in flat.iter().enumerate() {
        assert!(g.iter().any(|&x| x != 0.0), "{family:?}: gradient of {name} is all zero");
        for _ in 0..4 {
            let i = rng.below(g.len());
            let mut eval = |delta: f64| {
                let mut idx = 0;
                model.weights.for_each_mut(|_, w| {
                    if idx == ti {
                        w[i] += delta;
                    }
                    idx += 1;
                });
                let l = dot(&model.forward(&batch).unwrap().0, &wts);
                let mut idx = 0;
                model.weights.for_each_mut(|_, w| {
                    if idx == ti {
                        w[i] -= delta;
                    }
                    idx += 1;
                });
                l
            };
            let fd = (eval(EPS) - eval(-EPS)) / (2.0 * EPS);
            assert!((fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()), "{family:?} tied={tied}: {name}[{i}] analytic {} vs numeric {fd}", g[i]);
        }
    }
}

#[test]
fn whole_model_llama_untied() {
    whole_model(Family::Llama, false, 11);
}
#[test]
fn whole_model_llama_tied() {
    whole_model(Family::Llama, true, 12);
}
#[test]
fn whole_model_qwen2_tied() {
    whole_model(Family::Qwen2, true, 13);
}
#[test]
fn whole_model_qwen2_untied() {
    whole_model(Family::Qwen2, false, 14);
}
#[test]
fn whole_model_qwen3_untied() {
    whole_model(Family::Qwen3, false, 15);
}
#[test]
fn whole_model_qwen3_tied() {
    whole_model(Family::Qwen3, true, 16);
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let mut rng = Rng(17);
    let cfg = tiny_config(Family::Llama, false);
    let model = Transformer::with_backend(B::new(), cfg.clone(), random_weights(&cfg, &mut rng)).unwrap();
    let bad_id = Batch::from_sequences(&[&[1, 2, cfg.vocab_size as u32]]);
    let e = model.forward(&bad_id).err().expect("id >= vocab must fail").to_string();
    assert!(e.contains("97") && e.contains(">= vocab_size"), "{e}");
    let long: Vec<u32> = (0..cfg.max_position_embeddings as u32 + 1).map(|i| i % 50).collect();
    let e = model.forward(&Batch::from_sequences(&[&long])).err().expect("too long must fail").to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
    let e = model.score(&[ipo::model::transformer::ScoreItem { context: &[], target: &[3] }], 100).err().unwrap().to_string();
    assert!(e.contains("empty context"), "{e}");
}
