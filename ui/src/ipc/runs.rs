//! Mirrors `src-tauri/src/commands/runs.rs`: start and steer fine-tuning runs.
//! Progress arrives as `run-event`s (see [`super::events::listen_runs`]).

use super::invoke;
use attune_protocol::{
    BundleEngine, BundleReply, IpcError, RunCheck, RunDetail, RunSpec, RunSummary,
};
use serde_json::json;

/// Memory, time and "will it fit" for a run, before it starts.
pub async fn check_run(spec: &RunSpec) -> Result<RunCheck, IpcError> {
    invoke("check_run", &json!({ "spec": spec })).await
}

/// Creates the run and starts it in the background (queued behind a run already
/// training). Refused with the figures when it will not fit.
pub async fn start_run(spec: &RunSpec) -> Result<RunSummary, IpcError> {
    invoke("start_run", &json!({ "spec": spec })).await
}

pub async fn list_runs() -> Result<Vec<RunSummary>, IpcError> {
    invoke("list_runs", &json!({})).await
}

pub async fn run_detail(id: i64) -> Result<RunDetail, IpcError> {
    invoke("run_detail", &json!({ "id": id })).await
}

/// Checkpoints and stops after the current step; the run becomes paused.
pub async fn pause_run(id: i64) -> Result<(), IpcError> {
    invoke("pause_run", &json!({ "id": id })).await
}

/// Continues a paused, failed or interrupted run from its last checkpoint.
pub async fn resume_run(id: i64) -> Result<RunSummary, IpcError> {
    invoke("resume_run", &json!({ "id": id })).await
}

/// Stops a run for good (executing or not); its checkpoints are removed.
pub async fn cancel_run(id: i64) -> Result<(), IpcError> {
    invoke("cancel_run", &json!({ "id": id })).await
}

/// Removes a finished run and its metrics (its adapter stays).
pub async fn remove_run(id: i64) -> Result<(), IpcError> {
    invoke("remove_run", &json!({ "id": id })).await
}

/// Writes the run as a bundle for a GPU machine into a new folder inside `dir` (a folder
/// the user chose); returns what was written.
pub async fn export_run_bundle(
    id: i64,
    engine: BundleEngine,
    dir: &str,
) -> Result<BundleReply, IpcError> {
    super::invoke_granted(
        "export_run_bundle",
        &json!({ "id": id, "engine": engine, "dir": dir }),
        true,
    )
    .await
}
