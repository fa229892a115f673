//! Chat commands: a streamed answer and its cancel.

use super::blocking;
use crate::AppState;
use attune_protocol::{ChatEvent, ChatMessage, GenerationStats, IpcError, SamplingParams};
use std::sync::atomic::Ordering;
use tauri::ipc::Channel;
use tauri::State;

/// Answers `messages` with model `model_id`, streaming events on `on_event`;
/// resolves with the final figures.
#[tauri::command]
pub async fn chat(
    state: State<'_, AppState>,
    model_id: i64,
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
            .chat(model_id, &messages, &params, &cancel, &mut forward)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Asks the running generation to stop; it ends with `finish_reason: cancelled`.
#[tauri::command]
pub async fn cancel_chat(state: State<'_, AppState>) -> Result<(), IpcError> {
    state.cancel.store(true, Ordering::SeqCst);
    Ok(())
}
