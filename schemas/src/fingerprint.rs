//! Model fingerprints: a hash that tells one model's weights layout from another's.

use sha2::{Digest, Sha256};

/// One tensor as the model file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDesc {
    pub name: String,
    pub shape: Vec<usize>,
    /// The file's own dtype name, e.g. `F32`, `BF16`, `Q4_1`.
    pub dtype: String,
}

/// `sha256:<hex>` over a canonical text of the model's config values and its tensors.
///
/// The canonical text is one `key=value` line per config value, sorted by key, then one
/// `tensor <name> <dtype> <d0>x<d1>...` line per tensor, sorted by name. Sorting makes the hash
/// independent of file order (sharded checkpoints list tensors in shard order). Tensor names and dtypes
/// differ between a GGUF file and a Hugging Face directory of the same model, so their fingerprints
/// differ too: a plan is made for one set of weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFingerprint(String);

impl ModelFingerprint {
    /// Computes the fingerprint from config values (`key`, `value` as text) and tensor descriptions.
    pub fn compute(config: &[(&str, String)], tensors: &[TensorDesc]) -> Self {
        let mut lines: Vec<String> = config.iter().map(|(k, v)| format!("{k}={v}")).collect();
        lines.sort();
        let mut tensor_lines: Vec<String> = tensors
            .iter()
            .map(|t| {
                let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
                format!("tensor {} {} {}", t.name, t.dtype, dims.join("x"))
            })
            .collect();
        tensor_lines.sort();
        lines.extend(tensor_lines);
        let mut hasher = Sha256::new();
        for line in &lines {
            hasher.update(line.as_bytes());
            hasher.update(b"\n");
        }
        let digest = hasher.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Self(format!("sha256:{hex}"))
    }

    /// Whether `s` has the fingerprint form `sha256:` + 64 lowercase hex digits.
    pub fn is_well_formed(s: &str) -> bool {
        s.strip_prefix("sha256:").is_some_and(|hex| {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize]) -> TensorDesc {
        TensorDesc {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: "F32".into(),
        }
    }

    #[test]
    fn order_independent_and_sensitive_to_shape() {
        let cfg = [("layers", "2".to_string()), ("heads", "4".to_string())];
        let a = ModelFingerprint::compute(&cfg, &[t("a", &[2, 3]), t("b", &[4])]);
        let b = ModelFingerprint::compute(&cfg, &[t("b", &[4]), t("a", &[2, 3])]);
        let c = ModelFingerprint::compute(&cfg, &[t("a", &[3, 2]), t("b", &[4])]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(ModelFingerprint::is_well_formed(a.as_str()));
        assert!(!ModelFingerprint::is_well_formed("sha256:xyz"));
    }
}
