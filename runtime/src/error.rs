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
}

pub type Result<T> = std::result::Result<T, Error>;
