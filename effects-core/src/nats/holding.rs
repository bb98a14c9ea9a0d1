//! Which partitions this process holds: taking a free one (and waiting, on a takeover, for the
//! previous holder's messages), renewing, losing, and letting go of one cleanly; and the share
//! of each member of the group. The records themselves are in [`super::holds`]; the protocol is
//! described in the [module docs](super).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::Subject;
use async_nats::jetstream::AckKind;
use futures_util::future::join_all;
use tokio::time::Instant;

use super::config::NatsMutant;
use super::group::{Group, Held, Phase};
use super::holds::{self, HoldRecord, HoldState, Written};
use super::reader::stop_reader;
use super::transport::{Shared, bump, lock};

fn hold_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(50))
}

impl Group {
    /// Takes free lanes up to this process's share and lets go of lanes above it.
    pub(super) async fn balance(self: &Arc<Self>, shared: &Arc<Shared>) {
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
    pub(super) async fn renew(self: &Arc<Self>, shared: &Arc<Shared>) {
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
    pub(super) fn lose(&self, shared: &Shared, lane: usize, why: &str) {
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
}
