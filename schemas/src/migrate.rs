//! Format versions: reading `schema_version` first, and upgrading older versions.
//!
//! A plan of version `v < SCHEMA_VERSION` is upgraded one step at a time by the [`MIGRATIONS`] table,
//! each step a function on the generic document tree. Version 1 is the first, so the table is empty;
//! version 2 will add the step `1 → 2` here and nowhere else.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::plan::SCHEMA_VERSION;

/// One upgrade step of the document tree from `from` to `from + 1`.
pub struct Migration {
    pub from: u32,
    pub apply: fn(Value) -> std::result::Result<Value, String>,
}

/// Every upgrade step this tool knows, in order.
pub const MIGRATIONS: &[Migration] = &[];

/// Versions this tool reads: the current one and every one the table upgrades from.
pub fn supported_versions(migrations: &[Migration]) -> Vec<u32> {
    let mut v: Vec<u32> = migrations.iter().map(|m| m.from).collect();
    v.push(SCHEMA_VERSION);
    v.sort_unstable();
    v.dedup();
    v
}

#[derive(Deserialize)]
struct VersionProbe {
    schema_version: Option<Value>,
}

/// Reads only `schema_version`, before anything else of the document is interpreted.
pub(crate) fn probe_version(path: &Path, text: &str, migrations: &[Migration]) -> Result<u32> {
    let probe: VersionProbe = crate::yaml::from_str(path, text)?;
    let supported = supported_versions(migrations);
    let unsupported = |found: String| Error::UnsupportedVersion {
        path: path.to_path_buf(),
        found,
        supported: supported
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let raw = probe.schema_version.ok_or_else(|| Error::Syntax {
        path: path.to_path_buf(),
        field: "schema_version".into(),
        message: "missing; a plan starts with `schema_version: 1`".into(),
    })?;
    let version = raw
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| unsupported(raw.to_string()))?;
    if supported.contains(&version) {
        Ok(version)
    } else {
        Err(unsupported(version.to_string()))
    }
}

/// Upgrades a document of version `from` to the current version with `migrations`.
pub(crate) fn upgrade(
    path: &Path,
    mut doc: Value,
    from: u32,
    migrations: &[Migration],
) -> Result<Value> {
    let mut version = from;
    while version < SCHEMA_VERSION {
        let step = migrations
            .iter()
            .find(|m| m.from == version)
            .ok_or_else(|| Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version.to_string(),
                supported: SCHEMA_VERSION.to_string(),
            })?;
        doc = (step.apply)(doc).map_err(|message| Error::Syntax {
            path: path.to_path_buf(),
            field: "schema_version".into(),
            message: format!("upgrading from version {version}: {message}"),
        })?;
        version += 1;
        if let Some(obj) = doc.as_object_mut() {
            obj.insert("schema_version".into(), Value::from(version));
        }
    }
    Ok(doc)
}
