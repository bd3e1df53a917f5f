//! The lm-head forward on our own tensor-core kernels (kernels/lm_head_mma.cu:
//! lm_logits_lse_mma + lm_lse_combine; host side src/backend/cuda/lm_head_mma.rs), the bf16
//! path of `Backend::lm_head_logprobs`, on `Sim`:
//! - parity against an f64 host reference on the same bf16-rounded h and w, at odd shapes
//!   (rows not a multiple of 16, vocab not a multiple of the 128-column tile, dims not a
//!   multiple of 16 on both the scalar (dim % 8 != 0) and the 16-byte staging path, row lists
//!   with repeats and gaps, targets in the first and the last tile), outputs and scratch
//!   poisoned with NaN first (`set_poison_allocs`), recorded as a step;
//! - the tensor-core share: mma.sync count x 4096 FLOPs against 2 rows vocab dim;
//! - the logits never reach global memory (bytes stored = the partials and target logits).
//!
//! Without NVRTC the tests print a skip notice, or fail under CI=true.

mod common;

use common::{sim_with, Rng};
use half::bf16;
use ipo::backend::cuda::{CudaBackend, Precision, Sim};
use ipo::backend::Backend;

fn r16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

const U: f64 = 1.0 / (1u64 << 24) as f64; // fp32 unit roundoff

/// f64 reference on the bf16-rounded operands: (logp, lse, per-row max_v sum_k |h w|).
fn reference(h: &[f32], w: &[f32], dim: usize, rows: &[u32], targets: &[u32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let vocab = w.len() / dim;
    let (mut logp, mut lse, mut mag) = (Vec::new(), Vec::new(), Vec::new());
    for (&r, &t) in rows.iter().zip(targets) {
        let hr = &h[r as usize * dim..(r as usize + 1) * dim];
        let (mut logits, mut m) = (Vec::with_capacity(vocab), 0f64);
        for v in 0..vocab {
            let wr = &w[v * dim..(v + 1) * dim];
            logits.push(hr.iter().zip(wr).map(|(&a, &b)| r16(a) as f64 * r16(b) as f64).sum::<f64>());
            m = m.max(hr.iter().zip(wr).map(|(&a, &b)| (r16(a) as f64 * r16(b) as f64).abs()).sum::<f64>());
        }
        let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l = mx + logits.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        logp.push(logits[t as usize] - l);
        lse.push(l);
        mag.push(m);
    }
    (logp, lse, mag)
}

/// `lm_head_logprobs` with every output and scratch buffer poisoned with NaN
/// (`set_poison_allocs`), recorded as a step (graphs.rs) and issued: (logp, lse).
fn run_poisoned(be: &CudaBackend<Sim>, h: &[f32], w: &[f32], dim: usize, rows: &[u32], targets: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let (hd, wd) = (be.upload(h), be.upload_weight(w));
    be.set_poison_allocs(true);
    be.set_graphs(true);
    be.step_begin(1);
    let (lp, ls) = be.lm_head_logprobs(&hd, &wd, dim, rows, targets);
    let out = (be.download(&lp), be.download(&ls));
    drop((lp, ls));
    be.step_end();
    be.set_graphs(false);
    be.set_poison_allocs(false);
    out
}

/// Under bf16 the tensor-core kernels give logp and lse of the f64 reference on the rounded
/// operands within the fp32 bound: the logits' fp32 dot products differ from the exact ones
/// by at most gamma_dim = dim u / (1 - dim u) times sum_k |h_k w_k| (u = 2^-24); lse adds
/// the fp32 exp/log and the sums of the merges (at most n_vtiles + 64 roundings of relative
/// u each, bounded by 2 (n_vtiles + 64) u, plus 2 u |lse|), and logp is their difference.
/// Measured when written: see the printed ratio (max error / bound).
#[test]
fn lm_head_mma_matches_the_f64_reference_on_rounded_operands() {
    let Some(be) = sim_with(Precision::Bf16) else { return };
    assert!(be.lm_head_mma() || std::env::var("IPO_LM_HEAD").is_ok_and(|v| v.trim() == "cublas"));
    be.set_lm_head_mma(true);
    let mut rng = Rng(0x1a11);
    // (tokens of h, dim, vocab, rows): dim 24 and 41 stage element by element, 40 and 64 by
    // 16-byte loads (40 leaves a zero-padded half k-tile); vocab tails of 45, 1, 127 columns.
    for (t, dim, vocab, n) in [(29, 24, 301, 37), (50, 40, 1000, 70), (11, 41, 129, 19), (80, 64, 383, 97)] {
        let (h, w) = (rng.vec(t * dim, 1.0), rng.vec(vocab * dim, 0.5));
        // Repeats and gaps: random rows of h (some never used), first and last row included.
        let mut rows: Vec<u32> = (0..n).map(|_| rng.below(t) as u32).collect();
        rows[0] = 0;
        rows[n - 1] = t as u32 - 1;
        rows[1] = rows[2];
        let mut targets: Vec<u32> = rng.ids(n, vocab);
        targets[0] = 0;
        targets[1] = vocab as u32 - 1;
        targets[n - 1] = vocab as u32 - 1;
        targets[2] = 127.min(vocab as u32 - 1);
        let (logp, lse) = run_poisoned(&be, &h, &w, dim, &rows, &targets);
        let (rl, rs, mag) = reference(&h, &w, dim, &rows, &targets);
        let gamma = dim as f64 * U / (1.0 - dim as f64 * U);
        let nvt = vocab.div_ceil(128) as f64;
        let mut worst = 0f64;
        for i in 0..n {
            let logit_bound = gamma * mag[i];
            let lse_bound = logit_bound + 2.0 * (nvt + 64.0) * U + 2.0 * U * rs[i].abs();
            let logp_bound = logit_bound + lse_bound;
            let (el, es) = ((logp[i] as f64 - rl[i]).abs(), (lse[i] as f64 - rs[i]).abs());
            assert!(logp[i].is_finite() && lse[i].is_finite(), "{t}x{dim} vocab {vocab} row {i}: logp {} lse {}", logp[i], lse[i]);
            assert!(el <= logp_bound, "{t}x{dim} vocab {vocab} row {i}: logp {} vs {} (bound {logp_bound:.2e})", logp[i], rl[i]);
            assert!(es <= lse_bound, "{t}x{dim} vocab {vocab} row {i}: lse {} vs {} (bound {lse_bound:.2e})", lse[i], rs[i]);
            worst = worst.max(el / logp_bound).max(es / lse_bound);
        }
        let max_err = (0..n).map(|i| (logp[i] as f64 - rl[i]).abs().max((lse[i] as f64 - rs[i]).abs())).fold(0f64, f64::max);
        eprintln!("rows {n} of {t}, dim {dim}, vocab {vocab}: max |err| {max_err:.2e}, max err / bound {worst:.3}");
        // The cuBLAS path (IPO_LM_HEAD=cublas) on the same inputs agrees within the same bound.
        be.set_lm_head_mma(false);
        let (hd, wd) = (be.upload(&h), be.upload_weight(&w));
        let (lc, _) = be.lm_head_logprobs(&hd, &wd, dim, &rows, &targets);
        be.set_lm_head_mma(true);
        let lc = be.download(&lc);
        for i in 0..n {
            assert!((lc[i] - logp[i]).abs() as f64 <= 2.0 * (gamma * mag[i] + 2.0 * (nvt + 64.0) * U + 2.0 * U * rs[i].abs()), "row {i}: cublas {} mma {}", lc[i], logp[i]);
        }
    }
}

/// Tensor-core share and traffic of lm_logits_lse_mma at 96 rows, vocab 2048, dim 256: its
/// mma.sync m16n8k16 instructions times 4096 FLOPs cover at least 95% of the op's 2 rows
/// vocab dim matmul FLOPs (and at most 105%: warps over padding rows or columns issue none);
/// the kernel stores only the partials [rows, 16, 2] and the target logits [rows] (f32),
/// never the [rows, vocab] logits.
#[test]
fn lm_head_mma_runs_its_matmul_on_tensor_cores() {
    let Some(be) = sim_with(Precision::Bf16) else { return };
    be.set_lm_head_mma(true);
    let mut rng = Rng(0x1a12);
    let (t, n, vocab, dim) = (120, 96, 2048, 256);
    let (h, w) = (be.upload(&rng.vec(t * dim, 1.0)), be.upload_weight(&rng.vec(vocab * dim, 0.1)));
    let rows: Vec<u32> = (0..n).map(|_| rng.below(t) as u32).collect();
    let targets = rng.ids(n, vocab);
    let (logp, _) = be.lm_head_logprobs(&h, &w, dim, &rows, &targets);
    assert!(be.download(&logp).iter().all(|x| x.is_finite() && *x < 0.0));
    let stats = be.gpu().stats();
    let k = stats.iter().find(|(name, _, _)| name.ends_with("lm_logits_lse_mma")).expect("lm_logits_lse_mma ran");
    let mma = (k.2.by_class[ptxsim::Class::Tensor as usize] / 32) as f64;
    let share = mma * 4096.0 / (2.0 * (n * vocab * dim) as f64);
    let stored = k.2.bytes_stored[0];
    eprintln!("lm_logits_lse_mma: {mma} mma.sync, tensor-core FLOPs / matmul FLOPs {share:.3}; global bytes stored {stored}");
    assert!((0.95..=1.05).contains(&share), "tensor-core share {share:.3}");
    assert_eq!(stored as usize, n * (vocab / 128) * 8 + n * 4, "global stores beyond the partials and target logits");
}
