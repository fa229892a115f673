//! Mirrors `src-tauri/src/commands/arena.rs`: blind A/B comparisons.

use super::{invoke, invoke_with_channel};
use attune_protocol::{
    ArenaDetail, ArenaEvent, ArenaItem, ArenaSpec, ArenaSummary, IpcError, Vote,
};
use serde_json::json;

pub async fn create_arena(spec: &ArenaSpec) -> Result<ArenaSummary, IpcError> {
    invoke("create_arena", &json!({ "spec": spec })).await
}

pub async fn list_arenas() -> Result<Vec<ArenaSummary>, IpcError> {
    invoke("list_arenas", &json!({})).await
}

/// Prompt `index` with both answers, generating (and storing) them on first view;
/// answer text streams to `on_event`.
pub async fn arena_item(
    request_id: &str,
    arena_id: i64,
    index: u64,
    on_event: impl FnMut(Result<ArenaEvent, IpcError>) + 'static,
) -> Result<ArenaItem, IpcError> {
    invoke_with_channel(
        "arena_item",
        &json!({ "requestId": request_id, "arenaId": arena_id, "index": index }),
        "onEvent",
        on_event,
    )
    .await
}

/// Records (or changes) the vote on prompt `index`; returns the new tally.
pub async fn arena_vote(arena_id: i64, index: u64, vote: Vote) -> Result<ArenaSummary, IpcError> {
    invoke(
        "arena_vote",
        &json!({ "arenaId": arena_id, "index": index, "vote": vote }),
    )
    .await
}

/// The arena with every prompt's outcome, sides revealed.
pub async fn arena_detail(arena_id: i64) -> Result<ArenaDetail, IpcError> {
    invoke("arena_detail", &json!({ "arenaId": arena_id })).await
}

/// Writes the decisive votes as preference pairs (JSONL: prompt, chosen, rejected)
/// to `path`; returns how many pairs.
pub async fn export_preferences(arena_id: i64, path: &str) -> Result<u64, IpcError> {
    super::invoke_granted(
        "export_preferences",
        &json!({ "arenaId": arena_id, "path": path }),
        true,
    )
    .await
}

pub async fn remove_arena(arena_id: i64) -> Result<(), IpcError> {
    invoke("remove_arena", &json!({ "arenaId": arena_id })).await
}
