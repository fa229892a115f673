//! Connecting Attune to other tools: the local OpenAI-compatible server the app can
//! switch on, and (later in this file) remote API endpoints used as candidates.

use serde::{Deserialize, Serialize};

/// How the app's server should listen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    /// Required by the server when set (and needed to listen beyond loopback). Kept in
    /// memory only, for as long as the server runs.
    pub api_key: Option<String>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
        }
    }
}

/// Whether the app's server runs, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub running: bool,
    /// `http://host:port/v1` while running.
    pub base_url: Option<String>,
    pub api_key_required: bool,
    /// A command that asks the server for a chat answer with the default model.
    pub curl_example: Option<String>,
}

// ---------------------------------------------------------------------------
// Remote API endpoints
// ---------------------------------------------------------------------------

/// Where an endpoint's key is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStorage {
    /// The endpoint needs no key.
    None,
    /// In the OS keyring (Secret Service, Keychain, Windows Credential Manager).
    Keyring,
    /// No keyring service runs: in this process's memory until it exits.
    Memory,
    /// A key was given once but is not available now (the keyring is gone or the app
    /// restarted without one): add it again.
    Missing,
}

/// An OpenAI-compatible endpoint as lists show it. Never holds the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointSummary {
    pub id: i64,
    pub name: String,
    /// e.g. `https://api.openai.com/v1`, `http://localhost:11434/v1`.
    pub base_url: String,
    pub key: KeyStorage,
    pub connect_timeout_s: f64,
    pub idle_timeout_s: f64,
    /// Model ids from the endpoint's last successful `GET /models`.
    pub models: Vec<String>,
    pub models_at: Option<String>,
    pub created_at: String,
}

/// What adding an endpoint takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct EndpointDraft {
    pub name: String,
    pub base_url: String,
    /// Goes to the keyring (or memory), never to the library.
    pub api_key: Option<String>,
    pub connect_timeout_s: Option<f64>,
    pub idle_timeout_s: Option<f64>,
}

/// A model of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointModel {
    pub endpoint_id: i64,
    pub model: String,
}

/// What adding an endpoint answers: the endpoint, and a sentence on where its key is
/// (for example that no keyring service runs, so the key lasts until the app closes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointAdded {
    pub endpoint: EndpointSummary,
    pub key_note: Option<String>,
}

/// A template (or none) evaluated against a remote endpoint's model on a dataset split.
/// Only label accuracy applies: the mean NLL needs the probability of every token of the
/// reference answer, which OpenAI-compatible APIs do not return for a given answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointEvalReport {
    pub id: i64,
    pub endpoint: String,
    pub model: String,
    /// The template's name, if one was applied.
    pub template: Option<String>,
    pub dataset_id: i64,
    pub split: crate::SplitName,
    pub n_rows: u64,
    /// Correct answers over labeled rows.
    pub accuracy: Option<f64>,
    pub n_labeled: u64,
    /// Each labeled row: its id, the parsed answer and whether it matched.
    pub rows: Vec<crate::RowScore>,
    /// Which metrics apply, in words.
    pub note: String,
    pub created_at: String,
}
