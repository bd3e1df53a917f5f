//! The batched decoding engine: continuous batching over a paged KV cache. Each step packs
//! the new tokens of every running sequence (single decode tokens, plus prefill chunks up to
//! `prefill_chunk` tokens in all) into one `forward_cached`, samples the sequences whose
//! pending tokens are all in the cache, retires finished ones and admits waiting ones. When
//! the pool is full the lowest-priority running sequence (the latest request) is preempted:
//! its blocks are freed and it is recomputed later from its ids. A request that can never fit
//! is reported as a per-request failure; nothing panics and nothing is silently cut short.
//!
//! Splicing: a finished sequence can be *kept* (its K/V stay in the cache behind a
//! `SeqHandle`). A later request may name a kept handle and a position: it forks the cached
//! prefix (sharing its blocks) and computes only the tokens after it.

use std::collections::HashMap;

use super::blocks::{BlockError, BlockManager, Extension, SeqId};
use super::sampler::SamplingParams;
use crate::backend::{Backend, KvGeom, PagedSeq};
use crate::model::decode::DecodeStep;
use crate::model::transformer::{ForwardError, Transformer};

/// Sizes of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Blocks in the KV pool.
    pub num_blocks: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Most prefill tokens (over all sequences) in one step; decode tokens come on top.
    pub prefill_chunk: usize,
    /// Most sequences running at once.
    pub max_batch: usize,
}

impl EngineConfig {
    /// Bytes of K/V one block holds over all layers (`bytes_per_value` = 4 for f32).
    pub(crate) fn block_bytes<B: Backend>(model: &Transformer<B>, block_size: usize, bytes_per_value: usize) -> usize {
        model.cfg.num_layers * model.kv_geom(1, block_size).block_len() * bytes_per_value
    }

    /// As many blocks as fit in `kv_cache_mb` MiB.
    pub(crate) fn from_budget<B: Backend>(
        model: &Transformer<B>,
        kv_cache_mb: f64,
        block_size: usize,
        bytes_per_value: usize,
        prefill_chunk: usize,
        max_batch: usize,
    ) -> Self {
        let per = Self::block_bytes(model, block_size.max(1), bytes_per_value);
        let num_blocks = ((kv_cache_mb.max(0.0) * 1024.0 * 1024.0) / per as f64).floor() as usize;
        Self { num_blocks, block_size, prefill_chunk, max_batch }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("engine config: {0}")]
    Config(String),
    #[error("sampling: {0}")]
    Sampling(String),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Blocks(#[from] BlockError),
    #[error("unknown or released sequence handle {0:?}")]
    UnknownHandle(SeqHandle),
    #[error("splice position {h} is beyond the {len} tokens of the kept sequence")]
    SplicePosition { h: usize, len: usize },
}

/// A finished sequence kept in the cache for later splices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqHandle(SeqId);

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Key of the prompt in the random draws (`sampler::key_of(prompt id)`).
    pub key: u64,
    /// Sample index of this request for its prompt.
    pub sample: u32,
    /// Token ids to continue from (a prompt, or a spliced prefix + inserted ids).
    pub ids: Vec<u32>,
    /// Reuse the cached K/V of the first `n` ids from this kept sequence (whose ids must
    /// start with them); only the rest is computed.
    pub reuse: Option<(SeqHandle, usize)>,
    /// Keep the finished sequence in the cache (`Output::handle`) for later splices.
    pub keep: bool,
}

impl Request {
    pub fn new(key: u64, sample: u32, ids: Vec<u32>) -> Self {
        Self { key, sample, ids, reuse: None, keep: false }
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Eos,
    Length,
    Stop,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
            Finish::Stop => "stop",
        }
    }
}

/// The result of one request (`index` = its position in the request list).
#[derive(Clone, Debug)]
pub struct Output {
    pub index: usize,
    /// All ids: the request's ids, then the generated ones.
    pub ids: Vec<u32>,
    /// Number of request ids at the front of `ids`.
    pub context_len: usize,
    /// `Ok(finish)`, or why this request could not run (the others go on).
    pub result: Result<Finish, String>,
    /// Set when the request asked to `keep` and it finished.
    pub handle: Option<SeqHandle>,
}

impl Output {
    /// The generated ids.
    pub fn generated(&self) -> &[u32] {
        &self.ids[self.context_len..]
    }
}

/// Something the engine reports while it runs.
pub enum Event {
    /// A step ran `prefill` prompt tokens and `decode` single tokens.
    Step { prefill: usize, decode: usize },
    Done(Output),
}

/// Decides whether the generated ids end in a stop string (stop strings need the tokenizer,
/// which the engine does not know).
pub trait StopCheck: Sync {
    fn hit(&self, generated: &[u32]) -> bool;
}

/// Counters since the engine was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Token positions the model computed (prefill + decode, recomputation included).
    pub computed_positions: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub steps: u64,
    pub preemptions: u64,
}

/// The tokens of one running sequence in a step: `n` ids of `running[ri]` into `slots`.
struct Planned {
    ri: usize,
    n: usize,
    slots: Vec<u32>,
}

/// A packed step: the running sequences that sample, and the step's token counts.
struct Packed {
    sampled: Vec<usize>,
    prefill: usize,
    decode: usize,
}

/// A request being worked on.
struct Live {
    index: usize,
    key: u64,
    sample: u32,
    seq: Option<SeqId>, // None while waiting
    ids: Vec<u32>,      // [context + generated]
    cached: usize,      // leading ids whose K/V are in the cache
    context_len: usize,
    reuse: Option<(SeqHandle, usize)>,
    keep: bool,
}

pub struct Engine<'m, B: Backend> {
    model: &'m Transformer<B>,
    cfg: EngineConfig,
    geom: KvGeom,
    kv: Vec<B::Buf>, // [num_layers] x [num_blocks, 2, n_kv, block_size, head_dim]
    blocks: BlockManager,
    kept: HashMap<SeqHandle, Vec<u32>>, // ids of kept sequences (the last one not cached)
    stats: EngineStats,
}

impl<'m, B: Backend> Engine<'m, B> {
    pub fn new(model: &'m Transformer<B>, cfg: EngineConfig) -> Result<Self, EngineError> {
        if cfg.num_blocks == 0 {
            return Err(EngineError::Config("the KV cache budget holds no block (raise --kv-cache-mb)".into()));
        }
        if cfg.block_size == 0 || cfg.prefill_chunk == 0 || cfg.max_batch == 0 {
            return Err(EngineError::Config("block_size, prefill_chunk and max_batch must be > 0".into()));
        }
        let geom = model.kv_geom(cfg.num_blocks, cfg.block_size);
        Ok(Self {
            model,
            cfg,
            geom,
            kv: model.alloc_kv(geom),
            blocks: BlockManager::new(cfg.num_blocks, cfg.block_size),
            kept: HashMap::new(),
            stats: EngineStats::default(),
        })
    }

    pub fn config(&self) -> EngineConfig {
        self.cfg
    }
    pub fn stats(&self) -> EngineStats {
        self.stats
    }
    /// Blocks in use (running and kept sequences).
    pub fn used_blocks(&self) -> usize {
        self.blocks.num_blocks() - self.blocks.free_blocks()
    }
    /// Checks the block bookkeeping (tests).
    pub fn check_blocks(&self) -> Result<(), String> {
        self.blocks.check()
    }

    /// The ids of a kept sequence.
    pub fn kept_ids(&self, h: SeqHandle) -> Option<&[u32]> {
        self.kept.get(&h).map(Vec::as_slice)
    }

    /// Frees a kept sequence's blocks.
    pub fn release(&mut self, h: SeqHandle) -> Result<(), EngineError> {
        self.kept.remove(&h).ok_or(EngineError::UnknownHandle(h))?;
        self.blocks.free(h.0)?;
        Ok(())
    }

    /// The splice of IPO (Algorithm 1, step 3): a request that keeps the first `h` ids of the
    /// kept sequence `base` (prompt included), drops the rest, appends `insert` and continues
    /// sampling, reusing the cached K/V of the kept prefix. Set `keep` on the result to splice
    /// its output again.
    pub fn splice(&self, base: SeqHandle, h: usize, insert: &[u32], key: u64, sample: u32) -> Result<Request, EngineError> {
        let ids = self.kept.get(&base).ok_or(EngineError::UnknownHandle(base))?;
        if h > ids.len() {
            return Err(EngineError::SplicePosition { h, len: ids.len() });
        }
        let mut new = ids[..h].to_vec();
        new.extend_from_slice(insert);
        Ok(Request { key, sample, ids: new, reuse: Some((base, h)), keep: false })
    }

    /// Positions a request can ever need: its ids plus every token it may generate, capped
    /// by the model's context.
    fn max_positions(&self, r: &Request, p: &SamplingParams) -> usize {
        (r.ids.len() + p.max_new_tokens).min(self.model.cfg.max_position_embeddings)
    }

    /// Why a request cannot run at all, if so.
    fn reject(&self, r: &Request, p: &SamplingParams) -> Option<String> {
        let (max_pos, vocab) = (self.model.cfg.max_position_embeddings, self.model.cfg.vocab_size);
        if r.ids.is_empty() {
            return Some("empty prompt: no token to start from".into());
        }
        if let Some((i, id)) = r.ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Some(format!("token {i} = {id} is not an id of the model (vocab_size {vocab})"));
        }
        if r.ids.len() >= max_pos {
            return Some(format!(
                "prompt of {} tokens leaves no room to generate within the context of {max_pos} tokens (max_position_embeddings)",
                r.ids.len()
            ));
        }
        let need = self.blocks.blocks_for(self.max_positions(r, p));
        if need > self.blocks.num_blocks() {
            return Some(format!(
                "the KV cache ({} blocks of {} tokens) cannot hold this sequence: {} tokens need {need} blocks (raise --kv-cache-mb or lower --max-new-tokens)",
                self.blocks.num_blocks(),
                self.cfg.block_size,
                self.max_positions(r, p)
            ));
        }
        if let Some((h, n)) = r.reuse {
            match self.kept.get(&h) {
                None => return Some(format!("reuse of unknown or released sequence handle {h:?}")),
                Some(base) if n > base.len() || n > r.ids.len() || base[..n] != r.ids[..n] => {
                    return Some(format!("the first {n} ids do not match the kept sequence {h:?}"))
                }
                _ => {}
            }
        }
        None
    }

    /// Runs every request to completion, reporting each result (in completion order) and
    /// every step through `on_event`. Errors are only returned for engine/backend faults;
    /// bad requests become `Output { result: Err(..) }`.
    pub fn generate(
        &mut self,
        requests: Vec<Request>,
        params: &SamplingParams,
        stop: Option<&dyn StopCheck>,
        mut on_event: impl FnMut(Event),
    ) -> Result<(), EngineError> {
        params.check().map_err(EngineError::Sampling)?;
        let mut waiting: Vec<Live> = Vec::new(); // sorted by index (priority: lower first)
        for (index, r) in requests.into_iter().enumerate() {
            if let Some(why) = self.reject(&r, params) {
                let context_len = r.ids.len();
                on_event(Event::Done(Output { index, ids: r.ids, context_len, result: Err(why), handle: None }));
                continue;
            }
            waiting.push(Live {
                index,
                key: r.key,
                sample: r.sample,
                seq: None,
                context_len: r.ids.len(),
                ids: r.ids,
                cached: 0,
                reuse: r.reuse,
                keep: r.keep,
            });
        }
        waiting.reverse(); // pop() takes the highest priority
        let mut running: Vec<Live> = Vec::new(); // sorted by index
        while !waiting.is_empty() || !running.is_empty() {
            self.admit(&mut waiting, &mut running, &mut on_event)?;
            if running.is_empty() {
                continue;
            }
            self.step(&mut waiting, &mut running, params, stop, &mut on_event)?;
        }
        Ok(())
    }

    /// Moves waiting requests into the running set while the pool has room for their
    /// prompts (plus one spare block per running sequence for its next tokens).
    fn admit(
        &mut self,
        waiting: &mut Vec<Live>,
        running: &mut Vec<Live>,
        on_event: &mut impl FnMut(Event),
    ) -> Result<(), EngineError> {
        while running.len() < self.cfg.max_batch {
            let Some(mut w) = waiting.pop() else { break };
            let seq = match w.reuse.filter(|(h, _)| self.kept.contains_key(h)) {
                Some((h, n)) => {
                    // The kept sequence caches all but its last id; keep one id to compute.
                    let n = n.min(self.blocks.len(h.0)?).min(w.ids.len() - 1);
                    w.cached = n;
                    self.blocks.fork(h.0, n)?
                }
                None => {
                    w.cached = 0;
                    self.blocks.create()
                }
            };
            let need = self.blocks.blocks_needed(seq, w.ids.len() + 1 - w.cached)?;
            if need + running.len() <= self.blocks.free_blocks() {
                w.seq = Some(seq);
                let at = running.partition_point(|r| r.index < w.index);
                running.insert(at, w);
                continue;
            }
            self.blocks.free(seq)?;
            if running.is_empty() {
                // Nothing running will free blocks: only kept sequences hold them.
                let held = self.used_blocks();
                let out = Output {
                    index: w.index,
                    context_len: w.context_len,
                    ids: w.ids,
                    result: Err(format!(
                        "the KV cache is full: kept sequences hold {held} of {} blocks, this request needs {need}",
                        self.blocks.num_blocks()
                    )),
                    handle: None,
                };
                on_event(Event::Done(out));
                continue;
            }
            waiting.push(w);
            break;
        }
        Ok(())
    }

    /// Frees a running sequence and puts it back in the waiting list (recomputed later).
    fn preempt(&mut self, mut l: Live, waiting: &mut Vec<Live>) -> Result<(), EngineError> {
        if let Some(s) = l.seq.take() {
            self.blocks.free(s)?;
        }
        l.cached = 0;
        self.stats.preemptions += 1;
        // waiting is sorted by descending index (pop = highest priority).
        let at = waiting.partition_point(|x| x.index > l.index);
        waiting.insert(at, l);
        Ok(())
    }

    /// One step of the running set: schedule every sequence's tokens (preempting when the
    /// pool is short), run them in one forward, sample the sequences whose ids are then all
    /// cached, report the step, and retire the sequences that finished.
    fn step(
        &mut self,
        waiting: &mut Vec<Live>,
        running: &mut Vec<Live>,
        params: &SamplingParams,
        stop: Option<&dyn StopCheck>,
        on_event: &mut impl FnMut(Event),
    ) -> Result<(), EngineError> {
        let plan = self.schedule(waiting, running, on_event)?;
        if plan.is_empty() {
            return Ok(());
        }
        let (st, packed) = self.pack(running, &plan)?;
        let logits = self.forward(running, &plan, &st, &packed)?;
        let tokens = self.sample(running, &packed.sampled, &logits, params);
        let finished = self.append(running, &packed.sampled, &tokens, params, stop);
        on_event(Event::Step { prefill: packed.prefill, decode: packed.decode });
        self.retire(running, finished, on_event)
    }

    /// Chooses each running sequence's tokens for this step (its one pending id when decoding,
    /// else a prefill chunk within the step's `prefill_chunk` budget) and reserves their cache
    /// slots, in priority order; then makes the copy-on-write block copies the reservations
    /// need. Sequences that cannot run leave `running` (see `reserve`).
    fn schedule(&mut self, waiting: &mut Vec<Live>, running: &mut Vec<Live>, on_event: &mut impl FnMut(Event)) -> Result<Vec<Planned>, EngineError> {
        let mut budget = self.cfg.prefill_chunk;
        let (mut plan, mut copies) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < running.len() {
            let pending = running[i].ids.len() - running[i].cached;
            let n = if pending == 1 { 1 } else { pending.min(budget) };
            if n == 0 {
                i += 1;
                continue;
            }
            let Some(ext) = self.reserve(i, n, waiting, running, on_event)? else { break };
            copies.extend(ext.copies);
            plan.push(Planned { ri: i, n, slots: ext.slots });
            if pending > 1 {
                budget -= n;
            }
            i += 1;
        }
        if !copies.is_empty() {
            for layer in self.kv.iter_mut() {
                self.model.backend.kv_copy_blocks(layer, &copies, self.geom);
            }
        }
        Ok(plan)
    }

    /// Reserves `n` cache slots for `running[i]`, preempting from the back (lowest priority)
    /// while the pool is short. `None` when `running[i]` itself cannot run this step (it is
    /// the last one then, and leaves `running`): preempted to wait, or, alone and still short
    /// because kept sequences hold the rest, failed.
    fn reserve(
        &mut self,
        i: usize,
        n: usize,
        waiting: &mut Vec<Live>,
        running: &mut Vec<Live>,
        on_event: &mut impl FnMut(Event),
    ) -> Result<Option<Extension>, EngineError> {
        let seq = running[i].seq.expect("running sequences hold a seq");
        loop {
            match self.blocks.extend(seq, n) {
                Ok(ext) => return Ok(Some(ext)),
                Err(BlockError::OutOfBlocks { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            if running.len() - 1 > i {
                let victim = running.pop().expect("non-empty");
                self.preempt(victim, waiting)?;
            } else if i > 0 {
                // This one is the lowest priority left: it waits.
                let me = running.pop().expect("non-empty");
                self.preempt(me, waiting)?;
                return Ok(None);
            } else {
                let l = running.remove(0);
                if let Some(s) = l.seq {
                    self.blocks.free(s)?;
                }
                on_event(Event::Done(Output {
                    index: l.index,
                    context_len: l.context_len,
                    ids: l.ids,
                    result: Err(format!("the KV cache is full: kept sequences hold {} of {} blocks", self.used_blocks(), self.blocks.num_blocks())),
                    handle: None,
                }));
                return Ok(None);
            }
        }
    }

    /// Packs the planned tokens of a step into one cached forward: ids, positions, slots and
    /// block table of each scheduled sequence, and a logit row for each one whose ids are all
    /// cached after it (it samples).
    fn pack(&self, running: &[Live], plan: &[Planned]) -> Result<(DecodeStep, Packed), EngineError> {
        let mut st = DecodeStep::default();
        let mut p = Packed { sampled: Vec::new(), prefill: 0, decode: 0 };
        for &Planned { ri, n, ref slots } in plan {
            let l = &running[ri];
            let q_start = st.ids.len();
            st.ids.extend_from_slice(&l.ids[l.cached..l.cached + n]);
            st.positions.extend((l.cached..l.cached + n).map(|p| p as u32));
            st.slots.extend_from_slice(slots);
            let ctx_len = l.cached + n;
            let table_start = st.block_table.len();
            let seq = l.seq.expect("running");
            st.block_table.extend_from_slice(&self.blocks.blocks(seq)?[..ctx_len.div_ceil(self.cfg.block_size)]);
            st.seqs.push(PagedSeq { q_start, q_len: n, ctx_len, table_start });
            if ctx_len == l.ids.len() {
                st.logit_rows.push((q_start + n - 1) as u32);
                p.sampled.push(ri);
            }
            if n == 1 && l.ids.len() - l.cached == 1 {
                p.decode += 1;
            } else {
                p.prefill += n;
            }
        }
        Ok((st, p))
    }

    /// Runs the packed step (its K/V go into the cache), counts it, and marks the planned
    /// tokens cached. Returns the logits `[sampled, vocab]`, on the backend.
    fn forward(&mut self, running: &mut [Live], plan: &[Planned], st: &DecodeStep, p: &Packed) -> Result<B::Buf, EngineError> {
        let logits = self.model.forward_cached(&mut self.kv, self.geom, st)?;
        self.stats.steps += 1;
        self.stats.computed_positions += st.ids.len() as u64;
        self.stats.prefill_tokens += p.prefill as u64;
        self.stats.decode_tokens += p.decode as u64;
        for pl in plan {
            running[pl.ri].cached += pl.n;
        }
        Ok(logits)
    }

    /// The next token of each sampling sequence, drawn on the backend (each row's draw
    /// depends only on its counters; only the token ids come back, not the logits).
    fn sample(&self, running: &[Live], sampled: &[usize], logits: &B::Buf, params: &SamplingParams) -> Vec<u32> {
        let rows: Vec<_> = sampled
            .iter()
            .map(|&ri| {
                let l = &running[ri];
                params.row(l.key, l.sample, l.ids.len() as u32)
            })
            .collect();
        self.model.backend.sample(logits, self.model.cfg.vocab_size, &rows)
    }

    /// Appends each sampled token to its sequence; returns the sequences that finished
    /// (EOS, stop string, or length) with why.
    fn append(&self, running: &mut [Live], sampled: &[usize], tokens: &[u32], params: &SamplingParams, stop: Option<&dyn StopCheck>) -> Vec<(usize, Finish)> {
        let max_pos = self.model.cfg.max_position_embeddings;
        let mut finished = Vec::new();
        for (&ri, &tok) in sampled.iter().zip(tokens) {
            let l = &mut running[ri];
            l.ids.push(tok);
            let generated = l.ids.len() - l.context_len;
            let finish = if params.eos_ids.contains(&tok) {
                Some(Finish::Eos)
            } else if stop.is_some_and(|s| s.hit(&l.ids[l.context_len..])) {
                Some(Finish::Stop)
            } else if generated >= params.max_new_tokens || l.ids.len() >= max_pos {
                Some(Finish::Length)
            } else {
                None
            };
            if let Some(f) = finish {
                finished.push((ri, f));
            }
        }
        finished
    }

    /// Removes the finished sequences from `running` (their blocks freed, or kept behind a
    /// handle when the request asked) and reports them in request order.
    fn retire(&mut self, running: &mut Vec<Live>, mut finished: Vec<(usize, Finish)>, on_event: &mut impl FnMut(Event)) -> Result<(), EngineError> {
        // Back to front keeps the running indices valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut outs = Vec::new();
        for (ri, f) in finished {
            let l = running.remove(ri);
            let seq = l.seq.expect("running");
            let handle = if l.keep {
                let h = SeqHandle(seq);
                self.kept.insert(h, l.ids.clone());
                Some(h)
            } else {
                self.blocks.free(seq)?;
                None
            };
            outs.push(Output { index: l.index, context_len: l.context_len, ids: l.ids, result: Ok(f), handle });
        }
        outs.sort_by_key(|o| o.index);
        for o in outs {
            on_event(Event::Done(o));
        }
        Ok(())
    }
}
