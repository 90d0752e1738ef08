//! The plan types of format v1.
//!
//! A [`Plan`] says, for one model, which sparse [`Pattern`] each query head of each layer runs during
//! prefill and with what [`Budget`]s. Field order here is the order in the YAML file.
//! Units: token counts unless a field says blocks; recall and FLOPs fractions in `[0, 1]`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The format version this crate writes.
pub const SCHEMA_VERSION: u32 = 1;

/// A sparse-attention plan for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Format version; written first and read first. This crate reads and writes version 1.
    pub schema_version: u32,
    /// The model the plan was made for; a runtime refuses the plan for any other.
    pub model: ModelInfo,
    /// How the plan was made.
    pub provenance: Provenance,
    /// Settings shared by every head unless a head overrides them.
    pub defaults: Defaults,
    /// One entry per layer, in layer order.
    pub layers: Vec<LayerPlan>,
}

/// Identity of the model a plan belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    /// Human-readable model name, for people only (not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Architecture family, e.g. `llama`, `mistral`, `qwen2`.
    pub architecture: String,
    /// Number of transformer layers.
    pub layers: u32,
    /// Query heads per layer.
    pub query_heads: u32,
    /// Key/value heads per layer (grouped-query attention when fewer than `query_heads`).
    pub kv_heads: u32,
    /// Dimension of one head.
    pub head_dim: u32,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Longest context the model supports, in tokens.
    pub max_context: u64,
    /// `sha256:` followed by 64 lowercase hex digits: hash of the config values and of the tensor
    /// names, shapes and dtypes (see [`crate::ModelFingerprint`]).
    pub fingerprint: String,
}

/// How a plan was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// Tool and version that wrote the plan, e.g. `attnplan 0.1.0`.
    pub tool: String,
    /// Creation date (RFC 3339). Optional so that a plan can be byte-for-byte reproducible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Calibration data, e.g. `synthetic:passkey` or a file name.
    pub data: String,
    /// Calibration samples used by the search.
    pub samples: u32,
    /// Held-out samples used for validation (0 when not validated).
    #[serde(default)]
    pub heldout_samples: u32,
    /// Sequence lengths calibrated at, in tokens.
    pub seq_lens: Vec<u64>,
    /// Attention recall the search aimed for.
    pub target_recall: f64,
    /// What the search optimized, e.g. `mean_recall`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<String>,
}

/// Settings shared by all heads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Query rows per kernel tile; a power of two in `[16, 256]`.
    pub block_q: u32,
    /// Key columns per kernel tile; a power of two in `[16, 256]`.
    pub block_k: u32,
    /// Number of last queries used to estimate dynamic patterns online.
    pub last_q: u32,
    /// Below this sequence length (tokens) the runtime runs dense attention for every head.
    pub dense_below: u64,
    /// Whether the query heads of one KV group share one index (built from their pooled estimate).
    #[serde(default)]
    pub share_kv_group_indexes: bool,
}

/// The heads of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LayerPlan {
    /// Layer index, from 0.
    pub layer: u32,
    /// One entry per query head, in head order.
    pub heads: Vec<HeadPlan>,
}

/// The plan of one query head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeadPlan {
    /// Query head index within the layer, from 0.
    pub head: u32,
    /// What the head computes during prefill.
    pub pattern: Pattern,
    /// Attention recall measured on the calibration samples (mean over samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recall: Option<f64>,
    /// Attention recall measured on held-out samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validated_recall: Option<f64>,
    /// Expected fraction of the dense causal attention FLOPs, at the calibration lengths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flops_fraction: Option<f64>,
    /// DuoAttention gate in `[0, 1]` (high: retrieval head), when identification ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<f64>,
    /// Retrieval score in `[0, 1]` (Retrieval Head paper), when identification ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrieval_score: Option<f64>,
    /// Patterns for spans of other modalities (vision, video, audio); the head's `pattern` applies to
    /// text-to-text attention and to any pair not listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modalities: Vec<ModalityPattern>,
}

/// A modality of the tokens of an input span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Text,
    Image,
    Video,
    Audio,
}

/// The pattern a head uses when queries of one modality attend to keys of another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModalityPattern {
    pub query: Modality,
    pub key: Modality,
    pub pattern: Pattern,
}

/// What one head computes during prefill. Tagged by `kind` in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Pattern {
    /// Every causal cell.
    Dense(Dense),
    /// Sink tokens plus a recent window, DuoAttention's streaming head: during decoding the runtime may
    /// also keep only these tokens in the KV cache.
    Streaming(Streaming),
    /// Sink plus local window, computed at kernel block granularity (MInference's A-shape); prefill only.
    AShape(AShape),
    /// Top key columns and top diagonals, estimated online from the last queries (MInference).
    VerticalSlash(VerticalSlash),
    /// Top key blocks per query block, by a pooled estimate.
    BlockSparse(BlockSparse),
    /// Periodic columns and diagonals with a stride (MMInference's grid for frame-structured inputs).
    Grid(Grid),
    /// Per-query-block choice between a query-aware block set and a vertical-slash shape (FlexPrefill).
    QueryAdaptive(QueryAdaptive),
    /// Within each key block, keep the tokens chosen online by a redundancy score (TCA-Attention).
    TokenSelect(TokenSelect),
}

/// `kind: dense` has no parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dense {}

/// `kind: streaming`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Streaming {
    /// First tokens every query sees (tokens).
    pub sink: Budget,
    /// Most recent tokens before and including the query (tokens).
    pub recent: Budget,
}

/// `kind: a_shape`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AShape {
    /// First tokens every query sees (tokens).
    pub sink: Budget,
    /// Local window before and including the query (tokens).
    pub local: Budget,
}

/// `kind: vertical_slash`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerticalSlash {
    /// Key columns kept (tokens), the top ones by estimated attention of the last queries.
    pub vertical: Budget,
    /// Diagonals kept (tokens of offset), the top ones by the same estimate.
    pub slash: Budget,
}

/// `kind: block_sparse`. Exactly one of `top_k` and `coverage` is given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlockSparse {
    /// Key blocks kept per query block (blocks of `defaults.block_k`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<Budget>,
    /// Keep the fewest key blocks whose estimated attention mass reaches this fraction, in `(0, 1]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage: Option<f64>,
}

/// `kind: grid`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// Period in tokens (e.g. tokens per video frame).
    pub stride: u32,
    /// Offset of the first kept column within a period, `< stride`.
    pub phase: u32,
    /// Consecutive tokens kept at each period, in `[1, stride]`.
    pub width: u32,
    /// First tokens every query sees (tokens).
    pub sink: Budget,
    /// Local window (tokens).
    pub local: Budget,
}

/// `kind: query_adaptive`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryAdaptive {
    /// Cumulative estimated attention mass to cover, in `(0, 1]`.
    pub gamma: f64,
    /// Jensen-Shannon divergence threshold (>= 0) under which the query-aware block set is used.
    pub tau: f64,
    /// Fewest key blocks kept per query block (blocks).
    pub min_budget: Budget,
}

/// `kind: token_select`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenSelect {
    /// Key block size in tokens within which tokens are selected.
    pub block: u32,
    /// Tokens kept per key block, `<= block`; with a `spread`, the count of the median block.
    pub keep: Budget,
    /// Spread of the tokens kept per key block, in powers of two (TCA-Attention's per-head
    /// distribution of budgets): 0, the default, keeps `keep` tokens of every block; with `s > 0` the
    /// blocks are ranked by the attention the last queries pay them, and the block at quantile `u`
    /// of that ranking (1 = most attended) keeps `2^round(log2(keep) + s * Φ⁻¹(u))` tokens, clamped
    /// to `[1, block]`: a log-Gaussian over `{1, 2, 4, …, block}`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spread: f64,
    /// First tokens every query sees (tokens).
    pub sink: Budget,
    /// Local window (tokens).
    pub local: Budget,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// A count that may depend on the sequence length `n`. The unit is the field's (tokens or blocks).
///
/// Written as a plain integer (`1000`) for a fixed count, or as a map for a rule:
/// `{fraction: 0.05, min: 64, max: 4096}`, `{scale: 2.5, exponent: 0.75, min: 64}`,
/// `{buckets: [{up_to: 4096, value: 500}, {up_to: 8192, value: 1000}]}`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Budget {
    /// The same count at every length.
    Fixed(u64),
    /// `clamp(ceil(fraction * n), min, max)`.
    Fraction(FractionBudget),
    /// `clamp(ceil(scale * n^exponent), min, max)`: a rule fitted over lengths.
    Power(PowerBudget),
    /// The first bucket with `n <= up_to`; the last bucket for longer inputs.
    Buckets(BucketsBudget),
}

/// See [`Budget::Fraction`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FractionBudget {
    /// Share of the sequence length, in `(0, 1]`.
    pub fraction: f64,
    #[serde(default = "one")]
    pub min: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
}

/// See [`Budget::Power`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerBudget {
    pub scale: f64,
    /// In `[0, 2]`.
    pub exponent: f64,
    #[serde(default = "one")]
    pub min: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
}

/// See [`Budget::Buckets`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BucketsBudget {
    /// Buckets in increasing `up_to` order.
    pub buckets: Vec<BucketBudget>,
}

/// One length bucket of [`Budget::Buckets`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BucketBudget {
    /// Longest sequence (tokens) this bucket applies to.
    pub up_to: u64,
    /// The count for this bucket.
    pub value: u64,
}

impl<'de> Deserialize<'de> for Budget {
    /// Dispatches on the shape (integer, or the map's distinguishing key) so that errors say what a
    /// budget may be, instead of serde's "did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let value = serde_json::Value::deserialize(deserializer)?;
        const EXPECTED: &str =
            "expected a count (e.g. 1000) or a rule: {fraction: 0.05, min: 64}, \
             {scale: 2.5, exponent: 0.75}, or {buckets: [{up_to: 4096, value: 500}]}";
        match value {
            serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(v), _) => Ok(Budget::Fixed(v)),
                (None, Some(v)) => Err(D::Error::custom(format!(
                    "budget {v} is negative, expected a count >= 1"
                ))),
                _ => Err(D::Error::custom(format!(
                    "budget {n} is not a whole number, {EXPECTED}"
                ))),
            },
            serde_json::Value::Object(ref map) => {
                let result = if map.contains_key("fraction") {
                    serde_json::from_value(value.clone()).map(Budget::Fraction)
                } else if map.contains_key("scale") || map.contains_key("exponent") {
                    serde_json::from_value(value.clone()).map(Budget::Power)
                } else if map.contains_key("buckets") {
                    serde_json::from_value(value.clone()).map(Budget::Buckets)
                } else {
                    return Err(D::Error::custom(format!(
                        "a map with keys {:?}: {EXPECTED}",
                        map.keys().collect::<Vec<_>>()
                    )));
                };
                result.map_err(|e| D::Error::custom(format!("budget rule: {e}")))
            }
            other => Err(D::Error::custom(format!("found {other}, {EXPECTED}"))),
        }
    }
}

fn one() -> u64 {
    1
}

impl Budget {
    /// The count at sequence length `seq_len`, in the field's unit. Never 0 for a valid budget.
    pub fn resolve(&self, seq_len: u64) -> u64 {
        let n = seq_len as f64;
        let clamp = |x: f64, min: u64, max: Option<u64>| {
            // `as` saturates for floats: a huge or NaN product cannot wrap.
            let v = (x.ceil() as u64).max(min);
            max.map_or(v, |m| v.min(m))
        };
        match self {
            Budget::Fixed(v) => *v,
            Budget::Fraction(f) => clamp(f.fraction * n, f.min, f.max),
            Budget::Power(p) => clamp(p.scale * n.powf(p.exponent), p.min, p.max),
            Budget::Buckets(b) => b
                .buckets
                .iter()
                .find(|b| seq_len <= b.up_to)
                .or(b.buckets.last())
                .map_or(0, |b| b.value),
        }
    }
}

impl Pattern {
    /// The `kind` tag as written in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            Pattern::Dense(_) => "dense",
            Pattern::Streaming(_) => "streaming",
            Pattern::AShape(_) => "a_shape",
            Pattern::VerticalSlash(_) => "vertical_slash",
            Pattern::BlockSparse(_) => "block_sparse",
            Pattern::Grid(_) => "grid",
            Pattern::QueryAdaptive(_) => "query_adaptive",
            Pattern::TokenSelect(_) => "token_select",
        }
    }

    /// Every kind tag, in declaration order.
    pub const KINDS: [&'static str; 8] = [
        "dense",
        "streaming",
        "a_shape",
        "vertical_slash",
        "block_sparse",
        "grid",
        "query_adaptive",
        "token_select",
    ];
}

impl Plan {
    /// The head plan of (`layer`, `head`), if present.
    pub fn head(&self, layer: usize, head: usize) -> Option<&HeadPlan> {
        self.layers.get(layer)?.heads.get(head)
    }

    /// Every head with its layer index, in file order.
    pub fn heads(&self) -> impl Iterator<Item = (u32, &HeadPlan)> {
        self.layers
            .iter()
            .flat_map(|l| l.heads.iter().map(move |h| (l.layer, h)))
    }
}

impl Pattern {
    /// The pattern's budget fields with their names, e.g. `[("vertical", ..), ("slash", ..)]`.
    pub fn budgets(&self) -> Vec<(&'static str, &Budget)> {
        match self {
            Pattern::Dense(_) => vec![],
            Pattern::Streaming(p) => vec![("sink", &p.sink), ("recent", &p.recent)],
            Pattern::AShape(p) => vec![("sink", &p.sink), ("local", &p.local)],
            Pattern::VerticalSlash(p) => vec![("vertical", &p.vertical), ("slash", &p.slash)],
            Pattern::BlockSparse(p) => p.top_k.iter().map(|b| ("top_k", b)).collect(),
            Pattern::Grid(p) => vec![("sink", &p.sink), ("local", &p.local)],
            Pattern::QueryAdaptive(p) => vec![("min_budget", &p.min_budget)],
            Pattern::TokenSelect(p) => {
                vec![("keep", &p.keep), ("sink", &p.sink), ("local", &p.local)]
            }
        }
    }
}
