//! Committing runs: a batch of runs in one transaction, with one statement per table for all
//! of its runs.
//!
//! A batch is committed in three round trips whatever its size, four when some of its keys are
//! taken already (see the [module documentation](super) for the lock order):
//!
//! 1. **Keys.** Every distinct key is claimed in one `INSERT .. SELECT FROM unnest(..)`; the
//!    records of the keys already taken are read in one statement.
//! 2. **Locks and state.** In one pipeline (sent together, run by the server in order): the
//!    advisory locks of every entity the claimed runs read or write, the entities' rows
//!    `FOR UPDATE` (their id and version), the current values of the attributes the runs name,
//!    and the counter rows (`tx`, then `outbox_ready`), `FOR UPDATE` too.
//! 3. **The plan.** With everything locked, the runs are played in order in memory, as the
//!    store would apply them one after the other: a key already taken (before the batch or by
//!    an earlier item of it) is [`Commit::Existing`]; a run whose reads or compare-and-set
//!    expectations do not hold against the state left by the runs before it is refused; each
//!    other run takes the next `tx` (so the committed ones are numbered densely, in batch
//!    order, and a refused one takes none) and its datoms change the entities and values the
//!    next runs see.
//! 4. **Writes.** The plan in one pipeline: the refused runs' key claims withdrawn, the counters
//!    advanced by what was taken, then one statement per table for all committed runs.
//!
//! The result is the one applying the runs one by one would give, row for row: the same `tx`
//! numbers, history rows in the same order, the same current values and versions, the same
//! outbox rows and ready order.

use std::collections::{BTreeSet, HashMap, HashSet};

use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;

use super::db::{ENTITY_LOCK_CLASS, db_error, prepare_all};
use super::pipeline;
use super::store::{corrupt, decode_run, get, headers_json, now};
use crate::datom::Op;
use crate::store::{
    Commit, Conflict, Millis, NewDatom, NewRun, OutboxKind, RunRecord, RunStatus, StoreError, Tx,
};

const OP: &str = "committing runs";

/// An entity by (identity, identity value), both as the runs carry them.
type EntityRef<'r> = (&'r str, &'r str);

/// An attribute of an entity: (identity, identity value, attribute).
type AttributeRef<'r> = (&'r str, &'r str, &'r str);

/// An entity as the commit knows it once locked: its row id (`None` for one this commit
/// creates) and its version (`updated_tx`).
#[derive(Clone, Copy, Debug)]
struct Locked {
    id: Option<i64>,
    version: i64,
}

/// What the commit locked and read before planning its runs.
struct State<'r> {
    /// Every entity the claimed runs read or write; `None` while it does not exist.
    entities: HashMap<EntityRef<'r>, Option<Locked>>,
    /// The current values of the attributes the claimed runs name (absent: no value).
    values: HashMap<AttributeRef<'r>, String>,
    /// The `tx` counter's value.
    tx: i64,
    /// The `outbox_ready` counter's value (0 if it was not locked: no claimed run has a ready
    /// row).
    ready: i64,
}

/// Commits a batch of runs (see [`Store::commit_runs`](crate::store::Store::commit_runs)): the
/// commits, one per run, in order. The ready rows of the applied runs are still to be claimed.
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
    let (now, mut free) = pipeline::join!(now(tx), claim_keys(tx, &keys))?;

    // The keys not claimed belong to runs committed before (or being committed by another
    // transaction, which the claim waited for): their records. A key whose run vanished since
    // (pruned) is claimed again.
    let mut taken: HashMap<String, RunRecord> = HashMap::new();
    let unclaimed: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| !free.contains(*k))
        .collect();
    if !unclaimed.is_empty() {
        taken = load_runs(tx, &unclaimed).await?;
        let vanished: Vec<&str> = unclaimed
            .into_iter()
            .filter(|k| !taken.contains_key(*k))
            .collect();
        if !vanished.is_empty() {
            let again = claim_keys(tx, &vanished).await?;
            let still: Vec<&str> = vanished
                .into_iter()
                .filter(|k| !again.contains(*k))
                .collect();
            free.extend(again);
            if !still.is_empty() {
                let found = load_runs(tx, &still).await?;
                if let Some(key) = still.iter().find(|k| !found.contains_key(**k)) {
                    return Err(corrupt(
                        format!("effect run `{key}`"),
                        "vanished while claimed",
                    ));
                }
                taken.extend(found);
            }
        }
    }

    let claimed: Vec<&NewRun> = runs
        .iter()
        .filter(|r| free.contains(r.key.as_str()))
        .collect();
    let state = if claimed.is_empty() {
        State {
            entities: HashMap::new(),
            values: HashMap::new(),
            tx: 0,
            ready: 0,
        }
    } else {
        lock_and_read(tx, &claimed).await?
    };
    let plan = Plan::make(runs, &free, taken, state, now)?;
    plan.write(tx, now).await?;
    Ok((plan.commits, now))
}

/// Claims keys (sorted: the global lock order) by inserting their runs' rows with placeholder
/// values, filled in when a run is applied (or deleted again if it is refused): the keys
/// claimed. A key committed by another transaction is left alone; one being committed by
/// another transaction waits for it to end.
async fn claim_keys(tx: &Transaction<'_>, keys: &[&str]) -> Result<HashSet<String>, StoreError> {
    let statements = prepare_all(
        tx,
        OP,
        &[
            "INSERT INTO effect_runs (key, effects_sha256, tx, status, outbox_count, \
           created_at_ms, updated_at_ms) \
           SELECT u.key, '', 0, 'requests_pending', 0, effects_now_ms(), effects_now_ms() \
           FROM unnest($1::text[]) WITH ORDINALITY AS u(key, n) ORDER BY u.n \
           ON CONFLICT (key) DO NOTHING RETURNING key",
        ],
    )
    .await?;
    tx.query(&statements[0], &[&keys])
        .await
        .map_err(db_error(OP))?
        .iter()
        .map(|r| get(r, 0, &|| "a claimed key".to_owned()))
        .collect()
}

/// The runs recorded under `keys`, by key.
pub(super) async fn load_runs(
    tx: &Transaction<'_>,
    keys: &[&str],
) -> Result<HashMap<String, RunRecord>, StoreError> {
    let statements = prepare_all(
        tx,
        OP,
        &[&format!(
            "SELECT {} FROM effect_runs WHERE key = ANY($1)",
            super::store::RUN_COLUMNS
        )],
    )
    .await?;
    tx.query(&statements[0], &[&keys])
        .await
        .map_err(db_error(OP))?
        .iter()
        .map(|r| decode_run(r).map(|run| (run.key.clone(), run)))
        .collect()
}

/// The entities a run reads or writes.
fn run_entities(run: &NewRun) -> impl Iterator<Item = EntityRef<'_>> {
    run.reads
        .iter()
        .map(|read| (read.entity.attribute.as_str(), read.identity_value.as_str()))
        .chain(
            run.datoms
                .iter()
                .map(|d| (d.identity.as_str(), d.identity_value.as_str())),
        )
}

/// Locks what the claimed runs touch and reads its state, in one round trip: the entities'
/// advisory locks (sorted: the global lock order; every transaction creating or changing an
/// entity holds its lock, so "it does not exist" holds until this one ends), then the rows of
/// those that exist `FOR UPDATE` (in the same order), the current values of the attributes the
/// runs name, and the counter rows the runs need, `tx` before `outbox_ready`.
async fn lock_and_read<'r>(
    tx: &Transaction<'_>,
    claimed: &[&'r NewRun],
) -> Result<State<'r>, StoreError> {
    let entities: Vec<EntityRef<'r>> = claimed
        .iter()
        .flat_map(|r| run_entities(r))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let attributes: Vec<AttributeRef<'r>> = claimed
        .iter()
        .flat_map(|r| &r.datoms)
        .flat_map(|d| {
            d.attributes
                .iter()
                .chain(&d.expected)
                .map(|(a, _)| (d.identity.as_str(), d.identity_value.as_str(), a.as_str()))
        })
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let counters: Vec<&str> = if claimed.iter().any(|r| !r.outbox.is_empty()) {
        vec!["tx", "outbox_ready"]
    } else {
        vec!["tx"]
    };
    let (identities, identity_values): (Vec<&str>, Vec<&str>) = entities.iter().copied().unzip();
    let (mut a_identities, mut a_values, mut a_names) = (Vec::new(), Vec::new(), Vec::new());
    for (identity, value, name) in &attributes {
        a_identities.push(*identity);
        a_values.push(*value);
        a_names.push(*name);
    }
    let statements = prepare_all(
        tx,
        "locking entities",
        &[
            "SELECT pg_advisory_xact_lock($1, hashtext(u.identity || ' ' || u.identity_value)) \
             FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS u(identity, identity_value, n) \
             ORDER BY u.n",
            "SELECT u.n, e.id, e.updated_tx \
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(identity, identity_value, n) \
             JOIN entities e ON e.identity = u.identity AND e.identity_value = u.identity_value \
             ORDER BY u.n FOR UPDATE OF e",
            "SELECT u.n, a.value \
             FROM unnest($1::text[], $2::text[], $3::text[]) \
                  WITH ORDINALITY AS u(identity, identity_value, attribute, n) \
             JOIN entities e ON e.identity = u.identity AND e.identity_value = u.identity_value \
             JOIN entity_attributes a ON a.entity_id = e.id AND a.attribute = u.attribute",
            // `tx` sorts after `outbox_ready`: descending, it is locked first.
            "SELECT name, value FROM sequences WHERE name = ANY($1) ORDER BY name DESC FOR UPDATE",
        ],
    )
    .await?;
    // Sent together, in this order (the statements are prepared, so each goes out when first
    // polled): one round trip.
    let params: [&[&(dyn ToSql + Sync)]; 4] = [
        &[&ENTITY_LOCK_CLASS, &identities, &identity_values],
        &[&identities, &identity_values],
        &[&a_identities, &a_values, &a_names],
        &[&counters],
    ];
    let mut results = pipeline::all(
        statements
            .iter()
            .zip(params)
            .map(|(statement, params)| tx.query(statement, params)),
    )
    .await
    .map_err(db_error("locking entities"))?;
    let counter_rows = results.pop().unwrap_or_default();
    let value_rows = results.pop().unwrap_or_default();
    let entity_rows = results.pop().unwrap_or_default();

    let index = |n: i64, len: usize, what: &str| -> Result<usize, StoreError> {
        usize::try_from(n - 1)
            .ok()
            .filter(|i| *i < len)
            .ok_or_else(|| corrupt(what, format!("row {n} of {len}")))
    };
    let mut state = State {
        entities: entities.iter().map(|e| (*e, None)).collect(),
        values: HashMap::with_capacity(value_rows.len()),
        tx: 0,
        ready: 0,
    };
    for row in &entity_rows {
        let what = || "a locked entity".to_owned();
        let i = index(get(row, 0, &what)?, entities.len(), "locked entities")?;
        let locked = Locked {
            id: Some(get(row, 1, &what)?),
            version: get(row, 2, &what)?,
        };
        state.entities.insert(entities[i], Some(locked));
    }
    for row in &value_rows {
        let what = || "a current value".to_owned();
        let i = index(get(row, 0, &what)?, attributes.len(), "current values")?;
        state.values.insert(attributes[i], get(row, 1, &what)?);
    }
    for row in &counter_rows {
        let what = || "a sequence".to_owned();
        let name: String = get(row, 0, &what)?;
        let value: i64 = get(row, 1, &what)?;
        match name.as_str() {
            "tx" => state.tx = value,
            "outbox_ready" => state.ready = value,
            _ => {}
        }
    }
    if counter_rows.len() != counters.len() {
        return Err(corrupt("sequences", "a counter row is missing"));
    }
    Ok(state)
}

/// Where a key stands while the batch is planned.
enum Key {
    /// Claimed by this commit, no run applied under it (yet).
    Free,
    /// Taken, by a run committed before or by an earlier item of the batch.
    Taken(RunRecord),
}

/// A history row to write.
struct History<'r> {
    tx: i64,
    entity: EntityRef<'r>,
    attribute: &'r str,
    value: String,
    added: bool,
}

/// A run the batch applies.
struct Applied<'r> {
    run: &'r NewRun,
    tx: i64,
    status: RunStatus,
    /// The `ready_seq` of each outbox row, in `seq` order.
    ready: Vec<Option<i64>>,
}

/// The batch played in memory: each run's commit, and the rows to write.
struct Plan<'r> {
    commits: Vec<Commit>,
    keys: HashMap<&'r str, Key>,
    entities: HashMap<EntityRef<'r>, Option<Locked>>,
    values: HashMap<AttributeRef<'r>, String>,
    first_tx: i64,
    next_tx: i64,
    first_ready: i64,
    next_ready: i64,
    applied: Vec<Applied<'r>>,
    /// Entities the batch creates, in order, with the `tx` that created them.
    created: Vec<(EntityRef<'r>, i64)>,
    /// Existing entities whose version the batch changes, in order.
    changed: Vec<EntityRef<'r>>,
    changed_set: HashSet<EntityRef<'r>>,
    history: Vec<History<'r>>,
    /// Attributes the batch writes, in order, with the `tx` of the last write.
    written: Vec<AttributeRef<'r>>,
    last_write: HashMap<AttributeRef<'r>, i64>,
}

impl<'r> Plan<'r> {
    fn make(
        runs: &'r [NewRun],
        free: &HashSet<String>,
        taken: HashMap<String, RunRecord>,
        state: State<'r>,
        now: Millis,
    ) -> Result<Plan<'r>, StoreError> {
        let mut keys: HashMap<&'r str, Key> = HashMap::with_capacity(runs.len());
        let mut taken = taken;
        for run in runs {
            let key = run.key.as_str();
            if keys.contains_key(key) {
                continue;
            }
            let state = match taken.remove(key) {
                Some(record) => Key::Taken(record),
                None if free.contains(key) => Key::Free,
                None => {
                    return Err(corrupt(
                        format!("effect run `{key}`"),
                        "neither claimed nor recorded",
                    ));
                }
            };
            keys.insert(key, state);
        }
        let mut plan = Plan {
            commits: Vec::with_capacity(runs.len()),
            keys,
            entities: state.entities,
            values: state.values,
            first_tx: state.tx + 1,
            next_tx: state.tx + 1,
            first_ready: state.ready + 1,
            next_ready: state.ready + 1,
            applied: Vec::new(),
            created: Vec::new(),
            changed: Vec::new(),
            changed_set: HashSet::new(),
            history: Vec::new(),
            written: Vec::new(),
            last_write: HashMap::new(),
        };
        for run in runs {
            let commit = plan.run(run, now)?;
            plan.commits.push(commit);
        }
        Ok(plan)
    }

    /// An entity as it stands now; every entity a claimed run touches was locked.
    fn locked(&self, identity: &str, value: &str) -> Result<Option<Locked>, StoreError> {
        self.entities
            .get(&(identity, value))
            .copied()
            .ok_or_else(|| {
                corrupt(
                    format!("entity `{identity}` {value}"),
                    "used before it was locked",
                )
            })
    }

    fn run(&mut self, run: &'r NewRun, now: Millis) -> Result<Commit, StoreError> {
        let key = run.key.as_str();
        if let Some(Key::Taken(record)) = self.keys.get(key) {
            return Ok(Commit::Existing(record.clone()));
        }
        if let Some(conflict) = self.check_reads(run)? {
            return Ok(Commit::Conflict(conflict));
        }
        let txid = self.next_tx;
        self.next_tx += 1;
        let has_requests = run.outbox.iter().any(|r| r.kind == OutboxKind::Request);
        let status = if has_requests {
            RunStatus::RequestsPending
        } else if !run.outbox.is_empty() {
            RunStatus::MessagesPending
        } else {
            RunStatus::Done
        };
        for datom in &run.datoms {
            self.apply_datom(txid, datom)?;
        }
        // Ready rows get an order: requests always, messages only when the run has no
        // requests (otherwise they wait for `finish_requests`).
        let ready = run
            .outbox
            .iter()
            .map(|row| {
                (!has_requests || row.kind == OutboxKind::Request).then(|| {
                    self.next_ready += 1;
                    self.next_ready - 1
                })
            })
            .collect();
        self.applied.push(Applied {
            run,
            tx: txid,
            status,
            ready,
        });
        let record = RunRecord {
            key: run.key.clone(),
            effects_sha256: run.effects_sha256.clone(),
            tx: Tx(txid),
            status,
            after_requests: run.after_requests.clone(),
            outbox_count: u32::try_from(run.outbox.len()).unwrap_or(u32::MAX),
            created_at: now,
            updated_at: now,
            completed_at: (status == RunStatus::Done).then_some(now),
        };
        self.keys.insert(key, Key::Taken(record));
        Ok(Commit::Applied {
            tx: Tx(txid),
            status,
            claimed: Vec::new(),
            published_inline: 0,
        })
    }

    /// Read validation, against the state the runs before this one left: the first read whose
    /// entity changed since, or the first expected value of a compare-and-set datom that does
    /// not hold.
    fn check_reads(&self, run: &NewRun) -> Result<Option<Conflict>, StoreError> {
        for read in &run.reads {
            let found = self
                .locked(&read.entity.attribute, &read.identity_value)?
                .map(|l| Tx(l.version));
            if let Some(conflict) = Conflict::of_read(read, found) {
                return Ok(Some(conflict));
            }
        }
        for (index, datom) in run.datoms.iter().enumerate() {
            if datom.expected.is_empty() {
                continue;
            }
            let entity = self.locked(&datom.identity, &datom.identity_value)?;
            for (attribute, expected) in &datom.expected {
                let current = entity.and_then(|_| {
                    self.values.get(&(
                        datom.identity.as_str(),
                        datom.identity_value.as_str(),
                        attribute.as_str(),
                    ))
                });
                if let Some(conflict) = Conflict::of_expectation(
                    index,
                    datom,
                    attribute,
                    expected,
                    current.map(String::as_str),
                )? {
                    return Ok(Some(conflict));
                }
            }
        }
        Ok(None)
    }

    fn apply_datom(&mut self, txid: i64, datom: &'r NewDatom) -> Result<(), StoreError> {
        let entity: EntityRef<'r> = (&datom.identity, &datom.identity_value);
        let is_new = match self.locked(entity.0, entity.1)? {
            Some(_) => false,
            // Nothing to retract, and no entity to create.
            None if datom.op == Op::Retract => return Ok(()),
            None => {
                self.entities.insert(
                    entity,
                    Some(Locked {
                        id: None,
                        version: txid,
                    }),
                );
                self.created.push((entity, txid));
                true
            }
        };
        // The values as the datom finds them, before any of its writes (an entity it creates
        // has none).
        let current: Vec<Option<String>> = datom
            .attributes
            .iter()
            .map(|(a, _)| {
                if is_new {
                    None
                } else {
                    self.values.get(&(entity.0, entity.1, a.as_str())).cloned()
                }
            })
            .collect();
        let mut changed = false;
        for ((attribute, value), current) in datom.attributes.iter().zip(current) {
            let slot: AttributeRef<'r> = (entity.0, entity.1, attribute);
            let history = |value: String, added: bool| History {
                tx: txid,
                entity,
                attribute,
                value,
                added,
            };
            match datom.op {
                Op::Assert if current.as_ref() == Some(value) => continue,
                Op::Assert => {
                    if let Some(old) = current {
                        self.history.push(history(old, false));
                    }
                    self.history.push(history(value.clone(), true));
                    self.values.insert(slot, value.clone());
                }
                Op::Retract if current.as_ref() == Some(value) => {
                    self.history.push(history(value.clone(), false));
                    self.values.remove(&slot);
                }
                Op::Retract => continue,
            }
            changed = true;
            if self.last_write.insert(slot, txid).is_none() {
                self.written.push(slot);
            }
        }
        if changed && !is_new {
            if let Some(Some(locked)) = self.entities.get_mut(&entity) {
                if locked.id.is_some() && self.changed_set.insert(entity) {
                    self.changed.push(entity);
                }
                locked.version = txid;
            }
        }
        Ok(())
    }

    /// Writes the plan: one pipeline, run by the server in this order.
    async fn write(&self, tx: &Transaction<'_>, now: Millis) -> Result<(), StoreError> {
        // Claims of keys no run was applied under are withdrawn.
        let refused: Vec<&str> = self
            .keys
            .iter()
            .filter(|(_, state)| matches!(state, Key::Free))
            .map(|(key, _)| *key)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut counters: (Vec<&str>, Vec<i64>) = (Vec::new(), Vec::new());
        if self.next_tx > self.first_tx {
            counters.0.push("tx");
            counters.1.push(self.next_tx - self.first_tx);
        }
        if self.next_ready > self.first_ready {
            counters.0.push("outbox_ready");
            counters.1.push(self.next_ready - self.first_ready);
        }

        let mut runs = RunColumns::default();
        let mut outbox = OutboxColumns::default();
        for applied in &self.applied {
            let run = applied.run;
            runs.key.push(run.key.as_str());
            runs.sha.push(run.effects_sha256.as_str());
            runs.tx.push(applied.tx);
            runs.status.push(applied.status.as_str());
            runs.after_requests.push(run.after_requests.as_deref());
            runs.outbox_count
                .push(i64::try_from(run.outbox.len()).unwrap_or(i64::MAX));
            for (row, ready) in run.outbox.iter().zip(&applied.ready) {
                outbox.id.push(crate::store::outbox_id(&run.key, row.seq));
                outbox.run_key.push(run.key.as_str());
                outbox.seq.push(i64::from(row.seq));
                outbox.kind.push(row.kind.as_str());
                outbox.destination.push(row.destination.as_str());
                outbox.partition_key.push(row.partition_key.as_deref());
                outbox.headers.push(headers_json(&row.headers));
                outbox.payload.push(row.payload.as_str());
                outbox.tx.push(applied.tx);
                outbox.ready.push(*ready);
            }
        }

        let mut created = EntityColumns::default();
        for ((identity, value), created_tx) in &self.created {
            let version = self.version(identity, value)?;
            created.identity.push(*identity);
            created.value.push(*value);
            created.created.push(*created_tx);
            created.updated.push(version);
        }
        let (mut changed_ids, mut changed_versions) = (Vec::new(), Vec::new());
        for entity in &self.changed {
            if let Some(Some(Locked {
                id: Some(id),
                version,
            })) = self.entities.get(entity)
            {
                changed_ids.push(*id);
                changed_versions.push(*version);
            }
        }

        let mut history = HistoryColumns::default();
        for h in &self.history {
            history.tx.push(h.tx);
            history.identity.push(h.entity.0);
            history.value_of.push(h.entity.1);
            history.attribute.push(h.attribute);
            history.value.push(h.value.as_str());
            history.added.push(h.added);
        }

        let mut set = SetColumns::default();
        let (mut removed_ids, mut removed_names) = (Vec::new(), Vec::new());
        for slot in &self.written {
            let last = self.last_write.get(slot).copied().unwrap_or_default();
            match self.values.get(slot) {
                Some(value) => {
                    set.identity.push(slot.0);
                    set.value_of.push(slot.1);
                    set.attribute.push(slot.2);
                    set.value.push(value.as_str());
                    set.tx.push(last);
                }
                None => {
                    // Removed: only an entity that existed before the batch can hold a row.
                    if let Some(Some(Locked { id: Some(id), .. })) =
                        self.entities.get(&(slot.0, slot.1))
                    {
                        removed_ids.push(*id);
                        removed_names.push(slot.2);
                    }
                }
            }
        }

        let mut steps: Vec<Step<'_>> = Vec::new();
        if !refused.is_empty() {
            steps.push(Step {
                sql: "DELETE FROM effect_runs WHERE key = ANY($1)",
                params: vec![&refused],
                rows: Some(refused.len()),
            });
        }
        if !counters.0.is_empty() {
            steps.push(Step {
                sql: "UPDATE sequences s SET value = s.value + u.taken \
                      FROM unnest($1::text[], $2::bigint[]) AS u(name, taken) \
                      WHERE s.name = u.name",
                params: vec![&counters.0, &counters.1],
                rows: Some(counters.0.len()),
            });
        }
        if !runs.key.is_empty() {
            steps.push(Step {
                sql: "INSERT INTO transactions (tx, run_key, committed_at_ms) \
                      SELECT u.tx, u.run_key, $3::bigint FROM unnest($1::bigint[], $2::text[]) \
                      WITH ORDINALITY AS u(tx, run_key, n) ORDER BY u.n",
                params: vec![&runs.tx, &runs.key, &now],
                rows: Some(runs.key.len()),
            });
        }
        if !created.identity.is_empty() {
            steps.push(Step {
                sql: "INSERT INTO entities (identity, identity_value, created_tx, updated_tx) \
                      SELECT u.identity, u.identity_value, u.created_tx, u.updated_tx \
                      FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
                      WITH ORDINALITY AS u(identity, identity_value, created_tx, updated_tx, n) \
                      ORDER BY u.n",
                params: vec![
                    &created.identity,
                    &created.value,
                    &created.created,
                    &created.updated,
                ],
                rows: Some(created.identity.len()),
            });
        }
        if !changed_ids.is_empty() {
            steps.push(Step {
                sql: "UPDATE entities e SET updated_tx = u.updated_tx \
                      FROM unnest($1::bigint[], $2::bigint[]) AS u(id, updated_tx) \
                      WHERE e.id = u.id",
                params: vec![&changed_ids, &changed_versions],
                rows: Some(changed_ids.len()),
            });
        }
        if !history.tx.is_empty() {
            // After the new entities (the server runs the pipeline in order); ids in order.
            steps.push(Step {
                sql: "INSERT INTO datoms (tx, entity_id, attribute, value, added) \
                      SELECT u.tx, e.id, u.attribute, u.value, u.added \
                      FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
                                  $6::bool[]) \
                      WITH ORDINALITY AS u(tx, identity, identity_value, attribute, value, \
                                           added, n) \
                      JOIN entities e ON e.identity = u.identity \
                                     AND e.identity_value = u.identity_value \
                      ORDER BY u.n",
                params: vec![
                    &history.tx,
                    &history.identity,
                    &history.value_of,
                    &history.attribute,
                    &history.value,
                    &history.added,
                ],
                rows: Some(history.tx.len()),
            });
        }
        if !set.identity.is_empty() {
            steps.push(Step {
                sql: "INSERT INTO entity_attributes (entity_id, attribute, value, tx) \
                      SELECT e.id, u.attribute, u.value, u.tx \
                      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) \
                      AS u(identity, identity_value, attribute, value, tx), entities e \
                      WHERE e.identity = u.identity AND e.identity_value = u.identity_value \
                      ON CONFLICT (entity_id, attribute) \
                      DO UPDATE SET value = excluded.value, tx = excluded.tx",
                params: vec![
                    &set.identity,
                    &set.value_of,
                    &set.attribute,
                    &set.value,
                    &set.tx,
                ],
                rows: Some(set.identity.len()),
            });
        }
        if !removed_ids.is_empty() {
            steps.push(Step {
                sql: "DELETE FROM entity_attributes a \
                      USING unnest($1::bigint[], $2::text[]) AS u(entity_id, attribute) \
                      WHERE a.entity_id = u.entity_id AND a.attribute = u.attribute",
                params: vec![&removed_ids, &removed_names],
                rows: None,
            });
        }
        if !runs.key.is_empty() {
            steps.push(Step {
                sql: "UPDATE effect_runs r SET effects_sha256 = u.sha, tx = u.tx, \
                      status = u.status, after_requests = u.after_requests, \
                      outbox_count = u.outbox_count, created_at_ms = $7::bigint, updated_at_ms = $7::bigint, \
                      completed_at_ms = CASE WHEN u.status = 'done' THEN $7::bigint END \
                      FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], \
                                  $6::bigint[]) \
                      AS u(key, sha, tx, status, after_requests, outbox_count) \
                      WHERE r.key = u.key",
                params: vec![
                    &runs.key,
                    &runs.sha,
                    &runs.tx,
                    &runs.status,
                    &runs.after_requests,
                    &runs.outbox_count,
                    &now,
                ],
                rows: Some(runs.key.len()),
            });
        }
        if !outbox.id.is_empty() {
            steps.push(Step {
                sql: "INSERT INTO outbox (id, run_key, seq, kind, destination, partition_key, \
                      headers, payload, tx, ready_seq, next_attempt_at_ms, created_at_ms) \
                      SELECT u.id, u.run_key, u.seq, u.kind, u.destination, u.partition_key, \
                      u.headers, u.payload, u.tx, u.ready_seq, $11::bigint, $11::bigint \
                      FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], \
                                  $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[]) \
                      WITH ORDINALITY AS u(id, run_key, seq, kind, destination, partition_key, \
                                           headers, payload, tx, ready_seq, n) \
                      ORDER BY u.n",
                params: vec![
                    &outbox.id,
                    &outbox.run_key,
                    &outbox.seq,
                    &outbox.kind,
                    &outbox.destination,
                    &outbox.partition_key,
                    &outbox.headers,
                    &outbox.payload,
                    &outbox.tx,
                    &outbox.ready,
                    &now,
                ],
                rows: Some(outbox.id.len()),
            });
        }
        pipeline(tx, &steps).await
    }

    /// An entity's version at the end of the batch.
    fn version(&self, identity: &str, value: &str) -> Result<i64, StoreError> {
        self.locked(identity, value)?
            .map(|l| l.version)
            .ok_or_else(|| corrupt(format!("entity `{identity}` {value}"), "lost while planned"))
    }
}

/// One statement of a pipeline: its text, its parameters, and how many rows it must change
/// (`None`: any number).
struct Step<'a> {
    sql: &'static str,
    params: Vec<&'a (dyn ToSql + Sync)>,
    rows: Option<usize>,
}

/// Runs `steps` in one round trip: prepared first, then sent together in order (each goes out
/// when first polled), and run by the server in that order. A statement changing another
/// number of rows than its step says is an error: nothing of the transaction is committed.
async fn pipeline(tx: &Transaction<'_>, steps: &[Step<'_>]) -> Result<(), StoreError> {
    let sqls: Vec<&str> = steps.iter().map(|s| s.sql).collect();
    let statements = prepare_all(tx, OP, &sqls).await?;
    let changed = pipeline::all(
        steps
            .iter()
            .zip(&statements)
            .map(|(step, statement)| tx.execute(statement, &step.params)),
    )
    .await
    .map_err(db_error(OP))?;
    for (step, changed) in steps.iter().zip(changed) {
        if let Some(rows) = step.rows {
            if usize::try_from(changed).ok() != Some(rows) {
                return Err(corrupt(
                    "a batch commit",
                    format!(
                        "`{}` changed {changed} rows instead of {rows}",
                        step.sql
                            .split_whitespace()
                            .take(3)
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[derive(Default)]
struct RunColumns<'r> {
    key: Vec<&'r str>,
    sha: Vec<&'r str>,
    tx: Vec<i64>,
    status: Vec<&'static str>,
    after_requests: Vec<Option<&'r str>>,
    outbox_count: Vec<i64>,
}

#[derive(Default)]
struct OutboxColumns<'r> {
    id: Vec<String>,
    run_key: Vec<&'r str>,
    seq: Vec<i64>,
    kind: Vec<&'static str>,
    destination: Vec<&'r str>,
    partition_key: Vec<Option<&'r str>>,
    headers: Vec<String>,
    payload: Vec<&'r str>,
    tx: Vec<i64>,
    ready: Vec<Option<i64>>,
}

#[derive(Default)]
struct EntityColumns<'r> {
    identity: Vec<&'r str>,
    value: Vec<&'r str>,
    created: Vec<i64>,
    updated: Vec<i64>,
}

#[derive(Default)]
struct HistoryColumns<'r> {
    tx: Vec<i64>,
    identity: Vec<&'r str>,
    value_of: Vec<&'r str>,
    attribute: Vec<&'r str>,
    value: Vec<&'r str>,
    added: Vec<bool>,
}

#[derive(Default)]
struct SetColumns<'r> {
    identity: Vec<&'r str>,
    value_of: Vec<&'r str>,
    attribute: Vec<&'r str>,
    value: Vec<&'r str>,
    tx: Vec<i64>,
}
