//! Attune's model runtime: Llama-family decoders written for adaptation.
//!
//! Knows no jobs, SQL or UI. Everything here is plain candle; every linear layer
//! can carry a LoRA branch and the input path accepts soft-prompt embeddings.

pub mod chat_template;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod inspect;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod sampling;
pub mod tokenizer;

pub use error::{Error, Result};
