//! `vertical_slash`: top key columns and top diagonals, estimated online from the last queries
//! (MInference).
//!
//! # Estimate ([`estimate`])
//! For each of the last `L = min(last_q, N)` rows `i` of the head: the exact causal softmax of
//! `q_i · k_j / sqrt(d)` over `j <= i` (dot products in f32, softmax and sums in f64). Summed over those
//! rows per key column `j` gives the vertical scores `col_scores[j]`; per diagonal offset `o = i - j`
//! the slash scores `diag_scores[o]`. Both have `N` entries and sum to `L`.
//!
//! # Ranking ([`VsRanking`])
//! Columns `0..FORCED_COLUMNS` (the attention sink) rank first, then by descending vertical score;
//! diagonal offsets `0..FORCED_DIAGONALS` (offset 0: every row sees itself) rank first, then by
//! descending slash score; ties to the lower index ([`Ranking::by_score`]). MInference forces 30 columns
//! and 100 diagonals at 64-token blocks; we force 4 columns and offset 0 only, because offset 0 already
//! makes every diagonal key block computed (offsets up to `block_k - 1` ride along) and the calibrator
//! can buy more itself. Forced items count against the budgets.
//!
//! # Cells (budgets `v` columns, `s` diagonals)
//! `v` is clamped to `[0, N]`, `s` to `[1, N]` ([`clamp_budgets`]).
//! - Slash: key block `kb` is computed in full for query block `qb` iff some diagonal of rank `< s`
//!   touches a causal cell of the (qb, kb) tile. The smallest such rank is
//!   [`VsRanking::block_slash_rank`] (`u32::MAX` for non-causal tiles), so the rule is
//!   `block_slash_rank[qb][kb] < s`. Block granularity adds cells; they are counted.
//! - Vertical: the top-`v` columns are gathered for every query block (causal rows only), except
//!   those inside computed blocks (computed once).
//!
//! So cell `(i, j)`, `j <= i`, is computed iff `col_rank[j] < v || block_slash_rank[qb(i)][kb(j)] < s`:
//! the rule the profiler's histograms are built on.

use std::ops::Range;

use super::index::IndexBuilder;
use super::rank::{dot, RangeMin, Ranking};
use super::{causal_cells, HeadIndex, HeadQk, PatternContext};
use crate::error::{Error, Result};

/// Columns always ranked first (the attention sink).
pub const FORCED_COLUMNS: usize = 4;
/// Diagonal offsets always ranked first (offset 0: the diagonal itself).
pub const FORCED_DIAGONALS: usize = 1;

/// `(col_scores, diag_scores)`, each `[N]`: attention of the last `L` queries summed per key column and
/// per diagonal offset `i - j`. See the module docs.
pub fn estimate(ctx: &PatternContext, qk: &HeadQk<'_>) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = ctx.seq_len;
    if qk.seq_len() != n {
        return Err(Error::Shape(format!(
            "head has {} tokens, context seq_len is {n}",
            qk.seq_len()
        )));
    }
    let mut col = vec![0.0f64; n];
    let mut diag = vec![0.0f64; n];
    let mut s = vec![0.0f64; n];
    let scale = 1.0 / (qk.head_dim as f64).sqrt();
    for i in ctx.last_rows() {
        let q = qk.q_row(i);
        let row = &mut s[..=i];
        let mut m = f64::NEG_INFINITY;
        for (j, x) in row.iter_mut().enumerate() {
            *x = f64::from(dot(q, qk.k_row(j))) * scale;
            m = m.max(*x);
        }
        let mut z = 0.0;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            z += *x;
        }
        if !m.is_finite() || !z.is_finite() || z <= 0.0 {
            return Err(Error::Pattern {
                kind: "vertical_slash",
                message: format!("non-finite attention scores in query row {i}"),
            });
        }
        for (j, &e) in row.iter().enumerate() {
            let p = e / z;
            col[j] += p;
            diag[i - j] += p;
        }
    }
    Ok((col, diag))
}

/// `(v, s)` clamped to what exists: `v <= N`, `1 <= s <= N`.
pub fn clamp_budgets(ctx: &PatternContext, vertical: usize, slash: usize) -> (usize, usize) {
    let n = ctx.seq_len;
    (vertical.min(n), slash.clamp(1, n.max(1)))
}

/// The vertical-slash ranking of one head: everything needed to build its index at any budget, and
/// what the profiler's statistics are keyed on.
#[derive(Debug, Clone)]
pub struct VsRanking {
    /// Vertical scores `[N]` (see [`estimate`]).
    pub col_scores: Vec<f64>,
    /// Slash scores `[N]` by diagonal offset.
    pub diag_scores: Vec<f64>,
    /// Columns ranked (forced first).
    pub columns: Ranking,
    /// Diagonal offsets ranked (forced first).
    pub diagonals: Ranking,
    /// `[q_blocks * k_blocks]`, row-major by query block: the best (smallest) rank of a diagonal that
    /// touches a causal cell of the tile; `u32::MAX` for tiles without causal cells.
    pub block_slash_rank: Vec<u32>,
    k_blocks: usize,
}

impl VsRanking {
    /// Estimates and ranks from the head's live Q and K.
    pub fn new(ctx: &PatternContext, qk: &HeadQk<'_>) -> Result<Self> {
        ctx.check()?;
        let (col_scores, diag_scores) = estimate(ctx, qk)?;
        Ok(Self::from_scores(ctx, col_scores, diag_scores))
    }

    /// Ranks given scores (each `[N]`).
    pub fn from_scores(ctx: &PatternContext, col_scores: Vec<f64>, diag_scores: Vec<f64>) -> Self {
        let columns = Ranking::by_score(&col_scores, FORCED_COLUMNS);
        let diagonals = Ranking::by_score(&diag_scores, FORCED_DIAGONALS);
        let block_slash_rank = block_slash_ranks(ctx, &diagonals.rank);
        Self {
            col_scores,
            diag_scores,
            columns,
            diagonals,
            block_slash_rank,
            k_blocks: ctx.k_blocks(),
        }
    }

    /// The smallest slash budget at which key block `kb` is computed for query block `qb`
    /// (`u32::MAX`: never).
    pub fn block_rank(&self, qb: usize, kb: usize) -> u32 {
        if kb >= self.k_blocks {
            return u32::MAX;
        }
        self.block_slash_rank
            .get(qb * self.k_blocks + kb)
            .copied()
            .unwrap_or(u32::MAX)
    }

    /// The index at budgets `vertical` columns and `slash` diagonals (clamped, see the module docs).
    pub fn index(&self, ctx: &PatternContext, vertical: usize, slash: usize) -> HeadIndex {
        let (v, s) = clamp_budgets(ctx, vertical, slash);
        let chosen = self.top_columns(v);
        let mut b = IndexBuilder::new(ctx);
        for qb in 0..ctx.q_blocks() {
            let last = ctx.q_rows(qb).end.saturating_sub(1);
            b.push(
                self.slash_blocks(ctx, qb, s),
                chosen.iter().copied().take_while(|&j| j <= last),
            );
        }
        b.finish()
    }

    /// The top `v` columns (already clamped), sorted by token.
    pub fn top_columns(&self, v: usize) -> Vec<usize> {
        self.columns.top_sorted(v)
    }

    /// The top `s` diagonal offsets (already clamped), sorted ascending.
    pub fn top_diagonals(&self, s: usize) -> Vec<usize> {
        self.diagonals.top_sorted(s)
    }

    /// Causal key blocks of query block `qb` that the top `s` diagonals (already clamped) touch.
    pub fn slash_blocks<'a>(
        &'a self,
        ctx: &PatternContext,
        qb: usize,
        s: usize,
    ) -> impl Iterator<Item = usize> + 'a {
        (0..ctx.causal_k_blocks(qb)).filter(move |&kb| (self.block_rank(qb, kb) as usize) < s)
    }
}

/// What one vertical-slash selection costs under two tilings other than the index's aligned key
/// blocks, in causal cells summed over query blocks (see [`selection_cells`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectionCells {
    /// MInference's conversion ([`range_tiles`]): per query block, each selected diagonal `d` becomes
    /// the key range `[r0 - d, r1 - d)`, overlapping ranges are merged, each merged range is covered
    /// by `block_k` key tiles from its first key (not block-aligned), plus the columns outside the
    /// tiles.
    pub ranges: u64,
    /// The selected cells themselves: the cells on the diagonals and on the columns (a cell on both
    /// counts twice, so this is an upper bound of the exact selection).
    pub exact: u64,
}

/// MInference's tiles of the selected `diagonals` (sorted ascending) for query block `qb`: each
/// diagonal `d` needs the keys `[r0 - d, r1 - d)` (clipped at 0), overlapping ranges are merged, and
/// each merged range is covered by `block_k`-key tiles from its first key (not block-aligned). Returns
/// the tiles' key ranges, ascending; a tile may reach past its range (the causal mask still applies).
pub fn range_tiles(ctx: &PatternContext, qb: usize, diagonals: &[usize]) -> Vec<Range<usize>> {
    let rows = ctx.q_rows(qb);
    // Ranges by ascending offset = descending start; keys stop at the block's last row.
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for &d in diagonals.iter().take_while(|&&d| d < rows.end) {
        let (lo, hi) = (rows.start.saturating_sub(d), rows.end - d);
        match merged.last_mut() {
            Some(last) if hi >= last.0 => last.0 = last.0.min(lo),
            _ => merged.push((lo, hi)),
        }
    }
    let mut tiles = Vec::new();
    for &(lo, hi) in merged.iter().rev() {
        tiles.extend((lo..hi).step_by(ctx.block_k).map(|a| a..a + ctx.block_k));
    }
    tiles
}

/// Cells of the selection `columns` + `diagonals` (both sorted ascending) under range tiling
/// ([`range_tiles`] plus the columns outside the tiles) and exactly; compare with
/// [`HeadIndex::density`] of the aligned index.
pub fn selection_cells(
    ctx: &PatternContext,
    columns: &[usize],
    diagonals: &[usize],
) -> SelectionCells {
    let (mut ranges, mut exact) = (0u64, 0u64);
    for qb in 0..ctx.q_blocks() {
        let rows = ctx.q_rows(qb);
        let tiles = range_tiles(ctx, qb, diagonals);
        ranges += tiles.iter().map(|t| causal_cells(&rows, t)).sum::<u64>();
        for &j in columns.iter().take_while(|&&j| j < rows.end) {
            let col = causal_cells(&rows, &(j..j + 1));
            if !tiles.iter().any(|t| t.contains(&j)) {
                ranges += col;
            }
            exact += col;
        }
        // Row i meets diagonal d at key i - d when d <= i.
        for &d in diagonals.iter().take_while(|&&d| d < rows.end) {
            exact += (rows.end - d.max(rows.start)) as u64;
        }
    }
    SelectionCells { ranges, exact }
}

/// `[q_blocks * k_blocks]`: for each tile, the smallest `diag_rank[o]` over the diagonal offsets `o`
/// that touch a causal cell of the tile (`u32::MAX` when none). `diag_rank` is `[N]`.
///
/// Rows `r0..r1` and keys `k0..k1` with `k0 <= r1 - 1` meet exactly the offsets
/// `max(0, r0 - (k1 - 1)) ..= r1 - 1 - k0` (a contiguous range), so each tile is one range minimum.
pub fn block_slash_ranks(ctx: &PatternContext, diag_rank: &[u32]) -> Vec<u32> {
    let (nqb, nkb) = (ctx.q_blocks(), ctx.k_blocks());
    let table = RangeMin::new(diag_rank);
    let mut out = vec![u32::MAX; nqb * nkb];
    for (qb, row) in out.chunks_exact_mut(nkb.max(1)).enumerate().take(nqb) {
        let rows = ctx.q_rows(qb);
        for (kb, slot) in row.iter_mut().enumerate().take(ctx.causal_k_blocks(qb)) {
            let cols = ctx.k_cols(kb);
            let lo = rows.start.saturating_sub(cols.end - 1);
            let hi = rows.end - 1 - cols.start;
            *slot = table.min(lo, hi + 1);
        }
    }
    out
}

/// The vertical-slash index of one head at budgets `vertical` and `slash` (tokens).
pub fn index(
    ctx: &PatternContext,
    qk: &HeadQk<'_>,
    vertical: usize,
    slash: usize,
) -> Result<HeadIndex> {
    Ok(VsRanking::new(ctx, qk)?.index(ctx, vertical, slash))
}
