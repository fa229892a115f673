//! The dataset import wizard: pick a file, check the detected format and a preview
//! rendered through a model's chat template, map CSV columns, review the rows that
//! failed validation, choose the split and the name, import, then see the token
//! statistics. Also the sample / statistics views the library reuses.

use crate::components::{error_note, Field, ModelSelect};
use crate::{ipc, AppCtx, Page};
use attune_protocol::ErrorCode;
use attune_protocol::{
    ColumnMap, DatasetFormat, DatasetPreview, DatasetStats, DatasetSummary, ImportOptions,
    IpcError, LossOn, RowSample, Split,
};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// The wizard's form as plain values (what the inputs hold).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WizardForm {
    pub name: String,
    /// "" lets Attune detect the format.
    pub format: String,
    pub paragraphs: bool,
    pub columns: ColumnMap,
    /// "seeded", "all_train" or "files".
    pub split_mode: String,
    pub valid_percent: String,
    pub test_percent: String,
    pub seed: String,
    pub valid_path: String,
    pub test_path: String,
    pub accept_bad_rows: bool,
}

/// A percentage from 0 to 100 typed in `what`, as a fraction.
pub fn parse_percent(text: &str, what: &str) -> Result<f64, String> {
    let t = text.trim().trim_end_matches('%').trim();
    let t = if t.is_empty() { "0" } else { t };
    match t.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=100.0).contains(&v) => Ok(v / 100.0),
        _ => Err(format!(
            "The {what} share must be a number from 0 to 100 (got “{}”).",
            text.trim()
        )),
    }
}

/// `None` for an empty text, the trimmed text otherwise.
fn opt(text: &str) -> Option<String> {
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// The import options the form describes, or what is wrong with it.
pub fn build_options(form: &WizardForm) -> Result<ImportOptions, String> {
    let format = match form.format.trim() {
        "" => None,
        f => Some(DatasetFormat::parse(f).ok_or_else(|| format!("Unknown dataset format “{f}”."))?),
    };
    let split = match form.split_mode.as_str() {
        "all_train" => Split::AllTrain,
        "files" => Split::Files {
            valid_path: opt(&form.valid_path),
            test_path: opt(&form.test_path),
        },
        _ => {
            let valid = parse_percent(&form.valid_percent, "validation")?;
            let test = parse_percent(&form.test_percent, "test")?;
            if valid + test >= 1.0 {
                return Err("The validation and test shares must leave rows for training (together under 100%).".into());
            }
            let seed_text = form.seed.trim();
            let seed = if seed_text.is_empty() {
                42
            } else {
                seed_text
                    .parse::<u64>()
                    .map_err(|_| format!("The seed must be a whole number (got “{seed_text}”)."))?
            };
            Split::Seeded {
                valid_fraction: valid,
                test_fraction: test,
                seed,
            }
        }
    };
    let clean = |c: &Option<String>| c.as_deref().and_then(opt);
    Ok(ImportOptions {
        name: opt(&form.name),
        format,
        columns: ColumnMap {
            prompt: clean(&form.columns.prompt),
            response: clean(&form.columns.response),
            system: clean(&form.columns.system),
            label: clean(&form.columns.label),
            id: clean(&form.columns.id),
            text: clean(&form.columns.text),
        },
        paragraphs: form.paragraphs,
        split,
        accept_bad_rows: form.accept_bad_rows,
        preview_rows: 5,
    })
}

/// Whether `path` looks like a CSV/TSV file.
pub fn is_csv_path(path: &str) -> bool {
    let lower = path.trim().to_lowercase();
    lower.ends_with(".csv") || lower.ends_with(".tsv")
}

/// A split setting in words.
pub fn split_text(split: &Split) -> String {
    match split {
        Split::Seeded {
            valid_fraction,
            test_fraction,
            seed,
        } => format!(
            "shuffled (seed {seed}): {:.0}% valid, {:.0}% test",
            valid_fraction * 100.0,
            test_fraction * 100.0
        ),
        Split::AllTrain => "all rows train".into(),
        Split::Files {
            valid_path,
            test_path,
        } => format!(
            "own files: valid {}, test {}",
            valid_path.as_deref().unwrap_or("none"),
            test_path.as_deref().unwrap_or("none")
        ),
    }
}

/// A normalized row: its turns (role and content) or its text.
pub fn sample_view(sample: &RowSample) -> AnyView {
    match sample {
        RowSample::Chat { messages } => view! {
            <div class="sample chat-sample">
                {messages.iter().map(|m| view! {
                    <div class=format!("turn role-{}", m.role)>
                        <span class="turn-role">{m.role.clone()}</span>
                        <div class="turn-content">{m.content.clone()}</div>
                    </div>
                }).collect_view()}
            </div>
        }
        .into_any(),
        RowSample::Text { text } => {
            view! { <div class="sample text-sample">{text.clone()}</div> }.into_any()
        }
    }
}

/// Token statistics per split.
pub fn stats_table(stats: &DatasetStats) -> impl IntoView {
    let rows = stats
        .splits
        .iter()
        .map(|s| {
            view! {
                <tr data-split=s.split.as_str()>
                    <td>{s.split.as_str()}</td>
                    <td class="num">{s.rows}</td>
                    <td class="num">{s.tokens_min}</td>
                    <td class="num">{format!("{:.1}", s.tokens_mean)}</td>
                    <td class="num">{s.tokens_max}</td>
                    <td class="num">{s.tokens_total}</td>
                    <td class="num">{s.target_tokens}</td>
                    <td class="num">{s.truncated_rows}</td>
                </tr>
            }
        })
        .collect_view();
    view! {
        <div class="stats-block">
            <p class="muted">{format!("Tokens under {} (rows cut at {} tokens).", stats.model, stats.max_len)}</p>
            <table class="data stats-table">
                <thead><tr>
                    <th>"Split"</th><th>"Rows"</th><th>"Min"</th><th>"Mean"</th><th>"Max"</th>
                    <th>"Total"</th><th>"Target tokens"</th><th>"Truncated rows"</th>
                </tr></thead>
                <tbody>{rows}</tbody>
            </table>
        </div>
    }
}

/// The wizard's inputs, as signals.
#[derive(Clone, Copy)]
struct Form {
    path: RwSignal<String>,
    name: RwSignal<String>,
    format: RwSignal<String>,
    paragraphs: RwSignal<bool>,
    columns: RwSignal<ColumnMap>,
    split_mode: RwSignal<String>,
    valid_percent: RwSignal<String>,
    test_percent: RwSignal<String>,
    seed: RwSignal<String>,
    valid_path: RwSignal<String>,
    test_path: RwSignal<String>,
    accept_bad_rows: RwSignal<bool>,
}

impl Form {
    fn new() -> Self {
        Form {
            path: RwSignal::new(String::new()),
            name: RwSignal::new(String::new()),
            format: RwSignal::new(String::new()),
            paragraphs: RwSignal::new(false),
            columns: RwSignal::new(ColumnMap::default()),
            split_mode: RwSignal::new("seeded".into()),
            valid_percent: RwSignal::new("10".into()),
            test_percent: RwSignal::new("0".into()),
            seed: RwSignal::new("42".into()),
            valid_path: RwSignal::new(String::new()),
            test_path: RwSignal::new(String::new()),
            accept_bad_rows: RwSignal::new(false),
        }
    }

    fn snapshot(&self) -> WizardForm {
        WizardForm {
            name: self.name.get_untracked(),
            format: self.format.get_untracked(),
            paragraphs: self.paragraphs.get_untracked(),
            columns: self.columns.get_untracked(),
            split_mode: self.split_mode.get_untracked(),
            valid_percent: self.valid_percent.get_untracked(),
            test_percent: self.test_percent.get_untracked(),
            seed: self.seed.get_untracked(),
            valid_path: self.valid_path.get_untracked(),
            test_path: self.test_path.get_untracked(),
            accept_bad_rows: self.accept_bad_rows.get_untracked(),
        }
    }

    /// Back to an empty form (keeps nothing of the last file).
    fn reset(&self) {
        let fresh = Form::new();
        self.path.set(String::new());
        self.name.set(String::new());
        self.format.set(String::new());
        self.paragraphs.set(false);
        self.columns.set(ColumnMap::default());
        self.split_mode.set(fresh.split_mode.get_untracked());
        self.valid_percent.set(fresh.valid_percent.get_untracked());
        self.test_percent.set(fresh.test_percent.get_untracked());
        self.seed.set(fresh.seed.get_untracked());
        self.valid_path.set(String::new());
        self.test_path.set(String::new());
        self.accept_bad_rows.set(false);
    }
}

/// A local (not IPC) problem with the form, in the error shape.
fn form_error(message: String) -> IpcError {
    IpcError {
        code: ErrorCode::InvalidInput,
        message,
    }
}

/// The dataset import wizard.
#[component]
pub fn DatasetWizard() -> impl IntoView {
    let ctx = AppCtx::get();
    let form = Form::new();
    let preview: RwSignal<Option<DatasetPreview>> = RwSignal::new(None);
    let headers: RwSignal<Vec<String>> = RwSignal::new(Vec::new());
    let inspect_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let file_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let inspecting = RwSignal::new(false);
    let generation = RwSignal::new(0u64);
    let model: RwSignal<Option<i64>> = RwSignal::new(None);
    let rendered: RwSignal<Vec<Option<Result<String, IpcError>>>> = RwSignal::new(Vec::new());
    let importing = RwSignal::new(false);
    let import_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let imported: RwSignal<Option<DatasetSummary>> = RwSignal::new(None);
    let stats: RwSignal<Option<Result<DatasetStats, IpcError>>> = RwSignal::new(None);

    let inspect = move || {
        let path = form.path.get_untracked().trim().to_string();
        if path.is_empty() {
            file_error.set(Some(form_error("Choose a dataset file first.".into())));
            return;
        }
        let options = match build_options(&form.snapshot()) {
            Ok(o) => o,
            Err(m) => {
                inspect_error.set(Some(form_error(m)));
                return;
            }
        };
        let gen = generation.get_untracked() + 1;
        generation.set(gen);
        inspecting.set(true);
        file_error.set(None);
        inspect_error.set(None);
        spawn_local(async move {
            let result = ipc::datasets::inspect_dataset(&path, &options).await;
            if generation.get_untracked() != gen {
                return;
            }
            match result {
                Ok(p) => {
                    if !p.headers.is_empty() {
                        headers.set(p.headers.clone());
                    } else if p.format != DatasetFormat::Csv {
                        headers.set(Vec::new());
                    }
                    let other_file = preview
                        .with_untracked(|old| old.as_ref().is_some_and(|old| old.path != p.path));
                    if other_file || form.name.get_untracked().trim().is_empty() {
                        form.name.set(p.name.clone());
                    }
                    preview.set(Some(p));
                }
                Err(e) => {
                    let csv = form.format.get_untracked() == "csv"
                        || (form.format.get_untracked().is_empty() && is_csv_path(&path));
                    if csv {
                        // Offer the column mapping even though the guess did not fit.
                        if let Ok(h) = ipc::datasets::csv_headers(&path).await {
                            if generation.get_untracked() == gen {
                                headers.set(h);
                            }
                        }
                    }
                    if preview.get_untracked().is_none() {
                        file_error.set(Some(e));
                    } else {
                        inspect_error.set(Some(e));
                    }
                }
            }
            inspecting.set(false);
        });
    };

    // A dataset dropped on the window (or opened from elsewhere).
    Effect::new(move |_| {
        let open = ctx.settings.with(|s| s.get("datasets.open").cloned());
        if let Some(path) = open.filter(|p| !p.trim().is_empty()) {
            ctx.set_setting("datasets.open", String::new());
            form.reset();
            preview.set(None);
            headers.set(Vec::new());
            imported.set(None);
            stats.set(None);
            import_error.set(None);
            form.path.set(path);
            inspect();
        }
    });

    // Render the preview rows through the chosen model's chat template.
    Effect::new(move |_| {
        let rows = preview.with(|p| p.as_ref().map(|p| p.rows.clone()).unwrap_or_default());
        let Some(model_id) = model.get() else {
            rendered.set(Vec::new());
            return;
        };
        rendered.set(vec![None; rows.len()]);
        for (i, row) in rows.into_iter().enumerate() {
            spawn_local(async move {
                let r = ipc::datasets::render_sample(model_id, &row.sample).await;
                if model.get_untracked() == Some(model_id) {
                    rendered.update(|v| {
                        if let Some(slot) = v.get_mut(i) {
                            *slot = Some(r);
                        }
                    });
                }
            });
        }
    });

    // Token statistics of the imported dataset under the chosen model.
    Effect::new(move |_| {
        let Some(id) = imported.with(|d| d.as_ref().map(|d| d.id)) else {
            return;
        };
        let Some(model_id) = model.get() else {
            return;
        };
        stats.set(None);
        spawn_local(async move {
            let r = ipc::datasets::dataset_stats(id, model_id, 1024, LossOn::Assistant).await;
            if model.get_untracked() == Some(model_id) {
                stats.set(Some(r));
            }
        });
    });

    let browse = move |_| {
        spawn_local(async move {
            match ipc::models::pick_path(
                "Choose a dataset",
                false,
                &["jsonl", "json", "csv", "tsv", "txt"],
            )
            .await
            {
                Ok(Some(p)) => {
                    form.path.set(p);
                    form.name.set(String::new());
                    preview.set(None);
                    inspect();
                }
                Ok(None) => {}
                Err(e) => file_error.set(Some(e)),
            }
        });
    };

    let import = move |_| {
        let Some(p) = preview.get_untracked() else {
            return;
        };
        if p.bad_row_count > 0 && !form.accept_bad_rows.get_untracked() {
            import_error.set(Some(form_error(format!(
                "{} rows are bad: tick “Import the good rows and skip the bad ones” to go on, or fix the file.",
                p.bad_row_count
            ))));
            return;
        }
        let options = match build_options(&form.snapshot()) {
            Ok(o) => o,
            Err(m) => {
                import_error.set(Some(form_error(m)));
                return;
            }
        };
        let path = form.path.get_untracked().trim().to_string();
        importing.set(true);
        import_error.set(None);
        spawn_local(async move {
            match ipc::datasets::import_dataset(&path, &options).await {
                Ok(d) => {
                    imported.set(Some(d));
                    ctx.library_changed();
                }
                Err(e) => import_error.set(Some(e)),
            }
            importing.set(false);
        });
    };

    let another = move |_| {
        form.reset();
        preview.set(None);
        headers.set(Vec::new());
        imported.set(None);
        stats.set(None);
        import_error.set(None);
        inspect_error.set(None);
        file_error.set(None);
    };

    let column_select = move |label: &'static str, key: &'static str| {
        let get = move |c: &ColumnMap| -> Option<String> {
            match key {
                "prompt" => c.prompt.clone(),
                "response" => c.response.clone(),
                "system" => c.system.clone(),
                "label" => c.label.clone(),
                "id" => c.id.clone(),
                _ => c.text.clone(),
            }
        };
        view! {
            <Field label=label>
                <select
                    id=format!("column-{key}")
                    prop:value=move || form.columns.with(|c| get(c).unwrap_or_default())
                    on:change=move |ev| {
                        let v = opt(&event_target_value(&ev));
                        form.columns.update(|c| match key {
                            "prompt" => c.prompt = v,
                            "response" => c.response = v,
                            "system" => c.system = v,
                            "label" => c.label = v,
                            "id" => c.id = v,
                            _ => c.text = v,
                        });
                        inspect();
                    }
                >
                    <option value="">"(guess / none)"</option>
                    {move || {
                        let current = form.columns.with(|c| get(c));
                        headers.get().into_iter().map(|h| {
                            let sel = current.as_deref() == Some(h.as_str());
                            view! { <option value=h.clone() selected=sel>{h.clone()}</option> }
                        }).collect_view()
                    }}
                </select>
            </Field>
        }
    };

    let step_class = move |n: u8| {
        move || {
            let reached = match n {
                1 => true,
                2..=4 => preview.get().is_some(),
                _ => imported.get().is_some(),
            };
            if reached {
                "step reached"
            } else {
                "step"
            }
        }
    };

    view! {
        <section class="page datasets-page" id="datasets-page">
            <h1>"Import a dataset"</h1>
            <ol class="wizard-steps">
                <li class=step_class(1)>"File"</li>
                <li class=step_class(2)>"Format & preview"</li>
                <li class=step_class(3)>"Problems"</li>
                <li class=step_class(4)>"Split & name"</li>
                <li class=step_class(5)>"Done"</li>
            </ol>
            {move || imported.get().map(|d| {
                let id = d.id;
                view! {
                    <div class="card wizard-done" id="dataset-done">
                        <h2>{format!("Imported {}", d.name)}</h2>
                        <p id="split-counts-final">{format!(
                            "{} train · {} valid · {} test rows ({} duplicates removed, {} bad rows skipped)",
                            d.train_rows, d.valid_rows, d.test_rows, d.duplicates_removed, d.bad_rows_skipped
                        )}</p>
                        <div class="row">
                            <span class="field-label">"Token statistics for"</span>
                            <ModelSelect selected=model id="stats-model" />
                        </div>
                        <div id="dataset-stats" data-testid="dataset-stats">
                            {move || match stats.get() {
                                None => view! { <p class="muted">"Counting tokens…"</p> }.into_any(),
                                Some(Ok(s)) => stats_table(&s).into_any(),
                                Some(Err(e)) => error_note(&e).into_any(),
                            }}
                        </div>
                        <div class="row">
                            <button id="adapt-with-dataset" on:click=move |_| { ctx.focus_dataset.set(Some(id)); ctx.go(Page::Adapt); }>
                                "Adapt a model with it"
                            </button>
                            <button class="secondary" id="import-another" on:click=another>"Import another"</button>
                        </div>
                    </div>
                }
            })}
            <div class="card wizard-step" style:display=move || if imported.get().is_some() { "none" } else { "" }>
                <h2>"1. File"</h2>
                <Field label="Dataset file" hint="JSONL (chat, ShareGPT, Alpaca), CSV/TSV or plain text. You can also drop a file on the window.">
                    <input type="text" id="dataset-path" placeholder="/path/to/data.jsonl"
                        prop:value=move || form.path.get()
                        on:input=move |ev| form.path.set(event_target_value(&ev))
                        on:keydown=move |ev| if ev.key() == "Enter" { inspect() } />
                </Field>
                <div class="row">
                    <button class="secondary" id="dataset-browse" on:click=browse>"Browse…"</button>
                    <button id="dataset-inspect" disabled=move || inspecting.get() || form.path.get().trim().is_empty()
                        on:click=move |_| inspect()>
                        {move || if inspecting.get() { "Reading…" } else { "Inspect" }}
                    </button>
                </div>
                {move || file_error.get().map(|e| error_note(&e))}
            </div>
            {move || {
                let show_mapping = !headers.get().is_empty()
                    && (form.format.get() == "csv" || preview.with(|p| p.as_ref().is_some_and(|p| p.format == DatasetFormat::Csv))
                        || (form.format.get().is_empty() && is_csv_path(&form.path.get())));
                (preview.get().is_some() || show_mapping).then_some(())
                    .filter(|_| imported.get().is_none())
                    .map(|_| view! {
                        <div class="card wizard-step">
                            <h2>"2. Format & preview"</h2>
                            <div class="grid-2">
                                <Field label="Format" hint="Detected from the file; change it if the guess is wrong.">
                                    <select id="dataset-format"
                                        prop:value=move || form.format.get()
                                        on:change=move |ev| { form.format.set(event_target_value(&ev)); inspect(); }>
                                        <option value="">"Detect"</option>
                                        {DatasetFormat::ALL.into_iter().map(|f| view! {
                                            <option value=f.as_str() selected=move || form.format.get() == f.as_str()>{f.as_str()}</option>
                                        }).collect_view()}
                                    </select>
                                </Field>
                                <div>
                                    <span class="field-label">"Detected"</span>
                                    <p id="detected-format" data-testid="detected-format">{move || preview.get().map(|p| format!(
                                        "{} ({} rows){}", p.format.as_str(), p.kind.as_str(),
                                        if p.format_detected { ", detected" } else { ", as chosen" }
                                    )).unwrap_or_else(|| "—".into())}</p>
                                </div>
                            </div>
                            {move || (form.format.get() == "text" || preview.with(|p| p.as_ref().is_some_and(|p| p.format == DatasetFormat::Text))).then(|| view! {
                                <label class="check">
                                    <input type="checkbox" id="text-paragraphs"
                                        prop:checked=move || form.paragraphs.get()
                                        on:change=move |ev| { form.paragraphs.set(event_target_checked(&ev)); inspect(); } />
                                    " One document per paragraph (blank-line separated) instead of per line"
                                </label>
                            })}
                            {show_mapping.then(|| view! {
                                <h3>"Columns"</h3>
                                <div class="grid-3 column-map" id="column-map">
                                    {column_select("Prompt", "prompt")}
                                    {column_select("Response", "response")}
                                    {column_select("System", "system")}
                                    {column_select("Label", "label")}
                                    {column_select("Id", "id")}
                                    {column_select("Text", "text")}
                                </div>
                            })}
                            {move || inspect_error.get().map(|e| error_note(&e))}
                            <div class="row">
                                <span class="field-label">"Render with"</span>
                                <ModelSelect selected=model id="dataset-preview-model" />
                            </div>
                            <div class="preview-rows" id="preview-rows" data-testid="preview-rows">
                                {move || preview.get().map(|p| p.rows.into_iter().enumerate().map(|(i, r)| view! {
                                    <div class="preview-row grid-2" data-testid="preview-row">
                                        <div>
                                            <span class="muted line">{format!("line {}", r.line)}
                                                {r.label.clone().map(|l| format!(" · label {l}"))}</span>
                                            {sample_view(&r.sample)}
                                        </div>
                                        <div>
                                            {move || match rendered.with(|v| v.get(i).cloned().flatten()) {
                                                None => view! { <pre class="rendered muted">"Rendering…"</pre> }.into_any(),
                                                Some(Ok(t)) => view! { <pre class="rendered" data-testid="rendered-preview" id=(i == 0).then_some("rendered-preview")>{t}</pre> }.into_any(),
                                                Some(Err(e)) => error_note(&e).into_any(),
                                            }}
                                        </div>
                                    </div>
                                }).collect_view())}
                            </div>
                        </div>
                    })
            }}
            {move || preview.get().filter(|_| imported.get().is_none()).map(|p| {
                let bad = p.bad_row_count;
                view! {
                    <div class="card wizard-step">
                        <h2>"3. Problems"</h2>
                        <p id="row-counts">{format!("{} good rows · {} duplicates (dropped, first copy kept) · {} bad rows", p.good_rows, p.duplicates, bad)}</p>
                        {(bad > 0).then(|| view! {
                            <div class="table-wrap bad-rows-wrap">
                                <table class="data" id="bad-rows" data-testid="bad-rows">
                                    <thead><tr><th>"File"</th><th class="num">"Line"</th><th>"Reason"</th></tr></thead>
                                    <tbody>
                                        {p.bad_rows.iter().map(|b| view! {
                                            <tr><td>{crate::pages::library::logic::file_name(&b.file).to_string()}</td><td class="num">{b.line}</td><td>{b.reason.clone()}</td></tr>
                                        }).collect_view()}
                                    </tbody>
                                </table>
                            </div>
                            {(bad as usize > p.bad_rows.len()).then(|| view! {
                                <p class="muted">{format!("Showing the first {} of {bad}.", p.bad_rows.len())}</p>
                            })}
                            <label class="check">
                                <input type="checkbox" id="accept-bad-rows"
                                    prop:checked=move || form.accept_bad_rows.get()
                                    on:change=move |ev| form.accept_bad_rows.set(event_target_checked(&ev)) />
                                {format!(" Import the {} good rows and skip the bad ones", p.good_rows)}
                            </label>
                        })}
                        {(bad == 0).then(|| view! { <p class="notice">"Every row is usable."</p> })}
                    </div>
                    <div class="card wizard-step">
                        <h2>"4. Split & name"</h2>
                        <div class="grid-2">
                            <Field label="Name" hint="How the dataset is listed in the library; must be free.">
                                <input type="text" id="dataset-name"
                                    prop:value=move || form.name.get()
                                    on:input=move |ev| form.name.set(event_target_value(&ev)) />
                            </Field>
                            <Field label="Split" hint="How rows are divided into train, valid and test.">
                                <select id="split-mode"
                                    prop:value=move || form.split_mode.get()
                                    on:change=move |ev| { form.split_mode.set(event_target_value(&ev)); inspect(); }>
                                    <option value="seeded" selected=move || form.split_mode.get() == "seeded">"Shuffle with a seed"</option>
                                    <option value="all_train" selected=move || form.split_mode.get() == "all_train">"All rows for training"</option>
                                    <option value="files" selected=move || form.split_mode.get() == "files">"Own validation / test files"</option>
                                </select>
                            </Field>
                        </div>
                        {move || match form.split_mode.get().as_str() {
                            "seeded" => view! {
                                <div class="grid-3">
                                    <Field label="Validation %">
                                        <input type="number" min="0" max="100" step="1" id="valid-percent"
                                            prop:value=move || form.valid_percent.get()
                                            on:input=move |ev| form.valid_percent.set(event_target_value(&ev))
                                            on:change=move |_| inspect() />
                                    </Field>
                                    <Field label="Test %">
                                        <input type="number" min="0" max="100" step="1" id="test-percent"
                                            prop:value=move || form.test_percent.get()
                                            on:input=move |ev| form.test_percent.set(event_target_value(&ev))
                                            on:change=move |_| inspect() />
                                    </Field>
                                    <Field label="Seed" hint="Same seed, same split.">
                                        <input type="number" min="0" step="1" id="split-seed"
                                            prop:value=move || form.seed.get()
                                            on:input=move |ev| form.seed.set(event_target_value(&ev))
                                            on:change=move |_| inspect() />
                                    </Field>
                                </div>
                            }.into_any(),
                            "files" => view! {
                                <div class="grid-2">
                                    <Field label="Validation file" hint="Same format as the training file (optional).">
                                        <input type="text" id="valid-path"
                                            prop:value=move || form.valid_path.get()
                                            on:input=move |ev| form.valid_path.set(event_target_value(&ev))
                                            on:change=move |_| inspect() />
                                    </Field>
                                    <Field label="Test file" hint="Optional.">
                                        <input type="text" id="test-path"
                                            prop:value=move || form.test_path.get()
                                            on:input=move |ev| form.test_path.set(event_target_value(&ev))
                                            on:change=move |_| inspect() />
                                    </Field>
                                </div>
                            }.into_any(),
                            _ => ().into_any(),
                        }}
                        <div class="row">
                            <p id="split-counts" data-testid="split-counts">{format!(
                                "{} train · {} valid · {} test", p.train_rows, p.valid_rows, p.test_rows
                            )}</p>
                            <button class="secondary" id="split-refresh" disabled=move || inspecting.get() on:click=move |_| inspect()>
                                "Update counts"
                            </button>
                        </div>
                        <div class="row">
                            <button id="dataset-import"
                                disabled=move || importing.get() || inspecting.get()
                                    || (bad > 0 && !form.accept_bad_rows.get())
                                on:click=import>
                                {move || if importing.get() { "Importing…" } else { "Import" }}
                            </button>
                        </div>
                        {move || import_error.get().map(|e| error_note(&e))}
                    </div>
                }
            })}
        </section>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form() -> WizardForm {
        WizardForm {
            split_mode: "seeded".into(),
            valid_percent: "10".into(),
            test_percent: "5".into(),
            seed: "7".into(),
            ..WizardForm::default()
        }
    }

    #[test]
    fn seeded_split_and_blank_fields_become_options() {
        let o = build_options(&form()).expect("options");
        assert_eq!(o.name, None);
        assert_eq!(o.format, None);
        assert_eq!(
            o.split,
            Split::Seeded {
                valid_fraction: 0.1,
                test_fraction: 0.05,
                seed: 7
            }
        );
    }

    #[test]
    fn format_columns_and_other_splits() {
        let mut f = form();
        f.name = "  faq ".into();
        f.format = "csv".into();
        f.columns.prompt = Some("question".into());
        f.columns.system = Some("  ".into());
        f.split_mode = "files".into();
        f.valid_path = "/d/valid.csv".into();
        f.accept_bad_rows = true;
        let o = build_options(&f).expect("options");
        assert_eq!(o.name.as_deref(), Some("faq"));
        assert_eq!(o.format, Some(DatasetFormat::Csv));
        assert_eq!(o.columns.prompt.as_deref(), Some("question"));
        assert_eq!(o.columns.system, None);
        assert!(o.accept_bad_rows);
        assert_eq!(
            o.split,
            Split::Files {
                valid_path: Some("/d/valid.csv".into()),
                test_path: None
            }
        );
        f.split_mode = "all_train".into();
        assert_eq!(build_options(&f).expect("options").split, Split::AllTrain);
    }

    #[test]
    fn bad_numbers_are_refused_with_a_reason() {
        let mut f = form();
        f.valid_percent = "abc".into();
        let err = build_options(&f).expect_err("refused");
        assert!(err.contains("validation"), "{err}");
        f.valid_percent = "60".into();
        f.test_percent = "40".into();
        assert!(build_options(&f).is_err());
        f.test_percent = "0".into();
        f.seed = "-1".into();
        assert!(build_options(&f).expect_err("seed").contains("seed"));
        assert_eq!(parse_percent("12.5%", "x"), Ok(0.125));
        assert!(parse_percent("101", "x").is_err());
    }

    #[test]
    fn csv_paths_and_split_text() {
        assert!(is_csv_path("/a/B.TSV"));
        assert!(!is_csv_path("/a/b.jsonl"));
        assert_eq!(split_text(&Split::AllTrain), "all rows train");
        assert!(split_text(&Split::default()).contains("10% valid"));
    }
}
