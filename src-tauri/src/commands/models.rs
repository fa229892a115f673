//! Model library commands: list, register, remove and pull models from the Hugging
//! Face Hub, tell what a dropped or picked path is, and open the system file chooser.

use super::{blocking, invalid};
use crate::AppState;
use attune_protocol::ErrorCode;
use attune_protocol::{AddModelReply, DroppedFile, HubStatus, IpcError, ModelSummary, PullUpdate};
use std::sync::atomic::Ordering;
use tauri::ipc::Channel;
use tauri::{AppHandle, State};
use tauri_plugin_dialog::DialogExt;

/// All registered models, oldest first.
#[tauri::command]
pub async fn list_models(state: State<'_, AppState>) -> Result<Vec<ModelSummary>, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.list_models().map_err(|e| IpcError::from(&e))).await
}

/// Registers a model file (or Hugging Face folder) on this machine.
#[tauri::command]
pub async fn add_model(
    state: State<'_, AppState>,
    path: String,
) -> Result<AddModelReply, IpcError> {
    let engine = state.engine()?;
    if path.trim().is_empty() {
        return Err(invalid(
            "path: give the path of a .gguf file or model folder",
        ));
    }
    let path = state.scope.readable(&super::user_path(&path))?;
    blocking(move || {
        engine
            .add_local_model(&path)
            .map(|out| AddModelReply {
                model: out.model,
                already_present: out.already_present,
            })
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Removes a model from the library (its files stay); refused while runs or adapters
/// use it.
#[tauri::command]
pub async fn remove_model(state: State<'_, AppState>, id: i64) -> Result<(), IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.remove_model(id).map_err(|e| IpcError::from(&e))).await
}

/// Downloads `repo` (at `revision`, default "main"; `file` picks one `.gguf`) from the
/// Hugging Face Hub and registers it, streaming progress on `on_progress`.
#[tauri::command]
pub async fn pull_model(
    state: State<'_, AppState>,
    repo: String,
    revision: Option<String>,
    file: Option<String>,
    on_progress: Channel<PullUpdate>,
) -> Result<AddModelReply, IpcError> {
    let engine = state.engine()?;
    let repo = repo.trim().to_string();
    if repo.is_empty() {
        return Err(invalid(
            "repository: give a Hugging Face repository such as HuggingFaceTB/SmolLM2-135M-Instruct",
        ));
    }
    let revision = revision
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty());
    let file = file.map(|f| f.trim().to_string()).filter(|f| !f.is_empty());
    let cancel = state.pull_cancel.clone();
    cancel.store(false, Ordering::SeqCst);
    blocking(move || {
        let mut forward = |p: attune_engine::PullProgress| {
            let update = PullUpdate {
                file: p.file,
                file_index: p.file_index as u64,
                file_count: p.file_count as u64,
                bytes_done: p.bytes_done,
                total_bytes: p.total_bytes,
                cached: p.cached,
            };
            // The window is gone: nobody waits for this download.
            if on_progress.send(update).is_err() {
                cancel.store(true, Ordering::SeqCst);
            }
        };
        engine
            .pull_model_file(
                &repo,
                revision.as_deref(),
                file.as_deref(),
                &mut forward,
                &cancel,
            )
            .map(|out| AddModelReply {
                model: out.model,
                already_present: out.already_present,
            })
            .map_err(|e| IpcError::from(&e))
    })
    .await
}

/// Stops the running pull; it fails with code "cancelled" and registers nothing.
#[tauri::command]
pub async fn cancel_pull(state: State<'_, AppState>) -> Result<(), IpcError> {
    state.pull_cancel.store(true, Ordering::SeqCst);
    Ok(())
}

/// Whether the Hugging Face Hub can be reached from this machine (a connection within
/// a few seconds), so the first-start screen can say it is offline.
#[tauri::command]
pub async fn hub_status() -> Result<HubStatus, IpcError> {
    blocking(|| Ok(attune_engine::hub_status())).await
}

/// What `path` is: a model, a dataset, an adapter, or unusable (with the reason). Only for a
/// path the user granted (picked, dropped, or allowed when asked).
#[tauri::command]
pub async fn classify_path(
    state: State<'_, AppState>,
    path: String,
) -> Result<DroppedFile, IpcError> {
    let path = path.trim().to_string();
    if path.is_empty() {
        return Err(invalid("path: it is empty"));
    }
    let user = super::user_path(&path);
    state.scope.readable(&user)?;
    blocking(move || Ok(attune_engine::classify_path(&user))).await
}

/// Asks the user, in a native dialog the window cannot script, whether Attune may read
/// (`write`: create) `path`, typed into the window. Grants it when they allow it.
#[tauri::command]
pub async fn confirm_path(
    app: AppHandle,
    state: State<'_, AppState>,
    path: String,
    write: bool,
) -> Result<bool, IpcError> {
    use tauri_plugin_dialog::{MessageDialogButtons, MessageDialogKind};
    let path = super::user_path(&path);
    if path.as_os_str().is_empty() {
        return Err(invalid("path: it is empty"));
    }
    let shown = path.display().to_string();
    let allowed = blocking(move || {
        let question = if write {
            format!("Allow Attune to create this file or folder?\n\n{shown}")
        } else {
            format!("Allow Attune to read this file or folder?\n\n{shown}")
        };
        Ok(app
            .dialog()
            .message(question)
            .title("Attune: allow access")
            .kind(MessageDialogKind::Warning)
            .buttons(MessageDialogButtons::OkCancelCustom(
                "Allow".into(),
                "Cancel".into(),
            ))
            .blocking_show())
    })
    .await?;
    if allowed {
        state.scope.grant(&path);
    }
    Ok(allowed)
}

/// Opens the system's file (or, with `folder`, folder) chooser titled `title`,
/// showing files with `extensions` (all files when empty). None when dismissed.
#[tauri::command]
pub async fn pick_path(
    app: AppHandle,
    state: State<'_, AppState>,
    title: String,
    folder: bool,
    extensions: Vec<String>,
) -> Result<Option<String>, IpcError> {
    let picked = blocking(move || {
        let mut dialog = app.dialog().file();
        if !title.trim().is_empty() {
            dialog = dialog.set_title(title.trim());
        }
        let exts: Vec<&str> = extensions
            .iter()
            .map(|e| e.trim().trim_start_matches('.'))
            .filter(|e| !e.is_empty())
            .collect();
        if !folder && !exts.is_empty() {
            let label = exts
                .iter()
                .map(|e| format!(".{e}"))
                .collect::<Vec<_>>()
                .join(", ");
            dialog = dialog.add_filter(label, &exts);
        }
        let picked = if folder {
            dialog.blocking_pick_folder()
        } else {
            dialog.blocking_pick_file()
        };
        match picked {
            None => Ok(None),
            Some(p) => p
                .into_path()
                .map(|p| Some(p.display().to_string()))
                .map_err(|e| IpcError {
                    code: ErrorCode::Io,
                    message: format!("the chosen path cannot be used: {e}"),
                }),
        }
    })
    .await?;
    // What the user chose in the system's chooser is theirs to use from the window.
    if let Some(p) = &picked {
        state.scope.grant(std::path::Path::new(p));
    }
    Ok(picked)
}
