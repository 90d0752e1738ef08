//! Constant-time recall read-outs for every candidate on the budget grid.
//!
//! [`HeadStats::recall_vertical_slash`] sums a rank histogram for one candidate (`O(b²)`); scoring all
//! `b²` candidates that way would cost `O(b⁴)` per head and sample. A [`Suffix2`] table holds
//! `S[i][j] = Σ_{a >= i, c >= j} h[a][c]`, so the covered part `a < i || c < j` is
//! `total - S[i][j]` in `O(1)`. The bucket counts come from the same [`buckets_below`] as the
//! statistics, and a test checks every read-out against the statistics' own.

use profiler::stats::{buckets_below, HeadStats, RankHistogram, Recall};
use runtime::pattern::{a_shape, vertical_slash};

/// 2-D suffix sums of a rank histogram's mass and cells, `(buckets + 1)²` each.
#[derive(Debug, Clone)]
pub struct Suffix2 {
    n: usize,
    mass: Vec<f64>,
    cells: Vec<f64>,
}

impl Suffix2 {
    pub fn new(h: &RankHistogram) -> Self {
        let b = h.buckets;
        let n = b + 1;
        let mut mass = vec![0.0; n * n];
        let mut cells = vec![0.0; n * n];
        for a in (0..b).rev() {
            for c in (0..b).rev() {
                let at = a * n + c;
                let (below, right, diag) = ((a + 1) * n + c, a * n + c + 1, (a + 1) * n + c + 1);
                mass[at] = h.mass[a * b + c] + mass[below] + mass[right] - mass[diag];
                cells[at] = h.cells[a * b + c] + cells[below] + cells[right] - cells[diag];
            }
        }
        Self { n, mass, cells }
    }

    /// `(mass, cells)` where `bucket_a < below_a || bucket_b < below_b`.
    pub fn covered(&self, below_a: usize, below_b: usize) -> (f64, f64) {
        let (i, j) = (below_a.min(self.n - 1), below_b.min(self.n - 1));
        (
            self.mass[0] - self.mass[i * self.n + j],
            self.cells[0] - self.cells[i * self.n + j],
        )
    }
}

/// One head's statistics (of one sample, or summed) with the tables for fast read-outs.
#[derive(Debug, Clone)]
pub struct HeadTables {
    pub stats: HeadStats,
    vs: Suffix2,
    a_shape: Suffix2,
}

impl HeadTables {
    pub fn new(stats: HeadStats) -> Self {
        let vs = Suffix2::new(&stats.vertical_slash);
        let a_shape = Suffix2::new(&stats.a_shape);
        Self { stats, vs, a_shape }
    }

    fn recall(&self, (mass, cells): (f64, f64)) -> Recall {
        let s = &self.stats;
        Recall {
            recall: if s.rows > 0 {
                mass / s.rows as f64
            } else {
                1.0
            },
            density: if s.dense_cells > 0.0 {
                cells / s.dense_cells
            } else {
                1.0
            },
        }
    }

    /// Same as [`HeadStats::recall_vertical_slash`], in `O(1)`.
    pub fn vertical_slash(&self, vertical: usize, slash: usize) -> Recall {
        let s = &self.stats;
        let (v, sl) = vertical_slash::clamp_budgets(&s.context(), vertical, slash);
        let (n, e) = (s.max_len, &s.edges);
        self.recall(
            self.vs
                .covered(buckets_below(e, n, v), buckets_below(e, n, sl)),
        )
    }

    /// Same as [`HeadStats::recall_a_shape`], in `O(1)`.
    pub fn a_shape(&self, sink: usize, local: usize) -> Recall {
        let s = &self.stats;
        let (si, l) = a_shape::clamp_budgets(&s.context(), sink, local);
        let (n, e) = (s.max_len, &s.edges);
        self.recall(
            self.a_shape
                .covered(buckets_below(e, n, si), buckets_below(e, n, l)),
        )
    }
}
