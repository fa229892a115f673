//! The `exports` table of migration 0006. JSON columns stay strings here (the export module
//! owns their meaning).

use rusqlite::{params, Row};

use super::Store;
use crate::error::EngineError;

/// An `exports` row (`id` is ignored on insert).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExportRow {
    pub id: i64,
    pub model_id: Option<i64>,
    pub adapter_id: Option<i64>,
    pub subject_name: String,
    pub format: String,
    pub quant: String,
    pub path: String,
    pub files_json: String,
    pub bytes: i64,
    /// "passed" or "failed".
    pub verification: String,
    pub verification_json: String,
    pub attune_version: String,
    pub created_at: String,
}

const COLUMNS: &str = "id, model_id, adapter_id, subject_name, format, quant, path, files_json, \
     bytes, verification, verification_json, attune_version, created_at";

fn export_row(r: &Row<'_>) -> rusqlite::Result<ExportRow> {
    Ok(ExportRow {
        id: r.get(0)?,
        model_id: r.get(1)?,
        adapter_id: r.get(2)?,
        subject_name: r.get(3)?,
        format: r.get(4)?,
        quant: r.get(5)?,
        path: r.get(6)?,
        files_json: r.get(7)?,
        bytes: r.get(8)?,
        verification: r.get(9)?,
        verification_json: r.get(10)?,
        attune_version: r.get(11)?,
        created_at: r.get(12)?,
    })
}

impl Store {
    /// Records an export; returns it with its id.
    pub fn insert_export(&self, e: &ExportRow) -> Result<ExportRow, EngineError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO exports (model_id, adapter_id, subject_name, format, quant, path, \
             files_json, bytes, verification, verification_json, attune_version, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                e.model_id,
                e.adapter_id,
                e.subject_name,
                e.format,
                e.quant,
                e.path,
                e.files_json,
                e.bytes,
                e.verification,
                e.verification_json,
                e.attune_version,
                e.created_at
            ],
        )
        .map_err(|err| self.err(err))?;
        Ok(ExportRow {
            id: conn.last_insert_rowid(),
            ..e.clone()
        })
    }

    /// All exports, newest first.
    pub fn list_exports(&self) -> Result<Vec<ExportRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {COLUMNS} FROM exports ORDER BY id DESC"))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], export_row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }
}
