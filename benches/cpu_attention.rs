//! Criterion bench of the CPU attention ops alone at one layer of the default model
//! (SmolLM2-135M: 9 query / 3 KV heads x 64), f32: the packed forward and backward over
//! 2 x 256 tokens (the shape of benches/forward_backward.rs), over one preference pair
//! `[256 | 128 | 128]` and over one 1024-token sequence; paged attention for a decode step
//! at batch 1 and 8 (context 512, and 4096 at batch 1) and a 512-token prefill chunk, with a
//! 16-token block size.
//!
//! Run: `cargo bench --bench cpu_attention`. With `CPU_ATTN_BENCH_THREAD_TIME=1` every op
//! runs in a one-thread pool and is timed in that thread's CPU time, which time-sharing with
//! other processes on a busy machine barely changes (wall time there can vary twofold).

use criterion::{criterion_group, criterion_main, Criterion};
use ipo::backend::cpu::{CpuBackend, CpuBuf};
use ipo::backend::{AttnDims, AttnLayout, Backend, KvGeom, PagedSeq, Span};

const DIMS: AttnDims = AttnDims { n_heads: 9, n_kv_heads: 3, head_dim: 64 };

fn rvec(seed: u64, n: usize) -> CpuBuf<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn zeros(n: usize) -> CpuBuf<f32> {
    vec![0.0; n].into()
}

/// Times `op` in wall time, or in thread CPU time on a one-thread pool (see the module doc).
fn time(c: &mut Criterion, name: &str, mut op: impl FnMut() + Send) {
    if std::env::var_os("CPU_ATTN_BENCH_THREAD_TIME").is_none() {
        c.bench_function(name, |b| b.iter(&mut op));
        return;
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let cpu = || {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: a valid clock id and a valid out pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            pool.install(|| {
                let t0 = cpu();
                for _ in 0..iters {
                    op();
                }
                cpu() - t0
            })
        })
    });
}

fn packed(c: &mut Criterion, name: &str, layout: &AttnLayout) {
    let be = CpuBackend::<f32>::new();
    let t = layout.num_tokens();
    let (qd, kvd) = (DIMS.n_heads * DIMS.head_dim, DIMS.n_kv_heads * DIMS.head_dim);
    let (q, k, v, dout) = (rvec(1, t * qd), rvec(2, t * kvd), rvec(3, t * kvd), rvec(4, t * qd));
    let (mut out, mut lse) = (zeros(t * qd), zeros(t * DIMS.n_heads));
    let (mut dq, mut dk, mut dv) = (zeros(t * qd), zeros(t * kvd), zeros(t * kvd));
    time(c, &format!("attention_{name}"), || be.attention(&q, &k, &v, layout, DIMS, &mut out, &mut lse));
    time(c, &format!("attention_bwd_{name}"), || be.attention_bwd(&dout, &q, &k, &v, &out, &lse, layout, DIMS, &mut dq, &mut dk, &mut dv));
}

/// `batch` sequences of `ctx` cached tokens, the last `q_len` of them queries.
fn paged(c: &mut Criterion, name: &str, batch: usize, ctx: usize, q_len: usize) {
    let be = CpuBackend::<f32>::new();
    let bs = 16;
    let per = ctx.div_ceil(bs);
    let g = KvGeom { num_blocks: batch * per, block_size: bs, n_kv_heads: DIMS.n_kv_heads, head_dim: DIMS.head_dim };
    let cache = rvec(5, g.num_blocks * 2 * g.n_kv_heads * bs * g.head_dim);
    // Blocks interleaved between the sequences, as a pool shared by a batch would be.
    let table: Vec<u32> = (0..batch).flat_map(|s| (0..per).map(move |i| (i * batch + s) as u32)).collect();
    let seqs: Vec<PagedSeq> = (0..batch).map(|s| PagedSeq { q_start: s * q_len, q_len, ctx_len: ctx, table_start: s * per }).collect();
    let qd = DIMS.n_heads * DIMS.head_dim;
    let q = rvec(6, batch * q_len * qd);
    let mut out = zeros(q.len());
    time(c, &format!("paged_attention_{name}"), || be.paged_attention(&q, &cache, &seqs, &table, g, DIMS, &mut out));
}

fn bench(c: &mut Criterion) {
    packed(c, "2x256", &AttnLayout::sequences(&[256, 256]));
    let pair = AttnLayout {
        spans: vec![
            Span { start: 0, len: 256, prefix_start: 0, prefix_len: 0 },
            Span { start: 256, len: 128, prefix_start: 0, prefix_len: 256 },
            Span { start: 384, len: 128, prefix_start: 0, prefix_len: 256 },
        ],
    };
    packed(c, "pair_256_2x128", &pair);
    packed(c, "1x1024", &AttnLayout::sequences(&[1024]));
    paged(c, "decode_b1_ctx512", 1, 512, 1);
    paged(c, "decode_b1_ctx4096", 1, 4096, 1);
    paged(c, "decode_b8_ctx512", 8, 512, 1);
    paged(c, "prefill_512", 1, 512, 512);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
