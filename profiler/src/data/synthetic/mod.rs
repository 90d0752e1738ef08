//! Synthetic retrieval tasks: passkey, key-value retrieval, needle in a haystack.
//!
//! Every prompt is assembled from pieces tokenized separately — instruction header, filler sentences
//! (or key-value pairs), the needle, the question — whose token ids are concatenated. That is what makes
//! the length exactly `seq_len` and the needle's token span known by construction; retokenizing the
//! decoded prompt could merge tokens across piece boundaries, which is why samples carry ids, not text.
//!
//! Layout, plain ([`ChatTemplate::Plain`]):
//! `header · haystack with needle · question_sep question · prefix_sep answer_prefix`, and with
//! [`ChatTemplate::ChatMl`]: `<|im_start|>user\n header · haystack · question_sep question <|im_end|>\n
//! <|im_start|>assistant\n answer_prefix`. The answer (not in the tokens) continues `answer_prefix`.

mod kv;
mod needle;
mod passkey;

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::rng::SplitMix64;
use super::{Sample, Task, TaskKind};
use crate::{Error, Result};

/// How synthetic prompts are built.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct SyntheticOptions {
    /// Plain text (default) or a ChatML user turn followed by the assistant header.
    pub chat: ChatTemplate,
    /// Needle depths in `0..=1`, used in turn by sample index. Empty (default): spread evenly, sample
    /// `i` of `n` at `i / (n - 1)`, a single sample at 0.5.
    pub depths: Vec<f64>,
}

/// Prompt wrapping for chat models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatTemplate {
    /// No template: the prompt is the task text alone, ending with the start of the answer.
    #[default]
    Plain,
    /// ChatML as SmolLM2-Instruct and Qwen use it; needs `<|im_start|>` and `<|im_end|>` in the vocabulary.
    ChatMl,
}

impl fmt::Display for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChatTemplate::Plain => "plain",
            ChatTemplate::ChatMl => "chatml",
        })
    }
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

/// Consecutive filler pieces that tokenize to nothing before we give up on the tokenizer.
const MAX_EMPTY_PIECES: usize = 64;

pub(super) fn generate(
    task: TaskKind,
    options: &SyntheticOptions,
    tokenizer: &Tokenizer,
    seq_len: usize,
    count: usize,
    seed: u64,
) -> Result<Vec<Sample>> {
    let ctx = Context::new(task, options.chat, tokenizer, seq_len)?;
    if let Some(bad) = options.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        return Err(ctx.error(format!("needle depth {bad} is outside 0..=1")));
    }
    let mut root = SplitMix64::new(seed);
    (0..count)
        .map(|i| {
            let mut rng = root.split();
            let depth = depth_for(i, count, &options.depths);
            let built = match task {
                TaskKind::Passkey => passkey::build(&ctx, &mut rng, depth),
                TaskKind::KvRetrieval => kv::build(&ctx, &mut rng, depth),
                TaskKind::Needle => needle::build(&ctx, &mut rng, depth),
            }?;
            ctx.finish(built, format!("{task}:{seed}:{i}"))
        })
        .collect()
}

fn depth_for(i: usize, count: usize, depths: &[f64]) -> f64 {
    if !depths.is_empty() {
        return depths.get(i % depths.len()).copied().unwrap_or(0.5);
    }
    if count <= 1 {
        return 0.5;
    }
    // Sample counts are far below 2^52, so these conversions are exact.
    i as f64 / (count - 1) as f64
}

/// The fixed text around the haystack of one task.
struct Frame<'a> {
    /// Instruction before the haystack.
    header: &'a str,
    /// Between the haystack and the question.
    question_sep: &'a str,
    question: &'a str,
    /// Between the question and the answer prefix when plain (in ChatML the assistant header is there).
    prefix_sep: &'a str,
    /// The start of the answer; the expected answer continues it.
    answer_prefix: &'a str,
}

/// A prompt before its answer is tokenized.
struct Built {
    tokens: Vec<u32>,
    needle: Range<usize>,
    depth: f64,
    answer: String,
}

struct Context<'a> {
    task: TaskKind,
    tokenizer: &'a Tokenizer,
    seq_len: usize,
    /// `(<|im_start|>, <|im_end|>)` ids when ChatML is asked for.
    chat: Option<(u32, u32)>,
}

impl<'a> Context<'a> {
    fn new(
        task: TaskKind,
        chat: ChatTemplate,
        tokenizer: &'a Tokenizer,
        seq_len: usize,
    ) -> Result<Self> {
        let mut ctx = Self {
            task,
            tokenizer,
            seq_len,
            chat: None,
        };
        if chat == ChatTemplate::ChatMl {
            match (
                tokenizer.token_to_id(IM_START),
                tokenizer.token_to_id(IM_END),
            ) {
                (Some(start), Some(end)) => ctx.chat = Some((start, end)),
                _ => {
                    return Err(ctx.error(format!(
                        "the chatml template needs the tokens {IM_START} and {IM_END}, \
                         which this tokenizer does not have; use the plain template"
                    )))
                }
            }
        }
        Ok(ctx)
    }

    fn error(&self, message: String) -> Error {
        Error::Synthetic {
            task: self.task.name().to_owned(),
            message,
        }
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| self.error(format!("tokenizer failed on {text:?}: {e}")))
    }

    /// Token ids before and after the haystack.
    fn frame(&self, frame: &Frame<'_>) -> Result<(Vec<u32>, Vec<u32>)> {
        let question = format!("{}{}", frame.question_sep, frame.question);
        let Some((start, end)) = self.chat else {
            let head = self.encode(frame.header)?;
            let tail = self.encode(&format!(
                "{question}{}{}",
                frame.prefix_sep, frame.answer_prefix
            ))?;
            return Ok((head, tail));
        };
        let mut head = vec![start];
        head.extend(self.encode("user\n")?);
        head.extend(self.encode(frame.header)?);
        let mut tail = self.encode(&question)?;
        tail.push(end);
        tail.extend(self.encode("\n")?);
        tail.push(start);
        tail.extend(self.encode("assistant\n")?);
        tail.extend(self.encode(frame.answer_prefix)?);
        Ok((head, tail))
    }

    /// Tokens left for the haystack once the fixed pieces are placed.
    fn budget(&self, fixed: &[&[u32]]) -> Result<usize> {
        let used: usize = fixed.iter().map(|piece| piece.len()).sum();
        self.seq_len.checked_sub(used).ok_or_else(|| {
            self.error(format!(
                "seq_len {} is too short: the instruction, needle, question{} alone take {used} tokens",
                self.seq_len,
                if self.chat.is_some() { " and chat template" } else { "" }
            ))
        })
    }

    /// Exactly `budget` tokens of prose from `next` (one sentence per call), the last piece truncated.
    fn fill(
        &self,
        budget: usize,
        mut next: impl FnMut() -> Result<Vec<u32>>,
    ) -> Result<Vec<Vec<u32>>> {
        let mut pieces = Vec::new();
        let mut used = 0;
        let mut empty_in_a_row = 0;
        while used < budget {
            let mut piece = next()?;
            if piece.is_empty() {
                empty_in_a_row += 1;
                if empty_in_a_row > MAX_EMPTY_PIECES {
                    return Err(self.error("the tokenizer gives no tokens for the filler".into()));
                }
                continue;
            }
            empty_in_a_row = 0;
            piece.truncate(budget - used);
            used += piece.len();
            pieces.push(piece);
        }
        Ok(pieces)
    }

    /// `head · pieces with the needle at the piece boundary nearest to `depth` · tail`.
    fn assemble(
        &self,
        head: &[u32],
        pieces: &[Vec<u32>],
        needle: &[u32],
        tail: &[u32],
        depth: f64,
    ) -> (Vec<u32>, Range<usize>, f64) {
        let total: usize = pieces.iter().map(Vec::len).sum();
        let target = depth * total as f64;
        // Boundary k sits after pieces[..k]; pick the one whose token offset is nearest the target.
        let mut best = (0, 0, f64::INFINITY);
        let mut offset = 0;
        for k in 0..=pieces.len() {
            let distance = (offset as f64 - target).abs();
            if distance < best.2 {
                best = (k, offset, distance);
            }
            offset += pieces.get(k).map_or(0, Vec::len);
        }
        let (at, before, _) = best;
        let mut tokens = Vec::with_capacity(self.seq_len);
        tokens.extend_from_slice(head);
        let (first, rest) = pieces.split_at_checked(at).unwrap_or((pieces, &[]));
        first.iter().for_each(|p| tokens.extend_from_slice(p));
        let start = tokens.len();
        tokens.extend_from_slice(needle);
        let range = start..tokens.len();
        rest.iter().for_each(|p| tokens.extend_from_slice(p));
        tokens.extend_from_slice(tail);
        let depth = if total == 0 {
            depth
        } else {
            before as f64 / total as f64
        };
        (tokens, range, depth)
    }

    fn finish(&self, built: Built, id: String) -> Result<Sample> {
        if built.tokens.len() != self.seq_len {
            return Err(self.error(format!(
                "internal error: built {} tokens instead of {}",
                built.tokens.len(),
                self.seq_len
            )));
        }
        let answer_tokens = self.encode(&built.answer)?;
        Ok(Sample {
            id,
            task: Some(Task {
                kind: self.task,
                prompt_len: built.tokens.len(),
                answer: built.answer,
                answer_tokens,
                needle: Some(built.needle),
                depth: Some(built.depth),
            }),
            tokens: built.tokens,
        })
    }
}
