//! The judge's tables of migration 0009: the versioned rubric and the judges' votes on
//! arena prompts (apart from the human votes in `arena_items`).

use rusqlite::{params, OptionalExtension, Row};

use super::{write_tx, Store};
use crate::error::EngineError;

/// One version of the rubric.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RubricRow {
    pub version: i64,
    pub text: String,
    pub created_at: String,
}

/// One judge's vote on one prompt, as stored (`vote` is "a", "b", "tie", "both_bad" or
/// None with `error` saying why).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct JudgeVoteRow {
    pub arena_id: i64,
    pub idx: i64,
    pub judge_json: String,
    pub judge_label: String,
    pub rubric_version: i64,
    pub both_orders: bool,
    /// "free" or "constrained" (migration 0011).
    pub verdict_mode: String,
    pub first_a_first: bool,
    pub vote: Option<String>,
    pub verdict: String,
    pub verdict_swapped: Option<String>,
    pub error: Option<String>,
    pub created_at: String,
}

const VOTE_COLUMNS: &str = "arena_id, idx, judge_json, judge_label, rubric_version, \
     both_orders, first_a_first, vote, verdict, verdict_swapped, error, created_at, verdict_mode";

fn vote_row(r: &Row<'_>) -> rusqlite::Result<JudgeVoteRow> {
    Ok(JudgeVoteRow {
        arena_id: r.get(0)?,
        idx: r.get(1)?,
        judge_json: r.get(2)?,
        judge_label: r.get(3)?,
        rubric_version: r.get(4)?,
        both_orders: r.get::<_, i64>(5)? != 0,
        first_a_first: r.get::<_, i64>(6)? != 0,
        vote: r.get(7)?,
        verdict: r.get(8)?,
        verdict_swapped: r.get(9)?,
        error: r.get(10)?,
        created_at: r.get(11)?,
        verdict_mode: r.get(12)?,
    })
}

fn rubric_row(r: &Row<'_>) -> rusqlite::Result<RubricRow> {
    Ok(RubricRow {
        version: r.get(0)?,
        text: r.get(1)?,
        created_at: r.get(2)?,
    })
}

impl Store {
    /// The newest rubric, if any was stored.
    pub fn current_rubric(&self) -> Result<Option<RubricRow>, EngineError> {
        self.conn()
            .query_row(
                "SELECT version, text, created_at FROM judge_rubrics \
                 ORDER BY version DESC LIMIT 1",
                [],
                rubric_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Rubric `version`, if stored.
    pub fn rubric(&self, version: i64) -> Result<Option<RubricRow>, EngineError> {
        self.conn()
            .query_row(
                "SELECT version, text, created_at FROM judge_rubrics WHERE version = ?1",
                [version],
                rubric_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Stores `text` as the newest rubric, unless it already is (then that version is
    /// returned unchanged). One transaction, so two writers cannot both add a version.
    pub fn save_rubric(&self, text: &str, now: &str) -> Result<RubricRow, EngineError> {
        let mut conn = self.conn();
        let tx = write_tx(&mut conn).map_err(|e| self.err(e))?;
        let newest = tx
            .query_row(
                "SELECT version, text, created_at FROM judge_rubrics \
                 ORDER BY version DESC LIMIT 1",
                [],
                rubric_row,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some(row) = newest.as_ref().filter(|r| r.text == text) {
            return Ok(row.clone());
        }
        let version = newest.map_or(1, |r| r.version + 1);
        tx.execute(
            "INSERT INTO judge_rubrics (version, text, created_at) VALUES (?1, ?2, ?3)",
            params![version, text, now],
        )
        .map_err(|e| self.err(format!("rubric version {version}: {e}")))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(RubricRow {
            version,
            text: text.to_string(),
            created_at: now.to_string(),
        })
    }

    /// Every judge vote of an arena, by prompt.
    pub fn judge_votes(&self, arena_id: i64) -> Result<Vec<JudgeVoteRow>, EngineError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {VOTE_COLUMNS} FROM arena_judge_votes WHERE arena_id = ?1 \
                 ORDER BY idx, judge_label, rubric_version, both_orders, verdict_mode"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([arena_id], vote_row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }

    /// Records a judge's vote, replacing the same judge's earlier vote on that prompt
    /// (same target, rubric version, order setting and verdict mode).
    pub fn put_judge_vote(&self, v: &JudgeVoteRow) -> Result<(), EngineError> {
        self.conn()
            .execute(
                &format!(
                    "INSERT OR REPLACE INTO arena_judge_votes ({VOTE_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ),
                params![
                    v.arena_id,
                    v.idx,
                    v.judge_json,
                    v.judge_label,
                    v.rubric_version,
                    i64::from(v.both_orders),
                    i64::from(v.first_a_first),
                    v.vote,
                    v.verdict,
                    v.verdict_swapped,
                    v.error,
                    v.created_at,
                    v.verdict_mode
                ],
            )
            .map_err(|e| {
                self.err(format!(
                    "arena {} prompt {}: judge vote: {e}",
                    v.arena_id, v.idx
                ))
            })?;
        Ok(())
    }
}
