//! Hugging Face model directories: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, and `tokenizer.json`.
//!
//! Supported architectures: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` (Q/K/V biases).
//! RoPE is half-split (Hugging Face stores Q/K unpermuted). Weights in F32, F16 or BF16 are converted to
//! f32 at load.

use super::config::{ModelConfig, ModelFormat, ModelSpec, RopeStyle, TensorDesc};
use super::weights::{Naming, TensorSource};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest safetensors header we parse (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

fn model_err(path: &Path, field: &str, message: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        field: field.to_string(),
        message: message.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| model_err(path, "(json)", format!("invalid JSON: {e}")))
}

/// Parses `config.json`.
pub(crate) fn parse_config(path: &Path, json: &Value) -> Result<ModelConfig> {
    let get = |k: &str| json.get(k).filter(|v| !v.is_null());
    let uint = |k: &str| -> Result<Option<usize>> {
        match get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    model_err(
                        path,
                        k,
                        format!("expected a non-negative integer, found {v}"),
                    )
                }),
        }
    };
    let req = |k: &str| -> Result<usize> { uint(k)?.ok_or_else(|| model_err(path, k, "missing")) };
    let float = |k: &str| -> Result<Option<f64>> {
        match get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| model_err(path, k, format!("expected a number, found {v}"))),
        }
    };
    let boolean = |k: &str| -> Result<Option<bool>> {
        match get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| model_err(path, k, format!("expected true or false, found {v}"))),
        }
    };
    let arch = get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .ok_or_else(|| model_err(path, "architectures[0]", "missing"))?
        .to_string();
    let qkv_bias = match arch.as_str() {
        "LlamaForCausalLM" | "MistralForCausalLM" => boolean("attention_bias")?.unwrap_or(false),
        "Qwen2ForCausalLM" => true,
        other => {
            return Err(model_err(
                path,
                "architectures[0]",
                format!(
                    "unsupported architecture {other:?} (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
                ),
            ))
        }
    };
    if let Some(scaling) = get("rope_scaling") {
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("?");
        if kind != "default" {
            return Err(model_err(
                path,
                "rope_scaling",
                format!("RoPE scaling {kind:?} is not supported"),
            ));
        }
    }
    let hidden = req("hidden_size")?;
    let q_heads = req("num_attention_heads")?;
    let max_context = req("max_position_embeddings")?;
    let sliding_window = match (arch.as_str(), boolean("use_sliding_window")?) {
        ("Qwen2ForCausalLM", Some(false) | None) => None,
        _ => uint("sliding_window")?.filter(|&w| w < max_context),
    };
    let cfg = ModelConfig {
        vocab: req("vocab_size")?,
        hidden,
        intermediate: req("intermediate_size")?,
        layers: req("num_hidden_layers")?,
        q_heads,
        kv_heads: uint("num_key_value_heads")?.unwrap_or(q_heads),
        head_dim: uint("head_dim")?.unwrap_or(hidden / q_heads.max(1)),
        rope_theta: float("rope_theta")?.unwrap_or(10_000.0) as f32,
        rms_eps: float("rms_norm_eps")?.unwrap_or(1e-6),
        max_context,
        tie_embeddings: boolean("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias,
        rope_style: RopeStyle::HalfSplit,
        sliding_window,
        architecture: arch,
    };
    cfg.check(path)?;
    Ok(cfg)
}

/// One safetensors header entry.
struct HeaderEntry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    start: usize,
}

/// Reads only the JSON header of a safetensors file (size checked before parsing).
fn read_header(path: &Path) -> Result<Vec<HeaderEntry>> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let file_len = f.metadata().map_err(io_err(path))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| {
        model_err(
            path,
            "header",
            format!("cannot read the header length: {e}"),
        )
    })?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n.saturating_add(8) > file_len {
        return Err(model_err(
            path,
            "header",
            format!("header length {n} does not fit the file of {file_len} bytes"),
        ));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(io_err(path))?;
    let json: serde_json::Map<String, Value> = serde_json::from_slice(&buf)
        .map_err(|e| model_err(path, "header", format!("invalid JSON: {e}")))?;
    let mut out = Vec::with_capacity(json.len());
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let bad =
            |what: &str| model_err(path, &name, format!("header entry without a valid {what}"));
        let dtype = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("dtype"))?;
        let shape = v
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad("shape"))?;
        let start = v
            .get("data_offsets")
            .and_then(|o| o.get(0))
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("data_offsets"))? as usize;
        out.push(HeaderEntry {
            dtype: dtype.to_string(),
            shape,
            start,
            name,
        });
    }
    out.sort_by_key(|e| e.start);
    Ok(out)
}

/// The safetensors files of a directory, sorted by name.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(model_err(
            dir,
            "model.safetensors",
            "neither model.safetensors nor model.safetensors.index.json exists",
        ));
    }
    let json = read_json(&index)?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| model_err(&index, "weight_map", "missing or not an object"))?;
    let mut files: Vec<String> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| model_err(&index, &format!("weight_map.{name}"), "not a string"))?;
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(model_err(
                &index,
                &format!("weight_map.{name}"),
                format!("shard name {file:?} leaves the directory"),
            ));
        }
        files.push(file.to_string());
    }
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Hugging Face tensor names.
pub(crate) const HF_NAMING: Naming = Naming {
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layer_prefix: "model.layers.",
    attn_norm: "input_layernorm.weight",
    q: "self_attn.q_proj",
    k: "self_attn.k_proj",
    v: "self_attn.v_proj",
    o: "self_attn.o_proj",
    ffn_norm: "post_attention_layernorm.weight",
    gate: "mlp.gate_proj",
    up: "mlp.up_proj",
    down: "mlp.down_proj",
};

pub(crate) fn read_spec(dir: &Path) -> Result<ModelSpec> {
    let config_path = dir.join("config.json");
    let config = parse_config(&config_path, &read_json(&config_path)?)?;
    let mut tensors = Vec::new();
    for shard in shard_files(dir)? {
        for e in read_header(&shard)? {
            tensors.push(TensorDesc {
                name: e.name,
                shape: e.shape,
                dtype: e.dtype,
            });
        }
    }
    Ok(ModelSpec {
        path: dir.to_path_buf(),
        format: ModelFormat::HfDir,
        config,
        tensors,
    })
}

/// The safetensors shards of a directory, read into memory, serving tensors by name.
pub(crate) struct HfTensors {
    dir: PathBuf,
    shards: Vec<(PathBuf, Vec<u8>)>,
    /// tensor name → shard index
    index: HashMap<String, usize>,
}

impl HfTensors {
    pub fn open(dir: &Path) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in shard_files(dir)? {
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
                model_err(&path, "header", format!("invalid safetensors file: {e}"))
            })?;
            for name in st.names() {
                index.insert(name.to_string(), shards.len());
            }
            shards.push((path, bytes));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }
}

impl TensorSource for HfTensors {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn load_f32(&mut self, name: &str) -> Result<Option<Tensor>> {
        let Some((path, bytes)) = self.index.get(name).and_then(|&i| self.shards.get(i)) else {
            return Ok(None);
        };
        let err = |m: String| model_err(path, name, m);
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| err(format!("invalid safetensors file: {e}")))?;
        let view = st.tensor(name).map_err(|e| err(e.to_string()))?;
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(err(format!(
                    "dtype {other:?} is not supported (F32, F16, BF16)"
                )))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| err(e.to_string()))?;
        Ok(Some(t))
    }
}

/// Loads `tokenizer.json`.
pub(crate) fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(model_err(&path, "tokenizer.json", "missing"));
    }
    tokenizers::Tokenizer::from_file(&path).map_err(|e| {
        model_err(
            &path,
            "tokenizer.json",
            format!("cannot load tokenizer: {e}"),
        )
    })
}
