//! Exports: what to export, how, the streamed progress, and the record kept in the library
//! with its verification.

use serde::{Deserialize, Serialize};

/// A file format other tools run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// One GGUF file (llama.cpp, Ollama, LM Studio, ...), a LoRA folded into the weights.
    Gguf,
    /// A LoRA adapter as llama.cpp's adapter GGUF (`--lora`, Ollama's `ADAPTER`).
    GgufLora,
    /// A GGUF plus a Modelfile for `ollama create`.
    Ollama,
    /// A Hugging Face model folder (transformers, vLLM, ...).
    Hf,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 4] = [
        ExportFormat::Gguf,
        ExportFormat::GgufLora,
        ExportFormat::Ollama,
        ExportFormat::Hf,
    ];

    /// The CLI's name: gguf, gguf-lora, ollama, hf.
    pub fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Gguf => "gguf",
            ExportFormat::GgufLora => "gguf-lora",
            ExportFormat::Ollama => "ollama",
            ExportFormat::Hf => "hf",
        }
    }

    pub fn parse(s: &str) -> Option<ExportFormat> {
        let s = s.trim().to_ascii_lowercase().replace('_', "-");
        ExportFormat::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// In words, for the UI.
    pub fn label(self) -> &'static str {
        match self {
            ExportFormat::Gguf => "GGUF (llama.cpp, LM Studio)",
            ExportFormat::GgufLora => "LoRA GGUF (llama.cpp --lora, Ollama ADAPTER)",
            ExportFormat::Ollama => "Ollama (GGUF + Modelfile)",
            ExportFormat::Hf => "Hugging Face folder (transformers)",
        }
    }
}

/// The numeric type of the exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportQuant {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4KM,
}

impl ExportQuant {
    pub const ALL: [ExportQuant; 5] = [
        ExportQuant::F32,
        ExportQuant::F16,
        ExportQuant::Bf16,
        ExportQuant::Q8_0,
        ExportQuant::Q4KM,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExportQuant::F32 => "f32",
            ExportQuant::F16 => "f16",
            ExportQuant::Bf16 => "bf16",
            ExportQuant::Q8_0 => "q8_0",
            ExportQuant::Q4KM => "q4_k_m",
        }
    }

    pub fn parse(s: &str) -> Option<ExportQuant> {
        let s = s.trim().to_ascii_lowercase();
        ExportQuant::ALL.into_iter().find(|q| q.as_str() == s)
    }
}

/// What is exported: a model of the library, or an adapter (on its base).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExportSubject {
    Model { model: String },
    Adapter { adapter: String },
}

/// An export to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExportRequest {
    pub subject: ExportSubject,
    pub format: ExportFormat,
    /// The weights' type (GGUF and Ollama; default F16). Hugging Face folders and LoRA GGUF
    /// files are F32.
    pub quant: Option<ExportQuant>,
    /// The destination folder (created if missing; must be empty unless `overwrite`).
    pub dest: String,
    /// Replace files of the same names in a non-empty destination (other files stay).
    pub overwrite: bool,
    /// Ollama: keep a LoRA as `ADAPTER` over the base GGUF instead of folding it in.
    pub ollama_adapter: bool,
    /// Ollama: `SYSTEM` (and few-shot `MESSAGE`s) from this saved prompt template.
    pub template: Option<String>,
}

impl Default for ExportRequest {
    fn default() -> Self {
        ExportRequest {
            subject: ExportSubject::Model {
                model: String::new(),
            },
            format: ExportFormat::Gguf,
            quant: None,
            dest: String::new(),
            overwrite: false,
            ollama_adapter: false,
            template: None,
        }
    }
}

/// One format's availability for a subject, and the size each weight type would give.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormatOption {
    pub format: ExportFormat,
    /// Why this format cannot carry the subject (None: it can).
    pub unavailable: Option<String>,
    /// (type, estimated bytes of all files) for the types this format offers.
    pub sizes: Vec<(ExportQuant, u64)>,
}

/// What the export dialog offers for a subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportOptions {
    pub subject: String,
    /// "model", "lora", "prompt" or "full".
    pub kind: String,
    pub formats: Vec<FormatOption>,
}

/// Streamed while an export runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportProgress {
    /// e.g. "loading", "writing tensors", "verifying".
    pub stage: String,
    pub done: u64,
    pub total: u64,
}

/// One compared property of a written file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyCheck {
    /// The file (or folder) checked, relative to the destination.
    pub file: String,
    /// e.g. "greedy tokens", "mean NLL", "Modelfile".
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// The check of an export after it was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    pub passed: bool,
    /// One line for people.
    pub summary: String,
    /// The tolerances applied, in words.
    pub tolerance: String,
    pub checks: Vec<VerifyCheck>,
    /// The check prompts' answers by the app's model (token ids), for outside checks.
    #[serde(default)]
    pub reference: Vec<ReferenceAnswer>,
}

/// One check prompt as the app's model answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceAnswer {
    /// The prompt rendered through the chat template.
    pub text: String,
    pub prompt_ids: Vec<u32>,
    pub answer_ids: Vec<u32>,
}

/// A file an export wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportFile {
    /// Relative to the destination folder.
    pub name: String,
    pub bytes: u64,
}

/// An export in the library.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRecord {
    pub id: i64,
    /// "model" or "adapter".
    pub subject_kind: String,
    pub subject: String,
    pub format: ExportFormat,
    pub quant: ExportQuant,
    /// The destination folder.
    pub path: String,
    pub files: Vec<ExportFile>,
    pub bytes: u64,
    pub verification: Verification,
    pub attune_version: String,
    pub created_at: String,
}
