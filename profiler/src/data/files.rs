//! Samples from files: plain UTF-8 text, and JSONL with the text in one field.
//!
//! Both are cut into consecutive non-overlapping windows of `seq_len` tokens. Text is tokenized in
//! chunks of about [`CHUNK_BYTES`] split after a newline, and only until enough tokens for `count`
//! windows are in hand, so a large corpus costs what the samples need; JSONL documents are tokenized one
//! by one with the `"\n\n"` separator tokenized once between them. Token ids are concatenated, so a
//! token never spans a chunk or document boundary; everywhere else the ids are the tokenizer's own.

use std::path::Path;

use tokenizers::Tokenizer;

use super::Sample;
use crate::{Error, Result};

/// Text is tokenized in pieces of at least this many bytes (cut after the next newline).
const CHUNK_BYTES: usize = 64 * 1024;

/// Placed between JSONL documents.
const DOCUMENT_SEPARATOR: &str = "\n\n";

pub(super) fn load_text(
    path: &Path,
    tokenizer: &Tokenizer,
    seq_len: usize,
    count: usize,
) -> Result<Vec<Sample>> {
    let text = read_utf8(path)?;
    let mut tokens = Tokens::new(seq_len, count);
    let mut rest = text.as_str();
    while !rest.is_empty() && !tokens.is_full() {
        let (chunk, tail) = split_chunk(rest);
        tokens.push(&encode(tokenizer, chunk, path, "text")?);
        rest = tail;
    }
    tokens.into_windows(path, "", seq_len, count)
}

pub(super) fn load_jsonl(
    path: &Path,
    field: &str,
    tokenizer: &Tokenizer,
    seq_len: usize,
    count: usize,
) -> Result<Vec<Sample>> {
    let text = read_utf8(path)?;
    // Every line is checked, even those past the tokens needed: a broken corpus should fail early.
    let documents = parse_jsonl(&text, path, field)?;
    if documents.is_empty() {
        return Err(data_error(
            path,
            "whole file",
            "no JSON lines, only blank ones",
        ));
    }
    let separator = encode(tokenizer, DOCUMENT_SEPARATOR, path, "document separator")?;
    let mut tokens = Tokens::new(seq_len, count);
    for (i, (line, document)) in documents.iter().enumerate() {
        if tokens.is_full() {
            break;
        }
        if i > 0 {
            tokens.push(&separator);
        }
        tokens.push(&encode(tokenizer, document, path, &format!("line {line}"))?);
    }
    let what = format!(" in {} documents", documents.len());
    tokens.into_windows(path, &what, seq_len, count)
}

/// Reads a whole file as UTF-8 (a leading byte-order mark is dropped). An empty file is an error; an
/// invalid byte is reported with its line.
fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(data_error(path, "whole file", "the file is empty"));
    }
    match String::from_utf8(bytes) {
        Ok(mut text) => {
            if text.starts_with('\u{feff}') {
                text.drain(..'\u{feff}'.len_utf8());
            }
            Ok(text)
        }
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let before = e.as_bytes().get(..at).unwrap_or_default();
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            Err(data_error(
                path,
                &format!("line {line}"),
                &format!("invalid UTF-8 at byte offset {at}; calibration text must be UTF-8"),
            ))
        }
    }
}

/// Returns `(line number, text)` for each non-blank line; errors name the line and the field.
fn parse_jsonl(text: &str, path: &Path, field: &str) -> Result<Vec<(usize, String)>> {
    let mut documents = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let location = format!("line {line_no}");
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| data_error(path, &location, &format!("not valid JSON: {e}")))?;
        let serde_json::Value::Object(mut object) = value else {
            return Err(data_error(
                path,
                &location,
                &format!("expected a JSON object, found {}", json_kind(&value)),
            ));
        };
        let location = format!("line {line_no}, field {field:?}");
        match object.remove(field) {
            Some(serde_json::Value::String(s)) => documents.push((line_no, s)),
            Some(other) => {
                return Err(data_error(
                    path,
                    &location,
                    &format!("expected a string, found {}", json_kind(&other)),
                ))
            }
            None => {
                let mut keys: Vec<&String> = object.keys().collect();
                keys.sort();
                let keys: Vec<String> = keys.iter().take(8).map(|k| format!("{k:?}")).collect();
                return Err(data_error(
                    path,
                    &location,
                    &format!(
                        "missing (the object has {}); choose the field with --field",
                        if keys.is_empty() {
                            "no fields".to_owned()
                        } else {
                            format!("fields {}", keys.join(", "))
                        }
                    ),
                ));
            }
        }
    }
    Ok(documents)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Splits off a first chunk of at least [`CHUNK_BYTES`], ending just after a newline when there is one.
fn split_chunk(text: &str) -> (&str, &str) {
    let newline = text
        .as_bytes()
        .get(CHUNK_BYTES..)
        .and_then(|tail| tail.iter().position(|&b| b == b'\n'));
    // A newline is ASCII, so one past it is a char boundary; `split_at_checked` keeps that explicit.
    newline
        .and_then(|p| text.split_at_checked(CHUNK_BYTES + p + 1))
        .unwrap_or((text, ""))
}

fn encode(tokenizer: &Tokenizer, text: &str, path: &Path, location: &str) -> Result<Vec<u32>> {
    tokenizer
        .encode(text, false)
        .map(|encoding| encoding.get_ids().to_vec())
        .map_err(|e| data_error(path, location, &format!("tokenizer failed: {e}")))
}

fn data_error(path: &Path, location: &str, message: &str) -> Error {
    Error::Data {
        path: path.to_owned(),
        location: location.to_owned(),
        message: message.to_owned(),
    }
}

/// Token ids gathered until `count` windows (at least one, to check the file) are covered.
struct Tokens {
    ids: Vec<u32>,
    needed: usize,
}

impl Tokens {
    fn new(seq_len: usize, count: usize) -> Self {
        Self {
            ids: Vec::new(),
            needed: seq_len.saturating_mul(count.max(1)),
        }
    }

    fn is_full(&self) -> bool {
        self.ids.len() >= self.needed
    }

    fn push(&mut self, ids: &[u32]) {
        self.ids.extend_from_slice(ids);
    }

    /// Cuts the ids into `seq_len` windows, at most `count`; `what` describes the text for the error.
    fn into_windows(
        self,
        path: &Path,
        what: &str,
        seq_len: usize,
        count: usize,
    ) -> Result<Vec<Sample>> {
        if self.ids.len() < seq_len {
            return Err(data_error(
                path,
                "whole file",
                &format!(
                    "too little text: {} tokens{what}, but one sample needs seq_len = {seq_len} tokens",
                    self.ids.len()
                ),
            ));
        }
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(self
            .ids
            .chunks_exact(seq_len)
            .take(count)
            .enumerate()
            .map(|(i, window)| Sample {
                id: format!("{name}:{i}"),
                tokens: window.to_vec(),
                task: None,
            })
            .collect())
    }
}
