//! Key-value retrieval as in "Lost in the Middle" (Liu et al., 2023) and MInference's calibration: a JSON
//! object mapping random UUIDs to random UUIDs, then one key; the answer is its value. The needle is the
//! target `"key": "value"` pair.
//!
//! Pairs are added while they fit; when the next would not, a few more random pairs are tried (their
//! token counts differ), and what is left — fewer tokens than one pair — is filled with single-token
//! whitespace spread over the gaps after the pairs, where JSON allows it. The needle's depth counts
//! that padding as haystack.

use std::collections::HashSet;

use super::{Built, Context, Frame};
use crate::data::rng::SplitMix64;
use crate::Result;

const HEADER: &str =
    "Extract the value corresponding to the specified key in the JSON object below.\
                      \n\nJSON data:\n{";

/// Pairs tried after the first one that does not fit, to use up the budget.
const EXTRA_TRIES: usize = 64;

/// Pieces that usually tokenize to one token, tried in order for padding.
const PAD_CANDIDATES: [&str; 4] = [" ", "\n", "\t", ","];

struct Pair {
    key: String,
    value: String,
    ids: Vec<u32>,
}

pub(super) fn build(ctx: &Context<'_>, rng: &mut SplitMix64, depth: f64) -> Result<Built> {
    let separator = ctx.encode(", ")?;
    // The target pair comes first, so that the question (which names its key) has a known length.
    let target = new_pair(ctx, rng)?;
    let question = format!("Key: \"{}\"", target.key);
    let (head, tail) = ctx.frame(&Frame {
        header: HEADER,
        question_sep: "}\n\n",
        question: &question,
        prefix_sep: "\n",
        answer_prefix: "The value associated with the specified key is:",
    })?;
    let budget = ctx.budget(&[&head, &target.ids, &tail])?;

    // Every other pair costs its tokens plus one separator.
    let mut others: Vec<Pair> = Vec::new();
    let mut keys = HashSet::from([target.key.clone()]);
    let mut used = 0;
    let mut misses = 0;
    while misses <= EXTRA_TRIES {
        let pair = new_pair(ctx, rng)?;
        let cost = pair.ids.len() + separator.len();
        if used + cost <= budget && !pair.ids.is_empty() && keys.insert(pair.key.clone()) {
            used += cost;
            others.push(pair);
        } else {
            misses += 1;
        }
    }
    let pad_len = budget - used;
    let pad = if pad_len > 0 {
        single_token_pad(ctx, pad_len)?
    } else {
        0
    };

    // Rounded to the nearest slot; `depth` is in 0..=1, so the slot is in 0..=others.len().
    let slot = ((depth * others.len() as f64).round() as usize).min(others.len());
    let mut ordered: Vec<&Pair> = others.iter().collect();
    ordered.insert(slot, &target);
    // Padding is spread over the gaps after the pairs (JSON whitespace), at most one pair's worth in
    // all, so that no long run of it stands out.
    let gaps = ordered.len();
    let mut tokens = Vec::with_capacity(ctx.seq_len);
    tokens.extend_from_slice(&head);
    let json_start = tokens.len();
    let mut needle = 0..0;
    for (i, pair) in ordered.iter().enumerate() {
        if i > 0 {
            tokens.extend_from_slice(&separator);
        }
        if i == slot {
            needle = tokens.len()..tokens.len() + pair.ids.len();
        }
        tokens.extend_from_slice(&pair.ids);
        let pads = pad_len / gaps + usize::from(i < pad_len % gaps);
        tokens.extend(std::iter::repeat_n(pad, pads));
    }
    let haystack = tokens.len() - json_start - needle.len();
    let depth = if haystack == 0 {
        depth
    } else {
        (needle.start - json_start) as f64 / haystack as f64
    };
    tokens.extend_from_slice(&tail);
    Ok(Built {
        tokens,
        needle,
        depth,
        answer: format!(" {}", target.value),
    })
}

fn new_pair(ctx: &Context<'_>, rng: &mut SplitMix64) -> Result<Pair> {
    let (key, value) = (rng.uuid(), rng.uuid());
    let ids = ctx.encode(&format!("\"{key}\": \"{value}\""))?;
    Ok(Pair { key, value, ids })
}

/// A token that decodes to one whitespace character (or a comma), needed only when `pad_len > 0`.
fn single_token_pad(ctx: &Context<'_>, pad_len: usize) -> Result<u32> {
    for candidate in PAD_CANDIDATES {
        if let [id] = ctx.encode(candidate)?.as_slice() {
            return Ok(*id);
        }
    }
    Err(ctx.error(format!(
        "cannot pad {pad_len} tokens: none of {PAD_CANDIDATES:?} is a single token in this tokenizer"
    )))
}
