//! Dispatching: what happens to a run's outbox rows after its commit — requests in order, the
//! after-requests step, messages in waves — under the leases the claim took, fenced on this
//! process's monotonic clock.
//!
//! The rules are in the [executor's documentation](super#fenced-sends).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use tracing::{Instrument, info_span};

use super::validate;
use super::{Executor, FaultPoint, Mutant, Progress};
use crate::http::{HttpClient, HttpError};
use crate::store::{
    Finish, Lease, OutboxKind, OutboxRow, RequestOutcome, RunRecord, RunStatus, Store, StoreError,
};
use crate::transport::{OutgoingMessage, Transport, message_headers as publish_headers};

/// The fence's margin is the lease divided by this...
pub(crate) const FENCE_MARGIN_DIVISOR: u32 = 10;
/// ... but never more than this.
pub(crate) const FENCE_MARGIN_MAX: Duration = Duration::from_secs(1);

/// How many published messages are marked dispatched in one store call.
const MARK_BATCH: usize = 128;

/// How many messages (of distinct partitions) are published at once.
const PUBLISH_WAVE: usize = 64;

/// How many runs with requests one dispatch drives at once (each run's requests in order).
pub(crate) const RUNS_AT_ONCE: usize = 64;

/// Until when this claimant holds each row it claimed, on its own monotonic clock (see the
/// [module docs](self)).
#[derive(Debug)]
pub(crate) struct Holds {
    lease: Duration,
    until: Mutex<HashMap<String, Instant>>,
    /// Off only under [`Mutant::NoFence`]: holds are then counted from when dispatching
    /// starts, not from when the claim was asked for, and nothing is checked right before a
    /// send — a holder paused between its claim and its sends believes it holds its rows.
    fenced: bool,
}

impl Holds {
    pub(crate) fn new(lease: Duration, mutant: Option<Mutant>) -> Holds {
        Holds {
            lease,
            until: Mutex::new(HashMap::new()),
            fenced: mutant != Some(Mutant::NoFence),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // Plain inserts and reads: a poisoned map is still consistent.
        self.until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Rows handed back by a store call made at `asked`.
    pub(crate) fn claimed<'r>(
        &self,
        asked: Instant,
        rows: impl IntoIterator<Item = &'r OutboxRow>,
    ) {
        let from = if self.fenced { asked } else { Instant::now() };
        let until = from + self.lease;
        let mut map = self.map();
        for row in rows {
            map.insert(row.id.clone(), until);
        }
    }

    fn renewed(&self, asked: Instant, ids: &[String]) {
        let until = asked + self.lease;
        let mut map = self.map();
        for id in ids {
            map.insert(id.clone(), until);
        }
    }

    fn remaining(&self, id: &str) -> Duration {
        self.map().get(id).map_or(Duration::ZERO, |until| {
            until.saturating_duration_since(Instant::now())
        })
    }

    /// Whether a third of the lease has passed since the row was claimed or renewed.
    fn due_for_renewal(&self, id: &str) -> bool {
        self.remaining(id) < self.lease.saturating_sub(self.lease / 3)
    }

    /// The margin under which a row is renewed right before it is sent.
    fn margin(&self) -> Duration {
        (self.lease / FENCE_MARGIN_DIVISOR).min(FENCE_MARGIN_MAX)
    }

    /// Whether the row's hold is too close to its end to send it without renewing first.
    fn lapsing(&self, id: &str) -> bool {
        self.remaining(id) <= self.margin()
    }
}

/// The lease under which a row was handed to this claimant.
pub(crate) fn claimed_lease(row: &OutboxRow) -> Result<Lease, StoreError> {
    row.lease.clone().ok_or_else(|| StoreError::Corrupt {
        what: format!("outbox row `{}`", row.id),
        reason: "a claimed row came back without its lease".to_owned(),
    })
}

/// The progress of `row`'s run.
fn of<'p>(progress: &'p mut HashMap<String, Progress>, row: &OutboxRow) -> &'p mut Progress {
    progress.entry(row.run_key.clone()).or_default()
}

impl<S: Store, T: Transport, C: HttpClient> Executor<S, T, C> {
    /// Renews, grouped by claim, the rows of `rows` that are due for it (a third of the lease
    /// passed since their claim or renewal) and returns the ids no longer held — another
    /// claimant took them after the lease expired, and this one must not touch them.
    pub(super) async fn keep_leases(
        &self,
        rows: &[OutboxRow],
        holds: &Holds,
    ) -> Result<HashSet<String>, StoreError> {
        let mut lost = HashSet::new();
        if self.mutant == Some(Mutant::NoLeaseRenewal) {
            return Ok(lost);
        }
        let due: Vec<&OutboxRow> = rows
            .iter()
            .filter(|r| holds.due_for_renewal(&r.id))
            .collect();
        if due.is_empty() {
            return Ok(lost);
        }
        let mut by_lease: BTreeMap<(String, i64), Vec<String>> = BTreeMap::new();
        for row in due {
            match &row.lease {
                Some(l) => by_lease
                    .entry((l.owner.clone(), l.token))
                    .or_default()
                    .push(row.id.clone()),
                None => {
                    lost.insert(row.id.clone());
                }
            }
        }
        for ((owner, token), ids) in by_lease {
            let lease = Lease { owner, token };
            let held = self.renew_held(ids.clone(), &lease, holds).await?;
            lost.extend(ids.into_iter().filter(|id| !held.contains(id)));
        }
        if !lost.is_empty() {
            tracing::warn!(
                lost = lost.len(),
                "leases lost while working: another claimant has those rows"
            );
        }
        Ok(lost)
    }

    /// Whether a row that failed again has had all the attempts it may have.
    fn gave_up(&self, row: &OutboxRow) -> bool {
        self.config
            .retry
            .max_attempts
            .is_some_and(|max| row.attempts >= max)
    }

    /// Renews `ids` under `lease`, noting the new holds; the ids still held.
    async fn renew_held(
        &self,
        ids: Vec<String>,
        lease: &Lease,
        holds: &Holds,
    ) -> Result<HashSet<String>, StoreError> {
        let asked = Instant::now();
        let held: Vec<String> = self.store.renew(ids, lease, self.config.lease).await?;
        holds.renewed(asked, &held);
        Ok(held.into_iter().collect())
    }

    /// The fence, right before `row` is sent: whether this claimant still holds it (renewing
    /// it first if its hold is about to end).
    async fn fenced(
        &self,
        row: &OutboxRow,
        lease: &Lease,
        holds: &Holds,
    ) -> Result<bool, StoreError> {
        if !holds.fenced || !holds.lapsing(&row.id) {
            self.fault(FaultPoint::Fenced, &row.id);
            return Ok(true);
        }
        let held = self.renew_held(vec![row.id.clone()], lease, holds).await?;
        if held.contains(&row.id) {
            tracing::info!(id = %row.id, "the lease was about to end before sending: renewed");
            self.fault(FaultPoint::Fenced, &row.id);
            Ok(true)
        } else {
            tracing::warn!(id = %row.id, "the lease ended before sending and another claimant has the row: not sent");
            Ok(false)
        }
    }

    /// Claims and dispatches what is pending of an existing run (the duplicate path).
    pub(super) async fn resume_record(&self, record: &RunRecord) -> Result<Progress, StoreError> {
        if record.status == RunStatus::Done {
            return Ok(Progress::default());
        }
        self.recover().await?;
        let holds = Holds::new(self.config.lease, self.mutant);
        let asked = Instant::now();
        let claimed = self
            .store
            .claim_run(&record.key, self.claim_options())
            .instrument(info_span!("effects.claim"))
            .await?;
        holds.claimed(asked, &claimed.rows);
        let mut progress = Progress {
            messages_dispatched: claimed.published_inline,
            ..Progress::default()
        };
        let (more, _) = self
            .drive(record, claimed.rows, record.outbox_count as usize, &holds)
            .await?;
        progress.add(more);
        let rows = self.store.outbox(&record.key).await?;
        progress.pending = rows.iter().filter(|r| r.is_pending()).count();
        Ok(progress)
    }

    /// Dispatches claimed rows of one run: requests in order, then the after-requests step,
    /// then messages. Returns the progress and the run's row count (after-requests included).
    pub(super) async fn drive(
        &self,
        record: &RunRecord,
        claimed: Vec<OutboxRow>,
        total: usize,
        holds: &Holds,
    ) -> Result<(Progress, usize), StoreError> {
        let mut progress = Progress::default();
        let mut total = total;
        if claimed.is_empty() && record.status != RunStatus::RequestsPending {
            return Ok((progress, total));
        }
        let (requests, mut messages): (Vec<OutboxRow>, Vec<OutboxRow>) = claimed
            .into_iter()
            .partition(|r| r.kind == OutboxKind::Request);
        if record.status == RunStatus::RequestsPending {
            let (sent, finished) = self
                .send_requests_then_finish(record, requests, holds)
                .await?;
            progress.add(sent);
            if let Some(rows) = finished {
                let count = self.store.run(&record.key).await?.map(|r| r.outbox_count);
                if let Some(count) = count {
                    total = total.max(count as usize);
                }
                messages.extend(rows);
            }
        }
        progress.add(self.send_messages(messages, holds).await?);
        Ok((progress, total))
    }

    /// Sends a run's claimed requests in order, and when they are all resolved, runs the
    /// after-requests step. Returns the finish step's claimed message rows, if it finished.
    pub(super) async fn send_requests_then_finish(
        &self,
        record: &RunRecord,
        requests: Vec<OutboxRow>,
        holds: &Holds,
    ) -> Result<(Progress, Option<Vec<OutboxRow>>), StoreError> {
        let mut progress = Progress::default();
        let span = info_span!("effects.requests", key = %record.key, tx = record.tx.0);
        for (i, row) in requests.iter().enumerate() {
            let lost = self.keep_leases(&requests[i..], holds).await?;
            let stop = if lost.contains(&row.id) {
                // Someone else owns this request now; the run's later requests wait for it.
                progress.pending += 1;
                true
            } else {
                self.send_request(row, &mut progress, holds)
                    .instrument(span.clone())
                    .await?
            };
            if stop {
                let rest: Vec<String> = requests[i + 1..]
                    .iter()
                    .filter(|r| !lost.contains(&r.id))
                    .map(|r| r.id.clone())
                    .collect();
                if !rest.is_empty() {
                    self.store.release(rest, &self.config.owner).await?;
                }
                return Ok((progress, None));
            }
        }
        let finished = self
            .finish(record, holds)
            .instrument(info_span!("effects.after_requests", key = %record.key, tx = record.tx.0))
            .await?;
        let rows = finished.map(|(rows, published_inline)| {
            progress.messages_dispatched += published_inline;
            rows
        });
        Ok((progress, rows))
    }

    /// Sends one request and records its outcome. Returns whether the run must stop here
    /// (the request is to be retried later, or another claimant has it).
    async fn send_request(
        &self,
        row: &OutboxRow,
        progress: &mut Progress,
        holds: &Holds,
    ) -> Result<bool, StoreError> {
        let lease = claimed_lease(row)?;
        let request = match row.request() {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("unreadable request: {e}");
                if self
                    .store
                    .record_request(&row.id, RequestOutcome::Failed { reason }, &lease)
                    .await?
                {
                    progress.dead_lettered += 1;
                } else {
                    progress.pending += 1;
                }
                return Ok(false);
            }
        };
        if !self.fenced(row, &lease, holds).await? {
            progress.pending += 1;
            return Ok(true);
        }
        let started = Instant::now();
        let send = self
            .http
            .send(&row.id, &request)
            .instrument(info_span!("effects.http", id = %row.id, endpoint = %row.destination));
        let Some(mut result) = self.while_held(send, row, &lease, holds).await? else {
            tracing::warn!(id = %row.id, "the lease was lost while the request was in flight: abandoned, another claimant has it");
            progress.pending += 1;
            return Ok(true);
        };
        super::record_request_metrics(&row.destination, started.elapsed(), &result);
        self.fault(FaultPoint::AfterHttpBeforeRecord, &row.id);
        crate::http::redact_result(&mut result, |name| {
            self.http.is_secret_header(&request.endpoint, name)
        });
        let outcome = match result {
            Ok(response) => RequestOutcome::Response { response },
            Err(HttpError::Rejected { response, .. }) => {
                tracing::warn!(id = %row.id, status = response.status, "request rejected: dead-lettered");
                RequestOutcome::Rejected { response }
            }
            Err(e @ HttpError::Exhausted { .. }) => {
                let error = e.to_string();
                if self.gave_up(row) {
                    tracing::error!(id = %row.id, %error, "request failed too often: dead-lettered");
                    RequestOutcome::Failed {
                        reason: format!("gave up after {} attempts: {error}", row.attempts),
                    }
                } else {
                    let delay = self.config.retry.delay(row.attempts);
                    tracing::warn!(id = %row.id, %error, ?delay, "request failed: retrying later");
                    if !self
                        .store
                        .retry_later(&row.id, &lease, &error, delay)
                        .await?
                    {
                        tracing::warn!(id = %row.id, "lease lost: another claimant has the request");
                    }
                    progress.pending += 1;
                    return Ok(true);
                }
            }
            Err(other) => {
                tracing::warn!(id = %row.id, error = %other, "request cannot succeed: dead-lettered");
                RequestOutcome::Failed {
                    reason: other.to_string(),
                }
            }
        };
        let success = outcome.is_success();
        if !self.store.record_request(&row.id, outcome, &lease).await? {
            // Another claimant took the row after this lease expired: its record stands, not
            // this one; the run goes on with whoever holds it now.
            tracing::warn!(id = %row.id, "lease lost: the outcome is not recorded");
            progress.pending += 1;
            return Ok(true);
        }
        if success {
            progress.requests_sent += 1;
        } else {
            progress.dead_lettered += 1;
            crate::metrics::dead_lettered(crate::store::DeadLetterKind::Request);
        }
        Ok(false)
    }

    /// Awaits `work` on `row` while renewing the row's lease every third of the lease; `None`
    /// (and `work` dropped) if the lease is lost meanwhile.
    async fn while_held<F: std::future::Future>(
        &self,
        work: F,
        row: &OutboxRow,
        lease: &Lease,
        holds: &Holds,
    ) -> Result<Option<F::Output>, StoreError> {
        tokio::pin!(work);
        let every = (self.config.lease / 3).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                biased;
                out = &mut work => return Ok(Some(out)),
                () = tokio::time::sleep(every) => {
                    if self.mutant == Some(Mutant::NoLeaseRenewal) {
                        continue;
                    }
                    let held = self.renew_held(vec![row.id.clone()], lease, holds).await?;
                    if !held.contains(&row.id) {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// The after-requests step: when every request of the run is resolved, computes the extra
    /// messages from the recorded responses and persists them with the run's messages made
    /// ready, in one transaction. `None` if the run is not ready or was finished by someone else.
    async fn finish(
        &self,
        record: &RunRecord,
        holds: &Holds,
    ) -> Result<Option<(Vec<OutboxRow>, usize)>, StoreError> {
        let mut after = Vec::new();
        if let Some(name) = &record.after_requests {
            let Some(hook) = self.hooks.get(name) else {
                tracing::error!(hook = %name, "after-requests hook not registered here: the run waits for a process that has it");
                return Ok(None);
            };
            let recorded = self.store.recorded_requests(&record.key).await?;
            let messages = match std::panic::catch_unwind(AssertUnwindSafe(|| {
                hook(recorded.as_slice())
            })) {
                Ok(m) => m,
                Err(_) => {
                    tracing::error!(hook = %name, "after-requests hook panicked: the run waits");
                    return Ok(None);
                }
            };
            // The run's own rows end at `outbox_count`; a run record from a fresh commit may
            // predate requests, so read the stored count.
            let count = match self.store.run(&record.key).await? {
                Some(r) => r.outbox_count,
                None => return Ok(None),
            };
            for (i, m) in messages.iter().enumerate() {
                let seq = count.saturating_add(u32::try_from(i).unwrap_or(u32::MAX));
                match validate::message_row(
                    seq,
                    i,
                    m,
                    &validate::Rules {
                        values: self.mutant != Some(Mutant::NoValueRules),
                        ..validate::Rules::new(&self.config.limits)
                    },
                ) {
                    Ok(row) => after.push(row),
                    Err(e) => {
                        tracing::error!(hook = %name, error = %e, "after-requests hook returned an invalid message: the run waits");
                        return Ok(None);
                    }
                }
            }
        }
        let asked = Instant::now();
        match self
            .store
            .finish_requests(&record.key, after, self.claim_options())
            .await?
        {
            Finish::Finished {
                claimed,
                published_inline,
                ..
            } => {
                holds.claimed(asked, &claimed);
                Ok(Some((claimed, published_inline)))
            }
            Finish::NotReady | Finish::AlreadyFinished => Ok(None),
        }
    }

    /// Publishes claimed message rows in order, marking each dispatched after the broker's
    /// acknowledgement. A row that fails is retried later, and the rows after it with the same
    /// topic and partition key are released (they must not overtake it); other partitions go on.
    pub(super) async fn send_messages(
        &self,
        rows: Vec<OutboxRow>,
        holds: &Holds,
    ) -> Result<Progress, StoreError> {
        let mut progress = Progress::default();
        for (_, p) in self.send_messages_by_run(rows, holds).await? {
            progress.add(p);
        }
        Ok(progress)
    }

    /// Publishes claimed message rows and marks them dispatched; what happened to them, by run
    /// key.
    pub(super) async fn send_messages_by_run(
        &self,
        rows: Vec<OutboxRow>,
        holds: &Holds,
    ) -> Result<HashMap<String, Progress>, StoreError> {
        let mut progress: HashMap<String, Progress> = HashMap::new();
        if rows.is_empty() {
            return Ok(progress);
        }
        let span = info_span!("effects.messages", count = rows.len());
        async {
            let mut blocked: HashSet<(String, String)> = HashSet::new();
            let mut held_back: Vec<&OutboxRow> = Vec::new();
            // Published rows are marked together, every `MARK_BATCH` and at the end: one
            // transaction for the messages of a batch of runs instead of one per message.
            let mut to_mark: Vec<(&OutboxRow, Lease)> = Vec::new();
            let mark_first = self.mutant == Some(Mutant::MarkBeforePublish);
            let mut next = 0;
            while next < rows.len() {
                let mut lost = self.keep_leases(&rows[next..], holds).await?;
                // A wave: the next rows, at most one per topic and partition key (a keyed
                // message waits for the one before it), published at once.
                let mut wave: Vec<(&OutboxRow, Lease)> = Vec::new();
                let mut in_wave: HashSet<(String, String)> = HashSet::new();
                while next < rows.len() && wave.len() < PUBLISH_WAVE {
                    let row = &rows[next];
                    let partition = row
                        .partition_key
                        .as_ref()
                        .map(|pk| (row.destination.clone(), pk.clone()));
                    if partition.as_ref().is_some_and(|p| in_wave.contains(p)) {
                        break;
                    }
                    next += 1;
                    if partition.as_ref().is_some_and(|p| blocked.contains(p)) {
                        held_back.push(row);
                        continue;
                    }
                    let lease = claimed_lease(row)?;
                    if lost.contains(&row.id) || !self.fenced(row, &lease, holds).await? {
                        lost.insert(row.id.clone());
                        of(&mut progress, row).pending += 1;
                        blocked.extend(partition);
                        continue;
                    }
                    in_wave.extend(partition);
                    wave.push((row, lease));
                }
                if mark_first {
                    for (row, lease) in &wave {
                        if self.store.mark_dispatched(&row.id, lease).await? {
                            of(&mut progress, row).messages_dispatched += 1;
                            self.fault(FaultPoint::AfterPublishBeforeMark, &row.id);
                        }
                    }
                }
                let published = join_all(wave.iter().map(|(row, _)| {
                    let message = OutgoingMessage {
                        id: row.id.clone(),
                        topic: row.destination.clone(),
                        partition_key: row.partition_key.clone(),
                        headers: publish_headers(&row.headers, &row.run_key, row.tx),
                        payload: row.payload.clone().into_bytes(),
                    };
                    self.transport
                        .publish(message)
                        .instrument(info_span!("effects.publish", id = %row.id, key = %row.run_key, tx = row.tx.0))
                }))
                .await;
                for ((row, lease), published) in wave.into_iter().zip(published) {
                    let partition = row
                        .partition_key
                        .as_ref()
                        .map(|pk| (row.destination.clone(), pk.clone()));
                    match published {
                        Ok(()) if mark_first => {}
                        Ok(()) => {
                            self.fault(FaultPoint::AfterPublishBeforeMark, &row.id);
                            to_mark.push((row, lease));
                            if to_mark.len() >= MARK_BATCH {
                                self.mark_published(&mut to_mark, &mut progress).await?;
                            }
                        }
                        Err(e) => {
                            let error = e.to_string();
                            if self.gave_up(row) {
                                tracing::error!(id = %row.id, %error, "message failed too often: dead-lettered");
                                let reason = format!("gave up after {} attempts: {error}", row.attempts);
                                if self.store.dead_letter(&row.id, &reason, Some(&lease)).await? {
                                    of(&mut progress, row).dead_lettered += 1;
                                    crate::metrics::dead_lettered(crate::store::DeadLetterKind::Message);
                                } else {
                                    of(&mut progress, row).pending += 1;
                                }
                                continue;
                            }
                            let delay = self.config.retry.delay(row.attempts);
                            tracing::warn!(id = %row.id, %error, ?delay, "publish failed: retrying later");
                            self.store
                                .retry_later(&row.id, &lease, &error, delay)
                                .await?;
                            of(&mut progress, row).pending += 1;
                            if let Some(p) = partition {
                                blocked.insert(p);
                            }
                        }
                    }
                }
            }
            self.mark_published(&mut to_mark, &mut progress).await?;
            if !held_back.is_empty() {
                for row in &held_back {
                    of(&mut progress, row).pending += 1;
                }
                let ids = held_back.iter().map(|r| r.id.clone()).collect();
                self.store.release(ids, &self.config.owner).await?;
            }
            Ok(progress)
        }
        .instrument(span)
        .await
    }

    /// Marks the published rows of `to_mark` dispatched (emptying it). A row whose lease was
    /// lost meanwhile stays pending: its new claimant publishes it again under the same id.
    async fn mark_published(
        &self,
        to_mark: &mut Vec<(&OutboxRow, Lease)>,
        progress: &mut HashMap<String, Progress>,
    ) -> Result<(), StoreError> {
        if to_mark.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(to_mark);
        let marked = self
            .store
            .mark_dispatched_many(
                rows.iter()
                    .map(|(row, lease)| (row.id.clone(), lease.clone()))
                    .collect(),
            )
            .await?;
        for ((row, _), marked) in rows.iter().zip(marked) {
            if marked {
                of(progress, row).messages_dispatched += 1;
            } else {
                tracing::warn!(id = %row.id, "lease lost: published, but another claimant marks the row");
                of(progress, row).pending += 1;
            }
        }
        Ok(())
    }

    /// Drives several runs' requests at once (each run's own in order), at most
    /// [`RUNS_AT_ONCE`] at a time; results in the order given.
    pub(super) async fn drive_many<'a, Fut, R>(&self, jobs: Vec<Fut>) -> Vec<R>
    where
        Fut: std::future::Future<Output = R> + 'a,
    {
        futures_util::stream::iter(jobs)
            .buffered(RUNS_AT_ONCE)
            .collect()
            .await
    }
}
