//! Profiling: run the model on samples, observe each layer's Q and K right after RoPE, and collect
//! exact per-head statistics into a [`Profile`].
//!
//! [`StatsHook`] is a [`LayerAttention`] that computes [`layer_stats_scored`] on the layer's input and then
//! exact dense attention for the output, so the forward continues exactly as the dense model would.
//! [`profile_samples`] runs it over samples and stores sample `k`'s statistics as sample `k` of the
//! profile.

use std::time::Instant;

use runtime::AttentionInput;

use crate::data::Sample;
use crate::error::{Error, Result};
use crate::model::{DenseAttention, LayerAttention, Model};
use crate::profile::{Profile, ProfileMeta, PROFILE_FORMAT, PROFILE_VERSION};
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
        }
    }
}

impl LayerAttention for StatsHook {
    fn attend(&mut self, layer: usize, input: &AttentionInput<'_>, out: &mut [f32]) -> Result<()> {
        let start = Instant::now();
        let stats = layer_stats_scored(input, &self.cfg, &self.candidates)?;
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
    let meta = ProfileMeta {
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
        dynamic: run.dynamic.clone(),
        tail_q: run.stats.tail_q as u32,
    };
    let mut profile = Profile::new(meta);
    for (k, sample) in samples.iter().enumerate() {
        let start = Instant::now();
        let mut hook = StatsHook::scoring(run.stats, layers, run.dynamic.clone());
        model.forward_hidden(&sample.tokens, &mut hook)?;
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
    }
    Ok(profile)
}
