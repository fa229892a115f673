//! Mirrors `src-tauri/src/commands/export.rs`: exports and their verification.

use super::{invoke, invoke_with_channel};
use attune_protocol::{
    ExportOptions, ExportProgress, ExportRecord, ExportRequest, ExportSubject, IpcError,
};
use serde_json::json;

/// The formats `subject` can be exported as, with size estimates.
pub async fn export_options(subject: &ExportSubject) -> Result<ExportOptions, IpcError> {
    invoke("export_options", &json!({ "subject": subject })).await
}

/// Runs an export; progress streams to `on_progress`.
pub async fn start_export(
    request: &ExportRequest,
    on_progress: impl FnMut(Result<ExportProgress, IpcError>) + 'static,
) -> Result<ExportRecord, IpcError> {
    invoke_with_channel(
        "start_export",
        &json!({ "request": request }),
        "onProgress",
        on_progress,
    )
    .await
}

/// Stops the running export (nothing is left behind).
pub async fn cancel_export() -> Result<(), IpcError> {
    invoke("cancel_export", &json!({})).await
}

/// Every export, newest first.
pub async fn list_exports() -> Result<Vec<ExportRecord>, IpcError> {
    invoke("list_exports", &json!({})).await
}

/// Opens a folder in the system's file manager.
pub async fn show_in_folder(path: &str) -> Result<(), IpcError> {
    invoke("show_in_folder", &json!({ "path": path })).await
}
