//! [`FlatIndex`]: the per-head [`HeadIndex`] lists of one layer, flattened over heads, as the CUDA kernels
//! read them (host side; compiled with and without the `cuda` feature).

use crate::error::{Error, Result};
pub use crate::pattern::block_sparse::BlockChoice;
pub use crate::pattern::token_select::TokenChoice;
use crate::pattern::{HeadIndex, IndexBuilder, PatternContext};

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

    /// Checks what the CUDA kernels assume of the lists (they would otherwise read out of bounds or
    /// count a cell twice): `q_blocks` = ceil(`seq_len` / 64); both offset arrays
    /// `q_heads * q_blocks + 1` long, from 0, never decreasing, ending at their list's length; in each query block's
    /// lists, key blocks strictly ascending and below `q_blocks`, columns strictly ascending, below
    /// `seq_len` and outside the listed key blocks. [`Error::SparseIndex`] names the head, the field
    /// and the entry.
    pub fn check(&self) -> Result<()> {
        let bad = |head: usize, message: String| Error::SparseIndex { head, message };
        if self.q_blocks != self.seq_len.div_ceil(CUDA_BLOCK) {
            return Err(bad(
                0,
                format!(
                    "q_blocks is {}, seq_len {} needs {}",
                    self.q_blocks,
                    self.seq_len,
                    self.seq_len.div_ceil(CUDA_BLOCK)
                ),
            ));
        }
        let entries = self.q_heads * self.q_blocks;
        for (name, off, data) in [
            ("blk_off", &self.blk_off, &self.blk_idx),
            ("col_off", &self.col_off, &self.col_idx),
        ] {
            if off.len() != entries + 1 {
                return Err(bad(
                    0,
                    format!(
                        "{name} has {} offsets, q_heads * q_blocks + 1 = {}",
                        off.len(),
                        entries + 1
                    ),
                ));
            }
            if off[0] != 0 || off[entries] as usize != data.len() {
                return Err(bad(
                    0,
                    format!(
                        "{name} runs from {} to {}, its list holds {} entries",
                        off[0],
                        off[entries],
                        data.len()
                    ),
                ));
            }
            if let Some(e) = (0..entries).find(|&e| off[e + 1] < off[e]) {
                return Err(bad(
                    e / self.q_blocks.max(1),
                    format!(
                        "{name}[{}] = {} < {name}[{e}] = {}",
                        e + 1,
                        off[e + 1],
                        off[e]
                    ),
                ));
            }
        }
        for h in 0..self.q_heads {
            for qb in 0..self.q_blocks {
                let e = h * self.q_blocks + qb;
                let blocks = self.key_blocks(h, qb);
                let at = |off: &[u32], i: usize| off[e] as usize + i;
                for (i, &kb) in blocks.iter().enumerate() {
                    if kb as usize >= self.q_blocks || (i > 0 && kb <= blocks[i - 1]) {
                        return Err(bad(
                            h,
                            format!(
                                "blk_idx[{}] (query block {qb}) = {kb}: key blocks must ascend \
                                 strictly and stay below q_blocks {}",
                                at(&self.blk_off, i),
                                self.q_blocks
                            ),
                        ));
                    }
                }
                let cols = self.columns(h, qb);
                for (i, &t) in cols.iter().enumerate() {
                    let in_block = blocks.binary_search(&(t / CUDA_BLOCK as u32)).is_ok();
                    if t as usize >= self.seq_len || (i > 0 && t <= cols[i - 1]) || in_block {
                        return Err(bad(
                            h,
                            format!(
                                "col_idx[{}] (query block {qb}) = {t}: columns must ascend \
                                 strictly, stay below seq_len {} and outside the listed key blocks",
                                at(&self.col_off, i),
                                self.seq_len
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
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

    /// Head `h`'s lists as a [`HeadIndex`] at `ctx` (whose blocks must be 64 × 64 and whose length
    /// must be this index's), e.g. to measure the recall of an index the GPU built with the CPU's
    /// tools. Entries the kernels would not compute (past the causal end) are dropped, as
    /// [`HeadIndex`] always does; lists that passed [`FlatIndex::check`] lose nothing.
    pub fn head(&self, h: usize, ctx: &PatternContext) -> Result<HeadIndex> {
        if h >= self.q_heads
            || ctx.seq_len != self.seq_len
            || ctx.block_q != CUDA_BLOCK
            || ctx.block_k != CUDA_BLOCK
        {
            return Err(Error::Shape(format!(
                "head {h} at seq_len {} with {}x{} blocks: the index has {} heads at seq_len {} \
                 with {CUDA_BLOCK}x{CUDA_BLOCK} blocks",
                ctx.seq_len, ctx.block_q, ctx.block_k, self.q_heads, self.seq_len
            )));
        }
        let mut b = IndexBuilder::new(ctx);
        for qb in 0..self.q_blocks {
            b.push(
                self.key_blocks(h, qb).iter().map(|&kb| kb as usize),
                self.columns(h, qb).iter().map(|&j| j as usize),
            );
        }
        Ok(b.finish())
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
    use crate::pattern::{a_shape, dense, PatternContext};
    use crate::test_util::noise;

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
    fn check_accepts_flattened_indexes_and_names_broken_entries() {
        let ctx = PatternContext {
            seq_len: 200,
            block_q: 64,
            block_k: 64,
            last_q: 64,
        };
        // key blocks 0 and qb, columns 70 and 71 where they fall outside them
        let mut good = FlatIndex {
            q_heads: 2,
            seq_len: 200,
            q_blocks: 4,
            blk_off: vec![0],
            col_off: vec![0],
            ..FlatIndex::default()
        };
        for _ in 0..2 {
            for qb in 0..4u32 {
                good.blk_idx.push(0);
                if qb > 0 {
                    good.blk_idx.push(qb);
                }
                if qb > 1 {
                    good.col_idx.extend([70, 71]);
                }
                good.blk_off.push(good.blk_idx.len() as u32);
                good.col_off.push(good.col_idx.len() as u32);
            }
        }
        assert!(good.check().is_ok());
        let d = dense::index(&ctx);
        let shapes = [
            a_shape::index(&ctx, 64, 64),
            a_shape::index(&ctx, 1, 128),
            a_shape::index(&ctx, 3, 100),
        ];
        // vertical-slash indexes on pseudo-random Q and K (columns next to slash tiles)
        let (n, dim) = (200usize, 16usize);
        let (q, k) = (noise(n * dim, 1, 0.5), noise(n * dim, 2, 0.5));
        let qk = crate::pattern::HeadQk::new(&q, &k, dim, n).unwrap();
        let vs: Vec<_> = [(8, 8), (40, 20), (120, 64)]
            .iter()
            .map(|&(v, sl)| crate::pattern::vertical_slash::index(&ctx, &qk, v, sl).unwrap())
            .collect();
        assert!(vs
            .iter()
            .any(|ix| (0..4).any(|qb| !ix.columns(qb).is_empty())));
        for heads in [&[d.clone(), d][..], &shapes[..], &vs[..]] {
            assert!(FlatIndex::from_heads(200, heads)
                .unwrap_or_default()
                .check()
                .is_ok());
        }

        let message = |f: &FlatIndex| match f.check() {
            Err(Error::SparseIndex { head, message }) => format!("head {head}: {message}"),
            other => panic!("expected a sparse-index error, got {other:?}"),
        };
        // head 1, query block 2 (key blocks 0 and 2): columns 70, 71 sit at col_idx 4 and 5
        let mut f = good.clone();
        f.col_idx[5] = 70;
        assert_eq!(
            message(&f),
            "head 1: col_idx[5] (query block 2) = 70: columns must ascend strictly, stay below \
             seq_len 200 and outside the listed key blocks"
        );
        let mut f = good.clone();
        f.col_idx[5] = 200;
        assert!(message(&f).contains("col_idx[5] (query block 2) = 200"));
        let mut f = good.clone();
        f.col_idx[4] = 130; // inside key block 2
        assert!(message(&f).contains("col_idx[4] (query block 2) = 130"));
        let mut f = good.clone();
        f.blk_idx[1] = 4;
        assert!(message(&f).starts_with("head 0: blk_idx[1] (query block 1) = 4"));
        let mut f = good.clone();
        f.col_off[3] = 9;
        assert!(message(&f).contains("col_off[4] = 4 < col_off[3] = 9"));
        let mut f = good.clone();
        f.blk_off.pop();
        assert!(message(&f).contains("blk_off has 8 offsets, q_heads * q_blocks + 1 = 9"));
        let mut f = good.clone();
        f.col_idx.push(199);
        assert!(message(&f).contains("col_off runs from 0 to 8, its list holds 9 entries"));
        let mut f = good;
        f.q_blocks = 5;
        assert!(message(&f).contains("q_blocks is 5, seq_len 200 needs 4"));
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

    /// `head` gives back the lists `from_heads` flattened, columns included, and refuses a head or
    /// a context the index does not have.
    #[test]
    fn head_gives_back_each_heads_lists() {
        let ctx = PatternContext {
            seq_len: 1000,
            block_q: 64,
            block_k: 64,
            last_q: 64,
        };
        // key blocks 0 and the diagonal, columns 70, 71 and 600 where they are causal and outside
        let mut b = IndexBuilder::new(&ctx);
        for qb in 0..ctx.q_blocks() {
            b.push([0, qb], [70, 71, 600]);
        }
        let heads = [b.finish(), a_shape::index(&ctx, 16, 64)];
        assert_eq!(heads[0].columns(15), [70, 71, 600]);
        let f = FlatIndex::from_heads(1000, &heads).unwrap();
        for (h, want) in heads.iter().enumerate() {
            assert_eq!(f.head(h, &ctx).unwrap(), *want);
        }
        assert!(matches!(f.head(2, &ctx), Err(Error::Shape(_))));
        let other = PatternContext {
            seq_len: 1001,
            ..ctx
        };
        assert!(matches!(f.head(0, &other), Err(Error::Shape(_))));
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
