//! What each sparse pattern of a plan computes: one meaning per pattern (DESIGN §1).
//!
//! [`build_index`] maps (a head's [`Pattern`], a [`PatternContext`], the head's live Q and K as a
//! [`HeadQk`]) to the [`HeadIndex`] of cells the kernels compute. The calibrator scores candidates by
//! calling exactly this function (or the ranking pieces it is built from), so the recall written into
//! a plan is the recall the runtime delivers, block granularity included.
//!
//! # The index form
//! A [`HeadIndex`] lists, per query block `qb` (rows `qb * block_q .. min((qb + 1) * block_q, N)`),
//! sorted key blocks computed in full and sorted extra key columns gathered one by one (never inside a
//! listed block): MInference's `block_idx` + `column_idx`. The causal mask (`j <= i`) always applies.
//! Blocks and columns with no causal cell for the query block are never listed.
//!
//! # Families, one file each
//! - [`dense`]: every causal cell.
//! - [`a_shape`] (`a_shape` and `streaming`): sink blocks plus the blocks touching the local window.
//! - [`vertical_slash`]: top columns and top diagonals estimated from the last queries; diagonals
//!   become key blocks per query block, columns become gathered columns.
//! - [`block_sparse`]: top key blocks per query block by a pooled (mean Q · mean K) estimate.
//! - [`grid`]: periodic columns and diagonals plus sink and local blocks.
//! - [`query_adaptive`]: FlexPrefill's per-head choice between query-aware blocks and vertical-slash.
//! - [`token_select`]: per key chunk, the tokens with the highest estimated attention, plus sink and
//!   local blocks.
//!
//! Budgets resolve with [`schemas::Budget::resolve`] at the context's `seq_len` and are clamped to what
//! exists. Everything is deterministic: ties in every ranking go to the lower index.
//!
//! Units: `seq_len`, `block_q`, `block_k`, `last_q` are tokens; scores are softmax mass (a row sums to 1).

pub mod a_shape;
pub mod block_sparse;
pub mod dense;
pub mod grid;
mod index;
pub mod query_adaptive;
pub mod rank;
pub mod token_select;
pub mod vertical_slash;

use std::ops::Range;

use schemas::{Defaults, Pattern};

use crate::error::{Error, Result};
use crate::AttentionInput;

pub(crate) use index::IndexBuilder;
pub use index::{causal_cells, HeadIndex, Piece};
pub use rank::Ranking;

/// Where a pattern is applied: the sequence length and the kernel's block sizes (all in tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatternContext {
    /// Tokens in the sequence (`N`).
    pub seq_len: usize,
    /// Query rows per kernel block.
    pub block_q: usize,
    /// Key columns per kernel block.
    pub block_k: usize,
    /// Last queries used by online estimates (clamped to `seq_len`).
    pub last_q: usize,
}

impl PatternContext {
    /// The context of a plan's defaults at `seq_len`.
    pub fn new(seq_len: usize, defaults: &Defaults) -> Self {
        Self {
            seq_len,
            block_q: defaults.block_q as usize,
            block_k: defaults.block_k as usize,
            last_q: defaults.last_q as usize,
        }
    }

    /// Checks the block sizes and `last_q` are at least 1.
    pub fn check(&self) -> Result<()> {
        if self.block_q == 0 || self.block_k == 0 || self.last_q == 0 {
            return Err(Error::Pattern {
                kind: "context",
                message: format!("block_q, block_k and last_q must be at least 1, got {self:?}"),
            });
        }
        Ok(())
    }

    /// Number of query blocks, `ceil(N / block_q)`.
    pub fn q_blocks(&self) -> usize {
        self.seq_len.div_ceil(self.block_q.max(1))
    }

    /// Number of key blocks, `ceil(N / block_k)`.
    pub fn k_blocks(&self) -> usize {
        self.seq_len.div_ceil(self.block_k.max(1))
    }

    /// Rows of query block `qb` (empty past the end).
    pub fn q_rows(&self, qb: usize) -> Range<usize> {
        let start = (qb * self.block_q).min(self.seq_len);
        start..(start + self.block_q).min(self.seq_len)
    }

    /// Columns of key block `kb` (empty past the end).
    pub fn k_cols(&self, kb: usize) -> Range<usize> {
        let start = (kb * self.block_k).min(self.seq_len);
        start..(start + self.block_k).min(self.seq_len)
    }

    /// Key blocks with at least one causal cell for query block `qb`: `0..=last_row / block_k`.
    pub fn causal_k_blocks(&self, qb: usize) -> usize {
        let rows = self.q_rows(qb);
        if rows.is_empty() {
            0
        } else {
            (rows.end - 1) / self.block_k.max(1) + 1
        }
    }

    /// The rows online estimates read: the last `min(last_q, N)` queries.
    pub fn last_rows(&self) -> Range<usize> {
        self.seq_len.saturating_sub(self.last_q.max(1))..self.seq_len
    }

    /// A budget resolved at this length, as `usize` (saturating).
    pub fn resolve(&self, budget: &schemas::Budget) -> usize {
        usize::try_from(budget.resolve(self.seq_len as u64)).unwrap_or(usize::MAX)
    }
}

/// The live Q and K of one query head: `q` is `[seq_len, head_dim]` of the head, `k` is
/// `[seq_len, head_dim]` of the KV head it reads. Row-major f32, after RoPE.
#[derive(Debug, Clone, Copy)]
pub struct HeadQk<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub head_dim: usize,
}

impl<'a> HeadQk<'a> {
    /// Checks `q` and `k` both hold `seq_len * head_dim` values.
    pub fn new(q: &'a [f32], k: &'a [f32], head_dim: usize, seq_len: usize) -> Result<Self> {
        let want = seq_len.checked_mul(head_dim).ok_or_else(|| {
            Error::Shape(format!("seq_len {seq_len} * head_dim {head_dim} overflows"))
        })?;
        if head_dim == 0 || q.len() != want || k.len() != want {
            return Err(Error::Shape(format!(
                "head Q has {} and K has {} values, seq_len {seq_len} x head_dim {head_dim} needs {want}",
                q.len(),
                k.len()
            )));
        }
        Ok(Self { q, k, head_dim })
    }

    /// Query head `head` of a layer's input with the K of its KV head.
    pub fn from_input(input: &AttentionInput<'a>, head: usize) -> Result<Self> {
        let shape = input.shape;
        shape.check()?;
        if head >= shape.q_heads {
            return Err(Error::Shape(format!(
                "query head {head} out of range, the layer has {}",
                shape.q_heads
            )));
        }
        Self::new(
            input.q_head(head),
            input.k_head(shape.kv_head_of(head)),
            shape.head_dim,
            shape.seq_len,
        )
    }

    /// Tokens in the sequence.
    pub fn seq_len(&self) -> usize {
        self.q.len() / self.head_dim.max(1)
    }

    /// Query row `i` (`head_dim` values); the caller keeps `i < seq_len`.
    pub(crate) fn q_row(&self, i: usize) -> &'a [f32] {
        &self.q[i * self.head_dim..(i + 1) * self.head_dim]
    }

    /// Key row `j`; the caller keeps `j < seq_len`.
    pub(crate) fn k_row(&self, j: usize) -> &'a [f32] {
        &self.k[j * self.head_dim..(j + 1) * self.head_dim]
    }
}

/// The cells `pattern` computes for one head: the one meaning of every pattern kind.
///
/// Errors: a context with zero block sizes, Q/K lengths that disagree with `ctx.seq_len`, parameters
/// that cannot be applied (e.g. a grid `phase >= stride`), or non-finite Q/K where an estimate reads them.
pub fn build_index(pattern: &Pattern, ctx: &PatternContext, qk: &HeadQk<'_>) -> Result<HeadIndex> {
    ctx.check()?;
    if qk.seq_len() != ctx.seq_len || qk.q.len() != qk.k.len() {
        return Err(Error::Shape(format!(
            "head Q has {} and K has {} values with head_dim {}, context seq_len is {}",
            qk.q.len(),
            qk.k.len(),
            qk.head_dim,
            ctx.seq_len
        )));
    }
    match pattern {
        Pattern::VerticalSlash(p) => {
            vertical_slash::index(ctx, qk, ctx.resolve(&p.vertical), ctx.resolve(&p.slash))
        }
        Pattern::BlockSparse(p) => block_sparse::index(ctx, qk, p),
        Pattern::QueryAdaptive(p) => query_adaptive::index(ctx, qk, p),
        Pattern::TokenSelect(p) => token_select::index(ctx, qk, p),
        other => static_index(other, ctx).unwrap_or_else(|| {
            Err(Error::Pattern {
                kind: other.kind(),
                message: "no index builder for this kind".into(),
            })
        }),
    }
}

/// The index of a pattern that does not read Q or K (`dense`, `streaming`, `a_shape`, `grid`): the
/// same cells at every input of `ctx.seq_len` tokens; `None` for the patterns that estimate from the
/// live queries. [`build_index`] builds static patterns through this function.
pub fn static_index(pattern: &Pattern, ctx: &PatternContext) -> Option<Result<HeadIndex>> {
    match pattern {
        Pattern::Dense(_) => Some(Ok(dense::index(ctx))),
        Pattern::Streaming(p) => Some(Ok(a_shape::index(
            ctx,
            ctx.resolve(&p.sink),
            ctx.resolve(&p.recent),
        ))),
        Pattern::AShape(p) => Some(Ok(a_shape::index(
            ctx,
            ctx.resolve(&p.sink),
            ctx.resolve(&p.local),
        ))),
        Pattern::Grid(p) => Some(grid::index(ctx, p)),
        Pattern::VerticalSlash(_)
        | Pattern::BlockSparse(_)
        | Pattern::QueryAdaptive(_)
        | Pattern::TokenSelect(_) => None,
    }
}
