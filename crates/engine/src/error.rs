//! The engine's error type: each variant names the file, model or repository at
//! fault, and maps to one stable IPC code.

use attune_protocol::ErrorCode;
use std::path::PathBuf;

/// Everything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("library database {path}: {message}")]
    Database { path: PathBuf, message: String },
    #[error(
        "library database {path} has schema version {found}, newer than this build of Attune \
         knows ({known}); upgrade Attune or use another --data-dir"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("no model '{0}' in the library (see `attune models list`)")]
    ModelNotFound(String),
    #[error("model name '{name}' matches several models (ids {ids}); use the id")]
    AmbiguousModel { name: String, ids: String },
    #[error(
        "the model library is empty: add a model with `attune models add <path>` \
         or `attune models pull <repo>`"
    )]
    EmptyLibrary,
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a usable model: {}", with_path(path, source))]
    InvalidModel {
        path: PathBuf,
        #[source]
        source: Box<attune_models::Error>,
    },
    #[error("model '{name}' (id {id}): its file {path} is missing; it was moved or deleted (re-add it, or remove the entry)")]
    ModelFileMissing {
        id: i64,
        name: String,
        path: PathBuf,
    },
    #[error("cannot load model '{name}': {}", with_path(path, source))]
    ModelLoad {
        name: String,
        path: PathBuf,
        #[source]
        source: Box<attune_models::Error>,
    },
    /// A document that cannot be read as text (documents to data).
    #[error("cannot read the document {path}: {reason}")]
    InvalidDocument { path: PathBuf, reason: String },
    #[error("generation failed: {0}")]
    Generation(#[source] Box<attune_models::Error>),
    #[error("cannot reach the Hugging Face Hub at {endpoint}: {reason}; check your network (or HF_ENDPOINT)")]
    HubUnreachable { endpoint: String, reason: String },
    #[error("repository {repo} not found on the Hugging Face Hub at {endpoint} (if it is private or gated, set HF_TOKEN)")]
    RepoNotFound { repo: String, endpoint: String },
    #[error("Hugging Face Hub, {repo}: {message}")]
    Hub { repo: String, message: String },
    #[error("no dataset '{0}' in the library (see `attune data list`)")]
    DatasetNotFound(String),
    #[error(
        "a dataset named '{name}' already exists (id {id}); choose another name or remove it first"
    )]
    DatasetExists { name: String, id: i64 },
    #[error("{path} has {count} bad row(s) ({first}); nothing was imported: fix them, or accept skipping them")]
    BadRows {
        path: PathBuf,
        count: u64,
        /// The first few, as "line N: reason; ...".
        first: String,
    },
    #[error("dataset {path}: {reason}")]
    InvalidDataset { path: PathBuf, reason: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("no run '{0}' in the library (see `attune runs list`)")]
    RunNotFound(String),
    #[error("no adapter '{0}' in the library (see `attune adapters list`)")]
    AdapterNotFound(String),
    #[error(
        "{what} named '{name}' already exists; choose another name (--name) or remove it first"
    )]
    NameTaken { what: &'static str, name: String },
    #[error("cannot remove {what}: {users}; remove those first")]
    InUse { what: String, users: String },
    #[error(
        "run will not fit in memory: it needs about {estimate_mb} MiB more, available {available_mb} MiB \
         (MemAvailable in /proc/meminfo); {suggestion}"
    )]
    WontFit {
        estimate_mb: u64,
        available_mb: u64,
        suggestion: String,
    },
    #[error("run '{name}' is {status}: {reason}")]
    RunState {
        name: String,
        status: String,
        reason: String,
    },
    #[error(
        "dataset '{name}' changed since run '{run}' was created (content hash {found}, the run \
         expects {expected}); create a new run"
    )]
    DatasetChanged {
        name: String,
        run: String,
        expected: String,
        found: String,
    },
    #[error("training run '{run}': {message}")]
    Training { run: String, message: String },
    #[error("adapter {path}: {reason}")]
    InvalidAdapter { path: PathBuf, reason: String },
    #[error("cancelled")]
    Cancelled,
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "too many requests are waiting ({limit}); try again when the answers before yours are done"
    )]
    QueueFull { limit: usize },
    #[error("Attune is closing; try again after it restarts")]
    Closing,
    #[error("{0}")]
    InvalidState(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A remote API endpoint failed; `code` says how (unreachable, auth, model, ...).
    #[error("{message}")]
    Endpoint {
        endpoint: String,
        code: ErrorCode,
        message: String,
    },
    /// A format that cannot carry this architecture, method or tokenizer.
    #[error("cannot export '{what}': {reason}")]
    ExportUnsupported { what: String, reason: String },
    #[error(
        "destination {path} is not empty ({entries}); choose an empty or new folder, or allow \
         replacing files (--overwrite)"
    )]
    DestinationNotEmpty { path: PathBuf, entries: String },
    /// A template, conversation or arena that is not in the library.
    #[error("no {what} with id {id} in the library (it may have been removed)")]
    NotFound { what: &'static str, id: String },
}

/// The runtime's message, prefixed with `path` unless it already names it.
fn with_path(path: &std::path::Path, source: &attune_models::Error) -> String {
    let msg = source.to_string();
    if msg.contains(&*path.to_string_lossy()) {
        msg
    } else {
        format!("{}: {msg}", path.display())
    }
}

impl EngineError {
    /// A stable machine-readable code (the `code` of [`attune_protocol::IpcError`]).
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::DataDir { .. } | EngineError::Io { .. } => ErrorCode::Io,
            EngineError::Database { .. } => ErrorCode::Database,
            EngineError::SchemaTooNew { .. } => ErrorCode::SchemaTooNew,
            EngineError::ModelNotFound(_) => ErrorCode::NotFound,
            EngineError::AmbiguousModel { .. } => ErrorCode::Ambiguous,
            EngineError::EmptyLibrary => ErrorCode::EmptyLibrary,
            EngineError::InvalidModel { .. } => ErrorCode::InvalidModel,
            EngineError::ModelFileMissing { .. } => ErrorCode::ModelMissing,
            EngineError::ModelLoad { .. } => ErrorCode::ModelLoad,
            EngineError::Generation(_) => ErrorCode::Generation,
            EngineError::HubUnreachable { .. } => ErrorCode::HubUnreachable,
            EngineError::RepoNotFound { .. } => ErrorCode::RepoNotFound,
            EngineError::Hub { .. } => ErrorCode::Hub,
            EngineError::DatasetNotFound(_) => ErrorCode::NotFound,
            EngineError::DatasetExists { .. } => ErrorCode::AlreadyExists,
            EngineError::BadRows { .. } => ErrorCode::BadRows,
            EngineError::InvalidDataset { .. } => ErrorCode::InvalidDataset,
            EngineError::InvalidInput(_) => ErrorCode::InvalidInput,
            EngineError::RunNotFound(_) | EngineError::AdapterNotFound(_) => ErrorCode::NotFound,
            EngineError::NameTaken { .. } => ErrorCode::AlreadyExists,
            EngineError::InUse { .. } => ErrorCode::InUse,
            EngineError::WontFit { .. } => ErrorCode::WontFit,
            EngineError::RunState { .. } => ErrorCode::InvalidState,
            EngineError::DatasetChanged { .. } => ErrorCode::DatasetChanged,
            EngineError::Training { .. } => ErrorCode::Training,
            EngineError::InvalidAdapter { .. } => ErrorCode::InvalidAdapter,
            EngineError::Cancelled => ErrorCode::Cancelled,
            EngineError::NotFound { .. } => ErrorCode::NotFound,
            EngineError::QueueFull { .. } => ErrorCode::QueueFull,
            EngineError::Closing => ErrorCode::Closing,
            EngineError::InvalidState(_) => ErrorCode::InvalidState,
            EngineError::Internal(_) => ErrorCode::Internal,
            EngineError::Endpoint { code, .. } => *code,
            EngineError::Write { .. } => ErrorCode::Io,
            EngineError::ExportUnsupported { .. } => ErrorCode::ExportUnsupported,
            EngineError::DestinationNotEmpty { .. } => ErrorCode::DestinationNotEmpty,
            EngineError::InvalidDocument { .. } => ErrorCode::InvalidDocument,
        }
    }

    pub(crate) fn db(path: &std::path::Path, err: impl std::fmt::Display) -> Self {
        EngineError::Database {
            path: path.to_path_buf(),
            message: err.to_string(),
        }
    }
}

impl From<&EngineError> for attune_protocol::IpcError {
    fn from(e: &EngineError) -> Self {
        attune_protocol::IpcError {
            code: e.code(),
            message: e.to_string(),
        }
    }
}
