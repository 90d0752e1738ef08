//! A summary of a plan for people and scripts: the pattern mix, mean recall, expected FLOPs fraction
//! and budgets at a few sequence lengths.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::plan::{Pattern, Plan};

/// Plan-wide and per-layer figures. Means are over heads, each head weighing the same (every head of a
/// model does the same dense work).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub heads: usize,
    /// Heads per pattern kind, every kind listed (0 when unused).
    pub patterns: BTreeMap<String, usize>,
    /// Mean calibration recall over the heads that record one.
    pub mean_recall: Option<f64>,
    /// Mean held-out recall over the heads that record one.
    pub mean_validated_recall: Option<f64>,
    /// Lowest held-out recall of any head.
    pub min_validated_recall: Option<f64>,
    /// Mean expected fraction of dense attention FLOPs; dense heads count 1 when they record nothing.
    pub flops_fraction: Option<f64>,
    /// Heads that record no FLOPs fraction (not counted in `flops_fraction`).
    pub heads_without_flops: usize,
    pub layers: Vec<LayerSummary>,
    /// Mean budget per pattern kind and field, at a few lengths up to the model's context.
    pub budgets: Vec<BudgetsAt>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    pub layer: u32,
    pub patterns: BTreeMap<String, usize>,
    pub mean_recall: Option<f64>,
    pub flops_fraction: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetsAt {
    pub seq_len: u64,
    /// `kind.field` (e.g. `vertical_slash.vertical`) → mean resolved count over the heads of that kind.
    pub mean: BTreeMap<String, f64>,
}

/// Mean of the present values, `None` if there are none.
fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn flops_of(pattern: &Pattern, recorded: Option<f64>) -> Option<f64> {
    recorded.or(matches!(pattern, Pattern::Dense(_)).then_some(1.0))
}

fn empty_mix() -> BTreeMap<String, usize> {
    Pattern::KINDS.iter().map(|k| (k.to_string(), 0)).collect()
}

impl Summary {
    pub fn of(plan: &Plan) -> Summary {
        let heads: Vec<_> = plan.heads().map(|(_, h)| h).collect();
        let mut patterns = empty_mix();
        for h in &heads {
            *patterns.entry(h.pattern.kind().to_string()).or_default() += 1;
        }
        let layers = plan
            .layers
            .iter()
            .map(|l| {
                let mut mix = BTreeMap::new();
                for h in &l.heads {
                    *mix.entry(h.pattern.kind().to_string()).or_default() += 1;
                }
                LayerSummary {
                    layer: l.layer,
                    patterns: mix,
                    mean_recall: mean(l.heads.iter().filter_map(|h| h.recall)),
                    flops_fraction: mean(
                        l.heads
                            .iter()
                            .filter_map(|h| flops_of(&h.pattern, h.flops_fraction)),
                    ),
                }
            })
            .collect();
        let max_context = plan.model.max_context;
        let mut lengths: Vec<u64> = [1024, 4096, 8192, 32768, 131072]
            .into_iter()
            .filter(|&n| n <= max_context)
            .collect();
        if lengths.last() != Some(&max_context) {
            lengths.push(max_context);
        }
        let budgets = lengths
            .into_iter()
            .map(|seq_len| {
                let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
                for h in &heads {
                    for (field, b) in h.pattern.budgets() {
                        let e = sums
                            .entry(format!("{}.{field}", h.pattern.kind()))
                            .or_default();
                        e.0 += b.resolve(seq_len) as f64;
                        e.1 += 1;
                    }
                }
                BudgetsAt {
                    seq_len,
                    mean: sums
                        .into_iter()
                        .map(|(k, (s, n))| (k, s / n as f64))
                        .collect(),
                }
            })
            .collect();
        Summary {
            heads: heads.len(),
            patterns,
            mean_recall: mean(heads.iter().filter_map(|h| h.recall)),
            mean_validated_recall: mean(heads.iter().filter_map(|h| h.validated_recall)),
            min_validated_recall: heads
                .iter()
                .filter_map(|h| h.validated_recall)
                .reduce(f64::min),
            flops_fraction: mean(
                heads
                    .iter()
                    .filter_map(|h| flops_of(&h.pattern, h.flops_fraction)),
            ),
            heads_without_flops: heads
                .iter()
                .filter(|h| flops_of(&h.pattern, h.flops_fraction).is_none())
                .count(),
            layers,
            budgets,
        }
    }

    /// `dense 12, vertical_slash 200, ...`: the kinds in use with their head counts.
    pub fn pattern_mix(&self) -> String {
        let used: Vec<String> = self
            .patterns
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if used.is_empty() {
            "none".into()
        } else {
            used.join(", ")
        }
    }
}
