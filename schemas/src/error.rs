//! The schemas crate's error type. Every variant names the file; validation errors name the field.

use std::fmt;
use std::path::PathBuf;

/// One problem found in a plan: the field path (e.g. `layers[3].heads[7].pattern.vertical`) and what
/// is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub field: String,
    pub message: String,
}

impl Issue {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Errors of the schemas crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- reading and writing files ---------------------------------------------------------------
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file is {size} bytes, larger than the limit of {limit} bytes for a plan")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },

    // --- the file is not a plan of a version we read ---------------------------------------------
    /// Not YAML, or YAML whose shape does not match the plan types (unknown key, missing field,
    /// wrong type, unknown pattern kind, duplicate key, alias bomb, ...).
    #[error("{path}: {field}: {message}")]
    Syntax {
        path: PathBuf,
        /// Field path where the problem was found, or `(document)`.
        field: String,
        message: String,
    },
    #[error("{path}: schema_version: found {found}, this tool reads versions {supported}")]
    UnsupportedVersion {
        path: PathBuf,
        found: String,
        supported: String,
    },

    // --- the plan parses but breaks a rule -------------------------------------------------------
    #[error("{}", list(path, "invalid plan", issues))]
    Invalid { path: PathBuf, issues: Vec<Issue> },
    #[error("{}", list(path, "plan does not match the model", issues))]
    ModelMismatch { path: PathBuf, issues: Vec<Issue> },

    // --- writing ---------------------------------------------------------------------------------
    #[error("cannot serialize plan: {0}")]
    Serialize(String),
}

impl Error {
    /// Whether the error is about the plan's content (exit code 1 in the CLI) rather than I/O (2).
    pub fn is_check_failure(&self) -> bool {
        !matches!(self, Error::Io { .. } | Error::Serialize(_))
    }

    /// The individual problems, for errors that carry a list.
    pub fn issues(&self) -> &[Issue] {
        match self {
            Error::Invalid { issues, .. } | Error::ModelMismatch { issues, .. } => issues,
            _ => &[],
        }
    }
}

fn list(path: &std::path::Path, what: &str, issues: &[Issue]) -> String {
    let mut s = format!(
        "{}: {what} ({} problem{})",
        path.display(),
        issues.len(),
        if issues.len() == 1 { "" } else { "s" }
    );
    for issue in issues {
        s.push_str(&format!("\n  {}: {issue}", path.display()));
    }
    s
}

pub type Result<T> = std::result::Result<T, Error>;
