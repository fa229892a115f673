//! Chat and raw generation over a loaded model (interim: waiting for attune-models' loader).

use std::path::Path;
use std::sync::atomic::AtomicBool;

use attune_protocol::{ChatEvent, ChatMessage, GenerationStats, SamplingParams};

use crate::error::EngineError;

pub(crate) struct LoadedModel;

pub(crate) fn load(name: &str, path: &Path) -> Result<LoadedModel, EngineError> {
    Err(EngineError::ModelLoad {
        name: name.to_string(),
        path: path.to_path_buf(),
        source: attune_models::Error::field(path, "runtime", "the model runtime is not built yet"),
    })
}

pub(crate) fn chat(
    _model: &LoadedModel,
    _messages: &[ChatMessage],
    _params: &SamplingParams,
    _cancel: &AtomicBool,
    _on_event: &mut dyn FnMut(ChatEvent),
) -> Result<GenerationStats, EngineError> {
    Err(EngineError::InvalidInput("no model runtime".into()))
}

pub(crate) fn generate_raw(
    _model: &LoadedModel,
    _prompt: &str,
    _params: &SamplingParams,
    _cancel: &AtomicBool,
    _on_event: &mut dyn FnMut(ChatEvent),
) -> Result<GenerationStats, EngineError> {
    Err(EngineError::InvalidInput("no model runtime".into()))
}
