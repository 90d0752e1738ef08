//! Pieces several subcommands share: the default model, data loading, progress on the terminal.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use profiler::data::{load_samples, DataSource, Sample};
use profiler::model::Model;

/// `attnplan <version>`, written into plans and profiles.
pub fn tool_version() -> String {
    format!("attnplan {}", env!("CARGO_PKG_VERSION"))
}

/// The model path given, or the cached default model (fetched once if missing, with a message).
pub fn model_path(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    match model {
        Some(p) => Ok(p.to_path_buf()),
        None => profiler::model::ensure_default_model().context("the default model"),
    }
}

/// Loads the model, saying so on stderr (dequantizing SmolLM2 takes a few seconds).
pub fn load_model(model: Option<&Path>) -> anyhow::Result<Model> {
    let path = model_path(model)?;
    eprintln!("loading {}", path.display());
    Ok(Model::load(&path)?)
}

/// Data options shared by `profile`, `calibrate` and `eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Calibration data: a text file, a JSONL file, or synthetic:passkey, synthetic:kv-retrieval,
    /// synthetic:needle.
    #[arg(long, default_value = "synthetic:passkey")]
    pub data: String,
    /// Field holding the text in JSONL files.
    #[arg(long, default_value = profiler::data::DEFAULT_JSONL_FIELD)]
    pub field: String,
    /// Tokens per sample.
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Seed for synthetic data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Accept a --seq-len beyond the model's trained context.
    #[arg(long)]
    pub allow_long: bool,
    /// Synthetic tasks: needle depth in 0..=1 (repeat for several, used in turn by sample)
    /// [default: spread evenly over the samples].
    #[arg(long = "depth", value_name = "DEPTH")]
    pub depths: Vec<f64>,
}

impl DataArgs {
    pub fn source(&self) -> anyhow::Result<DataSource> {
        let mut source = DataSource::parse(&self.data)?;
        if matches!(source, DataSource::Jsonl { .. }) {
            source = source.with_field(self.field.clone());
        }
        match &mut source {
            DataSource::Synthetic { options, .. } => options.depths.clone_from(&self.depths),
            _ if !self.depths.is_empty() => {
                anyhow::bail!(
                    "--depth places a synthetic task's needle; {} is not synthetic",
                    self.data
                )
            }
            _ => {}
        }
        Ok(source)
    }

    /// `count` samples of `seq_len` tokens after checking the length against the model.
    pub fn samples(&self, model: &Model, count: usize, seed: u64) -> anyhow::Result<Vec<Sample>> {
        let ctx = model.config().max_context;
        if self.seq_len > ctx && !self.allow_long {
            anyhow::bail!(
                "--seq-len {} is beyond {}'s trained context of {ctx} tokens (pass --allow-long to profile anyway)",
                self.seq_len,
                model.path().display()
            );
        }
        if self.seq_len < 16 {
            anyhow::bail!(
                "--seq-len {} is too short to profile attention (at least 16)",
                self.seq_len
            );
        }
        let source = self.source()?;
        Ok(load_samples(
            &source,
            model.tokenizer(),
            self.seq_len,
            count,
            seed,
        )?)
    }
}

/// Progress on stderr: a bar with ETA on a terminal, plain lines otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
}

impl Progress {
    pub fn new(label: &str, total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(label.to_string());
            bar
        });
        Self {
            bar,
            label: label.to_string(),
        }
    }

    /// One step done; `detail` goes to the plain-line form.
    pub fn step(&self, done: usize, total: usize, detail: &str) {
        match &self.bar {
            Some(bar) => bar.set_position(done as u64),
            None => eprintln!("{} {done}/{total}: {detail}", self.label),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Which dynamic candidates (query-adaptive, token-select, grid) the statistics pass scores; shared by
/// `profile` and the one-shot `calibrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct DynamicArgs {
    /// Do not score query-adaptive and token-select candidates (faster profiling; the search then
    /// covers dense, A-shape, vertical-slash and block-sparse only).
    #[arg(long)]
    pub no_dynamic: bool,
    /// The data has a period of STRIDE tokens (e.g. tokens per video frame), its first period
    /// starting at PHASE (default 0): also score grid candidates at it. Repeatable.
    #[arg(long = "grid", value_name = "STRIDE[:PHASE]", value_parser = parse_grid)]
    pub grid: Vec<(u32, u32)>,
    /// Look for periods in the first sample's attention and also score grid candidates at those
    /// found (`find`), or do not (`off`). Default: `find` in the one-shot `calibrate` (its held-out
    /// samples get the same candidates), `off` in `profile` (profile held-out data with the `--grid`
    /// the calibration profile reports instead).
    #[arg(long, value_enum, value_name = "MODE")]
    pub periods: Option<Periods>,
}

/// `--periods`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Periods {
    Find,
    Off,
}

fn parse_grid(s: &str) -> Result<(u32, u32), String> {
    let (stride, phase) = s.split_once(':').unwrap_or((s, "0"));
    let number = |x: &str, what: &str| {
        x.trim()
            .parse::<u32>()
            .map_err(|e| format!("--grid {s}: {what} `{x}`: {e}"))
    };
    let (stride, phase) = (number(stride, "stride")?, number(phase, "phase")?);
    if stride < 2 {
        return Err(format!("--grid {s}: the stride must be at least 2 tokens"));
    }
    Ok((stride, phase % stride))
}

impl DynamicArgs {
    /// The candidate list at key block size `block_k`.
    pub fn candidates(&self, block_k: usize) -> Vec<schemas::Pattern> {
        let block_k = block_k as u32;
        let mut out = if self.no_dynamic {
            Vec::new()
        } else {
            profiler::stats::dynamic::default_candidates(block_k)
        };
        for &(stride, phase) in &self.grid {
            out.extend(profiler::stats::dynamic::grid_candidates(
                stride, phase, block_k,
            ));
        }
        out
    }

    /// The period search to run, `default` when `--periods` is not given.
    pub fn period_search(&self, default: Periods) -> Option<profiler::stats::period::PeriodSearch> {
        (self.periods.unwrap_or(default) == Periods::Find).then(Default::default)
    }
}

/// Prints what a period search found (`profile.meta.periods`), if one ran.
pub fn print_periods(meta: &profiler::profile::ProfileMeta) {
    let Some(r) = &meta.periods else { return };
    let searched = format!(
        "periods      sample {}, last {} rows of {} heads",
        r.sample, r.rows, r.heads
    );
    if r.found.is_empty() {
        eprintln!(
            "{searched}: none (strides 2 to {} tokens; a grid needs {} or more)",
            r.strides[1], r.strides[0]
        );
    }
    for p in &r.found {
        let what = if p.searched {
            format!(
                "grid candidates scored (held-out data: --grid {}:{})",
                p.stride, p.phase
            )
        } else if p.stride < r.strides[0] {
            format!("too short for a grid (< {} tokens)", r.strides[0])
        } else {
            "not searched (more periods than kept)".to_string()
        };
        eprintln!(
            "{searched}: stride {} phase {} in {} heads (median contrast {:.1}): {what}",
            p.stride, p.phase, p.heads, p.contrast
        );
    }
}
