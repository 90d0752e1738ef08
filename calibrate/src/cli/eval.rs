//! `attnplan eval`: dense against the plan's sparse prefill on the same inputs: perplexity, retrieval
//! accuracy, per-layer output error, per-head recall, computed FLOPs fraction, attention time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::eval::{eval_sample, DenseCache, EvalAttention, SampleEval};
use crate::gpu_eval::GpuAttention;
use profiler::model::DenseAttention;
use serde::Serialize;

use super::bench::{open_error, Device};
use super::common::{load_model, DataArgs, Progress};
use super::{report_plan_error, Outcome};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A .gguf file or Hugging Face directory [default: the cached SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The plan to evaluate.
    #[arg(long)]
    pub plan: PathBuf,
    /// Data (repeatable) [default: synthetic:passkey, synthetic:kv-retrieval, synthetic:needle].
    #[arg(long = "data")]
    pub data: Vec<String>,
    /// Field holding the text in JSONL files.
    #[arg(long, default_value = profiler::data::DEFAULT_JSONL_FIELD)]
    pub field: String,
    /// Tokens per sample (prompt; the answer follows it).
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Samples per data source.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Seed for synthetic data (use one the plan was not calibrated on).
    #[arg(long, default_value_t = 1001)]
    pub seed: u64,
    /// Synthetic tasks: needle depth in 0..=1 (repeat for several, used in turn by sample)
    /// [default: spread evenly over the samples].
    #[arg(long = "depth", value_name = "DEPTH")]
    pub depths: Vec<f64>,
    /// Samples per data source (the first ones) on which dense attention also runs beside the
    /// sparse one, for the output error and the attention times (each costs one more dense pass).
    #[arg(long, default_value_t = 1)]
    pub compare_samples: usize,
    /// Skip the per-head recall measurement on the first sample (two more passes per head).
    #[arg(long)]
    pub no_head_recall: bool,
    /// Run the answer tokens' own rows under the plan too, instead of densely as decoding over the
    /// prefill's KV cache computes them (stricter than any engine).
    #[arg(long)]
    pub sparse_answer_rows: bool,
    /// Keep each sample's dense result in this directory and reuse it when the same model sees the
    /// same tokens again (evaluating several plans on the same data runs dense once).
    #[arg(long, value_name = "DIR")]
    pub dense_cache: Option<PathBuf>,
    /// Where the plan's attention runs: cpu, or cuda (device 0; the rest of the model stays on the
    /// CPU). With cuda the CPU prefill also runs on the compared samples, and the report adds the
    /// GPU's output difference to it, the index lists where the two differ, the recall of the GPU's
    /// indexes and its device times. The GPU follows the plan's own dense threshold.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Two-sided 95% Clopper-Pearson interval of a proportion `k / n`.
fn clopper_pearson(k: usize, n: usize) -> (f64, f64) {
    use statrs::distribution::{Beta, ContinuousCDF};
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k as f64, n as f64);
    let lo = if k == 0.0 {
        0.0
    } else {
        Beta::new(k, n - k + 1.0).map_or(0.0, |b| b.inverse_cdf(0.025))
    };
    let hi = if k == n {
        1.0
    } else {
        Beta::new(k + 1.0, n - k).map_or(1.0, |b| b.inverse_cdf(0.975))
    };
    (lo, hi)
}

#[derive(Debug, Default, Serialize)]
struct Side {
    nll: f64,
    tokens: usize,
    perplexity: f64,
    /// data source → (correct, total)
    accuracy: BTreeMap<String, (usize, usize)>,
    /// data source → 95% Clopper-Pearson interval of `accuracy`.
    accuracy_ci95: BTreeMap<String, (f64, f64)>,
    mean_answer_logprob: Option<f64>,
    #[serde(skip)]
    logprobs: Vec<f64>,
}

impl Side {
    fn add(&mut self, source: &str, e: &SampleEval) {
        self.nll += e.nll;
        self.tokens += e.tokens;
        if let Some(ok) = e.correct {
            let a = self.accuracy.entry(source.to_string()).or_default();
            a.0 += usize::from(ok);
            a.1 += 1;
        }
        if let Some(lp) = e.answer_logprob {
            self.logprobs.push(lp);
        }
    }

    fn finish(&mut self) {
        self.perplexity = (self.nll / self.tokens.max(1) as f64).exp();
        self.accuracy_ci95 = self
            .accuracy
            .iter()
            .map(|(source, &(correct, total))| (source.clone(), clopper_pearson(correct, total)))
            .collect();
        if !self.logprobs.is_empty() {
            self.mean_answer_logprob =
                Some(self.logprobs.iter().sum::<f64>() / self.logprobs.len() as f64);
        }
    }
}

#[derive(Debug, Serialize)]
struct EvalReport {
    model: String,
    plan: String,
    seq_len: usize,
    samples_per_source: usize,
    /// How the answer tokens' own rows were attended: `dense` (as decoding over the prefill's KV
    /// cache) or `sparse` (under the plan, `--sparse-answer-rows`).
    answer_rows: &'static str,
    sources: Vec<String>,
    dense: Side,
    sparse: Side,
    perplexity_change: f64,
    /// Computed cells over dense causal cells in the sparse forwards.
    flops_fraction: f64,
    attention_seconds_dense: f64,
    attention_seconds_sparse: f64,
    attention_speedup: f64,
    index_seconds: f64,
    /// Per layer: `‖O_sparse − O_dense‖ / ‖O_dense‖` on the sparse run's inputs.
    layer_output_error: Vec<f64>,
    /// `[layer][head]` measured recall on the first sample.
    head_recall: Vec<Vec<f64>>,
    mean_head_recall: f64,
    min_head_recall: f64,
    /// The same with each head's index built from its KV group's first query head (sharing).
    shared_head_recall: Vec<Vec<f64>>,
    mean_shared_head_recall: f64,
    min_shared_head_recall: f64,
    /// Heads whose recall drops by more than 0.01 when the index is shared.
    heads_losing_over_001_shared: usize,
    /// Index building on the first sample: every head from its own Q, and the group owners only.
    index_seconds_own: f64,
    index_seconds_shared: f64,
    /// data source → cases where the sparse answer's correctness equals the dense one's.
    agreement: BTreeMap<String, (usize, usize)>,
    /// Samples per source that ran dense attention beside the sparse one.
    compared_samples_per_source: usize,
    heads_run_dense: u64,
    /// Samples whose dense result came from `--dense-cache` instead of a dense forward.
    dense_from_cache: usize,
    /// Where the plan's attention ran: `cpu` or `cuda`. With `cuda`, `flops_fraction`,
    /// `index_seconds` and `heads_run_dense` are the GPU's, the attention times and `head_recall`
    /// the CPU's (on the compared samples), and `gpu` holds the comparison.
    device: &'static str,
    gpu: Option<GpuReport>,
    /// Every sample's figures, in order.
    cases: Vec<Case>,
}

/// The plan on the GPU against the CPU prefill (`--device cuda`; see `calibrate::gpu_eval`).
#[derive(Debug, Serialize)]
struct GpuReport {
    device: String,
    dense_below: u64,
    /// Device time (CUDA events) over every sparse forward, seconds.
    index_seconds: f64,
    attention_seconds: f64,
    /// Per layer: `‖O_gpu − O_cpu‖ / ‖O_cpu‖` on the compared samples.
    layer_error_vs_cpu: Vec<f64>,
    mean_layer_error_vs_cpu: f64,
    worst_layer_error_vs_cpu: f64,
    /// (head, query block) lists of the compared samples, and those where the GPU's index differs
    /// from the CPU's built on the same bf16-rounded inputs.
    lists_compared: u64,
    lists_differing: u64,
    /// `[layer][head]` recall of the GPU's indexes on the first sample.
    head_recall: Vec<Vec<f64>>,
    mean_head_recall: f64,
    min_head_recall: f64,
}

/// One sample under both attentions.
#[derive(Debug, Serialize)]
struct Case {
    source: String,
    sample: String,
    dense: SampleEval,
    sparse: SampleEval,
}

pub fn run(args: &Args) -> Outcome {
    let plan = schemas::Plan::read(&args.plan).map_err(report_plan_error)?;
    let model = load_model(args.model.as_deref())?;
    let info = model.spec().model_info();
    plan.check_model(&args.plan, &info)
        .map_err(report_plan_error)?;
    if args.samples == 0 {
        return Err(anyhow::anyhow!("--samples must be at least 1").into());
    }
    let sources = if args.data.is_empty() {
        vec![
            "synthetic:passkey".to_string(),
            "synthetic:kv-retrieval".into(),
            "synthetic:needle".into(),
        ]
    } else {
        args.data.clone()
    };
    let mut all = Vec::new();
    for source in &sources {
        let da = DataArgs {
            data: source.clone(),
            field: args.field.clone(),
            seq_len: args.seq_len,
            seed: args.seed,
            allow_long: false,
            depths: args.depths.clone(),
        };
        for s in da.samples(&model, args.samples, args.seed)? {
            let answer = s.task.as_ref().map_or(0, |t| t.answer_tokens.len());
            if args.seq_len + answer > model.config().max_context {
                return Err(anyhow::anyhow!(
                    "--seq-len {} plus the {answer}-token answer exceeds the model's context of {}",
                    args.seq_len,
                    model.config().max_context
                )
                .into());
            }
            all.push((source.clone(), s));
        }
    }
    let cache = match &args.dense_cache {
        Some(dir) => Some(DenseCache::new(dir, &info.fingerprint)?),
        None => None,
    };
    let mut dense_from_cache = 0;
    let mut cases = Vec::with_capacity(all.len());
    let mut sparse_attn = EvalAttention::new(&plan, &info)?;
    if args.device == Device::Cuda {
        let gpu = GpuAttention::new(&plan, &info).map_err(open_error)?;
        eprintln!("eval: plan's attention on {}", gpu.device);
        sparse_attn = sparse_attn.with_gpu(gpu);
    }
    let (mut dense, mut sparse) = (Side::default(), Side::default());
    let progress = Progress::new("evaluating", all.len());
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut agreement: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (i, (source, sample)) in all.iter().enumerate() {
        let cached = match &cache {
            Some(c) => c.get(sample)?,
            None => None,
        };
        let d = match cached {
            Some(d) => {
                dense_from_cache += 1;
                d
            }
            None => {
                let d = eval_sample(&model, sample, &mut DenseAttention)?;
                if let Some(c) = &cache {
                    c.put(sample, &d)?;
                }
                d
            }
        };
        let k = seen.entry(source.clone()).or_default();
        sparse_attn.compare_dense = *k < args.compare_samples;
        *k += 1;
        sparse_attn.measure_recall = i == 0 && !args.no_head_recall;
        sparse_attn.decode_rows = match (&sample.task, args.sparse_answer_rows) {
            (Some(t), false) => t.answer_tokens.len(),
            _ => 0,
        };
        let s = eval_sample(&model, sample, &mut sparse_attn)?;
        dense.add(source, &d);
        sparse.add(source, &s);
        if let (Some(a), Some(b)) = (d.correct, s.correct) {
            let e = agreement.entry(source.clone()).or_default();
            e.0 += usize::from(a == b);
            e.1 += 1;
        }
        progress.step(
            i + 1,
            all.len(),
            &format!("{source}: dense {:?}, sparse {:?}", d.correct, s.correct),
        );
        cases.push(Case {
            source: source.clone(),
            sample: sample.id.clone(),
            dense: d,
            sparse: s,
        });
    }
    progress.finish();
    dense.finish();
    sparse.finish();
    let totals = sparse_attn.prefill().totals().clone();
    let gpu = sparse_attn.gpu.as_ref().map(gpu_report);
    let (flops_fraction, index_seconds, heads_run_dense) = match &sparse_attn.gpu {
        Some(g) => (
            g.cells as f64 / g.dense_cells.max(1) as f64,
            g.index_ms / 1e3,
            g.dense_heads,
        ),
        None => (
            totals.density(),
            totals.index_time.as_secs_f64(),
            totals.dense_short + totals.dense_planned + totals.dense_mismatch,
        ),
    };
    let recall: Vec<f64> = sparse_attn.recall.iter().flatten().copied().collect();
    let shared: Vec<f64> = sparse_attn
        .shared_recall
        .iter()
        .flatten()
        .copied()
        .collect();
    let (mean_head_recall, min_head_recall) = mean_min(&recall);
    let (mean_shared_head_recall, min_shared_head_recall) = mean_min(&shared);
    let report = EvalReport {
        model: model.path().display().to_string(),
        plan: args.plan.display().to_string(),
        seq_len: args.seq_len,
        samples_per_source: args.samples,
        answer_rows: if args.sparse_answer_rows {
            "sparse"
        } else {
            "dense"
        },
        sources,
        perplexity_change: sparse.perplexity / dense.perplexity - 1.0,
        flops_fraction,
        attention_seconds_dense: sparse_attn.dense_seconds,
        attention_seconds_sparse: sparse_attn.sparse_seconds,
        attention_speedup: sparse_attn.dense_seconds / sparse_attn.sparse_seconds.max(1e-12),
        index_seconds,
        layer_output_error: relative_errors(&sparse_attn.err),
        mean_head_recall,
        min_head_recall,
        head_recall: sparse_attn.recall.clone(),
        mean_shared_head_recall,
        min_shared_head_recall,
        heads_losing_over_001_shared: recall
            .iter()
            .zip(&shared)
            .filter(|(r, s)| *r - *s > 0.01)
            .count(),
        shared_head_recall: sparse_attn.shared_recall.clone(),
        index_seconds_own: sparse_attn.index_seconds_own,
        index_seconds_shared: sparse_attn.index_seconds_shared,
        agreement,
        compared_samples_per_source: args.compare_samples.min(args.samples),
        heads_run_dense,
        device: if gpu.is_some() { "cuda" } else { "cpu" },
        gpu,
        dense_from_cache,
        cases,
        dense,
        sparse,
    };
    let text = if args.json {
        serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)? + "\n"
    } else {
        render(&report)
    };
    super::print(&text)?;
    Ok(())
}

/// Mean and minimum of `v` (NaN and infinity for no values; a NaN entry, e.g. a recall not
/// measured, makes the mean NaN).
fn mean_min(v: &[f64]) -> (f64, f64) {
    (
        v.iter().sum::<f64>() / v.len().max(1) as f64,
        v.iter().copied().fold(f64::INFINITY, f64::min),
    )
}

/// Per layer `‖a − b‖ / ‖b‖` from the summed squares `(‖a − b‖², ‖b‖²)` (0 where nothing was summed).
fn relative_errors(sums: &[(f64, f64)]) -> Vec<f64> {
    sums.iter()
        .map(|(d, n)| if *n > 0.0 { (d / n).sqrt() } else { 0.0 })
        .collect()
}

fn gpu_report(g: &GpuAttention) -> GpuReport {
    let err = relative_errors(&g.err_vs_cpu);
    let recall: Vec<f64> = g.recall.iter().flatten().copied().collect();
    let (mean_head_recall, min_head_recall) = mean_min(&recall);
    GpuReport {
        device: g.device.clone(),
        dense_below: g.dense_below(),
        index_seconds: g.index_ms / 1e3,
        attention_seconds: g.attention_ms / 1e3,
        mean_layer_error_vs_cpu: err.iter().sum::<f64>() / err.len().max(1) as f64,
        worst_layer_error_vs_cpu: err.iter().copied().fold(0.0, f64::max),
        layer_error_vs_cpu: err,
        lists_compared: g.lists_compared,
        lists_differing: g.lists_differing,
        head_recall: g.recall.clone(),
        mean_head_recall,
        min_head_recall,
    }
}

fn render(r: &EvalReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} on {} at {} tokens, {} samples per source",
        r.plan, r.model, r.seq_len, r.samples_per_source
    );
    let _ = writeln!(
        out,
        "  prompt under the plan; answer tokens' own rows {}",
        if r.answer_rows == "dense" {
            "dense (as decoding over the prefill's KV cache)"
        } else {
            "under the plan too (--sparse-answer-rows)"
        }
    );
    let _ = writeln!(out, "  {:<28} {:>12} {:>12}", "", "dense", "sparse");
    let _ = writeln!(
        out,
        "  {:<28} {:>12.4} {:>12.4}  ({:+.2}%)",
        "perplexity (prompt tokens)",
        r.dense.perplexity,
        r.sparse.perplexity,
        100.0 * r.perplexity_change
    );
    for (source, (ok, n)) in &r.dense.accuracy {
        let (sok, sn) = r.sparse.accuracy.get(source).copied().unwrap_or((0, 0));
        let (agree, cases) = r.agreement.get(source).copied().unwrap_or((0, 0));
        let ci = |side: &Side| {
            side.accuracy_ci95
                .get(source)
                .map_or(String::new(), |(lo, hi)| {
                    format!("[{:.0}-{:.0}%]", 100.0 * lo, 100.0 * hi)
                })
        };
        let _ = writeln!(
            out,
            "  {:<28} {:>12} {:>12}  (95% CI dense {}, sparse {}; same outcome {agree}/{cases})",
            format!("{source} accuracy"),
            format!("{ok}/{n}"),
            format!("{sok}/{sn}"),
            ci(&r.dense),
            ci(&r.sparse)
        );
    }
    if let (Some(d), Some(s)) = (r.dense.mean_answer_logprob, r.sparse.mean_answer_logprob) {
        let _ = writeln!(
            out,
            "  {:<28} {:>12.4} {:>12.4}",
            "answer log-prob (mean)", d, s
        );
    }
    let _ = writeln!(
        out,
        "  {:<28} {:>12.4} {:>12.4}",
        "attention FLOPs fraction", 1.0, r.flops_fraction
    );
    if r.compared_samples_per_source == 0 {
        let _ = writeln!(
            out,
            "  attention time, layer output error: not measured (--compare-samples 0); index \
             building {:.3} s",
            r.index_seconds
        );
    } else {
        // with --device cuda both times are the CPU's, and the GPU's index time has its own line
        let index = match r.gpu {
            Some(_) => "CPU prefill beside the GPU".to_string(),
            None => format!("index building {:.3} s", r.index_seconds),
        };
        let _ = writeln!(
            out,
            "  {:<28} {:>12.3} {:>12.3}  ({:.2}x; {index})",
            "attention time (s)",
            r.attention_seconds_dense,
            r.attention_seconds_sparse,
            r.attention_speedup,
        );
        let (worst_layer, worst) =
            r.layer_output_error
                .iter()
                .enumerate()
                .fold(
                    (0, 0.0f64),
                    |acc, (l, &e)| if e > acc.1 { (l, e) } else { acc },
                );
        let mean_err =
            r.layer_output_error.iter().sum::<f64>() / r.layer_output_error.len().max(1) as f64;
        let _ = writeln!(
            out,
            "  layer output error           mean {mean_err:.4}, worst {worst:.4} (layer \
             {worst_layer})"
        );
        let _ = writeln!(
            out,
            "  (output error and attention times from the first {} sample(s) of each source)",
            r.compared_samples_per_source
        );
    }
    if r.head_recall.iter().flatten().all(|x| x.is_nan()) {
        let _ = writeln!(out, "  head recall: not measured (--no-head-recall)");
    } else {
        let _ = writeln!(
            out,
            "  head recall (first sample)   mean {:.4}, min {:.4}",
            r.mean_head_recall, r.min_head_recall
        );
        let _ = writeln!(
            out,
            "  same, index per KV group     mean {:.4}, min {:.4}; {} heads lose > 0.01; index \
             building {:.3} s -> {:.3} s",
            r.mean_shared_head_recall,
            r.min_shared_head_recall,
            r.heads_losing_over_001_shared,
            r.index_seconds_own,
            r.index_seconds_shared
        );
    }
    if let Some(g) = &r.gpu {
        let _ = writeln!(
            out,
            "  plan's attention on {} (dense below {} tokens, as the plan says); rest on the CPU",
            g.device, g.dense_below
        );
        let _ = writeln!(
            out,
            "  GPU device time              index {:.1} ms, attention {:.1} ms (all sparse \
             forwards; the attention times above are the CPU's)",
            1e3 * g.index_seconds,
            1e3 * g.attention_seconds
        );
        if g.lists_compared > 0 || g.worst_layer_error_vs_cpu > 0.0 {
            let _ = writeln!(
                out,
                "  GPU against the CPU prefill  output error mean {:.4}, worst {:.4}; index lists \
                 differing on the same bf16 inputs {} of {}",
                g.mean_layer_error_vs_cpu,
                g.worst_layer_error_vs_cpu,
                g.lists_differing,
                g.lists_compared
            );
        }
        if g.min_head_recall.is_finite() {
            let _ = writeln!(
                out,
                "  head recall, GPU's indexes   mean {:.4}, min {:.4}",
                g.mean_head_recall, g.min_head_recall
            );
        }
    }
    if r.dense_from_cache > 0 {
        let _ = writeln!(
            out,
            "  ({} of {} dense results from the dense cache)",
            r.dense_from_cache,
            r.cases.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::clopper_pearson;

    /// Closed forms at the ends (`1 - 0.025^(1/n)`) and the symmetric middle, to 1e-6.
    #[test]
    fn clopper_pearson_matches_closed_forms() {
        let edge = 1.0 - 0.025f64.powf(1.0 / 50.0);
        let (lo, hi) = clopper_pearson(0, 50);
        assert_eq!(lo, 0.0);
        assert!((hi - edge).abs() < 1e-6, "{hi} vs {edge}");
        let (lo, hi) = clopper_pearson(50, 50);
        assert!((lo - (1.0 - edge)).abs() < 1e-6, "{lo}");
        assert_eq!(hi, 1.0);
        let (lo, hi) = clopper_pearson(25, 50);
        assert!(
            (lo + hi - 1.0).abs() < 1e-6 && lo > 0.35 && lo < 0.36,
            "{lo} {hi}"
        );
        assert_eq!(clopper_pearson(0, 0), (0.0, 1.0));
    }
}
