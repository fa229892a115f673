//! Settings commands: the app's preferences kept in the library.

use super::blocking;
use crate::AppState;
use attune_protocol::IpcError;
use std::collections::BTreeMap;
use tauri::State;

/// Every stored setting.
#[tauri::command]
pub async fn get_settings(
    state: State<'_, AppState>,
) -> Result<BTreeMap<String, String>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.settings().map_err(|e| IpcError::from(&e))).await
}

/// Stores one setting (key 1 to 64 characters, value at most 64 KiB).
#[tauri::command]
pub async fn set_setting(
    state: State<'_, AppState>,
    key: String,
    value: String,
) -> Result<(), IpcError> {
    let engine = state.engine()?;
    if key == crate::logs::LEVEL_SETTING {
        crate::logs::set_level(&value).map_err(super::invalid)?;
    }
    blocking(move || {
        engine
            .set_setting(&key, &value)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}
