-- The store: entities with their current attributes, the datom history, effect runs and the
-- outbox. Timestamps are milliseconds since the UNIX epoch; JSON values are canonical text.

-- One row per applied run; `tx` only grows (AUTOINCREMENT never reuses a value).
CREATE TABLE transactions (
    tx              INTEGER PRIMARY KEY AUTOINCREMENT,
    run_key         TEXT    NOT NULL,
    committed_at_ms INTEGER NOT NULL
);

CREATE TABLE entities (
    id             INTEGER PRIMARY KEY,
    identity       TEXT    NOT NULL,  -- the lookup ref's attribute, `card/id`
    identity_value TEXT    NOT NULL,  -- its value, canonical JSON
    created_tx     INTEGER NOT NULL,
    updated_tx     INTEGER NOT NULL,  -- the last tx that changed an attribute
    UNIQUE (identity, identity_value)
);

-- Current values: one per entity and attribute.
CREATE TABLE entity_attributes (
    entity_id INTEGER NOT NULL REFERENCES entities (id),
    attribute TEXT    NOT NULL,
    value     TEXT    NOT NULL,
    tx        INTEGER NOT NULL,
    PRIMARY KEY (entity_id, attribute)
) WITHOUT ROWID;

-- The history of effective changes: an assertion of a new value (preceded, in the same tx, by
-- the retraction of the value it replaces) or a retraction of the current value.
CREATE TABLE datoms (
    id        INTEGER PRIMARY KEY,
    tx        INTEGER NOT NULL,
    entity_id INTEGER NOT NULL REFERENCES entities (id),
    attribute TEXT    NOT NULL,
    value     TEXT    NOT NULL,
    added     INTEGER NOT NULL CHECK (added IN (0, 1))
);
CREATE INDEX datoms_eavt ON datoms (entity_id, attribute, tx, added);
CREATE INDEX datoms_tx ON datoms (tx);

CREATE TABLE effect_runs (
    key             TEXT    PRIMARY KEY,  -- the idempotency key
    effects_sha256  TEXT    NOT NULL,     -- of Effects::canonical_json, lowercase hex
    tx              INTEGER NOT NULL,
    status          TEXT    NOT NULL
        CHECK (status IN ('requests_pending', 'messages_pending', 'done')),
    after_requests  TEXT,                 -- the hook's name
    outbox_count    INTEGER NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    updated_at_ms   INTEGER NOT NULL,
    completed_at_ms INTEGER
) WITHOUT ROWID;
CREATE INDEX effect_runs_open ON effect_runs (status, updated_at_ms) WHERE status <> 'done';
CREATE INDEX effect_runs_completed ON effect_runs (completed_at_ms) WHERE status = 'done';

-- The recorded outcome of each request of a run; the first record wins.
CREATE TABLE effect_run_responses (
    run_key        TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    outcome        TEXT    NOT NULL,  -- JSON RequestOutcome
    recorded_at_ms INTEGER NOT NULL,
    PRIMARY KEY (run_key, seq)
) WITHOUT ROWID;

CREATE TABLE outbox (
    id                   TEXT    PRIMARY KEY,  -- `key#n`
    run_key              TEXT    NOT NULL,
    seq                  INTEGER NOT NULL,
    kind                 TEXT    NOT NULL CHECK (kind IN ('request', 'message')),
    destination          TEXT    NOT NULL,     -- endpoint or topic
    partition_key        TEXT,
    headers              TEXT    NOT NULL,     -- JSON object
    payload              TEXT    NOT NULL,     -- canonical JSON
    tx                   INTEGER NOT NULL,
    ready_seq            INTEGER,              -- order among ready rows; NULL: waits for requests
    attempts             INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms   INTEGER NOT NULL,
    last_error           TEXT,
    lease_owner          TEXT,
    lease_until_ms       INTEGER,
    created_at_ms        INTEGER NOT NULL,
    dispatched_at_ms     INTEGER,
    dead_lettered_reason TEXT,
    UNIQUE (run_key, seq)
);
CREATE INDEX outbox_pending ON outbox (ready_seq)
    WHERE dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL;
CREATE INDEX outbox_partition ON outbox (destination, partition_key, ready_seq)
    WHERE dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL AND kind = 'message';
CREATE INDEX outbox_dispatched ON outbox (dispatched_at_ms) WHERE dispatched_at_ms IS NOT NULL;
CREATE INDEX outbox_lease ON outbox (lease_owner) WHERE lease_owner IS NOT NULL;

-- Named counters; `outbox_ready` orders rows as they become ready.
CREATE TABLE sequences (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO sequences (name, value) VALUES ('outbox_ready', 0);
