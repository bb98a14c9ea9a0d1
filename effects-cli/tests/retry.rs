//! What retrying a dead letter does, for each kind, on a real store through the real executor
//! (the harness): a request is sent again under its idempotency key and its new outcome
//! recorded; a message is published again under its id; an input is delivered again to its
//! consumer only, under its message id. Counted at the source: requests the HTTP server
//! received, handler calls, deliveries each consumer was handed.

use std::time::Duration;

use effects_core::store::{
    DeadLetterEntry, DeadLetterId, DeadLetterKind, Inspect, PruneOlderThan, RequestOutcome,
    RetryOutcome, RetryRequest, RunStatus, Store,
};
use effects_core::testing::harness::Harness;
use effects_core::transport::{FetchRequest, Transport};
use effects_core::worker::LoadEntity;
use effects_core::{
    Datom, DatomEffect, Effects, LookupRef, Message, MessageEffect, Method, RequestEffect,
    effect_handler, effects,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

const TIMEOUT: Duration = Duration::from_secs(30);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, test)
        .await
        .expect("the test did not finish in time")
}

fn ana() -> RetryRequest {
    RetryRequest {
        operator: "ana".to_owned(),
        reason: "the ledger accepts it now".to_owned(),
    }
}

fn ledger_entry() -> Effects {
    Effects::from(
        RequestEffect::new(Method::Post, "ledger", "/entries").with_body(json!({"amount": 5})),
    )
}

async fn idempotency_keys(h: &Harness) -> Vec<String> {
    h.server()
        .received_requests()
        .await
        .expect("recording is on")
        .iter()
        .map(|r| {
            r.headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_rejected_request_is_sent_again_under_its_key_and_its_new_outcome_recorded() {
    bounded(async {
        let h = Harness::builder().endpoint("ledger").build().await;
        Mock::given(method("POST"))
            .and(path("/entries"))
            .respond_with(ResponseTemplate::new(422).set_body_json(json!({"error": "closed"})))
            .up_to_n_times(1)
            .mount(h.server())
            .await;
        Mock::given(method("POST"))
            .and(path("/entries"))
            .respond_with(ResponseTemplate::new(201).set_body_json(json!({"entry": 7})))
            .mount(h.server())
            .await;
        let outcome = h.executor().run("post:1", ledger_entry()).await.unwrap();
        assert_eq!(outcome.progress().dead_lettered, 1);

        let dead = h.dead_letters().await;
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].id(), DeadLetterId::Outbox("post:1#0".into()));
        assert_eq!(dead[0].kind(), DeadLetterKind::Request);
        assert_eq!(dead[0].reason(), "rejected with status 422");

        let RetryOutcome::Retried(record) = h
            .store()
            .retry_dead_letter(&dead[0].id(), &ana())
            .await
            .unwrap()
        else {
            panic!("not retried");
        };
        assert_eq!(record.operator, "ana");
        assert_eq!(record.dead_letter_reason, "rejected with status 422");
        assert!(matches!(
            record.previous_outcome,
            Some(RequestOutcome::Rejected { ref response }) if response.status == 422
        ));
        let run = h.store().run("post:1").await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::RequestsPending);
        assert!(h.dead_letters().await.is_empty());

        let settled = h.settle().await;
        assert_eq!(settled.progress.requests_sent, 1);
        let detail = h.run("post:1").await.unwrap();
        assert_eq!(detail.run.status, RunStatus::Done);
        let recorded = detail.outbox[0].recorded.as_ref().unwrap();
        assert!(
            matches!(&recorded.outcome, RequestOutcome::Response { response } if response.status == 201),
            "{recorded:?}"
        );
        assert_eq!(detail.outbox[0].retries, std::slice::from_ref(&record));
        // Counted at the server: the request went out twice, under one key.
        assert_eq!(idempotency_keys(&h).await, ["post:1#0", "post:1#0"]);

        // Once retried it is not a dead letter any more.
        assert_eq!(
            h.store()
                .retry_dead_letter(&dead[0].id(), &ana())
                .await
                .unwrap(),
            RetryOutcome::NotDeadLettered
        );
        assert_eq!(h.store().retries(10).await.unwrap(), [record]);
        assert_eq!(
            h.store()
                .retry_dead_letter(&DeadLetterId::Outbox("nope#0".into()), &ana())
                .await
                .unwrap(),
            RetryOutcome::NotFound
        );
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
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(409))
            .mount(h.server())
            .await;
        h.executor()
            .run_with(
                "post:2",
                ledger_entry(),
                effects_core::executor::RunOptions::after_requests("notify"),
            )
            .await
            .unwrap();
        assert_eq!(
            h.published("ledger-results").await[0].payload,
            json!({"ok": false})
        );
        let id = DeadLetterId::Outbox("post:2#0".into());
        let RetryOutcome::Refused { reason } =
            h.store().retry_dead_letter(&id, &ana()).await.unwrap()
        else {
            panic!("a retry after the hook ran must be refused");
        };
        assert!(reason.contains("after-requests hook `notify`"), "{reason}");
        assert_eq!(h.dead_letters().await.len(), 1, "nothing changed");
        assert!(h.store().retries(10).await.unwrap().is_empty());
        h.settle().await;
        assert_eq!(idempotency_keys(&h).await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_dead_lettered_message_is_published_again_under_its_id() {
    bounded(async {
        let h = Harness::builder().endpoint("ledger").build().await;
        // The request fails for now: the run's message waits for it.
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(503))
            .up_to_n_times(2)
            .mount(h.server())
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(201))
            .mount(h.server())
            .await;
        let effects = ledger_entry().merge(MessageEffect::new("entries", json!({"n": 1})));
        h.executor().run("post:3", effects).await.unwrap();
        // An operator gives up on the message while it waits.
        assert!(
            h.store()
                .dead_letter("post:3#1", "not wanted any more", None)
                .await
                .unwrap()
        );
        h.settle().await;
        assert!(h.published("entries").await.is_empty());
        assert_eq!(
            h.store().run("post:3").await.unwrap().unwrap().status,
            RunStatus::Done
        );

        let id = DeadLetterId::Outbox("post:3#1".into());
        let RetryOutcome::Retried(record) = h.store().retry_dead_letter(&id, &ana()).await.unwrap()
        else {
            panic!("not retried");
        };
        assert_eq!(record.kind, DeadLetterKind::Message);
        assert_eq!(
            h.store().run("post:3").await.unwrap().unwrap().status,
            RunStatus::MessagesPending
        );
        h.settle().await;
        let published = h.published("entries").await;
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].id, "post:3#1");
        assert_eq!(published[0].run_key.as_deref(), Some("post:3"));
        assert_eq!(
            h.store().run("post:3").await.unwrap().unwrap().status,
            RunStatus::Done
        );
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

fn card(id: &str) -> Effects {
    Effects::from(DatomEffect::assert(
        LookupRef::new("card/id", id),
        [("card/status", json!("active"))],
    ))
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
        for i in 0..3 {
            h.seed(
                &format!("seed:{i}"),
                card(&format!("c{i}")).merge(MessageEffect::new("cards", json!({"i": i}))),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let all = PruneOlderThan {
            outbox_dispatched: Some(Duration::ZERO),
            runs_completed: Some(Duration::ZERO),
            log_published: Some(Duration::ZERO),
        };
        let preview = h.store().prune_preview(all).await.unwrap();
        assert_eq!((preview.outbox_rows, preview.runs), (3, 3));
        // Nobody consumes `cards`: its messages are kept.
        assert_eq!(preview.log_messages, 0);
        let pruned = h.store().prune(all).await.unwrap();
        assert_eq!(preview, pruned);
        assert_eq!(
            h.store().prune_preview(all).await.unwrap(),
            Default::default()
        );
    })
    .await;
}
