//! The bridge to the Tauri shell. Only this module (and its children) calls
//! `invoke`; each child mirrors one `src-tauri/src/commands/<domain>.rs`.
//!
//! Arguments and results cross as JSON: the protocol types are serialized with
//! serde_json, parsed into JS objects, and handed to
//! `window.__TAURI__.core.invoke` (the app sets `withGlobalTauri`).

pub mod adapters;
pub mod advisor;
pub mod arena;
pub mod chat;
pub mod datasets;
pub mod diagnostics;
pub mod docs;
pub mod endpoints;
pub mod events;
pub mod export;
pub mod models;
pub mod prefs;
pub mod runs;
pub mod server;
pub mod settings;
pub mod templates;

use attune_protocol::ErrorCode;
use attune_protocol::IpcError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

/// An error of the bridge itself, in the same shape the shell returns.
pub(crate) fn bridge_error(message: impl Into<String>) -> IpcError {
    IpcError {
        code: ErrorCode::Ipc,
        message: message.into(),
    }
}

/// Text of a JS value, for messages.
pub(crate) fn describe(value: &JsValue) -> String {
    if let Some(s) = value.as_string() {
        return s;
    }
    js_sys::JSON::stringify(value)
        .ok()
        .and_then(|s| s.as_string())
        .unwrap_or_else(|| format!("{value:?}"))
}

/// `window.__TAURI__.core`, or an error saying the page is not in the app.
fn tauri_core() -> Result<JsValue, IpcError> {
    let global = js_sys::global();
    let tauri = js_sys::Reflect::get(&global, &JsValue::from_str("__TAURI__"))
        .map_err(|e| bridge_error(describe(&e)))?;
    if tauri.is_undefined() || tauri.is_null() {
        return Err(bridge_error(
            "window.__TAURI__ is missing: this page must run inside the Attune app",
        ));
    }
    js_sys::Reflect::get(&tauri, &JsValue::from_str("core")).map_err(|e| bridge_error(describe(&e)))
}

/// Serializes `args` to a JS object.
pub(crate) fn to_js<T: Serialize>(args: &T) -> Result<JsValue, IpcError> {
    let json = serde_json::to_string(args)
        .map_err(|e| bridge_error(format!("could not encode arguments: {e}")))?;
    js_sys::JSON::parse(&json).map_err(|e| bridge_error(describe(&e)))
}

/// Deserializes a JS value (a command's result or a channel message).
pub(crate) fn from_js<T: DeserializeOwned>(value: &JsValue) -> Result<T, IpcError> {
    let json = if value.is_undefined() {
        "null".to_string()
    } else {
        js_sys::JSON::stringify(value)
            .map_err(|e| bridge_error(describe(&e)))?
            .as_string()
            .unwrap_or_else(|| "null".to_string())
    };
    serde_json::from_str(&json).map_err(|e| bridge_error(format!("unexpected reply {json}: {e}")))
}

/// Calls the command `cmd` with `args` (a JS object) and decodes its result.
pub(crate) async fn invoke_js<T: DeserializeOwned>(
    cmd: &str,
    args: JsValue,
) -> Result<T, IpcError> {
    let core = tauri_core()?;
    let invoke = js_sys::Reflect::get(&core, &JsValue::from_str("invoke"))
        .map_err(|e| bridge_error(describe(&e)))?
        .dyn_into::<js_sys::Function>()
        .map_err(|_| bridge_error("__TAURI__.core.invoke is not a function"))?;
    let promise = invoke
        .call2(&core, &JsValue::from_str(cmd), &args)
        .map_err(|e| bridge_error(describe(&e)))?
        .dyn_into::<js_sys::Promise>()
        .map_err(|_| bridge_error("__TAURI__.core.invoke did not return a promise"))?;
    match JsFuture::from(promise).await {
        Ok(value) => from_js(&value),
        Err(err) => Err(from_js::<IpcError>(&err).unwrap_or_else(|_| bridge_error(describe(&err)))),
    }
}

/// Calls the command `cmd` with serializable `args`.
pub(crate) async fn invoke<A: Serialize, T: DeserializeOwned>(
    cmd: &str,
    args: &A,
) -> Result<T, IpcError> {
    invoke_js(cmd, to_js(args)?).await
}

/// Calls `cmd` with `args`, which name a path the user typed. The shell only reads (or, with
/// `write`, creates) paths the user chose through it; when it answers `path_not_allowed`, this
/// asks the shell to show its own dialog for that path (`confirm_path`, which the page cannot
/// answer for the user) and, once allowed, calls again (at most three paths per call).
pub(crate) async fn invoke_granted<A: Serialize, T: DeserializeOwned>(
    cmd: &str,
    args: &A,
    write: bool,
) -> Result<T, IpcError> {
    let mut asked = 0;
    loop {
        match invoke(cmd, args).await {
            Err(e) if e.code == ErrorCode::PathNotAllowed && asked < 3 => {
                let Some((path, _)) = e.message.split_once(" was not chosen in this window") else {
                    return Err(e);
                };
                asked += 1;
                if !models::confirm_path(path, write).await? {
                    return Err(e);
                }
            }
            other => return other,
        }
    }
}

/// A `window.__TAURI__.core.Channel` whose messages go to a Rust closure.
///
/// The callback is handed to JS (its garbage collector frees it with the
/// channel), so messages that arrive after the command resolved are still safe.
pub(crate) struct Channel {
    js: JsValue,
}

impl Channel {
    /// Creates a channel that calls `on_message` with each message.
    pub(crate) fn new(on_message: impl FnMut(JsValue) + 'static) -> Result<Self, IpcError> {
        let core = tauri_core()?;
        let class = js_sys::Reflect::get(&core, &JsValue::from_str("Channel"))
            .map_err(|e| bridge_error(describe(&e)))?
            .dyn_into::<js_sys::Function>()
            .map_err(|_| bridge_error("__TAURI__.core.Channel is not a class"))?;
        let js = js_sys::Reflect::construct(&class, &js_sys::Array::new())
            .map_err(|e| bridge_error(describe(&e)))?;
        let callback =
            wasm_bindgen::closure::Closure::<dyn FnMut(JsValue)>::new(on_message).into_js_value();
        js_sys::Reflect::set(&js, &JsValue::from_str("onmessage"), &callback)
            .map_err(|e| bridge_error(describe(&e)))?;
        Ok(Self { js })
    }

    /// The JS object, to put in a command's arguments.
    pub(crate) fn as_js(&self) -> &JsValue {
        &self.js
    }
}

/// Calls `cmd` with `args` plus a channel under `channel_arg` whose messages
/// (decoded as `E`) go to `on_message`.
pub(crate) async fn invoke_with_channel<A: Serialize, E: DeserializeOwned, T: DeserializeOwned>(
    cmd: &str,
    args: &A,
    channel_arg: &str,
    mut on_message: impl FnMut(Result<E, IpcError>) + 'static,
) -> Result<T, IpcError> {
    let channel = Channel::new(move |message: JsValue| on_message(from_js(&message)))?;
    let args = to_js(args)?;
    js_sys::Reflect::set(&args, &JsValue::from_str(channel_arg), channel.as_js())
        .map_err(|_| bridge_error("could not attach the event channel"))?;
    invoke_js(cmd, args).await
}
