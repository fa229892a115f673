//! Documents to data: a folder of documents becomes a *document set* (text extracted,
//! chunked by structure, stored with provenance), a teacher writes rows per chunk from a
//! stored template (held for review as `pending`, or `failed` with the reason), the user
//! accepts, edits or rejects them, and the kept rows become an ordinary chat dataset
//! (through the dataset import, so they are validated, de-duplicated, split and hashed
//! like any other) whose rows carry their provenance as source ids. The same chunks also
//! make a plain-text dataset for continued pre-training.
//!
//! - `extract`: text and headings (or pages) from PDF, DOCX, Markdown, HTML and text.
//! - `chunk`: chunks by headings and paragraphs within a size in characters.
//! - `teacher`: the default teacher templates and the reading of the teacher's answer.
//!
//! The teacher runs through the engine actor (`Request::Generate`): a local model, an
//! adapter or an API endpoint, one chunk at a time, in the actor's fair queue as client
//! `docs`.

pub mod chunk;
pub mod extract;
pub mod teacher;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use attune_protocol::{
    ChatEvent, ChatMessage, ChatTarget, DatasetFormat, DatasetSummary, DocChunk, DocFormat,
    DocImportOptions, DocRow, DocRowStatus, DocSummary, DocsetSummary, FinishReason, ImportOptions,
    Provenance, ReviewAction, SamplingParams, SkippedDoc, Split, TeachReport, TeachSpec,
    TeacherMode, TemplateRecord,
};
use sha2::{Digest, Sha256};

use crate::actor::{Actor, CancelToken, Generation, Prompt};
use crate::clock::now_rfc3339;
use crate::error::EngineError;
use crate::store::{DocChunkRow, DocDocumentRow, DocRowRow, DocsetRow, NewDocRow};
use crate::Engine;

pub use chunk::{MAX_CHUNK_CHARS, MIN_CHUNK_CHARS};
pub use teacher::{DEFAULT_INSTRUCTIONS_TEMPLATE, DEFAULT_QA_TEMPLATE};

/// Default chunk size, in characters.
pub const DEFAULT_CHUNK_CHARS: usize = 1500;
/// At most this many files are read from one folder (its sub-folders included).
pub const MAX_FILES: usize = 10_000;
/// How deep sub-folders are followed.
const MAX_DEPTH: usize = 8;
/// The source id prefix of a dataset row made from a generated row: `doc-row-<id>`.
pub const SOURCE_ID_PREFIX: &str = "doc-row-";

/// What a teacher pass does.
#[derive(Debug, Clone)]
pub struct TeachPlan {
    pub target: ChatTarget,
    /// The stored template version that writes the prompt.
    pub template: TemplateRecord,
    /// Values for the template's variables (`count`, ...), over its defaults.
    pub values: BTreeMap<String, String>,
    pub params: SamplingParams,
    /// Only the first this many chunks (in set order) that have no rows yet.
    pub max_chunks: Option<usize>,
}

/// `{"messages": [...]}` as stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct Turns {
    messages: Vec<ChatMessage>,
}

fn turns_json(messages: &[ChatMessage]) -> String {
    // Serializing strings cannot fail.
    serde_json::to_string(&Turns {
        messages: messages.to_vec(),
    })
    .unwrap_or_default()
}

fn provenance(c: &DocChunkRow) -> Provenance {
    let page = |p: Option<i64>| p.and_then(|p| u32::try_from(p).ok());
    Provenance {
        document: c.document.clone(),
        page_start: page(c.page_start),
        page_end: page(c.page_end),
        section: c.section.clone(),
    }
}

fn chunk_dto(c: &DocChunkRow) -> DocChunk {
    DocChunk {
        id: c.id,
        document_id: c.document_id,
        index: u32::try_from(c.idx).unwrap_or(u32::MAX),
        provenance: provenance(c),
        text: c.text.clone(),
    }
}

/// The files of `dir` (and its sub-folders) in path order, skipping hidden ones; links are
/// listed, never followed.
fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), EngineError> {
    let entries = std::fs::read_dir(dir).map_err(|e| EngineError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if out.len() > MAX_FILES {
            return Err(EngineError::InvalidInput(format!(
                "{} holds more than {MAX_FILES} files; point at a smaller folder",
                dir.display()
            )));
        }
        // symlink_metadata: a link to a folder is not followed (no cycles).
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {
                if depth < MAX_DEPTH {
                    walk(&p, depth + 1, out)?;
                }
            }
            _ => out.push(p),
        }
    }
    Ok(())
}

impl Engine {
    /// Reads the documents of folder `dir` (PDF, DOCX, Markdown, HTML, text; sub-folders
    /// included, hidden files skipped) into a new document set, chunked at
    /// `opts.max_chunk_chars`. Files of other kinds, and documents that cannot be read
    /// (a scanned PDF, a malformed file), are listed in `skipped` with the reason; with no
    /// readable document at all nothing is written and the error gives each file's reason.
    pub fn import_docs(
        &self,
        dir: &Path,
        opts: &DocImportOptions,
    ) -> Result<DocsetSummary, EngineError> {
        let name = opts.name.trim();
        if name.is_empty() || name.chars().count() > 80 || name.chars().any(char::is_control) {
            return Err(EngineError::InvalidInput(format!(
                "document set name '{name}': 1 to 80 characters, no control characters"
            )));
        }
        if !(MIN_CHUNK_CHARS..=MAX_CHUNK_CHARS).contains(&opts.max_chunk_chars) {
            return Err(EngineError::InvalidInput(format!(
                "chunk size {}: between {MIN_CHUNK_CHARS} and {MAX_CHUNK_CHARS} characters",
                opts.max_chunk_chars
            )));
        }
        attune_models::fsio::require_dir(dir)
            .map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        if let Some(existing) = self
            .store
            .list_docsets()?
            .into_iter()
            .find(|s| s.name == name)
        {
            return Err(EngineError::NameTaken {
                what: "document set",
                name: existing.name,
            });
        }
        let root = std::fs::canonicalize(dir).map_err(|e| EngineError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let mut files = Vec::new();
        walk(&root, 0, &mut files)?;
        let mut documents = Vec::new();
        let mut skipped = Vec::new();
        for path in files {
            let rel = path
                .strip_prefix(&root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            // A link could lead outside the folder the user chose: not followed.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                skipped.push(SkippedDoc {
                    path: rel,
                    reason: "a symbolic link (not followed: it may lead outside the folder)"
                        .to_string(),
                });
                continue;
            }
            let Some(format) = extract::format_of(&path) else {
                skipped.push(SkippedDoc {
                    path: rel,
                    reason: "not a document Attune reads (.pdf, .docx, .md, .html, .txt)"
                        .to_string(),
                });
                continue;
            };
            let read = extract::read_document(&path)
                .and_then(|bytes| extract::extract(&path, format, &bytes).map(|x| (bytes, x)));
            let (bytes, text) = match read {
                Ok(r) => r,
                Err(e) => {
                    let reason = match e {
                        EngineError::InvalidDocument { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    skipped.push(SkippedDoc { path: rel, reason });
                    continue;
                }
            };
            let chunks = chunk::chunk(&text.blocks, opts.max_chunk_chars);
            let doc = DocDocumentRow {
                id: 0,
                docset_id: 0,
                path: rel,
                format: format.as_str().to_string(),
                sha256: hex::encode(Sha256::digest(&bytes)),
                bytes: bytes.len() as i64,
                pages: text.pages.map(i64::from),
                chars: text.chars() as i64,
                chunks: chunks.len() as i64,
            };
            let rows = chunks
                .into_iter()
                .enumerate()
                .map(|(i, c)| DocChunkRow {
                    id: 0,
                    document_id: 0,
                    idx: i as i64,
                    section: c.section,
                    page_start: c.page_start.map(i64::from),
                    page_end: c.page_end.map(i64::from),
                    text: c.text,
                    document: String::new(),
                })
                .collect();
            documents.push((doc, rows));
        }
        if documents.is_empty() {
            let why = skipped
                .iter()
                .take(10)
                .map(|s| format!("{}: {}", s.path, s.reason))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(EngineError::InvalidInput(format!(
                "no readable document in {}{}",
                root.display(),
                if why.is_empty() {
                    " (the folder is empty)".to_string()
                } else {
                    format!(" ({why})")
                }
            )));
        }
        let set = DocsetRow {
            id: 0,
            name: name.to_string(),
            source_dir: root.to_string_lossy().into_owned(),
            max_chunk_chars: opts.max_chunk_chars as i64,
            skipped_json: serde_json::to_string(&skipped).unwrap_or_else(|_| "[]".into()),
            created_at: now_rfc3339(),
        };
        match self.store.insert_docset(&set, &documents)? {
            Ok(row) => self.docset_summary(&row),
            Err(existing) => Err(EngineError::NameTaken {
                what: "document set",
                name: existing.name,
            }),
        }
    }

    fn docset_summary(&self, row: &DocsetRow) -> Result<DocsetSummary, EngineError> {
        let documents = self
            .store
            .docset_documents(row.id)?
            .into_iter()
            .map(|d| DocSummary {
                id: d.id,
                path: d.path,
                format: DocFormat::parse(&d.format).unwrap_or(DocFormat::Text),
                sha256: d.sha256,
                bytes: d.bytes.max(0) as u64,
                pages: d.pages.and_then(|p| u32::try_from(p).ok()),
                chars: d.chars.max(0) as u64,
                chunks: d.chunks.max(0) as u64,
            })
            .collect::<Vec<_>>();
        let skipped: Vec<SkippedDoc> = serde_json::from_str(&row.skipped_json).map_err(|e| {
            EngineError::db(
                self.store.path(),
                format!("document set '{}': unreadable skipped list: {e}", row.name),
            )
        })?;
        let rows = self.store.doc_rows(row.id)?;
        let count = |s: DocRowStatus| rows.iter().filter(|r| r.status == s.as_str()).count() as u64;
        Ok(DocsetSummary {
            id: row.id,
            name: row.name.clone(),
            source_dir: row.source_dir.clone(),
            max_chunk_chars: row.max_chunk_chars.max(0) as u64,
            created_at: row.created_at.clone(),
            chunks: documents.iter().map(|d| d.chunks).sum(),
            documents,
            skipped,
            pending: count(DocRowStatus::Pending),
            accepted: count(DocRowStatus::Accepted),
            rejected: count(DocRowStatus::Rejected),
            edited: count(DocRowStatus::Edited),
            failed: count(DocRowStatus::Failed),
        })
    }

    /// Every document set, oldest first.
    pub fn list_docsets(&self) -> Result<Vec<DocsetSummary>, EngineError> {
        self.store
            .list_docsets()?
            .iter()
            .map(|r| self.docset_summary(r))
            .collect()
    }

    /// A document set by id, else by exact name.
    pub fn find_docset(&self, id_or_name: &str) -> Result<DocsetSummary, EngineError> {
        let key = id_or_name.trim();
        let all = self.store.list_docsets()?;
        let row = key
            .parse::<i64>()
            .ok()
            .and_then(|id| all.iter().find(|s| s.id == id))
            .or_else(|| all.iter().find(|s| s.name == key))
            .ok_or_else(|| EngineError::NotFound {
                what: "document set",
                id: key.to_string(),
            })?;
        self.docset_summary(row)
    }

    /// Removes a set with its documents, chunks and rows (datasets made from it stay).
    pub fn remove_docset(&self, id: i64) -> Result<(), EngineError> {
        if !self.store.delete_docset(id)? {
            return Err(EngineError::NotFound {
                what: "document set",
                id: id.to_string(),
            });
        }
        Ok(())
    }

    /// A set's chunks, by document then position.
    pub fn docset_chunks(&self, set_id: i64) -> Result<Vec<DocChunk>, EngineError> {
        Ok(self
            .store
            .docset_chunks(set_id)?
            .iter()
            .map(chunk_dto)
            .collect())
    }

    fn doc_row_dto(&self, r: &DocRowRow) -> Result<DocRow, EngineError> {
        let status = DocRowStatus::parse(&r.status).ok_or_else(|| {
            EngineError::db(
                self.store.path(),
                format!("doc row {}: status '{}'", r.id, r.status),
            )
        })?;
        let messages = match &r.messages_json {
            Some(j) => {
                serde_json::from_str::<Turns>(j)
                    .map_err(|e| {
                        EngineError::db(self.store.path(), format!("doc row {}: {e}", r.id))
                    })?
                    .messages
            }
            None => Vec::new(),
        };
        Ok(DocRow {
            id: r.id,
            chunk_id: r.chunk.id,
            status,
            messages,
            error: r.error.clone(),
            raw_output: r.raw_output.clone(),
            teacher: r.teacher.clone(),
            template: r.template_name.clone(),
            template_version: u32::try_from(r.template_version).unwrap_or(0),
            provenance: provenance(&r.chunk),
            passage: r.chunk.text.clone(),
            created_at: r.created_at.clone(),
            reviewed_at: r.reviewed_at.clone(),
        })
    }

    /// A set's generated rows (with their passages), by document, chunk, then id.
    pub fn docset_rows(&self, set_id: i64) -> Result<Vec<DocRow>, EngineError> {
        self.store
            .doc_rows(set_id)?
            .iter()
            .map(|r| self.doc_row_dto(r))
            .collect()
    }

    /// Accepts, rejects or edits one row. A failed row cannot be reviewed (regenerate it).
    /// An edit must stay a user turn then an assistant turn, neither empty.
    pub fn review_doc_row(
        &self,
        row_id: i64,
        action: &ReviewAction,
    ) -> Result<DocRow, EngineError> {
        let (row, _) = self
            .store
            .doc_row(row_id)?
            .ok_or_else(|| EngineError::NotFound {
                what: "generated row",
                id: row_id.to_string(),
            })?;
        if row.status == DocRowStatus::Failed.as_str() {
            return Err(EngineError::InvalidState(format!(
                "row {row_id} failed ({}); regenerate it instead",
                row.error.as_deref().unwrap_or("no row")
            )));
        }
        let now = now_rfc3339();
        let done = match action {
            ReviewAction::Accept => self.store.review_doc_row(row_id, "accepted", None, &now)?,
            ReviewAction::Reject => self.store.review_doc_row(row_id, "rejected", None, &now)?,
            ReviewAction::Edit { messages } => {
                check_edit(row_id, messages)?;
                let json = turns_json(messages);
                self.store
                    .review_doc_row(row_id, "edited", Some(&json), &now)?
            }
        };
        if !done {
            return Err(EngineError::NotFound {
                what: "generated row",
                id: row_id.to_string(),
            });
        }
        let (row, _) = self
            .store
            .doc_row(row_id)?
            .ok_or_else(|| EngineError::NotFound {
                what: "generated row",
                id: row_id.to_string(),
            })?;
        self.doc_row_dto(&row)
    }

    /// Accepts every pending row of a set; returns how many.
    pub fn accept_all_doc_rows(&self, set_id: i64) -> Result<u64, EngineError> {
        self.store.accept_pending_doc_rows(set_id, &now_rfc3339())
    }

    /// The stored template `name` (its newest version), or, with no name, the default
    /// template of `mode`, saved on first use.
    pub fn teacher_template(
        &self,
        mode: TeacherMode,
        name: Option<&str>,
    ) -> Result<TemplateRecord, EngineError> {
        if let Some(name) = name {
            return self.find_template(name);
        }
        let draft = teacher::default_template(mode);
        match self.find_template(&draft.name) {
            Ok(t) => Ok(t),
            Err(EngineError::NotFound { .. }) => self.save_template(&draft),
            Err(e) => Err(e),
        }
    }

    /// The plan of a teacher pass as `spec` describes it (its figures checked, the template
    /// looked up, or the mode's default one saved on first use).
    pub fn teach_plan(&self, spec: &TeachSpec) -> Result<TeachPlan, EngineError> {
        if !(1..=teacher::MAX_ROWS_PER_CHUNK as u32).contains(&spec.count) {
            return Err(EngineError::InvalidInput(format!(
                "rows per chunk {}: between 1 and {}",
                spec.count,
                teacher::MAX_ROWS_PER_CHUNK
            )));
        }
        if spec.max_tokens == 0 {
            return Err(EngineError::InvalidInput(
                "most tokens per chunk: at least 1".to_string(),
            ));
        }
        if !spec.temperature.is_finite() || spec.temperature < 0.0 {
            return Err(EngineError::InvalidInput(format!(
                "temperature {}: 0 (greedy) or positive",
                spec.temperature
            )));
        }
        if spec.max_chunks == Some(0) {
            return Err(EngineError::InvalidInput(
                "how many chunks: at least 1".to_string(),
            ));
        }
        let template = self.teacher_template(spec.mode, spec.template.as_deref())?;
        Ok(TeachPlan {
            target: spec.target.clone(),
            template,
            values: [("count".to_string(), spec.count.to_string())].into(),
            params: SamplingParams {
                max_tokens: spec.max_tokens,
                temperature: spec.temperature,
                seed: spec.seed,
                ..SamplingParams::default()
            },
            max_chunks: spec
                .max_chunks
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        })
    }

    /// Makes the chat dataset `name` from a set's accepted and edited rows, through the
    /// dataset import (a JSON Lines file written under `<data dir>/docsets/<set id>/`, each
    /// record with `id` = `doc-row-<row id>` and its `provenance`). The rows keep their
    /// provenance as the dataset rows' source ids ([`Engine::doc_row_provenance`]).
    pub fn docset_dataset(
        &self,
        set_id: i64,
        name: &str,
        split: Split,
    ) -> Result<DatasetSummary, EngineError> {
        let set = self.find_docset(&set_id.to_string())?;
        let rows = self.docset_rows(set_id)?;
        let kept: Vec<&DocRow> = rows.iter().filter(|r| r.status.is_kept()).collect();
        if kept.is_empty() {
            return Err(EngineError::InvalidState(format!(
                "document set '{}' has no accepted rows ({} pending): review them first \
                 (`attune data review {}`)",
                set.name, set.pending, set.name
            )));
        }
        let mut jsonl = String::new();
        for r in kept {
            let record = serde_json::json!({
                "id": format!("{SOURCE_ID_PREFIX}{}", r.id),
                "messages": r.messages,
                "provenance": {
                    "docset": set.name,
                    "document": r.provenance.document,
                    "page_start": r.provenance.page_start,
                    "page_end": r.provenance.page_end,
                    "section": r.provenance.section,
                    "teacher": r.teacher,
                    "template": r.template,
                    "template_version": r.template_version,
                    "status": r.status.as_str(),
                },
            });
            jsonl.push_str(&record.to_string());
            jsonl.push('\n');
        }
        let path = self.write_docset_file(set_id, &format!("{name}.chat.jsonl"), &jsonl)?;
        self.import_dataset(
            &path,
            &ImportOptions {
                name: Some(name.to_string()),
                format: Some(DatasetFormat::Chat),
                split,
                ..ImportOptions::default()
            },
        )
    }

    /// Makes the plain-text dataset `name` (continued pre-training) from a set's chunks: one
    /// row per chunk, its paragraphs joined by line breaks. The text file it imports is kept
    /// under `<data dir>/docsets/<set id>/`.
    pub fn docset_pretrain_dataset(
        &self,
        set_id: i64,
        name: &str,
        split: Split,
    ) -> Result<DatasetSummary, EngineError> {
        self.find_docset(&set_id.to_string())?;
        let chunks = self.store.docset_chunks(set_id)?;
        let mut text = String::new();
        for c in &chunks {
            // One paragraph of the text import per chunk: no blank line inside.
            let block = c
                .text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            text.push_str(&block);
            text.push_str("\n\n");
        }
        let path = self.write_docset_file(set_id, &format!("{name}.pretrain.txt"), &text)?;
        self.import_dataset(
            &path,
            &ImportOptions {
                name: Some(name.to_string()),
                format: Some(DatasetFormat::Text),
                paragraphs: true,
                split,
                ..ImportOptions::default()
            },
        )
    }

    /// Where a dataset row made from a set came from: its generated row, by the row's
    /// source id (`doc-row-<id>`). None for other source ids.
    pub fn doc_row_provenance(&self, source_id: &str) -> Result<Option<DocRow>, EngineError> {
        let Some(id) = source_id
            .strip_prefix(SOURCE_ID_PREFIX)
            .and_then(|s| s.parse::<i64>().ok())
        else {
            return Ok(None);
        };
        match self.store.doc_row(id)? {
            Some((r, _)) => self.doc_row_dto(&r).map(Some),
            None => Ok(None),
        }
    }

    fn write_docset_file(
        &self,
        set_id: i64,
        file: &str,
        text: &str,
    ) -> Result<PathBuf, EngineError> {
        let safe: String = file
            .chars()
            .map(|c| {
                if c.is_alphanumeric() || matches!(c, '.' | '-' | '_') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir = self.data_dir().join("docsets").join(set_id.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| EngineError::Write {
            path: dir.clone(),
            source: e,
        })?;
        let path = dir.join(safe);
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| EngineError::Write {
                path: path.clone(),
                source: e,
            })?;
        Ok(path)
    }
}

fn check_edit(row_id: i64, messages: &[ChatMessage]) -> Result<(), EngineError> {
    let ok = matches!(messages, [u, a] if u.role == "user" && a.role == "assistant")
        || matches!(messages, [s, u, a] if s.role == "system" && u.role == "user" && a.role == "assistant");
    if !ok {
        return Err(EngineError::InvalidInput(format!(
            "row {row_id}: an edited row is a user turn then an assistant turn (a system turn \
             may come first)"
        )));
    }
    if let Some(m) = messages.iter().find(|m| m.content.trim().is_empty()) {
        return Err(EngineError::InvalidInput(format!(
            "row {row_id}: the {} turn is empty",
            m.role
        )));
    }
    Ok(())
}

/// One chunk through the teacher: the rows to store (pending rows, or one failed row).
fn teach_chunk(
    actor: &Actor,
    plan: &TeachPlan,
    teacher: &str,
    chunk: &DocChunkRow,
    cancel: &CancelToken,
) -> Result<Vec<NewDocRow>, EngineError> {
    let prov = provenance(chunk);
    let mut values = plan.values.clone();
    values.insert("document".to_string(), prov.document.clone());
    let where_ = match (&prov.section, prov.page_start) {
        (Some(s), _) => s.clone(),
        (None, Some(_)) => prov
            .describe()
            .trim_start_matches(&prov.document)
            .trim_start_matches(", ")
            .to_string(),
        (None, None) => "(none)".to_string(),
    };
    values.insert("section".to_string(), where_);
    let template = crate::templates::record_template(&plan.template, &values);
    let expanded = crate::templates::expand(
        &template,
        &[ChatMessage {
            role: "user".to_string(),
            content: chunk.text.clone(),
        }],
    );
    let generation = Generation {
        client: "docs".to_string(),
        target: plan.target.clone(),
        prompt: Prompt::Chat(expanded.messages),
        params: plan.params.clone(),
    };
    let stats = actor.generate_here(generation, cancel, &mut |_: ChatEvent| {})?;
    // An answer cut off by Cancel is not the teacher's answer: nothing is stored for it.
    if stats.finish_reason == FinishReason::Cancelled || cancel.is_cancelled() {
        return Err(EngineError::Cancelled);
    }
    let base = NewDocRow {
        chunk_id: chunk.id,
        status: String::new(),
        messages_json: None,
        raw_output: stats.text.clone(),
        error: None,
        teacher: teacher.to_string(),
        template_id: Some(plan.template.id),
        template_name: plan.template.name.clone(),
        template_version: i64::from(plan.template.version),
        created_at: now_rfc3339(),
    };
    Ok(match teacher::parse_answer(&stats.text) {
        Ok(pairs) => pairs
            .iter()
            .map(|p| NewDocRow {
                status: DocRowStatus::Pending.as_str().to_string(),
                messages_json: Some(turns_json(&p.messages())),
                ..base.clone()
            })
            .collect(),
        Err(reason) => vec![NewDocRow {
            status: DocRowStatus::Failed.as_str().to_string(),
            error: Some(reason),
            ..base
        }],
    })
}

/// Runs the teacher over a set's chunks that have no rows yet (the first
/// `plan.max_chunks` of them), storing each chunk's rows as soon as they are read;
/// `on_chunk` hears (0, chunks to do) first, then (chunks done, chunks to do) after each.
/// Cancel stops the current chunk's answer (nothing is stored for it; the rows of the
/// chunks before it stay) and the pass ends with [`EngineError::Cancelled`].
pub fn teach(
    actor: &Actor,
    set_id: i64,
    plan: &TeachPlan,
    cancel: &CancelToken,
    on_chunk: &mut dyn FnMut(u64, u64),
) -> Result<TeachReport, EngineError> {
    let engine = actor.engine();
    engine.find_docset(&set_id.to_string())?;
    let teacher = engine.target_label(&plan.target)?;
    let done: std::collections::HashSet<i64> = engine
        .store
        .doc_rows(set_id)?
        .iter()
        .map(|r| r.chunk.id)
        .collect();
    let mut todo: Vec<DocChunkRow> = engine
        .store
        .docset_chunks(set_id)?
        .into_iter()
        .filter(|c| !done.contains(&c.id))
        .collect();
    if let Some(n) = plan.max_chunks {
        todo.truncate(n);
    }
    let total = todo.len() as u64;
    let mut report = TeachReport::default();
    on_chunk(0, total);
    for chunk in &todo {
        if cancel.is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        let rows = teach_chunk(actor, plan, &teacher, chunk, cancel)?;
        engine.store.insert_doc_rows(&rows)?;
        report.chunks += 1;
        if rows.iter().any(|r| r.error.is_some()) {
            report.failed += 1;
        } else {
            report.rows += rows.len() as u64;
        }
        on_chunk(report.chunks, total);
    }
    Ok(report)
}

/// Asks the teacher again for the chunk of row `row_id`: the row (unless already rejected)
/// is rejected and the new rows are added as pending (or one failed row). Returns the new rows.
/// A cancelled answer changes nothing.
pub fn regenerate(
    actor: &Actor,
    row_id: i64,
    plan: &TeachPlan,
    cancel: &CancelToken,
) -> Result<Vec<DocRow>, EngineError> {
    let engine = actor.engine();
    let (row, set_id) = engine
        .store
        .doc_row(row_id)?
        .ok_or_else(|| EngineError::NotFound {
            what: "generated row",
            id: row_id.to_string(),
        })?;
    let teacher = engine.target_label(&plan.target)?;
    let before: std::collections::HashSet<i64> = engine
        .store
        .doc_rows(set_id)?
        .iter()
        .map(|r| r.id)
        .collect();
    let rows = teach_chunk(actor, plan, &teacher, &row.chunk, cancel)?;
    engine.store.insert_doc_rows(&rows)?;
    if row.status != DocRowStatus::Rejected.as_str() && row.status != DocRowStatus::Failed.as_str()
    {
        engine
            .store
            .review_doc_row(row_id, "rejected", None, &now_rfc3339())?;
    }
    engine
        .store
        .doc_rows(set_id)?
        .iter()
        .filter(|r| !before.contains(&r.id))
        .map(|r| engine.doc_row_dto(r))
        .collect()
}
