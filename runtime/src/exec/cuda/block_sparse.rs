//! [`BlockSparseBuilder`]: the block-sparse index of every head of a layer, built on the GPU with the
//! selection of [`crate::pattern::block_sparse`] (per-head `top_k` or `coverage`).
//!
//! Stages (one launch each, all heads; see `kernels/block_sparse.cu`): `bs_pool_d*` (f64 means of
//! every 64-row block of Q and K); per chunk of query blocks `bs_score_d*` (pooled scores into a
//! scratch matrix of at most [`SCRATCH_BYTES`]) and `bs_select` (their softmax per query block and the
//! selection, as a bitmask per (head, query block)); `vs_scan` (offsets; from vertical_slash.cu) and
//! `bs_fill` (sorted lists). The block total is read back once (4 bytes) to size the list; buffers are
//! reused across calls.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::device::{drv, follow, KernelFile};
use super::{
    check_qkv, counted_index, counting_index, grid_u32, warp_per_item, BlockChoice, DeviceBuffer,
    DeviceIndex, ListCounts, SparsePrefill, CUDA_BLOCK,
};
use crate::error::{Error, Result};
use crate::pattern::PatternContext;
use crate::AttnShape;

/// Threads per CTA of `bs_score` and `bs_select` (`BS_THREADS`; `bs_select` runs one warp per
/// (head, query block)) and the query/key tile of `bs_score` (`BS_TQ`) in block_sparse.cu.
pub(crate) const THREADS: u32 = 256;
pub(crate) const TILE: usize = 64;
/// `BS_SKIP`: the mode of a head without an index.
pub(crate) const SKIP: u32 = 2;
/// Bound of the pooled-score scratch matrix (`[q_heads][chunk][q_blocks]` f64): the query blocks are
/// scored and selected in chunks that fit.
pub const SCRATCH_BYTES: usize = 512 << 20;

/// Reusable buffers and kernels for one layer shape.
#[derive(Debug)]
pub struct BlockSparseBuilder {
    shape: AttnShape,
    /// Query blocks per chunk.
    chunk: usize,
    pool: CudaFunction,
    score: CudaFunction,
    select: CudaFunction,
    fill: CudaFunction,
    /// Pooled Q `[q_heads][q_blocks][d]` and K `[kv_heads][q_blocks][d]`, f64.
    qbar: CudaSlice<f64>,
    kbar: CudaSlice<f64>,
    /// Pooled scores, then estimates, of a chunk: `[q_heads][chunk][q_blocks]`.
    est: CudaSlice<f64>,
    /// Selected key blocks as bits, `[q_heads * q_blocks][ceil(q_blocks / 32)]`.
    mask: CudaSlice<u32>,
    /// Key-block counts (`bs_select`); the column counts stay zero: no gathered columns.
    counts: ListCounts,
    mode: CudaSlice<u32>,
    topk: CudaSlice<u32>,
    cover: CudaSlice<f64>,
}

impl BlockSparseBuilder {
    /// Buffers for `shape`; `ctx` must use 64-token blocks and `ctx.seq_len == shape.seq_len`.
    ///
    /// Errors: [`Error::CudaUnsupported`] for other blocks or a head_dim other than 64 or 128.
    pub fn new(sp: &SparsePrefill, shape: &AttnShape, ctx: &PatternContext) -> Result<Self> {
        ctx.check()?;
        shape.check()?;
        if ctx.block_q != CUDA_BLOCK || ctx.block_k != CUDA_BLOCK || ctx.seq_len != shape.seq_len {
            return Err(Error::CudaUnsupported(format!(
                "context {ctx:?}: the CUDA builder needs 64x64 blocks and seq_len {}",
                shape.seq_len
            )));
        }
        let d = shape.head_dim;
        if d != 64 && d != 128 {
            return Err(Error::CudaUnsupported(format!(
                "head_dim {d}, the CUDA kernels take 64 or 128"
            )));
        }
        let n = shape.seq_len.max(1);
        let q_blocks = n.div_ceil(CUDA_BLOCK);
        let chunk = (SCRATCH_BYTES / (shape.q_heads * q_blocks * 8)).clamp(1, q_blocks);
        let dev = &sp.dev;
        let sfx = if d == 64 { "d64" } else { "d128" };
        let bs = KernelFile::BlockSparse;
        let s = &dev.stream;
        let z32 = |len: usize| drv("cuMemAlloc", s.alloc_zeros::<u32>(len.max(1)));
        let zf = |len: usize| drv("cuMemAlloc", s.alloc_zeros::<f64>(len.max(1)));
        let m = shape.q_heads * q_blocks;
        Ok(Self {
            shape: *shape,
            chunk,
            pool: dev.function(bs, &format!("bs_pool_{sfx}"), 0)?,
            score: dev.function(bs, &format!("bs_score_{sfx}"), 0)?,
            select: dev.function(bs, "bs_select", 0)?,
            fill: dev.function(bs, "bs_fill", 0)?,
            qbar: zf(m * d)?,
            kbar: zf(shape.kv_heads * q_blocks * d)?,
            est: zf(shape.q_heads * chunk * q_blocks)?,
            mask: z32(m * q_blocks.div_ceil(32))?,
            counts: ListCounts::new(dev, m)?,
            mode: z32(shape.q_heads)?,
            topk: z32(shape.q_heads)?,
            cover: zf(shape.q_heads)?,
        })
    }

    /// The index of every head from the live `q` and `k` (bf16, the layout of
    /// [`SparsePrefill::forward`]) with one [`BlockChoice`] per query head, written into `out`
    /// (reused when large enough). Waits for an 8-byte read-back of the list sizes.
    pub fn build(
        &mut self,
        sp: &SparsePrefill,
        q: &DeviceBuffer<u16>,
        k: &DeviceBuffer<u16>,
        choices: &[BlockChoice],
        out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        let some: Vec<Option<BlockChoice>> = choices.iter().copied().map(Some).collect();
        self.build_heads(sp, q, k, &some, out)
    }

    /// As [`BlockSparseBuilder::build`] for the heads with a choice; the others get empty lists and
    /// cost nothing but their pooled K (e.g. heads another builder serves).
    pub fn build_heads(
        &mut self,
        sp: &SparsePrefill,
        q: &DeviceBuffer<u16>,
        k: &DeviceBuffer<u16>,
        choices: &[Option<BlockChoice>],
        out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        self.count_heads(sp, &sp.dev.stream, q, k, choices, out, None)?;
        let t = self.counts.own_totals(sp)?;
        self.fill(sp, &sp.dev.stream, t, out)
    }

    /// [`Self::build_heads`] up to the list sizes, queued on stream `s` (after the main stream's
    /// work so far): the offsets of `out` and its totals in pair `slot` of `totals` (the builder's
    /// own with `None`). [`Self::fill`] follows with them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn count_heads(
        &mut self,
        sp: &SparsePrefill,
        s: &Arc<CudaStream>,
        q: &DeviceBuffer<u16>,
        k: &DeviceBuffer<u16>,
        choices: &[Option<BlockChoice>],
        out: &mut Option<DeviceIndex>,
        totals: Option<(&mut CudaSlice<u32>, usize)>,
    ) -> Result<()> {
        let sh = self.shape;
        check_qkv(&sh, q, k, k)?;
        if choices.len() != sh.q_heads {
            return Err(Error::Shape(format!(
                "{} block choices for {} query heads",
                choices.len(),
                sh.q_heads
            )));
        }
        let mut mode = Vec::with_capacity(sh.q_heads);
        let mut topk = Vec::with_capacity(sh.q_heads);
        let mut cover = Vec::with_capacity(sh.q_heads);
        for (h, c) in choices.iter().enumerate() {
            match *c {
                None => {
                    mode.push(SKIP);
                    topk.push(0);
                    cover.push(0.0);
                }
                Some(BlockChoice::TopK(k)) => {
                    mode.push(0u32);
                    topk.push(u32::try_from(k).unwrap_or(u32::MAX));
                    cover.push(0.0f64);
                }
                Some(BlockChoice::Coverage(c)) if c > 0.0 && c <= 1.0 => {
                    mode.push(1);
                    topk.push(0);
                    cover.push(c);
                }
                Some(BlockChoice::CoverageAtLeast(c, floor)) if c > 0.0 && c <= 1.0 => {
                    mode.push(1);
                    topk.push(u32::try_from(floor).unwrap_or(u32::MAX));
                    cover.push(c);
                }
                Some(BlockChoice::Coverage(c) | BlockChoice::CoverageAtLeast(c, _)) => {
                    return Err(Error::Pattern {
                        kind: "block_sparse",
                        message: format!("head {h}: coverage {c} is not in (0, 1]"),
                    })
                }
            }
        }
        let n = sh.seq_len;
        if n == 0 {
            return Err(Error::Shape(
                "block-sparse index of an empty sequence".into(),
            ));
        }
        let mut ix = counting_index(sp, sh.q_heads, n, out.take())?;
        follow(&sp.dev, s, &sp.dev.stream)?;
        drv("upload", s.memcpy_htod(&mode, &mut self.mode))?;
        drv("upload", s.memcpy_htod(&topk, &mut self.topk))?;
        drv("upload", s.memcpy_htod(&cover, &mut self.cover))?;
        let q_blocks = n.div_ceil(CUDA_BLOCK);
        let (n_i, heads, group) = (n as i32, sh.q_heads as i32, sh.group() as i32);

        let mut b = s.launch_builder(&self.pool);
        b.arg(&q.inner)
            .arg(&k.inner)
            .arg(&n_i)
            .arg(&heads)
            .arg(&self.mode)
            .arg(&mut self.qbar)
            .arg(&mut self.kbar);
        let cfg = LaunchConfig {
            grid_dim: (grid_u32((sh.q_heads + sh.kv_heads) * q_blocks)?, 1, 1),
            block_dim: (sh.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `bs_pool_d*`; q and k were checked against the shape, qbar/kbar hold
        // (q_heads + kv_heads) * q_blocks rows of head_dim between them.
        drv("bs_pool launch", unsafe { b.launch(cfg) })?;

        let scale = 1.0 / (sh.head_dim as f64).sqrt();
        for q0 in (0..q_blocks).step_by(self.chunk) {
            let rows = self.chunk.min(q_blocks - q0);
            let (q0_i, rows_i) = (q0 as i32, rows as i32);
            let mut b = s.launch_builder(&self.score);
            b.arg(&self.qbar)
                .arg(&self.kbar)
                .arg(&n_i)
                .arg(&group)
                .arg(&q0_i)
                .arg(&rows_i)
                .arg(&scale)
                .arg(&self.mode)
                .arg(&mut self.est);
            let cfg = LaunchConfig {
                grid_dim: (
                    grid_u32((q0 + rows).div_ceil(TILE))?,
                    grid_u32(rows.div_ceil(TILE))?,
                    sh.q_heads as u32,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `bs_score_d*`; est holds q_heads * chunk * q_blocks doubles and rows <=
            // chunk; the pooled arrays were written by bs_pool for this shape.
            drv("bs_score launch", unsafe { b.launch(cfg) })?;
            let mut b = s.launch_builder(&self.select);
            b.arg(&mut self.est)
                .arg(&n_i)
                .arg(&heads)
                .arg(&q0_i)
                .arg(&rows_i)
                .arg(&self.mode)
                .arg(&self.topk)
                .arg(&self.cover)
                .arg(&mut self.mask)
                .arg(&mut self.counts.blk);
            let warps_per_cta = THREADS as usize / 32;
            let cfg = LaunchConfig {
                grid_dim: (grid_u32((sh.q_heads * rows).div_ceil(warps_per_cta))?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `bs_select`; est as above, mask holds m * ceil(q_blocks / 32) words,
            // the key-block counts m entries, the per-head arrays q_heads.
            drv("bs_select launch", unsafe { b.launch(cfg) })?;
        }

        self.counts.scan(s, &mut ix, totals)?;
        *out = Some(ix);
        Ok(())
    }

    /// The lists of the index of [`Self::count_heads`], sized for its `totals`, queued on stream `s`
    /// (after the main stream's work so far).
    pub(crate) fn fill(
        &mut self,
        sp: &SparsePrefill,
        s: &Arc<CudaStream>,
        totals: (usize, usize),
        out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        let sh = self.shape;
        let n = sh.seq_len;
        let m = sh.q_heads * n.div_ceil(CUDA_BLOCK);
        let (n_i, heads) = (n as i32, sh.q_heads as i32);
        let mut ix = counted_index(sp, out, &sh, totals, "block-sparse")?;
        follow(&sp.dev, s, &sp.dev.stream)?;
        let mut b = s.launch_builder(&self.fill);
        b.arg(&self.mask)
            .arg(&n_i)
            .arg(&heads)
            .arg(&ix.blk_off)
            .arg(&mut ix.blk_idx);
        let warps = warp_per_item(m)?;
        // SAFETY: matches `bs_fill`; blk_idx holds at least the scanned total, which is the number of
        // set bits in the mask rows (bs_rank's counts).
        drv("bs_fill launch", unsafe { b.launch(warps) })?;
        *out = Some(ix);
        Ok(())
    }
}
