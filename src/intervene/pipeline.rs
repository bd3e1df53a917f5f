//! Algorithm 1 of IPO_METHOD.md over a batch of rollouts: segment, detect the first
//! compliance cue, cut at its token, splice each trigger (tokenized on its own and
//! concatenated), continue, re-check, and emit a preference pair when the new trace is
//! cue-free; up to `rounds` splices per (rollout, trigger). The model side is the `Splicer`
//! trait (`EngineSplicer`: the rollout engine, reusing the cached prefix of each cut).
//!
//! Pairs with more than one round **[ours]**: the pair is taken against the ORIGINAL rollout at
//! the earliest cut h* of all rounds: context = prompt + z0[..h*], rejected = z0[h*..],
//! chosen = z_final[h*..] (which starts with the trigger ids spliced at h*). So
//! `context_ids + rejected_ids` is always the sampled rollout and both segments diverge at h*.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::detect::{DetectError, Detector, Item};
use super::segment::{segment_completion, Segmented};
use crate::backend::Backend;
use crate::io::records::{Cue, Pair};
use crate::model::tokenizer::Tokenizer;
use crate::rollout::sampler::mix64;
use crate::rollout::{Engine, Event, Request, SamplingParams};

/// A rollout to intervene on (from a rollouts file or generated from a prompt).
#[derive(Clone, Debug)]
pub struct Trace {
    pub id: String,
    pub prompt: String,
    pub kind: Option<String>,
    pub sample: u32,
    pub prompt_ids: Vec<u32>,
    /// The sampled completion (its EOS id, if any, included).
    pub completion_ids: Vec<u32>,
    /// Where the trace came from, for error records ("rollouts.jsonl:7").
    pub origin: String,
}

/// One continuation to compute: keep `ids[..h]`, append `insert`, sample to EOS.
#[derive(Clone, Debug)]
pub(crate) struct SpliceJob {
    pub key: u64,
    pub sample: u32,
    /// The full trace being cut: prompt ids + completion ids.
    pub ids: Vec<u32>,
    /// Absolute cut position in `ids`.
    pub h: usize,
    pub insert: Vec<u32>,
}

/// The ids sampled after `insert`, and why sampling stopped.
#[derive(Clone, Debug)]
pub(crate) struct Continuation {
    pub generated: Vec<u32>,
    pub finish: String,
}

/// The model side of Algorithm 1.
pub(crate) trait Splicer {
    /// Runs every job; a per-job failure is an `Err(reason)` in its slot, a fault of the
    /// engine itself (backend) is the outer error.
    fn continue_batch(&mut self, jobs: &[SpliceJob]) -> anyhow::Result<Vec<Result<Continuation, String>>>;
}

/// The rollout engine as a `Splicer`: each distinct trace (`SpliceJob::ids`) is computed
/// once, up to the furthest cut of its jobs (a one-token "prime" request kept in the cache),
/// then every job is an `Engine::splice` of that prime that reuses the cached K/V of its cut
/// prefix and prefills only its insert (the last prefix id is recomputed to get its logits).
/// `ipo intervene` cuts each trace once per round; `ipo csr` forks one trace at many positions
/// with an empty insert.
pub(crate) struct EngineSplicer<'e, 'm, B: Backend> {
    pub engine: &'e mut Engine<'m, B>,
    pub params: SamplingParams,
}

/// What `EngineSplicer::run` reports while it works.
pub(crate) enum SpliceProgress {
    /// An engine step computed this many tokens (primes included).
    Tokens(usize),
    /// Job `i` finished (either way).
    Done(usize),
}

impl<B: Backend> EngineSplicer<'_, '_, B> {
    /// `continue_batch` with progress: `on` hears every engine step and every finished job.
    pub(crate) fn run(
        &mut self,
        jobs: &[SpliceJob],
        on: &mut dyn FnMut(SpliceProgress),
    ) -> anyhow::Result<Vec<Result<Continuation, String>>> {
        // 1. One kept prime per distinct trace, as long as its furthest cut.
        let mut trace_of: HashMap<&[u32], usize> = HashMap::new();
        let mut primes: Vec<(u64, u32, &[u32], usize)> = Vec::new(); // (key, sample, ids, furthest cut)
        let mut job_prime: Vec<usize> = Vec::with_capacity(jobs.len());
        for j in jobs {
            let h = j.h.min(j.ids.len());
            let n = primes.len();
            let idx = *trace_of.entry(&j.ids[..]).or_insert(n);
            if idx == n {
                primes.push((j.key, j.sample, &j.ids[..], h));
            }
            primes[idx].3 = primes[idx].3.max(h);
            job_prime.push(idx);
        }
        let primes: Vec<Request> = primes
            .into_iter()
            .map(|(key, sample, ids, h)| {
                let mut r = Request::new(key, sample, ids[..h].to_vec());
                r.keep = true;
                r
            })
            .collect();
        let mut prime_params = self.params.clone();
        prime_params.max_new_tokens = 1;
        let mut handles = vec![Err(String::new()); primes.len()];
        self.engine.generate(primes, &prime_params, None, |e| match e {
            Event::Step { prefill, decode } => on(SpliceProgress::Tokens(prefill + decode)),
            Event::Done(o) => {
                handles[o.index] = match (o.result, o.handle) {
                    (Ok(_), Some(h)) => Ok(h),
                    (Err(why), _) => Err(why),
                    (Ok(_), None) => Err("the engine kept no handle".into()),
                };
            }
        })?;
        // 2. The splices.
        let mut results: Vec<Result<Continuation, String>> = vec![Err("not run".into()); jobs.len()];
        let mut reqs = Vec::new();
        let mut req_job = Vec::new();
        for (ji, j) in jobs.iter().enumerate() {
            let failed = match &handles[job_prime[ji]] {
                Ok(h) => match self.engine.splice(*h, j.h, &j.insert, j.key, j.sample) {
                    Ok(r) => {
                        reqs.push(r);
                        req_job.push(ji);
                        None
                    }
                    Err(e) => Some(e.to_string()),
                },
                Err(why) => Some(format!("prefix: {why}")),
            };
            if let Some(why) = failed {
                results[ji] = Err(why);
                on(SpliceProgress::Done(ji));
            }
        }
        let gen = self.engine.generate(reqs, &self.params, None, |e| match e {
            Event::Step { prefill, decode } => on(SpliceProgress::Tokens(prefill + decode)),
            Event::Done(o) => {
                let ji = req_job[o.index];
                results[ji] = match o.result {
                    Ok(f) => Ok(Continuation { generated: o.generated().to_vec(), finish: f.as_str().to_string() }),
                    Err(why) => Err(why),
                };
                on(SpliceProgress::Done(ji));
            }
        });
        for h in handles.into_iter().flatten() {
            self.engine.release(h)?;
        }
        gen?;
        Ok(results)
    }
}

impl<B: Backend> Splicer for EngineSplicer<'_, '_, B> {
    fn continue_batch(&mut self, jobs: &[SpliceJob]) -> anyhow::Result<Vec<Result<Continuation, String>>> {
        self.run(jobs, &mut |_| {})
    }
}

/// The triggers (indices into the pool, ascending) tried on trace `t`: all of them, or with
/// `triggers_per_rollout` = K the K whose `mix64` hash of (seed, rollout id, sample, trigger
/// index) is smallest: a choice that depends on nothing else, so a rerun, a resumed run and
/// any batching pick the same ones, and over many rollouts every trigger is used about as
/// often.
fn per_rollout(settings: &Settings, t: &Trace) -> Vec<usize> {
    let n = settings.triggers.len();
    let k = settings.triggers_per_rollout;
    if k == 0 || k >= n {
        return (0..n).collect();
    }
    let base = mix64(mix64(mix64(settings.seed) ^ crate::rollout::key_of(&t.id)) ^ t.sample as u64);
    let mut order: Vec<(u64, usize)> = (0..n).map(|i| (mix64(base ^ i as u64), i)).collect();
    order.sort_unstable();
    let mut pick: Vec<usize> = order[..k].iter().map(|&(_, i)| i).collect();
    pick.sort_unstable();
    pick
}

/// Settings of Algorithm 1.
pub(crate) struct Settings {
    pub triggers: Vec<String>,
    /// Triggers tried per rollout: 0 = all (the paper); K > 0 = the K of `per_rollout`.
    pub triggers_per_rollout: usize,
    /// Seed of the per-rollout choice of triggers.
    pub seed: u64,
    /// Most splices per (rollout, trigger) (paper: 1).
    pub rounds: u32,
    pub eos_ids: Vec<u32>,
    /// Keep a pair only when its continuation ended (EOS or a stop string), not when
    /// `max_new_tokens` cut it: a cut continuation is an unfinished trace.
    pub complete_only: bool,
    /// Answer-start cuts for models that answer directly (no `</think>` in the completion): a
    /// rollout without a compliance cue whose answer this judge calls harmful is cut at its
    /// first sentence (**[ours]**: such an answer commits in its first words, before any
    /// sentence the detector may look at). `None`: off, as in the paper.
    pub answer_start: Option<Box<dyn Fn(&str) -> bool + Sync>>,
}

/// Counters of a run (written to `pairs.stats.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Rollouts read (or generated).
    pub prompts: u64,
    /// Rollouts of benign prompts, left alone.
    pub skipped_benign: u64,
    /// Rollouts rejected before detection (bad fields, other model, bad ids, longer than the
    /// context).
    pub input_errors: u64,
    /// Rollouts whose reasoning has a compliance cue.
    pub with_cue: u64,
    /// Rollouts without a cue (skipped).
    pub skipped_no_cue: u64,
    /// Rollouts without a cue cut at the start of their harmful answer (`--answer-start`).
    pub cut_at_answer_start: u64,
    /// (rollout, trigger) splices started in round 1.
    pub attempts: u64,
    /// Pairs emitted, per round (index 0 = round 1).
    pub pairs_per_round: Vec<u64>,
    pub pairs: u64,
    /// (rollout, trigger) still with a cue after the last round.
    pub skipped_still_unsafe: u64,
    /// Cue-free continuations left out because `max_new_tokens` cut them (`--complete-only`).
    #[serde(default)]
    pub skipped_unfinished: u64,
    /// Detector failures (judge errors, bad answers), per item.
    pub detector_errors: u64,
    /// Continuations the engine could not produce.
    pub generation_errors: u64,
    /// Tokens sampled (rollouts generated here + continuations; primes excluded).
    pub tokens_generated: u64,
    /// Round-1 continuations that were checked, and those of them found cue-free.
    pub round1_checked: u64,
    pub round1_cue_free: u64,
    /// pairs / attempts: the rate of cue-free continuations after (up to `rounds`) splices.
    pub cue_free_rate: f64,
    /// round1_cue_free / round1_checked: cue-free right after the first splice.
    pub cue_free_rate_round1: f64,
    pub seconds: f64,
    pub detector: String,
}

impl Stats {
    /// Every counter (not the rates, `pairs_per_round`, `seconds`, `detector`).
    fn counters(&mut self) -> [&mut u64; 15] {
        [
            &mut self.prompts,
            &mut self.skipped_benign,
            &mut self.input_errors,
            &mut self.with_cue,
            &mut self.skipped_no_cue,
            &mut self.cut_at_answer_start,
            &mut self.attempts,
            &mut self.pairs,
            &mut self.skipped_still_unsafe,
            &mut self.skipped_unfinished,
            &mut self.detector_errors,
            &mut self.generation_errors,
            &mut self.tokens_generated,
            &mut self.round1_checked,
            &mut self.round1_cue_free,
        ]
    }

    /// Adds the counters of `o`, another rank's share of the same run (call `finalize` after).
    pub(crate) fn add(&mut self, o: &Stats) {
        let mut o = o.clone();
        for (a, b) in self.counters().into_iter().zip(o.counters()) {
            *a += *b;
        }
        if self.pairs_per_round.len() < o.pairs_per_round.len() {
            self.pairs_per_round.resize(o.pairs_per_round.len(), 0);
        }
        for (a, b) in self.pairs_per_round.iter_mut().zip(&o.pairs_per_round) {
            *a += b;
        }
    }

    /// Computes the rates from the counters.
    pub(crate) fn finalize(&mut self) {
        let rate = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        self.cue_free_rate = rate(self.pairs, self.attempts);
        self.cue_free_rate_round1 = rate(self.round1_cue_free, self.round1_checked);
    }
}

/// A per-item failure, written to `pairs.errors.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ItemError {
    pub id: String,
    pub origin: String,
    pub stage: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    pub error: String,
}

/// One cut of one round.
#[derive(Clone, Debug)]
struct Cut {
    h: usize, // in the completion of the trace that was cut
    sentence: usize,
    text: String,
    insert: Vec<u32>, // lead + trigger ids
    round: u32,
}

/// The state of one (rollout, trigger) through the rounds.
struct Attempt {
    trace: usize,
    trigger: usize,
    completion: Vec<u32>, // the current trace's completion
    cuts: Vec<Cut>,
}

/// The ids spliced for a cut at sentence `k`: the text the cut drops before the sentence
/// (usually a space) + the trigger, tokenized on their own.
fn insert_ids(tok: &Tokenizer, seg: &Segmented, k: usize, trigger: &str) -> Result<Vec<u32>, String> {
    let text = format!("{}{}", seg.lead(k), trigger);
    tok.encode(&text, false).map_err(|e| e.to_string())
}

/// The sample index of a splice's random draws: distinct per (rollout sample, trigger, round).
fn splice_sample(sample: u32, trigger: usize, round: u32) -> u32 {
    (mix64(mix64(mix64(sample as u64 ^ 0x1f0) ^ trigger as u64) ^ round as u64) >> 32) as u32
}

fn item(trace: &Trace, seg: &Segmented) -> Item {
    Item { prompt: trace.prompt.clone(), sentences: seg.sentences.iter().map(|s| s.text.clone()).collect() }
}

/// Runs Algorithm 1 on `traces`; pairs go to `emit`, per-item failures to `errors`, each with
/// the index of its trace in `traces`. A trace's pairs (and errors) come in an order that
/// depends on nothing but the trace (round, then trigger), so sorting the output by trace
/// gives the same file whatever the batching.
pub(crate) fn run_batch(
    traces: &[Trace],
    tok: &Tokenizer,
    detector: &dyn Detector,
    splicer: &mut dyn Splicer,
    settings: &Settings,
    stats: &mut Stats,
    emit: &mut dyn FnMut(usize, Pair) -> anyhow::Result<()>,
    errors: &mut dyn FnMut(usize, ItemError) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if stats.pairs_per_round.len() < settings.rounds as usize {
        stats.pairs_per_round.resize(settings.rounds as usize, 0);
    }
    let err = |t: &Trace, stage: &'static str, trigger: Option<&str>, round: Option<u32>, e: String| ItemError {
        id: t.id.clone(),
        origin: t.origin.clone(),
        stage,
        trigger: trigger.map(str::to_string),
        round,
        error: e,
    };
    // Step 2: segment and detect on the original rollouts.
    let mut segs: Vec<Option<Segmented>> = Vec::with_capacity(traces.len());
    for (i, t) in traces.iter().enumerate() {
        match segment_completion(tok, &t.completion_ids, &settings.eos_ids) {
            Ok(s) => segs.push(Some(s)),
            Err(e) => {
                stats.input_errors += 1;
                errors(i, err(t, "segment", None, None, e.to_string()))?;
                segs.push(None);
            }
        }
    }
    let idx: Vec<usize> = (0..traces.len()).filter(|&i| segs[i].is_some()).collect();
    let items: Vec<Item> = idx.iter().map(|&i| item(&traces[i], segs[i].as_ref().expect("filtered"))).collect();
    let verdicts = detector.first_compliance_cues(&items);
    let mut attempts: Vec<Attempt> = Vec::new();
    for (&i, v) in idx.iter().zip(verdicts) {
        let t = &traces[i];
        let seg = segs[i].as_ref().expect("filtered");
        match checked(v, seg) {
            Err(e) => {
                stats.detector_errors += 1;
                errors(i, err(t, "detect", None, None, e.to_string()))?;
            }
            Ok(None) if !start_cut(settings, seg) => stats.skipped_no_cue += 1,
            Ok(cue) => {
                let k = match cue {
                    Some(k) => {
                        stats.with_cue += 1;
                        k
                    }
                    None => {
                        stats.cut_at_answer_start += 1;
                        0
                    }
                };
                let s = &seg.sentences[k];
                for ti in per_rollout(settings, t) {
                    let trig = &settings.triggers[ti];
                    match insert_ids(tok, seg, k, trig) {
                        Ok(insert) => attempts.push(Attempt {
                            trace: i,
                            trigger: ti,
                            completion: t.completion_ids.clone(),
                            cuts: vec![Cut { h: s.token, sentence: k, text: s.text.clone(), insert, round: 1 }],
                        }),
                        Err(e) => errors(i, err(t, "tokenize", Some(trig), Some(1), e))?,
                    }
                }
            }
        }
    }
    stats.attempts += attempts.len() as u64;
    // Steps 3-4, round by round.
    for round in 1..=settings.rounds {
        if attempts.is_empty() {
            break;
        }
        let jobs: Vec<SpliceJob> = attempts
            .iter()
            .map(|a| {
                let t = &traces[a.trace];
                let cut = a.cuts.last().expect("one cut per round");
                let mut ids = t.prompt_ids.clone();
                ids.extend_from_slice(&a.completion);
                SpliceJob {
                    key: crate::rollout::key_of(&t.id),
                    sample: splice_sample(t.sample, a.trigger, round),
                    ids,
                    h: t.prompt_ids.len() + cut.h,
                    insert: cut.insert.clone(),
                }
            })
            .collect();
        let conts = splicer.continue_batch(&jobs)?;
        // The new traces.
        let mut next: Vec<(Attempt, Segmented, String)> = Vec::new();
        for (mut a, c) in attempts.drain(..).zip(conts) {
            let t = &traces[a.trace];
            let trig = &settings.triggers[a.trigger];
            match c {
                Err(e) => {
                    stats.generation_errors += 1;
                    errors(a.trace, err(t, "generate", Some(trig), Some(round), e))?;
                }
                Ok(c) => {
                    stats.tokens_generated += c.generated.len() as u64;
                    let cut = a.cuts.last().expect("one cut per round");
                    let mut new = a.completion[..cut.h].to_vec();
                    new.extend_from_slice(&cut.insert);
                    new.extend_from_slice(&c.generated);
                    a.completion = new;
                    match segment_completion(tok, &a.completion, &settings.eos_ids) {
                        Ok(seg) => next.push((a, seg, c.finish)),
                        Err(e) => {
                            stats.generation_errors += 1;
                            errors(a.trace, err(t, "segment", Some(trig), Some(round), e.to_string()))?;
                        }
                    }
                }
            }
        }
        let items: Vec<Item> = next.iter().map(|(a, seg, _)| item(&traces[a.trace], seg)).collect();
        let verdicts = detector.first_compliance_cues(&items);
        for ((mut a, seg, finish), v) in next.into_iter().zip(verdicts) {
            let t = &traces[a.trace];
            let trig = &settings.triggers[a.trigger];
            if round == 1 {
                stats.round1_checked += 1;
            }
            match checked(v, &seg) {
                Err(e) => {
                    stats.detector_errors += 1;
                    errors(a.trace, err(t, "detect", Some(trig), Some(round), e.to_string()))?;
                }
                Ok(None) => {
                    if round == 1 {
                        stats.round1_cue_free += 1;
                    }
                    if settings.complete_only && finish == "length" {
                        stats.skipped_unfinished += 1;
                        continue;
                    }
                    match make_pair(t, &a, trig, &finish) {
                        Ok(p) => {
                            stats.pairs += 1;
                            stats.pairs_per_round[round as usize - 1] += 1;
                            emit(a.trace, p)?;
                        }
                        Err(e) => errors(a.trace, err(t, "pair", Some(trig), Some(round), e))?,
                    }
                }
                Ok(Some(k)) if round < settings.rounds => {
                    let s = &seg.sentences[k];
                    match insert_ids(tok, &seg, k, trig) {
                        Ok(insert) => {
                            a.cuts.push(Cut { h: s.token, sentence: k, text: s.text.clone(), insert, round: round + 1 });
                            attempts.push(a);
                        }
                        Err(e) => errors(a.trace, err(t, "tokenize", Some(trig), Some(round + 1), e))?,
                    }
                }
                Ok(Some(_)) => stats.skipped_still_unsafe += 1,
            }
        }
    }
    Ok(())
}

/// Whether a rollout without a cue is cut at the start of its answer instead (`answer_start`):
/// it has no reasoning part, and the judge calls its answer harmful.
fn start_cut(settings: &Settings, seg: &Segmented) -> bool {
    match &settings.answer_start {
        Some(judge) => !seg.sentences.is_empty() && !seg.text.contains("</think>") && judge(&seg.text),
        None => false,
    }
}

/// A detector verdict checked against the sentences it was about.
fn checked(v: Result<Option<usize>, DetectError>, seg: &Segmented) -> Result<Option<usize>, DetectError> {
    match v? {
        Some(k) if k == 0 || k >= seg.sentences.len() => {
            Err(DetectError::OutOfRange { answer: k as u64 + 1, n: seg.sentences.len() })
        }
        r => Ok(r),
    }
}

/// The pair of an attempt whose last trace is cue-free (see the module comment).
fn make_pair(t: &Trace, a: &Attempt, trigger: &str, finish: &str) -> Result<Pair, String> {
    let first = a.cuts.iter().min_by_key(|c| (c.h, c.round)).expect("at least one cut");
    let h = first.h;
    if a.completion.len() < h || t.completion_ids.len() < h || a.completion[..h] != t.completion_ids[..h] {
        return Err(format!("internal: the final trace does not share the first {h} completion ids with the rollout"));
    }
    let mut context_ids = t.prompt_ids.clone();
    context_ids.extend_from_slice(&t.completion_ids[..h]);
    let mut extra = Map::new();
    extra.insert("sample".into(), json!(t.sample));
    extra.insert("trigger_ids".into(), json!(first.insert));
    extra.insert("finish".into(), json!(finish));
    extra.insert(
        "cuts".into(),
        Value::Array(a.cuts.iter().map(|c| json!({"round": c.round, "sentence": c.sentence, "token": c.h})).collect()),
    );
    Ok(Pair {
        id: t.id.clone(),
        prompt: Some(t.prompt.clone()),
        kind: Some(t.kind.clone().unwrap_or_else(|| "harmful".into())),
        context_ids,
        chosen_ids: a.completion[h..].to_vec(),
        rejected_ids: t.completion_ids[h..].to_vec(),
        cue: Some(Cue { sentence: first.sentence, text: first.text.clone(), token: h, extra: Map::new() }),
        trigger: Some(trigger.to_string()),
        round: Some(a.cuts.len() as u32),
        ref_chosen_logp: None,
        ref_rejected_logp: None,
        extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(n: usize, k: usize, seed: u64) -> Settings {
        Settings {
            triggers: (0..n).map(|i| format!("trigger {i}")).collect(),
            triggers_per_rollout: k,
            seed,
            rounds: 1,
            eos_ids: vec![],
            complete_only: false,
            answer_start: None,
        }
    }

    fn trace(id: &str, sample: u32) -> Trace {
        Trace { id: id.into(), prompt: String::new(), kind: None, sample, prompt_ids: vec![1], completion_ids: vec![2], origin: String::new() }
    }

    #[test]
    fn stats_of_ranks_add_up() {
        let a = Stats { prompts: 3, pairs: 2, tokens_generated: 10, pairs_per_round: vec![2], detector: "rules".into(), ..Stats::default() };
        let b = Stats { pairs: 5, attempts: 9, pairs_per_round: vec![4, 1], round1_checked: 7, ..Stats::default() };
        let mut t = a.clone();
        t.add(&b);
        t.finalize();
        assert_eq!((t.prompts, t.pairs, t.attempts, t.tokens_generated, t.round1_checked), (3, 7, 9, 10, 7));
        assert_eq!((t.pairs_per_round.as_slice(), t.detector.as_str()), (&[6, 1][..], "rules"));
        assert_eq!(t.cue_free_rate, 7.0 / 9.0);
    }

    #[test]
    fn triggers_per_rollout_picks_k_distinct_evenly_and_reproducibly() {
        let (n, k) = (12, 2);
        let s = settings(n, k, 7);
        let mut uses = vec![0usize; n];
        let mut differ = false;
        for i in 0..600 {
            let t = trace(&format!("p{i}"), i % 2);
            let pick = per_rollout(&s, &t);
            assert_eq!(pick.len(), k);
            assert!(pick.windows(2).all(|w| w[0] < w[1]) && pick.iter().all(|&x| x < n), "{pick:?}");
            assert_eq!(pick, per_rollout(&s, &t), "the same rollout, the same triggers");
            differ |= pick != per_rollout(&settings(n, k, 8), &t);
            for x in pick {
                uses[x] += 1;
            }
        }
        assert!(differ, "the seed changes the choice");
        // 1200 picks over 12 triggers: 100 each on average.
        assert!(uses.iter().all(|&u| (60..=140).contains(&u)), "{uses:?}");
        // 0 and K >= the pool mean every trigger.
        assert_eq!(per_rollout(&settings(5, 0, 1), &trace("a", 0)), vec![0, 1, 2, 3, 4]);
        assert_eq!(per_rollout(&settings(5, 9, 1), &trace("a", 0)), vec![0, 1, 2, 3, 4]);
    }
}
