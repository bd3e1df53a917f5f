//! 8-bit weights for the decode products (`Precision::Q8`): each row of a weight `[n, k]` is cut
//! into blocks of 32, each stored as 32 signed bytes and one f32 scale (`max |x| / 127`,
//! values rounded to nearest), like llama.cpp's Q8_0 (which keeps an f16 scale). 36 bytes per
//! 32 weights instead of 128: a batch-1 decode step, which reads every weight once, moves
//! 3.6x fewer bytes than in f32. Activations stay f32.

/// Weights per block.
pub(crate) const BLOCK: usize = 32;

/// The rows of a weight `[n, k]` in 8-bit blocks (the last block of a row zero-padded).
pub(crate) struct Q8Rows {
    k: usize,
    blocks_per_row: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
}

impl Q8Rows {
    pub(crate) fn quantize(w: &[f32], k: usize) -> Self {
        assert!(k > 0 && w.len() % k == 0, "q8: {} weights are not rows of {k}", w.len());
        let n = w.len() / k;
        let bpr = k.div_ceil(BLOCK);
        let mut q = vec![0i8; n * bpr * BLOCK];
        let mut scale = vec![0f32; n * bpr];
        for r in 0..n {
            for b in 0..bpr {
                let src = &w[r * k + b * BLOCK..r * k + (b * BLOCK + BLOCK).min(k)];
                let amax = src.iter().fold(0f32, |a, &x| a.max(x.abs()));
                let s = amax / 127.0;
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                let dst = &mut q[(r * bpr + b) * BLOCK..][..src.len()];
                for (d, &x) in dst.iter_mut().zip(src) {
                    *d = (x * inv).round().clamp(-127.0, 127.0) as i8;
                }
                scale[r * bpr + b] = s;
            }
        }
        Self { k, blocks_per_row: bpr, q, scale }
    }

    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Weight `(r, c)` as the products see it.
    #[cfg(test)]
    pub(crate) fn value(&self, r: usize, c: usize) -> f32 {
        let b = r * self.blocks_per_row + c / BLOCK;
        self.q[b * BLOCK + c % BLOCK] as f32 * self.scale[b]
    }

    /// The weights as the products see them, `[n, k]` f32.
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let n = self.scale.len() / self.blocks_per_row.max(1);
        let mut out = Vec::with_capacity(n * self.k);
        for r in 0..n {
            for c in 0..self.k {
                let b = r * self.blocks_per_row + c / BLOCK;
                out.push(self.q[b * BLOCK + c % BLOCK] as f32 * self.scale[b]);
            }
        }
        out
    }

    /// `row r . x` (`x` of length k).
    #[inline]
    pub(crate) fn dot(&self, r: usize, x: &[f32]) -> f32 {
        debug_assert_eq!(x.len(), self.k);
        let (q, s) = (&self.q[r * self.blocks_per_row * BLOCK..(r + 1) * self.blocks_per_row * BLOCK], &self.scale[r * self.blocks_per_row..(r + 1) * self.blocks_per_row]);
        #[cfg(target_arch = "x86_64")]
        if super::matmul::has_simd(super::matmul::Kind::F32) {
            // SAFETY: AVX-512F is present; q holds blocks_per_row blocks covering x.
            return unsafe { dot_avx512(q, s, x) };
        }
        dot_portable(q, s, x)
    }
}

fn dot_portable(q: &[i8], s: &[f32], x: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in x.chunks(BLOCK).enumerate() {
        let qb = &q[b * BLOCK..];
        let sum: f32 = xb.iter().zip(qb).map(|(&x, &q)| x * q as f32).sum();
        acc += sum * s[b];
    }
    acc
}

/// Per full block: 32 bytes widened to f32 in two halves, two FMAs into a block sum, then one
/// FMA by the block's scale into the running sum; the partial last block goes through a mask.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(q: &[i8], s: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let k = x.len();
    let (px, pq) = (x.as_ptr(), q.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 2];
    let full = k / BLOCK;
    for b in 0..full {
        let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(pq.add(b * BLOCK) as *const __m128i)));
        let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(pq.add(b * BLOCK + 16) as *const __m128i)));
        let t = _mm512_mul_ps(q0, _mm512_loadu_ps(px.add(b * BLOCK)));
        let t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(px.add(b * BLOCK + 16)), t);
        acc[b & 1] = _mm512_fmadd_ps(t, _mm512_set1_ps(*s.get_unchecked(b)), acc[b & 1]);
    }
    let mut r = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    if full * BLOCK < k {
        r += dot_portable(&q[full * BLOCK..], &s[full..], &x[full * BLOCK..]);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_dot_matches_the_dequantized_weights() {
        let mut s = 5u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        };
        for k in [1usize, 31, 32, 33, 100, 576] {
            let n = 7;
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let x: Vec<f32> = (0..k).map(|_| next()).collect();
            let q = Q8Rows::quantize(&w, k);
            for r in 0..n {
                // Each weight within half a step of its block's scale.
                for c in 0..k {
                    let amax = w[r * k + c / BLOCK * BLOCK..r * k + ((c / BLOCK + 1) * BLOCK).min(k)].iter().fold(0f32, |a, &v| a.max(v.abs()));
                    assert!((q.value(r, c) - w[r * k + c]).abs() <= amax / 254.0 * 1.0001 + 1e-12, "k{k} ({r},{c})");
                }
                let want: f64 = (0..k).map(|c| q.value(r, c) as f64 * x[c] as f64).sum();
                let mag: f64 = (0..k).map(|c| (q.value(r, c) as f64 * x[c] as f64).abs()).sum();
                let got = q.dot(r, &x) as f64;
                assert!((got - want).abs() <= (k as f64 + 4.0) * 1.2e-7 * mag + 1e-30, "k{k} row {r}: {got} vs {want}");
                let port = dot_portable(&q.q[r * q.blocks_per_row * BLOCK..], &q.scale[r * q.blocks_per_row..], &x) as f64;
                assert!((port - want).abs() <= (k as f64 + 4.0) * 1.2e-7 * mag + 1e-30, "portable k{k} row {r}");
            }
        }
    }
}
