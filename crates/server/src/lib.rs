//! Attune's OpenAI-compatible HTTP server, a thin layer over the engine actor: every
//! request becomes one [`attune_engine::Request::Generate`] with its own cancel token,
//! and waits in the actor's fair queue like the app's own answers.
//!
//! - `GET /v1/models`, `GET /v1/models/{id}`: the library's base models, adapters and
//!   prompt templates ([`catalogue`]).
//! - `POST /v1/chat/completions`: messages through the model's chat template; `stream`
//!   sends server-sent events in OpenAI's chunk format, with a final usage chunk when
//!   `stream_options.include_usage` is set.
//! - `POST /v1/completions`: plain prompts continued as they are.
//!
//! Errors are OpenAI's error JSON with its status codes (400, 401, 404, 503 when the
//! queue is full). A client that disconnects stops its generation: the request's token
//! is cancelled when its response (or its stream) is dropped.
//!
//! The server binds to loopback unless told otherwise, and refuses to bind elsewhere
//! without an API key.

mod catalogue;
mod error;
mod openai;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use attune_engine::{Actor, CancelOnDrop, CancelToken, EngineError, Generation, Prompt, Request};
use attune_protocol::{ChatEvent, ChatMessage, GenerationStats};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub use catalogue::Entry as ModelEntry;
pub use error::ApiError;

/// How the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    /// Clients must send `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("'{0}' is not an IP address to listen on (use e.g. 127.0.0.1, ::1 or 0.0.0.0)")]
    BadHost(String),
    #[error(
        "listening on {0} would expose the library to other machines: set an API key \
         (--api-key KEY, or the app's key field), which clients send as a Bearer token"
    )]
    KeyRequired(String),
    #[error("the API key is empty")]
    EmptyKey,
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server stopped: {0}")]
    Serve(#[source] std::io::Error),
}

impl ServerOptions {
    /// The address to bind, after the checks: an IP host, and a key for a
    /// non-loopback address.
    pub fn address(&self) -> Result<SocketAddr, ServerError> {
        let host = self
            .host
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let ip: IpAddr = if host == "localhost" {
            IpAddr::from([127, 0, 0, 1])
        } else {
            host.parse()
                .map_err(|_| ServerError::BadHost(self.host.clone()))?
        };
        if self.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return Err(ServerError::EmptyKey);
        }
        if !ip.is_loopback() && self.api_key.is_none() {
            return Err(ServerError::KeyRequired(ip.to_string()));
        }
        Ok(SocketAddr::new(ip, self.port))
    }
}

/// Binds the listening socket (checked options).
pub async fn bind(options: &ServerOptions) -> Result<tokio::net::TcpListener, ServerError> {
    let addr = options.address()?;
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        })
}

struct AppState {
    actor: Actor,
    api_key: Option<String>,
}

/// The router over `actor` (exposed for tests and embedding).
pub fn router(actor: Actor, api_key: Option<String>) -> Router {
    let state = Arc::new(AppState { actor, api_key });
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ))
        .with_state(state)
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    actor: Actor,
    api_key: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let app = router(actor, api_key);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(ServerError::Serve)
}

/// A server running on its own thread (the app's switch): its address, and a way to
/// stop it.
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    /// Binds and serves on a new thread with its own runtime; errors come back before
    /// this returns (a taken port, a refused host).
    pub fn start(actor: Actor, options: &ServerOptions) -> Result<RunningServer, ServerError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("attune-server")
            .enable_all()
            .build()
            .map_err(ServerError::Serve)?;
        let listener = runtime.block_on(bind(options))?;
        let addr = listener.local_addr().map_err(ServerError::Serve)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let key = options.api_key.clone();
        let thread = std::thread::Builder::new()
            .name("attune-server".into())
            .spawn(move || {
                let shutdown = async {
                    let _ = stopped.await;
                };
                if let Err(e) = runtime.block_on(serve(listener, actor, key, shutdown)) {
                    eprintln!("attune: {e}");
                }
            })
            .map_err(ServerError::Serve)?;
        Ok(RunningServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops accepting, lets requests in flight finish (their generations go on until
    /// they end or their clients leave), and waits for the thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------------------
// Authorization
// ---------------------------------------------------------------------------

/// Compares without an early exit, so timing does not tell how much of a key matched.
fn same_key(given: &[u8], want: &[u8]) -> bool {
    let mut diff = given.len() ^ want.len();
    for (i, w) in want.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ w);
    }
    diff == 0
}

async fn authorize(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(request).await;
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match given {
        None => ApiError::unauthorized(
            "You didn't provide an API key. This Attune server requires one: send \
             'Authorization: Bearer KEY'.",
        )
        .into_response(),
        Some(v) => {
            let token = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .unwrap_or("")
                .trim();
            if same_key(token.as_bytes(), key.as_bytes()) {
                next.run(request).await
            } else {
                // Never echo the key, not even a part of it.
                ApiError::unauthorized("Incorrect API key provided.").into_response()
            }
        }
    }
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::unknown_route(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

// ---------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------

/// Runs library work off the async runtime.
async fn library<T: Send + 'static>(
    actor: &Actor,
    work: impl FnOnce(&attune_engine::Engine) -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    let engine = Arc::clone(actor.engine());
    tokio::task::spawn_blocking(move || work(&engine))
        .await
        .map_err(|e| ApiError::internal(format!("the library worker stopped: {e}")))?
        .map_err(ApiError::from)
}

async fn list_models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let data = library(&state.actor, catalogue::list).await?;
    Ok(Json(json!({ "object": "list", "data": data })))
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ModelEntry>, ApiError> {
    let wanted = id.clone();
    match library(&state.actor, move |e| catalogue::resolve(e, &wanted)).await? {
        Some(entry) => Ok(Json(entry)),
        None => Err(ApiError::model_not_found(&id)),
    }
}

// ---------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------

/// What a generation sends back to its handler, in order.
enum Msg {
    Event(ChatEvent),
    Done(Result<GenerationStats, EngineError>),
}

/// A generation submitted to the actor: its messages, and its token (cancelled when
/// this is dropped before the end, e.g. when the client disconnects).
struct Submitted {
    rx: mpsc::UnboundedReceiver<Msg>,
    guard: CancelOnDrop,
}

impl Submitted {
    fn submit(actor: &Actor, generation: Generation) -> Submitted {
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancelToken::new();
        let events = tx.clone();
        actor.send(Request::Generate {
            generation,
            cancel: cancel.clone(),
            on_event: Box::new(move |e| {
                let _ = events.send(Msg::Event(e));
            }),
            reply: Box::new(move |r| {
                let _ = tx.send(Msg::Done(r));
            }),
        });
        Submitted {
            rx,
            guard: CancelOnDrop::new(cancel),
        }
    }

    /// Waits until the actor accepted the request (queued) or refused it.
    async fn accepted(&mut self) -> Result<(), ApiError> {
        match self.rx.recv().await {
            Some(Msg::Event(_)) => Ok(()),
            Some(Msg::Done(Err(e))) => Err(e.into()),
            Some(Msg::Done(Ok(_))) => Err(ApiError::internal(
                "the engine answered before accepting the request",
            )),
            None => Err(ApiError::internal("the engine stopped")),
        }
    }

    /// Waits for the whole answer.
    async fn finish(mut self) -> Result<GenerationStats, ApiError> {
        while let Some(msg) = self.rx.recv().await {
            if let Msg::Done(result) = msg {
                self.guard.disarm();
                return result.map_err(ApiError::from);
            }
        }
        Err(ApiError::internal("the engine stopped before answering"))
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A fresh response id.
fn response_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{:x}{nanos:08x}{n:04x}", now_unix())
}

const FINGERPRINT: &str = concat!("attune-", env!("CARGO_PKG_VERSION"));

/// The fairness key: the API user when given, else the connection.
fn client_of(user: Option<&str>, peer: SocketAddr) -> String {
    match user {
        Some(u) if !u.is_empty() => format!("api-user:{u}"),
        _ => format!("api:{peer}"),
    }
}

async fn resolve_model(actor: &Actor, model: &str) -> Result<ModelEntry, ApiError> {
    let wanted = model.to_string();
    library(actor, move |e| catalogue::resolve(e, &wanted))
        .await?
        .ok_or_else(|| ApiError::model_not_found(model))
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: openai::ChatRequest = openai::parse(&body)?;
    let (settings, messages) = request.checked()?;
    let entry = resolve_model(&state.actor, &settings.model).await?;
    let generation = Generation {
        client: client_of(settings.user.as_deref(), peer),
        target: entry.target,
        prompt: Prompt::Chat(messages),
        params: settings.params.clone(),
    };
    let mut submitted = Submitted::submit(&state.actor, generation);
    submitted.accepted().await?;
    let id = response_id("chatcmpl");
    let created = now_unix();
    if settings.stream {
        return Ok(chat_stream(
            submitted,
            id,
            created,
            settings.model,
            settings.include_usage,
        ));
    }
    let stats = submitted.finish().await?;
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": settings.model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": stats.text, "refusal": null },
            "logprobs": null,
            "finish_reason": openai::finish_reason(stats.finish_reason),
        }],
        "usage": openai::Usage::of(&stats),
    }))
    .into_response())
}

/// One SSE event with a JSON payload.
fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// The chunks of a streamed answer: the role first, then text, then the finish reason,
/// the usage (if asked for) and `[DONE]`. A failure mid-way is sent as an error event.
fn chat_stream(
    submitted: Submitted,
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
) -> Response {
    let chunk = move |delta: Value, finish: Option<&str>, usage: bool| {
        let mut v = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        });
        if include_usage {
            v["usage"] = Value::Null;
        }
        if usage {
            v["choices"] = json!([]);
        }
        v
    };
    let first = chunk(json!({ "role": "assistant", "content": "" }), None, false);
    sse(submitted, first, move |msg| match msg {
        StreamMsg::Text(text) => vec![chunk(json!({ "content": text }), None, false)],
        StreamMsg::End(stats) => {
            let mut out = vec![chunk(
                json!({}),
                Some(openai::finish_reason(stats.finish_reason)),
                false,
            )];
            if include_usage {
                let mut u = chunk(json!({}), None, true);
                u["usage"] = json!(openai::Usage::of(&stats));
                out.push(u);
            }
            out
        }
    })
}

enum StreamMsg {
    Text(String),
    End(GenerationStats),
}

/// A server-sent event stream over a submitted generation: `first`, then what `render`
/// makes of each piece of text and of the end, then `[DONE]`. The stream owns the
/// generation's cancel guard: when the client goes away and the stream is dropped,
/// the generation stops.
fn sse(
    submitted: Submitted,
    first: Value,
    render: impl FnMut(StreamMsg) -> Vec<Value> + Send + 'static,
) -> Response {
    struct St<R> {
        sub: Submitted,
        render: R,
        pending: std::collections::VecDeque<Event>,
        ended: bool,
    }
    let mut pending = std::collections::VecDeque::new();
    pending.push_back(data(&first));
    let st = St {
        sub: submitted,
        render,
        pending,
        ended: false,
    };
    let events = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok::<Event, Infallible>(e), st));
            }
            if st.ended {
                return None;
            }
            match st.sub.rx.recv().await {
                Some(Msg::Event(ChatEvent::Token { text })) => {
                    for v in (st.render)(StreamMsg::Text(text)) {
                        st.pending.push_back(data(&v));
                    }
                }
                Some(Msg::Event(_)) => {}
                Some(Msg::Done(Ok(stats))) => {
                    st.sub.guard.disarm();
                    for v in (st.render)(StreamMsg::End(stats)) {
                        st.pending.push_back(data(&v));
                    }
                    st.pending.push_back(Event::default().data("[DONE]"));
                    st.ended = true;
                }
                Some(Msg::Done(Err(e))) => {
                    st.sub.guard.disarm();
                    st.pending.push_back(data(&ApiError::from(e).body()));
                    st.ended = true;
                }
                None => return None,
            }
        }
    });
    sse_response(events)
}

fn sse_response(
    events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
) -> Response {
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

async fn completions(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: openai::CompletionRequest = openai::parse(&body)?;
    let (settings, prompts) = request.checked()?;
    let entry = resolve_model(&state.actor, &settings.model).await?;
    let client = client_of(settings.user.as_deref(), peer);
    let prompt_of = |text: &str| -> Prompt {
        match &entry.target {
            // A template answers its wrapped user turn; models continue the text.
            attune_protocol::ChatTarget::Template { .. } => Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: text.to_string(),
            }]),
            _ => Prompt::Text(text.to_string()),
        }
    };
    let id = response_id("cmpl");
    let created = now_unix();
    if settings.stream {
        let mut submitted = Submitted::submit(
            &state.actor,
            Generation {
                client,
                target: entry.target.clone(),
                prompt: prompt_of(&prompts[0]),
                params: settings.params.clone(),
            },
        );
        submitted.accepted().await?;
        let model = settings.model.clone();
        let include_usage = settings.include_usage;
        let chunk = move |text: &str, finish: Option<&str>| {
            json!({
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }],
            })
        };
        let first = chunk("", None);
        let model_name = settings.model.clone();
        let usage_id = response_id("cmpl");
        return Ok(sse(submitted, first, move |msg| match msg {
            StreamMsg::Text(t) => vec![chunk(&t, None)],
            StreamMsg::End(stats) => {
                let mut out = vec![chunk("", Some(openai::finish_reason(stats.finish_reason)))];
                if include_usage {
                    out.push(json!({
                        "id": usage_id,
                        "object": "text_completion",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": openai::Usage::of(&stats),
                    }));
                }
                out
            }
        }));
    }
    let mut choices = Vec::new();
    let mut usage = openai::Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
    };
    for (index, p) in prompts.iter().enumerate() {
        let mut submitted = Submitted::submit(
            &state.actor,
            Generation {
                client: client.clone(),
                target: entry.target.clone(),
                prompt: prompt_of(p),
                params: settings.params.clone(),
            },
        );
        submitted.accepted().await?;
        let stats = submitted.finish().await?;
        usage = usage.add(openai::Usage::of(&stats));
        choices.push(json!({
            "index": index,
            "text": stats.text,
            "logprobs": null,
            "finish_reason": openai::finish_reason(stats.finish_reason),
        }));
    }
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": settings.model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
        "usage": usage,
    }))
    .into_response())
}

#[cfg(test)]
mod tests;
