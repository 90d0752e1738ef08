//! Whole-model sparse prefill: [`SparseAttention`] is a [`LayerAttention`] that runs every layer through
//! [`runtime::SparsePrefill::forward`], so `Model::forward_hidden(tokens, &mut sparse)` computes the
//! model's prefill with the plan's sparse attention instead of dense.
//!
//! Each layer call's [`PrefillStats`] is kept ([`SparseAttention::layer_stats`], in call order) and
//! summed ([`SparseAttention::totals`]); [`SparseAttention::take_stats`] empties the list between
//! inputs.

use runtime::{AttentionInput, PrefillOptions, PrefillStats, PrefillTotals, SparsePrefill};
use schemas::{ModelInfo, Plan};

use crate::error::Result;
use crate::model::LayerAttention;

/// Sparse attention for every layer by a plan (see the module docs).
#[derive(Debug, Clone)]
pub struct SparseAttention {
    prefill: SparsePrefill,
    stats: Vec<(usize, PrefillStats)>,
}

impl SparseAttention {
    /// Wraps a prepared [`SparsePrefill`].
    pub fn new(prefill: SparsePrefill) -> Self {
        Self {
            prefill,
            stats: Vec::new(),
        }
    }

    /// Checks `plan` against `model` (see [`SparsePrefill::new`]) and wraps the result.
    pub fn from_plan(plan: &Plan, model: &ModelInfo, options: PrefillOptions) -> Result<Self> {
        Ok(Self::new(SparsePrefill::new(plan, model, options)?))
    }

    /// The underlying executor.
    pub fn prefill(&self) -> &SparsePrefill {
        &self.prefill
    }

    /// `(layer, stats)` of every call since the last [`SparseAttention::take_stats`], in call order.
    pub fn layer_stats(&self) -> &[(usize, PrefillStats)] {
        &self.stats
    }

    /// Returns and clears the per-call statistics (the totals keep counting).
    pub fn take_stats(&mut self) -> Vec<(usize, PrefillStats)> {
        std::mem::take(&mut self.stats)
    }

    /// Sums over every call since construction.
    pub fn totals(&self) -> &PrefillTotals {
        self.prefill.totals()
    }
}

impl LayerAttention for SparseAttention {
    fn attend(&mut self, layer: usize, input: &AttentionInput<'_>, out: &mut [f32]) -> Result<()> {
        let stats = self.prefill.forward(layer, input, out)?;
        self.stats.push((layer, stats));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{default_model_path, DenseAttention, Model};
    use runtime::{AttnShape, DenseReason};
    use schemas::{
        AShape, Budget, Defaults, Dense, HeadPlan, LayerPlan, Pattern, Provenance, VerticalSlash,
    };

    /// A plan giving every head of every layer `pattern`.
    fn plan(model: &ModelInfo, pattern: &Pattern, dense_below: u64) -> Plan {
        Plan {
            schema_version: schemas::SCHEMA_VERSION,
            model: model.clone(),
            provenance: Provenance {
                tool: "test".into(),
                created: None,
                data: "synthetic".into(),
                samples: 0,
                heldout_samples: 0,
                seq_lens: vec![],
                target_recall: 0.95,
                objective: None,
            },
            defaults: Defaults {
                block_q: 64,
                block_k: 64,
                last_q: 64,
                dense_below,
                share_kv_group_indexes: false,
            },
            layers: (0..model.layers)
                .map(|layer| LayerPlan {
                    layer,
                    heads: (0..model.query_heads)
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
                })
                .collect(),
        }
    }

    fn model_info(layers: u32, q_heads: u32, kv_heads: u32, head_dim: u32) -> ModelInfo {
        ModelInfo {
            name: None,
            architecture: "llama".into(),
            layers,
            query_heads: q_heads,
            kv_heads,
            head_dim,
            rope_theta: 10_000.0,
            max_context: 8192,
            fingerprint: format!("sha256:{}", "0".repeat(64)),
        }
    }

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        runtime::test_util::noise(n, seed, 1.0)
    }

    #[test]
    fn dense_plan_through_the_sparse_path_equals_dense() -> Result<()> {
        let info = model_info(2, 6, 2, 32);
        let mut sparse = SparseAttention::from_plan(
            &plan(&info, &Pattern::Dense(Dense {}), 64),
            &info,
            Default::default(),
        )?;
        let shape = AttnShape {
            q_heads: 6,
            kv_heads: 2,
            seq_len: 300,
            head_dim: 32,
        };
        let (q, k, v) = (
            noise(6 * 300 * 32, 1),
            noise(2 * 300 * 32, 2),
            noise(2 * 300 * 32, 3),
        );
        let input = AttentionInput::new(shape, &q, &k, &v)?;
        let (mut got, mut want) = (vec![0.0f32; q.len()], vec![0.0f32; q.len()]);
        for layer in 0..2 {
            let attn: &mut dyn LayerAttention = &mut sparse;
            attn.attend(layer, &input, &mut got)?;
            DenseAttention.attend(layer, &input, &mut want)?;
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "layer {layer}: max difference {worst:e}");
        }
        let stats = sparse.take_stats();
        assert_eq!(stats.len(), 2);
        assert_eq!(stats[1].0, 1);
        assert_eq!(stats[1].1.dense_count(DenseReason::Planned), 6);
        assert!(sparse.layer_stats().is_empty());
        assert_eq!((sparse.totals().layers, sparse.totals().heads), (2, 12));
        Ok(())
    }

    /// Whole-model sparse prefill on SmolLM2-135M (fetched by scripts/fetch-model.sh): a generous
    /// vertical-slash plan stays close to dense, a sink-and-diagonal plan does not.
    #[test]
    fn whole_model_sparse_prefill() -> Result<()> {
        let model = Model::load(&default_model_path())?;
        let c = model.config();
        let info = model_info(
            c.layers as u32,
            c.q_heads as u32,
            c.kv_heads as u32,
            c.head_dim as u32,
        );
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(60);
        let tokens = model.encode(&text)?;
        let dense = model.forward_hidden(&tokens, &mut DenseAttention)?;
        let budget = |v| Budget::Fixed(v);
        let cases = [
            (
                Pattern::VerticalSlash(VerticalSlash {
                    vertical: budget(64),
                    slash: budget(128),
                }),
                1e-6..0.05,
            ),
            (
                Pattern::AShape(AShape {
                    sink: budget(4),
                    local: budget(1),
                }),
                0.1..f64::INFINITY,
            ),
        ];
        for (pattern, expected) in cases {
            let mut sparse =
                SparseAttention::from_plan(&plan(&info, &pattern, 128), &info, Default::default())?;
            let hidden = model.forward_hidden(&tokens, &mut sparse)?;
            let err = relative(&hidden.data, &dense.data);
            let t = sparse.totals();
            eprintln!(
                "{}: {} tokens, density {:.3}, hidden-state error {err:.3e}, index {:?}, attention {:?}",
                pattern.kind(), tokens.len(), t.density(), t.index_time, t.attention_time
            );
            assert_eq!(t.layers, c.layers as u64);
            assert!(
                expected.contains(&err),
                "{}: error {err:e}, expected {expected:?}",
                pattern.kind()
            );
        }
        Ok(())
    }

    fn relative(got: &[f32], want: &[f32]) -> f64 {
        let (num, den) = got
            .iter()
            .zip(want)
            .fold((0.0f64, 0.0f64), |(a, b), (&g, &w)| {
                (a + f64::from(g - w).powi(2), b + f64::from(w).powi(2))
            });
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }
}
