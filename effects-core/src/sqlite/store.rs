//! The SQLite store: datoms, effect runs and the outbox.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde_json::Value;

use super::db::{Ctx, Db, SqliteOptions};
use super::log::{SqliteLog, append_message};
use crate::datom::{LookupRef, Op};
use crate::store::{
    Backlog, BlockedInput, BlockedRow, ClaimOptions, Claimed, Colocation, Commit, Conflict, Entity,
    Finish, HistoryDatom, Lease, Millis, NewDatom, NewOutboxRow, NewRun, OutboxKind, OutboxRow,
    PruneOlderThan, PruneReport, Reaped, RecordedRequest, RequestOutcome, RunRecord, RunStatus,
    Store, StoreError, Tx,
};
use crate::transport::message_headers as publish_headers;

///
/// ```
/// use effects_core::store::{SqliteStore, Store};
/// use effects_core::LookupRef;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = SqliteStore::in_memory()?;
/// assert_eq!(store.entity(&LookupRef::new("card/id", "c1"), None).await?, None);
/// # Ok::<(), effects_core::store::StoreError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    pub(crate) db: Arc<Db>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("location", &self.db.location)
            .finish_non_exhaustive()
    }
}
impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` in WAL mode with default options,
    /// and applies pending migrations. Blocks while doing so: call it at startup.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, &SqliteOptions::default())
    }

    /// [`SqliteStore::open`] with options.
    pub fn open_with(
        path: impl AsRef<Path>,
        options: &SqliteOptions,
    ) -> Result<SqliteStore, StoreError> {
        Ok(SqliteStore {
            db: Arc::new(Db::open(Some(path.as_ref()), options)?),
        })
    }

    /// A private in-memory database, gone when the last clone is dropped.
    pub fn in_memory() -> Result<SqliteStore, StoreError> {
        Ok(SqliteStore {
            db: Arc::new(Db::open(None, &SqliteOptions::default())?),
        })
    }

    /// The embedded log transport in this store's database. Runs whose executor uses it
    /// publish their messages in the same transaction as their datoms.
    pub fn log(&self) -> SqliteLog {
        SqliteLog::new(Arc::clone(&self.db))
    }

    /// The file path, or `:memory:`.
    pub fn location(&self) -> &str {
        &self.db.location
    }

    /// Shifts this handle's wall clock by `skew_ms` milliseconds, as if its process's clock
    /// were wrong by that much (see the store's clock in the [module documentation](super)).
    /// Testing only: a handle opened on the same file stands for another process.
    #[doc(hidden)]
    pub fn skew_clock_for_tests(&self, skew_ms: i64) {
        self.db.clock.skew(skew_ms);
    }

    /// What is left to do: for health checks, and to wait until a process has caught up.
    pub fn backlog(&self) -> impl Future<Output = Result<Backlog, StoreError>> + Send + 'static {
        self.db.read("measuring the backlog", |conn| {
            const OP: &str = "measuring the backlog";
            let count = |sql: &str| -> Result<u64, StoreError> {
                let n: i64 = conn
                    .prepare_cached(sql)
                    .ctx(OP)?
                    .query_row([], |r| r.get(0))
                    .ctx(OP)?;
                Ok(u64::try_from(n).unwrap_or(0))
            };
            Ok(Backlog {
                pending_rows: count(
                    "SELECT COUNT(*) FROM outbox \
                     WHERE dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL",
                )?,
                dead_lettered_rows: count(
                    "SELECT COUNT(*) FROM outbox WHERE dead_lettered_reason IS NOT NULL",
                )?,
                open_runs: count("SELECT COUNT(*) FROM effect_runs WHERE status <> 'done'")?,
            })
        })
    }

    /// The migrations recorded in the database: `(version, file name)`.
    pub fn schema_versions(
        &self,
    ) -> impl Future<Output = Result<Vec<(i64, String)>, StoreError>> + Send + 'static {
        self.db.read("reading schema versions", |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT version, name FROM schema_version ORDER BY version")
                .ctx("reading schema versions")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .ctx("reading schema versions")?
                .collect::<rusqlite::Result<_>>()
                .ctx("reading schema versions")
        })
    }
}

impl SqliteStore {
    /// The datom history of every transaction after `after` (all of it with `None`), in the
    /// order it was written: by transaction, then as each run applied it. For inspection,
    /// audits and tests; it reads everything asked for at once.
    ///
    /// ```
    /// use effects_core::executor::Executor;
    /// use effects_core::store::SqliteStore;
    /// use effects_core::{DatomEffect, Effects, LookupRef, Op};
    /// use serde_json::json;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let store = SqliteStore::in_memory()?;
    /// let executor = Executor::builder(store.clone(), store.log()).build();
    /// let card = LookupRef::new("card/id", "c1");
    /// let status = |s: &str| Effects::from(DatomEffect::assert(card.clone(), [("card/status", json!(s))]));
    /// let t1 = executor.run("open:c1", status("active")).await?.tx();
    /// let t2 = executor.run("block:c1", status("blocked")).await?.tx();
    ///
    /// let changes: Vec<_> = store
    ///     .history(None)
    ///     .await?
    ///     .into_iter()
    ///     .map(|d| (d.tx, d.run_key, d.op, d.value))
    ///     .collect();
    /// assert_eq!(changes, [
    ///     (t1, "open:c1".to_owned(), Op::Assert, json!("active")),
    ///     (t2, "block:c1".to_owned(), Op::Retract, json!("active")),
    ///     (t2, "block:c1".to_owned(), Op::Assert, json!("blocked")),
    /// ]);
    /// assert_eq!(store.history(Some(t1)).await?.len(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub fn history(
        &self,
        after: Option<Tx>,
    ) -> impl Future<Output = Result<Vec<HistoryDatom>, StoreError>> + Send + 'static {
        let after = after.map_or(0, |t| t.0);
        self.db.read("reading the datom history", move |conn| {
            const OP: &str = "reading the datom history";
            type Raw = (i64, String, String, String, String, String, bool);
            let mut stmt = conn
                .prepare_cached(
                    "SELECT d.tx, t.run_key, e.identity, e.identity_value, d.attribute, d.value, \
                     d.added FROM datoms d JOIN entities e ON e.id = d.entity_id \
                     JOIN transactions t ON t.tx = d.tx WHERE d.tx > ?1 ORDER BY d.tx, d.id",
                )
                .ctx(OP)?;
            let rows: Vec<Raw> = stmt
                .query_map([after], |r| {
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
            rows.into_iter()
                .map(
                    |(tx, run_key, identity, identity_value, attribute, value, added)| {
                        let what = || format!("datom of tx {tx} on `{identity}`");
                        let parse = |text: &str, column: &str| -> Result<Value, StoreError> {
                            serde_json::from_str(text)
                                .map_err(|e| corrupt(what(), format!("{column}: {e}")))
                        };
                        Ok(HistoryDatom {
                            tx: Tx(tx),
                            entity: LookupRef::new(
                                identity.as_str(),
                                parse(&identity_value, "identity value")?,
                            ),
                            value: parse(&value, "value")?,
                            op: if added { Op::Assert } else { Op::Retract },
                            run_key,
                            attribute,
                        })
                    },
                )
                .collect()
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Row decoding.

const OUTBOX_COLUMNS: &str = "id, run_key, seq, kind, destination, partition_key, headers, payload, \
     tx, attempts, next_attempt_at_ms, last_error, dispatched_at_ms, dead_lettered_reason, ready_seq, \
     lease_owner, lease_until_ms, lease_token";

struct RawOutbox {
    row: OutboxRow,
    ready_seq: Option<i64>,
}

fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        reason: reason.into(),
    }
}

fn to_u32(v: i64, what: &str, column: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| corrupt(what, format!("`{column}` is {v}")))
}

fn parse_headers(text: &str, what: &str) -> Result<BTreeMap<String, String>, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(what, format!("headers: {e}")))
}

fn headers_json(headers: &BTreeMap<String, String>) -> String {
    // A map of strings always serializes.
    serde_json::to_string(headers).unwrap_or_else(|_| "{}".to_owned())
}

type OutboxTuple = (
    String,
    String,
    i64,
    String,
    String,
    Option<String>,
    String,
    String,
    i64,
    i64,
    i64,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

fn outbox_tuple(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxTuple> {
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
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
        r.get(14)?,
        r.get(15)?,
        r.get(16)?,
        r.get(17)?,
    ))
}

fn decode_outbox(t: OutboxTuple) -> Result<RawOutbox, StoreError> {
    let (
        id,
        run_key,
        seq,
        kind,
        destination,
        partition_key,
        headers,
        payload,
        tx,
        attempts,
        next_attempt_at,
        last_error,
        dispatched_at,
        dead_lettered,
        ready_seq,
        lease_owner,
        lease_until,
        lease_token,
    ) = t;
    let what = format!("outbox row `{id}`");
    let kind = match kind.as_str() {
        "request" => OutboxKind::Request,
        "message" => OutboxKind::Message,
        other => return Err(corrupt(what, format!("kind `{other}`"))),
    };
    Ok(RawOutbox {
        row: OutboxRow {
            seq: to_u32(seq, &what, "seq")?,
            attempts: to_u32(attempts, &what, "attempts")?,
            headers: parse_headers(&headers, &what)?,
            id,
            run_key,
            kind,
            destination,
            partition_key,
            payload,
            tx: Tx(tx),
            next_attempt_at,
            last_error,
            dispatched_at,
            dead_lettered,
            lease: lease_owner
                .zip(lease_token)
                .map(|(owner, token)| Lease { owner, token }),
            lease_until,
        },
        ready_seq,
    })
}

const RUN_COLUMNS: &str = "key, effects_sha256, tx, status, after_requests, outbox_count, \
     created_at_ms, updated_at_ms, completed_at_ms";

type RunTuple = (
    String,
    String,
    i64,
    String,
    Option<String>,
    i64,
    i64,
    i64,
    Option<i64>,
);

fn run_tuple(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunTuple> {
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
}

fn decode_run(t: RunTuple) -> Result<RunRecord, StoreError> {
    let (key, sha, tx, status, after, count, created, updated, completed) = t;
    let what = format!("effect run `{key}`");
    Ok(RunRecord {
        status: RunStatus::parse(&status)
            .ok_or_else(|| corrupt(what.clone(), format!("status `{status}`")))?,
        outbox_count: to_u32(count, &what, "outbox_count")?,
        key,
        effects_sha256: sha,
        tx: Tx(tx),
        after_requests: after,
        created_at: created,
        updated_at: updated,
        completed_at: completed,
    })
}

fn load_run(conn: &Connection, key: &str) -> Result<Option<RunRecord>, StoreError> {
    const OP: &str = "reading an effect run";
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM effect_runs WHERE key = ?1"
        ))
        .ctx(OP)?;
    stmt.query_row([key], run_tuple)
        .optional()
        .ctx(OP)?
        .map(decode_run)
        .transpose()
}

fn load_outbox_where(
    conn: &Connection,
    operation: &'static str,
    condition: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<RawOutbox>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE {condition}"
        ))
        .ctx(operation)?;
    let tuples = stmt
        .query_map(params, outbox_tuple)
        .ctx(operation)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .ctx(operation)?;
    tuples.into_iter().map(decode_outbox).collect()
}

// ---------------------------------------------------------------------------------------------
// Writing runs.

fn next_ready(tx: &Transaction<'_>, count: usize) -> Result<i64, StoreError> {
    next_sequence(tx, "outbox_ready", count)
}

/// Allocates `count` values of a named sequence; returns the first.
fn next_sequence(tx: &Transaction<'_>, name: &str, count: usize) -> Result<i64, StoreError> {
    const OP: &str = "allocating a sequence";
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    let last: i64 = tx
        .prepare_cached("UPDATE sequences SET value = value + ?1 WHERE name = ?2 RETURNING value")
        .ctx(OP)?
        .query_row(params![count, name], |r| r.get(0))
        .ctx(OP)?;
    Ok(last - count + 1)
}

fn millis(d: Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether a ready, pending message of `topic` with `partition_key` is waiting.
fn partition_busy(
    tx: &Transaction<'_>,
    topic: &str,
    partition_key: &str,
) -> Result<bool, StoreError> {
    const OP: &str = "checking partition order";
    tx.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM outbox WHERE kind = 'message' AND destination = ?1 \
         AND partition_key = ?2 AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL \
         AND ready_seq IS NOT NULL)",
    )
    .ctx(OP)?
    .query_row(params![topic, partition_key], |r| r.get(0))
    .ctx(OP)
}

/// The entity's row id and version (`updated_tx`), if it exists.
fn entity_version(
    tx: &Transaction<'_>,
    identity: &str,
    identity_value: &str,
) -> Result<Option<(i64, i64)>, StoreError> {
    tx.prepare_cached(
        "SELECT id, updated_tx FROM entities WHERE identity = ?1 AND identity_value = ?2",
    )
    .ctx("validating reads")?
    .query_row(params![identity, identity_value], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
    .ctx("validating reads")
}

/// Read validation: the first read whose entity changed since, or the first expected value of
/// a compare-and-set datom that does not hold, against the state before the run. Runs inside
/// the writer's `BEGIN IMMEDIATE` transaction, so nothing can change between this check and
/// the commit.
fn check_reads(tx: &Transaction<'_>, run: &NewRun) -> Result<Option<Conflict>, StoreError> {
    const OP: &str = "validating reads";
    for read in &run.reads {
        let found =
            entity_version(tx, &read.entity.attribute, &read.identity_value)?.map(|(_, v)| Tx(v));
        if let Some(conflict) = Conflict::of_read(read, found) {
            return Ok(Some(conflict));
        }
    }
    for (index, datom) in run.datoms.iter().enumerate() {
        if datom.expected.is_empty() {
            continue;
        }
        let entity = entity_version(tx, &datom.identity, &datom.identity_value)?;
        for (attribute, expected) in &datom.expected {
            let current: Option<String> = match entity {
                None => None,
                Some((id, _)) => tx
                    .prepare_cached(
                        "SELECT value FROM entity_attributes WHERE entity_id = ?1 AND attribute = ?2",
                    )
                    .ctx(OP)?
                    .query_row(params![id, attribute], |r| r.get(0))
                    .optional()
                    .ctx(OP)?,
            };
            if let Some(conflict) =
                Conflict::of_expectation(index, datom, attribute, expected, current.as_deref())?
            {
                return Ok(Some(conflict));
            }
        }
    }
    Ok(None)
}

fn apply_datom(tx: &Transaction<'_>, txid: i64, datom: &NewDatom) -> Result<(), StoreError> {
    const OP: &str = "applying datoms";
    if datom.op == Op::Retract
        && entity_version(tx, &datom.identity, &datom.identity_value)?.is_none()
    {
        // Nothing to retract, and no entity to create.
        return Ok(());
    }
    let created: Option<i64> = tx
        .prepare_cached(
            "INSERT INTO entities (identity, identity_value, created_tx, updated_tx) \
             VALUES (?1, ?2, ?3, ?3) ON CONFLICT (identity, identity_value) DO NOTHING \
             RETURNING id",
        )
        .ctx(OP)?
        .query_row(params![datom.identity, datom.identity_value, txid], |r| {
            r.get(0)
        })
        .optional()
        .ctx(OP)?;
    let (entity, is_new) = match created {
        Some(id) => (id, true),
        None => {
            let id = tx
                .prepare_cached(
                    "SELECT id FROM entities WHERE identity = ?1 AND identity_value = ?2",
                )
                .ctx(OP)?
                .query_row(params![datom.identity, datom.identity_value], |r| r.get(0))
                .ctx(OP)?;
            (id, false)
        }
    };
    let mut changed = false;
    for (attribute, value) in &datom.attributes {
        // An entity created by this datom has no attributes yet, and one datom names each
        // attribute once (a later datom on the same entity finds it existing).
        let current: Option<String> = if is_new {
            None
        } else {
            tx.prepare_cached(
                "SELECT value FROM entity_attributes WHERE entity_id = ?1 AND attribute = ?2",
            )
            .ctx(OP)?
            .query_row(params![entity, attribute], |r| r.get(0))
            .optional()
            .ctx(OP)?
        };
        let mut history = |value: &str, added: bool| -> Result<(), StoreError> {
            tx.prepare_cached(
                "INSERT INTO datoms (tx, entity_id, attribute, value, added) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .ctx(OP)?
            .execute(params![txid, entity, attribute, value, added])
            .ctx(OP)?;
            changed = true;
            Ok(())
        };
        match datom.op {
            Op::Assert if current.as_deref() == Some(value.as_str()) => {}
            Op::Assert => {
                if let Some(old) = &current {
                    history(old, false)?;
                }
                history(value, true)?;
                tx.prepare_cached(
                    "INSERT INTO entity_attributes (entity_id, attribute, value, tx) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (entity_id, attribute) \
                     DO UPDATE SET value = excluded.value, tx = excluded.tx",
                )
                .ctx(OP)?
                .execute(params![entity, attribute, value, txid])
                .ctx(OP)?;
            }
            Op::Retract if current.as_deref() == Some(value.as_str()) => {
                history(value, false)?;
                tx.prepare_cached(
                    "DELETE FROM entity_attributes WHERE entity_id = ?1 AND attribute = ?2",
                )
                .ctx(OP)?
                .execute(params![entity, attribute])
                .ctx(OP)?;
            }
            Op::Retract => {}
        }
    }
    if changed && !is_new {
        tx.prepare_cached("UPDATE entities SET updated_tx = ?1 WHERE id = ?2")
            .ctx(OP)?
            .execute(params![txid, entity])
            .ctx(OP)?;
    }
    Ok(())
}

fn insert_outbox(
    tx: &Transaction<'_>,
    key: &str,
    txid: i64,
    row: &NewOutboxRow,
    ready_seq: Option<i64>,
    dispatched_at: Option<Millis>,
    now: Millis,
) -> Result<(), StoreError> {
    const OP: &str = "writing the outbox";
    tx.prepare_cached(
        "INSERT INTO outbox (id, run_key, seq, kind, destination, partition_key, headers, \
         payload, tx, ready_seq, next_attempt_at_ms, created_at_ms, dispatched_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12)",
    )
    .ctx(OP)?
    .execute(params![
        crate::store::outbox_id(key, row.seq),
        key,
        row.seq,
        row.kind.as_str(),
        row.destination,
        row.partition_key,
        headers_json(&row.headers),
        row.payload,
        txid,
        ready_seq,
        now,
        dispatched_at,
    ])
    .ctx(OP)?;
    Ok(())
}

fn complete_if_done(tx: &Transaction<'_>, key: &str, now: Millis) -> Result<(), StoreError> {
    const OP: &str = "completing a run";
    tx.prepare_cached(
        "UPDATE effect_runs SET status = 'done', completed_at_ms = ?2, updated_at_ms = ?2 \
         WHERE key = ?1 AND status = 'messages_pending' AND NOT EXISTS (SELECT 1 FROM outbox \
         WHERE run_key = ?1 AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL)",
    )
    .ctx(OP)?
    .execute(params![key, now])
    .ctx(OP)?;
    Ok(())
}

fn apply_run(
    tx: &Transaction<'_>,
    run: &NewRun,
    options: &ClaimOptions,
    now: Millis,
) -> Result<Commit, StoreError> {
    const OP: &str = "committing a run";
    if let Some(existing) = load_run(tx, &run.key)? {
        return Ok(Commit::Existing(existing));
    }
    if let Some(conflict) = check_reads(tx, run)? {
        return Ok(Commit::Conflict(conflict));
    }
    tx.prepare_cached("INSERT INTO transactions (run_key, committed_at_ms) VALUES (?1, ?2)")
        .ctx(OP)?
        .execute(params![run.key, now])
        .ctx(OP)?;
    let txid = tx.last_insert_rowid();
    for datom in &run.datoms {
        apply_datom(tx, txid, datom)?;
    }

    let has_requests = run.outbox.iter().any(|r| r.kind == OutboxKind::Request);
    // Which rows are published right now, inside this transaction.
    let mut inline = vec![false; run.outbox.len()];
    if options.publish_inline && !has_requests {
        let mut blocked: HashSet<(&str, &str)> = HashSet::new();
        for (i, row) in run.outbox.iter().enumerate() {
            inline[i] = match &row.partition_key {
                None => true,
                Some(pk) => {
                    let slot = (row.destination.as_str(), pk.as_str());
                    if blocked.contains(&slot) || partition_busy(tx, slot.0, slot.1)? {
                        blocked.insert(slot);
                        false
                    } else {
                        true
                    }
                }
            };
        }
    }
    let published_inline = inline.iter().filter(|b| **b).count();
    let pending = run.outbox.len() - published_inline;
    let status = if has_requests {
        RunStatus::RequestsPending
    } else if pending > 0 {
        RunStatus::MessagesPending
    } else {
        RunStatus::Done
    };
    let outbox_count = u32::try_from(run.outbox.len()).unwrap_or(u32::MAX);
    tx.prepare_cached(
        "INSERT INTO effect_runs (key, effects_sha256, tx, status, after_requests, outbox_count, \
         created_at_ms, updated_at_ms, completed_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)",
    )
    .ctx(OP)?
    .execute(params![
        run.key,
        run.effects_sha256,
        txid,
        status.as_str(),
        run.after_requests,
        outbox_count,
        now,
        (status == RunStatus::Done).then_some(now),
    ])
    .ctx(OP)?;

    // Rows that are ready but not published get an order: requests always, messages only when
    // the run has no requests (otherwise they wait for `finish_requests`).
    let ready_count = run
        .outbox
        .iter()
        .zip(&inline)
        .filter(|(r, inl)| !**inl && (!has_requests || r.kind == OutboxKind::Request))
        .count();
    let mut ready = if ready_count > 0 {
        next_ready(tx, ready_count)?
    } else {
        0
    };
    for (row, inl) in run.outbox.iter().zip(&inline) {
        if *inl {
            insert_outbox(tx, &run.key, txid, row, None, Some(now), now)?;
            let headers = publish_headers(&row.headers, &run.key, Tx(txid));
            append_message(
                tx,
                &row.destination,
                &crate::store::outbox_id(&run.key, row.seq),
                row.partition_key.as_deref(),
                &headers,
                row.payload.as_bytes(),
                now,
            )?;
        } else if !has_requests || row.kind == OutboxKind::Request {
            insert_outbox(tx, &run.key, txid, row, Some(ready), None, now)?;
            ready += 1;
        } else {
            insert_outbox(tx, &run.key, txid, row, None, None, now)?;
        }
    }
    if pending == 0 {
        return Ok(Commit::Applied {
            tx: Tx(txid),
            status,
            claimed: Vec::new(),
            published_inline,
        });
    }
    let claimed = claim(tx, Some(&run.key), usize::MAX, options, now)?;
    let status = if claimed.published_inline > 0 {
        load_run(tx, &run.key)?.map_or(status, |r| r.status)
    } else {
        status
    };
    Ok(Commit::Applied {
        tx: Tx(txid),
        status,
        claimed: claimed.rows,
        published_inline: published_inline + claimed.published_inline,
    })
}

/// Claims pending, ready, due, unleased rows (of one run, or of all), in ready order, following
/// the ordering rules of [`Store::claim_due`]. With `publish_inline`, message rows are published
/// into the log here instead of being leased.
fn claim(
    tx: &Transaction<'_>,
    run_key: Option<&str>,
    limit: usize,
    options: &ClaimOptions,
    now: Millis,
) -> Result<Claimed, StoreError> {
    const OP: &str = "claiming outbox rows";
    let scan = i64::try_from(limit.saturating_mul(4).saturating_add(64)).unwrap_or(i64::MAX);
    let due = "dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL AND ready_seq IS NOT NULL \
               AND next_attempt_at_ms <= ?1 AND (lease_until_ms IS NULL OR lease_until_ms <= ?1)";
    let candidates = match run_key {
        Some(key) => load_outbox_where(
            tx,
            OP,
            &format!("{due} AND run_key = ?2 ORDER BY ready_seq LIMIT ?3"),
            params![now, key, scan],
        )?,
        None => load_outbox_where(
            tx,
            OP,
            &format!("{due} ORDER BY ready_seq LIMIT ?2"),
            params![now, scan],
        )?,
    };

    let mut claimed: Vec<OutboxRow> = Vec::new();
    let mut requests_taken: HashMap<String, i64> = HashMap::new();
    let mut blocked_runs: HashSet<String> = HashSet::new();
    let mut partition_taken: HashMap<(String, String), i64> = HashMap::new();
    let mut blocked_partitions: HashSet<(String, String)> = HashSet::new();
    for RawOutbox { row, ready_seq } in candidates {
        if claimed.len() >= limit {
            break;
        }
        match row.kind {
            OutboxKind::Request => {
                if blocked_runs.contains(&row.run_key) {
                    continue;
                }
                let earlier: i64 = tx
                    .prepare_cached(
                        "SELECT COUNT(*) FROM outbox WHERE run_key = ?1 AND kind = 'request' \
                         AND seq < ?2 AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL",
                    )
                    .ctx(OP)?
                    .query_row(params![row.run_key, row.seq], |r| r.get(0))
                    .ctx(OP)?;
                let taken = requests_taken.entry(row.run_key.clone()).or_insert(0);
                if earlier != *taken {
                    blocked_runs.insert(row.run_key.clone());
                    continue;
                }
                *taken += 1;
            }
            OutboxKind::Message => {
                if let Some(pk) = &row.partition_key {
                    let slot = (row.destination.clone(), pk.clone());
                    if blocked_partitions.contains(&slot) {
                        continue;
                    }
                    let earlier: i64 = tx
                        .prepare_cached(
                            "SELECT COUNT(*) FROM outbox WHERE kind = 'message' \
                             AND destination = ?1 AND partition_key = ?2 \
                             AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL \
                             AND ready_seq < ?3",
                        )
                        .ctx(OP)?
                        .query_row(params![row.destination, pk, ready_seq], |r| r.get(0))
                        .ctx(OP)?;
                    let taken = partition_taken.entry(slot.clone()).or_insert(0);
                    if earlier != *taken {
                        blocked_partitions.insert(slot);
                        continue;
                    }
                    *taken += 1;
                }
            }
        }
        claimed.push(row);
    }

    let mut published_inline = 0;
    let mut rows = Vec::with_capacity(claimed.len());
    let mut touched_runs: HashSet<String> = HashSet::new();
    let leased = claimed
        .iter()
        .any(|r| !(options.publish_inline && r.kind == OutboxKind::Message));
    let lease = if leased {
        Some(Lease {
            owner: options.owner.clone(),
            token: next_sequence(tx, "lease_token", 1)?,
        })
    } else {
        None
    };
    let until = now.saturating_add(millis(options.lease));
    for mut row in claimed {
        if options.publish_inline && row.kind == OutboxKind::Message {
            publish_row_inline(tx, &row, now)?;
            touched_runs.insert(row.run_key.clone());
            published_inline += 1;
            continue;
        }
        let Some(lease) = &lease else {
            unreachable!("a lease is taken when a row is handed back");
        };
        tx.prepare_cached(
            "UPDATE outbox SET lease_owner = ?2, lease_until_ms = ?3, lease_token = ?4, \
             attempts = attempts + 1 WHERE id = ?1",
        )
        .ctx(OP)?
        .execute(params![row.id, lease.owner, until, lease.token])
        .ctx(OP)?;
        row.attempts += 1;
        row.lease = Some(lease.clone());
        row.lease_until = Some(until);
        rows.push(row);
    }
    for key in touched_runs {
        complete_if_done(tx, &key, now)?;
    }
    Ok(Claimed {
        rows,
        published_inline,
    })
}

fn publish_row_inline(
    tx: &Transaction<'_>,
    row: &OutboxRow,
    now: Millis,
) -> Result<(), StoreError> {
    const OP: &str = "publishing into the log";
    let headers = publish_headers(&row.headers, &row.run_key, row.tx);
    append_message(
        tx,
        &row.destination,
        &row.id,
        row.partition_key.as_deref(),
        &headers,
        row.payload.as_bytes(),
        now,
    )?;
    tx.prepare_cached(
        "UPDATE outbox SET dispatched_at_ms = ?2, attempts = attempts + 1, lease_owner = NULL, \
         lease_until_ms = NULL, lease_token = NULL WHERE id = ?1 AND dispatched_at_ms IS NULL",
    )
    .ctx(OP)?
    .execute(params![row.id, now])
    .ctx(OP)?;
    Ok(())
}

fn finish_requests_tx(
    tx: &Transaction<'_>,
    key: &str,
    after: &[NewOutboxRow],
    options: &ClaimOptions,
    now: Millis,
) -> Result<Finish, StoreError> {
    const OP: &str = "finishing requests";
    let Some(run) = load_run(tx, key)? else {
        return Ok(Finish::AlreadyFinished);
    };
    if run.status != RunStatus::RequestsPending {
        return Ok(Finish::AlreadyFinished);
    }
    let unresolved: i64 = tx
        .prepare_cached(
            "SELECT COUNT(*) FROM outbox WHERE run_key = ?1 AND kind = 'request' \
             AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL",
        )
        .ctx(OP)?
        .query_row([key], |r| r.get(0))
        .ctx(OP)?;
    if unresolved > 0 {
        return Ok(Finish::NotReady);
    }
    for (i, row) in after.iter().enumerate() {
        let expected = run
            .outbox_count
            .saturating_add(u32::try_from(i).unwrap_or(u32::MAX));
        if row.seq != expected || row.kind != OutboxKind::Message {
            return Err(corrupt(
                format!("after-requests of run `{key}`"),
                format!(
                    "row {i} has seq {} and kind {:?}; expected message {expected}",
                    row.seq, row.kind
                ),
            ));
        }
        insert_outbox(tx, key, run.tx.0, row, None, None, now)?;
    }
    let waiting: Vec<String> = {
        let mut stmt = tx
            .prepare_cached(
                "SELECT id FROM outbox WHERE run_key = ?1 AND kind = 'message' \
                 AND ready_seq IS NULL AND dispatched_at_ms IS NULL \
                 AND dead_lettered_reason IS NULL ORDER BY seq",
            )
            .ctx(OP)?;
        stmt.query_map([key], |r| r.get(0))
            .ctx(OP)?
            .collect::<rusqlite::Result<_>>()
            .ctx(OP)?
    };
    if !waiting.is_empty() {
        let first = next_ready(tx, waiting.len())?;
        for (ready, id) in (first..).zip(&waiting) {
            tx.prepare_cached("UPDATE outbox SET ready_seq = ?2 WHERE id = ?1")
                .ctx(OP)?
                .execute(params![id, ready])
                .ctx(OP)?;
        }
    }
    let count = run
        .outbox_count
        .saturating_add(u32::try_from(after.len()).unwrap_or(u32::MAX));
    tx.prepare_cached(
        "UPDATE effect_runs SET status = 'messages_pending', outbox_count = ?2, updated_at_ms = ?3 \
         WHERE key = ?1",
    )
    .ctx(OP)?
    .execute(params![key, count, now])
    .ctx(OP)?;
    complete_if_done(tx, key, now)?;
    let claimed = claim(tx, Some(key), usize::MAX, options, now)?;
    let status = load_run(tx, key)?.map_or(RunStatus::MessagesPending, |r| r.status);
    Ok(Finish::Finished {
        status,
        claimed: claimed.rows,
        published_inline: claimed.published_inline,
    })
}

/// An entity's row id, created and updated `tx`, by lookup ref.
pub(crate) fn find_entity(
    conn: &Connection,
    operation: &'static str,
    lookup: &LookupRef,
) -> Result<Option<(i64, i64, i64)>, StoreError> {
    let identity_value = crate::effects::canonical_json(&lookup.value);
    conn.prepare_cached(
        "SELECT id, created_tx, updated_tx FROM entities \
         WHERE identity = ?1 AND identity_value = ?2",
    )
    .ctx(operation)?
    .query_row(params![lookup.attribute, identity_value], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
    .optional()
    .ctx(operation)
}

fn entity_tx(
    conn: &Connection,
    lookup: &LookupRef,
    as_of: Option<Tx>,
) -> Result<Option<Entity>, StoreError> {
    const OP: &str = "reading an entity";
    let Some((id, created, updated)) = find_entity(conn, OP, lookup)? else {
        return Ok(None);
    };
    let what = || format!("entity {lookup}");
    let parse = |text: &str| -> Result<Value, StoreError> {
        serde_json::from_str(text).map_err(|e| corrupt(what(), format!("value: {e}")))
    };
    let mut attributes = BTreeMap::new();
    let tx = match as_of {
        None => {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT attribute, value FROM entity_attributes WHERE entity_id = ?1",
                )
                .ctx(OP)?;
            let rows = stmt
                .query_map([id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .ctx(OP)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .ctx(OP)?;
            for (name, value) in rows {
                attributes.insert(name, parse(&value)?);
            }
            updated
        }
        Some(Tx(at)) => {
            if created > at {
                return Ok(None);
            }
            let mut stmt = conn
                .prepare_cached(
                    "SELECT attribute, value, added, tx FROM datoms \
                     WHERE entity_id = ?1 AND tx <= ?2 ORDER BY attribute, tx, added",
                )
                .ctx(OP)?;
            let rows = stmt
                .query_map(params![id, at], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, bool>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .ctx(OP)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .ctx(OP)?;
            let mut last = created;
            let mut current: BTreeMap<String, Option<String>> = BTreeMap::new();
            for (name, value, added, tx) in rows {
                last = last.max(tx);
                current.insert(name, added.then_some(value));
            }
            for (name, value) in current {
                if let Some(value) = value {
                    attributes.insert(name, parse(&value)?);
                }
            }
            last
        }
    };
    Ok(Some(Entity {
        lookup: lookup.clone(),
        attributes,
        tx: Tx(tx),
    }))
}

/// Pruning cutoffs as times of the store's clock.
#[derive(Clone, Copy)]
struct PruneBefore {
    outbox_dispatched: Option<Millis>,
    runs_completed: Option<Millis>,
    log_published: Option<Millis>,
}

fn prune_chunk(tx: &Transaction<'_>, before: &PruneBefore) -> Result<PruneReport, StoreError> {
    const OP: &str = "pruning";
    const CHUNK: i64 = 5_000;
    let mut report = PruneReport::default();
    if let Some(cutoff) = before.outbox_dispatched {
        report.outbox_rows = tx
            .prepare_cached(
                "DELETE FROM outbox WHERE rowid IN (SELECT o.rowid FROM outbox o \
                 JOIN effect_runs r ON r.key = o.run_key WHERE o.dispatched_at_ms IS NOT NULL \
                 AND o.dispatched_at_ms < ?1 AND r.status = 'done' LIMIT ?2)",
            )
            .ctx(OP)?
            .execute(params![cutoff, CHUNK])
            .ctx(OP)? as u64;
    }
    if let Some(cutoff) = before.runs_completed {
        let keys: Vec<String> = {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT key FROM effect_runs r WHERE status = 'done' AND completed_at_ms < ?1 \
                     AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.run_key = r.key) LIMIT ?2",
                )
                .ctx(OP)?;
            stmt.query_map(params![cutoff, CHUNK], |r| r.get(0))
                .ctx(OP)?
                .collect::<rusqlite::Result<_>>()
                .ctx(OP)?
        };
        for key in &keys {
            tx.prepare_cached("DELETE FROM effect_run_responses WHERE run_key = ?1")
                .ctx(OP)?
                .execute([key])
                .ctx(OP)?;
            tx.prepare_cached("DELETE FROM effect_runs WHERE key = ?1 AND status = 'done'")
                .ctx(OP)?
                .execute([key])
                .ctx(OP)?;
        }
        report.runs = keys.len() as u64;
    }
    if let Some(cutoff) = before.log_published {
        report.log_messages = tx
            .prepare_cached(
                "DELETE FROM log_messages WHERE seq IN (SELECT m.seq FROM log_messages m \
                 WHERE m.published_at_ms < ?1 \
                 AND EXISTS (SELECT 1 FROM log_consumers c WHERE c.topic = m.topic) \
                 AND m.seq <= (SELECT MIN(c.acked_through) FROM log_consumers c \
                               WHERE c.topic = m.topic) LIMIT ?2)",
            )
            .ctx(OP)?
            .execute(params![cutoff, CHUNK])
            .ctx(OP)? as u64;
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// The trait.

impl Store for SqliteStore {
    fn colocation(&self) -> Option<Colocation> {
        Some(self.db.colocation.clone())
    }

    fn commit_runs(
        &self,
        runs: Vec<NewRun>,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Vec<Commit>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let fut = self.db.write_at("committing runs", move |tx, now| {
            let mut out = Vec::with_capacity(runs.len());
            let mut inputs = Vec::new();
            for run in &runs {
                let commit = apply_run(tx, run, &options, now)?;
                // The run's input, acknowledged with it (a log in this database): when the run
                // is applied, or was applied before.
                if let (Some(input), Commit::Applied { .. } | Commit::Existing(_)) =
                    (&run.ack, &commit)
                {
                    inputs.push(input);
                }
                out.push(commit);
            }
            let acked = !inputs.is_empty();
            super::log::ack_inputs(tx, inputs, now)?;
            if let Some(hook) = &options.before_commit {
                hook();
            }
            Ok((out, acked))
        });
        async move {
            let (out, acked) = fut.await?;
            if acked
                || out.iter().any(
                    |c| matches!(c, Commit::Applied { published_inline, .. } if *published_inline > 0),
                )
            {
                db.appended.notify_waiters();
            }
            Ok(out)
        }
    }

    fn run(&self, key: &str) -> impl Future<Output = Result<Option<RunRecord>, StoreError>> + Send {
        let key = key.to_owned();
        self.db
            .read("reading an effect run", move |conn| load_run(conn, &key))
    }

    fn runs_by_key(
        &self,
        keys: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Option<RunRecord>>, StoreError>> + Send {
        self.db.read("reading effect runs", move |conn| {
            keys.iter().map(|key| load_run(conn, key)).collect()
        })
    }

    fn claim_run(
        &self,
        key: &str,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + Send {
        let key = key.to_owned();
        let db = Arc::clone(&self.db);
        let fut = self
            .db
            .write_at("claiming a run's outbox rows", move |tx, now| {
                claim(tx, Some(&key), usize::MAX, &options, now)
            });
        async move {
            let claimed = fut.await?;
            if claimed.published_inline > 0 {
                db.appended.notify_waiters();
            }
            Ok(claimed)
        }
    }

    fn claim_due(
        &self,
        limit: usize,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let fut = self
            .db
            .write_at("claiming due outbox rows", move |tx, now| {
                claim(tx, None, limit, &options, now)
            });
        async move {
            let claimed = fut.await?;
            if claimed.published_inline > 0 {
                db.appended.notify_waiters();
            }
            Ok(claimed)
        }
    }

    fn stalled_runs(
        &self,
        idle_for: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RunRecord>, StoreError>> + Send {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.db.read_at("finding stalled runs", move |conn, now| {
            const OP: &str = "finding stalled runs";
            let idle_since = now.saturating_sub(millis(idle_for));
            // Idle for long enough, or last recorded by an owner that was reaped (its lock key
            // is no longer in `owners`).
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {RUN_COLUMNS} FROM effect_runs r WHERE status = 'requests_pending' \
                     AND (updated_at_ms <= ?1 OR (recorded_by IS NOT NULL AND NOT EXISTS \
                     (SELECT 1 FROM owners w WHERE w.lock_key = r.recorded_by))) \
                     AND NOT EXISTS (SELECT 1 FROM outbox o \
                     WHERE o.run_key = r.key AND o.kind = 'request' \
                     AND o.dispatched_at_ms IS NULL AND o.dead_lettered_reason IS NULL) \
                     ORDER BY updated_at_ms LIMIT ?2"
                ))
                .ctx(OP)?;
            let tuples = stmt
                .query_map(params![idle_since, limit], run_tuple)
                .ctx(OP)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .ctx(OP)?;
            tuples.into_iter().map(decode_run).collect()
        })
    }

    fn record_request(
        &self,
        id: &str,
        outcome: RequestOutcome,
        lease: &Lease,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let id = id.to_owned();
        let lease = lease.clone();
        // Who records, so that the run is stalled at once if that process dies before the
        // after-requests step (looked up outside the transaction: registration writes too).
        let recorder = self.db.liveness.key_of(&lease.owner);
        self.db.write_at("recording a response", move |tx, now| {
            const OP: &str = "recording a response";
            let Some(row) = load_outbox_where(tx, OP, "id = ?1", [&id])?.pop() else {
                return Err(corrupt(
                    format!("outbox row `{id}`"),
                    "a response was recorded for a row that does not exist",
                ));
            };
            let row = row.row;
            if row.kind != OutboxKind::Request {
                return Err(corrupt(
                    format!("outbox row `{id}`"),
                    "a response was recorded for a message",
                ));
            }
            if row.lease.as_ref() != Some(&lease) {
                return Ok(false);
            }
            let outcome_json = serde_json::to_string(&outcome)
                .map_err(|e| corrupt(format!("outbox row `{id}`"), e.to_string()))?;
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO effect_run_responses (run_key, seq, outcome, recorded_at_ms) \
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (run_key, seq) DO NOTHING",
                )
                .ctx(OP)?
                .execute(params![row.run_key, row.seq, outcome_json, now])
                .ctx(OP)?;
            if inserted == 0 || !row.is_pending() {
                return Ok(true);
            }
            match &outcome {
                RequestOutcome::Response { .. } => tx
                    .prepare_cached(
                        "UPDATE outbox SET dispatched_at_ms = ?2, lease_owner = NULL, \
                         lease_until_ms = NULL, lease_token = NULL, last_error = NULL WHERE id = ?1",
                    )
                    .ctx(OP)?
                    .execute(params![id, now])
                    .ctx(OP)?,
                RequestOutcome::Rejected { response } => tx
                    .prepare_cached(
                        "UPDATE outbox SET dead_lettered_reason = ?2, lease_owner = NULL, \
                         lease_until_ms = NULL, lease_token = NULL WHERE id = ?1",
                    )
                    .ctx(OP)?
                    .execute(params![
                        id,
                        format!("rejected with status {}", response.status)
                    ])
                    .ctx(OP)?,
                RequestOutcome::Failed { reason } => tx
                    .prepare_cached(
                        "UPDATE outbox SET dead_lettered_reason = ?2, lease_owner = NULL, \
                         lease_until_ms = NULL, lease_token = NULL WHERE id = ?1",
                    )
                    .ctx(OP)?
                    .execute(params![id, reason])
                    .ctx(OP)?,
            };
            tx.prepare_cached(
                "UPDATE effect_runs SET updated_at_ms = ?2, recorded_by = ?3 WHERE key = ?1",
            )
            .ctx(OP)?
            .execute(params![row.run_key, now, recorder])
            .ctx(OP)?;
            Ok(true)
        })
    }

    fn recorded_requests(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Vec<RecordedRequest>, StoreError>> + Send {
        let key = key.to_owned();
        self.db.read("reading recorded responses", move |conn| {
            const OP: &str = "reading recorded responses";
            let mut stmt = conn
                .prepare_cached(
                    "SELECT o.id, o.seq, o.payload, r.outcome FROM outbox o \
                     JOIN effect_run_responses r ON r.run_key = o.run_key AND r.seq = o.seq \
                     WHERE o.run_key = ?1 AND o.kind = 'request' ORDER BY o.seq",
                )
                .ctx(OP)?;
            let rows = stmt
                .query_map([&key], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .ctx(OP)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .ctx(OP)?;
            rows.into_iter()
                .map(|(id, seq, payload, outcome)| {
                    let what = format!("recorded response of `{id}`");
                    Ok(RecordedRequest {
                        seq: to_u32(seq, &what, "seq")?,
                        request: serde_json::from_str(&payload)
                            .map_err(|e| corrupt(what.clone(), format!("request: {e}")))?,
                        outcome: serde_json::from_str(&outcome)
                            .map_err(|e| corrupt(what.clone(), format!("outcome: {e}")))?,
                        id,
                    })
                })
                .collect()
        })
    }

    fn finish_requests(
        &self,
        key: &str,
        after_requests: Vec<NewOutboxRow>,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Finish, StoreError>> + Send {
        let key = key.to_owned();
        let db = Arc::clone(&self.db);
        let fut = self.db.write_at("finishing requests", move |tx, now| {
            finish_requests_tx(tx, &key, &after_requests, &options, now)
        });
        async move {
            let finish = fut.await?;
            if matches!(finish, Finish::Finished { published_inline, .. } if published_inline > 0) {
                db.appended.notify_waiters();
            }
            Ok(finish)
        }
    }

    fn mark_dispatched(
        &self,
        id: &str,
        lease: &Lease,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let marked = self.mark_dispatched_many(vec![(id.to_owned(), lease.clone())]);
        async move { Ok(marked.await?.first().copied().unwrap_or(false)) }
    }

    fn mark_dispatched_many(
        &self,
        rows: Vec<(String, Lease)>,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send {
        self.db.write_at("marking rows dispatched", move |tx, now| {
            const OP: &str = "marking rows dispatched";
            let mut marked = Vec::with_capacity(rows.len());
            let mut keys = std::collections::BTreeSet::new();
            for (id, lease) in &rows {
                let key: Option<String> = tx
                    .prepare_cached(
                        "UPDATE outbox SET dispatched_at_ms = ?2, lease_owner = NULL, \
                         lease_until_ms = NULL, lease_token = NULL, last_error = NULL \
                         WHERE id = ?1 AND dispatched_at_ms IS NULL AND lease_token = ?3 \
                         AND lease_owner = ?4 RETURNING run_key",
                    )
                    .ctx(OP)?
                    .query_row(params![id, now, lease.token, lease.owner], |r| r.get(0))
                    .optional()
                    .ctx(OP)?;
                marked.push(key.is_some());
                keys.extend(key);
            }
            for key in &keys {
                complete_if_done(tx, key, now)?;
            }
            Ok(marked)
        })
    }

    fn dead_letter(
        &self,
        id: &str,
        reason: &str,
        lease: Option<&Lease>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let id = id.to_owned();
        let reason = reason.to_owned();
        let lease = lease.cloned();
        self.db.write_at("dead-lettering a row", move |tx, now| {
            const OP: &str = "dead-lettering a row";
            let (token, owner) = lease.map_or((None, None), |l| (Some(l.token), Some(l.owner)));
            let key: Option<String> = tx
                .prepare_cached(
                    "UPDATE outbox SET dead_lettered_reason = ?2, lease_owner = NULL, \
                     lease_until_ms = NULL, lease_token = NULL WHERE id = ?1 \
                     AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL \
                     AND ((?3 IS NULL AND (lease_until_ms IS NULL OR lease_until_ms <= ?5)) \
                          OR (lease_token = ?3 AND lease_owner = ?4)) \
                     RETURNING run_key",
                )
                .ctx(OP)?
                .query_row(params![id, reason, token, owner, now], |r| r.get(0))
                .optional()
                .ctx(OP)?;
            let Some(key) = key else {
                return Ok(false);
            };
            tx.prepare_cached("UPDATE effect_runs SET updated_at_ms = ?2 WHERE key = ?1")
                .ctx(OP)?
                .execute(params![key, now])
                .ctx(OP)?;
            complete_if_done(tx, &key, now)?;
            Ok(true)
        })
    }

    fn retry_later(
        &self,
        id: &str,
        lease: &Lease,
        error: &str,
        delay: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let (id, error) = (id.to_owned(), error.to_owned());
        let lease = lease.clone();
        self.db.write_at("scheduling a retry", move |tx, now| {
            let next = now.saturating_add(millis(delay));
            let changed = tx
                .prepare_cached(
                    "UPDATE outbox SET last_error = ?3, next_attempt_at_ms = ?4, lease_owner = NULL, \
                     lease_until_ms = NULL, lease_token = NULL \
                     WHERE id = ?1 AND lease_token = ?2 AND lease_owner = ?5",
                )
                .ctx("scheduling a retry")?
                .execute(params![id, lease.token, error, next, lease.owner])
                .ctx("scheduling a retry")?;
            Ok(changed > 0)
        })
    }

    fn renew(
        &self,
        ids: Vec<String>,
        lease: &Lease,
        duration: Duration,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        let lease = lease.clone();
        self.db.write_at("renewing leases", move |tx, now| {
            const OP: &str = "renewing leases";
            let until = now.saturating_add(millis(duration));
            let mut held = Vec::with_capacity(ids.len());
            for id in ids {
                let renewed = tx
                    .prepare_cached(
                        "UPDATE outbox SET lease_until_ms = ?3 WHERE id = ?1 AND lease_token = ?2 \
                         AND lease_owner = ?4 AND dispatched_at_ms IS NULL \
                         AND dead_lettered_reason IS NULL",
                    )
                    .ctx(OP)?
                    .execute(params![id, lease.token, until, lease.owner])
                    .ctx(OP)?;
                if renewed > 0 {
                    held.push(id);
                }
            }
            Ok(held)
        })
    }

    fn release(
        &self,
        ids: Vec<String>,
        owner: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let owner = owner.to_owned();
        self.db.write("releasing leases", move |tx| {
            const OP: &str = "releasing leases";
            if ids.is_empty() {
                return Ok(tx
                    .prepare_cached(
                        "UPDATE outbox SET lease_owner = NULL, lease_until_ms = NULL, \
                         lease_token = NULL WHERE lease_owner = ?1",
                    )
                    .ctx(OP)?
                    .execute([&owner])
                    .ctx(OP)? as u64);
            }
            let mut released = 0;
            for id in &ids {
                released += tx
                    .prepare_cached(
                        "UPDATE outbox SET lease_owner = NULL, lease_until_ms = NULL, \
                         lease_token = NULL, attempts = MAX(attempts - 1, 0) \
                         WHERE id = ?1 AND lease_owner = ?2",
                    )
                    .ctx(OP)?
                    .execute(params![id, owner])
                    .ctx(OP)? as u64;
            }
            Ok(released)
        })
    }

    fn register_owner(&self, owner: &str) -> impl Future<Output = Result<(), StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let owner = owner.to_owned();
        async move {
            if !db.liveness.enabled() || db.liveness.key_of(&owner).is_some() {
                return Ok(());
            }
            db.blocking(move |db| super::liveness::register(db, &owner))
                .await
        }
    }

    fn reap_dead_owners(&self) -> impl Future<Output = Result<Reaped, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            if !db.liveness.enabled() {
                return Ok(Reaped::default());
            }
            db.blocking(super::liveness::reap).await
        }
    }

    fn report_blocked(
        &self,
        owner: &str,
        consumer: &str,
        topic: &str,
        blocked: Vec<BlockedInput>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let (owner, consumer, topic) = (owner.to_owned(), consumer.to_owned(), topic.to_owned());
        let rows = BlockedRow::of(blocked);
        let db = Arc::clone(&self.db);
        async move {
            // A report lives as long as its owner: registered, it goes when the owner is reaped.
            if !rows.is_empty() && db.liveness.enabled() && db.liveness.key_of(&owner).is_none() {
                let owner = owner.clone();
                Arc::clone(&db)
                    .blocking(move |db| super::liveness::register(db, &owner))
                    .await?;
            }
            db.write_at("reporting blocked inputs", move |tx, now| {
                super::blocked::report_tx(tx, &owner, &consumer, &topic, &rows, now)
            })
            .await
        }
    }

    fn outbox(&self, key: &str) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send {
        let key = key.to_owned();
        self.db.read("reading the outbox", move |conn| {
            Ok(load_outbox_where(
                conn,
                "reading the outbox",
                "run_key = ?1 ORDER BY seq",
                [&key],
            )?
            .into_iter()
            .map(|r| r.row)
            .collect())
        })
    }

    fn entity(
        &self,
        lookup: &LookupRef,
        as_of: Option<Tx>,
    ) -> impl Future<Output = Result<Option<Entity>, StoreError>> + Send {
        let lookup = lookup.clone();
        self.db.read("reading an entity", move |conn| {
            entity_tx(conn, &lookup, as_of)
        })
    }

    fn latest_tx(&self) -> impl Future<Output = Result<Option<Tx>, StoreError>> + Send {
        self.db.read("reading the latest tx", |conn| {
            let tx: Option<i64> = conn
                .prepare_cached("SELECT MAX(tx) FROM transactions")
                .ctx("reading the latest tx")?
                .query_row([], |r| r.get(0))
                .ctx("reading the latest tx")?;
            Ok(tx.map(Tx))
        })
    }

    fn prune(
        &self,
        older_than: PruneOlderThan,
    ) -> impl Future<Output = Result<PruneReport, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            // The cutoffs come from the store's clock (never this process's wall clock alone:
            // see `clock.rs`), once, so that a chunk loop cannot drift.
            let now = db.read_at("pruning", |_, now| Ok(now)).await?;
            let cutoff = |age: Option<Duration>| age.map(|a| now.saturating_sub(millis(a)));
            let before = PruneBefore {
                outbox_dispatched: cutoff(older_than.outbox_dispatched),
                runs_completed: cutoff(older_than.runs_completed),
                log_published: cutoff(older_than.log_published),
            };
            let mut total = PruneReport::default();
            // Chunks keep each write transaction short; a chunk that removes nothing ends it.
            for _ in 0..10_000 {
                let chunk = db
                    .write("pruning", move |tx| prune_chunk(tx, &before))
                    .await?;
                total.outbox_rows += chunk.outbox_rows;
                total.runs += chunk.runs;
                total.log_messages += chunk.log_messages;
                if chunk == PruneReport::default() {
                    break;
                }
            }
            Ok(total)
        }
    }
}
