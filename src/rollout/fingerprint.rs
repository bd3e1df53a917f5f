//! The model fingerprint written into every rollout record: SHA-256 (first 16 hex digits) over
//! `config.json`, `tokenizer.json` and a cheap identity of the weights, so later stages (and
//! `generate --resume`) can tell rollouts of another model, another tokenizer or another
//! fine-tune of the same model apart. The weights are not read whole (tens of GB at 8B scale):
//! per safetensors file its length, its header (names, dtypes, shapes, offsets) and the first
//! 4 KiB of every tensor's data, which a fine-tune changes (a merged LoRA delta is dense over
//! each matrix it touches). About 1 MiB read for an 8B model.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bytes hashed from the start of each tensor.
const TENSOR_SAMPLE: u64 = 4096;
/// Bytes hashed from each end of a weights file whose header cannot be read.
const END_SAMPLE: u64 = 1 << 20;

fn with_path(path: &Path) -> impl FnOnce(std::io::Error) -> std::io::Error + '_ {
    move |e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// `sha256(len(config) || config || len(tokenizer) || tokenizer || weights identity)`, 16 hex digits.
pub fn model_fingerprint(dir: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    for name in ["config.json", "tokenizer.json"] {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(with_path(&path))?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    for path in weight_files(dir)? {
        hash_weights(&mut h, &path).map_err(with_path(&path))?;
    }
    let d = h.finalize();
    Ok(d.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// The weights files as the loader picks them: `model.safetensors`, else the shards named in
/// `model.safetensors.index.json` (sorted, each once); none when the folder has neither (a
/// tokenizer-only folder still has a fingerprint; loading its weights fails elsewhere).
fn weight_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let Ok(text) = std::fs::read_to_string(&index) else { return Ok(vec![]) };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", index.display())))?;
    let mut files: Vec<&str> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| m.values().filter_map(|f| f.as_str()).filter(|f| Path::new(f).components().count() == 1).collect())
        .unwrap_or_default();
    files.sort_unstable();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Hashes a safetensors file's identity (see the module comment). A file whose header does not
/// parse is hashed by its length and its first and last MiB.
fn hash_weights(h: &mut Sha256, path: &Path) -> std::io::Result<()> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    h.update(len.to_le_bytes());
    let mut read_at = |h: &mut Sha256, at: u64, n: u64| -> std::io::Result<()> {
        let n = n.min(len.saturating_sub(at));
        let mut buf = vec![0u8; n as usize];
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut buf)?;
        h.update(&buf);
        Ok(())
    };
    match tensor_ranges(path, len) {
        Some((header, ranges)) => {
            h.update(&header);
            for (start, end) in ranges {
                read_at(h, start, (end - start).min(TENSOR_SAMPLE))?;
            }
        }
        None => {
            read_at(h, 0, END_SAMPLE)?;
            read_at(h, len.saturating_sub(END_SAMPLE), END_SAMPLE)?;
        }
    }
    Ok(())
}

/// The JSON header of a safetensors file and the absolute byte range of every tensor's data,
/// in file order; `None` when the header is not a valid one for a file of `len` bytes.
fn tensor_ranges(path: &Path, len: u64) -> Option<(Vec<u8>, Vec<(u64, u64)>)> {
    let mut f = File::open(path).ok()?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    let data = 8 + n;
    let mut ranges = Vec::new();
    for (name, t) in v.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let o = t.get("data_offsets")?.as_array()?;
        let (a, b) = (o.first()?.as_u64()?, o.get(1)?.as_u64()?);
        if a > b || b > len - data {
            return None;
        }
        ranges.push((data + a, data + b));
    }
    ranges.sort_unstable();
    Some((header, ranges))
}
