//! Transports: how messages leave (publish) and arrive (fetch, then acknowledge).
//!
//! A [`Transport`] is a broker seen through the few operations the executor and the worker use:
//!
//! - [`Transport::publish`] sends one message with its id (`key#n`, the deduplication id:
//!   publishing the same id twice must deliver it at most once per deduplication window) and
//!   headers that carry the run's key ([`HEADER_KEY`]) and `tx` ([`HEADER_TX`]). It returns once
//!   the broker has acknowledged the message; only then is the outbox row marked dispatched.
//! - [`Transport::fetch`] leases up to `max` messages of a topic to a named consumer (a group:
//!   several workers with one consumer name share the work). A leased message is invisible to
//!   the group until [`FetchRequest::visibility`] passes; then it is delivered again.
//!   [`Transport::extend`] pushes that back while the message is being worked on (a heartbeat).
//!   (A broker may fix the visibility per group: NATS refuses a fetch or heartbeat asking for
//!   another one than the group's.)
//! - **Order.** Messages with the same partition key are handed out in publish order, and only
//!   to one holder at a time: a fetch may hand several messages of one key to its caller (in
//!   order), and no other caller gets a message of that key while any of them is leased. A
//!   later fetch through the same transport may hand out more of a key whose earlier messages
//!   are still leased to it — always later ones — so the caller handles each key's deliveries
//!   in the order they were handed out, across fetches, one after the other. A caller that
//!   gives a keyed delivery back gives back the later ones of its key that it holds as well,
//!   in order. A keyed delivery given back keeps its place: nothing later of its key is handed
//!   out before it, whatever its delay. The same holds for a delivery whose visibility passed
//!   without a heartbeat. (Brokers may group keys: on NATS every key of a partition shares one
//!   holder.) Order holds as long as the caller heartbeats what it works on within the
//!   visibility; a holder that misses that may find its key handed to someone else.
//! - [`Transport::ack`] ends a delivery ([`Transport::ack_many`] several, in as few round trips
//!   as the broker allows); [`Transport::nack`] makes it visible again after a delay;
//!   [`Transport::dead_letter`] records why it can never be processed and acknowledges it,
//!   atomically where the broker allows.
//! - [`Delivery::deliveries`] counts deliveries to the group, this one included; a broker that
//!   reads ahead may count deliveries that the caller never saw (NATS, when a holder lets go of a
//!   partition with messages read ahead), so it is an upper bound on the caller's attempts.
//!
//! The methods return `impl Future + Send` (see [`crate::store`] for why). The embedded
//! implementation is [`SqliteLog`]; a NATS JetStream transport maps onto the
//! same operations (`Nats-Msg-Id` for the id, pull consumers for fetch, `AckWait` for visibility,
//! `Nak` with delay, `Term` plus a dead-letter subject).
//!
//! # Atomic publishing in the embedded case
//!
//! A transport may say that it lives in a store's database through
//! [`Transport::colocation`]. When it is equal to the store's
//! [`Store::colocation`](crate::store::Store::colocation), the executor asks the store to write
//! messages into the log tables inside the very transaction that applies the datoms (or, for a
//! run with requests, the one that records the after-requests step), and to mark their outbox
//! rows dispatched in it. There is then no window in which datoms are committed and their
//! messages are not, and no publish step that a crash could interrupt.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use crate::store::{Colocation, StoreError, Tx};

#[cfg(feature = "sqlite")]
pub use crate::sqlite::{DeadLetter, LoggedMessage, SqliteLog};

/// The header that carries the idempotency key of the run that produced a message.
pub const HEADER_KEY: &str = "effects-key";

/// The header that carries the `tx` of the run that produced a message (decimal), so a consumer
/// can read the store as of that transaction.
pub const HEADER_TX: &str = "effects-tx";

/// The headers a run's message is published with: its own, plus [`HEADER_KEY`] and
/// [`HEADER_TX`] (which win over the message's own headers of the same names).
pub fn message_headers(
    own: &BTreeMap<String, String>,
    key: &str,
    tx: Tx,
) -> BTreeMap<String, String> {
    let mut headers = own.clone();
    headers.insert(HEADER_KEY.to_owned(), key.to_owned());
    headers.insert(HEADER_TX.to_owned(), tx.to_string());
    headers
}

/// A message to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// The message id, `key#n`; the broker deduplicates on it.
    pub id: String,
    /// The topic.
    pub topic: String,
    /// The partition key: messages with one key are consumed in order.
    pub partition_key: Option<String>,
    /// Headers, [`HEADER_KEY`] and [`HEADER_TX`] included.
    pub headers: BTreeMap<String, String>,
    /// The payload (JSON for messages produced by runs).
    pub payload: Vec<u8>,
}

/// What to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    /// The consumer (group) name.
    pub consumer: String,
    /// The topic.
    pub topic: String,
    /// At most this many messages.
    pub max: usize,
    /// How long fetched messages stay invisible to the group unless acknowledged.
    pub visibility: Duration,
    /// How long to wait for a message when none is available.
    pub wait: Duration,
}

/// A fetched message, leased to the consumer until acknowledged or its visibility passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The consumer it was fetched for.
    pub consumer: String,
    /// Its topic.
    pub topic: String,
    /// Its position in the topic (the broker's sequence).
    pub sequence: u64,
    /// Its id, `key#n` for messages produced by runs.
    pub message_id: String,
    /// Its partition key.
    pub partition_key: Option<String>,
    /// Its headers.
    pub headers: BTreeMap<String, String>,
    /// Its payload.
    pub payload: Vec<u8>,
    /// How many times it has been delivered to this consumer, this time included.
    pub deliveries: u32,
}

/// A transport error. After a publish error the message may or may not have reached the broker:
/// the outbox row stays pending and is published again with the same id.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The embedded log's database failed.
    #[error("the log's database failed: {0}")]
    Log(#[from] StoreError),
    /// The broker could not be reached or did not answer in time.
    #[error("the broker is unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// The broker refused the operation.
    #[error("the broker refused the operation: {reason}")]
    Refused {
        /// Why.
        reason: String,
    },
}

/// A message broker, as the executor and the worker use it. See the [module
/// documentation](self).
pub trait Transport: Send + Sync + 'static {
    /// The database this transport lives in, if it lives in one (see the module documentation).
    fn colocation(&self) -> Option<Colocation> {
        None
    }

    /// Publishes one message; resolves once the broker has acknowledged it. Publishing an id
    /// that was already published must not deliver it twice (within the deduplication window).
    fn publish(
        &self,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Leases up to `request.max` messages, waiting up to `request.wait` for the first one.
    fn fetch(
        &self,
        request: FetchRequest,
    ) -> impl Future<Output = Result<Vec<Delivery>, TransportError>> + Send;

    /// Acknowledges a delivery: it is never delivered to this consumer again.
    fn ack(&self, delivery: &Delivery) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Acknowledges several deliveries, in the order given, in as few round trips as the
    /// broker allows; one result per delivery, in the same order. The default acknowledges
    /// them one by one.
    fn ack_many(
        &self,
        deliveries: &[Delivery],
    ) -> impl Future<Output = Vec<Result<(), TransportError>>> + Send {
        let deliveries = deliveries.to_vec();
        async move {
            let mut out = Vec::with_capacity(deliveries.len());
            for d in &deliveries {
                out.push(self.ack(d).await);
            }
            out
        }
    }

    /// Keeps a delivery leased while it is still being worked on (a heartbeat): it stays
    /// invisible to the group for `visibility` from now. Refused
    /// ([`TransportError::Refused`]) when the delivery is no longer leased to this caller:
    /// settled already (acknowledged, given back, dead-lettered), handed to someone else after
    /// its visibility passed, or — on a broker that cannot tell — its visibility passed at all
    /// (NATS refuses any late heartbeat; the SQLite log takes one while nobody fetched the
    /// message again). A caller that is refused stops working on it where it can. The default
    /// does nothing: a transport without heartbeats relies on the fetch's visibility alone.
    fn extend(
        &self,
        delivery: &Delivery,
        visibility: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let _ = (delivery, visibility);
        async { Ok(()) }
    }

    /// Gives a delivery back: it becomes visible again after `delay`. A keyed one keeps its
    /// place (see the module documentation): its key's later messages wait for it.
    fn nack(
        &self,
        delivery: &Delivery,
        delay: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Records why a delivery can never be processed and acknowledges it.
    fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
}
