//! Real redeliveries, through the broker's own visibility timeout: a [`CountingTransport`]
//! drops the first acknowledgement of chosen messages (a lost ack: the message comes back
//! once its visibility passes), and [`StallFirstDelivery`] holds the first delivery of others
//! before the handler until their redelivery has been acknowledged (a worker stalled past the
//! visibility timeout: both deliveries reach the handler, one run may apply).
//!
//! Which messages are chosen depends on the message id only, so every process of a test
//! chooses the same ones. The transport also counts at the source what it is asked to
//! do: every publish attempt and every fetched delivery ([`tally`](super::tally)).

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use effects_core::Handler;
use effects_core::store::{Colocation, Store, Tracked};
use effects_core::transport::{Delivery, FetchRequest, OutgoingMessage, Transport, TransportError};
use effects_core::worker::{Inputs, LoadError};
use rusqlite::OptionalExtension;

use super::tally::{ACK_LOST, FETCH, PUBLISH, REDELIVERY, STALL, STALL_TIMEOUT, Tally};

/// What happens to a message's first delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Processed and acknowledged.
    Normal,
    /// Processed, but its acknowledgement is lost: redelivered after the visibility timeout.
    LoseFirstAck,
    /// Stalled before the handler until the redelivery was acknowledged.
    StallFirstDelivery,
}

/// Which messages are redelivered, and how.
#[derive(Debug)]
pub struct Redeliveries {
    lose_percent: u64,
    stall_percent: u64,
    max_stalls: usize,
    stall_limit: Duration,
    stalls: AtomicUsize,
    /// The messages whose first delivery is stalled right now: the process holding them is
    /// stalled, so it sends no heartbeat for them.
    stalled: Mutex<HashSet<String>>,
    /// Stalls that found every stall slot taken: their first ack is lost instead.
    switched: Mutex<HashSet<String>>,
    log_db: PathBuf,
    tally: Tally,
}

/// FNV-1a: a hash that is the same in every process and every run.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Redeliveries {
    /// `lose_percent` % of messages lose their first ack, `stall_percent` % stall on their first
    /// delivery; at most `max_stalls` stall at once (keep it below the worker's concurrency so
    /// the redelivery can be fetched) — a stall that finds no slot loses its first ack instead,
    /// so it is redelivered all the same. A stall waits at most `stall_limit`. `log_db` is the
    /// file of the log the inputs come from: a stall watches the redelivery's acknowledgement
    /// there, whichever process made it.
    pub fn new(
        lose_percent: u64,
        stall_percent: u64,
        max_stalls: usize,
        stall_limit: Duration,
        log_db: PathBuf,
        tally: Tally,
    ) -> Redeliveries {
        Redeliveries {
            lose_percent,
            stall_percent,
            max_stalls,
            stall_limit,
            stalls: AtomicUsize::new(0),
            stalled: Mutex::new(HashSet::new()),
            switched: Mutex::new(HashSet::new()),
            log_db,
            tally,
        }
    }

    /// No redeliveries on purpose (the transport only counts).
    pub fn none(tally: Tally) -> Redeliveries {
        Redeliveries::new(0, 0, 0, Duration::ZERO, PathBuf::new(), tally)
    }

    /// The fate of a message's first delivery. An id ending in a number `n` falls in bucket
    /// `37 n mod 100` (37 is prime to 100: every run of 100 consecutive numbers fills each
    /// bucket once, so the percentages are exact and the chosen messages spread out); any
    /// other id in a bucket by its hash.
    pub fn fate(&self, message_id: &str) -> Fate {
        let bucket = super::book::number(message_id)
            .map_or_else(|| fnv(message_id), |n| n.wrapping_mul(37))
            % 100;
        if bucket < self.lose_percent {
            Fate::LoseFirstAck
        } else if bucket < self.lose_percent + self.stall_percent {
            Fate::StallFirstDelivery
        } else {
            Fate::Normal
        }
    }

    /// The tally events are recorded in.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    fn loses_ack(&self, delivery: &Delivery) -> bool {
        delivery.deliveries == 1
            && (self.fate(&delivery.message_id) == Fate::LoseFirstAck
                || self
                    .switched
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains(&delivery.message_id))
    }

    /// Whether this delivery stalls; takes a stall slot if so.
    fn stalls(&self, delivery: &Delivery) -> bool {
        if delivery.deliveries != 1 || self.fate(&delivery.message_id) != Fate::StallFirstDelivery {
            return false;
        }
        let taken = self
            .stalls
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_stalls).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            self.switched
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(delivery.message_id.clone());
        }
        taken
    }

    /// Waits (bounded) until the message's redelivery is acknowledged in the log.
    async fn stall(&self, delivery: &Delivery) {
        self.tally.record(STALL, &delivery.message_id);
        self.stalled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(delivery.message_id.clone());
        let started = Instant::now();
        loop {
            let db = self.log_db.clone();
            let d = delivery.clone();
            let acked = tokio::task::spawn_blocking(move || acked_in_log(&db, &d))
                .await
                .unwrap_or(Ok(false))
                .unwrap_or(false);
            if acked {
                break;
            }
            if started.elapsed() > self.stall_limit {
                self.tally.record(STALL_TIMEOUT, &delivery.message_id);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stalled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&delivery.message_id);
        self.stalls.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether this delivery is the stalled first delivery of its message.
    fn is_stalled(&self, delivery: &Delivery) -> bool {
        delivery.deliveries == 1
            && self
                .stalled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&delivery.message_id)
    }
}

/// Whether the consumer has acknowledged the delivery's message, read from the log's file.
fn acked_in_log(db: &std::path::Path, d: &Delivery) -> rusqlite::Result<bool> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let seq = i64::try_from(d.sequence).unwrap_or(i64::MAX);
    let row: Option<i64> = conn
        .query_row(
            "SELECT 1 WHERE EXISTS (SELECT 1 FROM log_deliveries WHERE consumer = ?1 AND topic = ?2 \
             AND seq = ?3 AND acked_at_ms IS NOT NULL) OR EXISTS (SELECT 1 FROM log_consumers \
             WHERE consumer = ?1 AND topic = ?2 AND acked_through >= ?3)",
            rusqlite::params![d.consumer, d.topic, seq],
            |r| r.get(0),
        )
        .optional()?;
    Ok(row.is_some())
}

/// A [`Transport`] that counts publish attempts and fetched deliveries, and loses the first
/// acknowledgement of the messages [`Redeliveries`] chose. It keeps the inner transport's
/// colocation, so a log in the store's file is still written inside the run's commit (those
/// messages never reach `publish`).
#[derive(Clone, Debug)]
pub struct CountingTransport<T> {
    inner: T,
    plan: Arc<Redeliveries>,
}

impl<T> CountingTransport<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, plan: Arc<Redeliveries>) -> Self {
        CountingTransport { inner, plan }
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }
}

impl<T: Transport> Transport for CountingTransport<T> {
    fn colocation(&self) -> Option<Colocation> {
        self.inner.colocation()
    }

    fn publish(
        &self,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.plan.tally.record(PUBLISH, &message.id);
        self.inner.publish(message)
    }

    fn fetch(
        &self,
        request: FetchRequest,
    ) -> impl Future<Output = Result<Vec<Delivery>, TransportError>> + Send {
        let fetched = self.inner.fetch(request);
        let tally = self.plan.tally.clone();
        async move {
            let deliveries = fetched.await?;
            for d in &deliveries {
                tally.record(FETCH, &d.message_id);
                if d.deliveries > 1 {
                    tally.record(REDELIVERY, &d.message_id);
                }
            }
            Ok(deliveries)
        }
    }

    fn ack(&self, delivery: &Delivery) -> impl Future<Output = Result<(), TransportError>> + Send {
        let lost = self.plan.loses_ack(delivery);
        let acked = (!lost).then(|| self.inner.ack(delivery));
        if lost {
            self.plan.tally.record(ACK_LOST, &delivery.message_id);
        }
        async move {
            match acked {
                Some(ack) => ack.await,
                None => Ok(()),
            }
        }
    }

    fn nack(
        &self,
        delivery: &Delivery,
        delay: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.nack(delivery, delay)
    }

    fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.inner.dead_letter(delivery, reason)
    }

    /// Heartbeats pass through, except for a stalled delivery: a stalled process sends none,
    /// so its delivery comes back after its visibility as the storm intends.
    fn extend(
        &self,
        delivery: &Delivery,
        visibility: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let extended =
            (!self.plan.is_stalled(delivery)).then(|| self.inner.extend(delivery, visibility));
        async move {
            match extended {
                Some(extend) => extend.await,
                None => Ok(()),
            }
        }
    }
}

/// [`Inputs`] decoding the payload with [`Handler::decode`], after stalling the first delivery
/// of the messages [`Redeliveries`] chose until their redelivery is acknowledged.
#[derive(Clone, Debug)]
pub struct StallFirstDelivery {
    plan: Arc<Redeliveries>,
}

impl StallFirstDelivery {
    /// Stalls as `plan` says.
    pub fn new(plan: Arc<Redeliveries>) -> Self {
        StallFirstDelivery { plan }
    }
}

impl<H: Handler, S: Store> Inputs<H, S> for StallFirstDelivery {
    fn input(
        &self,
        handler: &H,
        delivery: &Delivery,
        _store: &Tracked<S>,
    ) -> impl Future<Output = Result<H::Input, LoadError>> + Send {
        let decoded = handler.decode(&delivery.payload).map_err(LoadError::from);
        let stall = self
            .plan
            .stalls(delivery)
            .then(|| (Arc::clone(&self.plan), delivery.clone()));
        async move {
            if let Some((plan, delivery)) = stall {
                plan.stall(&delivery).await;
            }
            decoded
        }
    }
}
