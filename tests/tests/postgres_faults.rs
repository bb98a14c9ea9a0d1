//! PostgreSQL restarted in the middle of a run (feature `postgres`): a private server on a free
//! loopback port is stopped at once (`pg_ctl -m immediate`: connections cut, like a crash) and
//! started again after 0–2 s, several times, while a worker moves money between accounts through
//! the executor. The run completes with the right results, counted at the source: one committed
//! transaction per transfer (the `transactions` table, never deduplicated), handler calls, and
//! balances that the booked transfers explain exactly. The same check against an executor
//! without read validation ([`Mutant::SkipReadValidation`]) fails.
//!
//! The CI size is 150 transfers and 4 restarts; the larger run (figures in RELIABILITY.md):
//! `EFFECTS_SERVER_FAULTS_MESSAGES=100000 cargo test --release -p effects-tests --features
//! postgres --test postgres_faults runs_complete -- --nocapture`.
//!
//! Needs PostgreSQL 15's server binaries in `/usr/lib/postgresql/15/bin` and the `postgres`
//! user (the Debian `postgresql-15` package), and runs as root (`runuser -u postgres`).

#![cfg(feature = "postgres")]

mod backends;
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backends::Backend;
use backends::postgres::{Postgres, PrivateServer, client};
use effects_core::executor::{Executor, Mutant, NoHttp};
use effects_core::postgres::{PostgresOptions, PostgresStore};
use effects_core::relay::RelayConfig;
use effects_core::store::{Store, Tracked};
use effects_core::transport::{OutgoingMessage, SqliteLog, Transport};
use effects_core::worker::{LoadError, LoadWith, Worker, WorkerConfig, WorkerReport};
use effects_core::{DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, MessageEffect};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

const TOPIC: &str = "transfers";
const START: i64 = 1_000;

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

/// Books a transfer if the payer can afford it, with absolute balances computed from what was
/// loaded; records it either way. Counts its calls.
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
                [("transfer/status", json!(status))],
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

async fn load_transfer(
    r: TransferRequest,
    store: Tracked<PostgresStore>,
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

/// A small deterministic generator (the seed is printed with the figures).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// How much a run does. The CI size, or `EFFECTS_SERVER_FAULTS_MESSAGES=N` transfers (the
/// variable that sizes tests/tests/server_faults.rs too): then 30 accounts, fewer conflicts, and
/// a restart per thousand transfers, spread over the run (up 2–8 s between them) and stopped
/// once the work is done.
#[derive(Clone, Copy, Debug)]
struct Size {
    transfers: usize,
    accounts: usize,
    restarts: usize,
    /// How long the server stays up between restarts, in ms: at least, and at most.
    up_ms: (u64, u64),
    large: bool,
}

impl Size {
    fn ci(transfers: usize, restarts: usize) -> Size {
        Size {
            transfers,
            accounts: 6,
            restarts,
            up_ms: (200, 800),
            large: false,
        }
    }

    /// The CI size unless `EFFECTS_SERVER_FAULTS_MESSAGES` says otherwise.
    fn from_env(transfers: usize, restarts: usize) -> Size {
        match std::env::var("EFFECTS_SERVER_FAULTS_MESSAGES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(n) if n > transfers => Size {
                transfers: n,
                accounts: 30,
                restarts: (n / 1_000).max(restarts),
                up_ms: (2_000, 8_000),
                large: true,
            },
            _ => Size::ci(transfers, restarts),
        }
    }

    /// A bound on finishing: 180 s, and one more per hundred transfers.
    fn bound(&self) -> Duration {
        Duration::from_secs(180 + self.transfers as u64 / 100)
    }
}

struct Outcome {
    report: WorkerReport,
    handler_calls: usize,
    transactions: BTreeMap<String, i64>,
    balances: Vec<i64>,
    expected: Vec<i64>,
    booked: usize,
    restarts: usize,
    published: usize,
}

async fn transfers_through_restarts(name: &str, size: Size, mutant: Option<Mutant>) -> Outcome {
    let Size {
        transfers,
        accounts,
        restarts,
        ..
    } = size;
    let started = Instant::now();
    let server = PrivateServer::start(name);
    let db = Postgres::create_on(server.port, name).await;
    let options = PostgresOptions {
        pool_size: 8,
        connect_timeout: Duration::from_secs(1),
        pool_timeout: Duration::from_secs(2),
        statement_timeout: Some(Duration::from_secs(5)),
        ..PostgresOptions::new(db.url())
    };
    let store = PostgresStore::connect(options).await.expect("the store");
    let broker = SqliteLog::open(db.dir().join("broker.db")).unwrap();
    let mut builder = Executor::builder(store.clone(), broker.clone()).owner(name);
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let executor = Arc::new(builder.build());

    let names: Vec<String> = (0..accounts).map(|i| format!("a{i}")).collect();
    let seed: Effects = names
        .iter()
        .map(|n| DatomEffect::assert(account(n), [("account/balance", json!(START))]))
        .collect();
    executor.run("seed", seed).await.unwrap();
    let seed_value = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_secs());
    let mut rng = Lcg(seed_value);
    let mut requests = Vec::new();
    for i in 0..transfers {
        let from = rng.next(accounts as u64) as usize;
        let to = (from + 1 + rng.next(accounts as u64 - 1) as usize) % accounts;
        let request = TransferRequest {
            id: format!("t{i}"),
            from: names[from].clone(),
            to: names[to].clone(),
            amount: 1 + rng.next(150) as i64,
        };
        broker
            .publish(OutgoingMessage {
                id: format!("m{i}"),
                topic: TOPIC.into(),
                partition_key: None,
                headers: BTreeMap::new(),
                payload: serde_json::to_vec(&request).unwrap(),
            })
            .await
            .unwrap();
        requests.push((from, to, request.amount));
    }

    let mut config = WorkerConfig {
        concurrency: 4,
        fetch_wait: Duration::from_millis(20),
        relay: Some(RelayConfig {
            interval: Duration::from_millis(50),
            ..RelayConfig::default()
        }),
        ..WorkerConfig::default()
    };
    config.retry.initial = Duration::from_millis(50);
    config.retry.max = Duration::from_millis(500);
    let worker: Arc<Worker<PostgresStore, SqliteLog, NoHttp, TransferHandler, _>> = Arc::new(
        Worker::new(Arc::clone(&executor), TransferHandler::default())
            .with_config(config)
            .load_with(LoadWith::new(load_transfer)),
    );
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

    // The restarts, while the worker runs: up 0.2–0.8 s, then down 0–2 s.
    let mut done_restarts = 0;
    let (up_least, up_most) = size.up_ms;
    for _ in 0..restarts {
        tokio::time::sleep(Duration::from_millis(
            up_least + rng.next(up_most - up_least),
        ))
        .await;
        if size.large
            && broker.unacknowledged("transfer", TOPIC).await.unwrap() == 0
            && store.backlog().await.map(|b| b.pending_rows).unwrap_or(1) == 0
        {
            break;
        }
        let down_for = Duration::from_millis(rng.next(2_000));
        tokio::task::block_in_place(|| server.down());
        tokio::time::sleep(down_for).await;
        tokio::task::block_in_place(|| server.up());
        done_restarts += 1;
    }

    // Bounded: everything acknowledged and every outbox row dispatched.
    let deadline = Instant::now() + size.bound();
    loop {
        let unacked = broker.unacknowledged("transfer", TOPIC).await.unwrap();
        let pending = store.backlog().await.map(|b| b.pending_rows).unwrap_or(1);
        if unacked == 0 && pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not done after {:?}: {unacked} unacknowledged, {pending} pending, {:?}",
            size.bound(),
            worker.report()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    let report = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the worker stops")
        .unwrap();

    // Counted at the source, on a fresh connection.
    let raw = client(server.port, db.name()).await.unwrap();
    let transactions: BTreeMap<String, i64> = raw
        .query(
            "SELECT run_key, COUNT(*) FROM transactions GROUP BY run_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut expected = vec![START; accounts];
    let mut booked = 0;
    for (i, (from, to, amount)) in requests.iter().enumerate() {
        let record = store
            .entity(&LookupRef::new("transfer/id", format!("t{i}")), None)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("transfer t{i} was applied"));
        match record.get("transfer/status").and_then(|s| s.as_str()) {
            Some("booked") => {
                expected[*from] -= amount;
                expected[*to] += amount;
                booked += 1;
            }
            Some("refused") => {}
            other => panic!("transfer t{i} has status {other:?}"),
        }
    }
    let mut balances = Vec::new();
    for n in &names {
        balances.push(
            store
                .entity(&account(n), None)
                .await
                .unwrap()
                .and_then(|e| e.get("account/balance").and_then(serde_json::Value::as_i64))
                .expect("a balance"),
        );
    }
    let published = broker.messages("transfer-booked").await.unwrap().len();
    println!(
        "FIGURE postgres_restarts seed={seed_value} mutant={mutant:?} transfers={transfers} \
         accounts={accounts} seconds={:.0} \
         restarts={done_restarts} applied={} duplicates={} conflicts={} retried={} \
         handler_calls={} booked={booked} published={published} balances={balances:?}",
        started.elapsed().as_secs_f64(),
        report.applied,
        report.duplicates,
        report.conflicts,
        report.retried,
        worker.handler().calls.load(Ordering::Relaxed),
    );
    let outcome = Outcome {
        handler_calls: worker.handler().calls.load(Ordering::Relaxed),
        report,
        transactions,
        balances,
        expected,
        booked,
        restarts: done_restarts,
        published,
    };
    drop(store);
    db.destroy().await;
    drop(server);
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_complete_correctly_through_postgres_restarts() {
    let size = Size::from_env(150, 4);
    let o = transfers_through_restarts("restarts", size, None).await;
    if size.large {
        // Restarts stop once the work is done.
        assert!(o.restarts >= 1, "no restart happened");
    } else {
        assert_eq!(o.restarts, size.restarts);
    }
    // Each transfer committed exactly once: one transaction per business key, and the seed.
    assert_eq!(o.transactions.len(), size.transfers + 1);
    let twice: Vec<_> = o.transactions.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "runs applied more than once: {twice:?}");
    // No lost update: the booked transfers explain every balance, and money is conserved.
    assert_eq!(o.balances, o.expected);
    assert_eq!(o.balances.iter().sum::<i64>(), START * size.accounts as i64);
    assert!(o.balances.iter().all(|b| *b >= 0), "{:?}", o.balances);
    // Every booked transfer's message went out.
    assert_eq!(o.published, o.booked);
    // The handler ran once per applied run, once per re-run after a conflict, and once per
    // delivery whose commit the outage interrupted: never fewer than the runs.
    assert!(o.handler_calls >= size.transfers, "{}", o.handler_calls);
    assert!(o.report.applied + o.report.duplicates >= size.transfers as u64);
    assert_eq!(o.report.dead_lettered, 0, "{:?}", o.report);
}

/// The same run without read validation: the balances are no longer explained by the booked
/// transfers (lost updates), so the check above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutant_without_read_validation_loses_updates_through_restarts() {
    let o = transfers_through_restarts(
        "restarts-mutant",
        Size::ci(150, 2),
        Some(Mutant::SkipReadValidation),
    )
    .await;
    assert_ne!(o.balances, o.expected, "the mutant lost no update");
}
