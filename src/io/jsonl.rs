//! JSONL files, one JSON object per line. Reading keeps each object whole (unknown fields and
//! their order are preserved: serde_json's `preserve_order`) and rejects a malformed line with
//! `file:line: reason`. Writing is atomic (`AtomicWriter`: a temp file in the same directory,
//! fsync'd, then renamed over the target, so a reader never sees half a file) or appends one
//! flushed line at a time (`Appender`, for logs such as metrics.jsonl).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A line that is not a JSON object or does not fit the expected record.
    #[error("{path}:{line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
}

impl JsonlError {
    pub fn line(path: &Path, line: usize, reason: impl Into<String>) -> Self {
        JsonlError::Line { path: path.to_path_buf(), line, reason: reason.into() }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> JsonlError + '_ {
    move |source| JsonlError::Io { path: path.to_path_buf(), source }
}

/// One object of a JSONL file with its 1-based line number.
#[derive(Clone, Debug)]
pub struct Line {
    pub line: usize,
    pub obj: Map<String, Value>,
}

impl Line {
    /// Decodes the object as `T`; an error names `path:line` and what did not fit.
    pub fn parse<T: DeserializeOwned>(&self, path: &Path) -> Result<T, JsonlError> {
        // One copy of the record (small next to the work done per record).
        T::deserialize(Value::Object(self.obj.clone()))
            .map_err(|e| JsonlError::line(path, self.line, e.to_string()))
    }
}

/// Reads every non-blank line of `path` as a JSON object.
pub fn read_objects(path: &Path) -> Result<Vec<Line>, JsonlError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| JsonlError::line(path, n, format!("cannot read line: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(obj)) => out.push(Line { line: n, obj }),
            Ok(other) => {
                let kind = match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    Value::Bool(_) => "a boolean",
                    _ => "null",
                };
                return Err(JsonlError::line(path, n, format!("expected a JSON object, found {kind}")));
            }
            Err(e) => return Err(JsonlError::line(path, n, format!("invalid JSON: {e}"))),
        }
    }
    Ok(out)
}

/// Reads every non-blank line of `path` as a `T`, with `file:line` errors.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, JsonlError> {
    read_objects(path)?.iter().map(|l| l.parse(path)).collect()
}

/// Writes `path` all at once or not at all: lines go to `.<name>.tmp-<pid>` beside it, and
/// `commit` fsyncs and renames. Dropped without `commit`, the temp file is removed.
pub struct AtomicWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicWriter {
    pub fn create(path: &Path) -> Result<Self, JsonlError> {
        let name = path
            .file_name()
            .ok_or_else(|| JsonlError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
            })?
            .to_string_lossy()
            .into_owned();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(Self { path: path.to_path_buf(), tmp, out: Some(BufWriter::new(file)) })
    }

    /// Appends one JSON line.
    pub fn write<T: Serialize + ?Sized>(&mut self, record: &T) -> Result<(), JsonlError> {
        let out = self.out.as_mut().expect("not committed");
        serde_json::to_writer(&mut *out, record)
            .map_err(|e| JsonlError::Io { path: self.tmp.clone(), source: e.into() })?;
        out.write_all(b"\n").map_err(io_err(&self.tmp))
    }

    /// Flushes, fsyncs and renames the temp file over the target (then fsyncs the directory
    /// so the rename itself survives a crash).
    pub fn commit(mut self) -> Result<(), JsonlError> {
        let out = self.out.take().expect("not committed");
        let file = out.into_inner().map_err(|e| JsonlError::Io { path: self.tmp.clone(), source: e.into_error() })?;
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Best effort: not every platform can open a directory for fsync.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for AtomicWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `records` to `path` atomically, one JSON object per line.
pub fn write_atomic<T: Serialize>(path: &Path, records: impl IntoIterator<Item = T>) -> Result<(), JsonlError> {
    let mut w = AtomicWriter::create(path)?;
    for r in records {
        w.write(&r)?;
    }
    w.commit()
}

/// Appends lines to a file (created if absent), flushing after each, so a crash loses at most
/// the line being written.
pub struct Appender {
    path: PathBuf,
    file: File,
}

impl Appender {
    pub fn open(path: &Path) -> Result<Self, JsonlError> {
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io_err(path))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn append<T: Serialize + ?Sized>(&mut self, record: &T) -> Result<(), JsonlError> {
        let mut line = serde_json::to_vec(record).map_err(|e| JsonlError::Io { path: self.path.clone(), source: e.into() })?;
        line.push(b'\n');
        // One write call per line: with O_APPEND the line lands whole.
        self.file.write_all(&line).map_err(io_err(&self.path))?;
        self.file.flush().map_err(io_err(&self.path))
    }
}
