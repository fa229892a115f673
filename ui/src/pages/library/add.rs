//! Adding a model, shared by the library's models tab and the first-start screen
//! ([`crate::pages::welcome`]): a file or folder on this machine ([`AddLocal`]), or a
//! Hugging Face Hub download with a progress bar and Cancel ([`HubDownload`]).
//!
//! Element ids are `{prefix}model-path`, `{prefix}add-model`, `{prefix}hub-pull`,
//! `{prefix}hub-progress`...: the library uses the empty prefix, the first-start screen
//! `welcome-`, so both can be mounted at once.

use super::logic;
use crate::components::{error_note, Field, Progress};
use crate::{format, ipc, AppCtx};
use attune_protocol::ErrorCode;
use attune_protocol::{DefaultModel, IpcError, PullUpdate};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// A one-line message under a form: ok (green) or not.
#[derive(Debug, Clone, PartialEq)]
enum Note {
    Ok(String),
    Error(IpcError),
}

fn note_view(n: RwSignal<Option<Note>>) -> impl Fn() -> Option<AnyView> {
    move || {
        n.get().map(|b| match b {
            Note::Ok(t) => view! { <div class="notice" data-testid="notice">{t}</div> }.into_any(),
            Note::Error(e) => error_note(&e).into_any(),
        })
    }
}

/// "X was added to the library." or "X is already in the library."
pub fn added_text(name: &str, already: bool) -> String {
    if already {
        format!("{name} is already in the library.")
    } else {
        format!("{name} was added to the library.")
    }
}

/// A model file or folder on this machine: a typed path (Enter adds), or the
/// system's file and folder choosers. `selected` (when given) follows the added model.
#[component]
pub fn AddLocal(
    prefix: &'static str,
    #[prop(optional)] selected: Option<RwSignal<Option<i64>>>,
    /// Shows the drag-and-drop hint under the form.
    #[prop(optional)]
    drop_hint: bool,
) -> impl IntoView {
    let ctx = AppCtx::get();
    let path = RwSignal::new(String::new());
    let adding = RwSignal::new(false);
    let note: RwSignal<Option<Note>> = RwSignal::new(None);

    let browse = move |folder: bool| {
        spawn_local(async move {
            let picked = if folder {
                ipc::models::pick_path("Choose a model folder", true, &[]).await
            } else {
                ipc::models::pick_path("Choose a model file", false, &["gguf"]).await
            };
            match picked {
                Ok(Some(p)) => path.set(p),
                Ok(None) => {}
                Err(e) => note.set(Some(Note::Error(e))),
            }
        });
    };

    let add = move || {
        let p = path.get_untracked().trim().to_string();
        if p.is_empty() || adding.get_untracked() {
            return;
        }
        adding.set(true);
        note.set(None);
        spawn_local(async move {
            match ipc::models::add_model(&p).await {
                Ok(reply) => {
                    note.set(Some(Note::Ok(added_text(
                        &reply.model.name,
                        reply.already_present,
                    ))));
                    if let Some(s) = selected {
                        s.set(Some(reply.model.id));
                    }
                    path.set(String::new());
                    ctx.library_changed();
                }
                Err(e) => note.set(Some(Note::Error(e))),
            }
            adding.set(false);
        });
    };

    view! {
        <Field label="File or folder" hint="A .gguf file, or a Hugging Face folder with config.json and safetensors. Files stay where they are.">
            <input
                type="text"
                id=format!("{prefix}model-path")
                placeholder="/path/to/model.gguf"
                prop:value=move || path.get()
                on:input=move |ev| path.set(event_target_value(&ev))
                on:keydown=move |ev| if ev.key() == "Enter" { add() }
            />
        </Field>
        <div class="row">
            <button class="secondary" id=format!("{prefix}browse-file") on:click=move |_| browse(false)>"Browse file…"</button>
            <button class="secondary" id=format!("{prefix}browse-folder") on:click=move |_| browse(true)>"Browse folder…"</button>
            <button
                id=format!("{prefix}add-model")
                disabled=move || adding.get() || path.get().trim().is_empty()
                on:click=move |_| add()
            >
                {move || if adding.get() { "Adding…" } else { "Add" }}
            </button>
        </div>
        {note_view(note)}
        {drop_hint.then(|| view! {
            <p class="drop-hint muted" id=format!("{prefix}drop-hint")>
                "Or drop a model file or folder anywhere on this window."
            </p>
        })}
    }
}

/// A Hugging Face Hub download: repository, revision and file fields, or, with
/// `preset`, one button for that model. Progress streams into a bar; Cancel stops it.
#[component]
pub fn HubDownload(
    prefix: &'static str,
    #[prop(optional)] preset: Option<DefaultModel>,
    #[prop(optional)] selected: Option<RwSignal<Option<i64>>>,
) -> impl IntoView {
    let ctx = AppCtx::get();
    let repo = RwSignal::new(preset.map(|p| p.repo.to_string()).unwrap_or_default());
    let revision = RwSignal::new(preset.map(|p| p.revision.to_string()).unwrap_or_default());
    let file = RwSignal::new(preset.map(|p| p.file.to_string()).unwrap_or_default());
    let pulling = RwSignal::new(false);
    let progress: RwSignal<Option<PullUpdate>> = RwSignal::new(None);
    let note: RwSignal<Option<Note>> = RwSignal::new(None);

    let pull = move || {
        let r = repo.get_untracked().trim().to_string();
        if r.is_empty() || pulling.get_untracked() {
            return;
        }
        let rev = revision.get_untracked().trim().to_string();
        let f = file.get_untracked().trim().to_string();
        pulling.set(true);
        progress.set(None);
        note.set(None);
        spawn_local(async move {
            let result = ipc::models::pull_model(
                &r,
                (!rev.is_empty()).then_some(rev.as_str()),
                (!f.is_empty()).then_some(f.as_str()),
                move |update| match update {
                    Ok(u) => progress.set(Some(u)),
                    Err(e) => note.set(Some(Note::Error(e))),
                },
            )
            .await;
            match result {
                Ok(reply) => {
                    note.set(Some(Note::Ok(added_text(
                        &reply.model.name,
                        reply.already_present,
                    ))));
                    if let Some(s) = selected {
                        s.set(Some(reply.model.id));
                    }
                    ctx.library_changed();
                }
                Err(e) if e.code == ErrorCode::Cancelled => note.set(Some(Note::Ok(
                    "Download cancelled; nothing was added.".into(),
                ))),
                Err(e) => note.set(Some(Note::Error(e))),
            }
            pulling.set(false);
            progress.set(None);
        });
    };

    let cancel = move |_| {
        spawn_local(async move {
            if let Err(e) = ipc::models::cancel_pull().await {
                note.set(Some(Note::Error(e)));
            }
        });
    };

    let fields = preset.is_none().then(|| {
        view! {
            <div class="grid-3">
                <Field label="Repository" hint="e.g. HuggingFaceTB/SmolLM2-135M-Instruct">
                    <input
                        type="text"
                        id=format!("{prefix}hub-repo")
                        prop:value=move || repo.get()
                        on:input=move |ev| repo.set(event_target_value(&ev))
                    />
                </Field>
                <Field label="Revision" hint="Branch, tag or commit (default main).">
                    <input
                        type="text"
                        id=format!("{prefix}hub-revision")
                        placeholder="main"
                        prop:value=move || revision.get()
                        on:input=move |ev| revision.set(event_target_value(&ev))
                    />
                </Field>
                <Field label="File" hint="One .gguf of the repository (optional).">
                    <input
                        type="text"
                        id=format!("{prefix}hub-file")
                        prop:value=move || file.get()
                        on:input=move |ev| file.set(event_target_value(&ev))
                    />
                </Field>
            </div>
        }
    });
    let idle_label = match preset {
        Some(p) => format!("Download {} ({})", p.name, format::bytes(p.bytes)),
        None => "Download".to_string(),
    };

    view! {
        {fields}
        <div class="row">
            <button
                id=format!("{prefix}hub-pull")
                disabled=move || pulling.get() || repo.get().trim().is_empty()
                on:click=move |_| pull()
            >
                {move || if pulling.get() { "Downloading…".to_string() } else { idle_label.clone() }}
            </button>
            {move || pulling.get().then(|| view! {
                <button class="secondary" id=format!("{prefix}hub-cancel") on:click=cancel>"Cancel"</button>
            })}
        </div>
        {move || pulling.get().then(|| {
            view! {
                <div id=format!("{prefix}hub-progress") data-testid="hub-progress">
                    <Progress
                        fraction=Signal::derive(move || progress.get().as_ref().and_then(logic::pull_fraction))
                        label=Signal::derive(move || {
                            progress.get().as_ref().map(logic::pull_label).unwrap_or_else(|| "Connecting…".into())
                        })
                    />
                </div>
            }
        })}
        {note_view(note)}
    }
}
