//! [`TokenSelectBuilder`]: the token-select index of every head of a layer, built on the GPU with the
//! selection of [`crate::pattern::token_select`] from the vertical scores of a
//! [`VerticalSlashBuilder`] estimate (the same scores the CPU pattern ranks, in f32).
//!
//! Stages (one launch each, all heads; see `kernels/token_select.cu`): `ts_keep` (tokens kept per
//! chunk: `keep`, or by the chunk's rank with a spread), `ts_select` (each chunk's top tokens),
//! `ts_scan` (prefix counts and the sorted selected tokens per head), `ts_count`, `vs_scan` (offsets)
//! and `ts_fill` (A-shape blocks plus the selected tokens outside them). The two totals are read back
//! once (8 bytes) to size the lists.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use super::device::{drv, follow, KernelFile};
use super::{
    counted_index, counting_index, cta_per_entry, grid_u32, DeviceIndex, ListCounts, SparsePrefill,
    TokenChoice, VerticalSlashBuilder, CUDA_BLOCK,
};
use crate::error::{Error, Result};
use crate::pattern::token_select::keeps_by_rank;
use crate::AttnShape;

/// Reusable buffers and kernels for one layer shape.
#[derive(Debug)]
pub struct TokenSelectBuilder {
    shape: AttnShape,
    keep_fn: CudaFunction,
    select_fn: CudaFunction,
    scan_fn: CudaFunction,
    count_fn: CudaFunction,
    fill_fn: CudaFunction,
    /// Per head: chunk length (0: no index), keep, spread on, sink, local, offset into `by_rank`.
    block: CudaSlice<u32>,
    keep: CudaSlice<u32>,
    spread_on: CudaSlice<u32>,
    sink: CudaSlice<u32>,
    local: CudaSlice<u32>,
    rank_off: CudaSlice<u32>,
    by_rank: CudaSlice<u32>,
    /// `[q_heads][n]`: chunk sums, tokens kept per chunk, selected flags, selected tokens;
    /// `[q_heads][n + 1]` prefix counts.
    sums: CudaSlice<f64>,
    keep_out: CudaSlice<u32>,
    sel: CudaSlice<u32>,
    list: CudaSlice<u32>,
    cum: CudaSlice<u32>,
    counts: ListCounts,
}

impl TokenSelectBuilder {
    /// Buffers for `shape` (64-token blocks, as every CUDA builder).
    pub fn new(sp: &SparsePrefill, shape: &AttnShape) -> Result<Self> {
        shape.check()?;
        let n = shape.seq_len.max(1);
        let h = shape.q_heads;
        let m = h * n.div_ceil(CUDA_BLOCK);
        let dev = &sp.dev;
        let s = &dev.stream;
        let z32 = |len: usize| drv("cuMemAlloc", s.alloc_zeros::<u32>(len.max(1)));
        let f = |name| dev.function(KernelFile::TokenSelect, name, 0);
        Ok(Self {
            shape: *shape,
            keep_fn: f("ts_keep")?,
            select_fn: f("ts_select")?,
            scan_fn: f("ts_scan")?,
            count_fn: f("ts_count")?,
            fill_fn: f("ts_fill")?,
            block: z32(h)?,
            keep: z32(h)?,
            spread_on: z32(h)?,
            sink: z32(h)?,
            local: z32(h)?,
            rank_off: z32(h)?,
            by_rank: z32(1)?,
            sums: drv("cuMemAlloc", s.alloc_zeros::<f64>(h * n))?,
            keep_out: z32(h * n)?,
            sel: z32(h * n)?,
            list: z32(h * n)?,
            cum: z32(h * (n + 1))?,
            counts: ListCounts::new(dev, m)?,
        })
    }

    /// The selected-token flags `[q_heads][n]` (0 or 1) of the last build (for tests).
    pub fn selected(&self, sp: &SparsePrefill) -> Result<Vec<u32>> {
        drv("download", sp.dev.stream.clone_dtoh(&self.sel))
    }

    /// The index of every head with a choice, from the vertical scores of `scores`'s last
    /// [`VerticalSlashBuilder::estimate`] (same shape, on this layer's Q and K); heads without a choice
    /// get empty lists. Written into `out` (reused when large enough); waits for an 8-byte read-back.
    pub fn build_heads(
        &mut self,
        sp: &SparsePrefill,
        scores: &VerticalSlashBuilder,
        choices: &[Option<TokenChoice>],
        out: &mut Option<DeviceIndex>,
    ) -> Result<()> {
        self.count_heads(sp, &sp.dev.stream, scores, choices, out, None)?;
        let t = self.counts.own_totals(sp)?;
        self.fill(sp, &sp.dev.stream, t, out)
    }

    /// [`Self::build_heads`] up to the list sizes, queued on stream `s` (after the main stream's
    /// work so far, the estimate of `scores` included): the offsets of `out` and its totals in pair
    /// `slot` of `totals` (the builder's own with `None`). [`Self::fill`] follows with them.
    pub(crate) fn count_heads(
        &mut self,
        sp: &SparsePrefill,
        s: &Arc<CudaStream>,
        scores: &VerticalSlashBuilder,
        choices: &[Option<TokenChoice>],
        out: &mut Option<DeviceIndex>,
        totals: Option<(&mut CudaSlice<u32>, usize)>,
    ) -> Result<()> {
        let sh = self.shape;
        if scores.shape() != &sh {
            return Err(Error::Shape(format!(
                "vertical scores for {:?}, token-select builder for {sh:?}",
                scores.shape()
            )));
        }
        if choices.len() != sh.q_heads {
            return Err(Error::Shape(format!(
                "{} token choices for {} query heads",
                choices.len(),
                sh.q_heads
            )));
        }
        let n = sh.seq_len;
        if n == 0 {
            return Err(Error::Shape(
                "token-select index of an empty sequence".into(),
            ));
        }
        let u = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        let mut per: [Vec<u32>; 6] = Default::default();
        let mut by_rank = Vec::new();
        let mut max_chunks = 1;
        for c in choices {
            let (block, keep, spread, sink, local) = match c {
                Some(c) => (
                    c.block.max(1),
                    c.keep.min(c.block.max(1)),
                    c.spread,
                    c.sink,
                    c.local,
                ),
                None => (0, 0, 0.0, 0, 0),
            };
            per[5].push(u(by_rank.len()));
            if block > 0 {
                let chunks = n.div_ceil(block);
                max_chunks = max_chunks.max(chunks);
                if spread > 0.0 {
                    by_rank.extend(
                        keeps_by_rank(chunks, block, keep, spread)
                            .into_iter()
                            .map(u),
                    );
                }
            }
            per[0].push(u(block));
            per[1].push(u(keep));
            per[2].push(u32::from(spread > 0.0));
            per[3].push(u(sink));
            per[4].push(u(local));
        }
        if by_rank.is_empty() {
            by_rank.push(0);
        }
        // allocations on the main stream, before this builder's stream follows it
        self.by_rank = drv("upload", sp.dev.stream.clone_htod(&by_rank))?;
        let mut ix = counting_index(sp, sh.q_heads, n, out.take())?;
        follow(&sp.dev, s, &sp.dev.stream)?;
        for (v, buf) in per.iter().zip([
            &mut self.block,
            &mut self.keep,
            &mut self.spread_on,
            &mut self.sink,
            &mut self.local,
            &mut self.rank_off,
        ]) {
            drv("upload", s.memcpy_htod(v, buf))?;
        }
        let (n_i, heads) = (n as i32, sh.q_heads as i32);
        let col = scores.col_scores();

        let mut b = s.launch_builder(&self.keep_fn);
        b.arg(col)
            .arg(&n_i)
            .arg(&self.block)
            .arg(&self.keep)
            .arg(&self.spread_on)
            .arg(&self.rank_off)
            .arg(&self.by_rank)
            .arg(&mut self.sums)
            .arg(&mut self.keep_out);
        let per_head = LaunchConfig {
            grid_dim: (sh.q_heads as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `ts_keep`; col, sums and keep_out are [q_heads][n], the per-head arrays
        // q_heads long, and by_rank holds every spread head's table at its rank_off.
        drv("ts_keep launch", unsafe { b.launch(per_head) })?;

        let mut b = s.launch_builder(&self.select_fn);
        b.arg(col)
            .arg(&n_i)
            .arg(&self.block)
            .arg(&self.keep_out)
            .arg(&mut self.sel);
        let cfg = LaunchConfig {
            grid_dim: (grid_u32(max_chunks)?, sh.q_heads as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `ts_select`; sel is [q_heads][n]; chunks past a head's end exit.
        drv("ts_select launch", unsafe { b.launch(cfg) })?;

        let mut b = s.launch_builder(&self.scan_fn);
        b.arg(&self.sel)
            .arg(&n_i)
            .arg(&self.block)
            .arg(&mut self.cum)
            .arg(&mut self.list);
        // SAFETY: matches `ts_scan`; cum is [q_heads][n + 1], list [q_heads][n].
        drv("ts_scan launch", unsafe { b.launch(per_head) })?;

        let q_blocks = n.div_ceil(CUDA_BLOCK);
        let m = sh.q_heads * q_blocks;
        let mut b = s.launch_builder(&self.count_fn);
        b.arg(&self.cum)
            .arg(&n_i)
            .arg(&heads)
            .arg(&self.block)
            .arg(&self.sink)
            .arg(&self.local)
            .arg(&mut self.counts.blk)
            .arg(&mut self.counts.col);
        let threads = LaunchConfig {
            grid_dim: (grid_u32(m.div_ceil(256))?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `ts_count`; the counts hold m entries.
        drv("ts_count launch", unsafe { b.launch(threads) })?;

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
        let mut ix = counted_index(sp, out, &sh, totals, "token-select")?;
        follow(&sp.dev, s, &sp.dev.stream)?;
        let mut b = s.launch_builder(&self.fill_fn);
        b.arg(&self.cum)
            .arg(&self.list)
            .arg(&n_i)
            .arg(&heads)
            .arg(&self.block)
            .arg(&self.sink)
            .arg(&self.local)
            .arg(&ix.blk_off)
            .arg(&ix.col_off)
            .arg(&mut ix.blk_idx)
            .arg(&mut ix.col_idx);
        let cfg = cta_per_entry(m, 0)?;
        // SAFETY: matches `ts_fill` (one CTA per entry); blk_idx / col_idx hold at least the scanned
        // totals.
        drv("ts_fill launch", unsafe { b.launch(cfg) })?;
        *out = Some(ix);
        Ok(())
    }
}
