//! NATS restarted mid-stream (feature `nats`): a private `nats-server` on a free loopback port
//! is SIGKILLed twice while messages are being published and started again on the same store
//! directory. Publishing resumes; nothing the server acknowledged is lost; ids published again
//! are absorbed by the stream's duplicate window, across the restarts too.
//!
//! Counted at the source: a counting wrapper around the transport records every publish attempt
//! and its outcome; the stream is read back through a consumer, not by its own counts. The
//! check is shown able to fail against a publisher that does not reuse ids.
//!
//! Run: `cargo test -p effects-tests --features nats --test nats_faults -- --nocapture`
//! (prints a `FIGURE` line).

mod nats_support;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use effects_core::nats::NatsTransport;
use effects_core::transport::{Delivery, FetchRequest, OutgoingMessage, Transport, TransportError};
use nats_support::{PrivateNats, TestStream, connect_or_explain, test_config};

const TOPIC: &str = "transfers-requested";

/// A transport that counts publish attempts and their outcomes, per message id.
#[derive(Clone)]
struct Counting<T> {
    inner: T,
    attempts: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    acked: Arc<Mutex<HashSet<String>>>,
    /// Makes every publish a new id (`<id>~<attempt>`): the broken publisher of the mutant
    /// check.
    fresh_ids: bool,
}

impl<T: Transport + Clone> Counting<T> {
    fn new(inner: T) -> Self {
        Counting {
            inner,
            attempts: Arc::default(),
            failures: Arc::default(),
            acked: Arc::default(),
            fresh_ids: false,
        }
    }

    fn acked(&self) -> HashSet<String> {
        self.acked.lock().expect("acked ids").clone()
    }
}

impl<T: Transport + Clone> Transport for Counting<T> {
    fn publish(
        &self,
        mut message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let attempt = self.attempts.fetch_add(1, Ordering::Relaxed);
        if self.fresh_ids {
            message.id = format!("{}~{attempt}", message.id);
        }
        let (inner, failures, acked) = (
            self.inner.clone(),
            Arc::clone(&self.failures),
            Arc::clone(&self.acked),
        );
        async move {
            let id = message.id.clone();
            match inner.publish(message).await {
                Ok(()) => {
                    acked.lock().expect("acked ids").insert(id);
                    Ok(())
                }
                Err(e) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    Err(e)
                }
            }
        }
    }

    fn fetch(
        &self,
        request: FetchRequest,
    ) -> impl Future<Output = Result<Vec<Delivery>, TransportError>> + Send {
        self.inner.fetch(request)
    }

    fn ack(&self, d: &Delivery) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.ack(d)
    }

    fn nack(
        &self,
        d: &Delivery,
        delay: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.nack(d, delay)
    }

    fn dead_letter(
        &self,
        d: &Delivery,
        reason: &str,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.dead_letter(d, reason)
    }

    fn ack_many(
        &self,
        deliveries: &[Delivery],
    ) -> impl Future<Output = Vec<Result<(), TransportError>>> + Send {
        self.inner.ack_many(deliveries)
    }

    fn extend(
        &self,
        d: &Delivery,
        visibility: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.extend(d, visibility)
    }
}

fn message(i: usize) -> OutgoingMessage {
    OutgoingMessage {
        id: format!("transfer:{i}#0"),
        topic: TOPIC.to_owned(),
        partition_key: Some(format!("account-{}", i % 7)),
        headers: BTreeMap::new(),
        payload: format!("{{\"n\":{i}}}").into_bytes(),
    }
}

/// Publishes `message(i)` until acknowledged, retrying with the same id (as the outbox does);
/// bounded by `deadline`.
async fn publish_until_acked<T: Transport + Clone>(t: &Counting<T>, i: usize, deadline: Instant) {
    loop {
        match t.publish(message(i)).await {
            Ok(()) => return,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "message {i} still not acknowledged at the deadline: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Every message id in the topic, read through a fresh consumer group (bounded).
async fn read_back(t: &NatsTransport, group: &str, expected: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet = 0;
    while Instant::now() < deadline && quiet < 3 {
        let batch = t
            .fetch(FetchRequest {
                consumer: group.to_owned(),
                topic: TOPIC.to_owned(),
                max: 64,
                visibility: Duration::from_secs(120),
                wait: Duration::from_millis(if ids.len() < expected { 500 } else { 200 }),
            })
            .await
            .expect("read back");
        if batch.is_empty() {
            quiet += usize::from(ids.len() >= expected);
            continue;
        }
        for d in batch {
            t.ack(&d).await.expect("ack");
            ids.push(d.message_id);
        }
    }
    ids
}

/// Nothing acknowledged is missing, and no id is in the stream twice.
fn check_exactly_once(in_stream: &[String], acked: &HashSet<String>) -> Result<(), String> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for id in in_stream {
        *count.entry(id.as_str()).or_default() += 1;
    }
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !count.contains_key(id.as_str()))
        .collect();
    let doubled: Vec<(&&str, &usize)> = count.iter().filter(|(_, n)| **n > 1).collect();
    if !lost.is_empty() || !doubled.is_empty() {
        return Err(format!(
            "lost {} acknowledged ({:?}...), doubled {} ({:?}...)",
            lost.len(),
            lost.iter().take(5).collect::<Vec<_>>(),
            doubled.len(),
            doubled.iter().take(5).collect::<Vec<_>>()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarted_mid_stream() {
    const N: usize = 1_500;
    const REPUBLISHED: usize = 200;
    let dir = support::temp_dir("nats-restart");
    let server = PrivateNats::start(&dir);
    let mut config = test_config(&server.url(), "restart");
    config.request_timeout = Duration::from_millis(800);
    let transport = connect_or_explain(config.clone()).await;
    let counting = Counting::new(transport.clone());
    let progress = Arc::new(AtomicUsize::new(0));

    // Kill the server at a third and at two thirds of the way, each time down ~0.5 s.
    let killer = {
        let progress = Arc::clone(&progress);
        tokio::task::spawn_blocking(move || {
            let mut server = server;
            let mut restarts = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            for at in [N / 3, 2 * N / 3] {
                while progress.load(Ordering::Relaxed) < at && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                server.kill();
                std::thread::sleep(Duration::from_millis(500));
                server.restart();
                restarts += 1;
            }
            (server, restarts)
        })
    };

    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    // Eight publishers at once, as several outbox rows are dispatched concurrently.
    let next = Arc::new(AtomicUsize::new(0));
    let mut publishers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (t, next, progress) = (counting.clone(), Arc::clone(&next), Arc::clone(&progress));
        publishers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= N {
                    return;
                }
                publish_until_acked(&t, i, deadline).await;
                progress.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(done) = publishers.join_next().await {
        done.expect("publisher");
    }
    let (_server, restarts) = killer.await.expect("killer");
    let publish_elapsed = started.elapsed();

    // Publish again ids the stream acknowledged before the restarts: all absorbed.
    let before = transport.stats().duplicates;
    for i in 0..REPUBLISHED {
        publish_until_acked(&counting, i, deadline).await;
    }
    let absorbed_again = transport.stats().duplicates - before;

    let in_stream = read_back(&transport, "check", N).await;
    let acked = counting.acked();
    let result = check_exactly_once(&in_stream, &acked);
    let stats = transport.stats();
    let attempts = counting.attempts.load(Ordering::Relaxed);
    let failures = counting.failures.load(Ordering::Relaxed);
    let unique: HashSet<&String> = in_stream.iter().collect();
    println!(
        "FIGURE nats_restart: messages={N} restarts={restarts} publish_attempts={attempts} \
         publish_failures={failures} acked_ids={} duplicates_absorbed={} \
         (republished_after_restarts={REPUBLISHED}, absorbed={absorbed_again}) \
         in_stream={} unique_in_stream={} lost={} doubled={} publish_ms={}",
        acked.len(),
        stats.duplicates,
        in_stream.len(),
        unique.len(),
        acked.iter().filter(|id| !unique.contains(id)).count(),
        in_stream.len() - unique.len(),
        publish_elapsed.as_millis()
    );
    assert_eq!(restarts, 2, "the server was restarted twice");
    assert!(failures > 0, "the restarts were felt by the publishers");
    assert_eq!(acked.len(), N, "every message was eventually acknowledged");
    result.expect("nothing lost, nothing doubled");
    assert_eq!(in_stream.len(), N);
    assert_eq!(
        absorbed_again, REPUBLISHED as u64,
        "ids published again after the restarts are duplicates"
    );
    assert_eq!(
        attempts,
        stats.published + stats.duplicates + failures,
        "every attempt is stored, absorbed or failed"
    );
}

/// The check above fails when the publisher does not reuse ids: republished messages then
/// reach the stream twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_check_catches_fresh_ids_on_republish() {
    let stream = TestStream::new("fresh-ids", |_| {}).await;
    let transport = stream.transport.clone();
    let honest = Counting::new(transport.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..20 {
        publish_until_acked(&honest, i, deadline).await;
    }
    let mut broken = Counting::new(transport.clone());
    broken.fresh_ids = true;
    for i in 0..5 {
        publish_until_acked(&broken, i, deadline).await;
    }
    let in_stream: Vec<String> = read_back(&transport, "check", 25)
        .await
        .into_iter()
        .map(|id| id.split('~').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(in_stream.len(), 25, "the broken publisher's copies got in");
    assert!(
        check_exactly_once(&in_stream, &honest.acked()).is_err(),
        "the check must see the doubled messages"
    );
    assert_eq!(transport.stats().duplicates, 0);
}

/// A transport configured against a server that is not there fails to connect with a message
/// naming the URL, within the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_missing_server_fails_fast() {
    let port = nats_support::free_port();
    let mut config = test_config(&format!("nats://127.0.0.1:{port}"), "missing");
    config.connect_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let error = NatsTransport::connect(config)
        .await
        .expect_err("nothing listens there");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let text = error.to_string();
    assert!(text.contains(&port.to_string()), "{text}");
}
