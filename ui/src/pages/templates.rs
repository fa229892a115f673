//! Prompt templates: an editor for the system prompt, few-shot examples, the user
//! wrapper and `{{variables}}`, with a live preview of the exact text a model
//! receives; every save of a changed template is a new version (older ones can be
//! viewed and restored); a template can be evaluated on a dataset split like an
//! adapter, next to the base model's past scores.

use super::targets::{endpoint_choice, EndpointModelOptions};
use crate::components::{error_note, ConfirmButton, ErrorSlot, Field, ModelSelect, Progress};
use crate::{ipc, AppCtx};
use attune_protocol::ErrorCode;
use attune_protocol::{
    ChatMessage, DatasetSummary, EndpointEvalReport, EndpointModel, EndpointSummary, EvalOptions,
    EvalProgress, EvalReport, EvalSubject, IpcError, PromptTemplate, SplitName, TemplateDraft,
    TemplatePreview, TemplateRecord,
};
use leptos::prelude::*;
use leptos::task::spawn_local;
use std::collections::BTreeMap;

/// The `{{name}}` placeholders of `texts`, in order of first use, each once;
/// `{{input}}` (the user's message) is not a variable. Names are letters, digits,
/// `_`, `-` and `.`, starting with a letter or `_`; spaces inside the braces are allowed.
pub fn detect_variables<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for text in texts {
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                break;
            };
            let name = after[..end].trim();
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if valid && name != "input" && !found.iter().any(|f| f == name) {
                found.push(name.to_string());
            }
            rest = if valid { &after[end + 2..] } else { after };
        }
    }
    found
}

/// Few-shot pairs as the protocol's alternating user / assistant turns.
pub fn pairs_to_messages(pairs: &[(String, String)]) -> Vec<ChatMessage> {
    pairs
        .iter()
        .flat_map(|(u, a)| {
            [
                ChatMessage {
                    role: "user".into(),
                    content: u.clone(),
                },
                ChatMessage {
                    role: "assistant".into(),
                    content: a.clone(),
                },
            ]
        })
        .collect()
}

/// Alternating turns back into pairs (a turn without its partner gets an empty one).
pub fn messages_to_pairs(messages: &[ChatMessage]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for m in messages {
        if m.role == "assistant" {
            match pairs.last_mut() {
                Some(last) if last.1.is_empty() => last.1 = m.content.clone(),
                _ => pairs.push((String::new(), m.content.clone())),
            }
        } else {
            pairs.push((m.content.clone(), String::new()));
        }
    }
    pairs
}

fn non_empty(text: &str) -> Option<String> {
    (!text.trim().is_empty()).then(|| text.to_string())
}

/// One few-shot pair in the editor; its texts are signals so typing does not
/// rebuild the list.
#[derive(Clone, Copy)]
struct Example {
    user: RwSignal<String>,
    assistant: RwSignal<String>,
}

impl Example {
    fn new(user: String, assistant: String) -> Example {
        Example {
            user: RwSignal::new(user),
            assistant: RwSignal::new(assistant),
        }
    }
}

/// The prompt templates page.
#[component]
pub fn TemplatesPage() -> impl IntoView {
    let ctx = AppCtx::get();
    let templates: RwSignal<Vec<TemplateRecord>> = RwSignal::new(Vec::new());
    let search = RwSignal::new(String::new());
    let list_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    // The editor.
    let id: RwSignal<Option<i64>> = RwSignal::new(None);
    let loaded_version: RwSignal<Option<u32>> = RwSignal::new(None);
    let name = RwSignal::new(String::new());
    let system = RwSignal::new(String::new());
    let examples: RwSignal<Vec<Example>> = RwSignal::new(Vec::new());
    let user = RwSignal::new(String::new());
    let values: RwSignal<BTreeMap<String, String>> = RwSignal::new(BTreeMap::new());
    let note = RwSignal::new(String::new());
    let saved: RwSignal<Option<String>> = RwSignal::new(None);
    let save_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let saving = RwSignal::new(false);
    let versions: RwSignal<Vec<TemplateRecord>> = RwSignal::new(Vec::new());
    let viewing: RwSignal<Option<TemplateRecord>> = RwSignal::new(None);
    // Preview.
    let preview_model: RwSignal<Option<i64>> = RwSignal::new(None);
    let preview_message = RwSignal::new("What is the capital of France?".to_string());
    let preview: RwSignal<Option<TemplatePreview>> = RwSignal::new(None);
    let preview_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let preview_ticket = StoredValue::new(0u64);
    // Shown for: the local preview model (""), or an API model ("endpoint_id:model").
    let preview_on = RwSignal::new(String::new());
    // Evaluation.
    let datasets: RwSignal<Vec<DatasetSummary>> = RwSignal::new(Vec::new());
    let eval_dataset: RwSignal<Option<i64>> = RwSignal::new(None);
    let eval_split = RwSignal::new(SplitName::Valid);
    let eval_limit = RwSignal::new("50".to_string());
    let eval_accuracy = RwSignal::new(false);
    let evaluating = RwSignal::new(false);
    let eval_progress: RwSignal<Option<EvalProgress>> = RwSignal::new(None);
    let eval_report: RwSignal<Option<EvalReport>> = RwSignal::new(None);
    let eval_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let past: RwSignal<Vec<EvalReport>> = RwSignal::new(Vec::new());
    // Who answers in the evaluation: the preview model (local), or an API endpoint's
    // model ("endpoint_id:model"), whose evaluation gives label accuracy only.
    let eval_on = RwSignal::new(String::new());
    let endpoints: RwSignal<Vec<EndpointSummary>> = RwSignal::new(Vec::new());
    let remote_report: RwSignal<Option<EndpointEvalReport>> = RwSignal::new(None);
    {
        let ctx = AppCtx::get();
        Effect::new(move |_| {
            ctx.library_version.track();
            spawn_local(async move {
                if let Ok(list) = ipc::endpoints::list_endpoints().await {
                    endpoints.set(list);
                }
            });
        });
    }

    // The advisor's API path names the API model and the dataset to evaluate on.
    {
        let ctx = AppCtx::get();
        Effect::new(move |_| {
            if let Some(target) = ctx.template_target.get() {
                preview_on.set(target.clone());
                eval_on.set(target);
                if let Some(d) = ctx.focus_dataset.get_untracked() {
                    eval_dataset.set(Some(d));
                }
                ctx.template_target.set(None);
            }
        });
    }

    // Examples are created from handlers: their signals belong to the page.
    let owner = StoredValue::new(Owner::current());
    let make_example = move |u: String, a: String| {
        owner.with_value(|o| match o {
            Some(o) => o.with(|| Example::new(u, a)),
            None => Example::new(u, a),
        })
    };

    let variables = Memo::new(move |_| {
        let system = system.get();
        let user = user.get();
        let shots: Vec<String> = examples
            .get()
            .iter()
            .flat_map(|e| [e.user.get(), e.assistant.get()])
            .collect();
        detect_variables(
            std::iter::once(system.as_str())
                .chain(shots.iter().map(String::as_str))
                .chain(std::iter::once(user.as_str())),
        )
    });

    let draft = Memo::new(move |_| {
        let pairs: Vec<(String, String)> = examples
            .get()
            .iter()
            .map(|e| (e.user.get(), e.assistant.get()))
            .collect();
        let vars = variables.get();
        let all = values.get();
        TemplateDraft {
            id: id.get(),
            name: name.get().trim().to_string(),
            system: non_empty(&system.get()),
            examples: pairs_to_messages(&pairs),
            user: non_empty(&user.get()),
            variables: vars
                .iter()
                .map(|v| (v.clone(), all.get(v).cloned().unwrap_or_default()))
                .collect(),
            note: non_empty(&note.get()),
        }
    });

    let reload_list = move || {
        spawn_local(async move {
            match ipc::templates::list_templates().await {
                Ok(list) => {
                    templates.set(list);
                    list_error.set(None);
                }
                Err(e) => list_error.set(Some(e)),
            }
        });
    };
    let reload_versions = move |template_id: i64| {
        spawn_local(async move {
            match ipc::templates::template_versions(template_id).await {
                Ok(list) => versions.set(list),
                Err(e) => list_error.set(Some(e)),
            }
        });
    };
    let reload_past = move || {
        spawn_local(async move {
            if let Ok(list) = ipc::adapters::list_evaluations().await {
                past.set(list);
            }
        });
    };
    Effect::new(move |_| {
        ctx.library_version.track();
        reload_list();
        reload_past();
        spawn_local(async move {
            match ipc::datasets::list_datasets().await {
                Ok(list) => {
                    if eval_dataset
                        .get_untracked()
                        .is_none_or(|d| !list.iter().any(|x| x.id == d))
                    {
                        eval_dataset.set(list.first().map(|d| d.id));
                    }
                    datasets.set(list);
                }
                Err(e) => eval_error.set(Some(e)),
            }
        });
    });

    // Fills the editor from a stored version (`keep_id`: saving adds a version to it).
    let fill = move |record: &TemplateRecord| {
        id.set(Some(record.id));
        name.set(record.name.clone());
        system.set(record.system.clone().unwrap_or_default());
        examples.set(
            messages_to_pairs(&record.examples)
                .into_iter()
                .map(|(u, a)| make_example(u, a))
                .collect(),
        );
        user.set(record.user.clone().unwrap_or_default());
        values.set(record.variables.clone());
        note.set(String::new());
        save_error.set(None);
    };
    let open = move |record: TemplateRecord| {
        fill(&record);
        loaded_version.set(Some(record.version));
        saved.set(None);
        viewing.set(None);
        eval_report.set(None);
        reload_versions(record.id);
    };
    let new_template = move |_| {
        id.set(None);
        loaded_version.set(None);
        name.set(String::new());
        system.set(String::new());
        examples.set(Vec::new());
        user.set(String::new());
        values.set(BTreeMap::new());
        note.set(String::new());
        saved.set(None);
        save_error.set(None);
        versions.set(Vec::new());
        viewing.set(None);
        eval_report.set(None);
    };

    let save = move |_| {
        let d = draft.get_untracked();
        if d.name.is_empty() {
            save_error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message: "Give the template a name before saving.".into(),
            }));
            return;
        }
        if let Some(u) = &d.user {
            if !u.contains("{{input}}") && !u.contains("{{ input }}") {
                save_error.set(Some(IpcError {
                    code: ErrorCode::InvalidInput,
                    message: "The user wrapper must contain {{input}} (where the message goes), or be empty.".into(),
                }));
                return;
            }
        }
        saving.set(true);
        spawn_local(async move {
            match ipc::templates::save_template(&d).await {
                Ok(record) => {
                    let unchanged = d.id == Some(record.id)
                        && loaded_version.get_untracked() == Some(record.version);
                    saved.set(Some(if unchanged {
                        format!("No changes: still version {}", record.version)
                    } else {
                        format!("Saved as version {}", record.version)
                    }));
                    id.set(Some(record.id));
                    loaded_version.set(Some(record.version));
                    note.set(String::new());
                    save_error.set(None);
                    reload_versions(record.id);
                    if !unchanged {
                        ctx.library_changed();
                    }
                }
                Err(e) => save_error.set(Some(e)),
            }
            saving.set(false);
        });
    };

    let delete = move || {
        let Some(template_id) = id.get_untracked() else {
            return;
        };
        spawn_local(async move {
            match ipc::templates::remove_template(template_id).await {
                Ok(()) => {
                    new_template(());
                    ctx.library_changed();
                }
                Err(e) => save_error.set(Some(e)),
            }
        });
    };

    // Live preview, 400 ms after the last edit.
    Effect::new(move |_| {
        let d = draft.get();
        let model = preview_model.get();
        let message = preview_message.get();
        let remote = endpoint_choice(&preview_on.get());
        let ticket = preview_ticket.get_value() + 1;
        preview_ticket.set_value(ticket);
        if model.is_none() && remote.is_none() {
            return;
        }
        set_timeout(
            move || {
                if preview_ticket.get_value() != ticket {
                    return;
                }
                spawn_local(async move {
                    let vals = d.variables.clone();
                    let result = match (&remote, model) {
                        (Some(target), _) => {
                            ipc::templates::preview_template_for_endpoint(
                                target, &d, &message, &vals,
                            )
                            .await
                        }
                        (None, Some(model_id)) => {
                            ipc::templates::preview_template(model_id, &d, &message, &vals).await
                        }
                        (None, None) => return,
                    };
                    if preview_ticket.get_value() != ticket {
                        return;
                    }
                    match result {
                        Ok(p) => {
                            preview.set(Some(p));
                            preview_error.set(None);
                        }
                        Err(e) => preview_error.set(Some(e)),
                    }
                });
            },
            std::time::Duration::from_millis(400),
        );
    });

    let evaluate = move |_| {
        if evaluating.get_untracked() {
            return;
        }
        let d = draft.get_untracked();
        let remote_choice = endpoint_choice(&eval_on.get_untracked());
        let local_model = preview_model.get_untracked();
        if remote_choice.is_none() && local_model.is_none() {
            eval_error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message: "Choose a model in the preview, or an API model under Answered by, to evaluate the template on.".into(),
            }));
            return;
        }
        let Some(dataset_id) = eval_dataset.get_untracked() else {
            eval_error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message: "Import a dataset first (Import data page) to evaluate on.".into(),
            }));
            return;
        };
        if d.name.is_empty() {
            eval_error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message: "Give the template a name: evaluations are recorded under it.".into(),
            }));
            return;
        }
        let limit = match eval_limit.get_untracked().trim() {
            "" => None,
            t => match t.parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    eval_error.set(Some(IpcError {
                        code: ErrorCode::InvalidInput,
                        message: format!("Row limit \"{t}\" must be a whole number above 0, or empty for every row."),
                    }));
                    return;
                }
            },
        };
        let template = PromptTemplate {
            name: d.name.clone(),
            system: d.system.clone(),
            examples: d.examples.clone(),
            user: d.user.clone(),
            values: d.variables.clone(),
        };
        // An API model: label accuracy only.
        if let Some(EndpointModel {
            endpoint_id: eid,
            model,
        }) = remote_choice
        {
            let options = EvalOptions {
                split: eval_split.get_untracked(),
                limit,
                accuracy: true,
                ..EvalOptions::default()
            };
            evaluating.set(true);
            eval_error.set(None);
            eval_report.set(None);
            remote_report.set(None);
            eval_progress.set(None);
            spawn_local(async move {
                let on_progress = move |p: Result<EvalProgress, IpcError>| {
                    if let Ok(p) = p {
                        eval_progress.set(Some(p));
                    }
                };
                match ipc::endpoints::evaluate_endpoint(
                    eid,
                    &model,
                    Some(&template),
                    dataset_id,
                    &options,
                    on_progress,
                )
                .await
                {
                    Ok(report) => remote_report.set(Some(report)),
                    Err(e) => eval_error.set(Some(e)),
                }
                evaluating.set(false);
                eval_progress.set(None);
            });
            return;
        }
        let Some(model_id) = local_model else {
            return;
        };
        let subject = EvalSubject::Template {
            model: model_id.to_string(),
            template,
        };
        let options = EvalOptions {
            split: eval_split.get_untracked(),
            limit,
            accuracy: eval_accuracy.get_untracked(),
            ..EvalOptions::default()
        };
        evaluating.set(true);
        eval_error.set(None);
        eval_report.set(None);
        remote_report.set(None);
        eval_progress.set(None);
        spawn_local(async move {
            let on_progress = move |p: Result<EvalProgress, IpcError>| {
                if let Ok(p) = p {
                    eval_progress.set(Some(p));
                }
            };
            match ipc::adapters::evaluate(&subject, dataset_id, &options, on_progress).await {
                Ok(report) => {
                    eval_report.set(Some(report));
                    reload_past();
                }
                Err(e) => eval_error.set(Some(e)),
            }
            evaluating.set(false);
            eval_progress.set(None);
        });
    };

    let example_rows = move || {
        let list = examples.get();
        let n = list.len();
        list.into_iter()
            .enumerate()
            .map(|(i, e)| {
                let swap = move |a: usize, b: usize| examples.update(|l| l.swap(a, b));
                view! {
                    <div class="example card" data-testid="example">
                        <div class="example-head row">
                            <strong>{format!("Example {}", i + 1)}</strong>
                            <span class="spacer"></span>
                            <button class="secondary icon" title="Move up" disabled=i == 0 on:click=move |_| swap(i - 1, i)>"↑"</button>
                            <button class="secondary icon" title="Move down" disabled=i + 1 == n on:click=move |_| swap(i, i + 1)>"↓"</button>
                            <button
                                class="secondary icon"
                                id=format!("remove-example-{i}")
                                title="Remove this example"
                                on:click=move |_| examples.update(|l| { l.remove(i); })
                            >
                                "✕"
                            </button>
                        </div>
                        <div class="grid-2">
                            <textarea
                                id=format!("example-user-{i}")
                                rows="2"
                                placeholder="User"
                                prop:value=move || e.user.get()
                                on:input=move |ev| e.user.set(event_target_value(&ev))
                            ></textarea>
                            <textarea
                                id=format!("example-assistant-{i}")
                                rows="2"
                                placeholder="Assistant"
                                prop:value=move || e.assistant.get()
                                on:input=move |ev| e.assistant.set(event_target_value(&ev))
                            ></textarea>
                        </div>
                    </div>
                }
            })
            .collect_view()
    };

    let comparison = move || {
        let d = draft.get();
        let model = preview_model.get();
        let dataset = eval_dataset.get();
        let rows: Vec<EvalReport> = past
            .get()
            .into_iter()
            .filter(|r| Some(r.dataset_id) == dataset && Some(r.model_id) == model)
            .filter(|r| {
                (r.subject_kind == "template" && r.subject == d.name) || r.subject_kind == "base"
            })
            .collect();
        if rows.is_empty() {
            return view! { <p class="muted">"No past evaluations of this template or its model on this dataset."</p> }.into_any();
        }
        view! {
            <table class="data" id="eval-comparison">
                <thead>
                    <tr>
                        <th>"Subject"</th>
                        <th>"Split"</th>
                        <th class="num">"Rows"</th>
                        <th class="num">"Mean NLL"</th>
                        <th class="num">"Perplexity"</th>
                        <th class="num">"Accuracy"</th>
                        <th>"When"</th>
                    </tr>
                </thead>
                <tbody>
                    {rows
                        .into_iter()
                        .map(|r| {
                            view! {
                                <tr>
                                    <td>{format!("{} ({})", r.subject, r.subject_kind)}</td>
                                    <td>{r.split.as_str()}</td>
                                    <td class="num">{r.n_rows}</td>
                                    <td class="num">{format!("{:.3}", r.mean_nll)}</td>
                                    <td class="num">{format!("{:.2}", r.ppl)}</td>
                                    <td class="num">{r.accuracy.map(|a| format!("{:.1}%", a * 100.0)).unwrap_or_else(|| "—".into())}</td>
                                    <td>{r.created_at.chars().take(16).collect::<String>().replace('T', " ")}</td>
                                </tr>
                            }
                        })
                        .collect_view()}
                </tbody>
            </table>
        }
        .into_any()
    };

    view! {
        <section class="page wide templates-page" id="templates-page">
            <h1>"Prompt templates"</h1>
            <div class="templates-layout">
                <aside class="card template-sidebar">
                    <div class="row">
                        <input
                            type="search"
                            id="template-search"
                            placeholder="Search templates"
                            prop:value=move || search.get()
                            on:input=move |ev| search.set(event_target_value(&ev))
                        />
                        <button id="new-template" on:click=move |_| new_template(())>"New"</button>
                    </div>
                    <ErrorSlot error=list_error />
                    <ul class="template-list" id="template-list">
                        {move || {
                            let q = search.get().to_lowercase();
                            let list: Vec<TemplateRecord> = templates
                                .get()
                                .into_iter()
                                .filter(|t| q.is_empty() || t.name.to_lowercase().contains(&q))
                                .collect();
                            if list.is_empty() {
                                return view! { <li class="muted">"No templates yet: write one and save it."</li> }.into_any();
                            }
                            list.into_iter()
                                .map(|t| {
                                    let tid = t.id;
                                    let label = format!("v{} · {} version{}", t.version, t.versions, if t.versions == 1 { "" } else { "s" });
                                    let tname = t.name.clone();
                                    view! {
                                        <li class:current=move || id.get() == Some(tid)>
                                            <button class="link" id=format!("open-template-{tid}") on:click=move |_| open(t.clone())>
                                                <span class="template-name">{tname}</span>
                                                <span class="muted">{label}</span>
                                            </button>
                                        </li>
                                    }
                                })
                                .collect_view()
                                .into_any()
                        }}
                    </ul>
                </aside>
                <div class="template-main">
                    <div class="card template-editor">
                        <Field label="Name" hint="Evaluations and playground targets are named after it.">
                            <input type="text" id="template-name" prop:value=move || name.get() on:input=move |ev| name.set(event_target_value(&ev)) />
                        </Field>
                        <Field label="System prompt" hint="Instructions put before the conversation. {{variables}} are allowed.">
                            <textarea id="template-system" rows="4" prop:value=move || system.get() on:input=move |ev| system.set(event_target_value(&ev))></textarea>
                        </Field>
                        <div class="examples">
                            <div class="row">
                                <span class="field-label">"Few-shot examples"</span>
                                <span class="field-hint">"User / assistant pairs shown to the model before the message."</span>
                                <span class="spacer"></span>
                                <button class="secondary" id="add-example" on:click=move |_| examples.update(|l| l.push(make_example(String::new(), String::new())))>
                                    "+ Add example"
                                </button>
                            </div>
                            {example_rows}
                        </div>
                        <Field label="User wrapper" hint="Wraps each message; {{input}} is where it goes. Empty: the message alone.">
                            <textarea id="template-user" rows="2" placeholder="{{input}}" prop:value=move || user.get() on:input=move |ev| user.set(event_target_value(&ev))></textarea>
                        </Field>
                        <div class="variables" id="template-variables">
                            <span class="field-label">"Variables"</span>
                            {move || {
                                let vars = variables.get();
                                if vars.is_empty() {
                                    return view! { <p class="field-hint">"Write {{name}} in any text above to add a variable."</p> }.into_any();
                                }
                                vars.into_iter()
                                    .map(|v| {
                                        let key = v.clone();
                                        let key2 = v.clone();
                                        view! {
                                            <label class="variable row">
                                                <code>{format!("{{{{{v}}}}}")}</code>
                                                <input
                                                    type="text"
                                                    id=format!("var-{v}")
                                                    placeholder="default value"
                                                    prop:value=move || values.with(|m| m.get(&key).cloned().unwrap_or_default())
                                                    on:input=move |ev| {
                                                        let val = event_target_value(&ev);
                                                        values.update(|m| { m.insert(key2.clone(), val); });
                                                    }
                                                />
                                            </label>
                                        }
                                    })
                                    .collect_view()
                                    .into_any()
                            }}
                        </div>
                        <Field label="Version note" hint="What changed in this version (optional).">
                            <input type="text" id="template-note" prop:value=move || note.get() on:input=move |ev| note.set(event_target_value(&ev)) />
                        </Field>
                        <div class="row">
                            <button id="save-template" disabled=move || saving.get() on:click=save>"Save"</button>
                            <span class="muted" id="template-saved" data-testid="template-saved">{move || saved.get().unwrap_or_default()}</span>
                            <span class="spacer"></span>
                            {move || id.get().map(|_| view! { <ConfirmButton label="Delete template" id="template-delete" on_confirm=Callback::new(move |_| delete()) /> })}
                        </div>
                        <ErrorSlot error=save_error />
                    </div>
                    <div class="card template-versions-card">
                        <h2>"Versions"</h2>
                        <ul class="template-versions" id="template-versions">
                            {move || {
                                let list = versions.get();
                                if list.is_empty() {
                                    return view! { <li class="muted">"Saved versions appear here."</li> }.into_any();
                                }
                                list.into_iter()
                                    .map(|v| {
                                        let ver = v.version;
                                        let label = format!(
                                            "v{} · {}{}",
                                            v.version,
                                            v.created_at.chars().take(16).collect::<String>().replace('T', " "),
                                            v.note.as_ref().map(|n| format!(" · {n}")).unwrap_or_default()
                                        );
                                        view! {
                                            <li class:current=move || viewing.with(|x| x.as_ref().is_some_and(|x| x.version == ver))>
                                                <button class="link" id=format!("template-version-{ver}") on:click=move |_| viewing.set(Some(v.clone()))>{label}</button>
                                            </li>
                                        }
                                    })
                                    .collect_view()
                                    .into_any()
                            }}
                        </ul>
                        {move || {
                            viewing
                                .get()
                                .map(|v| {
                                    let restore = v.clone();
                                    view! {
                                        <div class="version-view" id="version-view">
                                            <div class="row">
                                                <strong>{format!("Version {} (read-only)", v.version)}</strong>
                                                <span class="spacer"></span>
                                                <button class="secondary" id="restore-version" on:click=move |_| {
                                                    fill(&restore);
                                                    saved.set(Some(format!("Restored version {}: save to make it the newest", restore.version)));
                                                    viewing.set(None);
                                                }>"Restore"</button>
                                                <button class="secondary" on:click=move |_| viewing.set(None)>"Close"</button>
                                            </div>
                                            <pre class="version-text">{version_text(&v)}</pre>
                                        </div>
                                    }
                                })
                        }}
                    </div>
                    <div class="card template-preview-card">
                        <h2>"Live preview"</h2>
                        <div class="grid-2">
                            <Field label="Model" hint="Its chat template is applied.">
                                <ModelSelect selected=preview_model id="preview-model" />
                            </Field>
                            <Field label="Shown for" hint="An API model applies its own chat template: the preview shows the request Attune sends.">
                                <select id="preview-on" on:change=move |ev| { let v = event_target_value(&ev); eval_on.set(v.clone()); preview_on.set(v); } prop:value=move || preview_on.get()>
                                    <option value="">"The model above (this computer)"</option>
                                    <EndpointModelOptions endpoints selected=preview_on />
                                </select>
                            </Field>
                            <Field label="Sample message" hint="Stands for {{input}}.">
                                <input type="text" id="preview-message" prop:value=move || preview_message.get() on:input=move |ev| preview_message.set(event_target_value(&ev)) />
                            </Field>
                        </div>
                        <ErrorSlot error=preview_error />
                        {move || {
                            preview.get().map(|p| {
                                view! {
                                    <p class="muted preview-meta">
                                        <span id="preview-tokens">{if preview_on.get().is_empty() { format!("{} tokens", p.tokens) } else { "The request sent to the API (its server applies the chat template and counts the tokens)".to_string() }}</span>
                                        {(!p.missing.is_empty()).then(|| view! {
                                            <span class="preview-missing" id="preview-missing">{format!(" · no value for: {}", p.missing.join(", "))}</span>
                                        })}
                                    </p>
                                }
                            })
                        }}
                        <pre class="template-preview" id="template-preview" data-testid="template-preview">
                            {move || preview.get().map(|p| p.text).unwrap_or_default()}
                        </pre>
                    </div>
                    <div class="card template-eval">
                        <h2>"Evaluate"</h2>
                        <p class="field-hint">"Scores the template on the preview model over a dataset split, like an adapter, or on a model of an API endpoint (label accuracy only)."</p>
                        <Field label="Answered by" hint="An API model is scored by label accuracy only: an API does not return the probability of a given answer, so there is no NLL.">
                            <select id="eval-on" on:change=move |ev| eval_on.set(event_target_value(&ev)) prop:value=move || eval_on.get()>
                                <option value="">"The preview model (this computer)"</option>
                                <EndpointModelOptions endpoints selected=eval_on />
                            </select>
                        </Field>
                        <div class="grid-3">
                            <Field label="Dataset">
                                <select id="eval-dataset" on:change=move |ev| eval_dataset.set(event_target_value(&ev).parse().ok()) prop:value=move || eval_dataset.get().map(|d| d.to_string()).unwrap_or_default()>
                                    {move || {
                                        let list = datasets.get();
                                        if list.is_empty() {
                                            return view! { <option value="">"No datasets"</option> }.into_any();
                                        }
                                        list.into_iter()
                                            .map(|d| {
                                                let did = d.id;
                                                view! { <option value=did.to_string() selected=move || eval_dataset.get() == Some(did)>{d.name}</option> }
                                            })
                                            .collect_view()
                                            .into_any()
                                    }}
                                </select>
                            </Field>
                            <Field label="Split">
                                <select id="eval-split" on:change=move |ev| { if let Some(s) = SplitName::parse(&event_target_value(&ev)) { eval_split.set(s) } } prop:value=move || eval_split.get().as_str()>
                                    {SplitName::ALL.into_iter().map(|s| view! { <option value=s.as_str() selected=move || eval_split.get() == s>{s.as_str()}</option> }).collect_view()}
                                </select>
                            </Field>
                            <Field label="Row limit" hint="Empty: every row.">
                                <input type="number" min="1" id="eval-limit" prop:value=move || eval_limit.get() on:input=move |ev| eval_limit.set(event_target_value(&ev)) />
                            </Field>
                        </div>
                        <label class="row">
                            <input type="checkbox" id="eval-accuracy" prop:checked=move || eval_accuracy.get() on:change=move |ev| eval_accuracy.set(event_target_checked(&ev)) />
                            "Label accuracy (generates an answer per labeled row; slower)"
                        </label>
                        <div class="row">
                            <button id="evaluate-template" disabled=move || evaluating.get() on:click=evaluate>"Evaluate"</button>
                            {move || evaluating.get().then(|| view! {
                                <button class="secondary" id="cancel-evaluation" on:click=move |_| {
                                    spawn_local(async move {
                                        if let Err(e) = ipc::adapters::cancel_evaluation().await {
                                            eval_error.set(Some(e));
                                        }
                                    });
                                }>"Cancel"</button>
                            })}
                        </div>
                        {move || evaluating.get().then(|| {
                            let fraction = Signal::derive(move || eval_progress.get().filter(|p| p.total > 0).map(|p| p.done as f64 / p.total as f64));
                            let label = Signal::derive(move || eval_progress.get().map(|p| format!("{} {}/{}", p.phase, p.done, p.total)).unwrap_or_else(|| "starting…".into()));
                            view! { <Progress fraction=fraction label=label /> }
                        })}
                        {move || eval_error.get().map(|e| error_note(&e))}
                        {move || remote_report.get().map(|r| view! {
                            <div class="eval-report" id="eval-remote-report" data-testid="eval-report">
                                <div class="grid-3">
                                    <div><span class="field-label">"Answered by"</span><div class="figure">{format!("{} at {}", r.model, r.endpoint)}</div></div>
                                    <div><span class="field-label">"Accuracy"</span><div class="figure">{r.accuracy.map(|a| format!("{:.1}% of {}", a * 100.0, r.n_labeled)).unwrap_or_else(|| "—".into())}</div></div>
                                    <div><span class="field-label">"Rows"</span><div class="figure">{r.n_rows}</div></div>
                                </div>
                                <p class="muted">{r.note.clone()}</p>
                            </div>
                        })}
                        {move || eval_report.get().map(|r| view! {
                            <div class="eval-report grid-3" id="eval-report" data-testid="eval-report">
                                <div><span class="field-label">"Mean NLL"</span><div class="figure">{format!("{:.3}", r.mean_nll)}</div></div>
                                <div><span class="field-label">"Perplexity"</span><div class="figure">{format!("{:.2}", r.ppl)}</div></div>
                                <div><span class="field-label">"Accuracy"</span><div class="figure">{r.accuracy.map(|a| format!("{:.1}% of {}", a * 100.0, r.n_labeled)).unwrap_or_else(|| "—".into())}</div></div>
                                <div><span class="field-label">"Rows"</span><div class="figure">{format!("{} ({} tokens)", r.n_rows, r.n_tokens)}</div></div>
                            </div>
                        })}
                        <h3>"Compared with the base model"</h3>
                        {comparison}
                    </div>
                </div>
            </div>
        </section>
    }
}

/// A stored version as plain text for the read-only view.
fn version_text(v: &TemplateRecord) -> String {
    let mut out = String::new();
    if let Some(s) = &v.system {
        out.push_str(&format!("System:\n{s}\n\n"));
    }
    for (i, (u, a)) in messages_to_pairs(&v.examples).iter().enumerate() {
        out.push_str(&format!(
            "Example {}:\n  User: {u}\n  Assistant: {a}\n\n",
            i + 1
        ));
    }
    if let Some(u) = &v.user {
        out.push_str(&format!("User wrapper:\n{u}\n\n"));
    }
    for (k, val) in &v.variables {
        out.push_str(&format!("{{{{{k}}}}} = {val}\n"));
    }
    if let Some(n) = &v.note {
        out.push_str(&format!("\nNote: {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_found_once_in_order_without_input() {
        let vars = detect_variables([
            "You are a {{role}} expert in {{ field }}.",
            "Q: {{input}} ({{role}})",
            "{{ not a var }} {{unclosed",
            "{{lang.code}} {{_x-1}} {{9bad}}",
        ]);
        assert_eq!(vars, vec!["role", "field", "lang.code", "_x-1"]);
        assert!(detect_variables(["no braces", "{{}}"]).is_empty());
    }

    #[test]
    fn nested_braces_do_not_hide_a_variable() {
        assert_eq!(detect_variables(["{{ {{name}}"]), vec!["name"]);
    }

    #[test]
    fn pairs_round_trip_through_turns() {
        let pairs = vec![
            ("hi".to_string(), "hello".to_string()),
            ("2+2?".to_string(), "4".to_string()),
        ];
        let turns = pairs_to_messages(&pairs);
        assert_eq!(turns.len(), 4);
        assert_eq!(turns[2].role, "user");
        assert_eq!(messages_to_pairs(&turns), pairs);
        let odd = messages_to_pairs(&turns[..3]);
        assert_eq!(odd.last(), Some(&("2+2?".to_string(), String::new())));
    }
}
