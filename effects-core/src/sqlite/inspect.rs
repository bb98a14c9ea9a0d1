//! [`Inspect`] for the SQLite store: operator reads and dead-letter retries, and opening an
//! existing store file without ever creating one.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use serde_json::Value;

use super::db::{Ctx, SqliteOptions};
use super::store::SqliteStore;
use crate::datom::{LookupRef, Op};
use crate::store::{
    BacklogReport, BlockedInputEntry, ConsumerLag, DeadLetterEntry, DeadLetterId, DeadLetterKind,
    Entity, EntityHistory, HistoryDatom, InputDeadLetter, Inspect, Lease, Millis, OutboxEntry,
    OutboxKind, OutboxRow, PruneOlderThan, PruneReport, RecordedOutcome, RetryOutcome, RetryRecord,
    RetryRequest, RunDetail, RunQuery, RunRecord, RunState, RunStatus, RunSummary, StoreError, Tx,
};

impl SqliteStore {
    /// Opens the store in an existing database file, for tools that must never create one: a
    /// path that does not exist, a file that is not a SQLite database, and a SQLite database
    /// that is not an effects store are errors, and nothing is written to them. A store file
    /// from an older version of this library gets the pending migrations, as
    /// [`SqliteStore::open`] would give it.
    ///
    /// ```
    /// use effects_core::store::SqliteStore;
    ///
    /// let missing = std::env::temp_dir().join("effects-doc-no-such-store.db");
    /// let err = SqliteStore::open_existing(&missing, &Default::default()).unwrap_err();
    /// assert!(err.to_string().contains("does not exist"), "{err}");
    /// assert!(!missing.exists());
    /// ```
    pub fn open_existing(
        path: impl AsRef<Path>,
        options: &SqliteOptions,
    ) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref();
        let location = path.display().to_string();
        let refuse = |reason: String| StoreError::Open {
            location: location.clone(),
            source: reason.into(),
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(refuse("it is not a file".to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(refuse("the file does not exist".to_owned()));
            }
            Err(e) => return Err(refuse(e.to_string())),
        }
        // Read-only, without SQLITE_OPEN_CREATE: this look cannot create or change anything.
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| refuse(e.to_string()))?;
        let first: Option<String> = conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| refuse(format!("it is not a SQLite database ({e})")))?;
        if first.is_none() {
            return Err(refuse(
                "it is a SQLite database but not an effects store (no `schema_version` table)"
                    .to_owned(),
            ));
        }
        let store: Option<String> = conn
            .query_row(
                "SELECT name FROM schema_version WHERE version = 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| refuse(format!("cannot read its `schema_version`: {e}")))?;
        if store.as_deref() != Some("0001_store.sql") {
            return Err(refuse(
                "it is a SQLite database but not an effects store (its `schema_version` does not \
                 start with 0001_store.sql)"
                    .to_owned(),
            ));
        }
        drop(conn);
        SqliteStore::open_with(path, options)
    }
}

impl SqliteStore {
    /// A deliberately broken retry of a dead-lettered input, so that the retry tests can show
    /// that their checks fail without the guarantee: it re-publishes the input on its topic
    /// under a new message id, for every consumer (the naive "publish it again"). Testing only.
    #[doc(hidden)]
    pub fn mutant_retry_input_republished(
        &self,
        consumer: &str,
        sequence: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send + 'static {
        let consumer = consumer.to_owned();
        let db = Arc::clone(&self.db);
        let fut = self
            .db
            .write_at("retrying a dead letter (mutant)", move |tx, now| {
                const OP: &str = "retrying a dead letter (mutant)";
                let seq = i64::try_from(sequence).unwrap_or(i64::MAX);
                let found: Option<(String, String, String, Vec<u8>)> = tx
                    .prepare_cached(
                        "SELECT topic, message_id, headers, payload FROM log_dead_letters \
                     WHERE consumer = ?1 AND seq = ?2",
                    )
                    .ctx(OP)?
                    .query_row(params![consumer, seq], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .optional()
                    .ctx(OP)?;
                let Some((topic, message_id, headers, payload)) = found else {
                    return Ok(false);
                };
                tx.prepare_cached(
                    "INSERT INTO log_messages (topic, message_id, partition_key, headers, payload, \
                 published_at_ms) VALUES (?1, ?2, NULL, ?3, ?4, ?5)",
                )
                .ctx(OP)?
                .execute(params![
                    topic,
                    format!("{message_id}-retry-{now}"),
                    headers,
                    payload,
                    now
                ])
                .ctx(OP)?;
                tx.prepare_cached("DELETE FROM log_dead_letters WHERE consumer = ?1 AND seq = ?2")
                    .ctx(OP)?
                    .execute(params![consumer, seq])
                    .ctx(OP)?;
                Ok(true)
            });
        async move {
            let done = fut.await?;
            db.appended.notify_waiters();
            Ok(done)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row decoding.

fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        reason: reason.into(),
    }
}

fn to_u32(v: i64, what: &str, column: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| corrupt(what, format!("`{column}` is {v}")))
}

fn millis(d: Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

const RUN_COLUMNS: &str = "r.key, r.effects_sha256, r.tx, r.status, r.after_requests, \
     r.outbox_count, r.created_at_ms, r.updated_at_ms, r.completed_at_ms";

/// Decodes the [`RUN_COLUMNS`] starting at column 0.
fn run_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRun> {
    Ok(RawRun {
        key: r.get(0)?,
        effects_sha256: r.get(1)?,
        tx: r.get(2)?,
        status: r.get(3)?,
        after_requests: r.get(4)?,
        outbox_count: r.get(5)?,
        created_at: r.get(6)?,
        updated_at: r.get(7)?,
        completed_at: r.get(8)?,
    })
}

struct RawRun {
    key: String,
    effects_sha256: String,
    tx: i64,
    status: String,
    after_requests: Option<String>,
    outbox_count: i64,
    created_at: i64,
    updated_at: i64,
    completed_at: Option<i64>,
}

impl RawRun {
    fn decode(self) -> Result<RunRecord, StoreError> {
        let what = format!("effect run `{}`", self.key);
        Ok(RunRecord {
            status: RunStatus::parse(&self.status)
                .ok_or_else(|| corrupt(what.clone(), format!("status `{}`", self.status)))?,
            outbox_count: to_u32(self.outbox_count, &what, "outbox_count")?,
            key: self.key,
            effects_sha256: self.effects_sha256,
            tx: Tx(self.tx),
            after_requests: self.after_requests,
            created_at: self.created_at,
            updated_at: self.updated_at,
            completed_at: self.completed_at,
        })
    }
}

const OUTBOX_COLUMNS: &str = "o.id, o.run_key, o.seq, o.kind, o.destination, o.partition_key, \
     o.headers, o.payload, o.tx, o.attempts, o.next_attempt_at_ms, o.last_error, \
     o.dispatched_at_ms, o.dead_lettered_reason, o.ready_seq, o.lease_owner, o.lease_until_ms, \
     o.lease_token, o.created_at_ms, p.outcome, p.recorded_at_ms";

/// The outbox joined with recorded responses, for [`OUTBOX_COLUMNS`].
const OUTBOX_FROM: &str = "outbox o LEFT JOIN effect_run_responses p \
     ON p.run_key = o.run_key AND p.seq = o.seq";

struct RawOutbox {
    id: String,
    run_key: String,
    seq: i64,
    kind: String,
    destination: String,
    partition_key: Option<String>,
    headers: String,
    payload: String,
    tx: i64,
    attempts: i64,
    next_attempt_at: i64,
    last_error: Option<String>,
    dispatched_at: Option<i64>,
    dead_lettered: Option<String>,
    ready_seq: Option<i64>,
    lease_owner: Option<String>,
    lease_until: Option<i64>,
    lease_token: Option<i64>,
    created_at: i64,
    outcome: Option<String>,
    recorded_at: Option<i64>,
}

fn outbox_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawOutbox> {
    Ok(RawOutbox {
        id: r.get(0)?,
        run_key: r.get(1)?,
        seq: r.get(2)?,
        kind: r.get(3)?,
        destination: r.get(4)?,
        partition_key: r.get(5)?,
        headers: r.get(6)?,
        payload: r.get(7)?,
        tx: r.get(8)?,
        attempts: r.get(9)?,
        next_attempt_at: r.get(10)?,
        last_error: r.get(11)?,
        dispatched_at: r.get(12)?,
        dead_lettered: r.get(13)?,
        ready_seq: r.get(14)?,
        lease_owner: r.get(15)?,
        lease_until: r.get(16)?,
        lease_token: r.get(17)?,
        created_at: r.get(18)?,
        outcome: r.get(19)?,
        recorded_at: r.get(20)?,
    })
}

impl RawOutbox {
    fn decode(self) -> Result<OutboxEntry, StoreError> {
        let what = format!("outbox row `{}`", self.id);
        let kind = match self.kind.as_str() {
            "request" => OutboxKind::Request,
            "message" => OutboxKind::Message,
            other => return Err(corrupt(what, format!("kind `{other}`"))),
        };
        let recorded = match (self.outcome, self.recorded_at) {
            (Some(outcome), Some(at)) => Some(RecordedOutcome {
                outcome: serde_json::from_str(&outcome)
                    .map_err(|e| corrupt(what.clone(), format!("recorded outcome: {e}")))?,
                recorded_at: at,
            }),
            _ => None,
        };
        Ok(OutboxEntry {
            row: OutboxRow {
                seq: to_u32(self.seq, &what, "seq")?,
                attempts: to_u32(self.attempts, &what, "attempts")?,
                headers: serde_json::from_str(&self.headers)
                    .map_err(|e| corrupt(what.clone(), format!("headers: {e}")))?,
                id: self.id,
                run_key: self.run_key,
                kind,
                destination: self.destination,
                partition_key: self.partition_key,
                payload: self.payload,
                tx: Tx(self.tx),
                next_attempt_at: self.next_attempt_at,
                last_error: self.last_error,
                dispatched_at: self.dispatched_at,
                dead_lettered: self.dead_lettered,
                lease: self
                    .lease_owner
                    .zip(self.lease_token)
                    .map(|(owner, token)| Lease { owner, token }),
                lease_until: self.lease_until,
            },
            ready: self.ready_seq.is_some(),
            created_at: self.created_at,
            recorded,
            retries: Vec::new(),
        })
    }
}

fn load_outbox(
    conn: &Connection,
    operation: &'static str,
    condition: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<OutboxEntry>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM {OUTBOX_FROM} WHERE {condition}"
        ))
        .ctx(operation)?;
    let raw = stmt
        .query_map(params, outbox_from)
        .ctx(operation)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .ctx(operation)?;
    raw.into_iter().map(RawOutbox::decode).collect()
}

const RETRY_COLUMNS: &str = "id, kind, target, run_key, dead_letter_reason, attempts, \
     previous_outcome, operator, reason, retried_at_ms";

type RetryTuple = (
    i64,
    String,
    String,
    Option<String>,
    String,
    i64,
    Option<String>,
    String,
    String,
    i64,
);

fn retry_tuple(r: &rusqlite::Row<'_>) -> rusqlite::Result<RetryTuple> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
    ))
}

fn decode_retry(t: RetryTuple) -> Result<RetryRecord, StoreError> {
    let (id, kind, target, run_key, dead_letter_reason, attempts, previous, operator, reason, at) =
        t;
    let what = format!("dead-letter retry {id}");
    Ok(RetryRecord {
        kind: DeadLetterKind::parse(&kind)
            .ok_or_else(|| corrupt(what.clone(), format!("kind `{kind}`")))?,
        attempts: to_u32(attempts, &what, "attempts")?,
        previous_outcome: previous
            .map(|p| serde_json::from_str(&p))
            .transpose()
            .map_err(|e| corrupt(what.clone(), format!("previous outcome: {e}")))?,
        id,
        target,
        run_key,
        dead_letter_reason,
        operator,
        reason,
        retried_at: at,
    })
}

fn load_retries(
    conn: &Connection,
    condition: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<RetryRecord>, StoreError> {
    const OP: &str = "reading dead-letter retries";
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {RETRY_COLUMNS} FROM dead_letter_retries WHERE {condition}"
        ))
        .ctx(OP)?;
    let rows = stmt
        .query_map(params, retry_tuple)
        .ctx(OP)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .ctx(OP)?;
    rows.into_iter().map(decode_retry).collect()
}

/// Attaches each entry's retries.
fn with_retries(
    conn: &Connection,
    mut entries: Vec<OutboxEntry>,
) -> Result<Vec<OutboxEntry>, StoreError> {
    for entry in &mut entries {
        entry.retries = load_retries(conn, "target = ?1 ORDER BY id", [&entry.row.id])?;
    }
    Ok(entries)
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

type DatomTuple = (i64, String, String, String, String, String, bool);

fn datom_tuple(r: &rusqlite::Row<'_>) -> rusqlite::Result<DatomTuple> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
    ))
}

fn decode_datom(t: DatomTuple) -> Result<HistoryDatom, StoreError> {
    let (tx, run_key, identity, identity_value, attribute, value, added) = t;
    let what = || format!("datom of tx {tx} on `{identity}`");
    let parse = |text: &str, column: &str| -> Result<Value, StoreError> {
        serde_json::from_str(text).map_err(|e| corrupt(what(), format!("{column}: {e}")))
    };
    Ok(HistoryDatom {
        tx: Tx(tx),
        entity: LookupRef::new(identity.as_str(), parse(&identity_value, "identity value")?),
        value: parse(&value, "value")?,
        op: if added { Op::Assert } else { Op::Retract },
        run_key,
        attribute,
    })
}

fn load_datoms(
    conn: &Connection,
    condition: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<HistoryDatom>, StoreError> {
    const OP: &str = "reading the datom history";
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT d.tx, t.run_key, e.identity, e.identity_value, d.attribute, d.value, d.added \
             FROM datoms d JOIN entities e ON e.id = d.entity_id JOIN transactions t ON t.tx = d.tx \
             WHERE {condition} ORDER BY d.tx, d.id"
        ))
        .ctx(OP)?;
    let rows = stmt
        .query_map(params, datom_tuple)
        .ctx(OP)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .ctx(OP)?;
    rows.into_iter().map(decode_datom).collect()
}

// ---------------------------------------------------------------------------------------------
// Reads.

fn runs_tx(conn: &Connection, query: &RunQuery) -> Result<Vec<RunSummary>, StoreError> {
    const OP: &str = "listing runs";
    let state = query.state.map_or("all", RunState::as_str);
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {RUN_COLUMNS}, \
             (SELECT COUNT(*) FROM outbox o WHERE o.run_key = r.key \
              AND o.dispatched_at_ms IS NOT NULL), \
             (SELECT COUNT(*) FROM outbox o WHERE o.run_key = r.key \
              AND o.dispatched_at_ms IS NULL AND o.dead_lettered_reason IS NULL), \
             (SELECT COUNT(*) FROM outbox o WHERE o.run_key = r.key \
              AND o.dead_lettered_reason IS NOT NULL) \
             FROM effect_runs r WHERE (?1 IS NULL OR r.created_at_ms >= ?1) AND (?2 = 'all' \
             OR (?2 = 'pending' AND r.status <> 'done') OR (?2 = 'done' AND r.status = 'done') \
             OR (?2 = 'dead-lettered' AND EXISTS (SELECT 1 FROM outbox o \
                 WHERE o.run_key = r.key AND o.dead_lettered_reason IS NOT NULL))) \
             ORDER BY r.tx DESC LIMIT ?3"
        ))
        .ctx(OP)?;
    let rows = stmt
        .query_map(params![query.since, state, limit_param(query.limit)], |r| {
            Ok((
                run_from(r)?,
                r.get::<_, i64>(9)?,
                r.get::<_, i64>(10)?,
                r.get::<_, i64>(11)?,
            ))
        })
        .ctx(OP)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .ctx(OP)?;
    rows.into_iter()
        .map(|(run, dispatched, pending, dead)| {
            let run = run.decode()?;
            let what = format!("effect run `{}`", run.key);
            Ok(RunSummary {
                dispatched: to_u32(dispatched, &what, "dispatched rows")?,
                pending: to_u32(pending, &what, "pending rows")?,
                dead_lettered: to_u32(dead, &what, "dead-lettered rows")?,
                run,
            })
        })
        .collect()
}

fn load_run(conn: &Connection, key: &str) -> Result<Option<RunRecord>, StoreError> {
    const OP: &str = "reading an effect run";
    conn.prepare_cached(&format!(
        "SELECT {RUN_COLUMNS} FROM effect_runs r WHERE r.key = ?1"
    ))
    .ctx(OP)?
    .query_row([key], run_from)
    .optional()
    .ctx(OP)?
    .map(RawRun::decode)
    .transpose()
}

fn run_detail_tx(conn: &Connection, key: &str) -> Result<Option<RunDetail>, StoreError> {
    let Some(run) = load_run(conn, key)? else {
        return Ok(None);
    };
    let datoms = load_datoms(conn, "d.tx = ?1 AND t.run_key = ?2", params![run.tx.0, key])?;
    let outbox = load_outbox(
        conn,
        "reading the outbox",
        "o.run_key = ?1 ORDER BY o.seq",
        [key],
    )?;
    Ok(Some(RunDetail {
        run,
        datoms,
        outbox: with_retries(conn, outbox)?,
    }))
}

fn input_dead_letters(conn: &Connection, limit: i64) -> Result<Vec<InputDeadLetter>, StoreError> {
    const OP: &str = "reading dead letters";
    type Raw = (
        String,
        String,
        i64,
        String,
        String,
        Vec<u8>,
        String,
        i64,
        i64,
    );
    let mut stmt = conn
        .prepare_cached(
            "SELECT consumer, topic, seq, message_id, headers, payload, reason, deliveries, \
             dead_lettered_at_ms FROM log_dead_letters ORDER BY dead_lettered_at_ms, seq LIMIT ?1",
        )
        .ctx(OP)?;
    let rows: Vec<Raw> = stmt
        .query_map([limit], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
            ))
        })
        .ctx(OP)?
        .collect::<rusqlite::Result<_>>()
        .ctx(OP)?;
    rows.into_iter()
        .map(
            |(consumer, topic, seq, message_id, headers, payload, reason, deliveries, at)| {
                let what = format!("dead letter {seq} of `{consumer}`");
                Ok(InputDeadLetter {
                    sequence: u64::try_from(seq)
                        .map_err(|_| corrupt(what.clone(), format!("seq is {seq}")))?,
                    headers: serde_json::from_str(&headers)
                        .map_err(|e| corrupt(what.clone(), format!("headers: {e}")))?,
                    deliveries: to_u32(deliveries, &what, "deliveries")?,
                    consumer,
                    topic,
                    message_id,
                    payload,
                    reason,
                    dead_lettered_at: at,
                })
            },
        )
        .collect()
}

fn entity_history_tx(
    conn: &Connection,
    lookup: &LookupRef,
    as_of: Option<Tx>,
) -> Result<Option<EntityHistory>, StoreError> {
    const OP: &str = "reading an entity's history";
    let Some((id, created, updated)) = super::store::find_entity(conn, OP, lookup)? else {
        return Ok(None);
    };
    let until = as_of.map_or(i64::MAX, |t| t.0);
    if created > until {
        return Ok(Some(EntityHistory {
            entity: None,
            datoms: Vec::new(),
        }));
    }
    let datoms = load_datoms(conn, "d.entity_id = ?1 AND d.tx <= ?2", params![id, until])?;
    // The value of each attribute after the last change at or before `until`.
    let mut current: BTreeMap<String, Option<Value>> = BTreeMap::new();
    let mut last = created;
    for d in &datoms {
        last = last.max(d.tx.0);
        match d.op {
            Op::Assert => {
                current.insert(d.attribute.clone(), Some(d.value.clone()));
            }
            Op::Retract => {
                if current.get(&d.attribute) == Some(&Some(d.value.clone())) {
                    current.insert(d.attribute.clone(), None);
                }
            }
        }
    }
    let attributes = current
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
        .collect();
    Ok(Some(EntityHistory {
        entity: Some(Entity {
            lookup: lookup.clone(),
            attributes,
            tx: Tx(if as_of.is_none() { updated } else { last }),
        }),
        datoms,
    }))
}

fn count(
    conn: &Connection,
    operation: &'static str,
    sql: &str,
    p: impl rusqlite::Params,
) -> Result<u64, StoreError> {
    let n: i64 = conn
        .prepare_cached(sql)
        .ctx(operation)?
        .query_row(p, |r| r.get(0))
        .ctx(operation)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn prune_preview_tx(
    conn: &Connection,
    older_than: PruneOlderThan,
    now: Millis,
) -> Result<PruneReport, StoreError> {
    const OP: &str = "previewing a prune";
    let cutoff = |age: Option<Duration>| age.map(|a| now.saturating_sub(millis(a)));
    let outbox_before = cutoff(older_than.outbox_dispatched);
    let runs_before = cutoff(older_than.runs_completed);
    let log_before = cutoff(older_than.log_published);
    // The same conditions as `Store::prune`: a dispatched row of a done run, dispatched before
    // the cutoff; a done run completed before its cutoff once none of its rows is left (rows
    // the outbox part removes in the same prune count as gone).
    let outbox_rows = match outbox_before {
        None => 0,
        Some(before) => count(
            conn,
            OP,
            "SELECT COUNT(*) FROM outbox o JOIN effect_runs r ON r.key = o.run_key \
             WHERE o.dispatched_at_ms IS NOT NULL AND o.dispatched_at_ms < ?1 \
             AND r.status = 'done'",
            [before],
        )?,
    };
    let runs = match runs_before {
        None => 0,
        Some(before) => count(
            conn,
            OP,
            "SELECT COUNT(*) FROM effect_runs r WHERE r.status = 'done' \
             AND r.completed_at_ms < ?1 AND NOT EXISTS (SELECT 1 FROM outbox o \
             WHERE o.run_key = r.key AND NOT (?2 IS NOT NULL AND o.dispatched_at_ms IS NOT NULL \
             AND o.dispatched_at_ms < ?2))",
            params![before, outbox_before],
        )?,
    };
    let log_messages = match log_before {
        None => 0,
        Some(before) => count(
            conn,
            OP,
            "SELECT COUNT(*) FROM log_messages m WHERE m.published_at_ms < ?1 \
             AND EXISTS (SELECT 1 FROM log_consumers c WHERE c.topic = m.topic) \
             AND m.seq <= (SELECT MIN(c.acked_through) FROM log_consumers c \
                           WHERE c.topic = m.topic)",
            [before],
        )?,
    };
    Ok(PruneReport {
        outbox_rows,
        runs,
        log_messages,
    })
}

fn backlog_tx(conn: &Connection, now: Millis) -> Result<BacklogReport, StoreError> {
    const OP: &str = "measuring the backlog";
    let pending = "dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL";
    let oldest_pending_at: Option<Millis> = conn
        .prepare_cached(&format!(
            "SELECT MIN(created_at_ms) FROM outbox WHERE {pending}"
        ))
        .ctx(OP)?
        .query_row([], |r| r.get(0))
        .ctx(OP)?;
    type Raw = (String, String, i64, Option<i64>);
    let consumers: Vec<Raw> = {
        let mut stmt = conn
            .prepare_cached(
                "SELECT c.consumer, c.topic, COUNT(m.seq), MIN(m.published_at_ms) \
                 FROM log_consumers c LEFT JOIN log_messages m ON m.topic = c.topic \
                 AND m.seq > c.acked_through AND NOT EXISTS (SELECT 1 FROM log_deliveries d \
                 WHERE d.consumer = c.consumer AND d.topic = c.topic AND d.seq = m.seq \
                 AND d.acked_at_ms IS NOT NULL) \
                 GROUP BY c.consumer, c.topic ORDER BY c.consumer, c.topic",
            )
            .ctx(OP)?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .ctx(OP)?
            .collect::<rusqlite::Result<_>>()
            .ctx(OP)?
    };
    Ok(BacklogReport {
        now,
        pending_rows: count(
            conn,
            OP,
            &format!("SELECT COUNT(*) FROM outbox WHERE {pending}"),
            [],
        )?,
        oldest_pending_at,
        dead_lettered_rows: count(
            conn,
            OP,
            "SELECT COUNT(*) FROM outbox WHERE dead_lettered_reason IS NOT NULL",
            [],
        )?,
        dead_lettered_inputs: count(conn, OP, "SELECT COUNT(*) FROM log_dead_letters", [])?,
        open_runs: count(
            conn,
            OP,
            "SELECT COUNT(*) FROM effect_runs WHERE status <> 'done'",
            [],
        )?,
        blocked_inputs: count(conn, OP, "SELECT COUNT(*) FROM blocked_inputs", [])?,
        oldest_blocked_since: conn
            .prepare_cached("SELECT MIN(since_ms) FROM blocked_inputs")
            .ctx(OP)?
            .query_row([], |r| r.get(0))
            .ctx(OP)?,
        consumers: consumers
            .into_iter()
            .map(|(consumer, topic, n, oldest)| ConsumerLag {
                consumer,
                topic,
                unacknowledged: u64::try_from(n).unwrap_or(0),
                oldest_published_at: oldest,
            })
            .collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Retrying.

fn insert_retry(tx: &Transaction<'_>, record: &RetryRecord) -> Result<RetryRecord, StoreError> {
    const OP: &str = "recording a retry";
    let previous = record
        .previous_outcome
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| corrupt(format!("retry of `{}`", record.target), e.to_string()))?;
    let id: i64 = tx
        .prepare_cached(
            "INSERT INTO dead_letter_retries (kind, target, run_key, dead_letter_reason, \
             attempts, previous_outcome, operator, reason, retried_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id",
        )
        .ctx(OP)?
        .query_row(
            params![
                record.kind.as_str(),
                record.target,
                record.run_key,
                record.dead_letter_reason,
                record.attempts,
                previous,
                record.operator,
                record.reason,
                record.retried_at
            ],
            |r| r.get(0),
        )
        .ctx(OP)?;
    Ok(RetryRecord {
        id,
        ..record.clone()
    })
}

fn retry_outbox_tx(
    tx: &Transaction<'_>,
    id: &str,
    request: &RetryRequest,
    now: Millis,
) -> Result<RetryOutcome, StoreError> {
    const OP: &str = "retrying a dead letter";
    let Some(entry) = load_outbox(tx, OP, "o.id = ?1", [id])?.pop() else {
        return Ok(RetryOutcome::NotFound);
    };
    let row = &entry.row;
    let Some(dead_reason) = row.dead_lettered.clone() else {
        return Ok(RetryOutcome::NotDeadLettered);
    };
    let Some(run) = load_run(tx, &row.run_key)? else {
        return Err(corrupt(
            format!("outbox row `{id}`"),
            "its run does not exist",
        ));
    };
    let (kind, previous_outcome) = match row.kind {
        OutboxKind::Request => {
            if let Some(hook) = &run.after_requests {
                if run.status != RunStatus::RequestsPending {
                    return Ok(RetryOutcome::Refused {
                        reason: format!(
                            "the run's after-requests hook `{hook}` already ran on the recorded \
                             outcome and its messages are written: a second outcome would \
                             contradict them; run new effects under a new key instead"
                        ),
                    });
                }
            }
            tx.prepare_cached("DELETE FROM effect_run_responses WHERE run_key = ?1 AND seq = ?2")
                .ctx(OP)?
                .execute(params![row.run_key, row.seq])
                .ctx(OP)?;
            tx.prepare_cached(
                "UPDATE effect_runs SET status = 'requests_pending', completed_at_ms = NULL, \
                 updated_at_ms = ?2 WHERE key = ?1",
            )
            .ctx(OP)?
            .execute(params![row.run_key, now])
            .ctx(OP)?;
            (
                DeadLetterKind::Request,
                entry.recorded.as_ref().map(|r| r.outcome.clone()),
            )
        }
        OutboxKind::Message => {
            if !entry.ready && run.status != RunStatus::RequestsPending {
                // Dead-lettered while it waited for the run's requests: it gets its turn now.
                let ready: i64 = tx
                    .prepare_cached(
                        "UPDATE sequences SET value = value + 1 WHERE name = 'outbox_ready' \
                         RETURNING value",
                    )
                    .ctx(OP)?
                    .query_row([], |r| r.get(0))
                    .ctx(OP)?;
                tx.prepare_cached("UPDATE outbox SET ready_seq = ?2 WHERE id = ?1")
                    .ctx(OP)?
                    .execute(params![id, ready])
                    .ctx(OP)?;
            }
            if run.status == RunStatus::Done {
                tx.prepare_cached(
                    "UPDATE effect_runs SET status = 'messages_pending', completed_at_ms = NULL, \
                     updated_at_ms = ?2 WHERE key = ?1",
                )
                .ctx(OP)?
                .execute(params![row.run_key, now])
                .ctx(OP)?;
            }
            (DeadLetterKind::Message, None)
        }
    };
    tx.prepare_cached(
        "UPDATE outbox SET dead_lettered_reason = NULL, attempts = 0, next_attempt_at_ms = ?2, \
         last_error = NULL, lease_owner = NULL, lease_until_ms = NULL, lease_token = NULL \
         WHERE id = ?1",
    )
    .ctx(OP)?
    .execute(params![id, now])
    .ctx(OP)?;
    let record = insert_retry(
        tx,
        &RetryRecord {
            id: 0,
            kind,
            target: DeadLetterId::Outbox(id.to_owned()).to_string(),
            run_key: Some(row.run_key.clone()),
            dead_letter_reason: dead_reason,
            attempts: row.attempts,
            previous_outcome,
            operator: request.operator.clone(),
            reason: request.reason.clone(),
            retried_at: now,
        },
    )?;
    Ok(RetryOutcome::Retried(record))
}

fn retry_input_tx(
    tx: &Transaction<'_>,
    consumer: &str,
    sequence: u64,
    request: &RetryRequest,
    now: Millis,
) -> Result<RetryOutcome, StoreError> {
    const OP: &str = "retrying a dead-lettered input";
    let target = DeadLetterId::Input {
        consumer: consumer.to_owned(),
        sequence,
    }
    .to_string();
    let seq = i64::try_from(sequence).unwrap_or(i64::MAX);
    type Raw = (String, String, String, Vec<u8>, String, i64);
    let found: Option<Raw> = tx
        .prepare_cached(
            "SELECT topic, message_id, headers, payload, reason, deliveries FROM log_dead_letters \
             WHERE consumer = ?1 AND seq = ?2",
        )
        .ctx(OP)?
        .query_row(params![consumer, seq], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .optional()
        .ctx(OP)?;
    let Some((topic, message_id, headers, payload, dead_reason, deliveries)) = found else {
        let retried = count(
            tx,
            OP,
            "SELECT COUNT(*) FROM dead_letter_retries WHERE target = ?1",
            [&target],
        )?;
        return Ok(if retried > 0 {
            RetryOutcome::NotDeadLettered
        } else {
            RetryOutcome::NotFound
        });
    };
    let still_logged = count(
        tx,
        OP,
        "SELECT COUNT(*) FROM log_messages WHERE seq = ?1 AND topic = ?2 AND message_id = ?3",
        params![seq, topic, message_id],
    )? > 0;
    tx.prepare_cached(
        "INSERT INTO log_consumers (consumer, topic, acked_through) VALUES (?1, ?2, 0) \
         ON CONFLICT (consumer, topic) DO NOTHING",
    )
    .ctx(OP)?
    .execute(params![consumer, topic])
    .ctx(OP)?;
    if still_logged {
        // Open the message again for this consumer alone. Below its watermark, lower the
        // watermark to just before it and mark everything between acknowledged, so that only
        // this message comes back.
        let watermark: i64 = tx
            .prepare_cached(
                "SELECT acked_through FROM log_consumers WHERE consumer = ?1 AND topic = ?2",
            )
            .ctx(OP)?
            .query_row(params![consumer, topic], |r| r.get(0))
            .ctx(OP)?;
        if seq <= watermark {
            tx.prepare_cached(
                "UPDATE log_consumers SET acked_through = ?3 WHERE consumer = ?1 AND topic = ?2",
            )
            .ctx(OP)?
            .execute(params![consumer, topic, seq - 1])
            .ctx(OP)?;
            tx.prepare_cached(
                "INSERT INTO log_deliveries (consumer, topic, seq, deliveries, visible_at_ms, \
                 acked_at_ms) SELECT ?1, m.topic, m.seq, 1, ?5, ?5 FROM log_messages m \
                 WHERE m.topic = ?2 AND m.seq > ?3 AND m.seq <= ?4 \
                 ON CONFLICT (consumer, topic, seq) DO NOTHING",
            )
            .ctx(OP)?
            .execute(params![consumer, topic, seq, watermark, now])
            .ctx(OP)?;
        }
        tx.prepare_cached(
            "INSERT INTO log_deliveries (consumer, topic, seq, deliveries, visible_at_ms) \
             VALUES (?1, ?2, ?3, 0, ?4) ON CONFLICT (consumer, topic, seq) DO UPDATE SET \
             deliveries = 0, visible_at_ms = excluded.visible_at_ms, acked_at_ms = NULL",
        )
        .ctx(OP)?
        .execute(params![consumer, topic, seq, now])
        .ctx(OP)?;
    } else {
        // Pruned from the log since: append it again with its id, acknowledged already for
        // every other consumer of the topic.
        let appended: Option<i64> = tx
            .prepare_cached(
                "INSERT INTO log_messages (topic, message_id, partition_key, headers, payload, \
                 published_at_ms) VALUES (?1, ?2, NULL, ?3, ?4, ?5) \
                 ON CONFLICT (topic, message_id) DO NOTHING RETURNING seq",
            )
            .ctx(OP)?
            .query_row(params![topic, message_id, headers, payload, now], |r| {
                r.get(0)
            })
            .optional()
            .ctx(OP)?;
        let Some(new_seq) = appended else {
            return Ok(RetryOutcome::Refused {
                reason: format!(
                    "topic `{topic}` holds another message with id `{message_id}`: the input \
                     cannot be delivered again under its id"
                ),
            });
        };
        tx.prepare_cached(
            "INSERT INTO log_deliveries (consumer, topic, seq, deliveries, visible_at_ms, \
             acked_at_ms) SELECT c.consumer, c.topic, ?2, 1, ?4, ?4 FROM log_consumers c \
             WHERE c.topic = ?1 AND c.consumer <> ?3 \
             ON CONFLICT (consumer, topic, seq) DO NOTHING",
        )
        .ctx(OP)?
        .execute(params![topic, new_seq, consumer, now])
        .ctx(OP)?;
    }
    tx.prepare_cached("DELETE FROM log_dead_letters WHERE consumer = ?1 AND seq = ?2")
        .ctx(OP)?
        .execute(params![consumer, seq])
        .ctx(OP)?;
    let record = insert_retry(
        tx,
        &RetryRecord {
            id: 0,
            kind: DeadLetterKind::Input,
            target,
            run_key: None,
            dead_letter_reason: dead_reason,
            attempts: to_u32(deliveries, "a dead letter", "deliveries")?,
            previous_outcome: None,
            operator: request.operator.clone(),
            reason: request.reason.clone(),
            retried_at: now,
        },
    )?;
    Ok(RetryOutcome::Retried(record))
}

// ---------------------------------------------------------------------------------------------
// The trait.

impl Inspect for SqliteStore {
    async fn clock(&self) -> Result<Millis, StoreError> {
        self.db.read_at("reading the clock", |_, now| Ok(now)).await
    }

    fn runs(
        &self,
        query: RunQuery,
    ) -> impl Future<Output = Result<Vec<RunSummary>, StoreError>> + Send {
        self.db
            .read("listing runs", move |conn| runs_tx(conn, &query))
    }

    fn run_detail(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<RunDetail>, StoreError>> + Send {
        let key = key.to_owned();
        self.db
            .read("reading a run", move |conn| run_detail_tx(conn, &key))
    }

    fn pending(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + Send {
        self.db.read("reading pending rows", move |conn| {
            let rows = load_outbox(
                conn,
                "reading pending rows",
                "o.dispatched_at_ms IS NULL AND o.dead_lettered_reason IS NULL \
                 ORDER BY o.created_at_ms, o.run_key, o.seq LIMIT ?1",
                [limit_param(limit)],
            )?;
            with_retries(conn, rows)
        })
    }

    fn dead_letters(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetterEntry>, StoreError>> + Send {
        self.db.read("reading dead letters", move |conn| {
            let rows = load_outbox(
                conn,
                "reading dead letters",
                "o.dead_lettered_reason IS NOT NULL ORDER BY o.rowid LIMIT ?1",
                [limit_param(limit)],
            )?;
            let mut out: Vec<DeadLetterEntry> = with_retries(conn, rows)?
                .into_iter()
                .map(|e| DeadLetterEntry::Outbox(Box::new(e)))
                .collect();
            let left = limit.saturating_sub(out.len());
            if left > 0 {
                out.extend(
                    input_dead_letters(conn, limit_param(left))?
                        .into_iter()
                        .map(DeadLetterEntry::Input),
                );
            }
            Ok(out)
        })
    }

    fn entity_history(
        &self,
        lookup: &LookupRef,
        as_of: Option<Tx>,
    ) -> impl Future<Output = Result<Option<EntityHistory>, StoreError>> + Send {
        let lookup = lookup.clone();
        self.db.read("reading an entity's history", move |conn| {
            entity_history_tx(conn, &lookup, as_of)
        })
    }

    fn prune_preview(
        &self,
        older_than: PruneOlderThan,
    ) -> impl Future<Output = Result<PruneReport, StoreError>> + Send {
        self.db.read_at("previewing a prune", move |conn, now| {
            prune_preview_tx(conn, older_than, now)
        })
    }

    fn backlog(&self) -> impl Future<Output = Result<BacklogReport, StoreError>> + Send {
        self.db.read_at("measuring the backlog", backlog_tx)
    }

    fn retry_dead_letter(
        &self,
        id: &DeadLetterId,
        request: &RetryRequest,
    ) -> impl Future<Output = Result<RetryOutcome, StoreError>> + Send {
        let id = id.clone();
        let request = request.clone();
        let db = Arc::clone(&self.db);
        let fut = self
            .db
            .write_at("retrying a dead letter", move |tx, now| match &id {
                DeadLetterId::Outbox(row) => retry_outbox_tx(tx, row, &request, now),
                DeadLetterId::Input { consumer, sequence } => {
                    retry_input_tx(tx, consumer, *sequence, &request, now)
                }
            });
        async move {
            let outcome = fut.await?;
            if matches!(&outcome, RetryOutcome::Retried(r) if r.kind == DeadLetterKind::Input) {
                db.appended.notify_waiters();
            }
            Ok(outcome)
        }
    }

    fn blocked_inputs(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<BlockedInputEntry>, StoreError>> + Send {
        self.db.read("reading blocked inputs", move |conn| {
            super::blocked::list(conn, limit_param(limit))
        })
    }

    fn retries(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RetryRecord>, StoreError>> + Send {
        self.db.read("reading dead-letter retries", move |conn| {
            load_retries(conn, "1 = 1 ORDER BY id LIMIT ?1", [limit_param(limit)])
        })
    }
}
