//! Adapter commands: list, remove, export, import and merge adapters, and evaluate a
//! model, adapter or template on a dataset (streamed progress, cancellable).

use super::{blocking, invalid};
use crate::AppState;
use attune_engine::Request;
use attune_protocol::{
    AdapterSummary, EvalOptions, EvalProgress, EvalReport, EvalSubject, IpcError, ModelSummary,
};
use std::sync::Arc;
use tauri::ipc::Channel;
use tauri::State;

/// Every adapter in the library.
#[tauri::command]
pub async fn list_adapters(state: State<'_, AppState>) -> Result<Vec<AdapterSummary>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_adapters().map_err(|e| IpcError::from(&e))).await
}

/// Removes an adapter and the folder Attune keeps for it.
#[tauri::command]
pub async fn remove_adapter(state: State<'_, AppState>, id: i64) -> Result<(), IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .remove_adapter(&id.to_string())
            .map(|_| ())
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Copies the adapter's folder into `dir` (as `<dir>/<adapter name>`); returns the
/// folder written.
#[tauri::command]
pub async fn export_adapter(
    state: State<'_, AppState>,
    id: i64,
    dir: String,
) -> Result<String, IpcError> {
    let engine = state.engine()?;
    let dir = dir.trim().to_string();
    if dir.is_empty() {
        return Err(invalid("folder: choose where to export the adapter"));
    }
    let adapter = {
        let engine = engine.clone();
        blocking(move || {
            engine
                .find_adapter(&id.to_string())
                .map_err(|e| IpcError::from(&e))
        })
        .await?
    };
    // A new folder inside one the user chose; never an existing one.
    let target = state
        .scope
        .writable(&super::user_path(&dir).join(&adapter.name))?;
    blocking(move || {
        engine
            .export_adapter(&id.to_string(), &target)
            .map(|p| p.display().to_string())
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Imports a PEFT adapter folder onto `base_model_id`, named `name` (default: the
/// folder's name).
#[tauri::command]
pub async fn import_adapter(
    state: State<'_, AppState>,
    path: String,
    base_model_id: i64,
    name: Option<String>,
) -> Result<AdapterSummary, IpcError> {
    let engine = state.engine()?;
    let path = path.trim().to_string();
    if path.is_empty() {
        return Err(invalid(
            "path: choose the adapter's folder (it holds adapter_config.json)",
        ));
    }
    let name = name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
    let path = state.scope.readable(&super::user_path(&path))?;
    blocking(move || {
        engine
            .import_adapter(&path, &base_model_id.to_string(), name.as_deref())
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Merges a LoRA adapter into its base and registers the result as a model.
#[tauri::command]
pub async fn merge_adapter(
    state: State<'_, AppState>,
    id: i64,
    name: Option<String>,
) -> Result<ModelSummary, IpcError> {
    let engine = state.engine()?;
    let name = name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
    blocking(move || {
        engine
            .merge_adapter(&id.to_string(), name.as_deref(), None)
            .map(|out| out.model)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// The request id of the app's evaluation (one at a time in the window).
const EVALUATION: &str = "evaluation";

/// Evaluates `subject` on a dataset split, streaming progress on `on_progress`; the
/// result is recorded in the library.
#[tauri::command]
pub async fn evaluate(
    state: State<'_, AppState>,
    subject: EvalSubject,
    dataset_id: i64,
    options: EvalOptions,
    on_progress: Channel<EvalProgress>,
) -> Result<EvalReport, IpcError> {
    let actor = state.actor()?;
    let requests = Arc::clone(&state.requests);
    blocking(move || {
        let (cancel, _done) = requests.begin(EVALUATION);
        let window_gone = cancel.clone();
        let on_progress = Box::new(move |p: EvalProgress| {
            // The window is gone: stop evaluating for nobody.
            if on_progress.send(p).is_err() {
                window_gone.cancel();
            }
        });
        actor
            .call(|reply| Request::Evaluate {
                subject,
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

/// Stops the running evaluation; it fails with code "cancelled" and records nothing.
#[tauri::command]
pub async fn cancel_evaluation(state: State<'_, AppState>) -> Result<(), IpcError> {
    state.requests.cancel(EVALUATION);
    Ok(())
}

/// Every recorded evaluation, newest first (without per-row scores).
#[tauri::command]
pub async fn list_evaluations(state: State<'_, AppState>) -> Result<Vec<EvalReport>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_evaluations().map_err(|e| IpcError::from(&e))).await
}
