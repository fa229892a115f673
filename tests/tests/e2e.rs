//! End-to-end: the real `attune-app` window, driven over WebDriver
//! (tauri-driver + WebKitWebDriver under Xvfb), on the real default model
//! registered with the real `attune` CLI into a fresh data directory.

use attune_tests::{
    default_model, free_display, free_port, program, wait_for, workspace_binary, workspace_root,
    Processes, WebDriver,
};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

fn fail(e: String) -> ! {
    panic!("{e}")
}

/// Registers the default model with `attune models add` in `data_dir`.
fn register_default_model(data_dir: &Path) -> Result<(), String> {
    let model = default_model()?;
    let attune = workspace_binary("attune")?;
    let out = Command::new(&attune)
        .args(["models", "add"])
        .arg(&model)
        .env("ATTUNE_DATA_DIR", data_dir)
        .output()
        .map_err(|e| format!("run {}: {e}", attune.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`attune models add {}` failed ({}): {}{}",
            model.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// App tests share the machine's display numbers, ports and two cores: one at a time.
static ONE_APP_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Starts Xvfb, tauri-driver and the app on `data_dir`, runs `steps` in a
/// WebDriver session, and ends every process it started, whatever happens.
/// Each missing prerequisite fails with what to run.
fn with_app(data_dir: &Path, logs: &Path, steps: impl FnOnce(&WebDriver) -> Result<(), String>) {
    let _serial = ONE_APP_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let app = workspace_binary("attune-app").unwrap_or_else(|e| fail(e));
    let xvfb = program("Xvfb").unwrap_or_else(|e| fail(e));
    let tauri_driver = program("tauri-driver").unwrap_or_else(|e| fail(e));
    let webkit_driver = program("WebKitWebDriver").unwrap_or_else(|e| fail(e));

    let mut procs = Processes::default();
    let display = free_display().unwrap_or_else(|e| fail(e));
    let mut cmd = Command::new(&xvfb);
    cmd.args([
        format!(":{display}"),
        "-screen".into(),
        "0".into(),
        "1280x860x24".into(),
        "-nolisten".into(),
        "tcp".into(),
    ]);
    procs
        .spawn("Xvfb", cmd, &logs.join("xvfb.log"))
        .unwrap_or_else(|e| fail(e));
    wait_for("Xvfb to start", Duration::from_secs(15), || {
        if let Some(status) = procs.exited("Xvfb") {
            return Err(format!("Xvfb exited: {status}"));
        }
        Ok(Path::new(&format!("/tmp/.X11-unix/X{display}"))
            .exists()
            .then_some(()))
    })
    .unwrap_or_else(|e| fail(e));

    let port = free_port().unwrap_or_else(|e| fail(e));
    let native_port = loop {
        let p = free_port().unwrap_or_else(|e| fail(e));
        if p != port {
            break p;
        }
    };
    let mut cmd = Command::new(&tauri_driver);
    cmd.args([
        "--port",
        &port.to_string(),
        "--native-port",
        &native_port.to_string(),
    ])
    .arg("--native-driver")
    .arg(&webkit_driver)
    .env("DISPLAY", format!(":{display}"))
    .env("ATTUNE_DATA_DIR", data_dir)
    .env("WEBKIT_DISABLE_DMABUF_RENDERER", "1")
    .env("LIBGL_ALWAYS_SOFTWARE", "1");
    procs
        .spawn("tauri-driver", cmd, &logs.join("tauri-driver.log"))
        .unwrap_or_else(|e| fail(e));
    let base = format!("http://127.0.0.1:{port}");
    wait_for("tauri-driver to answer", Duration::from_secs(20), || {
        if let Some(status) = procs.exited("tauri-driver") {
            return Err(format!("tauri-driver exited: {status}"));
        }
        Ok(WebDriver::ready(&base).then_some(()))
    })
    .unwrap_or_else(|e| fail(e));

    let result = WebDriver::start(&base, &app).and_then(|driver| {
        let outcome = steps(&driver);
        let _ = driver.quit();
        outcome
    });
    if let Err(e) = result {
        let log = std::fs::read_to_string(logs.join("tauri-driver.log")).unwrap_or_default();
        let tail: String = log
            .chars()
            .rev()
            .take(4000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        drop(procs);
        panic!("{e}\n--- tauri-driver / app log (tail) ---\n{tail}");
    }
}

#[test]
fn the_app_lists_the_default_model_and_streams_a_chat_answer() {
    let data = tempfile::tempdir().unwrap_or_else(|e| fail(format!("temp dir: {e}")));
    let data_dir = data.path().join("data");
    register_default_model(&data_dir).unwrap_or_else(|e| fail(e));
    with_app(&data_dir, data.path(), steps);
}

#[test]
fn an_unusable_data_dir_is_shown_in_the_window_not_a_crash() {
    let data = tempfile::tempdir().unwrap_or_else(|e| fail(format!("temp dir: {e}")));
    // A file where the data directory should be.
    let data_dir = data.path().join("not-a-directory");
    std::fs::write(&data_dir, b"x").unwrap_or_else(|e| fail(format!("write: {e}")));
    with_app(&data_dir, data.path(), |driver| {
        let text = wait_for(
            "the engine error banner",
            Duration::from_secs(60),
            || match driver.find_all("#engine-error")?.first() {
                Some(e) => Ok(Some(driver.text(e)?)),
                None => Ok(None),
            },
        )?;
        if !text.contains("not-a-directory") {
            return Err(format!(
                "the error does not name the data directory: {text}"
            ));
        }
        Ok(())
    });
}

/// Saves a PNG of the window under `test-artifacts/` for people to look at.
/// Only the screenshot's own failure (WebKit's can hang) is tolerated.
fn save_screenshot(driver: &WebDriver, name: &str) {
    let dir = workspace_root().join("test-artifacts");
    let path = dir.join(name);
    let saved = driver.screenshot(Duration::from_secs(20)).and_then(|png| {
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        std::fs::write(&path, png).map_err(|e| format!("write {}: {e}", path.display()))
    });
    match saved {
        Ok(()) => println!("screenshot: {}", path.display()),
        Err(e) => eprintln!("warning: no screenshot {name} ({e})"),
    }
}

/// The steps inside the window: models page, a streamed answer, Stop.
fn steps(driver: &WebDriver) -> Result<(), String> {
    // The models page lists the registered default model.
    let nav_models = wait_for("the navigation", Duration::from_secs(60), || {
        Ok(driver.find_all("#nav-models")?.into_iter().next())
    })?;
    driver.click(&nav_models)?;
    let names = wait_for(
        "the model list to show SmolLM2",
        Duration::from_secs(60),
        || {
            if let Some(err) = driver.find_all("#engine-error")?.first() {
                return Err(format!(
                    "the app shows an engine error: {}",
                    driver.text(err)?
                ));
            }
            let names = driver.texts("[data-testid=model-name]")?;
            Ok(names
                .iter()
                .any(|n| n.to_lowercase().contains("smollm2"))
                .then_some(names))
        },
    )?;
    assert_eq!(
        names.len(),
        1,
        "one model registered, the table shows {names:?}"
    );
    let row = driver.texts("[data-testid=model-row]")?.join(" ");
    for expected in ["Q4_1", "llama"] {
        if !row.to_lowercase().contains(&expected.to_lowercase()) {
            return Err(format!("the model row lacks {expected}: {row}"));
        }
    }

    save_screenshot(driver, "e2e-models.png");

    // The chat pane streams an answer.
    driver.click(&driver.find("#nav-chat")?)?;
    let send = wait_for(
        "the Send button to be enabled",
        Duration::from_secs(30),
        || {
            let send = driver.find("#chat-send")?;
            Ok(driver.enabled(&send)?.then_some(send))
        },
    )?;
    let input = driver.find("#chat-input")?;
    driver.type_text(
        &input,
        "What is the capital of France? Answer in one sentence.",
    )?;
    driver.click(&send)?;

    let first = wait_for("streamed answer text", Duration::from_secs(120), || {
        if let Some(err) = driver.find_all("#chat-error")?.first() {
            return Err(format!("the chat shows an error: {}", driver.text(err)?));
        }
        let answers = driver.find_all("[data-testid=assistant-message] .bubble")?;
        let Some(last) = answers.last() else {
            return Ok(None);
        };
        let pending = !driver
            .find_all("[data-testid=assistant-message].pending")?
            .is_empty();
        let text = driver.text(last)?;
        Ok((!pending && !text.trim().is_empty()).then_some(text))
    })?;
    let stats = wait_for("the answer to finish", Duration::from_secs(180), || {
        if let Some(err) = driver.find_all("#chat-error")?.first() {
            return Err(format!("the chat shows an error: {}", driver.text(err)?));
        }
        match driver.find_all("#chat-stats")?.first() {
            Some(s) => Ok(Some(driver.text(s)?)),
            None => Ok(None),
        }
    })?;
    if !stats.contains("tok/s") {
        return Err(format!("timings line looks wrong: {stats}"));
    }
    let answer = driver.text(&driver.find("[data-testid=assistant-message] .bubble")?)?;
    if answer.trim().len() < first.trim().len() {
        return Err(format!(
            "final answer {answer:?} is shorter than the streamed {first:?}"
        ));
    }
    println!("answer: {answer}\nstats: {stats}");

    save_screenshot(driver, "e2e-chat.png");

    // Stop cancels a long answer while it streams.
    let input = driver.find("#chat-input")?;
    // Sent with the Enter key (WebDriver's code for it is U+E007).
    driver.type_text(&input, "Count from 1 to 300, separated by commas.\u{E007}")?;
    wait_for(
        "the second answer to stream",
        Duration::from_secs(60),
        || {
            let answers = driver.find_all("[data-testid=assistant-message] .bubble")?;
            let pending = !driver
                .find_all("[data-testid=assistant-message].pending")?
                .is_empty();
            match answers.get(1) {
                Some(a) if !pending => Ok((!driver.text(a)?.trim().is_empty()).then_some(())),
                _ => Ok(None),
            }
        },
    )?;
    driver.click(&driver.find("#chat-stop")?)?;
    let stats = wait_for(
        "the cancelled answer to end",
        Duration::from_secs(30),
        || match driver.find_all("#chat-stats")?.first() {
            Some(s) => Ok(Some(driver.text(s)?)),
            None => Ok(None),
        },
    )?;
    if !stats.ends_with("stopped") {
        return Err(format!("Stop did not cancel the answer: {stats}"));
    }
    println!("cancelled: {stats}");
    Ok(())
}
