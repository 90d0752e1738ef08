//! `block_sparse`: top key blocks per query block by a pooled estimate.
//!
//! # Estimate ([`BlockRanking::new`])
//! For query block `qb` and key block `kb`: `mean(Q rows of qb) · mean(K rows of kb) / sqrt(d)` (f64),
//! softmax over the causal key blocks of `qb` (`kb * block_k <= last row of qb`). Each query block's
//! estimate sums to 1.
//!
//! # Ranking and cells
//! Per query block, the forced blocks rank first: block 0 (the sink) and the diagonal blocks (the key
//! blocks holding the block's own rows, so every row sees itself), in index order; then the other
//! causal blocks by descending estimate, ties to the lower index.
//! - `top_k = k`: the first `max(k, forced)` blocks of the ranking (nested in `k`).
//! - `coverage = c`: the fewest leading blocks, at least the forced ones, whose estimated mass sums to
//!   `>= c` (all blocks when rounding keeps the sum below `c`; nested in `c`).
//!
//! The profiler's statistics store the exact mass by rank position of this ranking.

use super::index::IndexBuilder;
use super::{HeadIndex, HeadQk, PatternContext};
use crate::error::{Error, Result};

/// Per query block, the causal key blocks in rank order with their estimated mass.
#[derive(Debug, Clone)]
pub struct BlockRanking {
    /// `q_blocks + 1` offsets into `order` and `estimate`.
    start: Vec<usize>,
    order: Vec<u32>,
    estimate: Vec<f64>,
    forced: Vec<usize>,
}

/// `[q_blocks * k_blocks]` row-major: the pooled estimate; 0 for non-causal tiles.
pub fn estimate(ctx: &PatternContext, qk: &HeadQk<'_>) -> Result<Vec<f64>> {
    let (nqb, nkb) = (ctx.q_blocks(), ctx.k_blocks());
    let d = qk.head_dim;
    if qk.seq_len() != ctx.seq_len {
        return Err(Error::Shape(format!(
            "head has {} tokens, context seq_len is {}",
            qk.seq_len(),
            ctx.seq_len
        )));
    }
    let qbar: Vec<Vec<f64>> = (0..nqb)
        .map(|qb| mean_rows(qk.q, d, ctx.q_rows(qb)))
        .collect();
    let kbar: Vec<Vec<f64>> = (0..nkb)
        .map(|kb| mean_rows(qk.k, d, ctx.k_cols(kb)))
        .collect();
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0f64; nqb * nkb];
    for (qb, row) in out.chunks_exact_mut(nkb.max(1)).enumerate().take(nqb) {
        let causal = ctx.causal_k_blocks(qb);
        let row = &mut row[..causal];
        let mut m = f64::NEG_INFINITY;
        for (kb, x) in row.iter_mut().enumerate() {
            *x = qbar[qb]
                .iter()
                .zip(&kbar[kb])
                .map(|(a, b)| a * b)
                .sum::<f64>()
                * scale;
            m = m.max(*x);
        }
        let mut z = 0.0;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            z += *x;
        }
        if !z.is_finite() || z <= 0.0 {
            return Err(Error::Pattern {
                kind: "block_sparse",
                message: format!("non-finite pooled scores for query block {qb}"),
            });
        }
        row.iter_mut().for_each(|x| *x /= z);
    }
    Ok(out)
}

/// Mean of rows `rows` of `data` (`[_, d]` row-major), in f64.
fn mean_rows(data: &[f32], d: usize, rows: std::ops::Range<usize>) -> Vec<f64> {
    let mut m = vec![0.0f64; d];
    let count = rows.len().max(1) as f64;
    for row in data
        .get(rows.start * d..rows.end * d)
        .unwrap_or(&[])
        .chunks_exact(d)
    {
        for (a, &x) in m.iter_mut().zip(row) {
            *a += f64::from(x);
        }
    }
    m.iter_mut().for_each(|a| *a /= count);
    m
}

impl BlockRanking {
    /// Estimates and ranks from the head's live Q and K.
    pub fn new(ctx: &PatternContext, qk: &HeadQk<'_>) -> Result<Self> {
        ctx.check()?;
        let est = estimate(ctx, qk)?;
        Ok(Self::from_estimate(ctx, &est))
    }

    /// Ranks a given estimate (`[q_blocks * k_blocks]`, see [`estimate`]).
    pub fn from_estimate(ctx: &PatternContext, est: &[f64]) -> Self {
        let nkb = ctx.k_blocks();
        let mut r = Self {
            start: vec![0],
            order: Vec::new(),
            estimate: Vec::new(),
            forced: Vec::new(),
        };
        for qb in 0..ctx.q_blocks() {
            let causal = ctx.causal_k_blocks(qb);
            let row = est.get(qb * nkb..qb * nkb + causal).unwrap_or(&[]);
            let score = |kb: usize| row.get(kb).copied().unwrap_or(0.0);
            let rows = ctx.q_rows(qb);
            let diag_first = rows.start / ctx.block_k;
            let is_forced = |kb: usize| kb == 0 || kb >= diag_first;
            let mut rest: Vec<u32> = (0..causal)
                .filter(|&kb| !is_forced(kb))
                .map(|kb| kb as u32)
                .collect();
            rest.sort_by(|&a, &b| {
                score(b as usize)
                    .total_cmp(&score(a as usize))
                    .then(a.cmp(&b))
            });
            let first = r.order.len();
            r.order
                .extend((0..causal).filter(|&kb| is_forced(kb)).map(|kb| kb as u32));
            r.forced.push(r.order.len() - first);
            r.order.extend(rest);
            r.estimate
                .extend(r.order[first..].iter().map(|&kb| score(kb as usize)));
            r.start.push(r.order.len());
        }
        r
    }

    /// Causal key blocks of query block `qb` in rank order.
    pub fn order(&self, qb: usize) -> &[u32] {
        self.slice(qb).map_or(&[], |r| &self.order[r])
    }

    /// Estimated mass by rank position (same layout as [`BlockRanking::order`]).
    pub fn estimated_mass(&self, qb: usize) -> &[f64] {
        self.slice(qb).map_or(&[], |r| &self.estimate[r])
    }

    fn slice(&self, qb: usize) -> Option<std::ops::Range<usize>> {
        Some(*self.start.get(qb)?..*self.start.get(qb + 1)?)
    }

    /// Forced blocks (ranked first) of query block `qb`.
    pub fn forced(&self, qb: usize) -> usize {
        self.forced.get(qb).copied().unwrap_or(0)
    }

    /// Blocks kept for `qb` at `top_k = k`.
    pub fn top_k_count(&self, qb: usize, k: usize) -> usize {
        k.max(self.forced(qb)).min(self.order(qb).len())
    }

    /// Blocks kept for `qb` at `coverage = c`.
    pub fn coverage_count(&self, qb: usize, coverage: f64) -> usize {
        let est = self.estimated_mass(qb);
        let forced = self.forced(qb);
        let mut sum = 0.0;
        for (r, &e) in est.iter().enumerate() {
            sum += e;
            if r + 1 >= forced && sum >= coverage {
                return r + 1;
            }
        }
        est.len()
    }

    /// Blocks kept for `qb` by `choice`.
    pub fn count(&self, qb: usize, choice: BlockChoice) -> usize {
        match choice {
            BlockChoice::TopK(k) => self.top_k_count(qb, k),
            BlockChoice::Coverage(c) => self.coverage_count(qb, c),
            BlockChoice::CoverageAtLeast(c, floor) => self
                .coverage_count(qb, c)
                .max(floor.min(self.order(qb).len())),
        }
    }

    /// The index keeping `count(qb)` leading blocks per query block.
    pub fn index_with(&self, ctx: &PatternContext, count: impl Fn(usize) -> usize) -> HeadIndex {
        let mut b = IndexBuilder::new(ctx);
        for qb in 0..ctx.q_blocks() {
            let order = self.order(qb);
            let n = count(qb).min(order.len());
            b.push(order[..n].iter().map(|&kb| kb as usize), []);
        }
        b.finish()
    }
}

/// How many leading blocks of the ranking a head keeps per query block: a plan's `block_sparse`
/// resolved at a length, or `query_adaptive`'s query-aware branch. The CUDA block-sparse builder takes
/// the same choice per head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BlockChoice {
    /// `top_k`: this many key blocks per query block in all (at least the forced ones).
    TopK(usize),
    /// `coverage`: the fewest leading blocks whose estimated mass reaches this, in `(0, 1]`.
    Coverage(f64),
    /// `coverage` with a floor: at least this many blocks in all (clamped to the causal ones), as
    /// `query_adaptive`'s query-aware branch.
    CoverageAtLeast(f64, usize),
}

impl BlockChoice {
    /// The choice of a plan's `block_sparse` pattern at `ctx` (budgets resolved at its `seq_len`).
    ///
    /// Errors: [`Error::Pattern`] unless exactly one of `top_k` and `coverage` (in `(0, 1]`) is set.
    pub fn from_pattern(p: &schemas::BlockSparse, ctx: &PatternContext) -> Result<Self> {
        match (&p.top_k, p.coverage) {
            (Some(k), None) => Ok(Self::TopK(ctx.resolve(k))),
            (None, Some(c)) if c > 0.0 && c <= 1.0 => Ok(Self::Coverage(c)),
            _ => Err(Error::Pattern {
                kind: "block_sparse",
                message: format!(
                    "needs exactly one of top_k and coverage (in (0, 1]), got top_k {:?}, coverage {:?}",
                    p.top_k, p.coverage
                ),
            }),
        }
    }
}

/// The block-sparse index of one head (exactly one of `top_k` and `coverage`).
pub fn index(ctx: &PatternContext, qk: &HeadQk<'_>, p: &schemas::BlockSparse) -> Result<HeadIndex> {
    let choice = BlockChoice::from_pattern(p, ctx)?;
    let ranking = BlockRanking::new(ctx, qk)?;
    Ok(ranking.index_with(ctx, |qb| ranking.count(qb, choice)))
}
