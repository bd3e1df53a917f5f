//! `ipo bench` and scripts/gpu-check.sh without a GPU: the FLOP/byte model of the per-op
//! benchmark against hand counts, a training-step bench on the CPU that actually learns, the
//! random-weight model folder loading through the normal path, and the check script reporting
//! every part as "no GPU" (and failing) on a machine without one.

use ipo::backend::cpu::CpuBackend;
use ipo::backend::workload::Shape;
use ipo::workflow::bench::{self, op_cost, Bound, ModelShape};
use std::process::Command;

#[test]
fn op_costs_match_hand_counts() {
    let s = Shape { prompt: 4, response: 2, dim: 8, n_heads: 2, n_kv_heads: 1, head_dim: 4, ffn: 16, vocab: 10, kv_blocks: 4, block_size: 2, decode_seqs: 3, ctx: 5 };
    let t = 8.0; // 4 + 2 x 2 tokens
    assert_eq!(op_cost("matmul", &s), (2.0 * t * 8.0 * 8.0, 4.0 * (2.0 * t * 8.0 + 64.0), Bound::Compute));
    // causal pairs: prompt 4*5/2 = 10; each response 2*4 + 2*3/2 = 11 -> 32 pairs; 4 flops per
    // pair per head-dim element (QK^T and PV) x head_dim 4 x 2 heads
    assert_eq!(op_cost("attention", &s).0, 4.0 * 4.0 * 32.0 * 2.0);
    assert_eq!(op_cost("attention_bwd", &s).0, 2.5 * op_cost("attention", &s).0);
    assert_eq!(op_cost("lm_head_logprobs", &s).0, 2.0 * t * 10.0 * 8.0);
    assert_eq!(op_cost("paged_attention", &s).2, Bound::Memory);
    // every workload op has a cost
    for op in ipo::backend::workload::OPS {
        let (f, b, _) = op_cost(op, &s);
        assert!(b > 0.0 && f >= 0.0, "{op}");
    }
}

#[test]
fn llama1b_shape_is_the_1b_model() {
    let c = ModelShape::Llama1b.config();
    let p = c.param_count().unwrap();
    // Llama-3.2-1B has 1.236 B parameters (tied embeddings).
    assert!((1.23e9..1.24e9).contains(&(p as f64)), "{p}");
    let w = ModelShape::Llama1b.workload();
    assert_eq!((w.tokens(), w.dim, w.n_heads, w.n_kv_heads, w.ffn), (4096, 2048, 32, 8, 8192));
}

#[test]
fn train_bench_on_cpu_runs_real_steps_that_lower_the_loss() {
    let r = bench::train(CpuBackend::<f32>::new(), ModelShape::Tiny, None, 2, 12, 6, 1, 3, None, 7).unwrap();
    assert_eq!(r.tokens, 2 * (12 + 2 * 6));
    assert_eq!(r.losses.len(), 4);
    assert!(r.losses.iter().all(|l| l.is_finite()));
    // the same pairs every step with AdamW: the DPO loss goes down
    assert!(r.losses[3] < r.losses[0], "{:?}", r.losses);
    assert!(r.tokens_per_s > 0.0 && r.tflop_per_step > 0.0 && r.mfu.is_none());
}

#[test]
fn decode_bench_decodes_exactly_the_asked_tokens() {
    let r = bench::decode(CpuBackend::<f32>::new(), ModelShape::Tiny, Some(1), &[1, 3], 5, 4, None, 3).unwrap();
    assert_eq!(r.rows.len(), 2);
    for row in &r.rows {
        // one token comes from the prefill step, the rest from decode steps
        assert_eq!(row.decode_tokens as usize, row.batch * 3, "{row:?}");
        assert!(row.tokens_per_s > 0.0 && row.gbytes_per_step > 0.0);
    }
}

#[test]
fn random_model_folder_loads_and_has_the_asked_layers() {
    let dir = tempfile::tempdir().unwrap();
    let from = dir.path().join("from");
    std::fs::create_dir_all(&from).unwrap();
    let cfg = ModelShape::Tiny.config();
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": 5,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": true, "eos_token_id": 2
    });
    std::fs::write(from.join("config.json"), json.to_string()).unwrap();
    std::fs::write(from.join("tokenizer.json"), "{}").unwrap();
    let out = dir.path().join("out");
    let c = bench::init_model(&from, &out, Some(2), 5).unwrap();
    assert_eq!(c.num_layers, 2);
    assert!(out.join("tokenizer.json").exists());
    let w = ipo::model::load::load_weights(&out, &c).unwrap();
    assert_eq!(w.layers.len(), 2);
    let wq = &w.layers[0].wq.data;
    let std = (wq.iter().map(|x| x * x).sum::<f32>() / wq.len() as f32).sqrt();
    assert!((0.015..0.025).contains(&std), "weights are normal(0, 0.02): std {std}");
    assert!(bench::init_model(&from, &dir.path().join("x"), Some(0), 5).is_err());
}

#[test]
fn gpu_check_reports_no_gpu_on_this_machine_and_fails() {
    let root = env!("CARGO_MANIFEST_DIR");
    let script = format!("{root}/scripts/gpu-check.sh");
    assert!(Command::new("bash").args(["-n", &script]).status().unwrap().success());
    let help = Command::new("bash").args([&script, "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("carry") && help.contains(".gpu/ipo") && help.contains("tokenizer"), "{help}");
    let out = tempfile::tempdir().unwrap();
    // A PATH without nvidia-smi: the check must not find a GPU.
    let st = Command::new("bash")
        .args([&script, out.path().to_str().unwrap()])
        .env("PATH", "/usr/bin:/bin")
        .env("IPO_BIN", env!("CARGO_BIN_EXE_ipo"))
        .output()
        .unwrap();
    assert!(!st.status.success(), "no GPU must exit non-zero");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("gpu-check.json")).unwrap()).unwrap();
    let parts = j["parts"].as_array().unwrap();
    assert!(parts.len() >= 10);
    for p in parts {
        assert_eq!(p["status"], "no GPU", "{p}");
    }
    assert!(std::fs::read_to_string(out.path().join("gpu-check.md")).unwrap().contains("| selftest | no GPU |"));
}
