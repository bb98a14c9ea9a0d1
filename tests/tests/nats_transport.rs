//! What only the NATS transport has (feature `nats`): per-key order across worker *processes*
//! with one of them dying mid-message (and the partitions it held taken over), the partition
//! holds (takeover after a crash, release at close, sharing between processes, a lost hold
//! refusing heartbeats), how JetStream 2.9 redelivers what expired (and what it drops),
//! `max_deliver`, one configuration per stream and per group, refused headers, and the subject
//! mapping.
//!
//! The order tests run this test binary again as child processes (`order_child`, which does
//! nothing unless started that way), each with its own connection; they record when they start
//! and finish each message in one SQLite file, whose row order is the global order.

mod nats_support;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use effects_core::nats::async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use effects_core::nats::async_nats::jetstream::{self, AckKind};
use effects_core::nats::{ConsumerSettings, NatsConfig, NatsMutant, NatsTransport};
use effects_core::transport::{Delivery, FetchRequest, OutgoingMessage, Transport, TransportError};
use futures_util::StreamExt;
use nats_support::{TestStream, connect_or_explain};
use serde_json::json;

const TOPIC: &str = "ledger.postings";
const CHILD_ENV: &str = "EFFECTS_NATS_ORDER_CHILD";

fn message(id: &str, key: Option<&str>, payload: Vec<u8>) -> OutgoingMessage {
    OutgoingMessage {
        id: id.to_owned(),
        topic: TOPIC.to_owned(),
        partition_key: key.map(str::to_owned),
        headers: BTreeMap::new(),
        payload,
    }
}

fn request(consumer: &str, max: usize, visibility: Duration, wait: Duration) -> FetchRequest {
    FetchRequest {
        consumer: consumer.to_owned(),
        topic: TOPIC.to_owned(),
        max,
        visibility,
        wait,
    }
}

fn ids(deliveries: &[Delivery]) -> Vec<String> {
    deliveries.iter().map(|d| d.message_id.clone()).collect()
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Fetches from `t` (bounded by `timeout`) until `n` deliveries arrived; with the time the
/// first one arrived.
async fn fetch_n(
    t: &NatsTransport,
    n: usize,
    visibility: Duration,
    timeout: Duration,
) -> (Vec<Delivery>, Option<Instant>) {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut first = None;
    while got.len() < n && Instant::now() < deadline {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(300));
        let batch = t
            .fetch(request("g", n - got.len(), visibility, wait))
            .await
            .expect("fetch");
        if !batch.is_empty() && first.is_none() {
            first = Some(Instant::now());
        }
        got.extend(batch);
    }
    (got, first)
}

// ---------------------------------------------------------------------------------------------
// Order across processes.

#[derive(serde::Serialize, serde::Deserialize)]
struct ChildSpec {
    url: String,
    stream: String,
    prefix: String,
    partitions: u16,
    db: String,
    child: usize,
    total: usize,
    die_after: Option<usize>,
    visibility_ms: u64,
    hold_ttl_ms: u64,
    partition_in_flight: u32,
    start_after_ms: u64,
    no_holds: bool,
}

/// The child process's body (does nothing unless started by `run_order_processes`).
#[test]
fn order_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let spec: ChildSpec = serde_json::from_str(&spec).expect("child spec");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(child_main(spec));
}

fn open_events(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).expect("open the events file");
    conn.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    conn.execute_batch("PRAGMA journal_mode = WAL;")
        .expect("WAL");
    conn
}

/// A worker as the order contract asks: fetches several deliveries, handles different keys at
/// once and each key's deliveries one after another in the order handed out (a fetch's before
/// the next fetch's), heartbeats the deliveries in work every third of the visibility, and
/// acknowledges each when it is done.
async fn child_main(spec: ChildSpec) {
    tokio::time::sleep(Duration::from_millis(spec.start_after_ms)).await;
    let mut config = NatsConfig::new(&spec.url).with_stream(&spec.stream, &spec.prefix);
    config.partitions = spec.partitions;
    config.hold_ttl = Duration::from_millis(spec.hold_ttl_ms);
    config.partition_in_flight = spec.partition_in_flight;
    if spec.no_holds {
        config.mutant = Some(NatsMutant::NoHolds);
    }
    let t = connect_or_explain(config).await;
    let visibility = Duration::from_millis(spec.visibility_ms);
    let events = Arc::new(Mutex::new(open_events(Path::new(&spec.db))));
    let started = Arc::new(Mutex::new(0_usize));
    let deadline = Instant::now() + Duration::from_secs(90);
    let ended = |events: &Mutex<rusqlite::Connection>| -> usize {
        let conn = events.lock().expect("events");
        let n: i64 = conn
            .query_row(
                "SELECT COUNT(DISTINCT key || ':' || idx) FROM events WHERE phase = 'end'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        usize::try_from(n).unwrap_or(0)
    };
    while ended(&events) < spec.total && Instant::now() < deadline {
        let batch = t
            .fetch(request("ledger", 6, visibility, Duration::from_millis(100)))
            .await
            .expect("fetch");
        let in_work: Arc<Mutex<Vec<Delivery>>> = Arc::new(Mutex::new(batch.clone()));
        let heartbeat = {
            let (t, in_work) = (t.clone(), Arc::clone(&in_work));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(visibility / 3).await;
                    let now: Vec<Delivery> = in_work.lock().expect("in work").clone();
                    for d in now {
                        if let Err(e) = t.extend(&d, visibility).await {
                            eprintln!("heartbeat of {} refused: {e}", d.message_id);
                        }
                    }
                }
            })
        };
        let mut queues: Vec<(String, Vec<Delivery>)> = Vec::new();
        for d in batch {
            let key = d
                .partition_key
                .clone()
                .unwrap_or_else(|| d.message_id.clone());
            match queues.iter_mut().find(|(k, _)| *k == key) {
                Some((_, q)) => q.push(d),
                None => queues.push((key, vec![d])),
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (_, queue) in queues {
            let (t, events, started, in_work) = (
                t.clone(),
                Arc::clone(&events),
                Arc::clone(&started),
                Arc::clone(&in_work),
            );
            let (child, die_after) = (spec.child, spec.die_after);
            tasks.spawn(async move {
                for d in queue {
                    let body: serde_json::Value =
                        serde_json::from_slice(&d.payload).expect("payload");
                    let key = body["key"].as_str().expect("key").to_owned();
                    let idx = body["idx"].as_i64().expect("idx");
                    let record = |phase: &str| {
                        events
                            .lock()
                            .expect("events")
                            .execute(
                                "INSERT INTO events (key, idx, phase, child, deliveries, at_ms) \
                                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                                rusqlite::params![
                                    key,
                                    idx,
                                    phase,
                                    child as i64,
                                    d.deliveries,
                                    wall_ms()
                                ],
                            )
                            .expect("record");
                    };
                    record("start");
                    let n = {
                        let mut s = started.lock().expect("started");
                        *s += 1;
                        *s
                    };
                    if die_after.is_some_and(|limit| n >= limit) {
                        // Dies holding its partitions and messages: no end, no
                        // acknowledgement, no goodbye.
                        record("die");
                        std::process::abort();
                    }
                    tokio::time::sleep(Duration::from_millis(3 + (d.sequence % 4))).await;
                    record("end");
                    t.ack(&d).await.expect("ack");
                    in_work
                        .lock()
                        .expect("in work")
                        .retain(|w| w.sequence != d.sequence);
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("handling task");
        }
        heartbeat.abort();
    }
    t.close().await;
}

#[derive(Debug, Clone)]
struct Event {
    key: String,
    idx: i64,
    phase: String,
    child: i64,
    deliveries: i64,
    at_ms: i64,
}

/// Per key: start(i) end(i) for i = 0, 1, ... one at a time, each message ending once. What
/// `dead` did with a message that another child handled again after it died (it died holding
/// it, or before its acknowledgement reached the server) is left out.
fn check_process_order(events: &[Event], dead: Option<i64>, per_key: i64) -> Result<(), String> {
    let redone: std::collections::HashSet<(&str, i64)> = events
        .iter()
        .filter(|e| e.phase == "end" && Some(e.child) != dead)
        .map(|e| (e.key.as_str(), e.idx))
        .collect();
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.phase != "die") {
        let unfinished = Some(e.child) == dead && redone.contains(&(e.key.as_str(), e.idx));
        if !unfinished {
            by_key.entry(e.key.as_str()).or_default().push(e);
        }
    }
    for (key, list) in by_key {
        let seen: Vec<(i64, bool)> = list.iter().map(|e| (e.idx, e.phase == "end")).collect();
        let expected: Vec<(i64, bool)> =
            (0..per_key).flat_map(|i| [(i, false), (i, true)]).collect();
        if seen != expected {
            return Err(format!("key {key}: went {seen:?}"));
        }
    }
    Ok(())
}

/// How long the keys the dead child was working on waited for another child: the longest gap
/// between its death and the next event of such a key (ms).
fn takeover_ms(events: &[Event], dead: i64) -> Option<i64> {
    let death = events
        .iter()
        .find(|e| e.phase == "die" && e.child == dead)?;
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.phase != "die") {
        by_key.entry(e.key.as_str()).or_default().push(e);
    }
    by_key
        .values()
        .filter_map(|list| {
            let before = list.iter().rev().find(|e| e.at_ms <= death.at_ms)?;
            if before.child != dead {
                return None;
            }
            let after = list
                .iter()
                .find(|e| e.at_ms > death.at_ms && e.child != dead)?;
            Some(after.at_ms - death.at_ms)
        })
        .max()
}

struct OrderRun {
    events: Vec<Event>,
    statuses: Vec<ExitStatus>,
}

const VISIBILITY_MS: u64 = 3_000;
const HOLD_TTL_MS: u64 = 2_000;
/// Small, so that no process reads the whole backlog ahead before the others start (which
/// would make the mutant runs pass by accident).
const PARTITION_IN_FLIGHT: u32 = 4;

/// Three child processes on one group and a topic with four partitions. `keyed: false` is the
/// mutant of a transport that drops keys; `no_holds` the mutant of one without holds. With
/// `die_after`, child 0 starts first (so it holds the partitions) and dies after that many
/// starts; the others start half a second later.
async fn run_order_processes(keyed: bool, no_holds: bool, die_after: Option<usize>) -> OrderRun {
    const KEYS: usize = 6;
    const PER_KEY: usize = 20;
    let stream = TestStream::new("order-processes", |c| {
        c.partitions = 4;
        c.hold_ttl = Duration::from_millis(HOLD_TTL_MS);
    })
    .await;
    let t = stream.transport.clone();
    for round in 0..PER_KEY {
        for k in 0..KEYS {
            // Keyed: interleaved, as traffic arrives. Without keys (the mutant): one key's
            // messages back to back, so that fetches take several of them at once.
            let (key, idx) = if keyed {
                (k, round)
            } else {
                let n = round * KEYS + k;
                (n / PER_KEY, n % PER_KEY)
            };
            let key = format!("account-{key}");
            let payload = json!({"key": key, "idx": idx}).to_string().into_bytes();
            t.publish(message(
                &format!("{key}:{idx}"),
                keyed.then_some(key.as_str()),
                payload,
            ))
            .await
            .expect("publish");
        }
    }
    let dir = support::temp_dir("nats-order");
    let db = dir.join("events.db");
    open_events(&db)
        .execute_batch(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, \
             idx INTEGER NOT NULL, phase TEXT NOT NULL, child INTEGER NOT NULL, \
             deliveries INTEGER NOT NULL, at_ms INTEGER NOT NULL)",
        )
        .expect("create the events table");
    let exe = std::env::current_exe().expect("this test binary");
    let mut children = Vec::new();
    for child in 0..3 {
        let spec = ChildSpec {
            url: stream.config.url.clone(),
            stream: stream.config.stream.clone(),
            prefix: stream.config.subject_prefix.clone(),
            partitions: stream.config.partitions,
            db: db.display().to_string(),
            child,
            total: KEYS * PER_KEY,
            die_after: if child == 0 { die_after } else { None },
            visibility_ms: VISIBILITY_MS,
            hold_ttl_ms: HOLD_TTL_MS,
            partition_in_flight: PARTITION_IN_FLIGHT,
            start_after_ms: if die_after.is_some() && child > 0 {
                500
            } else {
                0
            },
            no_holds,
        };
        children.push(
            Command::new(&exe)
                .args([
                    "--exact",
                    "order_child",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(CHILD_ENV, serde_json::to_string(&spec).expect("spec"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start a child process"),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut statuses = Vec::new();
    for mut child in children {
        let status = loop {
            if let Some(status) = child.try_wait().expect("child status") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().expect("child status");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        statuses.push(status);
    }
    let conn = open_events(&db);
    let mut stmt = conn
        .prepare("SELECT key, idx, phase, child, deliveries, at_ms FROM events ORDER BY seq")
        .expect("read events");
    let events = stmt
        .query_map([], |r| {
            Ok(Event {
                key: r.get(0)?,
                idx: r.get(1)?,
                phase: r.get(2)?,
                child: r.get(3)?,
                deliveries: r.get(4)?,
                at_ms: r.get(5)?,
            })
        })
        .expect("read events")
        .collect::<Result<Vec<_>, _>>()
        .expect("read events");
    OrderRun { events, statuses }
}

/// Three worker processes share a group on a topic with four partitions; the first one dies
/// (abort) holding the partitions and messages in work. Per key, messages are handled one at a
/// time in publish order; the dead process's partitions are taken over by the others after its
/// holds ran out and its messages' ack wait passed (the figure printed), its messages handled
/// first; every message finishes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_across_processes() {
    let run = run_order_processes(true, false, Some(12)).await;
    assert!(
        !run.statuses[0].success(),
        "child 0 died: {:?}",
        run.statuses[0]
    );
    assert!(
        run.statuses[1..].iter().all(ExitStatus::success),
        "the others finished: {:?}",
        run.statuses
    );
    let handed_over = run
        .events
        .iter()
        .filter(|e| e.phase == "start" && e.deliveries >= 2)
        .count();
    let takeover = takeover_ms(&run.events, 0);
    let bound = VISIBILITY_MS + HOLD_TTL_MS + HOLD_TTL_MS / 5;
    println!(
        "FIGURE nats_order_processes: events={} handed_over={handed_over} takeover_ms={takeover:?} \
         (ack wait {VISIBILITY_MS} + hold TTL {HOLD_TTL_MS} + margin {}) per_child={:?}",
        run.events.len(),
        HOLD_TTL_MS / 5,
        (0..3)
            .map(|c| run
                .events
                .iter()
                .filter(|e| e.phase == "end" && e.child == c)
                .count())
            .collect::<Vec<_>>()
    );
    assert!(
        handed_over >= 1,
        "the dead child's messages were delivered again"
    );
    let takeover = takeover.expect("keys the dead child was working on went on elsewhere");
    // Slack for a loaded machine: the bound is when the takeover may start; the first message
    // then needs a fetch and a handler.
    assert!(
        takeover <= i64::try_from(bound).unwrap_or(i64::MAX) + 3_000,
        "taken over after {takeover} ms, bound {bound} ms"
    );
    check_process_order(&run.events, Some(0), 20).expect("per-key order across processes");
}

/// The same processes on messages published without partition keys (a transport that drops
/// them): the order check fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_order_check_catches_messages_without_keys() {
    let run = run_order_processes(false, false, None).await;
    assert!(
        run.statuses.iter().all(ExitStatus::success),
        "{:?}",
        run.statuses
    );
    assert!(
        check_process_order(&run.events, None, 20).is_err(),
        "one key's messages were handled together, and the check must say so"
    );
}

/// The same processes with keys, on a transport without holds (every process pulls every
/// partition): the order check fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_order_check_catches_a_transport_without_holds() {
    let run = run_order_processes(true, true, None).await;
    assert!(
        run.statuses.iter().all(ExitStatus::success),
        "{:?}",
        run.statuses
    );
    assert!(
        check_process_order(&run.events, None, 20).is_err(),
        "without holds one key's messages went to several processes at once, and the check \
         must say so"
    );
}

// ---------------------------------------------------------------------------------------------
// Holds in one process.

/// `n` messages of key `key`, `<key>#<i>` from `from` on.
async fn publish_key(t: &NatsTransport, key: &str, from: usize, n: usize) {
    for i in from..from + n {
        t.publish(message(&format!("{key}#{i}"), Some(key), vec![]))
            .await
            .expect("publish");
    }
}

/// The takeover of a crashed holder's partition: the new holder hands out nothing of it until
/// the dead holder's messages came back, then those first, in sequence order (even though
/// heartbeats made them expire in reverse order), then the newer ones. `no_wait` is the mutant
/// of a transport that pulls a taken-over partition at once.
async fn takeover(no_wait: bool) -> (Vec<Delivery>, Duration, u64) {
    let visibility = Duration::from_secs(4);
    let ttl = Duration::from_secs(1);
    let stream = TestStream::new("takeover", |c| {
        c.partitions = 2;
        c.hold_ttl = ttl;
    })
    .await;
    let t1 = stream.transport.clone();
    let warm = t1
        .fetch(request("g", 10, visibility, Duration::from_millis(50)))
        .await
        .expect("open the group");
    assert!(warm.is_empty());
    publish_key(&t1, "a", 0, 5).await;
    let (got, _) = fetch_n(&t1, 5, visibility, Duration::from_secs(10)).await;
    assert_eq!(ids(&got), ["a#0", "a#1", "a#2", "a#3", "a#4"]);
    t1.ack(&got[0]).await.expect("ack");
    // Heartbeats in reverse order, so the server's expiry (and redelivery) order is reversed.
    for d in got[1..].iter().rev() {
        t1.extend(d, visibility).await.expect("heartbeat");
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    t1.abandon().await;
    let crashed = Instant::now();
    publish_key(&t1, "a", 5, 2).await;
    let mut config = stream.config.clone();
    if no_wait {
        config.mutant = Some(NatsMutant::NoTakeoverWait);
    }
    let t2 = connect_or_explain(config).await;
    let (rest, first) = fetch_n(&t2, 6, visibility, Duration::from_secs(20)).await;
    let waited = first.map_or(Duration::MAX, |f| f - crashed);
    (rest, waited, t2.stats().takeovers_waited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_waits_for_the_dead_holders_messages() {
    let (rest, waited, takeovers) = takeover(false).await;
    println!(
        "FIGURE nats_takeover: first delivery {waited:?} after the crash (hold TTL 1 s, ack wait 4 s, margin 0.2 s)"
    );
    assert_eq!(
        ids(&rest),
        ["a#1", "a#2", "a#3", "a#4", "a#5", "a#6"],
        "the dead holder's messages first, in order"
    );
    assert!(rest[..4].iter().all(|d| d.deliveries == 2), "{rest:?}");
    assert!(rest[4..].iter().all(|d| d.deliveries == 1), "{rest:?}");
    assert_eq!(takeovers, 1, "the takeover waited");
    assert!(
        waited <= Duration::from_millis(1_000 + 4_000 + 200 + 2_000),
        "taken over within hold TTL + ack wait + margin (+ slack): {waited:?}"
    );
}

/// The takeover check fails against a transport that pulls a taken-over partition at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_check_catches_a_transport_that_does_not_wait() {
    let (rest, _, _) = takeover(true).await;
    assert_ne!(
        ids(&rest),
        ["a#1", "a#2", "a#3", "a#4", "a#5", "a#6"],
        "newer messages were handed out before the dead holder's, and the check must say so"
    );
}

/// A transport that closes (after the worker gave back in order what it did not start) lets go
/// of its partitions cleanly: another process takes them over at once, with the given-back
/// messages first, in order; the same when the last clone is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_releases_the_partitions_at_once() {
    let visibility = Duration::from_secs(30);
    let stream = TestStream::new("close", |c| c.partitions = 2).await;
    for (how, key) in [("close", "a"), ("drop", "b")] {
        let t1 = stream.connect_again().await;
        let warm = t1
            .fetch(request("g", 10, visibility, Duration::from_millis(50)))
            .await
            .expect("open the group");
        assert!(warm.is_empty());
        publish_key(&t1, key, 0, 4).await;
        let (got, _) = fetch_n(&t1, 4, visibility, Duration::from_secs(10)).await;
        let want = |from: usize| (from..4).map(|i| format!("{key}#{i}")).collect::<Vec<_>>();
        assert_eq!(ids(&got), want(0));
        t1.ack(&got[0]).await.expect("ack");
        for d in &got[1..] {
            t1.nack(d, Duration::ZERO).await.expect("give back");
        }
        let closed = Instant::now();
        if how == "close" {
            t1.close().await;
        } else {
            drop(t1);
        }
        let t2 = stream.connect_again().await;
        let (rest, first) = fetch_n(&t2, 3, visibility, Duration::from_secs(20)).await;
        let took = first.map_or(Duration::MAX, |f| f - closed);
        println!("FIGURE nats_release_{how}: taken over {took:?} after the {how}");
        assert_eq!(ids(&rest), want(1), "{how}: given back in order");
        assert_eq!(t2.stats().takeovers_waited, 0, "{how}: released cleanly");
        assert!(
            took < Duration::from_secs(6),
            "{how}: taken over at once, not after the hold TTL (10 s): {took:?}"
        );
        for r in t2.ack_many(&rest).await {
            r.expect("ack");
        }
        t2.close().await;
    }
}

/// Two processes on one group share the partitions: within a few hold periods each holds half,
/// and no partition is held by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_partitions() {
    let visibility = Duration::from_secs(10);
    let stream = TestStream::new("share", |c| {
        c.partitions = 8;
        c.hold_ttl = Duration::from_millis(1_200);
    })
    .await;
    let (a, b) = (stream.connect_again().await, stream.connect_again().await);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        for t in [&a, &b] {
            t.fetch(request("g", 10, visibility, Duration::from_millis(100)))
                .await
                .expect("fetch");
        }
        let (ha, hb) = (
            a.held_partitions("g", TOPIC).await,
            b.held_partitions("g", TOPIC).await,
        );
        assert!(
            ha.iter().all(|p| !hb.contains(p)),
            "a partition held by both: {ha:?} and {hb:?}"
        );
        last = (ha, hb);
        if last.0.len() == 4 && last.1.len() == 4 {
            break;
        }
    }
    println!("FIGURE nats_share: {:?} and {:?}", last.0, last.1);
    assert_eq!(
        (last.0.len(), last.1.len()),
        (4, 4),
        "each holds half: {last:?}"
    );
}

/// A holder that loses its hold (another process wrote the partition's hold) stops: a heartbeat
/// of a delivery of that partition is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_hold_refuses_heartbeats() {
    let visibility = Duration::from_secs(30);
    let stream = TestStream::new("lost-hold", |c| {
        c.partitions = 2;
        c.hold_ttl = Duration::from_secs(1);
    })
    .await;
    let t = stream.transport.clone();
    let warm = t
        .fetch(request("g", 10, visibility, Duration::from_millis(50)))
        .await
        .expect("open the group");
    assert!(warm.is_empty());
    publish_key(&t, "a", 0, 1).await;
    let (got, _) = fetch_n(&t, 1, visibility, Duration::from_secs(10)).await;
    t.extend(&got[0], visibility)
        .await
        .expect("a heartbeat while held");
    // Another process's hold: the record replaced behind the holder's back.
    let subject = t.hold_subject("g", TOPIC, t.partition_of("a"));
    let holds = t
        .jetstream()
        .get_stream(t.holds_stream_name())
        .await
        .expect("holds stream");
    holds
        .purge()
        .filter(subject.clone())
        .await
        .expect("purge the hold");
    let mut headers = effects_core::nats::async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    t.jetstream()
        .publish_with_headers(
            subject,
            headers,
            br#"{"member":"intruder","state":"held"}"#.to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("the intruder's hold");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refused = None;
    while refused.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(e) = t.extend(&got[0], visibility).await {
            refused = Some(e);
        }
    }
    assert!(
        matches!(refused, Some(TransportError::Refused { .. })),
        "refused once the hold is lost: {refused:?}"
    );
    assert!(t.stats().holds_lost >= 1);
}

// ---------------------------------------------------------------------------------------------
// What the transport relies on in JetStream 2.9.

/// JetStream redelivers expired messages before new ones: an expired message goes to the
/// consumer's redelivery queue, which a pull serves first. Messages that expire together are
/// queued in sequence order; messages that expire at different times are queued in the order
/// they expired — so a new holder of a partition reads a dead holder's messages in one first
/// pull and sorts them, and waits until all of them expired (see the module docs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_redelivers_expired_messages_first() {
    let stream = TestStream::new("redelivery", |_| {}).await;
    let js = stream.transport.jetstream().clone();
    let subject = format!("{}.msg.raw.x", stream.config.subject_prefix);
    let consumer = |name: &str| pull::Config {
        durable_name: Some(name.to_owned()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(1),
        max_ack_pending: 100,
        filter_subject: subject.clone(),
        ..pull::Config::default()
    };
    let publish = |from: u64, n: u64| {
        let (js, subject) = (js.clone(), subject.clone());
        async move {
            for i in from..from + n {
                js.publish(subject.clone(), i.to_string().into())
                    .await
                    .expect("publish")
                    .await
                    .expect("stored");
            }
        }
    };
    async fn pull_n(c: &PullConsumer, n: usize) -> Vec<jetstream::Message> {
        let mut out = Vec::new();
        let mut batch = c
            .batch()
            .max_messages(n)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .expect("pull");
        while let Some(m) = batch.next().await {
            out.push(m.expect("a message"));
            if out.len() == n {
                break;
            }
        }
        out
    }
    let seqs = |ms: &[jetstream::Message]| -> Vec<u64> {
        ms.iter()
            .map(|m| m.info().expect("metadata").stream_sequence)
            .collect()
    };

    // Expired together: before the new ones, in sequence order.
    publish(1, 5).await;
    let c = js
        .create_consumer_on_stream(consumer("together"), stream.config.stream.as_str())
        .await
        .expect("consumer");
    let first = pull_n(&c, 5).await;
    assert_eq!(seqs(&first), [1, 2, 3, 4, 5]);
    publish(6, 5).await;
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let again = pull_n(&c, 10).await;
    assert_eq!(
        seqs(&again),
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        "expired ones first, in order"
    );
    assert!(
        again[..5]
            .iter()
            .all(|m| m.info().expect("info").delivered == 2)
    );

    // Expired at different times (heartbeats in reverse order): in the order they expired.
    let c = js
        .create_consumer_on_stream(consumer("staggered"), stream.config.stream.as_str())
        .await
        .expect("consumer");
    let first = pull_n(&c, 4).await;
    assert_eq!(seqs(&first), [1, 2, 3, 4]);
    for m in first.iter().rev() {
        m.ack_with(AckKind::Progress).await.expect("progress");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let again = pull_n(&c, 4).await;
    println!("FIGURE jetstream_staggered_redelivery: {:?}", seqs(&again));
    assert_eq!(
        seqs(&again),
        [4, 3, 2, 1],
        "in the order they expired, not in sequence order"
    );
}

/// JetStream 2.9 drops a redelivery it takes from the redelivery queue for a pull request that
/// turns out to be gone (its inbox unsubscribed) when no live request follows, and hands the
/// consumer's last new message out a second time as new (here the same message: delivery count
/// 1 after a give-back). Why the transport keeps a live request behind an expiring one, lets
/// its requests run out before it gives anything back, and drops a repeated first delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_drops_a_redelivery_meant_for_a_gone_request() {
    use effects_core::nats::async_nats::jetstream::consumer::pull::BatchConfig;
    let stream = TestStream::new("stale-request", |_| {}).await;
    let client = stream.transport.client().clone();
    let js = stream.transport.jetstream().clone();
    let subject = format!("{}.msg.raw.x", stream.config.subject_prefix);
    js.publish(subject.clone(), "1".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let consumer: PullConsumer = js
        .create_consumer_on_stream(
            pull::Config {
                durable_name: Some("stale".into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                filter_subject: subject,
                ..pull::Config::default()
            },
            stream.config.stream.as_str(),
        )
        .await
        .expect("consumer");
    let request = |batch: usize, expires: Duration| BatchConfig {
        batch,
        expires: Some(expires),
        ..BatchConfig::default()
    };
    let first_inbox = client.new_inbox();
    let mut first = client
        .subscribe(first_inbox.clone())
        .await
        .expect("subscribe");
    consumer
        .request_batch(request(10, Duration::from_secs(10)), first_inbox.into())
        .await
        .expect("a pull request");
    let m = tokio::time::timeout(Duration::from_secs(5), first.next())
        .await
        .expect("a message in time")
        .expect("a message");
    let info = |m: &effects_core::nats::async_nats::Message| {
        let m = jetstream::Message {
            message: m.clone(),
            context: js.clone(),
        };
        let i = m.info().expect("metadata");
        (i.stream_sequence, i.delivered)
    };
    assert_eq!(info(&m), (1, 1));
    // The request's inbox goes away; the request stays at the server until it expires.
    first.unsubscribe().await.expect("unsubscribe");
    client.flush().await.expect("flush");
    client
        .request(m.reply.clone().expect("a reply subject"), "-NAK".into())
        .await
        .expect("the give-back confirmed");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second_inbox = client.new_inbox();
    let mut second = client
        .subscribe(second_inbox.clone())
        .await
        .expect("subscribe");
    consumer
        .request_batch(request(1, Duration::from_secs(2)), second_inbox.into())
        .await
        .expect("a pull request");
    let again = tokio::time::timeout(Duration::from_secs(5), second.next())
        .await
        .expect("a message in time")
        .expect("a message");
    println!(
        "FIGURE jetstream_stale_request: after a give-back, delivered again as {:?} (sequence, count)",
        info(&again)
    );
    assert_eq!(
        info(&again),
        (1, 1),
        "the redelivery (count 2) was dropped and the message handed out again as new"
    );
}

// ---------------------------------------------------------------------------------------------
// The rest.

/// A message given back more than `max_deliver` times is dead-lettered by the transport with
/// the reason, and its key moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliver_dead_letters_with_the_reason() {
    let visibility = Duration::from_secs(30);
    let stream = TestStream::new("max-deliver", |c| c.max_deliver = Some(2)).await;
    let t = stream.transport.clone();
    t.publish(message("poison#0", Some("k"), b"x".to_vec()))
        .await
        .expect("publish");
    for attempt in 1..=2 {
        let (got, _) = fetch_n(&t, 1, visibility, Duration::from_secs(10)).await;
        assert_eq!(ids(&got), ["poison#0"]);
        assert_eq!(got[0].deliveries, attempt);
        t.nack(&got[0], Duration::ZERO).await.expect("nack");
    }
    t.publish(message("next#0", Some("k"), b"y".to_vec()))
        .await
        .expect("publish");
    let (got, _) = fetch_n(&t, 1, visibility, Duration::from_secs(10)).await;
    assert_eq!(
        ids(&got),
        ["next#0"],
        "the third delivery of the poison message was dead-lettered, and the key moved on"
    );
    let dead = t.dead_letters("g").await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, "poison#0");
    assert_eq!(dead[0].deliveries, 3);
    assert_eq!(dead[0].partition_key.as_deref(), Some("k"));
    assert!(
        dead[0].reason.contains("max_deliver 2"),
        "{}",
        dead[0].reason
    );
    assert_eq!(t.stats().dead_lettered, 1);
}

/// A stream is only used with the layout it was created with, and with one configuration: a
/// transport whose duplicate window, age limit or hold TTL differ from the server's is refused
/// with both values named, until the settings are changed explicitly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_layout_and_settings_are_checked() {
    let stream = TestStream::new("layout", |c| c.partitions = 8).await;
    let mut other = stream.config.clone();
    other.partitions = 16;
    let error = NatsTransport::connect(other)
        .await
        .expect_err("16 partitions on an 8 one");
    assert!(error.to_string().contains("8 partitions"), "{error}");

    let mut other = stream.config.clone();
    other.subject_prefix = format!("{}x", stream.config.subject_prefix);
    let error = NatsTransport::connect(other)
        .await
        .expect_err("another prefix");
    assert!(error.to_string().contains("subject"), "{error}");

    let mut changed = stream.config.clone();
    changed.duplicate_window = Duration::from_secs(30);
    let error = NatsTransport::connect(changed.clone())
        .await
        .expect_err("another duplicate window");
    let text = error.to_string();
    assert!(
        text.contains("duplicate window") && text.contains("120s") && text.contains("30s"),
        "both values named: {text}"
    );
    NatsTransport::update_stream_settings(changed.clone())
        .await
        .expect("an explicit change");
    let info = stream
        .transport
        .jetstream()
        .get_stream(&stream.config.stream)
        .await
        .expect("stream")
        .cached_info()
        .clone();
    assert_eq!(info.config.duplicate_window, Duration::from_secs(30));
    NatsTransport::connect(changed)
        .await
        .expect("the new settings connect");
    let error = NatsTransport::connect(stream.config.clone())
        .await
        .expect_err("the old settings are refused now");
    assert!(error.to_string().contains("120s"), "{error}");

    let mut ttl = stream.config.clone();
    ttl.duplicate_window = Duration::from_secs(30);
    ttl.hold_ttl = Duration::from_secs(3);
    let error = NatsTransport::connect(ttl)
        .await
        .expect_err("another hold TTL");
    let text = error.to_string();
    assert!(
        text.contains("hold TTL") && text.contains("10s") && text.contains("3s"),
        "{text}"
    );

    let mut bad = stream.config.clone();
    bad.stream = "has.dots".into();
    let error = NatsTransport::connect(bad).await.expect_err("invalid name");
    assert!(error.to_string().contains("stream"), "{error}");
}

/// A group has one configuration: a fetch asking for another visibility than its consumers'
/// ack wait, or a transport with other in-flight limits, is refused with both values named;
/// `set_consumer_settings` changes them for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_configuration_per_group() {
    let stream = TestStream::new("group-config", |c| c.partitions = 2).await;
    let t = stream.transport.clone();
    let (seven, forty_two) = (Duration::from_secs(7), Duration::from_secs(42));
    t.fetch(request("g", 1, seven, Duration::ZERO))
        .await
        .expect("the first fetch sets the group's visibility");
    assert_eq!(
        t.consumer_settings("g", TOPIC).await.expect("settings"),
        Some(ConsumerSettings::new(seven, 128, 1024))
    );
    assert_eq!(
        t.consumer_settings("h", TOPIC).await.expect("settings"),
        None
    );
    let refused = t
        .fetch(request("g", 1, forty_two, Duration::ZERO))
        .await
        .expect_err("another visibility");
    let text = refused.to_string();
    assert!(
        matches!(refused, TransportError::Refused { .. })
            && text.contains("7s")
            && text.contains("42s"),
        "{text}"
    );
    let mut other_limits = stream.config.clone();
    other_limits.partition_in_flight = 64;
    let other = connect_or_explain(other_limits).await;
    let refused = other
        .fetch(request("g", 1, seven, Duration::ZERO))
        .await
        .expect_err("other in-flight limits");
    let text = refused.to_string();
    assert!(
        text.contains("64") && text.contains("128") && text.contains("partition_in_flight"),
        "{text}"
    );
    for name in t.consumer_names("g", TOPIC) {
        let mut consumer: PullConsumer = t
            .jetstream()
            .get_consumer_from_stream(&name, &stream.config.stream)
            .await
            .expect("consumer");
        let info = consumer.info().await.expect("info");
        assert_eq!(info.config.ack_wait, seven, "{name}: nothing changed");
    }
    t.set_consumer_settings("g", TOPIC, ConsumerSettings::new(forty_two, 128, 1024))
        .await
        .expect("an explicit change");
    t.fetch(request("g", 1, forty_two, Duration::ZERO))
        .await
        .expect("the new visibility");
    assert!(
        t.fetch(request("g", 1, seven, Duration::ZERO))
            .await
            .is_err()
    );
    let fresh = stream.connect_again().await;
    fresh
        .fetch(request("g", 1, forty_two, Duration::ZERO))
        .await
        .expect("another process with the new visibility");
    assert_eq!(
        t.consumer_names("g", TOPIC).len(),
        3,
        "two partitions and `u`"
    );
}

/// Header names NATS cannot carry, and reserved ones, are refused with the reason; nothing is
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_headers_are_refused() {
    let stream = TestStream::new("headers", |_| {}).await;
    let t = stream.transport.clone();
    for name in [
        "has space",
        "colon:name",
        "Nats-Expected-Stream",
        "effects-partition-key",
    ] {
        let mut m = message("h#0", None, b"{}".to_vec());
        m.headers.insert(name.to_owned(), "v".to_owned());
        let result = t.publish(m).await;
        match result {
            Err(TransportError::Refused { reason }) => {
                assert!(reason.contains(name), "{reason}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(t.stats().published, 0);
}

/// The subjects of the module docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_follow_the_documented_mapping() {
    let stream = TestStream::new("subjects", |_| {}).await;
    let t = stream.transport.clone();
    let p = &stream.config.subject_prefix;
    let part = t.partition_of("card 7");
    assert_eq!(
        t.subject_for("orders.eu placed", Some("card 7")),
        format!("{p}.msg.orders~2Eeu~20placed.p{part}")
    );
    assert_eq!(
        t.subject_for("card-status-changed", None),
        format!("{p}.msg.card-status-changed.u")
    );
    assert_eq!(t.subject_for("", None), format!("{p}.msg.~.u"));
    assert_eq!(
        t.dead_letter_subject("block", "a.b"),
        format!("{p}.dead.block.a~2Eb")
    );
    t.publish(OutgoingMessage {
        topic: "orders.eu placed".into(),
        ..message("s#0", Some("card 7"), b"{}".to_vec())
    })
    .await
    .expect("publish");
    let stored = t
        .jetstream()
        .get_stream(&stream.config.stream)
        .await
        .expect("stream")
        .get_raw_message(1)
        .await
        .expect("the stored message");
    assert_eq!(
        stored.subject.as_str(),
        t.subject_for("orders.eu placed", Some("card 7"))
    );
}

// ---------------------------------------------------------------------------------------------
// TLS.

/// A private CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in
/// `dir`: (ca, server cert, server key, client cert, client key).
fn write_pki(dir: &Path) -> [std::path::PathBuf; 5] {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "effects NATS test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let server_key = KeyPair::generate().expect("key");
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("server params");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params
        .signed_by(&server_key, &ca)
        .expect("server certificate");
    let client_key = KeyPair::generate().expect("key");
    let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    client_params
        .distinguished_name
        .push(DnType::CommonName, "effects worker");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params
        .signed_by(&client_key, &ca)
        .expect("client certificate");
    let files = [
        ("ca.pem", ca.pem()),
        ("server.pem", server.pem()),
        ("server-key.pem", server_key.serialize_pem()),
        ("client.pem", client.pem()),
        ("client-key.pem", client_key.serialize_pem()),
    ];
    files.map(|(name, pem)| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write a PEM file");
        path
    })
}

/// Against a private `nats-server` that requires TLS and client certificates: the transport
/// connects with the private CA and its client certificate and works; without the client
/// certificate, or without trusting the CA, it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_private_ca() {
    use effects_core::nats::TlsConfig;
    let dir = support::temp_dir("nats-tls");
    let [ca, cert, key, client, client_key] = write_pki(&dir);
    let arg = |p: &std::path::PathBuf| p.display().to_string();
    let server = nats_support::PrivateNats::start_with(
        &dir,
        vec![
            "--tlsverify".into(),
            "--tlscert".into(),
            arg(&cert),
            "--tlskey".into(),
            arg(&key),
            "--tlscacert".into(),
            arg(&ca),
        ],
    );
    let config = |tls: TlsConfig| {
        let mut c = nats_support::test_config(&server.url(), "tls");
        c.connect_timeout = Duration::from_secs(2);
        c.tls = Some(tls);
        c
    };

    let full = TlsConfig::required()
        .with_root_certificates(&ca)
        .with_client_certificate(&client, &client_key);
    let t = NatsTransport::connect(config(full))
        .await
        .expect("mutual TLS with the private CA");
    t.publish(message("tls#0", Some("k"), b"{}".to_vec()))
        .await
        .expect("publish over TLS");
    let got = t
        .fetch(request(
            "g",
            1,
            Duration::from_secs(30),
            Duration::from_secs(5),
        ))
        .await
        .expect("fetch over TLS");
    assert_eq!(got.len(), 1);
    t.ack(&got[0]).await.expect("ack over TLS");

    let no_client_cert = TlsConfig::required().with_root_certificates(&ca);
    assert!(
        NatsTransport::connect(config(no_client_cert))
            .await
            .is_err(),
        "a client without a certificate is refused"
    );
    let platform_roots_only = TlsConfig::required().with_client_certificate(&client, &client_key);
    assert!(
        NatsTransport::connect(config(platform_roots_only))
            .await
            .is_err(),
        "a server certificate from an unknown CA is refused"
    );
}
