//! The only module that knows the YAML library (serde-saphyr). Swapping it touches this file alone.
//!
//! Reading is panic-free and bounded: the input size is checked by the caller before parsing, and the
//! parser's budget limits events, nesting depth and alias expansion, so an alias bomb or a deeply nested
//! document is an error, not an out-of-memory. Duplicate keys are errors. Field paths in errors come
//! from `serde_path_to_error`.
//!
//! Writing puts each head on one line in flow style, after a header of comments.

use std::path::Path;

use serde::Serialize;
use serde_saphyr::{FlowMap, Options};

use crate::error::{Error, Result};
use crate::plan::{Defaults, HeadPlan, ModelInfo, Plan, Provenance};

/// Deepest nesting a plan needs is about 8 levels; anything deeper is hostile or broken.
const MAX_DEPTH: usize = 32;
/// A plan for a 128-layer, 128-head model has ~16K heads of ~30 events: 2M events is ample.
const MAX_EVENTS: usize = 2_000_000;

fn options() -> Options {
    let mut options = Options::default();
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    budget.max_events = MAX_EVENTS;
    options.budget = Some(budget);
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    options.with_snippet = false;
    options
}

/// Deserializes `text` into `T`, reporting the field path of the first error.
pub(crate) fn from_str<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    // The closure must fail with the parser's own error, or the parser goes on to read the rest of the
    // document and reports that instead; the field path is kept aside.
    let mut field = String::new();
    let outcome = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            field = e.path().to_string();
            e.into_inner()
        })
    });
    outcome.map_err(|e| syntax(path, &field, e.to_string()))
}

fn syntax(path: &Path, field: &str, message: String) -> Error {
    // serde_path_to_error writes `?` for a segment it cannot name (a key not yet read).
    let field = field.trim_end_matches(".?");
    let field = if field.is_empty() || field == "." || field == "?" {
        "(document)".to_string()
    } else {
        field.to_string()
    };
    // Keep messages on one line: the CLI prints one problem per line.
    let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
    Error::Syntax {
        path: path.to_path_buf(),
        field,
        message,
    }
}

/// The layout a plan is written in: top-level sections in block style, each head in flow style.
#[derive(Serialize)]
struct PlanView<'a> {
    schema_version: u32,
    model: &'a ModelInfo,
    provenance: &'a Provenance,
    defaults: &'a Defaults,
    layers: Vec<LayerView<'a>>,
}

#[derive(Serialize)]
struct LayerView<'a> {
    layer: u32,
    heads: Vec<FlowMap<&'a HeadPlan>>,
}

/// Serializes `plan` as YAML after `header` (each line becomes a `# ` comment).
pub(crate) fn to_string(plan: &Plan, header: &[String]) -> Result<String> {
    let view = PlanView {
        schema_version: plan.schema_version,
        model: &plan.model,
        provenance: &plan.provenance,
        defaults: &plan.defaults,
        layers: plan
            .layers
            .iter()
            .map(|l| LayerView {
                layer: l.layer,
                heads: l.heads.iter().map(FlowMap).collect(),
            })
            .collect(),
    };
    let body = serde_saphyr::to_string(&view).map_err(|e| Error::Serialize(e.to_string()))?;
    let mut out = String::with_capacity(body.len() + 256);
    for line in header {
        if line.is_empty() {
            out.push_str("#\n");
        } else {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&body);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}
