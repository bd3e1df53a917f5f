//! Readers and writers for the JSONL data contracts of DESIGN.md section 4.
