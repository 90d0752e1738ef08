//! `query_adaptive`: FlexPrefill's per-head choice between a query-aware block set and a
//! vertical-slash shape, made online from the last queries.
//!
//! 1. The true distribution: the exact causal attention of the last `L = min(last_q, N)` queries
//!    (the [`super::vertical_slash::estimate`] column scores), pooled into key blocks and normalized.
//! 2. The pooled estimate: `mean(Q of the last L rows) · mean(K of kb) / sqrt(d)`, softmax over all
//!    key blocks.
//! 3. `js` = Jensen-Shannon divergence of the two (natural log, so in `[0, ln 2]`; no square root).
//! 4. `js < tau`: query-aware: per query block, the [`super::block_sparse`] ranking with
//!    `coverage = gamma`, at least `min_budget` blocks.
//!    Otherwise: vertical-slash with the fewest top columns whose vertical scores reach `gamma` of
//!    their total, and likewise for diagonals; each at least `min_budget * block_k` tokens.

use super::block_sparse::{BlockChoice, BlockRanking};
use super::rank::dot;
use super::vertical_slash::VsRanking;
use super::{HeadIndex, HeadQk, PatternContext};
use crate::error::{Error, Result};

/// Jensen-Shannon divergence (natural log) between the pooled estimate and the true block distribution
/// of the last queries; `vs` must be this head's ranking.
pub fn divergence(ctx: &PatternContext, qk: &HeadQk<'_>, vs: &VsRanking) -> f64 {
    let nkb = ctx.k_blocks();
    let rows = ctx.last_rows();
    let d = qk.head_dim;
    let mut qbar = vec![0.0f32; d];
    for i in rows.clone() {
        for (a, &x) in qbar.iter_mut().zip(qk.q_row(i)) {
            *a += x / rows.len() as f32;
        }
    }
    let scale = 1.0 / (d as f64).sqrt();
    let mut est: Vec<f64> = (0..nkb)
        .map(|kb| {
            let cols = ctx.k_cols(kb);
            let mut kbar = vec![0.0f32; d];
            for j in cols.clone() {
                for (a, &x) in kbar.iter_mut().zip(qk.k_row(j)) {
                    *a += x / cols.len() as f32;
                }
            }
            f64::from(dot(&qbar, &kbar)) * scale
        })
        .collect();
    let m = est.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    est.iter_mut().for_each(|x| *x = (*x - m).exp());
    let z: f64 = est.iter().sum();
    let truth: Vec<f64> = (0..nkb)
        .map(|kb| {
            vs.col_scores
                .get(ctx.k_cols(kb))
                .map_or(0.0, |c| c.iter().sum())
        })
        .collect();
    let t: f64 = truth.iter().sum();
    let kl = |p: f64, mid: f64| if p > 0.0 { p * (p / mid).ln() } else { 0.0 };
    est.iter()
        .zip(&truth)
        .map(|(&e, &a)| {
            let (p, q) = (e / z, a / t);
            let mid = 0.5 * (p + q);
            0.5 * kl(p, mid) + 0.5 * kl(q, mid)
        })
        .sum()
}

/// Checks `gamma` in `(0, 1]` and `tau >= 0`.
pub fn check(p: &schemas::QueryAdaptive) -> Result<()> {
    let valid = p.gamma > 0.0 && p.gamma <= 1.0 && p.tau >= 0.0;
    if valid {
        Ok(())
    } else {
        Err(Error::Pattern {
            kind: "query_adaptive",
            message: format!(
                "needs gamma in (0, 1] and tau >= 0, got gamma {}, tau {}",
                p.gamma, p.tau
            ),
        })
    }
}

/// Whether a head whose divergence is `js` takes the query-aware branch.
pub fn is_query_aware(js: f64, p: &schemas::QueryAdaptive) -> bool {
    js < p.tau
}

/// The query-aware branch: per query block, the block ranking's coverage of `gamma`, at least
/// `min_budget` blocks.
pub fn query_aware_index(
    ctx: &PatternContext,
    blocks: &BlockRanking,
    p: &schemas::QueryAdaptive,
) -> HeadIndex {
    let choice = BlockChoice::CoverageAtLeast(p.gamma, ctx.resolve(&p.min_budget));
    blocks.index_with(ctx, |qb| blocks.count(qb, choice))
}

/// The vertical-slash branch: the fewest top columns, and diagonals, whose scores reach `gamma` of
/// their total, each at least `min_budget * block_k` tokens.
pub fn vertical_slash_index(
    ctx: &PatternContext,
    vs: &VsRanking,
    p: &schemas::QueryAdaptive,
) -> HeadIndex {
    let (v, s) = vertical_slash_budgets(ctx, vs, p);
    vs.index(ctx, v, s)
}

/// The vertical and slash budgets (tokens) of the vertical-slash branch, before
/// [`super::vertical_slash::clamp_budgets`].
pub fn vertical_slash_budgets(
    ctx: &PatternContext,
    vs: &VsRanking,
    p: &schemas::QueryAdaptive,
) -> (usize, usize) {
    let min_tokens = ctx.resolve(&p.min_budget).saturating_mul(ctx.block_k);
    let v = vs
        .columns
        .coverage_count(&vs.col_scores, p.gamma, min_tokens);
    let s = vs
        .diagonals
        .coverage_count(&vs.diag_scores, p.gamma, min_tokens);
    (v, s)
}

/// The query-adaptive index of one head. The profiler scores candidates with the same branch
/// functions ([`divergence`], [`query_aware_index`], [`vertical_slash_index`]).
pub fn index(
    ctx: &PatternContext,
    qk: &HeadQk<'_>,
    p: &schemas::QueryAdaptive,
) -> Result<HeadIndex> {
    check(p)?;
    let vs = VsRanking::new(ctx, qk)?;
    if is_query_aware(divergence(ctx, qk, &vs), p) {
        Ok(query_aware_index(ctx, &BlockRanking::new(ctx, qk)?, p))
    } else {
        Ok(vertical_slash_index(ctx, &vs, p))
    }
}
