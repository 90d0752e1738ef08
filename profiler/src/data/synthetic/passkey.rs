//! Passkey retrieval (Mohtashami and Jaggi, "Landmark Attention", 2023), as MInference and DuoAttention
//! evaluate it: a 5-digit key hidden in a repeated five-sentence filler, asked for at the end.

use super::{Built, Context, Frame};
use crate::data::rng::SplitMix64;
use crate::Result;

const HEADER: &str = "There is an important info hidden inside a lot of irrelevant text. \
                      Find it and memorize it. I will quiz you about the important information there.";

/// The classic filler, repeated in this order.
const FILLER: [&str; 5] = [
    " The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
];

pub(super) fn build(ctx: &Context<'_>, rng: &mut SplitMix64, depth: f64) -> Result<Built> {
    let key = rng.range_inclusive(10_000, 99_999);
    let frame = Frame {
        header: HEADER,
        question_sep: " ",
        question: "What is the pass key?",
        prefix_sep: " ",
        answer_prefix: "The pass key is",
    };
    let (head, tail) = ctx.frame(&frame)?;
    let needle = ctx.encode(&format!(
        " The pass key is {key}. Remember it. {key} is the pass key."
    ))?;
    let budget = ctx.budget(&[&head, &needle, &tail])?;
    let filler = FILLER
        .iter()
        .map(|sentence| ctx.encode(sentence))
        .collect::<Result<Vec<_>>>()?;
    let mut cycle = filler.iter().cycle();
    let pieces = ctx.fill(budget, || Ok(cycle.next().cloned().unwrap_or_default()))?;
    let (tokens, needle, depth) = ctx.assemble(&head, &pieces, &needle, &tail, depth);
    Ok(Built {
        tokens,
        needle,
        depth,
        answer: format!(" {key}"),
    })
}
