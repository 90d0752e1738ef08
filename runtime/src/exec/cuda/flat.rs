//! [`FlatIndex`]: the per-head [`HeadIndex`] lists of one layer, flattened over heads, as the CUDA kernels
//! read them (host side; compiled with and without the `cuda` feature).

use crate::error::{Error, Result};
pub use crate::pattern::block_sparse::BlockChoice;
pub use crate::pattern::token_select::TokenChoice;
use crate::pattern::HeadIndex;

/// Query rows and key columns per kernel block: the CUDA kernels need `block_q == block_k == 64`.
pub const CUDA_BLOCK: usize = 64;

/// Key blocks and gathered columns of every (head, query block), flattened head-major.
///
/// Entry `e = h * q_blocks + qb`: key blocks `blk_idx[blk_off[e]..blk_off[e + 1]]` (sorted key block
/// numbers) and gathered columns `col_idx[col_off[e]..col_off[e + 1]]` (sorted token numbers).
/// Offsets are `u32`: a layer's lists must hold fewer than 2^32 entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlatIndex {
    pub q_heads: usize,
    pub seq_len: usize,
    pub q_blocks: usize,
    /// `q_heads * q_blocks + 1` offsets into `blk_idx`.
    pub blk_off: Vec<u32>,
    pub blk_idx: Vec<u32>,
    /// `q_heads * q_blocks + 1` offsets into `col_idx`.
    pub col_off: Vec<u32>,
    pub col_idx: Vec<u32>,
}

impl FlatIndex {
    /// Flattens one index per query head. Every index must be for `seq_len` with 64-token blocks.
    pub fn from_heads(seq_len: usize, heads: &[HeadIndex]) -> Result<Self> {
        let q_blocks = seq_len.div_ceil(CUDA_BLOCK);
        let mut f = Self {
            q_heads: heads.len(),
            seq_len,
            q_blocks,
            blk_off: vec![0],
            col_off: vec![0],
            ..Self::default()
        };
        for (h, index) in heads.iter().enumerate() {
            let c = index.context();
            if c.seq_len != seq_len || c.block_q != CUDA_BLOCK || c.block_k != CUDA_BLOCK {
                return Err(Error::CudaUnsupported(format!(
                    "heads[{h}]: index for seq_len {} with blocks {}x{}, the CUDA kernels need seq_len \
                     {seq_len} with {CUDA_BLOCK}x{CUDA_BLOCK} blocks",
                    c.seq_len, c.block_q, c.block_k
                )));
            }
            for qb in 0..q_blocks {
                f.blk_idx.extend_from_slice(index.key_blocks(qb));
                f.col_idx.extend_from_slice(index.columns(qb));
                f.blk_off.push(offset(f.blk_idx.len())?);
                f.col_off.push(offset(f.col_idx.len())?);
            }
        }
        Ok(f)
    }

    /// Whether heads `2p` and `2p + 1` have identical lists for every `p` (an even number of heads
    /// whose KV groups share one index per pair, e.g. a plan with `share_kv_group_indexes`).
    pub fn pairs_share(&self) -> bool {
        self.q_heads % 2 == 0
            && (0..self.q_heads).step_by(2).all(|h| {
                (0..self.q_blocks).all(|qb| {
                    self.key_blocks(h, qb) == self.key_blocks(h + 1, qb)
                        && self.columns(h, qb) == self.columns(h + 1, qb)
                })
            })
    }

    /// Key blocks of query block `qb` of head `h` (empty when out of range).
    pub fn key_blocks(&self, h: usize, qb: usize) -> &[u32] {
        Self::row(&self.blk_off, &self.blk_idx, h * self.q_blocks + qb)
    }

    /// Gathered columns of query block `qb` of head `h` (empty when out of range).
    pub fn columns(&self, h: usize, qb: usize) -> &[u32] {
        Self::row(&self.col_off, &self.col_idx, h * self.q_blocks + qb)
    }

    fn row<'a>(off: &[u32], data: &'a [u32], e: usize) -> &'a [u32] {
        match (off.get(e), off.get(e + 1)) {
            (Some(&a), Some(&b)) => data.get(a as usize..b as usize).unwrap_or(&[]),
            _ => &[],
        }
    }

    /// Computed causal cells of head `h`.
    pub fn cells(&self, h: usize) -> u64 {
        let n = self.seq_len;
        (0..self.q_blocks)
            .map(|qb| {
                let rows = qb * CUDA_BLOCK..((qb + 1) * CUDA_BLOCK).min(n);
                let b: u64 = self
                    .key_blocks(h, qb)
                    .iter()
                    .map(|&kb| {
                        let k0 = kb as usize * CUDA_BLOCK;
                        crate::pattern::causal_cells(&rows, &(k0..(k0 + CUDA_BLOCK).min(n)))
                    })
                    .sum();
                let c: u64 = self
                    .columns(h, qb)
                    .iter()
                    .map(|&j| rows.end.saturating_sub((j as usize).max(rows.start)) as u64)
                    .sum();
                b + c
            })
            .sum()
    }

    /// Fraction of the causal cells of all heads that are computed.
    pub fn density(&self) -> f64 {
        let n = self.seq_len as f64;
        let dense = n * (n + 1.0) / 2.0 * self.q_heads as f64;
        let cells: u64 = (0..self.q_heads).map(|h| self.cells(h)).sum();
        if dense > 0.0 {
            cells as f64 / dense
        } else {
            1.0
        }
    }
}

fn offset(len: usize) -> Result<u32> {
    u32::try_from(len).map_err(|_| {
        Error::CudaUnsupported(format!(
            "index lists hold {len} entries, the CUDA kernels take at most 2^32 - 1"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::{dense, PatternContext};

    #[test]
    fn flatten_keeps_lists_and_cells() {
        let ctx = PatternContext {
            seq_len: 200,
            block_q: 64,
            block_k: 64,
            last_q: 64,
        };
        let d = dense::index(&ctx);
        let f = FlatIndex::from_heads(200, &[d.clone(), d.clone()]).unwrap_or_default();
        assert_eq!(f.q_blocks, 4);
        for h in 0..2 {
            for qb in 0..4 {
                assert_eq!(f.key_blocks(h, qb), d.key_blocks(qb));
                assert_eq!(f.columns(h, qb), d.columns(qb));
            }
            assert_eq!(f.cells(h), d.cells());
        }
        assert!((f.density() - 1.0).abs() < 1e-12);
        assert!(f.pairs_share());
    }

    #[test]
    fn pairs_share_needs_equal_pairs_and_an_even_count() {
        let ctx = PatternContext {
            seq_len: 200,
            block_q: 64,
            block_k: 64,
            last_q: 64,
        };
        let (d, a) = (
            dense::index(&ctx),
            crate::pattern::a_shape::index(&ctx, 64, 64),
        );
        let flat = |heads: &[HeadIndex]| FlatIndex::from_heads(200, heads).unwrap_or_default();
        assert!(flat(&[d.clone(), d.clone(), a.clone(), a.clone()]).pairs_share());
        assert!(!flat(&[d.clone(), a.clone(), a.clone(), a.clone()]).pairs_share());
        assert!(!flat(&[d.clone(), d.clone(), d.clone()]).pairs_share());
    }

    #[test]
    fn other_block_sizes_are_refused() {
        let ctx = PatternContext {
            seq_len: 100,
            block_q: 32,
            block_k: 64,
            last_q: 64,
        };
        let err = FlatIndex::from_heads(100, &[dense::index(&ctx)]);
        assert!(matches!(err, Err(Error::CudaUnsupported(_))));
    }
}
