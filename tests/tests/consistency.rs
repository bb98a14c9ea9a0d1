//! Consistency under concurrency on the embedded default: random concurrent transfers (property
//! tested), and idempotency keys that cannot collide. The transfer race, compare-and-set datoms,
//! read validation, re-runs and business keys — with their mutant checks — are in the store
//! conformance suite (`store_conformance.rs`), which runs them on SQLite and PostgreSQL.
//!
//! Every figure is counted at the source: transactions per key in the store's `transactions`
//! table (one row per committed run, never deduplicated), handler calls, applied runs reported by
//! the worker.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use effects_core::executor::Executor;
use effects_core::relay::RelayConfig;
use effects_core::store::{SqliteStore, Store, Tracked};
use effects_core::transport::{OutgoingMessage, SqliteLog, Transport};
use effects_core::worker::{LoadError, LoadWith, Worker, WorkerConfig, WorkerReport};
use effects_core::{DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, MessageEffect};
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

fn setup(db: Option<&Path>) -> Setup {
    let store = match db {
        Some(path) => SqliteStore::open(path).unwrap(),
        None => SqliteStore::in_memory().unwrap(),
    };
    let log = store.log();
    Setup {
        executor: Arc::new(Executor::builder(store.clone(), log.clone()).build()),
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
// Random concurrent transfers.

fn run_random_transfers(balances: &[i64], transfers: &[(usize, usize, i64)]) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let setup = setup(None);
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
    let setup = setup(Some(&db));
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
    let setup = setup(Some(&db));
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
