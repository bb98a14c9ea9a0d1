//! The window the fence cannot close, measured: the time from a row passing its fence (its
//! lease checked on the monotonic clock right before it is sent) to the executor's call to the
//! transport's `publish` or the HTTP client's `send`. A holder paused inside that window past
//! its lease sends a row another claimant may send too (same id, deduplicated by receivers);
//! `tests/tests/server_faults.rs` shows that a pause anywhere before it sends nothing twice.
//!
//! `cargo test -p effects-tests --test fence -- --nocapture` prints the figure; nothing here is
//! timed against a bound: what is checked is that every send was preceded by its fence.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use effects_core::executor::{BatchItem, Executor, FaultPoint};
use effects_core::http::{HttpClient, HttpError, HttpResponse, ReqwestClient};
use effects_core::store::SqliteStore;
use effects_core::transport::{
    Delivery, FetchRequest, OutgoingMessage, SqliteLog, Transport, TransportError,
};
use effects_core::{DatomEffect, Effects, LookupRef, MessageEffect, Method, RequestEffect};
use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

/// When each row id passed its fence, and when it was handed to the transport or the client.
#[derive(Clone, Default)]
struct Times {
    fenced: Arc<Mutex<HashMap<String, Instant>>>,
    sent: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Times {
    fn sent(&self, id: &str) {
        self.sent
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_insert_with(Instant::now);
    }
}

/// The log, noting when each message is handed to it.
#[derive(Clone)]
struct Noting {
    log: SqliteLog,
    times: Times,
}

impl Transport for Noting {
    fn publish(
        &self,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.times.sent(&message.id);
        self.log.publish(message)
    }

    fn fetch(
        &self,
        request: FetchRequest,
    ) -> impl Future<Output = Result<Vec<Delivery>, TransportError>> + Send {
        self.log.fetch(request)
    }

    fn ack(&self, d: &Delivery) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.log.ack(d)
    }

    fn nack(
        &self,
        d: &Delivery,
        delay: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.log.nack(d, delay)
    }

    fn dead_letter(
        &self,
        d: &Delivery,
        reason: &str,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.log.dead_letter(d, reason)
    }
}

/// The HTTP client, noting when each request is handed to it.
struct NotingClient {
    client: ReqwestClient,
    times: Times,
}

impl HttpClient for NotingClient {
    fn send(
        &self,
        idempotency_key: &str,
        request: &RequestEffect,
    ) -> impl Future<Output = Result<HttpResponse, HttpError>> + Send {
        self.times.sent(idempotency_key);
        self.client.send(idempotency_key, request)
    }

    fn knows(&self, endpoint: &str) -> bool {
        self.client.knows(endpoint)
    }

    fn is_secret_header(&self, endpoint: &str, name: &str) -> bool {
        self.client.is_secret_header(endpoint, name)
    }
}

fn micros(mut v: Vec<u128>, p: f64) -> u128 {
    v.sort_unstable();
    let i = ((v.len().saturating_sub(1)) as f64 * p).round() as usize;
    v.get(i).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_from_the_fence_to_the_send() {
    const RUNS: usize = 300;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let dir = support::PrivateDir::new("fence-window");
    let store = SqliteStore::open(dir.join("store.db")).unwrap();
    // A log of its own, like a broker: messages go out through `publish`.
    let log = SqliteStore::open(dir.join("broker.db")).unwrap().log();
    let times = Times::default();
    let hook_times = times.clone();
    let executor = Executor::builder(
        store,
        Noting {
            log,
            times: times.clone(),
        },
    )
    .http(NotingClient {
        client: support::http_client(&server.uri(), 1),
        times: times.clone(),
    })
    .fault_hook(Arc::new(move |point, at| {
        if point == FaultPoint::Fenced {
            hook_times
                .fenced
                .lock()
                .unwrap()
                .entry(at.to_owned())
                .or_insert_with(Instant::now);
        }
    }))
    .build();
    let items: Vec<BatchItem> = (0..RUNS)
        .map(|i| {
            let effects = Effects::from(DatomEffect::assert(
                LookupRef::new("card/id", format!("c{i}")),
                [("card/status", json!("blocked"))],
            ))
            .merge(
                RequestEffect::new(Method::Post, "notify", format!("/notify/c{i}"))
                    .with_body(json!({"card_id": format!("c{i}")})),
            )
            .merge(
                MessageEffect::new("card-status-changed", json!({"card_id": format!("c{i}")}))
                    .with_key(format!("c{i}")),
            );
            BatchItem::new(format!("fence:{i}"), effects)
        })
        .collect();
    for chunk in items.chunks(100) {
        for result in executor.run_batch(chunk.to_vec()).await.unwrap() {
            let outcome = result.unwrap();
            assert_eq!(outcome.progress().pending, 0, "{outcome:?}");
        }
    }
    let fenced = times.fenced.lock().unwrap().clone();
    let sent = times.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 2 * RUNS, "a request and a message per run");
    let mut requests = Vec::new();
    let mut messages = Vec::new();
    for (id, at) in &sent {
        let fence = fenced
            .get(id)
            .unwrap_or_else(|| panic!("{id} was sent without passing its fence"));
        assert!(fence <= at, "{id} passed its fence after it was sent");
        let window = at.duration_since(*fence).as_micros();
        // Row 0 of a run is its request, row 1 its message.
        if id.ends_with("#0") {
            requests.push(window);
        } else {
            messages.push(window);
        }
    }
    println!(
        "FIGURE fence_window runs={RUNS} requests_us: p50={} p99={} max={} messages_us: p50={} p99={} max={}",
        micros(requests.clone(), 0.5),
        micros(requests.clone(), 0.99),
        micros(requests, 1.0),
        micros(messages.clone(), 0.5),
        micros(messages.clone(), 0.99),
        micros(messages, 1.0),
    );
}
