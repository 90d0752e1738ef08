//! DuoAttention's gated forward: a differentiable copy of the model's forward in candle tensors, in
//! which every KV head mixes full and streaming attention by a gate.
//!
//! - [`GatedModel`]: the forward over a loaded [`Model`]'s weights (constants; only the gates are a
//!   [`Var`]); per layer and KV head `g`, every query head of the group outputs
//!   `g · full + (1 − g) · streaming`, where streaming attention sees the first `sink` tokens and the
//!   `recent` tokens up to and including the query (token granularity, causal).
//! - [`GatedModel::step`]: DuoAttention's objective on one sample, `mean((h_gated − h_dense)^2) +
//!   λ · mean(gates)` over the final hidden states (after the last RMSNorm) of chosen rows (the
//!   answer's, as DuoAttention), and its gradient with respect to the gates.
//! - [`StreamingHeads`]: a [`LayerAttention`] for the fast forward that runs exact streaming attention
//!   (same sink and window) for chosen KV heads and dense attention for the rest: the deployed form of a
//!   gated model whose gates are 0 or 1.
//!
//! The fast forward ([`Model::forward_hidden`]) streams f32 slices and is not differentiable; this one
//! materializes `[q_heads, T, T]` scores per layer and keeps the whole graph for backprop (about
//! 0.3 GB per layer at 1K tokens for SmolLM2), so it is meant for modest lengths (512–1024 tokens).
//! Op order follows the fast forward (RMSNorm, stacked QKV, RoPE, attention, output projection,
//! residual, RMSNorm, SwiGLU, residual), with candle's slow, differentiable RMSNorm and RoPE.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Shape, Tensor, Var};
use rayon::prelude::*;
use runtime::AttentionInput;

use crate::error::{Error, Result};
use crate::model::{Hidden, LayerAttention, Model, RopeStyle};

/// The gated forward over a model's weights.
pub struct GatedModel<'m> {
    model: &'m Model,
    sink: usize,
    recent: usize,
}

/// One evaluation of DuoAttention's objective.
#[derive(Debug, Clone)]
pub struct GateStep {
    /// `distill + reg`.
    pub loss: f64,
    /// Mean squared error of the final hidden states against the dense model.
    pub distill: f64,
    /// `λ · mean(gates)`.
    pub reg: f64,
    /// `d loss / d gate`, `[layers * kv_heads]` (layer-major).
    pub grad: Vec<f32>,
}

impl<'m> GatedModel<'m> {
    /// `sink` first tokens and `recent` last tokens (the query's own included) for streaming attention.
    pub fn new(model: &'m Model, sink: usize, recent: usize) -> Self {
        Self {
            model,
            sink,
            recent: recent.max(1),
        }
    }

    /// Number of gates: one per (layer, KV head), layer-major.
    pub fn gate_count(&self) -> usize {
        let cfg = self.model.config();
        cfg.layers * cfg.kv_heads
    }

    fn input_err(&self, message: String) -> Error {
        Error::Model {
            path: self.model.path().to_path_buf(),
            field: "gated forward".into(),
            message,
        }
    }

    /// Final hidden states `[T, hidden]` (after the last RMSNorm) of the gated model; differentiable in
    /// `gates` (`[layers, kv_heads]`, values in `[0, 1]`).
    pub fn forward(&self, tokens: &[u32], gates: &Tensor) -> Result<Tensor> {
        let cfg = self.model.config();
        let w = self.model.weights();
        let t = tokens.len();
        if t == 0 {
            return Err(self.input_err("no tokens".into()));
        }
        if gates.dims() != [cfg.layers, cfg.kv_heads] {
            return Err(self.input_err(format!(
                "gates of shape {:?}, expected [{}, {}]",
                gates.dims(),
                cfg.layers,
                cfg.kv_heads
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab) {
            return Err(self.input_err(format!("token id {bad} >= vocabulary size {}", cfg.vocab)));
        }
        let dev = Device::Cpu;
        let (d, qh, kvh) = (cfg.head_dim, cfg.q_heads, cfg.kv_heads);
        let group = cfg.gqa_group();
        let eps = cfg.rms_eps as f32;
        let (cos, sin) = rope_tables(t, d, cfg.rope_theta, &dev)?;
        let scale = 1.0 / (d as f64).sqrt();

        let ids = Tensor::from_slice(tokens, t, &dev)?;
        let mut x = w.embed.index_select(&ids, 0)?;
        for (li, lw) in w.layers.iter().enumerate() {
            let xn = candle_nn::ops::rms_norm_slow(&x, &lw.attn_norm, eps)?;
            let mut y = xn.apply_op1(Frozen(lw.qkv.w.clone()))?;
            if let Some(b) = &lw.qkv.b {
                y = y.broadcast_add(b)?;
            }
            // [T, heads * d] -> [1, heads, T, d]
            let heads = |col: usize, n: usize| -> Result<Tensor> {
                Ok(y.narrow(1, col, n * d)?
                    .reshape((t, n, d))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)?)
            };
            let rope = |x: Tensor| -> Result<Tensor> {
                Ok(match cfg.rope_style {
                    RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i_slow(&x, &cos, &sin)?,
                    RopeStyle::HalfSplit => candle_nn::rotary_emb::rope_slow(&x, &cos, &sin)?,
                })
            };
            let q = (rope(heads(0, qh)?)? * scale)?.reshape((kvh, group * t, d))?;
            let k = rope(heads(qh * d, kvh)?)?.reshape((kvh, t, d))?;
            let v = heads((qh + kvh) * d, kvh)?.reshape((kvh, t, d))?;
            // Full and streaming attention of every query head: [2, kv, group * T, d].
            let pair = q.contiguous()?.apply_op3(
                &k.contiguous()?,
                &v.contiguous()?,
                PairAttention {
                    seq_len: t,
                    head_dim: d,
                    group,
                    sink: self.sink,
                    recent: self.recent,
                },
            )?;
            let (of, os) = (pair.get(0)?, pair.get(1)?);
            let g = gates.narrow(0, li, 1)?.reshape((kvh, 1, 1))?;
            let o = (&os + (of - &os)?.broadcast_mul(&g)?)?
                .reshape((qh, t, d))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((t, qh * d))?;
            let x1 = (o.apply_op1(Frozen(lw.o.w.clone()))? + &x)?;
            let xn = candle_nn::ops::rms_norm_slow(&x1, &lw.ffn_norm, eps)?;
            let gu = xn.apply_op1(Frozen(lw.gate_up.w.clone()))?;
            let ff = gu.dim(1)? / 2;
            let act = (candle_nn::ops::silu(&gu.narrow(1, 0, ff)?)? * gu.narrow(1, ff, ff)?)?;
            x = (act.apply_op1(Frozen(lw.down.w.clone()))? + x1)?;
        }
        Ok(candle_nn::ops::rms_norm_slow(&x, &w.final_norm, eps)?)
    }

    /// Final hidden states of the gated model for gate values `gates` (`[layers * kv_heads]`).
    pub fn hidden(&self, tokens: &[u32], gates: &[f32]) -> Result<Hidden> {
        let g = self.gate_tensor(gates)?;
        let h = self.forward(tokens, &g)?;
        let (seq_len, hidden) = h.dims2()?;
        Ok(Hidden {
            data: h.flatten_all()?.to_vec1()?,
            seq_len,
            hidden,
        })
    }

    fn gate_tensor(&self, gates: &[f32]) -> Result<Tensor> {
        let cfg = self.model.config();
        if gates.len() != self.gate_count() {
            return Err(self.input_err(format!(
                "{} gates, expected {} (layers x KV heads)",
                gates.len(),
                self.gate_count()
            )));
        }
        Ok(Tensor::from_slice(
            gates,
            (cfg.layers, cfg.kv_heads),
            &Device::Cpu,
        )?)
    }

    /// DuoAttention's loss on one sample and its gradient in the gates: `target` is the dense model's
    /// final hidden states of the same `tokens` ([`Model::forward_hidden`] with dense attention), and
    /// the squared error is averaged over the rows `rows` only (DuoAttention supervises the rows that
    /// predict the answer; `0..tokens.len()` averages over all).
    pub fn step(
        &self,
        tokens: &[u32],
        target: &Hidden,
        rows: Range<usize>,
        gates: &[f32],
        lambda: f64,
    ) -> Result<GateStep> {
        if target.seq_len != tokens.len() || target.hidden != self.model.config().hidden {
            return Err(self.input_err(format!(
                "target hidden states [{}, {}] for {} tokens",
                target.seq_len,
                target.hidden,
                tokens.len()
            )));
        }
        if rows.is_empty() || rows.end > tokens.len() {
            return Err(self.input_err(format!("loss rows {rows:?} for {} tokens", tokens.len())));
        }
        let var = Var::from_tensor(&self.gate_tensor(gates)?)?;
        let h = self.forward(tokens, var.as_tensor())?;
        let want = Tensor::from_slice(&target.data, (target.seq_len, target.hidden), &Device::Cpu)?;
        let (h, want) = (
            h.narrow(0, rows.start, rows.len())?,
            want.narrow(0, rows.start, rows.len())?,
        );
        let distill = (h - want)?.sqr()?.mean_all()?;
        let reg = (var.as_tensor().mean_all()? * lambda)?;
        let loss = (&distill + &reg)?;
        let grads = loss.backward()?;
        let grad = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1()?,
            None => vec![0.0; self.gate_count()],
        };
        Ok(GateStep {
            loss: f64::from(loss.to_scalar::<f32>()?),
            distill: f64::from(distill.to_scalar::<f32>()?),
            reg: f64::from(reg.to_scalar::<f32>()?),
            grad,
        })
    }
}

/// RoPE `cos`, `sin` `[T, head_dim / 2]` with frequency `theta^(-2i / head_dim)` in f32, as the fast
/// forward's table.
fn rope_tables(t: usize, d: usize, theta: f32, dev: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / d as f32))
        .collect();
    let (mut cos, mut sin) = (Vec::with_capacity(t * d / 2), Vec::with_capacity(t * d / 2));
    for pos in 0..t {
        for &f in &inv {
            let a = pos as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, d / 2), dev)?,
        Tensor::from_vec(sin, (t, d / 2), dev)?,
    ))
}

/// `x W^T` for a frozen weight `W` `[out, in]`: candle's matmul backward also computes the
/// weight's gradient, which would double the backward's matrix work for nothing.
struct Frozen(Tensor);

impl CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Tensor::from_slice(contiguous(s, l)?, l.shape(), &Device::Cpu)?;
        let y = x.matmul(&self.0.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.0)?))
    }
}

/// The streaming keys of query `i`: sinks `0..sink_end`, then the window (disjoint from the sinks),
/// both within `0..=i`.
#[inline]
pub fn window_keys(
    i: usize,
    sink: usize,
    recent: usize,
) -> (usize, std::ops::RangeInclusive<usize>) {
    let sink_end = sink.min(i + 1);
    let start = (i + 1).saturating_sub(recent.max(1)).max(sink_end);
    (sink_end, start..=i)
}

/// Full (causal) and streaming attention of every query head, forward and backward, as one candle
/// op: `q` `[kv, group * T, d]` (scaled, head `kv * group + j` at rows `j * T..`), `k`, `v` `[kv, T, d]`
/// → `[2, kv, group * T, d]` (full, then streaming). Row by row with the softmax recomputed in the
/// backward pass, so memory stays `O(T · d)`; parallel over query heads.
struct PairAttention {
    seq_len: usize,
    head_dim: usize,
    group: usize,
    sink: usize,
    recent: usize,
}

/// Gradients of one query head: `dq` `[T, d]`, and its share of `dk`, `dv` `[T, d]`.
type HeadGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

impl PairAttention {
    /// `(query heads, KV heads, head_dim)` from the lengths of `q` and `k`.
    fn dims(&self, q_len: usize, kv_len: usize) -> candle_core::Result<(usize, usize, usize)> {
        let (t, d) = (self.seq_len, self.head_dim);
        let n = t * d;
        let (heads, kvh) = (q_len / n.max(1), kv_len / n.max(1));
        if n == 0 || heads * n != q_len || kvh * n != kv_len || heads != kvh * self.group {
            candle_core::bail!(
                "pair attention: q {q_len} and kv {kv_len} values for {t} tokens of {d} dims, group {}",
                self.group
            );
        }
        Ok((heads, kvh, d))
    }

    /// Runs `f(h, q_head, k_head, v_head)` for every query head in parallel.
    fn per_head<R: Send>(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        f: impl Fn(usize, &[f32], &[f32], &[f32]) -> R + Sync,
    ) -> candle_core::Result<Vec<R>> {
        let (heads, _, d) = self.dims(q.len(), k.len())?;
        let n = self.seq_len * d;
        Ok((0..heads)
            .into_par_iter()
            .map(|h| {
                let kv = h / self.group;
                f(
                    h,
                    &q[h * n..(h + 1) * n],
                    &k[kv * n..(kv + 1) * n],
                    &v[kv * n..(kv + 1) * n],
                )
            })
            .collect())
    }
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("pair attention needs contiguous inputs"),
    }
}

fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1()
}

impl CustomOp3 for PairAttention {
    fn name(&self) -> &'static str {
        "gated-pair-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous(s1, l1)?,
            contiguous(s2, l2)?,
            contiguous(s3, l3)?,
        );
        let (heads, kvh, d) = self.dims(q.len(), k.len())?;
        let t = self.seq_len;
        let outs = self.per_head((q, k, v), |_, q, k, v| {
            let (mut full, mut stream) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
            let mut p = Vec::with_capacity(t);
            for i in 0..t {
                let qi = &q[i * d..(i + 1) * d];
                let o = &mut full[i * d..(i + 1) * d];
                attend_row(qi, 0..=i, k, v, 1.0, &mut p, o);
                let (sink_end, window) = window_keys(i, self.sink, self.recent);
                let o = &mut stream[i * d..(i + 1) * d];
                attend_row(qi, (0..sink_end).chain(window), k, v, 1.0, &mut p, o);
            }
            (full, stream)
        })?;
        let mut out = Vec::with_capacity(2 * heads * t * d);
        out.extend(outs.iter().flat_map(|(f, _)| f.iter().copied()));
        out.extend(outs.iter().flat_map(|(_, s)| s.iter().copied()));
        Ok((
            CpuStorage::F32(out),
            Shape::from((2, kvh, self.group * t, d)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (qv, kv_, vv) = (values(q)?, values(k)?, values(v)?);
        let (o, go) = (values(res)?, values(grad_res)?);
        let (heads, kvh, d) = self.dims(qv.len(), kv_.len())?;
        let t = self.seq_len;
        let n = t * d;
        let half = heads * n;
        let grads: Vec<HeadGrads> = self.per_head((&qv, &kv_, &vv), |h, q, k, v| {
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
            let mut p = Vec::with_capacity(t);
            for (branch, at) in [(0, h * n), (1, half + h * n)] {
                for i in 0..t {
                    let row = at + i * d..at + (i + 1) * d;
                    let (oi, gi) = (&o[row.clone()], &go[row]);
                    let dqi = &mut dq[i * d..(i + 1) * d];
                    let qi = &q[i * d..(i + 1) * d];
                    let rows = RowGrads {
                        k,
                        v,
                        dk: &mut dk,
                        dv: &mut dv,
                    };
                    if branch == 0 {
                        backward_row(qi, 0..=i, oi, gi, &mut p, dqi, rows);
                    } else {
                        let (sink_end, window) = window_keys(i, self.sink, self.recent);
                        backward_row(qi, (0..sink_end).chain(window), oi, gi, &mut p, dqi, rows);
                    }
                }
            }
            (dq, dk, dv)
        })?;
        let mut dq = Vec::with_capacity(heads * n);
        let (mut dk, mut dv) = (vec![0.0f32; kvh * n], vec![0.0f32; kvh * n]);
        for (h, (gq, gk, gv)) in grads.iter().enumerate() {
            dq.extend_from_slice(gq);
            let kv = h / self.group;
            for (a, b) in dk[kv * n..(kv + 1) * n].iter_mut().zip(gk) {
                *a += b;
            }
            for (a, b) in dv[kv * n..(kv + 1) * n].iter_mut().zip(gv) {
                *a += b;
            }
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Softmax attention of one query row over `keys` (ascending positions) of `k`, `v` (`[T, d]`):
/// writes `o` (`d` values); `p` is scratch.
#[inline]
fn attend_row(
    q: &[f32],
    keys: impl Iterator<Item = usize> + Clone,
    k: &[f32],
    v: &[f32],
    scale: f32,
    p: &mut Vec<f32>,
    o: &mut [f32],
) {
    let d = q.len();
    p.clear();
    let mut max = f32::NEG_INFINITY;
    for j in keys.clone() {
        let s = dot(q, &k[j * d..(j + 1) * d]) * scale;
        max = max.max(s);
        p.push(s);
    }
    let mut sum = 0.0;
    for s in p.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    o.fill(0.0);
    for (j, &w) in keys.zip(p.iter()) {
        axpy(w / sum, &v[j * d..(j + 1) * d], o);
    }
}

/// K, V of one KV head and the gradient buffers of one query head's share.
struct RowGrads<'a> {
    k: &'a [f32],
    v: &'a [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// Backward of [`attend_row`] (scale 1) for output `o` with incoming gradient `g`: adds to `dq`
/// and to `dk`, `dv` at the keys' rows.
#[inline]
fn backward_row(
    q: &[f32],
    keys: impl Iterator<Item = usize> + Clone,
    o: &[f32],
    g: &[f32],
    p: &mut Vec<f32>,
    dq: &mut [f32],
    r: RowGrads<'_>,
) {
    let d = q.len();
    p.clear();
    let mut max = f32::NEG_INFINITY;
    for j in keys.clone() {
        let s = dot(q, &r.k[j * d..(j + 1) * d]);
        max = max.max(s);
        p.push(s);
    }
    let mut sum = 0.0;
    for s in p.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let delta = dot(g, o);
    for (j, &w) in keys.zip(p.iter()) {
        let pj = w / sum;
        let (kj, vj) = (&r.k[j * d..(j + 1) * d], &r.v[j * d..(j + 1) * d]);
        let ds = pj * (dot(g, vj) - delta);
        axpy(ds, kj, dq);
        axpy(ds, q, &mut r.dk[j * d..(j + 1) * d]);
        axpy(pj, g, &mut r.dv[j * d..(j + 1) * d]);
    }
}

/// Dot product with eight independent sums, so it vectorizes.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a * x`.
#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// A [`LayerAttention`]: dense attention ([`runtime::exec::dense_attention`]) for every head, then
/// exact streaming attention (first `sink` tokens and the `recent` up to the query, per token) for the
/// query heads of the KV heads marked in `streaming` (`[layers * kv_heads]`, layer-major). In one
/// forward over prompt and answer this is also what a decoder that keeps only sink and window in
/// those heads' KV cache computes (DuoAttention's decoding).
#[derive(Debug, Clone)]
pub struct StreamingHeads {
    pub streaming: Vec<bool>,
    pub kv_heads: usize,
    pub sink: usize,
    pub recent: usize,
}

impl LayerAttention for StreamingHeads {
    fn attend(&mut self, layer: usize, input: &AttentionInput<'_>, out: &mut [f32]) -> Result<()> {
        runtime::exec::dense_attention(input, out)?;
        let shape = input.shape;
        let (t, d) = (shape.seq_len, shape.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        let mut p: Vec<f32> = Vec::new();
        for h in 0..shape.q_heads {
            let kv = shape.kv_head_of(h);
            let marked = self.kv_heads == shape.kv_heads
                && self
                    .streaming
                    .get(layer * self.kv_heads + kv)
                    .copied()
                    .unwrap_or(false);
            if !marked {
                continue;
            }
            for i in 0..t {
                let (sink_end, window) = window_keys(i, self.sink, self.recent);
                let o = &mut out[(h * t + i) * d..(h * t + i + 1) * d];
                attend_row(
                    input.q_row(h, i),
                    (0..sink_end).chain(window),
                    input.k_head(kv),
                    input.v_head(kv),
                    scale,
                    &mut p,
                    o,
                );
            }
        }
        Ok(())
    }
}
