//! Host side of `Backend::sample` on the CUDA backend: kernels/sampling.cu, one block per
//! row, picking the same token as the host sampler (`backend::cpu::sample::pick`) from the same
//! counters. Only the `[rows]` token ids come back to the host, not the `[rows, vocab]` logits.

use super::{Arg, CudaBackend, CudaBuf, Gpu};
use crate::backend::SampleRow;

/// Threads per block of `sample_rows` (SAMPLE_THREADS in the kernel) and u32 words per row
/// of its parameter table (ROW_WORDS).
const SAMPLE_THREADS: u32 = 256;
const ROW_WORDS: usize = 10;
/// Budget of the f64 weight scratch in 4-byte words (64 MiB): rows beyond it go in further
/// launches that reuse the scratch.
const SCRATCH_WORDS: usize = 1 << 24;

/// The kernel's parameter row: seed lo/hi, key lo/hi, sample, position, temperature bits,
/// top_k (saturated to u32), top_p bits, pad.
fn row_words(r: &SampleRow) -> [u32; ROW_WORDS] {
    [
        r.seed as u32,
        (r.seed >> 32) as u32,
        r.key as u32,
        (r.key >> 32) as u32,
        r.sample,
        r.position,
        r.temperature.to_bits(),
        r.top_k.min(u32::MAX as usize) as u32,
        r.top_p.to_bits(),
        0,
    ]
}

impl<G: Gpu> CudaBackend<G> {
    /// `Backend::sample`: logits `[rows.len(), vocab]` -> one token id per row.
    pub(super) fn sample_tokens(&self, logits: &CudaBuf<G>, vocab: usize, rows: &[SampleRow]) -> Vec<u32> {
        self.sample_tokens_in(logits, vocab, rows, SCRATCH_WORDS)
    }

    /// `sample_tokens` with a weight scratch of at most `scratch_words` 4-byte words (at least
    /// one row): rows go in launches of as many as fit (the parity check uses a small budget).
    pub(crate) fn sample_tokens_in(&self, logits: &CudaBuf<G>, vocab: usize, rows: &[SampleRow], scratch_words: usize) -> Vec<u32> {
        assert!(vocab > 0 && vocab <= i32::MAX as usize, "sample: vocab {vocab}");
        assert!(logits.len >= rows.len() * vocab, "sample: {} logits for {} rows of {vocab}", logits.len, rows.len());
        for r in rows {
            assert!(r.temperature >= 0.0 && r.temperature.is_finite() && r.top_p > 0.0 && r.top_p <= 1.0, "sample: bad row {r:?}");
        }
        if rows.is_empty() {
            return Vec::new();
        }
        let params: Vec<u32> = rows.iter().flat_map(row_words).collect();
        let params_d = self.upload_u32(&params);
        // f64 weights [group, vocab] (2 words each), reused by each launch of `group` rows;
        // greedy-only calls never touch it.
        let group = (scratch_words / (2 * vocab)).clamp(1, rows.len());
        let wbuf = self.alloc(if rows.iter().all(SampleRow::greedy) { 2 } else { 2 * group * vocab });
        let out = self.alloc(rows.len());
        for r0 in (0..rows.len()).step_by(group) {
            let n = group.min(rows.len() - r0);
            self.launch(
                "sampling.cu", &[], "sample_rows", (n as u32, 1, 1), SAMPLE_THREADS, 0,
                &[Arg::Ptr(logits.at(r0 * vocab)), Arg::Ptr(params_d.at(r0 * ROW_WORDS)), Arg::Ptr(wbuf.ptr), Arg::Ptr(out.at(r0)), Arg::I32(vocab as i32)],
            );
        }
        let mut bytes = vec![0u8; 4 * rows.len()];
        self.sync_point();
        self.gpu.dtoh(out.ptr, &mut bytes).unwrap_or_else(|e| panic!("sample: download: {e}"));
        bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_words_split_the_counters() {
        let r = SampleRow { temperature: 0.5, top_k: usize::MAX, top_p: 0.9, seed: 0x0123_4567_89ab_cdef, key: 0xfedc_ba98_7654_3210, sample: 7, position: 9 };
        let w = row_words(&r);
        assert_eq!(w[0] as u64 | (w[1] as u64) << 32, r.seed);
        assert_eq!(w[2] as u64 | (w[3] as u64) << 32, r.key);
        assert_eq!((w[4], w[5], f32::from_bits(w[6]), w[7], f32::from_bits(w[8])), (7, 9, 0.5, u32::MAX, 0.9));
    }
}
