//! Mirrors `src-tauri/src/commands/prefs.rs`: preference sets (chosen/rejected pairs for DPO
//! and ORPO).

use super::invoke;
use attune_protocol::{IpcError, PreferenceSet, VoteSource};
use serde_json::json;

/// Imports the preference JSONL at `path` as the set `name`.
pub async fn import_preferences(path: &str, name: &str) -> Result<PreferenceSet, IpcError> {
    super::invoke_granted(
        "import_preferences",
        &json!({ "path": path, "name": name }),
        false,
    )
    .await
}

/// Makes a preference set from an arena's decisive votes (`votes`: whose); `name` empty: a
/// name from the arena and the pairs.
pub async fn preferences_from_arena(
    arena_id: i64,
    name: &str,
    votes: &VoteSource,
) -> Result<PreferenceSet, IpcError> {
    invoke(
        "preferences_from_arena",
        &json!({ "arenaId": arena_id, "name": name, "votes": votes }),
    )
    .await
}

/// Every preference set, newest first.
pub async fn list_preference_sets() -> Result<Vec<PreferenceSet>, IpcError> {
    invoke("list_preference_sets", &json!({})).await
}
