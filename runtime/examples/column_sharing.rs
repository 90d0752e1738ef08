//! How many column-tile loads one gathered column list per query-block pair would save (CPU only).
//!
//! ```text
//! cargo run --release -p runtime --features cuda --example column_sharing -- N HQ HKV D V S
//! ```
//!
//! Builds the CPU vertical-slash index (budgets V and S, 64 x 64 blocks, last_q 64) of every head on
//! the benchmark's structured inputs and, for each pair of query blocks (2p, 2p + 1) that one
//! warp-specialized CTA computes, compares the column tiles loaded today (each block's own list, 64
//! columns a tile) with tiles of the pair's union list (each loaded once for both blocks, each block
//! masking the other's columns): loads, and the tiles each warpgroup then computes. The study behind
//! the union lists the kernels now use (`ix_pair_union` of commit c7fd1b8, `ix_group_union` since
//! ef22482; docs/perf.md).

use rayon::prelude::*;
use runtime::exec::cuda::bench::structured;
use runtime::exec::cuda::FlatIndex;
use runtime::pattern::{vertical_slash, HeadIndex, HeadQk, PatternContext};
use runtime::{AttentionInput, AttnShape, Error, Result};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse::<usize>()
                .map_err(|_| Error::Shape(format!("{a}: expected a count")))
        })
        .collect::<Result<Vec<_>>>()?;
    let [n, q_heads, kv_heads, head_dim, v_budget, s_budget] = args[..] else {
        return Err(Error::Shape("usage: column_sharing N HQ HKV D V S".into()));
    };
    let shape = AttnShape {
        q_heads,
        kv_heads,
        head_dim,
        seq_len: n,
    };
    shape.check()?;
    let (q, k, v) = structured(&shape, 15)?;
    let input = AttentionInput::new(shape, &q, &k, &v)?;
    let ctx = PatternContext {
        seq_len: n,
        block_q: 64,
        block_k: 64,
        last_q: 64,
    };
    let heads: Vec<HeadIndex> = (0..q_heads)
        .into_par_iter()
        .map(|h| vertical_slash::index(&ctx, &HeadQk::from_input(&input, h)?, v_budget, s_budget))
        .collect::<Result<_>>()?;
    let flat = FlatIndex::from_heads(n, &heads)?;
    let q_blocks = n.div_ceil(64);
    let tiles = |cols: usize| cols.div_ceil(64);
    // tiles loaded today / with the union (which each warpgroup then computes); tiles of the busier
    // warpgroup today
    let (mut loads, mut loads_shared, mut busiest) = (0, 0, 0);
    for h in 0..q_heads {
        for p in (0..q_blocks).step_by(2) {
            let a = flat.columns(h, p);
            let b = flat.columns(h, p + 1);
            let mut union: Vec<u32> = a.iter().chain(b).copied().collect();
            union.sort_unstable();
            union.dedup();
            loads += tiles(a.len()) + tiles(b.len());
            loads_shared += tiles(union.len());
            busiest += tiles(a.len()).max(tiles(b.len()));
        }
    }
    println!(
        "n={n} {q_heads}x{kv_heads}x{head_dim} v={v_budget} s={s_budget}: column tiles loaded {loads} -> {loads_shared} \
         with one list per pair ({:.2}x fewer); tiles of the busier warpgroup {busiest} -> \
         {loads_shared} ({:.3}x)",
        loads as f64 / loads_shared.max(1) as f64,
        loads_shared as f64 / busiest.max(1) as f64
    );
    Ok(())
}
