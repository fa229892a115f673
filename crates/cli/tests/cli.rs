//! The `attune` binary as a subprocess: each test gets its own temporary data
//! directory; the real default model is registered from where `scripts/fetch-model.sh`
//! put it.

use attune_test_support::Cli;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;

struct Env(Cli);

impl std::ops::Deref for Env {
    type Target = Cli;
    fn deref(&self) -> &Cli {
        &self.0
    }
}

impl Env {
    fn new() -> Env {
        Env(Cli::new(env!("CARGO_BIN_EXE_attune")))
    }

    /// The CLI's errors are one `error: ` line, nothing on stdout.
    fn fails(&self, args: &[&str]) -> String {
        self.0.fails_in_one_line(args)
    }

    fn list(&self) -> Vec<serde_json::Value> {
        let out = self.ok(&["models", "list", "--json"]);
        serde_json::from_str(&out).expect("list --json is a JSON array")
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn models_add_list_show_generate_rm() {
    let model = attune_test_support::default_model();
    let env = Env::new();
    let out = env.ok(&["models", "add", path_str(&model)]);
    assert!(out.starts_with("added model 1 "), "{out}");
    let out = env.ok(&["models", "add", path_str(&model)]);
    assert!(out.starts_with("already present: model 1 "), "{out}");

    let list = env.list();
    assert_eq!(list.len(), 1, "{list:?}");
    let m = &list[0];
    assert_eq!(m["id"], 1);
    assert_eq!(m["architecture"], "llama");
    assert_eq!(m["format"], "gguf");
    assert_eq!(m["source"]["kind"], "local");
    assert_eq!(m["sha256"].as_str().map(str::len), Some(64));
    let name = m["name"].as_str().expect("name").to_string();

    let shown: serde_json::Value =
        serde_json::from_str(&env.ok(&["models", "show", "1", "--json"])).expect("show json");
    assert_eq!(&shown, m);
    let text = env.ok(&["models", "show", &name]);
    assert!(text.contains("Q4_1") && text.contains(&name), "{text}");
    let table = env.ok(&["models", "list"]);
    assert!(table.starts_with("ID") && table.contains(&name), "{table}");

    let out = env.ok(&[
        "generate",
        "--json",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "The capital of France is",
    ]);
    let g: serde_json::Value = serde_json::from_str(&out).expect("generate --json");
    assert!(!g["text"].as_str().expect("text").trim().is_empty(), "{g}");
    assert!(g["generated_tokens"].as_u64().expect("tokens") > 0, "{g}");
    assert!(
        g["prompt_tokens"].as_u64().expect("prompt tokens") >= 5,
        "{g}"
    );
    assert!(
        g["generate_tok_per_s"].as_f64().expect("speed") > 0.0,
        "{g}"
    );
    assert_eq!(g["model_id"], 1);

    let out = env.ok(&["models", "rm", &name]);
    assert!(out.contains("removed model 1"), "{out}");
    assert!(env.list().is_empty());
    assert!(model.is_file(), "rm must keep the file");
    env.fails(&["models", "show", "1"]);
}

#[test]
fn bad_model_files_give_one_line_errors_and_change_nothing() {
    let model = attune_test_support::default_model();
    let env = Env::new();
    env.ok(&["models", "add", path_str(&model)]);
    let before = env.list();

    let missing = env.root().join("missing.gguf");
    let err = env.fails(&["models", "add", path_str(&missing)]);
    assert!(err.contains("missing.gguf"), "{err}");

    let garbage = env.root().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model\n".repeat(100)).expect("write");
    let err = env.fails(&["models", "add", path_str(&garbage)]);
    assert!(err.contains("garbage.gguf"), "{err}");

    let truncated = env.root().join("truncated.gguf");
    let mut head = vec![0u8; 8 << 20];
    std::fs::File::open(&model)
        .and_then(|mut f| f.read_exact(&mut head))
        .expect("read head");
    std::fs::write(&truncated, &head).expect("write");
    let err = env.fails(&["models", "add", path_str(&truncated)]);
    assert!(err.contains("truncated.gguf"), "{err}");

    assert_eq!(env.list(), before);
}

#[test]
fn empty_library_unknown_models_and_bad_flags_are_clear() {
    let env = Env::new();
    assert!(env.list().is_empty());
    let err = env.fails(&["generate", "hello"]);
    assert!(err.contains("attune models add"), "{err}");
    let err = env.fails(&["models", "show", "nothing-here"]);
    assert!(err.contains("nothing-here"), "{err}");
    let err = env.fails(&["generate", "--top-p", "2", "hello"]);
    assert!(err.contains("--top-p"), "{err}");
    let err = env.fails(&["generate", "--temperature", "-1", "hello"]);
    assert!(err.contains("--temperature"), "{err}");
}

#[test]
fn pull_offline_is_a_clear_error_and_registers_nothing() {
    let env = Env::new();
    let err = env.fails(&["models", "pull", "HuggingFaceTB/SmolLM2-135M-Instruct"]);
    assert!(
        err.contains("cannot reach the Hugging Face Hub") && err.contains("check your network"),
        "{err}"
    );
    let err = env.fails(&["models", "pull", "not a repo"]);
    assert!(err.contains("not a repo"), "{err}");
    assert!(env.list().is_empty());
}

#[test]
fn a_newer_database_is_refused() {
    let env = Env::new();
    env.ok(&["models", "list"]);
    let db = env.data_dir().join("library.sqlite3");
    // Bump user_version in the SQLite header (offset 60, big-endian) as a newer build would.
    let mut bytes = std::fs::read(&db).expect("read db");
    assert!(bytes.len() >= 100 && bytes.starts_with(b"SQLite format 3\0"));
    bytes[60..64].copy_from_slice(&999u32.to_be_bytes());
    std::fs::write(&db, &bytes).expect("write db");
    let err = env.fails(&["models", "list"]);
    assert!(err.contains("999") && err.contains("newer"), "{err}");
}

#[test]
fn chat_repl_answers_and_ends_on_exit() {
    let model = attune_test_support::default_model();
    let env = Env::new();
    env.ok(&["models", "add", path_str(&model)]);
    let mut child = env
        .cmd(&[
            "chat",
            "--system",
            "You are terse.",
            "--temperature",
            "0",
            "--max-tokens",
            "3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"What is the capital of France?\n/exit\nnot read\n")
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(!text.trim().is_empty() && text.ends_with('\n'), "{text:?}");
}

#[test]
fn pull_finds_a_model_already_in_the_hf_cache_offline() {
    let model = attune_test_support::default_model();
    let env = Env::new();
    let commit = "00112233445566778899aabbccddeeff00112233";
    let repo_dir = env.root().join("hf/models--someone--smol-gguf");
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).expect("mkdir");
    std::fs::create_dir_all(repo_dir.join("refs")).expect("mkdir");
    std::fs::write(repo_dir.join("refs/main"), commit).expect("ref");
    std::os::unix::fs::symlink(&model, snapshot.join("smol.Q4_1.gguf")).expect("symlink");

    let out = env.run(&["models", "pull", "someone/smol-gguf"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("added model 1 "), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("smol.Q4_1.gguf") && stderr.contains("(cached)"),
        "{stderr}"
    );
    let list = env.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["source"]["kind"], "hub");
    assert_eq!(list[0]["source"]["repo"], "someone/smol-gguf");
    assert_eq!(list[0]["source"]["revision"], commit);
}
