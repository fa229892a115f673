//! The workbench tables of migration 0004: settings, versioned prompt templates, saved
//! conversations and A/B arenas. Rows are plain structs; JSON columns stay strings here
//! (the engine modules own their meaning).

use rusqlite::{params, OptionalExtension, Row};

use super::{write_tx, Store};
use crate::error::EngineError;

/// One version of a template, with its template's name and version count.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TemplateVersionRow {
    pub template_id: i64,
    pub name: String,
    pub version: i64,
    /// How many versions the template has.
    pub versions: i64,
    pub system: Option<String>,
    pub examples_json: String,
    pub user_wrapper: Option<String>,
    pub variables_json: String,
    pub note: Option<String>,
    pub created_at: String,
}

/// What a template version stores besides its number and time.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TemplateContent {
    pub system: Option<String>,
    pub examples_json: String,
    pub user_wrapper: Option<String>,
    pub variables_json: String,
    pub note: Option<String>,
}

const TEMPLATE_SELECT: &str = "SELECT v.template_id, t.name, v.version, \
     (SELECT count(*) FROM template_versions c WHERE c.template_id = v.template_id), \
     v.system, v.examples_json, v.user_wrapper, v.variables_json, v.note, v.created_at \
     FROM template_versions v JOIN templates t ON t.id = v.template_id";

fn template_row(r: &Row<'_>) -> rusqlite::Result<TemplateVersionRow> {
    Ok(TemplateVersionRow {
        template_id: r.get(0)?,
        name: r.get(1)?,
        version: r.get(2)?,
        versions: r.get(3)?,
        system: r.get(4)?,
        examples_json: r.get(5)?,
        user_wrapper: r.get(6)?,
        variables_json: r.get(7)?,
        note: r.get(8)?,
        created_at: r.get(9)?,
    })
}

/// A `conversations` row (`id` is ignored on insert).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConversationRow {
    pub id: i64,
    pub title: String,
    pub panes_json: String,
    pub params_json: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

const CONVERSATION_COLUMNS: &str = "id, title, panes_json, params_json, created_at, updated_at";

fn conversation_row(r: &Row<'_>) -> rusqlite::Result<ConversationRow> {
    Ok(ConversationRow {
        id: r.get(0)?,
        title: r.get(1)?,
        panes_json: r.get(2)?,
        params_json: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
    })
}

/// An arena with its counts, as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ArenaRecord {
    pub id: i64,
    pub name: String,
    pub a_json: String,
    pub b_json: String,
    pub a_label: String,
    pub b_label: String,
    pub params_json: String,
    pub seed: u64,
    pub created_at: String,
    pub prompts: i64,
    pub a_wins: i64,
    pub b_wins: i64,
    pub ties: i64,
    pub both_bad: i64,
}

const ARENA_SELECT: &str = "SELECT a.id, a.name, a.a_json, a.b_json, a.a_label, a.b_label, \
     a.params_json, a.seed, a.created_at, \
     (SELECT count(*) FROM arena_items i WHERE i.arena_id = a.id), \
     (SELECT count(*) FROM arena_items i WHERE i.arena_id = a.id AND i.vote = 'a'), \
     (SELECT count(*) FROM arena_items i WHERE i.arena_id = a.id AND i.vote = 'b'), \
     (SELECT count(*) FROM arena_items i WHERE i.arena_id = a.id AND i.vote = 'tie'), \
     (SELECT count(*) FROM arena_items i WHERE i.arena_id = a.id AND i.vote = 'both_bad') \
     FROM arenas a";

fn arena_record(r: &Row<'_>) -> rusqlite::Result<ArenaRecord> {
    Ok(ArenaRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        a_json: r.get(2)?,
        b_json: r.get(3)?,
        a_label: r.get(4)?,
        b_label: r.get(5)?,
        params_json: r.get(6)?,
        // The seed is a u64 kept as its two's-complement i64.
        seed: r.get::<_, i64>(7)? as u64,
        created_at: r.get(8)?,
        prompts: r.get(9)?,
        a_wins: r.get(10)?,
        b_wins: r.get(11)?,
        ties: r.get(12)?,
        both_bad: r.get(13)?,
    })
}

/// One prompt of an arena, as stored (`vote` is "a", "b", "tie" or "both_bad").
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ArenaItemRow {
    pub idx: i64,
    pub prompt: String,
    pub context_json: String,
    pub left_is_a: bool,
    pub a_answer: Option<String>,
    pub b_answer: Option<String>,
    pub vote: Option<String>,
}

const ITEM_COLUMNS: &str = "idx, prompt, context_json, left_is_a, a_answer, b_answer, vote";

fn item_row(r: &Row<'_>) -> rusqlite::Result<ArenaItemRow> {
    Ok(ArenaItemRow {
        idx: r.get(0)?,
        prompt: r.get(1)?,
        context_json: r.get(2)?,
        left_is_a: r.get::<_, i64>(3)? != 0,
        a_answer: r.get(4)?,
        b_answer: r.get(5)?,
        vote: r.get(6)?,
    })
}

/// An arena to insert with its prompts: (prompt, context JSON, left_is_a).
#[derive(Debug, Clone)]
pub(crate) struct NewArena {
    pub name: String,
    pub a_json: String,
    pub b_json: String,
    pub a_label: String,
    pub b_label: String,
    pub params_json: String,
    pub seed: u64,
    pub created_at: String,
    pub items: Vec<(String, String, bool)>,
}

impl Store {
    fn collect<T>(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
        map: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(args, map)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    // -- settings ---------------------------------------------------------------------

    /// Every setting, by key.
    pub fn settings(&self) -> Result<Vec<(String, String)>, EngineError> {
        self.collect("SELECT key, value FROM settings ORDER BY key", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
    }

    /// Inserts or replaces one setting.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<(), EngineError> {
        self.conn()
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map_err(|e| self.err(format!("setting '{key}': {e}")))?;
        Ok(())
    }

    // -- templates --------------------------------------------------------------------

    /// The newest version of every template, by name (case-insensitive).
    pub fn list_templates(&self) -> Result<Vec<TemplateVersionRow>, EngineError> {
        self.collect(
            &format!(
                "{TEMPLATE_SELECT} WHERE v.version = (SELECT max(m.version) FROM \
                 template_versions m WHERE m.template_id = v.template_id) \
                 ORDER BY t.name COLLATE NOCASE, t.id"
            ),
            [],
            template_row,
        )
    }

    /// Every version of template `id`, newest first (empty when there is no such template).
    pub fn template_versions(&self, id: i64) -> Result<Vec<TemplateVersionRow>, EngineError> {
        self.collect(
            &format!("{TEMPLATE_SELECT} WHERE v.template_id = ?1 ORDER BY v.version DESC"),
            [id],
            template_row,
        )
    }

    /// Version `version` (None: the newest) of template `id`.
    pub fn template_version(
        &self,
        id: i64,
        version: Option<i64>,
    ) -> Result<Option<TemplateVersionRow>, EngineError> {
        let sql = format!(
            "{TEMPLATE_SELECT} WHERE v.template_id = ?1 AND v.version = coalesce(?2, \
             (SELECT max(m.version) FROM template_versions m WHERE m.template_id = ?1))"
        );
        self.conn()
            .query_row(&sql, params![id, version], template_row)
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Creates a template with its version 1, in one transaction.
    pub fn insert_template(
        &self,
        name: &str,
        c: &TemplateContent,
        now: &str,
    ) -> Result<TemplateVersionRow, EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        if name_taken(&tx, name, None).map_err(|e| self.err(e))? {
            return Err(EngineError::NameTaken {
                what: "a template",
                name: name.to_string(),
            });
        }
        tx.execute(
            "INSERT INTO templates (name, created_at) VALUES (?1, ?2)",
            params![name, now],
        )
        .map_err(|e| self.err(format!("template '{name}': {e}")))?;
        let id = tx.last_insert_rowid();
        insert_version(&tx, id, 1, c, now)
            .map_err(|e| self.err(format!("template '{name}': {e}")))?;
        let row = tx
            .query_row(
                &format!("{TEMPLATE_SELECT} WHERE v.template_id = ?1 AND v.version = 1"),
                [id],
                template_row,
            )
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(row)
    }

    /// Renames template `id` when `name` differs and adds version N+1 with `content`
    /// when given; returns the newest version. One transaction; `None` when there is no
    /// such template.
    pub fn update_template(
        &self,
        id: i64,
        name: &str,
        content: Option<&TemplateContent>,
        now: &str,
    ) -> Result<Option<TemplateVersionRow>, EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        let current: Option<(String, i64)> = tx
            .query_row(
                "SELECT t.name, (SELECT max(version) FROM template_versions v \
                 WHERE v.template_id = t.id) FROM templates t WHERE t.id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get::<_, Option<i64>>(1)?.unwrap_or(0))),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((old_name, newest)) = current else {
            return Ok(None);
        };
        if old_name != name {
            if name_taken(&tx, name, Some(id)).map_err(|e| self.err(e))? {
                return Err(EngineError::NameTaken {
                    what: "a template",
                    name: name.to_string(),
                });
            }
            tx.execute(
                "UPDATE templates SET name = ?2 WHERE id = ?1",
                params![id, name],
            )
            .map_err(|e| self.err(format!("template '{name}': {e}")))?;
        }
        if let Some(c) = content {
            insert_version(&tx, id, newest + 1, c, now)
                .map_err(|e| self.err(format!("template '{name}': {e}")))?;
        }
        let row = tx
            .query_row(
                &format!(
                    "{TEMPLATE_SELECT} WHERE v.template_id = ?1 AND v.version = \
                     (SELECT max(m.version) FROM template_versions m WHERE m.template_id = ?1)"
                ),
                [id],
                template_row,
            )
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Some(row))
    }

    /// Deletes a template and (by cascade) its versions; `false` if there was none.
    pub fn delete_template(&self, id: i64) -> Result<bool, EngineError> {
        let n = self
            .conn()
            .execute("DELETE FROM templates WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    // -- conversations ----------------------------------------------------------------

    /// Inserts a conversation; returns it with its id.
    pub fn insert_conversation(&self, c: &ConversationRow) -> Result<ConversationRow, EngineError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO conversations (title, panes_json, params_json, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                c.title,
                c.panes_json,
                c.params_json,
                c.created_at,
                c.updated_at
            ],
        )
        .map_err(|e| self.err(format!("conversation '{}': {e}", c.title)))?;
        Ok(ConversationRow {
            id: conn.last_insert_rowid(),
            ..c.clone()
        })
    }

    /// Replaces conversation `c.id` (its `created_at` is kept); `None` if there is none.
    pub fn update_conversation(
        &self,
        c: &ConversationRow,
    ) -> Result<Option<ConversationRow>, EngineError> {
        let conn = self.conn();
        conn.query_row(
            &format!(
                "UPDATE conversations SET title = ?2, panes_json = ?3, params_json = ?4, \
                 updated_at = ?5 WHERE id = ?1 RETURNING {CONVERSATION_COLUMNS}"
            ),
            params![c.id, c.title, c.panes_json, c.params_json, c.updated_at],
            conversation_row,
        )
        .optional()
        .map_err(|e| self.err(format!("conversation id {}: {e}", c.id)))
    }

    /// Every conversation, most recently updated first.
    pub fn list_conversations(&self) -> Result<Vec<ConversationRow>, EngineError> {
        self.collect(
            &format!(
                "SELECT {CONVERSATION_COLUMNS} FROM conversations \
                 ORDER BY updated_at DESC, id DESC"
            ),
            [],
            conversation_row,
        )
    }

    pub fn get_conversation(&self, id: i64) -> Result<Option<ConversationRow>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?1"),
                [id],
                conversation_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// `false` if there was no such conversation.
    pub fn delete_conversation(&self, id: i64) -> Result<bool, EngineError> {
        let n = self
            .conn()
            .execute("DELETE FROM conversations WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    // -- arenas -----------------------------------------------------------------------

    /// Inserts an arena and its prompts in one transaction.
    pub fn insert_arena(&self, a: &NewArena) -> Result<ArenaRecord, EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        let fail = |e: rusqlite::Error| self.err(format!("arena '{}': {e}", a.name));
        tx.execute(
            "INSERT INTO arenas (name, a_json, b_json, a_label, b_label, params_json, seed, \
             created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                a.name,
                a.a_json,
                a.b_json,
                a.a_label,
                a.b_label,
                a.params_json,
                a.seed as i64,
                a.created_at
            ],
        )
        .map_err(fail)?;
        let id = tx.last_insert_rowid();
        {
            let mut stmt = tx
                .prepare(
                    "INSERT INTO arena_items (arena_id, idx, prompt, context_json, left_is_a) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(fail)?;
            for (idx, (prompt, context, left_is_a)) in a.items.iter().enumerate() {
                stmt.execute(params![
                    id,
                    idx as i64,
                    prompt,
                    context,
                    i64::from(*left_is_a)
                ])
                .map_err(fail)?;
            }
        }
        let row = tx
            .query_row(
                &format!("{ARENA_SELECT} WHERE a.id = ?1"),
                [id],
                arena_record,
            )
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(row)
    }

    /// Every arena, newest first.
    pub fn list_arenas(&self) -> Result<Vec<ArenaRecord>, EngineError> {
        self.collect(
            &format!("{ARENA_SELECT} ORDER BY a.id DESC"),
            [],
            arena_record,
        )
    }

    pub fn get_arena(&self, id: i64) -> Result<Option<ArenaRecord>, EngineError> {
        self.conn()
            .query_row(
                &format!("{ARENA_SELECT} WHERE a.id = ?1"),
                [id],
                arena_record,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The prompts of arena `id`, in order.
    pub fn arena_items(&self, id: i64) -> Result<Vec<ArenaItemRow>, EngineError> {
        self.collect(
            &format!("SELECT {ITEM_COLUMNS} FROM arena_items WHERE arena_id = ?1 ORDER BY idx"),
            [id],
            item_row,
        )
    }

    pub fn arena_item(&self, id: i64, idx: i64) -> Result<Option<ArenaItemRow>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {ITEM_COLUMNS} FROM arena_items WHERE arena_id = ?1 AND idx = ?2"),
                params![id, idx],
                item_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Stores both answers of a prompt; `false` if there is no such prompt.
    pub fn set_arena_answers(
        &self,
        id: i64,
        idx: i64,
        a_answer: &str,
        b_answer: &str,
    ) -> Result<bool, EngineError> {
        let n = self
            .conn()
            .execute(
                "UPDATE arena_items SET a_answer = ?3, b_answer = ?4 \
                 WHERE arena_id = ?1 AND idx = ?2",
                params![id, idx, a_answer, b_answer],
            )
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    /// Records (or changes) the vote on a prompt whose answers are both stored;
    /// `false` when there is no such prompt or an answer is missing.
    pub fn set_arena_vote(
        &self,
        id: i64,
        idx: i64,
        vote: &str,
        now: &str,
    ) -> Result<bool, EngineError> {
        let n = self
            .conn()
            .execute(
                "UPDATE arena_items SET vote = ?3, voted_at = ?4 WHERE arena_id = ?1 \
                 AND idx = ?2 AND a_answer IS NOT NULL AND b_answer IS NOT NULL",
                params![id, idx, vote, now],
            )
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    /// Deletes an arena and (by cascade) its prompts; `false` if there was none.
    pub fn delete_arena(&self, id: i64) -> Result<bool, EngineError> {
        let n = self
            .conn()
            .execute("DELETE FROM arenas WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }
}

/// Whether another template (not `except`) has `name`.
fn name_taken(
    tx: &rusqlite::Transaction<'_>,
    name: &str,
    except: Option<i64>,
) -> rusqlite::Result<bool> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM templates WHERE name = ?1 AND id IS NOT ?2)",
        params![name, except],
        |r| r.get(0),
    )
}

fn insert_version(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    version: i64,
    c: &TemplateContent,
    now: &str,
) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO template_versions (template_id, version, system, examples_json, \
         user_wrapper, variables_json, note, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            id,
            version,
            c.system,
            c.examples_json,
            c.user_wrapper,
            c.variables_json,
            c.note,
            now
        ],
    )
}
