//! The optimizer ops of the CPU reference backend (also the host reference of the trainer's
//! update, `train::optim::Optimizer::step`, through the `Backend` trait): the f64 sum of
//! squares behind the global gradient norm, and AdamW / SGD updates in place. The arithmetic is spelled out
//! operation by operation (see `backend::AdamwStep`) because kernels/optim.cu repeats it in
//! the same order with no fused multiply-adds, so the CUDA backend agrees bit for bit.

use super::{cast, Elem};
use crate::backend::AdamwStep;

/// `sum_i x[i]^2`, each square and the running sum in f64, in index order.
pub(crate) fn sum_squares<F: Elem>(x: &[F]) -> f64 {
    x.iter()
        .map(|v| {
            let v = v.to_f64().unwrap_or(f64::NAN);
            v * v
        })
        .sum()
}

/// One AdamW update in place (formula and rounding in `AdamwStep`); all slices `[n]`.
pub(crate) fn adamw<F: Elem>(p: &mut [F], g: &[F], m: &mut [F], v: &mut [F], h: &AdamwStep) {
    let n = p.len();
    assert!(g.len() == n && m.len() == n && v.len() == n, "adamw: p [{n}], g [{}], m [{}], v [{}] must have one length", g.len(), m.len(), v.len());
    let [gs, b1, b2, decay, step, bc2_sqrt, eps] = h.coefficients().map(cast::<F>);
    let (omb1, omb2) = (F::one() - b1, F::one() - b2);
    for (((w, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * gs;
        *m = b1 * *m + omb1 * g;
        *v = b2 * *v + omb2 * g * g;
        *w = *w * decay;
        *w = *w - step * *m / ((*v).sqrt() / bc2_sqrt + eps);
    }
}

/// One SGD update in place: `p -= lr * (g * grad_scale + weight_decay * p)`; p, g `[n]`.
pub(crate) fn sgd<F: Elem>(p: &mut [F], g: &[F], lr: f64, weight_decay: f64, grad_scale: f64) {
    assert_eq!(p.len(), g.len(), "sgd: p [{}] and g [{}] must have one length", p.len(), g.len());
    let (lr, wd, gs) = (cast::<F>(lr), cast::<F>(weight_decay), cast::<F>(grad_scale));
    for (w, &g) in p.iter_mut().zip(g) {
        *w = *w - lr * (g * gs + wd * *w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The update written out with the old `Optimizer::step` expressions (f32, constants via
    /// `as f32`): the refactor onto `AdamwStep` must not change a bit.
    #[test]
    fn adamw_matches_the_plain_f32_formula() {
        let h = AdamwStep { lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_scale: 0.37, bc1: 1.0 - 0.9f64.powi(3), bc2: 1.0 - 0.999f64.powi(3) };
        let n = 257;
        let f = |i: usize, a: f32, b: f32| (i as f32 * a).sin() * b;
        let (p0, g): (Vec<f32>, Vec<f32>) = ((0..n).map(|i| f(i, 0.7, 1.3)).collect(), (0..n).map(|i| f(i, 1.9, 0.8)).collect());
        let (m0, v0): (Vec<f32>, Vec<f32>) = ((0..n).map(|i| f(i, 0.3, 0.1)).collect(), (0..n).map(|i| f(i, 2.3, 0.05).abs()).collect());
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        adamw(&mut p, &g, &mut m, &mut v, &h);
        let (b1, b2, eps) = (h.beta1 as f32, h.beta2 as f32, h.eps as f32);
        let (decay, step, bc2_sqrt, gs) = ((1.0 - h.lr * h.weight_decay) as f32, (h.lr / h.bc1) as f32, h.bc2.sqrt() as f32, h.grad_scale as f32);
        for i in 0..n {
            let g = g[i] * gs;
            let mm = b1 * m0[i] + (1.0 - b1) * g;
            let vv = b2 * v0[i] + (1.0 - b2) * g * g;
            let mut w = p0[i] * decay;
            w -= step * mm / (vv.sqrt() / bc2_sqrt + eps);
            assert_eq!((p[i].to_bits(), m[i].to_bits(), v[i].to_bits()), (w.to_bits(), mm.to_bits(), vv.to_bits()), "element {i}");
        }
        assert_ne!(p, p0);
    }

    #[test]
    fn sgd_and_sum_squares() {
        let (mut p, g) = (vec![1.0f32, -2.0, 0.5], vec![0.25f32, 1.0, -4.0]);
        sgd(&mut p, &g, 0.5, 0.1, 2.0);
        let want: Vec<f32> = [(1.0f32, 0.25f32), (-2.0, 1.0), (0.5, -4.0)].iter().map(|&(w, g)| w - 0.5 * (g * 2.0 + 0.1 * w)).collect();
        assert_eq!(p, want);
        assert_eq!(sum_squares(&[3.0f32, -4.0]), 25.0);
        assert_eq!(sum_squares::<f64>(&[]), 0.0);
    }
}
