//! The lane readers: one task per lane this process reads (a held partition, or `u`), sending
//! pull requests on an inbox of its own and putting what arrives into the lane's read-ahead
//! buffer ([`Group::receive`]). What a reader asks for, and when it stops, is
//! [`Group::plan`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::StatusCode;
use async_nats::jetstream::consumer::pull::BatchConfig;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::config::NatsMutant;
use super::group::{Group, Phase};
use super::transport::{Shared, bump, lock};

/// How long one pull request waits at the server at most (also bounded by the hold and by half
/// the ack wait, see [`Group::plan`]); a lane is let go of cleanly only once its request ended,
/// so this bounds how long a release takes.
pub(super) const LONG_PULL: Duration = Duration::from_secs(1);

/// How many messages one pull request of a keyed lane asks for; the consumer's
/// `max_ack_pending` is what bounds the read-ahead.
const KEYED_BATCH: usize = 1024;

/// How long after a pull request's expiry its messages may still be on their way.
pub(super) const PULL_MARGIN: Duration = Duration::from_millis(500);

/// The next pull request is sent when the newest one has this long left.
const OVERLAP: Duration = Duration::from_millis(250);

/// A pull request is not sent with less time than this before the hold would need renewing.
const MIN_PULL: Duration = Duration::from_millis(100);

pub(super) struct Reader {
    pub(super) stop: Option<oneshot::Sender<()>>,
    pub(super) task: JoinHandle<()>,
}

impl Group {
    pub(super) fn start_reader(
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
    pub(super) fn plan(&self, shared: &Shared, lane: usize, epoch: u64, catch_up: u64) -> Plan {
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
    pub(super) fn open_lane(&self, lane: usize, epoch: u64) {
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
}

pub(super) enum Plan {
    Pull { batch: usize, expires: Duration },
    Wait(Duration),
    WaitDemand,
    Stop,
}

/// Stops a reader and waits until it has put what it had into the buffer; `false` when it had
/// to be cut short.
pub(super) async fn stop_reader(mut reader: Reader) -> bool {
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
    pub(super) expires_at: Instant,
    /// How many messages it may still bring.
    pub(super) remaining: usize,
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
    let mut outstanding: VecDeque<Outstanding> = VecDeque::new();
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
