//! [`NatsTransport`]: the [`Transport`] operations on JetStream.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, ReplayPolicy, pull};
use async_nats::jetstream::{self, AckKind, stream};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::join_all;
use tokio::time::Instant;
use tracing::Instrument;

use super::config::{Auth, NatsConfig, Storage};
use super::error::NatsError;
use super::names;
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

const MSG_ID: &str = "Nats-Msg-Id";
const DEAD_PREFIX: &str = "effects-dead-letter-";
const LEASE_GRACE: Duration = Duration::from_secs(60);
/// How long after a pull request's expiry its messages may still be on their way.
const PULL_MARGIN: Duration = Duration::from_millis(500);

/// What the transport has done since it connected (counted at the source: each counter moves
/// when the server answered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    duplicates: AtomicU64,
    publish_failures: AtomicU64,
    fetched: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    dead_lettered: AtomicU64,
    pull_requests: AtomicU64,
}

fn bump(counter: &AtomicU64) {
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
    /// The original payload.
    pub payload: Vec<u8>,
    /// Why.
    pub reason: String,
    /// How many times it had been delivered.
    pub deliveries: u32,
    /// The dead letter's own stream sequence.
    pub dead_letter_sequence: u64,
}

/// One pull consumer of a group on a topic: a partition (`p<i>`, one message in flight) or the
/// lane of messages without a key (`u`).
struct Lane {
    name: String,
    keyed: bool,
    consumer: PullConsumer,
    /// Until when this process holds this partition's one message (no use asking for another).
    busy_until: Mutex<Option<Instant>>,
}

impl Lane {
    fn busy(&self, now: Instant) -> bool {
        lock(&self.busy_until).is_some_and(|until| until > now)
    }

    fn set_busy(&self, until: Option<Instant>) {
        if self.keyed {
            *lock(&self.busy_until) = until;
        }
    }
}

/// The lanes of one (group, topic).
struct Lanes {
    lanes: Vec<Lane>,
    ack_wait: Mutex<Duration>,
    rotation: AtomicUsize,
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

#[derive(Clone)]
struct Lease {
    reply: Subject,
    lanes: Arc<Lanes>,
    lane: usize,
    until: Instant,
}

struct Inner {
    config: NatsConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    lanes: tokio::sync::Mutex<HashMap<(String, String), Arc<Lanes>>>,
    leases: Mutex<HashMap<LeaseKey, Lease>>,
    counters: Counters,
    /// Wakes waiting fetches: a publish or a settled delivery (which frees a partition).
    wake: tokio::sync::Notify,
}

/// The NATS JetStream transport (feature `nats`). Cheap to clone: clones share one connection.
/// See the [module docs](super) for the layout on the server.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("url", &self.inner.config.url)
            .field("stream", &self.inner.config.stream)
            .field("subject_prefix", &self.inner.config.subject_prefix)
            .field("partitions", &self.inner.config.partitions)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these mutexes stays consistent when a holder panics (plain inserts and
    // removals), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Unavailable {
        reason: format!("{what}: {e}"),
    }
}

fn refused(reason: String) -> TransportError {
    TransportError::Refused { reason }
}

fn description(config: &NatsConfig) -> String {
    format!(
        "effects transport: messages on {p}.msg.<topic>.<p0..p{last}|u>, dead letters on \
         {p}.dead.<consumer>.<topic>; partitions={n}",
        p = config.subject_prefix,
        last = config.partitions.saturating_sub(1),
        n = config.partitions
    )
}

fn recorded_partitions(description: Option<&str>) -> Option<u16> {
    let text = description?;
    let at = text.find("partitions=")? + "partitions=".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The consumers' ack wait for a fetch's visibility (NATS reads zero as "the default", 30 s).
fn ack_wait_for(visibility: Duration) -> Duration {
    visibility.max(Duration::from_millis(10))
}

impl NatsTransport {
    /// Connects, then creates the stream (or checks and updates an existing one: its subjects,
    /// partition count and retention must match; its duplicate window and age limit are set to
    /// the configured ones).
    pub async fn connect(config: NatsConfig) -> Result<NatsTransport, NatsError> {
        config.validate()?;
        let url = config.url.clone();
        let connect_error = |reason: String| NatsError::Connect {
            url: url.clone(),
            reason,
        };
        let reconnect = config.reconnect;
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.request_timeout))
            .reconnect_delay_callback(move |attempt| reconnect.delay(attempt))
            .event_callback(|event| async move {
                tracing::info!(%event, "NATS connection event");
            });
        options = match reconnect.max_attempts {
            // async-nats reads 0 as "forever": at least one attempt.
            Some(n) => options.max_reconnects(n.max(1)),
            None => options.max_reconnects(None),
        };
        if let Some(name) = &config.connection_name {
            options = options.name(name);
        }
        match &config.auth {
            Some(Auth::Token(token)) => options = options.token(token.clone()),
            Some(Auth::UserPassword { user, password }) => {
                options = options.user_and_password(user.clone(), password.clone());
            }
            None => {}
        }
        if let Some(tls) = &config.tls {
            options = options.require_tls(tls.required);
            if let Some(roots) = &tls.root_certificates {
                options = options.add_root_certificates(roots.clone());
            }
            if let Some((cert, key)) = &tls.client_certificate {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
        let servers: Vec<String> = config
            .url
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let client = options
            .connect(servers)
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .ack_timeout(config.request_timeout)
            .build(client.clone());
        ensure_stream(&js, &config).await?;
        Ok(NatsTransport {
            inner: Arc::new(Inner {
                config,
                client,
                js,
                lanes: tokio::sync::Mutex::new(HashMap::new()),
                leases: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                wake: tokio::sync::Notify::new(),
            }),
        })
    }

    /// The settings it connected with.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// The connection (for what this transport does not do itself).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The JetStream context (for inspection and administration).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// What the transport has done so far.
    pub fn stats(&self) -> NatsStats {
        let c = &self.inner.counters;
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
        }
    }

    /// The partition of a partition key (see the module docs).
    pub fn partition_of(&self, partition_key: &str) -> u16 {
        names::partition_of(partition_key, self.inner.config.partitions)
    }

    /// The subject a message of `topic` with this partition key is published on.
    pub fn subject_for(&self, topic: &str, partition_key: Option<&str>) -> String {
        let prefix = &self.inner.config.subject_prefix;
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
            self.inner.config.subject_prefix,
            names::subject_token(consumer),
            names::subject_token(topic)
        )
    }

    /// The names of the durable consumers a group uses for a topic: `p0..p<n-1>`, then `u`.
    pub fn consumer_names(&self, consumer: &str, topic: &str) -> Vec<String> {
        lane_ids(self.inner.config.partitions)
            .map(|lane| names::consumer_name(consumer, topic, &lane))
            .collect()
    }

    /// The dead letters of `consumer`, oldest first.
    pub async fn dead_letters(
        &self,
        consumer: &str,
    ) -> Result<Vec<NatsDeadLetter>, TransportError> {
        let inner = &self.inner;
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

    /// The lanes of (group, topic), creating their consumers on first use and updating their
    /// ack wait when the visibility asked for changed.
    async fn lanes(
        &self,
        group: &str,
        topic: &str,
        visibility: Duration,
    ) -> Result<Arc<Lanes>, TransportError> {
        let ack_wait = ack_wait_for(visibility);
        let key = (group.to_owned(), topic.to_owned());
        let mut cache = self.inner.lanes.lock().await;
        if let Some(lanes) = cache.get(&key) {
            if *lock(&lanes.ack_wait) == ack_wait {
                return Ok(Arc::clone(lanes));
            }
        }
        let consumers = self.create_lanes(group, topic, ack_wait).await?;
        let lanes = Arc::new(Lanes {
            lanes: consumers,
            ack_wait: Mutex::new(ack_wait),
            rotation: AtomicUsize::new(0),
        });
        cache.insert(key, Arc::clone(&lanes));
        Ok(lanes)
    }

    async fn create_lanes(
        &self,
        group: &str,
        topic: &str,
        ack_wait: Duration,
    ) -> Result<Vec<Lane>, TransportError> {
        let inner = &self.inner;
        let config = &inner.config;
        let token = names::subject_token(topic);
        let specs: Vec<(String, bool)> = lane_ids(config.partitions)
            .map(|lane| {
                let keyed = lane != "u";
                (lane, keyed)
            })
            .collect();
        let created = join_all(specs.iter().map(|(lane, keyed)| {
            let name = names::consumer_name(group, topic, lane);
            let consumer_config = pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!(
                    "effects: consumer {group:?} of topic {topic:?}, lane {lane}"
                )),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                filter_subject: format!("{}.msg.{token}.{lane}", config.subject_prefix),
                replay_policy: ReplayPolicy::Instant,
                max_ack_pending: if *keyed {
                    1
                } else {
                    i64::from(config.unordered_in_flight)
                },
                ..pull::Config::default()
            };
            async move {
                inner
                    .js
                    .create_consumer_on_stream(consumer_config, config.stream.as_str())
                    .await
                    .map(|consumer| (name, consumer))
            }
        }))
        .await;
        let mut lanes = Vec::with_capacity(created.len());
        for ((lane, keyed), result) in specs.into_iter().zip(created) {
            let (name, consumer) = result.map_err(|e| {
                unavailable(
                    &format!("creating the consumer of {group:?} on {topic:?}, lane {lane}"),
                    e,
                )
            })?;
            lanes.push(Lane {
                name,
                keyed,
                consumer,
                busy_until: Mutex::new(None),
            });
        }
        Ok(lanes)
    }

    /// One pull request on a lane: whatever is there now, holding the request at most
    /// `busy_partition_wait` (the server answers at once when the lane is empty). The request is
    /// read to its end, so no message is ever sent to an abandoned request.
    async fn pull(
        &self,
        lane: &Lane,
        batch: usize,
    ) -> Result<Vec<jetstream::Message>, TransportError> {
        let wait = self.inner.config.busy_partition_wait;
        let what = || format!("pulling from consumer {}", lane.name);
        bump(&self.inner.counters.pull_requests);
        let mut stream = tokio::time::timeout(
            self.inner.config.request_timeout,
            lane.consumer
                .fetch()
                .max_messages(batch)
                .expires(wait)
                .messages(),
        )
        .await
        .map_err(|_| unavailable(&what(), "the request could not be sent in time"))?
        .map_err(|e| unavailable(&what(), e))?;
        // The server delivers nothing to a request past its expiry. It normally closes the
        // request with a status at once; when that status does not come, the request is given
        // up shortly after its expiry, and whatever was delivered before is kept.
        let deadline = Instant::now() + wait + PULL_MARGIN;
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(m))) => got.push(m),
                Ok(None) => break,
                Ok(Some(Err(e))) if got.is_empty() => return Err(unavailable(&what(), e)),
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, consumer = %lane.name, "a pull request ended early");
                    break;
                }
                Err(_) => {
                    if got.is_empty()
                        && self.inner.client.connection_state()
                            != async_nats::connection::State::Connected
                    {
                        return Err(unavailable(&what(), "not connected to the server"));
                    }
                    tracing::debug!(consumer = %lane.name, "no end-of-request status: given up after the expiry");
                    break;
                }
            }
        }
        Ok(got)
    }

    /// One pass over the lanes, starting at a rotating lane, skipping partitions this process
    /// holds, asking each for no more than what is still wanted (so never more than `max`).
    async fn sweep(
        &self,
        lanes: &Arc<Lanes>,
        request: &FetchRequest,
    ) -> Result<Vec<Delivery>, TransportError> {
        let n = lanes.lanes.len();
        let start = lanes.rotation.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let now = Instant::now();
        let candidates: Vec<usize> = (0..n)
            .map(|i| (start + i) % n)
            .filter(|&i| !lanes.lanes[i].busy(now))
            .collect();
        let mut out = Vec::new();
        let mut error = None;
        let mut next = 0;
        while out.len() < request.max && next < candidates.len() {
            let mut budget = request.max - out.len();
            let mut chunk = Vec::new();
            while budget > 0 && next < candidates.len() {
                let index = candidates[next];
                next += 1;
                let batch = if lanes.lanes[index].keyed { 1 } else { budget };
                budget -= batch;
                chunk.push((index, batch));
            }
            let results = join_all(
                chunk
                    .iter()
                    .map(|&(index, batch)| self.pull(&lanes.lanes[index], batch)),
            )
            .await;
            for (&(index, _), result) in chunk.iter().zip(results) {
                match result {
                    Ok(messages) => {
                        for message in messages {
                            if let Some(d) = self.admit(request, lanes, index, message).await {
                                out.push(d);
                            }
                        }
                    }
                    Err(e) => {
                        error.get_or_insert(e);
                    }
                }
            }
        }
        match error {
            Some(e) if out.is_empty() => {
                // The consumers may have been deleted or the stream re-created: look them up
                // again next time.
                self.inner
                    .lanes
                    .lock()
                    .await
                    .remove(&(request.consumer.clone(), request.topic.clone()));
                Err(e)
            }
            Some(e) => {
                tracing::warn!(error = %e, "some lanes could not be read");
                Ok(out)
            }
            None => Ok(out),
        }
    }

    /// Turns a pulled message into a leased delivery, or dead-letters it past `max_deliver`.
    async fn admit(
        &self,
        request: &FetchRequest,
        lanes: &Arc<Lanes>,
        lane: usize,
        message: jetstream::Message,
    ) -> Option<Delivery> {
        let inner = &self.inner;
        let Some(reply) = message.message.reply.clone() else {
            tracing::error!(subject = %message.message.subject, "a pulled message has no reply subject: skipped");
            return None;
        };
        let (sequence, deliveries) = match message.info() {
            Ok(info) => (
                info.stream_sequence,
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
            ),
            Err(e) => {
                tracing::error!(error = %e, "a pulled message has no JetStream metadata: skipped");
                return None;
            }
        };
        let (message_id, partition_key, headers) = read_headers(
            message.message.headers.as_ref(),
            &inner.config.stream,
            sequence,
        );
        let delivery = Delivery {
            consumer: request.consumer.clone(),
            topic: request.topic.clone(),
            sequence,
            message_id,
            partition_key,
            headers,
            payload: message.message.payload.to_vec(),
            deliveries,
        };
        let ack_wait = *lock(&lanes.ack_wait);
        let until = Instant::now() + ack_wait;
        lock(&inner.leases).insert(
            LeaseKey::of(&delivery),
            Lease {
                reply,
                lanes: Arc::clone(lanes),
                lane,
                until,
            },
        );
        lanes.lanes[lane].set_busy(Some(until));
        if let Some(max) = inner.config.max_deliver {
            if deliveries > max {
                let reason = format!(
                    "delivered {deliveries} times without being acknowledged (max_deliver {max})"
                );
                if let Err(e) = self.dead_letter_now(&delivery, &reason).await {
                    tracing::error!(error = %e, sequence, "could not dead-letter past max_deliver: it comes back");
                }
                return None;
            }
        }
        bump(&inner.counters.fetched);
        Some(delivery)
    }

    fn lease(&self, d: &Delivery) -> Result<Lease, TransportError> {
        lock(&self.inner.leases)
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

    /// Sends an acknowledgement of some kind and waits for the server's confirmation.
    async fn settle(
        &self,
        d: &Delivery,
        kind: AckKind,
        busy_for: Option<Duration>,
    ) -> Result<(), TransportError> {
        let lease = self.lease(d)?;
        let inner = &self.inner;
        let payload: Bytes = kind.into();
        let answer = tokio::time::timeout(
            inner.config.request_timeout,
            inner.client.request(lease.reply.clone(), payload),
        )
        .await;
        match answer {
            Ok(Ok(_)) => {
                lock(&inner.leases).remove(&LeaseKey::of(d));
                let lane = &lease.lanes.lanes[lease.lane];
                lane.set_busy(busy_for.map(|delay| Instant::now() + delay));
                inner.wake.notify_waiters();
                Ok(())
            }
            Ok(Err(e)) => Err(unavailable("settling a delivery", e)),
            Err(_) => Err(unavailable(
                "settling a delivery",
                format!("no confirmation within {:?}", inner.config.request_timeout),
            )),
        }
    }

    async fn dead_letter_now(&self, d: &Delivery, reason: &str) -> Result<(), TransportError> {
        let inner = &self.inner;
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
        let subject = self.dead_letter_subject(&d.consumer, &d.topic);
        let published = async {
            inner
                .js
                .publish_with_headers(subject, headers, Bytes::from(d.payload.clone()))
                .await?
                .await
        };
        published
            .await
            .map_err(|e| unavailable("publishing a dead letter", e))?;
        self.settle(d, AckKind::Term, None).await?;
        bump(&inner.counters.dead_lettered);
        Ok(())
    }

    fn prune_leases(&self) {
        let now = Instant::now();
        lock(&self.inner.leases).retain(|_, lease| lease.until + LEASE_GRACE > now);
    }
}

fn lane_ids(partitions: u16) -> impl Iterator<Item = String> {
    (0..partitions)
        .map(|i| format!("p{i}"))
        .chain(std::iter::once("u".to_owned()))
}

fn reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("nats-") || lower == HEADER_PARTITION_KEY || lower.starts_with(DEAD_PREFIX)
}

/// The message id, the partition key and the application's headers of a received message.
fn read_headers(
    headers: Option<&HeaderMap>,
    stream: &str,
    sequence: u64,
) -> (String, Option<String>, BTreeMap<String, String>) {
    let mut message_id = None;
    let mut partition_key = None;
    let mut out = BTreeMap::new();
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            let name: &str = name.as_ref();
            let Some(value) = values.last() else { continue };
            let value = names::decode_value(value.as_str());
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
    (message_id, partition_key, out)
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

async fn ensure_stream(js: &jetstream::Context, config: &NatsConfig) -> Result<(), NatsError> {
    let stream_error = |reason: String| NatsError::Stream {
        stream: config.stream.clone(),
        reason,
    };
    let subjects = vec![
        format!("{}.msg.>", config.subject_prefix),
        format!("{}.dead.>", config.subject_prefix),
    ];
    let wanted = stream::Config {
        name: config.stream.clone(),
        description: Some(description(config)),
        subjects: subjects.clone(),
        retention: stream::RetentionPolicy::Limits,
        duplicate_window: config.duplicate_window,
        max_age: config.max_age.unwrap_or(Duration::ZERO),
        storage: match config.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        },
        num_replicas: config.replicas,
        ..stream::Config::default()
    };
    // Bounded: a lost creation race is retried once.
    for _ in 0..2 {
        match js.get_stream(&config.stream).await {
            Ok(stream) => {
                let existing = stream.cached_info().config.clone();
                return check_and_update(js, config, existing, wanted).await;
            }
            Err(e) => {
                let not_found = matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref err)
                        if err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                );
                if !not_found {
                    return Err(no_jetstream(config, e.to_string()));
                }
            }
        }
        match js.create_stream(wanted.clone()).await {
            Ok(_) => {
                tracing::info!(stream = %config.stream, "created the stream");
                return Ok(());
            }
            Err(e) => {
                let exists = matches!(
                    e.kind(),
                    jetstream::context::CreateStreamErrorKind::JetStream(ref err)
                        if err.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST
                );
                if !exists {
                    return Err(stream_error(format!("cannot create it: {e}")));
                }
            }
        }
    }
    Err(stream_error("created and deleted concurrently".into()))
}

fn no_jetstream(config: &NatsConfig, reason: String) -> NatsError {
    NatsError::NoJetStream {
        url: config.url.clone(),
        reason,
    }
}

async fn check_and_update(
    js: &jetstream::Context,
    config: &NatsConfig,
    existing: stream::Config,
    wanted: stream::Config,
) -> Result<(), NatsError> {
    let stream_error = |reason: String| NatsError::Stream {
        stream: config.stream.clone(),
        reason,
    };
    if let Some(recorded) = recorded_partitions(existing.description.as_deref()) {
        if recorded != config.partitions {
            return Err(stream_error(format!(
                "it was created with {recorded} partitions and this transport is configured with \
                 {}: every publisher and consumer of a stream must use the same count",
                config.partitions
            )));
        }
    } else {
        return Err(stream_error(
            "it exists but was not created by this transport (no partition count in its \
             description): use another stream name"
                .into(),
        ));
    }
    for subject in &wanted.subjects {
        if !existing.subjects.contains(subject) {
            return Err(stream_error(format!(
                "it does not hold the subject {subject} (it has {:?}): another subject prefix?",
                existing.subjects
            )));
        }
    }
    if existing.retention != stream::RetentionPolicy::Limits {
        return Err(stream_error(
            "its retention is not `limits`: several consumer groups need every message kept".into(),
        ));
    }
    if existing.duplicate_window != wanted.duplicate_window || existing.max_age != wanted.max_age {
        let updated = stream::Config {
            duplicate_window: wanted.duplicate_window,
            max_age: wanted.max_age,
            ..existing
        };
        js.update_stream(&updated)
            .await
            .map_err(|e| stream_error(format!("cannot set its duplicate window and age: {e}")))?;
        tracing::info!(stream = %config.stream, "updated the stream's duplicate window and age");
    }
    Ok(())
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
            let inner = &this.inner;
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
                        inner.wake.notify_waiters();
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
            this.prune_leases();
            let deadline = Instant::now() + request.wait;
            let poll = this.inner.config.poll_interval;
            // Bounded: every round returns or sleeps toward the deadline.
            loop {
                let notified = this.inner.wake.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let lanes = this
                    .lanes(&request.consumer, &request.topic, request.visibility)
                    .await?;
                let got = this.sweep(&lanes, &request).await?;
                let now = Instant::now();
                if !got.is_empty() || now >= deadline {
                    return Ok(got);
                }
                let nap = poll.min(deadline - now);
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep(nap) => {}
                }
            }
        }
    }

    fn ack(&self, delivery: &Delivery) -> impl Future<Output = Result<(), TransportError>> + Send {
        let this = self.clone();
        let d = delivery.clone();
        async move {
            this.settle(&d, AckKind::Ack, None).await?;
            bump(&this.inner.counters.acked);
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
            let kind = if delay.is_zero() {
                AckKind::Nak(None)
            } else {
                AckKind::Nak(Some(delay))
            };
            this.settle(&d, kind, Some(delay)).await?;
            bump(&this.inner.counters.nacked);
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
    fn the_stream_records_its_partition_count() {
        let config = NatsConfig::new("nats://127.0.0.1:4222");
        assert_eq!(recorded_partitions(Some(&description(&config))), Some(16));
        assert_eq!(recorded_partitions(Some("made by hand")), None);
        assert_eq!(recorded_partitions(None), None);
    }

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
        let (id, key, headers) = read_headers(Some(&map), "S", 7);
        assert_eq!(id, "k#0");
        assert_eq!(key.as_deref(), Some(" card 1\n"));
        assert_eq!(headers.len(), 1);
        assert_eq!(read_headers(None, "S", 7).0, "S:7");
    }
}
