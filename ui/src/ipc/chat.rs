//! Mirrors `src-tauri/src/commands/chat.rs`: streamed answers from any target
//! (base model, adapter, template), their cancel, and saved conversations.

use super::{invoke, invoke_with_channel};
use attune_protocol::{
    ChatEvent, ChatMessage, ChatTarget, Conversation, ConversationSummary, GenerationStats,
    IpcError, SamplingParams,
};
use serde_json::json;

thread_local! {
    static NEXT_REQUEST: std::cell::Cell<u64> = const { std::cell::Cell::new(1) };
}

/// A new request id for `page` ("playground-12"): the engine serves pages in turn, and
/// `cancel_chat` stops exactly this request.
pub fn new_request_id(page: &str) -> String {
    let n = NEXT_REQUEST.with(|c| {
        let n = c.get();
        c.set(n + 1);
        n
    });
    format!("{page}-{n}")
}

/// Answers `messages` with `target`, streaming; resolves with the final figures once
/// generation ends (or is cancelled through `cancel_chat(request_id)`).
pub async fn chat_target(
    request_id: &str,
    target: &ChatTarget,
    messages: &[ChatMessage],
    params: &SamplingParams,
    on_event: impl FnMut(Result<ChatEvent, IpcError>) + 'static,
) -> Result<GenerationStats, IpcError> {
    invoke_with_channel(
        "chat_target",
        &json!({ "requestId": request_id, "target": target, "messages": messages, "params": params }),
        "onEvent",
        on_event,
    )
    .await
}

/// Stops request `request_id` (waiting or generating); other requests go on.
pub async fn cancel_chat(request_id: &str) -> Result<(), IpcError> {
    invoke("cancel_chat", &json!({ "requestId": request_id })).await
}

/// A readable name for a target ("SmolLM2 · pubmed-lora (LoRA)").
pub async fn target_label(target: &ChatTarget) -> Result<String, IpcError> {
    invoke("target_label", &json!({ "target": target })).await
}

/// Saves (creates or replaces) a conversation; returns it with its id.
pub async fn save_conversation(conversation: &Conversation) -> Result<Conversation, IpcError> {
    invoke(
        "save_conversation",
        &json!({ "conversation": conversation }),
    )
    .await
}

pub async fn list_conversations() -> Result<Vec<ConversationSummary>, IpcError> {
    invoke("list_conversations", &json!({})).await
}

pub async fn get_conversation(id: i64) -> Result<Conversation, IpcError> {
    invoke("get_conversation", &json!({ "id": id })).await
}

pub async fn remove_conversation(id: i64) -> Result<(), IpcError> {
    invoke("remove_conversation", &json!({ "id": id })).await
}
