//! How many cells one vertical-slash selection costs under two ways of tiling its diagonals, on the
//! CUDA benchmark's structured inputs (CPU only; no GPU needed).
//!
//! ```text
//! cargo run --release -p runtime --features cuda --example slash_tiles -- [--band B] [N...]
//! ```
//!
//! For each length (default 32768 and 131072), query heads 0..4 of one KV head (the structured
//! inputs with the local band B, `scattered` by default or `local`; the structured
//! inputs repeat with period 4 over heads), v = 1000 columns and s = 6096 diagonals from the last 64
//! queries (the benchmark's settings), the same top columns and diagonals are counted three ways:
//! - **aligned**: our index: every 64×64 key block that a selected diagonal touches, plus the
//!   columns outside those blocks (what the CPU and CUDA executors compute now);
//! - **ranges**: MInference's conversion: per query block, each selected diagonal `d` becomes the
//!   64-key range `[r0 − d, r1 − d)`, overlapping ranges are merged, each merged range is covered by
//!   64-key tiles starting at its first key (not block-aligned), plus the columns outside the tiles;
//! - **exact**: only the cells on the selected diagonals and columns (the selection itself; a cell
//!   on both is counted twice, so this is an upper bound).
//!
//! Every figure is causal cells over the dense causal cells.

use runtime::exec::cuda::bench::{structured_band, Band, BenchConfig};
use runtime::pattern::vertical_slash::{selection_cells, VsRanking};
use runtime::pattern::{causal_cells, HeadQk};
use runtime::AttnShape;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let band = match args.iter().position(|a| a == "--band") {
        Some(i) if i + 1 < args.len() => {
            let b: Band = args[i + 1].parse()?;
            args.drain(i..i + 2);
            b
        }
        Some(_) => return Err("--band needs a value: scattered or local".into()),
        None => Band::Scattered,
    };
    let lens: Vec<usize> = match args
        .iter()
        .map(|a| a.parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(v) if !v.is_empty() => v,
        Ok(_) => vec![32_768, 131_072],
        Err(e) => return Err(format!("lengths must be integers: {e}").into()),
    };
    println!("{band} band");
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
        let (q, k, _) = structured_band(&shape, cfg.seed(), band)?;
        for h in 0..4 {
            let qh = &q[h * n * 128..(h + 1) * n * 128];
            let ranking = VsRanking::new(&ctx, &HeadQk::new(qh, &k, 128, n)?)?;
            let (v, s) = (cfg.vertical, cfg.slash);
            let aligned = ranking.index(&ctx, v, s).density();
            let columns = ranking.top_columns(v.min(n));
            let diagonals = ranking.top_diagonals(s.min(n));
            let cells = selection_cells(&ctx, &columns, &diagonals);
            let dense = causal_cells(&(0..n), &(0..n)) as f64;
            let (ranges, exact) = (cells.ranges as f64 / dense, cells.exact as f64 / dense);
            println!(
                "| {n} | {h} | {aligned:.4} | {ranges:.4} | {exact:.4} | {:.2} |",
                aligned / ranges
            );
        }
    }
    Ok(())
}
