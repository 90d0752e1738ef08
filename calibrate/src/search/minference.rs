//! MInference's offline search, replayed on our statistics for a like-for-like comparison.
//!
//! MInference (`minference/modules/minference_forward.py`, `search_pattern`) scores, per head, a fixed
//! list of candidates by attention recall and keeps the best-scoring one:
//! - `stream_llm` (100 sink tokens, 800 local), run as vertical-slash (100, 800);
//! - vertical-slash (30, 800), (100, 750), (500, 700), (3500, 100);
//! - block-sparse keeping 1/8 of the blocks, run as vertical-slash (1000, 6096).
//!
//! We score the same list with our exact statistics and report the cells of what would run. Two
//! differences, both in MInference's favour or neutral: our recall averages all rows (MInference's,
//! rows from 2500 on), and our vertical-slash ranking forces 4 columns and the main diagonal where
//! MInference's forces 30 and 30. The "single best candidate for all heads" is vertical-slash
//! (1000, 6096), MInference's default.

use serde::Serialize;

use super::{Candidate, HeadSamples, Scored};

/// What MInference would pick for one head, and what it would run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MInferenceChoice {
    /// The candidate that scored best (as MInference scores it).
    pub scored_as: Candidate,
    /// The pattern MInference runs for it.
    pub runs: Candidate,
    /// Recall and density of what runs.
    pub run: Scored,
}

/// MInference's candidates: (how it scores them, what it runs).
pub fn candidates(blocks: usize) -> Vec<(Candidate, Candidate)> {
    let vs = |vertical, slash| Candidate::VerticalSlash { vertical, slash };
    vec![
        (
            Candidate::AShape {
                sink: 100,
                local: 800,
            },
            vs(100, 800),
        ),
        (vs(30, 800), vs(30, 800)),
        (vs(100, 750), vs(100, 750)),
        (vs(500, 700), vs(500, 700)),
        (vs(3500, 100), vs(3500, 100)),
        (
            Candidate::BlockTopK {
                top_k: (blocks / 8).max(1),
            },
            vs(1000, 6096),
        ),
    ]
}

/// MInference's per-head choice on these samples.
pub fn choose(head: &HeadSamples) -> MInferenceChoice {
    let blocks = head.sum().stats.block_top_k.mass.len();
    let mut best: Option<(f64, Candidate, Candidate)> = None;
    for (scored_as, runs) in candidates(blocks) {
        let score = head.score(scored_as).recall;
        if best.is_none_or(|(b, _, _)| score > b) {
            best = Some((score, scored_as, runs));
        }
    }
    let (_, scored_as, runs) = best.unwrap_or((
        0.0,
        Candidate::VerticalSlash {
            vertical: 1000,
            slash: 6096,
        },
        Candidate::VerticalSlash {
            vertical: 1000,
            slash: 6096,
        },
    ));
    MInferenceChoice {
        scored_as,
        runs,
        run: head.score(runs),
    }
}

/// MInference's single default for every head.
pub fn single_best(head: &HeadSamples) -> Scored {
    head.score(Candidate::VerticalSlash {
        vertical: 1000,
        slash: 6096,
    })
}
