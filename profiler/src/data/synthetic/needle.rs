//! Needle in a haystack (Kamradt's test, as in MInference's evaluation): one sentence naming the best
//! thing to do in a city, hidden at a chosen depth in prose, and asked for at the end.
//!
//! The haystack is generated, not one repeated line: sentences from five templates filled from word
//! lists with the sample's RNG (hundreds of thousands of combinations), grouped into paragraphs of three
//! to seven sentences. It never mentions a city, so the needle is the only answer in the text.

use super::{Built, Context, Frame};
use crate::data::rng::SplitMix64;
use crate::Result;

const HEADER: &str = "Below is a long text. Somewhere in it is a sentence about a city. \
                      Read carefully; you will be asked about it at the end.";

/// `(city, activity)`: the needle is "The best thing to do in {city} is {activity}."
const NEEDLES: [(&str, &str); 12] = [
    (
        "San Francisco",
        "eat a sandwich and sit in Dolores Park on a sunny day",
    ),
    (
        "Lisbon",
        "ride the old yellow tram up to the castle at sunset",
    ),
    (
        "Kyoto",
        "walk through the bamboo forest early in the morning",
    ),
    (
        "Istanbul",
        "take a ferry across the Bosphorus and drink tea on the deck",
    ),
    (
        "Buenos Aires",
        "watch the tango dancers in San Telmo on a Sunday",
    ),
    (
        "Edinburgh",
        "climb Arthur's Seat and look over the old town",
    ),
    (
        "Marrakesh",
        "get lost in the souks and bargain for a lantern",
    ),
    ("Vancouver", "cycle around Stanley Park along the sea wall"),
    (
        "Prague",
        "cross the Charles Bridge before the crowds arrive",
    ),
    (
        "Hanoi",
        "sit on a tiny stool by the lake and eat a bowl of pho",
    ),
    (
        "Cape Town",
        "take the cable car up Table Mountain on a clear morning",
    ),
    ("Oslo", "swim in the fjord and warm up in a floating sauna"),
];

const TIMES: [&str; 12] = [
    "in the early morning",
    "late in the evening",
    "last winter",
    "on a rainy afternoon",
    "just before noon",
    "after the harvest festival",
    "during the long summer",
    "every Sunday",
    "two days ago",
    "at dawn",
    "before the storm",
    "once a year",
];

const SUBJECTS: [&str; 20] = [
    "the old fisherman",
    "a young teacher",
    "the village baker",
    "my neighbor",
    "the tired engineer",
    "a curious child",
    "the mayor",
    "an elderly painter",
    "the night nurse",
    "a quiet librarian",
    "the farmer's daughter",
    "the new student",
    "a traveling musician",
    "the shop owner",
    "our guide",
    "the carpenter",
    "a retired sailor",
    "the gardener",
    "a local journalist",
    "the postman",
];

const VERBS: [&str; 20] = [
    "repaired",
    "painted",
    "carried",
    "found",
    "cleaned",
    "sold",
    "borrowed",
    "described",
    "built",
    "measured",
    "opened",
    "forgot",
    "noticed",
    "wrapped",
    "moved",
    "counted",
    "photographed",
    "returned",
    "lost",
    "sketched",
];

const OBJECTS: [&str; 20] = [
    "a wooden boat",
    "the broken fence",
    "a basket of apples",
    "an old map",
    "the kitchen window",
    "a pile of letters",
    "the blue bicycle",
    "a box of tools",
    "the garden gate",
    "a heavy coat",
    "the tall ladder",
    "a jar of honey",
    "the church bell",
    "a set of keys",
    "the stone bridge",
    "a small radio",
    "the wool blanket",
    "a stack of books",
    "the iron kettle",
    "a paper lantern",
];

const PLACES: [&str; 16] = [
    "near the harbor",
    "behind the station",
    "in the town square",
    "at the edge of the forest",
    "by the river",
    "on the hill",
    "inside the old mill",
    "next to the bakery",
    "across the valley",
    "under the bridge",
    "in the school yard",
    "along the coast road",
    "at the market",
    "in the back room",
    "beside the lake",
    "on the top floor",
];

const REASONS: [&str; 12] = [
    "the weather was calm",
    "nobody else had time",
    "it seemed like the right thing to do",
    "the market was closed",
    "the road was blocked",
    "a friend had asked for help",
    "the light was good",
    "the old one had worn out",
    "there was a long wait",
    "the roof was leaking",
    "it was too cold outside",
    "the season was ending",
];

const NOUNS: [&str; 10] = [
    "air", "street", "sky", "water", "room", "road", "field", "square", "harbor", "wind",
];

const ADJECTIVES: [&str; 10] = [
    "quiet", "crowded", "cold", "warm", "bright", "gray", "still", "noisy", "damp", "clear",
];

pub(super) fn build(ctx: &Context<'_>, rng: &mut SplitMix64, depth: f64) -> Result<Built> {
    let (city, activity) = NEEDLES
        .get(usize::try_from(rng.below(NEEDLES.len() as u64)).unwrap_or(0))
        .copied()
        .unwrap_or(NEEDLES[0]);
    let question = format!("What is the best thing to do in {city}?");
    let answer_prefix = format!("The best thing to do in {city} is");
    let (head, tail) = ctx.frame(&Frame {
        header: HEADER,
        question_sep: "\n\n",
        question: &question,
        prefix_sep: " ",
        answer_prefix: &answer_prefix,
    })?;
    let needle = ctx.encode(&format!(" {answer_prefix} {activity}."))?;
    let budget = ctx.budget(&[&head, &needle, &tail])?;
    let mut until_break = 1 + rng.range_inclusive(3, 7);
    let pieces = ctx.fill(budget, || {
        until_break -= 1;
        let separator = if until_break == 0 {
            until_break = rng.range_inclusive(3, 7);
            "\n\n"
        } else {
            " "
        };
        ctx.encode(&format!("{separator}{}", sentence(rng)))
    })?;
    let (tokens, needle, depth) = ctx.assemble(&head, &pieces, &needle, &tail, depth);
    Ok(Built {
        tokens,
        needle,
        depth,
        answer: format!(" {activity}"),
    })
}

/// One haystack sentence from a random template.
fn sentence(rng: &mut SplitMix64) -> String {
    match rng.below(5) {
        0 => format!(
            "{}, {} {} {} {}.",
            capitalize(rng.pick(&TIMES)),
            rng.pick(&SUBJECTS),
            rng.pick(&VERBS),
            rng.pick(&OBJECTS),
            rng.pick(&PLACES)
        ),
        1 => format!(
            "{} {} {} because {}.",
            capitalize(rng.pick(&SUBJECTS)),
            rng.pick(&VERBS),
            rng.pick(&OBJECTS),
            rng.pick(&REASONS)
        ),
        2 => format!(
            "The {} was {} and the {} was {}.",
            rng.pick(&NOUNS),
            rng.pick(&ADJECTIVES),
            rng.pick(&NOUNS),
            rng.pick(&ADJECTIVES)
        ),
        3 => format!(
            "{}, {} {} {}.",
            capitalize(rng.pick(&PLACES)),
            rng.pick(&SUBJECTS),
            rng.pick(&VERBS),
            rng.pick(&OBJECTS)
        ),
        _ => format!(
            "Nobody expected that {} {} {} {}.",
            rng.pick(&SUBJECTS),
            rng.pick(&VERBS),
            rng.pick(&OBJECTS),
            rng.pick(&TIMES)
        ),
    }
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}
