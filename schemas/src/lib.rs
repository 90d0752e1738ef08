//! attnplan plan format: the types of a sparse-attention plan, its YAML form, validation, version
//! migration and JSON Schema.
//!
//! Main types: [`Plan`] (a whole plan), [`HeadPlan`], [`Pattern`] (tagged by `kind`), [`Budget`]
//! (a count that may depend on the sequence length), [`ModelInfo`] with its [`ModelFingerprint`],
//! and [`Error`] / [`Issue`] for problems, which always name the file and the field path.
//!
//! Reading a plan: [`Plan::read`] (a file) or [`Plan::from_yaml`] (text): size limit, then
//! `schema_version`, then the typed parse, then [`validate()`]. Writing: [`Plan::write`] (atomic).
//! docs/plan-format.md is the normative description of the format.

pub mod error;
mod fingerprint;
pub mod io;
pub mod migrate;
mod plan;
pub mod summary;
pub mod validate;
mod yaml;

use std::path::Path;

pub use error::{Error, Issue, Result};
pub use fingerprint::{ModelFingerprint, TensorDesc};
pub use plan::*;
pub use summary::Summary;
pub use validate::{check_model, validate};

/// The JSON Schema of format v1 as committed in `schemas/plan.schema.json`.
pub const PLAN_SCHEMA_JSON: &str = include_str!("../plan.schema.json");

/// Generates the JSON Schema of [`Plan`] from the types (what `plan.schema.json` must equal).
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(Plan);
    serde_json::to_value(schema).unwrap_or(serde_json::Value::Null)
}

impl Plan {
    /// Reads, parses and validates the plan at `path`.
    pub fn read(path: &Path) -> Result<Plan> {
        let plan = Self::read_unvalidated(path)?;
        plan.check(path)?;
        Ok(plan)
    }

    /// Reads and parses the plan at `path` without the rules of [`validate()`].
    pub fn read_unvalidated(path: &Path) -> Result<Plan> {
        let bytes = io::read_limited(path, io::MAX_PLAN_BYTES)?;
        let text = std::str::from_utf8(&bytes).map_err(|e| Error::Syntax {
            path: path.to_path_buf(),
            field: "(document)".into(),
            message: format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ),
        })?;
        Self::parse(path, text)
    }

    /// Parses and validates YAML `text`; `path` names the source in errors.
    pub fn from_yaml(path: &Path, text: &str) -> Result<Plan> {
        if text.len() as u64 > io::MAX_PLAN_BYTES {
            return Err(Error::TooLarge {
                path: path.to_path_buf(),
                size: text.len() as u64,
                limit: io::MAX_PLAN_BYTES,
            });
        }
        let plan = Self::parse(path, text)?;
        plan.check(path)?;
        Ok(plan)
    }

    fn parse(path: &Path, text: &str) -> Result<Plan> {
        Self::parse_with(path, text, migrate::MIGRATIONS)
    }

    /// Parses with an explicit migration table (tests exercise the upgrade path with it).
    #[doc(hidden)]
    pub fn parse_with(path: &Path, text: &str, migrations: &[migrate::Migration]) -> Result<Plan> {
        if text.trim().is_empty() {
            return Err(Error::Syntax {
                path: path.to_path_buf(),
                field: "(document)".into(),
                message: "empty file, expected a plan starting with `schema_version: 1`".into(),
            });
        }
        let version = migrate::probe_version(path, text, migrations)?;
        if version == SCHEMA_VERSION {
            return yaml::from_str(path, text);
        }
        let doc: serde_json::Value = yaml::from_str(path, text)?;
        let doc = migrate::upgrade(path, doc, version, migrations)?;
        serde_path_to_error::deserialize(doc).map_err(|e| Error::Syntax {
            path: path.to_path_buf(),
            field: e.path().to_string(),
            message: e.into_inner().to_string(),
        })
    }

    /// Runs [`validate()`] and turns its issues into an [`Error::Invalid`] naming `path`.
    pub fn check(&self, path: &Path) -> Result<()> {
        let issues = validate(self);
        if issues.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid {
                path: path.to_path_buf(),
                issues,
            })
        }
    }

    /// Checks the plan against the model at hand; `path` names the plan in errors.
    pub fn check_model(&self, path: &Path, actual: &ModelInfo) -> Result<()> {
        let issues = check_model(&self.model, actual);
        if issues.is_empty() {
            Ok(())
        } else {
            Err(Error::ModelMismatch {
                path: path.to_path_buf(),
                issues,
            })
        }
    }

    /// The plan as YAML text, with a header of comments for people.
    pub fn to_yaml(&self) -> Result<String> {
        yaml::to_string(self, &self.header())
    }

    /// Validates, then writes the plan to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        self.check(path)?;
        io::write_atomic(path, self.to_yaml()?.as_bytes())
    }

    fn header(&self) -> Vec<String> {
        let s = Summary::of(self);
        let name = self
            .model
            .name
            .as_deref()
            .unwrap_or(&self.model.architecture);
        let mut lines = vec![
            format!(
                "attnplan sparse-attention plan, format v{SCHEMA_VERSION} (docs/plan-format.md)"
            ),
            format!(
                "model: {name}, {} layers x {} query heads ({} KV heads)",
                self.model.layers, self.model.query_heads, self.model.kv_heads
            ),
            format!(
                "made by {} from {} ({} samples + {} held out), target recall {}",
                self.provenance.tool,
                self.provenance.data,
                self.provenance.samples,
                self.provenance.heldout_samples,
                self.provenance.target_recall
            ),
            format!("patterns: {}", s.pattern_mix()),
        ];
        if let Some(r) = s.mean_recall {
            lines.push(format!("mean recall {r:.4}"));
        }
        if let Some(f) = s.flops_fraction {
            lines.push(format!("expected fraction of dense attention FLOPs {f:.4}"));
        }
        lines.push(String::new());
        lines.push(
            "One line per head: its pattern (`kind` and budgets: {fixed: n} tokens, or a rule over"
                .into(),
        );
        lines.push("the sequence length), recall on calibration data, validated_recall on held-out data, and".into());
        lines.push("flops_fraction, the share of dense causal attention FLOPs it computes.".into());
        lines
    }
}
