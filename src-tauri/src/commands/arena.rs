//! Arena commands: create blind A/B comparisons, generate and vote on prompts, read
//! the results and export preference pairs.

use super::{blocking, invalid};
use crate::AppState;
use attune_engine::Request;
use attune_protocol::{
    ArenaDetail, ArenaEvent, ArenaItem, ArenaResults, ArenaSpec, ArenaSummary, IpcError,
    JudgeEvent, JudgeReport, JudgeSpec, JudgeVote, Rubric, Vote,
};
use std::sync::Arc;
use tauri::ipc::Channel;
use tauri::State;

/// Creates an arena from `spec`.
#[tauri::command]
pub async fn create_arena(
    state: State<'_, AppState>,
    spec: ArenaSpec,
) -> Result<ArenaSummary, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.create_arena(&spec).map_err(|e| IpcError::from(&e))).await
}

/// Every arena, newest first.
#[tauri::command]
pub async fn list_arenas(state: State<'_, AppState>) -> Result<Vec<ArenaSummary>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_arenas().map_err(|e| IpcError::from(&e))).await
}

/// Prompt `index` with both answers, generating and storing them on first view; text
/// streams on `on_event`. `cancel_chat(request_id)` stops it (nothing is stored, error
/// "cancelled").
#[tauri::command]
pub async fn arena_item(
    state: State<'_, AppState>,
    request_id: String,
    arena_id: i64,
    index: u64,
    on_event: Channel<ArenaEvent>,
) -> Result<ArenaItem, IpcError> {
    let actor = state.actor()?;
    let requests = Arc::clone(&state.requests);
    blocking(move || {
        let (cancel, _done) = requests.begin(&request_id);
        let window_gone = cancel.clone();
        let on_event = Box::new(move |event: ArenaEvent| {
            // The window is gone: stop generating for nobody.
            if on_event.send(event).is_err() {
                window_gone.cancel();
            }
        });
        actor
            .call(|reply| Request::ArenaItem {
                arena_id,
                index,
                cancel,
                on_event,
                reply,
            })
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Records (or changes) the vote on prompt `index`; returns the new tally.
#[tauri::command]
pub async fn arena_vote(
    state: State<'_, AppState>,
    arena_id: i64,
    index: u64,
    vote: Vote,
) -> Result<ArenaSummary, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .arena_vote(arena_id, index, vote)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// The arena with every prompt's outcome, sides revealed.
#[tauri::command]
pub async fn arena_detail(
    state: State<'_, AppState>,
    arena_id: i64,
) -> Result<ArenaDetail, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .arena_detail(arena_id)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Writes the decisive votes as preference pairs (JSONL) to `path`; returns how many.
#[tauri::command]
pub async fn export_preferences(
    state: State<'_, AppState>,
    arena_id: i64,
    path: String,
) -> Result<u64, IpcError> {
    let engine = state.engine()?;
    let path = path.trim();
    if path.is_empty() {
        return Err(invalid("path: choose where to save the preference pairs"));
    }
    // A new file in a folder the user chose; never an existing file.
    let path = state.scope.writable(&super::user_path(path))?;
    blocking(move || {
        engine
            .export_preferences(arena_id, &path)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Removes an arena with its answers and votes.
#[tauri::command]
pub async fn remove_arena(state: State<'_, AppState>, arena_id: i64) -> Result<(), IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .remove_arena(arena_id)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

// -- The judge (issue 17) -------------------------------------------------------------

/// The judging rubric in use (the default one is saved as version 1 on first use).
#[tauri::command]
pub async fn judge_rubric(state: State<'_, AppState>) -> Result<Rubric, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.judge_rubric().map_err(|e| IpcError::from(&e))).await
}

/// Saves the rubric's text (a new version when it changed).
#[tauri::command]
pub async fn save_judge_rubric(
    state: State<'_, AppState>,
    text: String,
) -> Result<Rubric, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .save_judge_rubric(&text)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// A judge votes on the arena's prompts as `spec` says; progress streams on
/// `on_event`; `cancel_chat(request_id)` stops it (votes made so far are kept).
#[tauri::command]
pub async fn judge_arena(
    state: State<'_, AppState>,
    request_id: String,
    spec: JudgeSpec,
    on_event: Channel<JudgeEvent>,
) -> Result<JudgeReport, IpcError> {
    let actor = state.actor()?;
    let requests = Arc::clone(&state.requests);
    blocking(move || {
        let (cancel, _done) = requests.begin(&request_id);
        let window_gone = cancel.clone();
        let on_event = Box::new(move |event: JudgeEvent| {
            if on_event.send(event).is_err() {
                window_gone.cancel();
            }
        });
        actor
            .judge_arena(spec, &cancel, on_event)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// The arena's results: human and judge win rates, agreement and Cohen's kappa.
#[tauri::command]
pub async fn arena_results(
    state: State<'_, AppState>,
    arena_id: i64,
) -> Result<ArenaResults, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .arena_results(arena_id)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Every judge vote of the arena with the judge's raw verdict.
#[tauri::command]
pub async fn arena_judge_votes(
    state: State<'_, AppState>,
    arena_id: i64,
) -> Result<Vec<JudgeVote>, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .arena_judge_votes(arena_id)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}
