//! The settle stage: owns what the transport is told about a delivery — acknowledged (its run
//! committed, or found committed before), dead-lettered with its reason, or given back — and
//! the hand-off of committed runs to dispatching (their requests and messages). It counts every
//! outcome and tells [`Worker::on_processed`](super::Worker::on_processed).

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::commit::Settled;
use super::decide::Decision;
use super::{Acknowledge, Inner, Processed, bump};
use crate::executor::{Committed, RunError};
use crate::handler::Handler;
use crate::http::HttpClient;
use crate::store::{DeadLetterKind, Store};
use crate::transport::{Delivery, Transport};
use crate::worker::Inputs;

/// A delivery whose run is committed, what it is told, and whether the commit acknowledged it.
pub(super) type Acked = (Arc<Delivery>, Processed, bool);

/// What a committed run's delivery is told.
pub(super) fn processed_of(committed: &Committed) -> Processed {
    if committed.is_duplicate() {
        Processed::Duplicate { tx: committed.tx() }
    } else {
        Processed::Applied { tx: committed.tx() }
    }
}

impl<S, T, C, H, I> Inner<S, T, C, H, I>
where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
    I: Inputs<H, S>,
{
    /// Counts an outcome (the worker's report and the metrics).
    fn count(&self, processed: &Processed) {
        let c = &self.counters;
        match processed {
            Processed::Applied { .. } => bump(&c.applied),
            Processed::Duplicate { .. } => bump(&c.duplicates),
            Processed::DeadLettered { .. } => {
                bump(&c.dead_lettered);
                crate::metrics::dead_lettered(DeadLetterKind::Input);
            }
            Processed::Retry { .. } => {}
        }
        crate::metrics::delivery_settled(H::DESCRIPTOR.name, processed.label());
    }

    fn told(&self, delivery: &Delivery, processed: &Processed) {
        if let Some(on_processed) = &self.on_processed {
            on_processed(delivery, processed);
        }
    }

    /// Acknowledges deliveries whose runs are committed, in one call to the transport — but
    /// for those the commit acknowledged itself (`true`: a log in the store's database).
    pub(super) async fn acknowledge(&self, settled: &[Acked]) {
        if settled.is_empty() {
            return;
        }
        for (_, processed, _) in settled {
            self.count(processed);
        }
        let deliveries: Vec<Delivery> = settled
            .iter()
            .filter(|(_, _, acked)| !acked)
            .map(|(d, _, _)| Delivery::clone(d))
            .collect();
        let mut results = if deliveries.is_empty() {
            Vec::new()
        } else {
            self.executor.transport().ack_many(&deliveries).await
        }
        .into_iter();
        for (delivery, processed, acked) in settled {
            if !acked {
                if let Some(Err(e)) = results.next() {
                    bump(&self.counters.transport_errors);
                    tracing::error!(error = %e, message_id = %delivery.message_id, "the transport did not take the acknowledgement: the message comes back (a duplicate then)");
                }
            }
            self.told(delivery, processed);
        }
    }

    /// Dead-letters a delivery with its reason.
    pub(super) async fn dead_letter(&self, delivery: &Delivery, reason: String) -> Processed {
        tracing::warn!(%reason, message_id = %delivery.message_id, "dead-lettered");
        let processed = Processed::DeadLettered { reason };
        self.count(&processed);
        let Processed::DeadLettered { reason } = &processed else {
            unreachable!("built above")
        };
        if let Err(e) = self
            .executor
            .transport()
            .dead_letter(delivery, reason)
            .await
        {
            bump(&self.counters.transport_errors);
            tracing::error!(error = %e, "the transport did not take the dead letter: the message comes back");
        }
        self.told(delivery, &processed);
        processed
    }

    /// Gives a delivery back to the transport, to come back after `delay`. With the error of a
    /// failed attempt it is an outcome ([`Processed::Retry`], told and counted); without one
    /// (fetched but not started) it is not.
    pub(super) async fn give_back(
        &self,
        delivery: &Delivery,
        delay: Duration,
        error: Option<String>,
    ) -> Option<Processed> {
        if let Err(e) = self.executor.transport().nack(delivery, delay).await {
            bump(&self.counters.transport_errors);
            tracing::warn!(error = %e, "could not give back a delivery: it comes back after its visibility");
        }
        let processed = error.map(|error| Processed::Retry { error, delay });
        if let Some(p) = &processed {
            bump(&self.counters.retried);
            self.count(p);
            self.told(delivery, p);
        } else {
            bump(&self.counters.given_back);
        }
        processed
    }

    /// Dispatches committed runs' requests and messages (logging what could not be finished:
    /// the relay finishes it).
    pub(super) async fn dispatch(&self, committed: Vec<Committed>) {
        if committed.is_empty() {
            return;
        }
        for result in self.executor.dispatch(committed).await {
            if let Err(e @ RunError::Incomplete { .. }) = &result {
                tracing::warn!(error = %e, "dispatching stopped: the relay finishes it");
            }
        }
    }

    /// Acknowledges and dispatches committed runs, in the configured order.
    pub(super) async fn settle_committed(&self, runs: Vec<(Arc<Delivery>, Committed)>) {
        let (acks, committed): (Vec<Acked>, Vec<Committed>) = runs
            .into_iter()
            .map(|(d, c)| ((d, processed_of(&c), c.acknowledged()), c))
            .unzip();
        match self.config.acknowledge {
            Acknowledge::AtCommit | Acknowledge::AfterCommit => {
                self.acknowledge(&acks).await;
                self.dispatch(committed).await;
            }
            Acknowledge::AfterEffects => {
                self.dispatch(committed).await;
                self.acknowledge(&acks).await;
            }
        }
    }
}

/// [`Worker::process`](super::Worker::process): one delivery, decided, committed alone,
/// settled and dispatched.
pub(super) async fn process_alone<S, T, C, H, I>(
    inner: &Arc<Inner<S, T, C, H, I>>,
    delivery: Delivery,
) -> Processed
where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
    I: Inputs<H, S>,
{
    let span = tracing::info_span!(
        "effects.delivery",
        key = tracing::field::Empty,
        message_id = %delivery.message_id,
        deliveries = delivery.deliveries,
    );
    async {
        bump(&inner.counters.deliveries);
        let delivery = Arc::new(delivery);
        if let Some(processed) = inner.past_max_deliveries(&delivery, 0, None) {
            let Processed::DeadLettered { reason } = processed else {
                return processed;
            };
            return inner.dead_letter(&delivery, reason).await;
        }
        // Called on its own, a delivery may be one seen before: its run is looked up first.
        let mut check = true;
        let mut reruns: u32 = 0;
        loop {
            let settled = match inner.decide(&delivery, check).await {
                Decision::Run(decided) => match inner.commit(vec![(0, decided)]).await.pop() {
                    Some((_, settled)) => settled,
                    None => Settled::Retry("the commit gave no result".to_owned()),
                },
                Decision::Found(committed) => Settled::Committed(committed),
                Decision::DeadLetter(reason) => Settled::DeadLetter(reason),
                Decision::Retry(error) | Decision::NotYet(error) => Settled::Retry(error),
            };
            match settled {
                Settled::Committed(committed) => {
                    let processed = processed_of(&committed);
                    inner
                        .settle_committed(vec![(Arc::clone(&delivery), committed)])
                        .await;
                    return processed;
                }
                Settled::Conflict(conflict, _) => {
                    inner.conflicted();
                    match inner.rerun_delay(&mut reruns, &conflict) {
                        Ok(delay) => {
                            tokio::time::sleep(delay).await;
                            check = false;
                        }
                        Err(reason) => return inner.dead_letter(&delivery, reason).await,
                    }
                }
                Settled::DeadLetter(reason) => return inner.dead_letter(&delivery, reason).await,
                Settled::Retry(error) => {
                    tracing::warn!(%error, "failed for now: given back");
                    let delay = inner.config.retry.delay(delivery.deliveries);
                    return inner
                        .give_back(&delivery, delay, Some(error))
                        .await
                        .unwrap_or(Processed::Retry {
                            error: String::new(),
                            delay,
                        });
                }
            }
        }
    }
    .instrument(span)
    .await
}

impl<S, T, C, H, I> Inner<S, T, C, H, I>
where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
    I: Inputs<H, S>,
{
    /// Counts a run refused by read validation.
    pub(super) fn conflicted(&self) {
        bump(&self.counters.conflicts);
        crate::metrics::conflict(H::DESCRIPTOR.name);
    }

    /// After a conflict: the delay before re-running (counting the re-run), or, past
    /// [`WorkerConfig::reruns`](super::WorkerConfig::reruns), the dead letter's reason.
    pub(super) fn rerun_delay(&self, reruns: &mut u32, conflict: &str) -> Result<Duration, String> {
        if self
            .config
            .reruns
            .max_attempts
            .is_some_and(|max| *reruns >= max)
        {
            return Err(format!(
                "gave up after {reruns} re-runs, each refused because its input had changed: {conflict}"
            ));
        }
        // A handler is pure: calling it again on fresh inputs has no effect of its own, and
        // nothing of the refused run was written.
        *reruns += 1;
        bump(&self.counters.reruns);
        crate::metrics::rerun(H::DESCRIPTOR.name);
        let delay = self.config.reruns.delay(*reruns);
        tracing::debug!(%conflict, reruns = *reruns, ?delay, "conflict: running the handler again on fresh inputs");
        Ok(delay)
    }

    /// A dead letter if the delivery has been tried [`WorkerConfig::max_deliveries`] times:
    /// by the broker (`deliveries - 1` earlier deliveries) and by this worker (`retries`).
    ///
    /// [`WorkerConfig::max_deliveries`]: super::WorkerConfig::max_deliveries
    pub(super) fn past_max_deliveries(
        &self,
        delivery: &Delivery,
        retries: u32,
        last_error: Option<&str>,
    ) -> Option<Processed> {
        let max = self.config.max_deliveries?;
        let attempts = delivery
            .deliveries
            .saturating_sub(1)
            .saturating_add(retries);
        (attempts >= max).then(|| Processed::DeadLettered {
            reason: match last_error {
                Some(error) => {
                    format!("gave up after {attempts} attempts; the last failed with: {error}")
                }
                None => format!("gave up after {attempts} deliveries"),
            },
        })
    }
}
