-- 0004: the desktop workbench: settings, versioned prompt templates, saved playground
-- conversations and blind A/B arenas.
--
-- Deleting: a template's versions go with it (CASCADE); an arena's items go with the
-- arena (CASCADE). Arenas and conversations name their targets in JSON with the labels
-- taken when they were made, so removing a model, adapter or template never rewrites
-- or breaks their stored answers.

CREATE TABLE settings (
    key   TEXT NOT NULL PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 64),
    value TEXT NOT NULL
) STRICT;

CREATE TABLE templates (
    id         INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE CHECK (length(name) > 0),
    created_at TEXT    NOT NULL
) STRICT;

CREATE TABLE template_versions (
    template_id    INTEGER NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    version        INTEGER NOT NULL CHECK (version >= 1),
    system         TEXT,
    -- [{"role":..,"content":..}], user / assistant pairs.
    examples_json  TEXT    NOT NULL DEFAULT '[]',
    -- The user-message wrapper holding {{input}}; NULL = the message alone.
    user_wrapper   TEXT,
    -- {"name": "default value"}.
    variables_json TEXT    NOT NULL DEFAULT '{}',
    note           TEXT,
    created_at     TEXT    NOT NULL,
    PRIMARY KEY (template_id, version)
) STRICT;

CREATE TABLE conversations (
    id          INTEGER PRIMARY KEY,
    title       TEXT    NOT NULL,
    -- [ConversationPane] as JSON.
    panes_json  TEXT    NOT NULL,
    -- SamplingParams as JSON, NULL = the app's defaults.
    params_json TEXT,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL
) STRICT;

CREATE TABLE arenas (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL CHECK (length(name) > 0),
    -- ChatTarget as JSON, and its readable label when the arena was created.
    a_json      TEXT    NOT NULL,
    b_json      TEXT    NOT NULL,
    a_label     TEXT    NOT NULL,
    b_label     TEXT    NOT NULL,
    -- SamplingParams as JSON.
    params_json TEXT    NOT NULL,
    -- The side-assignment seed (u64 stored as its two's-complement i64).
    seed        INTEGER NOT NULL,
    created_at  TEXT    NOT NULL
) STRICT;

CREATE TABLE arena_items (
    arena_id     INTEGER NOT NULL REFERENCES arenas (id) ON DELETE CASCADE,
    idx          INTEGER NOT NULL CHECK (idx >= 0),
    -- The last user message, as shown to the voter.
    prompt       TEXT    NOT NULL,
    -- The conversation up to and including that message ([ChatMessage] as JSON).
    context_json TEXT    NOT NULL,
    -- 1 when candidate A is shown on the left.
    left_is_a    INTEGER NOT NULL CHECK (left_is_a IN (0, 1)),
    a_answer     TEXT,
    b_answer     TEXT,
    vote         TEXT    CHECK (vote IN ('a', 'b', 'tie', 'both_bad')),
    voted_at     TEXT,
    PRIMARY KEY (arena_id, idx)
) STRICT;
