//! GGUF v2/v3 container reader: header, metadata key/values (all types, arrays included),
//! tensor infos and the aligned data section, over a read-only mmap of the file.
//! Layout (little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
//! kv_count x (string key, u32 type, value), tensor_count x (string name, u32 n_dims,
//! n_dims x u64 dims (innermost first), u32 ggml type, u64 offset), pad to alignment, data.
//!
//! The file may be hostile: every count and size read from it is checked (checked arithmetic,
//! against the bytes left in the file and a sane maximum) before anything is allocated for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::quant::GgmlType;
use super::GgufError;

/// One metadata value, as typed in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    /// The value as a float, if it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Most metadata entries a file may have (real files have a few dozen).
const MAX_METADATA_ENTRIES: u64 = 1 << 16;
/// Most metadata values, array elements included, a file may hold (the largest real
/// vocabularies are ~260k tokens, each with a type and a score): 2^24 values of 32 bytes
/// bound the metadata's memory at 512 MiB whatever the file says.
const MAX_METADATA_VALUES: u64 = 1 << 24;
/// Most tensors a file may have (a 405B llama has ~1.1k).
const MAX_TENSORS: u64 = 1 << 20;
/// Fewest bytes one tensor info takes: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Fewest bytes a metadata value of type `ty` takes in the file (1 for an unknown type, which
/// is an error when read).
fn min_value_bytes(ty: u32) -> u64 {
    match ty {
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8, // a string: its u64 length
        9 => 4 + 8,       // an array: element type and count
        _ => 1,
    }
}

/// Where one tensor lives in the file and what it holds. `open` guarantees 1 to 8 dims, none
/// zero, and an element and byte count that fit (no overflow) inside the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: innermost (contiguous) dimension first. The row-major (HF) shape is
    /// this reversed.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset from the start of the file.
    pub offset: usize,
    /// Bytes of encoded data.
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
    /// Row-major shape, outermost first (as PyTorch / safetensors list it).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened GGUF file: parsed header, metadata and tensor table over an mmap of the data.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: usize,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    mmap: memmap2::Mmap,
}

/// Bounds-checked little-endian cursor over the header bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata values that may still be read (of [`MAX_METADATA_VALUES`]).
    values_left: u64,
}

impl<'a> Cursor<'a> {
    fn bytes_left(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    /// Checks that `n` items of at least `min_bytes` each can follow, and that `n` is at most
    /// `max`, before anything is allocated for them.
    fn check_count(&self, what: &str, n: u64, min_bytes: u64, max: u64) -> Result<(), GgufError> {
        let need = n.saturating_mul(min_bytes);
        if need > self.bytes_left() {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} ({n} elements, at least {min_bytes} bytes each)"),
                offset: self.pos as u64,
                need,
                file_len: self.buf.len() as u64,
            });
        }
        if n > max {
            return Err(GgufError::Format {
                path: self.path.to_path_buf(),
                reason: format!("{what}: {n} elements, more than the {max} this reader accepts"),
            });
        }
        Ok(())
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: self.pos as u64,
                need: n as u64,
                file_len: self.buf.len() as u64,
            }),
        }
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let bytes = self.take(n, what)?;
        // Lossy: a few GGUF vocabularies hold invalid UTF-8 pieces; keep going rather than fail.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, GgufError> {
        let what = format!("value of metadata key '{key}'");
        let w = what.as_str();
        Ok(match ty {
            0 => Value::U8(self.take(1, w)?[0]),
            1 => Value::I8(self.take(1, w)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, w)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2, w)?.try_into().unwrap())),
            4 => Value::U32(self.u32(w)?),
            5 => Value::I32(self.u32(w)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(w)?)),
            7 => Value::Bool(self.take(1, w)?[0] != 0),
            8 => Value::Str(self.string(w)?),
            9 => {
                if depth >= 4 {
                    return Err(GgufError::Format {
                        path: self.path.to_path_buf(),
                        reason: format!("metadata key '{key}' nests arrays deeper than 4 levels"),
                    });
                }
                let elem_ty = self.u32(w)?;
                let n = self.u64(w)?;
                // Bounded by the file and by the values budget before a single slot is reserved.
                let what = format!("array of metadata key '{key}'");
                self.check_count(&what, n, min_value_bytes(elem_ty), self.values_left)?;
                self.values_left -= n;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(w)?),
            11 => Value::I64(self.u64(w)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(w)?)),
            other => {
                return Err(GgufError::Format {
                    path: self.path.to_path_buf(),
                    reason: format!(
                        "metadata key '{key}' has unknown value type {other} (expected 0..=12)"
                    ),
                })
            }
        })
    }
}

impl GgufFile {
    /// Open and parse a GGUF file. Tensor data stays in the mmap until asked for.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io = |err| GgufError::Io { path: path.to_path_buf(), err };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; the file is not expected to change while we read it.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let mut c = Cursor { buf: &mmap, pos: 0, path, values_left: MAX_METADATA_VALUES };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(GgufError::BadMagic { path: path.to_path_buf(), found: magic.try_into().unwrap() });
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::Format {
                path: path.to_path_buf(),
                reason: format!("GGUF version {version} is not supported (expected 2 or 3; a huge value means a big-endian file)"),
            });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // An entry is at least a key length, a type and one byte of value.
        c.check_count("metadata entries", n_kv, 8 + 4 + 1, MAX_METADATA_ENTRIES)?;
        c.values_left -= n_kv;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("key of metadata entry {i}"))?;
            let ty = c.u32(&format!("type of metadata key '{key}'"))?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a as usize,
                _ => {
                    return Err(GgufError::Format {
                        path: path.to_path_buf(),
                        reason: format!("general.alignment = {v:?}, expected a power of two"),
                    })
                }
            },
        };
        c.check_count("tensor table", n_tensors, MIN_TENSOR_INFO_BYTES, MAX_TENSORS)?;
        let mut raw = Vec::new();
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor {i}"))?;
            let bad = |reason: String| GgufError::BadTensor { path: path.to_path_buf(), tensor: name.clone(), reason };
            if !names.insert(name.clone()) {
                return Err(bad("appears twice in the tensor table".into()));
            }
            let what = format!("info of tensor '{name}'");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > 8 {
                return Err(bad(format!("{n_dims} dimensions (expected 1 to 8)")));
            }
            let dims = (0..n_dims).map(|_| c.u64(&what)).collect::<Result<Vec<_>, _>>()?;
            if let Some(k) = dims.iter().position(|&d| d == 0) {
                return Err(bad(format!("dimension {k} is 0 (dims {dims:?}, innermost first)")));
            }
            let ty_id = c.u32(&what)?;
            let offset = c.u64(&what)?;
            raw.push((name, dims, ty_id, offset));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let file_len = mmap.len();
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty_id, rel) in raw {
            let bad = |reason: String| GgufError::BadTensor { path: path.to_path_buf(), tensor: name.clone(), reason };
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| GgufError::UnsupportedType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                type_id: ty_id,
                type_name: GgmlType::name_of_id(ty_id),
            })?;
            let n: u64 = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(|| bad(format!("dims {dims:?} overflow")))?;
            let (block, bytes) = ty.block();
            if dims.first().copied().unwrap_or(1) % block as u64 != 0 {
                return Err(bad(format!("innermost dimension {} is not a multiple of the {:?} block size {block}", dims[0], ty)));
            }
            let n_bytes = (n / block as u64)
                .checked_mul(bytes as u64)
                .ok_or_else(|| bad(format!("dims {dims:?}: the byte count of {n} {ty:?} elements overflows")))?;
            if rel % alignment as u64 != 0 {
                return Err(bad(format!("data offset {rel} is not a multiple of the alignment {alignment}")));
            }
            let start = (data_start as u64).checked_add(rel).ok_or_else(|| bad(format!("data offset {rel} overflows")))?;
            if start.checked_add(n_bytes).is_none_or(|e| e > file_len as u64) {
                return Err(GgufError::Truncated {
                    path: path.to_path_buf(),
                    what: format!("data of tensor '{name}' ({ty:?}, dims {dims:?})"),
                    offset: start,
                    need: n_bytes,
                    file_len: file_len as u64,
                });
            }
            tensors.push(TensorInfo { name, dims, ty, offset: start as usize, n_bytes: n_bytes as usize });
        }
        Ok(GgufFile { path: path.to_path_buf(), version, alignment, metadata, tensors, mmap })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The encoded bytes of a tensor (bounds were checked at open).
    pub(crate) fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.offset..t.offset + t.n_bytes]
    }

    /// Dequantize a tensor to f32, row-major in [`TensorInfo::shape`].
    pub fn tensor_f32(&self, t: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let mut out = vec![0f32; t.n_elements()];
        super::quant::dequantize(t.ty, self.tensor_bytes(t), &mut out).map_err(|reason| {
            GgufError::BadTensor { path: self.path.clone(), tensor: t.name.clone(), reason }
        })?;
        Ok(out)
    }

    /// A required metadata key, with an error that names the file and key.
    pub(crate) fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.to_string() })
    }

    /// A required unsigned integer key.
    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| self.wrong_type(key, "an unsigned integer", v))
    }

    /// A required string key.
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    pub(crate) fn wrong_type(&self, key: &str, expected: &str, v: &Value) -> GgufError {
        let mut found = format!("{v:?}");
        found.truncate(80);
        GgufError::WrongType { path: self.path.clone(), key: key.to_string(), expected: expected.to_string(), found }
    }
}
