//! The embedded log transport: topics as SQLite tables in the store's database (feature
//! `sqlite`).
//!
//! Messages are appended to `log_messages`, deduplicated by `(topic, message id)`. Each consumer
//! (group) has a watermark (`log_consumers.acked_through`: everything at or below it is
//! acknowledged) and, above it, one `log_deliveries` row per message it has been handed: how many
//! times, until when it is invisible (`visible_at_ms`), whether it was given back, and whether it
//! was acknowledged. Acknowledgements move the watermark up over the acknowledged prefix and
//! drop the rows below it, so the table stays as small as the work in flight.
//!
//! # Fetching, and the order of one key's messages
//!
//! A fetch is one write transaction. It hands out, in publish order, the group's messages that
//! are visible now (never handed out, or their visibility or their give-back delay passed),
//! skipping every message of a partition key that has a message invisible now (leased and not
//! expired, or given back with a delay still running). So for each key a fetch takes the
//! first unacknowledged messages, several at once, only when none of that key is with anyone;
//! and no other caller gets a message of that key until all of them are acknowledged, given
//! back, or past their visibility. A later fetch does not add to a key that is still in flight,
//! even for the same caller (the [order contract](crate::transport) allows it, the log does not
//! need it). Messages without a key are handed out as they come. A message whose row cannot be
//! read as a delivery (headers that are not a JSON object of strings, left by another writer of
//! the file) is dead-lettered by the fetch itself, with the reason, and does not hold up the
//! messages behind it.
//!
//! A keyed message given back ([`Transport::nack`]) keeps its place: while its delay runs, its
//! key is invisible and its later messages wait; then it is handed out first, with the later
//! ones after it in the same fetch if there is room. Exact keys are ordered (no partitions).
//!
//! # Heartbeats, acknowledgements
//!
//! [`Transport::extend`] moves a delivery's `visible_at_ms` to now + the given visibility if it is
//! still the caller's: not acknowledged, not given back, and not handed out again since (the
//! same delivery count). A heartbeat that comes after the visibility passed is still taken when
//! nobody fetched the message meanwhile (one transaction decides both, so that is safe here);
//! otherwise it is refused ([`TransportError::Refused`]). [`Transport::ack_many`]
//! acknowledges a batch in one write transaction (all or none). The log's clock is the store's
//! (see the module docs of [`crate::sqlite`] on clocks): the newest time recorded in the
//! database, advanced by the real time that passed, so a process whose wall clock jumps can
//! neither end leases early nor hold them for hours.
//!
//! Obtain it from the store ([`SqliteStore::log`](super::SqliteStore::log)) so that runs
//! publish inside their own transaction, or open it on a separate file
//! ([`SqliteLog::open`]) to use it like an external broker.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{OptionalExtension, Transaction, params};

use super::db::{Ctx, Db, SqliteOptions};
use crate::store::{Colocation, Millis, StoreError};
use crate::transport::{Delivery, FetchRequest, OutgoingMessage, Transport, TransportError};

/// The embedded log. Cheap to clone.
#[derive(Clone)]
pub struct SqliteLog {
    db: Arc<Db>,
    poll: Duration,
}

impl std::fmt::Debug for SqliteLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLog")
            .field("location", &self.db.location)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

/// A message as stored in the log, for inspection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedMessage {
    /// Its position.
    pub sequence: u64,
    /// Its topic.
    pub topic: String,
    /// Its id.
    pub message_id: String,
    /// Its partition key.
    pub partition_key: Option<String>,
    /// Its headers.
    pub headers: BTreeMap<String, String>,
    /// Its payload.
    pub payload: Vec<u8>,
    /// When it was appended.
    pub published_at: Millis,
}

/// A message a consumer gave up on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The consumer.
    pub consumer: String,
    /// The topic.
    pub topic: String,
    /// The message's position.
    pub sequence: u64,
    /// The message's id.
    pub message_id: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Why.
    pub reason: String,
    /// How many times it had been delivered.
    pub deliveries: u32,
    /// When.
    pub dead_lettered_at: Millis,
}

/// Appends a message inside the caller's transaction; `false` if its id was already in the
/// topic (deduplicated).
pub(crate) fn append_message(
    tx: &Transaction<'_>,
    topic: &str,
    message_id: &str,
    partition_key: Option<&str>,
    headers: &BTreeMap<String, String>,
    payload: &[u8],
    now: Millis,
) -> Result<bool, StoreError> {
    let headers = serde_json::to_string(headers).unwrap_or_else(|_| "{}".to_owned());
    let inserted = tx
        .prepare_cached(
            "INSERT INTO log_messages (topic, message_id, partition_key, headers, payload, \
             published_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (topic, message_id) DO NOTHING",
        )
        .ctx("appending to the log")?
        .execute(params![
            topic,
            message_id,
            partition_key,
            headers,
            payload,
            now
        ])
        .ctx("appending to the log")?;
    Ok(inserted > 0)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn seq_i64(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}

fn bad(what: String, reason: String) -> StoreError {
    StoreError::Corrupt { what, reason }
}

fn fetch_tx(
    tx: &Transaction<'_>,
    request: &FetchRequest,
    now: Millis,
) -> Result<Vec<Delivery>, StoreError> {
    const OP: &str = "fetching from the log";
    tx.prepare_cached(
        "INSERT INTO log_consumers (consumer, topic, acked_through) VALUES (?1, ?2, 0) \
         ON CONFLICT (consumer, topic) DO NOTHING",
    )
    .ctx(OP)?
    .execute(params![request.consumer, request.topic])
    .ctx(OP)?;
    let watermark: i64 = tx
        .prepare_cached(
            "SELECT acked_through FROM log_consumers WHERE consumer = ?1 AND topic = ?2",
        )
        .ctx(OP)?
        .query_row(params![request.consumer, request.topic], |r| r.get(0))
        .ctx(OP)?;
    // Keys with a message that is invisible now (leased and not expired, or given back with a
    // delay that has not passed): none of their messages is handed out, so a key is only ever
    // with one holder and a given-back message keeps its place.
    let blocked: HashSet<String> = {
        let mut stmt = tx
            .prepare_cached(
                "SELECT DISTINCT m.partition_key FROM log_deliveries d \
                 JOIN log_messages m ON m.seq = d.seq \
                 WHERE d.consumer = ?1 AND d.topic = ?2 AND d.seq > ?3 \
                 AND d.acked_at_ms IS NULL AND d.visible_at_ms > ?4 \
                 AND m.partition_key IS NOT NULL",
            )
            .ctx(OP)?;
        stmt.query_map(
            params![request.consumer, request.topic, watermark, now],
            |r| r.get(0),
        )
        .ctx(OP)?
        .collect::<rusqlite::Result<_>>()
        .ctx(OP)?
    };
    // The messages that are visible (never handed out, or their visibility or delay passed), in
    // order; those of blocked keys are skipped below.
    let scan = i64::try_from(request.max.saturating_mul(16).max(512)).unwrap_or(i64::MAX);
    type Candidate = (i64, Option<String>, Option<i64>);
    let candidates: Vec<Candidate> = {
        let mut stmt = tx
            .prepare_cached(
                "SELECT m.seq, m.partition_key, d.deliveries \
                 FROM log_messages m LEFT JOIN log_deliveries d \
                 ON d.consumer = ?1 AND d.topic = m.topic AND d.seq = m.seq \
                 WHERE m.topic = ?2 AND m.seq > ?3 \
                 AND (d.seq IS NULL OR (d.acked_at_ms IS NULL AND d.visible_at_ms <= ?5)) \
                 ORDER BY m.seq LIMIT ?4",
            )
            .ctx(OP)?;
        stmt.query_map(
            params![request.consumer, request.topic, watermark, scan, now],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .ctx(OP)?
        .collect::<rusqlite::Result<_>>()
        .ctx(OP)?
    };
    let mut taken: Vec<(i64, u32)> = Vec::new();
    for (seq, partition_key, deliveries) in candidates {
        if taken.len() >= request.max {
            break;
        }
        if partition_key.as_ref().is_some_and(|k| blocked.contains(k)) {
            continue;
        }
        let count = deliveries.unwrap_or(0).saturating_add(1);
        tx.prepare_cached(
            "INSERT INTO log_deliveries (consumer, topic, seq, deliveries, visible_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (consumer, topic, seq) \
             DO UPDATE SET deliveries = excluded.deliveries, \
             visible_at_ms = excluded.visible_at_ms, given_back = 0",
        )
        .ctx(OP)?
        .execute(params![
            request.consumer,
            request.topic,
            seq,
            count,
            now.saturating_add(millis(request.visibility))
        ])
        .ctx(OP)?;
        taken.push((seq, u32::try_from(count).unwrap_or(u32::MAX)));
    }
    let mut out = Vec::with_capacity(taken.len());
    for (seq, deliveries) in taken {
        let (message_id, partition_key, headers, payload): (String, Option<String>, String, Vec<u8>) =
            tx.prepare_cached(
                "SELECT message_id, partition_key, headers, payload FROM log_messages WHERE seq = ?1",
            )
            .ctx(OP)?
            .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .ctx(OP)?;
        let headers = match serde_json::from_str(&headers) {
            Ok(headers) => headers,
            Err(e) => {
                // Written by another writer of the file: it can never be handed out, and it
                // must not stop the fetches of everything behind it.
                let reason = format!(
                    "log message {seq} cannot be read: its headers are not a JSON object of \
                     strings ({e})"
                );
                dead_letter_unreadable(
                    tx,
                    request,
                    seq,
                    &message_id,
                    &headers,
                    &payload,
                    &reason,
                    deliveries,
                    now,
                )?;
                continue;
            }
        };
        out.push(Delivery {
            consumer: request.consumer.clone(),
            topic: request.topic.clone(),
            sequence: u64::try_from(seq).unwrap_or(0),
            message_id,
            partition_key,
            headers,
            payload,
            deliveries,
        });
    }
    Ok(out)
}

/// Dead-letters a message that cannot be handed out, in the fetch's transaction.
#[allow(clippy::too_many_arguments)]
fn dead_letter_unreadable(
    tx: &Transaction<'_>,
    request: &FetchRequest,
    seq: i64,
    message_id: &str,
    headers: &str,
    payload: &[u8],
    reason: &str,
    deliveries: u32,
    now: Millis,
) -> Result<(), StoreError> {
    const OP: &str = "dead-lettering an unreadable message";
    tracing::warn!(%reason, seq, "dead-lettered");
    tx.prepare_cached(
        "INSERT INTO log_dead_letters (consumer, topic, seq, message_id, headers, payload, \
         reason, deliveries, dead_lettered_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (consumer, topic, seq) DO NOTHING",
    )
    .ctx(OP)?
    .execute(params![
        request.consumer,
        request.topic,
        seq,
        message_id,
        headers,
        payload,
        reason,
        deliveries,
        now
    ])
    .ctx(OP)?;
    ack_all(
        tx,
        [(
            request.consumer.as_str(),
            request.topic.as_str(),
            u64::try_from(seq).unwrap_or(0),
        )],
        now,
    )
}

fn ack_tx(tx: &Transaction<'_>, d: &Delivery, now: Millis) -> Result<(), StoreError> {
    ack_all(
        tx,
        [(d.consumer.as_str(), d.topic.as_str(), d.sequence)],
        now,
    )
}

/// Acknowledges runs' inputs inside the caller's transaction (the runs' commit).
pub(crate) fn ack_inputs<'a>(
    tx: &Transaction<'_>,
    inputs: impl IntoIterator<Item = &'a crate::store::InputAck>,
    now: Millis,
) -> Result<(), StoreError> {
    ack_all(
        tx,
        inputs
            .into_iter()
            .map(|i| (i.consumer.as_str(), i.topic.as_str(), i.sequence)),
        now,
    )
}

/// Acknowledges messages (consumer, topic, sequence): each marked acknowledged, then the
/// watermark of each (consumer, topic) moved up once over the acknowledged prefix.
fn ack_all<'a>(
    tx: &Transaction<'_>,
    acks: impl IntoIterator<Item = (&'a str, &'a str, u64)>,
    now: Millis,
) -> Result<(), StoreError> {
    const OP: &str = "acknowledging";
    let mut moved: HashSet<(&str, &str)> = HashSet::new();
    for (consumer, topic, sequence) in acks {
        let updated = tx
            .prepare_cached(
                "UPDATE log_deliveries SET acked_at_ms = ?4 WHERE consumer = ?1 AND topic = ?2 \
                 AND seq = ?3 AND acked_at_ms IS NULL",
            )
            .ctx(OP)?
            .execute(params![consumer, topic, seq_i64(sequence), now])
            .ctx(OP)?;
        if updated > 0 {
            moved.insert((consumer, topic));
        }
    }
    for (consumer, topic) in moved {
        advance_watermark(tx, consumer, topic)?;
    }
    Ok(())
}

/// Moves a consumer's watermark up over the acknowledged prefix of its topic, and drops the
/// delivery rows below it.
fn advance_watermark(tx: &Transaction<'_>, consumer: &str, topic: &str) -> Result<(), StoreError> {
    const OP: &str = "acknowledging";
    let watermark: i64 = tx
        .prepare_cached(
            "SELECT acked_through FROM log_consumers WHERE consumer = ?1 AND topic = ?2",
        )
        .ctx(OP)?
        .query_row(params![consumer, topic], |r| r.get(0))
        .ctx(OP)?;
    let first_unacked: Option<i64> = tx
        .prepare_cached(
            "SELECT m.seq FROM log_messages m LEFT JOIN log_deliveries d \
             ON d.consumer = ?1 AND d.topic = m.topic AND d.seq = m.seq \
             WHERE m.topic = ?2 AND m.seq > ?3 AND d.acked_at_ms IS NULL ORDER BY m.seq LIMIT 1",
        )
        .ctx(OP)?
        .query_row(params![consumer, topic, watermark], |r| r.get(0))
        .optional()
        .ctx(OP)?;
    let new_watermark = match first_unacked {
        Some(first) => first - 1,
        None => tx
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM log_messages WHERE topic = ?1")
            .ctx(OP)?
            .query_row([topic], |r| r.get(0))
            .ctx(OP)?,
    };
    if new_watermark > watermark {
        tx.prepare_cached(
            "UPDATE log_consumers SET acked_through = ?3 WHERE consumer = ?1 AND topic = ?2",
        )
        .ctx(OP)?
        .execute(params![consumer, topic, new_watermark])
        .ctx(OP)?;
        tx.prepare_cached(
            "DELETE FROM log_deliveries WHERE consumer = ?1 AND topic = ?2 AND seq <= ?3",
        )
        .ctx(OP)?
        .execute(params![consumer, topic, new_watermark])
        .ctx(OP)?;
    }
    Ok(())
}

/// Moves a delivery's visibility to `now + visibility` if it is still this caller's: not
/// acknowledged, not given back, and not handed out again since (same delivery count).
fn extend_tx(
    tx: &Transaction<'_>,
    d: &Delivery,
    visibility: Duration,
    now: Millis,
) -> Result<bool, StoreError> {
    const OP: &str = "extending a lease";
    let updated = tx
        .prepare_cached(
            "UPDATE log_deliveries SET visible_at_ms = ?5 WHERE consumer = ?1 AND topic = ?2 \
             AND seq = ?3 AND deliveries = ?4 AND acked_at_ms IS NULL AND given_back = 0",
        )
        .ctx(OP)?
        .execute(params![
            d.consumer,
            d.topic,
            seq_i64(d.sequence),
            d.deliveries,
            now.saturating_add(millis(visibility))
        ])
        .ctx(OP)?;
    Ok(updated > 0)
}

impl SqliteLog {
    pub(crate) fn new(db: Arc<Db>) -> SqliteLog {
        SqliteLog {
            db,
            poll: Duration::from_millis(50),
        }
    }

    /// A log in its own database file, not colocated with any store: publishing to it is a
    /// separate step after the run's commit, as with an external broker.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteLog, StoreError> {
        Ok(SqliteLog::new(Arc::new(Db::open(
            Some(path.as_ref()),
            &SqliteOptions::default(),
        )?)))
    }

    /// How often [`Transport::fetch`] looks for messages appended by other processes while it
    /// waits (appends from this process wake it at once). Default 50 ms.
    #[must_use]
    pub fn with_poll_interval(mut self, poll: Duration) -> SqliteLog {
        self.poll = poll.max(Duration::from_millis(1));
        self
    }

    /// Every message of a topic, in order (for inspection and tests).
    pub fn messages(
        &self,
        topic: &str,
    ) -> impl Future<Output = Result<Vec<LoggedMessage>, StoreError>> + Send + 'static {
        let topic = topic.to_owned();
        self.db.read("reading the log", move |conn| {
            const OP: &str = "reading the log";
            type Raw = (i64, String, Option<String>, String, Vec<u8>, i64);
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, message_id, partition_key, headers, payload, published_at_ms \
                     FROM log_messages WHERE topic = ?1 ORDER BY seq",
                )
                .ctx(OP)?;
            let rows: Vec<Raw> = stmt
                .query_map([&topic], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
                .ctx(OP)?
                .collect::<rusqlite::Result<_>>()
                .ctx(OP)?;
            rows.into_iter()
                .map(|(seq, message_id, partition_key, headers, payload, at)| {
                    Ok(LoggedMessage {
                        sequence: u64::try_from(seq).unwrap_or(0),
                        topic: topic.clone(),
                        headers: serde_json::from_str(&headers).map_err(|e| {
                            bad(format!("log message {seq}"), format!("headers: {e}"))
                        })?,
                        message_id,
                        partition_key,
                        payload,
                        published_at: at,
                    })
                })
                .collect()
        })
    }

    /// The messages `consumer` dead-lettered, oldest first.
    pub fn dead_letters(
        &self,
        consumer: &str,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, StoreError>> + Send + 'static {
        let consumer = consumer.to_owned();
        self.db.read("reading dead letters", move |conn| {
            const OP: &str = "reading dead letters";
            type Raw = (String, i64, String, Vec<u8>, String, i64, i64);
            let mut stmt = conn
                .prepare_cached(
                    "SELECT topic, seq, message_id, payload, reason, deliveries, \
                     dead_lettered_at_ms FROM log_dead_letters WHERE consumer = ?1 \
                     ORDER BY dead_lettered_at_ms, seq",
                )
                .ctx(OP)?;
            let rows: Vec<Raw> = stmt
                .query_map([&consumer], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })
                .ctx(OP)?
                .collect::<rusqlite::Result<_>>()
                .ctx(OP)?;
            Ok(rows
                .into_iter()
                .map(
                    |(topic, seq, message_id, payload, reason, deliveries, at)| DeadLetter {
                        consumer: consumer.clone(),
                        topic,
                        sequence: u64::try_from(seq).unwrap_or(0),
                        message_id,
                        payload,
                        reason,
                        deliveries: u32::try_from(deliveries).unwrap_or(u32::MAX),
                        dead_lettered_at: at,
                    },
                )
                .collect())
        })
    }

    /// How many messages of `topic` the consumer has not acknowledged.
    pub fn unacknowledged(
        &self,
        consumer: &str,
        topic: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send + 'static {
        let (consumer, topic) = (consumer.to_owned(), topic.to_owned());
        self.db.read("counting unacknowledged messages", move |conn| {
            const OP: &str = "counting unacknowledged messages";
            let n: i64 = conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM log_messages m LEFT JOIN log_deliveries d \
                     ON d.consumer = ?1 AND d.topic = m.topic AND d.seq = m.seq \
                     WHERE m.topic = ?2 AND d.acked_at_ms IS NULL AND m.seq > COALESCE(\
                     (SELECT acked_through FROM log_consumers WHERE consumer = ?1 AND topic = ?2), 0)",
                )
                .ctx(OP)?
                .query_row(params![consumer, topic], |r| r.get(0))
                .ctx(OP)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }
}

impl Transport for SqliteLog {
    fn colocation(&self) -> Option<Colocation> {
        Some(self.db.colocation.clone())
    }

    fn publish(
        &self,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let db = Arc::clone(&self.db);
        let fut = self.db.write_at("publishing to the log", move |tx, now| {
            append_message(
                tx,
                &message.topic,
                &message.id,
                message.partition_key.as_deref(),
                &message.headers,
                &message.payload,
                now,
            )
        });
        async move {
            if fut.await? {
                db.appended.notify_waiters();
            }
            Ok(())
        }
    }

    fn fetch(
        &self,
        request: FetchRequest,
    ) -> impl Future<Output = Result<Vec<Delivery>, TransportError>> + Send {
        let db = Arc::clone(&self.db);
        let poll = self.poll;
        async move {
            let deadline = tokio::time::Instant::now() + request.wait;
            // Bounded: every round either returns or sleeps at least `poll` (>= 1 ms) toward the
            // deadline.
            loop {
                let notified = db.appended.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let req = request.clone();
                let got = db
                    .write_lazy_at("fetching from the log", move |tx, now| {
                        fetch_tx(tx, &req, now)
                    })
                    .await?;
                let now = tokio::time::Instant::now();
                if !got.is_empty() || now >= deadline {
                    return Ok(got);
                }
                let nap = poll.min(deadline - now);
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep(nap) => {}
                }
            }
        }
    }

    fn ack(&self, delivery: &Delivery) -> impl Future<Output = Result<(), TransportError>> + Send {
        let d = delivery.clone();
        let db = Arc::clone(&self.db);
        let fut = self
            .db
            .write_at("acknowledging", move |tx, now| ack_tx(tx, &d, now));
        async move {
            fut.await?;
            // The next messages of its key may be handed out now.
            db.appended.notify_waiters();
            Ok(())
        }
    }

    fn ack_many(
        &self,
        deliveries: &[Delivery],
    ) -> impl Future<Output = Vec<Result<(), TransportError>>> + Send {
        let ds = deliveries.to_vec();
        let n = ds.len();
        let db = Arc::clone(&self.db);
        let fut = self.db.write_at("acknowledging", move |tx, now| {
            ack_all(
                tx,
                ds.iter()
                    .map(|d| (d.consumer.as_str(), d.topic.as_str(), d.sequence)),
                now,
            )
        });
        async move {
            if n == 0 {
                return Vec::new();
            }
            match fut.await {
                Ok(()) => {
                    db.appended.notify_waiters();
                    (0..n).map(|_| Ok(())).collect()
                }
                // One transaction: all or none. The error is the same for every delivery.
                Err(e) => {
                    let reason = e.to_string();
                    let mut out = Vec::with_capacity(n);
                    out.push(Err(TransportError::Log(e)));
                    out.extend((1..n).map(|_| {
                        Err(TransportError::Log(StoreError::Database {
                            operation: "acknowledging",
                            source: reason.clone().into(),
                        }))
                    }));
                    out
                }
            }
        }
    }

    fn extend(
        &self,
        delivery: &Delivery,
        visibility: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let d = delivery.clone();
        let what = format!(
            "{} #{} (delivery {}) of consumer {:?}",
            d.topic, d.sequence, d.deliveries, d.consumer
        );
        let fut = self.db.write_lazy_at("extending a lease", move |tx, now| {
            extend_tx(tx, &d, visibility, now)
        });
        async move {
            if fut.await? {
                Ok(())
            } else {
                Err(TransportError::Refused {
                    reason: format!(
                        "{what} is no longer leased: it was acknowledged, given back or \
                         dead-lettered, or handed out again after its visibility passed"
                    ),
                })
            }
        }
    }

    fn nack(
        &self,
        delivery: &Delivery,
        delay: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let d = delivery.clone();
        let fut = self.db.write_at("giving a delivery back", move |tx, now| {
            tx.prepare_cached(
                "UPDATE log_deliveries SET visible_at_ms = ?4, given_back = 1 \
                 WHERE consumer = ?1 AND topic = ?2 AND seq = ?3 AND acked_at_ms IS NULL",
            )
            .ctx("giving a delivery back")?
            .execute(params![
                d.consumer,
                d.topic,
                seq_i64(d.sequence),
                now.saturating_add(millis(delay))
            ])
            .ctx("giving a delivery back")?;
            Ok(())
        });
        let db = Arc::clone(&self.db);
        async move {
            fut.await?;
            db.appended.notify_waiters();
            Ok(())
        }
    }

    fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let d = delivery.clone();
        let reason = reason.to_owned();
        let fut = self.db.write_at("dead-lettering a delivery", move |tx, now| {
            const OP: &str = "dead-lettering a delivery";
            let headers = serde_json::to_string(&d.headers).unwrap_or_else(|_| "{}".to_owned());
            tx.prepare_cached(
                "INSERT INTO log_dead_letters (consumer, topic, seq, message_id, headers, payload, \
                 reason, deliveries, dead_lettered_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (consumer, topic, seq) DO NOTHING",
            )
            .ctx(OP)?
            .execute(params![
                d.consumer,
                d.topic,
                seq_i64(d.sequence),
                d.message_id,
                headers,
                d.payload,
                reason,
                d.deliveries,
                now
            ])
            .ctx(OP)?;
            ack_tx(tx, &d, now)
        });
        let db = Arc::clone(&self.db);
        async move {
            fut.await?;
            db.appended.notify_waiters();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row another writer left with headers that are not JSON: dead-lettered by the fetch
    /// with the reason, and the message behind it on its key is handed out.
    #[tokio::test]
    async fn unreadable_headers_are_dead_lettered_and_the_key_goes_on() {
        let dir =
            std::env::temp_dir().join(format!("effects-log-unreadable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.db");
        let log = SqliteLog::open(&path).unwrap();
        let raw = rusqlite::Connection::open(&path).unwrap();
        raw.execute(
            "INSERT INTO log_messages (topic, message_id, partition_key, headers, payload, \
             published_at_ms) VALUES ('t', 'bad', 'k', 'not json', x'00', 0)",
            [],
        )
        .unwrap();
        log.publish(OutgoingMessage {
            id: "good".to_owned(),
            topic: "t".to_owned(),
            partition_key: Some("k".to_owned()),
            headers: BTreeMap::new(),
            payload: b"{}".to_vec(),
        })
        .await
        .unwrap();
        let got = log
            .fetch(FetchRequest {
                consumer: "c".into(),
                topic: "t".into(),
                max: 10,
                visibility: Duration::from_secs(30),
                wait: Duration::ZERO,
            })
            .await
            .unwrap();
        let ids: Vec<&str> = got.iter().map(|d| d.message_id.as_str()).collect();
        assert_eq!(ids, ["good"]);
        let dead = log.dead_letters("c").await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].message_id, "bad");
        assert!(
            dead[0].reason.contains("its headers are not a JSON object"),
            "{}",
            dead[0].reason
        );
        log.ack(&got[0]).await.unwrap();
        assert_eq!(log.unacknowledged("c", "t").await.unwrap(), 0);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
