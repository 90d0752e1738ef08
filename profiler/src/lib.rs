//! attnplan profiler: runs a real model on calibration data and captures exact per-head attention
//! statistics, streamed in tiles.
//!
//! - [`model`]: model loading (GGUF file, Hugging Face directory), tokenizer, and our own Llama-family
//!   forward with a hook right after RoPE ([`model::LayerAttention`]).
//! - [`data`]: calibration data (text, JSONL, synthetic retrieval tasks with their answers).

pub mod data;
pub mod error;
pub mod model;
pub mod profile;
pub mod stats;

pub use error::{Error, Result};
