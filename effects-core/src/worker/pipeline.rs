//! The pipeline: the worker's loop. It owns every delivery from fetch to settle (a [`Job`]) and
//! moves it through the stages — fetch, order, decide, commit, settle — starting each stage's
//! work as a task and taking its result back here, so that the whole life of a delivery reads
//! in one place: [`run`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::task::JoinSet;
use tracing::{Instrument, info_span};

use super::commit::{Batch, Settled};
use super::decide::Decision;
use super::fetch::Fetcher;
use super::hot::{HotEntities, Refused};
use super::order::{JobId, KeyQueues};
use super::{Acknowledge, Inner, Processed, bump, heartbeat};
use crate::executor::{Committed, Mutant};
use crate::handler::{Handler, message_key};
use crate::http::HttpClient;
use crate::relay::Relay;
use crate::store::{BlockedInput, Store};
use crate::transport::{Delivery, Transport, TransportError};
use crate::worker::Inputs;

/// Dispatches (of committed batches' requests and messages) running at once; past it, the
/// next commit waits.
const MAX_DISPATCHES: usize = 8;

/// Keys looked up in one store call at most.
const CHECK_BATCH: usize = 512;

/// Where a delivery is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Behind an earlier delivery of its partition key.
    Queued,
    /// Its turn: waiting for the look-up of its key (a run may exist already).
    ToCheck,
    /// Its key being looked up, with others.
    Checking,
    /// Its turn: waiting for a decide slot.
    Ready,
    /// Being decided.
    Deciding,
    /// Decided; its run waits in the batch.
    Decided,
    /// Its run is being committed.
    Committing,
    /// Waiting to be decided again (a retry, or a re-run after a conflict).
    Waiting,
    /// Being acknowledged, dead-lettered or given back (and, acknowledged after its effects,
    /// dispatched).
    Settling,
}

impl Stage {
    /// Whether the delivery is in work (it finishes when the worker stops) rather than waiting
    /// to start (it is given back).
    fn started(self) -> bool {
        matches!(
            self,
            Stage::Deciding | Stage::Decided | Stage::Committing | Stage::Settling
        )
    }
}

/// One delivery in the worker.
struct Job {
    delivery: Arc<Delivery>,
    stage: Stage,
    /// Attempts that failed for now in this worker.
    retries: u32,
    /// Re-runs after conflicts.
    reruns: u32,
    /// Attempts whose loader said "not yet".
    not_yet: u32,
    /// The last failure, for the dead letter past `max_deliveries`, or the give-back.
    last_error: Option<String>,
    /// Whether it is known that no run was committed under its key (looked up, or refused by a
    /// conflict since); otherwise it is looked up before the handler is called.
    checked: bool,
    /// When it was fetched or last extended.
    extended: Instant,
    /// When its first attempt failed for now (a retry, a "not yet"), if one did.
    failing_since: Option<Instant>,
}

/// What a look-up of keys gives: the jobs looked up, and the run each has (or the error).
type Found = (Vec<JobId>, Result<Vec<Option<Committed>>, String>);

/// The tasks a stage runs; each returns the jobs it was about.
struct Tasks {
    checking: JoinSet<Found>,
    deciding: JoinSet<(JobId, Decision)>,
    committing: JoinSet<Vec<(JobId, Settled)>>,
    settling: JoinSet<Vec<JobId>>,
    dispatching: JoinSet<()>,
    beating: JoinSet<()>,
    /// At most one report of blocked inputs at a time, so they reach the store in order.
    reporting: JoinSet<()>,
}

struct Pipeline<S, T, C, H, I> {
    inner: Arc<Inner<S, T, C, H, I>>,
    jobs: BTreeMap<JobId, Job>,
    queues: KeyQueues,
    hot: HotEntities,
    to_check: VecDeque<JobId>,
    ready: VecDeque<JobId>,
    waiting: BinaryHeap<Reverse<(Instant, JobId)>>,
    batch: Batch,
    tasks: Tasks,
    next_id: JobId,
    stopping: bool,
    consumer: String,
    topic: String,
    /// How many inputs the last report said were blocked.
    reported_blocked: usize,
    /// The latest report, waiting for the one in flight.
    next_report: Option<Vec<BlockedInput>>,
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_owned())
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// Consumes `topic` as `consumer` until `shutdown` resolves, then stops fetching, gives back
/// what did not start and finishes the rest.
pub(super) async fn run<S, T, C, H, I>(
    inner: &Arc<Inner<S, T, C, H, I>>,
    consumer: String,
    topic: String,
    shutdown: impl Future<Output = ()>,
) where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
    I: Inputs<H, S>,
{
    let config = &inner.config;
    let span = info_span!("effects.worker", handler = H::DESCRIPTOR.name, %consumer, %topic);
    async {
        let relay_stop = Arc::new(tokio::sync::Notify::new());
        let relay_task = config.relay.map(|relay_config| {
            let relay = Relay::new(Arc::clone(&inner.executor)).with_config(relay_config);
            let stop = Arc::clone(&relay_stop);
            tokio::spawn(
                async move { relay.run(async move { stop.notified().await }).await }
                    .in_current_span(),
            )
        });

        let mut p = Pipeline::new(Arc::clone(inner), consumer.clone(), topic.clone());
        let mut fetcher = Fetcher::new(consumer, topic);
        type Fetch<'f> =
            Pin<Box<dyn Future<Output = Result<Vec<Delivery>, TransportError>> + Send + 'f>>;
        let mut fetch: Option<Fetch<'_>> = None;
        let mut beat = tokio::time::interval(heartbeat::every(config.visibility));
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            p.start_work();
            let room = p.room();
            if fetch.is_none() && !p.stopping && room > 0 && fetcher.not_before().is_none() {
                let request = fetcher.request(config, room);
                fetch = Some(Box::pin(inner.executor.transport().fetch(request)));
            }
            if p.stopping && fetch.is_none() && p.drained() {
                break;
            }
            let commit_at = p.commit_deadline();
            let wake_at = p.next_wake();
            let fetch_at = fetcher.not_before();
            let until = |t: Option<Instant>| {
                tokio::time::sleep_until(tokio::time::Instant::from_std(
                    t.unwrap_or_else(far_future),
                ))
            };
            tokio::select! {
                () = &mut shutdown, if !p.stopping => p.stop(),
                // A fetch in progress is never dropped: it may already hold leases.
                fetched = async {
                    match fetch.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if fetch.is_some() => {
                    fetch = None;
                    match fetched {
                        Ok(deliveries) => {
                            fetcher.succeeded();
                            p.fetched(deliveries);
                        }
                        Err(e) => {
                            bump(&inner.counters.fetch_errors);
                            let delay = fetcher.failed(&config.retry);
                            tracing::error!(error = %e, ?delay, "fetch failed");
                        }
                    }
                }
                Some(done) = p.tasks.checking.join_next(), if !p.tasks.checking.is_empty() => {
                    match done {
                        Ok((ids, found)) => p.checked(ids, found),
                        Err(e) => tracing::error!(error = %e, "a look-up task failed"),
                    }
                }
                Some(done) = p.tasks.deciding.join_next(), if !p.tasks.deciding.is_empty() => {
                    match done {
                        Ok((id, decision)) => p.decided(id, decision),
                        Err(e) => tracing::error!(error = %e, "a decide task failed"),
                    }
                }
                Some(done) = p.tasks.committing.join_next(), if !p.tasks.committing.is_empty() => {
                    match done {
                        Ok(settled) => p.committed(settled),
                        Err(e) => tracing::error!(error = %e, "a commit task failed"),
                    }
                }
                Some(done) = p.tasks.settling.join_next(), if !p.tasks.settling.is_empty() => {
                    match done {
                        Ok(ids) => p.settled(&ids),
                        Err(e) => tracing::error!(error = %e, "a settle task failed"),
                    }
                }
                Some(done) = p.tasks.dispatching.join_next(), if !p.tasks.dispatching.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "a dispatch task failed");
                    }
                }
                Some(_) = p.tasks.beating.join_next(), if !p.tasks.beating.is_empty() => {}
                Some(_) = p.tasks.reporting.join_next(), if !p.tasks.reporting.is_empty() => {
                    p.send_report();
                }
                () = until(commit_at), if commit_at.is_some() => {}
                () = until(wake_at), if wake_at.is_some() => p.wake_due(),
                () = until(fetch_at), if fetch_at.is_some() => {}
                _ = beat.tick() => p.heartbeat(),
            }
        }
        if p.reported_blocked > 0 {
            // Nothing is blocked here any more: say so before going.
            crate::metrics::blocked_inputs(H::DESCRIPTOR.name, 0);
            let owner = &inner.executor.config().owner;
            if let Err(e) = inner
                .executor
                .store()
                .report_blocked(owner, &p.consumer, &p.topic, Vec::new())
                .await
            {
                tracing::warn!(error = %e, "could not clear the blocked inputs reported to the store");
            }
        }
        relay_stop.notify_one();
        if let Some(task) = relay_task {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "the relay task failed");
            }
        }
        tracing::info!(report = ?inner.counters.report(), "worker stopped");
    }
    .instrument(span)
    .await;
}

impl<S, T, C, H, I> Pipeline<S, T, C, H, I>
where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
    I: Inputs<H, S>,
{
    fn new(inner: Arc<Inner<S, T, C, H, I>>, consumer: String, topic: String) -> Self {
        Pipeline {
            inner,
            jobs: BTreeMap::new(),
            queues: KeyQueues::default(),
            hot: HotEntities::default(),
            to_check: VecDeque::new(),
            ready: VecDeque::new(),
            waiting: BinaryHeap::new(),
            batch: Batch::default(),
            tasks: Tasks {
                checking: JoinSet::new(),
                deciding: JoinSet::new(),
                committing: JoinSet::new(),
                settling: JoinSet::new(),
                dispatching: JoinSet::new(),
                beating: JoinSet::new(),
                reporting: JoinSet::new(),
            },
            next_id: 0,
            stopping: false,
            consumer,
            topic,
            reported_blocked: 0,
            next_report: None,
        }
    }

    /// How many more deliveries the worker can take.
    fn room(&self) -> usize {
        self.inner
            .config
            .max_in_flight
            .max(1)
            .saturating_sub(self.jobs.len())
    }

    /// Whether everything started has finished.
    fn drained(&self) -> bool {
        self.jobs.is_empty()
            && self.batch.is_empty()
            && self.tasks.checking.is_empty()
            && self.tasks.deciding.is_empty()
            && self.tasks.committing.is_empty()
            && self.tasks.settling.is_empty()
            && self.tasks.dispatching.is_empty()
            && self.tasks.beating.is_empty()
            && self.tasks.reporting.is_empty()
            && self.next_report.is_none()
    }

    fn stage(&mut self, id: JobId, stage: Stage) {
        if let Some(job) = self.jobs.get_mut(&id) {
            job.stage = stage;
        }
    }

    // ---- fetch → order ------------------------------------------------------------------

    fn fetched(&mut self, deliveries: Vec<Delivery>) {
        let mut give_back = Vec::new();
        for delivery in deliveries {
            bump(&self.inner.counters.deliveries);
            let id = self.next_id;
            self.next_id += 1;
            let delivery = Arc::new(delivery);
            let key = if self.inner.executor.mutant() == Some(Mutant::NoKeyOrder) {
                None
            } else {
                delivery.partition_key.as_deref()
            };
            let stage = if self.stopping {
                give_back.push((id, Arc::clone(&delivery), None));
                Stage::Settling
            } else if self.queues.push(key, id) {
                Stage::Ready
            } else {
                Stage::Queued
            };
            self.jobs.insert(
                id,
                Job {
                    checked: false,
                    delivery,
                    stage,
                    retries: 0,
                    reruns: 0,
                    not_yet: 0,
                    last_error: None,
                    extended: Instant::now(),
                    failing_since: None,
                },
            );
            if stage == Stage::Ready {
                self.enqueue(id);
            }
        }
        self.spawn_give_back(give_back);
    }

    /// A delivery whose turn has come: its key is looked up first (with others) unless that is
    /// known or done in the decide stage (a handler keyed by its input's business key knows
    /// its key only once the input is loaded).
    fn enqueue(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if H::DESCRIPTOR.key.is_none() && !job.checked {
            self.stage(id, Stage::ToCheck);
            self.to_check.push_back(id);
        } else {
            self.stage(id, Stage::Ready);
            self.ready.push_back(id);
        }
    }

    /// The delivery `id` is settled (or given back): the next of its key may start, and the
    /// next waiting on the entity it re-ran for may re-run.
    fn release(&mut self, id: JobId) {
        if let Some(next) = self.hot.settled(id) {
            self.rerun_turn(next);
        }
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let key = job.delivery.partition_key.clone();
        if let Some(next) = self.queues.settled(key.as_deref(), id) {
            if self
                .jobs
                .get(&next)
                .is_some_and(|j| j.stage == Stage::Queued)
            {
                self.enqueue(next);
            }
        }
    }

    // ---- decide -------------------------------------------------------------------------

    /// Starts what can start: a look-up of keys, decides (up to `concurrency`) and a commit.
    fn start_work(&mut self) {
        self.maybe_check();
        let concurrency = self.inner.config.concurrency.max(1);
        while self.tasks.deciding.len() < concurrency {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            if job.stage != Stage::Ready {
                continue;
            }
            if let Some(Processed::DeadLettered { reason }) = self.inner.past_max_deliveries(
                &job.delivery,
                job.retries,
                job.last_error.as_deref(),
            ) {
                self.dead_letter(id, reason);
                continue;
            }
            let delivery = Arc::clone(&job.delivery);
            let check = !job.checked;
            self.stage(id, Stage::Deciding);
            let inner = Arc::clone(&self.inner);
            let span = info_span!(
                "effects.delivery",
                key = tracing::field::Empty,
                message_id = %delivery.message_id,
                deliveries = delivery.deliveries,
            );
            self.tasks.deciding.spawn(
                async move {
                    let decision = AssertUnwindSafe(inner.decide(&delivery, check))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|panic| {
                            Decision::DeadLetter(format!(
                                "panicked while producing the input: {}",
                                panic_text(panic.as_ref())
                            ))
                        });
                    (id, decision)
                }
                .instrument(span),
            );
        }
        self.maybe_commit();
    }

    /// Looks up the keys of every delivery waiting for it, in one store call.
    fn maybe_check(&mut self) {
        if !self.tasks.checking.is_empty() || self.to_check.is_empty() {
            return;
        }
        let mut ids = Vec::with_capacity(self.to_check.len().min(CHECK_BATCH));
        let mut keys = Vec::with_capacity(ids.capacity());
        while ids.len() < CHECK_BATCH {
            let Some(id) = self.to_check.pop_front() else {
                break;
            };
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            if job.stage != Stage::ToCheck {
                continue;
            }
            let d = &job.delivery;
            keys.push(message_key(H::DESCRIPTOR.name, &d.topic, &d.message_id));
            ids.push(id);
        }
        if ids.is_empty() {
            return;
        }
        for id in &ids {
            self.stage(*id, Stage::Checking);
        }
        let inner = Arc::clone(&self.inner);
        self.tasks.checking.spawn(async move {
            let found = AssertUnwindSafe(inner.executor.find_many(keys))
                .catch_unwind()
                .await
                .map_err(|panic| panic_text(panic.as_ref()))
                .and_then(|r| r.map_err(|e| e.to_string()));
            (ids, found)
        });
    }

    fn checked(&mut self, ids: Vec<JobId>, found: Result<Vec<Option<Committed>>, String>) {
        let found = match found {
            Ok(found) if found.len() == ids.len() => found,
            Ok(_) => {
                let error = "the store answered a look-up of keys with a wrong count".to_owned();
                for id in ids {
                    self.retry(id, error.clone());
                }
                return;
            }
            Err(error) => {
                for id in ids {
                    self.retry(id, error.clone());
                }
                return;
            }
        };
        let mut duplicates = Vec::new();
        let mut give_back = Vec::new();
        for (id, committed) in ids.into_iter().zip(found) {
            match committed {
                Some(c) => duplicates.push((id, c)),
                None => {
                    let Some(job) = self.jobs.get_mut(&id) else {
                        continue;
                    };
                    job.checked = true;
                    if self.stopping {
                        job.stage = Stage::Settling;
                        give_back.push((id, Arc::clone(&job.delivery), None));
                    } else {
                        job.stage = Stage::Ready;
                        self.ready.push_back(id);
                    }
                }
            }
        }
        for (id, _, _) in &give_back {
            self.release(*id);
        }
        self.spawn_give_back(give_back);
        self.settle_committed(duplicates);
    }

    fn decided(&mut self, id: JobId, decision: Decision) {
        match decision {
            Decision::Run(decided) => {
                self.stage(id, Stage::Decided);
                self.batch.push(id, decided);
            }
            Decision::Found(committed) => self.settle_committed(vec![(id, committed)]),
            Decision::DeadLetter(reason) => self.dead_letter(id, reason),
            Decision::Retry(error) => self.retry(id, error),
            Decision::NotYet(reason) => self.not_yet(id, reason),
        }
    }

    /// The loader said "not yet": decided again after the wait's delay, or dead-lettered once
    /// the waits allowed are spent.
    fn not_yet(&mut self, id: JobId, reason: String) {
        let inner = Arc::clone(&self.inner);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        job.not_yet = job.not_yet.saturating_add(1);
        job.failing_since.get_or_insert_with(Instant::now);
        let waits = &inner.config.not_yet;
        if waits.max_attempts.is_some_and(|max| job.not_yet >= max) {
            let n = job.not_yet;
            self.dead_letter(
                id,
                format!("gave up after {n} attempts, each told not yet: {reason}"),
            );
            return;
        }
        let delay = waits.delay(job.not_yet);
        tracing::info!(%reason, ?delay, message_id = %job.delivery.message_id, "not yet: trying again later");
        job.last_error = Some(format!("not yet: {reason}"));
        self.wait(id, delay);
    }

    // ---- commit -------------------------------------------------------------------------

    fn commit_deadline(&self) -> Option<Instant> {
        // While a commit runs, or dispatching is at its bound, their end wakes the loop.
        if self.tasks.committing.is_empty() && self.tasks.dispatching.len() < MAX_DISPATCHES {
            self.batch.deadline(self.inner.config.group_commit.as_ref())
        } else {
            None
        }
    }

    fn maybe_commit(&mut self) {
        let group = self.inner.config.group_commit;
        // One group commit at a time (the next batch gathers meanwhile); without group
        // commit, as many single commits as deliveries being decided.
        let commits = group.map_or(self.inner.config.concurrency.max(1), |_| 1);
        let more_coming = !self.tasks.deciding.is_empty()
            || !self.ready.is_empty()
            || !self.tasks.checking.is_empty()
            || !self.to_check.is_empty();
        while self.tasks.committing.len() < commits
            && self.tasks.dispatching.len() < MAX_DISPATCHES
            && self.batch.due(group.as_ref(), more_coming)
        {
            let runs = self.batch.take(group.as_ref());
            let ids: Vec<JobId> = runs.iter().map(|(id, _)| *id).collect();
            for id in &ids {
                self.stage(*id, Stage::Committing);
            }
            let inner = Arc::clone(&self.inner);
            self.tasks.committing.spawn(async move {
                AssertUnwindSafe(inner.commit(runs))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| {
                        let error = format!("the commit panicked: {}", panic_text(panic.as_ref()));
                        ids.into_iter()
                            .map(|id| (id, Settled::Retry(error.clone())))
                            .collect()
                    })
            });
        }
    }

    fn committed(&mut self, settled: Vec<(JobId, Settled)>) {
        let mut committed = Vec::new();
        for (id, s) in settled {
            match s {
                Settled::Committed(c) => committed.push((id, c)),
                Settled::Conflict(conflict, entity) => self.conflict(id, conflict, &entity),
                Settled::DeadLetter(reason) => self.dead_letter(id, reason),
                Settled::Retry(error) => self.retry(id, error),
            }
        }
        self.settle_committed(committed);
    }

    // ---- settle -------------------------------------------------------------------------

    fn settle_committed(&mut self, runs: Vec<(JobId, Committed)>) {
        if runs.is_empty() {
            return;
        }
        let mut ids = Vec::with_capacity(runs.len());
        let mut with_delivery = Vec::with_capacity(runs.len());
        for (id, committed) in runs {
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            with_delivery.push((Arc::clone(&job.delivery), committed));
            ids.push(id);
        }
        for id in &ids {
            self.release(*id);
            self.stage(*id, Stage::Settling);
        }
        let inner = Arc::clone(&self.inner);
        match self.inner.config.acknowledge {
            Acknowledge::AtCommit | Acknowledge::AfterCommit => {
                let (acks, committed): (Vec<_>, Vec<_>) = with_delivery
                    .into_iter()
                    .map(|(d, c)| ((d, super::settle::processed_of(&c), c.acknowledged()), c))
                    .unzip();
                let dispatcher = Arc::clone(&inner);
                self.tasks.settling.spawn(async move {
                    let _ = AssertUnwindSafe(inner.acknowledge(&acks))
                        .catch_unwind()
                        .await;
                    ids
                });
                self.tasks.dispatching.spawn(async move {
                    let _ = AssertUnwindSafe(dispatcher.dispatch(committed))
                        .catch_unwind()
                        .await;
                });
            }
            Acknowledge::AfterEffects => {
                self.tasks.settling.spawn(async move {
                    let _ = AssertUnwindSafe(inner.settle_committed(with_delivery))
                        .catch_unwind()
                        .await;
                    ids
                });
            }
        }
    }

    fn dead_letter(&mut self, id: JobId, reason: String) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let delivery = Arc::clone(&job.delivery);
        self.release(id);
        self.stage(id, Stage::Settling);
        let inner = Arc::clone(&self.inner);
        self.tasks.settling.spawn(async move {
            let _ = AssertUnwindSafe(inner.dead_letter(&delivery, reason))
                .catch_unwind()
                .await;
            vec![id]
        });
    }

    /// A failure that may pass: decided again after the retry delay (or given back if the
    /// worker is stopping, or dead-lettered past `max_deliveries`).
    fn retry(&mut self, id: JobId, error: String) {
        let inner = Arc::clone(&self.inner);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        job.retries = job.retries.saturating_add(1);
        job.last_error = Some(error.clone());
        job.failing_since.get_or_insert_with(Instant::now);
        // A failed commit may have gone through: look for its run first.
        job.checked = false;
        if let Some(Processed::DeadLettered { reason }) =
            inner.past_max_deliveries(&job.delivery, job.retries, Some(&error))
        {
            self.dead_letter(id, reason);
            return;
        }
        bump(&inner.counters.retried);
        crate::metrics::delivery_settled(H::DESCRIPTOR.name, "retried");
        let delay = inner.config.retry.delay(job.retries);
        tracing::warn!(%error, ?delay, message_id = %job.delivery.message_id, "failed for now: trying again later");
        self.wait(id, delay);
    }

    /// A conflict: decided again on fresh inputs after the re-run delay, when it is its turn
    /// on the entity that changed (or dead-lettered past the re-runs allowed).
    fn conflict(&mut self, id: JobId, conflict: String, entity: &str) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        // Refused: nothing of the run was written.
        job.checked = true;
        job.last_error = Some(conflict);
        self.inner.conflicted();
        let (refused, passed) = self.hot.refused(id, entity);
        if let Some(next) = passed {
            self.rerun_turn(next);
        }
        match refused {
            Refused::Rerun => self.rerun_turn(id),
            Refused::Wait => {
                tracing::debug!(
                    entity,
                    "conflict: waiting for the re-run in progress on that entity"
                );
                if self.stopping {
                    self.wait(id, Duration::ZERO);
                } else {
                    self.stage(id, Stage::Waiting);
                }
            }
        }
    }

    /// A refused delivery's turn to re-run.
    fn rerun_turn(&mut self, id: JobId) {
        let inner = Arc::clone(&self.inner);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.stage != Stage::Waiting && job.stage != Stage::Committing {
            return;
        }
        let conflict = job.last_error.clone().unwrap_or_default();
        match inner.rerun_delay(&mut job.reruns, &conflict) {
            Ok(delay) => self.wait(id, delay),
            Err(reason) => self.dead_letter(id, reason),
        }
    }

    fn wait(&mut self, id: JobId, delay: Duration) {
        if self.stopping {
            let Some(job) = self.jobs.get(&id) else {
                return;
            };
            let give = vec![(id, Arc::clone(&job.delivery), job.last_error.clone())];
            self.release(id);
            self.stage(id, Stage::Settling);
            self.spawn_give_back(give);
            return;
        }
        self.stage(id, Stage::Waiting);
        self.waiting.push(Reverse((Instant::now() + delay, id)));
    }

    fn next_wake(&self) -> Option<Instant> {
        self.waiting.peek().map(|Reverse((at, _))| *at)
    }

    fn wake_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, id))) = self.waiting.peek().copied() {
            if at > now {
                break;
            }
            self.waiting.pop();
            if self
                .jobs
                .get(&id)
                .is_some_and(|j| j.stage == Stage::Waiting)
            {
                self.enqueue(id);
            }
        }
    }

    fn settled(&mut self, ids: &[JobId]) {
        for id in ids {
            self.jobs.remove(id);
        }
    }

    /// Gives deliveries back, one after the other in the order given (the order they were
    /// fetched in), so a key's deliveries come back in order.
    fn spawn_give_back(&mut self, deliveries: Vec<(JobId, Arc<Delivery>, Option<String>)>) {
        if deliveries.is_empty() {
            return;
        }
        let inner = Arc::clone(&self.inner);
        self.tasks.settling.spawn(async move {
            let mut ids = Vec::with_capacity(deliveries.len());
            for (id, delivery, error) in deliveries {
                let _ = AssertUnwindSafe(inner.give_back(&delivery, Duration::ZERO, error))
                    .catch_unwind()
                    .await;
                ids.push(id);
            }
            ids
        });
    }

    /// Stops: nothing more is fetched; what has not started is given back, in fetch order.
    fn stop(&mut self) {
        self.stopping = true;
        let not_started: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| !j.stage.started() && j.stage != Stage::Checking)
            .map(|(id, _)| *id)
            .collect();
        let mut give_back = Vec::with_capacity(not_started.len());
        for id in not_started {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            // An error only for deliveries that failed and waited to be tried again.
            let error = (job.stage == Stage::Waiting)
                .then(|| job.last_error.clone())
                .flatten();
            job.stage = Stage::Settling;
            let delivery = Arc::clone(&job.delivery);
            // Out of its key's queue, wherever it is (what is behind it goes back too).
            self.queues.settled(delivery.partition_key.as_deref(), id);
            give_back.push((id, delivery, error));
        }
        self.ready.clear();
        self.to_check.clear();
        self.spawn_give_back(give_back);
    }

    // ---- blocked inputs -----------------------------------------------------------------

    /// Reports the inputs failing for longer than `blocked_after` (and, once, that there are
    /// none any more): to the metrics, the log and the store.
    fn report_blocked(&mut self) {
        let after = self.inner.config.blocked_after;
        let now = Instant::now();
        let blocked: Vec<BlockedInput> = self
            .jobs
            .values()
            .filter_map(|job| {
                let since = job.failing_since?;
                let failing_for = now.saturating_duration_since(since);
                (failing_for >= after).then(|| BlockedInput {
                    partition_key: job.delivery.partition_key.clone(),
                    message_id: job.delivery.message_id.clone(),
                    failing_for,
                    attempts: job
                        .delivery
                        .deliveries
                        .saturating_sub(1)
                        .saturating_add(job.retries)
                        .saturating_add(job.not_yet),
                    reason: job.last_error.clone().unwrap_or_default(),
                })
            })
            .collect();
        if blocked.is_empty() && self.reported_blocked == 0 {
            return;
        }
        crate::metrics::blocked_inputs(H::DESCRIPTOR.name, blocked.len());
        if blocked.len() > self.reported_blocked {
            for b in &blocked {
                tracing::warn!(
                    partition_key = ?b.partition_key,
                    message_id = %b.message_id,
                    failing_for = ?b.failing_for,
                    attempts = b.attempts,
                    reason = %b.reason,
                    "an input keeps failing and holds up its partition key"
                );
            }
        }
        self.reported_blocked = blocked.len();
        self.next_report = Some(blocked);
        self.send_report();
    }

    /// Sends the latest report, unless one is in flight (its end sends the next).
    fn send_report(&mut self) {
        if !self.tasks.reporting.is_empty() {
            return;
        }
        let Some(blocked) = self.next_report.take() else {
            return;
        };
        let inner = Arc::clone(&self.inner);
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        self.tasks.reporting.spawn(async move {
            let owner = &inner.executor.config().owner;
            if let Err(e) = inner
                .executor
                .store()
                .report_blocked(owner, &consumer, &topic, blocked)
                .await
            {
                tracing::warn!(error = %e, "could not report the blocked inputs to the store");
            }
        });
    }

    // ---- heartbeats ---------------------------------------------------------------------

    fn heartbeat(&mut self) {
        self.report_blocked();
        if self.inner.executor.mutant() == Some(Mutant::NoHeartbeat) {
            return;
        }
        let now = Instant::now();
        let visibility = self.inner.config.visibility;
        let mut due = Vec::new();
        for job in self.jobs.values_mut() {
            if heartbeat::due(job.extended, now, visibility) {
                job.extended = now;
                due.push(Arc::clone(&job.delivery));
            }
        }
        if due.is_empty() {
            return;
        }
        let inner = Arc::clone(&self.inner);
        self.tasks.beating.spawn(async move {
            let _ = AssertUnwindSafe(inner.extend(due)).catch_unwind().await;
        });
    }
}
