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
