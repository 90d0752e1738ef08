//! The direct evaluator: recall of any [`HeadIndex`] from the exact softmax, streamed per query block.
//!
//! [`recall_of_index`] is the ground truth the statistics are tested against, and the way the
//! calibrator scores families without sufficient statistics (grid, query-adaptive, token-select).

use rayon::prelude::*;
use runtime::pattern::HeadIndex;
use runtime::AttentionInput;

use super::tile::{PackedKeys, RowBlock};
use crate::{Error, Result};

/// Per-row recall of one head under one index.
#[derive(Debug, Clone, PartialEq)]
pub struct RowRecall {
    /// Mean over all rows.
    pub mean: f64,
    /// Worst row.
    pub min: f64,
    /// Mean over the last `min(last_q, N)` rows (the rows online estimates read).
    pub last_rows_mean: f64,
    /// `[N]`: mass of each row inside the index.
    pub per_row: Vec<f64>,
}

/// Recall of query head `head` of `input` under `index` (built for the same `seq_len`).
pub fn recall_of_index(
    input: &AttentionInput<'_>,
    head: usize,
    index: &HeadIndex,
) -> Result<RowRecall> {
    let shape = input.shape;
    shape.check()?;
    let ctx = *index.context();
    ctx.check()?;
    if head >= shape.q_heads || ctx.seq_len != shape.seq_len {
        return Err(Error::Runtime(runtime::Error::Shape(format!(
            "recall of head {head} with an index for seq_len {}: input has {} heads of {} tokens",
            ctx.seq_len, shape.q_heads, shape.seq_len
        ))));
    }
    let (n, d) = (shape.seq_len, shape.head_dim);
    let keys = PackedKeys::pack(input.k_head(shape.kv_head_of(head)), n, d, ctx.block_k);
    let q = input.q_head(head);
    let blocks: Vec<Vec<f64>> = (0..ctx.q_blocks())
        .into_par_iter()
        .map_init(
            || RowBlock::new(d, ctx.block_q, ctx.block_k),
            |rb, qb| -> Result<Vec<f64>> {
                rb.compute(q, &keys, qb)?;
                let stride = rb.stride();
                Ok((0..rb.rows().len())
                    .map(|r| {
                        let il = f64::from(rb.inv_l()[r]);
                        let from_blocks: f64 = index
                            .key_blocks(qb)
                            .iter()
                            .map(|&kb| {
                                let nv = rb.visible(r, kb as usize);
                                let row = &rb.tile(kb as usize)[r * stride..r * stride + nv];
                                row.iter().map(|&e| f64::from(e)).sum::<f64>()
                            })
                            .sum();
                        let from_columns: f64 = index
                            .columns(qb)
                            .iter()
                            .map(|&j| f64::from(rb.prob(r, j as usize)))
                            .sum();
                        from_blocks * il + from_columns
                    })
                    .collect())
            },
        )
        .collect::<Result<_>>()?;
    let per_row: Vec<f64> = blocks.into_iter().flatten().collect();
    let mean_of = |x: &[f64]| {
        if x.is_empty() {
            1.0
        } else {
            x.iter().sum::<f64>() / x.len() as f64
        }
    };
    let last = per_row.get(ctx.last_rows()).unwrap_or(&[]);
    Ok(RowRecall {
        mean: mean_of(&per_row),
        min: per_row
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .min(1.0),
        last_rows_mean: mean_of(last),
        per_row,
    })
}
