//! Mirrors `src-tauri/src/commands/chat.rs`: streamed chat and its cancel.

use super::{from_js, to_js, Channel};
use attune_protocol::{ChatEvent, ChatMessage, GenerationStats, IpcError, SamplingParams};
use serde::Serialize;
use wasm_bindgen::JsValue;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ChatArgs<'a> {
    model_id: i64,
    messages: &'a [ChatMessage],
    params: &'a SamplingParams,
}

/// Generates an answer to `messages`; each streamed event goes to `on_event`.
/// Resolves with the final figures once generation ends (or is cancelled).
pub async fn chat(
    model_id: i64,
    messages: &[ChatMessage],
    params: &SamplingParams,
    mut on_event: impl FnMut(Result<ChatEvent, IpcError>) + 'static,
) -> Result<GenerationStats, IpcError> {
    let channel = Channel::new(move |message: JsValue| on_event(from_js(&message)))?;
    let args = to_js(&ChatArgs {
        model_id,
        messages,
        params,
    })?;
    js_sys::Reflect::set(&args, &JsValue::from_str("onEvent"), channel.as_js()).map_err(|_| {
        IpcError {
            code: "ipc".into(),
            message: "could not attach the event channel".into(),
        }
    })?;
    super::invoke_js("chat", args).await
}

/// Asks the running generation to stop.
pub async fn cancel_chat() -> Result<(), IpcError> {
    super::invoke("cancel_chat", &serde_json::json!({})).await
}
