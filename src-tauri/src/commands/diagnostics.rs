//! "Copy diagnostics": one text a person can paste into a bug report. Versions, the machine
//! and its CPU features, where the library and the logs are, how many things the library
//! holds, and the last warnings and errors. Holds no keys and no prompt or answer text.

use super::blocking;
use crate::AppState;
use attune_engine::Engine;
use attune_protocol::IpcError;
use std::fmt::Write;
use tauri::State;

/// The diagnostics report (plain text).
#[tauri::command]
pub async fn diagnostics(state: State<'_, AppState>) -> Result<String, IpcError> {
    let engine = state.engine();
    let data_dir = state.data_dir().to_path_buf();
    blocking(move || {
        Ok(report(
            engine.as_deref().map_err(|e| e.message.clone()),
            &data_dir,
        ))
    })
    .await
}

/// CPU features the runtime's kernels look for, as detected at run time.
fn cpu_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($name) {
                    f.push($name);
                }
            )*};
        }
        probe!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            f.push("neon");
        }
    }
    f
}

/// The report for the engine (or why it could not open) on `data_dir`.
pub fn report(engine: Result<&Engine, String>, data_dir: &std::path::Path) -> String {
    let mut out = String::new();
    let m = attune_engine::machine_info();
    let _ = writeln!(out, "Attune diagnostics");
    let _ = writeln!(
        out,
        "version: attune-app {} ({} build)",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let _ = writeln!(out, "os: {}", m.os);
    let _ = writeln!(
        out,
        "cpu: {} ({} threads used), memory {} MB total, {} MB available",
        m.cpu, m.threads, m.memory_total_mb, m.memory_available_mb
    );
    let _ = writeln!(out, "cpu features: {}", cpu_features().join(" "));
    let _ = writeln!(out, "data dir: {}", data_dir.display());
    let _ = writeln!(
        out,
        "log files: {}",
        crate::logs::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| "(logging not started)".into())
    );
    match engine {
        Err(e) => {
            let _ = writeln!(out, "library: could not be opened: {e}");
        }
        Ok(e) => {
            let count = |r: Result<usize, attune_engine::EngineError>| match r {
                Ok(n) => n.to_string(),
                Err(e) => format!("? ({})", e.code()),
            };
            let runs = e.list_runs();
            let mut by_status = std::collections::BTreeMap::<String, usize>::new();
            if let Ok(runs) = &runs {
                for r in runs {
                    *by_status
                        .entry(format!("{:?}", r.status).to_lowercase())
                        .or_default() += 1;
                }
            }
            let _ = writeln!(
                out,
                "library: {} models, {} datasets, {} runs{}, {} adapters, {} evaluations, {} templates",
                count(e.list_models().map(|v| v.len())),
                count(e.list_datasets().map(|v| v.len())),
                count(runs.map(|v| v.len())),
                if by_status.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        by_status
                            .iter()
                            .map(|(k, v)| format!("{v} {k}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                count(e.list_adapters().map(|v| v.len())),
                count(e.list_evaluations().map(|v| v.len())),
                count(e.list_templates().map(|v| v.len())),
            );
        }
    }
    let recent = crate::logs::recent_errors();
    let _ = writeln!(out, "last warnings and errors ({}):", recent.len());
    if recent.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for line in recent {
        let _ = writeln!(out, "  {line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_versions_machine_library_and_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let engine = Engine::open(&data).expect("open");
        let text = report(Ok(&engine), &data);
        assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
        assert!(text.contains("cpu features:"), "{text}");
        assert!(
            text.contains("library: 0 models, 0 datasets, 0 runs"),
            "{text}"
        );
        assert!(text.contains("last warnings and errors"), "{text}");
        let text = report(Err("disk full".into()), &data);
        assert!(text.contains("could not be opened: disk full"), "{text}");
    }
}
