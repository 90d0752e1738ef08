//! The calibrator's error type.

use std::path::PathBuf;

/// Errors of the calibrate crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An input file (profile) that cannot be used; `field` names the metadata field or tensor.
    #[error("{path}: {field}: {message}")]
    Input {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// Arguments that do not fit together.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Profiler(#[from] profiler::Error),
    #[error(transparent)]
    Plan(#[from] schemas::Error),
}
