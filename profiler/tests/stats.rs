//! `profiler::stats` against a dense f64 attention matrix: streamed probabilities, descriptive
//! statistics, and the recall of every candidate on the grid read off the statistics versus the recall
//! of the runtime's `HeadIndex` computed cell by cell. Plus merging, monotonicity and errors.

// Helpers outside `#[test]` functions unwrap too (clippy's allow-unwrap-in-tests does not reach them).
#![allow(clippy::unwrap_used)]

use profiler::stats::{
    dynamic, layer_stats, layer_stats_scored, rank_edges, recall_of_index, HeadStats, PackedKeys,
    Recall, RowBlock, StatsConfig, COVERAGE_GRID, SINK_TOKENS,
};
use proptest::prelude::*;
use runtime::pattern::block_sparse::BlockRanking;
use runtime::pattern::vertical_slash::VsRanking;
use runtime::pattern::{a_shape, build_index, HeadIndex, HeadQk, PatternContext};
use runtime::{AttentionInput, AttnShape};

/// Probabilities from f32 scores vs f64: 1e-6 absolute (scores up to ~20 in magnitude).
const TOL_PROB: f64 = 1e-6;
/// Recall from the statistics (f32 scores, f64 sums) vs the f64 matrix, absolute. Observed errors are
/// 2e-9 to 5e-9 (per-probability f32 errors largely cancel in the mean); 1e-7 leaves room for inputs
/// with larger scores. A single misplaced cell would cost about `1 / N^2` >= 1e-6 here.
const TOL_RECALL: f64 = 1e-7;

/// Deterministic values in [-1, 1) (xorshift64).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    runtime::test_util::noise(n, seed, 1.0)
}

/// Owned Q, K, V `[heads, n, d]`.
struct Sample {
    shape: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Sample {
    /// Random with `amp`; `structured` adds a sink at token 0, a local band and heavy columns every 37
    /// tokens.
    fn new(
        q_heads: usize,
        kv_heads: usize,
        n: usize,
        d: usize,
        seed: u64,
        structured: bool,
    ) -> Self {
        let shape = AttnShape {
            q_heads,
            kv_heads,
            seq_len: n,
            head_dim: d,
        };
        let mut q = noise(q_heads * n * d, seed);
        let mut k = noise(kv_heads * n * d, seed + 1);
        let v = noise(kv_heads * n * d, seed + 2);
        if structured {
            for h in 0..q_heads {
                for i in 0..n {
                    let row = &mut q[(h * n + i) * d..(h * n + i + 1) * d];
                    row[0] += 2.0 + h as f32;
                    row[1] += 3.0 * (i as f32 * 0.05).cos();
                    row[2] += 3.0 * (i as f32 * 0.05).sin();
                }
            }
            for g in 0..kv_heads {
                for j in 0..n {
                    let row = &mut k[(g * n + j) * d..(g * n + j + 1) * d];
                    row[0] += if j == 0 {
                        4.0
                    } else if j % 37 == 5 {
                        2.0
                    } else {
                        0.0
                    };
                    row[1] += 3.0 * (j as f32 * 0.05).cos();
                    row[2] += 3.0 * (j as f32 * 0.05).sin();
                }
            }
        }
        Self { shape, q, k, v }
    }

    fn input(&self) -> AttentionInput<'_> {
        AttentionInput::new(self.shape, &self.q, &self.k, &self.v).unwrap()
    }

    /// Dense causal softmax of head `h` in f64, `[n][n]` (0 above the diagonal).
    fn probs(&self, h: usize) -> Vec<Vec<f64>> {
        let inp = self.input();
        let (n, d) = (self.shape.seq_len, self.shape.head_dim);
        let g = self.shape.kv_head_of(h);
        (0..n)
            .map(|i| {
                let q = inp.q_row(h, i);
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = inp.k_row(g, j);
                        q.iter()
                            .zip(k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let mut row: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                row.resize(n, 0.0);
                row
            })
            .collect()
    }
}

/// Row prefix sums of the dense matrix, for fast piece sums: `pre[i][j] = Σ_{x<j} P[i][x]`.
fn prefix(p: &[Vec<f64>]) -> Vec<Vec<f64>> {
    p.iter()
        .map(|row| {
            let mut acc = 0.0;
            std::iter::once(0.0)
                .chain(row.iter().map(|&x| {
                    acc += x;
                    acc
                }))
                .collect()
        })
        .collect()
}

/// Recall of `index` over rows `first..` from the f64 matrix (`pre` holds those rows' prefix sums),
/// through `pieces`, which the runtime tests tie to `contains`.
fn dense_recall(pre: &[Vec<f64>], index: &HeadIndex, first: usize) -> f64 {
    let rows = pre.len();
    let mut mass = 0.0;
    for piece in index.pieces() {
        for i in piece.rows.clone().filter(|&i| i >= first) {
            let end = piece.keys.end.min(i + 1);
            if end > piece.keys.start {
                mass += pre[i - first][end] - pre[i - first][piece.keys.start];
            }
        }
    }
    mass / rows as f64
}

fn check_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: statistics {got}, dense {want}, error {:e}",
        (got - want).abs()
    );
}

/// Every candidate of every family with statistics, for every head.
fn check_all_candidates(sample: &Sample, cfg: StatsConfig, edge_step: usize) {
    let inp = sample.input();
    let n = sample.shape.seq_len;
    let ctx: PatternContext = cfg.context(n);
    let stats = layer_stats(&inp, &cfg).unwrap();
    assert_eq!(stats.len(), sample.shape.q_heads);
    let edges = rank_edges(n);
    let budgets: Vec<usize> = edges
        .iter()
        .step_by(edge_step)
        .map(|&e| e as usize)
        .chain([n])
        .collect();
    for (h, st) in stats.iter().enumerate() {
        let p = sample.probs(h);
        let pre = prefix(&p);
        let qk = HeadQk::from_input(&inp, h).unwrap();
        let what = |fam: &str| {
            format!(
                "n {n} blocks {}x{} head {h} {fam}",
                cfg.block_q, cfg.block_k
            )
        };
        let tail = st.tail.as_deref().unwrap();
        let first = n - tail.rows as usize;
        assert_eq!(
            first % cfg.block_q,
            0,
            "{}: the tail is whole blocks",
            what("tail")
        );
        assert!(n - first >= cfg.tail_q.min(n), "{}", what("tail rows"));
        // A read-out of the statistics and of their tail against the f64 matrix: recall exact to
        // TOL_RECALL, cells exactly.
        let check = |read: &dyn Fn(&HeadStats) -> Recall, index: &HeadIndex, name: &str| {
            for (stats, from) in [(st, 0), (tail, first)] {
                let r = read(stats);
                let label = what(&format!("{name} rows {from}.."));
                check_close(
                    r.recall,
                    dense_recall(&pre[from..], index, from),
                    TOL_RECALL,
                    &label,
                );
                let cells: u64 = (from / cfg.block_q..ctx.q_blocks())
                    .map(|qb| index.block_cells(qb))
                    .sum();
                assert_eq!(
                    (r.density * stats.dense_cells).round() as u64,
                    cells,
                    "{label} cells"
                );
            }
        };
        let vs = VsRanking::new(&ctx, &qk).unwrap();
        for &v in &budgets {
            for &s in &budgets {
                check(
                    &|t| t.recall_vertical_slash(v, s),
                    &vs.index(&ctx, v, s),
                    &format!("vs({v}, {s})"),
                );
                check(
                    &|t| t.recall_a_shape(v, s),
                    &a_shape::index(&ctx, v, s),
                    &format!("a_shape({v}, {s})"),
                );
            }
        }
        let blocks = BlockRanking::new(&ctx, &qk).unwrap();
        for k in 1..=ctx.k_blocks() + 1 {
            check(
                &|t| t.recall_block_top_k(k),
                &blocks.index_with(&ctx, |qb| blocks.top_k_count(qb, k)),
                &format!("top_k {k}"),
            );
        }
        for &c in &COVERAGE_GRID {
            check(
                &|t| t.recall_block_coverage(c).unwrap(),
                &blocks.index_with(&ctx, |qb| blocks.coverage_count(qb, c)),
                &format!("coverage {c}"),
            );
        }
        // Descriptive statistics.
        let sink: f64 = p
            .iter()
            .map(|row| row.iter().take(SINK_TOKENS).sum::<f64>())
            .sum::<f64>()
            / n as f64;
        check_close(st.mean_sink_mass(), sink, TOL_RECALL, &what("sink mass"));
        let entropy: f64 = p
            .iter()
            .map(|row| {
                -row.iter()
                    .filter(|&&x| x > 0.0)
                    .map(|&x| x * x.log2())
                    .sum::<f64>()
            })
            .sum::<f64>()
            / n as f64;
        check_close(st.mean_entropy_bits(), entropy, 1e-4, &what("entropy"));
        let curve = st.local_curve();
        for (t, &e) in edges.iter().enumerate() {
            let upto = edges.get(t + 1).map_or(n, |&x| x as usize);
            let want: f64 = (0..n)
                .map(|i| {
                    (i.saturating_sub(upto - 1)..=i)
                        .map(|j| p[i][j])
                        .sum::<f64>()
                })
                .sum::<f64>()
                / n as f64;
            check_close(
                curve[t],
                want,
                TOL_RECALL,
                &what(&format!("local curve below {upto} (edge {e})")),
            );
        }
        for (qb, row) in st.heat_map().iter().enumerate() {
            check_close(
                row.iter().sum(),
                1.0,
                1e-5,
                &what(&format!("heat row {qb}")),
            );
        }
    }
}

#[test]
fn streamed_probabilities_match_f64_softmax() {
    for &(n, d, bq, bk, structured) in &[
        (113usize, 64usize, 16usize, 16usize, true),
        (257, 64, 64, 64, true),
        (200, 16, 64, 16, false),
        (70, 8, 16, 64, true),
    ] {
        let s = Sample::new(1, 1, n, d, n as u64, structured);
        let p = s.probs(0);
        let keys = PackedKeys::pack(&s.k, n, d, bk);
        let mut rb = RowBlock::new(d, bq, bk);
        let mut worst = 0.0f64;
        for qb in 0..n.div_ceil(bq) {
            rb.compute(&s.q, &keys, qb).unwrap();
            for (r, i) in rb.rows().enumerate() {
                for (j, &want) in p[i].iter().enumerate() {
                    worst = worst.max((rb.prob(r, j) as f64 - want).abs());
                }
            }
        }
        assert!(
            worst <= TOL_PROB,
            "n {n} d {d} blocks {bq}x{bk}: worst probability error {worst:e}"
        );
    }
}

#[test]
fn every_candidate_exact_small() {
    let cfg = StatsConfig {
        block_q: 16,
        block_k: 16,
        last_q: 16,
        tail_q: 40,
    };
    check_all_candidates(&Sample::new(3, 1, 113, 64, 1, true), cfg, 1);
    check_all_candidates(&Sample::new(3, 1, 113, 32, 2, false), cfg, 1);
}

#[test]
fn every_candidate_exact_mixed_blocks() {
    check_all_candidates(
        &Sample::new(3, 1, 257, 64, 3, true),
        StatsConfig {
            block_q: 64,
            block_k: 64,
            last_q: 64,
            tail_q: 40,
        },
        1,
    );
    check_all_candidates(
        &Sample::new(2, 2, 257, 16, 4, true),
        StatsConfig {
            block_q: 32,
            block_k: 16,
            last_q: 20,
            tail_q: 70,
        },
        1,
    );
    check_all_candidates(
        &Sample::new(2, 1, 150, 16, 5, true),
        StatsConfig {
            block_q: 16,
            block_k: 64,
            last_q: 8,
            tail_q: 40,
        },
        1,
    );
}

#[test]
fn every_candidate_exact_1000() {
    check_all_candidates(
        &Sample::new(3, 1, 1000, 64, 6, true),
        StatsConfig {
            block_q: 64,
            block_k: 64,
            last_q: 64,
            tail_q: 256,
        },
        2,
    );
}

#[test]
fn direct_evaluator_matches_dense() {
    let s = Sample::new(3, 1, 257, 64, 7, true);
    let inp = s.input();
    let ctx = StatsConfig {
        block_q: 16,
        block_k: 16,
        last_q: 16,
        tail_q: 40,
    }
    .context(257);
    for h in 0..3 {
        let p = s.probs(h);
        let qk = HeadQk::from_input(&inp, h).unwrap();
        let vs = VsRanking::new(&ctx, &qk).unwrap();
        for (v, sl) in [(0, 1), (10, 3), (40, 20)] {
            let index = vs.index(&ctx, v, sl);
            let got = recall_of_index(&inp, h, &index).unwrap();
            let per_row: Vec<f64> = (0..257)
                .map(|i| {
                    (0..=i)
                        .filter(|&j| index.contains(i, j))
                        .map(|j| p[i][j])
                        .sum()
                })
                .collect();
            let mean = per_row.iter().sum::<f64>() / 257.0;
            let min = per_row.iter().cloned().fold(1.0, f64::min);
            let last = per_row[241..].iter().sum::<f64>() / 16.0;
            check_close(got.mean, mean, TOL_RECALL, "direct mean");
            check_close(got.min, min, 1e-5, "direct min");
            check_close(got.last_rows_mean, last, 1e-5, "direct last rows");
        }
    }
}

/// Every dynamic candidate (query-adaptive at every threshold, token-select, grid) scored during the
/// pass equals the f64 recall and exact cell count of the index the runtime builds for that pattern
/// from the same live Q and K: the calibrator's figures are the runtime's.
#[test]
fn dynamic_candidates_exact() {
    for (n, block, seed) in [(257, 16, 3), (1000, 64, 11)] {
        let s = Sample::new(3, 1, n, 64, seed, true);
        let inp = s.input();
        let cfg = StatsConfig {
            block_q: block,
            block_k: block,
            last_q: block,
            tail_q: 40,
        };
        let ctx = cfg.context(n);
        let mut candidates = dynamic::default_candidates(block as u32);
        candidates.extend(dynamic::grid_candidates(37, 5, block as u32));
        let stats = layer_stats_scored(&inp, &cfg, &candidates).unwrap();
        let plain = layer_stats(&inp, &cfg).unwrap();
        for (h, st) in stats.iter().enumerate() {
            // The other statistics do not change when candidates are scored.
            let mut without = st.clone();
            without.dynamic = Default::default();
            if let Some(t) = without.tail.as_mut() {
                t.dynamic = Default::default();
            }
            assert_eq!(without, plain[h]);
            assert_eq!(st.dynamic.mass.len(), candidates.len());
            let pre = prefix(&s.probs(h));
            let qk = HeadQk::from_input(&inp, h).unwrap();
            for (c, pattern) in candidates.iter().enumerate() {
                let index = build_index(pattern, &ctx, &qk).unwrap();
                let got = st.recall_dynamic(c).unwrap();
                let what = format!("n {n} head {h} candidate {c} {pattern:?}");
                check_close(got.recall, dense_recall(&pre, &index, 0), TOL_RECALL, &what);
                assert_eq!(st.dynamic.cells[c], index.cells() as f64, "{what}: cells");
                let tail = st.tail.as_deref().unwrap();
                let first = n - tail.rows as usize;
                let got = tail.recall_dynamic(c).unwrap();
                let want = dense_recall(&pre[first..], &index, first);
                check_close(got.recall, want, TOL_RECALL, &format!("{what}, tail"));
                let cells: u64 = (first / block..ctx.q_blocks())
                    .map(|qb| index.block_cells(qb))
                    .sum();
                assert_eq!(tail.dynamic.cells[c], cells as f64, "{what}: tail cells");
            }
        }
    }
}

#[test]
fn dynamic_candidates_refused_when_not_dynamic() {
    let s = Sample::new(1, 1, 64, 16, 1, false);
    let cfg = StatsConfig::default();
    let bad = [schemas::Pattern::Dense(schemas::Dense {})];
    let err = layer_stats_scored(&s.input(), &cfg, &bad).unwrap_err();
    assert!(err.to_string().contains("dense"), "{err}");
}

#[test]
fn merge_is_addition_across_lengths() {
    let cfg = StatsConfig {
        block_q: 16,
        block_k: 16,
        last_q: 16,
        tail_q: 40,
    };
    let a = Sample::new(1, 1, 113, 32, 8, true);
    let b = Sample::new(1, 1, 257, 32, 9, true);
    let sa = layer_stats(&a.input(), &cfg).unwrap().remove(0);
    let sb = layer_stats(&b.input(), &cfg).unwrap().remove(0);
    let mut m = sa.clone();
    m.merge(&sb).unwrap();
    assert_eq!((m.samples, m.rows, m.max_len), (2, 370, 257));
    for &(v, s) in &[(0usize, 1usize), (8, 4), (32, 16), (96, 64), (300, 300)] {
        let want = (sa.recall_vertical_slash(v, s).recall * 113.0
            + sb.recall_vertical_slash(v, s).recall * 257.0)
            / 370.0;
        check_close(
            m.recall_vertical_slash(v, s).recall,
            want,
            1e-12,
            "merged vs",
        );
        let want = (sa.recall_a_shape(v, s).recall * 113.0
            + sb.recall_a_shape(v, s).recall * 257.0)
            / 370.0;
        check_close(m.recall_a_shape(v, s).recall, want, 1e-12, "merged a_shape");
    }
    for k in 1..20 {
        let want = (sa.recall_block_top_k(k).recall * 113.0
            + sb.recall_block_top_k(k).recall * 257.0)
            / 370.0;
        check_close(m.recall_block_top_k(k).recall, want, 1e-12, "merged top_k");
    }
    let other = layer_stats(&a.input(), &StatsConfig { block_q: 32, ..cfg })
        .unwrap()
        .remove(0);
    assert!(m.merge(&other).is_err());
}

#[test]
fn deterministic_and_thread_independent() {
    let s = Sample::new(3, 1, 300, 32, 10, true);
    let cfg = StatsConfig {
        block_q: 16,
        block_k: 16,
        last_q: 16,
        tail_q: 40,
    };
    let a = layer_stats(&s.input(), &cfg).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let b = pool.install(|| layer_stats(&s.input(), &cfg).unwrap());
    assert_eq!(a, b);
}

#[test]
fn tiny_sequences() {
    for n in [0usize, 1, 2, 5] {
        let s = Sample::new(3, 1, n, 8, 12, true);
        let st = layer_stats(&s.input(), &StatsConfig::default()).unwrap();
        assert_eq!(st.len(), 3);
        if n > 0 {
            check_close(
                st[0].recall_vertical_slash(0, 1).recall,
                1.0,
                1e-6,
                "one block is everything",
            );
            check_close(st[0].recall_a_shape(0, 1).recall, 1.0, 1e-6, "a_shape");
        }
    }
}

#[test]
fn errors_not_panics() {
    let s = Sample::new(1, 1, 50, 8, 11, false);
    let bad = StatsConfig {
        block_q: 0,
        block_k: 16,
        last_q: 16,
        tail_q: 40,
    };
    assert!(layer_stats(&s.input(), &bad).is_err());
    let index = runtime::pattern::dense::index(&StatsConfig::default().context(49));
    assert!(recall_of_index(&s.input(), 0, &index).is_err());
    let index = runtime::pattern::dense::index(&StatsConfig::default().context(50));
    assert!(recall_of_index(&s.input(), 1, &index).is_err());
    let r = recall_of_index(&s.input(), 0, &index).unwrap();
    check_close(r.mean, 1.0, 1e-6, "dense recall");
    let mut rb = RowBlock::new(8, 16, 32);
    assert!(rb
        .compute(&s.q, &PackedKeys::pack(&s.k, 50, 8, 16), 0)
        .is_err());
}

fn head_stats(n: usize, seed: u64) -> HeadStats {
    let s = Sample::new(1, 1, n, 16, seed, seed % 2 == 0);
    layer_stats(
        &s.input(),
        &StatsConfig {
            block_q: 16,
            block_k: 16,
            last_q: 16,
            tail_q: 40,
        },
    )
    .unwrap()
    .remove(0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// Recall never decreases when a budget grows (on and off the edges).
    #[test]
    fn recall_monotone_in_nested_budgets(
        n in 30usize..300, seed in 0u64..500,
        v in 0usize..300, dv in 0usize..100, s in 0usize..300, ds in 0usize..100, k in 1usize..20,
    ) {
        let st = head_stats(n, seed);
        let eps = 1e-12;
        prop_assert!(st.recall_vertical_slash(v, s).recall <= st.recall_vertical_slash(v + dv, s + ds).recall + eps);
        prop_assert!(st.recall_a_shape(v, s).recall <= st.recall_a_shape(v + dv, s + ds).recall + eps);
        prop_assert!(st.recall_block_top_k(k).recall <= st.recall_block_top_k(k + 1).recall + eps);
        let cov: Vec<f64> = COVERAGE_GRID.iter().map(|&c| st.recall_block_coverage(c).map_or(0.0, |r| r.recall)).collect();
        prop_assert!(cov.windows(2).all(|w| w[0] <= w[1] + eps));
        prop_assert!((st.recall_vertical_slash(n, n).recall - 1.0).abs() < 1e-5);
    }
}
