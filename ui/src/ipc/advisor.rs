//! Mirrors `src-tauri/src/commands/advisor.rs`: the machine and the method advisor.

use super::invoke;
use attune_protocol::{Advice, AdvisorGoal, IpcError, MachineInfo};
use serde_json::json;

pub async fn machine_info() -> Result<MachineInfo, IpcError> {
    invoke("machine_info", &json!({})).await
}

/// Recommends a method for `goal` with every method's memory and time on this machine.
pub async fn advise(goal: &AdvisorGoal) -> Result<Advice, IpcError> {
    invoke("advise", &json!({ "goal": goal })).await
}
