//! Mirrors `src-tauri/src/commands/models.rs`: the model library.

use attune_protocol::{AddModelReply, IpcError, ModelSummary};
use serde::Serialize;

/// All registered models.
pub async fn list_models() -> Result<Vec<ModelSummary>, IpcError> {
    super::invoke("list_models", &serde_json::json!({})).await
}

#[derive(Serialize)]
struct AddArgs<'a> {
    path: &'a str,
}

/// Registers a model file on this machine.
pub async fn add_model(path: &str) -> Result<AddModelReply, IpcError> {
    super::invoke("add_model", &AddArgs { path }).await
}
