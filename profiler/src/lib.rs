//! attnplan profiler: runs a real model on calibration data and captures exact per-head attention
//! statistics, streamed in tiles.
//!
//! - [`model`]: model loading (GGUF file, Hugging Face directory), tokenizer, and our own Llama-family
//!   forward with a hook right after RoPE ([`model::LayerAttention`]).
//! - [`data`]: calibration data (text, JSONL, synthetic retrieval tasks with their answers).
//! - [`gated`]: DuoAttention's gated forward (differentiable in per-KV-head gates) and a
//!   [`model::LayerAttention`] running streaming attention for chosen KV heads.
//! - [`sparse`]: [`sparse::SparseAttention`], a [`model::LayerAttention`] running a plan's sparse
//!   prefill ([`runtime::SparsePrefill`]) in every layer.

pub mod data;
pub mod error;
pub mod gated;
pub mod heatmap;
pub mod identity;
pub mod model;
pub mod profile;
mod profile_stats;
pub mod profiling;
pub mod sparse;
pub mod stats;

pub use error::{Error, Result};
