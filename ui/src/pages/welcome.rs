//! The first-start screen: while the library has no model, the window offers the
//! default model ([`attune_protocol::DEFAULT_MODEL`]) from the Hugging Face Hub (a
//! progress bar, Cancel) or from a file on this machine, with the library's own forms
//! ([`super::library::add`]). It first checks whether the Hub can be reached and says
//! plainly when this machine is offline. "Not now" hides it for this session.

use super::library::add::{AddLocal, HubDownload};
use crate::components::error_note;
use crate::{format, ipc};
use attune_protocol::{HubStatus, IpcError, DEFAULT_MODEL};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// The screen; `dismissed` is set by "Not now".
#[component]
pub fn Welcome(dismissed: RwSignal<bool>) -> impl IntoView {
    let status: RwSignal<Option<Result<HubStatus, IpcError>>> = RwSignal::new(None);
    let check = move || {
        status.set(None);
        spawn_local(async move { status.set(Some(ipc::models::hub_status().await)) });
    };
    check();

    let hub_line = move || {
        match status.get() {
        None => view! {
            <p class="muted" id="welcome-hub-checking">"Checking the connection to the Hugging Face Hub…"</p>
        }
        .into_any(),
        Some(Ok(s)) if s.reachable => view! {
            <p class="muted" id="welcome-online">{format!("The Hub ({}) is reachable.", s.endpoint)}</p>
        }
        .into_any(),
        Some(Ok(s)) => view! {
            <div class="notice warning welcome-offline" id="welcome-offline" role="alert">
                <strong>"Offline. "</strong>
                {format!(
                    "The Hugging Face Hub ({}) cannot be reached from this machine: {}. \
                     Use a model file on this machine instead, or connect and check again.",
                    s.endpoint,
                    s.reason.unwrap_or_else(|| "no answer".into())
                )}
                <button class="secondary small" id="welcome-recheck" on:click=move |_| check()>"Check again"</button>
            </div>
        }
        .into_any(),
        Some(Err(e)) => error_note(&e).into_any(),
    }
    };

    view! {
        <section class="page welcome-page" id="welcome" data-testid="welcome">
            <h1>"Welcome to Attune"</h1>
            <p class="welcome-lead">
                "Your library has no model yet. Attune adapts a small language model to your \
                 domain on this machine; start with "
                <strong>{DEFAULT_MODEL.name}</strong>
                {format!(
                    " ({}), the model Attune's figures and presets are measured on.",
                    format::bytes(DEFAULT_MODEL.bytes)
                )}
            </p>
            <div class="card welcome-card grid-2">
                <div class="welcome-hub">
                    <h3>"Download it from the Hugging Face Hub"</h3>
                    <p class="muted">
                        <code>{DEFAULT_MODEL.file}</code>" from "<code>{DEFAULT_MODEL.repo}</code>
                        ", pinned to commit "<code>{&DEFAULT_MODEL.revision[..12]}</code>"."
                    </p>
                    {hub_line}
                    <HubDownload prefix="welcome-" preset=DEFAULT_MODEL />
                </div>
                <div class="welcome-local">
                    <h3>"Or use a file on this machine"</h3>
                    <p class="muted">
                        "Already have "<code>{DEFAULT_MODEL.file}</code>
                        " (or another .gguf model, or a Hugging Face folder)? Choose it; it stays where it is."
                    </p>
                    <AddLocal prefix="welcome-" />
                </div>
            </div>
            <div class="row">
                <button class="secondary" id="welcome-skip" on:click=move |_| dismissed.set(true)>
                    "Not now"
                </button>
                <span class="muted">"The library's Models tab adds models at any time."</span>
            </div>
        </section>
    }
}
