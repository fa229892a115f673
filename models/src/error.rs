//! Errors of the model runtime. Each variant names the file or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a valid GGUF / safetensors / JSON file.
    #[error("{path} is not a valid {format} file: {reason}")]
    Format {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error(
        "{path}: unsupported architecture '{architecture}' (supported: llama, mistral, qwen2, qwen3, gemma3, phi3, smollm3)"
    )]
    UnsupportedArchitecture { path: PathBuf, architecture: String },
    /// A required metadata key / config field / tensor is missing or has a bad value.
    #[error("{path}: {field}: {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("tokenizer ({path}): {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("adapter {path}: {reason}")]
    Adapter { path: PathBuf, reason: String },
    #[error("invalid generation settings: {0}")]
    InvalidParams(String),
    /// The compute device cannot be had (`ATTUNE_DEVICE`, see [`crate::device`]).
    #[error("device: {0}")]
    Device(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A long operation (an export) was stopped by its cancel flag.
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, format: &'static str, reason: impl ToString) -> Self {
        Error::Format {
            path: path.into(),
            format,
            reason: reason.to_string(),
        }
    }
    pub fn field(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        reason: impl ToString,
    ) -> Self {
        Error::Field {
            path: path.into(),
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}
