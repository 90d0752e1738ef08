//! What a model is, read without loading weights: [`ModelConfig`], [`TensorDesc`], [`ModelSpec`].

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i + 1)`: GGUF llama files, whose Q/K rows llama.cpp permuted for this form
    /// (`candle_nn::rotary_emb::rope_i`).
    Interleaved,
    /// Pairs `(i, i + head_dim / 2)`: Hugging Face checkpoints and GGUF qwen2
    /// (`candle_nn::rotary_emb::rope`).
    HalfSplit,
}

/// Where the model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// One `.gguf` file (weights dequantized to f32 at load).
    Gguf,
    /// A Hugging Face directory: `config.json`, `model.safetensors` (or a sharded index),
    /// `tokenizer.json`.
    HfDir,
}

/// Hyper-parameters of a Llama-family decoder, from GGUF metadata or `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// GGUF `general.architecture` (`llama`, `qwen2`) or the `config.json` architecture
    /// (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`).
    pub architecture: String,
    /// Rows of the embedding matrix (may exceed the tokenizer's vocabulary, never fall short of it).
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    /// Trained context length (`context_length`, `max_position_embeddings`).
    pub max_context: usize,
    /// The LM head reuses the token embedding.
    pub tie_embeddings: bool,
    /// Q, K and V projections have biases (Qwen2).
    pub qkv_bias: bool,
    pub rope_style: RopeStyle,
    /// Sliding-window attention size when the checkpoint uses one; the forward refuses longer inputs,
    /// since our attention is full causal.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// Query heads per KV head.
    pub fn gqa_group(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    /// Checks the numbers are usable by our forward; `path` names the file they came from.
    pub(crate) fn check(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, message: String| {
            Err(Error::Model {
                path: path.to_path_buf(),
                field: field.to_string(),
                message,
            })
        };
        for (field, v) in [
            ("vocab", self.vocab),
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
            ("layers", self.layers),
            ("q_heads", self.q_heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return bad(field, "must be positive, found 0".into());
            }
        }
        if self.q_heads % self.kv_heads != 0 {
            return bad(
                "kv_heads",
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    self.q_heads, self.kv_heads
                ),
            );
        }
        if self.head_dim % 2 != 0 {
            return bad(
                "head_dim",
                format!("RoPE needs an even head_dim, found {}", self.head_dim),
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(
                "rope_theta",
                format!("must be positive, found {}", self.rope_theta),
            );
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(
                "rms_eps",
                format!("must be non-negative, found {}", self.rms_eps),
            );
        }
        Ok(())
    }
}

/// One stored tensor as the file declares it (for fingerprints; no data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDesc {
    pub name: String,
    /// Row-major dimensions (`[out, in]` for a projection).
    pub shape: Vec<usize>,
    /// The stored type as the format names it: `Q4_1`, `F32` (GGUF), `BF16`, `F16`, `F32` (safetensors).
    pub dtype: String,
}

/// A model's configuration and tensor list, read from metadata only (GGUF header, or `config.json`
/// plus safetensors headers): cheap, for `attnplan validate --model` and fingerprints.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The `.gguf` file or the Hugging Face directory.
    pub path: PathBuf,
    pub format: ModelFormat,
    pub config: ModelConfig,
    /// Tensors in file order (GGUF: by data offset; safetensors: shard file name, then offset).
    pub tensors: Vec<TensorDesc>,
}

impl ModelSpec {
    /// Reads a `.gguf` file or a Hugging Face directory (chosen by whether `path` is a directory).
    pub fn read(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            super::hf_dir::read_spec(path)
        } else {
            super::gguf::read_spec(path)
        }
    }

    /// The tensor list (same as the `tensors` field), for fingerprinting.
    pub fn tensor_descs(&self) -> Vec<TensorDesc> {
        self.tensors.clone()
    }
}
