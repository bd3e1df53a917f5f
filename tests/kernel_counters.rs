//! Kernel cost regression test on the PTX simulator: a fixed set of ops (every op of the
//! parity table, `OPS` below) at a fixed small shape on a fresh `CudaBackend<Sim>`, twice.
//! Asserts that the per-kernel counters of `Sim::stats()` (launches, lane-instructions,
//! global/shared bytes loaded and stored, barriers) are identical between the runs (the
//! simulator's counts do not depend on the seeded warp interleaving or on anything else that
//! varies), and that every kernel's lane-instructions and global bytes stay within the budget
//! recorded in `MEASURED` + 10%, so an accidental slowdown of a kernel fails CI.
//!
//! The workload is `ipo::backend::workload` (also run by benches/kernels.rs at a bigger shape
//! and by `ipo selftest --time`); the `workload` module here adds the simulator counters. Without NVRTC the test prints a skip notice, or fails under CI=true.

#![allow(dead_code)]

mod common;

pub mod workload {
    pub use ipo::backend::workload::{prepare, run_op, Inputs, Shape, OPS};
    use ipo::backend::cuda::{CudaBackend, Sim};
    use ptxsim::LaunchStats;

    type B = CudaBackend<Sim>;

    /// Counters of one kernel over one op: launches and the summed `LaunchStats`.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct KernelCount {
        pub kernel: String,
        pub launches: u64,
        pub lane_instructions: u64,
        pub bytes_loaded: [u64; 5],
        pub bytes_stored: [u64; 5],
        pub barriers: u64,
    }

    fn snapshot(be: &B) -> Vec<(String, u64, LaunchStats)> {
        be.gpu().stats()
    }

    /// Runs `op` once and returns the counters of the kernels it launched (Sim::stats()
    /// before/after), sorted by kernel name.
    pub fn count_op(be: &B, i: &mut Inputs<B>, op: &str) -> Vec<KernelCount> {
        let before = snapshot(be);
        run_op(be, i, op);
        let after = snapshot(be);
        let mut out = Vec::new();
        for (k, n, st) in after {
            let (n0, st0) = before.iter().find(|b| b.0 == k).map(|b| (b.1, b.2.clone())).unwrap_or_default();
            if n == n0 {
                continue;
            }
            let mut c = KernelCount {
                kernel: k,
                launches: n - n0,
                lane_instructions: st.lane_instructions - st0.lane_instructions,
                bytes_loaded: [0; 5],
                bytes_stored: [0; 5],
                barriers: st.barriers - st0.barriers,
            };
            for s in 0..5 {
                c.bytes_loaded[s] = st.bytes_loaded[s] - st0.bytes_loaded[s];
                c.bytes_stored[s] = st.bytes_stored[s] - st0.bytes_stored[s];
            }
            out.push(c);
        }
        out
    }

    /// A markdown table of per-op, per-kernel counters (bytes per state space: global,
    /// shared, local; loaded/stored).
    pub fn format_counts(rows: &[(String, Vec<KernelCount>)]) -> String {
        let mut s = String::from("| op | kernel | launches | lane-instr | global ld/st (B) | shared ld/st (B) | local ld/st (B) | barriers |\n|---|---|---|---|---|---|---|---|\n");
        for (op, ks) in rows {
            if ks.is_empty() {
                s += &format!("| {op} | (host GEMM only) | 0 | 0 | - | - | - | 0 |\n");
            }
            for k in ks {
                s += &format!(
                    "| {op} | {} | {} | {} | {}/{} | {}/{} | {}/{} | {} |\n",
                    k.kernel, k.launches, k.lane_instructions, k.bytes_loaded[0], k.bytes_stored[0], k.bytes_loaded[1], k.bytes_stored[1],
                    k.bytes_loaded[2], k.bytes_stored[2], k.barriers
                );
            }
        }
        s
    }
}

#[allow(unused_imports)] // format_counts is used by the test only (this file is also a module of benches/kernels.rs)
use workload::{count_op, format_counts, prepare, KernelCount, Shape, OPS};

type SimBackend = ipo::backend::cuda::CudaBackend<ipo::backend::cuda::Sim>;

/// The shape of this test: `workload::SMALL` (small enough for CI on the simulator, a few
/// seconds, with head_dim 64 and odd sizes so tails are exercised).
pub const TEST_SHAPE: Shape = ipo::backend::workload::SMALL;

/// Counters of every op of `OPS` on a fresh `Sim`. With `shift_seeds`, one extra kernel
/// launch first, so every later launch gets a different warp-interleaving seed (`Sim` seeds
/// launch n with n).
fn measure(shift_seeds: bool) -> Option<Vec<(String, Vec<KernelCount>)>> {
    use ipo::backend::Backend;
    let be = common::sim()?;
    be.prepare(&[TEST_SHAPE.head_dim]).unwrap();
    if shift_seeds {
        let mut z = be.upload(&[1.0, 2.0, 3.0]);
        be.add_assign(&mut z, &be.upload(&[0.5, 0.25, 0.125]));
        assert_eq!(be.download(&z), vec![1.5, 2.25, 3.125]);
    }
    let mut inputs = prepare(&be, TEST_SHAPE, 0x5eed);
    Some(OPS.iter().map(|op| (op.to_string(), count_op(&be, &mut inputs, op))).collect())
}

/// (op, kernel, lane-instructions, global bytes loaded, global bytes stored) of TEST_SHAPE,
/// measured with `cargo test --release --test kernel_counters -- --nocapture` (the table it
/// prints) on 2026-11-22 with NVRTC 12.9 PTX for compute_80 (paged_decode, which replaced
/// paged_attn for the decode step: 2026-11-30; the register-resident RMSNorm kernels, col_sum
/// with rstd in shared memory and RoPE with one thread per (token, pair): 2026-11-30). The budget is each value + 10%.
/// After an intended change to a kernel or its launch, re-measure and update these rows.
const MEASURED: &[(&str, &str, u64, u64, u64)] = &[
    ("add_assign", "add_assign", 160960, 25344, 12672),
    ("embedding", "gather_rows", 221952, 25344, 12672),
    ("embedding_bwd", "scatter_add_rows", 229152, 76032, 12672),
    ("rmsnorm", "rmsnorm_fwd_v1", 244290, 16128, 12804),
    ("rmsnorm_bwd", "col_sum", 40548, 25860, 384),
    ("rmsnorm_bwd", "rmsnorm_bwd_v1", 286272, 29196, 12672),
    ("bias_add", "bias_add", 192800, 25344, 12672),
    ("bias_bwd", "col_sum", 29184, 13056, 384),
    ("rope", "rope", 124032, 42240, 33792),
    ("swiglu", "swiglu_fwd", 496008, 52800, 26400),
    ("swiglu_bwd", "swiglu_bwd", 601832, 79200, 52800),
    ("attention", "attn_fwd", 3364676, 465920, 34320),
    ("attention_bwd", "attn_bwd_d", 291720, 67584, 528),
    ("attention_bwd", "attn_bwd_dkdv", 1881944, 1531392, 72704),
    ("attention_bwd", "attn_bwd_dq", 3440000, 533504, 33792),
    ("attention_bwd", "fill", 375552, 0, 33792),
    ("lm_head_logprobs", "gather_rows", 221952, 25344, 12672),
    ("lm_head_logprobs", "lse_rows", 2440617, 39864, 264),
    ("lm_head_bwd", "gather_rows", 221952, 25344, 12672),
    ("lm_head_bwd", "lm_head_grad", 981864, 158400, 39600),
    ("lm_head_bwd", "scatter_add_rows", 229152, 76032, 12672),
    ("kv_write", "kv_write", 400256, 50688, 33792),
    ("kv_copy_blocks", "kv_copy_block", 466944, 32768, 32768),
    ("paged_attention", "paged_decode", 460926, 160824, 3072),
    ("sample", "sample_rows", 3779794, 268212, 7212),
    ("sum_squares", "sum_squares_partial", 764964, 36864, 288),
    ("adamw", "adamw_step", 783360, 147456, 110592),
    ("sgd", "sgd_step", 525312, 73728, 36864),
    ("segment_dpo", "fill", 4246, 0, 56),
    ("segment_dpo", "segment_dpo", 17331, 2120, 72),
];

fn budget(x: u64) -> u64 {
    x + x / 10
}

#[test]
fn kernel_counters_are_deterministic_and_within_budget() {
    let Some(a) = measure(false) else { return };
    let b = measure(true).unwrap();
    println!("{}", TEST_SHAPE.describe());
    println!("{}", format_counts(&a));
    assert_eq!(a, b, "simulator counters differ between two runs (fresh Sim; launch seeds shifted by one)");

    // every op launches kernels (matmul is a host GEMM on Sim: none)
    for (op, ks) in &a {
        assert_eq!(ks.is_empty(), op == "matmul", "{op}: kernels {ks:?}");
    }
    let mut over = Vec::new();
    for (op, ks) in &a {
        for k in ks {
            let Some(&(_, _, lanes, gld, gst)) = MEASURED.iter().find(|m| m.0 == op && m.1 == k.kernel) else {
                over.push(format!("{op} {}: no recorded budget (measured {} lane-instr, {} / {} global B)", k.kernel, k.lane_instructions, k.bytes_loaded[0], k.bytes_stored[0]));
                continue;
            };
            for (what, got, want) in [("lane-instructions", k.lane_instructions, lanes), ("global bytes loaded", k.bytes_loaded[0], gld), ("global bytes stored", k.bytes_stored[0], gst)] {
                if got > budget(want) {
                    over.push(format!("{op} {}: {what} {got} > budget {} (measured {want} + 10%)", k.kernel, budget(want)));
                }
            }
        }
    }
    for m in MEASURED {
        assert!(a.iter().any(|(op, ks)| op == m.0 && ks.iter().any(|k| k.kernel == m.1)), "budget row {m:?} did not run");
    }
    assert!(over.is_empty(), "kernel counters over budget:\n{}", over.join("\n"));
}

/// Keys per paged_decode split (DECODE_SPLIT in src/backend/cuda/mod.rs).
const DECODE_SPLIT: usize = 256;

/// The decode step (`paged_attention` of one query per sequence) reads each K/V value of each
/// KV head once, for all the query heads of its GQA group: its global bytes loaded are at most
/// 1.3x the minimum (bytes; fp32 cache and queries, `splits = ceil(ctx / DECODE_SPLIT)`)
///
/// ```text
///   seqs * n_kv * ctx * 2 * head_dim * 4               each visible K and V value
/// + seqs * n_heads * head_dim * 4                      the queries
/// + seqs * splits * n_heads * (head_dim + 2) * 4       the partials the combine reads back
///                                                      (none for a context of one split)
/// ```
///
/// at TEST_SHAPE (ctx 45: one split; paged_attn moved 318576 B there, 2.25x the minimum, as
/// each of the 2 heads of a group re-read the rows) and at its ctx 600 (3 splits and the
/// combine). The rest is the block table and each thread's (sequence, split) record.
#[test]
fn decode_reads_each_kv_value_once() {
    let Some(be) = common::sim() else { return };
    be.prepare(&[TEST_SHAPE.head_dim]).unwrap();
    for s in [TEST_SHAPE, Shape { ctx: 600, kv_blocks: 80, ..TEST_SHAPE }] {
        let mut inputs = prepare(&be, s, 0x5eed);
        let ks = count_op(&be, &mut inputs, "paged_attention");
        let names: Vec<&str> = ks.iter().map(|k| k.kernel.as_str()).collect();
        let splits = s.ctx.div_ceil(DECODE_SPLIT);
        assert_eq!(names, if splits > 1 { vec!["paged_decode", "paged_decode_combine"] } else { vec!["paged_decode"] }, "ctx {}", s.ctx);
        let f = 4; // bytes per fp32 value
        let kv = s.decode_seqs * s.n_kv_heads * s.ctx * 2 * s.head_dim * f;
        let queries = s.decode_seqs * s.n_heads * s.head_dim * f;
        let partials = if splits > 1 { s.decode_seqs * splits * s.n_heads * (s.head_dim + 2) * f } else { 0 };
        let min = (kv + queries + partials) as u64;
        let loaded: u64 = ks.iter().map(|k| k.bytes_loaded[0]).sum();
        let ratio = loaded as f64 / min as f64;
        println!("decode ctx {}: {loaded} B loaded, minimum {min} B (K/V {kv}, queries {queries}, partials {partials}): {ratio:.3}x", s.ctx);
        assert!(ratio <= 1.3, "decode ctx {}: {loaded} B loaded > 1.3 x minimum {min} B ({ratio:.3}x)", s.ctx);
    }
}

/// Every memory-bound kernel of a training step (norms, RoPE, SwiGLU, the optimizers) moves at
/// most 1.3x its analytical minimum of global bytes (loaded + stored) at TEST_SHAPE: each input
/// read once and each output written once, fp32 (t tokens, d = dim, f = ffn, n = d x d
/// optimizer values, h = n_heads x head_dim):
///
/// ```text
/// rmsnorm_fwd          x, w in; out, rstd out              (2 t d + d + t) x 4
/// rmsnorm_bwd          dy, x, w, rstd in; dx out            (3 t d + d + t) x 4
/// col_sum (RMSNorm dw) dy, x, rstd, dw in; dw out           (2 t d + t + 2 d) x 4
/// rope                 q in, (cos, sin) table in; q out     (2 t h + t head_dim) x 4
/// swiglu_fwd           gate, up in; out out                 3 t f x 4
/// swiglu_bwd           dout, gate, up in; dgate, dup out    5 t f x 4
/// adamw_step           p, g, m, v in; p, m, v out           7 n x 4
/// sgd_step             p, g in; p out                       3 n x 4
/// ```
///
/// (decode attention: `decode_reads_each_kv_value_once`). The RMSNorm kernels keep a row in
/// registers and read w once per block of rows; RoPE reads each (cos, sin) pair once for all
/// heads; col_sum stages rstd in shared memory.
#[test]
fn memory_bound_kernels_move_at_most_1_3x_their_minimum_bytes() {
    let Some(be) = common::sim() else { return };
    be.prepare(&[TEST_SHAPE.head_dim]).unwrap();
    let s = TEST_SHAPE;
    let (t, d, ffn, n, h) = (s.tokens(), s.dim, s.ffn, s.dim * s.dim, s.n_heads * s.head_dim);
    let f = 4; // bytes per fp32 value
    let cases = [
        ("rmsnorm", "rmsnorm_fwd_v1", (2 * t * d + d + t) * f),
        ("rmsnorm_bwd", "rmsnorm_bwd_v1", (3 * t * d + d + t) * f),
        ("rmsnorm_bwd", "col_sum", (2 * t * d + t + 2 * d) * f),
        ("rope", "rope", (2 * t * h + t * s.head_dim) * f),
        ("swiglu", "swiglu_fwd", 3 * t * ffn * f),
        ("swiglu_bwd", "swiglu_bwd", 5 * t * ffn * f),
        ("adamw", "adamw_step", 7 * n * f),
        ("sgd", "sgd_step", 3 * n * f),
    ];
    let mut inputs = prepare(&be, s, 0x5eed);
    assert_moves_at_most_1_3x(&be, &mut inputs, &cases);
}

/// `memory_bound_kernels_move_at_most_1_3x_their_minimum_bytes` for the kernels that read
/// activations stored in bf16 (`Backend::store_bf16` under `Precision::Bf16`, 2 bytes a value):
/// the RMSNorm backward of a residual stream stored in bf16, SwiGLU's backward of gate and up
/// stored in bf16, and the attention backward's D of an output stored in bf16:
///
/// ```text
/// rmsnorm_bwd_v1_xbf16   dy, w, rstd in (fp32), x in (bf16); dx out     (2 t d + d + t) x 4 + t d x 2
/// col_sum_xbf16          dy, rstd, dw in, dw out (fp32); x in (bf16)    (t d + t + 2 d) x 4 + t d x 2
/// swiglu_bwd_bf16        dout in, dgate, dup out (fp32); gate, up in     3 t f x 4 + 2 t f x 2
/// attn_bwd_d_out_bf16    dout in, D out (fp32); o in (bf16)              (t h + t n_heads) x 4 + t h x 2
/// ```
#[test]
fn bf16_storage_kernels_move_at_most_1_3x_their_minimum_bytes() {
    let Some(be) = common::sim_with(ipo::backend::cuda::Precision::Bf16) else { return };
    be.prepare(&[TEST_SHAPE.head_dim]).unwrap();
    let s = TEST_SHAPE;
    let (t, d, ffn, h) = (s.tokens(), s.dim, s.ffn, s.n_heads * s.head_dim);
    let (f, b) = (4, 2); // bytes per fp32 and per bf16 value
    let cases = [
        ("rmsnorm_bwd", "rmsnorm_bwd_v1_xbf16", (2 * t * d + d + t) * f + t * d * b),
        ("rmsnorm_bwd", "col_sum_xbf16", (t * d + t + 2 * d) * f + t * d * b),
        ("swiglu_bwd", "swiglu_bwd_bf16", 3 * t * ffn * f + 2 * t * ffn * b),
        ("attention_bwd", "attn_bwd_d_out_bf16", (t * h + t * s.n_heads) * f + t * h * b),
    ];
    let mut inputs = prepare(&be, s, 0x5eed);
    ipo::backend::workload::store_bf16_inputs(&be, &mut inputs);
    assert_moves_at_most_1_3x(&be, &mut inputs, &cases);
}

/// Runs each case's op and checks that its kernel's global bytes (loaded + stored) are at
/// most 1.3x the case's minimum bytes; prints every ratio.
fn assert_moves_at_most_1_3x(be: &SimBackend, inputs: &mut workload::Inputs<SimBackend>, cases: &[(&str, &str, usize)]) {
    let mut report = Vec::new();
    for &(op, kernel, min) in cases {
        let ks = count_op(be, inputs, op);
        let k = ks.iter().find(|k| k.kernel == kernel).unwrap_or_else(|| panic!("{op}: no {kernel} among {:?}", ks.iter().map(|k| &k.kernel).collect::<Vec<_>>()));
        let (moved, min) = (k.bytes_loaded[0] + k.bytes_stored[0], min as u64);
        let ratio = moved as f64 / min as f64;
        println!("{op:<13} {kernel:<22} {moved:>8} B moved, minimum {min:>8} B: {ratio:.3}x");
        report.push((op, kernel, ratio));
    }
    let over: Vec<_> = report.iter().filter(|r| r.2 > 1.3).collect();
    assert!(over.is_empty(), "kernels moving more than 1.3x their minimum bytes: {over:?}");
}
