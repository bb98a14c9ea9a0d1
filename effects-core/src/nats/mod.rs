//! The NATS JetStream transport (feature `nats`): [`NatsTransport`], a [`Transport`] for many
//! worker processes on one or more machines.
//!
//! ```no_run
//! use std::sync::Arc;
//! use effects_core::executor::Executor;
//! use effects_core::nats::{NatsConfig, NatsTransport};
//! use effects_core::store::SqliteStore;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = NatsTransport::connect(NatsConfig::new("nats://127.0.0.1:4222")).await?;
//! let store = SqliteStore::open("cards.db")?;
//! let executor = Arc::new(Executor::builder(store, transport).build());
//! # Ok(()) }
//! ```
//!
//! # On the server
//!
//! One stream ([`NatsConfig::stream`], default `EFFECTS`, retention `limits`) holds every topic
//! and the dead letters, under [`NatsConfig::subject_prefix`] (default `effects`):
//!
//! | subject | what |
//! | --- | --- |
//! | `<prefix>.msg.<topic>.p<i>` | messages with a partition key in partition `i` |
//! | `<prefix>.msg.<topic>.u` | messages without a partition key |
//! | `<prefix>.dead.<consumer>.<topic>` | dead letters of a consumer (group) |
//!
//! `<topic>` and `<consumer>` are single subject tokens: ASCII letters, digits, `-` and `_` stay
//! as they are; every other byte of the UTF-8 name (`.`, `*`, `>`, spaces, `~`, non-ASCII)
//! becomes `~XX` (upper-case hex), and the empty name is `~`. So `card-status-changed` is
//! `card-status-changed`, `orders.eu` is `orders~2Eeu`, and no two topics share a subject.
//!
//! The partition of a key is FNV-1a (64-bit) of its UTF-8 bytes modulo
//! [`NatsConfig::partitions`] (default 16; [`NatsTransport::partition_of`]). The count is written
//! into the stream's description when the transport creates the stream, and a transport
//! configured with another count refuses to connect to it, since publishers and consumers must
//! agree on where a key lives.
//!
//! # Publishing
//!
//! [`Transport::publish`] sends the payload with the header `Nats-Msg-Id` set to the
//! message's id (`key#n`) and waits for the stream's acknowledgement. Within the stream's
//! [`NatsConfig::duplicate_window`] (default 2 minutes, set on the stream when connecting) the
//! server stores an id once: a re-published copy is acknowledged as a duplicate, which counts in
//! [`NatsStats::duplicates`] and is not an error. After the window, a copy is stored again and
//! reaches consumers, whose idempotency keys (`handler:message-id`) absorb it.
//!
//! Headers travel as NATS headers. Their values (and the message id and partition key) are
//! written so that NATS carries them unchanged: `%`, control characters and whitespace at either
//! end become `%XX`; ordinary values read the same to any NATS client. Names must be printable
//! ASCII without `:`; names starting with `Nats-`, [`HEADER_PARTITION_KEY`] and
//! `effects-dead-letter-*` are reserved, and a message using them is refused.
//!
//! # Consuming, and the order of one key's messages
//!
//! A consumer name of [`FetchRequest`](crate::transport::FetchRequest) is a *group*: every
//! process fetching with that name shares the work. For each (group, topic) the transport
//! creates durable pull consumers ([`NatsTransport::consumer_names`]): one per partition with
//! `max_ack_pending = 1`, and one for messages without a key with
//! `max_ack_pending =` [`NatsConfig::unordered_in_flight`]. All use explicit acks and an
//! `AckWait` equal to the fetch's visibility.
//!
//! **Order.** A partition's consumer hands out one message at a time, to whichever process asks,
//! and the next only after that one was acknowledged or dead-lettered. So the messages of one
//! partition key (and of every key in the same partition) are handled one after another in
//! publish order, however many worker processes share the group. A process that dies holding a
//! message hands the partition over by doing nothing: after `AckWait` the server delivers the same
//! message again, to any process, and the partition moves on once that delivery is
//! acknowledged. A given-back message ([`Transport::nack`]) keeps its place too: the partition
//! waits for its delay. The cost is head-of-line blocking: keys that share a partition wait for
//! each other, and a group has at most `partitions` keyed messages in flight (choose the count
//! for the parallelism you want). Messages without a key are not ordered.
//!
//! **Fetching.** [`Transport::fetch`] sweeps the lanes from a rotating start, asking each lane
//! for at most what is still wanted, so a fetch never leases more than `max`. A lane whose
//! message is in flight in another process is asked with a short expiry
//! ([`NatsConfig::busy_partition_wait`]); every pull request is read to its end, so no message
//! is ever sent to a request nobody listens to (when the server's end-of-request status does not
//! come, the request is given up half a second after its expiry: the server delivers nothing to
//! an expired request). Partitions this process holds are not asked. When
//! nothing is there, the fetch looks again every [`NatsConfig::poll_interval`] (at once after a
//! publish or a settled delivery through the same transport, which may have freed a partition)
//! until the fetch's wait has passed.
//!
//! **Settling.** [`Transport::ack`], `nack` and `dead_letter` wait for the server's
//! confirmation. `nack` with a delay is a `NAK` with that delay. [`Delivery::deliveries`] is the
//! server's delivery count, [`Delivery::sequence`] the stream sequence and
//! [`Delivery::message_id`] the `Nats-Msg-Id` (or `<stream>:<sequence>` for a message published
//! without one).
//!
//! **Dead letters.** [`Transport::dead_letter`] publishes the payload and headers to
//! `<prefix>.dead.<consumer>.<topic>` with the reason, consumer, topic, sequence, delivery count
//! and message id in `effects-dead-letter-*` headers (and a `Nats-Msg-Id` unique to the
//! message, so a retried dead-lettering is stored once), waits for the acknowledgement, then
//! terminates the original (`TERM`). [`NatsTransport::dead_letters`] reads them back.
//!
//! **MaxDeliver.** The server's own `MaxDeliver` stops delivering a message after that many
//! attempts and leaves only an advisory behind; instead the consumers deliver without limit and, with [`NatsConfig::max_deliver`] set, the
//! transport dead-letters a message delivered more often than that with the reason, so a
//! message is never dropped without a record. The worker's `max_deliveries` does the same one
//! layer up.
//!
//! # Connection
//!
//! [`NatsConfig`] sets the URL(s), the connect timeout, the timeout of requests and publish
//! acknowledgements, reconnection ([`Reconnect`]: attempts and backoff; by default forever),
//! optional credentials ([`Auth`]) and optional TLS ([`TlsConfig`], rustls: a private CA, a
//! client certificate, TLS required). While the server is away, publishes fail with
//! [`TransportError::Unavailable`](crate::transport::TransportError::Unavailable) after the
//! request timeout and the outbox publishes them again later under the same ids.
//!
//! # Differences from the embedded log
//!
//! [`SqliteLog`](crate::transport::SqliteLog) orders by exact partition key and deduplicates ids
//! forever; here keys share partitions and deduplication lasts the duplicate window. The
//! SQLite log takes each fetch's visibility per message; here it is the consumers' `AckWait`,
//! updated when a fetch asks for another one (for every message of the group). A delivery is
//! settled through the connection that fetched it. The conformance suite
//! (`tests/tests/transport_conformance.rs`) states each difference as a test.

/// The NATS client this transport is built on, for [`NatsTransport::client`] and
/// [`NatsTransport::jetstream`] (the same version, whatever else the application depends on).
pub use async_nats;

mod config;
mod error;
mod group;
mod holds;
mod names;
mod setup;
mod transport;

pub use self::config::{Auth, NatsConfig, NatsMutant, Reconnect, Storage, TlsConfig};
pub use self::error::NatsError;
pub use self::group::ConsumerSettings;
pub use self::transport::{
    HEADER_DEAD_LETTER_CONSUMER, HEADER_DEAD_LETTER_DELIVERIES, HEADER_DEAD_LETTER_MESSAGE_ID,
    HEADER_DEAD_LETTER_REASON, HEADER_DEAD_LETTER_SEQUENCE, HEADER_DEAD_LETTER_TOPIC,
    HEADER_PARTITION_KEY, NatsDeadLetter, NatsStats, NatsTransport,
};

#[cfg(doc)]
use crate::transport::{Delivery, Transport};
