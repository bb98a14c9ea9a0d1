//! A group's background task (the *driver*): every sixth of the hold TTL (or of the ack wait,
//! if shorter) it renews the holds and the member's presence, counts the members, takes or lets
//! go of partitions to keep this process's share, heartbeats what waits in the buffers, gives
//! back delayed give-backs that are due, reads the group's settings again, and lets everything
//! go when the group is idle here. It ends when the transport closes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use bytes::Bytes;
use tokio::time::Instant;

use super::consumers::ConsumerSettings;
use super::group::{GivenBack, Group, Leased, Phase};
use super::holds;
use super::names;
use super::transport::{Shared, bump, lock};

/// The group's background task. See the module docs.
pub(super) async fn drive(shared: Arc<Shared>, group: Arc<Group>) {
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
        }
        // Counted at every tick (one small request), so that a process joining the group gets
        // its share within a few ticks rather than a presence period.
        group.count_members(&shared).await;
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

impl Group {
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
            // A message given back comes back within an ack wait (two, when JetStream 2.9
            // dropped its redelivery); one that did not come back after three is gone from
            // the stream (its age limit, a purge): its key stops waiting for it.
            let gone: Vec<u64> = st
                .given_back
                .iter()
                .filter(|(_, gb)| {
                    gb.due.is_none() && now.saturating_duration_since(gb.touched) >= ack_wait * 3
                })
                .map(|(&seq, _)| seq)
                .collect();
            for seq in gone {
                st.given_back.remove(&seq);
                tracing::warn!(lane = %l.id, sequence = seq, "a message given back did not come back: its key goes on without it");
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

    /// Gives back to the server (NAK) the delayed give-backs of a lane that are due.
    pub(super) async fn give_back_due(&self, shared: &Shared, lane: usize, epoch: u64) {
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
                            gb.touched = Instant::now();
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, sequence = seq, "could not give back a delayed delivery: the next tick tries again");
                }
            }
        }
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

    pub(super) async fn count_members(&self, shared: &Shared) {
        let filter = names::members_filter(&shared.config.subject_prefix, &self.name, &self.topic);
        match holds::count_members(&shared.holds, &filter).await {
            Ok(n) => self.members.store(n.max(1), Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "could not count the group's members"),
        }
    }
}
