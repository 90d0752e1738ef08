//! attnplan runtime: what each sparse pattern of a plan computes, and the executors that compute it.
//!
//! - [`AttnShape`] and [`AttentionInput`]: the one layout every executor and hook speaks
//!   (Q `[q_heads, seq_len, head_dim]`, K and V `[kv_heads, seq_len, head_dim]`, row-major f32, after RoPE).
//! - [`exec`]: executors (dense tiled CPU attention; the sparse executor builds on it).
//!
//! The crate is thin on purpose: no model code, no tokenizer, no candle.

pub mod error;
pub mod exec;
pub mod pattern;
mod shape;

pub use error::{Error, Result};
pub use pattern::{build_index, HeadIndex, HeadQk, PatternContext};
pub use shape::{AttentionInput, AttnShape};
