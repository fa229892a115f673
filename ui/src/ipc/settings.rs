//! Mirrors `src-tauri/src/commands/settings.rs`: preferences kept in the library.

use attune_protocol::IpcError;
use std::collections::BTreeMap;

/// Every stored setting.
pub async fn get_settings() -> Result<BTreeMap<String, String>, IpcError> {
    super::invoke("get_settings", &serde_json::json!({})).await
}

/// Stores one setting.
pub async fn set_setting(key: &str, value: &str) -> Result<(), IpcError> {
    super::invoke(
        "set_setting",
        &serde_json::json!({ "key": key, "value": value }),
    )
    .await
}
