//! Llama-family weights in f32, loaded by name from any [`TensorSource`] (GGUF or safetensors) and
//! checked against the [`ModelConfig`].

use super::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

/// A store of named tensors that can hand them out as f32 on the CPU.
pub(crate) trait TensorSource {
    /// The file (or directory) named in errors.
    fn path(&self) -> &Path;
    fn contains(&self, name: &str) -> bool;
    /// The tensor converted to f32, or `None` when absent.
    fn load_f32(&mut self, name: &str) -> Result<Option<Tensor>>;
}

/// Tensor names of one format. Layer tensors are `{layer_prefix}{i}.{name}`; projections add
/// `.weight` or `.bias`.
pub(crate) struct Naming {
    pub embed: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
    pub layer_prefix: &'static str,
    pub attn_norm: &'static str,
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub o: &'static str,
    pub ffn_norm: &'static str,
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

/// A projection `y = x W^T (+ b)`; `w` is `[out, in]`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl Linear {
    /// Stacks projections of the same input along the output dimension, so one matmul computes all.
    fn stack(parts: &[Linear]) -> Result<Self> {
        let ws: Vec<&Tensor> = parts.iter().map(|l| &l.w).collect();
        let bs: Option<Vec<&Tensor>> = parts.iter().map(|l| l.b.as_ref()).collect();
        Ok(Self {
            w: Tensor::cat(&ws, 0)?,
            b: bs.map(|bs| Tensor::cat(&bs, 0)).transpose()?,
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct LayerWeights {
    pub attn_norm: Tensor,
    /// Q, K and V stacked: `[q_heads * head_dim + 2 * kv_heads * head_dim, hidden]` (one matmul).
    pub qkv: Linear,
    pub o: Linear,
    pub ffn_norm: Tensor,
    /// Gate and up stacked: `[2 * intermediate, hidden]` (one matmul).
    pub gate_up: Linear,
    pub down: Linear,
}

#[derive(Debug, Clone)]
pub(crate) struct Weights {
    /// `[vocab, hidden]`
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    /// `[vocab, hidden]`; the same tensor as `embed` when tied.
    pub lm_head: Tensor,
}

struct Loader<'a, S: TensorSource> {
    src: &'a mut S,
}

impl<S: TensorSource> Loader<'_, S> {
    fn err(&self, name: &str, message: String) -> Error {
        Error::Model {
            path: self.src.path().to_path_buf(),
            field: name.to_string(),
            message,
        }
    }

    /// A required tensor of exactly `shape`.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .src
            .load_f32(name)?
            .ok_or_else(|| self.err(name, "missing tensor".into()))?;
        if t.dims() != shape {
            return Err(self.err(name, format!("shape {:?}, expected {shape:?}", t.dims())));
        }
        if t.dtype() != DType::F32 {
            return Ok(t.to_dtype(DType::F32)?);
        }
        Ok(t)
    }

    fn linear(&mut self, base: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.get(&format!("{base}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.get(&format!("{base}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }
}

impl Weights {
    /// Loads every tensor the forward needs, checking shapes against `cfg`.
    pub fn load<S: TensorSource>(src: &mut S, names: &Naming, cfg: &ModelConfig) -> Result<Self> {
        let mut ld = Loader { src };
        let (h, v, ff) = (cfg.hidden, cfg.vocab, cfg.intermediate);
        let q_out = cfg.q_heads * cfg.head_dim;
        let kv_out = cfg.kv_heads * cfg.head_dim;
        let embed = ld.get(names.embed, &[v, h])?;
        let final_norm = ld.get(names.final_norm, &[h])?;
        let lm_head = if cfg.tie_embeddings || !ld.src.contains(names.lm_head) {
            embed.clone()
        } else {
            ld.get(names.lm_head, &[v, h])?
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = |n: &str| format!("{}{i}.{n}", names.layer_prefix);
            layers.push(LayerWeights {
                attn_norm: ld.get(&p(names.attn_norm), &[h])?,
                qkv: Linear::stack(&[
                    ld.linear(&p(names.q), q_out, h, cfg.qkv_bias)?,
                    ld.linear(&p(names.k), kv_out, h, cfg.qkv_bias)?,
                    ld.linear(&p(names.v), kv_out, h, cfg.qkv_bias)?,
                ])?,
                o: ld.linear(&p(names.o), h, q_out, false)?,
                ffn_norm: ld.get(&p(names.ffn_norm), &[h])?,
                gate_up: Linear::stack(&[
                    ld.linear(&p(names.gate), ff, h, false)?,
                    ld.linear(&p(names.up), ff, h, false)?,
                ])?,
                down: ld.linear(&p(names.down), h, ff, false)?,
            });
        }
        Ok(Self {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }
}
