-- 0001: the model library.
-- Later issues add their own tables (datasets, runs, adapters, templates,
-- conversations) in new numbered files; they reference models(id).

CREATE TABLE models (
    id              INTEGER PRIMARY KEY,
    name            TEXT    NOT NULL UNIQUE,
    architecture    TEXT    NOT NULL,
    format          TEXT    NOT NULL CHECK (format IN ('gguf', 'safetensors')),
    parameters      INTEGER NOT NULL CHECK (parameters >= 0),
    quantization    TEXT    NOT NULL,
    context_length  INTEGER NOT NULL CHECK (context_length >= 0),
    file_size       INTEGER NOT NULL CHECK (file_size >= 0),
    sha256          TEXT    NOT NULL UNIQUE CHECK (length(sha256) = 64),
    -- What the runtime loads: a .gguf file or a safetensors folder.
    path            TEXT    NOT NULL,
    source_kind     TEXT    NOT NULL CHECK (source_kind IN ('local', 'hub')),
    source_repo     TEXT,
    source_revision TEXT,
    added_at        TEXT    NOT NULL,
    CHECK ((source_kind = 'hub') = (source_repo IS NOT NULL AND source_revision IS NOT NULL))
) STRICT;
