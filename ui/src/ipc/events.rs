//! Events the shell emits to the window: run progress (`run-event`) and files
//! dropped on the window (`tauri://drag-drop`), through `window.__TAURI__.event.listen`.

use super::{bridge_error, describe, from_js};
use attune_protocol::{IpcError, RunUpdate};
use serde::Deserialize;
use wasm_bindgen::{JsCast, JsValue};

/// Calls `on_payload` with the payload of every `name` event, for the life of the page.
pub fn listen(name: &str, mut on_payload: impl FnMut(JsValue) + 'static) -> Result<(), IpcError> {
    let global = js_sys::global();
    let tauri = js_sys::Reflect::get(&global, &JsValue::from_str("__TAURI__"))
        .map_err(|e| bridge_error(describe(&e)))?;
    if tauri.is_undefined() || tauri.is_null() {
        return Err(bridge_error(
            "window.__TAURI__ is missing: this page must run inside the Attune app",
        ));
    }
    let event = js_sys::Reflect::get(&tauri, &JsValue::from_str("event"))
        .map_err(|e| bridge_error(describe(&e)))?;
    let listen = js_sys::Reflect::get(&event, &JsValue::from_str("listen"))
        .map_err(|e| bridge_error(describe(&e)))?
        .dyn_into::<js_sys::Function>()
        .map_err(|_| bridge_error("__TAURI__.event.listen is not a function"))?;
    let callback = wasm_bindgen::closure::Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
        let payload =
            js_sys::Reflect::get(&e, &JsValue::from_str("payload")).unwrap_or(JsValue::NULL);
        on_payload(payload);
    })
    .into_js_value();
    listen
        .call2(&event, &JsValue::from_str(name), &callback)
        .map_err(|e| bridge_error(describe(&e)))?;
    Ok(())
}

/// Every [`RunUpdate`] of runs this app executes.
pub fn listen_runs(mut on_update: impl FnMut(RunUpdate) + 'static) {
    let _ = listen("run-event", move |payload| {
        if let Ok(update) = from_js::<RunUpdate>(&payload) {
            on_update(update);
        }
    });
}

#[derive(Deserialize)]
struct DragDrop {
    #[serde(default)]
    paths: Vec<String>,
}

/// The paths of files and folders dropped on the window.
pub fn listen_drops(mut on_paths: impl FnMut(Vec<String>) + 'static) {
    let _ = listen("tauri://drag-drop", move |payload| {
        if let Ok(d) = from_js::<DragDrop>(&payload) {
            if !d.paths.is_empty() {
                on_paths(d.paths);
            }
        }
    });
}
