//! Preference-set commands: import a preference JSONL, make a set from an arena's votes,
//! list the sets.

use super::{blocking, invalid};
use crate::AppState;
use attune_protocol::{IpcError, PreferenceSet, VoteSource};
use tauri::State;

/// Imports the preference JSONL at `path` (one `{prompt, chosen, rejected}` object a line,
/// TRL's plain or chat format) as the set `name`; any bad line refuses the file.
#[tauri::command]
pub async fn import_preferences(
    state: State<'_, AppState>,
    path: String,
    name: String,
) -> Result<PreferenceSet, IpcError> {
    let engine = state.engine()?;
    if path.trim().is_empty() {
        return Err(invalid("path: give the path of a preference JSONL file"));
    }
    if name.trim().is_empty() {
        return Err(invalid("name: give the preference set a name"));
    }
    let path = state.scope.readable(&super::user_path(&path))?;
    blocking(move || {
        engine
            .import_preferences(&path, &name)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Makes a preference set from the decisive votes of arena `arena_id` (`votes`: the human's,
/// one judge's, or combined); ties, "both bad", unvoted and unparseable prompts are left out
/// and counted in the answer. `name` empty or absent: a name from the arena and the pairs.
#[tauri::command]
pub async fn preferences_from_arena(
    state: State<'_, AppState>,
    arena_id: i64,
    name: Option<String>,
    votes: VoteSource,
) -> Result<PreferenceSet, IpcError> {
    let engine = state.engine()?;
    let name = name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
    blocking(move || {
        engine
            .preferences_from_arena(arena_id, name.as_deref(), &votes)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Every preference set, newest first.
#[tauri::command]
pub async fn list_preference_sets(
    state: State<'_, AppState>,
) -> Result<Vec<PreferenceSet>, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .list_preference_sets()
            .map_err(|e| IpcError::from(&e))
    })
    .await
}
