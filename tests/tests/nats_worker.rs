//! End to end on NATS (feature `nats`): the `Worker` consuming from JetStream with the SQLite
//! store, two workers on two connections sharing one consumer group, inputs published twice
//! (absorbed by the stream) and a crashed consumer's leases redelivered after the ack wait.
//! Each message is applied once, counted at the source (handler calls, `Applied` outcomes per
//! message), and each output message reaches NATS once.
//!
//! Run: `cargo test -p effects-tests --features nats --test nats_worker -- --nocapture`
//! (prints a `FIGURE` line).

mod nats_support;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use effects_core::executor::Executor;
use effects_core::store::{SqliteOptions, SqliteStore, Synchronous};
use effects_core::transport::{FetchRequest, OutgoingMessage, Transport};
use effects_core::worker::{Processed, Worker, WorkerConfig};
use nats_support::TestStream;
use serde_json::json;
use support::{BlockHandler, temp_dir};

const INPUT: &str = "cards-to-block";
const OUTPUT: &str = "card-status-changed";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_nats_apply_each_message_once() {
    const N: usize = 150;
    const REPUBLISHED: usize = 30;
    const ABANDONED: usize = 10;
    let visibility = Duration::from_secs(3);
    let stream = TestStream::new("worker", |_| {}).await;
    let nats = stream.transport.clone();
    let dir = temp_dir("nats-worker");
    let options = SqliteOptions {
        synchronous: Synchronous::Normal,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open_with(dir.join("store.db"), &options).expect("open the store");

    let input = |i: usize| {
        OutgoingMessage {
        id: format!("in-{i}"),
        topic: INPUT.to_owned(),
        partition_key: Some(format!("u{}", i % 10)),
        headers: BTreeMap::new(),
        payload: json!({"id": format!("c{i}"), "customer_id": format!("u{}", i % 10), "status": "active"})
            .to_string()
            .into_bytes(),
    }
    };
    for i in 0..N {
        nats.publish(input(i)).await.expect("publish an input");
    }
    for i in 0..REPUBLISHED {
        nats.publish(input(i * 5))
            .await
            .expect("publish an input again");
    }
    assert_eq!(nats.stats().duplicates, REPUBLISHED as u64);

    // A consumer of the group that takes messages and dies without acknowledging them.
    let crashed = stream.connect_again().await;
    let mut abandoned = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while abandoned.len() < ABANDONED && Instant::now() < deadline {
        let batch = crashed
            .fetch(FetchRequest {
                consumer: "block".into(),
                topic: INPUT.into(),
                max: ABANDONED - abandoned.len(),
                visibility,
                wait: Duration::from_millis(200),
            })
            .await
            .expect("fetch");
        abandoned.extend(batch.into_iter().map(|d| d.message_id));
    }
    assert_eq!(abandoned.len(), ABANDONED);
    drop(crashed);

    type Seen = Arc<Mutex<Vec<(String, Processed, u32, u64)>>>;
    let seen: Seen = Arc::default();
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut workers = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let transport = stream.connect_again().await;
        let executor = Arc::new(Executor::builder(store.clone(), transport).build());
        let log = Arc::clone(&seen);
        let worker = Arc::new(
            Worker::new(executor, BlockHandler::default())
                .with_config(WorkerConfig {
                    concurrency: 4,
                    fetch_wait: Duration::from_millis(200),
                    visibility,
                    ..WorkerConfig::default()
                })
                .on_processed(move |d, p| {
                    log.lock().expect("seen").push((
                        d.message_id.clone(),
                        p.clone(),
                        d.deliveries,
                        d.sequence,
                    ));
                }),
        );
        workers.push(Arc::clone(&worker));
        let stop = Arc::clone(&stop);
        tasks.spawn(async move { worker.run(async move { stop.notified().await }).await });
    }

    let started = Instant::now();
    let applied_ids = |seen: &Seen| {
        let seen = seen.lock().expect("seen");
        let mut ids: Vec<&String> = seen
            .iter()
            .filter(|(_, p, _, _)| matches!(p, Processed::Applied { .. }))
            .map(|(id, _, _, _)| id)
            .collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    while applied_ids(&seen) < N && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();

    // The outputs, read from NATS by another group.
    let mut outputs: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while outputs.values().sum::<usize>() < N && Instant::now() < deadline {
        let batch = nats
            .fetch(FetchRequest {
                consumer: "verify".into(),
                topic: OUTPUT.into(),
                max: 64,
                visibility: Duration::from_secs(60),
                wait: Duration::from_millis(200),
            })
            .await
            .expect("fetch outputs");
        for d in batch {
            nats.ack(&d).await.expect("ack");
            *outputs.entry(d.message_id).or_default() += 1;
        }
    }
    // Anything late would show up here.
    let late = nats
        .fetch(FetchRequest {
            consumer: "verify".into(),
            topic: OUTPUT.into(),
            max: 64,
            visibility: Duration::from_secs(60),
            wait: Duration::from_millis(500),
        })
        .await
        .expect("fetch outputs");

    stop.notify_waiters();
    let mut reports = Vec::new();
    while let Some(done) = tasks.join_next().await {
        reports.push(done.expect("worker task"));
    }

    let seen = seen.lock().expect("seen").clone();
    let mut applied: HashMap<&str, usize> = HashMap::new();
    for (id, p, _, _) in &seen {
        if matches!(p, Processed::Applied { .. }) {
            *applied.entry(id.as_str()).or_default() += 1;
        }
    }
    let handler_calls: usize = workers
        .iter()
        .map(|w| w.handler().calls.load(Ordering::Relaxed))
        .sum();
    let redelivered: Vec<u32> = seen
        .iter()
        .filter(|(id, _, _, _)| abandoned.contains(id))
        .map(|(_, _, deliveries, _)| *deliveries)
        .collect();
    let doubled = applied.values().filter(|&&n| n > 1).count();
    let others: Vec<&(String, Processed, u32, u64)> = seen
        .iter()
        .filter(|(_, p, _, _)| !matches!(p, Processed::Applied { .. }))
        .collect();
    if !others.is_empty() {
        let ids: Vec<&String> = others.iter().map(|o| &o.0).collect();
        let related: Vec<_> = seen.iter().filter(|s| ids.contains(&&s.0)).collect();
        println!("not applied: {others:?}; all their deliveries: {related:?}");
    }
    let lost = N - applied.len();
    println!(
        "FIGURE nats_worker: messages={N} republished={REPUBLISHED} (stream duplicates={}) \
         abandoned_leases={ABANDONED} deliveries={} handler_calls={handler_calls} applied={} \
         doubled={doubled} lost={lost} outputs={} output_duplicates={} per_worker={:?} \
         elapsed_ms={}",
        nats.stats().duplicates,
        seen.len(),
        applied.len(),
        outputs.len(),
        outputs.values().filter(|&&n| n > 1).count(),
        reports.iter().map(|r| r.applied).collect::<Vec<_>>(),
        elapsed.as_millis()
    );
    assert_eq!(lost, 0, "every message applied");
    assert_eq!(doubled, 0, "no message applied twice");
    assert_eq!(handler_calls, N, "the handler ran once per message");
    // Each abandoned lease came back after the ack wait and was applied from a redelivery. A
    // message may be delivered once more than that (a lease that lapsed while a loaded machine
    // was busy): such a delivery must then be a `Duplicate`, never a second application.
    for id in &abandoned {
        let mine: Vec<&(String, Processed, u32, u64)> =
            seen.iter().filter(|s| &s.0 == id).collect();
        assert!(
            mine.iter()
                .any(|s| s.2 >= 2 && matches!(s.1, Processed::Applied { .. })),
            "abandoned {id} applied from a redelivery: {mine:?}"
        );
    }
    assert!(
        redelivered.len() >= ABANDONED,
        "every abandoned lease redelivered: {redelivered:?}"
    );
    assert!(
        others
            .iter()
            .all(|o| matches!(o.1, Processed::Duplicate { .. })),
        "any extra delivery is a duplicate: {others:?}"
    );
    assert_eq!(outputs.len(), N, "one output per message");
    assert!(outputs.values().all(|&n| n == 1), "each output once");
    assert!(late.is_empty(), "no late output");
    assert!(
        reports.iter().all(|r| r.applied > 0),
        "both workers took a share: {reports:?}"
    );
}
