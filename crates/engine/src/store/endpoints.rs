//! The `endpoints` table of migration 0005: remote API endpoints. Keys are not here.

use rusqlite::{params, OptionalExtension, Row};

use super::Store;
use crate::error::EngineError;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EndpointRow {
    pub id: i64,
    pub name: String,
    pub base_url: String,
    pub has_key: bool,
    pub connect_timeout_s: f64,
    pub idle_timeout_s: f64,
    pub models_json: String,
    pub models_at: Option<String>,
    pub created_at: String,
}

const COLUMNS: &str = "id, name, base_url, has_key, connect_timeout_s, idle_timeout_s, \
     models_json, models_at, created_at";

fn row(r: &Row<'_>) -> rusqlite::Result<EndpointRow> {
    Ok(EndpointRow {
        id: r.get(0)?,
        name: r.get(1)?,
        base_url: r.get(2)?,
        has_key: r.get::<_, i64>(3)? != 0,
        connect_timeout_s: r.get(4)?,
        idle_timeout_s: r.get(5)?,
        models_json: r.get(6)?,
        models_at: r.get(7)?,
        created_at: r.get(8)?,
    })
}

impl Store {
    pub fn insert_endpoint(&self, e: &EndpointRow) -> Result<EndpointRow, EngineError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO endpoints (name, base_url, has_key, connect_timeout_s, idle_timeout_s, \
             models_json, models_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                e.name,
                e.base_url,
                i64::from(e.has_key),
                e.connect_timeout_s,
                e.idle_timeout_s,
                e.models_json,
                e.models_at,
                e.created_at
            ],
        )
        .map_err(|err| self.err(format!("endpoint '{}': {err}", e.name)))?;
        let id = conn.last_insert_rowid();
        drop(conn);
        self.get_endpoint(id)?
            .ok_or_else(|| self.err(format!("endpoint {id} vanished after insert")))
    }

    pub fn get_endpoint(&self, id: i64) -> Result<Option<EndpointRow>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM endpoints WHERE id = ?1"),
                [id],
                row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn find_endpoint_by_name(&self, name: &str) -> Result<Option<EndpointRow>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM endpoints WHERE name = ?1"),
                [name],
                row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn list_endpoints(&self) -> Result<Vec<EndpointRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {COLUMNS} FROM endpoints ORDER BY id"))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], row)
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e));
        rows
    }

    pub fn set_endpoint_models(
        &self,
        id: i64,
        models_json: &str,
        at: &str,
    ) -> Result<(), EngineError> {
        self.conn()
            .execute(
                "UPDATE endpoints SET models_json = ?2, models_at = ?3 WHERE id = ?1",
                params![id, models_json, at],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn delete_endpoint(&self, id: i64) -> Result<bool, EngineError> {
        let n = self
            .conn()
            .execute("DELETE FROM endpoints WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }
}

/// An `endpoint_evaluations` row (`id` is ignored on insert).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EndpointEvalRow {
    pub endpoint_id: i64,
    pub model: String,
    pub template: Option<String>,
    pub dataset_id: i64,
    pub split: String,
    pub n_rows: i64,
    pub accuracy: Option<f64>,
    pub n_labeled: i64,
    pub created_at: String,
}

impl Store {
    pub fn insert_endpoint_evaluation(&self, r: &EndpointEvalRow) -> Result<i64, EngineError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO endpoint_evaluations (endpoint_id, model, template, dataset_id, split, \
             n_rows, accuracy, n_labeled, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                r.endpoint_id,
                r.model,
                r.template,
                r.dataset_id,
                r.split,
                r.n_rows,
                r.accuracy,
                r.n_labeled,
                r.created_at
            ],
        )
        .map_err(|e| self.err(e))?;
        Ok(conn.last_insert_rowid())
    }
}
