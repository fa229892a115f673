-- 0007: documents to data. A document set is the documents of one folder, cut into chunks;
-- a teacher (a local model, an adapter or an API endpoint) writes rows per chunk from a
-- stored template, held for review; the accepted rows become ordinary datasets.
--
-- Removing a set removes its documents, chunks and rows (CASCADE); the datasets made from
-- it stay (they are ordinary datasets, and their rows keep their provenance as source ids).

CREATE TABLE docsets (
    id              INTEGER PRIMARY KEY,
    name            TEXT    NOT NULL UNIQUE CHECK (length(name) > 0),
    -- The folder the documents were read from (absolute).
    source_dir      TEXT    NOT NULL,
    max_chunk_chars INTEGER NOT NULL CHECK (max_chunk_chars > 0),
    -- [{"path": ..., "reason": ...}]: files of the folder that were not read.
    skipped_json    TEXT    NOT NULL DEFAULT '[]',
    created_at      TEXT    NOT NULL
) STRICT;

CREATE TABLE doc_documents (
    id         INTEGER PRIMARY KEY,
    docset_id  INTEGER NOT NULL REFERENCES docsets (id) ON DELETE CASCADE,
    -- Relative to the set's folder.
    path       TEXT    NOT NULL CHECK (length(path) > 0),
    format     TEXT    NOT NULL CHECK (format IN ('pdf', 'docx', 'markdown', 'html', 'text')),
    sha256     TEXT    NOT NULL,
    bytes      INTEGER NOT NULL CHECK (bytes >= 0),
    -- PDF only.
    pages      INTEGER CHECK (pages IS NULL OR pages > 0),
    chars      INTEGER NOT NULL CHECK (chars >= 0),
    UNIQUE (docset_id, path)
) STRICT;

CREATE TABLE doc_chunks (
    id          INTEGER PRIMARY KEY,
    document_id INTEGER NOT NULL REFERENCES doc_documents (id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL CHECK (idx >= 0),
    -- The heading path above the chunk ("Guide > Install").
    section     TEXT,
    -- 1-based pages it spans (PDF only).
    page_start  INTEGER,
    page_end    INTEGER,
    text        TEXT    NOT NULL CHECK (length(text) > 0),
    UNIQUE (document_id, idx),
    CHECK ((page_start IS NULL) = (page_end IS NULL))
) STRICT;

CREATE TABLE doc_rows (
    id               INTEGER PRIMARY KEY,
    chunk_id         INTEGER NOT NULL REFERENCES doc_chunks (id) ON DELETE CASCADE,
    status           TEXT    NOT NULL
                     CHECK (status IN ('pending', 'accepted', 'rejected', 'edited', 'failed')),
    -- {"messages": [...]}: the row's turns (the reviewer's when edited); NULL when failed.
    messages_json    TEXT,
    -- The teacher's turns before an edit.
    original_json    TEXT,
    -- The teacher's answer as written.
    raw_output       TEXT    NOT NULL,
    -- Why a failed row gave nothing.
    error            TEXT,
    -- Who wrote it, in words, and the prompt: the template's id, name and version then.
    teacher          TEXT    NOT NULL,
    template_id      INTEGER,
    template_name    TEXT    NOT NULL,
    template_version INTEGER NOT NULL CHECK (template_version > 0),
    created_at       TEXT    NOT NULL,
    reviewed_at      TEXT,
    CHECK ((status = 'failed') = (messages_json IS NULL)),
    CHECK ((status = 'failed') = (error IS NOT NULL))
) STRICT;

CREATE INDEX doc_documents_set ON doc_documents (docset_id);
CREATE INDEX doc_chunks_document ON doc_chunks (document_id);
CREATE INDEX doc_rows_chunk ON doc_rows (chunk_id);
