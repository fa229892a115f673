//! The `tokenizer.*` keys of an exported GGUF: copied from the base when the base is a GGUF,
//! built from `tokenizer.json` when it is a Hugging Face folder (byte-level BPE, as llama.cpp's
//! `convert_hf_to_gguf.py` writes it: the pre-tokenizer named by hashing the token ids of the
//! converter's check text).

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use sha2::{Digest, Sha256};

use crate::tokenizer::Tok;
use crate::{Error, Result};

/// llama.cpp's `chktxt` (conversion/base.py, `get_vocab_base_pre`): its token ids identify a
/// pre-tokenizer.
pub const CHECK_TEXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1f680} (normal) \u{1f636}\u{200d}\u{1f32b}\u{fe0f} (multiple emojis concatenated) \u{2705} \u{1f999}\u{1f999} 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u{1780}\u{17b6}\u{1793}\u{17cb}\u{178f}\u{17c2}\u{1796}\u{17b7}\u{179f}\u{17c1}\u{179f}\u{17a2}\u{17b6}\u{1785}\u{1f601} ?\u{6211}\u{60f3}\u{5728}apple\u{5de5}\u{4f5c}1314151\u{5929}\u{ff5e} ------======= \u{43d}\u{435}\u{449}\u{43e} \u{43d}\u{430} \u{411}\u{44a}\u{43b}\u{433}\u{430}\u{440}\u{441}\u{43a}\u{438} ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// Hashes of [`CHECK_TEXT`]'s ids -> `tokenizer.ggml.pre`, from llama.cpp's converter, for the
/// pre-tokenizers Attune's GGUF tokenizer implements.
const KNOWN_PRE: &[(&str, &str)] = &[
    (
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249",
        "smollm",
    ),
    (
        "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
        "llama-bpe",
    ),
    (
        "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d",
        "smaug-bpe",
    ),
    (
        "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e",
        "dbrx",
    ),
    (
        "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
        "qwen2",
    ),
    (
        "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c",
        "qwen2",
    ),
    (
        "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5",
        "deepseek-r1-qwen",
    ),
    (
        "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
        "gpt-2",
    ),
    (
        "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4",
        "gpt-2",
    ),
    (
        "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34",
        "starcoder",
    ),
    (
        "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff",
        "refact",
    ),
];

/// GGUF token types (llama.cpp `llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The hash llama.cpp's converter computes: sha256 of Python's `str()` of the id list.
pub fn check_hash(tok: &Tok) -> Result<String> {
    let ids = tok.encode(CHECK_TEXT, true)?;
    let text = format!(
        "[{}]",
        ids.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(hex_lower(&Sha256::digest(text.as_bytes())))
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every `tokenizer.*` key of a GGUF header, sorted by key.
pub fn from_gguf(content: &Content) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `tokenizer.*` keys built from `<dir>/tokenizer.json` for a vocabulary of `vocab_size`
/// (the model's embedding rows). Byte-level BPE only; the errors say what else is not carried.
pub fn from_hf_dir(dir: &Path, tok: &Tok, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&path, "JSON", e))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(Error::field(
            &path,
            "model.type",
            format!(
                "{} tokenizers are not written to GGUF by Attune (byte-level BPE is)",
                model["type"].as_str().unwrap_or("this kind of")
            ),
        ));
    }
    let byte_level = text.contains("\"ByteLevel\"");
    if !byte_level || model["byte_fallback"].as_bool() == Some(true) {
        return Err(Error::field(
            &path,
            "pre_tokenizer",
            "a SentencePiece-style tokenizer (byte fallback, no ByteLevel) is not written to \
             GGUF by Attune; export from a GGUF base model, or as a Hugging Face folder",
        ));
    }
    let hash = check_hash(tok)?;
    let pre = KNOWN_PRE
        .iter()
        .find(|(h, _)| *h == hash)
        .map(|(_, p)| *p)
        .ok_or_else(|| {
            Error::field(
                &path,
                "pre_tokenizer",
                format!(
                    "llama.cpp does not know this pre-tokenizer (check hash {hash}); \
                     export as a Hugging Face folder"
                ),
            )
        })?;

    let mut special = std::collections::HashMap::new();
    if let Some(added) = json["added_tokens"].as_array() {
        for a in added {
            if let Some(id) = a["id"].as_u64() {
                special.insert(id as u32, a["special"].as_bool().unwrap_or(false));
            }
        }
    }
    let n = vocab_size.max(tok.vocab_size());
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for i in 0..n as u32 {
        match tok.inner().id_to_token(i) {
            None => {
                tokens.push(Value::String(format!("[PAD{i}]")));
                types.push(Value::I32(UNUSED));
            }
            Some(t) => {
                let ty = match special.get(&i) {
                    Some(true) => CONTROL,
                    Some(false) => USER_DEFINED,
                    None => NORMAL,
                };
                tokens.push(Value::String(t));
                types.push(Value::I32(ty));
            }
        }
    }
    let merges: Vec<Value> = match model["merges"].as_array() {
        None => Vec::new(),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, m)| match m {
                serde_json::Value::String(s) => Ok(Value::String(s.clone())),
                serde_json::Value::Array(p) if p.len() == 2 => {
                    let a = p[0].as_str().unwrap_or_default();
                    let b = p[1].as_str().unwrap_or_default();
                    Ok(Value::String(format!("{a} {b}")))
                }
                _ => Err(Error::field(
                    &path,
                    format!("model.merges[{i}]"),
                    "not a merge",
                )),
            })
            .collect::<Result<_>>()?,
    };
    let mut md: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let bos = tok.bos_token().and_then(|t| tok.token_to_id(t));
    if let Some(b) = bos {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    let eos = tok.eos_token_ids();
    for (key, id) in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ]
    .iter()
    .zip(eos.iter())
    {
        md.push((key.to_string(), Value::U32(*id)));
    }
    // BOS is added when the tokenizer's own post-processor adds it.
    let probe = tok.encode("a", true)?;
    let adds_bos = bos.is_some() && probe.first().copied() == bos && probe.len() > 1;
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(adds_bos)));
    md.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
    Ok(md)
}
