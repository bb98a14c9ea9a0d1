//! Wrong clocks on the SQLite store. Processes sharing a SQLite file have no server whose clock
//! they all read; the store keeps its own (see "The store's clock" in the SQLite backend's
//! documentation). Each case opens two handles on one file — two processes — and shifts one
//! handle's wall clock (`skew_clock_for_tests`): a pruner 8 days ahead, a claimant 2 hours
//! ahead, a claimant an hour behind. Counted at the source: transactions per key, the rows a
//! claim hands back, the expiry stored on a row.

mod support;

use std::time::Duration;

use effects_core::executor::{Executor, RunOutcome};
use effects_core::relay::Retention;
use effects_core::store::{
    ClaimOptions, Inspect, NewOutboxRow, NewRun, OutboxKind, SqliteStore, Store,
};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect};
use serde_json::json;
use support::{PrivateDir, sql_exec, sql_i64};

const HOUR_MS: i64 = 3600 * 1000;
const DAY_MS: i64 = 24 * HOUR_MS;

fn claim(owner: &str, lease: Duration) -> ClaimOptions {
    ClaimOptions {
        owner: owner.to_owned(),
        lease,
        publish_inline: false,
        before_commit: None,
    }
}

/// A run of one request, committed, its lease given back: nobody holds it.
async fn commit_request_run(store: &SqliteStore, key: &str) {
    let run = NewRun {
        key: key.to_owned(),
        effects_sha256: "0".repeat(64),
        after_requests: None,
        reads: Vec::new(),
        datoms: Vec::new(),
        outbox: vec![NewOutboxRow {
            seq: 0,
            kind: OutboxKind::Request,
            destination: "notify".to_owned(),
            partition_key: None,
            headers: Default::default(),
            payload: json!({"method": "POST", "endpoint": "notify", "path": "/n"}).to_string(),
        }],
        ack: None,
    };
    store
        .commit_runs(vec![run], claim("committer", Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(
        store.release(Vec::new(), "committer").await.unwrap(),
        1,
        "unleased"
    );
}

fn block(id: &str) -> Effects {
    Effects::from(DatomEffect::assert(
        LookupRef::new("card/id", id),
        [("card/status", json!("blocked"))],
    ))
    .merge(MessageEffect::new(
        "card-status-changed",
        json!({"card_id": id}),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruner_eight_days_ahead_never_removes_a_run_just_applied() {
    let dir = PrivateDir::new("clock-prune");
    let path = dir.join("store.db");
    let right = SqliteStore::open(&path).unwrap();
    let ahead = SqliteStore::open(&path).unwrap();
    ahead.skew_clock_for_tests(8 * DAY_MS);

    let executor = Executor::builder(right.clone(), right.log()).build();
    let first = executor.run("block:m1", block("c1")).await.unwrap();
    assert!(matches!(first, RunOutcome::Applied { .. }), "{first:?}");
    // The process ahead writes too: its writes cannot take the store's clock days ahead.
    let other = Executor::builder(ahead.clone(), ahead.log()).build();
    for i in 0..20 {
        other
            .run(format!("block:a{i}"), block(&format!("a{i}")))
            .await
            .unwrap();
    }
    let report = ahead
        .prune(Retention::default().older_than())
        .await
        .unwrap();
    assert_eq!(
        (report.runs, report.outbox_rows),
        (0, 0),
        "nothing is a day old: {report:?}"
    );
    let clock_skew = ahead.clock().await.unwrap() - right.clock().await.unwrap();
    assert!(
        clock_skew.abs() < 1000,
        "both read the store's time: {clock_skew} ms apart"
    );

    // The same delivery again is a duplicate, not applied a second time.
    let again = executor.run("block:m1", block("c1")).await.unwrap();
    assert_eq!(
        again,
        RunOutcome::Duplicate {
            original_tx: first.tx(),
            progress: Default::default()
        }
    );
    assert_eq!(
        sql_i64(
            &path,
            "SELECT COUNT(*) FROM transactions WHERE run_key = 'block:m1'"
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimant_two_hours_ahead_holds_a_lease_no_longer_than_the_lease() {
    let dir = PrivateDir::new("clock-ahead");
    let path = dir.join("store.db");
    let right = SqliteStore::open(&path).unwrap();
    let ahead = SqliteStore::open(&path).unwrap();
    ahead.skew_clock_for_tests(2 * HOUR_MS);
    commit_request_run(&right, "k1").await;

    let lease = Duration::from_millis(1000);
    let taken = ahead.claim_due(10, claim("ahead", lease)).await.unwrap();
    assert_eq!(taken.rows.len(), 1);
    let until = taken.rows[0].lease_until.unwrap();
    let now = right.clock().await.unwrap();
    assert!(
        until <= now + 1000 + 200,
        "the lease runs {} ms past the store's time",
        until - now
    );
    assert_eq!(
        right
            .claim_due(10, claim("right", lease))
            .await
            .unwrap()
            .rows
            .len(),
        0,
        "held while the lease lasts"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let retaken = right.claim_due(10, claim("right", lease)).await.unwrap();
    assert_eq!(retaken.rows.len(), 1, "free once the lease expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimant_an_hour_behind_never_takes_or_gives_away_a_held_row() {
    let dir = PrivateDir::new("clock-behind");
    let path = dir.join("store.db");
    let right = SqliteStore::open(&path).unwrap();
    let behind = SqliteStore::open(&path).unwrap();
    behind.skew_clock_for_tests(-HOUR_MS);
    commit_request_run(&right, "k1").await;
    commit_request_run(&right, "k2").await;
    // Rows due two hours ago (waiting since then), so due by either clock.
    sql_exec(
        &path,
        "UPDATE outbox SET next_attempt_at_ms = next_attempt_at_ms - 7200000",
    );
    let lease = Duration::from_secs(60);

    // It leases a row: until the store's time plus the lease, not an hour earlier.
    let first = behind.claim_due(1, claim("behind", lease)).await.unwrap();
    assert_eq!(first.rows.len(), 1);
    let now = right.clock().await.unwrap();
    assert!(
        first.rows[0].lease_until.unwrap() >= now + 59_000,
        "the lease ends {} ms from the store's time",
        first.rows[0].lease_until.unwrap() - now
    );
    // Right after, the process with the right clock does not take it.
    let second = right.claim_due(10, claim("right", lease)).await.unwrap();
    let keys: Vec<&str> = second.rows.iter().map(|r| r.run_key.as_str()).collect();
    assert_eq!(keys.len(), 1);
    assert_ne!(keys[0], first.rows[0].run_key, "the held row stays held");
    // And the one behind does not take the row the right one holds.
    assert_eq!(
        behind
            .claim_due(10, claim("behind", lease))
            .await
            .unwrap()
            .rows
            .len(),
        0
    );
}
