//! The `preference_sets` table of migration 0010: which datasets are preference sets, where
//! their pairs came from, and what an arena's conversion left out.

use rusqlite::{params, OptionalExtension, Transaction};

use super::Store;
use crate::error::EngineError;

/// A `preference_sets` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrefSetRow {
    pub dataset_id: i64,
    /// "jsonl" or "arena".
    pub source: String,
    pub arena_id: Option<i64>,
    pub pairs: i64,
    pub ties_skipped: i64,
    pub both_bad_skipped: i64,
    pub unvoted_skipped: i64,
    /// Migration 0011: "human", "judge" or "combined" for an arena's set.
    pub votes: Option<String>,
    /// The judge as a `JudgeKey` JSON, and its label.
    pub judge_key_json: Option<String>,
    pub judge_label: Option<String>,
    pub unparseable_skipped: i64,
    pub human_pairs: i64,
    pub judge_pairs: i64,
}

/// Writes `row` (its `dataset_id` replaced by `id`) inside a dataset's insert transaction.
pub(crate) fn insert_pref_set(
    tx: &Transaction<'_>,
    id: i64,
    row: &PrefSetRow,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO preference_sets (dataset_id, source, arena_id, pairs, ties_skipped, \
         both_bad_skipped, unvoted_skipped, votes, judge_key_json, judge_label, \
         unparseable_skipped, human_pairs, judge_pairs) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        params![
            id,
            row.source,
            row.arena_id,
            row.pairs,
            row.ties_skipped,
            row.both_bad_skipped,
            row.unvoted_skipped,
            row.votes,
            row.judge_key_json,
            row.judge_label,
            row.unparseable_skipped,
            row.human_pairs,
            row.judge_pairs
        ],
    )?;
    Ok(())
}

impl Store {
    /// The preference-set row of a dataset; `None` for an ordinary dataset.
    pub(crate) fn pref_set(&self, dataset_id: i64) -> Result<Option<PrefSetRow>, EngineError> {
        self.conn()
            .query_row(
                "SELECT dataset_id, source, arena_id, pairs, ties_skipped, both_bad_skipped, \
                 unvoted_skipped, votes, judge_key_json, judge_label, unparseable_skipped, \
                 human_pairs, judge_pairs FROM preference_sets WHERE dataset_id = ?1",
                [dataset_id],
                |r| {
                    Ok(PrefSetRow {
                        dataset_id: r.get(0)?,
                        source: r.get(1)?,
                        arena_id: r.get(2)?,
                        pairs: r.get(3)?,
                        ties_skipped: r.get(4)?,
                        both_bad_skipped: r.get(5)?,
                        unvoted_skipped: r.get(6)?,
                        votes: r.get(7)?,
                        judge_key_json: r.get(8)?,
                        judge_label: r.get(9)?,
                        unparseable_skipped: r.get(10)?,
                        human_pairs: r.get(11)?,
                        judge_pairs: r.get(12)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The dataset ids of every preference set, newest first.
    pub(crate) fn pref_set_ids(&self) -> Result<Vec<i64>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT dataset_id FROM preference_sets ORDER BY dataset_id DESC")
            .map_err(|e| self.err(e))?;
        let ids = stmt
            .query_map([], |r| r.get(0))
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<i64>>>()
            .map_err(|e| self.err(e));
        ids
    }
}
