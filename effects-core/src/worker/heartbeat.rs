//! Heartbeats: owns keeping the deliveries still in the worker leased. Every third of the
//! visibility, each delivery held for longer than that since it was fetched or last extended is
//! extended ([`Transport::extend`]) to the full visibility again, so it is not handed to another
//! process while this one lives and works on it (or waits to retry it). If the process dies,
//! nothing extends it any more and it comes back after the visibility.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::{Inner, bump};
use crate::handler::Handler;
use crate::http::HttpClient;
use crate::store::Store;
use crate::transport::{Delivery, Transport};
use crate::worker::Inputs;

/// How often heartbeats are sent, for a visibility.
pub(super) fn every(visibility: Duration) -> Duration {
    (visibility / 3).max(Duration::from_millis(10))
}

/// Whether a delivery held since `since` (fetched or last extended) is due for a heartbeat.
pub(super) fn due(since: Instant, now: Instant, visibility: Duration) -> bool {
    now.saturating_duration_since(since) >= every(visibility)
}

impl<S, T, C, H, I> Inner<S, T, C, H, I>
where
    S: Store + Clone,
    T: Transport,
    C: HttpClient + 'static,
    H: Handler,
    I: Inputs<H, S>,
{
    /// Extends these deliveries to the full visibility from now, all at once.
    pub(super) async fn extend(&self, deliveries: Vec<Arc<Delivery>>) {
        let visibility = self.config.visibility;
        let transport = self.executor.transport();
        let results = join_all(deliveries.iter().map(|d| transport.extend(d, visibility))).await;
        for (delivery, result) in deliveries.iter().zip(results) {
            if let Err(e) = result {
                bump(&self.counters.transport_errors);
                tracing::warn!(error = %e, message_id = %delivery.message_id, "a heartbeat was refused: the delivery may be handed to another consumer");
            }
        }
    }
}
