//! The local OpenAI-compatible server, switched on and off from the window: it serves
//! the app's own engine actor (the same queue as the playground), so the app and the
//! tools using the server take turns on the model.

use crate::AppState;
use attune_protocol::ErrorCode;
use attune_protocol::{IpcError, ServerSettings, ServerStatus};
use attune_server::{RunningServer, ServerOptions};
use tauri::State;

fn status_of(server: Option<&RunningServer>, key_required: bool) -> ServerStatus {
    match server {
        None => ServerStatus {
            running: false,
            base_url: None,
            api_key_required: false,
            curl_example: None,
        },
        Some(s) => {
            let base = format!("http://{}/v1", s.addr);
            let auth = if key_required {
                " -H \"Authorization: Bearer $ATTUNE_API_KEY\""
            } else {
                ""
            };
            ServerStatus {
                running: true,
                base_url: Some(base.clone()),
                api_key_required: key_required,
                curl_example: Some(format!(
                    "curl {base}/chat/completions -H \"Content-Type: application/json\"{auth} \
                     -d '{{\"model\": \"MODEL\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'"
                )),
            }
        }
    }
}

/// Whether the server runs, and its address.
#[tauri::command]
pub async fn server_status(state: State<'_, AppState>) -> Result<ServerStatus, IpcError> {
    let server = state.server.lock().unwrap_or_else(|p| p.into_inner());
    Ok(status_of(
        server.as_ref().map(|(s, _)| s),
        server.as_ref().is_some_and(|(_, k)| *k),
    ))
}

/// Starts the server (a running one is stopped first). Refused, with the reason, for a
/// host that is not an IP address, a non-loopback host without an API key, or a port
/// in use.
#[tauri::command]
pub async fn server_start(
    state: State<'_, AppState>,
    settings: ServerSettings,
) -> Result<ServerStatus, IpcError> {
    let actor = state.actor()?;
    let options = ServerOptions {
        host: settings.host.trim().to_string(),
        port: settings.port,
        api_key: settings.api_key.filter(|k| !k.trim().is_empty()),
    };
    let key = options.api_key.is_some();
    let previous = state
        .server
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let started = tauri::async_runtime::spawn_blocking(move || {
        if let Some((old, _)) = previous {
            old.stop();
        }
        RunningServer::start(actor, &options)
    })
    .await
    .map_err(|e| IpcError {
        code: ErrorCode::Internal,
        message: format!("the server did not start: {e}"),
    })?
    .map_err(|e| IpcError {
        code: ErrorCode::Server,
        message: e.to_string(),
    })?;
    let mut slot = state.server.lock().unwrap_or_else(|p| p.into_inner());
    *slot = Some((started, key));
    Ok(status_of(slot.as_ref().map(|(s, _)| s), key))
}

/// Stops the server (answers in progress finish first).
#[tauri::command]
pub async fn server_stop(state: State<'_, AppState>) -> Result<ServerStatus, IpcError> {
    let running = state
        .server
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some((server, _)) = running {
        tauri::async_runtime::spawn_blocking(move || server.stop())
            .await
            .map_err(|e| IpcError {
                code: ErrorCode::Internal,
                message: format!("the server did not stop cleanly: {e}"),
            })?;
    }
    Ok(status_of(None, false))
}
