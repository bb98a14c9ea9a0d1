//! Nothing stops the line: one definition of a valid value on every store, and store errors
//! classified so that a value the store refuses is a dead letter, not a retry for ever.
//!
//! Every case runs unchanged against the SQLite store (always) and the PostgreSQL store
//! (feature `postgres`, at 127.0.0.1:5432, each case in a database of its own), with the
//! SQLite log in a file of its own as the broker; the worker cases run on the embedded log
//! (the SQLite store's own) too. What is checked, counted at the source:
//!
//! - **Poison values** (a NUL where a store keeps text that is not JSON; keys and names past
//!   what PostgreSQL can index) are refused by [`Executor::run`] with the same
//!   [`ValidationError`] on both stores, and nothing reached the store: no key claim was even
//!   attempted (on PostgreSQL a trigger counts every attempted claim with a sequence, which a
//!   rollback does not undo; SQLite keeps every one of these values, so there an attempt is a
//!   committed claim).
//! - **Values both stores hold** (NUL and control characters inside JSON, extreme numbers,
//!   control characters in partition keys) are applied and come back unchanged.
//! - **Store errors of each kind**, provoked for real (a unique index, a trigger's `RAISE`, a
//!   missing table; on PostgreSQL triggers raising `22P02`, `23505`, `40001`, a statement
//!   timeout; on SQLite a database kept busy), have the [`StoreErrorKind`] they should.
//! - **Through a real [`Worker`]**, a poison input — effects with a NUL in a partition key, an
//!   undecodable payload (a lone surrogate), effects the store refuses (a unique index) — is
//!   dead-lettered with its reason, and the ordinary inputs behind it on the same partition key
//!   are applied, in order: transactions per key, handler calls, the broker's dead letters.
//!
//! Two mutants show the checks can fail: [`Mutant::NoValueRules`] (the poison reaches the
//! store: PostgreSQL refuses it, SQLite writes it) and [`Mutant::RetryDataErrors`] (the
//! worker retries what the store refused, and the partition key stops).

mod backends;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backends::Backend;
use effects_core::executor::{
    Executor, Limits, Mutant, RunError, RunOptions, RunOutcome, ValidationError,
};
use effects_core::handler::message_key;
use effects_core::relay::RelayConfig;
use effects_core::store::{ReadVersion, Store, StoreError, StoreErrorKind};
use effects_core::transport::{OutgoingMessage, SqliteLog, Transport};
use effects_core::worker::{Processed, Worker, WorkerConfig, WorkerReport};
use effects_core::{
    DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, MessageEffect, Method,
    RequestEffect,
};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

/// Declares each case once and runs it on every backend: `sqlite::<case>` always,
/// `postgres::<case>` with the `postgres` feature.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let backend = crate::backends::Sqlite::create(stringify!($case)).await;
                    crate::backends::run_case(backend, super::$case).await;
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let backend =
                        crate::backends::postgres::Postgres::create(stringify!($case)).await;
                    crate::backends::run_case(backend, super::$case).await;
                }
            )*
        }
    };
}

conformance!(
    poison_values_are_refused_before_any_write_with_the_same_error,
    mutant_without_value_rules_lets_poison_reach_the_store,
    values_every_store_holds_come_back_unchanged,
    store_errors_have_the_kind_the_database_meant,
    a_poison_input_is_dead_lettered_and_the_inputs_behind_it_are_applied,
    mutant_retrying_data_errors_stops_the_partition_key,
    mutant_without_value_rules_lets_a_poison_input_reach_the_store,
);

// ---------------------------------------------------------------------------------------------
// Shared pieces.

fn card(id: &str) -> LookupRef {
    LookupRef::new("card/id", id)
}

fn blocked(id: &str) -> Effects {
    Effects::from(DatomEffect::assert(
        card(id),
        [("card/status", json!("blocked"))],
    ))
}

/// `n` bytes of letters and digits that do not compress (PostgreSQL compresses long index
/// entries, so repeated letters would fit where these do not).
fn random_text(n: usize, seed: u64) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(ALPHABET[usize::try_from(x % 62).unwrap()])
        })
        .collect()
}

/// Limits far above the ceilings: the ceilings are what refuses.
fn generous() -> Limits {
    Limits {
        max_key_bytes: 1 << 20,
        max_name_bytes: 1 << 20,
        ..Limits::default()
    }
}

fn is_postgres<B: Backend>() -> bool {
    B::NAME == "postgres"
}

/// Counts every key claim the store attempts from now on. PostgreSQL: a trigger takes a
/// number from a sequence for each row proposed to `effect_runs` (a sequence is not rolled
/// back, so refused and rolled-back claims count too). SQLite keeps every value of the poison
/// list, so an attempt there is a committed claim, counted by [`write_attempts`] directly.
async fn count_write_attempts<B: Backend>(b: &B) {
    if is_postgres::<B>() {
        b.exec(
            "CREATE SEQUENCE write_attempts; \
             CREATE FUNCTION count_attempt() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM nextval('write_attempts'); RETURN NEW; END $$; \
             CREATE TRIGGER count_attempt BEFORE INSERT ON effect_runs \
             FOR EACH ROW EXECUTE FUNCTION count_attempt();",
        )
        .await;
    }
}

/// Key claims attempted since [`count_write_attempts`].
async fn write_attempts<B: Backend>(b: &B) -> i64 {
    if is_postgres::<B>() {
        b.count("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM write_attempts")
            .await
    } else {
        b.count("SELECT COUNT(*) FROM effect_runs").await
    }
}

/// Nothing of any run was written.
async fn nothing_written<B: Backend>(b: &B) {
    for table in [
        "transactions",
        "effect_runs",
        "entities",
        "datoms",
        "outbox",
    ] {
        assert_eq!(
            b.count(&format!("SELECT COUNT(*) FROM {table}")).await,
            0,
            "{}: {table} must be empty",
            B::NAME
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Poison values.

struct Poison {
    what: &'static str,
    key: String,
    effects: Effects,
    reads: Vec<ReadVersion>,
    expected: ValidationError,
}

fn nul(field: &str, index: usize) -> ValidationError {
    ValidationError::NulCharacter {
        field: field.to_owned(),
        index,
    }
}

fn too_long(field: &str, bytes: usize, max: usize, limit: &'static str) -> ValidationError {
    ValidationError::FieldTooLong {
        field: field.to_owned(),
        bytes,
        max,
        limit,
    }
}

/// Everything a run can carry that one store cannot keep (measured: PostgreSQL refuses a NUL
/// in `text` with `22021` and an index row over 2 704 bytes with `54000`; SQLite keeps both),
/// each next to ordinary effects that would be written if it were let through.
fn poison_list() -> Vec<Poison> {
    let message = || MessageEffect::new("card-status-changed", json!({"card_id": "c1"}));
    let long_attribute = format!("card/{}", random_text(2720, 5));
    let poison = |what, effects: Effects, expected| Poison {
        what,
        key: format!("poison:{what}"),
        effects: blocked("c1").merge(effects),
        reads: Vec::new(),
        expected,
    };
    vec![
        poison(
            "a partition key with a NUL",
            message().with_key("c\u{0}1").into(),
            nul("messages[0] partition key", 1),
        ),
        poison(
            "a topic with a NUL",
            MessageEffect::new("card\u{0}events", json!(1)).into(),
            nul("messages[0] topic", 4),
        ),
        poison(
            "a message header name with a NUL",
            message().with_header("x-\u{0}", "v").into(),
            nul("messages[0] header name `x-\\u{0}…`", 2),
        ),
        poison(
            "a message header value with a NUL",
            message().with_header("x-trace", "a\u{0}").into(),
            nul("messages[0] header `x-trace`", 1),
        ),
        poison(
            "an attribute with a NUL",
            DatomEffect::assert(card("c2"), [("card/sta\u{0}tus", json!("x"))]).into(),
            nul("datoms[1] attribute `card/sta\\u{0}tus…`", 8),
        ),
        poison(
            "an identity attribute with a NUL",
            DatomEffect::assert(
                LookupRef::new("card/\u{0}id", "c2"),
                [("card/status", json!("x"))],
            )
            .into(),
            nul("datoms[1] identity attribute", 5),
        ),
        poison(
            "an expected attribute with a NUL",
            DatomEffect::assert(card("c2"), [("card/status", json!("x"))])
                .expecting("card/\u{0}status", json!(null))
                .into(),
            nul("datoms[1] expected attribute `card/\\u{0}status…`", 5),
        ),
        Poison {
            what: "a read of an identity attribute with a NUL",
            key: "poison:read".to_owned(),
            effects: blocked("c1"),
            reads: vec![ReadVersion::missing(LookupRef::new("card/\u{0}id", "c1"))],
            expected: nul("reads[0] identity attribute", 5),
        },
        poison(
            "a request endpoint with a NUL",
            RequestEffect::new(Method::Post, "no\u{0}tify", "/notify").into(),
            nul("requests[0] endpoint", 2),
        ),
        poison(
            "a request path with a NUL",
            RequestEffect::new(Method::Post, "notify", "/notify/c\u{0}1").into(),
            nul("requests[0] path", 9),
        ),
        Poison {
            what: "an idempotency key with a NUL",
            key: "block:c\u{0}1".to_owned(),
            effects: blocked("c1"),
            reads: Vec::new(),
            expected: ValidationError::KeyControlCharacter { index: 7 },
        },
        Poison {
            what: "an idempotency key of 2 720 bytes",
            key: random_text(2720, 1),
            effects: blocked("c1"),
            reads: Vec::new(),
            expected: ValidationError::KeyTooLong {
                len: 2720,
                max: 2048,
            },
        },
        poison(
            "a partition key of 2 720 bytes",
            message().with_key(random_text(2720, 2)).into(),
            too_long("messages[0] partition key", 2720, 2048, "max_key_bytes"),
        ),
        poison(
            "an identity value of 2 720 bytes",
            DatomEffect::assert(card(&random_text(2720, 3)), [("card/status", json!("x"))]).into(),
            // Its JSON text: the quotes count.
            too_long("datoms[1] identity value", 2722, 2048, "max_key_bytes"),
        ),
        poison(
            "a topic of 600 bytes",
            MessageEffect::new(random_text(600, 4), json!(1)).into(),
            too_long("messages[0] topic", 600, 512, "max_name_bytes"),
        ),
        poison(
            "an attribute of 2 725 bytes",
            DatomEffect::assert(card("c2"), [(long_attribute.as_str(), json!("x"))]).into(),
            too_long(
                &format!("datoms[1] attribute `{}…`", &long_attribute[..40]),
                2725,
                512,
                "max_name_bytes",
            ),
        ),
    ]
}

/// The same poison list through [`Executor::run`] on every store: the same error, and not one
/// key claim attempted.
async fn poison_values_are_refused_before_any_write_with_the_same_error<B: Backend>(b: B) {
    let store = b.open().await;
    count_write_attempts(&b).await;
    let executor = Executor::builder(store.clone(), b.broker())
        .limits(generous())
        .build();
    for poison in poison_list() {
        let options = RunOptions {
            reads: poison.reads,
            ..RunOptions::default()
        };
        let err = executor
            .run_with(poison.key.as_str(), poison.effects, options)
            .await
            .unwrap_err();
        let RunError::Invalid { source, .. } = &err else {
            panic!(
                "{}: {}: expected Invalid, got {err:?}",
                B::NAME,
                poison.what
            );
        };
        assert_eq!(source, &poison.expected, "{}: {}", B::NAME, poison.what);
        assert!(!err.to_string().contains('\u{0}'), "{err}");
    }
    assert_eq!(
        write_attempts(&b).await,
        0,
        "{}: a poison reached the store",
        B::NAME
    );
    nothing_written(&b).await;
    assert!(
        b.broker()
            .messages("card-status-changed")
            .await
            .unwrap()
            .is_empty()
    );
    // The store is fine: an ordinary run right after is applied.
    let outcome = executor.run("block:c1", blocked("c1")).await.unwrap();
    assert!(matches!(outcome, RunOutcome::Applied { .. }), "{outcome:?}");
    assert_eq!(write_attempts(&b).await, 1);
}

/// Without the rules, the check above fails on both stores: PostgreSQL refuses the values in
/// the run's transaction (a data error, after the key claim was attempted), SQLite writes
/// them.
async fn mutant_without_value_rules_lets_poison_reach_the_store<B: Backend>(b: B) {
    let store = b.open().await;
    count_write_attempts(&b).await;
    let executor = Executor::builder(store.clone(), b.broker())
        .limits(generous())
        .mutant(Mutant::NoValueRules)
        .build();
    let cases = [
        (
            "nul",
            blocked("c1").merge(MessageEffect::new("t", json!(1)).with_key("c\u{0}1")),
            "invalid byte sequence for encoding \"UTF8\": 0x00",
        ),
        (
            "long",
            Effects::from(DatomEffect::assert(
                card(&random_text(2720, 3)),
                [("card/status", json!("x"))],
            )),
            "index row size",
        ),
    ];
    for (n, (key, effects, postgres_says)) in cases.into_iter().enumerate() {
        let result = executor.run(key, effects).await;
        let attempts = write_attempts(&b).await;
        if is_postgres::<B>() {
            let Err(RunError::Store { source, .. }) = &result else {
                panic!("{key}: expected the store to refuse it, got {result:?}");
            };
            assert!(source.to_string().contains(postgres_says), "{source}");
            assert_eq!(source.kind(), StoreErrorKind::Data, "{source}");
            assert_eq!(
                attempts,
                i64::try_from(n).unwrap() + 1,
                "the claim was attempted"
            );
        } else {
            assert!(
                matches!(result, Ok(RunOutcome::Applied { .. })),
                "{result:?}"
            );
            assert_eq!(
                attempts,
                i64::try_from(n).unwrap() + 1,
                "the run was written"
            );
        }
    }
}

/// What both stores keep is not refused, and comes back as it went in: NUL and control
/// characters inside JSON (stored as escapes), non-characters and astral characters, extreme
/// numbers, control characters in a partition key.
async fn values_every_store_holds_come_back_unchanged<B: Backend>(b: B) {
    let store = b.open().await;
    let broker = b.broker();
    let executor = Executor::builder(store.clone(), broker.clone()).build();
    let odd = "a\u{0}b\u{1}\t\n\u{1f}\u{7f}\u{fffe}\u{ffff}\u{10ffff}😀\"\\";
    let value = json!({
        "text": odd,
        "nested": [odd, {odd: [odd]}],
        "numbers": [u64::MAX, i64::MIN, 1.797_693_134_862_315_7e308, 5e-324, -0.0, 0.1],
    });
    let entity = LookupRef::new("card/id", odd);
    let partition = "p\u{1}\u{1f}\u{7f} é";
    let effects = Effects::from(DatomEffect::assert(
        entity.clone(),
        [("card/data", value.clone())],
    ))
    .merge(
        MessageEffect::new("odd", value.clone())
            .with_key(partition)
            .with_header("x-odd", "\u{1}\u{7f}é"),
    );
    let outcome = executor.run("odd:1", effects).await.unwrap();
    assert!(matches!(outcome, RunOutcome::Applied { .. }), "{outcome:?}");
    let stored = store
        .entity(&entity, None)
        .await
        .unwrap()
        .expect("the entity");
    assert_eq!(stored.get("card/data"), Some(&value));
    assert_eq!(stored.lookup, entity);
    let published = broker.messages("odd").await.unwrap();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].partition_key.as_deref(), Some(partition));
    assert_eq!(published[0].headers["x-odd"], "\u{1}\u{7f}é");
    let payload: serde_json::Value = serde_json::from_slice(&published[0].payload).unwrap();
    assert_eq!(payload, value);
}

// ---------------------------------------------------------------------------------------------
// Store errors, provoked for real.

fn store_error(result: Result<RunOutcome, RunError>) -> StoreError {
    match result {
        Err(RunError::Store { source, .. }) => source,
        other => panic!("expected a store error, got {other:?}"),
    }
}

/// A unique index the run violates (data), a trigger's `RAISE` (its meaning not known:
/// transient), a missing table (the setup).
async fn store_errors_have_the_kind_the_database_meant<B: Backend>(b: B) {
    let store = b.open().await;
    let executor = Executor::builder(store.clone(), b.broker()).build();

    // Data: PostgreSQL 23505, SQLite SQLITE_CONSTRAINT_UNIQUE.
    b.exec("CREATE UNIQUE INDEX poison_twice ON outbox (destination) WHERE destination = 'twice'")
        .await;
    let twice = blocked("c1")
        .merge(MessageEffect::new("twice", json!(1)))
        .merge(MessageEffect::new("twice", json!(2)));
    let e = store_error(executor.run("twice:1", twice).await);
    assert_eq!(e.kind(), StoreErrorKind::Data, "{e}");
    assert!(e.is_permanent());
    let says = if is_postgres::<B>() {
        "duplicate key value violates unique constraint \"poison_twice\""
    } else {
        "UNIQUE constraint failed: outbox.destination"
    };
    assert!(e.to_string().contains(says), "{e}");

    // Not known: PostgreSQL P0001, SQLite SQLITE_CONSTRAINT_TRIGGER.
    b.fail_inserts("effect_runs", "TRUE", "db down").await;
    let e = store_error(executor.run("raise:1", blocked("c1")).await);
    assert_eq!(e.kind(), StoreErrorKind::Transient, "{e}");
    assert!(e.to_string().contains("db down"), "{e}");
    b.heal("effect_runs").await;

    // The setup: PostgreSQL 42P01, SQLite SQLITE_ERROR (no such table). A store opened after
    // the table went, so no statement of it is prepared already.
    b.exec("ALTER TABLE outbox RENAME TO outbox_gone").await;
    let fresh = b.open().await;
    let broken = Executor::builder(fresh, b.broker()).build();
    let e = store_error(broken.run("gone:1", blocked("c1")).await);
    assert_eq!(e.kind(), StoreErrorKind::Environment, "{e}");
    assert!(!e.is_permanent());
    assert!(e.to_string().contains("outbox"), "{e}");
    b.exec("ALTER TABLE outbox_gone RENAME TO outbox").await;

    nothing_written(&b).await;
}

// ---------------------------------------------------------------------------------------------
// Through a worker.

const TOPIC: &str = "orders";
const CONSUMER: &str = "order";

#[derive(Debug, Deserialize)]
struct Order {
    id: String,
    tag: String,
    #[serde(default)]
    twice: bool,
}

/// Records an order's tag and tells about it on a topic partitioned by the tag; an order
/// marked `twice` also sends two messages to the topic `twice` (which a unique index refuses).
/// Counts its calls.
#[derive(Debug, Default)]
struct OrderHandler {
    calls: AtomicUsize,
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
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut effects = Effects::from(DatomEffect::assert(
            LookupRef::new("order/id", order.id.as_str()),
            [("order/tag", json!(order.tag))],
        ))
        .merge(
            MessageEffect::new("order-tagged", json!({"id": order.id, "tag": order.tag}))
                .with_key(order.tag.as_str()),
        );
        if order.twice {
            effects = effects
                .merge(MessageEffect::new("twice", json!(1)))
                .merge(MessageEffect::new("twice", json!(2)));
        }
        effects
    }
}

/// The inputs, in publish order: partition key `p` with three poisons between ordinary
/// orders, and partition key `q` with ordinary orders only (so that group commits mix a poison
/// with runs of another key).
fn inputs() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let order = |id: &str, tag: &str| serde_json::to_vec(&json!({"id": id, "tag": tag})).unwrap();
    vec![
        ("m1", "p", order("1", "t1")),
        // Its effects carry a NUL in a partition key: refused by validation.
        ("m2", "p", order("2", "t\u{0}2")),
        ("n1", "q", order("n1", "u1")),
        ("m3", "p", order("3", "t3")),
        // A lone surrogate: no JSON value holds one, so it cannot be decoded.
        ("m4", "p", br#"{"id":"4","tag":"\ud800"}"#.to_vec()),
        ("n2", "q", order("n2", "u2")),
        ("m5", "p", order("5", "t5")),
        // Effects the store refuses (the unique index on `twice`): a data error.
        (
            "m6",
            "p",
            serde_json::to_vec(&json!({"id": "6", "tag": "t6", "twice": true})).unwrap(),
        ),
        ("n3", "q", order("n3", "u3")),
        ("m7", "p", order("7", "t7")),
        ("n4", "q", order("n4", "u4")),
    ]
}

const POISONS: [&str; 3] = ["m2", "m4", "m6"];

fn key_of(message_id: &str) -> String {
    message_key(CONSUMER, TOPIC, message_id)
}

struct WorkerRun {
    /// Whether every input was acknowledged (applied or dead-lettered) within the bound.
    settled: bool,
    report: WorkerReport,
    handler_calls: usize,
    /// Committed transactions per run key, from the store.
    transactions: BTreeMap<String, i64>,
    /// What the worker did with each delivery, in order, by message id.
    outcomes: Vec<(String, Processed)>,
    /// The broker's dead letters: message id and reason.
    dead_letters: BTreeMap<String, String>,
}

/// Publishes [`inputs`] on `log` and runs a worker over them on `store` (of the database of
/// `b`) until every input is acknowledged or `bound` has passed.
async fn through_a_worker<B: Backend, S: Store + Clone>(
    b: &B,
    store: S,
    log: SqliteLog,
    mutant: Option<Mutant>,
    bound: Duration,
) -> WorkerRun {
    for (id, partition, payload) in inputs() {
        log.publish(OutgoingMessage {
            id: id.to_owned(),
            topic: TOPIC.to_owned(),
            partition_key: Some(partition.to_owned()),
            headers: BTreeMap::new(),
            payload,
        })
        .await
        .unwrap();
    }
    let mut builder = Executor::builder(store, log.clone());
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let executor = Arc::new(builder.build());
    let handler = OrderHandler::default();
    let mut config = WorkerConfig {
        concurrency: 4,
        fetch_wait: Duration::from_millis(20),
        relay: Some(RelayConfig {
            interval: Duration::from_millis(20),
            ..RelayConfig::default()
        }),
        ..WorkerConfig::default()
    };
    config.retry.initial = Duration::from_millis(10);
    config.retry.max = Duration::from_millis(20);
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let worker = Arc::new(
        Worker::new(Arc::clone(&executor), handler)
            .with_config(config)
            .on_processed({
                let outcomes = Arc::clone(&outcomes);
                move |delivery, processed| {
                    outcomes
                        .lock()
                        .unwrap()
                        .push((delivery.message_id.clone(), processed.clone()));
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
    let deadline = tokio::time::Instant::now() + bound;
    let settled = loop {
        if log.unacknowledged(CONSUMER, TOPIC).await.unwrap() == 0 {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _ = stop.send(());
    let report = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the worker stops within 10 s")
        .unwrap();
    let dead_letters = log
        .dead_letters(CONSUMER)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.message_id, d.reason))
        .collect();
    let outcomes = outcomes.lock().unwrap().clone();
    WorkerRun {
        settled,
        report,
        handler_calls: worker_calls(&worker),
        transactions: b.transactions_per_key().await,
        outcomes,
        dead_letters,
    }
}

fn worker_calls<S, T, C, I>(worker: &Worker<S, T, C, OrderHandler, I>) -> usize
where
    S: Store + Clone,
    T: Transport,
    C: effects_core::http::HttpClient + 'static,
    I: effects_core::worker::Inputs<OrderHandler, S>,
{
    worker.handler().calls.load(Ordering::Relaxed)
}

/// What a worker must do with [`inputs`]: every poison dead-lettered with its reason, every
/// other input applied exactly once, the ones of `p` in publish order, and no input handled
/// twice (a retry calls the handler again).
async fn expect_the_line_goes_on<S: Store>(store: &S, run: &WorkerRun, store_refusal: &str) {
    assert!(
        run.settled,
        "not every input was settled: {:?}",
        run.outcomes
    );
    let ordinary: BTreeSet<String> = inputs()
        .iter()
        .map(|(id, _, _)| *id)
        .filter(|id| !POISONS.contains(id))
        .map(key_of)
        .collect();
    let applied: BTreeSet<String> = run.transactions.keys().cloned().collect();
    assert_eq!(applied, ordinary, "the runs applied");
    assert!(
        run.transactions.values().all(|n| *n == 1),
        "{:?}",
        run.transactions
    );
    // The decodable inputs, each called once: no retry, no second call of a poison.
    assert_eq!(run.handler_calls, inputs().len() - 1, "{:?}", run.outcomes);
    assert_eq!(run.report.applied, 8, "{:?}", run.report);
    assert_eq!(run.report.dead_lettered, 3, "{:?}", run.report);
    assert_eq!(run.report.retried, 0, "{:?}", run.report);
    let dead: BTreeSet<&str> = run.dead_letters.keys().map(String::as_str).collect();
    assert_eq!(dead, BTreeSet::from(POISONS));
    let reason = |id: &str| run.dead_letters[id].as_str();
    assert!(
        reason("m2").contains("messages[0] partition key holds a NUL character (U+0000) at byte 1"),
        "{}",
        reason("m2")
    );
    assert!(reason("m4").contains("cannot decode"), "{}", reason("m4"));
    assert!(reason("m6").contains(store_refusal), "{}", reason("m6"));
    // Partition `p` applied in publish order.
    let mut txs = Vec::new();
    for id in ["m1", "m3", "m5", "m7"] {
        txs.push(store.run(&key_of(id)).await.unwrap().expect("applied").tx);
    }
    assert!(txs.is_sorted(), "{txs:?}");
}

async fn unique_twice<B: Backend>(b: &B) {
    b.exec("CREATE UNIQUE INDEX poison_twice ON outbox (destination) WHERE destination = 'twice'")
        .await;
}

fn unique_refusal<B: Backend>() -> &'static str {
    if is_postgres::<B>() {
        "duplicate key value violates unique constraint \"poison_twice\""
    } else {
        "UNIQUE constraint failed: outbox.destination"
    }
}

/// PostgreSQL or SQLite, with the SQLite log as the broker.
async fn a_poison_input_is_dead_lettered_and_the_inputs_behind_it_are_applied<B: Backend>(b: B) {
    let store = b.open().await;
    unique_twice(&b).await;
    let run = through_a_worker(&b, store.clone(), b.broker(), None, Duration::from_secs(20)).await;
    expect_the_line_goes_on(&store, &run, unique_refusal::<B>()).await;
}

/// Without classification, the refused run is retried as if the store could come round, and
/// the inputs behind it on its partition key wait all that time — until the retries allowed
/// (`WorkerConfig::max_deliveries`, 50 by default, about 45 minutes at the default delays; a
/// second here) are spent, and then its dead letter says how often it was tried rather than
/// only why: the check above fails.
async fn mutant_retrying_data_errors_stops_the_partition_key<B: Backend>(b: B) {
    let store = b.open().await;
    unique_twice(&b).await;
    let run = through_a_worker(
        &b,
        store,
        b.broker(),
        Some(Mutant::RetryDataErrors),
        Duration::from_secs(20),
    )
    .await;
    assert!(run.report.retried >= 49, "{:?}", run.report);
    assert!(
        run.handler_calls > inputs().len(),
        "m6 is handled again and again"
    );
    let reason = run.dead_letters.get("m6").map(String::as_str).unwrap_or("");
    assert!(
        reason.starts_with("gave up after 50 attempts"),
        "dead-lettered only once its retries were spent: {:?}",
        run.dead_letters
    );
}

/// Without the value rules, the poison reaches the store: PostgreSQL refuses it (dead-lettered
/// with the store's reason, the claim attempted), SQLite writes it. The check above fails.
async fn mutant_without_value_rules_lets_a_poison_input_reach_the_store<B: Backend>(b: B) {
    let store = b.open().await;
    unique_twice(&b).await;
    let run = through_a_worker(
        &b,
        store,
        b.broker(),
        Some(Mutant::NoValueRules),
        Duration::from_secs(20),
    )
    .await;
    assert!(run.settled, "{:?}", run.outcomes);
    if is_postgres::<B>() {
        let reason = &run.dead_letters["m2"];
        assert!(!reason.contains("NUL character"), "{reason}");
        assert!(reason.contains("0x00"), "{reason}");
    } else {
        assert!(!run.dead_letters.contains_key("m2"));
        assert_eq!(run.transactions.get(&key_of("m2")), Some(&1));
    }
}

/// The embedded log: the SQLite store's own, published to in the run's transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_embedded_log_a_poison_input_is_dead_lettered_and_the_inputs_behind_it_are_applied()
{
    let b = backends::Sqlite::create("embedded_poison").await;
    backends::run_case(b, |b| async move {
        let store = b.open().await;
        unique_twice(&b).await;
        let run = through_a_worker(
            &b,
            store.clone(),
            store.log(),
            None,
            Duration::from_secs(20),
        )
        .await;
        expect_the_line_goes_on(&store, &run, unique_refusal::<backends::Sqlite>()).await;
    })
    .await;
}

/// A database another connection keeps busy past the store's busy timeout: transient.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_sqlite_database_is_transient() {
    use effects_core::store::{SqliteOptions, SqliteStore};
    let b = backends::Sqlite::create("busy").await;
    backends::run_case(b, |b| async move {
        let store = SqliteStore::open_with(
            b.path(),
            &SqliteOptions {
                busy_timeout: Duration::from_millis(50),
                ..SqliteOptions::default()
            },
        )
        .unwrap();
        let executor = Executor::builder(store, b.broker()).build();
        let holder = rusqlite::Connection::open(b.path()).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let e = store_error(executor.run("busy:1", blocked("c1")).await);
        holder.execute_batch("ROLLBACK").unwrap();
        assert_eq!(e.kind(), StoreErrorKind::Transient, "{e}");
        assert!(e.to_string().contains("database is locked"), "{e}");
        let outcome = executor.run("busy:1", blocked("c1")).await.unwrap();
        assert!(matches!(outcome, RunOutcome::Applied { .. }), "{outcome:?}");
    })
    .await;
}

/// SQLSTATEs raised by a trigger in the run's transaction, and a real statement timeout, each
/// of the kind its class says; the store's own retry of a serialization failure counted at the
/// source (every attempted key claim).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_errors_have_the_kind_of_their_sqlstate_class() {
    use backends::postgres::Postgres;
    use effects_core::postgres::PostgresStore;
    let b = Postgres::create("sqlstates").await;
    backends::run_case(b, |b| async move {
        let store = b.open().await;
        let executor = Executor::builder(store, b.broker()).build();
        count_write_attempts(&b).await;
        // Raises `code` for the keys that start with it.
        b.exec(
            "CREATE FUNCTION raise_by_key() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF NEW.key LIKE 'sqlstate-%' THEN \
                 RAISE EXCEPTION 'raised for %', NEW.key \
                   USING ERRCODE = split_part(NEW.key, '-', 2); \
               END IF; \
               IF NEW.key LIKE 'slow-%' THEN PERFORM pg_sleep(5); END IF; \
               RETURN NEW; \
             END $$; \
             CREATE TRIGGER raise_by_key BEFORE INSERT ON effect_runs \
             FOR EACH ROW EXECUTE FUNCTION raise_by_key();",
        )
        .await;
        let retries = b.options().retries;
        let cases = [
            ("22P02", StoreErrorKind::Data, 1),
            ("23505", StoreErrorKind::Data, 1),
            ("23514", StoreErrorKind::Data, 1),
            ("54000", StoreErrorKind::Data, 1),
            ("P0001", StoreErrorKind::Transient, 1),
            ("55P03", StoreErrorKind::Transient, 1),
            ("42501", StoreErrorKind::Environment, 1),
            // Run again by the store itself before it gives up.
            ("40001", StoreErrorKind::Transient, i64::from(retries) + 1),
            ("40P01", StoreErrorKind::Transient, i64::from(retries) + 1),
        ];
        for (code, kind, attempts) in cases {
            let before = write_attempts(&b).await;
            let key = format!("sqlstate-{code}");
            let e = store_error(executor.run(key.as_str(), blocked("c1")).await);
            assert_eq!(e.kind(), kind, "{code}: {e}");
            assert_eq!(e.is_permanent(), kind == StoreErrorKind::Data, "{code}");
            assert!(e.to_string().contains(&format!("raised for {key}")), "{e}");
            assert_eq!(write_attempts(&b).await - before, attempts, "{code}");
        }
        // A real statement timeout: 57014.
        let impatient = PostgresStore::connect(effects_core::postgres::PostgresOptions {
            statement_timeout: Some(Duration::from_millis(200)),
            ..b.options()
        })
        .await
        .unwrap();
        let executor = Executor::builder(impatient, b.broker()).build();
        let e = store_error(executor.run("slow-1", blocked("c1")).await);
        assert_eq!(e.kind(), StoreErrorKind::Transient, "{e}");
        assert!(e.to_string().contains("statement timeout"), "{e}");
        nothing_written(&b).await;
    })
    .await;
}
