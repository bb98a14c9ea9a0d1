//! What retrying a dead letter does, for each kind, on a real store through the real executor
//! (the harness): a request is sent again under its idempotency key and its new outcome
//! recorded; a message is published again under its id; an input is delivered again to its
//! consumer only, under its message id. Counted at the source: requests the HTTP server
//! received, handler calls, deliveries each consumer was handed. The cases of requests,
//! messages and pruning are shared with the PostgreSQL store (`common/inspect_cases.rs`).

#[path = "common/inspect_cases.rs"]
mod cases;

use std::time::Duration;

use cases::{ana, card};
use effects_core::store::{
    DeadLetterEntry, DeadLetterId, DeadLetterKind, Inspect, PruneOlderThan, RetryOutcome,
    SqliteStore, Store,
};
use effects_core::testing::harness::{Harness, HarnessExecutor};
use effects_core::transport::{FetchRequest, SqliteLog, Transport};
use effects_core::worker::LoadEntity;
use effects_core::{Datom, LookupRef, Message, MessageEffect, effect_handler, effects};
use serde::{Deserialize, Serialize};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, test)
        .await
        .expect("the test did not finish in time")
}

impl cases::Fixture for Harness {
    type Store = SqliteStore;

    fn executor(&self) -> &HarnessExecutor {
        Harness::executor(self).as_ref()
    }

    fn server(&self) -> &wiremock::MockServer {
        Harness::server(self)
    }

    fn log(&self) -> SqliteLog {
        Harness::log(self)
    }

    async fn settle(&self) -> usize {
        Harness::settle(self).await.progress.requests_sent
    }
}

#[tokio::test]
async fn a_rejected_request_is_sent_again_under_its_key_and_its_new_outcome_recorded() {
    bounded(async {
        let h = Harness::builder().endpoint("ledger").build().await;
        cases::a_rejected_request_is_sent_again(&h).await;
    })
    .await;
}

#[tokio::test]
async fn a_request_whose_outcome_an_after_requests_hook_used_is_not_retried() {
    bounded(async {
        let h = Harness::builder()
            .endpoint("ledger")
            .after_requests("notify", |recorded| {
                vec![MessageEffect::new(
                    "ledger-results",
                    json!({"ok": recorded.iter().all(|r| r.outcome.is_success())}),
                )]
            })
            .build()
            .await;
        cases::a_request_an_after_requests_hook_used_is_not_retried(&h).await;
    })
    .await;
}

#[tokio::test]
async fn a_dead_lettered_message_is_published_again_under_its_id() {
    bounded(async {
        let h = Harness::builder().endpoint("ledger").build().await;
        cases::a_dead_lettered_message_is_published_again(&h).await;
    })
    .await;
}

// -----------------------------------------------------------------------------------------------
// Inputs: a worker that loads a card, and a card that does not exist yet.

#[derive(Debug, Deserialize, Serialize)]
struct Card {
    id: String,
}

#[derive(Debug, Deserialize, Serialize)]
struct BlockRequest {
    card_id: String,
}

#[derive(Datom)]
#[datom(entity = "card")]
struct BlockedCard {
    #[datom(id)]
    id: String,
    status: String,
}

#[derive(Serialize, Message)]
#[message(topic = "card-status-changed")]
struct StatusChanged {
    #[message(key)]
    card_id: String,
}

effects! {
    /// Blocking one card.
    BlockCard { datoms: [one BlockedCard], messages: [one StatusChanged] }
}

#[effect_handler(topic = "card-block-requested")]
fn block(card: &Card) -> effects![BlockCard] {
    BlockCard::builder()
        .blocked_card(BlockedCard {
            id: card.id.clone(),
            status: "blocked".into(),
        })
        .status_changed(StatusChanged {
            card_id: card.id.clone(),
        })
        .build()
        .into()
}

/// What the consumer `audit` of the topic is handed now (and acknowledges).
async fn audit(h: &Harness) -> Vec<String> {
    let log = h.log();
    let got = log
        .fetch(FetchRequest {
            consumer: "audit".into(),
            topic: "card-block-requested".into(),
            max: 100,
            visibility: Duration::from_secs(60),
            wait: Duration::from_millis(50),
        })
        .await
        .unwrap();
    for d in &got {
        log.ack(d).await.unwrap();
    }
    got.into_iter().map(|d| d.message_id).collect()
}

async fn input_retry(prune_first: bool) {
    let h = Harness::new().await;
    let worker = h
        .worker(BlockHandler)
        .load_with(LoadEntity::new(|r: BlockRequest| {
            LookupRef::new("card/id", r.card_id)
        }));
    h.seed("seed:c2", card("c2")).await;
    let missing = h
        .deliver_message(&worker, "m1", br#"{"card_id": "c1"}"#)
        .await;
    assert!(missing.is_dead_lettered(), "{missing:?}");
    let after = h
        .deliver_message(&worker, "m2", br#"{"card_id": "c2"}"#)
        .await;
    assert!(after.is_applied(), "{after:?}");
    assert_eq!(audit(&h).await, ["m1", "m2"]);
    if prune_first {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let pruned = h
            .store()
            .prune(PruneOlderThan {
                log_published: Some(Duration::ZERO),
                ..PruneOlderThan::default()
            })
            .await
            .unwrap();
        assert_eq!(pruned.log_messages, 2, "every consumer acknowledged both");
    }

    let dead = h.dead_letters().await;
    let [DeadLetterEntry::Input(letter)] = dead.as_slice() else {
        panic!("one input dead letter: {dead:?}");
    };
    assert_eq!(letter.message_id, "m1");
    assert!(letter.reason.contains("was not found"), "{}", letter.reason);
    // The card exists now: the operator retries.
    h.seed("seed:c1", card("c1")).await;
    let id = dead[0].id();
    assert_eq!(id.to_string(), format!("input:{}:block", letter.sequence));
    let RetryOutcome::Retried(record) = h.store().retry_dead_letter(&id, &ana()).await.unwrap()
    else {
        panic!("not retried");
    };
    assert_eq!(record.kind, DeadLetterKind::Input);
    assert!(h.dead_letters().await.is_empty());

    // Only m1 comes back, only to `block`, under its id: the run's key is the message's.
    let again = h.redeliver(&worker).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(again[0].is_applied(), "{again:?}");
    assert!(h.run("block:card-block-requested:m1").await.is_some());
    assert_eq!(
        h.handler_calls("block"),
        2,
        "m2 once, m1 once after the retry"
    );
    assert!(
        audit(&h).await.is_empty(),
        "the other consumer does not see it again"
    );
    assert!(h.redeliver(&worker).await.is_empty());
    assert_eq!(
        h.store().retry_dead_letter(&id, &ana()).await.unwrap(),
        RetryOutcome::NotDeadLettered
    );
}

/// The checks of `input_retry` fail against a naive retry that publishes the input again under
/// a new id: the other consumer sees it again, and the worker applies it under a new key.
#[tokio::test]
async fn mutant_a_naive_republish_fails_the_input_retry_checks() {
    bounded(async {
        let h = Harness::new().await;
        let worker = h
            .worker(BlockHandler)
            .load_with(LoadEntity::new(|r: BlockRequest| {
                LookupRef::new("card/id", r.card_id)
            }));
        let missing = h
            .deliver_message(&worker, "m1", br#"{"card_id": "c1"}"#)
            .await;
        assert!(missing.is_dead_lettered());
        assert_eq!(audit(&h).await, ["m1"]);
        h.seed("seed:c1", card("c1")).await;
        let DeadLetterId::Input { consumer, sequence } = h.dead_letters().await[0].id() else {
            panic!("an input dead letter");
        };
        assert!(
            h.store()
                .mutant_retry_input_republished(&consumer, sequence)
                .await
                .unwrap()
        );
        let again = h.redeliver(&worker).await;
        assert!(again[0].is_applied(), "{again:?}");
        assert!(
            h.run("block:card-block-requested:m1").await.is_none(),
            "the run's key is not the message's: the check on it fails"
        );
        assert_eq!(
            audit(&h).await.len(),
            1,
            "the other consumer sees it again: the check on it fails"
        );
    })
    .await;
}

#[tokio::test]
async fn a_dead_lettered_input_is_delivered_again_to_its_consumer_only() {
    bounded(input_retry(false)).await;
}

#[tokio::test]
async fn a_dead_lettered_input_pruned_from_the_log_is_appended_again_for_its_consumer_only() {
    bounded(input_retry(true)).await;
}

#[tokio::test]
async fn a_prune_preview_counts_what_a_prune_removes() {
    bounded(async {
        let h = Harness::new().await;
        cases::a_prune_preview_counts_what_a_prune_removes(&h).await;
    })
    .await;
}
