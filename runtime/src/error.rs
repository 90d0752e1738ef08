//! The runtime's error type.

/// Errors of the runtime crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Q/K/V slices or head counts that disagree with each other or with a plan.
    #[error("attention shape: {0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, Error>;
