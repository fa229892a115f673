//! Engine tests over real SQLite files in temporary data directories and the real
//! default model (`scripts/fetch-model.sh` fetches it).

use attune_test_support::default_model;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use attune_protocol::{
    ChatEvent, ChatMessage, FinishReason, ModelFormat, ModelSource, SamplingParams,
};

use super::*;

fn engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(&dir.path().join("data")).expect("open engine");
    (dir, engine)
}

fn sha256sum(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// A port on loopback where nothing listens.
fn closed_port_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}")
}

/// A loopback HTTP server that answers `n` requests with 404, then exits.
fn not_found_server(n: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in l.incoming().take(n) {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut buf = [0u8; 8192];
            let _ = s.read(&mut buf);
            let body = r#"{"error":"Repository not found"}"#;
            let _ = write!(
                s,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

fn offline_cfg(cache_dir: &Path, endpoint: String) -> hub::HubConfig {
    hub::HubConfig {
        endpoint,
        cache_dir: cache_dir.to_path_buf(),
        token: None,
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
    }
}

#[test]
fn engine_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Engine>();
}

#[test]
fn adds_the_real_gguf_once() {
    let model = default_model();
    let (dir, engine) = engine();
    let out = engine.add_local_model(&model).expect("add");
    assert!(!out.already_present);
    let m = &out.model;
    assert_eq!(m.architecture, "llama");
    assert_eq!(m.format, ModelFormat::Gguf);
    assert!(m.quantization.contains("Q4_1"), "{}", m.quantization);
    assert!(
        (130_000_000..140_000_000).contains(&m.parameters),
        "{}",
        m.parameters
    );
    assert_eq!(m.context_length, 8192);
    assert_eq!(m.file_size, std::fs::metadata(&model).expect("stat").len());
    assert_eq!(m.sha256, sha256sum(&model));
    let canonical = std::fs::canonicalize(&model).expect("canonical");
    assert_eq!(
        m.source,
        ModelSource::Local {
            path: canonical.to_string_lossy().into_owned()
        }
    );
    assert_eq!(m.added_at.len(), 20, "{}", m.added_at);

    let again = engine.add_local_model(&model).expect("add again");
    assert!(again.already_present);
    assert_eq!(again.model, out.model);
    assert_eq!(engine.list_models().expect("list"), vec![out.model.clone()]);

    // Persisted: a new engine on the same data dir sees it.
    drop(engine);
    let engine = Engine::open(&dir.path().join("data")).expect("reopen");
    assert_eq!(engine.list_models().expect("list"), vec![out.model]);
}

#[test]
fn bad_files_are_refused_and_nothing_is_written() {
    let model = default_model();
    let (dir, engine) = engine();

    let missing = dir.path().join("nope.gguf");
    let err = engine.add_local_model(&missing).expect_err("missing");
    assert_eq!(err.code(), "io");
    assert!(err.to_string().contains("nope.gguf"), "{err}");

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, vec![b'x'; 4096]).expect("write");
    let err = engine.add_local_model(&garbage).expect_err("garbage");
    assert_eq!(err.code(), "invalid_model");
    assert!(err.to_string().contains("garbage.gguf"), "{err}");

    let truncated = dir.path().join("truncated.gguf");
    let mut head = vec![0u8; 10 << 20];
    std::fs::File::open(&model)
        .and_then(|mut f| f.read_exact(&mut head))
        .expect("read head");
    std::fs::write(&truncated, &head).expect("write");
    let err = engine.add_local_model(&truncated).expect_err("truncated");
    assert_eq!(err.code(), "invalid_model");
    assert!(err.to_string().contains("truncated.gguf"), "{err}");

    let empty_dir = dir.path().join("empty");
    std::fs::create_dir(&empty_dir).expect("mkdir");
    assert!(engine.add_local_model(&empty_dir).is_err());

    assert!(engine.list_models().expect("list").is_empty());
    assert_eq!(
        engine.default_model().expect_err("empty").code(),
        "empty_library"
    );
}

#[test]
fn finds_and_removes_models_but_never_their_files() {
    let model = default_model();
    let (_dir, engine) = engine();
    let m = engine.add_local_model(&model).expect("add").model;
    assert_eq!(engine.find_model(&m.id.to_string()).expect("by id"), m);
    assert_eq!(engine.find_model(&m.name).expect("by name"), m);
    assert_eq!(
        engine
            .find_model(&m.name.to_ascii_uppercase())
            .expect("by name, other case"),
        m
    );
    assert_eq!(engine.default_model().expect("default"), m);
    let err = engine.find_model("no-such-model").expect_err("unknown");
    assert_eq!(err.code(), "not_found");
    assert!(err.to_string().contains("no-such-model"), "{err}");

    engine.remove_model(m.id).expect("remove");
    assert!(model.is_file(), "the model file must stay");
    assert!(engine.list_models().expect("list").is_empty());
    assert_eq!(
        engine.remove_model(m.id).expect_err("twice").code(),
        "not_found"
    );
}

#[test]
fn a_deleted_model_file_is_reported_by_path() {
    let model = default_model();
    let (dir, engine) = engine();
    let copy = dir.path().join("copy.gguf");
    if std::fs::hard_link(&model, &copy).is_err() {
        std::fs::copy(&model, &copy).expect("copy model");
    }
    let m = engine.add_local_model(&copy).expect("add").model;
    std::fs::remove_file(&copy).expect("delete");
    let cancel = AtomicBool::new(false);
    let mut events = Vec::new();
    let err = engine
        .chat(
            m.id,
            &[ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            &SamplingParams::default(),
            &cancel,
            &mut |e| events.push(e),
        )
        .expect_err("file is gone");
    assert_eq!(err.code(), "model_missing");
    assert!(err.to_string().contains("copy.gguf"), "{err}");
    assert!(events.is_empty());
    let err = engine
        .generate(m.id, "x", &SamplingParams::default(), &cancel, &mut |_| {})
        .expect_err("file is gone");
    assert_eq!(err.code(), "model_missing");
}

#[test]
fn pull_without_network_or_cache_is_a_clear_error() {
    let (dir, engine) = engine();
    let endpoint = closed_port_endpoint();
    let cfg = offline_cfg(&dir.path().join("hf"), endpoint.clone());
    let cancel = AtomicBool::new(false);
    let err = engine
        .pull_with(
            &cfg,
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            None,
            None,
            &mut |_| {},
            &cancel,
        )
        .expect_err("offline");
    assert_eq!(err.code(), "hub_unreachable");
    let msg = err.to_string();
    assert!(
        msg.contains(&endpoint) && msg.contains("check your network"),
        "{msg}"
    );
    assert!(engine.list_models().expect("list").is_empty());
}

#[test]
fn pull_of_an_unknown_repository_says_not_found() {
    let (dir, engine) = engine();
    let endpoint = not_found_server(4);
    let cfg = offline_cfg(&dir.path().join("hf"), endpoint);
    let cancel = AtomicBool::new(false);
    let err = engine
        .pull_with(
            &cfg,
            "nobody/no-such-model",
            None,
            None,
            &mut |_| {},
            &cancel,
        )
        .expect_err("404");
    assert_eq!(err.code(), "repo_not_found");
    assert!(err.to_string().contains("nobody/no-such-model"), "{err}");
    assert!(engine.list_models().expect("list").is_empty());

    let err = engine
        .pull_with(&cfg, "../etc", None, None, &mut |_| {}, &cancel)
        .expect_err("bad id");
    assert_eq!(err.code(), "invalid_input");
}

#[test]
fn pull_uses_the_hf_cache_when_offline() {
    let model = default_model();
    let (dir, engine) = engine();
    let cache = dir.path().join("hf");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo_dir = cache.join("models--test-org--smol-gguf");
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).expect("mkdir");
    std::fs::create_dir_all(repo_dir.join("refs")).expect("mkdir");
    std::fs::write(repo_dir.join("refs/main"), commit).expect("ref");
    std::fs::write(snapshot.join("README.md"), "# test\n").expect("readme");
    let file = snapshot.join("smol.Q4_1.gguf");
    std::os::unix::fs::symlink(&model, &file).expect("symlink");

    let cfg = offline_cfg(&cache, closed_port_endpoint());
    let cancel = AtomicBool::new(false);
    let err = engine
        .pull_with(
            &cfg,
            "test-org/smol-gguf",
            None,
            Some("other.Q8_0.gguf"),
            &mut |_| {},
            &cancel,
        )
        .expect_err("no such file");
    assert!(err.to_string().contains("smol.Q4_1.gguf"), "{err}");

    let mut progress = Vec::new();
    let out = engine
        .pull_with(
            &cfg,
            "test-org/smol-gguf",
            None,
            None,
            &mut |p| progress.push(p),
            &cancel,
        )
        .expect("pull from cache");
    assert!(!out.already_present);
    assert_eq!(
        out.model.source,
        ModelSource::Hub {
            repo: "test-org/smol-gguf".into(),
            revision: commit.into(),
            path: file.to_string_lossy().into_owned(),
        }
    );
    assert_eq!(out.model.sha256, sha256sum(&model));
    assert_eq!(progress.len(), 1);
    assert!(progress[0].cached && progress[0].file == "smol.Q4_1.gguf");

    // The same weights added locally are recognised.
    let again = engine.add_local_model(&model).expect("add local");
    assert!(again.already_present);
    assert_eq!(engine.list_models().expect("list").len(), 1);
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        repetition_penalty: 1.0,
        ..SamplingParams::default()
    }
}

#[test]
fn chat_streams_the_reference_greedy_answer() {
    let model = default_model();
    let (_dir, engine) = engine();
    let id = engine.add_local_model(&model).expect("add").model.id;
    // The reference chat prompt of ../shared/reference/generate_reference.json.
    let messages = [
        ChatMessage {
            role: "system".into(),
            content: "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "Explain in a few sentences why the sky is blue.".into(),
        },
    ];
    let cancel = AtomicBool::new(false);
    let mut events = Vec::new();
    let stats = engine
        .chat(id, &messages, &greedy(12), &cancel, &mut |e| events.push(e))
        .expect("chat");
    assert_eq!(stats.prompt_tokens, 41);
    assert!(
        stats
            .text
            .starts_with("The sky is blue because of a process called Rayleigh"),
        "{:?}",
        stats.text
    );
    assert_eq!(stats.generated_tokens, 12);
    assert_eq!(stats.finish_reason, FinishReason::Length);
    assert!(stats.generate_tok_per_s > 0.0 && stats.prompt_tok_per_s > 0.0);
    assert_eq!(events.first(), Some(&ChatEvent::Loading));
    assert_eq!(
        events.last(),
        Some(&ChatEvent::Done {
            stats: stats.clone()
        })
    );
    let streamed: String = events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Token { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(streamed, stats.text);

    // The model stays loaded: no second Loading, and the same greedy start.
    let mut events = Vec::new();
    let again = engine
        .chat(id, &messages, &greedy(4), &cancel, &mut |e| events.push(e))
        .expect("chat again");
    assert!(!events.contains(&ChatEvent::Loading));
    assert!(stats.text.starts_with(&again.text), "{:?}", again.text);
}

#[test]
fn generate_continues_a_raw_prompt_and_honours_cancel() {
    let model = default_model();
    let (_dir, engine) = engine();
    let id = engine.add_local_model(&model).expect("add").model.id;
    let cancel = AtomicBool::new(false);
    let stats = engine
        .generate(
            id,
            "The capital of France is",
            &greedy(4),
            &cancel,
            &mut |_| {},
        )
        .expect("generate");
    assert!(
        stats.generated_tokens > 0 && !stats.text.trim().is_empty(),
        "{stats:?}"
    );
    assert!(stats.prompt_tokens >= 5, "{stats:?}");

    // Cancelled from the first token on: stops at once, still reports.
    let cancel = AtomicBool::new(true);
    let stats = engine
        .generate(
            id,
            "The capital of France is",
            &greedy(64),
            &cancel,
            &mut |_| {},
        )
        .expect("cancelled generate");
    assert_eq!(stats.finish_reason, FinishReason::Cancelled);
    assert!(stats.generated_tokens <= 1, "{stats:?}");

    let bad = SamplingParams {
        top_p: Some(7.0),
        ..greedy(4)
    };
    let err = engine
        .generate(id, "x", &bad, &AtomicBool::new(false), &mut |_| {})
        .expect_err("bad params");
    assert_eq!(err.code(), "invalid_input");
    let err = engine
        .chat(id, &[], &greedy(4), &AtomicBool::new(false), &mut |_| {})
        .expect_err("no messages");
    assert_eq!(err.code(), "invalid_input");
}

/// A loopback stand-in for the Hub serving one repository with `README.md` and one
/// GGUF file: the repo-info API and `resolve` downloads with HTTP ranges, the headers
/// hf-hub reads (`x-repo-commit`, `etag`, `content-range`), `delay` per MiB sent.
fn fake_hub(repo: &'static str, commit: &'static str, gguf: PathBuf, delay: Duration) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(stream) = stream else { continue };
            let gguf = gguf.clone();
            std::thread::spawn(move || serve_one(stream, repo, commit, &gguf, delay));
        }
    });
    format!("http://{addr}")
}

fn serve_one(mut s: std::net::TcpStream, repo: &str, commit: &str, gguf: &Path, delay: Duration) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let req = String::from_utf8_lossy(&req).to_string();
    let target = req.split_whitespace().nth(1).unwrap_or("").to_string();
    let range = req.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("range")
            .then(|| v.trim().trim_start_matches("bytes=").to_string())
    });
    let file_name = gguf
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    let gguf_name = "smol.Q4_1.gguf";
    if target.starts_with(&format!("/api/models/{repo}/revision/")) {
        let body = format!(
            r#"{{"sha":"{commit}","siblings":[{{"rfilename":"README.md"}},{{"rfilename":"{gguf_name}"}}]}}"#
        );
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    if target.starts_with(&format!("/{repo}/resolve/")) && target.ends_with(gguf_name) {
        let Ok(mut f) = std::fs::File::open(gguf) else {
            return;
        };
        let total = f.metadata().map(|m| m.len()).unwrap_or(0);
        let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
            Some((a, b)) => (
                a.parse::<u64>().unwrap_or(0),
                b.parse::<u64>().unwrap_or(total - 1).min(total - 1),
            ),
            None => (0, total - 1),
        };
        let len = end + 1 - start;
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {len}\r\n\
             Content-Range: bytes {start}-{end}/{total}\r\nETag: \"etag-{file_name}\"\r\n\
             X-Repo-Commit: {commit}\r\nConnection: close\r\n\r\n"
        );
        if s.write_all(head.as_bytes()).is_err() {
            return;
        }
        use std::io::Seek;
        if f.seek(std::io::SeekFrom::Start(start)).is_err() {
            return;
        }
        let mut left = len;
        let mut chunk = vec![0u8; 1 << 20];
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if f.read_exact(&mut chunk[..n]).is_err() || s.write_all(&chunk[..n]).is_err() {
                return;
            }
            left -= n as u64;
            std::thread::sleep(delay);
        }
        return;
    }
    let _ = write!(
        s,
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn pull_downloads_into_the_hf_cache_with_progress() {
    let model = default_model();
    let (dir, engine) = engine();
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let endpoint = fake_hub("fake-org/smol", commit, model.clone(), Duration::ZERO);
    let cache = dir.path().join("hf");
    let cfg = offline_cfg(&cache, endpoint);
    let cancel = AtomicBool::new(false);
    let mut progress = Vec::new();
    let out = engine
        .pull_with(
            &cfg,
            "fake-org/smol",
            None,
            None,
            &mut |p| progress.push(p),
            &cancel,
        )
        .expect("pull");
    assert!(!out.already_present);
    let expected = cache
        .join("models--fake-org--smol/snapshots")
        .join(commit)
        .join("smol.Q4_1.gguf");
    assert_eq!(
        out.model.source,
        ModelSource::Hub {
            repo: "fake-org/smol".into(),
            revision: commit.into(),
            path: expected.to_string_lossy().into_owned(),
        }
    );
    assert_eq!(out.model.sha256, sha256sum(&model));
    assert_eq!(sha256sum(&expected), out.model.sha256);
    let size = std::fs::metadata(&model).expect("stat").len();
    let last = progress.last().expect("progress events");
    assert_eq!(
        (last.bytes_done, last.total_bytes, last.cached),
        (size, size, false)
    );
    assert!(progress
        .windows(2)
        .all(|w| w[0].bytes_done <= w[1].bytes_done));

    // Again: found in the cache, nothing downloaded, nothing added.
    let mut progress = Vec::new();
    let again = engine
        .pull_with(
            &cfg,
            "fake-org/smol",
            None,
            None,
            &mut |p| progress.push(p),
            &cancel,
        )
        .expect("pull again");
    assert!(again.already_present);
    assert!(progress.iter().all(|p| p.cached), "{progress:?}");
    assert_eq!(engine.list_models().expect("list").len(), 1);
}

#[test]
fn pull_cancel_stops_mid_download_and_registers_nothing() {
    let model = default_model();
    let (dir, engine) = engine();
    // ~94 MiB at 50 ms per MiB: about 5 s, much longer than the cancel may take.
    let endpoint = fake_hub(
        "fake-org/slow",
        "fedcba9876543210fedcba9876543210fedcba98",
        model,
        Duration::from_millis(50),
    );
    let cfg = offline_cfg(&dir.path().join("hf"), endpoint);
    let cancel = AtomicBool::new(false);
    let started = std::time::Instant::now();
    let err = engine
        .pull_with(
            &cfg,
            "fake-org/slow",
            None,
            None,
            &mut |p| {
                if p.bytes_done > 0 {
                    cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            },
            &cancel,
        )
        .expect_err("cancelled");
    assert_eq!(err.code(), "cancelled");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(engine.list_models().expect("list").is_empty());
}

/// A loopback server that accepts connections and never answers (keeps them open for 60 s).
fn silent_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in l.incoming().take(8) {
            open.push(stream);
        }
        std::thread::sleep(Duration::from_secs(60));
    });
    format!("http://{addr}")
}

#[test]
fn pull_from_a_hub_that_never_answers_times_out_and_stays_cancellable() {
    let (dir, engine) = engine();
    let mut cfg = offline_cfg(&dir.path().join("hf"), silent_server());
    cfg.read_timeout = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let err = engine
        .pull_with(
            &cfg,
            "org/model",
            None,
            None,
            &mut |_| {},
            &AtomicBool::new(false),
        )
        .expect_err("no answer");
    assert_eq!(err.code(), "hub_unreachable", "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // With a long read timeout, Cancel still returns at once.
    cfg.read_timeout = Duration::from_secs(120);
    let cancel = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let started = std::time::Instant::now();
        let err = engine
            .pull_with(&cfg, "org/model", None, None, &mut |_| {}, &cancel)
            .expect_err("cancelled");
        assert_eq!(err.code(), "cancelled", "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    });
    assert!(engine.list_models().expect("list").is_empty());
}

#[test]
fn the_models_crate_finds_the_default_model_by_the_engines_data_dir_rule() {
    assert_eq!(
        attune_models::standard_model_path(),
        crate::default_data_dir()
            .join("models")
            .join(attune_models::DEFAULT_MODEL_FILE)
    );
}
