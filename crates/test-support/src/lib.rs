//! What the tests of several crates share, so that each fixture exists once:
//!
//! - [`default_model`]: the real default model, or a failure that says how to fetch it;
//! - [`shared`]: a path in `../shared` (the reference data beside the repository), or a failure
//!   that says it is missing: a test that needs it never passes silently without it;
//! - [`Cli`]: the `attune` binary run on a fresh library in a temporary folder, offline from the
//!   Hub, with a hang guard, and the assertions every CLI test makes (`ok`, `fails`, `json`).
//!
//! Only tests use this crate (a dev-dependency; `models/tests/tidy.rs` enforces it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (the folder holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The default model (SmolLM2-135M-Instruct Q4_1) where `scripts/fetch-model.sh` puts it.
/// Fails the test, naming the path and the fix, when it is missing.
pub fn default_model() -> PathBuf {
    let p = attune_models::default_model_path();
    assert!(
        p.is_file(),
        "the default model is missing at {}: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// `rel` inside `../shared`, the reference data beside the repository. Fails the test (never
/// skips it) when it is missing.
pub fn shared(rel: &str) -> PathBuf {
    let p = workspace_root().join("../shared").join(rel);
    assert!(
        p.exists(),
        "{} is missing: this test needs the shared reference data beside the repository \
         (../shared, as the project lays it out)",
        p.display()
    );
    p
}

/// A file committed under the repository's `tests/data`.
pub fn test_data(rel: &str) -> PathBuf {
    let p = workspace_root().join("tests/data").join(rel);
    assert!(p.exists(), "{} is missing from the repository", p.display());
    p
}

/// An `http://` address on which nothing listens: the Hub, unreachable at once.
pub fn closed_port_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let addr = l.local_addr().expect("local address");
    drop(l);
    format!("http://{addr}")
}

/// The `attune` CLI on a library of its own: a temporary folder holding the data directory
/// (`data/`), the Hub cache (`hf/`) and whatever files a test writes.
pub struct Cli {
    bin: PathBuf,
    dir: tempfile::TempDir,
    limit: Duration,
}

impl Cli {
    /// `bin` is the binary under test: `env!("CARGO_BIN_EXE_attune")` in the CLI's tests.
    pub fn new(bin: impl Into<PathBuf>) -> Cli {
        Cli {
            bin: bin.into(),
            dir: tempfile::tempdir().expect("tempdir"),
            // Long enough for the training tests on a loaded 2-core machine; a hang still ends.
            limit: Duration::from_secs(900),
        }
    }

    /// A command that runs longer than `limit` fails the test instead of stalling it.
    pub fn with_limit(mut self, limit: Duration) -> Cli {
        self.limit = limit;
        self
    }

    /// The temporary folder.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The library's data directory (`--data-dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `name` inside the temporary folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `bytes` to `name` inside the temporary folder (creating folders) and returns it.
    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, bytes).expect("write");
        p
    }

    /// `attune --data-dir <data> ARGS`, with the Hub offline (a closed port) and its cache in
    /// the temporary folder, no token, and stdin closed. Callers may add to it.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .env("HF_ENDPOINT", closed_port_endpoint())
            .env("HF_HUB_CACHE", self.dir.path().join("hf"))
            .env_remove("HF_TOKEN")
            .stdin(Stdio::null());
        c
    }

    /// Runs `cmd(args)` to the end (within the limit) and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.output(self.cmd(args), args)
    }

    /// Runs a prepared command to the end, within the limit.
    pub fn output(&self, mut cmd: Command, what: &[&str]) -> Output {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn attune");
        // Read both pipes on threads so a chatty child never blocks on a full pipe.
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let out_t = std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut out, &mut v).map(|_| v)
        });
        let err_t = std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut err, &mut v).map(|_| v)
        });
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > self.limit {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err_t.join().ok().and_then(|r| r.ok()).unwrap_or_default();
                panic!(
                    "attune {what:?} ran past {} s: {}",
                    self.limit.as_secs(),
                    String::from_utf8_lossy(&stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: out_t.join().expect("stdout reader").expect("read stdout"),
            stderr: err_t.join().expect("stderr reader").expect("read stderr"),
        }
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "attune {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs and parses stdout as JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("attune {args:?}: stdout is not JSON ({e}): {out}"))
    }

    /// Runs and expects the CLI's failure shape: exit code 1, no panic, and a last stderr line
    /// starting with `error: `. Returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        self.failure(args).1
    }

    /// Like [`Cli::fails`], and nothing was printed on stdout.
    pub fn fails_quietly(&self, args: &[&str]) -> String {
        let (stdout, err) = self.failure(args);
        assert!(
            stdout.is_empty(),
            "attune {args:?}: stdout {}",
            String::from_utf8_lossy(&stdout)
        );
        err
    }

    /// Like [`Cli::fails_quietly`], and stderr is that one `error: ` line and nothing else.
    pub fn fails_in_one_line(&self, args: &[&str]) -> String {
        let err = self.fails_quietly(args);
        assert_eq!(
            err.lines().count(),
            1,
            "attune {args:?}: not one line: {err}"
        );
        err
    }

    fn failure(&self, args: &[&str]) -> (Vec<u8>, String) {
        let out = self.run(args);
        let err = String::from_utf8(out.stderr).expect("utf-8 stderr");
        assert_eq!(out.status.code(), Some(1), "attune {args:?}: {err}");
        assert!(!err.contains("panicked"), "attune {args:?} panicked: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: "), "attune {args:?}: {err}");
        (out.stdout, err)
    }

    /// Registers the default model (`models add`) and returns its path.
    pub fn add_default_model(&self) -> PathBuf {
        let model = default_model();
        self.ok(&["models", "add", model.to_str().expect("utf-8 path")]);
        model
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_shared_path_fails_loudly() {
        let r = std::panic::catch_unwind(|| shared("no/such/file-for-attune-tests"));
        let msg = r
            .expect_err("a missing path must fail")
            .downcast::<String>()
            .expect("a message");
        assert!(msg.contains("../shared"), "{msg}");
    }

    #[test]
    fn a_command_past_its_limit_fails_instead_of_hanging() {
        let cli = Cli::new("/bin/sleep").with_limit(Duration::from_millis(300));
        let started = Instant::now();
        let mut c = Command::new("/bin/sleep");
        c.arg("30");
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cli.output(c, &["sleep"])));
        assert!(r.is_err(), "the guard must fail the test");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn the_failure_shape_is_checked() {
        // `sh -c` stands in for a binary: exit 1 with an error line passes, exit 2 does not.
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("fake-attune");
        std::fs::write(
            &script,
            "#!/bin/sh\nif [ \"$3\" = bad ]; then echo 'error: bad input' >&2; exit 1; fi\nexit 2\n",
        )
        .expect("write");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let cli = Cli::new(&script);
        assert_eq!(cli.fails_in_one_line(&["bad"]), "error: bad input\n");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cli.fails(&["other"])));
        assert!(r.is_err(), "exit 2 is not the CLI's failure shape");
    }
}
