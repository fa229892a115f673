//! Tauri commands, one module per domain, mirrored by `ui/src/ipc/<domain>.rs`.

pub mod adapters;
pub mod advisor;
pub mod arena;
pub mod chat;
pub mod datasets;
pub mod models;
pub mod playground;
pub mod runs;
pub mod settings;
pub mod templates;

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

/// An `invalid_input` error with `message` (which names the field at fault).
pub(crate) fn invalid(message: impl Into<String>) -> IpcError {
    IpcError {
        code: "invalid_input".into(),
        message: message.into(),
    }
}
