//! 8-bit weights for the decode products (`Precision::Q8`): each row of a weight `[n, k]` is cut
//! into blocks of 32, each stored as 32 signed bytes and one f32 scale (`max |x| / 127`,
//! values rounded to nearest), like llama.cpp's Q8_0 (which keeps an f16 scale). 36 bytes per
//! 32 weights instead of 128: a batch-1 decode step, which reads every weight once, moves
//! 3.6x fewer bytes than in f32.
//!
//! The activations of a product are quantized the same way, once per call (`Q8Act`), so a
//! block's dot is a sum of byte products, exact in i32 (AVX512-VNNI `vpdpbusd`, 64 of them
//! per instruction), and each block's sum is scaled by `weight scale * activation scale` and
//! added in f32, as llama.cpp's Q8_0 x Q8_0 dot does. Widening every weight to f32 instead
//! made the product compute-bound at about 12 GB/s of weights per core; this reads them at
//! memory speed.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so a weight byte is stored as `q + 128`
//! (0..=254) and every block's sum is corrected by `-128 * (sum of its activation bytes)`
//! (`Q8Act::lane_corr`, once per call). Rows are padded to an even number of blocks (one
//! 64-byte load covers two blocks; padding weights are 0, scale 0).

/// Weights per block.
pub(crate) const BLOCK: usize = 32;

/// The rows of a weight `[n, k]` in 8-bit blocks (the last block of a row zero-padded, and a
/// zero block added when a row has an odd number of them).
pub(crate) struct Q8Rows {
    k: usize,
    /// Blocks per row, even.
    blocks_per_row: usize,
    /// `[n, blocks_per_row * BLOCK]`: each weight's `q + 128` (q in -127..=127).
    q: Vec<u8>,
    /// `[n, blocks_per_row]`.
    scale: Vec<f32>,
}

/// Blocks a row of `k` is stored in (even).
pub(super) fn blocks(k: usize) -> usize {
    k.div_ceil(BLOCK).next_multiple_of(2)
}

/// `src` (at most one block) as bytes `q` with `src ~ q * scale`; returns the scale.
fn quantize_block(src: &[f32], dst: &mut [i8]) -> f32 {
    let amax = src.iter().fold(0f32, |a, &x| a.max(x.abs()));
    let s = amax / 127.0;
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = (x * inv).round().clamp(-127.0, 127.0) as i8;
    }
    s
}

impl Q8Rows {
    pub(crate) fn quantize(w: &[f32], k: usize) -> Self {
        assert!(k > 0 && w.len() % k == 0, "q8: {} weights are not rows of {k}", w.len());
        let n = w.len() / k;
        let bpr = blocks(k);
        let mut q = vec![128u8; n * bpr * BLOCK];
        let mut scale = vec![0f32; n * bpr];
        let mut tmp = [0i8; BLOCK];
        for r in 0..n {
            for b in 0..k.div_ceil(BLOCK) {
                let src = &w[r * k + b * BLOCK..r * k + (b * BLOCK + BLOCK).min(k)];
                scale[r * bpr + b] = quantize_block(src, &mut tmp[..src.len()]);
                for (d, &t) in q[(r * bpr + b) * BLOCK..][..src.len()].iter_mut().zip(&tmp) {
                    *d = (t as i16 + 128) as u8;
                }
            }
        }
        Self { k, blocks_per_row: bpr, q, scale }
    }

    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Weight `(r, c)` as the products see it.
    pub(crate) fn value(&self, r: usize, c: usize) -> f32 {
        let b = r * self.blocks_per_row + c / BLOCK;
        (self.q[b * BLOCK + c % BLOCK] as i32 - 128) as f32 * self.scale[b]
    }

    /// The weights as the products see them, `[n, k]` f32.
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let n = self.scale.len() / self.blocks_per_row;
        let mut out = Vec::with_capacity(n * self.k);
        for r in 0..n {
            for c in 0..self.k {
                out.push(self.value(r, c));
            }
        }
        out
    }

    /// `row r . x` (`x` quantized for rows of this `k`): per block, the exact byte dot times
    /// both scales, summed in f32.
    #[inline]
    pub(crate) fn dot(&self, r: usize, x: &Q8Act, i: usize) -> f32 {
        debug_assert_eq!(x.blocks, self.blocks_per_row);
        let nb = self.blocks_per_row;
        let (q, s) = (&self.q[r * nb * BLOCK..(r + 1) * nb * BLOCK], &self.scale[r * nb..(r + 1) * nb]);
        #[cfg(target_arch = "x86_64")]
        if has_vnni() {
            // SAFETY: AVX-512F/BW/VNNI are present; q, s and x's row hold nb (even) blocks.
            return unsafe { dot_vnni(q, s, x, i) };
        }
        dot_portable(q, s, &x.q[i * nb * BLOCK..(i + 1) * nb * BLOCK], &x.scale[i * nb..(i + 1) * nb])
    }
}

/// Rows of activations `[m, k]` in 8-bit blocks for `Q8Rows::dot` (quantized as the weights
/// are), with what the VNNI kernel needs per pair of blocks.
pub(crate) struct Q8Act {
    /// Blocks per row, even (as `Q8Rows`).
    pub(super) blocks: usize,
    /// `[m, blocks * BLOCK]`, zero-padded.
    pub(super) q: Vec<i8>,
    /// `[m, blocks]`.
    pub(super) scale: Vec<f32>,
    /// `[m, blocks]`: each block's `scale * sum(q)`, the sum of its values as quantized (the
    /// 4-bit dot's min term, q4.rs).
    pub(super) sum: Vec<f32>,
    /// `[m, blocks * 8]`: per pair of blocks, 16 lanes (the i32 sums of `vpdpbusd`), the first
    /// 8 of the first block: each block's scale on its lanes.
    lane_scale: Vec<f32>,
    /// The same lanes: `-128 * sum(q of the block)` on the first lane of the block's 8, zero on
    /// the others (undoes the `+ 128` of the weight bytes).
    lane_corr: Vec<i32>,
}

impl Q8Act {
    pub(crate) fn quantize(a: &[f32], m: usize, k: usize) -> Self {
        assert!(a.len() >= m * k);
        let nb = blocks(k);
        let mut x = Self { blocks: nb, q: vec![0; m * nb * BLOCK], scale: vec![0.0; m * nb], sum: vec![0.0; m * nb], lane_scale: vec![0.0; m * nb * 8], lane_corr: vec![0; m * nb * 8] };
        for i in 0..m {
            for b in 0..k.div_ceil(BLOCK) {
                let src = &a[i * k + b * BLOCK..i * k + (b * BLOCK + BLOCK).min(k)];
                let dst = &mut x.q[(i * nb + b) * BLOCK..][..src.len()];
                let s = quantize_block(src, dst);
                let sum: i32 = dst.iter().map(|&v| v as i32).sum();
                x.scale[i * nb + b] = s;
                x.sum[i * nb + b] = s * sum as f32;
                let lanes = (i * nb + b) * 8;
                x.lane_scale[lanes..lanes + 8].fill(s);
                x.lane_corr[lanes] = -128 * sum;
            }
        }
        x
    }
}

fn dot_portable(q: &[u8], sw: &[f32], x: &[i8], sx: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, (&sw, &sx)) in sw.iter().zip(sx).enumerate() {
        let sum: i32 = q[b * BLOCK..(b + 1) * BLOCK].iter().zip(&x[b * BLOCK..(b + 1) * BLOCK]).map(|(&q, &x)| (q as i32 - 128) * x as i32).sum();
        acc += sum as f32 * (sw * sx);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
pub(super) fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        super::matmul::has_simd(super::matmul::Kind::F32)
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    })
}

/// Per pair of blocks (64 weights): one `vpdpbusd` of the weight bytes and the activation
/// bytes into the pair's correction lanes (16 exact i32 sums, 8 per block), converted to f32
/// and added times the lanes' scales (weight scale, spread over its 8 lanes, times activation
/// scale). Two accumulators; the lanes are summed at the end.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_vnni(q: &[u8], sw: &[f32], x: &Q8Act, i: usize) -> f32 {
    use std::arch::x86_64::*;
    let nb = x.blocks;
    let (pq, psw) = (q.as_ptr(), sw.as_ptr());
    let px = x.q.as_ptr().add(i * nb * BLOCK);
    let (pls, plc) = (x.lane_scale.as_ptr().add(i * nb * 8), x.lane_corr.as_ptr().add(i * nb * 8));
    // Lanes 0-7 take the first of two scales, lanes 8-15 the second.
    let spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let mut acc = [_mm512_setzero_ps(); 2];
    for p in 0..nb / 2 {
        let d = _mm512_dpbusd_epi32(
            _mm512_loadu_si512(plc.add(16 * p) as *const _),
            _mm512_loadu_si512(pq.add(64 * p) as *const _),
            _mm512_loadu_si512(px.add(64 * p) as *const _),
        );
        let two = _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(psw.add(2 * p) as *const f64)));
        let scale = _mm512_mul_ps(_mm512_permutexvar_ps(spread, two), _mm512_loadu_ps(pls.add(16 * p)));
        acc[p & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[p & 1]);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        super::super::test_vals(n, seed).into_iter().map(|v| v as f32).collect()
    }

    /// Each weight and activation within half a step of its block's scale; the dot (VNNI where
    /// the CPU has it, and the portable one) equal to the dot of the quantized values, at
    /// lengths with partial and odd block counts, for every activation row.
    #[test]
    fn quantized_dot_matches_the_quantized_values() {
        for k in [1usize, 31, 32, 33, 64, 100, 576] {
            let (n, m) = (7, 3);
            let (w, a) = (vals(n * k, k as u64), vals(m * k, 100 + k as u64));
            let (q, x) = (Q8Rows::quantize(&w, k), Q8Act::quantize(&a, m, k));
            let half_step = |v: &[f32], r: usize, c: usize| v[r * k + c / BLOCK * BLOCK..r * k + ((c / BLOCK + 1) * BLOCK).min(k)].iter().fold(0f32, |m, &v| m.max(v.abs())) / 254.0 * 1.0001 + 1e-12;
            let xval = |i: usize, c: usize| x.q[i * x.blocks * BLOCK + c] as f32 * x.scale[i * x.blocks + c / BLOCK];
            for r in 0..n {
                for c in 0..k {
                    assert!((q.value(r, c) - w[r * k + c]).abs() <= half_step(&w, r, c), "weight k{k} ({r},{c})");
                }
                for i in 0..m {
                    if r == 0 {
                        for c in 0..k {
                            assert!((xval(i, c) - a[i * k + c]).abs() <= half_step(&a, i, c), "activation k{k} ({i},{c})");
                        }
                    }
                    let want: f64 = (0..k).map(|c| q.value(r, c) as f64 * xval(i, c) as f64).sum();
                    let mag: f64 = (0..k).map(|c| (q.value(r, c) as f64 * xval(i, c) as f64).abs()).sum();
                    let nb = q.blocks_per_row;
                    let port = dot_portable(&q.q[r * nb * BLOCK..], &q.scale[r * nb..(r + 1) * nb], &x.q[i * nb * BLOCK..], &x.scale[i * nb..(i + 1) * nb]) as f64;
                    for (got, how) in [(q.dot(r, &x, i) as f64, "dot"), (port, "portable")] {
                        assert!((got - want).abs() <= (k as f64 + 4.0) * 1.2e-7 * mag + 1e-30, "{how} k{k} row {r} x {i}: {got} vs {want}");
                    }
                }
            }
        }
    }
}
