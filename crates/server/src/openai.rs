//! The OpenAI API's request and response bodies (chat completions, legacy completions,
//! models), and their translation to the engine's sampling settings. Fields Attune
//! cannot honour are refused with a 400 naming them, never ignored silently; fields that
//! change nothing (`n: 1`, `frequency_penalty: 0`, `response_format: text`, ...) are
//! accepted.

use attune_protocol::{ChatMessage, FinishReason, GenerationStats, SamplingParams};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

/// `stop`: one string or up to four.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A message's content: a string, or parts of which only text is understood.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// What chat and legacy completions share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub logit_bias: Option<Value>,
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Option<Vec<InMessage>>,
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    pub response_format: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    One(String),
    Many(Vec<Value>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: Common,
    pub prompt: Option<PromptIn>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub logprobs: Option<Value>,
    pub best_of: Option<u64>,
}

/// Parses a JSON body, turning serde's complaint into a 400 that says where.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            None,
            "the request has no body: send a JSON object (Content-Type: application/json)",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            None,
            format!("the request body is not valid JSON for this endpoint: {e}"),
        )
    })
}

/// How many tokens "no limit" means: generation stops at the end of the context.
const UNLIMITED: usize = 1 << 20;

/// The settings of one generation, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub model: String,
    pub params: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
}

fn check_range(name: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(ApiError::invalid(
            Some(name),
            format!("{name} must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(()),
    }
}

impl Common {
    /// The engine's sampling settings for this request; `max_tokens` is given by the
    /// endpoint (chat has two names for it, completions its own default).
    pub fn settings(&self, max_tokens: Option<u64>) -> Result<Settings, ApiError> {
        let model = match self.model.as_deref().map(str::trim) {
            Some(m) if !m.is_empty() => m.to_string(),
            _ => {
                return Err(ApiError::invalid(
                    Some("model"),
                    "you must provide a model parameter (GET /v1/models lists them)",
                ))
            }
        };
        check_range("temperature", self.temperature, 0.0, 2.0)?;
        check_range("top_p", self.top_p, 0.0, 1.0)?;
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        if self.top_p == Some(0.0) {
            return Err(ApiError::invalid(Some("top_p"), "top_p must be above 0"));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|x| x != 0.0) {
                return Err(ApiError::unsupported(
                    name,
                    format!("{name} is not supported by Attune's server; leave it out or at 0"),
                ));
            }
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::unsupported(
                "n",
                "only n = 1 is supported: send one request per answer",
            ));
        }
        if self
            .logit_bias
            .as_ref()
            .is_some_and(|b| !b.is_null() && b.as_object().is_none_or(|o| !o.is_empty()))
        {
            return Err(ApiError::unsupported(
                "logit_bias",
                "logit_bias is not supported by Attune's server",
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::invalid(
                Some("stop"),
                format!("stop takes at most 4 sequences, got {}", stop.len()),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(Some("stop"), "a stop sequence is empty"));
        }
        let max_tokens = match max_tokens {
            Some(0) => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    "max_tokens must be at least 1",
                ))
            }
            Some(n) => usize::try_from(n).unwrap_or(UNLIMITED).min(UNLIMITED),
            None => UNLIMITED,
        };
        let seed = match self.seed {
            Some(s) => s as u64,
            // Without a seed, every answer is drawn anew, as OpenAI's are.
            None => fresh_seed(),
        };
        let params = SamplingParams {
            max_tokens,
            // OpenAI's defaults: temperature 1, top_p 1, no other filter or penalty.
            temperature: self.temperature.unwrap_or(1.0),
            top_k: None,
            top_p: self.top_p.filter(|p| *p < 1.0),
            min_p: None,
            repetition_penalty: 1.0,
            repeat_last_n: 0,
            seed,
            stop,
        };
        Ok(Settings {
            model,
            params,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            user: self.user.clone(),
        })
    }
}

fn fresh_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // splitmix64, so that close timestamps give unrelated seeds.
    let mut z = nanos.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ChatRequest {
    /// The checked settings and the conversation.
    pub fn checked(&self) -> Result<(Settings, Vec<ChatMessage>), ApiError> {
        if self.common.max_tokens.is_some()
            && self.max_completion_tokens.is_some()
            && self.common.max_tokens != self.max_completion_tokens
        {
            return Err(ApiError::invalid(
                Some("max_completion_tokens"),
                "max_tokens and max_completion_tokens disagree; send one of them",
            ));
        }
        let settings = self
            .common
            .settings(self.max_completion_tokens.or(self.common.max_tokens))?;
        if self.logprobs == Some(true) || self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(ApiError::unsupported(
                "logprobs",
                "logprobs are not supported by Attune's server",
            ));
        }
        for (name, v) in [
            ("tools", &self.tools),
            ("tool_choice", &self.tool_choice),
            ("functions", &self.functions),
        ] {
            let empty = match v {
                None | Some(Value::Null) => true,
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::String(s)) => s == "none",
                _ => false,
            };
            if !empty {
                return Err(ApiError::unsupported(
                    name,
                    format!("{name} (function calling) is not supported by Attune's server"),
                ));
            }
        }
        if let Some(f) = &self.response_format {
            let kind = f.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "text" {
                return Err(ApiError::unsupported(
                    "response_format",
                    format!(
                        "response_format '{kind}' is not supported by Attune's server; only \
                         'text'"
                    ),
                ));
            }
        }
        let Some(messages) = &self.messages else {
            return Err(ApiError::invalid(
                Some("messages"),
                "you must provide a messages parameter",
            ));
        };
        if messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "messages must hold at least one message",
            ));
        }
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let param = format!("messages[{i}]");
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        Some(&format!("{param}.role")),
                        format!(
                            "role '{other}' is not supported: use system, developer, user or \
                             assistant"
                        ),
                    ))
                }
            };
            let content = match &m.content {
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match part.get("type").and_then(Value::as_str) {
                            Some("text") => match part.get("text").and_then(Value::as_str) {
                                Some(t) => text.push_str(t),
                                None => {
                                    return Err(ApiError::invalid(
                                        Some(&format!("{param}.content[{j}].text")),
                                        "a text part needs a 'text' string",
                                    ))
                                }
                            },
                            other => {
                                return Err(ApiError::unsupported(
                                    &format!("{param}.content[{j}].type"),
                                    format!(
                                        "content part type '{}' is not supported: Attune's \
                                         models read text only",
                                        other.unwrap_or("(none)")
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
                None => {
                    return Err(ApiError::invalid(
                        Some(&format!("{param}.content")),
                        "the message has no content",
                    ))
                }
            };
            out.push(ChatMessage {
                role: role.to_string(),
                content,
            });
        }
        Ok((settings, out))
    }
}

impl CompletionRequest {
    /// The checked settings and the prompt(s).
    pub fn checked(&self) -> Result<(Settings, Vec<String>), ApiError> {
        // The legacy endpoint's default is 16 tokens.
        let settings = self
            .common
            .settings(Some(self.common.max_tokens.unwrap_or(16)))?;
        if self.echo {
            return Err(ApiError::unsupported("echo", "echo is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::unsupported("suffix", "suffix is not supported"));
        }
        if self.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::unsupported(
                "logprobs",
                "logprobs are not supported by Attune's server",
            ));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::unsupported(
                "best_of",
                "only best_of = 1 is supported",
            ));
        }
        let prompts = match &self.prompt {
            None => {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    "you must provide a prompt parameter",
                ))
            }
            Some(PromptIn::One(s)) => vec![s.clone()],
            Some(PromptIn::Many(v)) => {
                let mut out = Vec::new();
                for (i, p) in v.iter().enumerate() {
                    match p.as_str() {
                        Some(s) => out.push(s.to_string()),
                        None => {
                            return Err(ApiError::unsupported(
                                &format!("prompt[{i}]"),
                                "prompts given as token ids are not supported: send text",
                            ))
                        }
                    }
                }
                out
            }
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid(Some("prompt"), "prompt is an empty list"));
        }
        if settings.stream && prompts.len() > 1 {
            return Err(ApiError::unsupported(
                "prompt",
                "streaming takes one prompt at a time",
            ));
        }
        Ok((settings, prompts))
    }
}

/// OpenAI's finish reason for the engine's.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn of(s: &GenerationStats) -> Usage {
        Usage {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.generated_tokens,
            total_tokens: s.prompt_tokens + s.generated_tokens,
        }
    }

    pub fn add(self, o: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens + o.prompt_tokens,
            completion_tokens: self.completion_tokens + o.completion_tokens,
            total_tokens: self.total_tokens + o.total_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(json: &str) -> Result<(Settings, Vec<ChatMessage>), ApiError> {
        parse::<ChatRequest>(json.as_bytes())?.checked()
    }

    #[test]
    fn a_plain_chat_request_maps_to_openai_defaults() {
        let (s, m) = chat(
            r#"{"model":"m","messages":[{"role":"developer","content":"Be brief."},
                {"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"!"}]}],
                "stop":"\n\n","seed":7,"max_completion_tokens":5,"n":1,"frequency_penalty":0}"#,
        )
        .expect("valid");
        assert_eq!(s.model, "m");
        assert_eq!(s.params.temperature, 1.0);
        assert_eq!(s.params.top_p, None);
        assert_eq!(s.params.repetition_penalty, 1.0);
        assert_eq!(s.params.max_tokens, 5);
        assert_eq!(s.params.seed, 7);
        assert_eq!(s.params.stop, ["\n\n"]);
        assert_eq!(m[0].role, "system");
        assert_eq!(m[1].content, "Hi!");
        assert!(!s.stream);
    }

    #[test]
    fn what_attune_cannot_honour_is_refused_with_the_field() {
        for (body, param) in [
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#,
                "n",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":true}"#,
                "logprobs",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
                "tools",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                "temperature",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"presence_penalty":0.5}"#,
                "presence_penalty",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
                "stop",
            ),
            (
                r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "messages[0].content[0].type",
            ),
            (r#"{"model":"m","messages":[]}"#, "messages"),
            (r#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#,
                "response_format",
            ),
        ] {
            let err = chat(body).expect_err(body);
            assert_eq!(err.status.as_u16(), 400, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
        }
        let err = chat("{not json").expect_err("bad json");
        assert_eq!(err.status.as_u16(), 400);
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
    }

    #[test]
    fn completions_default_to_16_tokens_and_take_text_prompts_only() {
        let r: CompletionRequest =
            parse(br#"{"model":"m","prompt":"Once upon a time"}"#).expect("parse");
        let (s, p) = r.checked().expect("valid");
        assert_eq!(s.params.max_tokens, 16);
        assert_eq!(p, ["Once upon a time"]);
        let r: CompletionRequest = parse(br#"{"model":"m","prompt":[1,2,3]}"#).expect("parse");
        assert_eq!(
            r.checked().expect_err("ids").param.as_deref(),
            Some("prompt[0]")
        );
    }

    #[test]
    fn error_json_has_openais_shape() {
        let e = ApiError::model_not_found("nope");
        let v = e.body();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("nope"));
    }
}
