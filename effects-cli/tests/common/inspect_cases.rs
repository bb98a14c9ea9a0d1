//! The cases of [`Inspect`] that every store must pass, written once against a [`Fixture`]: a
//! real executor on a store, its messages in a SQLite log, HTTP endpoint `ledger` on a wiremock
//! server. `retry.rs` runs them on SQLite (the test harness), `postgres.rs` on PostgreSQL.
//! Counted at the source: requests the HTTP server received, messages the log holds.

use std::future::Future;
use std::time::Duration;

use effects_core::executor::{Executor, RunOptions};
use effects_core::http::ReqwestClient;
use effects_core::store::{
    DeadLetterId, DeadLetterKind, Inspect, PruneOlderThan, RequestOutcome, RetryOutcome,
    RetryRequest, RunQuery, RunState, RunStatus, Store,
};
use effects_core::transport::SqliteLog;
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect, Method, RequestEffect};
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A store with an executor, an HTTP server and a log, as a case needs them.
pub(crate) trait Fixture {
    /// The store.
    type Store: Store + Inspect + Clone;

    /// The executor, with the after-requests hook `notify` (a message to `ledger-results`
    /// saying whether every request succeeded) when the fixture was made for it.
    fn executor(&self) -> &Executor<Self::Store, SqliteLog, ReqwestClient>;

    /// The HTTP server behind the endpoint `ledger`.
    fn server(&self) -> &MockServer;

    /// The log the executor publishes to.
    fn log(&self) -> SqliteLog;

    /// Relay rounds until no outbox row is pending (or a bounded wait); the requests sent.
    fn settle(&self) -> impl Future<Output = usize>;
}

/// The store of a fixture.
fn store<F: Fixture>(f: &F) -> &F::Store {
    f.executor().store()
}

pub(crate) fn ana() -> RetryRequest {
    RetryRequest {
        operator: "ana".to_owned(),
        reason: "the ledger accepts it now".to_owned(),
    }
}

pub(crate) fn ledger_entry() -> Effects {
    Effects::from(
        RequestEffect::new(Method::Post, "ledger", "/entries").with_body(json!({"amount": 5})),
    )
}

pub(crate) fn card(id: &str) -> Effects {
    Effects::from(DatomEffect::assert(
        LookupRef::new("card/id", id),
        [("card/status", json!("active"))],
    ))
}

/// The message ids the log holds on `topic`, in order.
pub(crate) async fn published<F: Fixture>(f: &F, topic: &str) -> Vec<String> {
    f.log()
        .messages(topic)
        .await
        .expect("the log")
        .into_iter()
        .map(|m| m.message_id)
        .collect()
}

/// The `Idempotency-Key` of every request the server received, in order.
pub(crate) async fn idempotency_keys<F: Fixture>(f: &F) -> Vec<String> {
    f.server()
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

/// A rejected request is sent again under its key and its new outcome recorded; the retry is
/// recorded, listed with the row, and not done twice.
pub(crate) async fn a_rejected_request_is_sent_again<F: Fixture>(f: &F) {
    let s = store(f);
    Mock::given(method("POST"))
        .and(path("/entries"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({"error": "closed"})))
        .up_to_n_times(1)
        .mount(f.server())
        .await;
    Mock::given(method("POST"))
        .and(path("/entries"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"entry": 7})))
        .mount(f.server())
        .await;
    let outcome = f.executor().run("post:1", ledger_entry()).await.unwrap();
    assert_eq!(outcome.progress().dead_lettered, 1);

    let dead = s.dead_letters(usize::MAX).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id(), DeadLetterId::Outbox("post:1#0".into()));
    assert_eq!(dead[0].kind(), DeadLetterKind::Request);
    assert_eq!(dead[0].reason(), "rejected with status 422");
    let listed = s
        .runs(RunQuery {
            state: Some(RunState::DeadLettered),
            ..RunQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].run.key.as_str(), listed[0].dead_lettered),
        ("post:1", 1)
    );
    let backlog = Inspect::backlog(s).await.unwrap();
    assert_eq!((backlog.dead_lettered_rows, backlog.pending_rows), (1, 0));

    let RetryOutcome::Retried(record) = s.retry_dead_letter(&dead[0].id(), &ana()).await.unwrap()
    else {
        panic!("not retried");
    };
    assert_eq!(record.operator, "ana");
    assert_eq!(record.kind, DeadLetterKind::Request);
    assert_eq!(record.run_key.as_deref(), Some("post:1"));
    assert_eq!(record.dead_letter_reason, "rejected with status 422");
    assert!(matches!(
        record.previous_outcome,
        Some(RequestOutcome::Rejected { ref response }) if response.status == 422
    ));
    // The record's time is the store's clock.
    let clock = s.clock().await.unwrap();
    assert!(record.retried_at <= clock && clock - record.retried_at < 10_000);
    let run = s.run("post:1").await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::RequestsPending);
    assert!(s.dead_letters(usize::MAX).await.unwrap().is_empty());

    assert_eq!(f.settle().await, 1);
    let detail = s.run_detail("post:1").await.unwrap().unwrap();
    assert_eq!(detail.run.status, RunStatus::Done);
    let recorded = detail.outbox[0].recorded.as_ref().unwrap();
    assert!(
        matches!(&recorded.outcome, RequestOutcome::Response { response } if response.status == 201),
        "{recorded:?}"
    );
    assert_eq!(detail.outbox[0].retries, std::slice::from_ref(&record));
    // Counted at the server: the request went out twice, under one key.
    assert_eq!(idempotency_keys(f).await, ["post:1#0", "post:1#0"]);

    // Once retried it is not a dead letter any more.
    assert_eq!(
        s.retry_dead_letter(&dead[0].id(), &ana()).await.unwrap(),
        RetryOutcome::NotDeadLettered
    );
    assert_eq!(s.retries(10).await.unwrap(), [record]);
    assert_eq!(
        s.retry_dead_letter(&DeadLetterId::Outbox("nope#0".into()), &ana())
            .await
            .unwrap(),
        RetryOutcome::NotFound
    );
}

/// A request whose outcome an after-requests hook used is not retried. The fixture has the
/// hook `notify`.
pub(crate) async fn a_request_an_after_requests_hook_used_is_not_retried<F: Fixture>(f: &F) {
    let s = store(f);
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(409))
        .mount(f.server())
        .await;
    f.executor()
        .run_with(
            "post:2",
            ledger_entry(),
            RunOptions::after_requests("notify"),
        )
        .await
        .unwrap();
    f.settle().await;
    assert_eq!(published(f, "ledger-results").await, ["post:2#1"]);
    let id = DeadLetterId::Outbox("post:2#0".into());
    let RetryOutcome::Refused { reason } = s.retry_dead_letter(&id, &ana()).await.unwrap() else {
        panic!("a retry after the hook ran must be refused");
    };
    assert!(reason.contains("after-requests hook `notify`"), "{reason}");
    assert_eq!(
        s.dead_letters(usize::MAX).await.unwrap().len(),
        1,
        "nothing changed"
    );
    assert!(s.retries(10).await.unwrap().is_empty());
    f.settle().await;
    assert_eq!(idempotency_keys(f).await.len(), 1);
}

/// A message dead-lettered while it waited for its run's requests is published again under
/// its id once retried, and the run completes again.
pub(crate) async fn a_dead_lettered_message_is_published_again<F: Fixture>(f: &F) {
    let s = store(f);
    // The request fails for now: the run's message waits for it.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .mount(f.server())
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201))
        .mount(f.server())
        .await;
    let effects = ledger_entry().merge(MessageEffect::new("entries", json!({"n": 1})));
    f.executor().run("post:3", effects).await.unwrap();
    let pending = s.pending(10).await.unwrap();
    let waiting = pending
        .iter()
        .find(|e| e.row.id == "post:3#1")
        .expect("pending");
    assert!(!waiting.ready, "{waiting:?}");
    // An operator gives up on the message while it waits.
    assert!(
        s.dead_letter("post:3#1", "not wanted any more", None)
            .await
            .unwrap()
    );
    f.settle().await;
    assert!(published(f, "entries").await.is_empty());
    assert_eq!(
        s.run("post:3").await.unwrap().unwrap().status,
        RunStatus::Done
    );

    let id = DeadLetterId::Outbox("post:3#1".into());
    let RetryOutcome::Retried(record) = s.retry_dead_letter(&id, &ana()).await.unwrap() else {
        panic!("not retried");
    };
    assert_eq!(record.kind, DeadLetterKind::Message);
    assert_eq!(
        s.run("post:3").await.unwrap().unwrap().status,
        RunStatus::MessagesPending
    );
    // It got its turn in the ready order.
    let pending = s.pending(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert!(pending[0].ready, "{:?}", pending[0]);
    assert_eq!(pending[0].retries, std::slice::from_ref(&record));
    f.settle().await;
    assert_eq!(published(f, "entries").await, ["post:3#1"]);
    assert_eq!(
        s.run("post:3").await.unwrap().unwrap().status,
        RunStatus::Done
    );
}

/// A prune preview counts what a prune then removes, and removes nothing itself.
pub(crate) async fn a_prune_preview_counts_what_a_prune_removes<F: Fixture>(f: &F) {
    let s = store(f);
    for i in 0..3 {
        f.executor()
            .run(
                format!("seed:{i}"),
                card(&format!("c{i}")).merge(MessageEffect::new("cards", json!({"i": i}))),
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let all = PruneOlderThan {
        outbox_dispatched: Some(Duration::ZERO),
        runs_completed: Some(Duration::ZERO),
        log_published: Some(Duration::ZERO),
    };
    let preview = s.prune_preview(all).await.unwrap();
    assert_eq!((preview.outbox_rows, preview.runs), (3, 3));
    // Nobody consumes `cards`: its messages are kept (a store without a log has none).
    assert_eq!(preview.log_messages, 0);
    let only_rows = s
        .prune_preview(PruneOlderThan {
            outbox_dispatched: Some(Duration::ZERO),
            ..PruneOlderThan::default()
        })
        .await
        .unwrap();
    assert_eq!((only_rows.outbox_rows, only_rows.runs), (3, 0));
    assert_eq!(
        Inspect::backlog(s).await.unwrap().open_runs,
        0,
        "the previews removed nothing and changed nothing"
    );
    assert_eq!(
        s.run_detail("seed:0").await.unwrap().unwrap().outbox.len(),
        1
    );
    let pruned = s.prune(all).await.unwrap();
    assert_eq!(preview, pruned);
    assert_eq!(s.prune_preview(all).await.unwrap(), Default::default());
}
