//! Command-line interface: [`Cli`] holds the arguments, one file per subcommand does the work.
//!
//! Exit codes: 0 success; 1 a check failed (the plan is invalid or does not match the model); 2 usage
//! or I/O error. Output to a closed pipe ends quietly with 0.

mod bench;
mod bench_plan;
mod calibrate;
mod common;
mod eval;
mod inspect;
mod merge;
mod profile;
mod retrieval_heads;
mod validate;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Sparse attention planned offline, per attention head: profile a model, calibrate a plan, check it.
#[derive(Debug, Parser)]
#[command(name = "attnplan", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a plan: syntax, version, every rule of docs/plan-format.md, and (with --model) that it
    /// belongs to the model. Exit 0 if valid, 1 if not, 2 on usage or I/O errors.
    Validate(validate::Args),
    /// Summarize a plan: pattern mix per layer, recall, expected FLOPs, budgets at a few lengths.
    Inspect(inspect::Args),
    /// Run a model on calibration data and write exact per-head attention statistics (a profile).
    Profile(profile::Args),
    /// Join profiles of other samples (or other layers) into one.
    Merge(merge::Args),
    /// Search the best pattern and budget per head, validate on held-out samples, write the plan.
    Calibrate(calibrate::Args),
    /// Dense against the plan's sparse prefill on the same inputs: perplexity, retrieval accuracy,
    /// output error, recall, FLOPs, attention time.
    Eval(eval::Args),
    /// Identify retrieval heads (DuoAttention gates or Retrieval Head scores) and write them as JSON,
    /// or with --evaluate measure retrieval accuracy with the lowest-ranked KV heads streaming.
    RetrievalHeads(retrieval_heads::Args),
    /// Time the CUDA executor (vertical-slash index building, sparse and dense attention) at several
    /// lengths, with PyTorch SDPA cuDNN, FA2 and MInference timed in the same run. Needs a build with
    /// `--features cuda`.
    Bench(bench::Args),
}

/// Why a command failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// A check failed: exit 1. The message is already printed.
    Check,
    /// Usage or I/O error: exit 2.
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Error(e)
    }
}

impl From<profiler::Error> for Failure {
    fn from(e: profiler::Error) -> Self {
        Failure::Error(e.into())
    }
}

impl From<crate::Error> for Failure {
    fn from(e: crate::Error) -> Self {
        Failure::Error(e.into())
    }
}

impl From<runtime::Error> for Failure {
    fn from(e: runtime::Error) -> Self {
        Failure::Error(e.into())
    }
}

impl From<schemas::Error> for Failure {
    fn from(e: schemas::Error) -> Self {
        Failure::Error(e.into())
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Error(e.into())
    }
}

pub type Outcome = Result<(), Failure>;

/// Parses the arguments, runs the command, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let outcome = match cli.command {
        Command::Validate(args) => validate::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Profile(args) => profile::run(&args),
        Command::Merge(args) => merge::run(&args),
        Command::Calibrate(args) => calibrate::run(&args),
        Command::RetrievalHeads(args) => retrieval_heads::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Check) => ExitCode::from(1),
        Err(Failure::Error(e)) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(Failure::Error(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes `text` to stdout, reporting a closed pipe as an error the caller maps to exit 0.
pub(crate) fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Prints a plan error and classifies it: content problems are check failures (exit 1).
pub(crate) fn report_plan_error(e: schemas::Error) -> Failure {
    if e.is_check_failure() {
        eprintln!("{e}");
        Failure::Check
    } else {
        Failure::Error(e.into())
    }
}
