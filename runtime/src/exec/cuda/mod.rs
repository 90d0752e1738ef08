//! CUDA executor (feature `cuda`): sparse causal flash attention over the [`HeadIndex`] form, and GPU
//! index building for vertical-slash, block-sparse and token-select. Kernels are the `.cu` files of
//! `runtime/kernels/`, embedded and compiled with NVRTC at first use (`compute_90a`, override with
//! [`device::ARCH_ENV`]), cached per device; libcuda and libnvrtc are opened at run time, so building
//! needs no CUDA toolkit. Without the feature, `exec/cuda_disabled.rs` offers the same API, returning
//! [`Error::CudaNotCompiled`].
//!
//! Main types:
//! - [`SparsePrefill`]: a device with its compiled kernels; [`SparsePrefill::forward`] computes one
//!   layer's attention for all heads in one launch, over a [`DeviceIndex`] or densely ([`Keys`]).
//! - [`DeviceIndex`]: a layer's per-head indexes on the device ([`FlatIndex`] layout: per (head, query
//!   block) CSR offsets into key blocks and gathered columns).
//! - [`VerticalSlashBuilder`]: estimation, top-k and list building on the GPU, one launch per stage for
//!   all heads, per-head budgets; same selection as [`crate::pattern::vertical_slash`].
//! - [`TokenSelectBuilder`]: per-chunk top tokens from a vertical-slash estimate's vertical scores,
//!   plus A-shape blocks ([`TokenChoice`]); same selection as [`crate::pattern::token_select`].
//! - [`PlanPrefill`]: a plan run layer by layer, each head's index from its pattern.
//! - [`BlockSparseBuilder`]: pooled estimate, per-head `top_k` or `coverage` selection
//!   ([`BlockChoice`]) and list building on the GPU; same selection as
//!   [`crate::pattern::block_sparse`].
//! - [`DeviceBuffer`]: a typed device allocation; bf16 tensors are `DeviceBuffer<u16>` (raw bits).
//!   [`ForeignBuffer`] ([`SparsePrefill::wrap_device_ptr`]): memory another framework owns, by address.
//! - [`bench`](mod@bench): the benchmark of docs/perf.md ([`bench::measure`] gives a
//!   [`bench::BenchResult`] per length), shared by `attnplan bench --device cuda` and `cuda_bench`.
//!
//! Shapes follow [`AttnShape`]: Q and O `[q_heads, seq_len, head_dim]`, K and V
//! `[kv_heads, seq_len, head_dim]`, bf16, head_dim 64 or 128, blocks of 64 queries and 64 keys.

pub mod bench;
mod block_sparse;
pub mod device;
mod flat;
mod gpu_threshold;
mod layer_stats;
mod plan;
pub mod plan_bench;
mod query_adaptive;
mod token_select;
mod vertical_slash;

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

pub use block_sparse::BlockSparseBuilder;
pub use device::{Device, KernelFile};
pub use flat::{BlockChoice, FlatIndex, TokenChoice, CUDA_BLOCK};
pub use gpu_threshold::{
    gpu_dense_below, sparse_attention_pays, sparse_tile_cost, GPU_SPARSE_MIN_DENSE_MS,
};
pub use plan::{LayerStats, PlanPrefill, DENSE_WHEN_FASTER_ENV};
pub use token_select::TokenSelectBuilder;
pub use vertical_slash::VerticalSlashBuilder;

use crate::error::{Error, Result};
use crate::pattern::HeadIndex;
use crate::AttnShape;
use device::drv;

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

/// A typed allocation on the device of a [`SparsePrefill`].
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    pub(crate) inner: CudaSlice<T>,
}

impl<T> DeviceBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// The raw device address (`CUdeviceptr`), e.g. to hand an output to another framework. The
    /// buffer's work is queued on its [`SparsePrefill`]'s stream: wait with
    /// [`SparsePrefill::synchronize`] before another stream reads it.
    pub fn device_ptr(&self) -> u64 {
        // event tracking is off on this device, so the guard does nothing
        let (ptr, _sync) = self.inner.device_ptr(self.inner.stream());
        ptr
    }
}

/// Device memory the engine owns (a candle CUDA tensor's storage, a PyTorch tensor's `data_ptr()`, a
/// `cudaMalloc`), usable wherever a [`DeviceBuffer`] is read or written
/// ([`SparsePrefill::wrap_device_ptr`]). Dropping it frees nothing.
#[derive(Debug)]
pub struct ForeignBuffer<T> {
    buf: std::mem::ManuallyDrop<DeviceBuffer<T>>,
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

impl<T> Drop for ForeignBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: `buf` is not used after this; `leak` gives the allocation back to its owner
        // without freeing it.
        let buf = unsafe { std::mem::ManuallyDrop::take(&mut self.buf) };
        let _ = buf.inner.leak();
    }
}

/// A layer's per-head indexes on the device, in the [`FlatIndex`] layout.
#[derive(Debug)]
pub struct DeviceIndex {
    pub q_heads: usize,
    pub seq_len: usize,
    pub q_blocks: usize,
    pub(crate) blk_off: CudaSlice<u32>,
    pub(crate) blk_idx: CudaSlice<u32>,
    pub(crate) col_off: CudaSlice<u32>,
    pub(crate) col_idx: CudaSlice<u32>,
    /// Entries in use in `blk_idx` and `col_idx` (the buffers may be larger).
    pub(crate) n_blk: usize,
    pub(crate) n_col: usize,
    /// Heads 2p and 2p+1 have identical lists ([`FlatIndex::pairs_share`]): with GQA groups of even
    /// size the head_dim-128 kernel then pairs them in one CTA, sharing every K/V tile.
    pub(crate) pairs_share: bool,
}

impl DeviceIndex {
    /// Key-block and column entries, over all heads.
    pub fn entries(&self) -> (usize, usize) {
        (self.n_blk, self.n_col)
    }
}

/// The key set of every query block: all causal key blocks, or a per-head index.
#[derive(Debug, Clone, Copy)]
pub enum Keys<'a> {
    Dense,
    Index(&'a DeviceIndex),
}

/// Environment variable choosing the attention kernel where the build has wgmma (sm_90a, the default):
/// unset = `attn_fwd_ws3_d128` / `attn_fwd_ws3_d64` (warp-specialized, three query blocks per CTA;
/// since the nineteenth session at head_dim 128 too); `ws2` = `attn_fwd_ws_d128` / `attn_fwd_ws_d64`
/// (two query blocks per CTA; head pairs of a KV group that share indexes only here); `wg3` =
/// the pipelined one-warpgroup `attn_fwd_wg3_d128` (head_dim 64 then runs on mma.sync); `wg1` = the
/// unpipelined `attn_fwd_wg_d128`; `mma` = mma.sync for both; `wg64` = the unpipelined wgmma
/// head_dim-64 kernel `attn_fwd_wg_d64` (wrong on the H200, 2026-11-28).
pub const ATTN_ENV: &str = "ATTNPLAN_ATTN";

/// Environment variable that, set to `0`, runs dense attention on the warp-specialized kernels'
/// 64-key tiles instead of `attn_fwd_wsk_d128` / `attn_fwd_wsk3_d64` (128-key tiles, Q in shared
/// memory; docs/cuda.md, "Dense attention over 128-key tiles"); `1` or unset keeps them, another
/// value is refused. Read by [`SparsePrefill::new`].
pub const DENSE128_ENV: &str = "ATTNPLAN_DENSE128";

/// Dynamic shared memory of `attn_fwd_wsk*` (head_dim `d`, `consumers` query blocks per CTA,
/// `stages` K/V stages of 128 keys): the Q tiles, the stages, 2 x `stages` mbarriers and 1024
/// alignment bytes.
fn wsk_smem(d: usize, consumers: usize, stages: usize) -> u32 {
    (consumers * 64 * d * 2 + stages * 2 * 128 * d * 2 + 2 * stages * 8 + 1024) as u32
}

/// Environment variable that, set to `0`, keeps the two-consumer kernels (`ATTNPLAN_ATTN=ws2`) from
/// pairing the heads of a KV group that share their indexes (they then pair neighbouring query
/// blocks, as for other indexes; the default three-consumer kernels never pair heads).
/// Read by [`SparsePrefill::new`], which refuses values other than `0` and `1`.
pub const PAIR_ENV: &str = "ATTNPLAN_PAIR_HEADS";

/// Environment variable that, set to `0`, keeps the warp-specialized kernels from loading the column
/// tiles of a CTA's query blocks as one union list (`ix_group_union`; each block's own list is then
/// loaded separately). Read by [`SparsePrefill::new`], which refuses values other than `0` and `1`.
pub const UNION_ENV: &str = "ATTNPLAN_UNION_COLS";

/// Environment variable choosing the CTA order of the warp-specialized kernels' indexed runs:
/// `interleave` = the heaviest query-block groups of all heads first (as dense runs), `head` =
/// head-major, each head's heaviest group first; unset = interleaved when the layer's K and V fit in
/// [`INTERLEAVE_KV_BYTES`], head-major otherwise; another value is refused. Read by
/// [`SparsePrefill::new`].
pub const HEAD_ORDER_ENV: &str = "ATTNPLAN_HEAD_ORDER";

/// K and V bytes of a layer up to which its indexed runs interleave the heads' CTAs. Head-major order
/// keeps a head's K/V hot in L2 while its neighbouring query blocks, which share most key blocks, run;
/// once a layer's K and V fit in L2 (50 MB on the H200) that is moot, and interleaving the heads
/// shortens the tail that heads of very different weight leave (SmolLM2's plan: its attention 9.5%
/// faster at 16K, 3.5% at 32K, where K and V are 12.6 and 25 MB; level at 64K; the 32 x 8 x 128
/// benchmark layer at 32K, 134 MB, 3% slower interleaved; docs/perf.md, "Eighteenth session").
pub const INTERLEAVE_KV_BYTES: usize = 32 << 20;

/// Environment variable choosing when the warp-specialized kernels read a tile schedule written before
/// the launch (`ws_schedule*` in attention.cu) instead of merging their query blocks' lists in line
/// (sparse runs only): unset = the three-consumer kernels (both head dims) from [`SCHEDULE_FROM`]
/// tokens on; `3` = those kernels at any length; `all` = every warp-specialized kernel at any length;
/// `0` = never. Read by [`SparsePrefill::new`].
pub const SCHEDULE_ENV: &str = "ATTNPLAN_WS_SCHEDULE";

/// Sequence length from which the three-consumer kernels read a precomputed schedule by default. The
/// schedule frees its producer from the merge, which pays where the query blocks of a CTA share few
/// key blocks (scattered diagonals: the 9 x 3 x 64 benchmark layer 8-10% faster at 64K-128K on the
/// H200, the 32 x 8 x 128 one 0-3% at 128K, docs/perf.md "Nineteenth session"); but the pre-pass
/// merges each group serially before the attention launch, and where the producer kept up
/// (SmolLM2's plan, whose layers share more) it only costs: that plan's pass was 5% slower at 16K,
/// 3.5% at 32K, 1% at 64K, and level (0.2-1.1% faster) at 128K (docs/perf.md, "Fourteenth
/// session"; docs/cuda.md, "Tile schedules").
pub const SCHEDULE_FROM: usize = 131_072;

/// Dynamic shared memory of the attention kernel: Q, 2 K and 2 V tiles of 64 rows, 2 x 64 positions
/// (callers add 1024 bytes so the wgmma kernels can align their tiles to 1024).
fn attn_smem(head_dim: usize) -> u32 {
    (5 * 64 * head_dim * 2 + 2 * 64 * 4) as u32
}

/// Dynamic shared memory of the warp-specialized kernels (`attn_fwd_ws*` in attention.cu) with
/// `consumers` query blocks per CTA (a consumer warpgroup each, plus the producer) and `stages` K/V
/// stages: the stages (with two consumers the Q tiles pass through the last, with three they have
/// their own), a 1 KB tile of ones (the row sums by MMA), positions (per stage one list per
/// consumer), tags, 2 x stages + 1 mbarriers, and 1024 alignment bytes.
fn ws_smem(head_dim: usize, consumers: usize, stages: usize) -> u32 {
    let q_tiles = if consumers == 2 { 0 } else { consumers };
    ((2 * stages + q_tiles) * 64 * head_dim * 2
        + 1024
        + consumers * stages * 64 * 4
        + stages * 8
        + (2 * stages + 1) * 8
        + 1024) as u32
}

/// Entries of the schedule buffer for an index of `n_blk` key-block and `n_col` column entries over
/// `entries` = q_heads x q_blocks lists: every group's space from `sched_base` in attention.cu
/// (`blk_off[e0] + col_off[e0] / 64 + 3 e0`) and the producer's read-ahead of up to 64 entries past
/// its group's END.
fn sched_len(n_blk: usize, n_col: usize, entries: usize) -> usize {
    n_blk + n_col / CUDA_BLOCK + 3 * entries + 96
}

/// The schedule pre-pass for a warp-specialized kernel's groups of query blocks.
fn schedule_function(dev: &Device, k: &AttnKernel) -> Result<CudaFunction> {
    let pre = match (k.blocks_per_cta, k.name) {
        (3, "attn_fwd_ws3_d128") => "ws_schedule3_ns5",
        (3, _) => "ws_schedule3",
        _ => "ws_schedule2",
    };
    dev.function(KernelFile::Attention, pre, 0)
}

/// The 128-key-tile kernel for the dense runs of warp-specialized kernel `k` (`attn_fwd_wsk_d128`
/// for `attn_fwd_ws_d128` and `attn_fwd_ws3_d128`, `attn_fwd_wsk3_d64` for `attn_fwd_ws3_d64`; none
/// for the others) and its launch shape.
fn dense128_function(dev: &Device, k: &AttnKernel) -> Result<Option<Dense128>> {
    let (name, smem, threads, blocks_per_cta) = match k.name {
        "attn_fwd_ws_d128" | "attn_fwd_ws3_d128" => {
            ("attn_fwd_wsk_d128", wsk_smem(128, 2, 3), 384, 2)
        }
        "attn_fwd_ws3_d64" => ("attn_fwd_wsk3_d64", wsk_smem(64, 3, 6), 512, 3),
        _ => return Ok(None),
    };
    Ok(Some(Dense128 {
        f: dev.function(KernelFile::Attention, name, smem)?,
        smem,
        threads,
        blocks_per_cta,
    }))
}

/// A 128-key-tile dense kernel ([`dense128_function`]): the warp-specialized kernels' parameters,
/// its own CTA shape.
#[derive(Debug)]
struct Dense128 {
    f: CudaFunction,
    /// Dynamic shared memory per CTA.
    smem: u32,
    /// Threads per CTA.
    threads: u32,
    /// Query blocks (of 64 rows) per CTA.
    blocks_per_cta: usize,
}

/// One compiled attention kernel and how it is launched.
#[derive(Debug)]
struct AttnKernel {
    f: CudaFunction,
    name: &'static str,
    /// Dynamic shared memory per CTA.
    smem: u32,
    /// Threads per CTA.
    threads: u32,
    /// Query blocks (of 64 rows) per CTA.
    blocks_per_cta: usize,
    /// `attn_fwd_ws*`: takes seven parameters after the common ones (TMA tensor maps of K and V,
    /// whether to pair the heads of a KV group, the union column lists, the tile schedule).
    tma: bool,
    /// `attn_fwd_ws*`: the variant whose producer merges the query blocks' lists itself
    /// (`<name>_merge`), for sparse runs without a schedule; `f` runs dense ones and sparse ones
    /// over a schedule.
    merge: Option<CudaFunction>,
    /// For sparse runs ([`SCHEDULE_ENV`]): the pre-pass writing the tile order (`ws_schedule2`,
    /// `ws_schedule3` or, for the five-stage `attn_fwd_ws3_d128`, `ws_schedule3_ns5`) and the length
    /// from which it runs.
    schedule: Option<(CudaFunction, usize)>,
    /// For dense runs (unless [`DENSE128_ENV`] is `0`): the 128-key-tile kernel of this head_dim
    /// (`attn_fwd_wsk_d128`, `attn_fwd_wsk3_d64`; the same parameters) and its launch shape.
    dense128: Option<Dense128>,
}

/// A `CUtensorMap` passed by value as a kernel parameter (`TmaDesc` in wgmma.cuh).
#[repr(transparent)]
#[derive(Clone, Copy)]
struct TensorMap(cudarc::driver::sys::CUtensorMap);

// SAFETY: a plain 128-byte struct of integers, copied to the kernel's parameter space as it is.
unsafe impl DeviceRepr for TensorMap {}

/// The on/off environment switch `name`: unset or `1` on, `0` off; another value is refused
/// ([`Error::CudaUnsupported`] naming the variable).
pub(crate) fn env_switch(name: &str) -> Result<bool> {
    match std::env::var(name).unwrap_or_default().as_str() {
        "" | "1" => Ok(true),
        "0" => Ok(false),
        other => Err(Error::CudaUnsupported(format!(
            "{name}={other}: expected 0 or 1 (or unset)"
        ))),
    }
}

/// A CUDA device with the compiled attention and index-building kernels.
#[derive(Debug)]
pub struct SparsePrefill {
    pub(crate) dev: Device,
    /// Attention kernels for head_dim 64 and 128.
    attn: [AttnKernel; 2],
    /// One-element buffer passed as the index of the dense case (never read).
    dummy: CudaSlice<u32>,
    /// Whether indexes shared by head pairs may pair the heads in one CTA ([`PAIR_ENV`], read once).
    pair_heads: bool,
    /// Indexed runs' CTA order forced by [`HEAD_ORDER_ENV`] (interleaved or not), or `None` for the
    /// rule of [`INTERLEAVE_KV_BYTES`].
    head_order: Option<bool>,
    /// `ix_group_union`, when the warp-specialized kernels load their query blocks' columns as one
    /// list ([`UNION_ENV`], read once).
    group_union: Option<CudaFunction>,
    /// The union lists and their lengths, kept between calls and grown as needed (a fresh
    /// stream-ordered allocation per call cost more than the union saved: the pool returns freed
    /// memory at every synchronization).
    union_bufs: Mutex<UnionBufs>,
}

/// [`SparsePrefill::group_union`]'s buffers: the union lists, their lengths (one per group), and
/// for groups of three the scratch lists of the merge path; and the tile schedules of
/// [`SparsePrefill::schedule`].
#[derive(Debug, Default)]
struct UnionBufs {
    idx: Option<CudaSlice<u32>>,
    len: Option<CudaSlice<u32>>,
    pass: Option<CudaSlice<u32>>,
    /// The tile schedules ([`SparsePrefill::schedule`]).
    sched: Option<CudaSlice<u32>>,
}

impl UnionBufs {
    /// Makes `slot` hold at least `need` entries. Buffers only grow (by half at least); a smaller
    /// one is freed first, so that the pool can reuse its memory.
    fn grow(s: &Arc<CudaStream>, slot: &mut Option<CudaSlice<u32>>, need: usize) -> Result<()> {
        let have = slot.as_ref().map_or(0, CudaSlice::len);
        if have < need {
            *slot = None;
            *slot = Some(drv(
                "alloc",
                s.alloc_zeros::<u32>(need.max(have + have / 2)),
            )?);
        }
        Ok(())
    }
}

impl SparsePrefill {
    /// Opens device `ordinal` and compiles the kernels (NVRTC, cached per device).
    ///
    /// Errors: [`Error::CudaUnavailable`] without a driver or device, [`Error::CudaCompile`] with NVRTC's
    /// log, [`Error::Cuda`] for other driver errors.
    pub fn new(ordinal: usize) -> Result<Self> {
        let dev = Device::new(ordinal)?;
        for f in KernelFile::ALL {
            dev.module(f)?;
        }
        // wgmma kernels exist only in sm_90a builds, so each choice falls back to the next; ATTN_ENV
        // picks among them.
        let choice = std::env::var(ATTN_ENV).unwrap_or_default();
        let want_mma = choice == "mma";
        let kernel = |name: &'static str, smem: u32, threads: u32, blocks_per_cta: usize| {
            dev.function(KernelFile::Attention, name, smem)
                .map(|f| AttnKernel {
                    f,
                    name,
                    smem,
                    threads,
                    blocks_per_cta,
                    tma: name.starts_with("attn_fwd_ws"),
                    merge: None,
                    schedule: None,
                    dense128: None,
                })
                .and_then(|mut k| {
                    if k.tma {
                        let merge = format!("{name}_merge");
                        k.merge = Some(dev.function(KernelFile::Attention, &merge, smem)?);
                    }
                    Ok(k)
                })
        };
        let pick = |d: usize| -> Result<AttnKernel> {
            // attn_fwd_wg_d64 gave wrong results on the H200 (2026-11-28, see docs/cuda.md): head_dim
            // 64 stays on mma.sync unless ATTN_ENV=wg64 asks for it.
            let (ws, wg, mma) = if d == 64 {
                ("attn_fwd_ws_d64", "attn_fwd_wg_d64", "attn_fwd_d64")
            } else {
                ("attn_fwd_ws_d128", "attn_fwd_wg_d128", "attn_fwd_d128")
            };
            let (wg1, wg3, wg64) = (choice == "wg1", choice == "wg3", choice == "wg64");
            let other = want_mma || wg1 || wg3 || (wg64 && d == 64);
            // warp-specialized: three consumers (11 stages) at head_dim 64, two (6 stages) otherwise
            if !other && d == 64 && choice != "ws2" {
                if let Ok(k) = kernel("attn_fwd_ws3_d64", ws_smem(d, 3, 11), 512, 3) {
                    return Ok(k);
                }
            }
            // three consumers at head_dim 128 too (Q in shared memory, 5 stages)
            if !other && d == 128 && choice != "ws2" {
                if let Ok(k) = kernel("attn_fwd_ws3_d128", ws_smem(d, 3, 5), 512, 3) {
                    return Ok(k);
                }
            }
            if !other {
                if let Ok(k) = kernel(ws, ws_smem(d, 2, 6), 384, 2) {
                    return Ok(k);
                }
            }
            if d == 128 && !want_mma && !wg1 {
                // pipelined one-warpgroup variant: 6 tiles + 3 x 64 positions + alignment
                let smem = (6 * 64 * 128 * 2 + 3 * 64 * 4 + 1024) as u32;
                if let Ok(k) = kernel("attn_fwd_wg3_d128", smem, 128, 1) {
                    return Ok(k);
                }
            }
            if !want_mma && (d == 128 || wg64) {
                if let Ok(k) = kernel(wg, attn_smem(d) + 1024, 128, 1) {
                    return Ok(k);
                }
            }
            kernel(mma, attn_smem(d) + 1024, 128, 1)
        };
        let mut attn = [pick(64)?, pick(128)?];
        let schedule = std::env::var(SCHEDULE_ENV).unwrap_or_default();
        if !["", "0", "3", "all"].contains(&schedule.as_str()) {
            return Err(Error::CudaUnsupported(format!(
                "{SCHEDULE_ENV}={schedule}: expected 0, 3 or all (or unset)"
            )));
        }
        for k in &mut attn {
            let three = k.tma && k.blocks_per_cta == 3;
            let from = match schedule.as_str() {
                "all" if k.tma => Some(0),
                "3" if three => Some(0),
                "" if three => Some(SCHEDULE_FROM),
                _ => None,
            };
            if let Some(from) = from {
                k.schedule = Some((schedule_function(&dev, k)?, from));
            }
        }
        let dummy = drv("alloc", dev.stream.alloc_zeros::<u32>(1))?;
        let pair_heads = env_switch(PAIR_ENV)?;
        let head_order = match std::env::var(HEAD_ORDER_ENV).unwrap_or_default().as_str() {
            "" => None,
            "interleave" => Some(true),
            "head" => Some(false),
            other => {
                return Err(Error::CudaUnsupported(format!(
                    "{HEAD_ORDER_ENV}={other}: expected interleave or head (or unset)"
                )))
            }
        };
        let group_union = if env_switch(UNION_ENV)? {
            Some(dev.function(KernelFile::VerticalSlash, "ix_group_union", 0)?)
        } else {
            None
        };
        let mut sp = Self {
            dev,
            attn,
            dummy,
            pair_heads,
            head_order,
            group_union,
            union_bufs: Mutex::new(UnionBufs::default()),
        };
        sp.set_dense128(env_switch(DENSE128_ENV)?)?;
        Ok(sp)
    }

    /// From which sequence length the warp-specialized kernels read a tile schedule written before
    /// their launch, on sparse runs: `None` never, `Some(n)` from `n` tokens on (every
    /// warp-specialized kernel). [`SparsePrefill::new`] sets it from [`SCHEDULE_ENV`] (by default the
    /// three-consumer kernels from [`SCHEDULE_FROM`]). Same results either way: the schedule is the
    /// order the kernel would merge in line.
    pub fn set_schedule_from(&mut self, from: Option<usize>) -> Result<()> {
        for k in &mut self.attn {
            if !k.tma {
                continue;
            }
            k.schedule = match (from, k.schedule.take()) {
                (None, _) => None,
                (Some(f), Some((pre, _))) => Some((pre, f)),
                (Some(f), None) => Some((schedule_function(&self.dev, k)?, f)),
            };
        }
        Ok(())
    }

    /// Whether dense runs take the 128-key-tile kernels (`attn_fwd_wsk*`, where the warp-specialized
    /// kernel of that head_dim was chosen) or the warp-specialized kernels' 64-key tiles.
    /// [`SparsePrefill::new`] turns them on unless [`DENSE128_ENV`] is `0`. The two compute the same
    /// cells in a different order (results within rounding of each other).
    pub fn set_dense128(&mut self, on: bool) -> Result<()> {
        for k in &mut self.attn {
            k.dense128 = if on {
                dense128_function(&self.dev, k)?
            } else {
                None
            };
        }
        Ok(())
    }

    /// Whether dense runs at `head_dim` take the 128-key-tile kernel ([`SparsePrefill::set_dense128`]).
    pub fn dense128(&self, head_dim: usize) -> bool {
        self.attn[usize::from(head_dim != 64)].dense128.is_some()
    }

    /// The device (name, stream, module cache).
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Resource use of each attention kernel: `(name, registers, static shared bytes, local bytes)`.
    pub fn kernel_resources(&self) -> Result<Vec<(String, i32, i32, i32)>> {
        self.attn
            .iter()
            .map(|k| {
                Ok((
                    k.name.to_string(),
                    drv("regs", k.f.num_regs())?,
                    drv("smem", k.f.shared_size_bytes())?,
                    drv("local", k.f.local_size_bytes())?,
                ))
            })
            .collect()
    }

    /// Waits for everything queued on this executor's stream (our kernels and copies).
    pub fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    /// `len` elements of `T` at device address `ptr`, owned by someone else (e.g. the engine's
    /// framework), as a buffer [`SparsePrefill::forward`] and [`PlanPrefill::forward`] take; bf16
    /// tensors are `T = u16`. This executor runs on its own (non-blocking) stream: the engine must have
    /// finished writing the inputs before the call that reads them (e.g. synchronize its stream) and
    /// must call [`SparsePrefill::synchronize`] before it reads an output.
    ///
    /// # Safety
    /// `ptr` must be an allocation of this device's primary context (the one cudarc, candle, PyTorch
    /// and the CUDA runtime use) holding at least `len` elements of `T`, and it must stay allocated,
    /// and untouched by other streams while this executor's work on it is queued, for as long as the
    /// returned buffer lives.
    pub unsafe fn wrap_device_ptr<T>(&self, ptr: u64, len: usize) -> ForeignBuffer<T> {
        ForeignBuffer {
            // SAFETY: the caller vouches for the allocation; `ForeignBuffer` never frees it.
            buf: std::mem::ManuallyDrop::new(DeviceBuffer {
                inner: unsafe { self.dev.stream.upgrade_device_ptr::<T>(ptr, len) },
            }),
        }
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let inner = drv("cuMemcpyHtoD", self.dev.stream.clone_htod(host))?;
        Ok(DeviceBuffer { inner })
    }

    /// Rounds `host` to bf16 and copies it to a new device buffer.
    pub fn upload_bf16(&self, host: &[f32]) -> Result<DeviceBuffer<u16>> {
        let bits: Vec<u16> = host.iter().map(|&x| bf16_bits(x)).collect();
        self.upload(&bits)
    }

    /// A zeroed device buffer of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let inner = drv("cuMemAlloc", self.dev.stream.alloc_zeros::<T>(len))?;
        Ok(DeviceBuffer { inner })
    }

    /// Overwrites `buf` with copies of `value` (e.g. a NaN pattern before a run).
    pub fn fill<T: DeviceRepr + Copy>(&self, buf: &mut DeviceBuffer<T>, value: T) -> Result<()> {
        let host = vec![value; buf.len()];
        drv(
            "cuMemcpyHtoD",
            self.dev.stream.memcpy_htod(&host, &mut buf.inner),
        )
    }

    /// Copies `buf` back to the host (waits for queued work).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        buf: &DeviceBuffer<T>,
    ) -> Result<Vec<T>> {
        drv("cuMemcpyDtoH", self.dev.stream.clone_dtoh(&buf.inner))
    }

    /// Uploads one [`HeadIndex`] per query head (64-token blocks, `seq_len` tokens).
    pub fn upload_index(&self, seq_len: usize, heads: &[HeadIndex]) -> Result<DeviceIndex> {
        self.upload_flat(&FlatIndex::from_heads(seq_len, heads)?)
    }

    /// Uploads a flattened index after [`FlatIndex::check`] (the kernels trust the lists).
    pub fn upload_flat(&self, f: &FlatIndex) -> Result<DeviceIndex> {
        f.check()?;
        let nonempty = |v: &Vec<u32>| if v.is_empty() { vec![0] } else { v.clone() };
        let s = &self.dev.stream;
        Ok(DeviceIndex {
            q_heads: f.q_heads,
            seq_len: f.seq_len,
            q_blocks: f.q_blocks,
            blk_off: drv("upload", s.clone_htod(&f.blk_off))?,
            blk_idx: drv("upload", s.clone_htod(&nonempty(&f.blk_idx)))?,
            col_off: drv("upload", s.clone_htod(&f.col_off))?,
            col_idx: drv("upload", s.clone_htod(&nonempty(&f.col_idx)))?,
            n_blk: f.blk_idx.len(),
            n_col: f.col_idx.len(),
            pairs_share: f.pairs_share(),
        })
    }

    /// Copies an index back to the host.
    pub fn download_index(&self, d: &DeviceIndex) -> Result<FlatIndex> {
        let s = &self.dev.stream;
        let mut blk_idx = drv("download", s.clone_dtoh(&d.blk_idx))?;
        let mut col_idx = drv("download", s.clone_dtoh(&d.col_idx))?;
        blk_idx.truncate(d.n_blk);
        col_idx.truncate(d.n_col);
        Ok(FlatIndex {
            q_heads: d.q_heads,
            seq_len: d.seq_len,
            q_blocks: d.q_blocks,
            blk_off: drv("download", s.clone_dtoh(&d.blk_off))?,
            blk_idx,
            col_off: drv("download", s.clone_dtoh(&d.col_off))?,
            col_idx,
        })
    }

    /// Causal attention of one layer, all heads in one launch: `out = softmax(q k^T / sqrt(d)) v` over
    /// the cells of `keys` (bf16 in and out, f32 accumulation). Query head `h` reads KV head
    /// `h / (q_heads / kv_heads)`. Asynchronous: call [`Device::synchronize`] or download to wait.
    pub fn forward(
        &self,
        shape: &AttnShape,
        q: &DeviceBuffer<u16>,
        k: &DeviceBuffer<u16>,
        v: &DeviceBuffer<u16>,
        keys: Keys<'_>,
        out: &mut DeviceBuffer<u16>,
    ) -> Result<()> {
        check_qkv(shape, q, k, v)?;
        if out.len() != q.len() {
            return Err(Error::Shape(format!(
                "output has {} elements, Q has {}",
                out.len(),
                q.len()
            )));
        }
        let n = shape.seq_len;
        if n == 0 {
            return Ok(());
        }
        let q_blocks = n.div_ceil(CUDA_BLOCK);
        let (index, dense) = match keys {
            Keys::Dense => (None, 1i32),
            Keys::Index(ix) => {
                if ix.q_heads != shape.q_heads || ix.seq_len != n {
                    return Err(Error::Shape(format!(
                        "index for {} heads x {} tokens, shape {shape:?}",
                        ix.q_heads, ix.seq_len
                    )));
                }
                (Some(ix), 0i32)
            }
        };
        let kernel = &self.attn[usize::from(shape.head_dim != 64)];
        // heads of one KV group with identical indexes share their K/V tiles (two-consumer ws kernels)
        let pair_heads = self.pair_heads
            && kernel.tma
            && kernel.blocks_per_cta == 2
            && index.is_some_and(|ix| ix.pairs_share)
            && shape.group() % 2 == 0;
        // dense runs take 128-key tiles (the same parameters; their own CTA shape)
        let dense128 = kernel.dense128.as_ref().filter(|_| index.is_none());
        let (threads, blocks_per_cta, smem) = match dense128 {
            Some(d) => (d.threads, d.blocks_per_cta, d.smem),
            None => (kernel.threads, kernel.blocks_per_cta, kernel.smem),
        };
        let grid = if pair_heads {
            grid_u32(q_blocks * (shape.q_heads / 2))?
        } else {
            grid_u32(q_blocks.div_ceil(blocks_per_cta) * shape.q_heads)?
        };
        let pair_i = i32::from(pair_heads);
        let (n_i, heads_i, group_i) = (n as i32, shape.q_heads as i32, shape.group() as i32);
        let scale_log2 = std::f32::consts::LOG2_E / (shape.head_dim as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        let (bo, bi, co, ci) = match index {
            Some(ix) => (&ix.blk_off, &ix.blk_idx, &ix.col_off, &ix.col_idx),
            None => (&self.dummy, &self.dummy, &self.dummy, &self.dummy),
        };
        let maps = if kernel.tma {
            Some((self.tensor_map(k, shape)?, self.tensor_map(v, shape)?))
        } else {
            None
        };
        // the warp-specialized kernels load their query blocks' columns once, as their union, and
        // read their tile order from a schedule written before the launch
        let mut bufs = self.lock_union_bufs()?;
        let union = match index {
            Some(ix) if kernel.tma && !pair_heads && ix.n_col > 0 => {
                self.group_union(ix, kernel.blocks_per_cta, &mut bufs)?
            }
            _ => false,
        };
        let scheduled = match (index, &kernel.schedule) {
            (Some(ix), Some((pre, from))) if !pair_heads && n >= *from => {
                self.schedule(ix, pre, kernel.blocks_per_cta, union, &mut bufs)?
            }
            _ => false,
        };
        // sparse runs without a schedule: the variant that merges the lists in line; so do dense
        // runs of the two-consumer kernels, whose dense attention took 1.5% longer at 128K on the
        // other variant (same consumer code; docs/perf.md, "Tile schedules")
        let f = match (dense128, &kernel.merge, index) {
            (Some(d128), _, _) => &d128.f,
            (None, Some(merge), Some(_)) if !scheduled => merge,
            (None, Some(merge), None) if kernel.blocks_per_cta == 2 => merge,
            _ => &kernel.f,
        };
        let use_union = i32::from(union);
        // indexed runs of a layer whose K and V fit in L2: the heads' CTAs interleaved
        let kv_bytes = shape.kv_heads * n * shape.head_dim * 2 * 2;
        let interleave = self.head_order.unwrap_or(kv_bytes <= INTERLEAVE_KV_BYTES);
        let interleave = i32::from(interleave && !pair_heads);
        let dummy = &self.dummy;
        let uci = bufs.idx.as_ref().filter(|_| union).unwrap_or(dummy);
        let ucl = bufs.len.as_ref().filter(|_| union).unwrap_or(dummy);
        let sched = bufs.sched.as_ref().filter(|_| scheduled).unwrap_or(dummy);
        let mut b = self.dev.stream.launch_builder(f);
        b.arg(&q.inner)
            .arg(&k.inner)
            .arg(&v.inner)
            .arg(&mut out.inner)
            .arg(bo)
            .arg(bi)
            .arg(co)
            .arg(ci)
            .arg(&n_i)
            .arg(&heads_i)
            .arg(&group_i)
            .arg(&scale_log2)
            .arg(&dense);
        if let Some((mk, mv)) = &maps {
            b.arg(mk)
                .arg(mv)
                .arg(&pair_i)
                .arg(uci)
                .arg(ucl)
                .arg(&use_union)
                .arg(sched)
                .arg(&interleave);
        }
        // SAFETY: argument order and types match `attn_fwd_d*` in attention.cu (`attn_fwd_wsk*` take
        // the warp-specialized kernels' parameters and read only the dense ones; the tensor maps, the
        // pairing flag, the union lists, the schedule and the CTA-order flag only for the kernels that
        // take them; the maps built for these K and V buffers, the union and the schedule for this
        // index, queued before; the schedule is read only by the non-`_merge` variant on an index,
        // i.e. when `scheduled`, the dummy otherwise); Q/K/V/out lengths were checked against the
        // shape, and the index's offsets were built for this shape (q_heads, seq_len) by `FlatIndex`
        // or `VerticalSlashBuilder`, which only write in-range entries.
        drv("attn_fwd launch", unsafe { b.launch(cfg) }).map(|_| ())
    }

    /// [`SparsePrefill::group_union`] of groups of `group` (2 or 3) query blocks brought to the host
    /// (entries, lengths), for tests.
    #[doc(hidden)]
    pub fn download_group_union(
        &self,
        ix: &DeviceIndex,
        group: usize,
    ) -> Result<Option<(Vec<u32>, Vec<u32>)>> {
        if !(2..=3).contains(&group) {
            return Err(Error::Shape(format!(
                "union of {group} query blocks: 2 or 3"
            )));
        }
        let mut bufs = self.lock_union_bufs()?;
        if !self.group_union(ix, group, &mut bufs)? {
            return Ok(None);
        }
        let (Some(i), Some(l)) = (&bufs.idx, &bufs.len) else {
            return Ok(None);
        };
        let s = &self.dev.stream;
        Ok(Some((
            drv("download", s.clone_dtoh(i))?,
            drv("download", s.clone_dtoh(l))?,
        )))
    }

    /// The union of the column lists of query blocks `group * p .. group * p + group` (2 or 3) of
    /// every head (`ix_group_union`, one launch; bitmaps for dense groups, a merge for the others):
    /// entries tagged with their blocks in the top `group` bits, at the first block's offsets, and
    /// one length per group, into `bufs.idx` and `bufs.len` (grown when too small). `false` when
    /// [`UNION_ENV`] turned it off or tokens do not fit the tags' `32 - group` bits. Queued on the
    /// stream: the launch that reads the buffers must be queued before the next call writes them,
    /// which holding the lock of `bufs` across both ensures.
    fn group_union(&self, ix: &DeviceIndex, group: usize, bufs: &mut UnionBufs) -> Result<bool> {
        let Some(f) = &self.group_union else {
            return Ok(false);
        };
        if ix.seq_len >= (1 << (32 - group)) - 1 {
            return Ok(false);
        }
        let s = &self.dev.stream;
        let groups = ix.q_heads * ix.q_blocks.div_ceil(group);
        let UnionBufs { idx, len, pass, .. } = bufs;
        UnionBufs::grow(s, idx, ix.n_col.max(1))?;
        UnionBufs::grow(s, len, groups.max(1))?;
        if group == 3 {
            UnionBufs::grow(s, pass, ix.n_col.max(1))?;
        }
        let (Some(out_idx), Some(out_len)) = (idx.as_mut(), len.as_mut()) else {
            return Ok(false);
        };
        let pass_idx = pass.as_mut().filter(|_| group == 3);
        let (heads_i, blocks_i, group_i) = (ix.q_heads as i32, ix.q_blocks as i32, group as i32);
        let mut b = s.launch_builder(f);
        b.arg(&ix.col_off)
            .arg(&ix.col_idx)
            .arg(&heads_i)
            .arg(&blocks_i)
            .arg(&group_i);
        match pass_idx {
            Some(p) => b.arg(p),
            None => b.arg(&self.dummy),
        };
        b.arg(&mut *out_idx).arg(&mut *out_len);
        let cfg = LaunchConfig {
            grid_dim: (grid_u32(groups)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `ix_group_union`; col_off holds q_heads * q_blocks + 1 offsets into col_idx
        // (the index's invariant), each list ascending without repeats; the union of a group (and,
        // on the merge path for groups of three, the first merge, written to pass_idx at the same
        // offsets) fits the space of its lists (n_col entries in all, no more than out_idx and
        // pass_idx hold); out_len holds at least one entry per group; the dummy passed for groups
        // of two is never touched.
        drv("ix_group_union launch", unsafe { b.launch(cfg) })?;
        Ok(true)
    }

    /// The tile order of every group of `group` query blocks of every head for a warp-specialized
    /// kernel (`f`: `ws_schedule2` or `ws_schedule3`, one warp per group), into `bufs.sched`; with
    /// `union`, over the union column lists [`SparsePrefill::group_union`] just queued. `false`
    /// (the kernel then merges the lists itself) when key blocks could reach the entries' column
    /// marker. Queued on the stream like the union.
    fn schedule(
        &self,
        ix: &DeviceIndex,
        f: &CudaFunction,
        group: usize,
        union: bool,
        bufs: &mut UnionBufs,
    ) -> Result<bool> {
        if ix.q_blocks >= SCHED_COLUMN as usize {
            return Ok(false);
        }
        let s = &self.dev.stream;
        let entries = ix.q_heads * ix.q_blocks;
        let need = sched_len(ix.n_blk, ix.n_col, entries);
        UnionBufs::grow(s, &mut bufs.sched, need)?;
        let (Some(out), ucl) = (bufs.sched.as_mut(), bufs.len.as_ref()) else {
            return Ok(false);
        };
        let ucl = match ucl {
            Some(l) if union => l,
            _ => &self.dummy,
        };
        let warps = ix.q_heads * ix.q_blocks.div_ceil(group);
        let (n_i, heads_i, union_i) = (ix.seq_len as i32, ix.q_heads as i32, i32::from(union));
        let mut b = s.launch_builder(f);
        b.arg(&ix.blk_off)
            .arg(&ix.blk_idx)
            .arg(&ix.col_off)
            .arg(ucl)
            .arg(&n_i)
            .arg(&heads_i)
            .arg(&union_i)
            .arg(&mut *out);
        let cfg = LaunchConfig {
            grid_dim: (grid_u32(warps.div_ceil(4))?, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `ws_schedule*`; blk_off and col_off hold q_heads * q_blocks + 1 offsets
        // (the index's invariant); with `union` the lengths are the union's, queued before; every
        // group writes within its space from sched_base, at most n_blk + n_col / 64 + 3 * entries
        // entries in all, which `out` holds.
        drv("ws_schedule launch", unsafe { b.launch(cfg) })?;
        Ok(true)
    }

    /// The union buffers of [`SparsePrefill::group_union`], locked until the launch that reads them
    /// is queued.
    fn lock_union_bufs(&self) -> Result<std::sync::MutexGuard<'_, UnionBufs>> {
        self.union_bufs
            .lock()
            .map_err(|_| Error::Cuda("union buffer lock poisoned".into()))
    }

    /// The TMA tensor map of K or V (`[kv_heads, n, head_dim]` bf16) as the wgmma kernels read it:
    /// 3-D (head_dim, n, kv_heads), boxes of 64 x 64 x 1, 128-byte swizzle, rows past `n` read as zero.
    fn tensor_map(&self, buf: &DeviceBuffer<u16>, shape: &AttnShape) -> Result<TensorMap> {
        use cudarc::driver::sys;
        let (d, n, heads) = (shape.head_dim, shape.seq_len, shape.kv_heads);
        let (ptr, _record) = buf.inner.device_ptr(&self.dev.stream);
        let dims = [d as u64, n as u64, heads as u64];
        let strides = [(d * 2) as u64, (n * d * 2) as u64];
        let boxes = [64u32, 64, 1];
        let steps = [1u32, 1, 1];
        let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
        // SAFETY: `map` is writable; the arrays have the rank's lengths (strides: rank - 1); `ptr` is
        // the live allocation of `buf`, 256-byte aligned by the driver, with `heads * n * d` elements
        // (checked by the caller); row strides are multiples of 16 bytes.
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                3,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                steps.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        drv("cuTensorMapEncodeTiled", r.result())?;
        // SAFETY: initialized by the successful call above.
        Ok(TensorMap(unsafe { map.assume_init() }))
    }

    /// Milliseconds of device time taken by the work `f` queues (events around it; waits).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ctx = &self.dev.ctx;
        let (a, z) = (
            drv("event", ctx.new_event(flags))?,
            drv("event", ctx.new_event(flags))?,
        );
        drv("event record", a.record(&self.dev.stream))?;
        f()?;
        drv("event record", z.record(&self.dev.stream))?;
        drv("event sync", z.synchronize())?;
        drv("event elapsed", a.elapsed_ms(&z))
    }
}

/// A GPU builder's count phase: the per-(head, query block) list sizes its count kernel writes,
/// `vs_scan` to turn them into offsets, and the totals of a build the builder runs by itself.
#[derive(Debug)]
pub(crate) struct ListCounts {
    scan: CudaFunction,
    /// List sizes, `q_heads * q_blocks` each (the key-block and the column lists).
    pub(crate) blk: CudaSlice<u32>,
    pub(crate) col: CudaSlice<u32>,
    /// The list totals of a build the builder runs by itself (a plan layer passes its own).
    totals: CudaSlice<u32>,
}

impl ListCounts {
    /// Zeroed counts for `m` (head, query block) entries.
    pub(crate) fn new(dev: &Device, m: usize) -> Result<Self> {
        let z32 = |len: usize| drv("cuMemAlloc", dev.stream.alloc_zeros::<u32>(len.max(1)));
        Ok(Self {
            scan: dev.function(KernelFile::VerticalSlash, "vs_scan", 0)?,
            blk: z32(m)?,
            col: z32(m)?,
            totals: z32(2)?,
        })
    }

    /// [`scan_counts`] of these counts into `ix` (from [`counting_index`]) on stream `s`, the totals
    /// into pair `slot` of `totals`, or into the builder's own with `None`.
    pub(crate) fn scan(
        &mut self,
        s: &CudaStream,
        ix: &mut DeviceIndex,
        totals: Option<(&mut CudaSlice<u32>, usize)>,
    ) -> Result<()> {
        let totals = totals.unwrap_or((&mut self.totals, 0));
        scan_counts(s, &self.scan, &self.blk, &self.col, ix, totals)
    }

    /// The totals of a [`ListCounts::scan`] made with `None` (waits for them).
    pub(crate) fn own_totals(&self, sp: &SparsePrefill) -> Result<(usize, usize)> {
        read_totals(sp, &self.totals)?
            .first()
            .copied()
            .ok_or_else(|| Error::Cuda("no list totals read back".into()))
    }
}

/// The index a builder fills next, in two steps so that a plan layer reads every builder's list sizes
/// back in one copy. [`counting_index`] takes `out` when it was made for `q_heads` × `seq_len` (its
/// buffers are reused), else allocates a new one (on the main stream, before the builder forks to
/// its own), with `pairs_share` false (per-head selections).
pub(crate) fn counting_index(
    sp: &SparsePrefill,
    q_heads: usize,
    seq_len: usize,
    out: Option<DeviceIndex>,
) -> Result<DeviceIndex> {
    let mut ix = match out {
        Some(ix) if ix.q_heads == q_heads && ix.seq_len == seq_len => ix,
        _ => {
            let s = &sp.dev.stream;
            let q_blocks = seq_len.div_ceil(CUDA_BLOCK);
            let m = q_heads * q_blocks;
            DeviceIndex {
                q_heads,
                seq_len,
                q_blocks,
                blk_off: drv("alloc", s.alloc_zeros::<u32>(m + 1))?,
                blk_idx: drv("alloc", s.alloc_zeros::<u32>(1))?,
                col_off: drv("alloc", s.alloc_zeros::<u32>(m + 1))?,
                col_idx: drv("alloc", s.alloc_zeros::<u32>(1))?,
                n_blk: 0,
                n_col: 0,
                pairs_share: false,
            }
        }
    };
    ix.pairs_share = false;
    Ok(ix)
}

/// Queues on stream `s` the exclusive scans (`vs_scan`) of the per-(head, query block) list sizes
/// `cnt_blk` and `cnt_col` into `ix`'s offsets, and the two totals into pair `slot` of `totals`.
/// Once the totals are on the host ([`read_totals`]), [`size_lists`] (through [`counted_index`])
/// sizes the lists and the caller writes them.
pub(crate) fn scan_counts(
    s: &CudaStream,
    scan: &CudaFunction,
    cnt_blk: &CudaSlice<u32>,
    cnt_col: &CudaSlice<u32>,
    ix: &mut DeviceIndex,
    (totals, slot): (&mut CudaSlice<u32>, usize),
) -> Result<()> {
    let m = ix.q_heads * ix.q_blocks;
    if totals.len() < 2 * slot + 2 {
        return Err(Error::Cuda(format!("no room for list totals {slot}")));
    }
    if cnt_blk.len() < m || cnt_col.len() < m {
        return Err(Error::Cuda(format!(
            "list sizes for {} / {} entries, index of {m}",
            cnt_blk.len(),
            cnt_col.len()
        )));
    }
    let mut totals = totals.slice_mut(2 * slot..2 * slot + 2);
    let m_i = i32::try_from(m).map_err(|_| Error::Shape(format!("{m} index entries")))?;
    let mut b = s.launch_builder(scan);
    b.arg(cnt_blk)
        .arg(cnt_col)
        .arg(&m_i)
        .arg(&mut ix.blk_off)
        .arg(&mut ix.col_off)
        .arg(&mut totals);
    let one = LaunchConfig {
        grid_dim: (2, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `vs_scan`; the counts hold at least m entries (checked), the offsets m + 1
    // (counting_index), the totals view 2.
    drv("vs_scan launch", unsafe { b.launch(one) })?;
    Ok(())
}

/// The list totals `(key blocks, columns)` of every [`scan_counts`] into `totals` (pairs), in one
/// copy: the only wait for the device while a layer's index is built.
pub(crate) fn read_totals(
    sp: &SparsePrefill,
    totals: &CudaSlice<u32>,
) -> Result<Vec<(usize, usize)>> {
    let t = drv("read totals", sp.dev.stream.clone_dtoh(totals))?;
    Ok(t.chunks_exact(2)
        .map(|p| (p[0] as usize, p[1] as usize))
        .collect())
}

/// The index a builder's count phase left in `out` for `shape`, its lists sized for `totals` (for the
/// builder's fill phase; `what` names the builder in the error when no count came first).
pub(crate) fn counted_index(
    sp: &SparsePrefill,
    out: &mut Option<DeviceIndex>,
    shape: &AttnShape,
    totals: (usize, usize),
    what: &str,
) -> Result<DeviceIndex> {
    let mut ix = match out.take() {
        Some(ix) if ix.q_heads == shape.q_heads && ix.seq_len == shape.seq_len => ix,
        _ => {
            return Err(Error::Cuda(format!(
                "{what} lists filled before their count"
            )))
        }
    };
    size_lists(sp, &mut ix, totals)?;
    Ok(ix)
}

/// Sizes `ix`'s lists for `(key blocks, columns)` entries (reusing buffers that are large enough).
pub(crate) fn size_lists(
    sp: &SparsePrefill,
    ix: &mut DeviceIndex,
    (nb, nc): (usize, usize),
) -> Result<()> {
    let s = &sp.dev.stream;
    if ix.blk_idx.len() < nb.max(1) {
        ix.blk_idx = drv("alloc", s.alloc_zeros::<u32>(nb.max(1)))?;
    }
    if ix.col_idx.len() < nc.max(1) {
        ix.col_idx = drv("alloc", s.alloc_zeros::<u32>(nc.max(1)))?;
    }
    ix.n_blk = nb;
    ix.n_col = nc;
    Ok(())
}

/// Checks head_dim, head counts and the lengths of Q, K and V.
pub(crate) fn check_qkv(
    shape: &AttnShape,
    q: &DeviceBuffer<u16>,
    k: &DeviceBuffer<u16>,
    v: &DeviceBuffer<u16>,
) -> Result<()> {
    shape.check()?;
    if shape.head_dim != 64 && shape.head_dim != 128 {
        return Err(Error::CudaUnsupported(format!(
            "head_dim {}, the CUDA kernels take 64 or 128",
            shape.head_dim
        )));
    }
    if shape.seq_len > i32::MAX as usize / 2 {
        return Err(Error::CudaUnsupported(format!(
            "seq_len {} too long",
            shape.seq_len
        )));
    }
    let overflow = || Error::Shape(format!("attention shape {shape:?} overflows usize"));
    let (ql, kl) = (
        shape.q_len().ok_or_else(overflow)?,
        shape.kv_len().ok_or_else(overflow)?,
    );
    for (name, got, want) in [("q", q.len(), ql), ("k", k.len(), kl), ("v", v.len(), kl)] {
        if got != want {
            return Err(Error::Shape(format!(
                "{name} has {got} elements, shape {shape:?} needs {want}"
            )));
        }
    }
    Ok(())
}

/// Threads of the list fills' CTAs (`FILL_THREADS` in kernels/common.cuh).
pub(crate) const FILL_THREADS: u32 = 128;

/// A schedule entry's key block that marks a column tile (`SCHED_COLUMN` in attention.cu): key
/// blocks must stay below it for the tile schedules to apply.
pub(crate) const SCHED_COLUMN: u32 = 0xff_ffff;

/// The launch shape of the list fills (`vs_fill`, `ts_fill`): one CTA of [`FILL_THREADS`] per (head,
/// query block) entry, with `smem` bytes of dynamic shared memory.
pub(crate) fn cta_per_entry(entries: usize, smem: u32) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_u32(entries)?, 1, 1),
        block_dim: (FILL_THREADS, 1, 1),
        shared_mem_bytes: smem,
    })
}

/// The launch shape of the kernels that give one warp to each of `items` (a (head, query block) entry,
/// a row): 128-thread CTAs of four warps, `item = blockIdx.x * 4 + threadIdx.x / 32`.
pub(crate) fn warp_per_item(items: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_u32(items.div_ceil(4))?, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    })
}

pub(crate) fn grid_u32(x: usize) -> Result<u32> {
    u32::try_from(x)
        .ok()
        .filter(|&g| g < i32::MAX as u32)
        .ok_or_else(|| Error::CudaUnsupported(format!("grid of {x} blocks")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The on/off switches read `0` and `1` (unset: on) and refuse anything else, naming the
    /// variable; the variable is this test's own, so no other test sees it.
    #[test]
    fn env_switch_refuses_values_other_than_0_and_1() {
        const NAME: &str = "ATTNPLAN_TEST_ENV_SWITCH";
        std::env::remove_var(NAME);
        assert!(env_switch(NAME).unwrap());
        for (value, want) in [("1", true), ("0", false)] {
            std::env::set_var(NAME, value);
            assert_eq!(env_switch(NAME).unwrap(), want, "{NAME}={value}");
        }
        for value in ["off", "yes", "2", " 0"] {
            std::env::set_var(NAME, value);
            let e = env_switch(NAME).unwrap_err().to_string();
            assert!(e.contains(&format!("{NAME}={value}")), "{e}");
        }
        std::env::remove_var(NAME);
    }

    /// The most dynamic shared memory a CTA may use on sm_90 (227 KB).
    const SM90_MAX_SMEM: u32 = 227 * 1024;

    /// The warp-specialized kernels' and the 128-key dense kernels' shared memory as launched (and as
    /// docs/cuda.md gives it) fits one CTA per SM on sm_90; a stage more would not for three
    /// consumers at either head_dim, nor for the 128-key kernel at head_dim 128.
    #[test]
    fn warp_specialized_shared_memory_fits_sm90() {
        for (d, consumers, stages, want) in [
            (128, 2, 6, 201_880),
            (64, 2, 6, 103_576),
            (64, 3, 11, 215_568),
            (128, 3, 5, 219_008),
        ] {
            let got = ws_smem(d, consumers, stages);
            assert_eq!(
                got, want,
                "head_dim {d}, {consumers} consumers, {stages} stages"
            );
            assert!(got <= SM90_MAX_SMEM, "{got} bytes");
        }
        assert!(ws_smem(64, 3, 12) > SM90_MAX_SMEM);
        assert!(ws_smem(128, 3, 6) > SM90_MAX_SMEM);
        // the 128-key dense kernels, as dense128_function launches them
        for (d, consumers, stages, want) in [(128, 2, 3, 230_448), (64, 3, 6, 222_304)] {
            let got = wsk_smem(d, consumers, stages);
            assert_eq!(got, want, "128-key tiles, head_dim {d}");
            assert!(got <= SM90_MAX_SMEM, "{got} bytes");
        }
        assert!(wsk_smem(128, 2, 4) > SM90_MAX_SMEM);
    }

    /// Each group's schedule fits between its start (`sched_base` in attention.cu, restated here)
    /// and the next group's, and the producer's read-ahead stays inside [`sched_len`], for groups of
    /// two and three query blocks whose lists are empty, short or long, column lists of one entry
    /// (each a whole tile) and partial last groups; with union column lists too (no more tiles).
    #[test]
    fn tile_schedules_fit_their_space() {
        let mut draws = crate::test_util::noise(200 * 4 * 64, 7, 0.5).into_iter();
        // uniform in 0..m
        let mut next = |m: usize| (((draws.next().unwrap() + 0.5) * m as f32) as usize).min(m - 1);
        for case in 0..200 {
            let group = 2 + case % 2;
            let (q_heads, q_blocks) = (1 + next(3), 1 + next(20));
            let entries = q_heads * q_blocks;
            let lens: Vec<(usize, usize)> = (0..entries)
                .map(|_| match next(4) {
                    0 => (0, 0),
                    1 => (next(3), 1),
                    2 => (next(40), 1 + next(64)),
                    _ => (next(200), next(500)),
                })
                .collect();
            let (mut blk_off, mut col_off) = (vec![0usize], vec![0usize]);
            for &(b, c) in &lens {
                blk_off.push(blk_off[blk_off.len() - 1] + b);
                col_off.push(col_off[col_off.len() - 1] + c);
            }
            let total = sched_len(blk_off[entries], col_off[entries], entries);
            let base = |e0: usize| blk_off[e0] + col_off[e0] / CUDA_BLOCK + 3 * e0;
            for h in 0..q_heads {
                for qb0 in (0..q_blocks).step_by(group) {
                    let e0 = h * q_blocks + qb0;
                    let members = &lens[e0..e0 + group.min(q_blocks - qb0)];
                    // one tile per list entry and per column tile (a union has no more), then END
                    let tiles = members
                        .iter()
                        .map(|&(b, c)| b + c.div_ceil(CUDA_BLOCK))
                        .sum::<usize>()
                        + 1;
                    assert!(
                        base(e0) + tiles <= base(e0 + members.len()),
                        "case {case}: the group at {e0} ({group} blocks) overruns the next"
                    );
                    assert!(
                        base(e0) + tiles + 63 < total,
                        "case {case}: read-ahead past the buffer"
                    );
                }
            }
        }
    }
}
