//! Documents to data: read a folder the user granted into a document set, have a teacher
//! write rows per chunk (streamed progress, cancelled by the window's request id), review
//! the rows beside their passages, and make the chat and continued-pretraining datasets.

use super::{blocking, invalid};
use crate::AppState;
use attune_engine::docs;
use attune_protocol::{
    DatasetSummary, DocChunk, DocImportOptions, DocRow, DocsetSummary, IpcError, ReviewAction,
    Split, TeachEvent, TeachReport, TeachSpec, TeacherMode, TemplateRecord,
};
use std::sync::Arc;
use tauri::ipc::Channel;
use tauri::State;

/// Reads the documents of the folder `path` (which the user granted) into a new document
/// set; unreadable files are listed in `skipped` with the reason.
#[tauri::command]
pub async fn import_docs(
    state: State<'_, AppState>,
    path: String,
    options: DocImportOptions,
) -> Result<DocsetSummary, IpcError> {
    let engine = state.engine()?;
    if path.trim().is_empty() {
        return Err(invalid("folder: choose the folder of documents"));
    }
    // A granted folder grants its contents; links inside it are not followed.
    let dir = state.scope.readable(&super::user_path(&path))?;
    blocking(move || {
        engine
            .import_docs(&dir, &options)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Every document set, oldest first.
#[tauri::command]
pub async fn list_docsets(state: State<'_, AppState>) -> Result<Vec<DocsetSummary>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_docsets().map_err(|e| IpcError::from(&e))).await
}

/// Removes a document set with its chunks and rows (datasets made from it stay).
#[tauri::command]
pub async fn remove_docset(state: State<'_, AppState>, set_id: i64) -> Result<(), IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.remove_docset(set_id).map_err(|e| IpcError::from(&e))).await
}

/// A set's chunks, by document then position.
#[tauri::command]
pub async fn docset_chunks(
    state: State<'_, AppState>,
    set_id: i64,
) -> Result<Vec<DocChunk>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.docset_chunks(set_id).map_err(|e| IpcError::from(&e))).await
}

/// A set's generated rows with their passages.
#[tauri::command]
pub async fn docset_rows(state: State<'_, AppState>, set_id: i64) -> Result<Vec<DocRow>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.docset_rows(set_id).map_err(|e| IpcError::from(&e))).await
}

/// The stored teacher template of `mode` (its newest version; the default one is saved on
/// first use).
#[tauri::command]
pub async fn teacher_template(
    state: State<'_, AppState>,
    mode: TeacherMode,
) -> Result<TemplateRecord, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .teacher_template(mode, None)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Teaches the set's chunks that have no rows yet as `spec` says, one generation per chunk
/// through the actor; progress streams on `on_event` after each chunk (whose rows are then
/// stored). `cancel_chat(request_id)` stops it: the chunk being answered leaves nothing, the
/// rows already written stay, and the command answers `cancelled`.
#[tauri::command]
pub async fn teach_docs(
    state: State<'_, AppState>,
    request_id: String,
    set_id: i64,
    spec: TeachSpec,
    on_event: Channel<TeachEvent>,
) -> Result<TeachReport, IpcError> {
    let actor = state.actor()?;
    let requests = Arc::clone(&state.requests);
    blocking(move || {
        let (cancel, _done) = requests.begin(&request_id);
        let plan = actor
            .engine()
            .teach_plan(&spec)
            .map_err(|e| IpcError::from(&e))?;
        let window_gone = cancel.clone();
        let mut on_chunk = move |done: u64, total: u64| {
            let event = if done == 0 {
                TeachEvent::Started { total }
            } else {
                TeachEvent::Chunk { done, total }
            };
            // The window is gone: stop teaching for nobody.
            if on_event.send(event).is_err() {
                window_gone.cancel();
            }
        };
        docs::teach(&actor, set_id, &plan, &cancel, &mut on_chunk).map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Asks the teacher again for row `row_id`'s chunk: the row is rejected and the new rows
/// are held for review. `cancel_chat(request_id)` stops it (nothing changes).
#[tauri::command]
pub async fn regenerate_doc_row(
    state: State<'_, AppState>,
    request_id: String,
    row_id: i64,
    spec: TeachSpec,
) -> Result<Vec<DocRow>, IpcError> {
    let actor = state.actor()?;
    let requests = Arc::clone(&state.requests);
    blocking(move || {
        let (cancel, _done) = requests.begin(&request_id);
        let plan = actor
            .engine()
            .teach_plan(&spec)
            .map_err(|e| IpcError::from(&e))?;
        docs::regenerate(&actor, row_id, &plan, &cancel).map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Accepts, rejects or edits one row.
#[tauri::command]
pub async fn review_doc_row(
    state: State<'_, AppState>,
    row_id: i64,
    action: ReviewAction,
) -> Result<DocRow, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .review_doc_row(row_id, &action)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Accepts every pending row of a set; returns how many.
#[tauri::command]
pub async fn accept_all_doc_rows(state: State<'_, AppState>, set_id: i64) -> Result<u64, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .accept_all_doc_rows(set_id)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Makes the chat dataset `name` from the set's accepted and edited rows.
#[tauri::command]
pub async fn docset_dataset(
    state: State<'_, AppState>,
    set_id: i64,
    name: String,
    split: Split,
) -> Result<DatasetSummary, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .docset_dataset(set_id, name.trim(), split)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Makes the plain-text dataset `name` (continued pre-training) from the set's chunks.
#[tauri::command]
pub async fn docset_pretrain_dataset(
    state: State<'_, AppState>,
    set_id: i64,
    name: String,
    split: Split,
) -> Result<DatasetSummary, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .docset_pretrain_dataset(set_id, name.trim(), split)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}
