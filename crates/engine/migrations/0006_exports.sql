-- 0006: exports written to GGUF, LoRA GGUF, Ollama or a Hugging Face folder, each with the
-- check that reloaded it and compared it with the model in the app.
--
-- An export names exactly one subject: a model or an adapter. Its files live wherever the
-- user put them; the record goes with its subject (CASCADE), the files stay. A failed check
-- is recorded ('failed') with its reasons; the files are kept.

CREATE TABLE exports (
    id                INTEGER PRIMARY KEY,
    model_id          INTEGER REFERENCES models (id) ON DELETE CASCADE,
    adapter_id        INTEGER REFERENCES adapters (id) ON DELETE CASCADE,
    -- The subject's name when exported (shown after renames or removals of other rows).
    subject_name      TEXT    NOT NULL CHECK (length(subject_name) > 0),
    format            TEXT    NOT NULL CHECK (format IN ('gguf', 'gguf-lora', 'ollama', 'hf')),
    quant             TEXT    NOT NULL CHECK (quant IN ('f32', 'f16', 'bf16', 'q8_0', 'q4_k_m')),
    -- The destination folder.
    path              TEXT    NOT NULL CHECK (length(path) > 0),
    -- [{"name": ..., "bytes": ...}] relative to path.
    files_json        TEXT    NOT NULL,
    bytes             INTEGER NOT NULL CHECK (bytes >= 0),
    verification      TEXT    NOT NULL CHECK (verification IN ('passed', 'failed')),
    -- The protocol's Verification as JSON.
    verification_json TEXT    NOT NULL,
    attune_version    TEXT    NOT NULL,
    created_at        TEXT    NOT NULL,
    CHECK ((model_id IS NULL) <> (adapter_id IS NULL))
) STRICT;

CREATE INDEX exports_model ON exports (model_id);
CREATE INDEX exports_adapter ON exports (adapter_id);
