//! Stand-in for the CUDA executor when the crate is built without the `cuda` feature: the same types
//! and functions as `exec/cuda/mod.rs`; everything that would touch a device returns
//! [`Error::CudaNotCompiled`]. [`FlatIndex`] (host only) is the real one, and so is
//! [`bench`](mod@bench) and [`plan_bench`], which run against this stub (their `measure` and `time_plan`
//! return the same error).

#[path = "cuda/bench.rs"]
pub mod bench;
#[path = "cuda/flat.rs"]
mod flat;
#[path = "cuda/gpu_threshold.rs"]
mod gpu_threshold;
#[path = "cuda/layer_stats.rs"]
mod layer_stats;
#[path = "cuda/plan_bench.rs"]
pub mod plan_bench;

use std::marker::PhantomData;

pub use flat::{BlockChoice, FlatIndex, TokenChoice, CUDA_BLOCK};
pub use gpu_threshold::{
    gpu_dense_below, sparse_attention_pays, sparse_tile_cost, GPU_SPARSE_MIN_DENSE_MS,
};
pub use layer_stats::LayerStats;

use crate::error::{Error, Result};
use crate::pattern::{HeadIndex, PatternContext};
use crate::AttnShape;

/// bf16 bit pattern of `x`, rounded to nearest even (NaN stays NaN).
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// The f32 value of bf16 bits.
pub fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits(u32::from(x) << 16)
}

/// The kernel files (never compiled without the feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelFile {
    Attention,
    VerticalSlash,
    BlockSparse,
    TokenSelect,
    QueryAdaptive,
}

/// A CUDA device (cannot be opened without the feature).
#[derive(Debug)]
pub struct Device {
    _never: (),
}

impl Device {
    pub fn new(_ordinal: usize) -> Result<Self> {
        Err(Error::CudaNotCompiled)
    }
    pub fn describe(&self) -> Result<String> {
        Err(Error::CudaNotCompiled)
    }
    pub fn synchronize(&self) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
}

/// A device allocation (none exist without the feature).
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    _t: PhantomData<T>,
}

impl<T> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        0
    }
    pub fn is_empty(&self) -> bool {
        true
    }
    pub fn device_ptr(&self) -> u64 {
        0
    }
}

/// Device memory owned elsewhere (none exist without the feature).
#[derive(Debug)]
pub struct ForeignBuffer<T> {
    buf: DeviceBuffer<T>,
}

impl<T> std::ops::Deref for ForeignBuffer<T> {
    type Target = DeviceBuffer<T>;
    fn deref(&self) -> &DeviceBuffer<T> {
        &self.buf
    }
}

impl<T> std::ops::DerefMut for ForeignBuffer<T> {
    fn deref_mut(&mut self) -> &mut DeviceBuffer<T> {
        &mut self.buf
    }
}

/// A layer's indexes on the device (none exist without the feature).
#[derive(Debug)]
pub struct DeviceIndex {
    pub q_heads: usize,
    pub seq_len: usize,
    pub q_blocks: usize,
}

impl DeviceIndex {
    pub fn entries(&self) -> (usize, usize) {
        (0, 0)
    }
}

/// The key set of every query block.
#[derive(Debug, Clone, Copy)]
pub enum Keys<'a> {
    Dense,
    Index(&'a DeviceIndex),
}

/// The CUDA executor; [`SparsePrefill::new`] returns [`Error::CudaNotCompiled`].
#[derive(Debug)]
pub struct SparsePrefill {
    _never: (),
}

impl SparsePrefill {
    pub fn new(_ordinal: usize) -> Result<Self> {
        Err(Error::CudaNotCompiled)
    }
    pub fn device(&self) -> &Device {
        &Device { _never: () }
    }
    pub fn kernel_resources(&self) -> Result<Vec<(String, i32, i32, i32)>> {
        Err(Error::CudaNotCompiled)
    }
    pub fn upload<T: Copy>(&self, _host: &[T]) -> Result<DeviceBuffer<T>> {
        Err(Error::CudaNotCompiled)
    }
    pub fn upload_bf16(&self, _host: &[f32]) -> Result<DeviceBuffer<u16>> {
        Err(Error::CudaNotCompiled)
    }
    pub fn zeros<T: Copy>(&self, _len: usize) -> Result<DeviceBuffer<T>> {
        Err(Error::CudaNotCompiled)
    }
    pub fn fill<T: Copy>(&self, _buf: &mut DeviceBuffer<T>, _value: T) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
    pub fn download<T: Copy>(&self, _buf: &DeviceBuffer<T>) -> Result<Vec<T>> {
        Err(Error::CudaNotCompiled)
    }
    pub fn upload_index(&self, _seq_len: usize, _heads: &[HeadIndex]) -> Result<DeviceIndex> {
        Err(Error::CudaNotCompiled)
    }
    pub fn upload_flat(&self, _f: &FlatIndex) -> Result<DeviceIndex> {
        Err(Error::CudaNotCompiled)
    }
    pub fn download_index(&self, _d: &DeviceIndex) -> Result<FlatIndex> {
        Err(Error::CudaNotCompiled)
    }
    pub fn set_schedule_from(&mut self, _from: Option<usize>) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
    pub fn dense128(&self, _head_dim: usize) -> bool {
        false
    }
    pub fn set_dense128(&mut self, _on: bool) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
    #[doc(hidden)]
    pub fn download_group_union(
        &self,
        _d: &DeviceIndex,
        _group: usize,
    ) -> Result<Option<(Vec<u32>, Vec<u32>)>> {
        Err(Error::CudaNotCompiled)
    }
    pub fn forward(
        &self,
        _shape: &AttnShape,
        _q: &DeviceBuffer<u16>,
        _k: &DeviceBuffer<u16>,
        _v: &DeviceBuffer<u16>,
        _keys: Keys<'_>,
        _out: &mut DeviceBuffer<u16>,
    ) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
    pub fn time_ms(&self, _f: impl FnOnce() -> Result<()>) -> Result<f32> {
        Err(Error::CudaNotCompiled)
    }
    pub fn synchronize(&self) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
    /// # Safety
    /// As with the `cuda` feature (no `SparsePrefill` exists without it).
    pub unsafe fn wrap_device_ptr<T>(&self, _ptr: u64, _len: usize) -> ForeignBuffer<T> {
        ForeignBuffer {
            buf: DeviceBuffer { _t: PhantomData },
        }
    }
}

/// `0` turns off `PlanPrefill::set_dense_when_faster` at `new` (as with the feature).
pub const DENSE_WHEN_FASTER_ENV: &str = "ATTNPLAN_DENSE_WHEN_FASTER";

/// A plan run on the GPU; [`PlanPrefill::new`] returns [`Error::CudaNotCompiled`].
#[derive(Debug)]
pub struct PlanPrefill {
    plan: schemas::Plan,
}

impl PlanPrefill {
    pub fn new(
        _sp: &SparsePrefill,
        _plan: &schemas::Plan,
        _model: &schemas::ModelInfo,
        _options: crate::PrefillOptions,
    ) -> Result<Self> {
        Err(Error::CudaNotCompiled)
    }
    pub fn plan(&self) -> &schemas::Plan {
        &self.plan
    }
    pub fn last_index(&self) -> Option<&DeviceIndex> {
        None
    }
    pub fn set_timing(&mut self, _on: bool) {}
    pub fn set_dense_when_faster(&mut self, _on: bool) {}
    pub fn dense_below(&self) -> u64 {
        self.plan.defaults.dense_below
    }
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        _sp: &SparsePrefill,
        _layer: usize,
        _shape: &AttnShape,
        _q: &DeviceBuffer<u16>,
        _k: &DeviceBuffer<u16>,
        _v: &DeviceBuffer<u16>,
        _out: &mut DeviceBuffer<u16>,
    ) -> Result<LayerStats> {
        Err(Error::CudaNotCompiled)
    }
    pub fn forward_host(
        &mut self,
        _sp: &SparsePrefill,
        _layer: usize,
        _input: &crate::AttentionInput<'_>,
        _out: &mut [f32],
    ) -> Result<LayerStats> {
        Err(Error::CudaNotCompiled)
    }
}

/// GPU token-select index building; [`TokenSelectBuilder::new`] returns [`Error::CudaNotCompiled`].
#[derive(Debug)]
pub struct TokenSelectBuilder {
    _never: (),
}

impl TokenSelectBuilder {
    pub fn new(_sp: &SparsePrefill, _shape: &AttnShape) -> Result<Self> {
        Err(Error::CudaNotCompiled)
    }
    pub fn selected(&self, _sp: &SparsePrefill) -> Result<Vec<u32>> {
        Err(Error::CudaNotCompiled)
    }
    pub fn build_heads(
        &mut self,
        _sp: &SparsePrefill,
        _scores: &VerticalSlashBuilder,
        _choices: &[Option<TokenChoice>],
        _out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
}

/// GPU block-sparse index building; [`BlockSparseBuilder::new`] returns
/// [`Error::CudaNotCompiled`].
#[derive(Debug)]
pub struct BlockSparseBuilder {
    _never: (),
}

impl BlockSparseBuilder {
    pub fn new(_sp: &SparsePrefill, _shape: &AttnShape, _ctx: &PatternContext) -> Result<Self> {
        Err(Error::CudaNotCompiled)
    }
    pub fn build(
        &mut self,
        _sp: &SparsePrefill,
        _q: &DeviceBuffer<u16>,
        _k: &DeviceBuffer<u16>,
        _choices: &[BlockChoice],
        _out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
    pub fn build_heads(
        &mut self,
        _sp: &SparsePrefill,
        _q: &DeviceBuffer<u16>,
        _k: &DeviceBuffer<u16>,
        _choices: &[Option<BlockChoice>],
        _out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
}

/// GPU vertical-slash index building; [`VerticalSlashBuilder::new`] returns
/// [`Error::CudaNotCompiled`].
#[derive(Debug)]
pub struct VerticalSlashBuilder {
    shape: AttnShape,
}

impl VerticalSlashBuilder {
    pub fn shape(&self) -> &AttnShape {
        &self.shape
    }
    pub fn new(_sp: &SparsePrefill, _shape: &AttnShape, _ctx: &PatternContext) -> Result<Self> {
        Err(Error::CudaNotCompiled)
    }
    pub fn estimate(
        &mut self,
        _sp: &SparsePrefill,
        _q: &DeviceBuffer<u16>,
        _k: &DeviceBuffer<u16>,
    ) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
    pub fn estimate_heads(
        &mut self,
        _sp: &SparsePrefill,
        _q: &DeviceBuffer<u16>,
        _k: &DeviceBuffer<u16>,
        _heads: &[u32],
    ) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
    pub fn select(
        &mut self,
        _sp: &SparsePrefill,
        _budgets: &[(usize, usize)],
        _out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
    pub fn build(
        &mut self,
        _sp: &SparsePrefill,
        _q: &DeviceBuffer<u16>,
        _k: &DeviceBuffer<u16>,
        _budgets: &[(usize, usize)],
        _out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        Err(Error::CudaNotCompiled)
    }
    pub fn scores(&self, _sp: &SparsePrefill) -> Result<(Vec<f32>, Vec<f32>)> {
        Err(Error::CudaNotCompiled)
    }
    pub fn selection(&self, _sp: &SparsePrefill) -> Result<(Vec<u32>, Vec<u32>)> {
        Err(Error::CudaNotCompiled)
    }
}
