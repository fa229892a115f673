//! What the commands share: the engine (or why it could not be opened), the engine
//! actor (started once the window exists, since it emits run events to it), and the
//! cancel tokens of the requests in flight, by the id the window gave each request.

use crate::scope::PathScope;
use attune_engine::{Actor, ActorOptions, CancelToken, Engine, RunObserver};
use attune_protocol::ErrorCode;
use attune_protocol::IpcError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

/// State managed by Tauri.
pub struct AppState {
    engine: Result<Arc<Engine>, IpcError>,
    /// Set by `cancel_pull`, cleared when a pull starts.
    pub pull_cancel: Arc<AtomicBool>,
    /// The engine actor; set by [`AppState::start_actor`].
    actor: OnceLock<Actor>,
    /// Requests in flight (answers, arena items, evaluations) by the window's id.
    pub requests: Arc<Requests>,
    /// The OpenAI-compatible server while it runs, and whether it requires a key.
    pub server: Mutex<Option<(attune_server::RunningServer, bool)>>,
    data_dir: PathBuf,
    /// The paths the user granted the window (see `scope.rs`).
    pub scope: PathScope,
}

impl AppState {
    /// Opens the engine on `data_dir`; a failure is kept and reported by every
    /// command instead of stopping the app.
    pub fn open(data_dir: &Path) -> Self {
        let engine = Engine::open(data_dir).map(Arc::new).map_err(|e| IpcError {
            code: e.code(),
            message: format!(
                "could not open the Attune library in {}: {e}",
                data_dir.display()
            ),
        });
        Self {
            engine,
            pull_cancel: Arc::new(AtomicBool::new(false)),
            actor: OnceLock::new(),
            requests: Arc::default(),
            server: Mutex::new(None),
            data_dir: data_dir.to_path_buf(),
            scope: PathScope::new(data_dir),
        }
    }

    /// The data directory the engine was opened on.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Starts the engine actor, sending run events to `observer`. Does nothing when
    /// the engine could not be opened (every command then reports that error) or when
    /// it already runs.
    pub fn start_actor(&self, observer: RunObserver) {
        if let Ok(engine) = &self.engine {
            let engine = Arc::clone(engine);
            self.actor
                .get_or_init(|| Actor::start(engine, ActorOptions::default(), observer));
        }
    }

    /// The engine actor, or why there is none.
    pub fn actor(&self) -> Result<Actor, IpcError> {
        self.engine()?;
        self.actor.get().cloned().ok_or_else(|| IpcError {
            code: ErrorCode::Internal,
            message: "the engine has not started yet; try again in a moment".into(),
        })
    }

    /// The actor if it was started (for shutdown).
    pub fn actor_if_started(&self) -> Option<Actor> {
        self.actor.get().cloned()
    }

    /// The engine, or the error that happened when opening it.
    pub fn engine(&self) -> Result<Arc<Engine>, IpcError> {
        self.engine.clone()
    }
}

/// Cancel tokens of the requests in flight, by id.
#[derive(Default)]
pub struct Requests(Mutex<HashMap<String, CancelToken>>);

impl Requests {
    /// Registers request `id` with a new token; the token is forgotten when the guard
    /// drops. An id still in flight is cancelled first (the window reused it).
    pub fn begin(self: &Arc<Self>, id: &str) -> (CancelToken, RequestGuard) {
        let token = CancelToken::new();
        let previous = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), token.clone());
        if let Some(previous) = previous {
            previous.cancel();
        }
        (
            token.clone(),
            RequestGuard {
                requests: Arc::clone(self),
                id: id.to_string(),
                token,
            },
        )
    }

    /// Cancels request `id`; whether it was in flight.
    pub fn cancel(&self, id: &str) -> bool {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

/// Removes its request's token when the request ends.
pub struct RequestGuard {
    requests: Arc<Requests>,
    id: String,
    token: CancelToken,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut map = self.requests.0.lock().unwrap_or_else(|p| p.into_inner());
        // Only this request's own token: a newer request may reuse the id.
        if map
            .get(&self.id)
            .is_some_and(|t| Arc::ptr_eq(t.inner(), self.token.inner()))
        {
            map.remove(&self.id);
        }
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
        assert_eq!(err.code, attune_protocol::ErrorCode::Io, "{}", err.message);
    }

    #[test]
    fn each_request_is_cancelled_by_its_own_id_only() {
        let requests = Arc::new(Requests::default());
        let (playground, g1) = requests.begin("playground-1");
        let (arena, g2) = requests.begin("arena-1");
        assert!(requests.cancel("playground-1"));
        assert!(playground.is_cancelled());
        assert!(!arena.is_cancelled());
        drop(g1);
        assert!(
            !requests.cancel("playground-1"),
            "finished requests are forgotten"
        );
        // Reusing an id in flight cancels the older request; the older guard does not
        // forget the newer one.
        let (again, g3) = requests.begin("arena-1");
        assert!(arena.is_cancelled());
        drop(g2);
        assert!(requests.cancel("arena-1"));
        assert!(again.is_cancelled());
        drop(g3);
    }
}
