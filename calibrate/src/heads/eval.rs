//! Retrieval accuracy with chosen KV heads streaming: the proof that identified heads are the ones
//! retrieval needs.
//!
//! A [`Case`] is a synthetic passkey or kv-retrieval prompt with its answer. [`run_case`] scores it by
//! teacher forcing: one forward over `prompt + answer[..A-1]` and the argmax at the `A` positions that
//! predict the answer. Greedy decoding reproduces the answer exactly if and only if every one of those
//! argmaxes is the answer token, so "all `A` right" is the greedy exact match at the cost of one
//! forward instead of `A`. Streaming heads ([`profiler::gated::StreamingHeads`]) see only sink and
//! window at every row, answer rows included: what DuoAttention's decoder, which keeps only those in
//! their KV cache, computes.

use std::ops::Range;

use profiler::data::{load_samples, ChatTemplate, DataSource, SyntheticOptions, TaskKind};
use profiler::model::{argmax, LayerAttention, Model};
use serde::Serialize;

use crate::Error;

/// One retrieval prompt with its answer.
#[derive(Debug, Clone)]
pub struct Case {
    pub id: String,
    pub task: TaskKind,
    /// `prompt + answer[..A-1]`: the forward's input.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// The answer's tokens (`A` of them).
    pub answer: Vec<u32>,
    /// Token positions of the fact the answer comes from.
    pub needle: Range<usize>,
}

impl Case {
    /// Rows whose next-token prediction is an answer token: `prompt_len - 1 ..`, `A` of them.
    pub fn answer_rows(&self) -> Range<usize> {
        let first = self.prompt_len.saturating_sub(1);
        first..first + self.answer.len()
    }
}

/// `count` cases of `task` with prompts of `seq_len` tokens.
pub fn cases(
    model: &Model,
    task: TaskKind,
    chat: ChatTemplate,
    seq_len: usize,
    count: usize,
    seed: u64,
) -> Result<Vec<Case>, Error> {
    let mut options = SyntheticOptions::default();
    options.chat = chat;
    let source = DataSource::parse(&format!("synthetic:{task}"))?.with_synthetic_options(options);
    let samples = load_samples(&source, model.tokenizer(), seq_len, count, seed)?;
    let mut out = Vec::with_capacity(samples.len());
    for s in samples {
        let Some(t) = s.task else { continue };
        let (Some(needle), Some((_, head))) = (t.needle.clone(), t.answer_tokens.split_last())
        else {
            continue;
        };
        let mut tokens = s.tokens;
        tokens.extend_from_slice(head);
        out.push(Case {
            id: s.id,
            task: t.kind,
            tokens,
            prompt_len: t.prompt_len,
            answer: t.answer_tokens,
            needle,
        });
    }
    Ok(out)
}

/// The model's predictions at a case's answer rows.
#[derive(Debug, Clone, Serialize)]
pub struct CaseOutcome {
    /// Greedy decoding gives exactly the answer.
    pub exact: bool,
    /// Answer tokens predicted right (teacher forced).
    pub tokens_right: usize,
    pub predicted: Vec<u32>,
}

/// Runs `case` with `attn` as the attention of every layer.
pub fn run_case(
    model: &Model,
    case: &Case,
    attn: &mut dyn LayerAttention,
) -> Result<CaseOutcome, Error> {
    let hidden = model.forward_hidden(&case.tokens, attn)?;
    predictions(model, case, &hidden)
}

/// Argmax predictions at the answer rows of `hidden` (the forward of `case.tokens`).
pub fn predictions(
    model: &Model,
    case: &Case,
    hidden: &profiler::model::Hidden,
) -> Result<CaseOutcome, Error> {
    let logits = model.logits_rows(hidden, case.answer_rows())?;
    let predicted: Vec<u32> = (0..case.answer.len())
        .map(|i| argmax(logits.row(i)).unwrap_or(u32::MAX))
        .collect();
    let tokens_right = predicted
        .iter()
        .zip(&case.answer)
        .filter(|(a, b)| a == b)
        .count();
    Ok(CaseOutcome {
        exact: tokens_right == case.answer.len(),
        tokens_right,
        predicted,
    })
}

/// Accuracy of one configuration over cases.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Accuracy {
    pub cases: usize,
    pub exact: usize,
    pub answer_tokens: usize,
    pub tokens_right: usize,
}

impl Accuracy {
    pub fn add(&mut self, case: &Case, o: &CaseOutcome) {
        self.cases += 1;
        self.exact += usize::from(o.exact);
        self.answer_tokens += case.answer.len();
        self.tokens_right += o.tokens_right;
    }

    /// Exact-match accuracy in percent.
    pub fn exact_pct(&self) -> f64 {
        100.0 * self.exact as f64 / self.cases.max(1) as f64
    }

    /// Answer-token accuracy in percent.
    pub fn token_pct(&self) -> f64 {
        100.0 * self.tokens_right as f64 / self.answer_tokens.max(1) as f64
    }
}
