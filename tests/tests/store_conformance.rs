//! The store conformance suite: every case is written once, generic over the [`Store`], and runs
//! unchanged against the SQLite store (always) and the PostgreSQL store (feature `postgres`,
//! which `cargo test --workspace --all-features` enables; each case in a database of its own).
//! The transport is the SQLite log in a file of its own — an external broker for both stores —
//! and HTTP goes to a real server on loopback.
//!
//! Every figure is counted at the source: transactions per key in the store's `transactions`
//! table (one row per committed run, never deduplicated), handler calls, HTTP attempts at the
//! server, dispatch attempts on the outbox rows. Each reliability check that an executor mutant
//! ([`Mutant`]) can break runs once more against that mutant, to show it fails without the
//! guarantee.

mod backends;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backends::Backend;
use effects_core::executor::{
    Backoff, BatchItem, Executor, FaultPoint, Limits, Mutant, NoHttp, RelayReport, RunError,
    RunOptions, RunOutcome, ValidationError,
};
use effects_core::relay::{Relay, RelayConfig, Retention};
use effects_core::store::{
    ClaimOptions, Conflict, Entity, Inspect, Lease, OutboxKind, PruneOlderThan, ReadVersion,
    Reaped, RequestOutcome, RunStatus, Store, StoreError, Tracked, Tx,
};
use effects_core::transport::{HEADER_KEY, HEADER_TX, OutgoingMessage, SqliteLog, Transport};
use effects_core::worker::{LoadError, LoadWith, Processed, Worker, WorkerConfig, WorkerReport};
use effects_core::{
    Datom, DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, MessageEffect, Method,
    RequestEffect,
};
use effects_tests::harness::process::ChildProcess;
use serde::Deserialize;
use serde_json::json;
use support::{eventually, http_client};
use tokio::sync::oneshot;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

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
    applied_writes_datoms_and_the_outbox_and_dispatches_after_the_commit,
    duplicate_applies_nothing_and_reports_the_original_tx,
    mutant_without_the_duplicate_check_applies_a_key_twice,
    duplicate_dispatches_only_the_original_runs_pending_rows,
    key_reuse_with_other_effects_is_refused_and_applies_nothing,
    a_database_error_applies_nothing_and_dispatches_nothing,
    a_failing_statement_is_reported_as_the_cause_wherever_it_fails,
    entities_read_now_and_as_of_any_tx,
    messages_keep_their_order_per_partition_key_across_runs,
    requests_carry_the_key_are_recorded_and_feed_after_requests,
    a_rejected_request_is_dead_lettered_and_never_retried,
    a_failing_request_is_retried_later_with_the_same_key_and_holds_the_messages,
    a_request_that_always_fails_is_given_up_on_by_default_and_releases_its_messages,
    the_relay_finishes_what_a_crashed_run_left_once_the_lease_expires,
    two_relays_never_send_one_row_twice,
    leases_fence_a_claimant_that_lost_its_rows,
    marking_several_rows_fences_each_and_completes_their_runs,
    a_claimant_that_works_past_its_lease_renews_it_and_nothing_is_sent_twice,
    mutant_without_renewal_sends_requests_twice,
    pruning_removes_only_old_finished_work,
    a_batch_commits_once_and_reports_each_run,
    a_batch_with_a_database_error_writes_nothing,
    a_batch_gives_what_its_runs_give_one_by_one,
    concurrent_batches_on_shared_entities_number_their_runs_densely,
    one_key_from_two_tasks_applies_exactly_once,
    mutant_without_the_duplicate_check_applies_one_key_from_two_tasks_twice,
    invalid_effects_are_refused_before_any_write,
    the_transfer_race_loses_no_update,
    mutant_without_read_validation_loses_updates,
    increments_of_an_entity_that_does_not_exist_yet_lose_nothing,
    mutant_without_read_validation_loses_increments,
    a_business_key_resent_under_a_new_message_id_is_applied_once,
    mutant_without_the_duplicate_check_applies_a_resent_transfer_twice,
    a_stale_compare_and_set_is_a_conflict_and_writes_nothing,
    mutant_without_read_validation_applies_a_stale_compare_and_set,
    compare_and_set_expectations_that_disagree_are_refused_before_any_write,
    reads_that_still_hold_are_never_a_conflict,
    any_change_to_a_read_entity_is_a_conflict_even_of_another_attribute,
    concurrent_transfers_between_disjoint_accounts_never_conflict,
    redelivery_after_a_rerun_is_still_a_duplicate,
    a_store_error_is_retried_by_the_worker_then_succeeds,
    a_dead_owners_rows_are_taken_over_within_seconds,
    mutant_without_reaping_leaves_a_dead_owners_rows_to_their_lease,
    an_owner_alive_or_paused_is_never_reaped,
    a_stalled_run_of_a_dead_recorder_is_taken_over_at_once,
    an_owner_is_alive_as_long_as_its_store_handle,
);

// ---------------------------------------------------------------------------------------------
// Shared pieces.

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

fn no_wait() -> Backoff {
    Backoff {
        initial: Duration::ZERO,
        max: Duration::ZERO,
        max_attempts: None,
    }
}

fn crash_after_commit() -> effects_core::executor::FaultHook {
    Arc::new(|point, _| {
        if point == FaultPoint::AfterCommit {
            panic!("crash after commit");
        }
    })
}

/// Makes the broker refuse messages whose id satisfies `condition` (SQL on `NEW.message_id`).
fn broker_refuses<B: Backend>(b: &B, condition: &str) {
    support::sql_exec(
        &b.broker_path(),
        &format!(
            "CREATE TRIGGER down BEFORE INSERT ON log_messages WHEN {condition} \
             BEGIN SELECT RAISE(ABORT, 'broker down'); END;"
        ),
    );
}

fn broker_heals<B: Backend>(b: &B) {
    support::sql_exec(&b.broker_path(), "DROP TRIGGER down;");
}

async fn pending_rows<B: Backend>(b: &B) -> i64 {
    b.count(
        "SELECT COUNT(*) FROM outbox WHERE dispatched_at_ms IS NULL \
         AND dead_lettered_reason IS NULL",
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Outcomes.

async fn applied_writes_datoms_and_the_outbox_and_dispatches_after_the_commit<B: Backend>(b: B) {
    let store = b.open().await;
    let broker = b.broker();
    let executor = Executor::builder(store.clone(), broker.clone()).build();
    assert!(
        !executor.publishes_inline(),
        "the broker is not in the store"
    );

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
    assert!(run.completed_at.is_some());

    let rows = store.outbox("block:m1").await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id, "block:m1#0");
    assert_eq!(rows[0].kind, OutboxKind::Message);
    assert_eq!(rows[0].attempts, 1);
    assert!(rows[0].dispatched_at.is_some());
    assert_eq!(rows[0].lease, None, "a dispatched row keeps no lease");

    let published = broker.messages("card-status-changed").await.unwrap();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].message_id, "block:m1#0");
    assert_eq!(published[0].partition_key.as_deref(), Some("c1"));
    assert_eq!(published[0].headers[HEADER_KEY], "block:m1");
    assert_eq!(published[0].headers[HEADER_TX], tx.to_string());
    let payload: serde_json::Value = serde_json::from_slice(&published[0].payload).unwrap();
    assert_eq!(payload, json!({"card_id": "c1", "status": "blocked"}));

    assert_eq!(b.count("SELECT COUNT(*) FROM transactions").await, 1);
    assert_eq!(b.count("SELECT COUNT(*) FROM datoms").await, 1);
    assert_eq!(store.latest_tx().await.unwrap(), Some(tx));
}

/// Runs one key twice; returns the outcomes and the transactions committed.
async fn run_twice<B: Backend>(
    b: &B,
    mutant: Option<Mutant>,
) -> (RunOutcome, RunOutcome, BTreeMap<String, i64>, usize) {
    let store = b.open().await;
    let broker = b.broker();
    let mut builder = Executor::builder(store.clone(), broker.clone());
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let executor = builder.build();
    let first = executor.run("block:m1", block("c1")).await.unwrap();
    let second = executor.run("block:m1", block("c1")).await.unwrap();
    let published = broker.messages("card-status-changed").await.unwrap().len();
    (first, second, b.transactions_per_key().await, published)
}

async fn duplicate_applies_nothing_and_reports_the_original_tx<B: Backend>(b: B) {
    let (first, second, transactions, published) = run_twice(&b, None).await;
    assert_eq!(
        second,
        RunOutcome::Duplicate {
            original_tx: first.tx(),
            progress: Default::default()
        }
    );
    assert_eq!(transactions.values().sum::<i64>(), 1, "{transactions:?}");
    assert_eq!(transactions.get("block:m1"), Some(&1));
    assert_eq!(b.count("SELECT COUNT(*) FROM datoms").await, 1);
    assert_eq!(b.count("SELECT COUNT(*) FROM outbox").await, 1);
    assert_eq!(published, 1);
}

/// Without the duplicate check the second run commits again: the check above can fail.
async fn mutant_without_the_duplicate_check_applies_a_key_twice<B: Backend>(b: B) {
    let (_, second, transactions, _) = run_twice(&b, Some(Mutant::SkipDuplicateCheck)).await;
    assert!(matches!(second, RunOutcome::Applied { .. }), "{second:?}");
    assert_eq!(transactions.values().sum::<i64>(), 2, "{transactions:?}");
}

async fn duplicate_dispatches_only_the_original_runs_pending_rows<B: Backend>(b: B) {
    let store = b.open().await;
    let broker = b.broker();
    // Publishing fails while the trigger is there: the messages stay pending.
    broker_refuses(&b, "TRUE");
    let executor = Executor::builder(store.clone(), broker.clone())
        .retry(no_wait())
        .build();

    let original = block("c1").merge(MessageEffect::new("audit", json!({"n": 1})));
    let first = executor.run("block:m1", original.clone()).await.unwrap();
    let RunOutcome::Applied { progress, .. } = first else {
        panic!("{first:?}")
    };
    assert_eq!(progress.messages_dispatched, 0);
    assert_eq!(progress.pending, 2);
    let row = &store.outbox("block:m1").await.unwrap()[0];
    assert!(
        row.last_error
            .as_deref()
            .unwrap_or("")
            .contains("broker down"),
        "{row:?}"
    );

    broker_heals(&b);
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
    assert_eq!(b.count("SELECT COUNT(*) FROM transactions").await, 1);
}

async fn key_reuse_with_other_effects_is_refused_and_applies_nothing<B: Backend>(b: B) {
    let store = b.open().await;
    let broker = b.broker();
    let executor = Executor::builder(store.clone(), broker.clone()).build();

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
    assert_eq!(b.count("SELECT COUNT(*) FROM transactions").await, 1);
    assert_eq!(
        broker.messages("card-status-changed").await.unwrap().len(),
        1
    );
}

async fn a_database_error_applies_nothing_and_dispatches_nothing<B: Backend>(b: B) {
    let store = b.open().await;
    let broker = b.broker();
    let executor = Executor::builder(store.clone(), broker.clone()).build();

    // A real database failure in the middle of the run's transaction: after the key claim and
    // the datoms, when the outbox row is written.
    b.fail_inserts("outbox", "TRUE", "disk on fire").await;
    let err = executor.run("block:m1", block("c1")).await.unwrap_err();
    assert!(matches!(err, RunError::Store { .. }), "{err:?}");
    assert!(err.to_string().contains("disk on fire"), "{err}");
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
            "{table} must be empty after a failed commit"
        );
    }
    assert!(
        broker
            .messages("card-status-changed")
            .await
            .unwrap()
            .is_empty()
    );

    // Once the database works, the same key applies normally.
    b.heal("outbox").await;
    let outcome = executor.run("block:m1", block("c1")).await.unwrap();
    assert!(matches!(outcome, RunOutcome::Applied { .. }));
    assert_eq!(
        broker.messages("card-status-changed").await.unwrap().len(),
        1
    );
}

/// A store that sends a transaction's statements together (PostgreSQL pipelines them) sees
/// every statement after the failing one fail as well, for the aborted transaction; the error
/// reported must be the cause, whichever answer is looked at first. Each place a run writes
/// fails in turn, on its own and in a batch, many times over (the order the answers are looked
/// at varies from one attempt to the next).
async fn a_failing_statement_is_reported_as_the_cause_wherever_it_fails<B: Backend>(b: B) {
    const ATTEMPTS: usize = 15;
    let store = b.open().await;
    let executor = Executor::builder(store.clone(), b.broker()).build();
    // Many statements around each failing one: datoms of four entities, three messages.
    let effects = |n: usize| {
        (0..4)
            .map(|i| {
                Effects::from(DatomEffect::assert(
                    card(&format!("c{n}-{i}")),
                    [("card/status", json!("blocked"))],
                ))
            })
            .chain((0..3).map(|i| {
                Effects::from(MessageEffect::new(
                    "card-status-changed",
                    json!({"n": n, "i": i}),
                ))
            }))
            .fold(Effects::default(), Effects::merge)
    };
    let mut wrong = Vec::new();
    let mut attempts = 0;
    for table in ["transactions", "datoms", "outbox"] {
        let cause = format!("no room in {table}");
        b.fail_inserts(table, "TRUE", &cause).await;
        for n in 0..ATTEMPTS {
            let single = executor.run(format!("one:{n}"), effects(n)).await;
            let batch = executor
                .run_batch(vec![
                    BatchItem::new(format!("a:{n}"), effects(n)),
                    BatchItem::new(format!("b:{n}"), effects(n + ATTEMPTS)),
                ])
                .await;
            for error in [
                single.map(|_| ()).map_err(|e| e.to_string()),
                batch.map(|_| ()).map_err(|e| e.to_string()),
            ] {
                attempts += 1;
                match error {
                    Err(e) if e.contains(&cause) => {}
                    other => wrong.push(format!("{table}: {other:?}")),
                }
            }
        }
        b.heal(table).await;
    }
    assert_eq!(attempts, 3 * 2 * ATTEMPTS);
    assert!(
        wrong.is_empty(),
        "{} of {attempts} failed commits did not report their cause: {wrong:#?}",
        wrong.len()
    );
    assert_eq!(b.count("SELECT COUNT(*) FROM transactions").await, 0);
}

async fn entities_read_now_and_as_of_any_tx<B: Backend>(b: B) {
    let store = b.open().await;
    let executor = Executor::builder(store.clone(), b.broker()).build();
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
    // Retracting a value the entity does not hold, or from an entity that does not exist,
    // changes nothing and creates nothing.
    executor
        .run(
            "k5",
            Effects::from(DatomEffect::retract(
                card("ghost"),
                [("card/limit", json!(1))],
            )),
        )
        .await
        .unwrap();
    assert_eq!(store.entity(&card("ghost"), None).await.unwrap(), None);
    // The history: one assertion per new value, a retraction before each replaced one.
    assert_eq!(
        b.count("SELECT COUNT(*) FROM datoms WHERE added").await
            + b.count("SELECT COUNT(*) FROM datoms WHERE NOT added").await,
        5,
        "active, 100, (retract active, blocked), retract 100"
    );
}

async fn messages_keep_their_order_per_partition_key_across_runs<B: Backend>(b: B) {
    let store = b.open().await;
    let broker = b.broker();
    let executor = Arc::new(
        Executor::builder(store.clone(), broker.clone())
            .retry(no_wait())
            .build(),
    );
    let msg = |key: &str, n: u32| {
        MessageEffect::new("events", json!({"key": key, "n": n})).with_key(key.to_owned())
    };

    // The broker refuses a's first message: it stays pending and blocks the rest of
    // partition `a` — but not partition `b`.
    broker_refuses(&b, "NEW.message_id = 'r1#0'");
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

    broker_heals(&b);
    relay.tick().await.unwrap();
    let all = order(broker.messages("events").await.unwrap());
    let a: Vec<u64> = all
        .iter()
        .filter(|(k, _)| k == "a")
        .map(|(_, n)| *n)
        .collect();
    let b_: Vec<u64> = all
        .iter()
        .filter(|(k, _)| k == "b")
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(a, [1, 2]);
    assert_eq!(b_, [1, 2]);
    for key in ["r1", "r2"] {
        assert_eq!(
            store.run(key).await.unwrap().unwrap().status,
            RunStatus::Done
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Requests.

async fn requests_carry_the_key_are_recorded_and_feed_after_requests<B: Backend>(b: B) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/notify/c1"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"ticket": 42})))
        .mount(&server)
        .await;
    let store = b.open().await;
    let broker = b.broker();
    let executor = Executor::builder(store.clone(), broker.clone())
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

    let rows = store.outbox("block:m1").await.unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["block:m1#0", "block:m1#1", "block:m1#2"]);
    let tickets = broker.messages("tickets").await.unwrap();
    assert_eq!(tickets.len(), 1);
    assert_eq!(tickets[0].message_id, "block:m1#2");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&tickets[0].payload).unwrap(),
        json!({"ticket": 42})
    );
    // The run's own message went out after the request was recorded, not at commit.
    let responded = rows[0].dispatched_at.unwrap();
    assert!(rows[1].dispatched_at.unwrap() >= responded);
    assert_eq!(
        store.run("block:m1").await.unwrap().unwrap().status,
        RunStatus::Done
    );
}

async fn a_rejected_request_is_dead_lettered_and_never_retried<B: Backend>(b: B) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({"error": "no such card"})))
        .mount(&server)
        .await;
    let store = b.open().await;
    let seen = Arc::new(AtomicUsize::new(0));
    let seen_in_hook = Arc::clone(&seen);
    let executor = Arc::new(
        Executor::builder(store.clone(), b.broker())
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

async fn a_failing_request_is_retried_later_with_the_same_key_and_holds_the_messages<B: Backend>(
    b: B,
) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let store = b.open().await;
    let broker = b.broker();
    let executor = Arc::new(
        Executor::builder(store.clone(), broker.clone())
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
        broker
            .messages("card-status-changed")
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
    assert!(row.lease.is_none(), "a row to retry is not leased");

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
    for _ in 0..200 {
        sent += relay.tick().await.unwrap().progress.requests_sent;
        if sent > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sent, 1);
    assert_eq!(
        broker.messages("card-status-changed").await.unwrap().len(),
        1
    );
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
async fn a_request_that_always_fails_is_given_up_on_by_default_and_releases_its_messages<
    B: Backend,
>(
    b: B,
) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&server)
        .await;
    let store = b.open().await;
    let log = b.broker();
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

// ---------------------------------------------------------------------------------------------
// Crashes, relays and leases.

async fn the_relay_finishes_what_a_crashed_run_left_once_the_lease_expires<B: Backend>(b: B) {
    let store = b.open().await;
    let broker = b.broker();
    // The "crash": the process dies right after the commit (a panic here, a SIGKILL in the
    // reliability tests).
    let crashing = Arc::new(
        Executor::builder(store.clone(), broker.clone())
            .owner("worker-a")
            // Long enough that a loaded machine still ticks the relay within it.
            .lease(Duration::from_secs(2))
            .fault_hook(crash_after_commit())
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
    let store2 = b.open().await;
    let c = Arc::new(
        Executor::builder(store2.clone(), broker.clone())
            .owner("worker-c")
            .lease(Duration::from_secs(3600))
            .fault_hook(crash_after_commit())
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

async fn two_relays_never_send_one_row_twice<B: Backend>(b: B) {
    const RUNS: usize = 60;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let store = b.open().await;
    let broker = b.broker();
    // A process that dies right after each commit leaves every request and message pending
    // under its short lease.
    let dying = Arc::new(
        Executor::builder(store.clone(), broker.clone())
            .http(http_client(&server.uri(), 1))
            .owner("dead")
            .lease(Duration::from_millis(200))
            .fault_hook(crash_after_commit())
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

    // Two relays, each with its own connections, as two processes.
    let relay = |store: B::Store, owner: &'static str| {
        Relay::new(Arc::new(
            Executor::builder(store, broker.clone())
                .http(http_client(&server.uri(), 1))
                .owner(owner)
                .build(),
        ))
        .with_config(RelayConfig {
            batch: 7,
            ..RelayConfig::default()
        })
    };
    let (a, bb) = (
        relay(b.open().await, "relay-a"),
        relay(b.open().await, "relay-b"),
    );
    async fn drain<S: Store + Clone, C: effects_core::http::HttpClient + 'static>(
        relay: Relay<S, SqliteLog, C>,
    ) -> RelayReport {
        let mut report = RelayReport::default();
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
    }
    let (ra, rb) = tokio::join!(tokio::spawn(drain(a)), tokio::spawn(drain(bb)));
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
    assert_eq!(
        broker.messages("card-status-changed").await.unwrap().len(),
        RUNS
    );
    // One attempt by the dead process (claimed at commit), one by a relay: never two.
    assert_eq!(
        b.count("SELECT COUNT(*) FROM outbox WHERE kind = 'request' AND attempts <> 2")
            .await,
        0
    );
    assert_eq!(
        b.count("SELECT COUNT(*) FROM outbox WHERE kind = 'message' AND attempts <> 1")
            .await,
        0,
        "messages were never claimed by the dead process (they waited for the requests)"
    );
    assert_eq!(
        b.count("SELECT COUNT(*) FROM effect_runs WHERE status <> 'done'")
            .await,
        0
    );
}

fn claim_options(owner: &str, lease: Duration) -> ClaimOptions {
    ClaimOptions {
        owner: owner.to_owned(),
        lease,
        publish_inline: false,
        before_commit: None,
    }
}

/// `mark_dispatched_many` (how the executor marks the messages of a batch): each row is marked
/// only under the lease that holds it, the answer says which were, and a run is done once its
/// last row is marked, in the same call or a later one.
async fn marking_several_rows_fences_each_and_completes_their_runs<B: Backend>(b: B) {
    let store = b.open().await;
    let executor = Executor::builder(store.clone(), b.broker())
        .owner("committer")
        .fault_hook(crash_after_commit())
        .build();
    let executor = Arc::new(executor);
    let messages = |key: &str, n: usize| -> Effects {
        (0..n)
            .map(|i| MessageEffect::new("marked", json!({"key": key, "i": i})).with_key(key))
            .collect()
    };
    for (key, n) in [("two", 2), ("one", 1)] {
        let executor = Arc::clone(&executor);
        let effects = messages(key, n);
        let crashed = tokio::spawn(async move { executor.run(key, effects).await }).await;
        assert!(crashed.unwrap_err().is_panic(), "crashed after the commit");
    }
    let lease_of = async |key: &str, seq: usize| -> Lease {
        store.outbox(key).await.unwrap()[seq]
            .lease
            .clone()
            .expect("claimed at commit")
    };
    let (two0, two1, one0) = (
        lease_of("two", 0).await,
        lease_of("two", 1).await,
        lease_of("one", 0).await,
    );
    let impostor = Lease {
        owner: "impostor".into(),
        token: two1.token,
    };
    let marked = store
        .mark_dispatched_many(vec![
            ("two#0".into(), two0.clone()),
            ("two#1".into(), impostor),
            ("one#0".into(), one0),
        ])
        .await
        .unwrap();
    assert_eq!(marked, [true, false, true]);
    assert_eq!(
        store.run("one").await.unwrap().unwrap().status,
        RunStatus::Done
    );
    let two = store.run("two").await.unwrap().unwrap();
    assert_eq!(two.status, RunStatus::MessagesPending, "one row is left");
    let rows = store.outbox("two").await.unwrap();
    assert!(!rows[0].is_pending() && rows[1].is_pending(), "{rows:?}");

    // Marked already: refused; the rightful holder: marked, and the run is done.
    let marked = store
        .mark_dispatched_many(vec![("two#0".into(), two0), ("two#1".into(), two1)])
        .await
        .unwrap();
    assert_eq!(marked, [false, true]);
    assert_eq!(
        store.run("two").await.unwrap().unwrap().status,
        RunStatus::Done
    );
    assert!(
        store
            .mark_dispatched_many(Vec::new())
            .await
            .unwrap()
            .is_empty()
    );
}

/// The store's fencing on its own: once a lease expired and another claimant took the rows, the
/// first holder's token is refused by every call that writes for it, and the new holder's is not.
async fn leases_fence_a_claimant_that_lost_its_rows<B: Backend>(b: B) {
    let server = MockServer::start().await;
    let store = b.open().await;
    let executor = Executor::builder(store.clone(), b.broker())
        .http(http_client(&server.uri(), 1))
        .owner("committer")
        // Long enough that the early claim below comes inside it on a loaded machine.
        .lease(Duration::from_secs(3))
        .fault_hook(crash_after_commit())
        .build();
    let effects: Effects = (0..3)
        .map(|i| RequestEffect::new(Method::Post, "notify", format!("/n/{i}")))
        .collect();
    let executor = Arc::new(executor);
    let crashed = {
        let executor = Arc::clone(&executor);
        tokio::spawn(async move { executor.run("fenced", effects).await }).await
    };
    assert!(crashed.unwrap_err().is_panic());
    let first = store.outbox("fenced").await.unwrap();
    let old = first[0].lease.clone().expect("claimed at commit");
    assert_eq!(old.owner, "committer");
    assert!(
        first.iter().all(|r| r.lease.as_ref() == Some(&old)),
        "one claim, one token: {first:?}"
    );

    // While the lease holds nobody else gets the rows.
    let early = store
        .claim_due(10, claim_options("thief", Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(early.rows.is_empty(), "{early:?}");
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    // Expired: another claimant takes them, in order, under a new and higher token.
    let taken = store
        .claim_due(10, claim_options("taker", Duration::from_secs(30)))
        .await
        .unwrap();
    let ids: Vec<&str> = taken.rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["fenced#0", "fenced#1", "fenced#2"]);
    let new = taken.rows[0].lease.clone().unwrap();
    assert!(new.token > old.token, "{new:?} after {old:?}");
    assert!(
        taken
            .rows
            .iter()
            .all(|r| r.attempts == 2 && r.lease.as_ref() == Some(&new))
    );
    let id = "fenced#0".to_owned();

    // The old holder is refused everywhere, and nothing changes.
    let response = RequestOutcome::Failed {
        reason: "late".into(),
    };
    assert!(
        !store
            .record_request(&id, response.clone(), &old)
            .await
            .unwrap()
    );
    assert!(!store.mark_dispatched(&id, &old).await.unwrap());
    assert!(
        !store
            .retry_later(&id, &old, "late", Duration::ZERO)
            .await
            .unwrap()
    );
    assert!(!store.dead_letter(&id, "late", Some(&old)).await.unwrap());
    assert!(
        store
            .renew(vec![id.clone()], &old, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    // Same token, another owner: refused too.
    let impostor = Lease {
        owner: "impostor".into(),
        token: new.token,
    };
    assert!(!store.mark_dispatched(&id, &impostor).await.unwrap());
    // An operator cannot dead-letter a row someone holds.
    assert!(!store.dead_letter(&id, "operator", None).await.unwrap());
    assert!(store.recorded_requests("fenced").await.unwrap().is_empty());
    let row = &store.outbox("fenced").await.unwrap()[0];
    assert!(row.is_pending());
    assert_eq!(row.lease.as_ref(), Some(&new));

    // The new holder renews what it holds, and records.
    let renewed = store
        .renew(
            vec![id.clone(), "fenced#1".into(), "nope#9".into()],
            &new,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(renewed, [id.clone(), "fenced#1".to_owned()]);
    let failed = RequestOutcome::Failed {
        reason: "gave up".into(),
    };
    assert!(store.record_request(&id, failed, &new).await.unwrap());
    let row = &store.outbox("fenced").await.unwrap()[0];
    assert_eq!(row.dead_lettered.as_deref(), Some("gave up"));
    assert_eq!(row.lease, None);
    assert_eq!(store.recorded_requests("fenced").await.unwrap().len(), 1);
    // Released unattempted, a row's attempt is not counted; then an operator may dead-letter
    // it, once.
    assert_eq!(
        store
            .release(vec!["fenced#1".into()], "taker")
            .await
            .unwrap(),
        1
    );
    let row = &store.outbox("fenced").await.unwrap()[1];
    assert_eq!((row.attempts, row.lease.as_ref()), (1, None));
    assert!(
        store
            .dead_letter("fenced#1", "operator", None)
            .await
            .unwrap()
    );
    assert!(
        !store
            .dead_letter("fenced#1", "operator again", None)
            .await
            .unwrap(),
        "already dead-lettered"
    );
    // The last request is still held: the run stays open.
    assert!(
        !store
            .dead_letter("fenced#2", "operator", None)
            .await
            .unwrap()
    );
    assert_eq!(
        store.run("fenced").await.unwrap().unwrap().status,
        RunStatus::RequestsPending
    );
    // Every lease `taker` holds, released at once (a restarted process).
    assert_eq!(store.release(Vec::new(), "taker").await.unwrap(), 1);
    assert_eq!(store.outbox("fenced").await.unwrap()[2].lease, None);
}

const SLOW_REQUESTS: usize = 5;

/// One run of five slow requests (150 ms each) on an executor whose lease is 400 ms, while a
/// second executor (another owner, its own connections) keeps claiming due rows. Returns the
/// HTTP attempts per path and the recorded responses.
async fn slow_run_beside_a_relay<B: Backend>(
    b: &B,
    mutant: Option<Mutant>,
) -> (BTreeMap<String, usize>, i64) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(150)))
        .mount(&server)
        .await;
    let broker = b.broker();
    let mut builder = Executor::builder(b.open().await, broker.clone())
        .http(http_client(&server.uri(), 1))
        .owner("slow")
        .lease(Duration::from_millis(400));
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let slow = Arc::new(builder.build());
    let other = Arc::new(
        Executor::builder(b.open().await, broker.clone())
            .http(http_client(&server.uri(), 1))
            .owner("other")
            .lease(Duration::from_secs(30))
            .build(),
    );
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let relay = tokio::spawn({
        let other = Arc::clone(&other);
        async move {
            for _ in 0..1_000 {
                if *stopped.borrow_and_update() {
                    break;
                }
                other.dispatch_due(100).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    let effects: Effects = (0..SLOW_REQUESTS)
        .map(|i| RequestEffect::new(Method::Post, "notify", format!("/notify/{i}")))
        .collect();
    let _ = tokio::time::timeout(Duration::from_secs(20), slow.run("slow-run", effects))
        .await
        .expect("the run ends");
    // Let the other executor finish whatever it took over.
    eventually(
        "every request resolved",
        Duration::from_secs(20),
        || async { pending_rows(b).await == 0 },
    )
    .await;
    let _ = stop.send(true);
    relay.await.unwrap();

    let mut attempts: BTreeMap<String, usize> = BTreeMap::new();
    for r in server.received_requests().await.unwrap() {
        *attempts.entry(r.url.path().to_owned()).or_default() += 1;
    }
    let recorded = b.count("SELECT COUNT(*) FROM effect_run_responses").await;
    (attempts, recorded)
}

async fn a_claimant_that_works_past_its_lease_renews_it_and_nothing_is_sent_twice<B: Backend>(
    b: B,
) {
    let (attempts, recorded) = slow_run_beside_a_relay(&b, None).await;
    println!(
        "FIGURE lease_renewal store={} attempts={attempts:?} recorded={recorded}",
        B::NAME
    );
    assert_eq!(
        attempts.len(),
        SLOW_REQUESTS,
        "every request sent: {attempts:?}"
    );
    assert!(
        attempts.values().all(|n| *n == 1),
        "each request sent once: {attempts:?}"
    );
    assert_eq!(recorded, SLOW_REQUESTS as i64);
}

/// Without renewal the other executor takes the rows over and sends some again, and the first
/// claimant's late records are refused: the check above can fail.
async fn mutant_without_renewal_sends_requests_twice<B: Backend>(b: B) {
    let (attempts, recorded) = slow_run_beside_a_relay(&b, Some(Mutant::NoLeaseRenewal)).await;
    println!(
        "FIGURE lease_renewal_mutant store={} attempts={attempts:?} recorded={recorded}",
        B::NAME
    );
    let total: usize = attempts.values().sum();
    assert!(
        total > SLOW_REQUESTS,
        "a request was sent twice: {attempts:?}"
    );
    // Fencing: one recorded response per request whoever sent it.
    assert_eq!(recorded, SLOW_REQUESTS as i64);
}

// ---------------------------------------------------------------------------------------------
// Pruning and batches.

async fn pruning_removes_only_old_finished_work<B: Backend>(b: B) {
    let store = b.open().await;
    let broker = b.broker();
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
    broker_refuses(&b, "NEW.message_id IN ('stuck#0', 'dead#0')");
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
    assert_eq!(b.count("SELECT COUNT(*) FROM datoms").await, 3);
    // A pruned key can be applied again (retention defines the idempotency window).
    assert!(matches!(
        executor.run("done", block("c1")).await.unwrap(),
        RunOutcome::Applied { .. }
    ));

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

async fn a_batch_commits_once_and_reports_each_run<B: Backend>(b: B) {
    let store = b.open().await;
    let broker = b.broker();
    let executor = Executor::builder(store.clone(), broker.clone()).build();
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
    assert_eq!(b.count("SELECT COUNT(*) FROM transactions").await, 3);
    assert_eq!(
        broker.messages("card-status-changed").await.unwrap().len(),
        3
    );
    assert!(store.entity(&card("c9"), None).await.unwrap().is_none());
}

async fn a_batch_with_a_database_error_writes_nothing<B: Backend>(b: B) {
    let store = b.open().await;
    let broker = b.broker();
    let executor = Executor::builder(store.clone(), broker.clone()).build();
    b.fail_inserts("outbox", "NEW.run_key = 'b2'", "boom").await;
    let err = executor
        .run_batch(vec![
            BatchItem::new("b1", block("c1")),
            BatchItem::new("b2", block("c2")),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err:?}");
    assert!(err.to_string().contains("boom"), "{err}");
    assert_eq!(b.count("SELECT COUNT(*) FROM effect_runs").await, 0);
    assert_eq!(b.count("SELECT COUNT(*) FROM transactions").await, 0);
    assert!(
        broker
            .messages("card-status-changed")
            .await
            .unwrap()
            .is_empty()
    );
}

/// The items of [`a_batch_gives_what_its_runs_give_one_by_one`] in the namespace `ns` (keys
/// `ns:..`, entities `ns-..`), carrying reads of `a` and `r` as they were before.
fn batch_scenario(ns: &str, a: &Entity, r: &Entity) -> Vec<BatchItem> {
    let e = |id: &str| card(&format!("{ns}-{id}"));
    let message = |partition: Option<&str>, n: i64| {
        let m = MessageEffect::new(
            "card-batch",
            json!({"card": format!("{ns}-{}", partition.unwrap_or("none")), "n": n}),
        );
        match partition {
            Some(p) => m.with_key(format!("{ns}-{p}")),
            None => m,
        }
    };
    let item = |key: &str, effects: Effects, reads: Vec<ReadVersion>| BatchItem {
        key: format!("{ns}:{key}"),
        effects,
        options: RunOptions::reading(reads),
    };
    let first = Effects::from(DatomEffect::assert(e("a"), [("card/limit", json!(20))]))
        .merge(DatomEffect::assert(
            e("n1"),
            [("card/status", json!("new"))],
        ))
        .merge(message(Some("a"), 1));
    vec![
        // Changes a and creates n1; a message in a's partition.
        item("k1", first.clone(), vec![]),
        // Read a before the batch; the item before changed it: refused, no tx.
        item(
            "k2",
            DatomEffect::assert(e("a"), [("card/status", json!("blocked"))]).into(),
            vec![ReadVersion::of(a)],
        ),
        // Retracts what k1 asserted; a compare-and-set on b that holds.
        item(
            "k3",
            Effects::from(DatomEffect::retract(e("a"), [("card/limit", json!(20))])).merge(
                DatomEffect::assert(e("b"), [("card/status", json!("blocked"))])
                    .expecting("card/status", json!("active")),
            ),
            vec![],
        ),
        // The key of the refused item, other effects: applied, expecting what k3 wrote.
        item(
            "k2",
            Effects::from(
                DatomEffect::assert(e("b"), [("card/status", json!("closed"))])
                    .expecting("card/status", json!("blocked")),
            )
            .merge(message(Some("a"), 2)),
            vec![],
        ),
        // k1 again: a duplicate of it.
        item("k1", first, vec![]),
        // A compare-and-set that held before the batch, no longer.
        item(
            "k6",
            DatomEffect::assert(e("b"), [("card/status", json!("open"))])
                .expecting("card/status", json!("active"))
                .into(),
            vec![],
        ),
        // Two datoms on n1 (created by k1) in one run; a keyed and an unkeyed message.
        item(
            "k7",
            Effects::from(DatomEffect::assert(e("n1"), [("card/limit", json!(5))]))
                .merge(DatomEffect::retract(
                    e("n1"),
                    [("card/status", json!("new"))],
                ))
                .merge(message(Some("a"), 3))
                .merge(message(None, 4)),
            vec![],
        ),
        // Reads that hold (r unchanged, m missing); creates m.
        item(
            "k8",
            DatomEffect::assert(e("m"), [("card/status", json!("created"))]).into(),
            vec![ReadVersion::of(r), ReadVersion::missing(e("m"))],
        ),
        // m read as missing, created by k8: refused.
        item(
            "k9",
            DatomEffect::assert(e("m"), [("card/limit", json!(1))]).into(),
            vec![ReadVersion::missing(e("m"))],
        ),
        // A retraction on an entity that does not exist changes nothing; a's limit asserted
        // again after its retraction, next to the status it already holds.
        item(
            "k10",
            Effects::from(DatomEffect::retract(
                e("ghost"),
                [("card/status", json!("x"))],
            ))
            .merge(DatomEffect::assert(
                e("a"),
                [("card/limit", json!(30)), ("card/status", json!("active"))],
            )),
            vec![],
        ),
        // A compare-and-set expecting no value on an attribute k7 retracted.
        item(
            "k11",
            DatomEffect::assert(e("n1"), [("card/status", json!("back"))])
                .expecting("card/status", serde_json::Value::Null)
                .into(),
            vec![],
        ),
        // k3 with other effects: a reused key.
        item(
            "k3",
            DatomEffect::assert(e("b"), [("card/status", json!("x"))]).into(),
            vec![],
        ),
    ]
}

/// What a namespace of [`a_batch_gives_what_its_runs_give_one_by_one`] ended with, its `tx`
/// numbers counted from its setup run and its names without the namespace.
#[derive(Debug, PartialEq)]
struct BatchResult {
    outcomes: Vec<String>,
    history: Vec<String>,
    entities: Vec<String>,
    runs: Vec<String>,
    messages: BTreeMap<String, Vec<String>>,
}

async fn batch_result<B: Backend>(
    b: &B,
    store: &B::Store,
    broker: &SqliteLog,
    ns: &str,
    base: Tx,
    outcomes: &[Result<RunOutcome, RunError>],
) -> BatchResult
where
    B::Store: Inspect,
{
    let strip = |text: &str| {
        text.replace(&format!("{ns}-"), "")
            .replace(&format!("{ns}:"), "")
    };
    let at = |tx: Tx| tx.0 - base.0;
    let outcomes = outcomes
        .iter()
        .map(|outcome| match outcome {
            Ok(RunOutcome::Applied { tx, .. }) => format!("applied at {}", at(*tx)),
            Ok(RunOutcome::Duplicate { original_tx, .. }) => {
                format!("duplicate of {}", at(*original_tx))
            }
            Err(RunError::KeyReuse { original_tx, .. }) => {
                format!("key reused, applied at {}", at(*original_tx))
            }
            Err(RunError::Conflict { conflict, .. }) => match &**conflict {
                Conflict::Read {
                    entity,
                    read,
                    found,
                } => strip(&format!(
                    "conflict: {entity} read at {:?}, found at {:?}",
                    read.map(at),
                    found.map(at)
                )),
                other => strip(&format!("conflict: {other}")),
            },
            Err(other) => strip(&format!("error: {other}")),
        })
        .collect();
    // The history, from each run's datoms, in tx order.
    let mut datoms = Vec::new();
    for key in [
        "setup", "k1", "k2", "k3", "k6", "k7", "k8", "k9", "k10", "k11",
    ] {
        if let Some(detail) = store.run_detail(&format!("{ns}:{key}")).await.unwrap() {
            datoms.extend(detail.datoms);
        }
    }
    datoms.sort_by_key(|d| d.tx);
    let history = datoms
        .into_iter()
        .map(|d| {
            strip(&format!(
                "{} {} {} {} {} {:?}",
                at(d.tx),
                d.run_key,
                d.entity,
                d.attribute,
                d.value,
                d.op
            ))
        })
        .collect();
    // Every entity now and as of every tx of the namespace.
    let mut entities = Vec::new();
    let last = store.latest_tx().await.unwrap().expect("a tx").0;
    for id in ["a", "b", "r", "n1", "m", "ghost"] {
        let lookup = card(&format!("{ns}-{id}"));
        let mut as_of: Vec<Option<Tx>> = vec![None];
        as_of.extend((base.0..=last).map(|t| Some(Tx(t))));
        for when in as_of {
            let entity = store.entity(&lookup, when).await.unwrap();
            entities.push(strip(&format!(
                "{id} as of {:?}: {:?}",
                when.map(at),
                entity.map(|e| (e.attributes, at(e.tx)))
            )));
        }
    }
    let mut runs = Vec::new();
    for key in ["k1", "k2", "k3", "k6", "k7", "k8", "k9", "k10", "k11"] {
        let key = format!("{ns}:{key}");
        let run = store.run(&key).await.unwrap();
        let outbox = store.outbox(&key).await.unwrap();
        runs.push(strip(&format!(
            "{key}: {:?}; outbox {:?}",
            run.map(|r| (r.status, at(r.tx), r.outbox_count, r.completed_at.is_some())),
            outbox
                .iter()
                .map(|o| (
                    o.id.clone(),
                    o.seq,
                    o.partition_key.clone(),
                    o.payload.clone(),
                    at(o.tx),
                    o.dispatched_at.is_some()
                ))
                .collect::<Vec<_>>()
        )));
    }
    let mut messages: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in broker.messages("card-batch").await.unwrap() {
        if !m.message_id.starts_with(&format!("{ns}:")) {
            continue;
        }
        let payload = String::from_utf8(m.payload).unwrap();
        messages
            .entry(strip(&format!("{:?}", m.partition_key)))
            .or_default()
            .push(strip(&format!(
                "{} {payload} tx {}",
                m.message_id,
                m.headers[HEADER_TX].parse::<i64>().unwrap() - base.0
            )));
    }
    // The namespace's transactions are numbered densely.
    let (first, count, span) = (
        b.count(&format!(
            "SELECT MIN(tx) FROM transactions WHERE run_key LIKE '{ns}:%'"
        ))
        .await,
        b.count(&format!(
            "SELECT COUNT(*) FROM transactions WHERE run_key LIKE '{ns}:%'"
        ))
        .await,
        b.count(&format!(
            "SELECT MAX(tx) - MIN(tx) + 1 FROM transactions WHERE run_key LIKE '{ns}:%'"
        ))
        .await,
    );
    assert_eq!(
        first, base.0,
        "{ns}: the setup run is the namespace's first tx"
    );
    assert_eq!(count, span, "{ns}: tx numbers without gaps");
    BatchResult {
        outcomes,
        history,
        entities,
        runs,
        messages,
    }
}

/// A batch commits what its items would commit one after the other, row for row: duplicate and
/// reused keys, a key refused and then used again, retractions, several datoms on one entity
/// within a run and across runs, compare-and-set and reads against what earlier items changed,
/// entities created in the batch, `tx` numbers dense and in item order (refused items take
/// none), the history and every state as of every `tx`, the outbox rows and their order per
/// partition key. Each way runs in a namespace of its own (keys and entities), on one store.
async fn a_batch_gives_what_its_runs_give_one_by_one<B: Backend>(b: B)
where
    B::Store: Inspect,
{
    let store = b.open().await;
    let broker = b.broker();
    let executor = Executor::builder(store.clone(), broker.clone()).build();
    let mut results = Vec::new();
    for (ns, batched) in [("solo", false), ("bulk", true)] {
        let setup = Effects::from(DatomEffect::assert(
            card(&format!("{ns}-a")),
            [("card/status", json!("active")), ("card/limit", json!(10))],
        ))
        .merge(DatomEffect::assert(
            card(&format!("{ns}-b")),
            [("card/status", json!("active"))],
        ))
        .merge(DatomEffect::assert(
            card(&format!("{ns}-r")),
            [("card/status", json!("active"))],
        ));
        let base = executor
            .run(format!("{ns}:setup"), setup)
            .await
            .unwrap()
            .tx();
        let a = store
            .entity(&card(&format!("{ns}-a")), None)
            .await
            .unwrap()
            .unwrap();
        let r = store
            .entity(&card(&format!("{ns}-r")), None)
            .await
            .unwrap()
            .unwrap();
        let items = batch_scenario(ns, &a, &r);
        let outcomes = if batched {
            executor.run_batch(items).await.unwrap()
        } else {
            let mut outcomes = Vec::new();
            for item in items {
                outcomes.push(
                    executor
                        .run_with(item.key, item.effects, item.options)
                        .await,
                );
            }
            outcomes
        };
        // What a run left to the relay (a store may leave a batch's later messages of one
        // partition to it) goes out now, in partition order.
        while executor.dispatch_due(100).await.unwrap().claimed > 0 {}
        results.push(batch_result(&b, &store, &broker, ns, base, &outcomes).await);
    }
    let batched = results.pop().unwrap();
    let one_by_one = results.pop().unwrap();
    // The scenario does what it says (so that the comparison compares something).
    assert_eq!(
        one_by_one.outcomes,
        [
            "applied at 1",
            "conflict: [card/id \"a\"] read at Some(0), found at Some(1)",
            "applied at 2",
            "applied at 3",
            "duplicate of 1",
            "conflict: datoms[0] expected card/status of [card/id \"b\"] to be \"active\" but it is \"closed\"",
            "applied at 4",
            "applied at 5",
            "conflict: [card/id \"m\"] read at None, found at Some(5)",
            "applied at 6",
            "applied at 7",
            "key reused, applied at 2",
        ],
        "{one_by_one:#?}"
    );
    assert_eq!(one_by_one.messages["Some(\"a\")"].len(), 3);
    assert_eq!(batched.outcomes, one_by_one.outcomes);
    assert_eq!(batched.history, one_by_one.history);
    assert_eq!(batched.entities, one_by_one.entities);
    assert_eq!(batched.runs, one_by_one.runs);
    assert_eq!(batched.messages, one_by_one.messages);
}

/// Batches committed at once by several tasks, their items touching the same entities in
/// different orders: every run applied, none waits forever (the locks are taken in one global
/// order), and the `tx` numbers are dense with each key's datoms under its own `tx`.
async fn concurrent_batches_on_shared_entities_number_their_runs_densely<B: Backend>(b: B)
where
    B::Store: Inspect,
{
    const TASKS: usize = 4;
    const BATCHES: usize = 5;
    const ITEMS: usize = 10;
    let store = b.open().await;
    let broker = b.broker();
    let executor = Arc::new(Executor::builder(store.clone(), broker).build());
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let executor = Arc::clone(&executor);
        tasks.spawn(async move {
            for batch in 0..BATCHES {
                let items = (0..ITEMS)
                    .map(|i| {
                        // Two of six shared entities, in an order that differs by task.
                        let first = (task + i) % 6;
                        let second = (task * 5 + i * 7 + batch) % 6;
                        let n = json!(task * 1000 + batch * 100 + i);
                        let mut effects = Effects::from(DatomEffect::assert(
                            card(&format!("shared-{first}")),
                            [("card/n", n.clone())],
                        ));
                        if second != first {
                            effects = effects.merge(DatomEffect::assert(
                                card(&format!("shared-{second}")),
                                [("card/m", n)],
                            ));
                        }
                        BatchItem::new(format!("t{task}:b{batch}:i{i}"), effects)
                    })
                    .collect();
                let results =
                    tokio::time::timeout(Duration::from_secs(60), executor.run_batch(items))
                        .await
                        .expect("a batch commits within 60 s")
                        .unwrap();
                let txs: Vec<Tx> = results.iter().map(|r| r.as_ref().unwrap().tx()).collect();
                assert!(
                    txs.windows(2).all(|w| w[1].0 == w[0].0 + 1),
                    "a batch's runs take consecutive tx numbers in item order: {txs:?}"
                );
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let total = i64::try_from(TASKS * BATCHES * ITEMS).unwrap();
    assert_eq!(b.count("SELECT COUNT(*) FROM transactions").await, total);
    assert_eq!(
        b.count("SELECT MAX(tx) - MIN(tx) + 1 FROM transactions")
            .await,
        total
    );
    // Each entity's current values are those of the last tx that wrote them.
    let mut history = Vec::new();
    for task in 0..TASKS {
        for batch in 0..BATCHES {
            for i in 0..ITEMS {
                let key = format!("t{task}:b{batch}:i{i}");
                let detail = store.run_detail(&key).await.unwrap().expect("applied");
                history.extend(detail.datoms);
            }
        }
    }
    for id in 0..6 {
        let entity = store
            .entity(&card(&format!("shared-{id}")), None)
            .await
            .unwrap()
            .expect("every shared entity was written");
        for attribute in ["card/n", "card/m"] {
            let last = history
                .iter()
                .filter(|d| {
                    d.entity == card(&format!("shared-{id}"))
                        && d.attribute == attribute
                        && d.op == effects_core::Op::Assert
                })
                .max_by_key(|d| d.tx);
            assert_eq!(
                entity.attributes.get(attribute),
                last.map(|d| &d.value),
                "shared-{id} {attribute}"
            );
        }
    }
}

/// 50 keys, each run by two tasks at once.
async fn one_key_from_two_tasks<B: Backend>(
    b: &B,
    mutant: Option<Mutant>,
) -> (usize, BTreeMap<String, i64>) {
    let store = b.open().await;
    let mut builder = Executor::builder(store.clone(), b.broker());
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let executor = Arc::new(builder.build());
    let mut duplicates = 0;
    for i in 0..50 {
        let key = format!("block:m{i}");
        let a = tokio::spawn({
            let (executor, key) = (Arc::clone(&executor), key.clone());
            async move { executor.run(key, block("c1")).await }
        });
        let c = tokio::spawn({
            let executor = Arc::clone(&executor);
            async move { executor.run(key, block("c1")).await }
        });
        let (a, c) = (a.await.unwrap().unwrap(), c.await.unwrap().unwrap());
        if a.is_duplicate() || c.is_duplicate() {
            assert_eq!(a.tx(), c.tx());
            assert!(!(a.is_duplicate() && c.is_duplicate()), "{a:?} {c:?}");
            duplicates += 1;
        }
    }
    (duplicates, b.transactions_per_key().await)
}

async fn one_key_from_two_tasks_applies_exactly_once<B: Backend>(b: B) {
    let (duplicates, transactions) = one_key_from_two_tasks(&b, None).await;
    assert_eq!(duplicates, 50);
    assert_eq!(transactions.len(), 50);
    assert!(transactions.values().all(|n| *n == 1), "{transactions:?}");
    assert_eq!(
        b.broker()
            .messages("card-status-changed")
            .await
            .unwrap()
            .len(),
        50
    );
}

/// Without the duplicate check both tasks commit: the check above can fail.
async fn mutant_without_the_duplicate_check_applies_one_key_from_two_tasks_twice<B: Backend>(b: B) {
    let (duplicates, transactions) =
        one_key_from_two_tasks(&b, Some(Mutant::SkipDuplicateCheck)).await;
    assert_eq!(duplicates, 0);
    assert_eq!(transactions.values().sum::<i64>(), 100);
}

async fn invalid_effects_are_refused_before_any_write<B: Backend>(b: B) {
    let store = b.open().await;
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
    let executor = Executor::builder(store.clone(), b.broker())
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
    let long_key = "k".repeat(17);
    let cases: Vec<(&str, Effects, &str)> = vec![
        ("", block("c1"), "the idempotency key is empty"),
        (&long_key, block("c1"), "17 bytes long; the limit is 16"),
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
    for table in ["transactions", "effect_runs", "entities", "outbox"] {
        assert_eq!(
            b.count(&format!("SELECT COUNT(*) FROM {table}")).await,
            0,
            "{table}"
        );
    }
    let broker = b.broker();
    for topic in ["t", "card-status-changed"] {
        assert!(broker.messages(topic).await.unwrap().is_empty(), "{topic}");
    }
}

// ---------------------------------------------------------------------------------------------
// The transfer domain: a handler keyed by its transfer id, whose input (both accounts) is loaded
// from the store through the tracked handle.

const TOPIC: &str = "transfers";

/// What a message on `transfers` carries.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
struct TransferRequest {
    id: String,
    from: String,
    to: String,
    amount: i64,
}

#[derive(Clone, Debug, Deserialize)]
struct Account {
    id: String,
    balance: i64,
}

/// The handler's input: the request and both accounts as loaded.
#[derive(Clone, Debug, Deserialize)]
struct Transfer {
    id: String,
    from: Account,
    to: Account,
    amount: i64,
}

fn account(id: &str) -> LookupRef {
    LookupRef::new("account/id", id)
}

/// Moves money if the payer can afford it (absolute new balances, computed from what was
/// loaded); records the transfer either way. Counts its calls.
#[derive(Debug, Default)]
struct TransferHandler {
    calls: AtomicUsize,
}

impl Handler for TransferHandler {
    type Input = Transfer;
    type Output = Effects;

    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: "transfer",
        topic: Some(TOPIC),
        key: Some("transfer.id"),
        input: "Transfer",
        schemas: &[],
    };

    fn handle(&self, t: Transfer) -> Effects {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let record = |status: &str| {
            DatomEffect::assert(
                LookupRef::new("transfer/id", t.id.as_str()),
                [
                    ("transfer/status", json!(status)),
                    ("transfer/amount", json!(t.amount)),
                    ("transfer/from", json!(t.from.id)),
                    ("transfer/to", json!(t.to.id)),
                ],
            )
        };
        if t.from.balance < t.amount || t.from.id == t.to.id {
            return Effects::from(record("refused"));
        }
        Effects::from(DatomEffect::assert(
            account(&t.from.id),
            [("account/balance", json!(t.from.balance - t.amount))],
        ))
        .merge(DatomEffect::assert(
            account(&t.to.id),
            [("account/balance", json!(t.to.balance + t.amount))],
        ))
        .merge(record("booked"))
        .merge(MessageEffect::new("transfer-booked", json!({"id": t.id})).with_key(t.from.id))
    }

    fn key(&self, input: &Transfer) -> Option<String> {
        Some(input.id.clone())
    }
}

/// Loads both accounts through the tracked store, then lingers a little, as a service that
/// does more work between its reads and its commit would: concurrent runs overlap.
async fn load_transfer<S: Store + Clone>(
    r: TransferRequest,
    store: Tracked<S>,
) -> Result<Transfer, LoadError> {
    let load =
        |id: String| {
            let store = store.clone();
            async move {
                let entity = store.entity(&account(&id), None).await?.ok_or_else(|| {
                    LoadError::NotFound {
                        what: format!("account {id}"),
                    }
                })?;
                entity.decode::<Account>().map_err(|e| LoadError::Invalid {
                    reason: format!("account {id}: {e}"),
                })
            }
        };
    let from = load(r.from).await?;
    let to = load(r.to).await?;
    tokio::time::sleep(Duration::from_millis(2)).await;
    Ok(Transfer {
        id: r.id,
        from,
        to,
        amount: r.amount,
    })
}

struct Setup<B: Backend> {
    store: B::Store,
    log: SqliteLog,
    executor: Arc<Executor<B::Store, SqliteLog>>,
}

async fn setup<B: Backend>(b: &B, mutant: Option<Mutant>) -> Setup<B> {
    let store = b.open().await;
    let log = b.broker();
    let mut builder = Executor::builder(store.clone(), log.clone());
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    Setup {
        executor: Arc::new(builder.build()),
        store,
        log,
    }
}

/// A worker's settings for the cases: `concurrency` deliveries decided at once; with 1, one
/// delivery in the worker at a time, from fetch to settle.
fn worker_config(concurrency: usize) -> WorkerConfig {
    WorkerConfig {
        concurrency,
        max_in_flight: if concurrency == 1 {
            1
        } else {
            WorkerConfig::default().max_in_flight
        },
        fetch_wait: Duration::from_millis(20),
        relay: Some(RelayConfig {
            interval: Duration::from_millis(20),
            ..RelayConfig::default()
        }),
        ..WorkerConfig::default()
    }
}

type TransferWorker<S, I> = Worker<S, SqliteLog, NoHttp, TransferHandler, I>;

fn transfer_worker<B: Backend>(
    setup: &Setup<B>,
    concurrency: usize,
) -> Arc<TransferWorker<B::Store, impl effects_core::worker::Inputs<TransferHandler, B::Store>>> {
    Arc::new(
        Worker::new(Arc::clone(&setup.executor), TransferHandler::default())
            .with_config(worker_config(concurrency))
            .load_with(LoadWith::new(load_transfer::<B::Store>)),
    )
}

async fn seed<B: Backend>(setup: &Setup<B>, balances: &[(&str, i64)]) {
    let effects: Effects = balances
        .iter()
        .map(|(id, b)| DatomEffect::assert(account(id), [("account/balance", json!(b))]))
        .collect();
    setup.executor.run("seed", effects).await.unwrap();
}

async fn publish(log: &SqliteLog, topic: &str, message_id: &str, payload: Vec<u8>) {
    log.publish(OutgoingMessage {
        id: message_id.to_owned(),
        topic: topic.to_owned(),
        partition_key: None,
        headers: BTreeMap::new(),
        payload,
    })
    .await
    .unwrap();
}

async fn publish_transfer(log: &SqliteLog, message_id: &str, request: &TransferRequest) {
    publish(log, TOPIC, message_id, serde_json::to_vec(request).unwrap()).await;
}

/// Runs `worker` until `consumer` has acknowledged every message of `topic` (bounded), then
/// stops it.
async fn drain<S, H, I>(
    worker: Arc<Worker<S, SqliteLog, NoHttp, H, I>>,
    log: &SqliteLog,
    consumer: &'static str,
    topic: &'static str,
    timeout: Duration,
) -> WorkerReport
where
    S: Store + Clone,
    H: Handler,
    I: effects_core::worker::Inputs<H, S>,
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
    eventually("every message acknowledged", timeout, || {
        let log = log.clone();
        async move { log.unacknowledged(consumer, topic).await.unwrap() == 0 }
    })
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the worker stops within 10 s")
        .unwrap()
}

async fn balance<S: Store>(store: &S, id: &str) -> i64 {
    store
        .entity(&account(id), None)
        .await
        .unwrap()
        .and_then(|e| e.get("account/balance").and_then(serde_json::Value::as_i64))
        .unwrap_or_else(|| panic!("account {id} has a balance"))
}

// ---------------------------------------------------------------------------------------------
// The transfer race.

const RACE_TRANSFERS: usize = 40;
const PAYER_START: i64 = 1_000_000;

struct RaceResult {
    payer: i64,
    payee: i64,
    report: WorkerReport,
    transactions: BTreeMap<String, i64>,
    handler_calls: usize,
}

/// 40 transfers of 100 from one account to another through one worker at concurrency 8.
async fn transfer_race<B: Backend>(b: &B, mutant: Option<Mutant>) -> RaceResult {
    let setup = setup(b, mutant).await;
    seed(&setup, &[("payer", PAYER_START), ("payee", 0)]).await;
    for i in 0..RACE_TRANSFERS {
        let request = TransferRequest {
            id: format!("t{i}"),
            from: "payer".into(),
            to: "payee".into(),
            amount: 100,
        };
        publish_transfer(&setup.log, &format!("m{i}"), &request).await;
    }
    let worker = transfer_worker(&setup, 8);
    let report = drain(
        Arc::clone(&worker),
        &setup.log,
        "transfer",
        TOPIC,
        Duration::from_secs(90),
    )
    .await;
    RaceResult {
        payer: balance(&setup.store, "payer").await,
        payee: balance(&setup.store, "payee").await,
        transactions: b.transactions_per_key().await,
        handler_calls: worker.handler().calls.load(Ordering::Relaxed),
        report,
    }
}

async fn the_transfer_race_loses_no_update<B: Backend>(b: B) {
    let race = transfer_race(&b, None).await;
    let r = &race.report;
    println!(
        "FIGURE transfer_race store={} transfers={RACE_TRANSFERS} concurrency=8 applied={} \
         conflicts={} reruns={} handler_calls={} payer={} payee={}",
        B::NAME,
        r.applied,
        r.conflicts,
        r.reruns,
        race.handler_calls,
        race.payer,
        race.payee
    );
    assert_eq!(race.payer, PAYER_START - 100 * RACE_TRANSFERS as i64);
    assert_eq!(race.payee, 100 * RACE_TRANSFERS as i64);
    assert_eq!(race.payer + race.payee, PAYER_START, "money is conserved");
    // Each transfer applied exactly once: one transaction per business key.
    for i in 0..RACE_TRANSFERS {
        let key = effects_core::handler::business_key("transfer", &format!("t{i}"));
        assert_eq!(race.transactions.get(&key), Some(&1), "{key}");
    }
    assert_eq!(
        race.transactions.len(),
        RACE_TRANSFERS + 1,
        "the seed and 40 runs"
    );
    assert_eq!(r.applied, RACE_TRANSFERS as u64);
    assert_eq!(r.dead_lettered, 0);
    // The race really happened: runs were refused and their handlers called again.
    assert!(
        r.conflicts > 0,
        "no conflict: the race did not happen: {r:?}"
    );
    assert_eq!(r.reruns, r.conflicts, "every conflict was re-run");
    assert_eq!(
        race.handler_calls as u64,
        r.applied + r.reruns,
        "one call per applied run plus one per re-run"
    );
}

/// The same race without read validation loses updates: the check above can fail.
async fn mutant_without_read_validation_loses_updates<B: Backend>(b: B) {
    let race = transfer_race(&b, Some(Mutant::SkipReadValidation)).await;
    println!(
        "FIGURE transfer_race_mutant store={} payer={} payee={} conflicts={}",
        B::NAME,
        race.payer,
        race.payee,
        race.report.conflicts
    );
    assert_eq!(race.report.conflicts, 0);
    assert_ne!(
        race.payee,
        100 * RACE_TRANSFERS as i64,
        "without read validation concurrent transfers overwrite each other"
    );
    // Every transfer reports applied, yet most of them moved nothing: their debits and credits
    // were computed from balances other runs had already changed.
    assert_eq!(race.report.applied, RACE_TRANSFERS as u64);
    assert!(race.payer > PAYER_START - 100 * RACE_TRANSFERS as i64);
}

// ---------------------------------------------------------------------------------------------
// Increments of an entity that does not exist yet: "it did not exist" is a read too.

const INCREMENTS: usize = 30;

/// Adds one to `counter/value` of the counter named in the message (0 if it does not exist).
#[derive(Debug, Default)]
struct Increment {
    calls: AtomicUsize,
}

#[derive(Deserialize)]
struct IncrementRequest {
    counter: String,
}

impl Handler for Increment {
    type Input = (String, i64);
    type Output = Effects;
    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: "increment",
        topic: Some("increments"),
        key: None,
        input: "(String, i64)",
        schemas: &[],
    };

    fn handle(&self, (counter, value): (String, i64)) -> Effects {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Effects::from(DatomEffect::assert(
            LookupRef::new("counter/id", counter),
            [("counter/value", json!(value + 1))],
        ))
    }
}

async fn load_counter<S: Store + Clone>(
    r: IncrementRequest,
    store: Tracked<S>,
) -> Result<(String, i64), LoadError> {
    let value = store
        .entity(&LookupRef::new("counter/id", r.counter.as_str()), None)
        .await?
        .and_then(|e| e.get("counter/value").and_then(serde_json::Value::as_i64))
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(2)).await;
    Ok((r.counter, value))
}

async fn increments<B: Backend>(b: &B, mutant: Option<Mutant>) -> (i64, WorkerReport) {
    let setup = setup(b, mutant).await;
    for i in 0..INCREMENTS {
        publish(
            &setup.log,
            "increments",
            &format!("i{i}"),
            br#"{"counter": "hits"}"#.to_vec(),
        )
        .await;
    }
    let worker = Arc::new(
        Worker::new(Arc::clone(&setup.executor), Increment::default())
            .with_config(worker_config(8))
            .load_with(LoadWith::new(load_counter::<B::Store>)),
    );
    let report = drain(
        Arc::clone(&worker),
        &setup.log,
        "increment",
        "increments",
        Duration::from_secs(90),
    )
    .await;
    let value = setup
        .store
        .entity(&LookupRef::new("counter/id", "hits"), None)
        .await
        .unwrap()
        .and_then(|e| e.get("counter/value").and_then(serde_json::Value::as_i64))
        .expect("the counter exists");
    assert_eq!(report.applied, INCREMENTS as u64, "{report:?}");
    assert_eq!(b.transactions_per_key().await.len(), INCREMENTS);
    (value, report)
}

async fn increments_of_an_entity_that_does_not_exist_yet_lose_nothing<B: Backend>(b: B) {
    let (value, report) = increments(&b, None).await;
    println!(
        "FIGURE increments store={} value={value} conflicts={}",
        B::NAME,
        report.conflicts
    );
    assert_eq!(value, INCREMENTS as i64, "{report:?}");
    assert!(report.conflicts > 0, "the race did not happen: {report:?}");
}

/// Without read validation concurrent increments overwrite each other: the check above can fail.
async fn mutant_without_read_validation_loses_increments<B: Backend>(b: B) {
    let (value, report) = increments(&b, Some(Mutant::SkipReadValidation)).await;
    assert_eq!(report.conflicts, 0);
    assert!(value < INCREMENTS as i64, "{value}");
}

// ---------------------------------------------------------------------------------------------
// Business keys.

/// One transfer published twice under two message ids (an upstream that re-sends).
async fn resent_transfer<B: Backend>(
    b: &B,
    mutant: Option<Mutant>,
) -> (WorkerReport, i64, usize, BTreeMap<String, i64>) {
    let setup = setup(b, mutant).await;
    seed(&setup, &[("payer", 1_000), ("payee", 0)]).await;
    let request = TransferRequest {
        id: "t-42".into(),
        from: "payer".into(),
        to: "payee".into(),
        amount: 100,
    };
    publish_transfer(&setup.log, "m1", &request).await;
    publish_transfer(&setup.log, "m2-resent", &request).await;
    let worker = transfer_worker(&setup, 1);
    let report = drain(
        Arc::clone(&worker),
        &setup.log,
        "transfer",
        TOPIC,
        Duration::from_secs(30),
    )
    .await;
    (
        report,
        balance(&setup.store, "payer").await,
        worker.handler().calls.load(Ordering::Relaxed),
        b.transactions_per_key().await,
    )
}

async fn a_business_key_resent_under_a_new_message_id_is_applied_once<B: Backend>(b: B) {
    let (report, payer, calls, transactions) = resent_transfer(&b, None).await;
    assert_eq!((report.applied, report.duplicates), (1, 1), "{report:?}");
    assert_eq!(payer, 900, "debited once");
    assert_eq!(calls, 1, "the re-sent transfer never reached the handler");
    assert_eq!(transactions.get("transfer:t-42"), Some(&1));
}

/// Without the duplicate check the re-sent transfer is applied twice: the check above can fail.
async fn mutant_without_the_duplicate_check_applies_a_resent_transfer_twice<B: Backend>(b: B) {
    let (report, payer, calls, _) = resent_transfer(&b, Some(Mutant::SkipDuplicateCheck)).await;
    assert_eq!(report.applied, 2, "{report:?}");
    assert_eq!(payer, 800, "debited twice");
    assert_eq!(calls, 2);
}

// ---------------------------------------------------------------------------------------------
// Compare-and-set datoms.

/// A balance written only if the account still holds the balance it was computed from.
#[derive(Datom)]
#[datom(entity = "account")]
struct NewBalance {
    #[datom(id)]
    id: String,
    balance: i64,
    #[datom(expect = "balance")]
    was: i64,
}

async fn cas_setup<B: Backend>(b: &B, mutant: Option<Mutant>) -> Setup<B> {
    let setup = setup(b, mutant).await;
    seed(&setup, &[("a1", 1_000)]).await;
    setup
}

fn cas_effects(was: i64, balance: i64) -> Effects {
    let datom = NewBalance {
        id: "a1".into(),
        balance,
        was,
    }
    .into_datom();
    assert_eq!(datom.expected["account/balance"], json!(was));
    Effects::from(datom).merge(MessageEffect::new("balance-changed", json!({"id": "a1"})))
}

async fn a_stale_compare_and_set_is_a_conflict_and_writes_nothing<B: Backend>(b: B) {
    let setup = cas_setup(&b, None).await;
    let before = b.transactions_per_key().await;
    let err = setup
        .executor
        .run("withdraw:1", cas_effects(900, 800))
        .await
        .unwrap_err();
    let RunError::Conflict { conflict, .. } = err else {
        panic!("expected a conflict, got {err}");
    };
    assert_eq!(
        *conflict,
        Conflict::Expected {
            datom: 0,
            entity: account("a1"),
            attribute: "account/balance".into(),
            expected: Some(json!(900)),
            found: Some(json!(1_000)),
        }
    );
    assert_eq!(
        conflict.to_string(),
        "datoms[0] expected account/balance of [account/id \"a1\"] to be 900 but it is 1000"
    );
    // Nothing of the run: no transaction, no run record, no outbox row, no message, no change.
    assert_eq!(b.transactions_per_key().await, before);
    assert_eq!(setup.store.run("withdraw:1").await.unwrap(), None);
    assert!(setup.store.outbox("withdraw:1").await.unwrap().is_empty());
    assert!(
        setup
            .log
            .messages("balance-changed")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(balance(&setup.store, "a1").await, 1_000);

    // The key is still free: the same key with fresh effects applies.
    let outcome = setup
        .executor
        .run("withdraw:1", cas_effects(1_000, 900))
        .await
        .unwrap();
    assert!(matches!(outcome, RunOutcome::Applied { .. }));
    assert_eq!(balance(&setup.store, "a1").await, 900);
    // Expecting no value of an attribute the entity holds is a conflict too.
    let absent = Effects::from(
        DatomEffect::assert(account("a1"), [("account/owner", json!("ana"))])
            .expecting("account/balance", serde_json::Value::Null),
    );
    assert!(matches!(
        setup.executor.run("owner:1", absent).await,
        Err(RunError::Conflict { .. })
    ));
    // ... and expecting no value of one it does not hold is not.
    let fresh = Effects::from(
        DatomEffect::assert(account("a1"), [("account/owner", json!("ana"))])
            .expecting("account/owner", serde_json::Value::Null),
    );
    assert!(matches!(
        setup.executor.run("owner:2", fresh).await,
        Ok(RunOutcome::Applied { .. })
    ));
}

/// Without validation the stale compare-and-set overwrites the balance: the check above can fail.
async fn mutant_without_read_validation_applies_a_stale_compare_and_set<B: Backend>(b: B) {
    let setup = cas_setup(&b, Some(Mutant::SkipReadValidation)).await;
    let outcome = setup
        .executor
        .run("withdraw:1", cas_effects(900, 800))
        .await
        .unwrap();
    assert!(matches!(outcome, RunOutcome::Applied { .. }));
    assert_eq!(balance(&setup.store, "a1").await, 800);
}

async fn compare_and_set_expectations_that_disagree_are_refused_before_any_write<B: Backend>(b: B) {
    let setup = cas_setup(&b, None).await;
    let before = b.transactions_per_key().await;
    let effects = Effects::from(
        DatomEffect::assert(account("a1"), [("account/limit", json!(5))])
            .expecting("account/balance", json!(1_000)),
    )
    .merge(
        DatomEffect::assert(account("a1"), [("account/flag", json!(true))])
            .expecting("account/balance", json!(7)),
    );
    let err = setup.executor.run("both", effects).await.unwrap_err();
    assert!(matches!(err, RunError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("both cannot hold"), "{err}");
    assert_eq!(b.transactions_per_key().await, before);
}

// ---------------------------------------------------------------------------------------------
// What read validation does not refuse, and what it does.

async fn reads_that_still_hold_are_never_a_conflict<B: Backend>(b: B) {
    let setup = cas_setup(&b, None).await;
    let other = account("other");
    setup
        .executor
        .run(
            "open:other",
            Effects::from(DatomEffect::assert(
                other.clone(),
                [("account/balance", json!(5))],
            )),
        )
        .await
        .unwrap();
    let read = setup
        .store
        .entity(&account("a1"), None)
        .await
        .unwrap()
        .unwrap();
    let as_of = setup
        .store
        .entity(&account("a1"), Some(read.tx))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(as_of.tx, read.tx);

    // Another entity changes; the read one is rewritten with the value it holds (no change).
    setup
        .executor
        .run(
            "deposit:other",
            Effects::from(DatomEffect::assert(other, [("account/balance", json!(6))])),
        )
        .await
        .unwrap();
    setup
        .executor
        .run(
            "same-value",
            Effects::from(DatomEffect::assert(
                account("a1"),
                [("account/balance", json!(1_000))],
            )),
        )
        .await
        .unwrap();

    for (key, version) in [
        ("now", ReadVersion::of(&read)),
        ("as-of", ReadVersion::of(&as_of)),
    ] {
        let effects = Effects::from(DatomEffect::assert(
            LookupRef::new("audit/id", key),
            [("audit/balance", json!(1_000))],
        ));
        let outcome = setup
            .executor
            .run_with(key, effects, RunOptions::reading([version]))
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(matches!(outcome, RunOutcome::Applied { .. }), "{key}");
    }

    // A read of an entity that did not exist holds while it still does not.
    let ghost = ReadVersion::missing(account("ghost"));
    let outcome = setup
        .executor
        .run_with(
            "ghost-read",
            Effects::from(DatomEffect::assert(
                account("z"),
                [("account/balance", json!(1))],
            )),
            RunOptions::reading([ghost.clone()]),
        )
        .await
        .unwrap();
    assert!(matches!(outcome, RunOutcome::Applied { .. }));
    // ... and is a conflict once it exists.
    setup
        .executor
        .run(
            "create-ghost",
            Effects::from(DatomEffect::assert(
                account("ghost"),
                [("account/balance", json!(1))],
            )),
        )
        .await
        .unwrap();
    let err = setup
        .executor
        .run_with(
            "ghost-read-2",
            Effects::from(DatomEffect::assert(
                account("z"),
                [("account/balance", json!(2))],
            )),
            RunOptions::reading([ghost]),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RunError::Conflict { conflict, .. } if matches!(conflict.as_ref(), Conflict::Read { read: None, found: Some(_), .. })),
        "{err}"
    );
}

async fn any_change_to_a_read_entity_is_a_conflict_even_of_another_attribute<B: Backend>(b: B) {
    let setup = cas_setup(&b, None).await;
    let read = setup
        .store
        .entity(&account("a1"), None)
        .await
        .unwrap()
        .unwrap();
    let renamed = setup
        .executor
        .run(
            "rename",
            Effects::from(DatomEffect::assert(
                account("a1"),
                [("account/owner", json!("ana"))],
            )),
        )
        .await
        .unwrap();
    let err = setup
        .executor
        .run_with(
            "withdraw",
            Effects::from(DatomEffect::assert(
                account("a1"),
                [("account/balance", json!(900))],
            )),
            RunOptions::reading([ReadVersion::of(&read)]),
        )
        .await
        .unwrap_err();
    let RunError::Conflict { conflict, .. } = err else {
        panic!("expected a conflict")
    };
    assert_eq!(
        *conflict,
        Conflict::Read {
            entity: account("a1"),
            read: Some(read.tx),
            found: Some(renamed.tx()),
        }
    );
    assert_eq!(renamed.tx(), Tx(read.tx.0 + 1), "tx values have no gaps");
}

async fn concurrent_transfers_between_disjoint_accounts_never_conflict<B: Backend>(b: B) {
    let setup = setup(&b, None).await;
    let mut accounts = Vec::new();
    for i in 0..16 {
        accounts.push((format!("p{i}"), 1_000));
        accounts.push((format!("q{i}"), 0));
    }
    let seeded: Vec<(&str, i64)> = accounts.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    seed(&setup, &seeded).await;
    for i in 0..16 {
        let request = TransferRequest {
            id: format!("t{i}"),
            from: format!("p{i}"),
            to: format!("q{i}"),
            amount: 10,
        };
        publish_transfer(&setup.log, &format!("m{i}"), &request).await;
    }
    let worker = transfer_worker(&setup, 8);
    let report = drain(
        Arc::clone(&worker),
        &setup.log,
        "transfer",
        TOPIC,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(report.applied, 16);
    assert_eq!(report.conflicts, 0, "{report:?}");
    for i in 0..16 {
        assert_eq!(balance(&setup.store, &format!("q{i}")).await, 10);
    }
}

async fn redelivery_after_a_rerun_is_still_a_duplicate<B: Backend>(b: B) {
    let setup = setup(&b, None).await;
    seed(&setup, &[("payer", 10_000), ("payee", 0)]).await;
    for i in 0..16 {
        let request = TransferRequest {
            id: format!("t{i}"),
            from: "payer".into(),
            to: "payee".into(),
            amount: 10,
        };
        publish_transfer(&setup.log, &format!("m{i}"), &request).await;
    }
    let worker = transfer_worker(&setup, 8);
    let report = drain(
        Arc::clone(&worker),
        &setup.log,
        "transfer",
        TOPIC,
        Duration::from_secs(30),
    )
    .await;
    assert!(report.reruns > 0, "{report:?}");

    // Deliver every message again (as after a lost acknowledgement): all duplicates.
    let messages = setup.log.messages(TOPIC).await.unwrap();
    assert_eq!(messages.len(), 16);
    for m in messages {
        let delivery = effects_core::transport::Delivery {
            consumer: "transfer".into(),
            topic: m.topic,
            sequence: m.sequence,
            message_id: m.message_id,
            partition_key: m.partition_key,
            headers: m.headers,
            payload: m.payload,
            deliveries: 2,
        };
        let processed = worker.process(delivery).await;
        assert!(
            matches!(processed, Processed::Duplicate { .. }),
            "{processed:?}"
        );
    }
    assert_eq!(balance(&setup.store, "payee").await, 160);
    assert!(b.transactions_per_key().await.values().all(|n| *n == 1));
}

// ---------------------------------------------------------------------------------------------
// The worker over a failing store.

async fn a_store_error_is_retried_by_the_worker_then_succeeds<B: Backend>(b: B) {
    let setup = setup(&b, None).await;
    seed(&setup, &[("payer", 1_000), ("payee", 0)]).await;
    let mut config = worker_config(2);
    config.retry.initial = Duration::from_millis(20);
    config.retry.max = Duration::from_millis(40);
    let worker = Arc::new(
        Worker::new(Arc::clone(&setup.executor), TransferHandler::default())
            .with_config(config)
            .load_with(LoadWith::new(load_transfer::<B::Store>)),
    );
    b.fail_inserts("effect_runs", "TRUE", "db down").await;
    let request = TransferRequest {
        id: "t1".into(),
        from: "payer".into(),
        to: "payee".into(),
        amount: 100,
    };
    publish_transfer(&setup.log, "m1", &request).await;
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
    eventually("two failed attempts", Duration::from_secs(10), || {
        let worker = Arc::clone(&worker);
        async move { worker.report().retried >= 2 }
    })
    .await;
    b.heal("effect_runs").await;
    eventually("the ack", Duration::from_secs(10), || {
        let log = setup.log.clone();
        async move { log.unacknowledged("transfer", TOPIC).await.unwrap() == 0 }
    })
    .await;
    let _ = stop.send(());
    let report = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.applied, 1);
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(
        report.deliveries, 1,
        "retried in the worker, holding the delivery, not given back: {report:?}"
    );
    assert!(report.retried >= 2, "{report:?}");
    assert_eq!(balance(&setup.store, "payer").await, 900);
    assert_eq!(b.transactions_per_key().await.get("transfer:t1"), Some(&1));
    assert_eq!(
        setup.log.messages("transfer-booked").await.unwrap().len(),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// Liveness: a process that dies has its work taken over in seconds, one that lives never.

/// A child process taking leases on the case's database (`effects-liveness-child hold`), as
/// another process would: it registers `owner`, commits `runs` runs of one request and one
/// message whose requests it claims for `lease`, and with `record` records their responses.
/// Returns once it holds them.
fn holding_child<B: Backend>(
    b: &B,
    owner: &str,
    runs: usize,
    lease: Duration,
    record: bool,
) -> ChildProcess {
    let args: Vec<String> = [
        "hold",
        "--store",
        &b.child_store(),
        "--owner",
        owner,
        "--runs",
        &runs.to_string(),
        "--lease-ms",
        &lease.as_millis().to_string(),
        "--record",
        &record.to_string(),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let mut child = ChildProcess::spawn(
        owner,
        std::path::Path::new(env!("CARGO_BIN_EXE_effects-liveness-child")),
        &args,
    )
    .expect("start the liveness child");
    let held = child
        .wait_for("HELD", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(held, format!("HELD {runs}"));
    child
}

/// Sends a signal by name (`STOP`, `CONT`) to a child.
fn signal(child: &ChildProcess, name: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} failed");
}

fn one_hour() -> Duration {
    Duration::from_secs(3600)
}

async fn leased_to<B: Backend>(b: &B, owner: &str) -> i64 {
    // The owner names are the cases' own constants.
    b.count(&format!(
        "SELECT COUNT(*) FROM outbox WHERE lease_owner = '{owner}' \
         AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL"
    ))
    .await
}

async fn a_dead_owners_rows_are_taken_over_within_seconds<B: Backend>(b: B) {
    dead_owner_taken_over(b, None).await;
}

async fn mutant_without_reaping_leaves_a_dead_owners_rows_to_their_lease<B: Backend>(b: B) {
    dead_owner_taken_over(b, Some(Mutant::NoReaping)).await;
}

/// A process holding requests under an hour's lease is killed; a relay with the default
/// configuration in another process sends them within seconds (counted at the HTTP server).
/// Without reaping, they wait for the hour.
async fn dead_owner_taken_over<B: Backend>(b: B, mutant: Option<Mutant>) {
    const RUNS: usize = 5;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let child = holding_child(&b, "doomed", RUNS, one_hour(), false);
    assert_eq!(leased_to(&b, "doomed").await, RUNS as i64);

    let store = b.open().await;
    let mut builder = Executor::builder(store.clone(), b.broker())
        .http(http_client(&server.uri(), 1))
        .owner("survivor");
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let relay = Relay::new(Arc::new(builder.build()));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    // The relay runs; the child's rows are leased for an hour.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        server.received_requests().await.unwrap_or_default().len(),
        0
    );

    assert!(child.kill_9().unwrap(), "the child was running when killed");
    let killed = Instant::now();
    // Bounded: 4 s.
    let mut sent = 0;
    while killed.elapsed() < Duration::from_secs(4) {
        sent = server.received_requests().await.unwrap_or_default().len();
        if sent >= RUNS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = killed.elapsed();
    let _ = stop.send(());
    let totals = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the relay stops")
        .unwrap();
    match mutant {
        None => {
            assert_eq!(sent, RUNS, "every request sent again after the kill");
            assert!(
                took <= Duration::from_secs(3),
                "the dead owner's requests were sent {took:?} after the kill"
            );
            eprintln!(
                "{}: a killed owner's {RUNS} requests sent again {took:?} after the kill",
                B::NAME
            );
            assert_eq!((totals.reaped_owners, totals.reaped_rows), (1, RUNS as u64));
            assert_eq!(
                b.count("SELECT COUNT(*) FROM owners WHERE owner = 'doomed'")
                    .await,
                0,
                "the dead owner is forgotten"
            );
        }
        Some(_) => {
            assert_eq!(
                sent, 0,
                "without reaping, the dead owner's rows wait for their hour's lease"
            );
            assert_eq!(leased_to(&b, "doomed").await, RUNS as i64);
        }
    }
}

/// Owners that live are never reaped, whether they run or are paused (SIGSTOP); a paused
/// owner's rows are freed by their lease, the fallback, and the owner stays registered.
async fn an_owner_alive_or_paused_is_never_reaped<B: Backend>(b: B) {
    let alive = holding_child(&b, "alive", 2, one_hour(), false);
    let mut paused = holding_child(&b, "paused", 2, Duration::from_millis(1500), false);
    signal(&paused, "STOP");
    let store = b.open().await;
    store.register_owner("reaper").await.unwrap();
    // Bounded: 2.5 s, longer than the paused owner's lease.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        assert_eq!(store.reap_dead_owners().await.unwrap(), Reaped::default());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        b.count("SELECT COUNT(*) FROM owners WHERE owner IN ('alive', 'paused', 'reaper')")
            .await,
        3
    );
    assert_eq!(leased_to(&b, "alive").await, 2);
    let claimed = store
        .claim_due(
            10,
            ClaimOptions {
                owner: "reaper".to_owned(),
                lease: Duration::from_secs(60),
                publish_inline: false,
                before_commit: None,
            },
        )
        .await
        .unwrap();
    let keys: BTreeSet<String> = claimed.rows.iter().map(|r| r.run_key.clone()).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["paused:0".to_owned(), "paused:1".to_owned()]),
        "only the paused owner's rows, once their lease expired"
    );
    signal(&paused, "CONT");
    let _ = paused.say("STOP");
    paused.wait(Duration::from_secs(10)).unwrap();
    alive.stop(Duration::from_secs(10)).unwrap();
}

/// A process that recorded its runs' responses and died before their after-requests step: once
/// it is reaped, they are stalled at once (not after the idle time) and a relay finishes them.
/// While it lives, they are not.
async fn a_stalled_run_of_a_dead_recorder_is_taken_over_at_once<B: Backend>(b: B) {
    const RUNS: usize = 3;
    let child = holding_child(&b, "recorder", RUNS, one_hour(), true);
    let store = b.open().await;
    assert!(
        store.stalled_runs(one_hour(), 10).await.unwrap().is_empty(),
        "the recorder is alive"
    );
    assert!(child.kill_9().unwrap());
    // Bounded: the reaper finds it within a few tries.
    let mut reaped = Reaped::default();
    for _ in 0..100 {
        reaped = store.reap_dead_owners().await.unwrap();
        if !reaped.owners.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reaped.owners, ["recorder"]);
    assert_eq!(
        reaped.rows, 0,
        "its requests were recorded: nothing was leased"
    );
    let stalled: BTreeSet<String> = store
        .stalled_runs(one_hour(), 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(
        stalled,
        (0..RUNS).map(|i| format!("recorder:{i}")).collect()
    );
    let broker = b.broker();
    let relay = Relay::new(Arc::new(
        Executor::builder(store.clone(), broker.clone())
            .owner("finisher")
            .build(),
    ));
    let report = relay.tick().await.unwrap();
    assert_eq!(report.finished_runs, RUNS);
    assert_eq!(report.progress.messages_dispatched, RUNS);
    assert_eq!(broker.messages("held").await.unwrap().len(), RUNS);
    for i in 0..RUNS {
        assert_eq!(
            store
                .run(&format!("recorder:{i}"))
                .await
                .unwrap()
                .unwrap()
                .status,
            RunStatus::Done
        );
    }
}

/// Registration is idempotent, and lasts as long as the store handle (and its clones): once
/// the last is dropped, the owner counts as dead even though the process lives.
async fn an_owner_is_alive_as_long_as_its_store_handle<B: Backend>(b: B) {
    let reaper = b.open().await;
    let store = b.open().await;
    store.register_owner("short-lived").await.unwrap();
    store.register_owner("short-lived").await.unwrap();
    let clone = store.clone();
    drop(store);
    assert_eq!(reaper.reap_dead_owners().await.unwrap(), Reaped::default());
    drop(clone);
    // Bounded: the server notices a closed session in milliseconds.
    let mut reaped = Reaped::default();
    for _ in 0..100 {
        reaped = reaper.reap_dead_owners().await.unwrap();
        if !reaped.owners.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reaped.owners, ["short-lived"]);
    assert_eq!(
        b.count("SELECT COUNT(*) FROM owners").await,
        0,
        "nothing else was registered"
    );
}
