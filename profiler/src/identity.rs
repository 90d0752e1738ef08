//! The plan-facing identity of a model: [`ModelSpec::model_info`] gives the `model` section of a plan
//! (and of a profile), fingerprint included.

use schemas::{ModelFingerprint, ModelInfo};

use crate::model::ModelSpec;

/// The architecture family a plan names: `llama`, `mistral`, `qwen2`.
pub fn architecture_family(architecture: &str) -> String {
    match architecture {
        "LlamaForCausalLM" => "llama".into(),
        "MistralForCausalLM" => "mistral".into(),
        "Qwen2ForCausalLM" => "qwen2".into(),
        other => other.to_ascii_lowercase(),
    }
}

impl ModelSpec {
    /// The model section of a plan for this model. The fingerprint hashes every config value our
    /// forward uses and every tensor's name, dtype and shape (docs/plan-format.md §4).
    pub fn model_info(&self) -> ModelInfo {
        let c = &self.config;
        let config: Vec<(&str, String)> = vec![
            ("architecture", c.architecture.clone()),
            ("vocab", c.vocab.to_string()),
            ("hidden", c.hidden.to_string()),
            ("intermediate", c.intermediate.to_string()),
            ("layers", c.layers.to_string()),
            ("q_heads", c.q_heads.to_string()),
            ("kv_heads", c.kv_heads.to_string()),
            ("head_dim", c.head_dim.to_string()),
            ("rope_theta", c.rope_theta.to_string()),
            ("rms_eps", c.rms_eps.to_string()),
            ("max_context", c.max_context.to_string()),
            ("tie_embeddings", c.tie_embeddings.to_string()),
            ("qkv_bias", c.qkv_bias.to_string()),
        ];
        let tensors: Vec<schemas::TensorDesc> = self
            .tensors
            .iter()
            .map(|t| schemas::TensorDesc {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: t.dtype.clone(),
            })
            .collect();
        let name = self
            .path
            .file_stem()
            .or_else(|| self.path.file_name())
            .map(|s| s.to_string_lossy().into_owned());
        ModelInfo {
            name,
            architecture: architecture_family(&c.architecture),
            layers: c.layers as u32,
            query_heads: c.q_heads as u32,
            kv_heads: c.kv_heads as u32,
            head_dim: c.head_dim as u32,
            rope_theta: f64::from(c.rope_theta),
            max_context: c.max_context as u64,
            fingerprint: ModelFingerprint::compute(&config, &tensors).to_string(),
        }
    }
}
