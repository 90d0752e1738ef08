//! The exact causal softmax of one query block against all its causal keys, tile by tile.
//!
//! [`RowBlock::compute`] fills, for query block `qb` (rows `qb * block_q ..`), the scores of every causal
//! tile `[block_q, block_k]` (scaled to log2 units, f32 dot products), then in a second sweep the row
//! maximum `m`, `e = 2^(s - m)` in place, the row sums `l = Σ e` (f64 across tiles) and `t = Σ e (s - m)`
//! (for the entropy). The normalized probability of cell `(r, j)` is `e * inv_l[r]`.
//!
//! Memory: `causal key blocks * block_q * block_k` floats per worker (2 MB at N = 8192, blocks of 64),
//! i.e. `O(block_q * N)`, never `N x N`. Keeping the row block's scores instead of recomputing them in
//! the second pass halves the dot products; it is still the two-pass softmax (max and sum first, then
//! normalized probabilities, consumed tile by tile by the caller).
//!
//! Numerics: f32 dot products with fused multiply-add where the CPU has it (AVX-512F or AVX2+FMA,
//! detected at run time), [`exp2_fast`] (relative error below 2e-7). Probabilities agree with an f64
//! softmax to about 1e-6 relative to the row maximum (tested).

use std::ops::Range;

use crate::{Error, Result};

/// `log2(e)`: scores are kept in log2 units so the softmax can use `exp2`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// Query rows per micro-kernel step.
const ROWS: usize = 4;
/// Packed key blocks are padded to a multiple of this many columns (the widest micro-kernel step).
const PAD: usize = 16;

/// K of one KV head, transposed block by block: block `kb` is `[head_dim][stride]` and holds keys
/// `kb * block_k ..`; padding columns are zero.
#[derive(Debug, Clone)]
pub struct PackedKeys {
    data: Vec<f32>,
    head_dim: usize,
    seq_len: usize,
    block_k: usize,
    stride: usize,
}

impl PackedKeys {
    /// Packs `k` (`[seq_len, head_dim]`, the caller checked its length).
    pub fn pack(k: &[f32], seq_len: usize, head_dim: usize, block_k: usize) -> Self {
        let stride = block_k.next_multiple_of(PAD);
        let blocks = seq_len.div_ceil(block_k);
        let mut data = vec![0.0f32; blocks * head_dim * stride];
        for (kb, block) in data.chunks_exact_mut(head_dim * stride).enumerate() {
            let first = kb * block_k;
            let n = block_k.min(seq_len - first);
            let rows = k
                .get(first * head_dim..(first + n) * head_dim)
                .unwrap_or(&[]);
            for (j, row) in rows.chunks_exact(head_dim).enumerate() {
                for (c, &x) in row.iter().enumerate() {
                    block[c * stride + j] = x;
                }
            }
        }
        Self {
            data,
            head_dim,
            seq_len,
            block_k,
            stride,
        }
    }

    /// Checks `input`'s shape and the context at its length, and packs every KV head's keys (in
    /// parallel): what a pass over one layer's tiles starts with.
    pub fn pack_layer(
        input: &runtime::AttentionInput<'_>,
        cfg: &super::StatsConfig,
    ) -> Result<(runtime::pattern::PatternContext, Vec<Self>)> {
        use rayon::prelude::*;
        let shape = input.shape;
        shape.check()?;
        let ctx = cfg.context(shape.seq_len);
        ctx.check()?;
        let (n, d) = (shape.seq_len, shape.head_dim);
        let packed = (0..shape.kv_heads)
            .into_par_iter()
            .map(|g| Self::pack(input.k_head(g), n, d, ctx.block_k))
            .collect();
        Ok((ctx, packed))
    }

    fn block(&self, kb: usize) -> &[f32] {
        let size = self.head_dim * self.stride;
        &self.data[kb * size..(kb + 1) * size]
    }
}

/// One query block's exact softmax over its causal keys; buffers are reused across blocks.
#[derive(Debug, Clone)]
pub struct RowBlock {
    head_dim: usize,
    block_q: usize,
    block_k: usize,
    stride: usize,
    rows: Range<usize>,
    k_blocks: usize,
    /// Scaled queries, transposed: `[head_dim][block_q]`.
    qt: Vec<f32>,
    /// `[k_blocks][block_q][stride]`: scores, then `2^(s - m)`; zero outside the causal cells.
    e: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f64>,
    t: Vec<f64>,
    inv_l: Vec<f32>,
}

impl RowBlock {
    pub fn new(head_dim: usize, block_q: usize, block_k: usize) -> Self {
        Self {
            head_dim,
            block_q,
            block_k,
            stride: block_k.next_multiple_of(PAD),
            rows: 0..0,
            k_blocks: 0,
            qt: vec![0.0; head_dim * block_q],
            e: Vec::new(),
            m: vec![0.0; block_q],
            l: vec![0.0; block_q],
            t: vec![0.0; block_q],
            inv_l: vec![0.0; block_q],
        }
    }

    /// Rows (sequence positions) of the current block.
    pub fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// Causal key blocks of the current block.
    pub fn k_blocks(&self) -> usize {
        self.k_blocks
    }

    /// Row stride of a tile (`block_k` rounded up to the padding).
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Unnormalized `e = 2^(s - m)` of tile `kb`: `[block_q][stride]`, zero at masked and padding cells.
    pub fn tile(&self, kb: usize) -> &[f32] {
        let size = self.block_q * self.stride;
        self.e.get(kb * size..(kb + 1) * size).unwrap_or(&[])
    }

    /// `1 / Σ e` per row (`[block_q]`, rows past the block are 0).
    pub fn inv_l(&self) -> &[f32] {
        &self.inv_l
    }

    /// Probability of (row `rows().start + r`, key `j`); 0 outside the causal cells.
    pub fn prob(&self, r: usize, j: usize) -> f32 {
        let (kb, c) = (j / self.block_k, j % self.block_k);
        self.tile(kb)
            .get(r * self.stride + c)
            .map_or(0.0, |&e| e * self.inv_l.get(r).copied().unwrap_or(0.0))
    }

    /// Entropy of row `r`'s attention distribution, in bits.
    pub fn entropy_bits(&self, r: usize) -> f64 {
        match (self.l.get(r), self.t.get(r)) {
            (Some(&l), Some(&t)) if l > 0.0 => l.log2() - t / l,
            _ => 0.0,
        }
    }

    /// Computes query block `qb` of `q` (`[seq_len, head_dim]`, one head) against `keys`, with softmax
    /// scale `1 / sqrt(head_dim)`. Errors when `q`, `keys` and this block disagree on sizes.
    pub fn compute(&mut self, q: &[f32], keys: &PackedKeys, qb: usize) -> Result<()> {
        let n = keys.seq_len;
        if keys.block_k != self.block_k
            || keys.head_dim != self.head_dim
            || Some(q.len()) != n.checked_mul(self.head_dim)
        {
            return Err(Error::Runtime(runtime::Error::Shape(format!(
                "row block of head_dim {}, block_k {} against keys of head_dim {}, block_k {}, \
                 {n} tokens and {} query values",
                self.head_dim,
                self.block_k,
                keys.head_dim,
                keys.block_k,
                q.len()
            ))));
        }
        let start = (qb * self.block_q).min(n);
        self.rows = start..(start + self.block_q).min(n);
        self.k_blocks = if self.rows.is_empty() {
            0
        } else {
            (self.rows.end - 1) / self.block_k + 1
        };
        let d = self.head_dim;
        let scale = LOG2_E / (d as f32).sqrt();
        self.qt.fill(0.0);
        let q_rows = q.get(start * d..self.rows.end * d).unwrap_or(&[]);
        for (r, row) in q_rows.chunks_exact(d).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                self.qt[c * self.block_q + r] = x * scale;
            }
        }
        let need = self.k_blocks * self.block_q * self.stride;
        if self.e.len() < need {
            self.e.resize(need, 0.0);
        }
        KERNEL.with(|k| (k.0)(self, keys));
        Ok(())
    }

    /// Keys of tile `kb` that row `r` sees (causal; keys past the last row of the block do not exist
    /// for it).
    pub fn visible(&self, r: usize, kb: usize) -> usize {
        let first = kb * self.block_k;
        (self.rows.start + r + 1)
            .saturating_sub(first)
            .min(self.block_k)
    }
}

/// `2^x` for `x <= 0`, relative error below 2e-7: the dense executor's polynomial, shared so that
/// statistics and kernels round the softmax the same way.
pub use runtime::exec::dense::exp2_fast;

/// Multiply-add, fused or not (the kernel is compiled once per flavour).
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}
struct Fused;
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}
struct Unfused;
impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

type KernelFn = fn(&mut RowBlock, &PackedKeys);
struct Kernel(KernelFn);

thread_local! {
    static KERNEL: Kernel = Kernel(select());
}

fn select() -> KernelFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return avx2;
        }
    }
    fill::<Unfused, 16>
}

#[cfg(target_arch = "x86_64")]
fn avx512(rb: &mut RowBlock, keys: &PackedKeys) {
    // SAFETY: selected only after `is_x86_feature_detected!` confirmed avx512f and fma.
    unsafe { avx512_inner(rb, keys) }
}

// The micro-kernel keeps `ROWS x C` accumulators. With 4 x 16 (four zmm registers) LLVM vectorizes it
// to broadcast-FMAs; 4 x 32 or 8 x 16 were compiled to scalar code with memory accumulators, 15-40x
// slower (rustc 1.95). Re-check with `perf annotate` and `examples/stats_bench.rs` before widening.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn avx512_inner(rb: &mut RowBlock, keys: &PackedKeys) {
    fill::<Fused, 16>(rb, keys)
}

#[cfg(target_arch = "x86_64")]
fn avx2(rb: &mut RowBlock, keys: &PackedKeys) {
    // SAFETY: selected only after `is_x86_feature_detected!` confirmed avx2 and fma.
    unsafe { avx2_inner(rb, keys) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_inner(rb: &mut RowBlock, keys: &PackedKeys) {
    fill::<Fused, 16>(rb, keys)
}

/// Scores of every causal tile, then the softmax statistics and `e` in place.
#[inline(always)]
fn fill<A: MulAdd, const C: usize>(rb: &mut RowBlock, keys: &PackedKeys) {
    let (bq, stride, d) = (rb.block_q, rb.stride, rb.head_dim);
    let rows = rb.rows.len();
    let tile_size = bq * stride;
    rb.m[..].fill(f32::NEG_INFINITY);
    for kb in 0..rb.k_blocks {
        let kt = keys.block(kb);
        let first = kb * rb.block_k;
        let n = rb.block_k.min(keys.seq_len - first);
        let ncols = n.div_ceil(C) * C;
        let s = &mut rb.e[kb * tile_size..(kb + 1) * tile_size];
        let mut r0 = 0;
        while r0 + ROWS <= rows {
            qk::<A, ROWS, C>(&rb.qt, bq, r0, kt, stride, d, ncols, s);
            r0 += ROWS;
        }
        while r0 < rows {
            qk::<A, 1, C>(&rb.qt, bq, r0, kt, stride, d, ncols, s);
            r0 += 1;
        }
        for r in 0..rows {
            let nv = (rb.rows.start + r + 1).saturating_sub(first).min(n);
            let row = &s[r * stride..r * stride + nv];
            rb.m[r] = rb.m[r].max(row_max(row));
        }
    }
    rb.l[..].fill(0.0);
    rb.t[..].fill(0.0);
    for kb in 0..rb.k_blocks {
        let first = kb * rb.block_k;
        let n = rb.block_k.min(keys.seq_len - first);
        let s = &mut rb.e[kb * tile_size..(kb + 1) * tile_size];
        for r in 0..bq {
            let row = &mut s[r * stride..(r + 1) * stride];
            let nv = if r < rows {
                (rb.rows.start + r + 1).saturating_sub(first).min(n)
            } else {
                0
            };
            let (sum, ts) = exp2_sums::<A>(&mut row[..nv], rb.m[r]);
            row[nv..].fill(0.0);
            rb.l[r] += f64::from(sum);
            rb.t[r] += f64::from(ts);
        }
    }
    for (inv, &l) in rb.inv_l.iter_mut().zip(&rb.l) {
        *inv = if l > 0.0 { (1.0 / l) as f32 } else { 0.0 };
    }
}

/// Rows `r0..r0 + R` of `S = Qs K^T` over the first `ncols` (a multiple of `C`) columns of a tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn qk<A: MulAdd, const R: usize, const C: usize>(
    qt: &[f32],
    bq: usize,
    r0: usize,
    kt: &[f32],
    stride: usize,
    d: usize,
    ncols: usize,
    s: &mut [f32],
) {
    for c0 in (0..ncols).step_by(C) {
        let mut acc = [[0.0f32; C]; R];
        for k in 0..d {
            let kv: &[f32; C] = arr(kt, k * stride + c0);
            let qv: &[f32; R] = arr(qt, k * bq + r0);
            for r in 0..R {
                for c in 0..C {
                    acc[r][c] = A::mul_add(qv[r], kv[c], acc[r][c]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let at = (r0 + r) * stride + c0;
            s[at..at + C].copy_from_slice(a);
        }
    }
}

/// `&s[at..at + N]` as an array (callers keep the range in bounds: tiles are padded to `PAD`).
#[inline(always)]
fn arr<const N: usize>(s: &[f32], at: usize) -> &[f32; N] {
    match s[at..at + N].try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("slice of length N"),
    }
}

/// Maximum of a row (`-inf` when empty), 16 lanes at a time.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    tail.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// `x = 2^(x - m)` in place; returns `(Σ 2^(x - m), Σ 2^(x - m) (x - m))`.
#[inline(always)]
fn exp2_sums<A: MulAdd>(x: &mut [f32], m: f32) -> (f32, f32) {
    let mut sum = [0.0f32; 16];
    let mut ts = [0.0f32; 16];
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        for ((v, s), t) in c.iter_mut().zip(&mut sum).zip(&mut ts) {
            let y = *v - m;
            let e = exp2_fast(y);
            *v = e;
            *s += e;
            *t = A::mul_add(e, y, *t);
        }
    }
    let (mut s1, mut t1) = (0.0f32, 0.0f32);
    for v in chunks.into_remainder() {
        let y = *v - m;
        let e = exp2_fast(y);
        *v = e;
        s1 += e;
        t1 += e * y;
    }
    (sum.iter().sum::<f32>() + s1, ts.iter().sum::<f32>() + t1)
}
