//! Playground commands: a streamed answer from any target (base model, adapter or
//! template), its cancel, readable target labels, and saved conversations.

use super::blocking;
use crate::AppState;
use attune_engine::{CancelToken, Generation, Prompt, Sink};
use attune_protocol::{
    ChatEvent, ChatMessage, ChatTarget, Conversation, ConversationSummary, GenerationStats,
    IpcError, SamplingParams,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tauri::ipc::Channel;
use tauri::State;

/// Answers `messages` with `target`, streaming events on `on_event`; resolves with the
/// final figures (`finish_reason: cancelled` after `cancel_chat(request_id)`).
/// `request_id` is the window's name for this request ("playground-7"); the part
/// before the first '-' names the page, whose requests are served in turn with the
/// other pages'.
#[tauri::command]
pub async fn chat_target(
    state: State<'_, AppState>,
    request_id: String,
    target: ChatTarget,
    messages: Vec<ChatMessage>,
    params: Option<SamplingParams>,
    on_event: Channel<ChatEvent>,
) -> Result<GenerationStats, IpcError> {
    let actor = state.actor()?;
    let requests = Arc::clone(&state.requests);
    let generation = Generation {
        client: client_of(&request_id),
        target,
        prompt: Prompt::Chat(messages),
        params: params.unwrap_or_default(),
    };
    blocking(move || {
        let (cancel, _done) = requests.begin(&request_id);
        let sink = window_sink(on_event, cancel.clone());
        actor
            .generate(generation, &cancel, sink)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// The page a request comes from: its id up to the first '-'.
pub(crate) fn client_of(request_id: &str) -> String {
    let page = request_id.split('-').next().unwrap_or_default();
    format!("app:{page}")
}

/// Forwards a generation's events to the window in batches (see [`TOKEN_BATCH`]); if
/// the window is gone, the request is cancelled.
fn window_sink(channel: Channel<ChatEvent>, cancel: CancelToken) -> Sink<ChatEvent> {
    let mut batch = TokenBatch::new(TOKEN_BATCH);
    Box::new(move |event: ChatEvent| {
        // Done (or any other event) flushes the gathered text first, so order is kept.
        batch.push(event, &mut |event| {
            if channel.send(event).is_err() {
                cancel.cancel();
            }
        });
    })
}

/// How long tokens are gathered before they go to the window: one message per token
/// (80-100 a second) makes the webview re-lay out the answer that often, which on a
/// software-rendered display costs more CPU than the model itself.
const TOKEN_BATCH: Duration = Duration::from_millis(50);

/// Gathers streamed token text and sends it at most every `every`; any other event
/// first flushes what is gathered, so order is kept.
struct TokenBatch {
    every: Duration,
    text: String,
    since: Instant,
}

impl TokenBatch {
    fn new(every: Duration) -> Self {
        TokenBatch {
            every,
            text: String::new(),
            since: Instant::now(),
        }
    }

    fn push(&mut self, event: ChatEvent, send: &mut impl FnMut(ChatEvent)) {
        match event {
            ChatEvent::Token { text } => {
                if self.text.is_empty() {
                    self.since = Instant::now();
                }
                self.text.push_str(&text);
                if self.since.elapsed() >= self.every {
                    self.flush(send);
                }
            }
            other => {
                self.flush(send);
                send(other);
            }
        }
    }

    fn flush(&mut self, send: &mut impl FnMut(ChatEvent)) {
        if !self.text.is_empty() {
            send(ChatEvent::Token {
                text: std::mem::take(&mut self.text),
            });
        }
    }
}

/// Stops request `request_id` (an answer or an arena item), waiting or generating;
/// other requests go on. Stopping a request that already ended does nothing.
#[tauri::command]
pub async fn cancel_chat(state: State<'_, AppState>, request_id: String) -> Result<(), IpcError> {
    state.requests.cancel(&request_id);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn token(t: &str) -> ChatEvent {
        ChatEvent::Token { text: t.into() }
    }

    #[test]
    fn tokens_are_gathered_and_order_is_kept() {
        let mut out = Vec::new();
        let mut batch = TokenBatch::new(Duration::from_secs(3600));
        let mut send = |e: ChatEvent| out.push(e);
        batch.push(ChatEvent::Loading, &mut send);
        batch.push(token("Hel"), &mut send);
        batch.push(token("lo"), &mut send);
        batch.push(token("!"), &mut send);
        batch.flush(&mut send);
        batch.flush(&mut send);
        assert_eq!(out, vec![ChatEvent::Loading, token("Hello!")]);
    }

    #[test]
    fn with_no_delay_every_token_goes_at_once() {
        let mut out = Vec::new();
        let mut batch = TokenBatch::new(Duration::ZERO);
        let mut send = |e: ChatEvent| out.push(e);
        batch.push(token("a"), &mut send);
        batch.push(token("b"), &mut send);
        assert_eq!(out, vec![token("a"), token("b")]);
    }
}
