//! Poison of every kind, on both transports: an input that can never be processed is a dead
//! letter with a reason naming the problem, the worker neither crashes nor loops, and the
//! ordinary inputs behind it on its partition key are applied, each once and in publish order.
//!
//! The poisons: a NUL (a JSON `\u0000` that the handler puts into an output's partition key,
//! which the value rules refuse), bytes that are not UTF-8, a lone surrogate (`"\ud800"`), a
//! payload at the broker's maximum size (the handler copies it into a datom: over
//! `Limits::max_payload_bytes`), a message id that is empty, 600 bytes long (its run's key is
//! over `Limits::max_key_bytes`), holds a tab (a control character in the key), or is missing,
//! and a header that is not valid. Each is published first on partition key `p`, followed by
//! [`BEHIND`] ordinary orders on the same key, then a [`Worker`] runs with a bounded timeout.
//! Counted at the source: the handler's calls (in the handler, by order id), committed
//! transactions per run key (the store's `transactions` table), the transactions of the
//! ordinary runs in publish order, and the broker's own dead letters read back.
//!
//! Transports:
//! - **The SQLite log** (a file of its own, as an external broker). Publishing goes through its
//!   API, which takes any id and any bytes. Two poisons cannot be published through the API and
//!   are written with raw SQL instead: a message without an id, which the log's schema refuses
//!   at publish time (`NOT NULL constraint failed: log_messages.message_id`, asserted; the
//!   ordinary messages are then applied as usual), and headers that are not a JSON object (as
//!   another writer of the file could leave them), which the log dead-letters when fetching.
//!   The log has no maximum size below SQLite's one-gigabyte `SQLITE_MAX_LENGTH`; the large
//!   payload is NATS's default maximum, 1 MiB.
//! - **NATS JetStream** (feature `nats`): published raw with async-nats on a private stream,
//!   headers as a foreign publisher writes them (not encoded by the transport). The payload at
//!   the maximum size is exactly the server's `max_payload` with its header block; its dead
//!   letter goes without the payload, which would not fit. The invalid header is a
//!   partition-key header whose `%XX` escapes are not UTF-8 (`%FF%FE`), dead-lettered by the
//!   transport. A message without `Nats-Msg-Id` is not poison there: the transport names it
//!   `<stream>:<sequence>` (documented), so it is applied once like any other, which is what is
//!   asserted.
//!
//! The store is SQLite in a directory of its own; the NUL case runs on PostgreSQL too (feature
//! `postgres`), where the store itself would refuse the NUL if the rules let it through:
//! [`Mutant::NoValueRules`] shows it (the dead letter then carries PostgreSQL's words, and the
//! check on the reason fails).
//!
//! Run: `cargo test -p effects-tests --features postgres,nats --test poison_inputs --
//! --nocapture` (prints one `figure:` line per case).

mod backends;
#[cfg(feature = "nats")]
mod nats_support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backends::Backend;
use effects_core::executor::{Executor, Mutant};
use effects_core::handler::message_key;
use effects_core::relay::RelayConfig;
use effects_core::store::Store;
use effects_core::transport::{OutgoingMessage, SqliteLog, Transport};
use effects_core::worker::{Processed, Worker, WorkerConfig, WorkerReport};
use effects_core::{DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, MessageEffect};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::time::Instant;

const TOPIC: &str = "orders";
const CONSUMER: &str = "order";
/// The partition key of the poison and of the ordinary orders behind it.
const PARTITION: &str = "p";
/// Ordinary orders published behind the poison.
const BEHIND: usize = 3;
/// How long a case may take before it counts as stalled.
const BOUND: Duration = Duration::from_secs(30);
/// The size of the payload at the broker's maximum on the SQLite log, which has no maximum of
/// its own below SQLite's one-gigabyte `SQLITE_MAX_LENGTH`: NATS's default `max_payload`.
const LOG_LARGE_PAYLOAD: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// The handler.

#[derive(Debug, Deserialize)]
struct Order {
    id: String,
    tag: String,
}

/// Records an order's tag and tells about it on a topic partitioned by the tag. Records the id
/// of every order it is called with.
#[derive(Debug, Default)]
struct OrderHandler {
    calls: Mutex<Vec<String>>,
}

impl Handler for OrderHandler {
    type Input = Order;
    type Output = Effects;

    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: CONSUMER,
        topic: Some(TOPIC),
        key: None,
        input: "Order",
        schemas: &[],
    };

    fn handle(&self, order: Order) -> Effects {
        self.calls.lock().unwrap().push(order.id.clone());
        Effects::from(DatomEffect::assert(
            LookupRef::new("order/id", order.id.as_str()),
            [("order/tag", json!(order.tag))],
        ))
        .merge(
            MessageEffect::new("order-tagged", json!({"id": order.id, "tag": order.tag}))
                .with_key(order.tag.as_str()),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The poisons.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Poison {
    Nul,
    InvalidUtf8,
    LoneSurrogate,
    MaxSize,
    EmptyId,
    LongId,
    TabId,
    MissingId,
    InvalidHeader,
}

/// The order id of the poison (when it decodes).
const POISON_ORDER: &str = "0";

impl Poison {
    fn name(self) -> &'static str {
        match self {
            Poison::Nul => "nul",
            Poison::InvalidUtf8 => "invalid_utf8",
            Poison::LoneSurrogate => "lone_surrogate",
            Poison::MaxSize => "max_size",
            Poison::EmptyId => "empty_id",
            Poison::LongId => "long_id",
            Poison::TabId => "tab_id",
            Poison::MissingId => "missing_id",
            Poison::InvalidHeader => "invalid_header",
        }
    }

    /// Its message id as published (`None`: none at all).
    fn id(self) -> Option<String> {
        match self {
            Poison::EmptyId => Some(String::new()),
            Poison::LongId => Some("x".repeat(600)),
            Poison::TabId => Some("poi\tson".to_owned()),
            Poison::MissingId => None,
            _ => Some("poison".to_owned()),
        }
    }

    /// Its payload, `size` bytes long for [`Poison::MaxSize`].
    fn payload(self, size: usize) -> Vec<u8> {
        match self {
            Poison::Nul => br#"{"id":"0","tag":"t\u00000"}"#.to_vec(),
            Poison::InvalidUtf8 => b"{\"id\":\"0\",\"tag\":\"t\xff\xfe0\"}".to_vec(),
            Poison::LoneSurrogate => br#"{"id":"0","tag":"\ud800"}"#.to_vec(),
            Poison::MaxSize => {
                let frame = br#"{"id":"0","tag":""}"#.len();
                let tag = "x".repeat(size - frame);
                let payload = serde_json::to_vec(&json!({"id": POISON_ORDER, "tag": tag})).unwrap();
                assert_eq!(payload.len(), size);
                payload
            }
            _ => order(POISON_ORDER, "t0"),
        }
    }

    /// Whether the handler is called with it (its payload decodes, and what it gives is refused
    /// afterwards); not for an empty id (refused before) or an invalid header (dead-lettered by
    /// the transport, which never hands it out).
    fn handled(self) -> bool {
        !matches!(
            self,
            Poison::InvalidUtf8 | Poison::LoneSurrogate | Poison::EmptyId | Poison::InvalidHeader
        )
    }

    /// Whether the transport dead-letters it itself (the worker never sees it).
    fn by_the_transport(self) -> bool {
        self == Poison::InvalidHeader
    }

    /// What its dead letter's reason must say.
    fn reason(self) -> &'static str {
        match self {
            Poison::Nul => "messages[0] partition key holds a NUL character (U+0000) at byte 1",
            Poison::InvalidUtf8 => "cannot decode its input `Order`: invalid unicode code point",
            Poison::LoneSurrogate => {
                "cannot decode its input `Order`: unexpected end of hex escape"
            }
            Poison::MaxSize => "(Limits::max_payload_bytes)",
            Poison::EmptyId => "the message id is empty",
            Poison::LongId => "the idempotency key is 613 bytes long; the limit is 512",
            Poison::TabId => "the idempotency key has a control character at byte 16",
            Poison::MissingId => "",
            Poison::InvalidHeader => "header",
        }
    }
}

fn order(id: &str, tag: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": id, "tag": tag})).unwrap()
}

/// The ordinary orders behind the poison: message ids `m1..`, order ids `1..`.
fn ordinary() -> Vec<(String, Vec<u8>)> {
    (1..=BEHIND)
        .map(|i| (format!("m{i}"), order(&i.to_string(), &format!("t{i}"))))
        .collect()
}

/// Publishes [`ordinary`] behind the poison, on its partition key.
async fn publish_ordinary<T: Transport>(transport: &T) {
    for (id, payload) in ordinary() {
        transport
            .publish(OutgoingMessage {
                id,
                topic: TOPIC.to_owned(),
                partition_key: Some(PARTITION.to_owned()),
                headers: BTreeMap::new(),
                payload,
            })
            .await
            .unwrap();
    }
}

fn key_of(message_id: &str) -> String {
    message_key(CONSUMER, TOPIC, message_id)
}

/// What the poison must come to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// A dead letter whose reason says this.
    DeadLetter(&'static str),
    /// Applied once, like an ordinary message (NATS names a message without an id).
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    Applied,
    /// Refused when published: nothing reaches the consumer.
    Refused,
}

// ---------------------------------------------------------------------------------------------
// One worker over the inputs.

struct WorkerRun {
    /// Whether every ordinary input was applied and the poison settled within the bound.
    settled: bool,
    /// When the broker was first seen holding a dead letter (polled every 50 ms).
    dead_seen: Option<Instant>,
    report: WorkerReport,
    /// The order ids the handler was called with, in call order.
    calls: Vec<String>,
    /// Committed transactions per run key, from the store.
    transactions: BTreeMap<String, i64>,
    /// What the worker did with each delivery, in order: message id, outcome, when.
    outcomes: Vec<(String, Processed, Instant)>,
    /// The transactions of the ordinary runs, in publish order.
    txs: Vec<i64>,
}

/// Runs a worker on `store` over `transport` until the ordinary inputs are applied and the
/// poison (any other message id) settled as `expect` says, or [`BOUND`] passed; then a little
/// longer, so that a poison coming back would be seen.
async fn run_worker<B, S, T, P, Fut>(
    b: &B,
    store: S,
    transport: T,
    mutant: Option<Mutant>,
    expect: Expect,
    visibility: Duration,
    dead_letters: P,
) -> WorkerRun
where
    B: Backend,
    S: Store + Clone,
    T: Transport + Clone,
    P: Fn() -> Fut,
    Fut: Future<Output = BTreeMap<String, String>>,
{
    let mut builder = Executor::builder(store.clone(), transport);
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let executor = Arc::new(builder.build());
    let mut config = WorkerConfig {
        concurrency: 4,
        fetch_wait: Duration::from_millis(50),
        visibility,
        relay: Some(RelayConfig {
            interval: Duration::from_millis(20),
            ..RelayConfig::default()
        }),
        ..WorkerConfig::default()
    };
    config.retry.initial = Duration::from_millis(10);
    config.retry.max = Duration::from_millis(20);
    let outcomes: Arc<Mutex<Vec<(String, Processed, Instant)>>> = Arc::default();
    let worker = Arc::new(
        Worker::new(executor, OrderHandler::default())
            .with_config(config)
            .on_processed({
                let outcomes = Arc::clone(&outcomes);
                move |delivery, processed| {
                    outcomes.lock().unwrap().push((
                        delivery.message_id.clone(),
                        processed.clone(),
                        Instant::now(),
                    ));
                }
            }),
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
    let ordinary_ids: BTreeSet<String> = ordinary().into_iter().map(|(id, _)| id).collect();
    let done = || {
        let outcomes = outcomes.lock().unwrap();
        let applied: BTreeSet<&String> = outcomes
            .iter()
            .filter(|(id, p, _)| {
                ordinary_ids.contains(id) && matches!(p, Processed::Applied { .. })
            })
            .map(|(id, _, _)| id)
            .collect();
        let poison_settled = match expect {
            Expect::Refused => true,
            Expect::Applied => outcomes.iter().any(|(id, p, _)| {
                !ordinary_ids.contains(id) && matches!(p, Processed::Applied { .. })
            }),
            Expect::DeadLetter(_) => outcomes.iter().any(|(id, p, _)| {
                !ordinary_ids.contains(id) && matches!(p, Processed::DeadLettered { .. })
            }),
        };
        applied.len() == BEHIND && poison_settled
    };
    let done_but_the_poison = || {
        let outcomes = outcomes.lock().unwrap();
        outcomes
            .iter()
            .filter(|(id, p, _)| {
                ordinary_ids.contains(id) && matches!(p, Processed::Applied { .. })
            })
            .map(|(id, _, _)| id)
            .collect::<BTreeSet<_>>()
            .len()
            == BEHIND
    };
    let deadline = Instant::now() + BOUND;
    let mut dead_seen = None;
    let mut probed = Instant::now();
    let settled = loop {
        if done() {
            break true;
        }
        // A dead letter the transport wrote itself: no outcome tells of it, the broker does.
        if matches!(expect, Expect::DeadLetter(_)) && probed.elapsed() >= Duration::from_millis(50)
        {
            probed = Instant::now();
            if !dead_letters().await.is_empty() {
                dead_seen.get_or_insert_with(Instant::now);
                if done_but_the_poison() {
                    break true;
                }
            }
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Anything that comes back (a poison not settled for good) would show here.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(());
    let report = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the worker stops within 10 s")
        .expect("the worker does not panic");
    let mut txs = Vec::new();
    for (id, _) in ordinary() {
        if let Some(run) = store.run(&key_of(&id)).await.unwrap() {
            txs.push(run.tx.0);
        }
    }
    let calls = worker.handler().calls.lock().unwrap().clone();
    let outcomes = outcomes.lock().unwrap().clone();
    WorkerRun {
        settled,
        dead_seen,
        report,
        calls,
        transactions: b.transactions_per_key().await,
        outcomes,
        txs,
    }
}

/// What every case must show: the poison settled as expected (its dead letter read back from
/// the broker, with its reason), the ordinary inputs each handled once and applied once, in
/// publish order, nothing retried. Prints the case's figure line.
fn expect_the_line_goes_on(
    poison: Poison,
    transport: &str,
    store: &str,
    expect: Expect,
    run: &WorkerRun,
    dead_letters: &BTreeMap<String, String>,
    published: Instant,
) {
    let ordinary_ids: BTreeSet<String> = ordinary().into_iter().map(|(id, _)| id).collect();
    let dead_at = run
        .outcomes
        .iter()
        .find(|(id, p, _)| {
            !ordinary_ids.contains(id) && matches!(p, Processed::DeadLettered { .. })
        })
        .map(|(_, _, at)| *at)
        .or(run.dead_seen);
    let ordinary_calls = run
        .calls
        .iter()
        .filter(|id| id.as_str() != POISON_ORDER)
        .count();
    let behind_applied = ordinary_ids
        .iter()
        .filter(|id| run.transactions.get(&key_of(id)) == Some(&1))
        .count();
    println!(
        "figure: poison={} transport={transport} store={store} dead_lettered={} \
         behind_applied={behind_applied} handler_calls={ordinary_calls} \
         publish_to_dead_letter_ms={}",
        poison.name(),
        dead_letters.len(),
        dead_at.map_or_else(
            || "-".to_owned(),
            |at| (at - published).as_millis().to_string()
        ),
    );
    assert!(
        run.settled,
        "{}: not settled within {BOUND:?}: {:?}; dead letters {dead_letters:?}",
        poison.name(),
        run.outcomes
    );
    // The ordinary inputs: each handled once, applied once, in publish order.
    let expected_calls: Vec<String> = (1..=BEHIND).map(|i| i.to_string()).collect();
    let poison_calls = run.calls.len() - ordinary_calls;
    assert_eq!(
        run.calls
            .iter()
            .filter(|id| id.as_str() != POISON_ORDER)
            .cloned()
            .collect::<Vec<_>>(),
        expected_calls,
        "{}: the handler's calls for the ordinary inputs",
        poison.name()
    );
    let poison_handled = usize::from(poison.handled() && expect != Expect::Refused);
    assert_eq!(
        poison_calls,
        poison_handled,
        "{}: the poison is handled at most once: {:?}",
        poison.name(),
        run.outcomes
    );
    assert_eq!(behind_applied, BEHIND, "{:?}", run.transactions);
    assert_eq!(run.txs.len(), BEHIND);
    assert!(run.txs.is_sorted(), "publish order: {:?}", run.txs);
    assert_eq!(run.report.retried, 0, "{}: {:?}", poison.name(), run.report);
    // The poison.
    match expect {
        Expect::DeadLetter(reason) => {
            let by_the_worker = u64::from(!poison.by_the_transport());
            assert_eq!(run.report.dead_lettered, by_the_worker, "{:?}", run.report);
            assert_eq!(
                run.transactions.len(),
                BEHIND,
                "nothing of the poison was applied: {:?}",
                run.transactions
            );
            assert_eq!(dead_letters.len(), 1, "{dead_letters:?}");
            let (id, said) = dead_letters.iter().next().unwrap();
            if let Some(published_id) = poison.id() {
                assert_eq!(id, &published_id, "the dead letter's message id");
            }
            assert!(
                said.contains(reason),
                "{}: the reason {said:?} should say {reason:?}",
                poison.name()
            );
        }
        Expect::Applied => {
            assert!(dead_letters.is_empty(), "{dead_letters:?}");
            assert_eq!(run.report.dead_lettered, 0, "{:?}", run.report);
            assert_eq!(run.transactions.len(), BEHIND + 1, "{:?}", run.transactions);
            assert!(run.transactions.values().all(|n| *n == 1));
        }
        Expect::Refused => {
            assert!(dead_letters.is_empty(), "{dead_letters:?}");
            assert_eq!(run.transactions.len(), BEHIND, "{:?}", run.transactions);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// On the SQLite log.

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Publishes the poison on the log: through its API, or with raw SQL for what the API cannot
/// express. `Err`: the log refused it.
async fn publish_on_log<B: Backend>(b: &B, log: &SqliteLog, poison: Poison) -> Result<(), String> {
    match poison {
        Poison::MissingId => {
            let conn = rusqlite::Connection::open(b.broker_path()).unwrap();
            conn.busy_timeout(Duration::from_secs(5)).unwrap();
            conn.execute(
                "INSERT INTO log_messages (topic, message_id, partition_key, headers, payload, \
                 published_at_ms) VALUES (?1, NULL, ?2, '{}', ?3, ?4)",
                rusqlite::params![TOPIC, PARTITION, poison.payload(0), now_ms()],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        }
        Poison::InvalidHeader => {
            let conn = rusqlite::Connection::open(b.broker_path()).unwrap();
            conn.busy_timeout(Duration::from_secs(5)).unwrap();
            conn.execute(
                "INSERT INTO log_messages (topic, message_id, partition_key, headers, payload, \
                 published_at_ms) VALUES (?1, ?2, ?3, 'x-trace: 1', ?4, ?5)",
                rusqlite::params![
                    TOPIC,
                    poison.id().unwrap(),
                    PARTITION,
                    poison.payload(0),
                    now_ms()
                ],
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        }
        _ => log
            .publish(OutgoingMessage {
                id: poison.id().unwrap(),
                topic: TOPIC.to_owned(),
                partition_key: Some(PARTITION.to_owned()),
                headers: BTreeMap::new(),
                payload: poison.payload(LOG_LARGE_PAYLOAD),
            })
            .await
            .map_err(|e| e.to_string()),
    }
}

/// The log's dead letters: message id and reason.
async fn log_dead_letters(log: &SqliteLog) -> BTreeMap<String, String> {
    log.dead_letters(CONSUMER)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.message_id, d.reason))
        .collect()
}

fn log_expect(poison: Poison) -> Expect {
    match poison {
        Poison::MissingId => Expect::Refused,
        Poison::InvalidHeader => {
            Expect::DeadLetter("cannot be read: its headers are not a JSON object of strings")
        }
        p => Expect::DeadLetter(p.reason()),
    }
}

/// One poison on the SQLite log, the store of `b`.
async fn on_the_log<B: Backend>(b: B, poison: Poison, mutant: Option<Mutant>) -> WorkerRun {
    let store = b.open().await;
    let log = b.broker();
    let expect = log_expect(poison);
    let published = Instant::now();
    let result = publish_on_log(&b, &log, poison).await;
    if expect == Expect::Refused {
        let e = result.expect_err("the log refuses a message without an id");
        assert!(
            e.contains("NOT NULL constraint failed: log_messages.message_id"),
            "{e}"
        );
    } else {
        result.expect("the log takes the poison");
    }
    publish_ordinary(&log).await;
    let run = run_worker(
        &b,
        store,
        log.clone(),
        mutant,
        expect,
        Duration::from_secs(30),
        || log_dead_letters(&log),
    )
    .await;
    let dead_letters = log_dead_letters(&log).await;
    if mutant.is_none() {
        expect_the_line_goes_on(
            poison,
            "sqlite_log",
            B::NAME,
            expect,
            &run,
            &dead_letters,
            published,
        );
    }
    assert_eq!(
        log.unacknowledged(CONSUMER, TOPIC).await.unwrap(),
        0,
        "every message acknowledged"
    );
    run
}

macro_rules! on_the_log {
    ($($case:ident => $poison:expr),* $(,)?) => {
        mod sqlite_log {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let b = crate::backends::Sqlite::create(stringify!($case)).await;
                    crate::backends::run_case(b, |b| async move {
                        crate::on_the_log(b, $poison, None).await;
                    })
                    .await;
                }
            )*
        }
    };
}

on_the_log!(
    nul => crate::Poison::Nul,
    invalid_utf8 => crate::Poison::InvalidUtf8,
    lone_surrogate => crate::Poison::LoneSurrogate,
    max_size => crate::Poison::MaxSize,
    empty_id => crate::Poison::EmptyId,
    long_id => crate::Poison::LongId,
    tab_id => crate::Poison::TabId,
    missing_id => crate::Poison::MissingId,
    invalid_header => crate::Poison::InvalidHeader,
);

/// The NUL on the PostgreSQL store, whose `text` could not keep it.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_log_nul_on_postgres() {
    let b = backends::postgres::Postgres::create("poison_inputs_nul").await;
    backends::run_case(b, |b| async move {
        on_the_log(b, Poison::Nul, None).await;
    })
    .await;
}

/// Without the value rules the NUL reaches PostgreSQL, which refuses it: still a dead letter,
/// but with the database's words, not the rule's — the check on the reason above fails.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutant_without_value_rules_the_nul_reaches_postgres() {
    let b = backends::postgres::Postgres::create("poison_inputs_nul_mutant").await;
    backends::run_case(b, |b| async move {
        let log = b.broker();
        let run = on_the_log(b, Poison::Nul, Some(Mutant::NoValueRules)).await;
        assert!(run.settled, "{:?}", run.outcomes);
        let dead = log.dead_letters(CONSUMER).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert!(
            !dead[0].reason.contains(Poison::Nul.reason()),
            "{}",
            dead[0].reason
        );
        assert!(dead[0].reason.contains("0x00"), "{}", dead[0].reason);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// On NATS.

#[cfg(feature = "nats")]
mod on_nats {
    use super::*;
    use effects_core::nats::async_nats::HeaderMap;
    use effects_core::nats::{HEADER_DEAD_LETTER_PAYLOAD_OMITTED, NatsTransport};
    use nats_support::TestStream;

    /// The size of a header block as NATS carries it (`NATS/1.0`, one `name: value` line each,
    /// an empty line).
    fn header_bytes(headers: &[(&str, &str)]) -> usize {
        10 + headers
            .iter()
            .map(|(n, v)| n.len() + 2 + v.len() + 2)
            .sum::<usize>()
            + 2
    }

    /// Publishes raw, headers as given, on the subject of partition key `p`.
    async fn publish_raw(
        nats: &NatsTransport,
        headers: &[(&str, &str)],
        payload: Vec<u8>,
    ) -> Result<(), String> {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.insert(*n, *v);
        }
        let subject = nats.subject_for(TOPIC, Some(PARTITION));
        nats.jetstream()
            .publish_with_headers(subject, map, payload.into())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The stream's dead letters: message id and reason.
    async fn nats_dead_letters(nats: &NatsTransport) -> BTreeMap<String, String> {
        nats.dead_letters(CONSUMER)
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.message_id, d.reason))
            .collect()
    }

    fn nats_expect(poison: Poison) -> Expect {
        match poison {
            Poison::MissingId => Expect::Applied,
            Poison::InvalidHeader => Expect::DeadLetter(
                "its header `effects-partition-key` (\"%FF%FE\") decodes to bytes that are not UTF-8",
            ),
            p => Expect::DeadLetter(p.reason()),
        }
    }

    pub(super) async fn on_nats<B: Backend>(b: B, poison: Poison) {
        let stream = TestStream::new(&format!("poison{}", poison.name()), |_| {}).await;
        let nats = stream.transport.clone();
        let store = b.open().await;
        let expect = nats_expect(poison);
        let max_payload = nats.client().server_info().max_payload;
        let id = poison.id();
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(id) = id.as_deref() {
            headers.push(("Nats-Msg-Id", id));
        }
        headers.push((
            "effects-partition-key",
            if poison == Poison::InvalidHeader {
                "%FF%FE"
            } else {
                PARTITION
            },
        ));
        let payload = poison.payload(max_payload - header_bytes(&headers));
        if poison == Poison::MaxSize {
            assert_eq!(payload.len() + header_bytes(&headers), max_payload);
        }
        let published = Instant::now();
        publish_raw(&nats, &headers, payload)
            .await
            .expect("the server takes the poison");
        publish_ordinary(&nats).await;
        let run = run_worker(
            &b,
            store,
            nats.clone(),
            None,
            expect,
            Duration::from_secs(3),
            || nats_dead_letters(&nats),
        )
        .await;
        let dead_letters = nats_dead_letters(&nats).await;
        expect_the_line_goes_on(
            poison,
            "nats",
            B::NAME,
            expect,
            &run,
            &dead_letters,
            published,
        );
        if poison == Poison::MaxSize {
            // The dead letter would not fit with the payload: it goes without, saying so.
            let dead = nats.dead_letters(CONSUMER).await.unwrap();
            assert!(dead[0].payload.is_empty());
            assert_eq!(
                dead[0].headers[HEADER_DEAD_LETTER_PAYLOAD_OMITTED],
                (max_payload - header_bytes(&headers)).to_string()
            );
        }
        if poison == Poison::MissingId {
            let key = run
                .transactions
                .keys()
                .find(|k| !ordinary().iter().any(|(id, _)| key_of(id) == **k))
                .unwrap();
            assert!(
                key.starts_with("order:orders:T"),
                "named stream:sequence: {key}"
            );
        }
    }
}

#[cfg(feature = "nats")]
macro_rules! on_nats {
    ($($case:ident => $poison:expr),* $(,)?) => {
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let b = crate::backends::Sqlite::create(stringify!($case)).await;
                    crate::backends::run_case(b, |b| async move {
                        crate::on_nats::on_nats(b, $poison).await;
                    })
                    .await;
                }
            )*
        }
    };
}

#[cfg(feature = "nats")]
on_nats!(
    nul => crate::Poison::Nul,
    invalid_utf8 => crate::Poison::InvalidUtf8,
    lone_surrogate => crate::Poison::LoneSurrogate,
    max_size => crate::Poison::MaxSize,
    empty_id => crate::Poison::EmptyId,
    long_id => crate::Poison::LongId,
    tab_id => crate::Poison::TabId,
    missing_id => crate::Poison::MissingId,
    invalid_header => crate::Poison::InvalidHeader,
);

/// The NUL on the PostgreSQL store, through NATS.
#[cfg(all(feature = "nats", feature = "postgres"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_nul_on_postgres() {
    let b = backends::postgres::Postgres::create("poison_inputs_nats_nul").await;
    backends::run_case(b, |b| async move {
        on_nats::on_nats(b, Poison::Nul).await;
    })
    .await;
}
