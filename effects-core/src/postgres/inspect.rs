//! [`Inspect`] for the PostgreSQL store: operator reads and dead-letter retries, and connecting
//! to a schema that must already hold a store.
//!
//! Reads of several statements run in one `REPEATABLE READ READ ONLY` transaction (one
//! snapshot); times come from the server's clock (`effects_now_ms()`). A retry is one write
//! transaction taking its locks in the store's order (the outbox row, then its run's row, then
//! the `outbox_ready` counter row), as every writer resolving an outbox row does.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use deadpool_postgres::Transaction;
use serde_json::Value;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::db::{Db, Isolation, PostgresOptions, execute, query, query_one, query_opt};
use super::store::{
    OUTBOX_COLUMNS, PostgresStore, RUN_COLUMNS, corrupt, decode_outbox, decode_run, find_entity,
    get, load_run, lock_run, millis, next_counter, now, to_u32,
};
use crate::datom::{LookupRef, Op};
use crate::store::{
    BacklogReport, BlockedInputEntry, DeadLetterEntry, DeadLetterId, DeadLetterKind, Entity,
    EntityHistory, HistoryDatom, Inspect, Millis, OutboxEntry, OutboxKind, PruneOlderThan,
    PruneReport, RecordedOutcome, RetryOutcome, RetryRecord, RetryRequest, RunDetail, RunQuery,
    RunState, RunStatus, RunSummary, StoreError, Tx,
};

impl PostgresStore {
    /// Connects to a schema that already holds an effects store, for tools that must never
    /// create one: a schema that does not exist, and a schema whose tables are not an effects
    /// store, are errors, and nothing is created in them. A store of an older version of this
    /// library gets the pending migrations, as [`PostgresStore::connect`] would give it. A
    /// server that does not answer is an error after `options.connect_timeout`.
    pub async fn connect_existing(options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        Ok(PostgresStore {
            db: Arc::new(Db::connect_existing(&options).await?),
        })
    }
}

impl PostgresStore {
    /// A deliberately broken retry of a dead-lettered outbox row, so that the retry tests can
    /// show that their checks fail without the guarantee: it reads the run's row without
    /// locking it, so a transaction finishing the run's requests at the same time goes unseen
    /// (a message that was waiting for them is left waiting for good). Testing only.
    #[doc(hidden)]
    pub fn mutant_retry_without_run_lock(
        &self,
        id: &str,
        request: &RetryRequest,
    ) -> impl Future<Output = Result<RetryOutcome, StoreError>> + Send + 'static {
        let db = Arc::clone(&self.db);
        let (id, request) = (id.to_owned(), request.clone());
        async move {
            db.transaction("retrying a dead letter (mutant)", Isolation::Write, |tx| {
                let (id, request) = (id.clone(), request.clone());
                Box::pin(async move { retry_outbox_tx(tx, &id, &request, false).await })
            })
            .await
        }
    }
}

/// Why an input dead letter is not retried (nor listed) by the PostgreSQL store.
const INPUTS_IN_THE_BROKER: &str = "input dead letters of a PostgreSQL store are kept by the \
     broker, not by the store: with NATS JetStream they are in the stream, on the subject \
     `<prefix>.dead.<consumer>.<topic>`; read and republish them with the broker's tools";

// ---------------------------------------------------------------------------------------------
// Row decoding.

/// An outbox row with when it was written and its recorded outcome: [`OUTBOX_COLUMNS`], then
/// `created_at_ms`, the outcome and when it was recorded. Followed by `WHERE ...`.
fn entry_select() -> String {
    format!(
        "SELECT {OUTBOX_COLUMNS}, created_at_ms, \
         (SELECT p.outcome FROM effect_run_responses p \
          WHERE p.run_key = outbox.run_key AND p.seq = outbox.seq), \
         (SELECT p.recorded_at_ms FROM effect_run_responses p \
          WHERE p.run_key = outbox.run_key AND p.seq = outbox.seq) \
         FROM outbox"
    )
}

/// The column of `created_at_ms` in [`entry_select`].
const CREATED_COLUMN: usize = 18;

fn decode_entry(r: &Row) -> Result<OutboxEntry, StoreError> {
    let row = decode_outbox(r)?;
    let what = format!("outbox row `{}`", row.id);
    let w = || what.clone();
    let ready_seq: Option<i64> = get(r, 14, &w)?;
    let created_at: Millis = get(r, CREATED_COLUMN, &w)?;
    let outcome: Option<String> = get(r, CREATED_COLUMN + 1, &w)?;
    let recorded_at: Option<Millis> = get(r, CREATED_COLUMN + 2, &w)?;
    let recorded = match (outcome, recorded_at) {
        (Some(outcome), Some(at)) => Some(RecordedOutcome {
            outcome: serde_json::from_str(&outcome)
                .map_err(|e| corrupt(what.clone(), format!("recorded outcome: {e}")))?,
            recorded_at: at,
        }),
        _ => None,
    };
    Ok(OutboxEntry {
        row,
        ready: ready_seq.is_some(),
        created_at,
        recorded,
        retries: Vec::new(),
    })
}

async fn load_entries(
    tx: &Transaction<'_>,
    operation: &'static str,
    condition: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<OutboxEntry>, StoreError> {
    let sql = format!("{} WHERE {condition}", entry_select());
    query(tx, operation, &sql, params)
        .await?
        .iter()
        .map(decode_entry)
        .collect()
}

const RETRY_COLUMNS: &str = "id, kind, target, run_key, dead_letter_reason, attempts, \
     previous_outcome, operator, reason, retried_at_ms";

fn decode_retry(r: &Row) -> Result<RetryRecord, StoreError> {
    let id: i64 = get(r, 0, &|| "a dead-letter retry".to_owned())?;
    let what = format!("dead-letter retry {id}");
    let w = || what.clone();
    let kind: String = get(r, 1, &w)?;
    let previous: Option<String> = get(r, 6, &w)?;
    Ok(RetryRecord {
        kind: DeadLetterKind::parse(&kind)
            .ok_or_else(|| corrupt(what.clone(), format!("kind `{kind}`")))?,
        target: get(r, 2, &w)?,
        run_key: get(r, 3, &w)?,
        dead_letter_reason: get(r, 4, &w)?,
        attempts: to_u32(get(r, 5, &w)?, &what, "attempts")?,
        previous_outcome: previous
            .map(|p| serde_json::from_str(&p))
            .transpose()
            .map_err(|e| corrupt(what.clone(), format!("previous outcome: {e}")))?,
        operator: get(r, 7, &w)?,
        reason: get(r, 8, &w)?,
        retried_at: get(r, 9, &w)?,
        id,
    })
}

/// Attaches each entry's retries, read in one statement.
async fn with_retries(
    tx: &Transaction<'_>,
    mut entries: Vec<OutboxEntry>,
) -> Result<Vec<OutboxEntry>, StoreError> {
    if entries.is_empty() {
        return Ok(entries);
    }
    let targets: Vec<String> = entries
        .iter()
        .map(|e| DeadLetterId::Outbox(e.row.id.clone()).to_string())
        .collect();
    let mut by_target: HashMap<String, Vec<RetryRecord>> = HashMap::new();
    let rows = query(
        tx,
        "reading dead-letter retries",
        &format!(
            "SELECT {RETRY_COLUMNS} FROM dead_letter_retries WHERE target = ANY($1) ORDER BY id"
        ),
        &[&targets],
    )
    .await?;
    for r in &rows {
        let record = decode_retry(r)?;
        by_target
            .entry(record.target.clone())
            .or_default()
            .push(record);
    }
    for (entry, target) in entries.iter_mut().zip(&targets) {
        entry.retries = by_target.remove(target).unwrap_or_default();
    }
    Ok(entries)
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn decode_datom(r: &Row) -> Result<HistoryDatom, StoreError> {
    let w = || "a datom of the history".to_owned();
    let tx: i64 = get(r, 0, &w)?;
    let identity: String = get(r, 2, &w)?;
    let parse = |text: &str, column: &str| -> Result<Value, StoreError> {
        serde_json::from_str(text).map_err(|e| {
            corrupt(
                format!("datom of tx {tx} on `{identity}`"),
                format!("{column}: {e}"),
            )
        })
    };
    let identity_value: String = get(r, 3, &w)?;
    let value: String = get(r, 5, &w)?;
    let added: bool = get(r, 6, &w)?;
    Ok(HistoryDatom {
        tx: Tx(tx),
        run_key: get(r, 1, &w)?,
        entity: LookupRef::new(identity.as_str(), parse(&identity_value, "identity value")?),
        attribute: get(r, 4, &w)?,
        value: parse(&value, "value")?,
        op: if added { Op::Assert } else { Op::Retract },
    })
}

async fn load_datoms(
    tx: &Transaction<'_>,
    condition: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<HistoryDatom>, StoreError> {
    let sql = format!(
        "SELECT d.tx, t.run_key, e.identity, e.identity_value, d.attribute, d.value, d.added \
         FROM datoms d JOIN entities e ON e.id = d.entity_id JOIN transactions t ON t.tx = d.tx \
         WHERE {condition} ORDER BY d.tx, d.id"
    );
    query(tx, "reading the datom history", &sql, params)
        .await?
        .iter()
        .map(decode_datom)
        .collect()
}

async fn count(
    tx: &Transaction<'_>,
    operation: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let row = query_one(tx, operation, sql, params).await?;
    let n: i64 = get(&row, 0, &|| "a count".to_owned())?;
    Ok(u64::try_from(n).unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// Reads.

async fn runs_tx(tx: &Transaction<'_>, query_: &RunQuery) -> Result<Vec<RunSummary>, StoreError> {
    const OP: &str = "listing runs";
    let state = query_.state.map_or("all", RunState::as_str);
    let sql = format!(
        "SELECT {RUN_COLUMNS}, \
         (SELECT COUNT(*) FROM outbox o WHERE o.run_key = r.key \
          AND o.dispatched_at_ms IS NOT NULL), \
         (SELECT COUNT(*) FROM outbox o WHERE o.run_key = r.key \
          AND o.dispatched_at_ms IS NULL AND o.dead_lettered_reason IS NULL), \
         (SELECT COUNT(*) FROM outbox o WHERE o.run_key = r.key \
          AND o.dead_lettered_reason IS NOT NULL) \
         FROM effect_runs r WHERE ($1::bigint IS NULL OR r.created_at_ms >= $1) \
         AND ($2::text = 'all' \
              OR ($2 = 'pending' AND r.status <> 'done') \
              OR ($2 = 'done' AND r.status = 'done') \
              OR ($2 = 'dead-lettered' AND EXISTS (SELECT 1 FROM outbox o \
                  WHERE o.run_key = r.key AND o.dead_lettered_reason IS NOT NULL))) \
         ORDER BY r.tx DESC LIMIT $3"
    );
    let rows = query(
        tx,
        OP,
        &sql,
        &[&query_.since, &state, &limit_param(query_.limit)],
    )
    .await?;
    rows.iter()
        .map(|r| {
            let run = decode_run(r)?;
            let what = format!("effect run `{}`", run.key);
            let w = || what.clone();
            Ok(RunSummary {
                dispatched: to_u32(get(r, 9, &w)?, &what, "dispatched rows")?,
                pending: to_u32(get(r, 10, &w)?, &what, "pending rows")?,
                dead_lettered: to_u32(get(r, 11, &w)?, &what, "dead-lettered rows")?,
                run,
            })
        })
        .collect()
}

async fn run_detail_tx(tx: &Transaction<'_>, key: &str) -> Result<Option<RunDetail>, StoreError> {
    let Some(run) = load_run(tx, key).await? else {
        return Ok(None);
    };
    let datoms = load_datoms(tx, "d.tx = $1 AND t.run_key = $2", &[&run.tx.0, &key]).await?;
    let outbox = load_entries(
        tx,
        "reading the outbox",
        "run_key = $1 ORDER BY seq",
        &[&key],
    )
    .await?;
    Ok(Some(RunDetail {
        run,
        datoms,
        outbox: with_retries(tx, outbox).await?,
    }))
}

async fn entity_history_tx(
    tx: &Transaction<'_>,
    lookup: &LookupRef,
    as_of: Option<Tx>,
) -> Result<Option<EntityHistory>, StoreError> {
    const OP: &str = "reading an entity's history";
    let Some((id, created, updated)) = find_entity(tx, OP, lookup).await? else {
        return Ok(None);
    };
    let until = as_of.map_or(i64::MAX, |t| t.0);
    if created > until {
        return Ok(Some(EntityHistory {
            entity: None,
            datoms: Vec::new(),
        }));
    }
    let datoms = load_datoms(tx, "d.entity_id = $1 AND d.tx <= $2", &[&id, &until]).await?;
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

async fn prune_preview_tx(
    tx: &Transaction<'_>,
    older_than: PruneOlderThan,
) -> Result<PruneReport, StoreError> {
    const OP: &str = "previewing a prune";
    let now = now(tx).await?;
    let cutoff = |age: Option<std::time::Duration>| age.map(|a| now.saturating_sub(millis(a)));
    let outbox_before = cutoff(older_than.outbox_dispatched);
    let runs_before = cutoff(older_than.runs_completed);
    // The same conditions as `Store::prune`: a dispatched row of a done run, dispatched before
    // the cutoff; a done run completed before its cutoff once none of its rows is left (rows
    // the outbox part removes in the same prune count as gone). There is no log to prune.
    let outbox_rows = match outbox_before {
        None => 0,
        Some(before) => {
            count(
                tx,
                OP,
                "SELECT COUNT(*) FROM outbox o JOIN effect_runs r ON r.key = o.run_key \
                 WHERE o.dispatched_at_ms IS NOT NULL AND o.dispatched_at_ms < $1 \
                 AND r.status = 'done'",
                &[&before],
            )
            .await?
        }
    };
    let runs = match runs_before {
        None => 0,
        Some(before) => {
            count(
                tx,
                OP,
                "SELECT COUNT(*) FROM effect_runs r WHERE r.status = 'done' \
                 AND r.completed_at_ms < $1 AND NOT EXISTS (SELECT 1 FROM outbox o \
                 WHERE o.run_key = r.key AND NOT ($2::bigint IS NOT NULL \
                 AND o.dispatched_at_ms IS NOT NULL AND o.dispatched_at_ms < $2))",
                &[&before, &outbox_before],
            )
            .await?
        }
    };
    Ok(PruneReport {
        outbox_rows,
        runs,
        log_messages: 0,
    })
}

async fn backlog_tx(tx: &Transaction<'_>) -> Result<BacklogReport, StoreError> {
    const OP: &str = "measuring the backlog";
    let row = query_one(
        tx,
        OP,
        "SELECT effects_now_ms(), \
         (SELECT COUNT(*) FROM outbox WHERE dispatched_at_ms IS NULL \
          AND dead_lettered_reason IS NULL), \
         (SELECT MIN(created_at_ms) FROM outbox WHERE dispatched_at_ms IS NULL \
          AND dead_lettered_reason IS NULL), \
         (SELECT COUNT(*) FROM outbox WHERE dead_lettered_reason IS NOT NULL), \
         (SELECT COUNT(*) FROM effect_runs WHERE status <> 'done'), \
         (SELECT COUNT(*) FROM blocked_inputs), \
         (SELECT MIN(since_ms) FROM blocked_inputs)",
        &[],
    )
    .await?;
    let w = || "the backlog".to_owned();
    let n =
        |i| -> Result<u64, StoreError> { Ok(u64::try_from(get::<i64>(&row, i, &w)?).unwrap_or(0)) };
    Ok(BacklogReport {
        now: get(&row, 0, &w)?,
        pending_rows: n(1)?,
        oldest_pending_at: get(&row, 2, &w)?,
        dead_lettered_rows: n(3)?,
        dead_lettered_inputs: 0,
        open_runs: n(4)?,
        blocked_inputs: n(5)?,
        oldest_blocked_since: get(&row, 6, &w)?,
        consumers: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Retrying.

async fn insert_retry(
    tx: &Transaction<'_>,
    record: &RetryRecord,
) -> Result<RetryRecord, StoreError> {
    const OP: &str = "recording a retry";
    let previous = record
        .previous_outcome
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| corrupt(format!("retry of `{}`", record.target), e.to_string()))?;
    let row = query_one(
        tx,
        OP,
        "INSERT INTO dead_letter_retries (kind, target, run_key, dead_letter_reason, attempts, \
         previous_outcome, operator, reason, retried_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
        &[
            &record.kind.as_str(),
            &record.target,
            &record.run_key,
            &record.dead_letter_reason,
            &i64::from(record.attempts),
            &previous,
            &record.operator,
            &record.reason,
            &record.retried_at,
        ],
    )
    .await?;
    Ok(RetryRecord {
        id: get(&row, 0, &|| format!("retry of `{}`", record.target))?,
        ..record.clone()
    })
}

/// Retries a dead-lettered outbox row. Locks, in the store's order: the row (`FOR UPDATE`),
/// then its run's row ([`lock_run`]: every change of a run's status and every resolution of
/// one of its rows takes it, so a relay finishing the run's requests meanwhile is either
/// entirely before or entirely after this), then, for a message that gets its turn now, the
/// `outbox_ready` counter row. The row's lease is cleared: a claimant still holding an old
/// lease token is refused when it records, marks or renews it.
///
/// `lock_the_run` is `false` only for the deliberately broken retry of the tests
/// ([`PostgresStore::mutant_retry_without_run_lock`]).
async fn retry_outbox_tx(
    tx: &Transaction<'_>,
    id: &str,
    request: &RetryRequest,
    lock_the_run: bool,
) -> Result<RetryOutcome, StoreError> {
    const OP: &str = "retrying a dead letter";
    let now = now(tx).await?;
    let found = query_opt(
        tx,
        OP,
        &format!("{} WHERE id = $1 FOR UPDATE", entry_select()),
        &[&id],
    )
    .await?;
    let Some(found) = found else {
        return Ok(RetryOutcome::NotFound);
    };
    let entry = decode_entry(&found)?;
    let row = &entry.row;
    let Some(dead_reason) = row.dead_lettered.clone() else {
        return Ok(RetryOutcome::NotDeadLettered);
    };
    let run = if lock_the_run {
        lock_run(tx, &row.run_key).await?
    } else {
        load_run(tx, &row.run_key).await?
    };
    let Some(run) = run else {
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
            execute(
                tx,
                OP,
                "DELETE FROM effect_run_responses WHERE run_key = $1 AND seq = $2",
                &[&row.run_key, &i64::from(row.seq)],
            )
            .await?;
            execute(
                tx,
                OP,
                "UPDATE effect_runs SET status = 'requests_pending', completed_at_ms = NULL, \
                 updated_at_ms = $2 WHERE key = $1",
                &[&row.run_key, &now],
            )
            .await?;
            (
                DeadLetterKind::Request,
                entry.recorded.as_ref().map(|r| r.outcome.clone()),
            )
        }
        OutboxKind::Message => {
            if !entry.ready && run.status != RunStatus::RequestsPending {
                // Dead-lettered while it waited for the run's requests: it gets its turn now,
                // in commit order like every row that becomes ready.
                let ready = next_counter(tx, "outbox_ready", 1).await?;
                execute(
                    tx,
                    OP,
                    "UPDATE outbox SET ready_seq = $2 WHERE id = $1",
                    &[&id, &ready],
                )
                .await?;
            }
            if run.status == RunStatus::Done {
                execute(
                    tx,
                    OP,
                    "UPDATE effect_runs SET status = 'messages_pending', \
                     completed_at_ms = NULL, updated_at_ms = $2 WHERE key = $1",
                    &[&row.run_key, &now],
                )
                .await?;
            }
            (DeadLetterKind::Message, None)
        }
    };
    execute(
        tx,
        OP,
        "UPDATE outbox SET dead_lettered_reason = NULL, attempts = 0, next_attempt_at_ms = $2, \
         last_error = NULL, lease_owner = NULL, lease_until_ms = NULL, lease_token = NULL \
         WHERE id = $1",
        &[&id, &now],
    )
    .await?;
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
    )
    .await?;
    Ok(RetryOutcome::Retried(record))
}

// ---------------------------------------------------------------------------------------------
// The trait.

/// Operator reads and retries on PostgreSQL, with the semantics of [`Inspect`].
///
/// Every read is one `REPEATABLE READ READ ONLY` transaction, so a run's record, datoms,
/// outbox rows and retries come from one snapshot; times are the server's
/// ([`Inspect::clock`] is `effects_now_ms()`). Dead letters are listed oldest first in the
/// order they were written (by `tx`, then `seq`).
///
/// **Input dead letters are in the broker.** With PostgreSQL the inputs come from a broker
/// (NATS JetStream), whose dead letters live in the stream
/// (`<prefix>.dead.<consumer>.<topic>`, read by `NatsTransport::dead_letters` with the `nats`
/// feature), not in the store: [`Inspect::dead_letters`] lists none,
/// [`BacklogReport::dead_lettered_inputs`] is 0 and [`BacklogReport::consumers`] is empty, and
/// retrying an input id ([`DeadLetterId::Input`]) is [`RetryOutcome::Refused`] with a reason
/// saying so, changing nothing.
impl Inspect for PostgresStore {
    fn clock(&self) -> impl Future<Output = Result<Millis, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("reading the clock", Isolation::Snapshot, |tx| {
                Box::pin(async move { now(tx).await })
            })
            .await
        }
    }

    fn runs(
        &self,
        query: RunQuery,
    ) -> impl Future<Output = Result<Vec<RunSummary>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("listing runs", Isolation::Snapshot, |tx| {
                let query = query.clone();
                Box::pin(async move { runs_tx(tx, &query).await })
            })
            .await
        }
    }

    fn run_detail(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<RunDetail>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let key = key.to_owned();
        async move {
            db.transaction("reading a run", Isolation::Snapshot, |tx| {
                let key = key.clone();
                Box::pin(async move { run_detail_tx(tx, &key).await })
            })
            .await
        }
    }

    fn pending(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("reading pending rows", Isolation::Snapshot, |tx| {
                Box::pin(async move {
                    let rows = load_entries(
                        tx,
                        "reading pending rows",
                        "dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL \
                         ORDER BY created_at_ms, run_key, seq LIMIT $1",
                        &[&limit_param(limit)],
                    )
                    .await?;
                    with_retries(tx, rows).await
                })
            })
            .await
        }
    }

    fn dead_letters(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetterEntry>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("reading dead letters", Isolation::Snapshot, |tx| {
                Box::pin(async move {
                    let rows = load_entries(
                        tx,
                        "reading dead letters",
                        "dead_lettered_reason IS NOT NULL ORDER BY tx, seq LIMIT $1",
                        &[&limit_param(limit)],
                    )
                    .await?;
                    Ok(with_retries(tx, rows)
                        .await?
                        .into_iter()
                        .map(|e| DeadLetterEntry::Outbox(Box::new(e)))
                        .collect())
                })
            })
            .await
        }
    }

    fn entity_history(
        &self,
        lookup: &LookupRef,
        as_of: Option<Tx>,
    ) -> impl Future<Output = Result<Option<EntityHistory>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let lookup = lookup.clone();
        async move {
            db.transaction("reading an entity's history", Isolation::Snapshot, |tx| {
                let lookup = lookup.clone();
                Box::pin(async move { entity_history_tx(tx, &lookup, as_of).await })
            })
            .await
        }
    }

    fn prune_preview(
        &self,
        older_than: PruneOlderThan,
    ) -> impl Future<Output = Result<PruneReport, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("previewing a prune", Isolation::Snapshot, |tx| {
                Box::pin(async move { prune_preview_tx(tx, older_than).await })
            })
            .await
        }
    }

    fn backlog(&self) -> impl Future<Output = Result<BacklogReport, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("measuring the backlog", Isolation::Snapshot, |tx| {
                Box::pin(async move { backlog_tx(tx).await })
            })
            .await
        }
    }

    fn retry_dead_letter(
        &self,
        id: &DeadLetterId,
        request: &RetryRequest,
    ) -> impl Future<Output = Result<RetryOutcome, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        let id = id.clone();
        let request = request.clone();
        async move {
            let row = match &id {
                DeadLetterId::Outbox(row) => row.clone(),
                DeadLetterId::Input { .. } => {
                    return Ok(RetryOutcome::Refused {
                        reason: INPUTS_IN_THE_BROKER.to_owned(),
                    });
                }
            };
            db.transaction("retrying a dead letter", Isolation::Write, |tx| {
                let (row, request) = (row.clone(), request.clone());
                Box::pin(async move { retry_outbox_tx(tx, &row, &request, true).await })
            })
            .await
        }
    }

    fn blocked_inputs(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<BlockedInputEntry>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("reading blocked inputs", Isolation::Snapshot, |tx| {
                Box::pin(async move { super::blocked::list(tx, limit_param(limit)).await })
            })
            .await
        }
    }

    fn retries(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RetryRecord>, StoreError>> + Send {
        let db = Arc::clone(&self.db);
        async move {
            db.transaction("reading dead-letter retries", Isolation::Snapshot, |tx| {
                Box::pin(async move {
                    query(
                        tx,
                        "reading dead-letter retries",
                        &format!(
                            "SELECT {RETRY_COLUMNS} FROM dead_letter_retries ORDER BY id LIMIT $1"
                        ),
                        &[&limit_param(limit)],
                    )
                    .await?
                    .iter()
                    .map(decode_retry)
                    .collect()
                })
            })
            .await
        }
    }
}
