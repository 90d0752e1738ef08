//! The building blocks of the Llama-family forward, each written once: RMSNorm, projections, RoPE
//! (both pairings), the head layout change to and from [`runtime::AttentionInput`] (GQA is left to the
//! executor: query head `h` reads KV head `h / group`), and the SwiGLU MLP.
//!
//! Projections are candle matmuls (the `gemm` crate, multi-threaded on rayon); everything
//! element-wise works on `f32` slices in place, in parallel over rows on rayon, each op one pass:
//! candle's element-wise ops allocate a tensor per op and run on candle's own spinning thread pool,
//! which on two cores competed with the rayon threads of the matmuls and attention.

use super::config::RopeStyle;
use super::weights::Linear;
use crate::error::Result;
use candle_core::{Device, Storage, Tensor};
use rayon::prelude::*;

/// Token rows per rayon task in the row-wise passes (576-wide rows: about 72 KB per task).
const PAR_ROWS: usize = 32;

/// `x W^T (+ b)` for `x` `[rows, in]`.
pub(crate) fn linear(x: &Tensor, l: &Linear) -> Result<Tensor> {
    let y = x.matmul(&l.w.t()?)?;
    Ok(match &l.b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// [`linear`] of `rows` token rows held in a slice (`x.len() / rows` inputs per row).
pub(crate) fn linear_rows(x: &[f32], rows: usize, l: &Linear) -> Result<Tensor> {
    let inp = x.len() / rows.max(1);
    linear(&Tensor::from_slice(x, (rows, inp), &Device::Cpu)?, l)
}

/// Runs `f` on the data of a contiguous f32 CPU tensor, without copying it out.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("expected a CPU tensor".into()).into());
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
    Ok(f(&data[start..end]))
}

/// Sum of squares, 16 lanes (vectorizes; the order differs from a sequential sum by rounding only).
#[inline]
fn sum_sq(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `1 / sqrt(mean(x^2) + eps)`.
#[inline]
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    1.0 / (sum_sq(x) / x.len() as f32 + eps).sqrt()
}

/// RMSNorm of each row of `x` (`w.len()` wide) into `out`: `x / sqrt(mean(x^2) + eps) * w`.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .with_min_len(PAR_ROWS)
        .for_each(|(o, x)| {
            let inv = rms_scale(x, eps);
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                *o = x * inv * w;
            }
        });
}

/// RMSNorm of each row of `x` in place.
pub(crate) fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    x.par_chunks_mut(w.len())
        .with_min_len(PAR_ROWS)
        .for_each(|x| {
            let inv = rms_scale(x, eps);
            for (x, &w) in x.iter_mut().zip(w) {
                *x *= inv * w;
            }
        });
}

/// The residual add and the next RMSNorm in one pass: `x += delta`, then `out = RMSNorm(x) * w`.
pub(crate) fn add_rms_norm_rows(
    x: &mut [f32],
    delta: &[f32],
    w: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let h = w.len();
    out.par_chunks_mut(h)
        .zip(x.par_chunks_mut(h))
        .zip(delta.par_chunks(h))
        .with_min_len(PAR_ROWS)
        .for_each(|((o, x), d)| {
            for (x, &d) in x.iter_mut().zip(d) {
                *x += d;
            }
            let inv = rms_scale(x, eps);
            for ((o, &x), &w) in o.iter_mut().zip(x.iter()).zip(w) {
                *o = x * inv * w;
            }
        });
}

/// The residual add `x += delta`, in parallel.
pub(crate) fn add_rows(x: &mut [f32], delta: &[f32]) {
    x.par_chunks_mut(PAR_ROWS * 1024)
        .zip(delta.par_chunks(PAR_ROWS * 1024))
        .for_each(|(x, d)| {
            for (x, &d) in x.iter_mut().zip(d) {
                *x += d;
            }
        });
}

/// SwiGLU's gate: `out[r] = silu(gate[r]) * up[r]` where row `r` of `gu` is `[gate | up]`
/// (`2 * ff` values) and `silu(g) = g / (1 + e^-g)`, with `e^-g` from [`runtime::exec::dense::exp2_fast`]
/// (relative error below 2e-7; candle's `silu` uses libm's `expf`).
pub(crate) fn silu_mul(gu: &[f32], ff: usize, out: &mut [f32]) {
    let kernel = silu_kernel();
    out.par_chunks_mut(ff)
        .zip(gu.par_chunks(2 * ff))
        .with_min_len(PAR_ROWS / 4)
        .for_each(|(o, gu)| {
            let (g, u) = gu.split_at(ff);
            kernel(g, u, o);
        });
}

type SiluFn = fn(&[f32], &[f32], &mut [f32]);

/// The widest flavour of [`silu_row`] this CPU runs.
fn silu_kernel() -> SiluFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return silu_avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return silu_avx2;
        }
    }
    silu_row
}

#[cfg(target_arch = "x86_64")]
fn silu_avx512(g: &[f32], u: &[f32], o: &mut [f32]) {
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn inner(g: &[f32], u: &[f32], o: &mut [f32]) {
        silu_row(g, u, o)
    }
    // SAFETY: selected only after `is_x86_feature_detected!` confirmed avx512f.
    unsafe { inner(g, u, o) }
}

#[cfg(target_arch = "x86_64")]
fn silu_avx2(g: &[f32], u: &[f32], o: &mut [f32]) {
    #[target_feature(enable = "avx2,fma")]
    fn inner(g: &[f32], u: &[f32], o: &mut [f32]) {
        silu_row(g, u, o)
    }
    // SAFETY: selected only after `is_x86_feature_detected!` confirmed avx2 and fma.
    unsafe { inner(g, u, o) }
}

#[inline(always)]
fn silu_row(g: &[f32], u: &[f32], o: &mut [f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        let e = runtime::exec::dense::exp2_fast(-g * std::f32::consts::LOG2_E);
        *o = g / (1.0 + e) * u;
    }
}

/// RoPE angles for positions `0..seq_len`: `cos` and `sin`, `[seq_len, head_dim / 2]` row-major, with
/// frequency `theta^(-2i / head_dim)` computed in f32 as candle's Llama models do.
#[derive(Debug, Clone)]
pub(crate) struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(seq_len: usize, head_dim: usize, theta: f32) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for pos in 0..seq_len {
            for &f in &inv_freq {
                let a = pos as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates one head vector `x` (`head_dim` values) for position `pos`, writing `dst`.
    #[inline]
    pub fn apply(&self, style: RopeStyle, pos: usize, x: &[f32], dst: &mut [f32]) {
        let h = self.half;
        let cos = &self.cos[pos * h..(pos + 1) * h];
        let sin = &self.sin[pos * h..(pos + 1) * h];
        match style {
            RopeStyle::Interleaved => {
                for (i, (d, s)) in dst.chunks_exact_mut(2).zip(x.chunks_exact(2)).enumerate() {
                    d[0] = s[0] * cos[i] - s[1] * sin[i];
                    d[1] = s[0] * sin[i] + s[1] * cos[i];
                }
            }
            RopeStyle::HalfSplit => {
                let (x1, x2) = x.split_at(h);
                let (d1, d2) = dst.split_at_mut(h);
                for i in 0..h {
                    d1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                    d2[i] = x1[i] * sin[i] + x2[i] * cos[i];
                }
            }
        }
    }
}

/// Scatters token rows of a projection into the head-major buffer `dst` `[heads, seq_len, head_dim]`,
/// rotating by RoPE when `rope` is given. Row `t` of `src` (row stride `stride`) is token `first + t`;
/// its columns `col..col + heads * head_dim` are read. Parallel over heads and blocks of rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scatter_heads(
    src: &[f32],
    stride: usize,
    col: usize,
    first: usize,
    heads: usize,
    head_dim: usize,
    seq_len: usize,
    rope: Option<(&RopeTable, RopeStyle)>,
    dst: &mut [f32],
) {
    let rows = src.len() / stride;
    dst.par_chunks_mut(seq_len * head_dim)
        .take(heads)
        .enumerate()
        .for_each(|(h, dst_h)| {
            dst_h[first * head_dim..(first + rows) * head_dim]
                .par_chunks_mut(PAR_ROWS * head_dim)
                .enumerate()
                .for_each(|(blk, d)| {
                    for (i, d) in d.chunks_exact_mut(head_dim).enumerate() {
                        let t = blk * PAR_ROWS + i;
                        let at = t * stride + col + h * head_dim;
                        let x = &src[at..at + head_dim];
                        match rope {
                            Some((table, style)) => table.apply(style, first + t, x, d),
                            None => d.copy_from_slice(x),
                        }
                    }
                });
        });
}

/// Gathers token rows `first..first + rows` of a head-major buffer `[heads, seq_len, head_dim]` into
/// token-major `out` `[rows, heads * head_dim]` (the input of the output projection).
pub(crate) fn gather_heads(
    src: &[f32],
    first: usize,
    heads: usize,
    head_dim: usize,
    seq_len: usize,
    out: &mut [f32],
) {
    out.par_chunks_mut(heads * head_dim)
        .enumerate()
        .with_min_len(PAR_ROWS)
        .for_each(|(r, o)| {
            for (h, o) in o.chunks_exact_mut(head_dim).enumerate() {
                let at = (h * seq_len + first + r) * head_dim;
                o.copy_from_slice(&src[at..at + head_dim]);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Our RoPE against candle's `rope_i` / `rope` on the same table: equal within f32 rounding.
    #[test]
    fn rope_matches_candle() -> Result<()> {
        let (t, d, heads) = (7, 8, 2);
        let table = RopeTable::new(t, d, 10_000.0);
        let x: Vec<f32> = (0..heads * t * d)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let dev = Device::Cpu;
        let xt = Tensor::from_slice(&x, (1, heads, t, d), &dev)?;
        let cos = Tensor::from_slice(&table.cos, (t, d / 2), &dev)?;
        let sin = Tensor::from_slice(&table.sin, (t, d / 2), &dev)?;
        for (style, want) in [
            (
                RopeStyle::Interleaved,
                candle_nn::rotary_emb::rope_i(&xt, &cos, &sin)?,
            ),
            (
                RopeStyle::HalfSplit,
                candle_nn::rotary_emb::rope(&xt, &cos, &sin)?,
            ),
        ] {
            let want = want.flatten_all()?.to_vec1::<f32>()?;
            let mut got = vec![0.0; x.len()];
            for h in 0..heads {
                for p in 0..t {
                    let at = (h * t + p) * d;
                    table.apply(style, p, &x[at..at + d], &mut got[at..at + d]);
                }
            }
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "{style:?}: worst difference {worst}");
        }
        Ok(())
    }
}
