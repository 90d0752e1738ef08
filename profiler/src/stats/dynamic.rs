//! Dynamic candidates: pattern families without sufficient statistics, scored exactly from the live
//! Q and K during the statistics pass.
//!
//! Query-adaptive (FlexPrefill), token-select (TCA) and grid (MMInference) indexes depend on the live
//! queries in ways the rank histograms do not capture (a per-head branch on a divergence, per-chunk
//! token choices, periods). Their candidates are a fixed list of [`Pattern`]s ([`default_candidates`],
//! plus grid strides the data declares, [`grid_candidates`]); the list is stored in the profile's
//! metadata so the calibrator and the held-out profile read the same columns.
//!
//! Scoring is exact and shares the runtime's selection code: each candidate's key blocks and gathered
//! columns come from the same functions `runtime::pattern` runs (from the rankings the statistics
//! already computed: budgets, block orders, token choices), and their mass is read off the pass's own
//! probabilities: tile masses for listed key blocks, and per-query-block column masses for gathered
//! columns ([`ColumnMass`], `Σ_{i ∈ qb} p_ij`, about `N² / (2 block_q)` floats per head while its
//! layer is processed). The cells are counted by [`rule_mass`], which applies the index builder's
//! rules (causal blocks only, columns up to the block's last row and never inside a listed block)
//! without materializing a [`HeadIndex`] — building ~35 indexes per head cost more than the whole
//! statistics pass. Tests check every candidate's recall and cells against the runtime's own index.
//! Recall = mass / rows, density = cells / dense cells, as for every other family.

use runtime::pattern::block_sparse::BlockRanking;
use runtime::pattern::vertical_slash::{self, VsRanking};
use runtime::pattern::{
    a_shape, causal_cells, grid, query_adaptive, token_select, HeadIndex, PatternContext,
};
use schemas::{Budget, Grid, Pattern, QueryAdaptive, TokenSelect};

use super::head::Curve;
use crate::{Error, Result};

/// FlexPrefill's coverage thresholds searched (its default is 0.9).
pub const GAMMAS: [f64; 5] = [0.8, 0.9, 0.95, 0.98, 0.99];
/// Divergence thresholds: 0 always takes the vertical-slash branch, 1 (above `ln 2`, the largest
/// Jensen-Shannon divergence) always the query-aware one; 0.1 is FlexPrefill's default.
pub const TAUS: [f64; 4] = [0.0, 0.1, 0.3, 1.0];
/// Fewest key blocks per query block (query-aware), or `min_budget * block_k` tokens (vertical-slash).
pub const MIN_BUDGETS: [u64; 2] = [1, 4];
/// Token-select: tokens kept per chunk of `block_k` tokens (the median chunk's with a spread), TCA's
/// log scale `1, 2, 4, …` up to half a 64-token chunk (a whole chunk would be its every column).
pub const KEEPS: [u64; 6] = [1, 2, 4, 8, 16, 32];
/// Token-select spreads (powers of two): one count for every chunk, or TCA's per-head log-Gaussian
/// distribution of counts over the chunks, ranked by the attention they receive.
pub const SPREADS: [f64; 3] = [0.0, 1.0, 2.0];
/// Token-select and grid local windows (tokens); the sink is one key block.
pub const LOCALS: [u64; 3] = [128, 512, 1024];
/// Grid widths searched at each declared stride.
pub const GRID_WIDTHS: [u32; 3] = [1, 2, 4];

/// The query-adaptive and token-select candidates at key block size `block_k`.
pub fn default_candidates(block_k: u32) -> Vec<Pattern> {
    let mut out = Vec::new();
    for &gamma in &GAMMAS {
        for &tau in &TAUS {
            for &min in &MIN_BUDGETS {
                out.push(Pattern::QueryAdaptive(QueryAdaptive {
                    gamma,
                    tau,
                    min_budget: Budget::Fixed(min),
                }));
            }
        }
    }
    for &spread in &SPREADS {
        for &keep in &KEEPS {
            for &local in &LOCALS {
                out.push(Pattern::TokenSelect(TokenSelect {
                    block: block_k,
                    keep: Budget::Fixed(keep),
                    spread,
                    sink: Budget::Fixed(u64::from(block_k)),
                    local: Budget::Fixed(local),
                }));
            }
        }
    }
    out
}

/// Grid candidates for a period the data declares (`stride` tokens, first period starting at
/// `phase`): every width of [`GRID_WIDTHS`] up to the stride, with each local window of [`LOCALS`].
pub fn grid_candidates(stride: u32, phase: u32, block_k: u32) -> Vec<Pattern> {
    let mut out = Vec::new();
    for &width in GRID_WIDTHS.iter().filter(|&&w| w <= stride) {
        for &local in &LOCALS {
            out.push(Pattern::Grid(Grid {
                stride,
                phase: phase % stride.max(1),
                width,
                sink: Budget::Fixed(u64::from(block_k)),
                local: Budget::Fixed(local),
            }));
        }
    }
    out
}

/// Checks that every candidate is a family this module scores, with valid parameters.
pub fn check_candidates(candidates: &[Pattern]) -> Result<()> {
    for (i, p) in candidates.iter().enumerate() {
        let checked = match p {
            Pattern::QueryAdaptive(q) => query_adaptive::check(q),
            Pattern::TokenSelect(t) => token_select::check(t),
            Pattern::Grid(g) => grid::check(g),
            other => {
                return Err(Error::Profile(format!(
                    "dynamic candidate {i}: `{}` has sufficient statistics and is not scored here",
                    other.kind()
                )))
            }
        };
        checked.map_err(|e| Error::Profile(format!("dynamic candidate {i}: {e}")))?;
    }
    Ok(())
}

/// Column masses of one head: for each query block `qb`, `Σ_{i ∈ qb} p_ij` for `j < rows.end`.
#[derive(Debug, Clone, Default)]
pub struct ColumnMass {
    /// `q_blocks + 1` offsets into `data`.
    start: Vec<usize>,
    data: Vec<f32>,
}

impl ColumnMass {
    pub fn new() -> Self {
        Self {
            start: vec![0],
            data: Vec::new(),
        }
    }

    /// Appends the next query block's row (`len` causal columns, zeroed); returns it.
    pub fn push_row(&mut self, len: usize) -> &mut [f32] {
        let at = self.data.len();
        self.data.resize(at + len, 0.0);
        self.start.push(self.data.len());
        &mut self.data[at..]
    }

    /// Appends every row of `other` after ours.
    pub fn append(&mut self, other: &ColumnMass) {
        let base = self.data.len();
        self.data.extend_from_slice(&other.data);
        self.start
            .extend(other.start.iter().skip(1).map(|&s| base + s));
    }

    fn row(&self, qb: usize) -> &[f32] {
        match (self.start.get(qb), self.start.get(qb + 1)) {
            (Some(&a), Some(&b)) => self.data.get(a..b).unwrap_or(&[]),
            _ => &[],
        }
    }
}

/// Mass and cells summed over every query block (`all`) and over the blocks from `tail_start` on
/// (`tail`, the rows [`super::HeadStats::tail`] describes).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Split {
    pub all: (f64, f64),
    pub tail: (f64, f64),
}

impl Split {
    fn add(&mut self, in_tail: bool, mass: f64, cells: f64) {
        self.all.0 += mass;
        self.all.1 += cells;
        if in_tail {
            self.tail.0 += mass;
            self.tail.1 += cells;
        }
    }
}

/// Exact mass and cells of `index` from the tile masses `heat` (`[qb][kb]`) and the column masses.
pub fn index_mass(
    index: &HeadIndex,
    heat: &[Vec<f64>],
    columns: &ColumnMass,
    tail_start: usize,
) -> Split {
    let mut out = Split::default();
    for qb in 0..index.q_blocks() {
        let tiles = heat.get(qb).map_or(&[][..], Vec::as_slice);
        let from_blocks: f64 = index
            .key_blocks(qb)
            .iter()
            .filter_map(|&kb| tiles.get(kb as usize))
            .sum();
        let row = columns.row(qb);
        let from_columns: f64 = index
            .columns(qb)
            .iter()
            .filter_map(|&j| row.get(j as usize))
            .map(|&x| f64::from(x))
            .sum();
        out.add(
            qb >= tail_start,
            from_blocks + from_columns,
            index.block_cells(qb) as f64,
        );
    }
    out
}

/// What one head's candidates are built from: the rankings of the statistics pass and the
/// query-adaptive divergence.
pub struct Rankings<'a> {
    pub vs: &'a VsRanking,
    pub blocks: &'a BlockRanking,
    /// [`query_adaptive::divergence`] of the head.
    pub js: f64,
}

/// Mass and cells of what the runtime's index builder keeps for key blocks `blocks_of(qb)` (any
/// order, duplicates allowed) plus the gathered `columns` (sorted, distinct): blocks with no causal
/// cell are dropped, columns past the query block's last row or inside a listed block too. Query
/// blocks from `tail_start` on are also summed apart.
pub fn rule_mass(
    ctx: &PatternContext,
    heat: &[Vec<f64>],
    column_mass: &ColumnMass,
    mut blocks_of: impl FnMut(usize, &mut Vec<usize>),
    columns: &[usize],
    tail_start: usize,
) -> Split {
    let mut in_block = vec![false; ctx.k_blocks()];
    let mut listed = Vec::new();
    let mut out = Split::default();
    for qb in 0..ctx.q_blocks() {
        let (mut mass, mut cells) = (0.0f64, 0.0f64);
        let rows = ctx.q_rows(qb);
        let Some(last) = rows.end.checked_sub(1) else {
            continue;
        };
        let causal = ctx.causal_k_blocks(qb);
        let tiles = heat.get(qb).map_or(&[][..], Vec::as_slice);
        listed.clear();
        blocks_of(qb, &mut listed);
        for &kb in &listed {
            if kb < causal && !in_block[kb] {
                in_block[kb] = true;
                mass += tiles.get(kb).copied().unwrap_or(0.0);
                cells += causal_cells(&rows, &ctx.k_cols(kb)) as f64;
            }
        }
        let row = column_mass.row(qb);
        for &j in columns.iter().take_while(|&&j| j <= last) {
            if !in_block[j / ctx.block_k] {
                mass += row.get(j).copied().map_or(0.0, f64::from);
                cells += (rows.end - j.max(rows.start)) as f64;
            }
        }
        for &kb in &listed {
            if let Some(flag) = in_block.get_mut(kb) {
                *flag = false;
            }
        }
        out.add(qb >= tail_start, mass, cells);
    }
    out
}

/// The index a candidate gives this head, built with the runtime's functions (for tests and
/// inspection; [`score`] reads the same cells without building it).
pub fn candidate_index(ctx: &PatternContext, r: &Rankings<'_>, p: &Pattern) -> Result<HeadIndex> {
    Ok(match p {
        Pattern::QueryAdaptive(q) => {
            if query_adaptive::is_query_aware(r.js, q) {
                query_adaptive::query_aware_index(ctx, r.blocks, q)
            } else {
                query_adaptive::vertical_slash_index(ctx, r.vs, q)
            }
        }
        Pattern::TokenSelect(t) => token_select::index_from_scores(ctx, &r.vs.col_scores, t),
        Pattern::Grid(g) => grid::index(ctx, g)?,
        other => {
            return Err(Error::Profile(format!(
                "`{}` is not a dynamic candidate",
                other.kind()
            )))
        }
    })
}

/// What decides a candidate's cells for one head: candidates with the same key are scored once.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Key {
    /// Query-aware branch: `(gamma bits, min blocks)`.
    Aware(u64, usize),
    /// Vertical-slash branch: clamped `(vertical, slash)`.
    Vs(usize, usize),
    /// Token-select: `(block, keep, spread bits, sink, local)` resolved.
    Tokens(usize, usize, u64, usize, usize),
    /// Grid: never shared.
    Other,
}

/// Mass and cells of every candidate for one head of one sample: over all rows, and over the query
/// blocks from `tail_start` on.
pub fn score(
    ctx: &PatternContext,
    r: &Rankings<'_>,
    heat: &[Vec<f64>],
    columns: &ColumnMass,
    candidates: &[Pattern],
    tail_start: usize,
) -> Result<(Curve, Curve)> {
    let empty = || Curve {
        mass: Vec::with_capacity(candidates.len()),
        cells: Vec::with_capacity(candidates.len()),
    };
    let (mut curve, mut tail) = (empty(), empty());
    let mut seen: Vec<(Key, Split)> = Vec::new();
    for p in candidates {
        let key = match p {
            Pattern::QueryAdaptive(q) if query_adaptive::is_query_aware(r.js, q) => {
                Key::Aware(q.gamma.to_bits(), ctx.resolve(&q.min_budget))
            }
            Pattern::QueryAdaptive(q) => {
                let (v, s) = query_adaptive::vertical_slash_budgets(ctx, r.vs, q);
                let (v, s) = vertical_slash::clamp_budgets(ctx, v, s);
                Key::Vs(v, s)
            }
            Pattern::TokenSelect(t) => Key::Tokens(
                (t.block as usize).max(1),
                ctx.resolve(&t.keep),
                t.spread.to_bits(),
                ctx.resolve(&t.sink),
                ctx.resolve(&t.local),
            ),
            _ => Key::Other,
        };
        let known = seen.iter().find(|(k, _)| *k == key && key != Key::Other);
        let split = match (known, key) {
            (Some(&(_, split)), _) => split,
            (None, Key::Aware(..)) => {
                let Pattern::QueryAdaptive(q) = p else {
                    unreachable!("Aware keys come from query-adaptive candidates")
                };
                let min_blocks = ctx.resolve(&q.min_budget);
                let blocks = r.blocks;
                rule_mass(
                    ctx,
                    heat,
                    columns,
                    |qb, out| {
                        let order = blocks.order(qb);
                        let n = blocks
                            .coverage_count(qb, q.gamma)
                            .max(min_blocks.min(order.len()))
                            .min(order.len());
                        out.extend(order[..n].iter().map(|&kb| kb as usize));
                    },
                    &[],
                    tail_start,
                )
            }
            (None, Key::Vs(v, s)) => {
                let vs = r.vs;
                rule_mass(
                    ctx,
                    heat,
                    columns,
                    |qb, out| out.extend(vs.slash_blocks(ctx, qb, s)),
                    &vs.top_columns(v),
                    tail_start,
                )
            }
            (None, Key::Tokens(block, keep, spread, sink, local)) => {
                let spread = f64::from_bits(spread);
                let chosen = token_select::select(&r.vs.col_scores, block, keep.min(block), spread);
                rule_mass(
                    ctx,
                    heat,
                    columns,
                    |qb, out| {
                        let (s, l) = a_shape::key_blocks(ctx, qb, sink, local);
                        out.extend(s.chain(l));
                    },
                    &chosen,
                    tail_start,
                )
            }
            (None, Key::Other) => {
                let index = candidate_index(ctx, r, p)?;
                index_mass(&index, heat, columns, tail_start)
            }
        };
        if known.is_none() && key != Key::Other {
            seen.push((key, split));
        }
        curve.mass.push(split.all.0);
        curve.cells.push(split.all.1);
        tail.mass.push(split.tail.0);
        tail.cells.push(split.tail.1);
    }
    Ok((curve, tail))
}
