//! Profile files: attention statistics as named f64 tensors in safetensors, plus a metadata header.
//!
//! A [`Profile`] holds [`ProfileMeta`] (model identity and fingerprint, data, sequence length, block
//! size, tool version, sample count) and a sorted map of named tensors (`L{layer}.H{head}.{statistic}`,
//! row-major f64). Every tensor is a sum over samples, so profiles of the same model, tool version,
//! length and block size merge by adding tensors ([`Profile::merge`]): profiling fans out over samples,
//! layer ranges or machines and is joined afterwards by `attnplan merge`.
//!
//! On disk: a safetensors file whose `__metadata__` has one key, `attnplan`, holding the metadata as
//! JSON. Written atomically; read with a size limit and every field checked.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Format tag in the metadata.
pub const PROFILE_FORMAT: &str = "attnplan-profile";
/// Version of the profile layout this crate writes and reads.
pub const PROFILE_VERSION: u32 = 1;
/// Largest profile file read (a 128-layer, 64-head model at 128K has ~2 GB of heat maps; we stop at 8 GiB).
pub const MAX_PROFILE_BYTES: u64 = 8 << 30;

/// What a profile describes. Two profiles merge only if model, tool, length, tiles and `last_q`
/// agree (see [`Profile::check_mergeable`]); data sources may differ and are listed together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileMeta {
    pub format: String,
    pub version: u32,
    /// `attnplan <version>`: statistics from another tool version are not comparable.
    pub tool: String,
    pub model: schemas::ModelInfo,
    /// The data source, e.g. `synthetic:passkey`.
    pub data: String,
    /// Tokens per sample.
    pub seq_len: u64,
    /// Kernel tile sizes the statistics were taken at (tokens).
    pub block_q: u32,
    pub block_k: u32,
    /// Queries used for online estimation.
    pub last_q: u32,
    /// Samples summed into the tensors.
    pub samples: u64,
    /// Identifiers of those samples, in order (used to keep held-out samples apart).
    pub sample_ids: Vec<String>,
    /// Layers present (a profile of a layer range holds only those).
    pub layers: Vec<u32>,
    /// Dynamic candidates scored per head and sample (`S{k}.L{l}.H{h}.dyn_mass` / `dyn_cells`, in
    /// this order; see `stats::dynamic`). Empty: none were scored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dynamic: Vec<schemas::Pattern>,
    /// Last query rows whose statistics are kept apart (`S{k}.L{l}.H{h}.tail.*`), rounded out to
    /// whole query blocks; 0 (and absent in older profiles): none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tail_q: u32,
    /// The period search on the first sample, when one ran (`stats::period`): what it found and which
    /// strides got grid candidates in [`ProfileMeta::dynamic`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub periods: Option<crate::stats::period::PeriodReport>,
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

/// One named tensor: shape and row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct StatTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Statistics of one or more samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub meta: ProfileMeta,
    pub tensors: BTreeMap<String, StatTensor>,
}

/// `S{k}.rest` → `S{k + offset}.rest`; other names unchanged.
fn renumber_sample(name: &str, offset: usize) -> String {
    let parsed = name
        .strip_prefix('S')
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(k, rest)| k.parse::<usize>().ok().map(|k| (k, rest)));
    match parsed {
        Some((k, rest)) if offset > 0 => format!("S{}.{rest}", k + offset),
        _ => name.to_string(),
    }
}

fn bad(path: &Path, field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        field: field.into(),
        message: message.into(),
    }
}

impl Profile {
    /// An empty profile with the given metadata.
    pub fn new(meta: ProfileMeta) -> Self {
        Self {
            meta,
            tensors: BTreeMap::new(),
        }
    }

    /// The name of statistic `stat` of (`layer`, `head`).
    pub fn key(layer: usize, head: usize, stat: &str) -> String {
        format!("L{layer}.H{head}.{stat}")
    }

    /// Adds `data` into the tensor `name`, creating it; shapes must agree.
    pub fn accumulate(&mut self, name: &str, shape: &[usize], data: &[f64]) -> Result<()> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::Profile(format!(
                "{name}: {} values for shape {shape:?}",
                data.len()
            )));
        }
        match self.tensors.get_mut(name) {
            Some(t) if t.shape == shape => {
                t.data.iter_mut().zip(data).for_each(|(a, b)| *a += b);
                Ok(())
            }
            Some(t) => Err(Error::Profile(format!(
                "{name}: shape {shape:?} does not match the accumulated {:?}",
                t.shape
            ))),
            None => {
                self.tensors.insert(
                    name.to_string(),
                    StatTensor {
                        shape: shape.to_vec(),
                        data: data.to_vec(),
                    },
                );
                Ok(())
            }
        }
    }

    /// Adds `other` into `self`. `other_path` names the other profile in errors.
    pub fn merge(&mut self, other: &Profile, other_path: &Path) -> Result<()> {
        self.check_mergeable(other, other_path)?;
        // Per-sample tensors (`S{k}.…`) of other samples are renumbered after ours.
        let offset = if self.meta.sample_ids == other.meta.sample_ids {
            0
        } else {
            self.meta.sample_ids.len()
        };
        for (name, t) in &other.tensors {
            let name = renumber_sample(name, offset);
            self.accumulate(&name, &t.shape, &t.data)
                .map_err(|e| bad(other_path, name.clone(), e.to_string()))?;
        }
        let b = &other.meta;
        // Calibration sets may mix sources (passkey, key-value retrieval, prose): name them all.
        for source in b.data.split(" + ") {
            if !self.meta.data.split(" + ").any(|d| d == source) {
                self.meta.data = format!("{} + {source}", self.meta.data);
            }
        }
        if self.meta.sample_ids != b.sample_ids {
            self.meta.samples += b.samples;
            self.meta.sample_ids.extend(b.sample_ids.iter().cloned());
        }
        self.meta.layers.extend(&b.layers);
        self.meta.layers.sort_unstable();
        self.meta.layers.dedup();
        Ok(())
    }

    /// Checks `other` describes the same model, length, tiles and tool, with other samples.
    pub fn check_mergeable(&self, other: &Profile, other_path: &Path) -> Result<()> {
        let (a, b) = (&self.meta, &other.meta);
        let checks: [(&str, String, String); 8] = [
            ("tool", a.tool.clone(), b.tool.clone()),
            (
                "model.fingerprint",
                a.model.fingerprint.clone(),
                b.model.fingerprint.clone(),
            ),
            ("seq_len", a.seq_len.to_string(), b.seq_len.to_string()),
            ("block_q", a.block_q.to_string(), b.block_q.to_string()),
            ("block_k", a.block_k.to_string(), b.block_k.to_string()),
            ("last_q", a.last_q.to_string(), b.last_q.to_string()),
            ("tail_q", a.tail_q.to_string(), b.tail_q.to_string()),
            ("version", a.version.to_string(), b.version.to_string()),
        ];
        for (field, mine, theirs) in checks {
            if mine != theirs {
                return Err(bad(
                    other_path,
                    field,
                    format!("{theirs}, but the profile it is merged into has {mine}"),
                ));
            }
        }
        // Two ways to split work: the same layers over other samples (sums add), or other layers over
        // the same samples (tensors are disjoint). Anything else would count something twice.
        if a.dynamic != b.dynamic {
            return Err(bad(
                other_path,
                "dynamic",
                format!(
                    "{} dynamic candidates, but the profile it is merged into scored {} others: \
                     profile both with the same candidates",
                    b.dynamic.len(),
                    a.dynamic.len()
                ),
            ));
        }
        let same_samples = a.sample_ids == b.sample_ids;
        let disjoint_samples = !b.sample_ids.iter().any(|id| a.sample_ids.contains(id));
        let same_layers = a.layers == b.layers;
        let disjoint_layers = !b.layers.iter().any(|l| a.layers.contains(l));
        if !((same_layers && disjoint_samples) || (same_samples && disjoint_layers)) {
            return Err(bad(
                other_path,
                "sample_ids",
                "profiles merge when they hold the same layers of other samples, or other layers \
                 of the same samples; these overlap otherwise",
            ));
        }
        Ok(())
    }

    /// Serializes to safetensors bytes (f64 tensors, metadata as JSON).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let meta_json = serde_json::to_string(&self.meta)
            .map_err(|e| Error::Profile(format!("profile metadata: {e}")))?;
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let raw: Vec<u8> = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
                (name.clone(), raw, t.shape.clone())
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, raw, shape)| {
                TensorView::new(Dtype::F64, shape.clone(), raw)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::Profile(format!("{name}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut metadata = std::collections::HashMap::new();
        metadata.insert("attnplan".to_string(), meta_json);
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::Profile(format!("profile serialization: {e}")))
    }

    /// Writes the profile atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        Ok(schemas::io::write_atomic(path, &bytes)?)
    }

    /// Reads and checks a profile file.
    pub fn read(path: &Path) -> Result<Profile> {
        let bytes = schemas::io::read_limited(path, MAX_PROFILE_BYTES)?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses safetensors bytes; `path` names the source in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Profile> {
        let (_, st_meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(path, "(header)", format!("not a safetensors profile: {e}")))?;
        let json = st_meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("attnplan"))
            .ok_or_else(|| {
                bad(
                    path,
                    "__metadata__.attnplan",
                    "missing: not an attnplan profile",
                )
            })?;
        let meta: ProfileMeta = serde_json::from_str(json)
            .map_err(|e| bad(path, "__metadata__.attnplan", e.to_string()))?;
        if meta.format != PROFILE_FORMAT {
            return Err(bad(
                path,
                "format",
                format!("{:?}, expected {PROFILE_FORMAT:?}", meta.format),
            ));
        }
        if meta.version != PROFILE_VERSION {
            return Err(bad(
                path,
                "version",
                format!(
                    "{}, this tool reads version {PROFILE_VERSION}",
                    meta.version
                ),
            ));
        }
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(path, "(tensors)", e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F64 {
                return Err(bad(
                    path,
                    name,
                    format!("dtype {:?}, expected F64", view.dtype()),
                ));
            }
            let data: Vec<f64> = view
                .data()
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b)
                })
                .collect();
            if let Some(bad_value) = data.iter().find(|x| !x.is_finite()) {
                return Err(bad(
                    path,
                    name,
                    format!("holds {bad_value}: statistics must be finite"),
                ));
            }
            tensors.insert(
                name,
                StatTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        Ok(Profile { meta, tensors })
    }

    /// The tensor `name`, or an error naming the profile file and the tensor.
    pub fn tensor(&self, path: &Path, name: &str) -> Result<&StatTensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| bad(path, name, "missing from the profile"))
    }
}
