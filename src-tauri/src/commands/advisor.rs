//! Advisor commands: what this machine has and which method suits a goal.

use super::blocking;
use crate::AppState;
use attune_protocol::{Advice, AdvisorGoal, IpcError, MachineInfo};
use tauri::State;

/// The CPU, threads, memory, GPU, SIMD flags and operating system.
#[tauri::command]
pub async fn machine_info() -> Result<MachineInfo, IpcError> {
    blocking(|| Ok(attune_engine::machine_info())).await
}

/// Recommends a method for `goal` with every method's memory and time on this machine.
#[tauri::command]
pub async fn advise(state: State<'_, AppState>, goal: AdvisorGoal) -> Result<Advice, IpcError> {
    let engine = state.engine()?;
    blocking(move || engine.advise(&goal).map_err(|e| IpcError::from(&e))).await
}
