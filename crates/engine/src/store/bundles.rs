//! The `run_bundles` table of migration 0008: runs exported for another training engine, and
//! the provenance of the results imported from them.

use rusqlite::{params, Row};

use super::{insert_adapter_tx, write_tx, AdapterRow, MetricRow, Store};
use crate::error::EngineError;

/// A `run_bundles` row (`id` is ignored on insert).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BundleRow {
    pub id: i64,
    pub run_id: i64,
    /// "trl" or "axolotl".
    pub engine: String,
    pub sha256: String,
    pub path: String,
    pub attune_version: String,
    pub created_at: String,
    pub adapter_id: Option<i64>,
    pub engine_version: Option<String>,
    pub result_path: Option<String>,
    pub imported_at: Option<String>,
}

const COLUMNS: &str = "id, run_id, engine, sha256, path, attune_version, created_at, adapter_id, \
     engine_version, result_path, imported_at";

fn bundle_row(r: &Row<'_>) -> rusqlite::Result<BundleRow> {
    Ok(BundleRow {
        id: r.get(0)?,
        run_id: r.get(1)?,
        engine: r.get(2)?,
        sha256: r.get(3)?,
        path: r.get(4)?,
        attune_version: r.get(5)?,
        created_at: r.get(6)?,
        adapter_id: r.get(7)?,
        engine_version: r.get(8)?,
        result_path: r.get(9)?,
        imported_at: r.get(10)?,
    })
}

/// What importing a bundle's result writes, in one transaction.
pub(crate) struct ImportedResult<'a> {
    pub bundle_id: i64,
    pub adapter: &'a AdapterRow,
    pub metrics: &'a [MetricRow],
    pub steps: i64,
    pub engine_version: &'a str,
    pub result_path: &'a str,
    pub now: &'a str,
}

impl Store {
    /// Records an exported bundle; returns it with its id.
    pub fn insert_bundle(&self, b: &BundleRow) -> Result<BundleRow, EngineError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO run_bundles (run_id, engine, sha256, path, attune_version, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                b.run_id,
                b.engine,
                b.sha256,
                b.path,
                b.attune_version,
                b.created_at
            ],
        )
        .map_err(|e| self.err(e))?;
        let id = conn.last_insert_rowid();
        conn.query_row(
            &format!("SELECT {COLUMNS} FROM run_bundles WHERE id = ?1"),
            [id],
            bundle_row,
        )
        .map_err(|e| self.err(e))
    }

    /// A run's bundles, oldest first.
    pub fn run_bundles(&self, run_id: i64) -> Result<Vec<BundleRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM run_bundles WHERE run_id = ?1 ORDER BY id"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([run_id], bundle_row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Registers an imported result in one transaction: the adapter (linked to the run), the
    /// engine's training log as the run's metrics (replacing any), the run completed at the
    /// engine's step count, and the bundle's provenance. A failure leaves the library as it was.
    pub(crate) fn import_bundle_result(
        &self,
        run_id: i64,
        r: &ImportedResult<'_>,
    ) -> Result<AdapterRow, EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        let adapter = insert_adapter_tx(&tx, r.adapter)
            .map_err(|e| self.err(format!("adapter '{}': {e}", r.adapter.name)))?;
        tx.execute("DELETE FROM run_metrics WHERE run_id = ?1", [run_id])
            .map_err(|e| self.err(e))?;
        for m in r.metrics {
            tx.execute(
                "INSERT OR REPLACE INTO run_metrics (run_id, step, kind, loss, lr, grad_norm, \
                 tokens_per_s, memory_mb, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    run_id,
                    m.step,
                    m.kind,
                    m.loss,
                    m.lr,
                    m.grad_norm,
                    m.tokens_per_s,
                    m.memory_mb,
                    m.at
                ],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.execute(
            "UPDATE runs SET status = 'completed', error = NULL, pid = NULL, step = ?2, \
             heartbeat_at = ?3, finished_at = ?3 WHERE id = ?1",
            params![run_id, r.steps, r.now],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE run_bundles SET adapter_id = ?2, engine_version = ?3, result_path = ?4, \
             imported_at = ?5 WHERE id = ?1",
            params![
                r.bundle_id,
                adapter.id,
                r.engine_version,
                r.result_path,
                r.now
            ],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(adapter)
    }
}
