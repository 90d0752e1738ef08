//! The Retrieval Head paper's score (Wu et al., "Retrieval Head Mechanistically Explains Long-Context
//! Factuality", 2024), on synthetic passkey and kv-retrieval prompts with the dense model.
//!
//! At each step `t` of the answer, the model produces token `y_t` (the argmax at the row before it); a
//! query head copy-pastes at that step when its most-attended key (argmax of its dense attention row)
//! lies in the needle span and holds `y_t`. A head's score on a sample is the fraction of the answer's
//! steps at which it copy-pastes; its score is the mean over samples. The steps are teacher forced on
//! the true answer (one forward per sample, see [`super::eval`]); where the model answers right this is
//! greedy decoding exactly. A KV head's score is the largest of its query heads' (it must stay whole if
//! any of them retrieves).

use std::ops::Range;

use profiler::data::{ChatTemplate, TaskKind};
use profiler::model::{LayerAttention, Model};
use runtime::AttentionInput;
use serde::{Deserialize, Serialize};

use super::eval::{cases, predictions};
use super::{HeadScores, Method, HEAD_SCORES_VERSION};
use crate::Error;

/// Settings of the score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreConfig {
    pub seq_len: usize,
    /// Samples per task.
    pub samples: usize,
    pub tasks: Vec<TaskKind>,
    pub chat: ChatTemplate,
    pub seed: u64,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self {
            seq_len: 1024,
            samples: 10,
            tasks: vec![TaskKind::Passkey, TaskKind::KvRetrieval],
            chat: ChatTemplate::ChatMl,
            seed: 2001,
        }
    }
}

/// A [`LayerAttention`] computing dense attention and recording, for each query head and each row in
/// `rows`, the key position of the largest attention weight (the argmax of the scores, first on ties).
#[derive(Debug, Clone)]
pub struct ArgmaxKeys {
    pub rows: Range<usize>,
    /// `[layers][q_heads * rows.len()]`, head-major.
    pub keys: Vec<Vec<usize>>,
}

impl LayerAttention for ArgmaxKeys {
    fn attend(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
        out: &mut [f32],
    ) -> profiler::Result<()> {
        runtime::exec::dense_attention(input, out)?;
        let shape = input.shape;
        let rows = self.rows.start.min(shape.seq_len)..self.rows.end.min(shape.seq_len);
        let mut keys = Vec::with_capacity(shape.q_heads * rows.len());
        for h in 0..shape.q_heads {
            let kv = shape.kv_head_of(h);
            for i in rows.clone() {
                let q = input.q_row(h, i);
                let mut best = (0, f32::NEG_INFINITY);
                for j in 0..=i {
                    let s: f32 = q.iter().zip(input.k_row(kv, j)).map(|(a, b)| a * b).sum();
                    if s > best.1 {
                        best = (j, s);
                    }
                }
                keys.push(best.0);
            }
        }
        if self.keys.len() <= layer {
            self.keys.resize(layer + 1, Vec::new());
        }
        self.keys[layer] = keys;
        Ok(())
    }
}

/// Scores every head of `model`; `on_case(done, total)` reports progress.
pub fn score(
    model: &Model,
    config: &ScoreConfig,
    mut on_case: impl FnMut(usize, usize),
) -> Result<HeadScores, Error> {
    let cfg = model.config();
    let (layers, qh, kvh) = (cfg.layers, cfg.q_heads, cfg.kv_heads);
    let mut all = Vec::new();
    for &task in &config.tasks {
        all.extend(cases(
            model,
            task,
            config.chat,
            config.seq_len,
            config.samples,
            config.seed,
        )?);
    }
    if all.is_empty() {
        return Err(Error::Usage("the score needs at least one sample".into()));
    }
    let mut sum = vec![0.0f64; layers * qh];
    let mut right = 0usize;
    for (n, case) in all.iter().enumerate() {
        let rows = case.answer_rows();
        let mut hook = ArgmaxKeys {
            rows: rows.clone(),
            keys: Vec::new(),
        };
        let hidden = model.forward_hidden(&case.tokens, &mut hook)?;
        let outcome = predictions(model, case, &hidden)?;
        right += usize::from(outcome.exact);
        let steps = rows.len().max(1) as f64;
        for (l, keys) in hook.keys.iter().enumerate() {
            for h in 0..qh {
                let hits = outcome
                    .predicted
                    .iter()
                    .enumerate()
                    .filter(|&(t, &y)| {
                        keys.get(h * rows.len() + t).is_some_and(|&key| {
                            case.needle.contains(&key) && case.tokens.get(key) == Some(&y)
                        })
                    })
                    .count();
                sum[l * qh + h] += hits as f64 / steps;
            }
        }
        on_case(n + 1, all.len());
    }
    let count = all.len() as f64;
    let query: Vec<Vec<f64>> = sum
        .chunks(qh)
        .map(|r| r.iter().map(|s| s / count).collect())
        .collect();
    let group = qh / kvh.max(1);
    let kv: Vec<Vec<f64>> = query
        .iter()
        .map(|r| {
            r.chunks(group.max(1))
                .map(|g| g.iter().copied().fold(0.0, f64::max))
                .collect()
        })
        .collect();
    let mut settings = serde_json::to_value(config).map_err(|e| Error::Usage(e.to_string()))?;
    if let Some(obj) = settings.as_object_mut() {
        obj.insert("cases".into(), all.len().into());
        obj.insert("dense_exact_matches".into(), right.into());
    }
    Ok(HeadScores {
        version: HEAD_SCORES_VERSION,
        method: Method::Score,
        model: model.path().display().to_string(),
        layers,
        kv_heads: kvh,
        q_heads: qh,
        kv,
        query: Some(query),
        pull: None,
        settings,
    })
}
