//! `attnplan bench --device cuda`: the CUDA benchmark of docs/perf.md ("CUDA runtime") at several
//! lengths, with the baselines timed in the same run.
//!
//! Per length, `runtime::exec::cuda::bench::measure` times our estimate, select, sparse attention, end
//! to end and dense attention (CUDA events, medians) on structured inputs. Unless `--no-baselines`,
//! the inputs and our index are then written to one folder per length and `scripts/gpu/baselines.py`
//! times PyTorch SDPA cuDNN, FA2 and MInference's Triton kernel (when importable) on them, in one
//! Python process after our runs. When python, numpy, torch or a CUDA device for torch is missing, the
//! table says so instead of failing. The table goes to stdout and progress to stderr; `--json FILE`
//! writes every figure, atomically, after each length and at the end.
//!
//! With `--plan FILE` it times that plan instead (`bench_plan`). Without the `cuda` feature
//! (runtime's), or without a driver or device, the command exits 2 with a message saying which.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use runtime::exec::cuda::bench::{self, BenchConfig, BenchResult};
use runtime::exec::cuda::SparsePrefill;
use serde::Serialize;
use serde_json::Value;

use super::common::tool_version;
use super::Outcome;

/// The error of `--device cuda` in a build without CUDA support.
pub const NOT_COMPILED: &str = "built without the `cuda` feature; build with \
                                `cargo build --release -p calibrate --features cuda`";

/// The error of `--device cpu`.
pub const CPU_REFUSED: &str = "`attnplan bench` measures the CUDA executor only (--device cuda); \
                               the CPU benchmark is `cargo run --release -p runtime --example sparse_bench`";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to run: cuda. (cpu is refused with a pointer to the CPU benchmark.)
    #[arg(long, value_enum)]
    pub device: Device,
    /// Sequence lengths, comma-separated; K means x1024 (8K = 8192 tokens).
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_length,
        default_value = "8K,32K,128K,256K"
    )]
    pub lengths: Vec<usize>,
    /// Timed repetitions of each of our stages (medians); dense from 128K on: at most 3.
    #[arg(long, default_value_t = 10, value_parser = parse_reps)]
    pub reps: usize,
    /// Layer shape: query heads, KV heads and head_dim (64 or 128), as HQxHKVxD; SmolLM2-135M's
    /// layers are 9x3x64.
    #[arg(long, default_value = "32x8x128", value_parser = parse_shape)]
    pub shape: (usize, usize, usize),
    /// The structured inputs' local band, comma-separated for several (a table each):
    /// `scattered` (most top diagonals far from the main one: 21% of the cells at 128K) or `local`
    /// (the top diagonals are the nearest ones: 10% at 128K, shared/GPU.md's "local indexes").
    #[arg(
        long = "band",
        value_delimiter = ',',
        default_value = "scattered",
        value_parser = parse_band
    )]
    pub bands: Vec<bench::Band>,
    /// Skip the baselines (PyTorch SDPA cuDNN, FA2, MInference's Triton kernel).
    #[arg(long)]
    pub no_baselines: bool,
    /// Write every figure as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the inputs and indexes for the baselines to DIR and keep them, one folder per length,
    /// even with --no-baselines [default: a temporary directory, removed at the end].
    #[arg(long, value_name = "DIR")]
    pub inputs_dir: Option<PathBuf>,
    /// Python interpreter for the baselines.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// The baselines script (relative paths from the working directory).
    #[arg(long, default_value = "scripts/gpu/baselines.py")]
    pub baselines_script: PathBuf,
    /// Time this plan instead, every layer through the runtime's plan runner against dense
    /// attention, on structured inputs of the plan's layer shape (`--shape`, the vertical-slash
    /// budgets and the baselines do not apply); `--reps` timed forwards per layer and whole passes.
    #[arg(long, value_name = "FILE")]
    pub plan: Option<PathBuf>,
    /// With --plan: run dense below this many tokens instead of the executor's threshold (the
    /// larger of the plan's `dense_below` and the GPU's own floor); 0 runs the plan's patterns at
    /// every length.
    #[arg(long, value_name = "TOKENS", requires = "plan")]
    pub dense_below: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

/// A length in tokens: `8192` or `8K` (x1024), at least 1.
pub fn parse_length(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (digits, scale) = match t.strip_suffix(['K', 'k']) {
        Some(d) => (d, 1024usize),
        None => (t, 1),
    };
    let n = digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{s:?}: expected a token count such as 8192 or 8K"))?;
    if n == 0 {
        return Err(format!("{s:?}: a length must be at least 1 token"));
    }
    Ok(n)
}

/// A layer shape `HQxHKVxD`: query heads, KV heads dividing them, head_dim 64 or 128.
pub fn parse_shape(s: &str) -> Result<(usize, usize, usize), String> {
    let bad = || format!("{s:?}: expected query heads x KV heads x head_dim, such as 32x8x128");
    let parts: Vec<usize> = s
        .trim()
        .split(['x', 'X'])
        .map(|p| p.trim().parse::<usize>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let [hq, hkv, d] = parts[..] else {
        return Err(bad());
    };
    if hkv == 0 || hq == 0 || hq % hkv != 0 {
        return Err(format!(
            "{s:?}: the KV heads ({hkv}) must divide the query heads ({hq}), both at least 1"
        ));
    }
    if d != 64 && d != 128 {
        return Err(format!(
            "{s:?}: head_dim must be 64 or 128 (the CUDA kernels' sizes), not {d}"
        ));
    }
    Ok((hq, hkv, d))
}

fn parse_band(s: &str) -> Result<bench::Band, String> {
    s.parse()
}

fn parse_reps(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?}: expected a count of at least 1")),
    }
}

/// Baseline times at one length, from `baselines.py` (ms; `None` when not measured).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BaselineTimes {
    /// PyTorch SDPA cuDNN, K/V expanded to all query heads.
    pub cudnn_ms: Option<f64>,
    /// PyTorch SDPA flash (FA2) with `enable_gqa`.
    pub flash_ms: Option<f64>,
    /// MInference's Triton kernel on our index.
    pub minference_triton_ms: Option<f64>,
    /// Why MInference's kernel did not run (e.g. not importable).
    pub minference_triton_error: Option<String>,
}

/// Whether the baselines ran, and why not.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum Baselines {
    /// `--no-baselines`.
    Skipped,
    /// Our lengths are still being measured.
    Pending,
    /// Python, its packages, the script or a device for torch is missing.
    Unavailable(String),
    /// The script failed; rows it finished are kept.
    Failed(String),
    Ran,
}

/// One length: our figures and the baselines'.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub ours: BenchResult,
    pub baselines: BaselineTimes,
}

pub fn run(args: &Args) -> Outcome {
    if args.device == Device::Cpu {
        return Err(anyhow::anyhow!(CPU_REFUSED).into());
    }
    if let Some(n) = first_repeat(&args.lengths) {
        return Err(anyhow::anyhow!("--lengths lists {n} twice").into());
    }
    if let Some(b) = first_repeat(&args.bands) {
        return Err(anyhow::anyhow!("--band lists {b} twice").into());
    }
    if let Some(plan) = &args.plan {
        return super::bench_plan::run(args, plan);
    }
    let sp = SparsePrefill::new(0).map_err(open_error)?;
    eprintln!("bench: {}", sp.device().describe()?);
    // Probe Python before our runs, so no inputs are written for baselines that cannot run.
    let mut status = if args.no_baselines {
        Baselines::Skipped
    } else {
        match probe_python(args) {
            Ok(()) => Baselines::Pending,
            Err(why) => {
                eprintln!("bench: baselines not measured: {why}");
                Baselines::Unavailable(why)
            }
        }
    };
    let inputs = match (&args.inputs_dir, &status) {
        (Some(dir), _) => Some(InputsDir::Kept(dir.clone())),
        (None, Baselines::Pending) => Some(InputsDir::Temp(
            tempfile::Builder::new()
                .prefix("attnplan-bench-")
                .tempdir()
                .context("a temporary directory for the baselines' inputs")?,
        )),
        _ => None,
    };
    // Our runs; the device (its context and memory) is released before the baselines start.
    let (mut rows, dirs) = measure_lengths(sp, args, &status, inputs.as_ref())?;
    if let (Some(root), Baselines::Pending) = (&inputs, &status) {
        let (st, times) = run_baselines(args, root.path(), &dirs);
        for row in &mut rows {
            let c = &row.ours.config;
            if let Some(t) = times.get(&(c.seq_len, c.band)) {
                row.baselines = t.clone();
            }
        }
        status = st;
    }
    if let Some(path) = &args.json {
        write_json(path, &rows, &status)?;
        eprintln!("bench: wrote {}", path.display());
    }
    super::print(&format_table(&rows, &status))?;
    Ok(())
}

/// The first item of `items` that an earlier one equals.
fn first_repeat<T: Ord + Copy>(items: &[T]) -> Option<T> {
    let mut seen = std::collections::BTreeSet::new();
    items.iter().copied().find(|&x| !seen.insert(x))
}

/// Measures every band at every length on `sp` (bands outer), writing the baselines' inputs under `inputs` and the JSON (with
/// `status`) after each length. Returns the rows and the input folders.
fn measure_lengths(
    sp: SparsePrefill,
    args: &Args,
    status: &Baselines,
    inputs: Option<&InputsDir>,
) -> anyhow::Result<(Vec<Row>, Vec<PathBuf>)> {
    let mut rows = Vec::new();
    let mut dirs = Vec::new();
    let runs = args
        .bands
        .iter()
        .flat_map(|&band| args.lengths.iter().map(move |&n| (band, n)));
    for (band, n) in runs {
        let (q_heads, kv_heads, head_dim) = args.shape;
        let cfg = BenchConfig {
            reps: args.reps,
            q_heads,
            kv_heads,
            head_dim,
            band,
            ..BenchConfig::new(n)
        };
        let (ours, index) =
            bench::measure(&sp, &cfg).with_context(|| format!("length {n}, {band} band"))?;
        eprintln!("{}", ours.summary());
        if let Some(root) = inputs {
            let dir = root.path().join(format!("{band}-n{n}"));
            bench::write_inputs(&dir, &ours, &index)?;
            dirs.push(dir);
        }
        rows.push(Row {
            ours,
            baselines: BaselineTimes::default(),
        });
        if let Some(path) = &args.json {
            write_json(path, &rows, status)?;
        }
    }
    Ok((rows, dirs))
}

/// Where the baselines' inputs go.
enum InputsDir {
    Kept(PathBuf),
    Temp(tempfile::TempDir),
}

impl InputsDir {
    fn path(&self) -> &Path {
        match self {
            InputsDir::Kept(p) => p,
            InputsDir::Temp(t) => t.path(),
        }
    }
}

/// The message for a device that cannot be opened.
pub fn open_error(e: runtime::Error) -> anyhow::Error {
    match e {
        runtime::Error::CudaNotCompiled => anyhow::anyhow!(NOT_COMPILED),
        runtime::Error::CudaUnavailable(why) => anyhow::anyhow!("no usable CUDA device: {why}"),
        other => anyhow::Error::new(other).context("opening CUDA device 0"),
    }
}

/// Python code that exits 0 when the baselines can run, else prints why on stderr.
const PROBE: &str = "\
import sys
try:
    import numpy, torch
except Exception as e:
    sys.exit('cannot import numpy and torch: %r' % (e,))
if not torch.cuda.is_available():
    sys.exit('torch %s sees no CUDA device' % torch.__version__)
";

/// `Err(why)` when the baselines cannot run here.
fn probe_python(args: &Args) -> Result<(), String> {
    if !args.baselines_script.is_file() {
        return Err(format!(
            "{} not found (run from the repository root or pass --baselines-script)",
            args.baselines_script.display()
        ));
    }
    let out = Command::new(&args.python)
        .args(["-c", PROBE])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("{} not found", args.python),
            _ => format!("{}: {e}", args.python),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(last_line(&out.stderr).unwrap_or_else(|| format!("{} {}", args.python, out.status)))
    }
}

fn last_line(bytes: &[u8]) -> Option<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

/// Runs `baselines.py OUT DIR...` (its stderr shows; its own table is dropped) and reads the times
/// it wrote, by length. Rows finished before a failure are kept.
fn run_baselines(
    args: &Args,
    root: &Path,
    dirs: &[PathBuf],
) -> (Baselines, BTreeMap<(usize, bench::Band), BaselineTimes>) {
    let out_json = root.join("baselines.json");
    eprintln!(
        "bench: baselines: {} {} on {} lengths",
        args.python,
        args.baselines_script.display(),
        dirs.len()
    );
    let run = Command::new(&args.python)
        .arg(&args.baselines_script)
        .arg(&out_json)
        .args(dirs)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output();
    let status = match run {
        Err(e) => {
            return (
                Baselines::Failed(format!("{}: {e}", args.python)),
                BTreeMap::new(),
            )
        }
        Ok(out) if out.status.success() => Baselines::Ran,
        Ok(out) => Baselines::Failed(format!(
            "{} {} (its messages are above)",
            args.baselines_script.display(),
            out.status
        )),
    };
    match std::fs::read(&out_json) {
        Ok(bytes) => match parse_baselines(&bytes) {
            Ok(times) => (status, times),
            Err(e) => (
                Baselines::Failed(format!("{}: {e}", out_json.display())),
                BTreeMap::new(),
            ),
        },
        Err(_) if status != Baselines::Ran => (status, BTreeMap::new()),
        Err(e) => (
            Baselines::Failed(format!("{}: {e}", out_json.display())),
            BTreeMap::new(),
        ),
    }
}

/// The rows of `baselines.py`'s output: a JSON array of objects with `n`, `band` (our `bench.json`
/// keys, which the script copies) and the baseline keys, keyed by length and band.
pub fn parse_baselines(
    bytes: &[u8],
) -> anyhow::Result<BTreeMap<(usize, bench::Band), BaselineTimes>> {
    let rows: Vec<Value> = serde_json::from_slice(bytes).context("expected a JSON array")?;
    let mut out = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let n = r
            .get("n")
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .with_context(|| format!("[{i}].n: expected a token count"))?;
        let band = r
            .get("band")
            .and_then(Value::as_str)
            .with_context(|| format!("[{i}].band: expected scattered or local"))?
            .parse::<bench::Band>()
            .map_err(|e| anyhow::anyhow!("[{i}].band: {e}"))?;
        let ms = |key: &str| r.get(key).and_then(Value::as_f64);
        out.insert(
            (n, band),
            BaselineTimes {
                cudnn_ms: ms("cudnn_ms"),
                flash_ms: ms("flash_ms"),
                minference_triton_ms: ms("minference_triton_ms"),
                minference_triton_error: r
                    .get("minference_triton_error")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            },
        );
    }
    Ok(out)
}

/// Every figure as JSON: `tool`, `baselines` (`status`, `reason`) and `rows` (per length our
/// `bench.json` keys, then the baselines' keys that were measured).
pub fn to_json(rows: &[Row], status: &Baselines) -> anyhow::Result<Value> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let mut v: serde_json::Map<String, Value> =
            serde_json::from_str(&r.ours.to_json()).context("our figures as JSON")?;
        let b = &r.baselines;
        for (key, ms) in [
            ("cudnn_ms", b.cudnn_ms),
            ("flash_ms", b.flash_ms),
            ("minference_triton_ms", b.minference_triton_ms),
        ] {
            if let Some(ms) = ms {
                v.insert(key.into(), ms.into());
            }
        }
        if let Some(e) = &b.minference_triton_error {
            v.insert("minference_triton_error".into(), e.clone().into());
        }
        out.push(Value::Object(v));
    }
    Ok(serde_json::json!({
        "tool": tool_version(),
        "baselines": status,
        "rows": out,
    }))
}

fn write_json(path: &Path, rows: &[Row], status: &Baselines) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(&to_json(rows, status)?)? + "\n";
    schemas::io::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// `a / b` with two decimals and `x`, or `n/a`.
fn ratio(a: Option<f64>, b: f64) -> String {
    match a {
        Some(a) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

fn ms(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".into(), |x| format!("{x:.3}"))
}

/// The table: per band (rows of one band are adjacent), a heading with the workload and one line
/// per length; then notes on the baselines. Times in ms; ratios are baseline / ours (above 1: we
/// are faster).
pub fn format_table(rows: &[Row], status: &Baselines) -> String {
    let mut t = String::new();
    for (i, band) in rows
        .chunk_by(|a, b| a.ours.config.band == b.ours.config.band)
        .enumerate()
    {
        if i > 0 {
            t.push('\n');
        }
        band_table(&mut t, band);
    }
    match status {
        Baselines::Skipped => t.push_str("baselines: skipped (--no-baselines)\n"),
        Baselines::Pending => t.push_str("baselines: not run yet\n"),
        Baselines::Unavailable(why) => {
            let _ = writeln!(t, "baselines: not measured: {why}");
        }
        Baselines::Failed(why) => {
            let _ = writeln!(t, "baselines: failed: {why}");
        }
        Baselines::Ran => {}
    }
    for r in rows {
        if let Some(e) = &r.baselines.minference_triton_error {
            let c = &r.ours.config;
            let _ = writeln!(t, "MInference at N={} ({} band): {e}", c.seq_len, c.band);
        }
    }
    t
}

/// One band's heading, column names and rows.
fn band_table(t: &mut String, rows: &[Row]) {
    if let Some(first) = rows.first() {
        let c = &first.ours.config;
        let _ = writeln!(
            t,
            "CUDA benchmark on {}, attention kernel {}: {} query heads over {} KV heads, head_dim {}, \
             bf16, causal; vertical-slash v={} s={} last_q={}; structured inputs, {} band.\n\
             Times in ms, CUDA-event medians of {} (dense from {} tokens on: of {}); \
             TFLOP/s in parentheses; ratios are baseline / ours.",
            first.ours.device,
            first.ours.kernel,
            c.q_heads,
            c.kv_heads,
            c.head_dim,
            c.vertical,
            c.slash,
            c.last_q,
            c.band,
            c.sparse_reps(),
            bench::LONG_DENSE,
            BenchConfig {
                seq_len: bench::LONG_DENSE,
                ..*c
            }
            .dense_reps(),
        );
    }
    let _ = writeln!(
        t,
        "{:>7} {:>7} {:>8} {:>7} {:>17} {:>10} {:>6} {:>17} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9}",
        "N",
        "density",
        "estimate",
        "select",
        "sparse attn",
        "end-to-end",
        "index",
        "ours dense",
        "cuDNN",
        "FA2",
        "MInf",
        "cuDNN/e2e",
        "MInf/attn",
        "FA2/dense"
    );
    for r in rows {
        let (o, b) = (&r.ours, &r.baselines);
        let _ = writeln!(
            t,
            "{:>7} {:>7.3} {:>8.3} {:>7.3} {:>17} {:>10.3} {:>5.1}% {:>17} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9}",
            o.config.seq_len,
            o.density,
            o.estimate_ms,
            o.select_ms,
            format!("{:.3} ({:.0})", o.sparse_attn_ms, o.sparse_attn_tflops()),
            o.e2e_ms,
            100.0 * o.index_share(),
            format!("{:.3} ({:.0})", o.dense_ms, o.dense_tflops()),
            ms(b.cudnn_ms),
            ms(b.flash_ms),
            ms(b.minference_triton_ms),
            ratio(b.cudnn_ms, f64::from(o.e2e_ms)),
            ratio(b.minference_triton_ms, f64::from(o.sparse_attn_ms)),
            ratio(b.flash_ms, f64::from(o.dense_ms)),
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn bench_args_default_to_the_lengths_and_reps_of_perf_md() {
        let a = parse(&["--device", "cuda"]).unwrap();
        assert_eq!(a.device, Device::Cuda);
        assert_eq!(a.lengths, bench::DEFAULT_LENGTHS);
        assert_eq!(a.reps, BenchConfig::new(8192).reps);
        assert_eq!(a.shape, (bench::Q_HEADS, bench::KV_HEADS, bench::HEAD_DIM));
        assert!(!a.no_baselines);
        assert!(a.json.is_none());
        assert_eq!(a.baselines_script, Path::new("scripts/gpu/baselines.py"));
        assert_eq!(a.bands, [bench::Band::Scattered]);
    }

    #[test]
    fn bench_bands_parse_and_repeats_are_refused() {
        let a = parse(&["--device", "cuda", "--band", "local,scattered"]).unwrap();
        assert_eq!(a.bands, [bench::Band::Local, bench::Band::Scattered]);
        let e = parse(&["--device", "cuda", "--band", "wide"]).unwrap_err();
        assert!(e.to_string().contains("scattered or local"), "{e}");
        // refused before any device is opened
        let a = parse(&["--device", "cuda", "--band", "local,local"]).unwrap();
        let Err(crate::cli::Failure::Error(e)) = run(&a) else {
            panic!("--band local,local ran")
        };
        assert_eq!(e.to_string(), "--band lists local twice");
    }

    #[test]
    fn bench_shape_is_heads_kv_heads_and_a_kernel_head_dim() {
        assert_eq!(parse_shape("9x3x64"), Ok((9, 3, 64)));
        assert_eq!(parse_shape(" 32X8x128 "), Ok((32, 8, 128)));
        let a = parse(&["--device", "cuda", "--shape", "9x3x64"]).unwrap();
        assert_eq!(a.shape, (9, 3, 64));
        for (bad, says) in [
            ("9x3", "expected query heads x KV heads x head_dim"),
            ("9x3x64x1", "expected query heads x KV heads x head_dim"),
            ("ax3x64", "expected query heads x KV heads x head_dim"),
            ("9x4x64", "must divide the query heads"),
            ("9x0x64", "must divide the query heads"),
            ("9x3x96", "head_dim must be 64 or 128"),
        ] {
            let e = parse_shape(bad).unwrap_err();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
        let e = parse(&["--device", "cuda", "--shape", "9x4x64"]).unwrap_err();
        assert!(e.to_string().contains("--shape"), "{e}");
    }

    #[test]
    fn bench_args_parse_lengths_reps_and_flags() {
        let a = parse(&[
            "--device",
            "cuda",
            "--lengths",
            "1k,4096,64K",
            "--reps",
            "3",
            "--no-baselines",
            "--json",
            "out/bench.json",
        ])
        .unwrap();
        assert_eq!(a.lengths, [1024, 4096, 65536]);
        assert_eq!(a.reps, 3);
        assert_eq!(a.shape, (bench::Q_HEADS, bench::KV_HEADS, bench::HEAD_DIM));
        assert!(a.no_baselines);
        assert_eq!(a.json.as_deref(), Some(Path::new("out/bench.json")));
    }

    #[test]
    fn bench_args_refuse_bad_values() {
        for bad in [
            &["--lengths", "8K"][..], // --device is required
            &["--device", "gpu"],
            &["--device", "cuda", "--lengths", "0"],
            &["--device", "cuda", "--lengths", "8M"],
            &["--device", "cuda", "--lengths", "-5"],
            &["--device", "cuda", "--reps", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_length("99999999999999999999K").is_err());
    }

    #[test]
    fn bench_errors_name_the_fix() {
        let e = open_error(runtime::Error::CudaNotCompiled).to_string();
        assert!(e.contains("built without the `cuda` feature"), "{e}");
        assert!(
            e.contains("cargo build --release -p calibrate --features cuda"),
            "{e}"
        );
        let e = open_error(runtime::Error::CudaUnavailable("no CUDA driver".into())).to_string();
        assert_eq!(e, "no usable CUDA device: no CUDA driver");
        let a = parse(&["--device", "cpu"]).unwrap();
        let Err(crate::cli::Failure::Error(e)) = run(&a) else {
            panic!("--device cpu ran")
        };
        assert!(e.to_string().contains("--example sparse_bench"), "{e}");
    }

    #[test]
    fn bench_probe_says_why_baselines_cannot_run() {
        let mut a = parse(&["--device", "cuda"]).unwrap();
        a.baselines_script = PathBuf::from("/nonexistent/baselines.py");
        let why = probe_python(&a).unwrap_err();
        assert!(why.contains("/nonexistent/baselines.py not found"), "{why}");
        a.baselines_script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu/baselines.py");
        a.python = "attnplan-no-such-python".into();
        assert_eq!(
            probe_python(&a).unwrap_err(),
            "attnplan-no-such-python not found"
        );
    }

    /// `run_baselines` with `sh` as the interpreter and a stand-in script (no Python, no GPU).
    #[test]
    fn bench_baselines_plumbing_with_a_stand_in_script() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake.sh");
        std::fs::write(
            &script,
            "printf '[{\"n\": 1024, \"band\": \"local\", \"cudnn_ms\": 1.5, \"flash_ms\": 2.5}]' \
             > \"$1\"\nexit ${FAIL:-0}\n",
        )
        .unwrap();
        let mut a = parse(&["--device", "cuda"]).unwrap();
        a.python = "sh".into();
        a.baselines_script = script;
        let dirs = [dir.path().join("local-n1024")];
        let (status, times) = run_baselines(&a, dir.path(), &dirs);
        assert_eq!(status, Baselines::Ran);
        let local = (1024, bench::Band::Local);
        assert_eq!(times[&local].cudnn_ms, Some(1.5));
        assert_eq!(times[&local].flash_ms, Some(2.5));
        assert_eq!(times[&local].minference_triton_ms, None);
        // a failing script: the rows it wrote are kept, the status says it failed
        std::fs::write(
            dir.path().join("fake2.sh"),
            "printf '[]' > \"$1\"; exit 3\n",
        )
        .unwrap();
        a.baselines_script = dir.path().join("fake2.sh");
        let (status, times) = run_baselines(&a, dir.path(), &dirs);
        assert!(
            matches!(&status, Baselines::Failed(why) if why.contains("exit status: 3")),
            "{status:?}"
        );
        assert!(times.is_empty());
    }

    /// Made-up figures: these tests check formatting only, not any measurement.
    fn made_up_row(n: usize, baselines: BaselineTimes) -> Row {
        Row {
            ours: BenchResult {
                config: BenchConfig::new(n),
                density: 0.5,
                estimate_ms: 1.0,
                select_ms: 1.0,
                sparse_attn_ms: 18.0,
                e2e_ms: 20.0,
                dense_ms: 30.0,
                entries: (10, 20),
                device: "Made-up GPU \"X\" (sm_00)".into(),
                kernel: "attn_fwd_test".into(),
                inputs_s: 0.5,
            },
            baselines,
        }
    }

    #[test]
    fn bench_table_formatting_only_with_made_up_figures() {
        let rows = [
            made_up_row(
                32768,
                BaselineTimes {
                    cudnn_ms: Some(40.0),
                    flash_ms: Some(33.0),
                    minference_triton_ms: Some(9.0),
                    minference_triton_error: None,
                },
            ),
            made_up_row(
                131072,
                BaselineTimes {
                    cudnn_ms: Some(50.0),
                    flash_ms: Some(60.0),
                    minference_triton_ms: None,
                    minference_triton_error: Some("ModuleNotFoundError('pit_v2')".into()),
                },
            ),
        ];
        let t = format_table(&rows, &Baselines::Ran);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("Made-up GPU"), "{t}");
        assert!(lines[1].contains("medians of 10 (dense from 131072 tokens on: of 3)"));
        assert!(
            lines[2].trim_start().starts_with("N density estimate"),
            "{t}"
        );
        // 32K: 2^31 * 128 * 32 * 2 FLOPs dense; e2e 20 ms, cuDNN 40: 2.00x; MInf 9 / attn 18: 0.50x
        let row = lines[3];
        for needle in [
            "32768", "0.500", "18.000 (", "20.000", "10.0%", "30.000 (", "40.000", "2.00x",
            "0.50x", "1.10x",
        ] {
            assert!(row.contains(needle), "{needle} missing from {row:?}");
        }
        assert!(lines[4].contains("n/a"), "{t}");
        assert_eq!(lines[3].len(), lines[4].len(), "columns align:\n{t}");
        assert!(
            t.contains("MInference at N=131072 (scattered band): ModuleNotFoundError"),
            "{t}"
        );
        // a second band: its own heading and column names after a blank line
        let mut local = rows[0].clone();
        local.ours.config.band = bench::Band::Local;
        let two = [rows[0].clone(), rows[1].clone(), local];
        let t = format_table(&two, &Baselines::Ran);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("scattered band"), "{t}");
        assert_eq!(lines[5], "", "{t}");
        assert!(lines[6].contains("local band"), "{t}");
        assert!(lines[8].trim_start().starts_with("N density"), "{t}");
        assert!(lines[9].trim_start().starts_with("32768"), "{t}");
        let t = format_table(
            &rows[..1],
            &Baselines::Unavailable("python3 not found".into()),
        );
        assert!(
            t.contains("baselines: not measured: python3 not found"),
            "{t}"
        );
    }

    #[test]
    fn bench_json_formatting_only_with_made_up_figures() {
        let rows = [made_up_row(
            8192,
            BaselineTimes {
                cudnn_ms: Some(1.5),
                ..BaselineTimes::default()
            },
        )];
        let v = to_json(&rows, &Baselines::Failed("exit status 1".into())).unwrap();
        assert_eq!(v["baselines"]["status"], "failed");
        assert_eq!(v["baselines"]["reason"], "exit status 1");
        let r = &v["rows"][0];
        assert_eq!(r["n"], 8192);
        assert_eq!(r["density"], 0.5);
        assert_eq!(r["device"], "Made-up GPU \"X\" (sm_00)");
        assert_eq!(r["cudnn_ms"], 1.5);
        assert!(r.get("flash_ms").is_none());
        for key in [
            "estimate_ms",
            "select_ms",
            "sparse_attn_ms",
            "e2e_ms",
            "dense_ms",
            "index_share",
            "entries",
        ] {
            assert!(r.get(key).is_some(), "{key} missing: {r}");
        }
        let v = to_json(&rows, &Baselines::Skipped).unwrap();
        assert_eq!(v["baselines"], serde_json::json!({"status": "skipped"}));
    }

    #[test]
    fn bench_reads_the_baselines_script_output() {
        use bench::Band::{Local, Scattered};
        let json = br#"[{"n": 8192, "band": "scattered", "density": 0.9, "cudnn_ms": 0.98,
            "flash_ms": 1.79, "minference_triton_ms": 1.78}, {"n": 32768, "band": "scattered",
            "cudnn_ms": 13.2, "flash_ms": 25.3, "minference_triton_error": "ImportError()"},
            {"n": 8192, "band": "local", "cudnn_ms": 0.97}]"#;
        let t = parse_baselines(json).unwrap();
        assert_eq!(t[&(8192, Scattered)].minference_triton_ms, Some(1.78));
        assert_eq!(t[&(8192, Local)].cudnn_ms, Some(0.97));
        assert_eq!(t[&(32768, Scattered)].flash_ms, Some(25.3));
        assert_eq!(
            t[&(32768, Scattered)].minference_triton_error.as_deref(),
            Some("ImportError()")
        );
        assert!(parse_baselines(b"{}").is_err());
        assert!(parse_baselines(br#"[{"cudnn_ms": 1}]"#).is_err());
        let e = parse_baselines(br#"[{"n": 8192}]"#).unwrap_err();
        assert!(e.to_string().contains("[0].band"), "{e}");
        let e = parse_baselines(br#"[{"n": 8192, "band": "wide"}]"#).unwrap_err();
        assert!(e.to_string().contains("[0].band"), "{e}");
    }
}
