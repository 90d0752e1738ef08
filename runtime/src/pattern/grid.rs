//! `grid`: periodic columns and diagonals plus sink and local blocks (MMInference's grid pattern for
//! frame-structured inputs, without the token permutation).
//!
//! With period `stride`, offset `phase < stride` and `width` in `[1, stride]`:
//! - columns: every key `j` with `(j - phase) mod stride < width` (Euclidean remainder), gathered;
//! - diagonals: every offset `o = i - j` with `o mod stride < width`, at block granularity like the
//!   slash lines of [`super::vertical_slash`]: a key block is computed for a query block when one of
//!   these diagonals touches a causal cell of the tile. With `stride < block_k` that is every causal
//!   block (dense); the pattern is meant for strides of a frame or more;
//! - sink and local blocks exactly as [`super::a_shape`].
//!
//! No online estimate: the cells depend on the context only.

use super::index::IndexBuilder;
use super::vertical_slash::block_slash_ranks;
use super::{a_shape, HeadIndex, PatternContext};
use crate::error::{Error, Result};

/// Checks `stride >= 1`, `phase < stride` and `1 <= width <= stride`.
pub fn check(p: &schemas::Grid) -> Result<()> {
    let (stride, phase, width) = (p.stride, p.phase, p.width);
    if stride == 0 || phase >= stride || width == 0 || width > stride {
        return Err(Error::Pattern {
            kind: "grid",
            message: format!(
                "needs stride >= 1, phase < stride, 1 <= width <= stride; got stride {stride}, \
                 phase {phase}, width {width}"
            ),
        });
    }
    Ok(())
}

/// The grid index.
pub fn index(ctx: &PatternContext, p: &schemas::Grid) -> Result<HeadIndex> {
    check(p)?;
    let (stride, phase, width) = (p.stride as usize, p.phase as usize, p.width as usize);
    let (sink, local) = (ctx.resolve(&p.sink), ctx.resolve(&p.local));
    let n = ctx.seq_len;
    // Chosen diagonals get rank 0, the others u32::MAX; a block is computed when its best rank is 0.
    let diag_rank: Vec<u32> = (0..n)
        .map(|o| if o % stride < width { 0 } else { u32::MAX })
        .collect();
    let block_rank = block_slash_ranks(ctx, &diag_rank);
    let columns: Vec<usize> = (0..n)
        .filter(|&j| (j + stride - phase) % stride < width)
        .collect();
    let nkb = ctx.k_blocks();
    let mut b = IndexBuilder::new(ctx);
    for qb in 0..ctx.q_blocks() {
        let (s, l) = a_shape::key_blocks(ctx, qb, sink, local);
        let slash =
            (0..ctx.causal_k_blocks(qb)).filter(|&kb| block_rank.get(qb * nkb + kb) == Some(&0));
        let last = ctx.q_rows(qb).end.saturating_sub(1);
        b.push(
            s.chain(l).chain(slash),
            columns.iter().copied().take_while(|&j| j <= last),
        );
    }
    Ok(b.finish())
}
