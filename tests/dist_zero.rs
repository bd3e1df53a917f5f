//! ZeRO-1 (`ipo train --zero 1`, src/train/zero.rs): each rank keeps the AdamW moments of its
//! 1/world slice of the trained parameters only. On the tiny fixtures, with AdamW, weight decay
//! and clipping, over 6 steps: world 2 and 3 with --zero 1 give the weights of world 1 without
//! it (within the fp32 bounds of tests/dist_train.rs), and world 2 with --zero 1 gives exactly
//! the bits of world 2 without it (the update is elementwise on the same summed gradients);
//! each rank holds about 2/world moment elements per trained parameter (full fine-tuning and
//! LoRA); a checkpoint written under --zero 1 at world 2 is the file a plain run writes and
//! resumes at world 1 without --zero (and at world 3 with it) to the uninterrupted run's
//! weights; `ipo launch --nproc 2 -- train ... --zero 1` through real processes equals one
//! process; and the CUDA backend's host side (`--device sim`) runs it too.

mod common;

use std::path::Path;
use std::process::Command;

use common::{f32_tensors as tensors, tiny_fixture, train_world, write_random_pairs};
use ipo::TrainSummary;

fn flags(model: &str, pairs: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let paths = [
        ("--model", tiny_fixture(model)),
        ("--pairs", pairs.to_path_buf()),
        ("--output", out.to_path_buf()),
    ];
    let mut f: Vec<String> = paths.iter().flat_map(|(k, p)| [k.to_string(), p.to_string_lossy().into_owned()]).collect();
    let common = "--beta 0.2 --sft-coef 0.1 --weight-decay 0.05 --max-grad-norm 0.5 --warmup-ratio 0.2 --epochs 2 --seed 13";
    f.extend(common.split(' ').map(String::from));
    for (flag, default) in [("--lr", "3e-3"), ("--device", "cpu")] {
        if !extra.contains(&flag) {
            f.extend([flag, default].map(String::from));
        }
    }
    f.extend(extra.iter().map(|s| s.to_string()));
    f
}

fn with(f: &[String], more: &[&str]) -> Vec<String> {
    f.iter().cloned().chain(more.iter().map(|s| s.to_string())).collect()
}

fn losses(out: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

/// Largest |a - b| over all tensors of two safetensors files with the same tensors.
fn max_diff(a: &Path, b: &Path) -> f32 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.iter().map(|t| &t.0).collect::<Vec<_>>(), tb.iter().map(|t| &t.0).collect::<Vec<_>>());
    ta.iter()
        .zip(&tb)
        .flat_map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// The bounds of tests/dist_train.rs: full fine-tuning within 2e-6, LoRA adapters (at a higher
/// learning rate) within 2e-5, per-step losses within 1e-5 relative.
const FULL_TOL: f32 = 2e-6;
const LORA_TOL: f32 = 2e-5;
const LOSS_TOL: f64 = 1e-5;

fn assert_same_losses(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: steps");
    for (s, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= LOSS_TOL * x.abs().max(1.0), "{what}: loss at step {}: {x} vs {y}", s + 1);
    }
}

/// Each rank's AdamW state is m and v of its slice: 2 x (N / world) elements, the slices
/// differing by at most one element and adding up to all N.
fn assert_sharded_state(s: &[TrainSummary], n: usize, what: &str) {
    let w = s.len();
    let per: Vec<usize> = s.iter().map(|x| x.optimizer_state_elems).collect();
    eprintln!("{what}: {n} trained elements, optimizer state per rank {per:?} (world 1: {})", 2 * n);
    assert_eq!(per.iter().sum::<usize>(), 2 * n, "{what}: {per:?}");
    assert!(
        per.iter().all(|&e| e == 2 * (n / w) || e == 2 * n.div_ceil(w)),
        "{what}: {per:?} for {n} elements over {w}"
    );
}

/// World 2 and 3 under --zero 1 against world 1 without it, and world 2 with against
/// without (bit for bit); `weights` is the final/ file of the trained tensors.
fn zero_case(model: &str, extra: &[&str], weights: &str, tol: f32) {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    // 13 pairs, batch 6: steps of 6, 6 and 1 pairs per epoch (at world 3 some ranks run none).
    write_random_pairs(&pairs, 13, 91);
    let one = tmp.path().join("w1");
    let s1 = train_world(1, &flags(model, &pairs, &one, extra));
    let l1 = losses(&one);
    assert_eq!(l1.len(), 6);
    let n: usize = tensors(&one.join("final").join(weights)).iter().map(|t| t.1.len()).sum();
    assert_eq!(s1[0].optimizer_state_elems, 2 * n, "world 1 keeps m and v of every trained element");
    for w in [2, 3] {
        let out = tmp.path().join(format!("z{w}"));
        let s = train_world(w, &with(&flags(model, &pairs, &out, extra), &["--zero", "1"]));
        assert_eq!(s[0].step, 6);
        assert_sharded_state(&s, n, &format!("{model} world {w} --zero 1"));
        assert_same_losses(&l1, &losses(&out), &format!("{model} world {w} --zero 1"));
        let d = max_diff(&one.join("final").join(weights), &out.join("final").join(weights));
        eprintln!("{model} world {w} --zero 1: max |w1 - w{w}| = {d:e}");
        assert!(d <= tol, "{model} world {w} --zero 1: final {weights} differs from world 1 by {d}");
    }
    // The same world without --zero: the same bits (ZeRO-1 changes where the update runs, not
    // what it computes).
    let plain = tmp.path().join("p2");
    train_world(2, &flags(model, &pairs, &plain, extra));
    let (a, b) = (tensors(&plain.join("final").join(weights)), tensors(&tmp.path().join("z2/final").join(weights)));
    assert!(a == b, "{model}: world 2 with and without --zero 1 differ");
    // Training moved the weights far more than the tolerance.
    let moved = if weights == "model.safetensors" {
        max_diff(&tiny_fixture(model).join("model.safetensors"), &one.join("final/model.safetensors"))
    } else {
        tensors(&one.join("final").join(weights))
            .iter()
            .filter(|t| t.0.contains("lora_B"))
            .flat_map(|t| t.1.clone())
            .fold(0f32, |a, x| a.max(x.abs()))
    };
    assert!(moved > 100.0 * tol, "{model}: weights moved by {moved}");
}

#[test]
fn llama_full_finetune_zero1_world_2_and_3_match_world_1() {
    zero_case("llama", &["--batch-size", "6", "--micro-batch-size", "1"], "model.safetensors", FULL_TOL);
}

#[test]
fn qwen2_lora_zero1_world_2_and_3_match_world_1() {
    zero_case(
        "qwen2",
        &[
            "--batch-size",
            "6",
            "--micro-batch-size",
            "2",
            "--lora-rank",
            "2",
            "--lora-alpha",
            "4",
            "--lora-targets",
            "q,v,down",
            "--lr",
            "2e-2",
        ],
        "adapter_model.safetensors",
        LORA_TOL,
    );
}

/// A checkpoint written under --zero 1 at world 2 holds the whole optimizer state (the file a
/// plain world-2 run writes, to the bit), and resumes at world 1 without --zero and at world 3
/// with it, each to the uninterrupted world-1 run's weights.
#[test]
fn zero1_checkpoint_resumes_at_world_1_without_zero_and_at_world_3_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 13, 92);
    let extra = ["--batch-size", "6", "--micro-batch-size", "1"];
    let straight = tmp.path().join("straight");
    train_world(1, &flags("llama", &pairs, &straight, &extra));
    let plain = tmp.path().join("plain");
    train_world(2, &with(&flags("llama", &pairs, &plain, &extra), &["--stop-after", "3"]));
    for (w, zero) in [(1, "0"), (3, "1")] {
        let out = tmp.path().join(format!("resume{w}"));
        let s = train_world(2, &with(&flags("llama", &pairs, &out, &extra), &["--stop-after", "3", "--zero", "1"]));
        assert!(s[0].final_dir.is_none() && out.join("step-3/trainer_state.json").is_file());
        for f in ["optimizer.safetensors", "model.safetensors"] {
            assert!(
                tensors(&out.join("step-3").join(f)) == tensors(&plain.join("step-3").join(f)),
                "{f} under --zero 1 differs from the plain run's"
            );
        }
        let resume = ["--resume", out.to_str().unwrap(), "--zero", zero];
        let s = train_world(w, &with(&flags("llama", &pairs, &out, &extra), &resume));
        assert_eq!((s[0].steps, s[0].step), (3, 6));
        assert_same_losses(&losses(&straight), &losses(&out), &format!("world 2 --zero 1 then world {w} --zero {zero}"));
        let d = max_diff(&straight.join("final/model.safetensors"), &out.join("final/model.safetensors"));
        eprintln!("world 2 --zero 1 -> world {w} --zero {zero}: max diff {d:e}");
        assert!(d <= FULL_TOL, "resumed at world {w}: final weights differ by {d}");
    }
}

/// Real processes over TCP: `ipo launch --nproc 2 -- train ... --zero 1` equals one process
/// without it.
#[test]
fn launch_nproc_2_zero1_equals_single_process() {
    const IPO: &str = env!("CARGO_BIN_EXE_ipo");
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 10, 93);
    let extra = ["--batch-size", "4", "--micro-batch-size", "1"];
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let o = Command::new(IPO).arg("train").args(flags("llama", &pairs, &one, &extra)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let o = Command::new(IPO)
        .args(["launch", "--nproc", "2", "--master-port", &port, "--", "train"])
        .args(with(&flags("llama", &pairs, &two, &extra), &["--zero", "1"]))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("[rank 0] train: done") && err.contains("[rank 1] train: done"), "{err}");
    // Each process held half of the moments (m and v of every trained element at world 1).
    let n: usize = tensors(&one.join("final/model.safetensors")).iter().map(|t| t.1.len()).sum();
    let held: Vec<usize> = (0..2)
        .map(|r| {
            let line = err.lines().find(|l| l.starts_with(&format!("[rank {r}] train: optimizer state of rank {r} of 2: "))).unwrap_or_else(|| panic!("{err}"));
            line.rsplit(": ").next().unwrap().split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    eprintln!("launch --zero 1: optimizer state per process {held:?} of {}", 2 * n);
    assert!(held.iter().sum::<usize>() == 2 * n && held.iter().all(|&h| h == 2 * (n / 2) || h == 2 * n.div_ceil(2)), "{held:?} of {n}");
    assert_same_losses(&losses(&one), &losses(&two), "launch --zero 1");
    let d = max_diff(&one.join("final/model.safetensors"), &two.join("final/model.safetensors"));
    let moved = max_diff(&tiny_fixture("llama").join("model.safetensors"), &one.join("final/model.safetensors"));
    eprintln!("launch --nproc 2 --zero 1 vs single: max |diff| {d:e}, moved {moved:e}");
    assert!(d <= FULL_TOL && moved > 1000.0 * FULL_TOL, "diff {d}, moved {moved}");
}

/// The CUDA backend's host side (the PTX simulator): world 2 with --zero 1 equals world 1 on
/// `--device sim` (the slices go through `adamw_at`'s offset pointers).
#[test]
fn sim_zero1_world_2_matches_world_1() {
    if common::sim().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 5, 94);
    let extra = ["--batch-size", "4", "--micro-batch-size", "1", "--device", "sim"];
    let (one, two) = (tmp.path().join("w1"), tmp.path().join("w2"));
    train_world(1, &flags("qwen3", &pairs, &one, &extra));
    let s = train_world(2, &with(&flags("qwen3", &pairs, &two, &extra), &["--zero", "1"]));
    let n: usize = tensors(&one.join("final/model.safetensors")).iter().map(|t| t.1.len()).sum();
    assert_sharded_state(&s, n, "sim world 2 --zero 1");
    assert_same_losses(&losses(&one), &losses(&two), "sim world 2 --zero 1");
    let d = max_diff(&one.join("final/model.safetensors"), &two.join("final/model.safetensors"));
    eprintln!("sim world 2 --zero 1: max |w1 - w2| = {d:e}");
    assert!(d <= FULL_TOL, "diff {d}");
}

/// ZeRO-1 with the gradient all-reduce overlapped with the backward (each decoder layer's
/// gradients started as the last micro-batch's backward finishes it): at world 2 and 3, full
/// fine-tuning and LoRA, with gradient accumulation (a rank with two micro-batches, one, or
/// none), every rank's losses and trained tensors are those of one all-reduce of everything
/// after the backward, and those of the same run without ZeRO-1, bit for bit: the sharded
/// update sees the fully reduced gradients.
#[test]
fn overlapped_all_reduce_under_zero1_is_bit_identical() {
    use common::{overlap_config, pairs8, same_bits, three_layers, train_ranks};
    use ipo::backend::cpu::CpuBackend;
    use ipo::model::config::Family;
    for (family, lora) in [(Family::Llama, false), (Family::Qwen2, true)] {
        let mcfg = three_layers(family, false);
        let (tcfg, pairs) = (overlap_config(lora), pairs8(31, mcfg.vocab_size));
        for world in [2, 3] {
            let run = |zero1, after| train_ranks(CpuBackend::<f32>::new, &mcfg, 6, &tcfg, &pairs, world, zero1, after, 4);
            let (over, after, plain) = (run(true, false), run(true, true), run(false, false));
            for (r, ((o, a), p)) in over.iter().zip(&after).zip(&plain).enumerate() {
                let what = format!("{family:?} lora {lora} world {world} rank {r}");
                for other in [a, p] {
                    assert!(o.losses.iter().zip(&other.losses).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: losses {:?} vs {:?}", o.losses, other.losses);
                    assert!(o.tensors.iter().zip(&other.tensors).all(|(x, y)| x.0 == y.0 && x.2.len() == y.2.len() && same_bits(&x.2, &y.2)), "{what}: trained tensors differ");
                }
                assert_eq!(o.sent[0].len(), mcfg.num_layers + usize::from(!lora), "{what}: one all-reduce per layer (+ the rest)");
            }
        }
    }
}

/// ZeRO-1's fp32 master slices on the CUDA backend's host side under `--precision bf16`: each
/// rank keeps its slice of every weight in fp32 and the layer matrices in bf16 only
/// (`Backend::shard_weight`), writes its updated slice into them and all-gathers the others'.
/// The matmuls read the same bf16 rounding of the same fp32 values as without sharding, so
/// world 2 with --zero 1 gives the bits of world 2 without it: the checkpoint (the fp32
/// masters, gathered) after 3 steps and the final weights.
#[test]
fn sim_bf16_zero1_master_slices_give_the_bits_of_the_unsharded_run() {
    if common::sim().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write_random_pairs(&pairs, 5, 95);
    let extra = ["--batch-size", "4", "--micro-batch-size", "1", "--device", "sim", "--precision", "bf16", "--save-every", "3"];
    let (plain, zero) = (tmp.path().join("plain"), tmp.path().join("zero"));
    train_world(2, &flags("llama", &pairs, &plain, &extra));
    let s = train_world(2, &with(&flags("llama", &pairs, &zero, &extra), &["--zero", "1"]));
    let n: usize = tensors(&plain.join("final/model.safetensors")).iter().map(|t| t.1.len()).sum();
    assert_sharded_state(&s, n, "sim bf16 world 2 --zero 1");
    assert_eq!(losses(&plain), losses(&zero), "sim bf16 world 2: losses with and without --zero 1");
    for f in ["step-3/model.safetensors", "step-3/optimizer.safetensors", "final/model.safetensors"] {
        assert!(tensors(&plain.join(f)) == tensors(&zero.join(f)), "{f}: --zero 1 differs from the plain run");
    }
    // The final weights are the fp32 masters, not their bf16 rounding.
    let w = tensors(&zero.join("final/model.safetensors"));
    let q = w.iter().find(|t| t.0.ends_with("layers.0.self_attn.q_proj.weight")).unwrap();
    assert!(q.1.iter().any(|x| x.to_bits() & 0xffff != 0), "q_proj saved in bf16");
    let moved = max_diff(&tiny_fixture("llama").join("model.safetensors"), &zero.join("final/model.safetensors"));
    assert!(moved > 1e-4, "weights moved by {moved}");
}
