//! The worker's group commit, order and heartbeats, on the embedded store and log: runs decided
//! close together commit in one transaction, each keeping its own outcome; one partition key's
//! deliveries apply in order; a delivery in work is kept leased. Each check is shown once to
//! fail against a deliberately broken worker (`Mutant::NoKeyOrder`, `Mutant::NoHeartbeat`).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use effects_core::executor::{Executor, Mutant};
use effects_core::relay::RelayConfig;
use effects_core::store::{SqliteStore, Store, Tracked};
use effects_core::transport::{OutgoingMessage, SqliteLog, Transport};
use effects_core::worker::{
    Acknowledge, GroupCommit, LoadError, LoadWith, Worker, WorkerConfig, WorkerReport,
};
use effects_core::{
    DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, Method, RequestEffect,
};
use serde::Deserialize;
use serde_json::json;
use support::{eventually, http_client};
use tokio::sync::oneshot;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const TOPIC: &str = "notes";

/// An input: the `index`th note of `key`.
#[derive(Clone, Debug, Deserialize)]
struct Note {
    key: String,
    index: u64,
}

/// Records the note's index on the key's entity (`note/key`), and, for keys starting with
/// `req`, sends one request. Counts its calls per message.
#[derive(Default)]
struct NoteHandler {
    calls: Mutex<HashMap<String, usize>>,
}

impl NoteHandler {
    fn calls(&self) -> HashMap<String, usize> {
        self.calls.lock().unwrap().clone()
    }
}

impl Handler for NoteHandler {
    type Input = Note;
    type Output = Effects;

    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: "note",
        topic: Some(TOPIC),
        key: None,
        input: "Note",
        schemas: &[],
    };

    fn handle(&self, note: Note) -> Effects {
        *self
            .calls
            .lock()
            .unwrap()
            .entry(format!("{}:{}", note.key, note.index))
            .or_default() += 1;
        let mut effects = Effects::from(DatomEffect::assert(
            LookupRef::new("note/key", note.key.clone()),
            [("note/index", json!(note.index))],
        ));
        if note.key.starts_with("req") {
            effects = effects.merge(
                RequestEffect::new(Method::Post, "notify", "/notes")
                    .with_body(json!({"key": note.key, "index": note.index})),
            );
        }
        effects
    }
}

fn note(key: &str, index: u64) -> OutgoingMessage {
    OutgoingMessage {
        id: format!("{key}-{index}"),
        topic: TOPIC.to_owned(),
        partition_key: Some(key.to_owned()),
        headers: BTreeMap::new(),
        payload: json!({"key": key, "index": index}).to_string().into_bytes(),
    }
}

fn config() -> WorkerConfig {
    WorkerConfig {
        fetch_wait: Duration::from_millis(50),
        visibility: Duration::from_secs(30),
        relay: Some(RelayConfig {
            interval: Duration::from_millis(20),
            ..RelayConfig::default()
        }),
        ..WorkerConfig::default()
    }
}

/// Runs `worker` until every input of the log is acknowledged (bounded), then stops it.
async fn run_until_acked<T, C, H, I>(
    worker: Arc<Worker<SqliteStore, T, C, H, I>>,
    log: &SqliteLog,
    timeout: Duration,
) -> WorkerReport
where
    T: Transport,
    C: effects_core::http::HttpClient + 'static,
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
    let consumer = worker.consumer();
    eventually("every input acknowledged", timeout, || {
        let (log, consumer) = (log.clone(), consumer.clone());
        async move { log.unacknowledged(&consumer, TOPIC).await.unwrap() == 0 }
    })
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the worker stops within 10 s")
        .unwrap()
}

/// Per key, the `note/index` values asserted, in `tx` order; and how many transactions
/// applied each run key (counted at the source: the history's transactions).
async fn history(store: &SqliteStore) -> (BTreeMap<String, Vec<u64>>, HashMap<String, usize>) {
    let mut per_key: BTreeMap<String, Vec<(i64, u64)>> = BTreeMap::new();
    let mut txs: HashMap<String, std::collections::BTreeSet<i64>> = HashMap::new();
    for d in store.history(None).await.unwrap() {
        txs.entry(d.run_key.clone()).or_default().insert(d.tx.0);
        if d.attribute == "note/index" && d.op == effects_core::Op::Assert {
            let key = d.entity.value.as_str().unwrap_or_default().to_owned();
            per_key
                .entry(key)
                .or_default()
                .push((d.tx.0, d.value.as_u64().unwrap_or(u64::MAX)));
        }
    }
    let order = per_key
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_unstable();
            (k, v.into_iter().map(|(_, i)| i).collect())
        })
        .collect();
    (order, txs.into_iter().map(|(k, t)| (k, t.len())).collect())
}

/// Eight keys, six notes each: returns the per-key order of application
/// and the worker's report.
async fn notes_in_order(mutant: Option<Mutant>) -> (BTreeMap<String, Vec<u64>>, WorkerReport) {
    const KEYS: u64 = 8;
    const PER_KEY: u64 = 6;
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let mut builder = Executor::builder(store.clone(), log.clone());
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let executor = Arc::new(builder.build());
    // One key's notes back to back, so that several of a key are in one fetch and would be
    // decided side by side if nothing kept them apart.
    for k in 0..KEYS {
        for i in 0..PER_KEY {
            log.publish(note(&format!("k{k}"), i)).await.unwrap();
        }
    }
    // Later notes take less time to load than earlier ones: handled side by side, a key's
    // notes would be ready out of order.
    let worker = Arc::new(
        Worker::new(executor, NoteHandler::default())
            .with_config(config())
            .load_with(LoadWith::new(
                |note: Note, _store: Tracked<SqliteStore>| async move {
                    tokio::time::sleep(Duration::from_millis(3 * (PER_KEY - note.index))).await;
                    Ok::<Note, LoadError>(note)
                },
            )),
    );
    let report = run_until_acked(Arc::clone(&worker), &log, Duration::from_secs(30)).await;
    let (order, txs) = history(&store).await;
    assert!(
        txs.values().all(|&n| n == 1),
        "each run applied by one transaction: {txs:?}"
    );
    assert_eq!(report.applied, KEYS * PER_KEY, "{report:?}");
    (order, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keys_deliveries_apply_in_order_and_runs_commit_together() {
    let (order, report) = notes_in_order(None).await;
    for (key, indexes) in &order {
        assert_eq!(indexes, &[0, 1, 2, 3, 4, 5], "key {key}");
    }
    assert!(
        report.commits < report.applied,
        "runs committed together: {} commits for {} runs",
        report.commits,
        report.applied
    );
    println!(
        "FIGURE group_commit_order: runs={} commits={} runs_per_commit={:.1}",
        report.applied,
        report.commits,
        report.applied as f64 / report.commits as f64
    );
}

/// The order check fails against a worker that ignores partition keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_check_fails_without_key_order() {
    let mut broken = false;
    // A broken order shows almost every time; three tries keep the check itself steady.
    for _ in 0..3 {
        let (order, _) = notes_in_order(Some(Mutant::NoKeyOrder)).await;
        if order.values().any(|indexes| indexes != &[0, 1, 2, 3, 4, 5]) {
            broken = true;
            break;
        }
    }
    assert!(
        broken,
        "without key order, some key's notes must apply out of order"
    );
}

/// What the loader below returns.
type LoadedNote =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Note, LoadError>> + Send>>;

/// A loader that reads an entity through the tracked store for every note; for note 5 it is
/// `account/id = "x"`, which changes right after the first read.
fn reading_loader(
    store_for_bump: Arc<Executor<SqliteStore, SqliteLog>>,
    bumped: Arc<AtomicBool>,
    loads: Arc<AtomicUsize>,
) -> impl Fn(Note, Tracked<SqliteStore>) -> LoadedNote + Send + Sync + 'static {
    move |note: Note, store: Tracked<SqliteStore>| {
        let (executor, bumped, loads) = (
            Arc::clone(&store_for_bump),
            Arc::clone(&bumped),
            Arc::clone(&loads),
        );
        Box::pin(async move {
            loads.fetch_add(1, Ordering::SeqCst);
            // Note 5 reads `x`; the others read an entity of their own, which nobody writes.
            let read = if note.key == "m5" {
                LookupRef::new("account/id", "x")
            } else {
                LookupRef::new("account/id", note.key.clone())
            };
            store.entity(&read, None).await?;
            // The first load of note 5 sees `x` change right after reading it.
            if note.key == "m5" && !bumped.swap(true, Ordering::SeqCst) {
                executor
                    .run(
                        "bump-x",
                        Effects::from(DatomEffect::assert(
                            LookupRef::new("account/id", "x"),
                            [("account/balance", json!(2))],
                        )),
                    )
                    .await
                    .expect("bump x");
            }
            Ok(note)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_in_a_group_commit_reruns_that_run_alone() {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    executor
        .run(
            "open-x",
            Effects::from(DatomEffect::assert(
                LookupRef::new("account/id", "x"),
                [("account/balance", json!(1))],
            )),
        )
        .await
        .unwrap();
    for i in 0..10 {
        log.publish(note(&format!("m{i}"), 0)).await.unwrap();
    }
    let (bumped, loads) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let handler = NoteHandler::default();
    let worker = Worker::new(Arc::clone(&executor), handler)
        .with_config(WorkerConfig {
            concurrency: 10,
            group_commit: Some(GroupCommit {
                max_runs: 64,
                max_wait: Duration::from_millis(200),
            }),
            ..config()
        })
        .load_with(LoadWith::new(reading_loader(
            Arc::clone(&executor),
            Arc::clone(&bumped),
            Arc::clone(&loads),
        )));
    let worker = Arc::new(worker);
    let report = run_until_acked(Arc::clone(&worker), &log, Duration::from_secs(30)).await;
    let calls = worker.handler().calls();
    assert_eq!(report.applied, 10, "{report:?}");
    assert_eq!(report.conflicts, 1, "only note 5 was refused: {report:?}");
    assert_eq!(report.reruns, 1, "{report:?}");
    assert_eq!(
        report.commits, 2,
        "the ten runs in one commit, then note 5 again: {report:?}"
    );
    assert_eq!(calls.get("m5:0"), Some(&2), "note 5's handler ran twice");
    assert!(
        calls
            .iter()
            .filter(|(k, _)| k.as_str() != "m5:0")
            .all(|(_, &n)| n == 1),
        "every other handler ran once: {calls:?}"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 11);
    let (_, txs) = history(&store).await;
    assert!(txs.values().all(|&n| n == 1), "{txs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_in_a_group_commit_settles_as_a_duplicate() {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    // Note m3 was applied before (say, by a process that died before acknowledging it).
    let applied_before = executor
        .run(
            Worker::<SqliteStore, SqliteLog, effects_core::executor::NoHttp, NoteHandler>::key_for(
                TOPIC, "m3-0",
            ),
            NoteHandler::default().handle(Note {
                key: "m3".into(),
                index: 0,
            }),
        )
        .await
        .unwrap();
    for i in 0..10 {
        log.publish(note(&format!("m{i}"), 0)).await.unwrap();
    }
    let worker = Arc::new(
        Worker::new(Arc::clone(&executor), NoteHandler::default()).with_config(WorkerConfig {
            group_commit: Some(GroupCommit {
                max_runs: 64,
                max_wait: Duration::from_millis(200),
            }),
            ..config()
        }),
    );
    let report = run_until_acked(Arc::clone(&worker), &log, Duration::from_secs(30)).await;
    assert_eq!(report.applied, 9, "{report:?}");
    assert_eq!(report.duplicates, 1, "{report:?}");
    let run = store
        .run("note:notes:m3-0")
        .await
        .unwrap()
        .expect("m3's run");
    assert_eq!(run.tx, applied_before.tx(), "the original run stands");
    let (_, txs) = history(&store).await;
    assert_eq!(txs.get("note:notes:m3-0"), Some(&1), "m3 applied once");
    assert!(txs.values().all(|&n| n == 1), "{txs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_the_store_refuses_does_not_hold_back_its_batch() {
    let dir = support::PrivateDir::new("group-commit-poison");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    support::sql_exec(
        &db,
        "CREATE TRIGGER poison BEFORE INSERT ON effect_runs WHEN NEW.key LIKE '%poison%' \
         BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
    );
    for i in 0..9 {
        log.publish(note(&format!("m{i}"), 0)).await.unwrap();
    }
    log.publish(note("poison", 0)).await.unwrap();
    let worker = Arc::new(
        Worker::new(Arc::clone(&executor), NoteHandler::default()).with_config(WorkerConfig {
            max_deliveries: Some(3),
            retry: effects_core::executor::Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(20),
                max_attempts: None,
            },
            group_commit: Some(GroupCommit {
                max_runs: 64,
                max_wait: Duration::from_millis(200),
            }),
            ..config()
        }),
    );
    let report = run_until_acked(Arc::clone(&worker), &log, Duration::from_secs(30)).await;
    assert_eq!(report.applied, 9, "{report:?}");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    let dead = log.dead_letters("note").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, "poison-0");
    assert!(
        dead[0].reason.contains("disk on fire") && dead[0].reason.contains("3 attempts"),
        "the reason says why and how often: {}",
        dead[0].reason
    );
    assert_eq!(worker.handler().calls().get("poison:0"), Some(&3));
}

// ---------------------------------------------------------------------------------------------
// Heartbeats.

/// Notes whose input takes `slow` to load, with a visibility of a quarter of that: how many
/// times each was loaded, and the report.
async fn slow_loads(mutant: Option<Mutant>, slow: Duration) -> (usize, WorkerReport) {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let mut builder = Executor::builder(store.clone(), log.clone());
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let executor = Arc::new(builder.build());
    for i in 0..3 {
        log.publish(note(&format!("s{i}"), 0)).await.unwrap();
    }
    let loads = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&loads);
    let worker = Worker::new(executor, NoteHandler::default())
        .with_config(WorkerConfig {
            visibility: slow / 4,
            ..config()
        })
        .load_with(LoadWith::new(
            move |note: Note, _store: Tracked<SqliteStore>| {
                let loads = Arc::clone(&counted);
                async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(slow).await;
                    Ok::<Note, LoadError>(note)
                }
            },
        ));
    let report = run_until_acked(Arc::new(worker), &log, Duration::from_secs(30)).await;
    (loads.load(Ordering::SeqCst), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_is_not_redelivered_while_its_worker_lives() {
    let (loads, report) = slow_loads(None, Duration::from_millis(1_200)).await;
    assert_eq!(loads, 3, "each input loaded once: {report:?}");
    assert_eq!(report.deliveries, 3, "{report:?}");
    assert_eq!(report.applied, 3, "{report:?}");
}

/// The heartbeat check fails against a worker that sends none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_check_fails_without_heartbeats() {
    let (loads, report) = slow_loads(Some(Mutant::NoHeartbeat), Duration::from_millis(1_200)).await;
    // The copies queue behind their originals (same partition key) and find their runs: they
    // are delivered again, not loaded again.
    assert!(
        report.deliveries > 3,
        "without heartbeats the inputs come back while they are loaded: {loads} loads, {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_holds_its_input_with_acknowledgement_after_effects() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(1_200)))
        .mount(&server)
        .await;
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(
        Executor::builder(store.clone(), log.clone())
            .http(http_client(&server.uri(), 1))
            .build(),
    );
    log.publish(note("req1", 0)).await.unwrap();
    let worker = Arc::new(Worker::new(executor, NoteHandler::default()).with_config(
        WorkerConfig {
            visibility: Duration::from_millis(300),
            acknowledge: Acknowledge::AfterEffects,
            ..config()
        },
    ));
    let report = run_until_acked(Arc::clone(&worker), &log, Duration::from_secs(30)).await;
    assert_eq!(report.deliveries, 1, "not redelivered: {report:?}");
    assert_eq!(report.applied, 1, "{report:?}");
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}
