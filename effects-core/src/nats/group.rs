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
//!
//! This file has the state and the hand-out; the other parts of a group are in
//! [`super::consumers`] (its durable consumers and their settings), [`super::holding`] (taking,
//! renewing, losing and letting go of partition holds), [`super::reader`] (the lane readers) and
//! [`super::driver`] (the background task).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::NatsMutant;
use super::consumers::{ConsumerSettings, ack_wait_for, ensure_consumers, lane_ids};
use super::driver::drive;
use super::holds;
use super::names;
use super::reader::Reader;
use super::transport::{Shared, lock, read_headers, refused};
use crate::transport::TransportError;

/// How long a fetch's demand for messages without a key outlives the fetch, so a caller polling
/// with a zero wait still gets them.
const DEMAND_LINGER: Duration = Duration::from_secs(1);

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
    pub(super) touched: Instant,
    /// Why its headers cannot be read (a value that does not decode): it is dead-lettered
    /// instead of handed out.
    pub(super) unreadable: Option<String>,
}

/// A keyed message this process gave back, until it comes back: later messages of its key
/// wait for it.
pub(super) struct GivenBack {
    pub(super) key: Option<String>,
    pub(super) reply: Subject,
    /// `Some` while the give-back's delay runs: it is still pending here (heartbeated), and is
    /// given back to the server when due.
    pub(super) due: Option<Instant>,
    pub(super) touched: Instant,
}

/// A delivery handed out and not settled.
pub(super) struct Leased {
    pub(super) deliveries: u32,
    pub(super) key: Option<String>,
    /// Until when the server keeps it invisible (receipt or last heartbeat + ack wait).
    pub(super) until: Instant,
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
pub(super) struct Held {
    /// The sequence of its last hold record.
    pub(super) record: u64,
    /// Until when it may hand out and heartbeat (its own clock: renewal sent + TTL - margin).
    pub(super) valid_until: Instant,
    pub(super) renewed_at: Instant,
    pub(super) phase: Phase,
    /// Set when the release writes its record: renewals stop.
    pub(super) last_write: bool,
}

#[derive(Default)]
pub(super) struct LaneState {
    pub(super) held: Option<Held>,
    /// Moves on at every acquisition, loss and release: what an older reader or lease refers
    /// to is no longer this process's.
    pub(super) epoch: u64,
    pub(super) buffer: BTreeMap<u64, Buffered>,
    /// Handed out, not settled.
    pub(super) leased: HashMap<u64, Leased>,
    /// The highest sequence that arrived as a first delivery in this epoch (first deliveries
    /// come in sequence order; see [`Group::receive`]).
    pub(super) highest_new: u64,
    pub(super) given_back: BTreeMap<u64, GivenBack>,
    pub(super) reader: Option<Reader>,
    pub(super) releasing: bool,
}

/// One lane: a durable pull consumer.
pub(super) struct Lane {
    pub(super) id: String,
    pub(super) keyed: bool,
    pub(super) consumer: String,
    pub(super) hold_subject: String,
    pub(super) state: Mutex<LaneState>,
    /// Serializes the writes of this lane's hold record (renewal, release).
    pub(super) record_lock: tokio::sync::Mutex<()>,
}

#[derive(Clone, Copy)]
pub(super) struct Demand {
    pub(super) want: usize,
    pub(super) until: Instant,
}

pub(super) struct Activity {
    pub(super) fetching: usize,
    pub(super) last: Instant,
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
    pub(super) settings: Mutex<ConsumerSettings>,
    /// Woken when something may be handed out (a message arrived, a lane opened, a key unblocked).
    pub(super) ready: Notify,
    pub(super) rotation: AtomicUsize,
    pub(super) members: AtomicUsize,
    pub(super) demand: Mutex<Option<Demand>>,
    pub(super) demand_changed: Notify,
    pub(super) activity: Mutex<Activity>,
    pub(super) stopped: AtomicBool,
    pub(super) member_subject: String,
    pub(super) driver: Mutex<Option<JoinHandle<()>>>,
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

    pub(super) fn handing_out(
        &self,
        shared: &Shared,
        lane: &Lane,
        st: &LaneState,
        now: Instant,
    ) -> bool {
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
    pub(super) fn eligible(st: &LaneState, max: usize) -> Vec<u64> {
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
                unreadable: None,
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

    /// A message arrived from a lane's reader of `epoch`.
    pub(super) fn receive(
        &self,
        shared: &Shared,
        lane: usize,
        epoch: u64,
        message: async_nats::Message,
    ) {
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
        let (message_id, partition_key, headers, unreadable) =
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
                    unreadable,
                },
            );
        }
        self.ready.notify_waiters();
    }

    pub(super) fn keyed(&self) -> impl Iterator<Item = (usize, &Lane)> {
        self.lanes.iter().enumerate().filter(|(_, l)| l.keyed)
    }

    /// The keyed lanes this process holds (any phase).
    pub(super) fn held_lanes(&self) -> Vec<String> {
        self.keyed()
            .filter(|(_, l)| lock(&l.state).held.is_some())
            .map(|(_, l)| l.id.clone())
            .collect()
    }

    pub(super) fn set_settings(&self, settings: ConsumerSettings) {
        *lock(&self.settings) = settings;
    }
}
