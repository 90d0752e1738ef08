//! From search results to a plan: budgets per length, the dense threshold, provenance.
//!
//! One calibrated length gives fixed budgets; several give `buckets` (each length's budgets up to that
//! length; the last bucket beyond it). Block-sparse coverage is one number per head: the largest chosen
//! over the lengths. The plan is deterministic: no date is written, and heads are in order.

use schemas::{
    AShape, BlockSparse, BucketBudget, BucketsBudget, Budget, Defaults, Dense, HeadPlan, LayerPlan,
    ModelInfo, Pattern, Plan, Provenance, VerticalSlash, SCHEMA_VERSION,
};
use serde::Serialize;

use crate::calibration::{mean, Calibration, HeadResult};
use crate::search::{Candidate, Objective};

/// Predicted cost of sparse attention relative to dense below which it pays, the stricter of the two
/// executors' measurements: on the CPU estimation, index building and gathering cost about 20%
/// (`runtime/examples/sparse_bench.rs`: 0.8); on the H200 (`attnplan bench --device cuda`, docs/perf.md)
/// index building costs 0.22 of dense attention at 8K and a computed cell 1.05x a dense one, so
/// sparse pays there below a density of about 0.74 (0.95 from 32K on).
pub const PAYS_BELOW: f64 = 0.75;

/// Why `dense_below` has its value.
#[derive(Debug, Clone, Serialize)]
pub struct DenseThreshold {
    pub dense_below: u64,
    /// Mean predicted sparse cost over heads at each calibrated length (density + estimation).
    pub cost_at: Vec<(u64, f64)>,
    pub reason: String,
}

fn budget(values: &[(u64, usize)]) -> Budget {
    match values {
        [(_, v)] => Budget::Fixed(*v as u64),
        _ => Budget::Buckets(BucketsBudget {
            buckets: values
                .iter()
                .map(|&(n, v)| BucketBudget {
                    up_to: n,
                    value: v as u64,
                })
                .collect(),
        }),
    }
}

/// The pattern of one head from its chosen candidates (one family) per length; `dynamic` is the
/// profiles' dynamic candidate list.
pub fn pattern_of(head: &HeadResult, seq_lens: &[u64], dynamic: &[Pattern]) -> Pattern {
    let per = |f: &dyn Fn(&Candidate) -> Option<usize>| -> Vec<(u64, usize)> {
        seq_lens
            .iter()
            .zip(&head.chosen)
            .filter_map(|(&n, s)| f(&s.candidate).map(|v| (n, v.max(1))))
            .collect()
    };
    match head.chosen.first().map(|s| s.candidate) {
        Some(Candidate::AShape { .. }) => Pattern::AShape(AShape {
            sink: budget(&per(&|c| match c {
                Candidate::AShape { sink, .. } => Some(*sink),
                _ => None,
            })),
            local: budget(&per(&|c| match c {
                Candidate::AShape { local, .. } => Some(*local),
                _ => None,
            })),
        }),
        Some(Candidate::VerticalSlash { .. }) => Pattern::VerticalSlash(VerticalSlash {
            vertical: budget(&per(&|c| match c {
                Candidate::VerticalSlash { vertical, .. } => Some(*vertical),
                _ => None,
            })),
            slash: budget(&per(&|c| match c {
                Candidate::VerticalSlash { slash, .. } => Some(*slash),
                _ => None,
            })),
        }),
        Some(Candidate::BlockTopK { .. }) => Pattern::BlockSparse(BlockSparse {
            top_k: Some(budget(&per(&|c| match c {
                Candidate::BlockTopK { top_k } => Some(*top_k),
                _ => None,
            }))),
            coverage: None,
        }),
        Some(Candidate::BlockCoverage { .. }) => Pattern::BlockSparse(BlockSparse {
            top_k: None,
            coverage: Some(
                head.chosen
                    .iter()
                    .filter_map(|s| match s.candidate {
                        Candidate::BlockCoverage { coverage } => Some(coverage),
                        _ => None,
                    })
                    .fold(0.0, f64::max),
            ),
        }),
        Some(Candidate::Dynamic { index }) => dynamic
            .get(index)
            .cloned()
            .unwrap_or(Pattern::Dense(Dense {})),
        Some(Candidate::Dense) | None => Pattern::Dense(Dense {}),
    }
}

/// Predicted density of a pattern at length `n` from its budgets. A-shape and streaming: exact, the
/// causal cells of the runtime's own index (square `block_k` tiles). Others by a cell model that
/// ignores overlaps (an upper bound for vertical-slash): each kept column, diagonal, sink or local
/// token costs about `n` cells, plus one key block of diagonal granularity per row.
pub fn predicted_density(pattern: &Pattern, measured: f64, n: u64, block_k: u64) -> f64 {
    let dense_cells = (n as f64) * (n as f64 + 1.0) / 2.0;
    let per_row = |tokens: f64| ((tokens + block_k as f64) * n as f64 / dense_cells).min(1.0);
    let window = |sink: u64, local: u64| {
        let ctx = runtime::pattern::PatternContext {
            seq_len: n as usize,
            block_q: block_k.max(1) as usize,
            block_k: block_k.max(1) as usize,
            last_q: 0,
        };
        let index = runtime::pattern::a_shape::index(&ctx, sink as usize, local as usize);
        (index.cells() as f64 / dense_cells.max(1.0)).min(1.0)
    };
    match pattern {
        Pattern::Dense(_) => 1.0,
        Pattern::AShape(p) => window(p.sink.resolve(n), p.local.resolve(n)),
        Pattern::Streaming(p) => window(p.sink.resolve(n), p.recent.resolve(n)),
        Pattern::VerticalSlash(p) => per_row((p.vertical.resolve(n) + p.slash.resolve(n)) as f64),
        Pattern::BlockSparse(BlockSparse { top_k: Some(k), .. }) => {
            per_row((k.resolve(n) * block_k) as f64)
        }
        // The mean count kept per `block` tokens: that share of the causal cells, plus sink and
        // local. With a spread, the mean over the chunks' ranks (at most 4,096 evenly spaced
        // quantiles of the distribution).
        Pattern::TokenSelect(p) => {
            let block = p.block.max(1) as usize;
            let chunks = (n as usize).div_ceil(block).clamp(1, 4096);
            let keeps = runtime::pattern::token_select::keeps_by_rank(
                chunks,
                block,
                p.keep.resolve(n) as usize,
                p.spread,
            );
            let mean = keeps.iter().sum::<usize>() as f64 / chunks as f64;
            let share = mean / block as f64;
            (share.min(1.0) + per_row((p.sink.resolve(n) + p.local.resolve(n)) as f64)).min(1.0)
        }
        // Coverage rules (block-sparse coverage, query-adaptive) and grids: the calibrated density.
        _ => measured,
    }
}

/// The length below which every head runs dense, from the predicted cost at the calibrated lengths.
pub fn dense_threshold(
    cal: &Calibration,
    last_q: u64,
    block_q: u64,
    max_context: u64,
) -> DenseThreshold {
    let cost_at: Vec<(u64, f64)> = cal
        .seq_lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let density = mean(cal.heads.iter().map(|h| h.chosen[i].density));
            (n, density + 2.0 * last_q as f64 / n as f64)
        })
        .collect();
    let paying = cost_at.iter().find(|(_, c)| *c <= PAYS_BELOW);
    let (dense_below, reason) = match paying {
        Some(&(n, c)) => {
            // Budgets fixed in tokens make the density grow like 1/length below `n`.
            let at = (c * n as f64 / PAYS_BELOW).ceil() as u64;
            let at = at.div_ceil(block_q) * block_q;
            (
                at.min(n),
                format!(
                    "predicted sparse cost {c:.3} of dense at {n} tokens; with budgets fixed in \
                     tokens it reaches {PAYS_BELOW} (where estimation and gathering eat the gain) \
                     near {at} tokens"
                ),
            )
        }
        None => {
            let last = cal.seq_lens.last().copied().unwrap_or(0);
            (
                (last + 1).min(max_context),
                format!(
                    "sparse attention is not predicted to pay at any calibrated length (cost above \
                     {PAYS_BELOW} of dense): dense up to {last} tokens"
                ),
            )
        }
    };
    DenseThreshold {
        dense_below,
        cost_at,
        reason,
    }
}

/// Everything that goes into the plan besides the heads.
pub struct PlanInputs<'a> {
    pub model: ModelInfo,
    pub tool: String,
    pub data: String,
    pub samples: u32,
    pub heldout_samples: u32,
    pub block_q: u32,
    pub block_k: u32,
    pub last_q: u32,
    pub threshold: &'a DenseThreshold,
}

/// Builds the plan.
pub fn plan(cal: &Calibration, inputs: PlanInputs<'_>) -> Plan {
    let lens = &cal.seq_lens;
    let q_heads = inputs.model.query_heads as usize;
    let layers = (0..inputs.model.layers as usize)
        .map(|l| LayerPlan {
            layer: l as u32,
            heads: cal.heads[l * q_heads..(l + 1) * q_heads]
                .iter()
                .map(|h| HeadPlan {
                    head: h.head as u32,
                    pattern: pattern_of(h, lens, &cal.dynamic),
                    recall: Some(round(h.recall())),
                    validated_recall: h.validated().map(round),
                    flops_fraction: Some(round(h.density())),
                    gate: None,
                    retrieval_score: None,
                    modalities: vec![],
                })
                .collect(),
        })
        .collect();
    let goal = &cal.goal;
    let floor = goal.local_floor.map_or(String::new(), |l| {
        format!(
            ", no head below the cells of an A-shape with {} sink and {l} local tokens",
            crate::search::LOCAL_FLOOR_SINK
        )
    });
    let objective = match goal.flops_budget {
        Some(f) => format!(
            "fewest computed cells with {} recall >= target, the target ({:.4}) the highest whose \
             plan computes at most {f} of dense attention cells{floor}",
            objective_name(goal.objective),
            goal.target_recall
        ),
        None => format!(
            "fewest computed cells with {} recall >= target{}{floor}",
            objective_name(goal.objective),
            goal.tail_recall.map_or(String::new(), |t| format!(
                " and {} recall of the last rows >= {t}",
                objective_name(goal.objective)
            ))
        ),
    };
    Plan {
        schema_version: SCHEMA_VERSION,
        model: inputs.model,
        provenance: Provenance {
            tool: inputs.tool,
            created: None,
            data: inputs.data,
            samples: inputs.samples,
            heldout_samples: inputs.heldout_samples,
            seq_lens: lens.clone(),
            target_recall: goal.target_recall,
            objective: Some(objective),
        },
        defaults: Defaults {
            block_q: inputs.block_q,
            block_k: inputs.block_k,
            last_q: inputs.last_q,
            dense_below: inputs.threshold.dense_below,
            share_kv_group_indexes: false,
        },
        layers,
    }
}

fn objective_name(o: Objective) -> &'static str {
    match o {
        Objective::Mean => "mean",
        Objective::Worst => "worst-sample",
    }
}

/// Six significant decimals: plans stay readable and deterministic across platforms' last bits.
pub fn round(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}
