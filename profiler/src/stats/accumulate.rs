//! The statistics pass over one layer: [`layer_stats`].
//!
//! Per query head: the runtime's rankings (vertical-slash, block-sparse) from the head's Q and K, then
//! every query block's exact softmax ([`RowBlock`]) consumed tile by tile into the sums of
//! [`HeadStats`]. Work is split into fixed chunks of query blocks per head, run with rayon and added in
//! chunk order, so the result does not depend on the number of threads.

use rayon::prelude::*;
use runtime::pattern::block_sparse::BlockRanking;
use runtime::pattern::vertical_slash::VsRanking;
use runtime::pattern::{causal_cells, query_adaptive, HeadQk, PatternContext};
use runtime::AttentionInput;
use schemas::Pattern;

use super::dynamic::{self, ColumnMass, Rankings};
use super::edges::{bucket, rank_edges, COVERAGE_GRID};
use super::head::{Curve, HeadStats, RankHistogram};
use super::tile::{PackedKeys, RowBlock};
use super::{StatsConfig, SINK_TOKENS};
use crate::Result;

/// Query blocks per work item.
const CHUNK: usize = 4;

/// What one head needs before its tiles: rankings and per-index buckets.
struct HeadPrep {
    ctx: PatternContext,
    vs: VsRanking,
    blocks: BlockRanking,
    edges: Vec<u32>,
    /// `[N]`: bucket of each column's vertical rank.
    col_bucket: Vec<u16>,
    /// `[N]`: bucket of each distance `i - j`.
    dist_bucket: Vec<u16>,
    /// Query-adaptive divergence (computed when dynamic candidates are scored).
    js: f64,
}

impl HeadPrep {
    fn new(ctx: &PatternContext, qk: &HeadQk<'_>, dynamic: bool) -> Result<Self> {
        let vs = VsRanking::new(ctx, qk)?;
        let blocks = BlockRanking::new(ctx, qk)?;
        let js = if dynamic {
            query_adaptive::divergence(ctx, qk, &vs)
        } else {
            0.0
        };
        let edges = rank_edges(ctx.seq_len);
        let col_bucket = vs
            .columns
            .rank
            .iter()
            .map(|&r| bucket(&edges, r) as u16)
            .collect();
        let dist_bucket = (0..ctx.seq_len as u32)
            .map(|o| bucket(&edges, o) as u16)
            .collect();
        Ok(Self {
            ctx: *ctx,
            vs,
            blocks,
            edges,
            col_bucket,
            dist_bucket,
            js,
        })
    }
}

/// Row sums of some query blocks of one head.
struct Sums {
    vertical_slash: RankHistogram,
    a_shape: RankHistogram,
    distance: Vec<f64>,
    sink: f64,
    entropy: f64,
}

impl Sums {
    fn new(buckets: usize) -> Self {
        Self {
            vertical_slash: RankHistogram::new(buckets),
            a_shape: RankHistogram::new(buckets),
            distance: vec![0.0; buckets],
            sink: 0.0,
            entropy: 0.0,
        }
    }

    /// Adds these sums into `s`.
    fn add_to(&self, s: &mut HeadStats) {
        s.sink_mass += self.sink;
        s.entropy_bits += self.entropy;
        for (a, b) in s.distance_mass.iter_mut().zip(&self.distance) {
            *a += b;
        }
        s.vertical_slash.merge(&self.vertical_slash);
        s.a_shape.merge(&self.a_shape);
    }
}

/// Sums of one chunk of query blocks of one head: blocks before the tail in `sums[0]`, blocks of the
/// tail in `sums[1]`.
struct Partial {
    sums: [Sums; 2],
    /// One row per query block of the chunk: mass per causal key block.
    heat: Vec<Vec<f64>>,
    /// Per query block, mass per causal column (kept only when dynamic candidates are scored).
    columns: Option<ColumnMass>,
}

/// Exact statistics of every query head of one layer's input (one sample).
pub fn layer_stats(input: &AttentionInput<'_>, cfg: &StatsConfig) -> Result<Vec<HeadStats>> {
    layer_stats_scored(input, cfg, &[])
}

/// [`layer_stats`] plus the mass and cells of every dynamic candidate (see [`super::dynamic`]) in
/// [`HeadStats::dynamic`], in the order of `candidates`.
pub fn layer_stats_scored(
    input: &AttentionInput<'_>,
    cfg: &StatsConfig,
    candidates: &[Pattern],
) -> Result<Vec<HeadStats>> {
    dynamic::check_candidates(candidates)?;
    let scored = !candidates.is_empty();
    let shape = input.shape;
    let (ctx, packed) = PackedKeys::pack_layer(input, cfg)?;
    let (n, d) = (shape.seq_len, shape.head_dim);
    let preps: Vec<HeadPrep> = (0..shape.q_heads)
        .into_par_iter()
        .map(|h| HeadPrep::new(&ctx, &HeadQk::from_input(input, h)?, scored))
        .collect::<Result<_>>()?;
    let nqb = ctx.q_blocks();
    // Past the last block when there is no tail: every block goes to `sums[0]`.
    let tail = cfg.tail_start(n).unwrap_or(nqb);
    let items: Vec<(usize, usize)> = (0..shape.q_heads)
        .flat_map(|h| (0..nqb.div_ceil(CHUNK)).map(move |c| (h, c)))
        .collect();
    let partials: Vec<Partial> = items
        .par_iter()
        .map_init(
            || RowBlock::new(d, ctx.block_q, ctx.block_k),
            |rb, &(h, c)| {
                let g = shape.kv_head_of(h);
                let qbs = c * CHUNK..((c + 1) * CHUNK).min(nqb);
                chunk(
                    &preps[h],
                    input.q_head(h),
                    &packed[g],
                    qbs,
                    rb,
                    scored,
                    tail,
                )
            },
        )
        .collect::<Result<_>>()?;
    let per_head = nqb.div_ceil(CHUNK);
    let mut out = Vec::with_capacity(shape.q_heads);
    for (h, prep) in preps.iter().enumerate() {
        let parts = partials
            .get(h * per_head..(h + 1) * per_head)
            .unwrap_or(&[]);
        out.push(combine(prep, parts, cfg.tail_start(n)));
    }
    if scored {
        out.par_iter_mut()
            .enumerate()
            .try_for_each(|(h, stats)| -> Result<()> {
                let parts = partials
                    .get(h * per_head..(h + 1) * per_head)
                    .unwrap_or(&[]);
                let mut columns = ColumnMass::new();
                for p in parts {
                    if let Some(c) = &p.columns {
                        columns.append(c);
                    }
                }
                let prep = &preps[h];
                let rankings = Rankings {
                    vs: &prep.vs,
                    blocks: &prep.blocks,
                    js: prep.js,
                };
                let (all, last) =
                    dynamic::score(&ctx, &rankings, &stats.heat, &columns, candidates, tail)?;
                stats.dynamic = all;
                if let Some(t) = stats.tail.as_mut() {
                    t.dynamic = last;
                }
                Ok(())
            })?;
    }
    Ok(out)
}

/// Tiles of query blocks `qbs` of one head; blocks from `tail_start` on are summed apart.
fn chunk(
    prep: &HeadPrep,
    q: &[f32],
    keys: &PackedKeys,
    qbs: std::ops::Range<usize>,
    rb: &mut RowBlock,
    keep_columns: bool,
    tail_start: usize,
) -> Result<Partial> {
    let ctx = &prep.ctx;
    let nb = prep.edges.len();
    let mut p = Partial {
        sums: [Sums::new(nb), Sums::new(nb)],
        heat: Vec::with_capacity(qbs.len()),
        columns: keep_columns.then(ColumnMass::new),
    };
    let stride = rb.stride();
    let mut colsum = vec![0.0f32; stride];
    let mut diag = vec![0.0f32; ctx.block_q + stride];
    for qb in qbs {
        rb.compute(q, keys, qb)?;
        let rows = rb.rows();
        let inv_l = rb.inv_l();
        let mut heat_row = Vec::with_capacity(rb.k_blocks());
        let mut column_row = p.columns.as_mut().map(|c| c.push_row(rows.end));
        let sums = &mut p.sums[usize::from(qb >= tail_start)];
        for kb in 0..rb.k_blocks() {
            let cols = ctx.k_cols(kb);
            let tile = rb.tile(kb);
            colsum.fill(0.0);
            // Distances in this tile: rows.start - (cols.end - 1) ..= rows.end - 1 - cols.start.
            let lo = rows.start.saturating_sub(cols.end - 1);
            let hi = rows.end - 1 - cols.start;
            let one_bucket = prep.dist_bucket.get(lo) == prep.dist_bucket.get(hi);
            if !one_bucket {
                diag.fill(0.0);
            }
            for r in 0..rows.len() {
                let nv = rb.visible(r, kb);
                let il = inv_l[r];
                let row = &tile[r * stride..r * stride + nv];
                for (s, &e) in colsum.iter_mut().zip(row) {
                    *s += e * il;
                }
                if !one_bucket {
                    // local index r - c + stride - 1 for column c
                    let base = r + stride - nv;
                    for (dst, &e) in diag[base..base + nv].iter_mut().zip(row.iter().rev()) {
                        *dst += e * il;
                    }
                }
            }
            let ncols = cols.len();
            if let Some(dst) = column_row
                .as_deref_mut()
                .and_then(|r| r.get_mut(cols.start..cols.end.min(rows.end)))
            {
                let len = dst.len();
                dst.copy_from_slice(&colsum[..len]);
            }
            let mass: f64 = colsum[..ncols].iter().map(|&x| f64::from(x)).sum();
            heat_row.push(mass);
            if one_bucket {
                if let Some(&b) = prep.dist_bucket.get(lo) {
                    sums.distance[b as usize] += mass;
                }
            } else {
                // local index x is distance rows.start + x - (stride - 1) - cols.start
                for (x, &m) in diag.iter().enumerate() {
                    if m != 0.0 {
                        let o = (x + rows.start).checked_sub(cols.start + stride - 1);
                        if let Some(&b) = o.and_then(|o| prep.dist_bucket.get(o)) {
                            sums.distance[b as usize] += f64::from(m);
                        }
                    }
                }
            }
            if cols.start < SINK_TOKENS {
                let k = (SINK_TOKENS - cols.start).min(ncols);
                sums.sink += colsum[..k].iter().map(|&x| f64::from(x)).sum::<f64>();
            }
            // Vertical-slash: axis a = column rank bucket, axis b = block slash rank bucket.
            let sb = bucket(&prep.edges, prep.vs.block_rank(qb, kb));
            for (c, &s) in colsum[..ncols].iter().enumerate() {
                let j = cols.start + c;
                let cb = prep.col_bucket.get(j).map_or(0, |&b| b as usize);
                let at = cb * nb + sb;
                sums.vertical_slash.mass[at] += f64::from(s);
                sums.vertical_slash.cells[at] += rows.end.saturating_sub(j.max(rows.start)) as f64;
            }
            // A-shape: axis a = sink rank kb * block_k, axis b = local rank.
            let sink_rank = u32::try_from(cols.start).unwrap_or(u32::MAX);
            let local_rank = (rows.start + 1).saturating_sub(cols.end);
            let at = bucket(&prep.edges, sink_rank) * nb
                + bucket(&prep.edges, u32::try_from(local_rank).unwrap_or(u32::MAX));
            sums.a_shape.mass[at] += mass;
            sums.a_shape.cells[at] += causal_cells(&rows, &cols) as f64;
        }
        sums.entropy += (0..rows.len()).map(|r| rb.entropy_bits(r)).sum::<f64>();
        p.heat.push(heat_row);
    }
    Ok(p)
}

/// Adds a head's partials in order and derives the block-sparse curves from the full heat map; with
/// a tail (first block `tail_start`), the same for the tail's blocks in [`HeadStats::tail`].
fn combine(prep: &HeadPrep, parts: &[Partial], tail_start: Option<usize>) -> HeadStats {
    let ctx = &prep.ctx;
    let n = ctx.seq_len;
    let nb = prep.edges.len();
    let blank = |rows: u64, dense_cells: f64| {
        let mut s = HeadStats::empty(ctx);
        s.samples = 1;
        s.rows = rows;
        s.dense_cells = dense_cells;
        s.max_len = n;
        s.edges.clone_from(&prep.edges);
        s.distance_mass = vec![0.0; nb];
        s.vertical_slash = RankHistogram::new(nb);
        s.a_shape = RankHistogram::new(nb);
        s
    };
    let mut s = blank(n as u64, (n as f64) * (n as f64 + 1.0) / 2.0);
    let mut tail = tail_start.map(|t| {
        let first = ctx.q_rows(t).start.min(n);
        // Rows first..n; row i has i + 1 causal cells.
        let (a, b) = (first as f64, n as f64);
        blank((n - first) as u64, (b * (b + 1.0) - a * (a + 1.0)) / 2.0)
    });
    for p in parts {
        for sums in &p.sums {
            sums.add_to(&mut s);
        }
        if let Some(t) = tail.as_mut() {
            p.sums[1].add_to(t);
        }
        s.heat.extend(p.heat.iter().cloned());
    }
    s.heat_rows = (0..ctx.q_blocks())
        .map(|qb| ctx.q_rows(qb).len() as u64)
        .collect();

    // Block-sparse: cumulative exact mass and cells along each query block's ranking.
    let nkb = ctx.k_blocks();
    let curves = || {
        (
            Curve {
                mass: vec![0.0; nkb],
                cells: vec![0.0; nkb],
            },
            Curve {
                mass: vec![0.0; COVERAGE_GRID.len()],
                cells: vec![0.0; COVERAGE_GRID.len()],
            },
        )
    };
    let mut all = curves();
    let mut last = curves();
    for (qb, heat) in s.heat.iter().enumerate() {
        let rows = ctx.q_rows(qb);
        let order = prep.blocks.order(qb);
        let mut cum_mass = vec![0.0f64; order.len() + 1];
        let mut cum_cells = vec![0.0f64; order.len() + 1];
        for (r, &kb) in order.iter().enumerate() {
            let kb = kb as usize;
            cum_mass[r + 1] = cum_mass[r] + heat.get(kb).copied().unwrap_or(0.0);
            cum_cells[r + 1] = cum_cells[r] + causal_cells(&rows, &ctx.k_cols(kb)) as f64;
        }
        let in_tail = tail_start.is_some_and(|t| qb >= t);
        for (top_k, coverage) in std::iter::once(&mut all).chain(in_tail.then_some(&mut last)) {
            for k in 1..=nkb {
                let c = prep.blocks.top_k_count(qb, k);
                top_k.mass[k - 1] += cum_mass[c];
                top_k.cells[k - 1] += cum_cells[c];
            }
            for (g, &cov) in COVERAGE_GRID.iter().enumerate() {
                let c = prep.blocks.coverage_count(qb, cov);
                coverage.mass[g] += cum_mass[c];
                coverage.cells[g] += cum_cells[c];
            }
        }
    }
    (s.block_top_k, s.block_coverage) = all;
    if let Some(mut t) = tail {
        (t.block_top_k, t.block_coverage) = last;
        s.tail = Some(Box::new(t));
    }
    s
}
