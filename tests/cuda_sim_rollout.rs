//! The rollout engine on `CudaBackend<Sim>` (paged KV cache, paged attention and the token
//! sampler all as kernels: kernels/kv_cache.cu, kernels/sampling.cu) against the same engine
//! on `CpuBackend<f32>`, on tiny random models: a few prompts generated greedily and with
//! temperature + top-k + top-p, every rollout kept, then `Engine::splice`d mid-completion
//! with inserted ids and continued (greedy and sampled), reusing the cached prefix.
//!
//! Asserted: identical token ids, finish reasons and engine counters on both backends (the
//! sampler draws from the same counters on both; the logits differ by f32 summation order,
//! about 1e-6, which changes a token only if it falls on a near-tie, and these seeded runs
//! have none), and the per-token log-probs of every final sequence under both backends'
//! uncached forward within 2e-5 (the tolerance of tests/cuda_sim_model.rs). Once more with the
//! CUDA backend's decode steps replayed as graphs (src/backend/cuda/graphs.rs): the same
//! trace, and steps were replayed.
//! Without NVRTC the tests print a skip notice, or fail under CI=true.

mod common;

use common::{random_weights, tiny_config, Rng};
use ipo::backend::cpu::CpuBackend;
use ipo::backend::Backend;
use ipo::model::config::Family;
use ipo::model::transformer::{Batch, Transformer};
use ipo::rollout::{key_of, Engine, EngineConfig, EngineStats, Event, Finish, Output, Request, SamplingParams};

fn run<B: Backend>(e: &mut Engine<B>, reqs: Vec<Request>, p: &SamplingParams) -> Vec<Output> {
    let n = reqs.len();
    let mut outs: Vec<Option<Output>> = vec![None; n];
    e.generate(reqs, p, None, |ev| {
        if let Event::Done(o) = ev {
            let i = o.index;
            assert!(outs[i].is_none(), "request {i} reported twice");
            outs[i] = Some(o);
        }
    })
    .unwrap();
    outs.into_iter().map(|o| o.expect("every request reported")).collect()
}

/// The ids and finish of one output.
type Done = (Vec<u32>, Result<Finish, String>);

/// What one backend produced: the outputs of every phase and the engine counters.
#[derive(Debug, PartialEq)]
struct Trace {
    phases: Vec<Vec<Done>>,
    stats: EngineStats,
}

/// Phase 1: greedy and sampled rollouts of the prompts, all kept. Phase 2: each kept rollout
/// spliced `cut` tokens into its completion with `insert[i]`, continued with the parameters
/// of its phase-1 request (greedy ones greedily, sampled ones sampled), sample index + 10.
fn rollout<B: Backend>(m: &Transformer<B>, prompts: &[Vec<u32>], inserts: &[Vec<u32>], greedy: &SamplingParams, sampled: &SamplingParams) -> (Trace, Vec<Vec<u32>>) {
    let mut e = Engine::new(m, EngineConfig { num_blocks: 48, block_size: 4, prefill_chunk: 6, max_batch: 4 }).unwrap();
    let mut phases = Vec::new();
    let mut finals = Vec::new();
    for (params, samples) in [(greedy, 1u32), (sampled, 2)] {
        let mut reqs = Vec::new();
        for (p, ids) in prompts.iter().enumerate() {
            for s in 0..samples {
                let mut r = Request::new(key_of(&format!("prompt-{p}")), s, ids.clone());
                r.keep = true;
                reqs.push(r);
            }
        }
        let base = run(&mut e, reqs, params);
        phases.push(base.iter().map(|o| (o.ids.clone(), o.result.clone())).collect());
        let mut splices = Vec::new();
        for (i, o) in base.iter().enumerate() {
            let h = o.context_len + 3.min(o.generated().len());
            let handle = o.handle.expect("kept");
            splices.push(e.splice(handle, h, &inserts[i % inserts.len()], key_of(&format!("splice-{i}")), 10 + i as u32).unwrap());
        }
        let cont = run(&mut e, splices, params);
        for (o, b) in cont.iter().zip(&base) {
            let h = b.context_len + 3.min(b.generated().len());
            assert_eq!(&o.ids[..h], &b.ids[..h], "the splice keeps the prefix");
            assert!(o.result.is_ok(), "{:?}", o.result);
            finals.push(o.ids.clone());
        }
        phases.push(cont.iter().map(|o| (o.ids.clone(), o.result.clone())).collect());
        for o in &base {
            e.release(o.handle.unwrap()).unwrap();
        }
    }
    e.check_blocks().unwrap();
    assert_eq!(e.used_blocks(), 0);
    (Trace { phases, stats: e.stats() }, finals)
}

/// Per-token log-probs of `seqs` (each token given its prefix) by the uncached forward.
fn logprobs<B: Backend>(m: &Transformer<B>, seqs: &[Vec<u32>]) -> Vec<f32> {
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (lp, _) = m.forward(&Batch::from_sequences(&refs)).unwrap();
    m.backend.download(&lp)
}

fn check(family: Family, tied: bool, seed: u64, graphs: bool) {
    let Some(gpu) = common::sim() else { return };
    gpu.set_graphs(graphs);
    let cfg = tiny_config(family, tied);
    let vocab = cfg.vocab_size;
    let cpu = Transformer::with_backend(CpuBackend::<f32>::new(), cfg.clone(), random_weights(&cfg, &mut Rng(seed))).unwrap();
    let cuda = Transformer::with_backend(gpu, cfg, random_weights(&tiny_config(family, tied), &mut Rng(seed))).unwrap();
    let mut rng = Rng(seed ^ 0x5eed);
    // Ids >= 2 (1 is EOS in tiny_config) so no prompt or insert ends a sequence by itself.
    let mut ids = |n: usize| rng.ids(n, vocab - 2).into_iter().map(|x| x + 2).collect::<Vec<u32>>();
    let prompts = vec![ids(5), ids(9), ids(2), ids(7)];
    let inserts = vec![ids(3), ids(1), ids(4)];
    let greedy = SamplingParams { max_new_tokens: 14, eos_ids: vec![1], ..Default::default() };
    let sampled = SamplingParams { temperature: 0.8, top_k: 20, top_p: 0.9, max_new_tokens: 14, eos_ids: vec![1], seed: seed * 31 + 7 };

    let (tc, fc) = rollout(&cpu, &prompts, &inserts, &greedy, &sampled);
    let (tg, fg) = rollout(&cuda, &prompts, &inserts, &greedy, &sampled);
    let tokens: usize = tc.phases.iter().flatten().map(|(ids, _)| ids.len()).sum();
    eprintln!("{family:?} tied={tied}: {tokens} ids over {} sequences, stats {:?}", tc.phases.iter().map(Vec::len).sum::<usize>(), tg.stats);
    if graphs {
        let s = cuda.backend.step_stats();
        eprintln!("{family:?}: step graphs {s:?}");
        assert!(s.replayed > 10 && s.captured > 2 && s.ungraphed == 0, "{s:?}");
    }
    for (i, (pc, pg)) in tc.phases.iter().zip(&tg.phases).enumerate() {
        assert_eq!(pc, pg, "{family:?}: phase {i} differs between the CPU and CUDA (Sim) engines");
    }
    assert_eq!(tc.stats, tg.stats);

    // The sampled phase really samples: some sampled rollout leaves the greedy path, and the
    // two samples of a prompt differ somewhere.
    let (g, s) = (&tc.phases[0], &tc.phases[2]);
    assert!((0..prompts.len()).any(|p| s[2 * p].0 != g[p].0 || s[2 * p + 1].0 != g[p].0), "sampling never left the greedy path");
    assert!((0..prompts.len()).any(|p| s[2 * p].0 != s[2 * p + 1].0), "the samples of every prompt are equal");

    // Log-probs of the final (spliced) sequences under each backend's uncached forward.
    assert_eq!(fc, fg);
    let (lc, lg) = (logprobs(&cpu, &fc), logprobs(&cuda, &fg));
    assert_eq!(lc.len(), lg.len());
    let err = lc.iter().zip(&lg).fold(0f32, |m, (a, b)| if b.is_finite() { m.max((a - b).abs()) } else { f32::INFINITY });
    eprintln!("{family:?}: max |dlogp| over {} tokens of the spliced sequences = {err:.3e}", lc.len());
    assert!(err <= 2e-5, "{family:?}: log-prob error {err:e}");
}

#[test]
fn llama_splice_rollout_matches_cpu() {
    check(Family::Llama, false, 41, false);
}

#[test]
fn qwen3_splice_rollout_matches_cpu() {
    check(Family::Qwen3, true, 42, false);
}

#[test]
fn llama_splice_rollout_with_step_graphs_matches_cpu() {
    check(Family::Llama, false, 41, true);
}
