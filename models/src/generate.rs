//! The generation loop: prefill the prompt, then decode one token at a time with the KV
//! cache, streaming text as it completes. Stops on an EOS id (tokenizer's and model config's),
//! on a stop string (never emitted, not even in part: text that could begin a stop string is
//! held back until it cannot), on `max_tokens` (or the end of the context window), or when
//! `cancel` becomes true (checked before every token).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::llama::Llama;
use crate::sampling::{Sampler, SamplingConfig};
use crate::tokenizer::{Tok, TokenStream};
use crate::{Error, Result};

/// What to generate and how to sample it. `Default` is greedy decoding of up to 256 tokens.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most new tokens to produce (at least 1).
    pub max_tokens: usize,
    /// Generation ends before the first occurrence of any of these (non-empty) strings.
    pub stop: Vec<String>,
    /// How each next token is chosen.
    pub sampling: SamplingConfig,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            stop: Vec::new(),
            sampling: SamplingConfig::default(),
        }
    }
}

impl GenerateParams {
    /// Refuses impossible settings with `Error::InvalidParams` naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(Error::InvalidParams(
                "max_tokens: 0 must be at least 1".to_string(),
            ));
        }
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            return Err(Error::InvalidParams(format!(
                "stop[{i}]: stop strings must not be empty"
            )));
        }
        self.sampling.validate()
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` (or the context window) was reached.
    Length,
    /// A stop string appeared (it is not part of the text).
    Stop,
    /// `cancel` was set.
    Cancelled,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Everything streamed to `on_text`, concatenated (no stop string, no special tokens).
    pub text: String,
    /// The generated token ids, without the final EOS token (including those of a stop string).
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Time to process the prompt and get the first logits.
    pub prompt_duration: Duration,
    /// Time spent producing the new tokens after the prompt.
    pub generate_duration: Duration,
}

impl Generation {
    /// Decode speed in tokens per second (0 when nothing was generated).
    pub fn tokens_per_second(&self) -> f64 {
        let s = self.generate_duration.as_secs_f64();
        if self.tokens.is_empty() || s <= 0.0 {
            0.0
        } else {
            self.tokens.len() as f64 / s
        }
    }
}

/// Holds back streamed text that might be the beginning of a stop string.
struct StopFilter<'a> {
    stops: &'a [String],
    pending: String,
}

impl<'a> StopFilter<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopFilter {
            stops,
            pending: String::new(),
        }
    }

    /// Adds `piece`; returns (text safe to emit, whether a stop string was found).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_match {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // The earliest position whose suffix could still grow into a stop string.
        let hold_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let out = self.pending[..hold_from].to_string();
        self.pending.drain(..hold_from);
        (out, false)
    }

    /// Releases the held-back text (generation ended without a stop string).
    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Generates a continuation of `prompt_ids` (already templated and tokenized), calling
/// `on_text` with each new piece of text as soon as it is final.
pub fn generate(
    model: &Llama,
    tok: &Tok,
    prompt_ids: &[u32],
    params: &GenerateParams,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    generate_with_prefix(model, tok, None, prompt_ids, params, cancel, on_text)
}

/// [`generate`] with a soft prompt `prefix` `[n_virtual, hidden]` (prompt tuning) prepended
/// before the prompt's embeddings.
pub fn generate_with_prefix(
    model: &Llama,
    tok: &Tok,
    prefix: Option<&Tensor>,
    prompt_ids: &[u32],
    params: &GenerateParams,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    params.validate()?;
    let n_prefix = match prefix {
        Some(p) => {
            p.dims2()
                .map_err(|_| {
                    Error::InvalidParams(format!(
                        "soft prompt must be [n_virtual, hidden], got {:?}",
                        p.dims()
                    ))
                })?
                .0
        }
        None => 0,
    };
    let cfg = model.config();
    if prompt_ids.is_empty() {
        return Err(Error::InvalidParams(
            "prompt: no tokens (the model needs at least one)".to_string(),
        ));
    }
    if let Some(bad) = prompt_ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return Err(Error::InvalidParams(format!(
            "prompt: token id {bad} is outside the model's vocabulary of {}",
            cfg.vocab_size
        )));
    }
    let context = cfg.max_position_embeddings;
    if prompt_ids.len() + n_prefix >= context {
        return Err(Error::InvalidParams(format!(
            "prompt: {} tokens leave no room in the model's context of {context} tokens",
            prompt_ids.len() + n_prefix
        )));
    }
    let budget = params.max_tokens.min(context - prompt_ids.len() - n_prefix);
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let mut eos: Vec<u32> = tok.eos_token_ids().to_vec();
    for id in &cfg.eos_token_ids {
        if !eos.contains(id) {
            eos.push(*id);
        }
    }

    let mut result = Generation {
        text: String::new(),
        tokens: Vec::new(),
        finish_reason: FinishReason::Length,
        prompt_tokens: prompt_ids.len(),
        prompt_duration: Duration::ZERO,
        generate_duration: Duration::ZERO,
    };
    if cancel.load(Ordering::Relaxed) {
        result.finish_reason = FinishReason::Cancelled;
        return Ok(result);
    }

    let device = model.device();
    let start = Instant::now();
    let mut cache = model.new_cache();
    let input = Tensor::new(prompt_ids, device)?.unsqueeze(0)?;
    let mut logits = match prefix {
        Some(p) => model.forward_last_with_prefix(&p.unsqueeze(0)?, &input, &mut cache)?,
        None => model.forward_last(&input, &mut cache)?,
    };
    result.prompt_duration = start.elapsed();

    let decode_start = Instant::now();
    let mut history: Vec<u32> = prompt_ids.to_vec();
    let mut stream = TokenStream::new(tok, true);
    let mut filter = StopFilter::new(&params.stop);
    let mut emit = |s: &str, text: &mut String| {
        if !s.is_empty() {
            text.push_str(s);
            on_text(s);
        }
    };
    let finish = loop {
        if cancel.load(Ordering::Relaxed) {
            break FinishReason::Cancelled;
        }
        let next = sampler.sample(&logits, &history)?;
        if eos.contains(&next) {
            break FinishReason::Eos;
        }
        history.push(next);
        result.tokens.push(next);
        if let Some(piece) = stream.push(next)? {
            let (out, stopped) = filter.push(&piece);
            emit(&out, &mut result.text);
            if stopped {
                break FinishReason::Stop;
            }
        }
        if result.tokens.len() >= budget {
            break FinishReason::Length;
        }
        logits = if model.needs_recompute(cache.len(), 1) {
            // LongRoPE passes from its short to its long factors here: the whole sequence again,
            // rotated with the long ones (as transformers regenerates Phi-3's cache).
            cache.clear();
            let all = Tensor::new(history.as_slice(), device)?.unsqueeze(0)?;
            match prefix {
                Some(p) => model.forward_last_with_prefix(&p.unsqueeze(0)?, &all, &mut cache)?,
                None => model.forward_last(&all, &mut cache)?,
            }
        } else {
            let input = Tensor::new(&[next], device)?.unsqueeze(0)?;
            model.forward_last(&input, &mut cache)?
        };
    };
    if finish != FinishReason::Stop {
        // An incomplete character at the very end, then whatever was held back.
        let mut stopped = false;
        if let Some(rest) = stream.finish()? {
            let (out, s) = filter.push(&rest);
            emit(&out, &mut result.text);
            stopped = s;
        }
        if stopped {
            result.finish_reason = FinishReason::Stop;
        } else {
            let rest = filter.flush();
            emit(&rest, &mut result.text);
            result.finish_reason = finish;
        }
    } else {
        result.finish_reason = finish;
    }
    result.generate_duration = decode_start.elapsed();
    Ok(result)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopFilter::new(&stops);
        let mut out = Vec::new();
        for p in pieces {
            let (o, stopped) = f.push(p);
            out.push(o);
            if stopped {
                return (out, true, String::new());
            }
        }
        let rest = f.flush();
        (out, false, rest)
    }

    #[test]
    fn stop_filter_holds_back_prefixes() {
        let (out, stopped, _) = run(&["</end>"], &["Hello <", "/e", "nd> tail"]);
        assert!(stopped);
        assert_eq!(out, vec!["Hello ", "", ""]);
        // A false start is released once it cannot match any more.
        let (out, stopped, rest) = run(&["</end>"], &["a </e", "x> b"]);
        assert!(!stopped);
        assert_eq!(out, vec!["a ", "</ex> b"]);
        assert_eq!(rest, "");
        // Held-back text is flushed at the end.
        let (out, stopped, rest) = run(&["STOP"], &["ok ST"]);
        assert!(!stopped);
        assert_eq!(out, vec!["ok "]);
        assert_eq!(rest, "ST");
        // The earliest of several stop strings wins; multi-byte text is handled.
        let (out, stopped, _) = run(&["世界", "b"], &["é a 世", "界 b"]);
        assert!(stopped);
        assert_eq!(out.concat(), "é a ");
    }

    #[test]
    fn params_validation_names_fields() {
        let check = |p: GenerateParams, field: &str| {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        };
        check(
            GenerateParams {
                max_tokens: 0,
                ..Default::default()
            },
            "max_tokens",
        );
        check(
            GenerateParams {
                sampling: SamplingConfig {
                    temperature: -1.0,
                    ..Default::default()
                },
                ..Default::default()
            },
            "temperature",
        );
        check(
            GenerateParams {
                sampling: SamplingConfig {
                    top_p: Some(1.01),
                    ..Default::default()
                },
                ..Default::default()
            },
            "top_p",
        );
        check(
            GenerateParams {
                stop: vec!["x".into(), String::new()],
                ..Default::default()
            },
            "stop[1]",
        );
        assert!(GenerateParams::default().validate().is_ok());
    }
}
