//! Exact attention statistics, streamed in tiles (DESIGN §2–§4).
//!
//! - [`layer_stats`]: one layer's [`AttentionInput`] (one sample) → one [`HeadStats`] per query head,
//!   from the exact causal softmax computed per query block ([`RowBlock`]: scores of its causal tiles,
//!   row max and sum, then normalized probabilities consumed tile by tile). Memory
//!   `O(N * d + threads * block_q * N)`, never `N x N`.
//! - [`HeadStats`]: sums, so statistics of samples, layers ranges or machines merge by addition
//!   ([`HeadStats::merge`]). Descriptive: sink mass (first [`SINK_TOKENS`] keys), mass by distance on
//!   log-spaced bins (the local-window curve), mean row entropy in bits, block-pooled heat map
//!   `[q_blocks][causal key blocks]`. Sufficient: histograms from which the recall and density of every
//!   candidate on the budget grid are read exactly ([`HeadStats::recall_vertical_slash`],
//!   [`HeadStats::recall_a_shape`], [`HeadStats::recall_block_top_k`],
//!   [`HeadStats::recall_block_coverage`]).
//! - [`HeadStats::tail`]: the same sufficient statistics restricted to the last query blocks
//!   ([`StatsConfig::tail_q`] rows), so a plan can be held to the recall of the rows that produce an
//!   answer as well as to the mean over all rows.
//! - [`dynamic`]: families without sufficient statistics (query-adaptive, token-select, grid), scored
//!   exactly per candidate during the same pass ([`layer_stats_scored`], [`HeadStats::dynamic`]).
//! - [`period`]: the strides at which heads' attention repeats, found on one sample so that grid
//!   candidates are scored where the data has a period.
//! - [`recall_of_index`]: the direct evaluator for any [`runtime::HeadIndex`] (the ground truth the
//!   statistics are tested against).
//! - [`rank_edges`] and [`COVERAGE_GRID`]: the budget grids, defined once.
//!
//! # Exactness
//! Recall is mass in computed cells, mean over rows (`mass / rows`). Every rule reads the same ranking
//! code as `runtime::pattern`:
//! - vertical-slash: cell `(i, j)` is computed iff `col_rank[j] < v || block_slash_rank[qb][kb] < s`
//!   (`runtime::pattern::vertical_slash`), with forced columns and diagonal 0 inside the rankings and
//!   columns inside computed blocks counted once by the OR. Mass and cells go to a 2-D histogram over
//!   (column-rank bucket, block-slash-rank bucket): exact for `v`, `s` on the edges.
//! - a-shape/streaming: key block `kb` of query block `qb` is computed iff `kb * block_k < sink` or
//!   `max(0, r0 + 1 - (kb + 1) * block_k) < local`: the same kind of histogram over tile ranks.
//! - block-sparse: the exact mass of each tile summed along the runtime's per-query-block ranking:
//!   exact for every `top_k`, and for `coverage` on [`COVERAGE_GRID`].
//!
//! The statistics use f32 scores like the kernels; they agree with an f64 dense computation to about
//! 1e-6 in recall (tested), and cell counts agree exactly.

mod accumulate;
mod direct;
pub mod dynamic;
mod edges;
mod head;
pub mod period;
mod tile;

use runtime::pattern::PatternContext;
use schemas::Defaults;

pub use accumulate::{layer_stats, layer_stats_scored};
pub use direct::{recall_of_index, RowRecall};
pub use edges::{bucket, buckets_below, is_exact, rank_edges, COVERAGE_GRID};
pub use head::{Curve, HeadStats, RankHistogram, Recall};
pub use tile::{exp2_fast, PackedKeys, RowBlock};

#[doc(no_inline)]
pub use runtime::AttentionInput;

/// Keys counted as the attention sink in [`HeadStats::sink_mass`]: the first four tokens
/// (StreamingLLM's choice).
pub const SINK_TOKENS: usize = 4;

/// The kernel block sizes and estimate window the statistics are taken at; they must match the plan's
/// defaults for the recall read-outs to be the runtime's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsConfig {
    pub block_q: usize,
    pub block_k: usize,
    pub last_q: usize,
    /// Last query rows whose statistics are also kept apart ([`HeadStats::tail`]), rounded out to
    /// whole query blocks; 0 keeps none.
    pub tail_q: usize,
}

/// Default [`StatsConfig::tail_q`]: the last 256 rows, where a prompt's question and the answer
/// being produced sit (retrieval is decided there, see docs/design.md).
pub const TAIL_Q: usize = 256;

impl Default for StatsConfig {
    /// Blocks of 64, the last 64 queries, a tail of [`TAIL_Q`] rows.
    fn default() -> Self {
        Self {
            block_q: 64,
            block_k: 64,
            last_q: 64,
            tail_q: TAIL_Q,
        }
    }
}

impl StatsConfig {
    /// The plan defaults' block sizes and `last_q`, and a tail of [`TAIL_Q`] rows.
    pub fn from_defaults(defaults: &Defaults) -> Self {
        Self {
            block_q: defaults.block_q as usize,
            block_k: defaults.block_k as usize,
            last_q: defaults.last_q as usize,
            tail_q: TAIL_Q,
        }
    }

    /// First query block of the tail at `seq_len` (the block holding row `seq_len - tail_q`);
    /// `None` without a tail.
    pub fn tail_start(&self, seq_len: usize) -> Option<usize> {
        (self.tail_q > 0).then(|| seq_len.saturating_sub(self.tail_q) / self.block_q.max(1))
    }

    /// The pattern context at `seq_len`.
    pub fn context(&self, seq_len: usize) -> PatternContext {
        PatternContext {
            seq_len,
            block_q: self.block_q,
            block_k: self.block_k,
            last_q: self.last_q,
        }
    }
}
