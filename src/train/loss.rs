//! The masked-segment DPO loss of IPO (IPO_METHOD.md, "Loss"): per pair, the policy log-probs
//! are summed over the divergent segment only (chosen_ids / rejected_ids after the shared
//! context), compared with the frozen reference sums, and fed to -log sigmoid(beta * margin).
//! An optional SFT term adds `sft_coef` x the mean per-token NLL of the chosen segments.
//! Everything here is host-side f64 arithmetic on the per-pair sums; the per-token gradient
//! of a segment sum is the same scalar for every token of that segment. The gradient formula
//! is the backend's (`backend::SegmentDpo::grads`): the trainer's fused `Backend::segment_dpo`
//! applies it on the device, and the values reported here agree with it by construction.

use crate::backend::SegmentDpo;

/// Log-prob sums of one pair (natural log, summed over the segment's tokens).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairLogps {
    pub chosen: f64,
    pub rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    /// Number of tokens in the chosen segment (for the per-token SFT mean).
    pub chosen_tokens: usize,
}

/// The loss over one optimizer batch and its gradient w.r.t. every segment sum.
///
/// `L = mean_i softplus(-beta * z_i) + sft_coef * (sum_i -chosen_i) / (sum_i chosen_tokens_i)`
/// with `z_i = (chosen_i - ref_chosen_i) - (rejected_i - ref_rejected_i)`. The SFT mean is over
/// all chosen tokens of the batch (as TRL's `rpo_alpha` NLL), so splitting a batch into
/// micro-batches gives exactly the same gradient.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchLoss {
    /// Total loss (DPO + sft_coef x SFT).
    pub loss: f64,
    pub dpo_loss: f64,
    /// Mean per-token NLL of the chosen segments (reported even when sft_coef = 0).
    pub sft_nll: f64,
    /// Mean implicit rewards `beta * (logp - ref_logp)`.
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    /// Mean of `reward_chosen - reward_rejected` per pair.
    pub reward_margin: f64,
    /// Fraction of pairs with margin > 0.
    pub reward_accuracy: f64,
    /// Mean policy log-prob sums of the chosen and rejected segments (TRL's `logps/chosen`,
    /// `logps/rejected`).
    pub logp_chosen: f64,
    pub logp_rejected: f64,
    /// dL / d chosen_i and dL / d rejected_i `[pairs]`.
    pub d_chosen: Vec<f64>,
    pub d_rejected: Vec<f64>,
}

/// `log(1 + exp(x))` without overflow.
pub(crate) fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// The batch loss of `pairs` (all pairs of one optimizer step).
pub fn dpo_loss(pairs: &[PairLogps], beta: f64, sft_coef: f64) -> BatchLoss {
    let tokens: usize = pairs.iter().map(|p| p.chosen_tokens).sum();
    dpo_loss_part(pairs, beta, sft_coef, pairs.len(), tokens)
}

/// The share of a micro-batch `pairs` in the loss of an optimizer batch of `batch_pairs` pairs
/// and `batch_chosen_tokens` chosen tokens: the values and gradients of the micro-batches of
/// one batch add up (`BatchLoss::accumulate`) to `dpo_loss` of the whole batch.
pub(crate) fn dpo_loss_part(pairs: &[PairLogps], beta: f64, sft_coef: f64, batch_pairs: usize, batch_chosen_tokens: usize) -> BatchLoss {
    let n = batch_pairs.max(1) as f64;
    let tokens = batch_chosen_tokens.max(1) as f64;
    let h = SegmentDpo { beta, sft_coef, batch_pairs, batch_chosen_tokens };
    let mut out = BatchLoss::default();
    for p in pairs {
        let (dc, dr) = (p.chosen - p.ref_chosen, p.rejected - p.ref_rejected);
        let z = dc - dr;
        out.dpo_loss += softplus(-beta * z) / n;
        out.sft_nll += -p.chosen / tokens;
        out.reward_chosen += beta * dc / n;
        out.reward_rejected += beta * dr / n;
        out.reward_margin += beta * z / n;
        out.reward_accuracy += f64::from(u8::from(z > 0.0)) / n;
        out.logp_chosen += p.chosen / n;
        out.logp_rejected += p.rejected / n;
        // d softplus(-beta z) / dz = -beta * sigmoid(-beta z), plus the SFT term's share.
        let (d_chosen, d_rejected) = h.grads(z);
        out.d_chosen.push(d_chosen);
        out.d_rejected.push(d_rejected);
    }
    out.loss = out.dpo_loss + sft_coef * out.sft_nll;
    out
}

impl BatchLoss {
    /// Adds the share of another micro-batch of the same optimizer batch.
    pub fn accumulate(&mut self, o: &BatchLoss) {
        self.loss += o.loss;
        self.dpo_loss += o.dpo_loss;
        self.sft_nll += o.sft_nll;
        self.reward_chosen += o.reward_chosen;
        self.reward_rejected += o.reward_rejected;
        self.reward_margin += o.reward_margin;
        self.reward_accuracy += o.reward_accuracy;
        self.logp_chosen += o.logp_chosen;
        self.logp_rejected += o.logp_rejected;
        self.d_chosen.extend_from_slice(&o.d_chosen);
        self.d_rejected.extend_from_slice(&o.d_rejected);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{Backend, SegmentPair};

    /// The backend's fused loss step (the CPU reference) gives every row of a segment the
    /// gradient `dpo_loss_part` reports for that segment's sum, bit for bit (rounded to f32),
    /// and the segment sums themselves.
    #[test]
    fn segment_dpo_rows_carry_the_loss_gradients() {
        let logp: Vec<f32> = (0..23).map(|i| -0.05 - (i as f32 * 0.37).sin().abs()).collect();
        let pairs = [
            SegmentPair { chosen_start: 1, chosen_len: 4, rejected_start: 5, rejected_len: 3, ref_chosen: -2.5, ref_rejected: -1.0 },
            SegmentPair { chosen_start: 10, chosen_len: 6, rejected_start: 16, rejected_len: 7, ref_chosen: -3.0, ref_rejected: -4.2 },
        ];
        let h = SegmentDpo { beta: 0.3, sft_coef: 0.2, batch_pairs: 5, batch_chosen_tokens: 17 };
        let be = CpuBackend::<f32>::new();
        let (sums, dlogp) = be.segment_dpo(&be.upload(&logp), &pairs, &h);
        let dlogp = be.download(&dlogp);
        let rows = |s: u32, n: u32| s as usize..(s + n) as usize;
        let seg_sum = |s: u32, n: u32| logp[rows(s, n)].iter().map(|&x| x as f64).sum::<f64>();
        let lp: Vec<PairLogps> = pairs
            .iter()
            .map(|p| PairLogps {
                chosen: seg_sum(p.chosen_start, p.chosen_len),
                rejected: seg_sum(p.rejected_start, p.rejected_len),
                ref_chosen: p.ref_chosen,
                ref_rejected: p.ref_rejected,
                chosen_tokens: p.chosen_len as usize,
            })
            .collect();
        let part = dpo_loss_part(&lp, h.beta, h.sft_coef, h.batch_pairs, h.batch_chosen_tokens);
        for (k, p) in pairs.iter().enumerate() {
            assert_eq!(sums[k], (lp[k].chosen, lp[k].rejected));
            assert!(dlogp[rows(p.chosen_start, p.chosen_len)].iter().all(|&d| d == part.d_chosen[k] as f32));
            assert!(dlogp[rows(p.rejected_start, p.rejected_len)].iter().all(|&d| d == part.d_rejected[k] as f32));
        }
        assert!(dlogp[0] == 0.0 && dlogp[8..10].iter().all(|&d| d == 0.0));
    }
}
