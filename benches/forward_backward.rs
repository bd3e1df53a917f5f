//! Criterion bench: one forward + backward over 2 x 256 tokens of the default model's
//! configuration (SmolLM2-135M: 30 layers, hidden 576, 9/3 heads, FFN 1536, vocab 49152,
//! tied) on the CPU backend, with seeded random weights. Compare with
//! scripts/bench_torch_fwd_bwd.py (PyTorch eager, same shapes and threads); see docs/PERF.md.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipo::model::config::{Family, ModelConfig};
use ipo::model::transformer::{expected_shapes, Batch, Transformer};
use ipo::model::weights::{HostTensor, LayerWeights, ModelWeights};

fn smollm2_config() -> ModelConfig {
    ModelConfig {
        family: Family::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rope_theta: 100000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        qkv_bias: false,
        qk_norm: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Seeded random weights (xorshift, uniform in +-0.05; norms around 1).
fn random_weights(cfg: &ModelConfig) -> ModelWeights<HostTensor> {
    let mut s = 0x2545F4914F6CDD1Du64;
    let mut tensors = Vec::new();
    expected_shapes(cfg, false, |name, shape| {
        let n: usize = shape.iter().product();
        let norm = name.contains("norm");
        let data = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if norm { 1.0 + 0.1 * u } else { 0.1 * u }
            })
            .collect();
        tensors.push(HostTensor::new(shape, data));
    });
    let mut it = tensors.into_iter();
    let mut next = || it.next().unwrap();
    let embed = next();
    let layers = (0..cfg.num_layers)
        .map(|_| LayerWeights {
            attn_norm: next(),
            wq: next(),
            wk: next(),
            wv: next(),
            wo: next(),
            bq: None,
            bk: None,
            bv: None,
            q_norm: None,
            k_norm: None,
            mlp_norm: next(),
            w_gate: next(),
            w_up: next(),
            w_down: next(),
        })
        .collect();
    ModelWeights { embed, layers, final_norm: next(), lm_head: None }
}

fn bench(c: &mut Criterion) {
    let cfg = smollm2_config();
    let model = Transformer::new(cfg.clone(), random_weights(&cfg)).unwrap();
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
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
