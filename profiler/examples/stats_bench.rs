//! Times `profiler::stats::layer_stats` on one synthetic layer shaped like SmolLM2-135M at 8K tokens
//! (9 query heads, 3 KV heads, head_dim 64) with structured attention (sink, local band, heavy columns).
//!
//! `cargo run --release -p profiler --example stats_bench [seq_len] [repeats]`

use std::time::Instant;

use profiler::stats::{layer_stats, StatsConfig};
use runtime::{AttentionInput, AttnShape};

/// Deterministic values in [-1, 1) (xorshift64).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    runtime::test_util::noise(n, seed, 1.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(8192), |a| a.parse())?;
    let repeats: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let shape = AttnShape {
        q_heads: 9,
        kv_heads: 3,
        seq_len: n,
        head_dim: 64,
    };
    let d = shape.head_dim;
    let mut q = noise(shape.q_heads * n * d, 1);
    let mut k = noise(shape.kv_heads * n * d, 2);
    let v = noise(shape.kv_heads * n * d, 3);
    for (r, row) in q.chunks_exact_mut(d).enumerate() {
        let i = (r % n) as f32;
        row[0] += 2.0;
        row[1] += 3.0 * (i * 0.05).cos();
        row[2] += 3.0 * (i * 0.05).sin();
    }
    for (r, row) in k.chunks_exact_mut(d).enumerate() {
        let j = r % n;
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
    let input = AttentionInput::new(shape, &q, &k, &v)?;
    let cfg = StatsConfig::default();
    for _ in 0..repeats {
        let t0 = Instant::now();
        let stats = layer_stats(&input, &cfg)?;
        let s = t0.elapsed().as_secs_f64();
        let h0 = &stats[0];
        println!(
            "layer_stats N={n} heads={} kv={} d={d} threads={}: {s:.3} s  (head 0: sink {:.3}, entropy {:.2} bits, vs(1024, 512) recall {:.4} density {:.3})",
            shape.q_heads,
            shape.kv_heads,
            rayon::current_num_threads(),
            h0.mean_sink_mass(),
            h0.mean_entropy_bits(),
            h0.recall_vertical_slash(1024, 512).recall,
            h0.recall_vertical_slash(1024, 512).density,
        );
    }
    Ok(())
}
