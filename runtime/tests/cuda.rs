//! `runtime::exec::cuda`: on a machine with a CUDA driver and GPU, the sparse kernel agrees with the CPU
//! dense executor (dense keys) and with an f64 reference over an index's cells; elsewhere (CI) every test
//! prints why it skipped and passes. The full device suite is scripts/gpu/device-tests.sh. The `bench_*`
//! tests cover `exec::cuda::bench` (inputs and JSON on the host; one short measurement on a device).

use runtime::exec::cuda::{
    bench, bf16_bits, bf16_to_f32, BlockChoice, BlockSparseBuilder, DeviceBuffer, FlatIndex, Keys,
    PlanPrefill, SparsePrefill, VerticalSlashBuilder,
};
use runtime::exec::{dense_attention, sparse_attention};
use runtime::pattern::{
    a_shape, block_sparse, build_index, query_adaptive, HeadIndex, HeadQk, PatternContext,
};
use runtime::PrefillOptions;
use runtime::{AttentionInput, AttnShape, Error};

/// The device, or `None` after printing why the test is skipped.
fn device() -> Option<SparsePrefill> {
    match SparsePrefill::new(0) {
        Ok(sp) => Some(sp),
        Err(Error::CudaNotCompiled) => {
            println!("skipped: runtime built without the `cuda` feature");
            None
        }
        Err(Error::CudaUnavailable(why)) => {
            println!("skipped: no CUDA driver or device ({why})");
            None
        }
        Err(e) => panic!("CUDA present but unusable: {e}"),
    }
}

/// Values in [-1, 1) rounded to bf16 (xorshift64).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    runtime::test_util::noise(n, seed, 2.0)
        .into_iter()
        .map(|x| bf16_to_f32(bf16_bits(x)))
        .collect()
}

/// A layer of `n` tokens and its pattern context with the CUDA kernels' 64 x 64 blocks, last_q 64.
fn layer(hq: usize, hkv: usize, n: usize, d: usize) -> (AttnShape, PatternContext) {
    let shape = AttnShape {
        q_heads: hq,
        kv_heads: hkv,
        seq_len: n,
        head_dim: d,
    };
    let ctx = PatternContext {
        seq_len: n,
        block_q: 64,
        block_k: 64,
        last_q: 64,
    };
    (shape, ctx)
}

/// A dense case of `hq` query heads over `hkv` KV heads, `n` tokens of head_dim `d`: noise inputs (seeds
/// `seed` .. `seed + 2`) on the device and their dense output by the CPU executor.
struct DenseCase {
    shape: AttnShape,
    want: Vec<f32>,
    q: DeviceBuffer<u16>,
    k: DeviceBuffer<u16>,
    v: DeviceBuffer<u16>,
}

impl DenseCase {
    fn new(
        sp: &SparsePrefill,
        (n, hq, hkv, d): (usize, usize, usize, usize),
        seed: u64,
    ) -> Result<Self, Error> {
        let shape = AttnShape {
            q_heads: hq,
            kv_heads: hkv,
            seq_len: n,
            head_dim: d,
        };
        let (q, k, v) = (
            noise(hq * n * d, seed),
            noise(hkv * n * d, seed + 1),
            noise(hkv * n * d, seed + 2),
        );
        let mut want = vec![0.0f32; q.len()];
        dense_attention(&AttentionInput::new(shape, &q, &k, &v)?, &mut want)?;
        Ok(Self {
            shape,
            want,
            q: sp.upload_bf16(&q)?,
            k: sp.upload_bf16(&k)?,
            v: sp.upload_bf16(&v)?,
        })
    }

    /// The device's dense output, written over `poison`, and its largest absolute error against the
    /// CPU (infinite where it is NaN).
    fn run(&self, sp: &SparsePrefill, poison: u16) -> Result<f32, Error> {
        let mut out = sp.zeros::<u16>(self.want.len())?;
        sp.fill(&mut out, poison)?;
        sp.forward(
            &self.shape,
            &self.q,
            &self.k,
            &self.v,
            Keys::Dense,
            &mut out,
        )?;
        Ok(max_abs_error(&sp.download(&out)?, &self.want))
    }
}

/// The largest absolute difference of a bf16 output to `want` (infinite where the output is NaN).
fn max_abs_error(got: &[u16], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (bf16_to_f32(g) - w).abs())
        .fold(
            0.0f32,
            |a, e| if e.is_nan() { f32::INFINITY } else { a.max(e) },
        )
}

#[test]
fn bf16_rounding_is_nearest_even() {
    assert_eq!(bf16_bits(1.0), 0x3f80);
    assert_eq!(bf16_to_f32(bf16_bits(1.0 + 1.0 / 256.0)), 1.0); // tie to even
    assert_eq!(bf16_to_f32(bf16_bits(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
    assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
}

#[test]
fn dense_keys_match_cpu_dense() {
    let Some(sp) = device() else { return };
    // both head dims run the TMA kernels: lengths below, at and just past one 64-row box, odd GQA
    // (9 x 3 x 64 is SmolLM2-135M's layer)
    for (n, hq, hkv, d) in [
        (200usize, 4usize, 2usize, 128usize),
        (97, 2, 1, 64),
        (1, 2, 1, 128),
        (1, 2, 1, 64),
        (17, 3, 3, 128),
        (17, 3, 3, 64),
        (64, 4, 1, 128),
        (64, 4, 2, 64),
        (65, 2, 2, 128),
        (65, 2, 2, 64),
        (129, 8, 2, 128),
        (129, 9, 3, 64),
    ] {
        let worst = DenseCase::new(&sp, (n, hq, hkv, d), 1)
            .unwrap()
            .run(&sp, 0xffff)
            .unwrap();
        // bf16 output rounding (2^-9 relative) plus bf16 P in the P.V product
        assert!(worst < 2e-2, "n={n} d={d}: max abs error {worst}");
    }
}

/// Dense attention on 128-key tiles (`attn_fwd_wsk*`, the default) against the 64-key kernels and the
/// CPU: lengths past the stage rings (3 stages of 128 keys at head_dim 128, 6 at 64), last groups with
/// one or two of their query blocks, a last tile only partly inside the sequence.
#[test]
fn dense_on_128_key_tiles_matches_the_64_key_kernels() {
    let Some(mut sp) = device() else { return };
    for (n, hq, hkv, d) in [
        (64 * 9 + 7, 4usize, 2usize, 128usize),
        (64 * 16 + 1, 2, 1, 128),
        (64 * 13 + 5, 9, 3, 64),
        (64 * 14, 3, 1, 64),
        (64 * 19 - 3, 6, 2, 64),
    ] {
        let case = DenseCase::new(&sp, (n, hq, hkv, d), 11).unwrap();
        sp.set_dense128(true).unwrap();
        let e128 = case.run(&sp, 0x7fc0).unwrap(); // NaN
        sp.set_dense128(false).unwrap();
        let e64 = case.run(&sp, 0x7fc0).unwrap();
        // bf16 output rounding plus bf16 P, as dense_keys_match_cpu_dense; and no worse than the
        // 64-key kernels by more than an output rounding step
        assert!(
            e128 < 2e-2,
            "n={n} d={d}: 128-key tiles, max abs error {e128}"
        );
        assert!(
            e128 <= e64 + 4e-3,
            "n={n} d={d}: 128-key {e128} against 64-key {e64}"
        );
    }
    sp.set_dense128(true).unwrap();
}

/// A plan with every pattern kind (fixtures/plans/valid/every-kind.yaml) run by `PlanPrefill`: each
/// layer's merged index equals the CPU's `build_index` of every head on the same (bf16) inputs, and
/// the output matches the CPU sparse executor over those indexes; with `share_kv_group_indexes`
/// heads 0 and 1 of layer 1 (both vertical-slash) use head 0's index and heads 2 and 3 (both
/// query-adaptive) head 2's, branch included. The query-adaptive head runs
/// with the fixture's tau and with tau 0 and 1, which force its vertical-slash and its query-aware
/// branch (the divergence lies in [0, ln 2]).
/// Buffers another framework owns, passed by device address: the same output, bit for bit, as our
/// own buffers, and dropping the wrappers frees nothing (the owners' buffers still read back).
#[test]
fn foreign_device_pointers_run_like_own_buffers() {
    let Some(sp) = device() else { return };
    let shape = AttnShape {
        q_heads: 9,
        kv_heads: 3,
        seq_len: 333,
        head_dim: 64,
    };
    let n = shape.seq_len;
    let (q, k, v) = (
        noise(9 * n * 64, 4),
        noise(3 * n * 64, 5),
        noise(3 * n * 64, 6),
    );
    let (qd, kd, vd) = (
        sp.upload_bf16(&q).unwrap(),
        sp.upload_bf16(&k).unwrap(),
        sp.upload_bf16(&v).unwrap(),
    );
    let mut own = sp.zeros::<u16>(q.len()).unwrap();
    sp.forward(&shape, &qd, &kd, &vd, Keys::Dense, &mut own)
        .unwrap();
    let want = sp.download(&own).unwrap();

    // the "engine's" allocation of the output, poisoned, and every tensor passed by address
    let mut theirs = sp.zeros::<u16>(q.len()).unwrap();
    sp.fill(&mut theirs, 0xffff).unwrap();
    sp.synchronize().unwrap();
    {
        // SAFETY: the addresses are live allocations of this device, of these lengths, used only
        // on this executor's stream while the wrappers live.
        let (fq, fk, fv, mut fo) = unsafe {
            (
                sp.wrap_device_ptr::<u16>(qd.device_ptr(), qd.len()),
                sp.wrap_device_ptr::<u16>(kd.device_ptr(), kd.len()),
                sp.wrap_device_ptr::<u16>(vd.device_ptr(), vd.len()),
                sp.wrap_device_ptr::<u16>(theirs.device_ptr(), theirs.len()),
            )
        };
        assert_eq!(fo.len(), q.len());
        sp.forward(&shape, &fq, &fk, &fv, Keys::Dense, &mut fo)
            .unwrap();
        sp.synchronize().unwrap();
    }
    let got = sp.download(&theirs).unwrap();
    assert_eq!(got, want, "output through device addresses differs");
    // the wrapped inputs are still allocated and intact
    assert_eq!(
        sp.download(&qd).unwrap(),
        q.iter()
            .map(|&x| runtime::exec::cuda::bf16_bits(x))
            .collect::<Vec<_>>()
    );
}

#[test]
fn plan_prefill_matches_the_cpu_prefill_on_every_kind() {
    let Some(sp) = device() else { return };
    // embedded: the test binary may run away from the repository (on the GPU machine)
    let fixture = schemas::Plan::from_yaml(
        std::path::Path::new("fixtures/plans/valid/every-kind.yaml"),
        include_str!("../../fixtures/plans/valid/every-kind.yaml"),
    )
    .unwrap();
    for (share, tau) in [
        (false, None),
        (true, None),
        (false, Some(0.0)),
        (false, Some(1.0)),
    ] {
        let mut plan = fixture.clone();
        plan.defaults.share_kv_group_indexes = share;
        if let (Some(t), schemas::Pattern::QueryAdaptive(p)) =
            (tau, &mut plan.layers[1].heads[2].pattern)
        {
            p.tau = t;
        }
        if share {
            let vs = schemas::Pattern::VerticalSlash(schemas::VerticalSlash {
                vertical: schemas::Budget::Fixed(40),
                slash: schemas::Budget::Fixed(100),
            });
            plan.layers[1].heads[0].pattern = vs.clone();
            plan.layers[1].heads[1].pattern = vs;
            // heads 2 and 3 (KV head 1) both query-adaptive: head 3 follows head 2's branch
            plan.layers[1].heads[3].pattern = plan.layers[1].heads[2].pattern.clone();
        }
        // the plan's own threshold: the executor's (gpu_dense_below) would run 1100 tokens dense
        let options = PrefillOptions {
            dense_below: Some(plan.defaults.dense_below),
            ..PrefillOptions::default()
        };
        let mut pp = PlanPrefill::new(&sp, &plan, &plan.model, options).unwrap();
        // the index's cells, as on the CPU, even where dense attention would be faster
        pp.set_dense_when_faster(false);
        let (n, hq, hkv, d) = (1100usize, 4usize, 2usize, 64usize);
        let shape = AttnShape {
            q_heads: hq,
            kv_heads: hkv,
            seq_len: n,
            head_dim: d,
        };
        let round =
            |x: Vec<f32>| -> Vec<f32> { x.iter().map(|&y| bf16_to_f32(bf16_bits(y))).collect() };
        let (q, k, v) = (
            round(noise(hq * n * d, 21)),
            round(noise(hkv * n * d, 22)),
            round(noise(hkv * n * d, 23)),
        );
        let (qd, kd, vd) = (
            sp.upload_bf16(&q).unwrap(),
            sp.upload_bf16(&k).unwrap(),
            sp.upload_bf16(&v).unwrap(),
        );
        let input = AttentionInput::new(shape, &q, &k, &v).unwrap();
        let ctx = PatternContext::new(n, &plan.defaults);
        // layer 0 twice: the second call takes its static heads' index from the cache
        for layer in [0, 1, 0] {
            let owner = |h: usize| {
                if share && layer == 1 && h % 2 == 1 {
                    h - 1
                } else {
                    h
                }
            };
            let want: Vec<HeadIndex> = (0..hq)
                .map(|h| {
                    let o = owner(h);
                    let qk = HeadQk::from_input(&input, o).unwrap();
                    build_index(&plan.head(layer, o).unwrap().pattern, &ctx, &qk).unwrap()
                })
                .collect();
            let mut out = sp.zeros::<u16>(q.len()).unwrap();
            sp.fill(&mut out, 0xffff).unwrap();
            // timed on layer 1 only: untimed forwards return with the attention still queued
            pp.set_timing(layer == 1);
            let stats = pp
                .forward(&sp, layer, &shape, &qd, &kd, &vd, &mut out)
                .unwrap();
            assert_eq!(stats.index_ms.is_some(), layer == 1, "{stats:?}");
            assert_eq!(stats.attention_ms.is_some(), layer == 1, "{stats:?}");
            let got = sp.download_index(pp.last_index().unwrap()).unwrap();
            let what = format!("share {share} tau {tau:?} layer {layer}: {stats:?}");
            assert_eq!(got, FlatIndex::from_heads(n, &want).unwrap(), "{what}");
            let refs: Vec<&HeadIndex> = want.iter().collect();
            let mut expect = vec![0.0f32; q.len()];
            sparse_attention(&input, &refs, &mut expect).unwrap();
            let device = sp.download(&out).unwrap();
            let worst = max_abs_error(&device, &expect);
            assert!(worst < 2e-2, "{what}: max abs error {worst}");
            // the host form: the same output from host tensors (the inputs are bf16 already)
            let mut host = vec![f32::NAN; q.len()];
            pp.forward_host(&sp, layer, &input, &mut host).unwrap();
            assert!(
                host.iter()
                    .zip(&device)
                    .all(|(a, &b)| a.to_bits() == bf16_to_f32(b).to_bits()),
                "{what}: forward_host differs from forward"
            );
            assert_eq!(stats.shared, 2 * usize::from(share && layer == 1), "{what}");
            let sources = (
                stats.gpu_vertical_slash,
                stats.gpu_block_sparse,
                stats.gpu_token_select,
                stats.gpu_query_adaptive,
                stats.host_static,
            );
            let expected = match (layer, share) {
                (0, _) => (1, 0, 0, 0, 3), // dense, streaming, a_shape on the host; vertical-slash
                (_, false) => (0, 1, 1, 1, 1), // block-sparse, token-select, query-adaptive; grid
                (_, true) => (1, 0, 0, 1, 0), // heads 0, 1 vertical-slash; 2, 3 query-adaptive
            };
            assert_eq!(sources, expected, "{what}");
        }
        // A layer whose index covers every causal tile (every head `dense`) runs dense attention
        // after building it, unless told not to.
        let mut all_dense = plan.clone();
        for hp in &mut all_dense.layers[1].heads {
            hp.pattern = schemas::Pattern::Dense(schemas::Dense {});
        }
        let mut dense_expect = vec![0.0f32; q.len()];
        runtime::exec::dense_attention(&input, &mut dense_expect).unwrap();
        for faster in [true, false] {
            let mut pd = PlanPrefill::new(&sp, &all_dense, &plan.model, options).unwrap();
            pd.set_dense_when_faster(faster);
            let mut out = sp.zeros::<u16>(q.len()).unwrap();
            sp.fill(&mut out, 0xffff).unwrap();
            let stats = pd.forward(&sp, 1, &shape, &qd, &kd, &vd, &mut out).unwrap();
            assert_eq!(stats.dense, None, "{stats:?}");
            assert_eq!(stats.dense_faster, faster && sp.dense128(d), "{stats:?}");
            assert!(pd.last_index().is_some(), "the index is kept either way");
            let worst = max_abs_error(&sp.download(&out).unwrap(), &dense_expect);
            assert!(
                worst < 2e-2,
                "dense when faster {faster}: max abs error {worst}"
            );
        }
        // without a threshold of its own the executor runs such a short layer dense
        let mut dflt =
            PlanPrefill::new(&sp, &plan, &plan.model, PrefillOptions::default()).unwrap();
        let floor = runtime::exec::cuda::gpu_dense_below(&plan.model);
        assert_eq!(dflt.dense_below(), plan.defaults.dense_below.max(floor));
        assert!(n < floor as usize, "{n} tokens, GPU threshold {floor}");
        let mut out = sp.zeros::<u16>(q.len()).unwrap();
        let stats = dflt
            .forward(&sp, 1, &shape, &qd, &kd, &vd, &mut out)
            .unwrap();
        assert_eq!(stats.dense, Some(runtime::DenseReason::ShortSequence));
        assert!(dflt.last_index().is_none());
    }
}

/// The GPU token-select builder selects what `pattern::token_select` selects from the same Q and K
/// (its vertical scores in f32 on the GPU, f64 on the CPU): with and without a spread, a head left
/// out, an odd length.
#[test]
fn token_select_builder_matches_cpu_selection() {
    use runtime::exec::cuda::{TokenChoice, TokenSelectBuilder, VerticalSlashBuilder};
    use runtime::pattern::token_select;
    let Some(sp) = device() else { return };
    for (n, d) in [(1100usize, 64usize), (2050, 128)] {
        let (hq, hkv) = (4usize, 2usize);
        let (shape, ctx) = layer(hq, hkv, n, d);
        let pats = [
            schemas::TokenSelect {
                block: 64,
                keep: schemas::Budget::Fixed(8),
                spread: 0.0,
                sink: schemas::Budget::Fixed(64),
                local: schemas::Budget::Fixed(256),
            },
            schemas::TokenSelect {
                block: 128,
                keep: schemas::Budget::Fixed(16),
                spread: 1.0,
                sink: schemas::Budget::Fixed(0),
                local: schemas::Budget::Fixed(100),
            },
            schemas::TokenSelect {
                block: 50,
                keep: schemas::Budget::Fixed(3),
                spread: 0.5,
                sink: schemas::Budget::Fixed(130),
                local: schemas::Budget::Fixed(64),
            },
        ];
        let (q, k) = (noise(hq * n * d, 31), noise(hkv * n * d, 32));
        let (qd, kd) = (sp.upload_bf16(&q).unwrap(), sp.upload_bf16(&k).unwrap());
        let mut vs = VerticalSlashBuilder::new(&sp, &shape, &ctx).unwrap();
        vs.estimate(&sp, &qd, &kd).unwrap();
        let mut ts = TokenSelectBuilder::new(&sp, &shape).unwrap();
        let choices: Vec<Option<TokenChoice>> = (0..hq)
            .map(|h| (h != 3).then(|| TokenChoice::from_pattern(&pats[h], &ctx).unwrap()))
            .collect();
        let mut ix = None;
        ts.build_heads(&sp, &vs, &choices, &mut ix).unwrap();
        let got = sp.download_index(ix.as_ref().unwrap()).unwrap();
        let want: Vec<HeadIndex> = (0..hq)
            .map(|h| {
                if h == 3 {
                    return HeadIndex::empty(&ctx);
                }
                let g = h / (hq / hkv);
                let qk = HeadQk::new(
                    &q[h * n * d..(h + 1) * n * d],
                    &k[g * n * d..(g + 1) * n * d],
                    d,
                    n,
                )
                .unwrap();
                token_select::index(&ctx, &qk, &pats[h]).unwrap()
            })
            .collect();
        assert_eq!(got, FlatIndex::from_heads(n, &want).unwrap(), "n={n} d={d}");
    }
}

/// The GPU block-sparse builder selects what `pattern::block_sparse` selects on the same (bf16) Q and
/// K, for both head dims, both kinds of choice, an odd length and GQA.
#[test]
fn block_sparse_builder_matches_cpu_selection() {
    let Some(sp) = device() else { return };
    let choices = [
        BlockChoice::TopK(4),
        BlockChoice::Coverage(0.8),
        BlockChoice::TopK(1),
        BlockChoice::CoverageAtLeast(0.3, 6),
    ];
    for (n, d) in [(1100usize, 64usize), (1100, 128), (65, 64)] {
        let (hq, hkv) = (4usize, 2usize);
        let (shape, ctx) = layer(hq, hkv, n, d);
        let (q, k) = (noise(hq * n * d, 7), noise(hkv * n * d, 8));
        let mut b = BlockSparseBuilder::new(&sp, &shape, &ctx).unwrap();
        let (qd, kd) = (sp.upload_bf16(&q).unwrap(), sp.upload_bf16(&k).unwrap());
        let mut ix = None;
        b.build(&sp, &qd, &kd, &choices, &mut ix).unwrap();
        let got = sp.download_index(ix.as_ref().unwrap()).unwrap();
        let want: Vec<_> = (0..hq)
            .map(|h| {
                let g = h / (hq / hkv);
                let qk = HeadQk::new(
                    &q[h * n * d..(h + 1) * n * d],
                    &k[g * n * d..(g + 1) * n * d],
                    d,
                    n,
                )
                .unwrap();
                let p = match choices[h] {
                    BlockChoice::TopK(t) => schemas::BlockSparse {
                        top_k: Some(schemas::Budget::Fixed(t as u64)),
                        coverage: None,
                    },
                    BlockChoice::Coverage(c) => schemas::BlockSparse {
                        top_k: None,
                        coverage: Some(c),
                    },
                    BlockChoice::CoverageAtLeast(gamma, floor) => {
                        // query-adaptive's query-aware branch
                        let qa = schemas::QueryAdaptive {
                            gamma,
                            tau: 1.0,
                            min_budget: schemas::Budget::Fixed(floor as u64),
                        };
                        let ranking = block_sparse::BlockRanking::new(&ctx, &qk).unwrap();
                        return query_adaptive::query_aware_index(&ctx, &ranking, &qa);
                    }
                };
                block_sparse::index(&ctx, &qk, &p).unwrap()
            })
            .collect();
        let want_flat = FlatIndex::from_heads(n, &want).unwrap();
        assert_eq!(got, want_flat, "n={n} d={d}");
        // heads without a choice get empty lists, the others the same as before
        let some = [Some(choices[0]), None, Some(choices[2]), None];
        b.build_heads(&sp, &qd, &kd, &some, &mut ix).unwrap();
        let got = sp.download_index(ix.as_ref().unwrap()).unwrap();
        let empty = runtime::HeadIndex::empty(&ctx);
        let partial: Vec<_> = (0..hq)
            .map(|h| {
                if some[h].is_some() {
                    want[h].clone()
                } else {
                    empty.clone()
                }
            })
            .collect();
        assert_eq!(
            got,
            FlatIndex::from_heads(n, &partial).unwrap(),
            "n={n} d={d} partial"
        );
    }
}

/// Host only (runs without a GPU): the per-head choices of the GPU builders resolve a plan's patterns
/// as the CPU patterns do, and refuse what the CPU refuses, naming the kind.
#[test]
fn builder_choices_resolve_plan_patterns() {
    use runtime::exec::cuda::TokenChoice;
    let ctx = PatternContext {
        seq_len: 4096,
        block_q: 64,
        block_k: 64,
        last_q: 64,
    };
    let frac = |f: f64| {
        schemas::Budget::Fraction(schemas::FractionBudget {
            fraction: f,
            min: 1,
            max: None,
        })
    };
    let bs = |top_k, coverage| schemas::BlockSparse { top_k, coverage };
    assert_eq!(
        BlockChoice::from_pattern(&bs(Some(frac(0.25)), None), &ctx).unwrap(),
        BlockChoice::TopK(1024)
    );
    assert_eq!(
        BlockChoice::from_pattern(&bs(None, Some(0.9)), &ctx).unwrap(),
        BlockChoice::Coverage(0.9)
    );
    for bad in [
        bs(None, None),
        bs(Some(schemas::Budget::Fixed(4)), Some(0.5)),
        bs(None, Some(1.5)),
        bs(None, Some(0.0)),
    ] {
        let e = BlockChoice::from_pattern(&bad, &ctx).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Pattern {
                    kind: "block_sparse",
                    ..
                }
            ),
            "{bad:?}: {e}"
        );
    }
    let ts = |block, keep, spread| schemas::TokenSelect {
        block,
        keep: schemas::Budget::Fixed(keep),
        spread,
        sink: schemas::Budget::Fixed(64),
        local: frac(0.125),
    };
    let c = TokenChoice::from_pattern(&ts(64, 100, 0.5), &ctx).unwrap();
    assert_eq!(
        (c.block, c.keep, c.spread, c.sink, c.local),
        (64, 64, 0.5, 64, 512)
    );
    for bad in [ts(0, 8, 0.0), ts(64, 8, -1.0), ts(64, 8, f64::NAN)] {
        let e = TokenChoice::from_pattern(&bad, &ctx).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Pattern {
                    kind: "token_select",
                    ..
                }
            ),
            "{bad:?}: {e}"
        );
    }
}

#[test]
fn a_shape_index_matches_reference_on_cells() {
    let Some(sp) = device() else { return };
    let (n, hq, hkv, d) = (333usize, 2usize, 1usize, 128usize);
    let (shape, ctx) = layer(hq, hkv, n, d);
    let heads = vec![a_shape::index(&ctx, 64, 64), a_shape::index(&ctx, 1, 128)];
    let flat = FlatIndex::from_heads(n, &heads).unwrap();
    let (q, k, v) = (
        noise(hq * n * d, 4),
        noise(hkv * n * d, 5),
        noise(hkv * n * d, 6),
    );
    let ix = sp.upload_flat(&flat).unwrap();
    let (qd, kd, vd) = (
        sp.upload_bf16(&q).unwrap(),
        sp.upload_bf16(&k).unwrap(),
        sp.upload_bf16(&v).unwrap(),
    );
    let mut out = sp.zeros::<u16>(q.len()).unwrap();
    sp.fill(&mut out, 0xffff).unwrap();
    sp.forward(&shape, &qd, &kd, &vd, Keys::Index(&ix), &mut out)
        .unwrap();
    let got = sp.download(&out).unwrap();
    let mut worst = 0.0f64;
    for (h, index) in heads.iter().enumerate() {
        for i in 0..n {
            let keys: Vec<usize> = (0..=i).filter(|&j| index.contains(i, j)).collect();
            let qi = &q[(h * n + i) * d..(h * n + i + 1) * d];
            let s: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    let kj = &k[j * d..(j + 1) * d];
                    qi.iter()
                        .zip(kj)
                        .map(|(a, b)| f64::from(a * b))
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for c in 0..d {
                let r: f64 = keys
                    .iter()
                    .zip(&s)
                    .map(|(&j, x)| (x - m).exp() / z * f64::from(v[j * d + c]))
                    .sum();
                let e = (f64::from(bf16_to_f32(got[(h * n + i) * d + c])) - r).abs();
                worst = if e.is_nan() {
                    f64::INFINITY
                } else {
                    worst.max(e)
                };
            }
        }
    }
    assert!(worst < 2e-2, "max abs error {worst}");
}

#[test]
fn bench_inputs_are_deterministic_with_sink_lines_and_band() {
    use runtime::exec::cuda::bench::{structured, MIN_STRUCTURED_HEAD_DIM};
    let shape = AttnShape {
        q_heads: 4,
        kv_heads: 2,
        seq_len: 300,
        head_dim: 128,
    };
    let (n, d) = (shape.seq_len, shape.head_dim);
    let (q, k, v) = structured(&shape, 9).unwrap();
    assert_eq!(
        (q.len(), k.len(), v.len()),
        (4 * n * d, 2 * n * d, 2 * n * d)
    );
    assert_eq!(
        structured(&shape, 9).unwrap(),
        (q.clone(), k.clone(), v.clone())
    );
    assert_ne!(structured(&shape, 10).unwrap().2, v);
    for g in 0..2 {
        assert_eq!(k[g * n * d], 6.0, "sink on key 0, dim 0");
        let heavy = (0..n).filter(|&j| k[(g * n + j) * d] == 3.5).count();
        assert_eq!(heavy, 16, "16 vertical lines");
    }
    // the band: q_i . k_i on dims 8..32 is 12 pairs of amplitude 2 in phase, 12 * 4 = 48
    let band = |i: usize, j: usize| -> f32 {
        (8..MIN_STRUCTURED_HEAD_DIM)
            .map(|c| q[i * d + c] * k[j * d + c])
            .sum()
    };
    assert!((band(200, 200) - 48.0).abs() < 1e-3);
    assert!(band(200, 200) > band(200, 150));
    let narrow = AttnShape {
        head_dim: 16,
        ..shape
    };
    assert!(matches!(structured(&narrow, 9), Err(Error::Shape(_))));
}

/// The two bands place the top diagonals where their docs say: at 32K with the benchmark's budgets,
/// the local band's 6096 top diagonals all lie within 8192 offsets of the main one, the scattered
/// band's mostly beyond (CPU selection, `runtime::pattern::vertical_slash`). `structured` is the
/// scattered band, and the local band's q_i . k_i is 12 pairs of amplitude 3 in phase (108).
#[test]
fn bench_bands_place_the_top_diagonals() {
    use runtime::exec::cuda::bench::{structured, structured_band, Band, BenchConfig};
    use runtime::pattern::vertical_slash::VsRanking;
    let n = 32_768;
    let cfg = BenchConfig::new(n);
    let shape = AttnShape {
        q_heads: 1,
        kv_heads: 1,
        ..cfg.shape()
    };
    let d = shape.head_dim;
    let far = |band: Band| {
        let (q, k, _) = structured_band(&shape, cfg.seed(), band).unwrap();
        let ranking = VsRanking::new(&cfg.context(), &HeadQk::new(&q, &k, d, n).unwrap()).unwrap();
        let top = ranking.top_diagonals(cfg.slash);
        assert_eq!(top.len(), cfg.slash);
        top.iter().filter(|&&off| off >= 8192).count()
    };
    assert_eq!(far(Band::Local), 0);
    assert!(far(Band::Scattered) > cfg.slash / 2);
    let small = AttnShape {
        seq_len: 300,
        ..shape
    };
    assert_eq!(
        structured(&small, 9).unwrap(),
        structured_band(&small, 9, Band::Scattered).unwrap()
    );
    let (q, k, _) = structured_band(&small, 9, Band::Local).unwrap();
    let dot: f32 = (8..bench::MIN_STRUCTURED_HEAD_DIM)
        .map(|c| q[200 * d + c] * k[200 * d + c])
        .sum();
    assert!((dot - 108.0).abs() < 1e-3, "{dot}");
    assert_eq!("local".parse::<Band>(), Ok(Band::Local));
    assert_eq!(" scattered".parse::<Band>(), Ok(Band::Scattered));
    assert!("wide"
        .parse::<Band>()
        .unwrap_err()
        .contains("scattered or local"));
}

#[test]
fn bench_result_json_keeps_the_keys_baselines_py_reads() {
    use runtime::exec::cuda::bench::{median, BenchConfig, BenchResult};
    assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    assert!(median(vec![]).is_nan());
    // made-up figures: formatting only
    let r = BenchResult {
        config: BenchConfig::new(262144),
        density: 0.135,
        estimate_ms: 1.8,
        select_ms: 2.0,
        sparse_attn_ms: 231.6,
        e2e_ms: 234.7,
        dense_ms: 1728.0,
        entries: (35, 43),
        device: "GPU \"x\"".into(),
        kernel: "k".into(),
        inputs_s: 1.0,
    };
    assert_eq!(r.config.dense_reps(), 3);
    // 2 N^2 d H FLOPs in 1728 ms
    let n = 262144.0f64;
    let dense_tflops = 2.0 * n * n * 128.0 * 32.0 / 1.728 / 1e12;
    assert!((r.dense_tflops() - dense_tflops).abs() < 1e-9 * dense_tflops);
    let js = r.to_json();
    let dense_tflops = format!("\"dense_tflops\":{dense_tflops:.1},");
    for needle in [
        "{\"n\":262144,\"q_heads\":32,\"kv_heads\":8,\"head_dim\":128,\"v\":1000,\"s\":6096,",
        "\"reps\":10,\"dense_reps\":3,\"density\":0.13500,",
        "\"e2e_ms\":234.7000,",
        &dense_tflops,
        "\"entries\":[35,43]",
        "\"device\":\"GPU \\\"x\\\"\"",
        "\"band\":\"scattered\"}",
    ] {
        assert!(js.contains(needle), "{needle} missing from {js}");
    }
    assert!(r
        .summary()
        .starts_with("bench n=262144 (scattered band): density 0.1350;"));
    let small = BenchResult {
        config: BenchConfig {
            q_heads: 9,
            kv_heads: 3,
            head_dim: 64,
            ..BenchConfig::new(8192)
        },
        ..r
    };
    assert!(small
        .to_json()
        .starts_with("{\"n\":8192,\"q_heads\":9,\"kv_heads\":3,\"head_dim\":64,"));
    let flops = 2.0 * 8192.0f64 * 8192.0 * 64.0 * 9.0;
    assert!((small.dense_flops() - flops).abs() < 1e-9 * flops);
}

#[test]
fn bench_measures_one_short_length() {
    use runtime::exec::cuda::bench::{measure, BenchConfig};
    let Some(sp) = device() else { return };
    let cfg = BenchConfig {
        reps: 2,
        ..BenchConfig::new(4096)
    };
    let (r, index) = measure(&sp, &cfg).unwrap();
    assert!(r.density > 0.0 && r.density <= 1.0, "{r:?}");
    assert_eq!(r.density, index.density());
    assert_eq!(r.entries, (index.blk_idx.len(), index.col_idx.len()));
    for t in [
        r.estimate_ms,
        r.select_ms,
        r.sparse_attn_ms,
        r.e2e_ms,
        r.dense_ms,
    ] {
        assert!(t.is_finite() && t > 0.0, "{r:?}");
    }
    println!("{}", r.summary());
}

/// The union of the column lists of each group of two or three query blocks, with each entry's
/// blocks in the top two or three bits, as the warp-specialized kernels read it: against a host
/// merge, on lists that overlap in part, are empty, shorter and longer than a warp and than the merge
/// path's 2,048-position tiles, and on a number of query blocks that leaves the last group short.
/// The short case's dense groups take the bitmap path (`ix_group_union_dense`); the long ones (~70K
/// tokens, past the bitmaps' 32,768) and the sparse ones the merge path, which the short case's
/// groups of nearly empty lists reach too.
#[test]
fn group_union_matches_host_merge() {
    let Some(sp) = device() else { return };
    let n: usize = 64 * 41 - 5;
    let pick = noise(3 * n.div_ceil(64) * n, 11);
    // list e keeps token t with a probability that depends on e (0 to ~0.9), from a window shared
    // with its neighbours so that a group's lists overlap
    let (longest, _) = check_group_union(&sp, 3, n, |e, t| {
        let p = (e % 7) as f32 / 7.0;
        t >= (e / 2) % 3 * 40 && pick[e * n + t] * 0.5 + 0.5 < p
    });
    assert!(
        longest > 2048,
        "the unions should exceed 2,048 entries: {longest}"
    );
    let n: usize = 64 * 511 - 5;
    let pick = noise(n.div_ceil(64) * n, 12);
    check_group_union(&sp, 1, n, |e, t| {
        let p = (e % 5) as f32 / 5.0;
        t >= (e / 2) % 3 * 40 && pick[e * n + t] * 0.5 + 0.5 < p
    });
    // ~70K tokens: list e keeps about 1 token in 64 (a hash of e and t) and, for e % 4 == 1, a run of
    // 3,000 tokens around each multiple of 32,768; shared tokens between neighbours come from the
    // runs and from the hash's coincidences
    let n = 64 * 1100 - 7;
    let (_, span) = check_group_union(&sp, 1, n, |e, t| {
        let run = e % 4 == 1 && (t % 32768 < 1500 || t % 32768 >= 32768 - 1500) && t >= 1500;
        let hash = (t as u64 ^ (e as u64 / 2) << 20).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58;
        run || hash == 0
    });
    assert!(span > 65536, "a union should reach past 65,536: {span}");
    // sparse lists over ~70K tokens (about 1 token in 256, the same for neighbours e = 2k, 2k + 1),
    // across the merge's 2,048-position tiles where a run of 2,500 tokens is kept
    let (longest, _) = check_group_union(&sp, 2, n, |e, t| {
        let hash = (t as u64 ^ (e as u64 / 2) << 20).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56;
        hash == 0 || (e % 5 == 2 && (20_000..22_500).contains(&t))
    });
    assert!(longest > 2048, "the merges should exceed a tile: {longest}");
}

/// Uploads the lists `keep(e, t)` (token t < n in list e = h * q_blocks + qb) and checks
/// `ix_group_union` for groups of two and three against a host merge; returns the longest union and
/// the largest token seen.
#[allow(clippy::unwrap_used, clippy::expect_used)] // part of the test above: a failure fails it
fn check_group_union(
    sp: &SparsePrefill,
    q_heads: usize,
    n: usize,
    keep: impl Fn(usize, usize) -> bool,
) -> (usize, usize) {
    let q_blocks = n.div_ceil(64);
    let mut f = FlatIndex {
        q_heads,
        seq_len: n,
        q_blocks,
        blk_off: vec![0; q_heads * q_blocks + 1],
        col_off: vec![0],
        ..FlatIndex::default()
    };
    let mut lists = Vec::new();
    for e in 0..q_heads * q_blocks {
        let list: Vec<u32> = (0..n).filter(|&t| keep(e, t)).map(|t| t as u32).collect();
        f.col_idx.extend_from_slice(&list);
        f.col_off.push(f.col_idx.len() as u32);
        lists.push(list);
    }
    let ix = sp.upload_flat(&f).unwrap();
    let (mut longest, mut span) = (0, 0);
    for group in [2usize, 3] {
        let (got, len) = sp
            .download_group_union(&ix, group)
            .unwrap()
            .expect("union enabled");
        let q_groups = q_blocks.div_ceil(group);
        let token_bits = 32 - group;
        for h in 0..q_heads {
            for p in 0..q_groups {
                let e = h * q_blocks + group * p;
                let members: Vec<&[u32]> = (0..group)
                    .filter(|i| group * p + i < q_blocks)
                    .map(|i| lists[e + i].as_slice())
                    .collect();
                let mut want: Vec<u32> = members.iter().flat_map(|l| l.iter()).copied().collect();
                want.sort_unstable();
                want.dedup();
                span = span.max(want.last().map_or(0, |&t| t as usize));
                let want: Vec<u32> = want
                    .into_iter()
                    .map(|t| {
                        members.iter().enumerate().fold(t, |x, (i, l)| {
                            x | (l.binary_search(&t).is_ok() as u32) << (token_bits + i)
                        })
                    })
                    .collect();
                let start = f.col_off[e] as usize;
                let l = len[h * q_groups + p] as usize;
                assert_eq!(
                    l,
                    want.len(),
                    "n {n}, group of {group}, head {h}, group {p}: union length"
                );
                assert_eq!(
                    &got[start..start + l],
                    &want[..],
                    "n {n}, group of {group}, head {h}, group {p}"
                );
                longest = longest.max(l);
            }
        }
    }
    (longest, span)
}

/// The warp-specialized kernels give bit-identical outputs whether their producer merges the query
/// blocks' lists in line or reads the schedule `ws_schedule*` wrote before the launch (the same order
/// by construction), on GPU-built vertical-slash indexes (scattered diagonals, union column lists)
/// and block-sparse ones, at lengths whose last group of query blocks is partial.
#[test]
fn scheduled_tile_order_gives_identical_outputs() {
    let Some(mut sp) = device() else { return };
    for (n, d) in [
        (64 * 41 - 5, 64usize),
        (64 * 40 + 3, 64),
        (64 * 41 - 5, 128),
    ] {
        let (hq, hkv) = (6usize, 2usize);
        let (shape, ctx) = layer(hq, hkv, n, d);
        let (q, k, v) = bench::structured(&shape, 5).unwrap();
        let (qd, kd, vd) = (
            sp.upload_bf16(&q).unwrap(),
            sp.upload_bf16(&k).unwrap(),
            sp.upload_bf16(&v).unwrap(),
        );
        let mut vs = None;
        VerticalSlashBuilder::new(&sp, &shape, &ctx)
            .unwrap()
            .build(&sp, &qd, &kd, &vec![(40, 300); hq], &mut vs)
            .unwrap();
        let mut bs = None;
        let choices = [BlockChoice::TopK(5), BlockChoice::Coverage(0.7)];
        BlockSparseBuilder::new(&sp, &shape, &ctx)
            .unwrap()
            .build(
                &sp,
                &qd,
                &kd,
                &[choices[0], choices[1]].repeat(hq / 2),
                &mut bs,
            )
            .unwrap();
        for (what, ix) in [("vertical-slash", &vs), ("block-sparse", &bs)] {
            let ix = ix.as_ref().unwrap();
            let mut run = |from: Option<usize>| {
                sp.set_schedule_from(from).unwrap();
                let mut out = sp.zeros::<u16>(q.len()).unwrap();
                sp.fill(&mut out, 0x7fc0).unwrap(); // NaN
                sp.forward(&shape, &qd, &kd, &vd, Keys::Index(ix), &mut out)
                    .unwrap();
                sp.download(&out).unwrap()
            };
            let (inline, scheduled) = (run(None), run(Some(0)));
            assert!(
                inline.iter().all(|&x| !bf16_to_f32(x).is_nan()),
                "{what} n={n} d={d}: unwritten output"
            );
            assert!(
                inline == scheduled,
                "{what} n={n} d={d}: scheduled output differs"
            );
        }
    }
}

#[test]
fn estimate_for_listed_heads_matches_all_heads_and_zeroes_the_rest() {
    let Some(sp) = device() else { return };
    let (shape, ctx) = layer(6, 2, 64 * 37 - 3, 64);
    let (n, d) = (shape.seq_len, shape.head_dim);
    let q = sp.upload_bf16(&noise(shape.q_heads * n * d, 31)).unwrap();
    let k = sp.upload_bf16(&noise(shape.kv_heads * n * d, 32)).unwrap();
    let mut b = VerticalSlashBuilder::new(&sp, &shape, &ctx).unwrap();
    b.estimate(&sp, &q, &k).unwrap();
    let (col_all, diag_all) = b.scores(&sp).unwrap();
    for listed in [vec![1u32, 4, 5], vec![0], vec![2, 3]] {
        b.estimate_heads(&sp, &q, &k, &listed).unwrap();
        let (col, diag) = b.scores(&sp).unwrap();
        for h in 0..shape.q_heads {
            let r = h * n..(h + 1) * n;
            let on = listed.contains(&(h as u32));
            for (name, got, all) in [("col", &col, &col_all), ("diag", &diag, &diag_all)] {
                for (j, (&g, &a)) in got[r.clone()].iter().zip(&all[r.clone()]).enumerate() {
                    // the sums are f32 atomics: their order differs between launches
                    let want = if on { a } else { 0.0 };
                    assert!(
                        (g - want).abs() <= 1e-5 * want.abs().max(1e-3),
                        "heads {listed:?}: {name}[{h}][{j}] = {g}, want {want}"
                    );
                }
            }
            if on {
                let mass: f32 = col[r].iter().sum();
                // each of the last 64 rows is a distribution over its keys
                assert!((mass - 64.0).abs() < 1e-2, "head {h}: vertical mass {mass}");
            }
        }
    }
    for bad in [vec![], vec![2u32, 1], vec![3, 3], vec![6]] {
        let e = b.estimate_heads(&sp, &q, &k, &bad).unwrap_err();
        assert!(e.to_string().contains("estimate for heads"), "{bad:?}: {e}");
    }
}
