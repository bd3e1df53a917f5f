//! 4-bit weights for the decode products (`Precision::Q4`), with the blocks of llama.cpp's
//! Q4_1: each row of a weight `[n, k]` is cut into blocks of 32, each stored as 32 4-bit
//! values `q` (0..=15), an f16 scale `d = (max - min) / 15` and an f16 minimum `m = min`, the
//! weight being `q * d + m`. 16 + 2 + 2 = 20 bytes per 32 weights (0.625 bytes per weight, as
//! Q4_1; q8 reads 1.125, f32 4): a batch-1 decode step reads every weight once, and the 8-bit
//! dot already ran at memory speed, so fewer bytes is what makes it faster.
//!
//! `q` is rounded against the stored (f16) `d` and `m`, so the weights of a Q4_1 GGUF (which
//! are `q * d + m` of f16 `d` and `m`, with a `q = 0` and a `q = 15` in every block that
//! llama.cpp's quantizer wrote) quantize back to the same `d`, `m` and `q`: the default model,
//! a Q4_1 GGUF, runs on its own weights bit for bit (tested below). Its lm head (the tied
//! embedding, Q8_0 in the GGUF) is read at 8 bits (`CpuBackend::lm_head_logits`).
//!
//! The activations are quantized to 8-bit blocks once per product (`Q8Act`, as for q8), and a
//! row's dot is llama.cpp's Q4_1 x Q8_1: per block `d_w * d_a * sum(q_w * q_a)` (the byte dot
//! exact in i32, AVX512-VNNI `vpdpbusd`: unsigned nibbles times signed activation bytes, so
//! no bias to correct as in q8) plus `m_w * d_a * sum(q_a)` (`Q8Act::sum`), summed in f32.
//!
//! Nibble order (ours, not Q4_1's): blocks are stored in pairs (rows padded to an even number
//! of blocks, as in q8), 32 bytes per pair, byte `j` holding the first block's weight `j` in
//! its low nibble and the second block's weight `j` in its high nibble. One 32-byte load,
//! duplicated into both halves of a 512-bit register, the upper half shifted right by 4 and
//! both masked to 4 bits, lines the 64 weights up with the pair's 64 activation bytes.

use super::q8::{blocks, Q8Act, BLOCK};
use half::f16;
use rayon::prelude::*;

/// Bytes of nibbles per block.
const NIB: usize = BLOCK / 2;

/// The rows of a weight `[n, k]` in 4-bit blocks (the last block of a row zero-padded, and a
/// zero block, `d = m = 0`, added when a row has an odd number of them).
pub(crate) struct Q4Rows {
    k: usize,
    /// Blocks per row, even.
    blocks_per_row: usize,
    /// `[n, blocks_per_row / 2, 32]`: per pair of blocks, byte `j` = first block's `q_j` |
    /// second block's `q_j << 4`.
    nib: Vec<u8>,
    /// `[n, blocks_per_row]`: each block's scale `d`, f16 bits.
    d: Vec<u16>,
    /// `[n, blocks_per_row]`: each block's minimum `m`, f16 bits.
    m: Vec<u16>,
}

/// `src` (at most one block) as `q` (0..=15) with `src ~ q * d + m`; returns the f16 bits of
/// `(d, m)`. `q` is rounded against the f16 values, which is what makes a Q4_1 block's own
/// values come back unchanged.
fn quantize_block(src: &[f32], q: &mut [u8]) -> (u16, u16) {
    let (lo, hi) = src.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
    let (d, m) = (f16::from_f32((hi - lo) / 15.0), f16::from_f32(lo));
    let (df, mf) = (d.to_f32(), m.to_f32());
    let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
    for (o, &x) in q.iter_mut().zip(src) {
        *o = ((x - mf) * inv).round().clamp(0.0, 15.0) as u8;
    }
    (d.to_bits(), m.to_bits())
}

fn h(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

impl Q4Rows {
    pub(crate) fn quantize(w: &[f32], k: usize) -> Self {
        assert!(k > 0 && w.len() % k == 0, "q4: {} weights are not rows of {k}", w.len());
        let n = w.len() / k;
        let bpr = blocks(k);
        let (mut nib, mut d, mut m) = (vec![0u8; n * bpr * NIB], vec![0u16; n * bpr], vec![0u16; n * bpr]);
        nib.par_chunks_mut(bpr * NIB).zip(d.par_chunks_mut(bpr)).zip(m.par_chunks_mut(bpr)).enumerate().for_each(|(r, ((nib, d), m))| {
            let mut q = [0u8; BLOCK];
            for b in 0..k.div_ceil(BLOCK) {
                let src = &w[r * k + b * BLOCK..r * k + (b * BLOCK + BLOCK).min(k)];
                (d[b], m[b]) = quantize_block(src, &mut q[..src.len()]);
                for (o, &v) in nib[b / 2 * BLOCK..][..src.len()].iter_mut().zip(&q) {
                    *o |= v << (4 * (b % 2));
                }
            }
        });
        Self { k, blocks_per_row: bpr, nib, d, m }
    }

    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Weight `(r, c)` as the products see it: `q * d + m` in f32 (as ggml dequantizes Q4_1;
    /// the tests' reference for `dequantize` and the dots).
    #[cfg(test)]
    fn value(&self, r: usize, c: usize) -> f32 {
        let b = r * self.blocks_per_row + c / BLOCK;
        let q = (self.nib[b / 2 * BLOCK + c % BLOCK] >> (4 * (b % 2))) & 0x0F;
        q as f32 * h(self.d[b]) + h(self.m[b])
    }

    /// The weights as the products see them, `[n, k]` f32.
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let (nb, n) = (self.blocks_per_row, self.d.len() / self.blocks_per_row);
        let mut out = vec![0f32; n * self.k];
        // Per block, `d` and `m` widened once (per weight, as `value` does, it was the slow part
        // of the first prefill's packing).
        out.par_chunks_mut(self.k).enumerate().for_each(|(r, row)| {
            for (b, chunk) in row.chunks_mut(BLOCK).enumerate() {
                let i = r * nb + b;
                let (d, m, shift) = (h(self.d[i]), h(self.m[i]), 4 * (i % 2));
                for (o, &v) in chunk.iter_mut().zip(&self.nib[i / 2 * BLOCK..][..BLOCK]) {
                    *o = ((v >> shift) & 0x0F) as f32 * d + m;
                }
            }
        });
        out
    }

    /// `row r . x` (`x` quantized for rows of this `k`): per block, the exact nibble-byte dot
    /// times both scales plus the weight minimum times the activation block's sum, in f32.
    #[inline]
    pub(crate) fn dot(&self, r: usize, x: &Q8Act, i: usize) -> f32 {
        debug_assert_eq!(x.blocks, self.blocks_per_row);
        let nb = self.blocks_per_row;
        let (nib, d, m) = (&self.nib[r * nb * NIB..(r + 1) * nb * NIB], &self.d[r * nb..(r + 1) * nb], &self.m[r * nb..(r + 1) * nb]);
        #[cfg(target_arch = "x86_64")]
        if has_simd() {
            // SAFETY: AVX-512F/BW/VL/VNNI and F16C are present; nib, d, m and x's row i hold
            // nb (even) blocks.
            return unsafe { dot_vnni(nib, d, m, x, i) };
        }
        let xs = i * nb..(i + 1) * nb;
        dot_portable(nib, d, m, &x.q[i * nb * BLOCK..(i + 1) * nb * BLOCK], &x.scale[xs.clone()], &x.sum[xs])
    }
}

/// The scalar dot (`IPO_CPU_PORTABLE=1`, CPUs without AVX512-VNNI).
fn dot_portable(nib: &[u8], d: &[u16], m: &[u16], x: &[i8], sx: &[f32], sumx: &[f32]) -> f32 {
    let mut acc = 0f32;
    for b in 0..d.len() {
        let pair = &nib[b / 2 * BLOCK..][..BLOCK];
        let sum: i32 = pair.iter().zip(&x[b * BLOCK..(b + 1) * BLOCK]).map(|(&v, &x)| ((v >> (4 * (b % 2))) & 0x0F) as i32 * x as i32).sum();
        acc += sum as f32 * (h(d[b]) * sx[b]) + h(m[b]) * sumx[b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
fn has_simd() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| super::q8::has_vnni() && std::arch::is_x86_feature_detected!("avx512vl") && std::arch::is_x86_feature_detected!("f16c"))
}

/// Per group of 16 blocks: their 16 `d_w * d_a` in one register (f16 `d_w` widened) and the
/// min terms `m_w * (d_a * sum q_a)` added 16 at a time. Per pair of blocks in the group: one
/// `vpdpbusd` of the 64 unpacked nibbles and the 64 activation bytes (16 exact i32 sums, 8 per
/// block), converted to f32 and added times the pair's two scales spread over their 8 lanes
/// each. The tail group is masked (its blocks read as zero).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn dot_vnni(nib: &[u8], d: &[u16], m: &[u16], x: &Q8Act, i: usize) -> f32 {
    use std::arch::x86_64::*;
    let nb = x.blocks;
    let (pn, pd, pm) = (nib.as_ptr(), d.as_ptr(), m.as_ptr());
    let (px, psx, psum) = (x.q.as_ptr().add(i * nb * BLOCK), x.scale.as_ptr().add(i * nb), x.sum.as_ptr().add(i * nb));
    // The low 256 bits keep the low nibbles (first block), the high 256 the high ones.
    let shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    let low4 = _mm512_set1_epi8(0x0F);
    // Lanes 0-7 take scale 2p of the group, lanes 8-15 scale 2p + 1.
    let first = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let two = _mm512_set1_epi32(2);
    // Two accumulators in registers, pairs taken two at a time (indexing an array of two by
    // `p & 1` kept them on the stack: a store-to-load chain per pair, 22% of the kernel).
    let (mut acc0, mut acc1, mut acc_min) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
    // `acc + (pair's 16 lane sums) * (its scales at lane index idx)`.
    macro_rules! pair {
        ($pair:expr, $idx:expr, $scale:expr, $acc:expr) => {{
            let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(pn.add(BLOCK * $pair) as *const __m256i));
            let w = _mm512_and_si512(_mm512_srlv_epi64(v, shift), low4);
            let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(px.add(2 * BLOCK * $pair) as *const _));
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps($idx, $scale), $acc)
        }};
    }
    let mut g = 0;
    while g < nb {
        let left = (nb - g).min(16);
        let mask: __mmask16 = if left == 16 { 0xFFFF } else { (1u16 << left) - 1 };
        let dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, pd.add(g) as *const i16));
        let scale = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(mask, psx.add(g)));
        let mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, pm.add(g) as *const i16));
        acc_min = _mm512_fmadd_ps(mw, _mm512_maskz_loadu_ps(mask, psum.add(g)), acc_min);
        let (pairs, mut p, mut idx) = (left / 2, 0, first);
        while p + 2 <= pairs {
            acc0 = pair!(g / 2 + p, idx, scale, acc0);
            idx = _mm512_add_epi32(idx, two);
            acc1 = pair!(g / 2 + p + 1, idx, scale, acc1);
            idx = _mm512_add_epi32(idx, two);
            p += 2;
        }
        if p < pairs {
            acc0 = pair!(g / 2 + p, idx, scale, acc0);
        }
        g += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), acc_min))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
        super::super::test_vals(n, seed).into_iter().map(|v| v as f32 * scale + offset).collect()
    }

    /// Each weight within half a step (plus the f16 rounding of `d` and `m`) of its value; the
    /// dot (VNNI where the CPU has it, and the portable one) equal, up to f32 summation, to the
    /// f64 dot of the dequantized weights and activations, at lengths with partial and odd
    /// block counts and more than one 16-block group, for every activation row, on weights
    /// with a nonzero mean (so the min term matters).
    #[test]
    fn quantized_dot_matches_the_dequantized_values() {
        for k in [1usize, 31, 32, 33, 64, 100, 576, 1000] {
            let (n, m) = (7, 3);
            let (w, a) = (vals(n * k, k as u64, 0.05, 0.01), vals(m * k, 100 + k as u64, 1.0, 0.0));
            let (q, x) = (Q4Rows::quantize(&w, k), Q8Act::quantize(&a, m, k));
            let xval = |i: usize, c: usize| x.q[i * x.blocks * BLOCK + c] as f32 * x.scale[i * x.blocks + c / BLOCK];
            let (nb, deq) = (q.blocks_per_row, q.dequantize());
            for r in 0..n {
                for c in 0..k {
                    assert_eq!(deq[r * k + c].to_bits(), q.value(r, c).to_bits(), "dequantize k{k} ({r},{c})");
                    let blk = &w[r * k + c / BLOCK * BLOCK..r * k + ((c / BLOCK + 1) * BLOCK).min(k)];
                    let (lo, hi) = blk.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| (l.min(x), h.max(x)));
                    let step = (hi - lo) / 15.0;
                    let bound = 0.5 * step * (1.0 + 1e-3) + (15.0 * step + lo.abs()) / 2048.0 + 1e-7;
                    assert!((q.value(r, c) - w[r * k + c]).abs() <= bound, "weight k{k} ({r},{c}): {} vs {}", q.value(r, c), w[r * k + c]);
                }
                for i in 0..m {
                    let want: f64 = (0..k).map(|c| q.value(r, c) as f64 * xval(i, c) as f64).sum();
                    let mag: f64 = (0..k).map(|c| (q.value(r, c) as f64 * xval(i, c) as f64).abs()).sum();
                    let (nib, d, mm) = (&q.nib[r * nb * NIB..(r + 1) * nb * NIB], &q.d[r * nb..(r + 1) * nb], &q.m[r * nb..(r + 1) * nb]);
                    let xs = i * nb..(i + 1) * nb;
                    let port = dot_portable(nib, d, mm, &x.q[i * nb * BLOCK..], &x.scale[xs.clone()], &x.sum[xs]) as f64;
                    #[cfg(target_arch = "x86_64")]
                    if has_simd() {
                        // SAFETY: checked above; the row holds nb blocks.
                        let v = unsafe { dot_vnni(nib, d, mm, &x, i) } as f64;
                        assert!((v - want).abs() <= (k as f64 + 8.0) * 1.2e-7 * mag + 1e-30, "vnni k{k} row {r} x {i}: {v} vs {want}");
                    }
                    for (got, how) in [(q.dot(r, &x, i) as f64, "dot"), (port, "portable")] {
                        assert!((got - want).abs() <= (k as f64 + 8.0) * 1.2e-7 * mag + 1e-30, "{how} k{k} row {r} x {i}: {got} vs {want}");
                    }
                }
            }
        }
    }

    /// The default model's projections are Q4_1 blocks of its GGUF dequantized to f32 (its
    /// token embedding is Q8_0, so not it): quantizing them again gives back every weight bit
    /// for bit. Skipped with a notice without IPO_DEFAULT_MODEL (fails under CI=true).
    #[test]
    fn the_default_models_q4_1_weights_come_back_exactly() {
        let Some(dir) = std::env::var_os("IPO_DEFAULT_MODEL").filter(|d| !d.is_empty()) else {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true and IPO_DEFAULT_MODEL is unset");
            eprintln!("skipping: IPO_DEFAULT_MODEL is unset");
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let cfg = crate::model::load::load_config(&dir).unwrap();
        let w = crate::model::load::load_weights(&dir, &cfg).unwrap();
        let mut checked = 0;
        for l in [0, cfg.num_layers / 2, cfg.num_layers - 1] {
            let lw = &w.layers[l];
            for (name, t) in [("q", &lw.wq), ("k", &lw.wk), ("v", &lw.wv), ("o", &lw.wo), ("gate", &lw.w_gate), ("up", &lw.w_up), ("down", &lw.w_down)] {
                let k = t.shape[1];
                let back = Q4Rows::quantize(&t.data, k).dequantize();
                let diff = back.iter().zip(&t.data).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(diff, 0, "layer {l} {name} {:?}: {diff} weights changed", t.shape);
                checked += t.data.len();
            }
        }
        // And the embedding (Q8_0 in the GGUF, 256 values per block) does not: the test can fail.
        let e = &w.embed.data[..64 * cfg.hidden_size];
        let back = Q4Rows::quantize(e, cfg.hidden_size).dequantize();
        assert!(back.iter().zip(e).any(|(a, b)| a != b), "the Q8_0 embedding came back exactly through 4 bits?");
        eprintln!("{checked} Q4_1 weights reproduced bit for bit");
    }
}
