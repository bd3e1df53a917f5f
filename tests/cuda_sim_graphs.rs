//! Decode steps replayed as graphs (src/backend/cuda/graphs.rs) on `CudaBackend<Sim>`: a tiny
//! random model decodes a few sequences step by step (`forward_cached`, then the backend's
//! sampler, as the rollout engine does) with graphs off and on, and the two runs must agree bit
//! for bit: every step's logits and every sampled token. The contexts cross many decode splits
//! (the backend's split is set to 4 keys, so the paged_decode grid grows while the batch stays),
//! and the sequences finish at different steps (the batch shrinks from 3 to 1).
//!
//! Asserted besides: graphs were captured and replayed; a replayed step is one launch issued
//! by the host (Sim's `Issued` counters), any other step issues exactly the graphs-off run's
//! operations; at batch 1 the captures, replays and first sightings are exactly those the
//! step shapes imply; a step that begins while the previous step's logits are alive runs
//! ungraphed and leaves them intact; a download inside a step issues the tape so far.
//! Without NVRTC the tests print a skip notice, or fail under CI=true.

mod common;

use common::{random_weights, tiny_config, Rng};
use ipo::backend::cuda::{CudaBackend, Precision, Sim};
use ipo::backend::{Backend, PagedSeq, SampleRow, StepStats};
use ipo::model::config::Family;
use ipo::model::decode::DecodeStep;
use ipo::model::transformer::Transformer;

/// Keys per decode split in these tests (DECODE_SPLIT is 256, beyond the tiny model's 64
/// positions).
const SPLIT: usize = 4;
const BLOCK: usize = 4;
/// Blocks each sequence owns (its positions `0..BLOCKS_PER_SEQ * BLOCK`).
const BLOCKS_PER_SEQ: usize = 16;

/// A sequence being decoded: its ids, how many are in the cache, and its final length.
struct Seq {
    ids: Vec<u32>,
    cached: usize,
    end: usize,
    /// Sampling temperature (0: greedy).
    temperature: f32,
}

/// What one run produced, per step: the logits' bits, the sampled tokens, the operations the
/// host issued during `forward_cached`, and the step counters after it.
#[derive(Default)]
struct Trace {
    logits: Vec<Vec<u32>>,
    tokens: Vec<Vec<u32>>,
    issued: Vec<u64>,
    graph_launches: Vec<u64>,
    stats: Vec<StepStats>,
    ctx: Vec<Vec<usize>>,
}

/// Decodes `seqs` to their ends, all sequences not yet finished in every step (the first step
/// is their prompts' prefill).
fn decode(m: &Transformer<CudaBackend<Sim>>, mut seqs: Vec<Seq>) -> Trace {
    let geom = m.kv_geom(seqs.len() * BLOCKS_PER_SEQ, BLOCK);
    let mut kv = m.alloc_kv(geom);
    let mut tr = Trace::default();
    loop {
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].ids.len() < seqs[i].end).collect();
        if live.is_empty() {
            return tr;
        }
        let mut st = DecodeStep::default();
        for &i in &live {
            let s = &seqs[i];
            let (q_start, n, ctx) = (st.ids.len(), s.ids.len() - s.cached, s.ids.len());
            assert!(ctx <= BLOCKS_PER_SEQ * BLOCK);
            let base = i * BLOCKS_PER_SEQ;
            st.ids.extend_from_slice(&s.ids[s.cached..]);
            st.positions.extend((s.cached..ctx).map(|p| p as u32));
            st.slots.extend((s.cached..ctx).map(|p| (base * BLOCK + p) as u32));
            let table_start = st.block_table.len();
            st.block_table.extend((0..ctx.div_ceil(BLOCK)).map(|b| (base + b) as u32));
            st.seqs.push(PagedSeq { q_start, q_len: n, ctx_len: ctx, table_start });
            st.logit_rows.push((q_start + n - 1) as u32);
        }
        let (issued0, stats0) = (m.backend.gpu().issued(), m.backend.step_stats());
        let logits = m.forward_cached(&mut kv, geom, &st).unwrap();
        let issued = m.backend.gpu().issued();
        let stats = m.backend.step_stats();
        assert_eq!(stats.steps, stats0.steps + 1);
        tr.issued.push(issued.total() - issued0.total());
        tr.graph_launches.push(issued.graph_launches - issued0.graph_launches);
        tr.logits.push(m.backend.download(&logits).iter().map(|x| x.to_bits()).collect());
        let rows: Vec<SampleRow> = live
            .iter()
            .map(|&i| SampleRow { temperature: seqs[i].temperature, top_k: 20, top_p: 0.9, seed: 7, key: 100 + i as u64, sample: 0, position: seqs[i].ids.len() as u32 })
            .collect();
        let tokens = m.backend.sample(&logits, m.cfg.vocab_size, &rows);
        drop(logits);
        tr.ctx.push(live.iter().map(|&i| seqs[i].ids.len()).collect());
        for (&i, &t) in live.iter().zip(&tokens) {
            seqs[i].cached = seqs[i].ids.len();
            seqs[i].ids.push(t);
        }
        tr.tokens.push(tokens);
        tr.stats.push(stats);
    }
}

/// The tiny model on a fresh Sim backend with graphs on or off and `SPLIT`-key decode splits,
/// at precision `p` (under bf16: its layer matrices frozen in bf16, or not, when their bf16
/// copies are made inside the first decode step).
fn model_at(family: Family, graphs: bool, p: Precision, freeze: bool) -> Option<Transformer<CudaBackend<Sim>>> {
    let be = common::sim_with(p)?;
    be.set_graphs(graphs);
    be.set_decode_split(SPLIT);
    let cfg = tiny_config(family, false);
    let w = random_weights(&cfg, &mut Rng(61));
    let mut m = Transformer::with_backend(be, cfg, w).unwrap();
    if freeze {
        m.freeze();
    }
    Some(m)
}

fn model(family: Family, graphs: bool) -> Option<Transformer<CudaBackend<Sim>>> {
    model_at(family, graphs, Precision::F32, false)
}

fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = Rng(62);
    [5, 3, 8].iter().map(|&n| rng.ids(n, vocab)).collect()
}

#[test]
fn graphs_decode_bit_for_bit_as_launches_and_replay_as_one_launch() {
    let cases = [(Family::Llama, Precision::F32, false), (Family::Qwen3, Precision::F32, false), (Family::Qwen2, Precision::Bf16, true), (Family::Llama, Precision::Bf16, false)];
    for (family, p, freeze) in cases {
        let Some(off) = model_at(family, false, p, freeze) else { return };
        let on = model_at(family, true, p, freeze).unwrap();
        let vocab = off.cfg.vocab_size;
        // Ends (prompt + new tokens) 35, 15 and 28: the batch goes 3 -> 2 -> 1. Greedy and
        // sampled rows.
        let seqs = || {
            prompts(vocab)
                .into_iter()
                .zip([(30, 0.0), (12, 0.8), (20, 1.1)])
                .map(|(ids, (new, temperature))| Seq { end: ids.len() + new, ids, cached: 0, temperature })
                .collect::<Vec<_>>()
        };
        let (a, b) = (decode(&off, seqs()), decode(&on, seqs()));
        assert_eq!(a.logits.len(), b.logits.len());
        for (s, (x, y)) in a.logits.iter().zip(&b.logits).enumerate() {
            assert!(x == y, "{family:?} {p:?} frozen={freeze}: step {s} logits differ with graphs on");
        }
        assert_eq!(a.tokens, b.tokens, "{family:?} {p:?} frozen={freeze}: sampled tokens");
        // Sampled rows left the greedy path somewhere (the draws were used).
        assert!(a.tokens.iter().flatten().collect::<std::collections::HashSet<_>>().len() > 5);

        let last = *b.stats.last().unwrap();
        let batches: Vec<usize> = b.ctx.iter().map(Vec::len).collect();
        eprintln!("{family:?} {p:?} frozen={freeze}: {} steps, batch {batches:?}, stats on {last:?}", b.stats.len());
        assert_eq!(a.stats.last().unwrap().replayed + a.stats.last().unwrap().captured, 0, "graphs off ran graphs");
        assert!(last.replayed > 10, "{family:?} {p:?} frozen={freeze}: few replays: {last:?}");
        // A capture per batch at least (3, 2, 1), and more: the split count crossing powers of two.
        assert!(last.captured >= 5, "{family:?} {p:?} frozen={freeze}: {last:?}");
        assert!(batches.contains(&3) && batches.contains(&2) && batches.contains(&1));
        assert_eq!(last.ungraphed + last.capture_failures + last.outputs_alive + last.synced, 0, "{last:?}");
        // Per step: a graph step is one launch issued by the host; any other step issued what
        // the graphs-off run issued for the same step.
        let mut prev = StepStats::default();
        for (s, st) in b.stats.iter().enumerate() {
            if st.replayed + st.captured > prev.replayed + prev.captured {
                assert_eq!((b.issued[s], b.graph_launches[s]), (1, 1), "{family:?} {p:?} frozen={freeze}: step {s}");
            } else {
                assert_eq!((b.issued[s], b.graph_launches[s]), (a.issued[s], 0), "{family:?} {p:?} frozen={freeze}: step {s}");
                assert!(a.issued[s] > 20, "{family:?} {p:?} frozen={freeze}: step {s} issued {} ops", a.issued[s]);
            }
            prev = *st;
        }
    }
}

/// At batch 1 the step's work changes only with the context's paged_decode split count
/// rounded up to a power of two (the block table stays within its first 256 bytes): each
/// such bucket is seen once op by op, captured at its second step and replayed after.
#[test]
fn graphs_at_batch_one_change_only_where_the_split_count_doubles() {
    let Some(m) = model(Family::Llama, true) else { return };
    let ids = Rng(63).ids(3, m.cfg.vocab_size);
    let end = 45;
    let tr = decode(&m, vec![Seq { ids, cached: 0, end, temperature: 0.0 }]);
    let buckets: Vec<usize> = tr.ctx[1..].iter().map(|c| c[0].div_ceil(SPLIT).next_power_of_two()).collect();
    let mut runs: Vec<usize> = Vec::new();
    for (i, b) in buckets.iter().enumerate() {
        if i > 0 && buckets[i - 1] == *b {
            *runs.last_mut().unwrap() += 1;
        } else {
            runs.push(1);
        }
    }
    let last = *tr.stats.last().unwrap();
    eprintln!("decode steps per bucket {runs:?} (buckets {buckets:?}): {last:?}");
    assert!(runs.len() >= 4, "{runs:?}");
    // The prefill step is a first sighting too.
    assert_eq!(last.first_seen as usize, 1 + runs.len(), "{last:?}");
    assert_eq!(last.captured as usize, runs.iter().filter(|&&r| r >= 2).count(), "{last:?}");
    assert_eq!(last.replayed as usize, runs.iter().map(|&r| r.saturating_sub(2)).sum::<usize>(), "{last:?}");
}

/// A step that begins while the previous step's logits are alive runs ungraphed, with its own
/// buffers: the kept logits still read what they held. And a download inside a step issues
/// the step's work so far first (the value read is the one computed).
#[test]
fn graphs_never_overwrite_live_outputs_and_sync_mid_step() {
    let Some(m) = model(Family::Llama, true) else { return };
    let be = &m.backend;
    let geom = m.kv_geom(BLOCKS_PER_SEQ, BLOCK);
    let mut kv = m.alloc_kv(geom);
    let ids = Rng(64).ids(12, m.cfg.vocab_size);
    let step = |t: usize| DecodeStep {
        ids: vec![ids[t]],
        positions: vec![t as u32],
        slots: vec![t as u32],
        seqs: vec![PagedSeq { q_start: 0, q_len: 1, ctx_len: t + 1, table_start: 0 }],
        block_table: (0..(t + 1).div_ceil(BLOCK) as u32).collect(),
        logit_rows: vec![0],
    };
    // Steps 0..3 (the last two in one shape): a replay happens by step 3.
    for t in 0..4 {
        drop(m.forward_cached(&mut kv, geom, &step(t)).unwrap());
    }
    let s0 = be.step_stats();
    assert!(s0.replayed >= 1, "{s0:?}");
    let kept = m.forward_cached(&mut kv, geom, &step(4)).unwrap();
    let kept_bits: Vec<u32> = be.download(&kept).iter().map(|x| x.to_bits()).collect();
    let next = m.forward_cached(&mut kv, geom, &step(5)).unwrap();
    let s1 = be.step_stats();
    assert_eq!((s1.outputs_alive, s1.ungraphed), (s0.outputs_alive + 1, s0.ungraphed + 1), "{s1:?}");
    assert_eq!(be.download(&kept).iter().map(|x| x.to_bits()).collect::<Vec<_>>(), kept_bits, "the kept logits changed");
    assert_ne!(be.download(&next).iter().map(|x| x.to_bits()).collect::<Vec<_>>(), kept_bits);
    drop((kept, next));

    // A download inside a step.
    let mut rng = Rng(65);
    let (x, y) = (rng.vec(300, 1.0), rng.vec(300, 1.0));
    be.step_begin(1);
    let xd = be.upload(&x);
    let mut yd = be.upload(&y);
    be.add_assign(&mut yd, &xd);
    let mid = be.download(&yd);
    be.add_assign(&mut yd, &xd);
    be.step_end();
    let end = be.download(&yd);
    drop((xd, yd));
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| b + a).collect();
    assert_eq!(mid, want);
    assert_eq!(end, want.iter().zip(&x).map(|(w, a)| w + a).collect::<Vec<f32>>());
    let s2 = be.step_stats();
    assert_eq!((s2.synced, s2.ungraphed), (s1.synced + 1, s1.ungraphed + 1), "{s2:?}");
}

/// A device that cannot capture: the step it fails on runs launch by launch, graphs go off
/// for the backend, and decoding goes on equal to a run without graphs.
#[test]
fn graphs_go_off_when_a_capture_fails() {
    let Some(off) = model(Family::Llama, false) else { return };
    let on = model(Family::Llama, true).unwrap();
    on.backend.gpu().refuse_captures(true);
    let vocab = off.cfg.vocab_size;
    let seqs = || prompts(vocab).into_iter().take(2).map(|ids| Seq { end: ids.len() + 6, ids, cached: 0, temperature: 0.0 }).collect::<Vec<_>>();
    let (a, b) = (decode(&off, seqs()), decode(&on, seqs()));
    assert!(a.logits == b.logits && a.tokens == b.tokens);
    let last = *b.stats.last().unwrap();
    // Steps of new shapes are first sightings until one repeats: its capture fails, and it and
    // every later step run ungraphed (at least one more here).
    assert_eq!((last.capture_failures, last.captured + last.replayed), (1, 0), "{last:?}");
    assert_eq!(last.first_seen + last.ungraphed, last.steps, "{last:?}");
    assert!(last.ungraphed >= 2, "{last:?}");
    assert!(!on.backend.graphs());
    assert_eq!(b.issued, a.issued);
}
