//! Types that cross the IPC boundary (Tauri commands and channels).
//!
//! Invariant: plain serde data only. No candle, no SQLite, no Tauri: this crate
//! compiles to `wasm32-unknown-unknown` for the UI.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod bundle;
mod connect;
mod docs;
mod errors;
mod export;
mod studio;
pub use bundle::*;
pub use connect::*;
pub use docs::*;
pub use errors::*;
pub use export::*;
pub use studio::*;
// The arena's judge (issue 17).
mod judge;
pub use judge::*;

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
    /// The family people know it by ("Qwen3", "Gemma 3", "Phi-3", "Llama", ...); the
    /// architecture string when Attune does not know it.
    #[serde(default)]
    pub family: String,
    /// What Attune can do with it on this machine.
    #[serde(default)]
    pub support: ModelSupport,
}

/// What Attune can do with a model on this machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelSupport {
    /// Attune runs its architecture and it fits in memory to answer.
    pub chat: bool,
    /// The training methods it can take here: "lora", "prompt", "full".
    pub methods: Vec<String>,
    /// The projections LoRA can adapt (Hugging Face names: Phi-3's are qkv_proj, o_proj,
    /// gate_up_proj, down_proj).
    pub lora_targets: Vec<String>,
    /// Why chat or a method is not available, one sentence each (empty when all are).
    pub limits: Vec<String>,
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
    /// Accepted; `position` answers are generated before this one starts.
    Queued { position: usize },
    /// The model is being loaded (first use).
    Loading,
    /// A remote endpoint asked to slow down (429): the request is sent again after
    /// `wait_ms` (attempt `attempt`).
    Retrying {
        attempt: u32,
        wait_ms: u64,
        reason: String,
    },
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
    /// CSV/TSV header names, for mapping columns (empty for other formats).
    #[serde(default)]
    pub headers: Vec<String>,
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

/// A fine-tuning method and its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum MethodSpec {
    /// Every weight is trained.
    Full,
    /// Low-rank adapters on the named projections (PEFT's meaning for each field).
    Lora {
        r: usize,
        alpha: f64,
        dropout: f32,
        /// Module names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
        targets: Vec<String>,
        rslora: bool,
    },
    /// A trained soft prompt of `virtual_tokens` embeddings.
    Prompt {
        virtual_tokens: usize,
        /// Start from this text's token embeddings (default: random vocabulary rows).
        init_text: Option<String>,
    },
}

impl MethodSpec {
    /// "full", "lora" or "prompt".
    pub fn name(&self) -> &'static str {
        match self {
            MethodSpec::Full => "full",
            MethodSpec::Lora { .. } => "lora",
            MethodSpec::Prompt { .. } => "prompt",
        }
    }

    /// LoRA with r 16, alpha 32, no dropout, every projection.
    pub fn lora_default() -> MethodSpec {
        MethodSpec::Lora {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            rslora: false,
        }
    }

    /// The usual peak learning rate for the method (full 2e-5, LoRA 2e-4, prompt 3e-2).
    pub fn default_lr(&self) -> f64 {
        match self {
            MethodSpec::Full => 2e-5,
            MethodSpec::Lora { .. } => 2e-4,
            MethodSpec::Prompt { .. } => 3e-2,
        }
    }
}

/// Learning-rate decay after the warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

/// How a run holds the frozen base of LoRA and prompt tuning: the memory it takes against its
/// speed. Full fine-tuning always trains f32 weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseFormSpec {
    /// Four bytes per weight (an f32 copy, or bf16 packed for the matrix units both ways): the
    /// fastest.
    #[default]
    F32,
    /// Two bytes per weight, expanded panel by panel inside each product.
    Bf16,
    /// The GGUF file's blocks (about 0.6 bytes per weight for Q4_K), expanded panel by panel
    /// inside each product: the least memory.
    Quantized,
}

impl BaseFormSpec {
    pub const ALL: [BaseFormSpec; 3] = [
        BaseFormSpec::F32,
        BaseFormSpec::Bf16,
        BaseFormSpec::Quantized,
    ];

    /// The command line's and the window's name.
    pub fn as_str(self) -> &'static str {
        match self {
            BaseFormSpec::F32 => "f32",
            BaseFormSpec::Bf16 => "bf16",
            BaseFormSpec::Quantized => "quantized",
        }
    }

    /// Parses [`Self::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// Everything a fine-tuning run is: what to train, on what, and how. Stored whole with
/// the run so a resumed run continues with exactly the same settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunSpec {
    /// Unique run name (default: `<method>-<dataset>`, numbered if taken). The adapter it
    /// produces gets the same name.
    pub name: Option<String>,
    /// Model id or name.
    pub model: String,
    /// Dataset id or name.
    pub dataset: String,
    pub method: MethodSpec,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Optimizer steps; when unset, `epochs` over the training split decide.
    pub steps: Option<usize>,
    pub epochs: f64,
    /// Peak learning rate (default: the method's usual one).
    pub lr: Option<f64>,
    pub warmup_steps: usize,
    pub schedule: LrSchedule,
    /// Decay at the end of the schedule, as a fraction of the peak.
    pub final_lr_fraction: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Longer rows are cut to this many tokens.
    pub max_len: usize,
    pub loss_on: LossOn,
    /// Pack the training rows end to end into blocks of `max_len` tokens (no padding, no row
    /// cut; rows that share a block attend across their boundary). Evaluation stays per row.
    pub pack: bool,
    /// Evaluate every N optimizer steps (0: only at the start and the end).
    pub eval_every: usize,
    /// Checkpoint every N optimizer steps (0: only when paused).
    pub checkpoint_every: usize,
    /// The split evaluated during the run.
    pub eval_split: SplitName,
    /// Evaluate on at most this many rows of that split (default all).
    pub eval_limit: Option<usize>,
    /// Rows of the built-in general-domain sample scored before and after training to
    /// detect forgetting (0 = off).
    pub forgetting_rows: usize,
    /// Train on a preference set's chosen/rejected pairs (DPO or ORPO) instead of supervised
    /// next-token loss; `method` still says what is trained (LoRA, full, soft prompt).
    pub preference: Option<PreferenceSpec>,
    /// How LoRA and prompt tuning hold the frozen base; `None` lets the engine choose (f32 when
    /// it fits in free memory, else the most compact form). A created run stores the form it
    /// chose, so a resumed run trains as it started.
    pub base: Option<BaseFormSpec>,
}

impl Default for RunSpec {
    fn default() -> Self {
        RunSpec {
            name: None,
            model: String::new(),
            dataset: String::new(),
            method: MethodSpec::lora_default(),
            batch_size: 4,
            grad_accum: 1,
            steps: None,
            epochs: 1.0,
            lr: None,
            warmup_steps: 0,
            schedule: LrSchedule::Cosine,
            final_lr_fraction: 0.1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            max_len: 1024,
            loss_on: LossOn::Assistant,
            pack: false,
            eval_every: 0,
            checkpoint_every: 50,
            eval_split: SplitName::Valid,
            eval_limit: None,
            forgetting_rows: 30,
            preference: None,
            base: None,
        }
    }
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Paused,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Paused,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Paused => "paused",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// A run as lists show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub id: i64,
    pub name: String,
    pub model_id: i64,
    pub model: String,
    pub dataset_id: i64,
    pub dataset: String,
    /// "full", "lora" or "prompt".
    pub method: String,
    pub status: RunStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    /// Checkpoints live under `<run_dir>/checkpoints`.
    pub run_dir: String,
    /// RFC 3339 UTC timestamps.
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The peak memory the run was estimated to need, in MiB.
    pub memory_estimate_mb: u64,
}

/// Whether a metric row is a training step or an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    Train,
    Eval,
}

// ---------------------------------------------------------------------------------------
// Preference training (DPO, ORPO)
// ---------------------------------------------------------------------------------------

/// The preference objective.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreferenceObjective {
    /// Direct Preference Optimization against a reference model (LoRA: the base with the
    /// adapter off; full fine-tuning: a frozen copy).
    #[default]
    Dpo,
    /// Odds-ratio preference optimization: reference-free, with the chosen answers' NLL.
    Orpo,
}

impl PreferenceObjective {
    pub fn as_str(self) -> &'static str {
        match self {
            PreferenceObjective::Dpo => "dpo",
            PreferenceObjective::Orpo => "orpo",
        }
    }
}

/// DPO's loss, TRL's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreferenceLoss {
    #[default]
    Sigmoid,
    Hinge,
    Ipo,
}

impl PreferenceLoss {
    pub fn as_str(self) -> &'static str {
        match self {
            PreferenceLoss::Sigmoid => "sigmoid",
            PreferenceLoss::Hinge => "hinge",
            PreferenceLoss::Ipo => "ipo",
        }
    }
}

/// A run's preference settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreferenceSpec {
    pub objective: PreferenceObjective,
    /// DPO: the strength of the pull towards the reference; ORPO: the odds-ratio weight
    /// (TRL's default 0.1 for both).
    pub beta: f64,
    /// DPO only.
    pub loss: PreferenceLoss,
}

impl Default for PreferenceSpec {
    fn default() -> Self {
        PreferenceSpec {
            objective: PreferenceObjective::Dpo,
            beta: 0.1,
            loss: PreferenceLoss::Sigmoid,
        }
    }
}

/// A preference step's figures (TRL's names in the comments).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefMetric {
    /// `rewards/chosen`: beta (log pi - log ref) of the chosen answers (ORPO: beta times their
    /// mean token log-prob).
    pub rewards_chosen: f64,
    /// `rewards/rejected`.
    pub rewards_rejected: f64,
    /// `rewards/margins`.
    pub margin: f64,
    /// `rewards/accuracies`: pairs whose chosen reward is above the rejected one.
    pub accuracy: f64,
    /// `logps/chosen`: summed answer log-probs under the model being trained.
    pub logps_chosen: f64,
    /// `logps/rejected`.
    pub logps_rejected: f64,
}

/// A dataset of chosen/rejected pairs: imported from a preference JSONL or made from an
/// arena's votes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferenceSet {
    pub dataset: DatasetSummary,
    /// "jsonl" or "arena".
    pub source: String,
    pub arena_id: Option<i64>,
    pub pairs: u64,
    /// Arena items left out: ties, "both bad", and items nobody voted on (0 for a JSONL).
    pub ties_skipped: u64,
    pub both_bad_skipped: u64,
    pub unvoted_skipped: u64,
    /// For an arena's set: whose votes made it ("human", "judge" or "combined") and, with a
    /// judge, which one (its key and label).
    #[serde(default)]
    pub votes: Option<VoteSource>,
    #[serde(default)]
    pub judge_label: Option<String>,
    /// Prompts whose judge vote could not be parsed (left out; judge and combined sources).
    #[serde(default)]
    pub unparseable_skipped: u64,
    /// Of the pairs, how many come from a human vote and how many from the judge's.
    #[serde(default)]
    pub human_pairs: u64,
    #[serde(default)]
    pub judge_pairs: u64,
}

/// One recorded step or evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMetric {
    pub step: u64,
    pub kind: MetricKind,
    /// Mean NLL per target token.
    pub loss: f64,
    /// Train only.
    pub lr: Option<f64>,
    pub grad_norm: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Resident memory of the process when it was recorded, in MiB.
    pub memory_mb: Option<f64>,
    pub at: String,
    /// Preference runs' train steps (then `loss` is the preference loss).
    #[serde(default)]
    pub pref: Option<PrefMetric>,
}

/// A run with its settings and every metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDetail {
    pub run: RunSummary,
    pub spec: RunSpec,
    pub metrics: Vec<RunMetric>,
    /// The adapter the run produced, once completed.
    pub adapter: Option<String>,
}

/// Streamed while a run executes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RunEvent {
    /// Training starts (or resumes) at `step` of `total_steps`.
    Started {
        run_id: i64,
        step: u64,
        total_steps: u64,
    },
    Step {
        metric: RunMetric,
    },
    Eval {
        step: u64,
        loss: f64,
    },
    Checkpoint {
        step: u64,
    },
    Finished {
        status: RunStatus,
        /// The adapter registered (completed runs).
        adapter: Option<String>,
    },
}

/// What an adapter holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    Lora,
    Prompt,
    /// A whole fine-tuned model (a Hugging Face folder).
    Full,
}

impl AdapterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterKind::Lora => "lora",
            AdapterKind::Prompt => "prompt",
            AdapterKind::Full => "full",
        }
    }

    pub fn parse(s: &str) -> Option<AdapterKind> {
        [AdapterKind::Lora, AdapterKind::Prompt, AdapterKind::Full]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Figures recorded with an adapter trained here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdapterMetrics {
    pub steps: u64,
    /// Mean NLL on the run's eval split before and after training.
    pub eval_nll_before: Option<f64>,
    pub eval_nll_after: Option<f64>,
    /// Mean NLL on the general-domain sample before and after training.
    pub general_nll_before: Option<f64>,
    pub general_nll_after: Option<f64>,
    /// Set when the general-domain NLL got clearly worse (more than 5% relative).
    pub forgetting_warning: Option<String>,
}

/// An adapter in the library.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterSummary {
    pub id: i64,
    pub name: String,
    pub kind: AdapterKind,
    pub base_model_id: i64,
    pub base_model: String,
    pub run_id: Option<i64>,
    pub dataset_id: Option<i64>,
    /// The PEFT folder (LoRA, prompt) or Hugging Face model folder (full).
    pub path: String,
    pub created_at: String,
    pub metrics: AdapterMetrics,
}

/// A prompt template: a system prompt and few-shot turns put before every row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptTemplate {
    pub name: String,
    pub system: Option<String>,
    /// user / assistant pairs, in order.
    pub examples: Vec<ChatMessage>,
    /// Wraps each user message; holds `{{input}}` (None: the message alone).
    #[serde(default)]
    pub user: Option<String>,
    /// Values for the `{{name}}` placeholders in `system`, `examples` and `user`.
    #[serde(default)]
    pub values: BTreeMap<String, String>,
}

/// What is evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EvalSubject {
    /// A model as it is (id or name).
    Base { model: String },
    /// An adapter on its base model (id or name).
    Adapter { adapter: String },
    /// A model with a prompt template before every row.
    Template {
        model: String,
        template: PromptTemplate,
    },
}

/// How to evaluate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalOptions {
    pub split: SplitName,
    /// At most this many rows (in stored order).
    pub limit: Option<usize>,
    pub max_len: usize,
    pub loss_on: LossOn,
    /// Generate an answer for every labeled row and compare its `Final answer: ...`.
    pub accuracy: bool,
    /// Most tokens generated per answer.
    pub max_new_tokens: usize,
    /// Rows of the general-domain sample to score, and the base model's score to compare
    /// (0 = off).
    pub forgetting_rows: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            split: SplitName::Valid,
            limit: None,
            max_len: 1024,
            loss_on: LossOn::Assistant,
            accuracy: false,
            max_new_tokens: 64,
            forgetting_rows: 0,
        }
    }
}

/// One row's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowScore {
    pub source_id: Option<String>,
    pub sum_nll: f64,
    pub n_tokens: u64,
    /// The parsed answer and whether it matched the label (labeled rows with accuracy on).
    pub answer: Option<String>,
    pub correct: Option<bool>,
}

/// An evaluation's result (also recorded in the library).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub id: i64,
    /// "base", "adapter" or "template".
    pub subject_kind: String,
    /// Model, adapter or template name.
    pub subject: String,
    pub model_id: i64,
    pub dataset_id: i64,
    pub split: SplitName,
    pub n_rows: u64,
    /// Mean NLL per target token, and its exponential.
    pub mean_nll: f64,
    pub ppl: f64,
    pub n_tokens: u64,
    pub accuracy: Option<f64>,
    pub n_labeled: u64,
    /// Mean NLL on the general-domain sample, and the base model's.
    pub forgetting_nll: Option<f64>,
    pub base_forgetting_nll: Option<f64>,
    pub forgetting_warning: Option<String>,
    pub rows: Vec<RowScore>,
    pub created_at: String,
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
