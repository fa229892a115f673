//! The model library: every registered model with its figures, and a form to
//! register a model file from this machine.

use crate::{format, ipc, reload_models, ModelsState};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// The models page.
#[component]
pub fn ModelsPage(models: ModelsState) -> impl IntoView {
    let path = RwSignal::new(String::new());
    let busy = RwSignal::new(false);
    let notice: RwSignal<Option<(bool, String)>> = RwSignal::new(None);

    let add = move || {
        let p = path.get_untracked().trim().to_string();
        if p.is_empty() || busy.get_untracked() {
            return;
        }
        busy.set(true);
        notice.set(None);
        spawn_local(async move {
            match ipc::models::add_model(&p).await {
                Ok(added) => {
                    let what = if added.already_present {
                        "is already in the library"
                    } else {
                        "was added"
                    };
                    notice.set(Some((true, format!("{} {what}.", added.model.name))));
                    path.set(String::new());
                    reload_models(models);
                }
                Err(e) => notice.set(Some((false, e.message))),
            }
            busy.set(false);
        });
    };

    view! {
        <section class="page models-page" id="models-page">
            <h1>"Models"</h1>
            <p class="muted">"Models registered in your library. Files stay where they are; Attune records their figures and checksum."</p>
            {move || match models.get() {
                None => view! { <p class="muted" id="models-loading">"Loading…"</p> }.into_any(),
                Some(Err(_)) => view! { <p class="muted">"The library is unavailable."</p> }.into_any(),
                Some(Ok(list)) if list.is_empty() => {
                    view! {
                        <p class="empty" id="models-empty">
                            "No models yet. Add a GGUF file below, or run "
                            <code>"attune models add <path>"</code>
                            "."
                        </p>
                    }
                        .into_any()
                }
                Some(Ok(list)) => {
                    view! {
                        <div class="table-wrap">
                            <table class="models-table" id="models-table">
                                <thead>
                                    <tr>
                                        <th>"Name"</th>
                                        <th>"Architecture"</th>
                                        <th class="num">"Parameters"</th>
                                        <th>"Quantization"</th>
                                        <th class="num">"Context"</th>
                                        <th class="num">"Size"</th>
                                        <th>"SHA-256"</th>
                                        <th>"Source"</th>
                                    </tr>
                                </thead>
                                <tbody>
                                    {list
                                        .into_iter()
                                        .map(|m| {
                                            let sha_title = m.sha256.clone();
                                            let source = format::source(&m.source);
                                            view! {
                                                <tr data-testid="model-row" data-model-id=m.id.to_string()>
                                                    <td class="name" data-testid="model-name">{m.name.clone()}</td>
                                                    <td>{m.architecture.clone()}</td>
                                                    <td class="num">{format::parameters(m.parameters)}</td>
                                                    <td><span class="pill">{m.quantization.clone()}</span></td>
                                                    <td class="num">{format::context(m.context_length)}</td>
                                                    <td class="num">{format::bytes(m.file_size)}</td>
                                                    <td><code title=sha_title>{format::sha_prefix(&m.sha256)}</code></td>
                                                    <td class="source" title=source.clone()>{source.clone()}</td>
                                                </tr>
                                            }
                                        })
                                        .collect_view()}
                                </tbody>
                            </table>
                        </div>
                    }
                        .into_any()
                }
            }}
            <form
                class="add-model"
                on:submit=move |ev| {
                    ev.prevent_default();
                    add();
                }
            >
                <label for="add-model-path">"Add a model file"</label>
                <div class="row">
                    <input
                        id="add-model-path"
                        type="text"
                        placeholder="/path/to/model.gguf"
                        prop:value=move || path.get()
                        on:input=move |ev| path.set(event_target_value(&ev))
                    />
                    <button id="add-model-button" type="submit" disabled=move || busy.get()>
                        {move || if busy.get() { "Adding…" } else { "Add" }}
                    </button>
                </div>
                {move || {
                    notice
                        .get()
                        .map(|(ok, text)| {
                            view! {
                                <p class="notice" class:error=!ok id="add-model-notice">
                                    {text}
                                </p>
                            }
                        })
                }}
            </form>
        </section>
    }
}
