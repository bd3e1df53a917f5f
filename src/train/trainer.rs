//! `Trainer<B>`: one optimizer step of segment-DPO at a time, on any `Backend`.
//!
//! A step takes `batch_size` pairs in the seeded epoch order, runs them in micro-batches of
//! `micro_batch_size` pairs (each micro-batch one packed forward + backward; gradients
//! accumulate in the backend's gradient buffers), scales the loss so that the accumulated
//! gradient is exactly the gradient of the whole batch's loss, then checks, clips and applies
//! the update:
//! - full fine-tuning, on the backend: the global norm from `Backend::sum_squares` of every
//!   gradient buffer (one f64 per tensor comes back), then `Backend::adamw` / `sgd` on the
//!   model's own weight buffers (the fp32 master weights) and the AdamW moments, which are
//!   backend buffers too. No weight or gradient crosses to the host during a step;
//!   checkpoints download them at save time.
//! - LoRA, on the backend too: the adapters sit unmerged in the model
//!   (`crate::model::adapter`), whose backward gives `dA`, `dB` and no gradient of the frozen
//!   base weights; the norm and the update are the same ops on the adapters and their
//!   moments. Only the adapters (A and B, small) come back, for the PEFT files.
//!
//! Data parallel (`comm` of world W > 1, `crate::dist`): the step's pairs are cut into the same
//! micro-batches as at world 1, and rank r runs micro-batches r, r + W, r + 2W, ... Each
//! micro-batch's loss is scaled by the whole step's pair and chosen-token counts, so the sum
//! over ranks of their accumulated gradients (all-reduced before the norm, the clipping and the
//! update) is the world-1 gradient, and the loss values summed over ranks are the world-1
//! metrics. Full fine-tuning all-reduces every weight gradient; LoRA only the adapters'
//! gradients, overlapped with the backward of the step's last micro-batch: each decoder
//! layer's as soon as that backward has finished the layer (`Transformer::backward_buf`'s
//! callback, layers last to first), the embeddings', final norm's and lm-head's after it
//! (`Backend::all_reduce_start`: on a GPU NCCL enqueues the device buffers' sums on its own
//! stream; elsewhere each start's buffers go through one host vector and
//! `Comm::all_reduce_sum`, at once), and `Backend::all_reduce_wait` before the loss check, the
//! norm and the update. Every rank then
//! applies the same update to identical bits, so the weights never drift apart (NCCL, too,
//! gives every rank the same sum). A global batch gives the same training at any world size up
//! to fp32 rounding of the differently associated gradient sums.
//!
//! ZeRO-1 (`Trainer::data_parallel` with `zero1`, `ipo train --zero 1`; `super::zero`): each
//! rank keeps AdamW moments for its 1/world slice of the flattened trainable tensors only
//! (`Trainer::shard`) and updates only that slice. In full fine-tuning it also keeps the fp32
//! master values of that slice only (`Trainable::Full::master`), while the weights hold what
//! the products read (on CUDA under bf16 the layer matrices in bf16 only); the gradients are
//! reduce-scattered (`Backend::reduce_scatter_start`: each element's sum for its owner; NCCL
//! reduces, the host transports all-reduce), the global norm is the sum of the ranks' squares
//! of their slices, and after the update of its master slice each rank writes it into its
//! weights and all-gathers the others' (`Backend::all_gather_slices`: bf16 on a GPU under
//! bf16). LoRA keeps its adapters whole (they are small) and shards their moments. The update
//! is elementwise, so each element gets the bits it would get without sharding (up to the
//! clipping factor, whose norm adds the same squares in another order).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::data::{epoch_order, TrainPair};
use super::lora::{Lora, LoraConfig};
use super::loss::{dpo_loss_part, BatchLoss, PairLogps};
use super::optim::{apply, clip_factor, OptimConfig, OptimKind, Optimizer};
use super::zero::Shard;
use super::TrainError;
use crate::backend::{Backend, SegmentDpo, SegmentPair};
use crate::dist::{Comm, CommError};
use crate::model::adapter::{Grads, GradsMut};
use crate::model::transformer::{expected_shapes, Batch, Transformer};
use crate::model::weights::{HostTensor, ModelWeights};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub beta: f64,
    /// Weight of the mean per-token NLL of the chosen segments (0 = pure DPO).
    pub sft_coef: f64,
    pub optim: OptimConfig,
    /// Pairs per optimizer step.
    pub batch_size: usize,
    /// Pairs per forward/backward (gradient accumulation over batch_size / micro_batch_size).
    pub micro_batch_size: usize,
    pub epochs: usize,
    pub seed: u64,
    pub lora: Option<LoraConfig>,
    /// Refuse to start when the estimated peak memory exceeds this many bytes.
    pub memory_budget: Option<u64>,
}

/// What one optimizer step did (one line of metrics.jsonl).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub dpo_loss: f64,
    pub sft_nll: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    pub reward_margin: f64,
    pub reward_accuracy: f64,
    /// Mean policy log-prob sums (nats) of the chosen and rejected segments over the batch,
    /// before this step's update.
    pub logp_chosen: f64,
    pub logp_rejected: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub pairs: usize,
    /// Tokens run through the model (context once + both segments, summed over pairs).
    pub tokens: usize,
}

/// AdamW `(m, v)` per trainable tensor, optimizer order, on the host.
pub(crate) type Moments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// The tensors the optimizer updates.
pub enum Trainable<B: Backend> {
    /// All weights, in `ModelWeights::for_each` order, with their HF names and shapes; `m`,
    /// `v` are the AdamW moments as backend buffers, one per weight covering the elements
    /// `Trainer::shard` gives it (empty for SGD; made by the trainer). The fp32 master weights
    /// are the model's own weight buffers, except under ZeRO-1 (a split `shard`): there
    /// `master` holds this rank's slice of each weight in fp32 (`Backend::weight_slice`), the
    /// only fp32 copy of those elements, and the weights hold what the products read (the
    /// layer matrices in bf16 only on CUDA under bf16: `Transformer::shard_layer_matrices`).
    Full { names: Vec<String>, shapes: Vec<Vec<usize>>, m: Vec<B::Buf>, v: Vec<B::Buf>, master: Vec<B::Buf> },
    /// LoRA adapters, on the backend once the trainer is built (see the module docs).
    Lora(Lora<B>),
}

impl<B: Backend> Trainable<B> {
    /// Full fine-tuning of every weight of `model` (the trainer makes the moments).
    pub fn full(model: &Transformer<B>) -> Self {
        let (mut names, mut shapes) = (Vec::new(), Vec::new());
        expected_shapes(&model.cfg, model.weights.lm_head.is_some(), |_, s| shapes.push(s));
        model.weights.for_each(|n, _| names.push(n.to_string()));
        assert_eq!(names.len(), shapes.len(), "weights vs expected shapes of the model config");
        Trainable::Full { names, shapes, m: Vec::new(), v: Vec::new(), master: Vec::new() }
    }

    /// Element counts of the trained tensors, optimizer order.
    fn sizes(&self) -> Vec<usize> {
        match self {
            Trainable::Full { shapes, .. } => shapes.iter().map(|s| s.iter().product()).collect(),
            Trainable::Lora(l) => l.adapters.iter().flat_map(|a| [a.a.len(), a.b.len()]).collect(),
        }
    }
}

pub struct Trainer<B: Backend> {
    pub model: Transformer<B>,
    pub cfg: TrainConfig,
    pub pairs: Vec<TrainPair>,
    pub trainable: Trainable<B>,
    pub optim: Optimizer,
    /// Optimizer steps completed.
    pub step: usize,
    /// The data-parallel group (world 1 unless `data_parallel`).
    pub(crate) comm: Arc<dyn Comm>,
    /// The elements of each trainable tensor whose optimizer state this rank keeps and
    /// updates: all of them, or under ZeRO-1 this rank's slice.
    pub(crate) shard: Shard,
    /// At world > 1, all-reduce every gradient after the last micro-batch's backward, in one
    /// call, instead of each decoder layer's as soon as that backward has finished it
    /// (`set_all_reduce_after_backward`; for tests).
    all_reduce_after_backward: bool,
}

impl<B: Backend> Trainer<B> {
    /// Full fine-tuning, or LoRA with PEFT's init (seeded by `cfg.seed`) when `cfg.lora` is set.
    pub fn new(model: Transformer<B>, pairs: Vec<TrainPair>, cfg: TrainConfig) -> Result<Self, TrainError> {
        Self::data_parallel(model, pairs, cfg, crate::dist::single(), false)
    }

    /// As `new`, as one rank of `comm`'s group: every rank must hold the same model, pairs,
    /// config and step, and call `train_step` together. With `zero1` (and AdamW: SGD keeps no
    /// state) each rank keeps the moments of its 1/world slice of the trainable elements only
    /// (ZeRO-1, `super::zero`). At world > 1 the backend first joins the group
    /// (`Backend::join_group`: NCCL on a GPU; a missing libnccl.so.2 fails here, on every rank,
    /// before any step).
    pub fn data_parallel(model: Transformer<B>, pairs: Vec<TrainPair>, cfg: TrainConfig, comm: Arc<dyn Comm>, zero1: bool) -> Result<Self, TrainError> {
        if comm.world() > 1 {
            let c = &*comm;
            model.backend.join_group(c.rank(), c.world(), c.timeout(), &mut |mine| Ok(c.all_gather(mine)?)).map_err(comm_error)?;
        }
        let trainable = match &cfg.lora {
            None => Trainable::full(&model),
            Some(lc) => Trainable::Lora(Lora::init(lc.clone(), &model.cfg, cfg.seed)?),
        };
        let sizes = trainable.sizes();
        let shard = if zero1 && cfg.optim.kind == OptimKind::Adamw && comm.world() > 1 {
            Shard::zero1(&sizes, comm.rank(), comm.world())
        } else {
            Shard::whole(&sizes)
        };
        Self::build(model, pairs, cfg, trainable, comm, shard)
    }

    /// With explicit trainable state (LoRA adapters loaded or fixed by a test; the model holds
    /// the base weights, into which the adapters are then merged).
    pub fn with_trainable(model: Transformer<B>, pairs: Vec<TrainPair>, cfg: TrainConfig, trainable: Trainable<B>) -> Result<Self, TrainError> {
        let shard = Shard::whole(&trainable.sizes());
        Self::build(model, pairs, cfg, trainable, crate::dist::single(), shard)
    }

    /// Checks the config and the memory, then makes the zero AdamW moments of the elements
    /// `shard` owns (only those: that is ZeRO-1's saving) and attaches LoRA adapters.
    fn build(model: Transformer<B>, pairs: Vec<TrainPair>, cfg: TrainConfig, trainable: Trainable<B>, comm: Arc<dyn Comm>, shard: Shard) -> Result<Self, TrainError> {
        check_config(&cfg, pairs.len())?;
        // Every moment lives on the backend.
        let optim = Optimizer::new(cfg.optim, &[]);
        let mut t = Self { model, cfg, pairs, trainable, optim, step: 0, comm, shard, all_reduce_after_backward: false };
        t.check_memory()?;
        let kind = t.cfg.optim.kind;
        match &mut t.trainable {
            Trainable::Full { m, v, master, .. } if kind == OptimKind::Adamw => {
                let be = &t.model.backend;
                *m = t.shard.ranges.iter().map(|r| be.zeros(r.len())).collect();
                *v = t.shard.ranges.iter().map(|r| be.zeros(r.len())).collect();
                if t.shard.is_split() {
                    *master = master_slices(be, &t.model.weights, &t.shard);
                    t.model.shard_layer_matrices();
                }
            }
            Trainable::Full { .. } => {}
            Trainable::Lora(l) => l.attach(&mut t.model, kind, &t.shard)?,
        }
        Ok(t)
    }

    pub(crate) fn steps_per_epoch(&self) -> usize {
        self.pairs.len().div_ceil(self.cfg.batch_size)
    }
    pub fn total_steps(&self) -> usize {
        self.cfg.epochs * self.steps_per_epoch()
    }
    pub fn done(&self) -> bool {
        self.step >= self.total_steps()
    }

    /// Pair indices of optimizer step `step` (0-based): a slice of its epoch's shuffled order
    /// (the last batch of an epoch may be smaller).
    pub fn batch_indices(&self, step: usize) -> Vec<usize> {
        let spe = self.steps_per_epoch();
        let (epoch, k) = (step / spe, step % spe);
        let order = epoch_order(self.pairs.len(), self.cfg.seed, epoch);
        let end = ((k + 1) * self.cfg.batch_size).min(order.len());
        order[k * self.cfg.batch_size..end].to_vec()
    }

    /// Names, shapes and values of the tensors the optimizer updates, in optimizer order (for
    /// checkpoints and tests). Full fine-tuning downloads the master weights.
    pub fn trainable_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        match &self.trainable {
            Trainable::Full { names, shapes, .. } => {
                let mut out = Vec::new();
                self.model.weights.for_each(|_, w| {
                    let k = out.len();
                    out.push((names[k].clone(), shapes[k].clone(), self.model.backend.download(w)));
                });
                out
            }
            Trainable::Lora(l) => l
                .adapters
                .iter()
                .flat_map(|a| {
                    let p = a.peft_prefix();
                    [
                        (format!("{p}.lora_A.weight"), vec![l.cfg.rank, a.inp], a.a.clone()),
                        (format!("{p}.lora_B.weight"), vec![a.out, l.cfg.rank], a.b.clone()),
                    ]
                })
                .collect(),
        }
    }

    /// `trainable_tensors` with the fp32 master values: under ZeRO-1 every rank's master slices
    /// all-gathered (so every rank must call it together: checkpoints, the final weights),
    /// otherwise `trainable_tensors`.
    pub(crate) fn full_trainable(&self) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>, TrainError> {
        match &self.trainable {
            Trainable::Full { names, shapes, master, .. } if !master.is_empty() => {
                let be = &self.model.backend;
                let mine: Vec<f32> = master.iter().flat_map(|b| be.download(b)).collect();
                let whole = self.shard.all_gather(&*self.comm, &mine)?;
                Ok(names.iter().cloned().zip(shapes.iter().cloned()).zip(whole).map(|((n, s), x)| (n, s, x)).collect())
            }
            _ => Ok(self.trainable_tensors()),
        }
    }

    /// The fully fine-tuned weights to save (`full_trainable` in the model's structure): a
    /// collective under ZeRO-1, as `full_trainable`.
    pub(crate) fn export_full_weights(&self) -> Result<ModelWeights<HostTensor>, TrainError> {
        let mut it = self.full_trainable()?.into_iter();
        Ok(self.model.weights.map(|_| {
            let (_, shape, x) = it.next().expect("one tensor per weight");
            HostTensor::new(shape, x)
        }))
    }

    /// Names and element counts of the trainable tensors, in optimizer order (no transfers).
    pub(crate) fn trainable_sizes(&self) -> Vec<(String, usize)> {
        let names: Vec<String> = match &self.trainable {
            Trainable::Full { names, .. } => names.clone(),
            Trainable::Lora(l) => l
                .adapters
                .iter()
                .flat_map(|a| {
                    let p = a.peft_prefix();
                    [format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight")]
                })
                .collect(),
        };
        names.into_iter().zip(self.trainable.sizes()).collect()
    }

    /// Replaces the trainable tensors (optimizer order, sizes as `trainable_sizes`) and
    /// updates the model: uploads the master weights, or the adapters (merged again).
    pub(crate) fn set_trainable(&mut self, values: Vec<Vec<f32>>) {
        let sizes = self.trainable_sizes();
        assert_eq!(values.len(), sizes.len(), "set_trainable: {} tensors for {} trainable", values.len(), sizes.len());
        for ((n, len), x) in sizes.iter().zip(&values) {
            assert_eq!(x.len(), *len, "set_trainable: {n} has {} values, expected {len}", x.len());
        }
        match &mut self.trainable {
            Trainable::Full { master, .. } => {
                let be = &self.model.backend;
                let mut it = values.into_iter();
                self.model.weights.for_each_mut(|_, w| *w = be.upload_weight(&it.next().unwrap()));
                if !master.is_empty() {
                    *master = master_slices(be, &self.model.weights, &self.shard);
                    self.model.shard_layer_matrices();
                }
            }
            Trainable::Lora(l) => l.set_params(&mut self.model, values),
        }
    }

    /// The AdamW moments `(m, v)` this rank holds per trainable tensor, in optimizer order,
    /// downloaded to the host: whole tensors, or under ZeRO-1 this rank's pieces (`shard`);
    /// empty for SGD.
    pub fn moments(&self) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        match &self.trainable {
            Trainable::Full { m, v, .. } => {
                let be = &self.model.backend;
                (m.iter().map(|b| be.download(b)).collect(), v.iter().map(|b| be.download(b)).collect())
            }
            Trainable::Lora(l) => l.moments(&self.model.backend),
        }
    }

    /// The whole AdamW moments of every trainable tensor (as `moments` at world 1) on every
    /// rank: under ZeRO-1 every rank's pieces are all-gathered, so every rank must call it
    /// together (checkpoints).
    pub(crate) fn full_moments(&self) -> Result<Moments, TrainError> {
        let (m, v) = self.moments();
        if !self.shard.is_split() {
            return Ok((m, v));
        }
        Ok((self.shard.all_gather(&*self.comm, &m.concat())?, self.shard.all_gather(&*self.comm, &v.concat())?))
    }

    /// AdamW state elements (m and v) this rank holds on the backend: twice the trainable
    /// elements, under ZeRO-1 about 1/world of that; 0 for SGD.
    pub(crate) fn optimizer_state_len(&self) -> usize {
        let be = &self.model.backend;
        match &self.trainable {
            Trainable::Full { m, v, .. } => m.iter().chain(v).map(|x| be.len(x)).sum(),
            Trainable::Lora(l) => l.moments_len(be),
        }
    }

    /// Replaces the AdamW moments with whole tensors (as `full_moments` returns them; this
    /// rank keeps the pieces its `shard` owns).
    pub(crate) fn set_moments(&mut self, m: Vec<Vec<f32>>, v: Vec<Vec<f32>>) {
        let sizes = self.trainable_sizes();
        let want = if self.cfg.optim.kind == OptimKind::Adamw { sizes.len() } else { 0 };
        assert!(m.len() == want && v.len() == want, "set_moments: {} / {} tensors, expected {want}", m.len(), v.len());
        for (((n, len), a), b) in sizes.iter().zip(&m).zip(&v) {
            assert!(a.len() == *len && b.len() == *len, "set_moments: {n} has {} / {} values, expected {len}", a.len(), b.len());
        }
        let (m, v) = if want == 0 { (m, v) } else { (self.shard.pieces(&m), self.shard.pieces(&v)) };
        match &mut self.trainable {
            Trainable::Full { m: md, v: vd, .. } => {
                let be = &self.model.backend;
                *md = m.iter().map(|x| be.upload(x)).collect();
                *vd = v.iter().map(|x| be.upload(x)).collect();
            }
            Trainable::Lora(l) => l.set_moments(&self.model.backend, &m, &v),
        }
    }

    /// The weights to save: the master weights, or the base with the adapters merged in.
    pub fn export_weights(&self) -> ModelWeights<HostTensor> {
        self.model.merged_host_weights()
    }

    /// Loss of the pairs `idx` as one optimizer batch, and the gradient of that loss w.r.t.
    /// every model weight, or with LoRA every adapter (accumulated over micro-batches). `step`
    /// only labels errors.
    pub fn loss_and_grads(&self, idx: &[usize], step: usize) -> Result<(BatchLoss, Grads<B::Buf>, usize), TrainError> {
        self.loss_and_grads_shard(idx, step, 0, 1)
    }

    /// All-reduces every gradient in one call after the last micro-batch's backward (the way
    /// before the overlapped all-reduce) instead of layer by layer during it: the same sums,
    /// bit for bit on the host path; tests compare the two.
    #[doc(hidden)]
    pub fn set_all_reduce_after_backward(&mut self, on: bool) {
        self.all_reduce_after_backward = on;
    }

    /// As `loss_and_grads`, for the micro-batches `j` of the batch `idx` with
    /// `j % world == rank` only: this rank's share of the loss values and of the gradient (both
    /// scaled for the whole batch, so the shares of all ranks add up to the batch's). A
    /// non-finite loss stops at once at world 1; in a group the step goes on, so that every
    /// rank sees it in the summed loss and fails the same way.
    ///
    /// At world > 1 it also starts the all-reduce of the gradients over the group
    /// (`Backend::all_reduce_start`; the caller waits with `all_reduce_wait`): each decoder
    /// layer's as soon as the backward of this rank's last micro-batch has finished it (layers
    /// last to first), then those of the embeddings, final norm and lm-head after it. A rank
    /// with no micro-batch in this step starts the same buffers in the same order after
    /// nothing. On the host path every start is one rank-order sum of the call's buffers,
    /// elementwise, so the bits are those of one all-reduce of everything after the backward.
    fn loss_and_grads_shard(&self, idx: &[usize], step: usize, rank: usize, world: usize) -> Result<(BatchLoss, Grads<B::Buf>, usize), TrainError> {
        let be = &self.model.backend;
        let mut grads = self.model.zero_grads_for_training();
        let batch_tokens: usize = idx.iter().map(|&i| self.pairs[i].chosen.len()).sum();
        let mut total = BatchLoss::default();
        let mut tokens = 0;
        let mbs: Vec<&[usize]> = idx.chunks(self.cfg.micro_batch_size.max(1)).skip(rank).step_by(world).collect();
        let overlap = world > 1 && !self.all_reduce_after_backward;
        // Layers `unreduced..` have been started, and the first error of a start.
        let (mut unreduced, mut failed) = (self.model.cfg.num_layers, None);
        for (j, mb) in mbs.iter().enumerate() {
            let mut batch = Batch::default();
            let ranges: Vec<_> = mb
                .iter()
                .map(|&i| {
                    let p = &self.pairs[i];
                    batch.push_pair(&p.context, &p.chosen, &p.rejected)
                })
                .collect();
            tokens += batch.num_tokens();
            let (logp, tape) = self.model.forward(&batch)?;
            // The fused segment loss: per-pair sums come back for the reported values, dL/dlogp
            // stays on the backend for the backward.
            let segs: Vec<SegmentPair> = mb
                .iter()
                .zip(&ranges)
                .map(|(&i, (c, r))| SegmentPair {
                    chosen_start: c.start as u32,
                    chosen_len: c.len() as u32,
                    rejected_start: r.start as u32,
                    rejected_len: r.len() as u32,
                    ref_chosen: self.pairs[i].ref_chosen,
                    ref_rejected: self.pairs[i].ref_rejected,
                })
                .collect();
            let h = SegmentDpo { beta: self.cfg.beta, sft_coef: self.cfg.sft_coef, batch_pairs: idx.len(), batch_chosen_tokens: batch_tokens };
            let (seg_sums, dlogp) = be.segment_dpo(&logp, &segs, &h);
            let sums: Vec<PairLogps> = segs
                .iter()
                .zip(&seg_sums)
                .map(|(p, &(c, r))| PairLogps {
                    chosen: c,
                    rejected: r,
                    ref_chosen: p.ref_chosen,
                    ref_rejected: p.ref_rejected,
                    chosen_tokens: p.chosen_len as usize,
                })
                .collect();
            let part = dpo_loss_part(&sums, self.cfg.beta, self.cfg.sft_coef, idx.len(), batch_tokens);
            if !part.loss.is_finite() && world == 1 {
                return Err(self.non_finite(step, "loss", part.loss, idx));
            }
            let mut layer_done = |l: usize, g: &mut GradsMut<'_, B::Buf>| {
                unreduced = l;
                self.all_reduce_start(layer_grads(g, l), &self.layer_tensors(l), &mut failed);
            };
            let done: Option<&mut dyn FnMut(usize, &mut GradsMut<'_, B::Buf>)> = if overlap && j + 1 == mbs.len() { Some(&mut layer_done) } else { None };
            self.model.backward_buf(&batch, tape, &dlogp, grads.as_mut(), done);
            total.accumulate(&part);
        }
        if world > 1 {
            let mut g = grads.as_mut();
            if overlap {
                for l in (0..unreduced).rev() {
                    self.all_reduce_start(layer_grads(&mut g, l), &self.layer_tensors(l), &mut failed);
                }
                self.all_reduce_start(rest_grads(&mut g), &self.rest_tensors(), &mut failed);
            } else {
                let n = self.shard.ranges.len();
                self.all_reduce_start(all_grads(&mut g), &(0..n).collect::<Vec<_>>(), &mut failed);
            }
            if let Some(e) = failed {
                // Nothing may free the buffers before the started sums have stopped.
                let _ = be.all_reduce_wait();
                return Err(e);
            }
        }
        Ok((total, grads, tokens))
    }

    /// Host gradients of the trainable tensors, in optimizer order.
    pub fn trainable_grads(&self, grads: &Grads<B::Buf>) -> Vec<Vec<f32>> {
        let be = &self.model.backend;
        match (&self.trainable, grads) {
            (Trainable::Full { .. }, Grads::Full(g)) => {
                let mut out = Vec::new();
                g.for_each(|_, g| out.push(be.download(g)));
                out
            }
            (Trainable::Lora(l), Grads::Adapters(g)) => l
                .adapters
                .iter()
                .flat_map(|ad| {
                    let d = g[ad.layer][ad.target.index()].as_ref().expect("a gradient for every adapter");
                    [be.download(&d.a), be.download(&d.b)]
                })
                .collect(),
            _ => panic!("trainable_grads: gradients of another kind of training"),
        }
    }

    /// Runs the next optimizer step. On a non-finite loss or gradient nothing is updated and
    /// the error names the step and the pair ids of the batch.
    pub fn train_step(&mut self) -> Result<StepMetrics, TrainError> {
        let step = self.step;
        let total_steps = self.total_steps();
        if step >= total_steps {
            return Err(TrainError::Config(format!("training is complete ({total_steps} steps)")));
        }
        let idx = self.batch_indices(step);
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let (mut loss, grads, mut tokens) = self.loss_and_grads_shard(&idx, step + 1, rank, world)?;
        if world > 1 {
            // The gradients are summed now, before the norm, the clipping and the update.
            self.model.backend.all_reduce_wait().map_err(comm_error)?;
            (loss, tokens) = self.reduce_loss(loss, tokens)?;
            if !loss.loss.is_finite() {
                return Err(self.non_finite(step + 1, "loss", loss.loss, &idx));
            }
        }
        let lr = self.cfg.optim.lr_at(step, total_steps);
        let norm = match (&self.trainable, grads) {
            (Trainable::Full { .. }, Grads::Full(g)) => self.update_full(&g, lr, &idx)?,
            (Trainable::Lora(l), grads) => {
                let g = l.ordered_grads(grads); // [2 * adapters]: dA, dB per adapter
                self.update_lora(g, lr, &idx)?
            }
            (Trainable::Full { .. }, Grads::Adapters(_)) => unreachable!("full fine-tuning of a model with adapters"),
        };
        self.step += 1;
        Ok(StepMetrics {
            step: self.step,
            epoch: self.step as f64 / self.steps_per_epoch() as f64,
            loss: loss.loss,
            dpo_loss: loss.dpo_loss,
            sft_nll: loss.sft_nll,
            reward_chosen: loss.reward_chosen,
            reward_rejected: loss.reward_rejected,
            reward_margin: loss.reward_margin,
            reward_accuracy: loss.reward_accuracy,
            logp_chosen: loss.logp_chosen,
            logp_rejected: loss.logp_rejected,
            lr,
            grad_norm: norm,
            pairs: idx.len(),
            tokens,
        })
    }

    /// The batch's loss values and token count: the sums of every rank's shares.
    fn reduce_loss(&self, l: BatchLoss, tokens: usize) -> Result<(BatchLoss, usize), TrainError> {
        let mut v = [
            l.loss, l.dpo_loss, l.sft_nll, l.reward_chosen, l.reward_rejected, l.reward_margin, l.reward_accuracy,
            l.logp_chosen, l.logp_rejected, tokens as f64,
        ];
        self.comm.all_reduce_sum_f64(&mut v)?;
        let [loss, dpo_loss, sft_nll, reward_chosen, reward_rejected, reward_margin, reward_accuracy, logp_chosen, logp_rejected, tokens] = v;
        let sum = BatchLoss {
            loss, dpo_loss, sft_nll, reward_chosen, reward_rejected, reward_margin, reward_accuracy, logp_chosen, logp_rejected,
            // Per-pair gradients stay with the rank that ran the pair.
            d_chosen: l.d_chosen,
            d_rejected: l.d_rejected,
        };
        Ok((sum, tokens as usize))
    }

    /// `Backend::all_reduce_start` of `bufs` over this trainer's group, or under ZeRO-1 of full
    /// fine-tuning `Backend::reduce_scatter_start` (each element summed for the rank that
    /// owns it; `tensors` are the buffers' optimizer indices, which say who owns what): on the
    /// device where the backend joined the group (`data_parallel`: NCCL on a GPU), else at
    /// once through the host collective (`Comm::all_reduce_sum`, the sum in rank order, the
    /// same bits on every rank). Nothing after a failure (kept in `failed`), and nothing for no
    /// buffers (the same on every rank).
    fn all_reduce_start(&self, mut bufs: Vec<&mut B::Buf>, tensors: &[usize], failed: &mut Option<TrainError>) {
        if failed.is_some() || bufs.is_empty() {
            return;
        }
        let comm = &*self.comm;
        let host_sum = &mut |x: &mut [f32]| Ok(comm.all_reduce_sum(x)?);
        let r = if self.masters_split() {
            assert_eq!(tensors.len(), bufs.len(), "one optimizer index per gradient buffer");
            let owners: Vec<_> = tensors.iter().map(|&i| self.shard.owners(i)).collect();
            self.model.backend.reduce_scatter_start(&mut bufs, &owners, host_sum)
        } else {
            self.model.backend.all_reduce_start(&mut bufs, host_sum)
        };
        *failed = r.err().map(|e| comm_error(e).into());
    }

    /// Whether this is full fine-tuning under ZeRO-1: fp32 master slices, gradients summed
    /// for their owners only, updated slices all-gathered into the weights.
    fn masters_split(&self) -> bool {
        matches!(&self.trainable, Trainable::Full { master, .. } if !master.is_empty())
    }

    /// Optimizer indices of decoder layer `l`'s weights (`ModelWeights::for_each` order: the
    /// embeddings, every layer's weights, the final norm, an untied lm-head).
    fn layer_tensors(&self, l: usize) -> Vec<usize> {
        let per = self.layer_len();
        (1 + l * per..1 + (l + 1) * per).collect()
    }

    /// Optimizer indices of `rest_grads`: the embeddings, the final norm, an untied lm-head.
    fn rest_tensors(&self) -> Vec<usize> {
        let end = 1 + self.model.cfg.num_layers * self.layer_len();
        let head = self.model.weights.lm_head.is_some() as usize;
        [0].into_iter().chain(end..end + 1 + head).collect()
    }

    /// Weights per decoder layer.
    fn layer_len(&self) -> usize {
        let mut n = 0;
        self.model.weights.layers[0].for_each(|_, _| n += 1);
        n
    }

    /// Full fine-tuning update on the backend: global norm, clipping factor, then AdamW/SGD on
    /// every weight buffer in place (under ZeRO-1: `update_master_slices`). Returns the norm
    /// before clipping; a non-finite norm updates nothing.
    fn update_full(&mut self, grads: &ModelWeights<B::Buf>, lr: f64, idx: &[usize]) -> Result<f64, TrainError> {
        let be = &self.model.backend;
        let mut g: Vec<&B::Buf> = Vec::new(); // in ModelWeights::for_each order
        grads.for_each(|_, x| g.push(x));
        let split = self.masters_split();
        let norm = if split {
            // Each rank holds the sums of its slice only: the squares of the slices, added
            // over the group.
            let parts: Vec<(&B::Buf, std::ops::Range<usize>)> = g.iter().zip(&self.shard.ranges).map(|(x, r)| (*x, r.clone())).collect();
            let mut s = [be.sum_squares_slices(&parts).iter().sum::<f64>()];
            self.comm.all_reduce_sum_f64(&mut s)?;
            s[0].sqrt()
        } else {
            grad_norm(be, &g)
        };
        if !norm.is_finite() {
            return Err(self.non_finite(self.step + 1, "gradient norm", norm, idx));
        }
        let h = self.optim.hparams(lr, clip_factor(norm, self.cfg.optim.max_grad_norm));
        if split {
            self.update_master_slices(&g, &h)?;
            self.optim.steps += 1;
            return Ok(norm);
        }
        let kind = self.cfg.optim.kind;
        let Trainable::Full { shapes, m, v, .. } = &mut self.trainable else { unreachable!("update_full on LoRA") };
        let mut moments = m.iter_mut().zip(v.iter_mut());
        let (shard, mut i) = (&self.shard, 0);
        self.model.weights.for_each_mut(|_, w| {
            let (r, mv) = (&shard.ranges[i], moments.next());
            if !r.is_empty() {
                // Weight decay on matrices, not on norms and biases.
                apply(be, kind, &h, shapes[i].len() >= 2, w, g[i], r.start, mv);
            }
            i += 1;
        });
        assert_eq!(i, g.len(), "one gradient per weight");
        self.optim.steps += 1;
        Ok(norm)
    }

    /// ZeRO-1's update of full fine-tuning: AdamW on this rank's fp32 master slices with the
    /// summed gradients of their elements, the results written into the weights' own storage
    /// (`Backend::set_weight_slice`), then every rank's updated slices all-gathered
    /// (`Backend::all_gather_slices`: NCCL broadcasts of bf16 values on a GPU under bf16).
    /// Every element gets the AdamW update it gets without sharding, bit for bit.
    fn update_master_slices(&mut self, g: &[&B::Buf], h: &crate::backend::AdamwStep) -> Result<(), TrainError> {
        let be = &self.model.backend;
        let Trainable::Full { shapes, m, v, master, .. } = &mut self.trainable else { unreachable!("ZeRO-1 masters of LoRA") };
        let mut ws = all_weights(&mut self.model.weights);
        assert!(ws.len() == g.len() && master.len() == g.len(), "one master slice and gradient per weight");
        let shard = &self.shard;
        for (i, r) in shard.ranges.iter().enumerate() {
            if r.is_empty() {
                continue;
            }
            // Weight decay on matrices, not on norms and biases.
            let wd = if shapes[i].len() >= 2 { h.weight_decay } else { 0.0 };
            be.adamw_slice(&mut master[i], g[i], r.start, &mut m[i], &mut v[i], &crate::backend::AdamwStep { weight_decay: wd, ..*h });
            be.set_weight_slice(ws[i], r.start, &master[i]);
        }
        let pieces: Vec<(usize, std::ops::Range<usize>, usize)> = (0..ws.len()).flat_map(|i| shard.owners(i).into_iter().map(move |(r, o)| (i, r, o))).collect();
        let comm = &*self.comm;
        be.all_gather_slices(comm.rank(), &mut ws, &pieces, &mut |b| Ok(comm.all_gather(b)?)).map_err(comm_error)?;
        Ok(())
    }

    /// LoRA update on the backend from the adapters' gradients `g` (optimizer order): their
    /// global norm, clipping factor, AdamW/SGD on A and B. Returns the norm.
    fn update_lora(&mut self, g: Vec<B::Buf>, lr: f64, idx: &[usize]) -> Result<f64, TrainError> {
        let be = &self.model.backend;
        let norm = grad_norm(be, &g.iter().collect::<Vec<_>>());
        if !norm.is_finite() {
            return Err(self.non_finite(self.step + 1, "gradient norm", norm, idx));
        }
        let h = self.optim.hparams(lr, clip_factor(norm, self.cfg.optim.max_grad_norm));
        let Trainable::Lora(l) = &mut self.trainable else { unreachable!() };
        l.update(&mut self.model, &g, self.cfg.optim.kind, &h, &self.shard, &*self.comm)?;
        self.optim.steps += 1;
        Ok(norm)
    }

    fn non_finite(&self, step: usize, what: &str, value: f64, idx: &[usize]) -> TrainError {
        let ids = idx.iter().map(|&i| self.pairs[i].id.as_str()).collect::<Vec<_>>().join(", ");
        TrainError::NonFinite { step, what: what.into(), value, ids }
    }

    /// Refuses to start when `cfg.memory_budget` is below the estimate of `train::plan` for
    /// the largest micro-batch any step can see (what `ipo train` also checks before it
    /// uploads the weights).
    fn check_memory(&self) -> Result<(), TrainError> {
        let Some(budget) = self.cfg.memory_budget else { return Ok(()) };
        let lens: Vec<_> = self.pairs.iter().map(|p| (p.context.len(), p.chosen.len(), p.rejected.len())).collect();
        let longest = self.pairs.iter().max_by_key(|p| p.packed_tokens()).map_or("", |p| p.id.as_str());
        let shards = if self.shard.is_split() { self.comm.world() } else { 1 };
        super::plan::check_train_memory(&self.model.cfg, &self.cfg, self.model.backend.precision(), self.model.recompute(), shards, &lens, longest, budget)
    }
}

fn check_config(cfg: &TrainConfig, n_pairs: usize) -> Result<(), TrainError> {
    let bad = |m: &str| Err(TrainError::Config(m.into()));
    if n_pairs == 0 {
        return bad("no training pairs");
    }
    if !(cfg.beta > 0.0 && cfg.beta.is_finite()) {
        return bad("--beta must be > 0");
    }
    if !(cfg.sft_coef >= 0.0 && cfg.sft_coef.is_finite()) {
        return bad("--sft-coef must be >= 0");
    }
    if cfg.batch_size == 0 || cfg.micro_batch_size == 0 {
        return bad("--batch-size and --micro-batch-size must be > 0");
    }
    if cfg.micro_batch_size > cfg.batch_size {
        return bad("--micro-batch-size must be <= --batch-size");
    }
    if cfg.epochs == 0 {
        return bad("--epochs must be > 0");
    }
    let o = &cfg.optim;
    if !(o.lr >= 0.0 && o.lr.is_finite()) {
        return bad("--lr must be >= 0");
    }
    if !(0.0..1.0).contains(&o.warmup_ratio) {
        return bad("--warmup-ratio must be in [0, 1)");
    }
    if !(o.max_grad_norm >= 0.0) || !(o.weight_decay >= 0.0) {
        return bad("--max-grad-norm and --weight-decay must be >= 0");
    }
    Ok(())
}

/// A collective's error back from the backend: the group's own (`CommError`, passed through
/// `Backend::all_reduce_start`), or the device's (NCCL).
fn comm_error(e: anyhow::Error) -> CommError {
    e.downcast::<CommError>().unwrap_or_else(|e| CommError::Device(format!("{e:#}")))
}

/// Collects `n` distinct buffers that a `for_each_mut` lends one at a time.
///
/// SAFETY (of the caller): the pointers are to distinct buffers inside one value that stays
/// mutably borrowed, and otherwise untouched, for `'g` (a tied lm_head is `None`, not an alias
/// of `embed`).
unsafe fn lent<'g, Buf>(ptrs: Vec<*mut Buf>) -> Vec<&'g mut Buf> {
    ptrs.into_iter().map(|p| unsafe { &mut *p }).collect()
}

/// The gradient buffers of decoder layer `l`: its weights' (`LayerWeights::for_each_mut`
/// order) or its adapters' (dA, dB by target).
fn layer_grads<'g, Buf>(g: &'g mut GradsMut<'_, Buf>, l: usize) -> Vec<&'g mut Buf> {
    match g {
        GradsMut::Full(w) => {
            let mut ptrs = Vec::new();
            w.layers[l].for_each_mut(|_, b| ptrs.push(b as *mut Buf));
            unsafe { lent(ptrs) } // SAFETY: distinct fields of `w.layers[l]`, borrowed for 'g
        }
        GradsMut::Adapters(a) => a[l].iter_mut().flatten().flat_map(|d| [&mut d.a, &mut d.b]).collect(),
    }
}

/// The gradient buffers that are final only after the whole backward: the embeddings', the
/// final norm's and an untied lm-head's (none for adapters).
fn rest_grads<'g, Buf>(g: &'g mut GradsMut<'_, Buf>) -> Vec<&'g mut Buf> {
    match g {
        GradsMut::Full(w) => {
            let ModelWeights { embed, final_norm, lm_head, .. } = &mut **w;
            [Some(embed), Some(final_norm), lm_head.as_mut()].into_iter().flatten().collect()
        }
        GradsMut::Adapters(_) => Vec::new(),
    }
}

/// Every weight buffer, `ModelWeights::for_each_mut` order.
fn all_weights<Buf>(w: &mut ModelWeights<Buf>) -> Vec<&mut Buf> {
    let mut ptrs = Vec::new();
    w.for_each_mut(|_, b| ptrs.push(b as *mut Buf));
    unsafe { lent(ptrs) } // SAFETY: distinct fields of `w`, borrowed for the result's life
}

/// This rank's fp32 master slice of each weight (`shard.ranges`, optimizer order).
fn master_slices<B: Backend>(be: &B, w: &ModelWeights<B::Buf>, shard: &Shard) -> Vec<B::Buf> {
    let mut out = Vec::new();
    w.for_each(|_, x| {
        let r = &shard.ranges[out.len()];
        out.push(be.weight_slice(x, r.start, r.len()));
    });
    out
}

/// Every gradient buffer (`ModelWeights::for_each_mut` order, or the adapters' by layer).
fn all_grads<'g, Buf>(g: &'g mut GradsMut<'_, Buf>) -> Vec<&'g mut Buf> {
    match g {
        GradsMut::Full(w) => {
            let mut ptrs = Vec::new();
            w.for_each_mut(|_, b| ptrs.push(b as *mut Buf));
            unsafe { lent(ptrs) } // SAFETY: distinct fields of `w`, borrowed for 'g
        }
        GradsMut::Adapters(a) => a.iter_mut().flatten().flatten().flat_map(|d| [&mut d.a, &mut d.b]).collect(),
    }
}

/// The global L2 norm of gradient buffers: their sums of squares with one `sum_squares_many`
/// (one device sync), added in order.
fn grad_norm<B: Backend>(be: &B, g: &[&B::Buf]) -> f64 {
    be.sum_squares_many(g).iter().sum::<f64>().sqrt()
}
