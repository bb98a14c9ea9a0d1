//! Fetch + acknowledge throughput of the transports, one process, on a backlog of keyed
//! messages (1 000 keys over 32 partitions), against a hand-written JetStream consumer measured
//! in the same run.
//!
//! - **raw JetStream** (the baseline): one durable pull consumer over every partition's subject
//!   (no per-key order at all), pulling batches of 256 and acknowledging each batch with
//!   confirmed acks sent together. What the server and the client library can do.
//! - **NatsTransport**: [`Transport::fetch`] (at most 256, visibility 60 s) and
//!   [`Transport::ack_many`] in a loop, per-key order kept; with the pull requests and
//!   acknowledgements per message it needed (counted by the transport).
//! - **SqliteLog**: the same loop on the embedded log (its own file, `synchronous = FULL`).
//!
//! Each mode runs on a stream (or file) of its own holding the same backlog; the figure is
//! messages fetched and acknowledged per second, from the first fetch to the last
//! acknowledgement. Every message is checked to arrive once and in order per key.
//!
//! Run: `cargo bench -p effects-core --features nats --bench transport` (add `-- quick` for a
//! smoke run). Needs NATS with JetStream on 127.0.0.1:4222 (or `EFFECTS_NATS_URL`).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use effects_core::nats::async_nats::jetstream::consumer::{AckPolicy, pull};
use effects_core::nats::{NatsConfig, NatsTransport};
use effects_core::transport::{Delivery, FetchRequest, OutgoingMessage, SqliteLog, Transport};
use futures_util::StreamExt;
use futures_util::future::join_all;

const TOPIC: &str = "postings";
const PARTITIONS: u16 = 32;
const KEYS: usize = 1_000;
const BATCH: usize = 256;

fn nats_url() -> String {
    std::env::var("EFFECTS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn unique(name: &str) -> (String, String) {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    let id = format!("{name}_{}_{nanos}", std::process::id());
    (
        format!("BENCH_{id}"),
        format!("bench{}", id.to_ascii_lowercase()),
    )
}

fn message(i: usize) -> OutgoingMessage {
    let key = format!("account-{}", i % KEYS);
    OutgoingMessage {
        id: format!("post:{i}#0"),
        topic: TOPIC.to_owned(),
        partition_key: Some(key),
        headers: BTreeMap::new(),
        payload: format!("{{\"n\":{i}}}").into_bytes(),
    }
}

fn index_of(payload: &[u8]) -> usize {
    let text = String::from_utf8_lossy(payload);
    text.trim_start_matches("{\"n\":")
        .trim_end_matches('}')
        .parse()
        .expect("a payload written by this bench")
}

async fn connect(name: &str, in_flight: Option<u32>) -> (NatsTransport, NatsConfig) {
    let (stream, prefix) = unique(name);
    let mut config = NatsConfig::new(nats_url()).with_stream(stream, prefix);
    config.partitions = PARTITIONS;
    if let Some(n) = in_flight {
        config.partition_in_flight = n;
    }
    let transport = NatsTransport::connect(config.clone())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "this bench needs NATS with JetStream at {}: {e}",
                nats_url()
            )
        });
    (transport, config)
}

async fn publish_backlog(t: &NatsTransport, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(512) {
        let sent = join_all(chunk.iter().map(|&i| t.publish(message(i)))).await;
        for r in sent {
            r.expect("publish");
        }
    }
}

/// Checks that every message arrived once and each key's in publish order.
fn check(seen: &[usize], n: usize) {
    let mut last: HashMap<usize, usize> = HashMap::new();
    let mut count = vec![0_u32; n];
    for &i in seen {
        count[i] += 1;
        let key = i % KEYS;
        if let Some(&before) = last.get(&key) {
            assert!(before < i, "key {key}: {i} after {before}");
        }
        last.insert(key, i);
    }
    assert!(count.iter().all(|&c| c == 1), "every message exactly once");
}

struct Figure {
    per_second: f64,
    pulls_per_message: Option<f64>,
    acks_per_message: Option<f64>,
    fetches: usize,
}

async fn raw_jetstream(n: usize) -> Figure {
    let (t, config) = connect("raw", None).await;
    publish_backlog(&t, n).await;
    let js = t.jetstream().clone();
    let consumer = js
        .create_consumer_on_stream(
            pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(60),
                max_ack_pending: 4096,
                filter_subject: format!("{}.msg.>", config.subject_prefix),
                ..pull::Config::default()
            },
            config.stream.as_str(),
        )
        .await
        .expect("a raw consumer");
    let started = Instant::now();
    let mut seen = Vec::with_capacity(n);
    let mut pulls = 0_usize;
    while seen.len() < n && started.elapsed() < Duration::from_secs(300) {
        pulls += 1;
        let mut batch = consumer
            .fetch()
            .max_messages(BATCH)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .expect("pull");
        let mut messages = Vec::new();
        while let Some(m) = batch.next().await {
            messages.push(m.expect("a message"));
        }
        for m in &messages {
            seen.push(index_of(&m.message.payload));
        }
        let confirmed = join_all(messages.iter().map(|m| {
            let reply = m.message.reply.clone().expect("a reply subject");
            let client = t.client().clone();
            async move { client.request(reply, "+ACK".into()).await }
        }))
        .await;
        for r in confirmed {
            r.expect("confirmed ack");
        }
    }
    let elapsed = started.elapsed();
    let _ = js.delete_stream(&config.stream).await;
    let _ = js.delete_stream(t.holds_stream_name()).await;
    assert_eq!(seen.len(), n, "the raw consumer read the backlog");
    Figure {
        per_second: n as f64 / elapsed.as_secs_f64(),
        pulls_per_message: Some(pulls as f64 / n as f64),
        acks_per_message: None,
        fetches: pulls,
    }
}

async fn fetch_and_ack<T: Transport + Clone>(
    t: &T,
    n: usize,
    ack_after: Duration,
) -> (Duration, usize) {
    let started = Instant::now();
    let mut seen = Vec::with_capacity(n);
    let mut fetches = 0;
    let mut acks = tokio::task::JoinSet::new();
    while seen.len() < n && started.elapsed() < Duration::from_secs(300) {
        let batch: Vec<Delivery> = t
            .fetch(FetchRequest {
                consumer: "bench".into(),
                topic: TOPIC.into(),
                max: BATCH,
                visibility: Duration::from_secs(60),
                wait: Duration::from_secs(1),
            })
            .await
            .expect("fetch");
        fetches += 1;
        seen.extend(batch.iter().map(|d| index_of(&d.payload)));
        if ack_after.is_zero() {
            for r in t.ack_many(&batch).await {
                r.expect("ack");
            }
        } else {
            // As a worker committing batches does: the deliveries stay in flight while the
            // next fetches go on.
            let t = t.clone();
            acks.spawn(async move {
                tokio::time::sleep(ack_after).await;
                for r in t.ack_many(&batch).await {
                    r.expect("ack");
                }
            });
        }
    }
    while let Some(done) = acks.join_next().await {
        done.expect("an ack task");
    }
    let elapsed = started.elapsed();
    assert_eq!(seen.len(), n, "the transport handed out the backlog");
    check(&seen, n);
    (elapsed, fetches)
}

async fn nats_transport(n: usize, in_flight: Option<u32>, ack_after: Duration) -> Figure {
    let (t, config) = connect("transport", in_flight).await;
    publish_backlog(&t, n).await;
    let (elapsed, fetches) = fetch_and_ack(&t, n, ack_after).await;
    let stats = t.stats();
    t.close().await;
    let _ = t.jetstream().delete_stream(&config.stream).await;
    let _ = t.jetstream().delete_stream(t.holds_stream_name()).await;
    Figure {
        per_second: n as f64 / elapsed.as_secs_f64(),
        pulls_per_message: Some(stats.pull_requests as f64 / n as f64),
        acks_per_message: Some(stats.acked as f64 / n as f64),
        fetches,
    }
}

/// Pull requests per second sent by one process fetching (wait 1 s) from a group on an empty
/// topic, holding all 32 partitions.
async fn nats_idle() -> f64 {
    let (t, config) = connect("idle", None).await;
    let request = FetchRequest {
        consumer: "bench".into(),
        topic: TOPIC.into(),
        max: BATCH,
        visibility: Duration::from_secs(60),
        wait: Duration::from_secs(1),
    };
    // Let the group open and its readers start.
    t.fetch(request.clone()).await.expect("fetch");
    let before = t.stats().pull_requests;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let got = t.fetch(request.clone()).await.expect("fetch");
        assert!(got.is_empty());
    }
    let per_second = (t.stats().pull_requests - before) as f64 / started.elapsed().as_secs_f64();
    t.close().await;
    let _ = t.jetstream().delete_stream(&config.stream).await;
    let _ = t.jetstream().delete_stream(t.holds_stream_name()).await;
    per_second
}

async fn sqlite_log(n: usize) -> Figure {
    let dir = std::env::temp_dir().join(unique("sqlite").1);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let log = SqliteLog::open(dir.join("log.db")).expect("open the log");
    for i in 0..n {
        log.publish(message(i)).await.expect("publish");
    }
    let (elapsed, fetches) = fetch_and_ack(&log, n, Duration::ZERO).await;
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
    Figure {
        per_second: n as f64 / elapsed.as_secs_f64(),
        pulls_per_message: None,
        acks_per_message: None,
        fetches,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    // `in-flight=N`: NatsConfig::partition_in_flight for the NatsTransport runs (several allowed).
    let mut in_flight: Vec<Option<u32>> = std::env::args()
        .filter_map(|a| a.strip_prefix("in-flight=").and_then(|n| n.parse().ok()))
        .map(Some)
        .collect();
    if in_flight.is_empty() {
        in_flight.push(None);
    }
    // `ack-after=MS`: the NatsTransport runs also acknowledge each batch this long after its
    // fetch, fetching on meanwhile (a worker's commit latency).
    let ack_after: Option<Duration> = std::env::args()
        .filter_map(|a| a.strip_prefix("ack-after=").and_then(|n| n.parse().ok()))
        .map(Duration::from_millis)
        .next();
    let n = if quick { 2_000 } else { 20_000 };
    let sqlite_n = if quick { 1_000 } else { 5_000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let raw = raw_jetstream(n).await;
        let mut nats = Vec::new();
        for &f in &in_flight {
            nats.push((f, Duration::ZERO, nats_transport(n, f, Duration::ZERO).await));
            if let Some(after) = ack_after {
                nats.push((f, after, nats_transport(n, f, after).await));
            }
        }
        let sqlite = sqlite_log(sqlite_n).await;
        let idle = nats_idle().await;
        let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
        println!(
            "\n{n} keyed messages ({KEYS} keys, {PARTITIONS} partitions), fetch {BATCH} + ack, one process\n"
        );
        println!("| mode | messages | msg/s | fetches | pull requests / msg | acks / msg |");
        println!("|---|---|---|---|---|---|");
        let mut rows = vec![("raw JetStream (baseline, unordered)".to_owned(), n, &raw)];
        let name = |f: &Option<u32>, after: &Duration| {
            let mut name = match f {
                Some(f) => format!("NatsTransport, partition_in_flight {f}"),
                None => "NatsTransport".to_owned(),
            };
            if !after.is_zero() {
                name.push_str(&format!(", acks {after:?} after the fetch"));
            }
            name
        };
        for (f, after, figure) in &nats {
            rows.push((name(f, after), n, figure));
        }
        rows.push(("SqliteLog".to_owned(), sqlite_n, &sqlite));
        for (name, count, f) in rows {
            println!(
                "| {name} | {count} | {:.0} | {} | {} | {} |",
                f.per_second,
                f.fetches,
                opt(f.pulls_per_message),
                opt(f.acks_per_message)
            );
        }
        println!(
            "\nNatsTransport idle (32 partitions held, fetching with a 1 s wait): {idle:.1} pull \
             requests/s"
        );
        println!();
        for (f, after, figure) in &nats {
            println!(
                "{} / raw JetStream: {:.2}x",
                name(f, after),
                figure.per_second / raw.per_second
            );
        }
    });
}
