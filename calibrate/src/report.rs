//! The calibration report: per head (pattern, budgets, recall, held-out recall, FLOPs fraction,
//! MInference's choice on the same statistics) and a summary, as text for people and JSON for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use schemas::Plan;
use serde::Serialize;

use crate::calibration::{mean, Calibration, HeadResult};
use crate::emit::{predicted_density, DenseThreshold};
use crate::search::Goal;

#[derive(Debug, Serialize)]
pub struct Report {
    pub summary: Summary,
    pub heads: Vec<HeadReport>,
}

#[derive(Debug, Serialize)]
pub struct PerLength {
    pub seq_len: u64,
    /// Our plan: mean computed-cell fraction over heads.
    pub flops_fraction: f64,
    pub mean_recall: f64,
    pub worst_recall: f64,
    pub mean_heldout_recall: Option<f64>,
    /// Recall of the last rows (when the profiles kept them): mean over heads, lowest head (its
    /// worst sample), and the held-out mean and lowest head.
    pub tail: Option<TailFigures>,
    /// MInference's per-head choices on the same statistics.
    pub minference_flops_fraction: f64,
    pub minference_mean_recall: f64,
    /// MInference's single default, vertical-slash (1000, 6096), for every head.
    pub minference_default_flops_fraction: f64,
    pub minference_default_mean_recall: f64,
    /// `1 - ours / MInference per-head`.
    pub reduction_vs_minference: f64,
}

#[derive(Debug, Serialize)]
pub struct TailFigures {
    pub mean_recall: f64,
    pub worst_recall: f64,
    pub mean_heldout_recall: Option<f64>,
    pub min_heldout_recall: Option<f64>,
    /// MInference's per-head choices: mean and lowest head.
    pub minference_mean_recall: f64,
    pub minference_worst_recall: f64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub heads: usize,
    pub target_recall: f64,
    /// Target on the recall of the last rows, when set.
    pub tail_recall: Option<f64>,
    pub objective: String,
    pub flops_budget: Option<f64>,
    pub patterns: BTreeMap<String, usize>,
    pub per_length: Vec<PerLength>,
    /// Heads whose held-out recall reaches the target at every length (when held-out data exist).
    pub heads_at_target_heldout: Option<usize>,
    pub fraction_at_target_heldout: Option<f64>,
    pub dense_threshold: DenseThreshold,
    /// Predicted attention speedup (dense / sparse cells, estimation included) from the budgets.
    pub predicted_speedup: Vec<(u64, f64)>,
}

#[derive(Debug, Serialize)]
pub struct HeadReport {
    pub layer: usize,
    pub head: usize,
    pub pattern: schemas::Pattern,
    pub recall: f64,
    pub worst_recall: f64,
    pub validated_recall: Option<f64>,
    pub flops_fraction: f64,
    #[serde(flatten)]
    pub detail: HeadResult,
}

/// Builds the report of a calibration and the plan made from it.
pub fn build(cal: &Calibration, plan: &Plan, threshold: DenseThreshold, tolerance: f64) -> Report {
    let goal: &Goal = &cal.goal;
    let heads: Vec<HeadReport> = cal
        .heads
        .iter()
        .map(|h| HeadReport {
            layer: h.layer,
            head: h.head,
            pattern: plan
                .head(h.layer, h.head)
                .map(|p| p.pattern.clone())
                .unwrap_or(schemas::Pattern::Dense(schemas::Dense {})),
            recall: h.recall(),
            worst_recall: h.worst(),
            validated_recall: h.validated(),
            flops_fraction: h.density(),
            detail: h.clone(),
        })
        .collect();
    let per_length = cal
        .seq_lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let ours = mean(cal.heads.iter().map(|h| h.chosen[i].density));
            let theirs = mean(cal.heads.iter().map(|h| h.minference[i].run.density));
            let heldout: Vec<f64> = cal
                .heads
                .iter()
                .filter_map(|h| h.heldout.as_ref().and_then(|v| v.get(i).copied()))
                .collect();
            PerLength {
                seq_len: n,
                flops_fraction: ours,
                mean_recall: mean(cal.heads.iter().map(|h| h.chosen[i].recall)),
                worst_recall: cal
                    .heads
                    .iter()
                    .map(|h| h.chosen[i].worst)
                    .fold(f64::INFINITY, f64::min),
                mean_heldout_recall: (!heldout.is_empty()).then(|| mean(heldout.into_iter())),
                tail: tail_figures(cal, i),
                minference_flops_fraction: theirs,
                minference_mean_recall: mean(cal.heads.iter().map(|h| h.minference[i].run.recall)),
                minference_default_flops_fraction: mean(
                    cal.heads.iter().map(|h| h.minference_default[i].density),
                ),
                minference_default_mean_recall: mean(
                    cal.heads.iter().map(|h| h.minference_default[i].recall),
                ),
                reduction_vs_minference: if theirs > 0.0 {
                    1.0 - ours / theirs
                } else {
                    0.0
                },
            }
        })
        .collect();
    let at_target = cal.heads.first().and_then(|h| h.heldout.as_ref()).map(|_| {
        cal.heads
            .iter()
            .filter(|h| !h.misses(goal, tolerance))
            .count()
    });
    let block_k = u64::from(plan.defaults.block_k);
    let last_q = f64::from(plan.defaults.last_q);
    let predicted_speedup = [8192u64, 32768, 131072]
        .into_iter()
        .map(|n| {
            let d = mean(
                heads
                    .iter()
                    .map(|h| predicted_density(&h.pattern, h.flops_fraction, n, block_k)),
            );
            (n, 1.0 / (d + 2.0 * last_q / n as f64).min(1.0))
        })
        .collect();
    let mut patterns = BTreeMap::new();
    for h in &heads {
        *patterns.entry(h.pattern.kind().to_string()).or_insert(0) += 1;
    }
    Report {
        summary: Summary {
            heads: heads.len(),
            target_recall: goal.target_recall,
            tail_recall: goal.tail_recall,
            objective: plan.provenance.objective.clone().unwrap_or_default(),
            flops_budget: goal.flops_budget,
            patterns,
            per_length,
            heads_at_target_heldout: at_target,
            fraction_at_target_heldout: at_target.map(|n| n as f64 / heads.len().max(1) as f64),
            dense_threshold: threshold,
            predicted_speedup,
        },
        heads,
    }
}

/// The recall of the last rows at length `i`, when every head has it.
fn tail_figures(cal: &Calibration, i: usize) -> Option<TailFigures> {
    let ours: Vec<(f64, f64)> = cal
        .heads
        .iter()
        .map(|h| Some((h.chosen[i].tail?, h.chosen[i].tail_worst?)))
        .collect::<Option<_>>()?;
    let theirs: Vec<f64> = cal
        .heads
        .iter()
        .map(|h| h.minference[i].run.tail)
        .collect::<Option<_>>()?;
    let held: Option<Vec<f64>> = cal
        .heads
        .iter()
        .map(|h| h.heldout_tail.as_ref().and_then(|v| v.get(i).copied()))
        .collect();
    let min = |v: &mut dyn Iterator<Item = f64>| v.fold(f64::INFINITY, f64::min);
    Some(TailFigures {
        mean_recall: mean(ours.iter().map(|t| t.0)),
        worst_recall: min(&mut ours.iter().map(|t| t.1)),
        mean_heldout_recall: held.as_ref().map(|v| mean(v.iter().copied())),
        min_heldout_recall: held.as_ref().map(|v| min(&mut v.iter().copied())),
        minference_mean_recall: mean(theirs.iter().copied()),
        minference_worst_recall: min(&mut theirs.iter().copied()),
    })
}

/// Heads whose held-out recall misses the target by more than `tolerance` at some length.
pub fn failing_heads(cal: &Calibration, tolerance: f64) -> Vec<&HeadResult> {
    cal.heads
        .iter()
        .filter(|h| h.misses(&cal.goal, tolerance))
        .collect()
}

/// The summary as text.
pub fn render(r: &Report) -> String {
    let s = &r.summary;
    let mut out = String::new();
    let mix: Vec<String> = s.patterns.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(out, "heads        {}: {}", s.heads, mix.join(", "));
    if s.flops_budget.is_some() {
        // The objective names the target the budget bought.
        let _ = writeln!(out, "objective    {}", s.objective);
    } else {
        let _ = writeln!(
            out,
            "objective    {} (target {}{})",
            s.objective,
            s.target_recall,
            s.tail_recall
                .map_or(String::new(), |t| format!(", last rows {t}"))
        );
    }
    let _ = writeln!(
        out,
        "\n  {:>7} {:>8} {:>8} {:>8} {:>9} | {:>10} {:>10} | {:>10} {:>10} | {:>9}",
        "tokens",
        "cells",
        "recall",
        "worst",
        "held-out",
        "MInf cells",
        "MInf rec.",
        "VS1000/6096",
        "recall",
        "vs MInf"
    );
    for p in &s.per_length {
        let _ = writeln!(
            out,
            "  {:>7} {:>8.4} {:>8.4} {:>8.4} {:>9} | {:>10.4} {:>10.4} | {:>10.4} {:>10.4} | {:>8.1}%",
            p.seq_len,
            p.flops_fraction,
            p.mean_recall,
            p.worst_recall,
            p.mean_heldout_recall.map_or("-".into(), |x| format!("{x:.4}")),
            p.minference_flops_fraction,
            p.minference_mean_recall,
            p.minference_default_flops_fraction,
            p.minference_default_mean_recall,
            -100.0 * p.reduction_vs_minference,
        );
    }
    for p in &s.per_length {
        if let Some(t) = &p.tail {
            let opt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.4}"));
            let _ = writeln!(
                out,
                "  {:>7} last rows: recall {:.4}, lowest head {:.4}, held-out {} (lowest {}); \
                 MInference {:.4} (lowest {:.4})",
                p.seq_len,
                t.mean_recall,
                t.worst_recall,
                opt(t.mean_heldout_recall),
                opt(t.min_heldout_recall),
                t.minference_mean_recall,
                t.minference_worst_recall,
            );
        }
    }
    if let (Some(n), Some(f)) = (s.heads_at_target_heldout, s.fraction_at_target_heldout) {
        let _ = writeln!(
            out,
            "\nheld-out     {n} of {} heads at target ({:.1}%)",
            s.heads,
            100.0 * f
        );
    }
    let _ = writeln!(
        out,
        "dense below  {} tokens: {}",
        s.dense_threshold.dense_below, s.dense_threshold.reason
    );
    let speed: Vec<String> = s
        .predicted_speedup
        .iter()
        .map(|(n, x)| format!("{}K {x:.1}x", n / 1024))
        .collect();
    let _ = writeln!(
        out,
        "predicted attention speedup from the budgets (cells, estimation included): {}",
        speed.join(", ")
    );
    out
}
