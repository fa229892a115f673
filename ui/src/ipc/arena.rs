//! Mirrors `src-tauri/src/commands/arena.rs`: blind A/B comparisons.

use super::{invoke, invoke_with_channel};
use attune_protocol::{
    ArenaDetail, ArenaEvent, ArenaItem, ArenaResults, ArenaSpec, ArenaSummary, IpcError,
    JudgeEvent, JudgeReport, JudgeSpec, JudgeVote, Rubric, Vote,
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

// -- The judge (issue 17) -------------------------------------------------------------

/// The judging rubric in use.
pub async fn judge_rubric() -> Result<Rubric, IpcError> {
    invoke("judge_rubric", &json!({})).await
}

/// Saves the rubric's text (a new version when it changed).
pub async fn save_judge_rubric(text: &str) -> Result<Rubric, IpcError> {
    invoke("save_judge_rubric", &json!({ "text": text })).await
}

/// A judge votes on the arena's prompts; progress streams to `on_event`;
/// `cancel_chat(request_id)` stops it.
pub async fn judge_arena(
    request_id: &str,
    spec: &JudgeSpec,
    on_event: impl FnMut(Result<JudgeEvent, IpcError>) + 'static,
) -> Result<JudgeReport, IpcError> {
    invoke_with_channel(
        "judge_arena",
        &json!({ "requestId": request_id, "spec": spec }),
        "onEvent",
        on_event,
    )
    .await
}

/// Human and judge win rates, agreement and Cohen's kappa.
pub async fn arena_results(arena_id: i64) -> Result<ArenaResults, IpcError> {
    invoke("arena_results", &json!({ "arenaId": arena_id })).await
}

/// Every judge vote with the judge's raw verdict.
pub async fn arena_judge_votes(arena_id: i64) -> Result<Vec<JudgeVote>, IpcError> {
    invoke("arena_judge_votes", &json!({ "arenaId": arena_id })).await
}
