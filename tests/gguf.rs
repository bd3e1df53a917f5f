//! Tests of `ipo::gguf` (GGUF reader, dequantization, HF folder export): synthetic GGUF files
//! written here by a small independent writer, decoded by our code and compared with an
//! independent dequantizer written from the ggml block definitions; the Q/K un-permutation on
//! known patterns; bad inputs; and the default model's rebuilt tokenizer against ids from
//! Hugging Face's own GGUF conversion (tests/fixtures/tokenizer/smollm2_ids.json).

mod common;

use std::path::{Path, PathBuf};

use common::{default_model, Rng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};
use half::{bf16, f16};
use ipo::gguf::{self, GgmlType, GgufFile, Value};

// ---------------------------------------------------------------- allocation watch

/// The system allocator, recording per thread the largest single allocation asked for, so a
/// test can show a hostile file was rejected before any large allocation or reservation.
struct Watch;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(l.size())));
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(new)));
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static WATCH: Watch = Watch;

// ---------------------------------------------------------------- a tiny GGUF writer

enum Kv {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

struct RawTensor {
    name: String,
    dims: Vec<u64>, // innermost first
    type_id: u32,
    data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Serialize a GGUF v3 file with alignment 32 (the default, not written as a key).
fn write_gguf(kvs: &[(&str, Kv)], tensors: &[RawTensor]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut out, k);
        match v {
            Kv::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Kv::Bool(x) => {
                out.extend(7u32.to_le_bytes());
                out.push(*x as u8);
            }
            Kv::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Kv::Strs(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for s in a {
                    put_str(&mut out, s);
                }
            }
            Kv::I32s(a) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((a.len() as u64).to_le_bytes());
                for x in a {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.type_id.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    for t in tensors {
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(&t.data);
    }
    out
}

// ---------------------------------------------------------------- reference dequantizer

/// Element `k` of a tensor of type `type_id`, decoded straight from the ggml-common.h block
/// definitions (indexing per element, unlike the library's per-block loops).
fn ref_element(type_id: u32, data: &[u8], k: usize) -> f32 {
    let f16_at = |o: usize| f16::from_bits(u16::from_le_bytes([data[o], data[o + 1]])).to_f32();
    let (b, i) = (k / 32, k % 32);
    match type_id {
        0 => f32::from_le_bytes(data[4 * k..4 * k + 4].try_into().unwrap()),
        1 => f16_at(2 * k),
        30 => f32::from_bits((u16::from_le_bytes([data[2 * k], data[2 * k + 1]]) as u32) << 16),
        8 => {
            // block_q8_0 { ggml_half d; int8_t qs[32]; }: x = qs[i] * d
            let base = b * 34;
            data[base + 2 + i] as i8 as f32 * f16_at(base)
        }
        2 => {
            // block_q4_0 { ggml_half d; uint8_t qs[16]; }: x[i] = (nibble - 8) * d, element i<16
            // in the low nibble of qs[i], element i>=16 in the high nibble of qs[i-16].
            let base = b * 18;
            let byte = data[base + 2 + i % 16];
            let q = if i < 16 { byte & 15 } else { byte >> 4 };
            (q as f32 - 8.0) * f16_at(base)
        }
        3 => {
            // block_q4_1 { ggml_half d; ggml_half m; uint8_t qs[16]; }: x = nibble * d + m
            let base = b * 20;
            let byte = data[base + 4 + i % 16];
            let q = if i < 16 { byte & 15 } else { byte >> 4 };
            q as f32 * f16_at(base) + f16_at(base + 2)
        }
        _ => unreachable!(),
    }
}

/// Random encoded data for `n` elements of `type_id`, with sane (finite, non-zero) scales.
fn random_data(rng: &mut Rng, type_id: u32, n: usize) -> Vec<u8> {
    let scale = |rng: &mut Rng| f16::from_f32(0.01 + 0.2 * rng.signed().abs()).to_le_bytes();
    match type_id {
        0 => (0..n).flat_map(|_| (rng.signed() * 3.0).to_le_bytes()).collect(),
        1 => (0..n).flat_map(|_| f16::from_f32(rng.signed() * 3.0).to_le_bytes()).collect(),
        30 => (0..n).flat_map(|_| bf16::from_f32(rng.signed() * 3.0).to_le_bytes()).collect(),
        8 => (0..n / 32).flat_map(|_| { let mut v = scale(rng).to_vec(); v.extend(rng.bytes(32)); v }).collect(),
        2 => (0..n / 32).flat_map(|_| { let mut v = scale(rng).to_vec(); v.extend(rng.bytes(16)); v }).collect(),
        3 => (0..n / 32)
            .flat_map(|_| {
                let mut v = scale(rng).to_vec();
                v.extend(f16::from_f32(rng.signed() * 0.5).to_le_bytes()); // m
                v.extend(rng.bytes(16));
                v
            })
            .collect(),
        _ => unreachable!(),
    }
}

fn tmp_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

// ---------------------------------------------------------------- dequantization

#[test]
fn every_quant_type_round_trips_through_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5EED_0001);
    // (type id, GgmlType, dims innermost first)
    let cases = [
        (0u32, GgmlType::F32, vec![96u64, 5]),
        (1, GgmlType::F16, vec![64, 3, 2]),
        (30, GgmlType::BF16, vec![160]),
        (8, GgmlType::Q8_0, vec![128, 7]),
        (2, GgmlType::Q4_0, vec![64, 9]),
        (3, GgmlType::Q4_1, vec![96, 4]),
    ];
    let tensors: Vec<RawTensor> = cases
        .iter()
        .map(|(id, _, dims)| {
            let n = dims.iter().product::<u64>() as usize;
            RawTensor { name: format!("t.type{id}"), dims: dims.clone(), type_id: *id, data: random_data(&mut rng, *id, n) }
        })
        .collect();
    let path = tmp_file(dir.path(), "quant.gguf", &write_gguf(&[("general.architecture", Kv::Str("llama".into()))], &tensors));
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.tensors.len(), cases.len());
    for ((id, ty, dims), raw) in cases.iter().zip(&tensors) {
        let t = g.tensor(&raw.name).unwrap();
        assert_eq!(t.ty, *ty);
        assert_eq!(t.dims, *dims);
        assert_eq!(t.shape(), dims.iter().rev().map(|&d| d as usize).collect::<Vec<_>>());
        assert_eq!(gguf::GgmlType::from_id(*id), Some(*ty));
        let got = g.tensor_f32(t).unwrap();
        let n = t.n_elements();
        assert_eq!(got.len(), n);
        let mut distinct = std::collections::HashSet::new();
        for (k, &x) in got.iter().enumerate() {
            let want = ref_element(*id, &raw.data, k);
            assert_eq!(x.to_bits(), want.to_bits(), "{ty:?} element {k}: got {x}, want {want}");
            distinct.insert(x.to_bits());
        }
        // The data is random, not constant: a decoder that ignored it would fail above.
        assert!(distinct.len() > n / 4 || distinct.len() > 8, "{ty:?}: only {} distinct values", distinct.len());
    }
}

#[test]
fn dequantize_rejects_a_wrong_byte_count() {
    let mut out = vec![0f32; 64];
    let err = gguf::dequantize(GgmlType::Q4_1, &[1u8; 39], &mut out).unwrap_err();
    assert!(err.contains("expected 40"), "{err}");
    let err = gguf::dequantize(GgmlType::Q8_0, &[1u8; 34], &mut [0f32; 33]).unwrap_err();
    assert!(err.contains("block size 32"), "{err}");
}

// ---------------------------------------------------------------- metadata

#[test]
fn metadata_of_every_kind_is_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let kvs = [
        ("a.u32", Kv::U32(0xDEAD_BEEF)),
        ("a.f32", Kv::F32(-1.25e-5)),
        ("a.bool", Kv::Bool(true)),
        ("a.str", Kv::Str("héllo <|im_start|>".into())),
        ("a.strs", Kv::Strs(vec!["Ġt".into(), "".into(), "x y".into()])),
        ("a.i32s", Kv::I32s(vec![1, -3, 7])),
    ];
    let path = tmp_file(dir.path(), "meta.gguf", &write_gguf(&kvs, &[]));
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.get("a.u32"), Some(&Value::U32(0xDEAD_BEEF)));
    assert_eq!(g.get("a.f32"), Some(&Value::F32(-1.25e-5)));
    assert_eq!(g.get("a.bool").and_then(|v| v.as_bool()), Some(true));
    assert_eq!(g.require_str("a.str").unwrap(), "héllo <|im_start|>");
    let strs: Vec<&str> = g.get("a.strs").unwrap().as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(strs, ["Ġt", "", "x y"]);
    let ints: Vec<i64> = g.get("a.i32s").unwrap().as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(ints, [1, -3, 7]);
    let e = g.require_u64("a.str").unwrap_err().to_string();
    assert!(e.contains("a.str") && e.contains("unsigned integer") && e.contains("meta.gguf"), "{e}");
    let e = g.require_u64("nope").unwrap_err().to_string();
    assert!(e.contains("missing metadata key 'nope'"), "{e}");
}

// ---------------------------------------------------------------- Q/K un-permutation

/// llama.cpp's convert_hf_to_gguf.py `permute`: HF rows viewed [n_head, 2, hd/2] ->
/// swapaxes(1, 2) -> [n_head, hd/2, 2]. Written here independently, as index arithmetic.
fn llama_cpp_permute(hf: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0f32; hf.len()];
    for r_out in 0..rows {
        // output row (h, j, i) in [n_head, half, 2] comes from input row (h, i, j) in [n_head, 2, half]
        let (h, rest) = (r_out / (2 * half), r_out % (2 * half));
        let (j, i) = (rest / 2, rest % 2);
        let r_in = h * 2 * half + i * half + j;
        out[r_out * cols..(r_out + 1) * cols].copy_from_slice(&hf[r_in * cols..(r_in + 1) * cols]);
    }
    out
}

#[test]
fn unpermute_restores_rotate_half_rows() {
    // Known pattern, one head of dim 8: llama.cpp stores HF rows in the order 0,4,1,5,2,6,3,7
    // (the pairs (x_i, x_{i+4}) that HF's rotate-half rotates together become adjacent).
    let gguf_rows = [0., 4., 1., 5., 2., 6., 3., 7.];
    assert_eq!(gguf::unpermute_rows(&gguf_rows, 1, 8, 1), [0., 1., 2., 3., 4., 5., 6., 7.]);
    // Two heads of dim 4, two columns: each head is un-permuted on its own.
    let g2: Vec<f32> = [0., 2., 1., 3., 4., 6., 5., 7.].iter().flat_map(|&r| [r * 10.0, r * 10.0 + 1.0]).collect();
    let want: Vec<f32> = (0..8).flat_map(|r| [r as f32 * 10.0, r as f32 * 10.0 + 1.0]).collect();
    assert_eq!(gguf::unpermute_rows(&g2, 2, 8, 2), want);
    // Random: unpermute is the inverse of llama.cpp's permute, for Q (9 heads) and K (3 heads).
    let mut rng = Rng(77);
    for (n_head, head_dim, cols) in [(9, 64, 5), (3, 64, 7), (4, 6, 3)] {
        let rows = n_head * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|_| rng.signed()).collect();
        let permuted = llama_cpp_permute(&hf, n_head, rows, cols);
        assert_ne!(permuted, hf);
        assert_eq!(gguf::unpermute_rows(&permuted, n_head, rows, cols), hf);
    }
}

#[test]
fn tensor_names_map_to_hugging_face() {
    let cases = [
        ("token_embd.weight", Some("model.embed_tokens.weight")),
        ("output_norm.weight", Some("model.norm.weight")),
        ("output.weight", Some("lm_head.weight")),
        ("blk.0.attn_q.weight", Some("model.layers.0.self_attn.q_proj.weight")),
        ("blk.12.attn_k.weight", Some("model.layers.12.self_attn.k_proj.weight")),
        ("blk.3.attn_v.bias", Some("model.layers.3.self_attn.v_proj.bias")),
        ("blk.3.attn_q.bias", Some("model.layers.3.self_attn.q_proj.bias")),
        ("blk.29.attn_output.weight", Some("model.layers.29.self_attn.o_proj.weight")),
        ("blk.1.attn_q_norm.weight", Some("model.layers.1.self_attn.q_norm.weight")),
        ("blk.1.attn_k_norm.weight", Some("model.layers.1.self_attn.k_norm.weight")),
        ("blk.2.ffn_gate.weight", Some("model.layers.2.mlp.gate_proj.weight")),
        ("blk.2.ffn_up.weight", Some("model.layers.2.mlp.up_proj.weight")),
        ("blk.2.ffn_down.weight", Some("model.layers.2.mlp.down_proj.weight")),
        ("blk.4.attn_norm.weight", Some("model.layers.4.input_layernorm.weight")),
        ("blk.4.ffn_norm.weight", Some("model.layers.4.post_attention_layernorm.weight")),
        ("rope_freqs.weight", None),
        ("blk.x.attn_q.weight", None),
    ];
    for (g, hf) in cases {
        assert_eq!(gguf::hf_tensor_name(g).as_deref(), hf, "{g}");
    }
}

// ---------------------------------------------------------------- whole import

/// A tiny llama GGUF (2 layers, hidden 64, 4 heads / 2 KV heads, head_dim 16, FFN 96) with
/// mixed quant types, a byte-level BPE vocabulary and the HF rows of Q/K kept for checking.
struct TinyModel {
    bytes: Vec<u8>,
    tensors: Vec<RawTensor>,
}

const BYTE_LEVEL_PRINTABLE: &str = "!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";

fn tiny_llama(with_output: bool) -> TinyModel {
    tiny_model("llama", with_output)
}

/// The tiny model for `arch` (llama, qwen2 with q/k/v biases, qwen3 with q/k norms).
fn tiny_model(arch: &str, with_output: bool) -> TinyModel {
    tiny_model_edited(arch, with_output, |_| {})
}

/// The tiny model with `edit` applied to its tensor table before it is written.
fn tiny_model_edited(arch: &str, with_output: bool, edit: impl FnOnce(&mut Vec<RawTensor>)) -> TinyModel {
    let mut rng = Rng(0xC0FFEE);
    let (hidden, ffn, n_head, n_kv, hd, vocab_extra) = (64u64, 96u64, 4u64, 2u64, 16u64, 0);
    let _ = vocab_extra;
    // Vocabulary: 2 specials, printable ASCII, "Ġ", then merged pieces.
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    tokens.extend(BYTE_LEVEL_PRINTABLE.chars().map(|c| c.to_string()));
    tokens.push("Ġ".into());
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let vocab = tokens.len() as u64; // 3 + 94 + 1 + 9 = 107
    let mut types = vec![1i32; tokens.len()];
    types[0] = 3;
    types[1] = 3;
    types[2] = 3;
    let mut t = Vec::new();
    let mut add = |name: String, dims: Vec<u64>, type_id: u32, rng: &mut Rng| {
        let n = dims.iter().product::<u64>() as usize;
        t.push(RawTensor { name, dims, type_id, data: random_data(rng, type_id, n) });
    };
    add("token_embd.weight".into(), vec![hidden, vocab], 8, &mut rng);
    for l in 0..2 {
        add(format!("blk.{l}.attn_norm.weight"), vec![hidden], 0, &mut rng);
        add(format!("blk.{l}.attn_q.weight"), vec![hidden, n_head * hd], 3, &mut rng);
        add(format!("blk.{l}.attn_k.weight"), vec![hidden, n_kv * hd], 2, &mut rng);
        add(format!("blk.{l}.attn_v.weight"), vec![hidden, n_kv * hd], 1, &mut rng);
        if arch == "qwen2" {
            add(format!("blk.{l}.attn_q.bias"), vec![n_head * hd], 0, &mut rng);
            add(format!("blk.{l}.attn_k.bias"), vec![n_kv * hd], 0, &mut rng);
            add(format!("blk.{l}.attn_v.bias"), vec![n_kv * hd], 0, &mut rng);
        }
        if arch == "qwen3" {
            add(format!("blk.{l}.attn_q_norm.weight"), vec![hd], 0, &mut rng);
            add(format!("blk.{l}.attn_k_norm.weight"), vec![hd], 0, &mut rng);
        }
        add(format!("blk.{l}.attn_output.weight"), vec![n_head * hd, hidden], 30, &mut rng);
        add(format!("blk.{l}.ffn_norm.weight"), vec![hidden], 0, &mut rng);
        add(format!("blk.{l}.ffn_gate.weight"), vec![hidden, ffn], 3, &mut rng);
        add(format!("blk.{l}.ffn_up.weight"), vec![hidden, ffn], 8, &mut rng);
        add(format!("blk.{l}.ffn_down.weight"), vec![ffn, hidden], 2, &mut rng);
    }
    add("output_norm.weight".into(), vec![hidden], 0, &mut rng);
    if with_output {
        add("output.weight".into(), vec![hidden, vocab], 1, &mut rng);
    }
    add("rope_freqs.weight".into(), vec![hd / 2], 0, &mut rng);
    let k = |s: &str| format!("{arch}.{s}");
    let keys = [k("block_count"), k("context_length"), k("embedding_length"), k("feed_forward_length"),
        k("attention.head_count"), k("attention.head_count_kv"), k("rope.freq_base"),
        k("attention.layer_norm_rms_epsilon"), k("attention.key_length")];
    let kvs = [
        ("general.architecture", Kv::Str(arch.into())),
        (keys[0].as_str(), Kv::U32(2)),
        (keys[1].as_str(), Kv::U32(512)),
        (keys[2].as_str(), Kv::U32(hidden as u32)),
        (keys[3].as_str(), Kv::U32(ffn as u32)),
        (keys[4].as_str(), Kv::U32(n_head as u32)),
        (keys[5].as_str(), Kv::U32(n_kv as u32)),
        (keys[6].as_str(), Kv::F32(100000.0)),
        (keys[7].as_str(), Kv::F32(1e-5)),
        (keys[8].as_str(), Kv::U32(hd as u32)),
        ("tokenizer.ggml.model", Kv::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Kv::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Kv::Strs(tokens)),
        ("tokenizer.ggml.token_type", Kv::I32s(types)),
        ("tokenizer.ggml.merges", Kv::Strs(merges.iter().map(|s| s.to_string()).collect())),
        ("tokenizer.ggml.bos_token_id", Kv::U32(1)),
        ("tokenizer.ggml.eos_token_id", Kv::U32(2)),
        ("tokenizer.ggml.padding_token_id", Kv::U32(2)),
        ("tokenizer.chat_template", Kv::Str("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}".into())),
    ];
    edit(&mut t);
    TinyModel { bytes: write_gguf(&kvs, &t), tensors: t }
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn import_writes_a_complete_hugging_face_folder() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_llama(false);
    let input = tmp_file(dir.path(), "tiny.gguf", &tiny.bytes);
    let out = dir.path().join("nested").join("model");
    let mut seen = Vec::new();
    let s = gguf::import_gguf(&input, &out, false, |i, n, name| seen.push((i, n, name.to_string()))).unwrap();
    assert_eq!(s.skipped, ["rope_freqs.weight"]);
    assert_eq!(s.n_tensors, 1 + 2 * 9 + 1);
    assert_eq!(seen.len(), s.n_tensors);
    // Nothing but the folder is left beside it (the temp dir was renamed).
    let siblings: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(siblings, ["model"]);

    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["hidden_size"], 64);
    assert_eq!(cfg["intermediate_size"], 96);
    assert_eq!(cfg["num_hidden_layers"], 2);
    assert_eq!(cfg["num_attention_heads"], 4);
    assert_eq!(cfg["num_key_value_heads"], 2);
    assert_eq!(cfg["head_dim"], 16);
    assert_eq!(cfg["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(cfg["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(cfg["max_position_embeddings"], 512);
    assert_eq!(cfg["vocab_size"], 107);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["bos_token_id"], 1);
    assert_eq!(cfg["eos_token_id"], 2);

    let st_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    assert_eq!(st.len(), s.n_tensors);
    assert!(st.tensor("lm_head.weight").is_err(), "tied model must not write lm_head");
    let f32s = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.dtype(), safetensors::Dtype::F32);
        (v.shape().to_vec(), v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
    };
    let reference = |gguf_name: &str| -> Vec<f32> {
        let raw = tiny.tensors.iter().find(|t| t.name == gguf_name).unwrap();
        let n = raw.dims.iter().product::<u64>() as usize;
        (0..n).map(|k| ref_element(raw.type_id, &raw.data, k)).collect()
    };
    let (shape, emb) = f32s("model.embed_tokens.weight");
    assert_eq!(shape, [107, 64]);
    assert_eq!(emb, reference("token_embd.weight"));
    let (shape, down) = f32s("model.layers.1.mlp.down_proj.weight");
    assert_eq!(shape, [64, 96]);
    assert_eq!(down, reference("blk.1.ffn_down.weight"));
    // Q and K come out un-permuted: permuting them back gives the GGUF rows.
    for (name, gname, heads) in [
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 4),
        ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight", 2),
    ] {
        let (shape, hf) = f32s(name);
        assert_eq!(shape, [heads * 16, 64]);
        let g = reference(gname);
        assert_ne!(hf, g);
        assert_eq!(llama_cpp_permute(&hf, heads, heads * 16, 64), g, "{name}");
    }
    // V is not permuted.
    assert_eq!(f32s("model.layers.0.self_attn.v_proj.weight").1, reference("blk.0.attn_v.weight"));

    // The tokenizer loads in the tokenizers crate and applies merges, digits and specials.
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("<|im_start|>hello world 42", false).unwrap();
    let pieces: Vec<&str> = enc.get_tokens().iter().map(|s| s.as_str()).collect();
    assert_eq!(pieces, ["<|im_start|>", "hello", "Ġworld", "Ġ", "4", "2"]);
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "<|im_start|>hello world 42");
    let tc = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["added_tokens_decoder"]["1"]["content"], "<|im_start|>");
    assert_eq!(tc["added_tokens_decoder"]["1"]["special"], true);
    assert!(tc["chat_template"].as_str().unwrap().starts_with("{% for m in messages %}"));

    // A second import into the same folder needs `overwrite`.
    let e = gguf::import_gguf(&input, &out, false, |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    gguf::import_gguf(&input, &out, true, |_, _, _| {}).unwrap();
}

#[test]
fn untied_model_writes_lm_head() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_llama(true);
    let input = tmp_file(dir.path(), "untied.gguf", &tiny.bytes);
    let out = dir.path().join("m");
    gguf::import_gguf(&input, &out, false, |_, _, _| {}).unwrap();
    assert_eq!(read_json(&out.join("config.json"))["tie_word_embeddings"], false);
    let st_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    assert_eq!(st.tensor("lm_head.weight").unwrap().shape(), [107, 64]);
}

#[test]
fn qwen_biases_and_qk_norms_are_mapped_and_not_permuted() {
    for arch in ["qwen2", "qwen3"] {
        let dir = tempfile::tempdir().unwrap();
        let tiny = tiny_model(arch, false);
        let input = tmp_file(dir.path(), "q.gguf", &tiny.bytes);
        let out = dir.path().join("m");
        let s = gguf::import_gguf(&input, &out, false, |_, _, _| {}).unwrap();
        let cfg = read_json(&out.join("config.json"));
        assert_eq!(cfg["model_type"], arch);
        assert_eq!(cfg["head_dim"], 16);
        let st_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
        assert_eq!(st.len(), s.n_tensors);
        let f32s = |name: &str| -> Vec<f32> {
            st.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
        };
        let reference = |gguf_name: &str| -> Vec<f32> {
            let raw = tiny.tensors.iter().find(|t| t.name == gguf_name).unwrap();
            let n = raw.dims.iter().product::<u64>() as usize;
            (0..n).map(|k| ref_element(raw.type_id, &raw.data, k)).collect()
        };
        // llama.cpp does not permute Q/K for qwen: they are copied as they are.
        assert_eq!(f32s("model.layers.1.self_attn.q_proj.weight"), reference("blk.1.attn_q.weight"));
        assert_eq!(f32s("model.layers.0.self_attn.k_proj.weight"), reference("blk.0.attn_k.weight"));
        if arch == "qwen2" {
            assert_eq!(s.n_tensors, 1 + 2 * 12 + 1);
            for (hf, g) in [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")] {
                assert_eq!(f32s(&format!("model.layers.1.self_attn.{hf}.bias")), reference(&format!("blk.1.{g}.bias")));
            }
        } else {
            assert_eq!(s.n_tensors, 1 + 2 * 11 + 1);
            assert_eq!(st.tensor("model.layers.0.self_attn.q_norm.weight").unwrap().shape(), [16]);
            assert_eq!(f32s("model.layers.1.self_attn.k_norm.weight"), reference("blk.1.attn_k_norm.weight"));
        }
    }
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_magic_is_reported_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = tiny_llama(false).bytes;
    bytes[..4].copy_from_slice(b"GGML");
    let p = tmp_file(dir.path(), "magic.gguf", &bytes);
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("magic.gguf") && e.contains("not a GGUF file") && e.contains("GGML"), "{e}");
}

#[test]
fn truncated_file_names_the_tensor_or_header_part() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tiny_llama(false).bytes;
    // Cut inside the tensor data: the error names a tensor and the sizes.
    let p = tmp_file(dir.path(), "cut.gguf", &bytes[..bytes.len() - 100]);
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("cut.gguf") && e.contains("truncated") && e.contains("tensor '"), "{e}");
    // Cut inside the metadata.
    let p = tmp_file(dir.path(), "cut2.gguf", &bytes[..200]);
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("cut2.gguf") && e.contains("truncated") && e.contains("metadata"), "{e}");
    // An empty file.
    let p = tmp_file(dir.path(), "empty.gguf", &[]);
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("empty.gguf") && e.contains("magic"), "{e}");
}

#[test]
fn unsupported_quant_type_names_the_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    let tensors = [
        RawTensor { name: "fine".into(), dims: vec![32], type_id: 0, data: random_data(&mut rng, 0, 32) },
        RawTensor { name: "blk.0.ffn_down.weight".into(), dims: vec![256], type_id: 12, data: rng.bytes(144) },
    ];
    let p = tmp_file(dir.path(), "q4k.gguf", &write_gguf(&[], &tensors));
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("q4k.gguf") && e.contains("blk.0.ffn_down.weight") && e.contains("Q4_K") && e.contains("not supported"), "{e}");
    // And through the importer (the error surfaces before any output is written).
    let out = dir.path().join("out");
    let e = gguf::import_gguf(&p, &out, false, |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("Q4_K"), "{e}");
    assert!(!out.exists());
}

#[test]
fn misaligned_block_count_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(9);
    // 48 elements of Q8_0 is not a whole number of 32-element blocks.
    let tensors = [RawTensor { name: "odd".into(), dims: vec![48], type_id: 8, data: rng.bytes(51) }];
    let p = tmp_file(dir.path(), "odd.gguf", &write_gguf(&[], &tensors));
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("'odd'") && e.contains("block size 32"), "{e}");
}

// ---------------------------------------------------------------- hostile files

/// Imports `bytes` into `<tmp>/outs/model` through the library, catching a panic; returns the
/// error text (a panic or a success fails the test) after checking that nothing was left in
/// `outs/` (no temp folder, no half-written model).
fn import_must_fail(name: &str, bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let input = tmp_file(dir.path(), name, bytes);
    let outs = dir.path().join("outs");
    let out = outs.join("model");
    let r = std::panic::catch_unwind(|| gguf::import_gguf(&input, &out, false, |_, _, _| {}));
    let left: Vec<_> = std::fs::read_dir(&outs).map(|d| d.map(|e| e.unwrap().file_name()).collect()).unwrap_or_default();
    let e = match r {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(s)) => panic!("{name}: imported {} tensors into a folder that cannot be loaded", s.n_tensors),
        Err(_) => panic!("{name}: the import panicked (left in outs/: {left:?})"),
    };
    assert!(left.is_empty(), "{name}: left in outs/ after the error: {left:?} ({e})");
    assert!(e.contains(name), "{name}: the error names the file: {e}");
    e
}


fn set_dims(t: &mut [RawTensor], name: &str, dims: Vec<u64>) {
    t.iter_mut().find(|t| t.name == name).unwrap().dims = dims;
}

#[test]
fn tensor_with_zero_dimensions_is_an_error_naming_it() {
    // 0 dims on a Q projection (panicked in the Q/K un-permutation, temp folder left) and on
    // the embedding (panicked reading the vocabulary size from its shape).
    for tensor in ["blk.0.attn_q.weight", "token_embd.weight"] {
        let bytes = tiny_model_edited("llama", false, |t| set_dims(t, tensor, vec![])).bytes;
        let e = import_must_fail("nodims.gguf", &bytes);
        assert!(e.contains(tensor) && e.contains("0 dimensions"), "{e}");
    }
}

#[test]
fn zero_in_dims_is_an_error_naming_the_tensor() {
    // [64, 0]: no elements; imported "successfully" into a folder that could not be loaded.
    let bytes = tiny_model_edited("llama", false, |t| set_dims(t, "blk.1.attn_v.weight", vec![64, 0])).bytes;
    let e = import_must_fail("zerodim.gguf", &bytes);
    assert!(e.contains("blk.1.attn_v.weight") && e.contains("dimension 1 is 0"), "{e}");
}

#[test]
fn dims_whose_byte_count_wraps_are_an_error_naming_the_tensor() {
    // 2^31 x 2^31 F32 elements: the element count fits u64, its 4-byte size wraps to 0 (which
    // passed the bounds check, then panicked allocating or slicing the tensor).
    let bytes = tiny_model_edited("llama", false, |t| set_dims(t, "blk.0.attn_norm.weight", vec![1 << 31, 1 << 31])).bytes;
    let e = import_must_fail("wrap.gguf", &bytes);
    assert!(e.contains("blk.0.attn_norm.weight") && e.contains("overflow"), "{e}");
    // Dims whose element count itself overflows, through the reader alone.
    let dir = tempfile::tempdir().unwrap();
    let tensors = [RawTensor { name: "huge".into(), dims: vec![1 << 40, 1 << 40], type_id: 0, data: vec![0; 4] }];
    let p = tmp_file(dir.path(), "wrap2.gguf", &write_gguf(&[], &tensors));
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("'huge'") && e.contains("overflow"), "{e}");
}

#[test]
fn duplicate_tensor_names_are_an_error_naming_the_tensor() {
    let copy_as = |t: &mut Vec<RawTensor>, from: &str, name: &str| {
        let i = t.iter().position(|t| t.name == from).unwrap();
        let copy = RawTensor { name: name.into(), dims: t[i].dims.clone(), type_id: t[i].type_id, data: t[i].data.clone() };
        t.push(copy);
    };
    // The same GGUF name twice: safetensors got one header entry but both data blocks.
    let bytes = tiny_model_edited("llama", false, |t| copy_as(t, "blk.1.ffn_down.weight", "blk.1.ffn_down.weight")).bytes;
    let e = import_must_fail("dup.gguf", &bytes);
    assert!(e.contains("blk.1.ffn_down.weight") && e.contains("twice"), "{e}");
    // Two GGUF names for one HF tensor: "blk.01" is layer 1 too.
    let bytes = tiny_model_edited("llama", false, |t| copy_as(t, "blk.1.ffn_up.weight", "blk.01.ffn_up.weight")).bytes;
    let e = import_must_fail("dup2.gguf", &bytes);
    assert!(e.contains("blk.01.ffn_up.weight") && e.contains("blk.1.ffn_up.weight") && e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");
}

/// A GGUF header with one metadata array of `n` elements of type `elem_ty`, in a sparse file
/// of 1 GiB (the elements are zeros that take no disk space).
fn sparse_array_gguf(dir: &Path, name: &str, elem_ty: u32, n: u64) -> PathBuf {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes()); // tensors
    out.extend(1u64.to_le_bytes()); // metadata entries
    put_str(&mut out, "tokenizer.ggml.scores");
    out.extend(9u32.to_le_bytes());
    out.extend(elem_ty.to_le_bytes());
    out.extend(n.to_le_bytes());
    let p = tmp_file(dir, name, &out);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(1 << 30).unwrap();
    p
}

#[test]
fn huge_metadata_array_is_rejected_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    // 2^29 one-byte elements fit in the 1 GiB file; as 32-byte values they asked for 16 GiB.
    // 2^28 eight-byte elements need 2 GiB: more than the file holds.
    for (elem_ty, n) in [(0u32, 1u64 << 29), (10, 1 << 28)] {
        let p = sparse_array_gguf(dir.path(), &format!("big{elem_ty}.gguf"), elem_ty, n);
        LARGEST.with(|m| m.set(0));
        let t0 = Instant::now();
        let e = GgufFile::open(&p).err().expect("a huge array must be rejected").to_string();
        let largest = LARGEST.with(|m| m.get());
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        assert!(largest < 1 << 20, "largest allocation {largest} bytes: {e}");
        assert!(e.contains(&format!("big{elem_ty}.gguf")) && e.contains("tokenizer.ggml.scores") && e.contains(&format!("{n} elements")), "{e}");
    }
    // The bytes-left check names what the elements need, where, and the file's length.
    let e = GgufFile::open(dir.path().join("big10.gguf")).err().unwrap().to_string();
    assert!(e.contains("truncated") && e.contains("2147483648 bytes at offset 69") && e.contains("the file has 1073741824 bytes"), "{e}");
}

#[test]
fn import_gguf_binary_reports_a_hostile_file_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tiny_model_edited("llama", false, |t| set_dims(t, "blk.0.attn_k.weight", vec![])).bytes;
    let input = tmp_file(dir.path(), "nodims.gguf", &bytes);
    let outs = dir.path().join("outs");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ipo"))
        .args(["import-gguf", input.to_str().unwrap(), outs.join("model").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("blk.0.attn_k.weight") && stderr.contains("0 dimensions"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&outs).map(|d| d.map(|e| e.unwrap().file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

// ---------------------------------------------------------------- the default model

#[test]
fn default_model_tokenizer_matches_hugging_face_ids() {
    let Some(dir) = default_model() else { return };
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join("tokenizer.json").display()));
    let fixture = read_json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/smollm2_ids.json"));
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.get_ids(), want.as_slice(), "ids of {text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text, "decode of {text:?}");
    }
    // The 17 special tokens are special, and the chat template rides along.
    let tc = read_json(&dir.join("tokenizer_config.json"));
    let specials = tc["added_tokens_decoder"].as_object().unwrap();
    assert_eq!(specials.len(), 17);
    assert!(specials.values().all(|v| v["special"] == true));
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert!(tc["chat_template"].as_str().unwrap().contains("<|im_start|>"));
}

#[test]
fn default_model_folder_has_the_expected_config_and_weights() {
    let Some(dir) = default_model() else { return };
    let cfg = read_json(&dir.join("config.json"));
    for (k, v) in [("hidden_size", 576), ("intermediate_size", 1536), ("num_hidden_layers", 30), ("num_attention_heads", 9), ("num_key_value_heads", 3), ("head_dim", 64), ("vocab_size", 49152)] {
        assert_eq!(cfg[k], v, "{k}");
    }
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rope_theta"].as_f64(), Some(100000.0));
    let file = std::fs::File::open(dir.join("model.safetensors")).unwrap();
    let mmap = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let st = safetensors::SafeTensors::deserialize(&mmap).unwrap();
    assert_eq!(st.len(), 1 + 30 * 9 + 1);
    assert_eq!(st.tensor("model.embed_tokens.weight").unwrap().shape(), [49152, 576]);
    assert_eq!(st.tensor("model.layers.29.self_attn.k_proj.weight").unwrap().shape(), [192, 576]);
    assert!(st.tensor("lm_head.weight").is_err());
    // Norm weights are F32 in the GGUF and stay finite, non-constant.
    let norm: Vec<f32> = st.tensor("model.norm.weight").unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert!(norm.iter().all(|x| x.is_finite()) && norm.iter().any(|&x| x != norm[0]));
}
