//! What only the PostgreSQL store has (feature `postgres`): migrations recorded with their
//! checksums and checked on connect, schemas that keep stores apart in one database, the
//! inspection helpers (history, backlog, schema versions), and clear errors for bad options or a
//! server that is not there. What every store does is in `store_conformance.rs`.

#![cfg(feature = "postgres")]

mod backends;
mod support;

use std::time::Duration;

use backends::Backend;
use backends::postgres::Postgres;
use effects_core::executor::Executor;
use effects_core::postgres::{PostgresOptions, PostgresStore, PostgresTls};
use effects_core::store::{Backlog, Store};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect, Op};
use serde_json::json;

fn card(id: &str) -> LookupRef {
    LookupRef::new("card/id", id)
}

fn status(id: &str, s: &str) -> Effects {
    Effects::from(DatomEffect::assert(card(id), [("card/status", json!(s))]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_recorded_checked_and_serialised() {
    let db = Postgres::create("pg-migrations").await;
    backends::run_case(db, |db| async move {
        // Four processes connecting at once: one migrates, the others wait and find it done.
        let connects = (0..4).map(|_| PostgresStore::connect(db.options()));
        let stores: Vec<PostgresStore> = futures_join(connects).await;
        for store in &stores {
            assert_eq!(
                store.schema_versions().await.unwrap(),
                [
                    (1, "0001_store.sql".to_owned()),
                    (2, "0002_dead_letter_retries.sql".to_owned()),
                    (3, "0003_owners.sql".to_owned()),
                    (4, "0004_blocked_inputs.sql".to_owned())
                ]
            );
        }
        assert_eq!(db.count("SELECT COUNT(*) FROM schema_version").await, 4);
        drop(stores);

        // A migration edited after it was applied is refused.
        let recorded: String = db
            .raw()
            .query_one("SELECT sha256 FROM schema_version WHERE version = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(recorded.len(), 64);
        db.exec("UPDATE schema_version SET sha256 = 'x' WHERE version = 1")
            .await;
        let err = PostgresStore::connect(db.options()).await.unwrap_err();
        assert!(
            err.to_string().contains("was changed after it was applied"),
            "{err}"
        );
        // A schema migrated by a newer version of the library is refused.
        db.raw()
            .execute(
                "UPDATE schema_version SET sha256 = $1 WHERE version = 1",
                &[&recorded],
            )
            .await
            .unwrap();
        db.exec(
            "INSERT INTO schema_version (version, name, sha256, applied_at_ms) \
             VALUES (99, '0099_future.sql', '', 0)",
        )
        .await;
        let err = PostgresStore::connect(db.options()).await.unwrap_err();
        assert!(
            err.to_string().contains("migrated by a newer version"),
            "{err}"
        );
        // Re-applying 0001 on tables that exist fails inside its transaction: nothing
        // half-done, and the error names the migration and the server's reason.
        db.exec("DELETE FROM schema_version").await;
        let err = PostgresStore::connect(db.options()).await.unwrap_err();
        assert!(err.to_string().contains("migration 1"), "{err}");
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(db.count("SELECT COUNT(*) FROM schema_version").await, 0);
    })
    .await;
}

/// Joins futures without a futures crate: each in a task.
async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<PostgresStore>
where
    F: std::future::Future<Output = Result<PostgresStore, effects_core::store::StoreError>>
        + Send
        + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().expect("connect"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_keep_stores_apart_and_the_helpers_inspect_one() {
    let db = Postgres::create("pg-schemas").await;
    backends::run_case(db, |db| async move {
        let a = PostgresStore::connect(db.options().with_schema("service_a"))
            .await
            .unwrap();
        let b = PostgresStore::connect(db.options().with_schema("service_b"))
            .await
            .unwrap();
        assert_eq!(a.schema(), "service_a");
        assert!(a.location().contains("service_a"), "{}", a.location());
        let broker = db.broker();
        let on_a = Executor::builder(a.clone(), broker.clone()).build();
        let on_b = Executor::builder(b.clone(), broker.clone()).build();
        let t1 = on_a.run("k1", status("c1", "active")).await.unwrap().tx();
        let t2 = on_a.run("k2", status("c1", "blocked")).await.unwrap().tx();
        // The same key in another schema is another store: applied, with its own tx numbers.
        let b1 = on_b.run("k1", status("c9", "active")).await.unwrap();
        assert!(!b1.is_duplicate());
        assert_eq!(b1.tx(), t1, "each schema counts its own transactions");
        assert_eq!(b.entity(&card("c1"), None).await.unwrap(), None);

        let history: Vec<_> = a
            .history(None)
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.tx, d.run_key, d.op, d.value))
            .collect();
        assert_eq!(
            history,
            [
                (t1, "k1".to_owned(), Op::Assert, json!("active")),
                (t2, "k2".to_owned(), Op::Retract, json!("active")),
                (t2, "k2".to_owned(), Op::Assert, json!("blocked")),
            ]
        );
        assert_eq!(a.history(Some(t1)).await.unwrap().len(), 2);

        // A run whose message cannot be published stays in the backlog.
        support::sql_exec(
            &db.broker_path(),
            "CREATE TRIGGER down BEFORE INSERT ON log_messages BEGIN SELECT RAISE(ABORT, 'down'); END;",
        );
        on_a.run(
            "k3",
            Effects::from(MessageEffect::new("t", json!({"n": 1}))),
        )
        .await
        .unwrap();
        assert_eq!(
            a.backlog().await.unwrap(),
            Backlog {
                pending_rows: 1,
                dead_lettered_rows: 0,
                open_runs: 1,
            }
        );
        assert!(a.dead_letter("k3#0", "operator", None).await.unwrap());
        assert_eq!(
            a.backlog().await.unwrap(),
            Backlog {
                pending_rows: 0,
                dead_lettered_rows: 1,
                open_runs: 0,
            }
        );
        assert_eq!(b.backlog().await.unwrap(), Backlog::default());
    })
    .await;
}

#[tokio::test]
async fn bad_options_and_a_missing_server_are_clear_errors() {
    for schema in ["Public", "a-b", "x; DROP TABLE outbox", ""] {
        let err = PostgresStore::connect(
            PostgresOptions::new("postgres://postgres@127.0.0.1:5432/postgres").with_schema(schema),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("is not accepted"),
            "{schema}: {err}"
        );
    }
    let err = PostgresStore::connect(PostgresOptions::new("postgres://x:y@[bad"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot be parsed"), "{err}");
    assert!(!err.to_string().contains(":y@"), "no password: {err}");

    // Nothing listens on this port (it was free a moment ago).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = PostgresOptions {
        connect_timeout: Duration::from_secs(1),
        ..PostgresOptions::new(format!("postgres://app:s3cret@127.0.0.1:{port}/x"))
    };
    let debug = format!("{options:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    assert!(debug.contains("app:[redacted]@127.0.0.1"), "{debug}");
    let err = PostgresStore::connect(options).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("cannot open the database"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");

    // A CA file that holds no certificate.
    let err = PostgresTls::with_ca_pem(b"not a certificate").unwrap_err();
    assert!(err.to_string().contains("no certificate"), "{err}");
}

/// A transaction left open with nothing running — its process frozen between two statements —
/// is ended by the server after `idle_in_transaction_timeout`, which releases what it locked:
/// the frozen commit fails and writes nothing, and its key and entities are free for a run that
/// comes while it is frozen. Without the setting the same frozen commit holds its locks to the
/// end (the other run waits for it) and then commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_left_idle_is_ended_by_the_server() {
    use effects_core::executor::FaultPoint;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let db = Postgres::create("pg-idle").await;
    backends::run_case(db, |db| async move {
        let broker = db.broker();
        for (schema, idle) in [
            ("idle_ended", Some(Duration::from_millis(500))),
            ("idle_kept", None),
        ] {
            let options = PostgresOptions {
                idle_in_transaction_timeout: idle,
                ..db.options().with_schema(schema)
            };
            let store = PostgresStore::connect(options).await.unwrap();
            // The first commit freezes for 2 s before `COMMIT`: the thread sleeps, no statement
            // runs on its connection.
            let freeze = Arc::new(AtomicBool::new(true));
            let hook = {
                let freeze = Arc::clone(&freeze);
                Arc::new(move |point: FaultPoint, _key: &str| {
                    if point == FaultPoint::BeforeCommit && freeze.swap(false, Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_secs(2));
                    }
                })
            };
            let frozen = Executor::builder(store.clone(), broker.clone())
                .fault_hook(hook)
                .build();
            let other = Executor::builder(store.clone(), broker.clone()).build();
            let first = tokio::spawn(async move { frozen.run("k1", status("c1", "active")).await });
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            // The same run again, while the first is frozen.
            let second = other.run("k1", status("c1", "active")).await.unwrap();
            let first = first.await.unwrap();
            let entity = store.entity(&card("c1"), None).await.unwrap().unwrap();
            let runs = db
                .raw()
                .query_one(
                    &format!("SELECT COUNT(*) FROM \"{schema}\".transactions WHERE run_key = 'k1'"),
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
            assert_eq!(runs, 1, "{schema}: one transaction for the key");
            assert_eq!(entity.get("card/status"), Some(&json!("active")));
            match idle {
                Some(_) => {
                    let err = first.expect_err("the frozen commit was ended by the server");
                    assert!(
                        format!("{err:?}").contains("idle-in-transaction timeout"),
                        "{schema}: not the server's timeout: {err:?}"
                    );
                    assert!(!second.is_duplicate(), "{schema}: the key was free");
                }
                None => {
                    assert!(
                        !first.unwrap().is_duplicate(),
                        "{schema}: the frozen run commits"
                    );
                    assert!(second.is_duplicate(), "{schema}: the key was taken");
                }
            }
        }
    })
    .await;
}

/// Whether the advisory lock `key` (one bigint) is held by a session of the store's liveness
/// connection.
async fn liveness_holds(db: &Postgres, key: i64) -> bool {
    db.count(&format!(
        "SELECT COUNT(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
         AND ((l.classid::bigint << 32) | l.objid::bigint) = {key} \
         AND a.application_name = 'effects liveness'"
    ))
    .await
        == 1
}

/// The liveness connection lost while the process lives (its session ended by the server):
/// the store notices, and registers its owner again with a new lock on a new connection; the
/// old lock is free from the moment the session ended (the window in which others may take the
/// owner for dead), and once the owner is registered again nobody reaps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_liveness_connection_is_noticed_and_the_owner_registered_again() {
    let db = Postgres::create("pg-liveness-lost").await;
    backends::run_case(db, |db| async move {
        let store = db.open().await;
        store.register_owner("w1").await.unwrap();
        let first = db
            .count("SELECT lock_key FROM owners WHERE owner = 'w1'")
            .await;
        assert!(liveness_holds(&db, first).await, "held from registration");

        let ended = db
            .count(
                "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'effects liveness' \
                 AND datname = current_database()) t",
            )
            .await;
        assert_eq!(ended, 1, "one liveness session");

        // Bounded: noticed at once when the server ends the session; 10 s at most.
        let mut second = first;
        for _ in 0..500 {
            second = db
                .count("SELECT COALESCE(MAX(lock_key), 0) FROM owners WHERE owner = 'w1'")
                .await;
            if second != first && second != 0 && liveness_holds(&db, second).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_ne!(second, first, "registered again with a new lock");
        assert!(liveness_holds(&db, second).await);
        assert!(
            !liveness_holds(&db, first).await,
            "the old lock went with its session"
        );
        let other = db.open().await;
        assert_eq!(
            other.reap_dead_owners().await.unwrap(),
            effects_core::store::Reaped::default(),
            "alive again: not reaped"
        );
        drop(store);
    })
    .await;
}
