//! The per-head search: every nested candidate of every family, scored from profile statistics, and
//! the cheapest one that keeps the target recall.
//!
//! - [`Candidate`]: a family and its budgets at one sequence length (tokens, or blocks for
//!   `block_sparse`).
//! - [`Scored`]: a candidate's recall (mean over all rows of all samples), its worst sample, and its
//!   density (computed cells over dense causal cells, block granularity included: the FLOPs fraction).
//! - [`HeadSamples`]: one head's statistics at one length, summed and per sample, with the tables of
//!   [`tables`] that read any candidate in constant time.
//! - [`choose`]: the cheapest candidate whose objective recall reaches the target, or the best recall
//!   within a FLOPs budget.
//!
//! Families searched: `dense`, `a_shape` (sink and local on the budget edges), `vertical_slash`
//! (vertical and slash on the edges), `block_sparse` (every `top_k`, and `coverage` on its grid), and
//! the dynamic candidates the profile scored (`query_adaptive`, `token_select`, `grid`: the list in
//! the profile's metadata, see `profiler::stats::dynamic`), each its own family.

pub mod minference;
pub mod tables;

use profiler::stats::{HeadStats, Recall, COVERAGE_GRID};
use serde::Serialize;

use tables::HeadTables;

/// A pattern family with its budgets at one length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Candidate {
    Dense,
    AShape {
        sink: usize,
        local: usize,
    },
    VerticalSlash {
        vertical: usize,
        slash: usize,
    },
    BlockTopK {
        top_k: usize,
    },
    BlockCoverage {
        coverage: f64,
    },
    /// Entry `index` of the profile's dynamic candidates (`ProfileMeta::dynamic`).
    Dynamic {
        index: usize,
    },
}

impl Candidate {
    /// Family name, as the plan's `kind` (block top-k and coverage are both `block_sparse`);
    /// `dynamic` candidates take the kind of their pattern in `dynamic`.
    pub fn kind<'a>(&self, dynamic: &'a [schemas::Pattern]) -> &'a str {
        match self {
            Candidate::Dense => "dense",
            Candidate::AShape { .. } => "a_shape",
            Candidate::VerticalSlash { .. } => "vertical_slash",
            Candidate::BlockTopK { .. } => "block_sparse",
            Candidate::BlockCoverage { .. } => "block_sparse",
            Candidate::Dynamic { index } => dynamic.get(*index).map_or("dynamic", |p| p.kind()),
        }
    }

    /// Family key: candidates of one family can share a plan entry across lengths. Each dynamic
    /// candidate is a family of its own (its parameters are the same at every length).
    pub fn family(&self) -> usize {
        match self {
            Candidate::Dense => 0,
            Candidate::AShape { .. } => 1,
            Candidate::VerticalSlash { .. } => 2,
            Candidate::BlockTopK { .. } => 3,
            Candidate::BlockCoverage { .. } => 4,
            Candidate::Dynamic { index } => 5 + index,
        }
    }
}

/// A candidate's figures over the samples of one length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scored {
    pub candidate: Candidate,
    /// Mean recall over all rows of all samples.
    pub recall: f64,
    /// Lowest per-sample recall.
    pub worst: f64,
    /// Computed cells over dense causal cells (all samples).
    pub density: f64,
    /// Recall of the last rows ([`HeadStats::tail`]) over all samples; `None` when the profile kept
    /// no tail.
    pub tail: Option<f64>,
    /// Lowest per-sample recall of the last rows.
    pub tail_worst: Option<f64>,
}

impl Scored {
    /// Dense attention: every cell, recall 1 everywhere.
    pub fn dense() -> Self {
        Self {
            candidate: Candidate::Dense,
            recall: 1.0,
            worst: 1.0,
            density: 1.0,
            tail: Some(1.0),
            tail_worst: Some(1.0),
        }
    }
}

/// What the search holds recall to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Recall over all rows of all samples.
    Mean,
    /// The recall of the worst sample.
    Worst,
}

impl Objective {
    pub fn of(self, s: &Scored) -> f64 {
        match self {
            Objective::Mean => s.recall,
            Objective::Worst => s.worst,
        }
    }

    /// The same objective on the recall of the last rows (`None` without a tail).
    pub fn of_tail(self, s: &Scored) -> Option<f64> {
        match self {
            Objective::Mean => s.tail,
            Objective::Worst => s.tail_worst,
        }
    }
}

/// Tables of statistics summed over samples, and per sample.
pub struct SampleTables {
    pub sum: HeadTables,
    pub samples: Vec<HeadTables>,
}

impl SampleTables {
    fn new(per_sample: Vec<HeadStats>) -> profiler::Result<Self> {
        let mut iter = per_sample.iter();
        let mut sum = iter
            .next()
            .cloned()
            .ok_or_else(|| profiler::Error::Profile("a head without samples".into()))?;
        for s in iter {
            sum.merge(s)?;
        }
        Ok(Self {
            sum: HeadTables::new(sum),
            samples: per_sample.into_iter().map(HeadTables::new).collect(),
        })
    }

    /// `(recall and density over all samples, lowest per-sample recall)`.
    fn read(&self, c: &Candidate) -> (Recall, f64) {
        let total = HeadSamples::read(&self.sum, c);
        let worst = self
            .samples
            .iter()
            .map(|t| HeadSamples::read(t, c).recall)
            .fold(f64::INFINITY, f64::min);
        (
            total,
            if worst.is_finite() {
                worst
            } else {
                total.recall
            },
        )
    }
}

/// One head's statistics at one length, summed over samples and per sample: over all rows, and over
/// the last rows when the profile kept them.
pub struct HeadSamples {
    pub all: SampleTables,
    pub tail: Option<SampleTables>,
}

impl HeadSamples {
    pub fn new(mut per_sample: Vec<HeadStats>) -> profiler::Result<Self> {
        let tails: Option<Vec<HeadStats>> = per_sample
            .iter_mut()
            .map(|s| s.tail.take().map(|t| *t))
            .collect();
        Ok(Self {
            all: SampleTables::new(per_sample)?,
            tail: tails.map(SampleTables::new).transpose()?,
        })
    }

    /// Statistics over all rows, summed over samples.
    pub fn sum(&self) -> &HeadTables {
        &self.all.sum
    }

    /// Tokens per sample (the longest, if they differ).
    pub fn seq_len(&self) -> usize {
        self.all.sum.stats.max_len
    }

    fn read(t: &HeadTables, c: &Candidate) -> Recall {
        match *c {
            Candidate::Dense => Recall {
                recall: 1.0,
                density: 1.0,
            },
            Candidate::AShape { sink, local } => t.a_shape(sink, local),
            Candidate::VerticalSlash { vertical, slash } => t.vertical_slash(vertical, slash),
            Candidate::BlockTopK { top_k } => t.stats.recall_block_top_k(top_k),
            Candidate::BlockCoverage { coverage } => {
                t.stats.recall_block_coverage(coverage).unwrap_or(Recall {
                    recall: 0.0,
                    density: 0.0,
                })
            }
            // Not scored: never feasible (recall 0) and never preferred.
            Candidate::Dynamic { index } => t.stats.recall_dynamic(index).unwrap_or(Recall {
                recall: 0.0,
                density: 1.0,
            }),
        }
    }

    /// Scores one candidate on these samples.
    pub fn score(&self, c: Candidate) -> Scored {
        let (total, worst) = self.all.read(&c);
        let tail = self.tail.as_ref().map(|t| t.read(&c));
        Scored {
            candidate: c,
            recall: total.recall,
            worst,
            density: total.density,
            tail: tail.map(|(r, _)| r.recall),
            tail_worst: tail.map(|(_, w)| w),
        }
    }

    /// Every candidate of the searched families on the budget grid.
    pub fn candidates(&self) -> Vec<Candidate> {
        let s = &self.all.sum.stats;
        let n = s.max_len;
        // Budgets >= 1 on the edges, plus "everything" (n).
        let mut budgets: Vec<usize> = s
            .edges
            .iter()
            .map(|&e| e as usize)
            .filter(|&e| e >= 1)
            .collect();
        budgets.push(n);
        let mut out = vec![Candidate::Dense];
        for &vertical in &budgets {
            for &slash in &budgets {
                out.push(Candidate::VerticalSlash { vertical, slash });
            }
        }
        for &sink in &budgets {
            for &local in &budgets {
                out.push(Candidate::AShape { sink, local });
            }
        }
        for top_k in 1..=s.block_top_k.mass.len() {
            out.push(Candidate::BlockTopK { top_k });
        }
        for coverage in COVERAGE_GRID {
            out.push(Candidate::BlockCoverage { coverage });
        }
        for index in 0..s.dynamic.mass.len() {
            out.push(Candidate::Dynamic { index });
        }
        out
    }
}

/// How to pick among scored candidates.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    pub target_recall: f64,
    /// Also hold the recall of the last rows (same objective) to this target.
    pub tail_recall: Option<f64>,
    /// A FLOPs budget for the whole plan (mean fraction of dense cells over heads). The calibration
    /// turns it into the highest `target_recall` whose plan fits; [`choose`] uses the target only.
    pub flops_budget: Option<f64>,
    pub objective: Objective,
    /// Local floor (tokens): no head may compute fewer cells than an A-shape with
    /// [`LOCAL_FLOOR_SINK`] sink tokens and this many local tokens. The calibration drops the cheaper
    /// candidates before choosing ([`HeadSamples::floor_density`]).
    pub local_floor: Option<usize>,
}

/// Sink tokens of the A-shape that sets the local floor.
pub const LOCAL_FLOOR_SINK: usize = 64;

/// The calibrator's default local floor, in tokens (`attnplan calibrate --local-floor`): on SmolLM2
/// at 8K it removed most of the perplexity lost on prose for under half a point of cells
/// (docs/perf.md, "Where the perplexity goes").
pub const DEFAULT_LOCAL_FLOOR: usize = 256;

impl HeadSamples {
    /// Density of the A-shape ([`LOCAL_FLOOR_SINK`], `local`) on these samples: the fewest cells a
    /// head may compute under a local floor of `local` tokens.
    pub fn floor_density(&self, local: usize) -> f64 {
        self.score(Candidate::AShape {
            sink: LOCAL_FLOOR_SINK,
            local,
        })
        .density
    }
}

impl Goal {
    /// Whether `s` reaches the target recall (and the tail target, when set; a candidate without
    /// tail statistics then never does).
    pub fn reaches(&self, s: &Scored) -> bool {
        self.objective.of(s) >= self.target_recall
            && self
                .tail_recall
                .is_none_or(|t| self.objective.of_tail(s).is_some_and(|r| r >= t))
    }
}

/// Orders candidates by preference: lower density, then higher objective recall, then the simpler
/// family, then smaller budgets. Total and deterministic.
fn prefer(goal: &Goal, a: &Scored, b: &Scored) -> std::cmp::Ordering {
    let key = |s: &Scored| {
        let budgets: (f64, f64) = match s.candidate {
            Candidate::Dense => (0.0, 0.0),
            Candidate::AShape { sink, local } => (sink as f64, local as f64),
            Candidate::VerticalSlash { vertical, slash } => (vertical as f64, slash as f64),
            Candidate::BlockTopK { top_k } => (top_k as f64, 0.0),
            Candidate::BlockCoverage { coverage } => (coverage, 0.0),
            Candidate::Dynamic { index } => (index as f64, 0.0),
        };
        (s.candidate.family(), budgets)
    };
    let (oa, ob) = (goal.objective.of(a), goal.objective.of(b));
    a.density
        .total_cmp(&b.density)
        .then(ob.total_cmp(&oa))
        .then_with(|| {
            let (ka, kb) = (key(a), key(b));
            ka.0.cmp(&kb.0)
                .then(ka.1 .0.total_cmp(&kb.1 .0))
                .then(ka.1 .1.total_cmp(&kb.1 .1))
        })
}

/// The chosen candidate among `scored`: the cheapest reaching the target, dense if none does (or if
/// the cheapest computes every cell: dense without the index overhead).
pub fn choose(scored: &[Scored], goal: &Goal) -> Scored {
    let feasible = scored.iter().filter(|s| goal.reaches(s));
    match feasible.min_by(|a, b| prefer(goal, a, b)).copied() {
        Some(pick) if pick.density < 1.0 - 1e-9 => pick,
        _ => Scored::dense(),
    }
}

/// The cheapest candidate of each family that reaches the goal (for multi-length plans, which keep
/// one family per head across lengths).
pub fn best_per_family(scored: &[Scored], goal: &Goal) -> Vec<Scored> {
    let mut families: Vec<usize> = scored.iter().map(|s| s.candidate.family()).collect();
    families.sort_unstable();
    families.dedup();
    let mut best: Vec<Scored> = Vec::new();
    for family in families {
        let of_family: Vec<Scored> = scored
            .iter()
            .filter(|s| s.candidate.family() == family)
            .copied()
            .collect();
        let pick = choose(&of_family, goal);
        if pick.candidate.family() == family {
            best.push(pick);
        }
    }
    best
}
