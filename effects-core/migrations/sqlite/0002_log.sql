-- The embedded log transport: topics of messages, deduplicated by message id, with per-consumer
-- acknowledgements. It lives in the store's database so that a run's messages can be published
-- in the same transaction as its datoms.

CREATE TABLE log_messages (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    topic           TEXT    NOT NULL,
    message_id      TEXT    NOT NULL,
    partition_key   TEXT,
    headers         TEXT    NOT NULL,  -- JSON object
    payload         BLOB    NOT NULL,
    published_at_ms INTEGER NOT NULL,
    UNIQUE (topic, message_id)
);
CREATE INDEX log_messages_topic ON log_messages (topic, seq);
CREATE INDEX log_messages_published ON log_messages (published_at_ms);

-- Every message of the topic with seq <= acked_through is acknowledged by the consumer.
CREATE TABLE log_consumers (
    consumer      TEXT    NOT NULL,
    topic         TEXT    NOT NULL,
    acked_through INTEGER NOT NULL,
    PRIMARY KEY (consumer, topic)
) WITHOUT ROWID;

-- Deliveries above the watermark: in flight until visible_at_ms, or acknowledged.
CREATE TABLE log_deliveries (
    consumer      TEXT    NOT NULL,
    topic         TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    deliveries    INTEGER NOT NULL,
    visible_at_ms INTEGER NOT NULL,
    acked_at_ms   INTEGER,
    PRIMARY KEY (consumer, topic, seq)
) WITHOUT ROWID;

-- Messages a consumer gave up on, with the reason; kept until removed by hand.
CREATE TABLE log_dead_letters (
    consumer           TEXT    NOT NULL,
    topic              TEXT    NOT NULL,
    seq                INTEGER NOT NULL,
    message_id         TEXT    NOT NULL,
    headers            TEXT    NOT NULL,
    payload            BLOB    NOT NULL,
    reason             TEXT    NOT NULL,
    deliveries         INTEGER NOT NULL,
    dead_lettered_at_ms INTEGER NOT NULL,
    PRIMARY KEY (consumer, topic, seq)
) WITHOUT ROWID;
