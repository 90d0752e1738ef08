//! Attention executors over [`crate::AttentionInput`].
//!
//! - [`dense`]: exact causal attention, tiled with an online softmax ([`dense_attention`]); its tile
//!   routine ([`TileState`], [`KeyBlock`]) is the building block of the sparse executor.

pub mod dense;

pub use dense::{dense_attention, KeyBlock, PackedKeys, TileState, Visible};
