//! `a_shape` and `streaming`: sink blocks plus the blocks touching the local window (MInference's
//! A-shape), at kernel block granularity.
//!
//! For query block `qb` with rows `r0..r1`:
//! - sink: key blocks `0 .. ceil(sink / block_k)` (the blocks covering the first `sink` tokens);
//! - local: key blocks touching `[i - local + 1, i]` for some row `i` of the block, i.e. blocks
//!   `(r0 + 1 - local) / block_k ..= (r1 - 1) / block_k` (clamped at 0).
//!
//! `local` is clamped to `[1, N]` so every row sees itself; `sink` to `[0, N]`. Streaming computes the
//! same prefill cells (`recent` is the local window); it differs only at decode time, where the runtime
//! may evict the KV cache outside sink and window.

use std::ops::Range;

use super::index::IndexBuilder;
use super::{HeadIndex, PatternContext};

/// `(sink, local)` clamped to what exists: `sink <= N`, `1 <= local <= N`.
pub fn clamp_budgets(ctx: &PatternContext, sink: usize, local: usize) -> (usize, usize) {
    let n = ctx.seq_len;
    (sink.min(n), local.clamp(1, n.max(1)))
}

/// The sink key blocks and the local key blocks of query block `qb` (the two ranges may overlap;
/// neither goes past the block's causal key blocks). Budgets are clamped first.
pub fn key_blocks(
    ctx: &PatternContext,
    qb: usize,
    sink: usize,
    local: usize,
) -> (Range<usize>, Range<usize>) {
    let (sink, local) = clamp_budgets(ctx, sink, local);
    let rows = ctx.q_rows(qb);
    let causal = ctx.causal_k_blocks(qb);
    if rows.is_empty() {
        return (0..0, 0..0);
    }
    let sink_blocks = 0..sink.div_ceil(ctx.block_k).min(causal);
    let first_key = (rows.start + 1).saturating_sub(local);
    let local_blocks = (first_key / ctx.block_k).min(causal)..causal;
    (sink_blocks, local_blocks)
}

/// The A-shape index.
pub fn index(ctx: &PatternContext, sink: usize, local: usize) -> HeadIndex {
    let mut b = IndexBuilder::new(ctx);
    for qb in 0..ctx.q_blocks() {
        let (s, l) = key_blocks(ctx, qb, sink, local);
        b.push(s.chain(l), []);
    }
    b.finish()
}
