//! One consumer group on one topic as this process sees it: its lanes (a durable pull consumer
//! per partition, `p<i>`, and one for messages without a key, `u`), which keyed lanes this
//! process holds, a reader per lane pulling into a read-ahead buffer, and the hand-out that
//! [`Transport::fetch`](crate::transport::Transport::fetch) takes from.
//!
//! It owns the order guarantee on NATS: a keyed lane's messages are handed out only while this
//! process holds the lane (see [`super::holds`] for the records, the [module docs](super) for
//! the protocol), in sequence order, and never a message whose key has an earlier message given
//! back and not yet returned. A background task per group (the *driver*) renews the holds,
//! announces the process as a member, takes free lanes up to its share and lets go of the excess,
//! heartbeats what waits in the buffers, and gives everything back when the group goes idle or
//! the transport closes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, ReplayPolicy, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::join_all;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::NatsMutant;
use super::holds::{self, HoldRecord, HoldState, Written};
use super::names;
use super::transport::{Shared, bump, lock, read_headers, refused, unavailable};
use crate::transport::TransportError;

/// How long one pull request waits at the server at most (also bounded by the hold and by half
/// the ack wait, see [`Group::plan`]); a lane is let go of cleanly only once its request ended,
/// so this bounds how long a release takes.
const LONG_PULL: Duration = Duration::from_secs(1);
/// How many messages one pull request of a keyed lane asks for; the consumer's
/// `max_ack_pending` is what bounds the read-ahead.
const KEYED_BATCH: usize = 1024;
/// How long after a pull request's expiry its messages may still be on their way.
const PULL_MARGIN: Duration = Duration::from_millis(500);
/// The next pull request is sent when the newest one has this long left.
const OVERLAP: Duration = Duration::from_millis(250);
/// A pull request is not sent with less time than this before the hold would need renewing.
const MIN_PULL: Duration = Duration::from_millis(100);
/// How long a fetch's demand for messages without a key outlives the fetch, so a caller polling
/// with a zero wait still gets them.
const DEMAND_LINGER: Duration = Duration::from_secs(1);

/// The settings of a group's consumers, the same for every process of the group (see
/// [`NatsTransport::set_consumer_settings`](super::NatsTransport::set_consumer_settings)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerSettings {
    /// How long a delivered message stays invisible unless acknowledged or heartbeated (the
    /// consumers' `AckWait`): the visibility every fetch and heartbeat of the group uses.
    pub ack_wait: Duration,
    /// The partition consumers' `max_ack_pending` ([`NatsConfig::partition_in_flight`]).
    ///
    /// [`NatsConfig::partition_in_flight`]: super::NatsConfig::partition_in_flight
    pub partition_in_flight: u32,
    /// The `u` consumer's `max_ack_pending` ([`NatsConfig::unordered_in_flight`]).
    ///
    /// [`NatsConfig::unordered_in_flight`]: super::NatsConfig::unordered_in_flight
    pub unordered_in_flight: u32,
}

impl ConsumerSettings {
    /// Settings with this ack wait and these in-flight limits.
    pub fn new(
        ack_wait: Duration,
        partition_in_flight: u32,
        unordered_in_flight: u32,
    ) -> ConsumerSettings {
        ConsumerSettings {
            ack_wait,
            partition_in_flight,
            unordered_in_flight,
        }
    }
}

/// The consumers' ack wait for a fetch's visibility (NATS reads zero as "the default", 30 s).
pub(super) fn ack_wait_for(visibility: Duration) -> Duration {
    visibility.max(Duration::from_millis(10))
}

/// A message read ahead: pending at the server for this process, not yet handed out.
pub(super) struct Buffered {
    pub(super) reply: Subject,
    pub(super) sequence: u64,
    pub(super) deliveries: u32,
    pub(super) message_id: String,
    pub(super) partition_key: Option<String>,
    pub(super) headers: BTreeMap<String, String>,
    pub(super) payload: Bytes,
    /// When the server's ack-wait clock for it last started (receipt or a heartbeat).
    touched: Instant,
}

/// A keyed message this process gave back, until it comes back: later messages of its key
/// wait for it.
struct GivenBack {
    key: Option<String>,
    reply: Subject,
    /// `Some` while the give-back's delay runs: it is still pending here (heartbeated), and is
    /// given back to the server when due.
    due: Option<Instant>,
    touched: Instant,
}

/// A delivery handed out and not settled.
struct Leased {
    deliveries: u32,
    key: Option<String>,
    /// Until when the server keeps it invisible (receipt or last heartbeat + ack wait).
    until: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Acquired; waiting for a previous holder's messages to come back before pulling.
    Waiting,
    /// Handing out.
    Open,
    /// Being released: nothing more is handed out.
    Draining,
}

/// This process's hold of a keyed lane.
struct Held {
    /// The sequence of its last hold record.
    record: u64,
    /// Until when it may hand out and heartbeat (its own clock: renewal sent + TTL - margin).
    valid_until: Instant,
    renewed_at: Instant,
    phase: Phase,
    /// Set when the release writes its record: renewals stop.
    last_write: bool,
}

struct Reader {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct LaneState {
    held: Option<Held>,
    /// Moves on at every acquisition, loss and release: what an older reader or lease refers
    /// to is no longer this process's.
    epoch: u64,
    buffer: BTreeMap<u64, Buffered>,
    /// Handed out, not settled.
    leased: HashMap<u64, Leased>,
    /// The highest sequence that arrived as a first delivery in this epoch (first deliveries
    /// come in sequence order; see [`Group::receive`]).
    highest_new: u64,
    given_back: BTreeMap<u64, GivenBack>,
    reader: Option<Reader>,
    releasing: bool,
}

/// One lane: a durable pull consumer.
pub(super) struct Lane {
    pub(super) id: String,
    pub(super) keyed: bool,
    pub(super) consumer: String,
    hold_subject: String,
    state: Mutex<LaneState>,
    /// Serializes the writes of this lane's hold record (renewal, release).
    record_lock: tokio::sync::Mutex<()>,
}

#[derive(Clone, Copy)]
struct Demand {
    want: usize,
    until: Instant,
}

struct Activity {
    fetching: usize,
    last: Instant,
}

/// A delivery taken from a lane's buffer by a fetch.
pub(super) struct Taken {
    pub(super) lane: usize,
    pub(super) epoch: u64,
    pub(super) message: Buffered,
    pub(super) until: Instant,
}

/// One group on one topic. See the module docs.
pub(super) struct Group {
    pub(super) name: String,
    pub(super) topic: String,
    pub(super) lanes: Vec<Lane>,
    settings: Mutex<ConsumerSettings>,
    /// Woken when something may be handed out (a message arrived, a lane opened, a key unblocked).
    pub(super) ready: Notify,
    rotation: AtomicUsize,
    members: AtomicUsize,
    demand: Mutex<Option<Demand>>,
    demand_changed: Notify,
    activity: Mutex<Activity>,
    stopped: AtomicBool,
    member_subject: String,
    driver: Mutex<Option<JoinHandle<()>>>,
}

/// Counts a fetch in progress on a group while it lives.
pub(super) struct Fetching<'a>(&'a Group);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        let mut a = lock(&self.0.activity);
        a.fetching = a.fetching.saturating_sub(1);
        a.last = Instant::now();
    }
}

fn hold_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(50))
}

impl Group {
    pub(super) fn settings(&self) -> ConsumerSettings {
        *lock(&self.settings)
    }

    pub(super) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Refuses a visibility other than the group's ack wait, naming both.
    pub(super) fn check_visibility(&self, visibility: Duration) -> Result<(), TransportError> {
        let wanted = ack_wait_for(visibility);
        let settings = self.settings();
        if wanted == settings.ack_wait {
            return Ok(());
        }
        Err(refused(format!(
            "consumer group {:?} on topic {:?}: the visibility asked for is {visibility:?} and the \
             group's consumers have an ack wait of {:?}; every process of a group uses one \
             visibility: use {:?}, or change the group's with \
             NatsTransport::set_consumer_settings",
            self.name, self.topic, settings.ack_wait, settings.ack_wait
        )))
    }

    /// Opens a group: its consumers (created with this process's settings, or checked against
    /// them), this process as a member, its first lanes; then starts its driver.
    pub(super) async fn open(
        shared: &Arc<Shared>,
        name: &str,
        topic: &str,
        visibility: Duration,
    ) -> Result<Arc<Group>, TransportError> {
        let config = &shared.config;
        let settings = ConsumerSettings {
            ack_wait: ack_wait_for(visibility),
            partition_in_flight: config.partition_in_flight,
            unordered_in_flight: config.unordered_in_flight,
        };
        ensure_consumers(shared, name, topic, settings, false).await?;
        let lanes = lane_ids(config.partitions)
            .map(|id| Lane {
                keyed: id != "u",
                consumer: names::consumer_name(name, topic, &id),
                hold_subject: names::hold_subject(&config.subject_prefix, name, topic, &id),
                state: Mutex::new(LaneState::default()),
                record_lock: tokio::sync::Mutex::new(()),
                id,
            })
            .collect();
        let group = Arc::new(Group {
            name: name.to_owned(),
            topic: topic.to_owned(),
            lanes,
            settings: Mutex::new(settings),
            ready: Notify::new(),
            rotation: AtomicUsize::new(0),
            members: AtomicUsize::new(1),
            demand: Mutex::new(None),
            demand_changed: Notify::new(),
            activity: Mutex::new(Activity {
                fetching: 0,
                last: Instant::now(),
            }),
            stopped: AtomicBool::new(false),
            member_subject: names::member_subject(
                &config.subject_prefix,
                name,
                topic,
                &shared.member,
            ),
            driver: Mutex::new(None),
        });
        if let Err(e) =
            holds::announce(&shared.js, group.member_subject.clone(), &shared.member).await
        {
            tracing::warn!(error = %e, group = name, topic, "could not announce this process as a member");
        }
        group.count_members(shared).await;
        // The unordered lane needs no hold.
        let u = group.lanes.len() - 1;
        let epoch = {
            let mut st = lock(&group.lanes[u].state);
            st.epoch += 1;
            st.epoch
        };
        Group::start_reader(shared, &group, u, epoch, 0);
        group.balance(shared).await;
        let driver = tokio::spawn(drive(Arc::clone(shared), Arc::clone(&group)));
        *lock(&group.driver) = Some(driver);
        Ok(group)
    }

    /// Marks a fetch in progress; wants up to `want` unordered messages until `until`.
    pub(super) fn fetching(&self, want: usize, until: Instant) -> Fetching<'_> {
        {
            let mut a = lock(&self.activity);
            a.fetching += 1;
            a.last = Instant::now();
        }
        let until = until.max(Instant::now() + DEMAND_LINGER);
        {
            let mut d = lock(&self.demand);
            *d = Some(match *d {
                Some(old) => Demand {
                    want: old.want.max(want),
                    until: old.until.max(until),
                },
                None => Demand { want, until },
            });
        }
        self.demand_changed.notify_waiters();
        Fetching(self)
    }

    fn handing_out(&self, shared: &Shared, lane: &Lane, st: &LaneState, now: Instant) -> bool {
        if !lane.keyed {
            return true;
        }
        if shared.config.mutant == Some(NatsMutant::NoHolds) {
            return st.held.is_some();
        }
        st.held
            .as_ref()
            .is_some_and(|h| h.phase == Phase::Open && h.valid_until > now)
    }

    /// The buffered messages of a lane that may be handed out now, in sequence order: all but
    /// those whose key has an earlier message given back and not yet returned.
    fn eligible(st: &LaneState, max: usize) -> Vec<u64> {
        let mut blocked: HashMap<&str, u64> = HashMap::new();
        for (&seq, gb) in &st.given_back {
            if let Some(key) = gb.key.as_deref() {
                blocked.entry(key).or_insert(seq);
            }
        }
        let mut out = Vec::new();
        for (&seq, b) in &st.buffer {
            if out.len() >= max {
                break;
            }
            let waits = b
                .partition_key
                .as_deref()
                .and_then(|k| blocked.get(k))
                .is_some_and(|&first| first < seq);
            if !waits {
                out.push(seq);
            }
        }
        out
    }

    /// Takes up to `max` messages from the lanes' buffers, spread over the lanes (a rotating
    /// start, then one from each in turn), each lane's in sequence order, and leases them.
    pub(super) fn take(&self, shared: &Shared, max: usize) -> Vec<Taken> {
        let n = self.lanes.len();
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let now = Instant::now();
        let mut lists: Vec<(usize, Vec<u64>)> = Vec::new();
        for i in 0..n {
            let index = (start + i) % n;
            let lane = &self.lanes[index];
            let st = lock(&lane.state);
            if !self.handing_out(shared, lane, &st, now) {
                continue;
            }
            let eligible = Group::eligible(&st, max);
            if !eligible.is_empty() {
                lists.push((index, eligible));
            }
        }
        // One from each lane in turn: each lane gives a prefix of its eligible messages.
        let mut counts = vec![0_usize; lists.len()];
        let mut total = 0;
        let mut round = 0;
        while total < max {
            let mut progressed = false;
            for (i, (_, list)) in lists.iter().enumerate() {
                if total < max && round < list.len() {
                    counts[i] += 1;
                    total += 1;
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
            round += 1;
        }
        let ack_wait = self.settings().ack_wait;
        let mut out = Vec::with_capacity(total);
        for ((index, list), count) in lists.into_iter().zip(counts) {
            let lane = &self.lanes[index];
            let mut st = lock(&lane.state);
            if !self.handing_out(shared, lane, &st, now) {
                continue;
            }
            for seq in list.into_iter().take(count) {
                let Some(message) = st.buffer.remove(&seq) else {
                    // Given back to the server by a release meanwhile: the rest of the lane waits.
                    break;
                };
                st.leased.insert(
                    seq,
                    Leased {
                        deliveries: message.deliveries,
                        key: message.partition_key.clone(),
                        until: message.touched + ack_wait,
                    },
                );
                out.push(Taken {
                    lane: index,
                    epoch: st.epoch,
                    until: message.touched + ack_wait,
                    message,
                });
            }
        }
        out
    }

    /// Whether a delivery handed out in `epoch` is still leased here with this count, and
    /// its lane still held (for heartbeats).
    pub(super) fn still_leased(
        &self,
        shared: &Shared,
        lane: usize,
        epoch: u64,
        sequence: u64,
        deliveries: u32,
    ) -> Result<(), String> {
        let l = &self.lanes[lane];
        let st = lock(&l.state);
        if st.epoch != epoch || st.leased.get(&sequence).map(|l| l.deliveries) != Some(deliveries) {
            return Err(
                "this process no longer holds it (its lane was let go or lost, or it \
                        came back from the server after its visibility passed)"
                    .into(),
            );
        }
        if l.keyed && shared.config.mutant != Some(NatsMutant::NoHolds) {
            let valid = st
                .held
                .as_ref()
                .is_some_and(|h| h.valid_until > Instant::now());
            if !valid {
                return Err(format!(
                    "the hold of its partition lane {} could not be renewed in time",
                    l.id
                ));
            }
        }
        Ok(())
    }

    /// Bookkeeping after the server confirmed a settlement of a delivery handed out in `epoch`.
    /// `gone`: acknowledged or terminated, so it never comes back (a copy that came back after
    /// its visibility passed is dropped, and its key no longer waits for it).
    pub(super) fn settled(&self, lane: usize, epoch: u64, sequence: u64, gone: bool) {
        let mut st = lock(&self.lanes[lane].state);
        if st.epoch == epoch {
            st.leased.remove(&sequence);
            if gone {
                st.given_back.remove(&sequence);
                st.buffer.remove(&sequence);
            }
        }
        drop(st);
        if gone {
            self.ready.notify_waiters();
        }
    }

    /// A heartbeat went through: the server keeps the delivery invisible until `until`.
    pub(super) fn extended(&self, (lane, epoch): (usize, u64), sequence: u64, until: Instant) {
        let mut st = lock(&self.lanes[lane].state);
        if st.epoch == epoch {
            if let Some(l) = st.leased.get_mut(&sequence) {
                l.until = until;
            }
        }
    }

    /// A keyed delivery given back while its lane is being released: it goes back into the
    /// buffer (the release gives the buffer back to the server, in order) instead of to the
    /// server now, when no pull request may be live to take it. `false` when the lane is not
    /// being released by this process.
    pub(super) fn give_back_while_draining(
        &self,
        (lane, epoch): (usize, u64),
        reply: Subject,
        d: &crate::transport::Delivery,
    ) -> bool {
        let l = &self.lanes[lane];
        let mut st = lock(&l.state);
        let draining = st.held.as_ref().is_some_and(|h| h.phase == Phase::Draining);
        if !l.keyed || st.epoch != epoch || !draining {
            return false;
        }
        st.leased.remove(&d.sequence);
        st.buffer.insert(
            d.sequence,
            Buffered {
                reply,
                sequence: d.sequence,
                deliveries: d.deliveries,
                message_id: d.message_id.clone(),
                partition_key: d.partition_key.clone(),
                headers: d.headers.clone(),
                payload: Bytes::from(d.payload.clone()),
                touched: Instant::now(),
            },
        );
        true
    }

    /// Before a keyed delivery is given back with no delay: it is expected back, and its key's
    /// later messages wait for it. (Registered before the give-back is sent, since the message
    /// may come back before the server's confirmation.)
    pub(super) fn expect_back(
        &self,
        (lane, epoch): (usize, u64),
        sequence: u64,
        key: Option<String>,
        reply: Subject,
    ) {
        let l = &self.lanes[lane];
        if !l.keyed {
            return;
        }
        let mut st = lock(&l.state);
        if st.epoch == epoch {
            st.given_back.insert(
                sequence,
                GivenBack {
                    key,
                    reply,
                    due: None,
                    touched: Instant::now(),
                },
            );
        }
    }

    /// The give-back registered by [`Group::expect_back`] did not get through.
    pub(super) fn not_back(&self, (lane, epoch): (usize, u64), sequence: u64) {
        let mut st = lock(&self.lanes[lane].state);
        if st.epoch == epoch {
            st.given_back.remove(&sequence);
        }
    }

    /// A keyed delivery given back with a delay: it stays pending here (heartbeated) while the
    /// delay runs, its key's later messages wait, and it is given back to the server when due.
    /// `false` when the lane is no longer this process's (the caller then gives it back to the
    /// server with the delay).
    pub(super) fn give_back_later(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        (lane, epoch): (usize, u64),
        sequence: u64,
        key: Option<String>,
        reply: Subject,
        delay: Duration,
    ) -> bool {
        let l = &self.lanes[lane];
        {
            let mut st = lock(&l.state);
            if st.epoch != epoch || !l.keyed || st.held.is_none() {
                return false;
            }
            st.leased.remove(&sequence);
            let now = Instant::now();
            st.given_back.insert(
                sequence,
                GivenBack {
                    key,
                    reply,
                    due: Some(now + delay),
                    touched: now,
                },
            );
        }
        let (shared, group) = (Arc::clone(shared), Arc::clone(self));
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            group.give_back_due(&shared, lane, epoch).await;
        });
        true
    }

    /// Gives back to the server (NAK) the delayed give-backs of a lane that are due.
    async fn give_back_due(&self, shared: &Shared, lane: usize, epoch: u64) {
        let l = &self.lanes[lane];
        let now = Instant::now();
        let due: Vec<(u64, Subject)> = {
            let st = lock(&l.state);
            // While the lane is released, the release gives them back (once no pull request
            // of this process is live).
            let open = st.held.as_ref().is_some_and(|h| h.phase != Phase::Draining);
            if st.epoch != epoch || !open {
                return;
            }
            st.given_back
                .iter()
                .filter(|(_, gb)| gb.due.is_some_and(|d| d <= now))
                .map(|(&seq, gb)| (seq, gb.reply.clone()))
                .collect()
        };
        for (seq, reply) in due {
            match shared.confirm(reply, AckKind::Nak(None)).await {
                Ok(()) => {
                    let mut st = lock(&l.state);
                    if st.epoch == epoch {
                        if let Some(gb) = st.given_back.get_mut(&seq) {
                            gb.due = None;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, sequence = seq, "could not give back a delayed delivery: the next tick tries again");
                }
            }
        }
    }

    /// A message arrived from a lane's reader of `epoch`.
    fn receive(&self, shared: &Shared, lane: usize, epoch: u64, message: async_nats::Message) {
        let Some(reply) = message.reply.clone() else {
            tracing::error!(subject = %message.subject, "a pulled message has no reply subject: skipped");
            return;
        };
        let js_message = jetstream::Message {
            message,
            context: shared.js.clone(),
        };
        let (sequence, deliveries) = match js_message.info() {
            Ok(info) => (
                info.stream_sequence,
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
            ),
            Err(e) => {
                tracing::error!(error = %e, "a pulled message has no JetStream metadata: skipped");
                return;
            }
        };
        let message = js_message.message;
        let (message_id, partition_key, headers) =
            read_headers(message.headers.as_ref(), &shared.config.stream, sequence);
        let l = &self.lanes[lane];
        {
            let mut st = lock(&l.state);
            if st.epoch != epoch {
                // Not this process's any more: it stays pending and goes to the lane's next
                // holder once its ack wait passes.
                return;
            }
            if deliveries == 1 {
                if sequence <= st.highest_new
                    && (st.leased.contains_key(&sequence) || st.buffer.contains_key(&sequence))
                {
                    // A second first delivery of a message this process has: JetStream 2.9
                    // sends one after dropping a redelivery (see the module docs). The copy
                    // here stands.
                    tracing::debug!(lane = %l.id, sequence, "dropped a repeated first delivery");
                    return;
                }
                st.highest_new = st.highest_new.max(sequence);
            }
            let expected = st.given_back.remove(&sequence).is_some();
            if st.leased.remove(&sequence).is_some() && !expected {
                tracing::warn!(
                    lane = %l.id,
                    sequence,
                    "a delivery came back while still leased here: its visibility passed without a heartbeat"
                );
            }
            st.buffer.insert(
                sequence,
                Buffered {
                    reply,
                    sequence,
                    deliveries,
                    message_id,
                    partition_key,
                    headers,
                    payload: message.payload,
                    touched: Instant::now(),
                },
            );
        }
        self.ready.notify_waiters();
    }

    fn start_reader(
        shared: &Arc<Shared>,
        group: &Arc<Group>,
        lane: usize,
        epoch: u64,
        catch_up: u64,
    ) {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(read_lane(
            Arc::clone(shared),
            Arc::clone(group),
            lane,
            epoch,
            catch_up,
            stopped,
        ));
        let mut st = lock(&group.lanes[lane].state);
        if st.epoch != epoch {
            task.abort();
            return;
        }
        if let Some(old) = st.reader.replace(Reader {
            stop: Some(stop),
            task,
        }) {
            old.task.abort();
        }
    }

    /// What a lane's reader should do next.
    fn plan(&self, shared: &Shared, lane: usize, epoch: u64, catch_up: u64) -> Plan {
        let l = &self.lanes[lane];
        let st = lock(&l.state);
        if st.epoch != epoch {
            return Plan::Stop;
        }
        let now = Instant::now();
        if !l.keyed {
            let demand = *lock(&self.demand);
            return match demand {
                Some(d) if d.until > now && st.buffer.len() < d.want => {
                    let left = (d.until - now).min(self.settings().ack_wait / 2);
                    Plan::Pull {
                        batch: d.want - st.buffer.len(),
                        expires: left.clamp(Duration::from_millis(10), LONG_PULL),
                    }
                }
                _ => Plan::WaitDemand,
            };
        }
        let Some(held) = &st.held else {
            return Plan::Stop;
        };
        if held.phase == Phase::Draining {
            return Plan::Stop;
        }
        let left = if shared.config.mutant == Some(NatsMutant::NoHolds) {
            LONG_PULL
        } else {
            held.valid_until.saturating_duration_since(now)
        };
        if left < MIN_PULL * 2 {
            // The hold is renewed meanwhile, or lost (then the reader is stopped).
            return Plan::Wait(MIN_PULL);
        }
        // A request ends before the hold would run out, and before any message it hands over
        // could expire: a request left behind by a holder that died or lost its hold is gone
        // from the server before that holder's messages are due again.
        let room = (left - MIN_PULL).min(self.settings().ack_wait / 2);
        if catch_up > 0 {
            Plan::Pull {
                batch: usize::try_from(catch_up).unwrap_or(usize::MAX),
                expires: room.min(Duration::from_secs(1)),
            }
        } else {
            Plan::Pull {
                batch: KEYED_BATCH,
                expires: room.min(LONG_PULL),
            }
        }
    }

    /// The takeover is over: the lane hands out.
    fn open_lane(&self, lane: usize, epoch: u64) {
        {
            let mut st = lock(&self.lanes[lane].state);
            if st.epoch != epoch {
                return;
            }
            if let Some(h) = st.held.as_mut() {
                if h.phase == Phase::Waiting {
                    h.phase = Phase::Open;
                }
            }
        }
        self.ready.notify_waiters();
    }

    async fn count_members(&self, shared: &Shared) {
        let filter = names::members_filter(&shared.config.subject_prefix, &self.name, &self.topic);
        match holds::count_members(&shared.holds, &filter).await {
            Ok(n) => self.members.store(n.max(1), Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "could not count the group's members"),
        }
    }

    fn keyed(&self) -> impl Iterator<Item = (usize, &Lane)> {
        self.lanes.iter().enumerate().filter(|(_, l)| l.keyed)
    }

    /// The keyed lanes this process holds (any phase).
    pub(super) fn held_lanes(&self) -> Vec<String> {
        self.keyed()
            .filter(|(_, l)| lock(&l.state).held.is_some())
            .map(|(_, l)| l.id.clone())
            .collect()
    }

    /// Takes free lanes up to this process's share and lets go of lanes above it.
    async fn balance(self: &Arc<Self>, shared: &Arc<Shared>) {
        let keyed: Vec<usize> = self.keyed().map(|(i, _)| i).collect();
        if shared.config.mutant == Some(NatsMutant::NoHolds) {
            for &i in &keyed {
                if lock(&self.lanes[i].state).held.is_none() {
                    self.acquire(shared, i).await;
                }
            }
            return;
        }
        let members = self.members.load(Ordering::Relaxed).max(1);
        let share = keyed.len().div_ceil(members);
        let (mut held, mut free) = (Vec::new(), Vec::new());
        for &i in &keyed {
            let st = lock(&self.lanes[i].state);
            match &st.held {
                Some(h) if h.phase != Phase::Draining => held.push(i),
                Some(_) => {}
                None => free.push(i),
            }
        }
        if held.len() < share && !free.is_empty() {
            // Start at a place of our own, so members do not all race for the same lanes.
            let offset = usize::from_str_radix(&shared.member[..4], 16).unwrap_or(0) % free.len();
            free.rotate_left(offset);
            let mut candidates = free.into_iter();
            let mut have = held.len();
            // Bounded: each round tries distinct candidates.
            while have < share {
                let round: Vec<usize> = candidates.by_ref().take(share - have).collect();
                if round.is_empty() {
                    break;
                }
                let won = join_all(round.iter().map(|&i| self.acquire(shared, i))).await;
                have += won.into_iter().filter(|&w| w).count();
            }
        } else if held.len() > share {
            // Let go of the lanes with the least in flight.
            let mut by_load: Vec<(usize, usize)> = held
                .iter()
                .map(|&i| {
                    let st = lock(&self.lanes[i].state);
                    (st.leased.len() + st.buffer.len() + st.given_back.len(), i)
                })
                .collect();
            by_load.sort_unstable();
            for &(_, i) in by_load.iter().take(held.len() - share) {
                let (shared, group) = (Arc::clone(shared), Arc::clone(self));
                tokio::spawn(async move { group.release(&shared, i, None).await });
            }
        }
    }

    /// Tries to take a keyed lane: reads its hold record and, if nobody holds it, writes this
    /// process's. Then waits, when the lane's consumer has messages pending from the previous
    /// holder, until they come back, before the reader pulls.
    async fn acquire(self: &Arc<Self>, shared: &Arc<Shared>, lane: usize) -> bool {
        let l = &self.lanes[lane];
        let _record = l.record_lock.lock().await;
        if lock(&l.state).held.is_some() {
            return true;
        }
        let config = &shared.config;
        let now = Instant::now();
        if config.mutant == Some(NatsMutant::NoHolds) {
            let epoch = {
                let mut st = lock(&l.state);
                st.epoch += 1;
                st.held = Some(Held {
                    record: 0,
                    valid_until: now + Duration::from_secs(365 * 24 * 3600),
                    renewed_at: now,
                    phase: Phase::Open,
                    last_write: false,
                });
                st.epoch
            };
            Group::start_reader(shared, self, lane, epoch, 0);
            return true;
        }
        let last = match holds::last(&shared.holds, &l.hold_subject).await {
            Ok(last) => last,
            Err(e) => {
                tracing::warn!(error = %e, lane = %l.id, "could not read a lane hold");
                return false;
            }
        };
        // How long to wait before pulling if the consumer still has messages pending.
        let ack_wait = self.settings().ack_wait;
        let unknown = ack_wait + hold_margin(config.hold_ttl);
        let (expected, wait_if_pending) = match last {
            None => (0, unknown),
            Some((seq, Some(record))) if record.state == HoldState::Released => {
                let wait = Duration::from_millis(record.wait_ms);
                let wait = if wait.is_zero() {
                    wait
                } else {
                    wait + hold_margin(config.hold_ttl)
                };
                (seq, wait)
            }
            // Its own hold from before it lost track of it (a renewal that failed): what it had
            // pending is treated like a dead holder's.
            Some((seq, Some(record))) if record.member == shared.member => (seq, unknown),
            Some(_) => return false,
        };
        let sent = Instant::now();
        let record = match holds::write(
            &shared.js,
            l.hold_subject.clone(),
            &HoldRecord::held(&shared.member),
            expected,
        )
        .await
        {
            Ok(Written::Done(record)) => record,
            Ok(Written::Conflict) => return false,
            Err(e) => {
                tracing::warn!(error = %e, lane = %l.id, "could not write a lane hold");
                return false;
            }
        };
        bump(&shared.counters.holds_acquired);
        let epoch = {
            let mut st = lock(&l.state);
            st.epoch += 1;
            st.buffer.clear();
            st.leased.clear();
            st.given_back.clear();
            st.releasing = false;
            st.held = Some(Held {
                record,
                valid_until: sent + config.hold_ttl - hold_margin(config.hold_ttl),
                renewed_at: sent,
                phase: Phase::Waiting,
                last_write: false,
            });
            st.epoch
        };
        let pending = shared.pending(&l.consumer).await;
        if pending == Some(0) || config.mutant == Some(NatsMutant::NoTakeoverWait) {
            Group::start_reader(shared, self, lane, epoch, 0);
            return true;
        }
        // The previous holder's messages are still pending: after they are due again (at once
        // when it gave them all back), the first pull takes exactly as many as are pending, so
        // they are all in the buffer, in sequence order, before the lane hands out.
        let wait = wait_if_pending;
        tracing::debug!(lane = %l.id, ?pending, ?wait, "took a lane with messages pending");
        if !wait.is_zero() {
            bump(&shared.counters.takeovers_waited);
        }
        let (shared, group) = (Arc::clone(shared), Arc::clone(self));
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if lock(&group.lanes[lane].state).epoch != epoch {
                return;
            }
            let catch_up = shared.pending(&group.lanes[lane].consumer).await;
            // Unknown (the server did not answer): pull one message at a time until the
            // count can be read; 1 keeps the lane closed until the first request ends.
            let catch_up = catch_up.map_or(1, |n| u64::try_from(n).unwrap_or(u64::MAX));
            Group::start_reader(&shared, &group, lane, epoch, catch_up);
        });
        true
    }

    /// Renews the holds that are due (every third of the TTL).
    async fn renew(self: &Arc<Self>, shared: &Arc<Shared>) {
        if shared.config.mutant == Some(NatsMutant::NoHolds) {
            return;
        }
        let ttl = shared.config.hold_ttl;
        let now = Instant::now();
        let due: Vec<usize> = self
            .keyed()
            .filter(|(_, l)| {
                lock(&l.state)
                    .held
                    .as_ref()
                    .is_some_and(|h| !h.last_write && h.renewed_at + ttl / 3 <= now)
            })
            .map(|(i, _)| i)
            .collect();
        join_all(due.into_iter().map(|i| self.renew_one(shared, i))).await;
        // A hold that could not be renewed in time is lost.
        let now = Instant::now();
        for (i, l) in self.keyed() {
            let expired = lock(&l.state)
                .held
                .as_ref()
                .is_some_and(|h| h.valid_until <= now);
            if expired {
                self.lose(shared, i, "its renewal did not get through in time");
            }
        }
    }

    async fn renew_one(&self, shared: &Shared, lane: usize) {
        let l = &self.lanes[lane];
        let _record = l.record_lock.lock().await;
        let (record, epoch) = {
            let st = lock(&l.state);
            match &st.held {
                Some(h) if !h.last_write => (h.record, st.epoch),
                _ => return,
            }
        };
        let sent = Instant::now();
        match holds::write(
            &shared.js,
            l.hold_subject.clone(),
            &HoldRecord::held(&shared.member),
            record,
        )
        .await
        {
            Ok(Written::Done(next)) => {
                let mut st = lock(&l.state);
                if st.epoch == epoch {
                    if let Some(h) = st.held.as_mut() {
                        h.record = next;
                        h.renewed_at = sent;
                        h.valid_until =
                            sent + shared.config.hold_ttl - hold_margin(shared.config.hold_ttl);
                    }
                }
            }
            Ok(Written::Conflict) => {
                self.lose(shared, lane, "another process holds it now");
            }
            Err(e) => {
                tracing::warn!(error = %e, lane = %l.id, "could not renew a lane hold");
            }
        }
    }

    /// This process no longer holds the lane: it stops handing out and heartbeating its
    /// messages at once; what it had pending comes back to the next holder after the ack wait.
    fn lose(&self, shared: &Shared, lane: usize, why: &str) {
        let l = &self.lanes[lane];
        let reader = {
            let mut st = lock(&l.state);
            if st.held.is_none() {
                return;
            }
            st.held = None;
            st.epoch += 1;
            st.buffer.clear();
            st.leased.clear();
            st.given_back.clear();
            st.releasing = false;
            st.reader.take()
        };
        if let Some(r) = reader {
            r.task.abort();
        }
        bump(&shared.counters.holds_lost);
        tracing::warn!(group = %self.name, topic = %self.topic, lane = %l.id, why, "lost a lane hold");
    }

    /// Lets go of a lane cleanly: stops handing out and reading, gives back what was read ahead
    /// (in sequence order), waits until what was handed out is settled (until `deadline`, if
    /// any), then writes a `released` record saying how long a new holder must wait for what is
    /// still out.
    async fn release(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        lane: usize,
        deadline: Option<Instant>,
    ) {
        let l = &self.lanes[lane];
        let config = &shared.config;
        let (reader, epoch) = {
            let mut st = lock(&l.state);
            if st.releasing || st.held.is_none() {
                return;
            }
            st.releasing = true;
            if let Some(h) = st.held.as_mut() {
                h.phase = Phase::Draining;
            }
            (st.reader.take(), st.epoch)
        };
        let mut dirty = false;
        if let Some(reader) = reader {
            dirty |= !stop_reader(reader).await;
        }
        if config.mutant == Some(NatsMutant::NoHolds) {
            let buffered: Vec<Subject> = {
                let mut st = lock(&l.state);
                std::mem::take(&mut st.buffer)
                    .into_values()
                    .map(|b| b.reply)
                    .collect()
            };
            for reply in buffered {
                let _ = shared.confirm(reply, AckKind::Nak(None)).await;
            }
            let mut st = lock(&l.state);
            st.held = None;
            st.epoch += 1;
            st.releasing = false;
            return;
        }
        // Give back the read-ahead, in sequence order.
        let buffered: Vec<(u64, Subject)> = {
            let mut st = lock(&l.state);
            if st.epoch != epoch {
                return;
            }
            std::mem::take(&mut st.buffer)
                .into_values()
                .map(|b| (b.sequence, b.reply))
                .collect()
        };
        // Given back, they stay pending (in the consumer's redelivery queue) for the next holder.
        let mut returned = 0;
        for (seq, reply) in buffered {
            match shared.confirm(reply, AckKind::Nak(None)).await {
                Ok(()) => returned += 1,
                Err(e) => {
                    tracing::warn!(error = %e, sequence = seq, "could not give back a message read ahead");
                    dirty = true;
                }
            }
        }
        // Wait for what was handed out (bounded by the deadline, if any; without one, for as
        // long as the holder keeps it: it is in work and heartbeated).
        loop {
            let (leased, epoch_now) = {
                let st = lock(&l.state);
                (st.leased.len(), st.epoch)
            };
            if epoch_now != epoch {
                return;
            }
            if leased == 0 {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                dirty = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _record = l.record_lock.lock().await;
        // Delayed give-backs go to the server with what is left of their delay.
        let now = Instant::now();
        let delayed: Vec<(Subject, Duration)> = {
            let mut st = lock(&l.state);
            if st.epoch != epoch {
                return;
            }
            if let Some(h) = st.held.as_mut() {
                h.last_write = true;
            }
            st.given_back
                .values()
                .filter_map(|gb| {
                    gb.due
                        .map(|d| (gb.reply.clone(), d.saturating_duration_since(now)))
                })
                .collect()
        };
        let mut wait = Duration::ZERO;
        for (reply, left) in delayed {
            let kind = if left.is_zero() {
                AckKind::Nak(None)
            } else {
                AckKind::Nak(Some(left))
            };
            if let Err(e) = shared.confirm(reply, kind).await {
                tracing::warn!(error = %e, "could not give back a delayed delivery");
                dirty = true;
            }
            wait = wait.max(left);
        }
        // What the server has pending for the lane must be what this process knows of; more
        // means messages on their way to the reader when it stopped, which come back only after
        // the ack wait.
        let ours = {
            let st = lock(&l.state);
            st.leased.len() + st.given_back.len() + returned
        };
        match shared.pending(&l.consumer).await {
            Some(server) if server <= ours => {}
            _ => dirty = true,
        }
        if dirty {
            wait = wait.max(self.settings().ack_wait + hold_margin(config.hold_ttl));
        }
        let record = {
            let st = lock(&l.state);
            match &st.held {
                Some(h) if st.epoch == epoch && h.valid_until > Instant::now() => Some(h.record),
                _ => None,
            }
        };
        if let Some(record) = record {
            let released = HoldRecord {
                member: shared.member.clone(),
                state: HoldState::Released,
                wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            };
            match holds::write(&shared.js, l.hold_subject.clone(), &released, record).await {
                Ok(Written::Done(_)) => bump(&shared.counters.holds_released),
                Ok(Written::Conflict) => {}
                Err(e) => {
                    tracing::warn!(error = %e, lane = %l.id, "could not release a lane hold: it expires");
                }
            }
        }
        let mut st = lock(&l.state);
        if st.epoch == epoch {
            st.held = None;
            st.epoch += 1;
            st.buffer.clear();
            st.leased.clear();
            st.given_back.clear();
            st.releasing = false;
        }
        drop(st);
        tracing::debug!(group = %self.name, lane = %l.id, dirty, ?wait, "released a lane");
    }

    /// Heartbeats what waits here (read ahead, or given back with a delay) so its ack wait does
    /// not pass while this process holds it; gives back delayed ones that are due.
    async fn heartbeat_waiting(self: &Arc<Self>, shared: &Arc<Shared>) {
        let ack_wait = self.settings().ack_wait;
        let now = Instant::now();
        let mut beats: Vec<Subject> = Vec::new();
        let mut due_lanes = Vec::new();
        for (i, l) in self.lanes.iter().enumerate() {
            let mut st = lock(&l.state);
            let ours = !l.keyed || st.held.as_ref().is_some_and(|h| h.valid_until > now);
            if !ours {
                continue;
            }
            for b in st.buffer.values_mut() {
                if now.saturating_duration_since(b.touched) >= ack_wait / 3 {
                    b.touched = now;
                    beats.push(b.reply.clone());
                }
            }
            // A delivery whose visibility passed without a heartbeat comes back from the server:
            // its key waits for it (unless it is acknowledged first).
            let expired: Vec<u64> = st
                .leased
                .iter()
                .filter(|(_, leased)| leased.until <= now)
                .map(|(&seq, _)| seq)
                .collect();
            for seq in expired {
                let Some(Leased { key, .. }) = st.leased.remove(&seq) else {
                    continue;
                };
                if l.keyed {
                    st.given_back.insert(
                        seq,
                        GivenBack {
                            key,
                            reply: Subject::from(""),
                            due: None,
                            touched: now,
                        },
                    );
                }
            }
            let mut any_due = false;
            for gb in st.given_back.values_mut() {
                if let Some(due) = gb.due {
                    any_due |= due <= now;
                    if now.saturating_duration_since(gb.touched) >= ack_wait / 3 {
                        gb.touched = now;
                        beats.push(gb.reply.clone());
                    }
                }
            }
            if any_due {
                due_lanes.push((i, st.epoch));
            }
        }
        for reply in beats {
            bump(&shared.counters.heartbeats);
            let payload: Bytes = AckKind::Progress.into();
            if let Err(e) = shared.client.publish(reply, payload).await {
                tracing::warn!(error = %e, "could not heartbeat a message waiting here");
            }
        }
        for (lane, epoch) in due_lanes {
            self.give_back_due(shared, lane, epoch).await;
        }
    }

    /// Stops the group: no more fetching from it here; every lane let go (waiting until
    /// `deadline` for what is handed out), the presence withdrawn.
    pub(super) async fn shutdown(self: &Arc<Self>, shared: &Arc<Shared>, deadline: Instant) {
        self.stopped.store(true, Ordering::Release);
        if let Some(driver) = lock(&self.driver).take() {
            driver.abort();
        }
        let keyed: Vec<usize> = self.keyed().map(|(i, _)| i).collect();
        let releases = keyed
            .iter()
            .map(|&i| self.release(shared, i, Some(deadline)));
        let u = self.lanes.len() - 1;
        let unordered = async {
            let l = &self.lanes[u];
            let reader = {
                let mut st = lock(&l.state);
                st.epoch += 1;
                st.reader.take()
            };
            if let Some(reader) = reader {
                stop_reader(reader).await;
            }
            let buffered: Vec<Subject> = {
                let mut st = lock(&l.state);
                std::mem::take(&mut st.buffer)
                    .into_values()
                    .map(|b| b.reply)
                    .collect()
            };
            for reply in buffered {
                let _ = shared.confirm(reply, AckKind::Nak(None)).await;
            }
        };
        tokio::join!(join_all(releases), unordered);
        if let Err(e) = holds::withdraw(&shared.holds, &self.member_subject).await {
            tracing::debug!(error = %e, "could not withdraw the member's presence (it expires)");
        }
        self.ready.notify_waiters();
    }

    /// Stops as a crash would: see [`NatsTransport::abandon`](super::NatsTransport::abandon).
    pub(super) fn abandon(&self) {
        self.stopped.store(true, Ordering::Release);
        if let Some(driver) = lock(&self.driver).take() {
            driver.abort();
        }
        for l in &self.lanes {
            let reader = {
                let mut st = lock(&l.state);
                st.held = None;
                st.epoch += 1;
                st.buffer.clear();
                st.leased.clear();
                st.given_back.clear();
                st.reader.take()
            };
            if let Some(r) = reader {
                r.task.abort();
            }
        }
        self.ready.notify_waiters();
    }

    fn idle(&self, shared: &Shared, now: Instant) -> bool {
        let idle_after = self.settings().ack_wait.max(shared.config.hold_ttl * 3);
        let active = {
            let a = lock(&self.activity);
            a.fetching > 0 || now.saturating_duration_since(a.last) < idle_after
        };
        if active {
            return false;
        }
        self.lanes.iter().all(|l| {
            let st = lock(&l.state);
            st.leased.is_empty() && st.given_back.is_empty()
        })
    }

    /// Reads the group's settings from the server again (another process may have changed
    /// them explicitly); `false` when the consumers are gone.
    async fn refresh_settings(&self, shared: &Shared) -> bool {
        let Some(first) = self.lanes.first() else {
            return true;
        };
        let u = &self.lanes[self.lanes.len() - 1];
        let (keyed, unkeyed) = tokio::join!(
            shared.stream.consumer_info(&first.consumer),
            shared.stream.consumer_info(&u.consumer)
        );
        match (keyed, unkeyed) {
            (Ok(k), Ok(u)) => {
                let now = ConsumerSettings {
                    ack_wait: k.config.ack_wait,
                    partition_in_flight: u32::try_from(k.config.max_ack_pending).unwrap_or(0),
                    unordered_in_flight: u32::try_from(u.config.max_ack_pending).unwrap_or(0),
                };
                let mut s = lock(&self.settings);
                if *s != now {
                    tracing::info!(group = %self.name, topic = %self.topic, before = ?*s, after = ?now, "the group's consumer settings changed");
                    *s = now;
                }
                true
            }
            (Err(e), _) | (_, Err(e)) if matches!(e.kind(), ConsumerInfoErrorKind::NotFound) => {
                false
            }
            _ => true,
        }
    }

    pub(super) fn set_settings(&self, settings: ConsumerSettings) {
        *lock(&self.settings) = settings;
    }
}

enum Plan {
    Pull { batch: usize, expires: Duration },
    Wait(Duration),
    WaitDemand,
    Stop,
}

/// Stops a reader and waits until it has put what it had into the buffer; `false` when it had
/// to be cut short.
async fn stop_reader(mut reader: Reader) -> bool {
    if let Some(stop) = reader.stop.take() {
        let _ = stop.send(());
    }
    match tokio::time::timeout(LONG_PULL + PULL_MARGIN * 2, &mut reader.task).await {
        Ok(_) => true,
        Err(_) => {
            reader.task.abort();
            false
        }
    }
}

/// A pull request sent and not known to have ended.
struct Outstanding {
    /// When it expires (by this process's clock, from when it was sent).
    expires_at: Instant,
    /// How many messages it may still bring.
    remaining: usize,
}

/// A lane's reader: pull requests on an inbox of its own, each message into the lane's buffer.
/// See [`Group::plan`] for what it asks for. Before a request expires the next one is sent, so
/// that the server always has a live request behind one that is expiring: JetStream 2.9 drops a
/// redelivery it tries to hand to an expired request when no live one follows (see the module
/// docs). Asked to stop, it sends no more requests, reads the outstanding ones to their end, then
/// unsubscribes.
async fn read_lane(
    shared: Arc<Shared>,
    group: Arc<Group>,
    lane: usize,
    epoch: u64,
    catch_up: u64,
    mut stop: oneshot::Receiver<()>,
) {
    let l = &group.lanes[lane];
    let inbox = shared.client.new_inbox();
    let mut subscription = match shared.client.subscribe(inbox.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, lane = %l.id, "could not subscribe to a pull inbox");
            return;
        }
    };
    let subject = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        shared.config.stream, l.consumer
    );
    let mut catching_up = catch_up > 0;
    if l.keyed && !catching_up {
        group.open_lane(lane, epoch);
    }
    let mut outstanding: std::collections::VecDeque<Outstanding> = Default::default();
    let mut stopping = false;
    let mut finished = false;
    // Bounded: every round waits (on the server, a timer or a signal) before the next.
    loop {
        let now = Instant::now();
        // A request whose end-of-request status did not come is over once it expired (the
        // server delivers nothing to an expired request).
        while outstanding
            .front()
            .is_some_and(|r| r.expires_at + PULL_MARGIN <= now)
        {
            outstanding.pop_front();
        }
        if catching_up && outstanding.is_empty() && finished {
            catching_up = false;
            group.open_lane(lane, epoch);
        }
        let mut wake_at = outstanding.front().map(|r| r.expires_at + PULL_MARGIN);
        let mut wait_demand = false;
        let wants_next = !stopping
            && outstanding.len() < if catching_up { 1 } else { 2 }
            && outstanding
                .back()
                .is_none_or(|r| r.expires_at.saturating_duration_since(now) <= OVERLAP);
        if wants_next {
            let pending_catch_up = if catching_up { catch_up } else { 0 };
            match group.plan(&shared, lane, epoch, pending_catch_up) {
                Plan::Stop => stopping = true,
                Plan::Wait(d) => wake_at = Some(wake_at.map_or(now + d, |w| w.min(now + d))),
                Plan::WaitDemand => wait_demand = true,
                Plan::Pull { batch, expires } => {
                    let request = BatchConfig {
                        batch,
                        expires: Some(expires),
                        ..BatchConfig::default()
                    };
                    let payload = serde_json::to_vec(&request).unwrap_or_default();
                    bump(&shared.counters.pull_requests);
                    match shared
                        .client
                        .publish_with_reply(subject.clone(), inbox.clone(), payload.into())
                        .await
                    {
                        Ok(()) => {
                            outstanding.push_back(Outstanding {
                                expires_at: now + expires,
                                remaining: batch,
                            });
                            finished = catching_up;
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, lane = %l.id, "could not send a pull request");
                            let retry = now + Duration::from_millis(200);
                            wake_at = Some(wake_at.map_or(retry, |w| w.min(retry)));
                        }
                    }
                }
            }
        } else if !stopping {
            // The next request goes out when the newest one is about to expire.
            if let Some(back) = outstanding.back() {
                let next = back.expires_at.checked_sub(OVERLAP).unwrap_or(now);
                wake_at = Some(wake_at.map_or(next, |w| w.min(next)));
            }
        }
        if stopping && outstanding.is_empty() {
            break;
        }
        let wake_at = wake_at.unwrap_or(now + Duration::from_millis(250));
        let demand = group.demand_changed.notified();
        tokio::select! {
            biased;
            _ = &mut stop, if !stopping => stopping = true,
            () = demand, if wait_demand => {}
            next = tokio::time::timeout_at(wake_at, subscription.next()) => match next {
                Err(_) => {}
                Ok(None) => return,
                Ok(Some(message)) => match message.status {
                    Some(StatusCode::IDLE_HEARTBEAT) => {}
                    // The end of a request (timeout, or the server ended it): the oldest one,
                    // since the server serves requests in order.
                    Some(status) if status != StatusCode::OK => {
                        outstanding.pop_front();
                    }
                    _ => {
                        group.receive(&shared, lane, epoch, message);
                        if let Some(front) = outstanding.front_mut() {
                            front.remaining = front.remaining.saturating_sub(1);
                            if front.remaining == 0 {
                                outstanding.pop_front();
                            }
                        }
                    }
                },
            },
        }
    }
    // No request is outstanding now; what is still on its way goes into the buffer.
    let _ = subscription.unsubscribe().await;
    while let Some(message) = subscription.next().await {
        if message.status.is_none() {
            group.receive(&shared, lane, epoch, message);
        }
    }
}

/// The group's background task. See the module docs.
async fn drive(shared: Arc<Shared>, group: Arc<Group>) {
    let config = &shared.config;
    let mut closing = shared.closing.subscribe();
    let mut last_presence = Instant::now();
    let mut last_settings = Instant::now();
    // Bounded by the transport: it ends when the transport closes or the group goes idle.
    loop {
        let tick = (config.hold_ttl / 6)
            .min(group.settings().ack_wait / 6)
            .max(Duration::from_millis(20));
        tokio::select! {
            _ = closing.changed() => return,
            () = tokio::time::sleep(tick) => {}
        }
        if *closing.borrow() || group.is_stopped() {
            return;
        }
        let now = Instant::now();
        if group.idle(&shared, now) {
            tracing::debug!(group = %group.name, topic = %group.topic, "the group is idle here: letting its lanes go");
            shared.forget_group(&group).await;
            group.shutdown(&shared, now + config.request_timeout).await;
            return;
        }
        if now.saturating_duration_since(last_presence) >= config.hold_ttl / 3 {
            last_presence = now;
            if let Err(e) =
                holds::announce(&shared.js, group.member_subject.clone(), &shared.member).await
            {
                tracing::warn!(error = %e, "could not renew this process's presence");
            }
            group.count_members(&shared).await;
        }
        group.renew(&shared).await;
        group.heartbeat_waiting(&shared).await;
        group.balance(&shared).await;
        if now.saturating_duration_since(last_settings) >= config.hold_ttl / 3 {
            last_settings = now;
            if !group.refresh_settings(&shared).await {
                tracing::warn!(group = %group.name, topic = %group.topic, "the group's consumers are gone: it is opened again at the next fetch");
                shared.forget_group(&group).await;
                group.stopped.store(true, Ordering::Release);
                for (i, _) in group.keyed() {
                    group.lose(&shared, i, "its consumer was deleted");
                }
                return;
            }
        }
    }
}

pub(super) fn lane_ids(partitions: u16) -> impl Iterator<Item = String> {
    (0..partitions)
        .map(|i| format!("p{i}"))
        .chain(std::iter::once("u".to_owned()))
}

fn consumer_config(
    shared: &Shared,
    group: &str,
    topic: &str,
    lane: &str,
    settings: ConsumerSettings,
) -> pull::Config {
    let config = &shared.config;
    let keyed = lane != "u";
    pull::Config {
        durable_name: Some(names::consumer_name(group, topic, lane)),
        description: Some(format!(
            "effects: consumer {group:?} of topic {topic:?}, lane {lane}"
        )),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        filter_subject: format!(
            "{}.msg.{}.{lane}",
            config.subject_prefix,
            names::subject_token(topic)
        ),
        replay_policy: ReplayPolicy::Instant,
        max_ack_pending: i64::from(if keyed {
            settings.partition_in_flight
        } else {
            settings.unordered_in_flight
        }),
        ..pull::Config::default()
    }
}

/// Makes sure a group's consumers exist with `settings`: missing ones are created; existing ones
/// with other settings are refused with both values named, or (with `update`) changed.
pub(super) async fn ensure_consumers(
    shared: &Shared,
    group: &str,
    topic: &str,
    settings: ConsumerSettings,
    update: bool,
) -> Result<(), TransportError> {
    let ids: Vec<String> = lane_ids(shared.config.partitions).collect();
    let infos = join_all(ids.iter().map(|id| {
        shared
            .stream
            .consumer_info(names::consumer_name(group, topic, id))
    }))
    .await;
    let mut to_write = Vec::new();
    for (id, info) in ids.iter().zip(infos) {
        let wanted = consumer_config(shared, group, topic, id, settings);
        match info {
            Ok(info) => {
                let have = &info.config;
                if have.ack_wait == wanted.ack_wait
                    && have.max_ack_pending == wanted.max_ack_pending
                    && have.filter_subject == wanted.filter_subject
                {
                    continue;
                }
                if !update {
                    let (what, ours, theirs) = if have.ack_wait != wanted.ack_wait {
                        (
                            "ack wait (the fetch's visibility)".to_owned(),
                            format!("{:?}", wanted.ack_wait),
                            format!("{:?}", have.ack_wait),
                        )
                    } else if have.max_ack_pending != wanted.max_ack_pending {
                        (
                            if id == "u" {
                                "max_ack_pending (NatsConfig::unordered_in_flight)".to_owned()
                            } else {
                                "max_ack_pending (NatsConfig::partition_in_flight)".to_owned()
                            },
                            wanted.max_ack_pending.to_string(),
                            have.max_ack_pending.to_string(),
                        )
                    } else {
                        (
                            "filter subject".to_owned(),
                            wanted.filter_subject.clone(),
                            have.filter_subject.clone(),
                        )
                    };
                    return Err(refused(format!(
                        "consumer group {group:?} on topic {topic:?} (consumer {}): this process \
                         asks for the {what} {ours} and the group's consumers have {theirs}; \
                         every process of a group uses one configuration: use {theirs}, or \
                         change the group's with NatsTransport::set_consumer_settings",
                        info.name
                    )));
                }
                to_write.push(wanted);
            }
            Err(e) if matches!(e.kind(), ConsumerInfoErrorKind::NotFound) => to_write.push(wanted),
            Err(e) => {
                return Err(unavailable(
                    &format!("reading the consumers of {group:?} on {topic:?}"),
                    e,
                ));
            }
        }
    }
    let written = join_all(to_write.into_iter().map(|config| async move {
        let name = config.durable_name.clone().unwrap_or_default();
        shared
            .js
            .create_consumer_on_stream(config, shared.config.stream.as_str())
            .await
            .map_err(|e| unavailable(&format!("creating or updating consumer {name}"), e))
    }))
    .await;
    for w in written {
        w?;
    }
    Ok(())
}
