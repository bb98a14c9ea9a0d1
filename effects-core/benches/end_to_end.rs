//! End to end on the servers: inputs published to NATS JetStream, handled by 1, 2 and 4 worker
//! processes sharing one consumer group (each a [`Worker`] at concurrency 8 with its relay) that
//! commit to PostgreSQL and publish their output to NATS, where this process reads it back.
//!
//! For each process count, on a fresh stream and schema:
//!
//! - **throughput**: `N` inputs published at once (a backlog), timed from the first publish to
//!   the last output read back;
//! - **latency**: inputs published at a steady rate of half that throughput for a few seconds;
//!   each input carries its publish time and its output carries it on, so the latency of one
//!   message is from its publish to its output arriving here (p50 and p99).
//!
//! Inputs are keyed by customer (1 000 customers, so 32 partitions all carry work), so messages
//! of one customer are handled in publish order across the processes. Every output is checked
//! to arrive exactly once.
//!
//! Run: `cargo bench -p effects-core --features postgres,nats --bench end_to_end` (add
//! `-- quick` for a smoke run). Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust; or
//! `EFFECTS_POSTGRES_URL`) and NATS with JetStream on 127.0.0.1:4222 (or `EFFECTS_NATS_URL`).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use effects_core::executor::Executor;
use effects_core::handler::{Handler, HandlerDescriptor};
use effects_core::nats::{NatsConfig, NatsTransport};
use effects_core::postgres::{PostgresOptions, PostgresStore};
use effects_core::transport::{FetchRequest, OutgoingMessage, Transport};
use effects_core::worker::{Worker, WorkerConfig};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect};
use serde::Deserialize;
use serde_json::json;

const INPUT: &str = "cards-seen";
const OUTPUT: &str = "card-seen";
const PARTITIONS: u16 = 32;
const CUSTOMERS: usize = 1_000;
const ROLE: &str = "EFFECTS_E2E_ROLE";

fn postgres_url() -> String {
    std::env::var("EFFECTS_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn nats_url() -> String {
    std::env::var("EFFECTS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn nats_config(stream: &str, prefix: &str) -> NatsConfig {
    let mut config = NatsConfig::new(nats_url()).with_stream(stream, prefix);
    config.partitions = PARTITIONS;
    config
}

/// An input: a card seen at a terminal.
#[derive(Deserialize)]
struct Seen {
    id: String,
    customer_id: String,
    sent_at_us: u64,
}

/// Records the card as seen and tells the customer's topic, carrying the input's publish time.
struct SeenHandler;

impl Handler for SeenHandler {
    type Input = Seen;
    type Output = Effects;

    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: "seen",
        topic: Some(INPUT),
        key: None,
        input: "Seen",
        schemas: &[],
    };

    fn handle(&self, seen: Seen) -> Effects {
        Effects::from(DatomEffect::assert(
            LookupRef::new("card/id", seen.id.clone()),
            [
                ("card/customer_id", json!(seen.customer_id)),
                ("card/last_seen_us", json!(seen.sent_at_us)),
            ],
        ))
        .merge(
            MessageEffect::new(
                OUTPUT,
                json!({"card_id": seen.id, "sent_at_us": seen.sent_at_us}),
            )
            .with_key(seen.customer_id),
        )
    }
}

/// A worker process: serves until its stdin closes.
fn worker_process() {
    let stream = std::env::var("E2E_STREAM").expect("E2E_STREAM");
    let prefix = std::env::var("E2E_PREFIX").expect("E2E_PREFIX");
    let schema = std::env::var("E2E_SCHEMA").expect("E2E_SCHEMA");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    runtime.block_on(async move {
        let store = PostgresStore::connect(PostgresOptions {
            pool_size: 10,
            ..PostgresOptions::new(postgres_url()).with_schema(&schema)
        })
        .await
        .expect("connect to PostgreSQL");
        let nats = NatsTransport::connect(nats_config(&stream, &prefix))
            .await
            .expect("connect to NATS");
        let executor = Arc::new(Executor::builder(store, nats).build());
        let worker = Worker::new(executor, SeenHandler).with_config(WorkerConfig {
            concurrency: 8,
            fetch_wait: Duration::from_millis(100),
            visibility: Duration::from_secs(30),
            ..WorkerConfig::default()
        });
        println!("ready");
        std::io::stdout().flush().expect("stdout");
        let stop = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        });
        let report = worker
            .run(async move {
                let _ = stop.await;
            })
            .await;
        eprintln!("worker {}: {report:?}", std::process::id());
    });
}

fn input(i: usize, sent_at_us: u64) -> OutgoingMessage {
    let customer = format!("u{}", i % CUSTOMERS);
    OutgoingMessage {
        id: format!("in-{i}"),
        topic: INPUT.to_owned(),
        partition_key: Some(customer.clone()),
        headers: BTreeMap::new(),
        payload: json!({"id": format!("c{i}"), "customer_id": customer, "sent_at_us": sent_at_us})
            .to_string()
            .into_bytes(),
    }
}

/// Reads outputs until `ids` distinct ones arrived (or `limit` passed): per card, how often it
/// arrived and its latency in µs.
async fn read_outputs(
    nats: &NatsTransport,
    seen: &mut HashMap<String, (usize, u64)>,
    until: usize,
    limit: Duration,
) -> Instant {
    let deadline = Instant::now() + limit;
    let mut last = Instant::now();
    while seen.len() < until && Instant::now() < deadline {
        let batch = nats
            .fetch(FetchRequest {
                consumer: "verify".into(),
                topic: OUTPUT.into(),
                max: 256,
                visibility: Duration::from_secs(60),
                wait: Duration::from_millis(100),
            })
            .await
            .expect("fetch outputs");
        let arrived = now_us();
        for d in &batch {
            let body: serde_json::Value = serde_json::from_slice(&d.payload).expect("json");
            let card = body["card_id"].as_str().expect("card_id").to_owned();
            let sent = body["sent_at_us"].as_u64().expect("sent_at_us");
            let entry = seen
                .entry(card)
                .or_insert((0, arrived.saturating_sub(sent)));
            entry.0 += 1;
            last = Instant::now();
        }
        for d in &batch {
            nats.ack(d).await.expect("ack");
        }
    }
    last
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

struct Row {
    processes: usize,
    messages: usize,
    throughput: f64,
    paced: usize,
    rate: f64,
    p50: f64,
    p99: f64,
}

async fn one(processes: usize, backlog: usize, paced_for: Duration) -> Row {
    let pid = std::process::id();
    let stream = format!("E2E_{pid}_{processes}");
    let prefix = format!("e2e{pid}p{processes}");
    let schema = format!("e2e_{pid}_{processes}");
    // Migrate once here, so the workers do not queue on the migration lock.
    drop(
        PostgresStore::connect(PostgresOptions::new(postgres_url()).with_schema(&schema))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "this benchmark needs PostgreSQL at {} (user postgres, trust auth): {e}",
                    postgres_url()
                )
            }),
    );
    let nats = NatsTransport::connect(nats_config(&stream, &prefix))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "this benchmark needs NATS with JetStream at {}: {e}; start one with \
                 `nats-server -js -p 4222 -sd <dir>`",
                nats_url()
            )
        });
    let exe = std::env::current_exe().expect("current_exe");
    let mut children: Vec<Child> = (0..processes)
        .map(|_| {
            Command::new(&exe)
                .env(ROLE, "worker")
                .env("E2E_STREAM", &stream)
                .env("E2E_PREFIX", &prefix)
                .env("E2E_SCHEMA", &schema)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn a worker process")
        })
        .collect();
    for child in &mut children {
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line.trim(), "ready", "a worker process did not start");
    }

    // Throughput: a backlog.
    let mut seen: HashMap<String, (usize, u64)> = HashMap::new();
    let started = Instant::now();
    let sent = now_us();
    for chunk in (0..backlog).collect::<Vec<_>>().chunks(64) {
        let publishes = chunk.iter().map(|&i| nats.publish(input(i, sent)));
        for result in futures_util::future::join_all(publishes).await {
            result.expect("publish an input");
        }
    }
    let last = read_outputs(&nats, &mut seen, backlog, Duration::from_secs(600)).await;
    assert_eq!(seen.len(), backlog, "every input's output arrived");
    let throughput = backlog as f64 / (last - started).as_secs_f64();

    // Latency: a steady rate of half the throughput.
    let rate = throughput / 2.0;
    let paced = ((rate * paced_for.as_secs_f64()) as usize).max(20);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut latencies = Vec::with_capacity(paced);
    let mut paced_seen: HashMap<String, (usize, u64)> = HashMap::new();
    let publisher = {
        let nats = nats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in backlog..backlog + paced {
                tick.tick().await;
                nats.publish(input(i, now_us()))
                    .await
                    .expect("publish an input");
            }
        })
    };
    read_outputs(
        &nats,
        &mut paced_seen,
        paced,
        paced_for + Duration::from_secs(120),
    )
    .await;
    publisher.await.expect("publisher");
    assert_eq!(
        paced_seen.len(),
        paced,
        "every paced input's output arrived"
    );
    // Anything late or twice shows up here.
    read_outputs(&nats, &mut seen, usize::MAX, Duration::from_millis(500)).await;
    for (card, (count, latency)) in paced_seen {
        assert!(!seen.contains_key(&card), "{card} arrived in both phases");
        assert_eq!(count, 1, "{card} arrived {count} times");
        latencies.push(latency);
    }
    assert!(
        seen.values().all(|(count, _)| *count == 1),
        "each output once"
    );
    latencies.sort_unstable();

    for child in &mut children {
        drop(child.stdin.take());
    }
    for mut child in children {
        let status = child.wait().expect("wait for a worker");
        assert!(status.success(), "a worker process failed: {status}");
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        nats.jetstream().delete_stream(&stream),
    )
    .await;
    if let Ok((client, connection)) =
        tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await
    {
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let _ = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await;
    }
    Row {
        processes,
        messages: backlog,
        throughput,
        paced,
        rate,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
    }
}

fn main() {
    if std::env::var(ROLE).is_ok_and(|r| r == "worker") {
        worker_process();
        return;
    }
    let quick = std::env::args().any(|a| a == "quick");
    let (backlog, paced_for) = if quick {
        (300, Duration::from_secs(2))
    } else {
        (3_000, Duration::from_secs(6))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    println!(
        "end to end: NATS -> worker processes (concurrency 8 each) -> PostgreSQL -> NATS; \
         {PARTITIONS} partitions, {CUSTOMERS} customers"
    );
    println!(
        "| worker processes | backlog messages | throughput msgs/s | vs 1 process | paced messages | paced rate msgs/s | latency p50 ms | latency p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut base = None;
    for processes in [1, 2, 4] {
        let row = runtime.block_on(one(processes, backlog, paced_for));
        let base = *base.get_or_insert(row.throughput);
        println!(
            "| {} | {} | {:.0} | {:.2}x | {} | {:.0} | {:.1} | {:.1} |",
            row.processes,
            row.messages,
            row.throughput,
            row.throughput / base,
            row.paced,
            row.rate,
            row.p50,
            row.p99
        );
    }
}
