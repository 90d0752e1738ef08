//! Timing a plan file on the GPU (`attnplan bench --device cuda --plan FILE`, `cuda_bench plan DIR
//! --plan FILE`): every layer of the plan through [`PlanPrefill`] on the benchmark's structured inputs
//! of the plan's layer shape ([`structured`]; the same inputs for every layer: a timing, not a model
//! run), then whole passes as an engine runs them. Compiled with and without the `cuda` feature
//! (without it [`time_plan`] returns the stub's error).

use schemas::Plan;

use super::bench::{median, median_ms, structured};
use super::{DeviceBuffer, Keys, LayerStats, PlanPrefill, SparsePrefill};
use crate::error::Result;
use crate::prefill::{DenseReason, PrefillOptions};
use crate::AttnShape;

/// One layer's timed forwards (medians of device time, CUDA events).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanLayerTiming {
    pub index_ms: f32,
    pub attention_ms: f32,
    /// Key-block and column entries of the layer's index (0 when it ran dense).
    pub entries: (usize, usize),
    /// Why the layer ran dense, if it did before building an index.
    pub dense: Option<DenseReason>,
    /// Whether it ran dense after building its index ([`LayerStats::dense_faster`]).
    pub dense_faster: bool,
}

/// What [`time_plan`] measured at one length.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanTiming {
    pub seq_len: usize,
    pub reps: usize,
    /// The length below which the runner went dense ([`PlanPrefill::dense_below`]).
    pub dense_below: u64,
    pub layers: Vec<PlanLayerTiming>,
    /// One dense layer (median of device time).
    pub dense_layer_ms: f32,
    /// Whole passes, every layer queued back to back untimed and one synchronize at the end (host
    /// wall time, medians of `reps` after one): the plan's, and as many dense layers.
    pub plan_pass_ms: f32,
    pub dense_pass_ms: f32,
    /// Heads over all layers by where their index came from: GPU vertical-slash, block-sparse,
    /// token-select, query-adaptive, host static.
    pub heads: [usize; 5],
}

impl PlanTiming {
    /// Index time summed over the layers.
    pub fn index_ms(&self) -> f32 {
        self.layers.iter().map(|l| l.index_ms).sum()
    }

    /// Attention time summed over the layers.
    pub fn attention_ms(&self) -> f32 {
        self.layers.iter().map(|l| l.attention_ms).sum()
    }

    /// Layers that ran dense without an index (short sequence, mismatched plan).
    pub fn dense_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.dense.is_some()).count()
    }

    /// Layers that built their index and then ran dense, predicted faster.
    pub fn dense_faster_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.dense_faster).count()
    }

    /// Dense pass over plan pass.
    pub fn speedup(&self) -> f64 {
        f64::from(self.dense_pass_ms) / f64::from(self.plan_pass_ms).max(1e-9)
    }
}

/// What a plan is timed on: the benchmark's structured inputs of a layer shape ([`structured`],
/// seeded by the length), bf16 on the device, and an output buffer.
pub struct LayerBuffers {
    pub q: DeviceBuffer<u16>,
    pub k: DeviceBuffer<u16>,
    pub v: DeviceBuffer<u16>,
    pub out: DeviceBuffer<u16>,
}

impl LayerBuffers {
    /// Generates and uploads the inputs for `shape`; the output is zeroed.
    pub fn new(sp: &SparsePrefill, shape: &AttnShape) -> Result<Self> {
        let (q, k, v) = structured(shape, 7 + shape.seq_len as u64)?;
        let (q, k, v) = (
            sp.upload_bf16(&q)?,
            sp.upload_bf16(&k)?,
            sp.upload_bf16(&v)?,
        );
        let out = sp.zeros::<u16>(q.len())?;
        Ok(Self { q, k, v, out })
    }
}

/// Times `plan` at `seq_len` tokens on `sp` (see the module docs): `reps` timed forwards per layer
/// after one warm-up (which also fills the static patterns' cache), one dense layer, and `reps`
/// whole passes of each kind after one.
pub fn time_plan(
    sp: &SparsePrefill,
    plan: &Plan,
    seq_len: usize,
    reps: usize,
    options: PrefillOptions,
) -> Result<PlanTiming> {
    let reps = reps.max(1);
    let m = &plan.model;
    let shape = AttnShape {
        q_heads: m.query_heads as usize,
        kv_heads: m.kv_heads as usize,
        seq_len,
        head_dim: m.head_dim as usize,
    };
    shape.check()?;
    let mut pp = PlanPrefill::new(sp, plan, m, options)?;
    pp.set_timing(true);
    let LayerBuffers { q, k, v, mut out } = LayerBuffers::new(sp, &shape)?;
    let layers = m.layers as usize;
    let mut timing = PlanTiming {
        seq_len,
        reps,
        dense_below: pp.dense_below(),
        layers: Vec::with_capacity(layers),
        dense_layer_ms: 0.0,
        plan_pass_ms: 0.0,
        dense_pass_ms: 0.0,
        heads: [0; 5],
    };
    for layer in 0..layers {
        pp.forward(sp, layer, &shape, &q, &k, &v, &mut out)?; // warm-up
        let runs = (0..reps)
            .map(|_| pp.forward(sp, layer, &shape, &q, &k, &v, &mut out))
            .collect::<Result<Vec<LayerStats>>>()?;
        let ms = |f: fn(&LayerStats) -> Option<f32>| {
            median(runs.iter().map(|r| f(r).unwrap_or(0.0)).collect())
        };
        let r = &runs[0];
        timing.layers.push(PlanLayerTiming {
            index_ms: ms(|r| r.index_ms),
            attention_ms: ms(|r| r.attention_ms),
            entries: r.entries,
            dense: r.dense,
            dense_faster: r.dense_faster,
        });
        for (slot, c) in timing.heads.iter_mut().zip([
            r.gpu_vertical_slash,
            r.gpu_block_sparse,
            r.gpu_token_select,
            r.gpu_query_adaptive,
            r.host_static,
        ]) {
            *slot += c;
        }
    }
    timing.dense_layer_ms = median_ms(sp, reps, || {
        sp.forward(&shape, &q, &k, &v, Keys::Dense, &mut out)
    })?;
    pp.set_timing(false);
    let (mut plan_pass, mut dense_pass) = (Vec::new(), Vec::new());
    for rep in 0..=reps {
        let t = std::time::Instant::now();
        for layer in 0..layers {
            pp.forward(sp, layer, &shape, &q, &k, &v, &mut out)?;
        }
        sp.synchronize()?;
        let plan_ms = t.elapsed().as_secs_f32() * 1e3;
        let t = std::time::Instant::now();
        for _ in 0..layers {
            sp.forward(&shape, &q, &k, &v, Keys::Dense, &mut out)?;
        }
        sp.synchronize()?;
        if rep > 0 {
            plan_pass.push(plan_ms);
            dense_pass.push(t.elapsed().as_secs_f32() * 1e3);
        }
    }
    timing.plan_pass_ms = median(plan_pass);
    timing.dense_pass_ms = median(dense_pass);
    Ok(timing)
}
