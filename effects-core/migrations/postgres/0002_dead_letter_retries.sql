-- Operators' retries of dead letters: who asked, when and why, and the dead letter as it was
-- (its reason, its attempts, and for a request the outcome that the retry set aside). Input
-- dead letters of a PostgreSQL store live in the broker (the NATS stream), not here: every
-- retry recorded in this table is of an outbox row.
CREATE TABLE dead_letter_retries (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind               text   NOT NULL CHECK (kind IN ('request', 'message', 'input')),
    target             text   NOT NULL,  -- `key#n`, as DeadLetterId writes it
    run_key            text,             -- the run of an outbox row
    dead_letter_reason text   NOT NULL,
    attempts           bigint NOT NULL,  -- attempts before the retry
    previous_outcome   text,             -- JSON RequestOutcome recorded before the retry
    operator           text   NOT NULL,
    reason             text   NOT NULL,
    retried_at_ms      bigint NOT NULL
);
CREATE INDEX dead_letter_retries_target ON dead_letter_retries (target);
CREATE INDEX dead_letter_retries_run ON dead_letter_retries (run_key) WHERE run_key IS NOT NULL;
