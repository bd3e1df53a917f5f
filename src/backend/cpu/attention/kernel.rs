//! The inner loops of the tiled attention: one small matrix product, a vectorisable `exp`,
//! and the choice of instruction set.
//!
//! Every product the tiles need is `c[i, j] += sum_p a[i, p] * b[p, j]` with the rows of `b`
//! and `c` contiguous and `a` read one scalar at a time (any strides), so the keys/values can
//! be read in place (packed rows or cache blocks) and transposes cost nothing. Each element
//! of `c` is one multiply-add chain in `p` order, started from the value in `c`: the bits do
//! not depend on how rows and columns are blocked, and splitting `p` over several calls gives
//! the same bits as one call. That is what makes the attention results independent of the
//! query blocking, the cache's block size and the thread count.
//!
//! The loops are written over fixed-size arrays so LLVM vectorises them; they are compiled
//! three times (AVX-512, AVX2 + FMA, baseline x86-64 or other targets) behind
//! `#[target_feature]` entry points in the parent module, chosen once at run time.

use super::super::Elem;
use std::any::TypeId;

/// The instruction set the attention loops were compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// The best instruction set of this CPU, detected once. `IPO_CPU_ATTN_ISA=avx2|portable`
/// caps it (to test the other paths on one machine). The bits of the results depend only on
/// whether the chosen set has FMA, never on the thread count.
pub(super) fn isa() -> Isa {
    use std::sync::OnceLock;
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("IPO_CPU_ATTN_ISA").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if (cap.is_empty() || cap == "avx512") && has!("avx512f") && has!("avx512vl") && has!("avx2") && has!("fma") {
                return Isa::Avx512;
            }
            if cap != "portable" && has!("avx2") && has!("fma") {
                return Isa::Avx2;
            }
        }
        let _ = cap;
        Isa::Portable
    })
}

/// The register blocking and multiply-add of one instruction set.
pub(super) trait Kern: Copy {
    /// `c[i, j] = c[i, j] + sum_p a[i * a_rs + p * a_cs] * b[p * b_rs + j]` for `i < m`,
    /// `j < n`, `p < k`, as one multiply-add chain per element in `p` order.
    ///
    /// # Safety
    /// Every element named above must be in bounds of its allocation, and `c` must not
    /// overlap `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn mm<F: Elem>(m: usize, n: usize, k: usize, a: *const F, a_rs: usize, a_cs: usize, b: *const F, b_rs: usize, c: *mut F, c_rs: usize);

    /// An 8 x 8 transpose: `dst[dd * stride + j] = src[j][d0 + dd] * scale` (`dst` starts at
    /// the block's first element).
    #[inline(always)]
    fn transpose8<F: Elem>(src: &[&[F]; 8], d0: usize, scale: F, dst: &mut [F], stride: usize) {
        transpose8_scalar(src, d0, scale, dst, stride)
    }
}

#[inline(always)]
fn transpose8_scalar<F: Elem>(src: &[&[F]; 8], d0: usize, scale: F, dst: &mut [F], stride: usize) {
    for dd in 0..8 {
        for j in 0..8 {
            dst[dd * stride + j] = src[j][d0 + dd] * scale;
        }
    }
}

/// `transpose8` for f32 with AVX shuffles (the usual unpack / shuffle / permute of eight
/// rows); other scalars in scalar code. Inlined only into code compiled with AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose8_avx<F: Elem>(src: &[&[F]; 8], d0: usize, scale: F, dst: &mut [F], stride: usize) {
    use std::arch::x86_64::*;
    if TypeId::of::<F>() != TypeId::of::<f32>() {
        return transpose8_scalar(src, d0, scale, dst, stride);
    }
    let rows: [&[F]; 8] = std::array::from_fn(|j| &src[j][d0..d0 + 8]);
    let dst = &mut dst[..7 * stride + 8];
    // SAFETY: F is f32 (checked above); every row slice holds 8 values and dst holds rows
    // dd * stride .. + 8 for dd < 8 (both bounds-checked just above); the callers run this
    // only where AVX is enabled (the Avx2 and Avx512 paths).
    unsafe {
        let s = _mm256_set1_ps(*(&scale as *const F as *const f32));
        let r: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(rows[j].as_ptr() as *const f32));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let o = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        let d = dst.as_mut_ptr() as *mut f32;
        for (dd, v) in o.into_iter().enumerate() {
            _mm256_storeu_ps(d.add(dd * stride), _mm256_mul_ps(v, s));
        }
    }
}

#[derive(Clone, Copy)]
pub(super) struct Avx512;
#[derive(Clone, Copy)]
pub(super) struct Avx2;
#[derive(Clone, Copy)]
pub(super) struct Portable;

// Register blocks (rows x columns of `c` held in registers), f32: AVX-512 4 x 32 = 8 zmm
// accumulators (enough independent chains to hide the FMA latency), AVX2 4 x 16 = 8 ymm,
// SSE2 4 x 8 = 8 xmm; 8-column blocks (the scores of a decode step: a few query rows) take
// 8 rows where registers allow. Each set is one out-of-line function compiled for it, called
// from the tile loops compiled for the same set.
impl Kern for Avx512 {
    #[inline(always)]
    unsafe fn mm<F: Elem>(m: usize, n: usize, k: usize, a: *const F, a_rs: usize, a_cs: usize, b: *const F, b_rs: usize, c: *mut F, c_rs: usize) {
        mm_avx512(m, n, k, a, a_rs, a_cs, b, b_rs, c, c_rs)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn transpose8<F: Elem>(src: &[&[F]; 8], d0: usize, scale: F, dst: &mut [F], stride: usize) {
        transpose8_avx(src, d0, scale, dst, stride)
    }
}
impl Kern for Avx2 {
    #[inline(always)]
    unsafe fn mm<F: Elem>(m: usize, n: usize, k: usize, a: *const F, a_rs: usize, a_cs: usize, b: *const F, b_rs: usize, c: *mut F, c_rs: usize) {
        mm_avx2(m, n, k, a, a_rs, a_cs, b, b_rs, c, c_rs)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn transpose8<F: Elem>(src: &[&[F]; 8], d0: usize, scale: F, dst: &mut [F], stride: usize) {
        transpose8_avx(src, d0, scale, dst, stride)
    }
}
impl Kern for Portable {
    #[inline(always)]
    unsafe fn mm<F: Elem>(m: usize, n: usize, k: usize, a: *const F, a_rs: usize, a_cs: usize, b: *const F, b_rs: usize, c: *mut F, c_rs: usize) {
        mm_impl::<F, 4, 8, 8, 4, false>(m, n, k, a, a_rs, a_cs, b, b_rs, c, c_rs)
    }
}

/// # Safety
/// As `Kern::mm`, on a CPU with these features.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn mm_avx512<F: Elem>(m: usize, n: usize, k: usize, a: *const F, a_rs: usize, a_cs: usize, b: *const F, b_rs: usize, c: *mut F, c_rs: usize) {
    mm_impl::<F, 4, 32, 8, 8, true>(m, n, k, a, a_rs, a_cs, b, b_rs, c, c_rs)
}

/// # Safety
/// As `Kern::mm`, on a CPU with these features.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn mm_avx2<F: Elem>(m: usize, n: usize, k: usize, a: *const F, a_rs: usize, a_cs: usize, b: *const F, b_rs: usize, c: *mut F, c_rs: usize) {
    mm_impl::<F, 4, 16, 8, 8, true>(m, n, k, a, a_rs, a_cs, b, b_rs, c, c_rs)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn mm_avx512<F: Elem>(m: usize, n: usize, k: usize, a: *const F, a_rs: usize, a_cs: usize, b: *const F, b_rs: usize, c: *mut F, c_rs: usize) {
    mm_impl::<F, 4, 8, 8, 4, false>(m, n, k, a, a_rs, a_cs, b, b_rs, c, c_rs)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn mm_avx2<F: Elem>(m: usize, n: usize, k: usize, a: *const F, a_rs: usize, a_cs: usize, b: *const F, b_rs: usize, c: *mut F, c_rs: usize) {
    mm_impl::<F, 4, 8, 8, 4, false>(m, n, k, a, a_rs, a_cs, b, b_rs, c, c_rs)
}

#[inline(always)]
fn madd<F: Elem, const FMA: bool>(a: F, b: F, c: F) -> F {
    // With FMA compiled in, `mul_add` is one instruction; without, it would be a libm call.
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Column blocks of `NR` (rows by `MR`), then of 8 (rows by `MR8`), then single columns.
///
/// # Safety
/// As `Kern::mm` (so for `cols` and `block`, on their part of the product).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn mm_impl<F: Elem, const MR: usize, const NR: usize, const NR8: usize, const MR8: usize, const FMA: bool>(
    m: usize, n: usize, k: usize, a: *const F, a_rs: usize, a_cs: usize, b: *const F, b_rs: usize, c: *mut F, c_rs: usize,
) {
    let mut j = 0;
    while j + NR <= n {
        cols::<F, MR, NR, FMA>(m, k, a, a_rs, a_cs, b.add(j), b_rs, c.add(j), c_rs);
        j += NR;
    }
    while j + NR8 <= n {
        cols::<F, MR8, NR8, FMA>(m, k, a, a_rs, a_cs, b.add(j), b_rs, c.add(j), c_rs);
        j += NR8;
    }
    while j < n {
        cols::<F, MR, 1, FMA>(m, k, a, a_rs, a_cs, b.add(j), b_rs, c.add(j), c_rs);
        j += 1;
    }
}

/// Rows in blocks of `MR` (4 or 8), the rest in one block of up to 3 (after one of 4).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn cols<F: Elem, const MR: usize, const NR: usize, const FMA: bool>(
    m: usize, k: usize, a: *const F, a_rs: usize, a_cs: usize, b: *const F, b_rs: usize, c: *mut F, c_rs: usize,
) {
    let mut i = 0;
    while i + MR <= m {
        block::<F, MR, NR, FMA>(k, a.add(i * a_rs), a_rs, a_cs, b, b_rs, c.add(i * c_rs), c_rs);
        i += MR;
    }
    if m - i >= 4 {
        block::<F, 4, NR, FMA>(k, a.add(i * a_rs), a_rs, a_cs, b, b_rs, c.add(i * c_rs), c_rs);
        i += 4;
    }
    let (a, c) = (a.add(i * a_rs), c.add(i * c_rs));
    match m - i {
        1 => block::<F, 1, NR, FMA>(k, a, a_rs, a_cs, b, b_rs, c, c_rs),
        2 => block::<F, 2, NR, FMA>(k, a, a_rs, a_cs, b, b_rs, c, c_rs),
        3 => block::<F, 3, NR, FMA>(k, a, a_rs, a_cs, b, b_rs, c, c_rs),
        _ => {}
    }
}

/// One `MR x NR` block of `c`, held in registers over the whole `p` loop.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block<F: Elem, const MR: usize, const NR: usize, const FMA: bool>(
    k: usize, a: *const F, a_rs: usize, a_cs: usize, b: *const F, b_rs: usize, c: *mut F, c_rs: usize,
) {
    let mut acc = [[F::zero(); NR]; MR];
    for (i, row) in acc.iter_mut().enumerate() {
        *row = (c.add(i * c_rs) as *const [F; NR]).read_unaligned();
    }
    for p in 0..k {
        let bv = (b.add(p * b_rs) as *const [F; NR]).read_unaligned();
        for (i, row) in acc.iter_mut().enumerate() {
            let av = *a.add(i * a_rs + p * a_cs);
            for j in 0..NR {
                row[j] = madd::<F, FMA>(av, bv[j], row[j]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        (c.add(i * c_rs) as *mut [F; NR]).write_unaligned(*row);
    }
}

/// `x[j] = exp(x[j] - mu[j])` over `mu.len()` elements. f32 uses `exp_f32` (vectorises;
/// exactly 1 at 0 and exactly 0 at -inf, which the online softmax relies on); other scalars
/// the library `exp`.
#[inline(always)]
pub(super) fn exp_sub<F: Elem>(x: &mut [F], mu: &[F]) {
    let x = &mut x[..mu.len()];
    if TypeId::of::<F>() == TypeId::of::<f32>() {
        // SAFETY: F is f32 (checked just above), so both slices are f32 slices.
        let (x, mu) = unsafe { (&mut *(x as *mut [F] as *mut [f32]), &*(mu as *const [F] as *const [f32])) };
        for (x, &u) in x.iter_mut().zip(mu) {
            *x = exp_f32(*x - u);
        }
    } else {
        for (x, &u) in x.iter_mut().zip(mu) {
            *x = (*x - u).exp();
        }
    }
}

/// `e^x` for x <= 0 (the only arguments a softmax needs), within about 2 ulp: Cephes' expf
/// (x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r, times 2^n from the exponent
/// bits). Branch-free so that loops over it vectorise; separate multiplies and adds (no FMA)
/// so its bits are the same whatever it was compiled for. Exactly 1 at 0, 0 below -87.3
/// (where 2^n would leave the normal range) and at -inf.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.336_55; // ln(2^-126)
    const HI: f32 = 88.0;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(LO, HI);
    let z = xc * LOG2E + ROUND;
    let n = z - ROUND;
    // n as an integer, from the low mantissa bits of z.
    let ni = (z.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = xc - n * 0.693_359_4;
    let r = r + n * 2.121_944_4e-4;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let pow2 = f32::from_bits(((ni + 127) as u32) << 23);
    if x < LO {
        0.0
    } else {
        e * pow2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_2_ulp_and_exact_where_the_softmax_needs_it() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2.5 * f32::EPSILON as f64, "worst relative error {worst:e}");
    }

    /// Every blocking of a product gives the bits of the plain loop, and splitting `p` over
    /// calls gives the bits of one call.
    fn mm_matches_chain<K: Kern>() {
        for m in [11, 15] {
            mm_matches_chain_at::<K>(m, 45, 13);
        }
    }

    fn mm_matches_chain_at<K: Kern>(m: usize, n: usize, k: usize) {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 13.0).collect();
        let c0: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 * 0.25).collect();
        let mut c = c0.clone();
        // a read transposed: a_rs = 1, a_cs = m.
        // SAFETY: a is [k, m] (read transposed), b [k, n], c [m, n]; the CPU has what K needs
        // (the caller checks isa()).
        unsafe { K::mm(m, n, k, a.as_ptr(), 1, m, b.as_ptr(), n, c.as_mut_ptr(), n) };
        let mut split = c0.clone();
        // SAFETY: as above, p in [0, 5) and then [5, k).
        unsafe {
            K::mm(m, n, 5, a.as_ptr(), 1, m, b.as_ptr(), n, split.as_mut_ptr(), n);
            K::mm(m, n, k - 5, a.as_ptr().add(5 * m), 1, m, b.as_ptr().add(5 * n), n, split.as_mut_ptr(), n);
        }
        let fma = std::any::type_name::<K>().contains("Avx");
        for i in 0..m {
            for j in 0..n {
                let mut acc = c0[i * n + j];
                for p in 0..k {
                    let (x, y) = (a[p * m + i], b[p * n + j]);
                    acc = if fma { x.mul_add(y, acc) } else { x * y + acc };
                }
                assert_eq!(c[i * n + j].to_bits(), acc.to_bits(), "[{i}, {j}]");
                assert_eq!(split[i * n + j].to_bits(), acc.to_bits(), "split [{i}, {j}]");
            }
        }
    }

    #[test]
    fn mm_is_one_chain_per_element() {
        mm_matches_chain::<Portable>();
        if isa() != Isa::Portable {
            mm_matches_chain::<Avx2>();
        }
        if isa() == Isa::Avx512 {
            mm_matches_chain::<Avx512>();
        }
    }
}
