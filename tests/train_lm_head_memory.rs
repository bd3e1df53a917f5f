//! The fused lm-head log-prob never materialises the `[rows, vocab]` logits: a counting global
//! allocator measures the peak heap growth of `lm_head_logprobs` (forward) and `lm_head_bwd`
//! on 512 loss rows x a 32768-token vocabulary (full f32 logits: 64 MiB) and bounds it by the
//! chunked working set, O(ROWS x TILE) per thread (128 x 2048 f32 = 1 MiB per tile), far below
//! the logits. The log-probs are also checked against a naive softmax on a few rows.
//!
//! On a weight (`upload_weight`, whose versions the backend tracks) the CPU forward keeps its
//! logits for the backward, up to 128 MiB: the second test bounds that memory and checks that
//! the backward's result is bit-equal to the recomputing one, and that a write to the weight
//! between the two stops the reuse.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ipo::backend::cpu::CpuBackend;
use ipo::backend::Backend;

struct Counting;
static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = CUR.fetch_add(l.size(), Ordering::SeqCst) + l.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CUR.fetch_sub(l.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// The counters are the process's: the tests of this file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Seeded values in [-scale, scale).
fn vals(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = common::Rng(seed);
    (0..n).map(|_| rng.signed() * scale).collect()
}

#[test]
fn lm_head_peak_memory_is_chunked_not_full_logits() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (tokens, dim, vocab) = (600usize, 64usize, 32768usize);
    let be = CpuBackend::<f32>::new();
    let h = be.upload(&vals(tokens * dim, 1, 1.0)); // [tokens, dim]
    let w = be.upload(&vals(vocab * dim, 2, 0.3)); // [vocab, dim]
    let rows: Vec<u32> = (0..512u32).map(|i| (i * 7) % tokens as u32).collect(); // [n] loss rows
    let targets: Vec<u32> = (0..512u32).map(|i| (i * 7919) % vocab as u32).collect();
    let mut dh = be.zeros(tokens * dim);
    let mut dw = be.zeros(vocab * dim);
    let dlogp = vals(rows.len(), 3, 1.0);
    let full_logits = rows.len() * vocab * 4;
    let threads = rayon::current_num_threads();
    // Per thread: one logits tile (and its softmax copy in the backward) + a gathered row chunk.
    // (ROWS x TILE = 128 x 2048 logits; the gathered rows are 128 x dim.)
    let bound = (threads + 1) * 2 * (128 * 2048 * 4 + 128 * dim * 4) + 64 * 1024;

    let base = CUR.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let (logp, lse) = be.lm_head_logprobs(&h, &w, dim, &rows, &targets);
    let fwd = PEAK.load(Ordering::SeqCst) - base;

    let base2 = CUR.load(Ordering::SeqCst);
    PEAK.store(base2, Ordering::SeqCst);
    be.lm_head_bwd(&h, &w, dim, &rows, &targets, &lse, &dlogp, &mut dh, Some(&mut dw));
    let bwd = PEAK.load(Ordering::SeqCst) - base2;
    println!("peak extra: forward {fwd} B, backward {bwd} B; full logits {full_logits} B; bound {bound} B ({threads} threads)");
    assert!(fwd <= bound && fwd * 8 < full_logits, "forward peak {fwd} B (bound {bound}, logits {full_logits})");
    assert!(bwd <= bound && bwd * 8 < full_logits, "backward peak {bwd} B (bound {bound}, logits {full_logits})");

    // Values: naive log-softmax on a few rows.
    let (hv, wv, lp) = (be.download(&h), be.download(&w), be.download(&logp));
    for i in [0usize, 17, 511] {
        let r = rows[i] as usize;
        let logits: Vec<f64> = (0..vocab)
            .map(|v| (0..dim).map(|d| hv[r * dim + d] as f64 * wv[v * dim + d] as f64).sum())
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        let want = logits[targets[i] as usize] - lse;
        assert!((lp[i] as f64 - want).abs() < 1e-4, "row {i}: {} vs {want}", lp[i]);
    }
    assert!(be.download(&dw).iter().any(|&x| x != 0.0));
}

/// The backward of the forward's kept logits equals, bit for bit, the backward that recomputes
/// them (a plain `w` buffer: nothing kept); the forward keeps at most 128 MiB (here all of
/// 64 MiB of logits, plus the gathered rows); an lse whose weight was written after the forward
/// gets the recomputing backward of the new weight.
#[test]
fn kept_logits_give_the_recomputed_backward_bit_for_bit() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (tokens, dim, vocab) = (600usize, 64usize, 32768usize);
    let be = CpuBackend::<f32>::new();
    let h = be.upload(&vals(tokens * dim, 11, 1.0)); // [tokens, dim]
    let w_host = vals(vocab * dim, 12, 0.3); // [vocab, dim]
    let (w_plain, mut w_weight) = (be.upload(&w_host), be.upload_weight(&w_host));
    // 512 loss rows with repeats (more than one chunk of 128), and targets across the vocab.
    let rows: Vec<u32> = (0..512u32).map(|i| (i * 13) % tokens as u32).collect();
    let targets: Vec<u32> = (0..512u32).map(|i| (i * 7919 + 5) % vocab as u32).collect();
    let dlogp = vals(rows.len(), 13, 1.0);
    let full_logits = rows.len() * vocab * 4;
    let backward = |w: &ipo::backend::cpu::CpuBuf<f32>, lse: &ipo::backend::cpu::CpuBuf<f32>| {
        let (mut dh, mut dw) = (be.zeros(tokens * dim), be.zeros(vocab * dim));
        be.lm_head_bwd(&h, w, dim, &rows, &targets, lse, &dlogp, &mut dh, Some(&mut dw));
        (be.download(&dh), be.download(&dw))
    };

    let (lp_plain, lse_plain) = be.lm_head_logprobs(&h, &w_plain, dim, &rows, &targets);
    let want = backward(&w_plain, &lse_plain);
    let base = CUR.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let (lp_kept, lse_kept) = be.lm_head_logprobs(&h, &w_weight, dim, &rows, &targets);
    let fwd = PEAK.load(Ordering::SeqCst) - base;
    let held = CUR.load(Ordering::SeqCst) - base;
    println!("forward keeping: peak extra {fwd} B, held after {held} B; full logits {full_logits} B");
    assert!(held >= full_logits, "the forward kept {held} B, less than the {full_logits} B of logits");
    assert!(fwd <= full_logits + 16 * 1024 * 1024 && fwd <= 128 * 1024 * 1024 + 16 * 1024 * 1024, "forward peak {fwd} B");
    assert_eq!(be.download(&lp_kept), be.download(&lp_plain));
    assert_eq!(be.download(&lse_kept), be.download(&lse_plain));
    let got = backward(&w_weight, &lse_kept);
    assert!(got.0 == want.0 && got.1 == want.1, "kept-logits backward differs from the recomputing one");
    assert!(got.0.iter().any(|&x| x != 0.0) && got.1.iter().any(|&x| x != 0.0));

    // A write to the weight after the forward: the backward recomputes with the new weight.
    let (_, lse_stale) = be.lm_head_logprobs(&h, &w_weight, dim, &rows, &targets);
    w_weight[3] += 0.25;
    let mut w2 = w_host.clone();
    w2[3] += 0.25;
    let w2_plain = be.upload(&w2);
    let got = backward(&w_weight, &lse_stale);
    let want = backward(&w2_plain, &lse_plain);
    assert!(got.0 == want.0 && got.1 == want.1, "a stale kept forward was reused after a write to the weight");
}
