//! Mirrors `src-tauri/src/commands/diagnostics.rs`: the text of "Copy diagnostics".

use attune_protocol::IpcError;

/// Versions, machine, CPU features, library counts and the last errors, as plain text.
pub async fn diagnostics() -> Result<String, IpcError> {
    super::invoke("diagnostics", &serde_json::json!({})).await
}
