//! Playground commands: a streamed answer from any target (base model, adapter or
//! template), its cancel, readable target labels, and saved conversations.

use super::blocking;
use crate::AppState;
use attune_protocol::{
    ChatEvent, ChatMessage, ChatTarget, Conversation, ConversationSummary, GenerationStats,
    IpcError, SamplingParams,
};
use std::sync::atomic::Ordering;
use tauri::ipc::Channel;
use tauri::State;

/// Answers `messages` with `target`, streaming events on `on_event`; resolves with the
/// final figures (`finish_reason: cancelled` after `cancel_chat`).
#[tauri::command]
pub async fn chat_target(
    state: State<'_, AppState>,
    target: ChatTarget,
    messages: Vec<ChatMessage>,
    params: Option<SamplingParams>,
    on_event: Channel<ChatEvent>,
) -> Result<GenerationStats, IpcError> {
    let engine = state.engine()?;
    let cancel = state.cancel.clone();
    cancel.store(false, Ordering::SeqCst);
    let params = params.unwrap_or_default();
    blocking(move || {
        let mut forward = |event: ChatEvent| {
            // The window is gone: stop generating for nobody.
            if on_event.send(event).is_err() {
                cancel.store(true, Ordering::SeqCst);
            }
        };
        engine
            .chat_target(&target, &messages, &params, &cancel, &mut forward)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Asks the running generation (playground or arena) to stop.
#[tauri::command]
pub async fn cancel_chat(state: State<'_, AppState>) -> Result<(), IpcError> {
    state.cancel.store(true, Ordering::SeqCst);
    Ok(())
}

/// A readable name for `target` ("SmolLM2-135M-Instruct", "pubmed-lora (LoRA on …)").
#[tauri::command]
pub async fn target_label(
    state: State<'_, AppState>,
    target: ChatTarget,
) -> Result<String, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.target_label(&target).map_err(|e| IpcError::from(&e))).await
}

/// Saves (creates or replaces) a conversation; returns it with its id.
#[tauri::command]
pub async fn save_conversation(
    state: State<'_, AppState>,
    conversation: Conversation,
) -> Result<Conversation, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .save_conversation(&conversation)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Every saved conversation, most recently updated first.
#[tauri::command]
pub async fn list_conversations(
    state: State<'_, AppState>,
) -> Result<Vec<ConversationSummary>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_conversations().map_err(|e| IpcError::from(&e))).await
}

/// One saved conversation.
#[tauri::command]
pub async fn get_conversation(
    state: State<'_, AppState>,
    id: i64,
) -> Result<Conversation, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.get_conversation(id).map_err(|e| IpcError::from(&e))).await
}

/// Removes a saved conversation.
#[tauri::command]
pub async fn remove_conversation(state: State<'_, AppState>, id: i64) -> Result<(), IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .remove_conversation(id)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}
