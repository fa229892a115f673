//! Run commands: check, start and steer fine-tuning runs through the engine actor
//! (one run at a time, FIFO); progress reaches the window as `run-event`s.

use super::{blocking, invalid};
use crate::AppState;
use attune_protocol::ErrorCode;
use attune_protocol::{
    BundleEngine, BundleReply, IpcError, RunCheck, RunDetail, RunSpec, RunSummary,
};
use tauri::State;

/// Memory, steps, time and "will it fit" for `spec`, before it starts.
#[tauri::command]
pub async fn check_run(state: State<'_, AppState>, spec: RunSpec) -> Result<RunCheck, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.check_run(&spec).map_err(|e| IpcError::from(&e))).await
}

/// Creates the run and starts it in the background (queued behind a run already
/// training). Refused, with the figures and what to change, when it will not fit.
#[tauri::command]
pub async fn start_run(state: State<'_, AppState>, spec: RunSpec) -> Result<RunSummary, IpcError> {
    let actor = state.actor()?;
    let engine = state.engine()?;
    blocking(move || {
        match actor
            .start_run(spec.clone(), None)
            .map_err(|e| IpcError::from(&e))
        {
            Ok(run) => Ok(run),
            Err(e) if e.code == ErrorCode::WontFit => {
                // Say it in the app's words, with what to change.
                match engine.check_run(&spec) {
                    Ok(check) => Err(IpcError {
                        code: e.code,
                        message: check.suggestion.unwrap_or(e.message),
                    }),
                    Err(_) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    })
    .await
}

/// All runs, oldest first.
#[tauri::command]
pub async fn list_runs(state: State<'_, AppState>) -> Result<Vec<RunSummary>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_runs().map_err(|e| IpcError::from(&e))).await
}

/// A run with its settings, every metric and its adapter.
#[tauri::command]
pub async fn run_detail(state: State<'_, AppState>, id: i64) -> Result<RunDetail, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .run_detail(&id.to_string())
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Checkpoints and stops an executing run after its current step, or takes a queued
/// run out of the queue; it becomes paused.
#[tauri::command]
pub async fn pause_run(state: State<'_, AppState>, id: i64) -> Result<(), IpcError> {
    let actor = state.actor()?;
    blocking(move || actor.pause_run(id).map_err(|e| IpcError::from(&e))).await
}

/// Continues a paused, failed or interrupted run from its last checkpoint (queued
/// behind a run already training).
#[tauri::command]
pub async fn resume_run(state: State<'_, AppState>, id: i64) -> Result<RunSummary, IpcError> {
    let actor = state.actor()?;
    blocking(move || actor.resume_run(id, None).map_err(|e| IpcError::from(&e))).await
}

/// Stops a run for good (executing or not); its checkpoints are removed.
#[tauri::command]
pub async fn cancel_run(state: State<'_, AppState>, id: i64) -> Result<(), IpcError> {
    let actor = state.actor()?;
    blocking(move || actor.cancel_run(id).map_err(|e| IpcError::from(&e))).await
}

/// Removes a run that is not executing or queued, and its metrics (its adapter stays).
#[tauri::command]
pub async fn remove_run(state: State<'_, AppState>, id: i64) -> Result<(), IpcError> {
    let actor = state.actor()?;
    blocking(move || actor.remove_run(id).map_err(|e| IpcError::from(&e))).await
}

/// Writes the run as a bundle for a GPU machine (TRL + accelerate, or Axolotl) into a new
/// folder `<dir>/<run name>-<engine>-bundle` inside the folder the user chose (`scope.rs`:
/// never an existing folder, never outside a granted one).
#[tauri::command]
pub async fn export_run_bundle(
    state: State<'_, AppState>,
    id: i64,
    engine: BundleEngine,
    dir: String,
) -> Result<BundleReply, IpcError> {
    let eng = state.engine()?;
    if dir.trim().is_empty() {
        return Err(invalid("folder: choose where to write the bundle"));
    }
    let run = {
        let eng = eng.clone();
        blocking(move || {
            eng.find_run(&id.to_string())
                .map_err(|e| IpcError::from(&e))
        })
        .await?
    };
    let target = state.scope.writable(&super::user_path(&dir).join(format!(
        "{}-{}-bundle",
        run.name,
        engine.as_str()
    )))?;
    blocking(move || {
        eng.export_bundle(&id.to_string(), engine, &target)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}
