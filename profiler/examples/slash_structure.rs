//! Are the top vertical-slash diagonals of real heads clustered near the main diagonal, or scattered
//! like those of the CUDA benchmark's structured inputs? Runs the default model (SmolLM2-135M) on
//! one synthetic sample, ranks every head's columns and diagonals from its last 64 queries (after
//! RoPE, the runtime's `VsRanking`), and reports, at the benchmark's budgets scaled to the length
//! (v = 1000 and s = 6096 at 128K tokens, so v = 62 and s = 381 at 8K):
//! - **exact**: the selected cells (`selection_cells`), over the dense causal cells;
//! - **aligned**: what our index computes (every 64×64 block a selected diagonal touches, plus the
//!   columns); **ranges**: MInference's range tiling of the same selection;
//! - **local**: the share of the selected diagonals with offset below `s` (1 when the selection is
//!   the band `0..s`);
//! - **recall** of each of the three cell sets: the attention mass they hold, averaged over 128 query
//!   rows spread over the sequence (exact softmax of the head's live Q and K, f64), so that tiling
//!   ranges instead of aligned blocks can be judged at equal recall.
//!
//! The same figures follow for the benchmark's structured inputs at the same length (head_dim 64
//! and 128), so the two can be compared.
//!
//! ```text
//! scripts/fetch-model.sh
//! cargo run --release -p profiler --example slash_structure -- [N] [TASK] [SEED] [SCALE]
//! ```
//! N defaults to 8192, TASK to needle (passkey, kv-retrieval, needle), SEED to 11001; SCALE (default
//! 1) multiplies both budgets, to compare the tilings at equal recall.

use profiler::data::{load_samples, DataSource};
use profiler::model::{ensure_default_model, Model};
use runtime::exec::cuda::bench::structured;
use runtime::pattern::vertical_slash::{range_tiles, selection_cells, VsRanking};
use runtime::pattern::{causal_cells, HeadQk, PatternContext};
use runtime::AttnShape;

/// The benchmark's budgets at 128K tokens.
const BENCH_N: f64 = 131_072.0;
const BENCH_V: f64 = 1000.0;
const BENCH_S: f64 = 6096.0;

/// Query rows whose attention mass is summed for the recalls.
const RECALL_ROWS: usize = 128;

/// One head's figures.
#[derive(Debug, Clone, Copy)]
struct Head {
    exact: f64,
    aligned: f64,
    ranges: f64,
    local: f64,
    recall_exact: f64,
    recall_aligned: f64,
    recall_ranges: f64,
}

fn measure(ctx: &PatternContext, qk: &HeadQk<'_>, v: usize, s: usize) -> runtime::Result<Head> {
    let n = ctx.seq_len;
    let ranking = VsRanking::new(ctx, qk)?;
    let index = ranking.index(ctx, v, s);
    let columns = ranking.top_columns(v);
    let diagonals = ranking.top_diagonals(s);
    let cells = selection_cells(ctx, &columns, &diagonals);
    let dense = causal_cells(&(0..n), &(0..n)) as f64;
    let local = diagonals.iter().filter(|&&d| d < s).count() as f64 / diagonals.len() as f64;
    let scale = 1.0 / (qk.head_dim as f64).sqrt();
    let (mut re, mut ra, mut rr) = (0.0f64, 0.0f64, 0.0f64);
    let rows: Vec<usize> = (0..RECALL_ROWS)
        .map(|r| n - 1 - r * (n - 1) / RECALL_ROWS)
        .collect();
    for &i in &rows {
        let qi = &qk.q[i * qk.head_dim..(i + 1) * qk.head_dim];
        let logits: Vec<f64> = (0..=i)
            .map(|j| {
                let kj = &qk.k[j * qk.head_dim..(j + 1) * qk.head_dim];
                qi.iter()
                    .zip(kj)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = logits.iter().map(|&x| (x - m).exp()).collect();
        let z: f64 = p.iter().sum();
        let qb = i / ctx.block_q;
        let tiles = range_tiles(ctx, qb, &diagonals);
        for (j, &pj) in p.iter().enumerate() {
            let column = columns.binary_search(&j).is_ok();
            if column || diagonals.binary_search(&(i - j)).is_ok() {
                re += pj / z;
            }
            if index.contains(i, j) {
                ra += pj / z;
            }
            if column || tiles.iter().any(|t| t.contains(&j)) {
                rr += pj / z;
            }
        }
    }
    let rows = rows.len() as f64;
    Ok(Head {
        exact: cells.exact as f64 / dense,
        aligned: index.density(),
        ranges: cells.ranges as f64 / dense,
        local,
        recall_exact: re / rows,
        recall_aligned: ra / rows,
        recall_ranges: rr / rows,
    })
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn row(name: &str, heads: &[Head]) {
    let column = |f: fn(&Head) -> f64| {
        let mut x: Vec<f64> = heads.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        format!(
            "{:.3} / {:.3} / {:.3}",
            quantile(&x, 0.25),
            quantile(&x, 0.5),
            quantile(&x, 0.75)
        )
    };
    println!(
        "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        heads.len(),
        column(|h| h.exact),
        column(|h| h.aligned),
        column(|h| h.ranges),
        column(|h| h.aligned / h.exact),
        column(|h| h.local),
        column(|h| h.recall_exact),
        column(|h| h.recall_aligned),
        column(|h| h.recall_ranges),
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = match args.first() {
        Some(a) => a
            .parse()
            .map_err(|e| format!("N must be an integer: {e}"))?,
        None => 8192,
    };
    let task = args.get(1).map_or("needle", String::as_str);
    let seed: u64 = match args.get(2) {
        Some(a) => a
            .parse()
            .map_err(|e| format!("SEED must be an integer: {e}"))?,
        None => 11_001,
    };
    let factor: f64 = match args.get(3) {
        Some(a) => a
            .parse()
            .map_err(|e| format!("SCALE must be a number: {e}"))?,
        None => 1.0,
    };
    let scale = factor * n as f64 / BENCH_N;
    let (v, s) = (
        (BENCH_V * scale).round().max(1.0) as usize,
        (BENCH_S * scale).round().max(1.0) as usize,
    );
    let ctx = PatternContext {
        seq_len: n,
        block_q: 64,
        block_k: 64,
        last_q: 64,
    };

    let model = Model::load(&ensure_default_model()?)?;
    let source = DataSource::parse(&format!("synthetic:{task}"))?;
    let sample = load_samples(&source, model.tokenizer(), n, 1, seed)?
        .pop()
        .ok_or("no sample")?;
    let mut real: Vec<(usize, Head)> = Vec::new();
    let mut hook = |layer: usize,
                    input: &runtime::AttentionInput<'_>,
                    out: &mut [f32]|
     -> profiler::Result<()> {
        let sh = input.shape;
        let (d, group) = (sh.head_dim, sh.q_heads / sh.kv_heads);
        for h in 0..sh.q_heads {
            let q = &input.q[h * n * d..(h + 1) * n * d];
            let kv = h / group;
            let k = &input.k[kv * n * d..(kv + 1) * n * d];
            real.push((layer, measure(&ctx, &HeadQk::new(q, k, d, n)?, v, s)?));
        }
        runtime::exec::dense_attention(input, out)?;
        Ok(())
    };
    model.forward_hidden(&sample.tokens, &mut hook)?;

    println!(
        "{n} tokens, v = {v}, s = {s}, last_q 64, 64x64 blocks; sample {}",
        sample.id
    );
    println!("quartiles over heads (25% / median / 75%); cells over the dense causal cells\n");
    println!(
        "| inputs | heads | exact | aligned | ranges | aligned / exact | local | recall exact | recall aligned | recall ranges |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let all: Vec<Head> = real.iter().map(|&(_, h)| h).collect();
    row("SmolLM2-135M, all layers", &all);
    let layers = real.iter().map(|&(l, _)| l).max().map_or(0, |l| l + 1);
    for (name, range) in [
        ("layers 0-1", 0..2.min(layers)),
        ("layers 2-end", 2.min(layers)..layers),
    ] {
        let part: Vec<Head> = real
            .iter()
            .filter(|(l, _)| range.contains(l))
            .map(|&(_, h)| h)
            .collect();
        if !part.is_empty() {
            row(&format!("SmolLM2-135M, {name}"), &part);
        }
    }
    for d in [64usize, 128] {
        let shape = AttnShape {
            seq_len: n,
            q_heads: 4,
            kv_heads: 1,
            head_dim: d,
        };
        let (q, k, _) = structured(&shape, 7 + n as u64)?;
        let heads = (0..4)
            .map(|h| {
                let qh = &q[h * n * d..(h + 1) * n * d];
                measure(&ctx, &HeadQk::new(qh, &k, d, n)?, v, s)
            })
            .collect::<runtime::Result<Vec<_>>>()?;
        row(&format!("benchmark structured, d {d}"), &heads);
    }
    Ok(())
}
