-- 0002: datasets. Rows are copied into the library so a run never depends on the
-- source file still existing.

CREATE TABLE datasets (
    id                 INTEGER PRIMARY KEY,
    name               TEXT    NOT NULL UNIQUE CHECK (length(name) > 0),
    format             TEXT    NOT NULL
                       CHECK (format IN ('chat', 'sharegpt', 'alpaca', 'csv', 'text')),
    -- What every row holds: a conversation or a plain document.
    kind               TEXT    NOT NULL CHECK (kind IN ('chat', 'text')),
    source_path        TEXT    NOT NULL,
    -- sha256 (hex) over every row with its split, in order (see datasets.rs).
    content_hash       TEXT    NOT NULL CHECK (length(content_hash) = 64),
    created_at         TEXT    NOT NULL,
    train_rows         INTEGER NOT NULL CHECK (train_rows >= 0),
    valid_rows         INTEGER NOT NULL CHECK (valid_rows >= 0),
    test_rows          INTEGER NOT NULL CHECK (test_rows >= 0),
    duplicates_removed INTEGER NOT NULL CHECK (duplicates_removed >= 0),
    bad_rows_skipped   INTEGER NOT NULL CHECK (bad_rows_skipped >= 0),
    -- The split specification as JSON text, e.g. {"kind":"seeded","valid_fraction":0.1,...}.
    split_spec         TEXT    NOT NULL
) STRICT;

CREATE TABLE dataset_rows (
    dataset_id  INTEGER NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    split       TEXT    NOT NULL CHECK (split IN ('train', 'valid', 'test')),
    -- 0-based position inside the split.
    idx         INTEGER NOT NULL CHECK (idx >= 0),
    kind        TEXT    NOT NULL CHECK (kind IN ('chat', 'text')),
    -- Canonical JSON: {"messages":[{"role":..,"content":..},..]} or {"text":..}.
    data        TEXT    NOT NULL,
    label       TEXT,
    source_id   TEXT,
    -- 1-based line in the file the row came from (that split's file for user splits).
    source_line INTEGER CHECK (source_line IS NULL OR source_line >= 1),
    PRIMARY KEY (dataset_id, split, idx)
) STRICT;
