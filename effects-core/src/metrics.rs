//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`, on by
//! default): the executor, the worker and the relay count what they do, and the service installs
//! the exporter it wants (Prometheus, StatsD, ...). Without a recorder installed every call is a
//! no-op; without the feature the calls compile away.
//!
//! Names follow the Prometheus conventions: `snake_case` with the `effects_` prefix, counters
//! ending in `_total`, units in the name (`_seconds`), labels of bounded cardinality (handler,
//! endpoint, topic and consumer names come from the service's code and configuration, never
//! from message data or keys).
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `effects_runs_total` | counter | `outcome` | runs by outcome: `applied`, `duplicate`, `conflict`, `key_reuse`, `invalid`, `store_error`, `incomplete` |
//! | `effects_worker_deliveries_total` | counter | `handler`, `outcome` | deliveries a worker settled: `applied`, `duplicate`, `dead_lettered`, `retried` |
//! | `effects_worker_conflicts_total` | counter | `handler` | runs refused at commit because their input changed after it was read |
//! | `effects_worker_reruns_total` | counter | `handler` | handler calls made again on fresh inputs after a conflict |
//! | `effects_worker_blocked_inputs` | gauge | `handler` | inputs a worker holds whose processing has been failing for longer than `WorkerConfig::blocked_after`, each holding up its partition key |
//! | `effects_dead_letters_total` | counter | `kind` | dead letters: `request` (rejected or failed), `message` (publishing failed too often), `input` (a worker gave up on a message) |
//! | `effects_http_requests_total` | counter | `endpoint`, `outcome` | requests sent: `success`, `rejected` (4xx), `failed` (cannot succeed), `exhausted` (retried later) |
//! | `effects_http_request_duration_seconds` | histogram | `endpoint` | time to an outcome, the client's retries included |
//! | `effects_http_request_attempts` | histogram | `endpoint` | attempts the client made for one send |
//! | `effects_relay_rows_claimed_total` | counter | | outbox rows the relay claimed (left over by crashes, failures, retries) |
//! | `effects_outbox_pending_rows` | gauge | | outbox rows neither dispatched nor dead-lettered |
//! | `effects_outbox_oldest_pending_age_seconds` | gauge | | age of the oldest of them (0 when there is none) |
//! | `effects_outbox_dead_lettered_rows` | gauge | | dead-lettered outbox rows kept for operators |
//! | `effects_log_dead_lettered_messages` | gauge | | input messages the consumers of the store's log dead-lettered |
//! | `effects_runs_open` | gauge | | runs not done |
//! | `effects_blocked_inputs` | gauge | | inputs the workers of every process reported to the store as blocked (`effects inputs blocked` lists them) |
//! | `effects_blocked_input_oldest_age_seconds` | gauge | | how long the longest failing of them has been failing (0 when there is none): alert when it passes a threshold |
//! | `effects_worker_lag_messages` | gauge | `consumer`, `topic` | messages of the store's log a consumer has not acknowledged |
//! | `effects_worker_lag_seconds` | gauge | `consumer`, `topic` | age of the oldest of them (0 when caught up) |
//!
//! The counters and histograms are updated where things happen. The gauges describe the store,
//! so they are measured from it: call [`observe_backlog`] (or run [`watch_backlog`] beside the
//! workers) with a store that implements [`Inspect`].
//!
//! ```
//! use std::time::Duration;
//! use effects_core::store::SqliteStore;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let store = SqliteStore::in_memory()?;
//! // With an exporter installed, this sets the gauges every 15 s until shutdown.
//! let shutdown = tokio::time::sleep(Duration::from_millis(10));
//! effects_core::metrics::watch_backlog(store, Duration::from_secs(15), shutdown).await;
//! # Ok::<(), effects_core::store::StoreError>(())
//! # }).unwrap();
//! ```

use std::future::Future;
use std::time::Duration;

use crate::store::{BacklogReport, DeadLetterKind, Inspect, StoreError};

/// `effects_runs_total`.
pub const RUNS: &str = "effects_runs_total";
/// `effects_worker_deliveries_total`.
pub const WORKER_DELIVERIES: &str = "effects_worker_deliveries_total";
/// `effects_worker_conflicts_total`.
pub const WORKER_CONFLICTS: &str = "effects_worker_conflicts_total";
/// `effects_worker_reruns_total`.
pub const WORKER_RERUNS: &str = "effects_worker_reruns_total";
/// `effects_worker_blocked_inputs`.
pub const WORKER_BLOCKED: &str = "effects_worker_blocked_inputs";
/// `effects_dead_letters_total`.
pub const DEAD_LETTERS: &str = "effects_dead_letters_total";
/// `effects_http_requests_total`.
pub const HTTP_REQUESTS: &str = "effects_http_requests_total";
/// `effects_http_request_duration_seconds`.
pub const HTTP_REQUEST_DURATION: &str = "effects_http_request_duration_seconds";
/// `effects_http_request_attempts`.
pub const HTTP_REQUEST_ATTEMPTS: &str = "effects_http_request_attempts";
/// `effects_relay_rows_claimed_total`.
pub const RELAY_ROWS_CLAIMED: &str = "effects_relay_rows_claimed_total";
/// `effects_outbox_pending_rows`.
pub const OUTBOX_PENDING: &str = "effects_outbox_pending_rows";
/// `effects_outbox_oldest_pending_age_seconds`.
pub const OUTBOX_OLDEST_PENDING_AGE: &str = "effects_outbox_oldest_pending_age_seconds";
/// `effects_outbox_dead_lettered_rows`.
pub const OUTBOX_DEAD_LETTERED: &str = "effects_outbox_dead_lettered_rows";
/// `effects_log_dead_lettered_messages`.
pub const LOG_DEAD_LETTERED: &str = "effects_log_dead_lettered_messages";
/// `effects_runs_open`.
pub const RUNS_OPEN: &str = "effects_runs_open";
/// `effects_blocked_inputs`.
pub const BLOCKED_INPUTS: &str = "effects_blocked_inputs";
/// `effects_blocked_input_oldest_age_seconds`.
pub const BLOCKED_INPUT_OLDEST_AGE: &str = "effects_blocked_input_oldest_age_seconds";
/// `effects_worker_lag_messages`.
pub const WORKER_LAG_MESSAGES: &str = "effects_worker_lag_messages";
/// `effects_worker_lag_seconds`.
pub const WORKER_LAG_SECONDS: &str = "effects_worker_lag_seconds";

#[cfg(feature = "metrics")]
mod emit {
    pub(super) fn count(name: &'static str, labels: &[(&'static str, String)], n: u64) {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.clone()))
            .collect();
        metrics::counter!(name, labels).increment(n);
    }

    pub(super) fn gauge(name: &'static str, labels: &[(&'static str, String)], value: f64) {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.clone()))
            .collect();
        metrics::gauge!(name, labels).set(value);
    }

    pub(super) fn histogram(name: &'static str, labels: &[(&'static str, String)], value: f64) {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.clone()))
            .collect();
        metrics::histogram!(name, labels).record(value);
    }
}

#[cfg(not(feature = "metrics"))]
mod emit {
    pub(super) fn count(_: &'static str, _: &[(&'static str, String)], _: u64) {}
    pub(super) fn gauge(_: &'static str, _: &[(&'static str, String)], _: f64) {}
    pub(super) fn histogram(_: &'static str, _: &[(&'static str, String)], _: f64) {}
}

fn label(name: &'static str, value: impl Into<String>) -> (&'static str, String) {
    (name, value.into())
}

// The functions below are the leaf the executor, the worker and the relay call: they take
// labels and numbers, never the callers' types, so this module depends on none of them.

/// A run finished (executor: `run`, `run_with`, and each item of `run_batch`,
/// `commit_batch` + `dispatch`), with its `outcome` label.
pub(crate) fn run_finished(outcome: &'static str) {
    emit::count(RUNS, &[label("outcome", outcome)], 1);
}

/// A request got an outcome (`success`, `rejected`, `exhausted`, `failed`) from the HTTP
/// client after `elapsed`, in `attempts` attempts when the client made any.
pub(crate) fn request_sent(
    endpoint: &str,
    elapsed: Duration,
    outcome: &'static str,
    attempts: Option<u32>,
) {
    let endpoint = label("endpoint", endpoint);
    emit::count(
        HTTP_REQUESTS,
        &[endpoint.clone(), label("outcome", outcome)],
        1,
    );
    emit::histogram(
        HTTP_REQUEST_DURATION,
        std::slice::from_ref(&endpoint),
        elapsed.as_secs_f64(),
    );
    if let Some(attempts) = attempts {
        emit::histogram(HTTP_REQUEST_ATTEMPTS, &[endpoint], f64::from(attempts));
    }
}

/// Something was dead-lettered: an outbox row by the executor, an input by a worker.
pub(crate) fn dead_lettered(kind: DeadLetterKind) {
    emit::count(DEAD_LETTERS, &[label("kind", kind.as_str())], 1);
}

/// A worker settled a delivery: `applied`, `duplicate`, `dead_lettered` or `retried`.
pub(crate) fn delivery_settled(handler: &'static str, outcome: &'static str) {
    emit::count(
        WORKER_DELIVERIES,
        &[label("handler", handler), label("outcome", outcome)],
        1,
    );
}

/// A worker's run was refused by read validation.
pub(crate) fn conflict(handler: &'static str) {
    emit::count(WORKER_CONFLICTS, &[label("handler", handler)], 1);
}

/// A worker called its handler again after a conflict.
pub(crate) fn rerun(handler: &'static str) {
    emit::count(WORKER_RERUNS, &[label("handler", handler)], 1);
}

/// How many inputs a worker holds that have been failing past its threshold.
pub(crate) fn blocked_inputs(handler: &'static str, count: usize) {
    emit::gauge(WORKER_BLOCKED, &[label("handler", handler)], count as f64);
}

/// A relay round claimed rows.
pub(crate) fn relay_round(claimed: usize) {
    if claimed > 0 {
        emit::count(
            RELAY_ROWS_CLAIMED,
            &[],
            u64::try_from(claimed).unwrap_or(u64::MAX),
        );
    }
}

fn seconds_since(now: i64, then: Option<i64>) -> f64 {
    // Millisecond counts stay far below 2^52: the conversion is exact.
    then.map_or(0.0, |t| (now.saturating_sub(t).max(0) as f64) / 1000.0)
}

/// Sets the gauges of a backlog report.
pub fn record_backlog(report: &BacklogReport) {
    emit::gauge(OUTBOX_PENDING, &[], report.pending_rows as f64);
    emit::gauge(
        OUTBOX_OLDEST_PENDING_AGE,
        &[],
        seconds_since(report.now, report.oldest_pending_at),
    );
    emit::gauge(OUTBOX_DEAD_LETTERED, &[], report.dead_lettered_rows as f64);
    emit::gauge(LOG_DEAD_LETTERED, &[], report.dead_lettered_inputs as f64);
    emit::gauge(RUNS_OPEN, &[], report.open_runs as f64);
    emit::gauge(BLOCKED_INPUTS, &[], report.blocked_inputs as f64);
    emit::gauge(
        BLOCKED_INPUT_OLDEST_AGE,
        &[],
        seconds_since(report.now, report.oldest_blocked_since),
    );
    for lag in &report.consumers {
        let labels = [
            label("consumer", lag.consumer.as_str()),
            label("topic", lag.topic.as_str()),
        ];
        emit::gauge(WORKER_LAG_MESSAGES, &labels, lag.unacknowledged as f64);
        emit::gauge(
            WORKER_LAG_SECONDS,
            &labels,
            seconds_since(report.now, lag.oldest_published_at),
        );
    }
}

/// Measures the store's backlog ([`Inspect::backlog`]) and sets the gauges from it.
pub async fn observe_backlog<S: Inspect>(store: &S) -> Result<BacklogReport, StoreError> {
    let report = store.backlog().await?;
    record_backlog(&report);
    Ok(report)
}

/// Calls [`observe_backlog`] every `every` until `shutdown` resolves. Store errors are logged
/// and the next round tries again.
pub async fn watch_backlog<S: Inspect>(
    store: S,
    every: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        if let Err(e) = observe_backlog(&store).await {
            tracing::warn!(error = %e, "measuring the backlog failed");
        }
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
