//! [`HeadIndex`]: the cells one head computes, as key blocks plus gathered key columns per query block.

use std::ops::Range;

use super::PatternContext;

/// The cells one head computes: per query block, sorted key blocks (computed in full under the causal
/// mask) and sorted extra key columns (gathered, causal mask applied, never inside a listed block).
///
/// Stored as two compressed rows (CSR) over query blocks; indices are `u32` (block or token indices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadIndex {
    ctx: PatternContext,
    /// `q_blocks + 1` offsets into `blocks`.
    block_start: Vec<usize>,
    blocks: Vec<u32>,
    /// `q_blocks + 1` offsets into `columns`.
    column_start: Vec<usize>,
    columns: Vec<u32>,
}

/// A covered piece: rows `rows` (one query block) against keys `keys` (a run of whole key blocks, or a
/// run of consecutive gathered columns), causal mask applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub q_block: usize,
    pub rows: Range<usize>,
    pub keys: Range<usize>,
    /// Whether `keys` are gathered columns (`true`) or whole key blocks (`false`).
    pub gathered: bool,
}

impl HeadIndex {
    /// An index with no cells at `ctx` (e.g. a placeholder for a head another index serves).
    pub fn empty(ctx: &PatternContext) -> Self {
        let mut b = IndexBuilder::new(ctx);
        for _ in 0..ctx.q_blocks() {
            b.push([], []);
        }
        b.finish()
    }

    /// The context the index was built for.
    pub fn context(&self) -> &PatternContext {
        &self.ctx
    }

    /// Number of query blocks.
    pub fn q_blocks(&self) -> usize {
        self.block_start.len().saturating_sub(1)
    }

    /// Sorted key blocks computed in full for query block `qb` (empty past the end).
    pub fn key_blocks(&self, qb: usize) -> &[u32] {
        Self::row(&self.block_start, &self.blocks, qb)
    }

    /// Sorted gathered key columns for query block `qb` (empty past the end).
    pub fn columns(&self, qb: usize) -> &[u32] {
        Self::row(&self.column_start, &self.columns, qb)
    }

    fn row<'a>(start: &[usize], data: &'a [u32], qb: usize) -> &'a [u32] {
        match (start.get(qb), start.get(qb + 1)) {
            (Some(&a), Some(&b)) => data.get(a..b).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// Whether cell (query `i`, key `j`) is computed. Non-causal cells (`j > i`) never are.
    pub fn contains(&self, i: usize, j: usize) -> bool {
        if j > i || i >= self.ctx.seq_len {
            return false;
        }
        let qb = i / self.ctx.block_q;
        let kb = (j / self.ctx.block_k) as u32;
        self.key_blocks(qb).binary_search(&kb).is_ok()
            || self.columns(qb).binary_search(&(j as u32)).is_ok()
    }

    /// Computed causal cells, exactly.
    pub fn cells(&self) -> u64 {
        (0..self.q_blocks()).map(|qb| self.block_cells(qb)).sum()
    }

    /// Computed causal cells of query block `qb` (0 past the last block).
    pub fn block_cells(&self, qb: usize) -> u64 {
        let rows = self.ctx.q_rows(qb);
        let b: u64 = self
            .key_blocks(qb)
            .iter()
            .map(|&kb| causal_cells(&rows, &self.ctx.k_cols(kb as usize)))
            .sum();
        let c: u64 = self
            .columns(qb)
            .iter()
            .map(|&j| rows.end.saturating_sub((j as usize).max(rows.start)) as u64)
            .sum();
        b + c
    }

    /// Causal cells of dense attention, `N (N + 1) / 2`.
    pub fn dense_cells(&self) -> u64 {
        let n = self.ctx.seq_len as u64;
        n * (n + 1) / 2
    }

    /// `cells / dense_cells` (1 for an empty sequence).
    pub fn density(&self) -> f64 {
        let d = self.dense_cells();
        if d == 0 {
            1.0
        } else {
            self.cells() as f64 / d as f64
        }
    }

    /// Covered pieces in query-block order: runs of consecutive key blocks first, then runs of
    /// consecutive gathered columns. Allocation-free.
    pub fn pieces(&self) -> impl Iterator<Item = Piece> + '_ {
        (0..self.q_blocks()).flat_map(move |qb| {
            let rows = self.ctx.q_rows(qb);
            let bk = self.ctx.block_k;
            let n = self.ctx.seq_len;
            let r2 = rows.clone();
            runs(self.key_blocks(qb))
                .map(move |r| Piece {
                    q_block: qb,
                    rows: rows.clone(),
                    keys: r.start * bk..(r.end * bk).min(n),
                    gathered: false,
                })
                .chain(runs(self.columns(qb)).map(move |r| Piece {
                    q_block: qb,
                    rows: r2.clone(),
                    keys: r,
                    gathered: true,
                }))
        })
    }
}

/// Maximal runs of consecutive values of a sorted list, as half-open ranges.
fn runs(sorted: &[u32]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *sorted.get(i)? as usize;
        let mut end = first + 1;
        i += 1;
        while sorted.get(i).is_some_and(|&x| x as usize == end) {
            end += 1;
            i += 1;
        }
        Some(first..end)
    })
}

/// Cells `(i, j)` with `i` in `rows`, `j` in `cols`, `j <= i`.
pub fn causal_cells(rows: &Range<usize>, cols: &Range<usize>) -> u64 {
    if cols.is_empty() || rows.is_empty() {
        return 0;
    }
    let (k0, k1) = (cols.start as u64, cols.end as u64);
    let w = k1 - k0;
    let (r0, r1) = (rows.start as u64, rows.end as u64);
    // Row i sees clamp(i - k0 + 1, 0, w) columns: 0 below k0, ramps up to w at i = k1 - 1.
    let full_from = r0.max(k1 - 1);
    let full = r1.saturating_sub(full_from) * w;
    let ramp_lo = r0.max(k0);
    let ramp_hi = r1.min(k1 - 1);
    let ramp = if ramp_hi > ramp_lo {
        // sum over i in [ramp_lo, ramp_hi) of (i - k0 + 1)
        let a = ramp_lo - k0 + 1;
        let b = ramp_hi - k0;
        (a + b) * (b + 1 - a) / 2
    } else {
        0
    };
    full + ramp
}

/// Builds a [`HeadIndex`] one query block at a time, in order.
#[derive(Debug)]
pub(crate) struct IndexBuilder {
    index: HeadIndex,
    /// Scratch: whether key block `kb` is listed for the current query block.
    in_block: Vec<bool>,
}

impl IndexBuilder {
    pub(crate) fn new(ctx: &PatternContext) -> Self {
        Self {
            index: HeadIndex {
                ctx: *ctx,
                block_start: vec![0],
                blocks: Vec::new(),
                column_start: vec![0],
                columns: Vec::new(),
            },
            in_block: vec![false; ctx.k_blocks()],
        }
    }

    /// Query block the next [`IndexBuilder::push`] describes.
    pub(crate) fn next_q_block(&self) -> usize {
        self.index.block_start.len() - 1
    }

    /// Adds the next query block: key blocks and columns in any order, duplicates allowed; entries with
    /// no causal cell, and columns inside listed blocks, are dropped.
    pub(crate) fn push(
        &mut self,
        blocks: impl IntoIterator<Item = usize>,
        columns: impl IntoIterator<Item = usize>,
    ) {
        let ctx = self.index.ctx;
        let qb = self.next_q_block();
        let nkb = ctx.causal_k_blocks(qb);
        let last_row = ctx.q_rows(qb).end.saturating_sub(1);
        let first = self.index.blocks.len();
        for kb in blocks {
            if kb < nkb {
                if let Some(flag) = self.in_block.get_mut(kb) {
                    if !*flag {
                        *flag = true;
                        self.index.blocks.push(kb as u32);
                    }
                }
            }
        }
        self.index.blocks[first..].sort_unstable();
        let first_col = self.index.columns.len();
        for j in columns {
            let inside = self.in_block.get(j / ctx.block_k).copied().unwrap_or(true);
            if j <= last_row && !inside {
                self.index.columns.push(j as u32);
            }
        }
        let cols = &mut self.index.columns[first_col..];
        cols.sort_unstable();
        let kept = dedup_sorted(cols);
        self.index.columns.truncate(first_col + kept);
        for &kb in &self.index.blocks[first..] {
            if let Some(flag) = self.in_block.get_mut(kb as usize) {
                *flag = false;
            }
        }
        self.index.block_start.push(self.index.blocks.len());
        self.index.column_start.push(self.index.columns.len());
    }

    /// The index; query blocks never pushed are empty.
    pub(crate) fn finish(mut self) -> HeadIndex {
        while self.next_q_block() < self.index.ctx.q_blocks() {
            self.push([], []);
        }
        self.index
    }
}

/// Removes adjacent duplicates in place; returns the number kept at the front.
fn dedup_sorted(x: &mut [u32]) -> usize {
    let mut kept = 0;
    for i in 0..x.len() {
        if kept == 0 || x[i] != x[kept - 1] {
            x[kept] = x[i];
            kept += 1;
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_cells_matches_counting() {
        for (r0, r1, k0, k1) in [
            (0, 5, 0, 5),
            (3, 9, 0, 4),
            (3, 9, 5, 12),
            (10, 20, 0, 64),
            (0, 1, 0, 1),
            (7, 8, 8, 9),
        ] {
            let want = (r0..r1)
                .flat_map(|i| (k0..k1).map(move |j| (i, j)))
                .filter(|(i, j)| j <= i)
                .count() as u64;
            assert_eq!(
                causal_cells(&(r0..r1), &(k0..k1)),
                want,
                "{r0}..{r1} x {k0}..{k1}"
            );
        }
    }
}
