//! The executor against hand-written rusqlite transactions doing the same writes, in one
//! process, on the same disk, in alternating rounds:
//!
//! - **hand-written**: one `BEGIN IMMEDIATE` transaction per run that claims the key
//!   (`INSERT .. ON CONFLICT DO NOTHING`), allocates a `tx`, upserts the entity, its attribute and
//!   a history row, writes the outbox row and appends the message to the log — the writes the
//!   executor makes for one datom and one message on the embedded default — with cached
//!   statements and no checks.
//! - **executor**: `Executor::run(key, effects)` with 1 datom + 1 message per run (validation,
//!   canonical JSON, SHA-256 of the effects, the same writes plus the reads its checks need).
//! - **executor batched**: `Executor::run_batch` with `BATCH` runs per transaction.
//! - **hand-written with a version check**: the same, on an entity that exists, first checking
//!   in the transaction that the entity's version (`entities.updated_tx`) is still the one read,
//!   then writing what the executor writes for a changed value: the retraction and assertion in
//!   the history, the attribute, the entity's new version, the outbox row and the log message.
//! - **executor with reads**: `Executor::run_with(key, effects, RunOptions::reading([..]))` on the
//!   same kind of entity: read validation in the commit.
//!
//! And the hot-account workload: transfers that all debit one account, through a [`Worker`]
//! whose loader reads both accounts through the tracked store, at concurrency 8 (runs conflict,
//! and are computed again) next to concurrency 1 (nothing to conflict with), alternating.
//!
//! Run: `cargo bench -p effects-core --bench executor` (add `-- quick` for a smoke run).
//! It prints runs/s per mode and synchronous setting, the executor / hand-written ratios (target
//! ≥ 0.8) with their spread over the rounds, the batching speedup, and the hot-account table.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use effects_core::executor::{BatchItem, Executor, RunOptions};
use effects_core::store::{
    ReadVersion, SqliteOptions, SqliteStore, Store, Synchronous, Tracked, Tx,
};
use effects_core::transport::{OutgoingMessage, Transport};
use effects_core::worker::{LoadError, LoadWith, Processed, Worker, WorkerConfig};
use effects_core::{Datom, DatomEffect, Effects, LookupRef, Message, MessageEffect};
use effects_core::{effect_handler, effects};
use rusqlite::{Connection, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use serde_json::json;

const BATCH: usize = 100;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("effects-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir.join("bench.db")
}

fn effects(i: usize) -> Effects {
    let id = format!("c{i}");
    Effects::from(DatomEffect::assert(
        LookupRef::new("card/id", id.clone()),
        [("card/balance", json!(i))],
    ))
    .merge(MessageEffect::new("card-balance", json!({"card_id": id, "balance": i})).with_key(id))
}

/// Creates the schema through the store (same tables and indexes), then closes it.
fn prepared_db(name: &str, sync: Synchronous) -> (PathBuf, SqliteOptions) {
    let path = scratch(name);
    let options = SqliteOptions {
        synchronous: sync,
        ..SqliteOptions::default()
    };
    drop(SqliteStore::open_with(&path, &options).expect("open the store"));
    (path, options)
}

/// A raw connection configured like the store's writer.
fn raw_connection(path: &Path, sync: Synchronous) -> Connection {
    let conn = Connection::open(path).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        },
    )
    .expect("synchronous");
    conn.pragma_update(None, "foreign_keys", "ON").expect("fk");
    conn.set_prepared_statement_cache_capacity(64);
    conn
}

/// Runs `from..to` by hand, one transaction each.
fn hand_written(conn: &mut Connection, from: usize, to: usize) -> Duration {
    let started = Instant::now();
    for i in from..to {
        let key = format!("hand:{i}");
        let id = format!("c{i}");
        let identity_value = serde_json::to_string(&json!(id)).expect("json");
        let value = serde_json::to_string(&json!(i)).expect("json");
        let payload = serde_json::to_string(&json!({"balance": i, "card_id": id})).expect("json");
        let now = 1_700_000_000_000_i64 + i as i64;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .expect("begin");
        tx.prepare_cached("INSERT INTO transactions (run_key, committed_at_ms) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![key, now]))
            .expect("tx");
        let txid = tx.last_insert_rowid();
        let claimed = tx
            .prepare_cached(
                "INSERT INTO effect_runs (key, effects_sha256, tx, status, outbox_count, \
                 created_at_ms, updated_at_ms, completed_at_ms) VALUES (?1, 'x', ?2, 'done', 1, ?3, ?3, ?3) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![key, txid, now]))
            .expect("claim");
        assert_eq!(claimed, 1);
        let entity: i64 = tx
            .prepare_cached(
                "INSERT INTO entities (identity, identity_value, created_tx, updated_tx) \
                 VALUES ('card/id', ?1, ?2, ?2) ON CONFLICT (identity, identity_value) \
                 DO UPDATE SET updated_tx = excluded.updated_tx RETURNING id",
            )
            .and_then(|mut s| s.query_row(params![identity_value, txid], |r| r.get(0)))
            .expect("entity");
        tx.prepare_cached(
            "INSERT INTO entity_attributes (entity_id, attribute, value, tx) \
             VALUES (?1, 'card/balance', ?2, ?3) ON CONFLICT (entity_id, attribute) \
             DO UPDATE SET value = excluded.value, tx = excluded.tx",
        )
        .and_then(|mut s| s.execute(params![entity, value, txid]))
        .expect("attribute");
        tx.prepare_cached(
            "INSERT INTO datoms (tx, entity_id, attribute, value, added) \
             VALUES (?1, ?2, 'card/balance', ?3, 1)",
        )
        .and_then(|mut s| s.execute(params![txid, entity, value]))
        .expect("datom");
        let message_id = format!("{key}#0");
        tx.prepare_cached(
            "INSERT INTO outbox (id, run_key, seq, kind, destination, partition_key, headers, \
             payload, tx, next_attempt_at_ms, created_at_ms, dispatched_at_ms) \
             VALUES (?1, ?2, 0, 'message', 'card-balance', ?3, '{}', ?4, ?5, ?6, ?6, ?6)",
        )
        .and_then(|mut s| s.execute(params![message_id, key, id, payload, txid, now]))
        .expect("outbox");
        let headers = format!(r#"{{"effects-key":"{key}","effects-tx":"{txid}"}}"#);
        tx.prepare_cached(
            "INSERT INTO log_messages (topic, message_id, partition_key, headers, payload, \
             published_at_ms) VALUES ('card-balance', ?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (topic, message_id) DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![message_id, id, headers, payload.as_bytes(), now]))
        .expect("log");
        tx.commit().expect("commit");
    }
    started.elapsed()
}

type Exec = Executor<SqliteStore, effects_core::transport::SqliteLog>;

/// Runs `from..to` through the executor, one run (`batch = None`) or `batch` runs per commit.
fn executor_runs(
    runtime: &tokio::runtime::Runtime,
    executor: &Exec,
    from: usize,
    to: usize,
    batch: Option<usize>,
) -> Duration {
    runtime.block_on(async {
        let started = Instant::now();
        match batch {
            None => {
                for i in from..to {
                    let outcome = executor
                        .run(format!("exec:{i}"), effects(i))
                        .await
                        .expect("run");
                    assert!(!outcome.is_duplicate());
                }
            }
            Some(size) => {
                for chunk in (from..to).collect::<Vec<_>>().chunks(size) {
                    let items = chunk
                        .iter()
                        .map(|&i| BatchItem::new(format!("batch:{i}"), effects(i)))
                        .collect();
                    let results = executor.run_batch(items).await.expect("batch");
                    assert!(
                        results
                            .iter()
                            .all(|r| matches!(r, Ok(o) if !o.is_duplicate()))
                    );
                }
            }
        }
        started.elapsed()
    })
}

// ---------------------------------------------------------------------------------------------
// Read validation: runs on entities that exist, carrying the version read.

fn account(i: usize) -> LookupRef {
    LookupRef::new("account/id", format!("a{i}"))
}

/// Run `i` of the read modes: the balance of `a{i}` goes from `i` to `i + 1`, and a message.
fn account_effects(i: usize) -> Effects {
    Effects::from(DatomEffect::assert(
        account(i),
        [("account/balance", json!(i + 1))],
    ))
    .merge(
        MessageEffect::new(
            "account-balance",
            json!({"account_id": format!("a{i}"), "balance": i + 1}),
        )
        .with_key(format!("a{i}")),
    )
}

/// Creates `a0..a{n}` (balance `i`) in the database at `path` through the store, 100 per
/// transaction, and returns the version of each: what a reader would have seen.
fn seed_accounts(
    runtime: &tokio::runtime::Runtime,
    path: &Path,
    options: &SqliteOptions,
    n: usize,
) -> Vec<Tx> {
    let store = SqliteStore::open_with(path, options).expect("open");
    let executor = Executor::builder(store.clone(), store.log()).build();
    runtime.block_on(async {
        let mut versions = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(BATCH) {
            let items = chunk
                .iter()
                .map(|&i| {
                    BatchItem::new(
                        format!("seed:{i}"),
                        Effects::from(DatomEffect::assert(
                            account(i),
                            [("account/balance", json!(i))],
                        )),
                    )
                })
                .collect();
            for result in executor.run_batch(items).await.expect("seed") {
                versions.push(result.expect("seed run").tx());
            }
        }
        versions
    })
}

/// Runs `from..to` by hand on existing entities, one transaction each, checking first that each
/// entity is still at the version read.
fn hand_checked(conn: &mut Connection, versions: &[Tx], from: usize, to: usize) -> Duration {
    let started = Instant::now();
    for (i, read) in versions.iter().enumerate().take(to).skip(from) {
        let key = format!("hand-check:{i}");
        let id = format!("a{i}");
        let identity_value = serde_json::to_string(&json!(id)).expect("json");
        let value = serde_json::to_string(&json!(i + 1)).expect("json");
        let payload =
            serde_json::to_string(&json!({"account_id": id, "balance": i + 1})).expect("json");
        let now = 1_700_000_000_000_i64 + i as i64;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .expect("begin");
        let (entity, version): (i64, i64) = tx
            .prepare_cached(
                "SELECT id, updated_tx FROM entities WHERE identity = 'account/id' \
                 AND identity_value = ?1",
            )
            .and_then(|mut s| s.query_row(params![identity_value], |r| Ok((r.get(0)?, r.get(1)?))))
            .expect("version");
        assert_eq!(version, read.0, "the entity changed since it was read");
        tx.prepare_cached("INSERT INTO transactions (run_key, committed_at_ms) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![key, now]))
            .expect("tx");
        let txid = tx.last_insert_rowid();
        let claimed = tx
            .prepare_cached(
                "INSERT INTO effect_runs (key, effects_sha256, tx, status, outbox_count, \
                 created_at_ms, updated_at_ms, completed_at_ms) VALUES (?1, 'x', ?2, 'done', 1, ?3, ?3, ?3) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![key, txid, now]))
            .expect("claim");
        assert_eq!(claimed, 1);
        let old: String = tx
            .prepare_cached(
                "SELECT value FROM entity_attributes WHERE entity_id = ?1 \
                 AND attribute = 'account/balance'",
            )
            .and_then(|mut s| s.query_row(params![entity], |r| r.get(0)))
            .expect("current value");
        for (v, added) in [(&old, false), (&value, true)] {
            tx.prepare_cached(
                "INSERT INTO datoms (tx, entity_id, attribute, value, added) \
                 VALUES (?1, ?2, 'account/balance', ?3, ?4)",
            )
            .and_then(|mut s| s.execute(params![txid, entity, v, added]))
            .expect("datom");
        }
        tx.prepare_cached(
            "UPDATE entity_attributes SET value = ?1, tx = ?2 \
             WHERE entity_id = ?3 AND attribute = 'account/balance'",
        )
        .and_then(|mut s| s.execute(params![value, txid, entity]))
        .expect("attribute");
        tx.prepare_cached("UPDATE entities SET updated_tx = ?1 WHERE id = ?2")
            .and_then(|mut s| s.execute(params![txid, entity]))
            .expect("version");
        let message_id = format!("{key}#0");
        tx.prepare_cached(
            "INSERT INTO outbox (id, run_key, seq, kind, destination, partition_key, headers, \
             payload, tx, next_attempt_at_ms, created_at_ms, dispatched_at_ms) \
             VALUES (?1, ?2, 0, 'message', 'account-balance', ?3, '{}', ?4, ?5, ?6, ?6, ?6)",
        )
        .and_then(|mut s| s.execute(params![message_id, key, id, payload, txid, now]))
        .expect("outbox");
        let headers = format!(r#"{{"effects-key":"{key}","effects-tx":"{txid}"}}"#);
        tx.prepare_cached(
            "INSERT INTO log_messages (topic, message_id, partition_key, headers, payload, \
             published_at_ms) VALUES ('account-balance', ?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (topic, message_id) DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![message_id, id, headers, payload.as_bytes(), now]))
        .expect("log");
        tx.commit().expect("commit");
    }
    started.elapsed()
}

/// Runs `from..to` through the executor on existing entities, each run carrying the version of
/// its entity as read.
fn executor_reads(
    runtime: &tokio::runtime::Runtime,
    executor: &Exec,
    versions: &[Tx],
    from: usize,
    to: usize,
) -> Duration {
    runtime.block_on(async {
        let started = Instant::now();
        for (i, version) in versions.iter().enumerate().take(to).skip(from) {
            let read = ReadVersion {
                entity: account(i),
                tx: Some(*version),
            };
            let outcome = executor
                .run_with(
                    format!("exec-reads:{i}"),
                    account_effects(i),
                    RunOptions::reading([read]),
                )
                .await
                .expect("run");
            assert!(!outcome.is_duplicate());
        }
        started.elapsed()
    })
}

// ---------------------------------------------------------------------------------------------
// The hot account: every transfer debits `hot`, through a worker that loads both accounts.

/// An account as loaded.
#[derive(Deserialize)]
struct Account {
    id: String,
    balance: i64,
}

/// A transfer from `hot`.
#[derive(Deserialize, Serialize)]
struct Payment {
    id: String,
    to: String,
    amount: i64,
}

/// The payer's new balance.
#[derive(Datom)]
#[datom(entity = "account")]
struct Debit {
    #[datom(id)]
    id: String,
    balance: i64,
}

/// The payee's new balance.
#[derive(Datom)]
#[datom(entity = "account")]
struct Credit {
    #[datom(id)]
    id: String,
    balance: i64,
}

/// Published once the money moved.
#[derive(Serialize, Message)]
#[message(topic = "paid")]
struct Paid {
    #[message(key)]
    payment_id: String,
    amount: i64,
}

effects! {
    /// Money moved: absolute balances, computed from the accounts as loaded.
    Pay {
        datoms:   [one Debit, one Credit],
        messages: [one Paid],
    }
}

#[effect_handler(topic = "payments", key = payment.id)]
fn pay(payment: &Payment, payer: &Account, payee: &Account) -> effects![Pay] {
    Pay::builder()
        .debit(Debit {
            id: payer.id.clone(),
            balance: payer.balance - payment.amount,
        })
        .credit(Credit {
            id: payee.id.clone(),
            balance: payee.balance + payment.amount,
        })
        .paid(Paid {
            payment_id: payment.id.clone(),
            amount: payment.amount,
        })
        .build()
        .into()
}

async fn load_account<S: Store>(store: &Tracked<S>, id: &str) -> Result<Account, LoadError> {
    let lookup = LookupRef::new("account/id", id);
    let entity = store
        .entity(&lookup, None)
        .await?
        .ok_or_else(|| LoadError::NotFound {
            what: lookup.to_string(),
        })?;
    entity.decode().map_err(|e| LoadError::Invalid {
        reason: e.to_string(),
    })
}

async fn load_pay(payment: Payment, store: Tracked<SqliteStore>) -> Result<PayInput, LoadError> {
    let payer = load_account(&store, "hot").await?;
    let payee = load_account(&store, &payment.to).await?;
    Ok(PayInput {
        payment,
        payer,
        payee,
    })
}

const HOT_PAYEES: usize = 64;

/// One hot-account round.
struct HotRound {
    elapsed: Duration,
    applied: u64,
    reruns: u64,
}

/// `n` transfers from `hot` to 64 payees through one worker at `concurrency`, on a fresh
/// database (default options: `synchronous = FULL`). Timed from the worker's start until it has
/// applied every transfer; the balances are checked afterwards.
fn hot_round(
    runtime: &tokio::runtime::Runtime,
    name: &str,
    n: usize,
    concurrency: usize,
) -> HotRound {
    let path = scratch(name);
    let store = SqliteStore::open(&path).expect("open");
    let executor = Arc::new(Executor::builder(store.clone(), store.log()).build());
    let amount = |i: usize| 1 + (i % 50) as i64;
    let opening: i64 = (0..n).map(amount).sum::<i64>() + 1_000;
    runtime.block_on(async {
        let seed = (0..HOT_PAYEES).fold(
            Effects::from(DatomEffect::assert(
                LookupRef::new("account/id", "hot"),
                [("account/balance", json!(opening))],
            )),
            |e, p| {
                e.merge(DatomEffect::assert(
                    LookupRef::new("account/id", format!("b{p}")),
                    [("account/balance", json!(0))],
                ))
            },
        );
        executor.run("seed", seed).await.expect("seed");
        let log = store.log();
        for i in 0..n {
            let payment = Payment {
                id: format!("p{i}"),
                to: format!("b{}", i % HOT_PAYEES),
                amount: amount(i),
            };
            log.publish(OutgoingMessage {
                id: format!("m{i}"),
                topic: "payments".to_owned(),
                partition_key: None,
                headers: Default::default(),
                payload: serde_json::to_vec(&payment).expect("json"),
            })
            .await
            .expect("publish");
        }

        let applied = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(tokio::sync::Notify::new());
        let (counter, finished) = (Arc::clone(&applied), Arc::clone(&done));
        let worker = Worker::new(Arc::clone(&executor), PayHandler)
            .with_config(WorkerConfig {
                concurrency,
                fetch_wait: Duration::from_millis(50),
                relay: None,
                ..WorkerConfig::default()
            })
            .load_with(LoadWith::new(load_pay))
            .on_processed(move |_, processed: &Processed| {
                if matches!(processed, Processed::Applied { .. })
                    && counter.fetch_add(1, Ordering::SeqCst) + 1 == n
                {
                    finished.notify_one();
                }
            });
        let started = Instant::now();
        let stop = async {
            if tokio::time::timeout(Duration::from_secs(300), done.notified())
                .await
                .is_err()
            {
                panic!("the hot-account round `{name}` did not finish in 300 s");
            }
        };
        let report = worker.run(stop).await;
        let elapsed = started.elapsed();
        assert_eq!(report.applied as usize, n, "{report:?}");
        assert_eq!(report.dead_lettered, 0, "{report:?}");
        let hot = store
            .entity(&LookupRef::new("account/id", "hot"), None)
            .await
            .expect("read")
            .expect("hot exists");
        assert_eq!(
            hot.get("account/balance"),
            Some(&json!(1_000)),
            "a lost update: the hot account must end with what it kept"
        );
        HotRound {
            elapsed,
            applied: report.applied,
            reruns: report.reruns,
        }
    })
}

fn hot_account(runtime: &tokio::runtime::Runtime, quick: bool) {
    let (rounds, n) = if quick { (2, 50) } else { (6, 200) };
    println!(
        "\nhot account: {n} transfers from one account to {HOT_PAYEES} payees through one worker \
         (loader reads both accounts, tracked), synchronous = FULL, fresh database per round; \
         {rounds} rounds alternating which concurrency goes first"
    );
    /// Per concurrency: runs/s and re-runs per applied run of each round, and the totals.
    #[derive(Default)]
    struct Variant {
        rates: Vec<f64>,
        reruns_per_run: Vec<f64>,
        applied: u64,
        reruns: u64,
        elapsed: Duration,
    }
    let mut per: [Variant; 2] = Default::default();
    let mut speedups = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 { [8, 1] } else { [1, 8] };
        let mut rates = [0.0; 2];
        for c in order {
            let slot = usize::from(c == 1);
            let r = hot_round(runtime, &format!("hot-{round}-c{c}"), n, c);
            let rate = r.applied as f64 / r.elapsed.as_secs_f64();
            let v = &mut per[slot];
            v.rates.push(rate);
            v.reruns_per_run.push(r.reruns as f64 / r.applied as f64);
            v.applied += r.applied;
            v.reruns += r.reruns;
            v.elapsed += r.elapsed;
            rates[slot] = rate;
        }
        speedups.push(rates[0] / rates[1]);
    }
    println!(
        "| concurrency | runs per variant | runs/s (total) | runs/s median [min–max] | re-runs per applied run (total) | re-runs per applied median [min–max] |"
    );
    println!("|---|---|---|---|---|---|");
    for (slot, c) in [(0, 8), (1, 1)] {
        let v = &per[slot];
        println!(
            "| {c} | {} | {:.0} | {} | {:.2} | {} |",
            v.applied,
            v.applied as f64 / v.elapsed.as_secs_f64(),
            spread(&v.rates, 0),
            v.reruns as f64 / v.applied as f64,
            spread(&v.reruns_per_run, 2),
        );
    }
    println!(
        "concurrency 8 / concurrency 1, runs/s per round: {}",
        spread(&speedups, 2)
    );
}

/// `median [min–max]` with `digits` decimals.
fn spread(xs: &[f64], digits: usize) -> String {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match (v.first(), v.last()) {
        (Some(lo), Some(hi)) => {
            format!("{:.digits$} [{lo:.digits$}–{hi:.digits$}]", v[v.len() / 2])
        }
        _ => "-".to_owned(),
    }
}

/// `--only MODE`: one mode alone, 2 000 runs with `synchronous = NORMAL`, for instruction counts
/// (`valgrind --tool=callgrind`); `baseline` is the set-up alone, to subtract (`seeded` for
/// `hand-check` and `exec-reads`, which first create the entities they update).
fn only(mode: &str) {
    const RUNS: usize = 2_000;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    let (path, options) = prepared_db(&format!("only-{mode}"), Synchronous::Normal);
    let store = SqliteStore::open_with(&path, &options).expect("open");
    let executor = Executor::builder(store.clone(), store.log()).build();
    let mut conn = raw_connection(&path, Synchronous::Normal);
    match mode {
        "baseline" => {}
        "hand" => drop(hand_written(&mut conn, 0, RUNS)),
        "exec" => drop(executor_runs(&runtime, &executor, 0, RUNS, None)),
        "batch" => drop(executor_runs(&runtime, &executor, 0, RUNS, Some(BATCH))),
        "seeded" | "hand-check" | "exec-reads" => {
            // The read modes need entities to update: `seeded` is their set-up alone.
            drop((conn, executor, store));
            let (path, options) = prepared_db(&format!("only-{mode}-seeded"), Synchronous::Normal);
            let versions = seed_accounts(&runtime, &path, &options, RUNS);
            let mut conn = raw_connection(&path, Synchronous::Normal);
            let store = SqliteStore::open_with(&path, &options).expect("open");
            let executor = Executor::builder(store.clone(), store.log()).build();
            match mode {
                "hand-check" => {
                    let _ = hand_checked(&mut conn, &versions, 0, RUNS);
                }
                "exec-reads" => {
                    let _ = executor_reads(&runtime, &executor, &versions, 0, RUNS);
                }
                _ => {}
            }
        }
        other => {
            panic!(
                "unknown mode `{other}`: baseline, hand, exec, batch, seeded, hand-check or exec-reads"
            )
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--only") {
        only(args.get(i + 1).map_or("", String::as_str));
        cleanup();
        return;
    }
    let quick = args.iter().any(|a| a == "quick");
    let rounds = if quick { 2 } else { 10 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    println!(
        "executor vs hand-written rusqlite, 1 datom + 1 message per run; {rounds} rounds, each \
         running one block per mode in turn (so all modes share the machine's noise)"
    );
    let mut validation = Vec::new();
    println!(
        "| synchronous | runs per mode | hand-written runs/s | executor runs/s | ratio (total) | ratio per round, median [min–max] | batched ({BATCH}/tx) runs/s | batch speedup |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (sync, block) in [
        (Synchronous::Full, if quick { 100 } else { 200 }),
        (Synchronous::Normal, if quick { 500 } else { 2_000 }),
    ] {
        let (hand_path, _) = prepared_db(&format!("{sync:?}-hand"), sync);
        let mut hand_conn = raw_connection(&hand_path, sync);
        let (exec_path, options) = prepared_db(&format!("{sync:?}-exec"), sync);
        let exec_store = SqliteStore::open_with(&exec_path, &options).expect("open");
        let exec = Executor::builder(exec_store.clone(), exec_store.log()).build();
        assert!(exec.publishes_inline());
        let (batch_path, options) = prepared_db(&format!("{sync:?}-batch"), sync);
        let batch_store = SqliteStore::open_with(&batch_path, &options).expect("open");
        let batch = Executor::builder(batch_store.clone(), batch_store.log()).build();
        // The read-validation modes work on entities that exist, each read at a known version.
        let (check_path, options) = prepared_db(&format!("{sync:?}-hand-check"), sync);
        let check_versions = seed_accounts(&runtime, &check_path, &options, rounds * block);
        let mut check_conn = raw_connection(&check_path, sync);
        let (reads_path, options) = prepared_db(&format!("{sync:?}-exec-reads"), sync);
        let reads_versions = seed_accounts(&runtime, &reads_path, &options, rounds * block);
        let reads_store = SqliteStore::open_with(&reads_path, &options).expect("open");
        let reads = Executor::builder(reads_store.clone(), reads_store.log()).build();

        let (mut hand_t, mut exec_t, mut batch_t, mut check_t, mut reads_t) = (
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
        );
        let (mut ratios, mut read_ratios) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let (from, to) = (round * block, (round + 1) * block);
            let h = hand_written(&mut hand_conn, from, to);
            let c = hand_checked(&mut check_conn, &check_versions, from, to);
            let e = executor_runs(&runtime, &exec, from, to, None);
            let r = executor_reads(&runtime, &reads, &reads_versions, from, to);
            let b = executor_runs(&runtime, &batch, from, to, Some(BATCH));
            ratios.push(h.as_secs_f64() / e.as_secs_f64());
            read_ratios.push(c.as_secs_f64() / r.as_secs_f64());
            hand_t += h;
            exec_t += e;
            batch_t += b;
            check_t += c;
            reads_t += r;
        }
        let runs = (rounds * block) as f64;
        let rate = |t: Duration| runs / t.as_secs_f64();
        let (h, e, b) = (rate(hand_t), rate(exec_t), rate(batch_t));
        println!(
            "| {sync:?} | {} | {h:.0} | {e:.0} | {:.2}x | {} | {b:.0} | {:.1}x |",
            rounds * block,
            e / h,
            spread(&ratios, 2),
            b / e
        );
        let (c, r) = (rate(check_t), rate(reads_t));
        validation.push(format!(
            "| {sync:?} | {} | {c:.0} | {r:.0} | {:.2}x | {} | {:.2}x |",
            rounds * block,
            r / c,
            spread(&read_ratios, 2),
            r / e,
        ));
    }
    println!(
        "\nwith read validation: each run updates an existing entity and carries the version it \
         was read at (same rounds as above)"
    );
    println!(
        "| synchronous | runs per mode | hand-written with version check runs/s | executor with reads runs/s | ratio (total) | ratio per round, median [min–max] | executor with reads / executor without |"
    );
    println!("|---|---|---|---|---|---|---|");
    for line in validation {
        println!("{line}");
    }
    hot_account(&runtime, quick);
    cleanup();
}

/// Removes the scratch databases of this process.
fn cleanup() {
    let prefix = format!("effects-bench-{}-", std::process::id());
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}
