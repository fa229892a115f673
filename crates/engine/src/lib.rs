//! Attune's engine: the SQLite model library, the model registry, Hugging Face Hub
//! pulls, datasets, fine-tuning runs, adapters, evaluation and chat/generation sessions
//! over the `attune-models` runtime.
//!
//! [`Engine`] is `Send + Sync` (the desktop shell holds it as `Arc<Engine>`): the
//! database sits behind a mutex that is never held while a model loads or generates.
//! Every public type that crosses to the UI is an `attune_protocol` DTO.

mod actor;
mod adapters;
mod advisor;
mod arena;
mod bundle;
mod chat;
mod clock;
mod conversations;
mod datasets;
pub mod docs;
mod endpoints;
mod error;
mod evaluate;
mod export;
mod files;
mod hub;
mod playground;
mod prefs;
mod registry;
mod runs;
mod settings;
mod store;
mod templates;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use attune_protocol::{ChatEvent, ChatMessage, GenerationStats, ModelSummary, SamplingParams};

pub use actor::{
    Actor, ActorOptions, ActorStatus, CancelOnDrop, CancelToken, Generation, Prompt, Reply,
    Request, RunObserver, Sink, TRAINING_LOCK_FILE,
};
pub use advisor::{
    benchmark_throughput, machine_info, preset, recommend, Facts, FULL_MIN_ROWS, MIN_TRAINING_ROWS,
};
pub use attune_models::{fix_thread_count, single_arena};
pub use clock::unix_from_rfc3339;
pub use datasets::{DatasetRow, Sample, MAX_ROW_CHARS};
pub use endpoints::{keys::env_var as endpoint_key_env_var, CONNECT_TIMEOUT_S, IDLE_TIMEOUT_S};
pub use error::EngineError;
pub use export::{check_prompts, ModelfileImport, ATTUNE_VERSION};
pub use files::classify_path;
pub use hub::{hub_status, PullProgress};
pub use runs::{
    available_memory, estimate_memory, process_memory_mb, trainable_params, MemoryEstimate,
    RunControl, FORGETTING_THRESHOLD,
};
pub use store::DATABASE_FILE;
// The arena's judge (issue 17).
pub use arena::{DEFAULT_RUBRIC, MAX_JUDGE_TOKENS, MAX_RUBRIC_CHARS};

/// Where Attune keeps its library: `$ATTUNE_DATA_DIR`, else `$XDG_DATA_HOME/attune`
/// (`~/.local/share/attune` on Linux). The app and the CLI open it; `scripts/fetch-model.sh`
/// puts the default model in its `models/` folder by the same rule.
pub fn default_data_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("ATTUNE_DATA_DIR") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".local/share")))
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    base.join("attune")
}

/// Result of adding a model to the library.
#[derive(Debug, Clone, PartialEq)]
pub struct AddOutcome {
    pub model: ModelSummary,
    /// The same weights (same sha256) were already registered; nothing was added.
    pub already_present: bool,
}

/// The engine: one per data directory.
pub struct Engine {
    data_dir: PathBuf,
    store: store::Store,
    /// The most recently used model, kept loaded between requests.
    loaded: Mutex<Option<(i64, Arc<attune_models::loader::LoadedModel>)>>,
    /// The most recently used adapters applied to their base (clones of the base model).
    adapted: Mutex<adapters::AdaptedCache>,
    /// Keys of remote endpoints (keyring, else memory).
    keys: endpoints::keys::Keys,
}

impl Engine {
    /// Creates `data_dir` if needed, opens `<data_dir>/library.sqlite3` and migrates it.
    /// Runs a dead process left 'running' become 'paused' (resumable).
    pub fn open(data_dir: &Path) -> Result<Engine, EngineError> {
        std::fs::create_dir_all(data_dir).map_err(|source| EngineError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let store = store::Store::open(&data_dir.join(DATABASE_FILE))?;
        let engine = Engine {
            data_dir: data_dir.to_path_buf(),
            store,
            loaded: Mutex::new(None),
            adapted: Mutex::new(adapters::AdaptedCache::default()),
            keys: endpoints::keys::Keys::from_env(),
        };
        engine.mark_interrupted_runs()?;
        Ok(engine)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// All registered models, oldest first.
    pub fn list_models(&self) -> Result<Vec<ModelSummary>, EngineError> {
        self.store
            .list_models()?
            .iter()
            .map(|row| registry::summary(row, self.store.path()))
            .collect()
    }

    /// A model by id, else by exact name, else by a name unique up to ASCII case.
    pub fn find_model(&self, id_or_name: &str) -> Result<ModelSummary, EngineError> {
        let key = id_or_name.trim();
        if key.is_empty() {
            return Err(EngineError::InvalidInput(
                "model id or name is empty".to_string(),
            ));
        }
        if let Ok(id) = key.parse::<i64>() {
            if let Some(row) = self.store.get_model(id)? {
                return registry::summary(&row, self.store.path());
            }
        }
        if let Some(row) = self.store.find_by_name(key)? {
            return registry::summary(&row, self.store.path());
        }
        let rows = self.store.find_by_name_nocase(key)?;
        match rows.as_slice() {
            [] => Err(EngineError::ModelNotFound(key.to_string())),
            [row] => registry::summary(row, self.store.path()),
            many => Err(EngineError::AmbiguousModel {
                name: key.to_string(),
                ids: many
                    .iter()
                    .map(|r| r.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The model used when none is named: the first registered one.
    pub fn default_model(&self) -> Result<ModelSummary, EngineError> {
        self.list_models()?
            .into_iter()
            .next()
            .ok_or(EngineError::EmptyLibrary)
    }

    /// Registers a `.gguf` file or a Hugging Face model folder on this machine.
    /// The same weights registered twice give `already_present: true` and no new row.
    pub fn add_local_model(&self, path: &Path) -> Result<AddOutcome, EngineError> {
        registry::register(&self.store, path, registry::Origin::Local)
    }

    /// Downloads `repo` at `revision` (default "main") from the Hugging Face Hub into
    /// the standard HF cache and registers it. See [`Engine::pull_model_file`].
    pub fn pull_model(
        &self,
        repo: &str,
        revision: Option<&str>,
        progress: &mut dyn FnMut(PullProgress),
        cancel: &AtomicBool,
    ) -> Result<AddOutcome, EngineError> {
        self.pull_model_file(repo, revision, None, progress, cancel)
    }

    /// Like [`Engine::pull_model`], choosing which `.gguf` file of the repository to
    /// take (`file`); without it a Q4_K_M / Q4_1 / Q8_0 file is preferred, and a repo
    /// without GGUF files is pulled as a safetensors folder. Files already in the HF
    /// cache are used without network; nothing is registered on failure.
    pub fn pull_model_file(
        &self,
        repo: &str,
        revision: Option<&str>,
        file: Option<&str>,
        progress: &mut dyn FnMut(PullProgress),
        cancel: &AtomicBool,
    ) -> Result<AddOutcome, EngineError> {
        let cfg = hub::HubConfig::from_env()?;
        self.pull_with(&cfg, repo, revision, file, progress, cancel)
    }

    fn pull_with(
        &self,
        cfg: &hub::HubConfig,
        repo: &str,
        revision: Option<&str>,
        file: Option<&str>,
        progress: &mut dyn FnMut(PullProgress),
        cancel: &AtomicBool,
    ) -> Result<AddOutcome, EngineError> {
        let pulled = hub::pull(cfg, repo, revision, file, progress, cancel)?;
        registry::register(
            &self.store,
            &pulled.path,
            registry::Origin::Hub {
                repo: &pulled.repo,
                revision: &pulled.revision,
            },
        )
    }

    /// Removes the library entry (and unloads it); never deletes the model's files.
    /// Refused while a run or adapter uses the model (the error names them).
    pub fn remove_model(&self, id: i64) -> Result<(), EngineError> {
        let users = self.store.model_users(id)?;
        if !users.is_empty() {
            let name = self
                .store
                .get_model(id)?
                .map(|m| m.name)
                .unwrap_or_default();
            return Err(EngineError::InUse {
                what: format!("model '{name}' (id {id})"),
                users: users_text(&users),
            });
        }
        if !self.store.delete_model(id)? {
            return Err(EngineError::ModelNotFound(id.to_string()));
        }
        let mut slot = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|(loaded, _)| *loaded == id) {
            *slot = None;
        }
        Ok(())
    }

    /// Answers a conversation with the model's chat template (generation prompt added),
    /// streaming `ChatEvent::Loading` (first use), `Token`s and a final `Done`.
    pub fn chat(
        &self,
        model_id: i64,
        messages: &[ChatMessage],
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<GenerationStats, EngineError> {
        let model = self.model_for(model_id, on_event)?;
        chat::chat(&chat::Parts::of(&model), messages, params, cancel, on_event)
    }

    /// [`Engine::chat`] with an adapter (id or name) applied to its base model.
    pub fn chat_with_adapter(
        &self,
        adapter: &str,
        messages: &[ChatMessage],
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<GenerationStats, EngineError> {
        let (_, m) = self.adapted_model(adapter, on_event)?;
        chat::chat(&adapted_parts(&m), messages, params, cancel, on_event)
    }

    /// [`Engine::generate`] with an adapter (id or name) applied to its base model.
    pub fn generate_with_adapter(
        &self,
        adapter: &str,
        prompt: &str,
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<GenerationStats, EngineError> {
        let (_, m) = self.adapted_model(adapter, on_event)?;
        chat::generate_raw(&adapted_parts(&m), prompt, params, cancel, on_event)
    }

    /// Continues a raw prompt (no chat template), streaming like [`Engine::chat`].
    pub fn generate(
        &self,
        model_id: i64,
        prompt: &str,
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<GenerationStats, EngineError> {
        let model = self.model_for(model_id, on_event)?;
        chat::generate_raw(&chat::Parts::of(&model), prompt, params, cancel, on_event)
    }

    /// The loaded model for `model_id`, loading it (and emitting `Loading`) if needed.
    /// The store lock is released before loading; the slot lock is held while loading
    /// so two requests never load the same model twice, but never while generating.
    fn model_for(
        &self,
        model_id: i64,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<Arc<attune_models::loader::LoadedModel>, EngineError> {
        let row = self
            .store
            .get_model(model_id)?
            .ok_or_else(|| EngineError::ModelNotFound(model_id.to_string()))?;
        let mut slot = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, model)) = slot.as_ref() {
            if *id == model_id {
                return Ok(Arc::clone(model));
            }
        }
        // Free the previous model before loading the next one.
        *slot = None;
        let path = PathBuf::from(&row.path);
        if !path.exists() {
            return Err(EngineError::ModelFileMissing {
                id: row.id,
                name: row.name,
                path,
            });
        }
        on_event(ChatEvent::Loading);
        let model = chat::load(&row.name, &path)?;
        let model = Arc::new(model);
        *slot = Some((model_id, Arc::clone(&model)));
        Ok(model)
    }
}

fn adapted_parts(m: &adapters::AdaptedModel) -> chat::Parts<'_> {
    chat::Parts {
        model: &m.model,
        tokenizer: &m.tokenizer,
        chat_template: &m.chat_template,
        prefix: m.prefix.as_ref(),
    }
}

/// "run(s) a, b and adapter(s) c use it".
fn users_text(u: &store::Users) -> String {
    let mut parts = Vec::new();
    if !u.runs.is_empty() {
        parts.push(format!(
            "run(s) {} use it (`attune runs rm`)",
            u.runs.join(", ")
        ));
    }
    if !u.adapters.is_empty() {
        parts.push(format!(
            "adapter(s) {} are built on it (`attune adapters rm`)",
            u.adapters.join(", ")
        ));
    }
    parts.join("; ")
}
