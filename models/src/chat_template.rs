//! Chat templates: Hugging Face Jinja templates rendered with minijinja the way transformers
//! renders them (`trim_blocks`, `lstrip_blocks`, Python string/dict methods via pycompat,
//! `raise_exception`, a Python-style `tojson`, `strftime_now`, `bos_token`/`eos_token` in the
//! context). Templates come from the GGUF `tokenizer.chat_template` key or a Hugging Face
//! folder; ChatML is the fallback when a model has none.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::{Error, Result};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`), used when a model has none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// Instructions one render may execute (minijinja's fuel). A template renders in a few
/// thousand at most (SmolLM2's, a 100-turn conversation: under 10,000); a template that loops
/// without end (nested `range`s, self-feeding loops) stops with an error instead of hanging.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// A compiled chat template. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are exposed to the template.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| Error::ChatTemplate(format!("the template does not compile: {e:#}")))?;
        Ok(ChatTemplate {
            env: Arc::new(env),
            source,
            bos_token,
            eos_token,
        })
    }

    /// The GGUF's `tokenizer.chat_template`, or ChatML when the key is absent.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<ChatTemplate> {
        let token = |key: &str| -> Result<Option<String>> {
            let Some(id) = content.metadata.get(key) else {
                return Ok(None);
            };
            let id = id.to_u32().map_err(|e| Error::field(path, key, e))? as usize;
            let Some(tokens) = content.metadata.get("tokenizer.ggml.tokens") else {
                return Ok(None);
            };
            let tokens = tokens
                .to_vec()
                .map_err(|e| Error::field(path, "tokenizer.ggml.tokens", e))?;
            match tokens.get(id) {
                Some(t) => Ok(Some(
                    t.to_string()
                        .map_err(|e| Error::field(path, "tokenizer.ggml.tokens", e))?
                        .clone(),
                )),
                None => Err(Error::field(
                    path,
                    key,
                    format!(
                        "id {id} is outside the vocabulary of {} tokens",
                        tokens.len()
                    ),
                )),
            }
        };
        let bos = token("tokenizer.ggml.bos_token_id")?;
        let eos = token("tokenizer.ggml.eos_token_id")?;
        let source = match content.metadata.get("tokenizer.chat_template") {
            None => CHATML_TEMPLATE.to_string(),
            Some(v) => v
                .to_string()
                .map_err(|e| Error::field(path, "tokenizer.chat_template", e))?
                .clone(),
        };
        ChatTemplate::new(source, bos, eos).map_err(|e| match e {
            Error::ChatTemplate(m) => {
                Error::ChatTemplate(format!("{} (tokenizer.chat_template): {m}", path.display()))
            }
            other => other,
        })
    }

    /// A Hugging Face folder's template: `chat_template.jinja`, else `chat_template.json`, else
    /// `chat_template` in `tokenizer_config.json` (a string, or a list of `{name, template}` from
    /// which "default" or the first is taken); ChatML when there is none.
    pub fn from_hf_dir(dir: &Path) -> Result<ChatTemplate> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Option<serde_json::Value> = if cfg_path.exists() {
            let text = crate::fsio::read_regular_string(&cfg_path)?;
            Some(serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, "JSON", e))?)
        } else {
            None
        };
        let special = |key: &str| -> Option<String> {
            match cfg.as_ref()?.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            }
        };
        let bos = special("bos_token");
        let eos = special("eos_token");

        let jinja = dir.join("chat_template.jinja");
        let json = dir.join("chat_template.json");
        let (source, origin) = if jinja.exists() {
            let s = crate::fsio::read_regular_string(&jinja)?;
            (s, jinja)
        } else if json.exists() {
            let text = crate::fsio::read_regular_string(&json)?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&json, "JSON", e))?;
            let t = template_from_json(v.get("chat_template"), &json)?
                .ok_or_else(|| Error::field(&json, "chat_template", "missing"))?;
            (t, json)
        } else {
            match template_from_json(cfg.as_ref().and_then(|c| c.get("chat_template")), &cfg_path)?
            {
                Some(t) => (t, cfg_path),
                None => (CHATML_TEMPLATE.to_string(), dir.to_path_buf()),
            }
        };
        ChatTemplate::new(source, bos, eos).map_err(|e| match e {
            Error::ChatTemplate(m) => Error::ChatTemplate(format!("{}: {m}", origin.display())),
            other => other,
        })
    }

    /// The ChatML fallback template (no BOS/EOS tokens in its context).
    pub fn chatml() -> ChatTemplate {
        // The constant is checked by a unit test; compiling it cannot fail at run time,
        // but stay panic-free anyway by falling back to an environment without it.
        match ChatTemplate::new(CHATML_TEMPLATE, None, Some("<|im_end|>".to_string())) {
            Ok(t) => t,
            Err(_) => ChatTemplate {
                env: Arc::new(Environment::new()),
                source: CHATML_TEMPLATE.to_string(),
                bos_token: None,
                eos_token: Some("<|im_end|>".to_string()),
            },
        }
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::ChatTemplate(format!("{e:#}")))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
        };
        tmpl.render(ctx).map_err(|e| {
            if e.kind() == ErrorKind::OutOfFuel {
                return Error::ChatTemplate(format!(
                    "the template ran past its budget of {TEMPLATE_FUEL} steps: it loops without \
                     end or does far too much work for one chat"
                ));
            }
            if e.kind() == ErrorKind::InvalidOperation {
                if let Some(detail) = e.detail() {
                    return Error::ChatTemplate(format!("the template refused the chat: {detail}"));
                }
            }
            Error::ChatTemplate(format!("rendering failed: {e:#}"))
        })
    }
}

fn template_from_json(v: Option<&serde_json::Value>, path: &Path) -> Result<Option<String>> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            let named: Vec<(&str, &str)> = list
                .iter()
                .filter_map(|e| Some((e.get("name")?.as_str()?, e.get("template")?.as_str()?)))
                .collect();
            let chosen = named
                .iter()
                .find(|(n, _)| *n == "default")
                .or_else(|| named.first())
                .ok_or_else(|| {
                    Error::field(
                        path,
                        "chat_template",
                        "a list without {name, template} entries",
                    )
                })?;
            Ok(Some(chosen.1.to_string()))
        }
        Some(_) => Err(Error::field(
            path,
            "chat_template",
            "neither a string nor a list of named templates",
        )),
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time in Python `strftime` notation.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats a Unix time (UTC) with the common Python `strftime` directives.
fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (h, m, s) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday_name),
            Some('a') => out.push_str(&weekday_name[..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 })),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('T') => out.push_str(&format!("{h:02}:{m:02}:{s:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 -> (year, month 1-12, day 1-31), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`,
/// as transformers' `tojson` filter produces it.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(Value::from(out))
}

fn write_json(
    value: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = value.as_i64().filter(|_| value.is_integer()) {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                if f.is_finite() {
                    let s = serde_json::to_string(&f).map_err(|e| {
                        minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string())
                    })?;
                    out.push_str(&s);
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else if f > 0.0 {
                    out.push_str("Infinity");
                } else {
                    out.push_str("-Infinity");
                }
            }
        }
        ValueKind::String => push_json_string(value.as_str().unwrap_or(""), out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                match k.as_str() {
                    Some(s) => push_json_string(s, out),
                    None => push_json_string(&k.to_string(), out),
                }
                out.push_str(": ");
                write_json(&value.get_item(k)?, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => push_json_string(&value.to_string(), out),
    }
    Ok(())
}

/// A JSON string literal without escaping non-ASCII characters (`ensure_ascii=False`).
fn push_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chat() -> Vec<Message> {
        vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
        ]
    }

    #[test]
    fn chatml_snapshot() {
        let t = ChatTemplate::chatml();
        assert_eq!(t.source(), CHATML_TEMPLATE);
        assert_eq!(
            t.render(&chat(), true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&chat()[1..2], false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn raising_template_gives_clear_error() {
        let src = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&chat()[1..], false).unwrap(), "HiHello!Bye");
        let err = t.render(&chat(), false).unwrap_err().to_string();
        assert!(err.contains("System role not supported"), "{err}");
        assert!(err.starts_with("chat template:"), "{err}");
    }

    #[test]
    fn syntax_error_is_reported() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m", None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not compile"), "{err}");
    }

    #[test]
    fn trim_lstrip_pycompat_and_tokens() {
        // Llama-2 style: bos/eos tokens, .strip(), whitespace control by trim/lstrip blocks.
        let src = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'user' %}\n[INST] {{ m.content.strip() }} [/INST]\n    {% else %}\n{{ m.content | upper }}{{ eos_token }}\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into())).unwrap();
        let out = t
            .render(
                &[
                    Message::new("user", "  hi  "),
                    Message::new("assistant", "yo"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(out, "<s>\n[INST] hi [/INST]\nYO</s>\n");
    }

    #[test]
    fn tojson_is_pythons() {
        let t = ChatTemplate::new(
            "{{ {'b': [1, 2.5, 'é\"'], 'a': none, 'c': true} | tojson }}|{{ {'k': [1]} | tojson(indent=2) }}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\"b\": [1, 2.5, \"é\\\"\"], \"a\": null, \"c\": true}|{\n  \"k\": [\n    1\n  ]\n}"
        );
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:05:09 UTC was a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A, %B %d %H:%M:%S %j %%", t),
            "Friday, July 26 13:05:09 208 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
        let now = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None)
            .unwrap()
            .render(&[], false)
            .unwrap();
        assert!(now.len() == 4 && now.starts_with('2'), "{now}");
    }

    #[test]
    fn hf_dir_variants() {
        let dir = tempfile::tempdir().unwrap();
        // No template anywhere: ChatML.
        assert_eq!(
            ChatTemplate::from_hf_dir(dir.path()).unwrap().source(),
            CHATML_TEMPLATE
        );
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "T"},
                                  {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}]}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_hf_dir(dir.path()).unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "x")], false).unwrap(),
            "<s>x</s>"
        );
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "J{{ messages | length }}",
        )
        .unwrap();
        let t = ChatTemplate::from_hf_dir(dir.path()).unwrap();
        assert_eq!(t.render(&chat(), false).unwrap(), "J4");
        std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
        let err = ChatTemplate::from_hf_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("chat_template.jinja"), "{err}");
    }
}
