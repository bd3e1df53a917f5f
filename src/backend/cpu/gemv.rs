//! Small-batch products against a weight stored `[n, k]` (the layout of every projection and of
//! the lm head): `c[i, j] (+)= a[i, :] . b[j, :]` for the handful of rows of a decode step.
//! The `gemm` crate packs `b` on every call, which moves more memory than the product itself
//! when `m` is small; here every weight row is read once, straight from the weights, and
//! dotted with each row of `a` (which stays in L1). The decode team (team.rs) splits the weight
//! rows.

use super::{team, Elem, SendPtr};

/// Rows of `a` up to which `matmul` (with `b` transposed) takes this path.
pub(crate) const MAX_ROWS: usize = 8;

/// `x . y` in 4 x 8 independent partial sums (vectorisable), combined pairwise, then the
/// tail: the portable version (f64, and f32 without AVX2 + FMA).
#[inline(always)]
pub(crate) fn dot_generic<F: Elem>(x: &[F], y: &[F]) -> F {
    const LANES: usize = 32;
    let mut acc = [F::zero(); LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            let v = acc[l + w];
            acc[l] += v;
        }
    }
    xr.iter().zip(yr).fold(acc[0], |s, (&a, &b)| s + a * b)
}

/// f32 `x . y` with AVX2 + FMA: 4 accumulators of 8 lanes (one would serialise on the FMA
/// latency), summed pairwise, then the tail.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` and `y` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_f32_avx2(x: &[f32], y: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let (px, py) = (x.as_ptr(), y.as_ptr());
    let mut s = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (r, acc) in s.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i + 8 * r)), _mm256_loadu_ps(py.add(i + 8 * r)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        s[0] = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)), s[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    let mut r = _mm_cvtss_f32(h);
    while i < n {
        r += *px.add(i) * *py.add(i);
        i += 1;
    }
    r
}

/// `c[m, n] (+)= a[m, k] @ b[n, k]^T`, all row-major, `m <= MAX_ROWS`.
pub(crate) fn matmul_bt<F: Elem>(a: &[F], b: &[F], c: &mut [F], m: usize, n: usize, k: usize, accumulate: bool) {
    debug_assert!(m <= MAX_ROWS);
    products(c, m, n, accumulate, |j, i| F::dot(&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]));
}

/// `c[m, n] (+)= a[m, k] @ W^T` for `m <= MAX_ROWS` with `W` read as `row_dot(j, i)` =
/// `W[j, :] . a[i, :]` (the bf16 and 8-bit decode paths; f32 `a` and `c`).
pub(crate) fn matmul_bt_with(c: &mut [f32], m: usize, n: usize, accumulate: bool, row_dot: impl Fn(usize, usize) -> f32 + Sync) {
    debug_assert!(m <= MAX_ROWS);
    products(c, m, n, accumulate, row_dot);
}

/// `c[i, j] (+)= row_dot(j, i)` with the weight rows `j` split into tasks of the decode team
/// (team.rs), about 16 per thread (a task reads 4-256 rows). Each entry is one `row_dot`,
/// whichever thread computes it.
fn products<F: Elem>(c: &mut [F], m: usize, n: usize, accumulate: bool, row_dot: impl Fn(usize, usize) -> F + Sync) {
    let rows = (n / (16 * rayon::current_num_threads())).clamp(4, 256);
    let cp = SendPtr(c.as_mut_ptr());
    let task = |t: usize| {
        for j in t * rows..((t + 1) * rows).min(n) {
            for i in 0..m {
                let v = row_dot(j, i);
                // SAFETY: c holds [m, n] (asserted by the caller); entry (i, j) is this task's.
                let o = unsafe { &mut *cp.get().add(i * n + j) };
                *o = if accumulate { *o + v } else { v };
            }
        }
    };
    assert!(c.len() >= m * n);
    team::for_each(n.div_ceil(rows), task);
}

/// Activation rows rounded to bf16 for `dot_bf16`: each row padded with zeros to a multiple of
/// 32 (`bf16_stride(k)` entries).
pub(crate) fn bf16_rows(a: &[f32], m: usize, k: usize) -> Vec<u16> {
    let stride = bf16_stride(k);
    let mut out = vec![0u16; m * stride];
    for i in 0..m {
        for (o, &x) in out[i * stride..i * stride + k].iter_mut().zip(&a[i * k..(i + 1) * k]) {
            *o = super::matmul::bf16_bits(x);
        }
    }
    out
}

pub(crate) fn bf16_stride(k: usize) -> usize {
    k.next_multiple_of(32)
}

/// `w . x` of a bf16 weight row (`k` entries) and a bf16 activation row (`x` zero-padded to
/// `bf16_stride(k)`): products exact, summed in f32 (`vdpbf16ps` where the CPU has it).
#[inline]
pub(crate) fn dot_bf16(w: &[u16], x: &[u16]) -> f32 {
    debug_assert!(x.len() >= bf16_stride(w.len()));
    #[cfg(target_arch = "x86_64")]
    if super::matmul::has_simd(super::matmul::Kind::Bf16) {
        // SAFETY: AVX-512F/BW/BF16 are present (has_simd checks BF16, which implies BW on
        // every CPU that has it; checked again here); x is padded to whole 32-entry chunks.
        if std::arch::is_x86_feature_detected!("avx512bw") {
            return unsafe { dot_bf16_avx512(w, x) };
        }
    }
    let f = |b: u16| f32::from_bits((b as u32) << 16);
    w.iter().zip(x).map(|(&a, &b)| f(a) * f(b)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_bf16_avx512(w: &[u16], x: &[u16]) -> f32 {
    use std::arch::x86_64::*;
    let k = w.len();
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 128 <= k {
        for (r, a) in acc.iter_mut().enumerate() {
            let wv: __m512bh = std::mem::transmute(_mm512_loadu_si512(pw.add(i + 32 * r) as *const _));
            let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(px.add(i + 32 * r) as *const _));
            *a = _mm512_dpbf16_ps(*a, wv, xv);
        }
        i += 128;
    }
    while i < k {
        // The weight row ends where it ends (masked load); x is padded.
        let left = (k - i).min(32);
        let mask: __mmask32 = if left == 32 { !0 } else { (1u32 << left) - 1 };
        let wv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, pw.add(i) as *const i16));
        let xv: __m512bh = std::mem::transmute(_mm512_loadu_si512(px.add(i) as *const _));
        acc[0] = _mm512_dpbf16_ps(acc[0], wv, xv);
        i += 32;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_vals as vals;

    /// Against an f64 reference, every row count of the path, odd lengths (SIMD tails), both
    /// modes: f64 to 1e-13 relative, f32 to k f32 roundings of the magnitude.
    #[test]
    fn matches_reference_at_odd_shapes() {
        for &(n, k) in &[(1, 1), (5, 7), (67, 33), (130, 581)] {
            for m in 1..=MAX_ROWS {
                for acc in [false, true] {
                    let (a, b, c0) = (vals(m * k, 1 + m as u64), vals(n * k, 2 + k as u64), vals(m * n, 3));
                    let mut want = if acc { c0.clone() } else { vec![0.0; m * n] };
                    for i in 0..m {
                        for j in 0..n {
                            want[i * n + j] += (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum::<f64>();
                        }
                    }
                    let mag = |i: usize, j: usize| (0..k).map(|p| (a[i * k + p] * b[j * k + p]).abs()).sum::<f64>() + c0[i * n + j].abs();
                    let mut c = if acc { c0.clone() } else { vec![f64::NAN; m * n] };
                    matmul_bt(&a, &b, &mut c, m, n, k, acc);
                    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                    let mut c32 = if acc { f(&c0) } else { vec![f32::NAN; m * n] };
                    matmul_bt(&f(&a), &f(&b), &mut c32, m, n, k, acc);
                    for i in 0..m {
                        for j in 0..n {
                            let (w, g, g32) = (want[i * n + j], c[i * n + j], c32[i * n + j] as f64);
                            assert!((g - w).abs() <= 1e-13 * mag(i, j), "f64 m{m} n{n} k{k} acc{acc} ({i},{j}): {g} vs {w}");
                            assert!((g32 - w).abs() <= (k as f64 + 2.0) * 1.2e-7 * mag(i, j), "f32 m{m} n{n} k{k} acc{acc} ({i},{j}): {g32} vs {w}");
                        }
                    }
                }
            }
        }
    }
}
