//! Logs a person can send: `tracing` events go to a daily log file in
//! `<data dir>/logs/` (seven days kept) and to stderr, and the last warnings and errors are kept
//! in memory for "Copy diagnostics".
//!
//! The level is `ATTUNE_LOG` (an `EnvFilter` such as `info` or `attune_app=debug`) when set,
//! else the `log_level` setting (error, warn, info, debug or trace; changed from the window at
//! run time), else `info`. What is logged: command failures (code and message), run and pull
//! outcomes, granted and refused paths. Never logged: the Hugging Face token (no event carries
//! it) and the text of prompts and answers (no event carries them).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// The setting that holds the level.
pub const LEVEL_SETTING: &str = "log_level";
/// Levels the setting accepts.
pub const LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];
/// How many warnings and errors diagnostics keep.
const RECENT: usize = 20;

struct Logging {
    dir: PathBuf,
    reload: reload::Handle<EnvFilter, Registry>,
    from_env: bool,
}

static LOGGING: OnceLock<Logging> = OnceLock::new();
static RECENT_ERRORS: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

/// Where the log files are for `data_dir`.
pub fn log_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("logs")
}

/// The filter for a level setting; None when it is not one of [`LEVELS`].
fn filter_for(level: &str) -> Option<EnvFilter> {
    let level = level.trim().to_ascii_lowercase();
    LEVELS
        .contains(&level.as_str())
        .then(|| EnvFilter::new(format!("{level},tao=warn,wry=warn,hyper=warn")))
}

/// Starts logging (once per process): the file in `<data_dir>/logs/`, stderr, the recent
/// errors. `level` is the stored setting, if any. Errors (a read-only data directory) leave
/// stderr logging only, and say so there.
pub fn init(data_dir: &Path, level: Option<&str>) {
    if LOGGING.get().is_some() {
        return;
    }
    let env = std::env::var("ATTUNE_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let filter = match &env {
        Some(v) => EnvFilter::try_new(v).unwrap_or_else(|_| EnvFilter::new("info")),
        None => level
            .and_then(filter_for)
            .unwrap_or_else(|| EnvFilter::new("info,tao=warn,wry=warn")),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let dir = log_dir(data_dir);
    let file = std::fs::create_dir_all(&dir).ok().and_then(|_| {
        tracing_appender::rolling::Builder::new()
            .rotation(tracing_appender::rolling::Rotation::DAILY)
            .filename_prefix("attune")
            .filename_suffix("log")
            .max_log_files(7)
            .build(&dir)
            .ok()
    });
    let file_ok = file.is_some();
    let file_layer = file.map(|w| {
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_target(true)
            .with_writer(w)
    });
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr);
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(file_layer)
        .with(stderr_layer)
        .with(RecentErrors)
        .try_init()
        .is_ok();
    if installed {
        let _ = LOGGING.set(Logging {
            dir: dir.clone(),
            reload: handle,
            from_env: env.is_some(),
        });
        if !file_ok {
            tracing::warn!(dir = %dir.display(), "cannot write log files; logging to stderr only");
        }
        tracing::info!(version = env!("CARGO_PKG_VERSION"), data_dir = %data_dir.display(), "attune-app starting");
    }
}

/// Applies a new `log_level` setting (ignored while `ATTUNE_LOG` decides). Err for a value
/// that is not a level.
pub fn set_level(level: &str) -> Result<(), String> {
    let Some(filter) = filter_for(level) else {
        return Err(format!(
            "log level '{level}' is not one of {}",
            LEVELS.join(", ")
        ));
    };
    if let Some(l) = LOGGING.get() {
        if !l.from_env {
            l.reload
                .reload(filter)
                .map_err(|e| format!("cannot change the log level: {e}"))?;
            tracing::info!(level, "log level changed");
        }
    }
    Ok(())
}

/// The folder of the log files, once logging started.
pub fn current_dir() -> Option<PathBuf> {
    LOGGING.get().map(|l| l.dir.clone())
}

/// The last warnings and errors, oldest first.
pub fn recent_errors() -> Vec<String> {
    RECENT_ERRORS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect()
}

/// Keeps the last [`RECENT`] WARN and ERROR events as one line each.
struct RecentErrors;

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?} "));
        } else {
            self.0.push_str(&format!("{}={value:?} ", field.name()));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value} "));
        } else {
            self.0.push_str(&format!("{}={value:?} ", field.name()));
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for RecentErrors {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > tracing::Level::WARN {
            return;
        }
        let mut line = Line(String::new());
        event.record(&mut line);
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let entry = format!("[unix {secs}] {level} {}", line.0.trim_end());
        let mut q = RECENT_ERRORS.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == RECENT {
            q.pop_front();
        }
        q.push_back(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_checked_and_recent_errors_are_kept() {
        assert!(filter_for("debug").is_some());
        assert!(filter_for(" WARN ").is_some());
        assert!(filter_for("loud").is_none());
        assert!(set_level("loud").is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), Some("info"));
        for i in 0..(RECENT + 5) {
            tracing::warn!(code = "io", "failure {i}");
        }
        tracing::info!("not kept");
        let recent = recent_errors();
        assert_eq!(recent.len(), RECENT);
        assert!(recent[RECENT - 1].contains("failure 24"), "{recent:?}");
        assert!(recent.iter().all(|l| l.contains("WARN")));
        // The file is written in the data directory.
        let logs = current_dir().expect("logging started");
        assert!(logs.starts_with(dir.path()));
        let written: Vec<_> = std::fs::read_dir(&logs).expect("log dir").collect();
        assert!(!written.is_empty());
    }
}
