//! GGUF files: metadata → [`ModelConfig`], tensor list, weights dequantized to f32, tokenizer.
//!
//! Supported `general.architecture`: `llama` (interleaved RoPE, as llama.cpp permutes Q/K) and `qwen2`
//! (half-split RoPE, Q/K/V biases). Tensor names follow llama.cpp (`blk.{i}.attn_q.weight`, …).

use super::config::{ModelConfig, ModelFormat, ModelSpec, RopeStyle, TensorDesc};
use super::weights::{Naming, TensorSource};
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// An open GGUF file with its parsed header.
pub(crate) struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
}

fn model_err(path: &Path, field: &str, message: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        field: field.to_string(),
        message: message.into(),
    }
}

impl GgufFile {
    /// Opens and parses the header and tensor table, and checks every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| model_err(path, "header", format!("not a readable GGUF file: {e}")))?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let (block, type_size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
            let bytes = if block > 0 && elems % block == 0 {
                (elems / block).checked_mul(type_size)
            } else {
                None
            };
            let end = bytes.and_then(|b| {
                content
                    .tensor_data_offset
                    .checked_add(info.offset)?
                    .checked_add(b as u64)
            });
            match end {
                Some(end) if end <= file_len => {}
                Some(end) => {
                    return Err(model_err(
                        path,
                        name,
                        format!("tensor data ends at byte {end} but the file has {file_len} bytes (truncated?)"),
                    ))
                }
                None => {
                    return Err(model_err(
                        path,
                        name,
                        format!("{elems} elements of {:?} do not form a valid size", info.ggml_dtype),
                    ))
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| model_err(&self.path, key, "missing metadata key"))
    }

    /// A required unsigned integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.require(key)?;
        let n = match v {
            Value::U8(x) => Some(u64::from(*x)),
            Value::U16(x) => Some(u64::from(*x)),
            Value::U32(x) => Some(u64::from(*x)),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
            model_err(
                &self.path,
                key,
                format!("expected a non-negative integer, found {v:?}"),
            )
        })
    }

    /// An optional unsigned integer (present but malformed is an error).
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            Some(_) => self.usize(key).map(Some),
            None => Ok(None),
        }
    }

    /// A required float.
    pub fn f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        match v {
            Value::F32(x) => Ok(f64::from(*x)),
            Value::F64(x) => Ok(*x),
            _ => Err(model_err(
                &self.path,
                key,
                format!("expected a float, found {v:?}"),
            )),
        }
    }

    /// A required string.
    pub fn string(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            v => Err(model_err(
                &self.path,
                key,
                format!("expected a string, found {v:?}"),
            )),
        }
    }

    /// A required array.
    pub fn array(&self, key: &str) -> Result<&[Value]> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            v => Err(model_err(
                &self.path,
                key,
                format!("expected an array, found {:?}", v.value_type()),
            )),
        }
    }

    /// The configuration from the metadata and the tensor table.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.string("general.architecture")?.to_string();
        let (rope_style, qkv_bias) = match arch.as_str() {
            "llama" => (RopeStyle::Interleaved, false),
            "qwen2" => (RopeStyle::HalfSplit, true),
            other => {
                return Err(model_err(
                    &self.path,
                    "general.architecture",
                    format!("unsupported architecture {other:?} (supported: llama, qwen2)"),
                ))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = self.usize(&key("embedding_length"))?;
        let q_heads = self.usize(&key("attention.head_count"))?;
        let kv_heads = self
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(q_heads);
        let head_dim = self
            .opt_usize(&key("attention.key_length"))?
            .unwrap_or(hidden / q_heads.max(1));
        if let Some(rope_dim) = self.opt_usize(&key("rope.dimension_count"))? {
            if rope_dim != head_dim {
                return Err(model_err(
                    &self.path,
                    &key("rope.dimension_count"),
                    format!("partial RoPE ({rope_dim} of {head_dim} dimensions) is not supported"),
                ));
            }
        }
        let rope_theta = match self.get(&key("rope.freq_base")) {
            Some(_) => self.f64(&key("rope.freq_base"))? as f32,
            None => 10_000.0, // llama.cpp's default
        };
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| model_err(&self.path, "token_embd.weight", "missing tensor"))?;
        let vocab = embd.shape.dims().first().copied().unwrap_or(0);
        let cfg = ModelConfig {
            architecture: arch.clone(),
            vocab,
            hidden,
            intermediate: self.usize(&key("feed_forward_length"))?,
            layers: self.usize(&key("block_count"))?,
            q_heads,
            kv_heads,
            head_dim,
            rope_theta,
            rms_eps: self.f64(&key("attention.layer_norm_rms_epsilon"))?,
            max_context: self.usize(&key("context_length"))?,
            tie_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            qkv_bias,
            rope_style,
            sliding_window: None,
        };
        cfg.check(&self.path)?;
        Ok(cfg)
    }

    /// Tensors in file order (by data offset).
    pub fn tensor_descs(&self) -> Vec<TensorDesc> {
        let mut infos: Vec<_> = self.content.tensor_infos.iter().collect();
        infos.sort_by_key(|(name, info)| (info.offset, name.as_str()));
        infos
            .into_iter()
            .map(|(name, info)| TensorDesc {
                name: name.clone(),
                shape: info.shape.dims().to_vec(),
                dtype: format!("{:?}", info.ggml_dtype),
            })
            .collect()
    }
}

impl TensorSource for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn load_f32(&mut self, name: &str) -> Result<Option<Tensor>> {
        if !self.contains(name) {
            return Ok(None);
        }
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| model_err(&self.path, name, format!("cannot read tensor: {e}")))?;
        let t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| model_err(&self.path, name, format!("cannot dequantize: {e}")))?;
        Ok(Some(t))
    }
}

/// llama.cpp tensor names.
pub(crate) const GGUF_NAMING: Naming = Naming {
    embed: "token_embd.weight",
    final_norm: "output_norm.weight",
    lm_head: "output.weight",
    layer_prefix: "blk.",
    attn_norm: "attn_norm.weight",
    q: "attn_q",
    k: "attn_k",
    v: "attn_v",
    o: "attn_output",
    ffn_norm: "ffn_norm.weight",
    gate: "ffn_gate",
    up: "ffn_up",
    down: "ffn_down",
};

pub(crate) fn read_spec(path: &Path) -> Result<ModelSpec> {
    let file = GgufFile::open(path)?;
    Ok(ModelSpec {
        path: path.to_path_buf(),
        format: ModelFormat::Gguf,
        config: file.config()?,
        tensors: file.tensor_descs(),
    })
}
