-- 0003: fine-tuning runs, their metrics, adapters and evaluations.
--
-- Deleting: a model or dataset that a run or adapter uses is refused (ON DELETE
-- RESTRICT; the engine checks first and names the runs/adapters), so no run ever
-- points at nothing. Metrics go with their run (CASCADE). An adapter outlives its run
-- (run_id, dataset_id SET NULL) but not its base model (RESTRICT). Evaluations are
-- derived figures: they go with their model or dataset (CASCADE).

CREATE TABLE runs (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE CHECK (length(name) > 0),
    model_id      INTEGER NOT NULL REFERENCES models (id) ON DELETE RESTRICT,
    dataset_id    INTEGER NOT NULL REFERENCES datasets (id) ON DELETE RESTRICT,
    -- The dataset's content hash when the run was created; a changed dataset is refused.
    dataset_hash  TEXT    NOT NULL CHECK (length(dataset_hash) = 64),
    method        TEXT    NOT NULL CHECK (method IN ('full', 'lora', 'prompt')),
    -- The full RunSpec as JSON.
    config_json   TEXT    NOT NULL,
    status        TEXT    NOT NULL
                  CHECK (status IN ('queued', 'running', 'paused', 'completed', 'failed', 'cancelled')),
    error         TEXT,
    step          INTEGER NOT NULL DEFAULT 0 CHECK (step >= 0),
    total_steps   INTEGER NOT NULL CHECK (total_steps >= 1),
    memory_estimate_mb INTEGER NOT NULL CHECK (memory_estimate_mb >= 0),
    run_dir       TEXT    NOT NULL,
    created_at    TEXT    NOT NULL,
    started_at    TEXT,
    finished_at   TEXT,
    heartbeat_at  TEXT,
    -- The process executing it while 'running'.
    pid           INTEGER
) STRICT;

CREATE TABLE run_metrics (
    run_id       INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step         INTEGER NOT NULL CHECK (step >= 0),
    kind         TEXT    NOT NULL CHECK (kind IN ('train', 'eval')),
    loss         REAL    NOT NULL,
    lr           REAL,
    grad_norm    REAL,
    tokens_per_s REAL,
    memory_mb    REAL,
    at           TEXT    NOT NULL,
    PRIMARY KEY (run_id, kind, step)
) STRICT;

CREATE TABLE adapters (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE CHECK (length(name) > 0),
    kind          TEXT    NOT NULL CHECK (kind IN ('lora', 'prompt', 'full')),
    base_model_id INTEGER NOT NULL REFERENCES models (id) ON DELETE RESTRICT,
    run_id        INTEGER REFERENCES runs (id) ON DELETE SET NULL,
    dataset_id    INTEGER REFERENCES datasets (id) ON DELETE SET NULL,
    path          TEXT    NOT NULL,
    created_at    TEXT    NOT NULL,
    metrics_json  TEXT    NOT NULL DEFAULT '{}'
) STRICT;

CREATE TABLE evaluations (
    id             INTEGER PRIMARY KEY,
    subject_kind   TEXT    NOT NULL CHECK (subject_kind IN ('base', 'adapter', 'template')),
    -- Model id, adapter id, or template name.
    subject_id     TEXT    NOT NULL,
    model_id       INTEGER NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    dataset_id     INTEGER NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    split          TEXT    NOT NULL CHECK (split IN ('train', 'valid', 'test')),
    n_rows         INTEGER NOT NULL CHECK (n_rows >= 0),
    mean_nll       REAL    NOT NULL,
    ppl            REAL    NOT NULL,
    n_tokens       INTEGER NOT NULL CHECK (n_tokens >= 0),
    accuracy       REAL,
    n_labeled      INTEGER NOT NULL CHECK (n_labeled >= 0),
    forgetting_nll REAL,
    created_at     TEXT    NOT NULL
) STRICT;

CREATE INDEX runs_model ON runs (model_id);
CREATE INDEX runs_dataset ON runs (dataset_id);
CREATE INDEX adapters_base ON adapters (base_model_id);
