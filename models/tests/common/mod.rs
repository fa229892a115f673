//! Helpers shared by the real-model tests: where the default model and the reference figures are.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;

pub mod families;

/// The default model; fails the test (never skips it) when set-up has not fetched it.
pub fn model_path() -> PathBuf {
    let p = attune_models::default_model_path();
    assert!(
        p.is_file(),
        "default model missing at {}: run scripts/fetch-model.sh (or set ATTUNE_TEST_MODEL)",
        p.display()
    );
    p
}

/// `shared/reference/` beside the repository: figures computed by PyTorch/transformers/PEFT.
pub fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference")
}

/// A JSON file of `shared/reference/`.
pub fn read_reference(name: &str) -> serde_json::Value {
    let p = reference_dir().join(name);
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}
