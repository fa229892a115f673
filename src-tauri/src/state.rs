//! What the commands share: the engine (or why it could not be opened) and the
//! cancel flag of the running generation.

use attune_engine::Engine;
use attune_protocol::IpcError;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// State managed by Tauri.
pub struct AppState {
    engine: Result<Arc<Engine>, IpcError>,
    /// Set by `cancel_chat`, cleared when a chat starts.
    pub cancel: Arc<AtomicBool>,
}

impl AppState {
    /// Opens the engine on `data_dir`; a failure is kept and reported by every
    /// command instead of stopping the app.
    pub fn open(data_dir: &Path) -> Self {
        let engine = Engine::open(data_dir).map(Arc::new).map_err(|e| IpcError {
            code: e.code().to_string(),
            message: format!(
                "could not open the Attune library in {}: {e}",
                data_dir.display()
            ),
        });
        Self {
            engine,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The engine, or the error that happened when opening it.
    pub fn engine(&self) -> Result<Arc<Engine>, IpcError> {
        self.engine.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_the_engine_on_a_fresh_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = AppState::open(&dir.path().join("data"));
        let engine = state.engine().expect("engine opens");
        assert!(engine.list_models().expect("list").is_empty());
    }

    #[test]
    fn an_unusable_data_dir_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write file");
        let state = AppState::open(&file);
        let err = match state.engine() {
            Ok(_) => panic!("a file is not a data directory"),
            Err(e) => e,
        };
        assert!(err.message.contains("not-a-dir"), "{}", err.message);
        assert!(!err.code.is_empty());
    }
}
