//! DuoAttention's gate optimization on our CPU budget.
//!
//! Parameters `α`, one per (layer, KV head), start at 1; the gates are `α` itself, projected onto
//! `[0, 1]` after every step (DuoAttention's clamping). Each step takes one synthetic passkey sample
//! with its answer appended (cycling over [`DuoConfig::samples`] of them), runs the gated forward
//! ([`profiler::gated::GatedModel`]), and minimizes
//! `mean((h_gated − h_dense)^2) + λ · mean(gates)` over the final hidden states of the rows that
//! predict the answer (DuoAttention's supervised rows; [`LossRows::All`] takes every row), with Adam
//! on `α` only; the model is frozen. The dense targets are computed once with the fast forward.
//!
//! The clamp leaves many gates at exactly 0, and the ranking among them would be arbitrary; each
//! gate's pull, `−∂distill/∂gate` averaged over the steps, ranks them (how much opening the gate would
//! lower the distillation loss).
//!
//! A [`Checkpoint`] (JSON: step, `α`, Adam moments, loss history, settings) is written atomically every
//! [`DuoConfig::checkpoint_every`] steps and at the end; [`train`] with `resume` continues from it.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use profiler::data::{load_samples, ChatTemplate, DataSource};
use profiler::gated::GatedModel;
use profiler::model::{DenseAttention, Hidden, Model};
use serde::{Deserialize, Serialize};

use super::{HeadScores, Method, DEFAULT_RECENT, DEFAULT_SINK, HEAD_SCORES_VERSION};
use crate::Error;

/// Version of the checkpoint format.
pub const CHECKPOINT_VERSION: u32 = 2;

/// Weight of the previous average in a gate's pull (about the last 10 steps count).
const PULL_DECAY: f64 = 0.9;

/// Which rows' hidden states the distillation loss compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LossRows {
    /// The rows that predict the answer's tokens (DuoAttention); every row for data without one.
    #[default]
    Answer,
    /// Every row.
    All,
}

/// Settings of one optimization. Defaults: DuoAttention's recipe (sink 128, recent 256, λ 0.05,
/// lr 0.02, 2000 steps at 1K–32K tokens, loss on the answer rows) cut to what 2 CPU cores do in
/// about 20 minutes on SmolLM2: sink 64, recent 128, 10 ChatML passkey samples of 1,024 tokens (the
/// length the evaluation uses), 50 steps (about 20 s each on 2 idle cores; 24 min measured with
/// other jobs beside it), lr 0.05 (fewer steps), λ 0.05 on the mean gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuoConfig {
    pub sink: usize,
    pub recent: usize,
    /// Tokens per training sample.
    pub seq_len: usize,
    /// Distinct passkey samples, used in turn.
    pub samples: usize,
    pub steps: usize,
    pub lr: f64,
    /// Weight of `mean(gates)` in the loss.
    pub lambda: f64,
    pub seed: u64,
    /// Training data (`synthetic:passkey` by default; any `--data` spec).
    pub data: String,
    /// Prompt template of synthetic training data.
    pub chat: ChatTemplate,
    pub loss_rows: LossRows,
    pub checkpoint_every: usize,
}

impl Default for DuoConfig {
    fn default() -> Self {
        Self {
            sink: DEFAULT_SINK,
            recent: DEFAULT_RECENT,
            seq_len: 1024,
            samples: 10,
            steps: 50,
            lr: 0.05,
            lambda: 0.05,
            seed: 1001,
            data: "synthetic:passkey".into(),
            chat: ChatTemplate::ChatMl,
            loss_rows: LossRows::Answer,
            checkpoint_every: 10,
        }
    }
}

/// Adam (Kingma and Ba) over `f64` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken.
    pub t: u64,
    pub m: Vec<f64>,
    pub v: Vec<f64>,
}

impl Adam {
    pub fn new(n: usize) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// One step on `params` with gradient `grad` and learning rate `lr`.
    pub fn step(&mut self, params: &mut [f64], grad: &[f64], lr: f64) {
        self.t += 1;
        let t = self.t as i32;
        let (c1, c2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grad)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m = self.beta1 * *m + (1.0 - self.beta1) * g;
            *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
            *p -= lr * (*m / c1) / ((*v / c2).sqrt() + self.eps);
        }
    }
}

/// Everything needed to continue an optimization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub version: u32,
    /// Steps done.
    pub step: usize,
    pub config: DuoConfig,
    /// `α`, layer-major `[layers * kv_heads]` (already in `[0, 1]`).
    pub gates: Vec<f64>,
    /// Each gate's pull, `−∂distill/∂gate`, exponentially averaged over the steps.
    pub pull: Vec<f64>,
    pub adam: Adam,
    /// Loss of every step done.
    pub losses: Vec<f64>,
}

impl Checkpoint {
    pub fn read(path: &Path) -> Result<Self, Error> {
        let input = |message: String| Error::Input {
            path: path.to_path_buf(),
            field: "(checkpoint)".into(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| input(format!("cannot read: {e}")))?;
        let c: Checkpoint = serde_json::from_str(&text).map_err(|e| input(e.to_string()))?;
        if c.version != CHECKPOINT_VERSION {
            return Err(input(format!(
                "version {}, expected {CHECKPOINT_VERSION}",
                c.version
            )));
        }
        let n = c.gates.len();
        if c.adam.m.len() != n || c.adam.v.len() != n || c.pull.len() != n {
            return Err(input("Adam state, pull and gates differ in length".into()));
        }
        Ok(c)
    }

    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let json = serde_json::to_string(self).map_err(|e| Error::Usage(e.to_string()))?;
        schemas::io::write_atomic(path, (json + "\n").as_bytes())?;
        Ok(())
    }
}

/// What one step did, for progress output.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// 1-based.
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub distill: f64,
    pub reg: f64,
    pub mean_gate: f64,
    pub seconds: f64,
    /// Set when a checkpoint was written after this step.
    pub checkpoint: Option<PathBuf>,
}

/// Where and whether to checkpoint.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    pub path: Option<PathBuf>,
    /// Continue from `path` if it exists (its settings must match but for `steps`).
    pub resume: bool,
}

/// Runs the optimization (or continues it) and returns the gates.
pub fn train(
    model: &Model,
    config: &DuoConfig,
    checkpoint: &CheckpointOptions,
    mut on_step: impl FnMut(&StepReport),
) -> Result<HeadScores, Error> {
    let cfg = model.config();
    if config.samples == 0 || config.seq_len < 16 {
        return Err(Error::Usage(
            "duo needs at least 1 sample of at least 16 tokens".into(),
        ));
    }
    let usable = config.lr > 0.0 && config.lambda >= 0.0;
    if !usable {
        return Err(Error::Usage(format!(
            "lr {} must be positive and lambda {} non-negative",
            config.lr, config.lambda
        )));
    }
    let gated = GatedModel::new(model, config.sink, config.recent);
    let n = gated.gate_count();
    let mut state = match (&checkpoint.path, checkpoint.resume) {
        (Some(p), true) if p.exists() => {
            let c = Checkpoint::read(p)?;
            let same = DuoConfig {
                steps: config.steps,
                checkpoint_every: config.checkpoint_every,
                ..c.config.clone()
            } == *config;
            if !same || c.gates.len() != n {
                return Err(Error::Input {
                    path: p.clone(),
                    field: "config".into(),
                    message: format!(
                        "the checkpoint was made with other settings or another model: {:?}",
                        c.config
                    ),
                });
            }
            eprintln!("resuming from {} at step {}", p.display(), c.step);
            c
        }
        _ => Checkpoint {
            version: CHECKPOINT_VERSION,
            step: 0,
            config: config.clone(),
            gates: vec![1.0; n],
            pull: vec![0.0; n],
            adam: Adam::new(n),
            losses: Vec::new(),
        },
    };
    state.config.steps = config.steps;
    let samples = training_samples(model, config)?;
    let targets: Vec<Hidden> = samples
        .iter()
        .map(|s| model.forward_hidden(&s.tokens, &mut DenseAttention))
        .collect::<Result<_, _>>()?;
    // d reg / d gate: the same for every gate; the rest of the gradient is the distillation's.
    let reg_grad = config.lambda / n as f64;

    while state.step < config.steps {
        let start = Instant::now();
        let i = state.step % samples.len();
        let gates: Vec<f32> = state.gates.iter().map(|&g| g as f32).collect();
        let sample = &samples[i];
        let r = gated.step(
            &sample.tokens,
            &targets[i],
            sample.rows.clone(),
            &gates,
            config.lambda,
        )?;
        let grad: Vec<f64> = r.grad.iter().map(|&g| f64::from(g)).collect();
        for (p, g) in state.pull.iter_mut().zip(&grad) {
            *p = PULL_DECAY * *p + (1.0 - PULL_DECAY) * (reg_grad - g);
        }
        state.adam.step(&mut state.gates, &grad, config.lr);
        for g in &mut state.gates {
            *g = g.clamp(0.0, 1.0);
        }
        state.step += 1;
        state.losses.push(r.loss);
        let due = state.step % config.checkpoint_every.max(1) == 0 || state.step == config.steps;
        let written = match (&checkpoint.path, due) {
            (Some(p), true) => {
                state.write(p)?;
                Some(p.clone())
            }
            _ => None,
        };
        on_step(&StepReport {
            step: state.step,
            steps: config.steps,
            loss: r.loss,
            distill: r.distill,
            reg: r.reg,
            mean_gate: state.gates.iter().sum::<f64>() / n as f64,
            seconds: start.elapsed().as_secs_f64(),
            checkpoint: written,
        });
    }
    let per_layer = |v: &[f64]| -> Vec<Vec<f64>> {
        v.chunks(cfg.kv_heads.max(1)).map(|c| c.to_vec()).collect()
    };
    let kv = per_layer(&state.gates);
    let pull = per_layer(&state.pull);
    let mut settings =
        serde_json::to_value(&state.config).map_err(|e| Error::Usage(e.to_string()))?;
    if let Some(obj) = settings.as_object_mut() {
        obj.insert("steps_done".into(), state.step.into());
        obj.insert(
            "final_loss".into(),
            state.losses.last().copied().unwrap_or(f64::NAN).into(),
        );
    }
    Ok(HeadScores {
        version: HEAD_SCORES_VERSION,
        method: Method::Duo,
        model: model.path().display().to_string(),
        layers: cfg.layers,
        kv_heads: cfg.kv_heads,
        q_heads: cfg.q_heads,
        kv,
        query: None,
        pull: Some(pull),
        settings,
    })
}

/// One training input and the rows its loss compares.
struct TrainSample {
    tokens: Vec<u32>,
    rows: Range<usize>,
}

/// Synthetic tasks: `prompt + answer[..A-1]`, the loss on the `A` rows predicting the answer (or all
/// rows with [`LossRows::All`]); other data: the windows as loaded, every row.
fn training_samples(model: &Model, config: &DuoConfig) -> Result<Vec<TrainSample>, Error> {
    let source = DataSource::parse(&config.data)?;
    let every = |tokens: Vec<u32>| TrainSample {
        rows: 0..tokens.len(),
        tokens,
    };
    if let DataSource::Synthetic { task, .. } = source {
        let cases = super::eval::cases(
            model,
            task,
            config.chat,
            config.seq_len,
            config.samples,
            config.seed,
        )?;
        return Ok(cases
            .into_iter()
            .map(|c| match config.loss_rows {
                LossRows::Answer => TrainSample {
                    rows: c.answer_rows(),
                    tokens: c.tokens,
                },
                LossRows::All => every(c.tokens),
            })
            .collect());
    }
    let samples = load_samples(
        &source,
        model.tokenizer(),
        config.seq_len,
        config.samples,
        config.seed,
    )?;
    Ok(samples.into_iter().map(|s| every(s.tokens)).collect())
}
