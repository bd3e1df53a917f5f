//! AVX-512 versions of the CPU backend's element-wise f32 loops: RMSNorm and its backward,
//! SwiGLU and its backward, RoPE rotations, the residual add and the lm-head's softmax pieces.
//! The crate is built for baseline x86-64, so the generic loops in mod.rs run as scalar SSE2
//! code (and call libm's `exp`); these run 16 lanes at a time with masked tails.
//!
//! Each function here is the f32 twin of a scalar reference that stays in mod.rs / lm_head.rs
//! (the fallback on CPUs without AVX-512, and what f64 runs). Element-wise formulas keep the
//! reference's order of operations, multiplies and adds apart (no FMA), so they give its bits;
//! what differs is:
//! - `exp`: `exp512` is the attention kernel's `exp_f32` (Cephes, about 2 ulp) in 16 lanes,
//!   bit for bit, where the reference calls libm (correctly rounded or nearly so).
//! - sums over a row (RMSNorm's sum of squares and its backward's dot, the softmax's sum) are
//!   taken in 16 lanes, then the lanes in a fixed order: the bits still depend only on the row,
//!   never on threads, but not in the reference's sequential order.
//!
//! Callers check `available()` once per op and fall back to the reference when it is false.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether the AVX-512 loops can run here (AVX-512F; `IPO_CPU_PORTABLE=1` turns them off like
/// the GEMM kernels).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| super::matmul::has_simd(super::matmul::Kind::F32))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x` as the f32 slice it is, when `F` is f32 and the AVX-512 loops can run.
#[inline]
pub(crate) fn f32s<F: 'static>(x: &[F]) -> Option<&[f32]> {
    (super::is_f32::<F>() && available())
        // SAFETY: F is f32 (same type, checked above).
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

/// `x` as the mutable f32 slice it is, when `F` is f32 and the AVX-512 loops can run.
#[inline]
pub(crate) fn f32s_mut<F: 'static>(x: &mut [F]) -> Option<&mut [f32]> {
    (super::is_f32::<F>() && available())
        // SAFETY: F is f32 (same type, checked above).
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) })
}

/// The mask of the first `n.min(16)` lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        !0
    } else {
        (1u16 << n) - 1
    }
}

/// `e^x` in 16 lanes: `exp_f32` (attention/kernel.rs) step for step, so the same bits. Any
/// x up to 88 (a sigmoid needs positive arguments too); 0 below -87.3 and at -inf; NaN stays
/// NaN.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn exp512(x: __m512) -> __m512 {
    let lo = _mm512_set1_ps(-87.336_55);
    // max/min return their second operand when either is NaN: a NaN x goes through.
    let xc = _mm512_min_ps(_mm512_set1_ps(88.0), _mm512_max_ps(lo, x));
    let round = _mm512_set1_ps(12_582_912.0);
    let z = _mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)), round);
    let n = _mm512_sub_ps(z, round);
    let ni = _mm512_sub_epi32(_mm512_castps_si512(z), _mm512_castps_si512(round));
    let r = _mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693_359_4)));
    let r = _mm512_add_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(2.121_944_4e-4)));
    let mut p = _mm512_set1_ps(1.987_569_2e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
    }
    let e = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0));
    let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(ni, _mm512_set1_epi32(127))));
    let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo);
    _mm512_maskz_mul_ps(!below, e, pow2)
}

/// `exp512` on a slice, for the tests.
#[cfg(all(test, target_arch = "x86_64"))]
fn exp_slice(x: &mut [f32]) {
    unsafe {
        #[target_feature(enable = "avx512f")]
        unsafe fn go(x: &mut [f32]) {
            for c in x.chunks_mut(16) {
                let m = lanes(c.len());
                _mm512_mask_storeu_ps(c.as_mut_ptr(), m, exp512(_mm512_maskz_loadu_ps(m, c.as_ptr())));
            }
        }
        go(x)
    }
}

/// Sum of the 16 lanes in a fixed order (halves folded: 8, 4, 2, 1).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn hsum(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

/// `x += y`.
pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: callers got here through `f32s`, so AVX-512F is present; equal lengths.
    unsafe {
        #[target_feature(enable = "avx512f")]
        unsafe fn go(x: &mut [f32], y: &[f32]) {
            for (xc, yc) in x.chunks_mut(16).zip(y.chunks(16)) {
                let m = lanes(xc.len());
                let s = _mm512_add_ps(_mm512_maskz_loadu_ps(m, xc.as_ptr()), _mm512_maskz_loadu_ps(m, yc.as_ptr()));
                _mm512_mask_storeu_ps(xc.as_mut_ptr(), m, s);
            }
        }
        go(x, y)
    }
}

/// One RMSNorm row: `o = x * r * w` with `r = (sum(x^2) / dim + eps)^-1/2`, the sum in f64 (as
/// the reference); returns `r`. `x`, `w`, `o`: `[dim]`.
pub(crate) fn rmsnorm_row(x: &[f32], w: &[f32], eps: f32, o: &mut [f32]) -> f32 {
    let dim = x.len();
    assert!(w.len() >= dim && o.len() == dim);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (see `add_assign`); the lengths are asserted above.
    unsafe {
        #[target_feature(enable = "avx512f")]
        unsafe fn go(x: &[f32], w: &[f32], eps: f32, o: &mut [f32]) -> f32 {
            let dim = x.len();
            // Two f64 accumulators of 8 lanes (the low and high halves of each 16).
            let (mut s0, mut s1) = (_mm512_setzero_pd(), _mm512_setzero_pd());
            for c in x.chunks(16) {
                let v = _mm512_maskz_loadu_ps(lanes(c.len()), c.as_ptr());
                let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
                let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
                s0 = _mm512_add_pd(s0, _mm512_mul_pd(lo, lo));
                s1 = _mm512_add_pd(s1, _mm512_mul_pd(hi, hi));
            }
            let ss = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
            let r = (1.0 / (ss / dim as f64 + eps as f64).sqrt()) as f32;
            let rv = _mm512_set1_ps(r);
            for ((oc, xc), wc) in o.chunks_mut(16).zip(x.chunks(16)).zip(w.chunks(16)) {
                let m = lanes(oc.len());
                let y = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xc.as_ptr()), rv), _mm512_maskz_loadu_ps(m, wc.as_ptr()));
                _mm512_mask_storeu_ps(oc.as_mut_ptr(), m, y);
            }
            r
        }
        go(x, &w[..dim], eps, o)
    }
}

/// One row of RMSNorm's backward: `dx = r w dy - (r^3 / dim) x sum(w dy x)` and
/// `dw += dy x r`, the reference's formulas (the dot summed in 16 lanes). All `[dim]`.
pub(crate) fn rmsnorm_bwd_row(dy: &[f32], x: &[f32], w: &[f32], r: f32, dx: &mut [f32], dw: &mut [f32]) {
    let dim = dy.len();
    assert!(x.len() == dim && w.len() >= dim && dx.len() == dim && dw.len() == dim);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (see `add_assign`); the lengths are asserted above.
    unsafe {
        #[target_feature(enable = "avx512f")]
        unsafe fn go(dy: &[f32], x: &[f32], w: &[f32], r: f32, dx: &mut [f32], dw: &mut [f32]) {
            let dim = dy.len();
            let mut acc = _mm512_setzero_ps();
            for i in (0..dim).step_by(16) {
                let m = lanes(dim - i);
                let (g, xv, wv) = (_mm512_maskz_loadu_ps(m, dy.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, x.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, w.as_ptr().add(i)));
                acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_mul_ps(g, xv), wv));
            }
            let dot = hsum(acc);
            let c = _mm512_set1_ps(r * r * r * dot / dim as f32);
            let rv = _mm512_set1_ps(r);
            for i in (0..dim).step_by(16) {
                let m = lanes(dim - i);
                let (g, xv, wv) = (_mm512_maskz_loadu_ps(m, dy.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, x.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, w.as_ptr().add(i)));
                let d = _mm512_sub_ps(_mm512_mul_ps(_mm512_mul_ps(rv, wv), g), _mm512_mul_ps(c, xv));
                _mm512_mask_storeu_ps(dx.as_mut_ptr().add(i), m, d);
                let acc = _mm512_add_ps(_mm512_maskz_loadu_ps(m, dw.as_ptr().add(i)), _mm512_mul_ps(_mm512_mul_ps(g, xv), rv));
                _mm512_mask_storeu_ps(dw.as_mut_ptr().add(i), m, acc);
            }
        }
        go(dy, x, &w[..dim], r, dx, dw)
    }
}

/// `o = g * sigmoid(g) * u`, sigmoid as `1 / (1 + exp(-g))`. All the same length.
pub(crate) fn swiglu(g: &[f32], u: &[f32], o: &mut [f32]) {
    assert!(g.len() == o.len() && u.len() == o.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (see `add_assign`); equal lengths.
    unsafe {
        #[target_feature(enable = "avx512f")]
        unsafe fn go(g: &[f32], u: &[f32], o: &mut [f32]) {
            let one = _mm512_set1_ps(1.0);
            for i in (0..o.len()).step_by(16) {
                let m = lanes(o.len() - i);
                let (gv, uv) = (_mm512_maskz_loadu_ps(m, g.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, u.as_ptr().add(i)));
                let s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
                _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), m, _mm512_mul_ps(_mm512_mul_ps(gv, s), uv));
            }
        }
        go(g, u, o)
    }
}

/// SwiGLU's backward, the reference's formulas: `du = d g s`, `dg = d u (s + g s (1 - s))`.
pub(crate) fn swiglu_bwd(d: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = d.len();
    assert!(g.len() == n && u.len() == n && dg.len() == n && du.len() == n);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (see `add_assign`); equal lengths.
    unsafe {
        #[target_feature(enable = "avx512f")]
        unsafe fn go(d: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
            let one = _mm512_set1_ps(1.0);
            for i in (0..d.len()).step_by(16) {
                let m = lanes(d.len() - i);
                let (dv, gv, uv) = (_mm512_maskz_loadu_ps(m, d.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, g.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, u.as_ptr().add(i)));
                let s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
                _mm512_mask_storeu_ps(du.as_mut_ptr().add(i), m, _mm512_mul_ps(_mm512_mul_ps(dv, gv), s));
                let inner = _mm512_add_ps(s, _mm512_mul_ps(_mm512_mul_ps(gv, s), _mm512_sub_ps(one, s)));
                _mm512_mask_storeu_ps(dg.as_mut_ptr().add(i), m, _mm512_mul_ps(_mm512_mul_ps(dv, uv), inner));
            }
        }
        go(d, g, u, dg, du)
    }
}

/// RoPE on one token's row `[heads, head_dim]`: for each head, `(x1, x2) <- (x1 c - x2 s,
/// x2 c + x1 s)` with `x1` the first half, `x2` the second, `c`, `s` `[head_dim / 2]` (the
/// sine already signed for the inverse).
pub(crate) fn rope_row(row: &mut [f32], head_dim: usize, c: &[f32], s: &[f32]) {
    let half = head_dim / 2;
    assert!(c.len() >= half && s.len() >= half && row.len().is_multiple_of(head_dim));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (see `add_assign`); every head's two halves are inside `row`.
    unsafe {
        #[target_feature(enable = "avx512f")]
        unsafe fn go(row: &mut [f32], head_dim: usize, c: &[f32], s: &[f32]) {
            let half = head_dim / 2;
            for h in row.chunks_mut(head_dim) {
                let p = h.as_mut_ptr();
                for i in (0..half).step_by(16) {
                    let m = lanes(half - i);
                    let (cv, sv) = (_mm512_maskz_loadu_ps(m, c.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, s.as_ptr().add(i)));
                    let (x1, x2) = (_mm512_maskz_loadu_ps(m, p.add(i)), _mm512_maskz_loadu_ps(m, p.add(half + i)));
                    _mm512_mask_storeu_ps(p.add(i), m, _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv)));
                    _mm512_mask_storeu_ps(p.add(half + i), m, _mm512_add_ps(_mm512_mul_ps(x2, cv), _mm512_mul_ps(x1, sv)));
                }
            }
        }
        go(row, head_dim, c, s)
    }
}

/// A row of logits `[n]`: its max `m` and `sum(exp(x - m))` (16 lanes, then the lanes).
pub(crate) fn max_sumexp(x: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (see `add_assign`).
    unsafe {
        #[target_feature(enable = "avx512f")]
        unsafe fn go(x: &[f32]) -> (f32, f32) {
            let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
            for c in x.chunks(16) {
                let m = lanes(c.len());
                mv = _mm512_mask_max_ps(mv, m, mv, _mm512_maskz_loadu_ps(m, c.as_ptr()));
            }
            let mx = _mm512_reduce_max_ps(mv);
            let (mb, mut acc) = (_mm512_set1_ps(mx), _mm512_setzero_ps());
            for c in x.chunks(16) {
                let m = lanes(c.len());
                let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, c.as_ptr()), mb));
                acc = _mm512_mask_add_ps(acc, m, acc, e);
            }
            (mx, hsum(acc))
        }
        go(x)
    }
}

/// The lm-head backward's logit gradient in place: `x <- d (onehot - exp(x - l))`, with the
/// one at index `hit` (if it is in this row).
pub(crate) fn softmax_grad(x: &mut [f32], l: f32, d: f32, hit: Option<usize>) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F (see `add_assign`).
    unsafe {
        #[target_feature(enable = "avx512f")]
        unsafe fn go(x: &mut [f32], l: f32, d: f32) {
            let (lv, dv) = (_mm512_set1_ps(l), _mm512_set1_ps(d));
            for c in x.chunks_mut(16) {
                let m = lanes(c.len());
                let p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, c.as_ptr()), lv));
                _mm512_mask_storeu_ps(c.as_mut_ptr(), m, _mm512_mul_ps(dv, _mm512_sub_ps(_mm512_setzero_ps(), p)));
            }
        }
        // The target's entry is computed alone, as the reference does it.
        let t = hit.map(|j| (j, x[j]));
        go(x, l, d);
        if let Some((j, v)) = t {
            x[j] = d * (1.0 - super::attention::exp_f32(v - l));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::test_vals;

    fn vals(n: usize, seed: u64, scale: f64) -> Vec<f32> {
        test_vals(n, seed).into_iter().map(|x| (x * scale) as f32).collect()
    }

    /// Relative error of `got` against `want`, with `floor` as the smallest scale.
    fn rel(got: f32, want: f64, floor: f64) -> f64 {
        (got as f64 - want).abs() / want.abs().max(floor)
    }

    const LENS: [usize; 6] = [1, 7, 15, 17, 33, 577];

    #[test]
    fn exp512_is_exp_f32_bit_for_bit_and_within_2_ulp() {
        if !available() {
            return;
        }
        let mut x: Vec<f32> = vals(4099, 1, 100.0);
        x.extend([0.0, -0.0, f32::NEG_INFINITY, -87.0, -87.4, 88.0, 1e-30, f32::NAN]);
        let mut y = x.clone();
        exp_slice(&mut y);
        for (&a, &b) in x.iter().zip(&y) {
            let want = super::super::attention::exp_f32(a);
            assert!(b.to_bits() == want.to_bits() || (a.is_nan() && b.is_nan()), "exp({a}) = {b}, exp_f32 {want}");
            if (-87.0..=88.0).contains(&a) {
                assert!(rel(b, (a as f64).exp(), 0.0) < 2.5 * f32::EPSILON as f64, "exp({a}) = {b}");
            }
        }
    }

    #[test]
    fn rmsnorm_rows_match_f64_at_odd_lengths() {
        if !available() {
            return;
        }
        for (s, &dim) in LENS.iter().enumerate() {
            let (x, w, dy, dw0) = (vals(dim, 10 + s as u64, 3.0), vals(dim, 20 + s as u64, 1.0), vals(dim, 30 + s as u64, 1.0), vals(dim, 40 + s as u64, 1.0));
            let eps = 1e-5;
            let mut o = vec![0.0; dim];
            let r = rmsnorm_row(&x, &w, eps, &mut o);
            let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let rw = 1.0 / (ss / dim as f64 + eps as f64).sqrt();
            // r: one f64 rounding to f32; o: two f32 products.
            assert!(rel(r, rw, 0.0) < 1e-7, "dim {dim}: r {r} vs {rw}");
            for i in 0..dim {
                let want = x[i] as f64 * rw * w[i] as f64;
                assert!((o[i] as f64 - want).abs() <= 3e-7 * want.abs(), "dim {dim} [{i}]: {} vs {want}", o[i]);
            }
            let (mut dx, mut dw) = (vec![0.0; dim], dw0.clone());
            rmsnorm_bwd_row(&dy, &x, &w, r, &mut dx, &mut dw);
            let rr = r as f64;
            let dot: f64 = (0..dim).map(|i| dy[i] as f64 * x[i] as f64 * w[i] as f64).sum();
            let dot_mag: f64 = (0..dim).map(|i| (dy[i] as f64 * x[i] as f64 * w[i] as f64).abs()).sum();
            let c = rr * rr * rr * dot / dim as f64;
            // The dot's f32 sum: at most dim roundings of its magnitude.
            let c_err = rr * rr * rr * dot_mag / dim as f64 * (dim as f64 + 4.0) * 6e-8;
            for i in 0..dim {
                let want = rr * w[i] as f64 * dy[i] as f64 - c * x[i] as f64;
                let mag = (rr * w[i] as f64 * dy[i] as f64).abs() + (c * x[i] as f64).abs();
                assert!((dx[i] as f64 - want).abs() <= 4e-7 * mag + c_err * (x[i] as f64).abs(), "dim {dim} dx[{i}]: {} vs {want}", dx[i]);
                let want = dw0[i] as f64 + dy[i] as f64 * x[i] as f64 * rr;
                let mag = dw0[i].abs() as f64 + (dy[i] as f64 * x[i] as f64 * rr).abs();
                assert!((dw[i] as f64 - want).abs() <= 3e-7 * mag, "dim {dim} dw[{i}]: {} vs {want}", dw[i]);
            }
        }
    }

    #[test]
    fn swiglu_matches_f64_at_odd_lengths() {
        if !available() {
            return;
        }
        for (s, &n) in LENS.iter().enumerate() {
            let (g, u, d) = (vals(n, 50 + s as u64, 12.0), vals(n, 60 + s as u64, 2.0), vals(n, 70 + s as u64, 1.0));
            let mut o = vec![0.0; n];
            swiglu(&g, &u, &mut o);
            let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
            swiglu_bwd(&d, &g, &u, &mut dg, &mut du);
            for i in 0..n {
                let (gf, uf, df) = (g[i] as f64, u[i] as f64, d[i] as f64);
                let sg = 1.0 / (1.0 + (-gf).exp());
                // exp within 2.5 ulp, then a handful of f32 roundings: 1e-6 relative per term.
                let want = gf * sg * uf;
                assert!(rel(o[i], want, 1e-30) < 1e-6, "n {n} o[{i}]: {} vs {want}", o[i]);
                let want = df * gf * sg;
                assert!(rel(du[i], want, 1e-30) < 1e-6, "n {n} du[{i}]: {} vs {want}", du[i]);
                let want = df * uf * (sg + gf * sg * (1.0 - sg));
                let mag = (df * uf).abs() * (sg + (gf * sg * (1.0 - sg)).abs());
                assert!((dg[i] as f64 - want).abs() <= 1e-6 * mag, "n {n} dg[{i}]: {} vs {want}", dg[i]);
            }
        }
    }

    #[test]
    fn rope_row_is_the_reference_rotation() {
        if !available() {
            return;
        }
        for &(heads, hd) in &[(3usize, 2usize), (2, 14), (3, 34), (9, 64), (1, 66)] {
            let half = hd / 2;
            let x = vals(heads * hd, hd as u64, 2.0);
            let ang: Vec<f64> = (0..half).map(|i| 37.0 * 10000f64.powf(-((2 * i) as f64) / hd as f64)).collect();
            let (c, s): (Vec<f32>, Vec<f32>) = ang.iter().map(|a| (a.cos() as f32, -a.sin() as f32)).unzip();
            let mut y = x.clone();
            rope_row(&mut y, hd, &c, &s);
            for h in 0..heads {
                for i in 0..half {
                    let (x1, x2) = (x[h * hd + i], x[h * hd + half + i]);
                    // The reference's f32 operations, in its order: the same bits.
                    assert_eq!(y[h * hd + i].to_bits(), (x1 * c[i] - x2 * s[i]).to_bits(), "{heads}x{hd} [{h}, {i}]");
                    assert_eq!(y[h * hd + half + i].to_bits(), (x2 * c[i] + x1 * s[i]).to_bits(), "{heads}x{hd} [{h}, {}]", half + i);
                }
            }
        }
    }

    #[test]
    fn softmax_pieces_match_f64_at_odd_lengths() {
        if !available() {
            return;
        }
        for (s, &n) in LENS.iter().chain(&[2049]).enumerate() {
            let x = vals(n, 80 + s as u64, 20.0);
            let (m, sum) = max_sumexp(&x);
            let mw = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(m, mw, "n {n}");
            let sw: f64 = x.iter().map(|&v| (v as f64 - m as f64).exp()).sum();
            // Each term within 2.5 ulp after one rounded subtraction (exact: Sterbenz does not
            // apply, so 1 ulp of |x - m| <= 40 gives 40 * 6e-8 relative), then an f32 sum of
            // n positive terms.
            assert!(rel(sum, sw, 0.0) < 40.0 * 6e-8 + 2.5 * 1.2e-7 + n as f64 * 6e-8, "n {n}: {sum} vs {sw}");
            let (l, d) = (m + sum.ln(), 0.75f32);
            let hit = (n > 3).then_some(n / 2);
            let mut g = x.clone();
            softmax_grad(&mut g, l, d, hit);
            for i in 0..n {
                let p = (x[i] as f64 - l as f64).exp();
                let want = d as f64 * (if Some(i) == hit { 1.0 } else { 0.0 } - p);
                // exp's argument carries one f32 rounding of |x - l| <= 60: 60 * 6e-8 relative.
                assert!((g[i] as f64 - want).abs() <= (60.0 * 6e-8 + 4e-7) * p * d as f64 + 1e-7 * want.abs(), "n {n} [{i}]: {} vs {want}", g[i]);
            }
        }
    }
}
