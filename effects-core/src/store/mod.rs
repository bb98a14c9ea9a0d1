//! Stores: where the executor keeps datoms, effect runs and the outbox.
//!
//! The [`Store`] trait is the seam between the [`Executor`](crate::executor::Executor) and a
//! database. It is written for the executor's needs, not as a general database API: every method
//! is one short transaction that the executor's algorithm relies on (claim a key and apply a
//! run, claim outbox rows under a lease, record a response, mark a row dispatched, ...).
//!
//! # Async, and why
//!
//! Every method returns `impl Future<Output = ...> + Send`, so a store for a networked database
//! (PostgreSQL) can be natively asynchronous, and the executor can be driven from any tokio task.
//! A store over a blocking driver runs each call on tokio's blocking pool
//! ([`tokio::task::spawn_blocking`]) so that it never stalls the async workers: that is what the
//! SQLite store does. Because the methods return `impl Future`, the trait is not object safe;
//! the executor is generic over its store.
//!
//! # What a store must guarantee
//!
//! - [`Store::commit_runs`] is atomic: the key claim, the datoms, the history rows and the
//!   outbox rows of a run commit together or not at all, and two concurrent commits of one key
//!   never both succeed (the second sees [`Commit::Existing`]).
//! - Read validation is part of that transaction: a run whose [`NewRun::reads`] or expected
//!   values ([`NewDatom::expected`]) no longer hold is refused with [`Commit::Conflict`], and no
//!   other transaction can change a checked entity between the check and the commit.
//! - `tx` values increase with every committed run and are never reused.
//! - A lease on an outbox row excludes every other claimant until it expires; claims respect the
//!   ordering rules documented on [`Store::claim_due`].
//! - Pruning never removes undispatched outbox rows or runs that are not [`RunStatus::Done`].
//!
//! # Liveness: a dead process's work is taken over in seconds
//!
//! A lease is the fallback that frees the rows of a process that is alive but stuck; waiting
//! for it to expire is too slow for a process that is simply gone (killed, out of memory, its
//! pod evicted), and owner names change with every process, so nothing else would notice. A
//! store that can tell keeps each **owner** (an executor's owner name) alive by something that
//! dies with the process:
//!
//! - [`Store::register_owner`] takes that something for the owner and records the owner where
//!   other processes find it, for as long as the store handle (and its clones) lives. The
//!   executor registers its owner before its first claim ([`Executor::recover`]).
//! - [`Store::reap_dead_owners`], called by every relay about once a second
//!   ([`RelayConfig::reap_every`](crate::relay::RelayConfig::reap_every)), finds the owners
//!   whose something is gone, frees the rows they held leased (claimable at once; their fencing
//!   tokens no longer match, so the dead process could not record or mark anything even if it
//!   were not dead) and forgets them. A run whose last response such an owner recorded is
//!   stalled at once ([`Store::stalled_runs`]), not after the idle time.
//! - An owner that is alive, even paused or stuck, is never reaped: its rows wait for its
//!   lease, as before.
//!
//! The PostgreSQL store holds a session-level advisory lock per owner on a connection of its
//! own; the SQLite store an exclusive lock on a small file per owner. Each module says what
//! dies with the process and what the window is when the lock is lost while the process lives.
//! A store without liveness keeps the default methods: nothing is registered, nothing reaped,
//! and leases alone free a dead process's rows.
//!
//! [`Executor::recover`]: crate::executor::Executor::recover
//!
//! The embedded implementation is [`SqliteStore`] (feature `sqlite`).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::datom::{LookupRef, Op};
use crate::http::HttpResponse;
use crate::request::RequestEffect;

mod classify;
mod inspect;
mod tracked;

pub use self::classify::StoreErrorKind;
pub use self::inspect::{
    BacklogReport, BlockedInputEntry, ConsumerLag, DeadLetterEntry, DeadLetterId, DeadLetterKind,
    EntityHistory, InputDeadLetter, Inspect, OutboxEntry, RecordedOutcome, RetryOutcome,
    RetryRecord, RetryRequest, RunDetail, RunQuery, RunState, RunSummary,
};
pub use self::tracked::Tracked;

#[cfg(feature = "sqlite")]
pub use crate::sqlite::{Blocking, SqliteOptions, SqliteStore, Synchronous};

/// A transaction id: the number of the store transaction that applied a run. It increases with
/// every applied run and is never reused, so "as of `tx`" reads are well defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tx(pub i64);

impl fmt::Display for Tx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Milliseconds since the UNIX epoch: the unit of every timestamp a store keeps.
pub type Millis = i64;

/// The current time in [`Millis`] (0 if the clock is before 1970).
pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Identifies one opened database, so the executor can tell when a transport lives in the same
/// database as its store (see [`Store::colocation`]). Two values are equal only if they come
/// from the same [`Colocation::new`] call (or a clone of it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Colocation(Arc<u64>);

impl Colocation {
    /// A new identity, equal to no other.
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Colocation(Arc::new(NEXT.fetch_add(1, Ordering::Relaxed)))
    }
}

impl Default for Colocation {
    fn default() -> Self {
        Colocation::new()
    }
}

/// Whether an outbox row is an HTTP request or a broker message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxKind {
    /// An HTTP request: destination is the endpoint's name, payload the whole
    /// [`RequestEffect`] as JSON.
    Request,
    /// A broker message: destination is the topic, payload the message payload as JSON.
    Message,
}

impl OutboxKind {
    /// `request` or `message`, as stored.
    pub const fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Request => "request",
            OutboxKind::Message => "message",
        }
    }
}

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Datoms applied; some requests are not resolved yet (sent and recorded, or dead-lettered).
    /// The run's messages wait for them.
    RequestsPending,
    /// Requests resolved and after-requests persisted; some messages are not dispatched yet.
    MessagesPending,
    /// Everything dispatched or dead-lettered.
    Done,
}

impl RunStatus {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            RunStatus::RequestsPending => "requests_pending",
            RunStatus::MessagesPending => "messages_pending",
            RunStatus::Done => "done",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<RunStatus> {
        match s {
            "requests_pending" => Some(RunStatus::RequestsPending),
            "messages_pending" => Some(RunStatus::MessagesPending),
            "done" => Some(RunStatus::Done),
            _ => None,
        }
    }
}

/// The id of the `n`th outbox row of the run with idempotency key `key`: `key#n`. It is the
/// `Idempotency-Key` of a request and the broker message id of a message.
pub fn outbox_id(key: &str, n: u32) -> String {
    format!("{key}#{n}")
}

/// A datom ready to be written: values already in canonical JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDatom {
    /// The identity attribute of the lookup ref (`card/id`).
    pub identity: String,
    /// The identity value, canonical JSON (`"c1"` with the quotes).
    pub identity_value: String,
    /// Assert or retract.
    pub op: Op,
    /// Attribute names and canonical JSON values, sorted by name.
    pub attributes: Vec<(String, String)>,
    /// Compare-and-set: attribute names and the canonical JSON value each must hold before the
    /// run writes anything (`null`: holds no value), sorted by name.
    pub expected: Vec<(String, String)>,
}

/// What a run's inputs were computed from: an entity, and the version at which it was read —
/// the last transaction that changed it ([`Entity::tx`]), or `None` if it did not exist.
///
/// A run carrying reads commits only if none of those entities changed since (see
/// [`Conflict`]). Versions are per entity, not per attribute: a change to any attribute of a
/// read entity refuses the run, even one the handler did not look at. That can only cost a
/// re-run, never a lost update; and writes to other entities, or writes that leave every value
/// as it was, never refuse it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadVersion {
    /// The entity.
    pub entity: LookupRef,
    /// Its version when read; `None`: it did not exist.
    pub tx: Option<Tx>,
}

impl ReadVersion {
    /// The read of an entity as loaded.
    pub fn of(entity: &Entity) -> ReadVersion {
        ReadVersion {
            entity: entity.lookup.clone(),
            tx: Some(entity.tx),
        }
    }

    /// The read of an entity that was looked up and not found: the run is refused if it
    /// exists by the time the run commits.
    pub fn missing(entity: LookupRef) -> ReadVersion {
        ReadVersion { entity, tx: None }
    }
}

/// A [`ReadVersion`] ready for the store: the identity value in canonical JSON text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRead {
    /// The entity as read.
    pub entity: LookupRef,
    /// The identity value, canonical JSON.
    pub identity_value: String,
    /// The version read.
    pub tx: Option<Tx>,
}

/// Why a run was refused at commit: something it was computed from changed after it was read.
/// Nothing of the run was written; a pure handler can simply be run again on fresh state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "conflict", rename_all = "snake_case")]
pub enum Conflict {
    /// An entity read for the run changed after it was read.
    #[error("entity {entity} was read {} but is {} now", version(*read), version(*found))]
    Read {
        /// The entity.
        entity: LookupRef,
        /// The version read (`None`: it did not exist).
        read: Option<Tx>,
        /// The version found at commit (`None`: it does not exist).
        found: Option<Tx>,
    },
    /// A compare-and-set datom expected a value the attribute no longer holds.
    #[error(
        "datoms[{datom}] expected {attribute} of {entity} to be {} but it is {}",
        shown(expected.as_ref()),
        shown(found.as_ref())
    )]
    Expected {
        /// The datom's index in the run's effects.
        datom: usize,
        /// The entity.
        entity: LookupRef,
        /// The attribute, namespaced.
        attribute: String,
        /// The value expected (`None`: no value).
        expected: Option<Value>,
        /// The value found (`None`: no value).
        found: Option<Value>,
    },
}

impl Conflict {
    /// The entity the conflict is about.
    pub fn entity(&self) -> &LookupRef {
        match self {
            Conflict::Read { entity, .. } | Conflict::Expected { entity, .. } => entity,
        }
    }

    /// Read validation of one read, whatever the store: a conflict when the entity it saw is
    /// now at another version (`found`, `None` when it does not exist).
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn of_read(read: &NewRead, found: Option<Tx>) -> Option<Conflict> {
        (found != read.tx).then(|| Conflict::Read {
            entity: read.entity.clone(),
            read: read.tx,
            found,
        })
    }

    /// Compare-and-set of one attribute of `datoms[index]`, whatever the store: a conflict when
    /// the attribute's stored JSON text `current` (`None` when unset) is not `expected` (the
    /// text `null` expects it unset).
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn of_expectation(
        index: usize,
        datom: &NewDatom,
        attribute: &str,
        expected: &str,
        current: Option<&str>,
    ) -> Result<Option<Conflict>, StoreError> {
        let holds = match current {
            Some(value) => value == expected,
            None => expected == "null",
        };
        if holds {
            return Ok(None);
        }
        let parse = |text: &str| -> Result<Value, StoreError> {
            serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
                what: format!("compare-and-set of datoms[{index}]"),
                reason: e.to_string(),
            })
        };
        Ok(Some(Conflict::Expected {
            datom: index,
            entity: LookupRef::new(datom.identity.as_str(), parse(&datom.identity_value)?),
            attribute: attribute.to_owned(),
            expected: Some(parse(expected)?).filter(|v| !v.is_null()),
            found: current.map(parse).transpose()?,
        }))
    }
}

fn version(tx: Option<Tx>) -> String {
    match tx {
        Some(tx) => format!("at tx {tx}"),
        None => "absent".to_owned(),
    }
}

fn shown(value: Option<&Value>) -> String {
    match value {
        Some(v) => v.to_string(),
        None => "no value".to_owned(),
    }
}

/// An outbox row to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewOutboxRow {
    /// Its number within the run: requests first, then messages, then after-requests messages.
    pub seq: u32,
    /// Request or message.
    pub kind: OutboxKind,
    /// The topic of a message or the endpoint of a request.
    pub destination: String,
    /// The partition key of a message.
    pub partition_key: Option<String>,
    /// The effect's own headers.
    pub headers: BTreeMap<String, String>,
    /// The message payload, or the whole request, as canonical JSON.
    pub payload: String,
}

/// One run to commit: everything the store writes for `Executor::run`, prepared and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRun {
    /// The idempotency key.
    pub key: String,
    /// Lowercase hex SHA-256 of [`Effects::canonical_json`](crate::Effects::canonical_json).
    pub effects_sha256: String,
    /// The name of the registered after-requests hook, if any.
    pub after_requests: Option<String>,
    /// What the run was computed from: refused with [`Commit::Conflict`] if any changed.
    pub reads: Vec<NewRead>,
    /// The datoms, in order.
    pub datoms: Vec<NewDatom>,
    /// The outbox rows, in `seq` order.
    pub outbox: Vec<NewOutboxRow>,
    /// The input message this run answers, to acknowledge in the commit's own transaction if
    /// the run is applied (or was applied before): set only when the transport is a log in the
    /// store's own database (see [`RunOptions::input`](crate::executor::RunOptions::input)).
    pub ack: Option<InputAck>,
}

/// An input message of a log in the store's own database, to be acknowledged in the same
/// transaction as the run it caused ([`NewRun::ack`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InputAck {
    /// The consumer (group) that fetched it.
    pub consumer: String,
    /// Its topic.
    pub topic: String,
    /// Its position in the topic.
    pub sequence: u64,
}

impl InputAck {
    /// The input of a delivery.
    pub fn of(delivery: &crate::transport::Delivery) -> InputAck {
        InputAck {
            consumer: delivery.consumer.clone(),
            topic: delivery.topic.clone(),
            sequence: delivery.sequence,
        }
    }
}

/// A lease held on claimed outbox rows: who claimed them, and the claim's fencing token.
///
/// Every claim takes a new token, higher than any before it. A row's lease is held while its
/// stored token is the holder's: once another claimant has taken the row (after the lease
/// expired), the old holder's token no longer matches, and the store refuses to record, mark,
/// reschedule or renew anything for it. Expiry is measured by the store's own clock, never the
/// caller's, so a process whose clock is wrong cannot take a lease early.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    /// Who holds it (an executor's owner name).
    pub owner: String,
    /// The claim's fencing token.
    pub token: i64,
}

/// A hook a store calls inside its transaction, just before committing. Fault injection only.
#[doc(hidden)]
pub type BeforeCommit = Arc<dyn Fn() + Send + Sync>;

/// How a commit or a claim is done. Times are the store's: it reads its own clock.
#[derive(Clone)]
pub struct ClaimOptions {
    /// Who claims (an executor's owner name).
    pub owner: String,
    /// How long the lease on the rows handed back lasts, from the store's clock.
    pub lease: Duration,
    /// Publish ready messages into the store's own log (a colocated transport) in the same
    /// transaction and mark them dispatched, instead of handing them back.
    pub publish_inline: bool,
    #[doc(hidden)]
    pub before_commit: Option<BeforeCommit>,
}

impl fmt::Debug for ClaimOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimOptions")
            .field("owner", &self.owner)
            .field("lease", &self.lease)
            .field("publish_inline", &self.publish_inline)
            .finish_non_exhaustive()
    }
}

/// A stored outbox row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    /// `key#n`.
    pub id: String,
    /// The run's idempotency key.
    pub run_key: String,
    /// `n`.
    pub seq: u32,
    /// Request or message.
    pub kind: OutboxKind,
    /// Topic or endpoint.
    pub destination: String,
    /// The partition key of a message.
    pub partition_key: Option<String>,
    /// The effect's own headers.
    pub headers: BTreeMap<String, String>,
    /// Canonical JSON: the message payload, or the whole request.
    pub payload: String,
    /// The run's `tx`.
    pub tx: Tx,
    /// Dispatch attempts started so far (counted when a row is claimed).
    pub attempts: u32,
    /// Not claimed again before this time.
    pub next_attempt_at: Millis,
    /// The last failure, if an attempt failed.
    pub last_error: Option<String>,
    /// When the broker acknowledged it or its response was recorded.
    pub dispatched_at: Option<Millis>,
    /// Why it will never be dispatched.
    pub dead_lettered: Option<String>,
    /// The lease on it, if one was taken and not given back: for a row just claimed, the
    /// caller's.
    pub lease: Option<Lease>,
    /// When that lease expires (the store's clock).
    pub lease_until: Option<Millis>,
}

impl OutboxRow {
    /// The request this row carries, for a [`OutboxKind::Request`] row.
    pub fn request(&self) -> Result<RequestEffect, StoreError> {
        serde_json::from_str(&self.payload).map_err(|e| StoreError::Corrupt {
            what: format!("outbox row `{}`", self.id),
            reason: format!("payload is not a request: {e}"),
        })
    }

    /// Whether it still has to be dispatched.
    pub fn is_pending(&self) -> bool {
        self.dispatched_at.is_none() && self.dead_lettered.is_none()
    }
}

/// A stored effect run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRecord {
    /// The idempotency key.
    pub key: String,
    /// Lowercase hex SHA-256 of the effects' canonical JSON.
    pub effects_sha256: String,
    /// The transaction that applied it.
    pub tx: Tx,
    /// Where it stands.
    pub status: RunStatus,
    /// The after-requests hook it was run with.
    pub after_requests: Option<String>,
    /// How many outbox rows it has (the next `n`).
    pub outbox_count: u32,
    /// When it was applied.
    pub created_at: Millis,
    /// When it last made progress.
    pub updated_at: Millis,
    /// When it became [`RunStatus::Done`].
    pub completed_at: Option<Millis>,
}

/// Rows handed to a claimant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claimed {
    /// Rows now leased to the claimant, in the order to dispatch them.
    pub rows: Vec<OutboxRow>,
    /// Messages published into the colocated log inside the claim instead.
    pub published_inline: usize,
}

/// The result of committing one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commit {
    /// The key was free: the run is applied.
    Applied {
        /// Its transaction.
        tx: Tx,
        /// Its status after the commit.
        status: RunStatus,
        /// Outbox rows now leased to the committer, to dispatch in order.
        claimed: Vec<OutboxRow>,
        /// Messages published into the colocated log inside the commit.
        published_inline: usize,
    },
    /// The key was taken: nothing was written.
    Existing(RunRecord),
    /// The key was free, but something the run was computed from changed after it was read, or
    /// a compare-and-set datom found another value: nothing was written.
    Conflict(Conflict),
}

/// How a request ended, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RequestOutcome {
    /// A successful response (2xx or 3xx).
    Response {
        /// The response.
        response: HttpResponse,
    },
    /// A permanent refusal (4xx other than 429): dead-lettered.
    Rejected {
        /// The response.
        response: HttpResponse,
    },
    /// A permanent failure without a response (unknown endpoint, invalid request, too many
    /// attempts): dead-lettered.
    Failed {
        /// Why.
        reason: String,
    },
}

impl RequestOutcome {
    /// The response, if the server gave one.
    pub fn response(&self) -> Option<&HttpResponse> {
        match self {
            RequestOutcome::Response { response } | RequestOutcome::Rejected { response } => {
                Some(response)
            }
            RequestOutcome::Failed { .. } => None,
        }
    }

    /// Whether the request succeeded.
    pub fn is_success(&self) -> bool {
        matches!(self, RequestOutcome::Response { .. })
    }
}

/// A request of a run and how it ended: the input of an after-requests hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// `key#n`, its idempotency key.
    pub id: String,
    /// `n`.
    pub seq: u32,
    /// The request.
    pub request: RequestEffect,
    /// How it ended.
    pub outcome: RequestOutcome,
}

/// The result of [`Store::finish_requests`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The after-requests messages are persisted and the run's messages are ready.
    Finished {
        /// Its status now.
        status: RunStatus,
        /// Message rows leased to the caller, to dispatch in order.
        claimed: Vec<OutboxRow>,
        /// Messages published into the colocated log inside the same transaction.
        published_inline: usize,
    },
    /// Some request of the run is not resolved yet.
    NotReady,
    /// Someone else finished it already (or the run does not exist).
    AlreadyFinished,
}

/// An entity as of some transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    /// Its identity.
    pub lookup: LookupRef,
    /// The attributes it holds, by namespaced name (`card/status`), without the identity.
    pub attributes: BTreeMap<String, Value>,
    /// The last transaction that changed it (at or before the read's `as of`).
    pub tx: Tx,
}

impl Entity {
    /// The value of `attribute` (namespaced), if it holds one.
    pub fn get(&self, attribute: &str) -> Option<&Value> {
        self.attributes.get(attribute)
    }

    /// The entity as a JSON object keyed by attribute names without their namespace, the
    /// identity included: `card/id = "c1", card/status = "active"` becomes
    /// `{"id": "c1", "status": "active"}`.
    pub fn to_unqualified(&self) -> Value {
        let unqualify = |name: &str| -> String {
            name.split_once('/')
                .map_or(name, |(_, local)| local)
                .to_owned()
        };
        let mut map = serde_json::Map::new();
        map.insert(unqualify(&self.lookup.attribute), self.lookup.value.clone());
        for (name, value) in &self.attributes {
            map.insert(unqualify(name), value.clone());
        }
        Value::Object(map)
    }

    /// Deserializes [`Entity::to_unqualified`] into a domain type, such as a `Card`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_value(self.to_unqualified())
    }
}

/// One effective change in the datom history, with the transaction that made it: an assertion
/// of a new value (preceded, in the same transaction, by the retraction of the value it
/// replaced) or a retraction of the current value. Asserting the value an attribute already
/// holds changes nothing and leaves no history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryDatom {
    /// The transaction.
    pub tx: Tx,
    /// The idempotency key of the run the transaction applied.
    pub run_key: String,
    /// The entity.
    pub entity: LookupRef,
    /// The attribute, namespaced (`card/status`).
    pub attribute: String,
    /// The value asserted or retracted.
    pub value: Value,
    /// Whether the value was asserted or retracted.
    pub op: Op,
}

/// What pruning may remove: everything older than these ages, measured by the store's own
/// clock (a pruning process whose clock runs ahead cannot shorten them: on PostgreSQL the
/// server's clock; on SQLite the store's clock, which no process's wall clock can move ahead by
/// more than 1 % of real time). `None` keeps that kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneOlderThan {
    /// Outbox rows dispatched longer ago than this, of runs that are done.
    pub outbox_dispatched: Option<Duration>,
    /// Runs completed longer ago than this with no outbox rows left (their recorded responses
    /// go with them). After that the key can be applied again: keep runs longer than any
    /// redelivery can take.
    pub runs_completed: Option<Duration>,
    /// Log messages published longer ago than this that every consumer of their topic has
    /// acknowledged (only stores with a colocated log).
    pub log_published: Option<Duration>,
}

/// What a store still has to do (the `backlog()` of the SQLite and PostgreSQL stores): for
/// health checks, and to wait until a process has caught up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Outbox rows neither dispatched nor dead-lettered.
    pub pending_rows: u64,
    /// Outbox rows dead-lettered (kept for operators).
    pub dead_lettered_rows: u64,
    /// Runs not done.
    pub open_runs: u64,
}

/// What pruning removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Outbox rows.
    pub outbox_rows: u64,
    /// Runs.
    pub runs: u64,
    /// Log messages.
    pub log_messages: u64,
}

/// What [`Store::reap_dead_owners`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// The owners found dead, now forgotten.
    pub owners: Vec<String>,
    /// The outbox rows they held leased, now claimable.
    pub rows: u64,
}

/// An input whose processing keeps failing while later inputs of its partition key wait behind
/// it: what a worker reports ([`Store::report_blocked`]) so that operators can see which key
/// is held up, since when and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedInput {
    /// The partition key it holds up (`None`: a message without one, which holds up nothing
    /// but itself).
    pub partition_key: Option<String>,
    /// The message's id.
    pub message_id: String,
    /// How long it has been failing, measured by the worker when it reports.
    pub failing_for: Duration,
    /// Attempts made (deliveries by the broker and retries in the worker).
    pub attempts: u32,
    /// The last failure.
    pub reason: String,
}

/// `text` as the stores keep text that may hold anything (what workers report): a NUL
/// character (U+0000), which PostgreSQL refuses in `text`, is written as the six characters
/// `\u{0}`. Every store does the same, so that they all give back the same text.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn nul_escaped(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\\u{0}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// A [`BlockedInput`] as the stores write it: its place in the report, its text with NUL
/// escaped ([`nul_escaped`]), durations in milliseconds.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlockedRow {
    pub(crate) position: i32,
    pub(crate) partition_key: Option<String>,
    pub(crate) message_id: String,
    pub(crate) failing_for: Millis,
    pub(crate) attempts: i64,
    pub(crate) reason: String,
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl BlockedRow {
    /// The rows of a report, in its order.
    pub(crate) fn of(report: Vec<BlockedInput>) -> Vec<BlockedRow> {
        report
            .into_iter()
            .enumerate()
            .map(|(i, b)| BlockedRow {
                position: i32::try_from(i).unwrap_or(i32::MAX),
                partition_key: b
                    .partition_key
                    .as_deref()
                    .map(|k| nul_escaped(k).into_owned()),
                message_id: nul_escaped(&b.message_id).into_owned(),
                failing_for: i64::try_from(b.failing_for.as_millis()).unwrap_or(i64::MAX),
                attempts: i64::from(b.attempts),
                reason: nul_escaped(&b.reason).into_owned(),
            })
            .collect()
    }
}

/// A store error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or configured.
    #[error("cannot open the database {location}: {source}")]
    Open {
        /// The path, or `:memory:`.
        location: String,
        /// The driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A migration failed or the schema is not one this library knows.
    #[error("migration {version} (`{name}`) {reason}")]
    Migration {
        /// The migration's version.
        version: i64,
        /// Its file name.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// A statement or a commit failed. Nothing of the operation was written.
    #[error("database error while {operation}: {source}")]
    Database {
        /// What the store was doing.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Stored data is not what this library writes.
    #[error("corrupt data in {what}: {reason}")]
    Corrupt {
        /// Which row.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The blocking task running the operation panicked or was cancelled.
    #[error("the store task failed: {reason}")]
    Task {
        /// The join error.
        reason: String,
    },
}

/// What the executor, the relay and the worker need from a database. See the
/// [module documentation](self) for the guarantees an implementation must give.
pub trait Store: Send + Sync + 'static {
    /// The database's identity, for transports that live in it. A transport with an equal
    /// [`Transport::colocation`](crate::transport::Transport::colocation) is published to inside
    /// the store's transactions when [`ClaimOptions::publish_inline`] is set.
    fn colocation(&self) -> Option<Colocation> {
        None
    }

    /// Commits runs in ONE transaction. For each run in order: claim the key (if it is taken,
    /// [`Commit::Existing`] and nothing of that run is written); check its reads and the
    /// expected values of its compare-and-set datoms against the state before the run (if one
    /// differs, [`Commit::Conflict`] and nothing of that run is written); allocate a `tx`, apply the
    /// datoms (entity upserts, current values, effective history rows), write the outbox rows,
    /// and claim the ready ones under `options.lease` (or publish them inline). Requests are
    /// ready at once; messages only when the run has no requests. If any statement fails the
    /// whole transaction rolls back and the error is returned.
    fn commit_runs(
        &self,
        runs: Vec<NewRun>,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Vec<Commit>, StoreError>> + Send;

    /// The run with this key.
    fn run(&self, key: &str) -> impl Future<Output = Result<Option<RunRecord>, StoreError>> + Send;

    /// The runs with these keys, in the same order (`None` where there is none): the worker
    /// looks up the keys of a whole batch of fresh deliveries at once. The default asks
    /// [`Store::run`] for each, concurrently.
    fn runs_by_key(
        &self,
        keys: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Option<RunRecord>>, StoreError>> + Send {
        async move {
            futures_util::future::join_all(keys.iter().map(|k| self.run(k)))
                .await
                .into_iter()
                .collect()
        }
    }

    /// Claims the pending, due, unleased rows of one run (the duplicate path), with the rules
    /// of [`Store::claim_due`].
    fn claim_run(
        &self,
        key: &str,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + Send;

    /// Claims up to `limit` pending, ready, due and unleased rows of any run, in ready order,
    /// incrementing their attempts. Rules: a request is claimed only when every earlier
    /// request of its run is resolved or claimed in the same call; a message with a partition
    /// key only when no earlier ready message with the same topic and key is pending outside
    /// this call. With `publish_inline`, ready messages are published into the colocated log
    /// instead of being handed back.
    fn claim_due(
        &self,
        limit: usize,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Claimed, StoreError>> + Send;

    /// Runs stuck in [`RunStatus::RequestsPending`] with every request resolved and no
    /// progress for `idle_for` (by the store's clock): a crash came between the last response and the
    /// after-requests step. A run whose last response was recorded by an owner that
    /// [`Store::reap_dead_owners`] found dead is stalled at once, whatever `idle_for`.
    fn stalled_runs(
        &self,
        idle_for: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<RunRecord>, StoreError>> + Send;

    /// Records how a request ended and resolves its row: dispatched for a response,
    /// dead-lettered for a rejection or failure. The first record wins; later ones change
    /// nothing. Refused (`Ok(false)`, nothing written) unless `lease` still holds the row.
    fn record_request(
        &self,
        id: &str,
        outcome: RequestOutcome,
        lease: &Lease,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Every request of a run that has been recorded, in order.
    fn recorded_requests(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Vec<RecordedRequest>, StoreError>> + Send;

    /// Persists the after-requests messages of a run whose requests are all resolved, makes
    /// its messages ready and claims them (or publishes them inline) in one transaction.
    fn finish_requests(
        &self,
        key: &str,
        after_requests: Vec<NewOutboxRow>,
        options: ClaimOptions,
    ) -> impl Future<Output = Result<Finish, StoreError>> + Send;

    /// Marks a row dispatched (the broker acknowledged it) and the run done if it was the
    /// last pending row. Refused (`Ok(false)`) unless `lease` still holds the row.
    fn mark_dispatched(
        &self,
        id: &str,
        lease: &Lease,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Marks several rows dispatched, each as [`mark_dispatched`](Store::mark_dispatched)
    /// would (refused, `false` at its index, unless its lease still holds it), in as few
    /// transactions as the store can: the executor marks the messages it published for a batch
    /// of runs together. The default marks them one by one.
    fn mark_dispatched_many(
        &self,
        rows: Vec<(String, Lease)>,
    ) -> impl Future<Output = Result<Vec<bool>, StoreError>> + Send {
        async move {
            let mut out = Vec::with_capacity(rows.len());
            for (id, lease) in &rows {
                out.push(self.mark_dispatched(id, lease).await?);
            }
            Ok(out)
        }
    }

    /// Gives up on a row for good, with the reason. With a lease (a claimant giving up),
    /// refused (`Ok(false)`) unless the lease still holds the row; without one (an operator),
    /// refused while anyone holds an unexpired lease on it. Refused too if the row is already
    /// dispatched or dead-lettered.
    fn dead_letter(
        &self,
        id: &str,
        reason: &str,
        lease: Option<&Lease>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Releases the lease on a row after a failed attempt: it is claimed again once `delay`
    /// has passed (by the store's clock). Refused (`Ok(false)`) unless `lease` still holds it.
    fn retry_later(
        &self,
        id: &str,
        lease: &Lease,
        error: &str,
        delay: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Extends the lease on rows still held by `lease` to `duration` from now (the store's
    /// clock), and returns the ids it still holds: a claimant working longer than its lease
    /// renews as it goes, and stops working on a row it no longer holds.
    fn renew(
        &self,
        ids: Vec<String>,
        lease: &Lease,
        duration: Duration,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Releases leases `owner` holds on rows it did not attempt (their attempt is not
    /// counted). With no ids, every lease `owner` holds: a restarted process reclaims what its
    /// previous incarnation left.
    fn release(
        &self,
        ids: Vec<String>,
        owner: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Registers `owner` as alive for as long as this store handle (or a clone of it) lives:
    /// the store takes something that dies with the process and records the owner where other
    /// processes' [`Store::reap_dead_owners`] find it. Registering an owner this handle has
    /// registered already does nothing. Call it before taking leases under `owner` (the
    /// executor does, in [`Executor::recover`](crate::executor::Executor::recover)). Owner
    /// names must be unique among live processes.
    ///
    /// The default does nothing: the owner's rows are then freed by their leases only.
    fn register_owner(&self, owner: &str) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = owner;
        async { Ok(()) }
    }

    /// Finds the registered owners whose process is gone, frees the leases they held on
    /// pending rows (the rows are claimable at once; the old fencing tokens no longer match)
    /// and forgets them with what they reported as blocked ([`Store::report_blocked`]), so
    /// that runs whose last response they recorded are stalled at once
    /// ([`Store::stalled_runs`]). An owner that is alive, even paused, is never reaped. Several
    /// processes may reap at once: each dead owner is reaped by one of them.
    ///
    /// The default finds nothing.
    fn reap_dead_owners(&self) -> impl Future<Output = Result<Reaped, StoreError>> + Send {
        async { Ok(Reaped::default()) }
    }

    /// Replaces what `owner`'s worker of `consumer` on `topic` reports as blocked: the inputs
    /// it holds whose processing has been failing for a while, each holding up its partition
    /// key (an empty list: none any more). A store keeps the report (its clock turns
    /// `failing_for` into a time) until the next one, or until the owner is reaped as dead;
    /// operators read it with [`Inspect::blocked_inputs`].
    ///
    /// The SQLite and PostgreSQL stores replace the rows of (`owner`, `consumer`, `topic`) in
    /// one transaction, delete them in the transaction that reaps the owner
    /// ([`Store::reap_dead_owners`]), and register the owner of a report that is not empty
    /// ([`Store::register_owner`]), so that it goes when the reporting process dies even if
    /// nothing else registered it. They keep any text: a NUL character (U+0000) is written as
    /// `\u{0}`.
    ///
    /// The default keeps nothing.
    fn report_blocked(
        &self,
        owner: &str,
        consumer: &str,
        topic: &str,
        blocked: Vec<BlockedInput>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (owner, consumer, topic, blocked);
        async { Ok(()) }
    }

    /// Every outbox row of a run, in `seq` order.
    fn outbox(&self, key: &str) -> impl Future<Output = Result<Vec<OutboxRow>, StoreError>> + Send;

    /// The entity a lookup ref names, now (`as_of = None`) or as of a transaction.
    fn entity(
        &self,
        lookup: &LookupRef,
        as_of: Option<Tx>,
    ) -> impl Future<Output = Result<Option<Entity>, StoreError>> + Send;

    /// The latest committed transaction.
    fn latest_tx(&self) -> impl Future<Output = Result<Option<Tx>, StoreError>> + Send;

    /// Removes what is old enough; never an undispatched outbox row nor a run that is not done.
    fn prune(
        &self,
        older_than: PruneOlderThan,
    ) -> impl Future<Output = Result<PruneReport, StoreError>> + Send;
}
