//! Tests of the rollout engine: KV-cached logits against a full recompute (every step, three
//! model families, f64 and f32), fork/append/continue against computing the spliced ids from
//! scratch (with copy-on-write of shared partial blocks), block accounting under thousands of
//! random operations, sampling independent of batch size / chunking / preemption, bad
//! requests as per-request failures, and greedy generation of the default model against
//! Hugging Face transformers.

mod common;

use common::{random_weights, tiny_config, Rng};
use ipo::backend::cpu::CpuBackend;
use ipo::backend::{AttnLayout, Backend, PagedSeq};
use ipo::model::config::Family;
use ipo::model::decode::DecodeStep;
use ipo::model::transformer::{Batch, Transformer};
use ipo::rollout::blocks::{BlockManager, SeqId};
use ipo::rollout::{Engine, EngineConfig, Event, Finish, Output, Request, SamplingParams};

fn tiny<F: ipo::backend::cpu::Elem>(family: Family, tied: bool, seed: u64) -> Transformer<CpuBackend<F>> {
    let cfg = tiny_config(family, tied);
    let w = random_weights(&cfg, &mut Rng(seed));
    Transformer::with_backend(CpuBackend::<F>::new(), cfg, w).unwrap()
}

/// Log-softmax over the vocabulary at the last position of `ids`, by the uncached forward.
fn full_logprobs<B: Backend>(m: &Transformer<B>, ids: &[u32]) -> Vec<f64> {
    let n = ids.len();
    let vocab = m.cfg.vocab_size;
    let batch = Batch {
        ids: ids.to_vec(),
        positions: (0..n as u32).collect(),
        layout: AttnLayout::sequences(&[n]),
        rows: vec![(n - 1) as u32; vocab],
        targets: (0..vocab as u32).collect(),
    };
    let (logp, _) = m.forward(&batch).unwrap();
    m.backend.download_f64(&logp)
}

fn log_softmax(row: &[f64]) -> Vec<f64> {
    let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
    row.iter().map(|x| x - lse).collect()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// A tiny harness over `forward_cached` + `BlockManager`: sequences with their ids.
struct Cache<'m, B: Backend> {
    m: &'m Transformer<B>,
    kv: Vec<B::Buf>,
    geom: ipo::backend::KvGeom,
    blocks: BlockManager,
    computed: usize,
}

impl<'m, B: Backend> Cache<'m, B> {
    fn new(m: &'m Transformer<B>, num_blocks: usize, block_size: usize) -> Self {
        let geom = m.kv_geom(num_blocks, block_size);
        Self { m, kv: m.alloc_kv(geom), geom, blocks: BlockManager::new(num_blocks, block_size), computed: 0 }
    }

    /// Appends `new[i]` to sequence `seqs[i]` (whose ids so far are `hist[i]`) in ONE forward;
    /// returns the last-position log-softmax of each.
    fn append(&mut self, seqs: &[SeqId], hist: &[Vec<u32>], new: &[Vec<u32>]) -> Vec<Vec<f64>> {
        let mut st = DecodeStep::default();
        for (i, &s) in seqs.iter().enumerate() {
            let start = self.blocks.len(s).unwrap();
            assert_eq!(start, hist[i].len());
            let ext = self.blocks.extend(s, new[i].len()).unwrap();
            for layer in self.kv.iter_mut() {
                self.m.backend.kv_copy_blocks(layer, &ext.copies, self.geom);
            }
            let q_start = st.ids.len();
            st.ids.extend_from_slice(&new[i]);
            st.positions.extend((start..start + new[i].len()).map(|p| p as u32));
            st.slots.extend(ext.slots);
            let ctx_len = start + new[i].len();
            let table_start = st.block_table.len();
            st.block_table.extend_from_slice(self.blocks.blocks(s).unwrap());
            st.seqs.push(PagedSeq { q_start, q_len: new[i].len(), ctx_len, table_start });
            st.logit_rows.push((q_start + new[i].len() - 1) as u32);
        }
        self.computed += st.ids.len();
        let logits = self.m.forward_cached(&mut self.kv, self.geom, &st).unwrap();
        let logits = self.m.backend.download_f64(&logits);
        let v = self.m.cfg.vocab_size;
        (0..seqs.len()).map(|i| log_softmax(&logits[i * v..(i + 1) * v])).collect()
    }
}

fn check_cached_vs_full<F: ipo::backend::cpu::Elem>(family: Family, tied: bool, tol: f64) {
    let m = tiny::<F>(family, tied, 17);
    let mut rng = Rng(5);
    let vocab = m.cfg.vocab_size;
    let mut c = Cache::new(&m, 40, 4);
    // Prompts of different lengths; the first is prefilled in two chunks.
    let lens = [9usize, 3, 14, 1];
    let seqs: Vec<SeqId> = lens.iter().map(|_| c.blocks.create()).collect();
    let prompts: Vec<Vec<u32>> = lens.iter().map(|&n| rng.ids(n, vocab)).collect();
    let mut hist: Vec<Vec<u32>> = vec![vec![]; 4];
    let first: Vec<Vec<u32>> = prompts.iter().enumerate().map(|(i, p)| if i == 0 { p[..5].to_vec() } else { p.clone() }).collect();
    c.append(&seqs, &hist, &first);
    for (h, f) in hist.iter_mut().zip(&first) {
        h.extend_from_slice(f);
    }
    let rest = vec![prompts[0][5..].to_vec()];
    let lp = c.append(&seqs[..1], &hist[..1], &rest);
    hist[0].extend_from_slice(&rest[0]);
    assert!(max_diff(&lp[0], &full_logprobs(&m, &hist[0])) < tol);
    let mut worst: f64 = 0.0;
    for _step in 0..10 {
        let new: Vec<Vec<u32>> = (0..4).map(|_| rng.ids(1, vocab)).collect();
        let lp = c.append(&seqs, &hist, &new);
        for i in 0..4 {
            hist[i].extend_from_slice(&new[i]);
            let d = max_diff(&lp[i], &full_logprobs(&m, &hist[i]));
            worst = worst.max(d);
            assert!(d < tol, "{family:?} seq {i} len {}: |cached - full| = {d:e} (tol {tol:e})", hist[i].len());
        }
    }
    assert!(worst > 0.0 || tol < 1e-6, "suspiciously exact");
    c.blocks.check().unwrap();
}

/// f64: tolerance 1e-10 (the cached path sums in a different grouping than the full one).
/// f32: 2e-4 on log-probs of magnitude ~1-10 (a few ulp of f32 through 2 layers).
#[test]
fn cached_logits_equal_full_recompute_every_step() {
    check_cached_vs_full::<f64>(Family::Llama, true, 1e-10);
    check_cached_vs_full::<f64>(Family::Qwen2, false, 1e-10);
    check_cached_vs_full::<f64>(Family::Qwen3, true, 1e-10);
    check_cached_vs_full::<f32>(Family::Qwen2, false, 2e-4);
}

/// Fork in the middle of a block, append to both the child and the parent (the shared partial
/// block is copied on write), continue: every logit equals the spliced ids from scratch, and
/// only the new positions are computed.
#[test]
fn fork_append_continue_equals_scratch() {
    let m = tiny::<f64>(Family::Qwen3, false, 3);
    let mut rng = Rng(9);
    let vocab = m.cfg.vocab_size;
    let mut c = Cache::new(&m, 30, 8);
    let a = c.blocks.create();
    let a_ids = rng.ids(21, vocab);
    c.append(&[a], &[vec![]], std::slice::from_ref(&a_ids));
    let before = c.computed;
    let b = c.blocks.fork(a, 13).unwrap(); // mid-block (13 = 8 + 5)
    let insert = rng.ids(4, vocab);
    let mut b_ids = a_ids[..13].to_vec();
    let lp = c.append(&[b], &[b_ids.clone()], std::slice::from_ref(&insert));
    b_ids.extend_from_slice(&insert);
    assert!(max_diff(&lp[0], &full_logprobs(&m, &b_ids)) < 1e-10);
    assert_eq!(c.computed - before, insert.len(), "a splice computes only the inserted tokens");
    // Continue both: the parent writes past its own partial block, the child decodes on.
    let mut a_hist = a_ids.clone();
    for _ in 0..6 {
        let (ta, tb) = (rng.ids(1, vocab), rng.ids(1, vocab));
        let lp = c.append(&[a, b], &[a_hist.clone(), b_ids.clone()], &[ta.clone(), tb.clone()]);
        a_hist.extend_from_slice(&ta);
        b_ids.extend_from_slice(&tb);
        assert!(max_diff(&lp[0], &full_logprobs(&m, &a_hist)) < 1e-10, "parent after fork");
        assert!(max_diff(&lp[1], &full_logprobs(&m, &b_ids)) < 1e-10, "child after fork");
    }
    // A fork of the child at a block boundary and a truncate-then-append of the parent.
    let d = c.blocks.fork(b, 16).unwrap();
    let ins = rng.ids(3, vocab);
    let mut d_ids = b_ids[..16].to_vec();
    let lp = c.append(&[d], &[d_ids.clone()], std::slice::from_ref(&ins));
    d_ids.extend_from_slice(&ins);
    assert!(max_diff(&lp[0], &full_logprobs(&m, &d_ids)) < 1e-10);
    c.blocks.truncate(a, 10).unwrap();
    a_hist.truncate(10);
    let ins = rng.ids(5, vocab);
    let lp = c.append(&[a], &[a_hist.clone()], std::slice::from_ref(&ins));
    a_hist.extend_from_slice(&ins);
    assert!(max_diff(&lp[0], &full_logprobs(&m, &a_hist)) < 1e-10);
    c.blocks.check().unwrap();
    for s in [a, b, d] {
        c.blocks.free(s).unwrap();
    }
    assert_eq!(c.blocks.free_blocks(), 30);
}

/// Thousands of random create/fork/extend/truncate/free operations: the bookkeeping stays
/// consistent after each, the pool is never over-committed, and everything comes back.
#[test]
fn block_accounting_random_operations_never_leak() {
    for seed in 0..4u64 {
        let mut rng = Rng(100 + seed);
        let (num, bs) = (24 + rng.below(40), 1 + rng.below(8));
        let mut bm = BlockManager::new(num, bs);
        let mut live: Vec<SeqId> = Vec::new();
        let mut lens: std::collections::HashMap<SeqId, usize> = Default::default();
        let mut full = 0;
        for _ in 0..3000 {
            match rng.below(10) {
                0 | 1 => {
                    let s = bm.create();
                    live.push(s);
                    lens.insert(s, 0);
                }
                2 | 3 if !live.is_empty() => {
                    let s = live[rng.below(live.len())];
                    let keep = rng.below(lens[&s] + 1);
                    let f = bm.fork(s, keep).unwrap();
                    live.push(f);
                    lens.insert(f, keep);
                }
                4..=6 if !live.is_empty() => {
                    let s = live[rng.below(live.len())];
                    let n = rng.below(3 * bs + 2);
                    let (free0, need) = (bm.free_blocks(), bm.blocks_needed(s, n).unwrap());
                    match bm.extend(s, n) {
                        Ok(ext) => {
                            assert_eq!(ext.slots.len(), n);
                            assert_eq!(free0 - bm.free_blocks(), need);
                            *lens.get_mut(&s).unwrap() += n;
                        }
                        Err(_) => {
                            assert!(need > free0);
                            assert_eq!(bm.free_blocks(), free0, "failed extend changed the pool");
                            full += 1;
                        }
                    }
                }
                7 if !live.is_empty() => {
                    let s = live[rng.below(live.len())];
                    let l = rng.below(lens[&s] + 1);
                    bm.truncate(s, l).unwrap();
                    lens.insert(s, l);
                }
                _ if !live.is_empty() => {
                    let s = live.swap_remove(rng.below(live.len()));
                    bm.free(s).unwrap();
                    lens.remove(&s);
                }
                _ => {}
            }
            bm.check().unwrap();
            assert!(bm.free_blocks() <= num);
            for (&s, &l) in &lens {
                assert_eq!(bm.len(s).unwrap(), l);
            }
        }
        assert!(full > 0, "the pool never filled: the test did not exercise OutOfBlocks");
        for s in live.drain(..) {
            bm.free(s).unwrap();
        }
        bm.check().unwrap();
        assert_eq!(bm.free_blocks(), num, "blocks leaked");
        assert_eq!(bm.num_seqs(), 0);
    }
}

fn run(engine: &mut Engine<CpuBackend<f32>>, reqs: Vec<Request>, p: &SamplingParams) -> Vec<Output> {
    let n = reqs.len();
    let mut outs: Vec<Option<Output>> = vec![None; n];
    engine
        .generate(reqs, p, None, |e| {
            if let Event::Done(o) = e {
                let i = o.index;
                assert!(outs[i].is_none(), "request {i} reported twice");
                outs[i] = Some(o);
            }
        })
        .unwrap();
    outs.into_iter().map(|o| o.expect("every request reported")).collect()
}

fn sample_requests(vocab: usize) -> Vec<Request> {
    let mut rng = Rng(77);
    let mut reqs = Vec::new();
    for p in 0..6u64 {
        let n = 2 + rng.below(9);
        let prompt = rng.ids(n, vocab);
        for s in 0..3 {
            reqs.push(Request::new(ipo::rollout::key_of(&format!("prompt-{p}")), s, prompt.clone()));
        }
    }
    reqs
}

/// Same seed -> same samples whatever the batch size, prefill chunking, pool size
/// (preemption and recomputation included) and thread count.
#[test]
fn samples_do_not_depend_on_batch_size_or_preemption() {
    let m = tiny::<f32>(Family::Llama, false, 21);
    let p = SamplingParams { temperature: 1.0, top_p: 0.9, top_k: 40, max_new_tokens: 14, eos_ids: vec![1], seed: 1234 };
    let mut results = Vec::new();
    for (max_batch, chunk, blocks, threads) in [(1, 64, 64, 1), (4, 5, 64, 2), (16, 3, 64, 2), (16, 64, 9, 2)] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut e = Engine::new(&m, EngineConfig { num_blocks: blocks, block_size: 4, prefill_chunk: chunk, max_batch }).unwrap();
        let outs = pool.install(|| run(&mut e, sample_requests(m.cfg.vocab_size), &p));
        e.check_blocks().unwrap();
        assert_eq!(e.used_blocks(), 0, "blocks still held after every request finished");
        if blocks == 9 {
            assert!(e.stats().preemptions > 0, "the small pool should have forced preemptions");
        }
        results.push(outs.into_iter().map(|o| (o.ids, o.result)).collect::<Vec<_>>());
    }
    for r in &results[1..] {
        assert_eq!(r, &results[0]);
    }
    // The samples differ between sample indices of a prompt, and a different seed changes them.
    let first = &results[0];
    assert!(first[0].0 != first[1].0 || first[1].0 != first[2].0, "samples of one prompt all equal");
    assert!(first.iter().all(|(_, r)| r.is_ok()));
    let mut e = Engine::new(&m, EngineConfig { num_blocks: 64, block_size: 4, prefill_chunk: 64, max_batch: 16 }).unwrap();
    let other = run(&mut e, sample_requests(m.cfg.vocab_size), &SamplingParams { seed: 99, ..p.clone() });
    assert!(other.iter().zip(first).any(|(o, (ids, _))| &o.ids != ids));
}

/// The splice API: keep a rollout, splice at h with new ids, continue greedily; the result
/// equals a from-scratch run of the spliced ids, and the engine computed only the new tokens.
#[test]
fn engine_splice_reuses_prefix_and_matches_scratch() {
    let m = tiny::<f32>(Family::Qwen2, true, 8);
    let vocab = m.cfg.vocab_size;
    let p = SamplingParams { max_new_tokens: 20, ..Default::default() };
    let mut rng = Rng(4);
    let prompt = rng.ids(11, vocab);
    let mut e = Engine::new(&m, EngineConfig { num_blocks: 40, block_size: 4, prefill_chunk: 8, max_batch: 4 }).unwrap();
    let mut req = Request::new(1, 0, prompt.clone());
    req.keep = true;
    let base = run(&mut e, vec![req], &p).remove(0);
    assert_eq!(base.result, Ok(Finish::Length));
    let handle = base.handle.expect("kept");
    assert_eq!(e.kept_ids(handle).unwrap(), &base.ids[..]);
    let h = prompt.len() + 7; // splice point inside the completion, mid-block
    let insert = rng.ids(5, vocab);
    let before = e.stats().computed_positions;
    let req = e.splice(handle, h, &insert, 1, 0).unwrap();
    let spliced = run(&mut e, vec![req], &p).remove(0);
    let computed = e.stats().computed_positions - before;
    assert_eq!(&spliced.ids[..h], &base.ids[..h]);
    assert_eq!(&spliced.ids[h..h + 5], &insert[..]);
    assert_eq!(spliced.generated().len(), 20);
    // Only the inserted ids and the fed-back generated tokens (all but the last) were computed.
    assert_eq!(computed as usize, insert.len() + 20 - 1);
    // The kept prefix is still intact for another splice.
    e.check_blocks().unwrap();
    let mut fresh = Engine::new(&m, EngineConfig { num_blocks: 40, block_size: 4, prefill_chunk: 64, max_batch: 4 }).unwrap();
    let scratch = run(&mut fresh, vec![Request::new(1, 0, spliced.ids[..h + 5].to_vec())], &p).remove(0);
    assert_eq!(scratch.ids, spliced.ids, "splice != from scratch");
    assert!(fresh.stats().computed_positions as usize >= h + 5 + 19);
    e.release(handle).unwrap();
    assert_eq!(e.used_blocks(), 0);
}

/// Bad requests become recorded failures; the others still run.
#[test]
fn bad_requests_fail_alone() {
    let m = tiny::<f32>(Family::Llama, true, 2);
    let p = SamplingParams { max_new_tokens: 8, ..Default::default() };
    assert!(Engine::new(&m, EngineConfig { num_blocks: 0, block_size: 4, prefill_chunk: 8, max_batch: 4 }).is_err());
    // 6 blocks of 4 = 24 positions: a 20-token prompt + 8 new tokens does not fit.
    let mut e = Engine::new(&m, EngineConfig { num_blocks: 6, block_size: 4, prefill_chunk: 8, max_batch: 4 }).unwrap();
    let mut rng = Rng(1);
    let reqs = vec![
        Request::new(1, 0, vec![]),
        Request::new(2, 0, rng.ids(64, 97)),  // = max_position_embeddings
        Request::new(3, 0, vec![5, 500]),     // out of vocab
        Request::new(4, 0, rng.ids(20, 97)), // budget
        Request::new(5, 0, rng.ids(6, 97)),  // fine
    ];
    let outs = run(&mut e, reqs, &p);
    for (i, o) in outs.iter().enumerate().take(4) {
        assert!(o.result.is_err(), "request {i} should fail");
    }
    assert!(outs[0].result.as_ref().unwrap_err().contains("empty"));
    assert!(outs[1].result.as_ref().unwrap_err().contains("context"));
    assert!(outs[3].result.as_ref().unwrap_err().contains("KV cache"));
    assert_eq!(outs[4].result, Ok(Finish::Length));
    assert_eq!(outs[4].generated().len(), 8);
    assert!(e.splice(ipo::rollout::SeqHandle::clone(&dummy_handle(&m)), 0, &[], 0, 0).is_err());
}

/// A handle from another engine is unknown to this one.
fn dummy_handle(m: &Transformer<CpuBackend<f32>>) -> ipo::rollout::SeqHandle {
    let mut e = Engine::new(m, EngineConfig { num_blocks: 8, block_size: 4, prefill_chunk: 8, max_batch: 1 }).unwrap();
    let mut r = Request::new(0, 0, vec![3, 4, 5, 6, 7, 8]);
    r.keep = true;
    let o = run(&mut e, vec![r], &SamplingParams { max_new_tokens: 1, ..Default::default() }).remove(0);
    let h = o.handle.unwrap();
    // Make it stale in its own engine too, then hand it to another engine (id reuse aside, the
    // other engine holds no kept sequences at all).
    e.release(h).unwrap();
    h
}

/// Greedy generation of the default model equals Hugging Face transformers' greedy
/// `generate` on the same chat-templated prompts (tests/fixtures/default_model/greedy.json).
#[test]
fn default_model_greedy_matches_hugging_face() {
    let Some(dir) = common::default_model() else { return };
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/default_model/greedy.json").unwrap()).unwrap();
    let cfg = ipo::model::load::load_config(&dir).unwrap();
    let m = Transformer::new(cfg.clone(), ipo::model::load::load_weights(&dir, &cfg).unwrap()).unwrap();
    let tok = ipo::model::tokenizer::Tokenizer::from_dir(&dir).unwrap();
    let tmpl = ipo::model::chat::ChatTemplate::from_dir(&dir).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let mut reqs = Vec::new();
    let mut want = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let ids: Vec<u32> = serde_json::from_value(c["prompt_ids"].clone()).unwrap();
        let text = tmpl.render(c["messages"].as_array().unwrap(), true, &Default::default()).unwrap();
        assert_eq!(tok.encode(&text, false).unwrap(), ids, "case {i}: our chat template + tokenizer != HF prompt ids");
        reqs.push(Request::new(i as u64, 0, ids));
        want.push(serde_json::from_value::<Vec<u32>>(c["generated_ids"].clone()).unwrap());
    }
    // The fixture did not stop at EOS: neither do we here.
    let p = SamplingParams { max_new_tokens: want[0].len(), ..Default::default() };
    let mut e = Engine::new(&m, EngineConfig { num_blocks: 64, block_size: 16, prefill_chunk: 64, max_batch: 8 }).unwrap();
    let outs = run(&mut e, reqs, &p);
    for (i, (o, w)) in outs.iter().zip(&want).enumerate() {
        let got = o.generated();
        let agree = got.iter().zip(w).take_while(|(a, b)| a == b).count();
        eprintln!("case {i}: {agree}/{} greedy tokens equal to HF", w.len());
        assert!(agree >= 32, "case {i}: only the first {agree} tokens match HF\n ours {got:?}\n hf   {w:?}");
    }
}
