//! Profiling: run the model on samples, observe each layer's Q and K right after RoPE, and collect
//! exact per-head statistics into a [`Profile`].
//!
//! [`StatsHook`] is a [`LayerAttention`] that computes [`layer_stats_scored`] on the layer's input and then
//! exact dense attention for the output, so the forward continues exactly as the dense model would.
//! [`profile_samples`] runs it over samples and stores sample `k`'s statistics as sample `k` of the
//! profile. Asked to ([`ProfileRun::periods`]), it first looks for periods in the first sample's
//! attention (`stats::period`) during that sample's pass; when it finds one, grid candidates at it join
//! the dynamic candidates and the sample is profiled again with them.

use std::time::Instant;

use runtime::AttentionInput;

use crate::data::Sample;
use crate::error::{Error, Result};
use crate::model::{DenseAttention, LayerAttention, Model};
use crate::profile::{Profile, ProfileMeta, PROFILE_FORMAT, PROFILE_VERSION};
use crate::stats::dynamic::grid_candidates;
use crate::stats::period::{self, HeadPeriod, PeriodReport, PeriodSearch};
use crate::stats::{layer_stats_scored, HeadStats, StatsConfig};

/// Statistics of every layer of one forward pass.
pub struct StatsHook {
    cfg: StatsConfig,
    /// Dynamic candidates scored in every layer (`stats::dynamic`).
    candidates: Vec<schemas::Pattern>,
    /// `layers[l]` holds one [`HeadStats`] per query head once layer `l` ran.
    pub layers: Vec<Option<Vec<HeadStats>>>,
    /// Seconds spent in statistics (not in the dense attention that follows).
    pub stats_seconds: f64,
    /// When set, every layer's heads are also searched for periods (`stats::period`), appended here
    /// in layer order.
    pub periods: Option<(PeriodSearch, Vec<Option<HeadPeriod>>)>,
}

impl StatsHook {
    pub fn new(cfg: StatsConfig, layers: usize) -> Self {
        Self::scoring(cfg, layers, Vec::new())
    }

    /// A hook that also scores `candidates` (see [`crate::stats::layer_stats_scored`]).
    pub fn scoring(cfg: StatsConfig, layers: usize, candidates: Vec<schemas::Pattern>) -> Self {
        Self {
            cfg,
            candidates,
            layers: vec![None; layers],
            stats_seconds: 0.0,
            periods: None,
        }
    }
}

impl LayerAttention for StatsHook {
    fn attend(&mut self, layer: usize, input: &AttentionInput<'_>, out: &mut [f32]) -> Result<()> {
        let start = Instant::now();
        let stats = layer_stats_scored(input, &self.cfg, &self.candidates)?;
        if let Some((search, found)) = self.periods.as_mut() {
            found.extend(period::layer_periods(input, &self.cfg, search)?);
        }
        self.stats_seconds += start.elapsed().as_secs_f64();
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::Profile(format!("layer {layer} beyond the model's layers")))?;
        *slot = Some(stats);
        DenseAttention.attend(layer, input, out)
    }
}

/// Progress of [`profile_samples`], reported after each sample.
#[derive(Debug, Clone, Copy)]
pub struct SampleDone {
    pub index: usize,
    pub total: usize,
    /// Wall seconds of this sample's forward pass (statistics included).
    pub seconds: f64,
    /// Of which in statistics.
    pub stats_seconds: f64,
}

/// What to record about the run in the profile's metadata.
#[derive(Debug, Clone)]
pub struct ProfileRun {
    /// `attnplan <version>`.
    pub tool: String,
    /// The data source as given by the user.
    pub data: String,
    pub stats: StatsConfig,
    /// Dynamic candidates to score (`stats::dynamic::default_candidates`; empty: none).
    pub dynamic: Vec<schemas::Pattern>,
    /// Look for periods in the first sample and add grid candidates at those found (`None`: do not).
    pub periods: Option<PeriodSearch>,
}

/// Runs `model` on every sample (all the same length) and returns their statistics as a profile.
pub fn profile_samples(
    model: &Model,
    samples: &[Sample],
    run: &ProfileRun,
    mut progress: impl FnMut(SampleDone),
) -> Result<Profile> {
    let seq_len = samples
        .first()
        .map(|s| s.tokens.len())
        .ok_or_else(|| Error::Profile("no samples to profile".into()))?;
    if let Some(s) = samples.iter().find(|s| s.tokens.len() != seq_len) {
        return Err(Error::Profile(format!(
            "sample {} has {} tokens, the others {seq_len}: a profile holds one length",
            s.id,
            s.tokens.len()
        )));
    }
    let layers = model.config().layers;
    let mut dynamic = run.dynamic.clone();
    let mut search = run.periods;
    let mut report = None;
    let mut profile: Option<Profile> = None;
    let mut k = 0;
    let mut start = Instant::now();
    while let Some(sample) = samples.get(k) {
        let mut hook = StatsHook::scoring(run.stats, layers, dynamic.clone());
        hook.periods = search.take().map(|s| (s, Vec::new()));
        model.forward_hidden(&sample.tokens, &mut hook)?;
        if let Some((s, per_head)) = hook.periods.take() {
            // A grid with a shorter stride would touch every tile (its diagonals are block-granular).
            let min_grid = run.stats.block_q + run.stats.block_k;
            let found = period::detect(&per_head, min_grid, &s);
            let before = dynamic.len();
            for p in found.iter().filter(|p| p.searched) {
                for c in grid_candidates(p.stride, p.phase, run.stats.block_k as u32) {
                    if !dynamic.contains(&c) {
                        dynamic.push(c);
                    }
                }
            }
            report = Some(PeriodReport {
                sample: sample.id.clone(),
                rows: period::rows_searched(seq_len, run.stats.block_q, s.rows) as u32,
                strides: [min_grid as u32, (seq_len / 3) as u32],
                heads: per_head.len() as u32,
                found,
            });
            if dynamic.len() > before {
                // This pass did not score the new grid candidates: profile the sample again.
                continue;
            }
        }
        let profile = profile.get_or_insert_with(|| {
            Profile::new(ProfileMeta {
                format: PROFILE_FORMAT.into(),
                version: PROFILE_VERSION,
                tool: run.tool.clone(),
                model: model.spec().model_info(),
                data: run.data.clone(),
                seq_len: seq_len as u64,
                block_q: run.stats.block_q as u32,
                block_k: run.stats.block_k as u32,
                last_q: run.stats.last_q as u32,
                samples: samples.len() as u64,
                sample_ids: samples.iter().map(|s| s.id.clone()).collect(),
                layers: (0..layers as u32).collect(),
                dynamic: dynamic.clone(),
                tail_q: run.stats.tail_q as u32,
                periods: report.take(),
            })
        });
        for (l, stats) in hook.layers.iter().enumerate() {
            let stats = stats
                .as_ref()
                .ok_or_else(|| Error::Profile(format!("layer {l} produced no statistics")))?;
            profile.put_sample_stats(k, l, stats)?;
        }
        progress(SampleDone {
            index: k,
            total: samples.len(),
            seconds: start.elapsed().as_secs_f64(),
            stats_seconds: hook.stats_seconds,
        });
        k += 1;
        start = Instant::now();
    }
    profile.ok_or_else(|| Error::Profile("no samples to profile".into()))
}
