//! [`NatsTransport`]: the [`Transport`] operations on JetStream. What is shared by the clones
//! of one transport (the connection, the groups it fetches from, its leases) is [`Shared`];
//! the groups, their lanes and holds are in [`super::group`], connecting and the streams in
//! [`super::setup`].

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, stream};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::join_all;
use tokio::time::Instant;
use tracing::Instrument;

use super::config::NatsConfig;
use super::consumers::{ConsumerSettings, ensure_consumers, lane_ids};
use super::error::NatsError;
use super::group::{Group, Taken};
use super::names;
use super::setup::{Check, connect_client, ensure_holds_stream, ensure_stream};
use crate::transport::{Delivery, FetchRequest, OutgoingMessage, Transport, TransportError};

/// The header that carries a message's partition key (encoded like every value, see the module
/// docs).
pub const HEADER_PARTITION_KEY: &str = "effects-partition-key";
/// On a dead letter: why the message can never be processed.
pub const HEADER_DEAD_LETTER_REASON: &str = "effects-dead-letter-reason";
/// On a dead letter: the consumer (group) that gave up.
pub const HEADER_DEAD_LETTER_CONSUMER: &str = "effects-dead-letter-consumer";
/// On a dead letter: the topic of the original message.
pub const HEADER_DEAD_LETTER_TOPIC: &str = "effects-dead-letter-topic";
/// On a dead letter: the stream sequence of the original message.
pub const HEADER_DEAD_LETTER_SEQUENCE: &str = "effects-dead-letter-sequence";
/// On a dead letter: how many times the original message had been delivered.
pub const HEADER_DEAD_LETTER_DELIVERIES: &str = "effects-dead-letter-deliveries";
/// On a dead letter: the original message's id.
pub const HEADER_DEAD_LETTER_MESSAGE_ID: &str = "effects-dead-letter-message-id";
/// On a dead letter without the original payload: its size in bytes. It is left out when the
/// dead letter would not fit in the server's `max_payload` with it (a payload at the maximum,
/// with the dead letter's headers); the original stays in the stream at its sequence.
pub const HEADER_DEAD_LETTER_PAYLOAD_OMITTED: &str = "effects-dead-letter-payload-omitted";

const MSG_ID: &str = "Nats-Msg-Id";
const DEAD_PREFIX: &str = "effects-dead-letter-";
/// How long a lease nobody settled is remembered after its visibility passed.
const LEASE_GRACE: Duration = Duration::from_secs(60);

/// What the transport has done since it connected (counted at the source: each counter moves
/// when the server answered, or when the request was sent for those that have no answer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsStats {
    /// Publishes the stream stored as new messages.
    pub published: u64,
    /// Publishes the stream reported as duplicates of an id it already had (absorbed, not
    /// errors).
    pub duplicates: u64,
    /// Publishes that failed (no acknowledgement, or refused).
    pub publish_failures: u64,
    /// Deliveries handed out by [`Transport::fetch`].
    pub fetched: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries given back.
    pub nacked: u64,
    /// Deliveries dead-lettered (by the caller, or by the transport past
    /// [`NatsConfig::max_deliver`]).
    pub dead_lettered: u64,
    /// Pull requests sent to the server.
    pub pull_requests: u64,
    /// In-progress acknowledgements sent: [`Transport::extend`], and the transport's own for
    /// messages waiting in its read-ahead.
    pub heartbeats: u64,
    /// Partition lanes this transport took.
    pub holds_acquired: u64,
    /// Partition lanes it let go of cleanly.
    pub holds_released: u64,
    /// Partition lanes it lost (a renewal that did not get through in time, or another
    /// holder).
    pub holds_lost: u64,
    /// Lanes taken over with messages of a previous holder pending, that waited for them.
    pub takeovers_waited: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    published: AtomicU64,
    duplicates: AtomicU64,
    publish_failures: AtomicU64,
    fetched: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    dead_lettered: AtomicU64,
    pub(super) pull_requests: AtomicU64,
    pub(super) heartbeats: AtomicU64,
    pub(super) holds_acquired: AtomicU64,
    pub(super) holds_released: AtomicU64,
    pub(super) holds_lost: AtomicU64,
    pub(super) takeovers_waited: AtomicU64,
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A message a consumer gave up on, read back from the dead-letter subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsDeadLetter {
    /// The consumer (group).
    pub consumer: String,
    /// The original topic.
    pub topic: String,
    /// The original message's stream sequence.
    pub sequence: u64,
    /// The original message's id.
    pub message_id: String,
    /// The original partition key.
    pub partition_key: Option<String>,
    /// The original headers.
    pub headers: BTreeMap<String, String>,
    /// The original payload (empty when it was left out: see
    /// [`HEADER_DEAD_LETTER_PAYLOAD_OMITTED`], kept in [`NatsDeadLetter::headers`]).
    pub payload: Vec<u8>,
    /// Why.
    pub reason: String,
    /// How many times it had been delivered.
    pub deliveries: u32,
    /// The dead letter's own stream sequence.
    pub dead_letter_sequence: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct LeaseKey {
    consumer: String,
    topic: String,
    sequence: u64,
    deliveries: u32,
}

impl LeaseKey {
    fn of(d: &Delivery) -> LeaseKey {
        LeaseKey {
            consumer: d.consumer.clone(),
            topic: d.topic.clone(),
            sequence: d.sequence,
            deliveries: d.deliveries,
        }
    }
}

/// A delivery handed out through this connection and not settled yet.
#[derive(Clone)]
struct Lease {
    reply: Subject,
    group: Arc<Group>,
    lane: usize,
    epoch: u64,
    partition_key: Option<String>,
    /// Until when the server keeps it invisible (by this process's clock).
    until: Instant,
}

/// What the clones of one transport share.
pub(super) struct Shared {
    pub(super) config: NatsConfig,
    pub(super) client: async_nats::Client,
    pub(super) js: jetstream::Context,
    /// The message stream.
    pub(super) stream: stream::Stream,
    /// The holds stream.
    pub(super) holds: stream::Stream,
    /// This connection's name among the members of a group.
    pub(super) member: String,
    groups: tokio::sync::Mutex<HashMap<(String, String), Arc<Group>>>,
    leases: Mutex<HashMap<LeaseKey, Lease>>,
    pub(super) counters: Counters,
    /// Set when the transport closes: the groups' drivers stop.
    pub(super) closing: tokio::sync::watch::Sender<bool>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these mutexes stays consistent when a holder panics (plain inserts and
    // removals), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn unavailable(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Unavailable {
        reason: format!("{what}: {e}"),
    }
}

pub(super) fn refused(reason: String) -> TransportError {
    TransportError::Refused { reason }
}

impl Shared {
    /// Sends an acknowledgement of some kind to a delivery's reply subject and waits for the
    /// server's confirmation.
    pub(super) async fn confirm(
        &self,
        reply: Subject,
        kind: AckKind,
    ) -> Result<(), TransportError> {
        let payload: Bytes = kind.into();
        match tokio::time::timeout(
            self.config.request_timeout,
            self.client.request(reply, payload),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(unavailable("settling a delivery", e)),
            Err(_) => Err(unavailable(
                "settling a delivery",
                format!("no confirmation within {:?}", self.config.request_timeout),
            )),
        }
    }

    /// How many messages a consumer has delivered and not had acknowledged (`None` when the
    /// server does not say).
    pub(super) async fn pending(&self, consumer: &str) -> Option<usize> {
        match self.stream.consumer_info(consumer).await {
            Ok(info) => Some(info.num_ack_pending),
            Err(e) => {
                tracing::warn!(error = %e, consumer, "could not read a consumer's pending count");
                None
            }
        }
    }

    /// The group for (name, topic), opened on first use; refuses a visibility other than the
    /// group's.
    async fn group(
        self: &Arc<Self>,
        name: &str,
        topic: &str,
        visibility: Duration,
    ) -> Result<Arc<Group>, TransportError> {
        if *self.closing.borrow() {
            return Err(refused("this NATS transport was closed".into()));
        }
        let key = (name.to_owned(), topic.to_owned());
        let mut groups = self.groups.lock().await;
        if let Some(group) = groups.get(&key) {
            if !group.is_stopped() {
                group.check_visibility(visibility)?;
                return Ok(Arc::clone(group));
            }
        }
        let group = Group::open(self, name, topic, visibility).await?;
        groups.insert(key, Arc::clone(&group));
        Ok(group)
    }

    /// Forgets a group (it stopped); the next fetch opens it again.
    pub(super) async fn forget_group(&self, group: &Arc<Group>) {
        let mut groups = self.groups.lock().await;
        let key = (group.name.clone(), group.topic.clone());
        if groups.get(&key).is_some_and(|g| Arc::ptr_eq(g, group)) {
            groups.remove(&key);
        }
    }

    /// Lets go of everything: every group's lanes released, presence withdrawn.
    async fn close(self: &Arc<Self>) {
        self.closing.send_replace(true);
        let groups: Vec<Arc<Group>> = self.groups.lock().await.drain().map(|(_, g)| g).collect();
        let deadline = Instant::now() + self.config.request_timeout;
        join_all(groups.iter().map(|g| g.shutdown(self, deadline))).await;
        if let Err(e) = self.client.flush().await {
            tracing::debug!(error = %e, "could not flush the connection at close");
        }
    }

    fn prune_leases(&self) {
        let now = Instant::now();
        lock(&self.leases).retain(|_, lease| lease.until + LEASE_GRACE > now);
    }
}

/// Closes the transport when its last clone is dropped (on the runtime it is dropped in; see
/// [`NatsTransport::close`]).
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if *self.shared.closing.borrow() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let shared = Arc::clone(&self.shared);
            runtime.spawn(async move { shared.close().await });
        } else {
            self.shared.closing.send_replace(true);
        }
    }
}

/// The NATS JetStream transport (feature `nats`). Cheap to clone: clones share one connection.
/// See the [module docs](super) for the layout on the server.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Handle>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let config = &self.inner.shared.config;
        f.debug_struct("NatsTransport")
            .field("url", &config.url)
            .field("stream", &config.stream)
            .field("subject_prefix", &config.subject_prefix)
            .field("partitions", &config.partitions)
            .field("member", &self.inner.shared.member)
            .finish_non_exhaustive()
    }
}

impl NatsTransport {
    /// Connects, then creates the message stream and the holds stream (or checks existing
    /// ones: their layout must match, and their settings — duplicate window, age limit, hold
    /// TTL — must be this configuration's, or the connection is refused naming both values;
    /// see [`NatsTransport::update_stream_settings`]).
    pub async fn connect(config: NatsConfig) -> Result<NatsTransport, NatsError> {
        config.validate()?;
        let (client, js) = connect_client(&config).await?;
        let stream = ensure_stream(&js, &config, Check::Refuse).await?;
        let holds = ensure_holds_stream(&js, &config, Check::Refuse).await?;
        let (closing, _) = tokio::sync::watch::channel(false);
        Ok(NatsTransport {
            inner: Arc::new(Handle {
                shared: Arc::new(Shared {
                    config,
                    client,
                    js,
                    stream,
                    holds,
                    member: names::member_id(),
                    groups: tokio::sync::Mutex::new(HashMap::new()),
                    leases: Mutex::new(HashMap::new()),
                    counters: Counters::default(),
                    closing,
                }),
            }),
        })
    }

    /// Sets the streams' settings on the server to this configuration's (the message stream's
    /// duplicate window and age limit, the holds stream's hold TTL), creating the streams if
    /// they do not exist, then disconnects. This is how those settings change: every process
    /// of a stream uses the same, and a transport connecting with others is refused. Processes
    /// already connected keep working; restart them with the new configuration.
    pub async fn update_stream_settings(config: NatsConfig) -> Result<(), NatsError> {
        config.validate()?;
        let (client, js) = connect_client(&config).await?;
        ensure_stream(&js, &config, Check::Update).await?;
        ensure_holds_stream(&js, &config, Check::Update).await?;
        if let Err(e) = client.flush().await {
            tracing::debug!(error = %e, "could not flush after updating the streams");
        }
        Ok(())
    }

    /// The consumer settings of a group on a topic as the server has them, `None` when the group
    /// has never fetched from the topic.
    pub async fn consumer_settings(
        &self,
        consumer: &str,
        topic: &str,
    ) -> Result<Option<ConsumerSettings>, TransportError> {
        let shared = &self.inner.shared;
        let keyed = names::consumer_name(consumer, topic, "p0");
        let unkeyed = names::consumer_name(consumer, topic, "u");
        let (k, u) = tokio::join!(
            shared.stream.consumer_info(&keyed),
            shared.stream.consumer_info(&unkeyed)
        );
        match (k, u) {
            (Ok(k), Ok(u)) => Ok(Some(ConsumerSettings::new(
                k.config.ack_wait,
                u32::try_from(k.config.max_ack_pending).unwrap_or(0),
                u32::try_from(u.config.max_ack_pending).unwrap_or(0),
            ))),
            (Err(e), _) | (_, Err(e))
                if matches!(
                    e.kind(),
                    jetstream::context::ConsumerInfoErrorKind::NotFound
                ) =>
            {
                Ok(None)
            }
            (Err(e), _) | (_, Err(e)) => Err(unavailable("reading a group's consumers", e)),
        }
    }

    /// Sets the consumer settings of a group on a topic (creating its consumers if needed).
    /// This is how a group's visibility (ack wait) and in-flight limits change: every process
    /// of a group uses the same, and a fetch asking for another visibility, or a transport
    /// configured with other limits, is refused naming both values. Processes with the old
    /// values are refused from their next fetch (within a third of the hold TTL) until they use
    /// the new ones.
    pub async fn set_consumer_settings(
        &self,
        consumer: &str,
        topic: &str,
        settings: ConsumerSettings,
    ) -> Result<(), TransportError> {
        let shared = &self.inner.shared;
        if settings.partition_in_flight == 0 || settings.unordered_in_flight == 0 {
            return Err(refused("in-flight limits must be at least 1".into()));
        }
        let settings = ConsumerSettings::new(
            super::consumers::ack_wait_for(settings.ack_wait),
            settings.partition_in_flight,
            settings.unordered_in_flight,
        );
        ensure_consumers(shared, consumer, topic, settings, true).await?;
        if let Some(group) = shared
            .groups
            .lock()
            .await
            .get(&(consumer.to_owned(), topic.to_owned()))
        {
            group.set_settings(settings);
        }
        Ok(())
    }

    /// Stops as a crashed process would: background work ends, nothing is released or given
    /// back (holds run out, pending messages wait for their ack wait). Testing only.
    #[doc(hidden)]
    pub async fn abandon(&self) {
        let shared = &self.inner.shared;
        shared.closing.send_replace(true);
        let groups: Vec<Arc<Group>> = shared.groups.lock().await.drain().map(|(_, g)| g).collect();
        for group in groups {
            group.abandon();
        }
        lock(&shared.leases).clear();
    }

    /// The name of the stream that keeps the lane holds and group members (`<stream>_HOLDS`;
    /// see the module docs).
    pub fn holds_stream_name(&self) -> String {
        names::holds_stream(&self.inner.shared.config.stream)
    }

    /// The subject of the hold of one partition of `topic` for the group `consumer` on the holds
    /// stream (see the module docs).
    pub fn hold_subject(&self, consumer: &str, topic: &str, partition: u16) -> String {
        names::hold_subject(
            &self.inner.shared.config.subject_prefix,
            consumer,
            topic,
            &format!("p{partition}"),
        )
    }

    /// The partitions of `topic` this transport holds for the group `consumer` (see the module
    /// docs), in order.
    pub async fn held_partitions(&self, consumer: &str, topic: &str) -> Vec<u16> {
        let groups = self.inner.shared.groups.lock().await;
        let Some(group) = groups.get(&(consumer.to_owned(), topic.to_owned())) else {
            return Vec::new();
        };
        let mut held: Vec<u16> = group
            .held_lanes()
            .iter()
            .filter_map(|lane| lane.strip_prefix('p')?.parse().ok())
            .collect();
        held.sort_unstable();
        held
    }

    /// Lets go of everything this transport holds and stops its background work: the
    /// partitions it holds are released (what it read ahead is given back in order, and what it
    /// handed out is waited for up to [`NatsConfig::request_timeout`]; a partition with
    /// deliveries still out after that is released with a note telling the next holder to wait
    /// the ack wait), and it withdraws from its groups. Another process takes the partitions
    /// over at once. Dropping the last clone does the same in the background on the runtime
    /// it is dropped in; call this to know it is done (before the process exits). Fetching
    /// after it is refused; publishing still works.
    pub async fn close(&self) {
        self.inner.shared.close().await;
    }

    /// The settings it connected with.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.shared.config
    }

    /// The connection (for what this transport does not do itself).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.shared.client
    }

    /// The JetStream context (for inspection and administration).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.shared.js
    }

    /// What the transport has done so far.
    pub fn stats(&self) -> NatsStats {
        let c = &self.inner.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NatsStats {
            published: get(&c.published),
            duplicates: get(&c.duplicates),
            publish_failures: get(&c.publish_failures),
            fetched: get(&c.fetched),
            acked: get(&c.acked),
            nacked: get(&c.nacked),
            dead_lettered: get(&c.dead_lettered),
            pull_requests: get(&c.pull_requests),
            heartbeats: get(&c.heartbeats),
            holds_acquired: get(&c.holds_acquired),
            holds_released: get(&c.holds_released),
            holds_lost: get(&c.holds_lost),
            takeovers_waited: get(&c.takeovers_waited),
        }
    }

    /// The partition of a partition key (see the module docs).
    pub fn partition_of(&self, partition_key: &str) -> u16 {
        names::partition_of(partition_key, self.inner.shared.config.partitions)
    }

    /// The subject a message of `topic` with this partition key is published on.
    pub fn subject_for(&self, topic: &str, partition_key: Option<&str>) -> String {
        let prefix = &self.inner.shared.config.subject_prefix;
        let topic = names::subject_token(topic);
        match partition_key {
            Some(key) => format!("{prefix}.msg.{topic}.p{}", self.partition_of(key)),
            None => format!("{prefix}.msg.{topic}.u"),
        }
    }

    /// The subject dead letters of `consumer` on `topic` are published on.
    pub fn dead_letter_subject(&self, consumer: &str, topic: &str) -> String {
        format!(
            "{}.dead.{}.{}",
            self.inner.shared.config.subject_prefix,
            names::subject_token(consumer),
            names::subject_token(topic)
        )
    }

    /// The names of the durable consumers a group uses for a topic: `p0..p<n-1>`, then `u`.
    pub fn consumer_names(&self, consumer: &str, topic: &str) -> Vec<String> {
        lane_ids(self.inner.shared.config.partitions)
            .map(|lane| names::consumer_name(consumer, topic, &lane))
            .collect()
    }

    /// The dead letters of `consumer`, oldest first.
    pub async fn dead_letters(
        &self,
        consumer: &str,
    ) -> Result<Vec<NatsDeadLetter>, TransportError> {
        let inner = &self.inner.shared;
        let filter = format!(
            "{}.dead.{}.>",
            inner.config.subject_prefix,
            names::subject_token(consumer)
        );
        let reader: PullConsumer = inner
            .js
            .create_consumer_on_stream(
                pull::Config {
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::None,
                    filter_subject: filter,
                    inactive_threshold: Duration::from_secs(30),
                    ..pull::Config::default()
                },
                inner.config.stream.as_str(),
            )
            .await
            .map_err(|e| unavailable("creating a dead-letter reader", e))?;
        let total = usize::try_from(reader.cached_info().num_pending).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(total.min(4096));
        // Bounded: each round reads at least one message or stops.
        while out.len() < total {
            let mut batch = reader
                .fetch()
                .max_messages((total - out.len()).min(512))
                .expires(inner.config.request_timeout)
                .messages()
                .await
                .map_err(|e| unavailable("reading dead letters", e))?;
            let before = out.len();
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| unavailable("reading dead letters", e))?;
                out.push(dead_letter_of(&message));
            }
            if out.len() == before {
                break;
            }
        }
        let name = reader.cached_info().name.clone();
        if let Err(e) = inner
            .js
            .delete_consumer_from_stream(&name, inner.config.stream.as_str())
            .await
        {
            tracing::debug!(error = %e, "could not delete the dead-letter reader (it expires)");
        }
        Ok(out)
    }

    fn outgoing_headers(&self, m: &OutgoingMessage) -> Result<HeaderMap, TransportError> {
        let mut headers = HeaderMap::new();
        for (name, value) in &m.headers {
            if !names::valid_header_name(name) {
                return Err(refused(format!(
                    "message {}: header name {name:?} cannot be carried by NATS (use printable \
                     ASCII without `:` or spaces)",
                    m.id
                )));
            }
            if reserved_header(name) {
                return Err(refused(format!(
                    "message {}: header name {name:?} is reserved (NATS's `Nats-*` headers, \
                     `{HEADER_PARTITION_KEY}` and `{DEAD_PREFIX}*`)",
                    m.id
                )));
            }
            headers.insert(name.as_str(), names::encode_value(value));
        }
        headers.insert(MSG_ID, names::encode_value(&m.id));
        if let Some(key) = &m.partition_key {
            headers.insert(HEADER_PARTITION_KEY, names::encode_value(key));
        }
        Ok(headers)
    }

    fn lease(&self, d: &Delivery) -> Result<Lease, TransportError> {
        lock(&self.inner.shared.leases)
            .get(&LeaseKey::of(d))
            .cloned()
            .ok_or_else(|| {
                refused(format!(
                    "{} #{} (delivery {}) of consumer {:?} is not leased through this connection: \
                     it was settled already, fetched elsewhere, or its lease ran out long ago",
                    d.topic, d.sequence, d.deliveries, d.consumer
                ))
            })
    }

    /// Sends an acknowledgement of some kind and waits for the server's confirmation; then the
    /// delivery is no longer leased. `given_back`: a keyed delivery given back with no delay,
    /// which its key's later messages wait for.
    async fn settle(
        &self,
        d: &Delivery,
        kind: AckKind,
        given_back: bool,
    ) -> Result<(), TransportError> {
        let lease = self.lease(d)?;
        let shared = &self.inner.shared;
        let place = (lease.lane, lease.epoch);
        let gone = matches!(kind, AckKind::Ack | AckKind::Term);
        if given_back {
            lease.group.expect_back(
                place,
                d.sequence,
                lease.partition_key.clone(),
                lease.reply.clone(),
            );
        }
        if let Err(e) = shared.confirm(lease.reply.clone(), kind).await {
            if given_back {
                lease.group.not_back(place, d.sequence);
            }
            return Err(e);
        }
        lock(&shared.leases).remove(&LeaseKey::of(d));
        lease
            .group
            .settled(lease.lane, lease.epoch, d.sequence, gone);
        Ok(())
    }

    /// Leases a message taken from a lane, or dead-letters it past `max_deliver`.
    async fn admit(
        &self,
        request: &FetchRequest,
        group: &Arc<Group>,
        taken: Taken,
    ) -> Option<Delivery> {
        let shared = &self.inner.shared;
        let Taken {
            lane,
            epoch,
            message,
            until,
        } = taken;
        let delivery = Delivery {
            consumer: request.consumer.clone(),
            topic: request.topic.clone(),
            sequence: message.sequence,
            message_id: message.message_id,
            partition_key: message.partition_key.clone(),
            headers: message.headers,
            payload: message.payload.to_vec(),
            deliveries: message.deliveries,
        };
        lock(&shared.leases).insert(
            LeaseKey::of(&delivery),
            Lease {
                reply: message.reply,
                group: Arc::clone(group),
                lane,
                epoch,
                partition_key: message.partition_key,
                until,
            },
        );
        if let Some(why) = message.unreadable {
            let reason = format!("message #{} cannot be read: {why}", delivery.sequence);
            if let Err(e) = self.dead_letter_now(&delivery, &reason).await {
                tracing::error!(error = %e, sequence = delivery.sequence, "could not dead-letter an unreadable message: it comes back");
            }
            return None;
        }
        if let Some(max) = shared.config.max_deliver {
            if delivery.deliveries > max {
                let reason = format!(
                    "delivered {} times without being acknowledged (max_deliver {max})",
                    delivery.deliveries
                );
                if let Err(e) = self.dead_letter_now(&delivery, &reason).await {
                    tracing::error!(error = %e, sequence = delivery.sequence, "could not dead-letter past max_deliver: it comes back");
                }
                return None;
            }
        }
        bump(&shared.counters.fetched);
        Some(delivery)
    }

    async fn dead_letter_now(&self, d: &Delivery, reason: &str) -> Result<(), TransportError> {
        let inner = &self.inner.shared;
        let mut headers = HeaderMap::new();
        for (name, value) in &d.headers {
            if names::valid_header_name(name) && !reserved_header(name) {
                headers.insert(name.as_str(), names::encode_value(value));
            }
        }
        if let Some(key) = &d.partition_key {
            headers.insert(HEADER_PARTITION_KEY, names::encode_value(key));
        }
        headers.insert(HEADER_DEAD_LETTER_REASON, names::encode_value(reason));
        headers.insert(
            HEADER_DEAD_LETTER_CONSUMER,
            names::encode_value(&d.consumer),
        );
        headers.insert(HEADER_DEAD_LETTER_TOPIC, names::encode_value(&d.topic));
        headers.insert(HEADER_DEAD_LETTER_SEQUENCE, d.sequence.to_string());
        headers.insert(HEADER_DEAD_LETTER_DELIVERIES, d.deliveries.to_string());
        headers.insert(
            HEADER_DEAD_LETTER_MESSAGE_ID,
            names::encode_value(&d.message_id),
        );
        // One dead letter per (consumer, topic, message), however often this is retried.
        headers.insert(
            MSG_ID,
            format!(
                "dead.{}.{}.{}",
                names::subject_token(&d.consumer),
                names::subject_token(&d.topic),
                d.sequence
            ),
        );
        // A dead letter over the server's maximum would be refused, and the message would come
        // back for ever: without its payload it fits.
        let payload = if fits(
            &headers,
            d.payload.len(),
            inner.client.server_info().max_payload,
        ) {
            Bytes::from(d.payload.clone())
        } else {
            headers.insert(
                HEADER_DEAD_LETTER_PAYLOAD_OMITTED,
                d.payload.len().to_string(),
            );
            Bytes::new()
        };
        let subject = self.dead_letter_subject(&d.consumer, &d.topic);
        let published = async {
            inner
                .js
                .publish_with_headers(subject, headers, payload)
                .await?
                .await
        };
        published
            .await
            .map_err(|e| unavailable("publishing a dead letter", e))?;
        self.settle(d, AckKind::Term, false).await?;
        bump(&inner.counters.dead_lettered);
        Ok(())
    }
}

/// Whether a message with these headers and a payload of `payload` bytes fits in
/// `max_payload`, which counts the header block as NATS writes it (`NATS/1.0`, a `name: value`
/// line each, an empty line; each line ends with CR LF) and the payload.
fn fits(headers: &HeaderMap, payload: usize, max_payload: usize) -> bool {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    max_payload == 0 || 10 + lines + 2 + payload <= max_payload
}

fn reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("nats-") || lower == HEADER_PARTITION_KEY || lower.starts_with(DEAD_PREFIX)
}

/// The message id, the partition key and the application's headers of a received message, and
/// why they cannot be read if one of the transport's own (the id, the partition key) does not
/// decode to text: such a message is dead-lettered, not handed out under a guessed id or key.
pub(super) fn read_headers(
    headers: Option<&HeaderMap>,
    stream: &str,
    sequence: u64,
) -> (
    String,
    Option<String>,
    BTreeMap<String, String>,
    Option<String>,
) {
    let mut message_id = None;
    let mut partition_key = None;
    let mut unreadable = None;
    let mut out = BTreeMap::new();
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            let Some(value) = values.last() else { continue };
            let own = name.eq_ignore_ascii_case(MSG_ID)
                || name.eq_ignore_ascii_case(HEADER_PARTITION_KEY);
            let value = match names::try_decode_value(value.as_str()) {
                Ok(value) => value,
                Err(bytes) => {
                    if own && unreadable.is_none() {
                        unreadable = Some(format!(
                            "its header `{name}` ({:?}) decodes to bytes that are not UTF-8 \
                             (escapes `%XX` are UTF-8 bytes)",
                            value.as_str()
                        ));
                    }
                    String::from_utf8_lossy(&bytes).into_owned()
                }
            };
            if name.eq_ignore_ascii_case(MSG_ID) {
                message_id = Some(value);
            } else if name.eq_ignore_ascii_case(HEADER_PARTITION_KEY) {
                partition_key = Some(value);
            } else if !reserved_header(name) {
                out.insert(name.to_owned(), value);
            }
        }
    }
    let message_id = message_id.unwrap_or_else(|| format!("{stream}:{sequence}"));
    (message_id, partition_key, out, unreadable)
}

fn dead_letter_of(message: &jetstream::Message) -> NatsDeadLetter {
    let own_sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
    let mut reason = String::new();
    let mut consumer = String::new();
    let mut topic = String::new();
    let mut sequence = 0;
    let mut deliveries = 0;
    let mut message_id = String::new();
    let mut partition_key = None;
    let mut headers = BTreeMap::new();
    if let Some(map) = message.message.headers.as_ref() {
        for (name, values) in map.iter() {
            let name: &str = name.as_ref();
            let Some(value) = values.last() else { continue };
            let value = names::decode_value(value.as_str());
            match name {
                HEADER_DEAD_LETTER_REASON => reason = value,
                HEADER_DEAD_LETTER_CONSUMER => consumer = value,
                HEADER_DEAD_LETTER_TOPIC => topic = value,
                HEADER_DEAD_LETTER_SEQUENCE => sequence = value.parse().unwrap_or(0),
                HEADER_DEAD_LETTER_DELIVERIES => deliveries = value.parse().unwrap_or(0),
                HEADER_DEAD_LETTER_MESSAGE_ID => message_id = value,
                HEADER_PARTITION_KEY => partition_key = Some(value),
                HEADER_DEAD_LETTER_PAYLOAD_OMITTED => {
                    headers.insert(name.to_owned(), value);
                }
                other if !reserved_header(other) => {
                    headers.insert(other.to_owned(), value);
                }
                _ => {}
            }
        }
    }
    NatsDeadLetter {
        consumer,
        topic,
        sequence,
        message_id,
        partition_key,
        headers,
        payload: message.message.payload.to_vec(),
        reason,
        deliveries,
        dead_letter_sequence: own_sequence,
    }
}

impl Transport for NatsTransport {
    fn publish(
        &self,
        message: OutgoingMessage,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let this = self.clone();
        let span =
            tracing::debug_span!("effects.nats.publish", id = %message.id, topic = %message.topic);
        async move {
            let inner = &this.inner.shared;
            let headers = this.outgoing_headers(&message)?;
            let subject = this.subject_for(&message.topic, message.partition_key.as_deref());
            let sent = async {
                inner
                    .js
                    .publish_with_headers(subject, headers, Bytes::from(message.payload))
                    .await?
                    .await
            };
            match sent.await {
                Ok(ack) => {
                    if ack.duplicate {
                        bump(&inner.counters.duplicates);
                        tracing::debug!(
                            sequence = ack.sequence,
                            "duplicate absorbed by the stream"
                        );
                    } else {
                        bump(&inner.counters.published);
                    }
                    Ok(())
                }
                Err(e) => {
                    bump(&inner.counters.publish_failures);
                    use jetstream::context::PublishErrorKind as K;
                    match e.kind() {
                        K::TimedOut | K::BrokenPipe | K::StreamNotFound | K::MaxAckPending => {
                            Err(unavailable("publishing", e))
                        }
                        _ => Err(refused(format!("publishing {}: {e}", message.id))),
                    }
                }
            }
        }
        .instrument(span)
    }

    fn fetch(
        &self,
        request: FetchRequest,
    ) -> impl Future<Output = Result<Vec<Delivery>, TransportError>> + Send {
        let this = self.clone();
        async move {
            if request.max == 0 {
                return Ok(Vec::new());
            }
            let shared = &this.inner.shared;
            shared.prune_leases();
            let deadline = Instant::now() + request.wait;
            let group = shared
                .group(&request.consumer, &request.topic, request.visibility)
                .await?;
            let _fetching = group.fetching(request.max, deadline);
            let mut out = Vec::new();
            // Bounded: every round returns or waits toward the deadline.
            loop {
                let notified = group.ready.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                for taken in group.take(shared, request.max - out.len()) {
                    if let Some(d) = this.admit(&request, &group, taken).await {
                        out.push(d);
                    }
                }
                if !out.is_empty() || Instant::now() >= deadline || group.is_stopped() {
                    return Ok(out);
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(deadline) => {}
                }
            }
        }
    }

    fn ack(&self, delivery: &Delivery) -> impl Future<Output = Result<(), TransportError>> + Send {
        let this = self.clone();
        let d = delivery.clone();
        async move {
            this.settle(&d, AckKind::Ack, false).await?;
            bump(&this.inner.shared.counters.acked);
            Ok(())
        }
    }

    fn ack_many(
        &self,
        deliveries: &[Delivery],
    ) -> impl Future<Output = Vec<Result<(), TransportError>>> + Send {
        // Each acknowledgement is a confirmed request; all are sent before the first answer is
        // awaited, so the batch takes one round trip.
        let acks: Vec<_> = deliveries.iter().map(|d| self.ack(d)).collect();
        join_all(acks)
    }

    fn extend(
        &self,
        delivery: &Delivery,
        visibility: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let this = self.clone();
        let d = delivery.clone();
        async move {
            let lease = this.lease(&d)?;
            let shared = &this.inner.shared;
            lease.group.check_visibility(visibility)?;
            let now = Instant::now();
            if lease.until <= now {
                return Err(refused(format!(
                    "{} #{} (delivery {}) of consumer {:?}: its visibility passed {:?} ago, and \
                     the server may already be delivering it again",
                    d.topic,
                    d.sequence,
                    d.deliveries,
                    d.consumer,
                    now - lease.until
                )));
            }
            lease
                .group
                .still_leased(shared, lease.lane, lease.epoch, d.sequence, d.deliveries)
                .map_err(|why| {
                    refused(format!(
                        "{} #{} (delivery {}) of consumer {:?}: {why}",
                        d.topic, d.sequence, d.deliveries, d.consumer
                    ))
                })?;
            let sent = Instant::now();
            shared
                .confirm(lease.reply.clone(), AckKind::Progress)
                .await?;
            bump(&shared.counters.heartbeats);
            let until = sent + lease.group.settings().ack_wait;
            if let Some(l) = lock(&shared.leases).get_mut(&LeaseKey::of(&d)) {
                l.until = until;
            }
            lease
                .group
                .extended((lease.lane, lease.epoch), d.sequence, until);
            Ok(())
        }
    }

    fn nack(
        &self,
        delivery: &Delivery,
        delay: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let this = self.clone();
        let d = delivery.clone();
        async move {
            let shared = &this.inner.shared;
            if delay.is_zero() {
                let lease = this.lease(&d)?;
                if lease.group.give_back_while_draining(
                    (lease.lane, lease.epoch),
                    lease.reply.clone(),
                    &d,
                ) {
                    lock(&shared.leases).remove(&LeaseKey::of(&d));
                } else {
                    this.settle(&d, AckKind::Nak(None), true).await?;
                }
            } else {
                let lease = this.lease(&d)?;
                // A keyed delivery of a lane held here waits out its delay here, heartbeated,
                // so its key's later messages wait for it whatever happens (see the module
                // docs); anything else is given back to the server with the delay.
                let kept = lease.group.give_back_later(
                    shared,
                    (lease.lane, lease.epoch),
                    d.sequence,
                    lease.partition_key.clone(),
                    lease.reply.clone(),
                    delay,
                );
                if kept {
                    lock(&shared.leases).remove(&LeaseKey::of(&d));
                } else {
                    this.settle(&d, AckKind::Nak(Some(delay)), false).await?;
                }
            }
            bump(&shared.counters.nacked);
            Ok(())
        }
    }

    fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        let this = self.clone();
        let d = delivery.clone();
        let reason = reason.to_owned();
        async move {
            this.lease(&d)?;
            this.dead_letter_now(&d, &reason).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_headers() {
        assert!(reserved_header("Nats-Msg-Id"));
        assert!(reserved_header("nats-expected-stream"));
        assert!(reserved_header("effects-partition-key"));
        assert!(reserved_header("effects-dead-letter-reason"));
        assert!(!reserved_header("effects-key"));
        assert!(!reserved_header("content-type"));
    }

    #[test]
    fn headers_read_back_without_the_transport_s_own() {
        let mut map = HeaderMap::new();
        map.insert(MSG_ID, names::encode_value("k#0"));
        map.insert(HEADER_PARTITION_KEY, names::encode_value(" card 1\n"));
        map.insert("effects-key", "k");
        let (id, key, headers, unreadable) = read_headers(Some(&map), "S", 7);
        assert_eq!(id, "k#0");
        assert_eq!(key.as_deref(), Some(" card 1\n"));
        assert_eq!(headers.len(), 1);
        assert_eq!(unreadable, None);
        assert_eq!(read_headers(None, "S", 7).0, "S:7");
    }

    #[test]
    fn a_partition_key_that_does_not_decode_is_unreadable() {
        let mut map = HeaderMap::new();
        map.insert(MSG_ID, "m1");
        map.insert(HEADER_PARTITION_KEY, "%FF%FE");
        map.insert("x-other", "%FF");
        let (id, _, headers, unreadable) = read_headers(Some(&map), "S", 7);
        assert_eq!(id, "m1");
        assert_eq!(headers["x-other"], "\u{fffd}");
        let why = unreadable.expect("unreadable");
        assert!(why.contains("`effects-partition-key`"), "{why}");
        assert!(why.contains("not UTF-8"), "{why}");
    }

    #[test]
    fn fitting_counts_the_header_block() {
        let mut map = HeaderMap::new();
        map.insert("ab", "cd");
        // `NATS/1.0\r\n` + `ab: cd\r\n` + `\r\n` = 20 bytes.
        assert!(fits(&map, 80, 100));
        assert!(!fits(&map, 81, 100));
    }
}
