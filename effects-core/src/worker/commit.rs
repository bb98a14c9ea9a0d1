//! The commit stage: owns the group commit — a [`Batch`] of decided runs committed in ONE store
//! transaction ([`Executor::commit_batch`](crate::executor::Executor::commit_batch)) — and turns
//! each run's result into how its delivery is [`Settled`]. A batch whose transaction fails is
//! committed again run by run, in order, so that one run the store refuses cannot hold back the
//! others.

use std::time::Instant;

use tracing::Instrument;

use super::decide::Decided;
use super::order::JobId;
use super::{Inner, bump};
use crate::executor::{BatchItem, Committed, Mutant, RunError, RunOptions};
use crate::handler::Handler;
use crate::http::HttpClient;
use crate::store::{Store, StoreError, StoreErrorKind};
use crate::transport::Transport;
use crate::worker::{Acknowledge, GroupCommit, Inputs};

/// Decided runs waiting for their commit, in the order they were decided (two runs of one
/// partition key are never in one batch: the second is decided only once the first settled).
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub(super) runs: Vec<(JobId, Decided)>,
    /// When the first run joined.
    since: Option<Instant>,
}

impl Batch {
    pub(super) fn push(&mut self, job: JobId, decided: Decided) {
        self.since.get_or_insert_with(Instant::now);
        self.runs.push((job, decided));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// When the batch must commit even if more runs are being decided.
    pub(super) fn deadline(&self, group: Option<&GroupCommit>) -> Option<Instant> {
        let since = self.since?;
        Some(group.map_or(since, |g| since + g.max_wait))
    }

    /// Whether to commit now: it is full, nothing more is coming, or it waited long enough.
    pub(super) fn due(&self, group: Option<&GroupCommit>, more_coming: bool) -> bool {
        if self.runs.is_empty() {
            return false;
        }
        let Some(group) = group else {
            return true;
        };
        self.runs.len() >= group.max_runs
            || !more_coming
            || self.since.is_some_and(|s| s.elapsed() >= group.max_wait)
    }

    /// Takes the runs to commit now: all, or (without group commit) the first, or at most
    /// `max_runs`.
    pub(super) fn take(&mut self, group: Option<&GroupCommit>) -> Vec<(JobId, Decided)> {
        let max = group.map_or(1, |g| g.max_runs.max(1));
        let rest = if self.runs.len() > max {
            self.runs.split_off(max)
        } else {
            Vec::new()
        };
        let taken = std::mem::replace(&mut self.runs, rest);
        self.since = (!self.runs.is_empty()).then(Instant::now);
        taken
    }
}

/// How a committed (or refused) run's delivery settles.
#[derive(Debug)]
pub(super) enum Settled {
    /// Applied now, or a duplicate of a run applied before: acknowledge; dispatch its rows.
    Committed(Committed),
    /// Refused because what it was computed from changed: decide it again. The conflict, and
    /// the entity it is about.
    Conflict(String, String),
    /// The executor refused its effects: a dead letter.
    DeadLetter(String),
    /// The store failed: try again later.
    Retry(String),
}

impl<S, T, C, H, I> Inner<S, T, C, H, I>
where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
    I: Inputs<H, S>,
{
    /// Commits `runs` in one transaction (or, if that transaction fails, one by one).
    pub(super) async fn commit(&self, runs: Vec<(JobId, Decided)>) -> Vec<(JobId, Settled)> {
        let (ids, items): (Vec<JobId>, Vec<BatchItem>) =
            runs.into_iter().map(|(id, d)| (id, self.item(d))).unzip();
        let span = tracing::info_span!("effects.group_commit", runs = items.len());
        match self.executor.commit_batch(&items).instrument(span).await {
            Ok(results) => {
                bump(&self.counters.commits);
                let mut out = Vec::with_capacity(ids.len());
                for (id, result) in ids.into_iter().zip(results) {
                    out.push((id, self.settled(result).await));
                }
                out
            }
            Err(e) if items.len() > 1 => {
                tracing::warn!(error = %e, runs = items.len(), "a group commit failed: committing its runs one by one");
                let mut out = Vec::with_capacity(ids.len());
                for (id, item) in ids.into_iter().zip(&items) {
                    let settled = match self.executor.commit_batch(std::slice::from_ref(item)).await
                    {
                        Ok(mut results) => {
                            bump(&self.counters.commits);
                            match results.pop() {
                                Some(result) => self.settled(result).await,
                                None => Settled::Retry(missing().to_string()),
                            }
                        }
                        Err(source) => {
                            self.settled(Err(RunError::Store {
                                key: item.key.clone(),
                                source,
                            }))
                            .await
                        }
                    };
                    out.push((id, settled));
                }
                out
            }
            // One run (a batch of more is committed again run by run, above): the store's
            // error is that run's.
            Err(source) => match ids.into_iter().zip(&items).next() {
                Some((id, item)) => {
                    let result = Err(RunError::Store {
                        key: item.key.clone(),
                        source,
                    });
                    vec![(id, self.settled(result).await)]
                }
                None => Vec::new(),
            },
        }
    }

    fn item(&self, decided: Decided) -> BatchItem {
        BatchItem {
            key: decided.key,
            effects: decided.effects,
            options: RunOptions {
                after_requests: self.config.after_requests.clone(),
                reads: decided.reads,
                // Acknowledged inside the commit where the executor can (its log is in the
                // store's database), unless the worker must acknowledge through the transport.
                input: (self.config.acknowledge == Acknowledge::AtCommit).then_some(decided.input),
            },
        }
    }

    async fn settled(&self, result: Result<Committed, RunError>) -> Settled {
        match result {
            Ok(committed) => Settled::Committed(committed),
            Err(RunError::Conflict { conflict, .. }) => {
                Settled::Conflict(conflict.to_string(), conflict.entity().to_string())
            }
            Err(RunError::KeyReuse {
                key, original_tx, ..
            }) => {
                // Another delivery of this message was applied first, from inputs that have
                // changed since: the original run stands.
                tracing::warn!(%original_tx, %key, "a concurrent delivery applied this message first");
                match self.executor.find(&key).await {
                    Ok(Some(committed)) => Settled::Committed(committed),
                    Ok(None) => Settled::Retry(format!("the run of `{key}` vanished")),
                    Err(e) => Settled::Retry(e.to_string()),
                }
            }
            Err(e @ RunError::Invalid { .. }) => Settled::DeadLetter(e.to_string()),
            // The store refused the run's own values (`StoreErrorKind::Data`): no retry can
            // succeed, and the deliveries behind this one on its partition key would wait for ever.
            Err(RunError::Store { key, source })
                if source.is_permanent()
                    && self.executor.mutant() != Some(Mutant::RetryDataErrors) =>
            {
                Settled::DeadLetter(RunError::Store { key, source }.to_string())
            }
            Err(e @ (RunError::Store { .. } | RunError::Incomplete { .. })) => {
                if let RunError::Store { source, .. } = &e {
                    if source.kind() == StoreErrorKind::Environment {
                        tracing::error!(error = %e, "the database or its setup is wrong: the run waits until an operator fixes it");
                    }
                }
                Settled::Retry(e.to_string())
            }
        }
    }
}

fn missing() -> StoreError {
    StoreError::Corrupt {
        what: "commit".to_owned(),
        reason: "the store returned no result for the run".to_owned(),
    }
}
