//! Chat and raw generation over a loaded model: renders the chat template, encodes,
//! runs `attune_models::generate`, streams `ChatEvent`s and reports the figures.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use attune_models::chat_template::{ChatTemplate, Message};
use attune_models::generate::{self, GenerateParams, Generation};
use attune_models::llama::Llama;
use attune_models::loader::{LoadOptions, LoadedModel};
use attune_models::sampling::SamplingConfig;
use attune_models::tokenizer::Tok;
use attune_protocol::{ChatEvent, ChatMessage, FinishReason, GenerationStats, SamplingParams};
use candle_core::Tensor;

use crate::error::EngineError;

/// Loads the model at `path` (a `.gguf` file or a Hugging Face folder).
pub(crate) fn load(name: &str, path: &Path) -> Result<LoadedModel, EngineError> {
    attune_models::loader::load_on_selected(path, &LoadOptions::default()).map_err(|source| {
        EngineError::ModelLoad {
            name: name.to_string(),
            path: path.to_path_buf(),
            source: Box::new(source),
        }
    })
}

/// What generation needs: the weights, the tokenizer, the chat template and an optional
/// soft prompt (prompt-tuning adapters).
pub(crate) struct Parts<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a Tok,
    pub chat_template: &'a ChatTemplate,
    pub prefix: Option<&'a Tensor>,
}

impl<'a> Parts<'a> {
    pub fn of(m: &'a LoadedModel) -> Parts<'a> {
        Parts {
            model: &m.model,
            tokenizer: &m.tokenizer,
            chat_template: &m.chat_template,
            prefix: None,
        }
    }
}

/// Answers `messages` with the model's chat template (generation prompt added).
pub(crate) fn chat(
    model: &Parts<'_>,
    messages: &[ChatMessage],
    params: &SamplingParams,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(ChatEvent),
) -> Result<GenerationStats, EngineError> {
    let (_, ids) = render_prompt(model.chat_template, model.tokenizer, messages)?;
    run(model, &ids, params, cancel, on_event)
}

/// The prompt text `messages` become under the chat template (generation prompt added)
/// and its token ids: exactly what [`chat`] feeds the model.
pub(crate) fn render_prompt(
    chat_template: &ChatTemplate,
    tokenizer: &Tok,
    messages: &[ChatMessage],
) -> Result<(String, Vec<u32>), EngineError> {
    if messages.is_empty() {
        return Err(EngineError::InvalidInput(
            "the conversation has no messages".to_string(),
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(EngineError::InvalidInput(format!(
                "message {i}: role '{}' is not system, user or assistant",
                m.role
            )));
        }
    }
    let msgs: Vec<Message> = messages
        .iter()
        .map(|m| Message::new(m.role.clone(), m.content.clone()))
        .collect();
    let prompt = chat_template
        .render(&msgs, true)
        .map_err(generation_error)?;
    // The rendered template already holds every special token (BOS included, if the
    // model uses one), exactly as transformers' apply_chat_template tokenizes it.
    let ids = tokenizer.encode(&prompt, false).map_err(generation_error)?;
    Ok((prompt, ids))
}

/// Continues `prompt` as is (no template; the tokenizer's BOS rule applies).
pub(crate) fn generate_raw(
    model: &Parts<'_>,
    prompt: &str,
    params: &SamplingParams,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(ChatEvent),
) -> Result<GenerationStats, EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::InvalidInput("the prompt is empty".to_string()));
    }
    let ids = model
        .tokenizer
        .encode(prompt, true)
        .map_err(generation_error)?;
    run(model, &ids, params, cancel, on_event)
}

fn run(
    model: &Parts<'_>,
    ids: &[u32],
    params: &SamplingParams,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(ChatEvent),
) -> Result<GenerationStats, EngineError> {
    let gp = GenerateParams {
        max_tokens: params.max_tokens,
        stop: params.stop.clone(),
        sampling: SamplingConfig {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            repeat_last_n: params.repeat_last_n,
            seed: params.seed,
        },
    };
    let generation = generate::generate_with_prefix(
        model.model,
        model.tokenizer,
        model.prefix,
        ids,
        &gp,
        cancel,
        &mut |text: &str| {
            if !text.is_empty() {
                on_event(ChatEvent::Token {
                    text: text.to_string(),
                })
            }
        },
    )
    .map_err(|e| match e {
        attune_models::Error::InvalidParams(msg) => EngineError::InvalidInput(msg),
        other => generation_error(other),
    })?;
    let stats = stats(&generation);
    on_event(ChatEvent::Done {
        stats: stats.clone(),
    });
    Ok(stats)
}

fn stats(g: &Generation) -> GenerationStats {
    let prompt_s = g.prompt_duration.as_secs_f64();
    let prompt_tok_per_s = if prompt_s > 0.0 {
        g.prompt_tokens as f64 / prompt_s
    } else {
        0.0
    };
    GenerationStats {
        text: g.text.clone(),
        finish_reason: match g.finish_reason {
            generate::FinishReason::Eos => FinishReason::Eos,
            generate::FinishReason::Length => FinishReason::Length,
            generate::FinishReason::Stop => FinishReason::Stop,
            generate::FinishReason::Cancelled => FinishReason::Cancelled,
        },
        prompt_tokens: g.prompt_tokens,
        generated_tokens: g.tokens.len(),
        prompt_ms: prompt_s * 1e3,
        generate_ms: g.generate_duration.as_secs_f64() * 1e3,
        prompt_tok_per_s,
        generate_tok_per_s: g.tokens_per_second(),
    }
}

pub(crate) fn generation_error(e: attune_models::Error) -> EngineError {
    EngineError::Generation(Box::new(e))
}
