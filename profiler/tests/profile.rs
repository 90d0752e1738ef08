//! Profile files: round trip, merge rules, and refusal of foreign or corrupt files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use profiler::profile::*;

fn meta(ids: &[&str], layers: &[u32]) -> ProfileMeta {
    ProfileMeta {
        format: PROFILE_FORMAT.into(),
        version: PROFILE_VERSION,
        tool: "attnplan 0.1.0".into(),
        model: schemas::ModelInfo {
            name: None,
            architecture: "llama".into(),
            layers: 2,
            query_heads: 2,
            kv_heads: 1,
            head_dim: 8,
            rope_theta: 1e4,
            max_context: 4096,
            fingerprint: format!("sha256:{}", "1".repeat(64)),
        },
        data: "synthetic:passkey".into(),
        seq_len: 256,
        block_q: 64,
        block_k: 64,
        last_q: 64,
        samples: ids.len() as u64,
        sample_ids: ids.iter().map(|s| s.to_string()).collect(),
        layers: layers.to_vec(),
        dynamic: Vec::new(),
        tail_q: 256,
        periods: None,
    }
}

fn profile(ids: &[&str], layers: &[u32], value: f64) -> Profile {
    let mut p = Profile::new(meta(ids, layers));
    for &l in layers {
        for h in 0..2 {
            p.accumulate(&Profile::key(l as usize, h, "heat"), &[2, 3], &[value; 6])
                .unwrap();
        }
    }
    p
}

#[test]
fn write_read_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    let mut p = profile(&["s0"], &[0, 1], 0.1);
    p.accumulate("L0.H0.curve", &[4], &[1.0 / 3.0, 2.5e-300, 0.0, 7.0])
        .unwrap();
    p.write(&path).unwrap();
    assert_eq!(Profile::read(&path).unwrap(), p);
}

#[test]
fn samples_merge_by_addition_and_layer_ranges_by_union() {
    let p = Path::new("b.safetensors");
    let mut a = profile(&["s0"], &[0, 1], 1.0);
    a.merge(&profile(&["s1", "s2"], &[0, 1], 2.0), p).unwrap();
    assert_eq!(a.meta.samples, 3);
    assert_eq!(a.meta.sample_ids, ["s0", "s1", "s2"]);
    assert_eq!(a.tensors["L1.H1.heat"].data, vec![3.0; 6]);

    let mut low = profile(&["s0"], &[0], 1.0);
    low.merge(&profile(&["s0"], &[1], 5.0), p).unwrap();
    assert_eq!(low.meta.samples, 1);
    assert_eq!(low.meta.layers, [0, 1]);
    assert_eq!(low.tensors["L0.H0.heat"].data, vec![1.0; 6]);
    assert_eq!(low.tensors["L1.H0.heat"].data, vec![5.0; 6]);
}

#[test]
fn merge_refuses_double_counting_and_foreign_profiles() {
    let p = Path::new("other.safetensors");
    let mut a = profile(&["s0"], &[0, 1], 1.0);
    let err = a.merge(&profile(&["s0"], &[0, 1], 1.0), p).unwrap_err();
    assert!(
        err.to_string().contains("other.safetensors: sample_ids"),
        "{err}"
    );
    for (field, tweak) in [
        ("model.fingerprint", 0),
        ("seq_len", 1),
        ("tool", 2),
        ("block_k", 3),
        ("tail_q", 4),
    ] {
        let mut b = profile(&["s9"], &[0, 1], 1.0);
        match tweak {
            0 => b.meta.model.fingerprint = format!("sha256:{}", "2".repeat(64)),
            1 => b.meta.seq_len = 512,
            2 => b.meta.tool = "attnplan 9.9.9".into(),
            3 => b.meta.block_k = 32,
            _ => b.meta.tail_q = 128,
        }
        let err = a.merge(&b, p).unwrap_err().to_string();
        assert!(
            err.contains(&format!("other.safetensors: {field}:")),
            "{err}"
        );
    }
    let mut b = profile(&["s9"], &[0, 1], 1.0);
    b.tensors.get_mut("L0.H0.heat").unwrap().shape = vec![3, 2];
    let err = a.merge(&b, p).unwrap_err().to_string();
    assert!(err.contains("L0.H0.heat"), "{err}");
}

#[test]
fn corrupt_and_foreign_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = profile(&["s0"], &[0], 1.0).to_bytes().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "(header)"),
        (
            "truncated",
            good[..good.len() - 5].to_vec(),
            "not fully covered",
        ),
        (
            "garbage",
            b"hello world, not a profile".to_vec(),
            "(header)",
        ),
        (
            "plain-safetensors",
            safetensors::serialize(
                Vec::<(String, safetensors::tensor::TensorView)>::new(),
                None,
            )
            .unwrap(),
            "__metadata__.attnplan",
        ),
    ];
    for (name, bytes, field) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let err = Profile::read(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(field), "{name}: {err}");
    }
    let mut bad = profile(&["s0"], &[0], 1.0);
    bad.meta.version = 99;
    let path = dir.path().join("v99");
    std::fs::write(&path, bad.to_bytes().unwrap()).unwrap();
    let err = Profile::read(&path).unwrap_err().to_string();
    assert!(err.contains("version: 99"), "{err}");
}

/// Statistics with dynamic candidate scores survive the file: per-sample read-back equals what was
/// stored, and a profile whose candidate list differs is not merged.
#[test]
fn dynamic_scores_round_trip_and_guard_merges() {
    use profiler::stats::{dynamic, layer_stats_scored, StatsConfig};
    let (n, d) = (256usize, 8usize);
    let mut x = 7u64;
    let mut rand = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    };
    let (q, k, v) = (rand(2 * n * d), rand(n * d), rand(n * d));
    let shape = runtime::AttnShape {
        q_heads: 2,
        kv_heads: 1,
        seq_len: n,
        head_dim: d,
    };
    let input = runtime::AttentionInput::new(shape, &q, &k, &v).unwrap();
    let candidates = dynamic::default_candidates(64);
    let stats = layer_stats_scored(&input, &StatsConfig::default(), &candidates).unwrap();
    let mut m = meta(&["s0"], &[0]);
    m.dynamic = candidates.clone();
    let mut p = Profile::new(m);
    p.put_sample_stats(0, 0, &stats).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    p.write(&path).unwrap();
    let back = Profile::read(&path).unwrap();
    assert_eq!(back.meta.dynamic, candidates);
    for (h, want) in stats.iter().enumerate() {
        let got = back.sample_stats(&path, 0, 0, h).unwrap();
        assert_eq!(got.dynamic, want.dynamic);
        assert_eq!(got.dynamic.mass.len(), candidates.len());
        // The tail (last rows) comes back whole: it has no heat map to leave behind.
        assert!(got.tail.is_some());
        assert_eq!(got.tail, want.tail);
    }
    // Statistics with a tail do not go into a profile that keeps none (and the reverse).
    let mut none = meta(&["s2"], &[0]);
    none.tail_q = 0;
    let err = Profile::new(none)
        .put_sample_stats(0, 0, &stats)
        .unwrap_err();
    assert!(err.to_string().contains("tail"), "{err}");
    let mut other = Profile::new(meta(&["s1"], &[0]));
    other.put_sample_stats(0, 0, &stats).unwrap();
    let err = back
        .clone()
        .merge(&other, Path::new("other.safetensors"))
        .unwrap_err();
    assert!(err.to_string().contains("dynamic"), "{err}");
}
