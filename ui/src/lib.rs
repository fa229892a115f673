//! Attune's front end: a Leptos (client-side rendered) app that runs inside the
//! Tauri window. `pages/` holds the screens, `ipc/` is the only code that talks
//! to the Rust shell, `format` turns protocol figures into text.
//!
//! Element ids and `data-testid` attributes are part of the contract with the
//! end-to-end test (`tests/tests/e2e.rs`): change both together.

pub mod format;
pub mod ipc;
pub mod pages;

use attune_protocol::{IpcError, ModelSummary};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// Which screen is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Chat,
    Models,
}

/// The model library as last loaded: `None` while loading.
pub type ModelsState = RwSignal<Option<Result<Vec<ModelSummary>, IpcError>>>;

/// Reloads the model library into `models`.
pub fn reload_models(models: ModelsState) {
    spawn_local(async move {
        let result = ipc::models::list_models().await;
        models.set(Some(result));
    });
}

/// The whole window: a header with navigation and the current page.
#[component]
pub fn App() -> impl IntoView {
    let page = RwSignal::new(Page::Chat);
    let models: ModelsState = RwSignal::new(None);
    reload_models(models);

    let nav = move |target: Page, id: &'static str, label: &'static str| {
        view! {
            <button
                id=id
                class="nav-button"
                class:active=move || page.get() == target
                on:click=move |_| page.set(target)
            >
                {label}
            </button>
        }
    };

    view! {
        <div class="app">
            <header class="topbar">
                <div class="brand">
                    <img class="logo" src="./icon.png" alt="" aria-hidden="true" />
                    <span class="brand-name">"Attune"</span>
                </div>
                <nav class="nav">
                    {nav(Page::Chat, "nav-chat", "Chat")}
                    {nav(Page::Models, "nav-models", "Models")}
                </nav>
            </header>
            <main class="content">
                {move || {
                    if let Some(Err(err)) = models.get() {
                        Some(
                            view! {
                                <div class="banner error" id="engine-error" data-testid="engine-error">
                                    <strong>"Attune could not reach its model library. "</strong>
                                    <span>{err.message.clone()}</span>
                                    <code class="error-code">{err.code.clone()}</code>
                                </div>
                            },
                        )
                    } else {
                        None
                    }
                }}
                // Both pages stay mounted, so a conversation survives a visit to Models.
                <div
                    class="page-slot"
                    style:display=move || if page.get() == Page::Chat { "flex" } else { "none" }
                >
                    <pages::chat::ChatPage models=models />
                </div>
                <div
                    class="page-slot"
                    style:display=move || if page.get() == Page::Models { "flex" } else { "none" }
                >
                    <pages::models::ModelsPage models=models />
                </div>
            </main>
        </div>
    }
}

/// Entry point when the wasm module loads.
#[cfg(target_arch = "wasm32")]
#[wasm_bindgen::prelude::wasm_bindgen(start)]
pub fn start() {
    leptos::mount::mount_to_body(App);
}
