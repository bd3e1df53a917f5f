//! Readers and writers for the JSONL data contracts of DESIGN.md section 4: `jsonl` reads
//! with file:line errors and writes atomically (temp file + fsync + rename) or appends line by
//! line; `records` holds the typed contracts, each keeping the fields it does not know.

pub mod jsonl;
pub mod records;
pub(crate) mod stale;
