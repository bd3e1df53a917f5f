//! The lm-head log-prob forward under `Precision::Bf16` on our own tensor-core kernels
//! (kernels/lm_head_mma.cu): lm_logits_lse_mma multiplies the gathered hidden rows (gather
//! fused, h rounded RNE to bf16 as staged) by the head's bf16 copy with mma.sync and keeps the
//! logits in registers, writing per (row, vocab tile of `LM_BN`) the tile's max and sum of
//! exp, and the target's logit; lm_lse_combine merges a row's partials into lse and logp.
//! Nothing of size [rows, vocab] exists: the scratch is `[chunk, n_vtiles, 2]` partials and
//! `[chunk]` target logits (rows chunked as the cuBLAS path chunks its logits). The fp32 path
//! (the parity reference) and `IPO_LM_HEAD=cublas` keep the cuBLAS GEMM + lse_rows; the
//! backward stays on cuBLAS in both.

use super::gpu::{Arg, GpuError};
use super::{CudaBackend, CudaBuf, Gpu};
use std::sync::atomic::Ordering;

/// Rows (BM) and vocabulary columns (BN) of one lm_logits_lse_mma block (kernels/lm_head_mma.cu).
const LM_BM: usize = 64;
const LM_BN: usize = 128;

/// `IPO_LM_HEAD`: `mma` (or unset) for the tensor-core kernel under bf16, `cublas` for the
/// cuBLAS GEMM + lse_rows (so a GPU check can time both).
pub(super) fn from_env() -> Result<bool, GpuError> {
    match std::env::var("IPO_LM_HEAD").ok().as_deref().map(str::trim) {
        None | Some("") | Some("mma") => Ok(true),
        Some("cublas") => Ok(false),
        Some(other) => Err(GpuError::Device(format!("IPO_LM_HEAD={other}: expected mma or cublas"))),
    }
}

/// Vocabulary tiles of lm_logits_lse_mma for `vocab`.
pub(super) fn lm_head_vocab_tiles(vocab: usize) -> usize {
    vocab.div_ceil(LM_BN)
}

impl<G: Gpu> CudaBackend<G> {
    /// Whether the bf16 lm-head forward runs on lm_head_mma.cu (`set_lm_head_mma`).
    pub fn lm_head_mma(&self) -> bool {
        self.lm_head_mma.load(Ordering::Relaxed)
    }

    /// Picks the bf16 lm-head forward: the tensor-core kernel (true, the default unless
    /// `IPO_LM_HEAD=cublas`) or the cuBLAS GEMM + lse_rows. fp32 always uses the latter.
    pub fn set_lm_head_mma(&self, on: bool) {
        self.lm_head_mma.store(on, Ordering::Relaxed)
    }

    /// `Backend::lm_head_logprobs` under bf16 on lm_head_mma.cu: (logp, lse), each `[rows]`.
    pub(super) fn lm_head_logprobs_mma(&self, h: &CudaBuf<G>, w: &CudaBuf<G>, dim: usize, rows: &[u32], targets: &[u32]) -> (CudaBuf<G>, CudaBuf<G>) {
        assert!(!h.bf16_only, "lm_head: hidden states stored in bf16 (the kernel stages fp32 h)");
        let vocab = w.len / dim;
        let n = rows.len();
        let (logp, lse) = (self.alloc(n), self.alloc(n)); // [n] each
        if n == 0 {
            return (logp, lse);
        }
        let nvt = lm_head_vocab_tiles(vocab);
        // Rows per chunk within the budget the cuBLAS path gives its [chunk, vocab] logits.
        let chunk = self.lm_chunk(2 * nvt + 1, n);
        let (part, tgt) = (self.alloc(chunk * nvt * 2), self.alloc(chunk)); // [chunk, nvt, 2], [chunk]
        // The head's bf16 copy (cached on the weight, or the frozen weight itself), locked
        // for the launches as matmul_bf16 holds it.
        let w16 = self.bf16_of(w, w.len);
        for c0 in (0..n).step_by(chunk) {
            let rc = chunk.min(n - c0);
            let (rows_d, tg_d) = (self.upload_u32(&rows[c0..c0 + rc]), self.upload_u32(&targets[c0..c0 + rc]));
            let nmt = rc.div_ceil(LM_BM);
            let blocks = u32::try_from(nmt * nvt).expect("lm_head: grid of more than 2^32 blocks");
            self.launch(
                "lm_head_mma.cu", &[], "lm_logits_lse_mma", (blocks, 1, 1), 128, 0,
                &[
                    Arg::Ptr(h.ptr), Arg::Ptr(w16.ptr()), Arg::Ptr(rows_d.ptr), Arg::Ptr(tg_d.ptr), Arg::Ptr(part.ptr), Arg::Ptr(tgt.ptr),
                    Arg::I32(rc as i32), Arg::I32(vocab as i32), Arg::I32(dim as i32), Arg::I32(nmt as i32), Arg::I32(nvt as i32),
                ],
            );
            self.launch(
                "lm_head_mma.cu", &[], "lm_lse_combine", (rc.div_ceil(4) as u32, 1, 1), 128, 0,
                &[Arg::Ptr(part.ptr), Arg::Ptr(tgt.ptr), Arg::Ptr(logp.at(c0)), Arg::Ptr(lse.at(c0)), Arg::I32(rc as i32), Arg::I32(nvt as i32)],
            );
        }
        (logp, lse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_of_an_8b_llama_head() {
        // vocab 128256 = 1002 tiles of 128: 8192 rows need 8192 x (2 x 1002 + 1) x 4 bytes
        // (65.7 MB) of partials and target logits, where fp32 logits would take 4.2 GB.
        assert_eq!(lm_head_vocab_tiles(128256), 1002);
        assert_eq!(8192 * (2 * lm_head_vocab_tiles(128256) + 1) * 4, 65_699_840);
        assert_eq!(lm_head_vocab_tiles(1), 1);
        assert_eq!(lm_head_vocab_tiles(129), 2);
    }
}
