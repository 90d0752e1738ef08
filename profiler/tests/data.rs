//! Calibration data: windows from text and JSONL files, synthetic retrieval tasks, and clear errors on
//! bad input. Uses a small byte-level BPE built in the test (same pre-tokenizer shape as SmolLM2's), so
//! no model download is needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::str::FromStr;

use profiler::data::{
    load_samples, ChatTemplate, DataSource, Sample, SyntheticOptions, Task, TaskKind,
};
use profiler::Error;
use proptest::prelude::*;
use tokenizers::Tokenizer;

// --- helpers ------------------------------------------------------------------------------------

/// GPT-2's byte-to-unicode table, as the byte-level pre-tokenizer uses it.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut table = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A byte-level BPE: every byte is a token, plus merges for some words, plus ChatML specials when
/// `chatml` is set. Digits are split one by one, like SmolLM2's `smollm` pre-tokenizer.
fn tokenizer(chatml: bool) -> Tokenizer {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for c in &chars {
        let id = vocab.len();
        vocab.insert(c.to_string(), id.into());
    }
    let mut merges: Vec<String> = Vec::new();
    let words = [
        "the", "The", " the", " The", " is", " pass", " key", " grass", " green", " sky", " blue",
        " sun", " yellow", " and", " to", " in", " of", " a", " was", " value", "Key", " best",
        " thing", " do",
    ];
    for word in words {
        let word: String = word.bytes().map(|b| chars[b as usize]).collect();
        let mut left = String::new();
        for (i, c) in word.chars().enumerate() {
            if i == 0 {
                left.push(c);
                continue;
            }
            let merged = format!("{left}{c}");
            if !vocab.contains_key(&merged) {
                merges.push(format!("{left} {c}"));
                let id = vocab.len();
                vocab.insert(merged.clone(), id.into());
            }
            left = merged;
        }
    }
    let mut added = Vec::new();
    if chatml {
        for name in ["<|im_start|>", "<|im_end|>"] {
            added.push(serde_json::json!({
                "id": vocab.len() + added.len(), "content": name, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true
            }));
        }
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    Tokenizer::from_str(&json.to_string()).unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/data")
        .join(name)
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
    tok.decode(ids, false).unwrap()
}

fn synthetic(kind: &str, chat: ChatTemplate, depths: Vec<f64>) -> DataSource {
    let mut options = SyntheticOptions::default();
    options.chat = chat;
    options.depths = depths;
    DataSource::parse(&format!("synthetic:{kind}"))
        .unwrap()
        .with_synthetic_options(options)
}

fn task(sample: &Sample) -> &Task {
    sample
        .task
        .as_ref()
        .expect("synthetic samples carry a task")
}

/// Writes `bytes` to a file named `name` in a fresh temp dir and loads it.
fn load_bytes(
    name: &str,
    bytes: &[u8],
    seq_len: usize,
    count: usize,
) -> profiler::Result<Vec<Sample>> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let source = DataSource::parse(path.to_str().unwrap()).unwrap();
    load_samples(&source, &tokenizer(false), seq_len, count, 0)
}

/// The `Error::Data` fields, or a panic naming what came instead.
fn data_error(result: profiler::Result<Vec<Sample>>) -> (PathBuf, String, String) {
    match result {
        Err(Error::Data {
            path,
            location,
            message,
        }) => (path, location, message),
        other => panic!("expected Error::Data, got {other:?}"),
    }
}

// --- sources ------------------------------------------------------------------------------------

#[test]
fn parse_recognizes_each_kind_of_spec() {
    assert_eq!(
        DataSource::parse("a/b.txt").unwrap(),
        DataSource::Text {
            path: "a/b.txt".into()
        }
    );
    let jsonl = DataSource::parse("c.JSONL").unwrap().with_field("body");
    assert_eq!(jsonl.to_string(), "c.JSONL (field \"body\")");
    for kind in TaskKind::ALL {
        let source = DataSource::parse(&format!("synthetic:{kind}")).unwrap();
        assert!(matches!(source, DataSource::Synthetic { task, .. } if task == kind));
        assert_eq!(source.to_string(), format!("synthetic:{kind}"));
    }
    let err = DataSource::parse("synthetic:passkeys")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("passkeys") && err.contains("synthetic:kv-retrieval"),
        "{err}"
    );
    assert!(DataSource::parse("  ").is_err());
}

#[test]
fn text_is_cut_into_consecutive_windows() {
    let tok = tokenizer(false);
    let path = fixture("tiny.txt");
    let whole = encode(&tok, &std::fs::read_to_string(&path).unwrap());
    let source = DataSource::parse(path.to_str().unwrap()).unwrap();
    let samples = load_samples(&source, &tok, 64, 3, 0).unwrap();
    assert_eq!(samples.len(), 3);
    assert!(samples
        .iter()
        .all(|s| s.tokens.len() == 64 && s.task.is_none()));
    let joined: Vec<u32> = samples.iter().flat_map(|s| s.tokens.clone()).collect();
    assert_eq!(joined, whole[..192]);
    assert_eq!(samples[1].id, "tiny.txt:1");

    // More asked than the text holds: every whole window, no partial one.
    let all = load_samples(&source, &tok, 64, 10_000, 0).unwrap();
    assert_eq!(all.len(), whole.len() / 64);
}

#[test]
fn jsonl_documents_are_joined_by_blank_lines() {
    let tok = tokenizer(false);
    let source = DataSource::parse(fixture("tiny.jsonl").to_str().unwrap()).unwrap();
    let samples = load_samples(&source, &tok, 48, 4, 0).unwrap();
    assert_eq!(samples.len(), 4);
    assert!(samples.iter().all(|s| s.tokens.len() == 48));
    let text = decode(
        &tok,
        &samples
            .iter()
            .flat_map(|s| s.tokens.clone())
            .collect::<Vec<_>>(),
    );
    assert!(text.starts_with("A recipe for bread begins"), "{text}");
    assert!(text.contains("wait again.\n\nThe river rose"), "{text}");

    // Another field.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.jsonl");
    std::fs::write(&path, "{\"body\": \"one two three four five six seven\"}\n").unwrap();
    let source = DataSource::parse(path.to_str().unwrap())
        .unwrap()
        .with_field("body");
    let samples = load_samples(&source, &tok, 8, 1, 0).unwrap();
    assert_eq!(
        decode(&tok, &samples[0].tokens),
        "one two three four five six seven"[..decode(&tok, &samples[0].tokens).len()]
    );
}

// --- synthetic tasks ----------------------------------------------------------------------------

#[test]
fn synthetic_samples_have_exactly_seq_len_tokens() {
    for chat in [ChatTemplate::Plain, ChatTemplate::ChatMl] {
        let tok = tokenizer(true);
        for kind in ["passkey", "kv-retrieval", "needle"] {
            for seq_len in [300, 517, 2048] {
                let samples = load_samples(&synthetic(kind, chat, vec![]), &tok, seq_len, 3, 11)
                    .unwrap_or_else(|e| panic!("{kind} {seq_len} {chat}: {e}"));
                assert_eq!(samples.len(), 3);
                for s in &samples {
                    assert_eq!(s.tokens.len(), seq_len, "{kind} {chat}");
                    assert_eq!(task(s).prompt_len, seq_len);
                    assert_eq!(task(s).answer_tokens, encode(&tok, &task(s).answer));
                }
            }
        }
    }
}

#[test]
fn synthetic_samples_are_deterministic() {
    let tok = tokenizer(false);
    for kind in ["passkey", "kv-retrieval", "needle"] {
        let source = synthetic(kind, ChatTemplate::Plain, vec![]);
        let a = load_samples(&source, &tok, 400, 4, 5).unwrap();
        let b = load_samples(&source, &tok, 400, 4, 5).unwrap();
        let c = load_samples(&source, &tok, 400, 4, 6).unwrap();
        assert_eq!(a, b, "{kind}");
        assert_ne!(a, c, "{kind}: another seed should give other samples");
        assert_eq!(a[2].id, format!("{kind}:5:2"));
    }
}

#[test]
fn passkey_needle_holds_the_answer_and_the_prompt_ends_with_the_question() {
    let tok = tokenizer(false);
    let samples = load_samples(
        &synthetic("passkey", ChatTemplate::Plain, vec![]),
        &tok,
        700,
        5,
        1,
    )
    .unwrap();
    for s in &samples {
        let t = task(s);
        assert_eq!(t.kind, TaskKind::Passkey);
        let key = t.answer.trim();
        assert_eq!(
            t.answer.len(),
            6,
            "answer is a space and 5 digits: {:?}",
            t.answer
        );
        assert!(key.chars().all(|c| c.is_ascii_digit()));
        let needle = decode(&tok, &s.tokens[t.needle.clone().unwrap()]);
        assert_eq!(
            needle,
            format!(" The pass key is {key}. Remember it. {key} is the pass key.")
        );
        let prompt = decode(&tok, &s.tokens);
        assert!(
            prompt.starts_with("There is an important info hidden"),
            "{prompt}"
        );
        assert!(
            prompt.ends_with(" What is the pass key? The pass key is"),
            "{prompt}"
        );
        assert!(prompt.contains("The grass is green. The sky is blue."));
        assert_eq!(
            prompt.matches(key).count(),
            2,
            "the key appears only in the needle"
        );
    }
}

#[test]
fn kv_needle_is_the_target_pair() {
    let tok = tokenizer(false);
    let samples = load_samples(
        &synthetic("kv-retrieval", ChatTemplate::Plain, vec![]),
        &tok,
        900,
        3,
        2,
    )
    .unwrap();
    for s in &samples {
        let t = task(s);
        let value = t.answer.trim();
        assert_eq!(value.len(), 36, "a UUID: {value}");
        let pair = decode(&tok, &s.tokens[t.needle.clone().unwrap()]);
        let key = pair.split('"').nth(1).unwrap();
        assert_eq!(pair, format!("\"{key}\": \"{value}\""));
        let prompt = decode(&tok, &s.tokens);
        assert!(
            prompt.starts_with("Extract the value corresponding"),
            "{prompt}"
        );
        let tail = format!("Key: \"{key}\"\nThe value associated with the specified key is:");
        assert!(prompt.ends_with(&tail), "{prompt}");
        assert_eq!(
            prompt.matches(key).count(),
            2,
            "key in the object and the question"
        );
        assert!(
            prompt.matches("\": \"").count() > 5,
            "several pairs fill the budget"
        );
        // The object parses as JSON (padding is whitespace before the closing brace).
        let object = &prompt[prompt.find('{').unwrap()..=prompt.rfind('}').unwrap()];
        let parsed: serde_json::Value = serde_json::from_str(object).unwrap();
        assert_eq!(parsed[key], value);
    }
}

#[test]
fn needle_sits_in_varied_prose() {
    let tok = tokenizer(false);
    let samples = load_samples(
        &synthetic("needle", ChatTemplate::Plain, vec![]),
        &tok,
        4096,
        4,
        3,
    )
    .unwrap();
    for s in &samples {
        let t = task(s);
        let needle = decode(&tok, &s.tokens[t.needle.clone().unwrap()]);
        assert!(needle.starts_with(" The best thing to do in "), "{needle}");
        assert!(
            needle.ends_with(&format!("{}.", t.answer)),
            "{needle} / {}",
            t.answer
        );
        let city = needle
            .trim_start_matches(" The best thing to do in ")
            .split(" is ")
            .next()
            .unwrap();
        let prompt = decode(&tok, &s.tokens);
        assert!(
            prompt.ends_with(&format!(
                "What is the best thing to do in {city}?\nThe best thing to do in {city} is"
            )) || prompt.ends_with(&format!(
                "What is the best thing to do in {city}? The best thing to do in {city} is"
            )),
            "{}",
            &prompt[prompt.len() - 200..]
        );
        // The test tokenizer has few merges (about a token per byte), so 4K tokens hold ~70 sentences.
        let sentences: Vec<&str> = prompt
            .split(['.', '\n'])
            .map(str::trim)
            .filter(|x| x.len() > 10)
            .collect();
        let distinct: std::collections::HashSet<&&str> = sentences.iter().collect();
        assert!(sentences.len() > 50, "{} sentences", sentences.len());
        assert!(
            distinct.len() * 10 >= sentences.len() * 9,
            "haystack is varied: {} distinct of {}",
            distinct.len(),
            sentences.len()
        );
    }
}

#[test]
fn depths_spread_across_samples() {
    let tok = tokenizer(false);
    for kind in ["passkey", "kv-retrieval", "needle"] {
        let samples = load_samples(
            &synthetic(kind, ChatTemplate::Plain, vec![]),
            &tok,
            1500,
            5,
            4,
        )
        .unwrap();
        let depths: Vec<f64> = samples.iter().map(|s| task(s).depth.unwrap()).collect();
        let starts: Vec<usize> = samples
            .iter()
            .map(|s| task(s).needle.clone().unwrap().start)
            .collect();
        assert!(depths[0] < 0.05 && depths[4] > 0.95, "{kind}: {depths:?}");
        assert!(depths.windows(2).all(|w| w[0] < w[1]), "{kind}: {depths:?}");
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "{kind}: {starts:?}");
        for (d, want) in depths.iter().zip([0.0, 0.25, 0.5, 0.75, 1.0]) {
            assert!((d - want).abs() < 0.1, "{kind}: {depths:?}");
        }
    }
    // Chosen depths are used in turn.
    let samples = load_samples(
        &synthetic("needle", ChatTemplate::Plain, vec![0.3]),
        &tok,
        1500,
        2,
        4,
    )
    .unwrap();
    assert!(samples
        .iter()
        .all(|s| (task(s).depth.unwrap() - 0.3).abs() < 0.05));
    let err = load_samples(
        &synthetic("needle", ChatTemplate::Plain, vec![1.5]),
        &tok,
        1500,
        2,
        4,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Synthetic { .. }), "{err}");
}

#[test]
fn chatml_wraps_the_prompt() {
    let tok = tokenizer(true);
    let s = &load_samples(
        &synthetic("passkey", ChatTemplate::ChatMl, vec![]),
        &tok,
        400,
        1,
        0,
    )
    .unwrap()[0];
    let prompt = decode(&tok, &s.tokens);
    assert!(
        prompt.starts_with("<|im_start|>user\nThere is an important info"),
        "{prompt}"
    );
    assert!(
        prompt.ends_with("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is"),
        "{prompt}"
    );
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    assert_eq!(s.tokens[0], im_start);
    assert_eq!(s.tokens.iter().filter(|&&t| t == im_start).count(), 2);

    // Without the special tokens, ChatML is refused clearly.
    let err = load_samples(
        &synthetic("passkey", ChatTemplate::ChatMl, vec![]),
        &tokenizer(false),
        400,
        1,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("<|im_start|>") && err.contains("plain"),
        "{err}"
    );
}

#[test]
fn too_short_seq_len_is_an_error() {
    let tok = tokenizer(false);
    for kind in ["passkey", "kv-retrieval", "needle"] {
        let err = load_samples(
            &synthetic(kind, ChatTemplate::Plain, vec![]),
            &tok,
            20,
            1,
            0,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Synthetic { .. }), "{kind}: {err}");
        assert!(err.to_string().contains("seq_len 20"), "{err}");
    }
    let err = load_samples(
        &synthetic("passkey", ChatTemplate::Plain, vec![]),
        &tok,
        0,
        1,
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("seq_len"), "{err}");
}

// --- bad input ----------------------------------------------------------------------------------

#[test]
fn missing_file_names_the_path() {
    let source = DataSource::parse("/nonexistent/corpus.txt").unwrap();
    let err = load_samples(&source, &tokenizer(false), 16, 1, 0).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/corpus.txt"), "{err}");
}

#[test]
fn empty_file_is_an_error() {
    for name in ["e.txt", "e.jsonl"] {
        let (path, _, message) = data_error(load_bytes(name, b"", 16, 1));
        assert!(path.ends_with(name));
        assert!(message.contains("empty"), "{message}");
    }
    let (_, _, message) = data_error(load_bytes("blank.jsonl", b"\n  \n\n", 16, 1));
    assert!(message.contains("no JSON lines"), "{message}");
}

#[test]
fn too_short_text_says_how_many_tokens() {
    let (path, _, message) = data_error(load_bytes("short.txt", b"only a few words", 100, 1));
    assert!(path.ends_with("short.txt"));
    let have = encode(&tokenizer(false), "only a few words").len();
    assert!(
        message.contains(&format!("{have} tokens")) && message.contains("100"),
        "{message}"
    );
}

#[test]
fn bad_jsonl_line_is_reported_with_its_number() {
    let text = b"{\"text\": \"fine\"}\n\n{\"text\": \"also fine\"}\n{\"text\": oops}\n";
    let (path, location, message) = data_error(load_bytes("bad.jsonl", text, 4, 1));
    assert!(path.ends_with("bad.jsonl"));
    assert_eq!(location, "line 4");
    assert!(message.contains("not valid JSON"), "{message}");

    let (_, location, message) = data_error(load_bytes("arr.jsonl", b"[1, 2]\n", 4, 1));
    assert_eq!(location, "line 1");
    assert!(message.contains("an array"), "{message}");
}

#[test]
fn missing_or_mistyped_field_is_named() {
    let text = b"{\"text\": \"fine\"}\n{\"body\": \"x\", \"id\": 3}\n";
    let (_, location, message) = data_error(load_bytes("m.jsonl", text, 4, 1));
    assert_eq!(location, "line 2, field \"text\"");
    assert!(
        message.contains("missing") && message.contains("\"body\""),
        "{message}"
    );

    let (_, location, message) = data_error(load_bytes("n.jsonl", b"{\"text\": 42}\n", 4, 1));
    assert_eq!(location, "line 1, field \"text\"");
    assert!(
        message.contains("expected a string, found a number"),
        "{message}"
    );
}

#[test]
fn invalid_utf8_names_the_line() {
    for name in ["u.txt", "u.jsonl"] {
        let (_, location, message) = data_error(load_bytes(
            name,
            b"{\"text\": \"ok\"}\n{\"text\": \"\xff\"}\n",
            2,
            1,
        ));
        assert_eq!(location, "line 2", "{name}");
        assert!(message.contains("UTF-8"), "{message}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                                   jsonl in any::<bool>(), seq_len in 0usize..40) {
        let name = if jsonl { "p.jsonl" } else { "p.txt" };
        if let Ok(samples) = load_bytes(name, &bytes, seq_len, 3) {
            prop_assert!(samples.iter().all(|s| s.tokens.len() == seq_len));
        }
    }

    #[test]
    fn arbitrary_jsonl_lines_never_panic(lines in proptest::collection::vec(
        prop_oneof!["\\{\"text\": \"[a-z ]{0,30}\"\\}", "\\{[\"a-z:0-9, ]{0,20}\\}", ".{0,20}"], 0..8)) {
        let _ = load_bytes("q.jsonl", lines.join("\n").as_bytes(), 8, 2);
    }

    #[test]
    fn synthetic_length_is_exact_or_an_error(kind in 0usize..3, seq_len in 0usize..700, seed in any::<u64>()) {
        let name = ["passkey", "kv-retrieval", "needle"][kind];
        let tok = tokenizer(false);
        match load_samples(&synthetic(name, ChatTemplate::Plain, vec![]), &tok, seq_len, 2, seed) {
            Ok(samples) => prop_assert!(samples.iter().all(|s| s.tokens.len() == seq_len)),
            Err(e) => {
                let expected = matches!(e, Error::Synthetic { .. } | Error::DataSpec { .. });
                prop_assert!(expected, "unexpected error: {}", e);
            }
        }
    }
}

// --- the real tokenizer ---------------------------------------------------------------------------

/// SmolLM2's own tokenizer (rebuilt from the GGUF): exact lengths, needle spans and ChatML markers.
/// Needs the model file; `scripts/fetch-model.sh` fetches it.
#[test]
fn real_tokenizer_gives_exact_prompts() {
    let model = profiler::model::Model::load(&profiler::model::default_model_path())
        .expect("model file; run scripts/fetch-model.sh");
    let tok = model.tokenizer();
    for chat in [ChatTemplate::Plain, ChatTemplate::ChatMl] {
        for kind in ["passkey", "kv-retrieval", "needle"] {
            let samples = load_samples(&synthetic(kind, chat, vec![]), tok, 2048, 3, 1).unwrap();
            for s in &samples {
                let t = task(s);
                assert_eq!(s.tokens.len(), 2048);
                let needle = decode(tok, &s.tokens[t.needle.clone().unwrap()]);
                assert!(needle.contains(t.answer.trim()), "{kind}: {needle}");
                let prompt = decode(tok, &s.tokens);
                assert_eq!(
                    prompt.starts_with("<|im_start|>user\n"),
                    chat == ChatTemplate::ChatMl
                );
                if kind == "kv-retrieval" {
                    let object = &prompt[prompt.find('{').unwrap()..=prompt.rfind('}').unwrap()];
                    serde_json::from_str::<serde_json::Value>(object).unwrap();
                }
            }
        }
    }
}
