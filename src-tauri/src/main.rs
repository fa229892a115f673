//! The `attune-app` binary: opens the Attune window.

// No console window on Windows release builds.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

fn main() {
    if let Err(err) = attune_app::run() {
        eprintln!("attune-app: {err}");
        std::process::exit(1);
    }
}
