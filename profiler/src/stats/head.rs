//! [`HeadStats`]: one query head's statistics, summed over samples; and the recall read-outs.

use runtime::pattern::{a_shape, vertical_slash, PatternContext};
use serde::{Deserialize, Serialize};

use super::edges::{buckets_below, COVERAGE_GRID};
use crate::{Error, Result};

/// Exact attention mass (and computed-cell counts) in a 2-D histogram over (rank bucket `a`, rank
/// bucket `b`) of the shared [`super::rank_edges`], for a family whose rule is
/// `rank_a(cell) < budget_a || rank_b(cell) < budget_b`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RankHistogram {
    /// Buckets per axis (the number of edges).
    pub buckets: usize,
    /// `[buckets_a][buckets_b]`, row-major: attention mass (sum over rows of probabilities).
    pub mass: Vec<f64>,
    /// Same layout: causal cells.
    pub cells: Vec<f64>,
}

impl RankHistogram {
    pub fn new(buckets: usize) -> Self {
        Self {
            buckets,
            mass: vec![0.0; buckets * buckets],
            cells: vec![0.0; buckets * buckets],
        }
    }

    /// Adds `other`, padding the smaller one (buckets are a prefix of the same edges).
    pub fn merge(&mut self, other: &RankHistogram) {
        if other.buckets > self.buckets {
            let mut grown = RankHistogram::new(other.buckets);
            grown.add_padded(self);
            *self = grown;
        }
        self.add_padded(other);
    }

    fn add_padded(&mut self, other: &RankHistogram) {
        let (n, m) = (self.buckets, other.buckets);
        for a in 0..m.min(n) {
            for b in 0..m.min(n) {
                self.mass[a * n + b] += other.mass[a * m + b];
                self.cells[a * n + b] += other.cells[a * m + b];
            }
        }
    }

    /// `(mass, cells)` where `bucket_a < below_a || bucket_b < below_b`.
    pub fn covered(&self, below_a: usize, below_b: usize) -> (f64, f64) {
        let n = self.buckets;
        let (mut mass, mut cells) = (0.0, 0.0);
        for a in 0..n {
            for b in 0..n {
                if a < below_a || b < below_b {
                    mass += self.mass[a * n + b];
                    cells += self.cells[a * n + b];
                }
            }
        }
        (mass, cells)
    }
}

/// Mass and cells of the nested candidates of one family, indexed by candidate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub mass: Vec<f64>,
    pub cells: Vec<f64>,
}

impl Curve {
    /// Adds `other`. A shorter curve is extended with its last value (top-k past the last key block
    /// keeps every block).
    pub fn merge(&mut self, other: &Curve) {
        let len = self.mass.len().max(other.mass.len());
        let extend = |v: &mut Vec<f64>| {
            let last = v.last().copied().unwrap_or(0.0);
            v.resize(len, last);
        };
        let (mut om, mut oc) = (other.mass.clone(), other.cells.clone());
        for v in [&mut self.mass, &mut self.cells, &mut om, &mut oc] {
            extend(v);
        }
        for (a, b) in self.mass.iter_mut().zip(&om) {
            *a += b;
        }
        for (a, b) in self.cells.iter_mut().zip(&oc) {
            *a += b;
        }
    }
}

/// Recall of one candidate: attention mass covered per row (mean over rows of all samples) and the
/// fraction of causal cells computed (the FLOPs fraction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recall {
    pub recall: f64,
    pub density: f64,
}

/// One query head's statistics: sums over samples and rows, so [`HeadStats::merge`] is addition.
/// Units: mass is summed probability (each row contributes 1 in total); cells are causal cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadStats {
    /// Kernel query block (rows) the statistics were taken at.
    pub block_q: usize,
    /// Kernel key block (columns).
    pub block_k: usize,
    /// Last queries the online estimates read.
    pub last_q: usize,
    /// Samples merged.
    pub samples: u64,
    /// Query rows merged (the denominator of every recall).
    pub rows: u64,
    /// Causal cells merged, `Σ N (N + 1) / 2`.
    pub dense_cells: f64,
    /// Longest sample (tokens).
    pub max_len: usize,
    /// Budget edges, [`super::rank_edges`]`(max_len)`.
    pub edges: Vec<u32>,

    /// Mass on the first [`super::SINK_TOKENS`] keys.
    pub sink_mass: f64,
    /// Row entropy in bits, summed over rows.
    pub entropy_bits: f64,
    /// Mass by distance `i - j`, bucketed by `edges` (bucket `t` holds distances
    /// `edges[t] .. edges[t + 1]`).
    pub distance_mass: Vec<f64>,
    /// Block-pooled mass, one row per query block of `block_q`, one entry per causal key block of
    /// `block_k`: summed probability over the tile.
    pub heat: Vec<Vec<f64>>,
    /// Rows that contributed to each query block of `heat`.
    pub heat_rows: Vec<u64>,

    /// Vertical-slash: axis a = column rank, axis b = block slash rank (see the module docs).
    pub vertical_slash: RankHistogram,
    /// A-shape: axis a = sink rank `kb * block_k`, axis b = local rank `max(0, r0 + 1 - (kb + 1) block_k)`.
    pub a_shape: RankHistogram,
    /// Block-sparse top-k: entry `k - 1` is the candidate `top_k = k` (blocks).
    pub block_top_k: Curve,
    /// Block-sparse coverage: entry `c` is the candidate `coverage = COVERAGE_GRID[c]`.
    pub block_coverage: Curve,
    /// Dynamic candidates (see [`super::dynamic`]): entry `c` is candidate `c` of the profile's list;
    /// empty when none were scored.
    #[serde(default)]
    pub dynamic: Curve,
    /// The sufficient statistics (histograms, curves, dynamic candidates; no heat map) of the last
    /// query blocks only, the rows that read a prompt's question and produce its answer: `rows` and
    /// `dense_cells` count those rows, so its read-outs are the recall and density of the tail.
    /// `None` when the profile kept no tail.
    #[serde(default)]
    pub tail: Option<Box<HeadStats>>,
}

impl HeadStats {
    /// Empty statistics for a head at these block sizes.
    pub fn empty(ctx: &PatternContext) -> Self {
        Self {
            block_q: ctx.block_q,
            block_k: ctx.block_k,
            last_q: ctx.last_q,
            samples: 0,
            rows: 0,
            dense_cells: 0.0,
            max_len: 0,
            edges: vec![0],
            sink_mass: 0.0,
            entropy_bits: 0.0,
            distance_mass: vec![0.0],
            heat: Vec::new(),
            heat_rows: Vec::new(),
            vertical_slash: RankHistogram::new(1),
            a_shape: RankHistogram::new(1),
            block_top_k: Curve::default(),
            block_coverage: Curve {
                mass: vec![0.0; COVERAGE_GRID.len()],
                cells: vec![0.0; COVERAGE_GRID.len()],
            },
            dynamic: Curve::default(),
            tail: None,
        }
    }

    /// Adds `other` (another sample, or a merged profile of the same head). Errors when the block
    /// sizes or `last_q` differ: those change which cells a budget computes.
    pub fn merge(&mut self, other: &HeadStats) -> Result<()> {
        if (self.block_q, self.block_k, self.last_q) != (other.block_q, other.block_k, other.last_q)
        {
            return Err(Error::Runtime(runtime::Error::Shape(format!(
                "cannot merge statistics taken at block_q {}, block_k {}, last_q {} with block_q {}, \
                 block_k {}, last_q {}",
                self.block_q, self.block_k, self.last_q, other.block_q, other.block_k, other.last_q
            ))));
        }
        let (mine, theirs) = (self.dynamic.mass.len(), other.dynamic.mass.len());
        if mine != theirs && self.samples > 0 && other.samples > 0 {
            return Err(Error::Profile(format!(
                "cannot merge statistics with {theirs} dynamic candidates into statistics with {mine}"
            )));
        }
        if self.samples > 0 && other.samples > 0 && self.tail.is_some() != other.tail.is_some() {
            return Err(Error::Profile(
                "cannot merge statistics with a tail into statistics without one".into(),
            ));
        }
        match (&mut self.tail, &other.tail) {
            (Some(mine), Some(theirs)) if self.samples > 0 => mine.merge(theirs)?,
            (_, theirs) if self.samples == 0 => self.tail.clone_from(theirs),
            _ => {}
        }
        if self.samples == 0 {
            self.dynamic = Curve {
                mass: vec![0.0; theirs],
                cells: vec![0.0; theirs],
            };
        }
        self.samples += other.samples;
        self.rows += other.rows;
        self.dense_cells += other.dense_cells;
        if other.edges.len() > self.edges.len() {
            self.edges.clone_from(&other.edges);
        }
        self.max_len = self.max_len.max(other.max_len);
        self.sink_mass += other.sink_mass;
        self.entropy_bits += other.entropy_bits;
        add_padded(&mut self.distance_mass, &other.distance_mass);
        if other.heat.len() > self.heat.len() {
            self.heat.resize(other.heat.len(), Vec::new());
            self.heat_rows.resize(other.heat.len(), 0);
        }
        for (a, b) in self.heat.iter_mut().zip(&other.heat) {
            add_padded(a, b);
        }
        for (a, b) in self.heat_rows.iter_mut().zip(&other.heat_rows) {
            *a += b;
        }
        self.vertical_slash.merge(&other.vertical_slash);
        self.a_shape.merge(&other.a_shape);
        self.block_top_k.merge(&other.block_top_k);
        self.block_coverage.merge(&other.block_coverage);
        if other.samples > 0 {
            self.dynamic.merge(&other.dynamic);
        }
        Ok(())
    }

    fn recall(&self, (mass, cells): (f64, f64)) -> Recall {
        Recall {
            recall: if self.rows > 0 {
                mass / self.rows as f64
            } else {
                1.0
            },
            density: if self.dense_cells > 0.0 {
                cells / self.dense_cells
            } else {
                1.0
            },
        }
    }

    /// Vertical-slash with `vertical` columns and `slash` diagonals (tokens). Exact when each budget is
    /// an edge (or `>= max_len`); otherwise rounded down to the edge below (a lower bound). Budgets are
    /// clamped as the runtime clamps them (`slash >= 1`).
    pub fn recall_vertical_slash(&self, vertical: usize, slash: usize) -> Recall {
        let ctx = self.context();
        let (v, s) = vertical_slash::clamp_budgets(&ctx, vertical, slash);
        let (n, e) = (self.max_len, &self.edges);
        self.recall(
            self.vertical_slash
                .covered(buckets_below(e, n, v), buckets_below(e, n, s)),
        )
    }

    /// A-shape (and streaming) with `sink` and `local` tokens; exact on edges as above, `local >= 1`.
    pub fn recall_a_shape(&self, sink: usize, local: usize) -> Recall {
        let ctx = self.context();
        let (s, l) = a_shape::clamp_budgets(&ctx, sink, local);
        let (n, e) = (self.max_len, &self.edges);
        self.recall(
            self.a_shape
                .covered(buckets_below(e, n, s), buckets_below(e, n, l)),
        )
    }

    /// Block-sparse `top_k = k` blocks (forced blocks always kept). Exact for every `k >= 1`.
    pub fn recall_block_top_k(&self, k: usize) -> Recall {
        let c = &self.block_top_k;
        let at = k.clamp(1, c.mass.len().max(1)) - 1;
        self.recall((
            c.mass.get(at).copied().unwrap_or(0.0),
            c.cells.get(at).copied().unwrap_or(0.0),
        ))
    }

    /// Block-sparse `coverage`: exact on [`COVERAGE_GRID`]; between grid points the next lower grid
    /// value is read (a lower bound); below the grid, `None`.
    pub fn recall_block_coverage(&self, coverage: f64) -> Option<Recall> {
        let at = COVERAGE_GRID
            .partition_point(|&g| g <= coverage + 1e-12)
            .checked_sub(1)?;
        let c = &self.block_coverage;
        Some(self.recall((*c.mass.get(at)?, *c.cells.get(at)?)))
    }

    /// Recall and density of dynamic candidate `c` (`None` when it was not scored).
    pub fn recall_dynamic(&self, c: usize) -> Option<Recall> {
        let (mass, cells) = (*self.dynamic.mass.get(c)?, *self.dynamic.cells.get(c)?);
        Some(self.recall((mass, cells)))
    }

    /// Mean mass on the first [`super::SINK_TOKENS`] keys per row.
    pub fn mean_sink_mass(&self) -> f64 {
        self.sink_mass / self.rows.max(1) as f64
    }

    /// Mean row entropy, bits.
    pub fn mean_entropy_bits(&self) -> f64 {
        self.entropy_bits / self.rows.max(1) as f64
    }

    /// Mean mass per row at distance `< edges[t + 1]`, for each bucket `t` (the local-window curve).
    pub fn local_curve(&self) -> Vec<f64> {
        let rows = self.rows.max(1) as f64;
        let mut acc = 0.0;
        self.distance_mass
            .iter()
            .map(|m| {
                acc += m;
                acc / rows
            })
            .collect()
    }

    /// The heat map normalized per row: entry `[qb][kb]` is the mean mass a row of query block `qb`
    /// puts on key block `kb` (each row of the result sums to 1).
    pub fn heat_map(&self) -> Vec<Vec<f64>> {
        self.heat
            .iter()
            .zip(&self.heat_rows)
            .map(|(row, &r)| row.iter().map(|m| m / r.max(1) as f64).collect())
            .collect()
    }

    /// The pattern context of these statistics at their longest length.
    pub fn context(&self) -> PatternContext {
        PatternContext {
            seq_len: self.max_len,
            block_q: self.block_q,
            block_k: self.block_k,
            last_q: self.last_q,
        }
    }
}

fn add_padded(a: &mut Vec<f64>, b: &[f64]) {
    if b.len() > a.len() {
        a.resize(b.len(), 0.0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}
