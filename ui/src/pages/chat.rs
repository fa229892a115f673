//! The chat pane: pick a model, type, send; the answer streams in token by
//! token, Stop cancels it, and the timings show when it ends.

use crate::{format, ipc, ModelsState};
use attune_protocol::{ChatEvent, ChatMessage, GenerationStats, SamplingParams};
use leptos::prelude::*;
use leptos::task::spawn_local;
use std::cell::Cell;
use std::rc::Rc;

/// The chat page.
#[component]
pub fn ChatPage(models: ModelsState) -> impl IntoView {
    let selected: RwSignal<Option<i64>> = RwSignal::new(None);
    let messages: RwSignal<Vec<ChatMessage>> = RwSignal::new(Vec::new());
    let input = RwSignal::new(String::new());
    let busy = RwSignal::new(false);
    let loading_model = RwSignal::new(false);
    let stats: RwSignal<Option<GenerationStats>> = RwSignal::new(None);
    let error: RwSignal<Option<String>> = RwSignal::new(None);

    // Pick the first model once the library has loaded.
    Effect::new(move |_| {
        if selected.get_untracked().is_none() {
            if let Some(Ok(list)) = models.get() {
                if let Some(first) = list.first() {
                    selected.set(Some(first.id));
                }
            }
        }
    });

    // Keep the newest text in view while it streams.
    let transcript = NodeRef::<leptos::html::Div>::new();
    Effect::new(move |_| {
        messages.track();
        if let Some(el) = transcript.get() {
            el.set_scroll_top(el.scroll_height());
        }
    });

    let send = move || {
        if busy.get_untracked() {
            return;
        }
        let text = input.get_untracked().trim().to_string();
        if text.is_empty() {
            return;
        }
        let Some(model_id) = selected.get_untracked() else {
            error.set(Some(
                "Pick a model first (add one on the Models page).".into(),
            ));
            return;
        };
        messages.update(|m| {
            m.push(ChatMessage {
                role: "user".into(),
                content: text,
            })
        });
        let history = messages.get_untracked();
        messages.update(|m| {
            m.push(ChatMessage {
                role: "assistant".into(),
                content: String::new(),
            })
        });
        input.set(String::new());
        busy.set(true);
        stats.set(None);
        error.set(None);

        // Events that arrive after the command resolved must not touch the
        // finished answer.
        let finished = Rc::new(Cell::new(false));
        let finished_in_events = finished.clone();
        spawn_local(async move {
            let on_event = move |event: Result<ChatEvent, attune_protocol::IpcError>| {
                if finished_in_events.get() {
                    return;
                }
                match event {
                    Ok(ChatEvent::Loading) => loading_model.set(true),
                    Ok(ChatEvent::Token { text }) => {
                        loading_model.set(false);
                        messages.update(|m| {
                            if let Some(last) = m.last_mut() {
                                last.content.push_str(&text);
                            }
                        });
                    }
                    Ok(ChatEvent::Done { .. }) => {}
                    Err(e) => error.set(Some(e.message)),
                }
            };
            let result =
                ipc::chat::chat(model_id, &history, &SamplingParams::default(), on_event).await;
            finished.set(true);
            loading_model.set(false);
            match result {
                Ok(s) => {
                    if !s.text.is_empty() {
                        let full = s.text.clone();
                        messages.update(|m| {
                            if let Some(last) = m.last_mut() {
                                last.content = full;
                            }
                        });
                    }
                    stats.set(Some(s));
                }
                Err(e) => {
                    // Drop the empty answer bubble of a failed request.
                    messages.update(|m| {
                        if m.last().is_some_and(|last| last.content.is_empty()) {
                            m.pop();
                        }
                    });
                    error.set(Some(e.message));
                }
            }
            busy.set(false);
        });
    };

    let stop = move || {
        spawn_local(async move {
            if let Err(e) = ipc::chat::cancel_chat().await {
                error.set(Some(e.message));
            }
        });
    };

    let model_options = move || match models.get() {
        Some(Ok(list)) => list
            .into_iter()
            .map(|m| {
                let id = m.id;
                let label = format!(
                    "{} · {} · {}",
                    m.name,
                    m.quantization,
                    format::parameters(m.parameters)
                );
                view! {
                    <option value=id.to_string() selected=move || selected.get() == Some(id)>
                        {label}
                    </option>
                }
            })
            .collect_view()
            .into_any(),
        _ => view! { <option value="">"No models"</option> }.into_any(),
    };

    view! {
        <section class="page chat-page" id="chat-page">
            <div class="chat-toolbar">
                <label for="model-select">"Model"</label>
                <select
                    id="model-select"
                    on:change=move |ev| selected.set(event_target_value(&ev).parse().ok())
                >
                    {model_options}
                </select>
                <button
                    class="secondary"
                    id="chat-clear"
                    disabled=move || busy.get()
                    on:click=move |_| {
                        messages.set(Vec::new());
                        stats.set(None);
                        error.set(None);
                    }
                >
                    "New chat"
                </button>
            </div>
            <div
                class="transcript"
                id="chat-transcript"
                data-testid="chat-transcript"
                node_ref=transcript
            >
                {move || {
                    let list = messages.get();
                    if list.is_empty() {
                        view! {
                            <p class="empty" id="chat-empty">
                                "Ask the model something. Enter sends, Shift+Enter adds a line."
                            </p>
                        }
                            .into_any()
                    } else {
                        let last = list.len() - 1;
                        list.into_iter()
                            .enumerate()
                            .map(|(i, m)| {
                                let is_user = m.role == "user";
                                let pending = !is_user && i == last && busy.get() && m.content.is_empty();
                                let text = if pending {
                                    if loading_model.get() { "Loading model…".to_string() } else { "…".to_string() }
                                } else {
                                    m.content
                                };
                                view! {
                                    <div
                                        class="message"
                                        class:user=is_user
                                        class:assistant=!is_user
                                        class:pending=pending
                                        data-testid=if is_user { "user-message" } else { "assistant-message" }
                                    >
                                        <div class="role">{if is_user { "You" } else { "Model" }}</div>
                                        <div class="bubble">{text}</div>
                                    </div>
                                }
                            })
                            .collect_view()
                            .into_any()
                    }
                }}
            </div>
            {move || error.get().map(|e| view! { <p class="banner error" id="chat-error">{e}</p> })}
            {move || {
                stats
                    .get()
                    .map(|s| view! { <p class="stats" id="chat-stats" data-testid="chat-stats">{format::stats(&s)}</p> })
            }}
            <form
                class="composer"
                on:submit=move |ev| {
                    ev.prevent_default();
                    send();
                }
            >
                <textarea
                    id="chat-input"
                    rows="3"
                    placeholder="Type a message…"
                    prop:value=move || input.get()
                    on:input=move |ev| input.set(event_target_value(&ev))
                    on:keydown=move |ev: leptos::ev::KeyboardEvent| {
                        if ev.key() == "Enter" && !ev.shift_key() {
                            ev.prevent_default();
                            send();
                        }
                    }
                ></textarea>
                <div class="composer-actions">
                    <button
                        type="submit"
                        id="chat-send"
                        disabled=move || busy.get() || selected.get().is_none()
                    >
                        "Send"
                    </button>
                    <button
                        type="button"
                        class="danger"
                        id="chat-stop"
                        disabled=move || !busy.get()
                        on:click=move |_| stop()
                    >
                        "Stop"
                    </button>
                </div>
            </form>
        </section>
    }
}
