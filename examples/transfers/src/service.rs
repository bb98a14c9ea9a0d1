//! The workers: `transfer` on the `transfers` topic and `settle` on `fraud-checked`, sharing one
//! executor on any [`Backend`] that sends the fraud checks (`fraud-check` endpoint) and runs the
//! [`fraud_verdicts`] step after them. The same function runs them in the
//! job's own process and in each worker process started with `--processes`.

use std::sync::Arc;
use std::time::Duration;

use effects_core::executor::{Backoff, Executor, Mutant};
use effects_core::http::{HttpConfig, ReqwestClient};
use effects_core::transport::Transport;
use effects_core::worker::{LoadWith, Worker, WorkerConfig, WorkerReport};
use effects_core::{Handler, Message};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::backend::Backend;
use crate::job::Error;
use crate::{FRAUD_VERDICTS, FraudChecked, SettleHandler, TransferHandler, fraud_verdicts, load};

/// The executor of a backend, with the fraud-check endpoint.
pub type TransfersExecutor<B> =
    Executor<<B as Backend>::Store, <B as Backend>::Transport, ReqwestClient>;

/// Re-runs after a conflict before a transfer is dead-lettered (see [`run_until_drained`]).
pub const RERUNS: u32 = 256;

/// How the workers of one process run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerOptions {
    /// Deliveries each worker handles at once.
    pub concurrency: usize,
    /// How long the workers may take to drain both topics before the process gives up.
    pub patience: Duration,
    /// A deliberately broken executor, for the checks that must fail without read validation.
    /// Testing only.
    pub mutant: Option<Mutant>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            concurrency: 8,
            patience: Duration::from_secs(60),
            mutant: None,
        }
    }
}

/// What one worker did: [`WorkerReport`], in a form a worker process can print for the job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Deliveries received.
    pub deliveries: u64,
    /// Runs applied.
    pub applied: u64,
    /// Duplicates absorbed.
    pub duplicates: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Runs refused at commit because an account (or transfer) they were computed from changed.
    pub conflicts: u64,
    /// Handler calls made again on fresh inputs after a conflict.
    pub reruns: u64,
    /// Deliveries given back to be retried.
    pub retried: u64,
    /// Outcomes the transport did not take.
    pub transport_errors: u64,
}

impl From<WorkerReport> for Counts {
    fn from(r: WorkerReport) -> Self {
        Counts {
            deliveries: r.deliveries,
            applied: r.applied,
            duplicates: r.duplicates,
            dead_lettered: r.dead_lettered,
            conflicts: r.conflicts,
            reruns: r.reruns,
            retried: r.retried,
            transport_errors: r.transport_errors,
        }
    }
}

impl std::ops::Add for Counts {
    type Output = Counts;

    fn add(self, o: Counts) -> Counts {
        Counts {
            deliveries: self.deliveries + o.deliveries,
            applied: self.applied + o.applied,
            duplicates: self.duplicates + o.duplicates,
            dead_lettered: self.dead_lettered + o.dead_lettered,
            conflicts: self.conflicts + o.conflicts,
            reruns: self.reruns + o.reruns,
            retried: self.retried + o.retried,
            transport_errors: self.transport_errors + o.transport_errors,
        }
    }
}

/// What the two workers of one process did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workers {
    /// The `transfer` worker.
    pub transfer: Counts,
    /// The `settle` worker.
    pub settle: Counts,
}

impl Workers {
    /// Both workers together.
    pub fn total(&self) -> Counts {
        self.transfer + self.settle
    }
}

/// The executor: the backend's store and transport, the `fraud-check` endpoint at
/// `fraud_check_url`, and the after-requests step that turns the service's answers into
/// [`FraudChecked`] messages.
pub fn executor<B: Backend>(
    backend: &B,
    fraud_check_url: &str,
    mutant: Option<Mutant>,
) -> Result<TransfersExecutor<B>, Error> {
    let http = ReqwestClient::new(
        HttpConfig::new()
            .with_endpoint("fraud-check", fraud_check_url)?
            .with_attempt_timeout(Duration::from_secs(5)),
    )?;
    let mut builder = Executor::builder(backend.store().clone(), backend.transport().clone())
        .http(http)
        .after_requests(FRAUD_VERDICTS, fraud_verdicts);
    if let Some(mutant) = mutant {
        builder = builder.mutant(mutant);
    }
    let executor = builder.build();
    let colocated = backend.transport().colocation().is_some();
    if colocated && !executor.publishes_inline() {
        return Err(Error::Setup {
            reason: "the log does not share the store's database".to_owned(),
        });
    }
    Ok(executor)
}

/// Whether everything published so far is handled: every transfer acknowledged, every run
/// finished (fraud checks answered, their verdicts published), every verdict acknowledged.
/// In that order, because each step can only add work to the next one.
pub async fn drained<B: Backend>(backend: &B) -> Result<bool, Error> {
    let transfers = TransferHandler::DESCRIPTOR;
    let settle = SettleHandler::DESCRIPTOR;
    if backend
        .unacknowledged(transfers.name, transfers.topic.unwrap_or_default())
        .await?
        > 0
    {
        return Ok(false);
    }
    if !backend.runs_finished().await? {
        return Ok(false);
    }
    Ok(backend
        .unacknowledged(settle.name, FraudChecked::TOPIC)
        .await?
        == 0)
}

/// Runs the `transfer` and `settle` workers until everything published is handled
/// ([`drained`]), then shuts them down gracefully. Fails if that takes longer than
/// `options.patience`.
pub async fn run_until_drained<B: Backend>(
    executor: Arc<TransfersExecutor<B>>,
    backend: &B,
    options: &WorkerOptions,
) -> Result<Workers, Error> {
    let defaults = WorkerConfig::default();
    let config = WorkerConfig {
        concurrency: options.concurrency.max(1),
        // A worker takes at most twice its concurrency from the transport at a time, so that
        // the processes of a small job share its transfers (with the default, 256, the first
        // process to fetch would take them all; a service with a steady stream of work keeps
        // the default and its batching).
        max_in_flight: options.concurrency.max(1) * 2,
        fetch_wait: Duration::from_millis(100),
        after_requests: Some(FRAUD_VERDICTS.to_owned()),
        // Most transfers leave one hot account: with several processes of 8 deliveries each
        // on PostgreSQL, dozens of runs on that account are computed at once and only one of
        // them commits each time. Give a run more re-runs than the default 32 before it is
        // dead-lettered, so that it does not starve.
        reruns: Backoff {
            max_attempts: Some(RERUNS),
            ..defaults.reruns
        },
        ..defaults
    };
    let transfer = Worker::new(Arc::clone(&executor), TransferHandler)
        .with_config(config.clone())
        .load_with(LoadWith::new(load::transfer_input::<B::Store>));
    let settle = Worker::new(Arc::clone(&executor), SettleHandler)
        .with_config(WorkerConfig {
            // The `transfer` worker runs the relay; one per process is enough.
            relay: None,
            after_requests: None,
            ..config
        })
        .load_with(LoadWith::new(load::settle_input::<B::Store>));

    let (stop, stopped) = watch::channel(false);
    let watch = async {
        let deadline = tokio::time::Instant::now() + options.patience;
        // A failed look (a server restarting) is looked at again until the patience runs out.
        let result = loop {
            let failed = match drained(backend).await {
                Ok(true) => break Ok(()),
                Ok(false) => None,
                Err(e) => Some(e),
            };
            if tokio::time::Instant::now() >= deadline {
                break Err(failed.unwrap_or_else(|| Error::Timeout {
                    what: format!(
                        "the workers did not handle every transfer within {}s",
                        options.patience.as_secs()
                    ),
                }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Stop the workers whatever happened.
        stop.send_replace(true);
        result
    };
    let (transfer_report, settle_report, watched) = tokio::join!(
        transfer.run(until(stopped.clone())),
        settle.run(until(stopped)),
        watch,
    );
    watched?;
    Ok(Workers {
        transfer: transfer_report.into(),
        settle: settle_report.into(),
    })
}

/// Resolves once told to stop.
async fn until(mut stopped: watch::Receiver<bool>) {
    // An error means the sender is gone: stop as well.
    let _ = stopped.wait_for(|stop| *stop).await;
}
