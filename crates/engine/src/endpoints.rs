//! Remote OpenAI-compatible endpoints (OpenAI, Ollama, vLLM, LM Studio, llama.cpp's
//! server, another Attune) as candidates beside local models: the library keeps their
//! name, base URL, timeouts and last model list; keys live in [`keys`]; answers stream
//! from `POST {base}/chat/completions` (or `/completions` for plain text) as server-sent
//! events.
//!
//! Errors say what failed, at which endpoint, without the key: unreachable host, 401,
//! unknown model, 429 (retried with backoff, each retry shown as a
//! [`ChatEvent::Retrying`]), timeouts (connect, first byte and idle stream, per
//! endpoint), and malformed or cut responses.

pub(crate) mod keys;

use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use attune_protocol::{
    ChatEvent, ChatMessage, ChatTarget, EndpointAdded, EndpointDraft, EndpointSummary,
    FinishReason, GenerationStats, KeyStorage, SamplingParams,
};
use serde_json::{json, Value};

use crate::error::EngineError;
use crate::store::EndpointRow;
use crate::Engine;
use attune_protocol::ErrorCode;

/// Whether `target` is answered by a remote endpoint (no local compute).
pub(crate) fn is_remote(target: &ChatTarget) -> bool {
    match target {
        ChatTarget::Endpoint { .. } => true,
        ChatTarget::Template { endpoint, .. } => endpoint.is_some(),
        _ => false,
    }
}

/// Default timeouts (seconds).
pub const CONNECT_TIMEOUT_S: f64 = 10.0;
pub const IDLE_TIMEOUT_S: f64 = 60.0;
/// How many times a 429 is retried before giving up.
const RATE_LIMIT_RETRIES: u32 = 4;
/// The longest wait between retries, whatever `Retry-After` says.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
/// How often a blocked read wakes up to look at the cancel flag.
const POLL: Duration = Duration::from_millis(250);

fn endpoint_error(name: &str, code: ErrorCode, message: impl Into<String>) -> EngineError {
    EngineError::Endpoint {
        endpoint: name.to_string(),
        code,
        message: message.into(),
    }
}

/// `base_url` as stored: http(s), no trailing slash, no query or fragment.
fn normalized_url(raw: &str) -> Result<String, EngineError> {
    let url = raw.trim().trim_end_matches('/').to_string();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "base URL '{raw}': it must start with http:// or https:// (for example \
                 https://api.openai.com/v1 or http://localhost:11434/v1)"
            ))
        })?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(EngineError::InvalidInput(format!(
            "base URL '{raw}': it names no host"
        )));
    }
    if url.contains('?') || url.contains('#') {
        return Err(EngineError::InvalidInput(format!(
            "base URL '{raw}': leave out the query and fragment (the API's paths go after it)"
        )));
    }
    Ok(url)
}

fn check_timeout(what: &str, v: Option<f64>, default: f64) -> Result<f64, EngineError> {
    match v {
        None => Ok(default),
        Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Ok(s),
        Some(s) => Err(EngineError::InvalidInput(format!(
            "{what} timeout: {s} s is not between 0 and 3600 seconds"
        ))),
    }
}

impl Engine {
    fn endpoint_summary(&self, row: &EndpointRow) -> EndpointSummary {
        let models: Vec<String> = serde_json::from_str(&row.models_json).unwrap_or_default();
        let key = if !row.has_key {
            KeyStorage::None
        } else {
            self.keys.storage(&self.key_id(&row.name))
        };
        EndpointSummary {
            id: row.id,
            name: row.name.clone(),
            base_url: row.base_url.clone(),
            key,
            connect_timeout_s: row.connect_timeout_s,
            idle_timeout_s: row.idle_timeout_s,
            models,
            models_at: row.models_at.clone(),
            created_at: row.created_at.clone(),
        }
    }

    /// The keyring entry of an endpoint of this library.
    fn key_id(&self, name: &str) -> String {
        format!("{}::{name}", self.data_dir.display())
    }

    fn endpoint_row(&self, id_or_name: &str) -> Result<EndpointRow, EngineError> {
        let key = id_or_name.trim();
        if let Ok(id) = key.parse::<i64>() {
            if let Some(r) = self.store.get_endpoint(id)? {
                return Ok(r);
            }
        }
        self.store
            .find_endpoint_by_name(key)?
            .ok_or_else(|| EngineError::NotFound {
                what: "endpoint",
                id: key.to_string(),
            })
    }

    /// Every endpoint, oldest first.
    pub fn list_endpoints(&self) -> Result<Vec<EndpointSummary>, EngineError> {
        Ok(self
            .store
            .list_endpoints()?
            .iter()
            .map(|r| self.endpoint_summary(r))
            .collect())
    }

    /// An endpoint by id or name.
    pub fn find_endpoint(&self, id_or_name: &str) -> Result<EndpointSummary, EngineError> {
        Ok(self.endpoint_summary(&self.endpoint_row(id_or_name)?))
    }

    /// Adds an endpoint. The key goes to the OS keyring; where no keyring service runs,
    /// it is kept in this process's memory and `key_note` says so. Nothing is fetched:
    /// [`Engine::refresh_endpoint_models`] asks the endpoint for its models.
    pub fn add_endpoint(&self, draft: &EndpointDraft) -> Result<EndpointAdded, EngineError> {
        let name = draft.name.trim();
        if name.is_empty() || name.chars().count() > 64 {
            return Err(EngineError::InvalidInput(
                "endpoint name: give it a name of 1 to 64 characters".into(),
            ));
        }
        if self.store.find_endpoint_by_name(name)?.is_some() {
            return Err(EngineError::NameTaken {
                what: "an endpoint",
                name: name.to_string(),
            });
        }
        let base_url = normalized_url(&draft.base_url)?;
        let connect = check_timeout("connect", draft.connect_timeout_s, CONNECT_TIMEOUT_S)?;
        let idle = check_timeout("idle stream", draft.idle_timeout_s, IDLE_TIMEOUT_S)?;
        let key = draft
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty());
        let row = self.store.insert_endpoint(&EndpointRow {
            id: 0,
            name: name.to_string(),
            base_url,
            has_key: key.is_some(),
            connect_timeout_s: connect,
            idle_timeout_s: idle,
            models_json: "[]".into(),
            models_at: None,
            created_at: crate::clock::now_rfc3339(),
        })?;
        let key_note = match key {
            None => None,
            Some(k) => match self.keys.set(&self.key_id(name), k) {
                KeyStorage::Keyring => None,
                _ => Some(format!(
                    "No keyring service is running ({}), so the key of '{name}' is kept in \
                     memory only, until Attune closes; add it again next time.",
                    self.keys.why_no_keyring()
                )),
            },
        };
        Ok(EndpointAdded {
            endpoint: self.endpoint_summary(&row),
            key_note,
        })
    }

    /// Gives an endpoint its key again (after a restart without a keyring).
    pub fn set_endpoint_key(&self, id_or_name: &str, key: &str) -> Result<KeyStorage, EngineError> {
        let row = self.endpoint_row(id_or_name)?;
        if key.trim().is_empty() {
            return Err(EngineError::InvalidInput("the key is empty".into()));
        }
        Ok(self.keys.set(&self.key_id(&row.name), key.trim()))
    }

    /// Removes an endpoint and its key.
    pub fn remove_endpoint(&self, id_or_name: &str) -> Result<EndpointSummary, EngineError> {
        let row = self.endpoint_row(id_or_name)?;
        let summary = self.endpoint_summary(&row);
        self.store.delete_endpoint(row.id)?;
        self.keys.delete(&self.key_id(&row.name));
        Ok(summary)
    }

    fn client(&self, row: &EndpointRow) -> Result<Client, EngineError> {
        let key = if row.has_key {
            match self.keys.get(&self.key_id(&row.name)) {
                Some(k) => Some(k),
                None => {
                    return Err(endpoint_error(
                        &row.name,
                        ErrorCode::EndpointKeyMissing,
                        format!(
                            "the key of endpoint '{}' is not available (no keyring service \
                             kept it since Attune last started): add it again",
                            row.name
                        ),
                    ))
                }
            }
        } else {
            None
        };
        Ok(Client::new(row, key))
    }

    /// Asks the endpoint for its models (`GET {base}/models`) and remembers them.
    pub fn refresh_endpoint_models(
        &self,
        id_or_name: &str,
    ) -> Result<EndpointSummary, EngineError> {
        let row = self.endpoint_row(id_or_name)?;
        let models = self.client(&row)?.models(&AtomicBool::new(false))?;
        let json = serde_json::to_string(&models)
            .map_err(|e| EngineError::Internal(format!("model list: {e}")))?;
        self.store
            .set_endpoint_models(row.id, &json, &crate::clock::now_rfc3339())?;
        self.find_endpoint(&row.id.to_string())
    }

    /// A conversation answered by `model` at endpoint `endpoint_id`, streamed.
    pub(crate) fn endpoint_chat(
        &self,
        endpoint_id: i64,
        model: &str,
        messages: &[ChatMessage],
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<GenerationStats, EngineError> {
        let row = self
            .store
            .get_endpoint(endpoint_id)?
            .ok_or_else(|| EngineError::NotFound {
                what: "endpoint",
                id: endpoint_id.to_string(),
            })?;
        if messages.is_empty() {
            return Err(EngineError::InvalidInput(
                "the conversation has no messages".into(),
            ));
        }
        let body = request_body(model, params, "messages", json!(messages));
        self.client(&row)?
            .stream("/chat/completions", &body, Kind::Chat, cancel, on_event)
    }

    /// Plain text continued by `model` at the endpoint (`POST /completions`).
    pub(crate) fn endpoint_complete(
        &self,
        endpoint_id: i64,
        model: &str,
        prompt: &str,
        params: &SamplingParams,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<GenerationStats, EngineError> {
        let row = self
            .store
            .get_endpoint(endpoint_id)?
            .ok_or_else(|| EngineError::NotFound {
                what: "endpoint",
                id: endpoint_id.to_string(),
            })?;
        let body = request_body(model, params, "prompt", json!(prompt));
        self.client(&row)?
            .stream("/completions", &body, Kind::Text, cancel, on_event)
    }

    /// The request body `endpoint_chat` would send for `messages` with the default sampling
    /// settings, pretty-printed (the template editor's preview of an API model).
    pub(crate) fn endpoint_request_preview(
        &self,
        endpoint: &attune_protocol::EndpointModel,
        messages: &[ChatMessage],
    ) -> Result<String, EngineError> {
        self.store
            .get_endpoint(endpoint.endpoint_id)?
            .ok_or_else(|| EngineError::NotFound {
                what: "endpoint",
                id: endpoint.endpoint_id.to_string(),
            })?;
        let body = request_body(
            &endpoint.model,
            &SamplingParams::default(),
            "messages",
            json!(messages),
        );
        serde_json::to_string_pretty(&body)
            .map_err(|e| EngineError::Internal(format!("request preview: {e}")))
    }

    /// "model-name at endpoint-name".
    pub(crate) fn endpoint_label(
        &self,
        endpoint_id: i64,
        model: &str,
    ) -> Result<String, EngineError> {
        let row = self
            .store
            .get_endpoint(endpoint_id)?
            .ok_or_else(|| EngineError::NotFound {
                what: "endpoint",
                id: endpoint_id.to_string(),
            })?;
        Ok(format!("{model} at {}", row.name))
    }
}

/// The OpenAI request for `params`. What the API has no field for (top-k, min-p, the
/// repetition penalty) is not sent: remote models use temperature, top_p, the token
/// limit, stop sequences and the seed.
fn request_body(model: &str, params: &SamplingParams, field: &str, input: Value) -> Value {
    let mut body = json!({
        "model": model,
        field: input,
        "stream": true,
        "stream_options": { "include_usage": true },
        "temperature": params.temperature,
        "seed": params.seed,
    });
    if let Some(p) = params.top_p {
        body["top_p"] = json!(p);
    }
    // "No limit" (the server's own) is not sent; a real limit is.
    if params.max_tokens < (1 << 20) {
        body["max_tokens"] = json!(params.max_tokens);
    }
    if !params.stop.is_empty() {
        body["stop"] = json!(params.stop);
    }
    body
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// One endpoint's HTTP client. Each exchange runs on its own thread and hands what it
/// reads over a channel, so the caller sees a cancel at once, even while the endpoint
/// is silent, and counts the idle time itself.
struct Client {
    name: String,
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
    connect: Duration,
    idle: Duration,
}

/// What an exchange's thread hands over, in order.
enum Msg {
    Retrying {
        attempt: u32,
        wait: Duration,
    },
    /// One line of the body (streams) or the whole body.
    Text(String),
    End,
    Fail(EngineError),
}

impl Client {
    fn new(row: &EndpointRow, key: Option<String>) -> Client {
        let connect = Duration::from_secs_f64(row.connect_timeout_s);
        let idle = Duration::from_secs_f64(row.idle_timeout_s);
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(connect)
            // The thread gives up a little after the caller would.
            .timeout_read(idle + Duration::from_secs(1))
            .timeout_write(connect.max(Duration::from_secs(30)))
            .user_agent(concat!("attune/", env!("CARGO_PKG_VERSION")))
            .build();
        Client {
            name: row.name.clone(),
            base: row.base_url.clone(),
            key,
            agent,
            connect,
            idle,
        }
    }

    fn err(&self, code: ErrorCode, message: impl Into<String>) -> EngineError {
        endpoint_error(&self.name, code, message)
    }

    fn timeout(&self) -> EngineError {
        self.err(
            ErrorCode::EndpointTimeout,
            format!(
                "{} at {} sent nothing for {:.0} s (the idle limit; raise it in the \
                 endpoint's settings for slow models)",
                self.name,
                self.base,
                self.idle.as_secs_f64()
            ),
        )
    }

    /// Starts an exchange on its own thread: the request (429s retried with backoff),
    /// then the body line by line (`lines`) or whole. Dropping the receiver abandons it.
    fn exchange(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Value>,
        model: Option<String>,
        lines: bool,
    ) -> std::sync::mpsc::Receiver<Msg> {
        let (tx, rx) = std::sync::mpsc::channel();
        let me = Client {
            name: self.name.clone(),
            base: self.base.clone(),
            key: self.key.clone(),
            agent: self.agent.clone(),
            connect: self.connect,
            idle: self.idle,
        };
        let url = format!("{}{path}", self.base);
        let spawned = std::thread::Builder::new()
            .name("attune-endpoint".into())
            .spawn(move || me.run_exchange(method, &url, body, model.as_deref(), lines, &tx));
        if let Err(e) = spawned {
            let (tx, rx2) = std::sync::mpsc::channel();
            let _ = tx.send(Msg::Fail(EngineError::Internal(format!(
                "cannot start a thread for the request: {e}"
            ))));
            return rx2;
        }
        rx
    }

    fn run_exchange(
        &self,
        method: &str,
        url: &str,
        body: Option<Value>,
        model: Option<&str>,
        lines: bool,
        tx: &std::sync::mpsc::Sender<Msg>,
    ) {
        let mut attempt = 0;
        let response = loop {
            let started = Instant::now();
            let mut req = self.agent.request(method, url);
            if let Some(k) = &self.key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let result = match &body {
                Some(b) => req
                    .set("Content-Type", "application/json")
                    .send_string(&b.to_string()),
                None => req.call(),
            };
            match result {
                Ok(r) => break r,
                Err(ureq::Error::Status(429, r)) if attempt < RATE_LIMIT_RETRIES => {
                    attempt += 1;
                    let wait = r
                        .header("retry-after")
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(Duration::from_secs_f64)
                        .unwrap_or(Duration::from_secs(1 << (attempt - 1)))
                        .min(MAX_RETRY_WAIT);
                    if tx.send(Msg::Retrying { attempt, wait }).is_err() {
                        return;
                    }
                    std::thread::sleep(wait);
                }
                Err(ureq::Error::Status(code, r)) => {
                    let _ = tx.send(Msg::Fail(self.status_error(code, r, model)));
                    return;
                }
                Err(ureq::Error::Transport(t)) => {
                    let _ = tx.send(Msg::Fail(self.transport_error(&t, started)));
                    return;
                }
            }
        };
        let mut reader = BufReader::new(response.into_reader());
        if !lines {
            let mut text = String::new();
            let msg = match reader.read_to_string(&mut text) {
                Ok(_) => Msg::Text(text),
                Err(e) => Msg::Fail(self.read_error(&e)),
            };
            let _ = tx.send(msg);
            let _ = tx.send(Msg::End);
            return;
        }
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => {
                    let _ = tx.send(Msg::End);
                    return;
                }
                Ok(_) => {
                    if tx.send(Msg::Text(line.clone())).is_err() {
                        return; // abandoned: dropping the reader closes the connection
                    }
                }
                Err(e) => {
                    let _ = tx.send(Msg::Fail(self.read_error(&e)));
                    return;
                }
            }
        }
    }

    fn status_error(&self, code: u16, r: ureq::Response, model: Option<&str>) -> EngineError {
        // The server's own message, when it sends OpenAI's error JSON.
        let text = r.into_string().unwrap_or_default();
        let said = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .or_else(|| v.get("error"))
                    .or_else(|| v.get("message"))
                    .and_then(|m| m.as_str().map(str::to_string))
            })
            .unwrap_or_else(|| text.chars().take(200).collect());
        let said = if said.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", said.trim())
        };
        match code {
            401 | 403 => self.err(
                ErrorCode::EndpointAuth,
                format!(
                    "{} refused the request ({code}){said}; check the key you gave for it",
                    self.name
                ),
            ),
            404 if model.is_some() => self.err(
                ErrorCode::EndpointModel,
                format!(
                    "{} has no model '{}' (404){said}; refresh its model list",
                    self.name,
                    model.unwrap_or_default()
                ),
            ),
            429 => self.err(
                ErrorCode::EndpointRateLimited,
                format!(
                    "{} kept rate-limiting (429) after {RATE_LIMIT_RETRIES} retries{said}",
                    self.name
                ),
            ),
            _ => self.err(
                ErrorCode::EndpointHttp,
                format!("{} answered HTTP {code}{said}", self.name),
            ),
        }
    }

    fn transport_error(&self, t: &ureq::Transport, started: Instant) -> EngineError {
        let text = t.to_string();
        let timed_out = text.to_ascii_lowercase().contains("timed out");
        match t.kind() {
            ureq::ErrorKind::ConnectionFailed if timed_out => self.err(
                ErrorCode::EndpointTimeout,
                format!(
                    "{} at {} did not accept the connection within {:.0} s",
                    self.name,
                    self.base,
                    self.connect.as_secs_f64()
                ),
            ),
            _ if timed_out && started.elapsed() >= self.idle => self.timeout(),
            ureq::ErrorKind::Dns | ureq::ErrorKind::ConnectionFailed => self.err(
                ErrorCode::EndpointUnreachable,
                format!("cannot reach {} at {}: {text}", self.name, self.base),
            ),
            _ => self.err(
                ErrorCode::EndpointUnreachable,
                format!(
                    "the request to {} at {} failed: {text}",
                    self.name, self.base
                ),
            ),
        }
    }

    fn read_error(&self, e: &std::io::Error) -> EngineError {
        if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) {
            return self.timeout();
        }
        self.err(
            ErrorCode::EndpointProtocol,
            format!("reading {}'s answer failed: {e}", self.name),
        )
    }

    /// The next message of an exchange, waiting at most the idle limit, and giving
    /// `None` at once when `cancel` is set.
    fn next(
        &self,
        rx: &std::sync::mpsc::Receiver<Msg>,
        cancel: &AtomicBool,
    ) -> Result<Option<Msg>, EngineError> {
        let since = Instant::now();
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Ok(None);
            }
            match rx.recv_timeout(POLL) {
                Ok(m) => return Ok(Some(m)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if since.elapsed() >= self.idle {
                        return Err(self.timeout());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Ok(Some(Msg::End));
                }
            }
        }
    }

    /// `GET /models`: the ids.
    fn models(&self, cancel: &AtomicBool) -> Result<Vec<String>, EngineError> {
        let rx = self.exchange("GET", "/models", None, None, false);
        let body = loop {
            match self.next(&rx, cancel)? {
                None => return Err(EngineError::Cancelled),
                Some(Msg::Text(t)) => break t,
                Some(Msg::Fail(e)) => return Err(e),
                Some(Msg::Retrying { .. }) => {}
                Some(Msg::End) => {
                    return Err(self.err(
                        ErrorCode::EndpointProtocol,
                        format!("{} ended the connection without an answer", self.name),
                    ))
                }
            }
        };
        let v: Value = serde_json::from_str(&body).map_err(|e| {
            self.err(
                ErrorCode::EndpointProtocol,
                format!("{}'s model list is not JSON: {e}", self.name),
            )
        })?;
        let data = v.get("data").and_then(Value::as_array).ok_or_else(|| {
            self.err(
                ErrorCode::EndpointProtocol,
                format!("{}'s model list has no 'data' array", self.name),
            )
        })?;
        let mut ids: Vec<String> = data
            .iter()
            .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_string))
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Streams an answer: text pieces as they come, then the figures.
    fn stream(
        &self,
        path: &str,
        body: &Value,
        kind: Kind,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(ChatEvent),
    ) -> Result<GenerationStats, EngineError> {
        let started = Instant::now();
        let model = body
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_string);
        let rx = self.exchange("POST", path, Some(body.clone()), model, true);
        let mut text = String::new();
        let mut pieces = 0usize;
        let mut first_token: Option<Instant> = None;
        let mut finish: Option<String> = None;
        let mut usage: Option<(usize, usize)> = None;
        let mut done = false;
        loop {
            let line = match self.next(&rx, cancel)? {
                None => return Ok(cancelled(text, pieces, started, first_token)),
                Some(Msg::Retrying { attempt, wait }) => {
                    on_event(ChatEvent::Retrying {
                        attempt,
                        wait_ms: wait.as_millis() as u64,
                        reason: format!("{} is rate-limiting requests (429)", self.name),
                    });
                    continue;
                }
                Some(Msg::Fail(e)) => return Err(e),
                Some(Msg::End) => break,
                Some(Msg::Text(line)) => line,
            };
            let l = line.trim_end_matches(['\r', '\n']);
            let Some(data) = l.strip_prefix("data:") else {
                continue; // comments, event names, blank separators
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                done = true;
                break;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| {
                self.err(
                    ErrorCode::EndpointProtocol,
                    format!(
                        "{} sent a chunk that is not JSON ({e}): {}",
                        self.name,
                        data.chars().take(120).collect::<String>()
                    ),
                )
            })?;
            if let Some(err) = v.get("error") {
                let msg = err
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| err.to_string());
                return Err(self.err(
                    ErrorCode::EndpointHttp,
                    format!("{} failed mid-answer: {msg}", self.name),
                ));
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                let n = |k: &str| u.get(k).and_then(Value::as_u64).map(|x| x as usize);
                if let (Some(p), Some(c)) = (n("prompt_tokens"), n("completion_tokens")) {
                    usage = Some((p, c));
                }
            }
            let Some(choice) = v
                .get("choices")
                .and_then(Value::as_array)
                .and_then(|c| c.first())
            else {
                continue;
            };
            let piece = match kind {
                Kind::Chat => choice.pointer("/delta/content").and_then(Value::as_str),
                Kind::Text => choice.get("text").and_then(Value::as_str),
            };
            if let Some(p) = piece.filter(|p| !p.is_empty()) {
                first_token.get_or_insert_with(Instant::now);
                pieces += 1;
                text.push_str(p);
                on_event(ChatEvent::Token {
                    text: p.to_string(),
                });
            }
            if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
                finish = Some(f.to_string());
            }
        }
        if !done && finish.is_none() {
            return Err(self.err(
                ErrorCode::EndpointProtocol,
                format!(
                    "{}'s answer was cut off after {} characters (the stream ended before \
                     the answer finished)",
                    self.name,
                    text.chars().count()
                ),
            ));
        }
        let finish_reason = match finish.as_deref() {
            Some("length") => FinishReason::Length,
            _ => FinishReason::Eos,
        };
        let stats = figures(text, pieces, usage, started, first_token, finish_reason);
        on_event(ChatEvent::Done {
            stats: stats.clone(),
        });
        Ok(stats)
    }
}

fn cancelled(
    text: String,
    pieces: usize,
    started: Instant,
    first: Option<Instant>,
) -> GenerationStats {
    figures(text, pieces, None, started, first, FinishReason::Cancelled)
}

/// The figures of a remote answer: tokens from the server's usage when it sent one,
/// else the streamed pieces (one token each, as servers stream them).
fn figures(
    text: String,
    pieces: usize,
    usage: Option<(usize, usize)>,
    started: Instant,
    first: Option<Instant>,
    finish_reason: FinishReason,
) -> GenerationStats {
    let (prompt_tokens, generated) = usage.unwrap_or((0, pieces));
    let first = first.unwrap_or_else(Instant::now);
    let prompt_ms = first.duration_since(started).as_secs_f64() * 1e3;
    let generate_ms = first.elapsed().as_secs_f64() * 1e3;
    GenerationStats {
        text,
        finish_reason,
        prompt_tokens,
        generated_tokens: generated,
        prompt_ms,
        generate_ms,
        prompt_tok_per_s: if prompt_ms > 0.0 {
            prompt_tokens as f64 / (prompt_ms / 1e3)
        } else {
            0.0
        },
        generate_tok_per_s: if generate_ms > 0.0 {
            generated as f64 / (generate_ms / 1e3)
        } else {
            0.0
        },
    }
}

#[cfg(test)]
mod tests;

impl Engine {
    /// Evaluates a template (or none) against model `model` of endpoint `endpoint` on a
    /// dataset split: for every labeled chat row, the conversation up to its last
    /// assistant turn (through the template) is sent, greedy, and the answer's
    /// `Final answer:` compared with the label. Only accuracy applies (see
    /// [`EndpointEvalReport`]); `options.accuracy` is implied, the NLL settings unused.
    /// Recorded in the library; a cancel records nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate_endpoint(
        &self,
        endpoint: &str,
        model: &str,
        template: Option<&attune_protocol::PromptTemplate>,
        dataset: &str,
        options: &attune_protocol::EvalOptions,
        progress: &mut dyn FnMut(attune_protocol::EvalProgress),
        cancel: &AtomicBool,
    ) -> Result<attune_protocol::EndpointEvalReport, EngineError> {
        use crate::datasets::Sample;
        let row = self.endpoint_row(endpoint)?;
        let model = model.trim();
        if model.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "choose one of {}'s models to evaluate",
                row.name
            )));
        }
        if let Some(t) = template {
            crate::templates::check_template(t)?;
        }
        let ds = self.find_dataset(dataset)?;
        let rows: Vec<_> = self
            .dataset_rows(ds.id, options.split)?
            .into_iter()
            .take(options.limit.unwrap_or(usize::MAX))
            .collect();
        let labeled: Vec<_> = rows
            .iter()
            .filter(|r| r.label.is_some() && matches!(r.sample, Sample::Chat(_)))
            .collect();
        if labeled.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "dataset '{}' has no labeled chat rows in its {} split: an API model can only \
                 be scored by label accuracy",
                ds.name,
                options.split.as_str()
            )));
        }
        let params = SamplingParams {
            max_tokens: options.max_new_tokens.max(1),
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            ..SamplingParams::default()
        };
        let total = labeled.len() as u64;
        let mut scores = Vec::with_capacity(labeled.len());
        let mut correct_n = 0u64;
        for (i, r) in labeled.iter().enumerate() {
            if cancel.load(Ordering::SeqCst) {
                return Err(EngineError::Cancelled);
            }
            progress(attune_protocol::EvalProgress {
                done: i as u64,
                total,
                phase: "asking the endpoint".into(),
            });
            let (Sample::Chat(msgs), Some(label)) = (&r.sample, &r.label) else {
                continue;
            };
            let cut = msgs
                .iter()
                .rposition(|m| m.role == "assistant")
                .unwrap_or(msgs.len());
            let prompt = match template {
                Some(t) => crate::templates::apply_template(t, &msgs[..cut]).0,
                None => msgs[..cut].to_vec(),
            };
            let stats = self.endpoint_chat(row.id, model, &prompt, &params, cancel, &mut |_| {})?;
            if stats.finish_reason == FinishReason::Cancelled {
                return Err(EngineError::Cancelled);
            }
            let answer = crate::evaluate::parse_final_answer(&stats.text);
            let correct = answer
                .as_deref()
                .is_some_and(|a| a.eq_ignore_ascii_case(label.trim()));
            correct_n += u64::from(correct);
            scores.push(attune_protocol::RowScore {
                source_id: r.source_id.clone(),
                sum_nll: 0.0,
                n_tokens: 0,
                answer,
                correct: Some(correct),
            });
        }
        progress(attune_protocol::EvalProgress {
            done: total,
            total,
            phase: "asking the endpoint".into(),
        });
        let accuracy = Some(correct_n as f64 / total as f64);
        let created_at = crate::clock::now_rfc3339();
        let template_name = template.map(|t| {
            if t.name.trim().is_empty() {
                "template".to_string()
            } else {
                t.name.trim().to_string()
            }
        });
        let id = self
            .store
            .insert_endpoint_evaluation(&crate::store::EndpointEvalRow {
                endpoint_id: row.id,
                model: model.to_string(),
                template: template_name.clone(),
                dataset_id: ds.id,
                split: options.split.as_str().to_string(),
                n_rows: rows.len() as i64,
                accuracy,
                n_labeled: total as i64,
                created_at: created_at.clone(),
            })?;
        Ok(attune_protocol::EndpointEvalReport {
            id,
            endpoint: row.name.clone(),
            model: model.to_string(),
            template: template_name,
            dataset_id: ds.id,
            split: options.split,
            n_rows: rows.len() as u64,
            accuracy,
            n_labeled: total,
            rows: scores,
            note: "Label accuracy from greedy answers. No NLL or perplexity: they need the \
                   probability of every token of the reference answer, which an \
                   OpenAI-compatible API does not return."
                .into(),
            created_at,
        })
    }
}
