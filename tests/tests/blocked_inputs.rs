//! Blocked inputs in the store, on every store: what workers report with
//! [`Store::report_blocked`] is what operators read with [`Inspect::blocked_inputs`] (and the
//! backlog's gauges) — a report replaces the last of its owner, consumer and topic and leaves the
//! others alone, an empty one clears it, any text is kept, and a dead owner's reports go when it
//! is reaped. Each case runs unchanged against the SQLite store (always) and the PostgreSQL store
//! (feature `postgres`), in a database of its own; rows are counted at the source with raw SQL.
//!
//! The worker's side, end to end through the `effects` binary, is in
//! `effects-cli/tests/blocked.rs`.

mod backends;
mod support;

use std::time::Duration;

use backends::Backend;
use effects_core::store::{BlockedInput, BlockedInputEntry, Inspect, Reaped, Store};

/// Declares each case once and runs it on every backend: `sqlite::<case>` always,
/// `postgres::<case>` with the `postgres` feature.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = crate::backends::Sqlite::create(stringify!($case)).await;
                    crate::backends::run_case(backend, super::$case).await;
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
    a_report_replaces_the_last_and_an_empty_one_clears_it,
    any_text_is_kept_with_nul_escaped,
    a_dead_owners_reports_go_when_it_is_reaped,
);

fn input(
    key: Option<&str>,
    id: &str,
    failing_secs: u64,
    attempts: u32,
    reason: &str,
) -> BlockedInput {
    BlockedInput {
        partition_key: key.map(str::to_owned),
        message_id: id.to_owned(),
        failing_for: Duration::from_secs(failing_secs),
        attempts,
        reason: reason.to_owned(),
    }
}

fn ids(listed: &[BlockedInputEntry]) -> Vec<&str> {
    listed.iter().map(|b| b.message_id.as_str()).collect()
}

fn find<'a>(listed: &'a [BlockedInputEntry], id: &str) -> &'a BlockedInputEntry {
    listed
        .iter()
        .find(|b| b.message_id == id)
        .unwrap_or_else(|| panic!("{id} is not listed: {listed:?}"))
}

/// A report replaces the rows of its (owner, consumer, topic), and only those; an empty report
/// deletes them. Times are the store's clock, less how long the worker saw the input failing;
/// the longest failing come first; the backlog counts them.
async fn a_report_replaces_the_last_and_an_empty_one_clears_it<B: Backend>(b: B)
where
    B::Store: Inspect,
{
    let store = b.open().await;
    let before = store.clock().await.unwrap();
    store
        .report_blocked(
            "w1",
            "block",
            "cards",
            vec![
                input(Some("c1"), "m1", 60, 7, "the database is down"),
                input(None, "m2", 45, 3, "not yet: [card/id \"c2\"]"),
            ],
        )
        .await
        .unwrap();
    store
        .report_blocked(
            "w1",
            "block",
            "other",
            vec![input(Some("o1"), "x1", 10, 1, "r")],
        )
        .await
        .unwrap();
    store
        .report_blocked(
            "w1",
            "audit",
            "cards",
            vec![input(Some("c1"), "a1", 5, 1, "r")],
        )
        .await
        .unwrap();
    store
        .report_blocked(
            "w2",
            "block",
            "cards",
            vec![input(Some("c9"), "m9", 20, 2, "r2")],
        )
        .await
        .unwrap();
    let after = store.clock().await.unwrap();
    assert_eq!(b.count("SELECT COUNT(*) FROM blocked_inputs").await, 5);

    let listed = store.blocked_inputs(100).await.unwrap();
    assert_eq!(
        ids(&listed),
        ["m1", "m2", "m9", "x1", "a1"],
        "longest failing first"
    );
    let m1 = find(&listed, "m1");
    assert_eq!(
        (
            m1.consumer.as_str(),
            m1.topic.as_str(),
            m1.partition_key.as_deref(),
            m1.attempts,
            m1.reason.as_str(),
            m1.owner.as_str()
        ),
        (
            "block",
            "cards",
            Some("c1"),
            7,
            "the database is down",
            "w1"
        )
    );
    assert!(
        (before - 60_000..=after - 60_000).contains(&m1.since),
        "since {} is the store's time of the report less 60 s ({before}..{after})",
        m1.since
    );
    assert!((before..=after).contains(&m1.reported_at), "{m1:?}");
    assert_eq!(find(&listed, "m2").partition_key, None);
    assert_eq!(ids(&store.blocked_inputs(2).await.unwrap()), ["m1", "m2"]);
    let backlog = store.backlog().await.unwrap();
    assert_eq!(
        (backlog.blocked_inputs, backlog.oldest_blocked_since),
        (5, Some(m1.since))
    );
    // Another process reads the same.
    assert_eq!(b.open().await.blocked_inputs(100).await.unwrap(), listed);

    // The next report of (w1, block, cards) replaces both of its rows, and nothing else.
    store
        .report_blocked(
            "w1",
            "block",
            "cards",
            vec![input(Some("c1"), "m1", 61, 8, "the database is still down")],
        )
        .await
        .unwrap();
    let listed = store.blocked_inputs(100).await.unwrap();
    assert_eq!(ids(&listed), ["m1", "m9", "x1", "a1"]);
    let m1 = find(&listed, "m1");
    assert_eq!(
        (m1.attempts, m1.reason.as_str()),
        (8, "the database is still down")
    );
    assert_eq!(b.count("SELECT COUNT(*) FROM blocked_inputs").await, 4);

    // An empty report clears (w1, block, cards), and nothing else.
    store
        .report_blocked("w1", "block", "cards", Vec::new())
        .await
        .unwrap();
    assert_eq!(
        ids(&store.blocked_inputs(100).await.unwrap()),
        ["m9", "x1", "a1"]
    );
    assert_eq!(b.count("SELECT COUNT(*) FROM blocked_inputs").await, 3);
    store
        .report_blocked("w3", "block", "cards", Vec::new())
        .await
        .unwrap();
    assert_eq!(b.count("SELECT COUNT(*) FROM blocked_inputs").await, 3);
    for (owner, consumer, topic) in [
        ("w1", "block", "other"),
        ("w1", "audit", "cards"),
        ("w2", "block", "cards"),
    ] {
        store
            .report_blocked(owner, consumer, topic, Vec::new())
            .await
            .unwrap();
    }
    assert!(store.blocked_inputs(100).await.unwrap().is_empty());
    assert_eq!(b.count("SELECT COUNT(*) FROM blocked_inputs").await, 0);
    let backlog = store.backlog().await.unwrap();
    assert_eq!(
        (backlog.blocked_inputs, backlog.oldest_blocked_since),
        (0, None)
    );
}

/// Reasons (and keys, ids, names) may hold any text: quotes, SQL, newlines, control
/// characters, and NUL, which PostgreSQL refuses in `text` and every store writes `\u{0}`.
async fn any_text_is_kept_with_nul_escaped<B: Backend>(b: B)
where
    B::Store: Inspect,
{
    let store = b.open().await;
    let odd =
        "line 1\nline 2\t'quoted' \"double\" \\ ; DROP TABLE blocked_inputs; -- \u{1}\u{7f}😀";
    let with_nul = format!("{odd} a\0b\0");
    store
        .report_blocked(
            "w1",
            "con\0sumer",
            "to\0pic",
            vec![input(Some("k\0ey"), "m\u{0}1", 30, 1, &with_nul)],
        )
        .await
        .unwrap();
    let listed = store.blocked_inputs(10).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let b0 = &listed[0];
    assert_eq!(b0.reason, format!("{odd} a\\u{{0}}b\\u{{0}}"));
    assert_eq!(b0.partition_key.as_deref(), Some("k\\u{0}ey"));
    assert_eq!(b0.message_id, "m\\u{0}1");
    assert_eq!(b0.consumer, "con\\u{0}sumer");
    assert_eq!(b0.topic, "to\\u{0}pic");
    // The same names find the same rows again: an empty report clears them.
    store
        .report_blocked("w1", "con\0sumer", "to\0pic", Vec::new())
        .await
        .unwrap();
    assert_eq!(b.count("SELECT COUNT(*) FROM blocked_inputs").await, 0);
}

/// A report registers its owner (nothing else registers these), so when its process dies —
/// here, its last store handle is dropped — the reaper deletes its reports with it, in the same
/// transaction; a live owner's reports stay.
async fn a_dead_owners_reports_go_when_it_is_reaped<B: Backend>(b: B)
where
    B::Store: Inspect,
{
    let reaper = b.open().await;
    let doomed = b.open().await;
    let alive = b.open().await;
    doomed
        .report_blocked(
            "doomed",
            "block",
            "cards",
            vec![input(Some("c1"), "m1", 60, 9, "down")],
        )
        .await
        .unwrap();
    alive
        .report_blocked(
            "alive",
            "block",
            "cards",
            vec![input(Some("c2"), "m2", 30, 4, "down")],
        )
        .await
        .unwrap();
    assert_eq!(
        b.count("SELECT COUNT(*) FROM owners WHERE owner IN ('doomed', 'alive')")
            .await,
        2,
        "a report registers its owner"
    );
    assert_eq!(reaper.reap_dead_owners().await.unwrap(), Reaped::default());
    assert_eq!(ids(&reaper.blocked_inputs(10).await.unwrap()), ["m1", "m2"]);

    drop(doomed);
    // Bounded: the lock is released when the handle goes; the server notices in milliseconds.
    let mut reaped = Reaped::default();
    for _ in 0..100 {
        reaped = reaper.reap_dead_owners().await.unwrap();
        if !reaped.owners.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reaped.owners, ["doomed"]);
    assert_eq!(ids(&reaper.blocked_inputs(10).await.unwrap()), ["m2"]);
    assert_eq!(
        b.count("SELECT COUNT(*) FROM blocked_inputs WHERE owner = 'doomed'")
            .await,
        0
    );
    assert_eq!(reaper.reap_dead_owners().await.unwrap(), Reaped::default());
    assert_eq!(b.count("SELECT COUNT(*) FROM blocked_inputs").await, 1);
    drop(alive);
}
