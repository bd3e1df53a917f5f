//! ZeRO-1's master-slice ops of `CudaBackend` (src/backend/cuda: precision.rs, optim.rs, and
//! the overrides in mod.rs) on the PTX simulator, in fp32 and bf16, against the CPU reference
//! `Reference` on the same seeded random inputs: `weight_slice`, `shard_weight` +
//! `set_weight_slice` (bf16 rounding checked against `half::bf16::from_f32`), `adamw_slice`
//! and `sum_squares_slices` (bit for bit, as tests/cuda_sim_ops.rs's adamw and
//! sum_squares_many), and the host paths of `reduce_scatter_start` / `all_gather_slices` at
//! world 2 (two threads over `Group::threads`). The NCCL paths need GPUs (nccl.rs). Without
//! NVRTC the tests print a skip notice, or fail under CI=true.

mod common;

use common::{same_bits, Rng};
use ipo::backend::cuda::Precision;
use ipo::backend::{AdamwStep, Backend, Reference};
use std::ops::Range;

const PRECISIONS: [Precision; 2] = [Precision::F32, Precision::Bf16];

/// The bf16 rounding (RNE) of each value, widened back to f32.
fn bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}

/// Random values plus exact bf16 ties (1 + 2^-8 rounds down to 1, 1 + 3 * 2^-8 up to
/// 1 + 2^-6: to even), so the rounding mode shows.
fn values_with_ties(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = rng.vec(n, 1.0);
    for (x, t) in v.iter_mut().zip([1.0 + 2f32.powi(-8), -(1.0 + 3.0 * 2f32.powi(-8)), 0.5 + 2f32.powi(-9)]) {
        *x = t;
    }
    v.rotate_right(n / 3);
    v
}

/// `y [m, n] = x [m, k] @ w^T` with w `[n, k]` (a matmul that reads a weight's bf16 copy under
/// bf16).
fn product<B: Backend>(be: &B, x: &B::Buf, w: &B::Buf, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = be.zeros(m * n);
    be.matmul(x, false, w, true, &mut y, m, n, k, false);
    be.download(&y)
}

#[test]
fn weight_slice_copies_the_elements() {
    let mut rng = Rng(11);
    let host = rng.vec(1001, 1.0);
    let cpu = Reference::new();
    let wc = cpu.upload_weight(&host);
    for p in PRECISIONS {
        let Some(be) = common::sim_with(p) else { return };
        let w = be.upload_weight(&host);
        for (at, n) in [(0, 1001), (333, 101), (1000, 1), (7, 0)] {
            let s = be.weight_slice(&w, at, n);
            assert_eq!(be.len(&s), n);
            let (got, want) = (be.download(&s), cpu.download(&cpu.weight_slice(&wc, at, n)));
            assert!(same_bits(&got, &want) && got.len() == want.len() && same_bits(&want, &host[at..at + n]), "{p}: weight_slice({at}, {n})");
        }
        assert!(same_bits(&be.download(&w), &host), "{p}: the weight is read only");
    }
}

/// fp32 weights (not sharded): set_weight_slice copies, and under bf16 drops the cached bf16
/// copy the matmuls read (a product after the write equals one of a fresh weight).
#[test]
fn set_weight_slice_copies_into_fp32_weights_and_drops_their_bf16_copy() {
    let mut rng = Rng(12);
    let (m, n, k) = (3, 8, 16);
    let (host, x) = (rng.vec(n * k, 1.0), rng.vec(m * k, 1.0));
    let cpu = Reference::new();
    for p in PRECISIONS {
        let Some(be) = common::sim_with(p) else { return };
        let (mut w, mut wc, xd) = (be.upload_weight(&host), cpu.upload_weight(&host), be.upload(&x));
        let before = product(&be, &xd, &w, m, n, k); // fills the bf16 copy under bf16
        for (at, len) in [(37, 50), (0, 64), (127, 1)] {
            let src = rng.vec(len, 1.0);
            be.set_weight_slice(&mut w, at, &be.upload(&src));
            cpu.set_weight_slice(&mut wc, at, &cpu.upload(&src));
        }
        let want = cpu.download(&wc);
        assert!(want != host && same_bits(&be.download(&w), &want), "{p}: the weight after set_weight_slice");
        let (after, fresh) = (product(&be, &xd, &w, m, n, k), product(&be, &xd, &be.upload_weight(&want), m, n, k));
        assert!(after != before && same_bits(&after, &fresh), "{p}: a product reads the new values");
    }
}

/// shard_weight keeps bf16 only under bf16 (the rounding of the values, fewer bytes) and
/// nothing changes under fp32; set_weight_slice rounds into it at odd and even offsets, the
/// neighbours (the other half of a 4-byte word included) untouched, and products read it.
#[test]
fn shard_weight_then_set_weight_slice_rounds_into_the_bf16_values() {
    let mut rng = Rng(13);
    let (m, n, k) = (2, 3, 43); // 129 values: an odd count, the last word half used
    let (host, x) = (values_with_ties(&mut rng, n * k), rng.vec(m * k, 1.0));
    let cpu = Reference::new();
    for p in PRECISIONS {
        let Some(be) = common::sim_with(p) else { return };
        let round = |v: &[f32]| if p == Precision::Bf16 { bf16(v) } else { v.to_vec() };
        let (mut w, mut wc) = (be.upload_weight(&host), cpu.upload_weight(&host));
        let live = be.memory_live();
        be.shard_weight(&mut w);
        cpu.shard_weight(&mut wc);
        if p == Precision::Bf16 {
            assert!(be.memory_live() < live, "bf16: the fp32 values freed");
        }
        assert!(same_bits(&be.download(&w), &round(&host)), "{p}: shard_weight");
        for (at, len) in [(37, 50), (0, 64), (128, 1), (1, 128), (64, 2)] {
            let src = values_with_ties(&mut rng, len);
            be.set_weight_slice(&mut w, at, &be.upload(&src));
            cpu.set_weight_slice(&mut wc, at, &cpu.upload(&src));
            let want = round(&cpu.download(&wc));
            assert!(same_bits(&be.download(&w), &want), "{p}: set_weight_slice({at}, {len})");
        }
        let want = round(&cpu.download(&wc));
        assert!(want != round(&host));
        let xd = be.upload(&x);
        assert!(same_bits(&product(&be, &xd, &w, m, n, k), &product(&be, &xd, &be.upload_weight(&want), m, n, k)), "{p}: products of the sharded weight");
    }
}

/// Bit for bit (kernels/optim.cu repeats the reference's f32 operations): two steps (t = 3,
/// 4), weight decay and a clipping factor on, slices at the start, inside and at the end.
#[test]
fn adamw_slice_matches_the_reference_bit_for_bit() {
    let mut rng = Rng(14);
    let len = 1000;
    let g = rng.vec(len, 1.0);
    let cpu = Reference::new();
    for p in PRECISIONS {
        let Some(be) = common::sim_with(p) else { return };
        let gd = be.upload(&g);
        for (at, n) in [(0, len), (333, 400), (999, 1)] {
            let (p0, m0) = (rng.vec(n, 1.0), rng.vec(n, 0.1));
            let v0: Vec<f32> = rng.vec(n, 0.1).iter().map(|x| x * x + 1e-12).collect();
            let (mut pc, mut mc, mut vc) = (cpu.upload(&p0), cpu.upload(&m0), cpu.upload(&v0));
            let (mut pg, mut mg, mut vg) = (be.upload(&p0), be.upload(&m0), be.upload(&v0));
            let gc = cpu.upload(&g);
            for t in [3, 4] {
                let h = AdamwStep {
                    lr: 3e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_scale: 0.37,
                    bc1: 1.0 - 0.9f64.powi(t), bc2: 1.0 - 0.999f64.powi(t),
                };
                cpu.adamw_slice(&mut pc, &gc, at, &mut mc, &mut vc, &h);
                be.adamw_slice(&mut pg, &gd, at, &mut mg, &mut vg, &h);
            }
            assert!(cpu.download(&pc) != p0, "the reference moves the slice");
            for (name, d, c) in [("p", &pg, &pc), ("m", &mg, &mc), ("v", &vg, &vc)] {
                assert!(same_bits(&be.download(d), &cpu.download(c)), "{p}: adamw_slice({at}, {n}).{name}");
            }
        }
    }
}

/// Each slice's sum equals, bit for bit, `sum_squares` of a buffer holding just that slice
/// (the same partials, added in the same order), and the reference's within
/// n * 2^-53 relative (as tests/cuda_sim_ops.rs's sum_squares).
#[test]
fn sum_squares_slices_match_the_sums_of_the_slices() {
    let mut rng = Rng(15);
    let hosts: Vec<Vec<f32>> = [1000, 65537, 3, 0].iter().map(|&n| rng.vec(n, 1.0)).collect();
    let slices: [(usize, Range<usize>); 7] = [(0, 0..1000), (0, 333..733), (1, 1..65537), (2, 1..2), (3, 0..0), (0, 500..500), (1, 0..65537)];
    let cpu = Reference::new();
    let hc: Vec<_> = hosts.iter().map(|h| cpu.upload(h)).collect();
    let want = cpu.sum_squares_slices(&slices.iter().map(|(i, r)| (&hc[*i], r.clone())).collect::<Vec<_>>());
    for p in PRECISIONS {
        let Some(be) = common::sim_with(p) else { return };
        let hd: Vec<_> = hosts.iter().map(|h| be.upload(h)).collect();
        let got = be.sum_squares_slices(&slices.iter().map(|(i, r)| (&hd[*i], r.clone())).collect::<Vec<_>>());
        assert_eq!(got.len(), slices.len());
        for ((s, (i, r)), w) in got.iter().zip(&slices).zip(&want) {
            let one = be.sum_squares(&be.upload(&hosts[*i][r.clone()]));
            assert_eq!(s.to_bits(), one.to_bits(), "{p}: slice {r:?} of buffer {i} vs a buffer of it");
            let tol = r.len() as f64 * f64::EPSILON / 2.0;
            assert!((s - w).abs() <= tol * w.max(1.0), "{p}: slice {r:?} of buffer {i}: {s} vs the reference's {w}");
        }
    }
}

/// ZeRO-1's collectives through the host (the sim joins no NCCL group) at world 2, each rank
/// a thread with its own backends: after reduce_scatter_start and all_reduce_wait each rank's
/// owned elements hold the sum (the reference's bits, which are g0 + g1); after the ranks
/// write their own pieces (set_weight_slice) all_gather_slices gives every rank the owners'
/// values, in the weights' storage (a weight sharded in bf16 gets the owner's bf16 values).
#[test]
fn reduce_scatter_and_all_gather_through_the_host_at_world_2() {
    use ipo::dist::{Comm, Group};
    let lens = [10usize, 7, 5];
    let owners: Vec<Vec<(Range<usize>, usize)>> = vec![vec![(0..4, 0), (4..10, 1)], vec![(0..3, 0), (3..7, 1)], vec![(0..0, 1), (0..5, 0)]];
    let pieces: Vec<(usize, Range<usize>, usize)> = owners.iter().enumerate().flat_map(|(i, o)| o.iter().map(move |(r, w)| (i, r.clone(), *w))).collect();
    // Per rank: its gradients; per piece: the owner's updated values; the weights before.
    let grads = |rank: u64| -> Vec<Vec<f32>> {
        let mut rng = Rng(100 + rank);
        lens.iter().map(|&n| rng.vec(n, 1.0)).collect()
    };
    let updates: Vec<Vec<f32>> = {
        let mut rng = Rng(200);
        pieces.iter().map(|(_, r, _)| values_with_ties(&mut rng, r.len().max(1))[..r.len()].to_vec()).collect()
    };
    let weights: Vec<Vec<f32>> = {
        let mut rng = Rng(300);
        lens.iter().map(|&n| rng.vec(n, 1.0)).collect()
    };
    for p in PRECISIONS {
        if common::sim_with(p).is_none() {
            return;
        }
        let runs: Vec<_> = Group::threads(2, std::time::Duration::from_secs(60))
            .into_iter()
            .map(|g| {
                let (owners, pieces, updates, weights) = (owners.clone(), pieces.clone(), updates.clone(), weights.clone());
                let gr = grads(g.rank() as u64);
                std::thread::spawn(move || {
                    let (be, cpu, rank) = (common::sim_with(p).unwrap(), Reference::new(), g.rank());
                    // The reduce-scatter, on the sim then on the reference.
                    let mut gd: Vec<_> = gr.iter().map(|h| be.upload(h)).collect();
                    be.reduce_scatter_start(&mut gd.iter_mut().collect::<Vec<_>>(), &owners, &mut |x: &mut [f32]| -> anyhow::Result<()> { Ok(g.all_reduce_sum(x)?) }).unwrap();
                    be.all_reduce_wait().unwrap();
                    let mut gc: Vec<_> = gr.iter().map(|h| cpu.upload(h)).collect();
                    cpu.reduce_scatter_start(&mut gc.iter_mut().collect::<Vec<_>>(), &owners, &mut |x: &mut [f32]| -> anyhow::Result<()> { Ok(g.all_reduce_sum(x)?) }).unwrap();
                    cpu.all_reduce_wait().unwrap();
                    let summed: Vec<(Vec<f32>, Vec<f32>)> = pieces
                        .iter()
                        .filter(|pc| pc.2 == rank)
                        .map(|(i, r, _)| (be.download(&gd[*i])[r.clone()].to_vec(), cpu.download(&gc[*i])[r.clone()].to_vec()))
                        .collect();
                    // The all-gather: weight 1 sharded (bf16 only under bf16), this rank's
                    // pieces written first.
                    let mut wd: Vec<_> = weights.iter().map(|h| be.upload_weight(h)).collect();
                    let mut wc: Vec<_> = weights.iter().map(|h| cpu.upload_weight(h)).collect();
                    be.shard_weight(&mut wd[1]);
                    for ((i, r, owner), u) in pieces.iter().zip(&updates) {
                        if *owner == rank {
                            be.set_weight_slice(&mut wd[*i], r.start, &be.upload(u));
                            cpu.set_weight_slice(&mut wc[*i], r.start, &cpu.upload(u));
                        }
                    }
                    be.all_gather_slices(rank, &mut wd.iter_mut().collect::<Vec<_>>(), &pieces, &mut |b: Vec<u8>| -> anyhow::Result<Vec<Vec<u8>>> { Ok(g.all_gather(b)?) }).unwrap();
                    cpu.all_gather_slices(rank, &mut wc.iter_mut().collect::<Vec<_>>(), &pieces, &mut |b: Vec<u8>| -> anyhow::Result<Vec<Vec<u8>>> { Ok(g.all_gather(b)?) }).unwrap();
                    let gathered: Vec<(Vec<f32>, Vec<f32>)> = wd.iter().zip(&wc).map(|(d, c)| (be.download(d), cpu.download(c))).collect();
                    (summed, gathered)
                })
            })
            .collect();
        let out: Vec<_> = runs.into_iter().map(|h| h.join().unwrap()).collect();
        let (g0, g1) = (grads(0), grads(1));
        for (rank, (summed, gathered)) in out.iter().enumerate() {
            let mine = pieces.iter().filter(|pc| pc.2 == rank);
            for ((i, r, _), (got, want)) in mine.zip(summed) {
                let sum: Vec<f32> = r.clone().map(|j| g0[*i][j] + g1[*i][j]).collect();
                assert!(same_bits(got, want) && same_bits(want, &sum) && got.len() == r.len(), "{p}: rank {rank}'s sums of buffer {i} {r:?}");
            }
            for (i, (got, want)) in gathered.iter().enumerate() {
                let mut expect = weights[i].clone();
                for ((j, r, _), u) in pieces.iter().zip(&updates) {
                    if *j == i {
                        expect[r.clone()].copy_from_slice(u);
                    }
                }
                assert!(same_bits(want, &expect), "rank {rank}: the reference's weight {i}");
                let expect = if i == 1 && p == Precision::Bf16 { bf16(&expect) } else { expect };
                assert!(same_bits(got, &expect) && got.len() == expect.len(), "{p}: rank {rank}'s weight {i} after the all-gather");
            }
        }
    }
}
