//! Ollama: the Modelfile (written, and parsed by a port of Ollama's own parser,
//! `parser/parser.go` at ollama fb30760), and the chat template translated from Jinja into
//! Ollama's Go template.
//!
//! The translation renders the Jinja template on probe conversations and reads off what it
//! puts around each role's content (prefix, suffix), the text before the first message
//! (BOS, a default system prompt), and the generation prompt. It works for templates whose
//! rendering of a longer conversation extends the shorter one (ChatML, Llama 3, Gemma, Phi-3,
//! Mistral-style, SmolLM2's); the result is checked by rendering both templates on the same
//! conversations, so a template that cannot be translated is refused, never written wrong.

use std::path::{Path, PathBuf};

use super::gotmpl;
use crate::chat_template::{ChatTemplate, Message};
use crate::{Error, Result};

/// One Modelfile instruction as Ollama's parser returns it: `model` (FROM), `adapter`,
/// `template`, `system`, `license`, `message` (`role: content`), or a parameter name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub name: String,
    pub args: String,
}

/// A syntax error with Ollama's wording and line number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(f, "(line {}): {}", self.line, self.message)
        } else {
            f.write_str(&self.message)
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Nil,
    Name,
    Value,
    Parameter,
    Message,
    Comment,
}

const INVALID_COMMAND: &str = "command must be one of \"from\", \"license\", \"template\", \"system\", \"adapter\", \"draft\", \"renderer\", \"parser\", \"parameter\", \"message\", or \"requires\"";

fn is_alpha(c: char) -> bool {
    c.is_ascii_alphabetic()
}
fn is_space(c: char) -> bool {
    c == ' ' || c == '\t'
}
fn is_newline(c: char) -> bool {
    c == '\r' || c == '\n'
}

/// Go's `strconv.IsPrint`: letters, marks, numbers, punctuation, symbols and the ASCII space
/// (approximated: not a control, whitespace, format or private-use character).
fn is_print(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    let u = c as u32;
    let format = matches!(u,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x180E | 0x200B..=0x200F
        | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB
        | 0x110BD | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F);
    let private = matches!(u, 0xE000..=0xF8FF | 0xF0000..=0x10FFFF);
    !format && !private
}

fn is_valid_command(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "from"
            | "license"
            | "template"
            | "system"
            | "adapter"
            | "draft"
            | "renderer"
            | "parser"
            | "parameter"
            | "message"
            | "requires"
    )
}

/// Ollama's `unquote`: `"""..."""` or `"..."`, or the text as it is.
fn unquote(s: &str) -> Option<String> {
    if s.len() >= 3 && s.starts_with("\"\"\"") {
        if s.len() >= 6 && s.ends_with("\"\"\"") {
            return Some(s[3..s.len() - 3].to_string());
        }
        return None;
    }
    if s.starts_with('"') {
        if s.len() >= 2 && s.ends_with('"') {
            return Some(s[1..s.len() - 1].to_string());
        }
        return None;
    }
    Some(s.to_string())
}

/// Ollama's `quote`: values with a newline or leading/trailing space are quoted.
pub fn quote(s: &str) -> String {
    if s.contains('\n') || s.starts_with(' ') || s.ends_with(' ') {
        if s.contains('"') {
            return format!("\"\"\"{s}\"\"\"");
        }
        return format!("\"{s}\"");
    }
    s.to_string()
}

/// Next state for rune `r` in state `cs` (Ollama's `parseRuneForState`); `Err(true)` is
/// Ollama's unexpected EOF, `Err(false)` an invalid command.
fn next_state(r: char, cs: State) -> std::result::Result<(State, Option<char>), bool> {
    match cs {
        State::Nil => Ok(if r == '#' {
            (State::Comment, None)
        } else if is_space(r) || is_newline(r) {
            (State::Nil, None)
        } else {
            (State::Name, Some(r))
        }),
        State::Name => {
            if is_alpha(r) {
                Ok((State::Name, Some(r)))
            } else if is_space(r) {
                Ok((State::Value, None))
            } else {
                Err(false)
            }
        }
        State::Value => Ok(if is_newline(r) || is_space(r) {
            (State::Nil, Some(r))
        } else {
            (State::Value, Some(r))
        }),
        State::Parameter => {
            if is_alpha(r) || r.is_ascii_digit() || r == '_' {
                Ok((State::Parameter, Some(r)))
            } else if is_space(r) {
                Ok((State::Value, None))
            } else {
                Err(true)
            }
        }
        State::Message => {
            if is_alpha(r) {
                Ok((State::Message, Some(r)))
            } else if is_space(r) {
                Ok((State::Value, None))
            } else {
                Err(true)
            }
        }
        State::Comment => Ok(if is_newline(r) {
            (State::Nil, None)
        } else {
            (State::Comment, None)
        }),
    }
}

/// Parses a Modelfile exactly as Ollama's `parser.ParseFile` does.
pub fn parse(text: &str) -> std::result::Result<Vec<Command>, ParseError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut cmds: Vec<Command> = Vec::new();
    let mut cmd = Command {
        name: String::new(),
        args: String::new(),
    };
    let mut curr = State::Nil;
    let mut line = 1;
    let mut b = String::new();
    let mut role = String::new();
    let perr = |line: usize, msg: &str| ParseError {
        line,
        message: msg.to_string(),
    };
    for r0 in text.chars() {
        if is_newline(r0) {
            line += 1;
        }
        let (mut next, r) = match next_state(r0, curr) {
            Ok(x) => x,
            Err(true) => {
                return Err(perr(0, &format!("unexpected EOF: {b}")));
            }
            Err(false) => return Err(perr(line, INVALID_COMMAND)),
        };
        let r = r.unwrap_or('\0');
        if next != curr {
            match curr {
                State::Name => {
                    if !is_valid_command(&b) {
                        return Err(perr(line, INVALID_COMMAND));
                    }
                    match b.to_ascii_lowercase().as_str() {
                        "from" => cmd.name = "model".into(),
                        "parameter" => next = State::Parameter,
                        "message" => {
                            next = State::Message;
                            cmd.name = "message".into();
                        }
                        s => cmd.name = s.to_string(),
                    }
                }
                State::Parameter => cmd.name = b.clone(),
                State::Message => {
                    if !matches!(b.as_str(), "system" | "user" | "assistant") {
                        return Err(perr(
                            line,
                            "message role must be one of \"system\", \"user\", or \"assistant\"",
                        ));
                    }
                    role = b.clone();
                }
                State::Comment | State::Nil => {}
                State::Value => {
                    let unq = unquote(b.trim());
                    match unq {
                        Some(s) if !is_space(r) => {
                            let s = if role.is_empty() {
                                s
                            } else {
                                let s = format!("{role}: {s}");
                                role.clear();
                                s
                            };
                            cmd.args = s;
                            cmds.push(cmd.clone());
                        }
                        _ => {
                            b.push(r);
                            continue;
                        }
                    }
                }
            }
            b.clear();
            curr = next;
        }
        if r != '\0' && is_print(r) {
            b.push(r);
        }
    }
    match curr {
        State::Comment | State::Nil => {}
        State::Value => {
            let s = unquote(b.trim()).ok_or_else(|| perr(0, "unexpected EOF"))?;
            let s = if role.is_empty() {
                s
            } else {
                format!("{role}: {s}")
            };
            cmd.args = s;
            cmds.push(cmd);
        }
        _ => return Err(perr(0, "unexpected EOF")),
    }
    if !cmds.iter().any(|c| c.name == "model") {
        return Err(perr(0, "no FROM line"));
    }
    Ok(cmds)
}

/// The type of each parameter Ollama's `api.Options` accepts (`FormatParams`).
fn param_kind(name: &str) -> Option<&'static str> {
    Some(match name {
        "num_keep" | "seed" | "num_predict" | "top_k" | "repeat_last_n" | "num_ctx"
        | "num_batch" | "num_gpu" | "num_thread" | "draft_num_predict" | "main_gpu" => "int",
        "top_p" | "min_p" | "typical_p" | "temperature" | "repeat_penalty" | "presence_penalty"
        | "frequency_penalty" => "float",
        "use_mmap" => "bool",
        "stop" => "strings",
        _ => return None,
    })
}

/// Parameters Ollama accepts with a deprecation warning.
const DEPRECATED: &[&str] = &[
    "penalize_newline",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mlock",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
];

/// What a Modelfile says, checked against Ollama's rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelfileInfo {
    /// FROM, as written, and resolved against the Modelfile's folder when it is a path.
    pub from: String,
    pub from_path: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
    pub template: Option<String>,
    pub system: Option<String>,
    pub parameters: Vec<(String, String)>,
    pub messages: Vec<(String, String)>,
    /// Deprecated parameters and other things Ollama warns about.
    pub warnings: Vec<String>,
}

fn resolve(arg: &str, dir: &Path) -> PathBuf {
    if let Some(rest) = arg.strip_prefix("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            return Path::new(&home).join(rest);
        }
    }
    let p = Path::new(arg);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// Parses a Modelfile and checks what `ollama create` checks before it reads the weights:
/// the syntax, FROM present, local FROM/ADAPTER files that exist, parameter names and
/// values (`api.FormatParams`), and that TEMPLATE parses as a Go template. `dir` is the
/// Modelfile's folder (relative paths resolve against it).
pub fn check(text: &str, dir: &Path) -> Result<ModelfileInfo> {
    let bad = |m: String| Error::InvalidParams(format!("Modelfile: {m}"));
    let cmds = parse(text).map_err(|e| bad(e.to_string()))?;
    let mut info = ModelfileInfo::default();
    for c in cmds {
        match c.name.as_str() {
            "model" => {
                let p = resolve(&c.args, dir);
                info.from = c.args.clone();
                // Ollama takes a FROM that is not a local path as a model name to pull.
                info.from_path = p.exists().then_some(p);
            }
            "adapter" => {
                let p = resolve(&c.args, dir);
                if !p.exists() {
                    return Err(bad(format!("ADAPTER {}: no such file", p.display())));
                }
                info.adapter = Some(p);
            }
            "template" => {
                gotmpl::Template::parse(&c.args).map_err(|e| bad(format!("TEMPLATE: {e}")))?;
                info.template = Some(c.args);
            }
            "system" => info.system = Some(c.args),
            "message" => {
                let (role, content) = c.args.split_once(": ").unwrap_or((&c.args, ""));
                info.messages.push((role.to_string(), content.to_string()));
            }
            "license" | "draft" | "renderer" | "parser" => {}
            "requires" => {
                let v = c.args.trim_start_matches('v');
                let ok = v.split('.').count() <= 3
                    && v.split('.')
                        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
                if !ok {
                    return Err(bad("requires must be a valid semver (e.g. 0.14.0)".into()));
                }
            }
            name => {
                if DEPRECATED.contains(&name) {
                    info.warnings
                        .push(format!("parameter {name} is deprecated"));
                    continue;
                }
                let kind =
                    param_kind(name).ok_or_else(|| bad(format!("unknown parameter '{name}'")))?;
                let v = c.args.as_str();
                let ok = match kind {
                    "int" => v.parse::<i64>().is_ok(),
                    "float" => v.parse::<f32>().is_ok(),
                    "bool" => matches!(
                        v,
                        "1" | "t"
                            | "T"
                            | "TRUE"
                            | "true"
                            | "True"
                            | "0"
                            | "f"
                            | "F"
                            | "FALSE"
                            | "false"
                            | "False"
                    ),
                    _ => true,
                };
                if !ok {
                    return Err(bad(format!("invalid {kind} value {v} for {name}")));
                }
                info.parameters.push((name.to_string(), c.args));
            }
        }
    }
    Ok(info)
}

/// What the Modelfile of an export holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Modelfile {
    /// Relative to the Modelfile (`./model.gguf`).
    pub from: String,
    pub adapter: Option<String>,
    pub template: String,
    pub system: Option<String>,
    /// Few-shot turns (`MESSAGE role content`).
    pub messages: Vec<(String, String)>,
    /// In order; `stop` may repeat.
    pub parameters: Vec<(String, String)>,
    /// A comment line on top.
    pub comment: String,
}

fn triple_quoted(what: &str, s: &str) -> Result<String> {
    if s.contains("\"\"\"") {
        return Err(Error::InvalidParams(format!(
            "{what} contains \"\"\", which a Modelfile cannot quote"
        )));
    }
    Ok(format!("\"\"\"{s}\"\"\""))
}

impl Modelfile {
    /// The Modelfile's text. Values that Ollama's parser could not give back exactly (a
    /// `"""` inside the template) are refused.
    pub fn render(&self) -> Result<String> {
        let mut s = String::new();
        for line in self.comment.lines() {
            s.push_str(&format!("# {line}\n"));
        }
        s.push_str(&format!("FROM {}\n", quote(&self.from)));
        if let Some(a) = &self.adapter {
            s.push_str(&format!("ADAPTER {}\n", quote(a)));
        }
        s.push_str(&format!(
            "TEMPLATE {}\n",
            triple_quoted("the template", &self.template)?
        ));
        if let Some(sys) = &self.system {
            s.push_str(&format!(
                "SYSTEM {}\n",
                triple_quoted("the system prompt", sys)?
            ));
        }
        for (k, v) in &self.parameters {
            s.push_str(&format!("PARAMETER {k} {}\n", quote(v)));
        }
        for (role, content) in &self.messages {
            s.push_str(&format!(
                "MESSAGE {role} {}\n",
                triple_quoted("a few-shot message", content)?
            ));
        }
        Ok(s)
    }
}

/// A chat template in Ollama's Go template language, with the strings that end a turn.
#[derive(Debug, Clone, PartialEq)]
pub struct GoTemplate {
    pub template: String,
    /// End-of-turn strings found in the assistant's turn suffix, plus the EOS tokens.
    pub stops: Vec<String>,
}

/// Probe contents: plain words no template rewrites.
const U1: &str = "attuneprobeuserone";
const A1: &str = "attuneprobeassistantone";
const U2: &str = "attuneprobeusertwo";
const S1: &str = "attuneprobesystemone";
const S2: &str = "attuneprobesystemtwo";

fn go_literal(s: &str) -> String {
    // Text is literal in a Go template except for action delimiters.
    s.replace("{{", "{{ \"{{\" }}")
}

fn split_once_at<'a>(s: &'a str, needle: &str, what: &str) -> Result<(&'a str, &'a str)> {
    if s.matches(needle).count() != 1 {
        return Err(Error::ChatTemplate(format!(
            "cannot translate the chat template to Ollama's: {what}"
        )));
    }
    s.split_once(needle)
        .ok_or_else(|| Error::ChatTemplate(format!("cannot translate: {what}")))
}

/// Translates `tmpl` into Ollama's Go template. `eos_tokens` (the tokenizer's end tokens) and
/// `specials` (its control tokens) decide the stop strings.
pub fn translate(
    tmpl: &ChatTemplate,
    eos_tokens: &[String],
    specials: &[String],
) -> Result<GoTemplate> {
    let fail = |m: &str| {
        Error::ChatTemplate(format!(
            "cannot translate the chat template to Ollama's: {m}"
        ))
    };
    let m = |v: &[(&str, &str)]| -> Vec<Message> {
        v.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    };
    let r_u = tmpl.render(&m(&[("user", U1)]), false)?;
    let r_ua = tmpl.render(&m(&[("user", U1), ("assistant", A1)]), false)?;
    let r_uau = tmpl.render(&m(&[("user", U1), ("assistant", A1), ("user", U2)]), false)?;
    let inc_a = r_ua
        .strip_prefix(&r_u)
        .ok_or_else(|| fail("adding an assistant turn changes the text before it"))?;
    let inc_u = r_uau
        .strip_prefix(&r_ua)
        .ok_or_else(|| fail("adding a user turn changes the text before it"))?;
    let (ap, asuf) = split_once_at(inc_a, A1, "the assistant's turn")?;
    let (up, us) = split_once_at(inc_u, U2, "the user's turn")?;
    let user_turn = format!("{up}{U1}{us}");
    let first = r_u
        .strip_suffix(&user_turn)
        .ok_or_else(|| fail("the first user turn differs from later ones"))?;
    let r_ug = tmpl.render(&m(&[("user", U1)]), true)?;
    let gen = r_ug
        .strip_prefix(&r_u)
        .ok_or_else(|| fail("the generation prompt changes the text before it"))?;
    // System turns (some templates refuse them).
    let sys_first = tmpl
        .render(&m(&[("system", S1), ("user", U1)]), false)
        .ok()
        .and_then(|r| r.strip_suffix(&user_turn).map(str::to_string));
    let (sp, ss) = match &sys_first {
        Some(block) => {
            let (a, b) = split_once_at(block, S1, "the system turn")?;
            (Some(a.to_string()), b.to_string())
        }
        None => (None, String::new()),
    };
    let sys_mid = tmpl
        .render(
            &m(&[("user", U1), ("assistant", A1), ("system", S2)]),
            false,
        )
        .ok()
        .and_then(|r| r.strip_prefix(&r_ua).map(str::to_string))
        .and_then(|inc| {
            inc.split_once(S2)
                .map(|(a, b)| (a.to_string(), b.to_string()))
        });

    let mut t = String::new();
    t.push_str("{{- $last := \"\" }}{{- range $i, $_ := .Messages }}{{- $last = .Role }}");
    match &sp {
        Some(sp) => {
            let (mp, ms) = sys_mid.clone().unwrap_or((sp.clone(), ss.clone()));
            t.push_str(&format!(
                "{{{{- if eq .Role \"system\" }}}}{{{{ if eq $i 0 }}}}{}{{{{ else }}}}{}{{{{ end }}}}{{{{ .Content }}}}{{{{ if eq $i 0 }}}}{}{{{{ else }}}}{}{{{{ end }}}}{{{{- else }}}}",
                go_literal(sp),
                go_literal(&mp),
                go_literal(&ss),
                go_literal(&ms)
            ));
        }
        None => t.push_str("{{- if eq .Role \"system\" }}{{- else }}"),
    }
    t.push_str(&format!(
        "{{{{ if eq $i 0 }}}}{}{{{{ end }}}}{{{{ if eq .Role \"assistant\" }}}}{}{{{{ .Content }}}}{}{{{{ else }}}}{}{{{{ .Content }}}}{}{{{{ end }}}}{{{{- end }}}}{{{{- end }}}}",
        go_literal(first),
        go_literal(ap),
        go_literal(asuf),
        go_literal(up),
        go_literal(us)
    ));
    t.push_str(&format!(
        "{{{{- if ne $last \"assistant\" }}}}{}{{{{ end }}}}",
        go_literal(gen)
    ));
    // Stops: the special tokens in the assistant's suffix, then the EOS tokens.
    let mut stops: Vec<String> = Vec::new();
    let mut found: Vec<(usize, &String)> = specials
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| asuf.find(s.as_str()).map(|i| (i, s)))
        .collect();
    found.sort();
    for (_, s) in found {
        if !stops.contains(s) {
            stops.push(s.clone());
        }
    }
    for e in eos_tokens {
        if !e.is_empty() && !stops.contains(e) {
            stops.push(e.clone());
        }
    }
    if stops.is_empty() && !asuf.trim().is_empty() {
        stops.push(asuf.trim().to_string());
    }
    Ok(GoTemplate { template: t, stops })
}

/// Conversations on which a translated template must render exactly what the Jinja template
/// renders (generation prompt added when the last turn is not the assistant's).
pub fn probe_conversations() -> Vec<Vec<Message>> {
    let m = |v: &[(&str, &str)]| -> Vec<Message> {
        v.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    };
    vec![
        m(&[("user", "Why is the sky blue?")]),
        m(&[
            ("system", "You answer in one sentence."),
            ("user", "What is a protein?"),
        ]),
        m(&[
            ("user", "Name a prime number."),
            ("assistant", "Seven."),
            ("user", "And a larger one?\nPlease explain."),
        ]),
        m(&[
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello! How can I help?"),
            ("user", "Tell me a joke."),
        ]),
        m(&[("user", "Finish this: once upon"), ("assistant", "a time")]),
    ]
}

/// Renders every probe conversation through `jinja` and `go`; the first difference, if any.
pub fn compare_templates(jinja: &ChatTemplate, go: &gotmpl::Template) -> Result<Option<String>> {
    for conv in probe_conversations() {
        let gen = conv.last().is_some_and(|m| m.role != "assistant");
        let want = match jinja.render(&conv, gen) {
            Ok(w) => w,
            // A conversation the Jinja template refuses (e.g. no system role) is not compared.
            Err(_) => continue,
        };
        let got = gotmpl::render_ollama(go, &conv)?;
        if got != want {
            let at = want
                .char_indices()
                .zip(got.chars())
                .find(|((_, a), b)| a != b)
                .map(|((i, _), _)| i)
                .unwrap_or(want.len().min(got.len()));
            let roles: Vec<&str> = conv.iter().map(|m| m.role.as_str()).collect();
            return Ok(Some(format!(
                "conversation [{}] differs at byte {at}: Jinja renders {:?}, the Go template {:?}",
                roles.join(", "),
                &want[at.min(want.len())..(at + 40).min(want.len())],
                &got[at.min(got.len())..(at + 40).min(got.len())],
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    fn check_translation(src: &str, bos: Option<&str>, eos: &str, specials: &[&str]) -> GoTemplate {
        let jinja =
            ChatTemplate::new(src, bos.map(String::from), Some(eos.to_string())).expect("jinja");
        let specials: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
        let go = translate(&jinja, &[eos.to_string()], &specials).expect("translate");
        let parsed = gotmpl::Template::parse(&go.template).expect("go parse");
        assert_eq!(
            compare_templates(&jinja, &parsed).expect("compare"),
            None,
            "{}",
            go.template
        );
        go
    }

    #[test]
    fn smollm2_template_translates_and_renders_the_same() {
        let go = check_translation(
            SMOLLM2,
            Some("<|im_start|>"),
            "<|im_end|>",
            &["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        );
        assert_eq!(go.stops, vec!["<|im_end|>".to_string()]);
        assert!(go
            .template
            .contains("You are a helpful AI assistant named SmolLM"));
    }

    #[test]
    fn llama3_template_with_bos_translates() {
        let go = check_translation(
            LLAMA3,
            Some("<|begin_of_text|>"),
            "<|eot_id|>",
            &[
                "<|begin_of_text|>",
                "<|eot_id|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
            ],
        );
        assert_eq!(go.stops, vec!["<|eot_id|>".to_string()]);
    }

    #[test]
    fn a_template_that_changes_earlier_text_is_refused() {
        // The last user message is rendered differently from earlier ones.
        let src = "{% for m in messages %}{% if loop.last %}[LAST]{{ m['content'] }}{% else %}{{ m['content'] }}|{% endif %}{% endfor %}";
        let jinja = ChatTemplate::new(src, None, None).expect("jinja");
        assert!(translate(&jinja, &[], &[]).is_err());
    }

    #[test]
    fn modelfile_round_trips_through_ollamas_parser() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("m.gguf"), b"GGUF").expect("write");
        let mf = Modelfile {
            from: "./m.gguf".into(),
            adapter: None,
            template: "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n".into(),
            system: Some("You are \"careful\".\nTwo lines.".into()),
            messages: vec![("user".into(), "Q?".into()), ("assistant".into(), "A.".into())],
            parameters: vec![
                ("stop".into(), "<|im_end|>".into()),
                ("temperature".into(), "0.7".into()),
                ("num_ctx".into(), "8192".into()),
            ],
            comment: "written by a test".into(),
        };
        let text = mf.render().expect("render");
        let info = check(&text, dir.path()).expect("check");
        assert_eq!(info.from, "./m.gguf");
        assert_eq!(info.template.as_deref(), Some(mf.template.as_str()));
        assert_eq!(info.system, mf.system);
        assert_eq!(info.messages, mf.messages);
        assert_eq!(info.parameters, mf.parameters);
    }

    #[test]
    fn parser_errors_match_ollamas() {
        let e = parse("FROM x\nFOO bar\n").expect_err("bad command");
        assert!(e.message.starts_with("command must be one of"), "{e}");
        let e = parse("PARAMETER stop\n").expect_err("eof");
        assert!(e.message.contains("unexpected EOF"), "{e}");
        let e = parse("TEMPLATE \"\"\"never closed\n").expect_err("eof");
        assert!(e.message.contains("unexpected EOF"), "{e}");
        assert_eq!(
            parse("# only a comment\n").expect_err("no from").message,
            "no FROM line"
        );
        let e = parse("FROM x\nMESSAGE robot hi\n").expect_err("role");
        assert!(e.message.contains("message role"), "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        let e = check("FROM x\nPARAMETER temperature warm\n", dir.path()).expect_err("float");
        assert!(e.to_string().contains("invalid float value warm"), "{e}");
        let e = check("FROM x\nPARAMETER colour red\n", dir.path()).expect_err("unknown");
        assert!(e.to_string().contains("unknown parameter 'colour'"), "{e}");
        // Ollama's own quoting rules, from parser_test.go.
        let c = parse("FROM foo\nSYSTEM \"\"\"  multi\nline  \"\"\"\nPARAMETER stop \"\\n\"\n")
            .expect("parse");
        assert_eq!(c[1].args, "  multi\nline  ");
    }
}
