//! The library as OpenAI model ids: every base model, adapter and prompt template, by
//! its library name.
//!
//! - a base model answers as it is;
//! - an adapter loads its base with the adapter;
//! - a template is answered by the library's default model (its first), with the
//!   template's system prompt, examples and user wrapper; `TEMPLATE@MODEL` picks
//!   another base model.
//!
//! Names are unique within a kind, not across kinds: where an adapter or a template has
//! the name of something listed before it, it is listed (and must be asked for) as
//! `adapter:NAME` or `template:NAME`. The prefixes `model:`, `adapter:` and `template:`
//! are accepted for any id.

use std::collections::{BTreeMap, HashSet};

use attune_engine::{unix_from_rfc3339, Engine, EngineError};
use attune_protocol::ChatTarget;
use serde::Serialize;

/// One model id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: String,
    /// Attune's own description, beside OpenAI's fields.
    pub attune: Details,
    #[serde(skip)]
    pub target: ChatTarget,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Details {
    /// "model", "adapter" or "template".
    pub kind: &'static str,
    /// The base model that answers (adapters, templates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// LoRA, prompt (soft prompt) or full, for adapters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

fn created(at: &str) -> i64 {
    unix_from_rfc3339(at).unwrap_or(0)
}

/// Every id of the library, models first, then adapters, then templates.
pub fn list(engine: &Engine) -> Result<Vec<Entry>, EngineError> {
    let models = engine.list_models()?;
    let mut taken: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    let unique = |name: &str, kind: &str, taken: &mut HashSet<String>| {
        let id = if taken.contains(name) {
            format!("{kind}:{name}")
        } else {
            name.to_string()
        };
        taken.insert(id.clone());
        id
    };
    for m in &models {
        out.push(Entry {
            id: unique(&m.name, "model", &mut taken),
            object: "model",
            created: created(&m.added_at),
            owned_by: "attune".into(),
            attune: Details {
                kind: "model",
                base: None,
                method: None,
            },
            target: ChatTarget::Base { model_id: m.id },
        });
    }
    for a in engine.list_adapters()? {
        out.push(Entry {
            id: unique(&a.name, "adapter", &mut taken),
            object: "model",
            created: created(&a.created_at),
            owned_by: "attune".into(),
            attune: Details {
                kind: "adapter",
                base: Some(a.base_model.clone()),
                method: Some(a.kind.as_str().to_string()),
            },
            target: ChatTarget::Adapter { adapter_id: a.id },
        });
    }
    if let Some(default) = models.first() {
        for t in engine.list_templates()? {
            out.push(Entry {
                id: unique(&t.name, "template", &mut taken),
                object: "model",
                created: created(&t.created_at),
                owned_by: "attune".into(),
                attune: Details {
                    kind: "template",
                    base: Some(default.name.clone()),
                    method: None,
                },
                target: ChatTarget::Template {
                    model_id: default.id,
                    template_id: t.id,
                    version: None,
                    values: BTreeMap::new(),
                    endpoint: None,
                },
            });
        }
    }
    Ok(out)
}

/// The entry for `id`, or `None` when the library has no such model.
pub fn resolve(engine: &Engine, id: &str) -> Result<Option<Entry>, EngineError> {
    let all = list(engine)?;
    if let Some(e) = all.iter().find(|e| e.id == id) {
        return Ok(Some(e.clone()));
    }
    // An explicit kind prefix on a name listed without it.
    for kind in ["model", "adapter", "template"] {
        if let Some(name) = id.strip_prefix(kind).and_then(|r| r.strip_prefix(':')) {
            return Ok(all
                .iter()
                .find(|e| e.attune.kind == kind && (e.id == name || e.id == id))
                .cloned());
        }
    }
    // TEMPLATE@MODEL: a template answered by another base model.
    if let Some((template, model)) = id.rsplit_once('@') {
        let t = all.iter().find(|e| {
            e.attune.kind == "template"
                && (e.id == template || e.id == format!("template:{template}"))
        });
        let m = all.iter().find(|e| {
            e.attune.kind == "model" && (e.id == model || e.id == format!("model:{model}"))
        });
        if let (Some(t), Some(m)) = (t, m) {
            if let (
                ChatTarget::Template {
                    template_id,
                    version,
                    values,
                    ..
                },
                ChatTarget::Base { model_id },
            ) = (&t.target, &m.target)
            {
                let mut entry = t.clone();
                entry.id = id.to_string();
                entry.attune.base = Some(m.id.clone());
                entry.target = ChatTarget::Template {
                    model_id: *model_id,
                    template_id: *template_id,
                    version: *version,
                    values: values.clone(),
                    endpoint: None,
                };
                return Ok(Some(entry));
            }
        }
    }
    Ok(None)
}
