//! `token_select`: within each key chunk of `block` tokens, the `keep` tokens with the highest score,
//! gathered, plus sink and local blocks (TCA-Attention's token selection, simplified).
//!
//! Score: the vertical score of [`super::vertical_slash::estimate`], i.e. the exact attention the last
//! `min(last_q, N)` queries pay to the token. TCA's redundancy term (penalizing tokens similar to
//! already chosen ones) is not applied: attention from the last queries already ranks the tokens a
//! future query needs, and keeping the score identical to the vertical one lets the statistics reuse
//! it. Ties go to the lower index. `keep` is clamped to the chunk size; sink and local follow
//! [`super::a_shape`].

use super::index::IndexBuilder;
use super::vertical_slash::estimate;
use super::{a_shape, HeadIndex, HeadQk, PatternContext};
use crate::error::{Error, Result};

/// Sorted selected tokens: the top `keep` of every chunk of `block` tokens by `score` (`[N]`).
pub fn select(score: &[f64], block: usize, keep: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for (c, chunk) in score.chunks(block.max(1)).enumerate() {
        let mut idx: Vec<usize> = (0..chunk.len()).collect();
        idx.sort_by(|&a, &b| chunk[b].total_cmp(&chunk[a]).then(a.cmp(&b)));
        idx.truncate(keep);
        idx.sort_unstable();
        out.extend(idx.into_iter().map(|i| c * block + i));
    }
    out
}

/// The token-select index of one head.
pub fn index(ctx: &PatternContext, qk: &HeadQk<'_>, p: &schemas::TokenSelect) -> Result<HeadIndex> {
    check(p)?;
    let (col, _) = estimate(ctx, qk)?;
    Ok(index_from_scores(ctx, &col, p))
}

/// Checks `block >= 1`.
pub fn check(p: &schemas::TokenSelect) -> Result<()> {
    if p.block == 0 {
        return Err(Error::Pattern {
            kind: "token_select",
            message: "block must be at least 1 token".into(),
        });
    }
    Ok(())
}

/// The index from the vertical scores `col` (`[N]`, as [`estimate`] returns them); `p` checked.
pub fn index_from_scores(ctx: &PatternContext, col: &[f64], p: &schemas::TokenSelect) -> HeadIndex {
    let block = (p.block as usize).max(1);
    let keep = ctx.resolve(&p.keep).min(block);
    let (sink, local) = (ctx.resolve(&p.sink), ctx.resolve(&p.local));
    let chosen = select(col, block, keep);
    let mut b = IndexBuilder::new(ctx);
    for qb in 0..ctx.q_blocks() {
        let (s, l) = a_shape::key_blocks(ctx, qb, sink, local);
        let last = ctx.q_rows(qb).end.saturating_sub(1);
        b.push(
            s.chain(l),
            chosen.iter().copied().take_while(|&j| j <= last),
        );
    }
    b.finish()
}
