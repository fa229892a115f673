//! Types that cross the IPC boundary (Tauri commands and channels).
//!
//! Invariant: plain serde data only. No candle, no SQLite, no Tauri: this crate
//! compiles to `wasm32-unknown-unknown` for the UI.

use serde::{Deserialize, Serialize};

/// Where a registered model came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSource {
    /// A file or folder on this machine.
    Local { path: String },
    /// A Hugging Face Hub repository at a revision (files live in the HF cache).
    Hub {
        repo: String,
        revision: String,
        path: String,
    },
}

/// On-disk format of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    Gguf,
    Safetensors,
}

/// A model registered in the library, as the user sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub id: i64,
    pub name: String,
    pub architecture: String,
    pub format: ModelFormat,
    pub parameters: u64,
    /// e.g. "Q4_1", "F32", "BF16".
    pub quantization: String,
    pub context_length: u64,
    pub file_size: u64,
    pub sha256: String,
    pub source: ModelSource,
    /// RFC 3339 UTC timestamp.
    pub added_at: String,
}

/// What registering a model answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddModelReply {
    pub model: ModelSummary,
    /// The same weights (same sha256) were already registered; nothing was added.
    pub already_present: bool,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

/// Sampling settings for one generation. `Default` gives the app's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    /// 1.0 disables it.
    pub repetition_penalty: f32,
    /// How many recent tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.7,
            top_k: Some(40),
            top_p: Some(0.95),
            min_p: Some(0.05),
            repetition_penalty: 1.1,
            repeat_last_n: 64,
            seed: 42,
            stop: Vec::new(),
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    Length,
    Stop,
    Cancelled,
}

/// Figures for one finished generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationStats {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_ms: f64,
    pub generate_ms: f64,
    pub prompt_tok_per_s: f64,
    pub generate_tok_per_s: f64,
}

/// Streamed to the UI while a chat answer is generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ChatEvent {
    /// The model is being loaded (first use).
    Loading,
    /// A piece of text.
    Token { text: String },
    /// Finished; the full text and timings.
    Done { stats: GenerationStats },
}

/// The one error shape returned over IPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcError {
    /// Stable machine-readable code, e.g. "not_found", "invalid_input", "model_load".
    pub code: String,
    /// A human sentence naming what and where.
    pub message: String,
}

impl std::fmt::Display for IpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_params_fill_missing_fields_with_defaults() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature":0.0}"#).expect("parse");
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.max_tokens, SamplingParams::default().max_tokens);
    }

    #[test]
    fn chat_event_json_is_tagged() {
        let e = ChatEvent::Token { text: "hi".into() };
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            r#"{"event":"token","text":"hi"}"#
        );
    }
}
