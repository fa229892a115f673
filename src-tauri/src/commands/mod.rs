//! Tauri commands, one module per domain, mirrored by `ui/src/ipc/<domain>.rs`.

pub mod adapters;
pub mod advisor;
pub mod arena;
pub mod chat;
pub mod datasets;
pub mod diagnostics;
pub mod docs;
pub mod endpoints;
pub mod export;
pub mod models;
pub mod playground;
pub mod prefs;
pub mod runs;
pub mod server;
pub mod settings;
pub mod templates;

use attune_protocol::ErrorCode;
use attune_protocol::IpcError;

/// Runs blocking engine work off the main thread and the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, IpcError> + Send + 'static,
) -> Result<T, IpcError> {
    let out = tauri::async_runtime::spawn_blocking(work)
        .await
        .map_err(|e| IpcError {
            code: ErrorCode::Internal,
            message: format!("the engine worker stopped unexpectedly: {e}"),
        })?;
    // Every failure a command reports is logged (code and message; never prompt text, which
    // no error message carries). Cancellations are the user's choice, not failures.
    if let Err(e) = &out {
        if e.code == ErrorCode::Cancelled {
            tracing::debug!(code = %e.code, "{}", e.message);
        } else {
            tracing::warn!(code = %e.code, "{}", e.message);
        }
    }
    out
}

/// An `invalid_input` error with `message` (which names the field at fault).
pub(crate) fn invalid(message: impl Into<String>) -> IpcError {
    IpcError {
        code: ErrorCode::InvalidInput,
        message: message.into(),
    }
}

/// A path typed or picked by the user: trimmed, and a leading `~` is the home folder
/// (people type `~/Downloads/model.gguf`; the shell that would expand it is not there).
pub(crate) fn user_path(text: &str) -> std::path::PathBuf {
    let text = text.trim();
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    match (text.strip_prefix('~'), home) {
        (Some(rest), Some(home)) if rest.is_empty() || rest.starts_with('/') => {
            std::path::PathBuf::from(home).join(rest.trim_start_matches('/'))
        }
        _ => std::path::PathBuf::from(text),
    }
}

#[cfg(test)]
mod tests {
    use super::user_path;

    #[test]
    fn a_leading_tilde_is_the_home_folder() {
        let home = std::env::var("HOME").unwrap_or_default();
        if home.is_empty() {
            return;
        }
        assert_eq!(
            user_path(" ~/a/b.jsonl "),
            std::path::Path::new(&home).join("a/b.jsonl")
        );
        assert_eq!(user_path("~"), std::path::PathBuf::from(&home));
        assert_eq!(user_path("~user/x"), std::path::PathBuf::from("~user/x"));
        assert_eq!(user_path("/tmp/x"), std::path::PathBuf::from("/tmp/x"));
    }
}
