//! Tokenizers: rebuilt from GGUF metadata (GPT-2 style byte-level BPE), or `tokenizer.json`; and the
//! check that the tokenizer fits the model's embedding.
//!
//! The GGUF form follows llama.cpp for `tokenizer.ggml.model = gpt2`: BPE from `tokens` + `merges`,
//! pre-tokenizer `Sequence[Digits(individual), ByteLevel(add_prefix_space = false, trim_offsets,
//! use_regex)]` (the `smollm` pre-tokenizer isolates every digit; for other `pre` values the digit split
//! is left out), ByteLevel decoder, no prefix space. Control tokens (`token_type == 3`) become special
//! added tokens so `<|im_start|>` stays one token. With this, encode→decode is the identity on text.

use super::gguf::GgufFile;
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// llama.cpp's token type for control tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;

fn model_err(path: &Path, field: &str, message: impl Into<String>) -> Error {
    Error::Model {
        path: path.to_path_buf(),
        field: field.to_string(),
        message: message.into(),
    }
}

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
pub(crate) fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let path = &file.path;
    let model = file.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(model_err(
            path,
            "tokenizer.ggml.model",
            format!("tokenizer {model:?} is not supported (gpt2 byte-level BPE only)"),
        ));
    }
    let tokens = file.array("tokenizer.ggml.tokens")?;
    let mut vocab = Vocab::default();
    let mut names = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let Value::String(s) = t else {
            return Err(model_err(
                path,
                &format!("tokenizer.ggml.tokens[{i}]"),
                "not a string",
            ));
        };
        let id = u32::try_from(i)
            .map_err(|_| model_err(path, "tokenizer.ggml.tokens", "more than 2^32 tokens"))?;
        vocab.insert(s.clone(), id);
        names.push(s.as_str());
    }
    let merges_raw = file.array("tokenizer.ggml.merges")?;
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let pair = match m {
            Value::String(s) => s.split_once(' '),
            _ => None,
        };
        let Some((a, b)) = pair else {
            return Err(model_err(
                path,
                &format!("tokenizer.ggml.merges[{i}]"),
                format!("expected \"left right\", found {m:?}"),
            ));
        };
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| model_err(path, "tokenizer.ggml.merges", format!("invalid BPE: {e}")))?;
    let mut tok = Tokenizer::new(bpe);

    let pre = match file.get("tokenizer.ggml.pre") {
        Some(Value::String(s)) => s.as_str(),
        _ => "default",
    };
    let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let pre_tok = if pre == "smollm" {
        PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level,
        ]))
    } else {
        byte_level
    };
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(ByteLevel::default()));

    if let Some(Value::Array(types)) = file.get("tokenizer.ggml.token_type") {
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&names)
            .filter(|(ty, _)| matches!(ty, Value::I32(t) if *t == TOKEN_TYPE_CONTROL))
            .map(|(_, name)| AddedToken::from(name.to_string(), true))
            .collect();
        tok.add_special_tokens(special).map_err(|e| {
            model_err(
                path,
                "tokenizer.ggml.token_type",
                format!("cannot add control tokens: {e}"),
            )
        })?;
    }
    Ok(tok)
}

/// Checks every token id of `tok` indexes a row of the `vocab x hidden` embedding.
pub(crate) fn check_vocab(tok: &Tokenizer, vocab: usize, path: &Path) -> Result<()> {
    let n = tok.get_vocab_size(true);
    let max_id = tok
        .get_vocab(true)
        .values()
        .copied()
        .max()
        .map_or(0, |m| m as usize + 1);
    if n.max(max_id) > vocab {
        return Err(model_err(
            path,
            "tokenizer",
            format!(
                "the tokenizer has {} token ids but the model's embedding has {vocab} rows",
                n.max(max_id)
            ),
        ));
    }
    Ok(())
}
