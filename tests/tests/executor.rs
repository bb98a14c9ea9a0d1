//! The executor on the embedded default, where the SQLite log lives in the store's file: messages
//! published inside the commit, a failed commit (or batch) that publishes nothing, a locked
//! database, log pruning, migrations. Everything a store must do whatever it is — outcomes,
//! duplicates, key reuse, as-of reads, outbox order, requests, the relay after a crash, leases,
//! pruning, batches, validation — is in the store conformance suite (`store_conformance.rs`),
//! which runs on SQLite and PostgreSQL.

mod support;

use std::time::Duration;

use effects_core::executor::{BatchItem, Executor, RunError, RunOutcome};
use effects_core::store::{OutboxKind, PruneOlderThan, RunStatus, SqliteStore, Store, StoreError};
use effects_core::transport::{FetchRequest, HEADER_KEY, HEADER_TX, OutgoingMessage, Transport};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect};
use serde_json::json;
use support::{sql_exec, sql_i64, temp_dir};

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

/// Pruning the embedded log (the store's own part of pruning is in the store conformance suite):
/// only messages every consumer of their topic acknowledged.
#[tokio::test]
async fn pruning_the_log_removes_only_what_every_consumer_acknowledged() {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
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
    let minute = store
        .prune(PruneOlderThan {
            log_published: Some(Duration::from_secs(60)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(minute.log_messages, 0, "nothing is a minute old");
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
            (3, "0003_fencing.sql".to_owned()),
            (4, "0004_dead_letter_retries.sql".to_owned()),
            (5, "0005_owners.sql".to_owned()),
            (6, "0006_clock.sql".to_owned()),
            (7, "0007_log_given_back.sql".to_owned()),
            (8, "0008_blocked_inputs.sql".to_owned())
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
    assert_eq!(store.schema_versions().await.unwrap().len(), 8);
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
