//! [`LayerStats`]: what one `PlanPrefill::forward` did (host only; compiled with and without the
//! `cuda` feature).

use crate::prefill::DenseReason;

/// What one [`PlanPrefill::forward`](super::PlanPrefill::forward) did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerStats {
    /// Why every head ran dense, if they did.
    pub dense: Option<DenseReason>,
    /// Query heads whose index the GPU vertical-slash builder made.
    pub gpu_vertical_slash: usize,
    /// Query heads whose index the GPU block-sparse builder made.
    pub gpu_block_sparse: usize,
    /// Query heads whose index the GPU token-select builder made.
    pub gpu_token_select: usize,
    /// Query-adaptive heads: branch and budgets decided on the GPU, both branches' indexes built by
    /// the GPU builders.
    pub gpu_query_adaptive: usize,
    /// Query heads with a static pattern (index made on the host without reading Q or K).
    pub host_static: usize,
    /// Query heads using the index of another head of their KV group (`share_kv_group_indexes`).
    pub shared: usize,
    /// Key-block and gathered-column entries of the layer's index (0 when dense).
    pub entries: (usize, usize),
    /// The index was built, but computing its tiles was predicted to take longer than dense
    /// attention ([`sparse_attention_pays`](super::sparse_attention_pays)), so dense attention ran
    /// ([`PlanPrefill::set_dense_when_faster`](super::PlanPrefill::set_dense_when_faster)).
    pub dense_faster: bool,
    /// Device milliseconds spent building (and merging) the index, CUDA events; `None` unless
    /// timing was asked for (`PlanPrefill::set_timing`), since it waits for the device.
    pub index_ms: Option<f32>,
    /// Device milliseconds of the attention launch; `None` unless timing was asked for (it waits
    /// for the attention to finish).
    pub attention_ms: Option<f32>,
}
