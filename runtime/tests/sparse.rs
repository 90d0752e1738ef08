//! `runtime::exec::sparse` and `runtime::prefill`: the sparse CPU executor computes exactly the cells of
//! its index (against the f64 reference restricted to those cells, at odd sizes, GQA ratios 1/3/4/8,
//! head_dim 64 and 128, block sizes 16..256); every pattern kind runs through `build_index`;
//! `SparsePrefill` refuses foreign plans, falls back to dense when asked, runs dense below
//! `dense_below`, shares indexes within KV groups, and rejects mismatched shapes.

// Helpers outside `#[test]` functions unwrap too (clippy's allow-unwrap-in-tests does not reach them).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use runtime::exec::reference::{dense_reference, reference_attention};
use runtime::exec::{dense_attention, sparse_attention, CellLists};
use runtime::pattern::{a_shape, build_index, HeadIndex, HeadQk, PatternContext};
use runtime::test_util::noise;
use runtime::{
    AttentionInput, AttnShape, DenseReason, Error, PrefillOptions, PrefillStats, SparsePrefill,
};
use schemas::{ModelInfo, Plan};

/// f32 executor vs f64 reference, relative to `max(1, max |want|)`: scores of magnitude up to ~8
/// (amplitude 1.5 at head_dim 64), f32 accumulation over up to a few thousand keys, exp2 error 2e-7.
/// The dense executor's tests use the same bound.
const TOL_F32: f64 = 2e-5;

/// A small deterministic generator for index choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Q, K, V for `shape`: noise, plus a sink at token 0, a rotating local band and heavy columns every
/// 37 tokens (so the patterns that estimate have something to find).
struct Inputs {
    shape: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Inputs {
    fn new(q_heads: usize, kv_heads: usize, seq_len: usize, head_dim: usize, seed: u64) -> Self {
        let shape = AttnShape {
            q_heads,
            kv_heads,
            seq_len,
            head_dim,
        };
        let d = head_dim;
        let mut q = noise(q_heads * seq_len * d, seed, 1.5);
        let mut k = noise(kv_heads * seq_len * d, seed + 1, 1.5);
        let v = noise(kv_heads * seq_len * d, seed + 2, 1.0);
        for (i, row) in q.chunks_exact_mut(d).enumerate() {
            let pos = (i % seq_len) as f32;
            row[0] += 1.5;
            row[1] += 1.5 * (pos * 0.05).cos();
            row[2] += 1.5 * (pos * 0.05).sin();
        }
        for (j, row) in k.chunks_exact_mut(d).enumerate() {
            let pos = j % seq_len;
            row[0] += match pos {
                0 => 3.0,
                p if p % 37 == 5 => 2.0,
                _ => 0.0,
            };
            row[1] += 1.5 * (pos as f32 * 0.05).cos();
            row[2] += 1.5 * (pos as f32 * 0.05).sin();
        }
        Self { shape, q, k, v }
    }

    fn input(&self) -> AttentionInput<'_> {
        AttentionInput::new(self.shape, &self.q, &self.k, &self.v).unwrap()
    }
}

/// Asserts `|got - want| <= tol * max(1, max |want|)` everywhere; prints the worst element.
fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1.0f64, |a, &b| a.max(b.abs()));
    let (worst, err) = worst_diff(got, want);
    assert!(
        err <= tol * scale,
        "{what}: worst element {worst}: got {}, want {}, error {err:e} > {tol:e} * {scale}",
        got[worst],
        want[worst]
    );
}

/// Index and size of the largest `|got - want|` (NaN counts as infinite).
fn worst_diff(got: &[f32], want: &[f64]) -> (usize, f64) {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            let e = (f64::from(g) - w).abs();
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .enumerate()
        .fold((0, 0.0), |a, (i, e)| if e > a.1 { (i, e) } else { a })
}

/// Runs the sparse executor with one index per head; output starts as NaN so unwritten rows show.
fn run_sparse<I: CellLists>(inp: &Inputs, indexes: &[&I]) -> Vec<f32> {
    let mut out = vec![f32::NAN; inp.q.len()];
    sparse_attention(&inp.input(), indexes, &mut out).unwrap();
    out
}

/// Per-query-block lists chosen at random (see [`random_lists`]).
struct Lists {
    ctx: PatternContext,
    blocks: Vec<Vec<u32>>,
    columns: Vec<Vec<u32>>,
}

impl CellLists for Lists {
    fn context(&self) -> &PatternContext {
        &self.ctx
    }
    fn key_blocks(&self, qb: usize) -> &[u32] {
        self.blocks.get(qb).map_or(&[], Vec::as_slice)
    }
    fn columns(&self, qb: usize) -> &[u32] {
        self.columns.get(qb).map_or(&[], Vec::as_slice)
    }
}

impl Lists {
    fn contains(&self, i: usize, j: usize) -> bool {
        let qb = i / self.ctx.block_q;
        j <= i
            && (self
                .key_blocks(qb)
                .contains(&((j / self.ctx.block_k) as u32))
                || self.columns(qb).contains(&(j as u32)))
    }
}

/// Random key blocks (each causal block with probability `p_block`) and random gathered columns
/// (about `cols` per query block) per query block, always covering the diagonal: for half of the query
/// blocks through the key blocks that hold it, for the other half through gathered columns (so the
/// masked gather path runs). Columns never fall inside listed blocks.
fn random_lists(ctx: PatternContext, p_block: f64, cols: usize, seed: u64) -> Lists {
    let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let mut blocks = Vec::new();
    let mut columns = Vec::new();
    for qb in 0..ctx.q_blocks() {
        let rows = ctx.q_rows(qb);
        let causal = ctx.causal_k_blocks(qb);
        let diag_blocks = rows.start / ctx.block_k..causal;
        let diag_as_columns = rng.chance(0.5);
        let mut b: Vec<u32> = (0..causal)
            .filter(|kb| {
                if diag_blocks.contains(kb) {
                    !diag_as_columns
                } else {
                    rng.chance(p_block)
                }
            })
            .map(|kb| kb as u32)
            .collect();
        b.sort_unstable();
        let inside = |j: usize, b: &[u32]| b.binary_search(&((j / ctx.block_k) as u32)).is_ok();
        let mut c: Vec<u32> = (0..cols)
            .map(|_| rng.below(rows.end))
            .chain(if diag_as_columns { rows.clone() } else { 0..0 })
            .filter(|&j| !inside(j, &b))
            .map(|j| j as u32)
            .collect();
        c.sort_unstable();
        c.dedup();
        blocks.push(b);
        columns.push(c);
    }
    Lists {
        ctx,
        blocks,
        columns,
    }
}

fn context(seq_len: usize, block_q: usize, block_k: usize) -> PatternContext {
    PatternContext {
        seq_len,
        block_q,
        block_k,
        last_q: 64,
    }
}

fn check_random(q_heads: usize, kv_heads: usize, n: usize, d: usize, bq: usize, bk: usize) {
    let what = format!("hq={q_heads} hkv={kv_heads} n={n} d={d} block {bq}x{bk}");
    let inp = Inputs::new(q_heads, kv_heads, n, d, (n * 31 + q_heads * 7 + d) as u64);
    let lists: Vec<Lists> = (0..q_heads)
        .map(|h| random_lists(context(n, bq, bk), 0.25, 24, (h * 1000 + n) as u64))
        .collect();
    let refs: Vec<&Lists> = lists.iter().collect();
    let got = run_sparse(&inp, &refs);
    let want = reference_attention(&inp.input(), |h, i, j| lists[h].contains(i, j)).unwrap();
    assert_close(&got, &want, TOL_F32, &what);
}

#[test]
fn random_index_sets_small() {
    // GQA ratios 1, 3, 4, 8 at 113 tokens; block sizes below, at and above the 64-key tile.
    for &(bq, bk) in &[(64, 64), (16, 16), (32, 128), (128, 32)] {
        check_random(1, 1, 113, 64, bq, bk);
        check_random(3, 1, 113, 64, bq, bk);
        check_random(8, 2, 113, 64, bq, bk);
        check_random(8, 1, 113, 64, bq, bk);
    }
}

#[test]
fn random_index_sets_1023() {
    check_random(3, 1, 1023, 64, 64, 64);
    check_random(8, 2, 1023, 64, 128, 64);
    check_random(8, 1, 1023, 64, 32, 16);
    check_random(4, 1, 1023, 128, 64, 128); // head_dim 128
}

#[test]
fn random_index_sets_4097() {
    check_random(8, 1, 4097, 64, 64, 64);
    check_random(2, 2, 4097, 64, 64, 32);
}

#[test]
fn covering_index_equals_dense() {
    for &(n, bq, bk) in &[(113, 64, 64), (1023, 32, 16), (700, 256, 128)] {
        let inp = Inputs::new(6, 2, n, 64, n as u64);
        let index = build_index(
            &schemas::Pattern::Dense(schemas::Dense {}),
            &context(n, bq, bk),
            &HeadQk::from_input(&inp.input(), 0).unwrap(),
        )
        .unwrap();
        let got = run_sparse(&inp, &[&index; 6]);
        let what = format!("dense index n={n} block {bq}x{bk}");
        assert_close(
            &got,
            &dense_reference(&inp.input()).unwrap(),
            TOL_F32,
            &what,
        );
        let mut dense = vec![0.0f32; got.len()];
        dense_attention(&inp.input(), &mut dense).unwrap();
        let (at, err) = worst_diff(
            &got,
            &dense.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
        );
        assert!(
            err < 1e-5,
            "{what}: vs dense executor, element {at} off by {err:e}"
        );
    }
}

#[test]
fn sinks_and_diagonal_only_differs_from_dense() {
    let n = 1023;
    let inp = Inputs::new(3, 1, n, 64, 9);
    let ctx = context(n, 64, 64);
    let index = a_shape::index(&ctx, 64, 1);
    assert!(index.density() < 0.2, "density {}", index.density());
    let got = run_sparse(&inp, &[&index; 3]);
    let want = reference_attention(&inp.input(), |_, i, j| index.contains(i, j)).unwrap();
    assert_close(&got, &want, TOL_F32, "a_shape sink=64 local=1");
    let (at, diff) = worst_diff(&got, &dense_reference(&inp.input()).unwrap());
    assert!(
        diff > 0.05,
        "sparse output should differ from dense, largest difference {diff:e} at {at}"
    );
}

/// Every pattern kind of format v1 (with parameters that exercise columns and blocks), built by
/// `build_index` as the prefill does, executed, and compared with the reference on its cells.
#[test]
fn every_pattern_kind_executes_its_index() {
    let plan = every_kind_plan();
    let mut kinds = Vec::new();
    for &(n, bq, bk) in &[(1100, 64, 64), (333, 32, 16)] {
        let inp = Inputs::new(4, 2, n, 64, 77 + n as u64);
        let ctx = context(n, bq, bk);
        for (layer, head) in plan.heads() {
            let pattern = &head.pattern;
            let what = format!("{} n={n} block {bq}x{bk}", pattern.kind());
            let qk = HeadQk::from_input(&inp.input(), head.head as usize).unwrap();
            let index = build_index(pattern, &ctx, &qk).unwrap_or_else(|e| panic!("{what}: {e}"));
            // Run the head alone (all four query heads on this index, checking the GQA mapping).
            let got = run_sparse(&inp, &[&index; 4]);
            let want = reference_attention(&inp.input(), |_, i, j| index.contains(i, j)).unwrap();
            assert_close(&got, &want, TOL_F32, &what);
            kinds.push((layer, pattern.kind()));
        }
    }
    for kind in schemas::Pattern::KINDS {
        assert!(kinds.iter().any(|(_, k)| *k == kind), "kind {kind} not run");
    }
}

fn every_kind_plan() -> Plan {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/plans/valid/every-kind.yaml");
    Plan::read(&path).unwrap()
}

/// Layer `layer` of the every-kind plan through `SparsePrefill`, vs the reference on each head's
/// index as `build_index` makes it.
#[test]
fn prefill_runs_every_kind_plan() {
    let plan = every_kind_plan();
    let mut sp = SparsePrefill::new(&plan, &plan.model, PrefillOptions::default()).unwrap();
    let n = 1100; // >= dense_below (1024)
    let inp = Inputs::new(4, 2, n, 64, 5);
    let ctx = PatternContext::new(n, &plan.defaults);
    for layer in 0..2 {
        let indexes: Vec<HeadIndex> = (0..4)
            .map(|h| {
                let qk = HeadQk::from_input(&inp.input(), h).unwrap();
                build_index(&plan.head(layer, h).unwrap().pattern, &ctx, &qk).unwrap()
            })
            .collect();
        assert_eq!(
            sp.layer_index(layer, &inp.input()).unwrap().as_deref(),
            Some(&indexes[..])
        );
        let mut out = vec![f32::NAN; inp.q.len()];
        let stats = sp.forward(layer, &inp.input(), &mut out).unwrap();
        let want = reference_attention(&inp.input(), |h, i, j| indexes[h].contains(i, j)).unwrap();
        assert_close(&out, &want, TOL_F32, &format!("every-kind layer {layer}"));
        let cells: u64 = indexes.iter().map(HeadIndex::cells).sum();
        assert_eq!(stats.cells, cells);
        assert_eq!(stats.dense_cells, 4 * (n as u64) * (n as u64 + 1) / 2);
        let planned_dense = usize::from(layer == 0); // layer 0 head 0 is `kind: dense`
        assert_eq!(stats.dense_count(DenseReason::Planned), planned_dense);
        assert!(stats.density() < 1.0);
    }
    let totals = sp.totals();
    assert_eq!(
        (totals.layers, totals.heads, totals.dense_planned),
        (2, 8, 1)
    );
}

fn model_info(plan: &Plan) -> ModelInfo {
    plan.model.clone()
}

#[test]
fn refuses_plan_for_another_model() {
    let plan = every_kind_plan();
    let mut heads = model_info(&plan);
    heads.query_heads = 9;
    let err = SparsePrefill::new(&plan, &heads, PrefillOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::PlanMismatch { .. }), "{msg}");
    assert!(
        msg.contains("model.query_heads: plan says 4, the model has 9"),
        "{msg}"
    );

    let mut other = model_info(&plan);
    other.fingerprint = format!("sha256:{}", "ab".repeat(32));
    let msg = SparsePrefill::new(&plan, &other, PrefillOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("model.fingerprint"), "{msg}");
}

#[test]
fn dense_fallback_runs_dense_and_counts() {
    let plan = every_kind_plan();
    // A different model of another shape: 6 query heads over 3 KV heads, one layer more.
    let mut other = model_info(&plan);
    other.query_heads = 6;
    other.kv_heads = 3;
    other.layers = 3;
    let options = PrefillOptions {
        dense_fallback: true,
        ..PrefillOptions::default()
    };
    let mut sp = SparsePrefill::new(&plan, &other, options).unwrap();
    let reason = sp.fallback_reason().unwrap().to_string();
    assert!(reason.contains("query_heads"), "{reason}");
    assert_eq!(sp.warnings().len(), 1);
    let n = 1500;
    let inp = Inputs::new(6, 3, n, 64, 11);
    let mut out = vec![f32::NAN; inp.q.len()];
    let stats = sp.forward(2, &inp.input(), &mut out).unwrap();
    assert_close(
        &out,
        &dense_reference(&inp.input()).unwrap(),
        TOL_F32,
        "fallback",
    );
    assert_eq!(stats.dense_count(DenseReason::PlanMismatch), 6);
    assert_eq!(stats.cells, stats.dense_cells);
    assert_eq!(sp.totals().dense_mismatch, 6);
}

#[test]
fn shape_mismatches_are_errors() {
    let plan = every_kind_plan();
    let mut sp = SparsePrefill::new(&plan, &plan.model, PrefillOptions::default()).unwrap();
    let cases = [
        ("q_heads", Inputs::new(8, 2, 1100, 64, 1), 0),
        ("kv_heads", Inputs::new(4, 4, 1100, 64, 1), 0),
        ("head_dim", Inputs::new(4, 2, 1100, 32, 1), 0),
        ("layer 2 out of range", Inputs::new(4, 2, 1100, 64, 1), 2),
    ];
    for (what, inp, layer) in cases {
        let mut out = vec![0.0f32; inp.q.len()];
        let err = sp.forward(layer, &inp.input(), &mut out).unwrap_err();
        assert!(
            matches!(err, Error::Shape(_)) && err.to_string().contains(what),
            "{what}: {err}"
        );
    }
    let inp = Inputs::new(4, 2, 1100, 64, 1);
    let mut short = vec![0.0f32; inp.q.len() - 1];
    let err = sp.forward(0, &inp.input(), &mut short).unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
    assert_eq!(sp.totals().layers, 0, "failed calls are not counted");
}

#[test]
fn below_dense_below_runs_dense() {
    let plan = every_kind_plan();
    let mut sp = SparsePrefill::new(&plan, &plan.model, PrefillOptions::default()).unwrap();
    let n = 1023; // dense_below is 1024
    let inp = Inputs::new(4, 2, n, 64, 3);
    let mut out = vec![f32::NAN; inp.q.len()];
    let stats: PrefillStats = sp.forward(1, &inp.input(), &mut out).unwrap();
    assert_close(
        &out,
        &dense_reference(&inp.input()).unwrap(),
        TOL_F32,
        "short",
    );
    assert_eq!(stats.dense_count(DenseReason::ShortSequence), 4);
    assert_eq!(sp.layer_index(1, &inp.input()).unwrap(), None);
    assert_eq!(stats.index_time, std::time::Duration::ZERO);
    assert_eq!(stats.density(), 1.0);
    assert_eq!(sp.totals().dense_short, 4);
}

/// `PrefillOptions::dense_below` replaces the plan's threshold in both directions.
#[test]
fn options_dense_below_overrides_the_plan() {
    let plan = every_kind_plan(); // dense_below 1024
    let with = |dense_below| PrefillOptions {
        dense_below: Some(dense_below),
        ..PrefillOptions::default()
    };
    let inp = Inputs::new(4, 2, 1100, 64, 5);
    let mut out = vec![f32::NAN; inp.q.len()];
    let mut sp = SparsePrefill::new(&plan, &plan.model, with(2048)).unwrap();
    assert_eq!(sp.dense_below(), 2048);
    let stats = sp.forward(1, &inp.input(), &mut out).unwrap();
    assert_eq!(stats.dense_count(DenseReason::ShortSequence), 4);
    assert_close(
        &out,
        &dense_reference(&inp.input()).unwrap(),
        TOL_F32,
        "dense below 2048",
    );

    let short = Inputs::new(4, 2, 1023, 64, 6);
    let mut out = vec![f32::NAN; short.q.len()];
    let mut sp = SparsePrefill::new(&plan, &plan.model, with(512)).unwrap();
    let stats = sp.forward(1, &short.input(), &mut out).unwrap();
    assert_eq!(stats.dense_count(DenseReason::ShortSequence), 0);
    assert!(
        stats.density() < 1.0,
        "sparse at 1023 >= 512: {}",
        stats.density()
    );
    assert!(out.iter().all(|x| x.is_finite()));
}

/// With `share_kv_group_indexes`, heads of a KV group with the same pattern use the index built from
/// the first of them; other patterns keep their own.
#[test]
fn kv_group_sharing_uses_the_first_heads_index() {
    let mut plan = every_kind_plan();
    plan.defaults.share_kv_group_indexes = true;
    // layer 1: heads 0, 1 (KV head 0) both vertical-slash; heads 2, 3 (KV head 1) differ.
    let vs = schemas::Pattern::VerticalSlash(schemas::VerticalSlash {
        vertical: schemas::Budget::Fixed(40),
        slash: schemas::Budget::Fixed(100),
    });
    plan.layers[1].heads[0].pattern = vs.clone();
    plan.layers[1].heads[1].pattern = vs;
    let mut sp = SparsePrefill::new(&plan, &plan.model, PrefillOptions::default()).unwrap();
    let n = 2000;
    let inp = Inputs::new(4, 2, n, 64, 21);
    let ctx = PatternContext::new(n, &plan.defaults);
    let own = |h: usize| {
        let qk = HeadQk::from_input(&inp.input(), h).unwrap();
        build_index(&plan.head(1, h).unwrap().pattern, &ctx, &qk).unwrap()
    };
    let indexes = [own(0), own(0), own(2), own(3)];
    assert_ne!(own(1), own(0), "heads 0 and 1 should differ on their own");
    assert_eq!(
        sp.layer_index(1, &inp.input()).unwrap().as_deref(),
        Some(&indexes[..])
    );
    let mut out = vec![f32::NAN; inp.q.len()];
    let stats = sp.forward(1, &inp.input(), &mut out).unwrap();
    let want = reference_attention(&inp.input(), |h, i, j| indexes[h].contains(i, j)).unwrap();
    assert_close(&out, &want, TOL_F32, "shared");
    assert_eq!(
        stats.cells,
        indexes.iter().map(HeadIndex::cells).sum::<u64>()
    );
}

#[test]
fn broken_lists_are_refused() {
    let inp = Inputs::new(1, 1, 100, 16, 1);
    let ctx = context(100, 32, 32);
    let good = random_lists(ctx, 0.5, 4, 3);
    type Break = fn(&mut Lists);
    let cases: [(&str, Break); 5] = [
        ("not strictly increasing", |l| l.blocks[3] = vec![1, 1]),
        ("key block 9 out of range", |l| l.blocks[3] = vec![9]),
        ("column 100 out of range", |l| l.columns[3] = vec![100]),
        ("columns not strictly increasing", |l| {
            l.columns[2] = vec![5, 2]
        }),
        ("inside listed key block", |l| {
            l.blocks[2] = vec![0];
            l.columns[2] = vec![3];
        }),
    ];
    for (what, breaks) in cases {
        let mut bad = Lists {
            ctx,
            blocks: good.blocks.clone(),
            columns: good.columns.clone(),
        };
        breaks(&mut bad);
        let mut out = vec![0.0f32; inp.q.len()];
        let err = sparse_attention(&inp.input(), &[&bad], &mut out).unwrap_err();
        assert!(
            matches!(err, Error::SparseIndex { head: 0, .. }) && err.to_string().contains(what),
            "{what}: {err}"
        );
    }
    let other = random_lists(context(99, 32, 32), 0.5, 4, 3);
    let mut out = vec![0.0f32; inp.q.len()];
    let err = sparse_attention(&inp.input(), &[&other], &mut out).unwrap_err();
    assert!(err.to_string().contains("seq_len 99"), "{err}");
    let err = sparse_attention(&inp.input(), &[&good, &good], &mut out).unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
}
