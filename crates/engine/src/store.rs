//! The SQLite library (`<data dir>/library.sqlite3`): the only module that speaks SQL.
//!
//! The schema lives in numbered migrations embedded in the binary
//! (`migrations/NNNN_*.sql`); each is applied in its own transaction together with
//! `PRAGMA user_version = N`. A database from a newer build is refused, never touched.
//! Rows here are plain structs, separate from the protocol DTOs.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use crate::error::EngineError;

pub(crate) mod bundles;
mod docs;
mod endpoints;
mod exports;
mod judge;
mod prefs;
mod workbench;
pub(crate) use docs::{DocChunkRow, DocDocumentRow, DocRowRow, DocsetRow, NewDocRow};
pub(crate) use endpoints::{EndpointEvalRow, EndpointRow};
pub(crate) use exports::ExportRow;
pub(crate) use judge::{JudgeVoteRow, RubricRow};
pub(crate) use prefs::{insert_pref_set, PrefSetRow};
pub(crate) use workbench::{
    ArenaItemRow, ArenaRecord, ConversationRow, NewArena, TemplateContent, TemplateVersionRow,
};

/// Numbered migrations, in order. `user_version` = how many have been applied.
pub(crate) const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../migrations/0001_init.sql")),
    (
        "0002_datasets",
        include_str!("../migrations/0002_datasets.sql"),
    ),
    ("0003_runs", include_str!("../migrations/0003_runs.sql")),
    (
        "0004_workbench",
        include_str!("../migrations/0004_workbench.sql"),
    ),
    (
        "0005_endpoints",
        include_str!("../migrations/0005_endpoints.sql"),
    ),
    (
        "0006_exports",
        include_str!("../migrations/0006_exports.sql"),
    ),
    ("0007_docs", include_str!("../migrations/0007_docs.sql")),
    (
        "0008_bundles",
        include_str!("../migrations/0008_bundles.sql"),
    ),
    ("0009_judge", include_str!("../migrations/0009_judge.sql")),
    ("0010_dpo", include_str!("../migrations/0010_dpo.sql")),
    (
        "0011_measure",
        include_str!("../migrations/0011_measure.sql"),
    ),
];

/// How long a statement waits for another process's write lock before failing. Imports of
/// large datasets hold it for seconds; the app, the CLI and scripts may write at once.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Starts a write transaction: `BEGIN IMMEDIATE`, which takes the write lock up front (waiting
/// up to [`BUSY_TIMEOUT`] for other processes). A `DEFERRED` transaction that reads first and
/// writes later fails at once with "database is locked" when another process wrote in between
/// (WAL cannot upgrade its stale read snapshot), which is what concurrent imports hit.
pub(crate) fn write_tx(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

/// File name of the library inside the data directory.
pub const DATABASE_FILE: &str = "library.sqlite3";

/// A `models` row as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelRow {
    pub id: i64,
    pub name: String,
    pub architecture: String,
    /// "gguf" or "safetensors".
    pub format: String,
    pub parameters: i64,
    pub quantization: String,
    pub context_length: i64,
    pub file_size: i64,
    pub sha256: String,
    /// What the runtime loads: a `.gguf` file or a safetensors folder.
    pub path: String,
    /// "local" or "hub".
    pub source_kind: String,
    pub source_repo: Option<String>,
    pub source_revision: Option<String>,
    pub added_at: String,
}

/// A model to insert; `name` is the wanted name, de-duplicated on insert.
#[derive(Debug, Clone)]
pub(crate) struct NewModel {
    pub name: String,
    pub architecture: String,
    pub format: String,
    pub parameters: i64,
    pub quantization: String,
    pub context_length: i64,
    pub file_size: i64,
    pub sha256: String,
    pub path: String,
    pub source_kind: String,
    pub source_repo: Option<String>,
    pub source_revision: Option<String>,
    pub added_at: String,
}

const MODEL_COLUMNS: &str = "id, name, architecture, format, parameters, quantization, \
     context_length, file_size, sha256, path, source_kind, source_repo, source_revision, added_at";

fn model_row(r: &Row<'_>) -> rusqlite::Result<ModelRow> {
    Ok(ModelRow {
        id: r.get(0)?,
        name: r.get(1)?,
        architecture: r.get(2)?,
        format: r.get(3)?,
        parameters: r.get(4)?,
        quantization: r.get(5)?,
        context_length: r.get(6)?,
        file_size: r.get(7)?,
        sha256: r.get(8)?,
        path: r.get(9)?,
        source_kind: r.get(10)?,
        source_repo: r.get(11)?,
        source_revision: r.get(12)?,
        added_at: r.get(13)?,
    })
}

/// A `datasets` row as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DatasetRecord {
    pub id: i64,
    pub name: String,
    pub format: String,
    pub kind: String,
    pub source_path: String,
    pub content_hash: String,
    pub created_at: String,
    pub train_rows: i64,
    pub valid_rows: i64,
    pub test_rows: i64,
    pub duplicates_removed: i64,
    pub bad_rows_skipped: i64,
    pub split_spec: String,
}

/// A dataset to insert (`id` is ignored).
pub(crate) type NewDataset = DatasetRecord;

/// A `dataset_rows` row, as stored and as inserted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredRow {
    pub split: String,
    pub idx: i64,
    pub kind: String,
    pub data: String,
    pub label: Option<String>,
    pub source_id: Option<String>,
    pub source_line: Option<i64>,
}

const DATASET_COLUMNS: &str = "id, name, format, kind, source_path, content_hash, created_at, \
     train_rows, valid_rows, test_rows, duplicates_removed, bad_rows_skipped, split_spec";

fn dataset_record(r: &Row<'_>) -> rusqlite::Result<DatasetRecord> {
    Ok(DatasetRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        format: r.get(2)?,
        kind: r.get(3)?,
        source_path: r.get(4)?,
        content_hash: r.get(5)?,
        created_at: r.get(6)?,
        train_rows: r.get(7)?,
        valid_rows: r.get(8)?,
        test_rows: r.get(9)?,
        duplicates_removed: r.get(10)?,
        bad_rows_skipped: r.get(11)?,
        split_spec: r.get(12)?,
    })
}

/// What inserting a dataset can run into besides a database error.
#[derive(Debug)]
pub(crate) enum InsertDataset {
    Inserted(DatasetRecord),
    /// A dataset with that name exists already (nothing was written).
    NameTaken(DatasetRecord),
}

/// The open library database.
pub(crate) struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Store, EngineError> {
        let db = |e: rusqlite::Error| EngineError::db(path, e);
        let mut conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
        // Any transaction opened without `write_tx` is IMMEDIATE too.
        conn.set_transaction_behavior(TransactionBehavior::Immediate);
        // `journal_mode` returns a row; reading it also proves the file is a database. The
        // switch needs a moment alone with the file: a process opening a fresh library while
        // another one is switching it sees the old mode or "busy" and tries again.
        let started = std::time::Instant::now();
        loop {
            let mode = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0));
            let retry = match &mode {
                Ok(m) if m.eq_ignore_ascii_case("wal") => break,
                Ok(_) => true,
                Err(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ),
                Err(_) => false,
            };
            if !retry || started.elapsed() > BUSY_TIMEOUT {
                return Err(match mode {
                    Ok(m) => EngineError::db(
                        path,
                        format!("cannot switch to WAL journal mode (got '{m}')"),
                    ),
                    Err(e) => db(e),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        conn.pragma_update(None, "foreign_keys", true).map_err(db)?;
        migrate(&mut conn, path)?;
        Ok(Store {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions
        // roll back on drop), so a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, e: impl std::fmt::Display) -> EngineError {
        EngineError::db(&self.path, e)
    }

    /// `PRAGMA user_version`.
    #[cfg(test)]
    pub fn user_version(&self) -> Result<i64, EngineError> {
        self.conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// `PRAGMA integrity_check`: "ok" when the file is sound.
    #[cfg(test)]
    pub fn integrity_check(&self) -> Result<String, EngineError> {
        self.conn()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// All models, oldest first.
    pub fn list_models(&self) -> Result<Vec<ModelRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {MODEL_COLUMNS} FROM models ORDER BY id"))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], model_row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    pub fn get_model(&self, id: i64) -> Result<Option<ModelRow>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {MODEL_COLUMNS} FROM models WHERE id = ?1"),
                [id],
                model_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Models whose name equals `name` (names are unique, so at most one).
    pub fn find_by_name(&self, name: &str) -> Result<Option<ModelRow>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = ?1"),
                [name],
                model_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Models whose name equals `name` ignoring ASCII case.
    pub fn find_by_name_nocase(&self, name: &str) -> Result<Vec<ModelRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {MODEL_COLUMNS} FROM models WHERE name = ?1 COLLATE NOCASE ORDER BY id"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([name], model_row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Inserts `new` unless a model with the same sha256 exists. Returns the row and
    /// whether it was already present. The name gets a " (2)", " (3)", ... suffix if taken.
    /// One transaction: either the row is fully written or nothing is.
    pub fn insert_model(&self, new: &NewModel) -> Result<(ModelRow, bool), EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        let existing = tx
            .query_row(
                &format!("SELECT {MODEL_COLUMNS} FROM models WHERE sha256 = ?1"),
                [&new.sha256],
                model_row,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some(row) = existing {
            return Ok((row, true));
        }
        let mut name = new.name.clone();
        let mut n = 2;
        while tx
            .query_row("SELECT 1 FROM models WHERE name = ?1", [&name], |_| Ok(()))
            .optional()
            .map_err(|e| self.err(e))?
            .is_some()
        {
            name = format!("{} ({n})", new.name);
            n += 1;
        }
        tx.execute(
            "INSERT INTO models (name, architecture, format, parameters, quantization, \
             context_length, file_size, sha256, path, source_kind, source_repo, \
             source_revision, added_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                name,
                new.architecture,
                new.format,
                new.parameters,
                new.quantization,
                new.context_length,
                new.file_size,
                new.sha256,
                new.path,
                new.source_kind,
                new.source_repo,
                new.source_revision,
                new.added_at,
            ],
        )
        .map_err(|e| self.err(e))?;
        let id = tx.last_insert_rowid();
        let row = tx
            .query_row(
                &format!("SELECT {MODEL_COLUMNS} FROM models WHERE id = ?1"),
                [id],
                model_row,
            )
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok((row, false))
    }

    /// All datasets, oldest first.
    pub fn list_datasets(&self) -> Result<Vec<DatasetRecord>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {DATASET_COLUMNS} FROM datasets ORDER BY id"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], dataset_record)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    pub fn get_dataset(&self, id: i64) -> Result<Option<DatasetRecord>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE id = ?1"),
                [id],
                dataset_record,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn find_dataset_by_name(&self, name: &str) -> Result<Option<DatasetRecord>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE name = ?1"),
                [name],
                dataset_record,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Inserts the dataset and all its rows in one transaction: either everything is
    /// written or nothing is. A taken name writes nothing and returns the existing one.
    pub fn insert_dataset(
        &self,
        new: &NewDataset,
        rows: &[StoredRow],
    ) -> Result<InsertDataset, EngineError> {
        self.insert_dataset_with(new, rows, |_, _| Ok(()))
    }

    /// [`Store::insert_dataset`], with `extra` writing more rows about the new dataset (its
    /// id given) in the same transaction.
    pub(crate) fn insert_dataset_with(
        &self,
        new: &NewDataset,
        rows: &[StoredRow],
        extra: impl FnOnce(&Transaction<'_>, i64) -> rusqlite::Result<()>,
    ) -> Result<InsertDataset, EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        let existing = tx
            .query_row(
                &format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE name = ?1"),
                [&new.name],
                dataset_record,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some(row) = existing {
            return Ok(InsertDataset::NameTaken(row));
        }
        tx.execute(
            "INSERT INTO datasets (name, format, kind, source_path, content_hash, created_at, \
             train_rows, valid_rows, test_rows, duplicates_removed, bad_rows_skipped, split_spec) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                new.name,
                new.format,
                new.kind,
                new.source_path,
                new.content_hash,
                new.created_at,
                new.train_rows,
                new.valid_rows,
                new.test_rows,
                new.duplicates_removed,
                new.bad_rows_skipped,
                new.split_spec,
            ],
        )
        .map_err(|e| self.err(e))?;
        let id = tx.last_insert_rowid();
        {
            let mut stmt = tx
                .prepare(
                    "INSERT INTO dataset_rows (dataset_id, split, idx, kind, data, label, \
                     source_id, source_line) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(|e| self.err(e))?;
            for r in rows {
                stmt.execute(params![
                    id,
                    r.split,
                    r.idx,
                    r.kind,
                    r.data,
                    r.label,
                    r.source_id,
                    r.source_line
                ])
                .map_err(|e| {
                    self.err(format!(
                        "dataset '{}', {} row {}: {e}",
                        new.name, r.split, r.idx
                    ))
                })?;
            }
        }
        extra(&tx, id).map_err(|e| self.err(format!("dataset '{}': {e}", new.name)))?;
        let row = tx
            .query_row(
                &format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE id = ?1"),
                [id],
                dataset_record,
            )
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(InsertDataset::Inserted(row))
    }

    /// The rows of one split of a dataset, in order.
    pub fn dataset_rows(&self, id: i64, split: &str) -> Result<Vec<StoredRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT split, idx, kind, data, label, source_id, source_line FROM dataset_rows \
                 WHERE dataset_id = ?1 AND split = ?2 ORDER BY idx",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![id, split], |r| {
                Ok(StoredRow {
                    split: r.get(0)?,
                    idx: r.get(1)?,
                    kind: r.get(2)?,
                    data: r.get(3)?,
                    label: r.get(4)?,
                    source_id: r.get(5)?,
                    source_line: r.get(6)?,
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Deletes the dataset and (by cascade) its rows; `false` if there was none.
    pub fn delete_dataset(&self, id: i64) -> Result<bool, EngineError> {
        let n = self
            .conn()
            .execute("DELETE FROM datasets WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    /// Total `dataset_rows` rows (tests check that cascades and refusals leave none behind).
    #[cfg(test)]
    pub fn count_dataset_rows(&self) -> Result<i64, EngineError> {
        self.conn()
            .query_row("SELECT count(*) FROM dataset_rows", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Deletes the row; `false` if there was none.
    pub fn delete_model(&self, id: i64) -> Result<bool, EngineError> {
        let n = self
            .conn()
            .execute("DELETE FROM models WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }
}

/// A `runs` row as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RunRow {
    pub id: i64,
    pub name: String,
    pub model_id: i64,
    pub dataset_id: i64,
    pub dataset_hash: String,
    pub method: String,
    pub config_json: String,
    pub status: String,
    pub error: Option<String>,
    pub step: i64,
    pub total_steps: i64,
    pub memory_estimate_mb: i64,
    pub run_dir: String,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub heartbeat_at: Option<String>,
    pub pid: Option<i64>,
}

const RUN_COLUMNS: &str = "id, name, model_id, dataset_id, dataset_hash, method, config_json, \
     status, error, step, total_steps, memory_estimate_mb, run_dir, created_at, started_at, \
     finished_at, heartbeat_at, pid";

fn run_row(r: &Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(0)?,
        name: r.get(1)?,
        model_id: r.get(2)?,
        dataset_id: r.get(3)?,
        dataset_hash: r.get(4)?,
        method: r.get(5)?,
        config_json: r.get(6)?,
        status: r.get(7)?,
        error: r.get(8)?,
        step: r.get(9)?,
        total_steps: r.get(10)?,
        memory_estimate_mb: r.get(11)?,
        run_dir: r.get(12)?,
        created_at: r.get(13)?,
        started_at: r.get(14)?,
        finished_at: r.get(15)?,
        heartbeat_at: r.get(16)?,
        pid: r.get(17)?,
    })
}

/// A `run_metrics` row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MetricRow {
    pub step: i64,
    /// "train" or "eval".
    pub kind: String,
    pub loss: f64,
    pub lr: Option<f64>,
    pub grad_norm: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub memory_mb: Option<f64>,
    pub at: String,
    /// Preference runs' train steps: rewards chosen, rejected, margin, accuracy, log-probs
    /// chosen, rejected (migration 0007).
    pub pref: Option<[f64; 6]>,
}

/// An `adapters` row (`id` is ignored on insert).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AdapterRow {
    pub id: i64,
    pub name: String,
    pub kind: String,
    pub base_model_id: i64,
    pub run_id: Option<i64>,
    pub dataset_id: Option<i64>,
    pub path: String,
    pub created_at: String,
    pub metrics_json: String,
}

const ADAPTER_COLUMNS: &str =
    "id, name, kind, base_model_id, run_id, dataset_id, path, created_at, metrics_json";

fn adapter_row(r: &Row<'_>) -> rusqlite::Result<AdapterRow> {
    Ok(AdapterRow {
        id: r.get(0)?,
        name: r.get(1)?,
        kind: r.get(2)?,
        base_model_id: r.get(3)?,
        run_id: r.get(4)?,
        dataset_id: r.get(5)?,
        path: r.get(6)?,
        created_at: r.get(7)?,
        metrics_json: r.get(8)?,
    })
}

/// An `evaluations` row to insert.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EvalRow {
    pub subject_kind: String,
    pub subject_id: String,
    pub model_id: i64,
    pub dataset_id: i64,
    pub split: String,
    pub n_rows: i64,
    pub mean_nll: f64,
    pub ppl: f64,
    pub n_tokens: i64,
    pub accuracy: Option<f64>,
    pub n_labeled: i64,
    pub forgetting_nll: Option<f64>,
    pub created_at: String,
}

/// What refuses deleting a model or dataset: the runs and adapters that use it.
#[derive(Debug, Default)]
pub(crate) struct Users {
    pub runs: Vec<String>,
    pub adapters: Vec<String>,
}

impl Users {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.adapters.is_empty()
    }
}

impl Store {
    fn names(&self, sql: &str, id: i64) -> Result<Vec<String>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([id], |r| r.get(0))
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<String>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// The runs and adapters built on model `id`.
    pub fn model_users(&self, id: i64) -> Result<Users, EngineError> {
        Ok(Users {
            runs: self.names("SELECT name FROM runs WHERE model_id = ?1 ORDER BY id", id)?,
            adapters: self.names(
                "SELECT name FROM adapters WHERE base_model_id = ?1 ORDER BY id",
                id,
            )?,
        })
    }

    /// The runs trained on dataset `id`.
    pub fn dataset_users(&self, id: i64) -> Result<Users, EngineError> {
        Ok(Users {
            runs: self.names(
                "SELECT name FROM runs WHERE dataset_id = ?1 ORDER BY id",
                id,
            )?,
            adapters: Vec::new(),
        })
    }

    /// Inserts a queued run; `run_dir(id)` names its directory. One transaction.
    pub fn insert_run(
        &self,
        new: &RunRow,
        run_dir: impl FnOnce(i64) -> String,
    ) -> Result<RunRow, EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO runs (name, model_id, dataset_id, dataset_hash, method, config_json, \
             status, step, total_steps, memory_estimate_mb, run_dir, created_at, pid) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', 0, ?7, ?8, '', ?9, ?10)",
            params![
                new.name,
                new.model_id,
                new.dataset_id,
                new.dataset_hash,
                new.method,
                new.config_json,
                new.total_steps,
                new.memory_estimate_mb,
                new.created_at,
                // The process whose queue holds it.
                std::process::id() as i64
            ],
        )
        .map_err(|e| self.err(format!("run '{}': {e}", new.name)))?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "UPDATE runs SET run_dir = ?1 WHERE id = ?2",
            params![run_dir(id), id],
        )
        .map_err(|e| self.err(e))?;
        let row = tx
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                [id],
                run_row,
            )
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(row)
    }

    pub fn get_run(&self, id: i64) -> Result<Option<RunRow>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                [id],
                run_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn find_run_by_name(&self, name: &str) -> Result<Option<RunRow>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE name = ?1"),
                [name],
                run_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// All runs, oldest first.
    pub fn list_runs(&self) -> Result<Vec<RunRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY id"))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], run_row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Marks the run running in process `pid`, from `step`; drops metrics recorded past
    /// `step` (they belong to steps a crash lost and that will be redone).
    pub fn start_run(&self, id: i64, pid: i64, step: i64, now: &str) -> Result<(), EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE runs SET status = 'running', error = NULL, pid = ?2, step = ?3, \
             started_at = coalesce(started_at, ?4), heartbeat_at = ?4, finished_at = NULL \
             WHERE id = ?1",
            params![id, pid, step, now],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "DELETE FROM run_metrics WHERE run_id = ?1 AND step > ?2",
            params![id, step],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Records one metric and moves the run's step and heartbeat, in one transaction.
    pub fn record_metric(&self, run_id: i64, m: &MetricRow) -> Result<(), EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT OR REPLACE INTO run_metrics (run_id, step, kind, loss, lr, grad_norm, \
             tokens_per_s, memory_mb, at, rewards_chosen, rewards_rejected, reward_margin, \
             reward_accuracy, logps_chosen, logps_rejected) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                run_id,
                m.step,
                m.kind,
                m.loss,
                m.lr,
                m.grad_norm,
                m.tokens_per_s,
                m.memory_mb,
                m.at,
                m.pref.map(|p| p[0]),
                m.pref.map(|p| p[1]),
                m.pref.map(|p| p[2]),
                m.pref.map(|p| p[3]),
                m.pref.map(|p| p[4]),
                m.pref.map(|p| p[5]),
            ],
        )
        .map_err(|e| self.err(e))?;
        if m.kind == "train" {
            tx.execute(
                "UPDATE runs SET step = ?2, heartbeat_at = ?3 WHERE id = ?1",
                params![run_id, m.step, m.at],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    pub fn run_metrics(&self, run_id: i64) -> Result<Vec<MetricRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT step, kind, loss, lr, grad_norm, tokens_per_s, memory_mb, at, \
                 rewards_chosen, rewards_rejected, reward_margin, reward_accuracy, logps_chosen, \
                 logps_rejected FROM run_metrics WHERE run_id = ?1 ORDER BY step, kind DESC",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([run_id], |r| {
                Ok(MetricRow {
                    step: r.get(0)?,
                    kind: r.get(1)?,
                    loss: r.get(2)?,
                    lr: r.get(3)?,
                    grad_norm: r.get(4)?,
                    tokens_per_s: r.get(5)?,
                    memory_mb: r.get(6)?,
                    at: r.get(7)?,
                    pref: {
                        let v: [Option<f64>; 6] = [
                            r.get(8)?,
                            r.get(9)?,
                            r.get(10)?,
                            r.get(11)?,
                            r.get(12)?,
                            r.get(13)?,
                        ];
                        match v {
                            [Some(a), Some(b), Some(c), Some(d), Some(e), Some(f)] => {
                                Some([a, b, c, d, e, f])
                            }
                            _ => None,
                        }
                    },
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Ends a run (paused, failed, cancelled) with an optional reason.
    pub fn finish_run(
        &self,
        id: i64,
        status: &str,
        error: Option<&str>,
        now: &str,
    ) -> Result<(), EngineError> {
        let finished = matches!(status, "completed" | "failed" | "cancelled").then_some(now);
        self.conn()
            .execute(
                "UPDATE runs SET status = ?2, error = ?3, pid = NULL, heartbeat_at = ?4, \
                 finished_at = ?5 WHERE id = ?1",
                params![id, status, error, now, finished],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Registers the run's adapter and marks the run completed, in one transaction.
    pub fn complete_run(
        &self,
        id: i64,
        adapter: &AdapterRow,
        now: &str,
    ) -> Result<AdapterRow, EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        let adapter = insert_adapter_tx(&tx, adapter).map_err(|e| self.err(e))?;
        tx.execute(
            "UPDATE runs SET status = 'completed', error = NULL, pid = NULL, heartbeat_at = ?2, \
             finished_at = ?2 WHERE id = ?1",
            params![id, now],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(adapter)
    }

    /// Runs left 'running' (for the interrupted-run check at open).
    /// Runs executing or waiting in some process's queue.
    pub fn live_runs(&self) -> Result<Vec<RunRow>, EngineError> {
        Ok(self
            .list_runs()?
            .into_iter()
            .filter(|r| r.status == "running" || r.status == "queued")
            .collect())
    }

    /// Puts a run back in line in process `pid`'s queue (error cleared).
    pub fn requeue_run(&self, id: i64, pid: i64, now: &str) -> Result<(), EngineError> {
        self.conn()
            .execute(
                "UPDATE runs SET status = 'queued', error = NULL, pid = ?2, heartbeat_at = ?3, \
                 finished_at = NULL WHERE id = ?1",
                params![id, pid, now],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Deletes a run and (by cascade) its metrics; `false` if there was none.
    pub fn delete_run(&self, id: i64) -> Result<bool, EngineError> {
        let n = self
            .conn()
            .execute("DELETE FROM runs WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    pub fn insert_adapter(&self, adapter: &AdapterRow) -> Result<AdapterRow, EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        let row = insert_adapter_tx(&tx, adapter)
            .map_err(|e| self.err(format!("adapter '{}': {e}", adapter.name)))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(row)
    }

    pub fn list_adapters(&self) -> Result<Vec<AdapterRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {ADAPTER_COLUMNS} FROM adapters ORDER BY id"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], adapter_row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    pub fn get_adapter(&self, id: i64) -> Result<Option<AdapterRow>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {ADAPTER_COLUMNS} FROM adapters WHERE id = ?1"),
                [id],
                adapter_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn find_adapter_by_name(&self, name: &str) -> Result<Option<AdapterRow>, EngineError> {
        self.conn()
            .query_row(
                &format!("SELECT {ADAPTER_COLUMNS} FROM adapters WHERE name = ?1"),
                [name],
                adapter_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn delete_adapter(&self, id: i64) -> Result<bool, EngineError> {
        let n = self
            .conn()
            .execute("DELETE FROM adapters WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    pub fn insert_evaluation(&self, e: &EvalRow) -> Result<i64, EngineError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO evaluations (subject_kind, subject_id, model_id, dataset_id, split, \
             n_rows, mean_nll, ppl, n_tokens, accuracy, n_labeled, forgetting_nll, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                e.subject_kind,
                e.subject_id,
                e.model_id,
                e.dataset_id,
                e.split,
                e.n_rows,
                e.mean_nll,
                e.ppl,
                e.n_tokens,
                e.accuracy,
                e.n_labeled,
                e.forgetting_nll,
                e.created_at
            ],
        )
        .map_err(|e| self.err(e))?;
        Ok(conn.last_insert_rowid())
    }

    /// Every recorded evaluation with its id, newest first.
    pub fn list_evaluations(&self) -> Result<Vec<(i64, EvalRow)>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, subject_kind, subject_id, model_id, dataset_id, split, n_rows, \
                 mean_nll, ppl, n_tokens, accuracy, n_labeled, forgetting_nll, created_at \
                 FROM evaluations ORDER BY id DESC",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    EvalRow {
                        subject_kind: r.get(1)?,
                        subject_id: r.get(2)?,
                        model_id: r.get(3)?,
                        dataset_id: r.get(4)?,
                        split: r.get(5)?,
                        n_rows: r.get(6)?,
                        mean_nll: r.get(7)?,
                        ppl: r.get(8)?,
                        n_tokens: r.get(9)?,
                        accuracy: r.get(10)?,
                        n_labeled: r.get(11)?,
                        forgetting_nll: r.get(12)?,
                        created_at: r.get(13)?,
                    },
                ))
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Rows in `table` (tests check that refusals leave nothing behind).
    #[cfg(test)]
    pub fn count(&self, table: &str) -> Result<i64, EngineError> {
        self.conn()
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }
}

fn insert_adapter_tx(
    tx: &rusqlite::Transaction<'_>,
    a: &AdapterRow,
) -> rusqlite::Result<AdapterRow> {
    tx.execute(
        "INSERT INTO adapters (name, kind, base_model_id, run_id, dataset_id, path, created_at, \
         metrics_json) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            a.name,
            a.kind,
            a.base_model_id,
            a.run_id,
            a.dataset_id,
            a.path,
            a.created_at,
            a.metrics_json
        ],
    )?;
    let id = tx.last_insert_rowid();
    tx.query_row(
        &format!("SELECT {ADAPTER_COLUMNS} FROM adapters WHERE id = ?1"),
        [id],
        adapter_row,
    )
}

/// Applies every migration newer than `user_version`, each in its own transaction.
///
/// Several processes may open a fresh library at once (the app and a CLI, scripts): each
/// migration runs in an IMMEDIATE transaction that re-reads `user_version` after taking the
/// write lock, so the process that waited sees the first one's work and skips it instead of
/// failing on "table already exists".
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), EngineError> {
    let db = |e: rusqlite::Error| EngineError::db(path, e);
    let known = MIGRATIONS.len() as i64;
    let check = |current: i64| -> Result<(), EngineError> {
        if current > known {
            return Err(EngineError::SchemaTooNew {
                path: path.to_path_buf(),
                found: current,
                known,
            });
        }
        if current < 0 {
            return Err(EngineError::db(
                path,
                format!("invalid schema version {current}"),
            ));
        }
        Ok(())
    };
    let version = |c: &Connection| -> rusqlite::Result<i64> {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
    };
    // Up to date: no write lock needed (the common case of every open).
    let current = version(conn).map_err(db)?;
    check(current)?;
    if current == known {
        return Ok(());
    }
    loop {
        let tx = write_tx(conn).map_err(db)?;
        let current = version(&tx).map_err(db)?;
        check(current)?;
        let Some((name, sql)) = MIGRATIONS.get(current as usize) else {
            return Ok(());
        };
        tx.execute_batch(sql)
            .map_err(|e| EngineError::db(path, format!("migration {name}: {e}")))?;
        tx.pragma_update(None, "user_version", current + 1)
            .map_err(db)?;
        tx.commit().map_err(db)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sha: char, name: &str) -> NewModel {
        NewModel {
            name: name.to_string(),
            architecture: "llama".into(),
            format: "gguf".into(),
            parameters: 134_515_008,
            quantization: "Q4_1".into(),
            context_length: 8192,
            file_size: 98_362_432,
            sha256: sha.to_string().repeat(64),
            path: "/models/m.gguf".into(),
            source_kind: "local".into(),
            source_repo: None,
            source_revision: None,
            added_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn migrations_apply_once_and_validate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DATABASE_FILE);
        let store = Store::open(&path).expect("open fresh");
        assert_eq!(
            store.user_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        assert_eq!(store.integrity_check().expect("check"), "ok");
        let mode: String = store
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal_mode");
        assert_eq!(mode, "wal");
        store.insert_model(&sample('a', "m")).expect("insert");
        drop(store);

        // Re-opening applies nothing and keeps the data.
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store.user_version().expect("version"),
            MIGRATIONS.len() as i64
        );
        assert_eq!(store.list_models().expect("list").len(), 1);
        assert_eq!(store.integrity_check().expect("check"), "ok");
        let fk: i64 = store
            .conn()
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .expect("foreign_keys");
        assert_eq!(fk, 1);
    }

    #[test]
    fn every_migration_is_valid_sql_in_order() {
        // Each migration applies on top of the previous ones in a bare connection.
        let mut conn = Connection::open_in_memory().expect("memory db");
        for (name, sql) in MIGRATIONS {
            write_tx(&mut conn)
                .and_then(|tx| {
                    tx.execute_batch(sql)?;
                    tx.commit()
                })
                .unwrap_or_else(|e| panic!("migration {name} fails: {e}"));
        }
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .expect("prepare");
        let tables: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("tables");
        assert_eq!(
            tables,
            [
                "adapters",
                "arena_items",
                "arena_judge_votes",
                "arenas",
                "conversations",
                "dataset_rows",
                "datasets",
                "doc_chunks",
                "doc_documents",
                "doc_rows",
                "docsets",
                "endpoint_evaluations",
                "endpoints",
                "evaluations",
                "exports",
                "judge_rubrics",
                "models",
                "preference_sets",
                "run_bundles",
                "run_metrics",
                "runs",
                "settings",
                "template_versions",
                "templates"
            ]
        );
        // 0011 rebuilt arena_judge_votes to put the verdict mode in its key (SQLite cannot
        // change a primary key in place): the rebuilt table has the whole key, in order.
        let mut stmt = conn
            .prepare(
                "SELECT name FROM pragma_table_info('arena_judge_votes') WHERE pk > 0 ORDER BY pk",
            )
            .expect("prepare");
        let key: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("key");
        assert_eq!(
            key,
            [
                "arena_id",
                "idx",
                "judge_json",
                "rubric_version",
                "both_orders",
                "verdict_mode"
            ]
        );
        // Names follow NNNN_ and are numbered 1..=N without gaps.
        for (i, (name, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(&name[..4], format!("{:04}", i + 1), "{name}");
        }
    }

    #[test]
    fn newer_database_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DATABASE_FILE);
        drop(Store::open(&path).expect("open"));
        let future = MIGRATIONS.len() as i64 + 5;
        {
            let conn = Connection::open(&path).expect("raw open");
            conn.pragma_update(None, "user_version", future)
                .expect("set version");
        }
        let err = Store::open(&path).err().expect("must refuse");
        assert_eq!(err.code(), "schema_too_new");
        let msg = err.to_string();
        assert!(
            msg.contains(&future.to_string()) && msg.contains("newer"),
            "{msg}"
        );
        let conn = Connection::open(&path).expect("raw open");
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, future);
    }

    #[test]
    fn garbage_file_is_a_clear_database_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DATABASE_FILE);
        std::fs::write(&path, vec![0x5a_u8; 4096]).expect("write");
        let err = Store::open(&path).err().expect("must fail");
        assert_eq!(err.code(), "database");
        assert!(err.to_string().contains(DATABASE_FILE), "{err}");
    }

    #[test]
    fn insert_dedupes_by_sha_and_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join(DATABASE_FILE)).expect("open");
        let (a, present) = store.insert_model(&sample('a', "m")).expect("insert a");
        assert!(!present);
        let (again, present) = store.insert_model(&sample('a', "other")).expect("again");
        assert!(present);
        assert_eq!(again, a);
        let (b, _) = store.insert_model(&sample('b', "m")).expect("insert b");
        assert_eq!(b.name, "m (2)");
        let (c, _) = store.insert_model(&sample('c', "m")).expect("insert c");
        assert_eq!(c.name, "m (3)");
        assert_eq!(store.list_models().expect("list").len(), 3);
        assert_eq!(store.get_model(b.id).expect("get"), Some(b.clone()));
        assert_eq!(store.find_by_name("m (2)").expect("find"), Some(b.clone()));
        assert_eq!(store.find_by_name_nocase("M").expect("nocase").len(), 1);
        assert!(store.delete_model(b.id).expect("delete"));
        assert!(!store.delete_model(b.id).expect("delete again"));
        assert_eq!(store.get_model(b.id).expect("get"), None);
    }

    #[test]
    fn constraints_reject_bad_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join(DATABASE_FILE)).expect("open");
        let mut bad = sample('d', "x");
        bad.format = "onnx".into();
        assert!(store.insert_model(&bad).is_err());
        let mut hub_without_repo = sample('e', "y");
        hub_without_repo.source_kind = "hub".into();
        assert!(store.insert_model(&hub_without_repo).is_err());
        assert!(store.list_models().expect("list").is_empty());
    }
}
