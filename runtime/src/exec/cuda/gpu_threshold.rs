//! The CUDA executor's own dense threshold (host only; compiled with and without the `cuda`
//! feature): where a layer is too small for its index building on the GPU to pay.

use schemas::ModelInfo;

use super::CUDA_BLOCK;
use crate::AttnShape;

/// The GPU's fixed cost of a sparse layer is repaid only above this predicted dense attention time
/// per layer, in milliseconds. Building a layer's index costs about 0.15 ms on the H200 whatever the
/// length (host launches and small per-head kernels: SmolLM2-135M's plan, docs/perf.md "Untimed
/// forwards and whole passes"), so a layer whose dense attention takes about twice that gains
/// nothing: that plan ran at 0.86× dense at 8K (0.23 ms of dense attention per layer) and 1.69× at
/// 16K (0.86 ms).
pub const GPU_SPARSE_MIN_DENSE_MS: f64 = 0.3;

/// Dense causal attention rate of our kernels on the H200 in TFLOP/s (2·n²·d·H per layer),
/// head_dim 64 and 128, with 128-key tiles (docs/perf.md, "Fifteenth session": 446 for SmolLM2-135M's
/// whole 8K pass with `attn_fwd_wsk3_d64`, 5.20 ms for 30 layers, 432 for one layer; 656 at 8K with
/// `attn_fwd_wsk_d128`).
fn dense_tflops(head_dim: u32) -> f64 {
    if head_dim <= 64 {
        440.0
    } else {
        650.0
    }
}

/// The CUDA executor's own dense threshold for `model`: the shortest length (a multiple of 64) at
/// which a layer's dense attention is predicted to take [`GPU_SPARSE_MIN_DENSE_MS`]. Below it, a
/// [`PlanPrefill`](super::PlanPrefill) made without `PrefillOptions::dense_below` runs dense even
/// where the plan's threshold (the calibrator's, which counts no fixed cost per layer) would not.
/// SmolLM2-135M (9 heads of 64): 10,752 tokens; 32 heads of 128: 4,928.
pub fn gpu_dense_below(model: &ModelInfo) -> u64 {
    let (heads, d) = (
        model.query_heads.max(1) as f64,
        model.head_dim.max(1) as f64,
    );
    let flops = GPU_SPARSE_MIN_DENSE_MS * 1e-3 * dense_tflops(model.head_dim) * 1e12;
    let n = (flops / (2.0 * d * heads)).sqrt().ceil() as u64;
    n.div_ceil(CUDA_BLOCK as u64) * CUDA_BLOCK as u64
}

/// What one computed 64 × 64 tile of sparse attention costs on the H200 relative to a tile of dense
/// attention on 128-key tiles (`attn_fwd_wsk*`), taken at the low end of what was measured on the
/// benchmark's structured inputs (`attnplan bench --device cuda`, docs/perf.md): head_dim 128 with
/// three consumer warpgroups (since 5a4fe55), 1.16–1.19× at 32K (sparse 8.04–8.13 ms over 52% of
/// the cells against dense 12.99–13.38 ms) and 1.17–1.19× at 128K ("Nineteenth session"; 1.22–1.31×
/// with two consumers, "Sixteenth session"); head_dim 64, 1.53× at 32K and 1.47× at 128K. The
/// sparse kernels run 64-key tiles, whose per-tile work (barriers, softmax bookkeeping) 128-key
/// tiles halve.
pub fn sparse_tile_cost(head_dim: usize) -> f64 {
    if head_dim <= 64 {
        1.45
    } else {
        1.15
    }
}

/// Whether attention over an index of `entries` (key blocks, gathered columns; all heads) is
/// predicted to take less time than dense attention for `shape`, a computed tile costing `cost`
/// dense ones. Dense attention computes `q_blocks (q_blocks + 1) / 2` tiles of 64 × 64 per head;
/// the index one per key block and one per 64 gathered columns (a lower bound: each list's columns
/// are tiled on their own).
pub fn sparse_attention_pays(shape: &AttnShape, entries: (usize, usize), cost: f64) -> bool {
    let q_blocks = shape.seq_len.div_ceil(CUDA_BLOCK) as f64;
    let dense = shape.q_heads as f64 * q_blocks * (q_blocks + 1.0) / 2.0;
    let sparse = entries.0 as f64 + (entries.1 as f64 / CUDA_BLOCK as f64).ceil();
    sparse * cost < dense
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(query_heads: u32, head_dim: u32) -> ModelInfo {
        ModelInfo {
            name: None,
            architecture: "llama".into(),
            layers: 1,
            query_heads,
            kv_heads: 1,
            head_dim,
            rope_theta: 1e4,
            max_context: 1 << 20,
            fingerprint: String::new(),
        }
    }

    #[test]
    fn gpu_dense_below_sits_where_dense_attention_takes_the_fixed_cost_twice() {
        for (heads, d, want) in [(9, 64, 10752), (32, 128, 4928)] {
            let n = gpu_dense_below(&model(heads, d));
            assert_eq!(n, want, "{heads} heads of {d}");
            // the predicted dense time crosses GPU_SPARSE_MIN_DENSE_MS within the last block
            let ms =
                |n: u64| 2.0 * (n * n) as f64 * d as f64 * heads as f64 / (dense_tflops(d) * 1e9);
            assert!(ms(n) >= GPU_SPARSE_MIN_DENSE_MS, "{}", ms(n));
            assert!(ms(n - 64) < GPU_SPARSE_MIN_DENSE_MS, "{}", ms(n - 64));
        }
        // SmolLM2-135M's 8K layers run dense on the GPU, its 16K layers follow the plan
        let smol = gpu_dense_below(&model(9, 64));
        assert!(8192 < smol && smol < 16384);
    }

    /// The break-even density is 1 / cost: a full index never pays, half the tiles pays at a cost
    /// below 2, and 64 gathered columns count as one tile.
    #[test]
    fn sparse_attention_pays_below_one_over_the_tile_cost() {
        let shape = AttnShape {
            q_heads: 2,
            kv_heads: 1,
            seq_len: 640, // 10 query blocks: 55 causal tiles per head
            head_dim: 64,
        };
        assert!(!sparse_attention_pays(&shape, (110, 0), 1.0));
        assert!(sparse_attention_pays(&shape, (109, 0), 1.0));
        assert!(sparse_attention_pays(&shape, (55, 0), 1.9));
        assert!(!sparse_attention_pays(&shape, (55, 0), 2.0));
        assert!(!sparse_attention_pays(&shape, (54, 64), 2.0));
        assert!(sparse_attention_pays(&shape, (53, 64), 2.0));
        for d in [64, 128] {
            let c = sparse_tile_cost(d);
            assert!(c > 1.0 && c < 2.0, "{c}");
        }
    }
}
