//! Model loading entry point (being written: waits for the tokenizer and chat template modules).

pub use crate::linear::ComputeMode;

/// How to load a model.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// Weight form for the matrix products (GGUF only; Hugging Face folders are f32).
    pub compute: ComputeMode,
}
