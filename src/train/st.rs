//! Small file helpers for checkpoints and outputs: an f32 safetensors writer (HF/PEFT layout,
//! `{"format": "pt"}` metadata), a reader of F32/F16/BF16 tensors into f32, and fsync'd writes.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::TrainError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io(format!("{}: {e}", path.display()))
}

/// Writes `bytes` to `path` and fsyncs it.
pub(crate) fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Writes `(name, shape, data)` tensors as an f32 safetensors file, in the given order.
pub(crate) fn write_f32_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<(), TrainError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    for (name, shape, data) in tensors {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
        let end = off + 4 * data.len();
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, end]}));
        off = end;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + off);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, _, data) in tensors {
        for x in data {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    write_file_synced(path, &out)
}

/// Every tensor of a safetensors file as `name -> (shape, f32 data)` (F32, F16 or BF16).
pub(crate) fn read_f32_tensors(path: &Path) -> Result<HashMap<String, (Vec<usize>, Vec<f32>)>, TrainError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    let mut out = HashMap::new();
    for (name, t) in st.tensors() {
        let d = t.data();
        let data: Vec<f32> = match t.dtype() {
            Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F16 => d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(TrainError::Checkpoint(format!("{}: tensor {name} has dtype {other:?}, expected F32/F16/BF16", path.display())))
            }
        };
        out.insert(name, (t.shape().to_vec(), data));
    }
    Ok(out)
}
