//! Remote OpenAI-compatible endpoints: add (the key goes to the OS keyring, never the
//! library), list, fetch their models, give a key again, remove. Answers from them go
//! through `chat_target` like any other target.

use super::blocking;
use crate::AppState;
use attune_protocol::{EndpointAdded, EndpointDraft, EndpointSummary, IpcError, KeyStorage};
use tauri::State;

#[tauri::command]
pub async fn list_endpoints(state: State<'_, AppState>) -> Result<Vec<EndpointSummary>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_endpoints().map_err(|e| IpcError::from(&e))).await
}

#[tauri::command]
pub async fn add_endpoint(
    state: State<'_, AppState>,
    draft: EndpointDraft,
) -> Result<EndpointAdded, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.add_endpoint(&draft).map_err(|e| IpcError::from(&e))).await
}

/// Asks the endpoint for its models (network: only to the endpoint the user added).
#[tauri::command]
pub async fn refresh_endpoint_models(
    state: State<'_, AppState>,
    id: i64,
) -> Result<EndpointSummary, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .refresh_endpoint_models(&id.to_string())
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

#[tauri::command]
pub async fn set_endpoint_key(
    state: State<'_, AppState>,
    id: i64,
    key: String,
) -> Result<KeyStorage, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .set_endpoint_key(&id.to_string(), &key)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

#[tauri::command]
pub async fn remove_endpoint(state: State<'_, AppState>, id: i64) -> Result<(), IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .remove_endpoint(&id.to_string())
            .map(|_| ())
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// The request id of the app's endpoint evaluation (cancelled by `cancel_evaluation`).
pub(crate) const ENDPOINT_EVALUATION: &str = "evaluation";

/// Evaluates a template (or none) against an endpoint's model on a dataset split:
/// label accuracy only, streamed progress; recorded in the library.
#[tauri::command]
pub async fn evaluate_endpoint(
    state: State<'_, AppState>,
    endpoint_id: i64,
    model: String,
    template: Option<attune_protocol::PromptTemplate>,
    dataset_id: i64,
    options: attune_protocol::EvalOptions,
    on_progress: tauri::ipc::Channel<attune_protocol::EvalProgress>,
) -> Result<attune_protocol::EndpointEvalReport, IpcError> {
    let actor = state.actor()?;
    let requests = std::sync::Arc::clone(&state.requests);
    blocking(move || {
        let (cancel, _done) = requests.begin(ENDPOINT_EVALUATION);
        let window_gone = cancel.clone();
        let on_progress = Box::new(move |p| {
            if on_progress.send(p).is_err() {
                window_gone.cancel();
            }
        });
        actor
            .call(|reply| attune_engine::Request::EvaluateEndpoint {
                endpoint: endpoint_id.to_string(),
                model,
                template,
                dataset: dataset_id.to_string(),
                options,
                cancel,
                on_progress,
                reply,
            })
            .map_err(|e| IpcError::from(&e))
    })
    .await
}
