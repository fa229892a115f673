//! Attune's front end: a Leptos (client-side rendered) app that runs inside the
//! Tauri window. `pages/` holds the screens, `components` the pieces they share,
//! `ipc/` is the only code that talks to the Rust shell, `format` turns protocol
//! figures into text.
//!
//! Element ids and `data-testid` attributes are part of the contract with the
//! end-to-end tests (`tests/tests/e2e.rs`): change both together.

pub mod chart;
pub mod components;
pub mod format;
pub mod ipc;
pub mod markdown;
pub mod pages;

use attune_protocol::{IpcError, ModelSummary};
use leptos::prelude::*;
use leptos::task::spawn_local;
use std::collections::BTreeMap;

/// Which screen is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Library,
    Datasets,
    Docs,
    Adapt,
    Runs,
    Playground,
    Templates,
    Arena,
    Connect,
}

impl Page {
    pub const ALL: [Page; 9] = [
        Page::Playground,
        Page::Library,
        Page::Datasets,
        Page::Docs,
        Page::Adapt,
        Page::Runs,
        Page::Templates,
        Page::Arena,
        Page::Connect,
    ];

    /// Stable key: the nav button is `nav-<key>`, the page slot `page-<key>`, and the
    /// last page is remembered under this key.
    pub fn key(self) -> &'static str {
        match self {
            Page::Library => "library",
            Page::Datasets => "datasets",
            Page::Docs => "docs",
            Page::Adapt => "adapt",
            Page::Runs => "runs",
            Page::Playground => "playground",
            Page::Templates => "templates",
            Page::Arena => "arena",
            Page::Connect => "connect",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Page::Library => "Library",
            Page::Datasets => "Import data",
            Page::Docs => "Documents",
            Page::Adapt => "Adapt",
            Page::Runs => "Runs",
            Page::Playground => "Playground",
            Page::Templates => "Templates",
            Page::Arena => "A/B arena",
            Page::Connect => "Connect",
        }
    }

    pub fn parse(key: &str) -> Option<Page> {
        Page::ALL.into_iter().find(|p| p.key() == key)
    }
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

/// What every page shares, from `use_context::<AppCtx>()`.
#[derive(Clone, Copy)]
pub struct AppCtx {
    pub page: RwSignal<Page>,
    pub models: ModelsState,
    /// Bumped whenever the library changes (a dataset imported, a run finished, an
    /// adapter removed...): pages that list things reload when it moves.
    pub library_version: RwSignal<u64>,
    /// The run the monitor shows (set when the wizard starts one).
    pub focus_run: RwSignal<Option<i64>>,
    /// The dataset the adaptation wizard starts from (set after an import).
    pub focus_dataset: RwSignal<Option<i64>>,
    /// The API model ("endpoint_id:model") the template editor previews and evaluates on,
    /// set by the advisor's "API access only" path.
    pub template_target: RwSignal<Option<String>>,
    /// Settings as stored in the library (theme, last page, playground panes...).
    pub settings: RwSignal<BTreeMap<String, String>>,
}

impl AppCtx {
    /// The context; every page is mounted under [`App`], which provides it.
    pub fn get() -> AppCtx {
        expect_context::<AppCtx>()
    }

    /// Tells every list to reload, and reloads the models.
    pub fn library_changed(&self) {
        self.library_version.update(|v| *v += 1);
        reload_models(self.models);
    }

    pub fn go(&self, page: Page) {
        self.page.set(page);
    }

    /// A stored setting.
    pub fn setting(&self, key: &str) -> Option<String> {
        self.settings.with_untracked(|s| s.get(key).cloned())
    }

    /// Stores a setting in the library (it survives a restart).
    pub fn set_setting(&self, key: &str, value: String) {
        let changed = self.settings.with_untracked(|s| s.get(key) != Some(&value));
        if !changed {
            return;
        }
        self.settings.update(|s| {
            s.insert(key.to_string(), value.clone());
        });
        let key = key.to_string();
        spawn_local(async move {
            // A failure to remember a preference is not worth interrupting the user.
            let _ = ipc::settings::set_setting(&key, &value).await;
        });
    }
}

/// Applies "light", "dark" or "system" to the document.
fn apply_theme(theme: &str) {
    if let Some(root) = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.document_element())
    {
        let _ = root.set_attribute("data-theme", theme);
    }
}

/// The whole window: a header with navigation and every page (all stay mounted,
/// so a conversation or a wizard survives a visit elsewhere).
#[component]
pub fn App() -> impl IntoView {
    let ctx = AppCtx {
        page: RwSignal::new(Page::Playground),
        models: RwSignal::new(None),
        library_version: RwSignal::new(0),
        focus_run: RwSignal::new(None),
        focus_dataset: RwSignal::new(None),
        template_target: RwSignal::new(None),
        settings: RwSignal::new(BTreeMap::new()),
    };
    provide_context(ctx);
    reload_models(ctx.models);
    let theme = RwSignal::new("system".to_string());
    let settings_error: RwSignal<Option<IpcError>> = RwSignal::new(None);

    // Restore the settings of the last session: theme and page.
    spawn_local(async move {
        match ipc::settings::get_settings().await {
            Ok(s) => {
                if let Some(t) = s.get("theme") {
                    theme.set(t.clone());
                }
                if let Some(p) = s.get("page").and_then(|p| Page::parse(p)) {
                    ctx.page.set(p);
                }
                ctx.settings.set(s);
            }
            Err(e) => settings_error.set(Some(e)),
        }
    });
    Effect::new(move |_| apply_theme(&theme.get()));
    Effect::new(move |_| {
        let p = ctx.page.get();
        ctx.set_setting("page", p.key().to_string());
    });
    // Runs finishing anywhere change the library.
    ipc::events::listen_runs(move |update| {
        if matches!(
            update.event,
            attune_protocol::RunEvent::Finished { .. } | attune_protocol::RunEvent::Started { .. }
        ) {
            ctx.library_changed();
        }
    });

    let cycle_theme = move |_| {
        let next = match theme.get_untracked().as_str() {
            "system" => "light",
            "light" => "dark",
            _ => "system",
        }
        .to_string();
        theme.set(next.clone());
        ctx.set_setting("theme", next);
    };

    // "Copy diagnostics": the shell's report, copied to the clipboard and shown in a panel
    // (so it can be copied by hand where the clipboard is not available).
    let diagnostics: RwSignal<Option<Result<String, IpcError>>> = RwSignal::new(None);
    let copied = RwSignal::new(false);
    let copy_diagnostics = move |_| {
        spawn_local(async move {
            let report = ipc::diagnostics::diagnostics().await;
            copied.set(report.as_ref().is_ok_and(|text| copy_to_clipboard(text)));
            diagnostics.set(Some(report));
        });
    };

    let nav = move |target: Page| {
        view! {
            <button
                id=format!("nav-{}", target.key())
                data-testid=format!("nav-{}", target.key())
                class="nav-button"
                class:active=move || ctx.page.get() == target
                on:click=move |_| ctx.page.set(target)
            >
                {target.label()}
            </button>
        }
    };

    // First start: while the library has no model, the window offers the default one
    // (the pages stay mounted underneath, hidden).
    let welcome_dismissed = RwSignal::new(false);
    let welcome_open = Memo::new(move |_| {
        !welcome_dismissed.get()
            && ctx
                .models
                .with(|m| matches!(m, Some(Ok(list)) if list.is_empty()))
    });

    let slot = move |target: Page, body: AnyView| {
        view! {
            <div
                class="page-slot"
                id=format!("page-{}", target.key())
                style:display=move || {
                    if ctx.page.get() == target && !welcome_open.get() { "flex" } else { "none" }
                }
            >
                {body}
            </div>
        }
    };

    view! {
        <div class="app">
            <header class="topbar">
                <div class="brand">
                    <img class="logo" src="./icon.png" alt="" aria-hidden="true" />
                    <span class="brand-name">"Attune"</span>
                </div>
                <nav class="nav">{Page::ALL.into_iter().map(nav).collect_view()}</nav>
                <button
                    class="secondary theme-toggle"
                    id="theme-toggle"
                    title="Theme: system, light or dark"
                    on:click=cycle_theme
                >
                    {move || match theme.get().as_str() {
                        "light" => "☀ Light",
                        "dark" => "☾ Dark",
                        _ => "◐ System",
                    }}
                </button>
                <button
                    class="secondary theme-toggle"
                    id="copy-diagnostics"
                    data-testid="copy-diagnostics"
                    title="Copy versions, machine, library counts and the last errors, for a bug report (no keys, no prompts)"
                    on:click=copy_diagnostics
                >
                    "Copy diagnostics"
                </button>
            </header>
            {move || {
                diagnostics
                    .get()
                    .map(|report| {
                        let close = move |_| diagnostics.set(None);
                        match report {
                            Ok(text) => view! {
                                <div class="banner diagnostics" id="diagnostics" data-testid="diagnostics">
                                    <strong>
                                        {move || if copied.get() {
                                            "Diagnostics copied to the clipboard. "
                                        } else {
                                            "Diagnostics (select and copy): "
                                        }}
                                    </strong>
                                    <button class="secondary" on:click=close>"Close"</button>
                                    <textarea readonly rows="12" id="diagnostics-text">{text}</textarea>
                                </div>
                            }
                            .into_any(),
                            Err(err) => view! {
                                <div class="banner error" id="diagnostics">
                                    <span>{format!("Could not collect diagnostics: {}", err.message)}</span>
                                    <button class="secondary" on:click=close>"Close"</button>
                                </div>
                            }
                            .into_any(),
                        }
                    })
            }}
            <main class="content">
                {move || {
                    let err = match ctx.models.get() {
                        Some(Err(err)) => Some(err),
                        _ => settings_error.get(),
                    };
                    err.map(|err| {
                        view! {
                            <div class="banner error" id="engine-error" data-testid="engine-error">
                                <strong>"Attune could not reach its library. "</strong>
                                <span>{err.message.clone()}</span>
                                <code class="error-code">{err.code.as_str()}</code>
                            </div>
                        }
                    })
                }}
                {move || {
                    welcome_open
                        .get()
                        .then(|| view! { <pages::welcome::Welcome dismissed=welcome_dismissed /> })
                }}
                {slot(Page::Playground, view! { <pages::playground::PlaygroundPage /> }.into_any())}
                {slot(Page::Library, view! { <pages::library::LibraryPage /> }.into_any())}
                {slot(Page::Datasets, view! { <pages::datasets::DatasetWizard /> }.into_any())}
                {slot(Page::Docs, view! { <pages::docs::DocsPage /> }.into_any())}
                {slot(Page::Adapt, view! { <pages::adapt::AdaptWizard /> }.into_any())}
                {slot(Page::Runs, view! { <pages::runs::RunsPage /> }.into_any())}
                {slot(Page::Templates, view! { <pages::templates::TemplatesPage /> }.into_any())}
                {slot(Page::Arena, view! { <pages::arena::ArenaPage /> }.into_any())}
                {slot(Page::Connect, view! { <pages::connect::ConnectPage /> }.into_any())}
            </main>
        </div>
    }
}

/// Writes `text` to the clipboard (`navigator.clipboard.writeText`); false where the page has
/// no clipboard access.
fn copy_to_clipboard(text: &str) -> bool {
    use wasm_bindgen::{JsCast, JsValue};
    let get = |obj: &JsValue, key: &str| js_sys::Reflect::get(obj, &JsValue::from_str(key)).ok();
    let Some(clipboard) = get(&js_sys::global(), "navigator")
        .filter(|n| !n.is_undefined())
        .and_then(|n| get(&n, "clipboard"))
        .filter(|c| !c.is_undefined() && !c.is_null())
    else {
        return false;
    };
    let Some(write) =
        get(&clipboard, "writeText").and_then(|f| f.dyn_into::<js_sys::Function>().ok())
    else {
        return false;
    };
    write.call1(&clipboard, &JsValue::from_str(text)).is_ok()
}

/// Entry point when the wasm module loads.
#[cfg(target_arch = "wasm32")]
#[wasm_bindgen::prelude::wasm_bindgen(start)]
pub fn start() {
    leptos::mount::mount_to_body(App);
}
