//! Engine tests over real SQLite files in temporary data directories and the real
//! default model (`scripts/fetch-model.sh` fetches it).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use attune_protocol::{ChatMessage, ModelFormat, ModelSource, SamplingParams};

use super::*;

fn real_model() -> PathBuf {
    let p = attune_models::default_model_path();
    assert!(
        p.is_file(),
        "the default model is missing at {}: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

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
    }
}

#[test]
fn engine_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Engine>();
}

#[test]
fn adds_the_real_gguf_once() {
    let model = real_model();
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
    let model = real_model();
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
    let model = real_model();
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
    let model = real_model();
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
    let model = real_model();
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
