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
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
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
    move |err| JsonlError::Io { path: path.to_path_buf(), err }
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
    objects_of(path, BufReader::new(file))
}

/// A file a killed process may have been appending to, as `read_appended` found it.
pub(crate) struct Appended {
    pub lines: Vec<Line>,
    /// The line number of a last line torn mid-write (no newline, not valid JSON), left out.
    pub torn: Option<usize>,
    /// The file does not end with a newline (torn, or a whole last line without one): append
    /// only after rewriting it.
    pub unterminated: bool,
}

/// `read_objects` for a file that a killed process was appending to (`Appender`): a last line
/// without its newline that is not valid JSON was torn mid-write; it is left out and its line
/// number returned. Every other bad line is an error as usual.
pub(crate) fn read_appended(path: &Path) -> Result<Appended, JsonlError> {
    let text = std::fs::read(path).map_err(io_err(path))?;
    let head = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let tail = &text[head..];
    let torn = !tail.iter().all(u8::is_ascii_whitespace) && serde_json::from_slice::<Map<String, Value>>(tail).is_err();
    let lines = objects_of(path, &text[..if torn { head } else { text.len() }])?;
    let torn = torn.then(|| text[..head].iter().filter(|&&b| b == b'\n').count() + 1);
    Ok(Appended { lines, torn, unterminated: !tail.is_empty() })
}

fn objects_of(path: &Path, r: impl BufRead) -> Result<Vec<Line>, JsonlError> {
    let mut out = Vec::new();
    for (i, line) in r.lines().enumerate() {
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
pub(crate) struct AtomicWriter {
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
                err: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
            })?
            .to_string_lossy()
            .into_owned();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        crate::io::stale::remove_stale(&dir, &|n| n == name);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(Self { path: path.to_path_buf(), tmp, out: Some(BufWriter::new(file)) })
    }

    /// Appends one JSON line.
    pub fn write<T: Serialize + ?Sized>(&mut self, record: &T) -> Result<(), JsonlError> {
        let out = self.out.as_mut().expect("not committed");
        serde_json::to_writer(&mut *out, record)
            .map_err(|e| JsonlError::Io { path: self.tmp.clone(), err: e.into() })?;
        out.write_all(b"\n").map_err(io_err(&self.tmp))
    }

    /// Flushes, fsyncs and renames the temp file over the target (then fsyncs the directory
    /// so the rename itself survives a crash).
    pub(crate) fn commit(mut self) -> Result<(), JsonlError> {
        let out = self.out.take().expect("not committed");
        let file = out.into_inner().map_err(|e| JsonlError::Io { path: self.tmp.clone(), err: e.into_error() })?;
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
pub(crate) fn write_atomic<T: Serialize>(path: &Path, records: impl IntoIterator<Item = T>) -> Result<(), JsonlError> {
    let mut w = AtomicWriter::create(path)?;
    for r in records {
        w.write(&r)?;
    }
    w.commit()
}

/// Appends lines to a file (created if absent), flushing after each, so a crash loses at most
/// the line being written.
pub(crate) struct Appender {
    path: PathBuf,
    file: File,
}

impl Appender {
    pub fn open(path: &Path) -> Result<Self, JsonlError> {
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io_err(path))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn append<T: Serialize + ?Sized>(&mut self, record: &T) -> Result<(), JsonlError> {
        let mut line = serde_json::to_vec(record).map_err(|e| JsonlError::Io { path: self.path.clone(), err: e.into() })?;
        line.push(b'\n');
        // One write call per line: with O_APPEND the line lands whole.
        self.file.write_all(&line).map_err(io_err(&self.path))?;
        self.file.flush().map_err(io_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::records::Pair;
    use serde_json::json;

    #[test]
    fn reads_objects_keeping_order_and_reports_file_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl");
        std::fs::write(&p, "{\"z\": 1, \"a\": {\"q\": 2, \"b\": 3}}\n\n  \n{\"id\": \"2\"}\n").unwrap();
        let lines = read_objects(&p).unwrap();
        assert_eq!(lines.iter().map(|l| l.line).collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!(serde_json::to_string(&lines[0].obj).unwrap(), "{\"z\":1,\"a\":{\"q\":2,\"b\":3}}");

        std::fs::write(&p, "{\"id\": 1}\n{\"id\": \n").unwrap();
        let e = read_objects(&p).unwrap_err().to_string();
        assert!(e.contains("x.jsonl:2: invalid JSON"), "{e}");
        std::fs::write(&p, "{}\n\"str\"\n").unwrap();
        let e = read_objects(&p).unwrap_err().to_string();
        assert!(e.contains("x.jsonl:2: expected a JSON object, found a string"), "{e}");
        let e = read_objects(&dir.path().join("missing.jsonl")).unwrap_err().to_string();
        assert!(e.contains("missing.jsonl"), "{e}");
    }

    #[test]
    fn typed_records_keep_unknown_fields_and_name_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pairs.jsonl");
        let line = json!({"id": "p", "context_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5],
                          "cue": {"sentence": 1, "text": "Sure", "token": 7, "score": 0.5}, "mine": [true]});
        std::fs::write(&p, format!("{line}\n")).unwrap();
        let pairs: Vec<Pair> = read(&p).unwrap();
        assert_eq!(pairs[0].rejected_ids, vec![4, 5]);
        assert_eq!(pairs[0].extra["mine"], json!([true]));
        assert_eq!(pairs[0].cue.as_ref().unwrap().extra["score"], json!(0.5));
        // Round trip keeps every field.
        let back = serde_json::to_value(&pairs[0]).unwrap();
        for (k, v) in line.as_object().unwrap() {
            assert_eq!(&back[k], v, "{k}");
        }
        std::fs::write(&p, format!("{line}\n{{\"id\": \"q\", \"context_ids\": [1], \"chosen_ids\": [2]}}\n")).unwrap();
        let e = read::<Pair>(&p).unwrap_err().to_string();
        assert!(e.contains("pairs.jsonl:2") && e.contains("rejected_ids"), "{e}");
    }

    #[test]
    fn atomic_writer_replaces_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.jsonl");
        std::fs::write(&p, "old\n").unwrap();
        {
            let mut w = AtomicWriter::create(&p).unwrap();
            w.write(&json!({"a": 1})).unwrap();
            // Dropped without commit: the old file stays, the temp file goes.
        }
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "old\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_atomic(&p, [json!({"a": 1}), json!({"b": [2]})]).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n{\"b\":[2]}\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let e = AtomicWriter::create(&dir.path().join("no/such/dir.jsonl")).err().unwrap().to_string();
        assert!(e.contains("no/such"), "{e}");
    }

    #[test]
    fn read_appended_drops_only_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        std::fs::write(&p, "{\"a\": 1}\n{\"b\": [2, 3").unwrap();
        let r = read_appended(&p).unwrap();
        assert_eq!((r.lines.len(), r.torn, r.unterminated), (1, Some(2), true));
        std::fs::write(&p, "{\"a\": 1}\n{\"b\": 2}").unwrap();
        let r = read_appended(&p).unwrap();
        assert_eq!((r.lines.len(), r.torn, r.unterminated), (2, None, true));
        std::fs::write(&p, "{\"a\": 1}\n").unwrap();
        let r = read_appended(&p).unwrap();
        assert_eq!((r.lines.len(), r.torn, r.unterminated), (1, None, false));
        // A bad line that is not the last, or ends with its newline, is still an error.
        std::fs::write(&p, "{\"a\": \n{\"b\": 2}\n").unwrap();
        assert!(read_appended(&p).err().unwrap().to_string().contains("r.jsonl:1"));
        std::fs::write(&p, "{\"a\": 1}\n{\"b\": \n").unwrap();
        assert!(read_appended(&p).err().unwrap().to_string().contains("r.jsonl:2"));
    }

    #[test]
    fn appender_appends_flushed_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut a = Appender::open(&p).unwrap();
        a.append(&json!({"step": 1})).unwrap();
        // Visible before the appender is dropped.
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"step\":1}\n");
        drop(a);
        let mut a = Appender::open(&p).unwrap();
        a.append(&json!({"step": 2})).unwrap();
        assert_eq!(read_objects(&p).unwrap().len(), 2);
    }
}
