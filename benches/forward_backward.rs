//! Criterion bench: one forward + backward over 2 x 256 tokens of the default model's
//! configuration (SmolLM2-135M: 30 layers, hidden 576, 9/3 heads, FFN 1536, vocab 49152,
//! tied) on the CPU backend, with seeded random weights. Compare with
//! scripts/bench_torch_fwd_bwd.py (PyTorch eager, same shapes and threads); see docs/PERF.md.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipo::backend::cpu::CpuBackend;
use ipo::backend::Precision;
use ipo::model::transformer::{Batch, Transformer};

#[path = "common/smollm2.rs"]
mod smollm2;
use smollm2::{random_weights, smol_config, Rng};

fn bench(c: &mut Criterion) {
    let cfg = smol_config(30);
    let model = Transformer::new(cfg.clone(), random_weights(&cfg, &mut Rng(0x2545F4914F6CDD1D))).unwrap();
    let seqs: Vec<Vec<u32>> = (0..2u32).map(|b| (0..256u32).map(|i| (i * 7919 + b * 104729) % 49152).collect()).collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let batch = Batch::from_sequences(&refs);
    let dlogp = vec![1.0f32; batch.rows.len()];
    let mut g = c.benchmark_group("smollm2_135m_cpu");
    g.sample_size(10);
    g.throughput(Throughput::Elements(batch.num_tokens() as u64));
    g.bench_function("forward_backward_2x256", |b| {
        b.iter(|| {
            let mut grads = model.zero_grads();
            let (_, tape) = model.forward(&batch).unwrap();
            model.backward(&batch, tape, &dlogp, &mut grads);
            grads
        })
    });
    g.bench_function("forward_2x256", |b| b.iter(|| model.forward(&batch).unwrap().0));
    // bf16 products (fp32 storage and accumulation): the same weights on the bf16 backend.
    let bf16 = Transformer::with_backend(CpuBackend::with_precision(Precision::Bf16), cfg.clone(), random_weights(&cfg, &mut Rng(0x2545F4914F6CDD1D))).unwrap();
    g.bench_function("forward_backward_2x256_bf16", |b| {
        b.iter(|| {
            let mut grads = bf16.zero_grads();
            let (_, tape) = bf16.forward(&batch).unwrap();
            bf16.backward(&batch, tape, &dlogp, &mut grads);
            grads
        })
    });
    g.bench_function("forward_2x256_bf16", |b| b.iter(|| bf16.forward(&batch).unwrap().0));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
