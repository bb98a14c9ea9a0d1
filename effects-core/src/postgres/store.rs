//! The PostgreSQL store: datoms, effect runs and the outbox.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Transaction;
use serde_json::Value;
use tokio_postgres::Row;

use super::db::{
    Db, Isolation, PostgresOptions, db_error, execute, prepare_all, query, query_one, query_opt,
};
use crate::datom::{LookupRef, Op};
use crate::store::{
    Backlog, BlockedInput, BlockedRow, ClaimOptions, Claimed, Commit, Entity, Finish, HistoryDatom,
    Lease, Millis, NewOutboxRow, NewRun, OutboxKind, OutboxRow, PruneOlderThan, PruneReport,
    Reaped, RecordedRequest, RequestOutcome, RunRecord, RunStatus, Store, StoreError, Tx,
};

/// The store on PostgreSQL: see the [module documentation](super) for its concurrency, locking
/// and options.
///
/// ```no_run
/// use effects_core::Executor;
/// use effects_core::postgres::{PostgresOptions, PostgresStore};
/// use effects_core::transport::SqliteLog;
///
/// # async fn start() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PostgresStore::connect(
///     PostgresOptions::new("postgres://effects@db.internal:5432/effects").with_schema("cards"),
/// )
/// .await?;
/// let broker = SqliteLog::open("broker.db")?;
/// let executor = Executor::builder(store, broker).build();
/// # let _ = executor;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pub(super) db: Arc<Db>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("location", &self.db.location)
            .finish_non_exhaustive()
    }
}

pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        reason: reason.into(),
    }
}

pub(crate) fn get<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r Row,
    index: usize,
    what: &dyn Fn() -> String,
) -> Result<T, StoreError> {
    row.try_get(index)
        .map_err(|e| corrupt(what(), format!("column {index}: {e}")))
}

pub(crate) fn to_u32(v: i64, what: &str, column: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| corrupt(what, format!("`{column}` is {v}")))
}

pub(crate) fn millis(d: Duration) -> Millis {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn headers_json(headers: &BTreeMap<String, String>) -> String {
    // A map of strings always serializes.
    serde_json::to_string(headers).unwrap_or_else(|_| "{}".to_owned())
}

impl PostgresStore {
    /// Connects (a pool of `options.pool_size` connections), creates the schema if needed and
    /// applies pending migrations.
    pub async fn connect(options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        Ok(PostgresStore {
            db: Arc::new(Db::connect(&options).await?),
        })
    }

    /// The server, database and schema, without a password.
    pub fn location(&self) -> &str {
        &self.db.location
    }

    /// The schema the store's tables live in.
    pub fn schema(&self) -> &str {
        &self.db.schema
    }

    /// What is left to do: for health checks, and to wait until the workers have caught up.
    pub fn backlog(&self) -> impl Future<Output = Result<Backlog, StoreError>> + Send + 'static {
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("measuring the backlog", Isolation::Snapshot, |tx| {
                Box::pin(async move {
                    const OP: &str = "measuring the backlog";
                    let row = query_one(
                        tx,
                        OP,
                        "SELECT \
                         (SELECT COUNT(*) FROM outbox WHERE dispatched_at_ms IS NULL \
                          AND dead_lettered_reason IS NULL), \
                         (SELECT COUNT(*) FROM outbox WHERE dead_lettered_reason IS NOT NULL), \
                         (SELECT COUNT(*) FROM effect_runs WHERE status <> 'done')",
                        &[],
                    )
                    .await?;
                    let what = || "the backlog".to_owned();
                    let n = |i| -> Result<u64, StoreError> {
                        Ok(u64::try_from(get::<i64>(&row, i, &what)?).unwrap_or(0))
                    };
                    Ok(Backlog {
                        pending_rows: n(0)?,
                        dead_lettered_rows: n(1)?,
                        open_runs: n(2)?,
                    })
                })
            })
            .await
        }
    }

    /// The migrations recorded in the schema: `(version, file name)`.
    pub fn schema_versions(
        &self,
    ) -> impl Future<Output = Result<Vec<(i64, String)>, StoreError>> + Send + 'static {
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("reading schema versions", Isolation::Snapshot, |tx| {
                Box::pin(async move {
                    let what = || "schema_version".to_owned();
                    query(
                        tx,
                        "reading schema versions",
                        "SELECT version, name FROM schema_version ORDER BY version",
                        &[],
                    )
                    .await?
                    .iter()
                    .map(|r| Ok((get(r, 0, &what)?, get(r, 1, &what)?)))
                    .collect()
                })
            })
            .await
        }
    }

    /// The datom history of every transaction after `after` (all of it with `None`), in the
    /// order it was written: by transaction, then as each run applied it. For inspection,
    /// audits and tests; it reads everything asked for at once.
    pub fn history(
        &self,
        after: Option<Tx>,
    ) -> impl Future<Output = Result<Vec<HistoryDatom>, StoreError>> + Send + 'static {
        let after = after.map_or(0, |t| t.0);
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("reading the datom history", Isolation::Snapshot, |tx| {
                Box::pin(async move {
                    let rows = query(
                        tx,
                        "reading the datom history",
                        "SELECT d.tx, t.run_key, e.identity, e.identity_value, d.attribute, \
                         d.value, d.added FROM datoms d JOIN entities e ON e.id = d.entity_id \
                         JOIN transactions t ON t.tx = d.tx WHERE d.tx > $1 ORDER BY d.tx, d.id",
                        &[&after],
                    )
                    .await?;
                    rows.iter()
                        .map(|r| {
                            let what = || "a datom of the history".to_owned();
                            let tx: i64 = get(r, 0, &what)?;
                            let identity: String = get(r, 2, &what)?;
                            let parse = |text: &str, column: &str| -> Result<Value, StoreError> {
                                serde_json::from_str(text).map_err(|e| {
                                    corrupt(
                                        format!("datom of tx {tx} on `{identity}`"),
                                        format!("{column}: {e}"),
                                    )
                                })
                            };
                            let identity_value: String = get(r, 3, &what)?;
                            let value: String = get(r, 5, &what)?;
                            let added: bool = get(r, 6, &what)?;
                            Ok(HistoryDatom {
                                tx: Tx(tx),
                                run_key: get(r, 1, &what)?,
                                entity: LookupRef::new(
                                    identity.as_str(),
                                    parse(&identity_value, "identity value")?,
                                ),
                                attribute: get(r, 4, &what)?,
                                value: parse(&value, "value")?,
                                op: if added { Op::Assert } else { Op::Retract },
                            })
                        })
                        .collect()
                })
            })
            .await
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row decoding.

pub(crate) const OUTBOX_COLUMNS: &str = "id, run_key, seq, kind, destination, partition_key, headers, payload, \
     tx, attempts, next_attempt_at_ms, last_error, dispatched_at_ms, dead_lettered_reason, ready_seq, \
     lease_owner, lease_until_ms, lease_token";

/// How many rows must go before a claim candidate: the run's earlier pending requests (for a
/// request), or the earlier pending messages of its topic and partition key (for a keyed
/// message); 0 for a message without a key. Read with the candidates, in one statement.
const EARLIER: &str = "CASE \
     WHEN kind = 'request' THEN (SELECT COUNT(*) FROM outbox e WHERE e.run_key = outbox.run_key \
        AND e.kind = 'request' AND e.seq < outbox.seq AND e.dispatched_at_ms IS NULL \
        AND e.dead_lettered_reason IS NULL) \
     WHEN partition_key IS NOT NULL THEN (SELECT COUNT(*) FROM outbox e \
        WHERE e.kind = 'message' AND e.destination = outbox.destination \
        AND e.partition_key = outbox.partition_key AND e.dispatched_at_ms IS NULL \
        AND e.dead_lettered_reason IS NULL AND e.ready_seq < outbox.ready_seq) \
     ELSE 0 END";
/// The column of [`EARLIER`] after [`OUTBOX_COLUMNS`].
const EARLIER_COLUMN: usize = 18;

pub(crate) fn decode_outbox(r: &Row) -> Result<OutboxRow, StoreError> {
    let id: String = get(r, 0, &|| "an outbox row".to_owned())?;
    let what = format!("outbox row `{id}`");
    let w = || what.clone();
    let kind: String = get(r, 3, &w)?;
    let kind = match kind.as_str() {
        "request" => OutboxKind::Request,
        "message" => OutboxKind::Message,
        other => return Err(corrupt(what, format!("kind `{other}`"))),
    };
    let headers: String = get(r, 6, &w)?;
    let lease_owner: Option<String> = get(r, 15, &w)?;
    let lease_token: Option<i64> = get(r, 17, &w)?;
    Ok(OutboxRow {
        run_key: get(r, 1, &w)?,
        seq: to_u32(get(r, 2, &w)?, &what, "seq")?,
        kind,
        destination: get(r, 4, &w)?,
        partition_key: get(r, 5, &w)?,
        headers: serde_json::from_str(&headers)
            .map_err(|e| corrupt(what.clone(), format!("headers: {e}")))?,
        payload: get(r, 7, &w)?,
        tx: Tx(get(r, 8, &w)?),
        attempts: to_u32(get(r, 9, &w)?, &what, "attempts")?,
        next_attempt_at: get(r, 10, &w)?,
        last_error: get(r, 11, &w)?,
        dispatched_at: get(r, 12, &w)?,
        dead_lettered: get(r, 13, &w)?,
        lease: lease_owner
            .zip(lease_token)
            .map(|(owner, token)| Lease { owner, token }),
        lease_until: get(r, 16, &w)?,
        id,
    })
}

pub(crate) const RUN_COLUMNS: &str = "key, effects_sha256, tx, status, after_requests, outbox_count, \
     created_at_ms, updated_at_ms, completed_at_ms";

pub(crate) fn decode_run(r: &Row) -> Result<RunRecord, StoreError> {
    let key: String = get(r, 0, &|| "an effect run".to_owned())?;
    let what = format!("effect run `{key}`");
    let w = || what.clone();
    let status: String = get(r, 3, &w)?;
    Ok(RunRecord {
        status: RunStatus::parse(&status)
            .ok_or_else(|| corrupt(what.clone(), format!("status `{status}`")))?,
        effects_sha256: get(r, 1, &w)?,
        tx: Tx(get(r, 2, &w)?),
        after_requests: get(r, 4, &w)?,
        outbox_count: to_u32(get(r, 5, &w)?, &what, "outbox_count")?,
        created_at: get(r, 6, &w)?,
        updated_at: get(r, 7, &w)?,
        completed_at: get(r, 8, &w)?,
        key,
    })
}

pub(crate) async fn load_run(
    tx: &Transaction<'_>,
    key: &str,
) -> Result<Option<RunRecord>, StoreError> {
    query_opt(
        tx,
        "reading an effect run",
        &format!("SELECT {RUN_COLUMNS} FROM effect_runs WHERE key = $1"),
        &[&key],
    )
    .await?
    .as_ref()
    .map(decode_run)
    .transpose()
}

pub(crate) async fn now(tx: &Transaction<'_>) -> Result<Millis, StoreError> {
    let row = query_one(tx, "reading the clock", "SELECT effects_now_ms()", &[]).await?;
    get(&row, 0, &|| "the clock".to_owned())
}

// ---------------------------------------------------------------------------------------------
// Counters, the outbox and runs' rows.

/// Allocates `$1` values of the counter row named `$2`; returns the last.
pub(super) const COUNTER_SQL: &str =
    "UPDATE sequences SET value = value + $1 WHERE name = $2 RETURNING value";

/// Allocates `count` values of a counter row; returns the first. The row stays locked until
/// the transaction ends, so values are handed out in commit order.
pub(crate) async fn next_counter(
    tx: &Transaction<'_>,
    name: &str,
    count: usize,
) -> Result<i64, StoreError> {
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    let row = query_one(tx, "allocating a sequence", COUNTER_SQL, &[&count, &name]).await?;
    let last: i64 = get(&row, 0, &|| format!("sequence `{name}`"))?;
    Ok(last - count + 1)
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn insert_outbox(
    tx: &Transaction<'_>,
    key: &str,
    txid: i64,
    row: &NewOutboxRow,
    ready_seq: Option<i64>,
    now: Millis,
) -> Result<(), StoreError> {
    execute(
        tx,
        "writing the outbox",
        "INSERT INTO outbox (id, run_key, seq, kind, destination, partition_key, headers, \
         payload, tx, ready_seq, next_attempt_at_ms, created_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11)",
        &[
            &crate::store::outbox_id(key, row.seq),
            &key,
            &i64::from(row.seq),
            &row.kind.as_str(),
            &row.destination,
            &row.partition_key,
            &headers_json(&row.headers),
            &row.payload,
            &txid,
            &ready_seq,
            &now,
        ],
    )
    .await
    .map(|_| ())
}

/// Marks the run done if it has no pending row left. The caller holds the run's row lock (see
/// [`lock_run`]), so two transactions resolving its last two rows cannot both miss each other.
async fn complete_if_done(tx: &Transaction<'_>, key: &str, now: Millis) -> Result<(), StoreError> {
    execute(
        tx,
        "completing a run",
        "UPDATE effect_runs SET status = 'done', completed_at_ms = $2, updated_at_ms = $2 \
         WHERE key = $1 AND status = 'messages_pending' AND NOT EXISTS (SELECT 1 FROM outbox \
         WHERE run_key = $1 AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL)",
        &[&key, &now],
    )
    .await
    .map(|_| ())
}

/// Locks the run's row until the transaction ends: every change of a run's status, and every
/// resolution of one of its rows, takes it, so they happen one after the other.
pub(crate) async fn lock_run(
    tx: &Transaction<'_>,
    key: &str,
) -> Result<Option<RunRecord>, StoreError> {
    query_opt(
        tx,
        "locking an effect run",
        &format!("SELECT {RUN_COLUMNS} FROM effect_runs WHERE key = $1 FOR UPDATE"),
        &[&key],
    )
    .await?
    .as_ref()
    .map(decode_run)
    .transpose()
}

/// Commits runs (see [`Store::commit_runs`]): one run with its own statements
/// ([`single`](super::single)), several set-based ([`commit`](super::commit)); then the applied
/// runs' ready rows claimed together, in ready order, each run's handed back with its commit.
async fn commit_runs_tx(
    tx: &Transaction<'_>,
    runs: &[NewRun],
    options: &ClaimOptions,
) -> Result<Vec<Commit>, StoreError> {
    let (mut out, now) = if runs.len() == 1 {
        super::single::commit_runs_tx(tx, runs).await?
    } else {
        super::commit::commit_runs_tx(tx, runs).await?
    };
    let applied: Vec<&str> = runs
        .iter()
        .zip(&out)
        .filter(|(run, commit)| matches!(commit, Commit::Applied { .. }) && !run.outbox.is_empty())
        .map(|(run, _)| run.key.as_str())
        .collect();
    if !applied.is_empty() {
        let mut by_run: HashMap<String, Vec<OutboxRow>> = HashMap::new();
        for row in claim_written(tx, &applied, options, now).await? {
            by_run.entry(row.run_key.clone()).or_default().push(row);
        }
        for (run, commit) in runs.iter().zip(out.iter_mut()) {
            if let Commit::Applied { claimed, .. } = commit {
                *claimed = by_run.remove(&run.key).unwrap_or_default();
            }
        }
    }
    if let Some(hook) = &options.before_commit {
        hook();
    }
    Ok(out)
}

/// The condition of an outbox row a claim may take at the time in parameter `now`: pending,
/// ready, due and not leased.
fn due(now: &str) -> String {
    format!(
        "dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL AND ready_seq IS NOT NULL \
         AND next_attempt_at_ms <= {now} AND (lease_until_ms IS NULL OR lease_until_ms <= {now})"
    )
}

/// Claims the ready rows of runs this very transaction committed, in ready order, in one
/// statement. They follow the rules of [`claim`], which for rows no other transaction can see
/// yet (due, unleased, a run's requests all its own and ready in order) come down to one: a
/// message with a partition key waits while an earlier message of its topic and partition key
/// from a run not committed here is pending. A row that waits blocks the later ones of its
/// partition, whose earlier pending row is the same. There is nothing to lock first: no other
/// transaction can take these rows.
async fn claim_written(
    tx: &Transaction<'_>,
    run_keys: &[&str],
    options: &ClaimOptions,
    now: Millis,
) -> Result<Vec<OutboxRow>, StoreError> {
    const OP: &str = "claiming outbox rows";
    let lease_ms = millis(options.lease);
    let rows = query(
        tx,
        OP,
        &format!(
            "WITH claim AS (SELECT nextval('lease_token') AS token) \
             UPDATE outbox SET lease_owner = $2, lease_until_ms = effects_now_ms() + $3, \
             lease_token = claim.token, attempts = attempts + 1 FROM claim \
             WHERE run_key = ANY($1) AND {due} AND NOT (kind = 'message' AND partition_key IS NOT NULL AND EXISTS (SELECT 1 \
                 FROM outbox e WHERE e.kind = 'message' AND e.destination = outbox.destination \
                 AND e.partition_key = outbox.partition_key AND e.dispatched_at_ms IS NULL \
                 AND e.dead_lettered_reason IS NULL AND e.ready_seq < outbox.ready_seq \
                 AND e.run_key <> ALL($1))) \
             RETURNING {OUTBOX_COLUMNS}",
            due = due("$4"),
        ),
        &[&run_keys, &options.owner, &lease_ms, &now],
    )
    .await?;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in &rows {
        let ready: Option<i64> = get(row, 14, &|| "a claimed row".to_owned())?;
        claimed.push((ready, decode_outbox(row)?));
    }
    claimed.sort_by_key(|(ready, _)| *ready);
    Ok(claimed.into_iter().map(|(_, row)| row).collect())
}

/// Claims pending, ready, due, unleased rows (of some runs, or of all), in ready order, following
/// the ordering rules of [`Store::claim_due`].
///
/// Candidates are chosen from the committed state without locks, then only the chosen rows are
/// locked, `FOR UPDATE SKIP LOCKED` and still due: rows another claimant is taking right now
/// are passed over, never waited for, and no row is held that is not claimed, so concurrent
/// relays share the work instead of one locking every candidate. A chosen row that could not be
/// locked blocks the rows of its run (requests) or partition (messages) behind it, which keeps
/// the ordering rules; the next candidates are tried instead, for a few rounds.
async fn claim(
    tx: &Transaction<'_>,
    run_keys: Option<&[&str]>,
    limit: usize,
    options: &ClaimOptions,
    now: Millis,
) -> Result<Vec<OutboxRow>, StoreError> {
    const OP: &str = "claiming outbox rows";
    const ROUNDS: usize = 4;
    let scan = i64::try_from(limit.saturating_mul(4).saturating_add(64)).unwrap_or(i64::MAX);
    let due = due("$1");
    let mut claimed: Vec<OutboxRow> = Vec::new();
    // Rows claimed in an earlier round, or that another claimant holds.
    let mut passed: Vec<String> = Vec::new();
    let mut requests_taken: HashMap<String, i64> = HashMap::new();
    let mut blocked_runs: HashSet<String> = HashSet::new();
    let mut partition_taken: HashMap<(String, String), i64> = HashMap::new();
    let mut blocked_partitions: HashSet<(String, String)> = HashSet::new();
    for _ in 0..ROUNDS {
        let candidates = match run_keys {
            Some(keys) => {
                query(
                    tx,
                    OP,
                    &format!(
                        "SELECT {OUTBOX_COLUMNS}, {EARLIER} FROM outbox WHERE {due} \
                         AND run_key = ANY($2) AND id <> ALL($4) ORDER BY ready_seq LIMIT $3"
                    ),
                    &[&now, &keys, &scan, &passed],
                )
                .await?
            }
            None => {
                query(
                    tx,
                    OP,
                    &format!(
                        "SELECT {OUTBOX_COLUMNS}, {EARLIER} FROM outbox WHERE {due} \
                         AND id <> ALL($3) ORDER BY ready_seq LIMIT $2"
                    ),
                    &[&now, &scan, &passed],
                )
                .await?
            }
        };
        let mut chosen: Vec<OutboxRow> = Vec::new();
        for candidate in &candidates {
            if claimed.len() + chosen.len() >= limit {
                break;
            }
            let row = decode_outbox(candidate)?;
            let earlier: i64 = get(candidate, EARLIER_COLUMN, &|| {
                format!("outbox row `{}`", row.id)
            })?;
            match row.kind {
                OutboxKind::Request => {
                    if blocked_runs.contains(&row.run_key) {
                        continue;
                    }
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
                        let taken = partition_taken.entry(slot.clone()).or_insert(0);
                        if earlier != *taken {
                            blocked_partitions.insert(slot);
                            continue;
                        }
                        *taken += 1;
                    }
                }
            }
            chosen.push(row);
        }
        if chosen.is_empty() {
            break;
        }

        // Lock the chosen rows that nobody else is taking and that are still due, as they are
        // now.
        let ids: Vec<&str> = chosen.iter().map(|r| r.id.as_str()).collect();
        let mut locked: HashMap<String, OutboxRow> = HashMap::new();
        for row in query(
            tx,
            OP,
            &format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = ANY($2) AND {due} \
                 FOR UPDATE SKIP LOCKED"
            ),
            &[&now, &ids],
        )
        .await?
        {
            let row = decode_outbox(&row)?;
            locked.insert(row.id.clone(), row);
        }
        // Groups (a run's requests, a partition's messages) in which a chosen row was taken by
        // another claimant: nothing behind it may go.
        let mut missed_runs: HashSet<String> = HashSet::new();
        let mut missed_partitions: HashSet<(String, String)> = HashSet::new();
        let mut missed = false;
        for row in chosen {
            let run = (row.kind == OutboxKind::Request).then(|| row.run_key.clone());
            let partition = match (row.kind, &row.partition_key) {
                (OutboxKind::Message, Some(pk)) => Some((row.destination.clone(), pk.clone())),
                _ => None,
            };
            passed.push(row.id.clone());
            if run.as_ref().is_some_and(|r| missed_runs.contains(r))
                || partition
                    .as_ref()
                    .is_some_and(|p| missed_partitions.contains(p))
            {
                continue;
            }
            match locked.remove(&row.id) {
                Some(fresh) => claimed.push(fresh),
                None => {
                    missed = true;
                    missed_runs.extend(run);
                    missed_partitions.extend(partition);
                }
            }
        }
        blocked_runs.extend(missed_runs);
        blocked_partitions.extend(missed_partitions);
        if !missed || claimed.len() >= limit {
            break;
        }
    }
    if claimed.is_empty() {
        return Ok(claimed);
    }
    // One new token for the whole claim. The lease runs from this statement (the server's clock
    // now), not from the start of a transaction that may have waited for locks.
    let ids: Vec<&str> = claimed.iter().map(|r| r.id.as_str()).collect();
    let lease_ms = millis(options.lease);
    let mut token = None;
    let mut until: HashMap<String, Millis> = HashMap::new();
    for r in query(
        tx,
        OP,
        "WITH claim AS (SELECT nextval('lease_token') AS token) \
         UPDATE outbox SET lease_owner = $2, lease_until_ms = effects_now_ms() + $3, \
         lease_token = claim.token, attempts = attempts + 1 FROM claim WHERE id = ANY($1) \
         RETURNING id, lease_until_ms, lease_token",
        &[&ids, &options.owner, &lease_ms],
    )
    .await?
    {
        let what = || "a claimed row".to_owned();
        until.insert(get(&r, 0, &what)?, get(&r, 1, &what)?);
        token = Some(get::<i64>(&r, 2, &what)?);
    }
    let lease = Lease {
        owner: options.owner.clone(),
        token: token.ok_or_else(|| corrupt("claimed rows", "locked, then not updated"))?,
    };
    for row in &mut claimed {
        row.attempts += 1;
        row.lease = Some(lease.clone());
        row.lease_until = until.get(&row.id).copied();
    }
    Ok(claimed)
}

async fn finish_requests_tx(
    tx: &Transaction<'_>,
    key: &str,
    after: &[NewOutboxRow],
    options: &ClaimOptions,
) -> Result<Finish, StoreError> {
    const OP: &str = "finishing requests";
    let Some(run) = lock_run(tx, key).await? else {
        return Ok(Finish::AlreadyFinished);
    };
    if run.status != RunStatus::RequestsPending {
        return Ok(Finish::AlreadyFinished);
    }
    let unresolved = query_one(
        tx,
        OP,
        "SELECT COUNT(*) FROM outbox WHERE run_key = $1 AND kind = 'request' \
         AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL",
        &[&key],
    )
    .await?;
    if get::<i64>(&unresolved, 0, &|| "a count".to_owned())? > 0 {
        return Ok(Finish::NotReady);
    }
    let now = now(tx).await?;
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
        insert_outbox(tx, key, run.tx.0, row, None, now).await?;
    }
    let waiting: Vec<String> = query(
        tx,
        OP,
        "SELECT id FROM outbox WHERE run_key = $1 AND kind = 'message' \
         AND ready_seq IS NULL AND dispatched_at_ms IS NULL \
         AND dead_lettered_reason IS NULL ORDER BY seq",
        &[&key],
    )
    .await?
    .iter()
    .map(|r| get(r, 0, &|| format!("outbox of `{key}`")))
    .collect::<Result<_, _>>()?;
    if !waiting.is_empty() {
        let first = next_counter(tx, "outbox_ready", waiting.len()).await?;
        for (ready, id) in (first..).zip(&waiting) {
            execute(
                tx,
                OP,
                "UPDATE outbox SET ready_seq = $2 WHERE id = $1",
                &[id, &ready],
            )
            .await?;
        }
    }
    let count = i64::from(
        run.outbox_count
            .saturating_add(u32::try_from(after.len()).unwrap_or(u32::MAX)),
    );
    execute(
        tx,
        OP,
        "UPDATE effect_runs SET status = 'messages_pending', outbox_count = $2, \
         updated_at_ms = $3 WHERE key = $1",
        &[&key, &count, &now],
    )
    .await?;
    complete_if_done(tx, key, now).await?;
    let claimed = claim(tx, Some(&[key]), usize::MAX, options, now).await?;
    let status = load_run(tx, key)
        .await?
        .map_or(RunStatus::MessagesPending, |r| r.status);
    Ok(Finish::Finished {
        status,
        claimed,
        published_inline: 0,
    })
}

async fn record_request_tx(
    tx: &Transaction<'_>,
    id: &str,
    outcome: &RequestOutcome,
    lease: &Lease,
    recorder: Option<i64>,
) -> Result<bool, StoreError> {
    const OP: &str = "recording a response";
    let row = query_opt(
        tx,
        OP,
        &format!("SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = $1 FOR UPDATE"),
        &[&id],
    )
    .await?;
    let Some(row) = row else {
        return Err(corrupt(
            format!("outbox row `{id}`"),
            "a response was recorded for a row that does not exist",
        ));
    };
    let row = decode_outbox(&row)?;
    if row.kind != OutboxKind::Request {
        return Err(corrupt(
            format!("outbox row `{id}`"),
            "a response was recorded for a message",
        ));
    }
    if row.lease.as_ref() != Some(lease) {
        return Ok(false);
    }
    let now = now(tx).await?;
    let outcome_json = serde_json::to_string(outcome)
        .map_err(|e| corrupt(format!("outbox row `{id}`"), e.to_string()))?;
    let inserted = execute(
        tx,
        OP,
        "INSERT INTO effect_run_responses (run_key, seq, outcome, recorded_at_ms) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (run_key, seq) DO NOTHING",
        &[&row.run_key, &i64::from(row.seq), &outcome_json, &now],
    )
    .await?;
    if inserted == 0 || !row.is_pending() {
        return Ok(true);
    }
    let dead_letter = |reason: String| async move {
        execute(
            tx,
            OP,
            "UPDATE outbox SET dead_lettered_reason = $2, lease_owner = NULL, \
             lease_until_ms = NULL, lease_token = NULL WHERE id = $1",
            &[&id, &reason],
        )
        .await
    };
    match outcome {
        RequestOutcome::Response { .. } => {
            execute(
                tx,
                OP,
                "UPDATE outbox SET dispatched_at_ms = $2, lease_owner = NULL, \
                 lease_until_ms = NULL, lease_token = NULL, last_error = NULL WHERE id = $1",
                &[&id, &now],
            )
            .await?
        }
        RequestOutcome::Rejected { response } => {
            dead_letter(format!("rejected with status {}", response.status)).await?
        }
        RequestOutcome::Failed { reason } => dead_letter(reason.clone()).await?,
    };
    execute(
        tx,
        OP,
        "UPDATE effect_runs SET updated_at_ms = $2, recorded_by = $3 WHERE key = $1",
        &[&row.run_key, &now, &recorder],
    )
    .await?;
    Ok(true)
}

/// An entity's row id, created and updated `tx`, by lookup ref.
pub(crate) async fn find_entity(
    tx: &Transaction<'_>,
    operation: &'static str,
    lookup: &LookupRef,
) -> Result<Option<(i64, i64, i64)>, StoreError> {
    let identity_value = crate::effects::canonical_json(&lookup.value);
    let what = || format!("entity {lookup}");
    let row = query_opt(
        tx,
        operation,
        "SELECT id, created_tx, updated_tx FROM entities \
         WHERE identity = $1 AND identity_value = $2",
        &[&lookup.attribute, &identity_value],
    )
    .await?;
    row.map(|row| {
        Ok((
            get(&row, 0, &what)?,
            get(&row, 1, &what)?,
            get(&row, 2, &what)?,
        ))
    })
    .transpose()
}

async fn entity_tx(
    tx: &Transaction<'_>,
    lookup: &LookupRef,
    as_of: Option<Tx>,
) -> Result<Option<Entity>, StoreError> {
    const OP: &str = "reading an entity";
    let what = || format!("entity {lookup}");
    let Some((id, created, updated)) = find_entity(tx, OP, lookup).await? else {
        return Ok(None);
    };
    let parse = |text: &str| -> Result<Value, StoreError> {
        serde_json::from_str(text).map_err(|e| corrupt(what(), format!("value: {e}")))
    };
    let mut attributes = BTreeMap::new();
    let tx_of_entity = match as_of {
        None => {
            let rows = query(
                tx,
                OP,
                "SELECT attribute, value FROM entity_attributes WHERE entity_id = $1",
                &[&id],
            )
            .await?;
            for r in &rows {
                let name: String = get(r, 0, &what)?;
                let value: String = get(r, 1, &what)?;
                attributes.insert(name, parse(&value)?);
            }
            updated
        }
        Some(Tx(at)) => {
            if created > at {
                return Ok(None);
            }
            let rows = query(
                tx,
                OP,
                "SELECT attribute, value, added, tx FROM datoms \
                 WHERE entity_id = $1 AND tx <= $2 ORDER BY attribute, tx, added",
                &[&id, &at],
            )
            .await?;
            let mut last = created;
            let mut current: BTreeMap<String, Option<String>> = BTreeMap::new();
            for r in &rows {
                let name: String = get(r, 0, &what)?;
                let value: String = get(r, 1, &what)?;
                let added: bool = get(r, 2, &what)?;
                let tx: i64 = get(r, 3, &what)?;
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
        tx: Tx(tx_of_entity),
    }))
}

/// Pruning cutoffs as times of the server's clock.
#[derive(Clone, Copy)]
struct PruneBefore {
    outbox_dispatched: Option<Millis>,
    runs_completed: Option<Millis>,
}

async fn prune_chunk(tx: &Transaction<'_>, before: PruneBefore) -> Result<PruneReport, StoreError> {
    const OP: &str = "pruning";
    const CHUNK: i64 = 5_000;
    let mut report = PruneReport::default();
    if let Some(cutoff) = before.outbox_dispatched {
        report.outbox_rows = execute(
            tx,
            OP,
            "DELETE FROM outbox WHERE id IN (SELECT o.id FROM outbox o \
             JOIN effect_runs r ON r.key = o.run_key WHERE o.dispatched_at_ms IS NOT NULL \
             AND o.dispatched_at_ms < $1 AND r.status = 'done' LIMIT $2)",
            &[&cutoff, &CHUNK],
        )
        .await?;
    }
    if let Some(cutoff) = before.runs_completed {
        let keys: Vec<String> = query(
            tx,
            OP,
            "SELECT key FROM effect_runs r WHERE status = 'done' AND completed_at_ms < $1 \
             AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.run_key = r.key) LIMIT $2",
            &[&cutoff, &CHUNK],
        )
        .await?
        .iter()
        .map(|r| get(r, 0, &|| "a run to prune".to_owned()))
        .collect::<Result<_, _>>()?;
        if !keys.is_empty() {
            execute(
                tx,
                OP,
                "DELETE FROM effect_run_responses WHERE run_key = ANY($1)",
                &[&keys],
            )
            .await?;
            report.runs = execute(
                tx,
                OP,
                "DELETE FROM effect_runs WHERE key = ANY($1) AND status = 'done'",
                &[&keys],
            )
            .await?;
        }
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// The trait.

impl Store for PostgresStore {
    fn commit_runs(
        &self,
        runs: Vec<NewRun>,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Vec<Commit>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let runs = Arc::new(runs);
        let options = Arc::new(options);
        async move {
            db.transaction("committing runs", Isolation::Write, |tx| {
                let (runs, options) = (Arc::clone(&runs), Arc::clone(&options));
                Box::pin(async move { commit_runs_tx(tx, &runs, &options).await })
            })
            .await
        }
    }

    fn run(&self, key: &str) -> impl Future<Output = Result<Option<RunRecord>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let key = key.to_owned();
        async move {
            db.transaction("reading an effect run", Isolation::Snapshot, |tx| {
                let key = key.clone();
                Box::pin(async move { load_run(tx, &key).await })
            })
            .await
        }
    }

    fn runs_by_key(
        &self,
        keys: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Option<RunRecord>>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let mut found = db
                .transaction("reading effect runs", Isolation::Snapshot, |tx| {
                    let keys = keys.clone();
                    Box::pin(async move {
                        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                        super::commit::load_runs(tx, &refs).await
                    })
                })
                .await?;
            Ok(keys.iter().map(|k| found.remove(k)).collect())
        }
    }

    fn claim_run(
        &self,
        key: &str,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let key = key.to_owned();
        let options = Arc::new(options);
        async move {
            db.transaction("claiming a run's outbox rows", Isolation::Write, |tx| {
                let (key, options) = (key.clone(), Arc::clone(&options));
                Box::pin(async move {
                    let now = now(tx).await?;
                    let rows = claim(tx, Some(&[&key]), usize::MAX, &options, now).await?;
                    Ok(Claimed {
                        rows,
                        published_inline: 0,
                    })
                })
            })
            .await
        }
    }

    fn claim_due(
        &self,
        limit: usize,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let options = Arc::new(options);
        async move {
            db.transaction("claiming due outbox rows", Isolation::Write, |tx| {
                let options = Arc::clone(&options);
                Box::pin(async move {
                    let now = now(tx).await?;
                    let rows = claim(tx, None, limit, &options, now).await?;
                    Ok(Claimed {
                        rows,
                        published_inline: 0,
                    })
                })
            })
            .await
        }
    }

    fn stalled_runs(
        &self,
        idle_for: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RunRecord>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let idle = millis(idle_for);
        async move {
            db.transaction("finding stalled runs", Isolation::Snapshot, |tx| {
                Box::pin(async move {
                    query(
                        tx,
                        "finding stalled runs",
                        &format!(
                            "SELECT {RUN_COLUMNS} FROM effect_runs r \
                             WHERE status = 'requests_pending' \
                             AND (updated_at_ms <= effects_now_ms() - $1 \
                                  OR (recorded_by IS NOT NULL AND NOT EXISTS (SELECT 1 \
                                      FROM owners w WHERE w.lock_key = r.recorded_by))) \
                             AND NOT EXISTS (SELECT 1 FROM outbox o \
                             WHERE o.run_key = r.key AND o.kind = 'request' \
                             AND o.dispatched_at_ms IS NULL AND o.dead_lettered_reason IS NULL) \
                             ORDER BY updated_at_ms LIMIT $2"
                        ),
                        &[&idle, &limit],
                    )
                    .await?
                    .iter()
                    .map(decode_run)
                    .collect()
                })
            })
            .await
        }
    }

    fn record_request(
        &self,
        id: &str,
        outcome: RequestOutcome,
        lease: &Lease,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let id = id.to_owned();
        let lease = lease.clone();
        let outcome = Arc::new(outcome);
        // Who records, so that the run is stalled at once if that process dies before the
        // after-requests step.
        let recorder = self.db.liveness.key_of(&lease.owner);
        async move {
            db.transaction("recording a response", Isolation::Write, |tx| {
                let (id, lease, outcome) = (id.clone(), lease.clone(), Arc::clone(&outcome));
                Box::pin(
                    async move { record_request_tx(tx, &id, &outcome, &lease, recorder).await },
                )
            })
            .await
        }
    }

    fn recorded_requests(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Vec<RecordedRequest>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let key = key.to_owned();
        async move {
            db.transaction("reading recorded responses", Isolation::Snapshot, |tx| {
                let key = key.clone();
                Box::pin(async move {
                    let rows = query(
                        tx,
                        "reading recorded responses",
                        "SELECT o.id, o.seq, o.payload, r.outcome FROM outbox o \
                         JOIN effect_run_responses r ON r.run_key = o.run_key AND r.seq = o.seq \
                         WHERE o.run_key = $1 AND o.kind = 'request' ORDER BY o.seq",
                        &[&key],
                    )
                    .await?;
                    rows.iter()
                        .map(|r| {
                            let id: String = get(r, 0, &|| "a recorded response".to_owned())?;
                            let what = format!("recorded response of `{id}`");
                            let w = || what.clone();
                            let payload: String = get(r, 2, &w)?;
                            let outcome: String = get(r, 3, &w)?;
                            Ok(RecordedRequest {
                                seq: to_u32(get(r, 1, &w)?, &what, "seq")?,
                                request: serde_json::from_str(&payload)
                                    .map_err(|e| corrupt(what.clone(), format!("request: {e}")))?,
                                outcome: serde_json::from_str(&outcome)
                                    .map_err(|e| corrupt(what.clone(), format!("outcome: {e}")))?,
                                id,
                            })
                        })
                        .collect()
                })
            })
            .await
        }
    }

    fn finish_requests(
        &self,
        key: &str,
        after_requests: Vec<NewOutboxRow>,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Finish, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let key = key.to_owned();
        let after = Arc::new(after_requests);
        let options = Arc::new(options);
        async move {
            db.transaction("finishing requests", Isolation::Write, |tx| {
                let (key, after, options) = (key.clone(), Arc::clone(&after), Arc::clone(&options));
                Box::pin(async move { finish_requests_tx(tx, &key, &after, &options).await })
            })
            .await
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
        let db = Arc::clone(&self.db);
        async move {
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            db.transaction("marking rows dispatched", Isolation::Write, |tx| {
                let rows = rows.clone();
                Box::pin(async move {
                    const OP: &str = "marking rows dispatched";
                    let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
                    let tokens: Vec<i64> = rows.iter().map(|(_, lease)| lease.token).collect();
                    let owners: Vec<&str> =
                        rows.iter().map(|(_, lease)| lease.owner.as_str()).collect();
                    // Every row still leased to the caller, in one statement; then the runs'
                    // rows in one order (see `lock_run`), each completed if that was its last
                    // pending row: two statements for all the runs, sent together.
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                        [&ids, &tokens, &owners];
                    let (found, now) = super::pipeline::join!(
                        query(
                            tx,
                            OP,
                            "UPDATE outbox o SET dispatched_at_ms = effects_now_ms(), \
                             lease_owner = NULL, lease_until_ms = NULL, lease_token = NULL, \
                             last_error = NULL \
                             FROM unnest($1::text[], $2::bigint[], $3::text[]) \
                             AS u(id, token, owner) \
                             WHERE o.id = u.id AND o.dispatched_at_ms IS NULL \
                             AND o.lease_token = u.token AND o.lease_owner = u.owner \
                             RETURNING o.id, o.run_key",
                            &params,
                        ),
                        now(tx)
                    )?;
                    let mut done: HashSet<String> = HashSet::with_capacity(found.len());
                    let mut keys = BTreeSet::new();
                    for row in &found {
                        let what = || "a row marked dispatched".to_owned();
                        done.insert(get(row, 0, &what)?);
                        keys.insert(get::<String>(row, 1, &what)?);
                    }
                    // A row named twice is marked once, by its first mention.
                    let marked: Vec<bool> = rows.iter().map(|(id, _)| done.remove(id)).collect();
                    if !keys.is_empty() {
                        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                        let statements = prepare_all(
                            tx,
                            OP,
                            &[
                                &format!(
                                    "SELECT {RUN_COLUMNS} FROM effect_runs WHERE key = ANY($1) \
                                     ORDER BY key COLLATE \"C\" FOR UPDATE"
                                ),
                                "UPDATE effect_runs r SET status = 'done', completed_at_ms = $2, \
                                 updated_at_ms = $2 WHERE r.key = ANY($1) \
                                 AND r.status = 'messages_pending' AND NOT EXISTS (SELECT 1 \
                                 FROM outbox o WHERE o.run_key = r.key \
                                 AND o.dispatched_at_ms IS NULL \
                                 AND o.dead_lettered_reason IS NULL)",
                            ],
                        )
                        .await?;
                        let select: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&keys];
                        let complete: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                            [&keys, &now];
                        super::pipeline::join!(
                            tx.query(&statements[0], &select),
                            tx.execute(&statements[1], &complete),
                        )
                        .map_err(db_error(OP))?;
                    }
                    Ok(marked)
                })
            })
            .await
        }
    }

    fn dead_letter(
        &self,
        id: &str,
        reason: &str,
        lease: Option<&Lease>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let (id, reason) = (id.to_owned(), reason.to_owned());
        let (token, owner) = lease.map_or((None, None), |l| (Some(l.token), Some(l.owner.clone())));
        async move {
            db.transaction("dead-lettering a row", Isolation::Write, |tx| {
                let (id, reason, owner) = (id.clone(), reason.clone(), owner.clone());
                Box::pin(async move {
                    const OP: &str = "dead-lettering a row";
                    let now = now(tx).await?;
                    let key = query_opt(
                        tx,
                        OP,
                        "UPDATE outbox SET dead_lettered_reason = $2, lease_owner = NULL, \
                         lease_until_ms = NULL, lease_token = NULL WHERE id = $1 \
                         AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL \
                         AND (($3::bigint IS NULL AND (lease_until_ms IS NULL \
                                                       OR lease_until_ms <= $5)) \
                              OR (lease_token = $3 AND lease_owner = $4::text)) \
                         RETURNING run_key",
                        &[&id, &reason, &token, &owner, &now],
                    )
                    .await?;
                    let Some(key) = key else {
                        return Ok(false);
                    };
                    let key: String = get(&key, 0, &|| format!("outbox row `{id}`"))?;
                    lock_run(tx, &key).await?;
                    execute(
                        tx,
                        OP,
                        "UPDATE effect_runs SET updated_at_ms = $2 WHERE key = $1",
                        &[&key, &now],
                    )
                    .await?;
                    complete_if_done(tx, &key, now).await?;
                    Ok(true)
                })
            })
            .await
        }
    }

    fn retry_later(
        &self,
        id: &str,
        lease: &Lease,
        error: &str,
        delay: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let (id, error) = (id.to_owned(), error.to_owned());
        let lease = lease.clone();
        let delay = millis(delay);
        async move {
            db.transaction("scheduling a retry", Isolation::Write, |tx| {
                let (id, error, lease) = (id.clone(), error.clone(), lease.clone());
                Box::pin(async move {
                    let changed = execute(
                        tx,
                        "scheduling a retry",
                        "UPDATE outbox SET last_error = $3, \
                         next_attempt_at_ms = effects_now_ms() + $4, lease_owner = NULL, \
                         lease_until_ms = NULL, lease_token = NULL \
                         WHERE id = $1 AND lease_token = $2 AND lease_owner = $5",
                        &[&id, &lease.token, &error, &delay, &lease.owner],
                    )
                    .await?;
                    Ok(changed > 0)
                })
            })
            .await
        }
    }

    fn renew(
        &self,
        ids: Vec<String>,
        lease: &Lease,
        duration: Duration,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let lease = lease.clone();
        let duration = millis(duration);
        let ids = Arc::new(ids);
        async move {
            db.transaction("renewing leases", Isolation::Write, |tx| {
                let (ids, lease) = (Arc::clone(&ids), lease.clone());
                Box::pin(async move {
                    let held: HashSet<String> = query(
                        tx,
                        "renewing leases",
                        "UPDATE outbox SET lease_until_ms = effects_now_ms() + $3 \
                         WHERE id = ANY($1) AND lease_token = $2 AND lease_owner = $4 \
                         AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL \
                         RETURNING id",
                        &[&*ids, &lease.token, &duration, &lease.owner],
                    )
                    .await?
                    .iter()
                    .map(|r| get(r, 0, &|| "a renewed row".to_owned()))
                    .collect::<Result<_, _>>()?;
                    Ok(ids
                        .iter()
                        .filter(|id| held.contains(*id))
                        .cloned()
                        .collect())
                })
            })
            .await
        }
    }

    fn release(
        &self,
        ids: Vec<String>,
        owner: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let owner = owner.to_owned();
        let ids = Arc::new(ids);
        async move {
            db.transaction("releasing leases", Isolation::Write, |tx| {
                let (ids, owner) = (Arc::clone(&ids), owner.clone());
                Box::pin(async move {
                    if ids.is_empty() {
                        return execute(
                            tx,
                            "releasing leases",
                            "UPDATE outbox SET lease_owner = NULL, lease_until_ms = NULL, \
                             lease_token = NULL WHERE lease_owner = $1",
                            &[&owner],
                        )
                        .await;
                    }
                    execute(
                        tx,
                        "releasing leases",
                        "UPDATE outbox SET lease_owner = NULL, lease_until_ms = NULL, \
                         lease_token = NULL, attempts = GREATEST(attempts - 1, 0) \
                         WHERE id = ANY($1) AND lease_owner = $2",
                        &[&*ids, &owner],
                    )
                    .await
                })
            })
            .await
        }
    }

    fn register_owner(&self, owner: &str) -> impl Future<Output = Result<(), StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let owner = owner.to_owned();
        async move { db.liveness.register(&owner).await }
    }

    fn reap_dead_owners(&self) -> impl Future<Output = Result<Reaped, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move { super::liveness::reap(&db).await }
    }

    fn report_blocked(
        &self,
        owner: &str,
        consumer: &str,
        topic: &str,
        blocked: Vec<BlockedInput>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let (owner, consumer, topic) = (owner.to_owned(), consumer.to_owned(), topic.to_owned());
        let rows = BlockedRow::of(blocked);
        async move {
            // A report lives as long as its owner: registered, it goes when the owner is reaped.
            if !rows.is_empty() && db.liveness.key_of(&owner).is_none() {
                db.liveness.register(&owner).await?;
            }
            db.transaction("reporting blocked inputs", Isolation::Write, |tx| {
                let (owner, consumer, topic) = (owner.clone(), consumer.clone(), topic.clone());
                let rows = rows.clone();
                Box::pin(async move {
                    super::blocked::report_tx(tx, &owner, &consumer, &topic, &rows).await
                })
            })
            .await
        }
    }

    fn outbox(&self, key: &str) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let key = key.to_owned();
        async move {
            db.transaction("reading the outbox", Isolation::Snapshot, |tx| {
                let key = key.clone();
                Box::pin(async move {
                    query(
                        tx,
                        "reading the outbox",
                        &format!(
                            "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE run_key = $1 ORDER BY seq"
                        ),
                        &[&key],
                    )
                    .await?
                    .iter()
                    .map(decode_outbox)
                    .collect()
                })
            })
            .await
        }
    }

    fn entity(
        &self,
        lookup: &LookupRef,
        as_of: Option<Tx>,
    ) -> impl Future<Output = Result<Option<Entity>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let lookup = lookup.clone();
        async move {
            db.transaction("reading an entity", Isolation::Snapshot, |tx| {
                let lookup = lookup.clone();
                Box::pin(async move { entity_tx(tx, &lookup, as_of).await })
            })
            .await
        }
    }

    fn latest_tx(&self) -> impl Future<Output = Result<Option<Tx>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("reading the latest tx", Isolation::Snapshot, |tx| {
                Box::pin(async move {
                    let row = query_one(
                        tx,
                        "reading the latest tx",
                        "SELECT MAX(tx) FROM transactions",
                        &[],
                    )
                    .await?;
                    let tx: Option<i64> = get(&row, 0, &|| "the latest tx".to_owned())?;
                    Ok(tx.map(Tx))
                })
            })
            .await
        }
    }

    fn prune(
        &self,
        older_than: PruneOlderThan,
    ) -> impl Future<Output = Result<PruneReport, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            // The cutoffs come from the server's clock, once, so that a chunk loop cannot drift.
            let now = db
                .transaction("pruning", Isolation::Snapshot, |tx| {
                    Box::pin(async move { now(tx).await })
                })
                .await?;
            let cutoff = |age: Option<Duration>| age.map(|a| now.saturating_sub(millis(a)));
            let before = PruneBefore {
                outbox_dispatched: cutoff(older_than.outbox_dispatched),
                runs_completed: cutoff(older_than.runs_completed),
            };
            let mut total = PruneReport::default();
            // Chunks keep each transaction short; a chunk that removes nothing ends it.
            for _ in 0..10_000 {
                let chunk = db
                    .transaction("pruning", Isolation::Write, |tx| {
                        Box::pin(async move { prune_chunk(tx, before).await })
                    })
                    .await?;
                total.outbox_rows += chunk.outbox_rows;
                total.runs += chunk.runs;
                if chunk == PruneReport::default() {
                    break;
                }
            }
            Ok(total)
        }
    }
}
