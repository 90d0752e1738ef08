//! `dense`: every causal cell, i.e. for query block `qb` every key block with a causal cell.
//!
//! The runtime also runs dense below `defaults.dense_below`; that choice belongs to the executor.

use super::index::IndexBuilder;
use super::{HeadIndex, PatternContext};

/// All causal key blocks for every query block.
pub fn index(ctx: &PatternContext) -> HeadIndex {
    let mut b = IndexBuilder::new(ctx);
    for qb in 0..ctx.q_blocks() {
        b.push(0..ctx.causal_k_blocks(qb), []);
    }
    b.finish()
}
