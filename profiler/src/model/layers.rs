//! The building blocks of the Llama-family forward, each written once: RMSNorm, projections, RoPE
//! (both pairings), the head layout change to and from [`runtime::AttentionInput`] (GQA is left to the
//! executor: query head `h` reads KV head `h / group`), and the SwiGLU MLP.

use super::config::RopeStyle;
use super::weights::Linear;
use crate::error::Result;
use candle_core::Tensor;

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension (candle's kernel, as the references use).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(x, w, eps as f32)?)
}

/// `x W^T + b` for `x` `[rows, in]`.
pub(crate) fn linear(x: &Tensor, l: &Linear) -> Result<Tensor> {
    let y = x.matmul(&l.w.t()?)?;
    Ok(match &l.b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// SwiGLU: `down(silu(gate(x)) * up(x))`, with gate and up stacked in `gate_up` (`[2 * ff, in]`).
pub(crate) fn mlp(x: &Tensor, gate_up: &Linear, down: &Linear) -> Result<Tensor> {
    let gu = linear(x, gate_up)?;
    let ff = gu.dim(1)? / 2;
    let g = candle_nn::ops::silu(&gu.narrow(1, 0, ff)?)?;
    let u = gu.narrow(1, ff, ff)?;
    linear(&(g * u)?, down)
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
/// its columns `col..col + heads * head_dim` are read.
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
    for (t, row) in src.chunks_exact(stride).enumerate() {
        let row = &row[col..col + heads * head_dim];
        let pos = first + t;
        for (h, x) in row.chunks_exact(head_dim).enumerate() {
            let at = (h * seq_len + pos) * head_dim;
            let d = &mut dst[at..at + head_dim];
            match rope {
                Some((table, style)) => table.apply(style, pos, x, d),
                None => d.copy_from_slice(x),
            }
        }
    }
}

/// Gathers token rows `first..first + rows` of a head-major buffer `[heads, seq_len, head_dim]` into
/// token-major `[rows, heads * head_dim]` (the input of the output projection).
pub(crate) fn gather_heads(
    src: &[f32],
    first: usize,
    rows: usize,
    heads: usize,
    head_dim: usize,
    seq_len: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * heads * head_dim);
    for pos in first..first + rows {
        for h in 0..heads {
            let at = (h * seq_len + pos) * head_dim;
            out.extend_from_slice(&src[at..at + head_dim]);
        }
    }
    out
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
