//! Attune's desktop shell. It opens the engine on the data directory
//! (`ATTUNE_DATA_DIR` overrides it), serves the built UI, and exposes commands
//! (`commands/<domain>.rs`) that only deserialize, delegate to the engine and
//! map errors to [`attune_protocol::IpcError`].
//!
//! Invariant: no engine work on the main thread; every command is `async` and
//! runs the engine on a blocking worker, so the window never freezes.

pub mod commands;
pub mod state;

pub use state::AppState;

/// Opens the engine and runs the window until it is closed.
pub fn run() -> tauri::Result<()> {
    let data_dir = attune_models::default_data_dir();
    let state = AppState::open(&data_dir);
    if let Err(err) = state.engine() {
        // The window still opens and shows this error.
        eprintln!("attune-app: {err}");
    }
    tauri::Builder::default()
        .manage(state)
        .invoke_handler(tauri::generate_handler![
            commands::models::list_models,
            commands::models::add_model,
            commands::chat::chat,
            commands::chat::cancel_chat,
        ])
        .run(tauri::generate_context!())
}
