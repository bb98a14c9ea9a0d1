//! Consistency under concurrency on the embedded default: read validation, compare-and-set
//! datoms, re-runs on conflict, and idempotency keys that cannot collide.
//!
//! Every figure is counted at the source — transactions per key in the store's `transactions`
//! table (one row per committed run, never deduplicated), handler calls, conflicts reported by
//! the worker — and each reliability check is run once more against a deliberately broken
//! executor ([`Mutant`]) to show that it fails without the guarantee.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use effects_core::executor::{Executor, Mutant, RunError, RunOptions, RunOutcome};
use effects_core::relay::RelayConfig;
use effects_core::store::{Conflict, ReadVersion, SqliteStore, Store, Tracked};
use effects_core::transport::{OutgoingMessage, SqliteLog, Transport};
use effects_core::worker::{LoadError, LoadWith, Processed, Worker, WorkerConfig, WorkerReport};
use effects_core::{
    Datom, DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, MessageEffect,
};
use proptest::prelude::*;
use serde::Deserialize;
use serde_json::json;
use support::{eventually, temp_dir};
use tokio::sync::oneshot;

const TOPIC: &str = "transfers";

// ---------------------------------------------------------------------------------------------
// The transfer domain, written by hand: a handler keyed by its transfer id, whose input (both
// accounts) is loaded from the store through the tracked handle.

/// What a message on `transfers` carries.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
struct TransferRequest {
    id: String,
    from: String,
    to: String,
    amount: i64,
}

#[derive(Clone, Debug, Deserialize)]
struct Account {
    id: String,
    balance: i64,
}

/// The handler's input: the request and both accounts as loaded.
#[derive(Clone, Debug, Deserialize)]
struct Transfer {
    id: String,
    from: Account,
    to: Account,
    amount: i64,
}

fn account(id: &str) -> LookupRef {
    LookupRef::new("account/id", id)
}

/// Moves money if the payer can afford it (absolute new balances, computed from what was
/// loaded); records the transfer either way. Counts its calls.
#[derive(Debug, Default)]
struct TransferHandler {
    calls: AtomicUsize,
}

impl Handler for TransferHandler {
    type Input = Transfer;
    type Output = Effects;

    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: "transfer",
        topic: Some(TOPIC),
        key: Some("transfer.id"),
        input: "Transfer",
        schemas: &[],
    };

    fn handle(&self, t: Transfer) -> Effects {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let record = |status: &str| {
            DatomEffect::assert(
                LookupRef::new("transfer/id", t.id.as_str()),
                [
                    ("transfer/status", json!(status)),
                    ("transfer/amount", json!(t.amount)),
                    ("transfer/from", json!(t.from.id)),
                    ("transfer/to", json!(t.to.id)),
                ],
            )
        };
        if t.from.balance < t.amount || t.from.id == t.to.id {
            return Effects::from(record("refused"));
        }
        Effects::from(DatomEffect::assert(
            account(&t.from.id),
            [("account/balance", json!(t.from.balance - t.amount))],
        ))
        .merge(DatomEffect::assert(
            account(&t.to.id),
            [("account/balance", json!(t.to.balance + t.amount))],
        ))
        .merge(record("booked"))
        .merge(MessageEffect::new("transfer-booked", json!({"id": t.id})).with_key(t.from.id))
    }

    fn key(&self, input: &Transfer) -> Option<String> {
        Some(input.id.clone())
    }
}

/// Loads both accounts through the tracked store, then lingers a little, as a service that
/// does more work between its reads and its commit would: concurrent runs overlap.
async fn load_transfer(
    r: TransferRequest,
    store: Tracked<SqliteStore>,
) -> Result<Transfer, LoadError> {
    let load =
        |id: String| {
            let store = store.clone();
            async move {
                let entity = store.entity(&account(&id), None).await?.ok_or_else(|| {
                    LoadError::NotFound {
                        what: format!("account {id}"),
                    }
                })?;
                entity.decode::<Account>().map_err(|e| LoadError::Invalid {
                    reason: format!("account {id}: {e}"),
                })
            }
        };
    let from = load(r.from).await?;
    let to = load(r.to).await?;
    tokio::time::sleep(Duration::from_millis(2)).await;
    Ok(Transfer {
        id: r.id,
        from,
        to,
        amount: r.amount,
    })
}

type TransferWorker<I> =
    Worker<SqliteStore, SqliteLog, effects_core::executor::NoHttp, TransferHandler, I>;

struct Setup {
    store: SqliteStore,
    log: SqliteLog,
    executor: Arc<Executor<SqliteStore, SqliteLog>>,
}

fn setup(db: Option<&Path>, mutant: Option<Mutant>) -> Setup {
    let store = match db {
        Some(path) => SqliteStore::open(path).unwrap(),
        None => SqliteStore::in_memory().unwrap(),
    };
    let log = store.log();
    let mut builder = Executor::builder(store.clone(), log.clone());
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    Setup {
        executor: Arc::new(builder.build()),
        store,
        log,
    }
}

fn worker_config(concurrency: usize) -> WorkerConfig {
    WorkerConfig {
        concurrency,
        fetch_wait: Duration::from_millis(20),
        relay: Some(RelayConfig {
            interval: Duration::from_millis(20),
            ..RelayConfig::default()
        }),
        ..WorkerConfig::default()
    }
}

fn transfer_worker(
    setup: &Setup,
    concurrency: usize,
) -> Arc<TransferWorker<impl effects_core::worker::Inputs<TransferHandler, SqliteStore>>> {
    Arc::new(
        Worker::new(Arc::clone(&setup.executor), TransferHandler::default())
            .with_config(worker_config(concurrency))
            .load_with(LoadWith::new(load_transfer)),
    )
}

async fn seed(setup: &Setup, balances: &[(&str, i64)]) {
    let effects: Effects = balances
        .iter()
        .map(|(id, b)| DatomEffect::assert(account(id), [("account/balance", json!(b))]))
        .collect();
    setup.executor.run("seed", effects).await.unwrap();
}

async fn publish(log: &SqliteLog, message_id: &str, request: &TransferRequest) {
    log.publish(OutgoingMessage {
        id: message_id.to_owned(),
        topic: TOPIC.to_owned(),
        partition_key: None,
        headers: BTreeMap::new(),
        payload: serde_json::to_vec(request).unwrap(),
    })
    .await
    .unwrap();
}

/// Runs `worker` until every message of `transfers` is acknowledged (bounded), then stops it.
async fn drain<I>(
    worker: Arc<TransferWorker<I>>,
    log: &SqliteLog,
    timeout: Duration,
) -> WorkerReport
where
    I: effects_core::worker::Inputs<TransferHandler, SqliteStore>,
{
    drain_topic(worker, log, "transfer", TOPIC, timeout).await
}

/// Runs `worker` until `consumer` has acknowledged every message of `topic` (bounded), then
/// stops it.
async fn drain_topic<H, I>(
    worker: Arc<Worker<SqliteStore, SqliteLog, effects_core::executor::NoHttp, H, I>>,
    log: &SqliteLog,
    consumer: &'static str,
    topic: &'static str,
    timeout: Duration,
) -> WorkerReport
where
    H: Handler,
    I: effects_core::worker::Inputs<H, SqliteStore>,
{
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn({
        let worker = Arc::clone(&worker);
        async move {
            worker
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    eventually("every message acknowledged", timeout, || {
        let log = log.clone();
        async move { log.unacknowledged(consumer, topic).await.unwrap() == 0 }
    })
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the worker stops within 10 s")
        .unwrap()
}

async fn balance(store: &SqliteStore, id: &str) -> i64 {
    store
        .entity(&account(id), None)
        .await
        .unwrap()
        .and_then(|e| e.get("account/balance").and_then(serde_json::Value::as_i64))
        .unwrap_or_else(|| panic!("account {id} has a balance"))
}

/// Committed transactions per run key, straight from the `transactions` table: one row per
/// applied run, whatever the run wrote.
fn transactions_per_key(path: &Path) -> BTreeMap<String, i64> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT run_key, COUNT(*) FROM transactions GROUP BY run_key")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The transfer race.

const RACE_TRANSFERS: usize = 40;
const PAYER_START: i64 = 1_000_000;

struct RaceResult {
    payer: i64,
    payee: i64,
    report: WorkerReport,
    transactions: BTreeMap<String, i64>,
    handler_calls: usize,
}

/// 40 transfers of 100 from one account to another through one worker at concurrency 8.
async fn transfer_race(name: &str, mutant: Option<Mutant>) -> RaceResult {
    let dir = temp_dir(name);
    let db = dir.join("store.db");
    let setup = setup(Some(&db), mutant);
    seed(&setup, &[("payer", PAYER_START), ("payee", 0)]).await;
    for i in 0..RACE_TRANSFERS {
        let request = TransferRequest {
            id: format!("t{i}"),
            from: "payer".into(),
            to: "payee".into(),
            amount: 100,
        };
        publish(&setup.log, &format!("m{i}"), &request).await;
    }
    let worker = transfer_worker(&setup, 8);
    let report = drain(Arc::clone(&worker), &setup.log, Duration::from_secs(60)).await;
    RaceResult {
        payer: balance(&setup.store, "payer").await,
        payee: balance(&setup.store, "payee").await,
        transactions: transactions_per_key(&db),
        handler_calls: worker.handler().calls.load(Ordering::Relaxed),
        report,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_transfer_race_loses_no_update() {
    let race = transfer_race("race", None).await;
    let r = &race.report;
    println!(
        "FIGURE transfer_race transfers={RACE_TRANSFERS} concurrency=8 applied={} conflicts={} \
         reruns={} handler_calls={} payer={} payee={}",
        r.applied, r.conflicts, r.reruns, race.handler_calls, race.payer, race.payee
    );
    assert_eq!(race.payer, PAYER_START - 100 * RACE_TRANSFERS as i64);
    assert_eq!(race.payee, 100 * RACE_TRANSFERS as i64);
    assert_eq!(race.payer + race.payee, PAYER_START, "money is conserved");
    // Each transfer applied exactly once: one transaction per business key.
    for i in 0..RACE_TRANSFERS {
        let key = effects_core::handler::business_key("transfer", &format!("t{i}"));
        assert_eq!(race.transactions.get(&key), Some(&1), "{key}");
    }
    assert_eq!(
        race.transactions.len(),
        RACE_TRANSFERS + 1,
        "the seed and 40 runs"
    );
    assert_eq!(r.applied, RACE_TRANSFERS as u64);
    assert_eq!(r.dead_lettered, 0);
    // The race really happened: runs were refused and their handlers called again.
    assert!(
        r.conflicts > 0,
        "no conflict: the race did not happen: {r:?}"
    );
    assert_eq!(r.reruns, r.conflicts, "every conflict was re-run");
    assert_eq!(
        race.handler_calls as u64,
        r.applied + r.reruns,
        "one call per applied run plus one per re-run"
    );
}

/// The same race without read validation loses updates: the check above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutant_without_read_validation_loses_updates() {
    let race = transfer_race("race-mutant", Some(Mutant::SkipReadValidation)).await;
    println!(
        "FIGURE transfer_race_mutant payer={} payee={} conflicts={}",
        race.payer, race.payee, race.report.conflicts
    );
    assert_eq!(race.report.conflicts, 0);
    assert_ne!(
        race.payee,
        100 * RACE_TRANSFERS as i64,
        "without read validation concurrent transfers overwrite each other"
    );
    // Every transfer reports applied, yet most of them moved nothing: their debits and credits
    // were computed from balances other runs had already changed.
    assert_eq!(race.report.applied, RACE_TRANSFERS as u64);
    assert!(race.payer > PAYER_START - 100 * RACE_TRANSFERS as i64);
}

// ---------------------------------------------------------------------------------------------
// Random concurrent transfers.

fn run_random_transfers(balances: &[i64], transfers: &[(usize, usize, i64)]) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let setup = setup(None, None);
        let names: Vec<String> = (0..balances.len()).map(|i| format!("a{i}")).collect();
        let seeded: Vec<(&str, i64)> = names
            .iter()
            .map(String::as_str)
            .zip(balances.iter().copied())
            .collect();
        seed(&setup, &seeded).await;
        for (i, (from, to, amount)) in transfers.iter().enumerate() {
            let request = TransferRequest {
                id: format!("t{i}"),
                from: names[*from].clone(),
                to: names[*to].clone(),
                amount: *amount,
            };
            publish(&setup.log, &format!("m{i}"), &request).await;
        }
        let worker = transfer_worker(&setup, 8);
        let report = drain(Arc::clone(&worker), &setup.log, Duration::from_secs(60)).await;
        assert_eq!(report.dead_lettered, 0, "{report:?}");

        // Every transfer ended booked or refused, in exactly one applied run.
        let mut expected: Vec<i64> = balances.to_vec();
        for (i, (from, to, amount)) in transfers.iter().enumerate() {
            let key = effects_core::handler::business_key("transfer", &format!("t{i}"));
            let run = setup.store.run(&key).await.unwrap();
            assert!(run.is_some(), "transfer t{i} was applied");
            let record = setup
                .store
                .entity(&LookupRef::new("transfer/id", format!("t{i}")), None)
                .await
                .unwrap()
                .expect("the transfer is recorded");
            match record.get("transfer/status").and_then(|s| s.as_str()) {
                Some("booked") => {
                    expected[*from] -= amount;
                    expected[*to] += amount;
                }
                Some("refused") => {}
                other => panic!("transfer t{i} has status {other:?}"),
            }
        }
        let mut total = 0;
        for (i, name) in names.iter().enumerate() {
            let now = balance(&setup.store, name).await;
            assert!(now >= 0, "{name} is overdrawn: {now}");
            assert_eq!(
                now, expected[i],
                "{name}: the booked transfers explain its balance"
            );
            total += now;
        }
        assert_eq!(total, balances.iter().sum::<i64>(), "money is conserved");
        assert_eq!(
            report.applied,
            transfers.len() as u64,
            "one applied run per transfer"
        );
        let calls = worker.handler().calls.load(Ordering::Relaxed) as u64;
        assert_eq!(calls, report.applied + report.reruns);
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_concurrent_transfers_conserve_money_and_never_overdraw(
        balances in prop::collection::vec(0i64..500, 2..5),
        raw in prop::collection::vec((0usize..8, 0usize..8, 1i64..300), 1..24),
    ) {
        let n = balances.len();
        let transfers: Vec<(usize, usize, i64)> =
            raw.into_iter().map(|(f, t, a)| (f % n, t % n, a)).collect();
        run_random_transfers(&balances, &transfers);
    }
}

// ---------------------------------------------------------------------------------------------
// Idempotency keys that cannot collide.

/// Handlers named `a:b` and `a` that write one datom per delivery and count their calls.
macro_rules! named_handler {
    ($ty:ident, $name:literal) => {
        #[derive(Default)]
        struct $ty {
            calls: AtomicUsize,
        }

        impl Handler for $ty {
            type Input = serde_json::Value;
            type Output = Effects;
            const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
                name: $name,
                topic: None,
                key: None,
                input: "Value",
                schemas: &[],
            };
            fn handle(&self, input: serde_json::Value) -> Effects {
                let n = self.calls.fetch_add(1, Ordering::Relaxed);
                Effects::from(DatomEffect::assert(
                    LookupRef::new("probe/id", format!("{}/{input}/{n}", $name)),
                    [("probe/seen", json!(true))],
                ))
            }
        }
    };
}

named_handler!(HandlerAB, "a:b");
named_handler!(HandlerA, "a");

async fn publish_raw(log: &SqliteLog, topic: &str, message_id: &str, payload: serde_json::Value) {
    log.publish(OutgoingMessage {
        id: message_id.to_owned(),
        topic: topic.to_owned(),
        partition_key: None,
        headers: BTreeMap::new(),
        payload: payload.to_string().into_bytes(),
    })
    .await
    .unwrap();
}

fn on_topic(topic: &str) -> WorkerConfig {
    WorkerConfig {
        topic: Some(topic.to_owned()),
        ..worker_config(4)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_different_handlers_and_messages_never_collide() {
    // Joined with `:` and no escaping, (a:b, c) and (a, b:c) were one key.
    assert_eq!(format!("{}:{}", "a:b", "c"), format!("{}:{}", "a", "b:c"));
    assert_ne!(
        effects_core::handler::message_key("a:b", "t", "c"),
        effects_core::handler::message_key("a", "t", "b:c")
    );

    let dir = temp_dir("key-collisions");
    let db = dir.join("store.db");
    let setup = setup(Some(&db), None);
    publish_raw(&setup.log, "t", "c", json!(1)).await;
    publish_raw(&setup.log, "t", "b:c", json!(2)).await;
    let ab = Arc::new(
        Worker::new(Arc::clone(&setup.executor), HandlerAB::default()).with_config(on_topic("t")),
    );
    let a = Arc::new(
        Worker::new(Arc::clone(&setup.executor), HandlerA::default()).with_config(on_topic("t")),
    );
    let ab_report = drain_topic(
        Arc::clone(&ab),
        &setup.log,
        "a:b",
        "t",
        Duration::from_secs(20),
    )
    .await;
    let a_report = drain_topic(
        Arc::clone(&a),
        &setup.log,
        "a",
        "t",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        (ab_report.applied, ab_report.duplicates),
        (2, 0),
        "{ab_report:?}"
    );
    assert_eq!(
        (a_report.applied, a_report.duplicates),
        (2, 0),
        "{a_report:?}"
    );
    assert_eq!(ab.handler().calls.load(Ordering::Relaxed), 2);
    assert_eq!(a.handler().calls.load(Ordering::Relaxed), 2);
    let transactions = transactions_per_key(&db);
    for key in ["a%3Ab:t:c", "a%3Ab:t:b%3Ac", "a:t:c", "a:t:b%3Ac"] {
        assert_eq!(transactions.get(key), Some(&1), "{key} in {transactions:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_handler_on_two_topics_that_reuse_a_message_id_applies_both() {
    let dir = temp_dir("two-topics");
    let db = dir.join("store.db");
    let setup = setup(Some(&db), None);
    publish_raw(&setup.log, "t1", "m1", json!("first")).await;
    publish_raw(&setup.log, "t2", "m1", json!("second")).await;
    let on_t1 = Arc::new(
        Worker::new(Arc::clone(&setup.executor), HandlerA::default()).with_config(on_topic("t1")),
    );
    let on_t2 = Arc::new(
        Worker::new(Arc::clone(&setup.executor), HandlerA::default()).with_config(on_topic("t2")),
    );
    let r1 = drain_topic(
        Arc::clone(&on_t1),
        &setup.log,
        "a",
        "t1",
        Duration::from_secs(20),
    )
    .await;
    let r2 = drain_topic(
        Arc::clone(&on_t2),
        &setup.log,
        "a",
        "t2",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!((r1.applied, r2.applied), (1, 1), "{r1:?} {r2:?}");
    assert_eq!((r1.duplicates, r2.duplicates), (0, 0));
    assert_eq!(
        on_t2.handler().calls.load(Ordering::Relaxed),
        1,
        "the second was handled"
    );
    let transactions = transactions_per_key(&db);
    assert_eq!(transactions.get("a:t1:m1"), Some(&1));
    assert_eq!(transactions.get("a:t2:m1"), Some(&1));
}

/// One transfer published twice under two message ids (an upstream that re-sends).
async fn resent_transfer(
    name: &str,
    mutant: Option<Mutant>,
) -> (WorkerReport, i64, usize, BTreeMap<String, i64>) {
    let dir = temp_dir(name);
    let db = dir.join("store.db");
    let setup = setup(Some(&db), mutant);
    seed(&setup, &[("payer", 1_000), ("payee", 0)]).await;
    let request = TransferRequest {
        id: "t-42".into(),
        from: "payer".into(),
        to: "payee".into(),
        amount: 100,
    };
    publish(&setup.log, "m1", &request).await;
    publish(&setup.log, "m2-resent", &request).await;
    let worker = transfer_worker(&setup, 1);
    let report = drain(Arc::clone(&worker), &setup.log, Duration::from_secs(20)).await;
    (
        report,
        balance(&setup.store, "payer").await,
        worker.handler().calls.load(Ordering::Relaxed),
        transactions_per_key(&db),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_key_resent_under_a_new_message_id_is_applied_once() {
    let (report, payer, calls, transactions) = resent_transfer("resent", None).await;
    assert_eq!((report.applied, report.duplicates), (1, 1), "{report:?}");
    assert_eq!(payer, 900, "debited once");
    assert_eq!(calls, 1, "the re-sent transfer never reached the handler");
    assert_eq!(transactions.get("transfer:t-42"), Some(&1));
}

/// Without the duplicate check the re-sent transfer is applied twice: the check above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_without_the_duplicate_check_applies_a_resent_transfer_twice() {
    let (report, payer, calls, _) =
        resent_transfer("resent-mutant", Some(Mutant::SkipDuplicateCheck)).await;
    assert_eq!(report.applied, 2, "{report:?}");
    assert_eq!(payer, 800, "debited twice");
    assert_eq!(calls, 2);
}

// ---------------------------------------------------------------------------------------------
// Compare-and-set datoms.

/// A balance written only if the account still holds the balance it was computed from.
#[derive(Datom)]
#[datom(entity = "account")]
struct NewBalance {
    #[datom(id)]
    id: String,
    balance: i64,
    #[datom(expect = "balance")]
    was: i64,
}

async fn cas_setup(name: &str, mutant: Option<Mutant>) -> (Setup, std::path::PathBuf) {
    let dir = temp_dir(name);
    let db = dir.join("store.db");
    let setup = setup(Some(&db), mutant);
    seed(&setup, &[("a1", 1_000)]).await;
    (setup, db)
}

fn cas_effects(was: i64, balance: i64) -> Effects {
    let datom = NewBalance {
        id: "a1".into(),
        balance,
        was,
    }
    .into_datom();
    assert_eq!(datom.expected["account/balance"], json!(was));
    Effects::from(datom).merge(MessageEffect::new("balance-changed", json!({"id": "a1"})))
}

#[tokio::test]
async fn a_stale_compare_and_set_is_a_conflict_and_writes_nothing() {
    let (setup, db) = cas_setup("cas", None).await;
    let before = transactions_per_key(&db);
    let err = setup
        .executor
        .run("withdraw:1", cas_effects(900, 800))
        .await
        .unwrap_err();
    let RunError::Conflict { conflict, .. } = err else {
        panic!("expected a conflict, got {err}");
    };
    assert_eq!(
        *conflict,
        Conflict::Expected {
            datom: 0,
            entity: account("a1"),
            attribute: "account/balance".into(),
            expected: Some(json!(900)),
            found: Some(json!(1_000)),
        }
    );
    assert_eq!(
        conflict.to_string(),
        "datoms[0] expected account/balance of [account/id \"a1\"] to be 900 but it is 1000"
    );
    // Nothing of the run: no transaction, no run record, no outbox row, no message, no change.
    assert_eq!(transactions_per_key(&db), before);
    assert_eq!(setup.store.run("withdraw:1").await.unwrap(), None);
    assert!(setup.store.outbox("withdraw:1").await.unwrap().is_empty());
    assert!(
        setup
            .log
            .messages("balance-changed")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(balance(&setup.store, "a1").await, 1_000);

    // The key is still free: the same key with fresh effects applies.
    let outcome = setup
        .executor
        .run("withdraw:1", cas_effects(1_000, 900))
        .await
        .unwrap();
    assert!(matches!(outcome, RunOutcome::Applied { .. }));
    assert_eq!(balance(&setup.store, "a1").await, 900);
    // Expecting no value of an attribute the entity holds is a conflict too.
    let absent = Effects::from(
        DatomEffect::assert(account("a1"), [("account/owner", json!("ana"))])
            .expecting("account/balance", serde_json::Value::Null),
    );
    assert!(matches!(
        setup.executor.run("owner:1", absent).await,
        Err(RunError::Conflict { .. })
    ));
}

/// Without validation the stale compare-and-set overwrites the balance: the check above can fail.
#[tokio::test]
async fn mutant_without_read_validation_applies_a_stale_compare_and_set() {
    let (setup, _) = cas_setup("cas-mutant", Some(Mutant::SkipReadValidation)).await;
    let outcome = setup
        .executor
        .run("withdraw:1", cas_effects(900, 800))
        .await
        .unwrap();
    assert!(matches!(outcome, RunOutcome::Applied { .. }));
    assert_eq!(balance(&setup.store, "a1").await, 800);
}

#[tokio::test]
async fn compare_and_set_expectations_that_disagree_are_refused_before_any_write() {
    let (setup, db) = cas_setup("cas-disagree", None).await;
    let before = transactions_per_key(&db);
    let effects = Effects::from(
        DatomEffect::assert(account("a1"), [("account/limit", json!(5))])
            .expecting("account/balance", json!(1_000)),
    )
    .merge(
        DatomEffect::assert(account("a1"), [("account/flag", json!(true))])
            .expecting("account/balance", json!(7)),
    );
    let err = setup.executor.run("both", effects).await.unwrap_err();
    assert!(matches!(err, RunError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("both cannot hold"), "{err}");
    assert_eq!(transactions_per_key(&db), before);
}

// ---------------------------------------------------------------------------------------------
// What read validation does not refuse.

#[tokio::test]
async fn reads_that_still_hold_are_never_a_conflict() {
    let (setup, _) = cas_setup("no-false-conflicts", None).await;
    let other = account("other");
    setup
        .executor
        .run(
            "open:other",
            Effects::from(DatomEffect::assert(
                other.clone(),
                [("account/balance", json!(5))],
            )),
        )
        .await
        .unwrap();
    let read = setup
        .store
        .entity(&account("a1"), None)
        .await
        .unwrap()
        .unwrap();
    let as_of = setup
        .store
        .entity(&account("a1"), Some(read.tx))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(as_of.tx, read.tx);

    // Another entity changes; the read one is rewritten with the value it holds (no change).
    setup
        .executor
        .run(
            "deposit:other",
            Effects::from(DatomEffect::assert(other, [("account/balance", json!(6))])),
        )
        .await
        .unwrap();
    setup
        .executor
        .run(
            "same-value",
            Effects::from(DatomEffect::assert(
                account("a1"),
                [("account/balance", json!(1_000))],
            )),
        )
        .await
        .unwrap();

    for (key, version) in [
        ("now", ReadVersion::of(&read)),
        ("as-of", ReadVersion::of(&as_of)),
    ] {
        let effects = Effects::from(DatomEffect::assert(
            LookupRef::new("audit/id", key),
            [("audit/balance", json!(1_000))],
        ));
        let outcome = setup
            .executor
            .run_with(key, effects, RunOptions::reading([version]))
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(matches!(outcome, RunOutcome::Applied { .. }), "{key}");
    }

    // A read of an entity that did not exist holds while it still does not.
    let ghost = ReadVersion::missing(account("ghost"));
    let outcome = setup
        .executor
        .run_with(
            "ghost-read",
            Effects::from(DatomEffect::assert(
                account("z"),
                [("account/balance", json!(1))],
            )),
            RunOptions::reading([ghost.clone()]),
        )
        .await
        .unwrap();
    assert!(matches!(outcome, RunOutcome::Applied { .. }));
    // ... and is a conflict once it exists.
    setup
        .executor
        .run(
            "create-ghost",
            Effects::from(DatomEffect::assert(
                account("ghost"),
                [("account/balance", json!(1))],
            )),
        )
        .await
        .unwrap();
    let err = setup
        .executor
        .run_with(
            "ghost-read-2",
            Effects::from(DatomEffect::assert(
                account("z"),
                [("account/balance", json!(2))],
            )),
            RunOptions::reading([ghost]),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RunError::Conflict { conflict, .. } if matches!(conflict.as_ref(), Conflict::Read { read: None, found: Some(_), .. })),
        "{err}"
    );
}

#[tokio::test]
async fn any_change_to_a_read_entity_is_a_conflict_even_of_another_attribute() {
    let (setup, _) = cas_setup("per-entity", None).await;
    let read = setup
        .store
        .entity(&account("a1"), None)
        .await
        .unwrap()
        .unwrap();
    setup
        .executor
        .run(
            "rename",
            Effects::from(DatomEffect::assert(
                account("a1"),
                [("account/owner", json!("ana"))],
            )),
        )
        .await
        .unwrap();
    let err = setup
        .executor
        .run_with(
            "withdraw",
            Effects::from(DatomEffect::assert(
                account("a1"),
                [("account/balance", json!(900))],
            )),
            RunOptions::reading([ReadVersion::of(&read)]),
        )
        .await
        .unwrap_err();
    let RunError::Conflict { conflict, .. } = err else {
        panic!("expected a conflict")
    };
    assert_eq!(
        *conflict,
        Conflict::Read {
            entity: account("a1"),
            read: Some(read.tx),
            found: Some(effects_core::Tx(read.tx.0 + 1)),
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transfers_between_disjoint_accounts_never_conflict() {
    let setup = setup(None, None);
    let mut accounts = Vec::new();
    for i in 0..16 {
        accounts.push((format!("p{i}"), 1_000));
        accounts.push((format!("q{i}"), 0));
    }
    let seeded: Vec<(&str, i64)> = accounts.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    seed(&setup, &seeded).await;
    for i in 0..16 {
        let request = TransferRequest {
            id: format!("t{i}"),
            from: format!("p{i}"),
            to: format!("q{i}"),
            amount: 10,
        };
        publish(&setup.log, &format!("m{i}"), &request).await;
    }
    let worker = transfer_worker(&setup, 8);
    let report = drain(Arc::clone(&worker), &setup.log, Duration::from_secs(30)).await;
    assert_eq!(report.applied, 16);
    assert_eq!(report.conflicts, 0, "{report:?}");
    for i in 0..16 {
        assert_eq!(balance(&setup.store, &format!("q{i}")).await, 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivery_after_a_rerun_is_still_a_duplicate() {
    let race_dir = temp_dir("rerun-then-redelivery");
    let db = race_dir.join("store.db");
    let setup = setup(Some(&db), None);
    seed(&setup, &[("payer", 10_000), ("payee", 0)]).await;
    for i in 0..16 {
        let request = TransferRequest {
            id: format!("t{i}"),
            from: "payer".into(),
            to: "payee".into(),
            amount: 10,
        };
        publish(&setup.log, &format!("m{i}"), &request).await;
    }
    let worker = transfer_worker(&setup, 8);
    let report = drain(Arc::clone(&worker), &setup.log, Duration::from_secs(30)).await;
    assert!(report.reruns > 0, "{report:?}");

    // Deliver every message again (as after a lost acknowledgement): all duplicates.
    let messages = setup.log.messages(TOPIC).await.unwrap();
    assert_eq!(messages.len(), 16);
    for m in messages {
        let delivery = effects_core::transport::Delivery {
            consumer: "transfer".into(),
            topic: m.topic,
            sequence: m.sequence,
            message_id: m.message_id,
            partition_key: m.partition_key,
            headers: m.headers,
            payload: m.payload,
            deliveries: 2,
        };
        let processed = worker.process(delivery).await;
        assert!(
            matches!(processed, Processed::Duplicate { .. }),
            "{processed:?}"
        );
    }
    assert_eq!(balance(&setup.store, "payee").await, 160);
    assert!(transactions_per_key(&db).values().all(|n| *n == 1));
}
