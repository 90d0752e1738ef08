//! Model loading and the hooked forward.
