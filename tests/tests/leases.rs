//! Leases that fence: a claimant working longer than its lease renews it as it goes, so no other
//! claimant sends its rows a second time; and one that lost its lease cannot record or mark
//! what another now holds. HTTP attempts are counted at a real server on loopback.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use effects_core::executor::{Executor, Mutant};
use effects_core::store::SqliteStore;
use effects_core::{Effects, Method, RequestEffect};
use support::{eventually, http_client, sql_i64, temp_dir};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const REQUESTS: usize = 5;

/// One run of five slow requests (150 ms each) on an executor whose lease is 400 ms, while a
/// second executor (another owner, its own connection to the same file) keeps claiming due
/// rows. Returns the HTTP attempts per path and the recorded responses.
async fn slow_run_beside_a_relay(
    name: &str,
    mutant: Option<Mutant>,
) -> (BTreeMap<String, usize>, i64) {
    let dir = temp_dir(name);
    let db = dir.join("store.db");
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(150)))
        .mount(&server)
        .await;

    let store = SqliteStore::open(&db).unwrap();
    let mut builder = Executor::builder(store.clone(), store.log())
        .http(http_client(&server.uri(), 1))
        .owner("slow")
        .lease(Duration::from_millis(400));
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let slow = Arc::new(builder.build());

    let other_store = SqliteStore::open(&db).unwrap();
    let other = Arc::new(
        Executor::builder(other_store.clone(), other_store.log())
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

    let effects: Effects = (0..REQUESTS)
        .map(|i| RequestEffect::new(Method::Post, "notify", format!("/notify/{i}")))
        .collect();
    let _ = tokio::time::timeout(Duration::from_secs(20), slow.run("slow-run", effects))
        .await
        .expect("the run ends");
    // Let the other executor finish whatever it took over.
    eventually("every request resolved", Duration::from_secs(20), || {
        let db = db.clone();
        async move {
            sql_i64(
                &db,
                "SELECT COUNT(*) FROM outbox WHERE dispatched_at_ms IS NULL \
                 AND dead_lettered_reason IS NULL",
            ) == 0
        }
    })
    .await;
    let _ = stop.send(true);
    relay.await.unwrap();

    let mut attempts: BTreeMap<String, usize> = BTreeMap::new();
    for r in server.received_requests().await.unwrap() {
        *attempts.entry(r.url.path().to_owned()).or_default() += 1;
    }
    let recorded = sql_i64(&db, "SELECT COUNT(*) FROM effect_run_responses");
    (attempts, recorded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimant_that_works_past_its_lease_renews_it_and_nothing_is_sent_twice() {
    let (attempts, recorded) = slow_run_beside_a_relay("renewed", None).await;
    println!("FIGURE lease_renewal attempts={attempts:?} recorded={recorded}");
    assert_eq!(attempts.len(), REQUESTS, "every request sent: {attempts:?}");
    assert!(
        attempts.values().all(|n| *n == 1),
        "each request sent once: {attempts:?}"
    );
    assert_eq!(recorded, REQUESTS as i64);
}

/// Without renewal the other executor takes the rows over and sends some again, and the first
/// claimant's late records are refused: the check above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutant_without_renewal_sends_requests_twice() {
    let (attempts, recorded) =
        slow_run_beside_a_relay("not-renewed", Some(Mutant::NoLeaseRenewal)).await;
    println!("FIGURE lease_renewal_mutant attempts={attempts:?} recorded={recorded}");
    let total: usize = attempts.values().sum();
    assert!(total > REQUESTS, "a request was sent twice: {attempts:?}");
    // Fencing: one recorded response per request whoever sent it.
    assert_eq!(recorded, REQUESTS as i64);
}
