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

/// How a dataset file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// JSON Lines, OpenAI style: `{"messages": [{"role", "content"}, ...]}`.
    Chat,
    /// JSON Lines, ShareGPT style: `{"conversations": [{"from", "value"}, ...]}`.
    Sharegpt,
    /// JSON Lines, Alpaca style: `{"instruction", "input"?, "output", "system"?}`.
    Alpaca,
    /// Comma- (or, for `.tsv`, tab-) separated values with a header row and a [`ColumnMap`].
    Csv,
    /// Plain text for continued pre-training: one document per line (or per paragraph).
    Text,
}

impl DatasetFormat {
    pub const ALL: [DatasetFormat; 5] = [
        DatasetFormat::Chat,
        DatasetFormat::Sharegpt,
        DatasetFormat::Alpaca,
        DatasetFormat::Csv,
        DatasetFormat::Text,
    ];

    /// The name used in the library, the CLI and JSON: "chat", "sharegpt", ...
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetFormat::Chat => "chat",
            DatasetFormat::Sharegpt => "sharegpt",
            DatasetFormat::Alpaca => "alpaca",
            DatasetFormat::Csv => "csv",
            DatasetFormat::Text => "text",
        }
    }

    pub fn parse(s: &str) -> Option<DatasetFormat> {
        DatasetFormat::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// What one dataset row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleKind {
    /// A conversation (system?, user, assistant, ...).
    Chat,
    /// A plain document.
    Text,
}

impl SampleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SampleKind::Chat => "chat",
            SampleKind::Text => "text",
        }
    }
}

/// One of a dataset's three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitName {
    Train,
    Valid,
    Test,
}

impl SplitName {
    pub const ALL: [SplitName; 3] = [SplitName::Train, SplitName::Valid, SplitName::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            SplitName::Train => "train",
            SplitName::Valid => "valid",
            SplitName::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<SplitName> {
        SplitName::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// How an imported dataset is divided into train / valid / test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Split {
    /// A deterministic shuffle (SplitMix64 seeded with `seed`, Fisher-Yates) assigns
    /// `round(valid_fraction * n)` rows to valid and `round(test_fraction * n)` to test
    /// (at least one each when the fraction is positive); each part keeps file order.
    Seeded {
        valid_fraction: f64,
        test_fraction: f64,
        seed: u64,
    },
    /// Every row is a training row.
    AllTrain,
    /// The file is the training split; the validation and test splits come from their own files.
    Files {
        valid_path: Option<String>,
        test_path: Option<String>,
    },
}

impl Default for Split {
    fn default() -> Self {
        Split::Seeded {
            valid_fraction: 0.1,
            test_fraction: 0.0,
            seed: 42,
        }
    }
}

/// Which CSV columns hold what (header names). Chat rows need `prompt` and `response`
/// (`system` optional); text rows need `text`. `label` and `id` are kept when named.
/// Left empty, the columns are guessed from the header (prompt/instruction/question,
/// response/output/answer/completion, text, system, label, id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ColumnMap {
    pub prompt: Option<String>,
    pub response: Option<String>,
    pub system: Option<String>,
    pub label: Option<String>,
    pub id: Option<String>,
    pub text: Option<String>,
}

/// How to read and divide a dataset file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImportOptions {
    /// Library name; default the file's stem.
    pub name: Option<String>,
    /// Overrides detection (from the extension and the first parseable record).
    pub format: Option<DatasetFormat>,
    /// CSV only.
    pub columns: ColumnMap,
    /// Text only: one document per blank-line-separated paragraph instead of per line.
    pub paragraphs: bool,
    pub split: Split,
    /// Import the good rows even though some rows are bad (the bad ones are skipped).
    pub accept_bad_rows: bool,
    /// How many normalized rows a preview shows.
    pub preview_rows: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            name: None,
            format: None,
            columns: ColumnMap::default(),
            paragraphs: false,
            split: Split::default(),
            accept_bad_rows: false,
            preview_rows: 5,
        }
    }
}

/// A row that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRow {
    /// The file it is in.
    pub file: String,
    /// 1-based line number (CSV: the line the record starts on).
    pub line: u64,
    pub reason: String,
}

/// A row's content, normalized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RowSample {
    Chat { messages: Vec<ChatMessage> },
    Text { text: String },
}

/// One normalized row as a preview shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewRow {
    pub line: u64,
    pub source_id: Option<String>,
    pub label: Option<String>,
    pub sample: RowSample,
}

/// What importing a file would give, before anything is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetPreview {
    pub path: String,
    pub format: DatasetFormat,
    /// The format came from detection, not from the options.
    pub format_detected: bool,
    pub kind: SampleKind,
    /// The name it would get.
    pub name: String,
    /// Usable rows in all files, duplicates included.
    pub good_rows: u64,
    /// Exact duplicates (same content) that would be dropped, the first copy kept.
    pub duplicates: u64,
    pub bad_row_count: u64,
    /// The bad rows (at most the first 1000; `bad_row_count` has them all).
    pub bad_rows: Vec<BadRow>,
    pub train_rows: u64,
    pub valid_rows: u64,
    pub test_rows: u64,
    /// The first rows of the file, normalized.
    pub rows: Vec<PreviewRow>,
}

/// A dataset in the library.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub id: i64,
    pub name: String,
    pub format: DatasetFormat,
    pub kind: SampleKind,
    pub source_path: String,
    /// SHA-256 (hex) over every stored row with its split, in order.
    pub content_hash: String,
    /// RFC 3339 UTC timestamp.
    pub created_at: String,
    pub train_rows: u64,
    pub valid_rows: u64,
    pub test_rows: u64,
    pub duplicates_removed: u64,
    pub bad_rows_skipped: u64,
    pub split: Split,
}

/// Which tokens a training loss is taken on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossOn {
    /// The assistant turns only (text rows: every token).
    #[default]
    Assistant,
    All,
}

/// Token figures for one split under one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    pub split: SplitName,
    pub rows: u64,
    /// Tokens per row before truncation.
    pub tokens_min: u64,
    pub tokens_mean: f64,
    pub tokens_max: u64,
    pub tokens_total: u64,
    /// Tokens the loss is taken on, after truncation to `max_len`.
    pub target_tokens: u64,
    /// Rows longer than `max_len` (they would be cut).
    pub truncated_rows: u64,
}

/// Token statistics of a dataset under a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetStats {
    pub dataset_id: i64,
    pub model_id: i64,
    pub model: String,
    pub max_len: u64,
    pub loss_on: LossOn,
    /// Train, valid, test (a split with no rows has all-zero figures).
    pub splits: Vec<SplitStats>,
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
    fn import_options_fill_defaults_and_split_is_tagged() {
        let o: ImportOptions =
            serde_json::from_str(r#"{"split":{"kind":"all_train"}}"#).expect("parse");
        assert_eq!(o.split, Split::AllTrain);
        assert_eq!(o.preview_rows, ImportOptions::default().preview_rows);
        let s = serde_json::to_string(&Split::default()).expect("json");
        assert!(s.starts_with(r#"{"kind":"seeded""#), "{s}");
        for f in DatasetFormat::ALL {
            assert_eq!(DatasetFormat::parse(f.as_str()), Some(f));
        }
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
