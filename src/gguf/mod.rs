//! GGUF reading, dequantization and conversion to a Hugging Face model folder (DESIGN.md
//! section 3): `reader` parses the container, `quant` decodes ggml blocks to f32, `convert`
//! maps names / un-permutes Q,K / writes config + safetensors, `tokenizer` rebuilds
//! `tokenizer.json` from metadata. Used by `ipo import-gguf` and scripts/fetch-default-model.sh.

mod convert;
mod quant;
mod reader;
mod tokenizer;

use std::path::PathBuf;

pub use convert::{hf_tensor_name, import_gguf, unpermute_rows};
pub(crate) use convert::ImportSummary;
pub use quant::{dequantize, GgmlType};
pub use reader::{GgufFile, Value};

/// Everything that can go wrong reading or converting a GGUF; each names the file and,
/// where there is one, the tensor or key, and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: not a GGUF file (magic {found:?}, expected \"GGUF\")", path.display(), found = String::from_utf8_lossy(found))]
    BadMagic { path: PathBuf, found: [u8; 4] },
    #[error("{}: truncated: {what} needs {need} bytes at offset {offset}, but the file has {file_len} bytes", path.display())]
    Truncated { path: PathBuf, what: String, offset: u64, need: u64, file_len: u64 },
    #[error("{}: tensor '{tensor}' has ggml type {type_id} ({type_name}), which is not supported (expected F32, F16, BF16, Q8_0, Q4_0 or Q4_1)", path.display())]
    UnsupportedType { path: PathBuf, tensor: String, type_id: u32, type_name: String },
    #[error("{}: tensor '{tensor}': {reason}", path.display())]
    BadTensor { path: PathBuf, tensor: String, reason: String },
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("{}: missing metadata key '{key}'", path.display())]
    MissingKey { path: PathBuf, key: String },
    #[error("{}: metadata key '{key}' is {found}, expected {expected}", path.display())]
    WrongType { path: PathBuf, key: String, expected: String, found: String },
    #[error("{}: tokenizer: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{}: cannot write output: {reason}", path.display())]
    Output { path: PathBuf, reason: String },
}
