//! The CUDA benchmark of docs/perf.md ("CUDA runtime"), shared by `attnplan bench --device cuda` and
//! the `cuda_bench` example.
//!
//! Workload: one layer of [`Q_HEADS`] query heads over [`KV_HEADS`] KV heads, head_dim [`HEAD_DIM`]
//! (other shapes through [`BenchConfig`]'s fields), bf16, causal, vertical-slash with the budgets of
//! [`BenchConfig`] (v 1000, s 6096, last_q 64 by default), 64x64 blocks, on [`structured`] inputs.
//! [`measure`] times estimation, selection, sparse attention, end to end and dense with CUDA events
//! and returns a [`BenchResult`] (medians after two warm-ups) with the index it built; [`write_inputs`] writes the bf16 inputs, the index and
//! `bench.json` for `scripts/gpu/baselines.py`.
//!
//! This file is compiled with and without the `cuda` feature: without it, it runs against the stub of
//! `exec/cuda_disabled.rs`, so [`measure`] returns [`Error::CudaNotCompiled`] and the host-only parts
//! (inputs, formatting) still work.
//!
//! Structured inputs: noise (sum of three uniforms) plus, per head, an attention sink (token 0), a
//! local band (12 low-frequency rotary pairs shared by Q and K, so q_i . k_j peaks at i = j and decays
//! with |i - j|), and 16 heavy key columns ("vertical lines") at fixed positions. [`Band`] picks the
//! band's frequencies: [`Band::Scattered`] (the default) leaves most top diagonals far from the main
//! one, [`Band::Local`] makes them the nearest ones, the "local indexes" of shared/GPU.md's
//! MInference baseline.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;

use super::{bf16_bits, FlatIndex, Keys, SparsePrefill, VerticalSlashBuilder};
use crate::error::{Error, Result};
use crate::pattern::PatternContext;
use crate::AttnShape;

/// Query heads of the benchmark layer.
pub const Q_HEADS: usize = 32;
/// KV heads of the benchmark layer (GQA group of 4).
pub const KV_HEADS: usize = 8;
/// Head dimension of the benchmark layer.
pub const HEAD_DIM: usize = 128;
/// Sequence lengths of docs/perf.md: 8K, 32K, 128K, 256K tokens.
pub const DEFAULT_LENGTHS: [usize; 4] = [8192, 32768, 131072, 262144];
/// From this length on, dense attention is timed at most 3 times (it takes seconds).
pub const LONG_DENSE: usize = 131072;

/// Rotary pairs of the local band, on dims `8..8 + 2 * PAIRS`.
const PAIRS: usize = 12;

/// The local band of [`structured`] inputs: its rotary pairs' frequencies (geometric from the
/// highest to the lowest) and amplitude decide how far its attention reaches, and so where the top
/// diagonals of a vertical-slash selection land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Band {
    /// Frequencies 1/16 down to 1/4096 rad per token, amplitude 2: a sharp peak at i = j whose
    /// sidelobes (where many of the pairs' cosines meet again) reach every offset, so at 128K most
    /// of the top 6096 diagonals lie far from the main one (at head 0, 5525 beyond 8192 offsets)
    /// and the index computes 21% of the causal cells. The benchmark's inputs since it began.
    #[default]
    Scattered,
    /// Frequencies 1/4096 down to 1/65536 rad per token, amplitude 3: the band's score falls
    /// monotonically over the first ~12,800 offsets (the highest pair's half period), so the top
    /// 6096 diagonals are the nearest ones ("local indexes") and the index computes 10% of the
    /// causal cells at 128K and 5% at 256K, the densities of shared/GPU.md's MInference baseline.
    Local,
}

impl Band {
    /// Both, in the order the benchmark lists them.
    pub const ALL: [Band; 2] = [Band::Scattered, Band::Local];

    /// The name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Band::Scattered => "scattered",
            Band::Local => "local",
        }
    }

    /// Highest and lowest frequency (rad per token) and the amplitude of each pair.
    fn params(self) -> (f32, f32, f32) {
        match self {
            Band::Scattered => (1.0 / 16.0, 1.0 / 4096.0, 2.0),
            Band::Local => (1.0 / 4096.0, 1.0 / 65536.0, 3.0),
        }
    }
}

impl std::fmt::Display for Band {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Band {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Band::ALL
            .into_iter()
            .find(|b| b.name() == s.trim())
            .ok_or_else(|| format!("{s:?}: expected a band, scattered or local"))
    }
}
/// Smallest head_dim [`structured`] can fill (the band ends at dim `8 + 2 * PAIRS`).
pub const MIN_STRUCTURED_HEAD_DIM: usize = 8 + 2 * PAIRS;

/// One benchmark length and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchConfig {
    /// Tokens.
    pub seq_len: usize,
    /// Timed repetitions of each stage (0 is taken as 1); dense takes `min(reps, 3)` from
    /// [`LONG_DENSE`] tokens on.
    pub reps: usize,
    /// Vertical-slash column budget of every head (tokens).
    pub vertical: usize,
    /// Vertical-slash diagonal budget of every head.
    pub slash: usize,
    /// Query rows the estimate reads (the last `last_q`).
    pub last_q: usize,
    /// Query heads ([`Q_HEADS`] by default).
    pub q_heads: usize,
    /// KV heads ([`KV_HEADS`] by default; must divide `q_heads`).
    pub kv_heads: usize,
    /// Head dimension, 64 or 128 ([`HEAD_DIM`] by default).
    pub head_dim: usize,
    /// The structured inputs' local band ([`Band::Scattered`] by default).
    pub band: Band,
}

impl BenchConfig {
    /// The settings of docs/perf.md at `seq_len` tokens: 10 reps, v 1000, s 6096, last_q 64, 32 query
    /// heads over 8 KV heads of head_dim 128, the scattered band.
    pub fn new(seq_len: usize) -> Self {
        Self {
            seq_len,
            reps: 10,
            vertical: 1000,
            slash: 6096,
            last_q: 64,
            q_heads: Q_HEADS,
            kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            band: Band::Scattered,
        }
    }

    /// `[q_heads, seq_len, head_dim]` over `[kv_heads, seq_len, head_dim]`.
    pub fn shape(&self) -> AttnShape {
        AttnShape {
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            seq_len: self.seq_len,
            head_dim: self.head_dim,
        }
    }

    /// 64x64 blocks, `last_q` estimation rows.
    pub fn context(&self) -> PatternContext {
        PatternContext {
            seq_len: self.seq_len,
            block_q: 64,
            block_k: 64,
            last_q: self.last_q,
        }
    }

    /// Seed of the structured inputs (the same inputs at the same length in every run).
    pub fn seed(&self) -> u64 {
        7 + self.seq_len as u64
    }

    /// Timed repetitions of the sparse stages.
    pub fn sparse_reps(&self) -> usize {
        self.reps.max(1)
    }

    /// Timed repetitions of dense attention.
    pub fn dense_reps(&self) -> usize {
        if self.seq_len >= LONG_DENSE {
            self.sparse_reps().min(3)
        } else {
            self.sparse_reps()
        }
    }
}

/// What [`measure`] found at one length. Times are milliseconds of device time, medians.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    pub config: BenchConfig,
    /// Fraction of the causal cells of all heads the index computes.
    pub density: f64,
    /// Estimation (column and diagonal scores from the last `last_q` rows).
    pub estimate_ms: f32,
    /// Selection: top-k, list building and the 8-byte read-back of the list sizes.
    pub select_ms: f32,
    /// Sparse attention over the index.
    pub sparse_attn_ms: f32,
    /// Estimation + selection + sparse attention, timed as one piece.
    pub e2e_ms: f32,
    /// Dense causal attention with the same kernel.
    pub dense_ms: f32,
    /// Index size over all heads: key-block entries, column entries.
    pub entries: (usize, usize),
    /// Device name and compute capability.
    pub device: String,
    /// Attention kernel used for the benchmark's head_dim.
    pub kernel: String,
    /// Wall seconds to generate and upload the inputs.
    pub inputs_s: f64,
}

impl BenchResult {
    /// Dense causal FLOPs counted as `2 * N^2 * d * H` (the convention of docs/perf.md).
    pub fn dense_flops(&self) -> f64 {
        let c = &self.config;
        let n = c.seq_len as f64;
        2.0 * n * n * c.head_dim as f64 * c.q_heads as f64
    }

    /// TFLOP/s of sparse attention on the computed cells (dense FLOPs scaled by density).
    pub fn sparse_attn_tflops(&self) -> f64 {
        tflops(self.dense_flops() * self.density, self.sparse_attn_ms)
    }

    /// TFLOP/s of dense attention.
    pub fn dense_tflops(&self) -> f64 {
        tflops(self.dense_flops(), self.dense_ms)
    }

    /// Share of end to end spent building the index: `(estimate + select) / e2e`.
    pub fn index_share(&self) -> f64 {
        f64::from(self.estimate_ms + self.select_ms) / f64::from(self.e2e_ms)
    }

    /// One JSON object: the `bench.json` that `scripts/gpu/baselines.py` reads (fixed key order and
    /// float formatting).
    pub fn to_json(&self) -> String {
        let c = &self.config;
        let mut js = String::new();
        let _ = write!(
            js,
            "{{\"n\":{},\"q_heads\":{},\"kv_heads\":{},\"head_dim\":{},\"v\":{},\"s\":{},\
             \"last_q\":{},\"reps\":{},\"dense_reps\":{},\"density\":{:.5},\"estimate_ms\":{:.4},\
             \"select_ms\":{:.4},\"sparse_attn_ms\":{:.4},\"e2e_ms\":{:.4},\"dense_ms\":{:.4},\
             \"sparse_attn_tflops_on_cells\":{:.1},\"dense_tflops\":{:.1},\"index_share\":{:.4},\
             \"entries\":[{},{}],\"inputs_s\":{:.1},\"device\":{},\"kernel\":{},\"band\":{}}}",
            c.seq_len,
            c.q_heads,
            c.kv_heads,
            c.head_dim,
            c.vertical,
            c.slash,
            c.last_q,
            c.sparse_reps(),
            c.dense_reps(),
            self.density,
            self.estimate_ms,
            self.select_ms,
            self.sparse_attn_ms,
            self.e2e_ms,
            self.dense_ms,
            self.sparse_attn_tflops(),
            self.dense_tflops(),
            self.index_share(),
            self.entries.0,
            self.entries.1,
            self.inputs_s,
            json_string(&self.device),
            json_string(&self.kernel),
            json_string(c.band.name()),
        );
        js
    }

    /// The one-line summary the benchmark prints per length.
    pub fn summary(&self) -> String {
        format!(
            "bench n={} ({} band): density {:.4}; estimate {:.3} ms, select {:.3} ms, sparse attention {:.3} ms \
             ({:.0} TFLOP/s on computed cells), end-to-end {:.3} ms (index share {:.1}%), dense {:.3} ms \
             ({:.0} TFLOP/s); inputs {:.1} s",
            self.config.seq_len,
            self.config.band,
            self.density,
            self.estimate_ms,
            self.select_ms,
            self.sparse_attn_ms,
            self.sparse_attn_tflops(),
            self.e2e_ms,
            100.0 * self.index_share(),
            self.dense_ms,
            self.dense_tflops(),
            self.inputs_s
        )
    }
}

fn tflops(flops: f64, ms: f32) -> f64 {
    flops / (f64::from(ms) * 1e-3) / 1e12
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Median (the upper one for an even count); NaN for no samples.
pub fn median(mut x: Vec<f32>) -> f32 {
    x.sort_by(f32::total_cmp);
    x.get(x.len() / 2).copied().unwrap_or(f32::NAN)
}

/// The median of `reps` CUDA-event timings of the work `f` queues.
pub fn median_ms(
    sp: &SparsePrefill,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f32> {
    let times = (0..reps)
        .map(|_| sp.time_ms(&mut f))
        .collect::<Result<Vec<f32>>>()?;
    Ok(median(times))
}

/// Times one length on `sp`: inputs generated and uploaded, two warm-ups of index building, sparse
/// and dense attention, then `reps` timed rounds of estimate, select, sparse attention and end to end
/// (each with CUDA events around it), then the dense runs. Returns the medians and the index of the
/// last build.
///
/// Errors: [`Error::CudaNotCompiled`] without the `cuda` feature; driver errors as [`Error::Cuda`].
pub fn measure(sp: &SparsePrefill, cfg: &BenchConfig) -> Result<(BenchResult, FlatIndex)> {
    let shape = cfg.shape();
    let ctx = cfg.context();
    let t0 = Instant::now();
    let (qd, kd, vd) = {
        let (q, k, v) = structured_band(&shape, cfg.seed(), cfg.band)?;
        (
            sp.upload_bf16(&q)?,
            sp.upload_bf16(&k)?,
            sp.upload_bf16(&v)?,
        )
    };
    let inputs_s = t0.elapsed().as_secs_f64();
    let mut out = sp.zeros::<u16>(qd.len())?;
    let mut b = VerticalSlashBuilder::new(sp, &shape, &ctx)?;
    let budgets = vec![(cfg.vertical, cfg.slash); shape.q_heads];
    let mut ix = None;
    let no_index = || Error::Cuda("the vertical-slash builder wrote no index".into());
    for _ in 0..2 {
        b.build(sp, &qd, &kd, &budgets, &mut ix)?;
        let i = ix.as_ref().ok_or_else(no_index)?;
        sp.forward(&shape, &qd, &kd, &vd, Keys::Index(i), &mut out)?;
        sp.forward(&shape, &qd, &kd, &vd, Keys::Dense, &mut out)?;
    }
    sp.device().synchronize()?;
    let reps = cfg.sparse_reps();
    let (mut est, mut sel, mut att, mut e2e) = (
        Vec::with_capacity(reps),
        Vec::with_capacity(reps),
        Vec::with_capacity(reps),
        Vec::with_capacity(reps),
    );
    for _ in 0..reps {
        est.push(sp.time_ms(|| b.estimate(sp, &qd, &kd))?);
        sel.push(sp.time_ms(|| b.select(sp, &budgets, &mut ix))?);
        let i = ix.as_ref().ok_or_else(no_index)?;
        att.push(sp.time_ms(|| sp.forward(&shape, &qd, &kd, &vd, Keys::Index(i), &mut out))?);
        e2e.push(sp.time_ms(|| {
            b.build(sp, &qd, &kd, &budgets, &mut ix)?;
            let i = ix.as_ref().ok_or_else(no_index)?;
            sp.forward(&shape, &qd, &kd, &vd, Keys::Index(i), &mut out)
        })?);
    }
    let mut dense = Vec::with_capacity(cfg.dense_reps());
    for _ in 0..cfg.dense_reps() {
        dense.push(sp.time_ms(|| sp.forward(&shape, &qd, &kd, &vd, Keys::Dense, &mut out))?);
    }
    let flat = sp.download_index(ix.as_ref().ok_or_else(no_index)?)?;
    let kernel = sp
        .kernel_resources()?
        .into_iter()
        .nth(usize::from(shape.head_dim != 64))
        .map(|r| r.0)
        .unwrap_or_default();
    let result = BenchResult {
        config: *cfg,
        density: flat.density(),
        estimate_ms: median(est),
        select_ms: median(sel),
        sparse_attn_ms: median(att),
        e2e_ms: median(e2e),
        dense_ms: median(dense),
        entries: (flat.blk_idx.len(), flat.col_idx.len()),
        device: sp.device().describe()?,
        kernel,
        inputs_s,
    };
    Ok((result, flat))
}

/// Writes what `scripts/gpu/baselines.py` reads into `dir` (created if missing): `bench.json`, the
/// inputs `q.bf16`, `k.bf16`, `v.bf16` (regenerated from the seed: cheaper than keeping three host
/// copies alive) and the index (`blk_off.u32`, `blk_idx.u32`, `col_off.u32`, `col_idx.u32`).
pub fn write_inputs(dir: &Path, result: &BenchResult, index: &FlatIndex) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let shape = result.config.shape();
    let c = &result.config;
    let (q, k, v) = structured_band(&shape, c.seed(), c.band)?;
    let to_bits = |x: &[f32]| x.par_iter().map(|&y| bf16_bits(y)).collect::<Vec<u16>>();
    write_u16(&dir.join("q.bf16"), &to_bits(&q))?;
    write_u16(&dir.join("k.bf16"), &to_bits(&k))?;
    write_u16(&dir.join("v.bf16"), &to_bits(&v))?;
    write_index(dir, index)?;
    write_file(&dir.join("bench.json"), result.to_json().as_bytes())
}

/// Writes `bytes` to `path`.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `data` to `path` as little-endian u16 (bf16 bits).
pub fn write_u16(path: &Path, data: &[u16]) -> Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    write_file(path, &bytes)
}

/// Writes `data` to `path` as little-endian u32.
pub fn write_u32(path: &Path, data: &[u32]) -> Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    write_file(path, &bytes)
}

/// Writes the four arrays of `index` to `dir` as `blk_off.u32`, `blk_idx.u32`, `col_off.u32`,
/// `col_idx.u32`.
pub fn write_index(dir: &Path, index: &FlatIndex) -> Result<()> {
    write_u32(&dir.join("blk_off.u32"), &index.blk_off)?;
    write_u32(&dir.join("blk_idx.u32"), &index.blk_idx)?;
    write_u32(&dir.join("col_off.u32"), &index.col_off)?;
    write_u32(&dir.join("col_idx.u32"), &index.col_idx)
}

/// Deterministic noise in [-1, 1) (xorshift64*), `n` values from stream `seed`.
fn uniform(n: usize, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = (seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .wrapping_mul(0x2545_F491_4F6C_DD1D)
                | 1;
            for x in chunk.iter_mut() {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
                *x = (r >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            }
        });
    out
}

/// Roughly unit-variance deterministic noise: the sum of three uniforms in [-1, 1).
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let (a, b, c) = (
        uniform(n, seed),
        uniform(n, seed + 101),
        uniform(n, seed + 202),
    );
    a.iter()
        .zip(&b)
        .zip(&c)
        .map(|((x, y), z)| x + y + z)
        .collect()
}

/// Q, K, V (f32) in `shape`'s layout with a sink, the scattered local band and vertical lines (see
/// the module docs). Needs `head_dim >= MIN_STRUCTURED_HEAD_DIM`.
pub fn structured(shape: &AttnShape, seed: u64) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    structured_band(shape, seed, Band::Scattered)
}

/// [`structured`] with the local band `band`.
pub fn structured_band(
    shape: &AttnShape,
    seed: u64,
    band: Band,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    shape.check()?;
    let (n, d) = (shape.seq_len, shape.head_dim);
    if d < MIN_STRUCTURED_HEAD_DIM {
        return Err(Error::Shape(format!(
            "structured inputs need head_dim >= {MIN_STRUCTURED_HEAD_DIM}, got {d}"
        )));
    }
    let overflow = || Error::Shape(format!("attention shape {shape:?} overflows usize"));
    let (q_len, kv_len) = (
        shape.q_len().ok_or_else(overflow)?,
        shape.kv_len().ok_or_else(overflow)?,
    );
    let mut q = noise(q_len, seed);
    let mut k = noise(kv_len, seed + 1);
    let v = noise(kv_len, seed + 2);
    if n == 0 {
        return Ok((q, k, v));
    }
    // Rotary pairs on dims 8..8+2*PAIRS, frequencies geometric from f_hi down to f_lo.
    let (f_hi, f_lo, amp) = band.params();
    let freq = |m: usize| f_hi * (f_lo / f_hi).powf(m as f32 / (PAIRS - 1) as f32);
    let lines: Vec<usize> = (0..16).map(|i| (i * 7919 + 1237) % n).collect();
    let band = |row: &mut [f32], pos: usize| {
        for (m, pair) in row[8..8 + 2 * PAIRS].chunks_exact_mut(2).enumerate() {
            let a = pos as f32 * freq(m);
            pair[0] = amp * a.cos();
            pair[1] = amp * a.sin();
        }
    };
    q.par_chunks_mut(n * d).enumerate().for_each(|(h, qh)| {
        let boost = 1.0 + 0.1 * (h % 4) as f32;
        for (i, row) in qh.chunks_exact_mut(d).enumerate() {
            row[0] = 4.0 * boost; // meets the sink and the lines
            band(row, i);
        }
    });
    k.par_chunks_mut(n * d).for_each(|kh| {
        for (j, row) in kh.chunks_exact_mut(d).enumerate() {
            row[0] = if j == 0 {
                6.0
            } else if lines.contains(&j) {
                3.5
            } else {
                0.0
            };
            band(row, j);
        }
    });
    Ok((q, k, v))
}
