//! Mirrors `src-tauri/src/commands/endpoints.rs`: remote OpenAI-compatible endpoints.

use super::invoke;
use attune_protocol::{EndpointAdded, EndpointDraft, EndpointSummary, IpcError, KeyStorage};
use serde_json::json;

pub async fn list_endpoints() -> Result<Vec<EndpointSummary>, IpcError> {
    invoke("list_endpoints", &json!({})).await
}

/// Adds an endpoint; its key goes to the OS keyring (or memory, as `key_note` says).
pub async fn add_endpoint(draft: &EndpointDraft) -> Result<EndpointAdded, IpcError> {
    invoke("add_endpoint", &json!({ "draft": draft })).await
}

/// Asks the endpoint for its models.
pub async fn refresh_endpoint_models(id: i64) -> Result<EndpointSummary, IpcError> {
    invoke("refresh_endpoint_models", &json!({ "id": id })).await
}

/// Gives an endpoint its key again.
pub async fn set_endpoint_key(id: i64, key: &str) -> Result<KeyStorage, IpcError> {
    invoke("set_endpoint_key", &json!({ "id": id, "key": key })).await
}

pub async fn remove_endpoint(id: i64) -> Result<(), IpcError> {
    invoke("remove_endpoint", &json!({ "id": id })).await
}

/// Evaluates `template` (or none) against an endpoint's model: label accuracy only;
/// `cancel_evaluation` stops it.
pub async fn evaluate_endpoint(
    endpoint_id: i64,
    model: &str,
    template: Option<&attune_protocol::PromptTemplate>,
    dataset_id: i64,
    options: &attune_protocol::EvalOptions,
    on_progress: impl FnMut(Result<attune_protocol::EvalProgress, IpcError>) + 'static,
) -> Result<attune_protocol::EndpointEvalReport, IpcError> {
    super::invoke_with_channel(
        "evaluate_endpoint",
        &json!({
            "endpointId": endpoint_id,
            "model": model,
            "template": template,
            "datasetId": dataset_id,
            "options": options,
        }),
        "onProgress",
        on_progress,
    )
    .await
}
