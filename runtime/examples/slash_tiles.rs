//! How many cells one vertical-slash selection costs under two ways of tiling its diagonals, on the
//! CUDA benchmark's structured inputs (CPU only; no GPU needed).
//!
//! ```text
//! cargo run --release -p runtime --features cuda --example slash_tiles -- [N...]
//! ```
//!
//! For each length (default 32768 and 131072), query heads 0..4 of one KV head (the structured
//! inputs repeat with period 4 over heads), v = 1000 columns and s = 6096 diagonals from the last 64
//! queries (the benchmark's settings), the same top columns and diagonals are counted three ways:
//! - **aligned**: our index: every 64×64 key block that a selected diagonal touches, plus the
//!   columns outside those blocks (what the CPU and CUDA executors compute now);
//! - **ranges**: MInference's conversion: per query block, each selected diagonal `d` becomes the
//!   64-key range `[r0 − d, r1 − d)`, overlapping ranges are merged, each merged range is covered by
//!   64-key tiles starting at its first key (not block-aligned), plus the columns outside the ranges;
//! - **exact**: only the cells on the selected diagonals and columns (the selection itself; a cell
//!   on both is counted twice, so this is an upper bound).
//!
//! Every figure is causal cells over the dense causal cells.

use runtime::exec::cuda::bench::{structured, BenchConfig};
use runtime::pattern::vertical_slash::VsRanking;
use runtime::pattern::{causal_cells, HeadQk, PatternContext};
use runtime::AttnShape;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lens: Vec<usize> = match std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(v) if !v.is_empty() => v,
        Ok(_) => vec![32_768, 131_072],
        Err(e) => return Err(format!("lengths must be integers: {e}").into()),
    };
    println!("| N | head | aligned | ranges | exact | aligned / ranges |");
    println!("|---|---|---|---|---|---|");
    for n in lens {
        let cfg = BenchConfig::new(n);
        let ctx = cfg.context();
        let shape = AttnShape {
            seq_len: n,
            q_heads: 4,
            kv_heads: 1,
            head_dim: 128,
        };
        let (q, k, _) = structured(&shape, cfg.seed())?;
        for h in 0..4 {
            let qh = &q[h * n * 128..(h + 1) * n * 128];
            let ranking = VsRanking::new(&ctx, &HeadQk::new(qh, &k, 128, n)?)?;
            let (v, s) = (cfg.vertical, cfg.slash);
            let aligned = ranking.index(&ctx, v, s).density();
            let columns = ranking.top_columns(v.min(n));
            let mut diagonals: Vec<usize> = ranking
                .diagonals
                .order
                .iter()
                .take(s.min(n))
                .map(|&d| d as usize)
                .collect();
            diagonals.sort_unstable();
            let (ranges, exact) = range_and_exact_cells(&ctx, &columns, &diagonals);
            let dense = causal_cells(&(0..n), &(0..n)) as f64;
            let (ranges, exact) = (ranges as f64 / dense, exact as f64 / dense);
            println!(
                "| {n} | {h} | {aligned:.4} | {ranges:.4} | {exact:.4} | {:.2} |",
                aligned / ranges
            );
        }
    }
    Ok(())
}

/// Causal cells of MInference's range tiling and of the exact selection, summed over query blocks.
/// `columns` and `diagonals` are sorted ascending.
fn range_and_exact_cells(
    ctx: &PatternContext,
    columns: &[usize],
    diagonals: &[usize],
) -> (u64, u64) {
    let (mut ranges_total, mut exact_total) = (0u64, 0u64);
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for qb in 0..ctx.q_blocks() {
        let rows = ctx.q_rows(qb);
        // Ranges by descending start = ascending offset; keep keys <= the block's last row.
        merged.clear();
        for &d in diagonals.iter().rev() {
            if d >= rows.end {
                continue;
            }
            let (lo, hi) = (rows.start.saturating_sub(d), rows.end - d);
            match merged.last_mut() {
                Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        for &(lo, hi) in &merged {
            let mut start = lo;
            while start < hi {
                ranges_total += causal_cells(&rows, &(start..start + ctx.block_k));
                start += ctx.block_k;
            }
        }
        let inside = |j: usize| merged.iter().any(|&(lo, hi)| lo <= j && j < hi);
        for &j in columns.iter().take_while(|&&j| j < rows.end) {
            let col = causal_cells(&rows, &(j..j + 1));
            if !inside(j) {
                ranges_total += col;
            }
            exact_total += col;
        }
        // Diagonal cells: row i meets diagonal d at key i - d when d <= i (a cell on a selected
        // column too is counted twice, so this is an upper bound of the exact selection).
        for &d in diagonals.iter().take_while(|&&d| d < rows.end) {
            exact_total += (rows.end - d.max(rows.start)) as u64;
        }
    }
    (ranges_total, exact_total)
}
