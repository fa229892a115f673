//! The details panel of the library: everything about the selected item and what
//! can be done with it (delete, export, merge, chat, open in the monitor...).

use super::export::ExportDialog;
use super::logic::{self, Tab};
use super::Loaded;
use crate::components::{error_note, ConfirmButton, Field, ModelSelect};
use crate::pages::datasets::{sample_view, split_text, stats_table};
use crate::{format, ipc, AppCtx, Page};
use attune_protocol::{
    AdapterKind, AdapterSummary, ChatTarget, DatasetStats, DatasetSummary, EvalReport,
    ExportSubject, IpcError, LossOn, ModelSummary, PreviewRow, RunSummary, SplitName,
    TemplateRecord,
};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// Rows a page of the dataset browser shows.
const PAGE_ROWS: usize = 20;

/// The selected item of a loaded list.
fn pick<T: Clone + PartialEq + Send + Sync + 'static>(
    list: Loaded<T>,
    selected: RwSignal<Option<i64>>,
    id: fn(&T) -> i64,
) -> Memo<Option<T>> {
    Memo::new(move |_| {
        let want = selected.get()?;
        list.with(|l| match l {
            Some(Ok(items)) => items.iter().find(|x| id(x) == want).cloned(),
            _ => None,
        })
    })
}

/// One label / value line.
fn item(label: &'static str, value: impl IntoView + 'static) -> impl IntoView {
    view! {
        <dt>{label}</dt>
        <dd>{value}</dd>
    }
}

/// The panel beside the table.
#[component]
pub fn Details(
    tab: RwSignal<Tab>,
    selected: RwSignal<Option<i64>>,
    datasets: Loaded<DatasetSummary>,
    runs: Loaded<RunSummary>,
    adapters: Loaded<AdapterSummary>,
    templates: Loaded<TemplateRecord>,
    evaluations: Loaded<EvalReport>,
) -> impl IntoView {
    let ctx = AppCtx::get();
    let model = Memo::new(move |_| {
        let want = selected.get()?;
        ctx.models.with(|l| match l {
            Some(Ok(items)) => items.iter().find(|m| m.id == want).cloned(),
            _ => None,
        })
    });
    let dataset = pick(datasets, selected, |d| d.id);
    let run = pick(runs, selected, |r| r.id);
    let adapter = pick(adapters, selected, |a| a.id);
    let template = pick(templates, selected, |t| t.id);
    let evaluation = pick(evaluations, selected, |e| e.id);
    let dataset_name = move |id: Option<i64>| -> String {
        let Some(id) = id else {
            return "—".into();
        };
        datasets.with(|l| match l {
            Some(Ok(items)) => items
                .iter()
                .find(|d| d.id == id)
                .map(|d| d.name.clone())
                .unwrap_or_else(|| format!("dataset #{id}")),
            _ => format!("dataset #{id}"),
        })
    };

    let body = move || {
        let none = || view! { <p class="empty">"Select a row to see its details."</p> }.into_any();
        match tab.get() {
            Tab::Models => model
                .get()
                .map(|m| view! { <ModelDetails model=m selected=selected /> }.into_any())
                .unwrap_or_else(none),
            Tab::Datasets => dataset
                .get()
                .map(|d| view! { <DatasetDetails dataset=d selected=selected /> }.into_any())
                .unwrap_or_else(none),
            Tab::Runs => run
                .get()
                .map(|r| view! { <RunDetails run=r selected=selected /> }.into_any())
                .unwrap_or_else(none),
            Tab::Adapters => adapter
                .get()
                .map(|a| {
                    let ds = dataset_name(a.dataset_id);
                    view! { <AdapterDetails adapter=a dataset=ds selected=selected /> }.into_any()
                })
                .unwrap_or_else(none),
            Tab::Templates => template
                .get()
                .map(|t| view! { <TemplateDetails template=t selected=selected /> }.into_any())
                .unwrap_or_else(none),
            Tab::Evaluations => evaluation
                .get()
                .map(|e| {
                    let ds = dataset_name(Some(e.dataset_id));
                    eval_details(e, ds).into_any()
                })
                .unwrap_or_else(none),
        }
    };
    view! { <aside class="card library-details" id="library-details" data-testid="library-details">{body}</aside> }
}

/// Runs a removal; on success clears the selection and reloads the library.
fn remove(
    selected: RwSignal<Option<i64>>,
    error: RwSignal<Option<IpcError>>,
    op: impl std::future::Future<Output = Result<(), IpcError>> + 'static,
) {
    let ctx = AppCtx::get();
    error.set(None);
    spawn_local(async move {
        match op.await {
            Ok(()) => {
                selected.set(None);
                ctx.library_changed();
            }
            Err(e) => error.set(Some(e)),
        }
    });
}

#[component]
fn ModelDetails(model: ModelSummary, selected: RwSignal<Option<i64>>) -> impl IntoView {
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let id = model.id;
    view! {
        <h2>{model.name.clone()}</h2>
        <dl class="facts">
            {item("Family", model.family.clone())}
            {item("Architecture", model.architecture.clone())}
            {item("Can", view! { <span id="model-support">{format::support(&model.support)}</span> })}
            {item("Parameters", format::parameters(model.parameters))}
            {item("Quantization", model.quantization.clone())}
            {item("Context", format::context(model.context_length))}
            {item("File size", format::bytes(model.file_size))}
            {item("SHA-256", view! { <code class="sha256 selectable" id="model-sha256">{model.sha256.clone()}</code> })}
            {item("Source", view! { <code class="selectable">{format::source(&model.source)}</code> })}
            {item("Added", logic::short_date(&model.added_at))}
        </dl>
        <div class="row actions">
            <ConfirmButton
                label="Delete model"
                id="delete-model"
                on_confirm=Callback::new(move |_| remove(selected, error, ipc::models::remove_model(id)))
            />
        </div>
        {(!model.support.limits.is_empty()).then(|| view! {
            <ul class="limits" id="model-limits">
                {model.support.limits.iter().map(|l| view! { <li>{l.clone()}</li> }).collect_view()}
            </ul>
        })}
        <p class="muted">"Deleting removes the model from the library; its files stay on disk."</p>
        {move || error.get().map(|e| error_note(&e))}
        <ExportDialog subject=ExportSubject::Model { model: id.to_string() } name=model.name.clone() />
    }
}

#[component]
fn DatasetDetails(dataset: DatasetSummary, selected: RwSignal<Option<i64>>) -> impl IntoView {
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let id = dataset.id;
    let split = RwSignal::new(SplitName::Train);
    let offset = RwSignal::new(0usize);
    let rows: RwSignal<Option<Result<Vec<PreviewRow>, IpcError>>> = RwSignal::new(None);
    let split_rows = move |s: SplitName, d: &DatasetSummary| match s {
        SplitName::Train => d.train_rows,
        SplitName::Valid => d.valid_rows,
        SplitName::Test => d.test_rows,
    };
    let counts = dataset.clone();
    Effect::new(move |_| {
        let (s, o) = (split.get(), offset.get());
        rows.set(None);
        spawn_local(async move {
            let result = ipc::datasets::dataset_rows(id, s, o, PAGE_ROWS).await;
            if split.get_untracked() == s && offset.get_untracked() == o {
                rows.set(Some(result));
            }
        });
    });
    let stats_model: RwSignal<Option<i64>> = RwSignal::new(None);
    let stats: RwSignal<Option<Result<DatasetStats, IpcError>>> = RwSignal::new(None);
    let stats_busy = RwSignal::new(false);
    let compute = move |_| {
        let Some(model_id) = stats_model.get_untracked() else {
            return;
        };
        stats_busy.set(true);
        spawn_local(async move {
            let r = ipc::datasets::dataset_stats(id, model_id, 1024, LossOn::Assistant).await;
            stats.set(Some(r));
            stats_busy.set(false);
        });
    };
    let total = move || split_rows(split.get(), &counts);
    view! {
        <h2>{dataset.name.clone()}</h2>
        <dl class="facts">
            {item("Format", format!("{} ({} rows)", dataset.format.as_str(), dataset.kind.as_str()))}
            {item("Rows", format!("train {} · valid {} · test {}", dataset.train_rows, dataset.valid_rows, dataset.test_rows))}
            {item("Duplicates removed", dataset.duplicates_removed.to_string())}
            {item("Bad rows skipped", dataset.bad_rows_skipped.to_string())}
            {item("Content hash", view! { <code class="sha256 selectable">{dataset.content_hash.clone()}</code> })}
            {item("Source", view! { <code class="selectable">{dataset.source_path.clone()}</code> })}
            {item("Split", split_text(&dataset.split))}
            {item("Imported", logic::short_date(&dataset.created_at))}
        </dl>
        <div class="row actions">
            <ConfirmButton
                label="Delete dataset"
                id="delete-dataset"
                on_confirm=Callback::new(move |_| remove(selected, error, ipc::datasets::remove_dataset(id)))
            />
        </div>
        {move || error.get().map(|e| error_note(&e))}
        <h3>"Rows"</h3>
        <div class="row">
            <select
                id="dataset-rows-split"
                on:change=move |ev| {
                    if let Some(s) = SplitName::parse(&event_target_value(&ev)) {
                        offset.set(0);
                        split.set(s);
                    }
                }
                prop:value=move || split.get().as_str()
            >
                {SplitName::ALL.into_iter().map(|s| view! { <option value=s.as_str()>{s.as_str()}</option> }).collect_view()}
            </select>
            <button class="secondary" id="dataset-rows-prev" disabled=move || offset.get() == 0
                on:click=move |_| offset.update(|o| *o = o.saturating_sub(PAGE_ROWS))>"← Previous"</button>
            <span class="muted">{move || {
                let t = total();
                let o = offset.get();
                if t == 0 { "No rows".to_string() } else { format!("Rows {}–{} of {t}", o + 1, (o + PAGE_ROWS).min(t as usize)) }
            }}</span>
            <button class="secondary" id="dataset-rows-next"
                disabled=move || offset.get() + PAGE_ROWS >= total() as usize
                on:click=move |_| offset.update(|o| *o += PAGE_ROWS)>"Next →"</button>
        </div>
        <div class="dataset-rows" id="dataset-rows">
            {move || match rows.get() {
                None => view! { <p class="muted">"Loading…"</p> }.into_any(),
                Some(Err(e)) => error_note(&e).into_any(),
                Some(Ok(list)) => list.into_iter().map(|r| view! {
                    <div class="preview-row">
                        <span class="muted line">{format!("line {}", r.line)}
                            {r.label.map(|l| format!(" · label {l}"))}</span>
                        {sample_view(&r.sample)}
                    </div>
                }).collect_view().into_any(),
            }}
        </div>
        <h3>"Token statistics"</h3>
        <div class="row">
            <ModelSelect selected=stats_model id="library-stats-model" />
            <button class="secondary" id="library-stats" disabled=move || stats_busy.get() || stats_model.get().is_none() on:click=compute>
                {move || if stats_busy.get() { "Counting…" } else { "Count tokens (max 1024)" }}
            </button>
        </div>
        {move || stats.get().map(|r| match r {
            Ok(s) => stats_table(&s).into_any(),
            Err(e) => error_note(&e).into_any(),
        })}
    }
}

#[component]
fn RunDetails(run: RunSummary, selected: RwSignal<Option<i64>>) -> impl IntoView {
    let ctx = AppCtx::get();
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let id = run.id;
    let date = |d: &Option<String>| {
        d.as_deref()
            .map(logic::short_date)
            .unwrap_or_else(|| "—".into())
    };
    view! {
        <h2>{run.name.clone()}</h2>
        <dl class="facts">
            {item("Status", view! { <span class=format!("pill status-{}", run.status.as_str())>{run.status.as_str()}</span> })}
            {item("Method", run.method.clone())}
            {item("Model", run.model.clone())}
            {item("Dataset", run.dataset.clone())}
            {item("Steps", format!("{} of {}", run.step, run.total_steps))}
            {item("Created", logic::short_date(&run.created_at))}
            {item("Started", date(&run.started_at))}
            {item("Finished", date(&run.finished_at))}
        </dl>
        {run.error.clone().map(|e| view! { <div class="notice error run-error">{e}</div> })}
        <div class="row actions">
            <button id="open-in-monitor" on:click=move |_| { ctx.focus_run.set(Some(id)); ctx.go(Page::Runs); }>
                "Open in monitor"
            </button>
            <ConfirmButton
                label="Delete run"
                id="delete-run"
                on_confirm=Callback::new(move |_| remove(selected, error, ipc::runs::remove_run(id)))
            />
        </div>
        <p class="muted">"Deleting removes the run and its metrics; its adapter stays."</p>
        {move || error.get().map(|e| error_note(&e))}
    }
}

#[component]
fn AdapterDetails(
    adapter: AdapterSummary,
    dataset: String,
    selected: RwSignal<Option<i64>>,
) -> impl IntoView {
    let ctx = AppCtx::get();
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let note: RwSignal<Option<String>> = RwSignal::new(None);
    let id = adapter.id;
    let export_dir = RwSignal::new(String::new());
    let merge_name = RwSignal::new(format!("{}-merged", adapter.name));
    let busy = RwSignal::new(false);
    let m = adapter.metrics.clone();
    let forgetting = m.forgetting_warning.clone();

    let browse = move |_| {
        spawn_local(async move {
            match ipc::models::pick_path("Export the adapter into this folder", true, &[]).await {
                Ok(Some(p)) => export_dir.set(p),
                Ok(None) => {}
                Err(e) => error.set(Some(e)),
            }
        });
    };
    let export = move |_| {
        let dir = export_dir.get_untracked().trim().to_string();
        if dir.is_empty() {
            return;
        }
        busy.set(true);
        error.set(None);
        note.set(None);
        spawn_local(async move {
            match ipc::adapters::export_adapter(id, &dir).await {
                Ok(written) => note.set(Some(format!("Exported to {written}"))),
                Err(e) => error.set(Some(e)),
            }
            busy.set(false);
        });
    };
    let merge = move |_| {
        let name = merge_name.get_untracked().trim().to_string();
        busy.set(true);
        error.set(None);
        note.set(Some("Merging… this can take a minute.".into()));
        spawn_local(async move {
            match ipc::adapters::merge_adapter(id, (!name.is_empty()).then_some(name.as_str()))
                .await
            {
                Ok(model) => {
                    note.set(Some(format!("Merged into a new model: {}", model.name)));
                    ctx.library_changed();
                }
                Err(e) => {
                    note.set(None);
                    error.set(Some(e));
                }
            }
            busy.set(false);
        });
    };
    let chat = move |_| {
        if let Ok(json) = serde_json::to_string(&ChatTarget::Adapter { adapter_id: id }) {
            ctx.set_setting("playground.open", json);
        }
        ctx.go(Page::Playground);
    };
    let is_lora = adapter.kind == AdapterKind::Lora;
    view! {
        <h2>{adapter.name.clone()}</h2>
        <dl class="facts">
            {item("Kind", adapter.kind.as_str())}
            {item("Base model", adapter.base_model.clone())}
            {item("Dataset", dataset)}
            {item("Run", adapter.run_id.map(|r| format!("#{r}")).unwrap_or_else(|| "imported".into()))}
            {item("Path", view! { <code class="selectable">{adapter.path.clone()}</code> })}
            {item("Created", logic::short_date(&adapter.created_at))}
            {item("Steps", m.steps.to_string())}
            {item("Eval NLL", logic::before_after(m.eval_nll_before, m.eval_nll_after))}
            {item("General NLL", logic::before_after(m.general_nll_before, m.general_nll_after))}
        </dl>
        {forgetting.map(|w| view! { <div class="notice warning forgetting" id="forgetting-warning">{w}</div> })}
        <div class="row actions">
            <button id="chat-with-adapter" on:click=chat>"Chat with it"</button>
            <ConfirmButton
                label="Delete adapter"
                id="delete-adapter"
                on_confirm=Callback::new(move |_| remove(selected, error, ipc::adapters::remove_adapter(id)))
            />
        </div>
        <h3>"Export"</h3>
        <ExportDialog subject=ExportSubject::Adapter { adapter: id.to_string() } name=adapter.name.clone() />
        <p class="muted">"Or copy the adapter as it is stored (PEFT's format; the only one a soft prompt fits):"</p>
        <div class="row">
            <input type="text" id="export-dir" placeholder="/path/to/folder"
                prop:value=move || export_dir.get()
                on:input=move |ev| export_dir.set(event_target_value(&ev)) />
            <button class="secondary" id="export-browse" on:click=browse>"Choose folder…"</button>
            <button id="export-adapter" disabled=move || busy.get() || export_dir.get().trim().is_empty() on:click=export>"Export"</button>
        </div>
        {is_lora.then(|| view! {
            <h3>"Merge into the base model"</h3>
            <Field label="New model name" hint="The merged weights are registered as a new model; the adapter stays.">
                <input type="text" id="merge-name"
                    prop:value=move || merge_name.get()
                    on:input=move |ev| merge_name.set(event_target_value(&ev)) />
            </Field>
            <div class="row">
                <button id="merge-adapter" disabled=move || busy.get() on:click=merge>"Merge into base"</button>
            </div>
        })}
        {move || note.get().map(|n| view! { <div class="notice" data-testid="notice">{n}</div> })}
        {move || error.get().map(|e| error_note(&e))}
    }
}

#[component]
fn TemplateDetails(template: TemplateRecord, selected: RwSignal<Option<i64>>) -> impl IntoView {
    let ctx = AppCtx::get();
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let id = template.id;
    let system = template
        .system
        .as_deref()
        .map(|s| logic::excerpt(s, 400))
        .unwrap_or_else(|| "(none)".into());
    view! {
        <h2>{template.name.clone()}</h2>
        <dl class="facts">
            {item("Version", format!("v{}", template.version))}
            {item("Versions", template.versions.to_string())}
            {item("Examples", (template.examples.len() / 2).to_string())}
            {item("Saved", logic::short_date(&template.created_at))}
        </dl>
        <h3>"System prompt"</h3>
        <pre class="excerpt">{system}</pre>
        <div class="row actions">
            <button id="edit-template" on:click=move |_| { ctx.set_setting("templates.open", id.to_string()); ctx.go(Page::Templates); }>
                "Edit"
            </button>
            <ConfirmButton
                label="Delete template"
                id="delete-template"
                on_confirm=Callback::new(move |_| remove(selected, error, ipc::templates::remove_template(id)))
            />
        </div>
        {move || error.get().map(|e| error_note(&e))}
    }
}

/// An evaluation's figures (evaluations are records: nothing to act on).
fn eval_details(e: EvalReport, dataset: String) -> impl IntoView {
    let accuracy = e
        .accuracy
        .map(|a| format!("{:.1}% of {} labeled rows", a * 100.0, e.n_labeled))
        .unwrap_or_else(|| "—".into());
    view! {
        <h2>{e.subject.clone()}</h2>
        <dl class="facts">
            {item("Subject", format!("{} ({})", e.subject, e.subject_kind))}
            {item("Dataset", dataset)}
            {item("Split", format!("{} · {} rows · {} tokens", e.split.as_str(), e.n_rows, e.n_tokens))}
            {item("NLL", format!("{:.3}", e.mean_nll))}
            {item("Perplexity", format!("{:.2}", e.ppl))}
            {item("Accuracy", accuracy)}
            {item("Forgetting", logic::before_after(e.base_forgetting_nll, e.forgetting_nll))}
            {item("Recorded", logic::short_date(&e.created_at))}
        </dl>
        {e.forgetting_warning.clone().map(|w| view! { <div class="notice warning forgetting">{w}</div> })}
    }
}
