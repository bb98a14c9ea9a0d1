-- Liveness of the processes that take leases. Each registered owner (an executor's owner name)
-- holds an exclusive lock on a small file of its own, `<database>-owners/<lock_key>.lock`,
-- taken before its row here is written and held until its process (or store handle) ends; a
-- reaper that can take that lock knows the owner is gone, frees the rows it held leased and
-- deletes its row.
CREATE TABLE owners (
    owner         TEXT    PRIMARY KEY,
    lock_key      INTEGER NOT NULL UNIQUE,  -- names the lock file; never reused
    started_at_ms INTEGER NOT NULL
) WITHOUT ROWID;

-- The lock key of the owner that recorded the run's last response (NULL: an owner that was
-- not registered): a run whose recorder is no longer in `owners` is stalled at once.
ALTER TABLE effect_runs ADD COLUMN recorded_by INTEGER;
