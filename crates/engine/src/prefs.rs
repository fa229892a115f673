//! Preference sets (chosen/rejected pairs for DPO and ORPO): imported from a preference JSONL
//! as TRL's `DPOTrainer` reads it, or made from an arena's votes; and their rendering into
//! tokenized pairs for a run.
//!
//! A preference set is a dataset (every pair a training row, canonical JSON
//! `{"prompt", "chosen", "rejected"}`, each a string or a message list) marked in
//! `preference_sets` (migration 0010), so runs, removal refusals and content hashes work as
//! for any dataset.

use std::path::Path;

use attune_models::chat_template::{ChatTemplate, Message};
use attune_models::tokenizer::Tok;
use attune_models::train::pref::{render_pair, PrefPair, PrefText};
use attune_protocol::{ChatMessage, PreferenceSet, Split};
use serde_json::Value;

use crate::error::EngineError;
use crate::store::{insert_pref_set, InsertDataset, NewDataset, PrefSetRow, StoredRow};
use crate::Engine;

/// One side of a row, checked: a non-empty string or a list of `{role, content}` messages.
fn side(v: &Value, field: &str, at: &str) -> Result<Value, EngineError> {
    let bad = |why: &str| EngineError::InvalidInput(format!("{at}: \"{field}\" {why}"));
    match v.get(field) {
        None | Some(Value::Null) => Err(bad("is missing")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(bad("is empty")),
        Some(Value::String(s)) => Ok(Value::String(s.clone())),
        Some(Value::Array(msgs)) => {
            if msgs.is_empty() {
                return Err(bad("is an empty message list"));
            }
            let mut out = Vec::with_capacity(msgs.len());
            for (i, m) in msgs.iter().enumerate() {
                let role = m.get("role").and_then(Value::as_str);
                let content = m.get("content").and_then(Value::as_str);
                match (role, content) {
                    (Some(r @ ("system" | "user" | "assistant")), Some(c)) => {
                        out.push(serde_json::json!({"role": r, "content": c}))
                    }
                    (Some(r), Some(_)) => {
                        return Err(bad(&format!(
                            "message {i} has role '{r}' (system, user or assistant)"
                        )))
                    }
                    _ => {
                        return Err(bad(&format!(
                            "message {i} needs string \"role\" and \"content\""
                        )))
                    }
                }
            }
            Ok(Value::Array(out))
        }
        Some(_) => Err(bad("must be a string or a list of chat messages")),
    }
}

/// Checks one JSON object as a preference row and returns its canonical form.
pub(crate) fn canonical_row(v: &Value, at: &str) -> Result<Value, EngineError> {
    if !v.is_object() {
        return Err(EngineError::InvalidInput(format!(
            "{at}: a preference row is a JSON object with \"prompt\", \"chosen\" and \"rejected\""
        )));
    }
    let prompt = side(v, "prompt", at)?;
    let chosen = side(v, "chosen", at)?;
    let rejected = side(v, "rejected", at)?;
    let kinds = [&prompt, &chosen, &rejected].map(Value::is_string);
    if kinds.iter().any(|&k| k != kinds[0]) {
        return Err(EngineError::InvalidInput(format!(
            "{at}: \"prompt\", \"chosen\" and \"rejected\" must all be strings or all be message \
             lists (TRL's two formats)"
        )));
    }
    if chosen == rejected {
        return Err(EngineError::InvalidInput(format!(
            "{at}: \"chosen\" and \"rejected\" are the same answer"
        )));
    }
    Ok(serde_json::json!({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
}

fn to_text(v: &Value) -> PrefText {
    match v {
        Value::String(s) => PrefText::Text(s.clone()),
        Value::Array(a) => PrefText::Chat(
            a.iter()
                .map(|m| {
                    Message::new(
                        m["role"].as_str().unwrap_or_default(),
                        m["content"].as_str().unwrap_or_default(),
                    )
                })
                .collect(),
        ),
        _ => PrefText::Text(String::new()),
    }
}

/// Tokenizes a set's stored rows as TRL does (see `attune_models::train::pref::render_pair`).
/// Rows whose prompt alone fills `max_len` are left out, as TRL drops them; returns the pairs
/// and how many were left out.
pub(crate) fn render_rows(
    tok: &Tok,
    tmpl: &ChatTemplate,
    rows: &[StoredRow],
    max_len: usize,
    dataset: &str,
) -> Result<(Vec<PrefPair>, usize), EngineError> {
    let mut pairs = Vec::with_capacity(rows.len());
    let mut dropped = 0;
    for r in rows {
        let at = format!("preference set '{dataset}' row {}", r.idx);
        let v: Value = serde_json::from_str(&r.data)
            .map_err(|e| EngineError::InvalidInput(format!("{at}: stored row is not JSON: {e}")))?;
        let v = canonical_row(&v, &at)?;
        let p = render_pair(
            tok,
            Some(tmpl),
            &to_text(&v["prompt"]),
            &to_text(&v["chosen"]),
            &to_text(&v["rejected"]),
            max_len,
        )
        .map_err(|e| EngineError::InvalidInput(format!("{at}: {e}")))?;
        match p {
            Some(p) => pairs.push(p),
            None => dropped += 1,
        }
    }
    Ok((pairs, dropped))
}

fn assistant(content: &str) -> ChatMessage {
    ChatMessage {
        role: "assistant".into(),
        content: content.to_string(),
    }
}

impl Engine {
    /// The preference-set side of a dataset; `None` for an ordinary dataset.
    pub fn preference_set(&self, dataset_id: i64) -> Result<Option<PreferenceSet>, EngineError> {
        let Some(row) = self.store.pref_set(dataset_id)? else {
            return Ok(None);
        };
        let rec = self
            .store
            .get_dataset(dataset_id)?
            .ok_or_else(|| EngineError::DatasetNotFound(dataset_id.to_string()))?;
        let dataset = crate::datasets::summary(&rec, self.store.path())?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(Some(PreferenceSet {
            dataset,
            source: row.source,
            arena_id: row.arena_id,
            pairs: n(row.pairs),
            ties_skipped: n(row.ties_skipped),
            both_bad_skipped: n(row.both_bad_skipped),
            unvoted_skipped: n(row.unvoted_skipped),
        }))
    }

    /// Stores `rows` (canonical preference rows) as a new preference set, in one transaction.
    fn store_pref_set(
        &self,
        name: &str,
        source_path: &str,
        rows: Vec<(Value, Option<i64>)>,
        info: PrefSetRow,
    ) -> Result<PreferenceSet, EngineError> {
        let name = name.trim();
        if name.is_empty() {
            return Err(EngineError::InvalidInput(
                "the preference set's name is empty".into(),
            ));
        }
        let stored: Vec<StoredRow> = rows
            .into_iter()
            .enumerate()
            .map(|(i, (v, line))| StoredRow {
                split: "train".into(),
                idx: i as i64,
                kind: "chat".into(),
                data: v.to_string(),
                label: None,
                source_id: None,
                source_line: line,
            })
            .collect();
        let hash = crate::datasets::content_hash(
            stored
                .iter()
                .map(|r| (r.split.as_str(), r.data.as_str(), r.label.as_deref())),
        );
        let new = NewDataset {
            id: 0,
            name: name.to_string(),
            format: "chat".into(),
            kind: "chat".into(),
            source_path: source_path.to_string(),
            content_hash: hash,
            created_at: crate::clock::now_rfc3339(),
            train_rows: stored.len() as i64,
            valid_rows: 0,
            test_rows: 0,
            duplicates_removed: 0,
            bad_rows_skipped: 0,
            split_spec: serde_json::to_string(&Split::AllTrain)
                .map_err(|e| EngineError::InvalidInput(format!("split: {e}")))?,
        };
        let row = match self
            .store
            .insert_dataset_with(&new, &stored, |tx, id| insert_pref_set(tx, id, &info))?
        {
            InsertDataset::Inserted(r) => r,
            // The same pairs imported again under the same name: the set already there.
            InsertDataset::NameTaken(r)
                if r.content_hash == new.content_hash && self.store.pref_set(r.id)?.is_some() =>
            {
                r
            }
            InsertDataset::NameTaken(_) => {
                return Err(EngineError::NameTaken {
                    what: "a dataset",
                    name: name.to_string(),
                })
            }
        };
        self.preference_set(row.id)?
            .ok_or_else(|| EngineError::db(self.store.path(), "preference set not recorded"))
    }

    /// Imports a preference JSONL: one object a line with `prompt`, `chosen` and `rejected`,
    /// all strings or all chat-message lists (TRL's `DPOTrainer` formats). Any bad line
    /// refuses the file, naming the line; nothing is written then.
    pub fn import_preferences(
        &self,
        path: &Path,
        name: &str,
    ) -> Result<PreferenceSet, EngineError> {
        let text = attune_models::fsio::read_regular_string(path).map_err(|e| {
            EngineError::InvalidDataset {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{} line {}", path.display(), i + 1);
            let v: Value = serde_json::from_str(line).map_err(|e| EngineError::InvalidDataset {
                path: path.to_path_buf(),
                reason: format!("line {}: not JSON: {e}", i + 1),
            })?;
            let v = canonical_row(&v, &at)?;
            rows.push((v, Some(i as i64 + 1)));
        }
        if rows.is_empty() {
            return Err(EngineError::InvalidDataset {
                path: path.to_path_buf(),
                reason: "no preference rows".into(),
            });
        }
        let info = PrefSetRow {
            dataset_id: 0,
            source: "jsonl".into(),
            arena_id: None,
            pairs: rows.len() as i64,
            ties_skipped: 0,
            both_bad_skipped: 0,
            unvoted_skipped: 0,
        };
        let source = crate::datasets::absolute(path);
        self.store_pref_set(name, &source, rows, info)
    }

    /// Makes a preference set from an arena's votes: per prompt the winner's answer is chosen
    /// and the loser's rejected (the prompt is the conversation the voter saw). Ties, "both
    /// bad" and unvoted prompts are left out and counted in the result. `name` defaults to
    /// `arena-<id>-<first 8 hex digits of the pairs' hash>`, so the same votes give the same set
    /// and new votes a new one.
    pub fn preferences_from_arena(
        &self,
        arena_id: i64,
        name: Option<&str>,
    ) -> Result<PreferenceSet, EngineError> {
        let a = self
            .store
            .get_arena(arena_id)?
            .ok_or_else(|| EngineError::InvalidInput(format!("no arena with id {arena_id}")))?;
        let mut rows = Vec::new();
        let (mut ties, mut both_bad, mut unvoted) = (0i64, 0i64, 0i64);
        for item in self.store.arena_items(a.id)? {
            let (Some(a_answer), Some(b_answer)) = (&item.a_answer, &item.b_answer) else {
                unvoted += 1;
                continue;
            };
            let (chosen, rejected) = match item.vote.as_deref() {
                Some("a") => (a_answer, b_answer),
                Some("b") => (b_answer, a_answer),
                Some("tie") => {
                    ties += 1;
                    continue;
                }
                Some("both_bad") => {
                    both_bad += 1;
                    continue;
                }
                _ => {
                    unvoted += 1;
                    continue;
                }
            };
            let context: Vec<ChatMessage> =
                serde_json::from_str(&item.context_json).map_err(|e| {
                    EngineError::db(
                        self.store.path(),
                        format!("arena '{}' prompt {}: bad context: {e}", a.name, item.idx),
                    )
                })?;
            let v = serde_json::json!({
                "prompt": context,
                "chosen": [assistant(chosen)],
                "rejected": [assistant(rejected)],
            });
            let at = format!("arena '{}' prompt {}", a.name, item.idx);
            match canonical_row(&v, &at) {
                Ok(v) => rows.push((v, None)),
                // Two identical answers teach nothing: count them with the ties.
                Err(_) if chosen == rejected => ties += 1,
                Err(e) => return Err(e),
            }
        }
        if rows.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "arena '{}' has no decisive votes yet ({ties} ties, {both_bad} 'both bad', \
                 {unvoted} not voted): nothing to train on",
                a.name
            )));
        }
        let info = PrefSetRow {
            dataset_id: 0,
            source: "arena".into(),
            arena_id: Some(a.id),
            pairs: rows.len() as i64,
            ties_skipped: ties,
            both_bad_skipped: both_bad,
            unvoted_skipped: unvoted,
        };
        let name = match name {
            Some(n) => n.to_string(),
            None => {
                let hash = crate::datasets::content_hash(
                    rows.iter()
                        .map(|(v, _)| v.to_string())
                        .collect::<Vec<_>>()
                        .iter()
                        .map(|d| ("train", d.as_str(), None)),
                );
                format!("arena-{}-{}", a.id, &hash[..8])
            }
        };
        self.store_pref_set(&name, &format!("arena:{}", a.id), rows, info)
    }
}

#[cfg(test)]
mod tests;
