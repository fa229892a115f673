//! Hugging Face Hub pulls through `hf-hub`'s sync API into the standard HF cache
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), so files
//! other tools downloaded are reused and partial downloads resume.
//!
//! A repository with `.gguf` files yields one of them (the caller's choice, else
//! Q4_K_M, Q4_1, Q8_0 in that order); otherwise its safetensors folder
//! (config, tokenizer files, weights and index). When the Hub cannot be reached, a
//! snapshot already in the cache is used; if there is none the error says so.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::api::Progress;
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
}

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
        Ok(HubConfig {
            endpoint,
            cache_dir,
            token,
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
    let api = ApiBuilder::from_cache(Cache::new(cfg.cache_dir.clone()))
        .with_endpoint(cfg.endpoint.clone())
        .with_token(cfg.token.clone())
        .with_progress(false)
        .with_retries(2)
        .build()
        .map_err(|e| hub_error(cfg, repo, e))?;

    let listing = match api.repo(hf_repo.clone()).info() {
        Ok(info) => Listing {
            commit: Some(info.sha),
            files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
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
            None => download(&api, &hf_repo, name, i + 1, count, progress, cancel).map_err(
                |e| match e {
                    DownloadError::Cancelled => EngineError::Cancelled,
                    DownloadError::Api(e) => match classify(cfg, repo, revision, e) {
                        EngineError::RepoNotFound { .. } => EngineError::Hub {
                            repo: repo.to_string(),
                            message: format!(
                                "file {name} not found at revision {revision}, or access to it \
                                 is restricted (gated repository: accept its terms and set HF_TOKEN)"
                            ),
                        },
                        other => other,
                    },
                },
            )?,
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

enum DownloadError {
    Cancelled,
    Api(ApiError),
}

/// Forwards hf-hub's progress calls to the pulling thread.
struct ChannelProgress {
    tx: mpsc::Sender<(u64, u64)>,
    done: u64,
    total: u64,
}

impl Progress for ChannelProgress {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size as u64;
        self.done = 0;
        // The receiver may be gone after a cancel; nothing to do then.
        let _ = self.tx.send((self.done, self.total));
    }
    fn update(&mut self, size: usize) {
        self.done += size as u64;
        let _ = self.tx.send((self.done, self.total));
    }
    fn finish(&mut self) {}
}

/// Downloads one file on a worker thread so that `cancel` is honoured mid-file: on
/// cancel the caller returns at once and the worker's partial file stays in the
/// cache, to be resumed by the next pull.
fn download(
    api: &hf_hub::api::sync::Api,
    repo: &Repo,
    name: &str,
    index: usize,
    count: usize,
    progress: &mut dyn FnMut(PullProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf, DownloadError> {
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let api = api.clone();
    let repo = repo.clone();
    let file = name.to_string();
    std::thread::spawn(move || {
        let p = ChannelProgress {
            tx,
            done: 0,
            total: 0,
        };
        let result = api.repo(repo).download_with_progress(&file, p);
        let _ = done_tx.send(result);
    });
    let mut last_report = None;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(DownloadError::Cancelled);
        }
        match done_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(result) => {
                // Drain the last progress updates.
                while let Ok(p) = rx.try_recv() {
                    last_report = Some(p);
                }
                let path = result.map_err(DownloadError::Api)?;
                let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                let (_, total) = last_report.unwrap_or((size, size));
                progress(PullProgress {
                    file: name.to_string(),
                    file_index: index,
                    file_count: count,
                    bytes_done: size,
                    total_bytes: total.max(size),
                    cached: false,
                });
                return Ok(path);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(DownloadError::Api(ApiError::IoError(
                    std::io::Error::other(format!("the download of {name} stopped unexpectedly")),
                )))
            }
        }
        let mut latest = None;
        while let Ok(p) = rx.try_recv() {
            latest = Some(p);
        }
        if let Some((done, total)) = latest {
            last_report = Some((done, total));
            progress(PullProgress {
                file: name.to_string(),
                file_index: index,
                file_count: count,
                bytes_done: done,
                total_bytes: total,
                cached: false,
            });
        }
    }
}

/// Maps an hf-hub error to an engine error: transport failures mean the Hub is
/// unreachable, 401/404 that the repository (or revision) does not exist.
fn classify(cfg: &HubConfig, repo: &str, revision: &str, e: ApiError) -> EngineError {
    match e {
        ApiError::TooManyRetries(inner) => classify(cfg, repo, revision, *inner),
        ApiError::RequestError(err) => match *err {
            ureq::Error::Status(401 | 403 | 404, _) => EngineError::RepoNotFound {
                repo: if revision == "main" {
                    repo.to_string()
                } else {
                    format!("{repo} (revision {revision})")
                },
                endpoint: cfg.endpoint.clone(),
            },
            ureq::Error::Status(code, resp) => EngineError::Hub {
                repo: repo.to_string(),
                message: format!("HTTP {code} {} from {}", resp.status_text(), cfg.endpoint),
            },
            ureq::Error::Transport(t) => EngineError::HubUnreachable {
                endpoint: cfg.endpoint.clone(),
                reason: t.to_string(),
            },
        },
        other => hub_error(cfg, repo, other),
    }
}

fn hub_error(cfg: &HubConfig, repo: &str, e: ApiError) -> EngineError {
    match e {
        ApiError::LockAcquisition(p) => EngineError::Hub {
            repo: repo.to_string(),
            message: format!(
                "another download is writing {} (wait for it, or remove the .lock file)",
                p.display()
            ),
        },
        other => EngineError::Hub {
            repo: repo.to_string(),
            message: format!("{other} (endpoint {})", cfg.endpoint),
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
