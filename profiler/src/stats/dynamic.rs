//! Dynamic candidates: pattern families without sufficient statistics, scored exactly from the live
//! Q and K during the statistics pass.
//!
//! Query-adaptive (FlexPrefill), token-select (TCA) and grid (MMInference) indexes depend on the live
//! queries in ways the rank histograms do not capture (a per-head branch on a divergence, per-chunk
//! token choices, periods). Their candidates are a fixed list of [`Pattern`]s ([`default_candidates`],
//! plus grid strides the data declares, [`grid_candidates`]); the list is stored in the profile's
//! metadata so the calibrator and the held-out profile read the same columns.
//!
//! Scoring is exact and shares the runtime's code: each candidate's [`HeadIndex`] is built by the same
//! functions `runtime::pattern` runs (from the rankings the statistics already computed), and its mass
//! is read off the pass's own probabilities: tile masses for listed key blocks, and per-query-block
//! column masses for gathered columns ([`ColumnMass`], `Σ_{i ∈ qb} p_ij`, about `N² / (2 block_q)`
//! floats per head while its layer is processed). Recall = mass / rows, density = cells / dense
//! cells, as for every other family.

use runtime::pattern::block_sparse::BlockRanking;
use runtime::pattern::vertical_slash::VsRanking;
use runtime::pattern::{grid, query_adaptive, token_select, HeadIndex, PatternContext};
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
/// Token-select: tokens kept per chunk of `block_k` tokens, TCA's log scale `1, 2, 4, …`.
pub const KEEPS: [u64; 5] = [1, 2, 4, 8, 16];
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
    for &keep in &KEEPS {
        for &local in &LOCALS {
            out.push(Pattern::TokenSelect(TokenSelect {
                block: block_k,
                keep: Budget::Fixed(keep),
                sink: Budget::Fixed(u64::from(block_k)),
                local: Budget::Fixed(local),
            }));
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

/// Exact mass of `index` from the tile masses `heat` (`[qb][kb]`) and the column masses.
pub fn index_mass(index: &HeadIndex, heat: &[Vec<f64>], columns: &ColumnMass) -> f64 {
    (0..index.q_blocks())
        .map(|qb| {
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
            from_blocks + from_columns
        })
        .sum()
}

/// What one head's candidates are built from: the rankings of the statistics pass and the
/// query-adaptive divergence.
pub struct Rankings<'a> {
    pub vs: &'a VsRanking,
    pub blocks: &'a BlockRanking,
    /// [`query_adaptive::divergence`] of the head.
    pub js: f64,
}

/// The index a candidate gives this head, built with the runtime's functions.
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

/// Mass and cells of every candidate for one head of one sample. Candidates that give the same index
/// (query-adaptive thresholds on the same side of the head's divergence) are built once.
pub fn score(
    ctx: &PatternContext,
    r: &Rankings<'_>,
    heat: &[Vec<f64>],
    columns: &ColumnMass,
    candidates: &[Pattern],
) -> Result<Curve> {
    let mut curve = Curve {
        mass: Vec::with_capacity(candidates.len()),
        cells: Vec::with_capacity(candidates.len()),
    };
    // Query-adaptive key: (branch, gamma, min_budget) decide the index.
    let mut seen: Vec<((bool, u64, u64), f64, f64)> = Vec::new();
    for p in candidates {
        let key = match p {
            Pattern::QueryAdaptive(q) => Some((
                query_adaptive::is_query_aware(r.js, q),
                q.gamma.to_bits(),
                ctx.resolve(&q.min_budget) as u64,
            )),
            _ => None,
        };
        if let Some((_, m, c)) = key.and_then(|k| seen.iter().find(|(s, _, _)| *s == k)) {
            curve.mass.push(*m);
            curve.cells.push(*c);
            continue;
        }
        let index = candidate_index(ctx, r, p)?;
        let (m, c) = (index_mass(&index, heat, columns), index.cells() as f64);
        if let Some(k) = key {
            seen.push((k, m, c));
        }
        curve.mass.push(m);
        curve.cells.push(c);
    }
    Ok(curve)
}
