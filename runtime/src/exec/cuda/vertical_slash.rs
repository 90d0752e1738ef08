//! [`VerticalSlashBuilder`]: the vertical-slash index of every head of a layer, built on the GPU.
//!
//! Stages (one launch each, all heads; see `kernels/vertical_slash.cu`): estimation (`vs_est_max`,
//! `vs_est_reduce`, `vs_est_sum`: softmax of the last `last_q` queries, summed per column and per
//! diagonal), selection (`vs_topk`: top-v columns and top-s diagonals with the CPU ranking's forced
//! items and tie rule), lists (`vs_bdiag`, `vs_count`, `vs_scan`, `vs_fill`). The two list totals are
//! read back in one 8-byte copy to size the lists (in a plan layer, with the other builders' totals);
//! the buffers are reused across calls.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{drv, KernelFile};
use super::{
    check_qkv, counted_index, counting_index, cta_per_entry, grid_u32, warp_per_item, DeviceBuffer,
    DeviceIndex, ListCounts, SparsePrefill, CUDA_BLOCK,
};
use crate::error::{Error, Result};
use crate::pattern::vertical_slash::{FORCED_COLUMNS, FORCED_DIAGONALS};
use crate::pattern::PatternContext;
use crate::AttnShape;

/// Key tiles of 64 per CTA of the estimation kernels (`est_tiles` in vertical_slash.cu): 8, or fewer
/// for a small layer, so that its CTAs (heads × row tiles × chunks) number about 528, four per SM of
/// the H200 (132 SMs). With few heads (SmolLM2's 9) at 8K, 8 tiles gave 144 CTAs.
fn est_tiles(q_heads: usize, row_tiles: usize, n: usize) -> usize {
    (n.div_ceil(64) * q_heads * row_tiles / 528).clamp(1, 8)
}

/// Dynamic shared memory of `vs_est_*`: a Q tile, 2 K tiles (64 rows each) and a 64 x 65 f32 P tile.
fn est_smem(head_dim: usize) -> u32 {
    (3 * 64 * head_dim * 2 + 64 * 65 * 4) as u32
}

/// CTAs of a `vs_topk` cluster (`TK_CLUSTER` in vertical_slash.cu): one (kind, head)'s ranking.
pub(crate) const TOPK_CLUSTER: u32 = 8;

/// Dynamic shared memory of `vs_fill`: a bit per key block.
fn fill_smem(q_blocks: usize) -> u32 {
    (q_blocks.div_ceil(32) * 4) as u32
}

/// Reusable buffers and kernels for one layer shape and `last_q`.
#[derive(Debug)]
pub struct VerticalSlashBuilder {
    shape: AttnShape,
    last_q: usize,
    row_tiles: usize,
    est_tiles: usize,
    nchunks: usize,
    est_max: CudaFunction,
    est_sum: CudaFunction,
    est_reduce: CudaFunction,
    topk: CudaFunction,
    bdiag: CudaFunction,
    count: CudaFunction,
    fill: CudaFunction,
    /// `[q_heads][row_tiles * 64][nchunks]` (max, sum) pairs.
    part: CudaSlice<f32>,
    /// `[q_heads][row_tiles * 64]` (max, 1 / sum) pairs.
    ml: CudaSlice<f32>,
    /// Vertical and slash scores, `[q_heads][n]` each.
    col: CudaSlice<f32>,
    diag: CudaSlice<f32>,
    /// Prefix counts of selected items, `[q_heads][n + 1]`, and selected columns `[q_heads][n]`.
    col_cum: CudaSlice<u32>,
    diag_cum: CudaSlice<u32>,
    col_list: CudaSlice<u32>,
    /// Selected block diagonals `[q_heads][q_blocks]` (ascending) and their counts `[q_heads]`.
    bd_list: CudaSlice<u32>,
    bd_cnt: CudaSlice<u32>,
    counts: ListCounts,
    budget_v: CudaSlice<u32>,
    budget_s: CudaSlice<u32>,
    /// The heads the estimate runs for, on the device, and as last uploaded.
    est_heads: CudaSlice<u32>,
    est_heads_host: Vec<u32>,
}

impl VerticalSlashBuilder {
    /// Buffers for `shape` with the estimate over the last `ctx.last_q` queries; `ctx` must use 64-token
    /// blocks and `ctx.seq_len == shape.seq_len`.
    pub fn new(sp: &SparsePrefill, shape: &AttnShape, ctx: &PatternContext) -> Result<Self> {
        ctx.check()?;
        shape.check()?;
        if ctx.block_q != CUDA_BLOCK || ctx.block_k != CUDA_BLOCK || ctx.seq_len != shape.seq_len {
            return Err(Error::CudaUnsupported(format!(
                "context {ctx:?}: the CUDA builder needs 64x64 blocks and seq_len {}",
                shape.seq_len
            )));
        }
        if shape.head_dim != 64 && shape.head_dim != 128 {
            return Err(Error::CudaUnsupported(format!(
                "head_dim {}, the CUDA kernels take 64 or 128",
                shape.head_dim
            )));
        }
        let n = shape.seq_len.max(1);
        let h = shape.q_heads;
        let last_q = ctx.last_q.min(n);
        let row_tiles = last_q.div_ceil(64);
        let est_tiles = est_tiles(h, row_tiles, n);
        let nchunks = n.div_ceil(est_tiles * 64);
        let d = &sp.dev;
        let sfx = if shape.head_dim == 64 { "d64" } else { "d128" };
        let est_smem = est_smem(shape.head_dim);
        let vs = KernelFile::VerticalSlash;
        let s = &d.stream;
        let z32 = |len: usize| drv("cuMemAlloc", s.alloc_zeros::<u32>(len.max(1)));
        let zf = |len: usize| drv("cuMemAlloc", s.alloc_zeros::<f32>(len.max(1)));
        let q_blocks = n.div_ceil(CUDA_BLOCK);
        Ok(Self {
            shape: *shape,
            last_q,
            row_tiles,
            est_tiles,
            nchunks,
            est_max: d.function(vs, &format!("vs_est_max_{sfx}"), est_smem)?,
            est_sum: d.function(vs, &format!("vs_est_sum_{sfx}"), est_smem)?,
            est_reduce: d.function(vs, "vs_est_reduce", 0)?,
            topk: d.function(vs, "vs_topk", 0)?,
            bdiag: d.function(vs, "vs_bdiag", 0)?,
            count: d.function(vs, "vs_count", 0)?,
            fill: d.function(vs, "vs_fill", fill_smem(q_blocks))?,
            part: zf(h * row_tiles * 64 * nchunks * 2)?,
            ml: zf(h * row_tiles * 64 * 2)?,
            col: zf(h * n)?,
            diag: zf(h * n)?,
            col_cum: z32(h * (n + 1))?,
            diag_cum: z32(h * (n + 1))?,
            col_list: z32(h * n)?,
            bd_list: z32(h * q_blocks)?,
            bd_cnt: z32(h)?,
            counts: ListCounts::new(d, h * q_blocks)?,
            budget_v: z32(h)?,
            budget_s: z32(h)?,
            est_heads: z32(h)?,
            est_heads_host: Vec::new(),
        })
    }

    fn est_smem(&self) -> u32 {
        est_smem(self.shape.head_dim)
    }

    /// Stage 1: vertical and slash scores of every head (asynchronous).
    pub fn estimate(
        &mut self,
        sp: &SparsePrefill,
        q: &DeviceBuffer<u16>,
        k: &DeviceBuffer<u16>,
    ) -> Result<()> {
        let all: Vec<u32> = (0..self.shape.q_heads as u32).collect();
        self.estimate_heads(sp, q, k, &all)
    }

    /// Stage 1 for `heads` only (ascending, distinct, each below `q_heads`): the other heads' scores
    /// are zero. A plan layer estimates only the heads whose scores it reads.
    pub fn estimate_heads(
        &mut self,
        sp: &SparsePrefill,
        q: &DeviceBuffer<u16>,
        k: &DeviceBuffer<u16>,
        heads: &[u32],
    ) -> Result<()> {
        check_qkv(&self.shape, q, k, k)?;
        let sh = self.shape;
        if heads.is_empty()
            || heads.windows(2).any(|w| w[0] >= w[1])
            || heads.iter().any(|&h| h as usize >= sh.q_heads)
        {
            return Err(Error::Shape(format!(
                "estimate for heads {heads:?}: ascending, distinct, below {}",
                sh.q_heads
            )));
        }
        let s = &sp.dev.stream;
        if self.est_heads_host != heads {
            let mut dst = self.est_heads.slice_mut(..heads.len());
            drv("upload", s.memcpy_htod(heads, &mut dst))?;
            self.est_heads_host = heads.to_vec();
        }
        drv("memset", s.memset_zeros(&mut self.col))?;
        drv("memset", s.memset_zeros(&mut self.diag))?;
        let (n, group) = (sh.seq_len as i32, sh.group() as i32);
        let (last_q, est_tiles) = (self.last_q as i32, self.est_tiles as i32);
        let n_est = heads.len() as i32;
        let scale_log2 = std::f32::consts::LOG2_E / (sh.head_dim as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: (
                grid_u32(heads.len() * self.nchunks)?,
                self.row_tiles as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: self.est_smem(),
        };
        for pass in 0..2 {
            let f = if pass == 0 {
                &self.est_max
            } else {
                &self.est_sum
            };
            let mut b = s.launch_builder(f);
            b.arg(&q.inner)
                .arg(&k.inner)
                .arg(&n)
                .arg(&group)
                .arg(&last_q)
                .arg(&est_tiles)
                .arg(&scale_log2)
                .arg(&mut self.part)
                .arg(&self.ml)
                .arg(&mut self.col)
                .arg(&mut self.diag)
                .arg(&self.est_heads)
                .arg(&n_est);
            // SAFETY: arguments match `vs_est_*` (EST_ARGS); buffers were sized in `new` for this shape:
            // part [heads][row_tiles*64][nchunks] x 2, ml [heads][row_tiles*64] x 2, col/diag [heads][n];
            // est_heads holds n_est heads below q_heads (checked above: ascending, so n_est <= q_heads),
            // queued before this launch.
            drv("vs_est launch", unsafe { b.launch(cfg) })?;
            if pass == 0 {
                let rows = sh.q_heads * self.row_tiles * 64;
                let (rows_i, nch) = (rows as i32, self.nchunks as i32);
                let mut b = s.launch_builder(&self.est_reduce);
                b.arg(&self.part).arg(&mut self.ml).arg(&rows_i).arg(&nch);
                let cfg = warp_per_item(rows)?;
                // SAFETY: matches `vs_est_reduce(part, ml, rows, nchunks)`; ml has 2 * rows floats.
                drv("vs_est_reduce launch", unsafe { b.launch(cfg) })?;
            }
        }
        Ok(())
    }

    /// Stages 2 and 3: selection at per-head budgets `(vertical, slash)` (tokens, clamped as on the
    /// CPU) and the lists, written into `out` (reused when large enough). Waits for an 8-byte read-back.
    pub fn select(
        &mut self,
        sp: &SparsePrefill,
        budgets: &[(usize, usize)],
        out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        self.upload_budgets(sp, budgets)?;
        self.select_uploaded(sp, out)
    }

    /// Puts per-head budgets on the device, clamped as on the CPU (`vertical <= n`,
    /// `1 <= slash <= n`); a kernel may overwrite entries ([`Self::scores_and_budgets`]) before
    /// [`Self::select_uploaded`].
    pub(crate) fn upload_budgets(
        &mut self,
        sp: &SparsePrefill,
        budgets: &[(usize, usize)],
    ) -> Result<()> {
        let n = self.shape.seq_len;
        if budgets.len() != self.shape.q_heads {
            return Err(Error::Shape(format!(
                "{} budgets for {} query heads",
                budgets.len(),
                self.shape.q_heads
            )));
        }
        let s = &sp.dev.stream;
        let bv: Vec<u32> = budgets.iter().map(|&(v, _)| v.min(n) as u32).collect();
        let bs: Vec<u32> = budgets
            .iter()
            .map(|&(_, sl)| sl.clamp(1, n.max(1)) as u32)
            .collect();
        drv("upload", s.memcpy_htod(&bv, &mut self.budget_v))?;
        drv("upload", s.memcpy_htod(&bs, &mut self.budget_s))
    }

    /// The vertical and slash scores of the last [`Self::estimate`] with the device budgets
    /// `(vertical, slash)` (`[q_heads]` each) that a kernel may overwrite.
    pub(crate) fn scores_and_budgets(
        &mut self,
    ) -> (
        &CudaSlice<f32>,
        &CudaSlice<f32>,
        &mut CudaSlice<u32>,
        &mut CudaSlice<u32>,
    ) {
        (
            &self.col,
            &self.diag,
            &mut self.budget_v,
            &mut self.budget_s,
        )
    }

    /// Stages 2 and 3 with the budgets already on the device (see [`Self::scores_and_budgets`]).
    /// Waits for an 8-byte read-back.
    pub(crate) fn select_uploaded(
        &mut self,
        sp: &SparsePrefill,
        out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        self.count_uploaded(sp, out, None)?;
        let t = self.counts.own_totals(sp)?;
        self.fill(sp, t, out)
    }

    /// Stage 2 and the list sizes of stage 3, queued: the offsets of `out` and its totals in pair
    /// `slot` of `totals` (the builder's own with `None`). [`Self::fill`] follows with those totals.
    pub(crate) fn count_uploaded(
        &mut self,
        sp: &SparsePrefill,
        out: &mut Option<DeviceIndex>,
        totals: Option<(&mut CudaSlice<u32>, usize)>,
    ) -> Result<()> {
        let sh = self.shape;
        let n = sh.seq_len;
        let mut ix = counting_index(sp, sh.q_heads, n, out.take())?;
        let s = &sp.dev.stream;
        let (n_i, heads) = (n as i32, sh.q_heads as i32);
        let (fc, fd) = (FORCED_COLUMNS as i32, FORCED_DIAGONALS as i32);
        let mut b = s.launch_builder(&self.topk);
        b.arg(&self.col)
            .arg(&self.diag)
            .arg(&self.budget_v)
            .arg(&self.budget_s)
            .arg(&n_i)
            .arg(&fc)
            .arg(&fd)
            .arg(&mut self.col_cum)
            .arg(&mut self.diag_cum)
            .arg(&mut self.col_list);
        // a cluster of TOPK_CLUSTER CTAs per (kind, head), the kernel's compile-time cluster shape
        let cfg = LaunchConfig {
            grid_dim: (2 * TOPK_CLUSTER, sh.q_heads as u32, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `vs_topk`; col/diag/col_list are [heads][n], the cums [heads][n + 1]; the
        // grid's x is a whole number of the kernel's clusters.
        drv("vs_topk launch", unsafe { b.launch(cfg) })?;

        let mut b = s.launch_builder(&self.bdiag);
        b.arg(&self.diag_cum)
            .arg(&n_i)
            .arg(&mut self.bd_list)
            .arg(&mut self.bd_cnt);
        let per_head = LaunchConfig {
            grid_dim: (sh.q_heads as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `vs_bdiag`; bd_list holds heads * q_blocks entries, bd_cnt heads.
        drv("vs_bdiag launch", unsafe { b.launch(per_head) })?;

        let q_blocks = n.div_ceil(CUDA_BLOCK);
        let m = sh.q_heads * q_blocks;
        let warps = warp_per_item(m)?;
        let mut b = s.launch_builder(&self.count);
        b.arg(&self.col_cum)
            .arg(&self.diag_cum)
            .arg(&self.bd_list)
            .arg(&self.bd_cnt)
            .arg(&n_i)
            .arg(&heads)
            .arg(&mut self.counts.blk)
            .arg(&mut self.counts.col);
        // SAFETY: matches `vs_count`; the count arrays hold heads * q_blocks entries.
        drv("vs_count launch", unsafe { b.launch(warps) })?;

        self.counts.scan(s, &mut ix, totals)?;
        *out = Some(ix);
        Ok(())
    }

    /// Stage 3's lists into the index of [`Self::count_uploaded`], sized for its `totals`.
    pub(crate) fn fill(
        &mut self,
        sp: &SparsePrefill,
        totals: (usize, usize),
        out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        let sh = self.shape;
        let n = sh.seq_len;
        let (n_i, heads) = (n as i32, sh.q_heads as i32);
        let mut ix = counted_index(sp, out, &sh, totals, "vertical-slash")?;
        let q_blocks = n.div_ceil(CUDA_BLOCK);
        // the bitmap of one query block's computed tiles
        let cfg = cta_per_entry(sh.q_heads * q_blocks, fill_smem(q_blocks))?;
        let s = &sp.dev.stream;
        let mut b = s.launch_builder(&self.fill);
        b.arg(&self.col_cum)
            .arg(&self.diag_cum)
            .arg(&self.col_list)
            .arg(&self.bd_list)
            .arg(&self.bd_cnt)
            .arg(&n_i)
            .arg(&heads)
            .arg(&ix.blk_off)
            .arg(&ix.col_off)
            .arg(&mut ix.blk_idx)
            .arg(&mut ix.col_idx);
        // SAFETY: matches `vs_fill` (one CTA per entry, the bitmap's words of shared memory);
        // blk_idx / col_idx hold at least the scanned totals.
        drv("vs_fill launch", unsafe { b.launch(cfg) })?;
        *out = Some(ix);
        Ok(())
    }

    /// Estimation and selection in one call.
    pub fn build(
        &mut self,
        sp: &SparsePrefill,
        q: &DeviceBuffer<u16>,
        k: &DeviceBuffer<u16>,
        budgets: &[(usize, usize)],
        out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        self.estimate(sp, q, k)?;
        self.select(sp, budgets, out)
    }

    /// The layer shape the builder was made for.
    pub fn shape(&self) -> &AttnShape {
        &self.shape
    }

    /// The vertical scores `[q_heads][n]` of the last [`Self::estimate`], on the device.
    pub(crate) fn col_scores(&self) -> &CudaSlice<f32> {
        &self.col
    }

    /// Vertical and slash scores `[q_heads][n]` of the last [`Self::estimate`] (for tests).
    pub fn scores(&self, sp: &SparsePrefill) -> Result<(Vec<f32>, Vec<f32>)> {
        let s = &sp.dev.stream;
        Ok((
            drv("download", s.clone_dtoh(&self.col))?,
            drv("download", s.clone_dtoh(&self.diag))?,
        ))
    }

    /// Prefix counts of selected columns and diagonals `[q_heads][n + 1]` of the last selection.
    pub fn selection(&self, sp: &SparsePrefill) -> Result<(Vec<u32>, Vec<u32>)> {
        let s = &sp.dev.stream;
        Ok((
            drv("download", s.clone_dtoh(&self.col_cum))?,
            drv("download", s.clone_dtoh(&self.diag_cum))?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::est_tiles;

    #[test]
    fn estimate_chunks_shrink_for_small_layers_only() {
        // SmolLM2's 9 heads at 8K: 2 tiles (576 CTAs), not 8 (144)
        assert_eq!(est_tiles(9, 1, 8192), 2);
        // the benchmark's 32 heads from 32K on, and 9 heads from ~64K on: the full 8
        assert_eq!(est_tiles(32, 1, 32768), 8);
        assert_eq!(est_tiles(9, 1, 131072), 8);
        // never below one tile, never above eight
        assert_eq!(est_tiles(1, 1, 64), 1);
        assert_eq!(est_tiles(64, 4, 1 << 20), 8);
    }
}
