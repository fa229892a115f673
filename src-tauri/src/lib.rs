//! Attune's desktop shell. It opens the engine on the data directory
//! (`ATTUNE_DATA_DIR` overrides it), serves the built UI, and exposes commands
//! (`commands/<domain>.rs`) that only deserialize, delegate to the engine and
//! map errors to [`attune_protocol::IpcError`].
//!
//! Invariant: no engine work on the main thread; every command is `async` and
//! runs the engine on a blocking worker, so the window never freezes.

pub mod commands;
pub mod logs;
pub mod scope;
pub mod state;

pub use state::AppState;

use std::time::Duration;
use tauri::{Emitter, Manager};

/// How long closing the app waits for the executing run to checkpoint.
const PAUSE_ON_EXIT: Duration = Duration::from_secs(60);

/// Opens the engine and runs the window until it is closed.
pub fn run() -> tauri::Result<()> {
    let data_dir = attune_engine::default_data_dir();
    let state = AppState::open(&data_dir);
    let level = state
        .engine()
        .ok()
        .and_then(|e| e.settings().ok())
        .and_then(|s| s.get(logs::LEVEL_SETTING).cloned());
    logs::init(&data_dir, level.as_deref());
    if let Err(err) = state.engine() {
        // The window still opens and shows this error.
        tracing::error!(code = %err.code, "{}", err.message);
    }
    let app = tauri::Builder::default()
        .plugin(tauri_plugin_dialog::init())
        .manage(state)
        .manage(commands::export::ExportState::default())
        .on_window_event(|window, event| {
            // A file or folder dropped onto the window is the user's choice: grant it, so the
            // window may then classify and import it (see scope.rs).
            if let tauri::WindowEvent::DragDrop(tauri::DragDropEvent::Drop { paths, .. }) = event {
                let state = window.state::<AppState>();
                for p in paths {
                    state.scope.grant(p);
                }
            }
        })
        .setup(|app| {
            let handle = app.handle().clone();
            app.state::<AppState>()
                .start_actor(std::sync::Arc::new(move |update| {
                    if let Err(e) = handle.emit("run-event", update) {
                        tracing::warn!("cannot send a run update to the window: {e}");
                    }
                }));
            Ok(())
        })
        .invoke_handler(tauri::generate_handler![
            commands::models::list_models,
            commands::models::add_model,
            commands::models::remove_model,
            commands::models::pull_model,
            commands::models::cancel_pull,
            commands::models::hub_status,
            commands::models::classify_path,
            commands::models::pick_path,
            commands::models::confirm_path,
            commands::diagnostics::diagnostics,
            commands::chat::chat_target,
            commands::chat::cancel_chat,
            commands::chat::target_label,
            commands::chat::save_conversation,
            commands::chat::list_conversations,
            commands::chat::get_conversation,
            commands::chat::remove_conversation,
            commands::settings::get_settings,
            commands::settings::set_setting,
            commands::templates::list_templates,
            commands::templates::template_versions,
            commands::templates::save_template,
            commands::templates::remove_template,
            commands::templates::preview_template,
            commands::templates::preview_template_for_endpoint,
            commands::playground::render_sample,
            commands::arena::create_arena,
            commands::arena::list_arenas,
            commands::arena::arena_item,
            commands::arena::arena_vote,
            commands::arena::arena_detail,
            commands::arena::export_preferences,
            commands::arena::remove_arena,
            commands::arena::judge_rubric,
            commands::arena::save_judge_rubric,
            commands::arena::judge_arena,
            commands::arena::arena_results,
            commands::arena::arena_judge_votes,
            commands::datasets::inspect_dataset,
            commands::datasets::import_dataset,
            commands::datasets::list_datasets,
            commands::datasets::remove_dataset,
            commands::datasets::dataset_rows,
            commands::datasets::dataset_stats,
            commands::datasets::csv_headers,
            commands::docs::import_docs,
            commands::docs::list_docsets,
            commands::docs::remove_docset,
            commands::docs::docset_chunks,
            commands::docs::docset_rows,
            commands::docs::teacher_template,
            commands::docs::teach_docs,
            commands::docs::regenerate_doc_row,
            commands::docs::review_doc_row,
            commands::docs::accept_all_doc_rows,
            commands::docs::docset_dataset,
            commands::docs::docset_pretrain_dataset,
            commands::runs::check_run,
            commands::runs::start_run,
            commands::runs::list_runs,
            commands::runs::run_detail,
            commands::runs::pause_run,
            commands::runs::resume_run,
            commands::runs::cancel_run,
            commands::runs::remove_run,
            commands::runs::export_run_bundle,
            commands::endpoints::list_endpoints,
            commands::endpoints::add_endpoint,
            commands::endpoints::refresh_endpoint_models,
            commands::endpoints::set_endpoint_key,
            commands::endpoints::remove_endpoint,
            commands::endpoints::evaluate_endpoint,
            commands::server::server_status,
            commands::server::server_start,
            commands::server::server_stop,
            commands::adapters::list_adapters,
            commands::adapters::remove_adapter,
            commands::adapters::export_adapter,
            commands::adapters::import_adapter,
            commands::adapters::merge_adapter,
            commands::adapters::evaluate,
            commands::adapters::cancel_evaluation,
            commands::adapters::list_evaluations,
            commands::advisor::machine_info,
            commands::advisor::advise,
            commands::export::export_options,
            commands::export::start_export,
            commands::export::cancel_export,
            commands::export::list_exports,
            commands::export::show_in_folder,
            commands::prefs::import_preferences,
            commands::prefs::preferences_from_arena,
            commands::prefs::list_preference_sets,
        ])
        .build(tauri::generate_context!())?;
    app.run(|app, event| {
        if let tauri::RunEvent::ExitRequested { .. } = event {
            let state = app.state::<AppState>();
            // Pause the executing run (it writes a checkpoint) so it resumes next time;
            // answers in progress, the server's included, are cancelled.
            if let Some(actor) = state.actor_if_started() {
                if !actor.shutdown(PAUSE_ON_EXIT) {
                    tracing::warn!(
                        "the run did not pause within {} s; it resumes from its last \
                         checkpoint next time",
                        PAUSE_ON_EXIT.as_secs()
                    );
                }
            }
            let server = state
                .server
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some((server, _)) = server {
                server.stop();
            }
        }
    });
    Ok(())
}
