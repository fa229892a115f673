//! Mirrors `src-tauri/src/commands/server.rs`: the local OpenAI-compatible server.

use super::invoke;
use attune_protocol::{IpcError, ServerSettings, ServerStatus};
use serde_json::json;

pub async fn server_status() -> Result<ServerStatus, IpcError> {
    invoke("server_status", &json!({})).await
}

pub async fn server_start(settings: &ServerSettings) -> Result<ServerStatus, IpcError> {
    invoke("server_start", &json!({ "settings": settings })).await
}

pub async fn server_stop() -> Result<ServerStatus, IpcError> {
    invoke("server_stop", &json!({})).await
}
