//! Mirrors `src-tauri/src/commands/models.rs`: the model library and Hub pulls.

use super::{invoke, invoke_with_channel};
use attune_protocol::{AddModelReply, DroppedFile, HubStatus, IpcError, ModelSummary, PullUpdate};
use serde_json::json;

/// All registered models.
pub async fn list_models() -> Result<Vec<ModelSummary>, IpcError> {
    invoke("list_models", &json!({})).await
}

/// Registers a model file (or Hugging Face folder) on this machine.
pub async fn add_model(path: &str) -> Result<AddModelReply, IpcError> {
    super::invoke_granted("add_model", &json!({ "path": path }), false).await
}

/// Removes a model from the library (its files stay). Refused while runs or
/// adapters use it.
pub async fn remove_model(id: i64) -> Result<(), IpcError> {
    invoke("remove_model", &json!({ "id": id })).await
}

/// Downloads `repo` from the Hugging Face Hub and registers it; progress streams to
/// `on_progress`. `file` picks one `.gguf` of the repository.
pub async fn pull_model(
    repo: &str,
    revision: Option<&str>,
    file: Option<&str>,
    on_progress: impl FnMut(Result<PullUpdate, IpcError>) + 'static,
) -> Result<AddModelReply, IpcError> {
    invoke_with_channel(
        "pull_model",
        &json!({ "repo": repo, "revision": revision, "file": file }),
        "onProgress",
        on_progress,
    )
    .await
}

/// Stops the running pull; it fails with code "cancelled" and registers nothing.
pub async fn cancel_pull() -> Result<(), IpcError> {
    invoke("cancel_pull", &json!({})).await
}

/// Whether the Hugging Face Hub can be reached from this machine (takes a few seconds
/// at most).
pub async fn hub_status() -> Result<HubStatus, IpcError> {
    invoke("hub_status", &json!({})).await
}

/// What a path (dropped or picked) is: a model, a dataset, an adapter, or unusable.
pub async fn classify_path(path: &str) -> Result<DroppedFile, IpcError> {
    super::invoke_granted("classify_path", &json!({ "path": path }), false).await
}

/// Asks the user, in the shell's own dialog, whether Attune may read (`write`: create)
/// `path`; true when they allowed it.
pub async fn confirm_path(path: &str, write: bool) -> Result<bool, IpcError> {
    invoke("confirm_path", &json!({ "path": path, "write": write })).await
}

/// Opens the system's file (or folder) chooser; None when the user closes it.
/// `extensions` filters files (e.g. ["gguf"]); empty shows every file.
pub async fn pick_path(
    title: &str,
    folder: bool,
    extensions: &[&str],
) -> Result<Option<String>, IpcError> {
    invoke(
        "pick_path",
        &json!({ "title": title, "folder": folder, "extensions": extensions }),
    )
    .await
}
