//! The `attnplan` binary end to end: exit codes, messages naming file and field, inspect output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn attnplan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attnplan"))
        .args(args)
        .output()
        .expect("run attnplan")
}

fn plans() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/plans")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn validate_accepts_valid_plans_with_exit_0() {
    for name in ["every-kind.yaml", "modalities-and-gates.yaml"] {
        let path = plans().join("valid").join(name);
        let out = attnplan(&["validate", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("valid plan"));
    }
}

#[test]
fn validate_refuses_every_invalid_fixture_with_exit_1_naming_file_and_field() {
    let dir = plans().join("invalid");
    let table = std::fs::read_to_string(dir.join("EXPECTED.tsv")).unwrap();
    let mut n = 0;
    for row in table
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let cols: Vec<&str> = row.split('\t').collect();
        let path = dir.join(cols[0]);
        let out = attnplan(&["validate", path.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", cols[0]);
        assert!(stderr.contains(cols[0]), "{stderr}");
        assert!(
            stderr.contains(cols[1]),
            "{}: no field {:?}: {stderr}",
            cols[0],
            cols[1]
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        n += 1;
    }
    assert!(n >= 25);
}

#[test]
fn io_and_usage_errors_exit_2() {
    let out = attnplan(&["validate", "/nonexistent/plan.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/plan.yaml"));
    let out = attnplan(&["validate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = attnplan(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = attnplan(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("validate"));
}

#[test]
fn inspect_prints_a_readable_summary() {
    let path = plans().join("valid/every-kind.yaml");
    let out = attnplan(&["inspect", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for needle in [
        "toy-llama",
        "layer",
        "vertical_slash.vertical",
        "mean 0.964",
        "0.260 of dense",
    ] {
        assert!(s.contains(needle), "missing {needle:?} in\n{s}");
    }
}

#[test]
fn inspect_json_has_the_documented_keys() {
    let path = plans().join("valid/every-kind.yaml");
    let out = attnplan(&["inspect", "--json", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["model"]["layers"], 2);
    let s = &v["summary"];
    assert_eq!(s["patterns"]["vertical_slash"], 1);
    assert_eq!(s["patterns"]["dense"], 1);
    let recall = s["mean_recall"].as_f64().unwrap();
    let expected = (1.0 + 0.962 + 0.971 + 0.958 + 0.953 + 0.95 + 0.961 + 0.955) / 8.0;
    assert!((recall - expected).abs() < 1e-12, "{recall} vs {expected}");
    let flops = s["flops_fraction"].as_f64().unwrap();
    let expected = (1.0 + 0.071 + 0.118 + 0.31 + 0.125 + 0.094 + 0.2 + 0.16) / 8.0;
    assert!((flops - expected).abs() < 1e-12, "{flops} vs {expected}");
}

#[test]
fn inspect_refuses_an_invalid_plan_with_exit_1() {
    let path = plans().join("invalid/zero-budget.yaml");
    let out = attnplan(&["inspect", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("layers[0].heads[1].pattern.sink"));
}

/// A `--device cuda` command's stdout when it ran (exit 0); `None`, after checking the message,
/// when it exited 2 because the binary lacks the `cuda` feature or the machine a device. Anything
/// else fails the test.
fn ran_on_a_device(out: &Output) -> Option<String> {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!stderr.contains("panicked"), "{stderr}");
    match out.status.code() {
        Some(0) => {
            println!("ran on a CUDA device:\n{stdout}");
            Some(stdout)
        }
        Some(2) if stderr.contains("built without the `cuda` feature") => {
            assert!(
                stderr.contains("cargo build --release -p calibrate --features cuda"),
                "{stderr}"
            );
            println!("skipped the device run: attnplan built without the `cuda` feature");
            None
        }
        Some(2) if stderr.contains("no usable CUDA device") => {
            println!("skipped the device run: {}", stderr.trim());
            None
        }
        code => panic!("exit {code:?}: {stderr}"),
    }
}

#[test]
fn bench_without_cuda_exits_2_saying_why() {
    let out = attnplan(&[
        "bench",
        "--device",
        "cuda",
        "--lengths",
        "1K",
        "--reps",
        "1",
        "--no-baselines",
    ]);
    if let Some(stdout) = ran_on_a_device(&out) {
        assert!(stdout.contains("baselines: skipped"), "{stdout}");
    }
    let out = attnplan(&["bench", "--device", "cpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--example sparse_bench"));
}

/// `bench --plan`: a plan that does not validate is refused naming the field before any device is
/// opened; a valid one runs where there is a device (and the feature), else exits 2 saying which is
/// missing; `--dense-below` needs `--plan`.
#[test]
fn bench_of_a_plan_checks_it_and_says_why_it_cannot_run() {
    let bad = plans().join("invalid/zero-budget.yaml");
    let out = attnplan(&["bench", "--device", "cuda", "--plan", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("layers[0].heads[1].pattern.sink"));

    let good = plans().join("valid/every-kind.yaml");
    let out = attnplan(&[
        "bench",
        "--device",
        "cuda",
        "--plan",
        good.to_str().unwrap(),
        "--lengths",
        "2K",
        "--reps",
        "1",
        "--dense-below",
        "0",
    ]);
    if let Some(stdout) = ran_on_a_device(&out) {
        assert!(stdout.contains("plan pass"), "{stdout}");
    }
    let out = attnplan(&["bench", "--device", "cuda", "--dense-below", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--plan"),
        "{}",
        text(&out.stderr)
    );
}
