//! The GGUF tokenizer of the default model against the token ids transformers produced
//! (`/work/shared/reference/reference_logits.json`), decode round-trips and streaming.

#![allow(clippy::unwrap_used)]

use attune_models::inspect::read_gguf_header;
use attune_models::tokenizer::{Tok, TokenStream};

mod common;
use common::model_path;

fn load_tok() -> Tok {
    let path = model_path();
    let (content, _) = read_gguf_header(&path).unwrap();
    Tok::from_gguf(&content, &path).unwrap()
}

#[test]
fn reference_token_ids_and_round_trip() {
    let tok = load_tok();
    let reference = reference();
    let prompts = reference["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 3);
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let text = p["text"].as_str().unwrap();
        let expected: Vec<u32> = p["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, expected, "prompt '{name}'");
        // The GGUF says add_bos_token = false: adding special tokens changes nothing.
        assert_eq!(tok.encode(text, true).unwrap(), expected, "prompt '{name}'");
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "prompt '{name}'");
    }
}

#[test]
fn special_tokens_and_metadata() {
    let tok = load_tok();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    let ids = tok
        .encode("<|im_start|>user\nHi 123<|im_end|>", false)
        .unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 2);
    // Digits are split one by one.
    let digits = tok.encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5, "{digits:?}");
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi 123");
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>user\nHi 123<|im_end|>"
    );
}

#[test]
fn stream_never_splits_characters() {
    let tok = load_tok();
    let text = "今天天气很好，我们一起去公园散步吧。 Ünïcödé 🎉 done.";
    let ids = tok.encode(text, false).unwrap();
    let mut stream = TokenStream::new(&tok, true);
    let mut out = String::new();
    let mut pieces = 0;
    for id in ids {
        if let Some(piece) = stream.push(id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "split character in {piece:?}");
            out.push_str(&piece);
            pieces += 1;
        }
    }
    if let Some(rest) = stream.finish().unwrap() {
        out.push_str(&rest);
    }
    assert_eq!(out, text);
    assert!(pieces > 10);
    // Special tokens are skipped in the stream.
    let mut stream = TokenStream::new(&tok, true);
    let mut out = String::new();
    for id in tok.encode("<|im_start|>Hello<|im_end|>", false).unwrap() {
        if let Some(p) = stream.push(id).unwrap() {
            out.push_str(&p);
        }
    }
    assert_eq!(out, "Hello");
}

#[test]
fn hf_folder_tokenizer_gives_the_same_ids() {
    let tok = load_tok();
    let dir = tempfile::tempdir().unwrap();
    tok.inner()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 0]}"#,
    )
    .unwrap();
    let hf = Tok::from_hf_dir(dir.path()).unwrap();
    assert_eq!(hf.eos_token_ids(), &[2, 0]);
    assert_eq!(hf.bos_token(), Some("<|im_start|>"));
    assert_eq!(hf.eos_token(), Some("<|im_end|>"));
    assert_eq!(hf.vocab_size(), tok.vocab_size());
    for p in reference()["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        assert_eq!(
            hf.encode(text, false).unwrap(),
            tok.encode(text, false).unwrap()
        );
    }
    // A broken tokenizer.json names the file.
    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let err = Tok::from_hf_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

fn reference() -> serde_json::Value {
    common::read_reference("reference_logits.json")
}
