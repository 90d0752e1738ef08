//! Calibration data: token sequences of exactly `seq_len` tokens, from files or synthetic tasks.
//!
//! - [`DataSource`]: where samples come from, parsed from a spec string ([`DataSource::parse`]): a plain
//!   text file, a JSONL file (one JSON object per line, text in a field, default `"text"`), or a
//!   synthetic retrieval task `synthetic:passkey`, `synthetic:kv-retrieval`, `synthetic:needle`.
//! - [`load_samples`]: the one entry point; tokenizes with a caller's [`tokenizers::Tokenizer`] and
//!   returns [`Sample`]s.
//! - [`Sample`]: an id and its tokens; synthetic samples carry a [`Task`] with the expected answer, the
//!   token span of the inserted fact (the needle) and its depth, so a sparse plan can be scored on
//!   retrieval as well as on attention recall.
//! - [`SyntheticOptions`] / [`ChatTemplate`]: plain prompts (default) or ChatML-wrapped ones for chat
//!   models such as SmolLM2-Instruct; where the needle goes.
//!
//! Files are cut into consecutive non-overlapping windows of `seq_len` tokens. Synthetic prompts are
//! assembled from separately tokenized pieces whose token ids are concatenated, so lengths are exact
//! and the needle's token positions are known without searching. Everything is deterministic given the
//! seed (see `rng.rs` for why the generator is our own).

mod files;
mod rng;
mod synthetic;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::{Error, Result};

pub use synthetic::{ChatTemplate, SyntheticOptions};

/// The JSONL field read when none is named.
pub const DEFAULT_JSONL_FIELD: &str = "text";

/// One calibration sample: exactly `seq_len` token ids, no special tokens added by the tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Unique within one [`load_samples`] call: `<file name>:<window>` or `<task>:<seed>:<index>`.
    pub id: String,
    pub tokens: Vec<u32>,
    /// The retrieval task, for synthetic samples; `None` for text.
    pub task: Option<Task>,
}

/// A synthetic retrieval task: the prompt is the whole of [`Sample::tokens`] and ends with the question;
/// the answer is not among the tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub kind: TaskKind,
    /// Tokens of context and question; generation starts here. Always equals `tokens.len()`.
    pub prompt_len: usize,
    /// The expected completion exactly as it would follow the prompt, leading space included
    /// (e.g. `" 48213"`); compare with `trim()` if the generation may differ in spacing.
    pub answer: String,
    /// `answer` tokenized on its own.
    pub answer_tokens: Vec<u32>,
    /// Token positions of the inserted fact in `tokens` (the pass key sentence, the target key-value
    /// pair, the needle sentence).
    pub needle: Option<Range<usize>>,
    /// Where the needle sits in the haystack, 0 = before all of it, 1 = after all of it: the fraction of
    /// haystack tokens (filler, or the other key-value pairs) that precede it.
    pub depth: Option<f64>,
}

/// The synthetic retrieval tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Passkey retrieval (Mohtashami and Jaggi, 2023): a 5-digit key hidden in repeated filler.
    Passkey,
    /// Key-value retrieval ("Lost in the Middle"): find a UUID's value in a JSON object of UUIDs.
    KvRetrieval,
    /// Needle in a haystack: one sentence about a city hidden in varied prose.
    Needle,
}

impl TaskKind {
    pub const ALL: [TaskKind; 3] = [TaskKind::Passkey, TaskKind::KvRetrieval, TaskKind::Needle];

    /// The name used after `synthetic:` in a spec.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Passkey => "passkey",
            TaskKind::KvRetrieval => "kv-retrieval",
            TaskKind::Needle => "needle",
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where calibration samples come from.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum DataSource {
    /// A UTF-8 text file, tokenized as a whole and cut into windows.
    Text { path: PathBuf },
    /// One JSON object per line; the documents in `field` are joined by `"\n\n"` and cut into windows.
    Jsonl { path: PathBuf, field: String },
    /// A generated retrieval task.
    Synthetic {
        task: TaskKind,
        options: SyntheticOptions,
    },
}

impl DataSource {
    /// Parses a spec: `synthetic:<task>`, a path ending in `.jsonl` or `.ndjson` (JSONL, field
    /// `"text"`), or any other path (plain text). Paths are not opened here.
    pub fn parse(spec: &str) -> Result<Self> {
        let spec_error = |message: String| Error::DataSpec {
            spec: spec.to_owned(),
            message,
        };
        if spec.trim().is_empty() {
            return Err(spec_error(
                "empty; expected a file path or synthetic:<task>".into(),
            ));
        }
        if let Some(name) = spec.strip_prefix("synthetic:") {
            let task = TaskKind::ALL
                .into_iter()
                .find(|t| t.name() == name)
                .ok_or_else(|| {
                    let known: Vec<String> = TaskKind::ALL
                        .iter()
                        .map(|t| format!("synthetic:{t}"))
                        .collect();
                    spec_error(format!(
                        "unknown synthetic task {name:?}; expected one of {}",
                        known.join(", ")
                    ))
                })?;
            return Ok(DataSource::Synthetic {
                task,
                options: SyntheticOptions::default(),
            });
        }
        let path = PathBuf::from(spec);
        let is_jsonl = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("ndjson"));
        Ok(if is_jsonl {
            DataSource::Jsonl {
                path,
                field: DEFAULT_JSONL_FIELD.to_owned(),
            }
        } else {
            DataSource::Text { path }
        })
    }

    /// Sets the JSONL field to read; no effect on other sources.
    #[must_use]
    pub fn with_field(mut self, name: impl Into<String>) -> Self {
        if let DataSource::Jsonl { field, .. } = &mut self {
            *field = name.into();
        }
        self
    }

    /// Sets the options of a synthetic task; no effect on file sources.
    #[must_use]
    pub fn with_synthetic_options(mut self, new: SyntheticOptions) -> Self {
        if let DataSource::Synthetic { options, .. } = &mut self {
            *options = new;
        }
        self
    }

    /// The file read, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DataSource::Text { path } | DataSource::Jsonl { path, .. } => Some(path),
            DataSource::Synthetic { .. } => None,
        }
    }
}

/// A short description for logs and plan provenance, e.g. `corpus.jsonl (field "body")` or
/// `synthetic:passkey (chatml)`. Not meant to be parsed back.
impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Text { path } => write!(f, "{}", path.display()),
            DataSource::Jsonl { path, field } => {
                write!(f, "{} (field {field:?})", path.display())
            }
            DataSource::Synthetic { task, options } => {
                write!(f, "synthetic:{task}")?;
                if options.chat != ChatTemplate::Plain {
                    write!(f, " ({})", options.chat)?;
                }
                Ok(())
            }
        }
    }
}

/// Loads up to `count` samples of exactly `seq_len` tokens each.
///
/// Files give as many whole windows as their text holds, at most `count` (an error if not even one);
/// synthetic tasks give exactly `count`, built from `seed` (files ignore it: windows are taken in
/// order). The tokenizer adds no special tokens; ChatML markers are added only when
/// [`SyntheticOptions::chat`] asks for them.
pub fn load_samples(
    source: &DataSource,
    tokenizer: &Tokenizer,
    seq_len: usize,
    count: usize,
    seed: u64,
) -> Result<Vec<Sample>> {
    if seq_len == 0 {
        return Err(Error::DataSpec {
            spec: source.to_string(),
            message: "seq_len must be at least 1 token".into(),
        });
    }
    match source {
        DataSource::Text { path } => files::load_text(path, tokenizer, seq_len, count),
        DataSource::Jsonl { path, field } => {
            files::load_jsonl(path, field, tokenizer, seq_len, count)
        }
        DataSource::Synthetic { task, options } => {
            synthetic::generate(*task, options, tokenizer, seq_len, count, seed)
        }
    }
}
