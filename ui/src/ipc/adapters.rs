//! Mirrors `src-tauri/src/commands/adapters.rs`: adapters and evaluations.

use super::{invoke, invoke_with_channel};
use attune_protocol::{
    AdapterSummary, EvalOptions, EvalProgress, EvalReport, EvalSubject, IpcError, ModelSummary,
};
use serde_json::json;

pub async fn list_adapters() -> Result<Vec<AdapterSummary>, IpcError> {
    invoke("list_adapters", &json!({})).await
}

pub async fn remove_adapter(id: i64) -> Result<(), IpcError> {
    invoke("remove_adapter", &json!({ "id": id })).await
}

/// Copies the adapter's folder into `dir`; returns the folder written.
pub async fn export_adapter(id: i64, dir: &str) -> Result<String, IpcError> {
    super::invoke_granted("export_adapter", &json!({ "id": id, "dir": dir }), true).await
}

/// Imports a PEFT adapter folder onto `base_model_id`.
pub async fn import_adapter(
    path: &str,
    base_model_id: i64,
    name: Option<&str>,
) -> Result<AdapterSummary, IpcError> {
    super::invoke_granted(
        "import_adapter",
        &json!({ "path": path, "baseModelId": base_model_id, "name": name }),
        false,
    )
    .await
}

/// Merges a LoRA adapter into its base and registers the result as a model.
pub async fn merge_adapter(id: i64, name: Option<&str>) -> Result<ModelSummary, IpcError> {
    invoke("merge_adapter", &json!({ "id": id, "name": name })).await
}

/// Evaluates `subject` on a dataset split; progress streams to `on_progress`.
pub async fn evaluate(
    subject: &EvalSubject,
    dataset_id: i64,
    options: &EvalOptions,
    on_progress: impl FnMut(Result<EvalProgress, IpcError>) + 'static,
) -> Result<EvalReport, IpcError> {
    invoke_with_channel(
        "evaluate",
        &json!({ "subject": subject, "datasetId": dataset_id, "options": options }),
        "onProgress",
        on_progress,
    )
    .await
}

/// Stops the running evaluation.
pub async fn cancel_evaluation() -> Result<(), IpcError> {
    invoke("cancel_evaluation", &json!({})).await
}

/// Every recorded evaluation, newest first (without per-row scores).
pub async fn list_evaluations() -> Result<Vec<EvalReport>, IpcError> {
    invoke("list_evaluations", &json!({})).await
}
