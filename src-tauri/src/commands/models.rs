//! Model library commands: list and register models.

use super::blocking;
use crate::AppState;
use attune_protocol::{AddModelReply, IpcError, ModelSummary};
use std::path::PathBuf;
use tauri::State;

/// All registered models, oldest first.
#[tauri::command]
pub async fn list_models(state: State<'_, AppState>) -> Result<Vec<ModelSummary>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_models().map_err(|e| IpcError::from(&e))).await
}

/// Registers a model file (or Hugging Face folder) on this machine.
#[tauri::command]
pub async fn add_model(
    state: State<'_, AppState>,
    path: String,
) -> Result<AddModelReply, IpcError> {
    let engine = state.engine()?;
    if path.trim().is_empty() {
        return Err(IpcError {
            code: "invalid_input".into(),
            message: "path: give the path of a .gguf file or model folder".into(),
        });
    }
    let path = PathBuf::from(path.trim());
    blocking(move || {
        engine
            .add_local_model(&path)
            .map(|out| AddModelReply {
                model: out.model,
                already_present: out.already_present,
            })
            .map_err(|e| IpcError::from(&e))
    })
    .await
}
