//! The Export dialog of a model or adapter: format, weight type with its size, destination
//! (the system's folder chooser), progress with Cancel, then the verification Attune ran on
//! what it wrote, and "Show in folder". Past exports of the same subject are listed under it.

use crate::components::{error_note, Field, Progress};
use crate::{format, ipc};
use attune_protocol::{
    ExportFormat, ExportOptions, ExportProgress, ExportQuant, ExportRecord, ExportRequest,
    ExportSubject, IpcError, TemplateRecord,
};
use leptos::prelude::*;
use leptos::task::spawn_local;

fn quant_label(q: ExportQuant) -> &'static str {
    match q {
        ExportQuant::F32 => "F32 (exact)",
        ExportQuant::F16 => "F16",
        ExportQuant::Bf16 => "BF16",
        ExportQuant::Q8_0 => "Q8_0 (8-bit)",
        ExportQuant::Q4KM => "Q4_K_M (4-bit mix)",
    }
}

/// The verification of one export: the verdict, each check, the files and "Show in folder".
#[component]
pub fn VerificationView(record: ExportRecord) -> impl IntoView {
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let path = record.path.clone();
    let show = move |_| {
        let path = path.clone();
        spawn_local(async move {
            if let Err(e) = ipc::export::show_in_folder(&path).await {
                error.set(Some(e));
            }
        });
    };
    let v = record.verification.clone();
    let verdict = if v.passed { "passed" } else { "failed" };
    view! {
        <div class="export-result" data-testid="export-result">
            <div class=format!("notice {}", if v.passed { "success" } else { "warning" })
                id="export-verification" data-verdict=verdict>
                <strong>{if v.passed { "Verified: " } else { "Check FAILED (the files are kept): " }}</strong>
                {v.summary.clone()}
            </div>
            <p class="muted">"Tolerance: " {v.tolerance.clone()}</p>
            <table class="checks">
                <thead><tr><th></th><th>"Check"</th><th>"File"</th><th>"Result"</th></tr></thead>
                <tbody>
                    {v.checks.iter().map(|c| view! {
                        <tr class:failed=!c.passed>
                            <td>{if c.passed { "✓" } else { "✗" }}</td>
                            <td>{c.name.clone()}</td>
                            <td><code>{c.file.clone()}</code></td>
                            <td>{c.detail.clone()}</td>
                        </tr>
                    }).collect_view()}
                </tbody>
            </table>
            <ul class="export-files">
                {record.files.iter().map(|f| view! {
                    <li><code>{f.name.clone()}</code>" — "{format::bytes(f.bytes)}</li>
                }).collect_view()}
            </ul>
            <div class="row">
                <code class="selectable">{record.path.clone()}</code>
                <button class="secondary" id="show-in-folder" on:click=show>"Show in folder"</button>
            </div>
            {move || error.get().map(|e| error_note(&e))}
        </div>
    }
}

/// The Export dialog for `subject` (a model or an adapter), opened by a button.
#[component]
pub fn ExportDialog(subject: ExportSubject, #[prop(into)] name: String) -> impl IntoView {
    let open = RwSignal::new(false);
    let options: RwSignal<Option<Result<ExportOptions, IpcError>>> = RwSignal::new(None);
    let templates: RwSignal<Vec<TemplateRecord>> = RwSignal::new(Vec::new());
    let format: RwSignal<ExportFormat> = RwSignal::new(ExportFormat::Gguf);
    let quant: RwSignal<ExportQuant> = RwSignal::new(ExportQuant::F16);
    let dest = RwSignal::new(String::new());
    let overwrite = RwSignal::new(false);
    let keep_adapter = RwSignal::new(false);
    let template = RwSignal::new(String::new());
    let busy = RwSignal::new(false);
    let progress: RwSignal<Option<ExportProgress>> = RwSignal::new(None);
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let result: RwSignal<Option<ExportRecord>> = RwSignal::new(None);
    let history: RwSignal<Vec<ExportRecord>> = RwSignal::new(Vec::new());

    let subject_for_load = subject.clone();
    let name_for_history = name.clone();
    let load = move || {
        let s = subject_for_load.clone();
        let n = name_for_history.clone();
        spawn_local(async move {
            let o = ipc::export::export_options(&s).await;
            if let Ok(opts) = &o {
                // Start on the first format that can carry the subject.
                if let Some(f) = opts.formats.iter().find(|f| f.unavailable.is_none()) {
                    format.set(f.format);
                    if let Some((q, _)) = f.sizes.first() {
                        quant.set(*q);
                    }
                }
            }
            options.set(Some(o));
            if let Ok(t) = ipc::templates::list_templates().await {
                templates.set(t);
            }
            if let Ok(all) = ipc::export::list_exports().await {
                history.set(all.into_iter().filter(|r| r.subject == n).collect());
            }
        });
    };
    let toggle = move |_| {
        let now = !open.get_untracked();
        open.set(now);
        if now && options.get_untracked().is_none() {
            load();
        }
    };
    let current = move || {
        options.with(|o| match o {
            Some(Ok(o)) => o.formats.iter().find(|f| f.format == format.get()).cloned(),
            _ => None,
        })
    };
    let browse = move |_| {
        spawn_local(async move {
            match ipc::models::pick_path("Export into this folder", true, &[]).await {
                Ok(Some(p)) => dest.set(p),
                Ok(None) => {}
                Err(e) => error.set(Some(e)),
            }
        });
    };
    let subject_for_start = subject.clone();
    let name_for_start = name.clone();
    let start = move |_| {
        let req = ExportRequest {
            subject: subject_for_start.clone(),
            format: format.get_untracked(),
            quant: Some(quant.get_untracked()),
            dest: dest.get_untracked().trim().to_string(),
            overwrite: overwrite.get_untracked(),
            ollama_adapter: keep_adapter.get_untracked()
                && format.get_untracked() == ExportFormat::Ollama,
            template: Some(template.get_untracked())
                .filter(|t| !t.is_empty() && format.get_untracked() == ExportFormat::Ollama),
        };
        let n = name_for_start.clone();
        busy.set(true);
        error.set(None);
        result.set(None);
        progress.set(None);
        spawn_local(async move {
            let r = ipc::export::start_export(&req, move |p| {
                if let Ok(p) = p {
                    progress.set(Some(p));
                }
            })
            .await;
            match r {
                Ok(rec) => {
                    result.set(Some(rec));
                    if let Ok(all) = ipc::export::list_exports().await {
                        history.set(all.into_iter().filter(|r| r.subject == n).collect());
                    }
                }
                Err(e) => error.set(Some(e)),
            }
            busy.set(false);
            progress.set(None);
        });
    };
    let cancel = move |_| {
        spawn_local(async move {
            let _ = ipc::export::cancel_export().await;
        });
    };
    let is_lora = move || options.with(|o| matches!(o, Some(Ok(o)) if o.kind == "lora"));

    let form = move || {
        let opts = match options.get() {
            None => {
                return view! { <p class="muted">"Reading what this can be exported as…"</p> }
                    .into_any()
            }
            Some(Err(e)) => return error_note(&e).into_any(),
            Some(Ok(o)) => o,
        };
        let fmt_options = opts
            .formats
            .iter()
            .map(|f| {
                let value = f.format.as_str();
                let label = match &f.unavailable {
                    None => f.format.label().to_string(),
                    Some(_) => format!("{} — not available", f.format.label()),
                };
                let fmt = f.format;
                view! {
                    <option value=value disabled=f.unavailable.is_some() selected=move || format.get() == fmt>{label}</option>
                }
            })
            .collect_view();
        let reasons: Vec<String> = opts
            .formats
            .iter()
            .filter_map(|f| {
                f.unavailable
                    .as_ref()
                    .map(|r| format!("{}: {r}", f.format.as_str()))
            })
            .collect();
        view! {
            <Field label="Format" hint="Where the export will run: llama.cpp / LM Studio (GGUF), Ollama, or Python (Hugging Face).">
                <select id="export-format" on:change=move |ev| {
                    if let Some(f) = ExportFormat::parse(&event_target_value(&ev)) {
                        format.set(f);
                        if let Some(c) = current() {
                            if let Some((q, _)) = c.sizes.first() { quant.set(*q); }
                        }
                    }
                }>{fmt_options}</select>
            </Field>
            {(!reasons.is_empty()).then(|| view! {
                <ul class="muted export-unavailable">{reasons.into_iter().map(|r| view! { <li>{r}</li> }).collect_view()}</ul>
            })}
            {move || current().map(|c| {
                let sizes = c.sizes.clone();
                let many = sizes.len() > 1;
                view! {
                    <Field label="Weights" hint=if many { "Smaller types load faster and use less memory; each is checked against the app's model." } else { "Written in f32: the app's exact values." }>
                        <select id="export-quant" disabled=!many on:change=move |ev| {
                            if let Some(q) = ExportQuant::parse(&event_target_value(&ev)) { quant.set(q); }
                        }>
                            {sizes.into_iter().map(|(q, bytes)| view! {
                                <option value=q.as_str() selected=move || quant.get() == q>
                                    {format!("{} — about {}", quant_label(q), format::bytes(bytes))}
                                </option>
                            }).collect_view()}
                        </select>
                    </Field>
                }
            })}
            {move || (format.get() == ExportFormat::Ollama).then(|| view! {
                {is_lora().then(|| view! {
                    <label class="check">
                        <input type="checkbox" id="export-keep-adapter" prop:checked=move || keep_adapter.get()
                            on:change=move |ev| keep_adapter.set(event_target_checked(&ev)) />
                        "Keep the LoRA as ADAPTER over the base GGUF (instead of merging it)"
                    </label>
                })}
                <Field label="System prompt" hint="SYSTEM (and few-shot MESSAGEs) from a saved prompt template.">
                    <select id="export-template" on:change=move |ev| template.set(event_target_value(&ev))>
                        <option value="">"(none)"</option>
                        {templates.get().into_iter().map(|t| {
                            let n = t.name.clone();
                            view! { <option value=n.clone()>{n.clone()}</option> }
                        }).collect_view()}
                    </select>
                </Field>
            })}
            <Field label="Destination folder" hint="Created if missing. A folder with files in it is not overwritten unless you allow it below.">
                <div class="row">
                    <input type="text" id="export-dest" placeholder="/path/to/folder"
                        prop:value=move || dest.get()
                        on:input=move |ev| dest.set(event_target_value(&ev)) />
                    <button class="secondary" id="export-dest-browse" on:click=browse>"Choose folder…"</button>
                </div>
            </Field>
            <label class="check">
                <input type="checkbox" id="export-overwrite" prop:checked=move || overwrite.get()
                    on:change=move |ev| overwrite.set(event_target_checked(&ev)) />
                "Replace files of the same names in that folder"
            </label>
        }
        .into_any()
    };

    view! {
        <div class="export-dialog">
            <button class="secondary" id="open-export" on:click=toggle>
                {move || if open.get() { "Close export" } else { "Export for other tools…" }}
            </button>
            {move || open.get().then(|| view! {
                <div class="card export-panel" id="export-panel" role="dialog" aria-label="Export">
                    <h3>"Export " {name.clone()}</h3>
                    {form}
                    <div class="row">
                        <button id="start-export"
                            disabled=move || busy.get() || dest.get().trim().is_empty() || current().is_none_or(|c| c.unavailable.is_some())
                            on:click=start.clone()>"Export"</button>
                        {move || busy.get().then(|| view! {
                            <button class="secondary" id="cancel-export" on:click=cancel>"Cancel"</button>
                        })}
                    </div>
                    {move || busy.get().then(|| {
                        let frac = Signal::derive(move || progress.get().filter(|p| p.total > 0).map(|p| p.done as f64 / p.total as f64));
                        let label = Signal::derive(move || progress.get().map(|p| if p.total > 1 { format!("{} {}/{}", p.stage, p.done, p.total) } else { p.stage }).unwrap_or_else(|| "starting…".into()));
                        view! { <Progress fraction=frac label=label /> }
                    })}
                    {move || error.get().map(|e| error_note(&e))}
                    {move || result.get().map(|r| view! { <VerificationView record=r /> })}
                    {move || {
                        let h = history.get();
                        (!h.is_empty()).then(|| view! {
                            <h4>"Earlier exports"</h4>
                            <ul class="export-history">
                                {h.into_iter().map(|r| view! {
                                    <li>
                                        {format!("{} {} — {} — ", r.format.as_str(), r.quant.as_str(), crate::pages::library::logic::short_date(&r.created_at))}
                                        <span class=if r.verification.passed { "ok" } else { "failed" }>
                                            {if r.verification.passed { "verified" } else { "check failed" }}
                                        </span>
                                        " — " <code>{r.path.clone()}</code>
                                    </li>
                                }).collect_view()}
                            </ul>
                        })
                    }}
                </div>
            })}
        </div>
    }
}
