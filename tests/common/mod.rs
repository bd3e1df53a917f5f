//! Shared test helpers: a seeded RNG, tiny random model configs for the three families, and
//! random weights (never zeros: every tensor is drawn from a seeded distribution); the
//! committed tiny fixture models; and what a test needs from outside the repository (NVRTC for
//! the CUDA simulator, the default model), skipped with a notice when missing, a failure under
//! CI=true.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ipo::backend::cuda::{CudaBackend, Precision, Sim};
use ipo::model::config::{Family, Llama3Scaling, ModelConfig};
use ipo::model::transformer::expected_shapes;
use ipo::model::weights::{HostTensor, LayerWeights, ModelWeights};

/// SplitMix64: small, seeded, reproducible.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [-1, 1) on a 2^-23 grid (f32, enough mantissa bits for f16/bf16 rounding to
    /// show).
    pub fn signed(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// `n` random bytes (the low byte of each draw).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
    pub fn ids(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(vocab) as u32).collect()
    }
}

/// A tiny config of the given family: GQA (4 heads / 2 KV heads), llama3 RoPE scaling on
/// Llama, q/k/v bias on Qwen2, q/k norm and head_dim != hidden/heads on Qwen3.
pub fn tiny_config(family: Family, tied: bool) -> ModelConfig {
    ModelConfig {
        family,
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: if family == Family::Qwen3 { 12 } else { 8 },
        rope_theta: 10000.0,
        rope_scaling: (family == Family::Llama).then_some(Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        }),
        rms_norm_eps: 1e-5,
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        qkv_bias: family == Family::Qwen2,
        qk_norm: family == Family::Qwen3,
        bos_token_id: None,
        eos_token_ids: vec![1],
    }
}

/// Random weights with the shapes the config implies: matrices N(0, 0.3^2), norms
/// 1 + N(0, 0.1^2), biases N(0, 0.1^2), embeddings N(0, 0.7^2).
pub fn random_weights(cfg: &ModelConfig, rng: &mut Rng) -> ModelWeights<HostTensor> {
    let mut tensors = Vec::new();
    expected_shapes(cfg, !cfg.tie_word_embeddings, |name, shape| {
        let n: usize = shape.iter().product();
        let data = if name.contains("norm") {
            rng.vec(n, 0.1).into_iter().map(|x| 1.0 + x).collect()
        } else if name.ends_with("bias") {
            rng.vec(n, 0.1)
        } else if name.contains("embed") || name.contains("lm_head") {
            rng.vec(n, 0.7)
        } else {
            rng.vec(n, 0.3)
        };
        tensors.push(HostTensor::new(shape, data));
    });
    let mut it = tensors.into_iter();
    let mut next = || it.next().unwrap();
    let embed = next();
    let layers = (0..cfg.num_layers)
        .map(|_| {
            let attn_norm = next();
            let (wq, wk, wv, wo) = (next(), next(), next(), next());
            let (bq, bk, bv) = if cfg.qkv_bias {
                (Some(next()), Some(next()), Some(next()))
            } else {
                (None, None, None)
            };
            let (q_norm, k_norm) = if cfg.qk_norm { (Some(next()), Some(next())) } else { (None, None) };
            let mlp_norm = next();
            let (w_gate, w_up, w_down) = (next(), next(), next());
            LayerWeights {
                attn_norm,
                wq,
                wk,
                wv,
                wo,
                bq,
                bk,
                bv,
                q_norm,
                k_norm,
                mlp_norm,
                w_gate,
                w_up,
                w_down,
            }
        })
        .collect();
    let final_norm = next();
    let lm_head = (!cfg.tie_word_embeddings).then(&mut next);
    ModelWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    }
}

/// A byte-level BPE tokenizer with no merges (token id = byte value) and two special tokens
/// `<|im_start|>` = 256, `<|im_end|>` = 257 (outside a 256-entry model vocabulary).
pub fn byte_tokenizer_json() -> serde_json::Value {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut vocab = serde_json::Map::new();
    for (b, c) in bs.iter().zip(&cs) {
        vocab.insert(char::from_u32(*c).unwrap().to_string(), serde_json::json!(b));
    }
    let special = |id: u32, s: &str| serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(256, "<|im_start|>"), special(257, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// A committed tiny HF model folder: tests/fixtures/tiny/{llama,qwen2,qwen3} (2 layers, vocab
/// 256, max_position_embeddings 128).
pub fn tiny_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny").join(name)
}

/// `dir/llama-tok`: the tiny Llama fixture with `tokenizer` as its tokenizer.json.
pub fn tiny_llama_with_tokenizer(dir: &Path, tokenizer: &serde_json::Value) -> PathBuf {
    let m = dir.join("llama-tok");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(tiny_fixture("llama").join(f), m.join(f)).unwrap();
    }
    std::fs::write(m.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    m
}

/// Writes `n` random preference pairs (ids below 256, the tiny fixtures' vocabulary) without
/// reference log-probs, so `ipo train` computes and caches them.
pub fn write_random_pairs(path: &Path, n: usize, seed: u64) {
    let mut rng = Rng(seed);
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let c = 3 + rng.below(10);
            let (a, b) = (1 + rng.below(6), 1 + rng.below(6));
            serde_json::json!({"id": format!("p{i}"), "kind": "harmful", "context_ids": rng.ids(c, 256), "chosen_ids": rng.ids(a, 256),
                   "rejected_ids": rng.ids(b, 256), "round": 1})
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// `what` (something from outside the repository a test needs), or `None` after a skip notice
/// when it is unavailable. Under CI=true it panics instead: there no test passes by skipping.
#[track_caller]
pub fn required<T>(what: &str, r: Result<T, impl std::fmt::Display>) -> Option<T> {
    match r {
        Ok(x) => Some(x),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("CI=true and {what} is unavailable: {e}"),
        Err(e) => {
            eprintln!("skipping: {what} is unavailable: {e}");
            None
        }
    }
}

/// The CUDA backend on the PTX simulator (NVRTC needed) in fp32, as `CudaBackend::sim()` gives
/// it.
#[track_caller]
pub fn sim() -> Option<CudaBackend<Sim>> {
    required("the CUDA simulator backend", CudaBackend::sim())
}

/// `sim()` at precision `p`.
#[track_caller]
pub fn sim_with(p: Precision) -> Option<CudaBackend<Sim>> {
    required("the CUDA simulator backend", CudaBackend::with_precision(Sim::new(), p))
}

/// The default model folder (IPO_DEFAULT_MODEL, set by scripts/test.sh; empty counts as unset).
#[track_caller]
pub fn default_model() -> Option<PathBuf> {
    let dir = std::env::var("IPO_DEFAULT_MODEL").ok().filter(|d| !d.is_empty());
    required(
        "the default model",
        dir.map(PathBuf::from).ok_or("IPO_DEFAULT_MODEL is not set (run scripts/test.sh)"),
    )
}

/// 4 random training pairs (context 3-7 tokens, segments 2-6), reference log-probs around a
/// uniform model's (`-ln vocab` per token) plus noise, so the DPO margins start nonzero.
pub fn random_train_pairs(rng: &mut Rng, vocab: usize) -> Vec<ipo::train::TrainPair> {
    (0..4)
        .map(|i| {
            let (c, a, b) = (3 + rng.below(5), 2 + rng.below(5), 2 + rng.below(5));
            let per = -(vocab as f64).ln();
            ipo::train::TrainPair {
                id: format!("p{i}"),
                context: rng.ids(c, vocab),
                chosen: rng.ids(a, vocab),
                rejected: rng.ids(b, vocab),
                ref_chosen: per * a as f64 + rng.normal(),
                ref_rejected: per * b as f64 + rng.normal(),
            }
        })
        .collect()
}

/// The trainable tensors of a trainer: (name, shape, values).
pub type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The host reference of a trainer's next optimizer step, from the backend's own gradients of
/// that step: the tensors before it, the tensors the host optimizer makes of them, the host
/// optimizer after the step (its moments), and the global gradient norm. `decay(shape)` says
/// which tensors take weight decay.
pub fn host_reference_step<B: ipo::backend::Backend>(
    t: &ipo::train::Trainer<B>,
    tcfg: &ipo::train::TrainConfig,
    max_norm: f64,
    decay: impl Fn(&[usize]) -> bool,
) -> (Tensors, Vec<Vec<f32>>, ipo::train::optim::Optimizer, f64) {
    use ipo::train::optim::{clip_factor, global_norm, Optimizer, Param};
    let idx = t.batch_indices(t.step);
    let (_, grads, _) = t.loss_and_grads(&idx, t.step + 1).unwrap();
    let g = t.trainable_grads(&grads);
    drop(grads);
    let before = t.trainable_tensors();
    let (m0, v0) = t.moments();
    let norm = global_norm(g.iter().map(|x| &x[..]));
    let lr = tcfg.optim.lr_at(t.step, t.total_steps());
    let mut reference = Optimizer {
        cfg: tcfg.optim,
        steps: t.optim.steps,
        m: m0,
        v: v0,
    };
    let mut want: Vec<Vec<f32>> = before.iter().map(|x| x.2.clone()).collect();
    let params: Vec<Param> = want
        .iter_mut()
        .zip(&g)
        .zip(&before)
        .map(|((data, grad), (_, shape, _))| Param {
            data: &mut data[..],
            grad,
            decay: decay(shape),
        })
        .collect();
    reference.step(params, lr, clip_factor(norm, max_norm));
    (before, want, reference, norm)
}

/// Whether two f32 slices hold the same bits (over their common length).
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Every tensor of an f32 safetensors file, sorted by name.
pub fn f32_tensors(file: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `ipo train FLAGS` as `world` ranks of one process, one thread each over the thread
/// transport (`ipo::dist::Group::threads`); every rank's summary, in rank order.
pub fn train_world(world: usize, flags: &[String]) -> Vec<ipo::TrainSummary> {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ipo::cli::train::Args,
    }
    let hs: Vec<_> = ipo::dist::Group::threads(world, std::time::Duration::from_secs(300))
        .into_iter()
        .map(|g| {
            let mut argv = vec!["ipo-train".to_string()];
            argv.extend_from_slice(flags);
            std::thread::spawn(move || {
                let a = Cli::try_parse_from(argv).unwrap().args;
                let comm: std::sync::Arc<dyn ipo::dist::Comm> = std::sync::Arc::new(g);
                ipo::workflow::train::train_in(&a.files, &a.opts, &ipo::workflow::progress::Silent, comm)
            })
        })
        .collect();
    let out: Vec<_> = hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
    assert!(out.iter().enumerate().all(|(r, s)| s.rank == r && s.world == world));
    out
}

/// A thread-group rank (`ipo::dist::Group::threads`) that also keeps every f32 all-reduce
/// this rank sent (its own values, before the sum), in call order: the trainer's gradient
/// all-reduces on the host path.
pub struct RecordingComm {
    pub group: ipo::dist::Group,
    pub sent: std::sync::Mutex<Vec<Vec<f32>>>,
}

impl ipo::dist::Comm for RecordingComm {
    fn rank(&self) -> usize {
        self.group.rank()
    }
    fn world(&self) -> usize {
        self.group.world()
    }
    fn timeout(&self) -> std::time::Duration {
        self.group.timeout()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), ipo::dist::CommError> {
        self.sent.lock().unwrap().push(buf.to_vec());
        self.group.all_reduce_sum(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), ipo::dist::CommError> {
        self.group.all_reduce_sum_f64(buf)
    }
    fn all_gather(&self, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, ipo::dist::CommError> {
        self.group.all_gather(mine)
    }
    fn broadcast(&self, buf: &mut Vec<u8>) -> Result<(), ipo::dist::CommError> {
        self.group.broadcast(buf)
    }
}

/// One rank's data-parallel run (`train_ranks`): the loss of each step, the trained tensors
/// at the end, and the f32 all-reduces it sent, per step.
pub struct RankRun {
    pub losses: Vec<f64>,
    pub tensors: Tensors,
    pub sent: Vec<Vec<Vec<f32>>>,
}

/// `steps` optimizer steps of `Trainer::data_parallel` (tiny model `mcfg`, weights from
/// `Rng(seed)`) as `world` ranks, one thread each, on the backend `make` gives each rank;
/// `after`: the all-reduce of all gradients in one call after the backward
/// (`Trainer::set_all_reduce_after_backward`) instead of layer by layer during it.
pub fn train_ranks<B: ipo::backend::Backend + 'static>(
    make: impl Fn() -> B + Send + Sync + 'static,
    mcfg: &ModelConfig,
    seed: u64,
    tcfg: &ipo::train::TrainConfig,
    pairs: &[ipo::train::TrainPair],
    world: usize,
    zero1: bool,
    after: bool,
    steps: usize,
) -> Vec<RankRun> {
    use ipo::dist::Comm;
    let make = std::sync::Arc::new(make);
    let hs: Vec<_> = ipo::dist::Group::threads(world, std::time::Duration::from_secs(120))
        .into_iter()
        .map(|group| {
            let (make, mcfg, tcfg, pairs) = (make.clone(), mcfg.clone(), tcfg.clone(), pairs.to_vec());
            std::thread::spawn(move || {
                let rec = std::sync::Arc::new(RecordingComm { group, sent: Default::default() });
                let model = ipo::model::transformer::Transformer::with_backend(make(), mcfg.clone(), random_weights(&mcfg, &mut Rng(seed))).unwrap();
                let comm: std::sync::Arc<dyn Comm> = rec.clone();
                let mut t = ipo::train::trainer::Trainer::data_parallel(model, pairs, tcfg, comm, zero1).unwrap();
                t.set_all_reduce_after_backward(after);
                let (mut losses, mut sent) = (Vec::new(), Vec::new());
                for _ in 0..steps {
                    losses.push(t.train_step().unwrap().loss);
                    sent.push(std::mem::take(&mut *rec.sent.lock().unwrap()));
                }
                RankRun { losses, tensors: t.trainable_tensors(), sent }
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// 8 pairs (two draws of `random_train_pairs`), ids made unique.
pub fn pairs8(seed: u64, vocab: usize) -> Vec<ipo::train::TrainPair> {
    let mut rng = Rng(seed);
    let mut p = random_train_pairs(&mut rng, vocab);
    p.extend(random_train_pairs(&mut rng, vocab));
    for (i, x) in p.iter_mut().enumerate() {
        x.id = format!("p{i}");
    }
    p
}

/// Batch 5 of micro-batches of 2 over 8 pairs: steps of 5 pairs (micro-batches of 2, 2, 1) and
/// 3 (2, 1), so a rank accumulates two micro-batches, or one, or (world 3) none.
pub fn overlap_config(lora: bool) -> ipo::train::TrainConfig {
    use ipo::train::{LoraConfig, LoraTarget, OptimConfig, TrainConfig};
    TrainConfig {
        beta: 0.3,
        sft_coef: 0.1,
        optim: OptimConfig { weight_decay: 0.05, max_grad_norm: 0.5, ..OptimConfig::adamw(3e-3) },
        batch_size: 5,
        micro_batch_size: 2,
        epochs: 2,
        seed: 5,
        lora: lora.then(|| LoraConfig { rank: 2, alpha: 4.0, targets: vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down] }),
        memory_budget: None,
    }
}

/// A tiny model of 3 decoder layers.
pub fn three_layers(family: Family, tied: bool) -> ModelConfig {
    ModelConfig { num_layers: 3, ..tiny_config(family, tied) }
}
