//! Sentence segmentation of a rollout's reasoning (Algorithm 1, step 2), and the map from a
//! sentence to the token index where the rollout is cut (step 3). Splitting is rule-based and
//! tuned to model output: abbreviations ("e.g.", "Dr."), decimals, numbered and bulleted
//! lists, soft-wrapped vs hard newlines, quotes, inline code spans and fenced code blocks.
//! Token positions come from the tokenizer's byte offsets of the decoded completion (or, when
//! re-encoding does not reproduce the sampled ids, from decoding short windows of ids): linear
//! in the completion's length.

use std::ops::Range;

use crate::model::chat::split_reasoning;
use crate::model::tokenizer::{Tokenizer, TokenizerError};

/// One sentence of a completion's reasoning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sentence {
    /// The sentence, trimmed of surrounding whitespace.
    pub text: String,
    /// Byte range of `text` in the decoded completion.
    pub start: usize,
    pub end: usize,
    /// Index (into the completion ids) of the token that holds the sentence's first byte:
    /// the rollout is cut there (ids `[..token]` are kept).
    pub token: usize,
}

/// A completion split into sentences.
#[derive(Clone, Debug)]
pub struct Segmented {
    /// The completion decoded (special tokens kept, trailing EOS ids left out).
    pub text: String,
    /// `token_start[i]` = first byte of token `i` in `text` (`[n_content]`, non-decreasing).
    pub token_start: Vec<usize>,
    /// Sentences of the reasoning part, in order.
    pub sentences: Vec<Sentence>,
    /// True when the offsets came from re-encoding the text (false: decoding windows).
    pub offsets_from_encoding: bool,
}

impl Segmented {
    /// The text between the start of the cut token and the sentence start (usually a space
    /// or nothing): it is dropped with the cut, so the inserted trigger is prefixed with it.
    pub fn lead(&self, sentence: usize) -> &str {
        let s = &self.sentences[sentence];
        let from = self.token_start.get(s.token).copied().unwrap_or(s.start).min(s.start);
        &self.text[from..s.start]
    }
}

/// Segments a completion given as ids (`completion_ids`, prompt excluded). Trailing ids in
/// `eos_ids` are not part of the text. Only the reasoning (text before `</think>`, all of it
/// for models without think tags) is split.
pub fn segment_completion(
    tok: &Tokenizer,
    completion_ids: &[u32],
    eos_ids: &[u32],
) -> Result<Segmented, TokenizerError> {
    let mut n = completion_ids.len();
    while n > 0 && eos_ids.contains(&completion_ids[n - 1]) {
        n -= 1;
    }
    let ids = &completion_ids[..n];
    let text = tok.decode(ids, false)?;
    let (token_start, from_enc) = token_starts(tok, ids, &text)?;
    let (reasoning, _) = split_reasoning(&text);
    let base = reasoning.as_ptr() as usize - text.as_ptr() as usize;
    let sentences = split_sentences(reasoning)
        .into_iter()
        .map(|r| {
            let (start, end) = (base + r.start, base + r.end);
            Sentence { text: text[start..end].to_string(), start, end, token: token_at(&token_start, start) }
        })
        .collect();
    Ok(Segmented { text, token_start, sentences, offsets_from_encoding: from_enc })
}

/// The index of the token holding byte `pos`: the last token starting at or before it.
pub fn token_at(token_start: &[usize], pos: usize) -> usize {
    token_start.partition_point(|&s| s <= pos).saturating_sub(1)
}

/// First byte of every token of `ids` in `text` (= decode(ids)). Token i covers
/// `[start_i, start_{i+1})`. Uses the tokenizer's offsets when encoding `text` gives back
/// `ids` (starts are the running max of previous token ends, which is robust to trimmed
/// offsets and to characters split over several byte-level tokens); otherwise
/// `starts_by_decoding` (ids sampled in a non-canonical tokenization).
fn token_starts(tok: &Tokenizer, ids: &[u32], text: &str) -> Result<(Vec<usize>, bool), TokenizerError> {
    let (enc, offsets) = tok.encode_with_offsets(text, false)?;
    if enc == ids {
        let mut starts = Vec::with_capacity(ids.len());
        let mut end = 0usize;
        for (s, e) in offsets {
            starts.push(end.min(s.max(end)));
            end = end.max(e);
        }
        // The first token starts at 0 whatever its trimmed offset says.
        if let Some(f) = starts.first_mut() {
            *f = 0;
        }
        return Ok((starts, true));
    }
    Ok((starts_by_decoding(tok, ids, text)?, false))
}

/// Most tokens a decoding window may span before the ids resynchronise with the text.
const MAX_WINDOW: usize = 256;

/// Token starts by decoding, in one pass. The start of token i is the length of
/// decode(ids[..i]) when that is a prefix of `text` (else the previous start: a prefix that
/// ends inside a multi-byte character decodes to U+FFFD, and the character belongs to the
/// earlier token). Decoding the whole prefix for every token is O(n^2) (98 s for 50k tokens);
/// decoding is local, so this decodes a window instead: from the anchor before last (the
/// one-segment context that keeps SentencePiece's leading space and split characters right)
/// to token i, and adds what the window decodes to beyond its context at the anchor's offset.
/// The anchor moves to i whenever that text matches `text` there. O(n * window); a window
/// that never matches again in MAX_WINDOW tokens is an error, not a quadratic search.
fn starts_by_decoding(tok: &Tokenizer, ids: &[u32], text: &str) -> Result<Vec<usize>, TokenizerError> {
    let mut starts = Vec::with_capacity(ids.len());
    let (mut ctx, mut anchor, mut anchor_at) = (0usize, 0usize, 0usize); // ids[ctx..anchor] decode to ctx_text
    let mut ctx_text = String::new(); // ... which ends at byte anchor_at of text
    let mut last = 0usize;
    for i in 0..ids.len() {
        if i > anchor {
            let window = tok.decode(&ids[ctx..i], false)?;
            let added = window.strip_prefix(ctx_text.as_str());
            if let Some(added) = added.filter(|a| text[anchor_at..].starts_with(a)) {
                let at = anchor_at + added.len();
                last = last.max(at);
                ctx_text = tok.decode(&ids[anchor..i], false)?;
                (ctx, anchor, anchor_at) = (anchor, i, at);
            } else if i - ctx > MAX_WINDOW {
                return Err(TokenizerError::Encode(format!(
                    "cannot map tokens {anchor}..{i} of the completion to its decoded text (decoding them does not extend the text before them)"
                )));
            }
        }
        starts.push(last);
    }
    Ok(starts)
}

/// Abbreviations after which a period does not end a sentence (lower case, with the dot).
const ABBREVIATIONS: &[&str] = &[
    "e.g.", "i.e.", "dr.", "mr.", "mrs.", "ms.", "prof.", "st.", "vs.", "cf.", "fig.", "no.", "approx.", "jr.",
    "sr.", "inc.", "ltd.", "co.", "mt.", "etc.,", "al.", "eq.", "vol.", "p.", "pp.", "ca.", "est.", "dept.",
];

fn is_open_quote(c: char) -> bool {
    matches!(c, '“' | '«')
}
fn is_close_quote(c: char) -> bool {
    matches!(c, '”' | '»')
}
fn is_closer(c: char) -> bool {
    matches!(c, '"' | '\'' | '”' | '’' | ')' | ']' | '»' | '*' | '_')
}
fn is_terminal(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '。' | '！' | '？')
}

/// A list marker or heading at the start of a (trimmed) line: "- ", "* ", "• ", "1. ", "2) ",
/// "a) ", "# ". Returns its length in bytes (marker and the following spaces).
fn list_marker(line: &str) -> Option<usize> {
    let b = line.as_bytes();
    let spaces_after = |i: usize| -> Option<usize> {
        let rest = &line[i..];
        let n = rest.len() - rest.trim_start_matches([' ', '\t']).len();
        (n > 0 || rest.is_empty()).then_some(i + n)
    };
    if line.starts_with("• ") {
        return spaces_after("•".len());
    }
    match b.first()? {
        b'-' | b'*' | b'+' => spaces_after(1),
        b'#' => spaces_after(line.len() - line.trim_start_matches('#').len()),
        b'0'..=b'9' => {
            let d = line.len() - line.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            match b.get(d) {
                Some(b'.') | Some(b')') if d <= 3 => spaces_after(d + 1),
                _ => None,
            }
        }
        c if c.is_ascii_alphabetic() && matches!(b.get(1), Some(b')')) => spaces_after(2),
        _ => None,
    }
}

/// Splits `text` into sentence byte ranges (trimmed, non-empty, in order).
///
/// - A fenced code block (``` ... ```) is one sentence.
/// - A blank line ends a sentence; so does a newline, unless the line before ends without
///   terminal punctuation or colon and the next starts in lower case (a soft wrap).
///   A line starting with a list marker (`-`, `*`, `•`, `1.`, `2)`, `#`) starts a sentence.
/// - Inside a line: `.`, `!`, `?`, `…` (runs of them, plus closing quotes/brackets) followed by
///   whitespace end a sentence, unless the next word starts in lower case, the period ends an
///   abbreviation ("e.g.", "Dr.", "U.S."), an initial ("J."), or a list number ("1."), or the
///   mark is inside an inline code span or a double-quoted passage on the same line (a quote
///   that closes right after the mark still ends the sentence).
pub fn split_sentences(text: &str) -> Vec<Range<usize>> {
    let mut units: Vec<Range<usize>> = Vec::new(); // hard-separated chunks of text
    let mut fence_start: Option<usize> = None;
    let mut cur: Option<Range<usize>> = None; // the running unit of joined lines
    let mut prev_line_end_char: Option<char> = None;
    let mut pos = 0usize;
    for raw in text.split_inclusive('\n') {
        let line_start = pos;
        pos += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);
        let trimmed = line.trim();
        let lead = line.len() - line.trim_start().len();
        let content = line_start + lead..line_start + lead + trimmed.len();
        if let Some(fs) = fence_start {
            if trimmed.starts_with("```") {
                units.push(fs..content.end);
                fence_start = None;
            }
            continue;
        }
        if trimmed.starts_with("```") {
            if let Some(c) = cur.take() {
                units.push(c);
            }
            // A fence opened and closed on the same line is an ordinary line.
            if trimmed.len() > 3 && trimmed[3..].contains("```") {
                units.push(content);
            } else {
                fence_start = Some(content.start);
            }
            prev_line_end_char = None;
            continue;
        }
        if trimmed.is_empty() {
            if let Some(c) = cur.take() {
                units.push(c);
            }
            prev_line_end_char = None;
            continue;
        }
        let first = trimmed.chars().next().expect("non-empty");
        let soft = cur.is_some()
            && first.is_lowercase()
            && list_marker(trimmed).is_none()
            && prev_line_end_char.is_some_and(|c| !is_terminal(c) && c != ':' && !is_closer(c));
        match (&mut cur, soft) {
            (Some(c), true) => c.end = content.end,
            _ => {
                if let Some(c) = cur.take() {
                    units.push(c);
                }
                cur = Some(content);
            }
        }
        prev_line_end_char = trimmed.chars().last();
    }
    if let Some(fs) = fence_start {
        // An unclosed fence runs to the end of the text.
        let end = text.trim_end().len().max(fs);
        units.push(fs..end);
    }
    if let Some(c) = cur.take() {
        units.push(c);
    }
    units.sort_by_key(|r| r.start);

    let mut out = Vec::new();
    for u in units {
        if text[u.clone()].starts_with("```") {
            out.push(u);
            continue;
        }
        split_unit(text, u, &mut out);
    }
    out
}

/// Splits one hard-separated unit (possibly several soft-wrapped lines) at sentence ends.
fn split_unit(text: &str, unit: Range<usize>, out: &mut Vec<Range<usize>>) {
    let s = &text[unit.clone()];
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let marker_len = list_marker(s).unwrap_or(0);
    let mut sent_start = 0usize;
    let mut in_code = false;
    let mut in_quote = false;
    let mut i = 0usize;
    let push = |out: &mut Vec<Range<usize>>, a: usize, b: usize| {
        let piece = &s[a..b];
        let t = piece.trim();
        if !t.is_empty() {
            let off = a + (piece.len() - piece.trim_start().len());
            out.push(unit.start + off..unit.start + off + t.len());
        }
    };
    while i < chars.len() {
        let (bi, c) = chars[i];
        if c == '\n' {
            // A soft wrap: quotes and code spans do not run across lines.
            in_quote = false;
            in_code = false;
        }
        if c == '`' {
            in_code = !in_code;
            i += 1;
            continue;
        }
        if in_code {
            i += 1;
            continue;
        }
        if c == '"' {
            in_quote = !in_quote;
            i += 1;
            continue;
        }
        if is_open_quote(c) {
            in_quote = true;
            i += 1;
            continue;
        }
        if is_close_quote(c) {
            in_quote = false;
            i += 1;
            continue;
        }
        if !is_terminal(c) {
            i += 1;
            continue;
        }
        // A run of terminal marks, then closers.
        let mut j = i;
        while j < chars.len() && is_terminal(chars[j].1) {
            j += 1;
        }
        let mut closes_quote = false;
        while j < chars.len() && is_closer(chars[j].1) {
            if chars[j].1 == '"' || is_close_quote(chars[j].1) {
                if !in_quote {
                    // An opening quote right after the mark: not part of this sentence.
                    if chars[j].1 == '"' {
                        break;
                    }
                }
                closes_quote = true;
            }
            j += 1;
        }
        let end_byte = chars.get(j).map_or(s.len(), |x| x.0);
        let followed_by_space = chars.get(j).is_none_or(|x| x.1.is_whitespace());
        if closes_quote {
            in_quote = false;
        }
        if !followed_by_space || (in_quote && !closes_quote) {
            i = j.max(i + 1);
            continue;
        }
        // The next word.
        let mut k = j;
        while k < chars.len() && chars[k].1.is_whitespace() {
            k += 1;
        }
        if k == chars.len() {
            break; // end of unit: the rest is pushed below
        }
        let next = chars[k].1;
        let single_period = c == '.' && !chars.get(i + 1).is_some_and(|x| is_terminal(x.1));
        let word_start = chars[..i].iter().rposition(|x| x.1.is_whitespace()).map_or(0, |p| p + 1);
        let word: String = chars[word_start..=i].iter().map(|x| x.1).collect::<String>().to_lowercase();
        let word_trim = word.trim_start_matches(['(', '"', '\'', '“', '[']);
        let is_abbrev = single_period
            && (ABBREVIATIONS.contains(&word_trim)
                || is_dotted_initials(word_trim)
                || (word_trim.len() == 2 && i > 0 && chars[i - 1].1.is_uppercase() && chars[i - 1].1 != 'I'));
        let is_list_number = single_period && marker_len > 0 && bi < marker_len && i > 0 && chars[i - 1].1.is_alphanumeric();
        if next.is_lowercase() || is_abbrev || is_list_number {
            i = j;
            continue;
        }
        push(out, sent_start, end_byte);
        sent_start = chars[k].0;
        in_quote = false;
        i = k;
    }
    push(out, sent_start, s.len());
}

/// "u.s.", "a.m.": single letters each followed by a dot, at least two of them.
fn is_dotted_initials(w: &str) -> bool {
    let parts: Vec<&str> = w.split('.').collect();
    parts.len() >= 3
        && parts.last() == Some(&"")
        && parts[..parts.len() - 1].iter().all(|p| p.chars().count() == 1 && p.chars().all(char::is_alphabetic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(t: &str) -> Vec<&str> {
        split_sentences(t).into_iter().map(|r| &t[r]).collect()
    }

    #[test]
    fn basic_split() {
        assert_eq!(texts("Hi there. How are you? Fine!"), vec!["Hi there.", "How are you?", "Fine!"]);
        assert_eq!(token_at(&[0, 3, 3, 7], 3), 2);
        assert_eq!(token_at(&[0, 3, 3, 7], 6), 2);
        assert_eq!(token_at(&[0, 3, 3, 7], 0), 0);
    }
}
