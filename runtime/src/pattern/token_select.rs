//! `token_select`: within each key chunk of `block` tokens, the tokens with the highest score,
//! gathered, plus sink and local blocks (TCA-Attention's token selection, simplified).
//!
//! Score: the vertical score of [`super::vertical_slash::estimate`], i.e. the exact attention the last
//! `min(last_q, N)` queries pay to the token. TCA's redundancy term (penalizing tokens similar to
//! already chosen ones) is not applied: attention from the last queries already ranks the tokens a
//! future query needs, and keeping the score identical to the vertical one lets the statistics reuse
//! it. Ties go to the lower index. Sink and local follow [`super::a_shape`].
//!
//! Tokens per chunk: `keep` (clamped to the chunk size) in every chunk without a `spread`; with
//! `spread = s > 0`, TCA's per-head distribution of budgets: chunks are ranked by their summed score
//! (ties to the lower chunk) and the chunk of rank `r` among `C` keeps
//! `2^round(log2(keep) + s·Φ⁻¹(1 - (r + ½)/C))` tokens, clamped to `[1, block]` ([`keeps_by_rank`]):
//! a log-Gaussian over `{1, 2, 4, …, block}` whose median is `keep`, its larger counts going to the
//! chunks the last queries read most.

use super::index::IndexBuilder;
use super::vertical_slash::estimate;
use super::{a_shape, HeadIndex, HeadQk, PatternContext};
use crate::error::{Error, Result};

/// Sorted selected tokens: the top `keep` of every chunk of `block` tokens by `score` (`[N]`), or,
/// with `spread > 0`, the chunk's count from [`keeps_by_rank`].
pub fn select(score: &[f64], block: usize, keep: usize, spread: f64) -> Vec<usize> {
    let block = block.max(1);
    let keeps = chunk_keeps(score, block, keep, spread);
    let mut out = Vec::new();
    for ((c, chunk), &k) in score.chunks(block).enumerate().zip(&keeps) {
        let mut idx: Vec<usize> = (0..chunk.len()).collect();
        idx.sort_by(|&a, &b| chunk[b].total_cmp(&chunk[a]).then(a.cmp(&b)));
        idx.truncate(k);
        idx.sort_unstable();
        out.extend(idx.into_iter().map(|i| c * block + i));
    }
    out
}

/// Tokens kept in each chunk of `block` tokens of `score`, in chunk order.
pub fn chunk_keeps(score: &[f64], block: usize, keep: usize, spread: f64) -> Vec<usize> {
    let block = block.max(1);
    let chunks = score.len().div_ceil(block);
    if spread <= 0.0 {
        return vec![keep.min(block); chunks];
    }
    let sums: Vec<f64> = score.chunks(block).map(|c| c.iter().sum()).collect();
    let mut order: Vec<usize> = (0..chunks).collect();
    order.sort_by(|&a, &b| sums[b].total_cmp(&sums[a]).then(a.cmp(&b)));
    let by_rank = keeps_by_rank(chunks, block, keep, spread);
    let mut keeps = vec![0; chunks];
    for (&c, &k) in order.iter().zip(&by_rank) {
        keeps[c] = k;
    }
    keeps
}

/// Tokens kept by the chunk of each rank (0 = most attended) among `chunks`: with `spread = s > 0`,
/// `2^round(log2(keep) + s·Φ⁻¹(1 - (r + ½)/chunks))` clamped to `[1, block]`; `keep` (clamped to
/// `block`) for every rank otherwise. `round` is half away from zero.
pub fn keeps_by_rank(chunks: usize, block: usize, keep: usize, spread: f64) -> Vec<usize> {
    let block = block.max(1);
    if spread <= 0.0 {
        return vec![keep.min(block); chunks];
    }
    let median = (keep.max(1) as f64).log2();
    let top = (block as f64).log2().floor();
    (0..chunks)
        .map(|r| {
            let u = 1.0 - (r as f64 + 0.5) / chunks as f64;
            let e = (median + spread * normal_quantile(u))
                .round()
                .clamp(0.0, top);
            (e.exp2() as usize).clamp(1, block)
        })
        .collect()
}

/// The standard normal quantile `Φ⁻¹(p)` for `p` in `(0, 1)` (Acklam's rational approximation,
/// relative error below 1.2e-9; exact enough to place a chunk among powers of two).
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const LOW: f64 = 0.024_25;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p <= 0.0 {
        f64::NEG_INFINITY
    } else if p >= 1.0 {
        f64::INFINITY
    } else if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The token-select index of one head.
pub fn index(ctx: &PatternContext, qk: &HeadQk<'_>, p: &schemas::TokenSelect) -> Result<HeadIndex> {
    check(p)?;
    let (col, _) = estimate(ctx, qk)?;
    Ok(index_from_scores(ctx, &col, p))
}

/// Checks `block >= 1` and a finite `spread >= 0`.
pub fn check(p: &schemas::TokenSelect) -> Result<()> {
    if p.block == 0 {
        return Err(Error::Pattern {
            kind: "token_select",
            message: "block must be at least 1 token".into(),
        });
    }
    if !(p.spread.is_finite() && p.spread >= 0.0) {
        return Err(Error::Pattern {
            kind: "token_select",
            message: format!("spread {} must be a finite number >= 0", p.spread),
        });
    }
    Ok(())
}

/// A plan's `token_select` resolved at a length: what [`index_from_scores`] keeps, and what the CUDA
/// token-select builder takes per head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenChoice {
    /// Chunk length (tokens, at least 1).
    pub block: usize,
    /// Tokens kept per chunk (the median with a spread), at most `block`.
    pub keep: usize,
    /// TCA's spread of per-chunk counts (0: `keep` in every chunk).
    pub spread: f64,
    /// Sink tokens and local window, as `a_shape`.
    pub sink: usize,
    pub local: usize,
}

impl TokenChoice {
    /// The choice of `p` at `ctx`, which must be [`check`]ed.
    pub fn resolve(p: &schemas::TokenSelect, ctx: &PatternContext) -> Self {
        let block = (p.block as usize).max(1);
        Self {
            block,
            keep: ctx.resolve(&p.keep).min(block),
            spread: p.spread,
            sink: ctx.resolve(&p.sink),
            local: ctx.resolve(&p.local),
        }
    }

    /// [`check`], then [`TokenChoice::resolve`].
    pub fn from_pattern(p: &schemas::TokenSelect, ctx: &PatternContext) -> Result<Self> {
        check(p)?;
        Ok(Self::resolve(p, ctx))
    }
}

/// The index from the vertical scores `col` (`[N]`, as [`estimate`] returns them); `p` checked.
pub fn index_from_scores(ctx: &PatternContext, col: &[f64], p: &schemas::TokenSelect) -> HeadIndex {
    let c = TokenChoice::resolve(p, ctx);
    let chosen = select(col, c.block, c.keep, c.spread);
    let mut b = IndexBuilder::new(ctx);
    for qb in 0..ctx.q_blocks() {
        let (s, l) = a_shape::key_blocks(ctx, qb, c.sink, c.local);
        let last = ctx.q_rows(qb).end.saturating_sub(1);
        b.push(
            s.chain(l),
            chosen.iter().copied().take_while(|&j| j <= last),
        );
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantile_matches_known_values() {
        // Φ⁻¹ at 0.5, 0.975, 0.999 and their mirrors (values from the normal table, 1e-9).
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959_963_984_540_054),
            (0.999, 3.090_232_306_167_813),
            (0.01, -2.326_347_874_040_841),
        ] {
            assert!(
                (normal_quantile(p) - z).abs() < 1e-8,
                "{p}: {}",
                normal_quantile(p)
            );
            assert!((normal_quantile(1.0 - p) + z).abs() < 1e-8, "{p}");
        }
    }

    #[test]
    fn spread_gives_a_log_gaussian_over_powers_of_two_with_median_keep() {
        let keeps = keeps_by_rank(101, 64, 8, 1.0);
        // Most attended first, never increasing, powers of two within [1, 64].
        assert!(keeps.windows(2).all(|w| w[0] >= w[1]), "{keeps:?}");
        assert!(keeps.iter().all(|k| k.is_power_of_two() && *k <= 64));
        assert_eq!(keeps[50], 8, "the median chunk keeps `keep`");
        // Shares per power: Φ(±0.5) etc. -> 1/8/... roughly symmetric in log2 around 3.
        let count = |k: usize| keeps.iter().filter(|&&x| x == k).count();
        assert_eq!(count(8), 39, "|z| < 0.5: 38.3% of 101");
        assert_eq!(count(16), count(4));
        assert_eq!(count(32), count(2));
        // No spread: `keep` everywhere (clamped to the block).
        assert_eq!(keeps_by_rank(5, 64, 8, 0.0), vec![8; 5]);
        assert_eq!(keeps_by_rank(2, 4, 8, 0.0), vec![4; 2]);
    }

    #[test]
    fn the_most_attended_chunks_get_the_largest_counts() {
        // Four chunks of 4 tokens; chunk 2 most attended, then 0, 3, 1.
        let score = [
            0.3, 0.2, 0.1, 0.0, //
            0.0, 0.0, 0.0, 0.01, //
            0.9, 0.8, 0.7, 0.6, //
            0.05, 0.0, 0.1, 0.0,
        ];
        let keeps = chunk_keeps(&score, 4, 2, 2.0);
        let by_rank = keeps_by_rank(4, 4, 2, 2.0);
        assert_eq!(keeps, vec![by_rank[1], by_rank[3], by_rank[0], by_rank[2]]);
        assert!(by_rank[0] > by_rank[3], "{by_rank:?}");
        let chosen = select(&score, 4, 2, 2.0);
        let in_chunk = |c: usize| chosen.iter().filter(|&&j| j / 4 == c).count();
        assert_eq!((0..4).map(in_chunk).collect::<Vec<_>>(), keeps);
        // Within a chunk the highest scores win, ties to the lower index.
        assert!(chosen.starts_with(&[0]));
        assert_eq!(select(&score, 4, 1, 0.0), vec![0, 7, 8, 14]);
    }
}
