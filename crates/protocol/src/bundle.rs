//! Run bundles: a run handed to an existing training engine (TRL + accelerate, or Axolotl)
//! on another machine, and its result brought back.

use serde::{Deserialize, Serialize};

/// The engine a bundle is launched with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleEngine {
    /// Hugging Face TRL's `SFTTrainer` (with PEFT), launched by `accelerate launch`.
    Trl,
    /// Axolotl (`axolotl train`), a YAML over the same data.
    Axolotl,
}

impl BundleEngine {
    pub const ALL: [BundleEngine; 2] = [BundleEngine::Trl, BundleEngine::Axolotl];

    pub fn as_str(self) -> &'static str {
        match self {
            BundleEngine::Trl => "trl",
            BundleEngine::Axolotl => "axolotl",
        }
    }

    pub fn parse(s: &str) -> Option<BundleEngine> {
        BundleEngine::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// What exporting a run as a bundle answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleReply {
    pub run_id: i64,
    pub run: String,
    pub engine: BundleEngine,
    /// The bundle's folder.
    pub dir: String,
    /// sha256 over the bundle's files (names and contents, `output/` excluded): the
    /// provenance an imported result is matched by.
    pub sha256: String,
    /// The files written, relative to `dir`.
    pub files: Vec<String>,
    /// Training rows and validation rows written.
    pub train_rows: u64,
    pub valid_rows: u64,
    /// Where the bundle's model comes from (a Hub repo id or a local path).
    pub model_source: String,
    /// Settings the engines cannot take one to one, one sentence each (also in the README).
    pub unmapped: Vec<String>,
}

/// What importing a bundle's result answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportResultReply {
    pub run_id: i64,
    pub run: String,
    /// The adapter (LoRA, soft prompt, or a full fine-tune's folder) registered for the run.
    pub adapter: String,
    /// "lora", "prompt" or "full".
    pub kind: String,
    pub engine: BundleEngine,
    /// The engine's version, as the result recorded it (e.g. "trl 1.16.0").
    pub engine_version: String,
    pub bundle_sha256: String,
    /// Training and evaluation points read from the engine's log.
    pub train_points: u64,
    pub eval_points: u64,
    /// Optimizer steps the engine ran.
    pub steps: u64,
}

/// GPU memory a run would need per GPU on a GPU machine (the bundle's TRL recipe: f32
/// weights, bf16 autocast, AdamW), for one method at one scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuNeed {
    /// "full", "lora" or "prompt".
    pub method: String,
    /// GPUs the run is spread over (1: one GPU; more: DeepSpeed ZeRO-3, which shards the
    /// weights, gradients and optimizer state).
    pub gpus: u64,
    /// Per GPU, in MiB.
    pub memory_mb: u64,
}

/// The advisor's offer to train a run on a GPU machine through a bundle, when it will not fit
/// here or would take longer than the budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuOffer {
    /// Why, in one sentence.
    pub reason: String,
    /// What the run would need, per method, on one GPU and sharded over eight.
    pub needs: Vec<GpuNeed>,
    /// How to hand it over (the CLI commands; the app's "Export to a GPU machine").
    pub how: String,
}
