//! Export commands: what a model or adapter can be exported as (with size estimates), run an
//! export (progress streamed, cancellable), list past exports, and show a folder in the
//! system's file manager.

use super::{blocking, invalid};
use crate::AppState;
use attune_protocol::ErrorCode;
use attune_protocol::{
    ExportOptions, ExportProgress, ExportRecord, ExportRequest, ExportSubject, IpcError,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tauri::ipc::Channel;
use tauri::State;

/// The cancel flag of the running export (one export runs at a time from the window).
#[derive(Default)]
pub struct ExportState {
    cancel: Arc<AtomicBool>,
    running: Arc<AtomicBool>,
}

/// The formats `subject` can be exported as, why the others cannot, and the size of each type.
#[tauri::command]
pub async fn export_options(
    state: State<'_, AppState>,
    subject: ExportSubject,
) -> Result<ExportOptions, IpcError> {
    let engine = state.engine()?;
    blocking(move || {
        engine
            .export_options(&subject)
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Runs an export; progress streams on `on_progress`. The record holds the verification.
#[tauri::command]
pub async fn start_export(
    state: State<'_, AppState>,
    exports: State<'_, ExportState>,
    request: ExportRequest,
    on_progress: Channel<ExportProgress>,
) -> Result<ExportRecord, IpcError> {
    let engine = state.engine()?;
    if request.dest.trim().is_empty() {
        return Err(invalid("destination: choose a folder to export into"));
    }
    if exports.running.swap(true, Ordering::SeqCst) {
        return Err(IpcError {
            code: ErrorCode::Busy,
            message: "an export is already running; wait for it or cancel it".into(),
        });
    }
    let cancel = exports.cancel.clone();
    let running = exports.running.clone();
    cancel.store(false, Ordering::SeqCst);
    let mut request = request;
    // The destination is a folder the user chose (or a new one inside it); an export may
    // replace files there only by name and only with the request's `overwrite` consent.
    let dest = super::user_path(&request.dest);
    let granted = if dest.exists() {
        state.scope.readable(&dest)
    } else {
        state.scope.writable(&dest)
    };
    let dest = match granted {
        Ok(d) => d,
        Err(e) => {
            running.store(false, Ordering::SeqCst);
            return Err(e);
        }
    };
    request.dest = dest.display().to_string();
    let result = blocking(move || {
        let mut forward = |p: ExportProgress| {
            // The window is gone: nobody waits for this export.
            if on_progress.send(p).is_err() {
                cancel.store(true, Ordering::SeqCst);
            }
        };
        engine
            .export(&request, &mut forward, &cancel)
            .map_err(|e| IpcError::from(&e))
    })
    .await;
    running.store(false, Ordering::SeqCst);
    result
}

/// Stops the running export: it fails with code "cancelled" and leaves no file behind.
#[tauri::command]
pub async fn cancel_export(exports: State<'_, ExportState>) -> Result<(), IpcError> {
    exports.cancel.store(true, Ordering::SeqCst);
    Ok(())
}

/// Every export, newest first.
#[tauri::command]
pub async fn list_exports(state: State<'_, AppState>) -> Result<Vec<ExportRecord>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_exports().map_err(|e| IpcError::from(&e))).await
}

/// Opens `path` (a folder) in the system's file manager.
#[tauri::command]
pub async fn show_in_folder(path: String) -> Result<(), IpcError> {
    let dir = super::user_path(&path);
    if !dir.is_dir() {
        return Err(invalid(format!(
            "folder {}: it does not exist (moved or deleted?)",
            dir.display()
        )));
    }
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(target_os = "windows") {
        "explorer"
    } else {
        "xdg-open"
    };
    std::process::Command::new(opener)
        .arg(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(|mut child| {
            // Reap it when the file manager returns; nobody waits on it here.
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        })
        .map_err(|e| IpcError {
            code: ErrorCode::Io,
            message: format!("cannot open {} with {opener}: {e}", dir.display()),
        })
}
