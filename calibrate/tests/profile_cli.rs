//! `attnplan profile` and `attnplan merge` on the real SmolLM2 (fetched by scripts/fetch-model.sh),
//! at lengths small enough for CI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use profiler::profile::Profile;

fn attnplan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attnplan"))
        .args(args)
        .output()
        .expect("run attnplan")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn need_model() {
    let model = profiler::model::default_model_path();
    assert!(
        model.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        model.display()
    );
}

#[test]
fn profile_writes_statistics_and_heat_maps_and_merge_joins_samples() {
    need_model();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    let heat = dir.path().join("heat");
    let out = attnplan(&[
        "profile",
        "--seq-len",
        "192",
        "--samples",
        "1",
        "--seed",
        "1",
        "--out",
        a.to_str().unwrap(),
        "--heatmaps",
        heat.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = attnplan(&[
        "profile",
        "--data",
        "synthetic:kv-retrieval",
        "--seq-len",
        "192",
        "--samples",
        "2",
        "--seed",
        "2",
        "--out",
        b.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let pngs = std::fs::read_dir(&heat).unwrap().count();
    assert_eq!(pngs, 270, "one heat map per head");
    let png = std::fs::read(heat.join("L00_H0.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // Different data sources merge into one calibration set that names both.
    let mixed = dir.path().join("mixed.safetensors");
    let out = attnplan(&[
        "merge",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "-o",
        mixed.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mx = Profile::read(&mixed).unwrap();
    assert_eq!(mx.meta.data, "synthetic:passkey + synthetic:kv-retrieval");
    // `profile` looks for periods only when asked.
    assert_eq!(mx.meta.periods, None);
    assert_eq!(mx.meta.samples, 3);
    // Merging a profile into one that already holds its samples is refused.
    let merged = dir.path().join("m.safetensors");
    let out = attnplan(&[
        "merge",
        mixed.to_str().unwrap(),
        b.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("b.safetensors: sample_ids"));
    assert!(!merged.exists());

    // Same source, other samples: merged by addition.
    let c = dir.path().join("c.safetensors");
    let out = attnplan(&[
        "profile",
        "--seq-len",
        "192",
        "--samples",
        "1",
        "--seed",
        "3",
        "--out",
        c.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = attnplan(&[
        "merge",
        a.to_str().unwrap(),
        c.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let m = Profile::read(&merged).unwrap();
    assert_eq!(m.meta.samples, 2);
    let pa = Profile::read(&a).unwrap();
    let pc = Profile::read(&c).unwrap();
    // The merged statistics of a head equal the sum of the two.
    let mut sum = pa.head_stats(&a, 5, 3).unwrap();
    sum.merge(&pc.head_stats(&c, 5, 3).unwrap()).unwrap();
    assert_eq!(m.head_stats(&merged, 5, 3).unwrap(), sum);
    // Every head of every layer is there, with rows = samples * seq_len.
    for l in 0..30 {
        for h in 0..9 {
            let s = m.head_stats(&merged, l, h).unwrap();
            assert_eq!(s.rows, 2 * 192);
            assert!(
                (s.heat_map()
                    .iter()
                    .map(|r| r.iter().sum::<f64>())
                    .sum::<f64>()
                    - 3.0)
                    .abs()
                    < 1e-6,
                "each of the 3 query blocks' rows sums to 1"
            );
        }
    }
}

/// Two paragraphs repeated: 195 SmolLM2 tokens between one copy of a token and the next.
const PARAGRAPHS: &str = "A caravan left the northern oasis at dawn, carrying salt, copper ingots and \
bolts of indigo cloth. The guide, an old woman named Tessaly, read the dunes the way sailors read the \
sea: by the wind's signature on their crests. On the third day a storm rose from the west, and the \
camels knelt with their backs to it while the drivers wrapped their faces. When the air cleared, the \
road markers were gone, buried under a new ridge of sand.
Tessaly climbed the ridge alone. From the top she counted the shadows of the far hills, measured the \
angle of the sun against her outstretched hand, and pointed south-east without a word. The drivers \
grumbled, because the wells they knew lay to the east, but nobody argued with the woman who had \
crossed this desert forty times. Two days later they reached a well none of them had seen before, its \
stones cool and its water sweet.
";

/// Heads that copy from the previous repetition attend with the text's period: `--periods find`
/// reports it, scores grid candidates at it, and the sample's statistics hold their columns.
#[test]
fn a_repeated_text_has_a_period_and_gets_grid_candidates() {
    need_model();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("repeated.txt");
    std::fs::write(&data, PARAGRAPHS.repeat(12)).unwrap();
    let out_path = dir.path().join("p.safetensors");
    let out = attnplan(&[
        "profile",
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "1024",
        "--samples",
        "1",
        "--periods",
        "find",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let p = Profile::read(&out_path).unwrap();
    let report = p.meta.periods.as_ref().expect("a period report");
    assert_eq!(report.heads, 270);
    let searched: Vec<_> = report.found.iter().filter(|f| f.searched).collect();
    assert!(!searched.is_empty(), "{report:?}");
    for f in &searched {
        // The copy distance, give or take the token where a paragraph break tokenizes differently.
        assert!((193..=197).contains(&f.stride), "{report:?}");
        assert!(
            err.contains(&format!("--grid {}:{}", f.stride, f.phase)),
            "{err}"
        );
        let grids = p
            .meta
            .dynamic
            .iter()
            .filter(|c| matches!(c, schemas::Pattern::Grid(g) if g.stride == f.stride && g.phase == f.phase))
            .count();
        assert_eq!(grids, 9, "3 widths x 3 local windows");
    }
    // The sample was profiled again with the grid candidates: every head has a score for each.
    let stats = p.head_stats(&out_path, 12, 4).unwrap();
    assert_eq!(stats.dynamic.mass.len(), p.meta.dynamic.len());
}

#[test]
fn profile_refuses_bad_requests_clearly() {
    need_model();
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("p.safetensors");
    let o = out_path.to_str().unwrap();
    let missing_data = dir.path().join("missing.txt");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--seq-len", "9000"], "beyond"),
        (vec!["--seq-len", "4"], "too short"),
        (vec!["--samples", "0"], "--samples"),
        (vec!["--block", "48"], "--block"),
        (
            vec!["--data", missing_data.to_str().unwrap()],
            "missing.txt",
        ),
        (vec!["--data", empty.to_str().unwrap()], "empty.txt"),
        (vec!["--data", "synthetic:nonsense"], "nonsense"),
        (
            vec!["--model", "/nonexistent/model.gguf"],
            "/nonexistent/model.gguf",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["profile", "--out", o];
        all.extend(&args);
        let out = attnplan(&all);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out_path.exists(), "partial output left behind");
    }
}
