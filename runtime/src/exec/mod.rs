//! Attention executors over [`crate::AttentionInput`].
