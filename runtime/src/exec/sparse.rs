//! Exact sparse attention on the CPU: for each query head, exactly the cells of its index, with the
//! dense executor's tile routine ([`TileState`]) and online softmax.
//!
//! Entry point: [`sparse_attention`] over an [`AttentionInput`] (Q `[q_heads, seq_len, head_dim]`, K and
//! V `[kv_heads, seq_len, head_dim]`, f32) and one index per query head, writing
//! `[q_heads, seq_len, head_dim]`. An index is anything that lists cells like a [`HeadIndex`]
//! ([`CellLists`]): per query block of `block_q` rows, sorted key blocks of `block_k` keys computed in
//! full and sorted extra key columns gathered one by one; the causal mask (`j <= i`) always applies.
//! Row `i` of head `h` is `softmax(q_i K^T / sqrt(head_dim))` over exactly the listed causal cells of
//! the row, times V; a row with no cell is zero.
//!
//! # How a tile runs
//! Work items are (query head, tile of up to [`BLOCK_Q`] rows inside one query block), spread by rayon;
//! query head `h` reads KV head `h / (q_heads / kv_heads)` without copies. For its tile a worker
//! - folds listed key blocks that start on a [`BLOCK_K`] boundary of the packed K ([`PackedKeys`],
//!   made once per KV head and call) straight into the tile state, cut at the tile's last row
//!   ([`Visible::Causal`]); with `block_k >= 64` that is every listed block;
//! - gathers the remaining keys (listed columns, and parts of listed blocks that do not start on a
//!   64-key boundary when `block_k < 64`) in ascending order into a per-worker buffer, K transposed
//!   `[head_dim][BLOCK_K]` and V `[n, head_dim]`, 64 keys at a time, and folds each chunk in with the
//!   causal mask on their positions ([`Visible::Sorted`]), so the dot products run in the same
//!   vectorized micro-kernel as dense tiles.
//!
//! Numerics are the dense executor's: f32 products with FMA where available, scores in log2 units,
//! polynomial `exp2` (relative error < 2e-7). Against the f64 reference ([`super::reference`]) the
//! output agrees within about 1e-5 of the output scale (runtime/tests/sparse.rs).
//!
//! Memory: the packed K (`kv_heads * seq_len * head_dim` floats, rounded up to 64 keys) plus, per
//! worker, one [`TileState`] and a gather buffer of `2 * 64 * head_dim` floats.

use std::ops::Range;

use rayon::prelude::*;

use super::dense::{KeyBlock, PackedKeys, TileState, Visible, BLOCK_K, BLOCK_Q};
use crate::error::{Error, Result};
use crate::pattern::{HeadIndex, PatternContext};
use crate::AttentionInput;

/// The cells one query head computes, listed per query block the way a [`HeadIndex`] lists them.
///
/// Contract (checked by [`sparse_attention`] before anything runs, [`Error::SparseIndex`] otherwise):
/// `context()` has block sizes `>= 1` and the input's `seq_len`; for every query block `qb` in
/// `0..ceil(seq_len / block_q)`, `key_blocks(qb)` is strictly increasing and below
/// `ceil(seq_len / block_k)`, `columns(qb)` is strictly increasing, below `seq_len`, and has no column
/// inside a listed key block. Entries with no causal cell for the block are allowed (and cost nothing).
pub trait CellLists: Sync {
    /// Sequence length and block sizes (tokens).
    fn context(&self) -> &PatternContext;
    /// Key blocks computed in full for query block `qb`.
    fn key_blocks(&self, qb: usize) -> &[u32];
    /// Extra key columns (token positions) gathered for query block `qb`.
    fn columns(&self, qb: usize) -> &[u32];
}

impl CellLists for HeadIndex {
    fn context(&self) -> &PatternContext {
        HeadIndex::context(self)
    }
    fn key_blocks(&self, qb: usize) -> &[u32] {
        HeadIndex::key_blocks(self, qb)
    }
    fn columns(&self, qb: usize) -> &[u32] {
        HeadIndex::columns(self, qb)
    }
}

/// Attention of every query head over exactly the cells of its index (see the module docs).
///
/// `indexes[h]` is the index of query head `h` (heads may share one); `out` is
/// `[q_heads, seq_len, head_dim]` and is fully overwritten.
///
/// Errors: [`Error::Shape`] when `indexes` or `out` do not fit the input, [`Error::SparseIndex`] when an
/// index breaks the [`CellLists`] contract. Nothing is written to `out` on error.
pub fn sparse_attention<I: CellLists>(
    input: &AttentionInput<'_>,
    indexes: &[&I],
    out: &mut [f32],
) -> Result<()> {
    let shape = input.shape;
    shape.check()?;
    let (t, d) = (shape.seq_len, shape.head_dim);
    shape.check_out(out.len())?;
    if indexes.len() != shape.q_heads {
        return Err(Error::Shape(format!(
            "{} indexes for {} query heads",
            indexes.len(),
            shape.q_heads
        )));
    }
    for (h, index) in indexes.iter().enumerate() {
        check_lists(*index, t).map_err(|message| Error::SparseIndex { head: h, message })?;
    }
    if t == 0 {
        return Ok(());
    }
    let tile_rows: Vec<usize> = indexes
        .iter()
        .map(|ix| tile_rows(ix.context().block_q))
        .collect();
    let packed: Vec<PackedKeys> = (0..shape.kv_heads)
        .into_par_iter()
        .map(|g| PackedKeys::pack(input.k_head(g), t, d))
        .collect();
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(t * d)
        .zip(indexes.par_iter())
        .zip(tile_rows.par_iter())
        .enumerate()
        .flat_map(|(h, ((out_h, index), &rows))| {
            out_h
                .par_chunks_mut(rows * d)
                .enumerate()
                .map(move |(tile, o)| (h, *index, tile * rows, o))
        })
        .for_each_init(
            || Worker::new(d),
            |w, (h, index, q_first, o)| {
                let g = shape.kv_head_of(h);
                let tile = Tile {
                    q: input.q_head(h),
                    k: input.k_head(g),
                    v: input.v_head(g),
                    keys: &packed[g],
                    head_dim: d,
                    scale,
                };
                w.run(&tile, index, q_first, o);
            },
        );
    Ok(())
}

/// Rows per tile for query blocks of `block_q` rows: the largest divisor of `block_q` that is at most
/// [`BLOCK_Q`], so tiles never straddle two query blocks (64 for the usual powers of two >= 64).
fn tile_rows(block_q: usize) -> usize {
    (1..=BLOCK_Q.min(block_q.max(1)))
        .rev()
        .find(|r| block_q % r == 0)
        .unwrap_or(1)
}

/// Checks the [`CellLists`] contract for a sequence of `seq_len` tokens; the message says what broke.
fn check_lists<I: CellLists + ?Sized>(
    index: &I,
    seq_len: usize,
) -> std::result::Result<(), String> {
    let ctx = index.context();
    if ctx.block_q == 0 || ctx.block_k == 0 {
        return Err(format!("block sizes must be at least 1, got {ctx:?}"));
    }
    if ctx.seq_len != seq_len {
        return Err(format!(
            "built for seq_len {}, the input has {seq_len} tokens",
            ctx.seq_len
        ));
    }
    let k_blocks = ctx.k_blocks();
    for qb in 0..ctx.q_blocks() {
        let blocks = index.key_blocks(qb);
        if let Some(w) = blocks.windows(2).find(|w| w[0] >= w[1]) {
            return Err(format!(
                "query block {qb}: key blocks not strictly increasing ({} then {})",
                w[0], w[1]
            ));
        }
        if let Some(&kb) = blocks.last().filter(|&&kb| kb as usize >= k_blocks) {
            return Err(format!(
                "query block {qb}: key block {kb} out of range, the sequence has {k_blocks}"
            ));
        }
        let columns = index.columns(qb);
        if let Some(w) = columns.windows(2).find(|w| w[0] >= w[1]) {
            return Err(format!(
                "query block {qb}: columns not strictly increasing ({} then {})",
                w[0], w[1]
            ));
        }
        if let Some(&j) = columns.last().filter(|&&j| j as usize >= seq_len) {
            return Err(format!(
                "query block {qb}: column {j} out of range, the sequence has {seq_len} tokens"
            ));
        }
        if let Some(&j) = columns.iter().find(|&&j| {
            blocks
                .binary_search(&((j as usize / ctx.block_k) as u32))
                .is_ok()
        }) {
            return Err(format!(
                "query block {qb}: column {j} lies inside listed key block {}",
                j as usize / ctx.block_k
            ));
        }
    }
    Ok(())
}

/// What one tile reads: the query head's Q, its KV head's K, V and packed K (`[seq_len, head_dim]`
/// each, packed K as [`PackedKeys`]).
struct Tile<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    keys: &'a PackedKeys,
    head_dim: usize,
    scale: f32,
}

/// Per-worker state, reused from tile to tile.
struct Worker {
    st: TileState,
    /// Positions of the keys to gather for the current tile, ascending.
    positions: Vec<u32>,
    /// Gathered K, transposed: `[head_dim][BLOCK_K]`.
    kt: Vec<f32>,
    /// Gathered V: `[BLOCK_K, head_dim]`.
    v: Vec<f32>,
}

impl Worker {
    fn new(head_dim: usize) -> Self {
        Self {
            st: TileState::new(head_dim),
            positions: Vec::with_capacity(4 * BLOCK_K),
            kt: vec![0.0; head_dim * BLOCK_K],
            v: vec![0.0; BLOCK_K * head_dim],
        }
    }

    /// Computes rows `q_first .. q_first + out.len() / head_dim` (inside one query block) into `out`.
    fn run<I: CellLists + ?Sized>(
        &mut self,
        tile: &Tile<'_>,
        index: &I,
        q_first: usize,
        out: &mut [f32],
    ) {
        let d = tile.head_dim;
        let rows = out.len() / d;
        if rows == 0 {
            return;
        }
        let ctx = index.context();
        let qb = q_first / ctx.block_q;
        // Keys past `end` are invisible to every row of the tile.
        let end = q_first + rows;
        self.st
            .load_queries(&tile.q[q_first * d..end * d], tile.scale);
        let causal = Visible::Causal {
            q_first_pos: q_first,
        };

        self.positions.clear();
        for run in block_runs(index.key_blocks(qb)) {
            let keys = (run.start * ctx.block_k).min(end)..(run.end * ctx.block_k).min(end);
            let mut p = keys.start;
            while p < keys.end {
                let pb = p / BLOCK_K;
                let stop = ((pb + 1) * BLOCK_K).min(keys.end);
                if p == pb * BLOCK_K {
                    let full = tile.keys.block(pb, tile.v);
                    let n = stop - p;
                    let block = KeyBlock {
                        kt: full.kt,
                        v: &full.v[..n * d],
                        n,
                        first_pos: p,
                    };
                    self.st.attend(&block, causal);
                } else {
                    self.positions.extend(p as u32..stop as u32);
                }
                p = stop;
            }
        }
        let columns = index.columns(qb);
        let visible_columns = &columns[..columns.partition_point(|&j| (j as usize) < end)];
        if !visible_columns.is_empty() {
            let sorted = self.positions.is_empty();
            self.positions.extend_from_slice(visible_columns);
            if !sorted {
                self.positions.sort_unstable();
            }
        }

        for chunk in self.positions.chunks(BLOCK_K) {
            let n = chunk.len();
            for (c, &j) in chunk.iter().enumerate() {
                let j = j as usize;
                let k_row = &tile.k[j * d..(j + 1) * d];
                for (x, &kv) in k_row.iter().enumerate() {
                    self.kt[x * BLOCK_K + c] = kv;
                }
                self.v[c * d..(c + 1) * d].copy_from_slice(&tile.v[j * d..(j + 1) * d]);
            }
            let visible = match chunk.last() {
                Some(&last) if (last as usize) <= q_first => Visible::All,
                _ => Visible::Sorted {
                    q_first_pos: q_first,
                    positions: chunk,
                },
            };
            let block = KeyBlock {
                kt: &self.kt,
                v: &self.v[..n * d],
                n,
                first_pos: 0,
            };
            self.st.attend(&block, visible);
        }
        self.st.finish(out);
    }
}

/// Maximal runs of consecutive key blocks of a sorted list, as half-open block ranges.
fn block_runs(sorted: &[u32]) -> impl Iterator<Item = Range<usize>> + '_ {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_rows_divide_block_q() {
        for (bq, want) in [
            (16, 16),
            (64, 64),
            (128, 64),
            (256, 64),
            (100, 50),
            (67, 1),
            (1, 1),
        ] {
            assert_eq!(tile_rows(bq), want, "block_q {bq}");
        }
    }

    #[test]
    fn block_runs_merge_consecutive() {
        let runs: Vec<_> = block_runs(&[0, 1, 2, 5, 7, 8]).collect();
        assert_eq!(runs, vec![0..3, 5..6, 7..9]);
        assert_eq!(block_runs(&[]).count(), 0);
    }
}
