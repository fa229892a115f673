//! The `attune-app` binary: opens the Attune window.

// No console window on Windows release builds.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

fn main() {
    // Before any thread starts: see `fix_thread_count` and `single_arena` (the app trains in
    // its own process, and its runs' peaks must stay within the estimate it shows).
    attune_engine::fix_thread_count();
    attune_engine::single_arena();
    if let Err(err) = attune_app::run() {
        if attune_app::logs::current_dir().is_some() {
            tracing::error!("{err}");
        } else {
            // Logging never started: the error came before it.
            eprintln!("attune-app: {err}");
        }
        std::process::exit(1);
    }
}
