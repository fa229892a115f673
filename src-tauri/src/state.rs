//! What the commands share: the engine (or why it could not be opened), the run
//! manager (set once the window exists, since it emits to it) and the cancel flags of
//! the running generation, Hub pull and evaluation.

use crate::runner::{Emit, Runner};
use attune_engine::Engine;
use attune_protocol::IpcError;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

/// State managed by Tauri.
pub struct AppState {
    engine: Result<Arc<Engine>, IpcError>,
    /// Set by `cancel_chat`, cleared when a chat starts.
    pub cancel: Arc<AtomicBool>,
    /// Set by `cancel_pull`, cleared when a pull starts.
    pub pull_cancel: Arc<AtomicBool>,
    /// Set by `cancel_evaluation`, cleared when an evaluation starts.
    pub eval_cancel: Arc<AtomicBool>,
    /// The run manager; set by [`AppState::start_runner`].
    runner: OnceLock<Runner>,
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
            pull_cancel: Arc::new(AtomicBool::new(false)),
            eval_cancel: Arc::new(AtomicBool::new(false)),
            runner: OnceLock::new(),
        }
    }

    /// Creates the run manager over the engine, sending run updates to `emit`. Does
    /// nothing when the engine could not be opened (every run command then reports
    /// that error) or when it already exists.
    pub fn start_runner(&self, emit: Emit) {
        if let Ok(engine) = &self.engine {
            let engine = Arc::clone(engine);
            self.runner.get_or_init(|| Runner::new(engine, emit));
        }
    }

    /// The run manager, or why there is none.
    pub fn runner(&self) -> Result<Runner, IpcError> {
        self.engine()?;
        self.runner.get().cloned().ok_or_else(|| IpcError {
            code: "internal".into(),
            message: "the run manager has not started yet; try again in a moment".into(),
        })
    }

    /// The run manager if it exists (for shutdown).
    pub fn runner_if_started(&self) -> Option<Runner> {
        self.runner.get().cloned()
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
