//! `attnplan profile`: run a model on calibration data and write exact per-head attention statistics.

use std::path::PathBuf;

use anyhow::Context;
use profiler::profiling::{profile_samples, ProfileRun};
use profiler::stats::StatsConfig;

use super::common::{
    load_model, print_periods, tool_version, DataArgs, DynamicArgs, Periods, Progress,
};
use super::Outcome;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A .gguf file or a Hugging Face model directory [default: the cached SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Number of samples.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Output profile (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write a PNG heat map per head (block-pooled attention, log scale) into this directory.
    #[arg(long)]
    pub heatmaps: Option<PathBuf>,
    /// Kernel tile size (tokens) the statistics are taken at; the plan's defaults use the same.
    #[arg(long, default_value_t = 64)]
    pub block: usize,
    /// Last queries used for online estimation.
    #[arg(long, default_value_t = 64)]
    pub last_q: usize,
    /// Last query rows whose statistics are also kept apart, for `calibrate --tail-recall` (the
    /// rows that read a question and produce its answer); 0 keeps none.
    #[arg(long, default_value_t = profiler::stats::TAIL_Q)]
    pub tail_q: usize,
    #[command(flatten)]
    pub dynamic: DynamicArgs,
}

pub fn run(args: &Args) -> Outcome {
    if args.samples == 0 {
        return Err(anyhow::anyhow!("--samples must be at least 1").into());
    }
    let stats = StatsConfig {
        block_q: args.block,
        block_k: args.block,
        last_q: args.last_q,
        tail_q: args.tail_q,
    };
    check_stats_config(&stats)?;
    let model = load_model(args.model.as_deref())?;
    let samples = args.data.samples(&model, args.samples, args.data.seed)?;
    let run = ProfileRun {
        tool: tool_version(),
        data: args.data.data.clone(),
        stats,
        dynamic: args.dynamic.candidates(args.block),
        periods: args.dynamic.period_search(Periods::Off),
    };
    let progress = Progress::new("profiling", samples.len());
    let profile = profile_samples(&model, &samples, &run, |done| {
        progress.step(
            done.index + 1,
            done.total,
            &format!(
                "{:.1} s ({:.1} s statistics)",
                done.seconds, done.stats_seconds
            ),
        )
    })?;
    progress.finish();
    print_periods(&profile.meta);
    profile.write(&args.out)?;
    eprintln!(
        "wrote {} ({} samples x {} tokens, {} layers x {} heads)",
        args.out.display(),
        profile.meta.samples,
        profile.meta.seq_len,
        profile.meta.model.layers,
        profile.meta.model.query_heads
    );
    if let Some(dir) = &args.heatmaps {
        write_heatmaps(&profile, &args.out, dir)?;
    }
    Ok(())
}

/// The block sizes and estimate window must be ones a plan can carry (docs/plan-format.md §6).
pub fn check_stats_config(s: &StatsConfig) -> anyhow::Result<()> {
    let ok = |b: usize| b.is_power_of_two() && (16..=256).contains(&b);
    if !ok(s.block_q) || !ok(s.block_k) {
        anyhow::bail!("--block {} must be a power of two in [16, 256]", s.block_k);
    }
    if s.last_q == 0 {
        anyhow::bail!("--last-q must be at least 1");
    }
    Ok(())
}

fn write_heatmaps(
    profile: &profiler::profile::Profile,
    profile_path: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let m = &profile.meta.model;
    for l in 0..m.layers as usize {
        for h in 0..m.query_heads as usize {
            let stats = profile.head_stats(profile_path, l, h)?;
            let path = dir.join(format!("L{l:02}_H{h}.png"));
            profiler::heatmap::write_png(&path, &stats.heat_map())?;
        }
    }
    eprintln!(
        "wrote {} heat maps to {}",
        m.layers * m.query_heads,
        dir.display()
    );
    Ok(())
}
