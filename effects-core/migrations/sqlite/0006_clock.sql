-- The store's clock: the newest time any process used in this database (`clock`). Every
-- process reads it and never uses an earlier time, and advances it no faster than real time
-- (plus 1% to catch up with the wall clock), so that no process's wall clock, however wrong,
-- decides alone when a lease expires or a record is old enough to prune. It starts at the wall
-- clock of the process that migrates, or at the newest commit recorded, whichever is later.
--
-- A reference for processes that start later on the same machine: the store's time `clock_ref`
-- when the machine's monotonic clock (time since boot) read `clock_ref_uptime` ms, during the
-- boot whose id hashes to `clock_ref_boot` (0: none recorded).
INSERT INTO sequences (name, value) VALUES ('clock', max(
    CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER),
    COALESCE((SELECT MAX(committed_at_ms) FROM transactions), 0)
));
INSERT INTO sequences (name, value) VALUES ('clock_ref', 0), ('clock_ref_uptime', 0),
    ('clock_ref_boot', 0);
