//! The masked-segment DPO loss of IPO (IPO_METHOD.md, "Loss"): per pair, the policy log-probs
//! are summed over the divergent segment only (chosen_ids / rejected_ids after the shared
//! context), compared with the frozen reference sums, and fed to -log sigmoid(beta * margin).
//! An optional SFT term adds `sft_coef` x the mean per-token NLL of the chosen segments.
//! Everything here is host-side f64 arithmetic on the per-pair sums; the per-token gradient
//! of a segment sum is the same scalar for every token of that segment.

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
    /// dL / d chosen_i and dL / d rejected_i `[pairs]`.
    pub d_chosen: Vec<f64>,
    pub d_rejected: Vec<f64>,
}

/// `log(1 + exp(x))` without overflow.
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `1 / (1 + exp(-x))` without overflow.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The batch loss of `pairs` (all pairs of one optimizer step).
pub fn dpo_loss(pairs: &[PairLogps], beta: f64, sft_coef: f64) -> BatchLoss {
    let tokens: usize = pairs.iter().map(|p| p.chosen_tokens).sum();
    dpo_loss_part(pairs, beta, sft_coef, pairs.len(), tokens)
}

/// The share of a micro-batch `pairs` in the loss of an optimizer batch of `batch_pairs` pairs
/// and `batch_chosen_tokens` chosen tokens: the values and gradients of the micro-batches of
/// one batch add up (`BatchLoss::accumulate`) to `dpo_loss` of the whole batch.
pub fn dpo_loss_part(pairs: &[PairLogps], beta: f64, sft_coef: f64, batch_pairs: usize, batch_chosen_tokens: usize) -> BatchLoss {
    let n = batch_pairs.max(1) as f64;
    let tokens = batch_chosen_tokens.max(1) as f64;
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
        // d softplus(-beta z) / dz = -beta * sigmoid(-beta z)
        let g = -beta * sigmoid(-beta * z) / n;
        out.d_chosen.push(g - sft_coef / tokens);
        out.d_rejected.push(-g);
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
        self.d_chosen.extend_from_slice(&o.d_chosen);
        self.d_rejected.extend_from_slice(&o.d_rejected);
    }
}

/// Host reference of `Backend::segment_dpo`: per pair, the sequential f64 sums of `logp`
/// `[rows]` over its chosen and rejected rows, and `dlogp` `[rows]` holding each segment's
/// gradient from `dpo_loss_part` (rounded to f32) on its rows, 0 elsewhere.
pub fn segment_dpo_host(logp: &[f64], pairs: &[crate::backend::SegmentPair], h: &crate::backend::SegmentDpo) -> (Vec<(f64, f64)>, Vec<f32>) {
    let range = |s: u32, n: u32| {
        let r = s as usize..(s + n) as usize;
        assert!(r.end <= logp.len(), "segment rows {r:?} outside the {} log-prob rows", logp.len());
        r
    };
    let sums: Vec<(f64, f64)> = pairs
        .iter()
        .map(|p| (logp[range(p.chosen_start, p.chosen_len)].iter().sum(), logp[range(p.rejected_start, p.rejected_len)].iter().sum()))
        .collect();
    let logps: Vec<PairLogps> = pairs
        .iter()
        .zip(&sums)
        .map(|(p, &(c, r))| PairLogps { chosen: c, rejected: r, ref_chosen: p.ref_chosen, ref_rejected: p.ref_rejected, chosen_tokens: p.chosen_len as usize })
        .collect();
    let part = dpo_loss_part(&logps, h.beta, h.sft_coef, h.batch_pairs, h.batch_chosen_tokens);
    let mut d = vec![0f32; logp.len()];
    for (k, p) in pairs.iter().enumerate() {
        d[range(p.chosen_start, p.chosen_len)].fill(part.d_chosen[k] as f32);
        d[range(p.rejected_start, p.rejected_len)].fill(part.d_rejected[k] as f32);
    }
    (sums, d)
}
