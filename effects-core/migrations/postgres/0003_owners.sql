-- Liveness of the processes that take leases. Each registered owner (an executor's owner name)
-- holds the session-level advisory lock `lock_key` on a connection of its own, taken before its
-- row here is written; the lock ends with that session, so a reaper that can take it (with
-- pg_try_advisory_xact_lock) knows the owner is gone, frees the rows it held leased and deletes
-- its row, in one transaction.
CREATE TABLE owners (
    owner         text   PRIMARY KEY,
    lock_key      bigint NOT NULL UNIQUE,  -- random, in the advisory lock space of one bigint
    started_at_ms bigint NOT NULL
);

-- The lock key of the owner that recorded the run's last response (NULL: an owner that was
-- not registered): a run whose recorder is no longer in `owners` is stalled at once.
ALTER TABLE effect_runs ADD COLUMN recorded_by bigint;
