//! The error every IPC command returns, and its machine-readable codes.

use serde::{Deserialize, Serialize};

/// What kind of failure an [`IpcError`] is: the stable, machine-readable part of an error that
/// the window, the CLI and the server branch on. The wire form is the snake_case name
/// (`"not_found"`), the same strings the app has always sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A file or folder could not be read or written.
    Io,
    /// The library's SQLite file failed.
    Database,
    /// The library was written by a newer Attune.
    SchemaTooNew,
    /// No model, dataset, run, adapter, template, arena or endpoint of that name or id.
    NotFound,
    /// A name that matches several models.
    Ambiguous,
    /// The library has no model yet.
    EmptyLibrary,
    /// A model file or folder that Attune cannot use.
    InvalidModel,
    /// A registered model whose file is gone.
    ModelMissing,
    /// A model that failed to load.
    ModelLoad,
    /// Generation failed.
    Generation,
    /// The Hugging Face Hub could not be reached.
    HubUnreachable,
    /// No such repository on the Hub.
    RepoNotFound,
    /// Another Hub failure.
    Hub,
    /// That name is taken, or the destination exists.
    AlreadyExists,
    /// A dataset file with rows that cannot be read.
    BadRows,
    /// A dataset that cannot be used for this.
    InvalidDataset,
    /// A document that cannot be read as text (documents to data).
    InvalidDocument,
    /// A value the user gave is out of range or malformed.
    InvalidInput,
    /// Something else still uses it.
    InUse,
    /// The run would not fit in this machine's memory.
    WontFit,
    /// Not possible in the object's current state (a run already completed, ...).
    InvalidState,
    /// The dataset changed since the run was planned.
    DatasetChanged,
    /// Training failed.
    Training,
    /// An adapter that does not fit its base or holds bad weights.
    InvalidAdapter,
    /// Stopped by the user or a dropped client.
    Cancelled,
    /// The engine's queue is full.
    QueueFull,
    /// The engine is shutting down.
    Closing,
    /// A bug: Attune's own fault.
    Internal,
    /// An export format that cannot carry this model, method or tokenizer.
    ExportUnsupported,
    /// An export destination that is not empty.
    DestinationNotEmpty,
    /// An API endpoint needs a key and none is stored.
    EndpointKeyMissing,
    /// An API endpoint refused the key.
    EndpointAuth,
    /// An API endpoint does not serve that model.
    EndpointModel,
    /// An API endpoint kept answering 429.
    EndpointRateLimited,
    /// An API endpoint answered with another HTTP error.
    EndpointHttp,
    /// An API endpoint did not answer in time.
    EndpointTimeout,
    /// An API endpoint could not be reached.
    EndpointUnreachable,
    /// An API endpoint answered something that is not the OpenAI protocol.
    EndpointProtocol,
    /// A path outside what the user granted to the window.
    PathNotAllowed,
    /// Another long job of the same kind is already running.
    Busy,
    /// The local OpenAI-compatible server failed to start or stop.
    Server,
    /// Not supported by this build or platform.
    Unsupported,
    /// The window could not reach the app's shell.
    Ipc,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 43] = [
        ErrorCode::Io,
        ErrorCode::Database,
        ErrorCode::SchemaTooNew,
        ErrorCode::NotFound,
        ErrorCode::Ambiguous,
        ErrorCode::EmptyLibrary,
        ErrorCode::InvalidModel,
        ErrorCode::ModelMissing,
        ErrorCode::ModelLoad,
        ErrorCode::Generation,
        ErrorCode::HubUnreachable,
        ErrorCode::RepoNotFound,
        ErrorCode::Hub,
        ErrorCode::AlreadyExists,
        ErrorCode::BadRows,
        ErrorCode::InvalidDataset,
        ErrorCode::InvalidDocument,
        ErrorCode::InvalidInput,
        ErrorCode::InUse,
        ErrorCode::WontFit,
        ErrorCode::InvalidState,
        ErrorCode::DatasetChanged,
        ErrorCode::Training,
        ErrorCode::InvalidAdapter,
        ErrorCode::Cancelled,
        ErrorCode::QueueFull,
        ErrorCode::Closing,
        ErrorCode::Internal,
        ErrorCode::ExportUnsupported,
        ErrorCode::DestinationNotEmpty,
        ErrorCode::EndpointKeyMissing,
        ErrorCode::EndpointAuth,
        ErrorCode::EndpointModel,
        ErrorCode::EndpointRateLimited,
        ErrorCode::EndpointHttp,
        ErrorCode::EndpointTimeout,
        ErrorCode::EndpointUnreachable,
        ErrorCode::EndpointProtocol,
        ErrorCode::PathNotAllowed,
        ErrorCode::Busy,
        ErrorCode::Server,
        ErrorCode::Unsupported,
        ErrorCode::Ipc,
    ];

    /// The wire name, e.g. `"not_found"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Io => "io",
            ErrorCode::Database => "database",
            ErrorCode::SchemaTooNew => "schema_too_new",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Ambiguous => "ambiguous",
            ErrorCode::EmptyLibrary => "empty_library",
            ErrorCode::InvalidModel => "invalid_model",
            ErrorCode::ModelMissing => "model_missing",
            ErrorCode::ModelLoad => "model_load",
            ErrorCode::Generation => "generation",
            ErrorCode::HubUnreachable => "hub_unreachable",
            ErrorCode::RepoNotFound => "repo_not_found",
            ErrorCode::Hub => "hub",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::BadRows => "bad_rows",
            ErrorCode::InvalidDataset => "invalid_dataset",
            ErrorCode::InvalidDocument => "invalid_document",
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::InUse => "in_use",
            ErrorCode::WontFit => "wont_fit",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::DatasetChanged => "dataset_changed",
            ErrorCode::Training => "training",
            ErrorCode::InvalidAdapter => "invalid_adapter",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::Closing => "closing",
            ErrorCode::Internal => "internal",
            ErrorCode::ExportUnsupported => "export_unsupported",
            ErrorCode::DestinationNotEmpty => "destination_not_empty",
            ErrorCode::EndpointKeyMissing => "endpoint_key_missing",
            ErrorCode::EndpointAuth => "endpoint_auth",
            ErrorCode::EndpointModel => "endpoint_model",
            ErrorCode::EndpointRateLimited => "endpoint_rate_limited",
            ErrorCode::EndpointHttp => "endpoint_http",
            ErrorCode::EndpointTimeout => "endpoint_timeout",
            ErrorCode::EndpointUnreachable => "endpoint_unreachable",
            ErrorCode::EndpointProtocol => "endpoint_protocol",
            ErrorCode::PathNotAllowed => "path_not_allowed",
            ErrorCode::Busy => "busy",
            ErrorCode::Server => "server",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Ipc => "ipc",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tests and logs compare codes with their wire names.
impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The one error shape returned over IPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcError {
    /// What kind of failure, for code to branch on.
    pub code: ErrorCode,
    /// A human sentence naming what and where.
    pub message: String,
}

impl IpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> IpcError {
        IpcError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for IpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_wire_name() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            let json = serde_json::to_string(&c).expect("json");
            assert_eq!(json, format!("\"{}\"", c.as_str()), "{c:?}");
            let back: ErrorCode = serde_json::from_str(&json).expect("parse");
            assert_eq!(back, c);
            seen.insert(c);
        }
        let e: IpcError =
            serde_json::from_str(r#"{"code":"wont_fit","message":"too big"}"#).expect("parse");
        assert_eq!(e.code, ErrorCode::WontFit);
        assert!(serde_json::from_str::<ErrorCode>("\"no_such_code\"").is_err());
        assert_eq!(seen.len(), ErrorCode::ALL.len(), "ALL lists a code twice");
    }
}
