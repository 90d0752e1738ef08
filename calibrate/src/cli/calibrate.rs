//! `attnplan calibrate`: search the best pattern and budget per head from profiles (or profile first),
//! validate on held-out samples, and write the plan and a report.
//!
//! Two forms:
//! - from profiles: `--profile P [--profile P2 ...] [--heldout H ...]` (one profile per length);
//! - one shot: `[--model M] [--data D] [--seq-len N ...] [--samples K] [--heldout-samples H]`, which
//!   profiles calibration and held-out samples first. With no arguments at all it calibrates the cached
//!   SmolLM2 on synthetic passkey data: the README's main job.

use std::path::PathBuf;

use crate::calibration::{calibrate, fall_back_to_dense, ProfileFile};
use crate::search::{Goal, Objective};
use crate::{emit, report};
use anyhow::Context;
use profiler::profiling::{profile_samples, ProfileRun};
use profiler::stats::StatsConfig;

use super::common::{load_model, print_periods, tool_version, DynamicArgs, Periods, Progress};
use super::{Failure, Outcome};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Calibration profile (repeat for several sequence lengths). Excludes the one-shot options.
    #[arg(long = "profile", value_name = "PROFILE")]
    pub profiles: Vec<PathBuf>,
    /// Held-out profile of the same lengths, with other samples (repeatable).
    #[arg(long = "heldout", value_name = "PROFILE")]
    pub heldout: Vec<PathBuf>,

    /// One shot: a .gguf file or Hugging Face directory [default: the cached SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// One shot: calibration data (text file, JSONL file, synthetic:passkey, synthetic:kv-retrieval,
    /// synthetic:needle); repeat to mix sources [default: the three synthetic tasks].
    #[arg(long = "data")]
    pub data: Vec<String>,
    /// One shot: field holding the text in JSONL files.
    #[arg(long, default_value = profiler::data::DEFAULT_JSONL_FIELD)]
    pub field: String,
    /// One shot: tokens per sample; repeat to calibrate several lengths [default: 4096].
    #[arg(long = "seq-len")]
    pub seq_lens: Vec<usize>,
    /// One shot: calibration samples per length and data source.
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// One shot: held-out samples per length and data source (0 skips validation).
    #[arg(long, default_value_t = 1)]
    pub heldout_samples: usize,
    /// One shot: seed for synthetic data (held-out samples use a different one).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// One shot: save the profiles made into this directory.
    #[arg(long)]
    pub save_profiles: Option<PathBuf>,
    #[command(flatten)]
    pub dynamic: DynamicArgs,

    /// Attention recall each head must keep, in (0, 1]. The default, with the worst-sample objective
    /// and the default local floor, kept SmolLM2's perplexity within 1% at 8K at about a third of
    /// the attention cells (docs/perf.md).
    #[arg(long, default_value_t = 0.965)]
    pub target_recall: f64,
    /// Also hold the recall of each head's last rows (the profile's tail: where a prompt's question
    /// is read and its answer produced) to this target, in (0, 1], with the same objective.
    #[arg(long)]
    pub tail_recall: Option<f64>,
    /// Instead of a target: a budget for the whole plan, the mean fraction of dense attention cells
    /// over heads, in (0, 1]; the plan is that of the highest common target within it.
    #[arg(long)]
    pub flops_budget: Option<f64>,
    /// Which recall must reach the target: over all samples, or of the worst sample.
    #[arg(long, value_enum, default_value_t = Objective::Worst)]
    pub objective: Objective,
    /// No head computes fewer cells than an A-shape of 64 sink and this many local tokens (at each
    /// calibrated length); 0 turns the floor off. Patterns cheaper than that can keep 98-99% of a
    /// head's attention yet drop what the model needs: on SmolLM2 at 8K such heads caused most of
    /// the perplexity loss on prose (docs/perf.md).
    #[arg(long, value_name = "TOKENS", default_value_t = crate::search::DEFAULT_LOCAL_FLOOR)]
    pub local_floor: usize,
    /// Held-out recall may miss the target by this much before the plan is refused.
    #[arg(long, default_value_t = 0.02)]
    pub tolerance: f64,
    /// Refuse the plan when heads miss the target on held-out data (by default those heads run dense,
    /// so the written plan meets the target on held-out data for every head).
    #[arg(long)]
    pub no_dense_fallback: bool,
    /// Write the plan even if heads miss the target on held-out data (with --no-dense-fallback).
    #[arg(long)]
    pub force: bool,
    /// Output plan.
    #[arg(long, default_value = "plan.yaml")]
    pub out: PathBuf,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub retrieval: super::retrieval_heads::PlanArgs,
}

fn check(args: &Args) -> anyhow::Result<Goal> {
    let unit = |x: f64| x > 0.0 && x <= 1.0;
    if !unit(args.target_recall) {
        anyhow::bail!("--target-recall {} is outside (0, 1]", args.target_recall);
    }
    if let Some(f) = args.flops_budget {
        if !unit(f) {
            anyhow::bail!("--flops-budget {f} is outside (0, 1]");
        }
        if args.tail_recall.is_some() {
            anyhow::bail!(
                "--tail-recall is a target like --target-recall: it does not combine with \
                 --flops-budget"
            );
        }
    }
    if let Some(t) = args.tail_recall {
        if !unit(t) {
            anyhow::bail!("--tail-recall {t} is outside (0, 1]");
        }
    }
    if !(0.0..1.0).contains(&args.tolerance) {
        anyhow::bail!("--tolerance {} is outside [0, 1)", args.tolerance);
    }
    let one_shot = args.model.is_some()
        || !args.data.is_empty()
        || !args.seq_lens.is_empty()
        || args.save_profiles.is_some()
        || args.dynamic.no_dynamic
        || !args.dynamic.grid.is_empty()
        || args.dynamic.periods.is_some();
    if !args.profiles.is_empty() && one_shot {
        anyhow::bail!(
            "--profile calibrates from existing profiles: it does not combine with --model, --data, \
             --seq-len, --save-profiles, --no-dynamic, --grid or --periods (profile with them instead)"
        );
    }
    if args.profiles.is_empty() && !args.heldout.is_empty() {
        anyhow::bail!(
            "--heldout needs --profile (the one-shot form makes its own held-out samples)"
        );
    }
    if args.samples == 0 {
        anyhow::bail!("--samples must be at least 1");
    }
    Ok(Goal {
        target_recall: args.target_recall,
        tail_recall: args.tail_recall,
        flops_budget: args.flops_budget,
        objective: args.objective,
        local_floor: (args.local_floor > 0).then_some(args.local_floor),
    })
}

/// The default one-shot data: the three synthetic retrieval tasks, so that no single task's filler
/// shapes the plan (calibrating on passkey alone generalized to key-value retrieval for only ~75% of
/// heads at 8K; docs/perf.md).
pub const DEFAULT_DATA: [&str; 3] = [
    "synthetic:passkey",
    "synthetic:kv-retrieval",
    "synthetic:needle",
];

/// Calibration and held-out samples of one source at one length: other windows of a file, or
/// another seed for synthetic tasks.
fn split_samples(
    args: &Args,
    model: &profiler::model::Model,
    da: &super::common::DataArgs,
) -> anyhow::Result<(Vec<profiler::data::Sample>, Vec<profiler::data::Sample>)> {
    let per_len = args.samples + args.heldout_samples;
    if da.source()?.path().is_some() {
        let mut all = da.samples(model, per_len, args.seed)?;
        if all.len() < per_len {
            anyhow::bail!(
                "{} holds {} samples of {} tokens; {} calibration + {} held-out were asked for",
                da.data,
                all.len(),
                da.seq_len,
                args.samples,
                args.heldout_samples
            );
        }
        let held = all.split_off(args.samples);
        Ok((all, held))
    } else {
        let cal = da.samples(model, args.samples, args.seed)?;
        let held = if args.heldout_samples > 0 {
            da.samples(
                model,
                args.heldout_samples,
                args.seed.wrapping_add(0x9e37_79b9),
            )?
        } else {
            Vec::new()
        };
        Ok((cal, held))
    }
}

/// Profiles calibration and held-out samples at each length (all sources together), in memory.
fn one_shot(args: &Args) -> anyhow::Result<(Vec<ProfileFile>, Vec<ProfileFile>)> {
    let model = load_model(args.model.as_deref())?;
    let sources: Vec<String> = if args.data.is_empty() {
        DEFAULT_DATA.iter().map(|s| s.to_string()).collect()
    } else {
        args.data.clone()
    };
    let seq_lens = if args.seq_lens.is_empty() {
        vec![4096]
    } else {
        args.seq_lens.clone()
    };
    let stats = StatsConfig::default();
    let mut run = ProfileRun {
        tool: tool_version(),
        data: sources.join(" + "),
        stats,
        dynamic: args.dynamic.candidates(stats.block_k),
        // Searched once, on the first calibration sample; every later profile (held-out, other
        // lengths) scores the candidate list that search settled.
        periods: args.dynamic.period_search(if args.dynamic.no_dynamic {
            Periods::Off
        } else {
            Periods::Find
        }),
    };
    let (mut calib, mut heldout) = (Vec::new(), Vec::new());
    let total = (args.samples + args.heldout_samples) * sources.len() * seq_lens.len();
    let progress = Progress::new("profiling", total);
    let mut done = 0usize;
    let mut searched = None;
    for &n in &seq_lens {
        let (mut cal_samples, mut held_samples) = (Vec::new(), Vec::new());
        for source in &sources {
            let da = super::common::DataArgs {
                data: source.clone(),
                field: args.field.clone(),
                seq_len: n,
                seed: args.seed,
                allow_long: false,
                depths: Vec::new(),
            };
            let (c, h) = split_samples(args, &model, &da)?;
            cal_samples.extend(c);
            held_samples.extend(h);
        }
        for (kind, samples, into) in [
            ("calib", &cal_samples, &mut calib),
            ("heldout", &held_samples, &mut heldout),
        ] {
            if samples.is_empty() {
                continue;
            }
            let profile = profile_samples(&model, samples, &run, |s| {
                done += 1;
                progress.step(done, total, &format!("{n} tokens, {:.1} s", s.seconds));
            })?;
            if run.periods.take().is_some() {
                searched = Some(profile.meta.clone());
                run.dynamic.clone_from(&profile.meta.dynamic);
            }
            let name = format!("{kind}-{n}.safetensors");
            let path = match &args.save_profiles {
                Some(dir) => {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("{}: cannot create", dir.display()))?;
                    let p = dir.join(name);
                    profile.write(&p)?;
                    p
                }
                None => PathBuf::from(format!("(in memory) {name}")),
            };
            into.push(ProfileFile { path, profile });
        }
    }
    progress.finish();
    if let Some(meta) = &searched {
        print_periods(meta);
    }
    Ok((calib, heldout))
}

pub fn run(args: &Args) -> Outcome {
    let goal = check(args)?;
    let (calib, heldout) = if args.profiles.is_empty() {
        one_shot(args)?
    } else {
        let read = |paths: &[PathBuf]| -> anyhow::Result<Vec<ProfileFile>> {
            paths.iter().map(|p| Ok(ProfileFile::read(p)?)).collect()
        };
        (read(&args.profiles)?, read(&args.heldout)?)
    };
    let start = std::time::Instant::now();
    let tool = tool_version();
    let (mut cal, calib, heldout) = calibrate(calib, heldout, goal, &tool)?;
    let fallen = if args.no_dense_fallback || goal.flops_budget.is_some() {
        Vec::new()
    } else {
        fall_back_to_dense(&mut cal, args.tolerance)
    };
    let search_seconds = start.elapsed().as_secs_f64();
    let meta = &calib[0].profile.meta;
    let threshold = emit::dense_threshold(
        &cal,
        u64::from(meta.last_q),
        u64::from(meta.block_q),
        meta.model.max_context,
    );
    let mut data: Vec<String> = calib.iter().map(|f| f.profile.meta.data.clone()).collect();
    data.dedup();
    let count = |files: &[ProfileFile]| files.iter().map(|f| f.profile.meta.samples as u32).sum();
    let mut plan = emit::plan(
        &cal,
        emit::PlanInputs {
            model: meta.model.clone(),
            tool: tool.clone(),
            data: data.join(", "),
            samples: count(&calib),
            heldout_samples: count(&heldout),
            block_q: meta.block_q,
            block_k: meta.block_k,
            last_q: meta.last_q,
            threshold: &threshold,
        },
    );
    let hybrid = super::retrieval_heads::apply(&args.retrieval, args.model.as_deref(), &mut plan)?;
    let report = report::build(&cal, &plan, threshold, args.tolerance);
    let mut text = report::render(&report);
    if let Some(h) = &hybrid {
        text.push_str(&h.line());
    }
    text.push_str(&format!(
        "search       {} heads x {} lengths in {search_seconds:.2} s\n",
        cal.heads.len(),
        cal.seq_lens.len()
    ));
    eprint!("{text}");
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&report).context("report")? + "\n";
        schemas::io::write_atomic(path, json.as_bytes())?;
        eprintln!("wrote report {}", path.display());
    }
    let print_heads = |heads: &[&crate::calibration::HeadResult]| {
        for h in heads.iter().take(20) {
            eprintln!(
                "  layer {} head {}: {} held-out recall {:.4} (calibration {:.4})",
                h.layer,
                h.head,
                h.chosen
                    .first()
                    .map_or("dense", |s| s.candidate.kind(&cal.dynamic)),
                h.validated_min().unwrap_or(f64::NAN),
                h.recall()
            );
        }
        if heads.len() > 20 {
            eprintln!("  ... and {} more", heads.len() - 20);
        }
    };
    if !fallen.is_empty() {
        eprintln!(
            "{} heads missed the target {} by more than {} on held-out samples and run dense:",
            fallen.len(),
            goal.target_recall,
            args.tolerance
        );
        print_heads(&fallen.iter().collect::<Vec<_>>());
    }
    let failing = report::failing_heads(&cal, args.tolerance);
    if !failing.is_empty() && goal.flops_budget.is_none() {
        eprintln!(
            "{} heads miss the target {} by more than {} on held-out samples:",
            failing.len(),
            goal.target_recall,
            args.tolerance
        );
        print_heads(&failing);
        if !args.force {
            eprintln!("no plan written (pass --force to write it anyway)");
            return Err(Failure::Check);
        }
    }
    plan.write(&args.out)?;
    eprintln!("wrote plan {}", args.out.display());
    Ok(())
}
