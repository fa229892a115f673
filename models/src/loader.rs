//! One entry point that opens a model from disk: a `.gguf` file or a Hugging Face folder.
//!
//! Returns the decoder together with its tokenizer and chat template, all read from the same
//! source, so callers never mix a model with another model's vocabulary.

use std::path::{Path, PathBuf};

use crate::chat_template::ChatTemplate;
use crate::config::Config;
use crate::llama::Llama;
use crate::tokenizer::Tok;
use crate::{Error, Result};

pub use crate::linear::ComputeMode;

/// A model ready to run: weights, tokenizer and chat template from one source.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tok,
    pub chat_template: ChatTemplate,
    pub config: Config,
    pub path: PathBuf,
}

/// How to load a model.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// Weight form for the matrix products (GGUF only; Hugging Face folders are f32).
    pub compute: ComputeMode,
}

/// What kind of model source `path` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Gguf,
    HfFolder,
}

/// Classifies `path` without reading the weights.
pub fn source_kind(path: &Path) -> Result<SourceKind> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(SourceKind::HfFolder);
        }
        return Err(Error::field(
            path,
            "config.json",
            "the folder has no config.json (expected a Hugging Face model folder)",
        ));
    }
    let mut magic = [0u8; 4];
    let mut f = crate::fsio::open_regular(path)?;
    use std::io::Read;
    match f.read_exact(&mut magic) {
        Ok(()) if &magic == b"GGUF" => Ok(SourceKind::Gguf),
        Ok(()) => Err(Error::format(
            path,
            "GGUF",
            "the file does not start with 'GGUF'",
        )),
        Err(e) => Err(Error::format(path, "GGUF", format!("too short: {e}"))),
    }
}

/// Checks everything about a model source except its tensor data, as registration needs:
/// the architecture is supported and the configuration is consistent (GGUF metadata or
/// `config.json`), the tokenizer is there and builds (GGUF vocabulary or `tokenizer.json`), and
/// the chat template compiles and renders a short conversation within its step budget.
pub fn check(path: &Path) -> Result<()> {
    let (config, tokenizer, template) = text_side(path)?;
    let vocab = tokenizer.vocab_size();
    if vocab == 0 || vocab > config.vocab_size {
        return Err(Error::Tokenizer {
            path: tokenizer.source().to_path_buf(),
            reason: format!(
                "the tokenizer has {vocab} tokens but the model's embedding has {} rows",
                config.vocab_size
            ),
        });
    }
    let sample = [
        crate::chat_template::Message::new("system", "You are helpful."),
        crate::chat_template::Message::new("user", "Hello"),
        crate::chat_template::Message::new("assistant", "Hi."),
        crate::chat_template::Message::new("user", "Thanks"),
    ];
    template.render(&sample, true).map_err(|e| match e {
        Error::ChatTemplate(m) => Error::ChatTemplate(format!(
            "{}: the chat template cannot render a plain conversation: {m}",
            path.display()
        )),
        other => other,
    })?;
    Ok(())
}

/// The config, tokenizer and chat template of the model at `path`, without its weights: what
/// rendering and counting tokens need (a GGUF's header is read, not its tensors).
pub fn text_side(path: &Path) -> Result<(Config, Tok, ChatTemplate)> {
    Ok(match source_kind(path)? {
        SourceKind::Gguf => {
            let content = crate::gguf::read_content(path)?;
            let config = crate::gguf::config_from_content(&content, path)?;
            if !content.metadata.contains_key("tokenizer.ggml.tokens") {
                return Err(Error::Tokenizer {
                    path: path.to_path_buf(),
                    reason: "the GGUF has no tokenizer (tokenizer.ggml.tokens is missing)".into(),
                });
            }
            (
                config,
                Tok::from_gguf(&content, path)?,
                ChatTemplate::from_gguf(&content, path)?,
            )
        }
        SourceKind::HfFolder => {
            let config = crate::hf::read_config(path)?;
            (
                config,
                Tok::from_hf_dir(path)?,
                ChatTemplate::from_hf_dir(path)?,
            )
        }
    })
}

/// [`load`], then the model moved to `device` ([`Llama::to_device`](crate::llama::Llama::to_device):
/// dense f32 weights there, the portable path); the CPU keeps the model exactly as loaded, with
/// its fused kernels. Chat, evaluation and training load this way, with the device
/// [`crate::device::select`] reads from `ATTUNE_DEVICE`; exports and their checks use [`load`],
/// which always loads on the CPU.
pub fn load_on(
    path: &Path,
    opts: &LoadOptions,
    device: &candle_core::Device,
) -> Result<LoadedModel> {
    let mut m = load(path, opts)?;
    if !device.is_cpu() {
        m.model = m.model.to_device(device)?;
    }
    Ok(m)
}

/// [`load_on`] the device `ATTUNE_DEVICE` names ([`crate::device::select`]; the CPU when unset).
pub fn load_on_selected(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    load_on(path, opts, &crate::device::select()?)
}

/// Loads a model. `path`: a `.gguf` file, or a Hugging Face folder (`config.json` +
/// `*.safetensors`, single or sharded via `model.safetensors.index.json`, + `tokenizer.json` +
/// `tokenizer_config.json`).
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    match source_kind(path)? {
        SourceKind::Gguf => {
            let g = crate::gguf::load(path, opts.compute)?;
            let tokenizer = Tok::from_gguf(&g.content, path)?;
            let chat_template = ChatTemplate::from_gguf(&g.content, path)?;
            Ok(LoadedModel {
                model: g.model,
                tokenizer,
                chat_template,
                config: g.config,
                path: path.to_path_buf(),
            })
        }
        SourceKind::HfFolder => {
            let tokenizer = Tok::from_hf_dir(path)?;
            let chat_template = ChatTemplate::from_hf_dir(path)?;
            let h = crate::hf::load(path)?;
            Ok(LoadedModel {
                model: h.model,
                tokenizer,
                chat_template,
                config: h.config,
                path: path.to_path_buf(),
            })
        }
    }
}
