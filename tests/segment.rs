//! Sentence segmentation (intervene, Algorithm 1 step 2): a table of tricky texts with the
//! expected sentences (abbreviations, decimals, lists, newlines, quotes, code), and, with the
//! default model's tokenizer, the token index of each sentence start checked against an
//! independent prefix-decoding computation, including sampled ids that are not the
//! canonical tokenization and completions with think tags and EOS. A 50k-token rollout whose
//! ids are not the canonical tokenization segments in linear time (issue 16, item 5).

mod common;

use common::{byte_tokenizer_json, default_model};
use ipo::intervene::segment::{segment_completion, split_sentences, token_at};
use ipo::model::tokenizer::Tokenizer;

fn sentences(t: &str) -> Vec<&str> {
    split_sentences(t).into_iter().map(|r| &t[r]).collect()
}

#[test]
fn tricky_texts_split_where_expected() {
    let table: &[(&str, &[&str])] = &[
        ("First, I note the request. Then I act.", &["First, I note the request.", "Then I act."]),
        (
            "Use a solvent, e.g. acetone. Dr. Smith agrees. It costs approx. 5 dollars, i.e. cheap.",
            &["Use a solvent, e.g. acetone.", "Dr. Smith agrees.", "It costs approx. 5 dollars, i.e. cheap."],
        ),
        (
            "The value is 3.14 and rises to 2.5. Next step is 10.0% higher.",
            &["The value is 3.14 and rises to 2.5.", "Next step is 10.0% higher."],
        ),
        (
            "Here is the plan:\n1. Gather the items.\n2. Mix them.\n\n3. Wait 2.5 hours. Then stop.",
            &["Here is the plan:", "1. Gather the items.", "2. Mix them.", "3. Wait 2.5 hours.", "Then stop."],
        ),
        (
            "Options:\n- First option\n- Second option. It is good.\n* Third\n• Fourth",
            &["Options:", "- First option", "- Second option.", "It is good.", "* Third", "• Fourth"],
        ),
        (
            "This sentence is wrapped\nacross two lines. Next one.",
            &["This sentence is wrapped\nacross two lines.", "Next one."],
        ),
        (
            "He said \"Stop. Now.\" Then he left. She replied “Fine. Go.” Okay.",
            &["He said \"Stop. Now.\"", "Then he left.", "She replied “Fine. Go.”", "Okay."],
        ),
        ("Run `echo A. B` now. Done.", &["Run `echo A. B` now.", "Done."]),
        (
            "Use this:\n```python\nimport os. X\nos.kill(1)\n```\nThat is all.",
            &["Use this:", "```python\nimport os. X\nos.kill(1)\n```", "That is all."],
        ),
        ("Okay.\n\n\nSo the user wants X\n\nI will help", &["Okay.", "So the user wants X", "I will help"]),
        ("Hmm... What now? Well! fine.", &["Hmm...", "What now?", "Well! fine."]),
        (
            "J. R. R. Tolkien wrote it in the U.S. in 1937. Really.",
            &["J. R. R. Tolkien wrote it in the U.S. in 1937.", "Really."],
        ),
        ("  Hello world.  \n", &["Hello world."]),
        ("**Step 1.** Buy it. (Then go.) Next.", &["**Step 1.**", "Buy it.", "(Then go.)", "Next."]),
        ("Line one\nLine two", &["Line one", "Line two"]),
        ("", &[]),
    ];
    for (text, want) in table {
        assert_eq!(sentences(text), *want, "text: {text:?}");
        // Ranges are in order, trimmed and non-overlapping.
        let r = split_sentences(text);
        for w in r.windows(2) {
            assert!(w[0].end <= w[1].start, "{text:?}: {r:?}");
        }
    }
}

#[test]
fn token_at_picks_the_token_holding_a_byte() {
    // Tokens start at bytes 0, 3, 3 (zero-width), 7.
    let starts = [0, 3, 3, 7];
    assert_eq!(token_at(&starts, 0), 0);
    assert_eq!(token_at(&starts, 2), 0);
    assert_eq!(token_at(&starts, 3), 2);
    assert_eq!(token_at(&starts, 6), 2);
    assert_eq!(token_at(&starts, 99), 3);
}

/// The token holding byte `pos` of decode(ids), by decoding growing prefixes.
fn token_by_prefix_decoding(tok: &Tokenizer, ids: &[u32], pos: usize) -> usize {
    let mut h = 0;
    for i in 1..=ids.len() {
        let p = tok.decode(&ids[..i], false).unwrap();
        if p.len() <= pos && !p.ends_with('\u{FFFD}') {
            h = i;
        }
    }
    h.min(ids.len() - 1)
}

fn check(tok: &Tokenizer, ids: &[u32], eos: &[u32], want: &[&str]) {
    let seg = segment_completion(tok, ids, eos).unwrap();
    let got: Vec<&str> = seg.sentences.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(got, want);
    for (k, s) in seg.sentences.iter().enumerate() {
        assert_eq!(&seg.text[s.start..s.end], s.text);
        let content = ids.len() - ids.iter().rev().take_while(|i| eos.contains(i)).count();
        assert_eq!(s.token, token_by_prefix_decoding(tok, &ids[..content], s.start), "sentence {k} {:?}", s.text);
        // Cutting at the token drops exactly lead + the sentence onwards.
        let kept = tok.decode(&ids[..s.token], false).unwrap();
        let dropped = tok.decode(&ids[s.token..content], false).unwrap();
        assert_eq!(format!("{kept}{dropped}"), seg.text);
        assert!(dropped.starts_with(&format!("{}{}", seg.lead(k), s.text)), "{dropped:?} vs {:?}", s.text);
        assert!(seg.lead(k).trim().is_empty(), "lead {:?}", seg.lead(k));
    }
}

#[test]
fn sentence_tokens_on_the_default_tokenizer() {
    let Some(dir) = default_model() else { return };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let eos = tok.eos_ids().to_vec();
    assert!(!eos.is_empty());

    // Canonical ids (the offsets path), with the EOS id at the end.
    let text = "Sure. I'll start by listing the materials needed.\n\n1. Get a bottle (e.g. 2.5 L).\n2. Fill it. Dr. Who said \"Go. Now.\" Then café time.";
    let mut ids = tok.encode(text, false).unwrap();
    ids.push(eos[0]);
    let want = [
        "Sure.",
        "I'll start by listing the materials needed.",
        "1. Get a bottle (e.g. 2.5 L).",
        "2. Fill it.",
        "Dr. Who said \"Go. Now.\"",
        "Then café time.",
    ];
    check(&tok, &ids, &eos, &want);
    let seg = segment_completion(&tok, &ids, &eos).unwrap();
    assert!(seg.offsets_from_encoding);
    assert_eq!(seg.lead(1), " ");
    assert_eq!(seg.lead(2), "");

    // Non-canonical ids (pieces tokenized apart): the prefix-decoding path.
    let mut ids = tok.encode("Sure. I'", false).unwrap();
    ids.extend(tok.encode("ll start now. Then", false).unwrap());
    ids.extend(tok.encode(" go.", false).unwrap());
    let seg = segment_completion(&tok, &ids, &eos).unwrap();
    assert!(!seg.offsets_from_encoding, "the test needs a non-canonical tokenization");
    check(&tok, &ids, &eos, &["Sure.", "I'll start now.", "Then go."]);

    // Only the reasoning of a think-tag completion is split.
    let ids = tok.encode("<think>\nOkay. I will help.\n</think>\nAnswer. More.", false).unwrap();
    check(&tok, &ids, &eos, &["Okay.", "I will help."]);
}

/// The start of every token of `ids` as the old fallback computed it: the length of the
/// decoded prefix before it, when that prefix is a prefix of the whole text (O(n^2)).
fn starts_by_prefix_decoding(tok: &Tokenizer, ids: &[u32]) -> Vec<usize> {
    let text = tok.decode(ids, false).unwrap();
    let mut last = 0;
    (0..ids.len())
        .map(|i| {
            let p = tok.decode(&ids[..i], false).unwrap();
            if text.starts_with(&p) && p.len() >= last {
                last = p.len();
            }
            last
        })
        .collect()
}

/// A rollout with a lone invalid byte (0xFF) and a split multi-byte character: decoding gives
/// U+FFFD, which re-encodes to other ids, so token starts cannot come from re-encoding. The
/// old fallback decoded every growing prefix: 98 s for 50k tokens of the default model. Now
/// it is one pass; it must agree with the prefix decoding on a short input and take well
/// under a second for 50k tokens.
#[test]
fn long_non_canonical_rollout_segments_in_linear_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, byte_tokenizer_json().to_string()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    let ids_of = |s: &str| s.bytes().map(u32::from).collect::<Vec<u32>>();

    let mut short = ids_of("Sure. I'll start now.\nThen caf\u{e9} time. ");
    short.push(0xFF);
    short.extend(ids_of(" Next one. Done. "));
    short.push(0xC3); // the first byte of a two-byte character, and then another sentence
    short.extend(ids_of(" Last."));
    let seg = segment_completion(&tok, &short, &[]).unwrap();
    assert!(!seg.offsets_from_encoding, "the test needs ids that re-encode differently");
    assert_eq!(seg.token_start, starts_by_prefix_decoding(&tok, &short));
    let got: Vec<&str> = seg.sentences.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(got, ["Sure.", "I'll start now.", "Then caf\u{e9} time.", "\u{fffd} Next one.", "Done.", "\u{fffd} Last."]);

    let line = "Sure. I'll start by listing the materials needed. Then caf\u{e9} time.\n";
    let mut long = ids_of(&line.repeat(50_000 / line.len()));
    long.insert(long.len() / 2, 0xFF);
    assert!(long.len() >= 49_000);
    let t0 = std::time::Instant::now();
    let seg = segment_completion(&tok, &long, &[]).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert!(!seg.offsets_from_encoding);
    assert!(secs < 5.0, "segmenting {} tokens took {secs:.1} s", long.len());
    assert_eq!(seg.sentences.len(), 3 * (50_000 / line.len()));
    // Spot checks against the prefix decoding: cutting at a sentence's token keeps the text
    // before it.
    for k in [0, 1, seg.sentences.len() / 2, seg.sentences.len() - 1] {
        let s = &seg.sentences[k];
        let kept = tok.decode(&long[..s.token], false).unwrap();
        assert!(kept.len() <= s.start && seg.text.starts_with(&kept), "sentence {k}");
        assert_eq!(kept.len(), seg.token_start[s.token]);
        assert!(seg.text[kept.len()..s.start].trim().is_empty(), "sentence {k}");
    }
}
