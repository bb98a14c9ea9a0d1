-- What workers report as blocked (Store::report_blocked): per owner (an executor's owner name),
-- consumer and topic, the inputs whose processing has been failing for a while, each holding up
-- its partition key. A report replaces its (owner, consumer, topic)'s rows in one transaction,
-- an empty report deletes them, and reaping a dead owner deletes its rows with the owner.
-- Text is kept with NUL written `\u{0}`, as on PostgreSQL.
CREATE TABLE blocked_inputs (
    owner          TEXT    NOT NULL,
    consumer       TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    position       INTEGER NOT NULL,  -- its place in the report
    partition_key  TEXT,              -- NULL: a message without one
    message_id     TEXT    NOT NULL,
    since_ms       INTEGER NOT NULL,  -- the store's clock at the report less failing_for
    attempts       INTEGER NOT NULL,
    reason         TEXT    NOT NULL,  -- the last failure
    reported_at_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, consumer, topic, position)
) WITHOUT ROWID;
