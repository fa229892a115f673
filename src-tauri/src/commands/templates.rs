//! Prompt template commands: list, versions, save (create or add a version), remove
//! and the exact-text preview under a model.

use super::blocking;
use crate::AppState;
use attune_protocol::{IpcError, TemplateDraft, TemplatePreview, TemplateRecord};
use std::collections::BTreeMap;
use tauri::State;

/// Every template at its newest version, by name.
#[tauri::command]
pub async fn list_templates(state: State<'_, AppState>) -> Result<Vec<TemplateRecord>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_templates().map_err(|e| IpcError::from(&e))).await
}

/// Every version of template `id`, newest first.
#[tauri::command]
pub async fn template_versions(
    state: State<'_, AppState>,
    id: i64,
) -> Result<Vec<TemplateRecord>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.template_versions(id).map_err(|e| IpcError::from(&e))).await
}

/// Creates a template or adds a version (only when it changed); returns the newest.
#[tauri::command]
pub async fn save_template(
    state: State<'_, AppState>,
    draft: TemplateDraft,
) -> Result<TemplateRecord, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.save_template(&draft).map_err(|e| IpcError::from(&e))).await
}

/// Removes a template and its versions.
#[tauri::command]
pub async fn remove_template(state: State<'_, AppState>, id: i64) -> Result<(), IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.remove_template(id).map_err(|e| IpcError::from(&e))).await
}

/// The request an API model receives for `draft` and `message` (it applies its own chat
/// template).
#[tauri::command]
pub async fn preview_template_for_endpoint(
    state: State<'_, AppState>,
    endpoint: attune_protocol::EndpointModel,
    draft: TemplateDraft,
    message: String,
    values: Option<BTreeMap<String, String>>,
) -> Result<TemplatePreview, IpcError> {
    let engine = state.engine()?;
    let values = values.unwrap_or_default();
    blocking(move || {
        engine
            .preview_template_for_endpoint(&endpoint, &draft, &message, &values)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// The exact text model `model_id` receives for `draft` and `message`.
#[tauri::command]
pub async fn preview_template(
    state: State<'_, AppState>,
    model_id: i64,
    draft: TemplateDraft,
    message: String,
    values: Option<BTreeMap<String, String>>,
) -> Result<TemplatePreview, IpcError> {
    let engine = state.engine()?;
    let values = values.unwrap_or_default();
    blocking(move || {
        engine
            .preview_template(model_id, &draft, &message, &values)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}
