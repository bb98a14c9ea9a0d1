//! The worker on the embedded log: decode or load, handle, run, acknowledge; dead-letters what can
//! never succeed, keeps per-key order, bounds concurrency, shuts down gracefully. A store error
//! retried by the worker is in the store conformance suite (`store_conformance.rs`).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use effects_core::executor::Executor;
use effects_core::relay::RelayConfig;
use effects_core::store::{RunStatus, SqliteStore, Store, Tracked};
use effects_core::transport::{FetchRequest, OutgoingMessage, SqliteLog, Transport};
use effects_core::worker::{LoadEntity, LoadError, LoadWith, Processed, Worker, WorkerConfig};
use effects_core::{
    DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, Method, RequestEffect,
};
use serde::Deserialize;
use serde_json::json;
use support::{BlockHandler, card_datoms, eventually, http_client};
use tokio::sync::oneshot;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const TOPIC: &str = "cards-to-block";

async fn publish(log: &SqliteLog, topic: &str, id: &str, key: Option<&str>, payload: &[u8]) {
    log.publish(OutgoingMessage {
        id: id.to_owned(),
        topic: topic.to_owned(),
        partition_key: key.map(str::to_owned),
        headers: BTreeMap::new(),
        payload: payload.to_vec(),
    })
    .await
    .unwrap();
}

fn fast_config() -> WorkerConfig {
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

/// Runs `worker` until `done` holds (bounded by `timeout`), then shuts it down.
async fn run_until<S, T, C, H, I, F, Fut>(
    worker: Arc<Worker<S, T, C, H, I>>,
    what: &str,
    timeout: Duration,
    done: F,
) -> effects_core::worker::WorkerReport
where
    S: Store + Clone,
    T: Transport,
    C: effects_core::http::HttpClient + 'static,
    H: Handler,
    I: effects_core::worker::Inputs<H, S>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
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
    eventually(what, timeout, done).await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the worker stops within 10 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decodes_handles_runs_and_acknowledges() {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    let worker = Arc::new(
        Worker::new(Arc::clone(&executor), BlockHandler::default()).with_config(fast_config()),
    );
    for i in 0..10 {
        let card = json!({"id": format!("c{i}"), "customer_id": "u1", "status": "active"});
        publish(
            &log,
            TOPIC,
            &format!("in-{i}"),
            None,
            card.to_string().as_bytes(),
        )
        .await;
    }
    let report = run_until(
        Arc::clone(&worker),
        "10 acks",
        Duration::from_secs(10),
        || {
            let log = log.clone();
            async move { log.unacknowledged("block", TOPIC).await.unwrap() == 0 }
        },
    )
    .await;
    assert_eq!(report.deliveries, 10);
    assert_eq!(report.applied, 10);
    assert_eq!(report.dead_lettered, 0);
    let out = log.messages("card-status-changed").await.unwrap();
    assert_eq!(out.len(), 10);
    let c3 = store
        .entity(&LookupRef::new("card/id", "c3"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c3.get("card/status"), Some(&json!("blocked")));
    // The key is handler:topic:message-id.
    assert!(
        store
            .run("block:cards-to-block:in-3")
            .await
            .unwrap()
            .is_some()
    );
}

#[derive(Deserialize)]
struct BlockRequest {
    card_id: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_the_handlers_input_from_the_store() {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    executor
        .run("seed", card_datoms("c1", "u1", "active"))
        .await
        .unwrap();
    let worker = Arc::new(
        Worker::new(Arc::clone(&executor), BlockHandler::default())
            .with_config(fast_config())
            .load_with(LoadEntity::new(|r: BlockRequest| {
                LookupRef::new("card/id", r.card_id)
            })),
    );
    publish(&log, TOPIC, "in-1", Some("c1"), br#"{"card_id": "c1"}"#).await;
    publish(&log, TOPIC, "in-2", Some("zz"), br#"{"card_id": "zz"}"#).await;
    let report = run_until(
        Arc::clone(&worker),
        "2 acks",
        Duration::from_secs(10),
        || {
            let log = log.clone();
            async move { log.unacknowledged("block", TOPIC).await.unwrap() == 0 }
        },
    )
    .await;
    assert_eq!(report.applied, 1);
    assert_eq!(report.dead_lettered, 1);
    let c1 = store
        .entity(&LookupRef::new("card/id", "c1"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c1.get("card/status"), Some(&json!("blocked")));
    let dead = log.dead_letters("block").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, "in-2");
    assert_eq!(dead[0].reason, "entity [card/id \"zz\"] was not found");
}

/// A handler whose input says what to do, to produce every kind of bad outcome.
#[derive(Default)]
struct Probe {
    calls: AtomicUsize,
}

#[derive(Deserialize)]
struct ProbeInput {
    id: String,
    mode: String,
}

impl Handler for Probe {
    type Input = ProbeInput;
    type Output = Effects;
    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: "probe",
        topic: Some("probes"),
        key: None,
        input: "ProbeInput",
        schemas: &[],
    };

    fn handle(&self, input: ProbeInput) -> Effects {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let entity = LookupRef::new("probe/id", input.id.clone());
        let ok = Effects::from(DatomEffect::assert(
            entity.clone(),
            [("probe/seen", json!(true))],
        ));
        match input.mode.as_str() {
            "panic" => panic!("probe {} asked for it", input.id),
            "conflict" => ok.merge(DatomEffect::assert(entity, [("probe/seen", json!(false))])),
            "request" => ok.merge(
                RequestEffect::new(Method::Post, "notify", format!("/probe/{}", input.id))
                    .with_body(json!({"id": input.id})),
            ),
            _ => ok,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_of_every_kind_is_dead_lettered_and_acknowledged() {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    let handler = Probe::default();
    let worker = Arc::new(Worker::new(Arc::clone(&executor), handler).with_config(fast_config()));
    let bad: [(&str, &[u8], &str); 6] = [
        (
            "not-json",
            b"\xff\xfe garbage",
            "`probe` cannot decode its input `ProbeInput`",
        ),
        (
            "wrong-shape",
            br#"{"id": 1}"#,
            "invalid type: integer `1`, expected a string",
        ),
        ("missing-field", br#"{"id": "x"}"#, "missing field `mode`"),
        (
            "panics",
            br#"{"id": "p", "mode": "panic"}"#,
            "handler `probe` panicked: probe p asked for it",
        ),
        (
            "conflicts",
            br#"{"id": "q", "mode": "conflict"}"#,
            "conflicting datoms on [probe/id \"q\"]",
        ),
        (
            "needs-http",
            br#"{"id": "r", "mode": "request"}"#,
            "no HTTP client",
        ),
    ];
    for (id, payload, _) in &bad {
        publish(&log, "probes", id, None, payload).await;
    }
    publish(
        &log,
        "probes",
        "good",
        None,
        br#"{"id": "g", "mode": "ok"}"#,
    )
    .await;

    let report = run_until(
        Arc::clone(&worker),
        "7 acks",
        Duration::from_secs(10),
        || {
            let log = log.clone();
            async move { log.unacknowledged("probe", "probes").await.unwrap() == 0 }
        },
    )
    .await;
    assert_eq!(
        report.deliveries, 7,
        "each message delivered once: {report:?}"
    );
    assert_eq!(report.dead_lettered, 6);
    assert_eq!(report.applied, 1);
    assert_eq!(report.retried, 0);

    let dead = log.dead_letters("probe").await.unwrap();
    assert_eq!(dead.len(), 6);
    for (id, payload, reason) in bad {
        let d = dead.iter().find(|d| d.message_id == id).unwrap();
        assert!(
            d.reason.contains(reason),
            "{id}: `{}` should contain `{reason}`",
            d.reason
        );
        assert_eq!(d.payload, payload);
        assert_eq!(d.deliveries, 1);
    }
    // Nothing of the bad ones was written; the good one was.
    for id in ["p", "q", "r"] {
        let e = LookupRef::new("probe/id", id);
        assert_eq!(store.entity(&e, None).await.unwrap(), None, "{id}");
    }
    assert!(
        store
            .entity(&LookupRef::new("probe/id", "g"), None)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn a_redelivery_is_a_duplicate_and_does_not_call_the_handler_again() {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    executor
        .run("seed", card_datoms("c1", "u1", "active"))
        .await
        .unwrap();
    let handler = BlockHandler::default();
    let worker = Worker::new(Arc::clone(&executor), handler).load_with(LoadEntity::new(
        |r: BlockRequest| LookupRef::new("card/id", r.card_id),
    ));
    publish(&log, TOPIC, "in-1", Some("c1"), br#"{"card_id": "c1"}"#).await;
    let fetch = || FetchRequest {
        consumer: "block".into(),
        topic: TOPIC.into(),
        max: 1,
        visibility: Duration::from_millis(1),
        wait: Duration::ZERO,
    };
    let first = log.fetch(fetch()).await.unwrap().pop().unwrap();
    // The same delivery, twice (as when the ack of the first is lost).
    let a = worker.process(first.clone()).await;
    let b = worker.process(first).await;
    let Processed::Applied { tx } = a else {
        panic!("{a:?}")
    };
    assert_eq!(b, Processed::Duplicate { tx });
    // The card is blocked now, so running the handler again would give other effects (Empty):
    // the worker must not call it, and it did not.
    assert_eq!(worker.handler().calls.load(Ordering::Relaxed), 1);
    assert_eq!(worker.report().duplicates, 1);
    assert_eq!(log.messages("card-status-changed").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_bounded_and_one_partition_key_is_processed_in_order() {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    for i in 0..12 {
        executor
            .run(
                format!("seed-{i}"),
                card_datoms(&format!("c{i}"), "u1", "active"),
            )
            .await
            .unwrap();
    }
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    let loader = {
        let (in_flight, max_in_flight, order) = (
            Arc::clone(&in_flight),
            Arc::clone(&max_in_flight),
            Arc::clone(&order),
        );
        LoadWith::new(move |r: BlockRequest, store: Tracked<SqliteStore>| {
            let (in_flight, max_in_flight, order) = (
                Arc::clone(&in_flight),
                Arc::clone(&max_in_flight),
                Arc::clone(&order),
            );
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                max_in_flight.fetch_max(now, Ordering::SeqCst);
                order.lock().unwrap().push(r.card_id.clone());
                tokio::time::sleep(Duration::from_millis(30)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                let lookup = LookupRef::new("card/id", r.card_id);
                let entity = store
                    .entity(&lookup, None)
                    .await?
                    .ok_or(LoadError::NotFound {
                        what: lookup.to_string(),
                    })?;
                entity.decode().map_err(|e| LoadError::Invalid {
                    reason: e.to_string(),
                })
            }
        })
    };
    let config = WorkerConfig {
        concurrency: 3,
        ..fast_config()
    };
    let worker = Arc::new(
        Worker::new(Arc::clone(&executor), BlockHandler::default())
            .with_config(config)
            .load_with(loader),
    );
    // Twelve distinct cards (run concurrently, 3 at a time) ...
    for i in 0..12 {
        let payload = json!({"card_id": format!("c{i}")}).to_string();
        publish(&log, TOPIC, &format!("in-{i}"), None, payload.as_bytes()).await;
    }
    // ... and five messages on one partition key, which must go one by one, in order.
    for i in 0..5 {
        let payload = json!({"card_id": format!("k{i}")}).to_string();
        publish(
            &log,
            TOPIC,
            &format!("k-{i}"),
            Some("same"),
            payload.as_bytes(),
        )
        .await;
    }
    let report = run_until(
        Arc::clone(&worker),
        "17 acks",
        Duration::from_secs(15),
        || {
            let log = log.clone();
            async move { log.unacknowledged("block", TOPIC).await.unwrap() == 0 }
        },
    )
    .await;
    assert_eq!(report.deliveries, 17);
    assert_eq!(report.applied, 12);
    assert_eq!(
        report.dead_lettered, 5,
        "k0..k4 do not exist: dead-lettered as not found"
    );
    let max = max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 3, "at most 3 at once, saw {max}");
    assert!(max >= 2, "work ran concurrently, saw at most {max}");
    let keyed: Vec<String> = order
        .lock()
        .unwrap()
        .iter()
        .filter(|id| id.starts_with('k'))
        .cloned()
        .collect();
    assert_eq!(keyed, ["k0", "k1", "k2", "k3", "k4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_work_in_flight() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(400)))
        .mount(&server)
        .await;
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(
        Executor::builder(store.clone(), log.clone())
            .http(http_client(&server.uri(), 1))
            .build(),
    );
    let worker =
        Arc::new(Worker::new(Arc::clone(&executor), Probe::default()).with_config(fast_config()));
    publish(
        &log,
        "probes",
        "slow",
        None,
        br#"{"id": "s", "mode": "request"}"#,
    )
    .await;

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
    // Shut down while the request is in flight.
    eventually("the request in flight", Duration::from_secs(10), || {
        let server = &server;
        async move { !server.received_requests().await.unwrap().is_empty() }
    })
    .await;
    let _ = stop.send(());
    let report = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.applied, 1, "{report:?}");
    assert_eq!(log.unacknowledged("probe", "probes").await.unwrap(), 0);
    assert_eq!(
        store
            .run("probe:probes:slow")
            .await
            .unwrap()
            .unwrap()
            .status,
        RunStatus::Done
    );
}

/// What a boxed loader returns.
type Loaded<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, LoadError>> + Send>>;

/// A loader that says "not yet" while the card it needs does not exist.
fn waiting_loader(
    loads: Arc<AtomicUsize>,
) -> LoadWith<
    BlockRequest,
    impl Fn(BlockRequest, Tracked<SqliteStore>) -> Loaded<cards::Card> + Send + Sync + 'static,
> {
    LoadWith::new(move |r: BlockRequest, store: Tracked<SqliteStore>| {
        let loads = Arc::clone(&loads);
        Box::pin(async move {
            loads.fetch_add(1, Ordering::SeqCst);
            let lookup = LookupRef::new("card/id", r.card_id);
            let Some(entity) = store.entity(&lookup, None).await? else {
                return Err(LoadError::NotYet {
                    reason: format!("{lookup} has not been created yet"),
                });
            };
            entity.decode().map_err(|e| LoadError::Invalid {
                reason: e.to_string(),
            })
        }) as Loaded<cards::Card>
    })
}

fn waiting_config(attempts: u32) -> WorkerConfig {
    WorkerConfig {
        not_yet: effects_core::executor::Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(40),
            max_attempts: Some(attempts),
        },
        ..fast_config()
    }
}

/// A message whose input has not arrived yet is tried again, holding its place, and applied
/// once the input is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_that_says_not_yet_is_tried_again_until_its_input_arrives() {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    let loads = Arc::new(AtomicUsize::new(0));
    let worker = Arc::new(
        Worker::new(Arc::clone(&executor), BlockHandler::default())
            .with_config(waiting_config(100))
            .load_with(waiting_loader(Arc::clone(&loads))),
    );
    publish(&log, TOPIC, "early", Some("c1"), br#"{"card_id": "c1"}"#).await;
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
    eventually("two attempts told not yet", Duration::from_secs(10), || {
        let loads = Arc::clone(&loads);
        async move { loads.load(Ordering::SeqCst) >= 2 }
    })
    .await;
    executor
        .run("create-c1", card_datoms("c1", "u1", "active"))
        .await
        .unwrap();
    eventually("the ack", Duration::from_secs(10), || {
        let log = log.clone();
        async move { log.unacknowledged("block", TOPIC).await.unwrap() == 0 }
    })
    .await;
    let _ = stop.send(());
    let report = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.applied, 1, "{report:?}");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_eq!(
        report.deliveries, 1,
        "held by the worker, not redelivered: {report:?}"
    );
    assert_eq!(worker.handler().calls.load(Ordering::Relaxed), 1);
    assert!(log.dead_letters("block").await.unwrap().is_empty());
}

/// One that never arrives is dead-lettered with the reason once the waits are spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_that_keeps_saying_not_yet_is_dead_lettered_with_the_reason() {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    let loads = Arc::new(AtomicUsize::new(0));
    let worker = Arc::new(
        Worker::new(Arc::clone(&executor), BlockHandler::default())
            .with_config(waiting_config(4))
            .load_with(waiting_loader(Arc::clone(&loads))),
    );
    publish(&log, TOPIC, "never", Some("c9"), br#"{"card_id": "c9"}"#).await;
    let report = run_until(
        Arc::clone(&worker),
        "the dead letter",
        Duration::from_secs(10),
        || {
            let log = log.clone();
            async move { log.unacknowledged("block", TOPIC).await.unwrap() == 0 }
        },
    )
    .await;
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(loads.load(Ordering::SeqCst), 4, "four attempts");
    let dead = log.dead_letters("block").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .reason
            .starts_with("gave up after 4 attempts, each told not yet: ")
            && dead[0]
                .reason
                .contains("[card/id \"c9\"] has not been created yet"),
        "{}",
        dead[0].reason
    );
}
