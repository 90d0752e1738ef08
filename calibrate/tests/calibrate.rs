//! The calibrator: fast read-outs equal the statistics' own, the choice rule, and `attnplan calibrate`
//! end to end on profiles made from structured synthetic attention (no model needed), plus one
//! one-shot run on the real SmolLM2 (fetched by scripts/fetch-model.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use calibrate::search::tables::HeadTables;
use calibrate::search::{choose, Candidate, Goal, HeadSamples, Objective, Scored};
use profiler::profile::{Profile, ProfileMeta, PROFILE_FORMAT, PROFILE_VERSION};
use profiler::stats::{dynamic, layer_stats_scored, HeadStats, StatsConfig};
use runtime::{AttentionInput, AttnShape};

/// SplitMix64: a fixed stream of test numbers.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// Q/K/V with a sink key, a local band and a few heavy columns, different per head and seed.
fn structured(shape: AttnShape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = Rng(seed);
    let (n, d) = (shape.seq_len, shape.head_dim);
    let mut q = vec![0f32; shape.q_len().unwrap()];
    let mut k = vec![0f32; shape.kv_len().unwrap()];
    let v: Vec<f32> = (0..shape.kv_len().unwrap())
        .map(|_| rng.next() as f32)
        .collect();
    for x in q.iter_mut().chain(k.iter_mut()) {
        *x = 0.3 * rng.next() as f32;
    }
    for g in 0..shape.kv_heads {
        for pos in 0..n {
            let row = &mut k[(g * n + pos) * d..(g * n + pos + 1) * d];
            // Sink: key 0 aligned with dimension 0 that every query has.
            if pos == 0 || pos % (37 + 11 * g) == 5 {
                row[0] += 3.0;
            }
            // Local band: a slowly rotating direction in dimensions 2..4.
            let phase = pos as f32 * 0.05;
            row[2] += 2.0 * phase.cos();
            row[3] += 2.0 * phase.sin();
        }
    }
    for h in 0..shape.q_heads {
        for pos in 0..n {
            let row = &mut q[(h * n + pos) * d..(h * n + pos + 1) * d];
            row[0] += 1.0 + h as f32 * 0.5;
            let phase = pos as f32 * 0.05;
            row[2] += 2.0 * phase.cos();
            row[3] += 2.0 * phase.sin();
        }
    }
    (q, k, v)
}

const SHAPE: AttnShape = AttnShape {
    q_heads: 4,
    kv_heads: 2,
    seq_len: 300,
    head_dim: 16,
};
const CFG: StatsConfig = StatsConfig {
    block_q: 16,
    block_k: 16,
    last_q: 16,
    tail_q: 48,
};

fn sample_stats(seed: u64, seq_len: usize) -> Vec<HeadStats> {
    let shape = AttnShape { seq_len, ..SHAPE };
    let (q, k, v) = structured(shape, seed);
    let input = AttentionInput::new(shape, &q, &k, &v).unwrap();
    layer_stats_scored(&input, &CFG, &dynamic_candidates()).unwrap()
}

/// The dynamic candidates the profiles score (query-adaptive and token-select, as `attnplan
/// profile` does by default, plus grid at a stride the structured inputs do not have).
fn dynamic_candidates() -> Vec<schemas::Pattern> {
    let mut c = dynamic::default_candidates(CFG.block_k as u32);
    c.extend(dynamic::grid_candidates(37, 5, CFG.block_k as u32));
    c
}

fn model_info() -> schemas::ModelInfo {
    schemas::ModelInfo {
        name: Some("synthetic".into()),
        architecture: "llama".into(),
        layers: 2,
        query_heads: SHAPE.q_heads as u32,
        kv_heads: SHAPE.kv_heads as u32,
        head_dim: SHAPE.head_dim as u32,
        rope_theta: 1e4,
        max_context: 4096,
        fingerprint: format!("sha256:{}", "7".repeat(64)),
    }
}

/// A two-layer profile of `samples` samples at `seq_len`, ids prefixed by `tag`.
fn profile(tag: &str, seeds: &[u64], seq_len: usize) -> Profile {
    let mut p = Profile::new(ProfileMeta {
        format: PROFILE_FORMAT.into(),
        version: PROFILE_VERSION,
        tool: format!("attnplan {}", env!("CARGO_PKG_VERSION")),
        model: model_info(),
        data: "synthetic:structured".into(),
        seq_len: seq_len as u64,
        block_q: CFG.block_q as u32,
        block_k: CFG.block_k as u32,
        last_q: CFG.last_q as u32,
        samples: seeds.len() as u64,
        sample_ids: seeds.iter().map(|s| format!("{tag}:{s}")).collect(),
        layers: vec![0, 1],
        dynamic: dynamic_candidates(),
        tail_q: CFG.tail_q as u32,
        periods: None,
    });
    for (k, &seed) in seeds.iter().enumerate() {
        for layer in 0..2 {
            p.put_sample_stats(k, layer, &sample_stats(seed * 10 + layer as u64, seq_len))
                .unwrap();
        }
    }
    p
}

#[test]
fn constant_time_read_outs_equal_the_statistics() {
    let stats = sample_stats(3, SHAPE.seq_len);
    for s in stats {
        let t = HeadTables::new(s.clone());
        let budgets: Vec<usize> = s
            .edges
            .iter()
            .map(|&e| e as usize)
            .chain([s.max_len])
            .collect();
        for &a in &budgets {
            for &b in &budgets {
                let (x, y) = (t.vertical_slash(a, b), s.recall_vertical_slash(a, b));
                assert!(
                    (x.recall - y.recall).abs() < 1e-12 && (x.density - y.density).abs() < 1e-12
                );
                let (x, y) = (t.a_shape(a, b), s.recall_a_shape(a, b));
                assert!(
                    (x.recall - y.recall).abs() < 1e-12 && (x.density - y.density).abs() < 1e-12
                );
            }
        }
    }
}

#[test]
fn the_choice_is_the_cheapest_candidate_at_target() {
    let per_sample: Vec<HeadStats> = [1u64, 2, 3]
        .iter()
        .map(|&s| sample_stats(s, 300).remove(1))
        .collect();
    let head = HeadSamples::new(per_sample).unwrap();
    let scored: Vec<Scored> = head
        .candidates()
        .into_iter()
        .map(|c| head.score(c))
        .collect();
    for objective in [Objective::Mean, Objective::Worst] {
        let goal = Goal {
            target_recall: 0.9,
            tail_recall: None,
            flops_budget: None,
            objective,
            local_floor: None,
        };
        let pick = choose(&scored, &goal);
        assert!(goal.objective.of(&pick) >= 0.9);
        let cheaper = scored
            .iter()
            .filter(|s| s.density < pick.density && goal.objective.of(s) >= 0.9)
            .count();
        assert_eq!(cheaper, 0, "{pick:?}");
        assert!(pick.worst <= pick.recall + 1e-12);
    }
    // An unreachable target gives dense.
    let goal = Goal {
        target_recall: 1.0 + 1e-6,
        tail_recall: None,
        flops_budget: None,
        objective: Objective::Mean,
        local_floor: None,
    };
    assert_eq!(choose(&scored, &goal).candidate, Candidate::Dense);
}

/// With a target on the last rows, the choice is the cheapest candidate that reaches both targets;
/// the tail read-outs are the tail statistics' own (summed over samples, and the worst sample).
#[test]
fn a_tail_target_holds_the_last_rows_too() {
    let per_sample: Vec<HeadStats> = [1u64, 2, 3]
        .iter()
        .map(|&s| sample_stats(s, 300).remove(1))
        .collect();
    let tails: Vec<HeadStats> = per_sample
        .iter()
        .map(|s| *s.tail.clone().unwrap())
        .collect();
    let head = HeadSamples::new(per_sample).unwrap();
    let scored: Vec<Scored> = head
        .candidates()
        .into_iter()
        .map(|c| head.score(c))
        .collect();
    let mut tail_sum = tails[0].clone();
    for t in &tails[1..] {
        tail_sum.merge(t).unwrap();
    }
    let c = Candidate::VerticalSlash {
        vertical: 16,
        slash: 32,
    };
    let s = head.score(c);
    let want = tail_sum.recall_vertical_slash(16, 32).recall;
    assert!((s.tail.unwrap() - want).abs() < 1e-12, "{s:?} vs {want}");
    let worst = tails
        .iter()
        .map(|t| t.recall_vertical_slash(16, 32).recall)
        .fold(f64::INFINITY, f64::min);
    assert!((s.tail_worst.unwrap() - worst).abs() < 1e-12);
    for objective in [Objective::Mean, Objective::Worst] {
        let plain = Goal {
            target_recall: 0.9,
            tail_recall: None,
            flops_budget: None,
            objective,
            local_floor: None,
        };
        let both = Goal {
            tail_recall: Some(0.99),
            ..plain
        };
        let pick = choose(&scored, &both);
        assert!(objective.of(&pick) >= 0.9 && objective.of_tail(&pick).unwrap() >= 0.99);
        let cheaper = scored
            .iter()
            .filter(|s| s.density < pick.density && both.reaches(s))
            .count();
        assert_eq!(cheaper, 0, "{pick:?}");
        // The tail target can only cost cells.
        assert!(pick.density >= choose(&scored, &plain).density);
    }
}

fn attnplan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attnplan"))
        .args(args)
        .output()
        .expect("run attnplan")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, name: &str, p: &Profile) -> PathBuf {
    let path = dir.join(name);
    p.write(&path).unwrap();
    path
}

#[test]
fn calibrate_from_profiles_writes_a_valid_deterministic_plan_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let short = write(
        dir.path(),
        "a.safetensors",
        &profile("cal", &[1, 2, 3], 200),
    );
    let long = write(dir.path(), "b.safetensors", &profile("cal", &[4, 5], 300));
    let held_s = write(dir.path(), "hs.safetensors", &profile("held", &[7], 200));
    let held_l = write(dir.path(), "hl.safetensors", &profile("held", &[8], 300));
    let plan1 = dir.path().join("plan1.yaml");
    let plan2 = dir.path().join("plan2.yaml");
    let report = dir.path().join("report.json");
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    for (plan, rep) in [(&plan1, true), (&plan2, false)] {
        let mut args = vec![
            "calibrate".to_string(),
            "--profile".into(),
            s(&long),
            "--profile".into(),
            s(&short),
            "--heldout".into(),
            s(&held_s),
            "--heldout".into(),
            s(&held_l),
            "--target-recall".into(),
            "0.9".into(),
            "--tolerance".into(),
            "0.2".into(),
            "--out".into(),
            s(plan),
        ];
        if rep {
            args.extend(["--report".into(), s(&report)]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = attnplan(&refs);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    let yaml = std::fs::read_to_string(&plan1).unwrap();
    assert_eq!(
        yaml,
        std::fs::read_to_string(&plan2).unwrap(),
        "not deterministic"
    );
    let plan = schemas::Plan::read(&plan1).unwrap();
    assert_eq!(plan.provenance.seq_lens, [200, 300]);
    assert_eq!(plan.provenance.samples, 5);
    assert_eq!(plan.provenance.heldout_samples, 2);
    for (_, h) in plan.heads() {
        assert!(h.recall.unwrap() >= 0.9 - 1e-9, "{h:?}");
        assert!(h.validated_recall.is_some());
        // Two lengths: budgets per length bucket, except for dynamic candidates (query-adaptive,
        // token-select, grid), whose parameters are one candidate of the profiles' list at every
        // length.
        let dynamic = dynamic_candidates();
        if dynamic.contains(&h.pattern) {
            continue;
        }
        for (_, b) in h.pattern.budgets() {
            assert!(matches!(b, schemas::Budget::Buckets(_)), "{h:?}");
        }
    }
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["summary"]["heads"], 8);
    assert_eq!(r["summary"]["per_length"].as_array().unwrap().len(), 2);
    assert!(r["heads"][0]["minference"].is_array());
    let out = attnplan(&["validate", plan1.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
}

/// Runs `attnplan calibrate --profile cal EXTRA --out DIR/NAME.yaml --report DIR/NAME.json`, which must
/// succeed, and returns the report and the plan.
fn calibrate_run(
    dir: &Path,
    cal: &Path,
    extra: &[&str],
    name: &str,
) -> (serde_json::Value, schemas::Plan) {
    let (plan, report) = (
        dir.join(format!("{name}.yaml")),
        dir.join(format!("{name}.json")),
    );
    let mut args = vec!["calibrate", "--profile", cal.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend(["--out", plan.to_str().unwrap()]);
    args.extend(["--report", report.to_str().unwrap()]);
    let out = attnplan(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (r, schemas::Plan::read(&plan).unwrap())
}

/// A FLOPs budget is spent on the whole plan: the highest common target whose plan fits, which is
/// the plan `--target-recall` gives at that target; a larger budget buys a higher target.
#[test]
fn a_flops_budget_buys_the_highest_common_target_that_fits() {
    let dir = tempfile::tempdir().unwrap();
    let cal = write(
        dir.path(),
        "c.safetensors",
        &profile("cal", &[1, 2, 3], 300),
    );
    let run = |extra: &[&str], name: &str| {
        let mut args = vec!["--local-floor", "0"];
        args.extend_from_slice(extra);
        let (r, plan) = calibrate_run(dir.path(), &cal, &args, name);
        (r["summary"].clone(), plan)
    };
    let mut targets = Vec::new();
    for budget in [0.3, 0.6] {
        let (summary, plan) = run(&["--flops-budget", &budget.to_string()], "b");
        let cells = summary["per_length"][0]["flops_fraction"].as_f64().unwrap();
        let target = summary["target_recall"].as_f64().unwrap();
        assert!(cells <= budget + 1e-9, "{budget}: {summary}");
        assert!((0.0..=1.0).contains(&target), "{summary}");
        assert_eq!(summary["flops_budget"], budget);
        // The same heads as asking for that target directly.
        let (direct, direct_plan) = run(&["--target-recall", &target.to_string()], "t");
        assert_eq!(
            direct["per_length"][0]["flops_fraction"].as_f64(),
            Some(cells)
        );
        let kinds = |p: &schemas::Plan| -> Vec<String> {
            p.heads()
                .map(|(_, h)| h.pattern.kind().to_string())
                .collect()
        };
        assert_eq!(kinds(&plan), kinds(&direct_plan));
        targets.push(target);
    }
    assert!(targets[1] > targets[0], "{targets:?}");
    // A budget below what the local floor alone computes is refused, saying why.
    let out = attnplan(&[
        "calibrate",
        "--profile",
        cal.to_str().unwrap(),
        "--flops-budget",
        "0.3",
        "--local-floor",
        "128",
        "--out",
        dir.path().join("never.yaml").to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("--flops-budget 0.3: the cheapest plan computes")
            && err.contains("local floor of 128 tokens"),
        "{err}"
    );
    assert!(!dir.path().join("never.yaml").exists());
}

#[test]
fn heads_missing_the_target_on_heldout_data_refuse_the_plan_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let cal = write(dir.path(), "c.safetensors", &profile("cal", &[1], 300));
    // Held-out samples from another structure: a different seed family.
    let held = write(dir.path(), "h.safetensors", &profile("held", &[900], 300));
    let plan = dir.path().join("plan.yaml");
    let args = |force: bool| {
        let mut a = vec![
            "calibrate",
            "--profile",
            cal.to_str().unwrap(),
            "--heldout",
            held.to_str().unwrap(),
            "--target-recall",
            "0.999",
            "--objective",
            "mean",
            "--tolerance",
            "0",
            "--no-dense-fallback",
            "--out",
            plan.to_str().unwrap(),
        ];
        if force {
            a.push("--force");
        }
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let out = attnplan(&args(false).iter().map(String::as_str).collect::<Vec<_>>());
    let err = text(&out.stderr);
    if out.status.code() == Some(1) {
        assert!(err.contains("miss the target"), "{err}");
        assert!(!plan.exists(), "a refused plan was written");
        let out = attnplan(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(plan.exists());
    } else {
        // Every head generalized: then the plan must be there and valid.
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(schemas::Plan::read(&plan).is_ok());
    }
}

#[test]
fn heads_missing_the_target_on_heldout_data_run_dense_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let cal = write(dir.path(), "c.safetensors", &profile("cal", &[1], 300));
    let held = write(dir.path(), "h.safetensors", &profile("held", &[900], 300));
    let plan = dir.path().join("plan.yaml");
    let out = attnplan(&[
        "calibrate",
        "--profile",
        cal.to_str().unwrap(),
        "--heldout",
        held.to_str().unwrap(),
        "--target-recall",
        "0.999",
        "--objective",
        "mean",
        "--tolerance",
        "0",
        "--out",
        plan.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let p = schemas::Plan::read(&plan).unwrap();
    // Every head meets the target on held-out data in the written plan.
    for (_, h) in p.heads() {
        assert!(h.validated_recall.unwrap() >= 0.999 - 1e-9, "{h:?}");
    }
    if err.contains("run dense") {
        assert!(p.heads().any(|(_, h)| h.pattern.kind() == "dense"));
    }
}

/// `--tail-recall`: every head's recall of the last rows reaches it in the calibration and, after
/// the dense fallback, on held-out data; the report carries the figures.
#[test]
fn a_tail_target_is_met_in_the_written_plan() {
    let dir = tempfile::tempdir().unwrap();
    let cal = write(dir.path(), "c.safetensors", &profile("cal", &[1, 2], 300));
    let held = write(dir.path(), "h.safetensors", &profile("held", &[900], 300));
    let (plan, report) = (dir.path().join("plan.yaml"), dir.path().join("r.json"));
    let out = attnplan(&[
        "calibrate",
        "--profile",
        cal.to_str().unwrap(),
        "--heldout",
        held.to_str().unwrap(),
        "--target-recall",
        "0.9",
        "--tail-recall",
        "0.995",
        "--tolerance",
        "0",
        "--out",
        plan.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("last rows 0.995"), "{err}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["summary"]["tail_recall"], 0.995);
    let tail = &r["summary"]["per_length"][0]["tail"];
    assert!(
        tail["worst_recall"].as_f64().unwrap() >= 0.995 - 1e-9,
        "{tail}"
    );
    assert!(
        tail["min_heldout_recall"].as_f64().unwrap() >= 0.995 - 1e-9,
        "{tail}"
    );
    for h in r["heads"].as_array().unwrap() {
        let c = &h["chosen"][0];
        assert!(c["tail_worst"].as_f64().unwrap() >= 0.995 - 1e-9, "{c}");
    }
}

#[test]
fn bad_calibration_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "g.safetensors", &profile("cal", &[1], 200));
    let mut foreign = profile("cal", &[2], 300);
    foreign.meta.tool = "attnplan 0.0.1".into();
    let foreign = write(dir.path(), "f.safetensors", &foreign);
    let mut other_model = profile("other", &[3], 300);
    other_model.meta.model.fingerprint = format!("sha256:{}", "8".repeat(64));
    let other_model = write(dir.path(), "o.safetensors", &other_model);
    let dup = write(dir.path(), "d.safetensors", &profile("cal", &[1], 200));
    let mut fewer = profile("held", &[4], 200);
    fewer.meta.dynamic.truncate(3);
    let fewer = write(dir.path(), "n.safetensors", &fewer);
    let mut no_tail = profile("cal", &[5], 200);
    no_tail.meta.tail_q = 0;
    no_tail.tensors.retain(|name, _| !name.contains(".tail."));
    let no_tail = write(dir.path(), "t.safetensors", &no_tail);
    let out_plan = dir.path().join("p.yaml");
    let g = good.to_str().unwrap();
    let o = out_plan.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--profile", g, "--target-recall", "0"],
            "--target-recall",
        ),
        (
            vec!["--profile", g, "--target-recall", "1.5"],
            "--target-recall",
        ),
        (
            vec!["--profile", g, "--flops-budget", "0"],
            "--flops-budget",
        ),
        (
            vec!["--profile", g, "--model", "m.gguf"],
            "does not combine",
        ),
        (vec!["--heldout", g], "--heldout needs --profile"),
        (
            vec!["--profile", foreign.to_str().unwrap()],
            "f.safetensors: tool",
        ),
        (
            vec!["--profile", g, "--profile", other_model.to_str().unwrap()],
            "o.safetensors: model.fingerprint",
        ),
        (
            vec!["--profile", g, "--heldout", dup.to_str().unwrap()],
            "d.safetensors: sample_ids",
        ),
        (
            vec!["--profile", "/nonexistent.safetensors"],
            "/nonexistent.safetensors",
        ),
        (
            vec!["--profile", g, "--heldout", fewer.to_str().unwrap()],
            "n.safetensors: dynamic",
        ),
        (vec!["--profile", g, "--no-dynamic"], "does not combine"),
        (
            vec!["--profile", g, "--tail-recall", "1.5"],
            "--tail-recall 1.5 is outside",
        ),
        (
            vec![
                "--profile",
                g,
                "--tail-recall",
                "0.9",
                "--flops-budget",
                "0.5",
            ],
            "does not combine",
        ),
        (
            vec![
                "--profile",
                no_tail.to_str().unwrap(),
                "--tail-recall",
                "0.9",
            ],
            "t.safetensors: tail_q",
        ),
        (
            vec!["--profile", g, "--heldout", no_tail.to_str().unwrap()],
            "t.safetensors: tail_q",
        ),
        (vec!["--profile", g, "--grid", "196"], "does not combine"),
        (vec!["--grid", "1:0"], "stride must be at least 2"),
        (vec!["--grid", "x"], "--grid x: stride"),
        (
            vec!["--profile", g, "--periods", "find"],
            "does not combine",
        ),
        (vec!["--periods", "always"], "invalid value 'always'"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["calibrate"];
        all.extend(&args);
        all.extend(["--out", o]);
        let out = attnplan(&all);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out_plan.exists());
    }
}

#[test]
fn one_shot_calibration_on_smollm2_gives_a_plan_the_model_accepts() {
    let model = profiler::model::default_model_path();
    assert!(
        model.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        model.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.yaml");
    let out = attnplan(&[
        "calibrate",
        "--seq-len",
        "256",
        "--samples",
        "2",
        "--heldout-samples",
        "1",
        "--target-recall",
        "0.9",
        "--tolerance",
        "0.1",
        "--force",
        // the default floor (128 tokens) would make these 256-token samples nearly dense
        "--local-floor",
        "32",
        "--out",
        plan.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    // The one-shot form looks for periods in its first sample by default and says what it found.
    assert!(err.contains("periods      sample passkey:"), "{err}");
    let out = attnplan(&[
        "validate",
        plan.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let p = schemas::Plan::read(&plan).unwrap();
    assert_eq!(p.heads().count(), 270);
    // Default data: the three synthetic tasks, 2 calibration + 1 held-out sample each.
    assert_eq!(p.provenance.samples, 6);
    assert_eq!(p.provenance.heldout_samples, 3);
    assert_eq!(
        p.provenance.data,
        "synthetic:passkey + synthetic:kv-retrieval + synthetic:needle"
    );
    // The plan runs in the model's prefill: `eval` reports both sides, with the answer tokens' own
    // rows dense (decoding) by default and under the plan with --sparse-answer-rows.
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--plan",
            plan.to_str().unwrap(),
            "--data",
            "synthetic:passkey",
            "--seq-len",
            "512",
            "--samples",
            "1",
            "--json",
        ];
        args.extend(extra);
        attnplan(&args)
    };
    for (flag, rows) in [(None, "dense"), (Some("--sparse-answer-rows"), "sparse")] {
        let mut extra = vec!["--no-head-recall"];
        extra.extend(flag);
        let out = eval(&extra);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["answer_rows"], rows);
        assert_eq!(r["dense"]["accuracy"]["synthetic:passkey"][1], 1);
        assert_eq!(r["sparse"]["accuracy"]["synthetic:passkey"][1], 1);
        let cells = r["flops_fraction"].as_f64().unwrap();
        assert!(cells > 0.0 && cells < 1.0, "{cells}");
        assert!(r["perplexity_change"].as_f64().unwrap().is_finite());
        assert_eq!(r["device"], "cpu");
    }
    // The plan's attention on the GPU: runs where there is one (and the binary has the feature),
    // else exits 2 saying which is missing.
    let out = eval(&["--device", "cuda"]);
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    match out.status.code() {
        Some(0) => {
            let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(r["device"], "cuda");
            let recall = r["gpu"]["min_head_recall"].as_f64().unwrap();
            assert!(recall > 0.5 && recall <= 1.0 + 1e-9, "{recall}");
            assert_eq!(r["sparse"]["accuracy"]["synthetic:passkey"][1], 1);
        }
        Some(2) if err.contains("built without the `cuda` feature") => {
            println!("skipped the GPU eval: attnplan built without the `cuda` feature");
        }
        Some(2) if err.contains("no usable CUDA device") => {
            println!("skipped the GPU eval: {}", err.trim());
        }
        code => panic!("exit {code:?}: {err}"),
    }
}

/// A head whose choice is a dynamic candidate gets that candidate's pattern in the plan, the same
/// at every length.
#[test]
fn a_dynamic_choice_is_emitted_as_its_pattern() {
    let dynamic = dynamic_candidates();
    let pick = |index| Scored {
        candidate: Candidate::Dynamic { index },
        recall: 0.99,
        worst: 0.98,
        density: 0.3,
        tail: None,
        tail_worst: None,
    };
    let head = calibrate::calibration::HeadResult {
        layer: 0,
        head: 0,
        chosen: vec![pick(7), pick(7)],
        heldout: None,
        heldout_tail: None,
        minference: Vec::new(),
        minference_default: Vec::new(),
    };
    let pattern = calibrate::emit::pattern_of(&head, &[200, 300], &dynamic);
    assert_eq!(pattern, dynamic[7]);
    assert_eq!(head.chosen[0].candidate.kind(&dynamic), dynamic[7].kind());
}

/// Token-select's predicted density is its kept share of each chunk plus sink and local, falling
/// towards the share at long lengths; coverage rules keep their calibrated density.
#[test]
fn token_select_and_streaming_densities_are_predicted_from_budgets() {
    use schemas::{Budget, Pattern, TokenSelect};
    let ts = |spread| {
        Pattern::TokenSelect(TokenSelect {
            block: 64,
            keep: Budget::Fixed(8),
            spread,
            sink: Budget::Fixed(64),
            local: Budget::Fixed(512),
        })
    };
    let at = |n| calibrate::emit::predicted_density(&ts(0.0), 0.5, n, 64);
    assert!(at(8192) > at(131_072) && at(131_072) > 0.125);
    assert!((at(1 << 30) - 0.125).abs() < 1e-3, "{}", at(1 << 30));
    // With a spread the share is the mean count over the chunks: 2^round(3 + Z) for Z standard
    // normal, clamped to [1, 64], has mean Σ_k 2^clamp(3 + k) P(round(Z) = k) ≈ 10.36 of 64 tokens.
    let spread = calibrate::emit::predicted_density(&ts(1.0), 0.5, 1 << 30, 64);
    assert!((spread - 0.1619).abs() < 2e-3, "{spread}");
    let qa = dynamic_candidates()[0].clone();
    assert_eq!(
        calibrate::emit::predicted_density(&qa, 0.42, 131_072, 64),
        0.42
    );
    // Streaming is counted exactly at tile granularity: with sink 64 and recent 1 at 1,024 tokens,
    // query block 0 computes its diagonal tile (64·65/2 cells) and each of the other 15 the full
    // sink tile plus its diagonal tile.
    let streaming = |recent| {
        Pattern::Streaming(schemas::Streaming {
            sink: Budget::Fixed(64),
            recent: Budget::Fixed(recent),
        })
    };
    let d = calibrate::emit::predicted_density(&streaming(1), 1.0, 1024, 64);
    let want = (2080.0 + 15.0 * (4096.0 + 2080.0)) / (1024.0 * 1025.0 / 2.0);
    assert!((d - want).abs() < 1e-12, "{d} vs {want}");
    assert_eq!(
        calibrate::emit::predicted_density(&streaming(1024), 1.0, 1024, 64),
        1.0
    );
}

/// Under a local floor no head computes fewer cells than the floor's A-shape (64 sink, L local
/// tokens), the plan says so, and a floor costs cells; `--local-floor 0` turns it off.
#[test]
fn a_local_floor_keeps_every_head_at_least_its_a_shape() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = [1u64, 2, 3];
    let p = profile("cal", &seeds, 300);
    let cal = write(dir.path(), "c.safetensors", &p);
    let run = |extra: &[&str], name: &str| calibrate_run(dir.path(), &cal, extra, name);
    let (plain, plain_plan) = run(&["--target-recall", "0.9", "--local-floor", "0"], "plain");
    let plain_objective = plain_plan.provenance.objective.clone().unwrap_or_default();
    assert!(!plain_objective.contains("A-shape"), "{plain_objective}");
    let (floored, plan) = run(&["--target-recall", "0.9", "--local-floor", "96"], "floor");
    let objective = plan.provenance.objective.clone().unwrap_or_default();
    assert!(
        objective.contains("A-shape with 64 sink and 96 local tokens"),
        "{objective}"
    );
    let mut raised = 0;
    for (h, f) in plain["heads"]
        .as_array()
        .unwrap()
        .iter()
        .zip(floored["heads"].as_array().unwrap())
    {
        let (layer, head) = (
            f["layer"].as_u64().unwrap() as usize,
            f["head"].as_u64().unwrap() as usize,
        );
        let per_sample = p
            .per_sample_stats(Path::new("c.safetensors"), layer, head)
            .unwrap();
        let floor = HeadSamples::new(per_sample).unwrap().floor_density(96);
        let density = f["chosen"][0]["density"].as_f64().unwrap();
        assert!(density >= floor - 1e-12, "{f} below {floor}");
        let before = h["chosen"][0]["density"].as_f64().unwrap();
        assert!(density >= before - 1e-12, "{f} vs {h}");
        if density > before + 1e-12 {
            raised += 1;
        }
    }
    assert!(raised > 0, "the floor changed no head");
    let (_, default_plan) = run(&["--target-recall", "0.9"], "default");
    let default_objective = default_plan.provenance.objective.unwrap_or_default();
    let want = format!(
        "A-shape with 64 sink and {} local tokens",
        calibrate::search::DEFAULT_LOCAL_FLOOR
    );
    assert!(default_objective.contains(&want), "{default_objective}");
}
