//! The card handlers through the real executor and worker, with the test harness: a temporary
//! SQLite store and log, inputs loaded from the store, redelivery, a crash after the commit, and
//! a dead letter retried once its cause is fixed. Handler calls are counted at the handler.

use std::time::Duration;

use cards::{BlockHandler, Card, CardStatus};
use effects_core::store::{DeadLetterEntry, Inspect, RetryOutcome, RetryRequest};
use effects_core::testing::harness::{Boundary, Harness, HarnessWorker};
use effects_core::worker::LoadEntity;
use effects_core::{DatomEffect, Effects, LookupRef};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The payload on `card-block-requested`.
#[derive(Debug, Deserialize, Serialize)]
struct BlockRequest {
    card_id: String,
}

fn request(card: &str) -> BlockRequest {
    BlockRequest {
        card_id: card.to_owned(),
    }
}

fn card(id: &str, status: CardStatus) -> Effects {
    Effects::from(DatomEffect::assert(
        LookupRef::new("card/id", id),
        [
            ("card/customer_id", json!("u1")),
            (
                "card/status",
                serde_json::to_value(status).expect("a status"),
            ),
        ],
    ))
}

type Block = HarnessWorker<BlockHandler, LoadEntity<BlockRequest, fn(BlockRequest) -> LookupRef>>;

fn by_card_id(r: BlockRequest) -> LookupRef {
    LookupRef::new("card/id", r.card_id)
}

fn block_worker(h: &Harness) -> Block {
    h.worker(BlockHandler)
        .load_with(LoadEntity::new(by_card_id as fn(BlockRequest) -> LookupRef))
}

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), test)
        .await
        .expect("the test did not finish in time")
}

// README: begin
#[tokio::test]
async fn blocking_a_card_writes_its_status_and_publishes_once_even_when_delivered_twice() {
    bounded(async {
        let h = Harness::new().await;
        h.seed("seed", card("c1", CardStatus::Active)).await;
        let worker = block_worker(&h);

        let (first, again) = h.deliver_twice(&worker, &request("c1")).await;
        assert!(first.is_applied(), "{first:?}");
        assert!(again.is_duplicate(), "{again:?}");
        assert_eq!(first.tx(), again.tx());
        assert_eq!(h.handler_calls("block"), 1);

        let c1: Card = h
            .entity("card/id", "c1")
            .await
            .expect("c1 exists")
            .decode()
            .expect("a card");
        assert_eq!(c1.status, CardStatus::Blocked);
        let published = h.published("card-status-changed").await;
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].key.as_deref(), Some("c1"));
        assert_eq!(
            published[0].payload,
            json!({"card_id": "c1", "customer_id": "u1", "status": "blocked"})
        );
        assert_eq!(published[0].tx, first.tx());
    })
    .await;
}
// README: end

/// The README shows the test above as it is here, so that it cannot drift from what runs.
#[test]
fn the_readme_shows_the_first_test() {
    let source = include_str!("harness.rs");
    let readme = include_str!("../../../README.md");
    let shown = source
        .split("// README: begin\n")
        .nth(1)
        .and_then(|rest| rest.split("// README: end").next())
        .expect("the markers");
    assert!(
        readme.contains(shown),
        "README.md must show, in its harness section, exactly:\n{shown}"
    );
}

#[tokio::test]
async fn a_blocked_card_is_left_alone() {
    bounded(async {
        let h = Harness::new().await;
        h.seed("seed", card("c3", CardStatus::Blocked)).await;
        let done = h.deliver(&block_worker(&h), &request("c3")).await;
        assert!(done.is_applied(), "an Empty run is applied too: {done:?}");
        let run = h
            .run("block:card-block-requested:m1")
            .await
            .expect("the run");
        assert!(run.datoms.is_empty() && run.outbox.is_empty(), "{run:?}");
        assert!(h.published("card-status-changed").await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_crash_after_the_commit_applies_nothing_twice() {
    bounded(async {
        let mut h = Harness::new().await;
        h.seed("seed", card("c1", CardStatus::Active)).await;
        h.crash_at(Boundary::AfterCommit);
        let crashed = h.deliver(&block_worker(&h), &request("c1")).await;
        assert_eq!(
            crashed,
            effects_core::testing::harness::Delivered::Crashed(Boundary::AfterCommit)
        );

        h.restart();
        let again = h.redeliver(&block_worker(&h)).await;
        assert_eq!(again.len(), 1, "{again:?}");
        assert!(again[0].is_duplicate(), "{again:?}");
        assert_eq!(h.handler_calls("block"), 1);
        assert_eq!(h.published("card-status-changed").await.len(), 1);
    })
    .await;
}

/// The checks above fail without the duplicate check: the redelivery after the crash is applied
/// as a new run and the handler is called a second time.
#[tokio::test]
async fn mutant_without_the_duplicate_check_the_crash_test_fails() {
    bounded(async {
        let mut h = Harness::builder()
            .mutant(effects_core::executor::Mutant::SkipDuplicateCheck)
            .build()
            .await;
        h.seed("seed", card("c1", CardStatus::Active)).await;
        h.crash_at(Boundary::AfterCommit);
        assert!(
            h.deliver(&block_worker(&h), &request("c1"))
                .await
                .is_crashed()
        );
        h.restart();
        let again = h.redeliver(&block_worker(&h)).await;
        assert!(again[0].is_applied(), "{again:?}");
        assert_eq!(h.handler_calls("block"), 2);
    })
    .await;
}

#[tokio::test]
async fn a_crash_before_the_commit_leaves_the_run_to_the_redelivery() {
    bounded(async {
        let mut h = Harness::new().await;
        h.seed("seed", card("c1", CardStatus::Active)).await;
        h.crash_at(Boundary::BeforeCommit);
        let crashed = h.deliver(&block_worker(&h), &request("c1")).await;
        assert!(crashed.is_crashed(), "{crashed:?}");
        assert!(h.run("block:card-block-requested:m1").await.is_none());

        h.restart();
        let again = h.redeliver(&block_worker(&h)).await;
        assert!(again.iter().any(|d| d.is_applied()), "{again:?}");
        assert_eq!(
            h.handler_calls("block"),
            2,
            "called again: nothing was written"
        );
        assert_eq!(h.published("card-status-changed").await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_request_for_an_unknown_card_is_dead_lettered_and_retried_once_the_card_exists() {
    bounded(async {
        let h = Harness::new().await;
        let worker = block_worker(&h);
        let missing = h.deliver(&worker, &request("c9")).await;
        assert!(missing.is_dead_lettered(), "{missing:?}");
        let dead = h.dead_letters().await;
        let [DeadLetterEntry::Input(letter)] = dead.as_slice() else {
            panic!("one dead input: {dead:?}");
        };
        assert!(
            letter.reason.contains("[card/id \"c9\"] was not found"),
            "{}",
            letter.reason
        );

        h.seed("seed", card("c9", CardStatus::Active)).await;
        let retried = h
            .store()
            .retry_dead_letter(
                &dead[0].id(),
                &RetryRequest {
                    operator: "ana".into(),
                    reason: "card c9 was imported".into(),
                },
            )
            .await
            .expect("the store");
        assert!(matches!(retried, RetryOutcome::Retried(_)), "{retried:?}");
        let again = h.redeliver(&worker).await;
        assert_eq!(again.len(), 1);
        assert!(again[0].is_applied(), "{again:?}");
        assert_eq!(h.published("card-status-changed").await.len(), 1);
    })
    .await;
}
