//! Attention executors over [`crate::AttentionInput`].
//!
//! - [`dense`]: exact causal attention, tiled with an online softmax ([`dense_attention`]); its tile
//!   routine ([`TileState`], [`KeyBlock`]) is the building block of the sparse executor.
//! - [`sparse`]: exact attention over the cells of one index per query head ([`sparse_attention`],
//!   indexes seen through [`CellLists`], implemented by [`crate::HeadIndex`]).
//! - [`reference`](mod@reference): f64 attention from the definition, restricted to any cell predicate (tests).
//! - [`cuda`]: the CUDA executor (sparse flash attention over `HeadIndex` lists, GPU vertical-slash
//!   index building); without the `cuda` feature a stub with the same API returns
//!   [`crate::Error::CudaNotCompiled`].

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_disabled.rs"]
pub mod cuda;
pub mod dense;
pub mod reference;
pub mod sparse;

pub use dense::{dense_attention, KeyBlock, PackedKeys, TileState, Visible};
pub use sparse::{sparse_attention, CellLists};
