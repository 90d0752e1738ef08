//! The profiler's error type. Every variant that concerns an input names the file.

use std::path::PathBuf;

/// Errors of the profiler crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- I/O -------------------------------------------------------------------------------------
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    // --- models (model/) -------------------------------------------------------------------------
    /// A model file or directory that cannot be used; `field` names the key or tensor.
    #[error("{path}: {field}: {message}")]
    Model {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Runtime(#[from] runtime::Error),

    // --- calibration data (data/) ----------------------------------------------------------------
    /// A data file that cannot be used; `location` is e.g. `line 17` or `field "text"`.
    #[error("{path}: {location}: {message}")]
    Data {
        path: PathBuf,
        location: String,
        message: String,
    },
    /// A `--data` spec that names no known source, or a request that cannot be met (`seq_len` 0).
    #[error("data source {spec:?}: {message}")]
    DataSpec { spec: String, message: String },
    /// A synthetic task that cannot be built as asked, e.g. `seq_len` too short for its question.
    #[error("synthetic:{task}: {message}")]
    Synthetic { task: String, message: String },

    // --- profile files (profile.rs) --------------------------------------------------------------
    /// Statistics that do not fit together (shapes, counts); a bug or a foreign file.
    #[error("profile: {0}")]
    Profile(String),
    #[error(transparent)]
    Plan(#[from] schemas::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
