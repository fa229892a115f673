-- 0011: a judge's verdict mode, and whose votes a preference set was made from.
--
-- A judge is now also its verdict mode: 'free' (a generated reply read for its verdict line)
-- or 'constrained' (each verdict continuation scored by log-probability, the most likely
-- taken; `verdict` then holds the per-option log-probs). The mode joins the primary key, so
-- the same model judging both ways keeps both sets of votes; SQLite cannot change a primary
-- key in place, so the table is rebuilt with its rows.
CREATE TABLE arena_judge_votes_new (
    arena_id        INTEGER NOT NULL,
    idx             INTEGER NOT NULL,
    judge_json      TEXT    NOT NULL,
    judge_label     TEXT    NOT NULL,
    rubric_version  INTEGER NOT NULL REFERENCES judge_rubrics (version),
    both_orders     INTEGER NOT NULL CHECK (both_orders IN (0, 1)),
    verdict_mode    TEXT    NOT NULL DEFAULT 'free' CHECK (verdict_mode IN ('free', 'constrained')),
    first_a_first   INTEGER NOT NULL CHECK (first_a_first IN (0, 1)),
    vote            TEXT    CHECK (vote IN ('a', 'b', 'tie', 'both_bad')),
    verdict         TEXT    NOT NULL,
    verdict_swapped TEXT,
    error           TEXT,
    created_at      TEXT    NOT NULL,
    PRIMARY KEY (arena_id, idx, judge_json, rubric_version, both_orders, verdict_mode),
    FOREIGN KEY (arena_id, idx) REFERENCES arena_items (arena_id, idx) ON DELETE CASCADE,
    CHECK ((vote IS NULL) = (error IS NOT NULL)),
    CHECK ((both_orders = 1) = (verdict_swapped IS NOT NULL))
) STRICT;

INSERT INTO arena_judge_votes_new (arena_id, idx, judge_json, judge_label, rubric_version,
    both_orders, verdict_mode, first_a_first, vote, verdict, verdict_swapped, error, created_at)
SELECT arena_id, idx, judge_json, judge_label, rubric_version, both_orders, 'free',
    first_a_first, vote, verdict, verdict_swapped, error, created_at
FROM arena_judge_votes;

DROP TABLE arena_judge_votes;
ALTER TABLE arena_judge_votes_new RENAME TO arena_judge_votes;
CREATE INDEX arena_judge_votes_by_arena ON arena_judge_votes (arena_id, idx);

-- An arena's preference set records whose votes made it: 'human', 'judge' (one judge's) or
-- 'combined' (the human vote where there is one, else the judge's); with a judge, the judge
-- as its key (JudgeKey JSON) and label; judge verdicts that could not be parsed (left out);
-- and how many pairs came from each kind of vote. Sets made before say 'human'.
ALTER TABLE preference_sets ADD COLUMN votes TEXT
    CHECK (votes IS NULL OR votes IN ('human', 'judge', 'combined'));
ALTER TABLE preference_sets ADD COLUMN judge_key_json TEXT;
ALTER TABLE preference_sets ADD COLUMN judge_label TEXT;
ALTER TABLE preference_sets ADD COLUMN unparseable_skipped INTEGER NOT NULL DEFAULT 0
    CHECK (unparseable_skipped >= 0);
ALTER TABLE preference_sets ADD COLUMN human_pairs INTEGER NOT NULL DEFAULT 0
    CHECK (human_pairs >= 0);
ALTER TABLE preference_sets ADD COLUMN judge_pairs INTEGER NOT NULL DEFAULT 0
    CHECK (judge_pairs >= 0);
UPDATE preference_sets SET votes = 'human', human_pairs = pairs WHERE source = 'arena';
