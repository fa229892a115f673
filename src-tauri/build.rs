//! Build script: checks that the UI was built (Tauri embeds `ui/dist` at compile
//! time) and runs tauri-build (context, capabilities, icons).

use std::path::Path;

fn main() {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui/dist");
    println!("cargo:rerun-if-changed=../ui/dist");
    println!("cargo:rerun-if-changed=tauri.conf.json");
    println!("cargo:rerun-if-changed=capabilities");
    if !dist.join("index.html").is_file() {
        eprintln!(
            "error: the UI is not built: {} has no index.html.\n\
             Run `scripts/build-ui.sh` (it compiles ui/ to wasm into ui/dist), then build again.",
            dist.display()
        );
        std::process::exit(1);
    }
    tauri_build::build();
}
