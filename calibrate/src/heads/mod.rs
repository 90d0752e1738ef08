//! Retrieval-head identification and hybrid plans: which KV heads must see the whole context
//! (retrieval heads) and which can keep only sinks plus a recent window (streaming heads).
//!
//! - [`duo`]: DuoAttention's gate optimization (Xiao et al., 2024): one gate per (layer, KV head),
//!   trained with Adam so that the gated model's final hidden states match the dense model's, with an
//!   L1 push towards streaming. Checkpointed and resumable.
//! - [`score`]: the Retrieval Head paper's copy-paste score (Wu et al., 2024): how often a head's
//!   most-attended position is the needle token the model is producing. No training.
//! - [`eval`]: retrieval accuracy of the model with chosen KV heads streaming (passkey, kv-retrieval).
//! - [`HeadScores`]: the result of either method, per (layer, KV head), as JSON
//!   (`attnplan retrieval-heads --out`), and [`apply_to_plan`], the hook that turns a calibrated plan
//!   into a hybrid one: the lowest-ranked fraction of KV heads streaming, every head annotated.

pub mod duo;
pub mod eval;
pub mod score;

use std::path::Path;

use schemas::{Budget, HeadPlan, Pattern, Plan, Streaming};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Version of the [`HeadScores`] file format.
pub const HEAD_SCORES_VERSION: u32 = 1;

/// Defaults of the streaming window, scaled from DuoAttention's 128 + 256 (for 1K–32K tokens) to
/// SmolLM2's 8K context and our 512–1K-token training lengths.
pub const DEFAULT_SINK: usize = 64;
pub const DEFAULT_RECENT: usize = 128;

/// How heads were ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// DuoAttention gates.
    Duo,
    /// Retrieval Head copy-paste scores.
    Score,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Duo => "duo",
            Method::Score => "score",
        }
    }
}

/// Per (layer, KV head) value of one method, high meaning retrieval: a gate in `[0, 1]` or a score in
/// `[0, 1]`. Written by `attnplan retrieval-heads`, read by `attnplan calibrate --retrieval-heads FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadScores {
    pub version: u32,
    pub method: Method,
    /// The model file or directory it was computed on, and its shape.
    pub model: String,
    pub layers: usize,
    pub kv_heads: usize,
    pub q_heads: usize,
    /// `[layers][kv_heads]`: the gate, or the largest score among the KV head's query heads.
    pub kv: Vec<Vec<f64>>,
    /// `[layers][q_heads]`: per query head (score method only; gates are per KV head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<Vec<Vec<f64>>>,
    /// `[layers][kv_heads]`, duo only: how hard the distillation loss pulls each gate open
    /// (`−∂distill/∂gate`, an exponential average over the steps). Ranks the gates that end equal,
    /// most often many at 0, where the clamp hides the difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<Vec<Vec<f64>>>,
    /// The settings it was computed with, for people.
    pub settings: serde_json::Value,
}

impl HeadScores {
    /// Reads and checks a file written by [`HeadScores::write`].
    pub fn read(path: &Path) -> Result<Self, Error> {
        let input = |field: &str, message: String| Error::Input {
            path: path.to_path_buf(),
            field: field.into(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| input("(file)", format!("cannot read: {e}")))?;
        let s: HeadScores =
            serde_json::from_str(&text).map_err(|e| input("(json)", e.to_string()))?;
        if s.version != HEAD_SCORES_VERSION {
            return Err(input(
                "version",
                format!("{}, expected {HEAD_SCORES_VERSION}", s.version),
            ));
        }
        if s.kv.len() != s.layers {
            return Err(input(
                "kv",
                format!("{} layers, expected {}", s.kv.len(), s.layers),
            ));
        }
        for (l, row) in s.kv.iter().enumerate() {
            if row.len() != s.kv_heads {
                return Err(input(
                    &format!("kv[{l}]"),
                    format!("{} values, expected {}", row.len(), s.kv_heads),
                ));
            }
            if let Some((h, x)) = row
                .iter()
                .enumerate()
                .find(|(_, x)| !(0.0..=1.0).contains(*x))
            {
                return Err(input(
                    &format!("kv[{l}][{h}]"),
                    format!("{x} is outside [0, 1]"),
                ));
            }
        }
        if let Some(p) = &s.pull {
            let bad = p.len() != s.layers || p.iter().any(|r| r.len() != s.kv_heads);
            if bad || p.iter().flatten().any(|x| !x.is_finite()) {
                return Err(input(
                    "pull",
                    format!("expected [{}][{}] finite values", s.layers, s.kv_heads),
                ));
            }
        }
        if let Some(q) = &s.query {
            let bad = q.len() != s.layers || q.iter().any(|r| r.len() != s.q_heads);
            if bad {
                return Err(input(
                    "query",
                    format!("expected [{}][{}]", s.layers, s.q_heads),
                ));
            }
        }
        Ok(s)
    }

    /// Writes pretty JSON atomically (temp file and rename).
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Usage(e.to_string()))?;
        schemas::io::write_atomic(path, (json + "\n").as_bytes())?;
        Ok(())
    }

    /// Values flattened layer-major, `[layers * kv_heads]`.
    pub fn flat(&self) -> Vec<f64> {
        self.kv.iter().flatten().copied().collect()
    }

    /// The `round(fraction * layers * kv_heads)` lowest-ranked KV heads marked streaming (layer-major;
    /// equal values ranked by [`HeadScores::pull`] where present, then by position, so the result is
    /// deterministic).
    pub fn streaming(&self, fraction: f64) -> Vec<bool> {
        let pull: Option<Vec<f64>> = self
            .pull
            .as_ref()
            .map(|p| p.iter().flatten().copied().collect());
        lowest_by(&self.flat(), pull.as_deref(), fraction)
    }
}

/// Marks the `round(fraction * n)` smallest of `values` (ties: earlier first).
pub fn lowest(values: &[f64], fraction: f64) -> Vec<bool> {
    lowest_by(values, None, fraction)
}

/// Marks the `round(fraction * n)` smallest of `values`; ties ranked by `then` (smaller first) when
/// given, then by position.
pub fn lowest_by(values: &[f64], then: Option<&[f64]>, fraction: f64) -> Vec<bool> {
    let n = values.len();
    let k = count_of(n, fraction);
    let second = |i: usize| then.and_then(|t| t.get(i)).copied().unwrap_or(0.0);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        values[a]
            .total_cmp(&values[b])
            .then(second(a).total_cmp(&second(b)))
            .then(a.cmp(&b))
    });
    let mut marked = vec![false; n];
    for &i in order.iter().take(k) {
        marked[i] = true;
    }
    marked
}

/// `round(fraction * n)` clamped to `0..=n`.
pub fn count_of(n: usize, fraction: f64) -> usize {
    ((fraction.clamp(0.0, 1.0) * n as f64).round() as usize).min(n)
}

/// `round(fraction * n)` of `n` KV heads chosen uniformly at random (a partial Fisher–Yates shuffle
/// driven by SplitMix64 from `seed`).
pub fn random_streaming(n: usize, fraction: f64, seed: u64) -> Vec<bool> {
    let k = count_of(n, fraction);
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + (next() % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut marked = vec![false; n];
    for &i in idx.iter().take(k) {
        marked[i] = true;
    }
    marked
}

/// Number of marked entries that two selections share.
pub fn overlap(a: &[bool], b: &[bool]) -> usize {
    a.iter().zip(b).filter(|(x, y)| **x && **y).count()
}

/// How a plan becomes hybrid.
#[derive(Debug, Clone)]
pub struct Hybrid<'a> {
    pub scores: &'a HeadScores,
    /// Fraction of KV heads made streaming, in `[0, 1]`.
    pub streaming_fraction: f64,
    pub sink: u64,
    pub recent: u64,
}

/// What [`apply_to_plan`] did.
#[derive(Debug, Clone, Serialize)]
pub struct HybridSummary {
    pub method: Method,
    pub streaming_kv_heads: usize,
    pub kv_heads: usize,
    pub streaming_query_heads: usize,
    pub sink: u64,
    pub recent: u64,
    /// The plan's longest calibrated length, at which the two densities below are predicted.
    pub seq_len: u64,
    /// Mean predicted fraction of dense cells over all heads: the searched plan, and the hybrid one.
    pub searched_cells: f64,
    pub hybrid_cells: f64,
}

impl HybridSummary {
    /// One line for the calibration report.
    pub fn line(&self) -> String {
        format!(
            "retrieval    {} of {} KV heads streaming by {} ({} query heads; sink {}, recent {}); the rest as searched\n\
             hybrid       predicted cells at {} tokens {:.4} (the searched plan above: {:.4})\n",
            self.streaming_kv_heads,
            self.kv_heads,
            self.method.name(),
            self.streaming_query_heads,
            self.sink,
            self.recent,
            self.seq_len,
            self.hybrid_cells,
            self.searched_cells
        )
    }
}

/// Makes `plan` hybrid: every query head of the lowest-ranked `streaming_fraction` of KV heads gets
/// `Pattern::Streaming { sink, recent }` (its calibrated recall no longer applies and is dropped; its
/// FLOPs fraction becomes that of the window at the plan's longest calibrated length); every head
/// gets its `gate` (duo) or `retrieval_score` (score; the query head's own score where known). Other
/// heads keep the pattern the search chose.
pub fn apply_to_plan(plan: &mut Plan, hybrid: &Hybrid<'_>) -> Result<HybridSummary, Error> {
    let s = hybrid.scores;
    let (layers, q_heads, kv_heads) = (
        plan.model.layers as usize,
        plan.model.query_heads as usize,
        plan.model.kv_heads as usize,
    );
    if (s.layers, s.q_heads, s.kv_heads) != (layers, q_heads, kv_heads) {
        return Err(Error::Usage(format!(
            "retrieval heads of a model with {} layers, {} query and {} KV heads; the plan's model has {layers}, {q_heads} and {kv_heads}",
            s.layers, s.q_heads, s.kv_heads
        )));
    }
    if !(0.0..=1.0).contains(&hybrid.streaming_fraction) {
        return Err(Error::Usage(format!(
            "--streaming-fraction {} is outside [0, 1]",
            hybrid.streaming_fraction
        )));
    }
    let streaming = s.streaming(hybrid.streaming_fraction);
    let group = q_heads / kv_heads.max(1);
    let longest = plan.provenance.seq_lens.iter().copied().max().unwrap_or(1);
    let pattern = Pattern::Streaming(Streaming {
        sink: Budget::Fixed(hybrid.sink),
        recent: Budget::Fixed(hybrid.recent.max(1)),
    });
    let density =
        crate::emit::predicted_density(&pattern, 1.0, longest, u64::from(plan.defaults.block_k));
    let mean_cells = |plan: &Plan| {
        let f: Vec<f64> = plan
            .layers
            .iter()
            .flat_map(|l| &l.heads)
            .map(|h| h.flops_fraction.unwrap_or(1.0))
            .collect();
        f.iter().sum::<f64>() / f.len().max(1) as f64
    };
    let searched_cells = mean_cells(plan);
    let mut streaming_query_heads = 0;
    for layer in &mut plan.layers {
        let l = layer.layer as usize;
        for head in &mut layer.heads {
            let h = head.head as usize;
            let kv = h / group.max(1);
            let value = s.kv.get(l).and_then(|r| r.get(kv)).copied();
            let own = s
                .query
                .as_ref()
                .and_then(|q| q.get(l))
                .and_then(|r| r.get(h))
                .copied()
                .or(value);
            match s.method {
                Method::Duo => head.gate = value.map(crate::emit::round),
                Method::Score => head.retrieval_score = own.map(crate::emit::round),
            }
            if streaming.get(l * kv_heads + kv).copied().unwrap_or(false) {
                make_streaming(head, &pattern, density);
                streaming_query_heads += 1;
            }
        }
    }
    Ok(HybridSummary {
        method: s.method,
        streaming_kv_heads: streaming.iter().filter(|x| **x).count(),
        kv_heads: streaming.len(),
        streaming_query_heads,
        sink: hybrid.sink,
        recent: hybrid.recent.max(1),
        seq_len: longest,
        searched_cells,
        hybrid_cells: mean_cells(plan),
    })
}

fn make_streaming(head: &mut HeadPlan, pattern: &Pattern, density: f64) {
    head.pattern = pattern.clone();
    head.recall = None;
    head.validated_recall = None;
    head.flops_fraction = Some(crate::emit::round(density));
}
