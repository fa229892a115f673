-- 0005: remote OpenAI-compatible API endpoints (OpenAI, Ollama, vLLM, LM Studio,
-- llama.cpp's server, another Attune) used as candidates beside local models.
--
-- No key is ever stored here: keys live in the OS keyring (or, where no keyring
-- service runs, in the app's memory until it closes). `models_json` caches the
-- endpoint's model list from its last successful fetch.

CREATE TABLE endpoints (
    id                INTEGER PRIMARY KEY,
    name              TEXT    NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),
    base_url          TEXT    NOT NULL CHECK (base_url LIKE 'http://%' OR base_url LIKE 'https://%'),
    -- The user gave a key (where it is kept is the keyring's business).
    has_key           INTEGER NOT NULL DEFAULT 0 CHECK (has_key IN (0, 1)),
    connect_timeout_s REAL    NOT NULL DEFAULT 10 CHECK (connect_timeout_s > 0),
    idle_timeout_s    REAL    NOT NULL DEFAULT 60 CHECK (idle_timeout_s > 0),
    -- ["model id", ...] from GET /models, and when it was fetched.
    models_json       TEXT    NOT NULL DEFAULT '[]',
    models_at         TEXT,
    created_at        TEXT    NOT NULL
) STRICT;

-- Templates evaluated against an endpoint's model: label accuracy only (an API does not
-- return the probability of a given reference answer, so there is no NLL).
CREATE TABLE endpoint_evaluations (
    id          INTEGER PRIMARY KEY,
    endpoint_id INTEGER NOT NULL REFERENCES endpoints (id) ON DELETE CASCADE,
    model       TEXT    NOT NULL,
    template    TEXT,
    dataset_id  INTEGER NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    split       TEXT    NOT NULL CHECK (split IN ('train', 'valid', 'test')),
    n_rows      INTEGER NOT NULL CHECK (n_rows >= 0),
    accuracy    REAL,
    n_labeled   INTEGER NOT NULL CHECK (n_labeled >= 0),
    created_at  TEXT    NOT NULL
) STRICT;
