//! The metrics the executor, the worker and the relay emit through the `metrics` facade, read
//! back from a recorder that keeps every value (written here: a few lines instead of a crate).

#![cfg(all(feature = "metrics", feature = "sqlite", feature = "http"))]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use effects_core::executor::{Backoff, Executor};
use effects_core::http::{HttpConfig, ReqwestClient, RetryPolicy};
use effects_core::store::{SqliteStore, Tracked};
use effects_core::transport::{FetchRequest, OutgoingMessage, Transport};
use effects_core::worker::{LoadError, LoadWith, Worker};
use effects_core::{
    DatomEffect, Effects, Handler, HandlerDescriptor, LookupRef, Method, RequestEffect,
};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use serde_json::json;
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Every counter, gauge and histogram, by `name{label=value,...}` (labels sorted).
#[derive(Default)]
struct Recorded {
    counters: Mutex<BTreeMap<String, Arc<Cell>>>,
    gauges: Mutex<BTreeMap<String, Arc<Cell>>>,
    histograms: Mutex<BTreeMap<String, Arc<Cell>>>,
}

#[derive(Default)]
struct Cell {
    count: AtomicU64,
    values: Mutex<Vec<f64>>,
}

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.count.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.count.store(value, Ordering::Relaxed);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, value: f64) {
        let mut v = self.values.lock().unwrap_or_else(PoisonError::into_inner);
        let last = v.last().copied().unwrap_or(0.0);
        v.push(last + value);
    }
    fn decrement(&self, value: f64) {
        GaugeFn::increment(self, -value);
    }
    fn set(&self, value: f64) {
        self.values
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(value);
    }
}

impl HistogramFn for Cell {
    fn record(&self, value: f64) {
        GaugeFn::set(self, value);
    }
}

fn name(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    if labels.is_empty() {
        key.name().to_owned()
    } else {
        format!("{}{{{}}}", key.name(), labels.join(","))
    }
}

fn cell(map: &Mutex<BTreeMap<String, Arc<Cell>>>, key: &Key) -> Arc<Cell> {
    Arc::clone(
        map.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name(key))
            .or_default(),
    )
}

impl Recorder for Recorded {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(cell(&self.counters, key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(cell(&self.gauges, key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(cell(&self.histograms, key))
    }
}

impl Recorded {
    fn counter(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map_or(0, |c| c.count.load(Ordering::Relaxed))
    }

    fn values(map: &Mutex<BTreeMap<String, Arc<Cell>>>, name: &str) -> Vec<f64> {
        map.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(|c| {
                c.values
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            })
            .unwrap_or_default()
    }

    fn gauge(&self, name: &str) -> Option<f64> {
        Recorded::values(&self.gauges, name).last().copied()
    }

    fn histogram(&self, name: &str) -> Vec<f64> {
        Recorded::values(&self.histograms, name)
    }

    fn counter_names(&self) -> Vec<String> {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }
}

/// Runs `test` on a current-thread runtime with `recorder` as this thread's recorder: every
/// metric the library emits while the test runs goes to it.
fn with_recorder(recorder: &Recorded, test: impl Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    metrics::with_local_recorder(recorder, || {
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), test)
                .await
                .expect("the test did not finish in time");
        });
    });
}

fn card(status: &str) -> Effects {
    Effects::from(DatomEffect::assert(
        LookupRef::new("card/id", "c1"),
        [("card/status", json!(status))],
    ))
}

/// `block` by hand: sets the card it was given to blocked.
struct Block;

impl Handler for Block {
    type Input = serde_json::Value;
    type Output = Effects;
    const DESCRIPTOR: &'static HandlerDescriptor = &HandlerDescriptor {
        name: "block",
        topic: Some("cards"),
        key: None,
        input: "Card",
        schemas: &[],
    };

    fn handle(&self, _card: serde_json::Value) -> Effects {
        card("blocked")
    }
}

#[test]
fn runs_deliveries_conflicts_requests_dead_letters_and_the_backlog_are_counted() {
    let recorded = Recorded::default();
    with_recorder(&recorded, async {
        let server = MockServer::start().await;
        Mock::given(path("/ok"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;
        Mock::given(path("/no"))
            .respond_with(ResponseTemplate::new(422))
            .mount(&server)
            .await;
        Mock::given(path("/down"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&server)
            .await;
        let http = ReqwestClient::new(
            HttpConfig::new()
                .with_endpoint("ledger", &server.uri())
                .unwrap()
                .with_retry(RetryPolicy {
                    max_attempts: 2,
                    min_delay: Duration::from_millis(1),
                    max_delay: Duration::from_millis(5),
                    jitter: false,
                })
                .unwrap(),
        )
        .unwrap();
        let store = SqliteStore::in_memory().unwrap();
        let log = store.log();
        let executor = Arc::new(
            Executor::builder(store.clone(), log.clone())
                .http(http)
                .retry(Backoff {
                    initial: Duration::from_millis(10),
                    max: Duration::from_millis(20),
                    max_attempts: None,
                })
                .build(),
        );

        // Runs by outcome.
        executor.run("seed", card("active")).await.unwrap();
        executor.run("seed", card("active")).await.unwrap();
        let clash = card("active").merge(card("blocked"));
        assert!(executor.run("clash", clash).await.is_err());
        assert_eq!(recorded.counter("effects_runs_total{outcome=applied}"), 1);
        assert_eq!(recorded.counter("effects_runs_total{outcome=duplicate}"), 1);
        assert_eq!(recorded.counter("effects_runs_total{outcome=invalid}"), 1);

        // Requests: success, rejection (dead-lettered), exhausted (pending).
        let request = |p: &str| Effects::from(RequestEffect::new(Method::Post, "ledger", p));
        executor.run("ok", request("/ok")).await.unwrap();
        executor.run("no", request("/no")).await.unwrap();
        executor.run("down", request("/down")).await.unwrap();
        let requests = |outcome: &str| {
            recorded.counter(&format!(
                "effects_http_requests_total{{endpoint=ledger,outcome={outcome}}}"
            ))
        };
        assert_eq!(
            (
                requests("success"),
                requests("rejected"),
                requests("exhausted")
            ),
            (1, 1, 1)
        );
        assert_eq!(
            recorded.histogram("effects_http_request_attempts{endpoint=ledger}"),
            [1.0, 1.0, 2.0]
        );
        let latencies =
            recorded.histogram("effects_http_request_duration_seconds{endpoint=ledger}");
        assert_eq!(latencies.len(), 3);
        assert!(
            latencies.iter().all(|s| *s >= 0.0 && *s < 30.0),
            "{latencies:?}"
        );
        assert_eq!(
            recorded.counter("effects_dead_letters_total{kind=request}"),
            1
        );

        // The worker: applied, duplicate, dead-lettered, and a conflict with its re-run.
        let interfered = Arc::new(AtomicBool::new(false));
        let meddler = Arc::clone(&executor);
        let first_time = Arc::clone(&interfered);
        let worker = Worker::new(Arc::clone(&executor), Block).load_with(LoadWith::new(
            move |_: serde_json::Value, store: Tracked<SqliteStore>| {
                let meddler = Arc::clone(&meddler);
                let first_time = Arc::clone(&first_time);
                async move {
                    let lookup = LookupRef::new("card/id", "c1");
                    let loaded = store
                        .entity(&lookup, None)
                        .await?
                        .ok_or(LoadError::NotFound { what: "c1".into() })?;
                    if !first_time.swap(true, Ordering::Relaxed) {
                        // Someone changes the card between this read and the commit.
                        meddler.run("meddle", card("frozen")).await.map_err(|e| {
                            LoadError::Invalid {
                                reason: e.to_string(),
                            }
                        })?;
                    }
                    Ok(loaded.to_unqualified())
                }
            },
        ));
        for (id, payload) in [("m1", "{}"), ("m2", "not json")] {
            log.publish(OutgoingMessage {
                id: id.into(),
                topic: "cards".into(),
                partition_key: None,
                headers: Default::default(),
                payload: payload.as_bytes().to_vec(),
            })
            .await
            .unwrap();
        }
        let fetched = log
            .fetch(FetchRequest {
                consumer: "block".into(),
                topic: "cards".into(),
                max: 10,
                visibility: Duration::from_secs(60),
                wait: Duration::from_secs(1),
            })
            .await
            .unwrap();
        assert_eq!(fetched.len(), 2);
        for d in &fetched {
            worker.process(d.clone()).await;
        }
        worker.process(fetched[0].clone()).await;
        let delivered = |outcome: &str| {
            recorded.counter(&format!(
                "effects_worker_deliveries_total{{handler=block,outcome={outcome}}}"
            ))
        };
        assert_eq!(
            (
                delivered("applied"),
                delivered("duplicate"),
                delivered("dead_lettered")
            ),
            (1, 1, 1)
        );
        assert_eq!(
            recorded.counter("effects_worker_conflicts_total{handler=block}"),
            1
        );
        assert_eq!(
            recorded.counter("effects_worker_reruns_total{handler=block}"),
            1
        );
        assert_eq!(recorded.counter("effects_runs_total{outcome=conflict}"), 1);
        assert_eq!(
            recorded.counter("effects_dead_letters_total{kind=input}"),
            1
        );

        // The backlog gauges, measured from the store.
        log.publish(OutgoingMessage {
            id: "m3".into(),
            topic: "cards".into(),
            partition_key: None,
            headers: Default::default(),
            payload: b"{}".to_vec(),
        })
        .await
        .unwrap();
        // A worker's report of an input failing for 90 s.
        effects_core::store::Store::report_blocked(
            &store,
            "worker-1",
            "block",
            "cards",
            vec![effects_core::store::BlockedInput {
                partition_key: Some("c7".into()),
                message_id: "m9".into(),
                failing_for: Duration::from_secs(90),
                attempts: 12,
                reason: "the database is down".into(),
            }],
        )
        .await
        .unwrap();
        let report = effects_core::metrics::observe_backlog(&store)
            .await
            .unwrap();
        assert_eq!(report.pending_rows, 1, "the request to /down");
        assert_eq!(recorded.gauge("effects_blocked_inputs"), Some(1.0));
        let age = recorded.gauge("effects_blocked_input_oldest_age_seconds");
        assert!(age.is_some_and(|a| (90.0..120.0).contains(&a)), "{age:?}");
        assert_eq!(recorded.gauge("effects_outbox_pending_rows"), Some(1.0));
        let age = recorded.gauge("effects_outbox_oldest_pending_age_seconds");
        assert!(age.is_some_and(|a| (0.0..30.0).contains(&a)), "{age:?}");
        assert_eq!(
            recorded.gauge("effects_outbox_dead_lettered_rows"),
            Some(1.0)
        );
        assert_eq!(
            recorded.gauge("effects_log_dead_lettered_messages"),
            Some(1.0)
        );
        assert_eq!(recorded.gauge("effects_runs_open"), Some(1.0));
        assert_eq!(
            recorded.gauge("effects_worker_lag_messages{consumer=block,topic=cards}"),
            Some(1.0)
        );
        assert!(
            recorded
                .gauge("effects_worker_lag_seconds{consumer=block,topic=cards}")
                .is_some()
        );

        // The relay claims the pending request.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let relay = effects_core::Relay::new(Arc::clone(&executor));
        relay.tick().await.unwrap();
        assert_eq!(recorded.counter("effects_relay_rows_claimed_total"), 1);

        // Every counter follows the Prometheus naming.
        for name in recorded.counter_names() {
            assert!(
                name.starts_with("effects_")
                    && name
                        .split('{')
                        .next()
                        .is_some_and(|n| n.ends_with("_total")),
                "{name}"
            );
        }
    });
}
