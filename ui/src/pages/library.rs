//! The library: models, datasets, runs, adapters, templates and evaluations in one
//! place, each tab a searchable table with a details panel (see [`details`]).
//! The models tab also adds models from a file, a folder or the Hugging Face Hub,
//! and files dropped anywhere on the window are routed from here.

pub mod add;
mod details;
mod export;
pub mod logic;

use crate::components::{error_note, Field, ModelSelect};
use crate::{ipc, AppCtx, Page};
use add::{added_text, AddLocal, HubDownload};
use attune_protocol::ErrorCode;
use attune_protocol::{
    AdapterSummary, DatasetSummary, DroppedFile, EvalReport, IpcError, RunSummary, TemplateRecord,
};
use leptos::prelude::*;
use leptos::task::spawn_local;
use logic::{Row, Tab};

/// A list loaded from the library: `None` while loading.
type Loaded<T> = RwSignal<Option<Result<Vec<T>, IpcError>>>;

/// A one-line message of the page: ok (green) or not.
#[derive(Debug, Clone, PartialEq)]
enum Banner {
    Ok(String),
    Error(IpcError),
}

fn banner_view(b: Banner, close: impl Fn() + 'static) -> impl IntoView {
    let body = match b {
        Banner::Ok(text) => view! { <div class="notice">{text}</div> }.into_any(),
        Banner::Error(err) => error_note(&err).into_any(),
    };
    view! {
        <div class="drop-banner" id="drop-banner" data-testid="drop-banner">
            {body}
            <button class="secondary small" title="Dismiss" on:click=move |_| close()>"✕"</button>
        </div>
    }
}

/// The library page.
#[component]
pub fn LibraryPage() -> impl IntoView {
    let ctx = AppCtx::get();
    let tab = RwSignal::new(Tab::Models);
    let tab_restored = RwSignal::new(false);
    let query = RwSignal::new(String::new());
    let selected: RwSignal<Option<i64>> = RwSignal::new(None);
    let banner: RwSignal<Option<Banner>> = RwSignal::new(None);
    // A dropped adapter folder waiting for its base model.
    let adapter_import: RwSignal<Option<String>> = RwSignal::new(None);

    let datasets: Loaded<DatasetSummary> = RwSignal::new(None);
    let runs: Loaded<RunSummary> = RwSignal::new(None);
    let adapters: Loaded<AdapterSummary> = RwSignal::new(None);
    let templates: Loaded<TemplateRecord> = RwSignal::new(None);
    let evaluations: Loaded<EvalReport> = RwSignal::new(None);

    // Restore the last tab once the settings have arrived.
    Effect::new(move |_| {
        let saved = ctx.settings.with(|s| s.get("library.tab").cloned());
        if tab_restored.get_untracked() {
            return;
        }
        if let Some(t) = saved.as_deref().and_then(Tab::parse) {
            tab.set(t);
            tab_restored.set(true);
        }
    });

    // Reload every list when the library changes.
    Effect::new(move |_| {
        ctx.library_version.track();
        spawn_local(async move { datasets.set(Some(ipc::datasets::list_datasets().await)) });
        spawn_local(async move { runs.set(Some(ipc::runs::list_runs().await)) });
        spawn_local(async move { adapters.set(Some(ipc::adapters::list_adapters().await)) });
        spawn_local(async move { templates.set(Some(ipc::templates::list_templates().await)) });
        spawn_local(async move { evaluations.set(Some(ipc::adapters::list_evaluations().await)) });
    });

    let choose_tab = move |t: Tab| {
        if tab.get_untracked() != t {
            selected.set(None);
        }
        tab.set(t);
        tab_restored.set(true);
        ctx.set_setting("library.tab", t.key().to_string());
    };

    // Files dropped anywhere on the window.
    ipc::events::listen_drops(move |paths| {
        for path in paths {
            spawn_local(async move {
                match ipc::models::classify_path(&path).await {
                    Ok(DroppedFile::Model { path }) => {
                        ctx.go(Page::Library);
                        choose_tab(Tab::Models);
                        banner.set(Some(Banner::Ok(format!(
                            "Adding {}…",
                            logic::file_name(&path)
                        ))));
                        banner.set(Some(match ipc::models::add_model(&path).await {
                            Ok(reply) => {
                                ctx.library_changed();
                                selected.set(Some(reply.model.id));
                                Banner::Ok(added_text(&reply.model.name, reply.already_present))
                            }
                            Err(e) => Banner::Error(e),
                        }));
                    }
                    Ok(DroppedFile::Dataset { path, .. }) => {
                        ctx.set_setting("datasets.open", path);
                        ctx.go(Page::Datasets);
                    }
                    Ok(DroppedFile::Adapter { path }) => {
                        ctx.go(Page::Library);
                        choose_tab(Tab::Adapters);
                        banner.set(None);
                        adapter_import.set(Some(path));
                    }
                    Ok(DroppedFile::Unsupported { path, reason }) => {
                        ctx.go(Page::Library);
                        banner.set(Some(Banner::Error(IpcError {
                            code: ErrorCode::Unsupported,
                            message: format!(
                                "Attune cannot use {}: {reason}",
                                logic::file_name(&path)
                            ),
                        })));
                    }
                    Err(e) => {
                        ctx.go(Page::Library);
                        banner.set(Some(Banner::Error(e)));
                    }
                }
            });
        }
    });

    // The current tab's rows, filtered by the search box.
    let rows = Memo::new(move |_| -> Option<Result<Vec<Row>, IpcError>> {
        let names: Vec<(i64, String)> = match datasets.get() {
            Some(Ok(list)) => list.iter().map(|d| (d.id, d.name.clone())).collect(),
            _ => Vec::new(),
        };
        let all = match tab.get() {
            Tab::Models => ctx
                .models
                .get()
                .map(|r| r.map(|l| l.iter().map(logic::model_row).collect())),
            Tab::Datasets => datasets
                .get()
                .map(|r| r.map(|l| l.iter().map(logic::dataset_row).collect())),
            Tab::Runs => runs
                .get()
                .map(|r| r.map(|l| l.iter().map(logic::run_row).collect())),
            Tab::Adapters => adapters
                .get()
                .map(|r| r.map(|l| l.iter().map(logic::adapter_row).collect())),
            Tab::Templates => templates
                .get()
                .map(|r| r.map(|l| l.iter().map(logic::template_row).collect())),
            Tab::Evaluations => evaluations.get().map(|r| {
                r.map(|l| {
                    l.iter()
                        .map(|e| {
                            let name = names
                                .iter()
                                .find(|(id, _)| *id == e.dataset_id)
                                .map(|(_, n)| n.as_str());
                            logic::eval_row(e, name)
                        })
                        .collect()
                })
            }),
        };
        let q = query.get();
        all.map(|r| {
            r.map(|rows: Vec<Row>| rows.into_iter().filter(|row| row.matches(&q)).collect())
        })
    });

    let table = move || {
        let t = tab.get();
        let headers = t
            .headers()
            .iter()
            .map(|h| view! { <th>{*h}</th> })
            .collect_view();
        let body = match rows.get() {
            None => view! { <tr class="empty-row"><td colspan="8">"Loading…"</td></tr> }.into_any(),
            Some(Err(e)) => {
                view! { <tr class="empty-row"><td colspan="8">{error_note(&e)}</td></tr> }
                    .into_any()
            }
            Some(Ok(list)) if list.is_empty() => {
                let q = query.get();
                let text = if q.trim().is_empty() {
                    format!("No {} yet.", t.label().to_lowercase())
                } else {
                    format!("Nothing matches “{}”.", q.trim())
                };
                view! { <tr class="empty-row"><td colspan="8" class="empty">{text}</td></tr> }
                    .into_any()
            }
            Some(Ok(list)) => list
                .into_iter()
                .map(|row| {
                    let id = row.id;
                    view! {
                        <tr
                            data-testid="library-row"
                            data-name=row.name.clone()
                            data-id=id.to_string()
                            class:selected=move || selected.get() == Some(id)
                            on:click=move |_| selected.set(Some(id))
                        >
                            <td class="name">{row.name.clone()}</td>
                            {row.cells.into_iter().map(|c| view! { <td>{c}</td> }).collect_view()}
                        </tr>
                    }
                })
                .collect_view()
                .into_any(),
        };
        view! {
            <table class="data library-table" id="library-table" data-tab=t.key()>
                <thead><tr>{headers}</tr></thead>
                <tbody>{body}</tbody>
            </table>
        }
    };

    view! {
        <section class="page wide library-page" id="library-page">
            <div class="library-head">
                <h1>"Library"</h1>
                <input
                    type="search"
                    id="library-search"
                    data-testid="library-search"
                    placeholder="Search this tab…"
                    prop:value=move || query.get()
                    on:input=move |ev| query.set(event_target_value(&ev))
                />
            </div>
            {move || banner.get().map(|b| banner_view(b, move || banner.set(None)))}
            <nav class="library-tabs" role="tablist">
                {Tab::ALL
                    .into_iter()
                    .map(|t| {
                        view! {
                            <button
                                class="tab"
                                role="tab"
                                id=format!("tab-{}", t.key())
                                data-testid=format!("tab-{}", t.key())
                                class:active=move || tab.get() == t
                                on:click=move |_| choose_tab(t)
                            >
                                {t.label()}
                            </button>
                        }
                    })
                    .collect_view()}
            </nav>
            {move || (tab.get() == Tab::Models).then(|| view! { <AddModel selected=selected /> })}
            {move || {
                adapter_import
                    .get()
                    .map(|path| view! { <ImportAdapter path=path open=adapter_import selected=selected /> })
            }}
            <div class="library-body">
                <div class="table-wrap library-list">{table}</div>
                <details::Details
                    tab=tab
                    selected=selected
                    datasets=datasets
                    runs=runs
                    adapters=adapters
                    templates=templates
                    evaluations=evaluations
                />
            </div>
        </section>
    }
}

/// Adding a model: a local file or folder, or a Hugging Face Hub download.
#[component]
fn AddModel(selected: RwSignal<Option<i64>>) -> impl IntoView {
    view! {
        <div class="card add-model-card grid-2">
            <div class="add-local">
                <h3>"Add a model from this machine"</h3>
                <AddLocal prefix="" selected=selected drop_hint=true />
            </div>
            <div class="add-hub">
                <h3>"Download from the Hugging Face Hub"</h3>
                <HubDownload prefix="" selected=selected />
            </div>
        </div>
    }
}

/// The form shown for a dropped adapter folder: its base model and a name.
#[component]
fn ImportAdapter(
    path: String,
    open: RwSignal<Option<String>>,
    selected: RwSignal<Option<i64>>,
) -> impl IntoView {
    let ctx = AppCtx::get();
    let base: RwSignal<Option<i64>> = RwSignal::new(None);
    let name = RwSignal::new(logic::file_name(&path).to_string());
    let busy = RwSignal::new(false);
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let shown = path.clone();
    let import = move |_| {
        let Some(base_id) = base.get_untracked() else {
            return;
        };
        let p = path.clone();
        let n = name.get_untracked().trim().to_string();
        busy.set(true);
        error.set(None);
        spawn_local(async move {
            match ipc::adapters::import_adapter(&p, base_id, (!n.is_empty()).then_some(n.as_str()))
                .await
            {
                Ok(a) => {
                    open.set(None);
                    selected.set(Some(a.id));
                    ctx.library_changed();
                }
                Err(e) => error.set(Some(e)),
            }
            busy.set(false);
        });
    };
    view! {
        <div class="card import-adapter" id="import-adapter">
            <h3>"Import an adapter"</h3>
            <p class="muted"><code>{shown}</code></p>
            <div class="grid-2">
                <Field label="Base model" hint="The model this adapter was trained on.">
                    <ModelSelect selected=base id="adapter-base" />
                </Field>
                <Field label="Name" hint="How the adapter is listed in the library.">
                    <input
                        type="text"
                        id="adapter-name"
                        prop:value=move || name.get()
                        on:input=move |ev| name.set(event_target_value(&ev))
                    />
                </Field>
            </div>
            <div class="row">
                <button
                    id="adapter-import"
                    disabled=move || busy.get() || base.get().is_none()
                    on:click=import
                >
                    {move || if busy.get() { "Importing…" } else { "Import adapter" }}
                </button>
                <button class="secondary" on:click=move |_| open.set(None)>"Cancel"</button>
            </div>
            {move || error.get().map(|e| error_note(&e))}
        </div>
    }
}
