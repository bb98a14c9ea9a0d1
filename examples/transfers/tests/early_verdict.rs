//! A fraud-check verdict that overtakes the transfer it settles (they travel on different
//! partition keys): the `settle` worker's loader says "not yet", the worker tries it again
//! holding its place, and the verdict settles the transfer once its record is there — where it
//! used to be dead-lettered as "not found" for good.

use std::sync::Arc;
use std::time::Duration;

use effects_core::executor::{Backoff, Executor};
use effects_core::store::{SqliteStore, Store};
use effects_core::transport::{OutgoingMessage, Transport};
use effects_core::worker::{LoadWith, Worker, WorkerConfig};
use effects_core::{DatomEffect, Effects, Message};
use serde_json::json;
use transfers::load::{account_ref, transfer_ref};
use transfers::{FraudChecked, SettleHandler, TransferStatus, load};

/// Waits (bounded) until `check` holds.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_that_overtakes_its_transfer_waits_for_it() {
    let store = SqliteStore::in_memory().unwrap();
    let log = store.log();
    let executor = Arc::new(Executor::builder(store.clone(), log.clone()).build());
    // The verdict arrives first.
    log.publish(OutgoingMessage {
        id: "verdict-t1".into(),
        topic: FraudChecked::TOPIC.into(),
        partition_key: Some("t1".into()),
        headers: Default::default(),
        payload: serde_json::to_vec(&FraudChecked {
            transfer_id: "t1".into(),
            approved: true,
            reason: None,
        })
        .unwrap(),
    })
    .await
    .unwrap();
    let worker = Arc::new(
        Worker::new(Arc::clone(&executor), SettleHandler)
            .with_config(WorkerConfig {
                fetch_wait: Duration::from_millis(50),
                not_yet: Backoff {
                    initial: Duration::from_millis(20),
                    max: Duration::from_millis(50),
                    max_attempts: Some(200),
                },
                ..WorkerConfig::default()
            })
            .load_with(LoadWith::new(load::settle_input::<SqliteStore>)),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        worker.report().applied + worker.report().dead_lettered,
        0,
        "nothing to settle yet: {:?}",
        worker.report()
    );
    // Then the transfer's own run: the payer debited, the transfer held.
    executor
        .run(
            "transfer:t1",
            Effects::from(DatomEffect::assert(
                account_ref("payer"),
                [("account/balance", json!(0))],
            ))
            .merge(DatomEffect::assert(
                account_ref("payee"),
                [("account/balance", json!(0))],
            ))
            .merge(DatomEffect::assert(
                transfer_ref("t1"),
                [
                    ("transfer/from", json!("payer")),
                    ("transfer/to", json!("payee")),
                    ("transfer/amount", json!(1_500)),
                    ("transfer/status", json!(TransferStatus::Held)),
                ],
            )),
        )
        .await
        .unwrap();
    eventually("the verdict settled", Duration::from_secs(10), || {
        let log = log.clone();
        async move {
            log.unacknowledged("settle", FraudChecked::TOPIC)
                .await
                .unwrap()
                == 0
        }
    })
    .await;
    let _ = stop.send(());
    let report = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.applied, 1, "{report:?}");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    let transfer = store
        .entity(&transfer_ref("t1"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        transfer.get("transfer/status"),
        Some(&json!(TransferStatus::Completed))
    );
    let payee = store
        .entity(&account_ref("payee"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(payee.get("account/balance"), Some(&json!(1_500)));
}
