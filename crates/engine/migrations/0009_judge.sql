-- The arena's judge (issue 17): a model, adapter, template or endpoint model that votes
-- on arena prompts against a rubric the user edits. Judge votes live apart from the human
-- votes in arena_items.vote, so either can be read, compared or removed alone.

-- The rubric, versioned: every edit that changes the text adds a version; the newest is
-- the one used. Votes name the version they were judged under.
CREATE TABLE judge_rubrics (
    version    INTEGER PRIMARY KEY CHECK (version >= 1),
    text       TEXT    NOT NULL CHECK (length(trim(text)) > 0),
    created_at TEXT    NOT NULL
) STRICT;

-- One judge's vote on one prompt. A judge is its target (ChatTarget as JSON, and its label
-- when it voted), the rubric version and whether it judged both orders; the same prompt may
-- carry votes of several judges. `vote` is NULL when the verdict could not be parsed
-- (`error` says why); the raw verdict texts are kept as the judge wrote them.
CREATE TABLE arena_judge_votes (
    arena_id        INTEGER NOT NULL,
    idx             INTEGER NOT NULL,
    judge_json      TEXT    NOT NULL,
    judge_label     TEXT    NOT NULL,
    rubric_version  INTEGER NOT NULL REFERENCES judge_rubrics (version),
    both_orders     INTEGER NOT NULL CHECK (both_orders IN (0, 1)),
    -- 1 when the judge saw candidate A first (as "Answer 1") in its first (or only) pass.
    first_a_first   INTEGER NOT NULL CHECK (first_a_first IN (0, 1)),
    vote            TEXT    CHECK (vote IN ('a', 'b', 'tie', 'both_bad')),
    -- The raw reply of the first pass and, with both orders, of the swapped pass.
    verdict         TEXT    NOT NULL,
    verdict_swapped TEXT,
    -- Why no vote was recorded (an unparseable verdict), else NULL.
    error           TEXT,
    created_at      TEXT    NOT NULL,
    PRIMARY KEY (arena_id, idx, judge_json, rubric_version, both_orders),
    FOREIGN KEY (arena_id, idx) REFERENCES arena_items (arena_id, idx) ON DELETE CASCADE,
    CHECK ((vote IS NULL) = (error IS NOT NULL)),
    CHECK ((both_orders = 1) = (verdict_swapped IS NOT NULL))
) STRICT;

CREATE INDEX arena_judge_votes_by_arena ON arena_judge_votes (arena_id, idx);
