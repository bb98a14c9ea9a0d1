-- Operators' retries of dead letters: who asked, when and why, and the dead letter as it was
-- (its reason, its attempts, and for a request the outcome that the retry set aside).
CREATE TABLE dead_letter_retries (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    kind               TEXT    NOT NULL CHECK (kind IN ('request', 'message', 'input')),
    target             TEXT    NOT NULL,  -- `key#n`, or `input:SEQUENCE:CONSUMER`
    run_key            TEXT,              -- the run of an outbox row
    dead_letter_reason TEXT    NOT NULL,
    attempts           INTEGER NOT NULL,  -- attempts (outbox) or deliveries (input) before
    previous_outcome   TEXT,              -- JSON RequestOutcome recorded before the retry
    operator           TEXT    NOT NULL,
    reason             TEXT    NOT NULL,
    retried_at_ms      INTEGER NOT NULL
);
CREATE INDEX dead_letter_retries_target ON dead_letter_retries (target);
CREATE INDEX dead_letter_retries_run ON dead_letter_retries (run_key) WHERE run_key IS NOT NULL;
