//! Checkpoints `out/step-N/`, written atomically: everything goes into a temp directory
//! `out/.step-N.tmp-<pid>/` (each file fsync'd), which is then renamed to `step-N` (and the
//! parent fsync'd), so after a crash a checkpoint directory is either complete or absent.
//! Contents: the trainable weights (`model.safetensors` in HF names for full fine-tuning, or
//! PEFT `adapter_model.safetensors` + `adapter_config.json` for LoRA), `optimizer.safetensors`
//! (AdamW moments `m.<k>.<name>` / `v.<k>.<name>`, f32) and `trainer_state.json` (step,
//! config, data-order digest, the current epoch's order and the RNG seed). Resuming restores
//! all of it, so N steps straight equal N/2 + resume + N/2 bit for bit. The trainer keeps its
//! master weights (or LoRA adapters) and moments on the backend: they are downloaded here at
//! save time and uploaded on load. Under ZeRO-1 (`super::zero`) every rank calls `save`, the
//! moment slices are gathered and rank 0 writes the whole state, so the files are the same as
//! without it; `load` reads the whole state and each rank keeps its slice.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::data::{epoch_order, TrainPair};
use super::st::{read_f32_tensors, write_f32_safetensors, write_file_synced};
use super::trainer::{Moments, Trainable, TrainConfig, Trainer};
use super::{OptimKind, TrainError};
use crate::backend::Backend;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct TrainerState {
    pub step: usize,
    pub total_steps: usize,
    pub optimizer_steps: u64,
    pub config: TrainConfig,
    pub num_pairs: usize,
    /// sha256 over the ids, tokens and reference log-probs of the pairs, in file order.
    pub pairs_digest: String,
    pub epoch: usize,
    /// The shuffled pair order of the current epoch (a function of seed and epoch).
    pub data_order: Vec<usize>,
    pub seed: u64,
}

/// A digest of the training data, to refuse resuming on different pairs.
pub(crate) fn pairs_digest(pairs: &[TrainPair]) -> String {
    let mut h = Sha256::new();
    for p in pairs {
        h.update(p.id.as_bytes());
        for ids in [&p.context, &p.chosen, &p.rejected] {
            h.update((ids.len() as u64).to_le_bytes());
            for &t in ids.iter() {
                h.update(t.to_le_bytes());
            }
        }
        h.update(p.ref_chosen.to_le_bytes());
        h.update(p.ref_rejected.to_le_bytes());
    }
    format!("{:x}", h.finalize())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io(format!("{}: {e}", path.display()))
}

/// Creates `dir` all at once or not at all: `fill` writes into a temp directory beside it,
/// which is renamed to `dir` only when `fill` succeeded. An existing `dir` is replaced.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<(), TrainError>) -> Result<(), TrainError> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dir.file_name().ok_or_else(|| TrainError::Io(format!("{}: not a directory path", dir.display())))?;
    // A killed run leaves its half-written checkpoint as `.step-N.tmp-PID` (a later step, or
    // `final`, is what the next run writes), so every dead writer's checkpoint temp goes.
    let own = name.to_string_lossy().into_owned();
    crate::io::stale::remove_stale(parent, &|n| n == own || n.starts_with("step-") || n == "final");
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Ok(d) = std::fs::File::open(&tmp) {
        let _ = d.sync_all();
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The newest complete checkpoint `step-N` in `out` (temp directories are ignored).
pub fn latest(out: &Path) -> Option<PathBuf> {
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(out).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name.strip_prefix("step-").and_then(|n| n.parse::<usize>().ok()) else { continue };
        if e.path().join("trainer_state.json").is_file() && best.as_ref().is_none_or(|b| n > b.0) {
            best = Some((n, e.path()));
        }
    }
    best.map(|b| b.1)
}

fn weights_file<B: Backend>(t: &Trainer<B>) -> &'static str {
    match t.trainable {
        Trainable::Full { .. } => "model.safetensors",
        Trainable::Lora(_) => "adapter_model.safetensors",
    }
}

/// Writes the checkpoint files of `t` into `dir` (an existing, empty directory), with the
/// whole moments `(m, v)` (`Trainer::full_moments`) and, for full fine-tuning, the whole fp32
/// weights `full` (`Trainer::full_trainable`). `base_model` goes into adapter_config.json.
fn write_files<B: Backend>(t: &Trainer<B>, (m, v): &Moments, full: Option<&[(String, Vec<usize>, Vec<f32>)]>, dir: &Path, base_model: &str) -> Result<(), TrainError> {
    match &t.trainable {
        Trainable::Full { .. } => write_f32_safetensors(&dir.join("model.safetensors"), full.expect("the weights of full fine-tuning"))?,
        Trainable::Lora(l) => l.save_peft(dir, base_model)?,
    }
    let names: Vec<String> = t.trainable_sizes().into_iter().map(|x| x.0).collect();
    let mut moments = Vec::new();
    for (which, m) in [("m", m), ("v", v)] {
        for (k, (n, data)) in names.iter().zip(m.iter()).enumerate() {
            moments.push((format!("{which}.{k}.{n}"), vec![data.len()], data.clone()));
        }
    }
    write_f32_safetensors(&dir.join("optimizer.safetensors"), &moments)?;
    let spe = t.steps_per_epoch();
    let epoch = t.step / spe;
    let state = TrainerState {
        step: t.step,
        total_steps: t.total_steps(),
        optimizer_steps: t.optim.steps,
        config: t.cfg.clone(),
        num_pairs: t.pairs.len(),
        pairs_digest: pairs_digest(&t.pairs),
        epoch,
        data_order: epoch_order(t.pairs.len(), t.cfg.seed, epoch),
        seed: t.cfg.seed,
    };
    let json = serde_json::to_string_pretty(&state).expect("state serializes");
    write_file_synced(&dir.join("trainer_state.json"), json.as_bytes())
}

/// Saves `t` atomically as `dir`; `extra` may add files (e.g. config.json) before the rename.
/// In a data-parallel group every rank calls it (ZeRO-1 gathers the moments and the fp32
/// master slices) and rank 0 alone writes.
pub fn save<B: Backend>(
    t: &Trainer<B>,
    dir: &Path,
    base_model: &str,
    extra: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let root = t.comm.rank() == 0;
    if !root && !t.shard.is_split() {
        return Ok(());
    }
    let moments = t.full_moments()?;
    let full = match t.trainable {
        Trainable::Full { .. } => Some(t.full_trainable()?),
        Trainable::Lora(_) => None,
    };
    if !root {
        return Ok(());
    }
    write_dir_atomic(dir, |tmp| {
        write_files(t, &moments, full.as_deref(), tmp, base_model)?;
        extra(tmp)
    })
}

/// Reads a checkpoint's trainer state.
pub(crate) fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))
}

/// Restores weights/adapters, optimizer moments and the step of `t` from `dir`. Refuses a
/// checkpoint made with other data, seed, batch sizes, epochs, LoRA or optimizer settings.
pub fn load<B: Backend>(t: &mut Trainer<B>, dir: &Path) -> Result<(), TrainError> {
    let st = read_state(dir)?;
    let at = dir.join("trainer_state.json");
    let mismatch = |what: &str, a: String, b: String| {
        TrainError::Checkpoint(format!("{}: {what} is {a} in the checkpoint but {b} now; resume needs the same settings", at.display()))
    };
    if st.pairs_digest != pairs_digest(&t.pairs) || st.num_pairs != t.pairs.len() {
        return Err(mismatch("the pairs file digest", st.pairs_digest.clone(), pairs_digest(&t.pairs)));
    }
    let (a, b) = (&st.config, &t.cfg);
    for (what, x, y) in [
        ("--seed", a.seed.to_string(), b.seed.to_string()),
        ("--batch-size", a.batch_size.to_string(), b.batch_size.to_string()),
        ("--micro-batch-size", a.micro_batch_size.to_string(), b.micro_batch_size.to_string()),
        ("--epochs", a.epochs.to_string(), b.epochs.to_string()),
        ("--beta", a.beta.to_string(), b.beta.to_string()),
        ("--sft-coef", a.sft_coef.to_string(), b.sft_coef.to_string()),
        ("the LoRA settings", format!("{:?}", a.lora), format!("{:?}", b.lora)),
        ("the optimizer settings", format!("{:?}", a.optim), format!("{:?}", b.optim)),
    ] {
        if x != y {
            return Err(mismatch(what, x, y));
        }
    }
    let wpath = dir.join(weights_file(t));
    let mut w = read_f32_tensors(&wpath)?;
    let opath = dir.join("optimizer.safetensors");
    let mut o = read_f32_tensors(&opath)?;
    let names = t.trainable_sizes();
    let mut values = Vec::new();
    for (name, n) in &names {
        let (_, data) = w.remove(name).ok_or_else(|| TrainError::Checkpoint(format!("{}: missing tensor {name}", wpath.display())))?;
        if data.len() != *n {
            return Err(TrainError::Checkpoint(format!("{}: tensor {name} has {} values, expected {n}", wpath.display(), data.len())));
        }
        values.push(data);
    }
    let (mut m, mut v) = (Vec::new(), Vec::new());
    if t.cfg.optim.kind == OptimKind::Adamw {
        for (k, (name, n)) in names.iter().enumerate() {
            for (which, store) in [("m", &mut m), ("v", &mut v)] {
                let key = format!("{which}.{k}.{name}");
                let (_, data) = o.remove(&key).ok_or_else(|| TrainError::Checkpoint(format!("{}: missing tensor {key}", opath.display())))?;
                if data.len() != *n {
                    return Err(TrainError::Checkpoint(format!("{}: {key} has {} values, expected {n}", opath.display(), data.len())));
                }
                store.push(data);
            }
        }
    }
    t.set_trainable(values);
    t.set_moments(m, v);
    t.optim.steps = st.optimizer_steps;
    t.step = st.step;
    Ok(())
}
