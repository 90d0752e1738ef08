//! [`Model`]: a loaded Llama-family decoder with its tokenizer, and our forward with the attention hook.
//!
//! Per layer: RMSNorm → Q/K/V projections (+ bias) → RoPE → **[`LayerAttention::attend`]** → output
//! projection → residual → RMSNorm → SwiGLU MLP → residual; then the final RMSNorm and the LM head.
//! Everything but attention is position-wise, so it runs in chunks of [`CHUNK_ROWS`] tokens, the
//! chunks in parallel on rayon: each chunk runs its steps back to back (its matmuls effectively
//! single-threaded), so two cores need no barrier per step, and the temporaries stay far below glibc's
//! 32 MB mmap threshold (a spike saw run time double when every large temporary was a fresh mmap).
//! The projections are candle matmuls; the element-wise steps (RMSNorm, residual adds, RoPE and the
//! head layout, SwiGLU's gate) are our own passes over slices (see [`super::layers`]).

use super::config::{ModelConfig, ModelFormat, ModelSpec, TensorDesc};
use super::gguf::{GgufFile, GGUF_NAMING};
use super::hf_dir::{self, HfTensors, HF_NAMING};
use super::layers::{
    add_rms_norm_rows, add_rows, gather_heads, linear_rows, rms_norm_in_place, rms_norm_rows,
    scatter_heads, silu_mul, with_f32, RopeTable,
};
use super::weights::Weights;
use super::{tokenizer, LayerAttention};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor, D};
use rayon::prelude::*;
use runtime::{AttentionInput, AttnShape};
use std::path::Path;

/// Tokens per chunk of the position-wise parts; chunks run in parallel on rayon (16 chunks at 8K).
pub const CHUNK_ROWS: usize = 512;
/// Positions per chunk of the LM head in [`Model::next_token_logprobs`] (`128 x 49152` f32 = 25 MB).
const LOGIT_ROWS: usize = 128;

/// A loaded model: configuration, f32 weights, tokenizer.
pub struct Model {
    spec: ModelSpec,
    weights: Weights,
    tokenizer: tokenizers::Tokenizer,
}

/// Final hidden states after the last RMSNorm: `[seq_len, hidden]` row-major.
#[derive(Debug, Clone)]
pub struct Hidden {
    pub data: Vec<f32>,
    pub seq_len: usize,
    pub hidden: usize,
}

/// Logits `[rows, vocab]` row-major.
#[derive(Debug, Clone)]
pub struct Logits {
    pub data: Vec<f32>,
    pub rows: usize,
    pub vocab: usize,
}

impl Logits {
    /// Row `i` (`vocab` values); empty when out of range.
    pub fn row(&self, i: usize) -> &[f32] {
        self.data
            .get(i * self.vocab..(i + 1) * self.vocab)
            .unwrap_or(&[])
    }

    /// Index of the largest logit of row `i` (first on ties).
    pub fn argmax(&self, i: usize) -> Option<u32> {
        argmax(self.row(i))
    }
}

/// Index of the largest value (first on ties); `None` when empty.
pub fn argmax(x: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.and_then(|(i, _)| u32::try_from(i).ok())
}

impl Model {
    /// Loads a `.gguf` file or a Hugging Face directory (weights to f32, tokenizer, vocab check).
    pub fn load(path: &Path) -> Result<Self> {
        let spec = ModelSpec::read(path)?;
        let (weights, tokenizer) = match spec.format {
            ModelFormat::Gguf => {
                let mut file = GgufFile::open(path)?;
                let tok = tokenizer::from_gguf(&file)?;
                (Weights::load(&mut file, &GGUF_NAMING, &spec.config)?, tok)
            }
            ModelFormat::HfDir => {
                let tok = hf_dir::load_tokenizer(path)?;
                let mut src = HfTensors::open(path)?;
                (Weights::load(&mut src, &HF_NAMING, &spec.config)?, tok)
            }
        };
        let tok_path = match spec.format {
            ModelFormat::Gguf => path.to_path_buf(),
            ModelFormat::HfDir => path.join("tokenizer.json"),
        };
        tokenizer::check_vocab(&tokenizer, spec.config.vocab, &tok_path)?;
        Ok(Self {
            spec,
            weights,
            tokenizer,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.spec.config
    }

    /// The file or directory it was loaded from.
    pub fn path(&self) -> &Path {
        &self.spec.path
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The f32 weights, for other forwards over the same model (the differentiable one in
    /// [`crate::gated`]).
    pub(crate) fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Stored tensors in file order (name, shape, stored dtype), for fingerprints.
    pub fn tensor_descs(&self) -> Vec<TensorDesc> {
        self.spec.tensors.clone()
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text`, without added BOS (SmolLM2 adds none).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| self.tok_err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| self.tok_err(e))
    }

    fn tok_err(&self, e: tokenizers::Error) -> Error {
        Error::Model {
            path: self.spec.path.clone(),
            field: "tokenizer".into(),
            message: e.to_string(),
        }
    }

    fn input_err(&self, message: String) -> Error {
        Error::Model {
            path: self.spec.path.clone(),
            field: "input".into(),
            message,
        }
    }

    /// Runs all layers with `attn` as the attention of every layer; returns the hidden states after
    /// the final RMSNorm.
    pub fn forward_hidden(&self, tokens: &[u32], attn: &mut dyn LayerAttention) -> Result<Hidden> {
        let cfg = &self.spec.config;
        let t = tokens.len();
        if t == 0 {
            return Err(self.input_err("no tokens".into()));
        }
        if let Some(w) = cfg.sliding_window.filter(|&w| t > w) {
            return Err(self.input_err(format!(
                "{t} tokens exceed the sliding window of {w}; only full causal attention is implemented"
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab) {
            return Err(self.input_err(format!("token id {bad} >= vocabulary size {}", cfg.vocab)));
        }
        let (h, d) = (cfg.hidden, cfg.head_dim);
        let shape = AttnShape {
            q_heads: cfg.q_heads,
            kv_heads: cfg.kv_heads,
            seq_len: t,
            head_dim: d,
        };
        let too_long = || self.input_err(format!("{t} tokens overflow the buffer sizes"));
        let q_len = shape.q_len().ok_or_else(too_long)?;
        let kv_len = shape.kv_len().ok_or_else(too_long)?;
        let rope = RopeTable::new(t, d, cfg.rope_theta);
        let dev = Device::Cpu;

        let ids = Tensor::from_slice(tokens, t, &dev)?;
        let mut x: Vec<f32> = self
            .weights
            .embed
            .index_select(&ids, 0)?
            .flatten_all()?
            .to_vec1()?;
        let (mut q, mut k, mut v) = (
            vec![0.0f32; q_len],
            vec![0.0f32; kv_len],
            vec![0.0f32; kv_len],
        );
        let mut att = vec![0.0f32; q_len];
        let (q_cols, kv_cols, ff) = (cfg.q_heads * d, cfg.kv_heads * d, cfg.intermediate);
        let eps = cfg.rms_eps as f32;
        let stride = q_cols + 2 * kv_cols;
        let rot = Some((&rope, cfg.rope_style));

        for (li, lw) in self.weights.layers.iter().enumerate() {
            let attn_norm: Vec<f32> = lw.attn_norm.to_vec1()?;
            let ffn_norm: Vec<f32> = lw.ffn_norm.to_vec1()?;
            // RMSNorm and the Q/K/V projection, chunks of rows in parallel (single-threaded matmuls
            // side by side: no barrier between the steps of a chunk).
            let ys = x
                .par_chunks(CHUNK_ROWS * h)
                .map(|xc| {
                    let mut xn = vec![0.0f32; xc.len()];
                    rms_norm_rows(xc, &attn_norm, eps, &mut xn);
                    linear_rows(&xn, xc.len() / h, &lw.qkv)
                })
                .collect::<Result<Vec<_>>>()?;
            for (ci, y) in ys.iter().enumerate() {
                let first = ci * CHUNK_ROWS;
                with_f32(y, |y| {
                    for (col, heads, buf, r) in [
                        (0, cfg.q_heads, &mut q, rot),
                        (q_cols, cfg.kv_heads, &mut k, rot),
                        (q_cols + kv_cols, cfg.kv_heads, &mut v, None),
                    ] {
                        scatter_heads(y, stride, col, first, heads, d, t, r, buf);
                    }
                })?;
            }
            drop(ys);
            let input = AttentionInput::new(shape, &q, &k, &v)?;
            attn.attend(li, &input, &mut att)?;
            // Output projection, residual, RMSNorm, MLP, residual: chunks of rows in parallel.
            let att = &att;
            x.par_chunks_mut(CHUNK_ROWS * h).enumerate().try_for_each(
                |(ci, xs)| -> Result<()> {
                    let rows = xs.len() / h;
                    let mut a = vec![0.0f32; rows * q_cols];
                    gather_heads(att, ci * CHUNK_ROWS, cfg.q_heads, d, t, &mut a);
                    let o = linear_rows(&a, rows, &lw.o)?;
                    let mut xn = vec![0.0f32; rows * h];
                    with_f32(&o, |o| add_rms_norm_rows(xs, o, &ffn_norm, eps, &mut xn))?;
                    let gu = linear_rows(&xn, rows, &lw.gate_up)?;
                    let mut gated = vec![0.0f32; rows * ff];
                    with_f32(&gu, |gu| silu_mul(gu, ff, &mut gated))?;
                    let down = linear_rows(&gated, rows, &lw.down)?;
                    with_f32(&down, |down| add_rows(xs, down))
                },
            )?;
        }
        let final_norm: Vec<f32> = self.weights.final_norm.to_vec1()?;
        rms_norm_in_place(&mut x, &final_norm, eps);
        Ok(Hidden {
            data: x,
            seq_len: t,
            hidden: h,
        })
    }

    /// Logits of positions `rows` of `hidden`.
    pub fn logits_rows(&self, hidden: &Hidden, rows: std::ops::Range<usize>) -> Result<Logits> {
        let h = hidden.hidden;
        let slice = hidden
            .data
            .get(rows.start * h..rows.end * h)
            .ok_or_else(|| {
                self.input_err(format!(
                    "rows {rows:?} outside {} positions",
                    hidden.seq_len
                ))
            })?;
        let n = rows.len();
        let xs = Tensor::from_slice(slice, (n, h), &Device::Cpu)?;
        let data = xs
            .matmul(&self.weights.lm_head.t()?)?
            .flatten_all()?
            .to_vec1()?;
        Ok(Logits {
            data,
            rows: n,
            vocab: self.spec.config.vocab,
        })
    }

    /// Logits of the last position (`vocab` values).
    pub fn logits_last(&self, hidden: &Hidden) -> Result<Vec<f32>> {
        let t = hidden.seq_len;
        Ok(self.logits_rows(hidden, t.saturating_sub(1)..t)?.data)
    }

    /// `log p(tokens[i + 1] | tokens[..=i])` for `i in 0..seq_len - 1` (natural log), computed
    /// `LOGIT_ROWS` positions at a time so memory stays small at any length.
    pub fn next_token_logprobs(&self, hidden: &Hidden, tokens: &[u32]) -> Result<Vec<f32>> {
        let t = hidden.seq_len;
        if tokens.len() != t {
            return Err(self.input_err(format!("{} tokens for {t} hidden positions", tokens.len())));
        }
        let mut out = Vec::with_capacity(t.saturating_sub(1));
        for first in (0..t.saturating_sub(1)).step_by(LOGIT_ROWS) {
            let end = (first + LOGIT_ROWS).min(t - 1);
            let logits = self.logits_rows(hidden, first..end)?.data;
            let lt = Tensor::from_vec(logits, (end - first, self.spec.config.vocab), &Device::Cpu)?;
            let logp = candle_nn::ops::log_softmax(&lt, D::Minus1)?;
            let targets =
                Tensor::from_slice(&tokens[first + 1..end + 1], (end - first, 1), &Device::Cpu)?;
            let picked: Vec<f32> = logp.gather(&targets, 1)?.flatten_all()?.to_vec1()?;
            out.extend(picked);
        }
        Ok(out)
    }

    /// Logits of every position: `seq_len x vocab` f32 (1.6 GB at 8K tokens for SmolLM2; prefer
    /// [`Model::forward_hidden`] with [`Model::next_token_logprobs`] or [`Model::logits_last`]).
    pub fn forward(&self, tokens: &[u32], attn: &mut dyn LayerAttention) -> Result<Logits> {
        let hidden = self.forward_hidden(tokens, attn)?;
        self.logits_rows(&hidden, 0..hidden.seq_len)
    }

    /// Logits of the last position only.
    pub fn forward_last(&self, tokens: &[u32], attn: &mut dyn LayerAttention) -> Result<Vec<f32>> {
        let hidden = self.forward_hidden(tokens, attn)?;
        self.logits_last(&hidden)
    }

    /// Greedy continuation of `tokens` by `n` tokens (a full forward per token; for tests and demos).
    pub fn greedy(
        &self,
        tokens: &[u32],
        n: usize,
        attn: &mut dyn LayerAttention,
    ) -> Result<Vec<u32>> {
        let mut all = tokens.to_vec();
        for _ in 0..n {
            let logits = self.forward_last(&all, attn)?;
            let next = argmax(&logits).ok_or_else(|| self.input_err("empty logits".into()))?;
            all.push(next);
        }
        Ok(all.split_off(tokens.len()))
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.spec.path)
            .field("config", &self.spec.config)
            .finish_non_exhaustive()
    }
}
