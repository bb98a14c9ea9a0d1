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
//! and the dead letters, under [`NatsConfig::subject_prefix`] (default `effects`); a second one
//! next to it, `<stream>_HOLDS`, holds which process holds which partition (see *Holds* below):
//!
//! | stream | subject | what |
//! | --- | --- | --- |
//! | `<stream>` | `<prefix>.msg.<topic>.p<i>` | messages with a partition key in partition `i` |
//! | `<stream>` | `<prefix>.msg.<topic>.u` | messages without a partition key |
//! | `<stream>` | `<prefix>.dead.<consumer>.<topic>` | dead letters of a consumer (group) |
//! | `<stream>_HOLDS` | `<prefix>.hold.<consumer>.<topic>.p<i>` | the hold of partition `i` of a group |
//! | `<stream>_HOLDS` | `<prefix>.member.<consumer>.<topic>.<member>` | a process fetching from a group |
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
//! # One configuration per stream and per group
//!
//! Settings that every process of a stream or a group shares live on the server, and a process
//! configured differently is refused with both values named instead of silently changing them
//! for everyone:
//!
//! - **Stream settings**: the duplicate window ([`NatsConfig::duplicate_window`]), the age limit
//!   ([`NatsConfig::max_age`]) and the hold TTL ([`NatsConfig::hold_ttl`], the holds stream's
//!   age limit). The first transport creates the streams with its values; a transport whose
//!   values differ from the server's refuses to connect ([`NatsError::Settings`]). Change them
//!   with [`NatsTransport::update_stream_settings`], then restart the processes with the new
//!   configuration.
//! - **Consumer settings** of a group on a topic ([`ConsumerSettings`]): the ack wait, which is
//!   the visibility of every fetch and heartbeat of the group, and the in-flight limits
//!   ([`NatsConfig::partition_in_flight`], [`NatsConfig::unordered_in_flight`]). The group's
//!   first fetch creates its consumers with its visibility and this process's limits; a fetch
//!   (or heartbeat) asking for another visibility, or a process configured with other limits,
//!   is refused ([`TransportError::Refused`](crate::transport::TransportError::Refused)). Change
//!   them with [`NatsTransport::set_consumer_settings`]; running processes read them again within
//!   a third of the hold TTL.
//!
//! # Publishing
//!
//! [`Transport::publish`] sends the payload with the header `Nats-Msg-Id` set to the
//! message's id (`key#n`) and waits for the stream's acknowledgement. Within the stream's
//! [`NatsConfig::duplicate_window`] (default 2 minutes) the server stores an id once: a
//! re-published copy is acknowledged as a duplicate, which counts in [`NatsStats::duplicates`]
//! and is not an error. After the window, a copy is stored again and reaches consumers, whose
//! idempotency keys (`handler:message-id`) absorb it.
//!
//! Headers travel as NATS headers. Their values (and the message id and partition key) are
//! written so that NATS carries them unchanged: `%`, control characters and whitespace at either
//! end become `%XX`; ordinary values read the same to any NATS client. Names must be printable
//! ASCII without `:`; names starting with `Nats-`, [`HEADER_PARTITION_KEY`] and
//! `effects-dead-letter-*` are reserved, and a message using them is refused.
//!
//! # Consuming
//!
//! A consumer name of [`FetchRequest`](crate::transport::FetchRequest) is a *group*: every
//! process fetching with that name shares the work. For each (group, topic) there are durable
//! pull consumers ([`NatsTransport::consumer_names`]), called *lanes*: one per partition
//! (`p<i>`, `max_ack_pending =` [`NatsConfig::partition_in_flight`]) and one for messages
//! without a key (`u`, `max_ack_pending =` [`NatsConfig::unordered_in_flight`]). All use
//! explicit acks and an `AckWait` equal to the group's visibility.
//!
//! A process reads a lane through one pull request at a time on an inbox of its own (the next
//! sent shortly before the current one expires, so two overlap briefly): the server delivers
//! messages into it as they are published, up to the lane's `max_ack_pending`, and the
//! transport keeps them in a read-ahead buffer per lane. [`Transport::fetch`] takes from the
//! buffers (one lane after another from a rotating start, so a fetch spreads over the
//! partitions) and waits, without polling, until something arrives or its wait has passed. A
//! request waits at the server at most one second, less than half the ack wait and less than
//! what is left of the hold. The `u` lane asks only while fetches want messages (and a second
//! after), for as many as they want, so the processes of a group share unkeyed messages.
//!
//! # Order: holds
//!
//! The messages of one partition are handed out by one process at a time, the *holder* of the
//! partition, in sequence order; that process may hand out several at once, and more of a
//! partition whose earlier messages are still in work, always later ones (the
//! [order contract](crate::transport)). So the messages of one key, and of every key of its
//! partition, are in one process, in publish order; that process (the worker) handles each key's
//! in the order handed out. Keys of one partition are not ordered among each other by the
//! transport; they only share a holder.
//!
//! A hold is the last message on the partition's hold subject, written by compare-and-set
//! (`Nats-Expected-Last-Subject-Sequence`): taken with the sequence seen there (0 when there is
//! none), renewed every third of [`NatsConfig::hold_ttl`] with the sequence of the holder's own
//! last record, released by writing a `released` record. The holds stream keeps one message per
//! subject and drops messages older than the TTL, so a hold that is not renewed disappears by
//! itself. A process holds a partition as long as its renewals get through; it hands out that
//! partition's messages and heartbeats them only while its hold is valid **by its own monotonic
//! clock**: a renewal sent at `t` makes the hold valid until `t + TTL − TTL/5`, one fifth before
//! the record can expire on the server. A renewal that finds another record (someone else took
//! the partition after the hold expired) ends the hold at once. (The fence is this process's
//! clock; the expiry of records is the server's: a jump of the server's wall clock forward
//! shortens holds, and another process may then take a partition while its holder still hands
//! it out, until the holder's next renewal finds out, within a third of the TTL.)
//!
//! ```text
//!  process A   take(0)→#41   renew(#41)→#57   renew(#57)→#63   ✝ dies
//!  A's fence   ├──────── hands out and heartbeats p3 ─────────┤ t63 + TTL − TTL/5
//!  record      [A #41]───────[A #57]──────────[A #63]───────────────┤ t63 + TTL: gone
//!  process B   (a member, below its share)                         take(0)→#70
//!                                                                  ├─ ack wait + TTL/5 ─┤
//!                                                                      pull p3: A's pending
//!                                                                      messages first, in order
//! ```
//!
//! (`take(0)→#41`: written expecting no record, stored as sequence 41; `t63`: when the renewal
//! that wrote #63 was sent.)
//!
//! The processes of a group are its *members*: each announces itself on its member subject
//! every third of the TTL (the record expires with the TTL), and counts the members at every
//! tick of its driver (a sixth of the TTL or of the ack wait, whichever is shorter). A process
//! holds at most `ceil(partitions / members)` partitions: it takes free ones up to that (each
//! from its own starting point, so members do not race for the same ones) and lets go of the
//! rest, those with the least in flight first. So two processes end up with half the partitions
//! each — a process joining a busy group gets its share within a few ticks plus the releases'
//! last pull requests (about 3–5 s at the defaults) — and a
//! process that has not fetched from a group for `max(ack wait, 3 × TTL)` and has nothing of it
//! in work lets go of all of its partitions.
//!
//! **Letting go.** A release stops handing out, lets the lane's pull requests run out (at most a
//! second), gives back what it read ahead (a `NAK` each, in sequence order), waits until what it
//! handed out is acknowledged or given back (without bound for a rebalance, since that is work
//! in progress; up to [`NatsConfig::request_timeout`] at [`NatsTransport::close`]), and writes
//! the `released` record with how long a new holder must wait: 0 when everything is settled or
//! back at the server, what is left of a delayed give-back, the ack wait when deliveries were
//! still out. A new holder of a cleanly released partition pulls at once: the given-back
//! messages are first in the consumer's redelivery queue. [`NatsTransport::close`] releases
//! everything; dropping the last clone of a transport does the same in the background.
//!
//! **Takeover.** A process that dies leaves its holds to expire. Its pending messages (read
//! ahead, or in work in its worker) are redelivered by the server only once their ack wait
//! passed since their last heartbeat, which the dead holder sent at the latest just before its
//! fence closed. So a new holder that takes a partition whose previous hold expired (not
//! released) while the partition's consumer still has messages pending (`num_ack_pending > 0`)
//! waits the ack wait plus TTL/5 before pulling: then all of them are due again. Its first pull
//! asks for exactly as many messages as are pending then, and the partition opens only once
//! that pull ended, so the dead holder's messages are in the buffer together and handed out in
//! sequence order, before anything newer. (JetStream queues messages that expire at different
//! times in the order they expired, not in sequence order: the transport sorts them.) A
//! partition is therefore taken over within `TTL + ack wait + TTL/5` (plus one driver tick, a
//! sixth of the TTL) of its holder's death, and at once after a clean release.
//!
//! What the dead holder's messages wait for is their ack wait: keep the visibility short and
//! heartbeat work in progress ([`Transport::extend`]) rather than choosing a long visibility.
//!
//! # Heartbeats, giving back, settling
//!
//! [`Transport::extend`] sends an in-progress acknowledgement (`+WPI`) through the delivery's
//! reply subject and waits for the server's confirmation; the server then keeps the message
//! invisible for the ack wait from then. It is refused when the delivery is not leased through
//! this connection (settled, fetched elsewhere), when its visibility already passed (the server
//! may be delivering it again), when its partition's hold is no longer valid, or when the
//! visibility asked for is not the group's ack wait. The transport heartbeats what waits in its
//! own buffers the same way.
//!
//! [`Transport::nack`] with no delay sends a `NAK`: the message goes to the front of the
//! consumer's redelivery queue and comes back to the holder. A keyed message given back waits
//! for nothing but keeps its place: until it is back, nothing later of its key is handed out
//! (other keys of the partition go on). With a delay, a keyed message of a held partition stays
//! pending here (heartbeated) while the delay runs, with its key's later messages waiting
//! behind it, and is given back when due; a process that dies meanwhile leaves it to the
//! takeover like any pending message. Messages without a key are given back with a `NAK` with
//! the delay. A delivery whose visibility passes without a heartbeat is treated like one given
//! back: its key waits until the server delivers it again (or it is acknowledged late).
//!
//! [`Transport::ack`], `nack` and `dead_letter` wait for the server's confirmation;
//! [`Transport::ack_many`] sends all its acknowledgements before waiting for the first answer
//! (one round trip for the batch; a result per delivery). A delivery is settled through the
//! connection that fetched it. [`Delivery::deliveries`] is the server's delivery count: it also
//! counts deliveries into a read-ahead buffer that were given back unseen when a holder let go
//! of a partition. [`Delivery::sequence`] is the stream sequence and [`Delivery::message_id`]
//! the `Nats-Msg-Id` (or `<stream>:<sequence>` for a message published without one). A
//! message whose `Nats-Msg-Id` or partition-key header decodes to bytes that are not UTF-8
//! (only another client can write one) is dead-lettered by the transport with the reason,
//! never handed out under a guessed id or key.
//!
//! **Dead letters.** [`Transport::dead_letter`] publishes the payload and headers to
//! `<prefix>.dead.<consumer>.<topic>` with the reason, consumer, topic, sequence, delivery count
//! and message id in `effects-dead-letter-*` headers (and a `Nats-Msg-Id` unique to the
//! message, so a retried dead-lettering is stored once), waits for the acknowledgement, then
//! terminates the original (`TERM`). [`NatsTransport::dead_letters`] reads them back. A dead
//! letter that would not fit in the server's `max_payload` with its payload (a payload at the
//! maximum) goes without it, its size in [`HEADER_DEAD_LETTER_PAYLOAD_OMITTED`]; the original
//! stays in the stream at its sequence.
//!
//! **MaxDeliver.** The server's own `MaxDeliver` stops delivering a message after that many
//! attempts and leaves only an advisory behind; instead the consumers deliver without limit and,
//! with [`NatsConfig::max_deliver`] set, the transport dead-letters a message delivered more
//! often than that with the reason, so a message is never dropped without a record. The worker's
//! `max_deliveries` does the same one layer up.
//!
//! # What this relies on in JetStream 2.9
//!
//! NATS 2.9 has no pinned consumers and no per-message TTL, hence holds built from a stream.
//! Two behaviours of its pull consumers shape the design, and
//! `tests/tests/nats_transport.rs` checks them against the server:
//!
//! - An expired or given-back message goes to the consumer's redelivery queue, which a pull
//!   serves before anything new; messages that expire together are queued in sequence order,
//!   messages that expire at different times in the order they expired.
//! - When the server takes a message from the redelivery queue for a pull request that turns out
//!   to have expired (or whose inbox is gone) and no live request follows, it drops the message
//!   from the queue (it comes back only after another ack wait) and delivers the consumer's last
//!   new message a second time. So the transport keeps a live request behind an expiring one,
//!   lets its requests run out before it gives anything back at a release, bounds every request
//!   by half the ack wait (a request left behind by a dead holder is gone before that holder's
//!   messages are due again), and drops a repeated first delivery of a message it already has.
//!
//! # Connection
//!
//! [`NatsConfig`] sets the URL(s), the connect timeout, the timeout of requests and publish
//! acknowledgements, reconnection ([`Reconnect`]: attempts and backoff; by default forever),
//! optional credentials ([`Auth`]) and optional TLS ([`TlsConfig`], rustls: a private CA, a
//! client certificate, TLS required). While the server is away, publishes fail with
//! [`TransportError::Unavailable`](crate::transport::TransportError::Unavailable) after the
//! request timeout and the outbox publishes them again later under the same ids; holds that
//! cannot be renewed in time are given up like a crashed holder's.
//!
//! # Differences from the embedded log
//!
//! [`SqliteLog`](crate::transport::SqliteLog) orders by exact partition key and deduplicates ids
//! forever; here keys share partitions (one holder per partition) and deduplication lasts the
//! duplicate window. The SQLite log takes each fetch's visibility per message; here it is the
//! group's ack wait, one for all its processes. The SQLite log accepts a late heartbeat for a
//! message nobody fetched again; here a late heartbeat is refused. A delivery is settled through
//! the connection that fetched it. The conformance suite
//! (`tests/tests/transport_conformance.rs`) states each difference as a test.

/// The NATS client this transport is built on, for [`NatsTransport::client`] and
/// [`NatsTransport::jetstream`] (the same version, whatever else the application depends on).
pub use async_nats;

mod config;
mod consumers;
mod driver;
mod error;
mod group;
mod holding;
mod holds;
mod names;
mod reader;
mod setup;
mod transport;

pub use self::config::{Auth, NatsConfig, NatsMutant, Reconnect, Storage, TlsConfig};
pub use self::consumers::ConsumerSettings;
pub use self::error::NatsError;
pub use self::transport::{
    HEADER_DEAD_LETTER_CONSUMER, HEADER_DEAD_LETTER_DELIVERIES, HEADER_DEAD_LETTER_MESSAGE_ID,
    HEADER_DEAD_LETTER_PAYLOAD_OMITTED, HEADER_DEAD_LETTER_REASON, HEADER_DEAD_LETTER_SEQUENCE,
    HEADER_DEAD_LETTER_TOPIC, HEADER_PARTITION_KEY, NatsDeadLetter, NatsStats, NatsTransport,
};

#[cfg(doc)]
use crate::transport::{Delivery, Transport};
