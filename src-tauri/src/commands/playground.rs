//! Commands that show what a model receives: the exact training text of a dataset row.

use super::blocking;
use crate::AppState;
use attune_protocol::{IpcError, RowSample};
use tauri::State;

/// The exact text model `model_id` trains on for `sample` (chat template applied, or
/// the text with its end-of-text token).
#[tauri::command]
pub async fn render_sample(
    state: State<'_, AppState>,
    model_id: i64,
    sample: RowSample,
) -> Result<String, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .render_sample(model_id, &sample)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}
