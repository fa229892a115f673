//! Documents to data: a folder of documents (PDF, DOCX, Markdown, HTML, text) is read into
//! a document set (what was read, what was skipped and why, the chunks); a teacher (a local
//! model, an adapter or an API model) writes question-answer pairs or instructions per chunk
//! from a stored, editable prompt, with per-chunk progress and Cancel; every row is reviewed
//! beside its source passage (accept, edit inline, reject, regenerate); the kept rows become
//! a chat dataset (with a validation split), the chunks a continued-pretraining dataset, and
//! the dataset goes to the Adapt page.

use crate::components::{ConfirmButton, ErrorSlot, Field, Progress};
use crate::pages::datasets::{parse_percent, split_text};
use crate::pages::targets::{TargetCatalog, TargetSelect};
use crate::{ipc, AppCtx, Page};
use attune_protocol::{
    ChatMessage, ChatTarget, DatasetSummary, DocChunk, DocRow, DocRowStatus, DocsetSummary,
    ErrorCode, IpcError, ReviewAction, Split, TeachEvent, TeachSpec, TeacherMode, TemplateDraft,
    TemplateRecord,
};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// Default longest chunk, in characters (the engine's default).
pub const DEFAULT_CHUNK_CHARS: &str = "1500";
/// The chunk sizes the engine takes.
pub const CHUNK_RANGE: (usize, usize) = (200, 20_000);

/// The teacher form as typed.
#[derive(Debug, Clone, PartialEq)]
pub struct TeachForm {
    pub mode: TeacherMode,
    pub count: String,
    pub max_tokens: String,
    pub temperature: String,
    pub max_chunks: String,
}

/// A whole number from a field, or a sentence naming the field.
fn whole(text: &str, what: &str, min: u64, max: u64) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(format!(
            "{what} must be a whole number from {min} to {max} (got “{}”).",
            text.trim()
        )),
    }
}

/// The spec the form describes for `target` and the stored template `template` (id), or
/// what is wrong with it.
pub fn build_spec(
    form: &TeachForm,
    target: Option<ChatTarget>,
    template: Option<i64>,
) -> Result<TeachSpec, String> {
    let target = target.ok_or("Choose the teacher: a model, an adapter or an API model.")?;
    let count = whole(&form.count, "Rows per chunk", 1, 20)? as u32;
    let max_tokens = whole(&form.max_tokens, "Most tokens per chunk", 1, 8192)? as usize;
    let t = form.temperature.trim();
    let temperature = match t.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=2.0).contains(&v) => v,
        _ => {
            return Err(format!(
                "Temperature must be a number from 0 to 2 (got “{t}”)."
            ))
        }
    };
    let max_chunks = match form.max_chunks.trim() {
        "" => None,
        n => Some(whole(n, "How many chunks", 1, 1_000_000)?),
    };
    Ok(TeachSpec {
        target,
        mode: form.mode,
        template: template.map(|id| id.to_string()),
        count,
        max_tokens,
        temperature,
        seed: 42,
        max_chunks,
    })
}

/// The split of the chat dataset: `valid` percent of the rows (seeded), or all train.
pub fn dataset_split(valid: &str) -> Result<Split, String> {
    let v = parse_percent(valid, "validation")?;
    if v >= 1.0 {
        return Err("The validation share must leave rows for training (under 100%).".into());
    }
    Ok(if v == 0.0 {
        Split::AllTrain
    } else {
        Split::Seeded {
            valid_fraction: v,
            test_fraction: 0.0,
            seed: 42,
        }
    })
}

/// Row counts by status, in one line.
pub fn counts_text(rows: &[DocRow]) -> String {
    if rows.is_empty() {
        return "No rows yet: generate them with the teacher.".into();
    }
    let n = |s: DocRowStatus| rows.iter().filter(|r| r.status == s).count();
    format!(
        "{} rows: {} to review · {} accepted · {} edited · {} rejected · {} failed",
        rows.len(),
        n(DocRowStatus::Pending),
        n(DocRowStatus::Accepted),
        n(DocRowStatus::Edited),
        n(DocRowStatus::Rejected),
        n(DocRowStatus::Failed)
    )
}

/// What the status means to the reviewer.
pub fn status_label(s: DocRowStatus) -> &'static str {
    match s {
        DocRowStatus::Pending => "to review",
        DocRowStatus::Accepted => "accepted",
        DocRowStatus::Edited => "edited",
        DocRowStatus::Rejected => "rejected",
        DocRowStatus::Failed => "no usable answer",
    }
}

/// The question and answer of a row's turns (the last user and assistant turns).
pub fn question_answer(messages: &[ChatMessage]) -> (String, String) {
    let last = |role: &str| {
        messages
            .iter()
            .rev()
            .find(|m| m.role == role)
            .map(|m| m.content.clone())
            .unwrap_or_default()
    };
    (last("user"), last("assistant"))
}

/// `messages` with the question and answer replaced (a system turn is kept).
pub fn edited_messages(messages: &[ChatMessage], question: &str, answer: &str) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = messages
        .iter()
        .filter(|m| m.role == "system")
        .cloned()
        .collect();
    out.push(ChatMessage {
        role: "user".into(),
        content: question.trim().to_string(),
    });
    out.push(ChatMessage {
        role: "assistant".into(),
        content: answer.trim().to_string(),
    });
    out
}

/// "1 row", "2 rows".
fn rows_word(n: u64, what: &str) -> String {
    format!("{n} {what} {}", if n == 1 { "row" } else { "rows" })
}

/// A dataset made here, in one line.
pub fn made_text(d: &DatasetSummary) -> String {
    format!(
        "Dataset “{}”: {}, {} ({}).",
        d.name,
        rows_word(d.train_rows, "training"),
        rows_word(d.valid_rows, "validation"),
        split_text(&d.split)
    )
}

fn form_error(message: impl Into<String>) -> IpcError {
    IpcError {
        code: ErrorCode::InvalidInput,
        message: message.into(),
    }
}

/// The labels of the two modes.
fn mode_label(m: TeacherMode) -> &'static str {
    match m {
        TeacherMode::Qa => "Question-answer pairs",
        TeacherMode::Instructions => "Instructions and responses",
    }
}

/// The page.
#[component]
pub fn DocsPage() -> impl IntoView {
    let ctx = AppCtx::get();
    let catalog = TargetCatalog::load();

    // 1. Documents.
    let path = RwSignal::new(String::new());
    let set_name = RwSignal::new(String::new());
    let chunk_chars = RwSignal::new(DEFAULT_CHUNK_CHARS.to_string());
    let importing = RwSignal::new(false);
    let import_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let sets: RwSignal<Vec<DocsetSummary>> = RwSignal::new(Vec::new());
    let list_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let current: RwSignal<Option<DocsetSummary>> = RwSignal::new(None);
    let chunks: RwSignal<Vec<DocChunk>> = RwSignal::new(Vec::new());
    let rows: RwSignal<Vec<DocRow>> = RwSignal::new(Vec::new());
    let rows_error: RwSignal<Option<IpcError>> = RwSignal::new(None);

    // 2. Teacher.
    let teacher: RwSignal<Option<ChatTarget>> = RwSignal::new(None);
    let mode = RwSignal::new(TeacherMode::Qa);
    let count = RwSignal::new("3".to_string());
    let max_tokens = RwSignal::new("512".to_string());
    let temperature = RwSignal::new("0.3".to_string());
    let max_chunks = RwSignal::new(String::new());
    let template: RwSignal<Option<TemplateRecord>> = RwSignal::new(None);
    let prompt_system = RwSignal::new(String::new());
    let prompt_user = RwSignal::new(String::new());
    let prompt_note: RwSignal<Option<String>> = RwSignal::new(None);
    let prompt_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let teaching = RwSignal::new(false);
    let progress: RwSignal<Option<(u64, u64)>> = RwSignal::new(None);
    let teach_note: RwSignal<Option<String>> = RwSignal::new(None);
    let teach_error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let request = StoredValue::new(None::<String>);

    // 3./4. Review and datasets.
    let filter: RwSignal<Option<DocRowStatus>> = RwSignal::new(None);
    let dataset_name = RwSignal::new(String::new());
    let valid_percent = RwSignal::new("10".to_string());
    let pretrain_name = RwSignal::new(String::new());
    let making = RwSignal::new(false);
    let made: RwSignal<Option<DatasetSummary>> = RwSignal::new(None);
    let made_pretrain: RwSignal<Option<DatasetSummary>> = RwSignal::new(None);
    let make_error: RwSignal<Option<IpcError>> = RwSignal::new(None);

    let reload_sets = move || {
        spawn_local(async move {
            match ipc::docs::list_docsets().await {
                Ok(list) => {
                    // Keep the open set's figures current.
                    if let Some(open) = current.get_untracked() {
                        if let Some(s) = list.iter().find(|s| s.id == open.id) {
                            current.set(Some(s.clone()));
                        }
                    }
                    sets.set(list);
                    list_error.set(None);
                }
                Err(e) => list_error.set(Some(e)),
            }
        });
    };
    Effect::new(move |_| {
        ctx.library_version.track();
        reload_sets();
    });

    let reload_rows = move |set_id: i64| {
        spawn_local(async move {
            match ipc::docs::docset_rows(set_id).await {
                Ok(list) => {
                    if current.with_untracked(|c| c.as_ref().map(|c| c.id)) == Some(set_id) {
                        rows.set(list);
                    }
                }
                Err(e) => rows_error.set(Some(e)),
            }
        });
    };

    let open_set = move |s: DocsetSummary| {
        let id = s.id;
        dataset_name.set(format!("{}-qa", s.name));
        pretrain_name.set(format!("{}-text", s.name));
        current.set(Some(s));
        rows.set(Vec::new());
        chunks.set(Vec::new());
        made.set(None);
        made_pretrain.set(None);
        rows_error.set(None);
        teach_note.set(None);
        progress.set(None);
        reload_rows(id);
        spawn_local(async move {
            match ipc::docs::docset_chunks(id).await {
                Ok(list) => chunks.set(list),
                Err(e) => rows_error.set(Some(e)),
            }
        });
    };

    // The teacher prompt: the stored template of the mode, newest version.
    let show_template = move |t: TemplateRecord| {
        prompt_system.set(t.system.clone().unwrap_or_default());
        prompt_user.set(t.user.clone().unwrap_or_default());
        prompt_note.set(Some(format!(
            "Template “{}”, version {} of {}",
            t.name, t.version, t.versions
        )));
        template.set(Some(t));
    };
    Effect::new(move |_| {
        let m = mode.get();
        spawn_local(async move {
            match ipc::docs::teacher_template(m).await {
                Ok(t) => {
                    prompt_error.set(None);
                    show_template(t);
                }
                Err(e) => prompt_error.set(Some(e)),
            }
        });
    });
    // Saves the editor's prompt (a new version only when it changed); the stored version.
    let save_prompt = move || async move {
        let Some(t) = template.get_untracked() else {
            return Err(form_error("The teacher prompt has not loaded yet."));
        };
        let draft = TemplateDraft {
            id: Some(t.id),
            name: t.name.clone(),
            system: Some(prompt_system.get_untracked()),
            examples: t.examples.clone(),
            user: Some(prompt_user.get_untracked()),
            variables: t.variables.clone(),
            note: Some("edited on the Documents page".into()),
        };
        let saved = ipc::templates::save_template(&draft).await?;
        show_template(saved.clone());
        if saved.version != t.version {
            ctx.library_changed();
        }
        Ok(saved)
    };

    let browse = move |_| {
        spawn_local(async move {
            match ipc::models::pick_path("Choose the folder of documents", true, &[]).await {
                Ok(Some(p)) => {
                    if set_name.get_untracked().trim().is_empty() {
                        let base = p
                            .trim_end_matches(['/', '\\'])
                            .rsplit(['/', '\\'])
                            .next()
                            .unwrap_or_default()
                            .to_string();
                        set_name.set(base);
                    }
                    path.set(p);
                }
                Ok(None) => {}
                Err(e) => import_error.set(Some(e)),
            }
        });
    };

    let import = move |_| {
        import_error.set(None);
        let dir = path.get_untracked().trim().to_string();
        if dir.is_empty() {
            import_error.set(Some(form_error(
                "Choose the folder of documents, or type its path.",
            )));
            return;
        }
        let name = set_name.get_untracked().trim().to_string();
        if name.is_empty() {
            import_error.set(Some(form_error("Give the document set a name.")));
            return;
        }
        let max = match whole(
            &chunk_chars.get_untracked(),
            "Chunk size",
            CHUNK_RANGE.0 as u64,
            CHUNK_RANGE.1 as u64,
        ) {
            Ok(v) => v as usize,
            Err(m) => {
                import_error.set(Some(form_error(m)));
                return;
            }
        };
        importing.set(true);
        spawn_local(async move {
            let options = attune_protocol::DocImportOptions {
                name,
                max_chunk_chars: max,
            };
            match ipc::docs::import_docs(&dir, &options).await {
                Ok(set) => {
                    open_set(set);
                    reload_sets();
                }
                Err(e) => import_error.set(Some(e)),
            }
            importing.set(false);
        });
    };

    let delete_set = move |id: i64| {
        spawn_local(async move {
            match ipc::docs::remove_docset(id).await {
                Ok(()) => {
                    if current.with_untracked(|c| c.as_ref().map(|c| c.id)) == Some(id) {
                        current.set(None);
                        rows.set(Vec::new());
                        chunks.set(Vec::new());
                    }
                    reload_sets();
                }
                Err(e) => list_error.set(Some(e)),
            }
        });
    };

    let teach_form = move || TeachForm {
        mode: mode.get_untracked(),
        count: count.get_untracked(),
        max_tokens: max_tokens.get_untracked(),
        temperature: temperature.get_untracked(),
        max_chunks: max_chunks.get_untracked(),
    };

    let generate = move |_| {
        teach_error.set(None);
        teach_note.set(None);
        let Some(set) = current.get_untracked() else {
            return;
        };
        // Checked before the prompt is saved: nothing is stored for a form with a mistake.
        if let Err(m) = build_spec(&teach_form(), teacher.get_untracked(), None) {
            teach_error.set(Some(form_error(m)));
            return;
        }
        teaching.set(true);
        progress.set(None);
        spawn_local(async move {
            let spec = match save_prompt().await {
                Ok(t) => build_spec(&teach_form(), teacher.get_untracked(), Some(t.id))
                    .map_err(form_error),
                Err(e) => Err(e),
            };
            let spec = match spec {
                Ok(s) => s,
                Err(e) => {
                    teach_error.set(Some(e));
                    teaching.set(false);
                    return;
                }
            };
            let request_id = ipc::chat::new_request_id("docs");
            request.set_value(Some(request_id.clone()));
            let set_id = set.id;
            let on_event = move |ev: Result<TeachEvent, IpcError>| match ev {
                Ok(TeachEvent::Started { total }) => progress.set(Some((0, total))),
                Ok(TeachEvent::Chunk { done, total }) => {
                    progress.set(Some((done, total)));
                    // The grid fills in as the chunks are taught.
                    reload_rows(set_id);
                }
                Err(e) => teach_error.set(Some(e)),
            };
            match ipc::docs::teach_docs(&request_id, set_id, &spec, on_event).await {
                Ok(r) if r.chunks == 0 => teach_note.set(Some(
                    "Every chunk already has rows: nothing to teach. Regenerate a row to ask again."
                        .into(),
                )),
                Ok(r) => teach_note.set(Some(format!(
                    "Taught {} chunks: {} rows to review, {} chunks without a usable answer.",
                    r.chunks, r.rows, r.failed
                ))),
                Err(e) if e.code == ErrorCode::Cancelled => {
                    let done = progress.get_untracked().map(|p| p.0).unwrap_or(0);
                    teach_note.set(Some(format!(
                        "Stopped. The rows of the {done} chunks taught before Cancel are kept; \
                         the chunk being answered left nothing. Generate again to go on."
                    )));
                }
                Err(e) => teach_error.set(Some(e)),
            }
            request.set_value(None);
            teaching.set(false);
            reload_rows(set_id);
            reload_sets();
        });
    };
    let cancel = move |_| {
        if let Some(id) = request.get_value() {
            spawn_local(async move {
                if let Err(e) = ipc::chat::cancel_chat(&id).await {
                    teach_error.set(Some(e));
                }
            });
        }
    };

    // One row changed: replace it in the grid.
    let put_row = move |r: DocRow| {
        rows.update(|list| {
            if let Some(slot) = list.iter_mut().find(|x| x.id == r.id) {
                *slot = r;
            }
        });
    };
    let review = Callback::new(
        move |(id, action, error): (i64, ReviewAction, RwSignal<Option<IpcError>>)| {
            error.set(None);
            spawn_local(async move {
                match ipc::docs::review_doc_row(id, &action).await {
                    Ok(r) => put_row(r),
                    Err(e) => error.set(Some(e)),
                }
            });
        },
    );
    let regenerating: RwSignal<Option<i64>> = RwSignal::new(None);
    let regenerate = Callback::new(move |(id, error): (i64, RwSignal<Option<IpcError>>)| {
        error.set(None);
        let Some(set) = current.get_untracked() else {
            return;
        };
        regenerating.set(Some(id));
        spawn_local(async move {
            let spec = match save_prompt().await {
                Ok(t) => build_spec(&teach_form(), teacher.get_untracked(), Some(t.id))
                    .map_err(form_error),
                Err(e) => Err(e),
            };
            match spec {
                Ok(spec) => {
                    let request_id = ipc::chat::new_request_id("docs");
                    request.set_value(Some(request_id.clone()));
                    if let Err(e) = ipc::docs::regenerate_doc_row(&request_id, id, &spec).await {
                        error.set(Some(e));
                    }
                    request.set_value(None);
                }
                Err(e) => error.set(Some(e)),
            }
            regenerating.set(None);
            reload_rows(set.id);
        });
    });
    let accept_all = move |_| {
        rows_error.set(None);
        let Some(set) = current.get_untracked() else {
            return;
        };
        spawn_local(async move {
            match ipc::docs::accept_all_doc_rows(set.id).await {
                Ok(_) => reload_rows(set.id),
                Err(e) => rows_error.set(Some(e)),
            }
        });
    };

    let make = move |pretrain: bool| {
        make_error.set(None);
        let Some(set) = current.get_untracked() else {
            return;
        };
        let split = match dataset_split(&valid_percent.get_untracked()) {
            Ok(s) => s,
            Err(m) => {
                make_error.set(Some(form_error(m)));
                return;
            }
        };
        let name = if pretrain {
            pretrain_name
        } else {
            dataset_name
        }
        .get_untracked()
        .trim()
        .to_string();
        if name.is_empty() {
            make_error.set(Some(form_error("Give the dataset a name.")));
            return;
        }
        making.set(true);
        spawn_local(async move {
            let result = if pretrain {
                ipc::docs::docset_pretrain_dataset(set.id, &name, &split).await
            } else {
                ipc::docs::docset_dataset(set.id, &name, &split).await
            };
            match result {
                Ok(d) => {
                    if pretrain {
                        made_pretrain.set(Some(d));
                    } else {
                        made.set(Some(d));
                    }
                    ctx.library_changed();
                }
                Err(e) => make_error.set(Some(e)),
            }
            making.set(false);
        });
    };

    let busy = Signal::derive(move || teaching.get() || regenerating.get().is_some());

    let documents_view = move || {
        current.get().map(|s| {
            let docs = s.documents.clone();
            let skipped = s.skipped.clone();
            view! {
                <div class="docs-summary" id="docs-summary">
                    <p id="docs-counts-read" data-testid="docs-counts-read">
                        {format!(
                            "{} documents read into {} chunks (at most {} characters each); {} files skipped.",
                            s.documents.len(),
                            s.chunks,
                            s.max_chunk_chars,
                            s.skipped.len()
                        )}
                    </p>
                    <div class="table-wrap">
                        <table class="docs-documents" id="docs-documents">
                            <thead><tr><th>"Document"</th><th>"Kind"</th><th>"Pages"</th><th>"Characters"</th><th>"Chunks"</th></tr></thead>
                            <tbody>
                                {docs.into_iter().map(|d| view! {
                                    <tr data-testid="docs-document">
                                        <td>{d.path}</td>
                                        <td>{d.format.as_str()}</td>
                                        <td>{d.pages.map(|p| p.to_string()).unwrap_or_else(|| "—".into())}</td>
                                        <td>{d.chars}</td>
                                        <td>{d.chunks}</td>
                                    </tr>
                                }).collect_view()}
                            </tbody>
                        </table>
                    </div>
                    {(!skipped.is_empty()).then(|| view! {
                        <div class="docs-skipped" id="docs-skipped">
                            <h3>"Not read"</h3>
                            <ul>
                                {skipped.into_iter().map(|k| view! {
                                    <li data-testid="docs-skipped-file"><strong>{k.path}</strong>": "{k.reason}</li>
                                }).collect_view()}
                            </ul>
                        </div>
                    })}
                    <details class="docs-chunks" id="docs-chunks">
                        <summary>{move || format!("Show the {} chunks", chunks.with(Vec::len))}</summary>
                        <ol>
                            {move || chunks.get().into_iter().map(|c| view! {
                                <li>
                                    <span class="docs-where">{c.provenance.describe()}</span>
                                    <p class="docs-passage">{c.text}</p>
                                </li>
                            }).collect_view()}
                        </ol>
                    </details>
                </div>
            }
        })
    };

    let teacher_view = view! {
        <div class="card docs-teacher" id="docs-teacher">
            <h2>"2. The teacher writes rows"</h2>
            <p class="field-hint">"A model reads each chunk and writes training rows from it, using only the passage. Every row waits for your review."</p>
            <div class="grid-3">
                <Field label="Teacher" hint="A local model, an adapter or an API model.">
                    <TargetSelect catalog=catalog selected=teacher id="docs-teacher-target" disabled=busy />
                </Field>
                <Field label="Rows to write">
                    <select id="docs-mode" on:change=move |ev| mode.set(if event_target_value(&ev) == "instructions" { TeacherMode::Instructions } else { TeacherMode::Qa })>
                        {[TeacherMode::Qa, TeacherMode::Instructions].into_iter().map(|m| view! {
                            <option value=m.as_str() selected=move || mode.get() == m>{mode_label(m)}</option>
                        }).collect_view()}
                    </select>
                </Field>
                <Field label="How many chunks" hint="Empty: every chunk without rows yet.">
                    <input type="number" min="1" id="docs-max-chunks" prop:value=move || max_chunks.get() on:input=move |ev| max_chunks.set(event_target_value(&ev)) />
                </Field>
                <Field label="Rows per chunk" hint="1 to 20.">
                    <input type="number" min="1" max="20" id="docs-count" prop:value=move || count.get() on:input=move |ev| count.set(event_target_value(&ev)) />
                </Field>
                <Field label="Most tokens per chunk" hint="The teacher stops here; a cut-off row is dropped.">
                    <input type="number" min="1" id="docs-max-tokens" prop:value=move || max_tokens.get() on:input=move |ev| max_tokens.set(event_target_value(&ev)) />
                </Field>
                <Field label="Temperature" hint="0 always writes the same rows.">
                    <input type="number" min="0" max="2" step="0.05" id="docs-temperature" prop:value=move || temperature.get() on:input=move |ev| temperature.set(event_target_value(&ev)) />
                </Field>
            </div>
            <details class="docs-prompt" id="docs-prompt">
                <summary>
                    "Teacher prompt "
                    <span class="muted" id="docs-prompt-version">{move || prompt_note.get()}</span>
                </summary>
                <p class="field-hint">"{{input}} is the passage; {{document}} and {{section}} say where it comes from; {{count}} is the rows per chunk. A changed prompt is saved as a new version of the template when you generate (every version is on the Templates page), and each row records the version that wrote it."</p>
                <Field label="Instructions to the teacher (system)">
                    <textarea id="docs-prompt-system" rows="5" prop:value=move || prompt_system.get() on:input=move |ev| prompt_system.set(event_target_value(&ev))></textarea>
                </Field>
                <Field label="Message per chunk (user)">
                    <textarea id="docs-prompt-user" rows="5" prop:value=move || prompt_user.get() on:input=move |ev| prompt_user.set(event_target_value(&ev))></textarea>
                </Field>
                <div class="row">
                    <button class="secondary" id="docs-prompt-save" on:click=move |_| {
                        prompt_error.set(None);
                        spawn_local(async move {
                            if let Err(e) = save_prompt().await {
                                prompt_error.set(Some(e));
                            }
                        });
                    }>"Save as a new version"</button>
                    <button class="secondary" id="docs-prompt-templates" on:click=move |_| ctx.go(Page::Templates)>"Open the Templates page"</button>
                </div>
                <ErrorSlot error=prompt_error />
            </details>
            <div class="row">
                <button id="docs-generate" disabled=move || busy.get() || current.with(Option::is_none) on:click=generate>"Generate rows"</button>
                {move || busy.get().then(|| view! { <button class="danger" id="docs-cancel" title="Stop the teacher: the answer being written is dropped, the rows already written stay" on:click=cancel>"Cancel"</button> })}
            </div>
            {move || progress.get().filter(|_| teaching.get()).map(|(done, total)| {
                let fraction = (total > 0).then(|| done as f64 / total as f64);
                view! {
                    <div id="docs-progress" data-testid="docs-progress">
                        <Progress fraction=Signal::derive(move || fraction) label=Signal::derive(move || format!("Chunk {done} of {total} taught")) />
                    </div>
                }
            })}
            {move || teach_note.get().map(|n| view! { <p class="notice" id="docs-teach-note">{n}</p> })}
            <ErrorSlot error=teach_error />
        </div>
    };

    let review_view = view! {
        <div class="card docs-review" id="docs-review">
            <div class="row">
                <h2>"3. Review each row beside its source"</h2>
                <span class="spacer"></span>
                <select id="docs-filter" on:change=move |ev| filter.set(DocRowStatus::parse(&event_target_value(&ev)))>
                    <option value="">"All rows"</option>
                    {DocRowStatus::ALL.into_iter().map(|s| view! { <option value=s.as_str()>{status_label(s)}</option> }).collect_view()}
                </select>
                <button class="secondary" id="docs-accept-all" disabled=move || rows.with(|r| !r.iter().any(|r| r.status == DocRowStatus::Pending)) on:click=accept_all>"Accept all to review"</button>
            </div>
            <p class="muted" id="docs-row-counts" data-testid="docs-row-counts">{move || rows.with(|r| counts_text(r))}</p>
            <ErrorSlot error=rows_error />
            <div class="docs-rows" id="docs-rows">
                <For
                    each=move || {
                        let f = filter.get();
                        rows.get().into_iter().filter(move |r| f.is_none_or(|f| r.status == f)).collect::<Vec<_>>()
                    }
                    key=|r| (r.id, r.status, r.reviewed_at.clone(), r.messages.iter().map(|m| m.content.clone()).collect::<Vec<String>>())
                    children=move |r| view! { <RowCard row=r review=review regenerate=regenerate regenerating=regenerating busy=busy /> }
                />
            </div>
        </div>
    };

    let datasets_view = view! {
        <div class="card docs-make" id="docs-make">
            <h2>"4. Make the datasets"</h2>
            <div class="grid-3">
                <Field label="Dataset name" hint="From the accepted and edited rows.">
                    <input type="text" id="docs-dataset-name" prop:value=move || dataset_name.get() on:input=move |ev| dataset_name.set(event_target_value(&ev)) />
                </Field>
                <Field label="Validation share" hint="Percent of rows held out to measure the adaptation (0: none).">
                    <input type="number" min="0" max="90" id="docs-valid" prop:value=move || valid_percent.get() on:input=move |ev| valid_percent.set(event_target_value(&ev)) />
                </Field>
                <Field label="Continued-pretraining name" hint="The documents' text itself, one block per chunk.">
                    <input type="text" id="docs-pretrain-name" prop:value=move || pretrain_name.get() on:input=move |ev| pretrain_name.set(event_target_value(&ev)) />
                </Field>
            </div>
            <div class="row">
                <button id="docs-make-dataset" disabled=move || making.get() || current.with(Option::is_none) on:click=move |_| make(false)>"Make dataset"</button>
                <button class="secondary" id="docs-make-pretrain" disabled=move || making.get() || current.with(Option::is_none) on:click=move |_| make(true)>"Make continued-pretraining dataset"</button>
            </div>
            <ErrorSlot error=make_error />
            {move || made.get().map(|d| {
                let id = d.id;
                view! {
                    <div class="notice docs-made" id="docs-made" data-testid="docs-made">
                        <span>{made_text(&d)}</span>
                        <button id="docs-adapt" on:click=move |_| { ctx.focus_dataset.set(Some(id)); ctx.go(Page::Adapt); }>"Adapt with this dataset"</button>
                    </div>
                }
            })}
            {move || made_pretrain.get().map(|d| {
                let id = d.id;
                view! {
                    <div class="notice docs-made" id="docs-made-pretrain">
                        <span>{made_text(&d)}</span>
                        <button class="secondary" id="docs-adapt-pretrain" on:click=move |_| { ctx.focus_dataset.set(Some(id)); ctx.go(Page::Adapt); }>"Adapt with this one"</button>
                    </div>
                }
            })}
        </div>
    };

    view! {
        <section class="page wide docs-page" id="docs-page">
            <h1>"Documents to data"</h1>
            <p class="muted">"Turn your own documents into training rows: a teacher model writes them, you check each one against its source, and the rows you keep become a dataset."</p>
            <div class="docs-layout">
                <div class="docs-side">
                    <div class="card docs-import">
                        <h2>"1. Read your documents"</h2>
                        <Field label="Folder" hint="PDF, Word (.docx), Markdown, HTML and text files; sub-folders included.">
                            <div class="row">
                                <input type="text" class="grow" id="docs-path" placeholder="~/Documents/guidelines" prop:value=move || path.get() on:input=move |ev| path.set(event_target_value(&ev)) />
                                <button class="secondary" id="docs-browse" on:click=browse>"Choose…"</button>
                            </div>
                        </Field>
                        <div class="grid-2">
                            <Field label="Name">
                                <input type="text" id="docs-name" prop:value=move || set_name.get() on:input=move |ev| set_name.set(event_target_value(&ev)) />
                            </Field>
                            <Field label="Chunk size" hint="Most characters per passage (200–20000).">
                                <input type="number" min="200" max="20000" step="100" id="docs-chunk-chars" prop:value=move || chunk_chars.get() on:input=move |ev| chunk_chars.set(event_target_value(&ev)) />
                            </Field>
                        </div>
                        <button id="docs-import" disabled=move || importing.get() on:click=import>
                            {move || if importing.get() { "Reading…" } else { "Read documents" }}
                        </button>
                        <ErrorSlot error=import_error />
                    </div>
                    <div class="card">
                        <h2>"Document sets"</h2>
                        <ErrorSlot error=list_error />
                        <ul class="docs-sets" id="docs-sets">
                            {move || {
                                let list = sets.get();
                                if list.is_empty() {
                                    return view! { <li class="muted">"None yet."</li> }.into_any();
                                }
                                list.into_iter().map(|s| {
                                    let sid = s.id;
                                    let meta = format!(
                                        "{} documents · {} chunks · {} to review · {} kept",
                                        s.documents.len(), s.chunks, s.pending, s.accepted + s.edited
                                    );
                                    let name = s.name.clone();
                                    view! {
                                        <li class:current=move || current.with(|c| c.as_ref().is_some_and(|c| c.id == sid))>
                                            <button class="link" id=format!("docs-open-{sid}") on:click=move |_| open_set(s.clone())>
                                                <span class="docs-set-name">{name}</span>
                                                <span class="muted">{meta}</span>
                                            </button>
                                            <ConfirmButton label="Delete" id=format!("docs-delete-{sid}") on_confirm=Callback::new(move |_| delete_set(sid)) />
                                        </li>
                                    }
                                }).collect_view().into_any()
                            }}
                        </ul>
                    </div>
                </div>
                <div class="docs-main">
                    {move || current.with(Option::is_none).then(|| view! {
                        <p class="empty card">"Read a folder of documents, or open a document set, to begin."</p>
                    })}
                    <div class="docs-open" style:display=move || if current.with(Option::is_some) { "flex" } else { "none" }>
                        <div class="card">
                            <h2>{move || current.get().map(|s| format!("“{}”", s.name)).unwrap_or_default()}</h2>
                            <p class="muted">{move || current.get().map(|s| format!("From {}", s.source_dir)).unwrap_or_default()}</p>
                            {documents_view}
                        </div>
                        {teacher_view}
                        {review_view}
                        {datasets_view}
                    </div>
                </div>
            </div>
        </section>
    }
}

/// One generated row beside its source passage, with its review buttons.
#[component]
fn RowCard(
    row: DocRow,
    review: Callback<(i64, ReviewAction, RwSignal<Option<IpcError>>)>,
    regenerate: Callback<(i64, RwSignal<Option<IpcError>>)>,
    regenerating: RwSignal<Option<i64>>,
    busy: Signal<bool>,
) -> impl IntoView {
    let id = row.id;
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let editing = RwSignal::new(false);
    let (question, answer) = question_answer(&row.messages);
    let q_edit = RwSignal::new(question.clone());
    let a_edit = RwSignal::new(answer.clone());
    let status = row.status;
    let failed = status == DocRowStatus::Failed;
    let messages = row.messages.clone();
    let where_ = row.provenance.describe();
    let provenance = format!(
        "Teacher {} · prompt “{}” v{}",
        row.teacher, row.template, row.template_version
    );
    let save = move |_| {
        let q = q_edit.get_untracked();
        let a = a_edit.get_untracked();
        if q.trim().is_empty() || a.trim().is_empty() {
            error.set(Some(form_error(
                "Neither the question nor the answer may be empty.",
            )));
            return;
        }
        editing.set(false);
        review.run((
            id,
            ReviewAction::Edit {
                messages: edited_messages(&messages, &q, &a),
            },
            error,
        ));
    };
    let (q_label, a_label) = match row.template.contains("instruction") {
        true => ("Instruction", "Response"),
        false => ("Question", "Answer"),
    };
    view! {
        <div class="docs-row" id=format!("docs-row-{id}") data-testid="docs-row" data-status=status.as_str()>
            <div class="docs-source">
                <span class="docs-where">{where_}</span>
                <p class="docs-passage">{row.passage.clone()}</p>
            </div>
            <div class="docs-generated">
                <div class="row">
                    <span class=format!("pill docs-status {}", status.as_str())>{status_label(status)}</span>
                    <span class="muted docs-made-by">{provenance}</span>
                </div>
                {if failed {
                    view! {
                        <div class="docs-failed">
                            <p>{row.error.clone().unwrap_or_default()}</p>
                            <details><summary>"What the teacher wrote"</summary><pre>{row.raw_output.clone()}</pre></details>
                        </div>
                    }.into_any()
                } else {
                    view! {
                        <div style:display=move || if editing.get() { "none" } else { "block" }>
                            <p class="docs-q"><strong>{q_label}": "</strong>{question.clone()}</p>
                            <p class="docs-a"><strong>{a_label}": "</strong>{answer.clone()}</p>
                        </div>
                        <div class="docs-edit" style:display=move || if editing.get() { "flex" } else { "none" }>
                            <Field label=q_label>
                                <textarea class="docs-edit-q" rows="2" prop:value=move || q_edit.get() on:input=move |ev| q_edit.set(event_target_value(&ev))></textarea>
                            </Field>
                            <Field label=a_label>
                                <textarea class="docs-edit-a" rows="4" prop:value=move || a_edit.get() on:input=move |ev| a_edit.set(event_target_value(&ev))></textarea>
                            </Field>
                        </div>
                    }.into_any()
                }}
                <div class="row docs-actions">
                    {(!failed).then(|| view! {
                        <button class="docs-accept" style:display=move || if editing.get() { "none" } else { "" } disabled={status == DocRowStatus::Accepted} on:click=move |_| review.run((id, ReviewAction::Accept, error))>"Accept"</button>
                        <button class="secondary docs-edit-start" style:display=move || if editing.get() { "none" } else { "" } on:click=move |_| editing.set(true)>"Edit"</button>
                        <button class="docs-edit-save" style:display=move || if editing.get() { "" } else { "none" } on:click=save>"Save edit"</button>
                        <button class="secondary docs-edit-cancel" style:display=move || if editing.get() { "" } else { "none" } on:click=move |_| editing.set(false)>"Cancel"</button>
                        <button class="secondary docs-reject" style:display=move || if editing.get() { "none" } else { "" } disabled={status == DocRowStatus::Rejected} on:click=move |_| review.run((id, ReviewAction::Reject, error))>"Reject"</button>
                    })}
                    <button class="secondary docs-regenerate" title="Ask the teacher again for this passage (this row is rejected; the new rows wait for review)" disabled=move || busy.get() on:click=move |_| regenerate.run((id, error))>
                        {move || if regenerating.get() == Some(id) { "Regenerating…" } else { "Regenerate" }}
                    </button>
                </div>
                <ErrorSlot error=error />
            </div>
        </div>
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attune_protocol::Provenance;

    fn form() -> TeachForm {
        TeachForm {
            mode: TeacherMode::Qa,
            count: "3".into(),
            max_tokens: "512".into(),
            temperature: "0.3".into(),
            max_chunks: String::new(),
        }
    }

    #[test]
    fn the_teacher_form_becomes_a_spec_or_says_what_is_wrong() {
        let t = ChatTarget::Base { model_id: 1 };
        let s = build_spec(&form(), Some(t.clone()), Some(7)).expect("spec");
        assert_eq!((s.count, s.max_tokens, s.max_chunks), (3, 512, None));
        assert_eq!(s.template.as_deref(), Some("7"));
        let two = TeachForm {
            max_chunks: " 2 ".into(),
            ..form()
        };
        assert_eq!(
            build_spec(&two, Some(t.clone()), None)
                .expect("spec")
                .max_chunks,
            Some(2)
        );
        assert!(build_spec(&form(), None, None)
            .unwrap_err()
            .contains("Choose the teacher"));
        for (bad, says) in [
            (
                TeachForm {
                    count: "0".into(),
                    ..form()
                },
                "Rows per chunk",
            ),
            (
                TeachForm {
                    count: "x".into(),
                    ..form()
                },
                "Rows per chunk",
            ),
            (
                TeachForm {
                    max_tokens: "".into(),
                    ..form()
                },
                "Most tokens",
            ),
            (
                TeachForm {
                    temperature: "-1".into(),
                    ..form()
                },
                "Temperature",
            ),
            (
                TeachForm {
                    max_chunks: "0".into(),
                    ..form()
                },
                "How many chunks",
            ),
        ] {
            let e = build_spec(&bad, Some(t.clone()), None).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn the_validation_share_is_a_seeded_split_or_all_train() {
        assert_eq!(dataset_split("0"), Ok(Split::AllTrain));
        assert_eq!(
            dataset_split("10"),
            Ok(Split::Seeded {
                valid_fraction: 0.1,
                test_fraction: 0.0,
                seed: 42
            })
        );
        assert!(dataset_split("100").is_err());
        let d = DatasetSummary {
            id: 1,
            name: "h-qa".into(),
            format: attune_protocol::DatasetFormat::Chat,
            kind: attune_protocol::SampleKind::Chat,
            source_path: String::new(),
            content_hash: String::new(),
            created_at: String::new(),
            train_rows: 1,
            valid_rows: 2,
            test_rows: 0,
            duplicates_removed: 0,
            bad_rows_skipped: 0,
            split: Split::AllTrain,
        };
        assert_eq!(
            made_text(&d),
            "Dataset “h-qa”: 1 training row, 2 validation rows (all rows train)."
        );
        assert!(dataset_split("abc").is_err());
    }

    fn row(id: i64, status: DocRowStatus) -> DocRow {
        DocRow {
            id,
            chunk_id: 1,
            status,
            messages: edited_messages(&[], "Q?", "A."),
            error: None,
            raw_output: String::new(),
            teacher: "t".into(),
            template: "docs-teacher-qa".into(),
            template_version: 1,
            provenance: Provenance {
                document: "a.pdf".into(),
                page_start: Some(1),
                page_end: Some(1),
                section: None,
            },
            passage: "p".into(),
            created_at: String::new(),
            reviewed_at: None,
        }
    }

    #[test]
    fn counts_and_edits_read_as_the_reviewer_sees_them() {
        assert!(counts_text(&[]).starts_with("No rows yet"));
        let rows = [
            row(1, DocRowStatus::Pending),
            row(2, DocRowStatus::Accepted),
            row(3, DocRowStatus::Edited),
            row(4, DocRowStatus::Failed),
        ];
        assert_eq!(
            counts_text(&rows),
            "4 rows: 1 to review · 1 accepted · 1 edited · 0 rejected · 1 failed"
        );
        let with_system = vec![
            ChatMessage {
                role: "system".into(),
                content: "S".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "old q".into(),
            },
            ChatMessage {
                role: "assistant".into(),
                content: "old a".into(),
            },
        ];
        assert_eq!(
            question_answer(&with_system),
            ("old q".to_string(), "old a".to_string())
        );
        let e = edited_messages(&with_system, " new q ", "new a");
        assert_eq!(
            e.iter()
                .map(|m| (m.role.as_str(), m.content.as_str()))
                .collect::<Vec<_>>(),
            [("system", "S"), ("user", "new q"), ("assistant", "new a")]
        );
    }
}
