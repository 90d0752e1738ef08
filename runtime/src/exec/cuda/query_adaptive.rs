//! Query-adaptive (FlexPrefill) heads on the GPU, for [`super::PlanPrefill`]: the branch of each head
//! (`qa_pool_d*` and `qa_div`: Jensen-Shannon divergence of the pooled estimate from the last queries' block
//! distribution, against `tau`) and the vertical-slash branch's budgets (`qa_budgets`: coverage of
//! `gamma` over the vertical and slash scores, at least `min_budget` blocks of tokens), from a
//! [`VerticalSlashBuilder`] estimate. Both branches' indexes are then built (the block-sparse builder
//! with [`super::BlockChoice::CoverageAtLeast`], the vertical-slash builder with these budgets) and
//! the merge takes one per head from [`QueryAdaptive::src`], all without a read-back to the host.
//! The selection is `runtime::pattern::query_adaptive`'s (see `kernels/query_adaptive.cu` for where
//! f32 scores may make it differ).

use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{drv, KernelFile};
use super::{check_qkv, grid_u32, DeviceBuffer, SparsePrefill, VerticalSlashBuilder, CUDA_BLOCK};
use crate::error::{Error, Result};
use crate::pattern::vertical_slash::{FORCED_COLUMNS, FORCED_DIAGONALS};
use crate::pattern::PatternContext;
use crate::AttnShape;

/// Dynamic shared memory of `qa_budgets`: 32 warps' histograms of 256 counts and 256 masses.
const BUDGET_SMEM: u32 = 32 * 256 * (8 + 4);

/// CTAs of a `qa_budgets` cluster (`QA_CLUSTER` in query_adaptive.cu): one (kind, head)'s budget.
pub(crate) const BUDGET_CLUSTER: u32 = 8;

/// Per-head decisions of a layer's query-adaptive heads.
#[derive(Debug)]
pub(crate) struct QueryAdaptive {
    shape: AttnShape,
    pool: CudaFunction,
    div: CudaFunction,
    budgets: CudaFunction,
    /// Pooled scores, then the estimate, `[q_heads][k_blocks]`.
    est: CudaSlice<f64>,
    /// The vertical scores summed per key block, `[q_heads][k_blocks]` (the true distribution).
    bmass: CudaSlice<f64>,
    mode: CudaSlice<u32>,
    tau: CudaSlice<f64>,
    gamma: CudaSlice<f64>,
    min_tokens: CudaSlice<u32>,
    /// Per head: the merge source of its index (0xffffffff for heads that are not query-adaptive).
    pub(crate) src: CudaSlice<u32>,
}

impl QueryAdaptive {
    pub(crate) fn new(sp: &SparsePrefill, shape: &AttnShape) -> Result<Self> {
        let k_blocks = shape.seq_len.max(1).div_ceil(CUDA_BLOCK);
        let dev = &sp.dev;
        let s = &dev.stream;
        let h = shape.q_heads;
        let sfx = if shape.head_dim == 64 { "d64" } else { "d128" };
        let z32 = |len: usize| drv("cuMemAlloc", s.alloc_zeros::<u32>(len.max(1)));
        let zf = |len: usize| drv("cuMemAlloc", s.alloc_zeros::<f64>(len.max(1)));
        Ok(Self {
            shape: *shape,
            pool: dev.function(KernelFile::QueryAdaptive, &format!("qa_pool_{sfx}"), 0)?,
            div: dev.function(KernelFile::QueryAdaptive, "qa_div", 0)?,
            budgets: dev.function(KernelFile::QueryAdaptive, "qa_budgets", BUDGET_SMEM)?,
            est: zf(h * k_blocks)?,
            bmass: zf(h * k_blocks)?,
            mode: z32(h)?,
            tau: zf(h)?,
            gamma: zf(h)?,
            min_tokens: z32(h)?,
            src: z32(h)?,
        })
    }

    /// Decides every head with a pattern in `heads` (the others are left to the host's choice):
    /// `src[h]` = `src_query_aware` or `src_vertical_slash`, and for the vertical-slash branch the
    /// budgets written into `vs`'s device budgets. `vs` must hold this layer's estimate and its
    /// uploaded budgets (the ones written here overwrite those of the query-adaptive heads).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decide(
        &mut self,
        sp: &SparsePrefill,
        ctx: &PatternContext,
        q: &DeviceBuffer<u16>,
        k: &DeviceBuffer<u16>,
        vs: &mut VerticalSlashBuilder,
        heads: &[Option<&schemas::QueryAdaptive>],
        (src_query_aware, src_vertical_slash): (u32, u32),
    ) -> Result<()> {
        let sh = self.shape;
        check_qkv(&sh, q, k, k)?;
        if vs.shape() != &sh || heads.len() != sh.q_heads {
            return Err(Error::Shape(format!(
                "query-adaptive decisions for {sh:?}: vertical scores for {:?}, {} heads",
                vs.shape(),
                heads.len()
            )));
        }
        let mut mode = Vec::with_capacity(sh.q_heads);
        let mut tau = Vec::with_capacity(sh.q_heads);
        let mut gamma = Vec::with_capacity(sh.q_heads);
        let mut min_tokens = Vec::with_capacity(sh.q_heads);
        for p in heads {
            match p {
                Some(p) => {
                    crate::pattern::query_adaptive::check(p)?;
                    let min = ctx.resolve(&p.min_budget).saturating_mul(ctx.block_k);
                    mode.push(1u32);
                    tau.push(p.tau);
                    gamma.push(p.gamma);
                    min_tokens.push(u32::try_from(min).unwrap_or(u32::MAX));
                }
                None => {
                    mode.push(0);
                    tau.push(0.0);
                    gamma.push(0.0);
                    min_tokens.push(0);
                }
            }
        }
        let s = &sp.dev.stream;
        drv("upload", s.memcpy_htod(&mode, &mut self.mode))?;
        drv("upload", s.memcpy_htod(&tau, &mut self.tau))?;
        drv("upload", s.memcpy_htod(&gamma, &mut self.gamma))?;
        drv("upload", s.memcpy_htod(&min_tokens, &mut self.min_tokens))?;
        let (n, group) = (sh.seq_len as i32, sh.group() as i32);
        let last_q = i32::try_from(ctx.last_q).unwrap_or(i32::MAX);
        let scale = 1.0 / (sh.head_dim as f64).sqrt();
        let mut b = s.launch_builder(&self.pool);
        b.arg(&q.inner)
            .arg(&k.inner)
            .arg(&n)
            .arg(&group)
            .arg(&last_q)
            .arg(&scale)
            .arg(&self.mode)
            .arg(vs.col_scores())
            .arg(&mut self.est)
            .arg(&mut self.bmass);
        let k_blocks = sh.seq_len.div_ceil(CUDA_BLOCK);
        let cfg = LaunchConfig {
            grid_dim: (grid_u32(k_blocks.div_ceil(8))?, sh.q_heads as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `qa_pool_d*`; q and k were checked against the shape, est holds
        // and bmass q_heads * k_blocks doubles, mode q_heads entries, the vertical scores [q_heads][n].
        drv("qa_pool launch", unsafe { b.launch(cfg) })?;
        let mut b = s.launch_builder(&self.div);
        b.arg(&mut self.est)
            .arg(&self.bmass)
            .arg(&n)
            .arg(&self.mode)
            .arg(&self.tau)
            .arg(&src_query_aware)
            .arg(&src_vertical_slash)
            .arg(&mut self.src);
        let cfg = LaunchConfig {
            grid_dim: (sh.q_heads as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `qa_div`; est and bmass as above,
        // the per-head arrays q_heads long.
        drv("qa_div launch", unsafe { b.launch(cfg) })?;
        let (fc, fd) = (FORCED_COLUMNS as i32, FORCED_DIAGONALS as i32);
        let (col, diag, bv, bs) = vs.scores_and_budgets();
        let mut b = s.launch_builder(&self.budgets);
        b.arg(col)
            .arg(diag)
            .arg(&n)
            .arg(&self.mode)
            .arg(&self.gamma)
            .arg(&self.min_tokens)
            .arg(&fc)
            .arg(&fd)
            .arg(bv)
            .arg(bs);
        // a cluster of BUDGET_CLUSTER CTAs per (kind, head), the kernel's compile-time cluster shape
        let cfg = LaunchConfig {
            grid_dim: (2 * BUDGET_CLUSTER, sh.q_heads as u32, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: BUDGET_SMEM,
        };
        // SAFETY: matches `qa_budgets` (its histograms in BUDGET_SMEM); scores [q_heads][n], budgets
        // and per-head arrays q_heads; the grid's x is a whole number of the kernel's clusters.
        drv("qa_budgets launch", unsafe { b.launch(cfg) })?;
        Ok(())
    }
}
