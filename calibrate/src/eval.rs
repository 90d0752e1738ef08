//! Evaluation: the same inputs through the dense model and through the plan's sparse prefill.
//!
//! Per sample, two forwards over `prompt + answer` tokens: dense ([`DenseAttention`]) and sparse
//! ([`EvalAttention`], which runs [`SparsePrefill`] and, on the same layer input, dense attention too, so
//! that each layer's output error `‖O_sparse − O_dense‖ / ‖O_dense‖` and the attention wall times of
//! both are measured in the same run). From the hidden states:
//! - perplexity over the prompt tokens (next-token log-likelihood, natural log);
//! - the retrieval answer: a sample passes when the model's argmax reproduces every answer token given
//!   the previous ones — exactly the condition for greedy decoding to produce the answer. The prompt
//!   runs under the plan (the sparse prefill; its last row predicts the first answer token); the
//!   answer tokens' own rows attend densely over everything before them ([`dense_rows`]), which is
//!   what decoding them one by one over the prefill's KV cache computes. With
//!   [`EvalAttention::decode_rows`] at 0 they run under the plan too (stricter than any engine). The
//!   answer's log-probability is reported beside it;
//! - on the samples chosen for comparison ([`EvalAttention::compare_dense`]), dense attention on the
//!   same layer inputs: the output error and both attention wall times;
//! - on the first sample, every head's measured recall of the index the runtime built
//!   ([`recall_of_index`], exact, streamed), and what sharing one index per KV group would cost: the
//!   recall of each head's pattern built from the live Q of its group's first query head (the
//!   runtime's sharing rule) instead of its own, with the index-building time of both.

use std::path::{Path, PathBuf};
use std::time::Instant;

use profiler::data::Sample;
use profiler::model::{argmax, DenseAttention, LayerAttention, Model};
use profiler::stats::recall_of_index;
use runtime::exec::reference::reference_row;
use runtime::pattern::{build_index, HeadQk, PatternContext};
use runtime::{AttentionInput, PrefillOptions, SparsePrefill};
use schemas::Plan;
use serde::{Deserialize, Serialize};

use crate::gpu_eval::GpuAttention;
use crate::Error;

/// The sparse forward's attention: the plan's sparse output, with dense computed beside it.
pub struct EvalAttention {
    prefill: SparsePrefill,
    /// Per layer: squared norms of (sparse − dense) and of dense, summed over calls.
    pub err: Vec<(f64, f64)>,
    pub sparse_seconds: f64,
    pub dense_seconds: f64,
    /// Run dense attention beside the sparse one on the next forwards (output error and times).
    pub compare_dense: bool,
    /// Measure every head's recall on the next forward (expensive: two more passes per head).
    pub measure_recall: bool,
    /// `[layer][head]` measured recall of the last forward that measured it.
    pub recall: Vec<Vec<f64>>,
    /// `[layer][head]` recall with the index built from the Q of the head's KV-group owner (the
    /// first query head of the group); equal to `recall` for owners.
    pub shared_recall: Vec<Vec<f64>>,
    /// Index-building seconds of the measured forward: every head from its own Q, and the owners
    /// only (what sharing would cost).
    pub index_seconds_own: f64,
    pub index_seconds_shared: f64,
    /// The last rows of the next forwards that are decoded tokens, not prefill: attended densely.
    pub decode_rows: usize,
    /// With `--device cuda`: the plan runs on the GPU, and `prefill` (the CPU's) only on the
    /// compared forwards, beside it.
    pub gpu: Option<GpuAttention>,
    dense_out: Vec<f32>,
    cpu_out: Vec<f32>,
}

impl EvalAttention {
    pub fn new(plan: &Plan, model: &schemas::ModelInfo) -> Result<Self, Error> {
        let prefill = SparsePrefill::new(plan, model, PrefillOptions::default())
            .map_err(|e| Error::Usage(e.to_string()))?;
        Ok(Self {
            prefill,
            err: vec![(0.0, 0.0); model.layers as usize],
            sparse_seconds: 0.0,
            dense_seconds: 0.0,
            compare_dense: true,
            measure_recall: false,
            recall: vec![vec![f64::NAN; model.query_heads as usize]; model.layers as usize],
            shared_recall: vec![vec![f64::NAN; model.query_heads as usize]; model.layers as usize],
            index_seconds_own: 0.0,
            index_seconds_shared: 0.0,
            decode_rows: 0,
            gpu: None,
            dense_out: Vec::new(),
            cpu_out: Vec::new(),
        })
    }

    /// Runs the plan's attention on the GPU instead ([`GpuAttention`]).
    pub fn with_gpu(self, gpu: GpuAttention) -> Self {
        Self {
            gpu: Some(gpu),
            ..self
        }
    }

    pub fn prefill(&self) -> &SparsePrefill {
        &self.prefill
    }
}

impl LayerAttention for EvalAttention {
    fn attend(
        &mut self,
        layer: usize,
        input: &AttentionInput<'_>,
        out: &mut [f32],
    ) -> profiler::Result<()> {
        let start = Instant::now();
        match &mut self.gpu {
            Some(gpu) => {
                gpu.forward(layer, input, out)?;
                if self.compare_dense {
                    // the CPU prefill beside it; its time is the sparse attention time
                    self.sparse_seconds +=
                        gpu.compare(layer, input, out, &mut self.prefill, &mut self.cpu_out)?;
                }
            }
            None => {
                self.prefill.forward(layer, input, out)?;
                if self.compare_dense {
                    self.sparse_seconds += start.elapsed().as_secs_f64();
                }
            }
        }
        if self.compare_dense {
            self.dense_out.resize(out.len(), 0.0);
            let start = Instant::now();
            DenseAttention.attend(layer, input, &mut self.dense_out)?;
            self.dense_seconds += start.elapsed().as_secs_f64();
            add_squared_error(&mut self.err, layer, out, &self.dense_out);
        }
        if self.measure_recall {
            self.measure(layer, input)?;
            if let Some(gpu) = &mut self.gpu {
                gpu.measure_recall(layer, input)?;
            }
        }
        // After the timing and the output error, which describe the plan's prefill over every row.
        let n = input.shape.seq_len;
        dense_rows(input, n.saturating_sub(self.decode_rows), out);
        Ok(())
    }
}

/// Adds `‖got − want‖²` and `‖want‖²` to `sums[layer]` (a layer's relative output error is the
/// square root of their ratio over its calls).
pub(crate) fn add_squared_error(sums: &mut [(f64, f64)], layer: usize, got: &[f32], want: &[f32]) {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        diff += f64::from(g - w).powi(2);
        norm += f64::from(*w).powi(2);
    }
    if let Some(e) = sums.get_mut(layer) {
        e.0 += diff;
        e.1 += norm;
    }
}

/// Exact attention (f64, [`reference_row`]) of rows `from..` of every query head, written over
/// `out` (`[q_heads, seq_len, head_dim]`): what decoding those tokens one at a time over a KV cache
/// computes. Rows `..from` are left as they are.
pub fn dense_rows(input: &AttentionInput<'_>, from: usize, out: &mut [f32]) {
    let (n, d) = (input.shape.seq_len, input.shape.head_dim);
    let mut scores = Vec::with_capacity(n);
    let mut row = vec![0.0f64; d];
    for h in 0..input.shape.q_heads {
        for i in from..n {
            row.fill(0.0);
            reference_row(input, h, i, |_| true, &mut scores, &mut row);
            if let Some(o) = out.get_mut((h * n + i) * d..(h * n + i + 1) * d) {
                for (o, &x) in o.iter_mut().zip(&row) {
                    *o = x as f32;
                }
            }
        }
    }
}

impl EvalAttention {
    /// Every head's recall with its own index and with its KV-group owner's (see the module docs).
    fn measure(&mut self, layer: usize, input: &AttentionInput<'_>) -> profiler::Result<()> {
        let plan = self.prefill.plan();
        let ctx = PatternContext::new(input.shape.seq_len, &plan.defaults);
        let dense_below = plan.defaults.dense_below as usize;
        let group = input.shape.group();
        for h in 0..input.shape.q_heads {
            let owner = input.shape.kv_head_of(h) * group;
            let (own, shared) = match plan.head(layer, h) {
                Some(hp) if input.shape.seq_len >= dense_below => {
                    let start = Instant::now();
                    let index = build_index(&hp.pattern, &ctx, &HeadQk::from_input(input, h)?)?;
                    let built = start.elapsed().as_secs_f64();
                    self.index_seconds_own += built;
                    let own = recall_of_index(input, h, &index)?.mean;
                    let shared = if owner == h {
                        self.index_seconds_shared += built;
                        own
                    } else {
                        let qk = HeadQk::from_input(input, owner)?;
                        recall_of_index(input, h, &build_index(&hp.pattern, &ctx, &qk)?)?.mean
                    };
                    (own, shared)
                }
                _ => (1.0, 1.0),
            };
            if let Some(slot) = self.recall.get_mut(layer).and_then(|l| l.get_mut(h)) {
                *slot = own;
            }
            if let Some(slot) = self.shared_recall.get_mut(layer).and_then(|l| l.get_mut(h)) {
                *slot = shared;
            }
        }
        Ok(())
    }
}

/// One sample's figures under one attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleEval {
    /// Sum of `-log p` over the prompt's next-token predictions, and how many.
    pub nll: f64,
    pub tokens: usize,
    /// Whether the argmax reproduces the answer (None for samples without a task).
    pub correct: Option<bool>,
    /// `log p(answer | prompt)`, natural log.
    pub answer_logprob: Option<f64>,
}

/// Runs `sample` (prompt, then its answer if it has a task) through `model` with `attn`.
pub fn eval_sample(
    model: &Model,
    sample: &Sample,
    attn: &mut dyn LayerAttention,
) -> Result<SampleEval, Error> {
    let tokens = full_tokens(sample);
    let answer: &[u32] = sample
        .task
        .as_ref()
        .map_or(&[][..], |t| t.answer_tokens.as_slice());
    let hidden = model.forward_hidden(&tokens, attn)?;
    let logp = model.next_token_logprobs(&hidden, &tokens)?;
    let prompt = sample.tokens.len();
    // logp[i] = log p(tokens[i + 1] | ..i): prompt predictions are i < prompt - 1.
    let nll: f64 = logp
        .iter()
        .take(prompt.saturating_sub(1))
        .map(|&x| -f64::from(x))
        .sum();
    let (correct, answer_logprob) = if answer.is_empty() {
        (None, None)
    } else {
        let rows = prompt - 1..prompt - 1 + answer.len();
        let logits = model.logits_rows(&hidden, rows)?;
        let ok = (0..answer.len()).all(|i| argmax(logits.row(i)) == answer.get(i).copied());
        let lp: f64 = logp[prompt - 1..prompt - 1 + answer.len()]
            .iter()
            .map(|&x| f64::from(x))
            .sum();
        (Some(ok), Some(lp))
    };
    Ok(SampleEval {
        nll,
        tokens: prompt.saturating_sub(1),
        correct,
        answer_logprob,
    })
}

/// Dense results kept on disk, one JSON file per model and token sequence, so that several plans
/// evaluated on the same samples run the dense forward once. A file holds the model fingerprint and
/// the whole token sequence (prompt and answer) it was computed for, and is used only when both are
/// equal; a file that cannot be read or parsed is an error naming it, never silently recomputed.
/// Files are written atomically.
#[derive(Debug, Clone)]
pub struct DenseCache {
    dir: PathBuf,
    fingerprint: String,
}

#[derive(Serialize, Deserialize)]
struct CachedDense {
    fingerprint: String,
    sample: String,
    tokens: Vec<u32>,
    dense: SampleEval,
}

impl DenseCache {
    /// A cache in `dir` (created if missing) for the model with this fingerprint.
    pub fn new(dir: &Path, fingerprint: &str) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Input {
            path: dir.to_path_buf(),
            field: "dense cache directory".into(),
            message: e.to_string(),
        })?;
        Ok(DenseCache {
            dir: dir.to_path_buf(),
            fingerprint: fingerprint.to_string(),
        })
    }

    /// The file for `tokens`: FNV-1a (64 bits) of the fingerprint and the tokens; the file's own
    /// contents decide whether it really is for them.
    fn path(&self, tokens: &[u32]) -> PathBuf {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let bytes = self
            .fingerprint
            .bytes()
            .chain(tokens.iter().flat_map(|t| t.to_le_bytes()));
        for b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.dir.join(format!("dense-{h:016x}.json"))
    }

    /// The dense result stored for `sample` (prompt and answer tokens), if any.
    pub fn get(&self, sample: &Sample) -> Result<Option<SampleEval>, Error> {
        let tokens = full_tokens(sample);
        let path = self.path(&tokens);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Input {
                    path,
                    field: "dense cache entry".into(),
                    message: e.to_string(),
                })
            }
        };
        let entry: CachedDense = serde_json::from_str(&text).map_err(|e| Error::Input {
            path: path.clone(),
            field: "dense cache entry".into(),
            message: format!("{e} (delete the file to recompute it)"),
        })?;
        Ok(
            (entry.fingerprint == self.fingerprint && entry.tokens == tokens)
                .then_some(entry.dense),
        )
    }

    /// Stores `dense` as the dense result for `sample`.
    pub fn put(&self, sample: &Sample, dense: &SampleEval) -> Result<(), Error> {
        let tokens = full_tokens(sample);
        let path = self.path(&tokens);
        let entry = CachedDense {
            fingerprint: self.fingerprint.clone(),
            sample: sample.id.clone(),
            tokens,
            dense: dense.clone(),
        };
        let text = serde_json::to_string(&entry).map_err(|e| Error::Input {
            path: path.clone(),
            field: "dense cache entry".into(),
            message: e.to_string(),
        })?;
        schemas::io::write_atomic(&path, text.as_bytes())?;
        Ok(())
    }
}

/// The tokens a sample's forward runs over: the prompt, then the answer if it has a task.
fn full_tokens(sample: &Sample) -> Vec<u32> {
    let mut tokens = sample.tokens.clone();
    if let Some(t) = &sample.task {
        tokens.extend_from_slice(&t.answer_tokens);
    }
    tokens
}

#[cfg(test)]
mod tests {
    use runtime::exec::reference::dense_reference;
    use runtime::AttnShape;

    use super::*;

    /// The decoded rows equal f64 dense attention (GQA 3:1, odd length); the prefill rows before them
    /// are left untouched.
    #[test]
    fn dense_rows_equal_the_f64_reference_and_touch_nothing_else() -> Result<(), runtime::Error> {
        let shape = AttnShape {
            q_heads: 3,
            kv_heads: 1,
            seq_len: 37,
            head_dim: 8,
        };
        let mut x = 11u64;
        let mut rand = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
                })
                .collect()
        };
        let (q, k, v) = (rand(3 * 37 * 8), rand(37 * 8), rand(37 * 8));
        let input = AttentionInput::new(shape, &q, &k, &v)?;
        let want = dense_reference(&input)?;
        let mut out = vec![7.0f32; q.len()];
        dense_rows(&input, 30, &mut out);
        for h in 0..3 {
            for i in 0..37 {
                for c in 0..8 {
                    let at = (h * 37 + i) * 8 + c;
                    if i < 30 {
                        assert_eq!(out[at], 7.0, "prefill row {i} of head {h} was written");
                    } else {
                        // f32 output of an f64 computation: one rounding.
                        let err = (f64::from(out[at]) - want[at]).abs();
                        assert!(err <= 1e-6 * want[at].abs().max(1.0), "row {i}: {err:e}");
                    }
                }
            }
        }
        Ok(())
    }

    /// A stored dense result comes back only for the same model and the same tokens; a damaged file
    /// is an error that names it.
    #[test]
    fn the_dense_cache_returns_only_what_it_stored_for_these_tokens() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Usage(e.to_string()))?;
        let sample = Sample {
            id: "text:0".into(),
            tokens: vec![5, 17, 3, 9],
            task: None,
        };
        let other = Sample {
            tokens: vec![5, 17, 3, 10],
            ..sample.clone()
        };
        let result = SampleEval {
            nll: 12.5,
            tokens: 3,
            correct: None,
            answer_logprob: None,
        };
        let cache = DenseCache::new(dir.path(), "sha256:aa")?;
        assert_eq!(cache.get(&sample)?, None);
        cache.put(&sample, &result)?;
        assert_eq!(cache.get(&sample)?, Some(result.clone()));
        assert_eq!(cache.get(&other)?, None);
        assert_eq!(
            DenseCache::new(dir.path(), "sha256:bb")?.get(&sample)?,
            None
        );

        let path = cache.path(&sample.tokens);
        std::fs::write(&path, "{\"fingerprint\": 3").map_err(|e| Error::Usage(e.to_string()))?;
        let err = cache.get(&sample).expect_err("a damaged entry is an error");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        Ok(())
    }
}
