//! Attention in f64 straight from the definition, restricted to any set of cells: the yardstick the
//! tests hold the executors to.
//!
//! For query head `h` and row `i`, with `g = h / (q_heads / kv_heads)` and `J = {j <= i : keep(h, i, j)}`:
//! `out[h, i] = sum_{j in J} softmax_J(q_i · k_j / sqrt(head_dim)) v_j`, products and sums in f64;
//! a row with empty `J` is zero (what the CPU executors write). The causal mask always applies on top
//! of the predicate, so `keep = |_, _, _| true` is dense causal attention ([`dense_reference`]).
//!
//! Cost: `O(cells * head_dim)` f64 operations, rows spread by rayon; fine for tests up to a few
//! thousand tokens. [`reference_row`] alone also serves the evaluation, which computes the few rows of
//! decoded answer tokens exactly.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::AttentionInput;

/// `[q_heads, seq_len, head_dim]` attention over the causal cells `(i, j)` of head `h` with
/// `keep(h, i, j)` (see the module docs).
pub fn reference_attention<F>(input: &AttentionInput<'_>, keep: F) -> Result<Vec<f64>>
where
    F: Fn(usize, usize, usize) -> bool + Sync,
{
    let shape = input.shape;
    shape.check()?;
    let (t, d) = (shape.seq_len, shape.head_dim);
    let len = shape
        .q_len()
        .ok_or_else(|| Error::Shape(format!("attention shape {shape:?} overflows usize")))?;
    let mut out = vec![0.0f64; len];
    if t == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(d).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<(usize, f64)>, (row, o)| {
            let (h, i) = (row / t, row % t);
            reference_row(input, h, i, |j| keep(h, i, j), scores, o);
        },
    );
    Ok(out)
}

/// Row `i` of query head `h` over its causal keys `j` with `keep(j)`, added into `o` (`head_dim`
/// values, zero for the plain row); `scores` is scratch. The row [`reference_attention`] computes.
pub fn reference_row<F>(
    input: &AttentionInput<'_>,
    h: usize,
    i: usize,
    keep: F,
    scores: &mut Vec<(usize, f64)>,
    o: &mut [f64],
) where
    F: Fn(usize) -> bool,
{
    let g = input.shape.kv_head_of(h);
    let scale = 1.0 / (input.shape.head_dim as f64).sqrt();
    let q = input.q_row(h, i);
    scores.clear();
    scores.extend((0..=i).filter(|&j| keep(j)).map(|j| {
        let dot: f64 = q
            .iter()
            .zip(input.k_row(g, j))
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        (j, dot * scale)
    }));
    let m = scores.iter().fold(f64::NEG_INFINITY, |m, &(_, s)| m.max(s));
    let z: f64 = scores.iter().map(|&(_, s)| (s - m).exp()).sum();
    for &(j, s) in scores.iter() {
        let p = (s - m).exp() / z;
        for (oc, &vc) in o.iter_mut().zip(input.v_row(g, j)) {
            *oc += p * f64::from(vc);
        }
    }
}

/// One query head `head`: `[seq_len, head_dim]` attention over the causal cells with `keep(i, j)`.
pub fn reference_head<F>(input: &AttentionInput<'_>, head: usize, keep: F) -> Result<Vec<f64>>
where
    F: Fn(usize, usize) -> bool + Sync,
{
    let shape = input.shape;
    if head >= shape.q_heads {
        return Err(Error::Shape(format!(
            "query head {head} out of range, the input has {}",
            shape.q_heads
        )));
    }
    let one = crate::AttnShape {
        q_heads: 1,
        kv_heads: 1,
        ..shape
    };
    let single = AttentionInput::new(
        one,
        input.q_head(head),
        input.k_head(shape.kv_head_of(head)),
        input.v_head(shape.kv_head_of(head)),
    )?;
    reference_attention(&single, |_, i, j| keep(i, j))
}

/// Dense causal attention in f64, `[q_heads, seq_len, head_dim]`.
pub fn dense_reference(input: &AttentionInput<'_>) -> Result<Vec<f64>> {
    reference_attention(input, |_, _, _| true)
}
