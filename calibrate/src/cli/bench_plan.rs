//! `attnplan bench --device cuda --plan FILE`: how fast a plan runs on the GPU against dense attention,
//! per length. Every layer of the plan goes through the runtime's `PlanPrefill` on structured inputs of
//! the plan's layer shape (`runtime::exec::cuda::plan_bench::time_plan`: a timing, not a model run;
//! `attnplan eval --device cuda` runs the model), then whole passes of the plan and of dense
//! attention are timed as an engine runs them (every layer queued, one synchronize). The table goes
//! to stdout, progress to stderr, `--json FILE` writes every figure (atomically, after each length).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use runtime::exec::cuda::plan_bench::{time_plan, PlanTiming};
use runtime::exec::cuda::SparsePrefill;
use runtime::PrefillOptions;
use serde::Serialize;

use super::bench::{open_error, Args};
use super::common::tool_version;
use super::{report_plan_error, Outcome};

/// One length of the JSON.
#[derive(Debug, Serialize)]
struct Row {
    n: usize,
    dense_below: u64,
    layers: usize,
    /// Layers that ran dense without building an index (below the threshold).
    dense_layers: usize,
    /// Layers that built their index, then ran dense attention, predicted faster.
    dense_after_index: usize,
    index_ms: f32,
    attention_ms: f32,
    dense_layer_ms: f32,
    plan_pass_ms: f32,
    dense_pass_ms: f32,
    speedup: f64,
    /// Heads over all layers by where their index came from.
    heads: Heads,
    /// Per layer: index and attention ms (medians), index entries, and why it ran dense.
    per_layer: Vec<Layer>,
}

#[derive(Debug, Serialize)]
struct Heads {
    gpu_vertical_slash: usize,
    gpu_block_sparse: usize,
    gpu_token_select: usize,
    gpu_query_adaptive: usize,
    host_static: usize,
}

#[derive(Debug, Serialize)]
struct Layer {
    index_ms: f32,
    attention_ms: f32,
    entries: (usize, usize),
    dense: Option<String>,
    dense_after_index: bool,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    tool: String,
    plan: &'a Path,
    model: Option<&'a str>,
    device: &'a str,
    reps: usize,
    rows: &'a [Row],
}

fn row(t: &PlanTiming) -> Row {
    let [vs, bs, ts, qa, host] = t.heads;
    Row {
        n: t.seq_len,
        dense_below: t.dense_below,
        layers: t.layers.len(),
        dense_layers: t.dense_layers(),
        dense_after_index: t.dense_faster_layers(),
        index_ms: t.index_ms(),
        attention_ms: t.attention_ms(),
        dense_layer_ms: t.dense_layer_ms,
        plan_pass_ms: t.plan_pass_ms,
        dense_pass_ms: t.dense_pass_ms,
        speedup: t.speedup(),
        heads: Heads {
            gpu_vertical_slash: vs,
            gpu_block_sparse: bs,
            gpu_token_select: ts,
            gpu_query_adaptive: qa,
            host_static: host,
        },
        per_layer: t
            .layers
            .iter()
            .map(|l| Layer {
                index_ms: l.index_ms,
                attention_ms: l.attention_ms,
                entries: l.entries,
                dense: l.dense.map(|r| format!("{r:?}")),
                dense_after_index: l.dense_faster,
            })
            .collect(),
    }
}

/// Runs the plan benchmark for `args` on the plan at `path`.
pub fn run(args: &Args, path: &Path) -> Outcome {
    let plan = schemas::Plan::read(path).map_err(report_plan_error)?;
    let sp = SparsePrefill::new(0).map_err(open_error)?;
    let device = sp.device().describe()?;
    eprintln!("bench: {device}; plan {}", path.display());
    let options = PrefillOptions {
        dense_below: args.dense_below,
        ..PrefillOptions::default()
    };
    let mut rows = Vec::new();
    for &n in &args.lengths {
        let t = time_plan(&sp, &plan, n, args.reps, options)
            .with_context(|| format!("{} at {n} tokens", path.display()))?;
        eprintln!(
            "bench: plan at {n}: pass {:.3} ms, dense pass {:.3} ms ({:.2}x)",
            t.plan_pass_ms,
            t.dense_pass_ms,
            t.speedup()
        );
        rows.push(row(&t));
        if let Some(json) = &args.json {
            let report = Report {
                tool: tool_version(),
                plan: path,
                model: plan.model.name.as_deref(),
                device: &device,
                reps: args.reps,
                rows: &rows,
            };
            let text = serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)? + "\n";
            schemas::io::write_atomic(json, text.as_bytes())?;
        }
    }
    if let Some(json) = &args.json {
        eprintln!("bench: wrote {}", json.display());
    }
    super::print(&format_table(path, &plan, &device, args.reps, &rows))?;
    Ok(())
}

fn format_table(
    path: &Path,
    plan: &schemas::Plan,
    device: &str,
    reps: usize,
    rows: &[Row],
) -> String {
    let m = &plan.model;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Plan {} ({}{} layers of {} query heads over {} KV heads, head_dim {}) on {device}; \
         structured inputs of that shape.\nPer layer: CUDA-event medians of {reps} forwards, summed \
         over the layers. Dense layers: below the threshold; after index: built their index, then \
         ran dense attention, predicted faster. Pass: every layer queued back to back, one \
         synchronize, host wall time, median of {reps}. Times in ms.",
        path.display(),
        m.name.as_deref().map_or(String::new(), |n| format!("{n}, ")),
        m.layers,
        m.query_heads,
        m.kv_heads,
        m.head_dim
    );
    let _ = writeln!(
        t,
        "{:>8} {:>11} {:>12} {:>11} {:>9} {:>10} {:>7} {:>10} {:>11} {:>8}",
        "n",
        "dense below",
        "dense layers",
        "after index",
        "index",
        "attention",
        "index%",
        "plan pass",
        "dense pass",
        "speedup"
    );
    for r in rows {
        let total = r.index_ms + r.attention_ms;
        let _ = writeln!(
            t,
            "{:>8} {:>11} {:>12} {:>11} {:>9.3} {:>10.3} {:>6.1}% {:>10.3} {:>11.3} {:>7.2}x",
            r.n,
            r.dense_below,
            format!("{}/{}", r.dense_layers, r.layers),
            r.dense_after_index,
            r.index_ms,
            r.attention_ms,
            100.0 * r.index_ms / total.max(f32::MIN_POSITIVE),
            r.plan_pass_ms,
            r.dense_pass_ms,
            r.speedup
        );
    }
    t
}
