//! The trainer's gradient all-reduce, `Backend::all_reduce_sum`: on `cpu` and `sim` it is the
//! host group's sum bit for bit (the buffers through one host vector, summed in rank order),
//! and a failing rank's `CommError` comes back through it unchanged. The device path (a
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
    let make = Arc::new(make);
    let hs: Vec<_> = Group::threads(world, Duration::from_secs(60))
        .into_iter()
        .map(|g| {
            let make = make.clone();
            std::thread::spawn(move || {
                let be = make();
                let mut bufs: Vec<B::Buf> = grads(g.rank()).iter().map(|h| be.upload(h)).collect();
                let mut refs: Vec<&mut B::Buf> = bufs.iter_mut().collect();
                be.all_reduce_sum(&mut refs, &mut |x| Ok(g.all_reduce_sum(x)?)).unwrap();
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
