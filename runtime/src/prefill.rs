//! Sparse prefill of one model by a plan, on the CPU: [`SparsePrefill`].
//!
//! [`SparsePrefill::new`] takes a [`Plan`], the [`ModelInfo`] of the model that will run it and
//! [`PrefillOptions`]. It checks the plan against the model ([`schemas::check_model`]: architecture,
//! layers, head counts, head_dim, RoPE base, context, fingerprint) and refuses a plan made for another
//! model with [`Error::PlanMismatch`]; with `dense_fallback` it instead runs every head dense, prints
//! one warning and counts those heads ([`DenseReason::PlanMismatch`]). It also checks every head the
//! model has is in the plan.
//!
//! [`SparsePrefill::forward`] runs one layer (Q `[q_heads, seq_len, head_dim]`, K and V
//! `[kv_heads, seq_len, head_dim]`, f32 after RoPE; output `[q_heads, seq_len, head_dim]`):
//! - the input's head counts, head_dim and the layer index must match the model, or [`Error::Shape`];
//! - `seq_len < defaults.dense_below` (or below [`PrefillOptions::dense_below`], an executor's own
//!   threshold, when given): dense attention for every head ([`DenseReason::ShortSequence`]);
//! - otherwise each head's index is built by [`crate::build_index`] (the function the calibrator
//!   scores with) at `PatternContext::new(seq_len, &plan.defaults)`, in parallel over heads, and
//!   [`crate::exec::sparse_attention`] computes exactly those cells. Heads whose pattern is `dense` run
//!   the dense index through the same kernel ([`DenseReason::Planned`]).
//!
//! Sharing (`defaults.share_kv_group_indexes`): the query heads of one KV group that have the same
//! pattern share one index, built from the live Q of the first of them (with that KV head's K). Pooled
//! estimates over the group are not built: [`crate::build_index`] reads one head's Q.
//!
//! Modality patterns (`heads[*].modalities`) need the input's modality spans, which a forward does not
//! carry; the head's own `pattern` applies to every cell, and [`SparsePrefill::new`] says so in
//! [`SparsePrefill::warnings`].
//!
//! Every call returns its [`PrefillStats`] (cells, times, heads run dense and why); the sum over calls
//! is [`SparsePrefill::totals`].

use std::time::{Duration, Instant};

use rayon::prelude::*;
use schemas::{ModelInfo, Pattern, Plan};

use crate::error::{Error, Result};
use crate::exec::{dense_attention, sparse_attention};
use crate::pattern::{build_index, causal_cells, HeadIndex, HeadQk, PatternContext};
use crate::{AttentionInput, AttnShape};

/// How [`SparsePrefill`] treats a plan that does not fit the model, and the length below which it
/// runs dense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefillOptions {
    /// Run every head dense (with a warning) instead of refusing a plan made for another model.
    pub dense_fallback: bool,
    /// Run dense below this many tokens instead of the plan's `defaults.dense_below`: an executor's
    /// own threshold where its index building costs more, relative to its attention, than the
    /// calibrator's rule assumes (e.g. a small model on the GPU: SmolLM2-135M's plan runs slower than
    /// dense there at 8K and faster at 16K, docs/perf.md). Without it the CUDA executor takes the
    /// larger of the plan's and its own (`exec::cuda::gpu_dense_below`).
    pub dense_below: Option<u64>,
}

/// Why a head ran dense attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenseReason {
    /// `seq_len < defaults.dense_below`.
    ShortSequence,
    /// The plan does not match the model and `dense_fallback` was asked for.
    PlanMismatch,
    /// The plan says `kind: dense` for this head.
    Planned,
}

/// What one [`SparsePrefill::forward`] call did. Cell counts are causal (query, key) pairs summed over
/// query heads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrefillStats {
    /// Cells computed.
    pub cells: u64,
    /// Cells of dense causal attention, `q_heads * seq_len * (seq_len + 1) / 2`.
    pub dense_cells: u64,
    /// Wall time spent building indexes (zero when the layer ran dense).
    pub index_time: Duration,
    /// Wall time spent in the attention kernel (K packing included).
    pub attention_time: Duration,
    /// Query heads that ran dense, with the reason, in head order.
    pub dense_heads: Vec<(usize, DenseReason)>,
}

impl PrefillStats {
    /// `cells / dense_cells` (1 when there is nothing to compute).
    pub fn density(&self) -> f64 {
        if self.dense_cells == 0 {
            1.0
        } else {
            self.cells as f64 / self.dense_cells as f64
        }
    }

    /// Heads that ran dense for `reason`.
    pub fn dense_count(&self, reason: DenseReason) -> usize {
        self.dense_heads
            .iter()
            .filter(|(_, r)| *r == reason)
            .count()
    }
}

/// Sums of [`PrefillStats`] over every [`SparsePrefill::forward`] call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrefillTotals {
    /// Layer calls.
    pub layers: u64,
    /// Query heads run (sparse or dense).
    pub heads: u64,
    /// Heads run dense because the sequence was shorter than `dense_below`.
    pub dense_short: u64,
    /// Heads run dense because the plan does not match the model.
    pub dense_mismatch: u64,
    /// Heads run dense because the plan says so.
    pub dense_planned: u64,
    pub cells: u64,
    pub dense_cells: u64,
    pub index_time: Duration,
    pub attention_time: Duration,
}

impl PrefillTotals {
    /// `cells / dense_cells` (1 when nothing ran).
    pub fn density(&self) -> f64 {
        if self.dense_cells == 0 {
            1.0
        } else {
            self.cells as f64 / self.dense_cells as f64
        }
    }

    fn add(&mut self, stats: &PrefillStats, heads: usize) {
        self.layers += 1;
        self.heads += heads as u64;
        for (_, reason) in &stats.dense_heads {
            match reason {
                DenseReason::ShortSequence => self.dense_short += 1,
                DenseReason::PlanMismatch => self.dense_mismatch += 1,
                DenseReason::Planned => self.dense_planned += 1,
            }
        }
        self.cells += stats.cells;
        self.dense_cells += stats.dense_cells;
        self.index_time += stats.index_time;
        self.attention_time += stats.attention_time;
    }
}

/// Runs a model's prefill attention layer by layer according to a plan (see the module docs).
#[derive(Debug, Clone)]
pub struct SparsePrefill {
    plan: Plan,
    model: ModelInfo,
    /// Why every head runs dense (plan for another model, `dense_fallback` on); `None` normally.
    fallback: Option<String>,
    /// `PrefillOptions::dense_below`, else the plan's.
    dense_below: u64,
    warnings: Vec<String>,
    totals: PrefillTotals,
}

impl SparsePrefill {
    /// Checks `plan` against `model` (see the module docs). Errors: [`Error::PlanMismatch`] (unless
    /// `options.dense_fallback`), [`Error::HeadPlan`] for a layer or head the plan lacks or lists out
    /// of order.
    pub fn new(plan: &Plan, model: &ModelInfo, options: PrefillOptions) -> Result<Self> {
        let mut issues: Vec<String> = schemas::check_model(&plan.model, model)
            .iter()
            .map(ToString::to_string)
            .collect();
        if issues.is_empty() {
            issues = missing_heads(plan, model);
        }
        let fallback = match (issues.is_empty(), options.dense_fallback) {
            (true, _) => None,
            (false, false) => return Err(Error::PlanMismatch { issues }),
            (false, true) => Some(issues.join("; ")),
        };
        let mut warnings = Vec::new();
        if let Some(why) = &fallback {
            warnings.push(format!(
                "plan does not match the model ({why}); running every head dense"
            ));
        } else {
            let with_modalities = plan
                .heads()
                .filter(|(_, h)| !h.modalities.is_empty())
                .count();
            if with_modalities > 0 {
                warnings.push(format!(
                    "{with_modalities} heads have modality patterns; the CPU prefill has no modality \
                     spans and applies each head's own pattern to every cell"
                ));
            }
        }
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        Ok(Self {
            plan: plan.clone(),
            model: model.clone(),
            fallback,
            dense_below: options.dense_below.unwrap_or(plan.defaults.dense_below),
            warnings,
            totals: PrefillTotals::default(),
        })
    }

    /// The plan being run.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The length below which every head runs dense: [`PrefillOptions::dense_below`] when given, else
    /// the plan's `defaults.dense_below`.
    pub fn dense_below(&self) -> u64 {
        self.dense_below
    }

    /// Why every head runs dense, when the plan does not match the model and `dense_fallback` was set.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Warnings printed by [`SparsePrefill::new`].
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Sums over every [`SparsePrefill::forward`] call so far.
    pub fn totals(&self) -> &PrefillTotals {
        &self.totals
    }

    /// Attention of layer `layer` for `input` into `out` (`[q_heads, seq_len, head_dim]`); see the
    /// module docs. Nothing is counted in [`SparsePrefill::totals`] on error.
    pub fn forward(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
        out: &mut [f32],
    ) -> Result<PrefillStats> {
        self.check_input(layer, input)?;
        let shape = input.shape;
        let n = shape.seq_len;
        let per_head = causal_cells(&(0..n), &(0..n));
        let dense_cells = per_head * shape.q_heads as u64;
        let all_dense = self.dense_reason(n);
        let stats = if let Some(reason) = all_dense {
            let start = Instant::now();
            dense_attention(input, out)?;
            PrefillStats {
                cells: dense_cells,
                dense_cells,
                index_time: Duration::ZERO,
                attention_time: start.elapsed(),
                dense_heads: (0..shape.q_heads).map(|h| (h, reason)).collect(),
            }
        } else {
            self.sparse_layer(layer, input, out, dense_cells)?
        };
        self.totals.add(&stats, shape.q_heads);
        Ok(stats)
    }

    /// Why a layer of `seq_len` tokens runs dense as a whole (a mismatched plan under
    /// `dense_fallback`, or a sequence below the threshold); `None` when its heads follow the plan.
    /// Shared with the CUDA plan runner.
    pub(crate) fn dense_reason(&self, seq_len: usize) -> Option<DenseReason> {
        if self.fallback.is_some() {
            Some(DenseReason::PlanMismatch)
        } else if (seq_len as u64) < self.dense_below {
            Some(DenseReason::ShortSequence)
        } else {
            None
        }
    }

    /// The index each query head of `layer` computes on `input` (heads sharing an index get a copy of
    /// it), as [`SparsePrefill::forward`] builds it; `None` when the layer would run dense (short
    /// sequence or a mismatched plan). For comparing another executor's indexes with this one's.
    pub fn layer_index(
        &self,
        layer: usize,
        input: &AttentionInput<'_>,
    ) -> Result<Option<Vec<HeadIndex>>> {
        self.check_input(layer, input)?;
        if self.dense_reason(input.shape.seq_len).is_some() {
            return Ok(None);
        }
        let (built, owner, _) = self.build_indexes(layer, input)?;
        owner
            .iter()
            .map(|&o| {
                built.get(o).cloned().flatten().ok_or_else(|| {
                    Error::Shape(format!("no index was built for head {o} of layer {layer}"))
                })
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    /// Every index owner's index (`None` for heads that use their owner's), the owners, and the
    /// heads' patterns.
    #[allow(clippy::type_complexity)]
    fn build_indexes(
        &self,
        layer: usize,
        input: &AttentionInput<'_>,
    ) -> Result<(Vec<Option<HeadIndex>>, Vec<usize>, Vec<&Pattern>)> {
        let shape = input.shape;
        let ctx = PatternContext::new(shape.seq_len, &self.plan.defaults);
        let patterns: Vec<&Pattern> = (0..shape.q_heads)
            .map(|h| {
                self.plan
                    .head(layer, h)
                    .map(|hp| &hp.pattern)
                    .ok_or_else(|| {
                        head_error(layer, h, "plan", "head missing from the plan".into())
                    })
            })
            .collect::<Result<_>>()?;
        let owner = index_owners(self.plan.defaults.share_kv_group_indexes, &shape, &patterns);
        let built: Vec<Option<HeadIndex>> = (0..shape.q_heads)
            .into_par_iter()
            .map(|h| {
                if owner[h] != h {
                    return Ok(None);
                }
                let pattern = patterns[h];
                let err = |e: Error| head_error(layer, h, pattern.kind(), e.to_string());
                let qk = HeadQk::from_input(input, h).map_err(err)?;
                build_index(pattern, &ctx, &qk).map(Some).map_err(err)
            })
            .collect::<Result<_>>()?;
        Ok((built, owner, patterns))
    }

    /// Index building and the sparse kernel for one layer.
    fn sparse_layer(
        &self,
        layer: usize,
        input: &AttentionInput<'_>,
        out: &mut [f32],
        dense_cells: u64,
    ) -> Result<PrefillStats> {
        let shape = input.shape;
        let start = Instant::now();
        let (built, owner, patterns) = self.build_indexes(layer, input)?;
        let index_time = start.elapsed();

        let indexes: Vec<&HeadIndex> = owner
            .iter()
            .filter_map(|&o| built.get(o).and_then(Option::as_ref))
            .collect();
        if indexes.len() != shape.q_heads {
            return Err(Error::Shape(format!(
                "built {} of {} head indexes",
                indexes.len(),
                shape.q_heads
            )));
        }
        let start = Instant::now();
        sparse_attention(input, &indexes, out)?;
        let attention_time = start.elapsed();

        Ok(PrefillStats {
            cells: indexes.iter().map(|ix| ix.cells()).sum(),
            dense_cells,
            index_time,
            attention_time,
            dense_heads: patterns
                .iter()
                .enumerate()
                .filter(|(_, p)| matches!(p, Pattern::Dense(_)))
                .map(|(h, _)| (h, DenseReason::Planned))
                .collect(),
        })
    }

    /// The input must have the model's head counts and head_dim, and `layer` must exist.
    fn check_input(&self, layer: usize, input: &AttentionInput<'_>) -> Result<()> {
        self.check_shape(layer, &input.shape)
    }

    /// [`Error::Shape`] unless a layer input of `s` fits the model at `layer` (head counts, head_dim,
    /// layer in range); shared with the CUDA plan runner.
    pub(crate) fn check_shape(&self, layer: usize, s: &AttnShape) -> Result<()> {
        s.check()?;
        let m = &self.model;
        let mut wrong = Vec::new();
        for (what, got, want) in [
            ("q_heads", s.q_heads, m.query_heads as usize),
            ("kv_heads", s.kv_heads, m.kv_heads as usize),
            ("head_dim", s.head_dim, m.head_dim as usize),
        ] {
            if got != want {
                wrong.push(format!("{what} {got}, the model has {want}"));
            }
        }
        if layer >= m.layers as usize {
            wrong.push(format!(
                "layer {layer} out of range, the model has {}",
                m.layers
            ));
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(Error::Shape(format!(
                "sparse prefill input: {}",
                wrong.join("; ")
            )))
        }
    }
}

/// Layers and heads the model has that the plan does not list in place (`layers[l].layer == l`,
/// `heads[h].head == h`), as mismatch issues.
fn missing_heads(plan: &Plan, model: &ModelInfo) -> Vec<String> {
    let mut issues = Vec::new();
    for l in 0..model.layers as usize {
        let Some(lp) = plan.layers.get(l) else {
            issues.push(format!(
                "layers[{l}]: missing, the model has {} layers",
                model.layers
            ));
            continue;
        };
        if lp.layer as usize != l {
            issues.push(format!("layers[{l}].layer: {}, expected {l}", lp.layer));
        }
        for h in 0..model.query_heads as usize {
            match lp.heads.get(h) {
                None => issues.push(format!(
                    "layers[{l}].heads[{h}]: missing, the model has {} query heads",
                    model.query_heads
                )),
                Some(hp) if hp.head as usize != h => issues.push(format!(
                    "layers[{l}].heads[{h}].head: {}, expected {h}",
                    hp.head
                )),
                Some(_) => {}
            }
        }
    }
    issues
}

/// `owner[h]`: the head whose index head `h` uses: itself, or with `share` the first head of its KV
/// group with the same pattern (shared with the CUDA plan runner).
pub(crate) fn index_owners(share: bool, shape: &AttnShape, patterns: &[&Pattern]) -> Vec<usize> {
    (0..shape.q_heads)
        .map(|h| {
            if !share {
                return h;
            }
            let first = shape.kv_head_of(h) * shape.group();
            (first..h)
                .find(|&o| patterns[o] == patterns[h])
                .unwrap_or(h)
        })
        .collect()
}

fn head_error(layer: usize, head: usize, kind: &'static str, message: String) -> Error {
    Error::HeadPlan {
        layer,
        head,
        kind,
        message,
    }
}
