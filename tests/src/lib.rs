//! Helpers for Attune's end-to-end tests: where the built binaries are, the
//! processes a test starts (always ended by a guard), free ports and displays,
//! and a small synchronous W3C WebDriver client for tauri-driver.

use base64::Engine as _;
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The error type of these helpers: a sentence saying what failed.
pub type Result<T> = std::result::Result<T, String>;

/// `target/<profile>`: the folder holding this test binary's `deps/` folder,
/// where cargo also puts the workspace's binaries.
pub fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("cannot find the target folder above {}", exe.display()))
}

/// The workspace root (for `test-artifacts/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A built workspace binary (`attune`, `attune-app`), or an error telling how to build it.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let path = profile_dir()?.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: run `scripts/setup.sh` (or `cargo build --release -p attune-app -p attune-cli`) first",
            path.display()
        ))
    }
}

/// The environment variable naming the desktop app the end-to-end tests drive.
pub const APP_ENV: &str = "ATTUNE_E2E_APP";

/// The desktop app the end-to-end tests drive: `$ATTUNE_E2E_APP` when it is set
/// (`scripts/test.sh` sets it to the installed package's `/usr/bin/attune-app`), else
/// the workspace's build of `attune-app`.
pub fn app_binary() -> Result<PathBuf> {
    match std::env::var_os(APP_ENV).filter(|v| !v.is_empty()) {
        Some(p) => {
            let path = PathBuf::from(p);
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "{APP_ENV}={} is not a file: install the package (`scripts/package.sh \
                     --install`) or unset {APP_ENV} to test the workspace build",
                    path.display()
                ))
            }
        }
        None => workspace_binary("attune-app"),
    }
}

/// A program on `PATH` (or in `~/.cargo/bin`), or an error telling to run setup.
pub fn program(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("`{name}` is not installed: run `scripts/setup.sh` first"))
}

/// The default model file, or an error telling to fetch it.
pub fn default_model() -> Result<PathBuf> {
    let path = attune_models::default_model_path();
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the default model is missing at {}: run `scripts/fetch-model.sh`",
            path.display()
        ))
    }
}

/// The running process named `name` (as /proc/PID/comm shows it) whose environment sets
/// `key` to `value`: the app a test started on its own data directory.
pub fn find_process(name: &str, key: &str, value: &Path) -> Option<u32> {
    let want = format!("{key}={}", value.display()).into_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            comm.trim() == name
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .map(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_slice()))
                    .unwrap_or(false)
        })
}

/// The peak resident memory (VmHWM) of process `pid` so far, in MiB.
pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .ok_or_else(|| format!("no VmHWM in /proc/{pid}/status"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("read the free port: {e}"))
}

/// An X display number with no server and no lock file.
pub fn free_display() -> Result<u32> {
    (90..400)
        .find(|n| {
            !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                && !Path::new(&format!("/tmp/.X{n}-lock")).exists()
        })
        .ok_or_else(|| "no free X display number between :90 and :399".to_string())
}

/// Polls `check` every 100 ms until it gives `Some`, or fails after `timeout`
/// with `what` and the last error seen.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last = String::from("no answer yet");
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "timed out after {timeout:?} waiting for {what} (last: {last})"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Processes started by a test. Each runs in its own process group, and the
/// whole group (children such as WebKitWebDriver, the app and WebKit's helper
/// processes included) is killed when the guard drops, on success or failure.
#[derive(Default)]
pub struct Processes {
    started: Vec<(String, Child)>,
}

impl Processes {
    /// Starts `cmd` in a new process group; its output goes to `log`.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> Result<u32> {
        use std::os::unix::process::CommandExt;
        let out =
            std::fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("clone log handle: {e}"))?;
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd.spawn().map_err(|e| format!("start {name}: {e}"))?;
        let pid = child.id();
        self.started.push((name.to_string(), child));
        Ok(pid)
    }

    /// Whether the process `name` has exited (and with what).
    pub fn exited(&mut self, name: &str) -> Option<String> {
        self.started
            .iter_mut()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| c.try_wait().ok().flatten())
            .map(|status| status.to_string())
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // Last started first: tauri-driver (and its app) before Xvfb.
        for (_, child) in self.started.iter_mut().rev() {
            let group = format!("-{}", child.id());
            let _ = Command::new("kill")
                .args(["-TERM", "--", &group])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = Command::new("kill")
                .args(["-KILL", "--", &group])
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// W3C's key for element references.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A WebDriver session (on tauri-driver).
pub struct WebDriver {
    base: String,
    session: String,
    agent: ureq::Agent,
}

fn request(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Value> {
    let req = agent.request(method, url).timeout(timeout);
    let response = match body {
        Some(b) => req
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    let text = match response {
        Ok(r) => r
            .into_string()
            .map_err(|e| format!("{method} {url}: read reply: {e}"))?,
        Err(ureq::Error::Status(code, r)) => {
            let text = r.into_string().unwrap_or_default();
            return Err(format!("{method} {url}: HTTP {code}: {text}"));
        }
        Err(e) => return Err(format!("{method} {url}: {e}")),
    };
    let json: Value =
        serde_json::from_str(&text).map_err(|e| format!("{method} {url}: bad JSON {e}: {text}"))?;
    Ok(json.get("value").cloned().unwrap_or(Value::Null))
}

impl WebDriver {
    /// Whether a WebDriver server answers on `base` (e.g. "http://127.0.0.1:4444").
    pub fn ready(base: &str) -> bool {
        let agent = ureq::AgentBuilder::new().build();
        request(
            &agent,
            "GET",
            &format!("{base}/status"),
            None,
            Duration::from_secs(2),
        )
        .is_ok()
    }

    /// Opens a session that launches `application` in tauri-driver at `base`.
    pub fn start(base: &str, application: &Path) -> Result<Self> {
        let agent = ureq::AgentBuilder::new().build();
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "wry",
                    "tauri:options": { "application": application.to_string_lossy() }
                }
            }
        });
        let value = request(
            &agent,
            "POST",
            &format!("{base}/session"),
            Some(&caps),
            Duration::from_secs(90),
        )?;
        let session = value
            .get("sessionId")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("new session: no sessionId in {value}"))?
            .to_string();
        Ok(Self {
            base: base.to_string(),
            session,
            agent,
        })
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let url = format!("{}/session/{}{}", self.base, self.session, path);
        request(&self.agent, method, &url, body.as_ref(), timeout)
    }

    /// Ids of the elements matching a CSS selector (empty if none).
    pub fn find_all(&self, css: &str) -> Result<Vec<String>> {
        let value = self.call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
            Duration::from_secs(10),
        )?;
        Ok(value
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.get(ELEMENT_KEY).and_then(Value::as_str).map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The first element matching `css`, or an error naming it.
    pub fn find(&self, css: &str) -> Result<String> {
        self.find_all(css)?
            .into_iter()
            .next()
            .ok_or_else(|| format!("no element matches `{css}`"))
    }

    /// The rendered text of an element.
    pub fn text(&self, element: &str) -> Result<String> {
        let v = self.call(
            "GET",
            &format!("/element/{element}/text"),
            None,
            Duration::from_secs(10),
        )?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Texts of all elements matching `css`.
    pub fn texts(&self, css: &str) -> Result<Vec<String>> {
        self.find_all(css)?.iter().map(|e| self.text(e)).collect()
    }

    /// Whether an element is enabled.
    pub fn enabled(&self, element: &str) -> Result<bool> {
        let v = self.call(
            "GET",
            &format!("/element/{element}/enabled"),
            None,
            Duration::from_secs(10),
        )?;
        Ok(v.as_bool().unwrap_or(false))
    }

    /// Clicks an element.
    pub fn click(&self, element: &str) -> Result<()> {
        self.call(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
            Duration::from_secs(10),
        )
        .map(|_| ())
    }

    /// Types `text` into an element.
    pub fn type_text(&self, element: &str, text: &str) -> Result<()> {
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({"text": text})),
            Duration::from_secs(10),
        )
        .map(|_| ())
    }

    /// Runs a script in the page and returns its value.
    pub fn execute(&self, script: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
            Duration::from_secs(10),
        )
    }

    /// Sets a form control's value as a user would (then `input` and `change` fire),
    /// even when it sits in a closed `<details>`. Errors when nothing matches `css`.
    pub fn set_value(&self, css: &str, value: &str) -> Result<()> {
        let script = format!(
            "const e = document.querySelector({css}); if (!e) return false; \
             if (e.type === 'checkbox' || e.type === 'radio') {{ e.checked = {value} === 'true'; }} \
             else {{ e.value = {value}; }} \
             e.dispatchEvent(new Event('input', {{ bubbles: true }})); \
             e.dispatchEvent(new Event('change', {{ bubbles: true }})); return true;",
            css = Value::from(css),
            value = Value::from(value),
        );
        match self.execute(&script)? {
            Value::Bool(true) => Ok(()),
            _ => Err(format!("no element matches `{css}`")),
        }
    }

    /// Chooses the first option of the `<select>` at `css` whose text contains
    /// `text` (case-insensitive); returns the option's text.
    pub fn select_option(&self, css: &str, text: &str) -> Result<String> {
        let script = format!(
            "const e = document.querySelector({css}); if (!e) return null; \
             const want = {text}.toLowerCase(); \
             const o = Array.from(e.options).find(o => o.text.toLowerCase().includes(want)); \
             if (!o) return 'NO OPTION: ' + Array.from(e.options).map(o => o.text).join(' | '); \
             e.value = o.value; e.dispatchEvent(new Event('input', {{ bubbles: true }})); \
             e.dispatchEvent(new Event('change', {{ bubbles: true }})); return 'OK:' + o.text;",
            css = Value::from(css),
            text = Value::from(text),
        );
        match self.execute(&script)? {
            Value::String(s) if s.starts_with("OK:") => Ok(s[3..].to_string()),
            Value::String(s) => Err(format!("`{css}` has no option with '{text}': {s}")),
            _ => Err(format!("no element matches `{css}`")),
        }
    }

    /// The text of the first element matching `css`, or None when there is none.
    pub fn text_of(&self, css: &str) -> Result<Option<String>> {
        match self.find_all(css)?.first() {
            Some(e) => Ok(Some(self.text(e)?)),
            None => Ok(None),
        }
    }

    /// A PNG of the window. WebKitWebDriver waits for the next repaint, so the
    /// page is kept repainting meanwhile; the call gives up after `timeout`.
    pub fn screenshot(&self, timeout: Duration) -> Result<Vec<u8>> {
        self.execute(
            "if (!window.__attuneRepaint) { window.__attuneRepaint = setInterval(() => { \
             const s = document.body.style; s.opacity = s.opacity === '0.999' ? '1' : '0.999'; }, 40); }",
        )?;
        let result = self.call("GET", "/screenshot", None, timeout);
        let _ = self.execute(
            "clearInterval(window.__attuneRepaint); window.__attuneRepaint = null; document.body.style.opacity = '';",
        );
        let b64 = result?;
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .map_err(|e| format!("screenshot is not base64: {e}"))
    }

    /// Ends the session (the app closes).
    pub fn quit(&self) -> Result<()> {
        let url = format!("{}/session/{}", self.base, self.session);
        request(&self.agent, "DELETE", &url, None, Duration::from_secs(10)).map(|_| ())
    }
}
