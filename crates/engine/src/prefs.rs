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
use attune_protocol::{ChatMessage, JudgeKey, PreferenceSet, Split, VoteSource};
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

/// A preference set's rows as the samples a preference run evaluates: the prompt followed by
/// the chosen answer (chat sets: the prompt's messages then the chosen ones; plain-string sets:
/// the prompt's text then the chosen text), so the run's eval loss is the NLL of the preferred
/// answers.
pub(crate) fn chosen_samples(
    rows: &[StoredRow],
    dataset: &str,
) -> Result<Vec<crate::datasets::Sample>, EngineError> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let at = format!("preference set '{dataset}' row {}", r.idx);
        let v: Value = serde_json::from_str(&r.data)
            .map_err(|e| EngineError::InvalidInput(format!("{at}: stored row is not JSON: {e}")))?;
        let v = canonical_row(&v, &at)?;
        let sample = match (&v["prompt"], &v["chosen"]) {
            (Value::String(p), Value::String(c)) => {
                crate::datasets::Sample::Text(format!("{p}{c}"))
            }
            (Value::Array(p), Value::Array(c)) => crate::datasets::Sample::Chat(
                p.iter()
                    .chain(c.iter())
                    .map(|m| ChatMessage {
                        role: m["role"].as_str().unwrap_or_default().to_string(),
                        content: m["content"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect(),
            ),
            _ => {
                return Err(EngineError::InvalidInput(format!(
                    "{at}: \"prompt\" and \"chosen\" must both be strings or both message lists"
                )))
            }
        };
        out.push(sample);
    }
    Ok(out)
}

fn assistant(content: &str) -> ChatMessage {
    ChatMessage {
        role: "assistant".into(),
        content: content.to_string(),
    }
}

impl Engine {
    /// The train split of preference set `ds` tokenized for `model` as TRL does (pairs whose
    /// prompt fills `max_len` left out): what the advisor measures and a run's pre-flight plans.
    pub(crate) fn train_pairs(
        &self,
        ds: &attune_protocol::DatasetSummary,
        model: &attune_protocol::ModelSummary,
        max_len: usize,
    ) -> Result<Vec<PrefPair>, EngineError> {
        let path = crate::advisor::model_path(model);
        let (_, tok, tmpl) =
            attune_models::loader::text_side(&path).map_err(|source| EngineError::ModelLoad {
                name: model.name.clone(),
                path: path.clone(),
                source: Box::new(source),
            })?;
        let rows = self.store.dataset_rows(ds.id, "train")?;
        Ok(render_rows(&tok, &tmpl, &rows, max_len, &ds.name)?.0)
    }

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
        let judge: Option<JudgeKey> = match &row.judge_key_json {
            Some(j) => Some(serde_json::from_str(j).map_err(|e| {
                EngineError::db(
                    self.store.path(),
                    format!("preference set {dataset_id}: bad judge key: {e}"),
                )
            })?),
            None => None,
        };
        let votes = match (row.votes.as_deref(), judge) {
            (Some("human"), _) => Some(VoteSource::Human),
            (Some("judge"), Some(judge)) => Some(VoteSource::Judge { judge }),
            (Some("combined"), Some(judge)) => Some(VoteSource::Combined { judge }),
            (None, _) => None,
            (Some(other), _) => {
                return Err(EngineError::db(
                    self.store.path(),
                    format!("preference set {dataset_id}: vote source '{other}' without its judge"),
                ))
            }
        };
        Ok(Some(PreferenceSet {
            dataset,
            source: row.source,
            arena_id: row.arena_id,
            pairs: n(row.pairs),
            ties_skipped: n(row.ties_skipped),
            both_bad_skipped: n(row.both_bad_skipped),
            unvoted_skipped: n(row.unvoted_skipped),
            votes,
            judge_label: row.judge_label,
            unparseable_skipped: n(row.unparseable_skipped),
            human_pairs: n(row.human_pairs),
            judge_pairs: n(row.judge_pairs),
        }))
    }

    /// Every preference set in the library, newest first.
    pub fn list_preference_sets(&self) -> Result<Vec<PreferenceSet>, EngineError> {
        let mut out = Vec::new();
        for id in self.store.pref_set_ids()? {
            // A set whose dataset row went away meanwhile (another process removed it) is
            // simply not listed.
            match self.preference_set(id) {
                Ok(Some(set)) => out.push(set),
                Ok(None) | Err(EngineError::DatasetNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
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
            // The same pairs imported again under the same name: the set already there
            // (when it records the same provenance).
            InsertDataset::NameTaken(r)
                if r.content_hash == new.content_hash
                    && self.store.pref_set(r.id)?.is_some_and(|p| {
                        p.votes == info.votes && p.judge_key_json == info.judge_key_json
                    }) =>
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
            votes: None,
            judge_key_json: None,
            judge_label: None,
            unparseable_skipped: 0,
            human_pairs: 0,
            judge_pairs: 0,
        };
        let source = crate::datasets::absolute(path);
        self.store_pref_set(name, &source, rows, info)
    }

    /// Makes a preference set from an arena's votes: per prompt the winner's answer is chosen
    /// and the loser's rejected (the prompt is the conversation the voter saw). `source` says
    /// whose votes: the human's, one judge's (identified as the arena's results group its
    /// votes: target, rubric version, order setting, verdict mode), or combined (the human's
    /// vote where there is one, else the judge's). Ties, "both bad", unvoted prompts and
    /// judge verdicts that could not be parsed are left out and counted in the result, which
    /// also records the source and the judge. `name` defaults to
    /// `arena-<id>-<first 8 hex digits of the pairs' hash>` for human votes and
    /// `arena-<id>-<judge|combined>-<hash>` otherwise, so the same votes give the same set and
    /// new votes a new one.
    pub fn preferences_from_arena(
        &self,
        arena_id: i64,
        name: Option<&str>,
        source: &VoteSource,
    ) -> Result<PreferenceSet, EngineError> {
        let a = self
            .store
            .get_arena(arena_id)?
            .ok_or_else(|| EngineError::InvalidInput(format!("no arena with id {arena_id}")))?;
        // The judge's votes by prompt (None: voted, verdict unparseable).
        let mut judge_votes: std::collections::BTreeMap<i64, Option<String>> = Default::default();
        let mut judge_label = None;
        if let Some(key) = source.judge() {
            let judge_json = serde_json::to_string(&key.judge)
                .map_err(|e| EngineError::InvalidInput(format!("judge: {e}")))?;
            for v in self.store.judge_votes(a.id)? {
                if v.judge_json == judge_json
                    && v.rubric_version == i64::from(key.rubric_version)
                    && v.both_orders == key.both_orders
                    && v.verdict_mode == key.verdict.as_str()
                {
                    judge_label = Some(v.judge_label.clone());
                    judge_votes.insert(v.idx, v.vote);
                }
            }
            if judge_votes.is_empty() {
                let label = self
                    .target_label(&key.judge)
                    .unwrap_or_else(|_| judge_json.clone());
                return Err(EngineError::InvalidInput(format!(
                    "arena '{}' has no votes from judge {label} (rubric v{}, {}, {} verdict): \
                     see `attune arena results {}` for its judges",
                    a.name,
                    key.rubric_version,
                    if key.both_orders {
                        "both orders"
                    } else {
                        "one order"
                    },
                    key.verdict.as_str(),
                    a.id
                )));
            }
        }
        let mut rows = Vec::new();
        let (mut ties, mut both_bad, mut unvoted, mut unparseable) = (0i64, 0i64, 0i64, 0i64);
        let (mut human_pairs, mut judge_pairs) = (0i64, 0i64);
        let mut identical = 0i64;
        for item in self.store.arena_items(a.id)? {
            let (Some(a_answer), Some(b_answer)) = (&item.a_answer, &item.b_answer) else {
                unvoted += 1;
                continue;
            };
            let human = match source {
                VoteSource::Human | VoteSource::Combined { .. } => item.vote.clone(),
                VoteSource::Judge { .. } => None,
            };
            let (vote, from_judge) = match (human, source) {
                (Some(h), _) => (h, false),
                (None, VoteSource::Human) => {
                    unvoted += 1;
                    continue;
                }
                (None, _) => match judge_votes.get(&item.idx) {
                    None => {
                        unvoted += 1;
                        continue;
                    }
                    Some(None) => {
                        unparseable += 1;
                        continue;
                    }
                    Some(Some(j)) => (j.clone(), true),
                },
            };
            let (chosen, rejected) = match vote.as_str() {
                "a" => (a_answer, b_answer),
                "b" => (b_answer, a_answer),
                "tie" => {
                    ties += 1;
                    continue;
                }
                "both_bad" => {
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
                Ok(v) => {
                    rows.push((v, None));
                    if from_judge {
                        judge_pairs += 1;
                    } else {
                        human_pairs += 1;
                    }
                }
                // Two identical answers teach nothing: count them with the ties.
                Err(_) if chosen == rejected => {
                    ties += 1;
                    identical += 1;
                }
                Err(e) => return Err(e),
            }
        }
        if rows.is_empty() {
            let same = if identical > 0 {
                format!(
                    "; {identical} of the ties are prompts whose two answers are the same text, \
                     which no vote can turn into a pair"
                )
            } else {
                String::new()
            };
            return Err(EngineError::InvalidInput(format!(
                "arena '{}' has no decisive {} votes yet ({ties} ties, {both_bad} 'both bad', \
                 {unvoted} not voted, {unparseable} unparseable{same}): nothing to train on",
                a.name,
                source.kind()
            )));
        }
        let judge_key_json = match source.judge() {
            Some(k) => Some(
                serde_json::to_string(k)
                    .map_err(|e| EngineError::InvalidInput(format!("judge: {e}")))?,
            ),
            None => None,
        };
        let info = PrefSetRow {
            dataset_id: 0,
            source: "arena".into(),
            arena_id: Some(a.id),
            pairs: rows.len() as i64,
            ties_skipped: ties,
            both_bad_skipped: both_bad,
            unvoted_skipped: unvoted,
            votes: Some(source.kind().to_string()),
            judge_key_json,
            judge_label,
            unparseable_skipped: unparseable,
            human_pairs,
            judge_pairs,
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
                match source {
                    VoteSource::Human => format!("arena-{}-{}", a.id, &hash[..8]),
                    other => format!("arena-{}-{}-{}", a.id, other.kind(), &hash[..8]),
                }
            }
        };
        self.store_pref_set(&name, &format!("arena:{}", a.id), rows, info)
    }
}

#[cfg(test)]
mod tests;
