//! Criterion bench of the CUDA backend on the PTX simulator (`CudaBackend<Sim>`): every op of
//! the parity table at one fixed shape (SmolLM2-135M layer dims: hidden 576, 9/3 heads x 64,
//! FFN 1536; 96 packed tokens as a 48-token prompt with two 24-token responses; vocab 4096
//! instead of 49152 because the Sim GEMM is a host f64 loop; a 128 x 16 paged KV cache decoding
//! 4 sequences of 256 tokens). Before timing, prints each op's simulator counters from
//! `Sim::stats()` (launches, lane-instructions, bytes loaded/stored per state space, completed
//! barriers) and its lane-instruction rate. The workload is shared with
//! tests/kernel_counters.rs (which budgets the counters at a smaller shape).
//!
//! `CARGO_TARGET_DIR=target-cuda cargo bench --bench kernels` (needs NVRTC); results in
//! docs/PERF.md.

use criterion::{criterion_group, criterion_main, Criterion};
use ipo::backend::cuda::CudaBackend;
use std::time::Instant;

#[path = "../tests/kernel_counters.rs"]
mod counters;
use counters::workload::{count_op, format_counts, prepare, run_op, Shape, OPS};

const BENCH_SHAPE: Shape = Shape {
    prompt: 48,
    response: 24,
    dim: 576,
    n_heads: 9,
    n_kv_heads: 3,
    head_dim: 64,
    ffn: 1536,
    vocab: 4096,
    kv_blocks: 128,
    block_size: 16,
    decode_seqs: 4,
    ctx: 256,
};

fn bench(c: &mut Criterion) {
    let be = match CudaBackend::sim() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("skipping kernel bench: {e}");
            return;
        }
    };
    be.prepare(&[BENCH_SHAPE.head_dim]).unwrap();
    let s = BENCH_SHAPE;
    println!("shape: {}", s.describe());
    let known = ipo::backend::cuda::parity::OPS;
    let missing: Vec<_> = known.iter().filter(|o| !OPS.contains(o)).collect();
    if !missing.is_empty() {
        println!("parity ops without a workload here (not benchmarked): {missing:?}");
    }

    // Counters of one run of each op, and its wall time (median of 3) for a lane-instruction rate.
    let mut inputs = prepare(&be, s, 0x5eed);
    let mut rows = Vec::new();
    let mut summary = String::from("| op | launches | lane-instr | global ld/st (MB) | shared ld/st (MB) | barriers | ms (median of 3) | M lane-instr/s |\n|---|---|---|---|---|---|---|---|\n");
    for op in OPS {
        let ks = count_op(&be, &mut inputs, op);
        let mut ts: Vec<f64> = (0..3)
            .map(|_| {
                let t = Instant::now();
                run_op(&be, &mut inputs, op);
                t.elapsed().as_secs_f64()
            })
            .collect();
        ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let t = ts[1];
        let sum = |f: &dyn Fn(&counters::workload::KernelCount) -> u64| ks.iter().map(f).sum::<u64>();
        let lanes = sum(&|k| k.lane_instructions);
        let mb = |x: u64| x as f64 / 1e6;
        summary += &format!(
            "| {op} | {} | {} | {:.2}/{:.2} | {:.2}/{:.2} | {} | {:.1} | {} |\n",
            sum(&|k| k.launches),
            lanes,
            mb(sum(&|k| k.bytes_loaded[0])),
            mb(sum(&|k| k.bytes_stored[0])),
            mb(sum(&|k| k.bytes_loaded[1])),
            mb(sum(&|k| k.bytes_stored[1])),
            sum(&|k| k.barriers),
            t * 1e3,
            if lanes > 0 { format!("{:.0}", lanes as f64 / t / 1e6) } else { "- (host GEMM)".into() }
        );
        rows.push((op.to_string(), ks));
    }
    println!("{}", format_counts(&rows));
    println!("{summary}");

    let mut g = c.benchmark_group("cuda_sim_ops");
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(2));
    for op in OPS {
        g.bench_function(*op, |b| b.iter(|| run_op(&be, &mut inputs, op)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
