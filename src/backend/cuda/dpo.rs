//! Host side of the fused masked-segment DPO loss (kernels/dpo.cu): one block per pair sums
//! its segments' log-probs in f64 and writes dL/dlogp on its rows; only the per-pair sums
//! (2 x f64 per pair) come back to the host, `dlogp` stays on the device for the backward.

use super::{Arg, CudaBackend, CudaBuf, Gpu, BLOCK};
use crate::backend::{SegmentDpo, SegmentPair};

impl<G: Gpu> CudaBackend<G> {
    pub(super) fn segment_dpo_dev(&self, logp: &CudaBuf<G>, pairs: &[SegmentPair], h: &SegmentDpo) -> (Vec<(f64, f64)>, CudaBuf<G>) {
        let rows = logp.len;
        let dlogp = self.alloc(rows);
        self.fill(&dlogp, 0.0);
        if pairs.is_empty() {
            return (Vec::new(), dlogp);
        }
        for (i, p) in pairs.iter().enumerate() {
            for (s, n) in [(p.chosen_start, p.chosen_len), (p.rejected_start, p.rejected_len)] {
                assert!((s + n) as usize <= rows, "segment_dpo: pair {i} has rows {s}..{} outside the {rows} log-prob rows", s + n);
            }
        }
        let segs: Vec<i32> = pairs.iter().flat_map(|p| [p.chosen_start as i32, p.chosen_len as i32, p.rejected_start as i32, p.rejected_len as i32]).collect();
        let refs: Vec<u8> = pairs.iter().flat_map(|p| [p.ref_chosen, p.ref_rejected]).flat_map(|x| x.to_le_bytes()).collect();
        let segs_d = self.upload_i32(&segs);
        let refs_d = self.upload_bytes(4 * pairs.len(), &refs); // [pairs] double2 = 4 x 4 bytes each
        let sums_d = self.alloc(4 * pairs.len());
        let bits = |x: f64| Arg::I64(x.to_bits() as i64);
        self.launch(
            "dpo.cu", &[], "segment_dpo", (pairs.len() as u32, 1, 1), BLOCK.min(128), 0,
            &[
                Arg::Ptr(logp.ptr), Arg::Ptr(segs_d.ptr), Arg::Ptr(refs_d.ptr), Arg::Ptr(sums_d.ptr), Arg::Ptr(dlogp.ptr),
                bits(h.beta), bits(h.sft_coef), bits(h.batch_pairs.max(1) as f64), bits(h.batch_chosen_tokens.max(1) as f64),
            ],
        );
        let mut raw = vec![0u8; 16 * pairs.len()];
        self.sync_point();
        self.gpu.dtoh(sums_d.ptr, &mut raw).unwrap_or_else(|e| panic!("segment_dpo: download of the sums: {e}"));
        let f = |b: &[u8]| f64::from_le_bytes(b.try_into().unwrap());
        let sums = raw.chunks_exact(16).map(|c| (f(&c[..8]), f(&c[8..]))).collect();
        (sums, dlogp)
    }
}
