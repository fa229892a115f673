//! The Connect page: Attune's own OpenAI-compatible server, switched on and off here,
//! with its address (copyable) and a curl example. Tools that speak the OpenAI API
//! (scripts, editors, other apps) then use every model, adapter and template of the
//! library by name. Below it, remote API endpoints (OpenAI, Ollama, vLLM, LM Studio,
//! llama.cpp's server, another Attune): their models become candidates in the
//! playground, the arena and template evaluation. Keys go to the OS keyring.

use crate::components::{ErrorSlot, Field};
use crate::{ipc, AppCtx};
use attune_protocol::ErrorCode;
use attune_protocol::{
    EndpointDraft, EndpointSummary, IpcError, KeyStorage, ServerSettings, ServerStatus,
};
use leptos::prelude::*;
use leptos::task::spawn_local;

/// Copies `text` to the clipboard (the webview's `navigator.clipboard.writeText`).
fn copy(text: String) {
    use wasm_bindgen::JsCast;
    let Some(w) = web_sys::window() else { return };
    let get = |o: &wasm_bindgen::JsValue, k: &str| js_sys::Reflect::get(o, &k.into()).ok();
    let Some(clipboard) = get(&w.into(), "navigator").and_then(|n| get(&n, "clipboard")) else {
        return;
    };
    if let Some(f) =
        get(&clipboard, "writeText").and_then(|f| f.dyn_into::<js_sys::Function>().ok())
    {
        let _ = f.call1(&clipboard, &text.into());
    }
}

#[component]
pub fn ConnectPage() -> impl IntoView {
    let ctx = AppCtx::get();
    let status: RwSignal<Option<ServerStatus>> = RwSignal::new(None);
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let busy = RwSignal::new(false);
    let host = RwSignal::new(
        ctx.setting("server.host")
            .unwrap_or_else(|| ServerSettings::default().host),
    );
    let port = RwSignal::new(
        ctx.setting("server.port")
            .unwrap_or_else(|| ServerSettings::default().port.to_string()),
    );
    let key = RwSignal::new(String::new());
    // Settings arrive after the page is built: take the stored host and port then.
    Effect::new(move |_| {
        ctx.settings.with(|s| {
            if let Some(h) = s.get("server.host") {
                host.set(h.clone());
            }
            if let Some(p) = s.get("server.port") {
                port.set(p.clone());
            }
        });
    });
    spawn_local(async move {
        match ipc::server::server_status().await {
            Ok(s) => status.set(Some(s)),
            Err(e) => error.set(Some(e)),
        }
    });

    let start = move |_| {
        let port_text = port.get_untracked();
        let Ok(port_n) = port_text.trim().parse::<u16>() else {
            error.set(Some(IpcError {
                code: ErrorCode::InvalidInput,
                message: format!("Port: '{port_text}' is not a port number (1-65535)."),
            }));
            return;
        };
        let settings = ServerSettings {
            host: host.get_untracked().trim().to_string(),
            port: port_n,
            api_key: Some(key.get_untracked()).filter(|k| !k.trim().is_empty()),
        };
        ctx.set_setting("server.host", settings.host.clone());
        ctx.set_setting("server.port", settings.port.to_string());
        busy.set(true);
        error.set(None);
        spawn_local(async move {
            match ipc::server::server_start(&settings).await {
                Ok(s) => status.set(Some(s)),
                Err(e) => error.set(Some(e)),
            }
            busy.set(false);
        });
    };
    let stop = move |_| {
        busy.set(true);
        spawn_local(async move {
            match ipc::server::server_stop().await {
                Ok(s) => status.set(Some(s)),
                Err(e) => error.set(Some(e)),
            }
            busy.set(false);
        });
    };
    let running = move || status.get().is_some_and(|s| s.running);

    view! {
        <div class="page connect-page">
            <h1>"Connect"</h1>
            <section class="card server-card" id="server-card">
                <h2>"Attune as an OpenAI-compatible server"</h2>
                <p class="muted">
                    "Tools that speak the OpenAI API reach every model, adapter and prompt template "
                    "of your library by name. Answers wait in the same queue as this window's."
                </p>
                <div class="server-form">
                    <Field label="Address" hint="127.0.0.1 keeps it on this computer; 0.0.0.0 opens it to your network and needs a key.">
                        <input type="text" id="server-host" prop:value=move || host.get()
                            on:input=move |ev| host.set(event_target_value(&ev))
                            disabled=running />
                    </Field>
                    <Field label="Port">
                        <input type="text" id="server-port" prop:value=move || port.get()
                            on:input=move |ev| port.set(event_target_value(&ev))
                            disabled=running />
                    </Field>
                    <Field label="API key (optional)" hint="Clients send it as a Bearer token. Kept in memory only while the server runs.">
                        <input type="password" id="server-key" autocomplete="off" prop:value=move || key.get()
                            on:input=move |ev| key.set(event_target_value(&ev))
                            disabled=running />
                    </Field>
                </div>
                <div class="actions">
                    {move || if running() {
                        view! { <button id="server-stop" class="secondary" disabled=move || busy.get() on:click=stop>"Stop the server"</button> }.into_any()
                    } else {
                        view! { <button id="server-start" disabled=move || busy.get() on:click=start>"Start the server"</button> }.into_any()
                    }}
                </div>
                <ErrorSlot error=error />
                {move || status.get().filter(|s| s.running).map(|s| {
                    let base = s.base_url.clone().unwrap_or_default();
                    let curl = s.curl_example.clone().unwrap_or_default();
                    let base_copy = base.clone();
                    let curl_copy = curl.clone();
                    view! {
                        <div class="server-running" data-testid="server-running">
                            <div class="row">
                                <span class="badge ok">"Running"</span>
                                <code class="selectable" id="server-url">{base}</code>
                                <button class="secondary small" on:click=move |_| copy(base_copy.clone())>"Copy"</button>
                            </div>
                            {s.api_key_required.then(|| view! { <p class="muted">"Clients must send the key: Authorization: Bearer …"</p> })}
                            <div class="row">
                                <pre class="curl selectable" id="server-curl">{curl}</pre>
                                <button class="secondary small" on:click=move |_| copy(curl_copy.clone())>"Copy"</button>
                            </div>
                            <p class="muted">"Replace MODEL with a name from GET /models (a model, an adapter or a template)."</p>
                        </div>
                    }
                })}
            </section>
            <EndpointsCard />
        </div>
    }
}

fn key_text(k: KeyStorage) -> &'static str {
    match k {
        KeyStorage::None => "no key",
        KeyStorage::Keyring => "key in the OS keyring",
        KeyStorage::Memory => "key in memory until Attune closes",
        KeyStorage::Missing => "key missing: add it again",
    }
}

/// Remote endpoints: the list (models, where the key is), adding, refreshing models,
/// giving a key again, removing.
#[component]
fn EndpointsCard() -> impl IntoView {
    let ctx = AppCtx::get();
    let list: RwSignal<Vec<EndpointSummary>> = RwSignal::new(Vec::new());
    let error: RwSignal<Option<IpcError>> = RwSignal::new(None);
    let note: RwSignal<Option<String>> = RwSignal::new(None);
    let busy = RwSignal::new(false);
    let name = RwSignal::new(String::new());
    let url = RwSignal::new(String::new());
    let key = RwSignal::new(String::new());
    let reload = move || {
        spawn_local(async move {
            match ipc::endpoints::list_endpoints().await {
                Ok(l) => list.set(l),
                Err(e) => error.set(Some(e)),
            }
        })
    };
    reload();
    // The pickers elsewhere list endpoint models: tell them.
    let changed = move || {
        ctx.library_changed();
        reload();
    };
    let refresh = move |id: i64| {
        busy.set(true);
        error.set(None);
        spawn_local(async move {
            if let Err(e) = ipc::endpoints::refresh_endpoint_models(id).await {
                error.set(Some(e));
            }
            busy.set(false);
            changed();
        });
    };
    let add = move |_| {
        let draft = EndpointDraft {
            name: name.get_untracked().trim().to_string(),
            base_url: url.get_untracked().trim().to_string(),
            api_key: Some(key.get_untracked()).filter(|k| !k.trim().is_empty()),
            ..Default::default()
        };
        busy.set(true);
        error.set(None);
        note.set(None);
        spawn_local(async move {
            match ipc::endpoints::add_endpoint(&draft).await {
                Ok(added) => {
                    note.set(added.key_note.clone());
                    name.set(String::new());
                    url.set(String::new());
                    key.set(String::new());
                    // Fetch its models at once; a failure is shown, the endpoint stays.
                    if let Err(e) = ipc::endpoints::refresh_endpoint_models(added.endpoint.id).await
                    {
                        error.set(Some(e));
                    }
                    changed();
                }
                Err(e) => error.set(Some(e)),
            }
            busy.set(false);
        });
    };
    let remove = move |id: i64| {
        spawn_local(async move {
            if let Err(e) = ipc::endpoints::remove_endpoint(id).await {
                error.set(Some(e));
            }
            changed();
        });
    };
    let give_key = move |id: i64, k: String| {
        spawn_local(async move {
            match ipc::endpoints::set_endpoint_key(id, &k).await {
                Ok(_) => changed(),
                Err(e) => error.set(Some(e)),
            }
        });
    };

    view! {
        <section class="card endpoints-card" id="endpoints-card">
            <h2>"API endpoints"</h2>
            <p class="muted">
                "Any OpenAI-compatible server: its models answer beside your local ones in the "
                "playground, the arena and template evaluation. Attune talks to no server you did not add."
            </p>
            <div class="endpoint-form">
                <Field label="Name">
                    <input type="text" id="endpoint-name" placeholder="OpenAI" prop:value=move || name.get()
                        on:input=move |ev| name.set(event_target_value(&ev)) />
                </Field>
                <Field label="Base URL" hint="e.g. https://api.openai.com/v1 or http://localhost:11434/v1 (Ollama)">
                    <input type="text" id="endpoint-url" prop:value=move || url.get()
                        on:input=move |ev| url.set(event_target_value(&ev)) />
                </Field>
                <Field label="API key (optional)" hint="Stored in the OS keyring, never in the library.">
                    <input type="password" id="endpoint-key" autocomplete="off" prop:value=move || key.get()
                        on:input=move |ev| key.set(event_target_value(&ev)) />
                </Field>
            </div>
            <div class="actions">
                <button id="endpoint-add" disabled=move || busy.get() on:click=add>"Add endpoint"</button>
            </div>
            {move || note.get().map(|n| view! { <p class="notice warning" id="endpoint-key-note">{n}</p> })}
            <ErrorSlot error=error />
            <table class="endpoints-table">
                <thead><tr><th>"Name"</th><th>"URL"</th><th>"Key"</th><th>"Models"</th><th></th></tr></thead>
                <tbody>
                    {move || list.get().into_iter().map(|e| {
                        let id = e.id;
                        let missing = e.key == KeyStorage::Missing;
                        let again = RwSignal::new(String::new());
                        let models = if e.models.is_empty() {
                            "none fetched yet".to_string()
                        } else {
                            e.models.join(", ")
                        };
                        view! {
                            <tr data-testid="endpoint-row">
                                <td class="name">{e.name.clone()}</td>
                                <td><code>{e.base_url.clone()}</code></td>
                                <td>
                                    {key_text(e.key)}
                                    {missing.then(|| view! {
                                        <span class="row">
                                            <input type="password" autocomplete="off" placeholder="key"
                                                on:input=move |ev| again.set(event_target_value(&ev)) />
                                            <button class="secondary small" on:click=move |_| give_key(id, again.get_untracked())>"Set"</button>
                                        </span>
                                    })}
                                </td>
                                <td class="endpoint-models">{models}</td>
                                <td class="actions">
                                    <button class="secondary small" disabled=move || busy.get() on:click=move |_| refresh(id)>"Refresh models"</button>
                                    <button class="danger small" on:click=move |_| remove(id)>"Remove"</button>
                                </td>
                            </tr>
                        }
                    }).collect_view()}
                </tbody>
            </table>
        </section>
    }
}
