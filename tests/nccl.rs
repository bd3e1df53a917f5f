//! The trainer's gradient all-reduce, `Backend::all_reduce_start` / `all_reduce_wait`
//! (`all_reduce_sum` is both): on `cpu` and `sim` it is the host group's sum bit for bit (the
//! buffers of each start through one host vector, summed in rank order), however the buffers
//! are split into starts, the trainer's all-reduce overlapped with the backward on `sim` gives
//! the bits of one all-reduce after it, and a failing rank's `CommError` comes back through it
//! unchanged. The device path (a
//! world-1 NCCL group summing on the GPU, every bit unchanged) is checked by `ipo selftest
//! --device cuda` (scripts/gpu-check.sh), since no test machine has a GPU.
//! The NCCL library search and its errors are unit tests of src/backend/cuda/nccl.rs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Rng;
use ipo::backend::cuda::CudaBackend;
use ipo::backend::{Backend, Reference};
use ipo::dist::{Comm, CommError, Group};

/// Rank `rank`'s gradient buffers: lengths 0 to a few thousand, seeded values, never zeros.
fn grads(rank: usize) -> Vec<Vec<f32>> {
    let mut rng = Rng(0xA11 + rank as u64);
    [1000, 0, 3, 4096, 17].iter().map(|&n| (0..n).map(|_| rng.signed() * 3.0 + 0.01).collect()).collect()
}

/// Each rank's buffers after `Backend::all_reduce_sum` over a thread group of `world`, on the
/// backend `make` gives each rank.
fn reduce_on<B: Backend + 'static>(world: usize, make: impl Fn() -> B + Send + Sync + 'static) -> Vec<Vec<Vec<f32>>> {
    reduce_split_on(world, make, &[5])
}

/// As `reduce_on`, with one `Backend::all_reduce_start` per `split` run of buffers (the
/// trainer's one per decoder layer), then one `all_reduce_wait`.
fn reduce_split_on<B: Backend + 'static>(world: usize, make: impl Fn() -> B + Send + Sync + 'static, split: &'static [usize]) -> Vec<Vec<Vec<f32>>> {
    let make = Arc::new(make);
    let hs: Vec<_> = Group::threads(world, Duration::from_secs(60))
        .into_iter()
        .map(|g| {
            let make = make.clone();
            std::thread::spawn(move || {
                let be = make();
                let mut bufs: Vec<B::Buf> = grads(g.rank()).iter().map(|h| be.upload(h)).collect();
                let mut refs: Vec<&mut B::Buf> = bufs.iter_mut().collect();
                if split == [refs.len()] {
                    be.all_reduce_sum(&mut refs, &mut |x| Ok(g.all_reduce_sum(x)?)).unwrap();
                } else {
                    let mut rest = &mut refs[..];
                    for &n in split {
                        let (now, later) = rest.split_at_mut(n);
                        be.all_reduce_start(now, &mut |x| Ok(g.all_reduce_sum(x)?)).unwrap();
                        rest = later;
                    }
                    assert!(rest.is_empty());
                    be.all_reduce_wait().unwrap();
                }
                bufs.iter().map(|b| be.download(b)).collect::<Vec<_>>()
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The ranks' buffers summed in rank order, `((g0 + g1) + g2) + ...` in f32: the host group's
/// sum, and what the trainer's all-reduce gave before `Backend::all_reduce_sum`.
fn rank_order_sum(world: usize) -> Vec<Vec<f32>> {
    let mut acc = grads(0);
    for r in 1..world {
        for (a, b) in acc.iter_mut().zip(grads(r)) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
    }
    acc
}

fn assert_bits(got: &[Vec<Vec<f32>>], want: &[Vec<f32>], what: &str) {
    for (rank, bufs) in got.iter().enumerate() {
        for (i, (g, w)) in bufs.iter().zip(want).enumerate() {
            assert_eq!(g.len(), w.len(), "{what}: rank {rank} buffer {i}");
            assert!(g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: rank {rank} buffer {i} differs from the rank-order sum");
        }
    }
}

#[test]
fn cpu_all_reduce_is_the_host_group_sum_bit_for_bit() {
    for world in [1, 2, 3] {
        assert_bits(&reduce_on(world, Reference::new), &rank_order_sum(world), &format!("cpu world {world}"));
    }
}

#[test]
fn sim_all_reduce_is_the_host_group_sum_bit_for_bit() {
    if common::sim().is_none() {
        return;
    }
    // `Sim` has no device group (it cannot run NCCL): `all_reduce_sum` takes the host path.
    let got = reduce_on(3, || CudaBackend::sim().unwrap());
    assert_bits(&got, &rank_order_sum(3), "sim world 3");
}

/// Started in runs (`all_reduce_start` per run, as the trainer starts a decoder layer's
/// gradients as soon as the backward has finished it), then waited for: the same bits as one
/// all-reduce, the host path's sum being elementwise.
#[test]
fn all_reduce_started_in_runs_is_the_same_sum_bit_for_bit() {
    for (world, split) in [(2, &[2, 1, 2][..]), (3, &[1, 1, 1, 1, 1][..]), (3, &[4, 1][..])] {
        assert_bits(&reduce_split_on(world, Reference::new, split), &rank_order_sum(world), &format!("cpu world {world} runs {split:?}"));
    }
    if common::sim().is_some() {
        assert_bits(&reduce_split_on(2, || CudaBackend::sim().unwrap(), &[3, 2]), &rank_order_sum(2), "sim world 2 runs [3, 2]");
    }
}

/// The trainer on the CUDA backend's host side (`Sim`, which joins no device group, so every
/// start sums through the host at once): the all-reduce overlapped with the backward (each
/// decoder layer's gradients started as the last micro-batch's backward finishes it) gives the
/// bits of one all-reduce after the backward, world 2, full fine-tuning with gradient
/// accumulation, and LoRA.
#[test]
fn sim_trainer_overlapped_all_reduce_is_bit_identical() {
    if common::sim().is_none() {
        return;
    }
    use ipo::model::config::Family;
    for (family, lora) in [(Family::Qwen3, false), (Family::Llama, true)] {
        let mcfg = common::three_layers(family, false);
        let (tcfg, pairs) = (common::overlap_config(lora), common::pairs8(41, mcfg.vocab_size));
        let run = |after| common::train_ranks(|| CudaBackend::sim().unwrap(), &mcfg, 7, &tcfg, &pairs, 2, false, after, 2);
        let (over, after) = (run(false), run(true));
        for (r, (o, a)) in over.iter().zip(&after).enumerate() {
            assert!(o.losses.iter().zip(&a.losses).all(|(x, y)| x.to_bits() == y.to_bits()), "{family:?} lora {lora} rank {r}: {:?} vs {:?}", o.losses, a.losses);
            assert!(o.tensors.iter().zip(&a.tensors).all(|(x, y)| x.0 == y.0 && common::same_bits(&x.2, &y.2)), "{family:?} lora {lora} rank {r}: tensors differ");
            assert_eq!(o.sent[0].len(), mcfg.num_layers + usize::from(!lora));
        }
    }
}

/// A rank that leaves: the others' `all_reduce_sum` fails with the group's `CommError`, which
/// the trainer reports as it did before (naming the rank).
#[test]
fn a_failing_rank_keeps_its_comm_error() {
    let hs: Vec<_> = Group::threads(3, Duration::from_secs(20))
        .into_iter()
        .map(|g| {
            std::thread::spawn(move || {
                if g.rank() == 2 {
                    return None;
                }
                let be = Reference::new();
                let mut b = be.upload(&grads(g.rank())[0]);
                let e = be.all_reduce_sum(&mut [&mut b], &mut |x| Ok(g.all_reduce_sum(x)?)).unwrap_err();
                Some(e.downcast::<CommError>().expect("the group's own error type").to_string())
            })
        })
        .collect();
    let out: Vec<Option<String>> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(out[0].as_deref().unwrap().contains("rank 2 closed its connection"), "{out:?}");
    assert!(out[1].as_deref().unwrap().contains("rank 0 aborted the job") && out[1].as_deref().unwrap().contains("rank 2"), "{out:?}");
}
