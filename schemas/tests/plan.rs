//! Plan format v1: valid fixtures, one invalid fixture per defect, round trips, the JSON Schema, size
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! limits, migration and property tests.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use schemas::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/plans")
}

fn valid_fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures().join("valid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "expected valid fixtures, found {files:?}");
    files
}

/// (file, field, phrase) rows of fixtures/plans/invalid/EXPECTED.tsv.
fn invalid_fixtures() -> Vec<(PathBuf, String, String)> {
    let dir = fixtures().join("invalid");
    let table = std::fs::read_to_string(dir.join("EXPECTED.tsv")).unwrap();
    table
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            assert_eq!(cols.len(), 3, "bad EXPECTED.tsv row {l:?}");
            (dir.join(cols[0]), cols[1].to_string(), cols[2].to_string())
        })
        .collect()
}

#[test]
fn valid_fixtures_read_and_round_trip() {
    for path in valid_fixtures() {
        let plan = Plan::read(&path).unwrap_or_else(|e| panic!("{e}"));
        let yaml = plan.to_yaml().unwrap();
        let again = Plan::from_yaml(&path, &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(plan, again, "{}", path.display());
        // Writing is a fixed point: YAML -> plan -> YAML gives the same text.
        assert_eq!(yaml, again.to_yaml().unwrap());
    }
}

#[test]
fn every_invalid_fixture_is_refused_naming_file_and_field() {
    let rows = invalid_fixtures();
    let listed: std::collections::BTreeSet<PathBuf> = rows.iter().map(|r| r.0.clone()).collect();
    for entry in std::fs::read_dir(fixtures().join("invalid")).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n != "EXPECTED.tsv") {
            assert!(
                listed.contains(&path),
                "{} not in EXPECTED.tsv",
                path.display()
            );
        }
    }
    assert!(rows.len() >= 25, "only {} invalid fixtures", rows.len());
    for (path, field, phrase) in rows {
        let err = match Plan::read(&path) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(e) => e,
        };
        assert!(err.is_check_failure(), "{}: {err:?}", path.display());
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()),
            "message does not name the file: {message}"
        );
        if !field.is_empty() {
            assert!(
                message.contains(&format!(": {field}")),
                "{}: message does not name field {field:?}: {message}",
                path.display()
            );
        }
        assert!(
            message.contains(&phrase),
            "{}: message lacks {phrase:?}: {message}",
            path.display()
        );
    }
}

#[test]
fn a_file_over_the_size_limit_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.yaml");
    let file = std::fs::File::create(&path).unwrap();
    // A sparse file: its size is checked before any byte is read.
    file.set_len(io::MAX_PLAN_BYTES + 1).unwrap();
    match Plan::read(&path) {
        Err(Error::TooLarge { size, limit, .. }) => {
            assert_eq!(size, io::MAX_PLAN_BYTES + 1);
            assert_eq!(limit, io::MAX_PLAN_BYTES);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn a_missing_file_is_an_io_error_naming_it() {
    let err = Plan::read(Path::new("/nonexistent/plan.yaml")).unwrap_err();
    assert!(!err.is_check_failure());
    assert!(err.to_string().contains("/nonexistent/plan.yaml"));
}

#[test]
fn committed_schema_is_current() {
    let committed: serde_json::Value = serde_json::from_str(PLAN_SCHEMA_JSON).unwrap();
    assert_eq!(
        committed,
        json_schema(),
        "schemas/plan.schema.json is stale: run `cargo run -p schemas --example write_schema`"
    );
}

fn schema_validator() -> jsonschema::Validator {
    let schema: serde_json::Value = serde_json::from_str(PLAN_SCHEMA_JSON).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

#[test]
fn json_schema_accepts_every_valid_fixture_and_refuses_shape_errors() {
    let validator = schema_validator();
    for path in valid_fixtures() {
        let plan = Plan::read(&path).unwrap();
        let value = serde_json::to_value(&plan).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        // The schema is not a rubber stamp: an unknown key and an unknown kind are refused.
        let mut bad = value.clone();
        bad["defaults"]["lastq"] = serde_json::json!(3);
        assert!(!validator.is_valid(&bad));
        let mut bad = value;
        bad["layers"][0]["heads"][0]["pattern"]["kind"] = serde_json::json!("strided");
        assert!(!validator.is_valid(&bad));
    }
}

#[test]
fn plans_written_by_write_are_atomic_and_readable() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan::read(&valid_fixtures()[0]).unwrap();
    let path = dir.path().join("out.yaml");
    plan.write(&path).unwrap();
    assert_eq!(Plan::read(&path).unwrap(), plan);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "out.yaml")
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    // An invalid plan is not written at all.
    let mut bad = plan.clone();
    bad.defaults.block_q = 3;
    let bad_path = dir.path().join("bad.yaml");
    assert!(bad.write(&bad_path).is_err());
    assert!(!bad_path.exists());
}

#[test]
fn check_model_names_each_mismatched_field() {
    let plan = Plan::read(&valid_fixtures()[0]).unwrap();
    let mut actual = plan.model.clone();
    assert!(plan.check_model(Path::new("p.yaml"), &actual).is_ok());
    actual.query_heads = 32;
    actual.fingerprint = format!("sha256:{}", "0".repeat(64));
    let err = plan.check_model(Path::new("p.yaml"), &actual).unwrap_err();
    let fields: Vec<&str> = err.issues().iter().map(|i| i.field.as_str()).collect();
    assert_eq!(fields, ["model.query_heads", "model.fingerprint"]);
    assert!(err
        .to_string()
        .contains("p.yaml: model.fingerprint: plan says"));
}

#[test]
fn older_versions_are_upgraded_by_the_migration_table() {
    // A hypothetical version 0 that called `max_context` `context`.
    fn rename_context(
        mut doc: serde_json::Value,
    ) -> std::result::Result<serde_json::Value, String> {
        let model = doc
            .get_mut("model")
            .and_then(|m| m.as_object_mut())
            .ok_or("no model section")?;
        let ctx = model.remove("context").ok_or("no model.context")?;
        model.insert("max_context".into(), ctx);
        Ok(doc)
    }
    let table = [migrate::Migration {
        from: 0,
        apply: rename_context,
    }];
    let text = std::fs::read_to_string(&valid_fixtures()[0]).unwrap();
    let v0 = text
        .replace("schema_version: 1", "schema_version: 0")
        .replace("max_context:", "context:");
    let path = Path::new("v0.yaml");
    let upgraded = Plan::parse_with(path, &v0, &table).unwrap();
    assert_eq!(upgraded.schema_version, 1);
    assert_eq!(upgraded, Plan::from_yaml(path, &text).unwrap());
    // Without the table, version 0 is refused with the version named.
    let err = Plan::parse_with(path, &v0, &[]).unwrap_err();
    assert!(err.to_string().contains("found 0"), "{err}");
}

#[test]
fn budgets_resolve_by_their_rule() {
    let frac = Budget::Fraction(FractionBudget {
        fraction: 0.1,
        min: 64,
        max: Some(500),
    });
    assert_eq!(frac.resolve(100), 64);
    assert_eq!(frac.resolve(1001), 101);
    assert_eq!(frac.resolve(100_000), 500);
    let power = Budget::Power(PowerBudget {
        scale: 2.0,
        exponent: 0.5,
        min: 1,
        max: None,
    });
    assert_eq!(power.resolve(10_000), 200);
    let buckets = Budget::Buckets(BucketsBudget {
        buckets: vec![
            BucketBudget {
                up_to: 4096,
                value: 500,
            },
            BucketBudget {
                up_to: 8192,
                value: 1000,
            },
        ],
    });
    assert_eq!(buckets.resolve(10), 500);
    assert_eq!(buckets.resolve(4096), 500);
    assert_eq!(buckets.resolve(4097), 1000);
    assert_eq!(buckets.resolve(1 << 20), 1000);
}

// --- properties ----------------------------------------------------------------------------------

fn budget() -> BoxedStrategy<Budget> {
    prop_oneof![
        (1u64..8192).prop_map(Budget::Fixed),
        (0.001f64..1.0, 1u64..512, proptest::option::of(512u64..8192)).prop_map(
            |(fraction, min, max)| Budget::Fraction(FractionBudget { fraction, min, max })
        ),
        (0.01f64..100.0, 0.0f64..2.0, 1u64..64).prop_map(|(scale, exponent, min)| {
            Budget::Power(PowerBudget {
                scale,
                exponent,
                min,
                max: None,
            })
        }),
        proptest::collection::vec(1u64..64, 1..4).prop_map(|vals| {
            Budget::Buckets(BucketsBudget {
                buckets: vals
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| BucketBudget {
                        up_to: 1024 * (i as u64 + 1),
                        value: v,
                    })
                    .collect(),
            })
        }),
    ]
    .boxed()
}

fn pattern() -> BoxedStrategy<Pattern> {
    prop_oneof![
        Just(Pattern::Dense(Dense {})),
        (budget(), budget())
            .prop_map(|(sink, recent)| Pattern::Streaming(Streaming { sink, recent })),
        (budget(), budget()).prop_map(|(sink, local)| Pattern::AShape(AShape { sink, local })),
        (budget(), budget()).prop_map(|(vertical, slash)| Pattern::VerticalSlash(VerticalSlash {
            vertical,
            slash
        })),
        (1u64..64).prop_map(|k| Pattern::BlockSparse(BlockSparse {
            top_k: Some(Budget::Fixed(k)),
            coverage: None
        })),
        (0.01f64..1.0).prop_map(|c| Pattern::BlockSparse(BlockSparse {
            top_k: None,
            coverage: Some(c)
        })),
        (1u32..512, budget(), budget()).prop_map(|(stride, sink, local)| Pattern::Grid(Grid {
            stride,
            phase: stride / 2,
            width: 1,
            sink,
            local
        })),
        (0.01f64..1.0, 0.0f64..1.0, 1u64..16).prop_map(|(gamma, tau, m)| {
            Pattern::QueryAdaptive(QueryAdaptive {
                gamma,
                tau,
                min_budget: Budget::Fixed(m),
            })
        }),
        (1u64..64, 0u8..=32, budget(), budget()).prop_map(|(keep, quarters, sink, local)| {
            Pattern::TokenSelect(TokenSelect {
                block: 64,
                keep: Budget::Fixed(keep),
                spread: f64::from(quarters) / 4.0,
                sink,
                local,
            })
        }),
    ]
    .boxed()
}

fn head() -> BoxedStrategy<HeadPlan> {
    (
        pattern(),
        proptest::option::of(0.0f64..=1.0),
        proptest::option::of(0.0f64..=1.0),
        proptest::option::of(0.0f64..=1.0),
    )
        .prop_map(
            |(pattern, recall, validated_recall, flops_fraction)| HeadPlan {
                head: 0,
                pattern,
                recall,
                validated_recall,
                flops_fraction,
                gate: None,
                retrieval_score: None,
                modalities: vec![],
            },
        )
        .boxed()
}

/// The toy model of the valid fixture (2 layers x 4 heads) with random heads and provenance text.
fn plan() -> BoxedStrategy<Plan> {
    let base = Plan::read(&valid_fixtures()[0]).unwrap();
    (
        proptest::collection::vec(head(), 8),
        "[a-zA-Z0-9 :#'\"{}-]{0,24}",
    )
        .prop_map(move |(heads, data)| {
            let mut p = base.clone();
            p.layers = heads
                .chunks(4)
                .enumerate()
                .map(|(l, chunk)| LayerPlan {
                    layer: l as u32,
                    heads: chunk
                        .iter()
                        .enumerate()
                        .map(|(h, head)| HeadPlan {
                            head: h as u32,
                            ..head.clone()
                        })
                        .collect(),
                })
                .collect();
            p.provenance.data = data;
            p
        })
        .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn plan_to_yaml_to_plan_is_the_identity(plan in plan()) {
        let yaml = plan.to_yaml().unwrap();
        let back = Plan::from_yaml(Path::new("prop.yaml"), &yaml)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        prop_assert_eq!(back, plan);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = Plan::from_yaml(Path::new("fuzz.yaml"), &text);
    }

    #[test]
    fn mutated_valid_plans_never_panic(cut in 0usize..2000, junk in "[\\[\\]{}:,&*!|>#\n -]{0,8}") {
        let text = std::fs::read_to_string(&valid_fixtures()[0]).unwrap();
        let cut = cut.min(text.len());
        let cut = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        let mutated = format!("{}{}{}", &text[..cut], junk, &text[cut..]);
        let _ = Plan::from_yaml(Path::new("mutated.yaml"), &mutated);
    }
}
