//! How many column-tile loads one gathered column list per group of query blocks would save, and
//! what 128-key steps shared by the group would compute (CPU only).
//!
//! ```text
//! cargo run --release -p runtime --features cuda --example column_sharing -- N HQ HKV D V S [G]
//! ```
//!
//! Builds the CPU vertical-slash index (budgets V and S, 64 x 64 blocks, last_q 64) of every head on
//! the benchmark's structured inputs and, for each group of G query blocks (default 2; 3 as the
//! head_dim-64 kernel takes them) that one warp-specialized CTA computes, compares the column tiles
//! loaded today (each block's own list, 64 columns a tile) with tiles of the group's union list
//! (each loaded once for all its blocks, each block masking the others' columns): loads, and the
//! tiles each warpgroup then computes. The study behind the union lists the kernels now use
//! (`ix_pair_union` of commit c7fd1b8, `ix_group_union` since ef22482; docs/perf.md).
//!
//! It also counts what sparse attention on 128-key steps would compute, the way the dense
//! `attn_fwd_wsk*` kernels run: every warpgroup computes every step of the group (masking the keys
//! its own list lacks), the steps covering the union of the blocks' key-block lists either at even
//! block pairs (`aligned`) or greedily from each uncovered block (`greedy`), and the union columns
//! 128 at a time; and with each warpgroup skipping the aligned steps that hold none of its blocks
//! (`aligned skipping`). Work is counted in 64 × 64 tile computations (a 128-key step is two per
//! warpgroup) against today's (each warpgroup its own key blocks, plus the union's column tiles).
//! A kernel on such steps (docs/experiments/sparse128-steps.patch) was measured slower than the
//! 64-key tiles on the H200 (docs/perf.md, "Nineteenth session").

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
    let usage = || Error::Shape("usage: column_sharing N HQ HKV D V S [G]".into());
    let (&[n, q_heads, kv_heads, head_dim, v_budget, s_budget], rest) =
        args.split_first_chunk::<6>().ok_or_else(usage)?;
    let group = match rest {
        [] => 2,
        [g @ (2 | 3)] => *g,
        _ => return Err(usage()),
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
    // column tiles loaded today / with the union (which each warpgroup then computes); tiles of the
    // busiest warpgroup today
    let (mut loads, mut loads_shared, mut busiest) = (0, 0, 0);
    // 64 x 64 tile computations today / on 128-key steps (aligned, greedy; aligned with each
    // warpgroup skipping the steps that hold none of its blocks)
    let (mut work, mut work_aligned, mut work_greedy, mut work_skip) = (0, 0, 0, 0);
    for h in 0..q_heads {
        for p in (0..q_blocks).step_by(group) {
            let members = p..(p + group).min(q_blocks);
            let warpgroups = members.len();
            let union = sorted_union(members.clone().map(|b| flat.columns(h, b)));
            let own_tiles = members.clone().map(|b| tiles(flat.columns(h, b).len()));
            loads += own_tiles.clone().sum::<usize>();
            busiest += own_tiles.max().unwrap_or(0);
            loads_shared += tiles(union.len());
            let blocks = sorted_union(members.clone().map(|b| flat.key_blocks(h, b)));
            let own_blocks: usize = members.clone().map(|b| flat.key_blocks(h, b).len()).sum();
            work += own_blocks + warpgroups * tiles(union.len());
            let (aligned, greedy) = steps_128(&blocks);
            let col_steps = union.len().div_ceil(128);
            work_aligned += 2 * warpgroups * (aligned + col_steps);
            work_greedy += 2 * warpgroups * (greedy + col_steps);
            for b in members {
                let (own_aligned, _) = steps_128(flat.key_blocks(h, b));
                work_skip += 2 * (own_aligned + col_steps);
            }
        }
    }
    let ratio = |a: usize, b: usize| a as f64 / b.max(1) as f64;
    println!(
        "n={n} {q_heads}x{kv_heads}x{head_dim} v={v_budget} s={s_budget}, groups of {group}: column \
         tiles loaded {loads} -> {loads_shared} with one list per group ({:.2}x fewer); tiles of \
         the busiest warpgroup {busiest} -> {loads_shared} ({:.3}x)",
        ratio(loads, loads_shared),
        ratio(loads_shared, busiest)
    );
    println!(
        "  tile computations (64 x 64) today {work}; on 128-key steps shared by the group: aligned \
         {work_aligned} ({:.3}x), greedy {work_greedy} ({:.3}x), aligned skipping {work_skip} ({:.3}x)",
        ratio(work_aligned, work),
        ratio(work_greedy, work),
        ratio(work_skip, work)
    );
    Ok(())
}

/// The ascending union of `lists`.
fn sorted_union<'a>(lists: impl Iterator<Item = &'a [u32]>) -> Vec<u32> {
    let mut all: Vec<u32> = lists.flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// 128-key steps covering the ascending key blocks `blocks`: at even block pairs (`2y, 2y + 1`), and
/// greedily (a step from each block not yet covered, taking the next block along when it is listed).
fn steps_128(blocks: &[u32]) -> (usize, usize) {
    let mut pairs: Vec<u32> = blocks.iter().map(|b| b / 2).collect();
    pairs.dedup();
    let (mut greedy, mut i) = (0, 0);
    while i < blocks.len() {
        greedy += 1;
        i += if blocks.get(i + 1) == Some(&(blocks[i] + 1)) {
            2
        } else {
            1
        };
    }
    (pairs.len(), greedy)
}
