//! Mirrors `src-tauri/src/commands/chat.rs`: streamed answers from any target
//! (base model, adapter, template), their cancel, and saved conversations.

use super::{invoke, invoke_with_channel};
use attune_protocol::{
    ChatEvent, ChatMessage, ChatTarget, Conversation, ConversationSummary, GenerationStats,
    IpcError, SamplingParams,
};
use serde_json::json;

/// Answers `messages` with a base model; each streamed event goes to `on_event`.
pub async fn chat(
    model_id: i64,
    messages: &[ChatMessage],
    params: &SamplingParams,
    on_event: impl FnMut(Result<ChatEvent, IpcError>) + 'static,
) -> Result<GenerationStats, IpcError> {
    chat_target(&ChatTarget::Base { model_id }, messages, params, on_event).await
}

/// Answers `messages` with `target`, streaming; resolves with the final figures once
/// generation ends (or is cancelled).
pub async fn chat_target(
    target: &ChatTarget,
    messages: &[ChatMessage],
    params: &SamplingParams,
    on_event: impl FnMut(Result<ChatEvent, IpcError>) + 'static,
) -> Result<GenerationStats, IpcError> {
    invoke_with_channel(
        "chat_target",
        &json!({ "target": target, "messages": messages, "params": params }),
        "onEvent",
        on_event,
    )
    .await
}

/// Asks every running generation to stop.
pub async fn cancel_chat() -> Result<(), IpcError> {
    invoke("cancel_chat", &json!({})).await
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
