//! `attnplan retrieval-heads`: identify retrieval heads (DuoAttention gates or Retrieval Head scores)
//! and write them as JSON; or, with `--evaluate`, measure retrieval accuracy with the lowest-ranked
//! KV heads streaming against dense and against random choices. Also the `--retrieval-heads` options
//! of `attnplan calibrate` ([`PlanArgs`], [`apply`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use profiler::data::{ChatTemplate, TaskKind};
use profiler::gated::StreamingHeads;
use profiler::model::{DenseAttention, Model};
use profiler::sparse::SparseAttention;
use runtime::PrefillOptions;
use serde::Serialize;

use crate::heads::duo::{self, CheckpointOptions, DuoConfig, LossRows};
use crate::heads::eval::{cases, run_case, Accuracy};
use crate::heads::score::{self, ScoreConfig};
use crate::heads::{
    apply_to_plan, overlap, random_streaming, HeadScores, Hybrid, HybridSummary, Method,
    DEFAULT_RECENT, DEFAULT_SINK,
};

use super::common::load_model;
use super::report_plan_error;
use super::Outcome;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A .gguf file or Hugging Face directory [default: the cached SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// duo: DuoAttention gate optimization; score: Retrieval Head copy-paste score.
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Output JSON [default: retrieval-heads-<method>.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Streaming sink tokens (duo training and --evaluate).
    #[arg(long, default_value_t = DEFAULT_SINK)]
    pub sink: usize,
    /// Streaming recent window in tokens, the query's own included (duo training and --evaluate).
    #[arg(long, default_value_t = DEFAULT_RECENT)]
    pub recent: usize,
    /// Tokens per sample [default: 1024 for duo, score and --evaluate].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Samples: duo's distinct training samples [default 10]; score's per task [default 10].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Seed of the synthetic samples [default: duo 1001, score 2001, --evaluate 1].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prompt template of the synthetic tasks (duo training, score, --evaluate).
    #[arg(long, value_enum, default_value_t = Chat::Chatml)]
    pub chat: Chat,

    /// duo: optimization steps (one sample each).
    #[arg(long, default_value_t = DuoConfig::default().steps)]
    pub steps: usize,
    /// duo: Adam learning rate on the gates.
    #[arg(long, default_value_t = DuoConfig::default().lr)]
    pub lr: f64,
    /// duo: weight of mean(gates) in the loss.
    #[arg(long, default_value_t = DuoConfig::default().lambda)]
    pub lambda: f64,
    /// duo: training data spec.
    #[arg(long, default_value = "synthetic:passkey")]
    pub data: String,
    /// duo: rows whose hidden states the loss compares (answer: those predicting a synthetic task's
    /// answer, as DuoAttention).
    #[arg(long, value_enum, default_value_t = LossRows::Answer)]
    pub loss_rows: LossRows,
    /// duo: checkpoint file [default: <out>.ckpt.json].
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// duo: write the checkpoint every N steps.
    #[arg(long, default_value_t = DuoConfig::default().checkpoint_every)]
    pub checkpoint_every: usize,
    /// duo: continue from the checkpoint if it exists.
    #[arg(long)]
    pub resume: bool,

    /// Instead of identifying: evaluate these head files (repeatable) on passkey and kv-retrieval.
    #[arg(long, value_name = "HEADS.json")]
    pub evaluate: Vec<PathBuf>,
    /// --evaluate: cases per task.
    #[arg(long, default_value_t = 50)]
    pub cases: usize,
    /// --evaluate: fractions of KV heads streaming, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75")]
    pub fractions: Vec<f64>,
    /// --evaluate: random choices (seeds 1..=N) at each of these fractions, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    pub random_fractions: Vec<f64>,
    /// --evaluate: number of random seeds.
    #[arg(long, default_value_t = 3)]
    pub random_seeds: u64,
    /// --evaluate: also evaluate these plans (repeatable; run through the sparse runtime on every row,
    /// answer rows included, as the streaming heads are), e.g. a hybrid plan and a pure one.
    #[arg(long, value_name = "PLAN")]
    pub plan: Vec<PathBuf>,
    /// --evaluate: write every number as JSON here.
    #[arg(long)]
    pub table: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Chat {
    Plain,
    Chatml,
}

impl From<Chat> for ChatTemplate {
    fn from(c: Chat) -> Self {
        match c {
            Chat::Plain => ChatTemplate::Plain,
            Chat::Chatml => ChatTemplate::ChatMl,
        }
    }
}

pub fn run(args: &Args) -> Outcome {
    let model = load_model(args.model.as_deref())?;
    if !args.evaluate.is_empty() {
        return evaluate(args, &model);
    }
    let method = args
        .method
        .context("--method duo|score is required (or --evaluate HEADS.json)")?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("retrieval-heads-{}.json", method.name())));
    let start = Instant::now();
    let scores = identify(args, method, &model, &out)?;
    scores.write(&out)?;
    eprint!("{}", summarize(&scores));
    eprintln!(
        "wrote {} ({} in {:.0} s)",
        out.display(),
        method.name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs one method with the arguments' settings.
fn identify(args: &Args, method: Method, model: &Model, out: &Path) -> anyhow::Result<HeadScores> {
    Ok(match method {
        Method::Duo => {
            let d = DuoConfig::default();
            let config = DuoConfig {
                sink: args.sink,
                recent: args.recent,
                seq_len: args.seq_len.unwrap_or(d.seq_len),
                samples: args.samples.unwrap_or(d.samples),
                steps: args.steps,
                lr: args.lr,
                lambda: args.lambda,
                seed: args.seed.unwrap_or(d.seed),
                data: args.data.clone(),
                chat: args.chat.into(),
                loss_rows: args.loss_rows,
                checkpoint_every: args.checkpoint_every,
            };
            let ckpt = args.checkpoint.clone().unwrap_or_else(|| {
                let mut p = out.as_os_str().to_owned();
                p.push(".ckpt.json");
                PathBuf::from(p)
            });
            eprintln!(
                "duo: {} steps, {} samples of {} tokens ({}, {}, loss on {:?} rows), sink {}, recent {}, lr {}, lambda {}",
                config.steps,
                config.samples,
                config.seq_len,
                config.data,
                config.chat,
                config.loss_rows,
                config.sink,
                config.recent,
                config.lr,
                config.lambda
            );
            let opts = CheckpointOptions {
                path: Some(ckpt),
                resume: args.resume,
            };
            duo::train(model, &config, &opts, |r| {
                let saved = r
                    .checkpoint
                    .as_ref()
                    .map(|p| format!("  checkpoint {}", p.display()))
                    .unwrap_or_default();
                eprintln!(
                    "step {:>4}/{}  loss {:.6}  (distill {:.6} + reg {:.5})  mean gate {:.3}  {:.1} s{saved}",
                    r.step, r.steps, r.loss, r.distill, r.reg, r.mean_gate, r.seconds
                );
            })?
        }
        Method::Score => {
            let d = ScoreConfig::default();
            let config = ScoreConfig {
                seq_len: args.seq_len.unwrap_or(d.seq_len),
                samples: args.samples.unwrap_or(d.samples),
                chat: args.chat.into(),
                seed: args.seed.unwrap_or(d.seed),
                ..d
            };
            let start = Instant::now();
            score::score(model, &config, |done, total| {
                eprintln!(
                    "score {done}/{total}  {:.0} s",
                    start.elapsed().as_secs_f64()
                );
            })?
        }
    })
}

/// The ranking in a few lines: top and bottom KV heads.
fn summarize(s: &HeadScores) -> String {
    let flat = s.flat();
    let mut order: Vec<usize> = (0..flat.len()).collect();
    order.sort_by(|&a, &b| flat[b].total_cmp(&flat[a]).then(a.cmp(&b)));
    let name = |i: usize| format!("L{}.kv{}={:.3}", i / s.kv_heads, i % s.kv_heads, flat[i]);
    let top: Vec<String> = order.iter().take(10).map(|&i| name(i)).collect();
    let bottom: Vec<String> = order.iter().rev().take(5).map(|&i| name(i)).collect();
    format!(
        "{}: mean {:.3}; highest {}; lowest {}\n",
        s.method.name(),
        flat.iter().sum::<f64>() / flat.len().max(1) as f64,
        top.join(" "),
        bottom.join(" ")
    )
}

/// One row of the accuracy table.
#[derive(Debug, Clone, Serialize)]
struct Row {
    config: String,
    /// Fraction of KV heads streaming (head choices) or 0 (plans).
    fraction: f64,
    task: String,
    accuracy: Accuracy,
    /// Fraction of dense causal attention cells computed over this task's cases.
    cells: f64,
}

/// One configuration to evaluate.
struct Choice {
    name: String,
    fraction: f64,
    attention: ChoiceAttention,
}

enum ChoiceAttention {
    /// These KV heads streaming, the rest dense; none: the dense model.
    Heads(Vec<bool>),
    /// A plan run by the sparse runtime.
    Plan(Box<SparseAttention>),
}

/// Cells that streaming attention with `sink` and `recent` computes for one query head over `t`
/// rows (causal): each row sees at most `sink + recent` keys.
fn streaming_cells(t: usize, sink: usize, recent: usize) -> u64 {
    let w = (sink + recent.max(1)) as u64;
    (1..=t as u64).map(|i| i.min(w)).sum()
}

fn evaluate(args: &Args, model: &Model) -> Outcome {
    let cfg = model.config();
    let n = cfg.layers * cfg.kv_heads;
    let files: Vec<HeadScores> = args
        .evaluate
        .iter()
        .map(|p| HeadScores::read(p))
        .collect::<Result<_, _>>()?;
    let mut choices = vec![Choice {
        name: "dense".into(),
        fraction: 0.0,
        attention: ChoiceAttention::Heads(vec![false; n]),
    }];
    let mut overlaps = String::new();
    for &f in &args.fractions {
        for s in &files {
            if s.layers * s.kv_heads != n {
                return Err(anyhow::anyhow!(
                    "{} heads in a head file; the model has {n} KV heads",
                    s.layers * s.kv_heads
                )
                .into());
            }
            choices.push(Choice {
                name: s.method.name().into(),
                fraction: f,
                attention: ChoiceAttention::Heads(s.streaming(f)),
            });
        }
        if let [a, b, ..] = files.as_slice() {
            let (sa, sb) = (a.streaming(f), b.streaming(f));
            let k = sa.iter().filter(|x| **x).count();
            let _ = writeln!(
                overlaps,
                "overlap at {f}: {} of {k} streaming KV heads shared by {} and {}",
                overlap(&sa, &sb),
                a.method.name(),
                b.method.name()
            );
        }
    }
    for &f in &args.random_fractions {
        for seed in 1..=args.random_seeds {
            choices.push(Choice {
                name: format!("random-{seed}"),
                fraction: f,
                attention: ChoiceAttention::Heads(random_streaming(n, f, seed)),
            });
        }
    }
    let info = model.spec().model_info();
    for path in &args.plan {
        let plan = schemas::Plan::read(path).map_err(report_plan_error)?;
        plan.check_model(path, &info).map_err(report_plan_error)?;
        let sparse = SparseAttention::from_plan(&plan, &info, PrefillOptions::default())?;
        let name = path
            .file_stem()
            .map_or_else(|| "plan".into(), |s| s.to_string_lossy().into_owned());
        choices.push(Choice {
            name,
            fraction: 0.0,
            attention: ChoiceAttention::Plan(Box::new(sparse)),
        });
    }
    let seq_len = args.seq_len.unwrap_or(1024);
    let seed = args.seed.unwrap_or(1);
    let mut rows = Vec::new();
    let start = Instant::now();
    for task in [TaskKind::Passkey, TaskKind::KvRetrieval] {
        let all = cases(model, task, args.chat.into(), seq_len, args.cases, seed)?;
        let mut acc = vec![Accuracy::default(); choices.len()];
        // (cells, dense cells) per choice over this task's cases.
        let mut cells = vec![(0u64, 0u64); choices.len()];
        for (i, case) in all.iter().enumerate() {
            // Causal cells of one query head: all of them, and those a streaming head computes.
            let t = case.tokens.len();
            let full = t as u64 * (t as u64 + 1) / 2;
            let window = streaming_cells(t, args.sink, args.recent);
            let group = (cfg.q_heads / cfg.kv_heads.max(1)) as u64;
            let dense = (cfg.q_heads * cfg.layers) as u64 * full;
            for ((c, a), cells) in choices.iter_mut().zip(acc.iter_mut()).zip(&mut cells) {
                let o = match &mut c.attention {
                    ChoiceAttention::Heads(streaming) if streaming.iter().any(|x| *x) => {
                        let k = streaming.iter().filter(|x| **x).count();
                        cells.0 += group * (k as u64 * window + (n - k) as u64 * full);
                        cells.1 += dense;
                        let mut attn = StreamingHeads {
                            streaming: streaming.clone(),
                            kv_heads: cfg.kv_heads,
                            sink: args.sink,
                            recent: args.recent,
                        };
                        run_case(model, case, &mut attn)?
                    }
                    ChoiceAttention::Heads(_) => {
                        cells.0 += dense;
                        cells.1 += dense;
                        run_case(model, case, &mut DenseAttention)?
                    }
                    ChoiceAttention::Plan(sparse) => {
                        let o = run_case(model, case, sparse.as_mut())?;
                        for (_, st) in sparse.take_stats() {
                            cells.0 += st.cells;
                            cells.1 += st.dense_cells;
                        }
                        o
                    }
                };
                a.add(case, &o);
            }
            eprintln!(
                "{task} {}/{}: dense {}/{}  {:.0} s",
                i + 1,
                all.len(),
                acc[0].exact,
                acc[0].cases,
                start.elapsed().as_secs_f64()
            );
        }
        for ((c, a), (done, dense)) in choices.iter().zip(acc).zip(cells) {
            rows.push(Row {
                config: c.name.clone(),
                fraction: c.fraction,
                task: task.name().into(),
                accuracy: a,
                cells: done as f64 / dense.max(1) as f64,
            });
        }
    }
    let mut text = format!(
        "{} tokens, sink {}, recent {}, {} cases per task (seed {seed}), {:.0} s\n{:<14} {:>9} {:<13} {:>7} {:>8} {:>7}\n",
        seq_len,
        args.sink,
        args.recent,
        args.cases,
        start.elapsed().as_secs_f64(),
        "config",
        "streaming",
        "task",
        "exact%",
        "tokens%",
        "cells"
    );
    for r in &rows {
        let _ = writeln!(
            text,
            "{:<14} {:>9.2} {:<13} {:>7.1} {:>8.1} {:>7.3}",
            r.config,
            r.fraction,
            r.task,
            r.accuracy.exact_pct(),
            r.accuracy.token_pct(),
            r.cells
        );
    }
    text.push_str(&overlaps);
    super::print(&text)?;
    if let Some(path) = &args.table {
        let json = serde_json::json!({
            "seq_len": seq_len, "sink": args.sink, "recent": args.recent, "cases": args.cases,
            "seed": seed, "rows": rows, "overlaps": overlaps,
        });
        schemas::io::write_atomic(
            path,
            (serde_json::to_string_pretty(&json).context("table")? + "\n").as_bytes(),
        )?;
    }
    Ok(())
}

/// The options `attnplan calibrate` takes to make a hybrid plan.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// Make the plan hybrid: `duo` or `score` identifies retrieval heads now (with the settings of
    /// `attnplan retrieval-heads`' defaults), or a file written by `attnplan retrieval-heads`.
    #[arg(long, value_name = "duo|score|FILE")]
    pub retrieval_heads: Option<String>,
    /// Fraction of KV heads (lowest gate or score) made streaming.
    #[arg(long, default_value_t = 0.5)]
    pub streaming_fraction: f64,
    /// Sink tokens of streaming heads.
    #[arg(long, default_value_t = DEFAULT_SINK as u64)]
    pub streaming_sink: u64,
    /// Recent window of streaming heads (tokens).
    #[arg(long, default_value_t = DEFAULT_RECENT as u64)]
    pub streaming_recent: u64,
}

/// Applies `--retrieval-heads` to a calibrated plan; `None` when not asked for.
pub fn apply(
    args: &PlanArgs,
    model: Option<&Path>,
    plan: &mut schemas::Plan,
) -> anyhow::Result<Option<HybridSummary>> {
    let Some(spec) = &args.retrieval_heads else {
        return Ok(None);
    };
    let method = match spec.as_str() {
        "duo" => Some(Method::Duo),
        "score" => Some(Method::Score),
        _ => None,
    };
    let scores = match method {
        None => HeadScores::read(Path::new(spec))?,
        Some(m) => {
            let model = load_model(model)?;
            let out = PathBuf::from(format!("retrieval-heads-{}.json", m.name()));
            let mut defaults = <IdentifyDefaults as clap::Parser>::parse_from(["attnplan"]).args;
            defaults.sink = args.streaming_sink as usize;
            defaults.recent = args.streaming_recent as usize;
            let scores = identify(&defaults, m, &model, &out)?;
            eprint!("{}", summarize(&scores));
            scores
        }
    };
    let summary = apply_to_plan(
        plan,
        &Hybrid {
            scores: &scores,
            streaming_fraction: args.streaming_fraction,
            sink: args.streaming_sink,
            recent: args.streaming_recent,
        },
    )?;
    Ok(Some(summary))
}

/// `attnplan retrieval-heads`' defaults, for identification run from `calibrate`.
#[derive(Debug, clap::Parser)]
struct IdentifyDefaults {
    #[command(flatten)]
    args: Args,
}
