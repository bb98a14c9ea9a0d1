-- The PostgreSQL store: entities with their current attributes, the datom history, effect runs
-- and the outbox. Timestamps are milliseconds since the UNIX epoch by the server's clock
-- (effects_now_ms); JSON values are canonical text, compared as text, so they are TEXT and not
-- JSONB (which would normalise them).

-- The server's clock, in milliseconds: every time the store compares or stores comes from here,
-- so every process sharing the database agrees.
CREATE FUNCTION effects_now_ms() RETURNS bigint
    LANGUAGE sql VOLATILE
    AS $$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;

-- Named counters whose row lock orders what they number: `tx` (taken inside the commit
-- transaction and held until it ends, so tx order is commit order) and `outbox_ready` (the
-- order in which outbox rows become ready).
CREATE TABLE sequences (
    name  text   PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO sequences (name, value) VALUES ('tx', 0), ('outbox_ready', 0);

-- Fencing tokens of leases only need to be unique and increasing, not in commit order: a
-- sequence, so claims never wait for each other on a counter row.
CREATE SEQUENCE lease_token;

-- One row per applied run.
CREATE TABLE transactions (
    tx              bigint PRIMARY KEY,
    run_key         text   NOT NULL,
    committed_at_ms bigint NOT NULL
);

CREATE TABLE entities (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    identity       text   NOT NULL,  -- the lookup ref's attribute, `card/id`
    identity_value text   NOT NULL,  -- its value, canonical JSON
    created_tx     bigint NOT NULL,
    updated_tx     bigint NOT NULL,  -- the last tx that changed an attribute
    UNIQUE (identity, identity_value)
);

-- Current values: one per entity and attribute.
CREATE TABLE entity_attributes (
    entity_id bigint NOT NULL REFERENCES entities (id),
    attribute text   NOT NULL,
    value     text   NOT NULL,
    tx        bigint NOT NULL,
    PRIMARY KEY (entity_id, attribute)
);

-- The history of effective changes: an assertion of a new value (preceded, in the same tx, by
-- the retraction of the value it replaces) or a retraction of the current value.
CREATE TABLE datoms (
    id        bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx        bigint  NOT NULL,
    entity_id bigint  NOT NULL REFERENCES entities (id),
    attribute text    NOT NULL,
    value     text    NOT NULL,
    added     boolean NOT NULL
);
CREATE INDEX datoms_eavt ON datoms (entity_id, attribute, tx, added);
CREATE INDEX datoms_tx ON datoms (tx);

CREATE TABLE effect_runs (
    key             text   PRIMARY KEY,  -- the idempotency key
    effects_sha256  text   NOT NULL,     -- of Effects::canonical_json, lowercase hex
    tx              bigint NOT NULL,
    status          text   NOT NULL
        CHECK (status IN ('requests_pending', 'messages_pending', 'done')),
    after_requests  text,                -- the hook's name
    outbox_count    bigint NOT NULL,
    created_at_ms   bigint NOT NULL,
    updated_at_ms   bigint NOT NULL,
    completed_at_ms bigint
);
CREATE INDEX effect_runs_open ON effect_runs (status, updated_at_ms) WHERE status <> 'done';
CREATE INDEX effect_runs_completed ON effect_runs (completed_at_ms) WHERE status = 'done';

-- The recorded outcome of each request of a run; the first record wins.
CREATE TABLE effect_run_responses (
    run_key        text   NOT NULL,
    seq            bigint NOT NULL,
    outcome        text   NOT NULL,  -- JSON RequestOutcome
    recorded_at_ms bigint NOT NULL,
    PRIMARY KEY (run_key, seq)
);

CREATE TABLE outbox (
    id                   text   PRIMARY KEY,  -- `key#n`
    run_key              text   NOT NULL,
    seq                  bigint NOT NULL,
    kind                 text   NOT NULL CHECK (kind IN ('request', 'message')),
    destination          text   NOT NULL,     -- endpoint or topic
    partition_key        text,
    headers              text   NOT NULL,     -- JSON object
    payload              text   NOT NULL,     -- canonical JSON
    tx                   bigint NOT NULL,
    ready_seq            bigint,              -- order among ready rows; NULL: waits for requests
    attempts             bigint NOT NULL DEFAULT 0,
    next_attempt_at_ms   bigint NOT NULL,
    last_error           text,
    lease_owner          text,
    lease_until_ms       bigint,
    lease_token          bigint,
    created_at_ms        bigint NOT NULL,
    dispatched_at_ms     bigint,
    dead_lettered_reason text,
    UNIQUE (run_key, seq)
);
CREATE INDEX outbox_pending ON outbox (ready_seq)
    WHERE dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL;
CREATE INDEX outbox_partition ON outbox (destination, partition_key, ready_seq)
    WHERE dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL AND kind = 'message';
CREATE INDEX outbox_run_pending ON outbox (run_key, kind, seq)
    WHERE dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL;
CREATE INDEX outbox_dispatched ON outbox (dispatched_at_ms) WHERE dispatched_at_ms IS NOT NULL;
CREATE INDEX outbox_lease ON outbox (lease_owner) WHERE lease_owner IS NOT NULL;
