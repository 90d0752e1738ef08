//! Dense vs sparse CPU prefill attention for one layer of SmolLM2-135M's shape: 9 query heads over
//! 3 KV heads, head_dim 64, 8192 tokens by default, same inputs, same run.
//!
//! ```text
//! cargo run --release -p runtime --example sparse_bench -- [seq_len] [vertical] [slash] [runs]
//! ```
//! Defaults: 8192 tokens, a `vertical_slash` plan with 256 columns and 320 diagonals, 5 runs; the
//! table shows medians. Index building (`build_index` for every head: the estimate from the last 64
//! queries, rankings, lists) and the attention kernel are timed separately, through
//! `SparsePrefill::forward`.
//!
//! Inputs (deterministic; V is noise in [-1, 1)): Q and K are noise in [-1, 1) (about ±0.3 logits of
//! score noise), with some dimensions set to give, in logits (`q · k / 8`):
//! - a sink: dimension 0 is 2 in Q and 28 in K row 0 (+7 on key 0);
//! - vertical lines: dimension 1 is 1 in Q and 40 in every 512th key and keys 100 and 3000 (+5);
//! - a local band, RoPE-like: dimensions 2..34 hold cos/sin of the position at 16 frequencies, the same
//!   in Q and K, so `q_i · k_j` gets `sum_f a_f cos(w_f (i - j))`, a function of the offset only: 8
//!   short periods (7 to 419 tokens) peak sharply at offset 0 (+2.25), 8 long ones (17K to 43K
//!   tokens) decay slowly and monotonically (about 4 logits over 8K tokens).

use std::time::{Duration, Instant};

use runtime::exec::dense_attention;
use runtime::{AttentionInput, AttnShape, PrefillOptions, SparsePrefill};
use schemas::{
    Budget, Defaults, HeadPlan, LayerPlan, ModelInfo, Pattern, Plan, Provenance, VerticalSlash,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (n, vertical, slash, runs) = (arg(0, 8192), arg(1, 256), arg(2, 320), arg(3, 5).max(1));
    let shape = AttnShape {
        q_heads: 9,
        kv_heads: 3,
        seq_len: n,
        head_dim: 64,
    };
    let (q, k, v) = inputs(&shape);
    let input = AttentionInput::new(shape, &q, &k, &v)?;
    let plan = plan(&shape, vertical as u64, slash as u64);
    let mut sp = SparsePrefill::new(&plan, &plan.model, PrefillOptions::default())?;

    let mut dense_out = vec![0.0f32; q.len()];
    let mut sparse_out = vec![0.0f32; q.len()];
    let (mut dense_t, mut index_t, mut attn_t, mut total_t) = (vec![], vec![], vec![], vec![]);
    let mut density = 0.0;
    for _ in 0..runs {
        let start = Instant::now();
        dense_attention(&input, &mut dense_out)?;
        dense_t.push(start.elapsed());
        let start = Instant::now();
        let stats = sp.forward(0, &input, &mut sparse_out)?;
        total_t.push(start.elapsed());
        index_t.push(stats.index_time);
        attn_t.push(stats.attention_time);
        density = stats.density();
    }
    let (dense, index, attn, total) = (
        median(&mut dense_t),
        median(&mut index_t),
        median(&mut attn_t),
        median(&mut total_t),
    );
    let err = relative_error(&sparse_out, &dense_out);
    let threads = rayon::current_num_threads();
    println!(
        "seq_len {n}, 9 q heads / 3 kv heads, head_dim 64, vertical_slash v={vertical} s={slash}, \
         {threads} threads, median of {runs}"
    );
    println!("cells computed: {:.1}% of dense causal", 100.0 * density);
    println!("output error |O_sparse - O_dense| / |O_dense| = {err:.2e}");
    println!();
    println!("| path                       |    ms | vs dense |");
    println!("|----------------------------|------:|---------:|");
    let row = |name: &str, t: Duration| {
        println!(
            "| {name:<26} | {:>5.1} | {:>7.2}x |",
            ms(t),
            ms(dense) / ms(t).max(1e-9)
        );
    };
    row("dense attention", dense);
    row("sparse: index building", index);
    row("sparse: attention kernel", attn);
    row("sparse: forward (total)", total);
    Ok(())
}

fn ms(t: Duration) -> f64 {
    t.as_secs_f64() * 1e3
}

fn median(x: &mut [Duration]) -> Duration {
    x.sort_unstable();
    x.get(x.len() / 2).copied().unwrap_or_default()
}

fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    let (num, den) = got.iter().zip(want).fold((0.0, 0.0), |(a, b), (&g, &w)| {
        let (g, w) = (f64::from(g), f64::from(w));
        (a + (g - w).powi(2), b + w * w)
    });
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Deterministic noise in [-1, 1) (xorshift64).
fn noise(len: usize, seed: u64) -> Vec<f32> {
    runtime::test_util::noise(len, seed, 1.0)
}

/// Q, K, V as described in the module docs. Scores below are in logits (`q · k / sqrt(64)`).
fn inputs(shape: &AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, d) = (shape.seq_len, shape.head_dim);
    let mut q: Vec<f32> = noise(shape.q_heads * n * d, 1)
        .iter()
        .map(|x| 0.5 * x)
        .collect();
    let mut k: Vec<f32> = noise(shape.kv_heads * n * d, 2)
        .iter()
        .map(|x| 0.5 * x)
        .collect();
    let v = noise(shape.kv_heads * n * d, 3);
    // (first dimension, amplitude in Q and K, periods in tokens): cos/sin pairs of the position.
    let bands: [(usize, f32, [f32; 8]); 2] = [
        // sharp: +2.25 logits at offset 0, wiggles of about ±0.6 elsewhere
        (2, 1.2, [7.0, 13.0, 23.0, 41.0, 73.0, 131.0, 233.0, 419.0]),
        // slow: decays monotonically with the offset, about 4 logits over 8K tokens
        (18, 3.5, [17e3, 19e3, 23e3, 29e3, 31e3, 37e3, 41e3, 43e3]),
    ];
    let add_bands = |row: &mut [f32], pos: usize| {
        for (first, amp, periods) in &bands {
            for (f, period) in periods.iter().enumerate() {
                let w = std::f32::consts::TAU / period * pos as f32;
                row[first + 2 * f] = amp * w.cos();
                row[first + 2 * f + 1] = amp * w.sin();
            }
        }
    };
    for (r, row) in q.chunks_exact_mut(d).enumerate() {
        row[0] = 2.0;
        row[1] = 1.0;
        add_bands(row, r % n);
    }
    for (r, row) in k.chunks_exact_mut(d).enumerate() {
        let pos = r % n;
        // sink: +7 logits
        row[0] = if pos == 0 { 28.0 } else { 0.0 };
        // vertical lines: +5 logits
        row[1] = if pos % 512 == 0 || pos == 100 || pos == 3000 {
            40.0
        } else {
            0.0
        };
        add_bands(row, pos);
    }
    (q, k, v)
}

/// A one-layer plan for `shape` with the same vertical-slash budgets on every head; `dense_below` 1024.
fn plan(shape: &AttnShape, vertical: u64, slash: u64) -> Plan {
    let pattern = Pattern::VerticalSlash(VerticalSlash {
        vertical: Budget::Fixed(vertical),
        slash: Budget::Fixed(slash),
    });
    Plan {
        schema_version: schemas::SCHEMA_VERSION,
        model: ModelInfo {
            name: Some("smollm2-135m-shape".into()),
            architecture: "llama".into(),
            layers: 1,
            query_heads: shape.q_heads as u32,
            kv_heads: shape.kv_heads as u32,
            head_dim: shape.head_dim as u32,
            rope_theta: 100_000.0,
            max_context: 8192,
            fingerprint: format!("sha256:{}", "0".repeat(64)),
        },
        provenance: Provenance {
            tool: "sparse_bench".into(),
            created: None,
            data: "synthetic".into(),
            samples: 0,
            heldout_samples: 0,
            seq_lens: vec![shape.seq_len as u64],
            target_recall: 0.95,
            objective: None,
        },
        defaults: Defaults {
            block_q: 64,
            block_k: 64,
            last_q: 64,
            dense_below: 1024,
            share_kv_group_indexes: false,
        },
        layers: vec![LayerPlan {
            layer: 0,
            heads: (0..shape.q_heads as u32)
                .map(|head| HeadPlan {
                    head,
                    pattern: pattern.clone(),
                    recall: None,
                    validated_recall: None,
                    flops_fraction: None,
                    gate: None,
                    retrieval_score: None,
                    modalities: vec![],
                })
                .collect(),
        }],
    }
}
