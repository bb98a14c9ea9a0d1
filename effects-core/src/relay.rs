//! The relay: finishes what runs left pending, and prunes what is old.
//!
//! A run leaves outbox rows pending when its process dies between the commit and the end of
//! dispatching, when the broker is down, or when a request keeps failing. Every such row is
//! leased (or due for a retry at `next attempt at`); once its lease expires any relay may claim
//! it. A dead process does not make anyone wait for its leases: every
//! [`RelayConfig::reap_every`] the relay asks the store for owners whose process is gone
//! ([`Store::reap_dead_owners`]), which frees their rows at once, and the same round claims
//! them. (A process alive but stuck keeps its rows until its lease expires.) Leases, not locks,
//! keep two relays from sending one row at once: a claim takes rows whose lease is free and
//! stamps them with the claimant's name and an expiry, in one store transaction. (A PostgreSQL store will claim with `FOR UPDATE SKIP LOCKED` under the same
//! trait.) Claims keep the order rules: a run's requests one after the other, its messages only
//! after its requests, and messages with one partition key in the order they became ready.
//!
//! Pruning removes dispatched outbox rows of finished runs, finished runs with no rows left, and
//! log messages every consumer acknowledged — each only once older than its [`Retention`]. It
//! never removes an undispatched row or a run still in progress.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::executor::{Executor, Mutant, RelayReport};
use crate::http::HttpClient;
use crate::store::{PruneOlderThan, PruneReport, Reaped, Store, StoreError};
use crate::transport::Transport;

/// How long things are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Dispatched outbox rows of finished runs. Default 1 day.
    pub dispatched_rows: Duration,
    /// Finished runs (the idempotency records). A message redelivered after this is applied
    /// again, so keep it longer than the broker can redeliver. Default 7 days.
    pub completed_runs: Duration,
    /// Log messages acknowledged by every consumer of their topic. Default 7 days.
    pub log_messages: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            dispatched_rows: Duration::from_secs(24 * 3600),
            completed_runs: Duration::from_secs(7 * 24 * 3600),
            log_messages: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Retention {
    /// What pruning may remove under this retention: ages, measured by the store's clock.
    pub fn older_than(&self) -> PruneOlderThan {
        PruneOlderThan {
            outbox_dispatched: Some(self.dispatched_rows),
            runs_completed: Some(self.completed_runs),
            log_published: Some(self.log_messages),
        }
    }
}

/// Relay settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// How long to sleep when a round found nothing to do. Default 500 ms.
    pub interval: Duration,
    /// Rows claimed per round. Default 100.
    pub batch: usize,
    /// What pruning keeps; `None` disables pruning. Default [`Retention::default`].
    pub retention: Option<Retention>,
    /// How often to look for dead owners and free their rows ([`Relay::reap`]): a process
    /// killed with work in flight has it taken over within about this plus `interval`. Default
    /// 1 s.
    pub reap_every: Duration,
    /// How often to prune. Default 10 min.
    pub prune_every: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            interval: Duration::from_millis(500),
            batch: 100,
            retention: Some(Retention::default()),
            reap_every: Duration::from_secs(1),
            prune_every: Duration::from_secs(600),
        }
    }
}

/// Totals of a relay's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayTotals {
    /// Rounds run.
    pub rounds: u64,
    /// Rounds that failed (store errors; logged and retried).
    pub failed_rounds: u64,
    /// What the rounds did, summed.
    pub dispatched: RelayReport,
    /// What pruning removed, summed.
    pub pruned: PruneReport,
    /// Dead owners reaped.
    pub reaped_owners: u64,
    /// Rows their leases were freed from.
    pub reaped_rows: u64,
}

/// Dispatches pending outbox rows left by crashed or failed runs. Run one per process (more are
/// safe: leases keep them apart).
///
/// ```no_run
/// # use std::sync::Arc;
/// # use effects_core::executor::Executor;
/// # use effects_core::relay::Relay;
/// # use effects_core::store::SqliteStore;
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let store = SqliteStore::open("service.db")?;
/// let executor = Arc::new(Executor::builder(store.clone(), store.log()).owner("host-1").build());
/// let relay = Relay::new(Arc::clone(&executor));
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let task = tokio::spawn(async move { relay.run(async { let _ = stopped.await; }).await });
/// // ... later
/// let _ = stop.send(());
/// let totals = task.await?;
/// # Ok(()) }
/// ```
pub struct Relay<S, T, C> {
    executor: Arc<Executor<S, T, C>>,
    config: RelayConfig,
}

impl<S, T, C> std::fmt::Debug for Relay<S, T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: Store, T: Transport, C: HttpClient> Relay<S, T, C> {
    /// A relay with the default configuration.
    pub fn new(executor: Arc<Executor<S, T, C>>) -> Self {
        Relay {
            executor,
            config: RelayConfig::default(),
        }
    }

    /// Replaces the configuration.
    #[must_use]
    pub fn with_config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// One round: claim and dispatch up to `batch` due rows, finish stalled runs.
    pub async fn tick(&self) -> Result<RelayReport, StoreError> {
        self.executor
            .dispatch_due(self.config.batch)
            .instrument(tracing::info_span!("effects.relay"))
            .await
            .inspect(|report| crate::metrics::relay_round(report.claimed))
    }

    /// Frees the rows of owners whose process is gone ([`Store::reap_dead_owners`]), so that
    /// a round claims them; [`Relay::run`] does it every [`RelayConfig::reap_every`], before the
    /// round.
    pub async fn reap(&self) -> Result<Reaped, StoreError> {
        if self.executor.is_mutant(Mutant::NoReaping) {
            return Ok(Reaped::default());
        }
        let reaped = self
            .executor
            .store()
            .reap_dead_owners()
            .instrument(tracing::info_span!("effects.reap"))
            .await?;
        if !reaped.owners.is_empty() {
            tracing::warn!(
                owners = ?reaped.owners,
                rows = reaped.rows,
                "owners found dead: the rows they held are claimable now"
            );
        }
        Ok(reaped)
    }

    /// Prunes by the configured retention (nothing if it is `None`).
    pub async fn prune(&self) -> Result<PruneReport, StoreError> {
        match self.config.retention {
            None => Ok(PruneReport::default()),
            Some(retention) => {
                self.executor
                    .store()
                    .prune(retention.older_than())
                    .instrument(tracing::info_span!("effects.prune"))
                    .await
            }
        }
    }

    /// Runs rounds until `shutdown` resolves, then returns what it did. Store errors are logged
    /// and the round is retried after `interval`; they never end the loop. A round in progress
    /// when `shutdown` resolves is finished first. A round starts by reaping dead owners when
    /// `reap_every` has passed since the last time (the first round always does). (The executor
    /// reclaims the leases of a previous process with its owner name before its first claim.)
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> RelayTotals {
        let mut totals = RelayTotals::default();
        tokio::pin!(shutdown);
        let mut last_prune = Instant::now();
        let mut last_reap: Option<Instant> = None;
        loop {
            totals.rounds += 1;
            if last_reap.is_none_or(|at| at.elapsed() >= self.config.reap_every) {
                last_reap = Some(Instant::now());
                match self.reap().await {
                    Ok(reaped) => {
                        totals.reaped_owners += reaped.owners.len() as u64;
                        totals.reaped_rows += reaped.rows;
                    }
                    Err(e) => tracing::error!(error = %e, "reaping dead owners failed"),
                }
            }
            let busy = match self.tick().await {
                Ok(report) => {
                    add_report(&mut totals.dispatched, &report);
                    report.claimed >= self.config.batch
                }
                Err(e) => {
                    totals.failed_rounds += 1;
                    tracing::error!(error = %e, "relay round failed");
                    false
                }
            };
            if self.config.retention.is_some() && last_prune.elapsed() >= self.config.prune_every {
                last_prune = Instant::now();
                match self.prune().await {
                    Ok(p) => {
                        totals.pruned.outbox_rows += p.outbox_rows;
                        totals.pruned.runs += p.runs;
                        totals.pruned.log_messages += p.log_messages;
                    }
                    Err(e) => tracing::error!(error = %e, "pruning failed"),
                }
            }
            let pause = if busy {
                Duration::ZERO
            } else {
                self.config.interval
            };
            tokio::select! {
                biased;
                () = &mut shutdown => return totals,
                () = tokio::time::sleep(pause) => {}
                // Dispatching left rows behind that are due now.
                () = self.executor.due.notified() => {}
            }
        }
    }
}

fn add_report(total: &mut RelayReport, report: &RelayReport) {
    total.claimed += report.claimed;
    total.finished_runs += report.finished_runs;
    total.progress.requests_sent += report.progress.requests_sent;
    total.progress.messages_dispatched += report.progress.messages_dispatched;
    total.progress.dead_lettered += report.progress.dead_lettered;
    total.progress.pending += report.progress.pending;
}
