//! Recovery time after `kill -9`, through the real executor and relay, on each store: a worker
//! process commits runs whose request goes to a slow HTTP endpoint and is killed while every
//! request is in flight; another process, an executor and a relay with the default
//! configuration (a 60 s lease), takes them over. The figure is the slowest affected run's time
//! from its commit to done, by the store's clock (`effect_runs.created_at_ms` to
//! `completed_at_ms`); it must be at most 5 s for as many runs as one relay round takes (100;
//! beyond that the relay's own pace adds up, and the figure is printed, not bounded). Whatever
//! the size, the dead process's rows (leased for 60 s) must be free again within 2.5 s of the
//! kill. The same run with reaping switched off (the `NoReaping` mutant) shows that the checks
//! fail without liveness: the runs then wait for the lease.
//!
//! Counted at the source: the HTTP server counts first attempts (held unanswered) and the
//! attempts after the kill per `Idempotency-Key`; the store's `effect_runs` rows say when each
//! run committed and finished. `EFFECTS_RECOVERY_RUNS` sets the size (default 20):
//!
//! ```text
//! EFFECTS_RECOVERY_RUNS=500 cargo test -p effects-tests --features postgres --test recovery \
//!     -- --nocapture --test-threads 1
//! ```

mod backends;
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use backends::Backend;
use effects_core::executor::{Executor, Mutant};
use effects_core::relay::Relay;
use effects_tests::harness::process::ChildProcess;
use support::http_client;
use tokio::sync::oneshot;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// The bound: the slowest affected run goes from commit to done within this...
const BOUND_MS: i64 = 5_000;
/// ... for up to this many runs, what one relay round claims with the default configuration.
const ONE_ROUND: usize = 100;
/// The dead process's rows are free again within this of the kill, whatever the size.
const FREED_WITHIN: Duration = Duration::from_millis(2_500);

fn runs() -> usize {
    std::env::var("EFFECTS_RECOVERY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Holds the first attempt at every `Idempotency-Key` unanswered (the doomed process's, in
/// flight when it is killed) and answers later ones at once; counts both per key.
#[derive(Clone, Default)]
struct SlowFirstAttempt {
    attempts: Arc<Mutex<HashMap<String, usize>>>,
}

impl SlowFirstAttempt {
    /// Keys attempted once, and keys attempted again.
    fn counts(&self) -> (usize, usize) {
        let attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
        let again = attempts.values().filter(|n| **n > 1).count();
        (attempts.len(), again)
    }

    fn attempts(&self) -> usize {
        let attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
        attempts.values().sum()
    }
}

impl Respond for SlowFirstAttempt {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let key = request
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = attempts.entry(key).or_insert(0);
        *n += 1;
        if *n == 1 {
            ResponseTemplate::new(200).set_delay(Duration::from_secs(100))
        } else {
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"ok": true}))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_takes_over_a_killed_workers_runs_within_5_s() {
    let backend = backends::Sqlite::create("recovery").await;
    backends::run_case(backend, |b| recovery(b, None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_mutant_without_reaping_waits_for_the_lease() {
    let backend = backends::Sqlite::create("recovery-mutant").await;
    backends::run_case(backend, |b| recovery(b, Some(Mutant::NoReaping))).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_takes_over_a_killed_workers_runs_within_5_s() {
    let backend = backends::postgres::Postgres::create("recovery").await;
    backends::run_case(backend, |b| recovery(b, None)).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_mutant_without_reaping_waits_for_the_lease() {
    let backend = backends::postgres::Postgres::create("recovery-mutant").await;
    backends::run_case(backend, |b| recovery(b, Some(Mutant::NoReaping))).await;
}

async fn done<B: Backend>(b: &B) -> i64 {
    b.count("SELECT COUNT(*) FROM effect_runs WHERE key LIKE 'r:%' AND status = 'done'")
        .await
}

async fn recovery<B: Backend>(b: B, mutant: Option<Mutant>) {
    let runs = runs();
    let responder = SlowFirstAttempt::default();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(responder.clone())
        .mount(&server)
        .await;
    let broker = b.broker_path().display().to_string();
    let args: Vec<String> = [
        "execute",
        "--store",
        &b.child_store(),
        "--broker",
        &broker,
        "--http",
        &server.uri(),
        "--runs",
        &runs.to_string(),
        "--prefix",
        "r",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let mut child = ChildProcess::spawn(
        "worker",
        std::path::Path::new(env!("CARGO_BIN_EXE_effects-liveness-child")),
        &args,
    )
    .expect("start the worker child");
    // Bounded: every run commits and sends its request within 60 s, and a second more per
    // hundred runs in the larger runs.
    let bound = Duration::from_secs(60 + runs as u64 / 100);
    let started = child
        .wait_for("STARTED", bound)
        .unwrap_or_else(|e| panic!("{e}"));
    let doomed = started
        .strip_prefix("STARTED ")
        .expect("the child's owner")
        .to_owned();
    // The child's default owner name, `pid<n>-<hex>`: nothing to quote.
    assert!(
        doomed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    );
    let leased = format!(
        "SELECT COUNT(*) FROM outbox WHERE lease_owner = '{doomed}' \
         AND dispatched_at_ms IS NULL AND dead_lettered_reason IS NULL"
    );

    // Another process: an executor and a relay with the default configuration.
    let store = b.open().await;
    let mut builder = Executor::builder(store, b.broker()).http(http_client(&server.uri(), 3));
    if let Some(m) = mutant {
        builder = builder.mutant(m);
    }
    let relay = Relay::new(Arc::new(builder.build()));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        relay
            .run(async {
                let _ = stopped.await;
            })
            .await
    });

    let deadline = Instant::now() + bound;
    while responder.counts().0 < runs {
        assert!(
            Instant::now() < deadline,
            "only {} of {runs} requests in flight after {bound:?}",
            responder.counts().0
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        responder.counts(),
        (runs, 0),
        "every request in flight, once"
    );
    assert_eq!(b.count(&leased).await, runs as i64, "leased to the worker");
    assert!(
        child.kill_9().unwrap(),
        "the worker was running when killed"
    );
    let killed = Instant::now();

    // Bounded: 8 s, past the 5 s bound, for every run to finish (more for a larger size: a
    // relay round takes 100 runs).
    let wait = Duration::from_secs(8)
        + Duration::from_millis(20) * u32::try_from(runs).unwrap_or(u32::MAX);
    let mut finished = 0;
    let mut freed = None;
    while killed.elapsed() < wait {
        if freed.is_none() && b.count(&leased).await == 0 {
            freed = Some(killed.elapsed());
        }
        finished = done(&b).await;
        if finished == runs as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after_kill = killed.elapsed();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the relay stops")
        .unwrap();

    let (first, again) = responder.counts();
    match mutant {
        None => {
            assert_eq!(
                finished, runs as i64,
                "every run done within {wait:?} of the kill"
            );
            let span = |f: &str| {
                format!(
                    "SELECT {f}(completed_at_ms - created_at_ms) FROM effect_runs WHERE key LIKE 'r:%'"
                )
            };
            let freed = freed.expect("the rows were freed: every run is done");
            let slowest = b.count(&span("MAX")).await;
            let fastest = b.count(&span("MIN")).await;
            println!(
                "FIGURE recovery {}: runs={runs} killed with every request in flight; its rows \
                 free again {freed:?} after the kill, every run done {after_kill:?} after it; \
                 commit->done fastest {fastest} ms, slowest {slowest} ms (bound {BOUND_MS} ms \
                 up to {ONE_ROUND} runs); requests sent again {again}/{first}, attempts {}",
                B::NAME,
                responder.attempts()
            );
            assert_eq!((first, again), (runs, runs), "each request sent again once");
            assert_eq!(responder.attempts(), 2 * runs, "and only once");
            assert!(
                freed <= FREED_WITHIN,
                "the dead worker's rows were free again {freed:?} after the kill"
            );
            assert!(
                runs > ONE_ROUND || slowest <= BOUND_MS,
                "the slowest run took {slowest} ms from commit to done"
            );
        }
        Some(m) => {
            println!(
                "FIGURE recovery {} with mutant {}: {finished}/{runs} runs done and the rows \
                 {} {after_kill:?} after the kill (the lease is 60 s)",
                B::NAME,
                m.name(),
                if freed.is_some() {
                    "free"
                } else {
                    "still leased"
                },
            );
            assert_eq!(
                (finished, again, freed),
                (0, 0, None),
                "without reaping, nothing is taken over before the lease expires"
            );
        }
    }
}
