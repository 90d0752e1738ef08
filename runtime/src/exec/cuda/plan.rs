//! [`PlanPrefill`]: a plan run on the GPU, one layer per call: the CUDA counterpart of the CPU's
//! [`crate::SparsePrefill`], with the same checks and the same cells.
//!
//! [`PlanPrefill::new`] checks the plan against the model exactly as the CPU prefill does (it holds
//! one for that). [`PlanPrefill::forward`] takes a layer's Q, K, V on the device (bf16,
//! [`SparsePrefill::forward`]'s layout) and:
//! - runs dense attention when the sequence is shorter than its threshold ([`PlanPrefill::dense_below`]:
//!   the [`PrefillOptions::dense_below`] it was given, else the larger of the plan's
//!   `defaults.dense_below` and [`gpu_dense_below`]), or when the plan did not match and
//!   `dense_fallback` was asked for;
//! - otherwise builds every head's index from its pattern, all on the device: `vertical_slash` heads
//!   with the GPU [`VerticalSlashBuilder`] (one build for all of them, per-head budgets),
//!   `block_sparse` heads with the GPU [`BlockSparseBuilder`] (per-head `top_k` or `coverage`),
//!   `token_select` heads with the GPU [`TokenSelectBuilder`] (from the same vertical-slash
//!   estimate), `query_adaptive` heads by deciding their branch and budgets on the GPU and building
//!   both branches (block-sparse coverage with a floor, vertical-slash), and static patterns
//!   (`dense`, `streaming`, `a_shape`, `grid`) on the host (they read no Q or K: built once per layer
//!   and input shape, then reused from the device);
//! - merges the per-head lists into one index on the device (`ix_merge_count`, `vs_scan`,
//!   `ix_merge_copy`, with the query-adaptive heads' sources as decided on the device; skipped when
//!   one builder made every head's index) and runs one attention launch. Nothing goes back to the
//!   host but the list sizes, in one copy per layer: every builder queues its work up to its list
//!   sizes (and the merge its sizes from the builders' offsets), the host reads all the totals at
//!   once, sizes the lists, and queues the writes.
//!
//! Untimed (the default), `forward` waits for the device only for those list sizes and returns once
//! the attention is queued; [`PlanPrefill::set_timing`] adds CUDA-event timings of the index and of
//! the attention to [`LayerStats`], at the cost of waiting for each.
//!
//! With `defaults.share_kv_group_indexes` the heads of a KV group with the same pattern use the index
//! built for the first of them, as on the CPU. The plan's blocks must be 64 × 64 (the kernels').

use std::collections::HashMap;

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use schemas::{ModelInfo, Pattern, Plan};

use super::device::{drv, follow, KernelFile};
use super::env_switch;
use super::gpu_threshold::{gpu_dense_below, sparse_attention_pays, sparse_tile_cost};
pub use super::layer_stats::LayerStats;
use super::query_adaptive::QueryAdaptive;
use super::{
    counting_index, grid_u32, read_totals, scan_counts, size_lists, BlockChoice,
    BlockSparseBuilder, DeviceBuffer, DeviceIndex, FlatIndex, Keys, SparsePrefill, TokenChoice,
    TokenSelectBuilder, VerticalSlashBuilder, CUDA_BLOCK,
};
use crate::error::{Error, Result};
use crate::pattern::{static_index, HeadIndex, PatternContext};
use crate::prefill::{index_owners, PrefillOptions};
use crate::{AttentionInput, AttnShape};

/// Where a head's index comes from (the source numbers of `ix_merge_*`).
const SRC_VS: u32 = 0;
const SRC_BS: u32 = 1;
const SRC_TS: u32 = 2;
const SRC_HOST: u32 = 3;
/// Pairs of `PlanPrefill::totals`: each builder's list totals and the merge's.
const SLOT_VS: usize = 0;
const SLOT_BS: usize = 1;
const SLOT_TS: usize = 2;
const SLOT_MERGE: usize = 3;

/// A plan run on the GPU (see the module docs).
#[derive(Debug)]
pub struct PlanPrefill {
    /// The CPU prefill, for its checks of the plan and of each layer's shape.
    checked: crate::SparsePrefill,
    vs: Option<(AttnShape, VerticalSlashBuilder)>,
    bs: Option<(AttnShape, BlockSparseBuilder)>,
    ts: Option<(AttnShape, TokenSelectBuilder)>,
    qa: Option<(AttnShape, QueryAdaptive)>,
    vs_ix: Option<DeviceIndex>,
    bs_ix: Option<DeviceIndex>,
    ts_ix: Option<DeviceIndex>,
    merged: Option<DeviceIndex>,
    /// Per layer, the host-made index of its static heads (they read no Q or K), for inputs of
    /// `statics_shape`; dropped when the shape changes.
    statics: HashMap<usize, DeviceIndex>,
    statics_shape: Option<AttnShape>,
    /// The layer whose cached static index the last forward used as its host source.
    host_from_cache: Option<usize>,
    /// Which index the last sparse forward ran: a `SRC_*` source, or `MERGED`.
    last: Option<u32>,
    merge: Merge,
    /// The list totals of a layer's builds (pairs `SLOT_*`), read back in one copy.
    totals: CudaSlice<u32>,
    /// Whether `forward` times the index and the attention (CUDA events, waiting for each).
    timing: bool,
    /// Whether a layer whose index would take longer than dense attention runs dense
    /// ([`PlanPrefill::set_dense_when_faster`]).
    dense_when_faster: bool,
}

/// `0` turns off [`PlanPrefill::set_dense_when_faster`] at `new` (for measuring both ways); `1` or
/// unset leaves it on; another value is refused.
pub const DENSE_WHEN_FASTER_ENV: &str = "ATTNPLAN_DENSE_WHEN_FASTER";

/// Merged entries per CTA of `ix_merge_copy` (`MC_RUN` in vertical_slash.cu).
pub(crate) const MERGE_COPY_RUN: usize = 4096;

/// `PlanPrefill::last`: the merged index.
const MERGED: u32 = 4;

impl PlanPrefill {
    /// Checks `plan` against `model` as [`crate::SparsePrefill::new`] does (same errors, same
    /// `dense_fallback`) and gets the merge kernels of `sp`.
    pub fn new(
        sp: &SparsePrefill,
        plan: &Plan,
        model: &ModelInfo,
        options: PrefillOptions,
    ) -> Result<Self> {
        // the executor's own threshold unless the caller gave one
        let options = PrefillOptions {
            dense_below: Some(
                options
                    .dense_below
                    .unwrap_or_else(|| plan.defaults.dense_below.max(gpu_dense_below(model))),
            ),
            ..options
        };
        let checked = crate::SparsePrefill::new(plan, model, options)?;
        let dense_when_faster = env_switch(DENSE_WHEN_FASTER_ENV)?;
        let f = |name| sp.dev.function(KernelFile::VerticalSlash, name, 0);
        Ok(Self {
            checked,
            vs: None,
            bs: None,
            ts: None,
            qa: None,
            vs_ix: None,
            bs_ix: None,
            ts_ix: None,
            merged: None,
            statics: HashMap::new(),
            statics_shape: None,
            host_from_cache: None,
            last: None,
            merge: Merge {
                count: f("ix_merge_count")?,
                copy: f("ix_merge_copy")?,
                scan: f("vs_scan")?,
                bufs: None,
            },
            totals: drv("alloc", sp.dev.stream.alloc_zeros::<u32>(8))?,
            timing: false,
            dense_when_faster,
        })
    }

    /// Whether [`PlanPrefill::forward`] times its index building and its attention launch
    /// ([`LayerStats::index_ms`], [`LayerStats::attention_ms`]). Off by default: timing waits for the
    /// device after each part, where an untimed `forward` waits only for the list sizes (8 bytes per
    /// builder, once per layer) and returns as soon as the attention is queued.
    pub fn set_timing(&mut self, on: bool) {
        self.timing = on;
    }

    /// Whether a layer runs dense attention after all when its index, once built, is predicted to
    /// take longer to compute than dense attention: its tiles times [`sparse_tile_cost`] against
    /// the dense tiles ([`sparse_attention_pays`]; only where dense runs on 128-key tiles, whose
    /// rate the cost is measured against). The index's cost is spent either way; the attention
    /// then takes the faster path. Such a layer reports [`LayerStats::dense_faster`] and keeps its
    /// index as [`PlanPrefill::last_index`]. On by default (unless [`DENSE_WHEN_FASTER_ENV`] is
    /// `0`); off, every sparse layer computes its index's cells, as the CPU prefill does (e.g. to
    /// compare the two).
    pub fn set_dense_when_faster(&mut self, on: bool) {
        self.dense_when_faster = on;
    }

    /// The plan being run.
    pub fn plan(&self) -> &Plan {
        self.checked.plan()
    }

    /// The length below which every layer runs dense: [`PrefillOptions::dense_below`] when given,
    /// else the larger of the plan's `defaults.dense_below` and [`gpu_dense_below`] of the model.
    pub fn dense_below(&self) -> u64 {
        self.checked.dense_below()
    }

    /// The index of the last [`PlanPrefill::forward`] that ran sparse (`None` before, or after a
    /// dense one); [`SparsePrefill::download_index`] brings it to the host.
    pub fn last_index(&self) -> Option<&DeviceIndex> {
        match self.last? {
            SRC_VS => self.vs_ix.as_ref(),
            SRC_BS => self.bs_ix.as_ref(),
            SRC_TS => self.ts_ix.as_ref(),
            SRC_HOST => self.host_from_cache.and_then(|l| self.statics.get(&l)),
            _ => self.merged.as_ref(),
        }
    }

    /// Attention of layer `layer` into `out` (see the module docs). Errors: [`Error::Shape`] for an
    /// input that does not fit the model, [`Error::HeadPlan`] for a head the plan lacks,
    /// [`Error::CudaUnsupported`] for a plan whose blocks are not 64 × 64, and the builders' and the
    /// kernel's errors.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        sp: &SparsePrefill,
        layer: usize,
        shape: &AttnShape,
        q: &DeviceBuffer<u16>,
        k: &DeviceBuffer<u16>,
        v: &DeviceBuffer<u16>,
        out: &mut DeviceBuffer<u16>,
    ) -> Result<LayerStats> {
        self.checked.check_shape(layer, shape)?;
        let plan = self.checked.plan();
        let n = shape.seq_len;
        let dense = self.checked.dense_reason(n);
        self.last = None;
        self.host_from_cache = None;
        if dense.is_some() {
            let attention_ms = timed(sp, self.timing, || {
                sp.forward(shape, q, k, v, Keys::Dense, out)
            })?;
            return Ok(LayerStats {
                dense,
                attention_ms,
                ..LayerStats::default()
            });
        }
        let ctx = PatternContext::new(n, &plan.defaults);
        ctx.check()?;
        if ctx.block_q != CUDA_BLOCK || ctx.block_k != CUDA_BLOCK {
            return Err(Error::CudaUnsupported(format!(
                "the plan's blocks are {} x {}; the CUDA kernels use 64 x 64",
                ctx.block_q, ctx.block_k
            )));
        }
        let patterns: Vec<&Pattern> = (0..shape.q_heads)
            .map(|h| {
                plan.head(layer, h)
                    .map(|hp| &hp.pattern)
                    .ok_or_else(|| Error::HeadPlan {
                        layer,
                        head: h,
                        kind: "plan",
                        message: "head missing from the plan".into(),
                    })
            })
            .collect::<Result<_>>()?;
        let owner = index_owners(plan.defaults.share_kv_group_indexes, shape, &patterns);

        let mut stats = LayerStats::default();
        let mut src = vec![SRC_HOST; shape.q_heads];
        let mut budgets = vec![(0usize, 1usize); shape.q_heads];
        let mut choices = vec![None; shape.q_heads];
        let mut tokens = vec![None; shape.q_heads];
        let mut adaptive: Vec<Option<&schemas::QueryAdaptive>> = vec![None; shape.q_heads];
        let mut host: Vec<Option<HeadIndex>> = vec![None; shape.q_heads];
        let mut statics = Vec::new();
        for h in (0..shape.q_heads).filter(|&h| owner[h] == h) {
            let head_err = |e: Error| head_error(layer, h, patterns[h], e);
            match patterns[h] {
                Pattern::VerticalSlash(p) => {
                    src[h] = SRC_VS;
                    budgets[h] = (ctx.resolve(&p.vertical), ctx.resolve(&p.slash));
                    stats.gpu_vertical_slash += 1;
                }
                Pattern::BlockSparse(p) => {
                    src[h] = SRC_BS;
                    choices[h] = Some(BlockChoice::from_pattern(p, &ctx).map_err(head_err)?);
                    stats.gpu_block_sparse += 1;
                }
                Pattern::QueryAdaptive(p) => {
                    // both branches are built; the device picks one (`QueryAdaptive::src`)
                    crate::pattern::query_adaptive::check(p).map_err(head_err)?;
                    src[h] = SRC_VS;
                    adaptive[h] = Some(p);
                    let floor = ctx.resolve(&p.min_budget);
                    choices[h] = Some(BlockChoice::CoverageAtLeast(p.gamma, floor));
                    stats.gpu_query_adaptive += 1;
                }
                Pattern::TokenSelect(p) => {
                    src[h] = SRC_TS;
                    tokens[h] = Some(TokenChoice::from_pattern(p, &ctx).map_err(head_err)?);
                    stats.gpu_token_select += 1;
                }
                Pattern::Dense(_)
                | Pattern::Streaming(_)
                | Pattern::AShape(_)
                | Pattern::Grid(_) => {
                    statics.push(h);
                    stats.host_static += 1;
                }
            }
        }
        stats.shared = (0..shape.q_heads).filter(|&h| owner[h] != h).count();
        let src_of: Vec<(u32, u32)> = (0..shape.q_heads)
            .map(|h| (src[owner[h]], owner[h] as u32))
            .collect();
        // the heads whose vertical and slash scores are read: their own vertical-slash,
        // query-adaptive and token-select indexes (the others' scores are not estimated)
        let est_heads: Vec<u32> = (0..shape.q_heads)
            .filter(|&h| owner[h] == h && (src[h] == SRC_VS || src[h] == SRC_TS))
            .map(|h| h as u32)
            .collect();
        let any_qa = stats.gpu_query_adaptive > 0;
        // query-adaptive heads need both the vertical-slash and the block-sparse builds
        let used = |s: u32| {
            src_of.iter().any(|&(x, _)| x == s) || (any_qa && (s == SRC_VS || s == SRC_BS))
        };
        let sources_used = [SRC_VS, SRC_BS, SRC_TS, SRC_HOST]
            .into_iter()
            .filter(|&s| used(s))
            .count();
        // one source serving every head as itself needs no merge
        let direct = (sources_used == 1 && stats.shared == 0).then(|| src_of[0].0);
        if self.statics_shape != Some(*shape) {
            self.statics.clear();
            self.statics_shape = Some(*shape);
        }
        let qa = &mut self.qa;
        let (vs, bs, ts, vs_ix, bs_ix, ts_ix, merged) = (
            &mut self.vs,
            &mut self.bs,
            &mut self.ts,
            &mut self.vs_ix,
            &mut self.bs_ix,
            &mut self.ts_ix,
            &mut self.merged,
        );
        let (cache, from_cache) = (&mut self.statics, &mut self.host_from_cache);
        let (mg, totals) = (&mut self.merge, &mut self.totals);
        // timed by CUDA events around all of it: the host's part (the read-back, static indexes)
        // counts too
        stats.index_ms = timed(sp, self.timing, || {
            let [bs_stream, ts_stream] = &sp.dev.aux;
            // 1. every builder up to its list sizes, queued. The block-sparse builder reads only Q
            // and K and runs on its own stream; token-select reads the estimate's vertical scores
            // and runs on a second one once the estimate is queued; the query-adaptive decisions
            // and the vertical-slash selection follow the estimate on the main stream.
            joined(sp, || {
                if used(SRC_BS) {
                    let b = builder(bs, shape, |s| BlockSparseBuilder::new(sp, s, &ctx))?;
                    let slot = Some((&mut *totals, SLOT_BS));
                    b.count_heads(sp, bs_stream, q, k, &choices, bs_ix, slot)?;
                }
                if used(SRC_VS) || used(SRC_TS) {
                    let b = builder(vs, shape, |s| VerticalSlashBuilder::new(sp, s, &ctx))?;
                    b.estimate_heads(sp, q, k, &est_heads)?;
                }
                if used(SRC_TS) {
                    let scores = vs
                        .as_ref()
                        .map(|(_, b)| b)
                        .ok_or_else(|| Error::Cuda("no vertical scores".into()))?;
                    let b = builder(ts, shape, |s| TokenSelectBuilder::new(sp, s))?;
                    let slot = Some((&mut *totals, SLOT_TS));
                    b.count_heads(sp, ts_stream, scores, &tokens, ts_ix, slot)?;
                }
                if used(SRC_VS) {
                    let b = builder(vs, shape, |s| VerticalSlashBuilder::new(sp, s, &ctx))?;
                    b.upload_budgets(sp, &budgets)?;
                    if any_qa {
                        let d = builder(qa, shape, |s| QueryAdaptive::new(sp, s))?;
                        d.decide(sp, &ctx, q, k, b, &adaptive, (SRC_BS, SRC_VS))?;
                    }
                    b.count_uploaded(sp, vs_ix, Some((&mut *totals, SLOT_VS)))?;
                }
                Ok(())
            })?;
            *from_cache = None;
            if used(SRC_HOST) {
                // static heads only: their index is the same at every call of this shape
                if let std::collections::hash_map::Entry::Vacant(slot) = cache.entry(layer) {
                    for &h in &statics {
                        if let Some(ix) = static_index(patterns[h], &ctx) {
                            host[h] = Some(ix.map_err(|e| head_error(layer, h, patterns[h], e))?);
                        }
                    }
                    let empty = HeadIndex::empty(&ctx);
                    let heads: Vec<HeadIndex> = std::mem::take(&mut host)
                        .into_iter()
                        .map(|ix| ix.unwrap_or_else(|| empty.clone()))
                        .collect();
                    slot.insert(sp.upload_flat(&FlatIndex::from_heads(n, &heads)?)?);
                }
                *from_cache = Some(layer);
            }
            // the branches the device chose for the query-adaptive heads, if any
            let over = match (any_qa, qa.as_ref()) {
                (true, Some((_, d))) => Some(&d.src),
                (true, None) => return Err(Error::Cuda("no query-adaptive decisions".into())),
                (false, _) => None,
            };
            if direct.is_none() {
                // the merged list sizes need only the sources' offsets
                let host_src = from_cache.and_then(|l| cache.get(&l));
                let sources = [vs_ix.as_ref(), bs_ix.as_ref(), ts_ix.as_ref(), host_src];
                let reuse = merged.take();
                let slot = (&mut *totals, SLOT_MERGE);
                *merged = Some(mg.count(sp, shape, sources, &src_of, over, reuse, slot)?);
            }
            // 2. the one wait: every list size at once (none for static heads alone)
            let counted = used(SRC_VS) || used(SRC_TS) || used(SRC_BS) || direct.is_none();
            let t = if counted {
                read_totals(sp, totals)?
            } else {
                Vec::new()
            };
            let t = |slot: usize| {
                t.get(slot)
                    .copied()
                    .ok_or_else(|| Error::Cuda(format!("no list totals in slot {slot}")))
            };
            // 3. the lists, each builder's on the stream it counted on
            joined(sp, || {
                if used(SRC_BS) {
                    let b = builder(bs, shape, |s| BlockSparseBuilder::new(sp, s, &ctx))?;
                    b.fill(sp, bs_stream, t(SLOT_BS)?, bs_ix)?;
                }
                if used(SRC_TS) {
                    let b = builder(ts, shape, |s| TokenSelectBuilder::new(sp, s))?;
                    b.fill(sp, ts_stream, t(SLOT_TS)?, ts_ix)?;
                }
                if used(SRC_VS) {
                    let b = builder(vs, shape, |s| VerticalSlashBuilder::new(sp, s, &ctx))?;
                    b.fill(sp, t(SLOT_VS)?, vs_ix)?;
                }
                Ok(())
            })?;
            if let (None, Some(ix)) = (direct, merged.as_mut()) {
                let host_src = from_cache.and_then(|l| cache.get(&l));
                let sources = [vs_ix.as_ref(), bs_ix.as_ref(), ts_ix.as_ref(), host_src];
                mg.copy(sp, shape, sources, over, ix, t(SLOT_MERGE)?)?;
            }
            Ok(())
        })?;
        self.last = Some(direct.unwrap_or(MERGED));
        let ix = self
            .last_index()
            .ok_or_else(|| Error::Cuda("no index was built for the layer".into()))?;
        stats.entries = (ix.n_blk, ix.n_col);
        stats.dense_faster = self.dense_when_faster
            && sp.dense128(shape.head_dim)
            && !sparse_attention_pays(shape, stats.entries, sparse_tile_cost(shape.head_dim));
        let keys = if stats.dense_faster {
            Keys::Dense
        } else {
            Keys::Index(ix)
        };
        stats.attention_ms = timed(sp, self.timing, || sp.forward(shape, q, k, v, keys, out))?;
        Ok(stats)
    }

    /// [`PlanPrefill::forward`] on host tensors: `input`'s Q, K, V (f32, rounded to bf16) go to the
    /// device, the attention comes back into `out` (`[q_heads, seq_len, head_dim]`, f32 of the bf16
    /// output) once the device is done. For a model whose forward runs on the host (the profiler's),
    /// so that its attention runs on the GPU; an engine with its tensors on the device calls
    /// `forward`.
    pub fn forward_host(
        &mut self,
        sp: &SparsePrefill,
        layer: usize,
        input: &AttentionInput<'_>,
        out: &mut [f32],
    ) -> Result<LayerStats> {
        let shape = input.shape;
        shape.check_out(out.len())?;
        let q = sp.upload_bf16(input.q)?;
        let k = sp.upload_bf16(input.k)?;
        let v = sp.upload_bf16(input.v)?;
        let mut o = sp.zeros::<u16>(out.len())?;
        let stats = self.forward(sp, layer, &shape, &q, &k, &v, &mut o)?;
        for (dst, bits) in out.iter_mut().zip(sp.download(&o)?) {
            *dst = super::bf16_to_f32(bits);
        }
        Ok(stats)
    }
}

fn head_error(layer: usize, head: usize, pattern: &Pattern, e: Error) -> Error {
    Error::HeadPlan {
        layer,
        head,
        kind: pattern.kind(),
        message: e.to_string(),
    }
}

/// Runs `queue`, timed by [`SparsePrefill::time_ms`] (which waits for the device) when `on`.
fn timed(sp: &SparsePrefill, on: bool, queue: impl FnOnce() -> Result<()>) -> Result<Option<f32>> {
    if on {
        return sp.time_ms(queue).map(Some);
    }
    queue()?;
    Ok(None)
}

/// Runs `queue` (work queued on the main stream and on the aux streams), then makes the main stream
/// wait for the aux streams, also when `queue` failed part way (nothing on an aux stream may outlive
/// the buffers the main stream frees).
fn joined(sp: &SparsePrefill, queue: impl FnOnce() -> Result<()>) -> Result<()> {
    let r = queue();
    for aux in &sp.dev.aux {
        follow(&sp.dev, &sp.dev.stream, aux)?;
    }
    r
}

/// The builder in `slot`, made anew by `make` when the layer shape changed.
fn builder<'a, B>(
    slot: &'a mut Option<(AttnShape, B)>,
    shape: &AttnShape,
    make: impl FnOnce(&AttnShape) -> Result<B>,
) -> Result<&'a mut B> {
    if slot.as_ref().is_none_or(|(s, _)| s != shape) {
        *slot = Some((*shape, make(shape)?));
    }
    match slot {
        Some((_, b)) => Ok(b),
        None => Err(Error::Cuda("index builder missing".into())),
    }
}

/// Merging per-head lists from up to four sources into one index (`ix_merge_count`, `vs_scan`,
/// `ix_merge_copy`): head `h` takes the lists of head `src_of[h].1` of source `src_of[h].0`, or of
/// the source the device chose for that head (`src_over`, query-adaptive heads; without it, a
/// buffer of `0xffffffff`, "no choice", stands in).
#[derive(Debug)]
struct Merge {
    count: CudaFunction,
    copy: CudaFunction,
    scan: CudaFunction,
    /// For `q_heads` heads and `m` entries: per-head source and head (uploaded per layer), "no
    /// device choice" per head, and the per-entry list sizes.
    bufs: Option<MergeBufs>,
}

#[derive(Debug)]
struct MergeBufs {
    q_heads: usize,
    m: usize,
    ids: CudaSlice<u32>,
    heads: CudaSlice<u32>,
    no_over: CudaSlice<u32>,
    cnt_blk: CudaSlice<u32>,
    cnt_col: CudaSlice<u32>,
}

impl Merge {
    /// The merged index's offsets and its list totals (into `totals`' pair `slot`), queued; the
    /// sources need only their offsets so far. [`Merge::copy`] follows with the totals.
    #[allow(clippy::too_many_arguments)]
    fn count(
        &mut self,
        sp: &SparsePrefill,
        shape: &AttnShape,
        sources: [Option<&DeviceIndex>; 4],
        src_of: &[(u32, u32)],
        src_over: Option<&CudaSlice<u32>>,
        out: Option<DeviceIndex>,
        totals: (&mut CudaSlice<u32>, usize),
    ) -> Result<DeviceIndex> {
        let n = shape.seq_len;
        let q_blocks = n.div_ceil(CUDA_BLOCK);
        let m = shape.q_heads * q_blocks;
        for (h, &(s, sh)) in src_of.iter().enumerate() {
            let ok = sources
                .get(s as usize)
                .copied()
                .flatten()
                .is_some_and(|ix| ix.seq_len == n && (sh as usize) < ix.q_heads);
            if !ok {
                return Err(Error::Cuda(format!(
                    "head {h}: source {s} head {sh} has no index for {n} tokens"
                )));
            }
        }
        let s = &sp.dev.stream;
        if self
            .bufs
            .as_ref()
            .is_none_or(|b| b.q_heads != shape.q_heads || b.m != m)
        {
            let z = |len: usize| drv("alloc", s.alloc_zeros::<u32>(len.max(1)));
            self.bufs = Some(MergeBufs {
                q_heads: shape.q_heads,
                m,
                ids: z(shape.q_heads)?,
                heads: z(shape.q_heads)?,
                no_over: drv("upload", s.clone_htod(&vec![u32::MAX; shape.q_heads]))?,
                cnt_blk: z(m)?,
                cnt_col: z(m)?,
            });
        }
        let bufs = self
            .bufs
            .as_mut()
            .ok_or_else(|| Error::Cuda("merge buffers missing".into()))?;
        let ids: Vec<u32> = src_of.iter().map(|x| x.0).collect();
        let heads: Vec<u32> = src_of.iter().map(|x| x.1).collect();
        drv("upload", s.memcpy_htod(&ids, &mut bufs.ids))?;
        drv("upload", s.memcpy_htod(&heads, &mut bufs.heads))?;
        let dims = (shape.q_heads as i32, q_blocks as i32);
        let MergeBufs {
            ids: ids_d,
            heads: heads_d,
            no_over,
            cnt_blk,
            cnt_col,
            ..
        } = bufs;
        let mut b = s.launch_builder(&self.count);
        let over = src_over.unwrap_or(no_over);
        push_sources(&mut b, sources, (ids_d, heads_d), over, &dims)?;
        b.arg(&mut *cnt_blk).arg(&mut *cnt_col);
        let cfg = LaunchConfig {
            grid_dim: (grid_u32(m.div_ceil(256))?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `ix_merge_count`; every source head named in src_of was checked to exist
        // in an index of this length (offsets of q_heads * q_blocks + 1 entries); the counts hold m
        // entries.
        drv("ix_merge_count launch", unsafe { b.launch(cfg) })?;
        let mut ix = counting_index(sp, shape.q_heads, n, out)?;
        scan_counts(s, &self.scan, cnt_blk, cnt_col, &mut ix, totals)?;
        // heads 2p and 2p + 1 served by the same head's lists may share a CTA
        ix.pairs_share = shape.q_heads % 2 == 0
            && (0..shape.q_heads / 2).all(|p| src_of[2 * p] == src_of[2 * p + 1]);
        Ok(ix)
    }

    /// The merged lists, copied from the (now filled) sources into `ix` sized for `totals`.
    fn copy(
        &mut self,
        sp: &SparsePrefill,
        shape: &AttnShape,
        sources: [Option<&DeviceIndex>; 4],
        src_over: Option<&CudaSlice<u32>>,
        ix: &mut DeviceIndex,
        totals: (usize, usize),
    ) -> Result<()> {
        let bufs = self
            .bufs
            .as_ref()
            .ok_or_else(|| Error::Cuda("merge copy before its count".into()))?;
        size_lists(sp, ix, totals)?;
        let dims = (
            shape.q_heads as i32,
            shape.seq_len.div_ceil(CUDA_BLOCK) as i32,
        );
        let mut b = sp.dev.stream.launch_builder(&self.copy);
        let over = src_over.unwrap_or(&bufs.no_over);
        push_sources(&mut b, sources, (&bufs.ids, &bufs.heads), over, &dims)?;
        b.arg(&ix.blk_off)
            .arg(&ix.col_off)
            .arg(&mut ix.blk_idx)
            .arg(&mut ix.col_idx);
        // one CTA per run of merged entries, key blocks first
        let blk_ctas = totals.0.div_ceil(MERGE_COPY_RUN);
        let ctas = (blk_ctas + totals.1.div_ceil(MERGE_COPY_RUN)).max(1);
        let blk_ctas = i32::try_from(blk_ctas)
            .map_err(|_| Error::Cuda(format!("{} key-block entries", totals.0)))?;
        b.arg(&blk_ctas);
        let cfg = LaunchConfig {
            grid_dim: (grid_u32(ctas)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `ix_merge_copy`; the output lists hold the scanned totals, the sums of the
        // source list sizes copied (head by head, in the same order); the sources are those `count`
        // checked; blk_ctas CTAs cover the key blocks' totals.0 entries, the rest the columns'.
        drv("ix_merge_copy launch", unsafe { b.launch(cfg) })?;
        Ok(())
    }
}

/// The arguments both merge kernels start with (`IX_SRC_ARGS`, then the per-head sources); unused
/// sources stand in with any present one (never read).
fn push_sources<'a>(
    b: &mut cudarc::driver::LaunchArgs<'a>,
    sources: [Option<&'a DeviceIndex>; 4],
    (ids, heads): (&'a CudaSlice<u32>, &'a CudaSlice<u32>),
    src_over: &'a CudaSlice<u32>,
    (q_heads, q_blocks): &'a (i32, i32),
) -> Result<()> {
    let any = sources
        .iter()
        .flatten()
        .next()
        .copied()
        .ok_or_else(|| Error::Cuda("no index to merge".into()))?;
    for ix in sources.map(|s| s.unwrap_or(any)) {
        b.arg(&ix.blk_off)
            .arg(&ix.blk_idx)
            .arg(&ix.col_off)
            .arg(&ix.col_idx);
    }
    b.arg(ids)
        .arg(src_over)
        .arg(heads)
        .arg(q_heads)
        .arg(q_blocks);
    Ok(())
}
