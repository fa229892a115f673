//! Tauri commands, one module per domain, mirrored by `ui/src/ipc/<domain>.rs`.

pub mod chat;
pub mod models;

use attune_protocol::IpcError;

/// Runs blocking engine work off the main thread and the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, IpcError> + Send + 'static,
) -> Result<T, IpcError> {
    tauri::async_runtime::spawn_blocking(work)
        .await
        .map_err(|e| IpcError {
            code: "internal".into(),
            message: format!("the engine worker stopped unexpectedly: {e}"),
        })?
}
