//! attnplan runtime: what each sparse pattern of a plan computes, and the executors that compute it.
//!
//! - [`AttnShape`] and [`AttentionInput`]: the one layout every executor and hook speaks
//!   (Q `[q_heads, seq_len, head_dim]`, K and V `[kv_heads, seq_len, head_dim]`, row-major f32, after RoPE).
//! - [`exec`]: executors (dense tiled CPU attention; the sparse executor builds on it; f64 reference).
//! - [`prefill`]: [`SparsePrefill`], one model's prefill attention run layer by layer from a plan
//!   (index building with [`build_index`], then the sparse CPU executor), with [`PrefillStats`].
//!
//! The crate is thin on purpose: no model code, no tokenizer, no candle.

pub mod error;
pub mod exec;
pub mod pattern;
pub mod prefill;
mod shape;
#[doc(hidden)]
pub mod test_util;

pub use error::{Error, Result};
pub use pattern::{build_index, HeadIndex, HeadQk, PatternContext};
pub use prefill::{DenseReason, PrefillOptions, PrefillStats, PrefillTotals, SparsePrefill};
pub use shape::{AttentionInput, AttnShape};
