//! Committing runs one after the other, each with its own statements: the path of a commit of
//! one run ([`Executor::run`](crate::executor::Executor::run)), where the set-based statements
//! of [`commit`](super::commit) cost more than they save. Both give the same rows; the store
//! conformance suite compares them (`a_batch_gives_what_its_runs_give_one_by_one`).

use std::collections::{BTreeSet, HashMap, HashSet};

use deadpool_postgres::Transaction;

use super::db::{ENTITY_LOCK_CLASS, db_error, execute, prepare_all, query, query_one, query_opt};
use super::pipeline;
use super::store::{COUNTER_SQL, corrupt, get, insert_outbox, load_run, next_counter, now};
use crate::datom::Op;
use crate::store::{
    Commit, Conflict, Millis, NewDatom, NewRun, OutboxKind, RunStatus, StoreError, Tx,
};

/// What a commit knows of the entities it locked: by (identity, identity value), the row id
/// and version (`updated_tx`), or `None` while it does not exist. Kept up to date as the
/// commit's runs create and change entities, so nothing locked is read twice.
type Known = HashMap<(String, String), Option<(i64, i64)>>;

/// Locks entities for the rest of the transaction and records their row id and version in
/// `known`; then allocates `counters` (name, how many), each counter row locked until the
/// transaction ends, and returns the first value of each. Each identity is locked through a
/// transaction-scoped advisory lock, which every transaction creating or changing it holds too,
/// so that "it does not exist" also holds until the transaction ends; an entity that exists is
/// locked `FOR UPDATE` as well. `entities` come sorted: with the counters last, that is the
/// global lock order. The statements are prepared first and then pipelined: the server runs
/// them in the order they are sent (every advisory lock before any row lock, the counters last)
/// while the client waits for one round trip.
async fn lock_entities(
    tx: &Transaction<'_>,
    entities: &[(&str, &str)],
    known: &mut Known,
    counters: &[(&str, usize)],
) -> Result<Vec<i64>, StoreError> {
    const OP: &str = "locking entities";
    let entities: Vec<(&str, &str)> = entities
        .iter()
        .copied()
        .filter(|(i, v)| !known.contains_key(&((*i).to_owned(), (*v).to_owned())))
        .collect();
    if entities.is_empty() && counters.is_empty() {
        return Ok(Vec::new());
    }
    let statements = prepare_all(
        tx,
        OP,
        &[
            "SELECT pg_advisory_xact_lock($1, hashtext($2 || ' ' || $3))",
            "SELECT id, updated_tx FROM entities \
             WHERE identity = $1 AND identity_value = $2 FOR UPDATE",
            COUNTER_SQL,
        ],
    )
    .await?;
    let (advisory, rows, counter) = (&statements[0], &statements[1], &statements[2]);
    let advisory = pipeline::all(entities.iter().map(|(identity, value)| async move {
        tx.query(advisory, &[&ENTITY_LOCK_CLASS, identity, value])
            .await
    }));
    let rows = pipeline::all(
        entities
            .iter()
            .map(|(identity, value)| async move { tx.query_opt(rows, &[identity, value]).await }),
    );
    let counts: Vec<i64> = counters
        .iter()
        .map(|(_, count)| i64::try_from(*count).unwrap_or(i64::MAX))
        .collect();
    let lasts = pipeline::all(
        counters
            .iter()
            .zip(&counts)
            .map(|((name, _), count)| async move { tx.query_one(counter, &[count, name]).await }),
    );
    // Polled in this order, so sent in this order.
    let (_, rows, lasts) = pipeline::join!(advisory, rows, lasts).map_err(db_error(OP))?;
    for ((identity, value), row) in entities.iter().zip(rows) {
        let what = || format!("entity `{identity}` {value}");
        let found = row
            .map(|row| Ok::<_, StoreError>((get(&row, 0, &what)?, get(&row, 1, &what)?)))
            .transpose()?;
        known.insert(((*identity).to_owned(), (*value).to_owned()), found);
    }
    counters
        .iter()
        .zip(&counts)
        .zip(lasts)
        .map(|(((name, _), count), row)| {
            let last: i64 = get(&row, 0, &|| format!("sequence `{name}`"))?;
            Ok(last - count + 1)
        })
        .collect()
}

/// A locked entity's row id and version, from `known`.
fn locked_entity(
    known: &Known,
    identity: &str,
    value: &str,
) -> Result<Option<(i64, i64)>, StoreError> {
    known
        .get(&(identity.to_owned(), value.to_owned()))
        .copied()
        .ok_or_else(|| {
            corrupt(
                format!("entity `{identity}` {value}"),
                "used before it was locked",
            )
        })
}

/// Read validation, against the state before the run: the first read whose entity changed
/// since, or the first expected value of a compare-and-set datom that does not hold. Every
/// entity involved is locked ([`lock_entities`]) before this runs, so nothing can change between
/// this check and the commit.
async fn check_reads(
    tx: &Transaction<'_>,
    run: &NewRun,
    known: &Known,
) -> Result<Option<Conflict>, StoreError> {
    const OP: &str = "validating reads";
    for read in &run.reads {
        let found =
            locked_entity(known, &read.entity.attribute, &read.identity_value)?.map(|(_, v)| Tx(v));
        if let Some(conflict) = Conflict::of_read(read, found) {
            return Ok(Some(conflict));
        }
    }
    for (index, datom) in run.datoms.iter().enumerate() {
        if datom.expected.is_empty() {
            continue;
        }
        let entity = locked_entity(known, &datom.identity, &datom.identity_value)?;
        for (attribute, expected) in &datom.expected {
            let current: Option<String> = match entity {
                None => None,
                Some((id, _)) => query_opt(
                    tx,
                    OP,
                    "SELECT value FROM entity_attributes WHERE entity_id = $1 AND attribute = $2",
                    &[&id, attribute],
                )
                .await?
                .map(|r| get(&r, 0, &|| format!("compare-and-set of datoms[{index}]")))
                .transpose()?,
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

// ---------------------------------------------------------------------------------------------
// Writing runs.

async fn apply_datom(
    tx: &Transaction<'_>,
    txid: i64,
    datom: &NewDatom,
    known: &mut Known,
) -> Result<(), StoreError> {
    const OP: &str = "applying datoms";
    // The entity is locked already (`lock_entities`, before the tx was allocated).
    let existing = locked_entity(known, &datom.identity, &datom.identity_value)?;
    let (entity, is_new) = match existing {
        Some((id, _)) => (id, false),
        // Nothing to retract, and no entity to create.
        None if datom.op == Op::Retract => return Ok(()),
        None => {
            let row = query_one(
                tx,
                OP,
                "INSERT INTO entities (identity, identity_value, created_tx, updated_tx) \
                 VALUES ($1, $2, $3, $3) RETURNING id",
                &[&datom.identity, &datom.identity_value, &txid],
            )
            .await?;
            let id = get(&row, 0, &|| "a new entity".to_owned())?;
            known.insert(
                (datom.identity.clone(), datom.identity_value.clone()),
                Some((id, txid)),
            );
            (id, true)
        }
    };
    // The current values of the named attributes, in one statement. An entity created by this
    // datom has none yet, and one datom names each attribute once (a later datom on the same
    // entity finds it existing).
    let mut current: HashMap<String, String> = HashMap::new();
    if !is_new {
        let names: Vec<&str> = datom.attributes.iter().map(|(a, _)| a.as_str()).collect();
        let rows = query(
            tx,
            OP,
            "SELECT attribute, value FROM entity_attributes \
             WHERE entity_id = $1 AND attribute = ANY($2)",
            &[&entity, &names],
        )
        .await?;
        for row in rows {
            let what = || format!("an attribute of entity {entity}");
            current.insert(get(&row, 0, &what)?, get(&row, 1, &what)?);
        }
    }
    let mut writes: Vec<DatomWrite<'_>> = Vec::new();
    for (attribute, value) in &datom.attributes {
        let current = current.get(attribute);
        match datom.op {
            Op::Assert if current == Some(value) => {}
            Op::Assert => {
                if let Some(old) = current {
                    writes.push(DatomWrite::History(attribute, old.clone(), false));
                }
                writes.push(DatomWrite::History(attribute, value.clone(), true));
                writes.push(DatomWrite::Set(attribute, value));
            }
            Op::Retract if current == Some(value) => {
                writes.push(DatomWrite::History(attribute, value.clone(), false));
                writes.push(DatomWrite::Remove(attribute));
            }
            Op::Retract => {}
        }
    }
    let changed = !writes.is_empty();
    if changed && !is_new {
        writes.push(DatomWrite::Version);
    }
    // Pipelined, run by the server in this order (history rows get their ids in order).
    pipeline::all(writes.iter().map(|write| write.execute(tx, txid, entity))).await?;
    if changed && !is_new {
        known.insert(
            (datom.identity.clone(), datom.identity_value.clone()),
            Some((entity, txid)),
        );
    }
    Ok(())
}

/// One write of a datom (see [`apply_datom`]).
enum DatomWrite<'a> {
    /// A history row: attribute, value, added.
    History(&'a str, String, bool),
    /// The attribute's current value.
    Set(&'a str, &'a str),
    /// The attribute retracted.
    Remove(&'a str),
    /// The entity's version: this tx.
    Version,
}

impl DatomWrite<'_> {
    async fn execute(
        &self,
        tx: &Transaction<'_>,
        txid: i64,
        entity: i64,
    ) -> Result<u64, StoreError> {
        const OP: &str = "applying datoms";
        match self {
            DatomWrite::History(attribute, value, added) => {
                execute(
                    tx,
                    OP,
                    "INSERT INTO datoms (tx, entity_id, attribute, value, added) \
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&txid, &entity, attribute, value, added],
                )
                .await
            }
            DatomWrite::Set(attribute, value) => {
                execute(
                    tx,
                    OP,
                    "INSERT INTO entity_attributes (entity_id, attribute, value, tx) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (entity_id, attribute) \
                     DO UPDATE SET value = excluded.value, tx = excluded.tx",
                    &[&entity, attribute, value, &txid],
                )
                .await
            }
            DatomWrite::Remove(attribute) => {
                execute(
                    tx,
                    OP,
                    "DELETE FROM entity_attributes WHERE entity_id = $1 AND attribute = $2",
                    &[&entity, attribute],
                )
                .await
            }
            DatomWrite::Version => {
                execute(
                    tx,
                    OP,
                    "UPDATE entities SET updated_tx = $1 WHERE id = $2",
                    &[&txid, &entity],
                )
                .await
            }
        }
    }
}

/// Claims a run's key: inserts its row with placeholder values, filled in when the run is
/// applied (or deleted again if it is refused). A key committed by another transaction is left
/// alone (`false`); one being committed by another transaction waits for it to end.
async fn claim_key(tx: &Transaction<'_>, key: &str) -> Result<bool, StoreError> {
    let inserted = execute(
        tx,
        "claiming a key",
        "INSERT INTO effect_runs (key, effects_sha256, tx, status, outbox_count, created_at_ms, \
         updated_at_ms) VALUES ($1, '', 0, 'requests_pending', 0, effects_now_ms(), \
         effects_now_ms()) ON CONFLICT (key) DO NOTHING",
        &[&key],
    )
    .await?;
    Ok(inserted > 0)
}

/// Commits runs one after the other (see [`Store::commit_runs`](crate::store::Store::commit_runs)):
/// the commits, one per run, in order, and the server's time. Locks are taken in one global
/// order so that concurrent commits cannot deadlock: the keys (sorted), then every entity the
/// runs read or write (sorted), then the `tx` counter row, held to the end. The ready rows of
/// the applied runs are still to be claimed.
pub(super) async fn commit_runs_tx(
    tx: &Transaction<'_>,
    runs: &[NewRun],
) -> Result<(Vec<Commit>, Millis), StoreError> {
    let keys: Vec<&str> = runs
        .iter()
        .map(|r| r.key.as_str())
        .collect::<BTreeSet<&str>>()
        .into_iter()
        .collect();
    // Pipelined: the server claims the keys one after the other, in this order.
    let (now, claims) = pipeline::join!(
        now(tx),
        pipeline::all(keys.iter().map(|key| claim_key(tx, key)))
    )?;
    let mut claimed: HashSet<&str> = keys
        .iter()
        .zip(claims)
        .filter(|(_, claimed)| *claimed)
        .map(|(key, _)| *key)
        .collect();
    let entities: Vec<(&str, &str)> = runs
        .iter()
        .filter(|r| claimed.contains(r.key.as_str()))
        .flat_map(run_entities)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // A lone run that cannot be refused (no reads, no compare-and-set) takes its counters with
    // its entity locks, in the same round trip: the values it takes are committed with it.
    let settled = match runs {
        [run] if claimed.contains(run.key.as_str()) && !can_be_refused(run) => Some(run),
        _ => None,
    };
    let counters: Vec<(&str, usize)> = settled.map_or_else(Vec::new, |run| {
        let ready = ready_count(run);
        std::iter::once(("tx", 1))
            .chain((ready > 0).then_some(("outbox_ready", ready)))
            .collect()
    });
    let mut known = Known::new();
    let firsts = lock_entities(tx, &entities, &mut known, &counters).await?;
    let mut taken = match (settled, firsts.first()) {
        (Some(_), Some(&tx)) => Some(Taken {
            tx,
            first_ready: firsts.get(1).copied(),
        }),
        (Some(run), None) => {
            return Err(corrupt(
                format!("effect run `{}`", run.key),
                "no `tx` was allocated",
            ));
        }
        (None, _) => None,
    };
    let mut out = Vec::with_capacity(runs.len());
    for run in runs {
        if !claimed.remove(run.key.as_str()) {
            match load_run(tx, &run.key).await? {
                Some(existing) => {
                    out.push(Commit::Existing(existing));
                    continue;
                }
                // An earlier item of this batch with the same key was refused: claim it now.
                None => {
                    if !claim_key(tx, &run.key).await? {
                        let existing = load_run(tx, &run.key).await?.ok_or_else(|| {
                            corrupt(
                                format!("effect run `{}`", run.key),
                                "vanished while claimed",
                            )
                        })?;
                        out.push(Commit::Existing(existing));
                        continue;
                    }
                    let mine: Vec<(&str, &str)> = run_entities(run)
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    lock_entities(tx, &mine, &mut known, &[]).await?;
                }
            }
        }
        out.push(apply_run(tx, run, now, &mut known, taken.take()).await?);
    }
    Ok((out, now))
}

/// Whether read validation can refuse the run: it read entities or compares and sets values.
fn can_be_refused(run: &NewRun) -> bool {
    !run.reads.is_empty() || run.datoms.iter().any(|d| !d.expected.is_empty())
}

/// How many of a run's outbox rows are ready when it commits: requests always, messages only
/// when the run has no requests (otherwise they wait for `finish_requests`).
fn ready_count(run: &NewRun) -> usize {
    let has_requests = run.outbox.iter().any(|r| r.kind == OutboxKind::Request);
    run.outbox
        .iter()
        .filter(|r| !has_requests || r.kind == OutboxKind::Request)
        .count()
}

/// Counter values a run took before it was applied (see [`lock_entities`]): its `tx`, and the
/// first `ready_seq` of its ready rows if it has any.
#[derive(Clone, Copy)]
struct Taken {
    tx: i64,
    first_ready: Option<i64>,
}

/// The entities a run reads or writes, as (identity, identity value).
fn run_entities(run: &NewRun) -> impl Iterator<Item = (&str, &str)> {
    run.reads
        .iter()
        .map(|read| (read.entity.attribute.as_str(), read.identity_value.as_str()))
        .chain(
            run.datoms
                .iter()
                .map(|d| (d.identity.as_str(), d.identity_value.as_str())),
        )
}

/// Applies a claimed run whose entities are locked: read validation (unless the run's
/// counters were `taken` already, which only a run that cannot be refused does), its `tx`, then
/// its writes.
async fn apply_run(
    tx: &Transaction<'_>,
    run: &NewRun,
    now: Millis,
    known: &mut Known,
    taken: Option<Taken>,
) -> Result<Commit, StoreError> {
    const OP: &str = "committing a run";
    let ready_count = ready_count(run);
    let taken = match taken {
        Some(taken) => taken,
        None => {
            if let Some(conflict) = check_reads(tx, run, known).await? {
                execute(
                    tx,
                    OP,
                    "DELETE FROM effect_runs WHERE key = $1",
                    &[&run.key],
                )
                .await?;
                return Ok(Commit::Conflict(conflict));
            }
            Taken {
                tx: next_counter(tx, "tx", 1).await?,
                first_ready: None,
            }
        }
    };
    let txid = taken.tx;

    let has_requests = run.outbox.iter().any(|r| r.kind == OutboxKind::Request);
    let status = if has_requests {
        RunStatus::RequestsPending
    } else if !run.outbox.is_empty() {
        RunStatus::MessagesPending
    } else {
        RunStatus::Done
    };
    let outbox_count = i64::try_from(run.outbox.len()).unwrap_or(i64::MAX);

    // Independent statements, pipelined: the server runs them in this order while the client
    // waits for their answers together (the datoms' own statements follow one another, and the
    // outbox rows follow the allocation of their ready order unless it was taken already).
    let transaction = async {
        execute(
            tx,
            OP,
            "INSERT INTO transactions (tx, run_key, committed_at_ms) VALUES ($1, $2, $3)",
            &[&txid, &run.key, &now],
        )
        .await
    };
    let datoms = async {
        for datom in &run.datoms {
            apply_datom(tx, txid, datom, known).await?;
        }
        Ok::<(), StoreError>(())
    };
    let record = async {
        execute(
            tx,
            OP,
            "UPDATE effect_runs SET effects_sha256 = $2, tx = $3, status = $4, \
             after_requests = $5, outbox_count = $6, created_at_ms = $7, updated_at_ms = $7, \
             completed_at_ms = $8 WHERE key = $1",
            &[
                &run.key,
                &run.effects_sha256,
                &txid,
                &status.as_str(),
                &run.after_requests,
                &outbox_count,
                &now,
                &(status == RunStatus::Done).then_some(now),
            ],
        )
        .await
    };
    let outbox = async {
        let first_ready = match taken.first_ready {
            Some(first) => first,
            None if ready_count > 0 => next_counter(tx, "outbox_ready", ready_count).await?,
            None => 0,
        };
        let mut ready = first_ready;
        let rows = run.outbox.iter().map(|row| {
            let ready_seq = if !has_requests || row.kind == OutboxKind::Request {
                ready += 1;
                Some(ready - 1)
            } else {
                None
            };
            insert_outbox(tx, &run.key, txid, row, ready_seq, now)
        });
        pipeline::all(rows).await
    };
    pipeline::join!(transaction, datoms, record, outbox)?;
    // Its ready rows are claimed with those of the rest of the batch (`commit_runs_tx`).
    Ok(Commit::Applied {
        tx: Tx(txid),
        status,
        claimed: Vec::new(),
        published_inline: 0,
    })
}
