-- 0008: run bundles. A run exported for another training engine (TRL + accelerate, or
-- Axolotl) and, once its result is imported, the provenance of that result: the bundle's
-- hash, the engine and its version, and the adapter (or full fine-tune) it became.
--
-- A bundle goes with its run (CASCADE); the imported adapter outlives the record's link
-- (SET NULL), as adapters outlive their runs.

CREATE TABLE run_bundles (
    id             INTEGER PRIMARY KEY,
    run_id         INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    engine         TEXT    NOT NULL CHECK (engine IN ('trl', 'axolotl')),
    -- sha256 over the bundle's files (names and contents), as its bundle.json states.
    sha256         TEXT    NOT NULL CHECK (length(sha256) = 64),
    path           TEXT    NOT NULL,
    attune_version TEXT    NOT NULL,
    created_at     TEXT    NOT NULL,
    -- Set when the bundle's result is imported.
    adapter_id     INTEGER REFERENCES adapters (id) ON DELETE SET NULL,
    engine_version TEXT,
    result_path    TEXT,
    imported_at    TEXT
) STRICT;

CREATE INDEX run_bundles_run ON run_bundles (run_id);
CREATE INDEX run_bundles_adapter ON run_bundles (adapter_id);
