//! Mirrors `src-tauri/src/commands/docs.rs`: documents to data.

use super::{invoke, invoke_granted, invoke_with_channel};
use attune_protocol::{
    DatasetSummary, DocChunk, DocImportOptions, DocRow, DocsetSummary, IpcError, ReviewAction,
    Split, TeachEvent, TeachReport, TeachSpec, TeacherMode, TemplateRecord,
};
use serde_json::json;

/// Reads the folder `path` into a new document set (asks the shell to allow a typed path).
pub async fn import_docs(
    path: &str,
    options: &DocImportOptions,
) -> Result<DocsetSummary, IpcError> {
    invoke_granted(
        "import_docs",
        &json!({ "path": path, "options": options }),
        false,
    )
    .await
}

pub async fn list_docsets() -> Result<Vec<DocsetSummary>, IpcError> {
    invoke("list_docsets", &json!({})).await
}

pub async fn remove_docset(set_id: i64) -> Result<(), IpcError> {
    invoke("remove_docset", &json!({ "setId": set_id })).await
}

pub async fn docset_chunks(set_id: i64) -> Result<Vec<DocChunk>, IpcError> {
    invoke("docset_chunks", &json!({ "setId": set_id })).await
}

pub async fn docset_rows(set_id: i64) -> Result<Vec<DocRow>, IpcError> {
    invoke("docset_rows", &json!({ "setId": set_id })).await
}

/// The stored teacher template of `mode` (newest version).
pub async fn teacher_template(mode: TeacherMode) -> Result<TemplateRecord, IpcError> {
    invoke("teacher_template", &json!({ "mode": mode })).await
}

/// Teaches the set's chunks without rows; progress streams to `on_event`;
/// `cancel_chat(request_id)` stops it (rows already written stay).
pub async fn teach_docs(
    request_id: &str,
    set_id: i64,
    spec: &TeachSpec,
    on_event: impl FnMut(Result<TeachEvent, IpcError>) + 'static,
) -> Result<TeachReport, IpcError> {
    invoke_with_channel(
        "teach_docs",
        &json!({ "requestId": request_id, "setId": set_id, "spec": spec }),
        "onEvent",
        on_event,
    )
    .await
}

/// Asks the teacher again for a row's chunk; returns the new rows.
pub async fn regenerate_doc_row(
    request_id: &str,
    row_id: i64,
    spec: &TeachSpec,
) -> Result<Vec<DocRow>, IpcError> {
    invoke(
        "regenerate_doc_row",
        &json!({ "requestId": request_id, "rowId": row_id, "spec": spec }),
    )
    .await
}

pub async fn review_doc_row(row_id: i64, action: &ReviewAction) -> Result<DocRow, IpcError> {
    invoke(
        "review_doc_row",
        &json!({ "rowId": row_id, "action": action }),
    )
    .await
}

/// Accepts every pending row; returns how many.
pub async fn accept_all_doc_rows(set_id: i64) -> Result<u64, IpcError> {
    invoke("accept_all_doc_rows", &json!({ "setId": set_id })).await
}

/// The chat dataset `name` from the accepted and edited rows.
pub async fn docset_dataset(
    set_id: i64,
    name: &str,
    split: &Split,
) -> Result<DatasetSummary, IpcError> {
    invoke(
        "docset_dataset",
        &json!({ "setId": set_id, "name": name, "split": split }),
    )
    .await
}

/// The plain-text dataset `name` (continued pre-training) from the set's chunks.
pub async fn docset_pretrain_dataset(
    set_id: i64,
    name: &str,
    split: &Split,
) -> Result<DatasetSummary, IpcError> {
    invoke(
        "docset_pretrain_dataset",
        &json!({ "setId": set_id, "name": name, "split": split }),
    )
    .await
}
