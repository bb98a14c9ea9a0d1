//! The executor on the embedded default: SQLite store and log on real files, HTTP against a real
//! server on loopback. Outcomes (applied, duplicate, key reuse, database error), as-of reads,
//! outbox order, the relay after a crash, pruning rules, batching and validation.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use effects_core::executor::{
    Backoff, BatchItem, Executor, Limits, RunError, RunOptions, RunOutcome, ValidationError,
};
use effects_core::relay::{Relay, RelayConfig, Retention};
use effects_core::store::{
    OutboxKind, PruneOlderThan, RequestOutcome, RunStatus, SqliteStore, Store, StoreError, Tx,
};
use effects_core::transport::{HEADER_KEY, HEADER_TX, SqliteLog};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect, Method, RequestEffect};
use serde_json::json;
use support::{http_client, sql_exec, sql_i64, temp_dir};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn card(id: &str) -> LookupRef {
    LookupRef::new("card/id", id)
}

fn block(id: &str) -> Effects {
    Effects::from(DatomEffect::assert(
        card(id),
        [("card/status", json!("blocked"))],
    ))
    .merge(
        MessageEffect::new(
            "card-status-changed",
            json!({"card_id": id, "status": "blocked"}),
        )
        .with_key(id),
    )
}

fn notify_request(id: &str) -> RequestEffect {
    RequestEffect::new(Method::Post, "notify", format!("/notify/{id}"))
        .with_body(json!({"card_id": id}))
}

#[tokio::test]
async fn applied_writes_datoms_outbox_and_publishes_in_the_same_commit() {
    let dir = temp_dir("applied");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let log = store.log();
    let executor = Executor::builder(store.clone(), log.clone()).build();
    assert!(executor.publishes_inline());

    let outcome = executor.run("block:m1", block("c1")).await.unwrap();
    let RunOutcome::Applied { tx, progress } = outcome else {
        panic!("expected Applied, got {outcome:?}");
    };
    assert_eq!(progress.messages_dispatched, 1);
    assert_eq!(progress.pending, 0);

    let entity = store.entity(&card("c1"), None).await.unwrap().unwrap();
    assert_eq!(entity.get("card/status"), Some(&json!("blocked")));
    assert_eq!(entity.tx, tx);

    let run = store.run("block:m1").await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Done);
    assert_eq!(run.tx, tx);
    assert_eq!(run.effects_sha256.len(), 64);

    let rows = store.outbox("block:m1").await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id, "block:m1#0");
    assert_eq!(rows[0].kind, OutboxKind::Message);
    assert!(rows[0].dispatched_at.is_some());

    let published = log.messages("card-status-changed").await.unwrap();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].message_id, "block:m1#0");
    assert_eq!(published[0].partition_key.as_deref(), Some("c1"));
    assert_eq!(published[0].headers[HEADER_KEY], "block:m1");
    assert_eq!(published[0].headers[HEADER_TX], tx.to_string());
    let payload: serde_json::Value = serde_json::from_slice(&published[0].payload).unwrap();
    assert_eq!(payload, json!({"card_id": "c1", "status": "blocked"}));

    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM transactions"), 1);
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM datoms"), 1);
}

#[tokio::test]
async fn duplicate_applies_nothing_and_reports_the_original_tx() {
    let dir = temp_dir("duplicate");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let executor = Executor::builder(store.clone(), store.log()).build();

    let first = executor.run("block:m1", block("c1")).await.unwrap();
    let second = executor.run("block:m1", block("c1")).await.unwrap();
    assert_eq!(
        second,
        RunOutcome::Duplicate {
            original_tx: first.tx(),
            progress: Default::default()
        }
    );
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM transactions"), 1);
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM datoms"), 1);
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM log_messages"), 1);
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM outbox"), 1);
}

#[tokio::test]
async fn duplicate_dispatches_only_the_original_runs_pending_rows() {
    // The log lives in another file (an external broker): publishing is a step after the commit.
    let dir = temp_dir("duplicate-pending");
    let store = SqliteStore::open(dir.join("store.db")).unwrap();
    let broker = SqliteLog::open(dir.join("broker.db")).unwrap();
    // Publishing fails while the trigger is there: the message stays pending.
    sql_exec(
        &dir.join("broker.db"),
        "CREATE TRIGGER down BEFORE INSERT ON log_messages BEGIN SELECT RAISE(ABORT, 'broker down'); END;",
    );
    let executor = Executor::builder(store.clone(), broker.clone())
        .retry(Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            max_attempts: None,
        })
        .build();
    assert!(!executor.publishes_inline());

    let original = block("c1").merge(MessageEffect::new("audit", json!({"n": 1})));
    let first = executor.run("block:m1", original.clone()).await.unwrap();
    let RunOutcome::Applied { progress, .. } = first else {
        panic!("{first:?}")
    };
    assert_eq!(progress.messages_dispatched, 0);
    assert_eq!(progress.pending, 2);

    sql_exec(&dir.join("broker.db"), "DROP TRIGGER down;");
    let again = executor.run("block:m1", original).await.unwrap();
    let RunOutcome::Duplicate {
        original_tx,
        progress,
    } = again
    else {
        panic!("{again:?}")
    };
    assert_eq!(original_tx, first.tx());
    assert_eq!(progress.messages_dispatched, 2);
    assert_eq!(progress.pending, 0);
    let ids: Vec<String> = broker
        .messages("card-status-changed")
        .await
        .unwrap()
        .into_iter()
        .chain(broker.messages("audit").await.unwrap())
        .map(|m| m.message_id)
        .collect();
    assert_eq!(ids, ["block:m1#0", "block:m1#1"]);
    assert_eq!(
        store.run("block:m1").await.unwrap().unwrap().status,
        RunStatus::Done
    );
}

#[tokio::test]
async fn key_reuse_with_other_effects_is_refused_and_applies_nothing() {
    let dir = temp_dir("key-reuse");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let executor = Executor::builder(store.clone(), store.log()).build();

    let first = executor.run("block:m1", block("c1")).await.unwrap();
    let err = executor.run("block:m1", block("c2")).await.unwrap_err();
    let RunError::KeyReuse {
        key,
        original_tx,
        original_sha256,
        sha256,
    } = &err
    else {
        panic!("expected KeyReuse, got {err:?}");
    };
    assert_eq!(key, "block:m1");
    assert_eq!(*original_tx, first.tx());
    assert_ne!(original_sha256, sha256);
    assert!(
        err.to_string()
            .contains("already used for different effects")
    );
    assert_eq!(store.entity(&card("c2"), None).await.unwrap(), None);
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM transactions"), 1);
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM log_messages"), 1);
}

#[tokio::test]
async fn a_database_error_applies_nothing_and_dispatches_nothing() {
    let dir = temp_dir("db-error");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let executor = Executor::builder(store.clone(), store.log()).build();

    // A real SQLite failure in the middle of the run's transaction: after the key claim and
    // the datoms, when the outbox row is written.
    sql_exec(
        &db,
        "CREATE TRIGGER fail BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
    );
    let err = executor.run("block:m1", block("c1")).await.unwrap_err();
    assert!(matches!(err, RunError::Store { .. }), "{err:?}");
    assert!(err.to_string().contains("disk on fire"), "{err}");
    for table in [
        "transactions",
        "effect_runs",
        "entities",
        "datoms",
        "outbox",
        "log_messages",
    ] {
        assert_eq!(
            sql_i64(&db, &format!("SELECT COUNT(*) FROM {table}")),
            0,
            "{table} must be empty after a failed commit"
        );
    }

    // Once the database works, the same key applies normally.
    sql_exec(&db, "DROP TRIGGER fail;");
    let outcome = executor.run("block:m1", block("c1")).await.unwrap();
    assert!(matches!(outcome, RunOutcome::Applied { .. }));
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM log_messages"), 1);
}

#[tokio::test]
async fn a_locked_database_fails_the_run_cleanly() {
    let dir = temp_dir("db-locked");
    let db = dir.join("store.db");
    let options = effects_core::store::SqliteOptions {
        busy_timeout: Duration::from_millis(50),
        ..Default::default()
    };
    let store = SqliteStore::open_with(&db, &options).unwrap();
    let executor = Executor::builder(store.clone(), store.log()).build();

    // Another process holds the write lock.
    let other = rusqlite::Connection::open(&db).unwrap();
    other.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let err = executor.run("block:m1", block("c1")).await.unwrap_err();
    assert!(matches!(err, RunError::Store { .. }), "{err:?}");
    other.execute_batch("ROLLBACK;").unwrap();
    drop(other);

    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM effect_runs"), 0);
    assert!(matches!(
        executor.run("block:m1", block("c1")).await.unwrap(),
        RunOutcome::Applied { .. }
    ));
}

#[tokio::test]
async fn entities_read_now_and_as_of_any_tx() {
    let store = SqliteStore::in_memory().unwrap();
    let executor = Executor::builder(store.clone(), store.log()).build();
    let c1 = card("c1");
    let status = |s: &str| DatomEffect::assert(c1.clone(), [("card/status", json!(s))]);

    let t1 = executor
        .run(
            "k1",
            Effects::from(DatomEffect::assert(
                c1.clone(),
                [("card/status", json!("active")), ("card/limit", json!(100))],
            )),
        )
        .await
        .unwrap()
        .tx();
    let t2 = executor
        .run("k2", Effects::from(status("blocked")))
        .await
        .unwrap()
        .tx();
    // Asserting the current value again changes nothing.
    let t3 = executor
        .run("k3", Effects::from(status("blocked")))
        .await
        .unwrap()
        .tx();
    let t4 = executor
        .run(
            "k4",
            Effects::from(DatomEffect::retract(
                c1.clone(),
                [("card/limit", json!(100))],
            )),
        )
        .await
        .unwrap()
        .tx();
    assert!(
        t1 < t2 && t2 < t3 && t3 < t4,
        "tx increases: {t1} {t2} {t3} {t4}"
    );

    let at = |tx: Tx| {
        let store = store.clone();
        let c1 = c1.clone();
        async move { store.entity(&c1, Some(tx)).await.unwrap() }
    };
    assert_eq!(at(Tx(t1.0 - 1)).await, None, "not created yet");
    let e1 = at(t1).await.unwrap();
    assert_eq!(e1.get("card/status"), Some(&json!("active")));
    assert_eq!(e1.get("card/limit"), Some(&json!(100)));
    assert_eq!(e1.tx, t1);
    let e2 = at(t2).await.unwrap();
    assert_eq!(e2.get("card/status"), Some(&json!("blocked")));
    assert_eq!(e2.get("card/limit"), Some(&json!(100)));
    assert_eq!(
        at(t3).await.unwrap().tx,
        t2,
        "a redundant assertion is no change"
    );
    let e4 = at(t4).await.unwrap();
    assert_eq!(e4.get("card/limit"), None);
    assert_eq!(e4.tx, t4);

    let now = store.entity(&c1, None).await.unwrap().unwrap();
    assert_eq!(now, e4);
    assert_eq!(
        now.to_unqualified(),
        json!({"id": "c1", "status": "blocked"})
    );
    assert_eq!(store.latest_tx().await.unwrap(), Some(t4));
    assert_eq!(store.entity(&card("nope"), None).await.unwrap(), None);
}

#[tokio::test]
async fn messages_keep_their_order_per_partition_key_across_runs() {
    let dir = temp_dir("order");
    let store = SqliteStore::open(dir.join("store.db")).unwrap();
    let broker_db = dir.join("broker.db");
    let broker = SqliteLog::open(&broker_db).unwrap();
    let executor = Arc::new(
        Executor::builder(store.clone(), broker.clone())
            .retry(Backoff {
                initial: Duration::ZERO,
                max: Duration::ZERO,
                max_attempts: None,
            })
            .build(),
    );
    let msg = |key: &str, n: u32| {
        MessageEffect::new("events", json!({"key": key, "n": n})).with_key(key.to_owned())
    };

    // The broker refuses a's first message: it stays pending and blocks the rest of
    // partition `a` — but not partition `b`.
    sql_exec(
        &broker_db,
        "CREATE TRIGGER down BEFORE INSERT ON log_messages WHEN NEW.message_id = 'r1#0' \
         BEGIN SELECT RAISE(ABORT, 'broker hiccup'); END;",
    );
    let r1 = executor
        .run("r1", Effects::from(msg("a", 1)).merge(msg("b", 1)))
        .await
        .unwrap();
    assert_eq!(r1.progress().pending, 1, "a#1 failed; b#1 went out");
    let r2 = executor
        .run("r2", Effects::from(msg("a", 2)).merge(msg("b", 2)))
        .await
        .unwrap();
    assert_eq!(r2.progress().messages_dispatched, 1, "b#2 went out");
    assert_eq!(r2.progress().pending, 1, "a#2 waits behind a#1");
    let relay = Relay::new(Arc::clone(&executor));
    relay.tick().await.unwrap();
    let order = |msgs: Vec<effects_core::transport::LoggedMessage>| -> Vec<(String, u64)> {
        msgs.into_iter()
            .map(|m| {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                (
                    v["key"].as_str().unwrap().to_owned(),
                    v["n"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        order(broker.messages("events").await.unwrap()),
        [("b".to_owned(), 1), ("b".to_owned(), 2)],
        "partition b flows; partition a waits for its first message"
    );

    sql_exec(&broker_db, "DROP TRIGGER down;");
    relay.tick().await.unwrap();
    let all = order(broker.messages("events").await.unwrap());
    let a: Vec<u64> = all
        .iter()
        .filter(|(k, _)| k == "a")
        .map(|(_, n)| *n)
        .collect();
    let b: Vec<u64> = all
        .iter()
        .filter(|(k, _)| k == "b")
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(a, [1, 2]);
    assert_eq!(b, [1, 2]);
    for key in ["r1", "r2"] {
        assert_eq!(
            store.run(key).await.unwrap().unwrap().status,
            RunStatus::Done
        );
    }
}

#[tokio::test]
async fn requests_carry_the_key_are_recorded_and_feed_after_requests() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/notify/c1"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"ticket": 42})))
        .mount(&server)
        .await;
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Executor::builder(store.clone(), log.clone())
        .http(http_client(&server.uri(), 3))
        .after_requests("ticket", |recorded| {
            recorded
                .iter()
                .filter_map(|r| r.outcome.response())
                .map(|resp| MessageEffect::new("tickets", json!({"ticket": resp.body["ticket"]})))
                .collect()
        })
        .build();

    let effects = block("c1").merge(notify_request("c1"));
    let outcome = executor
        .run_with("block:m1", effects, RunOptions::after_requests("ticket"))
        .await
        .unwrap();
    let RunOutcome::Applied { progress, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(progress.requests_sent, 1);
    assert_eq!(progress.messages_dispatched, 2);
    assert_eq!(progress.pending, 0);

    let received = server.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].headers["idempotency-key"].to_str().unwrap(),
        "block:m1#0"
    );

    let recorded = store.recorded_requests("block:m1").await.unwrap();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].id, "block:m1#0");
    let RequestOutcome::Response { response } = &recorded[0].outcome else {
        panic!("{:?}", recorded[0].outcome)
    };
    assert_eq!(response.status, 201);

    let ids: Vec<String> = store
        .outbox("block:m1")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["block:m1#0", "block:m1#1", "block:m1#2"]);
    let tickets = log.messages("tickets").await.unwrap();
    assert_eq!(tickets.len(), 1);
    assert_eq!(tickets[0].message_id, "block:m1#2");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&tickets[0].payload).unwrap(),
        json!({"ticket": 42})
    );
    // The run's own message went out after the request, not at commit.
    let changed = log.messages("card-status-changed").await.unwrap();
    assert!(changed[0].published_at >= response_time(&store, "block:m1").await);
    assert_eq!(
        store.run("block:m1").await.unwrap().unwrap().status,
        RunStatus::Done
    );
}

async fn response_time(store: &SqliteStore, key: &str) -> i64 {
    store
        .outbox(key)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.kind == OutboxKind::Request)
        .and_then(|r| r.dispatched_at)
        .unwrap()
}

#[tokio::test]
async fn a_rejected_request_is_dead_lettered_and_never_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({"error": "no such card"})))
        .mount(&server)
        .await;
    let store = SqliteStore::in_memory().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let seen_in_hook = Arc::clone(&seen);
    let executor = Arc::new(
        Executor::builder(store.clone(), store.log())
            .http(http_client(&server.uri(), 3))
            .after_requests("count", move |recorded| {
                assert!(matches!(
                    recorded[0].outcome,
                    RequestOutcome::Rejected { .. }
                ));
                seen_in_hook.fetch_add(1, Ordering::Relaxed);
                Vec::new()
            })
            .build(),
    );
    let outcome = executor
        .run_with(
            "block:m1",
            block("c1").merge(notify_request("c1")),
            RunOptions::after_requests("count"),
        )
        .await
        .unwrap();
    assert_eq!(outcome.progress().dead_lettered, 1);
    assert_eq!(outcome.progress().messages_dispatched, 1);
    let rows = store.outbox("block:m1").await.unwrap();
    assert_eq!(
        rows[0].dead_lettered.as_deref(),
        Some("rejected with status 422")
    );
    assert_eq!(seen.load(Ordering::Relaxed), 1);

    // Neither the duplicate path nor the relay sends it again.
    executor
        .run_with(
            "block:m1",
            block("c1").merge(notify_request("c1")),
            RunOptions::after_requests("count"),
        )
        .await
        .unwrap();
    Relay::new(Arc::clone(&executor)).tick().await.unwrap();
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_failing_request_is_retried_later_with_the_same_key_and_holds_the_messages() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(
        Executor::builder(store.clone(), log.clone())
            .http(http_client(&server.uri(), 2))
            .retry(Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(50),
                max_attempts: None,
            })
            .build(),
    );
    let outcome = executor
        .run("block:m1", block("c1").merge(notify_request("c1")))
        .await
        .unwrap();
    assert_eq!(outcome.progress().pending, 2, "{outcome:?}");
    assert!(
        log.messages("card-status-changed")
            .await
            .unwrap()
            .is_empty()
    );
    let row = &store.outbox("block:m1").await.unwrap()[0];
    assert_eq!(row.attempts, 1);
    assert!(
        row.last_error.as_deref().unwrap_or("").contains("503"),
        "{row:?}"
    );

    let mut keys: Vec<String> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let relay = Relay::new(Arc::clone(&executor));
    let mut sent = 0;
    // Bounded: the retry is due 50 ms after the failure.
    for _ in 0..100 {
        sent += relay.tick().await.unwrap().progress.requests_sent;
        if sent > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sent, 1);
    assert_eq!(log.messages("card-status-changed").await.unwrap().len(), 1);
    assert_eq!(
        store.run("block:m1").await.unwrap().unwrap().status,
        RunStatus::Done
    );
    // Idempotency key on every attempt, the failed ones included (2 + 1).
    keys.extend(
        server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned()),
    );
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| k == "block:m1#0"), "{keys:?}");
}

/// An endpoint that answers 500 forever: by default the request is given up on after a bounded
/// number of attempts, the failure is what the after-requests hook sees, and the messages the
/// run held back are published. Nothing stays pending.
#[tokio::test]
async fn a_request_that_always_fails_is_given_up_on_by_default_and_releases_its_messages() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&server)
        .await;
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let seen: Arc<std::sync::Mutex<Vec<RequestOutcome>>> = Arc::default();
    let recorded = Arc::clone(&seen);
    let default = Backoff::default();
    let executor = Arc::new(
        Executor::builder(store.clone(), log.clone())
            .http(http_client(&server.uri(), 1))
            // The default bound, with short delays.
            .retry(Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(2),
                ..default
            })
            .after_requests("receipt", move |requests| {
                recorded
                    .lock()
                    .unwrap()
                    .extend(requests.iter().map(|r| r.outcome.clone()));
                vec![MessageEffect::new(
                    "receipts",
                    json!({"ok": requests[0].outcome.is_success()}),
                )]
            })
            .build(),
    );
    executor
        .run_with(
            "block:m1",
            block("c1").merge(notify_request("c1")),
            RunOptions::after_requests("receipt"),
        )
        .await
        .unwrap();
    let relay = Relay::new(Arc::clone(&executor));
    // Bounded: 20 attempts, a few milliseconds apart.
    for _ in 0..2_000 {
        relay.tick().await.unwrap();
        if store.run("block:m1").await.unwrap().unwrap().status == RunStatus::Done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let max = default.max_attempts.expect("a default bound");
    assert_eq!(max, 20);
    assert_eq!(
        store.run("block:m1").await.unwrap().unwrap().status,
        RunStatus::Done
    );
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        max as usize
    );
    let row = &store.outbox("block:m1").await.unwrap()[0];
    assert_eq!(row.attempts, max);
    let reason = row.dead_lettered.as_deref().unwrap_or_default();
    assert!(reason.starts_with("gave up after 20 attempts"), "{reason}");
    assert!(matches!(
        seen.lock().unwrap().as_slice(),
        [RequestOutcome::Failed { .. }]
    ));
    assert_eq!(log.messages("card-status-changed").await.unwrap().len(), 1);
    assert_eq!(
        log.messages("receipts").await.unwrap()[0].payload,
        br#"{"ok":false}"#
    );
}

#[tokio::test]
async fn the_relay_finishes_what_a_crashed_run_left_once_the_lease_expires() {
    let dir = temp_dir("relay-crash");
    let store = SqliteStore::open(dir.join("store.db")).unwrap();
    let broker = SqliteLog::open(dir.join("broker.db")).unwrap();
    // The "crash": the process dies right after the commit (a panic here, a SIGKILL in the
    // reliability tests).
    let crashing = Arc::new(
        Executor::builder(store.clone(), broker.clone())
            .owner("worker-a")
            // Long enough that a loaded machine still ticks the relay within it.
            .lease(Duration::from_secs(2))
            .fault_hook(Arc::new(|point, _| {
                if point == effects_core::executor::FaultPoint::AfterCommit {
                    panic!("crash after commit");
                }
            }))
            .build(),
    );
    let task = {
        let crashing = Arc::clone(&crashing);
        tokio::spawn(async move { crashing.run("block:m1", block("c1")).await })
    };
    assert!(task.await.unwrap_err().is_panic());
    assert!(store.entity(&card("c1"), None).await.unwrap().is_some());
    assert!(
        broker
            .messages("card-status-changed")
            .await
            .unwrap()
            .is_empty()
    );

    let survivor = Arc::new(
        Executor::builder(store.clone(), broker.clone())
            .owner("worker-b")
            .build(),
    );
    let relay = Relay::new(Arc::clone(&survivor));
    // The lease is still held: the relay must not send the row meanwhile.
    assert_eq!(relay.tick().await.unwrap().claimed, 0);
    tokio::time::sleep(Duration::from_millis(2_050)).await;
    let report = relay.tick().await.unwrap();
    assert_eq!(report.claimed, 1);
    assert_eq!(report.progress.messages_dispatched, 1);
    assert_eq!(
        broker.messages("card-status-changed").await.unwrap().len(),
        1
    );
    assert_eq!(relay.tick().await.unwrap().claimed, 0);
    assert_eq!(
        store.run("block:m1").await.unwrap().unwrap().status,
        RunStatus::Done
    );

    // A process restarted under the crashed one's name reclaims at once.
    let store2 = SqliteStore::open(dir.join("store.db")).unwrap();
    let c = Arc::new(
        Executor::builder(store2.clone(), broker.clone())
            .owner("worker-c")
            .lease(Duration::from_secs(3600))
            .fault_hook(Arc::new(|point, _| {
                if point == effects_core::executor::FaultPoint::AfterCommit {
                    panic!("crash after commit");
                }
            }))
            .build(),
    );
    let task = {
        let c = Arc::clone(&c);
        tokio::spawn(async move { c.run("block:m2", block("c2")).await })
    };
    assert!(task.await.unwrap_err().is_panic());
    let restarted = Arc::new(
        Executor::builder(store2, broker.clone())
            .owner("worker-c")
            .build(),
    );
    assert_eq!(restarted.recover().await.unwrap(), 1);
    assert_eq!(
        Relay::new(restarted)
            .tick()
            .await
            .unwrap()
            .progress
            .messages_dispatched,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_never_send_one_row_twice() {
    const RUNS: usize = 60;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let dir = temp_dir("two-relays");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let broker = SqliteLog::open(dir.join("broker.db")).unwrap();
    // A process that dies right after each commit leaves every request and message pending
    // under its short lease.
    let dying = Arc::new(
        Executor::builder(store.clone(), broker.clone())
            .http(http_client(&server.uri(), 1))
            .owner("dead")
            .lease(Duration::from_millis(200))
            .fault_hook(Arc::new(|point, _| {
                if point == effects_core::executor::FaultPoint::AfterCommit {
                    panic!("crash after commit");
                }
            }))
            .build(),
    );
    for i in 0..RUNS {
        let key = format!("k{i}");
        let effects = block(&format!("c{i}")).merge(notify_request(&format!("c{i}")));
        let dying = Arc::clone(&dying);
        let crashed = tokio::spawn(async move { dying.run(key, effects).await }).await;
        assert!(crashed.unwrap_err().is_panic());
    }
    tokio::time::sleep(Duration::from_millis(250)).await;

    let relay = |owner: &str| {
        Relay::new(Arc::new(
            Executor::builder(store.clone(), broker.clone())
                .http(http_client(&server.uri(), 1))
                .owner(owner)
                .build(),
        ))
        .with_config(RelayConfig {
            batch: 7,
            ..RelayConfig::default()
        })
    };
    let (a, b) = (relay("relay-a"), relay("relay-b"));
    let drain = |relay: Relay<_, _, _>| async move {
        let mut report = effects_core::executor::RelayReport::default();
        // Bounded: 2 * RUNS rows, at least one per round until none is left.
        for _ in 0..200 {
            let r = relay.tick().await.unwrap();
            report.claimed += r.claimed;
            report.progress.requests_sent += r.progress.requests_sent;
            report.progress.messages_dispatched += r.progress.messages_dispatched;
            if r.claimed == 0 && r.finished_runs == 0 {
                break;
            }
        }
        report
    };
    let (ra, rb) = tokio::join!(tokio::spawn(drain(a)), tokio::spawn(drain(b)));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.progress.requests_sent + rb.progress.requests_sent,
        RUNS,
        "{ra:?} {rb:?}"
    );
    assert_eq!(
        ra.progress.messages_dispatched + rb.progress.messages_dispatched,
        RUNS
    );
    assert!(
        ra.claimed > 0 && rb.claimed > 0,
        "both relays took part: {ra:?} {rb:?}"
    );
    assert_eq!(
        server.received_requests().await.unwrap().len(),
        RUNS,
        "one request per row"
    );
    // One attempt by the dead process (claimed at commit), one by a relay: never two.
    assert_eq!(
        sql_i64(
            &db,
            "SELECT COUNT(*) FROM outbox WHERE kind = 'request' AND attempts <> 2"
        ),
        0
    );
    assert_eq!(
        sql_i64(
            &db,
            "SELECT COUNT(*) FROM outbox WHERE kind = 'message' AND attempts <> 1"
        ),
        0,
        "messages were never claimed by the dead process (they waited for the requests)"
    );
    assert_eq!(
        sql_i64(
            &db,
            "SELECT COUNT(*) FROM effect_runs WHERE status <> 'done'"
        ),
        0
    );
}

#[tokio::test]
async fn pruning_removes_only_old_finished_work() {
    let dir = temp_dir("prune");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let broker_db = dir.join("broker.db");
    let broker = SqliteLog::open(&broker_db).unwrap();
    let executor = Executor::builder(store.clone(), broker.clone())
        .retry(Backoff {
            initial: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
            max_attempts: None,
        })
        .build();

    // done: dispatched. stuck: its message cannot be published (pending forever). dead: its
    // message could not be published either and an operator dead-lettered it.
    executor.run("done", block("c1")).await.unwrap();
    sql_exec(
        &broker_db,
        "CREATE TRIGGER down BEFORE INSERT ON log_messages WHEN NEW.message_id IN ('stuck#0', 'dead#0') \
         BEGIN SELECT RAISE(ABORT, 'down'); END;",
    );
    executor.run("stuck", block("c2")).await.unwrap();
    executor.run("dead", block("c3")).await.unwrap();
    assert!(
        store
            .dead_letter("dead#0", "operator gave up", None)
            .await
            .unwrap()
    );
    assert_eq!(
        store.run("dead").await.unwrap().unwrap().status,
        RunStatus::Done
    );

    // Nothing is old enough yet.
    let minute = Some(Duration::from_secs(60));
    let report = store
        .prune(PruneOlderThan {
            outbox_dispatched: minute,
            runs_completed: minute,
            log_published: None,
        })
        .await
        .unwrap();
    assert_eq!(report, Default::default());

    // Everything is old enough now.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let everything = PruneOlderThan {
        outbox_dispatched: Some(Duration::ZERO),
        runs_completed: Some(Duration::ZERO),
        log_published: None,
    };
    let report = store.prune(everything).await.unwrap();
    assert_eq!(report.outbox_rows, 1, "only done#0");
    assert_eq!(report.runs, 1, "only `done`");
    assert!(store.run("done").await.unwrap().is_none());
    assert!(
        store.run("stuck").await.unwrap().is_some(),
        "in progress: kept"
    );
    assert_eq!(
        store.outbox("stuck").await.unwrap().len(),
        1,
        "undispatched: kept"
    );
    assert!(
        store.run("dead").await.unwrap().is_some(),
        "dead-lettered rows keep their run"
    );
    assert_eq!(store.outbox("dead").await.unwrap().len(), 1);
    // Datoms are the database, not a log: never pruned.
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM datoms"), 3);
    // A pruned key can be applied again (retention defines the idempotency window).
    assert!(matches!(
        executor.run("done", block("c1")).await.unwrap(),
        RunOutcome::Applied { .. }
    ));

    // The log: only what every consumer acknowledged.
    let log = store.log();
    use effects_core::transport::{FetchRequest, OutgoingMessage, Transport};
    for i in 0..3 {
        log.publish(OutgoingMessage {
            id: format!("m{i}"),
            topic: "t".into(),
            partition_key: None,
            headers: Default::default(),
            payload: b"{}".to_vec(),
        })
        .await
        .unwrap();
    }
    let fetched = log
        .fetch(FetchRequest {
            consumer: "c".into(),
            topic: "t".into(),
            max: 2,
            visibility: Duration::from_secs(60),
            wait: Duration::ZERO,
        })
        .await
        .unwrap();
    for d in &fetched {
        log.ack(d).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let report = store
        .prune(PruneOlderThan {
            log_published: Some(Duration::ZERO),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(report.log_messages, 2);
    assert_eq!(log.messages("t").await.unwrap().len(), 1);

    // The relay prunes with its retention.
    let relay_config = RelayConfig {
        retention: Some(Retention::default()),
        ..Default::default()
    };
    let pruned = Relay::new(Arc::new(executor))
        .with_config(relay_config)
        .prune()
        .await
        .unwrap();
    assert_eq!(pruned, Default::default(), "nothing is a day old");
}

#[tokio::test]
async fn a_batch_commits_once_and_reports_each_run() {
    let dir = temp_dir("batch");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let executor = Executor::builder(store.clone(), store.log()).build();
    executor.run("old", block("c0")).await.unwrap();

    let results = executor
        .run_batch(vec![
            BatchItem::new("b1", block("c1")),
            BatchItem::new("", block("c2")),
            BatchItem::new("b3", block("c3")),
            BatchItem::new("b1", block("c1")),
            BatchItem::new("old", block("c0")),
            BatchItem::new("old", block("c9")),
        ])
        .await
        .unwrap();
    assert!(matches!(results[0], Ok(RunOutcome::Applied { .. })));
    assert!(matches!(
        results[1],
        Err(RunError::Invalid {
            source: ValidationError::EmptyKey,
            ..
        })
    ));
    assert!(matches!(results[2], Ok(RunOutcome::Applied { .. })));
    let t1 = results[0].as_ref().unwrap().tx();
    let t3 = results[2].as_ref().unwrap().tx();
    assert!(t1 < t3);
    assert!(
        matches!(&results[3], Ok(RunOutcome::Duplicate { original_tx, .. }) if *original_tx == t1)
    );
    assert!(matches!(results[4], Ok(RunOutcome::Duplicate { .. })));
    assert!(matches!(results[5], Err(RunError::KeyReuse { .. })));
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM transactions"), 3);
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM log_messages"), 3);
    assert!(store.entity(&card("c9"), None).await.unwrap().is_none());
}

#[tokio::test]
async fn a_batch_with_a_database_error_writes_nothing() {
    let dir = temp_dir("batch-error");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let executor = Executor::builder(store.clone(), store.log()).build();
    sql_exec(
        &db,
        "CREATE TRIGGER fail BEFORE INSERT ON outbox WHEN NEW.run_key = 'b2' \
         BEGIN SELECT RAISE(ABORT, 'boom'); END;",
    );
    let err = executor
        .run_batch(vec![
            BatchItem::new("b1", block("c1")),
            BatchItem::new("b2", block("c2")),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err:?}");
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM effect_runs"), 0);
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM log_messages"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_from_two_tasks_applies_exactly_once() {
    let dir = temp_dir("same-key");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let executor = Arc::new(Executor::builder(store.clone(), store.log()).build());
    for i in 0..50 {
        let key = format!("block:m{i}");
        let a = tokio::spawn({
            let (executor, key) = (Arc::clone(&executor), key.clone());
            async move { executor.run(key, block("c1")).await }
        });
        let b = tokio::spawn({
            let executor = Arc::clone(&executor);
            async move { executor.run(key, block("c1")).await }
        });
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert_eq!(a.tx(), b.tx());
        assert_eq!(
            [a.is_duplicate(), b.is_duplicate()]
                .iter()
                .filter(|d| **d)
                .count(),
            1,
            "{a:?} {b:?}"
        );
    }
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM transactions"), 50);
    assert_eq!(sql_i64(&db, "SELECT COUNT(*) FROM log_messages"), 50);
}

#[tokio::test]
async fn invalid_effects_are_refused_before_any_write() {
    let dir = temp_dir("invalid");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let limits = Limits {
        max_datoms: 2,
        max_requests: 1,
        max_messages: 2,
        max_payload_bytes: 64,
        max_key_bytes: 16,
        max_name_bytes: 12,
        max_header_value_bytes: 8,
        max_run_bytes: 100,
    };
    let executor = Executor::builder(store.clone(), store.log())
        .limits(limits)
        .build();
    let big = MessageEffect::new("t", json!({"blob": "x".repeat(100)}));
    let conflicting = Effects::from(DatomEffect::assert(
        card("c1"),
        [("card/status", json!("a"))],
    ))
    .merge(DatomEffect::assert(
        card("c1"),
        [("card/status", json!("b"))],
    ));
    let three_messages: Effects = (0..3).map(|i| MessageEffect::new("t", json!(i))).collect();
    let cases: Vec<(&str, Effects, &str)> = vec![
        ("", block("c1"), "the idempotency key is empty"),
        (
            "k".repeat(17).leak(),
            block("c1"),
            "17 bytes long; the limit is 16",
        ),
        ("bad\nkey", block("c1"), "control character at byte 3"),
        (
            "k1",
            Effects::from(big),
            "messages[0] is 111 bytes of JSON; the limit is 64",
        ),
        ("k2", three_messages, "3 messages exceed the limit of 2"),
        ("k3", conflicting, "conflicting datoms on [card/id \"c1\"]"),
        ("k4", Effects::from(notify_request("c1")), "no HTTP client"),
        (
            "k6",
            Effects::from(MessageEffect::new("t".repeat(13), json!(1))),
            "messages[0] topic is 13 bytes long; the limit is 12 (Limits::max_name_bytes)",
        ),
        (
            "k7",
            Effects::from(MessageEffect::new("t", json!(1)).with_key("p".repeat(17))),
            "messages[0] partition key is 17 bytes long; the limit is 16 (Limits::max_key_bytes)",
        ),
        (
            "k8",
            Effects::from(MessageEffect::new("t", json!(1)).with_header("h", "v".repeat(9))),
            "messages[0] header `h` is 9 bytes long; the limit is 8 (Limits::max_header_value_bytes)",
        ),
        (
            "k9",
            Effects::from(DatomEffect::assert(
                card("c1"),
                [("card/".to_owned() + &"s".repeat(8), json!(1))],
            )),
            "datoms[0] attribute `card/ssssssss…` is 13 bytes long; the limit is 12",
        ),
        (
            "k10",
            Effects::from(DatomEffect::assert(
                LookupRef::new("card/identity", "c1"),
                [("card/s", json!(1))],
            )),
            "datoms[0] identity attribute is 13 bytes long",
        ),
        (
            "k11",
            (0..2)
                .map(|i| MessageEffect::new("t", json!({ "blob": "x".repeat(40), "i": i })))
                .collect(),
            "the run is 116 bytes of values, payloads, requests and headers; the limit is 100",
        ),
    ];
    for (key, effects, expected) in cases {
        let err = executor.run(key, effects).await.unwrap_err();
        assert!(matches!(err, RunError::Invalid { .. }), "{err:?}");
        assert!(
            err.to_string().contains(expected),
            "`{err}` should say `{expected}`"
        );
    }
    let err = executor
        .run_with("k5", block("c1"), RunOptions::after_requests("nope"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("`nope` is not registered"),
        "{err}"
    );
    for table in [
        "transactions",
        "effect_runs",
        "entities",
        "outbox",
        "log_messages",
    ] {
        assert_eq!(
            sql_i64(&db, &format!("SELECT COUNT(*) FROM {table}")),
            0,
            "{table}"
        );
    }
}

#[tokio::test]
async fn migrations_are_recorded_and_checked() {
    let dir = temp_dir("migrations");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    assert_eq!(
        store.schema_versions().await.unwrap(),
        [
            (1, "0001_store.sql".to_owned()),
            (2, "0002_log.sql".to_owned()),
            (3, "0003_fencing.sql".to_owned())
        ]
    );
    drop(store);
    let mode: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // Reopening applies nothing twice.
    let store = SqliteStore::open(&db).unwrap();
    assert_eq!(store.schema_versions().await.unwrap().len(), 3);
    drop(store);

    // A migration edited after it was applied is refused.
    sql_exec(
        &db,
        "UPDATE schema_version SET sha256 = 'x' WHERE version = 2",
    );
    let err = SqliteStore::open(&db).unwrap_err();
    assert!(
        err.to_string().contains("was changed after it was applied"),
        "{err}"
    );
    sql_exec(&db, "DELETE FROM schema_version WHERE version = 2");
    // Re-applying 0002 on tables that exist fails inside its transaction: nothing half-done.
    let err = SqliteStore::open(&db).unwrap_err();
    assert!(err.to_string().contains("migration 2"), "{err}");

    // A database from a newer version of the library is refused.
    let db2 = dir.join("newer.db");
    drop(SqliteStore::open(&db2).unwrap());
    sql_exec(
        &db2,
        "INSERT INTO schema_version (version, name, sha256, applied_at_ms) VALUES (99, '0099_future.sql', '', 0)",
    );
    let err = SqliteStore::open(&db2).unwrap_err();
    assert!(
        err.to_string().contains("migrated by a newer version"),
        "{err}"
    );
}

/// A store opened on a file it cannot write is refused at once with a clear reason, instead of
/// failing later in the middle of a run.
#[tokio::test]
async fn a_read_only_database_file_is_refused_at_open() {
    let dir = temp_dir("read-only");
    let db = dir.join("store.db");
    drop(SqliteStore::open(&db).unwrap());
    // Root ignores file modes: make the file immutable instead (and undo it whatever happens).
    struct Immutable(std::path::PathBuf);
    impl Drop for Immutable {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&self.0)
                .status();
            let _ = std::fs::set_permissions(
                &self.0,
                std::os::unix::fs::PermissionsExt::from_mode(0o644),
            );
        }
    }
    let _guard = Immutable(db.clone());
    std::fs::set_permissions(&db, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    let _ = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&db)
        .status();
    let err = SqliteStore::open(&db).unwrap_err();
    assert!(
        err.to_string().contains("read-only"),
        "the error says why: {err}"
    );
}

/// Once the last handle of a store is dropped, the database file alone holds every committed
/// run: the write-ahead log was checkpointed into it.
#[tokio::test]
async fn closing_the_store_leaves_a_complete_database_file() {
    let dir = temp_dir("close");
    let db = dir.join("store.db");
    let store = SqliteStore::open(&db).unwrap();
    let executor = Executor::builder(store.clone(), store.log()).build();
    for i in 0..20 {
        executor
            .run(format!("k{i}"), block(&format!("c{i}")))
            .await
            .unwrap();
    }
    drop(executor);
    drop(store);
    let wal = dir.join("store.db-wal");
    assert!(
        std::fs::metadata(&wal).map_or(true, |m| m.len() == 0),
        "the -wal file is gone or empty"
    );
    // Only the main file, copied elsewhere, opened on its own.
    let copy = temp_dir("close-copy").join("copy.db");
    std::fs::copy(&db, &copy).unwrap();
    assert_eq!(sql_i64(&copy, "SELECT COUNT(*) FROM transactions"), 20);
    assert_eq!(sql_i64(&copy, "SELECT COUNT(*) FROM log_messages"), 20);
}
