//! The CPU reference of `Backend::segment_dpo` (kernels/dpo.cu is the CUDA one): the fused
//! loss step of the masked-segment DPO loss on the log-prob rows of a packed micro-batch.

use crate::backend::{SegmentDpo, SegmentPair};

/// Per pair, the sequential f64 sums of `logp` `[rows]` over its chosen and rejected rows, and
/// `dlogp` `[rows]` holding each segment's gradient (`SegmentDpo::grads` of the pair's margin,
/// rounded to f32) on its rows, 0 elsewhere.
pub(crate) fn segment_dpo(logp: &[f64], pairs: &[SegmentPair], h: &SegmentDpo) -> (Vec<(f64, f64)>, Vec<f32>) {
    let range = |s: u32, n: u32| {
        let r = s as usize..(s + n) as usize;
        assert!(r.end <= logp.len(), "segment rows {r:?} outside the {} log-prob rows", logp.len());
        r
    };
    let sums: Vec<(f64, f64)> = pairs
        .iter()
        .map(|p| (logp[range(p.chosen_start, p.chosen_len)].iter().sum(), logp[range(p.rejected_start, p.rejected_len)].iter().sum()))
        .collect();
    let mut d = vec![0f32; logp.len()];
    for (p, &(c, r)) in pairs.iter().zip(&sums) {
        let (dc, dr) = h.grads((c - p.ref_chosen) - (r - p.ref_rejected));
        d[range(p.chosen_start, p.chosen_len)].fill(dc as f32);
        d[range(p.rejected_start, p.rejected_len)].fill(dr as f32);
    }
    (sums, d)
}
