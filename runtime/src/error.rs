//! The runtime's error type.

/// Errors of the runtime crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Q/K/V slices or head counts that disagree with each other or with a plan.
    #[error("attention shape: {0}")]
    Shape(String),

    // --- patterns (pattern/) ---------------------------------------------------------------------
    /// A pattern (or its context) that cannot be applied as given; `kind` is the plan's `kind` tag or
    /// `context`, and `message` names the field, the value and what was expected.
    #[error("pattern {kind}: {message}")]
    Pattern { kind: &'static str, message: String },

    // --- sparse prefill (exec/sparse, prefill) ---------------------------------------------------
    /// An index handed to the sparse executor that breaks its contract (see
    /// `exec::sparse::CellLists`): `head` is the query head, `message` what broke.
    #[error("sparse index of query head {head}: {message}")]
    SparseIndex { head: usize, message: String },
    /// A plan made for another model; `issues` names each differing field (`model.query_heads: plan
    /// says 4, the model has 9`).
    #[error("plan does not match the model: {}", issues.join("; "))]
    PlanMismatch { issues: Vec<String> },
    /// A head of the plan the executor cannot run as given: names layer, head, pattern kind and why.
    #[error("plan layers[{layer}].heads[{head}] (pattern {kind}): {message}")]
    HeadPlan {
        layer: usize,
        head: usize,
        kind: &'static str,
        message: String,
    },

    // --- cuda (exec/cuda) ------------------------------------------------------------------------
    /// The crate was built without the `cuda` feature.
    #[error("CUDA support not compiled in (build runtime with --features cuda)")]
    CudaNotCompiled,
    /// No usable driver, NVRTC or device at run time.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// NVRTC rejected a kernel file; `log` is its compile log.
    #[error("NVRTC failed to compile {file}:\n{log}")]
    CudaCompile { file: &'static str, log: String },
    /// A driver call failed (allocation, copy, launch, synchronization).
    #[error("CUDA driver: {0}")]
    Cuda(String),
    /// Input the CUDA kernels do not handle (head_dim, block sizes, sizes past their index types).
    #[error("CUDA kernels: {0}")]
    CudaUnsupported(String),

    // --- files (exec/cuda/bench) -----------------------------------------------------------------
    /// Reading or writing a file failed; `path` names it.
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
