//! attnplan calibrator and the `attnplan` command-line tool.
//!
//! - [`search`]: every nested candidate of every family scored from profile statistics, the choice per
//!   head, and MInference's search replayed for comparison.
//! - [`calibration`]: the search over all heads and lengths, held-out validation.
//! - [`emit`]: the plan (budgets per length, dense threshold, provenance).
//! - [`heads`]: retrieval-head identification (DuoAttention gates, Retrieval Head scores) and hybrid
//!   plans (the lowest-ranked KV heads streaming).
//! - [`report`]: the per-head report and summary (text and JSON).
//! - [`eval`]: dense against sparse prefill on the same inputs; [`gpu_eval`]: the same with the plan's
//!   attention on the GPU, compared with the CPU prefill.
//! - [`cli`]: the subcommands, one file each.

pub mod calibration;
pub mod cli;
pub mod emit;
mod error;
pub mod eval;
pub mod gpu_eval;
pub mod heads;
pub mod report;
pub mod search;

pub use error::Error;
