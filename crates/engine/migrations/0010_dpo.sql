-- 0010: preference training (DPO, ORPO).
--
-- A preference set is a dataset whose rows hold {"prompt", "chosen", "rejected"} (plain
-- strings or chat-message lists, as TRL's DPOTrainer reads them). `datasets.kind`'s CHECK
-- predates it, so the dataset row says 'chat' and this table marks it as a preference set,
-- with where its pairs came from and, for an arena, what was left out.
CREATE TABLE preference_sets (
    dataset_id       INTEGER PRIMARY KEY REFERENCES datasets (id) ON DELETE CASCADE,
    source           TEXT    NOT NULL CHECK (source IN ('jsonl', 'arena')),
    arena_id         INTEGER REFERENCES arenas (id) ON DELETE SET NULL,
    pairs            INTEGER NOT NULL CHECK (pairs >= 1),
    ties_skipped     INTEGER NOT NULL DEFAULT 0 CHECK (ties_skipped >= 0),
    both_bad_skipped INTEGER NOT NULL DEFAULT 0 CHECK (both_bad_skipped >= 0),
    unvoted_skipped  INTEGER NOT NULL DEFAULT 0 CHECK (unvoted_skipped >= 0)
) STRICT;

-- A preference run's figures per train step (NULL for supervised runs and eval rows):
-- TRL's rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies and the
-- policy's summed answer log-probs.
ALTER TABLE run_metrics ADD COLUMN rewards_chosen REAL;
ALTER TABLE run_metrics ADD COLUMN rewards_rejected REAL;
ALTER TABLE run_metrics ADD COLUMN reward_margin REAL;
ALTER TABLE run_metrics ADD COLUMN reward_accuracy REAL;
ALTER TABLE run_metrics ADD COLUMN logps_chosen REAL;
ALTER TABLE run_metrics ADD COLUMN logps_rejected REAL;
