//! The tables of migration 0007: document sets, their documents and chunks, and the rows a
//! teacher wrote, held for review. JSON columns stay strings here (`docs` owns them).

use rusqlite::{params, OptionalExtension, Row};

use super::{write_tx, Store};
use crate::error::EngineError;

/// A `docsets` row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DocsetRow {
    pub id: i64,
    pub name: String,
    pub source_dir: String,
    pub max_chunk_chars: i64,
    pub skipped_json: String,
    pub created_at: String,
}

/// A `doc_documents` row (`id`, `docset_id` ignored on insert), with its chunk count when read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DocDocumentRow {
    pub id: i64,
    pub docset_id: i64,
    pub path: String,
    pub format: String,
    pub sha256: String,
    pub bytes: i64,
    pub pages: Option<i64>,
    pub chars: i64,
    pub chunks: i64,
}

/// A `doc_chunks` row (`id`, `document_id` ignored on insert).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DocChunkRow {
    pub id: i64,
    pub document_id: i64,
    pub idx: i64,
    pub section: Option<String>,
    pub page_start: Option<i64>,
    pub page_end: Option<i64>,
    pub text: String,
    /// The document's path (read only).
    pub document: String,
}

/// A generated row to insert.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewDocRow {
    pub chunk_id: i64,
    pub status: String,
    pub messages_json: Option<String>,
    pub raw_output: String,
    pub error: Option<String>,
    pub teacher: String,
    pub template_id: Option<i64>,
    pub template_name: String,
    pub template_version: i64,
    pub created_at: String,
}

/// A `doc_rows` row with its chunk.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DocRowRow {
    pub id: i64,
    pub status: String,
    pub messages_json: Option<String>,
    pub original_json: Option<String>,
    pub raw_output: String,
    pub error: Option<String>,
    pub teacher: String,
    pub template_name: String,
    pub template_version: i64,
    pub created_at: String,
    pub reviewed_at: Option<String>,
    pub chunk: DocChunkRow,
}

const DOCSET_COLUMNS: &str = "id, name, source_dir, max_chunk_chars, skipped_json, created_at";

fn docset_row(r: &Row<'_>) -> rusqlite::Result<DocsetRow> {
    Ok(DocsetRow {
        id: r.get(0)?,
        name: r.get(1)?,
        source_dir: r.get(2)?,
        max_chunk_chars: r.get(3)?,
        skipped_json: r.get(4)?,
        created_at: r.get(5)?,
    })
}

const CHUNK_COLUMNS: &str = "c.id, c.document_id, c.idx, c.section, c.page_start, c.page_end, \
     c.text, d.path";

/// Reads a chunk from 8 columns starting at `at`.
fn chunk_at(r: &Row<'_>, at: usize) -> rusqlite::Result<DocChunkRow> {
    Ok(DocChunkRow {
        id: r.get(at)?,
        document_id: r.get(at + 1)?,
        idx: r.get(at + 2)?,
        section: r.get(at + 3)?,
        page_start: r.get(at + 4)?,
        page_end: r.get(at + 5)?,
        text: r.get(at + 6)?,
        document: r.get(at + 7)?,
    })
}

const ROW_COLUMNS: &str = "r.id, r.status, r.messages_json, r.original_json, r.raw_output, \
     r.error, r.teacher, r.template_name, r.template_version, r.created_at, r.reviewed_at";

fn doc_row(r: &Row<'_>) -> rusqlite::Result<DocRowRow> {
    Ok(DocRowRow {
        id: r.get(0)?,
        status: r.get(1)?,
        messages_json: r.get(2)?,
        original_json: r.get(3)?,
        raw_output: r.get(4)?,
        error: r.get(5)?,
        teacher: r.get(6)?,
        template_name: r.get(7)?,
        template_version: r.get(8)?,
        created_at: r.get(9)?,
        reviewed_at: r.get(10)?,
        chunk: chunk_at(r, 11)?,
    })
}

impl Store {
    /// Records a set with its documents and their chunks in one transaction. `Err(Some)`
    /// when the name is taken (the existing set), nothing written.
    pub fn insert_docset(
        &self,
        set: &DocsetRow,
        documents: &[(DocDocumentRow, Vec<DocChunkRow>)],
    ) -> Result<Result<DocsetRow, DocsetRow>, EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        let existing = tx
            .query_row(
                &format!("SELECT {DOCSET_COLUMNS} FROM docsets WHERE name = ?1"),
                [&set.name],
                docset_row,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some(row) = existing {
            return Ok(Err(row));
        }
        tx.execute(
            "INSERT INTO docsets (name, source_dir, max_chunk_chars, skipped_json, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                set.name,
                set.source_dir,
                set.max_chunk_chars,
                set.skipped_json,
                set.created_at
            ],
        )
        .map_err(|e| self.err(e))?;
        let set_id = tx.last_insert_rowid();
        for (doc, chunks) in documents {
            tx.execute(
                "INSERT INTO doc_documents (docset_id, path, format, sha256, bytes, pages, chars) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![set_id, doc.path, doc.format, doc.sha256, doc.bytes, doc.pages, doc.chars],
            )
            .map_err(|e| self.err(e))?;
            let doc_id = tx.last_insert_rowid();
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO doc_chunks (document_id, idx, section, page_start, page_end, \
                     text) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(|e| self.err(e))?;
            for c in chunks {
                stmt.execute(params![
                    doc_id,
                    c.idx,
                    c.section,
                    c.page_start,
                    c.page_end,
                    c.text
                ])
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Ok(DocsetRow {
            id: set_id,
            ..set.clone()
        }))
    }

    /// All sets, oldest first.
    pub fn list_docsets(&self) -> Result<Vec<DocsetRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {DOCSET_COLUMNS} FROM docsets ORDER BY id"))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], docset_row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    pub fn delete_docset(&self, id: i64) -> Result<bool, EngineError> {
        let conn = self.conn();
        let n = conn
            .execute("DELETE FROM docsets WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    /// A set's documents with their chunk counts, by path.
    pub fn docset_documents(&self, set_id: i64) -> Result<Vec<DocDocumentRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT d.id, d.docset_id, d.path, d.format, d.sha256, d.bytes, d.pages, d.chars, \
                 (SELECT count(*) FROM doc_chunks c WHERE c.document_id = d.id) \
                 FROM doc_documents d WHERE d.docset_id = ?1 ORDER BY d.path",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([set_id], |r| {
                Ok(DocDocumentRow {
                    id: r.get(0)?,
                    docset_id: r.get(1)?,
                    path: r.get(2)?,
                    format: r.get(3)?,
                    sha256: r.get(4)?,
                    bytes: r.get(5)?,
                    pages: r.get(6)?,
                    chars: r.get(7)?,
                    chunks: r.get(8)?,
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// A set's chunks, by document path then position.
    pub fn docset_chunks(&self, set_id: i64) -> Result<Vec<DocChunkRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {CHUNK_COLUMNS} FROM doc_chunks c JOIN doc_documents d \
                 ON d.id = c.document_id WHERE d.docset_id = ?1 ORDER BY d.path, c.idx"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([set_id], |r| chunk_at(r, 0))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Inserts generated rows in one transaction.
    pub fn insert_doc_rows(&self, rows: &[NewDocRow]) -> Result<(), EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO doc_rows (chunk_id, status, messages_json, raw_output, error, \
                     teacher, template_id, template_name, template_version, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(|e| self.err(e))?;
            for r in rows {
                stmt.execute(params![
                    r.chunk_id,
                    r.status,
                    r.messages_json,
                    r.raw_output,
                    r.error,
                    r.teacher,
                    r.template_id,
                    r.template_name,
                    r.template_version,
                    r.created_at
                ])
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// A set's generated rows with their chunks, in chunk order then id.
    pub fn doc_rows(&self, set_id: i64) -> Result<Vec<DocRowRow>, EngineError> {
        self.query_doc_rows("d.docset_id = ?1", set_id)
    }

    /// One generated row with its chunk and its set's id.
    pub fn doc_row(&self, id: i64) -> Result<Option<(DocRowRow, i64)>, EngineError> {
        let conn = self.conn();
        conn.query_row(
            &format!(
                "SELECT {ROW_COLUMNS}, {CHUNK_COLUMNS}, d.docset_id FROM doc_rows r \
                 JOIN doc_chunks c ON c.id = r.chunk_id JOIN doc_documents d \
                 ON d.id = c.document_id WHERE r.id = ?1"
            ),
            [id],
            |r| Ok((doc_row(r)?, r.get(19)?)),
        )
        .optional()
        .map_err(|e| self.err(e))
    }

    fn query_doc_rows(&self, filter: &str, key: i64) -> Result<Vec<DocRowRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {ROW_COLUMNS}, {CHUNK_COLUMNS} FROM doc_rows r \
                 JOIN doc_chunks c ON c.id = r.chunk_id JOIN doc_documents d \
                 ON d.id = c.document_id WHERE {filter} ORDER BY d.path, c.idx, r.id"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([key], doc_row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Sets a row's status (and, for an edit, its turns, keeping the teacher's first turns in
    /// `original_json`). Failed rows cannot be reviewed. False when no such reviewable row.
    pub fn review_doc_row(
        &self,
        id: i64,
        status: &str,
        messages_json: Option<&str>,
        reviewed_at: &str,
    ) -> Result<bool, EngineError> {
        let conn = self.conn();
        let n = match messages_json {
            Some(m) => conn.execute(
                "UPDATE doc_rows SET status = ?2, \
                 original_json = coalesce(original_json, messages_json), messages_json = ?3, \
                 reviewed_at = ?4 WHERE id = ?1 AND status <> 'failed'",
                params![id, status, m, reviewed_at],
            ),
            None => conn.execute(
                "UPDATE doc_rows SET status = ?2, reviewed_at = ?3 \
                 WHERE id = ?1 AND status <> 'failed'",
                params![id, status, reviewed_at],
            ),
        }
        .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    /// Accepts every pending row of a set; returns how many.
    pub fn accept_pending_doc_rows(&self, set_id: i64, at: &str) -> Result<u64, EngineError> {
        let conn = self.conn();
        let n = conn
            .execute(
                "UPDATE doc_rows SET status = 'accepted', reviewed_at = ?2 \
                 WHERE status = 'pending' AND chunk_id IN (SELECT c.id FROM doc_chunks c \
                 JOIN doc_documents d ON d.id = c.document_id WHERE d.docset_id = ?1)",
                params![set_id, at],
            )
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }
}
