//! Tokenizers built from GGUF metadata or a Hugging Face folder, and an incremental
//! detokenizer for streaming.
//!
//! GGUF: `tokenizer.ggml.model` "gpt2" becomes a byte-level BPE (tokens + merges) with the
//! pre-tokenizer named by `tokenizer.ggml.pre` (SmolLM2's "smollm" = split digits one by one,
//! then the GPT-2 regex, byte-level without prefix space); "llama" becomes a SentencePiece-style
//! BPE with byte fallback whose merges are derived from the token scores, as transformers does.
//! Control tokens (token type 3) are added as special tokens; BOS is added only when
//! `tokenizer.ggml.add_bos_token` says so.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, Sequence as NormalizerSequence};
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::{Error, Result};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Llama 3 / tiktoken-style split regex (`tokenizer.ggml.pre` "llama-bpe", "llama3", ...).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (single digits).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A text tokenizer plus what generation needs to know about its special tokens.
/// Cheap to clone (the vocabulary is shared).
#[derive(Clone)]
pub struct Tok {
    inner: Arc<tokenizers::Tokenizer>,
    eos_ids: Vec<u32>,
    bos: Option<String>,
    eos: Option<String>,
    source: PathBuf,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn tok_err(path: &Path, reason: impl ToString) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn meta_u32(content: &gguf_file::Content, path: &Path, key: &str) -> Result<Option<u32>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map(Some)
            .map_err(|e| Error::field(path, key, e)),
    }
}

fn meta_bool(content: &gguf_file::Content, path: &Path, key: &str) -> Result<Option<bool>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_bool()
            .map(Some)
            .map_err(|e| Error::field(path, key, e)),
    }
}

fn meta_str_array(content: &gguf_file::Content, path: &Path, key: &str) -> Result<Vec<String>> {
    let v = content
        .metadata
        .get(key)
        .ok_or_else(|| Error::field(path, key, "missing"))?;
    let arr = v.to_vec().map_err(|e| Error::field(path, key, e))?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            x.to_string()
                .cloned()
                .map_err(|_| Error::field(path, format!("{key}[{i}]"), "not a string"))
        })
        .collect()
}

fn meta_num_array<T>(
    content: &gguf_file::Content,
    path: &Path,
    key: &str,
    conv: impl Fn(&gguf_file::Value) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(v) = content.metadata.get(key) else {
        return Ok(None);
    };
    let arr = v.to_vec().map_err(|e| Error::field(path, key, e))?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            conv(x).ok_or_else(|| Error::field(path, format!("{key}[{i}]"), "not a number"))
        })
        .collect::<Result<Vec<T>>>()
        .map(Some)
}

impl Tok {
    /// Builds the tokenizer described by the `tokenizer.ggml.*` keys of a GGUF header.
    /// `path` names the file in errors.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Tok> {
        let model_kind = content
            .metadata
            .get("tokenizer.ggml.model")
            .ok_or_else(|| Error::field(path, "tokenizer.ggml.model", "missing"))?
            .to_string()
            .map_err(|e| Error::field(path, "tokenizer.ggml.model", e))?
            .clone();
        let tokens = meta_str_array(content, path, "tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(Error::field(path, "tokenizer.ggml.tokens", "empty"));
        }
        let n = tokens.len();
        let types = meta_num_array(content, path, "tokenizer.ggml.token_type", |v| {
            v.to_i32()
                .ok()
                .or_else(|| v.to_u32().ok().map(|x| x as i32))
        })?
        .unwrap_or_else(|| vec![1; n]);
        if types.len() != n {
            return Err(Error::field(
                path,
                "tokenizer.ggml.token_type",
                format!("{} entries but tokenizer.ggml.tokens has {n}", types.len()),
            ));
        }
        let bos_id = meta_u32(content, path, "tokenizer.ggml.bos_token_id")?;
        let eos_id = meta_u32(content, path, "tokenizer.ggml.eos_token_id")?;
        let unk_id = meta_u32(content, path, "tokenizer.ggml.unknown_token_id")?;
        let check_id = |key: &str, id: Option<u32>| -> Result<()> {
            match id {
                Some(i) if i as usize >= n => Err(Error::field(
                    path,
                    key,
                    format!("id {i} is outside the vocabulary of {n} tokens"),
                )),
                _ => Ok(()),
            }
        };
        check_id("tokenizer.ggml.bos_token_id", bos_id)?;
        check_id("tokenizer.ggml.eos_token_id", eos_id)?;
        check_id("tokenizer.ggml.unknown_token_id", unk_id)?;

        let mut tokenizer = match model_kind.as_str() {
            "gpt2" => gpt2_tokenizer(content, path, &tokens)?,
            "llama" => llama_tokenizer(content, path, &tokens, &types, unk_id)?,
            other => {
                return Err(Error::field(
                    path,
                    "tokenizer.ggml.model",
                    format!("unsupported tokenizer model '{other}' (supported: gpt2, llama)"),
                ))
            }
        };

        // Control tokens are special (matched whole, skipped when decoding with
        // skip_special_tokens); user-defined tokens are matched whole but are ordinary text.
        // Phi-3's tokenizer strips the whitespace after its special tokens (but <unk>, <s> and
        // <|endoftext|>); GGUF does not store it, and llama.cpp applies the rule to files whose
        // `general.name` names Phi-3. So does Attune.
        let name = content
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_default();
        let phi3 = name.contains("phi-3") || name.contains("phi3");
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| {
                let rstrip = phi3 && !matches!(s.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
                AddedToken::from(s.clone(), true).rstrip(rstrip)
            })
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.clone(), false))
            .collect();
        tokenizer
            .add_special_tokens(specials)
            .map_err(|e| tok_err(path, e))?;
        tokenizer.add_tokens(user).map_err(|e| tok_err(path, e))?;

        let default_add_bos = model_kind == "llama";
        let add_bos =
            meta_bool(content, path, "tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos);
        let bos = bos_id.map(|i| tokens[i as usize].clone());
        let eos = eos_id.map(|i| tokens[i as usize].clone());
        if add_bos {
            let (Some(bos_tok), Some(bid)) = (&bos, bos_id) else {
                return Err(Error::field(
                    path,
                    "tokenizer.ggml.bos_token_id",
                    "missing, but tokenizer.ggml.add_bos_token is true",
                ));
            };
            let processor = TemplateProcessing::builder()
                .try_single(format!("{bos_tok}:0 $A:0"))
                .map_err(|e| tok_err(path, e))?
                .try_pair(format!("{bos_tok}:0 $A:0 {bos_tok}:1 $B:1"))
                .map_err(|e| tok_err(path, e))?
                .special_tokens(vec![(bos_tok.clone(), bid)])
                .build()
                .map_err(|e| tok_err(path, e))?;
            tokenizer.with_post_processor(Some(processor));
        }

        let mut eos_ids: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = meta_u32(content, path, key)? {
                if (id as usize) < n && !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        Ok(Tok {
            inner: Arc::new(tokenizer),
            eos_ids,
            bos,
            eos,
            source: path.to_path_buf(),
        })
    }

    /// Loads `tokenizer.json` from a Hugging Face folder; BOS/EOS come from
    /// `tokenizer_config.json` and the EOS ids also from `generation_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Tok> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(tok_err(
                &tj,
                "file not found (a Hugging Face model folder needs its tokenizer.json)",
            ));
        }
        let bytes = crate::fsio::read_regular(&tj)?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(&tj, e))?;
        let mut bos = None;
        let mut eos = None;
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.is_file() {
            let text = crate::fsio::read_regular_string(&cfg_path)?;
            let cfg: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, "JSON", e))?;
            bos = special_token_content(cfg.get("bos_token"));
            eos = special_token_content(cfg.get("eos_token"));
        }
        let mut eos_ids: Vec<u32> = Vec::new();
        if let Some(id) = eos.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            let text = crate::fsio::read_regular_string(&gen_path)?;
            let gen: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&gen_path, "JSON", e))?;
            let ids: Vec<u64> = match gen.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => n.as_u64().into_iter().collect(),
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).collect(),
                _ => Vec::new(),
            };
            for id in ids {
                let id = id as u32;
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        Ok(Tok {
            inner: Arc::new(tokenizer),
            eos_ids,
            bos,
            eos,
            source: tj,
        })
    }

    /// Token ids of `text`; `add_special_tokens` adds BOS where the tokenizer wants it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err(&self.source, format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; invalid UTF-8 byte sequences become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err(&self.source, format!("cannot decode ids: {e}")))
    }

    /// Ids that end a generation (EOS, end-of-turn), from the tokenizer's own metadata.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }

    /// Number of tokens including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The file this tokenizer was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// `"<s>"` or `{"content": "<s>", ...}` in tokenizer_config.json.
fn special_token_content(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn vocab_map(tokens: &[String], path: &Path) -> Result<Vocab> {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        // Duplicates exist in some files; the first id wins, as in llama.cpp.
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    if vocab.is_empty() {
        return Err(Error::field(path, "tokenizer.ggml.tokens", "empty"));
    }
    Ok(vocab)
}

fn gpt2_tokenizer(
    content: &gguf_file::Content,
    path: &Path,
    tokens: &[String],
) -> Result<tokenizers::Tokenizer> {
    let merges_raw = meta_str_array(content, path, "tokenizer.ggml.merges")?;
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            Error::field(
                path,
                format!("tokenizer.ggml.merges[{i}]"),
                format!("'{m}' is not two tokens separated by a space"),
            )
        })?;
        merges.push((a.to_string(), b.to_string()));
    }
    let vocab = vocab_map(tokens, path)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tok_err(path, format!("tokenizer.ggml.merges: {e}")))?;

    let pre = match content.metadata.get("tokenizer.ggml.pre") {
        None => "default".to_string(),
        Some(v) => v
            .to_string()
            .map_err(|e| Error::field(path, "tokenizer.ggml.pre", e))?
            .clone(),
    };
    let byte_level =
        |use_regex: bool| -> PreTokenizerWrapper { ByteLevel::new(false, true, use_regex).into() };
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(Into::into)
        .map_err(|e| tok_err(path, e))
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        "default" | "gpt2" | "gpt-2" | "refact" | "starcoder" => byte_level(true),
        "smollm" => PreSequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "dbrx" => {
            PreSequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false)]).into()
        }
        "qwen2" | "deepseek-r1-qwen" => {
            PreSequence::new(vec![split(QWEN2_REGEX)?, byte_level(false)]).into()
        }
        other => {
            return Err(Error::field(
                path,
                "tokenizer.ggml.pre",
                format!(
                    "unsupported pre-tokenizer '{other}' (supported: default, gpt2, smollm, llama-bpe, qwen2)"
                ),
            ))
        }
    };
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    Ok(tokenizer)
}

/// SentencePiece-style BPE: "▁" for spaces, byte fallback (`<0xAB>` tokens), merges derived
/// from the vocabulary ordered by the merged token's score (higher first).
fn llama_tokenizer(
    content: &gguf_file::Content,
    path: &Path,
    tokens: &[String],
    types: &[i32],
    unk_id: Option<u32>,
) -> Result<tokenizers::Tokenizer> {
    let scores = meta_num_array(content, path, "tokenizer.ggml.scores", |v| v.to_f32().ok())?
        .ok_or_else(|| Error::field(path, "tokenizer.ggml.scores", "missing (needed for llama)"))?;
    if scores.len() != tokens.len() {
        return Err(Error::field(
            path,
            "tokenizer.ggml.scores",
            format!(
                "{} entries but tokenizer.ggml.tokens has {}",
                scores.len(),
                tokens.len()
            ),
        ));
    }
    let vocab = vocab_map(tokens, path)?;
    // Every split of a normal token into two vocabulary tokens is a merge.
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if types[id] != 1 {
            continue;
        }
        for (pos, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(pos);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                ranked.push((scores[id], id as u32, li, ri));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let merges: Vec<(String, String)> = ranked
        .iter()
        .map(|(_, _, l, r)| (tokens[*l as usize].clone(), tokens[*r as usize].clone()))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk_id {
        builder = builder.unk_token(tokens[u as usize].clone());
    }
    let bpe = builder.build().map_err(|e| tok_err(path, e))?;
    let add_space_prefix =
        meta_bool(content, path, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".to_string()).into());
    }
    normalizers.push(Replace::new(" ", "▁").map_err(|e| tok_err(path, e))?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(|e| tok_err(path, e))?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| tok_err(path, e))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Incremental detokenizer: feed generated ids one at a time and get the new text, never
/// a partial multi-byte UTF-8 character. Special tokens are skipped.
#[derive(Debug, Clone)]
pub struct TokenStream {
    tok: Tok,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

/// A UTF-8 character is at most 4 bytes and every byte-level token is at least one byte:
/// text still incomplete after this many pending tokens is invalid and is emitted as is.
const MAX_PENDING_TOKENS: usize = 4;

impl TokenStream {
    pub fn new(tok: &Tok, skip_special_tokens: bool) -> TokenStream {
        TokenStream {
            tok: tok.clone(),
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special_tokens,
        }
    }

    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = self
            .tok
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        let pending = self.ids.len() - self.read_offset;
        if full.len() > prefix.len()
            && full.is_char_boundary(prefix.len())
            && (!full.ends_with('\u{FFFD}') || pending >= MAX_PENDING_TOKENS)
        {
            let new_text = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(new_text))
        } else if pending >= MAX_PENDING_TOKENS && full.len() <= prefix.len() {
            // Tokens that decode to nothing (special tokens skipped): move on.
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(None)
        } else {
            Ok(None)
        }
    }

    /// Text still held back (an incomplete character at the end), decoded lossily.
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.read_offset >= self.ids.len() {
            return Ok(None);
        }
        let prefix = self.tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let full = self
            .tok
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            Ok(Some(full[prefix.len()..].to_string()))
        } else {
            Ok(None)
        }
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
    use std::collections::HashMap;

    fn content(meta: Vec<(&str, Value)>) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn strs(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
    }

    #[test]
    fn missing_metadata_names_file_and_key() {
        let p = Path::new("/models/x.gguf");
        let err = Tok::from_gguf(&content(vec![]), p).unwrap_err().to_string();
        assert!(
            err.contains("x.gguf") && err.contains("tokenizer.ggml.model"),
            "{err}"
        );
        let c = content(vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(&["a", "b", "ab"])),
        ]);
        let err = Tok::from_gguf(&c, p).unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.merges"), "{err}");
        let c = content(vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(&["a", "b", "ab"])),
            ("tokenizer.ggml.merges", strs(&["a c"])),
        ]);
        let err = Tok::from_gguf(&c, p).unwrap_err().to_string();
        assert!(err.contains("x.gguf"), "{err}");
        let c = content(vec![
            ("tokenizer.ggml.model", Value::String("wordpiece".into())),
            ("tokenizer.ggml.tokens", strs(&["a"])),
        ]);
        let err = Tok::from_gguf(&c, p).unwrap_err().to_string();
        assert!(err.contains("unsupported tokenizer model"), "{err}");
        let c = content(vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(&["a", "b", "ab"])),
            ("tokenizer.ggml.merges", strs(&["a b"])),
            ("tokenizer.ggml.eos_token_id", Value::U32(7)),
        ]);
        let err = Tok::from_gguf(&c, p).unwrap_err().to_string();
        assert!(
            err.contains("eos_token_id") && err.contains("outside"),
            "{err}"
        );
    }

    #[test]
    fn llama_sentencepiece_style() {
        // <unk>, <s>, </s>, byte tokens for 'x' and '\n', pieces with scores.
        let tokens = [
            "<unk>", "<s>", "</s>", "<0x0A>", "<0x78>", "▁", "h", "e", "l", "o", "he", "ll", "▁he",
            "llo", "▁hello",
        ];
        let types = [2, 3, 3, 6, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
        let scores = [
            0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -2.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0,
        ];
        let c = content(vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strs(&tokens)),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array(scores.iter().map(|s| Value::F32(*s)).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ]);
        let tok = Tok::from_gguf(&c, Path::new("spm.gguf")).unwrap();
        assert_eq!(tok.bos_token(), Some("<s>"));
        assert_eq!(tok.eos_token_ids(), &[2]);
        assert_eq!(tok.encode("hello", true).unwrap(), vec![1, 14]);
        assert_eq!(tok.encode("hello", false).unwrap(), vec![14]);
        // 'x' and '\n' are not pieces: byte fallback.
        let ids = tok.encode("hex\n", false).unwrap();
        assert_eq!(ids, vec![12, 4, 3]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "hex\n");
        assert_eq!(tok.decode(&[1, 14, 2], true).unwrap(), "hello");
    }
}
