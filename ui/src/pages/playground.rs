//! The playground: one to four panes side by side (a base model, an adapter, a
//! template on a model...) all answering the same message. Each pane keeps its own
//! transcript, which is what it sends; panes answer one after another, tokens
//! streaming into the pane's current bubble, and Stop ends the current pane and skips
//! the rest. Sampling controls apply to every pane; conversations are saved in the
//! library and can be reopened.

use crate::components::{error_note, ConfirmButton, ErrorSlot, Field};
use crate::pages::targets::{TargetCatalog, TargetSelect};
use crate::{format, ipc, markdown, AppCtx};
use attune_protocol::ErrorCode;
use attune_protocol::{
    ChatEvent, ChatMessage, ChatTarget, Conversation, ConversationPane, ConversationSummary,
    GenerationStats, IpcError, SamplingParams,
};
use leptos::prelude::*;
use leptos::task::spawn_local;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::rc::Rc;

/// Most panes side by side.
pub const MAX_PANES: usize = 4;
/// Setting key of the panes' targets (JSON list, `null` for an unchosen pane).
const PANES_KEY: &str = "playground.panes";
/// Setting key of the sampling controls (JSON [`SamplingState`]).
const SAMPLING_KEY: &str = "playground.sampling";

/// The sampling controls as stored in the settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingState {
    pub params: SamplingParams,
    /// Always pick the most likely token (temperature 0), whatever `params` say.
    pub greedy: bool,
}

impl SamplingState {
    /// The parameters a generation uses.
    pub fn effective(&self) -> SamplingParams {
        let mut p = self.params.clone();
        if self.greedy {
            p.temperature = 0.0;
        }
        p
    }
}

/// A conversation's title from its first user message: one line, at most 60 characters.
pub fn default_title(first_message: &str) -> String {
    let line = first_message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if line.is_empty() {
        return "Untitled conversation".to_string();
    }
    let mut title: String = line.chars().take(60).collect();
    if line.chars().count() > 60 {
        title = title.trim_end().to_string();
        title.push('…');
    }
    title
}

/// An optional number typed in a field: empty means "off".
pub fn parse_optional<T: std::str::FromStr>(text: &str) -> Result<Option<T>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    t.parse()
        .map(Some)
        .map_err(|_| format!("\"{t}\" is not a number"))
}

/// The panes' targets from the stored setting; None when it is not a valid list.
pub fn parse_stored_panes(json: &str) -> Option<Vec<Option<ChatTarget>>> {
    let list: Vec<Option<ChatTarget>> = serde_json::from_str(json).ok()?;
    if list.is_empty() || list.len() > MAX_PANES {
        return None;
    }
    Some(list)
}

/// Where a pane is in the current round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PaneState {
    Idle,
    /// Its turn has not come yet.
    Waiting,
    Loading,
    Generating,
    /// Stop was pressed before its turn.
    Skipped,
}

/// One pane: who answers and what it has seen and said.
#[derive(Clone, Copy)]
struct Pane {
    uid: u64,
    target: RwSignal<Option<ChatTarget>>,
    messages: RwSignal<Vec<ChatMessage>>,
    /// The answer being generated, shown live (None when nothing is generating).
    streaming: RwSignal<Option<String>>,
    state: RwSignal<PaneState>,
    stats: RwSignal<Option<GenerationStats>>,
    error: RwSignal<Option<IpcError>>,
    /// What the answer waits for (other answers ahead, a rate-limited endpoint).
    notice: RwSignal<Option<String>>,
}

impl Pane {
    fn new(uid: u64, target: Option<ChatTarget>, messages: Vec<ChatMessage>) -> Pane {
        Pane {
            uid,
            target: RwSignal::new(target),
            messages: RwSignal::new(messages),
            streaming: RwSignal::new(None),
            state: RwSignal::new(PaneState::Idle),
            stats: RwSignal::new(None),
            error: RwSignal::new(None),
            notice: RwSignal::new(None),
        }
    }
}

fn message(role: &str, content: String) -> ChatMessage {
    ChatMessage {
        role: role.to_string(),
        content,
    }
}

/// Generates one pane's answer to its transcript, streaming into the pane.
async fn answer(
    pane: Pane,
    target: ChatTarget,
    params: SamplingParams,
    current: StoredValue<Option<String>>,
) {
    let request_id = ipc::chat::new_request_id("playground");
    current.set_value(Some(request_id.clone()));
    let history = pane.messages.get_untracked();
    pane.streaming.set(Some(String::new()));
    pane.state.set(PaneState::Generating);
    // Events that arrive after the command resolved must not touch the finished pane.
    let finished = Rc::new(Cell::new(false));
    let finished_in_events = finished.clone();
    let on_event = move |event: Result<ChatEvent, IpcError>| {
        if finished_in_events.get() {
            return;
        }
        match event {
            Ok(ChatEvent::Queued { position }) => {
                pane.state.set(PaneState::Waiting);
                pane.notice.set((position > 0).then(|| {
                    format!("{position} answer(s) ahead of this one (from this window or the API server)")
                }));
            }
            Ok(ChatEvent::Retrying {
                attempt,
                wait_ms,
                reason,
            }) => pane.notice.set(Some(format!(
                "{reason}; trying again in {:.1} s (retry {attempt})",
                wait_ms as f64 / 1e3
            ))),
            Ok(ChatEvent::Loading) => {
                pane.notice.set(None);
                pane.state.set(PaneState::Loading)
            }
            Ok(ChatEvent::Token { text }) => {
                if pane.state.get_untracked() != PaneState::Generating {
                    pane.state.set(PaneState::Generating);
                    pane.notice.set(None);
                }
                pane.streaming.update(|s| {
                    if let Some(s) = s {
                        s.push_str(&text);
                    }
                });
            }
            Ok(ChatEvent::Done { stats }) => pane.stats.set(Some(stats)),
            Err(e) => pane.error.set(Some(e)),
        }
    };
    let result = ipc::chat::chat_target(&request_id, &target, &history, &params, on_event).await;
    finished.set(true);
    current.set_value(None);
    let streamed = pane.streaming.get_untracked().unwrap_or_default();
    match result {
        Ok(stats) => {
            let text = if stats.text.is_empty() {
                streamed
            } else {
                stats.text.clone()
            };
            pane.messages.update(|m| m.push(message("assistant", text)));
            pane.stats.set(Some(stats));
        }
        Err(e) => {
            // The message was not answered: take it back so the next turn stays valid.
            pane.messages.update(|m| {
                if m.last().is_some_and(|l| l.role == "user") {
                    m.pop();
                }
            });
            pane.error.set(Some(e));
        }
    }
    pane.streaming.set(None);
    pane.notice.set(None);
    pane.state.set(PaneState::Idle);
}

/// One turn of a transcript: user text as typed, answers as markdown.
fn turn_view(m: ChatMessage) -> AnyView {
    if m.role == "user" {
        view! {
            <div class="message user" data-testid="user-message">
                <div class="role">"You"</div>
                <div class="bubble">{m.content}</div>
            </div>
        }
        .into_any()
    } else {
        view! {
            <div class="message assistant">
                <div class="role">"Answer"</div>
                <div class="bubble markdown" data-testid="answer" inner_html=markdown::to_html(&m.content)></div>
            </div>
        }
        .into_any()
    }
}

/// The playground page.
#[component]
pub fn PlaygroundPage() -> impl IntoView {
    let ctx = AppCtx::get();
    let catalog = TargetCatalog::load();
    let next_uid = StoredValue::new(1u64);
    let panes: RwSignal<Vec<Pane>> = RwSignal::new(vec![Pane::new(0, None, Vec::new())]);
    let sampling = RwSignal::new(SamplingState::default());
    let show_sampling = RwSignal::new(false);
    let sampling_error: RwSignal<Option<String>> = RwSignal::new(None);
    let input = RwSignal::new(String::new());
    let busy = RwSignal::new(false);
    let stop_requested = RwSignal::new(false);
    // The answer being generated, so Stop ends exactly it.
    let current_request = StoredValue::new(None::<String>);
    let page_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    // Conversation state.
    let conversation_id: RwSignal<Option<i64>> = RwSignal::new(None);
    let conversation_created: RwSignal<String> = RwSignal::new(String::new());
    let title = RwSignal::new(String::new());
    let saved_note: RwSignal<Option<String>> = RwSignal::new(None);
    let conversations: RwSignal<Vec<ConversationSummary>> = RwSignal::new(Vec::new());
    let list_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let panes_restored = StoredValue::new(false);
    let sampling_restored = StoredValue::new(false);

    // Panes are created from handlers, effects and tasks: their signals belong to the
    // page, so they live as long as it does whatever created them.
    let owner = StoredValue::new(Owner::current());
    let make_pane = move |target: Option<ChatTarget>, messages: Vec<ChatMessage>| {
        let uid = next_uid.get_value();
        next_uid.set_value(uid + 1);
        owner.with_value(|o| match o {
            Some(o) => o.with(|| Pane::new(uid, target, messages)),
            None => Pane::new(uid, target, messages),
        })
    };

    let persist_panes = move || {
        panes_restored.set_value(true);
        let targets: Vec<Option<ChatTarget>> = panes
            .get_untracked()
            .iter()
            .map(|p| p.target.get_untracked())
            .collect();
        if let Ok(json) = serde_json::to_string(&targets) {
            ctx.set_setting(PANES_KEY, json);
        }
    };
    let persist_sampling = move || {
        sampling_restored.set_value(true);
        if let Ok(json) = serde_json::to_string(&sampling.get_untracked()) {
            ctx.set_setting(SAMPLING_KEY, json);
        }
    };

    // Restore the panes and the sampling controls once the settings arrive (unless
    // the user changed them first).
    Effect::new(move |_| {
        let settings = ctx.settings.get();
        if !panes_restored.get_value() {
            if let Some(targets) = settings.get(PANES_KEY).and_then(|j| parse_stored_panes(j)) {
                panes_restored.set_value(true);
                if !busy.get_untracked()
                    && panes
                        .get_untracked()
                        .iter()
                        .all(|p| p.messages.with_untracked(|m| m.is_empty()))
                {
                    let restored = targets
                        .into_iter()
                        .map(|t| make_pane(t, Vec::new()))
                        .collect();
                    panes.set(restored);
                }
            }
        }
        if !sampling_restored.get_value() {
            if let Some(state) = settings
                .get(SAMPLING_KEY)
                .and_then(|j| serde_json::from_str::<SamplingState>(j).ok())
            {
                sampling_restored.set_value(true);
                sampling.set(state);
            }
        }
    });

    // A pane nobody chose answers with the first model.
    Effect::new(move |_| {
        if let Some(Ok(models)) = ctx.models.get() {
            if let Some(first) = models.first() {
                for p in panes.get() {
                    if p.target.get_untracked().is_none()
                        && p.messages.with_untracked(Vec::is_empty)
                    {
                        p.target.set(Some(ChatTarget::Base { model_id: first.id }));
                    }
                }
            }
        }
    });

    // Saved conversations, reloaded when the library changes.
    let reload_conversations = move || {
        spawn_local(async move {
            match ipc::chat::list_conversations().await {
                Ok(list) => {
                    conversations.set(list);
                    list_error.set(None);
                }
                Err(e) => list_error.set(Some(e)),
            }
        });
    };
    Effect::new(move |_| {
        ctx.library_version.track();
        reload_conversations();
    });

    let send = move || {
        if busy.get_untracked() {
            return;
        }
        let text = input.get_untracked().trim().to_string();
        if text.is_empty() {
            return;
        }
        let list = panes.get_untracked();
        if list.iter().all(|p| p.target.get_untracked().is_none()) {
            page_error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message: "Choose who answers in at least one pane (add a model on the Library page first).".into(),
            }));
            return;
        }
        page_error.set(None);
        saved_note.set(None);
        if title.get_untracked().trim().is_empty() {
            title.set(default_title(&text));
        }
        input.set(String::new());
        stop_requested.set(false);
        busy.set(true);
        for p in &list {
            p.error.set(None);
            p.stats.set(None);
            if p.target.get_untracked().is_some() {
                p.messages.update(|m| m.push(message("user", text.clone())));
                p.state.set(PaneState::Waiting);
            }
        }
        let params = sampling.get_untracked().effective();
        spawn_local(async move {
            for p in list {
                let Some(target) = p.target.get_untracked() else {
                    continue;
                };
                if stop_requested.get_untracked() {
                    p.messages.update(|m| {
                        if m.last().is_some_and(|l| l.role == "user") {
                            m.pop();
                        }
                    });
                    p.state.set(PaneState::Skipped);
                    continue;
                }
                answer(p, target, params.clone(), current_request).await;
            }
            busy.set(false);
        });
    };

    let stop = move || {
        if !busy.get_untracked() {
            return;
        }
        stop_requested.set(true);
        let Some(request_id) = current_request.get_value() else {
            return;
        };
        spawn_local(async move {
            if let Err(e) = ipc::chat::cancel_chat(&request_id).await {
                page_error.set(Some(e));
            }
        });
    };

    let add_pane = move |_| {
        if panes.with_untracked(|p| p.len()) >= MAX_PANES {
            return;
        }
        let target = panes
            .get_untracked()
            .last()
            .and_then(|p| p.target.get_untracked());
        let pane = make_pane(target, Vec::new());
        panes.update(|p| p.push(pane));
        persist_panes();
    };
    let remove_pane = move |index: usize| {
        if panes.with_untracked(|p| p.len()) <= 1 {
            return;
        }
        panes.update(|p| {
            if index < p.len() {
                p.remove(index);
            }
        });
        persist_panes();
    };

    let new_conversation = move || {
        if busy.get_untracked() {
            return;
        }
        for p in panes.get_untracked() {
            p.messages.set(Vec::new());
            p.stats.set(None);
            p.error.set(None);
            p.state.set(PaneState::Idle);
        }
        conversation_id.set(None);
        conversation_created.set(String::new());
        title.set(String::new());
        saved_note.set(None);
        page_error.set(None);
    };

    let save = move || {
        let list = panes.get_untracked();
        let chosen: Vec<ConversationPane> = list
            .iter()
            .filter_map(|p| {
                let target = p.target.get_untracked()?;
                Some(ConversationPane {
                    label: catalog.label(&target),
                    target,
                    messages: p.messages.get_untracked(),
                })
            })
            .collect();
        let first = chosen
            .iter()
            .flat_map(|p| p.messages.iter())
            .find(|m| m.role == "user")
            .map(|m| m.content.clone());
        let Some(first) = first else {
            page_error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message: "Nothing to save yet: send a message first.".into(),
            }));
            return;
        };
        let typed = title.get_untracked().trim().to_string();
        let conversation = Conversation {
            id: conversation_id.get_untracked(),
            title: if typed.is_empty() {
                default_title(&first)
            } else {
                typed
            },
            panes: chosen,
            params: Some(sampling.get_untracked().effective()),
            created_at: conversation_created.get_untracked(),
            updated_at: String::new(),
        };
        spawn_local(async move {
            match ipc::chat::save_conversation(&conversation).await {
                Ok(saved) => {
                    conversation_id.set(saved.id);
                    conversation_created.set(saved.created_at.clone());
                    title.set(saved.title.clone());
                    saved_note.set(Some(format!("Saved “{}”.", saved.title)));
                    page_error.set(None);
                    ctx.library_changed();
                }
                Err(e) => page_error.set(Some(e)),
            }
        });
    };

    let load_conversation = move |id: i64| {
        if busy.get_untracked() {
            return;
        }
        spawn_local(async move {
            match ipc::chat::get_conversation(id).await {
                Ok(conv) => {
                    let mut loaded: Vec<Pane> = conv
                        .panes
                        .iter()
                        .take(MAX_PANES)
                        .map(|p| make_pane(Some(p.target.clone()), p.messages.clone()))
                        .collect();
                    if loaded.is_empty() {
                        loaded.push(make_pane(None, Vec::new()));
                    }
                    panes.set(loaded);
                    if let Some(params) = conv.params.clone() {
                        sampling.update(|s| {
                            s.greedy = params.temperature == 0.0;
                            s.params = params;
                        });
                    }
                    conversation_id.set(conv.id);
                    conversation_created.set(conv.created_at.clone());
                    title.set(conv.title.clone());
                    saved_note.set(Some(format!("Opened “{}”.", conv.title)));
                    page_error.set(None);
                    persist_panes();
                }
                Err(e) => page_error.set(Some(e)),
            }
        });
    };

    let delete_conversation = move |id: i64| {
        spawn_local(async move {
            match ipc::chat::remove_conversation(id).await {
                Ok(()) => {
                    if conversation_id.get_untracked() == Some(id) {
                        conversation_id.set(None);
                        conversation_created.set(String::new());
                    }
                    ctx.library_changed();
                }
                Err(e) => list_error.set(Some(e)),
            }
        });
    };

    // Enter (or Ctrl+Enter) in the composer sends, Shift+Enter adds a line; Escape
    // anywhere on the page stops.
    let composer_keydown = move |ev: leptos::ev::KeyboardEvent| {
        if ev.key() == "Enter" && !ev.shift_key() && !ev.is_composing() {
            ev.prevent_default();
            send();
        }
    };
    let keydown = move |ev: leptos::ev::KeyboardEvent| {
        if ev.key() == "Escape" && busy.get_untracked() {
            ev.prevent_default();
            stop();
        }
    };

    let pane_view = move |index: usize, pane: Pane| {
        let transcript = NodeRef::<leptos::html::Div>::new();
        Effect::new(move |_| {
            pane.messages.track();
            pane.streaming.track();
            if let Some(el) = transcript.get() {
                el.set_scroll_top(el.scroll_height());
            }
        });
        let count = panes.with_untracked(|p| p.len());
        view! {
            <div class="pane card" id=format!("pane-{index}") data-testid="pane">
                <div class="pane-head">
                    <TargetSelect
                        catalog=catalog
                        selected=pane.target
                        id=format!("pane-target-{index}")
                        on_pick=Callback::new(move |_| persist_panes())
                        disabled=Signal::derive(move || busy.get())
                    />
                    {(count > 1)
                        .then(|| {
                            view! {
                                <button
                                    class="secondary icon"
                                    id=format!("remove-pane-{index}")
                                    title="Remove this pane"
                                    disabled=move || busy.get()
                                    on:click=move |_| remove_pane(index)
                                >
                                    "✕"
                                </button>
                            }
                        })}
                </div>
                <div class="transcript pane-transcript" id=format!("pane-{index}-transcript") node_ref=transcript>
                    {move || {
                        let turns = pane.messages.get();
                        let empty = turns.is_empty() && pane.streaming.with(Option::is_none);
                        if empty {
                            view! { <p class="empty">"Answers appear here."</p> }.into_any()
                        } else {
                            turns.into_iter().map(turn_view).collect_view().into_any()
                        }
                    }}
                    {move || {
                        pane.streaming
                            .get()
                            .map(|text| {
                                let waiting = text.is_empty();
                                let note = match pane.state.get() {
                                    PaneState::Loading => "loading model…",
                                    _ => "…",
                                };
                                view! {
                                    <div class="message assistant" class:pending=waiting>
                                        <div class="role">"Answer"</div>
                                        {if waiting {
                                            view! { <div class="bubble">{note}</div> }.into_any()
                                        } else {
                                            view! {
                                                <div class="bubble markdown streaming" data-testid="answer" inner_html=markdown::to_html(&text)></div>
                                            }
                                                .into_any()
                                        }}
                                    </div>
                                }
                            })
                    }}
                </div>
                <div class="pane-foot">
                    {move || match pane.state.get() {
                        PaneState::Waiting => Some(view! { <p class="muted pane-status">"Waiting for its turn…"</p> }.into_any()),
                        PaneState::Skipped => Some(view! { <p class="muted pane-status">"Skipped: stopped before this pane answered."</p> }.into_any()),
                        _ => None,
                    }}
                    {move || pane.notice.get().map(|n| view! { <p class="muted pane-status" data-testid="pane-notice">{n}</p> })}
                    {move || pane.error.get().map(|e| error_note(&e))}
                    {move || {
                        pane.stats
                            .get()
                            .map(|s| view! { <p class="stats pane-stats" data-testid="stats">{format::stats(&s)}</p> })
                    }}
                </div>
            </div>
        }
    };

    // Number fields of the sampling panel: they write on change and report bad input.
    let float_field = move |label: &'static str,
                            hint: &'static str,
                            id: &'static str,
                            get: fn(&SamplingParams) -> f64,
                            set: fn(&mut SamplingParams, f64)| {
        view! {
            <Field label=label hint=hint>
                <input
                    type="number"
                    step="0.05"
                    id=id
                    prop:value=move || sampling.with(|s| get(&s.params).to_string())
                    on:change={move |ev| match event_target_value(&ev).trim().parse::<f64>() {
                        Ok(v) if v.is_finite() && v >= 0.0 => {
                            sampling.update(|s| set(&mut s.params, v));
                            sampling_error.set(None);
                            persist_sampling();
                        }
                        _ => sampling_error.set(Some(format!("{label} must be a number of 0 or more."))),
                    }}
                />
            </Field>
        }
    };
    let optional_field = move |label: &'static str,
                               hint: &'static str,
                               id: &'static str,
                               get: fn(&SamplingParams) -> Option<f64>,
                               set: fn(&mut SamplingParams, Option<f64>)| {
        view! {
            <Field label=label hint=hint>
                <input
                    type="number"
                    step="0.01"
                    id=id
                    placeholder="off"
                    prop:value=move || sampling.with(|s| get(&s.params).map(|v| v.to_string()).unwrap_or_default())
                    on:change={move |ev| match parse_optional::<f64>(&event_target_value(&ev)) {
                        Ok(v) if v.is_none_or(|v| (0.0..=1.0).contains(&v)) => {
                            sampling.update(|s| set(&mut s.params, v));
                            sampling_error.set(None);
                            persist_sampling();
                        }
                        _ => sampling_error.set(Some(format!("{label} must be between 0 and 1, or empty for off."))),
                    }}
                />
            </Field>
        }
    };
    let count_field = move |label: &'static str,
                            hint: &'static str,
                            id: &'static str,
                            get: fn(&SamplingParams) -> Option<u64>,
                            set: fn(&mut SamplingParams, Option<u64>),
                            min: u64| {
        view! {
            <Field label=label hint=hint>
                <input
                    type="number"
                    step="1"
                    min=min.to_string()
                    id=id
                    placeholder="off"
                    prop:value=move || sampling.with(|s| get(&s.params).map(|v| v.to_string()).unwrap_or_default())
                    on:change={move |ev| match parse_optional::<u64>(&event_target_value(&ev)) {
                        Ok(v) if v.is_none_or(|v| v >= min) => {
                            sampling.update(|s| set(&mut s.params, v));
                            sampling_error.set(None);
                            persist_sampling();
                        }
                        _ => sampling_error.set(Some(format!("{label} must be a whole number of at least {min}."))),
                    }}
                />
            </Field>
        }
    };

    view! {
        <section class="page wide playground-page" id="playground-page" on:keydown=keydown>
            <div class="playground-toolbar row">
                <h1>"Playground"</h1>
                <span class="muted">
                    <span id="pane-count" data-testid="pane-count">{move || panes.with(|p| p.len())}</span>
                    {move || if panes.with(|p| p.len()) == 1 { " pane" } else { " panes" }}
                </span>
                <button
                    class="secondary"
                    id="add-pane"
                    disabled={move || busy.get() || panes.with(|p| p.len()) >= MAX_PANES}
                    on:click=add_pane
                >
                    "+ Add pane"
                </button>
                <button
                    class="secondary"
                    id="toggle-sampling"
                    aria-expanded=move || show_sampling.get().to_string()
                    on:click=move |_| show_sampling.update(|s| *s = !*s)
                >
                    {move || if show_sampling.get() { "Hide sampling" } else { "Sampling…" }}
                </button>
                <span class="spacer"></span>
                <button class="secondary" id="new-conversation" disabled=move || busy.get() on:click=move |_| new_conversation()>
                    "New conversation"
                </button>
            </div>
            {move || {
                show_sampling
                    .get()
                    .then(|| {
                        view! {
                            <div class="card sampling-panel" id="sampling-panel">
                                <label class="greedy-toggle">
                                    <input
                                        type="checkbox"
                                        id="sampling-greedy"
                                        prop:checked=move || sampling.with(|s| s.greedy)
                                        on:change=move |ev| {
                                            let on = event_target_checked(&ev);
                                            sampling.update(|s| s.greedy = on);
                                            persist_sampling();
                                        }
                                    />
                                    " Greedy (always the most likely token; same answer every time)"
                                </label>
                                <div class="sampling-grid" class:greedy=move || sampling.with(|s| s.greedy)>
                                    {float_field("Temperature", "Higher is more varied; 0 is greedy.", "sampling-temperature", |p| p.temperature, |p, v| p.temperature = v)}
                                    {optional_field("Top-p", "Keep the smallest set of tokens with this much probability.", "sampling-top-p", |p| p.top_p, |p, v| p.top_p = v)}
                                    {count_field("Top-k", "Keep only the k most likely tokens.", "sampling-top-k", |p| p.top_k.map(|k| k as u64), |p, v| p.top_k = v.map(|k| k as usize), 1)}
                                    {optional_field("Min-p", "Drop tokens far less likely than the best one.", "sampling-min-p", |p| p.min_p, |p, v| p.min_p = v)}
                                    {float_field("Repetition penalty", "1 is off; 1.1 discourages repeating.", "sampling-repetition", |p| f64::from(p.repetition_penalty), |p, v| p.repetition_penalty = v as f32)}
                                    {count_field("Max tokens", "Longest answer, in tokens.", "sampling-max-tokens", |p| Some(p.max_tokens as u64), |p, v| p.max_tokens = v.unwrap_or(256) as usize, 1)}
                                    {count_field("Seed", "Same seed and settings give the same answer.", "sampling-seed", |p| Some(p.seed), |p, v| p.seed = v.unwrap_or(42), 0)}
                                </div>
                                <div class="row">
                                    <button
                                        class="secondary"
                                        id="sampling-reset"
                                        on:click=move |_| {
                                            sampling.set(SamplingState::default());
                                            sampling_error.set(None);
                                            persist_sampling();
                                        }
                                    >
                                        "Reset to defaults"
                                    </button>
                                    {move || sampling_error.get().map(|e| view! { <p class="notice error">{e}</p> })}
                                </div>
                            </div>
                        }
                    })
            }}
            <div class="playground-layout">
                <div class="panes" style:grid-template-columns=move || format!("repeat({}, minmax(0, 1fr))", panes.with(|p| p.len()))>
                    {move || {
                        panes
                            .get()
                            .into_iter()
                            .enumerate()
                            .map(|(i, p)| {
                                let _ = p.uid;
                                pane_view(i, p)
                            })
                            .collect_view()
                    }}
                </div>
                <aside class="card conversations">
                    <h2>"Conversations"</h2>
                    <Field label="Title" hint="Defaults to the first message.">
                        <input
                            type="text"
                            id="conversation-title"
                            placeholder="Untitled conversation"
                            prop:value=move || title.get()
                            on:input=move |ev| title.set(event_target_value(&ev))
                        />
                    </Field>
                    <button id="save-conversation" disabled=move || busy.get() on:click=move |_| save()>
                        {move || if conversation_id.get().is_some() { "Save changes" } else { "Save conversation" }}
                    </button>
                    {move || saved_note.get().map(|n| view! { <p class="notice" id="conversation-saved">{n}</p> })}
                    <ErrorSlot error=list_error />
                    <ul class="conversation-list" id="conversation-list">
                        {move || {
                            let list = conversations.get();
                            if list.is_empty() {
                                return view! { <li class="muted">"No saved conversations yet."</li> }.into_any();
                            }
                            list.into_iter()
                                .map(|c| {
                                    let id = c.id;
                                    let labels = c.labels.join(" · ");
                                    view! {
                                        <li class:current=move || conversation_id.get() == Some(id)>
                                            <button
                                                class="link conversation-open"
                                                id=format!("load-conversation-{id}")
                                                title=labels.clone()
                                                disabled=move || busy.get()
                                                on:click=move |_| load_conversation(id)
                                            >
                                                <span class="conversation-title">{c.title.clone()}</span>
                                                <span class="muted conversation-meta">
                                                    {format!("{} turn{} · {}", c.turns, if c.turns == 1 { "" } else { "s" }, labels)}
                                                </span>
                                            </button>
                                            <ConfirmButton
                                                label="Delete"
                                                id=format!("delete-conversation-{id}")
                                                on_confirm=Callback::new(move |_| delete_conversation(id))
                                            />
                                        </li>
                                    }
                                })
                                .collect_view()
                                .into_any()
                        }}
                    </ul>
                </aside>
            </div>
            <ErrorSlot error=page_error />
            <form
                class="composer"
                on:submit=move |ev| {
                    ev.prevent_default();
                    send();
                }
            >
                <textarea
                    id="composer-input"
                    rows="3"
                    placeholder="Message every pane…"
                    prop:value=move || input.get()
                    on:input=move |ev| input.set(event_target_value(&ev))
                    on:keydown=composer_keydown
                ></textarea>
                <div class="composer-actions">
                    {move || {
                        if busy.get() {
                            view! {
                                <button type="button" class="danger" id="stop-button" on:click=move |_| stop()>
                                    "Stop"
                                </button>
                            }
                                .into_any()
                        } else {
                            view! {
                                <button type="submit" id="send-button" disabled=move || input.with(|t| t.trim().is_empty())>
                                    "Send"
                                </button>
                            }
                                .into_any()
                        }
                    }}
                    <span class="shortcuts muted">
                        <kbd>"Enter"</kbd>" send · "<kbd>"Shift"</kbd>"+"<kbd>"Enter"</kbd>" new line · "
                        <kbd>"Esc"</kbd>" stop"
                    </span>
                </div>
            </form>
        </section>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_come_from_the_first_line_and_are_short() {
        assert_eq!(default_title("\n  Hello there \nsecond"), "Hello there");
        assert_eq!(default_title("   "), "Untitled conversation");
        let long = "word ".repeat(30);
        let t = default_title(&long);
        assert!(t.ends_with('…'), "{t}");
        assert!(t.chars().count() <= 61, "{t}");
    }

    #[test]
    fn optional_numbers_accept_empty_and_reject_text() {
        assert_eq!(parse_optional::<f64>(" "), Ok(None));
        assert_eq!(parse_optional::<f64>("0.9"), Ok(Some(0.9)));
        assert_eq!(parse_optional::<u64>("40"), Ok(Some(40)));
        assert!(parse_optional::<u64>("abc").is_err());
    }

    #[test]
    fn greedy_forces_temperature_zero() {
        let mut s = SamplingState::default();
        assert!(s.effective().temperature > 0.0);
        s.greedy = true;
        assert_eq!(s.effective().temperature, 0.0);
        assert_eq!(s.effective().max_tokens, s.params.max_tokens);
    }

    #[test]
    fn stored_panes_parse_with_bounds() {
        let json = r#"[{"kind":"base","model_id":1},null]"#;
        let panes = parse_stored_panes(json).expect("two panes");
        assert_eq!(panes.len(), 2);
        assert_eq!(panes[0], Some(ChatTarget::Base { model_id: 1 }));
        assert_eq!(parse_stored_panes("[]"), None);
        assert_eq!(parse_stored_panes("[null,null,null,null,null]"), None);
        assert_eq!(parse_stored_panes("nonsense"), None);
    }
}
