//! Versioned prompt templates: a system prompt, few-shot turns and a user wrapper, with
//! `{{name}}` placeholders.
//!
//! Placeholders (`{{ name }}`: spaces inside the braces are ignored; a name is letters,
//! digits, `_`, `-` or `.`) in the system prompt, the examples and the wrapper are filled
//! from the template's default `variables`, overridden by the values given when it is
//! used. A placeholder without a (non-empty) value stays as written and is reported as
//! missing. `{{input}}` in the wrapper stands for the user's message. Values are inserted
//! as they are: a value holding `{{x}}` is not expanded again.
//!
//! Saving a template whose content did not change adds no version; renaming alone
//! renames every version (the name belongs to the template).

use std::collections::{BTreeMap, BTreeSet};

use attune_protocol::{
    ChatMessage, PromptTemplate, TemplateDraft, TemplatePreview, TemplateRecord,
};

use crate::clock::now_rfc3339;
use crate::error::EngineError;
use crate::store::{TemplateContent, TemplateVersionRow};
use crate::Engine;

/// The placeholder the user's message fills.
pub(crate) const INPUT: &str = "input";
/// Longest template name, in characters.
const MAX_NAME_CHARS: usize = 80;
/// Longest system prompt, example, wrapper or variable value, in characters.
const MAX_TEXT_CHARS: usize = 64 * 1024;
/// Longest version note, in characters.
const MAX_NOTE_CHARS: usize = 1000;
/// Longest variable name, in characters.
const MAX_VARIABLE_CHARS: usize = 64;

/// A placeholder name: letters, digits, `_`, `-`, `.`; at most 64 characters.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars().count() <= MAX_VARIABLE_CHARS
        && s.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// One piece of a template text: literal text or a placeholder.
#[derive(Debug, PartialEq)]
enum Piece<'a> {
    Text(&'a str),
    /// The placeholder as written, and its (trimmed) name.
    Var {
        raw: &'a str,
        name: &'a str,
    },
}

/// Splits `text` into literal text and `{{name}}` placeholders. Braces around something
/// that is not a name stay literal text.
fn pieces(text: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut literal_start = 0;
    let mut pos = 0;
    while let Some(open) = text[pos..].find("{{").map(|i| pos + i) {
        let Some(close) = text[open + 2..].find("}}").map(|i| open + 2 + i) else {
            break;
        };
        let name = text[open + 2..close].trim();
        if is_name(name) {
            if open > literal_start {
                out.push(Piece::Text(&text[literal_start..open]));
            }
            out.push(Piece::Var {
                raw: &text[open..close + 2],
                name,
            });
            pos = close + 2;
            literal_start = pos;
        } else {
            pos = open + 2;
        }
    }
    if literal_start < text.len() {
        out.push(Piece::Text(&text[literal_start..]));
    }
    out
}

/// Whether `text` holds the `{{input}}` placeholder.
fn has_input(text: &str) -> bool {
    pieces(text)
        .iter()
        .any(|p| matches!(p, Piece::Var { name, .. } if *name == INPUT))
}

/// Fills placeholders, recording the variables used and those left without a value.
struct Filler<'a> {
    values: &'a BTreeMap<String, String>,
    used: BTreeSet<String>,
    missing: BTreeSet<String>,
}

impl<'a> Filler<'a> {
    fn new(values: &'a BTreeMap<String, String>) -> Self {
        Filler {
            values,
            used: BTreeSet::new(),
            missing: BTreeSet::new(),
        }
    }

    /// `text` with its placeholders filled; `{{input}}` becomes `input` when given and
    /// stays as written (unreported) otherwise.
    fn fill(&mut self, text: &str, input: Option<&str>) -> String {
        let mut out = String::with_capacity(text.len());
        for piece in pieces(text) {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var { raw, name } if name == INPUT => out.push_str(input.unwrap_or(raw)),
                Piece::Var { raw, name } => {
                    self.used.insert(name.to_string());
                    match self.values.get(name).filter(|v| !v.is_empty()) {
                        Some(v) => out.push_str(v),
                        None => {
                            self.missing.insert(name.to_string());
                            out.push_str(raw);
                        }
                    }
                }
            }
        }
        out
    }
}

/// A template applied to a conversation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Expanded {
    /// System?, few-shot turns, then the conversation with each user turn wrapped.
    pub messages: Vec<ChatMessage>,
    /// How many leading messages precede the conversation's turns (the system prompt and
    /// the few-shot turns), as evaluation's loss mask counts them.
    pub prefix: usize,
    /// Every variable the template uses (`input` excluded), sorted.
    pub variables: Vec<String>,
    /// Those without a value, sorted.
    pub missing: Vec<String>,
}

/// Applies `t` to `conversation`: the template's system prompt (replacing the
/// conversation's own; with none, the conversation's is kept), the few-shot turns, then
/// the conversation with every user turn wrapped by `t.user`.
pub(crate) fn expand(t: &PromptTemplate, conversation: &[ChatMessage]) -> Expanded {
    let mut filler = Filler::new(&t.values);
    let mut messages = Vec::with_capacity(t.examples.len() + conversation.len() + 1);
    let own_system = conversation.first().filter(|m| m.role == "system");
    match (&t.system, own_system) {
        (Some(s), _) => messages.push(msg("system", filler.fill(s, None))),
        (None, Some(m)) => messages.push(m.clone()),
        (None, None) => {}
    }
    for e in &t.examples {
        messages.push(msg(&e.role, filler.fill(&e.content, None)));
    }
    let prefix = messages.len();
    // The wrapper's own variables are reported even when no user turn uses it.
    let wrapper = t.user.as_deref().map(|u| (u, filler.fill(u, None)));
    for m in conversation.iter().skip(usize::from(own_system.is_some())) {
        match (&wrapper, m.role.as_str()) {
            (Some((raw, _)), "user") => {
                messages.push(msg("user", filler.fill(raw, Some(&m.content))))
            }
            _ => messages.push(m.clone()),
        }
    }
    Expanded {
        messages,
        prefix,
        variables: filler.used.into_iter().collect(),
        missing: filler.missing.into_iter().collect(),
    }
}

/// [`expand`] as (turns, how many lead the conversation's own turns): evaluation scores
/// only what follows.
pub(crate) fn apply_template(
    t: &PromptTemplate,
    conversation: &[ChatMessage],
) -> (Vec<ChatMessage>, usize) {
    let e = expand(t, conversation);
    (e.messages, e.prefix)
}

/// Checks a template's shape: examples are user / assistant pairs with content, the
/// wrapper holds `{{input}}`, texts are within bounds. Errors name the template.
pub(crate) fn check_template(t: &PromptTemplate) -> Result<(), EngineError> {
    let name = if t.name.trim().is_empty() {
        "(unnamed)"
    } else {
        t.name.trim()
    };
    let bad = |what: String| EngineError::InvalidInput(format!("template '{name}': {what}"));
    if let Some(s) = &t.system {
        if s.chars().count() > MAX_TEXT_CHARS {
            return Err(bad(format!(
                "the system prompt is longer than {MAX_TEXT_CHARS} characters"
            )));
        }
    }
    for (i, e) in t.examples.iter().enumerate() {
        let want = if i % 2 == 0 { "user" } else { "assistant" };
        if e.role != want {
            return Err(bad(format!(
                "example turn {} is '{}', expected '{want}' (examples alternate user / assistant, \
                 starting with user)",
                i + 1,
                e.role
            )));
        }
        if e.content.trim().is_empty() {
            return Err(bad(format!("example turn {} ({want}) is empty", i + 1)));
        }
        if e.content.chars().count() > MAX_TEXT_CHARS {
            return Err(bad(format!(
                "example turn {} is longer than {MAX_TEXT_CHARS} characters",
                i + 1
            )));
        }
    }
    if !t.examples.len().is_multiple_of(2) {
        return Err(bad(format!(
            "example turn {} (user) has no assistant answer; examples are user / assistant pairs",
            t.examples.len()
        )));
    }
    if let Some(u) = &t.user {
        if !has_input(u) {
            return Err(bad(
                "the user message wrapper must contain {{input}} (where the message goes)"
                    .to_string(),
            ));
        }
        if u.chars().count() > MAX_TEXT_CHARS {
            return Err(bad(format!(
                "the user message wrapper is longer than {MAX_TEXT_CHARS} characters"
            )));
        }
    }
    for (k, v) in &t.values {
        if !is_name(k) {
            return Err(bad(format!(
                "variable name '{k}' is not valid (1 to {MAX_VARIABLE_CHARS} letters, digits, \
                 '_', '-' or '.')"
            )));
        }
        if k == INPUT {
            return Err(bad(
                "'input' is reserved for the user's message; rename that variable".to_string(),
            ));
        }
        if v.chars().count() > MAX_TEXT_CHARS {
            return Err(bad(format!(
                "the value of variable '{k}' is longer than {MAX_TEXT_CHARS} characters"
            )));
        }
    }
    Ok(())
}

/// A draft with blank optional texts as None and the name and note trimmed.
fn normalized(d: &TemplateDraft) -> TemplateDraft {
    let blank_none = |s: &Option<String>| s.clone().filter(|s| !s.trim().is_empty());
    TemplateDraft {
        id: d.id,
        name: d.name.trim().to_string(),
        system: blank_none(&d.system),
        examples: d.examples.clone(),
        user: blank_none(&d.user),
        variables: d.variables.clone(),
        note: d
            .note
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string),
    }
}

/// The draft as a template, its default variables overridden by `values`.
/// `draft` with `values`, checked, around one user `message`: what both previews show.
fn expand_draft(
    draft: &TemplateDraft,
    message: &str,
    values: &BTreeMap<String, String>,
) -> Result<Expanded, EngineError> {
    let t = draft_template(&normalized(draft), values);
    check_template(&t)?;
    Ok(expand(&t, &[msg("user", message.to_string())]))
}

fn draft_template(d: &TemplateDraft, values: &BTreeMap<String, String>) -> PromptTemplate {
    let mut merged = d.variables.clone();
    merged.extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
    PromptTemplate {
        name: d.name.clone(),
        system: d.system.clone(),
        examples: d.examples.clone(),
        user: d.user.clone(),
        values: merged,
    }
}

/// A stored template version as a [`PromptTemplate`] with its defaults overridden by
/// `values`.
pub(crate) fn record_template(
    r: &TemplateRecord,
    values: &BTreeMap<String, String>,
) -> PromptTemplate {
    let mut merged = r.variables.clone();
    merged.extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
    PromptTemplate {
        name: r.name.clone(),
        system: r.system.clone(),
        examples: r.examples.clone(),
        user: r.user.clone(),
        values: merged,
    }
}

fn msg(role: &str, content: String) -> ChatMessage {
    ChatMessage {
        role: role.to_string(),
        content,
    }
}

fn content_of(d: &TemplateDraft) -> TemplateContent {
    // Serializing strings and string maps cannot fail.
    TemplateContent {
        system: d.system.clone(),
        examples_json: serde_json::to_string(&d.examples).unwrap_or_else(|_| "[]".into()),
        user_wrapper: d.user.clone(),
        variables_json: serde_json::to_string(&d.variables).unwrap_or_else(|_| "{}".into()),
        note: d.note.clone(),
    }
}

impl Engine {
    fn template_record(&self, row: &TemplateVersionRow) -> Result<TemplateRecord, EngineError> {
        let corrupt = |what: &str, e: serde_json::Error| {
            EngineError::db(
                self.store.path(),
                format!(
                    "template '{}' (id {}) version {}: unreadable {what}: {e}",
                    row.name, row.template_id, row.version
                ),
            )
        };
        Ok(TemplateRecord {
            id: row.template_id,
            name: row.name.clone(),
            version: u32::try_from(row.version).unwrap_or(u32::MAX),
            versions: u32::try_from(row.versions).unwrap_or(u32::MAX),
            system: row.system.clone(),
            examples: serde_json::from_str(&row.examples_json)
                .map_err(|e| corrupt("examples", e))?,
            user: row.user_wrapper.clone(),
            variables: serde_json::from_str(&row.variables_json)
                .map_err(|e| corrupt("variables", e))?,
            note: row.note.clone(),
            created_at: row.created_at.clone(),
        })
    }

    fn template_not_found(id: i64, version: Option<u32>) -> EngineError {
        EngineError::NotFound {
            what: "template",
            id: match version {
                Some(v) => format!("{id} (version {v})"),
                None => id.to_string(),
            },
        }
    }

    /// Every template at its newest version, by name.
    pub fn list_templates(&self) -> Result<Vec<TemplateRecord>, EngineError> {
        self.store
            .list_templates()?
            .iter()
            .map(|r| self.template_record(r))
            .collect()
    }

    /// Every version of template `id`, newest first.
    pub fn template_versions(&self, id: i64) -> Result<Vec<TemplateRecord>, EngineError> {
        let rows = self.store.template_versions(id)?;
        if rows.is_empty() {
            return Err(Self::template_not_found(id, None));
        }
        rows.iter().map(|r| self.template_record(r)).collect()
    }

    /// Template `id` at `version` (None: its newest).
    pub fn get_template(
        &self,
        id: i64,
        version: Option<u32>,
    ) -> Result<TemplateRecord, EngineError> {
        let row = self
            .store
            .template_version(id, version.map(i64::from))?
            .ok_or_else(|| Self::template_not_found(id, version))?;
        self.template_record(&row)
    }

    /// Creates a template (`draft.id` None; the name must be free) or adds a version to
    /// one (only when its content changed; a new name renames it). Returns the version
    /// now newest.
    pub fn save_template(&self, draft: &TemplateDraft) -> Result<TemplateRecord, EngineError> {
        let d = normalized(draft);
        if d.name.is_empty() {
            return Err(EngineError::InvalidInput(
                "template name: give the template a name".to_string(),
            ));
        }
        if d.name.chars().count() > MAX_NAME_CHARS || d.name.chars().any(char::is_control) {
            return Err(EngineError::InvalidInput(format!(
                "template name '{}': at most {MAX_NAME_CHARS} characters, no control characters",
                d.name
            )));
        }
        if d.note
            .as_ref()
            .is_some_and(|n| n.chars().count() > MAX_NOTE_CHARS)
        {
            return Err(EngineError::InvalidInput(format!(
                "template '{}': the version note is longer than {MAX_NOTE_CHARS} characters",
                d.name
            )));
        }
        check_template(&draft_template(&d, &BTreeMap::new()))?;
        let content = content_of(&d);
        let now = now_rfc3339();
        let row = match d.id {
            None => self.store.insert_template(&d.name, &content, &now)?,
            Some(id) => {
                let current = self
                    .store
                    .template_version(id, None)?
                    .ok_or_else(|| Self::template_not_found(id, None))?;
                let changed = current.system != content.system
                    || current.examples_json != content.examples_json
                    || current.user_wrapper != content.user_wrapper
                    || current.variables_json != content.variables_json;
                self.store
                    .update_template(id, &d.name, changed.then_some(&content), &now)?
                    .ok_or_else(|| Self::template_not_found(id, None))?
            }
        };
        self.template_record(&row)
    }

    /// Removes a template and all its versions. Arenas that compared it keep their
    /// stored answers and labels.
    /// A template's newest version by id, else by exact name, else by a name unique up
    /// to ASCII case.
    pub fn find_template(&self, id_or_name: &str) -> Result<TemplateRecord, EngineError> {
        let key = id_or_name.trim();
        let all = self.list_templates()?;
        if let Ok(id) = key.parse::<i64>() {
            if let Some(t) = all.iter().find(|t| t.id == id) {
                return Ok(t.clone());
            }
        }
        if let Some(t) = all.iter().find(|t| t.name == key) {
            return Ok(t.clone());
        }
        let matches: Vec<&TemplateRecord> = all
            .iter()
            .filter(|t| t.name.eq_ignore_ascii_case(key))
            .collect();
        match matches.as_slice() {
            [t] => Ok((*t).clone()),
            _ => Err(EngineError::NotFound {
                what: "template",
                id: key.to_string(),
            }),
        }
    }

    pub fn remove_template(&self, id: i64) -> Result<(), EngineError> {
        if !self.store.delete_template(id)? {
            return Err(Self::template_not_found(id, None));
        }
        Ok(())
    }

    /// The exact text `model_id` receives for `draft` and one user `message`: the
    /// template's turns and the wrapped message through the model's chat template
    /// (generation prompt included), with its token count and the variables it uses.
    pub fn preview_template(
        &self,
        model_id: i64,
        draft: &TemplateDraft,
        message: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<TemplatePreview, EngineError> {
        let expanded = expand_draft(draft, message, values)?;
        let (text, tokens) = self.render_for_model(model_id, &expanded.messages)?;
        Ok(TemplatePreview {
            text,
            tokens: tokens as u64,
            variables: expanded.variables,
            missing: expanded.missing,
            messages: expanded.messages,
        })
    }

    /// What an API model receives for `draft` and `message`: the request body Attune sends
    /// to the endpoint's `/chat/completions` (with the app's default sampling settings),
    /// pretty-printed. An API applies its own chat template, so there is no token count
    /// (`tokens` is 0) and no text beyond the messages.
    pub fn preview_template_for_endpoint(
        &self,
        endpoint: &attune_protocol::EndpointModel,
        draft: &TemplateDraft,
        message: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<TemplatePreview, EngineError> {
        let expanded = expand_draft(draft, message, values)?;
        let body = self.endpoint_request_preview(endpoint, &expanded.messages)?;
        Ok(TemplatePreview {
            text: body,
            tokens: 0,
            variables: expanded.variables,
            missing: expanded.missing,
            messages: expanded.messages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: &str, content: &str) -> ChatMessage {
        msg(role, content.to_string())
    }

    fn engine() -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(&dir.path().join("data")).expect("open engine");
        (dir, engine)
    }

    fn draft(name: &str) -> TemplateDraft {
        TemplateDraft {
            id: None,
            name: name.into(),
            system: Some("You are a {{ role }} for {{audience}}.".into()),
            examples: vec![
                m("user", "Q: {{topic}}?"),
                m("assistant", "A short answer."),
            ],
            user: Some("Question ({{ topic }}): {{ input }}".into()),
            variables: BTreeMap::from([("role".into(), "clinician".into())]),
            note: None,
        }
    }

    #[test]
    fn templates_placeholders_are_found_with_inner_spaces_and_odd_braces_stay_text() {
        assert_eq!(
            pieces("a {{ x }} b {{y}}{{ not a name }}{{}} {{z"),
            vec![
                Piece::Text("a "),
                Piece::Var {
                    raw: "{{ x }}",
                    name: "x"
                },
                Piece::Text(" b "),
                Piece::Var {
                    raw: "{{y}}",
                    name: "y"
                },
                Piece::Text("{{ not a name }}{{}} {{z"),
            ]
        );
        assert!(has_input("say {{input}}"));
        assert!(has_input("say {{ input }}"));
        assert!(!has_input("say {input}"));
    }

    #[test]
    fn templates_expand_fills_values_wraps_user_turns_and_reports_missing() {
        let t = PromptTemplate {
            name: "t".into(),
            system: Some("Be a {{role}} for {{audience}}.".into()),
            examples: vec![m("user", "About {{topic}}"), m("assistant", "Sure.")],
            user: Some("[{{topic}}] {{input}}".into()),
            values: BTreeMap::from([
                ("role".into(), "nurse".into()),
                ("topic".into(), "sleep".into()),
                ("audience".into(), String::new()),
            ]),
        };
        let conv = [
            m("system", "own system"),
            m("user", "hi {{role}}"),
            m("assistant", "hello"),
            m("user", "bye"),
        ];
        let e = expand(&t, &conv);
        assert_eq!(
            e.messages,
            vec![
                m("system", "Be a nurse for {{audience}}."),
                m("user", "About sleep"),
                m("assistant", "Sure."),
                // The message itself is not expanded.
                m("user", "[sleep] hi {{role}}"),
                m("assistant", "hello"),
                m("user", "[sleep] bye"),
            ]
        );
        assert_eq!(e.prefix, 3);
        assert_eq!(e.variables, ["audience", "role", "topic"]);
        assert_eq!(e.missing, ["audience"]);

        // No template system: the conversation's own is kept and is not the template's.
        let bare = PromptTemplate {
            examples: vec![m("user", "x"), m("assistant", "y")],
            ..Default::default()
        };
        let (turns, prefix) = apply_template(&bare, &conv[..2]);
        assert_eq!(
            turns,
            vec![
                m("system", "own system"),
                m("user", "x"),
                m("assistant", "y"),
                m("user", "hi {{role}}")
            ]
        );
        assert_eq!(prefix, 3);
        assert_eq!(
            apply_template(&bare, &[m("user", "q")]).0,
            vec![m("user", "x"), m("assistant", "y"), m("user", "q")]
        );
    }

    #[test]
    fn templates_check_refuses_bad_shapes_with_clear_messages() {
        let mut t = PromptTemplate {
            name: "t".into(),
            examples: vec![m("assistant", "x")],
            ..Default::default()
        };
        let err = check_template(&t).expect_err("assistant first");
        assert!(err.to_string().contains("expected 'user'"), "{err}");
        t.examples = vec![m("user", "x")];
        let err = check_template(&t).expect_err("odd");
        assert!(err.to_string().contains("no assistant answer"), "{err}");
        t.examples = vec![];
        t.user = Some("no placeholder".into());
        let err = check_template(&t).expect_err("wrapper");
        assert!(err.to_string().contains("{{input}}"), "{err}");
        t.user = Some("{{input}}".into());
        t.values = BTreeMap::from([("bad name".into(), "v".into())]);
        let err = check_template(&t).expect_err("variable");
        assert!(err.to_string().contains("bad name"), "{err}");
        t.values = BTreeMap::new();
        check_template(&t).expect("valid");
    }

    #[test]
    fn templates_save_versions_only_on_change_rename_and_remove() {
        let (_dir, e) = engine();
        let v1 = e.save_template(&draft("  Clinician ")).expect("create");
        assert_eq!(
            (v1.name.as_str(), v1.version, v1.versions),
            ("Clinician", 1, 1)
        );
        assert_eq!(
            v1.variables.get("role").map(String::as_str),
            Some("clinician")
        );

        // The name must be free and non-empty.
        let err = e.save_template(&draft("Clinician")).expect_err("taken");
        assert_eq!(err.code(), "already_exists");
        let err = e.save_template(&draft("  ")).expect_err("empty");
        assert_eq!(err.code(), "invalid_input");

        // Saving unchanged content adds nothing.
        let mut d = draft("Clinician");
        d.id = Some(v1.id);
        d.note = Some("no change".into());
        let same = e.save_template(&d).expect("unchanged");
        assert_eq!((same.version, same.versions), (1, 1));

        // A change adds version 2; a rename alone renames every version.
        d.system = Some("You are a {{role}}.".into());
        d.note = Some("shorter system".into());
        let v2 = e.save_template(&d).expect("v2");
        assert_eq!((v2.version, v2.versions), (2, 2));
        assert_eq!(v2.note.as_deref(), Some("shorter system"));
        d.name = "Doctor".into();
        let renamed = e.save_template(&d).expect("rename");
        assert_eq!((renamed.name.as_str(), renamed.version), ("Doctor", 2));
        let all = e.template_versions(v1.id).expect("versions");
        assert_eq!(
            all.iter()
                .map(|r| (r.version, r.name.as_str()))
                .collect::<Vec<_>>(),
            [(2, "Doctor"), (1, "Doctor")]
        );
        assert_eq!(
            e.get_template(v1.id, Some(1)).expect("v1").system,
            v1.system
        );
        let err = e.get_template(v1.id, Some(9)).expect_err("no v9");
        assert!(err.to_string().contains("version 9"), "{err}");

        // A second template is listed by name, at its newest version.
        e.save_template(&draft("anatomy")).expect("second");
        let names: Vec<_> = e
            .list_templates()
            .expect("list")
            .into_iter()
            .map(|r| (r.name, r.version))
            .collect();
        assert_eq!(
            names,
            [("anatomy".to_string(), 1), ("Doctor".to_string(), 2)]
        );

        // Bad drafts are refused and write nothing.
        let mut bad = draft("broken");
        bad.user = Some("no input here".into());
        assert!(e.save_template(&bad).is_err());
        assert_eq!(e.list_templates().expect("list").len(), 2);

        e.remove_template(v1.id).expect("remove");
        assert_eq!(
            e.remove_template(v1.id).expect_err("gone").code(),
            "not_found"
        );
        assert_eq!(
            e.template_versions(v1.id).expect_err("gone").code(),
            "not_found"
        );
        assert_eq!(e.list_templates().expect("list").len(), 1);
    }
}
