//! Hugging Face Hub pulls into the standard HF cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`,
//! else `~/.cache/huggingface/hub`, laid out as `huggingface_hub` and `hf-hub` lay it out:
//! `refs/`, `blobs/<etag>`, `snapshots/<commit>/<file>` links), so files other tools downloaded
//! are reused and partial downloads resume.
//!
//! The HTTP client is ureq with a connect timeout and a read timeout on every request
//! (`hf-hub`'s own client has neither, so a server that accepts and never answers hung the
//! pull). Every request runs on a worker thread that the pull polls with the caller's cancel
//! flag: Cancel returns at once, and the worker stops at its next chunk or timeout.
//!
//! A repository with `.gguf` files yields one of them (the caller's choice, else
//! Q4_K_M, Q4_1, Q8_0 in that order); otherwise its safetensors folder
//! (config, tokenizer files, weights and index). When the Hub cannot be reached, a
//! snapshot already in the cache is used; if there is none the error says so.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use std::io::{Read, Write};
use std::sync::Arc;

use hf_hub::{Cache, Repo, RepoType};

use crate::error::EngineError;

/// Download progress of one file of a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullProgress {
    /// File name inside the repository.
    pub file: String,
    /// 1-based position of `file` among the files of this pull.
    pub file_index: usize,
    pub file_count: usize,
    pub bytes_done: u64,
    /// 0 when unknown.
    pub total_bytes: u64,
    /// The file was already in the cache; nothing was downloaded.
    pub cached: bool,
}

/// Where and how to reach the Hub.
#[derive(Debug, Clone)]
pub(crate) struct HubConfig {
    pub endpoint: String,
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    /// Longest wait for a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest wait for any read or write on a connection (a stalled server).
    pub read_timeout: Duration,
}

/// Defaults of [`HubConfig`]'s timeouts; `ATTUNE_HUB_TIMEOUT_SECS` sets the read timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// GGUF quantizations preferred when the caller does not name a file, best first.
const PREFERRED_QUANTS: &[&str] = &["q4_k_m", "q4_1", "q8_0"];
/// Files of a safetensors repository besides the weights.
const REQUIRED_HF_FILES: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL_HF_FILES: &[&str] = &[
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
];

impl HubConfig {
    /// From `HF_ENDPOINT`, `HF_HUB_CACHE` / `HF_HOME`, `HF_TOKEN` (else the cached token).
    pub fn from_env() -> Result<HubConfig, EngineError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let endpoint = var("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let cache_dir = if let Some(dir) = var("HF_HUB_CACHE") {
            PathBuf::from(dir)
        } else if let Some(home) = var("HF_HOME") {
            PathBuf::from(home).join("hub")
        } else {
            dirs::home_dir()
                .ok_or_else(|| {
                    EngineError::InvalidInput(
                        "cannot find the home directory for the Hugging Face cache; set HF_HOME"
                            .to_string(),
                    )
                })?
                .join(".cache/huggingface/hub")
        };
        let token = var("HF_TOKEN").or_else(|| Cache::new(cache_dir.clone()).token());
        let read_timeout = match var("ATTUNE_HUB_TIMEOUT_SECS") {
            None => READ_TIMEOUT,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) if n > 0 => Duration::from_secs(n),
                _ => {
                    return Err(EngineError::InvalidInput(format!(
                        "ATTUNE_HUB_TIMEOUT_SECS = '{v}' is not a positive number of seconds"
                    )))
                }
            },
        };
        Ok(HubConfig {
            endpoint,
            cache_dir,
            token,
            connect_timeout: CONNECT_TIMEOUT.min(read_timeout),
            read_timeout,
        })
    }
}

/// A pulled model, ready to register.
#[derive(Debug)]
pub(crate) struct Pulled {
    pub repo: String,
    /// The resolved commit when known, else the requested revision.
    pub revision: String,
    /// The `.gguf` file or the snapshot folder.
    pub path: PathBuf,
}

/// Files of a repository at a revision, from the Hub or from the cache.
struct Listing {
    commit: Option<String>,
    files: Vec<String>,
    /// The listing came from the cache because the Hub was unreachable.
    offline: bool,
}

/// Downloads (or finds in the cache) the model files of `repo` at `revision`.
pub(crate) fn pull(
    cfg: &HubConfig,
    repo: &str,
    revision: Option<&str>,
    file: Option<&str>,
    progress: &mut dyn FnMut(PullProgress),
    cancel: &AtomicBool,
) -> Result<Pulled, EngineError> {
    let repo = repo.trim();
    validate_repo_id(repo)?;
    let revision = revision.map(str::trim).unwrap_or("main");
    if revision.is_empty() || revision.contains(char::is_whitespace) || revision.contains("..") {
        return Err(EngineError::InvalidInput(format!(
            "revision '{revision}' is not a valid branch, tag or commit"
        )));
    }
    let hf_repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    let client = Client::new(cfg);

    let info_url = format!("{}/api/models/{repo}/revision/{revision}", cfg.endpoint);
    let info = {
        let client = client.clone();
        cancellable(cancel, move |_, _| client.get_json(&info_url))?
    };
    let listing = match info.and_then(|v| parse_info(&v).map_err(|m| NetError::Bad(m.to_string())))
    {
        Ok((commit, files)) => Listing {
            commit: Some(commit),
            files,
            offline: false,
        },
        Err(e) => match classify(cfg, repo, revision, e) {
            err @ EngineError::HubUnreachable { .. } => {
                cached_listing(cfg, &hf_repo, revision).ok_or(err)?
            }
            err => return Err(err),
        },
    };
    let wanted = choose_files(repo, &listing.files, file)?;

    let snapshot_of = |commit: &str| {
        cfg.cache_dir
            .join(hf_repo.folder_name())
            .join("snapshots")
            .join(commit)
    };
    let count = wanted.len();
    let mut local = Vec::with_capacity(count);
    for (i, name) in wanted.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(EngineError::Cancelled);
        }
        let cached = listing
            .commit
            .as_deref()
            .map(|c| snapshot_of(c).join(name))
            .filter(|p| p.exists());
        let path = match cached {
            Some(p) => {
                let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                progress(PullProgress {
                    file: name.clone(),
                    file_index: i + 1,
                    file_count: count,
                    bytes_done: size,
                    total_bytes: size,
                    cached: true,
                });
                p
            }
            None if listing.offline => {
                return Err(EngineError::HubUnreachable {
                    endpoint: cfg.endpoint.clone(),
                    reason: format!("{name} of {repo} is not in the local cache"),
                })
            }
            None => download(
                &client,
                cfg,
                &hf_repo,
                listing.commit.as_deref().unwrap_or(revision),
                name,
                (i + 1, count),
                progress,
                cancel,
            )
            .map_err(|e| match e {
                DownloadError::Cancelled => EngineError::Cancelled,
                DownloadError::Net(e) => match classify(cfg, repo, revision, e) {
                        EngineError::RepoNotFound { .. } => EngineError::Hub {
                            repo: repo.to_string(),
                            message: format!(
                                "file {name} not found at revision {revision}, or access to it \
                                 is restricted (gated repository: accept its terms and set HF_TOKEN)"
                            ),
                        },
                    other => other,
                },
            })?,
        };
        local.push(path);
    }

    let first = local.first().ok_or_else(|| EngineError::Hub {
        repo: repo.to_string(),
        message: "no model files to download".to_string(),
    })?;
    let is_gguf = wanted.first().is_some_and(|f| f.ends_with(".gguf"));
    let path = if is_gguf {
        first.clone()
    } else {
        // Every file of one commit sits in the same snapshot folder.
        first
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| EngineError::Hub {
                repo: repo.to_string(),
                message: format!("unexpected cache path {}", first.display()),
            })?
    };
    let commit = listing.commit.unwrap_or_else(|| revision.to_string());
    Ok(Pulled {
        repo: repo.to_string(),
        revision: commit,
        path,
    })
}

/// How long [`hub_status`] waits for a connection to the Hub.
const PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// Whether this machine can reach the Hugging Face Hub: the endpoint's host is
/// resolved and a TCP connection to it is opened (no request is sent). Takes at most a
/// few seconds; the first-start screen uses it to say "offline" before anyone clicks.
pub fn hub_status() -> attune_protocol::HubStatus {
    let endpoint = HubConfig::from_env()
        .map(|c| c.endpoint)
        .unwrap_or_else(|_| DEFAULT_ENDPOINT.to_string());
    let probed = probe(&endpoint, PROBE_TIMEOUT);
    attune_protocol::HubStatus {
        endpoint,
        reachable: probed.is_ok(),
        reason: probed.err(),
    }
}

/// Resolves `endpoint`'s host and connects to its port within `timeout`.
fn probe(endpoint: &str, timeout: Duration) -> Result<(), String> {
    use std::net::{TcpStream, ToSocketAddrs};
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or_else(|| format!("{endpoint} is not a URL (set HF_ENDPOINT to https://...)"))?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => 443,
        "http" => 80,
        other => return Err(format!("{endpoint}: unsupported scheme {other}")),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, tail) = v6
            .split_once(']')
            .ok_or_else(|| format!("{endpoint}: unclosed [ in the host"))?;
        (host, tail.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{endpoint} names no host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("{endpoint}: '{p}' is not a port"))?,
        None => default_port,
    };
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host} ({e}): no network, or no DNS"))?
        .collect();
    let mut last = format!("{host} has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("cannot connect to {host} port {port}: {e}"),
        }
    }
    Err(last)
}

/// `owner/name` or `name`: letters, digits, `-`, `_`, `.`; no `..`.
fn validate_repo_id(repo: &str) -> Result<(), EngineError> {
    let parts: Vec<&str> = repo.split('/').collect();
    let ok_part = |p: &&str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if parts.len() > 2 || !parts.iter().all(ok_part) {
        return Err(EngineError::InvalidInput(format!(
            "'{repo}' is not a Hugging Face repository id (expected owner/name)"
        )));
    }
    Ok(())
}

/// The files to fetch: the chosen `.gguf`, or the safetensors folder's files.
fn choose_files(
    repo: &str,
    files: &[String],
    wanted: Option<&str>,
) -> Result<Vec<String>, EngineError> {
    let hub_err = |message: String| EngineError::Hub {
        repo: repo.to_string(),
        message,
    };
    let mut ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
    ggufs.sort();
    if let Some(w) = wanted {
        let w = w.trim();
        if !w.ends_with(".gguf") {
            return Err(EngineError::InvalidInput(format!(
                "--file '{w}': only a .gguf file can be chosen"
            )));
        }
        return match files.iter().find(|f| f.as_str() == w) {
            Some(f) => Ok(vec![f.clone()]),
            None => Err(hub_err(format!(
                "no file {w} in the repository (GGUF files: {})",
                if ggufs.is_empty() {
                    "none".to_string()
                } else {
                    ggufs
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ))),
        };
    }
    if !ggufs.is_empty() {
        for quant in PREFERRED_QUANTS {
            if let Some(f) = ggufs
                .iter()
                .find(|f| f.to_ascii_lowercase().contains(quant))
            {
                return Ok(vec![(*f).clone()]);
            }
        }
        return Ok(vec![ggufs[0].clone()]);
    }
    let weights: Vec<&String> = files
        .iter()
        .filter(|f| f.ends_with(".safetensors") && !f.contains('/'))
        .collect();
    if weights.is_empty() {
        return Err(hub_err(
            "the repository has no .gguf or .safetensors model files".to_string(),
        ));
    }
    let mut out = Vec::new();
    for required in REQUIRED_HF_FILES {
        if !files.iter().any(|f| f == required) {
            return Err(hub_err(format!(
                "the repository has safetensors weights but no {required}"
            )));
        }
    }
    // config.json first: the snapshot folder is derived from the first file.
    out.extend(REQUIRED_HF_FILES.iter().map(|s| s.to_string()));
    out.extend(
        OPTIONAL_HF_FILES
            .iter()
            .filter(|o| files.iter().any(|f| f == *o))
            .map(|s| s.to_string()),
    );
    let mut weights: Vec<String> = weights.into_iter().cloned().collect();
    weights.sort();
    out.extend(weights);
    Ok(out)
}

/// The files of a snapshot already in the cache (for offline pulls).
fn cached_listing(cfg: &HubConfig, repo: &Repo, revision: &str) -> Option<Listing> {
    let root = cfg.cache_dir.join(repo.folder_name());
    let commit = match std::fs::read_to_string(root.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        // A commit hash given as the revision has no ref file.
        Err(_) => revision.to_string(),
    };
    let dir = root.join("snapshots").join(&commit);
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    files.sort();
    if files.is_empty() {
        return None;
    }
    Some(Listing {
        commit: Some(commit),
        files,
        offline: true,
    })
}

/// A failed request.
#[derive(Debug)]
enum NetError {
    /// No answer: connection refused, DNS, TLS, a timeout.
    Transport(String),
    /// The server answered with this HTTP status.
    Status(u16, String),
    /// The answer is not what the Hub sends.
    Bad(String),
}

impl From<ureq::Error> for NetError {
    fn from(e: ureq::Error) -> Self {
        match e {
            ureq::Error::Status(code, resp) => NetError::Status(code, resp.status_text().into()),
            ureq::Error::Transport(t) => NetError::Transport(t.to_string()),
        }
    }
}

/// The Hub's HTTP client: one agent with both timeouts, no automatic redirects (they are
/// followed here so the token goes only to the endpoint's own host).
#[derive(Clone)]
struct Client {
    agent: ureq::Agent,
    token: Option<String>,
    endpoint_host: Option<String>,
}

/// Largest JSON answer read (a repository listing is a few KB).
const MAX_JSON_BYTES: u64 = 16 << 20;
const MAX_REDIRECTS: usize = 5;

fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    Some(rest.split(['/', '?', '#']).next()?.to_ascii_lowercase())
}

impl Client {
    fn new(cfg: &HubConfig) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(cfg.connect_timeout)
            .timeout_read(cfg.read_timeout)
            .timeout_write(cfg.read_timeout)
            .redirects(0)
            .user_agent(concat!("attune/", env!("CARGO_PKG_VERSION")))
            .build();
        Client {
            agent,
            token: cfg.token.clone(),
            endpoint_host: host_of(&cfg.endpoint),
        }
    }

    /// GET `url` with `range`, following up to five redirects; returns the final response
    /// and the headers of the last answer from the endpoint's own host (where the Hub puts
    /// `x-repo-commit` and the etag before sending the client to its CDN).
    fn get(
        &self,
        url: &str,
        range: Option<&str>,
    ) -> Result<(ureq::Response, HubHeaders), NetError> {
        let mut url = url.to_string();
        let mut hub = HubHeaders::default();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.agent.get(&url);
            if let Some(r) = range {
                req = req.set("Range", r);
            }
            let same_host = host_of(&url) == self.endpoint_host;
            if let (Some(t), true) = (&self.token, same_host) {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            let resp = req.call()?;
            if same_host {
                hub.read(&resp);
            }
            if !(300..400).contains(&resp.status()) {
                return Ok((resp, hub));
            }
            let location = resp
                .header("location")
                .ok_or_else(|| {
                    NetError::Bad(format!("HTTP {} without a Location header", resp.status()))
                })?
                .to_string();
            url = if location.contains("://") {
                location
            } else if location.starts_with('/') {
                let (scheme, rest) = url.split_once("://").unwrap_or(("https", &url));
                let host = rest.split('/').next().unwrap_or("");
                format!("{scheme}://{host}{location}")
            } else {
                return Err(NetError::Bad(format!("unusable redirect to '{location}'")));
            };
        }
        Err(NetError::Bad(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }

    fn get_json(&self, url: &str) -> Result<serde_json::Value, NetError> {
        let (resp, _) = self.get(url, None)?;
        let mut body = Vec::new();
        resp.into_reader()
            .take(MAX_JSON_BYTES)
            .read_to_end(&mut body)
            .map_err(|e| NetError::Transport(e.to_string()))?;
        serde_json::from_slice(&body).map_err(|e| NetError::Bad(format!("not JSON: {e}")))
    }
}

/// The Hub's own headers on a file request.
#[derive(Debug, Default, Clone)]
struct HubHeaders {
    etag: Option<String>,
    commit: Option<String>,
}

impl HubHeaders {
    fn read(&mut self, resp: &ureq::Response) {
        if let Some(e) = resp.header("x-linked-etag").or_else(|| resp.header("etag")) {
            let e = e.trim().trim_start_matches("W/").replace('"', "");
            if !e.is_empty() {
                self.etag = Some(e);
            }
        }
        if let Some(c) = resp.header("x-repo-commit") {
            self.commit = Some(c.trim().to_string());
        }
    }
}

/// `{"sha": ..., "siblings": [{"rfilename": ...}]}` -> (commit, files). File names that are
/// not plain relative paths (`..`, absolute, backslashes) are dropped: a listing must not
/// steer a download out of the cache.
fn parse_info(v: &serde_json::Value) -> Result<(String, Vec<String>), String> {
    let sha = v
        .get("sha")
        .and_then(|s| s.as_str())
        .filter(|s| is_safe_name(s) && !s.contains('/'))
        .ok_or("the repository listing has no commit ('sha')")?;
    let files = v
        .get("siblings")
        .and_then(|s| s.as_array())
        .ok_or("the repository listing has no files ('siblings')")?
        .iter()
        .filter_map(|f| f.get("rfilename")?.as_str())
        .filter(|f| is_safe_name(f))
        .map(str::to_string)
        .collect();
    Ok((sha.to_string(), files))
}

/// A relative path of plain components: no `..`, `.`, empty parts, backslashes or NULs.
fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains(['\\', '\0'])
        && name
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
}

/// Runs `work` on a worker thread, polling `cancel` every 50 ms. `work` gets a stop flag (set
/// when the caller gives up, so it ends at its next chunk) and a progress sender. Returns
/// `Err(Cancelled)` at once on cancel; the worker ends by itself within a read timeout.
fn cancellable<T: Send + 'static>(
    cancel: &AtomicBool,
    work: impl FnOnce(&AtomicBool, &mpsc::Sender<(u64, u64)>) -> T + Send + 'static,
) -> Result<T, EngineError> {
    cancellable_with_progress(cancel, work, &mut |_| {})
}

fn cancellable_with_progress<T: Send + 'static>(
    cancel: &AtomicBool,
    work: impl FnOnce(&AtomicBool, &mpsc::Sender<(u64, u64)>) -> T + Send + 'static,
    on_progress: &mut dyn FnMut((u64, u64)),
) -> Result<T, EngineError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let worker_stop = Arc::clone(&stop);
    std::thread::spawn(move || {
        let out = work(&worker_stop, &tx);
        let _ = done_tx.send(out);
    });
    loop {
        if cancel.load(Ordering::Relaxed) {
            stop.store(true, Ordering::Relaxed);
            return Err(EngineError::Cancelled);
        }
        let done = done_rx.recv_timeout(Duration::from_millis(50));
        let mut latest = None;
        while let Ok(p) = rx.try_recv() {
            latest = Some(p);
        }
        if let Some(p) = latest {
            on_progress(p);
        }
        match done {
            Ok(out) => return Ok(out),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(EngineError::Hub {
                    repo: String::new(),
                    message: "the download stopped unexpectedly".into(),
                })
            }
        }
    }
}

enum DownloadError {
    Cancelled,
    Net(NetError),
}

/// Downloads `name` of `repo` at `commit` into the cache (`blobs/<etag>`, linked from
/// `snapshots/<commit>/<name>`), resuming a partial blob, reporting progress. The worker
/// thread checks the stop flag between 64 KiB chunks.
#[allow(clippy::too_many_arguments)]
fn download(
    client: &Client,
    cfg: &HubConfig,
    repo: &Repo,
    commit: &str,
    name: &str,
    (index, count): (usize, usize),
    progress: &mut dyn FnMut(PullProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf, DownloadError> {
    if !is_safe_name(name) || !is_safe_name(commit) {
        return Err(DownloadError::Net(NetError::Bad(format!(
            "unsafe file name '{name}'"
        ))));
    }
    let url = format!(
        "{}/{}/resolve/{commit}/{name}",
        cfg.endpoint,
        repo.url().trim_start_matches('/')
    );
    let root = cfg.cache_dir.join(repo.folder_name());
    let client = client.clone();
    let (file, commit_owned, root2) = (name.to_string(), commit.to_string(), root.clone());
    let work = move |stop: &AtomicBool, tx: &mpsc::Sender<(u64, u64)>| {
        fetch_blob(&client, &url, &root2, &commit_owned, &file, stop, tx)
    };
    let mut last = (0u64, 0u64);
    let result = cancellable_with_progress(cancel, work, &mut |p| {
        last = p;
        progress(PullProgress {
            file: name.to_string(),
            file_index: index,
            file_count: count,
            bytes_done: p.0,
            total_bytes: p.1,
            cached: false,
        })
    });
    let path = match result {
        Err(EngineError::Cancelled) => return Err(DownloadError::Cancelled),
        Err(other) => return Err(DownloadError::Net(NetError::Bad(other.to_string()))),
        Ok(r) => r.map_err(DownloadError::Net)?,
    };
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    progress(PullProgress {
        file: name.to_string(),
        file_index: index,
        file_count: count,
        bytes_done: size,
        total_bytes: last.1.max(size),
        cached: false,
    });
    Ok(path)
}

fn io_err(what: &Path, e: std::io::Error) -> NetError {
    NetError::Bad(format!("{}: {e}", what.display()))
}

/// The worker's part of [`download`].
fn fetch_blob(
    client: &Client,
    url: &str,
    root: &Path,
    commit: &str,
    name: &str,
    stop: &AtomicBool,
    tx: &mpsc::Sender<(u64, u64)>,
) -> Result<PathBuf, NetError> {
    // The etag names the blob; the Hub sends it (and the size) on a one-byte range request.
    let (probe, hub) = client.get(url, Some("bytes=0-0"))?;
    let total = probe
        .header("content-range")
        .and_then(|r| r.rsplit('/').next())
        .and_then(|n| n.trim().parse::<u64>().ok());
    drop(probe);
    let etag = hub
        .etag
        .filter(|e| is_safe_name(e) && !e.contains('/'))
        .ok_or_else(|| NetError::Bad(format!("no usable ETag for {name}")))?;
    let blobs = root.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| io_err(&blobs, e))?;
    let blob = blobs.join(&etag);
    if !blob.is_file() {
        let lock_path = blobs.join(format!("{etag}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        if !try_lock(&lock) {
            return Err(NetError::Bad(format!(
                "another download is writing {} (wait for it, or remove the .lock file)",
                lock_path.display()
            )));
        }
        let part = blobs.join(format!("{etag}.incomplete"));
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(|e| io_err(&part, e))?;
        let mut done = out.metadata().map_err(|e| io_err(&part, e))?.len();
        if total.is_some_and(|t| done > t) {
            out.set_len(0).map_err(|e| io_err(&part, e))?;
            done = 0;
        }
        if total != Some(done) {
            let range = format!("bytes={done}-");
            let (resp, _) = client.get(url, Some(&range))?;
            if resp.status() == 200 && done > 0 {
                // The server ignored the range: start over.
                out.set_len(0).map_err(|e| io_err(&part, e))?;
                done = 0;
            }
            let total = total.unwrap_or_else(|| {
                resp.header("content-length")
                    .and_then(|n| n.parse::<u64>().ok())
                    .map(|n| n + done)
                    .unwrap_or(0)
            });
            let _ = tx.send((done, total));
            let mut body = resp.into_reader();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if stop.load(Ordering::Relaxed) {
                    return Err(NetError::Bad("stopped".into()));
                }
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(NetError::Transport(e.to_string())),
                };
                out.write_all(&buf[..n]).map_err(|e| io_err(&part, e))?;
                done += n as u64;
                let _ = tx.send((done, total));
            }
            if total > 0 && done != total {
                return Err(NetError::Transport(format!(
                    "the connection closed after {done} of {total} bytes of {name}"
                )));
            }
        }
        out.sync_all().map_err(|e| io_err(&part, e))?;
        drop(out);
        std::fs::rename(&part, &blob).map_err(|e| io_err(&blob, e))?;
        drop(lock);
        let _ = std::fs::remove_file(&lock_path);
    }
    let pointer = root.join("snapshots").join(commit).join(name);
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    if !pointer.exists() {
        let _ = std::fs::remove_file(&pointer);
        link_blob(&blob, &pointer, name).map_err(|e| io_err(&pointer, e))?;
    }
    Ok(pointer)
}

/// `snapshots/<commit>/<name>` -> `../../blobs/<etag>` (one more `..` per folder in `name`).
fn link_blob(blob: &Path, pointer: &Path, name: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let depth = 2 + name.matches('/').count();
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rel.push("..");
        }
        rel.push("blobs");
        if let Some(f) = blob.file_name() {
            rel.push(f);
        }
        std::os::unix::fs::symlink(rel, pointer)
    }
    #[cfg(not(unix))]
    {
        let _ = name;
        std::fs::copy(blob, pointer).map(|_| ())
    }
}

/// An exclusive advisory lock on `f`, without waiting.
fn try_lock(f: &std::fs::File) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor `f` owns; released when it is closed.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }
    #[cfg(not(unix))]
    {
        let _ = f;
        true
    }
}

/// Maps a failed request to an engine error: no answer means the Hub is unreachable,
/// 401/403/404 that the repository (or revision) does not exist or is gated.
fn classify(cfg: &HubConfig, repo: &str, revision: &str, e: NetError) -> EngineError {
    match e {
        NetError::Status(401 | 403 | 404, _) => EngineError::RepoNotFound {
            repo: if revision == "main" {
                repo.to_string()
            } else {
                format!("{repo} (revision {revision})")
            },
            endpoint: cfg.endpoint.clone(),
        },
        NetError::Status(code, text) => EngineError::Hub {
            repo: repo.to_string(),
            message: format!("HTTP {code} {text} from {}", cfg.endpoint),
        },
        NetError::Transport(reason) => EngineError::HubUnreachable {
            endpoint: cfg.endpoint.clone(),
            reason,
        },
        NetError::Bad(message) => EngineError::Hub {
            repo: repo.to_string(),
            message: format!("{message} (endpoint {})", cfg.endpoint),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn prefers_known_quantizations() {
        let files = names(&[
            "README.md",
            "m.Q2_K.gguf",
            "m.Q8_0.gguf",
            "m.Q4_1.gguf",
            "m.Q4_K_M.gguf",
        ]);
        assert_eq!(
            choose_files("a/b", &files, None).expect("choose"),
            ["m.Q4_K_M.gguf"]
        );
        let files = names(&["m.Q8_0.gguf", "m.Q4_1.gguf"]);
        assert_eq!(
            choose_files("a/b", &files, None).expect("choose"),
            ["m.Q4_1.gguf"]
        );
        let files = names(&["m.f16.gguf", "m.IQ2.gguf"]);
        assert_eq!(
            choose_files("a/b", &files, None).expect("choose"),
            ["m.IQ2.gguf"]
        );
        assert_eq!(
            choose_files("a/b", &files, Some("m.f16.gguf")).expect("choose"),
            ["m.f16.gguf"]
        );
        let err = choose_files("a/b", &files, Some("x.gguf")).expect_err("missing");
        assert!(err.to_string().contains("m.IQ2.gguf"), "{err}");
    }

    #[test]
    fn safetensors_repo_gets_config_tokenizer_and_weights() {
        let files = names(&[
            "README.md",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "onnx/model.onnx",
        ]);
        let got = choose_files("a/b", &files, None).expect("choose");
        assert_eq!(
            got,
            [
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "generation_config.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ]
        );
        let err = choose_files("a/b", &names(&["config.json", "model.safetensors"]), None)
            .expect_err("no tokenizer");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        let err = choose_files("a/b", &names(&["README.md"]), None).expect_err("nothing");
        assert!(
            err.to_string().contains("no .gguf or .safetensors"),
            "{err}"
        );
    }

    #[test]
    fn the_probe_connects_or_says_why_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let timeout = Duration::from_secs(2);
        probe(&format!("http://127.0.0.1:{port}"), timeout).expect("a listening port");
        probe(&format!("http://user@127.0.0.1:{port}/path?q"), timeout).expect("with a path");
        drop(listener);
        let err = probe(&format!("http://127.0.0.1:{port}"), timeout).expect_err("closed");
        assert!(err.contains("cannot connect to 127.0.0.1 port"), "{err}");
        for (bad, says) in [
            ("huggingface.co", "not a URL"),
            ("ftp://x.org", "unsupported scheme ftp"),
            ("http://:80", "names no host"),
            ("http://x.org:http", "'http' is not a port"),
            ("http://[::1", "unclosed ["),
            (
                "https://no-such-host.invalid",
                "cannot resolve no-such-host.invalid",
            ),
        ] {
            let err = probe(bad, timeout).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn repo_ids_are_validated() {
        for ok in ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "a_b/c.d-e"] {
            validate_repo_id(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "a/b/c", "../x", "a/..", "a b/c", "/x", "x/"] {
            assert!(validate_repo_id(bad).is_err(), "{bad}");
        }
    }
}
