//! `runtime::pattern`: every kind gives causal indexes that contain the diagonal; each family computes
//! exactly the cells its docs promise (checked cell by cell against a brute-force reading of the rule);
//! budgets are nested; errors instead of panics.

// Helpers outside `#[test]` functions unwrap too (clippy's allow-unwrap-in-tests does not reach them).
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use runtime::pattern::{
    a_shape, block_sparse::BlockRanking, build_index, token_select, vertical_slash, HeadIndex,
    HeadQk, PatternContext,
};
use runtime::{AttentionInput, AttnShape, Error};
use schemas::{
    AShape, BlockSparse, Budget, Dense, Grid, Pattern, QueryAdaptive, Streaming, TokenSelect,
    VerticalSlash,
};

/// Deterministic values in [-1, 1) (xorshift64).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    runtime::test_util::noise(n, seed, 1.0)
}

/// Q and K `[heads, n, d]` with a sink at token 0, a local band and heavy columns every 37 tokens.
fn structured(heads: usize, kv: usize, n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut q = noise(heads * n * d, seed);
    let mut k = noise(kv * n * d, seed + 1);
    for h in 0..heads {
        for i in 0..n {
            let row = &mut q[(h * n + i) * d..(h * n + i + 1) * d];
            row[0] += 2.0;
            row[1] += 2.0 * (i as f32 * 0.05).cos();
            row[2] += 2.0 * (i as f32 * 0.05).sin();
        }
    }
    for g in 0..kv {
        for j in 0..n {
            let row = &mut k[(g * n + j) * d..(g * n + j + 1) * d];
            row[0] += if j == 0 {
                4.0
            } else if j % 37 == 5 {
                2.5
            } else {
                0.0
            };
            row[1] += 2.0 * (j as f32 * 0.05).cos();
            row[2] += 2.0 * (j as f32 * 0.05).sin();
        }
    }
    (q, k)
}

fn ctx(n: usize, block: usize, last_q: usize) -> PatternContext {
    PatternContext {
        seq_len: n,
        block_q: block,
        block_k: block,
        last_q,
    }
}

fn fixed(v: u64) -> Budget {
    Budget::Fixed(v)
}

fn all_kinds() -> Vec<Pattern> {
    vec![
        Pattern::Dense(Dense {}),
        Pattern::Streaming(Streaming {
            sink: fixed(4),
            recent: fixed(20),
        }),
        Pattern::AShape(AShape {
            sink: fixed(16),
            local: fixed(40),
        }),
        Pattern::VerticalSlash(VerticalSlash {
            vertical: fixed(10),
            slash: fixed(6),
        }),
        Pattern::BlockSparse(BlockSparse {
            top_k: Some(fixed(2)),
            coverage: None,
        }),
        Pattern::BlockSparse(BlockSparse {
            top_k: None,
            coverage: Some(0.8),
        }),
        Pattern::Grid(Grid {
            stride: 25,
            phase: 3,
            width: 2,
            sink: fixed(4),
            local: fixed(16),
        }),
        Pattern::QueryAdaptive(QueryAdaptive {
            gamma: 0.9,
            tau: 0.1,
            min_budget: fixed(1),
        }),
        Pattern::QueryAdaptive(QueryAdaptive {
            gamma: 0.9,
            tau: 10.0,
            min_budget: fixed(1),
        }),
        Pattern::TokenSelect(TokenSelect {
            block: 32,
            keep: fixed(3),
            spread: 0.0,
            sink: fixed(4),
            local: fixed(16),
        }),
        Pattern::TokenSelect(TokenSelect {
            block: 32,
            keep: fixed(3),
            spread: 1.5,
            sink: fixed(4),
            local: fixed(16),
        }),
    ]
}

/// Checks the index against itself: causal only, diagonal present, `cells()` and `pieces()` agree
/// with `contains`, columns never inside blocks. Returns the cell set.
fn check_consistent(index: &HeadIndex, what: &str) -> Vec<Vec<bool>> {
    let c = *index.context();
    let n = c.seq_len;
    let mut from_pieces = vec![vec![false; n]; n];
    for p in index.pieces() {
        for i in p.rows.clone() {
            for j in p.keys.clone().filter(|&j| j <= i) {
                assert!(!from_pieces[i][j], "{what}: cell ({i}, {j}) in two pieces");
                from_pieces[i][j] = true;
            }
        }
    }
    let mut count = 0u64;
    for (i, row) in from_pieces.iter().enumerate() {
        assert!(index.contains(i, i), "{what}: diagonal ({i}, {i}) missing");
        for (j, &in_piece) in row.iter().enumerate() {
            let inside = index.contains(i, j);
            assert!(!inside || j <= i, "{what}: non-causal ({i}, {j})");
            assert_eq!(inside, in_piece, "{what}: pieces vs contains at ({i}, {j})");
            count += u64::from(inside);
        }
    }
    assert_eq!(index.cells(), count, "{what}: cells()");
    for qb in 0..index.q_blocks() {
        for &j in index.columns(qb) {
            let kb = j as usize / c.block_k;
            assert!(
                index.key_blocks(qb).binary_search(&(kb as u32)).is_err(),
                "{what}: column {j} inside block {kb} of query block {qb}"
            );
        }
    }
    from_pieces
}

#[test]
fn every_kind_is_causal_and_contains_the_diagonal() {
    for &(n, block) in &[(113usize, 16usize), (257, 64), (64, 16), (1, 16), (200, 32)] {
        let d = 16;
        let (q, k) = structured(1, 1, n, d, n as u64);
        let qk = HeadQk::new(&q, &k, d, n).unwrap();
        for p in all_kinds() {
            let c = ctx(n, block, 16);
            let what = format!("{} n={n} block={block}", p.kind());
            let index = build_index(&p, &c, &qk).unwrap_or_else(|e| panic!("{what}: {e}"));
            check_consistent(&index, &what);
            let again = build_index(&p, &c, &qk).unwrap();
            assert_eq!(index, again, "{what}: not deterministic");
        }
    }
}

#[test]
fn dense_is_every_causal_cell() {
    let c = ctx(113, 16, 16);
    let (q, k) = structured(1, 1, 113, 8, 3);
    let qk = HeadQk::new(&q, &k, 8, 113).unwrap();
    let index = build_index(&Pattern::Dense(Dense {}), &c, &qk).unwrap();
    assert_eq!(index.cells(), index.dense_cells());
    assert_eq!(index.density(), 1.0);
}

#[test]
fn a_shape_rule_cell_by_cell() {
    let (n, b) = (257, 16);
    let c = ctx(n, b, 16);
    for (sink, local) in [(0, 1), (4, 16), (16, 17), (40, 100), (300, 300)] {
        let index = a_shape::index(&c, sink, local);
        let (sink_c, local_c) = a_shape::clamp_budgets(&c, sink, local);
        for i in 0..n {
            let (r0, r1) = (i / b * b, (i / b * b + b).min(n));
            for j in 0..=i {
                let kb = j / b;
                let in_sink = kb * b < sink_c;
                // some row of the block has j in its window [row - local + 1, row]
                let in_local = (r0..r1).any(|r| {
                    let lo = (r + 1).saturating_sub(local_c);
                    (lo..=r).any(|x| x / b == kb)
                });
                assert_eq!(
                    index.contains(i, j),
                    in_sink || in_local,
                    "({i}, {j}) sink {sink} local {local}"
                );
            }
        }
    }
}

#[test]
fn streaming_equals_a_shape() {
    let (q, k) = structured(1, 1, 200, 8, 5);
    let c = ctx(200, 32, 16);
    let qk = HeadQk::new(&q, &k, 8, 200).unwrap();
    let s = Pattern::Streaming(Streaming {
        sink: fixed(8),
        recent: fixed(50),
    });
    let a = Pattern::AShape(AShape {
        sink: fixed(8),
        local: fixed(50),
    });
    assert_eq!(
        build_index(&s, &c, &qk).unwrap(),
        build_index(&a, &c, &qk).unwrap()
    );
}

/// The vertical-slash estimate equals a direct f64 softmax, and the index follows the rule
/// `col_rank[j] < v || (some diagonal of rank < s touches the tile)` cell by cell.
#[test]
fn vertical_slash_rule_cell_by_cell() {
    let (n, b, d, last) = (113, 16, 16, 20);
    let (q, k) = structured(1, 1, n, d, 11);
    let qk = HeadQk::new(&q, &k, d, n).unwrap();
    let c = ctx(n, b, last);
    let (col, diag) = vertical_slash::estimate(&c, &qk).unwrap();
    // f64 reference from the definition
    let mut col_ref = vec![0.0f64; n];
    let mut diag_ref = vec![0.0f64; n];
    for i in n - last..n {
        let s: Vec<f64> = (0..=i)
            .map(|j| {
                let dot: f64 = (0..d)
                    .map(|x| q[i * d + x] as f64 * k[j * d + x] as f64)
                    .sum();
                dot / (d as f64).sqrt()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for j in 0..=i {
            let p = (s[j] - m).exp() / z;
            col_ref[j] += p;
            diag_ref[i - j] += p;
        }
    }
    for j in 0..n {
        assert!(
            (col[j] - col_ref[j]).abs() < 1e-5,
            "col {j}: {} vs {}",
            col[j],
            col_ref[j]
        );
        assert!((diag[j] - diag_ref[j]).abs() < 1e-5, "diag {j}");
    }
    let vs = vertical_slash::VsRanking::new(&c, &qk).unwrap();
    assert_eq!(
        &vs.columns.order[..4],
        &[0, 1, 2, 3],
        "forced columns first"
    );
    assert_eq!(vs.diagonals.order[0], 0, "diagonal 0 first");
    for (v, s) in [(0, 1), (4, 1), (10, 3), (50, 7), (113, 113), (7, 0)] {
        let index = vs.index(&c, v, s);
        let (v, s) = vertical_slash::clamp_budgets(&c, v, s);
        for i in 0..n {
            let qb = i / b;
            for j in 0..=i {
                let kb = j / b;
                let vertical = (vs.columns.rank[j] as usize) < v;
                let slash = (qb * b..((qb + 1) * b).min(n)).any(|r| {
                    (kb * b..((kb + 1) * b).min(n))
                        .filter(|&x| x <= r)
                        .any(|x| (vs.diagonals.rank[r - x] as usize) < s)
                });
                assert_eq!(
                    index.contains(i, j),
                    vertical || slash,
                    "({i}, {j}) v {v} s {s}"
                );
                assert_eq!(
                    (vs.block_rank(qb, kb) as usize) < s,
                    slash,
                    "block rank ({qb}, {kb})"
                );
            }
        }
    }
}

#[test]
fn block_sparse_forced_and_nested() {
    let (n, b, d) = (257, 16, 16);
    let (q, k) = structured(1, 1, n, d, 13);
    let qk = HeadQk::new(&q, &k, d, n).unwrap();
    let c = ctx(n, b, 16);
    let r = BlockRanking::new(&c, &qk).unwrap();
    for qb in 0..c.q_blocks() {
        let order = r.order(qb);
        assert_eq!(order[0], 0);
        assert!(order[..r.forced(qb)].contains(&(qb as u32)));
        let est: f64 = r.estimated_mass(qb).iter().sum();
        assert!((est - 1.0).abs() < 1e-9);
        assert!(
            r.coverage_count(qb, 1.0) == order.len()
                || r.estimated_mass(qb)[r.coverage_count(qb, 1.0)..]
                    .iter()
                    .all(|&e| e == 0.0)
        );
    }
    let mut prev: Option<HeadIndex> = None;
    for k in 1..=c.k_blocks() {
        let index = r.index_with(&c, |qb| r.top_k_count(qb, k));
        if let Some(p) = &prev {
            for i in 0..n {
                for j in 0..=i {
                    assert!(
                        !p.contains(i, j) || index.contains(i, j),
                        "top_k {k} not nested"
                    );
                }
            }
        }
        prev = Some(index);
    }
    assert_eq!(prev.map(|p| p.cells()), Some((n * (n + 1) / 2) as u64));
}

#[test]
fn token_select_keeps_top_per_chunk() {
    let score = [0.1, 0.5, 0.5, 0.2, 0.9, 0.0, 0.3];
    assert_eq!(token_select::select(&score, 3, 2, 0.0), vec![1, 2, 3, 4, 6]);
    assert_eq!(token_select::select(&score, 3, 0, 0.0), Vec::<usize>::new());
}

#[test]
fn errors_not_panics() {
    let (q, k) = structured(1, 1, 50, 8, 1);
    assert!(matches!(
        HeadQk::new(&q, &k[..8], 8, 50),
        Err(Error::Shape(_))
    ));
    let qk = HeadQk::new(&q, &k, 8, 50).unwrap();
    let dense = Pattern::Dense(Dense {});
    assert!(matches!(
        build_index(&dense, &ctx(49, 16, 16), &qk),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        build_index(&dense, &ctx(50, 0, 16), &qk),
        Err(Error::Pattern { .. })
    ));
    let grid = Pattern::Grid(Grid {
        stride: 4,
        phase: 4,
        width: 1,
        sink: fixed(1),
        local: fixed(1),
    });
    assert!(matches!(
        build_index(&grid, &ctx(50, 16, 16), &qk),
        Err(Error::Pattern { .. })
    ));
    let both = Pattern::BlockSparse(BlockSparse {
        top_k: Some(fixed(1)),
        coverage: Some(0.5),
    });
    assert!(build_index(&both, &ctx(50, 16, 16), &qk).is_err());
    let mut bad = q.clone();
    bad[49 * 8] = f32::NAN;
    let qk = HeadQk::new(&bad, &k, 8, 50).unwrap();
    let vs = Pattern::VerticalSlash(VerticalSlash {
        vertical: fixed(4),
        slash: fixed(4),
    });
    assert!(matches!(
        build_index(&vs, &ctx(50, 16, 16), &qk),
        Err(Error::Pattern { .. })
    ));
    // A layer input: head out of range.
    let shape = AttnShape {
        q_heads: 3,
        kv_heads: 1,
        seq_len: 50,
        head_dim: 8,
    };
    let (q3, k1) = structured(3, 1, 50, 8, 2);
    let inp = AttentionInput::new(shape, &q3, &k1, &k1).unwrap();
    assert!(HeadQk::from_input(&inp, 2).is_ok());
    assert!(matches!(HeadQk::from_input(&inp, 3), Err(Error::Shape(_))));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Nested budgets give nested cell sets (vertical-slash and A-shape).
    #[test]
    fn nested_budgets_nested_cells(
        n in 20usize..160, b in prop::sample::select(vec![16usize, 32]), seed in 0u64..1000,
        v in 0usize..60, dv in 0usize..40, s in 0usize..30, ds in 0usize..30,
    ) {
        let d = 8;
        let (q, k) = structured(1, 1, n, d, seed);
        let qk = HeadQk::new(&q, &k, d, n).unwrap();
        let c = ctx(n, b, 16);
        let vs = vertical_slash::VsRanking::new(&c, &qk).unwrap();
        let small = vs.index(&c, v, s);
        let big = vs.index(&c, v + dv, s + ds);
        let a_small = a_shape::index(&c, v, s);
        let a_big = a_shape::index(&c, v + dv, s + ds);
        for i in 0..n {
            for j in 0..=i {
                prop_assert!(!small.contains(i, j) || big.contains(i, j));
                prop_assert!(!a_small.contains(i, j) || a_big.contains(i, j));
            }
        }
        prop_assert!(small.cells() <= big.cells());
    }
}

#[test]
fn selection_cells_by_hand_and_by_brute_force() {
    // By hand: n 128, blocks of 64. Diagonal 0 alone: one 64-key tile per query block, each with
    // 64 * 65 / 2 causal cells. Adding diagonal 100: query block 1 also needs keys [0, 28), one tile
    // 0..64 fully below its rows (64 * 64 cells).
    let c = ctx(128, 64, 64);
    let one = vertical_slash::selection_cells(&c, &[], &[0]);
    assert_eq!((one.ranges, one.exact), (2 * 2080, 128));
    let two = vertical_slash::selection_cells(&c, &[], &[0, 100]);
    assert_eq!((two.ranges, two.exact), (2 * 2080 + 4096, 128 + 28));

    // Brute force on an odd length: `exact` counts the selected cells (a cell on a column and a
    // diagonal twice); range tiling covers every selected cell.
    let (n, b) = (203, 16);
    let c = ctx(n, b, 16);
    let columns = [0usize, 5, 77, 140, 202];
    let diagonals = [0usize, 1, 2, 30, 31, 64, 150];
    let cells = vertical_slash::selection_cells(&c, &columns, &diagonals);
    let (mut exact, mut distinct) = (0u64, 0u64);
    for i in 0..n {
        for j in 0..=i {
            let on = u64::from(columns.contains(&j)) + u64::from(diagonals.contains(&(i - j)));
            exact += on;
            distinct += u64::from(on > 0);
        }
    }
    assert_eq!(cells.exact, exact);
    assert!(cells.ranges >= distinct, "{cells:?} < {distinct}");
    // every diagonal cell lies in one of its query block's tiles; tiles are block_k keys, ascending
    for qb in 0..c.q_blocks() {
        let tiles = vertical_slash::range_tiles(&c, qb, &diagonals);
        assert!(tiles.iter().all(|t| t.len() == b));
        assert!(
            tiles.windows(2).all(|w| w[0].start < w[1].start),
            "{tiles:?}"
        );
        for i in c.q_rows(qb) {
            for &d in diagonals.iter().filter(|&&d| d <= i) {
                assert!(
                    tiles.iter().any(|t| t.contains(&(i - d))),
                    "qb {qb} row {i} d {d}"
                );
            }
        }
    }
    // ...and computes no more than the aligned blocks the same diagonals touch plus the columns.
    let aligned: u64 = (0..c.q_blocks())
        .map(|qb| {
            let rows = c.q_rows(qb);
            let blocks = (0..c.causal_k_blocks(qb)).filter(|&kb| {
                let keys = c.k_cols(kb);
                rows.clone()
                    .any(|i| keys.clone().any(|j| j <= i && diagonals.contains(&(i - j))))
            });
            let block_cells: u64 = blocks
                .map(|kb| runtime::pattern::causal_cells(&rows, &c.k_cols(kb)))
                .sum();
            let column_cells: u64 = columns
                .iter()
                .map(|&j| runtime::pattern::causal_cells(&rows, &(j..j + 1)))
                .sum();
            block_cells + column_cells
        })
        .sum();
    assert!(cells.ranges <= aligned, "{cells:?} > {aligned}");
}
