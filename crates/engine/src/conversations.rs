//! Saved playground conversations: every pane (its target, label and turns) and the
//! sampling settings, stored as JSON in the `conversations` table.

use attune_protocol::{Conversation, ConversationPane, ConversationSummary, SamplingParams};

use crate::clock::now_rfc3339;
use crate::error::EngineError;
use crate::store::ConversationRow;
use crate::Engine;

/// Longest title, in characters; a longer one is cut.
const MAX_TITLE_CHARS: usize = 200;
/// Length of a title taken from the first user message, in characters.
const AUTO_TITLE_CHARS: usize = 60;
/// Most panes in one conversation.
const MAX_PANES: usize = 8;

/// The first user message of the first pane that has one, on one line, cut to 60
/// characters (an ellipsis marks the cut).
fn auto_title(panes: &[ConversationPane]) -> String {
    let first = panes
        .iter()
        .flat_map(|p| p.messages.iter())
        .find(|m| m.role == "user" && !m.content.trim().is_empty());
    let Some(m) = first else {
        return "Untitled conversation".to_string();
    };
    let one_line = m.content.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= AUTO_TITLE_CHARS {
        one_line
    } else {
        let cut: String = one_line.chars().take(AUTO_TITLE_CHARS - 1).collect();
        format!("{}…", cut.trim_end())
    }
}

fn check(c: &Conversation) -> Result<(), EngineError> {
    if c.panes.is_empty() {
        return Err(EngineError::InvalidInput(
            "conversation: it has no panes to save".to_string(),
        ));
    }
    if c.panes.len() > MAX_PANES {
        return Err(EngineError::InvalidInput(format!(
            "conversation: {} panes, at most {MAX_PANES}",
            c.panes.len()
        )));
    }
    for (p, pane) in c.panes.iter().enumerate() {
        for (i, m) in pane.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(EngineError::InvalidInput(format!(
                    "conversation pane {} ('{}'), message {}: role '{}' is not system, user or \
                     assistant",
                    p + 1,
                    pane.label,
                    i + 1,
                    m.role
                )));
            }
        }
    }
    Ok(())
}

impl Engine {
    fn conversation(&self, row: &ConversationRow) -> Result<Conversation, EngineError> {
        let corrupt = |what: &str, e: serde_json::Error| {
            EngineError::db(
                self.store.path(),
                format!("conversation id {}: unreadable {what}: {e}", row.id),
            )
        };
        Ok(Conversation {
            id: Some(row.id),
            title: row.title.clone(),
            panes: serde_json::from_str(&row.panes_json).map_err(|e| corrupt("panes", e))?,
            params: row
                .params_json
                .as_deref()
                .map(serde_json::from_str::<SamplingParams>)
                .transpose()
                .map_err(|e| corrupt("sampling settings", e))?,
            created_at: row.created_at.clone(),
            updated_at: row.updated_at.clone(),
        })
    }

    fn conversation_not_found(id: i64) -> EngineError {
        EngineError::NotFound {
            what: "conversation",
            id: id.to_string(),
        }
    }

    /// Saves a conversation: inserted when `id` is None, else replaces that one (keeping
    /// its creation time). A blank title becomes the first user message (60 characters
    /// at most). Returns it as stored.
    pub fn save_conversation(&self, c: &Conversation) -> Result<Conversation, EngineError> {
        check(c)?;
        let title = c.title.split_whitespace().collect::<Vec<_>>().join(" ");
        let title = if title.is_empty() {
            auto_title(&c.panes)
        } else {
            title.chars().take(MAX_TITLE_CHARS).collect()
        };
        // Serializing protocol types made of strings and numbers cannot fail.
        let panes_json = serde_json::to_string(&c.panes).map_err(|e| {
            EngineError::InvalidInput(format!("conversation '{title}': panes: {e}"))
        })?;
        let params_json = c
            .params
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| {
                EngineError::InvalidInput(format!("conversation '{title}': settings: {e}"))
            })?;
        let now = now_rfc3339();
        let row = ConversationRow {
            id: c.id.unwrap_or(0),
            title,
            panes_json,
            params_json,
            created_at: now.clone(),
            updated_at: now,
        };
        let stored = match c.id {
            None => self.store.insert_conversation(&row)?,
            Some(id) => self
                .store
                .update_conversation(&row)?
                .ok_or_else(|| Self::conversation_not_found(id))?,
        };
        self.conversation(&stored)
    }

    /// Every saved conversation, most recently updated first.
    pub fn list_conversations(&self) -> Result<Vec<ConversationSummary>, EngineError> {
        self.store
            .list_conversations()?
            .iter()
            .map(|row| {
                let c = self.conversation(row)?;
                Ok(ConversationSummary {
                    id: row.id,
                    title: c.title,
                    labels: c.panes.iter().map(|p| p.label.clone()).collect(),
                    turns: c
                        .panes
                        .iter()
                        .map(|p| p.messages.iter().filter(|m| m.role == "user").count() as u64)
                        .max()
                        .unwrap_or(0),
                    updated_at: c.updated_at,
                })
            })
            .collect()
    }

    pub fn get_conversation(&self, id: i64) -> Result<Conversation, EngineError> {
        let row = self
            .store
            .get_conversation(id)?
            .ok_or_else(|| Self::conversation_not_found(id))?;
        self.conversation(&row)
    }

    pub fn remove_conversation(&self, id: i64) -> Result<(), EngineError> {
        if !self.store.delete_conversation(id)? {
            return Err(Self::conversation_not_found(id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use attune_protocol::{ChatMessage, ChatTarget};

    use super::*;

    fn m(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    fn pane(label: &str, messages: Vec<ChatMessage>) -> ConversationPane {
        ConversationPane {
            target: ChatTarget::Base { model_id: 1 },
            label: label.into(),
            messages,
        }
    }

    #[test]
    fn conversations_save_list_replace_and_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Engine::open(&dir.path().join("data")).expect("open");
        let long = format!("  What   is\n{}", "x".repeat(100));
        let c = Conversation {
            panes: vec![
                pane(
                    "SmolLM2",
                    vec![m("system", "s"), m("user", &long), m("assistant", "a")],
                ),
                pane("Template 'T' v1 on SmolLM2", vec![m("user", &long)]),
            ],
            params: Some(SamplingParams {
                temperature: 0.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let saved = e.save_conversation(&c).expect("insert");
        let id = saved.id.expect("id");
        assert_eq!(saved.title.chars().count(), 60, "{}", saved.title);
        assert!(saved.title.starts_with("What is xxx") && saved.title.ends_with('…'));
        assert_eq!(saved.panes, c.panes);
        assert_eq!(saved.params, c.params);

        let second = e
            .save_conversation(&Conversation {
                title: "Mine".into(),
                panes: vec![pane(
                    "B",
                    vec![m("user", "u1"), m("assistant", "a"), m("user", "u2")],
                )],
                ..Default::default()
            })
            .expect("second");
        let list = e.list_conversations().expect("list");
        assert_eq!(list.len(), 2);
        let first = list.iter().find(|s| s.id == id).expect("listed");
        assert_eq!(first.labels, ["SmolLM2", "Template 'T' v1 on SmolLM2"]);
        assert_eq!(first.turns, 1);
        let mine = list
            .iter()
            .find(|s| Some(s.id) == second.id)
            .expect("listed");
        assert_eq!((mine.title.as_str(), mine.turns), ("Mine", 2));

        // Replacing keeps the id and the creation time.
        let mut changed = saved.clone();
        changed.title = "Renamed".into();
        changed.panes[0].messages.push(m("user", "more"));
        let replaced = e.save_conversation(&changed).expect("replace");
        assert_eq!(replaced.id, Some(id));
        assert_eq!(replaced.created_at, saved.created_at);
        assert_eq!(e.get_conversation(id).expect("get"), replaced);
        assert_eq!(e.list_conversations().expect("list").len(), 2);

        // Unknown ids and bad content are clear errors.
        let mut ghost = changed.clone();
        ghost.id = Some(999);
        assert_eq!(
            e.save_conversation(&ghost).expect_err("ghost").code(),
            "not_found"
        );
        let mut bad = changed.clone();
        bad.panes[0].messages.push(m("robot", "x"));
        let err = e.save_conversation(&bad).expect_err("role");
        assert!(err.to_string().contains("robot"), "{err}");
        let empty = Conversation::default();
        assert_eq!(
            e.save_conversation(&empty).expect_err("empty").code(),
            "invalid_input"
        );

        e.remove_conversation(id).expect("remove");
        assert_eq!(
            e.get_conversation(id).expect_err("gone").code(),
            "not_found"
        );
        assert_eq!(
            e.remove_conversation(id).expect_err("gone").code(),
            "not_found"
        );
        assert_eq!(e.list_conversations().expect("list").len(), 1);
    }
}
