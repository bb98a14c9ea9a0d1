-- What workers report as blocked (Store::report_blocked): per owner (an executor's owner name),
-- consumer and topic, the inputs whose processing has been failing for a while, each holding up
-- its partition key. A report replaces its (owner, consumer, topic)'s rows in one transaction,
-- an empty report deletes them, and reaping a dead owner deletes its rows with the owner.
-- `text` cannot hold NUL: the store writes it `\u{0}`.
CREATE TABLE blocked_inputs (
    owner          text    NOT NULL,
    consumer       text    NOT NULL,
    topic          text    NOT NULL,
    position       integer NOT NULL,  -- its place in the report
    partition_key  text,              -- NULL: a message without one
    message_id     text    NOT NULL,
    since_ms       bigint  NOT NULL,  -- the server's clock at the report less failing_for
    attempts       bigint  NOT NULL,
    reason         text    NOT NULL,  -- the last failure
    reported_at_ms bigint  NOT NULL,
    PRIMARY KEY (owner, consumer, topic, position)
);
