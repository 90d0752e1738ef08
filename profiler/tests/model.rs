//! Model loading and the hooked forward, against candle-transformers' reference models.
//!
//! Tests on the real model (SmolLM2-135M-Instruct GGUF) need `scripts/fetch-model.sh` to have run; they
//! fail with a message saying so otherwise. Tiny Hugging Face models with random weights are written
//! into a temp dir per test.

use candle_core::{DType, Device, Tensor};
use profiler::model::{
    default_model_path, DenseAttention, Model, ModelConfig, ModelSpec, RopeStyle,
};
use profiler::Error;
use runtime::test_util::noise;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Asserts `|got - want| <= tol * max(1, max|want|)` everywhere; prints the worst element.
fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1.0f32, |a, &b| a.max(b.abs()));
    let (worst, err) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold((0, 0.0f32), |a, (i, e)| if e > a.1 { (i, e) } else { a });
    assert!(
        err <= tol * scale,
        "{what}: worst element {worst}: got {}, want {}, error {err:e} > {tol:e} * {scale}",
        got[worst],
        want[worst]
    );
    eprintln!("{what}: max error {err:e} (scale {scale})");
}

// --- the real model -----------------------------------------------------------------------------

fn real_model_path() -> PathBuf {
    let path = default_model_path();
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh first",
        path.display()
    );
    path
}

fn real_model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| match Model::load(&real_model_path()) {
        Ok(m) => m,
        Err(e) => panic!("loading the default model: {e}"),
    })
}

const PROSE: &str = "The Apache License applies to the Work and to Derivative Works thereof. \
    You may reproduce and distribute copies of the Work in any medium, with or without \
    modifications, and in Source or Object form, provided that You meet the following conditions: \
    You must give any other recipients of the Work a copy of this License; and You must cause any \
    modified files to carry prominent notices stating that You changed the files.";

#[test]
fn gguf_spec_reads_metadata_only() -> TestResult {
    let spec = ModelSpec::read(&real_model_path())?;
    let c = &spec.config;
    let want = ModelConfig {
        architecture: "llama".into(),
        vocab: 49152,
        hidden: 576,
        intermediate: 1536,
        layers: 30,
        q_heads: 9,
        kv_heads: 3,
        head_dim: 64,
        rope_theta: 100_000.0,
        rms_eps: c.rms_eps,
        max_context: 8192,
        tie_embeddings: true,
        qkv_bias: false,
        rope_style: RopeStyle::Interleaved,
        sliding_window: None,
    };
    assert_eq!(c, &want);
    assert!((c.rms_eps - 1e-5).abs() < 1e-9, "rms_eps {}", c.rms_eps);
    // 2 global tensors (embedding, final norm) + 9 per layer, no output.weight.
    assert_eq!(spec.tensors.len(), 2 + 9 * 30);
    let embd = spec
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .ok_or("no token_embd.weight")?;
    assert_eq!(embd.shape, vec![49152, 576]);
    assert_eq!(embd.dtype, "Q8_0");
    Ok(())
}

#[test]
fn tokenizer_round_trip_and_vocab() -> TestResult {
    let m = real_model();
    assert_eq!(m.tokenizer().get_vocab_size(true), m.config().vocab);
    for text in [
        PROSE,
        "Digits: 1234567890, 3.14159 and 2026-11-05.",
        "tabs\tand\n\nnewlines  double  spaces",
        "Accents: café, naïve, Ærøskøbing, ñandú; Ελληνικά; 日本語",
        "Emoji: 🦀🚀 👩‍👩‍👧 ✨",
        "<|im_start|>user\nHi<|im_end|>",
    ] {
        let ids = m.encode(text)?;
        assert_eq!(m.decode(&ids)?, text, "round trip of {text:?} via {ids:?}");
    }
    // Each digit is its own token (the `smollm` pre-tokenizer).
    assert_eq!(m.encode("2026")?.len(), 4);
    assert_eq!(m.encode("<|im_start|>")?, vec![1]);
    Ok(())
}

#[test]
fn greedy_capital_of_france_is_paris() -> TestResult {
    let m = real_model();
    let prompt = m.encode("The capital of France is")?;
    let next = m.greedy(&prompt, 1, &mut DenseAttention)?;
    assert_eq!(m.decode(&next)?, " Paris");
    Ok(())
}

/// Our forward against `quantized_llama` with all weights dequantized to f32
/// (`CANDLE_DEQUANTIZE_ALL=1`), on 150 tokens, last-position logits. The references materialize
/// T x T attention and use a different matmul blocking; observed differences are ~2e-6 of the logit
/// scale, tolerance 2e-5.
#[test]
fn gguf_forward_matches_quantized_llama() -> TestResult {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let m = real_model();
    let mut tokens = m.encode(PROSE)?;
    tokens.truncate(150);
    assert!(tokens.len() >= 64);
    let ours = m.forward_last(&tokens, &mut DenseAttention)?;

    // Candle reads the flag once per thread when it first builds a QMatMul; no other test builds one.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = real_model_path();
    let mut file = std::fs::File::open(&path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let mut reference = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let input = Tensor::new(tokens.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let want: Vec<f32> = reference.forward(&input, 0)?.flatten_all()?.to_vec1()?;
    assert_close(&ours, &want, 2e-5, "last logits vs quantized_llama");
    assert_eq!(
        profiler::model::argmax(&ours),
        profiler::model::argmax(&want)
    );
    Ok(())
}

#[test]
fn next_token_logprobs_match_full_logits() -> TestResult {
    let m = real_model();
    let mut tokens = m.encode(PROSE)?;
    tokens.truncate(40);
    let hidden = m.forward_hidden(&tokens, &mut DenseAttention)?;
    let lp = m.next_token_logprobs(&hidden, &tokens)?;
    assert_eq!(lp.len(), tokens.len() - 1);
    let logits = m.logits_rows(&hidden, 0..tokens.len())?;
    let want: Vec<f32> = (0..tokens.len() - 1)
        .map(|i| {
            let row = logits.row(i);
            let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let z: f64 = row.iter().map(|&x| f64::from(x - mx).exp()).sum();
            (f64::from(row[tokens[i + 1] as usize] - mx) - z.ln()) as f32
        })
        .collect();
    assert_close(&lp, &want, 1e-5, "log-probs");
    let nll = -lp.iter().map(|&x| f64::from(x)).sum::<f64>() / lp.len() as f64;
    assert!(
        nll.exp() < 60.0,
        "perplexity {} on license prose",
        nll.exp()
    );
    let last = m.logits_last(&hidden)?;
    // One row vs many: a different matmul blocking, so not bit-identical.
    assert_close(&last, logits.row(tokens.len() - 1), 3e-6, "logits_last");
    Ok(())
}

// --- bad inputs ---------------------------------------------------------------------------------

fn expect_model_error(r: profiler::Result<Model>, path_part: &str, what: &str) -> String {
    match r {
        Ok(_) => panic!("{what}: loaded without error"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(path_part),
                "{what}: {msg:?} does not name {path_part:?}"
            );
            msg
        }
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("nope.gguf");
    let r = Model::load(&path);
    assert!(matches!(r, Err(Error::Io { .. })));
    expect_model_error(r, "nope.gguf", "missing file");
}

#[test]
fn corrupt_gguf_is_a_clear_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let real = std::fs::read(real_model_path())?;
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, real.get(..2_000_000).ok_or("model too small")?)?;
    let msg = expect_model_error(Model::load(&truncated), "truncated.gguf", "truncated GGUF");
    assert!(msg.contains("truncated"), "{msg}");
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"GGUF\x03\0\0\0 this is not a model")?;
    expect_model_error(Model::load(&garbage), "garbage.gguf", "garbage GGUF");
    let header_only = dir.path().join("header.gguf");
    std::fs::write(&header_only, real.get(..100).ok_or("model too small")?)?;
    expect_model_error(
        ModelSpec::read(&header_only).map(|_| unreachable!()),
        "header.gguf",
        "cut header",
    );
    Ok(())
}

// --- tiny Hugging Face models ---------------------------------------------------------------------

struct Tiny {
    arch: &'static str,
    vocab: usize,
    tie: bool,
    bias: bool,
    shards: usize,
}

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FF: usize = 96;
const LAYERS: usize = 2;

/// Writes `config.json`, safetensors (one file or `shards` plus an index) and a byte-level
/// `tokenizer.json` into `dir`; returns the tensors for building a reference model.
fn write_tiny_hf(
    dir: &Path,
    t: &Tiny,
) -> std::result::Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    let d = HIDDEN / HEADS;
    let mut shapes: Vec<(String, Vec<usize>, f32, f32)> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![t.vocab, HIDDEN],
            0.0,
            0.5,
        ),
        ("model.norm.weight".into(), vec![HIDDEN], 1.0, 0.1),
    ];
    if !t.tie {
        shapes.push(("lm_head.weight".into(), vec![t.vocab, HIDDEN], 0.0, 0.2));
    }
    for i in 0..LAYERS {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        for (n, out, inp) in [
            ("self_attn.q_proj", HEADS * d, HIDDEN),
            ("self_attn.k_proj", KV_HEADS * d, HIDDEN),
            ("self_attn.v_proj", KV_HEADS * d, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HEADS * d),
            ("mlp.gate_proj", FF, HIDDEN),
            ("mlp.up_proj", FF, HIDDEN),
            ("mlp.down_proj", HIDDEN, FF),
        ] {
            shapes.push((p(&format!("{n}.weight")), vec![out, inp], 0.0, 0.25));
            if t.bias && n != "self_attn.o_proj" && n.starts_with("self_attn") {
                shapes.push((p(&format!("{n}.bias")), vec![out], 0.0, 0.5));
            }
        }
        shapes.push((p("input_layernorm.weight"), vec![HIDDEN], 1.0, 0.1));
        shapes.push((p("post_attention_layernorm.weight"), vec![HIDDEN], 1.0, 0.1));
    }
    let mut tensors = HashMap::new();
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (seed, (name, shape, base, amp)) in shapes.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = noise(n, seed as u64 + 1, amp)
            .iter()
            .map(|x| x + base)
            .collect();
        tensors.insert(
            name.clone(),
            Tensor::from_slice(&vals, shape.as_slice(), &Device::Cpu)?,
        );
        bytes.push((
            name,
            shape,
            vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views = |part: usize| -> std::result::Result<
        Vec<(String, safetensors::tensor::TensorView<'_>)>,
        safetensors::SafeTensorError,
    > {
        bytes
            .iter()
            .enumerate()
            .filter(|(i, _)| i % t.shards == part)
            .map(|(_, (n, s, b))| {
                Ok((
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
                ))
            })
            .collect()
    };
    if t.shards == 1 {
        safetensors::serialize_to_file(views(0)?, None, &dir.join("model.safetensors"))?;
    } else {
        let mut map = serde_json::Map::new();
        for part in 0..t.shards {
            let file = format!("model-{:05}-of-{:05}.safetensors", part + 1, t.shards);
            let v = views(part)?;
            for (n, _) in &v {
                map.insert(n.clone(), file.clone().into());
            }
            safetensors::serialize_to_file(v, None, &dir.join(&file))?;
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    }
    let config = serde_json::json!({
        "architectures": [t.arch],
        "vocab_size": t.vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": FF,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": t.tie,
        "sliding_window": 512,
        "max_window_layers": LAYERS,
        "use_sliding_window": false,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    write_byte_level_tokenizer(&dir.join("tokenizer.json"))?;
    Ok(tensors)
}

/// A byte-level BPE tokenizer with the 256 byte symbols and no merges.
fn write_byte_level_tokenizer(path: &Path) -> TestResult {
    use tokenizers::decoders::byte_level::ByteLevel;
    use tokenizers::models::bpe::{Vocab, BPE};
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let vocab: Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| e.to_string())?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.save(path, false).map_err(|e| e.to_string())?;
    Ok(())
}

const TINY_TEXT: &str = "Tiny models, 42 tokens or so: héllo wörld!";

#[test]
fn hf_llama_matches_candle_llama() -> TestResult {
    use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
    let dir = tempfile::tempdir()?;
    let tiny = Tiny {
        arch: "LlamaForCausalLM",
        vocab: 260,
        tie: false,
        bias: false,
        shards: 1,
    };
    let tensors = write_tiny_hf(dir.path(), &tiny)?;
    let m = Model::load(dir.path())?;
    assert_eq!(m.config().rope_style, RopeStyle::HalfSplit);
    let tokens = m.encode(TINY_TEXT)?;
    assert_eq!(m.decode(&tokens)?, TINY_TEXT);
    let ours = m.forward_last(&tokens, &mut DenseAttention)?;

    let cfg: LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json"))?)?;
    let cfg = cfg.into_config(false);
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let reference = Llama::load(vb, &cfg)?;
    let mut cache = Cache::new(false, DType::F32, &cfg, &Device::Cpu)?;
    let input = Tensor::new(tokens.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let want: Vec<f32> = reference
        .forward(&input, 0, &mut cache)?
        .flatten_all()?
        .to_vec1()?;
    assert_close(&ours, &want, 1e-5, "tiny llama last logits");
    Ok(())
}

#[test]
fn hf_qwen2_sharded_matches_candle_qwen2() -> TestResult {
    use candle_transformers::models::qwen2;
    let dir = tempfile::tempdir()?;
    let tiny = Tiny {
        arch: "Qwen2ForCausalLM",
        vocab: 256,
        tie: true,
        bias: true,
        shards: 3,
    };
    let tensors = write_tiny_hf(dir.path(), &tiny)?;
    let spec = ModelSpec::read(dir.path())?;
    assert!(spec.config.qkv_bias && spec.config.tie_embeddings);
    assert_eq!(spec.tensors.len(), tensors.len());
    let m = Model::load(dir.path())?;
    let tokens = m.encode(TINY_TEXT)?;
    let ours = m.forward_hidden(&tokens, &mut DenseAttention)?;

    let cfg: qwen2::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json"))?)?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let mut reference = qwen2::Model::new(&cfg, vb)?;
    let input = Tensor::new(tokens.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let want: Vec<f32> = reference
        .forward(&input, 0, None)?
        .flatten_all()?
        .to_vec1()?;
    assert_close(
        &ours.data,
        &want,
        1e-5,
        "tiny qwen2 hidden states, all positions",
    );
    Ok(())
}

#[test]
fn hf_unsupported_architecture_is_a_clear_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let tiny = Tiny {
        arch: "GPT2LMHeadModel",
        vocab: 256,
        tie: true,
        bias: false,
        shards: 1,
    };
    write_tiny_hf(dir.path(), &tiny)?;
    let msg = expect_model_error(
        Model::load(dir.path()),
        "config.json",
        "unsupported architecture",
    );
    assert!(msg.contains("GPT2LMHeadModel"), "{msg}");
    Ok(())
}

#[test]
fn hf_tokenizer_larger_than_vocab_is_a_clear_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let tiny = Tiny {
        arch: "LlamaForCausalLM",
        vocab: 200,
        tie: true,
        bias: false,
        shards: 1,
    };
    write_tiny_hf(dir.path(), &tiny)?;
    let msg = expect_model_error(Model::load(dir.path()), "tokenizer.json", "vocab mismatch");
    assert!(msg.contains("256") && msg.contains("200"), "{msg}");
    Ok(())
}

#[test]
fn hf_missing_pieces_and_bad_tokens_are_clear_errors() -> TestResult {
    let dir = tempfile::tempdir()?;
    let tiny = Tiny {
        arch: "LlamaForCausalLM",
        vocab: 256,
        tie: true,
        bias: false,
        shards: 1,
    };
    write_tiny_hf(dir.path(), &tiny)?;
    let m = Model::load(dir.path())?;
    let r = m.forward_hidden(&[3, 999], &mut DenseAttention);
    assert!(
        matches!(&r, Err(Error::Model { field, .. }) if field == "input"),
        "{r:?}"
    );
    assert!(m.forward_hidden(&[], &mut DenseAttention).is_err());

    std::fs::remove_file(dir.path().join("tokenizer.json"))?;
    expect_model_error(
        Model::load(dir.path()),
        "tokenizer.json",
        "missing tokenizer",
    );
    std::fs::remove_file(dir.path().join("model.safetensors"))?;
    expect_model_error(
        Model::load(dir.path()),
        "model.safetensors",
        "missing weights",
    );
    std::fs::write(
        dir.path().join("config.json"),
        "{\"architectures\": [\"LlamaForCausalLM\"]}",
    )?;
    let msg = expect_model_error(Model::load(dir.path()), "config.json", "incomplete config");
    assert!(msg.contains("hidden_size"), "{msg}");
    Ok(())
}
